//! The Envoy harness runs the installed Envoy, and the installed curl and h2load reach it.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use weft_testkit::echo::EchoServer;
use weft_testkit::envoy::{ads_bootstrap, binary, Envoy};
use weft_testkit::http::get_h1;
use weft_testkit::tools;

const LISTENER: &str = "static_http";
const BODY: &str = "hello from envoy";

/// A listener on port 0 whose only route is a direct response.
fn static_bootstrap() -> String {
    format!(
        r#"admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 0 }}
static_resources:
  listeners:
  - name: {LISTENER}
    address:
      socket_address: {{ address: 127.0.0.1, port_value: 0 }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: static_http
          codec_type: AUTO
          route_config:
            name: direct
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response:
                  status: 200
                  body: {{ inline_string: "{BODY}" }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
    )
}

async fn static_envoy() -> (Envoy, std::net::SocketAddr) {
    let envoy = Envoy::start(&static_bootstrap()).await.expect("static Envoy starts");
    let addr = envoy.listener_addr(LISTENER, Duration::from_secs(20)).await.expect("static listener binds");
    (envoy, addr)
}

#[tokio::test]
async fn installed_envoy_is_the_pinned_version() {
    let out = Command::new(binary()).arg("--version").output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/1.40."), "envoy --version: {text}");
}

#[tokio::test]
async fn curl_gets_the_direct_response_of_a_static_envoy_listener() {
    let (envoy, addr) = static_envoy().await;
    assert_ne!(addr.port(), 0);
    let out = Command::new(tools::require("curl"))
        .args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
        .arg(format!("http://{addr}/anything"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "curl failed: {}\n{}", String::from_utf8_lossy(&out.stderr), envoy.log_tail());
    assert_eq!(stdout, format!("{BODY}\n200"));
    // The admin API saw that request.
    let stats = envoy.admin_get("/stats?filter=http.static_http.downstream_rq_2xx").await.unwrap();
    assert!(stats.contains("downstream_rq_2xx: 1"), "{stats}");
}

#[tokio::test]
async fn h2load_completes_all_requests_against_envoy() {
    let (envoy, addr) = static_envoy().await;
    let out = Command::new(tools::require("h2load"))
        .args(["-n", "100", "-c", "4"])
        .arg(format!("http://{addr}/"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "h2load failed: {stdout}\n{}", envoy.log_tail());
    let summary = parse_h2load(&stdout).unwrap_or_else(|| panic!("no summary in: {stdout}"));
    assert_eq!(summary, (100, 100, 0), "total, succeeded, failed in: {stdout}");
    assert!(stdout.contains("100 2xx"), "{stdout}");
}

#[tokio::test]
async fn envoy_accepts_the_ads_bootstrap_in_both_modes() {
    // Something listening (that never answers gRPC) so only the bootstrap is judged.
    let ads = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ads_addr = ads.local_addr().unwrap();
    for (node, delta) in [("sotw-node", false), ("delta-node", true)] {
        let envoy = Envoy::start(&ads_bootstrap(ads_addr, node, delta)).await.unwrap();
        let dump = envoy.admin_get("/config_dump?resource=bootstrap").await;
        let dump = match dump {
            Ok(d) => d,
            Err(_) => envoy.admin_get("/config_dump").await.unwrap(),
        };
        assert!(dump.contains(node), "node id missing from config_dump");
        let api = if delta { "DELTA_GRPC" } else { "\"GRPC\"" };
        assert!(dump.contains(api), "{api} missing from config_dump: {dump}");
    }
}

/// A listener on port 0 routing everything (WebSocket upgrades too) to `upstream`.
fn proxy_bootstrap(upstream: std::net::SocketAddr) -> String {
    let (ip, port) = (upstream.ip(), upstream.port());
    format!(
        r#"admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 0 }}
static_resources:
  listeners:
  - name: to_echo
    address:
      socket_address: {{ address: 127.0.0.1, port_value: 0 }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: to_echo
          upgrade_configs: [{{ upgrade_type: websocket }}]
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: echo }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: echo
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: echo
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: "{ip}", port_value: {port} }}
"#
    )
}

#[tokio::test]
async fn echo_server_answers_http_and_websocket_through_envoy() {
    let echo = EchoServer::start("behind-envoy").await;
    let envoy = Envoy::start(&proxy_bootstrap(echo.addr)).await.expect("proxy Envoy starts");
    let addr = envoy.listener_addr("to_echo", Duration::from_secs(20)).await.expect("listener binds");
    let reply = get_h1(addr, "svc.local", "/through?x=1").await.unwrap();
    assert_eq!(reply.status, 200, "{}", envoy.log_tail());
    assert_eq!(reply.header("x-echo-server"), Some("behind-envoy"));
    let json = reply.json().unwrap();
    assert_eq!(json["path"], "/through?x=1");
    assert!(json["headers"]["x-request-id"].is_string(), "{json}");

    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: svc.local\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("101 within 10s")
            .expect("read");
        assert!(n > 0, "EOF after {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    s.write_all(b"through envoy").await.unwrap();
    let mut buf = [0u8; 13];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"through envoy");
    assert_eq!(echo.requests(), 2, "both requests reached the echo server");
}

#[tokio::test]
async fn envoy_start_reports_an_invalid_bootstrap_with_its_log() {
    let bad = "admin:\n  address:\n    socket_address: { address: 127.0.0.1, port_value: 0 }\n\
               static_resources:\n  clusters:\n  - name: broken\n    type: NOT_A_TYPE\n";
    let err = match Envoy::start(bad).await {
        Ok(_) => panic!("Envoy started on an invalid bootstrap"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("Envoy exited"), "{err}");
    assert!(err.contains("NOT_A_TYPE"), "log tail should name the bad value: {err}");
}

#[test]
fn h2load_summary_parser_reads_the_requests_line() {
    let sample = "finished in 5.1ms, 19000 req/s\n\
        requests: 100 total, 100 started, 100 done, 98 succeeded, 2 failed, 0 errored, 0 timeout\n\
        status codes: 98 2xx, 0 3xx, 0 4xx, 2 5xx\n";
    assert_eq!(parse_h2load(sample), Some((100, 98, 2)));
    assert_eq!(parse_h2load("garbage"), None);
}

/// (total, succeeded, failed) from h2load's `requests:` line.
fn parse_h2load(out: &str) -> Option<(u64, u64, u64)> {
    let line = out.lines().find(|l| l.trim_start().starts_with("requests:"))?;
    let field = |label: &str| -> Option<u64> {
        line.split(',')
            .map(str::trim)
            .map(|p| p.trim_start_matches("requests:").trim())
            .find(|p| p.ends_with(label))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((field("total")?, field("succeeded")?, field("failed")?))
}
