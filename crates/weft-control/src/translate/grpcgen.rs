//! Proxyless gRPC: the xDS that gRPC's own xDS client consumes (gRFC A27 and later),
//! as Istio's `grpcgen` generator builds it, from the same translation sidecars get.
//!
//! A gRPC client dialing `xds:///echo.default.svc.cluster.local:7070` (or a short form,
//! `echo:7070`, `echo.default:7070`) subscribes to the Listener of that name. It gets:
//!
//! - LDS: one Listener per service name and port whose `api_listener` holds an
//!   HttpConnectionManager with RDS `outbound|PORT||FQDN` and the fault and router
//!   filters (Istio's `supportedFilters`);
//! - RDS: `outbound|PORT||FQDN`, the sidecar's virtual host of that service and port
//!   (VirtualService matches, weights, retries, fault injection, hash policies), with
//!   what gRPC reads in place of what it does not: the route timeout as
//!   `max_stream_duration` (gRFC A31), retry conditions restricted to the gRPC status
//!   codes gRPC retries on (A44), header mutations, rewrites, mirrors and CORS dropped;
//! - CDS: the sidecar's EDS clusters as plain EDS clusters over ADS, `ROUND_ROBIN` or
//!   `RING_HASH` (A42; any other simple policy falls back to round robin, as in Istio),
//!   `max_requests` circuit breaking (`http2MaxRequests`, A32), and, when the
//!   DestinationRule asks for `ISTIO_MUTUAL`, an UpstreamTlsContext naming the
//!   bootstrap's `default` certificate provider instance for the certificate and the
//!   `ROOTCA` one for the roots, with the destination's SPIFFE ids as SAN matchers
//!   (A29); like Istio, mTLS is never automatic for gRPC clients, and outlier detection
//!   is not sent (gRPC implements only success-rate and failure-percentage ejection,
//!   which Istio's API does not set; Istio's generator drops it too);
//! - EDS: the sidecar's ClusterLoadAssignments, each locality present and weighted
//!   (gRPC refuses an entry without locality and ignores one without weight).
//!
//! The control plane recognises a gRPC client by its node ([`is_grpc`]); a client whose
//! bootstrap lacks Istio's `NAMESPACE` metadata gets its namespace from an Istio-style
//! node id (`sidecar~IP~NAME.NS~NS.svc.cluster.local`), as [`node_info`] reads it.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3::{circuit_breakers, cluster, CircuitBreakers, Cluster};
use envoy_types::pb::envoy::config::core::v3::{transport_socket, Node, TransportSocket};
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    route, route_action, weighted_cluster, RetryPolicy, Route, RouteAction, RouteConfiguration, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, http_filter, HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context, CertificateProviderPluginInstance, CertificateValidationContext, CommonTlsContext,
    UpstreamTlsContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher, StringMatcher};
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::util::pack_any;
use weft_api::spec::ClientTlsMode;
use weft_xds::{build, NodeInfo};

use super::clusters::{effective, outbound_name};
use super::model::MeshView;
use super::routes::FAULT_FILTER;
use super::{ProxyMode, ProxyXds};
use crate::registry::RegistrySnapshot;

/// Node metadata key Istio's agent sets to pick the gRPC generator.
pub const GENERATOR: &str = "GENERATOR";
/// The certificate provider instance (bootstrap `certificate_providers`) named for the
/// workload certificate and the roots, as Istio names it.
pub const PROVIDER_INSTANCE: &str = "default";
/// The certificate name asking a provider for the roots.
pub const ROOT_CERT_NAME: &str = "ROOTCA";
/// The router filter's name.
const ROUTER_FILTER: &str = "envoy.filters.http.router";
/// The only transport socket name gRPC accepts on a cluster.
const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
/// The gRPC status codes gRPC's retry policy takes from `retry_on` (gRFC A44); every
/// other condition is ignored by gRPC, so it is not sent.
const GRPC_RETRY_ON: [&str; 5] = ["cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"];

/// Whether `node` is a proxyless gRPC client: Istio's `GENERATOR: grpc` metadata, or a
/// gRPC user agent (`gRPC C-core ...` for C++, Python, Ruby..., `grpc-java`, `gRPC Go`).
pub fn is_grpc(node: &Node) -> bool {
    let generator = node.metadata.as_ref().and_then(|m| m.fields.get(GENERATOR)).and_then(|v| match &v.kind {
        Some(Kind::StringValue(s)) => Some(s.as_str()),
        _ => None,
    });
    generator == Some("grpc") || node.user_agent_name.to_ascii_lowercase().starts_with("grpc")
}

