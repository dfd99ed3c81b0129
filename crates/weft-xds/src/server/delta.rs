//! Server side of a delta (incremental) stream.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use tokio::sync::mpsc;
use tonic::Status;

use super::{record_reply, Registration};
use crate::content_version;
use crate::type_url::is_wildcard_type;

/// Un-ACKed responses remembered per type.
const MAX_INFLIGHT: usize = 64;

type Tx = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;

/// Per-type state of one delta stream.
#[derive(Default)]
struct TypeState {
    /// Subscribed to everything of this type.
    wildcard: bool,
    /// Explicitly subscribed names.
    names: BTreeSet<String>,
    /// What the peer holds: name -> version.
    known: BTreeMap<String, String>,
    /// Subscribed names already reported as absent (in `removed_resources`).
    reported_missing: BTreeSet<String>,
    /// Responses not yet ACKed: nonce -> system version.
    inflight: BTreeMap<u64, String>,
    /// At least one response was sent for this type.
    responded: bool,
}

pub(super) struct Stream {
    registration: Registration,
    types: BTreeMap<String, TypeState>,
    tx: Tx,
    nonce: u64,
}

impl super::StreamHandler for Stream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    fn node(request: &DeltaDiscoveryRequest) -> Option<envoy_types::pb::envoy::config::core::v3::Node> {
        request.node.clone()
    }

    fn new(registration: Registration, tx: Tx) -> Self {
        Stream { registration, types: BTreeMap::new(), tx, nonce: 0 }
    }

    fn tx(&self) -> &Tx {
        &self.tx
    }

    async fn on_request(&mut self, request: DeltaDiscoveryRequest) -> Result<(), Status> {
        Stream::on_request(self, request).await
    }

    async fn push_all(&mut self) -> Result<(), Status> {
        Stream::push_all(self).await
    }
}

impl Stream {
    async fn on_request(&mut self, request: DeltaDiscoveryRequest) -> Result<(), Status> {
        if request.type_url.is_empty() {
            return Err(Status::invalid_argument("xDS request without a type_url"));
        }
        let type_url = request.type_url.clone();
        let first = !self.types.contains_key(&type_url);
        let state = self.types.entry(type_url.clone()).or_default();
        if first {
            state.known = request.initial_resource_versions.into_iter().collect();
            state.wildcard = is_wildcard_type(&type_url) && request.resource_names_subscribe.is_empty();
        }
        if let Ok(nonce) = request.response_nonce.parse::<u64>() {
            if let Some(version) = state.inflight.get(&nonce).cloned() {
                // Replies come in order: older responses are settled too.
                state.inflight.retain(|n, _| *n > nonce);
                record_reply(
                    &self.registration,
                    &type_url,
                    &request.response_nonce,
                    &version,
                    &version,
                    request.error_detail.as_ref(),
                );
            }
        }
        for name in request.resource_names_subscribe {
            if name == "*" {
                state.wildcard = true;
            } else {
                state.names.insert(name);
            }
        }
        for name in request.resource_names_unsubscribe {
            if name == "*" {
                state.wildcard = false;
            } else {
                state.names.remove(&name);
                state.known.remove(&name);
                state.reported_missing.remove(&name);
            }
        }
        self.push(&type_url).await
    }

    async fn push_all(&mut self) -> Result<(), Status> {
        let types: Vec<String> = self.types.keys().cloned().collect();
        for type_url in types {
            self.push(&type_url).await?;
        }
        Ok(())
    }

    /// Sends what changed for a type since the peer's known versions: changed or new
    /// resources, and removals (including subscribed names that do not exist).
    async fn push(&mut self, type_url: &str) -> Result<(), Status> {
        let Some(state) = self.types.get_mut(type_url) else {
            return Ok(());
        };
        let (version, resources) = self.registration.shared.source.resources(&self.registration.node, type_url);
        let wanted = |name: &str| state.wildcard || state.names.contains(name);
        let mut updates = Vec::new();
        for (name, any) in &resources {
            if !wanted(name) {
                continue;
            }
            let resource_version = content_version(any);
            if state.known.get(name) != Some(&resource_version) {
                updates.push(Resource {
                    name: name.clone(),
                    version: resource_version,
                    resource: Some(any.clone()),
                    ..Default::default()
                });
            }
        }
        let mut removed: Vec<String> =
            state.known.keys().filter(|name| !resources.contains_key(*name) && wanted(name)).cloned().collect();
        for name in &state.names {
            if !resources.contains_key(name)
                && !state.known.contains_key(name)
                && !state.reported_missing.contains(name)
            {
                removed.push(name.clone());
            }
        }
        let first_wildcard = state.wildcard && !state.responded;
        if updates.is_empty() && removed.is_empty() && !first_wildcard {
            return Ok(());
        }
        for resource in &updates {
            state.known.insert(resource.name.clone(), resource.version.clone());
            state.reported_missing.remove(&resource.name);
        }
        for name in &removed {
            if state.known.remove(name).is_none() {
                state.reported_missing.insert(name.clone());
            }
        }
        self.nonce += 1;
        state.inflight.insert(self.nonce, version.clone());
        while state.inflight.len() > MAX_INFLIGHT {
            // A peer that never replies must not grow the server's memory.
            state.inflight.pop_first();
        }
        state.responded = true;
        let nonce = self.nonce.to_string();
        let response = DeltaDiscoveryResponse {
            system_version_info: version.clone(),
            resources: updates,
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce: nonce.clone(),
            ..Default::default()
        };
        self.tx.send(Ok(response)).await.map_err(|_| Status::cancelled("peer went away"))?;
        self.registration.update(type_url, |t| {
            t.sent_version = Some(version);
            t.sent_nonce = Some(nonce);
        });
        Ok(())
    }
}
