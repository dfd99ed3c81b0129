//! `weft control --kubeconfig ... --webhook ...` against a real API server
//! (`weft_testkit::kube`): the process registers its injection webhook (a `url` client
//! configuration from its bound address, the caBundle of its serving certificate), so a
//! Pod created through the API in an `istio-injection=enabled` namespace comes back
//! injected; and a token from the TokenRequest API gets its certificate through the
//! API server's TokenReview.
//!
//! Skipped (with the reason) only when scripts/setup.sh tried and failed to build the
//! API server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use weft_identity::service::CertificateClient;
use weft_identity::{Credential, SpiffeId};
use weft_testkit::kube::KubeApiServer;
use weft_testkit::pki::TestCa;

const WEFT: &str = env!("CARGO_BIN_EXE_weft");
const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn weft_control_with_a_kubeconfig_registers_its_webhook_and_reviews_tokens() {
    if let Some(why) = weft_testkit::kube::unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let k = KubeApiServer::start().await.expect("kube-apiserver starts");
    k.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: bookinfo, labels: {istio-injection: enabled}}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: bookinfo-reviews, namespace: bookinfo}\n",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("weft webhook CA");
    let (cert, key) = ca.leaf(&["127.0.0.1"], 1);
    std::fs::write(dir.path().join("tls.crt"), format!("{cert}{}", ca.pem())).unwrap();
    std::fs::write(dir.path().join("tls.key"), key).unwrap();

    let mut control = tokio::process::Command::new(WEFT)
        .args(["control", "--transparent", "--xds", "127.0.0.1:0", "--api", "127.0.0.1:0", "--xds-tls", "off"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--kubeconfig")
        .arg(&k.kubeconfig)
        .args(["--webhook", "127.0.0.1:0", "--webhook-cert"])
        .arg(dir.path().join("tls.crt"))
        .arg("--webhook-key")
        .arg(dir.path().join("tls.key"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(control.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().expect("the address line");
    // "weft control: xDS on A, API on B, webhook (HTTPS) on C"
    let xds = line.split("xDS on ").nth(1).and_then(|r| r.split(',').next()).expect(&line).to_string();

    // The registration, with the CA of the serving certificate.
    let deadline = tokio::time::Instant::now() + WAIT;
    let registered = loop {
        let out = k
            .kubectl(&[
                "get",
                "mutatingwebhookconfiguration",
                "weft-sidecar-injector",
                "-o",
                "json",
                "--ignore-not-found",
            ])
            .await
            .unwrap();
        if !out.trim().is_empty() {
            break serde_json::from_str::<Value>(&out).unwrap();
        }
        assert!(tokio::time::Instant::now() < deadline, "weft-sidecar-injector never registered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let hook = &registered["webhooks"][0];
    let url = hook["clientConfig"]["url"].as_str().expect("a url client configuration");
    assert!(url.starts_with("https://127.0.0.1:") && url.ends_with("/inject"), "{url}");
    let bundle = base64::engine::general_purpose::STANDARD.decode(hook["clientConfig"]["caBundle"].as_str().unwrap());
    assert_eq!(String::from_utf8(bundle.unwrap()).unwrap().trim(), ca.pem().trim());

    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: reviews-v1, namespace: bookinfo, labels: {app: reviews}}\nspec:\n  serviceAccountName: bookinfo-reviews\n  containers: [{name: reviews, image: docker.io/istio/examples-bookinfo-reviews-v1:1.20.2}]\n";
    k.kubectl_stdin(&["create", "-f", "-"], Some(pod)).await.expect("the pod is created");
    let stored: Value =
        serde_json::from_str(&k.kubectl(&["get", "pod", "reviews-v1", "-n", "bookinfo", "-o", "json"]).await.unwrap())
            .unwrap();
    let names = |key: &str| -> Vec<String> {
        stored["spec"][key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(String::from))
            .collect()
    };
    assert!(names("containers").contains(&"weft-proxy".to_string()), "{stored}");
    assert!(names("initContainers").contains(&"weft-init".to_string()), "{stored}");

    // The pod's token gets its certificate through TokenReview.
    let token = k.create_token("bookinfo", "bookinfo-reviews", "istio-ca", 600).await.unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    let uri = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews".to_string();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let mut client = CertificateClient::connect_lazy(&format!("http://{xds}")).unwrap();
    let chain = client
        .create_certificate(&Credential::KubernetesServiceAccountToken(token), csr, None)
        .await
        .expect("a certificate for the pod's token");
    let leaf = weft_identity::cert::certs_from_pem(&chain[0], "leaf").unwrap().remove(0);
    assert_eq!(
        weft_identity::cert::spiffe_id_of(&leaf).unwrap(),
        SpiffeId::new("cluster.local", "bookinfo", "bookinfo-reviews").unwrap()
    );
    let _ = control.kill().await;
}

#[tokio::test]
async fn webhook_registration_flags_without_kubernetes_or_malformed_fail_with_the_reason() {
    let run = |args: Vec<&'static str>| async move {
        let out = tokio::process::Command::new(WEFT)
            .args(["control", "--insecure-dev", "--xds", "127.0.0.1:0", "--api", "127.0.0.1:0"])
            .args(args)
            .output()
            .await
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = run(vec!["--webhook-url", "https://10.0.0.5:15017/inject"]).await;
    assert!(!ok && err.contains("need --kubernetes (or --kubeconfig) and --webhook"), "{err}");
    let webhook =
        ["--kubeconfig", "/nonexistent", "--webhook", "127.0.0.1:0", "--webhook-cert", "c", "--webhook-key", "k"];
    let (ok, err) = run([&webhook[..], &["--webhook-service", "weft-control"]].concat()).await;
    assert!(!ok && err.contains("expected NAMESPACE/NAME[:PORT]"), "{err}");
    let (ok, err) = run([&webhook[..], &["--webhook-url", "http://10.0.0.5/inject"]].concat()).await;
    assert!(!ok && err.contains("https:// only"), "{err}");
}
