//! The `/inject` admission webhook over HTTPS, called the way the Kubernetes API server
//! calls it (TLS only, the CA from the webhook's `caBundle`, the Service's DNS name): curl
//! with `--cacert` gets the AdmissionReview answer over HTTP/1.1 and HTTP/2; plain HTTP
//! on the TLS port gets no answer; a certificate rotated in a Kubernetes Secret mount
//! (kubelet's atomic `..data` symlink swap) is served to the next connection.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::Method;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use weft_control::control::{ControlConfig, ControlPlane};
use weft_control::inject::InjectConfig;
use weft_control::translate::{MeshConfig, ProxyMode};
use weft_control::webhook_tls::WebhookTlsConfig;
use weft_testkit::http::{request, send_h1};
use weft_testkit::pki::TestCa;

const HOST: &str = "weft-control.weft-system.svc";

/// A CA (what goes in the webhook's `caBundle`); it signs serving certificates for the
/// Service's DNS names ([`serving`]).
fn pki() -> TestCa {
    TestCa::new("weft webhook test CA")
}

/// A serving certificate for the Service's DNS names: (certificate PEM, key PEM).
fn serving(pki: &TestCa, serial: u8) -> (String, String) {
    let cluster_local = format!("{HOST}.cluster.local");
    pki.leaf(&[HOST, &cluster_local, "weft-control.weft-system"], serial)
}

/// A directory laid out as kubelet mounts a Secret: `tls.crt -> ..data/tls.crt`,
/// `..data -> ..<version>`; [`SecretMount::update`] swaps `..data` atomically.
struct SecretMount {
    dir: PathBuf,
    version: u32,
}

impl SecretMount {
    fn new(dir: &Path, cert: &str, key: &str) -> SecretMount {
        let mut m = SecretMount { dir: dir.to_path_buf(), version: 0 };
        m.update(cert, key);
        std::os::unix::fs::symlink("..data/tls.crt", dir.join("tls.crt")).unwrap();
        std::os::unix::fs::symlink("..data/tls.key", dir.join("tls.key")).unwrap();
        m
    }

    fn update(&mut self, cert: &str, key: &str) {
        self.version += 1;
        let version = format!("..2025_01_01_00_00_0{}.000000001", self.version);
        std::fs::create_dir(self.dir.join(&version)).unwrap();
        std::fs::write(self.dir.join(&version).join("tls.crt"), cert).unwrap();
        std::fs::write(self.dir.join(&version).join("tls.key"), key).unwrap();
        std::os::unix::fs::symlink(&version, self.dir.join("..data_tmp")).unwrap();
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).unwrap();
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.join("tls.key")
    }
}

async fn control_plane(cert: PathBuf, key: PathBuf, inject: InjectConfig) -> ControlPlane {
    ControlPlane::start(ControlConfig {
        dir: None,
        xds: "127.0.0.1:0".parse().unwrap(),
        api: "127.0.0.1:0".parse().unwrap(),
        mode: ProxyMode::Transparent,
        mesh: MeshConfig::default(),
        identity: None,
        inject,
        webhook: Some(WebhookTlsConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            cert,
            key,
            reload_interval: Duration::from_millis(50),
        }),
        registry: None,
        slo: Default::default(),
        stats: Default::default(),
    })
    .await
    .unwrap()
}

/// A pod as the ReplicaSet controller creates it for Bookinfo's reviews-v1 (the body of
/// `crates/weft/tests/inject_webhook.rs`).
fn reviews_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "reviews-v1-5d9b6c9f8-",
            "namespace": "default",
            "labels": {"app": "reviews", "version": "v1", "pod-template-hash": "5d9b6c9f8"}
        },
        "spec": {
            "containers": [{
                "name": "reviews",
                "image": "docker.io/istio/examples-bookinfo-reviews-v1:1.20.1",
                "ports": [{"containerPort": 9080, "protocol": "TCP"}],
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent"
            }],
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "bookinfo-reviews",
            "serviceAccount": "bookinfo-reviews",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "enableServiceLinks": true
        },
        "status": {}
    })
}

/// An AdmissionReview v1 request as the API server sends it.
fn review(uid: &str, object: Value) -> Value {
    json!({
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "default",
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "groups": ["system:serviceaccounts", "system:authenticated"]
            },
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    })
}

