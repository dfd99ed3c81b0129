//! The control plane's `/inject` mutating admission webhook, called the way the
//! Kubernetes API server calls it: the returned JSON patch, applied to the pod, gives
//! exactly what `weft inject` writes for the same pod; opted-out, injected and non-pod
//! objects are allowed unchanged; bodies that are not AdmissionReviews get 400.

#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::process::{Command, Stdio};

use base64::Engine as _;
use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};
use weft_control::control::{ControlConfig, ControlPlane};
use weft_control::translate::{MeshConfig, ProxyMode};
use weft_testkit::http::{request, send_h1};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

async fn control_plane() -> ControlPlane {
    ControlPlane::start(ControlConfig {
        dir: None,
        xds: "127.0.0.1:0".parse().unwrap(),
        api: "127.0.0.1:0".parse().unwrap(),
        mode: ProxyMode::Transparent,
        mesh: MeshConfig::default(),
        identity: None,
        inject: Default::default(),
        webhook: None,
        registry: None,
        slo: Default::default(),
        stats: Default::default(),
    })
    .await
    .unwrap()
}

/// A pod as the ReplicaSet controller creates it for Bookinfo's reviews-v1, after the API
/// server's defaulting and the ServiceAccount admission plugin (what a webhook sees).
fn reviews_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "reviews-v1-5d9b6c9f8-",
            "namespace": "default",
            "labels": {"app": "reviews", "version": "v1", "pod-template-hash": "5d9b6c9f8"},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "reviews-v1-5d9b6c9f8",
                "uid": "0b3c6f5e-6a0c-4a3e-9d7e-3f1f0b8c2a11", "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "volumes": [
                {"name": "wlp-output", "emptyDir": {}},
                {"name": "tmp", "emptyDir": {}},
                {"name": "kube-api-access-7xk2p", "projected": {"sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
                ], "defaultMode": 420}}
            ],
            "containers": [{
                "name": "reviews",
                "image": "docker.io/istio/examples-bookinfo-reviews-v1:1.20.1",
                "ports": [{"containerPort": 9080, "protocol": "TCP"}],
                "env": [{"name": "LOG_DIR", "value": "/tmp/logs"}],
                "resources": {},
                "volumeMounts": [
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "wlp-output", "mountPath": "/opt/ibm/wlp/output"},
                    {"name": "kube-api-access-7xk2p", "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}
                ],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent"
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "bookinfo-reviews",
            "serviceAccount": "bookinfo-reviews",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            ],
            "priority": 0,
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {}
    })
}

/// An AdmissionReview v1 request as the API server sends it.
fn review(uid: &str, object: Value) -> Value {
    let kind = object["kind"].as_str().unwrap_or("Pod").to_string();
    let resource = if kind == "Pod" { "pods" } else { "services" };
    json!({
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": resource},
            "requestKind": {"group": "", "version": "v1", "kind": kind},
            "requestResource": {"group": "", "version": "v1", "resource": resource},
            "namespace": "default",
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "4f6c1a8e-2b7d-4c11-a0f3-96d0c5b1e2aa",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]
            },
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1", "fieldManager": "kube-controller-manager"}
        }
    })
}

async fn post(cp: &ControlPlane, body: Bytes) -> (u16, Value) {
    let reply = send_h1(cp.api_addr, request(Method::POST, "weft-control", "/inject", body).unwrap()).await.unwrap();
    (reply.status.as_u16(), reply.json().unwrap())
}

/// The pod the webhook's answer produces (None when there is no patch).
fn patched(pod: &Value, answer: &Value, uid: &str) -> Option<Value> {
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["uid"], uid);
    assert_eq!(response["allowed"], true, "{answer}");
    let patch = response.get("patch")?;
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD.decode(patch.as_str().unwrap()).unwrap();
    let ops: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut doc = pod.clone();
    json_patch::patch(&mut doc, &ops).unwrap();
    Some(doc)
}

