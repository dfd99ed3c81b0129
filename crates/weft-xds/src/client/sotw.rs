//! State-of-the-world ADS stream (`StreamAggregatedResources`).

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

use super::{nack_status, AdsClient, Memory, ResourceUpdate};
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
    types: BTreeMap<&'static str, TypeState>,
    order: Vec<&'static str>,
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
    let order = client.handler.type_urls();
    let mut stream = Stream {
        client,
        tx,
        types: order.iter().map(|t| (*t, TypeState::default())).collect(),
        order,
        node_sent: false,
    };
    // Initial requests, in ADS order, carrying the last accepted versions.
    stream.sync_interest(None)?;
    let mut responses = grpc
        .stream_aggregated_resources(client.stream_request(UnboundedReceiverStream::new(rx))?)
        .await
        .map_err(|e| format!("open SotW stream: {e}"))?
        .into_inner();
    client.mark_connected();
    while let Some(response) = responses.message().await.map_err(|e| format!("SotW stream: {e}"))? {
        *healthy = true;
        stream.handle(response, memory)?;
    }
    Ok(())
}

impl Stream<'_> {
    fn handle(&mut self, response: DiscoveryResponse, memory: &mut Memory) -> Result<(), String> {
        let type_url = response.type_url.clone();
        let Some(type_url) = self.order.iter().copied().find(|t| *t == type_url) else {
            let error = format!("unknown type_url {type_url}: not subscribed");
            self.client.record_nack(&type_url, &error);
            return self.send(DiscoveryRequest {
                type_url,
                response_nonce: response.nonce,
                error_detail: Some(nack_status(&error)),
                ..Default::default()
            });
        };
        if let Some(state) = self.types.get_mut(type_url) {
            state.nonce.clone_from(&response.nonce);
        }
        let wildcard = matches!(self.types.get(type_url).and_then(|s| s.requested.as_ref()), Some(None));
        let outcome = decode(type_url, &response).and_then(|upserts| {
            let names: BTreeSet<String> = upserts.iter().map(|(n, _)| n.clone()).collect();
            let removals = if wildcard {
                memory.sotw_names.get(type_url).map(|old| old.difference(&names).cloned().collect()).unwrap_or_default()
            } else {
                Vec::new()
            };
            let update = ResourceUpdate {
                version: response.version_info.clone(),
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
            response_nonce: response.nonce.clone(),
            resource_names: names_of(&interest),
            ..Default::default()
        };
        match outcome {
            Ok(names) => {
                if wildcard {
                    memory.sotw_names.insert(type_url.to_string(), names);
                }
                self.client.record_ack(type_url, &response.version_info);
                request.version_info = response.version_info;
            }
            Err(error) => {
                self.client.record_nack(type_url, &error);
                request.version_info = self.client.acked_version(type_url);
                request.error_detail = Some(nack_status(&error));
            }
        }
        if let Some(state) = self.types.get_mut(type_url) {
            state.requested = Some(interest);
        }
        self.send(request)?;
        self.sync_interest(Some(type_url))
    }

    /// Sends a request for every type whose interest differs from what was last
    /// requested (all types at stream start), except `skip` which was just answered.
    fn sync_interest(&mut self, skip: Option<&str>) -> Result<(), String> {
        for type_url in self.order.clone() {
            if Some(type_url) == skip {
                continue;
            }
            let interest = self.client.handler.interest(type_url);
            let Some(state) = self.types.get(type_url) else {
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
            if let Some(state) = self.types.get_mut(type_url) {
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

/// Names and checks every resource of a response; the error names type and resource.
fn decode(
    type_url: &str,
    response: &DiscoveryResponse,
) -> Result<Vec<(String, envoy_types::pb::google::protobuf::Any)>, String> {
    response
        .resources
        .iter()
        .enumerate()
        .map(|(i, any)| {
            resource_name(type_url, any)
                .map(|name| (name, any.clone()))
                .map_err(|e| format!("{} resource #{i} rejected: {e}", short(type_url)))
        })
        .collect()
}
