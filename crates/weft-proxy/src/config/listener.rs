//! Compiles an Envoy `Listener` into a [`ListenerConfig`]: where to bind, how to pick a
//! filter chain for a connection, and what each chain does (HTTP or TCP proxy).

use crate::tls::Secrets;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::listener::v3::{filter, FilterChain, FilterChainMatch, Listener};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, http_filter, HttpConnectionManager,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use prost::Name;

use crate::error::ConfigError;
use crate::net::in_range;
use crate::proto::{decode, opt_duration, socket_addr};
use crate::rbac::{RbacFilter, HTTP_RBAC_TYPE, NETWORK_RBAC_TYPE};
use crate::route::{ClusterChoice, FaultPolicy, RouteTable};

/// Which way traffic flows through a listener (Envoy's `traffic_direction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Unspecified: treated as outbound for telemetry.
    Unspecified,
    /// Traffic arriving for the local workload.
    Inbound,
    /// Traffic leaving the local workload.
    Outbound,
}

/// A compiled listener.
#[derive(Debug)]
pub struct ListenerConfig {
    /// Listener name.
    pub name: String,
    /// The address it binds (or, when `bind` is false, the original destination it claims).
    pub address: SocketAddr,
    /// False for listeners that only receive connections handed over by a
    /// `use_original_dst` listener.
    pub bind: bool,
    /// Hand connections to the listener matching their original destination.
    pub use_original_dst: bool,
    /// Read the original destination (Envoy's `original_dst` listener filter) for chain
    /// matching, without handing the connection to another listener.
    pub original_dst_filter: bool,
    /// Traffic direction.
    pub direction: Direction,
    /// Filter chains in configuration order.
    pub chains: Vec<Arc<FilterChainConfig>>,
    /// Chain used when no chain matches.
    pub default_chain: Option<Arc<FilterChainConfig>>,
    /// Whether any chain matches on sniffed protocol (TLS / ALPN / HTTP), so the first
    /// bytes must be inspected before a chain can be chosen.
    pub needs_sniffing: bool,
    /// How long to wait for the client's first bytes when sniffing (Envoy's
    /// `listener_filters_timeout`, default 15 s).
    pub sniff_timeout: Duration,
}

/// One filter chain.
#[derive(Debug)]
pub struct FilterChainConfig {
    /// Chain name (may be empty).
    pub name: String,
    /// When the chain applies.
    pub matcher: ChainMatch,
    /// What the chain does with the connection.
    pub kind: ChainKind,
    /// TLS to terminate before the filters (a `DownstreamTlsContext` transport socket).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// What an open connection cannot change in place (see [`FixedAtAccept`]).
    pub fixed: FixedAtAccept,
}

/// The parts of a filter chain fixed when a connection is accepted: its transport socket
/// (TLS or plaintext, certificates, client-certificate requirement) and its terminal
/// filter's settings, except what is decided per request (an HTTP connection manager's
/// `http_filters` and routes). An open connection whose chain, re-matched in a new
/// configuration, differs here drains (see `conn.rs`); otherwise it carries on with
/// the new chain. Kept as protos: prost's `PartialEq` compares maps by content, which an
/// encoding of them would not.
#[derive(Debug, Clone, PartialEq)]
pub struct FixedAtAccept {
    transport: Option<envoy_types::pb::envoy::config::core::v3::TransportSocket>,
    terminal: Terminal,
}

#[derive(Debug, Clone, PartialEq)]
enum Terminal {
    Http(Box<HttpConnectionManager>),
    Tcp(Box<TcpProxy>),
}

/// Envoy's `FilterChainMatch`, the subset weft supports.
#[derive(Debug, Default, Clone)]
pub struct ChainMatch {
    /// Original destination port.
    pub destination_port: Option<u16>,
    /// Original destination address ranges.
    pub prefix_ranges: Vec<(IpAddr, u8)>,
    /// Source address ranges.
    pub source_prefix_ranges: Vec<(IpAddr, u8)>,
    /// `tls` or `raw_buffer` (empty: any).
    pub transport_protocol: String,
    /// ALPN / detected application protocols (`http/1.1`, `h2c`, ...).
    pub application_protocols: Vec<String>,
    /// SNI server names.
    pub server_names: Vec<String>,
}

/// What a filter chain does.
#[derive(Debug)]
pub enum ChainKind {
    /// HTTP connection manager.
    Http(Arc<HttpChain>),
    /// Opaque TCP proxy.
    Tcp(Arc<TcpChain>),
}

