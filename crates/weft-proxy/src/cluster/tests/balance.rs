use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use envoy_types::pb::envoy::config::endpoint::v3::LbEndpoint;

use super::{cla, lb_endpoint};
use crate::cluster::{
    Cluster, ClusterConfig, Discovery, LbPolicy, Limits, LoadRegistry, Outcome, OutlierConfig, UpstreamProtocol,
};

const ALL: [LbPolicy; 6] = [
    LbPolicy::PeakEwma,
    LbPolicy::RoundRobin,
    LbPolicy::Random,
    LbPolicy::LeastRequest,
    LbPolicy::RingHash,
    LbPolicy::Maglev,
];

fn config(lb: LbPolicy) -> Arc<ClusterConfig> {
    Arc::new(ClusterConfig {
        name: "c".into(),
        discovery: Discovery::Eds { service_name: "c".into() },
        lb,
        hash: Default::default(),
        locality_weighted: false,
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
    })
}

fn ep(last: u8, weight: u32, health: HealthStatus) -> LbEndpoint {
    lb_endpoint(&format!("10.0.0.{last}"), 80, weight, health)
}

fn addr(last: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, last], 80))
}

fn cluster(lb: LbPolicy, levels: Vec<(u32, Vec<LbEndpoint>)>, loads: &LoadRegistry) -> Cluster {
    Cluster::new(config(lb), Some(&cla("c", levels)), loads).unwrap()
}

fn counts(c: &Cluster, n: usize, exclude: &[SocketAddr]) -> HashMap<SocketAddr, usize> {
    let mut m = HashMap::new();
    for _ in 0..n {
        let ep = c.pick(exclude).expect("an endpoint");
        *m.entry(ep.addr).or_default() += 1;
    }
    m
}

#[test]
fn round_robin_honours_weights_exactly_per_cycle() {
    let loads = LoadRegistry::new();
    let c = cluster(
        LbPolicy::RoundRobin,
        vec![(
            0,
            vec![ep(1, 1, HealthStatus::Healthy), ep(2, 2, HealthStatus::Healthy), ep(3, 3, HealthStatus::Healthy)],
        )],
        &loads,
    );
    // Any 6 consecutive picks are one full smooth cycle.
    for _ in 0..50 {
        let m = counts(&c, 6, &[]);
        assert_eq!(m[&addr(1)], 1);
        assert_eq!(m[&addr(2)], 2);
        assert_eq!(m[&addr(3)], 3);
    }
}

#[test]
fn round_robin_is_smooth_not_bursty() {
    let loads = LoadRegistry::new();
    let c = cluster(
        LbPolicy::RoundRobin,
        vec![(
            0,
            vec![ep(1, 1, HealthStatus::Healthy), ep(2, 1, HealthStatus::Healthy), ep(3, 4, HealthStatus::Healthy)],
        )],
        &loads,
    );
    let seq: Vec<SocketAddr> = (0..60).map(|_| c.pick(&[]).unwrap().addr).collect();
    // The heavy endpoint never takes more than 3 picks in a row (nginx-style spreading;
    // naive weighted RR would give it 4 in a row every cycle).
    let longest = seq.chunk_by(|a, b| a == b).filter(|run| run[0] == addr(3)).map(<[SocketAddr]>::len).max().unwrap();
    assert!(longest <= 3, "run of {longest} in {seq:?}");
}

#[test]
fn random_honours_weights_statistically() {
    let loads = LoadRegistry::new();
    let c = cluster(
        LbPolicy::Random,
        vec![(0, vec![ep(1, 1, HealthStatus::Healthy), ep(2, 3, HealthStatus::Healthy)])],
        &loads,
    );
    let m = counts(&c, 8000, &[]);
    let ratio = m[&addr(2)] as f64 / m[&addr(1)] as f64;
    assert!((2.4..3.8).contains(&ratio), "ratio {ratio}");
}

