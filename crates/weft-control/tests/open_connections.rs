//! Configuration reaches connections that are already open, in process (the same
//! control plane and proxies as the binaries, started by the test): PeerAuthentication
//! STRICT drains plaintext HTTP/1.1 (idle and in flight), h2c and TCP connections opened
//! before it. The policy scenarios (DENY / ALLOW / delete on open HTTP/1.1, HTTP/2, gRPC
//! and TCP connections) run against real `weft control` and `weft proxy` processes in
//! `crates/weft/tests/open_connections.rs`. Connections are opened first, the policy
//! written after, and each assertion is made on a connection opened before the change, as
//! soon as the server proxy has ACKed it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mesh;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncReadExt;
use weft_control::control::ControlPlane;
use weft_control::identity::IdentityConfig;
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::{EchoServer, GrpcEchoServer, TcpEchoServer};
use weft_testkit::open::{self, KeepAlive};
use weft_xds::type_url;

const WAIT: Duration = Duration::from_secs(20);
/// The drain duration the server sidecar runs with (Istio's default is 45 s).
const DRAIN: Duration = Duration::from_secs(2);

struct Mesh {
    _data: tempfile::TempDir,
    dir: tempfile::TempDir,
    _cp: ControlPlane,
    http_app: EchoServer,
    _grpc_app: GrpcEchoServer,
    tcp_app: TcpEchoServer,
    server: ProxyHandle,
    _client: ProxyHandle,
}

impl Mesh {
    async fn start() -> Mesh {
        let data = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let http_app = EchoServer::start("reviews-http").await;
        let grpc_app = GrpcEchoServer::start("reviews-grpc").await;
        let tcp_app = TcpEchoServer::start().await;
        let service = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  selector: {{app: reviews}}\n  ports:\n  - {{name: http, port: 9080, targetPort: {}}}\n  - {{name: grpc, port: 9090, targetPort: {}}}\n  - {{name: tcp, port: 9070, targetPort: {}}}\n",
            http_app.addr.port(),
            grpc_app.addr.port(),
            tcp_app.addr.port()
        );
        std::fs::write(dir.path().join("svc.yaml"), service).unwrap();
        let mut identity = IdentityConfig::new(data.path());
        identity.cert_ttl = Duration::from_secs(3600);
        let cp = mesh::control_plane(Some(dir.path()), identity).await;
        let ports = [("http", http_app.addr.port()), ("grpc", grpc_app.addr.port()), ("tcp", tcp_app.addr.port())];
        let server = sidecar(&cp, "reviews", "bookinfo-reviews", &ports).await;
        let client = sidecar(&cp, "productpage", "bookinfo-productpage", &[]).await;
        Mesh { _data: data, dir, _cp: cp, http_app, _grpc_app: grpc_app, tcp_app, server, _client: client }
    }

    async fn inbound(&self, port: u16) -> SocketAddr {
        self.server.listener_addr(&format!("inbound|{port}"), WAIT).await.unwrap()
    }

    /// Writes `file` into the watched directory (empty text: removes it) and waits until
    /// the server sidecar has applied a listener version it did not have before.
    async fn write(&self, file: &str, text: &str) {
        let before = self.listener_version();
        let path = self.dir.path().join(file);
        if text.is_empty() {
            std::fs::remove_file(path).unwrap();
        } else {
            std::fs::write(path, text).unwrap();
        }
        let store = &self.server.context().store;
        let mut rx = store.subscribe();
        let applied = tokio::time::timeout(WAIT, async {
            while self.listener_version() == before {
                let _ = rx.changed().await;
            }
        })
        .await;
        assert!(applied.is_ok(), "the server sidecar never applied new listeners after writing {file}");
    }

    fn listener_version(&self) -> Option<String> {
        self.server.context().store.snapshot().versions.get(type_url::LISTENER).cloned()
    }
}

async fn sidecar(cp: &ControlPlane, name: &str, sa: &str, ports: &[(&str, u16)]) -> ProxyHandle {
    let token = mesh::join_token(cp, "default", sa).await;
    let mut extra = String::new();
    if !ports.is_empty() {
        // `inbound|PORT` listeners take consecutive ports from the inbound address, which
        // the proxy announces before it binds them.
        extra.push_str(&format!(
            "  inbound: {}\n  ports:\n",
            weft_testkit::net::reserve_consecutive(ports.len() as u16)
        ));
        for (n, p) in ports {
            extra.push_str(&format!("  - {{name: {n}, port: {p}, protocol: TCP}}\n"));
        }
    }
    let text = format!(
        "node:\n  id: {name}\n  cluster: {name}.default\n  name: {name}\n  namespace: default\n  service_account: {sa}\n  labels:\n    app: {name}\n  outbound: {}\n{extra}xds:\n  address: http://{}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\ndrain_timeout: 1s\ndrain_duration: {}s\nidentity:\n  token: \"{token}\"\n",
        weft_testkit::net::reserve_addr(),
        cp.xds_addr,
        DRAIN.as_secs()
    );
    let b = Bootstrap::parse(&text, Path::new("sidecar.yaml")).unwrap();
    let p = ProxyHandle::start(b).await.unwrap();
    assert!(p.wait_ready(WAIT).await, "{name} never became ready");
    p
}