/// Where an HTTP chain gets its routes.
#[derive(Debug)]
pub enum RouteSource {
    /// By name over RDS.
    Rds(String),
    /// Inline in the listener.
    Inline(Arc<RouteTable>),
}

/// A compiled HTTP connection manager.
#[derive(Debug)]
pub struct HttpChain {
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// Routes.
    pub routes: RouteSource,
    /// Listener-level fault filter configuration (routes may override it).
    pub fault: Option<FaultPolicy>,
    /// Upgrade types allowed (lower case, e.g. `websocket`, `connect`).
    pub upgrades: Vec<String>,
    /// The CORS filter is in the chain (routes' CORS policies apply only then).
    pub cors: bool,
    /// Stream idle timeout (Envoy default 5 minutes; `None` disables).
    pub stream_idle_timeout: Option<Duration>,
    /// Connection idle timeout (Envoy default 1 hour; `None` disables).
    pub idle_timeout: Option<Duration>,
    /// Time to receive a request's headers (`request_headers_timeout`; weft's default
    /// 30 s where Envoy has none; `None`: explicitly disabled with 0).
    pub request_headers_timeout: Option<Duration>,
    /// Largest request head in bytes (`max_request_headers_kb`, Envoy default 60 KiB).
    pub max_request_headers_bytes: usize,
    /// Most request headers (`common_http_protocol_options.max_headers_count`, default 100).
    pub max_headers_count: usize,
    /// JWT filters (request authentication), in chain order; they run first.
    pub jwt: Vec<Arc<crate::jwt::JwtFilter>>,
    /// RBAC filters, in chain order; they run before CORS, faults and the router.
    pub rbac: Vec<Arc<RbacFilter>>,
    /// Local rate limit filters, in chain order; they run after RBAC and route
    /// selection, before CORS, faults and the router.
    pub local_ratelimit: Vec<Arc<crate::ratelimit::RateLimitFilter>>,
    /// Network RBAC filters placed before the connection manager: checked once per
    /// connection, before any request is read.
    pub network_rbac: Vec<Arc<RbacFilter>>,
    /// `tracing`: absent, no spans and trace headers pass through untouched. Decided
    /// per request, so a change applies to open connections from their next request.
    pub tracing: Option<Arc<crate::telemetry::trace::TracingConfig>>,
}

/// A compiled TCP proxy.
#[derive(Debug)]
pub struct TcpChain {
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// Upstream cluster(s).
    pub clusters: ClusterChoice,
    /// Idle timeout (Envoy default 1 hour; `None` disables).
    pub idle_timeout: Option<Duration>,
    /// Network RBAC filters before the `tcp_proxy`, in chain order.
    pub rbac: Vec<Arc<RbacFilter>>,
}

impl ListenerConfig {
    /// Compiles a listener. Errors name the listener and field.
    pub fn compile(l: &Listener) -> Result<ListenerConfig, ConfigError> {
        Self::compile_in(l, &Secrets::default())
    }

    /// Like [`ListenerConfig::compile`], resolving the mesh's SDS secrets through `secrets`.
    pub fn compile_in(l: &Listener, secrets: &Secrets) -> Result<ListenerConfig, ConfigError> {
        let name = l.name.clone();
        let err = |field: &str, msg: String| ConfigError::new(format!("listener {name:?}"), field, msg);
        if name.is_empty() {
            return Err(ConfigError::new("listener", "name", "a listener needs a name"));
        }
        let address = socket_addr(l.address.as_ref()).map_err(|m| err("address", m))?;
        let mut chains = Vec::with_capacity(l.filter_chains.len());
        for (i, fc) in l.filter_chains.iter().enumerate() {
            let scope = format!("listener/{name}/{}", if fc.name.is_empty() { i.to_string() } else { fc.name.clone() });
            let chain =
                compile_chain(fc, secrets, &scope).map_err(|(f, m)| err(&format!("filter_chains[{i}].{f}"), m))?;
            chains.push(Arc::new(chain));
        }
        let default_chain = match &l.default_filter_chain {
            Some(fc) => Some(Arc::new(
                compile_chain(fc, secrets, &format!("listener/{name}/default"))
                    .map_err(|(f, m)| err(&format!("default_filter_chain.{f}"), m))?,
            )),
            None => None,
        };
        if chains.is_empty() && default_chain.is_none() {
            return Err(err("filter_chains", "at least one filter chain (or default_filter_chain) is required".into()));
        }
        let needs_sniffing = chains.iter().any(|c| {
            !c.matcher.transport_protocol.is_empty()
                || !c.matcher.application_protocols.is_empty()
                || !c.matcher.server_names.is_empty()
        });
        let direction = match l.traffic_direction {
            1 => Direction::Inbound,
            2 => Direction::Outbound,
            _ => Direction::Unspecified,
        };
        Ok(ListenerConfig {
            name: name.clone(),
            address,
            bind: l.bind_to_port.as_ref().map(|b| b.value).unwrap_or(true),
            use_original_dst: l.use_original_dst.as_ref().map(|b| b.value).unwrap_or(false),
            original_dst_filter: l.listener_filters.iter().any(|f| {
                f.name == "envoy.filters.listener.original_dst"
                    || matches!(&f.config_type, Some(envoy_types::pb::envoy::config::listener::v3::listener_filter::ConfigType::TypedConfig(a))
                        if a.type_url.ends_with("envoy.extensions.filters.listener.original_dst.v3.OriginalDst"))
            }),
            direction,
            chains,
            default_chain,
            needs_sniffing,
            sniff_timeout: opt_duration(l.listener_filters_timeout.as_ref()).unwrap_or(Duration::from_secs(15)),
        })
    }

