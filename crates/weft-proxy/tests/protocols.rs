//! Protocols through the proxy: HTTP/1.1 (keep-alive, chunked, WebSocket upgrade),
//! h2c, gRPC unary and streaming with trailers across an outbound -> inbound proxy pair,
//! opaque TCP (client-first and server-first), CONNECT, and protocol detection.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use envoy_types::pb::envoy::config::listener::v3::{FilterChainMatch, Listener};
use envoy_types::util::pack_any;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_testkit::echo::{grpc_call, BannerServer, EchoServer, GrpcEchoServer, GrpcStream, TcpEchoServer};
use weft_testkit::http::{get_h1, get_h2c};
use weft_xds::build::{self, Routes};
use weft_xds::type_url;

fn any_of(listeners: Vec<Listener>) -> Vec<envoy_types::pb::google::protobuf::Any> {
    listeners.into_iter().map(pack_any).collect()
}

async fn read_until(s: &mut TcpStream, needle: &[u8], limit: Duration) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let _ = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(needle.len()).any(|w| w == needle) {
                        return;
                    }
                }
            }
        }
    })
    .await;
    buf
}

#[tokio::test]
async fn http1_keepalive_chunked_and_h2c_reach_the_backend() {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start("a").await;
    clusters(&mesh, &[("a", vec![echo.addr])], false);
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), to("a"))])]))],
    );
    let proxy = mesh.proxy("protocols", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();

    // Several requests on one keep-alive connection, one with a chunked body.
    let mut s = TcpStream::connect(out).await.unwrap();
    for i in 0..3 {
        let req = format!("GET /k{i} HTTP/1.1\r\nHost: svc\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let resp = read_until(&mut s, b"}", Duration::from_secs(5)).await;
        let text = String::from_utf8_lossy(&resp);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains(&format!("/k{i}")), "{text}");
    }
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let resp = read_until(&mut s, b"hello world", Duration::from_secs(5)).await;
    assert!(String::from_utf8_lossy(&resp).contains("hello world"), "{}", String::from_utf8_lossy(&resp));

    let r = get_h2c(out, "svc", "/h2").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-echo-server"), Some("a"));
    assert_eq!(r.json().unwrap()["path"], "/h2");
}

/// A client that resets its HTTP/2 stream before the response gives up the request:
/// the proxy drops it, and with it the upstream request (here an HTTP/1.1 upstream that
/// never answers: its connection, mid-request, is closed).
#[tokio::test]
async fn an_http2_client_reset_cancels_the_upstream_request() {
    let mesh = Mesh::start().await;
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    clusters(&mesh, &[("silent", vec![upstream.local_addr().unwrap()])], false);
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), to("silent"))])]))],
    );
    let proxy = mesh.proxy("reset", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();

    let (mut client, conn) = h2::client::handshake(TcpStream::connect(out).await.unwrap()).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get("http://svc/hang").body(()).unwrap();
    let (response, mut stream) = client.send_request(req, true).unwrap();
    let (mut up, _) = tokio::time::timeout(Duration::from_secs(5), upstream.accept()).await.unwrap().unwrap();
    let head = read_until(&mut up, b"\r\n\r\n", Duration::from_secs(5)).await;
    assert!(head.starts_with(b"GET /hang"), "{}", String::from_utf8_lossy(&head));

    stream.send_reset(h2::Reason::CANCEL);
    drop(response);
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), up.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "the upstream request outlived the client's reset: {read:?}");
}

#[tokio::test]
async fn websocket_upgrade_becomes_a_byte_pipe() {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start("ws").await;
    clusters(&mesh, &[("ws", vec![echo.addr])], false);
    mesh.set(type_url::LISTENER, vec![http_out(&["websocket"])]);
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), to("ws"))])]))],
    );
    let proxy = mesh.proxy("ws", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    let mut s = TcpStream::connect(out).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .unwrap();
    let head = read_until(&mut s, b"\r\n\r\n", Duration::from_secs(5)).await;
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s.write_all(b"ping-over-the-pipe").await.unwrap();
    let echoed = read_until(&mut s, b"ping-over-the-pipe", Duration::from_secs(5)).await;
    assert!(echoed.ends_with(b"ping-over-the-pipe"), "{:?}", String::from_utf8_lossy(&echoed));
}

