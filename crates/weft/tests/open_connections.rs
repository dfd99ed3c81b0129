//! Configuration reaches connections that are already open, through real processes:
//! `weft control` (with its CA in a data directory) watches a directory; a reviews
//! sidecar (`weft proxy --drain-duration 2s`) serves an HTTP app, a gRPC app and a TCP
//! app on three ports; a productpage sidecar calls it over pooled mTLS. Connections are
//! opened first, policies written after, and each assertion is made on a connection
//! opened before the change, as soon as the control plane reports that the reviews
//! sidecar ACKed the new listeners. The in-process twin is
//! crates/weft-control/tests/open_connections.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use http_body_util::Full;
use hyper::client::conn::http2::SendRequest;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};
use tokio_rustls::rustls::pki_types::ServerName;
use weft_identity::manager::CertManagerConfig;
use weft_identity::tls::{client_config, PeerIdentities};
use weft_identity::{CertManager, CredentialSource, SpiffeId};
use weft_testkit::echo::{EchoServer, GrpcEchoServer, TcpEchoServer};
use weft_testkit::http::{get_h1, get_via_proxy, request, send_h1};
use weft_testkit::open::{self, GrpcBidi, KeepAlive};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");
/// How long a test waits for a fact (a process up, a push ACKed) before failing.
const WAIT: Duration = Duration::from_secs(30);
const REVIEWS_ID: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews";
/// The drain duration the sidecars run with (`--drain-duration`; Istio's default is 45 s).
const DRAIN: Duration = Duration::from_secs(2);

/// What a `--log-json` process logged: the proxy's admin and metrics addresses, the
/// address each listener bound, and the last lines (for failure messages).
#[derive(Default)]
struct Logged {
    admin: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
    listeners: HashMap<String, SocketAddr>,
    tail: VecDeque<String>,
}

/// Reads `stderr` to its end (so the process never blocks on it), noting what it logged.
fn follow(stderr: ChildStderr) -> Arc<Mutex<Logged>> {
    let log = Arc::new(Mutex::new(Logged::default()));
    let into = log.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut l = into.lock().unwrap();
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                let f = &v["fields"];
                if let Some(a) = f["admin_addr"].as_str().and_then(|a| a.parse().ok()) {
                    l.admin = Some(a);
                }
                if let Some(a) = f["metrics_addr"].as_str().and_then(|a| a.parse().ok()) {
                    l.metrics = Some(a);
                }
                if f["message"] == "listening" {
                    if let (Some(n), Some(a)) = (f["listener"].as_str(), f["address"].as_str()) {
                        if let Ok(a) = a.parse() {
                            l.listeners.insert(n.to_string(), a);
                        }
                    }
                }
            }
            if l.tail.len() == 40 {
                l.tail.pop_front();
            }
            l.tail.push_back(line);
        }
    });
    log
}

/// A `weft` child process, killed when dropped.
struct Proc {
    name: &'static str,
    _child: Child,
    log: Arc<Mutex<Logged>>,
}

impl Proc {
    fn tail(&self) -> String {
        let l = self.log.lock().unwrap();
        format!("--- {} log tail ---\n{}", self.name, l.tail.iter().cloned().collect::<Vec<_>>().join("\n"))
    }

