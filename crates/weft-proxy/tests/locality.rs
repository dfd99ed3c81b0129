//! Priorities, localities and Maglev seen from outside: a proxy fed over xDS sends real
//! requests to echo servers standing for the endpoints of two zones.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use common::*;
use envoy_types::pb::envoy::config::cluster::v3::cluster::common_lb_config::{
    LocalityConfigSpecifier, LocalityWeightedLbConfig,
};
use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster, OutlierDetection};
use envoy_types::pb::envoy::config::core::v3::{HealthStatus, Locality};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::route::v3::route_action::{hash_policy, HashPolicy};
use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};
use envoy_types::util::pack_any;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::EchoServer;
use weft_xds::build;
use weft_xds::type_url;

/// A locality `zone` at `priority` weighing `weight` with `endpoints`.
fn zone(zone: &str, priority: u32, weight: u32, endpoints: &[(SocketAddr, HealthStatus)]) -> LocalityLbEndpoints {
    LocalityLbEndpoints {
        locality: Some(Locality { region: "r1".into(), zone: zone.into(), ..Default::default() }),
        priority,
        load_balancing_weight: Some(UInt32Value { value: weight }),
        lb_endpoints: endpoints
            .iter()
            .map(|(addr, health)| LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(
                    envoy_types::pb::envoy::config::endpoint::v3::Endpoint {
                        address: Some(build::address(*addr)),
                        ..Default::default()
                    },
                )),
                health_status: *health as i32,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn cla(zones: Vec<LocalityLbEndpoints>) -> ClusterLoadAssignment {
    ClusterLoadAssignment { cluster_name: "svc".into(), endpoints: zones, ..Default::default() }
}

/// A round-robin EDS cluster `svc`.
fn svc_cluster() -> Cluster {
    let mut c = build::eds_cluster("svc", false);
    c.metadata = None;
    c.lb_policy = cluster::LbPolicy::RoundRobin as i32;
    c
}

/// Serves `c` with `assignment` and a listener routing everything to it (with `hash`
/// policies); returns the proxy's listener address.
async fn serve(
    mesh: &Mesh,
    id: &str,
    c: Cluster,
    assignment: ClusterLoadAssignment,
    hash: Vec<HashPolicy>,
) -> (ProxyHandle, SocketAddr) {
    mesh.set(type_url::CLUSTER, vec![pack_any(c)]);
    mesh.set(type_url::ENDPOINT, vec![pack_any(assignment)]);
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    let mut action = to("svc");
    action.hash_policy = hash;
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), action)])]))],
    );
    let proxy = mesh.proxy(id, false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    (proxy, out)
}

/// Sends `n` requests (header `x-user: user`), counting answers per echo server name.
async fn spread(out: SocketAddr, n: usize, user: Option<&str>) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let mut req = weft_testkit::http::request(http::Method::GET, "svc", "/", bytes::Bytes::new()).unwrap();
        if let Some(u) = user {
            req.headers_mut().insert("x-user", u.parse().unwrap());
        }
        let r = weft_testkit::http::send_h1(out, req).await.unwrap();
        let who = r.header("x-echo-server").map_or_else(|| format!("status {}", r.status), str::to_string);
        *seen.entry(who).or_default() += 1;
    }
    seen
}

fn share(seen: &BTreeMap<String, usize>, prefix: &str) -> f64 {
    let total: usize = seen.values().sum();
    seen.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v).sum::<usize>() as f64 / total as f64
}

#[tokio::test]
async fn traffic_fails_over_to_the_next_zone_once_outlier_detection_ejects_the_local_one() {
    let mesh = Mesh::start().await;
    let (a1, a2, b) = (EchoServer::start("a1").await, EchoServer::start("a2").await, EchoServer::start("b").await);
    let mut c = svc_cluster();
    c.outlier_detection = Some(OutlierDetection {
        consecutive_5xx: Some(UInt32Value { value: 1 }),
        base_ejection_time: Some(PbDuration { seconds: 300, nanos: 0 }),
        max_ejection_percent: Some(UInt32Value { value: 100 }),
        ..Default::default()
    });
    let healthy = HealthStatus::Healthy;
    let assignment =
        cla(vec![zone("a", 0, 1, &[(a1.addr, healthy), (a2.addr, healthy)]), zone("b", 1, 1, &[(b.addr, healthy)])]);
    let (_proxy, out) = serve(&mesh, "failover", c, assignment, Vec::new()).await;
    let before = spread(out, 40, None).await;
    assert_eq!(share(&before, "a"), 1.0, "the local zone takes everything while healthy: {before:?}");
    assert_eq!(b.requests(), 0);
    // The local zone's apps stop: each endpoint fails once and is ejected (while one is
    // left, zone a keeps 70% and zone b answers the rest), then zone b takes over.
    drop((a1, a2));
    let mut failed = 0;
    for _ in 0..200 {
        let seen = spread(out, 1, None).await;
        if !seen.contains_key("b") {
            failed += 1;
        }
        if failed == 2 {
            break;
        }
    }
    assert_eq!(failed, 2, "each local endpoint fails once before it is ejected");
    let after = spread(out, 40, None).await;
    assert_eq!(after.get("b"), Some(&40), "after ejection everything fails over: {after:?}");
}

