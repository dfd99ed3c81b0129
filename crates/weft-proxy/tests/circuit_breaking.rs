//! Circuit breaking with Envoy's semantics, seen from outside: `max_connections` +
//! `max_pending_requests` queue and then refuse HTTP/1 requests with 503 `UO` and
//! `x-envoy-overloaded`, counted in `weft_upstream_rq_pending_overflow`;
//! `max_requests_per_connection` and `idle_timeout` close upstream connections; a retry
//! budget keeps retries from multiplying the load on a failing backend.

#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::thresholds::RetryBudget;
use envoy_types::pb::envoy::config::cluster::v3::{circuit_breakers::Thresholds, CircuitBreakers, Cluster};
use envoy_types::pb::envoy::config::core::v3::{HealthStatus, HttpProtocolOptions as Common};
use envoy_types::pb::envoy::config::route::v3::RetryPolicy;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};
use envoy_types::util::pack_any;
use http_body_util::Full;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::get_h1;
use weft_xds::build;
use weft_xds::type_url;

const HTTP_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

fn u32v(value: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value })
}

/// Serves cluster `cb` (endpoint `backend`) on listener `out` with `route`'s retry policy.
async fn start(mesh: &Mesh, c: Cluster, backend: SocketAddr, retry: Option<RetryPolicy>) -> (ProxyHandle, SocketAddr) {
    let name = c.name.clone();
    mesh.set(type_url::CLUSTER, vec![pack_any(c)]);
    mesh.set(type_url::ENDPOINT, vec![pack_any(build::cla(&name, &[(backend, 1, HealthStatus::Healthy)]))]);
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    let mut action = to(&name);
    action.retry_policy = retry;
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), action)])]))],
    );
    let proxy = mesh.proxy("cb", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    (proxy, out)
}

fn thresholds(t: Thresholds) -> Option<CircuitBreakers> {
    Some(CircuitBreakers { thresholds: vec![t], ..Default::default() })
}

/// The value of the first sample of `name` whose line contains `needle`, 0 when absent.
fn sample(metrics: &str, name: &str, needle: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn http1_requests_beyond_max_connections_wait_as_pending_and_overflow_with_503_uo() {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start("slow").await;
    let mut c = build::eds_cluster("cb", false);
    c.circuit_breakers =
        thresholds(Thresholds { max_connections: u32v(1), max_pending_requests: u32v(1), ..Default::default() });
    let (proxy, out) = start(&mesh, c, echo.addr, None).await;

    // The first request holds the cluster's only connection...
    let first = tokio::spawn(async move { get_h1(out, "svc", "/delay/800").await.unwrap() });
    echo.wait_for_requests(1).await;
    // ...so of the next two, one waits as the pending request and one overflows.
    let (a, b) = tokio::join!(get_h1(out, "svc", "/"), get_h1(out, "svc", "/"));
    let mut replies = [first.await.unwrap(), a.unwrap(), b.unwrap()];
    replies.sort_by_key(|r| r.status);
    let statuses: Vec<u16> = replies.iter().map(|r| r.status.as_u16()).collect();
    assert_eq!(statuses, vec![200, 200, 503], "one connection, one pending request, the third overflows");
    let overflowed = &replies[2];
    assert_eq!(overflowed.header("x-envoy-overloaded"), Some("true"));
    assert!(String::from_utf8_lossy(&overflowed.body).contains("overflow"));
    assert!(replies[..2].iter().all(|r| r.header("x-envoy-overloaded").is_none()));
    assert_eq!(echo.connections(), 1, "the pending request reused the one connection");

    let m = proxy.context().metrics.encode();
    assert_eq!(sample(&m, "weft_upstream_rq_pending_overflow", "cluster=\"cb\""), 1.0, "{m}");
    assert_eq!(sample(&m, "istio_requests_total{", "response_flags=\"UO\""), 1.0, "{m}");
    // The breaker is released: the next request goes through.
    assert_eq!(get_h1(out, "svc", "/").await.unwrap().status, 200);
}

#[tokio::test]
async fn a_cluster_update_keeps_the_circuit_breaker_state_of_what_is_in_flight() {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start("slow").await;
    let cluster = |connect_ms: i32| {
        let mut c = build::eds_cluster("cb", false);
        c.connect_timeout = Some(PbDuration { seconds: 0, nanos: connect_ms * 1_000_000 });
        c.circuit_breakers =
            thresholds(Thresholds { max_connections: u32v(1), max_pending_requests: u32v(1), ..Default::default() });
        c
    };
    let (proxy, out) = start(&mesh, cluster(900), echo.addr, None).await;
    let first = tokio::spawn(async move { get_h1(out, "svc", "/delay/800").await.unwrap() });
    echo.wait_for_requests(1).await;
    // A new version of the cluster arrives while its only connection is busy: that
    // connection still counts, so of two more requests one waits and one overflows.
    mesh.set(type_url::CLUSTER, vec![pack_any(cluster(800))]);
    mesh.synced(&proxy, type_url::CLUSTER).await;
    let (a, b) = tokio::join!(get_h1(out, "svc", "/"), get_h1(out, "svc", "/"));
    let mut statuses = [first.await.unwrap().status.as_u16(), a.unwrap().status.as_u16(), b.unwrap().status.as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 200, 503]);
    assert_eq!(echo.connections(), 1, "no second connection after the update");
}

