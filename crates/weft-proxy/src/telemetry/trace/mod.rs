//! Distributed tracing, as Envoy's sidecars do it for Istio: one span per proxy per
//! request (`SERVER` on an INBOUND listener, `CLIENT` otherwise), its context read from
//! and written to W3C and B3 headers ([`context`]), sampled at the connection manager's
//! percentages unless the caller decided, and exported in the background ([`export`]) to
//! an OpenTelemetry (OTLP gRPC or HTTP) or Zipkin collector.
//!
//! On the request path: [`ActiveSpan::start`] when the request arrives (the HTTP stage
//! stores it in the request's `HttpReport`), [`ActiveSpan::set_operation`] once a route
//! matched, [`inject`] on the request going upstream, [`finish`] with the report. A
//! finished span is handed to a bounded queue (never awaited); the exporter drains it.

pub mod config;
pub mod context;
pub mod export;
mod metrics;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName};
use tokio::sync::mpsc;

use crate::route::X_FORWARDED_PROTO;

pub use config::{CustomTag, Provider, Sink, TracingConfig};
pub use export::{ExportWorker, QUEUE_CAPACITY};
pub use metrics::TraceMetrics;

use crate::config::Direction;
use crate::conn::ConnInfo;
use crate::context::Context;
use crate::report::HttpReport;
use config::SAMPLING_DENOMINATOR;
use context::{Incoming, Outgoing};

/// Span kind (the proxy's role in the hop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// Inbound: the proxy serves the request for its workload.
    Server,
    /// Outbound (and gateways): the proxy calls the next hop.
    Client,
}

/// What the proxy knows about itself that every span carries.
#[derive(Debug, Clone, Default)]
pub struct LocalNode {
    /// `node_id`.
    pub node_id: String,
    /// `zone` (empty: no tag).
    pub zone: String,
    /// Envoy's local cluster name (`node.cluster`, Istio's `<service>.<namespace>`):
    /// the service name when the provider names none.
    pub service_cluster: String,
    /// `istio.canonical_service`.
    pub canonical_service: String,
    /// `istio.canonical_revision`.
    pub canonical_revision: String,
    /// `istio.namespace`.
    pub namespace: String,
    /// `istio.mesh_id`.
    pub mesh_id: String,
}

impl LocalNode {
    /// The span attributes of the node, from its bootstrap metadata.
    pub fn from_node(node: &weft_xds::NodeInfo) -> LocalNode {
        let local = crate::report::local_workload(node, None);
        let label = |k: &str| node.labels.get(k).cloned().unwrap_or_default();
        LocalNode {
            node_id: node.id.clone(),
            zone: label("topology.kubernetes.io/zone"),
            service_cluster: if node.cluster.is_empty() {
                format!("{}.{}", local.canonical_service, local.namespace)
            } else {
                node.cluster.clone()
            },
            canonical_service: local.canonical_service,
            canonical_revision: local.canonical_revision,
            namespace: local.namespace,
            mesh_id: Some(label("MESH_ID")).filter(|m| !m.is_empty()).unwrap_or_else(|| "cluster.local".into()),
        }
    }
}

/// The proxy's tracer: its identity and the queue finished spans go to.
#[derive(Debug)]
pub struct Tracer {
    node: LocalNode,
    queue: mpsc::Sender<SpanRecord>,
    metrics: Arc<TraceMetrics>,
}

impl Tracer {
    /// A tracer and the export worker draining its queue (run it with
    /// [`ExportWorker::run`]); `capacity` spans at most wait in the queue.
    pub fn new(node: LocalNode, metrics: Arc<TraceMetrics>, capacity: usize) -> (Tracer, ExportWorker) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Tracer { node, queue: tx, metrics: metrics.clone() }, ExportWorker::new(rx, metrics))
    }

    /// Hands a finished span to the exporter without waiting: a full queue drops it
    /// (counted with `reason="queue_full"`).
    pub fn submit(&self, span: SpanRecord) {
        match self.queue.try_send(span) {
            Ok(()) => self.metrics.queued(1),
            Err(mpsc::error::TrySendError::Full(_)) => self.metrics.dropped("queue_full", 1),
            Err(mpsc::error::TrySendError::Closed(_)) => self.metrics.dropped("exporter_stopped", 1),
        }
    }
}

