//! Compiling an xDS `Cluster` into weft's [`ClusterConfig`].
//!
//! Load-balancing policy, in order of precedence:
//! 1. `metadata.filter_metadata["weft"].lb_policy` (a string: `PEAK_EWMA`, `ROUND_ROBIN`,
//!    `LEAST_REQUEST`, `RANDOM`): P2C over peak-EWMA latency is chosen only this way
//!    (the control plane does not ask for it today);
//! 2. `load_balancing_policy`: the first policy weft understands
//!    (`envoy.extensions.load_balancing_policies.{round_robin,least_request,random,
//!    ring_hash,maglev}.v3`);
//! 3. the `lb_policy` enum. Proto3 cannot tell an unset `lb_policy` from
//!    `ROUND_ROBIN = 0`, so a cluster with no explicit policy anywhere is ROUND_ROBIN,
//!    exactly as in Envoy.
//!
//! RING_HASH reads `ring_hash_lb_config` (`minimum_ring_size` 1024 and
//! `maximum_ring_size` 8M by default), MAGLEV `maglev_lb_config.table_size` (65537 by
//! default, a prime). `common_lb_config.locality_weighted_lb_config` turns on Envoy's
//! locality-weighted balancing (the localities' `load_balancing_weight`).

pub use super::pool::{ConnSettings, Keepalive, UpstreamProtocol};
use super::RetryBudget;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::cluster::common_lb_config::LocalityConfigSpecifier;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, ClusterProtocolSelection, DiscoveryType, LbConfig, LbPolicy as EnvoyLbPolicy,
};
use envoy_types::pb::envoy::config::cluster::v3::Cluster as XdsCluster;
use envoy_types::pb::envoy::config::core::v3::{Metadata, RoutingPriority, TransportSocket};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::extensions::load_balancing_policies::{
    least_request::v3::LeastRequest, maglev::v3::Maglev, random::v3::Random, ring_hash::v3::RingHash,
    round_robin::v3::RoundRobin,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    explicit_http_config::ProtocolConfig, UpstreamProtocolOptions,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::Value;
use prost::{Message, Name};

use crate::cluster::endpoints::decode_assignment;
use crate::cluster::outlier::OutlierConfig;
use crate::cluster::pool::Connector;
use crate::error::ConfigError;
use crate::tls::Secrets;

/// The key of the upstream HTTP options in `typed_extension_protocol_options`.
pub const HTTP_PROTOCOL_OPTIONS_KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Envoy's default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How an endpoint is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    /// Power of two choices over peak-EWMA latency times outstanding requests (weft's default).
    PeakEwma,
    /// Smooth weighted round robin.
    RoundRobin,
    /// Weighted random.
    Random,
    /// Power of two choices over outstanding requests.
    LeastRequest,
    /// Consistent hashing on a ring (RING_HASH): requests with the same hash key reach
    /// the same endpoint while the endpoint set is stable. Requests without a hash key
    /// are balanced by peak-EWMA.
    RingHash,
    /// Consistent hashing with Maglev's lookup table (MAGLEV): like `RingHash`, with
    /// an even spread and minimal disruption when an endpoint leaves.
    Maglev,
}

/// Sizes of the consistent-hashing structures (Envoy's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashConfig {
    /// `ring_hash_lb_config.minimum_ring_size`.
    pub min_ring_size: u64,
    /// `ring_hash_lb_config.maximum_ring_size`.
    pub max_ring_size: u64,
    /// `maglev_lb_config.table_size` (a prime).
    pub maglev_table_size: u64,
}

/// Envoy's `minimum_ring_size` default.
pub const DEFAULT_MIN_RING_SIZE: u64 = 1024;
/// Envoy's `maximum_ring_size` default.
pub const DEFAULT_MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
/// Envoy's Maglev `table_size` default.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u64 = 65537;
/// Envoy's upper bound on a Maglev `table_size`.
const MAX_MAGLEV_TABLE_SIZE: u64 = 5_000_011;

