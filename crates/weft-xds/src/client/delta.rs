//! Incremental ADS stream (`DeltaAggregatedResources`).

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use envoy_types::pb::google::protobuf::Any;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

use super::{nack_status, AdsClient, Memory, ResourceUpdate, HEALTHY_AFTER};
use crate::type_url::{resolves_aliases, resource_name, short};

/// The explicit wildcard subscription name.
const WILDCARD: &str = "*";

struct Stream<'a> {
    client: &'a AdsClient,
    tx: mpsc::UnboundedSender<DeltaDiscoveryRequest>,
    order: Vec<&'static str>,
    /// Current subscription per type (`None` = wildcard); absent = nothing sent yet.
    subscribed: BTreeMap<&'static str, Option<BTreeSet<String>>>,
    node_sent: bool,
}

/// Runs one delta stream until it fails. `healthy` becomes true once a response arrived.
pub(super) async fn run_stream(
    client: &AdsClient,
    mut grpc: AggregatedDiscoveryServiceClient<Channel>,
    memory: &mut Memory,
    healthy: &mut bool,
) -> Result<(), String> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut stream =
        Stream { client, tx, order: client.handler.type_urls(), subscribed: BTreeMap::new(), node_sent: false };
    stream.sync_interest(memory)?;
    let mut responses = grpc
        .delta_aggregated_resources(client.stream_request(UnboundedReceiverStream::new(rx))?)
        .await
        .map_err(|e| format!("open delta stream: {e}"))?
        .into_inner();
    client.mark_connected();
    // A stream that stays up counts as healthy even without a response: a resumed one
    // (the control plane already has our versions) may stay silent for long.
    let opened = std::time::Instant::now();
    let result = stream_body(&mut responses, &mut stream, memory, healthy).await;
    *healthy |= opened.elapsed() >= HEALTHY_AFTER;
    result
}

/// Applies responses and follows the handler's interest until the stream ends.
async fn stream_body(
    responses: &mut tonic::Streaming<DeltaDiscoveryResponse>,
    stream: &mut Stream<'_>,
    memory: &mut Memory,
    healthy: &mut bool,
) -> Result<(), String> {
    let mut wake = stream.client.handler.interest_changes();
    loop {
        tokio::select! {
            message = responses.message() => {
                let Some(response) = message.map_err(|e| format!("delta stream: {e}"))? else { return Ok(()) };
                *healthy = true;
                stream.handle(response, memory)?;
            }
            changed = interest_changed(&mut wake) => {
                if changed.is_err() {
                    wake = None;
                }
                stream.sync_interest(memory)?;
            }
        }
    }
}

/// Resolves when the handler says its interest changed (never without a receiver).
async fn interest_changed(wake: &mut Option<tokio::sync::watch::Receiver<u64>>) -> Result<(), ()> {
    match wake {
        Some(rx) => rx.changed().await.map_err(|_| ()),
        None => std::future::pending().await,
    }
}

