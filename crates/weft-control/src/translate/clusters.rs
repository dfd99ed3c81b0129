//! Outbound clusters `outbound|PORT|SUBSET|FQDN` with DestinationRule policy, and their
//! ClusterLoadAssignments.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::cluster::common_lb_config::LocalityConfigSpecifier;
use envoy_types::pb::envoy::config::cluster::v3::UpstreamConnectionOptions;
use envoy_types::pb::envoy::config::cluster::v3::{
    circuit_breakers, cluster, CircuitBreakers, Cluster, OutlierDetection,
};
use envoy_types::pb::envoy::config::core::v3::TcpKeepalive;
use envoy_types::pb::envoy::config::core::v3::{
    address, data_source, socket_address, transport_socket, Address, DataSource, HealthStatus, Metadata, SocketAddress,
    TransportSocket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context, subject_alt_name_matcher::SanType as san_type, CertificateValidationContext, CommonTlsContext,
    SubjectAltNameMatcher, TlsCertificate, UpstreamTlsContext,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    explicit_http_config::ProtocolConfig, ExplicitHttpConfig, UpstreamProtocolOptions, UseDownstreamHttpConfig,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher, StringMatcher};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value, UInt64Value};
use prost::Message;
use weft_api::spec::{
    ClientTlsMode, ClientTlsSettings, ConnectionPoolSettings, H2UpgradePolicy, LoadBalancerSettings, LocalityLbSetting,
    OutlierDetection as IstioOutlier, Resolution, RetryBudget, SimpleLb, TrafficPolicy, RETRY_BUDGET_ANNOTATION,
};
use weft_xds::build;

use super::locality::{Layout, Locality};
use super::model::{Backing, Ep, MeshView, Protocol, Service, SvcPort};
use super::{ProxyMode, ProxyXds};

/// The policy that applies to one cluster after subset and port-level overrides.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// Load balancing.
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Connection pool.
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Outlier detection.
    pub outlier_detection: Option<IstioOutlier>,
    /// Client TLS.
    pub tls: Option<ClientTlsSettings>,
    /// The rule's `weft.dev/retry-budget` annotation (weft's extension).
    pub retry_budget: Option<RetryBudget>,
}

/// Istio's `h2UpgradePolicy` for an HTTP/1.1 port: `UPGRADE` makes its cluster speak
/// HTTP/2 upstream (the destination's sidecar takes either); `DEFAULT` follows the mesh
/// default, which is Istio's `DO_NOT_UPGRADE`. TCP ports are never upgraded.
fn h2_upgrade(port: &SvcPort, policy: &Policy) -> bool {
    let http = policy.connection_pool.as_ref().and_then(|p| p.http.as_ref());
    port.protocol == Protocol::Http && http.and_then(|h| h.h2_upgrade_policy) == Some(H2UpgradePolicy::Upgrade)
}

/// Adds Istio's service metadata to an inbound cluster: `filter_metadata["istio"]["services"]`,
/// a list of `{host, name, namespace}` (what the proxies' stats read
/// `destination_service*` from); nothing without services.
pub fn add_istio_services(c: &mut Cluster, services: &[(String, String, String)]) {
    use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value};
    if services.is_empty() {
        return;
    }
    let text = |s: &str| Value { kind: Some(Kind::StringValue(s.to_string())) };
    let values = services
        .iter()
        .map(|(host, name, namespace)| {
            let fields = [("host", host), ("name", name), ("namespace", namespace)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), text(v)))
                .collect();
            Value { kind: Some(Kind::StructValue(Struct { fields })) }
        })
        .collect();
    let list = Value { kind: Some(Kind::ListValue(ListValue { values })) };
    let istio = Struct { fields: [("services".to_string(), list)].into_iter().collect() };
    c.metadata.get_or_insert_with(Metadata::default).filter_metadata.insert("istio".to_string(), istio);
}

/// The key of a cluster's upstream HTTP options in `typed_extension_protocol_options`.
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Marks a cluster of a `MESH_EXTERNAL` ServiceEntry: `filter_metadata["istio"]["external"]`
/// (true). Proxies send no peer metadata to such clusters: what is mesh-internal stays
/// in the mesh (Istio's `skip_external_clusters`).
pub fn mark_external(c: &mut Cluster) {
    use envoy_types::pb::google::protobuf::{value::Kind, Value};
    let istio =
        c.metadata.get_or_insert_with(Metadata::default).filter_metadata.entry("istio".to_string()).or_default();
    istio.fields.insert("external".to_string(), Value { kind: Some(Kind::BoolValue(true)) });
}

