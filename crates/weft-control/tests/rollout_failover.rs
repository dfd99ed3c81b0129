//! Rollout state in etcd (`--store etcd://`): two replicas, the rollout moved to its
//! second step through the leader; the follower's API shows that step; the leader dies
//! mid-rollout and the other replica, once elected, resumes at that step (its next
//! promote goes to step 3, its routing says 3/4) instead of starting over.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use weft_control::control::{ControlConfig, ControlPlane};
use weft_control::etcd::EtcdConfig;
use weft_control::identity::IdentityConfig;
use weft_control::translate::{MeshConfig, ProxyMode};
use weft_testkit::etcd::EtcdCluster;
use weft_testkit::http::{request, send_h1};

const WAIT: Duration = Duration::from_secs(30);
const ADMIN_TOKEN: &str = "rollout-failover-admin-token";

async fn replica(etcd: &EtcdCluster, data: &Path, token_file: &Path) -> ControlPlane {
    let store = EtcdConfig { lease_ttl: Duration::from_secs(2), ..EtcdConfig::parse(&etcd.store_url()).unwrap() };
    let cfg = ControlConfig {
        dir: None,
        xds: "127.0.0.1:0".parse().unwrap(),
        api: "127.0.0.1:0".parse().unwrap(),
        mode: ProxyMode::Explicit,
        mesh: MeshConfig::default(),
        identity: Some(IdentityConfig {
            api: weft_control::api_auth::ApiAuthConfig {
                token_file: Some(token_file.to_path_buf()),
                read_anonymous: false,
            },
            ..IdentityConfig::new(data)
        }),
        inject: Default::default(),
        webhook: None,
        registry: None,
        stats: Default::default(),
        slo: Default::default(),
    };
    ControlPlane::start_replica(cfg, store).await.unwrap()
}

async fn call(cp: &ControlPlane, method: Method, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut req = request(method, "weft", path, Bytes::from(body.to_string())).unwrap();
    req.headers_mut().insert(http::header::AUTHORIZATION, format!("Bearer {ADMIN_TOKEN}").parse().unwrap());
    let r = send_h1(cp.api_addr, req).await.unwrap();
    (r.status.as_u16(), serde_json::from_slice(&r.body).unwrap_or_default())
}

/// Waits until `cp` reports the rollout at `step` (1-based).
async fn wait_step(cp: &ControlPlane, step: u64, what: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, v) = call(cp, Method::GET, "/api/v1/rollouts/default/reviews", "").await;
        if code == 200 && v["step"].as_u64() == Some(step) && v["phase"] == "Progressing" {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {code} {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The step note of the rollout's VirtualService in `cp`'s store.
fn routed_step(cp: &ControlPlane) -> Option<String> {
    cp.store
        .snapshot()
        .resources
        .iter()
        .find(|r| r.kind == weft_api::Kind::VirtualService && r.meta.name == "reviews")
        .and_then(|r| r.meta.annotations.get("weft.dev/rollout-step").cloned())
}

fn repo(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)).unwrap()
}

#[tokio::test]
async fn a_new_leader_resumes_a_rollout_at_its_step() {
    let etcd = EtcdCluster::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin-token");
    std::fs::write(&token, ADMIN_TOKEN).unwrap();
    let a = replica(&etcd, &dir.path().join("a"), &token).await;
    let b = replica(&etcd, &dir.path().join("b"), &token).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(a.leader.leads() || b.leader.leads()) {
        assert!(tokio::time::Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (leader, follower) = if a.leader.leads() { (a, b) } else { (b, a) };

    let text = format!(
        "{}\n---\n{}",
        repo("samples/bookinfo/networking/destination-rule-all.yaml"),
        repo("samples/rollouts/reviews-rollout.yaml")
    );
    let (code, v) = call(&leader, Method::POST, "/api/v1/apply", &text).await;
    assert_eq!(code, 200, "{v}");
    wait_step(&leader, 1, "the leader starts the rollout").await;
    let (code, v) = call(&leader, Method::POST, "/api/v1/rollouts/default/reviews/promote", "").await;
    assert_eq!((code, v["step"].as_u64()), (200, Some(2)), "{v}");
    // The follower's API shows the leader's progress.
    let seen = wait_step(&follower, 2, "the follower sees step 2").await;
    assert_eq!(seen["traffic"], "20% of requests to v3", "{seen}");

    // The leader dies mid-rollout; the follower is elected once its lease expires.
    let mut elected = follower.leader.is_leader();
    leader.shutdown().await;
    tokio::time::timeout(WAIT, elected.wait_for(|l| *l)).await.expect("no new leader").unwrap();

    // It resumes at step 2 (its controller keeps the routing of step 2) ...
    let deadline = tokio::time::Instant::now() + WAIT;
    while routed_step(&follower).as_deref() != Some("2/4") {
        assert!(tokio::time::Instant::now() < deadline, "routing: {:?}", routed_step(&follower));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_step(&follower, 2, "the new leader is at step 2").await;
    // ... and goes on from there.
    let (code, v) = call(&follower, Method::POST, "/api/v1/rollouts/default/reviews/promote", "").await;
    assert_eq!((code, v["step"].as_u64()), (200, Some(3)), "{v}");
    let deadline = tokio::time::Instant::now() + WAIT;
    while routed_step(&follower).as_deref() != Some("3/4") {
        assert!(tokio::time::Instant::now() < deadline, "routing: {:?}", routed_step(&follower));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    follower.shutdown().await;
}
