//! Control-plane replicas sharing a real etcd (`ControlPlane::start_replica`, in process):
//! one CA and one token key for all, resources applied through one visible in all (a bad
//! one rejected alone with file, line and field), exactly one leader, CA rotation on the
//! leader only and picked up by the others, a new leader once the old one is gone; a
//! proxy registered through one replica seen by the others until that replica's lease
//! expires (it died and the proxy did not reconnect elsewhere).

#![allow(clippy::unwrap_used)]

mod common;

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

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: reviews\nspec:\n  selector: {app: reviews}\n  ports:\n  - name: http\n    port: 9080\n";
const BAD_VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: broken\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination:\n        hots: reviews\n";

async fn replica(etcd: &EtcdCluster, data: &std::path::Path) -> ControlPlane {
    let mut store = EtcdConfig::parse(&etcd.store_url()).unwrap();
    store.lease_ttl = Duration::from_secs(2);
    let cfg = ControlConfig {
        dir: None,
        xds: "127.0.0.1:0".parse().unwrap(),
        api: "127.0.0.1:0".parse().unwrap(),
        mode: ProxyMode::Explicit,
        mesh: MeshConfig::default(),
        identity: Some(IdentityConfig {
            // Every replica checks the same admin token (as a Deployment mounting one
            // Secret would).
            api: weft_control::api_auth::ApiAuthConfig { token_file: Some(admin_token_file()), read_anonymous: false },
            // The simulated proxies here carry no credential (`--xds-allow-anonymous`):
            // what is tested is sharing, not admission (`--test trust`).
            allow_anonymous_xds: true,
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

/// The admin token file the replicas share, written once per test process.
fn admin_token_file() -> std::path::PathBuf {
    static FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("weft-replicas-admin-{}", std::process::id()));
        std::fs::write(&path, ADMIN_TOKEN).unwrap();
        path
    })
    .clone()
}

const ADMIN_TOKEN: &str = "replicas-test-admin-token";

async fn post(api: std::net::SocketAddr, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut req = request(Method::POST, "weft", path, Bytes::from(body.to_string())).unwrap();
    req.headers_mut().insert(http::header::AUTHORIZATION, format!("Bearer {ADMIN_TOKEN}").parse().unwrap());
    let reply = send_h1(api, req).await.unwrap();
    (reply.status.as_u16(), reply.json().unwrap())
}

async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn replicas_share_resources_ca_and_tokens_and_elect_one_leader() {
    let etcd = EtcdCluster::start(1).await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = replica(&etcd, da.path()).await;
    let b = replica(&etcd, db.path()).await;

    // One CA, one token key: a token minted by A is good at B.
    let (ca, cb) = (a.identity.clone().unwrap(), b.identity.clone().unwrap());
    assert_eq!(ca.ca().trust_bundle(), cb.ca().trust_bundle(), "the replicas sign with different roots");
    let token = ca.tokens().create("default", "reviews", Duration::from_secs(600)).unwrap();
    assert_eq!(cb.tokens().verify(&token.token).unwrap().service_account, "reviews");

    // Applied through A: the good resource reaches B, the bad one is refused alone.
    let (status, v) = post(a.api_addr, "/api/v1/apply?source=mesh.yaml", &format!("{SERVICE}---\n{BAD_VS}")).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["accepted"].as_array().unwrap().len(), 1, "{v}");
    let error = v["errors"][0].as_str().unwrap();
    assert!(error.contains("mesh.yaml:") && error.contains("hots"), "{error}");
    eventually("B to hold the Service", || b.store.snapshot().resources.iter().any(|r| r.meta.name == "reviews")).await;
    assert!(b.store.snapshot().resources.iter().all(|r| r.meta.name != "broken"));

    // A revocation through B is honoured by A.
    let (status, _) = post(b.api_addr, &format!("/api/v1/tokens/{}/revoke", token.id), "").await;
    assert_eq!(status, 200);
    eventually("A to refuse the revoked token", || ca.tokens().verify(&token.token).is_err()).await;

    // Exactly one leader; only it rotates the CA, and the other follows.
    eventually("a leader", || a.leader.leads() || b.leader.leads()).await;
    assert!(!(a.leader.leads() && b.leader.leads()), "two leaders");
    let a_leads = a.leader.leads();
    let (leader, follower) = if a_leads { (a.api_addr, b.api_addr) } else { (b.api_addr, a.api_addr) };
    let follower_ca = if a_leads { cb.clone() } else { ca.clone() };
    let (status, v) = post(follower, "/api/v1/ca/rotate?step=begin", "").await;
    assert_eq!(status, 409, "{v}");
    let (status, v) = post(leader, "/api/v1/ca/rotate?step=begin", "").await;
    assert_eq!(status, 200, "{v}");
    eventually("the follower to trust the next root too", || follower_ca.ca().trust_bundle().len() == 2).await;

    // The leader goes away: the other takes over once its lease expires.
    let mut follower_leads = if a_leads { b.leader.is_leader() } else { a.leader.is_leader() };
    if a_leads {
        a.shutdown().await;
    } else {
        b.shutdown().await;
    }
    tokio::time::timeout(WAIT, follower_leads.wait_for(|l| *l)).await.expect("no new leader").unwrap();
}