impl Stream<'_> {
    fn handle(&mut self, mut response: DeltaDiscoveryResponse, memory: &mut Memory) -> Result<(), String> {
        let Some(type_url) = self.order.iter().copied().find(|t| *t == response.type_url) else {
            let error = format!("unknown type_url {}: not subscribed", response.type_url);
            self.client.record_nack(&response.type_url, &error);
            return self.send(DeltaDiscoveryRequest {
                type_url: response.type_url,
                response_nonce: response.nonce,
                error_detail: Some(nack_status(&error)),
                ..Default::default()
            });
        };
        let version = if response.system_version_info.is_empty() {
            response.nonce.clone()
        } else {
            response.system_version_info.clone()
        };
        let outcome = decode(type_url, &mut response).and_then(|(upserts, versions, resolved)| {
            let update = ResourceUpdate {
                version: version.clone(),
                upserts,
                removals: response.removed_resources.clone(),
                full_state: false,
                resolved,
            };
            self.client.handler.apply(type_url, update).map(|()| versions)
        });
        let mut request = DeltaDiscoveryRequest {
            type_url: type_url.to_string(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        };
        match outcome {
            Ok(versions) => {
                let known = memory.delta_versions.entry(type_url.to_string()).or_default();
                for name in &response.removed_resources {
                    known.remove(name);
                }
                known.extend(versions);
                self.client.record_ack(type_url, &version);
            }
            Err(error) => {
                self.client.record_nack(type_url, &error);
                request.error_detail = Some(nack_status(&error));
            }
        }
        self.send(request)?;
        self.sync_interest(memory)
    }

    /// Sends subscribe/unsubscribe requests for every type whose interest changed
    /// (the initial request per type at stream start, with known versions).
    fn sync_interest(&mut self, memory: &mut Memory) -> Result<(), String> {
        for type_url in self.order.clone() {
            let interest = self.client.handler.interest(type_url);
            let mut request = DeltaDiscoveryRequest { type_url: type_url.to_string(), ..Default::default() };
            match (self.subscribed.get(type_url), &interest) {
                (Some(previous), _) if *previous == interest => continue,
                (None, Some(names)) if names.is_empty() => continue,
                (None, _) => {
                    // First request of this type on this stream.
                    request.resource_names_subscribe = match &interest {
                        None => vec![WILDCARD.to_string()],
                        Some(names) => names.iter().cloned().collect(),
                    };
                    if let Some(known) = memory.delta_versions.get(type_url) {
                        request.initial_resource_versions = known
                            .iter()
                            .filter(|(name, _)| interest.as_ref().is_none_or(|names| names.contains(*name)))
                            .map(|(n, v)| (n.clone(), v.clone()))
                            .collect();
                    }
                }
                (Some(previous), _) => {
                    let old = previous.clone().unwrap_or_default();
                    let new = interest.clone().unwrap_or_default();
                    request.resource_names_subscribe = new.difference(&old).cloned().collect();
                    request.resource_names_unsubscribe = old.difference(&new).cloned().collect();
                    match (previous.is_none(), interest.is_none()) {
                        (true, false) => request.resource_names_unsubscribe.push(WILDCARD.to_string()),
                        (false, true) => request.resource_names_subscribe.push(WILDCARD.to_string()),
                        _ => {}
                    }
                    let mut forgotten = Vec::new();
                    if let Some(known) = memory.delta_versions.get_mut(type_url) {
                        for name in &request.resource_names_unsubscribe {
                            if known.remove(name).is_some() {
                                forgotten.push(name.clone());
                            }
                        }
                    }
                    if !forgotten.is_empty() {
                        // The server sends nothing more about unsubscribed names: drop them here.
                        let update = ResourceUpdate {
                            version: self.client.acked_version(type_url),
                            removals: forgotten,
                            ..ResourceUpdate::default()
                        };
                        if let Err(e) = self.client.handler.apply(type_url, update) {
                            tracing::warn!(type_url, error = %e, "dropping unsubscribed resources failed");
                        }
                    }
                }
            }
            self.subscribed.insert(type_url, interest);
            self.send(request)?;
        }
        Ok(())
    }

    fn send(&mut self, mut request: DeltaDiscoveryRequest) -> Result<(), String> {
        if !self.node_sent {
            request.node = Some(self.client.config.node.to_node());
            self.node_sent = true;
        }
        self.tx.send(request).map_err(|_| "delta request stream closed".to_string())
    }
}

type Decoded = (Vec<(String, Any)>, Vec<(String, String)>, Vec<(String, Option<String>)>);

/// Upserts, their per-resource versions, and (for alias types) what each alias
/// resolved to; the error names type and resource. Each resource body moves out of the
/// response into the upserts (no copy of its bytes).
fn decode(type_url: &str, response: &mut DeltaDiscoveryResponse) -> Result<Decoded, String> {
    let mut upserts = Vec::with_capacity(response.resources.len());
    let mut versions = Vec::with_capacity(response.resources.len());
    let mut resolved = Vec::new();
    let aliases = resolves_aliases(type_url);
    for (i, resource) in response.resources.iter_mut().enumerate() {
        let label = if resource.name.is_empty() { format!("#{i}") } else { resource.name.clone() };
        let Some(any) = resource.resource.take() else {
            if aliases && !resource.name.is_empty() {
                // Envoy's VHDS: a body-less resource answers aliases the server cannot resolve.
                resolved.push((resource.name.clone(), None));
                resolved.extend(resource.aliases.iter().filter(|a| **a != resource.name).map(|a| (a.clone(), None)));
                continue;
            }
            return Err(format!("{} resource {label} rejected: no resource body", short(type_url)));
        };
        let name =
            resource_name(type_url, &any).map_err(|e| format!("{} resource {label} rejected: {e}", short(type_url)))?;
        if !resource.name.is_empty() && resource.name != name {
            return Err(format!("{} resource {label} rejected: body is named {name}", short(type_url)));
        }
        if aliases {
            resolved.push((name.clone(), Some(name.clone())));
            resolved.extend(resource.aliases.iter().filter(|a| **a != name).map(|a| (a.clone(), Some(name.clone()))));
        }
        versions.push((name.clone(), resource.version.clone()));
        upserts.push((name, any));
    }
    if aliases {
        // A removed name that was requested under that very name is answered too.
        resolved.extend(response.removed_resources.iter().map(|n| (n.clone(), None)));
    }
    Ok((upserts, versions, resolved))
}
