//! Configuration reaches connections that are already open (issue: a DENY applied under
//! load kept being answered 200 on pooled connections for minutes). A control plane with
//! its CA watches a directory; a reviews sidecar serves an HTTP app, a gRPC app and a TCP
//! app on three ports; a productpage sidecar calls it over pooled mTLS. Connections are
//! opened first, policies written after, and each assertion is made on the connection
//! opened before the change, as soon as the server proxy has ACKed it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mesh;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use weft_control::control::ControlPlane;
use weft_control::identity::IdentityConfig;
use weft_identity::manager::CertManagerConfig;
use weft_identity::tls::{client_config, PeerIdentities};
use weft_identity::{CertManager, CredentialSource, SpiffeId};
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::{decode_message, encode_message, EchoServer, GrpcEchoServer, TcpEchoServer};
use weft_xds::type_url;

const WAIT: Duration = Duration::from_secs(20);
const REVIEWS_ID: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews";

/// The drain duration the server sidecar runs with (Istio's default is 45 s).
const DRAIN: Duration = Duration::from_secs(2);

struct Mesh {
    _data: tempfile::TempDir,
    dir: tempfile::TempDir,
    cp: ControlPlane,
    http_app: EchoServer,
    grpc_app: GrpcEchoServer,
    tcp_app: TcpEchoServer,
    server: ProxyHandle,
    client: ProxyHandle,
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
        Mesh { _data: data, dir, cp, http_app, grpc_app, tcp_app, server, client }
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

    /// Our own mesh client identity (`sleep`), as a proxy gets it.
    async fn identity(&self) -> CertManager {
        let id = SpiffeId::new("cluster.local", "default", "sleep").unwrap();
        let token = mesh::join_token(&self.cp, "default", "sleep").await;
        let cfg =
            CertManagerConfig::new(format!("http://{}", self.cp.xds_addr), CredentialSource::JoinToken(token), id);
        CertManager::start(cfg).await.unwrap()
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

/// A keep-alive HTTP/1.1 connection (plaintext) on which requests are sent one by one.
struct H1 {
    reader: BufReader<tokio::net::TcpStream>,
}

/// One HTTP/1.1 response: status, whether it said `connection: close`, and the body.
#[derive(Debug)]
struct H1Reply {
    status: u16,
    close: bool,
    body: String,
}

impl H1 {
    async fn connect(addr: SocketAddr) -> H1 {
        H1 { reader: BufReader::new(tokio::net::TcpStream::connect(addr).await.unwrap()) }
    }

    /// Sends `GET target` (an absolute URL through an explicit proxy, or a path) and
    /// reads the response; `None` when the connection was closed instead.
    async fn get(&mut self, target: &str, host: &str) -> Option<H1Reply> {
        let req = format!("GET {target} HTTP/1.1\r\nhost: {host}\r\n\r\n");
        self.reader.get_mut().write_all(req.as_bytes()).await.ok()?;
        let mut line = String::new();
        if self.reader.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let status = line.split(' ').nth(1)?.parse().ok()?;
        let (mut length, mut close) = (0usize, false);
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h).await.ok()?;
            let h = h.trim_end().to_ascii_lowercase();
            if h.is_empty() {
                break;
            }
            if let Some(v) = h.strip_prefix("content-length:") {
                length = v.trim().parse().ok()?;
            }
            if h.starts_with("connection:") && h.contains("close") {
                close = true;
            }
        }
        let mut body = vec![0u8; length];
        self.reader.read_exact(&mut body).await.ok()?;
        Some(H1Reply { status, close, body: String::from_utf8_lossy(&body).into_owned() })
    }

    /// True once the peer closed the connection (EOF or reset) within `within`.
    async fn closed_within(&mut self, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(tokio::time::timeout(within, self.reader.read(&mut buf)).await, Ok(Ok(0)) | Ok(Err(_)))
    }
}

type H2Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// An HTTP/2 connection over mutual TLS to `addr` (the reviews sidecar's inbound port).
async fn h2_mtls(me: &CertManager, addr: SocketAddr) -> H2Sender {
    let mut cfg = client_config(me.identity(), PeerIdentities::OneOf(vec![REVIEWS_ID.parse().unwrap()])).unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("reviews.default.svc.cluster.local").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// A GET on an open HTTP/2 connection: the status, or `None` when the stream failed.
async fn h2_get(sender: &mut H2Sender, path: &str) -> Option<u16> {
    sender.ready().await.ok()?;
    let req = Request::get(format!("https://reviews:9080{path}")).body(Full::new(Bytes::new())).unwrap();
    let resp = sender.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Some(status)
}

/// A unary gRPC call on an open HTTP/2 connection: `grpc-status` (headers or trailers).
async fn grpc_unary(sender: &mut H2Sender) -> Option<u32> {
    sender.ready().await.ok()?;
    let req = Request::post("https://reviews:9090/echo.Echo/Unary")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(encode_message(b"hi")))
        .unwrap();
    let resp = sender.send_request(req).await.ok()?;
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.ok()?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let status = trailers.get("grpc-status").or_else(|| parts.headers.get("grpc-status"))?;
    status.to_str().ok()?.parse().ok()
}

