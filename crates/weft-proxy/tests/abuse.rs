//! A data plane that holds under abuse: malformed requests are the client's failure
//! (400 with `DPE`, never an upstream ejection), and the limits Envoy sets by default
//! (header size and count, request-header timeout, one Host) are enforced.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use common::*;
use envoy_types::pb::envoy::config::cluster::v3::{cluster, OutlierDetection};
use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};
use envoy_types::util::pack_any;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::get_h1;
use weft_xds::build::{self, Routes};
use weft_xds::type_url;

/// A proxy whose listener `out` (HCM edited by `hcm`) routes everything to a round-robin
/// cluster `pool` of `backends` with outlier detection after 2 consecutive 5xx.
async fn proxy_to(
    mesh: &Mesh,
    id: &str,
    backends: &[SocketAddr],
    hcm: impl FnOnce(&mut HttpConnectionManager),
) -> ProxyHandle {
    let mut c = build::eds_cluster("pool", false);
    c.metadata = None;
    c.lb_policy = cluster::LbPolicy::RoundRobin as i32;
    c.outlier_detection = Some(OutlierDetection {
        consecutive_5xx: Some(UInt32Value { value: 2 }),
        base_ejection_time: Some(PbDuration { seconds: 300, nanos: 0 }),
        max_ejection_percent: Some(UInt32Value { value: 100 }),
        ..Default::default()
    });
    mesh.set(type_url::CLUSTER, vec![pack_any(c)]);
    mesh.set(
        type_url::ENDPOINT,
        vec![pack_any(build::cla(
            "pool",
            &backends.iter().map(|a| (*a, 1, HealthStatus::Healthy)).collect::<Vec<_>>(),
        ))],
    );
    let mut h = build::http_connection_manager("out", Routes::Rds("routes".into()), None, &[]);
    hcm(&mut h);
    mesh.set(type_url::LISTENER, vec![pack_any(build::http_listener("out", "127.0.0.1:0".parse().unwrap(), h))]);
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), to("pool"))])]))],
    );
    let proxy = mesh.proxy(id, false).await;
    mesh.synced_all(&proxy).await;
    proxy
}

/// Writes `raw` on a fresh connection and reads one response: its status and the text
/// received (head and a `content-length` body), or `None` when the proxy closed the
/// connection without answering.
async fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    read_response(&mut s, &mut Vec::new()).await
}

/// Reads the next response from `s`; `buf` keeps bytes of the responses after it.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(u16, String)> {
    let mut chunk = [0u8; 4096];
    let read = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    return Some(end + 4 + len);
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let Ok(complete) = read else { panic!("no response within {WAIT:?}; got {:?}", String::from_utf8_lossy(buf)) };
    let taken: Vec<u8> = buf.drain(..complete.unwrap_or(buf.len())).collect();
    let text = String::from_utf8_lossy(&taken).to_string();
    let status = text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    Some((status, text))
}

fn has_flag(proxy: &ProxyHandle, flag: &str) -> bool {
    let m = proxy.context().metrics.encode();
    m.lines().any(|l| l.starts_with("istio_requests_total{") && l.contains(&format!("response_flags=\"{flag}\"")))
}

#[tokio::test]
async fn malformed_chunked_bodies_get_400_dpe_and_eject_no_upstream() {
    let mesh = Mesh::start().await;
    let backends = [EchoServer::start("e0").await, EchoServer::start("e1").await, EchoServer::start("e2").await];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let proxy = proxy_to(&mesh, "dpe", &addrs, |_| {}).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    // Two failures per endpoint would eject all three if they counted against them.
    for i in 0..8 {
        let r = raw_exchange(
            out,
            b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nnot a chunk\r\n\r\n",
        )
        .await;
        let (status, text) = r.unwrap_or_else(|| panic!("malformed request {i} got no response"));
        assert_eq!(status, 400, "malformed request {i}: {text}");
    }
    assert!(has_flag(&proxy, "DPE"), "{}", proxy.context().metrics.encode());
    assert!(!has_flag(&proxy, "UR"), "{}", proxy.context().metrics.encode());
    let mut seen = BTreeSet::new();
    for _ in 0..9 {
        let r = get_h1(out, "svc", "/").await.unwrap();
        assert_eq!(r.status, 200, "a good request after the malformed ones: {}", String::from_utf8_lossy(&r.body));
        seen.insert(r.header("x-echo-server").unwrap().to_string());
    }
    assert_eq!(seen.len(), 3, "every endpoint still serves: {seen:?}");
}

#[tokio::test]
async fn oversized_or_too_many_request_headers_get_431() {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start("limits").await;
    let proxy = proxy_to(&mesh, "limits", &[echo.addr], |_| {}).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    // Envoy's defaults: 60 KiB of headers, 100 headers.
    let big = format!("GET / HTTP/1.1\r\nHost: svc\r\nx-big: {}\r\n\r\n", "a".repeat(100 * 1024));
    let (status, text) = raw_exchange(out, big.as_bytes()).await.expect("a 100 KB header got no response");
    assert_eq!(status, 431, "{text}");
    let many: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
    let req = format!("GET / HTTP/1.1\r\nHost: svc\r\n{many}\r\n");
    let (status, text) = raw_exchange(out, req.as_bytes()).await.expect("102 headers got no response");
    assert_eq!(status, 431, "{text}");
    assert_eq!(echo.requests(), 0);
    // Under the limits, a large header still passes.
    let fine = format!("GET / HTTP/1.1\r\nHost: svc\r\nx-big: {}\r\n\r\n", "a".repeat(40 * 1024));
    assert_eq!(raw_exchange(out, fine.as_bytes()).await.map(|r| r.0), Some(200));
}

