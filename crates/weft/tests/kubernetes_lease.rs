//! Leader election between two `weft control --kubeconfig` replicas on a real API server
//! (`weft_testkit::kube`): both watch and serve, only the Lease's holder writes status
//! back; kill -9 the holder and the other takes the Lease over and writes the status of
//! a change made while it followed.
//!
//! Skipped (with the reason) only when scripts/setup.sh tried and failed to build the
//! API server.

use std::time::{Duration, Instant};

use kube_control::{eventually, field, ControlProc};
use weft_testkit::kube::KubeApiServer;

#[path = "support/kube_control.rs"]
mod kube_control;

/// Short, so the test runs in seconds: the leader renews every second and steps down
/// after 2 s without a renewal; another replica takes over 4 s after the last renewal
/// it saw.
const LEASE: Duration = Duration::from_secs(4);
const LEASE_NAME: &str = "weft-control-leader";

async fn api_server() -> Option<KubeApiServer> {
    if let Some(why) = weft_testkit::kube::unavailable() {
        eprintln!("SKIPPED: {why}");
        return None;
    }
    let k = KubeApiServer::start().await.expect("kube-apiserver starts");
    let crds = weft_testkit::workspace_root().join("manifests/crds/istio.yaml");
    k.kubectl(&["apply", "-f", &crds.display().to_string()]).await.expect("Istio's CRDs apply");
    k.kubectl(&["wait", "--for=condition=Established", "--timeout=60s", "crd", "-l", "app.kubernetes.io/part-of=weft"])
        .await
        .expect("CRDs established");
    k.kubectl(&["create", "namespace", "weft-system"]).await.expect("the Lease's namespace");
    Some(k)
}

fn replica_args(k: &KubeApiServer, identity: &str) -> Vec<String> {
    [
        "control",
        "--insecure-dev",
        "--xds",
        "127.0.0.1:0",
        "--api",
        "127.0.0.1:0",
        "--kubeconfig",
        &k.kubeconfig.display().to_string(),
        "--leader-elect-lease-duration",
        &format!("{}s", LEASE.as_secs()),
        "--leader-elect-identity",
        identity,
    ]
    .map(String::from)
    .to_vec()
}

async fn holder(k: &KubeApiServer) -> String {
    k.kubectl(&["get", "lease", LEASE_NAME, "-n", "weft-system", "-o", "jsonpath={.spec.holderIdentity}"])
        .await
        .unwrap_or_default()
}

async fn vs_condition(k: &KubeApiServer) -> (String, String) {
    let out = k.kubectl(&["get", "virtualservice", "reviews", "-o", "json"]).await.expect("get vs");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let c = &v["status"]["conditions"][0];
    (c["status"].as_str().unwrap_or_default().to_string(), c["message"].as_str().unwrap_or_default().to_string())
}

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
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
    - destination: {{host: reviews}}
      weight: {weight}
"
    )
}

fn is_reviews_status(l: &serde_json::Value) -> bool {
    field(l, "kind") == "VirtualService" && field(l, "name") == "reviews"
}

#[tokio::test]
async fn only_the_lease_holder_writes_status_and_the_other_replica_takes_over_after_kill_9() {
    let Some(k) = api_server().await else { return };
    let mut a = ControlProc::start("replica-a", &replica_args(&k, "replica-a"), &[]).await;
    a.wait_line("lease: leadership changed", |l| field(l, "leads") == "true").await;
    assert_eq!(holder(&k).await, "replica-a");
    let mut b = ControlProc::start("replica-b", &replica_args(&k, "replica-b"), &[]).await;
    for r in [&a, &b] {
        r.wait_line("kubernetes: listed", |l| field(l, "kind") == "VirtualService").await;
    }

    // An invalid VirtualService: both replicas read it, the leader alone reports it.
    k.apply(&format!("{SERVICE}---\n{}", virtual_service("lots"))).await.expect("apply");
    eventually("the leader's error condition", || vs_condition(&k), |(s, _)| s == "False").await;
    for r in [&a, &b] {
        r.wait_line("kubernetes: rejected", |l| l.to_string().contains("VirtualService default/reviews")).await;
    }
    assert!(!a.lines("kubernetes: status written", is_reviews_status).is_empty(), "{}", a.render());
    assert!(b.lines("kubernetes: status written", |_| true).is_empty(), "a follower writes no status:\n{}", b.render());
    // The follower serves what it watches (xDS, API) all the same.
    let api: std::net::SocketAddr = b.api.parse().expect("API address");
    let resources = weft_testkit::http::get_h1(api, "weft", "/api/v1/resources").await.expect("GET resources");
    assert!(String::from_utf8_lossy(&resources.body).contains("reviews"), "{:?}", resources.body);
    assert_eq!(holder(&k).await, "replica-a", "the Lease stays with its holder while it renews");

    // kill -9 the leader (no release), then fix the VirtualService while nobody leads.
    a.kill9().await;
    let killed = Instant::now();
    k.apply(&virtual_service("100")).await.expect("apply the fix");
    eventually("replica-b holds the Lease", || holder(&k), |h| h == "replica-b").await;
    let took_over = killed.elapsed();
    b.wait_line("lease: leadership changed", |l| field(l, "leads") == "true").await;
    eventually("the new leader's condition", || vs_condition(&k), |(s, _)| s == "True").await;
    let logs = b.logs();
    let led_at =
        logs.iter().position(|l| kube_control::msg(l) == "lease: leadership changed" && field(l, "leads") == "true");
    let wrote_at =
        logs.iter().position(|l| kube_control::msg(l) == "kubernetes: status written" && is_reviews_status(l));
    assert!(
        matches!((led_at, wrote_at), (Some(led), Some(wrote)) if wrote > led),
        "replica-b wrote the status once it led, not before:\n{}",
        b.render()
    );
    // client-go's bound: the lease duration after the last renewal it saw, plus one
    // retry (LEASE / 4) to notice; the rest is slack for a loaded machine.
    eprintln!("takeover {took_over:?} after kill -9 (lease {LEASE:?})");
    assert!(took_over < LEASE * 3, "took {took_over:?} to take over a {LEASE:?} lease");

    // A replica stopped as the kubelet stops it (SIGTERM) releases the Lease on its way out.
    let exit = b.terminate().await;
    assert!(exit.success(), "{exit:?}\n{}", b.render());
    assert_eq!(holder(&k).await, "", "the Lease is released, not left to expire");
}