/// Istio's name of an outbound cluster: `outbound|9080|v1|reviews.default.svc.cluster.local`.
pub fn outbound_name(port: u32, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// Adds every visible service's clusters (and subset clusters) with their endpoints.
pub fn build(view: &MeshView<'_>, mode: ProxyMode, out: &mut ProxyXds) {
    for svc in &view.services {
        let found = view.destination_rule_meta(svc);
        let dr = found.map(|(_, dr)| dr);
        // Validated when the rule was accepted; a bad value never reaches here.
        let budget = found
            .and_then(|(m, _)| m.annotations.get(RETRY_BUDGET_ANNOTATION))
            .and_then(|v| RetryBudget::parse(v).ok());
        for port in &svc.ports {
            let base = dr.and_then(|d| d.traffic_policy.as_ref());
            let policy = Policy { retry_budget: budget, ..effective(base, None, port.number) };
            add(view, svc, port, "", None, &policy, mode, out);
            for subset in dr.map(|d| d.subsets.as_slice()).unwrap_or_default() {
                let policy =
                    Policy { retry_budget: budget, ..effective(base, subset.traffic_policy.as_ref(), port.number) };
                add(view, svc, port, &subset.name, Some(&subset.labels), &policy, mode, out);
            }
        }
    }
}

/// The policy for `port`: the subset's policy replaces the rule's field by field, then the
/// port-level settings of whichever applies replace it again (Istio's merge order). A
/// matching `portLevelSettings` entry replaces all four settings: as Istio documents,
/// what it omits takes the defaults, not the enclosing policy's values.
pub fn effective(base: Option<&TrafficPolicy>, subset: Option<&TrafficPolicy>, port: u32) -> Policy {
    let mut p = Policy::default();
    for tp in [base, subset].into_iter().flatten() {
        apply(&mut p, tp.load_balancer.clone(), tp.connection_pool.clone(), tp.outlier_detection.clone());
        if tp.tls.is_some() {
            p.tls = tp.tls.clone();
        }
        if let Some(pl) = tp.port_level_settings.iter().find(|pl| pl.port.is_some_and(|s| s.number == port)) {
            p.load_balancer = pl.load_balancer.clone();
            p.connection_pool = pl.connection_pool.clone();
            p.outlier_detection = pl.outlier_detection.clone();
            p.tls = pl.tls.clone();
        }
    }
    p
}

fn apply(
    p: &mut Policy,
    lb: Option<LoadBalancerSettings>,
    pool: Option<ConnectionPoolSettings>,
    outlier: Option<IstioOutlier>,
) {
    if lb.is_some() {
        p.load_balancer = lb;
    }
    if pool.is_some() {
        p.connection_pool = pool;
    }
    if outlier.is_some() {
        p.outlier_detection = outlier;
    }
}

#[allow(clippy::too_many_arguments)]
fn add(
    view: &MeshView<'_>,
    svc: &Service,
    port: &SvcPort,
    subset: &str,
    labels: Option<&BTreeMap<String, String>>,
    policy: &Policy,
    mode: ProxyMode,
    out: &mut ProxyXds,
) {
    let name = outbound_name(port.number, subset, &svc.host);
    let http2 = port.protocol == Protocol::Http2 || h2_upgrade(port, policy);
    let eps = view.endpoints(svc, port, labels, mode);
    let mut sans: Vec<String> = eps.iter().filter_map(|e| e.identity.clone()).collect();
    sans.sort();
    sans.dedup();
    let resolution = match &svc.backing {
        Backing::Selector(_) => Resolution::Static,
        Backing::Entry { resolution, selector, .. } => {
            if *resolution == Resolution::None && selector.is_some() {
                Resolution::Static
            } else {
                *resolution
            }
        }
    };
    let mut c = build::eds_cluster(&name, http2);
    let assignment = |eps: &[Ep]| {
        let layout = locality_layout(view, eps, policy);
        (laid_out(&name, eps, layout.as_ref()), layout.is_some())
    };
    let mut locality_weighted = false;
    match resolution {
        Resolution::Static => {
            let (cla, weighted) = assignment(&eps);
            locality_weighted = weighted;
            out.endpoints.push(cla);
        }
        Resolution::Dns | Resolution::DnsRoundRobin => {
            let t = if resolution == Resolution::Dns {
                cluster::DiscoveryType::StrictDns
            } else {
                cluster::DiscoveryType::LogicalDns
            };
            c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(t as i32));
            c.eds_cluster_config = None;
            let eps: Vec<Ep> =
                if t == cluster::DiscoveryType::LogicalDns { eps.into_iter().take(1).collect() } else { eps };
            let (cla, weighted) = assignment(&eps);
            locality_weighted = weighted;
            c.load_assignment = Some(cla);
        }
        Resolution::None => {
            c.cluster_discovery_type =
                Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::OriginalDst as i32));
            c.eds_cluster_config = None;
            c.lb_policy = cluster::LbPolicy::ClusterProvided as i32;
            c.metadata = None;
        }
    }
    c.connect_timeout = Some(PbDuration { seconds: 10, nanos: 0 });
    if resolution != Resolution::None {
        set_lb(&mut c, policy.load_balancer.as_ref());
    }
    if locality_weighted {
        c.common_lb_config.get_or_insert_with(Default::default).locality_config_specifier =
            Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(Default::default()));
    }
    set_pool(&mut c, policy.connection_pool.as_ref(), policy.retry_budget, port);
    // After the balancer, which sets the metadata afresh.
    if matches!(svc.backing, Backing::Entry { external: true, .. }) {
        mark_external(&mut c);
    }
    let client_in_mesh = super::mtls::in_mesh(&view.node.labels);
    let alpn: &[&str] = match port.protocol {
        _ if http2 => &["h2"],
        p if p.is_http() => &["http/1.1"],
        // Opaque TCP: Istio's TCP metadata exchange is offered first (stock Envoy nodes
        // have it stripped again, `peer_exchange::strip_tcp_exchange`).
        _ => super::mtls::TCP_ALPN,
    };
    let sni = format!("outbound_.{}_.{}_.{}", port.number, subset, svc.host);
    match policy.tls.as_ref().map(|t| t.mode) {
        Some(ClientTlsMode::IstioMutual) if client_in_mesh => {
            // The rule's subjectAltNames, when given, replace the endpoints' identities.
            let given = policy.tls.as_ref().map(|t| t.subject_alt_names.clone()).unwrap_or_default();
            let sans = if given.is_empty() { sans } else { given };
            // The rule's `sni` replaces Istio's internal name (an egress gateway's server
            // is chosen by the external host's name).
            let sni = policy.tls.as_ref().and_then(|t| t.sni.clone()).unwrap_or(sni);
            c.transport_socket = Some(super::mtls::istio_mutual(&sans, &sni, alpn));
        }
        // Istio reads `credentialName` at gateways only; sidecars keep the files.
        Some(_) => {
            c.transport_socket = policy.tls.as_ref().and_then(|tls| {
                let sds = view.node.is_gateway().then(|| super::credentials::client_tls(tls, &svc.host)).flatten();
                sds.or_else(|| client_tls(tls, &svc.host))
            })
        }
        // Auto mTLS: mTLS to the endpoints whose proxies take it, plaintext to others,
        // and plaintext when the destination's PeerAuthentication disables mTLS.
        None if client_in_mesh && !sans.is_empty() && !server_disables_mtls(view, svc, port) => {
            c.transport_socket_matches = vec![
                cluster::TransportSocketMatch {
                    name: "tlsMode-istio".into(),
                    r#match: Some(super::mtls::tls_mode_istio()),
                    transport_socket: Some(super::mtls::istio_mutual(&sans, &sni, alpn)),
                },
                cluster::TransportSocketMatch {
                    name: "tlsMode-disabled".into(),
                    r#match: Some(Default::default()),
                    transport_socket: Some(super::mtls::raw_buffer()),
                },
            ];
        }
        None => {}
    }
    if let Some(o) = &policy.outlier_detection {
        c.outlier_detection = Some(outlier(o));
        // Istio: with outlier detection, panic mode starts below minHealthPercent (0 by
        // default, i.e. never), not at Envoy's 50%.
        let min = o.min_health_percent.unwrap_or(0).clamp(0, 100) as f64;
        c.common_lb_config.get_or_insert_with(Default::default).healthy_panic_threshold =
            Some(envoy_types::pb::envoy::r#type::v3::Percent { value: min });
    }
    out.clusters.push(c);
}