#[tokio::test]
async fn a_dead_replicas_registrations_vanish_when_its_lease_expires() {
    let etcd = EtcdCluster::start(1).await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = replica(&etcd, da.path()).await;
    let b = replica(&etcd, db.path()).await;
    // A proxy that knows replica A only.
    let info = common::node("reviews-1", "default", &[("app", "reviews")], &["10.0.0.1"]);
    let client = common::Client::start(a.xds_addr, info.clone());
    eventually("B to see the proxy registered through A", || {
        b.registry.snapshot().get(&info.id).is_some_and(|w| w.source == weft_control::registry::WorkloadSource::Replica)
    })
    .await;
    // A dies without a goodbye (its tasks stop; its lease is not revoked) and the proxy,
    // which cannot reach it, never registers elsewhere: gone from B within the lease TTL.
    a.shutdown().await;
    eventually("the registration to vanish with A's lease", || b.registry.snapshot().get(&info.id).is_none()).await;
    client.stop().await.ok();
}

async fn get(api: std::net::SocketAddr, path: &str) -> serde_json::Value {
    let mut req = request(Method::GET, "weft", path, Bytes::new()).unwrap();
    req.headers_mut().insert(http::header::AUTHORIZATION, format!("Bearer {ADMIN_TOKEN}").parse().unwrap());
    let reply = send_h1(api, req).await.unwrap();
    assert_eq!(reply.status.as_u16(), 200, "{path}");
    reply.json().unwrap()
}

/// The entry of proxy `name` in a `/api/v1/proxies` answer.
fn entry<'a>(list: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    list["proxies"].as_array().and_then(|ps| ps.iter().find(|p| p["name"] == name))
}

#[tokio::test]
async fn proxy_status_through_any_replica_lists_every_proxy_with_its_replica_and_sync_state() {
    let etcd = EtcdCluster::start(1).await;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = replica(&etcd, dirs[0].path()).await;
    let b = replica(&etcd, dirs[1].path()).await;
    let c = replica(&etcd, dirs[2].path()).await;
    let (status, v) = post(a.api_addr, "/api/v1/apply?source=mesh.yaml", SERVICE).await;
    assert_eq!(status, 200, "{v}");
    // One proxy on A only, one on B only; C serves none.
    let on_a =
        common::Client::start(a.xds_addr, common::node("reviews-1", "default", &[("app", "reviews")], &["10.0.0.1"]));
    let on_b = common::Client::start(
        b.xds_addr,
        common::node("productpage-1", "default", &[("app", "productpage")], &["10.0.0.2"]),
    );
    let synced = |p: &serde_json::Value| {
        ["Cluster", "Listener"]
            .iter()
            .all(|t| p["types"][*t]["status"] == "SYNCED" && p["types"][*t]["acked"].is_string())
    };
    // Through C: both, each with the replica it is connected to and its sync state.
    let deadline = tokio::time::Instant::now() + WAIT;
    let list = loop {
        let list = get(c.api_addr, "/api/v1/proxies").await;
        let ready = |name: &str, xds: std::net::SocketAddr| {
            entry(&list, name).is_some_and(|p| p["replica"]["xds"] == xds.to_string() && synced(p))
        };
        if ready("reviews-1", a.xds_addr) && ready("productpage-1", b.xds_addr) {
            break list;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "C does not list both proxies SYNCED with their replicas: {list}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(list["proxies"].as_array().unwrap().len(), 2, "{list}");
    let age = entry(&list, "reviews-1").unwrap()["types"]["Cluster"]["config_age_seconds"].as_f64();
    assert!(age.is_some_and(|a| (0.0..60.0).contains(&a)), "the age of A's proxy's config: {list}");
    // Through A: its own proxy (live) and B's.
    let from_a = get(a.api_addr, "/api/v1/proxies").await;
    assert_eq!(entry(&from_a, "reviews-1").unwrap()["replica"]["xds"], a.xds_addr.to_string(), "{from_a}");
    assert_eq!(entry(&from_a, "productpage-1").unwrap()["replica"]["xds"], b.xds_addr.to_string(), "{from_a}");
    // A change of every proxy's clusters: C lists A's proxy with the state A lists live
    // (the new version ACKed, SYNCED), not the one before the change.
    let clusters_before = entry(&from_a, "reviews-1").unwrap()["types"]["Cluster"]["acked"].clone();
    let (status, v) =
        post(a.api_addr, "/api/v1/apply?source=ratings.yaml", &SERVICE.replace("reviews", "ratings")).await;
    assert_eq!(status, 200, "{v}");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let live = get(a.api_addr, "/api/v1/proxies").await;
        let published = get(c.api_addr, "/api/v1/proxies").await;
        let cluster = |list: &serde_json::Value| {
            let t = &entry(list, "reviews-1").unwrap()["types"]["Cluster"];
            (t["status"].clone(), t["acked"].clone(), t["current"].clone())
        };
        let (status, acked, _) = cluster(&live);
        if status == "SYNCED" && acked != clusters_before && cluster(&published) == cluster(&live) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "C does not list A's proxy as A does after the change: {live} / {published}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A proxy that leaves is no longer listed anywhere.
    on_b.stop().await.ok();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let list = get(c.api_addr, "/api/v1/proxies").await;
        if entry(&list, "productpage-1").is_none() && entry(&list, "reviews-1").is_some() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the departed proxy is still listed: {list}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A replica that dies takes its proxies' states with its lease.
    a.shutdown().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let list = get(c.api_addr, "/api/v1/proxies").await;
        if entry(&list, "reviews-1").is_none() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "a dead replica's proxy is still listed: {list}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    on_a.stop().await.ok();
    drop(b);
}