/// A finished span, ready to encode.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    /// Where it goes.
    pub provider: Arc<Provider>,
    /// Service name to report under.
    pub service_name: String,
    /// Trace id.
    pub trace_id: u128,
    /// Span id.
    pub span_id: u64,
    /// Parent span id.
    pub parent_id: Option<u64>,
    /// Span (operation) name.
    pub name: String,
    /// Kind.
    pub kind: SpanKind,
    /// Start.
    pub start: SystemTime,
    /// End.
    pub end: SystemTime,
    /// Attributes (tags), in order.
    pub tags: Vec<(Cow<'static, str>, String)>,
    /// The request failed (5xx or no response).
    pub error: bool,
    /// A Zipkin server span sharing its caller's span id.
    pub shared: bool,
    /// W3C `tracestate`.
    pub tracestate: String,
    /// The proxy's address that took the request.
    pub local_addr: SocketAddr,
    /// The downstream peer.
    pub remote_addr: SocketAddr,
}

/// One request's span while the request is in flight.
#[derive(Debug)]
pub struct ActiveSpan {
    config: Arc<TracingConfig>,
    out: Outgoing,
    kind: SpanKind,
    shared: bool,
    operation: Option<String>,
    /// Request facts for the span's tags: captured only when the span will be reported.
    facts: Option<Box<RequestFacts>>,
}

#[derive(Debug)]
struct RequestFacts {
    default_name: String,
    method: String,
    url: String,
    protocol: &'static str,
    user_agent: String,
    downstream_cluster: String,
    custom: Vec<(String, String)>,
}

impl ActiveSpan {
    /// Starts the span of a request that just arrived on `conn`, continuing the caller's
    /// trace or starting one (sampled per `config` and the request id, as Envoy does).
    pub fn start(
        conn: &ConnInfo,
        config: &Arc<TracingConfig>,
        parts: &http::request::Parts,
        authority: &str,
        request_id: &str,
    ) -> ActiveSpan {
        let h = &parts.headers;
        let incoming = Incoming::read(h);
        let kind = match conn.listener.direction {
            Direction::Inbound => SpanKind::Server,
            _ => SpanKind::Client,
        };
        let sampled = incoming.sampled.unwrap_or_else(|| decide(config, h, request_id));
        let zipkin = config.provider.as_ref().and_then(|p| match p.sink {
            Sink::Zipkin { trace_id_128bit, shared_span_context, .. } => Some((trace_id_128bit, shared_span_context)),
            _ => None,
        });
        let (trace_id, span_id, parent_id, shared) = match (incoming.ids, zipkin) {
            // Zipkin's shared span context: the server side reports under its caller's span id.
            (Some(ids), Some((_, true))) if kind == SpanKind::Server => {
                (ids.trace_id, ids.span_id, ids.parent_id, true)
            }
            (Some(ids), _) => (ids.trace_id, new_span_id(), Some(ids.span_id), false),
            (None, Some((false, _))) => (u128::from(new_span_id()), new_span_id(), None, false),
            (None, _) => (new_trace_id(), new_span_id(), None, false),
        };
        let out = Outgoing {
            trace_id,
            span_id,
            parent_id,
            sampled,
            debug: incoming.debug,
            tracestate: incoming.tracestate,
            b3_single: incoming.b3_single,
        };
        let facts =
            (sampled && config.provider.is_some()).then(|| Box::new(RequestFacts::read(config, parts, authority)));
        ActiveSpan { config: config.clone(), out, kind, shared, operation: None, facts }
    }

    /// The matched route's `decorator.operation` names the span (Envoy's decorator).
    pub fn set_operation(&mut self, operation: Option<&str>) {
        if let Some(op) = operation.filter(|o| !o.is_empty()) {
            self.operation = Some(op.to_string());
        }
    }

