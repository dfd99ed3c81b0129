//! Telemetry glue for the data path: what each request and TCP connection reports
//! (Istio metrics labels, the access-log line) and the peer-metadata exchange that
//! tells each side which workload is on the other end.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, Version};
use weft_xds::NodeInfo;

use crate::config::Direction;
use crate::conn::ConnInfo;
use crate::context::Context;
use crate::error::ErrorKind;
use crate::telemetry::accesslog::{self, AccessRecord};
use crate::telemetry::metrics::{Reporter, RequestLabels, RequestProtocol, SecurityPolicy, TcpLabels};
use crate::telemetry::peer::{self, san_namespace, with_principal};
use crate::telemetry::WorkloadInfo;

/// The local workload as metrics describe it, from the bootstrap's node metadata and,
/// with mesh mTLS, the proxy's own SPIFFE id (`principal`). Follows Istio: the workload
/// is `WORKLOAD_NAME` (the Deployment, not the pod); canonical service and revision
/// come from [`canonical_service`]; the cluster is `CLUSTER_ID`, default `Kubernetes`.
pub fn local_workload(node: &NodeInfo, principal: Option<&str>) -> WorkloadInfo {
    let or_unknown = |s: &str| {
        if s.is_empty() {
            crate::telemetry::UNKNOWN.to_string()
        } else {
            s.to_string()
        }
    };
    let label = |k: &str| node.labels.get(k).filter(|v| !v.is_empty()).cloned();
    let workload = match node.labels.get("weft.dev/workload") {
        Some(w) if node.workload_name.is_empty() => w.clone(),
        _ => node.workload().to_string(),
    };
    let app = label("app").or_else(|| label("app.kubernetes.io/name")).unwrap_or_default();
    let version = label("version").or_else(|| label("app.kubernetes.io/version")).unwrap_or_default();
    let (canonical_service, canonical_revision) = canonical_service(&node.labels, &workload);
    let cluster = if node.cluster_id.is_empty() { weft_xds::node::DEFAULT_CLUSTER_ID } else { &node.cluster_id };
    WorkloadInfo {
        workload: or_unknown(&workload),
        namespace: or_unknown(&node.namespace),
        app: or_unknown(&app),
        version: or_unknown(&version),
        principal: or_unknown(principal.unwrap_or_default()),
        cluster: cluster.to_string(),
        service_account: or_unknown(&node.service_account),
        canonical_service: or_unknown(&canonical_service),
        canonical_revision,
    }
}