/// A GET of `path` on reviews' HTTP port over an open HTTP/2 connection.
async fn h2_get(sender: &mut SendRequest<Full<Bytes>>, path: &str) -> Option<u16> {
    open::h2_get(sender, &format!("https://reviews:9080{path}")).await
}

/// Sends `ping` on an open TCP connection; the echoed bytes (empty once closed).
async fn tcp_ping<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) -> Vec<u8> {
    open::tcp_ping(s, WAIT).await
}

async fn metrics(p: &ProxyHandle) -> String {
    weft_testkit::http::get_h1(p.metrics_addr(), "m", "/stats/prometheus").await.unwrap().text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_drains_plaintext_connections_opened_before_it() {
    let mesh = Mesh::start().await;
    let http_inbound = mesh.inbound(mesh.http_app.addr.port()).await;
    let tcp_inbound = mesh.inbound(mesh.tcp_app.addr.port()).await;

    // PERMISSIVE (the default): plaintext keep-alive HTTP/1.1 connections, an h2c
    // connection and a plaintext TCP connection are served.
    let mut idle = KeepAlive::connect(http_inbound).await.unwrap();
    assert_eq!(idle.get("/a", "reviews").await.map(|r| r.status), Some(200));
    let mut busy = KeepAlive::connect(http_inbound).await.unwrap();
    assert_eq!(busy.get("/a", "reviews").await.map(|r| r.status), Some(200));
    let h2c = tokio::net::TcpStream::connect(http_inbound).await.unwrap();
    let (mut h2c, conn) =
        hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(TokioExecutor::new(), TokioIo::new(h2c))
            .await
            .unwrap();
    let h2c_conn = tokio::spawn(conn);
    assert_eq!(h2_get(&mut h2c, "/h2c").await, Some(200));
    let mut tcp = tokio::net::TcpStream::connect(tcp_inbound).await.unwrap();
    assert_eq!(tcp_ping(&mut tcp).await, b"ping");

    let strict = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec:\n  mtls: {mode: STRICT}\n";
    mesh.write("strict.yaml", strict).await;
    let applied = Instant::now();

    // A request in flight on a draining HTTP/1.1 connection is answered with
    // `Connection: close`, and the connection ends after it.
    let last = busy.get("/b", "reviews").await;
    if let Some(last) = last {
        assert!(last.close, "a response on a draining HTTP/1.1 connection says connection: close: {last:?}");
        assert!(busy.closed_within(DRAIN).await, "the draining connection was not closed after its response");
    }
    // An idle HTTP/1.1 connection and the TCP connection are closed within the drain
    // duration; the HTTP/2 connection gets GOAWAY and ends.
    let budget = DRAIN + Duration::from_secs(3);
    assert!(idle.closed_within(budget).await, "idle plaintext HTTP/1.1 connection still open after STRICT");
    let mut buf = [0u8; 8];
    let tcp_end = tokio::time::timeout(budget, tcp.read(&mut buf)).await;
    assert!(matches!(tcp_end, Ok(Ok(0)) | Ok(Err(_))), "plaintext TCP connection still open after STRICT: {tcp_end:?}");
    let h2_end = tokio::time::timeout(budget, h2c_conn).await;
    assert!(h2_end.is_ok(), "the h2c connection did not end after STRICT");
    assert!(applied.elapsed() < budget + Duration::from_secs(1));
    // New plaintext connections are refused.
    let mut fresh = KeepAlive::connect(http_inbound).await.unwrap();
    assert!(fresh.get("/c", "reviews").await.is_none(), "a new plaintext connection was served under STRICT");

    let m = metrics(&mesh.server).await;
    assert!(
        m.lines().any(|l| l.starts_with("weft_downstream_cx_drained_total")
            && l.contains("reason=\"filter_chain_changed\"")
            && !l.ends_with(" 0")),
        "drained connections are counted: {m}"
    );
}