/// What kind of xDS client `node` is, as `weft proxy-status` shows it: `grpc`
/// (proxyless gRPC), `gateway` (node id `router~`), `envoy` (a stock Envoy sidecar) or
/// `sidecar` (weft's proxy).
pub fn client_kind(node: &Node) -> &'static str {
    if is_grpc(node) {
        "grpc"
    } else if node.id.starts_with(weft_xds::node::ROUTER_PREFIX) {
        "gateway"
    } else if super::peer_exchange::is_envoy(&node.user_agent_name) {
        "envoy"
    } else {
        "sidecar"
    }
}

/// The identity of a gRPC client: its Istio metadata when it has `NAME` and
/// `NAMESPACE`, else what an Istio node id (`sidecar~IP~NAME.NS~NS.svc.DOMAIN`) says,
/// else a client of namespace `default`.
pub fn node_info(node: &Node) -> NodeInfo {
    if let Ok(info) = NodeInfo::from_node(node) {
        return info;
    }
    let parts: Vec<&str> = node.id.split('~').collect();
    let (name, namespace) = match parts.as_slice() {
        [_, _, pod, domain] => {
            let ns = domain.split('.').next().filter(|s| !s.is_empty());
            let name = pod.split('.').next().filter(|s| !s.is_empty());
            (name.unwrap_or(&node.id).to_string(), ns.unwrap_or("default").to_string())
        }
        _ => (node.id.clone(), "default".to_string()),
    };
    NodeInfo { id: node.id.clone(), name, namespace, ..NodeInfo::default() }
}

