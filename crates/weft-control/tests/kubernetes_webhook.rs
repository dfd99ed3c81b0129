//! The `/inject` webhook registered with a real API server (`weft_testkit::kube`, built by
//! scripts/setup.sh): the control plane creates `weft-sidecar-injector` with the caBundle
//! of its serving certificate and a `url` client configuration (it runs outside the
//! cluster); Pods created through the API then come back injected or not, by Istio's
//! namespace labels and the pods' `sidecar.istio.io/inject` label and annotation. A new
//! serving certificate from another CA is registered in turn, and pods are still
//! injected through it (the webhook's failurePolicy is Fail: a stale caBundle would
//! refuse them).
//!
//! Skipped (with the reason) only when scripts/setup.sh tried and failed to build the
//! API server; without the binaries and without that record, the tests fail with the
//! setup hint.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;
use weft_control::control::{ControlConfig, ControlPlane};
use weft_control::kubernetes::webhook::{self, WebhookClient, WebhookRegistration};
use weft_control::translate::{MeshConfig, ProxyMode};
use weft_control::webhook_tls::WebhookTlsConfig;
use weft_testkit::kube::KubeApiServer;
use weft_testkit::pki::TestCa;

const WAIT: Duration = Duration::from_secs(60);

/// One API server at a time (each is etcd plus a kube-apiserver).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn api_server() -> Option<(KubeApiServer, tokio::sync::MutexGuard<'static, ()>)> {
    if let Some(why) = weft_testkit::kube::unavailable() {
        eprintln!("SKIPPED: {why}");
        return None;
    }
    let guard = ONE_AT_A_TIME.lock().await;
    Some((KubeApiServer::start().await.expect("kube-apiserver starts"), guard))
}

/// Writes a serving certificate for 127.0.0.1 signed by `ca`, followed by the CA (the
/// chain's last certificate is what gets registered), and its key.
fn write_serving(dir: &Path, ca: &TestCa, serial: u8) {
    let (cert, key) = ca.leaf(&["127.0.0.1"], serial);
    // Key first: the listener takes a pair only when both match.
    std::fs::write(dir.join("tls.key.new"), key).unwrap();
    std::fs::write(dir.join("tls.crt.new"), format!("{cert}{}", ca.pem())).unwrap();
    std::fs::rename(dir.join("tls.key.new"), dir.join("tls.key")).unwrap();
    std::fs::rename(dir.join("tls.crt.new"), dir.join("tls.crt")).unwrap();
}

/// A control plane (development mode) serving the webhook on 127.0.0.1 with the files in `dir`.
async fn control_plane(dir: &Path) -> ControlPlane {
    ControlPlane::start(ControlConfig {
        dir: None,
        xds: "127.0.0.1:0".parse().unwrap(),
        api: "127.0.0.1:0".parse().unwrap(),
        mode: ProxyMode::Transparent,
        mesh: MeshConfig::default(),
        identity: None,
        inject: Default::default(),
        webhook: Some(WebhookTlsConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            reload_interval: Duration::from_millis(50),
        }),
        registry: None,
        slo: Default::default(),
        stats: Default::default(),
    })
    .await
    .unwrap()
}

/// The registered caBundle (PEM), once the configuration exists.
async fn registered_ca_bundle(k: &KubeApiServer) -> Option<String> {
    let out = k
        .kubectl(&[
            "get",
            "mutatingwebhookconfiguration",
            webhook::CONFIGURATION_NAME,
            "-o",
            "json",
            "--ignore-not-found",
        ])
        .await
        .ok()?;
    let v: Value = serde_json::from_str(&out).ok()?;
    let hooks = v["webhooks"].as_array()?;
    let bundles: Vec<&str> = hooks.iter().filter_map(|h| h["clientConfig"]["caBundle"].as_str()).collect();
    assert_eq!(bundles.len(), hooks.len(), "every webhook has a caBundle: {v}");
    assert!(bundles.windows(2).all(|w| w[0] == w[1]), "one caBundle for all: {v}");
    let pem = base64::engine::general_purpose::STANDARD.decode(bundles.first()?).ok()?;
    Some(String::from_utf8_lossy(&pem).into_owned())
}

/// Waits until the registered caBundle is `pem` (polling the API server: the registration
/// is observable only there).
async fn wait_ca_bundle(k: &KubeApiServer, pem: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = registered_ca_bundle(k).await;
        if got.as_deref().map(str::trim) == Some(pem.trim()) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "caBundle never became the CA's; last: {got:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates a Pod through the API server and returns the stored Pod: (container names,
/// init container names). It names its service account, as the ServiceAccount admission
/// plugin (off in the test API server) would before the webhooks run.
async fn create_pod(
    k: &KubeApiServer,
    ns: &str,
    name: &str,
    labels: &str,
    annotations: &str,
) -> (Vec<String>, Vec<String>) {
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{app: {name}{labels}}}\n  annotations: {{{annotations}}}\nspec:\n  serviceAccountName: bookinfo-details\n  containers:\n  - name: app\n    image: docker.io/istio/examples-bookinfo-details-v1:1.20.2\n    ports: [{{containerPort: 9080}}]\n"
    );
    k.kubectl_stdin(&["create", "-f", "-"], Some(&yaml)).await.unwrap_or_else(|e| panic!("pod {ns}/{name}: {e:#}"));
    let pod: Value =
        serde_json::from_str(&k.kubectl(&["get", "pod", name, "-n", ns, "-o", "json"]).await.unwrap()).unwrap();
    let names = |key: &str| -> Vec<String> {
        pod["spec"][key].as_array().into_iter().flatten().filter_map(|c| c["name"].as_str().map(String::from)).collect()
    };
    (names("containers"), names("initContainers"))
}

