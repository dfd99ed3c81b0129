use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy as EnvoyLbPolicy,
};
use envoy_types::pb::envoy::config::cluster::v3::load_balancing_policy::Policy;
use envoy_types::pb::envoy::config::cluster::v3::{CircuitBreakers, Cluster as XdsCluster, LoadBalancingPolicy};
use envoy_types::pb::envoy::config::core::v3::{HealthStatus, Http2ProtocolOptions, Metadata, TypedExtensionConfig};
use envoy_types::pb::envoy::extensions::load_balancing_policies::{
    least_request::v3::LeastRequest, random::v3::Random, round_robin::v3::RoundRobin,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    explicit_http_config::ProtocolConfig, ExplicitHttpConfig, UpstreamProtocolOptions, UseDownstreamHttpConfig,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::google::protobuf::{value::Kind, Duration as PbDuration, Struct, UInt32Value, Value};
use envoy_types::util::pack_any;

use super::{cla, lb_endpoint};
use crate::cluster::config::HTTP_PROTOCOL_OPTIONS_KEY;
use crate::cluster::{resolve_dns, ClusterConfig, Discovery, LbPolicy, Limits, UpstreamProtocol};

fn eds(name: &str) -> XdsCluster {
    XdsCluster {
        name: name.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        ..Default::default()
    }
}

fn weft_metadata(policy: &str) -> Metadata {
    let fields =
        HashMap::from([("lb_policy".to_string(), Value { kind: Some(Kind::StringValue(policy.to_string())) })]);
    Metadata { filter_metadata: HashMap::from([("weft".to_string(), Struct { fields })]), ..Default::default() }
}

fn with_http_options(mut c: XdsCluster, opts: UpstreamProtocolOptions) -> XdsCluster {
    let any = pack_any(HttpProtocolOptions { upstream_protocol_options: Some(opts), ..Default::default() });
    c.typed_extension_protocol_options.insert(HTTP_PROTOCOL_OPTIONS_KEY.to_string(), any);
    c
}

#[test]
fn defaults_match_envoy() {
    let c = ClusterConfig::compile(&eds("outbound|80||a.ns.svc.cluster.local")).unwrap();
    assert_eq!(c.discovery, Discovery::Eds { service_name: "outbound|80||a.ns.svc.cluster.local".into() });
    // lb_policy 0 with no weft metadata is ROUND_ROBIN, as in Envoy.
    assert_eq!(c.lb, LbPolicy::RoundRobin);
    assert_eq!(c.connect_timeout, Duration::from_secs(5));
    assert_eq!(c.protocol, UpstreamProtocol::Http1);
    assert_eq!(
        c.limits,
        Limits {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None
        }
    );
    assert!(c.static_endpoints.is_none());
}

#[test]
fn eds_service_name_is_taken_when_set() {
    let mut x = eds("c");
    x.eds_cluster_config = Some(EdsClusterConfig { service_name: "svc".into(), ..Default::default() });
    let c = ClusterConfig::compile(&x).unwrap();
    assert_eq!(c.discovery, Discovery::Eds { service_name: "svc".into() });
}

#[test]
fn lb_policy_enum_maps_each_value() {
    for (p, want) in [
        (EnvoyLbPolicy::RoundRobin, LbPolicy::RoundRobin),
        (EnvoyLbPolicy::LeastRequest, LbPolicy::LeastRequest),
        (EnvoyLbPolicy::Random, LbPolicy::Random),
        (EnvoyLbPolicy::RingHash, LbPolicy::RingHash),
        (EnvoyLbPolicy::Maglev, LbPolicy::Maglev),
    ] {
        let mut x = eds("c");
        x.lb_policy = p as i32;
        assert_eq!(ClusterConfig::compile(&x).unwrap().lb, want, "{p:?}");
    }
}

#[test]
fn weft_metadata_selects_peak_ewma_over_lb_policy() {
    let mut x = eds("c");
    x.lb_policy = EnvoyLbPolicy::Random as i32;
    x.metadata = Some(weft_metadata("PEAK_EWMA"));
    assert_eq!(ClusterConfig::compile(&x).unwrap().lb, LbPolicy::PeakEwma);
}

#[test]
fn unknown_weft_policy_is_an_error_naming_the_field() {
    let mut x = eds("c");
    x.metadata = Some(weft_metadata("FASTEST"));
    let e = ClusterConfig::compile(&x).unwrap_err();
    assert_eq!(e.resource, "c");
    assert_eq!(e.field, "metadata.filter_metadata.weft.lb_policy");
}

#[test]
fn load_balancing_policy_extensions_are_understood() {
    let cases = [
        (pack_any(RoundRobin::default()), LbPolicy::RoundRobin),
        (pack_any(LeastRequest::default()), LbPolicy::LeastRequest),
        (pack_any(Random::default()), LbPolicy::Random),
    ];
    for (any, want) in cases {
        let mut x = eds("c");
        x.lb_policy = EnvoyLbPolicy::LoadBalancingPolicyConfig as i32;
        x.load_balancing_policy = Some(LoadBalancingPolicy {
            policies: vec![Policy {
                typed_extension_config: Some(TypedExtensionConfig { name: "p".into(), typed_config: Some(any) }),
            }],
        });
        assert_eq!(ClusterConfig::compile(&x).unwrap().lb, want);
    }
}

#[test]
fn unsupported_only_load_balancing_policy_is_an_error() {
    let mut x = eds("c");
    x.load_balancing_policy = Some(LoadBalancingPolicy {
        policies: vec![Policy {
            typed_extension_config: Some(TypedExtensionConfig {
                name: "p".into(),
                typed_config: Some(pack_any(UInt32Value { value: 1 })),
            }),
        }],
    });
    let e = ClusterConfig::compile(&x).unwrap_err();
    assert_eq!(e.field, "load_balancing_policy.policies");
}

#[test]
fn protocol_options_select_the_upstream_protocol() {
    let h2 = with_http_options(
        eds("c"),
        UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(Default::default())),
        }),
    );
    assert_eq!(ClusterConfig::compile(&h2).unwrap().protocol, UpstreamProtocol::Http2);
    let h1 = with_http_options(
        eds("c"),
        UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(ProtocolConfig::HttpProtocolOptions(Default::default())),
        }),
    );
    assert_eq!(ClusterConfig::compile(&h1).unwrap().protocol, UpstreamProtocol::Http1);
    let down = with_http_options(
        eds("c"),
        UpstreamProtocolOptions::UseDownstreamProtocolConfig(UseDownstreamHttpConfig::default()),
    );
    assert_eq!(ClusterConfig::compile(&down).unwrap().protocol, UpstreamProtocol::UseDownstream);
    let h3 = with_http_options(
        eds("c"),
        UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(ProtocolConfig::Http3ProtocolOptions(Default::default())),
        }),
    );
    let e = ClusterConfig::compile(&h3).unwrap_err();
    assert!(e.field.ends_with("http3_protocol_options"), "{e}");
}

