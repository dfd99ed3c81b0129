//! Property tests (fuzzing on stable, bounded to run in `cargo test`) of what the proxy
//! does with xDS resources: arbitrary bytes, byte-mutated valid Listeners, Clusters,
//! RouteConfigurations, ClusterLoadAssignments and VirtualHosts, and valid protos with
//! arbitrary field values, all through the config store's decode-and-compile path
//! (`ResourceHandler::apply`). A bad resource is an error (a NACK), never a panic.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use envoy_types::pb::envoy::config::cluster::v3::{circuit_breakers, CircuitBreakers, Cluster, OutlierDetection};
use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use envoy_types::pb::envoy::config::route::v3::{
    retry_policy::RetryBackOff, route_match, RetryPolicy, Route, RouteConfiguration,
};
use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
use envoy_types::pb::google::protobuf::{Any, Duration, UInt32Value};
use envoy_types::util::pack_any;
use proptest::prelude::*;
use weft_proxy::config::ProxyStore;
use weft_xds::{build, type_url, ResourceHandler, ResourceUpdate};

const TYPES: [&str; 5] =
    [type_url::LISTENER, type_url::CLUSTER, type_url::ROUTE, type_url::ENDPOINT, type_url::VIRTUAL_HOST];

fn config() -> ProptestConfig {
    // `PROPTEST_CASES` raises the count for a longer local run.
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// Valid resources of each type, packed.
fn seeds() -> Vec<Any> {
    let addr = "127.0.0.1:8080".parse().unwrap();
    let regex = route(
        "re",
        envoy_types::pb::envoy::config::route::v3::RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::SafeRegex(RegexMatcher {
                regex: "/api/v[0-9]+/.*".into(),
                ..Default::default()
            })),
            headers: vec![exact_header("x-user", "jason")],
            ..Default::default()
        },
        weighted(&[("a", 80), ("b", 20)]),
    );
    let routes = rc("routes", vec![vhost("all", &["*", "a.test"], vec![regex, route("r", prefix("/"), to("a"))])]);
    vec![
        http_out(&["websocket"]),
        pack_any(build::tcp_listener("tcp", addr, "a")),
        pack_any(build::eds_cluster("a", true)),
        pack_any(build::static_cluster("s", &[addr], false)),
        pack_any(routes),
        pack_any(build::cla("a", &[(addr, 3, HealthStatus::Healthy), (addr, 0, HealthStatus::Unhealthy)])),
        pack_any(vhost("routes/v", &["v.test"], vec![route("r", prefix("/"), to("a"))])),
    ]
}

/// Feeds one resource to fresh stores (SotW and on demand) as every type it could be
/// taken for; returns whether any accepted it. Panics propagate (they are the bug).
fn feed(any: &Any) -> bool {
    let mut accepted = false;
    for store in [ProxyStore::new(), ProxyStore::with_on_demand(true)] {
        for t in TYPES {
            let any = Any { type_url: t.to_string(), value: any.value.clone() };
            let name = weft_xds::type_url::resource_name(t, &any).unwrap_or_else(|_| "x".into());
            let update =
                ResourceUpdate { version: "1".into(), upserts: vec![(name.clone(), any)], ..ResourceUpdate::default() };
            accepted |= store.apply(t, update).is_ok();
            // Removing what was (or was not) installed is fine too.
            let removal = ResourceUpdate { version: "2".into(), removals: vec![name], ..ResourceUpdate::default() };
            let _ = store.apply(t, removal);
        }
    }
    accepted
}

#[derive(Debug, Clone)]
enum Edit {
    Flip(prop::sample::Index, u8),
    Insert(prop::sample::Index, Vec<u8>),
    Delete(prop::sample::Index, usize),
    Truncate(prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        (any::<prop::sample::Index>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Edit::Insert(i, b)),
        (any::<prop::sample::Index>(), 1usize..8).prop_map(|(i, n)| Edit::Delete(i, n)),
        any::<prop::sample::Index>().prop_map(Edit::Truncate),
    ]
}

fn mutate(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        if bytes.is_empty() {
            break;
        }
        match e {
            Edit::Flip(i, b) => {
                let i = i.index(bytes.len());
                bytes[i] ^= b;
            }
            Edit::Insert(i, b) => {
                let i = i.index(bytes.len());
                bytes.splice(i..i, b.iter().copied());
            }
            Edit::Delete(i, n) => {
                let i = i.index(bytes.len());
                let end = (i + n).min(bytes.len());
                bytes.drain(i..end);
            }
            Edit::Truncate(i) => bytes.truncate(i.index(bytes.len())),
        }
    }
    bytes
}