/// A bidirectional gRPC stream open on an HTTP/2 connection (reviews' Stream method).
struct GrpcBidi {
    tx: tokio::sync::mpsc::Sender<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>,
    body: hyper::body::Incoming,
    buf: bytes::BytesMut,
}

type StreamBody = http_body_util::StreamBody<
    tokio_stream::wrappers::ReceiverStream<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>,
>;

async fn grpc_stream(
    me: &CertManager,
    addr: SocketAddr,
) -> (GrpcBidi, hyper::client::conn::http2::SendRequest<StreamBody>) {
    let mut cfg = client_config(me.identity(), PeerIdentities::OneOf(vec![REVIEWS_ID.parse().unwrap()])).unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("reviews.default.svc.cluster.local").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake::<_, _, StreamBody>(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let req = Request::post("https://reviews:9090/echo.Echo/Stream")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    (GrpcBidi { tx, body: resp.into_body(), buf: bytes::BytesMut::new() }, sender)
}

impl GrpcBidi {
    async fn echo(&mut self, msg: &'static [u8]) -> Option<Bytes> {
        self.tx.send(Ok(hyper::body::Frame::data(encode_message(msg)))).await.ok()?;
        loop {
            if let Some(m) = decode_message(&mut self.buf).ok()? {
                return Some(m);
            }
            let frame = self.body.frame().await?.ok()?;
            self.buf.extend_from_slice(&frame.into_data().ok()?);
        }
    }
}

/// A unary call on the gRPC stream's own connection (a new stream on it).
async fn grpc_unary_on(sender: &mut hyper::client::conn::http2::SendRequest<StreamBody>) -> Option<u32> {
    sender.ready().await.ok()?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Ok(hyper::body::Frame::data(encode_message(b"hi")))).await.ok()?;
    drop(tx);
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let req = Request::post("https://reviews:9090/echo.Echo/Unary")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let resp = sender.send_request(req).await.ok()?;
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.ok()?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let status = trailers.get("grpc-status").or_else(|| parts.headers.get("grpc-status"))?;
    status.to_str().ok()?.parse().ok()
}

/// Sends `ping` on an open TCP connection; the echoed bytes (empty once closed).
async fn tcp_ping<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) -> Vec<u8> {
    if s.write_all(b"ping").await.is_err() {
        return Vec::new();
    }
    let mut buf = [0u8; 4];
    match tokio::time::timeout(WAIT, s.read_exact(&mut buf)).await {
        Ok(Ok(_)) => buf.to_vec(),
        _ => Vec::new(),
    }
}

fn policy(name: &str, spec: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: reviews}}}}\n{spec}")
}

