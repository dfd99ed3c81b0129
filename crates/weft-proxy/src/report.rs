//! Telemetry glue for the data path: what each request and TCP connection reports
//! (Istio metrics labels, the access-log line) and the peer-metadata exchange that
//! tells each side which workload is on the other end.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, Request, Version};
use weft_xds::NodeInfo;

use crate::config::Direction;
use crate::conn::ConnInfo;
use crate::context::Context;
use crate::error::ErrorKind;
use crate::telemetry::accesslog::{self, AccessRecord};
use crate::telemetry::metrics::{Reporter, RequestLabels, RequestProtocol, SecurityPolicy, TcpLabels};
use crate::telemetry::{peer, WorkloadInfo};

/// The local workload as metrics describe it, from the bootstrap's node metadata.
pub fn local_workload(node: &NodeInfo) -> WorkloadInfo {
    let or_unknown = |s: &str| {
        if s.is_empty() {
            crate::telemetry::UNKNOWN.to_string()
        } else {
            s.to_string()
        }
    };
    let label = |k: &str| node.labels.get(k).cloned();
    let app = label("service.istio.io/canonical-name").or_else(|| label("app")).unwrap_or_default();
    let version = label("service.istio.io/canonical-revision").or_else(|| label("version")).unwrap_or_default();
    let workload = node.labels.get("weft.dev/workload").cloned().unwrap_or_else(|| node.name.clone());
    WorkloadInfo {
        workload: or_unknown(&workload),
        namespace: or_unknown(&node.namespace),
        app: or_unknown(&app),
        version: or_unknown(&version),
        cluster: "Kubernetes".into(),
        service_account: or_unknown(&node.service_account),
        canonical_service: or_unknown(&app),
        canonical_revision: if version.is_empty() { "latest".into() } else { version.clone() },
        ..WorkloadInfo::default()
    }
}

fn reporter(d: Direction) -> Reporter {
    match d {
        Direction::Inbound => Reporter::Destination,
        _ => Reporter::Source,
    }
}

/// Adds (outbound) or strips (inbound) peer metadata on the request going upstream:
/// outbound, this proxy's own replaces whatever the application sent; inbound, the
/// application never sees the caller's.
pub fn on_upstream_request(ctx: &Context, conn: &ConnInfo, headers: &mut HeaderMap) {
    match conn.listener.direction {
        Direction::Inbound => {
            peer::strip(headers);
        }
        _ => ctx.local_peer.insert(headers),
    }
}

/// One request's telemetry, filled in as it proceeds and reported when its response
/// body ends.
pub struct HttpReport {
    start: Instant,
    start_time: SystemTime,
    direction: Direction,
    downstream_remote: SocketAddr,
    downstream_local: SocketAddr,
    method: String,
    path: String,
    protocol: &'static str,
    grpc: bool,
    user_agent: Option<String>,
    x_forwarded_for: Option<String>,
    /// The request id (taken from `x-request-id` or generated).
    pub request_id: String,
    peer: Option<Arc<WorkloadInfo>>,
    /// Inbound: the request carried peer metadata, so the response announces ours (a
    /// caller outside the mesh is told nothing, as with Istio's sidecars).
    announce: bool,
    /// The peer's SPIFFE id from mTLS (inbound).
    peer_principal: Option<Arc<str>>,
    /// The connection's peer built from that id (used when no metadata header came).
    peer_workload: Option<Arc<WorkloadInfo>>,
    flags: Vec<&'static str>,
    /// Authority the request was for.
    pub authority: String,
    /// Route that matched.
    pub route_name: String,
    /// Upstream cluster chosen.
    pub cluster: String,
    /// Upstream endpoint of the last attempt.
    pub upstream_host: Option<SocketAddr>,
    /// Time to the upstream response headers.
    pub upstream_service_time: Option<Duration>,
    /// Retries made.
    pub retries: u32,
    /// Status sent downstream.
    pub response_code: u16,
    /// `grpc-status` seen in headers or trailers.
    pub grpc_status: Option<String>,
    /// Bytes of request body read (when forwarded), and whether reading it failed.
    pub request_body: Option<Arc<crate::io::BodyTally>>,
    /// Bytes of response body sent.
    pub response_bytes: u64,
    /// Status for a local error reply when the route configures one.
    pub local_status: Option<http::StatusCode>,
    /// Envoy's `response_code_details` when the proxy decided the status itself.
    pub details: Option<String>,
    /// The RBAC filters' access-log metadata.
    pub rbac: Vec<(String, String)>,
    /// The request's tracing span, when its connection manager traces.
    pub trace: Option<Box<crate::telemetry::trace::ActiveSpan>>,
}