fn cli_inject(pod: &Value) -> Value {
    let mut child = Command::new(WEFT)
        .arg("inject")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(pod.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_slice(&out.stdout).unwrap();
    serde_json::to_value(v).unwrap()
}

#[tokio::test]
async fn the_webhook_patch_turns_the_pod_into_what_weft_inject_writes() {
    let cp = control_plane().await;
    let pod = reviews_pod();
    let uid = "705ab4f5-6393-11e8-b7cc-42010a800002";
    let (status, answer) = post(&cp, Bytes::from(review(uid, pod.clone()).to_string())).await;
    assert_eq!(status, 200, "{answer}");
    let injected = patched(&pod, &answer, uid).expect("a patch for a pod to inject");
    assert_eq!(injected, cli_inject(&pod));
    let names = |key: &str| -> Vec<String> {
        injected["spec"][key].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(names("initContainers"), ["weft-init"]);
    assert_eq!(names("containers"), ["weft-proxy", "reviews"]);
    assert_eq!(names("volumes"), ["wlp-output", "tmp", "kube-api-access-7xk2p", "istio-token"]);
    // WORKLOAD_NAME is the Deployment, derived from the pod's ReplicaSet owner as Istio does.
    let env = injected["spec"]["containers"][0]["env"].as_array().unwrap();
    let bootstrap = env.iter().find(|e| e["name"] == "WEFT_BOOTSTRAP_YAML").unwrap()["value"].as_str().unwrap();
    assert!(bootstrap.contains("workload_name: \"reviews-v1\"\n"), "{bootstrap}");

    // The injected pod sent again (a re-invocation) is left alone.
    let (status, answer) = post(&cp, Bytes::from(review(uid, injected.clone()).to_string())).await;
    assert_eq!(status, 200);
    assert_eq!(patched(&injected, &answer, uid), None);
    cp.shutdown().await;
}

#[tokio::test]
async fn native_sidecar_annotation_is_honoured_by_the_webhook() {
    let cp = control_plane().await;
    let mut pod = reviews_pod();
    pod["metadata"]["annotations"] = json!({"sidecar.istio.io/nativeSidecar": "true"});
    let (_, answer) = post(&cp, Bytes::from(review("u-native", pod.clone()).to_string())).await;
    let injected = patched(&pod, &answer, "u-native").unwrap();
    assert_eq!(injected, cli_inject(&pod));
    assert_eq!(injected["spec"]["initContainers"][1]["name"], "weft-proxy");
    assert_eq!(injected["spec"]["initContainers"][1]["restartPolicy"], "Always");
    cp.shutdown().await;
}

#[tokio::test]
async fn opted_out_host_network_and_non_pod_objects_are_allowed_without_a_patch() {
    let cp = control_plane().await;
    let mut opted_out = reviews_pod();
    opted_out["metadata"]["labels"]["sidecar.istio.io/inject"] = json!("false");
    let mut host = reviews_pod();
    host["spec"]["hostNetwork"] = json!(true);
    let service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews"}, "spec": {"ports": [{"port": 9080}]}});
    for (i, object) in [opted_out, host, service].into_iter().enumerate() {
        let uid = format!("uid-{i}");
        let (status, answer) = post(&cp, Bytes::from(review(&uid, object.clone()).to_string())).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(patched(&object, &answer, &uid), None, "case {i}: {answer}");
    }
    cp.shutdown().await;
}

#[tokio::test]
async fn a_pod_that_cannot_be_injected_is_refused_with_the_reason() {
    let cp = control_plane().await;
    let mut pod = reviews_pod();
    pod["metadata"]["annotations"] = json!({"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/40"});
    let (status, answer) = post(&cp, Bytes::from(review("u-bad", pod).to_string())).await;
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["uid"], "u-bad");
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("traffic.sidecar.istio.io/excludeOutboundIPRanges") && message.contains("prefix length"),
        "{message}"
    );
    cp.shutdown().await;
}

#[tokio::test]
async fn bodies_that_are_not_admission_reviews_get_400_with_the_reason() {
    let cp = control_plane().await;
    let cases: [(&str, Bytes); 4] = [
        ("not JSON", Bytes::from_static(b"\x00\xffgarbage{")),
        ("apiVersion admission.k8s.io/v1", Bytes::from(json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "x"}}).to_string())),
        ("request.uid", Bytes::from(json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"kind": {"kind": "Pod"}}}).to_string())),
        ("request.object", Bytes::from(json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "x", "kind": {"kind": "Pod"}, "operation": "CREATE", "object": "pod"}}).to_string())),
    ];
    for (want, body) in cases {
        let (status, answer) = post(&cp, body).await;
        assert_eq!(status, 400, "{want}: {answer}");
        assert!(answer["error"].as_str().unwrap().contains(want), "{want}: {answer}");
    }
    cp.shutdown().await;
}