#[tokio::test]
async fn max_requests_per_connection_of_one_opens_a_connection_per_request() {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start("fresh").await;
    let mut c = build::eds_cluster("cb", false);
    let opts = HttpProtocolOptions {
        common_http_protocol_options: Some(Common { max_requests_per_connection: u32v(1), ..Default::default() }),
        ..Default::default()
    };
    c.typed_extension_protocol_options.insert(HTTP_OPTIONS.into(), pack_any(opts));
    let (_proxy, out) = start(&mesh, c, echo.addr, None).await;
    for _ in 0..3 {
        assert_eq!(get_h1(out, "svc", "/").await.unwrap().status, 200);
    }
    assert_eq!(echo.connections(), 3, "each request on a new upstream connection");
}

#[tokio::test]
async fn the_clusters_idle_timeout_closes_idle_upstream_connections() {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start("idle").await;
    let mut c = build::eds_cluster("cb", false);
    let opts = HttpProtocolOptions {
        common_http_protocol_options: Some(Common {
            idle_timeout: Some(PbDuration { seconds: 0, nanos: 200_000_000 }),
            ..Default::default()
        }),
        ..Default::default()
    };
    c.typed_extension_protocol_options.insert(HTTP_OPTIONS.into(), pack_any(opts));
    let (proxy, out) = start(&mesh, c, echo.addr, None).await;
    assert_eq!(get_h1(out, "svc", "/").await.unwrap().status, 200);
    let open = || proxy.context().pools.stats().endpoints.iter().map(|e| e.http1_open).sum::<usize>();
    // The pools' own idle timeout is 60 s: only the cluster's 200 ms closes it in time.
    let deadline = tokio::time::Instant::now() + WAIT;
    while open() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the idle upstream connection was never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get_h1(out, "svc", "/").await.unwrap().status, 200);
    assert_eq!(echo.connections(), 2, "the second request needed a new connection");
}

/// A backend that has gone bad: it holds the first `burst` requests until all have
/// arrived (so they fail together, as under load) and answers them 503; it holds every
/// later request (a retry) until the test opens `gate`, then answers it 503.
struct Failing {
    addr: SocketAddr,
    attempts: Arc<AtomicU64>,
    gate: tokio::sync::watch::Sender<bool>,
}

impl Failing {
    async fn start(burst: u64) -> Failing {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let attempts = Arc::new(AtomicU64::new(0));
        let arrived = Arc::new(tokio::sync::watch::channel(0u64).0);
        let gate = tokio::sync::watch::channel(false).0;
        let (counter, opened) = (attempts.clone(), gate.subscribe());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (counter, arrived, opened) = (counter.clone(), arrived.clone(), opened.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let (counter, arrived, mut opened) = (counter.clone(), arrived.clone(), opened.clone());
                        async move {
                            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                            arrived.send_replace(n);
                            if n <= burst {
                                let _ = arrived.subscribe().wait_for(|seen| *seen >= burst).await;
                            } else {
                                let _ = opened.wait_for(|open| *open).await;
                            }
                            let resp = http::Response::builder().status(503).body(Full::new(bytes::Bytes::new()));
                            Ok::<_, Infallible>(resp.unwrap())
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                });
            }
        });
        Failing { addr, attempts, gate }
    }
}