impl HttpReport {
    /// Starts the report for a request that just arrived.
    pub fn start<B>(ctx: &Context, conn: &ConnInfo, req: &Request<B>) -> Self {
        let h = req.headers();
        let text = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        // Method, path, user agent and forwarded-for only go to the access log: no
        // copies when it is off.
        let log = ctx.access_log.is_enabled();
        let inbound = conn.listener.direction == Direction::Inbound;
        let metadata = if inbound { h.get(peer::PEER_HEADER) } else { None };
        let announce = metadata.is_some() || (inbound && h.contains_key(peer::PEER_ID_HEADER));
        let peer = metadata.and_then(|v| ctx.peers.decode(v));
        HttpReport {
            start: Instant::now(),
            start_time: SystemTime::now(),
            direction: conn.listener.direction,
            downstream_remote: conn.peer,
            downstream_local: conn.destination,
            peer_principal: conn.peer_principal.clone(),
            peer_workload: conn.peer_workload.clone(),
            method: if log { req.method().to_string() } else { String::new() },
            path: match req.uri().path_and_query() {
                _ if !log => String::new(),
                Some(p) => p.as_str().to_string(),
                None => "/".into(),
            },
            protocol: match req.version() {
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            grpc: crate::route::is_grpc(h),
            user_agent: if log { text("user-agent") } else { None },
            x_forwarded_for: if log { text("x-forwarded-for") } else { None },
            request_id: text("x-request-id").unwrap_or_else(|| format!("{:032x}", rand::random::<u128>())),
            peer,
            announce,
            flags: Vec::new(),
            authority: String::new(),
            route_name: String::new(),
            cluster: String::new(),
            upstream_host: None,
            upstream_service_time: None,
            retries: 0,
            response_code: 0,
            grpc_status: None,
            request_body: None,
            response_bytes: 0,
            local_status: None,
            details: None,
            rbac: Vec::new(),
            trace: None,
        }
    }

    /// The downstream peer's address.
    pub fn downstream_remote(&self) -> SocketAddr {
        self.downstream_remote
    }

    /// The address the request arrived on.
    pub fn downstream_local(&self) -> SocketAddr {
        self.downstream_local
    }

    /// Envoy's response flags so far (`-` when none).
    pub fn response_flags(&self) -> Cow<'static, str> {
        self.flags_text()
    }

    /// Records what the RBAC filters decided.
    pub fn rbac(&mut self, verdict: crate::rbac::Verdict) {
        self.details = verdict.details();
        self.rbac = verdict.into_log_metadata();
    }

    /// Adds an Envoy response flag (deduplicated).
    pub fn flag(&mut self, f: &'static str) {
        if !self.flags.contains(&f) {
            self.flags.push(f);
        }
    }

    /// True when the request is gRPC.
    pub fn is_grpc(&self) -> bool {
        self.grpc
    }

    /// The response body ended early: the downstream went away (`DC`), or the request
    /// body it was sending turned out malformed (`DPE`).
    pub fn downstream_or_upstream_reset(&mut self) {
        let failed = self.request_body.as_ref().and_then(|b| b.failure());
        self.flag(failed.map_or("DC", |k| k.response_flag()));
    }

