//! Priorities with Envoy's overprovisioning factor, locality weights, failover on
//! ejection, and Maglev.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HealthStatus, Locality};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, LbEndpoint, LocalityLbEndpoints};
use envoy_types::pb::google::protobuf::UInt32Value;

use super::lb_endpoint;
use crate::cluster::{
    Cluster, ClusterConfig, Discovery, LbPolicy, Limits, LoadRegistry, Outcome, OutlierConfig, UpstreamProtocol,
};

fn config(lb: LbPolicy, locality_weighted: bool) -> ClusterConfig {
    ClusterConfig {
        name: "c".into(),
        discovery: Discovery::Eds { service_name: "c".into() },
        lb,
        hash: Default::default(),
        locality_weighted,
        connect_timeout: Duration::from_secs(1),
        protocol: UpstreamProtocol::Http1,
        limits: Limits::default(),
        conn: Default::default(),
        static_endpoints: None,
        metadata: None,
        services: Vec::new(),
        external: false,
        transport: Default::default(),
        socket_matches: Vec::new(),
        outlier: None,
        panic_threshold: 50.0,
    }
}

fn ep(last: u8, health: HealthStatus) -> LbEndpoint {
    lb_endpoint(&format!("10.0.0.{last}"), 80, 1, health)
}

fn addr(last: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, last], 80))
}

/// A locality `zone` at `priority` weighing `weight`.
fn locality(zone: &str, priority: u32, weight: u32, lb_endpoints: Vec<LbEndpoint>) -> LocalityLbEndpoints {
    LocalityLbEndpoints {
        locality: Some(Locality { region: "r".into(), zone: zone.into(), ..Default::default() }),
        priority,
        load_balancing_weight: Some(UInt32Value { value: weight }),
        lb_endpoints,
        ..Default::default()
    }
}

fn build(cfg: ClusterConfig, localities: Vec<LocalityLbEndpoints>, loads: &LoadRegistry) -> Cluster {
    let cla = ClusterLoadAssignment { cluster_name: "c".into(), endpoints: localities, ..Default::default() };
    Cluster::new(Arc::new(cfg), Some(&cla), loads).unwrap()
}

fn share(c: &Cluster, n: usize, which: impl Fn(SocketAddr) -> bool) -> f64 {
    let hits = (0..n).filter(|_| which(c.pick(&[]).expect("an endpoint").addr)).count();
    hits as f64 / n as f64
}

#[test]
fn a_half_healthy_priority_keeps_70_percent_with_overprovisioning() {
    let loads = LoadRegistry::new();
    let local = vec![
        ep(1, HealthStatus::Healthy),
        ep(2, HealthStatus::Healthy),
        ep(3, HealthStatus::Unhealthy),
        ep(4, HealthStatus::Unhealthy),
    ];
    let c = build(
        config(LbPolicy::Random, false),
        vec![locality("a", 0, 1, local), locality("b", 1, 1, vec![ep(5, HealthStatus::Healthy)])],
        &loads,
    );
    // 2 of 4 healthy: 1.4 x 50% = 70% stays at priority 0, 30% spills to priority 1.
    let p0 = share(&c, 20_000, |a| a == addr(1) || a == addr(2));
    assert!((0.66..0.74).contains(&p0), "priority 0 took {p0}");
    // 3 of 4 healthy: 1.4 x 75% > 100%, nothing spills.
    let local = vec![
        ep(1, HealthStatus::Healthy),
        ep(2, HealthStatus::Healthy),
        ep(3, HealthStatus::Healthy),
        ep(4, HealthStatus::Unhealthy),
    ];
    let c = build(
        config(LbPolicy::Random, false),
        vec![locality("a", 0, 1, local), locality("b", 1, 1, vec![ep(5, HealthStatus::Healthy)])],
        &loads,
    );
    assert_eq!(share(&c, 2_000, |a| a == addr(5)), 0.0);
}

#[test]
fn ejected_endpoints_count_as_unhealthy_and_a_fully_ejected_zone_fails_over() {
    let loads = LoadRegistry::new();
    let mut cfg = config(LbPolicy::RoundRobin, false);
    cfg.outlier = Some(OutlierConfig {
        consecutive_5xx: Some(1),
        consecutive_gateway: None,
        interval: Duration::from_secs(10),
        base_ejection: Duration::from_secs(30),
        max_ejection: Duration::from_secs(300),
        max_ejection_percent: 100,
    });
    let c = build(
        cfg,
        vec![
            locality("a", 0, 1, vec![ep(1, HealthStatus::Healthy), ep(2, HealthStatus::Healthy)]),
            locality("b", 1, 1, vec![ep(3, HealthStatus::Healthy)]),
        ],
        &loads,
    );
    assert_eq!(share(&c, 500, |a| a == addr(3)), 0.0, "zone b idle while zone a is healthy");
    assert!(c.report(&c.endpoints()[0].clone(), Outcome::Status(503)));
    // One of two ejected: zone a keeps 70%.
    let b = share(&c, 20_000, |a| a == addr(3));
    assert!((0.26..0.34).contains(&b), "zone b took {b}");
    assert!(c.report(&c.endpoints()[1].clone(), Outcome::Status(503)));
    // Zone a all ejected: everything fails over (no panic: zone b can take it all,
    // though only 1 of 3 endpoints is left).
    assert_eq!(share(&c, 500, |a| a == addr(3)), 1.0);
}

