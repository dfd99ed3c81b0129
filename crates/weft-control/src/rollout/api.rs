//! The rollouts' JSON API (what `weft rollout ...` calls):
//!
//! - `GET /api/v1/rollouts`: every rollout and staged change with its events;
//! - `GET /api/v1/rollouts/NAMESPACE/NAME`: one rollout;
//! - `POST /api/v1/rollouts/NAMESPACE/NAME/{promote,pause,resume,abort}` (`?full=true`
//!   for promote: straight to the end).
//!
//! Staged changes come in through `POST /api/v1/apply?staged=true` ([`stage`]).

use std::path::Path;
use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};
use weft_api::{Kind, Spec};

use super::{decide, now_ms, routing, staged, Command, CommandError, RolloutController, RolloutState};
use crate::store::ResourceStore;

/// Answers a request under `/api/v1/rollouts` (`rest`: the path after it, `query`:
/// the query string).
pub fn handle(
    c: &RolloutController,
    store: &ResourceStore,
    post: bool,
    rest: &str,
    query: &str,
) -> (StatusCode, Value) {
    let parts: Vec<&str> = rest.trim_matches('/').split('/').filter(|p| !p.is_empty()).collect();
    match (post, parts.as_slice()) {
        (false, []) => (StatusCode::OK, list(c, store)),
        (false, [ns, name]) => {
            let all = list(c, store);
            let found = all["rollouts"]
                .as_array()
                .and_then(|l| l.iter().find(|r| r["namespace"] == *ns && r["name"] == *name).cloned());
            match found {
                Some(r) => (StatusCode::OK, r),
                None => (StatusCode::NOT_FOUND, json!({"error": format!("no rollout {ns}/{name}")})),
            }
        }
        (true, [ns, name, action]) => {
            let full = query.split('&').any(|kv| kv == "full=true" || kv == "full=1");
            let cmd = match *action {
                "promote" => Command::Promote { full },
                "pause" => Command::Pause,
                "resume" => Command::Resume,
                "abort" => Command::Abort,
                other => {
                    let error = format!("unknown action {other:?}: expected promote, pause, resume or abort");
                    return (StatusCode::BAD_REQUEST, json!({"error": error}));
                }
            };
            match c.command(ns, name, cmd, now_ms()) {
                Ok(s) => (StatusCode::OK, json!({"phase": s.phase, "step": s.step + 1, "event": s.events.last()})),
                Err(e @ CommandError::NotFound(_)) => (StatusCode::NOT_FOUND, json!({"error": e.to_string()})),
                Err(e) => (StatusCode::CONFLICT, json!({"error": e.to_string()})),
            }
        }
        _ => (StatusCode::NOT_FOUND, json!({"error": format!("no such rollout endpoint {rest:?}")})),
    }
}

/// Every rollout (with its spec's steps) and staged change.
fn list(c: &RolloutController, store: &ResourceStore) -> Value {
    let snap = store.snapshot();
    let states = c.states();
    let mut rollouts = Vec::new();
    for r in snap.resources.iter().filter(|r| r.kind == Kind::Rollout) {
        let Spec::Rollout(spec) = &r.spec else { continue };
        let key = format!("{}/{}", r.meta.namespace, r.meta.name);
        let Some(s) = states.rollouts.get(&key) else {
            rollouts.push(
                json!({"namespace": r.meta.namespace, "name": r.meta.name, "host": spec.host, "phase": "Pending"}),
            );
            continue;
        };
        rollouts.push(rollout_json(spec, s));
    }
    let staged: Vec<Value> = states.staged.values().map(|s| json!(s)).collect();
    json!({"rollouts": rollouts, "staged": staged})
}

fn rollout_json(spec: &weft_api::Rollout, s: &RolloutState) -> Value {
    let traffic = match routing::routing_of(spec, s) {
        routing::Routing::Stable => format!("all requests to {}", spec.stable.subset),
        routing::Routing::Canary => format!("all requests to {}", spec.canary.subset),
        routing::Routing::Step(t) => decide::describe(&t, &spec.canary.subset),
    };
    json!({
        "namespace": s.namespace,
        "name": s.name,
        "host": spec.host,
        "stable": spec.stable.subset,
        "canary": spec.canary.subset,
        "phase": s.phase,
        "step": s.step + 1,
        "steps": spec.steps.len(),
        "traffic": traffic,
        "failures": s.failures,
        "failureThreshold": spec.analysis.failure_threshold(),
        "interval": spec.analysis.interval.to_string(),
        "last": s.last,
        "conflict": s.conflict,
        "events": s.events,
    })
}

/// `POST /api/v1/apply?staged=true`: stages the resources of `text`.
pub fn stage(
    c: &RolloutController,
    text: &str,
    source: &str,
    workloads: &[staged::ProxyWorkload],
    percent: Option<u32>,
    interval: Option<Duration>,
) -> (StatusCode, Value) {
    let percent = percent.unwrap_or(staged::DEFAULT_CANARY_PERCENT);
    let interval = interval.unwrap_or(staged::DEFAULT_INTERVAL);
    match c.stage(text, Path::new(source), workloads, percent, interval, now_ms()) {
        Ok(s) => (
            StatusCode::OK,
            json!({"staged": s.name, "accepted": s.resources, "canary": s.canary, "rest": s.rest, "errors": [], "event": s.events.last()}),
        ),
        Err(e) => (StatusCode::BAD_REQUEST, json!({"accepted": [], "errors": [e.to_string()]})),
    }
}
