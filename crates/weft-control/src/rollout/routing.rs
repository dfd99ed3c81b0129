//! The routing a rollout writes: the VirtualService a person would have written for the
//! step (weights between the stable and canary subsets, a header match, or a mirror),
//! labelled and annotated as the rollout's own, and the check for a VirtualService of
//! the same host it does not own.

use serde_json::{json, Value};
use weft_api::host;
use weft_api::spec::rollout::{StepTraffic, MANAGED_BY_ANNOTATION, ROLLOUT_LABEL};
use weft_api::{Kind, Resource, Rollout, Spec};

use super::state::{Phase, RolloutState};

/// Which way traffic goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Routing {
    /// Everything to stable.
    Stable,
    /// Everything to the canary.
    Canary,
    /// The step's traffic.
    Step(StepTraffic),
}

/// The routing for a state.
pub fn routing_of(spec: &Rollout, st: &RolloutState) -> Routing {
    match st.phase {
        Phase::Succeeded => Routing::Canary,
        Phase::RolledBack | Phase::Aborted | Phase::Waiting => Routing::Stable,
        Phase::Progressing | Phase::Paused => {
            spec.steps.get(st.step).map(|s| Routing::Step(s.traffic())).unwrap_or(Routing::Canary)
        }
    }
}

/// Whether `r` is the VirtualService the rollout `namespace/name` writes.
pub fn owned_by(r: &Resource, namespace: &str, name: &str) -> bool {
    r.meta.namespace == namespace
        && r.meta.labels.get(ROLLOUT_LABEL).is_some_and(|n| n == name)
        && r.meta.annotations.get(MANAGED_BY_ANNOTATION).is_some_and(|m| m == "rollout")
}

/// A VirtualService of the rollout's host (or of its name) that the rollout does not
/// own, as `namespace/name`.
pub fn conflicting<'a>(
    resources: &'a [Resource],
    rollout: &Resource,
    spec: &Rollout,
    domain: &str,
) -> Option<&'a Resource> {
    let fqdn = host::fqdn(&spec.host, &rollout.meta.namespace, domain);
    resources.iter().find(|r| {
        let Spec::VirtualService(vs) = &r.spec else { return false };
        if owned_by(r, &rollout.meta.namespace, &rollout.meta.name) {
            return false;
        }
        let same_key = r.meta.namespace == rollout.meta.namespace && r.meta.name == rollout.meta.name;
        same_key || vs.hosts.iter().any(|h| host::fqdn(h, &r.meta.namespace, domain).eq_ignore_ascii_case(&fqdn))
    })
}

/// The VirtualService for `routing` (JSON text for the store's apply).
pub fn virtual_service(rollout: &Resource, spec: &Rollout, routing: &Routing, step_note: &str) -> String {
    let dest = |subset: &str| json!({"host": spec.host, "subset": subset});
    let only = |subset: &str| json!({"route": [{"destination": dest(subset)}]});
    let (stable, canary) = (spec.stable.subset.as_str(), spec.canary.subset.as_str());
    let http: Vec<Value> = match routing {
        Routing::Stable | Routing::Step(StepTraffic::Weight(0)) => vec![only(stable)],
        Routing::Canary | Routing::Step(StepTraffic::Weight(100..)) => vec![only(canary)],
        Routing::Step(StepTraffic::Weight(w)) => vec![json!({"route": [
            {"destination": dest(stable), "weight": 100 - w},
            {"destination": dest(canary), "weight": w},
        ]})],
        Routing::Step(StepTraffic::Match(m)) => {
            let matches: Vec<Value> =
                m.iter().map(|m| strip_nulls(serde_json::to_value(m).unwrap_or(Value::Null))).collect();
            vec![json!({"match": matches, "route": [{"destination": dest(canary)}]}), only(stable)]
        }
        Routing::Step(StepTraffic::Mirror(p)) => vec![json!({
            "route": [{"destination": dest(stable)}],
            "mirror": dest(canary),
            "mirrorPercentage": {"value": p},
        })],
    };
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": Kind::VirtualService.as_str(),
        "metadata": {
            "name": rollout.meta.name,
            "namespace": rollout.meta.namespace,
            "labels": {ROLLOUT_LABEL: rollout.meta.name},
            "annotations": {MANAGED_BY_ANNOTATION: "rollout", "weft.dev/rollout-step": step_note},
        },
        "spec": {"hosts": [spec.host], "http": http},
    })
    .to_string()
}

/// Drops `null`s, empty maps/lists and `false` (serde's defaults) from a serialized
/// match, so the VirtualService reads as written.
fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| (k, strip_nulls(v)))
                .filter(|(_, v)| {
                    !(v.is_null()
                        || *v == Value::Bool(false)
                        || v.as_object().is_some_and(|o| o.is_empty())
                        || v.as_array().is_some_and(|a| a.is_empty()))
                })
                .collect(),
        ),
        other => other,
    }
}