/// Client proxy `out` -> server proxy inbound listener `in` -> app. Returns the client's
/// `out` address.
async fn proxy_pair(
    mesh: &Mesh,
    app: SocketAddr,
    http2: bool,
) -> (SocketAddr, weft_proxy::proxy::ProxyHandle, weft_proxy::proxy::ProxyHandle) {
    let mut inbound = build::http_listener(
        "in",
        "127.0.0.1:0".parse().unwrap(),
        build::http_connection_manager(
            "in",
            Routes::Inline(Box::new(rc(
                "inbound",
                vec![vhost("in", &["*"], vec![route("app", prefix("/"), to("app"))])],
            ))),
            None,
            &[],
        ),
    );
    inbound.traffic_direction = 1;
    let mut outbound = build::http_listener(
        "out",
        "127.0.0.1:0".parse().unwrap(),
        build::http_connection_manager("out", Routes::Rds("routes".into()), None, &[]),
    );
    outbound.traffic_direction = 2;
    mesh.set(type_url::LISTENER, any_of(vec![inbound, outbound]));
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), to("server"))])]))],
    );
    mesh.set(
        type_url::CLUSTER,
        vec![pack_any(build::eds_cluster("app", http2)), pack_any(build::eds_cluster("server", http2))],
    );
    // The server proxy's inbound address is known only once it runs: start with no
    // endpoints for `server`, then fill them in.
    mesh.set(
        type_url::ENDPOINT,
        vec![pack_any(build::cla("app", &[(app, 1, HealthStatus::Healthy)])), pack_any(build::cla("server", &[]))],
    );
    let server = mesh.proxy("server", false).await;
    let client = mesh.proxy("client", false).await;
    let server_in = server.listener_addr("in", WAIT).await.unwrap();
    mesh.set(
        type_url::ENDPOINT,
        vec![
            pack_any(build::cla("app", &[(app, 1, HealthStatus::Healthy)])),
            pack_any(build::cla("server", &[(server_in, 1, HealthStatus::Healthy)])),
        ],
    );
    mesh.synced_all(&client).await;
    mesh.synced_all(&server).await;
    (client.listener_addr("out", WAIT).await.unwrap(), client, server)
}

#[tokio::test]
async fn grpc_unary_and_streaming_keep_trailers_across_two_proxies() {
    let mesh = Mesh::start().await;
    let grpc = GrpcEchoServer::start("g").await;
    let (out, _client, _server) = proxy_pair(&mesh, grpc.addr, true).await;

    let reply = grpc_call(out, "echo.svc", "/echo.Echo/Unary", vec![Bytes::from_static(b"hi")]).await.unwrap();
    assert_eq!(reply.messages, vec![Bytes::from_static(b"hi")]);
    assert_eq!(reply.trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
    assert_eq!(reply.trailers.get("x-echo-trailer").map(|v| v.as_bytes()), Some(&b"g"[..]), "custom trailer lost");

    let mut stream = GrpcStream::open(out, "echo.svc", "/echo.Echo/Stream").await.unwrap();
    for i in 0..5 {
        let msg = Bytes::from(format!("m{i}"));
        stream.send(msg.clone()).await.unwrap();
        assert_eq!(stream.recv().await.unwrap(), Some(msg), "bidi message {i} not echoed while the stream is open");
    }
    stream.close_send();
    assert_eq!(stream.recv().await.unwrap(), None);
    assert_eq!(stream.trailers().and_then(|t| t.get("grpc-status")).map(|v| v.as_bytes()), Some(&b"0"[..]));
}

#[tokio::test]
async fn http1_through_outbound_and_inbound_proxies_carries_peer_identity() {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start("app").await;
    let (out, client, server) = proxy_pair(&mesh, echo.addr, false).await;
    let r = get_h1(out, "svc", "/hello").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-echo-server"), Some("app"));
    let h2 = get_h2c(out, "svc", "/over-h2").await.unwrap();
    assert_eq!((h2.status.as_u16(), h2.header("x-echo-server")), (200, Some("app")), "h2c through both proxies");
    let headers = &r.json().unwrap()["headers"];
    for name in ["x-envoy-peer-metadata", "x-envoy-peer-metadata-id"] {
        assert!(headers.get(name).is_none(), "{name} must not reach the app: {headers}");
        assert!(r.header(name).is_none(), "{name} must not reach the client");
    }
    // Each side reported the request with the other side's workload.
    let client_metrics = client.context().metrics.encode();
    let server_metrics = server.context().metrics.encode();
    assert!(
        client_metrics.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("reporter=\"source\"")
            && l.contains("destination_workload=\"server\"")),
        "{client_metrics}"
    );
    assert!(
        server_metrics.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("reporter=\"destination\"")
            && l.contains("source_workload=\"client\"")),
        "{server_metrics}"
    );
}

