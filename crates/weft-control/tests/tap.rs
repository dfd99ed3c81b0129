//! `weft tap` end to end: a control plane with its CA and two real weft sidecars
//! (`productpage-v1` calling `reviews-v2` over mTLS). A tap on `GET /api/v1/tap` streams
//! each matching request once with its fields, leaves out what its filters exclude,
//! never shows header values, drops and reports over `max_rps`, and ends on every proxy
//! when its client goes away.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mesh;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use weft_control::control::ControlPlane;
use weft_control::identity::IdentityConfig;
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::{get_h1, send_h1};
use weft_testkit::net::reserve_addr;

const WAIT: Duration = Duration::from_secs(30);
const BURST: usize = 50;
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews";

/// A weft sidecar with a mesh identity for the workload `workload` (pod `<workload>-abcde`).
async fn sidecar(cp: &ControlPlane, workload: &str, app: &str, sa: &str, extra: &str) -> ProxyHandle {
    let token = mesh::join_token(cp, "default", sa).await;
    let text = format!(
        "node:\n  id: sidecar~127.0.0.1~{workload}-abcde.default~default.svc.cluster.local\n  cluster: {app}.default\n  name: {workload}-abcde\n  workload_name: {workload}\n  namespace: default\n  service_account: {sa}\n  labels:\n    app: {app}\n  outbound: {}\n{extra}xds:\n  address: http://{}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\ndrain_timeout: 1s\nidentity:\n  token: \"{token}\"\n",
        reserve_addr(),
        cp.xds_addr,
    );
    let b = Bootstrap::parse(&text, Path::new("sidecar.yaml")).unwrap();
    let p = ProxyHandle::start(b).await.unwrap();
    assert!(p.wait_ready(WAIT).await, "{workload} never became ready");
    p
}

struct Mesh {
    cp: ControlPlane,
    reviews: ProxyHandle,
    productpage: ProxyHandle,
    out: SocketAddr,
    _app: EchoServer,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn mesh() -> Mesh {
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let app = EchoServer::start("reviews-app").await;
    let resources = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  selector: {{app: reviews}}\n  ports: [{{name: http, port: 9080, targetPort: {http}}}]\n",
        http = app.addr.port(),
    );
    std::fs::write(dir.path().join("mesh.yaml"), resources).unwrap();
    let mut identity = IdentityConfig::new(data.path());
    identity.cert_ttl = Duration::from_secs(3600);
    let cp = mesh::control_plane(Some(dir.path()), identity).await;
    let ports = format!(
        "  ports:\n  - {{name: http, port: {}, protocol: TCP}}\n  inbound: {}\n",
        app.addr.port(),
        reserve_addr()
    );
    let reviews = sidecar(&cp, "reviews-v2", "reviews", "bookinfo-reviews", &ports).await;
    let productpage = sidecar(&cp, "productpage-v1", "productpage", "bookinfo-productpage", "").await;
    let out = productpage.listener_addr("weft-outbound", WAIT).await.unwrap();
    let m = Mesh { cp, reviews, productpage, out, _app: app, _dirs: (data, dir) };
    let deadline = Instant::now() + WAIT;
    while m.call("GET", "/warmup", &[]).await != 200 {
        assert!(Instant::now() < deadline, "reviews never answered through both sidecars");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    m
}

impl Mesh {
    /// The control plane's admin token (tap is admin only).
    fn token(&self) -> Option<&str> {
        self.cp.admin_token.as_ref().map(|(t, _)| t.as_str())
    }