impl Default for HashConfig {
    fn default() -> Self {
        HashConfig {
            min_ring_size: DEFAULT_MIN_RING_SIZE,
            max_ring_size: DEFAULT_MAX_RING_SIZE,
            maglev_table_size: DEFAULT_MAGLEV_TABLE_SIZE,
        }
    }
}

/// Where the cluster's endpoints come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// Endpoints arrive over EDS under `service_name` (the cluster name when unset).
    Eds {
        /// The EDS resource name.
        service_name: String,
    },
    /// Endpoints are the IP addresses in `load_assignment`.
    Static,
    /// Every address a hostname resolves to is an endpoint (resolved once, see
    /// [`crate::cluster::resolve_dns`]).
    StrictDns,
    /// The first address a hostname resolves to is the endpoint (resolved once).
    LogicalDns,
    /// Connect to the downstream connection's original destination; `pick` returns None.
    OriginalDst,
}

/// Circuit-breaker limits of the default priority (Envoy's defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Maximum connections to the whole cluster.
    pub max_connections: u32,
    /// Maximum requests waiting for a connection.
    pub max_pending_requests: u32,
    /// Maximum requests outstanding to the whole cluster.
    pub max_requests: u32,
    /// Maximum concurrent retries.
    pub max_retries: u32,
    /// `retry_budget`: when set, replaces `max_retries`.
    pub retry_budget: Option<RetryBudget>,
}

/// A compiled cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// The cluster name.
    pub name: String,
    /// Where endpoints come from.
    pub discovery: Discovery,
    /// How an endpoint is chosen.
    pub lb: LbPolicy,
    /// Ring and Maglev table sizes.
    pub hash: HashConfig,
    /// `common_lb_config.locality_weighted_lb_config`: within a priority, a locality is
    /// chosen by its `load_balancing_weight` times its availability.
    pub locality_weighted: bool,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// HTTP version to the upstream.
    pub protocol: UpstreamProtocol,
    /// Circuit-breaker limits.
    pub limits: Limits,
    /// Per-connection settings: idle timeout, requests and lifetime per connection, TCP
    /// keepalive (`common_http_protocol_options`, `upstream_connection_options`).
    pub conn: ConnSettings,
    /// `load_assignment`, for STATIC and DNS clusters.
    pub static_endpoints: Option<ClusterLoadAssignment>,
    /// The cluster's metadata.
    pub metadata: Option<Metadata>,
    /// The services of Istio's `filter_metadata["istio"]["services"]` (what the control
    /// plane puts on inbound clusters): the `destination_service*` labels of what the
    /// cluster serves.
    pub services: Vec<Arc<crate::telemetry::ServiceInfo>>,
    /// Istio's `filter_metadata["istio"]["external"]`: the cluster is outside the mesh
    /// (a `MESH_EXTERNAL` ServiceEntry); no peer metadata is sent to it.
    pub external: bool,
    /// How connections are made: plain TCP or TLS (`transport_socket`).
    pub transport: Connector,
    /// `transport_socket_matches`: endpoints whose `envoy.transport_socket_match`
    /// metadata has every field of a match use its connector (first match wins), others
    /// use `transport` (Istio's auto-mTLS: `tlsMode: istio` endpoints get mTLS).
    pub socket_matches: Vec<SocketMatch>,
    /// Outlier detection, if configured.
    pub outlier: Option<OutlierConfig>,
    /// `common_lb_config.healthy_panic_threshold` in percent (Envoy's default 50).
    pub panic_threshold: f64,
}

/// One `transport_socket_matches` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct SocketMatch {
    /// The entry's name (for errors and dumps).
    pub name: String,
    /// Fields an endpoint's `envoy.transport_socket_match` metadata must have.
    pub fields: Vec<(String, Value)>,
    /// The connector to use.
    pub connector: Connector,
}

/// The endpoint metadata namespace `transport_socket_matches` look at.
pub const SOCKET_MATCH_METADATA: &str = "envoy.transport_socket_match";

/// Envoy's default `healthy_panic_threshold`.
const DEFAULT_PANIC_THRESHOLD: f64 = 50.0;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None,
        }
    }
}

