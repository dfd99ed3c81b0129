//! The span exporter: one background task per proxy drains the tracer's bounded queue
//! into batches (up to [`MAX_BATCH`] spans or [`FLUSH_INTERVAL`] after the first one)
//! and sends each batch to its provider's collector: OTLP over gRPC or HTTP (protobuf),
//! or Zipkin v2 JSON. The collector is reached through its CDS cluster's endpoints, on
//! the cluster's own transport, with the provider's timeout.
//!
//! Nothing here is on a request's path: the data path only `try_send`s into the queue.
//! A slow or absent collector fills the queue and further spans are dropped and counted;
//! memory stays bounded by the queue's capacity plus one batch.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::BodyExt;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, status, ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;
use tokio::sync::mpsc;
use tracing::debug;

use super::{Provider, Sink, SpanKind, SpanRecord, TraceMetrics};
use crate::cluster::{Pools, UpstreamProtocol};
use crate::config::ProxyStore;

/// Spans that may wait for export (Envoy's OpenTelemetry tracer has no bound; this one does).
pub const QUEUE_CAPACITY: usize = 4096;
/// Most spans in one export request.
pub const MAX_BATCH: usize = 512;
/// A batch is sent at most this long after its first span was queued.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// gRPC method of OTLP trace export.
pub const OTLP_GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Drains the tracer's queue; see the module docs.
#[derive(Debug)]
pub struct ExportWorker {
    rx: mpsc::Receiver<SpanRecord>,
    metrics: Arc<TraceMetrics>,
}

/// Why a batch was not exported.
#[derive(Debug)]
struct Failed {
    reason: &'static str,
    detail: String,
}

impl ExportWorker {
    pub(super) fn new(rx: mpsc::Receiver<SpanRecord>, metrics: Arc<TraceMetrics>) -> Self {
        ExportWorker { rx, metrics }
    }

    /// Exports until `stop` resolves or every tracer is gone. Collectors are looked up
    /// in the store's current snapshot at each export.
    pub async fn run(mut self, store: Arc<ProxyStore>, stop: impl std::future::Future<Output = ()>) {
        let pools = Pools::new(Default::default());
        tokio::pin!(stop);
        loop {
            let first = tokio::select! {
                _ = &mut stop => return,
                s = self.rx.recv() => match s { Some(s) => s, None => return },
            };
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + FLUSH_INTERVAL;
            while batch.len() < MAX_BATCH {
                match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                    Ok(Some(s)) => batch.push(s),
                    _ => break,
                }
            }
            self.metrics.dequeued(batch.len() as i64);
            // Group by provider (normally one per proxy), keeping order.
            while !batch.is_empty() {
                let provider = batch[0].provider.clone();
                let (mine, rest): (Vec<_>, Vec<_>) = batch.into_iter().partition(|s| *s.provider == *provider);
                batch = rest;
                let n = mine.len() as u64;
                let sent = tokio::select! {
                    _ = &mut stop => return,
                    r = export(&pools, &store, &provider, &mine) => r,
                };
                match sent {
                    Ok(()) => self.metrics.exported(n),
                    Err(f) => {
                        debug!(provider = %provider.name, cluster = %provider.cluster, reason = f.reason, detail = %f.detail, spans = n, "span export failed");
                        self.metrics.dropped(f.reason, n);
                    }
                }
            }
        }
    }
}

async fn export(pools: &Pools, store: &ProxyStore, p: &Provider, spans: &[SpanRecord]) -> Result<(), Failed> {
    let snap = store.snapshot();
    let no_collector = |detail: String| Failed { reason: "no_collector", detail };
    let cluster =
        snap.clusters.get(&p.cluster).ok_or_else(|| no_collector(format!("unknown cluster {:?}", p.cluster)))?;
    let ep = cluster.pick(&[]).ok_or_else(|| no_collector(format!("no endpoint in cluster {:?}", p.cluster)))?;
    let failed = |detail: String| Failed { reason: "export_failed", detail };
    let (req, grpc) = build_request(p, spans).map_err(failed)?;
    let proto = if grpc { UpstreamProtocol::Http2 } else { http_protocol(&cluster.config.protocol) };
    let connector = cluster.config.connector_for(ep.metadata.as_ref());
    let call = async {
        let resp = pools
            .send_with(&ep, proto, cluster.config.connect_timeout, connector, req)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let status = resp.status();
        let grpc_status_header = resp.headers().get("grpc-status").cloned();
        let body = resp.into_body().collect().await.map_err(|e| failed(format!("reading the answer: {e}")))?;
        if !status.is_success() {
            return Err(failed(format!("collector answered {status}")));
        }
        if grpc {
            let trailers = body.trailers().and_then(|t| t.get("grpc-status")).cloned();
            match grpc_status_header.or(trailers) {
                Some(s) if s == "0" => {}
                Some(s) => return Err(failed(format!("grpc-status {s:?}"))),
                None => return Err(failed("no grpc-status in the answer".into())),
            }
        }
        Ok(())
    };
    tokio::time::timeout(p.timeout, call).await.map_err(|_| failed(format!("no answer within {:?}", p.timeout)))?
}

fn http_protocol(p: &UpstreamProtocol) -> UpstreamProtocol {
    match p {
        UpstreamProtocol::Http2 => UpstreamProtocol::Http2,
        _ => UpstreamProtocol::Http1,
    }
}