#[test]
fn p2c_policies_honour_weights_when_idle() {
    for lb in [LbPolicy::PeakEwma, LbPolicy::LeastRequest] {
        let loads = LoadRegistry::new();
        let c = cluster(lb, vec![(0, vec![ep(1, 1, HealthStatus::Healthy), ep(2, 4, HealthStatus::Healthy)])], &loads);
        let m = counts(&c, 4000, &[]);
        let ratio = m[&addr(2)] as f64 / m[&addr(1)] as f64;
        assert!((2.5..6.0).contains(&ratio), "{lb:?}: ratio {ratio}");
    }
}

#[test]
fn unhealthy_is_never_picked() {
    for lb in ALL {
        let loads = LoadRegistry::new();
        let c = cluster(
            lb,
            vec![(
                0,
                vec![
                    ep(1, 1, HealthStatus::Healthy),
                    ep(2, 100, HealthStatus::Unhealthy),
                    ep(3, 100, HealthStatus::Draining),
                    ep(4, 100, HealthStatus::Timeout),
                    ep(5, 1, HealthStatus::Unknown),
                ],
            )],
            &loads,
        );
        let m = counts(&c, 400, &[]);
        assert_eq!(m.keys().len(), 2, "{lb:?}: {m:?}");
        assert!(m.contains_key(&addr(1)) && m.contains_key(&addr(5)), "{lb:?}: {m:?}");
        // Only unhealthy endpoints left: nothing to pick.
        let none = cluster(lb, vec![(0, vec![ep(2, 1, HealthStatus::Unhealthy)])], &loads);
        assert!(none.pick(&[]).is_none(), "{lb:?}");
    }
}

#[test]
fn degraded_only_when_healthy_endpoints_cannot_take_the_load() {
    for lb in ALL {
        let loads = LoadRegistry::new();
        // 3 of 4 healthy: 1.4 x 75% covers all the load.
        let c = cluster(
            lb,
            vec![(
                0,
                vec![
                    ep(1, 1, HealthStatus::Degraded),
                    ep(2, 1, HealthStatus::Healthy),
                    ep(3, 1, HealthStatus::Healthy),
                    ep(4, 1, HealthStatus::Healthy),
                ],
            )],
            &loads,
        );
        assert_eq!(counts(&c, 200, &[]).get(&addr(1)), None, "{lb:?}");
        let c =
            cluster(lb, vec![(0, vec![ep(1, 1, HealthStatus::Degraded), ep(2, 1, HealthStatus::Unhealthy)])], &loads);
        assert_eq!(counts(&c, 50, &[])[&addr(1)], 50, "{lb:?}");
        // A healthy endpoint at a lower priority still beats a degraded one at priority 0.
        let c = cluster(
            lb,
            vec![(0, vec![ep(1, 1, HealthStatus::Degraded)]), (1, vec![ep(2, 1, HealthStatus::Healthy)])],
            &loads,
        );
        assert_eq!(counts(&c, 50, &[])[&addr(2)], 50, "{lb:?}");
    }
}

#[test]
fn priority_fails_over_only_when_the_first_level_has_no_healthy_endpoint() {
    for lb in ALL {
        let loads = LoadRegistry::new();
        let c = cluster(
            lb,
            vec![(1, vec![ep(2, 1, HealthStatus::Healthy)]), (0, vec![ep(1, 1, HealthStatus::Healthy)])],
            &loads,
        );
        assert_eq!(counts(&c, 50, &[])[&addr(1)], 50, "{lb:?}");
        let c = cluster(
            lb,
            vec![(0, vec![ep(1, 1, HealthStatus::Unhealthy)]), (1, vec![ep(2, 1, HealthStatus::Healthy)])],
            &loads,
        );
        assert_eq!(counts(&c, 50, &[])[&addr(2)], 50, "{lb:?}");
    }
}

#[test]
fn exclude_is_honoured_while_another_host_is_left() {
    for lb in ALL {
        let loads = LoadRegistry::new();
        let c = cluster(
            lb,
            vec![
                (0, vec![ep(1, 10, HealthStatus::Healthy), ep(2, 1, HealthStatus::Healthy)]),
                (1, vec![ep(3, 1, HealthStatus::Healthy)]),
            ],
            &loads,
        );
        let m = counts(&c, 200, &[addr(1)]);
        assert_eq!(m.get(&addr(2)), Some(&200), "{lb:?}: {m:?}");
        // Whole priority 0 excluded: the retry goes to priority 1.
        let m = counts(&c, 50, &[addr(1), addr(2)]);
        assert_eq!(m.get(&addr(3)), Some(&50), "{lb:?}: {m:?}");
        // Everything excluded: reuse a host rather than fail.
        assert!(c.pick(&[addr(1), addr(2), addr(3)]).is_some(), "{lb:?}");
    }
}