#[tokio::test]
async fn opaque_tcp_and_server_first_protocols_work_without_sniffing() {
    let mesh = Mesh::start().await;
    let echo = TcpEchoServer::start().await;
    let banner = BannerServer::start("220 mysql-like greeting\r\n").await;
    mesh.set(
        type_url::CLUSTER,
        vec![pack_any(build::eds_cluster("tcp-echo", false)), pack_any(build::eds_cluster("banner", false))],
    );
    mesh.set(
        type_url::ENDPOINT,
        vec![
            pack_any(build::cla("tcp-echo", &[(echo.addr, 1, HealthStatus::Healthy)])),
            pack_any(build::cla("banner", &[(banner.addr, 1, HealthStatus::Healthy)])),
        ],
    );
    mesh.set(
        type_url::LISTENER,
        any_of(vec![
            build::tcp_listener("tcp", "127.0.0.1:0".parse().unwrap(), "tcp-echo"),
            build::tcp_listener("mysql", "127.0.0.1:0".parse().unwrap(), "banner"),
        ]),
    );
    let proxy = mesh.proxy("tcp", false).await;
    mesh.synced_all(&proxy).await;
    let tcp = proxy.listener_addr("tcp", WAIT).await.unwrap();
    let mysql = proxy.listener_addr("mysql", WAIT).await.unwrap();

    let mut s = TcpStream::connect(tcp).await.unwrap();
    s.write_all(b"\x00\x01binary\xffdata").await.unwrap();
    let got = read_until(&mut s, b"data", Duration::from_secs(5)).await;
    assert_eq!(got, b"\x00\x01binary\xffdata");

    // Server speaks first: the greeting must arrive without the client sending a byte.
    let mut s = TcpStream::connect(mysql).await.unwrap();
    let got = read_until(&mut s, b"\r\n", Duration::from_secs(3)).await;
    assert_eq!(got, b"220 mysql-like greeting\r\n");
    drop(s);
    let m = proxy.context().metrics.encode();
    assert!(m.contains("istio_tcp_connections_opened_total{"), "{m}");
}

#[tokio::test]
async fn sniffing_sends_http_to_the_http_chain_and_other_bytes_to_tcp() {
    let mesh = Mesh::start().await;
    let http_echo = EchoServer::start("http").await;
    let tcp_echo = TcpEchoServer::start().await;
    clusters(&mesh, &[("http", vec![http_echo.addr]), ("tcp", vec![tcp_echo.addr])], false);
    let mut l = build::http_listener(
        "mixed",
        "127.0.0.1:0".parse().unwrap(),
        build::http_connection_manager(
            "mixed",
            Routes::Inline(Box::new(rc(
                "inline",
                vec![vhost("all", &["*"], vec![route("r", prefix("/"), to("http"))])],
            ))),
            None,
            &[],
        ),
    );
    l.filter_chains[0].filter_chain_match =
        Some(FilterChainMatch { application_protocols: vec!["http/1.1".into(), "h2c".into()], ..Default::default() });
    let tcp_chain = build::tcp_listener("x", "127.0.0.1:0".parse().unwrap(), "tcp").filter_chains.remove(0);
    l.filter_chains.push(tcp_chain);
    mesh.set(type_url::LISTENER, vec![pack_any(l)]);
    let proxy = mesh.proxy("sniff", false).await;
    mesh.synced_all(&proxy).await;
    let addr = proxy.listener_addr("mixed", WAIT).await.unwrap();

    let r = get_h1(addr, "svc", "/x").await.unwrap();
    assert_eq!(r.header("x-echo-server"), Some("http"));
    let r = get_h2c(addr, "svc", "/y").await.unwrap();
    assert_eq!(r.header("x-echo-server"), Some("http"));
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"\x00\x01not-http-at-all\n").await.unwrap();
    let got = read_until(&mut s, b"\n", Duration::from_secs(5)).await;
    assert_eq!(got, b"\x00\x01not-http-at-all\n");
}