    /// Response headers are about to go downstream (or, for an upstream answer, about to
    /// meet the route's header edits): learn the peer's metadata and strip it (outbound),
    /// or announce ours when the caller announced its own (inbound). Idempotent: the
    /// second call on the same response changes nothing.
    pub fn on_response_headers(&mut self, ctx: &Context, headers: &mut HeaderMap) {
        match self.direction {
            Direction::Inbound if self.announce => ctx.local_peer.insert(headers),
            Direction::Inbound => {
                peer::strip(headers);
            }
            _ => {
                if let Some(v) = peer::strip(headers) {
                    if self.peer.is_none() {
                        self.peer = ctx.peers.decode(&v);
                    }
                }
            }
        }
    }

    fn flags_text(&self) -> Cow<'static, str> {
        match self.flags.as_slice() {
            [] => Cow::Borrowed("-"),
            [one] => Cow::Borrowed(one),
            many => Cow::Owned(many.join(",")),
        }
    }

    /// Records metrics and writes the access-log line.
    pub fn finish(self, ctx: &Context) {
        let duration = self.start.elapsed();
        let request_bytes = self.request_body.as_ref().map(|b| b.bytes()).unwrap_or(0);
        crate::telemetry::trace::finish(ctx, &self, request_bytes);
        let local = ctx.local.clone();
        let peer = match (&self.peer, &self.peer_workload) {
            (Some(p), _) => with_principal(p.clone(), &self.peer_principal),
            (None, Some(w)) => w.clone(),
            (None, None) => ctx.unknown_peer.clone(),
        };
        let (source, destination) = match self.direction {
            Direction::Inbound => (peer, local),
            _ => (local, peer),
        };
        let security_policy = security_policy(self.direction, &self.peer_principal);
        let flags = self.flags_text();
        let labels = RequestLabels {
            reporter: reporter(self.direction),
            source,
            destination,
            service: ctx.services.get(&self.cluster, &self.authority),
            protocol: if self.grpc { RequestProtocol::Grpc } else { RequestProtocol::Http },
            response_code: self.response_code,
            grpc_status: self.grpc_status.as_deref().and_then(|s| s.parse().ok()),
            response_flags: flags.clone(),
            security_policy,
        };
        ctx.metrics.record_request(&labels, duration, request_bytes, self.response_bytes);
        if self.retries > 0 && !self.cluster.is_empty() {
            for _ in 0..self.retries {
                ctx.metrics.proxy().upstream_retry(&self.cluster);
            }
        }
        if !ctx.access_log.is_enabled() {
            return;
        }
        ctx.access_log.log(&AccessRecord {
            start_time: self.start_time,
            method: Some(self.method),
            path: Some(self.path),
            protocol: self.protocol.to_string(),
            response_code: self.response_code,
            response_flags: flags.into_owned(),
            response_code_details: self.details,
            bytes_received: request_bytes,
            bytes_sent: self.response_bytes,
            duration,
            upstream_service_time: self.upstream_service_time,
            x_forwarded_for: self.x_forwarded_for,
            user_agent: self.user_agent,
            request_id: Some(self.request_id),
            authority: Some(self.authority).filter(|a| !a.is_empty()),
            upstream_host: self.upstream_host,
            upstream_cluster: Some(self.cluster).filter(|c| !c.is_empty()),
            route_name: Some(self.route_name).filter(|r| !r.is_empty()),
            downstream_remote_address: Some(self.downstream_remote),
            downstream_local_address: Some(self.downstream_local),
            requested_server_name: None,
            direction: access_direction(self.direction),
            connection_termination_details: None,
            upstream_transport_failure_reason: None,
            rbac: self.rbac,
        });
    }
}

/// The peer as telemetry names it: the principal proven by its certificate wins over
/// what its metadata header claims (allocates only when they differ, which a peer with
/// a mesh identity never does).
fn with_principal(peer: Arc<WorkloadInfo>, principal: &Option<Arc<str>>) -> Arc<WorkloadInfo> {
    match principal {
        Some(p) if peer.principal != **p => Arc::new(WorkloadInfo { principal: p.to_string(), ..(*peer).clone() }),
        _ => peer,
    }
}