#[test]
fn peak_ewma_steers_away_from_a_slow_endpoint() {
    let loads = LoadRegistry::new();
    let c = cluster(
        LbPolicy::PeakEwma,
        vec![(
            0,
            vec![ep(1, 1, HealthStatus::Healthy), ep(2, 1, HealthStatus::Healthy), ep(3, 1, HealthStatus::Healthy)],
        )],
        &loads,
    );
    let slow = c.endpoints().iter().find(|e| e.addr == addr(2)).unwrap();
    slow.load.start().finish(Duration::from_millis(500));
    for e in c.endpoints().iter().filter(|e| e.addr != addr(2)) {
        e.load.start().finish(Duration::from_millis(5));
    }
    // P2C compares two distinct endpoints, and the slow one always loses.
    let m = counts(&c, 300, &[]);
    assert_eq!(m.get(&addr(2)), None, "{m:?}");
    assert!(m[&addr(1)] > 50 && m[&addr(3)] > 50, "{m:?}");
}

/// The forwarding path hands the load its own clock readings: the latency recorded is
/// the one between them, and the request counts in flight until it finishes.
#[test]
fn a_latency_is_measured_between_the_readings_the_caller_gives() {
    let load = std::sync::Arc::new(crate::cluster::EndpointLoad::new());
    let sent = std::time::Instant::now();
    let guard = load.start_at(sent);
    assert_eq!(load.in_flight(), 1);
    let rtt = guard.finish_at(sent + Duration::from_millis(40));
    assert_eq!(rtt, Duration::from_millis(40));
    assert_eq!(load.in_flight(), 0);
    // The first observation replaces the default estimate (then decays over seconds).
    let ewma = load.ewma();
    assert!(ewma >= Duration::from_millis(35) && ewma <= Duration::from_millis(40), "{ewma:?}");
}

#[test]
fn peak_ewma_counts_outstanding_requests() {
    let loads = LoadRegistry::new();
    let c = cluster(
        LbPolicy::PeakEwma,
        vec![(0, vec![ep(1, 1, HealthStatus::Healthy), ep(2, 1, HealthStatus::Healthy)])],
        &loads,
    );
    let busy = c.endpoints()[0].clone();
    let _guards: Vec<_> = (0..4).map(|_| busy.load.start()).collect();
    assert_eq!(busy.load.in_flight(), 4);
    assert_eq!(counts(&c, 100, &[])[&addr(2)], 100);
}

#[test]
fn least_request_prefers_fewer_in_flight() {
    let loads = LoadRegistry::new();
    let c = cluster(
        LbPolicy::LeastRequest,
        vec![(0, vec![ep(1, 1, HealthStatus::Healthy), ep(2, 1, HealthStatus::Healthy)])],
        &loads,
    );
    let busy = c.endpoints()[0].clone();
    let guard = busy.load.start();
    assert_eq!(counts(&c, 100, &[])[&addr(2)], 100);
    // A guard dropped without finish still ends the request.
    drop(guard);
    assert_eq!(busy.load.in_flight(), 0);
    let m = counts(&c, 400, &[]);
    assert!(m[&addr(1)] > 100 && m[&addr(2)] > 100, "{m:?}");
}