    /// RDS route configuration names this listener needs.
    pub fn rds_names(&self) -> impl Iterator<Item = &str> {
        self.chains.iter().chain(self.default_chain.iter()).filter_map(|c| match &c.kind {
            ChainKind::Http(h) => match &h.routes {
                RouteSource::Rds(n) => Some(n.as_str()),
                RouteSource::Inline(_) => None,
            },
            ChainKind::Tcp(_) => None,
        })
    }

    /// Clusters the listener sends to by itself: TCP proxy clusters and the clusters of
    /// inline route tables (RDS tables name theirs separately).
    pub fn cluster_names(&self) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        for c in self.chains.iter().chain(self.default_chain.iter()) {
            match &c.kind {
                ChainKind::Tcp(t) => match &t.clusters {
                    crate::route::ClusterChoice::Single(n) => {
                        out.insert(n.to_string());
                    }
                    crate::route::ClusterChoice::Weighted(list, _) => {
                        out.extend(list.iter().map(|(n, _)| n.to_string()))
                    }
                },
                ChainKind::Http(h) => {
                    if let RouteSource::Inline(t) = &h.routes {
                        out.extend(t.cluster_names());
                    }
                }
            }
        }
        out
    }

    /// The collector clusters the chains' tracing providers name, with the field that
    /// names each (for a NACK when the cluster is unknown).
    pub fn tracing_clusters(&self) -> Vec<(String, String)> {
        let all = self.chains.iter().enumerate().map(|(i, c)| (format!("filter_chains[{i}]"), c));
        let all = all.chain(self.default_chain.iter().map(|c| ("default_filter_chain".to_string(), c)));
        all.filter_map(|(at, c)| match &c.kind {
            ChainKind::Http(h) => h.tracing.as_ref()?.provider.as_ref().map(|p| (at, p.cluster.clone())),
            ChainKind::Tcp(_) => None,
        })
        .collect()
    }

    /// Picks the filter chain for a connection, following Envoy's order of criteria:
    /// destination port, destination IP, server name, transport protocol, application
    /// protocols, source IP. The most specific match wins at each step.
    pub fn select_chain(&self, conn: &ConnFacts) -> Option<&Arc<FilterChainConfig>> {
        let mut cands: Vec<&Arc<FilterChainConfig>> = self.chains.iter().collect();
        cands = narrow(cands, |m| match m.destination_port {
            Some(p) if p == conn.destination.port() => Some(1),
            Some(_) => None,
            None => Some(0),
        });
        cands = narrow(cands, |m| best_prefix(&m.prefix_ranges, conn.destination.ip()));
        cands = narrow(cands, |m| {
            if m.server_names.is_empty() {
                return Some(0);
            }
            let sni = conn.server_name.as_deref()?;
            m.server_names.iter().filter_map(|n| server_name_score(n, sni)).max()
        });
        cands = narrow(cands, |m| match m.transport_protocol.as_str() {
            "" => Some(0),
            t if t == conn.transport_protocol => Some(1),
            _ => None,
        });
        cands = narrow(cands, |m| {
            if m.application_protocols.is_empty() {
                Some(0)
            } else if m.application_protocols.iter().any(|p| conn.application_protocols.iter().any(|c| c == p)) {
                Some(1)
            } else {
                None
            }
        });
        cands = narrow(cands, |m| best_prefix(&m.source_prefix_ranges, conn.source.ip()));
        cands.into_iter().next().or(self.default_chain.as_ref())
    }
}

