//! Validation results written back into Istio objects' `status`, as Istio does: an object
//! weft cannot use gets `validationMessages` (Istio's analysis message
//! `IST0106 SchemaValidationError`, level `ERROR`) and a `Reconciled` condition with
//! status `"False"` whose message names the file-like source, field and problem; once
//! fixed, the condition turns `"True"` and the messages go. Objects that never had an
//! error are not written to (no status churn on every object).
//!
//! Writing the status changes the object, so the watch sees it again: a status already
//! saying what would be written is left alone, which ends the loop.
//!
//! Only the leader writes ([`crate::leader::Leadership`]: the Lease election with several
//! replicas). A follower keeps the last status it would write per object, dropping it
//! when the object's status already says so (the leader wrote it); when it becomes the
//! leader it writes what is still pending, so a change made while the old leader was
//! dying is reported after the takeover.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::Client;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use weft_api::ApiError;

use crate::leader::Leadership;

/// Istio's analysis message for an object that does not validate.
const SCHEMA_ERROR_CODE: &str = "IST0106";
const SCHEMA_ERROR_NAME: &str = "SchemaValidationError";
const SCHEMA_ERROR_DOC: &str = "https://istio.io/latest/docs/reference/config/analysis/ist0106/";
/// The condition weft writes.
const CONDITION: &str = "Reconciled";

/// Statuses a follower would have written, by (namespace, name).
type Pending = Arc<Mutex<BTreeMap<(String, String), Value>>>;

/// Writes status for one kind, while this replica leads.
pub(super) struct StatusWriter {
    target: Target,
    leader: Leadership,
    pending: Pending,
    flush: JoinHandle<()>,
}

/// Where statuses go.
#[derive(Clone)]
struct Target {
    client: Client,
    ar: ApiResource,
}

impl StatusWriter {
    /// A writer that writes while `leader` says this replica leads.
    pub(super) fn new(client: Client, ar: ApiResource, leader: Leadership) -> StatusWriter {
        let target = Target { client, ar };
        let pending: Pending = Arc::default();
        let flush = tokio::spawn(flush_on_leadership(target.clone(), leader.clone(), pending.clone()));
        StatusWriter { target, leader, pending, flush }
    }

    /// Brings `obj`'s status in line with `errors` (none: valid); `kept` says whether a
    /// previous good version stays in force.
    pub(super) async fn report(&self, obj: &DynamicObject, errors: &[ApiError], kept: bool) {
        let (Some(name), Some(ns)) = (obj.metadata.name.as_deref(), obj.metadata.namespace.as_deref()) else { return };
        let key = (ns.to_string(), name.to_string());
        let current = obj.data.get("status").cloned().unwrap_or(Value::Null);
        let desired = desired_status(obj.metadata.generation, errors, kept, &current);
        let Some(desired) = desired.filter(|d| !same_status(&current, d)) else {
            lock(&self.pending).remove(&key);
            return;
        };
        if !self.leader.leads() {
            tracing::debug!(kind = %self.target.ar.kind, %ns, %name, "kubernetes: status left to the leader");
            lock(&self.pending).insert(key.clone(), desired);
            // Leadership may have come between the check and the insert, after the
            // flush: then the entry is this call's to write.
            if !self.leader.leads() {
                return;
            }
            let Some(desired) = lock(&self.pending).remove(&key) else { return };
            return self.target.write(ns, name, &desired).await;
        }
        lock(&self.pending).remove(&key);
        self.target.write(ns, name, &desired).await;
    }
}

impl Drop for StatusWriter {
    fn drop(&mut self) {
        self.flush.abort();
    }
}

impl Target {
    async fn write(&self, ns: &str, name: &str, desired: &Value) {
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), ns, &self.ar);
        let patch = json!({ "status": desired });
        let valid = desired["conditions"][0]["status"] == "True";
        match api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => tracing::info!(kind = %self.ar.kind, %ns, %name, valid, "kubernetes: status written"),
            Err(e) => tracing::warn!(
                kind = %self.ar.kind, %ns, %name, error = %e,
                "kubernetes: status not written{}", super::rbac::hint(&e)
            ),
        }
    }
}

