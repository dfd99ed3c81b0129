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
    read_response(&mut s).await
}

async fn read_response(s: &mut TcpStream) -> Option<(u16, String)> {
    let mut buf = Vec::new();
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
                    return;
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no response within {WAIT:?}; got {:?}", String::from_utf8_lossy(&buf));
    let text = String::from_utf8_lossy(&buf).to_string();
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