impl ClusterConfig {
    /// Whether the cluster is inside the mesh: not marked external by the control plane
    /// and not a passthrough (ORIGINAL_DST). Peer metadata goes to such clusters only.
    pub fn in_mesh(&self) -> bool {
        !self.external && !matches!(self.discovery, Discovery::OriginalDst)
    }

    /// The connector for an endpoint: the first `transport_socket_matches` entry its
    /// metadata satisfies, else the cluster's `transport_socket`.
    pub fn connector_for(&self, metadata: Option<&Metadata>) -> &Connector {
        self.connector_at(self.socket_match(metadata))
    }

    /// The index of the first `transport_socket_matches` entry `metadata` satisfies (None:
    /// the cluster's `transport_socket`). Decided once per endpoint when its cluster is
    /// built ([`Endpoint::socket_match`](super::Endpoint::socket_match)): the metadata
    /// lookups hash strings.
    pub fn socket_match(&self, metadata: Option<&Metadata>) -> Option<usize> {
        if self.socket_matches.is_empty() {
            return None;
        }
        let fields = metadata.and_then(|m| m.filter_metadata.get(SOCKET_MATCH_METADATA)).map(|s| &s.fields);
        self.socket_matches.iter().position(|m| m.fields.iter().all(|(k, v)| fields.and_then(|f| f.get(k)) == Some(v)))
    }

    /// The connector [`ClusterConfig::socket_match`] chose.
    pub fn connector_at(&self, socket_match: Option<usize>) -> &Connector {
        socket_match.and_then(|i| self.socket_matches.get(i)).map_or(&self.transport, |m| &m.connector)
    }

    /// Compiles an xDS cluster. Errors name the cluster and the offending field.
    pub fn compile(c: &XdsCluster) -> Result<ClusterConfig, ConfigError> {
        Self::compile_in(c, &Secrets::default())
    }

    /// Like [`ClusterConfig::compile`], resolving the mesh's SDS secrets through `secrets`.
    pub fn compile_in(c: &XdsCluster, secrets: &Secrets) -> Result<ClusterConfig, ConfigError> {
        let err = |field: &str, msg: String| ConfigError::new(&c.name, field, msg);
        if c.name.is_empty() {
            return Err(err("name", "a cluster needs a non-empty name".into()));
        }
        let discovery = discovery(c)?;
        let connect_timeout = match &c.connect_timeout {
            None => DEFAULT_CONNECT_TIMEOUT,
            Some(d) => {
                if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
                    return Err(err(
                        "connect_timeout",
                        format!("expected a positive duration, got {}s {}ns", d.seconds, d.nanos),
                    ));
                }
                // Non-negative checked above.
                Duration::new(d.seconds.unsigned_abs(), d.nanos.unsigned_abs())
            }
        };
        let static_endpoints = match discovery {
            Discovery::Static | Discovery::StrictDns | Discovery::LogicalDns => {
                let cla = c
                    .load_assignment
                    .clone()
                    .ok_or_else(|| err("load_assignment", "STATIC and DNS clusters need a load_assignment".into()))?;
                let hostnames = discovery != Discovery::Static;
                decode_assignment(&c.name, "load_assignment", &cla, hostnames)?;
                Some(cla)
            }
            _ => None,
        };
        let protocol = protocol(c)?;
        let alpn: &[&str] = match protocol {
            UpstreamProtocol::Http1 => &["http/1.1"],
            UpstreamProtocol::Http2 => &["h2"],
            UpstreamProtocol::UseDownstream => &["h2", "http/1.1"],
        };
        let connector = |ts: Option<&TransportSocket>, field: &str| -> Result<Connector, ConfigError> {
            match ts {
                None => Ok(Connector::Plain),
                Some(ts) if ts.name == "envoy.transport_sockets.raw_buffer" => Ok(Connector::Plain),
                Some(ts) => {
                    let tls = crate::tls::client_config(ts, alpn, secrets)
                        .map_err(|m| ConfigError::new(&c.name, field, m))?;
                    Ok(Connector::Tls(Arc::new(tls)))
                }
            }
        };
        let transport = connector(c.transport_socket.as_ref(), "transport_socket")?;
        let socket_matches = c
            .transport_socket_matches
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let field = format!("transport_socket_matches[{i}]");
                let fields = m
                    .r#match
                    .as_ref()
                    .map(|st| st.fields.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                    .unwrap_or_default();
                let connector = match &m.transport_socket {
                    None => Connector::Plain,
                    Some(ts) => connector(Some(ts), &format!("{field}.transport_socket"))?,
                };
                Ok(SocketMatch { name: m.name.clone(), fields, connector })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        Ok(ClusterConfig {
            name: c.name.clone(),
            discovery,
            lb: lb_policy(c)?,
            hash: hash_config(c)?,
            locality_weighted: matches!(
                c.common_lb_config.as_ref().and_then(|l| l.locality_config_specifier.as_ref()),
                Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
            ),
            connect_timeout,
            protocol,
            limits: limits(c)?,
            conn: conn_settings(c)?,
            static_endpoints,
            metadata: c.metadata.clone(),
            services: crate::telemetry::services::from_metadata(c.metadata.as_ref()),
            external: crate::telemetry::services::is_external(c.metadata.as_ref()),
            transport,
            socket_matches,
            outlier: c
                .outlier_detection
                .as_ref()
                .map(OutlierConfig::compile)
                .transpose()
                .map_err(|(f, m)| ConfigError::new(&c.name, f, m))?,
            panic_threshold: c
                .common_lb_config
                .as_ref()
                .and_then(|l| l.healthy_panic_threshold.as_ref())
                .map_or(DEFAULT_PANIC_THRESHOLD, |p| p.value.clamp(0.0, 100.0)),
        })
    }
}

