//! Server side of a state-of-the-world stream: what differs from delta.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use super::stream::{Received, Reply, Variant};
use crate::source::Current;
use crate::type_url::{is_wildcard_type, resolves_aliases};
use crate::XdsMode;

/// State of the world: every response carries all resources of the subscription.
pub(super) struct Sotw;

/// Per-type state of one SotW stream.
#[derive(Default)]
pub(super) struct TypeState {
    /// Requested names; `None` = wildcard.
    names: Option<BTreeSet<String>>,
    /// Version and names of the last response sent.
    sent: Option<(String, Option<BTreeSet<String>>)>,
    /// Nonce of the last response sent.
    nonce: String,
    /// A response is out and its ACK/NACK has not arrived: do not push another.
    awaiting: bool,
}

impl Variant for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    type State = TypeState;
    const MODE: XdsMode = XdsMode::Sotw;

    fn node(request: &DiscoveryRequest) -> Option<Node> {
        request.node.clone()
    }

    fn type_url(request: &DiscoveryRequest) -> &str {
        &request.type_url
    }

    fn receive(state: &mut TypeState, type_url: &str, request: DiscoveryRequest, new: bool) -> Received {
        let mut reply = None;
        let resumed_version = request.version_info.clone();
        if !request.response_nonce.is_empty() && !state.nonce.is_empty() {
            if request.response_nonce != state.nonce {
                // Stale: the peer has not seen our latest response yet; it will
                // answer that one, with its current subscription.
                tracing::debug!(type_url, nonce = %request.response_nonce, "stale nonce ignored");
                return Received { reply: None, push: false };
            }
            state.awaiting = false;
            reply = Some(Reply {
                nonce: request.response_nonce,
                sent_version: state.sent.as_ref().map(|s| s.0.clone()).unwrap_or_default(),
                acked_version: request.version_info,
                error: request.error_detail,
            });
        }
        let fresh = reply.is_none();
        let wildcard = is_wildcard_type(type_url)
            && (request.resource_names.is_empty() || request.resource_names.iter().any(|n| n == "*"));
        state.names =
            if wildcard { None } else { Some(request.resource_names.into_iter().filter(|n| n != "*").collect()) };
        if fresh {
            state.awaiting = false;
            // A fresh subscription. The first one of a type on a stream that names the
            // version the peer holds (it reconnected, perhaps to another replica that
            // translates the same bytes) counts as answered with it: only a different
            // version is pushed. Otherwise (a new peer, or names changed before any
            // answer on this stream) it is answered even if nothing changed.
            let resumed = new && !resumed_version.is_empty();
            state.sent = resumed.then(|| (resumed_version.clone(), state.names.clone()));
            if resumed {
                reply = Some(Reply {
                    nonce: String::new(),
                    sent_version: resumed_version.clone(),
                    acked_version: resumed_version,
                    error: None,
                });
            }
        }
        Received { reply, push: true }
    }

    /// The current resources of a type if they or the subscription changed since the
    /// last response, unless a response is still waiting for its ACK.
    fn respond(
        state: &mut TypeState,
        source: &Current<'_>,
        type_url: &str,
        nonce: u64,
    ) -> Option<(DiscoveryResponse, String)> {
        if state.awaiting {
            return None;
        }
        if state.names.as_ref().is_some_and(BTreeSet::is_empty) && state.sent.is_some() {
            return None;
        }
        // The version first: a stream already holding it costs no copy of the resources.
        let current = source.version(type_url);
        if state.sent.as_ref().is_some_and(|(v, names)| *v == current && *names == state.names) {
            return None;
        }
        let names = state.names.clone();
        let (version, resources) = match &names {
            // Named (EDS, RDS): only those resources are copied.
            Some(wanted) if !resolves_aliases(type_url) => {
                let (version, resolved) = source.lookup(type_url, wanted);
                (version, resolved.into_values().flatten().map(|(_, any)| any).collect())
            }
            _ => {
                let (version, all) = source.resources(type_url);
                let resources = all
                    .into_iter()
                    .filter(|(name, _)| names.as_ref().is_none_or(|n| n.contains(name)))
                    .map(|(_, any)| any)
                    .collect();
                (version, resources)
            }
        };
        let nonce = nonce.to_string();
        state.sent = Some((version.clone(), names));
        state.nonce.clone_from(&nonce);
        state.awaiting = true;
        let response = DiscoveryResponse {
            version_info: version.clone(),
            resources,
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        };
        Some((response, version))
    }
}
