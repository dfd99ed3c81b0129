use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::config::route::v3::{
    route_action::ClusterSpecifier, route_match::PathSpecifier, weighted_cluster::ClusterWeight, RouteMatch,
    WeightedCluster,
};
use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};

use super::*;

fn field_of(cfg: RouteConfiguration) -> String {
    let err = RouteTable::compile(&cfg).unwrap_err();
    assert_eq!(err.resource, "rc");
    assert!(!err.message.is_empty());
    err.field
}

#[test]
fn bad_regex_names_the_regex_field() {
    let bad = RouteMatch {
        path_specifier: Some(PathSpecifier::SafeRegex(RegexMatcher {
            regex: "(unclosed".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let cfg = rc(vec![vhost("a", &["a"], vec![route("ok", prefix("/"))]), vhost("b", &["b"], vec![route("bad", bad)])]);
    assert_eq!(field_of(cfg), "virtual_hosts[1].routes[0].match.safe_regex.regex");
}

#[test]
fn weights_summing_to_zero_or_empty_clusters_are_rejected() {
    let with = |clusters: Vec<ClusterWeight>| {
        let mut ra = forward("x");
        ra.cluster_specifier =
            Some(ClusterSpecifier::WeightedClusters(WeightedCluster { clusters, ..Default::default() }));
        rc(vec![vhost("v", &["*"], vec![route_with("w", prefix("/"), ra)])])
    };
    let zero = ClusterWeight { name: "a".into(), weight: Some(UInt32Value { value: 0 }), ..Default::default() };
    assert_eq!(field_of(with(vec![zero])), "virtual_hosts[0].routes[0].route.weighted_clusters.clusters");
    assert_eq!(field_of(with(vec![])), "virtual_hosts[0].routes[0].route.weighted_clusters.clusters");
    let unnamed = ClusterWeight { weight: Some(UInt32Value { value: 1 }), ..Default::default() };
    assert_eq!(field_of(with(vec![unnamed])), "virtual_hosts[0].routes[0].route.weighted_clusters.clusters[0].name");
    let header = ClusterWeight {
        name: "a".into(),
        cluster_header: "x-c".into(),
        weight: Some(UInt32Value { value: 1 }),
        ..Default::default()
    };
    assert_eq!(
        field_of(with(vec![header])),
        "virtual_hosts[0].routes[0].route.weighted_clusters.clusters[0].cluster_header"
    );
    let empty = rc(vec![vhost("v", &["*"], vec![route("", prefix("/"))])]);
    assert_eq!(field_of(empty), "virtual_hosts[0].routes[0].route.cluster");
}

#[test]
fn unsupported_fields_are_rejected_by_name() {
    let mut vh = vhost("v", &["*"], vec![route("a", prefix("/"))]);
    vh.require_tls = 7;
    assert_eq!(field_of(rc(vec![vh])), "virtual_hosts[0].require_tls");

    let mut ra = forward("a");
    ra.cluster_specifier = Some(ClusterSpecifier::ClusterHeader("x-cluster".into()));
    assert_eq!(
        field_of(rc(vec![vhost("v", &["*"], vec![route_with("a", prefix("/"), ra)])])),
        "virtual_hosts[0].routes[0].route.cluster_header"
    );

    let mut r = route("a", prefix("/"));
    r.typed_per_filter_config.insert("envoy.filters.http.lua".into(), Default::default());
    assert_eq!(
        field_of(rc(vec![vhost("v", &["*"], vec![r])])),
        "virtual_hosts[0].routes[0].typed_per_filter_config[envoy.filters.http.lua]"
    );

    let mut m = prefix("/");
    m.tls_context = Some(Default::default());
    assert_eq!(
        field_of(rc(vec![vhost("v", &["*"], vec![route("a", m)])])),
        "virtual_hosts[0].routes[0].match.tls_context"
    );

    let cfg = RouteConfiguration { vhost_header: "x-host".into(), ..rc(vec![]) };
    assert_eq!(field_of(cfg), "vhost_header");
}

#[test]
fn duplicate_domains_and_missing_pieces_are_rejected() {
    let cfg = rc(vec![vhost("a", &["x.com", "*"], vec![]), vhost("b", &["X.com"], vec![])]);
    assert_eq!(field_of(cfg), "virtual_hosts[1].domains[0]");
    assert_eq!(field_of(rc(vec![vhost("a", &[], vec![])])), "virtual_hosts[0].domains");
    let no_path = RouteMatch { case_sensitive: Some(BoolValue { value: true }), ..Default::default() };
    assert_eq!(
        field_of(rc(vec![vhost("a", &["*"], vec![route("r", no_path)])])),
        "virtual_hosts[0].routes[0].match.path_specifier"
    );
    let sep =
        RouteMatch { path_specifier: Some(PathSpecifier::PathSeparatedPrefix("/a/".into())), ..Default::default() };
    assert_eq!(
        field_of(rc(vec![vhost("a", &["*"], vec![route("r", sep)])])),
        "virtual_hosts[0].routes[0].match.path_separated_prefix"
    );
}

#[test]
fn header_edits_of_pseudo_headers_host_or_format_commands_are_rejected() {
    let opt = |k: &str, v: &str| HeaderValueOption {
        header: Some(HeaderValue { key: k.into(), value: v.into(), ..Default::default() }),
        ..Default::default()
    };
    let with = |o: HeaderValueOption| {
        let mut r = route("a", prefix("/"));
        r.request_headers_to_add = vec![opt("x-ok", "1"), o];
        rc(vec![vhost("v", &["*"], vec![r])])
    };
    assert_eq!(field_of(with(opt(":path", "/x"))), "virtual_hosts[0].routes[0].request_headers_to_add[1].header.key");
    assert_eq!(field_of(with(opt("Host", "x"))), "virtual_hosts[0].routes[0].request_headers_to_add[1].header.key");
    assert_eq!(
        field_of(with(opt("x-ip", "%DOWNSTREAM_REMOTE_ADDRESS%"))),
        "virtual_hosts[0].routes[0].request_headers_to_add[1].header.value"
    );
    let mut both = opt("x-a", "1");
    both.append = Some(BoolValue { value: true });
    both.append_action = 1;
    assert_eq!(field_of(with(both)), "virtual_hosts[0].routes[0].request_headers_to_add[1].append");
    let cfg = RouteConfiguration { response_headers_to_remove: vec![":status".into()], ..rc(vec![]) };
    assert_eq!(field_of(cfg), "response_headers_to_remove[0]");
}

/// Found by `fuzz_xds`: a huge `retry_back_off.base_interval` without `max_interval`
/// overflowed `base * 10` and panicked; durations past protobuf's range are now refused
/// with the field, and the default cap saturates.
#[test]
fn huge_retry_back_off_is_refused_or_capped_never_a_panic() {
    use envoy_types::pb::envoy::config::route::v3::{retry_policy::RetryBackOff, RetryPolicy};
    use envoy_types::pb::google::protobuf::Duration;
    let with = |seconds: i64| {
        let mut ra = forward("x");
        ra.retry_policy = Some(RetryPolicy {
            retry_back_off: Some(RetryBackOff {
                base_interval: Some(Duration { seconds, nanos: 0 }),
                max_interval: None,
            }),
            ..Default::default()
        });
        rc(vec![vhost("v", &["*"], vec![route_with("r", prefix("/"), ra)])])
    };
    assert_eq!(field_of(with(i64::MAX)), "virtual_hosts[0].routes[0].route.retry_policy.retry_back_off.base_interval");
    assert!(RouteTable::compile(&with(315_576_000_000)).is_ok(), "the largest protobuf duration is fine");
}
