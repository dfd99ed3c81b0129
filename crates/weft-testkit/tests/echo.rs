//! The echo servers answer over every protocol the mesh carries.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_testkit::echo::{
    grpc_call, grpc_call_with_headers, BannerServer, EchoServer, GrpcEchoServer, GrpcStream, TcpEchoServer,
};
use weft_testkit::http::{get_h1, get_h2c, get_via_proxy, request, send_h1};

#[tokio::test]
async fn h1_echo_describes_the_request_as_json() {
    let echo = EchoServer::start("alpha").await;
    let req = http::Request::get("/hello?x=1")
        .header("host", "svc.local")
        .header("x-test", "a")
        .header("x-test", "b")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = send_h1(echo.addr, req).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-echo-server"), Some("alpha"));
    let json = reply.json().unwrap();
    assert_eq!(json["server"], "alpha");
    assert_eq!(json["method"], "GET");
    assert_eq!(json["path"], "/hello?x=1");
    assert_eq!(json["uri"], "/hello?x=1");
    assert_eq!(json["headers"]["host"], "svc.local");
    assert_eq!(json["headers"]["x-test"], "a,b");
    assert_eq!(json["body_len"], 0);
    assert_eq!(echo.requests(), 1);
    assert_eq!(echo.connections(), 1);
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served_on_the_same_port() {
    let echo = EchoServer::start("beta").await;
    let reply = get_h2c(echo.addr, "svc.local", "/over/h2").await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    let json = reply.json().unwrap();
    assert_eq!(json["server"], "beta");
    assert_eq!(json["path"], "/over/h2");
}

#[tokio::test]
async fn absolute_form_request_through_a_proxy_keeps_path_and_host() {
    let echo = EchoServer::start("proxy-target").await;
    // The echo server stands in for a proxy: it sees the absolute-form request target.
    let reply = get_via_proxy(echo.addr, "http://svc.example:8080/p?q=1").await.unwrap();
    let json = reply.json().unwrap();
    assert_eq!(json["path"], "/p?q=1");
    assert_eq!(json["uri"], "http://svc.example:8080/p?q=1");
    assert_eq!(json["headers"]["host"], "svc.example:8080");
}

#[tokio::test]
async fn status_route_answers_the_requested_code() {
    let echo = EchoServer::start("s").await;
    let reply = get_h1(echo.addr, "x", "/status/503").await.unwrap();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let reply = get_h1(echo.addr, "x", "/status/204").await.unwrap();
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn delay_route_waits_before_answering() {
    let echo = EchoServer::start("d").await;
    let start = Instant::now();
    let reply = get_h1(echo.addr, "x", "/delay/300").await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert!(start.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn post_echo_returns_the_body_and_other_paths_count_it() {
    let echo = EchoServer::start("p").await;
    let body = Bytes::from_static(b"hello body");
    let reply = send_h1(echo.addr, request(Method::POST, "x", "/echo", body.clone()).unwrap()).await.unwrap();
    assert_eq!(reply.body, body);
    let reply = send_h1(echo.addr, request(Method::PUT, "x", "/other", body).unwrap()).await.unwrap();
    assert_eq!(reply.json().unwrap()["body_len"], 10);
}

#[tokio::test]
async fn keep_alive_requests_share_one_connection_in_the_counters() {
    let echo = EchoServer::start("k").await;
    let stream = TcpStream::connect(echo.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let resp = sender.send_request(request(Method::GET, "x", "/", Bytes::new()).unwrap()).await.unwrap();
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(echo.requests(), 3);
    assert_eq!(echo.connections(), 1);
}

#[tokio::test]
async fn upgrade_answers_101_then_echoes_raw_bytes() {
    let echo = EchoServer::start("ws").await;
    let mut s = TcpStream::connect(echo.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_until(&mut s, b"\r\n\r\n").await;
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    // RFC 6455's example key, so a real WebSocket client would accept the handshake.
    assert!(head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
    s.write_all(b"\x81\x04ping raw bytes").await.unwrap();
    let mut buf = [0u8; 16];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"\x81\x04ping raw bytes");
}

#[tokio::test]
async fn grpc_unary_echoes_one_message_with_ok_trailers() {
    let grpc = GrpcEchoServer::start("g").await;
    let reply = grpc_call(
        grpc.addr,
        "echo.svc",
        "/echo.Echo/Unary",
        vec![Bytes::from_static(b"first"), Bytes::from_static(b"second")],
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["x-echo-server"], "g");
    assert_eq!(reply.messages, vec![Bytes::from_static(b"first")]);
    assert_eq!(reply.trailers["grpc-status"], "0");
    assert_eq!(reply.trailers["x-echo-trailer"], "g");
    assert_eq!(reply.grpc_status(), Some(0));
}

#[tokio::test]
async fn grpc_stream_echoes_each_message_before_the_request_ends() {
    let grpc = GrpcEchoServer::start("st").await;
    let mut call = GrpcStream::open(grpc.addr, "echo.svc", "/echo.Echo/Stream").await.unwrap();
    for msg in ["one", "two", "three"] {
        call.send(Bytes::from(msg)).await.unwrap();
        // The request stream is still open: this reply proves per-message echo.
        assert_eq!(call.recv().await.unwrap(), Some(Bytes::from(msg)));
    }
    call.close_send();
    assert_eq!(call.recv().await.unwrap(), None);
    let trailers = call.trailers().unwrap();
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-echo-trailer"], "st");
}

#[tokio::test]
async fn grpc_stream_collected_by_grpc_call_returns_every_message() {
    let grpc = GrpcEchoServer::start("st").await;
    let msgs: Vec<Bytes> = (0..5).map(|i| Bytes::from(format!("m{i}"))).collect();
    let reply = grpc_call(grpc.addr, "echo.svc", "/echo.Echo/Stream", msgs.clone()).await.unwrap();
    assert_eq!(reply.messages, msgs);
    assert_eq!(reply.grpc_status(), Some(0));
}

#[tokio::test]
async fn grpc_fail_is_trailers_only_with_the_requested_status() {
    let grpc = GrpcEchoServer::start("f").await;
    let reply = grpc_call_with_headers(
        grpc.addr,
        "echo.svc",
        "/echo.Echo/Fail",
        &[("x-grpc-status", "14")],
        vec![Bytes::from_static(b"x")],
    )
    .await
    .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["grpc-status"], "14");
    assert!(reply.trailers.is_empty(), "trailers-only: {:?}", reply.trailers);
    assert!(reply.messages.is_empty());
    assert_eq!(reply.grpc_status(), Some(14));
}

#[tokio::test]
async fn grpc_unknown_method_is_unimplemented() {
    let grpc = GrpcEchoServer::start("u").await;
    let reply = grpc_call(grpc.addr, "echo.svc", "/echo.Echo/Nope", vec![]).await.unwrap();
    assert_eq!(reply.grpc_status(), Some(12));
}

#[tokio::test]
async fn tcp_echo_returns_the_bytes_sent() {
    let echo = TcpEchoServer::start().await;
    let mut s = TcpStream::connect(echo.addr).await.unwrap();
    s.write_all(b"opaque bytes").await.unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"opaque bytes");
    assert_eq!(echo.connections(), 1);
}

#[tokio::test]
async fn banner_server_speaks_first_then_echoes() {
    let banner = BannerServer::start(&b"220 weft banner\r\n"[..]).await;
    let mut s = TcpStream::connect(banner.addr).await.unwrap();
    // Nothing sent yet: the greeting arrives on its own.
    let greeting = read_until(&mut s, b"\r\n").await;
    assert_eq!(greeting, banner.greeting);
    s.write_all(b"QUIT").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"QUIT");
    assert_eq!(banner.connections(), 1);
}

async fn read_until(s: &mut TcpStream, end: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while !out.ends_with(end) {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("read timed out")
            .expect("read");
        assert!(n > 0, "EOF after {:?}", String::from_utf8_lossy(&out));
        out.push(byte[0]);
    }
    out
}