#[test]
fn locality_weights_split_a_priority_when_the_cluster_asks() {
    let loads = LoadRegistry::new();
    let zones = || {
        vec![
            locality("a", 0, 80, vec![ep(1, HealthStatus::Healthy), ep(2, HealthStatus::Healthy)]),
            locality("b", 0, 20, vec![ep(3, HealthStatus::Healthy)]),
        ]
    };
    let c = build(config(LbPolicy::RoundRobin, true), zones(), &loads);
    let b = share(&c, 20_000, |a| a == addr(3));
    assert!((0.17..0.23).contains(&b), "zone b took {b}");
    // Without locality_weighted_lb_config the weights are ignored: 1 of 3 endpoints.
    let c = build(config(LbPolicy::RoundRobin, false), zones(), &loads);
    let b = share(&c, 3_000, |a| a == addr(3));
    assert!((0.30..0.37).contains(&b), "zone b took {b}");
    // Half of zone a down: its weight counts 1.4 x 50% = 70%, 56 against 20.
    let c = build(
        config(LbPolicy::RoundRobin, true),
        vec![
            locality("a", 0, 80, vec![ep(1, HealthStatus::Healthy), ep(2, HealthStatus::Unhealthy)]),
            locality("b", 0, 20, vec![ep(3, HealthStatus::Healthy)]),
        ],
        &loads,
    );
    let b = share(&c, 20_000, |a| a == addr(3));
    assert!((0.23..0.29).contains(&b), "zone b took {b} (expected 20/76)");
}

fn maglev(endpoints: &[u8], table_size: u64) -> Cluster {
    let mut cfg = config(LbPolicy::Maglev, false);
    cfg.hash.maglev_table_size = table_size;
    let eps = endpoints.iter().map(|&i| ep(i, HealthStatus::Healthy)).collect();
    build(cfg, vec![locality("a", 0, 1, eps)], &LoadRegistry::new())
}

fn owners(c: &Cluster, keys: u64) -> HashMap<u64, SocketAddr> {
    (0..keys)
        .map(|k| {
            let h = crate::hash::stable_hash(format!("user-{k}").as_bytes());
            (k, c.pick_hashed(&[], Some(h)).expect("an endpoint").addr)
        })
        .collect()
}

#[test]
fn maglev_keeps_keys_and_moves_few_when_an_endpoint_leaves() {
    let before = maglev(&[1, 2, 3, 4, 5], 65537);
    let first = owners(&before, 5000);
    assert_eq!(first, owners(&before, 5000), "same key, same endpoint");
    // Every endpoint owns a fair share of the keys.
    for i in 1..=5 {
        let n = first.values().filter(|a| **a == addr(i)).count();
        assert!((800..1200).contains(&n), "10.0.0.{i} owns {n} of 5000 keys");
    }
    let after = owners(&maglev(&[1, 2, 3, 4], 65537), 5000);
    let kept = first.iter().filter(|(_, a)| **a != addr(5)).collect::<Vec<_>>();
    let moved = kept.iter().filter(|(k, a)| after[*k] != **a).count();
    // Maglev's minimal disruption: only a few keys of the endpoints that stayed move.
    assert!(moved * 100 < kept.len() * 5, "{moved} of {} keys moved", kept.len());
}

#[test]
fn maglev_honours_a_small_table_size() {
    let c = maglev(&[1, 2, 3], 7);
    let seen: std::collections::BTreeSet<SocketAddr> = owners(&c, 200).into_values().collect();
    assert_eq!(seen.len(), 3);
}

#[test]
fn an_ejected_locality_loses_its_weight() {
    let loads = LoadRegistry::new();
    let mut cfg = config(LbPolicy::RoundRobin, true);
    cfg.outlier = Some(OutlierConfig {
        consecutive_5xx: Some(1),
        consecutive_gateway: None,
        interval: Duration::from_secs(10),
        base_ejection: Duration::from_secs(30),
        max_ejection: Duration::from_secs(300),
        max_ejection_percent: 100,
    });
    let c = build(
        cfg,
        vec![
            locality("a", 0, 80, vec![ep(1, HealthStatus::Healthy)]),
            locality("b", 0, 20, vec![ep(2, HealthStatus::Healthy)]),
        ],
        &loads,
    );
    assert!(share(&c, 2_000, |a| a == addr(1)) > 0.7);
    assert!(c.report(&c.endpoints()[0].clone(), Outcome::Status(500)));
    assert_eq!(share(&c, 500, |a| a == addr(2)), 1.0);
}
