//! Server side of a delta (incremental) stream: what differs from state of the world.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use envoy_types::pb::google::protobuf::Any;

use super::stream::{Received, Reply, Variant};
use crate::source::Current;
use crate::type_url::{is_wildcard_type, resolves_aliases};
use crate::{content_version, XdsMode};

/// Un-ACKed responses remembered per type.
const MAX_INFLIGHT: usize = 64;

/// Delta: responses carry only what changed since what the peer holds.
pub(super) struct Delta;

/// Per-type state of one delta stream.
#[derive(Default)]
pub(super) struct TypeState {
    /// Subscribed to everything of this type.
    wildcard: bool,
    /// Explicitly subscribed names (for alias types, the aliases as requested).
    names: BTreeSet<String>,
    /// What the peer holds: resource name -> version.
    known: BTreeMap<String, String>,
    /// What each subscribed name was last answered with: the resource it resolved to,
    /// or `None` once reported absent.
    answered: BTreeMap<String, Option<String>>,
    /// Responses not yet ACKed: nonce -> system version.
    inflight: BTreeMap<u64, String>,
    /// At least one response was sent for this type.
    responded: bool,
}

impl Variant for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    type State = TypeState;
    const MODE: XdsMode = XdsMode::Delta;

    fn node(request: &DeltaDiscoveryRequest) -> Option<Node> {
        request.node.clone()
    }

    fn type_url(request: &DeltaDiscoveryRequest) -> &str {
        &request.type_url
    }

    fn receive(state: &mut TypeState, type_url: &str, request: DeltaDiscoveryRequest, new: bool) -> Received {
        if new {
            state.known = request.initial_resource_versions.into_iter().collect();
            state.wildcard = is_wildcard_type(type_url) && request.resource_names_subscribe.is_empty();
        }
        let mut reply = None;
        if let Ok(nonce) = request.response_nonce.parse::<u64>() {
            if let Some(version) = state.inflight.get(&nonce).cloned() {
                // Replies come in order: older responses are settled too.
                state.inflight.retain(|n, _| *n > nonce);
                reply = Some(Reply {
                    nonce: request.response_nonce,
                    sent_version: version.clone(),
                    acked_version: version,
                    error: request.error_detail,
                });
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
                state.answered.remove(&name);
            }
        }
        // Subscription changes are honoured whatever their nonce.
        Received { reply, push: true }
    }

    /// What changed for a type since the peer's known versions: changed or new
    /// resources, removals, and subscribed names that do not exist (in
    /// `removed_resources`; for alias types, as Envoy's VHDS expects, a body-less resource
    /// named by and aliased to the requested name). Named subscriptions are looked up by
    /// name, so a peer subscribed to a few names never costs a copy of the whole type.
    fn respond(
        state: &mut TypeState,
        source: &Current<'_>,
        type_url: &str,
        nonce: u64,
    ) -> Option<(DeltaDiscoveryResponse, String)> {
        let (mut version, everything) = if state.wildcard {
            let (v, all) = source.resources(type_url);
            (v, Some(all))
        } else {
            (String::new(), None)
        };
        let resolved = if state.wildcard && state.names.is_empty() {
            BTreeMap::new()
        } else {
            let (v, resolved) = source.lookup(type_url, &state.names);
            version = v;
            resolved
        };
        // Resources the peer should hold now, with their versions.
        let mut present: BTreeMap<String, String> = BTreeMap::new();
        let mut updates: BTreeMap<String, Resource> = BTreeMap::new();
        for (name, any) in everything.iter().flatten() {
            let resource_version = content_version(any);
            if state.known.get(name) != Some(&resource_version) {
                updates.insert(name.clone(), resource(name, &resource_version, any));
            }
            present.insert(name.clone(), resource_version);
        }
        let mut missing = Vec::new();
        let mut answers = Vec::new();
        for (requested, found) in resolved {
            match found {
                Some((name, any)) => {
                    let resource_version = present.get(&name).cloned().unwrap_or_else(|| content_version(&any));
                    // An alias is answered (with the resource) even when the peer holds it.
                    let newly = requested != name && state.answered.get(&requested) != Some(&Some(name.clone()));
                    if newly || state.known.get(&name) != Some(&resource_version) {
                        let r = updates.entry(name.clone()).or_insert_with(|| resource(&name, &resource_version, &any));
                        if newly && !r.aliases.contains(&requested) {
                            r.aliases.push(requested.clone());
                        }
                    }
                    present.insert(name.clone(), resource_version);
                    answers.push((requested, Some(name)));
                }
                None => {
                    if state.answered.get(&requested) != Some(&None) {
                        missing.push(requested.clone());
                    }
                    answers.push((requested, None));
                }
            }
        }
        let mut removed: Vec<String> = state.known.keys().filter(|n| !present.contains_key(*n)).cloned().collect();
        for name in missing {
            if resolves_aliases(type_url) {
                if !removed.contains(&name) {
                    updates.insert(
                        name.clone(),
                        Resource { name: name.clone(), aliases: vec![name], ..Default::default() },
                    );
                }
            } else if !removed.contains(&name) {
                removed.push(name);
            }
        }
        let first_wildcard = state.wildcard && !state.responded;
        if updates.is_empty() && removed.is_empty() && !first_wildcard {
            return None;
        }
        for r in updates.values().filter(|r| r.resource.is_some()) {
            state.known.insert(r.name.clone(), r.version.clone());
        }
        for name in &removed {
            state.known.remove(name);
        }
        state.answered.extend(answers);
        let updates: Vec<Resource> = updates.into_values().collect();
        state.inflight.insert(nonce, version.clone());
        while state.inflight.len() > MAX_INFLIGHT {
            // A peer that never replies must not grow the server's memory.
            state.inflight.pop_first();
        }
        state.responded = true;
        let response = DeltaDiscoveryResponse {
            system_version_info: version.clone(),
            resources: updates,
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce: nonce.to_string(),
            ..Default::default()
        };
        Some((response, version))
    }
}

/// A delta resource with its body.
fn resource(name: &str, version: &str, any: &Any) -> Resource {
    Resource { name: name.to_string(), version: version.to_string(), resource: Some(any.clone()), ..Default::default() }
}