#[tokio::test]
async fn max_request_headers_kb_from_the_hcm_is_honoured() {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start("kb").await;
    let proxy =
        proxy_to(&mesh, "kb", &[echo.addr], |h| h.max_request_headers_kb = Some(UInt32Value { value: 16 })).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    let req = format!("GET / HTTP/1.1\r\nHost: svc\r\nx-big: {}\r\n\r\n", "a".repeat(20 * 1024));
    assert_eq!(raw_exchange(out, req.as_bytes()).await.map(|r| r.0), Some(431));
}

#[tokio::test]
async fn duplicate_host_and_bare_lf_heads_get_400_dpe() {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start("strict").await;
    let proxy = proxy_to(&mesh, "strict", &[echo.addr], |_| {}).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    let (status, text) = raw_exchange(out, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").await.unwrap();
    assert_eq!(status, 400, "{text}");
    let (status, text) = raw_exchange(out, b"GET / HTTP/1.1\nHost: x\n\n").await.unwrap();
    assert_eq!(status, 400, "{text}");
    // A well-formed request, then a bare-LF one pipelined behind a body on the same
    // connection: the first is served, the second refused.
    let mut s = TcpStream::connect(out).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\n\r\na\nb\nGET / HTTP/1.1\nHost: svc\n\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut s, &mut buf).await.map(|r| r.0), Some(200));
    assert_eq!(read_response(&mut s, &mut buf).await.map(|r| r.0), Some(400));
    assert_eq!(echo.requests(), 1, "only the well-formed request reached the upstream");
    assert!(has_flag(&proxy, "DPE"), "{}", proxy.context().metrics.encode());
}

/// Reads until the proxy closes the connection; false if it is still open after `WAIT`.
async fn closed_by_proxy(s: &mut TcpStream) -> bool {
    let mut sink = [0u8; 1024];
    tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn request_headers_timeout_closes_slow_and_silent_connections() {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start("slow").await;
    let proxy = proxy_to(&mesh, "slow", &[echo.addr], |h| {
        h.request_headers_timeout = Some(PbDuration { seconds: 1, nanos: 0 });
    })
    .await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    // Slowloris: half a request head, then nothing.
    let mut partial = TcpStream::connect(out).await.unwrap();
    partial.write_all(b"GET / HTTP/1.1\r\nHost: svc\r\nx-slow: ").await.unwrap();
    // HTTP/2 with prior knowledge: the preface, then never a HEADERS frame.
    let mut h2 = TcpStream::connect(out).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    // Nothing at all.
    let mut silent = TcpStream::connect(out).await.unwrap();
    assert!(closed_by_proxy(&mut partial).await, "a partial head kept its connection open");
    assert!(closed_by_proxy(&mut h2).await, "an HTTP/2 connection without requests stayed open");
    assert!(closed_by_proxy(&mut silent).await, "a silent connection stayed open");
    // A prompt client is unaffected.
    assert_eq!(get_h1(out, "svc", "/").await.unwrap().status, 200);
}

#[tokio::test]
async fn request_headers_timeout_bounds_every_head_of_a_keep_alive_connection() {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start("keepalive").await;
    let proxy = proxy_to(&mesh, "keepalive", &[echo.addr], |h| {
        h.request_headers_timeout = Some(PbDuration { seconds: 1, nanos: 0 });
    })
    .await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    // Several prompt requests on one connection, spread past the first head's deadline
    // (the fourth comes 1.2 s after the first: an alarm left at the first head's deadline
    // would have closed the connection before it), then half a head: the timer of each
    // head is the connection's one alarm, moved along; the half head still closes the
    // connection once its own deadline passes.
    let mut slow = TcpStream::connect(out).await.unwrap();
    let mut buf = Vec::new();
    for _ in 0..4 {
        slow.write_all(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n").await.unwrap();
        assert_eq!(read_response(&mut slow, &mut buf).await.map(|r| r.0), Some(200));
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    slow.write_all(b"GET / HTTP/1.1\r\nHost: svc\r\nx-slow: ").await.unwrap();
    assert_eq!(read_response(&mut slow, &mut buf).await, None, "a partial head was answered");
    // A keep-alive connection idle past the timeout between requests is closed (hyper's
    // header timer runs while it waits for the next head).
    let mut idle = TcpStream::connect(out).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut idle, &mut buf).await.map(|r| r.0), Some(200));
    assert!(closed_by_proxy(&mut idle).await, "an idle keep-alive connection stayed open");
    assert_eq!(echo.requests(), 5);
}