/// The xDS for the gRPC client `node`: what the sidecar translation of the same node
/// has, reshaped as described in the module documentation.
pub fn translate(mesh: &super::MeshConfig, registry: &RegistrySnapshot, node: &NodeInfo, mode: ProxyMode) -> ProxyXds {
    let sidecar_node = NodeInfo { on_demand: false, ..node.clone() };
    let sidecar = super::translate(mesh, registry, &sidecar_node, mode);
    let view = MeshView::new(mesh, registry, &sidecar_node);
    let mut out = ProxyXds::default();
    let ns = view.namespace().to_string();
    for svc in &view.services {
        let names = svc.names(&ns);
        for port in &svc.ports {
            let rds = outbound_name(port.number, "", &svc.host);
            for name in &names {
                out.listeners.push(api_listener(&format!("{name}:{}", port.number), port.number, &rds));
            }
            let domains = names.iter().flat_map(|n| [n.clone(), format!("{n}:{}", port.number)]).collect();
            let routes = sidecar
                .route(&port.number.to_string())
                .and_then(|rc| rc.virtual_hosts.iter().find(|vh| vh.name == format!("{}:{}", svc.host, port.number)))
                .map(|vh| vh.routes.iter().map(grpc_route).collect())
                .unwrap_or_else(|| vec![default_route(&rds)]);
            out.routes.push(RouteConfiguration {
                name: rds.clone(),
                virtual_hosts: vec![VirtualHost {
                    name: format!("{}:{}", svc.host, port.number),
                    domains,
                    routes,
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
    }
    for c in sidecar.clusters.iter().filter(|c| c.name.starts_with("outbound|") && c.eds_cluster_config.is_some()) {
        let Some(cla) = sidecar.endpoints_of(&c.name) else { continue };
        out.clusters.push(grpc_cluster(&view, c, mode));
        let mut cla = cla.clone();
        for locality in &mut cla.endpoints {
            // gRPC refuses a locality entry without `locality`, and ignores one without
            // weight.
            locality.locality.get_or_insert_with(Default::default);
            if locality.load_balancing_weight.as_ref().is_none_or(|w| w.value == 0) {
                let sum: u32 = locality
                    .lb_endpoints
                    .iter()
                    .map(|e| e.load_balancing_weight.as_ref().map_or(1, |w| w.value.max(1)))
                    .fold(0, u32::saturating_add);
                locality.load_balancing_weight = Some(envoy_types::pb::google::protobuf::UInt32Value { value: sum });
            }
        }
        out.endpoints.push(cla);
    }
    out.listeners.sort_by(|a, b| a.name.cmp(&b.name));
    out.listeners.dedup_by(|a, b| a.name == b.name);
    out.routes.sort_by(|a, b| a.name.cmp(&b.name));
    out.clusters.sort_by(|a, b| a.name.cmp(&b.name));
    out.endpoints.sort_by(|a, b| a.cluster_name.cmp(&b.cluster_name));
    out
}

/// A Listener named `name` whose `api_listener` routes over RDS `rds`.
fn api_listener(name: &str, port: u32, rds: &str) -> Listener {
    let filter = |name: &str, config| HttpFilter {
        name: name.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    };
    let hcm = HttpConnectionManager {
        stat_prefix: name.into(),
        http_filters: vec![
            filter(FAULT_FILTER, pack_any(HttpFault::default())),
            filter(ROUTER_FILTER, pack_any(Router::default())),
        ],
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            route_config_name: rds.into(),
            config_source: Some(build::ads()),
        })),
        ..Default::default()
    };
    let port = u16::try_from(port).unwrap_or(0);
    Listener {
        name: name.into(),
        address: Some(build::address(SocketAddr::from(([0, 0, 0, 0], port)))),
        api_listener: Some(ApiListener { api_listener: Some(pack_any(hcm)) }),
        ..Default::default()
    }
}

/// The route of a service without HTTP routes of its own (a TCP port): everything to
/// the service's cluster.
fn default_route(cluster: &str) -> Route {
    Route {
        name: "default".into(),
        r#match: Some(envoy_types::pb::envoy::config::route::v3::RouteMatch {
            path_specifier: Some(envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier::Prefix(
                "/".into(),
            )),
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// A sidecar route as gRPC reads it.
fn grpc_route(r: &Route) -> Route {
    let action = r.action.clone().map(|a| match a {
        route::Action::Route(ra) => route::Action::Route(grpc_action(ra)),
        other => other,
    });
    Route {
        name: r.name.clone(),
        r#match: r.r#match.clone(),
        action,
        // Only the fault filter's per-route configuration: gRPC refuses configurations
        // of filters it does not have.
        typed_per_filter_config: r
            .typed_per_filter_config
            .iter()
            .filter(|(k, _)| *k == FAULT_FILTER)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        ..Default::default()
    }
}

/// A sidecar route action as gRPC reads it: clusters or weights, hash policy (headers
/// only: gRPC has no cookies, query parameters or source IPs), the timeout as
/// `max_stream_duration`, the retry policy's gRPC codes.
fn grpc_action(a: RouteAction) -> RouteAction {
    let cluster_specifier = a.cluster_specifier.map(|s| match s {
        route_action::ClusterSpecifier::WeightedClusters(w) => route_action::ClusterSpecifier::WeightedClusters(
            envoy_types::pb::envoy::config::route::v3::WeightedCluster {
                clusters: w
                    .clusters
                    .into_iter()
                    .map(|c| weighted_cluster::ClusterWeight { name: c.name, weight: c.weight, ..Default::default() })
                    .collect(),
                ..Default::default()
            },
        ),
        other => other,
    });
    let hash_policy = a
        .hash_policy
        .into_iter()
        .filter(|h| matches!(h.policy_specifier, Some(route_action::hash_policy::PolicySpecifier::Header(_))))
        .collect();
    let max_stream_duration = a
        .timeout
        .filter(|t| t.seconds > 0 || t.nanos > 0)
        .map(|t| route_action::MaxStreamDuration { max_stream_duration: Some(t), ..Default::default() });
    RouteAction {
        cluster_specifier,
        hash_policy,
        max_stream_duration,
        retry_policy: a.retry_policy.and_then(grpc_retry),
        ..Default::default()
    }
}

/// The retry policy with only the conditions gRPC retries on; `None` without any.
fn grpc_retry(p: RetryPolicy) -> Option<RetryPolicy> {
    let on: Vec<&str> = p.retry_on.split(',').map(str::trim).filter(|c| GRPC_RETRY_ON.contains(c)).collect();
    if on.is_empty() || p.num_retries.as_ref().is_some_and(|n| n.value == 0) {
        return None;
    }
    let back_off = p.retry_back_off.filter(|b| b.base_interval.as_ref().is_some_and(|d| d.seconds > 0 || d.nanos > 0));
    Some(RetryPolicy {
        retry_on: on.join(","),
        num_retries: p.num_retries,
        retry_back_off: back_off,
        ..Default::default()
    })
}

/// A sidecar EDS cluster as gRPC reads it.
fn grpc_cluster(view: &MeshView<'_>, c: &Cluster, mode: ProxyMode) -> Cluster {
    let ring_hash =
        c.lb_policy == cluster::LbPolicy::RingHash as i32 || c.lb_policy == cluster::LbPolicy::Maglev as i32;
    let max_requests = c
        .circuit_breakers
        .as_ref()
        .and_then(|cb| cb.thresholds.first())
        .and_then(|t| t.max_requests)
        .filter(|m| m.value != u32::MAX);
    let lb_config = if ring_hash {
        let min = match &c.lb_config {
            Some(cluster::LbConfig::RingHashLbConfig(r)) => r.minimum_ring_size,
            _ => None,
        };
        Some(cluster::LbConfig::RingHashLbConfig(cluster::RingHashLbConfig {
            minimum_ring_size: min,
            ..Default::default()
        }))
    } else {
        None
    };
    Cluster {
        name: c.name.clone(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(build::ads()),
            service_name: c.name.clone(),
        }),
        lb_policy: if ring_hash { cluster::LbPolicy::RingHash } else { cluster::LbPolicy::RoundRobin } as i32,
        lb_config,
        circuit_breakers: max_requests.map(|m| CircuitBreakers {
            thresholds: vec![circuit_breakers::Thresholds { max_requests: Some(m), ..Default::default() }],
            ..Default::default()
        }),
        transport_socket: istio_mutual(view, &c.name, mode),
        ..Default::default()
    }
}

/// gRPC's mTLS (gRFC A29) for cluster `name` when its DestinationRule says
/// `ISTIO_MUTUAL`: certificate and roots from the bootstrap's provider instance, the
/// rule's `subjectAltNames` or else the endpoints' SPIFFE ids as SAN matchers.
fn istio_mutual(view: &MeshView<'_>, name: &str, mode: ProxyMode) -> Option<TransportSocket> {
    let mut parts = name.splitn(4, '|');
    let (_, port, subset, host) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let port: u32 = port.parse().ok()?;
    let svc = view.service(host)?;
    let dr = view.destination_rule(svc)?;
    let sub = dr.subsets.iter().find(|s| s.name == subset);
    let policy = effective(dr.traffic_policy.as_ref(), sub.and_then(|s| s.traffic_policy.as_ref()), port);
    let tls = policy.tls.as_ref().filter(|t| t.mode == ClientTlsMode::IstioMutual)?;
    let sans: BTreeSet<String> = if tls.subject_alt_names.is_empty() {
        let svc_port = svc.port(port)?;
        view.endpoints(svc, svc_port, sub.map(|s| &s.labels), mode).into_iter().filter_map(|e| e.identity).collect()
    } else {
        tls.subject_alt_names.iter().cloned().collect()
    };
    let provider = |cert: &str| CertificateProviderPluginInstance {
        instance_name: PROVIDER_INSTANCE.into(),
        certificate_name: cert.into(),
    };
    #[allow(deprecated)]
    let validation = CertificateValidationContext {
        ca_certificate_provider_instance: Some(provider(ROOT_CERT_NAME)),
        match_subject_alt_names: sans
            .into_iter()
            .map(|s| StringMatcher { match_pattern: Some(string_matcher::MatchPattern::Exact(s)), ignore_case: false })
            .collect(),
        ..Default::default()
    };
    let ctx = UpstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_provider_instance: Some(provider("default")),
            validation_context_type: Some(common_tls_context::ValidationContextType::ValidationContext(validation)),
            ..Default::default()
        }),
        ..Default::default()
    };
    Some(TransportSocket {
        name: TLS_SOCKET.into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(ctx))),
    })
}

