//! In-test trace collectors: an OTLP/gRPC receiver (the official OpenTelemetry protos,
//! `opentelemetry-proto`'s tonic `TraceService` server) and a Zipkin v2 JSON receiver
//! (hyper), each on 127.0.0.1:0 with its own runtime, keeping every span it is sent in a
//! form the tests compare.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio::sync::oneshot;

/// Span kind, as both formats name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server,
    Client,
    Other,
}

/// One received span.
#[derive(Debug, Clone)]
pub struct Span {
    /// Hex trace id (32 digits).
    pub trace_id: String,
    /// Hex span id (16 digits).
    pub span_id: String,
    /// Hex parent span id; None for a root span.
    pub parent_id: Option<String>,
    /// Operation name.
    pub name: String,
    pub kind: Kind,
    /// Attributes (OTLP) or tags (Zipkin), values as strings.
    pub attrs: BTreeMap<String, String>,
    /// `service.name` (OTLP resource) or `localEndpoint.serviceName` (Zipkin).
    pub service: String,
}

/// A running collector; stopped (its port closed) on [`Collector::stop`] or drop.
pub struct Collector {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    stop: Option<oneshot::Sender<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

struct Otlp {
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Collector {
    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// Closes the port: the collector is down from now on.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tonic::async_trait]
impl TraceService for Otlp {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = Vec::new();
        for rs in request.into_inner().resource_spans {
            let resource = rs.resource.map(|r| attrs(&r.attributes)).unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Span {
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_id: (!s.parent_span_id.is_empty()).then(|| hex(&s.parent_span_id)),
                        name: s.name.clone(),
                        kind: match SpanKind::try_from(s.kind) {
                            Ok(SpanKind::Server) => Kind::Server,
                            Ok(SpanKind::Client) => Kind::Client,
                            _ => Kind::Other,
                        },
                        attrs: attrs(&s.attributes),
                        service: service.clone(),
                    });
                }
            }
        }
        self.spans.lock().unwrap().extend(out);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn value(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attrs(kv: &[KeyValue]) -> BTreeMap<String, String> {
    kv.iter().map(|kv| (kv.key.clone(), value(&kv.value))).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// An OTLP/gRPC collector (`opentelemetry.proto.collector.trace.v1.TraceService/Export`).
pub fn otlp() -> Collector {
    let rt = runtime();
    let spans = Arc::new(Mutex::new(Vec::new()));
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let svc = TraceServiceServer::new(Otlp { spans: spans.clone() });
    rt.spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
    });
    Collector { addr, spans, stop: Some(stop), runtime: Some(rt) }
}

/// A Zipkin v2 collector: `POST /api/v2/spans` with a JSON array of spans.
pub fn zipkin() -> Collector {
    let rt = runtime();
    let spans = Arc::new(Mutex::new(Vec::new()));
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, mut stopped) = oneshot::channel::<()>();
    let store = spans.clone();
    rt.spawn(async move {
        loop {
            let (sock, _) = tokio::select! {
                r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                _ = &mut stopped => return,
            };
            let store = store.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let store = store.clone();
                    async move {
                        let path_ok = req.method() == hyper::Method::POST && req.uri().path() == "/api/v2/spans";
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let status = match (path_ok, serde_json::from_slice::<Vec<serde_json::Value>>(&body)) {
                            (true, Ok(list)) => {
                                store.lock().unwrap().extend(list.iter().map(zipkin_span));
                                202
                            }
                            _ => 400,
                        };
                        Ok::<_, std::convert::Infallible>(
                            Response::builder().status(status).body(Full::new(Bytes::new())).unwrap(),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    Collector { addr, spans, stop: Some(stop), runtime: Some(rt) }
}

fn zipkin_span(v: &serde_json::Value) -> Span {
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    Span {
        trace_id: s("traceId"),
        span_id: s("id"),
        parent_id: v["parentId"].as_str().map(str::to_string),
        name: s("name"),
        kind: match v["kind"].as_str() {
            Some("SERVER") => Kind::Server,
            Some("CLIENT") => Kind::Client,
            _ => Kind::Other,
        },
        attrs: v["tags"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
            .unwrap_or_default(),
        service: v["localEndpoint"]["serviceName"].as_str().unwrap_or_default().to_string(),
    }
}