/// The export request for `spans` and whether it is gRPC.
fn build_request(p: &Provider, spans: &[SpanRecord]) -> Result<(Request<crate::cluster::BoxBody>, bool), String> {
    let (host, path, content_type, body, grpc) = match &p.sink {
        Sink::OtlpGrpc { authority } => {
            let msg = otlp_request(spans).encode_to_vec();
            let mut framed = BytesMut::with_capacity(msg.len() + 5);
            framed.put_u8(0);
            framed.put_u32(u32::try_from(msg.len()).map_err(|_| "batch too large".to_string())?);
            framed.put_slice(&msg);
            (authority.as_str(), OTLP_GRPC_PATH, "application/grpc", framed.freeze(), true)
        }
        Sink::OtlpHttp { host, path } => (
            host.as_str(),
            path.as_str(),
            "application/x-protobuf",
            Bytes::from(otlp_request(spans).encode_to_vec()),
            false,
        ),
        Sink::Zipkin { host, path, .. } => {
            (host.as_str(), path.as_str(), "application/json", zipkin_json(spans), false)
        }
    };
    let uri: Uri = format!("http://{host}{path}").parse().map_err(|e| format!("collector URI: {e}"))?;
    let mut req = Request::new(crate::http::body::full(body));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri;
    let h = req.headers_mut();
    h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(host) {
        h.insert(http::header::HOST, v);
    }
    if grpc {
        h.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
    Ok((req, grpc))
}

/// OTLP `ExportTraceServiceRequest`: one resource per service name, one scope.
pub fn otlp_request(spans: &[SpanRecord]) -> ExportTraceServiceRequest {
    let mut resource_spans: Vec<ResourceSpans> = Vec::new();
    for s in spans {
        let span = otlp_span(s);
        let existing = resource_spans.iter_mut().find(|r| {
            r.resource.as_ref().and_then(|res| res.attributes.first()).and_then(|kv| kv.value.as_ref())
                == Some(&string_value(&s.service_name))
        });
        match existing {
            Some(r) => r.scope_spans[0].spans.push(span),
            None => resource_spans.push(ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", &s.service_name)],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "weft".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans: vec![span],
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }),
        }
    }
    ExportTraceServiceRequest { resource_spans }
}

fn otlp_span(s: &SpanRecord) -> Span {
    Span {
        trace_id: s.trace_id.to_be_bytes().to_vec(),
        span_id: s.span_id.to_be_bytes().to_vec(),
        trace_state: s.tracestate.clone(),
        parent_span_id: s.parent_id.map(|p| p.to_be_bytes().to_vec()).unwrap_or_default(),
        flags: 1,
        name: s.name.clone(),
        kind: match s.kind {
            SpanKind::Server => span::SpanKind::Server as i32,
            SpanKind::Client => span::SpanKind::Client as i32,
        },
        start_time_unix_nano: unix_nanos(s.start),
        end_time_unix_nano: unix_nanos(s.end),
        attributes: s.tags.iter().map(|(k, v)| kv(k, v)).collect(),
        status: s.error.then(|| Status { message: String::new(), code: status::StatusCode::Error as i32 }),
        ..Default::default()
    }
}

fn string_value(v: &str) -> AnyValue {
    AnyValue { value: Some(any_value::Value::StringValue(v.to_string())) }
}

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue { key: k.to_string(), value: Some(string_value(v)), ..Default::default() }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn unix_micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Zipkin v2 JSON: an array of spans (`/api/v2/spans`).
pub fn zipkin_json(spans: &[SpanRecord]) -> Bytes {
    let list: Vec<serde_json::Value> = spans.iter().map(zipkin_span).collect();
    Bytes::from(serde_json::to_vec(&list).unwrap_or_else(|_| b"[]".to_vec()))
}

fn zipkin_span(s: &SpanRecord) -> serde_json::Value {
    let tags: serde_json::Map<String, serde_json::Value> =
        s.tags.iter().map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone()))).collect();
    let duration = s.end.duration_since(s.start).map(|d| d.as_micros() as u64).unwrap_or(0).max(1);
    let mut span = serde_json::json!({
        "traceId": super::context::b3_trace_id(s.trace_id),
        "id": format!("{:016x}", s.span_id),
        "name": s.name,
        "kind": match s.kind { SpanKind::Server => "SERVER", SpanKind::Client => "CLIENT" },
        "timestamp": unix_micros(s.start),
        "duration": duration,
        "localEndpoint": endpoint(Some(&s.service_name), s.local_addr),
        "remoteEndpoint": endpoint(None, s.remote_addr),
        "tags": tags,
    });
    if let Some(p) = s.parent_id {
        span["parentId"] = serde_json::Value::String(format!("{p:016x}"));
    }
    if s.shared {
        span["shared"] = serde_json::Value::Bool(true);
    }
    span
}

fn endpoint(service: Option<&str>, addr: SocketAddr) -> serde_json::Value {
    let mut e = serde_json::Map::new();
    if let Some(s) = service {
        e.insert("serviceName".into(), s.into());
    }
    match addr {
        SocketAddr::V4(a) => e.insert("ipv4".into(), a.ip().to_string().into()),
        SocketAddr::V6(a) => e.insert("ipv6".into(), a.ip().to_string().into()),
    };
    e.insert("port".into(), addr.port().into());
    serde_json::Value::Object(e)
}