/// A gRPC xDS bootstrap (`GRPC_XDS_BOOTSTRAP`) for a client of `namespace` talking to
/// the control plane at `xds` (`host:port`, plaintext). With `certs`, a `file_watcher`
/// certificate provider instance `default` reading `cert-chain.pem`, `key.pem` and
/// `root-cert.pem` from that directory (Istio's file names). `metadata` adds node
/// metadata (e.g. `WEFT_JOIN_TOKEN`, `SERVICE_ACCOUNT`).
pub fn bootstrap(
    xds: &str,
    name: &str,
    namespace: &str,
    certs: Option<&std::path::Path>,
    metadata: &[(&str, &str)],
) -> serde_json::Value {
    let mut meta = serde_json::Map::new();
    meta.insert(GENERATOR.into(), "grpc".into());
    meta.insert(weft_xds::node::NAME.into(), name.into());
    meta.insert(weft_xds::node::NAMESPACE.into(), namespace.into());
    for (k, v) in metadata {
        meta.insert((*k).into(), (*v).into());
    }
    let mut b = serde_json::json!({
        "xds_servers": [{
            "server_uri": xds,
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {
            "id": format!("sidecar~127.0.0.1~{name}.{namespace}~{namespace}.svc.cluster.local"),
            "metadata": meta,
            "locality": {},
        },
    });
    if let Some(dir) = certs {
        let file = |f: &str| dir.join(f).display().to_string();
        b["certificate_providers"] = serde_json::json!({
            PROVIDER_INSTANCE: {
                "plugin_name": "file_watcher",
                "config": {
                    "certificate_file": file("cert-chain.pem"),
                    "private_key_file": file("key.pem"),
                    "ca_certificate_file": file("root-cert.pem"),
                    "refresh_interval": "60s",
                },
            },
        });
    }
    b
}

#[cfg(test)]
mod tests;