#[test]
#[allow(deprecated)]
fn deprecated_http2_protocol_options_mean_http2() {
    let mut x = eds("c");
    x.http2_protocol_options = Some(Http2ProtocolOptions::default());
    assert_eq!(ClusterConfig::compile(&x).unwrap().protocol, UpstreamProtocol::Http2);
}

#[test]
fn wrong_type_in_protocol_options_is_an_error() {
    let mut x = eds("c");
    x.typed_extension_protocol_options.insert(HTTP_PROTOCOL_OPTIONS_KEY.into(), pack_any(UInt32Value { value: 2 }));
    let e = ClusterConfig::compile(&x).unwrap_err();
    assert!(e.field.starts_with("typed_extension_protocol_options"), "{e}");
}

#[test]
fn timeout_and_circuit_breakers_are_read() {
    let mut x = eds("c");
    x.connect_timeout = Some(PbDuration { seconds: 1, nanos: 500_000_000 });
    x.circuit_breakers = Some(CircuitBreakers {
        thresholds: vec![Thresholds {
            max_connections: Some(UInt32Value { value: 7 }),
            max_requests: Some(UInt32Value { value: 9 }),
            max_retries: Some(UInt32Value { value: 1 }),
            ..Default::default()
        }],
        ..Default::default()
    });
    let c = ClusterConfig::compile(&x).unwrap();
    assert_eq!(c.connect_timeout, Duration::from_millis(1500));
    assert_eq!(c.limits.max_connections, 7);
    assert_eq!(c.limits.max_pending_requests, 1024);
    assert_eq!(c.limits.max_requests, 9);
    assert_eq!(c.limits.max_retries, 1);
}

