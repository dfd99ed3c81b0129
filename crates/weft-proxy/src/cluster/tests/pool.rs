use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use super::endpoint;
use crate::cluster::pool::{ConnSettings, Connector, Upstream};
use crate::cluster::{BoxBody, PoolConfig, Pools, UpstreamProtocol};
use crate::error::ErrorKind;

const TIMEOUT: Duration = Duration::from_secs(2);

/// A loopback hyper server answering `<authority or Host> <path>`; counts connections.
struct Server {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    tasks: JoinSet<()>,
}

impl Server {
    async fn start(h2: bool) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Server::on(listener, h2, None)
    }

    /// `gate`: when set, every request waits until `gate.1` requests are in flight.
    fn on(listener: TcpListener, h2: bool, gate: Option<(Arc<Notify>, usize)>) -> Server {
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        let count = Arc::clone(&accepted);
        let in_flight = Arc::new(AtomicUsize::new(0));
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let gate = gate.clone();
                let in_flight = Arc::clone(&in_flight);
                let svc = service_fn(move |req: Request<Incoming>| {
                    let gate = gate.clone();
                    let in_flight = Arc::clone(&in_flight);
                    async move {
                        if let Some((notify, n)) = gate {
                            let notified = notify.notified();
                            if in_flight.fetch_add(1, Ordering::SeqCst) + 1 >= n {
                                notify.notify_waiters();
                            } else {
                                notified.await;
                            }
                        }
                        let host = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .or_else(|| {
                                req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string)
                            })
                            .unwrap_or_default();
                        if req.uri().path() == "/big" {
                            // Too big to be buffered: the connection stays busy until read.
                            let big = Bytes::from(vec![b'x'; 4 << 20]);
                            return Ok::<_, hyper::Error>(Response::new(Full::new(big)));
                        }
                        let body = format!("{host} {}", req.uri());
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(body))))
                    }
                });
                let io = TokioIo::new(stream);
                conns.spawn(async move {
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                    }
                });
            }
        });
        Server { addr, accepted, tasks }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Stops accepting and closes every connection (tasks are awaited, sockets dropped).
    async fn stop(mut self) {
        self.tasks.shutdown().await;
    }
}

fn get(uri: &str, host: &str) -> Request<BoxBody> {
    Request::builder()
        .uri(uri)
        .header(http::header::HOST, host)
        .body(Empty::<Bytes>::new().map_err(|never| match never {}).boxed_unsync())
        .unwrap()
}

