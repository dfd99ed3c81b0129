//! Server side of a state-of-the-world stream.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::{record_reply, Registration, Shared};
use crate::type_url::is_wildcard_type;
use crate::XdsMode;

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

struct Stream {
    registration: Registration,
    types: BTreeMap<String, TypeState>,
    tx: Tx,
    nonce: u64,
}

/// Runs one SotW stream until the peer leaves, the server stops or a request is invalid.
pub(super) async fn run(
    shared: Arc<Shared>,
    peer: Option<SocketAddr>,
    mut requests: Streaming<DiscoveryRequest>,
    tx: Tx,
) {
    let mut changes = shared.source.changes();
    let mut stop = shared.stop.subscribe();
    let first = tokio::select! {
        first = requests.message() => first,
        () = super::stopped(&mut stop) => return,
    };
    let first = match first {
        Ok(Some(first)) => first,
        Ok(None) | Err(_) => return,
    };
    let registration = match Registration::new(shared, first.node.clone(), peer, XdsMode::Sotw) {
        Ok(r) => r,
        Err(status) => {
            let _ = tx.send(Err(status)).await;
            return;
        }
    };
    let mut stream = Stream { registration, types: BTreeMap::new(), tx, nonce: 0 };
    if stream.on_request(first).await.is_err() {
        return;
    }
    let mut source_open = true;
    loop {
        let result = tokio::select! {
            request = requests.message() => match request {
                Ok(Some(request)) => stream.on_request(request).await,
                Ok(None) | Err(_) => return,
            },
            changed = changes.changed(), if source_open => {
                source_open = changed.is_ok();
                stream.push_all().await
            }
            () = super::stopped(&mut stop) => return,
        };
        if let Err(status) = result {
            let _ = stream.tx.send(Err(status)).await;
            return;
        }
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