    /// Polls the log until `get` finds what it looks for.
    async fn logged<T>(&self, what: &str, get: impl Fn(&Logged) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(v) = get(&self.log.lock().unwrap()) {
                return v;
            }
            assert!(Instant::now() < deadline, "{} never logged {what}\n{}", self.name, self.tail());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn listener(&self, name: &str) -> SocketAddr {
        self.logged(&format!("listener {name}"), |l| l.listeners.get(name).copied()).await
    }

    async fn metrics(&self) -> String {
        let addr = self.logged("its metrics address", |l| l.metrics).await;
        get_h1(addr, "m", "/stats/prometheus").await.unwrap().text()
    }
}

/// Fields drop in order: the sidecars are killed first, then the control plane, then
/// the apps and directories go.
struct Mesh {
    server: Proc,
    client: Proc,
    control: Proc,
    xds: SocketAddr,
    api: SocketAddr,
    http_app: EchoServer,
    grpc_app: GrpcEchoServer,
    tcp_app: TcpEchoServer,
    dir: tempfile::TempDir,
    _data: tempfile::TempDir,
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
        let (control, xds, api) = start_control(dir.path(), data.path()).await;
        let ports = [("http", http_app.addr.port()), ("grpc", grpc_app.addr.port()), ("tcp", tcp_app.addr.port())];
        let server = sidecar(xds, api, "reviews", "bookinfo-reviews", &ports).await;
        let client = sidecar(xds, api, "productpage", "bookinfo-productpage", &[]).await;
        let mesh = Mesh { server, client, control, xds, api, http_app, grpc_app, tcp_app, dir, _data: data };
        for p in [&mesh.server, &mesh.client] {
            let admin = p.logged("its admin address", |l| l.admin).await;
            assert!(ready(admin).await, "{} never became ready\n{}", p.name, p.tail());
        }
        mesh
    }

    async fn inbound(&self, app_port: u16) -> SocketAddr {
        self.server.listener(&format!("inbound|{app_port}")).await
    }

    /// Writes `file` into the watched directory (empty text: removes it) and waits until
    /// the control plane reports that the reviews sidecar ACKed listeners it did not
    /// have before, and is SYNCED on them.
    async fn write(&self, file: &str, text: &str) {
        let before = self.wait_listeners(|_| true, "a SYNCED listener version before the change").await;
        let path = self.dir.path().join(file);
        if text.is_empty() {
            std::fs::remove_file(path).unwrap();
        } else {
            std::fs::write(path, text).unwrap();
        }
        self.wait_listeners(|v| v != before, &format!("a new SYNCED listener version after writing {file}")).await;
    }