fn discovery(c: &XdsCluster) -> Result<Discovery, ConfigError> {
    let ty = match &c.cluster_discovery_type {
        None => DiscoveryType::Static,
        Some(ClusterDiscoveryType::Type(t)) => DiscoveryType::try_from(*t)
            .map_err(|_| ConfigError::new(&c.name, "type", format!("unknown discovery type {t}")))?,
        Some(ClusterDiscoveryType::ClusterType(ct)) => {
            return Err(ConfigError::new(
                &c.name,
                "cluster_type",
                format!("custom cluster type {:?} is not supported", ct.name),
            ))
        }
    };
    Ok(match ty {
        DiscoveryType::Static => Discovery::Static,
        DiscoveryType::StrictDns => Discovery::StrictDns,
        DiscoveryType::LogicalDns => Discovery::LogicalDns,
        DiscoveryType::OriginalDst => Discovery::OriginalDst,
        DiscoveryType::Eds => {
            let name = c
                .eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| c.name.clone());
            Discovery::Eds { service_name: name }
        }
    })
}

fn lb_policy(c: &XdsCluster) -> Result<LbPolicy, ConfigError> {
    if let Some(p) = weft_lb_policy(c)? {
        return Ok(p);
    }
    if let Some(lbp) = &c.load_balancing_policy {
        for (i, policy) in lbp.policies.iter().enumerate() {
            let Some(tc) = &policy.typed_extension_config else {
                continue;
            };
            let Some(any) = &tc.typed_config else {
                return Err(ConfigError::new(
                    &c.name,
                    format!("load_balancing_policy.policies[{i}].typed_extension_config.typed_config"),
                    "missing typed_config",
                ));
            };
            let url = any.type_url.as_str();
            if url == RoundRobin::type_url() {
                return Ok(LbPolicy::RoundRobin);
            } else if url == LeastRequest::type_url() {
                return Ok(LbPolicy::LeastRequest);
            } else if url == Random::type_url() {
                return Ok(LbPolicy::Random);
            } else if url == RingHash::type_url() {
                return Ok(LbPolicy::RingHash);
            } else if url == Maglev::type_url() {
                return Ok(LbPolicy::Maglev);
            }
        }
        return Err(ConfigError::new(
            &c.name,
            "load_balancing_policy.policies",
            "no supported policy (round_robin, least_request, random, ring_hash, maglev)",
        ));
    }
    match EnvoyLbPolicy::try_from(c.lb_policy) {
        Ok(EnvoyLbPolicy::RoundRobin) | Ok(EnvoyLbPolicy::ClusterProvided) => Ok(LbPolicy::RoundRobin),
        Ok(EnvoyLbPolicy::LeastRequest) => Ok(LbPolicy::LeastRequest),
        Ok(EnvoyLbPolicy::Random) => Ok(LbPolicy::Random),
        Ok(EnvoyLbPolicy::RingHash) => Ok(LbPolicy::RingHash),
        Ok(EnvoyLbPolicy::Maglev) => Ok(LbPolicy::Maglev),
        Ok(EnvoyLbPolicy::LoadBalancingPolicyConfig) => Err(ConfigError::new(
            &c.name,
            "load_balancing_policy",
            "lb_policy LOAD_BALANCING_POLICY_CONFIG needs load_balancing_policy",
        )),
        Err(_) => Err(ConfigError::new(&c.name, "lb_policy", format!("unknown lb_policy {}", c.lb_policy))),
    }
}