    /// `method http://reviews:9080{path}` through productpage's sidecar; the status.
    async fn call(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> u16 {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://reviews:9080{path}"))
            .header(http::header::HOST, "reviews:9080");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        match send_h1(self.out, req.body(Full::new(Bytes::new())).unwrap()).await {
            Ok(r) => r.status.as_u16(),
            Err(_) => 0,
        }
    }

    /// Opens a tap once every proxy of the target has its tap stream up (until then
    /// the API answers 404).
    async fn tap(&self, query: &str) -> Tap {
        let deadline = Instant::now() + WAIT;
        loop {
            match Tap::open(self.cp.api_addr, query, self.token()).await {
                Ok(t) => return t,
                Err(e) => assert!(Instant::now() < deadline, "tap {query} never started: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `weft_tap_active` on `p`'s metrics page.
async fn tap_active(p: &ProxyHandle) -> i64 {
    let text = get_h1(p.metrics_addr(), "m", "/stats/prometheus").await.unwrap().text();
    let line = text.lines().find(|l| l.starts_with("weft_tap_active ")).expect("weft_tap_active is exported");
    line["weft_tap_active ".len()..].trim().parse().unwrap()
}

async fn wait_tap_active(p: &ProxyHandle, want: i64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = tap_active(p).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "weft_tap_active stayed {got}, want {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A streaming `GET /api/v1/tap` client.
struct Tap {
    body: hyper::body::Incoming,
    buf: String,
    /// Everything received so far.
    text: String,
    conn: tokio::task::JoinHandle<()>,
}

impl Tap {
    async fn open(api: SocketAddr, query: &str, token: Option<&str>) -> Result<Tap, String> {
        let stream = tokio::net::TcpStream::connect(api).await.map_err(|e| e.to_string())?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = http::Request::get(format!("/api/v1/tap?{query}")).header(http::header::HOST, "weft");
        if let Some(t) = token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::new())).unwrap();
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        if resp.status() != 200 {
            let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            conn.abort();
            return Err(String::from_utf8_lossy(&body).into_owned());
        }
        let mut tap = Tap { body: resp.into_body(), buf: String::new(), text: String::new(), conn };
        let first = tap.line().await;
        assert!(first["tap"]["proxies"].as_array().is_some_and(|p| !p.is_empty()), "first line: {first}");
        Ok(tap)
    }

    /// The next line, parsed.
    async fn line(&mut self) -> Value {
        loop {
            if let Some(i) = self.buf.find('\n') {
                let line: String = self.buf.drain(..=i).collect();
                return serde_json::from_str(line.trim_end()).unwrap();
            }
            let frame = tokio::time::timeout(WAIT, self.body.frame())
                .await
                .expect("a tap line in time")
                .expect("the tap stream is open")
                .expect("the tap stream reads");
            if let Ok(data) = frame.into_data() {
                let s = String::from_utf8_lossy(&data).into_owned();
                self.text.push_str(&s);
                self.buf.push_str(&s);
            }
        }
    }

    /// Events up to and including the one for `path` (other lines skipped).
    async fn events_until(&mut self, path: &str) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let l = self.line().await;
            if let Some(ev) = l.get("event") {
                events.push(ev.clone());
                if ev["path"] == path {
                    return events;
                }
            }
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_streams_each_matching_request_once_with_its_fields_and_no_header_values() {
    let m = mesh().await;
    assert_eq!(tap_active(&m.reviews).await, 0, "no tap before one is asked for");

    let mut tap = m.tap("target=deploy/reviews-v2&path=%2Ftapped").await;
    wait_tap_active(&m.reviews, 1).await;
    assert_eq!(tap_active(&m.productpage).await, 0, "the client's proxy is not a target");
    let secret = [("authorization", "Bearer s3cret-bearer"), ("cookie", "session=c00kie-value")];
    assert_eq!(m.call("GET", "/tapped/one?token=qu3ry-secret", &secret).await, 200);
    assert_eq!(m.call("GET", "/other", &[]).await, 200);
    // The proxy sends its events in order: the sentinel comes after anything earlier.
    assert_eq!(m.call("GET", "/tapped/sentinel", &[]).await, 200);
    let events = tap.events_until("/tapped/sentinel").await;
    let one: Vec<&Value> = events.iter().filter(|e| e["path"] == "/tapped/one").collect();
    assert_eq!(one.len(), 1, "exactly one event for the request: {events:#?}");
    assert!(events.iter().all(|e| e["path"] != "/other"), "the path filter excludes /other: {events:#?}");
    let ev = one[0];
    assert_eq!(ev["direction"], "inbound");
    assert_eq!(ev["method"], "GET");
    assert_eq!(ev["status"], 200);
    assert_eq!(ev["tls"], true, "the hop was mTLS: {ev}");
    assert_eq!(ev["source"]["workload"], "productpage-v1");
    assert_eq!(ev["source"]["principal"], CLIENT_ID);
    assert_eq!(ev["destination"]["workload"], "reviews-v2");
    assert_eq!(ev["destination"]["principal"], SERVER_ID);
    assert_eq!(ev["service"], "reviews.default.svc.cluster.local");
    assert_eq!(ev["flags"], "-");
    assert!(ev["latency_ms"].as_f64().is_some_and(|l| l > 0.0), "{ev}");
    for secret in ["s3cret-bearer", "c00kie-value", "qu3ry-secret"] {
        assert!(!tap.text.contains(secret), "{secret} leaked into the tap output:\n{}", tap.text);
    }

    // A Service target, with method and direction filters.
    let mut by_service = m.tap("target=svc/reviews&method=POST&direction=in").await;
    wait_tap_active(&m.reviews, 2).await;
    assert_eq!(m.call("GET", "/get-excluded", &[]).await, 200);
    assert_eq!(m.call("POST", "/posted", &[]).await, 200);
    let events = by_service.events_until("/posted").await;
    assert_eq!(events.len(), 1, "only the POST: {events:#?}");
    assert_eq!(events[0]["method"], "POST");

    // Clients going away end their taps on the proxy.
    drop(tap);
    wait_tap_active(&m.reviews, 1).await;
    drop(by_service);
    wait_tap_active(&m.reviews, 0).await;
    m.reviews.shutdown().await;
    m.productpage.shutdown().await;
    m.cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_over_max_rps_drops_and_reports_the_count() {
    let m = mesh().await;
    let mut tap = m.tap("target=deploy/reviews-v2&max_rps=1").await;
    wait_tap_active(&m.reviews, 1).await;
    // A concurrent burst of 50: unless it is spread over more than 49 s, some second
    // holds two of its events, one over max_rps.
    let mut burst = tokio::task::JoinSet::new();
    let out = m.out;
    for i in 0..BURST {
        burst.spawn(async move {
            let req = http::Request::get(format!("http://reviews:9080/burst/{i}"))
                .header(http::header::HOST, "reviews:9080")
                .body(Full::new(Bytes::new()))
                .unwrap();
            send_h1(out, req).await.map(|r| r.status.as_u16()).unwrap_or(0)
        });
    }
    while let Some(status) = burst.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let mut events = 0;
    let dropped = loop {
        let l = tap.line().await;
        if l.get("event").is_some() {
            events += 1;
        }
        if let Some(total) = l["total_dropped"].as_u64() {
            break total;
        }
    };
    assert!(dropped >= 1, "a burst over max_rps drops");
    assert!(events < BURST, "not every event of the burst was relayed ({events})");
    drop(tap);
    wait_tap_active(&m.reviews, 0).await;
    // Shut down the proxies before the control plane.
    m.reviews.shutdown().await;
    m.productpage.shutdown().await;
    m.cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_refuses_callers_without_the_admin_token_unknown_targets_and_bad_filters_and_serves_its_page() {
    let m = mesh().await;
    let (api, token) = (m.cp.api_addr, m.token());
    assert!(token.is_some(), "a control plane with a data directory has an admin token");
    let err = Tap::open(api, "target=deploy/reviews-v2", None).await.err().expect("no admin token: refused");
    assert!(err.contains("needs the admin credential"), "{err}");
    let err = Tap::open(api, "target=deploy/reviews-v2", Some("wrong")).await.err().expect("a wrong token: refused");
    assert!(err.contains("not valid"), "{err}");
    let err = Tap::open(api, "target=deploy/nobody", token).await.err().expect("no proxy: refused");
    assert!(err.contains("no connected proxy of deploy/nobody"), "{err}");
    let err = Tap::open(api, "target=svc/ghost", token).await.err().expect("no service: refused");
    assert!(err.contains("no service ghost"), "{err}");
    let err = Tap::open(api, "target=deploy/reviews-v2&status=abc", token).await.err().expect("bad status");
    assert!(err.contains("expected an HTTP status code"), "{err}");
    // The dashboard's page streams the same endpoint, with nothing from outside.
    let req = weft_testkit::http::request(http::Method::GET, "weft", "/dashboard/tap", Bytes::new()).unwrap();
    let page = send_h1(api, mesh::admin(&m.cp, req)).await.unwrap();
    assert_eq!(page.status, 200);
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    let html = page.text();
    assert!(html.contains("fetch(\"/api/v1/tap?\""), "{html}");
    assert!(!html.contains("http://") && !html.contains("https://"), "no external resources");
    m.reviews.shutdown().await;
    m.productpage.shutdown().await;
    m.cp.shutdown().await;
}

/// Opens a tap stream as `node_id` with `authorization`; the status it ends with.
async fn tap_stream_status(xds: SocketAddr, node_id: &str, authorization: Option<String>) -> tonic::Status {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{xds}")).unwrap().connect().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let hello = weft_xds::tap::TapUpdate { node_id: node_id.to_string(), ..Default::default() };
    tx.send(hello).await.unwrap();
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    match weft_xds::tap::open(channel, authorization, stream).await {
        Err(status) => status,
        Ok(mut commands) => {
            let next = tokio::time::timeout(WAIT, commands.message()).await.expect("an answer in time");
            next.expect_err("the stream is refused")
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tap_stream_needs_the_credential_of_the_node_it_names() {
    let m = mesh().await;
    let reviews = "sidecar~127.0.0.1~reviews-v2-abcde.default~default.svc.cluster.local";
    let status = tap_stream_status(m.cp.xds_addr, reviews, None).await;
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    // productpage's credential cannot take reviews' tap stream.
    let token = mesh::join_token(&m.cp, "default", "bookinfo-productpage").await;
    let status = tap_stream_status(m.cp.xds_addr, reviews, Some(format!("Bearer {token}"))).await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let status = tap_stream_status(m.cp.xds_addr, "nobody", Some(format!("Bearer {token}"))).await;
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    m.reviews.shutdown().await;
    m.productpage.shutdown().await;
    m.cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_on_the_tls_xds_port_is_tapped_over_its_mtls_channel() {
    let data = tempfile::tempdir().unwrap();
    let mut identity = IdentityConfig::new(data.path());
    identity.xds_tls = Some("127.0.0.1:0".parse().unwrap());
    let cp = mesh::control_plane(None, identity).await;
    let tls = cp.xds_tls_addr.expect("the TLS port is bound");
    let token = mesh::join_token(&cp, "default", "bookinfo-reviews").await;
    let root_file = data.path().join("mesh-root.pem");
    std::fs::write(&root_file, cp.identity.as_ref().unwrap().ca().trust_bundle_pem()).unwrap();
    let text = format!(
        "node:\n  id: reviews-tls\n  name: reviews-tls\n  workload_name: reviews-tls\n  namespace: default\n  service_account: bookinfo-reviews\n  labels:\n    app: reviews\n  outbound: {}\nxds:\n  address: https://{tls}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\ndrain_timeout: 1s\nidentity:\n  token: \"{token}\"\n  root_cert_file: {}\n",
        reserve_addr(),
        root_file.display()
    );
    let p = ProxyHandle::start(Bootstrap::parse(&text, Path::new("sidecar.yaml")).unwrap()).await.unwrap();
    assert!(p.wait_ready(WAIT).await, "the proxy on the TLS port never became ready");
    let token = cp.admin_token.as_ref().map(|(t, _)| t.clone());
    let deadline = Instant::now() + WAIT;
    let tap = loop {
        match Tap::open(cp.api_addr, "target=deploy/reviews-tls", token.as_deref()).await {
            Ok(t) => break t,
            Err(e) => assert!(Instant::now() < deadline, "the tap never reached the proxy: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    wait_tap_active(&p, 1).await;
    drop(tap);
    wait_tap_active(&p, 0).await;
    p.shutdown().await;
    cp.shutdown().await;
}
