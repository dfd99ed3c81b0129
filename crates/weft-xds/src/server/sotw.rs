//! Server side of a state-of-the-world stream.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::mpsc;
use tonic::Status;

use super::{record_reply, Registration};
use crate::type_url::is_wildcard_type;

type Tx = mpsc::Sender<Result<DiscoveryResponse, Status>>;

/// Per-type state of one SotW stream.
#[derive(Default)]
struct TypeState {
    /// Requested names; `None` = wildcard.
    names: Option<BTreeSet<String>>,
    /// Version and names of the last response sent.
    sent: Option<(String, Option<BTreeSet<String>>)>,
    /// Nonce of the last response sent.
    nonce: String,
    /// A response is out and its ACK/NACK has not arrived: do not push another.
    awaiting: bool,
}

pub(super) struct Stream {
    registration: Registration,
    types: BTreeMap<String, TypeState>,
    tx: Tx,
    nonce: u64,
}

impl super::StreamHandler for Stream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    fn node(request: &DiscoveryRequest) -> Option<envoy_types::pb::envoy::config::core::v3::Node> {
        request.node.clone()
    }

    fn new(registration: Registration, tx: Tx) -> Self {
        Stream { registration, types: BTreeMap::new(), tx, nonce: 0 }
    }

    fn tx(&self) -> &Tx {
        &self.tx
    }

    async fn on_request(&mut self, request: DiscoveryRequest) -> Result<(), Status> {
        Stream::on_request(self, request).await
    }

    async fn push_all(&mut self) -> Result<(), Status> {
        Stream::push_all(self).await
    }
}

impl Stream {
    async fn on_request(&mut self, request: DiscoveryRequest) -> Result<(), Status> {
        if request.type_url.is_empty() {
            return Err(Status::invalid_argument("xDS request without a type_url"));
        }
        let type_url = request.type_url.clone();
        let state = self.types.entry(type_url.clone()).or_default();
        if !request.response_nonce.is_empty() && !state.nonce.is_empty() {
            if request.response_nonce != state.nonce {
                // Stale: the peer has not seen our latest response yet; it will
                // answer that one, with its current subscription.
                tracing::debug!(type_url, nonce = %request.response_nonce, "stale nonce ignored");
                return Ok(());
            }
            state.awaiting = false;
            let sent_version = state.sent.as_ref().map(|s| s.0.clone()).unwrap_or_default();
            record_reply(
                &self.registration,
                &type_url,
                &request.response_nonce,
                &sent_version,
                &request.version_info,
                request.error_detail.as_ref(),
            );
        } else {
            // A fresh subscription for this type: answer it even if nothing changed.
            state.awaiting = false;
            state.sent = None;
        }
        let wildcard = is_wildcard_type(&type_url)
            && (request.resource_names.is_empty() || request.resource_names.iter().any(|n| n == "*"));
        state.names =
            if wildcard { None } else { Some(request.resource_names.into_iter().filter(|n| n != "*").collect()) };
        self.push(&type_url).await
    }

    async fn push_all(&mut self) -> Result<(), Status> {
        let types: Vec<String> = self.types.keys().cloned().collect();
        for type_url in types {
            self.push(&type_url).await?;
        }
        Ok(())
    }

    /// Sends the current resources of a type if they or the subscription changed since
    /// the last response, unless a response is still waiting for its ACK.
    async fn push(&mut self, type_url: &str) -> Result<(), Status> {
        let Some(state) = self.types.get(type_url) else {
            return Ok(());
        };
        if state.awaiting {
            return Ok(());
        }
        if state.names.as_ref().is_some_and(BTreeSet::is_empty) && state.sent.is_some() {
            return Ok(());
        }
        let (version, resources) = self.registration.shared.source.resources(&self.registration.node, type_url);
        if state.sent.as_ref().is_some_and(|(v, names)| *v == version && *names == state.names) {
            return Ok(());
        }
        let names = state.names.clone();
        let resources = resources
            .into_iter()
            .filter(|(name, _)| names.as_ref().is_none_or(|n| n.contains(name)))
            .map(|(_, any)| any)
            .collect();
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let response = DiscoveryResponse {
            version_info: version.clone(),
            resources,
            type_url: type_url.to_string(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        self.tx.send(Ok(response)).await.map_err(|_| Status::cancelled("peer went away"))?;
        if let Some(state) = self.types.get_mut(type_url) {
            state.sent = Some((version.clone(), names));
            state.nonce.clone_from(&nonce);
            state.awaiting = true;
        }
        self.registration.update(type_url, |t| {
            t.sent_version = Some(version);
            t.sent_nonce = Some(nonce);
        });
        Ok(())
    }
}