/// `ring_hash_lb_config` / `maglev_lb_config` (or the same fields of the typed
/// `load_balancing_policy` extensions), checked as Envoy checks them.
fn hash_config(c: &XdsCluster) -> Result<HashConfig, ConfigError> {
    let err = |field: &str, msg: String| ConfigError::new(&c.name, field, msg);
    let mut out = HashConfig::default();
    let mut ring = None;
    let mut maglev = None;
    match &c.lb_config {
        Some(LbConfig::RingHashLbConfig(r)) => {
            ring = Some((
                r.minimum_ring_size.map(|v| v.value),
                r.maximum_ring_size.map(|v| v.value),
                "ring_hash_lb_config",
            ))
        }
        Some(LbConfig::MaglevLbConfig(m)) => maglev = Some((m.table_size.map(|v| v.value), "maglev_lb_config")),
        _ => {}
    }
    if let Some(lbp) = &c.load_balancing_policy {
        // The first policy weft understands is the one in force (see `lb_policy`).
        for policy in &lbp.policies {
            let Some(any) = policy.typed_extension_config.as_ref().and_then(|t| t.typed_config.as_ref()) else {
                continue;
            };
            if [RoundRobin::type_url(), LeastRequest::type_url(), Random::type_url()].contains(&any.type_url) {
                break;
            } else if any.type_url == RingHash::type_url() {
                if let Ok(r) = RingHash::decode(any.value.as_slice()) {
                    let min = r.minimum_ring_size.map(|v| v.value);
                    ring = Some((min, r.maximum_ring_size.map(|v| v.value), "load_balancing_policy.policies"));
                }
                break;
            } else if any.type_url == Maglev::type_url() {
                if let Ok(m) = Maglev::decode(any.value.as_slice()) {
                    maglev = Some((m.table_size.map(|v| v.value), "load_balancing_policy.policies"));
                }
                break;
            }
        }
    }
    if let Some((min, max, field)) = ring {
        out.min_ring_size = min.unwrap_or(DEFAULT_MIN_RING_SIZE);
        out.max_ring_size = max.unwrap_or(DEFAULT_MAX_RING_SIZE);
        if out.max_ring_size > DEFAULT_MAX_RING_SIZE || out.min_ring_size == 0 || out.min_ring_size > out.max_ring_size
        {
            return Err(err(
                &format!("{field}.minimum_ring_size"),
                format!(
                    "expected 1 <= minimum_ring_size <= maximum_ring_size <= {DEFAULT_MAX_RING_SIZE}, got {} and {}",
                    out.min_ring_size, out.max_ring_size
                ),
            ));
        }
    }
    if let Some((size, field)) = maglev {
        let size = size.unwrap_or(DEFAULT_MAGLEV_TABLE_SIZE);
        if size > MAX_MAGLEV_TABLE_SIZE || !is_prime(size) {
            return Err(err(
                &format!("{field}.table_size"),
                format!("table_size must be a prime number no larger than {MAX_MAGLEV_TABLE_SIZE}, got {size}"),
            ));
        }
        out.maglev_table_size = size;
    }
    Ok(out)
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

fn weft_lb_policy(c: &XdsCluster) -> Result<Option<LbPolicy>, ConfigError> {
    let field = "metadata.filter_metadata.weft.lb_policy";
    let Some(value) =
        c.metadata.as_ref().and_then(|m| m.filter_metadata.get("weft")).and_then(|s| s.fields.get("lb_policy"))
    else {
        return Ok(None);
    };
    let Some(Kind::StringValue(s)) = &value.kind else {
        return Err(ConfigError::new(&c.name, field, "expected a string"));
    };
    match s.as_str() {
        "PEAK_EWMA" => Ok(Some(LbPolicy::PeakEwma)),
        "ROUND_ROBIN" => Ok(Some(LbPolicy::RoundRobin)),
        "LEAST_REQUEST" => Ok(Some(LbPolicy::LeastRequest)),
        "RANDOM" => Ok(Some(LbPolicy::Random)),
        other => Err(ConfigError::new(
            &c.name,
            field,
            format!("unknown policy {other:?}; expected PEAK_EWMA, ROUND_ROBIN, LEAST_REQUEST or RANDOM"),
        )),
    }
}

fn protocol(c: &XdsCluster) -> Result<UpstreamProtocol, ConfigError> {
    if let Some(any) = c.typed_extension_protocol_options.get(HTTP_PROTOCOL_OPTIONS_KEY) {
        let field = format!("typed_extension_protocol_options[{HTTP_PROTOCOL_OPTIONS_KEY}]");
        if any.type_url != HttpProtocolOptions::type_url() {
            return Err(ConfigError::new(
                &c.name,
                field,
                format!("expected {}, got {}", HttpProtocolOptions::type_url(), any.type_url),
            ));
        }
        let opts = HttpProtocolOptions::decode(any.value.as_slice())
            .map_err(|e| ConfigError::new(&c.name, &field, format!("cannot decode: {e}")))?;
        return match opts.upstream_protocol_options {
            None => Ok(UpstreamProtocol::Http1),
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => match e.protocol_config {
                Some(ProtocolConfig::Http2ProtocolOptions(_)) => Ok(UpstreamProtocol::Http2),
                Some(ProtocolConfig::HttpProtocolOptions(_)) | None => Ok(UpstreamProtocol::Http1),
                Some(ProtocolConfig::Http3ProtocolOptions(_)) => Err(ConfigError::new(
                    &c.name,
                    format!("{field}.explicit_http_config.http3_protocol_options"),
                    "HTTP/3 upstreams are not supported",
                )),
            },
            Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(_)) => Ok(UpstreamProtocol::UseDownstream),
            // Without TLS there is no ALPN: auto config speaks HTTP/1.1, as Envoy does.
            Some(UpstreamProtocolOptions::AutoConfig(_)) => Ok(UpstreamProtocol::Http1),
        };
    }
    #[allow(deprecated)]
    let h2 = c.http2_protocol_options.is_some();
    #[allow(deprecated)]
    let downstream = c.protocol_selection == ClusterProtocolSelection::UseDownstreamProtocol as i32;
    Ok(match (downstream, h2) {
        (true, _) => UpstreamProtocol::UseDownstream,
        (false, true) => UpstreamProtocol::Http2,
        (false, false) => UpstreamProtocol::Http1,
    })
}