/// Whether the PeerAuthentication of the service's workloads (matched on its selector,
/// as Istio does) is DISABLE on the target port: auto mTLS then sends plaintext.
fn server_disables_mtls(view: &MeshView<'_>, svc: &Service, port: &SvcPort) -> bool {
    let selector = match &svc.backing {
        Backing::Selector(sel) => Some(sel),
        Backing::Entry { selector, .. } => selector.as_ref(),
    };
    let Some(labels) = selector else { return false };
    let target = match port.target {
        super::model::Target::Number(n) => n,
        _ => port.number,
    };
    super::mtls::peer_mode(view, &svc.namespace, labels, target) == weft_api::spec::MtlsMode::Disable
}

/// The upstream TLS of a DestinationRule's `tls` (SIMPLE: TLS verified with
/// `caCertificates`; MUTUAL: plus the client certificate and key; files are read by the
/// proxy). `sni` defaults to the service host, as for Istio's external services;
/// `subjectAltNames` become SAN matchers. DISABLE is plaintext; ISTIO_MUTUAL comes with
/// the mesh's identities.
fn client_tls(tls: &ClientTlsSettings, host: &str) -> Option<TransportSocket> {
    if !matches!(tls.mode, ClientTlsMode::Simple | ClientTlsMode::Mutual) {
        return None;
    }
    let file = |f: &Option<String>| {
        f.as_ref().map(|path| DataSource {
            specifier: Some(data_source::Specifier::Filename(path.clone())),
            ..Default::default()
        })
    };
    let validation =
        (tls.ca_certificates.is_some() || !tls.subject_alt_names.is_empty()).then(|| CertificateValidationContext {
            trusted_ca: file(&tls.ca_certificates),
            match_typed_subject_alt_names: san_matchers(&tls.subject_alt_names),
            ..Default::default()
        });
    // MUTUAL with neither file (a `credentialName` a sidecar does not read, as Istio):
    // no client certificate is presented, as Istio's sidecars do.
    let has_files = tls.client_certificate.is_some() || tls.private_key.is_some();
    let certificates = if tls.mode == ClientTlsMode::Mutual && has_files {
        vec![TlsCertificate {
            certificate_chain: file(&tls.client_certificate),
            private_key: file(&tls.private_key),
            ..Default::default()
        }]
    } else {
        Vec::new()
    };
    let ctx = UpstreamTlsContext {
        sni: tls.sni.clone().unwrap_or_else(|| host.trim_start_matches("*.").to_string()),
        common_tls_context: Some(CommonTlsContext {
            tls_certificates: certificates,
            validation_context_type: validation.map(common_tls_context::ValidationContextType::ValidationContext),
            ..Default::default()
        }),
        ..Default::default()
    };
    Some(TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(envoy_types::util::pack_any(ctx))),
    })
}

