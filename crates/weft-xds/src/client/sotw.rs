//! State-of-the-world ADS stream (`StreamAggregatedResources`).

use std::collections::BTreeSet;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::Any;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

use super::{nack_status, AdsClient, Memory, ResourceUpdate, HEALTHY_AFTER};
use crate::type_url::{resource_name, short};

/// Per-type state of one SotW stream.
#[derive(Default)]
struct TypeState {
    /// Names last sent in a request (`None` = wildcard); `None` outer = never requested.
    requested: Option<Option<BTreeSet<String>>>,
    /// Nonce of the last response received.
    nonce: String,
}

struct Stream<'a> {
    client: &'a AdsClient,
    tx: mpsc::UnboundedSender<DiscoveryRequest>,
    /// The subscribed types in ADS order (each once).
    order: Vec<&'static str>,
    /// The state of `order[i]` at index `i`: a response finds it by the scan of `order`
    /// that checks its type anyway (no map keyed by long type URLs to search).
    types: Vec<TypeState>,
    node_sent: bool,
}

/// Runs one SotW stream until it fails. `healthy` becomes true once a response arrived.
pub(super) async fn run_stream(
    client: &AdsClient,
    mut grpc: AggregatedDiscoveryServiceClient<Channel>,
    memory: &mut Memory,
    healthy: &mut bool,
) -> Result<(), String> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut order = client.handler.type_urls();
    let mut seen = BTreeSet::new();
    order.retain(|t| seen.insert(*t));
    let mut stream =
        Stream { client, tx, types: order.iter().map(|_| TypeState::default()).collect(), order, node_sent: false };
    // Initial requests, in ADS order, carrying the last accepted versions.
    stream.sync_interest(None)?;
    let mut responses = grpc
        .stream_aggregated_resources(client.stream_request(UnboundedReceiverStream::new(rx))?)
        .await
        .map_err(|e| format!("open SotW stream: {e}"))?
        .into_inner();
    client.mark_connected();
    // A stream that stays up counts as healthy even without a response: a resumed one
    // (the control plane already has our versions) may stay silent for long.
    let opened = std::time::Instant::now();
    let result = stream_body(&mut responses, &mut stream, memory, healthy).await;
    *healthy |= opened.elapsed() >= HEALTHY_AFTER;
    result
}

/// Applies responses until the stream ends.
async fn stream_body(
    responses: &mut tonic::Streaming<DiscoveryResponse>,
    stream: &mut Stream<'_>,
    memory: &mut Memory,
    healthy: &mut bool,
) -> Result<(), String> {
    while let Some(response) = responses.message().await.map_err(|e| format!("SotW stream: {e}"))? {
        *healthy = true;
        stream.handle(response, memory)?;
    }
    Ok(())
}

impl Stream<'_> {
    /// Applies one response and answers it: ACK with its version, or NACK with the
    /// last accepted one. The response is taken apart, not copied: its resources move
    /// into the update, its nonce into the answer.
    fn handle(&mut self, response: DiscoveryResponse, memory: &mut Memory) -> Result<(), String> {
        let DiscoveryResponse { version_info, resources, type_url: received, nonce, .. } = response;
        let Some((index, type_url)) = self.order.iter().copied().enumerate().find(|(_, t)| *t == received) else {
            let error = format!("unknown type_url {received}: not subscribed");
            self.client.record_nack(&received, &error);
            return self.send(DiscoveryRequest {
                type_url: received,
                response_nonce: nonce,
                error_detail: Some(nack_status(&error)),
                ..Default::default()
            });
        };
        let wildcard = match self.types.get_mut(index) {
            Some(state) => {
                state.nonce.clone_from(&nonce);
                matches!(state.requested, Some(None))
            }
            None => false,
        };
        let outcome = name_all(type_url, resources).and_then(|upserts| {
            // Only a full-state (wildcard) type needs the names kept, to report removals.
            let names: Option<BTreeSet<String>> = wildcard.then(|| upserts.iter().map(|(n, _)| n.clone()).collect());
            let removals = match (&names, memory.sotw_names.get(type_url)) {
                (Some(names), Some(old)) => old.difference(names).cloned().collect(),
                _ => Vec::new(),
            };
            let update = ResourceUpdate {
                version: version_info.clone(),
                upserts,
                removals,
                full_state: wildcard,
                resolved: Vec::new(),
            };
            self.client.handler.apply(type_url, update).map(|()| names)
        });
        let interest = self.client.handler.interest(type_url);
        let mut request = DiscoveryRequest {
            type_url: type_url.to_string(),
            response_nonce: nonce,
            resource_names: names_of(&interest),
            ..Default::default()
        };
        match outcome {
            Ok(names) => {
                if let Some(names) = names {
                    memory.sotw_names.insert(type_url.to_string(), names);
                }
                self.client.record_ack(type_url, &version_info);
                request.version_info = version_info;
            }
            Err(error) => {
                self.client.record_nack(type_url, &error);
                request.version_info = self.client.acked_version(type_url);
                request.error_detail = Some(nack_status(&error));
            }
        }
        if let Some(state) = self.types.get_mut(index) {
            state.requested = Some(interest);
        }
        self.send(request)?;
        self.sync_interest(Some(index))
    }

    /// Sends a request for every type whose interest differs from what was last
    /// requested (all types at stream start), except `skip` (an index in `order`) which
    /// was just answered.
    fn sync_interest(&mut self, skip: Option<usize>) -> Result<(), String> {
        for i in 0..self.order.len() {
            let Some(type_url) = self.order.get(i).copied() else { break };
            if Some(i) == skip {
                continue;
            }
            let interest = self.client.handler.interest(type_url);
            let Some(state) = self.types.get(i) else {
                continue;
            };
            let changed = match &state.requested {
                Some(previous) => *previous != interest,
                // Nothing asked yet: ask unless the wanted set is empty (an empty
                // list would read as a wildcard on some servers).
                None => interest.as_ref().is_none_or(|names| !names.is_empty()),
            };
            if !changed {
                continue;
            }
            let request = DiscoveryRequest {
                type_url: type_url.to_string(),
                version_info: self.client.acked_version(type_url),
                response_nonce: state.nonce.clone(),
                resource_names: names_of(&interest),
                ..Default::default()
            };
            if let Some(state) = self.types.get_mut(i) {
                state.requested = Some(interest);
            }
            self.send(request)?;
        }
        Ok(())
    }

    fn send(&mut self, mut request: DiscoveryRequest) -> Result<(), String> {
        if !self.node_sent {
            request.node = Some(self.client.config.node.to_node());
            self.node_sent = true;
        }
        self.tx.send(request).map_err(|_| "SotW request stream closed".to_string())
    }
}

fn names_of(interest: &Option<BTreeSet<String>>) -> Vec<String> {
    interest.as_ref().map(|names| names.iter().cloned().collect()).unwrap_or_default()
}

/// Names and checks every resource of a response, moving each into the result (no copy
/// of its bytes); the error names type and resource.
fn name_all(type_url: &str, resources: Vec<Any>) -> Result<Vec<(String, Any)>, String> {
    resources
        .into_iter()
        .enumerate()
        .map(|(i, any)| match resource_name(type_url, &any) {
            Ok(name) => Ok((name, any)),
            Err(e) => Err(format!("{} resource #{i} rejected: {e}", short(type_url))),
        })
        .collect()
}
