//! The install manifests on a real API server (`weft_testkit::kube`): `kubectl apply
//! --server-side -f manifests/crds/ -f manifests/install/` really applied (not a dry
//! run; server-side because the Gateway API's CRDs are too large for client-side
//! apply's annotation), then `weft control` run as a
//! process with the Deployment's own arguments (in-cluster paths and addresses swapped for
//! the test's) and a kubeconfig carrying ONLY a TokenRequest token of the weft-system
//! ServiceAccount: it lists every kind it watches, holds the Lease, writes status, and is
//! never forbidden anything; with one rule taken out of the ClusterRole it fails visibly,
//! and works again once the generated RBAC is re-applied.
//!
//! Skipped (with the reason) only when scripts/setup.sh tried and failed to build the
//! API server.

use std::path::{Path, PathBuf};

use kube_control::{eventually, field, ControlProc};
use weft_testkit::kube::KubeApiServer;

#[path = "support/kube_control.rs"]
mod kube_control;

const ADMIN_TOKEN: &str = "install-test-admin-token";
const POD_NAME: &str = "weft-control-5d8f7c9b4-x2x7q";
const SA: &str = "system:serviceaccount:weft-system:weft-control";

/// The test's stand-ins for what the pod mounts.
struct Mounts {
    _dir: tempfile::TempDir,
    data: PathBuf,
    cacerts: PathBuf,
    admin_token: PathBuf,
    webhook_cert: PathBuf,
    webhook_key: PathBuf,
}

impl Mounts {
    fn create() -> Mounts {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        // A plug-in CA in Istio's cacerts layout (the `cacerts` Secret): a root signing directly.
        let root = d.join("root");
        weft_identity::Ca::load_or_create(&root, "cluster.local").expect("a CA");
        let cacerts = d.join("cacerts");
        std::fs::create_dir(&cacerts).expect("mkdir");
        for (from, to) in
            [("root-cert.pem", "ca-cert.pem"), ("root-key.pem", "ca-key.pem"), ("root-cert.pem", "root-cert.pem")]
        {
            std::fs::copy(root.join(from), cacerts.join(to)).expect("copy");
        }
        let admin_token = d.join("admin-token");
        std::fs::write(&admin_token, ADMIN_TOKEN).expect("write");
        let ca = weft_testkit::pki::TestCa::new("weft-install-test-webhook-ca");
        let (cert, key) = ca.leaf(&["weft-control.weft-system.svc"], 1);
        let (webhook_cert, webhook_key) = (d.join("tls.crt"), d.join("tls.key"));
        std::fs::write(&webhook_cert, cert).expect("write");
        std::fs::write(&webhook_key, key).expect("write");
        Mounts { data: d.join("data"), cacerts, admin_token, webhook_cert, webhook_key, _dir: dir }
    }
}

/// The Deployment's container arguments with the cluster swapped for the test: the
/// kubeconfig instead of the in-cluster account, loopback port 0 for every listener, the
/// stand-in files for the mounts. An in-cluster path this does not know fails the test.
fn local_args(deployment_args: &[String], kubeconfig: &Path, m: &Mounts) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = deployment_args.iter();
    while let Some(a) = it.next() {
        let path = |p: &Path| p.display().to_string();
        let value = match a.as_str() {
            "--kubernetes" => {
                out.extend(["--kubeconfig".to_string(), path(kubeconfig)]);
                continue;
            }
            "--xds" | "--xds-tls" | "--api" | "--webhook" => "127.0.0.1:0".to_string(),
            "--data-dir" => path(&m.data),
            "--plugin-ca" => path(&m.cacerts),
            "--api-token-file" => path(&m.admin_token),
            "--webhook-cert" => path(&m.webhook_cert),
            "--webhook-key" => path(&m.webhook_key),
            other => {
                assert!(!other.starts_with("/etc") && !other.starts_with("/var"), "unmapped in-cluster path {other}");
                out.push(other.to_string());
                continue;
            }
        };
        it.next().unwrap_or_else(|| panic!("{a} without a value"));
        out.extend([a.clone(), value]);
    }
    out
}

