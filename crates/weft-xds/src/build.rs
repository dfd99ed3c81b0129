//! Builders for the xDS resources weft produces most: listeners with an HTTP connection
//! manager or TCP proxy, EDS/static clusters and endpoint assignments. Used by the
//! control plane's translator, the demo, and tests; Envoy accepts everything built here.

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source, socket_address, Address, AggregatedConfigSource, ConfigSource, HealthStatus,
    Http2ProtocolOptions, Metadata, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, Listener};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::http::cors::v3::Cors;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{RouteSpecifier, UpgradeConfig},
    http_filter, HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{http_protocol_options, HttpProtocolOptions};
use envoy_types::pb::google::protobuf::{value, Any, Duration, Struct, UInt32Value, Value};
use envoy_types::util::pack_any;

/// Where an HTTP listener gets its routes.
#[derive(Debug, Clone)]
pub enum Routes {
    /// Over RDS, by name.
    Rds(String),
    /// Inline.
    Inline(Box<RouteConfiguration>),
}

/// An Envoy socket address.
pub fn address(addr: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(addr.port()))),
            ..Default::default()
        })),
    }
}

/// A config source pointing at the ADS stream (also used for SDS secrets).
pub fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: 2, // V3
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

/// An HTTP connection manager with the given routes, optional listener-level fault
/// filter, and the router. `upgrades` lists allowed upgrade types (`websocket`, `CONNECT`).
pub fn http_connection_manager(
    stat_prefix: &str,
    routes: Routes,
    fault: Option<HttpFault>,
    upgrades: &[&str],
) -> HttpConnectionManager {
    // The CORS and fault filters are always installed, in Istio's order, so routes can
    // enable them through typed_per_filter_config; without a per-route policy neither
    // does anything.
    let http_filters = vec![
        http_filter("envoy.filters.http.cors", pack_any(Cors::default())),
        http_filter("envoy.filters.http.fault", pack_any(fault.unwrap_or_default())),
        http_filter("envoy.filters.http.router", pack_any(Router::default())),
    ];
    HttpConnectionManager {
        stat_prefix: stat_prefix.into(),
        http_filters,
        route_specifier: Some(match routes {
            Routes::Rds(name) => RouteSpecifier::Rds(Rds { route_config_name: name, config_source: Some(ads()) }),
            Routes::Inline(rc) => RouteSpecifier::RouteConfig(*rc),
        }),
        upgrade_configs: upgrades
            .iter()
            .map(|u| UpgradeConfig { upgrade_type: (*u).into(), ..Default::default() })
            .collect(),
        ..Default::default()
    }
}

/// An HTTP filter with its typed config.
fn http_filter(name: &str, config: Any) -> HttpFilter {
    HttpFilter {
        name: name.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    }
}

/// A listener bound to `addr` serving HTTP.
pub fn http_listener(name: &str, addr: SocketAddr, hcm: HttpConnectionManager) -> Listener {
    one_filter_listener(name, addr, "envoy.filters.network.http_connection_manager", pack_any(hcm))
}

/// A listener bound to `addr` proxying TCP to `cluster`.
pub fn tcp_listener(name: &str, addr: SocketAddr, cluster: &str) -> Listener {
    let tp = TcpProxy {
        stat_prefix: name.into(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    };
    one_filter_listener(name, addr, "envoy.filters.network.tcp_proxy", pack_any(tp))
}

/// A listener bound to `addr` with one filter chain holding one network filter.
fn one_filter_listener(name: &str, addr: SocketAddr, filter_name: &str, config: Any) -> Listener {
    Listener {
        name: name.into(),
        address: Some(address(addr)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: filter_name.into(),
                config_type: Some(filter::ConfigType::TypedConfig(config)),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// An EDS cluster fed over ADS. `http2` makes upstream connections HTTP/2 (h2c).
/// Carries weft's default balancer (P2C over peak-EWMA) in its metadata.
pub fn eds_cluster(name: &str, http2: bool) -> Cluster {
    let mut c = Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(cluster::EdsClusterConfig { eds_config: Some(ads()), service_name: String::new() }),
        connect_timeout: Some(Duration { seconds: 1, nanos: 0 }),
        metadata: Some(weft_lb_metadata("PEAK_EWMA")),
        ..Default::default()
    };
    if http2 {
        set_http2(&mut c);
    }
    c
}

/// A STATIC cluster with the given endpoints.
pub fn static_cluster(name: &str, endpoints: &[SocketAddr], http2: bool) -> Cluster {
    let mut c = Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Static as i32)),
        load_assignment: Some(cla(name, &endpoints.iter().map(|a| (*a, 1, HealthStatus::Healthy)).collect::<Vec<_>>())),
        connect_timeout: Some(Duration { seconds: 1, nanos: 0 }),
        metadata: Some(weft_lb_metadata("PEAK_EWMA")),
        ..Default::default()
    };
    if http2 {
        set_http2(&mut c);
    }
    c
}

fn set_http2(c: &mut Cluster) {
    let opts = HttpProtocolOptions {
        upstream_protocol_options: Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
            http_protocol_options::ExplicitHttpConfig {
                protocol_config: Some(
                    http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                        Http2ProtocolOptions::default(),
                    ),
                ),
            },
        )),
        ..Default::default()
    };
    c.typed_extension_protocol_options
        .insert("envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(), pack_any(opts));
}

/// `filter_metadata["weft"].lb_policy = policy`.
pub fn weft_lb_metadata(policy: &str) -> Metadata {
    let mut fields = std::collections::HashMap::new();
    fields.insert("lb_policy".to_string(), Value { kind: Some(value::Kind::StringValue(policy.into())) });
    let mut m = Metadata::default();
    m.filter_metadata.insert("weft".into(), Struct { fields: fields.into_iter().collect() });
    m
}

/// A ClusterLoadAssignment: endpoints with weights and health.
pub fn cla(name: &str, endpoints: &[(SocketAddr, u32, HealthStatus)]) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: endpoints
                .iter()
                .map(|(a, w, h)| LbEndpoint {
                    health_status: *h as i32,
                    load_balancing_weight: Some(UInt32Value { value: *w }),
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(address(*a)),
                        ..Default::default()
                    })),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}