/// Istio's `connection_security_policy`: `mutual_tls` on inbound connections that
/// presented a verified mesh certificate, `none` otherwise.
fn security_policy(direction: Direction, principal: &Option<Arc<str>>) -> SecurityPolicy {
    match (direction, principal) {
        (Direction::Inbound, Some(_)) => SecurityPolicy::MutualTls,
        _ => SecurityPolicy::None,
    }
}

fn access_direction(d: Direction) -> accesslog::Direction {
    match d {
        Direction::Inbound => accesslog::Direction::Inbound,
        _ => accesslog::Direction::Outbound,
    }
}

/// One TCP connection's telemetry.
pub struct TcpReport {
    start: Instant,
    start_time: SystemTime,
    direction: Direction,
    labels: TcpLabels,
    cluster: String,
    downstream_remote: SocketAddr,
    downstream_local: SocketAddr,
    /// Upstream endpoint.
    pub upstream_host: Option<SocketAddr>,
    /// Bytes sent upstream (read from downstream).
    pub received: u64,
    /// Bytes sent downstream (read from upstream).
    pub sent: u64,
    /// The RBAC filters' access-log metadata.
    pub rbac: Vec<(String, String)>,
    details: Option<String>,
}

impl TcpReport {
    /// Counts the connection as opened.
    pub fn open(ctx: &Context, conn: &ConnInfo, cluster: &str) -> Self {
        let local = ctx.local.clone();
        let peer = conn.peer_workload.clone().unwrap_or_else(|| ctx.unknown_peer.clone());
        let (source, destination) = match conn.listener.direction {
            Direction::Inbound => (peer, local),
            _ => (local, peer),
        };
        let authority = conn.destination.to_string();
        let labels = TcpLabels {
            reporter: reporter(conn.listener.direction),
            source,
            destination,
            service: ctx.services.get(cluster, &authority),
            response_flags: Cow::Borrowed("-"),
            security_policy: security_policy(conn.listener.direction, &conn.peer_principal),
        };
        ctx.metrics.tcp_opened(&labels);
        TcpReport {
            start: Instant::now(),
            start_time: SystemTime::now(),
            direction: conn.listener.direction,
            labels,
            cluster: cluster.to_string(),
            downstream_remote: conn.peer,
            downstream_local: conn.destination,
            upstream_host: None,
            received: 0,
            sent: 0,
            rbac: Vec::new(),
            details: None,
        }
    }

    /// Records what the network RBAC filters decided.
    pub fn rbac(&mut self, verdict: crate::rbac::Verdict) {
        self.details = verdict.details();
        self.rbac = verdict.into_log_metadata();
    }

    /// Counts bytes and the close, and writes the access-log line.
    pub fn close(mut self, ctx: &Context, flag: Option<ErrorKind>) {
        if let Some(k) = flag {
            self.labels.response_flags = Cow::Borrowed(k.response_flag());
        }
        ctx.metrics.tcp_bytes(&self.labels, self.sent, self.received);
        ctx.metrics.tcp_closed(&self.labels);
        if !ctx.access_log.is_enabled() {
            return;
        }
        ctx.access_log.log(&AccessRecord {
            start_time: self.start_time,
            method: None,
            path: None,
            protocol: "tcp".into(),
            response_code: 0,
            response_flags: self.labels.response_flags.to_string(),
            response_code_details: None,
            rbac: self.rbac,
            bytes_received: self.received,
            bytes_sent: self.sent,
            duration: self.start.elapsed(),
            upstream_service_time: None,
            x_forwarded_for: None,
            user_agent: None,
            request_id: None,
            authority: None,
            upstream_host: self.upstream_host,
            upstream_cluster: Some(self.cluster),
            route_name: None,
            downstream_remote_address: Some(self.downstream_remote),
            downstream_local_address: Some(self.downstream_local),
            requested_server_name: None,
            direction: access_direction(self.direction),
            connection_termination_details: self.details.or_else(|| flag.map(|k| format!("{k:?}"))),
            upstream_transport_failure_reason: None,
        });
    }
}