/// `BURST` concurrent requests, each allowed 3 retries on 5xx, to a backend failing them
/// all; returns the attempts the backend saw and the proxy's metrics.
async fn failing_burst(budget: Option<RetryBudget>) -> (u64, String) {
    const BURST: u64 = 10;
    let mesh = Mesh::start().await;
    let backend = Failing::start(BURST).await;
    let mut c = build::eds_cluster("cb", false);
    // Istio gives every cluster max_retries 2^32-1: without a budget nothing bounds retries.
    c.circuit_breakers =
        thresholds(Thresholds { max_retries: u32v(u32::MAX), retry_budget: budget, ..Default::default() });
    let retry = RetryPolicy {
        retry_on: "5xx".into(),
        num_retries: u32v(3),
        retry_back_off: Some(envoy_types::pb::envoy::config::route::v3::retry_policy::RetryBackOff {
            base_interval: Some(PbDuration { seconds: 0, nanos: 1_000_000 }),
            max_interval: Some(PbDuration { seconds: 0, nanos: 2_000_000 }),
        }),
        ..Default::default()
    };
    let (proxy, out) = start(&mesh, c, backend.addr, Some(retry)).await;
    let answered = Arc::new(AtomicU64::new(0));
    let calls: Vec<_> = (0..BURST)
        .map(|_| {
            let answered = answered.clone();
            tokio::spawn(async move {
                let status = get_h1(out, "svc", "/").await.unwrap().status.as_u16();
                answered.fetch_add(1, Ordering::SeqCst);
                status
            })
        })
        .collect();
    // Every request has either been answered (its retry refused) or has its first
    // retry held at the backend: then let the retries fail too.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let held = backend.attempts.load(Ordering::SeqCst).saturating_sub(BURST);
        if answered.load(Ordering::SeqCst) + held >= BURST {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the burst never settled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    backend.gate.send_replace(true);
    for call in calls {
        assert_eq!(call.await.unwrap(), 503);
    }
    (backend.attempts.load(Ordering::SeqCst), proxy.context().metrics.encode())
}

#[tokio::test]
async fn without_a_retry_budget_retries_multiply_the_load_on_a_failing_backend() {
    let (attempts, m) = failing_burst(None).await;
    assert_eq!(attempts, 40, "10 requests, each tried 4 times");
    assert_eq!(sample(&m, "weft_upstream_rq_retry_overflow", "cluster=\"cb\""), 0.0, "{m}");
}

#[tokio::test]
async fn a_retry_budget_bounds_the_retries_to_a_failing_backend() {
    let budget = RetryBudget {
        budget_percent: Some(Percent { value: 20.0 }),
        min_retry_concurrency: u32v(1),
        ..Default::default()
    };
    let (attempts, m) = failing_burst(Some(budget)).await;
    // 10 requests fail at once: 20% of them (2) may retry concurrently, and those
    // retries are held, so the other 8 are answered without a retry. The (at most 2)
    // retrying requests try at most 3 times each.
    assert!((11..=16).contains(&attempts), "attempts {attempts}: the budget allows 10 + at most 2 x 3");
    assert!(sample(&m, "weft_upstream_rq_retry_overflow", "cluster=\"cb\"") >= 8.0, "{m}");
    assert!(sample(&m, "istio_requests_total{", "response_flags=\"UO\"") >= 8.0, "{m}");
}

#[tokio::test]
async fn a_tcp_proxy_cluster_at_max_connections_closes_new_connections_with_uo() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = Mesh::start().await;
    let echo = weft_testkit::echo::TcpEchoServer::start().await;
    let mut c = build::eds_cluster("db", false);
    c.circuit_breakers = thresholds(Thresholds { max_connections: u32v(1), ..Default::default() });
    mesh.set(type_url::CLUSTER, vec![pack_any(c)]);
    mesh.set(type_url::ENDPOINT, vec![pack_any(build::cla("db", &[(echo.addr, 1, HealthStatus::Healthy)]))]);
    mesh.set(type_url::LISTENER, vec![pack_any(build::tcp_listener("tcp", "127.0.0.1:0".parse().unwrap(), "db"))]);
    let proxy = mesh.proxy("tcp", false).await;
    mesh.synced_all(&proxy).await;
    let addr = proxy.listener_addr("tcp", WAIT).await.unwrap();

    let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
    first.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    first.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping", "the first connection is proxied");
    // The second is over max_connections: closed without reaching the backend.
    let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(WAIT, second.read_to_end(&mut rest)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "closed at once");
    assert_eq!(echo.connections(), 1);
    let m = proxy.context().metrics.encode();
    assert_eq!(sample(&m, "weft_upstream_cx_overflow", "cluster=\"db\""), 1.0, "{m}");
    // Closing the first frees the slot.
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"pong").await.unwrap();
        if tokio::time::timeout(WAIT, s.read_exact(&mut buf)).await.unwrap().is_ok() {
            assert_eq!(&buf, b"pong");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the slot was never freed");
    }
}

#[tokio::test]
async fn requests_arriving_together_open_no_more_than_max_connections() {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start("burst").await;
    let mut c = build::eds_cluster("cb", false);
    c.circuit_breakers =
        thresholds(Thresholds { max_connections: u32v(1), max_pending_requests: u32v(10), ..Default::default() });
    let (_proxy, out) = start(&mesh, c, echo.addr, None).await;
    // Five at once, while no connection exists yet: one is opened, the others wait for it.
    let calls = (0..5).map(|_| async move { get_h1(out, "svc", "/delay/50").await.unwrap().status.as_u16() });
    let statuses = futures::future::join_all(calls).await;
    assert_eq!(statuses, vec![200; 5]);
    assert_eq!(echo.connections(), 1);
}