#[test]
fn loads_survive_recompile_and_are_pruned_when_unused() {
    let loads = LoadRegistry::new();
    let levels = || vec![(0, vec![ep(1, 1, HealthStatus::Healthy), ep(2, 1, HealthStatus::Healthy)])];
    let old = cluster(LbPolicy::PeakEwma, levels(), &loads);
    let guard = old.endpoints()[0].load.start();
    old.endpoints()[1].load.start().finish(Duration::from_millis(400));
    let new = cluster(LbPolicy::PeakEwma, levels(), &loads);
    drop(old);
    assert_eq!(new.endpoints()[0].load.in_flight(), 1);
    assert!(new.endpoints()[1].load.ewma() > Duration::from_millis(300));
    drop(guard);
    assert_eq!(new.endpoints()[0].load.in_flight(), 0);
    // Another cluster with the same address has its own load.
    let other = Cluster::new(
        Arc::new(ClusterConfig { name: "other".into(), ..(*config(LbPolicy::PeakEwma)).clone() }),
        Some(&cla("other", levels())),
        &loads,
    )
    .unwrap();
    assert!(!Arc::ptr_eq(&other.endpoints()[1].load, &new.endpoints()[1].load));
    drop(other);
    drop(new);
    loads.prune();
    assert!(loads.is_empty());
}

#[test]
fn cluster_request_counter_caps_outstanding_requests_across_snapshots() {
    let loads = LoadRegistry::new();
    let a = cluster(LbPolicy::RoundRobin, vec![(0, vec![ep(1, 1, HealthStatus::Healthy)])], &loads);
    let b = cluster(LbPolicy::RoundRobin, vec![(0, vec![ep(1, 1, HealthStatus::Healthy)])], &loads);
    let p1 = a.load().try_start(2).unwrap();
    let _p2 = b.load().try_start(2).unwrap();
    assert!(a.load().try_start(2).is_none());
    drop(p1);
    assert!(b.load().try_start(2).is_some());
}

fn outlier_cluster(n: u8, panic_threshold: f64, max_ejection_percent: u32, loads: &LoadRegistry) -> Cluster {
    let mut cfg = (*config(LbPolicy::RoundRobin)).clone();
    cfg.outlier = Some(OutlierConfig {
        consecutive_5xx: Some(3),
        consecutive_gateway: None,
        interval: Duration::from_secs(10),
        base_ejection: Duration::from_secs(30),
        max_ejection: Duration::from_secs(300),
        max_ejection_percent,
    });
    cfg.panic_threshold = panic_threshold;
    let cla = cla("c", vec![(0, (1..=n).map(|i| ep(i, 1, HealthStatus::Healthy)).collect())]);
    Cluster::new(Arc::new(cfg), Some(&cla), loads).unwrap()
}

#[test]
fn outlier_detection_ejects_an_endpoint_after_consecutive_5xx_and_stops_picking_it() {
    let loads = LoadRegistry::new();
    let c = outlier_cluster(3, 0.0, 50, &loads);
    let bad = c.endpoints()[0].clone();
    assert!(!c.report(&bad, Outcome::Status(503)));
    assert!(!c.report(&bad, Outcome::LocalFailure));
    assert!(c.report(&bad, Outcome::Status(500)), "third consecutive 5xx ejects");
    assert_eq!(c.ejected(), vec![addr(1)]);
    let seen = counts(&c, 300, &[]);
    assert_eq!(seen.get(&addr(1)), None, "ejected endpoint picked: {seen:?}");
    assert_eq!(seen.len(), 2);
    // The ejection survives a new snapshot of the same cluster (loads are shared).
    let again = outlier_cluster(3, 0.0, 50, &loads);
    assert_eq!(again.ejected(), vec![addr(1)]);
}

#[test]
fn max_ejection_percent_and_panic_threshold_bound_ejections() {
    let loads = LoadRegistry::new();
    let c = outlier_cluster(2, 0.0, 10, &loads);
    let (a, b) = (c.endpoints()[0].clone(), c.endpoints()[1].clone());
    for _ in 0..3 {
        c.report(&a, Outcome::Status(500));
    }
    for _ in 0..3 {
        c.report(&b, Outcome::Status(500));
    }
    // 10% of 2 endpoints: only the first ejection is allowed.
    assert_eq!(c.ejected(), vec![addr(1)]);
    // In panic (1 of 2 available is below 60%), ejections are ignored.
    let loads = LoadRegistry::new();
    let p = outlier_cluster(2, 60.0, 100, &loads);
    for _ in 0..3 {
        p.report(&p.endpoints()[0].clone(), Outcome::Status(502));
    }
    assert_eq!(p.ejected(), vec![addr(1)]);
    assert_eq!(counts(&p, 100, &[]).len(), 2, "panic mode balances across all endpoints");
}