/// What is known about a connection when choosing its filter chain.
#[derive(Debug, Clone)]
pub struct ConnFacts {
    /// Peer address.
    pub source: SocketAddr,
    /// Original (or local) destination.
    pub destination: SocketAddr,
    /// `tls` or `raw_buffer`.
    pub transport_protocol: &'static str,
    /// Detected application protocols.
    pub application_protocols: Vec<&'static str>,
    /// SNI, when TLS.
    pub server_name: Option<String>,
}

fn narrow(
    cands: Vec<&Arc<FilterChainConfig>>,
    score: impl Fn(&ChainMatch) -> Option<u32>,
) -> Vec<&Arc<FilterChainConfig>> {
    let scored: Vec<(u32, &Arc<FilterChainConfig>)> =
        cands.into_iter().filter_map(|c| score(&c.matcher).map(|s| (s, c))).collect();
    let best = scored.iter().map(|(s, _)| *s).max();
    scored.into_iter().filter(|(s, _)| Some(*s) == best).map(|(_, c)| c).collect()
}

/// 0 when no ranges (matches anything), 1 + prefix length of the longest matching range,
/// `None` when ranges exist and none matches.
fn best_prefix(ranges: &[(IpAddr, u8)], ip: IpAddr) -> Option<u32> {
    if ranges.is_empty() {
        return Some(0);
    }
    ranges.iter().filter(|(net, len)| in_range(ip, *net, *len)).map(|(_, len)| 1 + u32::from(*len)).max()
}

fn server_name_score(pattern: &str, sni: &str) -> Option<u32> {
    let sni = sni.to_ascii_lowercase();
    let pattern = pattern.to_ascii_lowercase();
    if pattern == sni {
        Some(u32::MAX)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        sni.ends_with(suffix).then_some(suffix.len() as u32)
    } else {
        None
    }
}

fn compile_chain(fc: &FilterChain, secrets: &Secrets, scope: &str) -> Result<FilterChainConfig, (String, String)> {
    let tls = match &fc.transport_socket {
        None => None,
        Some(ts) if ts.name == "envoy.transport_sockets.raw_buffer" => None,
        Some(ts) => Some(crate::tls::server_config(ts, secrets).map_err(|m| ("transport_socket".to_string(), m))?),
    };
    let matcher = match &fc.filter_chain_match {
        Some(m) => compile_match(m).map_err(|(f, m)| (format!("filter_chain_match.{f}"), m))?,
        None => ChainMatch::default(),
    };
    let mut kind = None;
    let mut terminal = None;
    let mut rbac = Vec::new();
    for (i, f) in fc.filters.iter().enumerate() {
        let field = format!("filters[{i}]");
        let any = match &f.config_type {
            Some(filter::ConfigType::TypedConfig(any)) => any,
            _ => return Err((field, format!("filter {:?} needs a typed_config", f.name))),
        };
        if kind.is_some() {
            return Err((
                field,
                "a terminal filter (http_connection_manager / tcp_proxy) must be the last filter".into(),
            ));
        }
        if any.type_url == NETWORK_RBAC_TYPE {
            let filter =
                RbacFilter::from_network(any, &f.name).map_err(|(f, m)| (join(&field, "typed_config", &f), m))?;
            rbac.push(Arc::new(filter));
        } else if any.type_url == HttpConnectionManager::type_url() {
            let hcm = decode::<HttpConnectionManager>(any).map_err(|m| (field.clone(), m))?;
            let mut chain = compile_hcm(&hcm, scope).map_err(|(f, m)| (format!("{field}.typed_config.{f}"), m))?;
            chain.network_rbac = std::mem::take(&mut rbac);
            kind = Some(ChainKind::Http(Arc::new(chain)));
            // Filters, routes and tracing apply per request: not fixed at accept.
            terminal = Some(Terminal::Http(Box::new(HttpConnectionManager {
                http_filters: Vec::new(),
                route_specifier: None,
                tracing: None,
                ..hcm
            })));
        } else if any.type_url == TcpProxy::type_url() {
            let tp = decode::<TcpProxy>(any).map_err(|m| (field.clone(), m))?;
            let mut chain = compile_tcp(&tp).map_err(|(f, m)| (format!("{field}.typed_config.{f}"), m))?;
            chain.rbac = std::mem::take(&mut rbac);
            kind = Some(ChainKind::Tcp(Arc::new(chain)));
            terminal = Some(Terminal::Tcp(Box::new(tp)));
        } else {
            return Err((
                format!("{field}.typed_config"),
                format!(
                    "unsupported network filter {:?} ({}); expected rbac, http_connection_manager or tcp_proxy",
                    f.name, any.type_url
                ),
            ));
        }
    }
    let (Some(kind), Some(terminal)) = (kind, terminal) else {
        return Err((
            "filters".to_string(),
            "a filter chain needs an http_connection_manager or tcp_proxy filter".to_string(),
        ));
    };
    let fixed = FixedAtAccept { transport: fc.transport_socket.clone(), terminal };
    Ok(FilterChainConfig { name: fc.name.clone(), matcher, kind, tls, fixed })
}