    /// Polls `GET /api/v1/proxies` until the reviews sidecar's listeners are SYNCED at
    /// an ACKed version `ok` accepts; that version.
    async fn wait_listeners(&self, ok: impl Fn(&str) -> bool, what: &str) -> String {
        let deadline = Instant::now() + WAIT;
        let mut last = serde_json::Value::Null;
        while Instant::now() < deadline {
            let r = get_h1(self.api, "weft", "/api/v1/proxies").await.unwrap();
            last = r.json().unwrap();
            let reviews = last["proxies"].as_array().and_then(|ps| ps.iter().find(|p| p["id"] == "reviews"));
            let listeners = reviews.map(|p| &p["types"]["Listener"]);
            if let Some(l) = listeners.filter(|l| l["status"] == "SYNCED") {
                if let Some(v) = l["acked"].as_str().filter(|v| ok(v)) {
                    return v.to_string();
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}: {last}\n{}\n{}", self.server.tail(), self.control.tail());
    }

    /// Our own mesh client identity (`sleep`), as a proxy gets it.
    async fn identity(&self) -> CertManager {
        let id = SpiffeId::new("cluster.local", "default", "sleep").unwrap();
        let token = join_token(self.api, "sleep").await;
        let cfg = CertManagerConfig::new(format!("http://{}", self.xds), CredentialSource::JoinToken(token), id);
        CertManager::start(cfg).await.unwrap()
    }
}

/// `weft control` with its CA in `data`, watching `dir`: the process and its xDS and
/// API addresses (from the line it prints once serving).
async fn start_control(dir: &Path, data: &Path) -> (Proc, SocketAddr, SocketAddr) {
    write_admin_token(data);
    let mut child = Command::new(WEFT)
        .args(["--log-json", "control", "--dir"])
        .arg(dir)
        .arg("--data-dir")
        .arg(data)
        .args(["--xds", "127.0.0.1:0", "--api", "127.0.0.1:0", "--api-read-anonymous"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = follow(child.stderr.take().unwrap());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line()).await.expect("weft control started").unwrap().unwrap();
    let xds = line.split("xDS on ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    let api = line.split("API on ").nth(1).unwrap().trim().parse().unwrap();
    (Proc { name: "weft control", _child: child, log }, xds, api)
}

/// A join token for `default`/`sa` from the control plane's API (one hour).
async fn join_token(api: SocketAddr, sa: &str) -> String {
    let body = serde_json::json!({"namespace": "default", "serviceAccount": sa, "ttlSeconds": 3600});
    let mut req = request(Method::POST, "weft", "/api/v1/tokens", Bytes::from(body.to_string())).unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {ADMIN_TOKEN}").parse().unwrap());
    let reply = send_h1(api, req).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json().unwrap()["token"].as_str().expect("a token").to_string()
}

/// `weft proxy --bootstrap-yaml ... --drain-duration 2s` for workload `name` with
/// service account `sa`, serving `ports` (name, app port) inbound.
async fn sidecar(xds: SocketAddr, api: SocketAddr, name: &'static str, sa: &str, ports: &[(&str, u16)]) -> Proc {
    let token = join_token(api, sa).await;
    let mut extra = String::new();
    if !ports.is_empty() {
        // `inbound|PORT` listeners take consecutive ports from the inbound address, which
        // the proxy announces before it binds them.
        extra.push_str(&format!(
            "  inbound: \"{}\"\n  ports:\n",
            weft_testkit::net::reserve_consecutive(ports.len() as u16)
        ));
        for (n, p) in ports {
            extra.push_str(&format!("  - {{name: {n}, port: {p}, protocol: TCP}}\n"));
        }
    }
    let text = format!(
        "node:\n  id: {name}\n  cluster: {name}.default\n  name: {name}\n  namespace: default\n  service_account: {sa}\n  labels:\n    app: {name}\n  outbound: \"{}\"\n{extra}xds:\n  address: http://{xds}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\ndrain_timeout: 1s\nidentity:\n  token: \"{token}\"\n",
        weft_testkit::net::reserve_addr(),
    );
    let mut child = Command::new(WEFT)
        .args(["--log-json", "proxy", "--bootstrap-yaml", &text, "--drain-duration"])
        .arg(format!("{}s", DRAIN.as_secs()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = follow(child.stderr.take().unwrap());
    Proc { name, _child: child, log }
}

/// Whether the proxy's admin `/ready` answers 200 within [`WAIT`].
async fn ready(admin: SocketAddr) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if weft_testkit::xds::wait_ready(admin).await {
            return true;
        }
    }
    false
}

/// Mutual TLS to the reviews sidecar's inbound `addr` as `me`, offering `alpn`.
async fn mtls(
    me: &CertManager,
    addr: SocketAddr,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut cfg = client_config(me.identity(), PeerIdentities::OneOf(vec![REVIEWS_ID.parse().unwrap()])).unwrap();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("reviews.default.svc.cluster.local").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.unwrap()
}

/// An HTTP/2 connection over mutual TLS to `addr` (the reviews sidecar's inbound port).
async fn h2_mtls(me: &CertManager, addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    open::h2(mtls(me, addr, &[b"h2"]).await).await.unwrap()
}

/// A GET of `path` on reviews' HTTP port over an open HTTP/2 connection.
async fn h2_get(sender: &mut SendRequest<Full<Bytes>>, path: &str) -> Option<u16> {
    open::h2_get(sender, &format!("https://reviews:9080{path}")).await
}

/// Sends `ping` on an open TCP connection; the echoed bytes (empty once closed).
async fn tcp_ping<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) -> Vec<u8> {
    open::tcp_ping(s, WAIT).await
}

const GRPC: &str = "reviews:9090";

fn policy(name: &str, spec: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: reviews}}}}\n{spec}")
}