/// Sets the balancer: weft's metadata name and Envoy's enum agree; consistent hashing
/// (the hash key goes on the route, see `routes`) is Istio's `applyLoadBalancer`:
/// `maglev` is MAGLEV (`tableSize` -> `maglev_lb_config.table_size` when set),
/// `ringHash` is RING_HASH (`minimumRingSize` -> `ring_hash_lb_config` when set), and
/// neither is RING_HASH with the deprecated `minimumRingSize` or 1024. Without a choice,
/// Istio's default, LEAST_REQUEST (the proxy's own default, peak-EWMA, is kept for
/// clusters from other control planes).
fn set_lb(c: &mut Cluster, lb: Option<&LoadBalancerSettings>) {
    let Some(lb) = lb else {
        c.lb_policy = cluster::LbPolicy::LeastRequest as i32;
        c.metadata = Some(build::weft_lb_metadata("LEAST_REQUEST"));
        return;
    };
    if let Some(hash) = &lb.consistent_hash {
        c.metadata = None;
        let ring = |min: u64| {
            Some(cluster::LbConfig::RingHashLbConfig(cluster::RingHashLbConfig {
                minimum_ring_size: Some(UInt64Value { value: min }),
                ..Default::default()
            }))
        };
        if let Some(maglev) = &hash.maglev {
            c.lb_policy = cluster::LbPolicy::Maglev as i32;
            if let Some(size) = json_u64(maglev, "tableSize").filter(|&n| n != 0) {
                c.lb_config = Some(cluster::LbConfig::MaglevLbConfig(cluster::MaglevLbConfig {
                    table_size: Some(UInt64Value { value: size }),
                }));
            }
        } else if let Some(ring_hash) = &hash.ring_hash {
            c.lb_policy = cluster::LbPolicy::RingHash as i32;
            if let Some(min) = json_u64(ring_hash, "minimumRingSize").filter(|&n| n != 0) {
                c.lb_config = ring(min);
            }
        } else {
            c.lb_policy = cluster::LbPolicy::RingHash as i32;
            c.lb_config = ring(hash.minimum_ring_size.filter(|&n| n != 0).unwrap_or(1024));
        }
        return;
    }
    let (name, policy) = match lb.simple {
        Some(SimpleLb::RoundRobin) => ("ROUND_ROBIN", cluster::LbPolicy::RoundRobin),
        Some(SimpleLb::LeastRequest | SimpleLb::LeastConn | SimpleLb::Unspecified) | None => {
            ("LEAST_REQUEST", cluster::LbPolicy::LeastRequest)
        }
        Some(SimpleLb::Random) => ("RANDOM", cluster::LbPolicy::Random),
        Some(SimpleLb::Passthrough) => return,
    };
    c.lb_policy = policy as i32;
    c.metadata = Some(build::weft_lb_metadata(name));
}