#[test]
fn retry_budget_is_read_with_envoys_defaults() {
    use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::thresholds::RetryBudget as PbBudget;
    let mut x = eds("c");
    x.circuit_breakers = Some(CircuitBreakers {
        thresholds: vec![Thresholds { retry_budget: Some(PbBudget::default()), ..Default::default() }],
        ..Default::default()
    });
    let b = ClusterConfig::compile(&x).unwrap().limits.retry_budget.unwrap();
    assert_eq!((b.budget_percent, b.min_retry_concurrency), (20.0, 3));
    x.circuit_breakers.as_mut().unwrap().thresholds[0].retry_budget = Some(PbBudget {
        budget_percent: Some(envoy_types::pb::envoy::r#type::v3::Percent { value: 150.0 }),
        ..Default::default()
    });
    let e = ClusterConfig::compile(&x).unwrap_err();
    assert_eq!(e.field, "circuit_breakers.thresholds[0].retry_budget.budget_percent", "{e}");
}

#[test]
fn per_connection_settings_are_read_from_http_protocol_options() {
    use envoy_types::pb::envoy::config::cluster::v3::UpstreamConnectionOptions;
    use envoy_types::pb::envoy::config::core::v3::{HttpProtocolOptions as Common, TcpKeepalive};
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
    let mut x = eds("c");
    let opts = HttpProtocolOptions {
        common_http_protocol_options: Some(Common {
            idle_timeout: Some(PbDuration { seconds: 2, nanos: 0 }),
            max_connection_duration: Some(PbDuration { seconds: 0, nanos: 0 }),
            max_requests_per_connection: Some(UInt32Value { value: 1 }),
            ..Default::default()
        }),
        ..Default::default()
    };
    x.typed_extension_protocol_options.insert(HTTP_PROTOCOL_OPTIONS_KEY.into(), pack_any(opts));
    x.upstream_connection_options = Some(UpstreamConnectionOptions {
        tcp_keepalive: Some(TcpKeepalive {
            keepalive_probes: Some(UInt32Value { value: 4 }),
            keepalive_time: Some(UInt32Value { value: 30 }),
            keepalive_interval: None,
        }),
        ..Default::default()
    });
    let c = ClusterConfig::compile(&x).unwrap().conn;
    assert_eq!(c.idle_timeout, Some(Duration::from_secs(2)));
    assert_eq!(c.max_connection_duration, None, "zero means no limit");
    assert_eq!(c.max_requests_per_connection, Some(1));
    let k = c.keepalive.unwrap();
    assert_eq!((k.probes, k.time, k.interval), (Some(4), Some(Duration::from_secs(30)), None));
}

#[test]
fn negative_connect_timeout_is_an_error() {
    let mut x = eds("c");
    x.connect_timeout = Some(PbDuration { seconds: -1, nanos: 0 });
    assert_eq!(ClusterConfig::compile(&x).unwrap_err().field, "connect_timeout");
}

#[test]
fn static_cluster_with_hostname_is_an_error_naming_the_field() {
    let x = XdsCluster {
        name: "s".into(),
        load_assignment: Some(cla(
            "s",
            vec![(
                0,
                vec![
                    lb_endpoint("10.0.0.1", 80, 1, HealthStatus::Healthy),
                    lb_endpoint("example.com", 80, 1, HealthStatus::Healthy),
                ],
            )],
        )),
        ..Default::default()
    };
    let e = ClusterConfig::compile(&x).unwrap_err();
    assert_eq!(e.resource, "s");
    assert_eq!(e.field, "load_assignment.endpoints[0].lb_endpoints[1].endpoint.address.socket_address.address");
}

#[test]
fn bad_port_is_an_error_naming_the_field() {
    let x = XdsCluster {
        name: "s".into(),
        load_assignment: Some(cla("s", vec![(0, vec![lb_endpoint("10.0.0.1", 70000, 1, HealthStatus::Healthy)])])),
        ..Default::default()
    };
    let e = ClusterConfig::compile(&x).unwrap_err();
    assert_eq!(e.field, "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value");
}

#[test]
fn static_cluster_without_load_assignment_is_an_error() {
    let x = XdsCluster { name: "s".into(), ..Default::default() };
    assert_eq!(ClusterConfig::compile(&x).unwrap_err().field, "load_assignment");
}

#[tokio::test]
async fn strict_dns_resolves_hostnames_once() {
    let x = XdsCluster {
        name: "d".into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32)),
        load_assignment: Some(cla("d", vec![(0, vec![lb_endpoint("localhost", 8080, 3, HealthStatus::Healthy)])])),
        ..Default::default()
    };
    let c = ClusterConfig::compile(&x).unwrap();
    assert_eq!(c.discovery, Discovery::StrictDns);
    let resolved = resolve_dns(&c).await.unwrap().unwrap();
    let cluster =
        crate::cluster::Cluster::new(std::sync::Arc::new(c), Some(&resolved), &crate::cluster::LoadRegistry::new())
            .unwrap();
    assert!(!cluster.endpoints().is_empty());
    for ep in cluster.endpoints() {
        assert!(ep.addr.ip().is_loopback(), "{}", ep.addr);
        assert_eq!(ep.addr.port(), 8080);
        assert_eq!(ep.weight, 3);
    }
}