/// Istio's canonical service name and revision of a workload (`pkg/kube/labels`
/// `CanonicalService`): `service.istio.io/canonical-name`, else `app.kubernetes.io/name`,
/// else `app`, else the workload name; `service.istio.io/canonical-revision`, else
/// `app.kubernetes.io/version`, else `version`, else `latest`.
pub fn canonical_service(labels: &std::collections::BTreeMap<String, String>, workload: &str) -> (String, String) {
    let first = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k).filter(|v| !v.is_empty()).cloned());
    let name = first(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"])
        .unwrap_or_else(|| workload.to_string());
    let revision = first(&["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"])
        .unwrap_or_else(|| "latest".to_string());
    (name, revision)
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// A generated request id: 32 lowercase hex digits (what `format!("{:032x}")` gives,
/// without the formatting machinery, which cost ~800 instructions per request), as the
/// header value the upstream request carries: one allocation, shared by the report and
/// the header (a `String` and a header value made from it were two, plus a check).
/// Two digits per byte of `v` (a digit per 128-bit shift was ~400 instructions).
fn hex_id(v: u128) -> HeaderValue {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    for (pair, byte) in out.chunks_exact_mut(2).zip(v.to_be_bytes()) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
    }
    // Only ASCII hex digits were written: always a valid value.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(out)).unwrap_or_else(|_| HeaderValue::from_static(""))
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
pub fn on_upstream_request(ctx: &Context, conn: &ConnInfo, headers: &mut HeaderMap, in_mesh: bool) {
    match conn.listener.direction {
        Direction::Inbound => {
            peer::strip(headers);
        }
        // An upstream outside the mesh gets neither ours nor what the application sent.
        _ if !in_mesh => {
            peer::strip(headers);
        }
        _ => ctx.local_peer.insert(headers),
    }
}

/// A request's id. One taken from the request's `x-request-id` is copied (a slice of
/// the downstream read buffer would keep that buffer until the response ends): into the
/// report itself when it fits (UUIDs, as Envoy and weft generate, do: no allocation per
/// request); one generated is kept as the header value the upstream request carries.
enum RequestId {
    Inline(InlineId),
    Taken(String),
    Generated(HeaderValue),
}

impl RequestId {
    /// The id a request carried, copied: in place when it fits.
    fn taken(id: &str) -> RequestId {
        InlineId::new(id).map_or_else(|| RequestId::Taken(id.to_string()), RequestId::Inline)
    }

    fn as_str(&self) -> &str {
        match self {
            RequestId::Inline(id) => id.as_str(),
            RequestId::Taken(id) => id,
            // Hex digits only: the check cannot fail.
            RequestId::Generated(v) => v.to_str().unwrap_or_default(),
        }
    }
}

/// A short request id kept in place: `len` bytes of `bytes`, all from a `&str`.
struct InlineId {
    len: u8,
    bytes: [u8; InlineId::CAPACITY],
}

impl InlineId {
    /// Room for a UUID (36) with some to spare; the report is boxed, so its size is
    /// cheap.
    const CAPACITY: usize = 48;

    /// `id` in place, if it fits.
    fn new(id: &str) -> Option<InlineId> {
        let mut bytes = [0u8; InlineId::CAPACITY];
        bytes.get_mut(..id.len())?.copy_from_slice(id.as_bytes());
        Some(InlineId { len: u8::try_from(id.len()).ok()?, bytes })
    }

    fn as_str(&self) -> &str {
        // The bytes of a `&str` (`new`): the check cannot fail.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

/// One request's telemetry, filled in as it proceeds and reported when its response
/// body ends.
pub struct HttpReport {
    /// When the request arrived. Its wall-clock time, needed only by the access log and
    /// taps, is derived from it at the finish (one clock read per request fewer).
    start: Instant,
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
    request_id: RequestId,
    peer: Option<Arc<WorkloadInfo>>,
    /// The principal `peer` was decoded with (it has that principal applied already).
    peer_decoded_with: Option<Arc<str>>,
    /// Inbound: the request carried peer metadata, so the response announces ours (a
    /// caller outside the mesh is told nothing, as with Istio's sidecars).
    announce: bool,
    /// The peer's SPIFFE id from mTLS (inbound).
    peer_principal: Option<Arc<str>>,
    /// The connection's peer built from that id (used when no metadata header came).
    peer_workload: Option<Arc<WorkloadInfo>>,
    /// The upstream's SPIFFE id from the certificate it presented on the mTLS handshake
    /// (outbound; `destination_principal` of the source reporter).
    pub upstream_principal: Option<Arc<str>>,
    flags: Vec<&'static str>,
    /// Authority the request was for.
    pub authority: String,
    /// Route that matched (its name, shared with the route).
    pub route_name: Option<Arc<str>>,
    /// Upstream cluster chosen (its name, shared with the route).
    pub cluster: Option<Arc<str>>,
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
    pub rbac: Vec<crate::rbac::MetadataEntry>,
    /// The request's tracing span, when its connection manager traces.
    pub trace: Option<Box<crate::telemetry::trace::ActiveSpan>>,
}

impl HttpReport {
    /// Starts the report for a request that just arrived (its head).
    pub fn start(ctx: &Context, conn: &ConnInfo, req: &http::request::Parts) -> Self {
        let h = &req.headers;
        let text = |n: HeaderName| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        // Method and path only go to the access log and taps, user agent and
        // forwarded-for only to the access log: no copies when neither is on.
        let log = ctx.access_log.is_enabled();
        let tap = ctx.tap.is_active();
        let inbound = conn.listener.direction == Direction::Inbound;
        let metadata = if inbound { h.get(peer::PEER_HEADER_NAME) } else { None };
        let announce = metadata.is_some() || (inbound && h.contains_key(peer::PEER_ID_HEADER_NAME));
        let peer = metadata.and_then(|v| ctx.peers.decode(v, conn.peer_principal.as_ref()));
        HttpReport {
            start: Instant::now(),
            direction: conn.listener.direction,
            downstream_remote: conn.peer,
            downstream_local: conn.destination,
            peer_principal: conn.peer_principal.clone(),
            peer_workload: conn.peer_workload.clone(),
            upstream_principal: None,
            method: if log || tap { req.method.to_string() } else { String::new() },
            path: match req.uri.path_and_query() {
                _ if !log && !tap => String::new(),
                Some(p) => p.as_str().to_string(),
                None => "/".into(),
            },
            protocol: match req.version {
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            grpc: crate::route::is_grpc(h),
            user_agent: if log { text(http::header::USER_AGENT) } else { None },
            x_forwarded_for: if log { text(X_FORWARDED_FOR) } else { None },
            request_id: match h.get(X_REQUEST_ID).and_then(|v| v.to_str().ok()) {
                Some(id) => RequestId::taken(id),
                None => RequestId::Generated(hex_id(rand::random())),
            },
            peer_decoded_with: if peer.is_some() { conn.peer_principal.clone() } else { None },
            peer,
            announce,
            flags: Vec::new(),
            authority: String::new(),
            route_name: None,
            cluster: None,
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

    /// The request id (taken from `x-request-id` or generated).
    pub fn request_id(&self) -> &str {
        self.request_id.as_str()
    }

    /// The request id as an `x-request-id` value: a generated one is shared, not copied.
    pub fn request_id_value(&self) -> Option<HeaderValue> {
        match &self.request_id {
            RequestId::Inline(id) => HeaderValue::from_str(id.as_str()).ok(),
            RequestId::Taken(id) => HeaderValue::from_str(id).ok(),
            RequestId::Generated(v) => Some(v.clone()),
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
        if f != "-" && !self.flags.contains(&f) {
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

    /// The upstream's response headers, before the route's header edits: learn the
    /// peer's metadata and strip it (outbound), or strip what the application sent
    /// (inbound; ours is announced by [`HttpReport::on_response_headers`], after the
    /// edits and after the HTTP stage has given the upstream's header values their own
    /// allocations, so our shared value is neither copied nor re-inserted per request).
    pub fn on_upstream_response(&mut self, ctx: &Context, headers: &mut HeaderMap) {
        match self.direction {
            Direction::Inbound => {
                peer::strip(headers);
            }
            _ => self.learn_peer(ctx, headers),
        }
    }

    /// Response headers are about to go downstream: learn the peer's metadata and strip
    /// it (outbound), or announce ours when the caller announced its own (inbound).
    /// Idempotent: the second call on the same response changes nothing.
    pub fn on_response_headers(&mut self, ctx: &Context, headers: &mut HeaderMap) {
        match self.direction {
            Direction::Inbound if self.announce => ctx.local_peer.insert(headers),
            Direction::Inbound => {
                peer::strip(headers);
            }
            _ => self.learn_peer(ctx, headers),
        }
    }

    fn learn_peer(&mut self, ctx: &Context, headers: &mut HeaderMap) {
        if let Some(v) = peer::strip(headers) {
            if self.peer.is_none() {
                self.peer = ctx.peers.decode(&v, self.upstream_principal.as_ref());
                self.peer_decoded_with = self.upstream_principal.clone();
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
        // Wall-clock time of the start, read only when something reports it.
        let mut wall = None;
        let mut start_time = || *wall.get_or_insert_with(|| wall_clock_start(duration));
        crate::telemetry::trace::finish(ctx, &self, request_bytes, duration, &mut start_time);
        let peer = match (&self.peer, &self.peer_workload) {
            (Some(p), _) => p.clone(),
            (None, Some(w)) => w.clone(),
            (None, None) => ctx.unknown_peer.clone(),
        };
        // Principals are what the certificates of this hop proved (Istio's peer and local
        // URI SANs), never what metadata claims: without mTLS both are `unknown`. A peer
        // decoded with this very principal has it applied already (the decode cache did).
        let proven = |p: &Arc<WorkloadInfo>, principal: Option<&Arc<str>>| {
            let applied = self.peer.is_some()
                && match (self.peer_decoded_with.as_ref(), principal) {
                    (None, None) => true,
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                };
            if applied {
                p.clone()
            } else {
                with_principal(p.clone(), principal)
            }
        };
        let (source, destination) = match self.direction {
            Direction::Inbound => {
                (proven(&peer, self.peer_principal.as_ref()), local(ctx, self.peer_principal.is_some()))
            }
            _ => (local(ctx, self.upstream_principal.is_some()), proven(&peer, self.upstream_principal.as_ref())),
        };
        let security_policy = security_policy(self.direction, &self.peer_principal);
        let flags = self.flags_text();
        let cluster = self.cluster.as_deref().unwrap_or_default();
        let mut service = destination_service(ctx, self.direction, cluster, Some(&self.authority));
        if self.direction != Direction::Inbound {
            service = peer_namespace(service, &destination);
        }
        let labels = RequestLabels {
            reporter: reporter(self.direction),
            source,
            destination,
            service,
            protocol: if self.grpc { RequestProtocol::Grpc } else { RequestProtocol::Http },
            response_code: self.response_code,
            grpc_status: self.grpc_status.as_deref().and_then(|s| s.parse().ok()),
            response_flags: flags.clone(),
            security_policy,
        };
        ctx.metrics.record_request(&labels, duration, request_bytes, self.response_bytes);
        if ctx.tap.is_active() {
            tap_event(ctx, &self, &labels, duration, start_time());
        }
        if self.retries > 0 && !cluster.is_empty() {
            for _ in 0..self.retries {
                ctx.metrics.proxy().upstream_retry(cluster);
            }
        }
        if !ctx.access_log.is_enabled() {
            return;
        }
        let request_id = self.request_id().to_string();
        ctx.access_log.log(&AccessRecord {
            start_time: start_time(),
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
            request_id: Some(request_id),
            authority: Some(self.authority).filter(|a| !a.is_empty()),
            upstream_host: self.upstream_host,
            upstream_cluster: Some(cluster.to_string()).filter(|c| !c.is_empty()),
            route_name: self.route_name.as_deref().filter(|r| !r.is_empty()).map(str::to_string),
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

/// Offers the finished request to the taps in force (never a header value; the path
/// without its query string).
fn tap_event(ctx: &Context, r: &HttpReport, labels: &RequestLabels, duration: Duration, start_time: SystemTime) {
    use weft_xds::tap::{TapEvent, TapPeer};
    // Started before the first tap: its method and path were not kept.
    if r.method.is_empty() {
        return;
    }
    let direction = if r.direction == Direction::Inbound { "inbound" } else { "outbound" };
    let path = r.path.split('?').next().unwrap_or_default();
    let view = crate::telemetry::tap::TapView {
        direction,
        method: &r.method,
        authority: &r.authority,
        path,
        status: r.response_code,
    };
    let peer = |w: &WorkloadInfo| TapPeer {
        workload: w.workload.clone(),
        namespace: w.namespace.clone(),
        principal: w.principal.clone(),
    };
    let mtls = match r.direction {
        Direction::Inbound => r.peer_principal.is_some(),
        _ => r.upstream_principal.is_some(),
    };
    ctx.tap.offer(&view, || TapEvent {
        tap_id: 0,
        direction: direction.to_string(),
        source: Some(peer(&labels.source)),
        destination: Some(peer(&labels.destination)),
        service: labels.service.host.clone(),
        method: r.method.clone(),
        authority: r.authority.clone(),
        path: path.to_string(),
        status: u32::from(r.response_code),
        latency_us: u64::try_from(duration.as_micros()).unwrap_or(u64::MAX),
        flags: labels.response_flags.to_string(),
        mtls,
        request_id: r.request_id().to_string(),
        start_unix_ms: start_time
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0),
    });
}

/// The wall-clock time `elapsed` ago: a request's start, from its duration.
fn wall_clock_start(elapsed: Duration) -> SystemTime {
    let now = SystemTime::now();
    now.checked_sub(elapsed).unwrap_or(now)
}

/// The peer known only by the SPIFFE id its certificate proved (no metadata): principal
/// and namespace, the rest `unknown`.
pub fn peer_from_principal(principal: &str) -> WorkloadInfo {
    WorkloadInfo {
        principal: principal.to_string(),
        namespace: san_namespace(principal).unwrap_or(crate::telemetry::UNKNOWN).to_string(),
        ..WorkloadInfo::default()
    }
}

/// On the client side Istio takes `destination_service_namespace` from the peer: a
/// service whose host names no namespace (Host fallback, ServiceEntry hosts, virtual
/// clusters) gets the destination's namespace when that is known.
fn peer_namespace(
    service: Arc<crate::telemetry::ServiceInfo>,
    destination: &WorkloadInfo,
) -> Arc<crate::telemetry::ServiceInfo> {
    let unknown = crate::telemetry::UNKNOWN;
    if service.namespace != unknown || destination.namespace == unknown {
        return service;
    }
    Arc::new(crate::telemetry::ServiceInfo { namespace: destination.namespace.clone(), ..(*service).clone() })
}

/// This proxy's workload as one side of a hop: with its own SPIFFE id when the hop was
/// mutual TLS, `unknown` otherwise (Istio reports the local certificate's URI SAN).
fn local(ctx: &Context, mtls: bool) -> Arc<WorkloadInfo> {
    if mtls {
        ctx.local.clone()
    } else {
        ctx.local_plain.clone()
    }
}

/// Istio's `connection_security_policy`: the destination reporter says `mutual_tls` when
/// the client presented a verified mesh certificate, `none` otherwise; the source
/// reporter cannot know the server's policy and says `unknown`.
fn security_policy(direction: Direction, principal: &Option<Arc<str>>) -> SecurityPolicy {
    match (direction, principal) {
        (Direction::Inbound, Some(_)) => SecurityPolicy::MutualTls,
        (Direction::Inbound, None) => SecurityPolicy::None,
        _ => SecurityPolicy::Unknown,
    }
}

/// The `destination_service*` labels of a request (with its authority) or connection
/// (without) to `cluster`, as Istio's stats filter finds them (see
/// [`crate::telemetry::services`]): Istio service metadata on the cluster, else the host
/// in an outbound cluster name, else the virtual cluster's name, else (client side only)
/// the authority.
fn destination_service(
    ctx: &Context,
    direction: Direction,
    cluster: &str,
    authority: Option<&str>,
) -> Arc<crate::telemetry::ServiceInfo> {
    use crate::telemetry::services;
    // Only Istio cluster names are kept by cluster: a hit is what the branch below gives.
    if let Some(s) = ctx.services.known_cluster(cluster) {
        return s;
    }
    if services::istio_host(cluster).is_some() {
        return ctx.services.get(cluster, authority.unwrap_or_default());
    }
    if let Some(mut v) = services::virtual_cluster(cluster, authority) {
        if direction == Direction::Inbound {
            // No Host fallback inbound: the local canonical service and namespace.
            v.host = ctx.local_service.host.clone();
            v.namespace = ctx.local_service.namespace.clone();
        }
        return Arc::new(v);
    }
    if !cluster.is_empty() {
        let snap = ctx.store.snapshot();
        if let Some(s) =
            snap.clusters.get(cluster).and_then(|c| services::pick(&c.config.services, authority.unwrap_or_default()))
        {
            return s.clone();
        }
    }
    match (direction, authority) {
        // Istio disables the Host-header fallback for inbound traffic (a Host header
        // chosen by any client must not become a series): the local canonical service.
        (Direction::Inbound, _) => ctx.local_service.clone(),
        (_, None) => ctx.unknown_service.clone(),
        (_, Some(a)) => ctx.services.get(cluster, a),
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
    pub rbac: Vec<crate::rbac::MetadataEntry>,
    details: Option<String>,
    /// `istio_tcp_connections_opened_total` counted (at the upstream connect).
    opened: bool,
}

impl TcpReport {
    /// Starts the report of a connection just accepted for `cluster` (counted as opened
    /// once its labels are final: see [`TcpReport::connected`]).
    pub fn open(ctx: &Context, conn: &ConnInfo, cluster: &str) -> Self {
        let peer = conn.peer_workload.clone().unwrap_or_else(|| ctx.unknown_peer.clone());
        let (source, destination) = match conn.listener.direction {
            Direction::Inbound => {
                (with_principal(peer, conn.peer_principal.as_ref()), local(ctx, conn.peer_principal.is_some()))
            }
            // The upstream's certificate is not known yet (see `connected`).
            _ => (local(ctx, false), with_principal(peer, None)),
        };
        let labels = TcpLabels {
            reporter: reporter(conn.listener.direction),
            source,
            destination,
            service: destination_service(ctx, conn.listener.direction, cluster, None),
            response_flags: Cow::Borrowed("-"),
            security_policy: security_policy(conn.listener.direction, &conn.peer_principal),
        };
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
            opened: false,
        }
    }

    /// Records what the network RBAC filters decided.
    pub fn rbac(&mut self, verdict: crate::rbac::Verdict) {
        self.details = verdict.details();
        self.rbac = verdict.into_log_metadata();
    }

    /// The upstream's workload, learned through the TCP metadata exchange (outbound).
    pub fn upstream_peer(&mut self, peer: Arc<WorkloadInfo>) {
        if self.direction != Direction::Inbound {
            self.labels.destination = peer;
        }
    }

    /// The upstream connection is up: on the client side, takes the principal the
    /// upstream's certificate proved as `destination_principal`; then counts the
    /// connection as opened. As Istio's stats filter, the open is counted once the
    /// peer is known, or at the close for a connection that never got that far (denied,
    /// refused upstream, `BlackHoleCluster`), so opened and closed carry the same labels.
    pub fn connected(&mut self, ctx: &Context, upstream: std::net::SocketAddr, principal: Option<Arc<str>>) {
        self.upstream_host = Some(upstream);
        if self.direction != Direction::Inbound {
            self.labels.source = local(ctx, principal.is_some());
            self.labels.destination = with_principal(self.labels.destination.clone(), principal.as_ref());
            self.labels.service = peer_namespace(self.labels.service.clone(), &self.labels.destination);
        }
        ctx.metrics.tcp_opened(&self.labels);
        self.opened = true;
    }

    /// Counts bytes and the close, and writes the access-log line.
    pub fn close(mut self, ctx: &Context, flag: Option<ErrorKind>) {
        if let Some(k) = flag {
            self.labels.response_flags = Cow::Borrowed(k.response_flag());
        }
        if !self.opened {
            ctx.metrics.tcp_opened(&self.labels);
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

#[cfg(test)]
mod tests;