/// Istio's `applyConnectionPool`: every cluster gets circuit-breaker thresholds of
/// 2^32-1 (Istio's "no limit") that the rule's `connectionPool` lowers; per-connection
/// settings go to the cluster's `HttpProtocolOptions.common_http_protocol_options`
/// (`http.idleTimeout`, else `tcp.idleTimeout`; `http.maxRequestsPerConnection`;
/// `tcp.maxConnectionDuration`), `http.maxConcurrentStreams` to its HTTP/2 options,
/// `tcp.tcpKeepalive` to `upstream_connection_options`, `http.useClientProtocol` on an
/// HTTP port to `use_downstream_protocol_config`. The retry budget (weft's annotation)
/// joins the thresholds.
/// Istio's circuit breakers for a cluster no DestinationRule limits (its
/// `getDefaultCircuitBreakerThresholds`): 2^32-1 everywhere, so a burst queues instead
/// of overflowing Envoy's 1024 defaults. Istio gives them to every cluster it builds,
/// inbound and passthrough included.
pub(super) fn default_circuit_breakers() -> CircuitBreakers {
    let unlimited = Some(UInt32Value { value: u32::MAX });
    CircuitBreakers {
        thresholds: vec![circuit_breakers::Thresholds {
            max_connections: unlimited,
            max_pending_requests: unlimited,
            max_requests: unlimited,
            max_retries: unlimited,
            track_remaining: true,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn set_pool(c: &mut Cluster, pool: Option<&ConnectionPoolSettings>, budget: Option<RetryBudget>, port: &SvcPort) {
    let limit =
        |v: Option<i64>| v.filter(|n| *n > 0).and_then(|n| u32::try_from(n).ok()).map(|value| UInt32Value { value });
    let tcp = pool.and_then(|p| p.tcp.as_ref());
    let http = pool.and_then(|p| p.http.as_ref());
    let unlimited = Some(UInt32Value { value: u32::MAX });
    let threshold = circuit_breakers::Thresholds {
        max_connections: limit(tcp.and_then(|t| t.max_connections)).or(unlimited),
        max_pending_requests: limit(http.and_then(|h| h.http1_max_pending_requests)).or(unlimited),
        max_requests: limit(http.and_then(|h| h.http2_max_requests)).or(unlimited),
        max_retries: limit(http.and_then(|h| h.max_retries)).or(unlimited),
        track_remaining: true,
        retry_budget: budget.map(|b| circuit_breakers::thresholds::RetryBudget {
            budget_percent: Some(Percent { value: b.budget_percent }),
            min_retry_concurrency: Some(UInt32Value { value: b.min_retry_concurrency }),
            ..Default::default()
        }),
        ..Default::default()
    };
    c.circuit_breakers = Some(CircuitBreakers { thresholds: vec![threshold], ..Default::default() });
    if let Some(t) = tcp.and_then(|t| t.connect_timeout) {
        c.connect_timeout = Some(duration(t.0));
    }
    if let Some(k) = tcp.and_then(|t| t.tcp_keepalive.as_ref()) {
        let secs = |d: Option<weft_api::spec::Duration>| {
            d.map(|d| UInt32Value { value: u32::try_from(d.0.as_secs()).unwrap_or(u32::MAX) })
        };
        c.upstream_connection_options = Some(UpstreamConnectionOptions {
            tcp_keepalive: Some(TcpKeepalive {
                keepalive_probes: k.probes.map(|value| UInt32Value { value }),
                keepalive_time: secs(k.time),
                keepalive_interval: secs(k.interval),
            }),
            ..Default::default()
        });
    }
    let idle = http.and_then(|h| h.idle_timeout).or_else(|| tcp.and_then(|t| t.idle_timeout));
    let per_conn = limit(http.and_then(|h| h.max_requests_per_connection));
    let lifetime = tcp.and_then(|t| t.max_connection_duration);
    let streams = limit(http.and_then(|h| h.max_concurrent_streams));
    let client_protocol = http.and_then(|h| h.use_client_protocol) == Some(true) && port.protocol.is_http();
    if idle.is_none() && per_conn.is_none() && lifetime.is_none() && streams.is_none() && !client_protocol {
        return;
    }
    let mut opts = c
        .typed_extension_protocol_options
        .get(HTTP_PROTOCOL_OPTIONS)
        .and_then(|any| HttpProtocolOptions::decode(any.value.as_slice()).ok())
        .unwrap_or_else(|| HttpProtocolOptions {
            upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
                protocol_config: Some(ProtocolConfig::HttpProtocolOptions(Default::default())),
            })),
            ..Default::default()
        });
    if idle.is_some() || per_conn.is_some() || lifetime.is_some() {
        let common = opts.common_http_protocol_options.get_or_insert_with(Default::default);
        common.idle_timeout = idle.map(|d| duration(d.0));
        common.max_requests_per_connection = per_conn;
        common.max_connection_duration = lifetime.map(|d| duration(d.0));
    }
    if let Some(Some(ProtocolConfig::Http2ProtocolOptions(h2))) = match &mut opts.upstream_protocol_options {
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => Some(&mut e.protocol_config),
        _ => None,
    } {
        h2.max_concurrent_streams = streams;
    }
    if client_protocol {
        opts.upstream_protocol_options =
            Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(UseDownstreamHttpConfig {
                http_protocol_options: Some(Default::default()),
                http2_protocol_options: Some(Default::default()),
                ..Default::default()
            }));
    }
    c.typed_extension_protocol_options.insert(HTTP_PROTOCOL_OPTIONS.into(), envoy_types::util::pack_any(opts));
}

