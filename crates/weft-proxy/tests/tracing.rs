//! Distributed tracing end to end: proxies configured over xDS with an HTTP connection
//! manager `tracing` block export spans to in-test collectors (OTLP/gRPC with
//! opentelemetry-proto's TraceService, OTLP/HTTP and Zipkin v2 JSON over hyper), with
//! the right parents and attributes, at the configured sampling rate, and without
//! affecting requests when the collector is down.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{prefix, rc, route, to, vhost, Mesh, WAIT};
use envoy_types::pb::envoy::config::core::v3::{grpc_service, http_uri, GrpcService, HttpService, HttpUri};
use envoy_types::pb::envoy::config::route::v3::Decorator;
use envoy_types::pb::envoy::config::trace::v3::tracing::http::ConfigType;
use envoy_types::pb::envoy::config::trace::v3::tracing::Http as TracingHttp;
use envoy_types::pb::envoy::config::trace::v3::{OpenTelemetryConfig, ZipkinConfig};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing;
use envoy_types::pb::envoy::r#type::tracing::v3::{custom_tag, CustomTag};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{Any, BoolValue};
use envoy_types::util::pack_any;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::{request, send_h1};
use weft_xds::build::{self, Routes};
use weft_xds::type_url;

const INBOUND: i32 = 1;
const OUTBOUND: i32 = 2;

/// Spans received by a collector, each with the `service.name` of its resource.
#[derive(Clone, Default)]
struct Received {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    changed: Arc<Notify>,
    batches: Arc<Mutex<Vec<(String, String)>>>,
}

impl Received {
    fn add(&self, req: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().unwrap();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        self.changed.notify_waiters();
    }

    /// Waits (30 s at most) until `done` holds for the spans received.
    async fn wait<T>(&self, what: &str, done: impl Fn(&[(String, Span)]) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            let notified = self.changed.notified();
            if let Some(t) = done(&self.spans.lock().unwrap()) {
                return t;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "collector never received {what}; got {:?}", self.spans.lock().unwrap());
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    fn all(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap().clone()
    }
}

struct OtlpGrpc(Received);

#[tonic::async_trait]
impl TraceService for OtlpGrpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC collector on 127.0.0.1:0.
async fn otlp_grpc_collector() -> (SocketAddr, Received) {
    let received = Received::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = TraceServiceServer::new(OtlpGrpc(received.clone()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (addr, received)
}

/// A plain HTTP collector on 127.0.0.1:0 (OTLP/HTTP protobuf and Zipkin JSON): every
/// POST's path, content type and body are kept; OTLP bodies are decoded into spans.
async fn http_collector() -> (SocketAddr, Received) {
    let received = Received::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let r = r.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let r = r.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let ct = req
                            .headers()
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        // The batch first: a test that saw a span may read its batch.
                        r.batches.lock().unwrap().push((format!("{path} {ct}"), String::from_utf8_lossy(&body).into()));
                        if ct == "application/x-protobuf" {
                            if let Ok(m) = ExportTraceServiceRequest::decode(body.clone()) {
                                r.add(m);
                            }
                        }
                        r.changed.notify_waiters();
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, received)
}

fn typed(name: &str, any: Any) -> TracingHttp {
    TracingHttp { name: name.into(), config_type: Some(ConfigType::TypedConfig(any)) }
}

fn otel_grpc_provider(cluster: &str) -> TracingHttp {
    otel_grpc_provider_with_timeout(cluster, None)
}

/// OTLP/gRPC to `cluster`, each export bounded by `timeout` (the proxy's default: 5 s).
fn otel_grpc_provider_with_timeout(cluster: &str, timeout: Option<Duration>) -> TracingHttp {
    typed(
        "otel",
        pack_any(OpenTelemetryConfig {
            grpc_service: Some(GrpcService {
                target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(grpc_service::EnvoyGrpc {
                    cluster_name: cluster.into(),
                    ..Default::default()
                })),
                timeout: timeout
                    .map(|t| envoy_types::pb::google::protobuf::Duration { seconds: t.as_secs() as i64, nanos: 0 }),
                ..Default::default()
            }),
            service_name: "svc.default".into(),
            ..Default::default()
        }),
    )
}

fn tracing(provider: Option<TracingHttp>, percent: f64) -> Tracing {
    Tracing {
        provider,
        random_sampling: Some(Percent { value: percent }),
        custom_tags: vec![
            CustomTag {
                tag: "team".into(),
                r#type: Some(custom_tag::Type::Literal(custom_tag::Literal { value: "blue".into() })),
            },
            CustomTag {
                tag: "tenant".into(),
                r#type: Some(custom_tag::Type::RequestHeader(custom_tag::Header {
                    name: "x-tenant".into(),
                    default_value: "none".into(),
                })),
            },
        ],
        ..Default::default()
    }
}

