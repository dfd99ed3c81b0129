//! The mutating admission webhook: Kubernetes sends an `admission.k8s.io/v1`
//! AdmissionReview for each Pod created in a selected namespace; the answer allows it
//! and carries a base64 JSON patch (RFC 6902) that turns the pod into the injected pod,
//! computed by diffing the pod's JSON before and after [`super::pod::inject`].

use base64::Engine as _;
use serde_json::{json, Value};

use super::pod::{self, Outcome};
use super::yaml::Node;
use super::InjectConfig;

/// A body that is not an AdmissionReview v1 (answered with HTTP 400 and this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadReview(pub String);

/// Answers one AdmissionReview body: `Ok` is the AdmissionReview response to send
/// (allowed with or without a patch, or refused with the reason when the pod cannot be
/// injected as written); `Err` when the body is not an AdmissionReview v1.
pub fn review(body: &[u8], cfg: &InjectConfig) -> Result<Value, BadReview> {
    let bad = BadReview;
    let review: Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("the body is not JSON: {e} (expected an AdmissionReview)")))?;
    let api_version = review.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = review.get("kind").and_then(Value::as_str).unwrap_or("");
    if api_version != "admission.k8s.io/v1" || kind != "AdmissionReview" {
        return Err(bad(format!(
            "expected apiVersion admission.k8s.io/v1 and kind AdmissionReview, got {api_version:?} {kind:?}"
        )));
    }
    let request = review
        .get("request")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("request is missing: an AdmissionReview to answer needs one".into()))?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| bad("request.uid is missing or not a string".into()))?;
    let allow = |patch: Option<String>| {
        let mut response = json!({"uid": uid, "allowed": true});
        if let Some(patch) = patch {
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(patch);
        }
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
    };
    let resource_kind = request.get("kind").and_then(|k| k.get("kind")).and_then(Value::as_str).unwrap_or("");
    let operation = request.get("operation").and_then(Value::as_str).unwrap_or("");
    // Containers cannot be added to a running pod: only creations are injected.
    if resource_kind != "Pod" || operation != "CREATE" {
        return Ok(allow(None));
    }
    let object = request
        .get("object")
        .filter(|o| o.is_object())
        .ok_or_else(|| bad("request.object is missing or not an object: a Pod CREATE carries the pod".into()))?;
    let namespace = request
        .get("namespace")
        .and_then(Value::as_str)
        .or_else(|| object.pointer("/metadata/namespace").and_then(Value::as_str));
    let mut node = Node::from_json(object);
    let Some(pod_map) = node.as_map_mut() else { return Ok(allow(None)) };
    let workload = super::workload::of_pod(pod_map);
    match pod::inject(pod_map, cfg, namespace, &workload, "") {
        Ok(Outcome::Skipped(_)) => Ok(allow(None)),
        Ok(Outcome::Injected) => {
            let after = node.to_json().map_err(|e| bad(format!("request.object: {e}")))?;
            let patch = json_patch::diff(object, &after);
            let text = serde_json::to_vec(&patch).map_err(|e| bad(format!("cannot encode the patch: {e}")))?;
            Ok(allow(Some(base64::engine::general_purpose::STANDARD.encode(text))))
        }
        Err(message) => Ok(json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {
                "uid": uid,
                "allowed": false,
                "status": {"code": 400, "reason": "BadRequest", "message": format!("weft sidecar injection: {message}")},
            },
        })),
    }
}