fn injected((containers, init): &(Vec<String>, Vec<String>)) -> bool {
    let proxy = weft_control::inject::PROXY_CONTAINER.to_string();
    init.contains(&weft_control::inject::INIT_CONTAINER.to_string())
        && (containers.contains(&proxy) || init.contains(&proxy))
}

#[tokio::test]
async fn pods_created_through_the_api_are_injected_by_istios_namespace_and_pod_labels() {
    let Some((k, _one)) = api_server().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("weft webhook CA one");
    write_serving(dir.path(), &ca, 1);
    let cp = control_plane(dir.path()).await;
    let addr = cp.webhook_addr.expect("the webhook listens");
    let client = weft_control::kubernetes::client(Some(&k.kubeconfig)).await.unwrap();
    let registration = WebhookRegistration::new(WebhookClient::Url(format!("https://{addr}/inject")));
    let _task = AbortOnDrop(webhook::spawn(client.clone(), registration.clone(), cp.webhook_cert.clone().unwrap()));
    wait_ca_bundle(&k, &ca.pem()).await;
    // What the API server stored (with its defaults) reads back as what was asked: the
    // periodic resync does not rewrite it.
    let again = webhook::apply(&client, &registration.desired(&ca.pem()).unwrap()).await.unwrap();
    assert!(!again, "an unchanged configuration is not written again");

    k.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: enabled, labels: {istio-injection: enabled}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: disabled, labels: {istio-injection: disabled}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: revision, labels: {istio.io/rev: default}}\n",
    )
    .await
    .unwrap();

    let pod = create_pod(&k, "enabled", "details", "", "").await;
    assert!(injected(&pod), "a pod in an istio-injection=enabled namespace is injected: {pod:?}");
    let pod = create_pod(&k, "revision", "details", "", "").await;
    assert!(injected(&pod), "a pod in an istio.io/rev=default namespace is injected: {pod:?}");
    let pod = create_pod(&k, "plain", "details", "", "").await;
    assert!(!injected(&pod), "a pod in an unlabelled namespace is not injected: {pod:?}");
    assert_eq!(pod, (vec!["app".to_string()], vec![]), "and left as created");

    // Opting out in an enabled namespace: the label, or Istio's older annotation.
    let pod = create_pod(&k, "enabled", "out-label", ", sidecar.istio.io/inject: \"false\"", "").await;
    assert!(!injected(&pod), "sidecar.istio.io/inject=false label opts out: {pod:?}");
    let pod = create_pod(&k, "enabled", "out-annotation", "", "sidecar.istio.io/inject: \"false\"").await;
    assert!(!injected(&pod), "sidecar.istio.io/inject: false annotation opts out: {pod:?}");

    // Opting in without a namespace label: the pod label does, the annotation alone does not
    // (Istio's object selector reads labels); a disabled namespace wins over the pod.
    let pod = create_pod(&k, "plain", "in-label", ", sidecar.istio.io/inject: \"true\"", "").await;
    assert!(injected(&pod), "sidecar.istio.io/inject=true label opts in: {pod:?}");
    let pod = create_pod(&k, "plain", "in-annotation", "", "sidecar.istio.io/inject: \"true\"").await;
    assert!(!injected(&pod), "the annotation alone does not opt in: {pod:?}");
    let pod = create_pod(&k, "plain", "in-revision", ", istio.io/rev: default", "").await;
    assert!(injected(&pod), "an istio.io/rev=default pod label opts in: {pod:?}");
    let pod = create_pod(&k, "disabled", "in-label", ", sidecar.istio.io/inject: \"true\"", "").await;
    assert!(!injected(&pod), "istio-injection=disabled wins over the pod label: {pod:?}");
    cp.shutdown().await;
}

#[tokio::test]
async fn a_serving_certificate_from_a_new_ca_is_registered_and_pods_are_still_injected() {
    let Some((k, _one)) = api_server().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let first = TestCa::new("weft webhook CA one");
    write_serving(dir.path(), &first, 1);
    let cp = control_plane(dir.path()).await;
    let addr = cp.webhook_addr.expect("the webhook listens");
    let client = weft_control::kubernetes::client(Some(&k.kubeconfig)).await.unwrap();
    let registration = WebhookRegistration::new(WebhookClient::Url(format!("https://{addr}/inject")));
    let _task = AbortOnDrop(webhook::spawn(client, registration, cp.webhook_cert.clone().unwrap()));
    wait_ca_bundle(&k, &first.pem()).await;
    k.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: enabled, labels: {istio-injection: enabled}}\n")
        .await
        .unwrap();
    assert!(injected(&create_pod(&k, "enabled", "before", "", "").await));

    let second = TestCa::new("weft webhook CA two");
    write_serving(dir.path(), &second, 2);
    wait_ca_bundle(&k, &second.pem()).await;
    let pod = create_pod(&k, "enabled", "after", "", "").await;
    assert!(injected(&pod), "injected through the new certificate: {pod:?}");
    cp.shutdown().await;
}

/// A task aborted when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
