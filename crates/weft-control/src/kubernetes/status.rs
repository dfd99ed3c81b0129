//! Validation results written back into Istio objects' `status`, as Istio does: an object
//! weft cannot use gets `validationMessages` (Istio's analysis message
//! `IST0106 SchemaValidationError`, level `ERROR`) and a `Reconciled` condition with
//! status `"False"` whose message names the file-like source, field and problem; once
//! fixed, the condition turns `"True"` and the messages go. Objects that never had an
//! error are not written to (no status churn on every object).
//!
//! Writing the status changes the object, so the watch sees it again: a status already
//! saying what would be written is left alone, which ends the loop.

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::Client;
use serde_json::{json, Value};
use weft_api::ApiError;

/// Istio's analysis message for an object that does not validate.
const SCHEMA_ERROR_CODE: &str = "IST0106";
const SCHEMA_ERROR_NAME: &str = "SchemaValidationError";
const SCHEMA_ERROR_DOC: &str = "https://istio.io/latest/docs/reference/config/analysis/ist0106/";
/// The condition weft writes.
const CONDITION: &str = "Reconciled";

/// Writes status for one kind.
pub(super) struct StatusWriter {
    client: Client,
    ar: ApiResource,
}

impl StatusWriter {
    pub(super) fn new(client: Client, ar: ApiResource) -> StatusWriter {
        StatusWriter { client, ar }
    }

    /// Brings `obj`'s status in line with `errors` (none: valid); `kept` says whether a
    /// previous good version stays in force.
    pub(super) async fn report(&self, obj: &DynamicObject, errors: &[ApiError], kept: bool) {
        let current = obj.data.get("status").cloned().unwrap_or(Value::Null);
        let Some(desired) = desired_status(obj.metadata.generation, errors, kept, &current) else { return };
        if same_status(&current, &desired) {
            return;
        }
        let (Some(name), Some(ns)) = (obj.metadata.name.as_deref(), obj.metadata.namespace.as_deref()) else { return };
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), ns, &self.ar);
        let patch = json!({ "status": desired });
        match api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {
                tracing::info!(kind = %self.ar.kind, %ns, %name, valid = errors.is_empty(), "kubernetes: status written")
            }
            Err(e) => tracing::warn!(kind = %self.ar.kind, %ns, %name, error = %e, "kubernetes: status not written"),
        }
    }
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