#[test]
fn original_dst_cluster_picks_nothing() {
    let x = XdsCluster {
        name: "o".into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::OriginalDst as i32)),
        lb_policy: EnvoyLbPolicy::ClusterProvided as i32,
        ..Default::default()
    };
    let c = ClusterConfig::compile(&x).unwrap();
    assert_eq!(c.discovery, Discovery::OriginalDst);
    let cluster =
        crate::cluster::Cluster::new(std::sync::Arc::new(c), None, &crate::cluster::LoadRegistry::new()).unwrap();
    assert!(cluster.pick(&[]).is_none());
}

#[tokio::test]
async fn logical_dns_keeps_one_address_and_unresolved_names_are_refused() {
    let x = XdsCluster {
        name: "l".into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::LogicalDns as i32)),
        load_assignment: Some(cla("l", vec![(0, vec![lb_endpoint("localhost", 80, 1, HealthStatus::Healthy)])])),
        ..Default::default()
    };
    let c = std::sync::Arc::new(ClusterConfig::compile(&x).unwrap());
    let loads = crate::cluster::LoadRegistry::new();
    let e = crate::cluster::Cluster::new(c.clone(), None, &loads).unwrap_err();
    assert!(e.message.contains("resolve_dns"), "{e}");
    let resolved = resolve_dns(&c).await.unwrap().unwrap();
    let cluster = crate::cluster::Cluster::new(c, Some(&resolved), &loads).unwrap();
    assert_eq!(cluster.endpoints().len(), 1);
}

