//! Real clients against the proxy: curl (HTTP/1.1, h2c prior knowledge, explicit proxy
//! with -x), h2load for concurrent HTTP/2 streams, and promtool on the metrics page.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;
use envoy_types::util::pack_any;
use weft_testkit::echo::EchoServer;
use weft_testkit::tools::require;
use weft_xds::type_url;

async fn setup() -> (Mesh, weft_proxy::proxy::ProxyHandle, std::net::SocketAddr, EchoServer) {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start("real").await;
    clusters(&mesh, &[("real", vec![echo.addr])], false);
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), to("real"))])]))],
    );
    let proxy = mesh.proxy("real-clients", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    (mesh, proxy, out, echo)
}

async fn run(cmd: &mut Command) -> std::process::Output {
    let mut cmd = tokio::process::Command::from(std::mem::replace(cmd, Command::new("true")));
    cmd.output().await.expect("spawn")
}

#[tokio::test]
async fn curl_http1_h2c_and_explicit_proxy() {
    let (_mesh, _proxy, out, _echo) = setup().await;
    let curl = require("curl");
    for args in [
        vec!["-sS".to_string(), "-i".into(), format!("http://{out}/curl/h1")],
        vec!["-sS".into(), "-i".into(), "--http2-prior-knowledge".into(), format!("http://{out}/curl/h2")],
        vec!["-sS".into(), "-i".into(), "-x".into(), format!("http://{out}"), "http://svc.example/curl/proxy".into()],
    ] {
        let o = run(Command::new(&curl).args(&args)).await;
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "curl {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
        assert!(text.lines().next().unwrap_or("").contains(" 200"), "curl {args:?}: {text}");
        assert!(text.to_ascii_lowercase().contains("x-echo-server: real"), "curl {args:?}: {text}");
        let path = args.last().unwrap().rsplit_once("/curl/").map(|(_, p)| p).unwrap();
        assert!(text.contains(&format!("/curl/{path}")), "upstream path missing: {text}");
    }
}

#[tokio::test]
async fn h2load_multiplexed_streams_all_succeed() {
    let (_mesh, _proxy, out, echo) = setup().await;
    let h2load = require("h2load");
    let o = run(Command::new(h2load).args(["-n", "400", "-c", "4", "-m", "10", &format!("http://{out}/load")])).await;
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "h2load failed: {text}{}", String::from_utf8_lossy(&o.stderr));
    let line = text.lines().find(|l| l.trim_start().starts_with("requests:")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("400 succeeded, 0 failed, 0 errored"), "{line}");
    let status = text.lines().find(|l| l.trim_start().starts_with("status codes:")).unwrap_or_else(|| panic!("{text}"));
    assert!(status.contains("400 2xx"), "{status}");
    assert!(echo.requests() >= 400);
}

#[tokio::test]
async fn metrics_page_passes_promtool_check_metrics() {
    let (_mesh, proxy, out, _echo) = setup().await;
    for i in 0..5 {
        let r = weft_testkit::http::get_h1(out, "svc", &format!("/m{i}")).await.unwrap();
        assert_eq!(r.status, 200);
    }
    let _ = weft_testkit::http::get_h1(out, "svc", "/status/503").await.unwrap();
    let page = weft_testkit::http::get_h1(proxy.metrics_addr(), "m", "/stats/prometheus").await.unwrap();
    assert_eq!(page.status, 200);
    let text = page.text();
    assert!(text.contains("istio_requests_total{"), "{text}");
    assert!(text.contains("response_code=\"503\""), "{text}");
    assert!(text.contains("istio_request_duration_milliseconds_bucket{"), "{text}");
    weft_testkit::tools::promtool_check_metrics(&text).await.expect("promtool check metrics");
}
