//! `weft control --webhook`: the flags reach the HTTPS webhook listener and the injected
//! pod (`--inject-image`, `--inject-control-plane`, `--inject-native-sidecar`); bad
//! flag combinations and unusable certificate files fail with the reason.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use weft_testkit::pki::TestCa;

const WEFT: &str = env!("CARGO_BIN_EXE_weft");
const HOST: &str = "weft-control.weft-system.svc";

/// Writes ca.pem, tls.crt, tls.key (for [`HOST`]) and other.key (another key) to `dir`.
fn pki(dir: &Path) {
    let ca = TestCa::new("weft webhook test CA");
    ca.write(dir, &[HOST]);
    let (_, other_key) = ca.leaf(&[HOST], 2);
    std::fs::write(dir.join("other.key"), other_key).unwrap();
}

async fn weft(args: &[&str]) -> (i32, String) {
    let o = tokio::process::Command::new(WEFT).args(args).output().await.unwrap();
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn review(uid: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": uid, "namespace": "default", "operation": "CREATE",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "ratings-v1-abcde", "namespace": "default", "labels": {"app": "ratings", "version": "v1"}},
                "spec": {"serviceAccountName": "bookinfo-ratings", "containers": [{
                    "name": "ratings", "image": "docker.io/istio/examples-bookinfo-ratings-v1:1.20.1",
                    "ports": [{"containerPort": 9080}]
                }]}
            }
        }
    })
}

#[tokio::test]
async fn webhook_flags_serve_https_and_shape_the_injected_pod() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let mut control = tokio::process::Command::new(WEFT)
        .args(["control", "--insecure-dev", "--xds", "127.0.0.1:0", "--api", "127.0.0.1:0", "--webhook", "127.0.0.1:0"])
        .arg("--webhook-cert")
        .arg(dir.path().join("tls.crt"))
        .arg("--webhook-key")
        .arg(dir.path().join("tls.key"))
        .args(["--inject-image", "registry.example/weft:canary", "--inject-native-sidecar"])
        .args(["--inject-control-plane", "istiod.istio-system.svc:15012", "--trust-domain", "example.org"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(control.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await.unwrap().unwrap().unwrap();
    // "weft control: xDS on A, API on B, webhook (HTTPS) on C"
    let port = line.rsplit_once(':').unwrap().1.trim().to_string();
    let body = dir.path().join("review.json");
    std::fs::write(&body, review("u-cli").to_string()).unwrap();
    let out = tokio::process::Command::new(weft_testkit::tools::require("curl"))
        .args(["-sS", "--fail-with-body", "--max-time", "10", "--cacert"])
        .arg(dir.path().join("ca.pem"))
        .arg("--resolve")
        .arg(format!("{HOST}:{port}:127.0.0.1"))
        .args(["-H", "content-type: application/json", "--data-binary"])
        .arg(format!("@{}", body.display()))
        .arg(format!("https://{HOST}:{port}/inject"))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["response"]["uid"], "u-cli");
    assert_eq!(answer["response"]["allowed"], true);
    let patch =
        base64::engine::general_purpose::STANDARD.decode(answer["response"]["patch"].as_str().unwrap()).unwrap();
    let mut pod = review("u-cli")["request"]["object"].clone();
    let ops: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    json_patch::patch(&mut pod, &ops).unwrap();
    let proxy = &pod["spec"]["initContainers"][1];
    assert_eq!(proxy["name"], "weft-proxy", "{pod}");
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["image"], "registry.example/weft:canary");
    let bootstrap = proxy["env"].as_array().unwrap().iter().find(|e| e["name"] == "WEFT_BOOTSTRAP_YAML").unwrap();
    let bootstrap = bootstrap["value"].as_str().unwrap();
    assert!(bootstrap.contains("address: \"http://istiod.istio-system.svc:15012\""), "{bootstrap}");
    assert!(bootstrap.contains("trust_domain: \"example.org\""), "{bootstrap}");
}

#[tokio::test]
async fn webhook_without_its_certificate_and_key_is_a_usage_error() {
    let (code, stderr) =
        weft(&["control", "--xds", "127.0.0.1:0", "--api", "127.0.0.1:0", "--webhook", "127.0.0.1:0"]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--webhook-cert") && stderr.contains("--webhook-key"), "{stderr}");
    let (code, stderr) = weft(&["control", "--webhook-cert", "tls.crt"]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--webhook <WEBHOOK>"), "{stderr}");
}

#[tokio::test]
async fn unusable_webhook_files_fail_the_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let path = |f: &str| dir.path().join(f).display().to_string();
    let start = |cert: String, key: String| async move {
        weft(&[
            "control",
            "--xds",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
            "--webhook",
            "127.0.0.1:0",
            "--webhook-cert",
            &cert,
            "--webhook-key",
            &key,
        ])
        .await
    };
    let (code, stderr) = start(path("tls.crt"), path("other.key")).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}: the private key does not match the certificate in {}",
            path("other.key"),
            path("tls.crt")
        )),
        "{stderr}"
    );
    let (code, stderr) = start(path("missing.crt"), path("tls.key")).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&format!("{}: cannot read the webhook certificate", path("missing.crt"))), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