const SEED: &str = "apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1-abc, namespace: default, labels: {app: reviews, version: v1}}
spec:
  containers: [{name: reviews, image: reviews, ports: [{name: http, containerPort: 9080}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}]
";

fn virtual_service(weight: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {{host: reviews, subset: v1}}
      weight: {weight}
"
    )
}

async fn vs_message(k: &KubeApiServer) -> String {
    let out = k.kubectl(&["get", "virtualservice", "reviews", "-o", "json"]).await.expect("get vs");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    v["status"]["conditions"][0]["message"].as_str().unwrap_or_default().to_string()
}

/// Whether the API server lets the control plane's account patch VirtualServices' status.
async fn may_patch_vs_status(k: &KubeApiServer) -> bool {
    k.kubectl(&["auth", "can-i", "patch", "virtualservices.networking.istio.io", "--subresource=status", "--as", SA])
        .await
        .is_ok()
}

#[tokio::test]
async fn the_install_manifests_apply_and_weft_control_runs_with_only_its_service_account_token() {
    if let Some(why) = weft_testkit::kube::unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let k = KubeApiServer::start().await.expect("kube-apiserver starts");
    let root = weft_testkit::workspace_root();
    let (crds, install) = (root.join("manifests/crds"), root.join("manifests/install"));
    let out = k
        .kubectl(&["apply", "--server-side", "-f", &crds.display().to_string(), "-f", &install.display().to_string()])
        .await
        .expect("the install manifests apply");
    eprintln!("{out}");
    k.kubectl(&["wait", "--for=condition=Established", "--timeout=60s", "crd", "--all"])
        .await
        .expect("CRDs established");
    for (kind, name) in [
        ("serviceaccount", "weft-control"),
        ("deployment", "weft-control"),
        ("service", "weft-control"),
        ("poddisruptionbudget", "weft-control"),
        ("role", "weft-control"),
        ("rolebinding", "weft-control"),
    ] {
        k.kubectl(&["get", kind, name, "-n", "weft-system"]).await.unwrap_or_else(|e| panic!("{kind}: {e:#}"));
    }
    for (kind, name) in [
        ("clusterrole", "weft-control"),
        ("clusterrolebinding", "weft-control"),
        ("mutatingwebhookconfiguration", "weft-sidecar-injector"),
    ] {
        k.kubectl(&["get", kind, name]).await.unwrap_or_else(|e| panic!("{kind}: {e:#}"));
    }

    // The ServiceAccount's token and nothing more.
    let token =
        k.create_token("weft-system", "weft-control", weft_testkit::kube::SA_ISSUER, 3600).await.expect("token");
    let kubeconfig = k.kubeconfig_with_token("weft-control", &token).expect("kubeconfig");
    let refused = k.kubectl_as(&kubeconfig, &["get", "secrets", "-A"], None).await.expect_err("no Secrets for weft");
    assert!(refused.to_string().contains("forbidden"), "{refused:#}");

    k.apply(&format!("{SEED}---\n{}", virtual_service("lots"))).await.expect("seed objects");
    let ready = serde_json::json!({ "status": {
        "phase": "Running", "podIP": "10.244.0.7", "podIPs": [{ "ip": "10.244.0.7" }],
        "conditions": [{ "type": "Ready", "status": "True" }],
    }});
    k.kubectl(&["patch", "pod", "reviews-v1-abc", "--subresource=status", "--type=merge", "-p", &ready.to_string()])
        .await
        .expect("the pod is ready, as a kubelet would say");

    let deployment =
        k.kubectl(&["get", "deployment", "weft-control", "-n", "weft-system", "-o", "json"]).await.expect("get");
    let deployment: serde_json::Value = serde_json::from_str(&deployment).expect("JSON");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> =
        container["args"].as_array().expect("args").iter().filter_map(|a| a.as_str().map(String::from)).collect();
    assert!(args.iter().any(|a| a == "--kubernetes"), "the Deployment runs --kubernetes: {args:?}");
    let mounts = Mounts::create();
    let args = local_args(&args, &kubeconfig, &mounts);
    let cp =
        ControlProc::start("weft-control", &args, &[("POD_NAME", POD_NAME), ("POD_NAMESPACE", "weft-system")]).await;

    // It lists every kind it watches.
    let watched = weft_control::kubernetes::WATCHED;
    let listed = eventually(
        "every watched kind listed",
        || async { cp.lines("kubernetes: listed", |_| true) },
        |l| l.len() >= watched.len(),
    )
    .await;
    for w in watched {
        assert!(listed.iter().any(|l| field(l, "kind") == w.kind), "{} not listed:\n{}", w.kind, cp.render());
    }
    // It holds the Lease, in its namespace, under its pod's name.
    cp.wait_line("lease: leadership changed", |l| field(l, "leads") == "true").await;
    let holder = k
        .kubectl(&["get", "lease", "weft-control-leader", "-n", "weft-system", "-o", "jsonpath={.spec.holderIdentity}"])
        .await
        .expect("the Lease");
    assert_eq!(holder, POD_NAME);
    // It writes status, and serves what it read.
    eventually("status written", || vs_message(&k), |m| m.contains("lots")).await;
    let api: std::net::SocketAddr = cp.api.parse().expect("API address");
    let mut req = weft_testkit::http::request(http::Method::GET, "weft", "/api/v1/resources", bytes::Bytes::new())
        .expect("request");
    req.headers_mut().insert(http::header::AUTHORIZATION, format!("Bearer {ADMIN_TOKEN}").parse().expect("header"));
    let body = weft_testkit::http::send_h1(api, req).await.expect("GET resources").body;
    let body = String::from_utf8_lossy(&body);
    for name in ["\"reviews\"", "pod.reviews-v1-abc"] {
        assert!(body.contains(name), "{name} in the store: {body}");
    }
    let all = cp.render();
    assert!(!all.to_lowercase().contains("forbidden"), "nothing is forbidden with the install's RBAC:\n{all}");

    // Least privilege, exercised: without `virtualservices/status` in the ClusterRole, the
    // next status write is refused, and says so.
    let role = k.kubectl(&["get", "clusterrole", "weft-control", "-o", "json"]).await.expect("get clusterrole");
    let mut role: serde_json::Value = serde_json::from_str(&role).expect("JSON");
    let mut removed = false;
    for rule in role["rules"].as_array_mut().expect("rules") {
        if let Some(rs) = rule["resources"].as_array_mut() {
            let before = rs.len();
            rs.retain(|r| r != "virtualservices/status");
            removed |= rs.len() != before;
        }
    }
    assert!(removed, "the generated ClusterRole grants virtualservices/status");
    k.kubectl_stdin(&["replace", "-f", "-"], Some(&role.to_string())).await.expect("replace the ClusterRole");
    eventually("the right is gone", || may_patch_vs_status(&k), |may| !may).await;
    k.apply(&virtual_service("many")).await.expect("apply");
    let line = cp
        .wait_line("kubernetes: status not written", |l| {
            field(l, "kind") == "VirtualService" && l.to_string().contains("forbidden")
        })
        .await;
    assert!(line.to_string().contains("manifests/install/rbac.yaml"), "the log names the fix: {line}");
    assert!(vs_message(&k).await.contains("lots"), "the status is not updated without the right");

    // The generated RBAC re-applied: the pending write goes through on the next change.
    let rbac = install.join("rbac.yaml").display().to_string();
    k.kubectl(&["apply", "--server-side", "--force-conflicts", "-f", &rbac]).await.expect("re-apply RBAC");
    eventually("the right is back", || may_patch_vs_status(&k), |may| *may).await;
    k.apply(&virtual_service("plenty")).await.expect("apply");
    eventually("status written again", || vs_message(&k), |m| m.contains("plenty")).await;
}