/// `CONNECT` over HTTP/2 (RFC 9113 §8.5): the stream, answered 200, carries the tunnel.
#[tokio::test]
async fn http2_connect_tunnels_over_its_stream() {
    let mesh = Mesh::start().await;
    let tcp_echo = TcpEchoServer::start().await;
    clusters(&mesh, &[("db", vec![tcp_echo.addr])], false);
    mesh.set(type_url::LISTENER, vec![http_out(&["CONNECT"])]);
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("db", &["db.local:5432"], vec![route("db", prefix("/"), to("db"))])]))],
    );
    let proxy = mesh.proxy("connect-h2", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    let (mut client, conn) = h2::client::handshake(TcpStream::connect(out).await.unwrap()).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder().method("CONNECT").uri("db.local:5432").body(()).unwrap();
    let (response, mut send) = client.send_request(req, false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), response).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    send.send_data(Bytes::from_static(b"tunnelled bytes"), false).unwrap();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while got.len() < b"tunnelled bytes".len() {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.data()).await.unwrap().unwrap().unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, b"tunnelled bytes");
}

#[tokio::test]
async fn connect_tunnels_to_the_routed_cluster() {
    let mesh = Mesh::start().await;
    let tcp_echo = TcpEchoServer::start().await;
    clusters(&mesh, &[("db", vec![tcp_echo.addr])], false);
    mesh.set(type_url::LISTENER, vec![http_out(&["CONNECT"])]);
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("db", &["db.local:5432"], vec![route("db", prefix("/"), to("db"))])]))],
    );
    let proxy = mesh.proxy("connect", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    let mut s = TcpStream::connect(out).await.unwrap();
    s.write_all(b"CONNECT db.local:5432 HTTP/1.1\r\nHost: db.local:5432\r\n\r\n").await.unwrap();
    let head = read_until(&mut s, b"\r\n\r\n", Duration::from_secs(5)).await;
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    s.write_all(b"tunnelled bytes").await.unwrap();
    assert_eq!(read_until(&mut s, b"bytes", Duration::from_secs(5)).await, b"tunnelled bytes");
}

#[tokio::test]
async fn grpc_requests_get_trailers_only_answers_for_faults_and_local_errors() {
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{fault_abort, FaultAbort, HttpFault};
    use envoy_types::pb::envoy::r#type::v3::{fractional_percent::DenominatorType, FractionalPercent};
    let mesh = Mesh::start().await;
    let grpc = GrpcEchoServer::start("g").await;
    clusters(&mesh, &[("g", vec![grpc.addr])], true);
    let mut abort = route("abort", prefix("/echo.Echo/Unary"), to("g"));
    abort.typed_per_filter_config.insert(
        "envoy.filters.http.fault".into(),
        pack_any(HttpFault {
            abort: Some(FaultAbort {
                percentage: Some(FractionalPercent { numerator: 100, denominator: DenominatorType::Hundred as i32 }),
                error_type: Some(fault_abort::ErrorType::GrpcStatus(8)),
                ..Default::default()
            }),
            ..Default::default()
        }),
    );
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc(
            "routes",
            vec![vhost(
                "all",
                &["*"],
                vec![
                    abort,
                    route("missing", prefix("/echo.Echo/Fail"), to("nowhere")),
                    route("ok", prefix("/"), to("g")),
                ],
            )],
        ))],
    );
    let proxy = mesh.proxy("grpc-local", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    let r = grpc_call(out, "echo.svc", "/echo.Echo/Unary", vec![Bytes::from_static(b"x")]).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.grpc_status(), Some(8), "fault abort with grpc_status 8");
    assert!(r.messages.is_empty());
    let r = grpc_call(out, "echo.svc", "/echo.Echo/Fail", vec![Bytes::from_static(b"x")]).await.unwrap();
    assert_eq!(r.grpc_status(), Some(14), "unknown cluster must be UNAVAILABLE for gRPC");
    let r = grpc_call(out, "echo.svc", "/echo.Echo/Stream", vec![Bytes::from_static(b"y")]).await.unwrap();
    assert_eq!(r.grpc_status(), Some(0));
    assert_eq!(grpc.requests(), 1, "the aborted and failed calls must not reach the server");
}