fn duration() -> impl Strategy<Value = Option<Duration>> {
    prop_oneof![
        Just(None),
        (any::<i64>(), any::<i32>()).prop_map(|(seconds, nanos)| Some(Duration { seconds, nanos })),
        (0i64..100_000, 0i32..1_000_000_000).prop_map(|(seconds, nanos)| Some(Duration { seconds, nanos })),
    ]
}

fn u32_value() -> impl Strategy<Value = Option<UInt32Value>> {
    proptest::option::of(any::<u32>().prop_map(|value| UInt32Value { value }))
}

prop_compose! {
    fn odd_cluster()(
        connect_timeout in duration(),
        lb_policy in any::<i32>(),
        interval in duration(),
        base_ejection_time in duration(),
        max_ejection_time in duration(),
        consecutive_5xx in u32_value(),
        max_ejection_percent in u32_value(),
        max_requests in u32_value(),
        max_connections in u32_value(),
        with_outlier in any::<bool>(),
    ) -> Cluster {
        let mut c = build::eds_cluster("a", false);
        c.connect_timeout = connect_timeout;
        c.lb_policy = lb_policy;
        if lb_policy % 2 == 0 {
            c.metadata = None;
        }
        if with_outlier {
            c.outlier_detection = Some(OutlierDetection {
                interval, base_ejection_time, max_ejection_time, consecutive_5xx, max_ejection_percent,
                ..Default::default()
            });
        }
        c.circuit_breakers = Some(CircuitBreakers {
            thresholds: vec![circuit_breakers::Thresholds { max_requests, max_connections, ..Default::default() }],
            ..Default::default()
        });
        c
    }
}

prop_compose! {
    fn odd_routes()(
        regex in "\\PC{0,24}",
        path in "\\PC{0,16}",
        domains in proptest::collection::vec("\\PC{0,12}", 0..4),
        weights in proptest::collection::vec(any::<u32>(), 0..4),
        timeout in duration(),
        per_try_timeout in duration(),
        base_interval in duration(),
        max_interval in duration(),
        num_retries in u32_value(),
        retry_on in "[a-z0-9,\\-]{0,30}",
    ) -> RouteConfiguration {
        let re = route(
            "re",
            envoy_types::pb::envoy::config::route::v3::RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::SafeRegex(RegexMatcher { regex, ..Default::default() })),
                ..Default::default()
            },
            to("a"),
        );
        let parts: Vec<(String, u32)> = weights.iter().enumerate().map(|(i, w)| (format!("c{i}"), *w)).collect();
        let refs: Vec<(&str, u32)> = parts.iter().map(|(n, w)| (n.as_str(), *w)).collect();
        let mut action = if refs.is_empty() { to("a") } else { weighted(&refs) };
        action.timeout = timeout;
        action.retry_policy = Some(RetryPolicy {
            retry_on,
            num_retries,
            per_try_timeout,
            retry_back_off: Some(RetryBackOff { base_interval, max_interval }),
            ..Default::default()
        });
        let main = Route { ..route("main", prefix(&path), action) };
        let domains: Vec<&str> = domains.iter().map(String::as_str).collect();
        rc("routes", vec![vhost("v", &domains, vec![re, main])])
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_as_any_resource_type_are_refused_or_compiled_never_a_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        feed(&Any { type_url: String::new(), value: bytes });
    }

    #[test]
    fn byte_mutated_valid_resources_are_refused_or_compiled_never_a_panic(
        seed in any::<prop::sample::Index>(),
        edits in proptest::collection::vec(edit(), 1..6),
    ) {
        let seeds = seeds();
        let s = &seeds[seed.index(seeds.len())];
        feed(&Any { type_url: s.type_url.clone(), value: mutate(s.value.clone(), &edits) });
    }

    #[test]
    fn clusters_with_arbitrary_field_values_are_refused_or_compiled_never_a_panic(c in odd_cluster()) {
        feed(&pack_any(c));
    }

    #[test]
    fn routes_with_arbitrary_field_values_are_refused_or_compiled_never_a_panic(r in odd_routes()) {
        feed(&pack_any(r));
    }
}

#[test]
fn the_seeds_themselves_are_accepted() {
    for s in seeds() {
        assert!(feed(&s), "seed {} refused", s.type_url);
    }
}