fn compile_match(m: &FilterChainMatch) -> Result<ChainMatch, (String, String)> {
    let destination_port = match &m.destination_port {
        Some(p) => Some(
            u16::try_from(p.value)
                .map_err(|_| ("destination_port".to_string(), format!("{} is not a port", p.value)))?,
        ),
        None => None,
    };
    let ranges = |rs: &[CidrRange], field: &str| -> Result<Vec<(IpAddr, u8)>, (String, String)> {
        rs.iter()
            .enumerate()
            .map(|(i, r)| {
                let ip: IpAddr = r.address_prefix.parse().map_err(|_| {
                    (format!("{field}[{i}].address_prefix"), format!("{:?} is not an IP address", r.address_prefix))
                })?;
                let len = r.prefix_len.as_ref().map(|l| l.value).unwrap_or(if ip.is_ipv4() { 32 } else { 128 });
                let max = if ip.is_ipv4() { 32 } else { 128 };
                if len > max {
                    return Err((format!("{field}[{i}].prefix_len"), format!("{len} exceeds {max}")));
                }
                Ok((ip, len as u8))
            })
            .collect()
    };
    Ok(ChainMatch {
        destination_port,
        prefix_ranges: ranges(&m.prefix_ranges, "prefix_ranges")?,
        source_prefix_ranges: ranges(&m.source_prefix_ranges, "source_prefix_ranges")?,
        transport_protocol: m.transport_protocol.clone(),
        application_protocols: m.application_protocols.clone(),
        server_names: m.server_names.clone(),
    })
}

const KNOWN_HTTP_FILTERS: &[&str] = &[
    "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
    "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
    CORS_FILTER_TYPE,
];
const CORS_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors";