#[tokio::test]
async fn a_half_healthy_local_zone_keeps_70_percent_of_the_traffic() {
    let mesh = Mesh::start().await;
    let (a1, a2, b) = (EchoServer::start("a1").await, EchoServer::start("a2").await, EchoServer::start("b").await);
    // Two more local endpoints that EDS reports unhealthy (never connected to).
    let sick: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let local = [
        (a1.addr, HealthStatus::Healthy),
        (a2.addr, HealthStatus::Healthy),
        (sick, HealthStatus::Unhealthy),
        (SocketAddr::new(sick.ip(), 7), HealthStatus::Unhealthy),
    ];
    let assignment = cla(vec![zone("a", 0, 1, &local), zone("b", 1, 1, &[(b.addr, HealthStatus::Healthy)])]);
    let (_proxy, out) = serve(&mesh, "overprovision", svc_cluster(), assignment, Vec::new()).await;
    let seen = spread(out, 600, None).await;
    // 1.4 x 2/4 = 70% (binomial spread over 600 requests: +-10% is > 5 sigma).
    let a = share(&seen, "a");
    assert!((0.60..=0.80).contains(&a), "local share {a}: {seen:?}");
}

#[tokio::test]
async fn locality_weights_split_traffic_when_the_cluster_is_locality_weighted() {
    let mesh = Mesh::start().await;
    let (a, b) = (EchoServer::start("a").await, EchoServer::start("b").await);
    let mut c = svc_cluster();
    c.common_lb_config = Some(cluster::CommonLbConfig {
        locality_config_specifier: Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(LocalityWeightedLbConfig {})),
        ..Default::default()
    });
    let assignment = cla(vec![
        zone("a", 0, 80, &[(a.addr, HealthStatus::Healthy)]),
        zone("b", 0, 20, &[(b.addr, HealthStatus::Healthy)]),
    ]);
    let (_proxy, out) = serve(&mesh, "distribute", c, assignment, Vec::new()).await;
    let seen = spread(out, 600, None).await;
    let b_share = share(&seen, "b");
    assert!((0.12..=0.28).contains(&b_share), "zone b share {b_share}: {seen:?}");
}

#[tokio::test]
async fn maglev_keeps_users_on_their_endpoint_and_moves_few_when_one_leaves() {
    let mesh = Mesh::start().await;
    let backends = [EchoServer::start("m0").await, EchoServer::start("m1").await, EchoServer::start("m2").await];
    let mut c = svc_cluster();
    c.lb_policy = cluster::LbPolicy::Maglev as i32;
    let all: Vec<(SocketAddr, HealthStatus)> = backends.iter().map(|b| (b.addr, HealthStatus::Healthy)).collect();
    let hash = vec![HashPolicy {
        policy_specifier: Some(hash_policy::PolicySpecifier::Header(hash_policy::Header {
            header_name: "x-user".into(),
            ..Default::default()
        })),
        ..Default::default()
    }];
    let (proxy, out) = serve(&mesh, "maglev", c, cla(vec![zone("a", 0, 1, &all)]), hash).await;
    let mut owner = BTreeMap::new();
    for u in 0..60 {
        let user = format!("user-{u}");
        let seen = spread(out, 3, Some(&user)).await;
        assert_eq!(seen.len(), 1, "{user} moved between endpoints: {seen:?}");
        owner.insert(user, seen.into_keys().next().unwrap());
    }
    assert!(owner.values().collect::<std::collections::BTreeSet<_>>().len() == 3, "{owner:?}");
    // m2 leaves: its users move, the others stay where they were.
    mesh.set(type_url::ENDPOINT, vec![pack_any(cla(vec![zone("a", 0, 1, &all[..2])]))]);
    mesh.synced(&proxy, type_url::ENDPOINT).await;
    let mut moved = 0;
    for (user, was) in owner.iter().filter(|(_, w)| *w != "m2") {
        let now = spread(out, 1, Some(user)).await.into_keys().next().unwrap();
        if &now != was {
            moved += 1;
        }
    }
    assert!(moved <= 3, "{moved} users of the remaining endpoints moved");
}