    /// The context written upstream.
    pub fn outgoing(&self) -> &Outgoing {
        &self.out
    }

    /// True when the span will be reported.
    pub fn is_sampled(&self) -> bool {
        self.out.sampled
    }
}

impl RequestFacts {
    fn read(config: &TracingConfig, parts: &http::request::Parts, authority: &str) -> RequestFacts {
        let h = &parts.headers;
        let text = |n: HeaderName| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let scheme = text(X_FORWARDED_PROTO).unwrap_or_else(|| "http".into());
        let max = config.max_path_tag_length;
        let mut url = format!("{scheme}://{authority}");
        url.push_str(truncate(path_and_query, max));
        let mut default_name = format!("{authority}{}", parts.uri.path());
        default_name.truncate(floor_char_boundary(&default_name, DEFAULT_NAME_LIMIT));
        let custom = config
            .custom_tags
            .iter()
            .filter_map(|t| match t {
                CustomTag::Literal { tag, value } => Some((tag.clone(), value.clone())),
                CustomTag::Environment { tag, value } => value.clone().map(|v| (tag.clone(), v)),
                CustomTag::RequestHeader { tag, name, default_value } => {
                    let v = h.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
                    v.or_else(|| Some(default_value.clone()).filter(|d| !d.is_empty())).map(|v| (tag.clone(), v))
                }
            })
            .collect();
        RequestFacts {
            default_name,
            method: parts.method.to_string(),
            url,
            protocol: match parts.version {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            user_agent: text(http::header::USER_AGENT).unwrap_or_else(|| "-".into()),
            downstream_cluster: text(X_ENVOY_DOWNSTREAM_SERVICE_CLUSTER).unwrap_or_else(|| "-".into()),
            custom,
        }
    }
}

/// Longest span name made from the authority and path (the contract's 256 bytes).
const DEFAULT_NAME_LIMIT: usize = 256;

/// Header names a traced request reads, parsed once (a `&str` name is parsed at every
/// lookup).
const X_ENVOY_DOWNSTREAM_SERVICE_CLUSTER: HeaderName = HeaderName::from_static("x-envoy-downstream-service-cluster");
const X_CLIENT_TRACE_ID: HeaderName = HeaderName::from_static("x-client-trace-id");

/// Writes the request's trace context on the request going upstream (no-op when the
/// connection manager has no tracing).
pub fn inject(span: Option<&ActiveSpan>, headers: &mut HeaderMap) {
    if let Some(s) = span {
        s.out.write(headers);
    }
}

/// Reports the request's span when it is sampled and has a provider: builds its
/// attributes from the finished report and queues it for export.
///
/// The span covers the request: it starts at `start_time()` (the request's wall-clock
/// start, read once per request and shared with the access log) and lasts `duration`
/// (the request's, on the monotonic clock), so it costs no clock read of its own.
pub fn finish(
    ctx: &Context,
    report: &HttpReport,
    request_bytes: u64,
    duration: Duration,
    start_time: &mut dyn FnMut() -> SystemTime,
) {
    let Some(span) = report.trace.as_deref() else { return };
    let (Some(facts), Some(provider)) = (span.facts.as_deref(), span.config.provider.as_ref()) else { return };
    let node = &ctx.tracer.node;
    let status = report.response_code;
    let error = status == 0 || status >= 500;
    let mut tags: Vec<(Cow<'static, str>, String)> = Vec::with_capacity(28 + facts.custom.len());
    let mut tag = |k: &'static str, v: String| tags.push((Cow::Borrowed(k), v));
    tag("node_id", node.node_id.clone());
    if !node.zone.is_empty() {
        tag("zone", node.zone.clone());
    }
    tag("guid:x-request-id", report.request_id().to_string());
    tag("http.url", facts.url.clone());
    tag("http.method", facts.method.clone());
    tag("downstream_cluster", facts.downstream_cluster.clone());
    tag("user_agent", facts.user_agent.clone());
    tag("http.protocol", facts.protocol.to_string());
    tag("peer.address", span_peer(report).to_string());
    tag("request_size", request_bytes.to_string());
    tag("response_size", report.response_bytes.to_string());
    tag("response_flags", report.response_flags().into_owned());
    tag("http.status_code", status.to_string());
    if let (true, Some(g)) = (report.is_grpc(), report.grpc_status.as_ref()) {
        tag("grpc.status_code", g.clone());
    }
    if let Some(cluster) = report.cluster.as_deref().filter(|c| !c.is_empty()) {
        tag("upstream_cluster", cluster.to_string());
        tag("upstream_cluster.name", cluster.to_string());
    }
    if let Some(a) = report.upstream_host {
        tag("upstream_address", a.to_string());
    }
    tag("component", "proxy".into());
    tag("istio.canonical_service", node.canonical_service.clone());
    tag("istio.canonical_revision", node.canonical_revision.clone());
    tag("istio.namespace", node.namespace.clone());
    tag("istio.mesh_id", node.mesh_id.clone());
    if error {
        tag("error", "true".into());
    }
    for (k, v) in &facts.custom {
        // A custom tag overrides a built-in one of the same name (Istio sets its own
        // `istio.*` tags this way).
        match tags.iter_mut().find(|(n, _)| n == k) {
            Some(slot) => slot.1 = v.clone(),
            None => tags.push((Cow::Owned(k.clone()), v.clone())),
        }
    }
    let service_name =
        if provider.service_name.is_empty() { node.service_cluster.clone() } else { provider.service_name.clone() };
    ctx.tracer.submit(SpanRecord {
        provider: provider.clone(),
        service_name,
        trace_id: span.out.trace_id,
        span_id: span.out.span_id,
        parent_id: span.out.parent_id,
        name: span.operation.clone().unwrap_or_else(|| facts.default_name.clone()),
        kind: span.kind,
        start: start_time(),
        end: start_time() + duration,
        tags,
        error,
        shared: span.shared,
        tracestate: span.out.tracestate.as_ref().and_then(|v| v.to_str().ok()).unwrap_or_default().to_string(),
        local_addr: report.downstream_local(),
        remote_addr: span_peer(report),
    });
}

fn span_peer(report: &HttpReport) -> SocketAddr {
    report.downstream_remote()
}

/// Envoy's sampling decision for a request that carries none: a request id another
/// Envoy already marked as traced stays traced; else `x-client-trace-id` with
/// `client_sampling`, else `random_sampling`, each evaluated against the request id's
/// integer (so every proxy on the path decides alike), capped by `overall_sampling`.
pub fn decide(config: &TracingConfig, h: &HeaderMap, request_id: &str) -> bool {
    let value = request_id_integer(request_id).unwrap_or_else(rand::random::<u64>);
    let hit = |p: u64| value % SAMPLING_DENOMINATOR < p;
    let marked = uuid_marked_traced(request_id);
    let traced =
        marked || (h.contains_key(X_CLIENT_TRACE_ID) && hit(config.client_sampling)) || hit(config.random_sampling);
    traced && hit(config.overall_sampling)
}

/// Envoy's UUID request-id integer: the first 8 hex digits.
fn request_id_integer(id: &str) -> Option<u64> {
    let head = id.get(..8)?;
    if !head.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(head, 16).ok()
}

/// A UUID whose 15th character Envoy set to record a trace decision: `9` sampled,
/// `a` forced, `b` client-forced.
fn uuid_marked_traced(id: &str) -> bool {
    id.len() == 36 && matches!(id.as_bytes()[14], b'9' | b'a' | b'b')
}

fn new_span_id() -> u64 {
    loop {
        let id = rand::random::<u64>();
        if id != 0 {
            return id;
        }
    }
}

fn new_trace_id() -> u128 {
    loop {
        let id = rand::random::<u128>();
        if id != 0 {
            return id;
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    &s[..floor_char_boundary(s, max)]
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    let mut i = max;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