/// An HTTP listener `name` on `addr` sending everything to `cluster`, traced with `t`,
/// with the route's decorator set when `decorator` is.
fn listener(
    name: &str,
    addr: SocketAddr,
    direction: i32,
    cluster: &str,
    decorator: Option<&str>,
    t: Option<Tracing>,
) -> Any {
    let mut r = route("r", prefix("/"), to(cluster));
    r.decorator = decorator.map(|d| Decorator { operation: d.into(), ..Default::default() });
    let routes = rc("routes", vec![vhost("all", &["*"], vec![r])]);
    let mut hcm = build::http_connection_manager(name, Routes::Inline(Box::new(routes)), None, &[]);
    hcm.tracing = t;
    let mut l = build::http_listener(name, addr, hcm);
    l.traffic_direction = direction;
    pack_any(l)
}

/// One proxy with its own control plane serving `clusters` and one listener.
async fn proxy(id: &str, clusters: Vec<Any>, listener: Any) -> (Mesh, ProxyHandle) {
    let mesh = Mesh::start().await;
    mesh.set(type_url::CLUSTER, clusters);
    mesh.set(type_url::LISTENER, vec![listener]);
    let p = mesh.proxy(id, false).await;
    mesh.synced_all(&p).await;
    (mesh, p)
}

fn static_cluster(name: &str, addr: SocketAddr, http2: bool) -> Any {
    pack_any(build::static_cluster(name, &[addr], http2))
}

async fn get(addr: SocketAddr, headers: &[(&str, &str)]) -> weft_testkit::http::Reply {
    let mut req = request(Method::GET, "svc.default:80", "/api/items?x=1", Bytes::new()).unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    send_h1(addr, req).await.unwrap()
}