fn compile_hcm(h: &HttpConnectionManager, scope: &str) -> Result<HttpChain, (String, String)> {
    let routes = match &h.route_specifier {
        Some(RouteSpecifier::Rds(rds)) => {
            if rds.route_config_name.is_empty() {
                return Err(("rds.route_config_name".into(), "must not be empty".into()));
            }
            RouteSource::Rds(rds.route_config_name.clone())
        }
        Some(RouteSpecifier::RouteConfig(rc)) => RouteSource::Inline(Arc::new(
            RouteTable::compile(rc).map_err(|e| (format!("route_config.{}", e.field), e.message))?,
        )),
        Some(_) => {
            return Err(("route_specifier".into(), "scoped routes are not supported; use rds or route_config".into()))
        }
        None => return Err(("route_specifier".into(), "rds or route_config is required".into())),
    };
    let mut fault = None;
    let mut cors = false;
    let mut rbac = Vec::new();
    let mut jwt = Vec::new();
    let mut local_ratelimit = Vec::new();
    for (i, f) in h.http_filters.iter().enumerate() {
        if f.disabled {
            continue;
        }
        let field = format!("http_filters[{i}]");
        let any = match &f.config_type {
            Some(http_filter::ConfigType::TypedConfig(any)) => any,
            _ if f.name == "envoy.filters.http.router" => continue,
            _ => return Err((field, format!("http filter {:?} needs a typed_config", f.name))),
        };
        if any.type_url == "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault" {
            fault = Some(FaultPolicy::from_any(any).map_err(|m| (format!("{field}.typed_config"), m))?);
        } else if any.type_url == CORS_FILTER_TYPE {
            cors = true;
        } else if any.type_url == HTTP_RBAC_TYPE {
            let filter = RbacFilter::from_http(any, &f.name, &h.stat_prefix)
                .map_err(|(f, m)| (join(&field, "typed_config", &f), m))?;
            rbac.push(Arc::new(filter));
        } else if any.type_url == crate::jwt::JWT_AUTHN_TYPE {
            let filter = crate::jwt::JwtFilter::from_any(any, &f.name)
                .map_err(|(f, m)| (join(&field, "typed_config", &f), m))?;
            jwt.push(Arc::new(filter));
        } else if any.type_url == crate::ratelimit::LOCAL_RATELIMIT_TYPE || f.name == crate::ratelimit::FILTER_NAME {
            let filter = crate::ratelimit::compile_filter(any, &f.name, scope)
                .map_err(|(f, m)| (join(&field, "typed_config", &f), m))?;
            local_ratelimit.push(Arc::new(filter));
        } else if !KNOWN_HTTP_FILTERS.contains(&any.type_url.as_str()) && !f.is_optional {
            return Err((
                format!("{field}.typed_config"),
                format!("unsupported http filter {:?} ({}); mark it is_optional to skip it", f.name, any.type_url),
            ));
        }
    }
    let upgrades = h
        .upgrade_configs
        .iter()
        .filter(|u| u.enabled.as_ref().map(|b| b.value).unwrap_or(true))
        .map(|u| u.upgrade_type.to_ascii_lowercase())
        .collect();
    let max_kb = h.max_request_headers_kb.map_or(60, |v| v.value);
    if !(1..=8192).contains(&max_kb) {
        return Err(("max_request_headers_kb".into(), format!("{max_kb} is outside 1..=8192")));
    }
    let max_headers_count =
        h.common_http_protocol_options.as_ref().and_then(|o| o.max_headers_count).map_or(100, |v| v.value);
    if max_headers_count == 0 {
        return Err(("common_http_protocol_options.max_headers_count".into(), "must be at least 1".into()));
    }
    let tracing = match &h.tracing {
        Some(t) => Some(Arc::new(
            crate::telemetry::trace::TracingConfig::compile(t).map_err(|(f, m)| (format!("tracing.{f}"), m))?,
        )),
        None => None,
    };
    Ok(HttpChain {
        tracing,
        request_headers_timeout: timeout_or(h.request_headers_timeout.as_ref(), Duration::from_secs(30)),
        max_request_headers_bytes: max_kb as usize * 1024,
        max_headers_count: max_headers_count as usize,
        stat_prefix: h.stat_prefix.clone(),
        routes,
        fault,
        upgrades,
        cors,
        stream_idle_timeout: timeout_or(h.stream_idle_timeout.as_ref(), Duration::from_secs(300)),
        idle_timeout: timeout_or(
            h.common_http_protocol_options.as_ref().and_then(|o| o.idle_timeout.as_ref()),
            Duration::from_secs(3600),
        ),
        jwt,
        rbac,
        local_ratelimit,
        network_rbac: Vec::new(),
    })
}

fn compile_tcp(t: &TcpProxy) -> Result<TcpChain, (String, String)> {
    let clusters = match &t.cluster_specifier {
        Some(tcp_proxy::ClusterSpecifier::Cluster(c)) if !c.is_empty() => ClusterChoice::Single(Arc::from(c.as_str())),
        Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => {
            let list: Vec<(Arc<str>, u32)> =
                w.clusters.iter().map(|c| (Arc::from(c.name.as_str()), c.weight)).collect();
            let total: u32 = list.iter().map(|(_, w)| *w).sum();
            if list.is_empty() || total == 0 {
                return Err(("weighted_clusters".into(), "needs at least one cluster with a weight above 0".into()));
            }
            ClusterChoice::Weighted(list, total)
        }
        _ => return Err(("cluster".into(), "a cluster or weighted_clusters is required".into())),
    };
    Ok(TcpChain {
        stat_prefix: t.stat_prefix.clone(),
        clusters,
        idle_timeout: timeout_or(t.idle_timeout.as_ref(), Duration::from_secs(3600)),
        rbac: Vec::new(),
    })
}

/// `a.b.c`, leaving out empty parts.
fn join(a: &str, b: &str, c: &str) -> String {
    [a, b, c].iter().filter(|p| !p.is_empty()).copied().collect::<Vec<_>>().join(".")
}

/// Envoy's timeout convention: unset -> `default`, zero -> disabled.
fn timeout_or(d: Option<&PbDuration>, default: Duration) -> Option<Duration> {
    match opt_duration(d) {
        None => Some(default),
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
    }
}
