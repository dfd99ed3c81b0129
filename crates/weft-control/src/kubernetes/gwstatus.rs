//! The Gateway API objects' status written back as Istio writes it: what
//! [`crate::gwapi::api_status`] computes (Gateway `Accepted`/`Programmed` with its
//! listeners and addresses, routes' `parents[]` with `Accepted`/`ResolvedRefs` under
//! Istio's controller name), and `Accepted` on the GatewayClasses whose controller is
//! Istio's. The upstream CRDs require `lastTransitionTime` on every condition: it is kept
//! from the object's current condition of the same type and status, else now; every
//! condition carries the object's `observedGeneration`. A route's `parents[]` entries of
//! other controllers are kept.
//!
//! The object's generation and current status are those its watch last saw (no `get`
//! rights needed: `list`/`watch` and `patch` of `<kind>/status`).
//!
//! It runs on every store change and every [`RECHECK`] (a gateway proxy connecting
//! changes `Programmed`), and writes an object only when what it would write differs
//! from its status, which ends the loop its own writes start (a write is a watch event,
//! a store change, a recomputation giving the same).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::Client;
use serde_json::{json, Value};
use weft_api::spec::gateway_api::CONTROLLER;
use weft_api::{Kind, ResourceKey, Spec};
use weft_xds::server::ConnectionStatus;

use super::{Role, Watched, WATCHED};
use crate::store::ResourceStore;

/// How often the status is recomputed without a store change.
pub const RECHECK: Duration = Duration::from_secs(2);

/// Lists the connected proxies.
pub type Connections = Box<dyn Fn() -> Vec<ConnectionStatus> + Send + Sync>;

/// Writes the Gateway API objects' status.
pub struct GatewayStatusWriter {
    client: Client,
    store: std::sync::Arc<ResourceStore>,
    shared: std::sync::Arc<super::Shared>,
    domain: String,
    /// What was last written (or found current), per object, with the object's uid and
    /// generation (a re-created or edited object is written again), without times.
    written: BTreeMap<ResourceKey, (String, i64, Value)>,
}

impl GatewayStatusWriter {
    /// A writer over `store`'s Gateway API objects, comparing with what the watches saw.
    pub(super) fn new(
        client: Client,
        store: std::sync::Arc<ResourceStore>,
        shared: std::sync::Arc<super::Shared>,
        domain: String,
    ) -> GatewayStatusWriter {
        GatewayStatusWriter { client, store, shared, domain, written: BTreeMap::new() }
    }

    /// Writes until aborted.
    /// Only while this replica leads (`--leader-elect`): a follower writes nothing and
    /// forgets what it wrote, so it compares afresh with the objects when it leads.
    pub async fn run(mut self, connections: Connections) {
        let mut changes = self.store.subscribe();
        let mut leads = self.shared.leader.is_leader();
        let mut elections = true;
        loop {
            if *leads.borrow_and_update() {
                self.once(&connections()).await;
            } else {
                self.written.clear();
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(RECHECK) => {}
                // Closed: leadership can no longer change (a single control plane).
                r = leads.changed(), if elections => if r.is_err() { elections = false },
            }
        }
    }

    /// One pass: every object whose computed status changed is written.
    pub async fn once(&mut self, connections: &[ConnectionStatus]) {
        let desired = desired(&self.store.snapshot().resources, connections, &self.domain);
        self.written.retain(|k, _| desired.contains_key(k));
        for (key, status) in desired {
            // As the watch last saw it; absent: only in weft's own store (a file, `weft
            // apply`), or gone: nothing to write.
            let Some(seen) = self.shared.observed().get(&key).cloned() else { continue };
            let done = |(uid, generation, s): &(String, i64, Value)| {
                *uid == seen.uid && *generation == seen.generation && *s == status
            };
            if self.written.get(&key).is_some_and(done) {
                continue;
            }
            if self.write(&key, &status, &seen).await {
                self.written.insert(key, (seen.uid, seen.generation, status));
            }
        }
    }

    /// Brings one object's status in line; whether it now is.
    async fn write(&self, key: &ResourceKey, status: &Value, seen: &super::Observed) -> bool {
        let Some(w) = watched(key.kind) else { return true };
        let api: Api<DynamicObject> = if w.cluster_scoped() {
            Api::all_with(self.client.clone(), &w.api_resource())
        } else {
            Api::namespaced_with(self.client.clone(), &key.namespace, &w.api_resource())
        };
        let full = stamped(status, &seen.status, seen.generation, &now());
        if same(&seen.status, &full) {
            return true;
        }
        match api.patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&json!({ "status": full }))).await {
            Ok(_) => {
                tracing::info!(kind = w.kind, ns = %key.namespace, name = %key.name, "kubernetes: Gateway API status written");
                true
            }
            Err(e) => {
                tracing::warn!(kind = w.kind, ns = %key.namespace, name = %key.name, error = %e, "kubernetes: Gateway API status not written");
                false
            }
        }
    }
}