async fn body(resp: Response<crate::cluster::UpstreamBody>) -> String {
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn http1_reuses_keep_alive_connections() {
    let server = Server::start(false).await;
    let pools = Pools::new(PoolConfig::default());
    let ep = endpoint(server.addr);
    for i in 0..5 {
        let resp =
            pools.send(&ep, UpstreamProtocol::Http1, TIMEOUT, get(&format!("/r{i}"), "a.example")).await.unwrap();
        assert_eq!(body(resp).await, format!("a.example /r{i}"));
    }
    assert_eq!(server.accepted(), 1);
    let stats = pools.stats();
    assert_eq!(stats.endpoints.len(), 1);
    assert_eq!(stats.endpoints[0].http1_open, 1);
    assert_eq!(stats.endpoints[0].http1_pooled, 1);
}

#[tokio::test]
async fn http1_request_uri_is_origin_form_with_host() {
    let server = Server::start(false).await;
    let pools = Pools::new(PoolConfig::default());
    let req = Request::builder()
        .uri("http://svc.ns:8080/p?q=1")
        .body(Empty::<Bytes>::new().map_err(|never| match never {}).boxed_unsync())
        .unwrap();
    let resp = pools.send(&endpoint(server.addr), UpstreamProtocol::Http1, TIMEOUT, req).await.unwrap();
    assert_eq!(body(resp).await, "svc.ns:8080 /p?q=1");
}

/// A raw HTTP/1.1 server that answers one request per connection with a keep-alive
/// response and then closes the connection: every pooled connection goes stale.
async fn closing_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                // Close without `connection: close`: the client believes it can reuse.
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn stale_keep_alive_connections_never_surface_as_errors() {
    let (addr, accepted) = closing_server().await;
    let pools = Pools::new(PoolConfig::default());
    let ep = endpoint(addr);
    for _ in 0..20 {
        let resp = pools.send(&ep, UpstreamProtocol::Http1, TIMEOUT, get("/", "a")).await.unwrap();
        assert_eq!(body(resp).await, "ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 20);
}

#[tokio::test]
async fn http2_multiplexes_concurrent_requests_on_one_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    // Every request waits until all 40 are in flight at once.
    let server = Server::on(listener, true, Some((Arc::new(Notify::new()), 40)));
    let pools = Pools::new(PoolConfig::default());
    let ep = Arc::new(endpoint(server.addr));
    let mut reqs = JoinSet::new();
    for i in 0..40 {
        let pools = pools.clone();
        let ep = Arc::clone(&ep);
        reqs.spawn(async move {
            let resp =
                pools.send(&ep, UpstreamProtocol::Http2, TIMEOUT, get(&format!("/{i}"), "b.example")).await.unwrap();
            body(resp).await
        });
    }
    let mut n = 0;
    while let Some(r) =
        tokio::time::timeout(Duration::from_secs(10), reqs.join_next()).await.expect("requests completed")
    {
        assert!(r.unwrap().starts_with("b.example "));
        n += 1;
    }
    assert_eq!(n, 40);
    assert_eq!(server.accepted(), 1);
    assert_eq!(pools.stats().endpoints[0].http2_open, 1);
}

#[tokio::test]
async fn http2_authority_is_the_original_host_not_the_endpoint() {
    let server = Server::start(true).await;
    let pools = Pools::new(PoolConfig::default());
    let resp = pools
        .send(&endpoint(server.addr), UpstreamProtocol::Http2, TIMEOUT, get("/api?x=1", "reviews.default.svc:9080"))
        .await
        .unwrap();
    // The server sees an absolute URI whose authority came from :authority.
    assert_eq!(body(resp).await, "reviews.default.svc:9080 http://reviews.default.svc:9080/api?x=1");
}

#[tokio::test]
async fn use_downstream_follows_the_request_version() {
    let server = Server::start(true).await;
    let pools = Pools::new(PoolConfig::default());
    let mut req = get("/", "c");
    *req.version_mut() = http::Version::HTTP_2;
    let resp = pools.send(&endpoint(server.addr), UpstreamProtocol::UseDownstream, TIMEOUT, req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
}

#[tokio::test]
async fn connect_failure_is_reported_as_not_sent() {
    let addr = weft_testkit::net::reserve_addr();
    let pools = Pools::new(PoolConfig::default());
    for proto in [UpstreamProtocol::Http1, UpstreamProtocol::Http2] {
        let err = pools.send(&endpoint(addr), proto, TIMEOUT, get("/", "a")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectFailure, "{proto:?}: {err}");
        assert!(err.was_not_sent(), "{proto:?}");
    }
    let err = pools.connect_tcp(addr, TIMEOUT).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectFailure);
}

#[tokio::test]
async fn pools_survive_an_endpoint_going_away_and_coming_back() {
    for h2 in [false, true] {
        let proto = if h2 { UpstreamProtocol::Http2 } else { UpstreamProtocol::Http1 };
        let server = Server::start(h2).await;
        let addr = server.addr;
        let pools = Pools::new(PoolConfig::default());
        let ep = endpoint(addr);
        let resp = pools.send(&ep, proto, TIMEOUT, get("/1", "a")).await.unwrap();
        assert_eq!(body(resp).await, if h2 { "a http://a/1" } else { "a /1" });

        // Idle for a while (peers close idle connections), then gone just as the next
        // request arrives, in the same turn of the runtime.
        tokio::time::sleep(Duration::from_millis(150)).await;
        server.stop().await;
        let err = pools.send(&ep, proto, TIMEOUT, get("/2", "a")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectFailure, "h2={h2}: {err}");
        assert!(err.was_not_sent());

        let server = Server::on(TcpListener::bind(addr).await.unwrap(), h2, None);
        let resp = pools.send(&ep, proto, TIMEOUT, get("/3", "a")).await.unwrap();
        assert_eq!(body(resp).await, if h2 { "a http://a/3" } else { "a /3" });
        assert_eq!(server.accepted(), 1);
    }
}

/// A raw server that reads one request head per connection, then runs `answer`.
async fn raw_server(answer: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = stream.write_all(answer).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn invalid_response_is_an_upstream_protocol_error() {
    let addr = raw_server(b"NOT HTTP AT ALL\r\n\r\n").await;
    let pools = Pools::new(PoolConfig::default());
    let err = pools.send(&endpoint(addr), UpstreamProtocol::Http1, TIMEOUT, get("/", "a")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UpstreamProtocol, "{err}");
}

#[tokio::test]
async fn close_after_the_request_was_read_is_a_reset_that_may_have_been_seen() {
    let addr = raw_server(b"").await;
    let pools = Pools::new(PoolConfig::default());
    let err = pools.send(&endpoint(addr), UpstreamProtocol::Http1, TIMEOUT, get("/", "a")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UpstreamReset, "{err}");
    assert!(!err.was_not_sent(), "the upstream read the request");
}

#[tokio::test]
async fn http2_refused_stream_is_reported_as_not_sent() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let Ok(mut conn) = h2::server::handshake(stream).await else {
            return;
        };
        while let Some(Ok((_req, mut respond))) = conn.accept().await {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
        }
    });
    let pools = Pools::new(PoolConfig::default());
    let err = pools.send(&endpoint(addr), UpstreamProtocol::Http2, TIMEOUT, get("/", "a")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RefusedStream, "{err}");
    assert!(err.was_not_sent());
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let server = Server::start(false).await;
    let pools = Pools::new(PoolConfig {
        idle_timeout: Duration::from_millis(100),
        max_idle_per_endpoint: 4,
        reap_interval: Duration::from_millis(50),
    });
    let ep = endpoint(server.addr);
    let resp = pools.send(&ep, UpstreamProtocol::Http1, TIMEOUT, get("/", "a")).await.unwrap();
    body(resp).await;
    assert_eq!(pools.stats().endpoints[0].http1_open, 1);
    // The reaper runs every 50 ms; give it a generous deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while pools.stats().endpoints.first().is_some_and(|e| e.http1_open > 0) {
        assert!(tokio::time::Instant::now() < deadline, "idle connection never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And the pool still works afterwards.
    let resp = pools.send(&ep, UpstreamProtocol::Http1, TIMEOUT, get("/", "a")).await.unwrap();
    assert_eq!(body(resp).await, "a /");
    assert_eq!(server.accepted(), 2);
}

#[tokio::test]
async fn busy_connections_are_kept_so_the_next_burst_reuses_them() {
    let server = Server::start(false).await;
    let pools = Pools::new(PoolConfig { max_idle_per_endpoint: 2, ..PoolConfig::default() });
    let ep = Arc::new(endpoint(server.addr));
    // Two bursts of five responses held open at once: the second reuses the first's five
    // connections, however small the idle bound (it bounds idle connections, not busy ones).
    for burst in 0..2 {
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(pools.send(&ep, UpstreamProtocol::Http1, TIMEOUT, get("/big", "a")).await.unwrap());
        }
        assert_eq!(pools.stats().endpoints[0].http1_pooled, 5, "burst {burst}: all five kept for reuse");
        for resp in held {
            body(resp).await;
        }
    }
    assert_eq!(server.accepted(), 5, "one connection per concurrent request, not one per request");
}