/// Each time this replica becomes the leader, writes the statuses left pending while it
/// followed.
async fn flush_on_leadership(target: Target, leader: Leadership, pending: Pending) {
    let mut rx = leader.is_leader();
    loop {
        if rx.wait_for(|l| *l).await.is_err() {
            return;
        }
        let todo: Vec<((String, String), Value)> = std::mem::take(&mut *lock(&pending)).into_iter().collect();
        if !todo.is_empty() {
            tracing::info!(kind = %target.ar.kind, objects = todo.len(), "kubernetes: leader now: writing pending status");
        }
        for ((ns, name), desired) in todo {
            target.write(&ns, &name, &desired).await;
        }
        if rx.wait_for(|l| !*l).await.is_err() {
            return;
        }
    }
}

fn lock(p: &Pending) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), Value>> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// The status to merge in, or None when nothing is to be written (a valid object that
/// never had weft's error condition).
fn desired_status(generation: Option<i64>, errors: &[ApiError], kept: bool, current: &Value) -> Option<Value> {
    let had_error = current
        .get("conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == CONDITION && c["status"] == "False"));
    if errors.is_empty() {
        if !had_error {
            return None;
        }
        return Some(json!({
            "observedGeneration": generation,
            "conditions": [{ "type": CONDITION, "status": "True", "reason": "Accepted", "message": "valid; in force" }],
            "validationMessages": null,
        }));
    }
    let mut message = errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ");
    message.push_str(if kept { " (not applied; the previous version stays in force)" } else { " (not applied)" });
    Some(json!({
        "observedGeneration": generation,
        "conditions": [{ "type": CONDITION, "status": "False", "reason": "Invalid", "message": message }],
        "validationMessages": [{
            "type": { "code": SCHEMA_ERROR_CODE, "name": SCHEMA_ERROR_NAME },
            "level": "ERROR",
            "documentationUrl": SCHEMA_ERROR_DOC,
        }],
    }))
}

/// Whether `current` already says what `desired` would write (null fields: absent).
fn same_status(current: &Value, desired: &Value) -> bool {
    let Some(d) = desired.as_object() else { return false };
    d.iter().all(|(k, v)| match v {
        Value::Null => current.get(k).is_none_or(Value::is_null),
        _ => current.get(k) == Some(v),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error() -> ApiError {
        ApiError {
            file: "kubernetes:VirtualService/default/reviews".into(),
            line: 9,
            column: 5,
            resource: Some("VirtualService default/reviews".into()),
            field: "spec.http[0].route[0].weight".into(),
            message: "expected a number".into(),
            hint: None,
        }
    }

    #[test]
    fn an_invalid_object_gets_a_false_condition_naming_the_field_and_the_write_is_not_repeated() {
        let desired = desired_status(Some(2), &[error()], false, &Value::Null).expect("a status");
        assert_eq!(desired["conditions"][0]["status"], "False");
        let msg = desired["conditions"][0]["message"].as_str().unwrap_or("");
        assert!(msg.contains("spec.http[0].route[0].weight"), "{msg}");
        assert_eq!(desired["validationMessages"][0]["type"]["code"], "IST0106");
        assert!(same_status(&desired, &desired), "the status written is recognised as current");
    }

    #[test]
    fn a_valid_object_is_written_only_after_an_error() {
        assert!(desired_status(Some(1), &[], false, &Value::Null).is_none());
        let bad = desired_status(Some(1), &[error()], false, &Value::Null).expect("a status");
        let good = desired_status(Some(2), &[], false, &bad).expect("cleared");
        assert_eq!(good["conditions"][0]["status"], "True");
        let after = json!({ "observedGeneration": 2, "conditions": good["conditions"].clone() });
        assert!(same_status(&after, &good));
    }
}