/// The headers the echo app received.
fn app_headers(reply: &weft_testkit::http::Reply) -> BTreeMap<String, String> {
    let json = reply.json().unwrap();
    json["headers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect()
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn metric(p: &ProxyHandle, name_and_labels: &str) -> f64 {
    let page = weft_testkit::http::get_h1(p.metrics_addr(), "metrics", "/stats/prometheus").await.unwrap().text();
    page.lines().find_map(|l| l.strip_prefix(name_and_labels).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

/// Polls the proxy's metrics page until `series` reaches `min` (30 s at most).
async fn wait_metric(p: &ProxyHandle, series: &str, min: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = metric(p, series).await;
        if v >= min {
            return;
        }
        assert!(Instant::now() < deadline, "{series} stayed at {v}, below {min}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_and_inbound_spans_reach_an_otlp_grpc_collector_with_parents_and_attributes() {
    let app = EchoServer::start("app").await;
    let (collector, received) = otlp_grpc_collector().await;
    let inbound_addr = weft_testkit::net::reserve_addr();
    let t = tracing(Some(otel_grpc_provider("otel")), 100.0);
    let (_mb, b) = proxy(
        "server",
        vec![static_cluster("inbound|80||", app.addr, false), static_cluster("otel", collector, true)],
        listener("in", inbound_addr, INBOUND, "inbound|80||", None, Some(t.clone())),
    )
    .await;
    let (_ma, a) = proxy(
        "client",
        vec![static_cluster("outbound|80||svc.default", inbound_addr, false), static_cluster("otel", collector, true)],
        listener(
            "out",
            "127.0.0.1:0".parse().unwrap(),
            OUTBOUND,
            "outbound|80||svc.default",
            Some("svc.default.svc.cluster.local:80/*"),
            Some(t),
        ),
    )
    .await;
    let out = a.listener_addr("out", WAIT).await.unwrap();
    assert!(b.listener_addr("in", WAIT).await.is_some());

    let reply = get(out, &[("x-tenant", "acme")]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = app_headers(&reply);
    let (client, server) = received
        .wait("a client and a server span", |spans| {
            let client = spans.iter().find(|(_, s)| s.kind == 3)?;
            let server = spans.iter().find(|(_, s)| s.kind == 2)?;
            Some((client.clone(), server.clone()))
        })
        .await;
    let (service, client) = client;
    let (_, server) = server;
    assert_eq!(service, "svc.default");
    // One trace: the server span's parent is the client span; the client span is the root.
    assert_eq!(client.trace_id, server.trace_id);
    assert!(client.parent_span_id.is_empty(), "a new trace starts at the outbound proxy");
    assert_eq!(server.parent_span_id, client.span_id);
    // The app sees the inbound proxy's span as its parent, in W3C and B3.
    let trace = hex(&client.trace_id);
    assert_eq!(seen["traceparent"], format!("00-{trace}-{}-01", hex(&server.span_id)));
    assert_eq!(seen["x-b3-traceid"], trace);
    assert_eq!(seen["x-b3-spanid"], hex(&server.span_id));
    assert_eq!(seen["x-b3-parentspanid"], hex(&client.span_id));
    assert_eq!(seen["x-b3-sampled"], "1");
    // Names: the route's decorator, else authority and path.
    assert_eq!(client.name, "svc.default.svc.cluster.local:80/*");
    assert_eq!(server.name, "svc.default:80/api/items");
    // Istio's attributes.
    let request_id = seen["x-request-id"].clone();
    for (span, node, cluster) in [(&client, "client", "outbound|80||svc.default"), (&server, "server", "inbound|80||")]
    {
        assert_eq!(attr(span, "node_id").as_deref(), Some(node));
        assert_eq!(attr(span, "guid:x-request-id").as_deref(), Some(request_id.as_str()));
        assert_eq!(attr(span, "http.method").as_deref(), Some("GET"));
        assert_eq!(attr(span, "http.url").as_deref(), Some("http://svc.default:80/api/items?x=1"));
        assert_eq!(attr(span, "http.protocol").as_deref(), Some("HTTP/1.1"));
        assert_eq!(attr(span, "http.status_code").as_deref(), Some("200"));
        assert_eq!(attr(span, "upstream_cluster").as_deref(), Some(cluster));
        assert_eq!(attr(span, "upstream_cluster.name").as_deref(), Some(cluster));
        assert_eq!(attr(span, "component").as_deref(), Some("proxy"));
        assert_eq!(attr(span, "response_flags").as_deref(), Some("-"));
        assert_eq!(attr(span, "istio.canonical_service").as_deref(), Some(node));
        assert_eq!(attr(span, "istio.canonical_revision").as_deref(), Some("v1"));
        assert_eq!(attr(span, "istio.namespace").as_deref(), Some("default"));
        assert_eq!(attr(span, "istio.mesh_id").as_deref(), Some("cluster.local"));
        assert_eq!(attr(span, "team").as_deref(), Some("blue"));
        assert_eq!(attr(span, "tenant").as_deref(), Some("acme"));
        assert!(attr(span, "peer.address").is_some() && attr(span, "upstream_address").is_some());
        assert!(attr(span, "error").is_none());
        assert!(span.end_time_unix_nano >= span.start_time_unix_nano && span.start_time_unix_nano > 0);
    }
    assert_eq!(attr(&client, "upstream_address"), Some(inbound_addr.to_string()));
    wait_metric(&a, "weft_tracing_spans_exported_total", 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_replies_get_error_spans_and_callers_w3c_context_is_continued() {
    let (collector, received) = otlp_grpc_collector().await;
    let dead = weft_testkit::net::reserve_addr();
    let (_m, p) = proxy(
        "edge",
        vec![static_cluster("down", dead, false), static_cluster("otel", collector, true)],
        listener(
            "out",
            "127.0.0.1:0".parse().unwrap(),
            OUTBOUND,
            "down",
            None,
            Some(tracing(Some(otel_grpc_provider("otel")), 0.0)),
        ),
    )
    .await;
    let out = p.listener_addr("out", WAIT).await.unwrap();
    // Sampling is 0%, but the caller sampled: its decision and trace continue.
    let reply = get(out, &[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]).await;
    assert_eq!(reply.status, 503);
    let span = received
        .wait("the 503 span", |spans| {
            spans.iter().find(|(_, s)| attr(s, "http.status_code").as_deref() == Some("503")).cloned()
        })
        .await
        .1;
    assert_eq!(hex(&span.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex(&span.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(attr(&span, "error").as_deref(), Some("true"));
    assert_eq!(attr(&span, "response_flags").as_deref(), Some("UF"));
    assert_eq!(span.status.as_ref().map(|s| s.code), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_http_and_zipkin_collectors_get_well_formed_batches() {
    let app = EchoServer::start("app").await;
    let (collector, received) = http_collector().await;
    let otlp_http = typed(
        "otlp-http",
        pack_any(OpenTelemetryConfig {
            http_service: Some(HttpService {
                http_uri: Some(HttpUri {
                    uri: format!("http://{collector}/v1/traces"),
                    http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster("collector".into())),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    );
    let clusters = vec![static_cluster("app", app.addr, false), static_cluster("collector", collector, false)];
    let any_addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (mesh, p) =
        proxy("web", clusters, listener("out", any_addr, OUTBOUND, "app", None, Some(tracing(Some(otlp_http), 100.0))))
            .await;
    let out = p.listener_addr("out", WAIT).await.unwrap();
    let reply = get(out, &[]).await;
    assert_eq!(reply.status, 200);
    let span = received.wait("an OTLP/HTTP span", |spans| spans.first().cloned()).await;
    assert_eq!(span.0, "test", "without a service_name the node's cluster names the service");
    assert_eq!(span.1.kind, 3);
    assert_eq!(received.batches.lock().unwrap()[0].0, "/v1/traces application/x-protobuf");

    // Switch the provider to Zipkin (Istio's settings: 128-bit ids, no shared span context).
    let zipkin = typed(
        "zipkin",
        pack_any(ZipkinConfig {
            collector_cluster: "collector".into(),
            collector_endpoint: "/api/v2/spans".into(),
            collector_endpoint_version: 1,
            trace_id_128bit: true,
            shared_span_context: Some(BoolValue { value: false }),
            ..Default::default()
        }),
    );
    mesh.set(
        type_url::LISTENER,
        vec![listener("out", any_addr, OUTBOUND, "app", None, Some(tracing(Some(zipkin), 100.0)))],
    );
    mesh.synced(&p, type_url::LISTENER).await;
    let reply = get(out, &[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]).await;
    assert_eq!(reply.status, 200);
    let seen = app_headers(&reply);
    // The caller used the single b3 header: it gets one back, next to W3C and B3 multi.
    assert!(seen["b3"].starts_with("80f198ee56343ba864fe8b2a57d3eff7-"), "{seen:?}");
    assert!(seen["traceparent"].starts_with("00-80f198ee56343ba864fe8b2a57d3eff7-"), "{seen:?}");
    let json = received
        .wait("a Zipkin batch", |_| {
            let batches = received.batches.lock().unwrap();
            batches.iter().find(|(k, _)| k == "/api/v2/spans application/json").map(|(_, b)| b.clone())
        })
        .await;
    let spans: serde_json::Value = serde_json::from_str(&json).unwrap();
    let s = &spans.as_array().unwrap()[0];
    assert_eq!(s["traceId"], "80f198ee56343ba864fe8b2a57d3eff7");
    assert_eq!(s["parentId"], "e457b5a2e4d86bd1");
    assert_eq!(s["kind"], "CLIENT");
    assert_eq!(s["id"].as_str().unwrap().len(), 16);
    assert_eq!(s["localEndpoint"]["serviceName"], "test");
    assert_eq!(s["tags"]["http.status_code"], "200");
    assert_eq!(s["tags"]["upstream_cluster"], "app");
    assert!(s["timestamp"].as_u64().unwrap() > 0 && s["duration"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_traces_are_sampled_at_the_configured_rate_and_callers_decisions_win() {
    let app = EchoServer::start("app").await;
    let (collector, received) = otlp_grpc_collector().await;
    let (_m, p) = proxy(
        "sampler",
        vec![static_cluster("app", app.addr, false), static_cluster("otel", collector, true)],
        listener(
            "out",
            "127.0.0.1:0".parse().unwrap(),
            OUTBOUND,
            "app",
            None,
            Some(tracing(Some(otel_grpc_provider("otel")), 30.0)),
        ),
    )
    .await;
    let out = p.listener_addr("out", WAIT).await.unwrap();
    const N: u32 = 400;
    let mut sampled = 0u32;
    for _ in 0..N {
        let seen = app_headers(&get(out, &[]).await);
        // Every request gets a context; the flag says whether it is sampled.
        let tp = &seen["traceparent"];
        if tp.ends_with("-01") {
            sampled += 1;
        } else {
            assert!(tp.ends_with("-00"), "{tp}");
        }
    }
    // Binomial(400, 0.3): mean 120, sigma 9.2; 5 sigma either way.
    assert!((74..=166).contains(&sampled), "sampled {sampled} of {N} at 30%");
    // Exactly the sampled requests are exported.
    received.wait("every sampled span", |spans| (spans.len() == sampled as usize).then_some(())).await;

    // The caller's decision wins over the 30%: sampled=0 is never exported, sampled=1 always.
    let not = get(
        out,
        &[
            ("x-b3-traceid", "000000000000000000000000000000aa"),
            ("x-b3-spanid", "00000000000000bb"),
            ("x-b3-sampled", "0"),
        ],
    )
    .await;
    assert_eq!(app_headers(&not)["x-b3-sampled"], "0");
    let yes = get(
        out,
        &[
            ("x-b3-traceid", "000000000000000000000000000000cc"),
            ("x-b3-spanid", "00000000000000dd"),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    assert_eq!(app_headers(&yes)["x-b3-sampled"], "1");
    received
        .wait("the caller-sampled span", |spans| {
            spans.iter().any(|(_, s)| hex(&s.trace_id) == "000000000000000000000000000000cc").then_some(())
        })
        .await;
    assert!(
        !received.all().iter().any(|(_, s)| hex(&s.trace_id) == "000000000000000000000000000000aa"),
        "an unsampled trace was exported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_stuck_collector_never_fails_requests_and_drops_are_counted_with_a_bounded_queue() {
    let app = EchoServer::start("app").await;
    // A collector that accepts connections and never answers: every export times out.
    let stuck = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stuck_addr = stuck.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = stuck.accept().await {
            held.push(s);
        }
    });
    let dead = weft_testkit::net::reserve_addr();
    let (mesh, p) = proxy(
        "busy",
        vec![static_cluster("app", app.addr, false), static_cluster("otel", dead, true)],
        listener(
            "out",
            "127.0.0.1:0".parse().unwrap(),
            OUTBOUND,
            "app",
            None,
            // Each stuck export holds its batch for 60 s: the queue fills whatever the
            // machine's speed.
            Some(tracing(Some(otel_grpc_provider_with_timeout("otel", Some(Duration::from_secs(60)))), 100.0)),
        ),
    )
    .await;
    let out = p.listener_addr("out", WAIT).await.unwrap();
    // Collector down (connection refused): requests succeed, the batch is dropped and counted.
    for _ in 0..20 {
        assert_eq!(get(out, &[]).await.status, 200);
    }
    wait_metric(&p, "weft_tracing_spans_dropped_total{reason=\"export_failed\"}", 20.0).await;

    // Collector stuck: spans pile up to the queue's bound, then are dropped as queue_full,
    // while requests keep succeeding.
    mesh.set(type_url::CLUSTER, vec![static_cluster("app", app.addr, false), static_cluster("otel", stuck_addr, true)]);
    mesh.synced(&p, type_url::CLUSTER).await;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let p_metrics = p.metrics_addr();
            tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(out).await.unwrap();
                let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
                tokio::spawn(conn);
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut sent = 0u32;
                loop {
                    let req = request(Method::GET, "svc", "/", Bytes::new()).unwrap();
                    tx.ready().await.unwrap();
                    let resp = tx.send_request(req).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    resp.into_body().collect().await.unwrap();
                    sent += 1;
                    if sent.is_multiple_of(200) {
                        let page =
                            weft_testkit::http::get_h1(p_metrics, "m", "/stats/prometheus").await.unwrap().text();
                        if page.contains("weft_tracing_spans_dropped_total{reason=\"queue_full\"}") {
                            return sent;
                        }
                        assert!(Instant::now() < deadline, "the queue never filled");
                    }
                }
            })
        })
        .collect();
    let mut total = 0;
    for c in clients {
        total += c.await.unwrap();
    }
    assert!(total > 4096);
    let queued = metric(&p, "weft_tracing_queue_spans").await;
    assert!(queued <= weft_proxy::telemetry::trace::QUEUE_CAPACITY as f64, "queue grew past its bound: {queued}");
    assert!(metric(&p, "weft_tracing_spans_dropped_total{reason=\"queue_full\"}").await > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_tracing_config_is_nacked_with_the_field_and_no_tracing_leaves_headers_untouched() {
    let app = EchoServer::start("app").await;
    let any_addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (mesh, p) = proxy(
        "plain",
        vec![static_cluster("app", app.addr, false)],
        listener("out", any_addr, OUTBOUND, "app", None, None),
    )
    .await;
    let out = p.listener_addr("out", WAIT).await.unwrap();
    // No tracing block: trace headers pass through as they came, none are created.
    let seen = app_headers(&get(out, &[("x-b3-sampled", "0")]).await);
    assert_eq!(seen.get("x-b3-sampled").map(String::as_str), Some("0"));
    assert!(!seen.contains_key("traceparent") && !seen.contains_key("x-b3-traceid"));

    for (t, want) in [
        (tracing(Some(otel_grpc_provider("nowhere")), 100.0), "unknown collector cluster \"nowhere\""),
        (tracing(Some(otel_grpc_provider("app")), 150.0), "random_sampling.value: 150 is outside 0..=100"),
        (
            tracing(
                Some(typed(
                    "x",
                    Any { type_url: "type.googleapis.com/envoy.config.trace.v3.LightstepConfig".into(), value: vec![] },
                )),
                1.0,
            ),
            "unsupported tracing provider",
        ),
    ] {
        mesh.set(type_url::LISTENER, vec![listener("out", any_addr, OUTBOUND, "app", None, Some(t))]);
        let deadline = Instant::now() + WAIT;
        loop {
            let nack = p.xds_status().borrow().last_nack.clone().unwrap_or_default();
            if nack.contains(want) {
                break;
            }
            assert!(Instant::now() < deadline, "no NACK containing {want:?}; last: {nack:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_tracing_on_applies_to_an_open_connection_from_its_next_request() {
    let app = EchoServer::start("app").await;
    let any_addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (mesh, p) = proxy(
        "live",
        vec![static_cluster("app", app.addr, false)],
        listener("out", any_addr, OUTBOUND, "app", None, None),
    )
    .await;
    let out = p.listener_addr("out", WAIT).await.unwrap();
    let stream = tokio::net::TcpStream::connect(out).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut send = async move || {
        tx.ready().await.unwrap();
        let resp = tx.send_request(request(Method::GET, "svc", "/", Bytes::new()).unwrap()).await.unwrap();
        let close = resp.headers().contains_key("connection");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        (close, json["headers"].get("traceparent").is_some())
    };
    assert_eq!(send().await, (false, false));
    // Tracing without a provider (Istio's disableSpanReporting): context only.
    mesh.set(type_url::LISTENER, vec![listener("out", any_addr, OUTBOUND, "app", None, Some(tracing(None, 100.0)))]);
    mesh.synced(&p, type_url::LISTENER).await;
    assert_eq!(send().await, (false, true), "the same connection, not drained, now traced");
}