/// `curl https://HOST:PORT/inject` as the API server would call it: (HTTP version, body).
async fn curl_inject(port: u16, ca: &Path, body: &Path, http: &str) -> Result<(String, Value), String> {
    let out = tokio::process::Command::new(weft_testkit::tools::require("curl"))
        .args(["-sS", "--fail-with-body", "--max-time", "10", http, "-w", "\n%{http_version}", "--cacert"])
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{HOST}:{port}:127.0.0.1"))
        .args(["-H", "content-type: application/json", "--data-binary"])
        .arg(format!("@{}", body.display()))
        .arg(format!("https://{HOST}:{port}/inject?timeout=10s"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(format!("{}{stdout}", String::from_utf8_lossy(&out.stderr)));
    }
    let (json_text, version) = stdout.rsplit_once('\n').unwrap();
    Ok((version.to_string(), serde_json::from_str(json_text).map_err(|e| format!("{e}: {json_text}"))?))
}

/// The JSON patch of an AdmissionReview answer, after checking the envelope.
fn patch_of(answer: &Value, uid: &str) -> json_patch::Patch {
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{answer}");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], uid);
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(answer["response"]["patch"].as_str().unwrap()).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// The leaf certificate a new TLS connection to `addr` is served, verified against `ca`
/// for the Service's name.
async fn served_leaf(addr: std::net::SocketAddr, ca: &Path) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(HOST).unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

#[tokio::test]
async fn the_api_server_gets_the_injection_patch_over_https_with_the_configured_image() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pki.pem()).unwrap();
    let (cert, key) = serving(&pki, 1);
    let secret = dir.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    let mount = SecretMount::new(&secret, &cert, &key);
    let inject = InjectConfig {
        image: "registry.example/weft:canary".into(),
        control_plane: "weft-control.weft-system.svc:15012".into(),
        ..InjectConfig::default()
    };
    let cp = control_plane(mount.cert(), mount.key(), inject).await;
    let port = cp.webhook_addr.unwrap().port();
    let pod = reviews_pod();
    let body = dir.path().join("review.json");
    std::fs::write(&body, review("705ab4f5-6393-11e8-b7cc-42010a800002", pod.clone()).to_string()).unwrap();

    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let (got_version, answer) = curl_inject(port, &ca, &body, flag).await.unwrap();
        assert_eq!(got_version, version, "{flag}");
        let mut injected = pod.clone();
        json_patch::patch(&mut injected, &patch_of(&answer, "705ab4f5-6393-11e8-b7cc-42010a800002")).unwrap();
        let proxy = &injected["spec"]["containers"][0];
        assert_eq!(proxy["name"], "weft-proxy");
        assert_eq!(proxy["image"], "registry.example/weft:canary");
        assert_eq!(injected["spec"]["initContainers"][0]["image"], "registry.example/weft:canary");
        let bootstrap = proxy["env"].as_array().unwrap().iter().find(|e| e["name"] == "WEFT_BOOTSTRAP_YAML").unwrap();
        assert!(
            bootstrap["value"].as_str().unwrap().contains("address: \"http://weft-control.weft-system.svc:15012\""),
            "{bootstrap}"
        );
    }

    // Only the webhook is served there: the rest of the API stays on the --api port.
    let out = tokio::process::Command::new(weft_testkit::tools::require("curl"))
        .args(["-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&ca)
        .arg("--resolve")
        .arg(format!("{HOST}:{port}:127.0.0.1"))
        .arg(format!("https://{HOST}:{port}/api/v1/proxies"))
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");

    // A client that does not trust the CA (no --cacert: the system roots) is refused.
    let out = tokio::process::Command::new(weft_testkit::tools::require("curl"))
        .args(["-sS", "--max-time", "10", "--resolve", &format!("{HOST}:{port}:127.0.0.1")])
        .arg(format!("https://{HOST}:{port}/inject"))
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "curl trusted a certificate of a private CA");

    // The plain-HTTP API keeps serving on its own port.
    let reply = send_h1(cp.api_addr, request(Method::GET, "weft-control", "/api/v1/proxies", Bytes::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    cp.shutdown().await;
}

#[tokio::test]
async fn plain_http_on_the_webhook_port_gets_no_answer() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let (cert, key) = serving(&pki, 1);
    let secret = dir.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    let mount = SecretMount::new(&secret, &cert, &key);
    let cp = control_plane(mount.cert(), mount.key(), InjectConfig::default()).await;
    let addr = cp.webhook_addr.unwrap();
    let body = Bytes::from(review("u-plain", reviews_pod()).to_string());
    let r = send_h1(addr, request(Method::POST, HOST, "/inject", body).unwrap()).await;
    assert!(r.is_err(), "plain HTTP got an HTTP answer: {:?}", r.map(|r| r.status));

    let out = tokio::process::Command::new(weft_testkit::tools::require("curl"))
        .args(["-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{addr}/inject"))
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "curl over plain HTTP succeeded: {}", String::from_utf8_lossy(&out.stdout));
    // The TLS port still serves TLS afterwards.
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pki.pem()).unwrap();
    assert_eq!(served_leaf(addr, &ca).await, der(&cert));
    cp.shutdown().await;
}

#[tokio::test]
async fn a_certificate_rotated_in_the_secret_mount_is_served_to_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pki.pem()).unwrap();
    let (cert1, key1) = serving(&pki, 1);
    let secret = dir.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    let mut mount = SecretMount::new(&secret, &cert1, &key1);
    let cp = control_plane(mount.cert(), mount.key(), InjectConfig::default()).await;
    let addr = cp.webhook_addr.unwrap();
    assert_eq!(served_leaf(addr, &ca).await, der(&cert1));
    assert_eq!(cp.webhook_cert.as_ref().unwrap().serial(), "01");

    // cert-manager renews: a new key and certificate, serial 2, swapped in atomically.
    let (cert2, key2) = serving(&pki, 2);
    mount.update(&cert2, &key2);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let leaf = served_leaf(addr, &ca).await;
        if leaf == der(&cert2) {
            break;
        }
        assert_eq!(leaf, der(&cert1), "served neither the old nor the new certificate");
        assert!(Instant::now() < deadline, "the rotated certificate was not served within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(cp.webhook_cert.as_ref().unwrap().serial(), "02");

    // The webhook keeps answering with the new certificate.
    let body = dir.path().join("review.json");
    std::fs::write(&body, review("u-rotated", reviews_pod()).to_string()).unwrap();
    let (_, answer) = curl_inject(addr.port(), &ca, &body, "--http1.1").await.unwrap();
    patch_of(&answer, "u-rotated");
    cp.shutdown().await;
}