fn limits(c: &XdsCluster) -> Result<Limits, ConfigError> {
    let mut l = Limits::default();
    let Some((i, t)) = c
        .circuit_breakers
        .as_ref()
        .and_then(|cb| cb.thresholds.iter().enumerate().find(|(_, t)| t.priority == RoutingPriority::Default as i32))
    else {
        return Ok(l);
    };
    if let Some(v) = &t.max_connections {
        l.max_connections = v.value;
    }
    if let Some(v) = &t.max_pending_requests {
        l.max_pending_requests = v.value;
    }
    if let Some(v) = &t.max_requests {
        l.max_requests = v.value;
    }
    if let Some(v) = &t.max_retries {
        l.max_retries = v.value;
    }
    if let Some(b) = &t.retry_budget {
        let percent = b.budget_percent.as_ref().map_or(DEFAULT_BUDGET_PERCENT, |p| p.value);
        if !(0.0..=100.0).contains(&percent) {
            return Err(ConfigError::new(
                &c.name,
                format!("circuit_breakers.thresholds[{i}].retry_budget.budget_percent"),
                format!("expected a percentage from 0 to 100, got {percent}"),
            ));
        }
        if b.budget_interval.as_ref().is_some_and(|d| d.seconds != 0 || d.nanos != 0) {
            return Err(ConfigError::new(
                &c.name,
                format!("circuit_breakers.thresholds[{i}].retry_budget.budget_interval"),
                "a budget_interval is not supported: the budget counts the active and pending requests",
            ));
        }
        l.retry_budget = Some(RetryBudget {
            budget_percent: percent,
            min_retry_concurrency: b.min_retry_concurrency.as_ref().map_or(DEFAULT_MIN_RETRY_CONCURRENCY, |v| v.value),
        });
    }
    Ok(l)
}