#[tokio::test]
async fn idle_downstream_connections_are_closed_after_the_idle_timeout() {
    use envoy_types::pb::envoy::config::core::v3::HttpProtocolOptions;
    use envoy_types::pb::google::protobuf::Duration as PbDuration;
    let mesh = Mesh::start().await;
    let echo = EchoServer::start("a").await;
    clusters(&mesh, &[("a", vec![echo.addr])], false);
    let mut hcm = build::http_connection_manager("out", Routes::Rds("routes".into()), None, &[]);
    hcm.common_http_protocol_options = Some(HttpProtocolOptions {
        idle_timeout: Some(PbDuration { seconds: 0, nanos: 300_000_000 }),
        ..Default::default()
    });
    mesh.set(type_url::LISTENER, vec![pack_any(build::http_listener("out", "127.0.0.1:0".parse().unwrap(), hcm))]);
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), to("a"))])]))],
    );
    let proxy = mesh.proxy("idle", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    let mut s = TcpStream::connect(out).await.unwrap();
    // A request slower than the idle timeout is not cut: a stream is open.
    s.write_all(b"GET /delay/600 HTTP/1.1\r\nHost: svc\r\n\r\n").await.unwrap();
    let resp = read_until(&mut s, b"}", Duration::from_secs(5)).await;
    assert!(String::from_utf8_lossy(&resp).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&resp));
    // Then, idle: the proxy closes the connection.
    let mut buf = [0u8; 16];
    let n =
        tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await.expect("connection not closed when idle");
    assert_eq!(n.unwrap_or(0), 0, "expected EOF");
}

#[tokio::test]
async fn access_log_writes_one_json_line_per_request_and_connection() {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start("a").await;
    let tcp = TcpEchoServer::start().await;
    clusters(&mesh, &[("a", vec![echo.addr]), ("t", vec![tcp.addr])], false);
    mesh.set(
        type_url::LISTENER,
        vec![http_out(&[]), pack_any(build::tcp_listener("tcp", "127.0.0.1:0".parse().unwrap(), "t"))],
    );
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), to("a"))])]))],
    );
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let proxy = mesh.proxy_with_log("logging", false, log.to_str().unwrap()).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    assert_eq!(get_h1(out, "svc", "/logged?x=1").await.unwrap().status, 200);
    let mut s = TcpStream::connect(proxy.listener_addr("tcp", WAIT).await.unwrap()).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    assert_eq!(read_until(&mut s, b"ping", Duration::from_secs(5)).await, b"ping");
    drop(s);
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        lines = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line")).collect();
        if lines.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let http = lines.iter().find(|l| l["protocol"] == "HTTP/1.1").unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(http["path"], "/logged?x=1");
    assert_eq!(http["response_code"], 200);
    assert_eq!(http["upstream_cluster"], "a");
    assert_eq!(http["upstream_host"], echo.addr.to_string());
    let tcp_line = lines.iter().find(|l| l["protocol"] == "tcp").unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(tcp_line["upstream_cluster"], "t");
    assert_eq!(tcp_line["bytes_received"], 4);
}