#[test]
fn transport_socket_matches_pick_the_connector_by_endpoint_metadata() {
    use crate::cluster::Connector;
    use envoy_types::pb::envoy::config::cluster::v3::cluster::TransportSocketMatch;
    use envoy_types::pb::envoy::config::core::v3::{transport_socket, TransportSocket};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
    let tls = TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(UpstreamTlsContext {
            sni: "reviews".into(),
            ..Default::default()
        }))),
    };
    let istio = Struct {
        fields: HashMap::from([("tlsMode".to_string(), Value { kind: Some(Kind::StringValue("istio".into())) })]),
    };
    let mut c = eds("c");
    c.transport_socket_matches = vec![
        TransportSocketMatch {
            name: "tlsMode-istio".into(),
            r#match: Some(istio.clone()),
            transport_socket: Some(tls),
        },
        TransportSocketMatch {
            name: "tlsMode-disabled".into(),
            r#match: Some(Struct::default()),
            transport_socket: None,
        },
    ];
    let cfg = ClusterConfig::compile(&c).unwrap();
    let meta = |s: Struct| Metadata {
        filter_metadata: HashMap::from([("envoy.transport_socket_match".to_string(), s)]),
        ..Default::default()
    };
    assert!(matches!(cfg.connector_for(Some(&meta(istio.clone()))), Connector::Tls(_)));
    assert!(matches!(cfg.connector_for(Some(&meta(Struct::default()))), Connector::Plain));
    assert!(matches!(cfg.connector_for(None), Connector::Plain));
    // The choice is recorded on each endpoint when the cluster is built, and the
    // forwarding path's connector is the same one.
    let mut mtls = super::lb_endpoint("10.0.0.1", 80, 1, HealthStatus::Healthy);
    mtls.metadata = Some(meta(istio));
    let plain = super::lb_endpoint("10.0.0.2", 80, 1, HealthStatus::Healthy);
    let cluster = crate::cluster::Cluster::new(
        std::sync::Arc::new(cfg),
        Some(&super::cla("c", vec![(0, vec![mtls, plain])])),
        &crate::cluster::LoadRegistry::new(),
    )
    .unwrap();
    let [a, b] = cluster.endpoints() else { panic!("two endpoints") };
    assert_eq!((a.socket_match, b.socket_match), (Some(0), Some(1)), "the tls match, then the catch-all");
    assert!(matches!(cluster.config.connector_at(a.socket_match), Connector::Tls(_)));
    assert!(matches!(cluster.config.connector_at(b.socket_match), Connector::Plain));
    assert!(matches!(cluster.config.connector_at(None), Connector::Plain));
}

#[test]
fn hash_table_sizes_and_locality_weighting_are_read_and_checked() {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::common_lb_config::{
        LocalityConfigSpecifier, LocalityWeightedLbConfig,
    };
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{
        CommonLbConfig, LbConfig, MaglevLbConfig, RingHashLbConfig,
    };
    use envoy_types::pb::google::protobuf::UInt64Value;
    let c = ClusterConfig::compile(&eds("c")).unwrap();
    assert_eq!((c.hash.min_ring_size, c.hash.maglev_table_size), (1024, 65537));
    assert!(!c.locality_weighted);
    let mut x = eds("c");
    x.lb_policy = EnvoyLbPolicy::Maglev as i32;
    x.lb_config = Some(LbConfig::MaglevLbConfig(MaglevLbConfig { table_size: Some(UInt64Value { value: 251 }) }));
    x.common_lb_config = Some(CommonLbConfig {
        locality_config_specifier: Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(LocalityWeightedLbConfig {})),
        ..Default::default()
    });
    let c = ClusterConfig::compile(&x).unwrap();
    assert_eq!((c.lb, c.hash.maglev_table_size, c.locality_weighted), (LbPolicy::Maglev, 251, true));
    // Envoy wants a prime table size.
    x.lb_config = Some(LbConfig::MaglevLbConfig(MaglevLbConfig { table_size: Some(UInt64Value { value: 1000 }) }));
    let e = ClusterConfig::compile(&x).unwrap_err().to_string();
    assert!(e.contains("maglev_lb_config.table_size") && e.contains("prime"), "{e}");
    let mut x = eds("c");
    x.lb_policy = EnvoyLbPolicy::RingHash as i32;
    x.lb_config = Some(LbConfig::RingHashLbConfig(RingHashLbConfig {
        minimum_ring_size: Some(UInt64Value { value: 4096 }),
        ..Default::default()
    }));
    assert_eq!(ClusterConfig::compile(&x).unwrap().hash.min_ring_size, 4096);
}