/// Envoy's `retry_budget.budget_percent` default.
const DEFAULT_BUDGET_PERCENT: f64 = 20.0;
/// Envoy's `retry_budget.min_retry_concurrency` default.
const DEFAULT_MIN_RETRY_CONCURRENCY: u32 = 3;

/// The per-connection settings: `common_http_protocol_options` from the cluster's
/// `HttpProtocolOptions` (or the deprecated cluster fields), `max_requests_per_connection`
/// and `upstream_connection_options.tcp_keepalive`. Zero durations and counts mean "no
/// limit", as in Envoy.
fn conn_settings(c: &XdsCluster) -> Result<ConnSettings, ConfigError> {
    let mut s = ConnSettings::default();
    #[allow(deprecated)]
    let mut common = c.common_http_protocol_options;
    #[allow(deprecated)]
    let mut per_conn = c.max_requests_per_connection.as_ref().map(|v| v.value);
    let mut at = "common_http_protocol_options".to_string();
    if let Some(any) = c.typed_extension_protocol_options.get(HTTP_PROTOCOL_OPTIONS_KEY) {
        // The type was checked by `protocol`.
        if let Ok(opts) = HttpProtocolOptions::decode(any.value.as_slice()) {
            if opts.common_http_protocol_options.is_some() {
                common = opts.common_http_protocol_options;
                at = format!(
                    "typed_extension_protocol_options[{HTTP_PROTOCOL_OPTIONS_KEY}].common_http_protocol_options"
                );
            }
        }
    }
    let nonzero = |d: &Option<envoy_types::pb::google::protobuf::Duration>, field: &str| {
        d.as_ref()
            .map(|d| crate::route::to_duration(d, field).map_err(|(f, m)| ConfigError::new(&c.name, f, m)))
            .transpose()
            .map(|d| d.filter(|d| !d.is_zero()))
    };
    if let Some(o) = &common {
        s.idle_timeout = nonzero(&o.idle_timeout, &format!("{at}.idle_timeout"))?;
        s.max_connection_duration = nonzero(&o.max_connection_duration, &format!("{at}.max_connection_duration"))?;
        if let Some(v) = &o.max_requests_per_connection {
            per_conn = Some(v.value);
        }
    }
    s.max_requests_per_connection = per_conn.filter(|n| *n > 0);
    if let Some(k) = c.upstream_connection_options.as_ref().and_then(|o| o.tcp_keepalive.as_ref()) {
        s.keepalive = Some(Keepalive {
            probes: k.keepalive_probes.as_ref().map(|v| v.value),
            time: k.keepalive_time.as_ref().map(|v| Duration::from_secs(u64::from(v.value))),
            interval: k.keepalive_interval.as_ref().map(|v| Duration::from_secs(u64::from(v.value))),
        });
    }
    Ok(s)
}