async fn metrics(p: &ProxyHandle) -> String {
    weft_testkit::http::get_h1(p.metrics_addr(), "m", "/stats/prometheus").await.unwrap().text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_allow_delete_reach_open_http1_http2_grpc_and_tcp_connections() {
    let mesh = Mesh::start().await;
    let me = mesh.identity().await;
    let outbound = mesh.client.listener_addr("weft-outbound", WAIT).await.unwrap();
    let url = "http://reviews:9080/ratings";

    // Open everything first: HTTP/1.1 keep-alive through productpage's sidecar (whose
    // pooled mTLS connection to reviews' sidecar carries every request), HTTP/2 and a
    // long gRPC stream straight to reviews' sidecar over mTLS, and a TCP connection.
    let mut h1 = H1::connect(outbound).await;
    let first = h1.get(url, "reviews:9080").await.expect("first request");
    assert_eq!(first.status, 200, "{first:?}");
    let mut h2 = h2_mtls(&me, mesh.inbound(mesh.http_app.addr.port()).await).await;
    assert_eq!(h2_get(&mut h2, "/h2").await, Some(200));
    let grpc_addr = mesh.inbound(mesh.grpc_app.addr.port()).await;
    let mut unary = h2_mtls(&me, grpc_addr).await;
    assert_eq!(grpc_unary(&mut unary).await, Some(0));
    let (mut stream, mut stream_conn) = grpc_stream(&me, grpc_addr).await;
    assert_eq!(stream.echo(b"one").await.as_deref(), Some(&b"one"[..]));
    let tcp_inbound = mesh.inbound(mesh.tcp_app.addr.port()).await;
    let mut tcp = tcp_mtls(&me, tcp_inbound).await;
    assert_eq!(tcp_ping(&mut tcp).await, b"ping");
    let apps_before = mesh.http_app.requests();

    // DENY everything for reviews: the next request on every open connection is denied.
    mesh.write("policy.yaml", &policy("deny-all", "  action: DENY\n  rules: [{}]\n")).await;
    let denied = h1.get(url, "reviews:9080").await.expect("the HTTP/1.1 connection stays open");
    assert_eq!((denied.status, denied.body.as_str()), (403, "RBAC: access denied"), "{denied:?}");
    assert_eq!(h2_get(&mut h2, "/h2").await, Some(403));
    assert_eq!(grpc_unary(&mut unary).await, Some(7), "PERMISSION_DENIED");
    assert_eq!(grpc_unary_on(&mut stream_conn).await, Some(7), "a new call beside the long stream");
    assert_eq!(mesh.http_app.requests(), apps_before, "no denied request reached the app");
    // TCP: the network RBAC policy now denies the open connection, which is closed.
    assert_eq!(tcp_ping(&mut tcp).await, b"");

    // ALLOW replaces the DENY: the same connections pass again.
    mesh.write("policy.yaml", &policy("allow-all", "  rules: [{}]\n")).await;
    assert_eq!(h1.get(url, "reviews:9080").await.map(|r| r.status), Some(200));
    assert_eq!(h2_get(&mut h2, "/h2").await, Some(200));
    assert_eq!(grpc_unary(&mut unary).await, Some(0));
    assert_eq!(grpc_unary_on(&mut stream_conn).await, Some(0));
    assert_eq!(stream.echo(b"two").await.as_deref(), Some(&b"two"[..]), "the long stream is still open");

    // A DENY for one path only, then deleting every policy: each reaches them too.
    mesh.write(
        "policy.yaml",
        &policy("deny-admin", "  action: DENY\n  rules: [{to: [{operation: {paths: [/admin]}}]}]\n"),
    )
    .await;
    assert_eq!(h1.get("http://reviews:9080/admin", "reviews:9080").await.map(|r| r.status), Some(403));
    assert_eq!(h2_get(&mut h2, "/admin").await, Some(403));
    assert_eq!(h2_get(&mut h2, "/ok").await, Some(200));
    mesh.write("policy.yaml", "").await;
    assert_eq!(h1.get("http://reviews:9080/admin", "reviews:9080").await.map(|r| r.status), Some(200));
    assert_eq!(h2_get(&mut h2, "/admin").await, Some(200));
    assert_eq!(grpc_unary(&mut unary).await, Some(0));

    let m = metrics(&mesh.server).await;
    assert!(
        m.lines().any(|l| l.starts_with("weft_downstream_cx_drained_total")
            && l.contains("reason=\"rbac_denied\"")
            && !l.ends_with(" 0")),
        "the closed TCP connection is counted: {m}"
    );
    drop(stream);
}

async fn tcp_mtls(me: &CertManager, addr: SocketAddr) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let cfg = client_config(me.identity(), PeerIdentities::OneOf(vec![REVIEWS_ID.parse().unwrap()])).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("reviews.default.svc.cluster.local").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_drains_plaintext_connections_opened_before_it() {
    let mesh = Mesh::start().await;
    let http_inbound = mesh.inbound(mesh.http_app.addr.port()).await;
    let tcp_inbound = mesh.inbound(mesh.tcp_app.addr.port()).await;

    // PERMISSIVE (the default): plaintext keep-alive HTTP/1.1 connections, an h2c
    // connection and a plaintext TCP connection are served.
    let mut idle = H1::connect(http_inbound).await;
    assert_eq!(idle.get("/a", "reviews").await.map(|r| r.status), Some(200));
    let mut busy = H1::connect(http_inbound).await;
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
    let mut fresh = H1::connect(http_inbound).await;
    assert!(fresh.get("/c", "reviews").await.is_none(), "a new plaintext connection was served under STRICT");

    let m = metrics(&mesh.server).await;
    assert!(
        m.lines().any(|l| l.starts_with("weft_downstream_cx_drained_total")
            && l.contains("reason=\"filter_chain_changed\"")
            && !l.ends_with(" 0")),
        "drained connections are counted: {m}"
    );
}