fn watched(kind: Kind) -> Option<&'static Watched> {
    WATCHED.iter().find(|w| w.role == Role::Resource(kind) && w.status_write() == super::StatusWrite::GatewayApi)
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The status of every Gateway API object weft serves: [`crate::gwapi::api_status`], and
/// the GatewayClasses of Istio's controller.
pub fn desired(
    resources: &[weft_api::Resource],
    connections: &[ConnectionStatus],
    domain: &str,
) -> BTreeMap<ResourceKey, Value> {
    let mut out = crate::gwapi::api_status(resources, connections, domain);
    for r in resources {
        if let Spec::GatewayClass(c) = &r.spec {
            if c.controller_name == CONTROLLER {
                out.insert(
                    r.key(),
                    json!({ "conditions": [{
                        "type": "Accepted", "status": "True", "reason": "Accepted", "message": "Handled by Istio controller",
                    }]}),
                );
            }
        }
    }
    out
}

/// `status` with `observedGeneration` and `lastTransitionTime` on every condition (the
/// time kept from `current`'s condition of the same type and status), and `current`'s
/// route parents of other controllers kept.
pub fn stamped(status: &Value, current: &Value, generation: i64, now: &str) -> Value {
    let mut out = status.clone();
    stamp_conditions(&mut out, current, generation, now);
    if let Some(listeners) = out.get_mut("listeners").and_then(Value::as_array_mut) {
        for l in listeners {
            let before = find(current.get("listeners"), |c| c.get("name") == l.get("name"));
            stamp_conditions(l, &before, generation, now);
        }
    }
    if let Some(parents) = out.get_mut("parents").and_then(Value::as_array_mut) {
        for p in parents.iter_mut() {
            let before = find(current.get("parents"), |c| {
                c.get("parentRef") == p.get("parentRef") && c.get("controllerName") == p.get("controllerName")
            });
            stamp_conditions(p, &before, generation, now);
        }
        let others = current.get("parents").and_then(Value::as_array).into_iter().flatten();
        parents.extend(others.filter(|c| c.get("controllerName").and_then(Value::as_str) != Some(CONTROLLER)).cloned());
    }
    out
}

fn find(list: Option<&Value>, pred: impl Fn(&Value) -> bool) -> Value {
    list.and_then(Value::as_array).and_then(|l| l.iter().find(|c| pred(c))).cloned().unwrap_or(Value::Null)
}

fn stamp_conditions(holder: &mut Value, before: &Value, generation: i64, now: &str) {
    let Some(conds) = holder.get_mut("conditions").and_then(Value::as_array_mut) else { return };
    for c in conds {
        let prev = find(before.get("conditions"), |p| p.get("type") == c.get("type"));
        let time = match prev.get("lastTransitionTime") {
            Some(t) if prev.get("status") == c.get("status") => t.clone(),
            _ => json!(now),
        };
        c["lastTransitionTime"] = time;
        c["observedGeneration"] = json!(generation);
    }
}

/// Whether `current` already holds every field of `desired`.
fn same(current: &Value, desired: &Value) -> bool {
    match desired.as_object() {
        Some(d) => d.iter().all(|(k, v)| current.get(k) == Some(v)),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_get_generation_and_keep_their_transition_time_while_their_status_holds() {
        let status = json!({ "parents": [{
            "parentRef": { "name": "gw" }, "controllerName": CONTROLLER,
            "conditions": [{ "type": "Accepted", "status": "True", "reason": "Accepted", "message": "ok" }],
        }]});
        let first = stamped(&status, &Value::Null, 3, "2026-01-01T00:00:00Z");
        assert_eq!(first["parents"][0]["conditions"][0]["lastTransitionTime"], "2026-01-01T00:00:00Z");
        assert_eq!(first["parents"][0]["conditions"][0]["observedGeneration"], 3);
        let again = stamped(&status, &first, 3, "2026-01-01T00:05:00Z");
        assert!(same(&first, &again), "nothing to write when nothing changed: {again}");

        let mut flipped = status.clone();
        flipped["parents"][0]["conditions"][0]["status"] = json!("False");
        let later = stamped(&flipped, &first, 4, "2026-01-01T00:05:00Z");
        assert_eq!(later["parents"][0]["conditions"][0]["lastTransitionTime"], "2026-01-01T00:05:00Z");
    }

    #[test]
    fn parents_of_other_controllers_are_kept() {
        let status =
            json!({ "parents": [{ "parentRef": { "name": "gw" }, "controllerName": CONTROLLER, "conditions": [] }]});
        let current = json!({ "parents": [
            { "parentRef": { "name": "gw" }, "controllerName": CONTROLLER, "conditions": [] },
            { "parentRef": { "name": "other" }, "controllerName": "example.com/gateway", "conditions": [] },
        ]});
        let out = stamped(&status, &current, 1, "2026-01-01T00:00:00Z");
        let names: Vec<&Value> =
            out["parents"].as_array().map(|p| p.iter().map(|p| &p["parentRef"]["name"]).collect()).unwrap_or_default();
        assert_eq!(names, [&json!("gw"), &json!("other")]);
    }
}