/// An unsigned field of a raw JSON object: a number, or a string holding one (proto3
/// JSON writes 64-bit integers as strings).
fn json_u64(v: &serde_json::Value, key: &str) -> Option<u64> {
    match v.get(key)? {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn outlier(o: &IstioOutlier) -> OutlierDetection {
    let u32v = |v: Option<u32>| v.map(|value| UInt32Value { value });
    let pct = |v: Option<i64>| v.and_then(|n| u32::try_from(n.clamp(0, 100)).ok()).map(|value| UInt32Value { value });
    let five = o.consecutive_5xx_errors.or_else(|| o.consecutive_errors.and_then(|n| u32::try_from(n).ok()));
    OutlierDetection {
        consecutive_5xx: u32v(five),
        // Istio: 5xx ejection is enforced only when configured.
        enforcing_consecutive_5xx: Some(UInt32Value { value: if five.is_some_and(|n| n > 0) { 100 } else { 0 } }),
        consecutive_gateway_failure: u32v(o.consecutive_gateway_errors),
        enforcing_consecutive_gateway_failure: o.consecutive_gateway_errors.map(|_| UInt32Value { value: 100 }),
        interval: o.interval.map(|d| duration(d.0)),
        base_ejection_time: o.base_ejection_time.map(|d| duration(d.0)),
        max_ejection_percent: pct(o.max_ejection_percent),
        ..Default::default()
    }
}

/// A protobuf Duration.
pub fn duration(d: std::time::Duration) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A socket address for `host:port` (an IP, or a DNS name for DNS clusters).
pub fn socket(host: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: host.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

/// Istio's locality load balancing for `eps` as `view`'s proxy sees them: on when the
/// policy has outlier detection and its `localityLbSetting` is not disabled (see
/// [`super::locality`]).
fn locality_layout(view: &MeshView<'_>, eps: &[Ep], policy: &Policy) -> Option<Layout> {
    policy.outlier_detection.as_ref()?;
    let default = LocalityLbSetting::default();
    let setting = policy.load_balancer.as_ref().and_then(|l| l.locality_lb_setting.as_ref()).unwrap_or(&default);
    if setting.enabled == Some(false) {
        return None;
    }
    let labels = &view.node.labels;
    let refs: Vec<_> = eps.iter().map(|e| (&e.locality, &e.labels, e.weight)).collect();
    super::locality::layout(setting, &Locality::of_labels(labels), labels, &refs)
}

/// A ClusterLoadAssignment (healthy endpoints with weights), one `LocalityLbEndpoints`
/// per locality; one empty locality when there are no endpoints, so the proxy knows
/// the cluster is empty.
pub fn cla(name: &str, eps: &[Ep]) -> ClusterLoadAssignment {
    laid_out(name, eps, None)
}

/// Like [`cla`], with the priorities or locality weights of `layout`. A locality
/// weighs the sum of its endpoints' weights unless `layout` distributes weights;
/// localities a distribution leaves out are left out.
pub fn laid_out(name: &str, eps: &[Ep], layout: Option<&Layout>) -> ClusterLoadAssignment {
    let mut groups: BTreeMap<(u32, &Locality), Vec<&Ep>> = BTreeMap::new();
    for (i, e) in eps.iter().enumerate() {
        let priority = match layout {
            Some(Layout::Priorities(p)) => p.get(i).copied().unwrap_or(0),
            Some(Layout::Weights(w)) if !w.contains_key(&e.locality) => continue,
            _ => 0,
        };
        groups.entry((priority, &e.locality)).or_default().push(e);
    }
    let mut endpoints: Vec<LocalityLbEndpoints> = groups
        .into_iter()
        .map(|((priority, locality), eps)| {
            let weight = match layout {
                Some(Layout::Weights(w)) => w.get(locality).copied().unwrap_or(0),
                _ => eps.iter().map(|e| e.weight).fold(0u32, u32::saturating_add),
            };
            LocalityLbEndpoints {
                locality: (!locality.is_empty()).then(|| locality.to_envoy()),
                lb_endpoints: eps.into_iter().map(lb_endpoint).collect(),
                load_balancing_weight: Some(UInt32Value { value: weight.max(1) }),
                priority,
                ..Default::default()
            }
        })
        .collect();
    if endpoints.is_empty() {
        endpoints.push(LocalityLbEndpoints::default());
    }
    ClusterLoadAssignment { cluster_name: name.into(), endpoints, ..Default::default() }
}

fn lb_endpoint(e: &Ep) -> LbEndpoint {
    LbEndpoint {
        metadata: e.identity.as_ref().map(|_| Metadata {
            filter_metadata: [(super::mtls::SOCKET_MATCH.to_string(), super::mtls::tls_mode_istio())].into(),
            ..Default::default()
        }),
        health_status: HealthStatus::Healthy as i32,
        load_balancing_weight: Some(UInt32Value { value: e.weight }),
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(socket(&e.host, e.port)),
            ..Default::default()
        })),
    }
}

/// Exact matchers for Istio `subjectAltNames`: `spiffe://` ones as URI SANs, others as DNS.
pub(crate) fn san_matchers(names: &[String]) -> Vec<SubjectAltNameMatcher> {
    names
        .iter()
        .map(|san| SubjectAltNameMatcher {
            san_type: if san.starts_with("spiffe://") { san_type::Uri } else { san_type::Dns } as i32,
            matcher: Some(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact(san.clone())),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect()
}