/// Polls the sidecar's metrics until `weft_downstream_cx_drained_total{reason}` is above 0.
async fn wait_drained(p: &Proc, reason: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = p.metrics().await;
        let counted = m.lines().any(|l| {
            l.starts_with("weft_downstream_cx_drained_total")
                && l.contains(&format!("reason=\"{reason}\""))
                && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).is_some_and(|v| v > 0.0)
        });
        if counted {
            return;
        }
        assert!(Instant::now() < deadline, "no connection drained for {reason} is counted:\n{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_allow_delete_reach_open_connections_through_weft_processes() {
    let mesh = Mesh::start().await;
    let me = mesh.identity().await;
    let outbound = mesh.client.listener("weft-outbound").await;
    let url = "http://reviews:9080/ratings";

    // The productpage sidecar reaches reviews once reviews' registration reached it.
    let deadline = Instant::now() + WAIT;
    while get_via_proxy(outbound, url).await.map(|r| r.status.as_u16()).ok() != Some(200) {
        assert!(Instant::now() < deadline, "productpage's sidecar never reached reviews\n{}", mesh.client.tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Open everything first: HTTP/1.1 keep-alive through productpage's sidecar (whose
    // pooled mTLS connection to reviews' sidecar carries every request), HTTP/2 and a
    // long gRPC stream straight to reviews' sidecar over mTLS, and a TCP connection.
    let mut h1 = KeepAlive::connect(outbound).await.unwrap();
    let first = h1.get(url, "reviews:9080").await.expect("first request");
    assert_eq!(first.status, 200, "{first:?}");
    let mut h2 = h2_mtls(&me, mesh.inbound(mesh.http_app.addr.port()).await).await;
    assert_eq!(h2_get(&mut h2, "/h2").await, Some(200));
    let grpc_addr = mesh.inbound(mesh.grpc_app.addr.port()).await;
    let mut unary = h2_mtls(&me, grpc_addr).await;
    assert_eq!(open::grpc_unary(&mut unary, GRPC).await, Some(0));
    let (mut stream, mut stream_conn) = GrpcBidi::open(mtls(&me, grpc_addr, &[b"h2"]).await, GRPC).await.unwrap();
    assert_eq!(stream.echo(b"one").await.as_deref(), Some(&b"one"[..]));
    let mut tcp = mtls(&me, mesh.inbound(mesh.tcp_app.addr.port()).await, &[]).await;
    assert_eq!(tcp_ping(&mut tcp).await, b"ping");
    let apps_before = mesh.http_app.requests();
    let grpc_before = mesh.grpc_app.requests();

    // DENY everything for reviews: the next request on every open connection is denied.
    mesh.write("policy.yaml", &policy("deny-all", "  action: DENY\n  rules: [{}]\n")).await;
    let denied = h1.get(url, "reviews:9080").await.expect("the HTTP/1.1 connection stays open");
    assert_eq!((denied.status, denied.body.as_str()), (403, "RBAC: access denied"), "{denied:?}");
    assert_eq!(h2_get(&mut h2, "/h2").await, Some(403));
    assert_eq!(open::grpc_unary(&mut unary, GRPC).await, Some(7), "PERMISSION_DENIED");
    assert_eq!(open::grpc_unary_streamed(&mut stream_conn, GRPC).await, Some(7), "a new call beside the long stream");
    assert_eq!(mesh.http_app.requests(), apps_before, "no denied request reached the HTTP app");
    assert_eq!(mesh.grpc_app.requests(), grpc_before, "no denied call reached the gRPC app");
    // TCP: the network RBAC policy now denies the open connection, which is closed.
    assert_eq!(tcp_ping(&mut tcp).await, b"", "the open TCP connection was not closed by DENY");

    // ALLOW replaces the DENY: the same connections pass again.
    mesh.write("policy.yaml", &policy("allow-all", "  rules: [{}]\n")).await;
    assert_eq!(h1.get(url, "reviews:9080").await.map(|r| r.status), Some(200));
    assert_eq!(h2_get(&mut h2, "/h2").await, Some(200));
    assert_eq!(open::grpc_unary(&mut unary, GRPC).await, Some(0));
    assert_eq!(open::grpc_unary_streamed(&mut stream_conn, GRPC).await, Some(0));
    assert_eq!(stream.echo(b"two").await.as_deref(), Some(&b"two"[..]), "the long stream is still open");

    // A DENY again, then deleting the policy: the same connections pass.
    mesh.write("policy.yaml", &policy("deny-all", "  action: DENY\n  rules: [{}]\n")).await;
    assert_eq!(h1.get(url, "reviews:9080").await.map(|r| r.status), Some(403));
    assert_eq!(h2_get(&mut h2, "/h2").await, Some(403));
    mesh.write("policy.yaml", "").await;
    assert_eq!(h1.get(url, "reviews:9080").await.map(|r| r.status), Some(200));
    assert_eq!(h2_get(&mut h2, "/h2").await, Some(200));
    assert_eq!(open::grpc_unary(&mut unary, GRPC).await, Some(0));
    assert_eq!(open::grpc_unary_streamed(&mut stream_conn, GRPC).await, Some(0));

    wait_drained(&mesh.server, "rbac_denied").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_drains_plaintext_connections_opened_before_it_through_weft_processes() {
    let mesh = Mesh::start().await;
    let http_inbound = mesh.inbound(mesh.http_app.addr.port()).await;
    let tcp_inbound = mesh.inbound(mesh.tcp_app.addr.port()).await;

    // PERMISSIVE (the default): a plaintext keep-alive HTTP/1.1 connection and a
    // plaintext TCP connection are served.
    let mut h1 = KeepAlive::connect(http_inbound).await.unwrap();
    assert_eq!(h1.get("/a", "reviews").await.map(|r| r.status), Some(200));
    let mut tcp = tokio::net::TcpStream::connect(tcp_inbound).await.unwrap();
    assert_eq!(tcp_ping(&mut tcp).await, b"ping");

    let strict = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec:\n  mtls: {mode: STRICT}\n";
    mesh.write("strict.yaml", strict).await;

    // Both are closed within the drain duration (2 s, plus a margin for a loaded machine).
    let budget = DRAIN + Duration::from_secs(3);
    assert!(h1.closed_within(budget).await, "plaintext HTTP/1.1 connection still open after STRICT");
    let mut buf = [0u8; 8];
    let tcp_end = tokio::time::timeout(budget, tcp.read(&mut buf)).await;
    assert!(matches!(tcp_end, Ok(Ok(0)) | Ok(Err(_))), "plaintext TCP connection still open after STRICT: {tcp_end:?}");
    // New plaintext connections are refused.
    let mut fresh = KeepAlive::connect(http_inbound).await.unwrap();
    assert!(fresh.get("/c", "reviews").await.is_none(), "a new plaintext HTTP connection was served under STRICT");
    // (More bytes than a TLS record header, so the listener can tell it is not TLS.)
    let mut fresh_tcp = tokio::net::TcpStream::connect(tcp_inbound).await.unwrap();
    let _ = fresh_tcp.write_all(b"plaintext, not a ClientHello\n").await;
    let refused = tokio::time::timeout(WAIT, fresh_tcp.read(&mut buf)).await;
    assert!(
        matches!(refused, Ok(Ok(0)) | Ok(Err(_))),
        "a new plaintext TCP connection was served under STRICT: {refused:?}"
    );

    wait_drained(&mesh.server, "filter_chain_changed").await;
}

/// The API's admin token for these tests, where the control plane keeps it.
const ADMIN_TOKEN: &str = "weft-admin.open-connections-test";

fn write_admin_token(data: &Path) {
    std::fs::create_dir_all(data).unwrap();
    std::fs::write(data.join("admin-token"), ADMIN_TOKEN).unwrap();
}