#[tokio::test]
async fn idle_connections_beyond_max_idle_per_endpoint_are_closed() {
    let server = Server::start(false).await;
    let pools = Pools::new(PoolConfig {
        idle_timeout: Duration::from_secs(60),
        max_idle_per_endpoint: 2,
        reap_interval: Duration::from_millis(20),
    });
    let ep = Arc::new(endpoint(server.addr));
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(pools.send(&ep, UpstreamProtocol::Http1, TIMEOUT, get("/big", "a")).await.unwrap());
    }
    for resp in held {
        body(resp).await;
    }
    // The burst is over: the reaper keeps two idle connections and closes the others
    // (their buffers with them), long before the idle timeout.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let e = pools.stats().endpoints[0];
        if e.http1_open == 2 {
            assert_eq!(e.http1_pooled, 2, "{e:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "idle connections beyond the bound never closed: {e:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..4 {
        let resp = pools.send(&ep, UpstreamProtocol::Http1, TIMEOUT, get("/", "a")).await.unwrap();
        body(resp).await;
    }
    assert_eq!(server.accepted(), 5, "the kept connections are reused");
    assert_eq!(pools.stats().endpoints[0].http1_open, 2);
}

/// One request through [`Pools::send_to`] (the forwarding path's entry) with the
/// cluster's per-connection `settings`: the response body.
async fn send_with_settings(pools: &Pools, ep: &crate::cluster::Endpoint, settings: ConnSettings) -> String {
    let connector = Connector::Plain;
    let up =
        Upstream { connect_timeout: TIMEOUT, connector: &connector, conn: settings, breaker: None, at: Instant::now() };
    let (resp, _) = pools.send_to(ep, UpstreamProtocol::Http1, &up, get("/", "a")).await.unwrap();
    body(resp).await
}

#[tokio::test]
async fn a_pooled_connection_past_max_connection_duration_is_not_handed_out_again() {
    let server = Server::start(false).await;
    // The reaper does not look within the test: only the checkout can turn it away.
    let pools = Pools::new(PoolConfig { reap_interval: Duration::from_secs(60), ..PoolConfig::default() });
    let ep = endpoint(server.addr);
    let settings =
        ConnSettings { max_connection_duration: Some(Duration::from_millis(300)), ..ConnSettings::default() };
    send_with_settings(&pools, &ep, settings).await;
    send_with_settings(&pools, &ep, settings).await;
    assert_eq!(server.accepted(), 1, "reused while younger than max_connection_duration");
    tokio::time::sleep(Duration::from_millis(400)).await;
    send_with_settings(&pools, &ep, settings).await;
    assert_eq!(server.accepted(), 2, "the old idle connection was closed at the checkout, a new one opened");
    assert_eq!(pools.stats().endpoints[0].http1_pooled, 1, "only the new connection is pooled");
}

#[tokio::test]
async fn the_reaper_closes_an_idle_connection_past_max_connection_duration() {
    let server = Server::start(false).await;
    // No checkout after the first request: only the reaper can close it.
    let pools = Pools::new(PoolConfig { reap_interval: Duration::from_millis(20), ..PoolConfig::default() });
    let ep = endpoint(server.addr);
    let settings =
        ConnSettings { max_connection_duration: Some(Duration::from_millis(200)), ..ConnSettings::default() };
    send_with_settings(&pools, &ep, settings).await;
    let open = |p: &Pools| p.stats().endpoints.iter().map(|e| e.http1_open).sum::<usize>();
    assert_eq!(open(&pools), 1, "pooled after its response");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while open(&pools) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open(&pools), 0, "closed once older than max_connection_duration, with no request to meet it");
}

#[tokio::test]
async fn tcp_keepalive_is_set_on_new_connections_when_the_cluster_asks() {
    use crate::cluster::pool::{connect_tcp, Keepalive};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let plain = connect_tcp(addr, TIMEOUT, None).await.unwrap();
    assert!(!socket2::SockRef::from(&plain).keepalive().unwrap());
    let ka = Keepalive { probes: Some(4), time: Some(Duration::from_secs(30)), interval: Some(Duration::from_secs(5)) };
    let s = connect_tcp(addr, TIMEOUT, Some(ka)).await.unwrap();
    let sock = socket2::SockRef::from(&s);
    assert!(sock.keepalive().unwrap());
    assert_eq!(sock.keepalive_time().unwrap(), Duration::from_secs(30));
    assert_eq!(sock.keepalive_interval().unwrap(), Duration::from_secs(5));
    assert_eq!(sock.keepalive_retries().unwrap(), 4);
}
