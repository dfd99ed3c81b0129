use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::*;
use crate::telemetry::{Reporter, RequestLabels, RequestProtocol, SecurityPolicy};

#[derive(Default)]
struct FakeState {
    ready: AtomicBool,
    drains: AtomicUsize,
    quits: AtomicUsize,
}

impl AdminState for FakeState {
    fn config_dump(&self) -> serde_json::Value {
        serde_json::json!({"configs": [{"@type": "listeners", "version": "7"}]})
    }
    fn clusters(&self) -> String {
        "outbound|9080||reviews::10.1.2.3:9080::health_flags::healthy\n".into()
    }
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
    fn drain(&self) {
        self.drains.fetch_add(1, Ordering::SeqCst);
    }
    fn quit(&self) {
        self.quits.fetch_add(1, Ordering::SeqCst);
    }
}

struct Response {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// A raw HTTP/1.1 request over a fresh connection.
async fn request(addr: SocketAddr, method: &str, path: &str) -> Response {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers =
        lines.filter_map(|l| l.split_once(": ")).map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())).collect();
    Response { status, headers, body: body.to_string() }
}

async fn start_admin(state: Arc<FakeState>) -> (SocketAddr, oneshot::Sender<()>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_admin(listener, state, async {
        let _ = stopped.await;
    }));
    (addr, stop, task)
}

#[tokio::test]
async fn admin_serves_config_dump_as_json_and_clusters_as_text() {
    let (addr, _stop, _task) = start_admin(Arc::new(FakeState::default())).await;
    let r = request(addr, "GET", "/config_dump").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["configs"][0]["version"], "7");
    let r = request(addr, "GET", "/clusters").await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("10.1.2.3:9080"));
}

#[tokio::test]
async fn admin_ready_flips_with_state() {
    let state = Arc::new(FakeState::default());
    let (addr, _stop, _task) = start_admin(state.clone()).await;
    assert_eq!(request(addr, "GET", "/ready").await.status, 503);
    state.ready.store(true, Ordering::SeqCst);
    let r = request(addr, "GET", "/ready").await;
    assert_eq!((r.status, r.body.trim()), (200, "LIVE"));
    state.ready.store(false, Ordering::SeqCst);
    assert_eq!(request(addr, "GET", "/ready").await.status, 503);
}

#[tokio::test]
async fn admin_drain_and_quit_act_only_on_post() {
    let state = Arc::new(FakeState::default());
    let (addr, _stop, _task) = start_admin(state.clone()).await;
    let r = request(addr, "GET", "/quitquitquit").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "POST");
    assert_eq!(request(addr, "GET", "/drain").await.status, 405);
    assert_eq!(state.quits.load(Ordering::SeqCst), 0);
    assert_eq!(state.drains.load(Ordering::SeqCst), 0);

    assert_eq!(request(addr, "POST", "/quitquitquit").await.status, 200);
    assert_eq!(request(addr, "POST", "/drain").await.status, 200);
    assert_eq!(request(addr, "POST", "/drain_listeners").await.status, 200);
    assert_eq!(state.quits.load(Ordering::SeqCst), 1);
    assert_eq!(state.drains.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn admin_rejects_unknown_paths_and_wrong_methods() {
    let (addr, _stop, _task) = start_admin(Arc::new(FakeState::default())).await;
    assert_eq!(request(addr, "GET", "/nope").await.status, 404);
    assert_eq!(request(addr, "GET", "/stats/prometheus").await.status, 404);
    let r = request(addr, "POST", "/config_dump").await;
    assert_eq!((r.status, r.headers["allow"].as_str()), (405, "GET"));
    assert_eq!(request(addr, "DELETE", "/ready").await.status, 405);
}

#[tokio::test]
async fn admin_stops_accepting_after_shutdown() {
    let (addr, stop, task) = start_admin(Arc::new(FakeState::default())).await;
    assert_eq!(request(addr, "GET", "/clusters").await.status, 200);
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("serve_admin returned").unwrap();
    // The port is free again: binding it succeeds unless another test's port-0 socket
    // happened to take it, in which case whatever answers there is not this admin.
    if tokio::net::TcpListener::bind(addr).await.is_err() {
        let answered_by_admin = async {
            let mut s = TcpStream::connect(addr).await.ok()?;
            s.write_all(b"GET /clusters HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.ok()?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await.ok()?;
            Some(String::from_utf8_lossy(&raw).contains("health_flags::healthy"))
        };
        let answered = tokio::time::timeout(Duration::from_secs(2), answered_by_admin).await.ok().flatten();
        assert_ne!(answered, Some(true), "the admin server still answers after shutdown");
    }
}

#[tokio::test]
async fn metrics_server_serves_prometheus_text_and_readiness() {
    let metrics = Arc::new(Metrics::new());
    let labels = RequestLabels {
        reporter: Reporter::Destination,
        source: Arc::default(),
        destination: Arc::default(),
        service: Arc::default(),
        protocol: RequestProtocol::Http,
        response_code: 404,
        grpc_status: None,
        response_flags: Cow::Borrowed("NR"),
        security_policy: SecurityPolicy::None,
    };
    metrics.record_request(&labels, Duration::from_millis(2), 0, 9);
    let ready = Arc::new(AtomicBool::new(false));
    let probe = ready.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve_metrics(listener, metrics, Arc::new(move || probe.load(Ordering::SeqCst)), async {
        let _ = stopped.await;
    }));

    let r = request(addr, "GET", "/stats/prometheus").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], TEXT_CONTENT_TYPE);
    assert!(r.headers["content-type"].starts_with("text/plain; version=0.0.4"));
    let line = r.body.lines().find(|l| l.starts_with("istio_requests_total{")).expect("request counter served");
    assert!(line.contains("response_code=\"404\"") && line.contains("response_flags=\"NR\""));
    assert!(line.ends_with(" 1"), "{line}");

    assert_eq!(request(addr, "GET", "/healthz/ready").await.status, 503);
    ready.store(true, Ordering::SeqCst);
    assert_eq!(request(addr, "GET", "/healthz/ready").await.status, 200);
    assert_eq!(request(addr, "POST", "/stats/prometheus").await.status, 405);
    assert_eq!(request(addr, "GET", "/config_dump").await.status, 404);
}

fn find_tool(name: &str) -> Option<std::path::PathBuf> {
    let workspace = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let local = workspace.join(".tools/bin").join(name);
    if local.is_file() {
        return Some(local);
    }
    std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file()))
}

/// GET over hyper's HTTP/1 client (handles chunked bodies), returning the JSON body of a
/// 200 response.
async fn get_json(addr: &str, path: &str) -> Option<serde_json::Value> {
    use http_body_util::{BodyExt, Empty};
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get(path).header(header::HOST, addr).body(Empty::<Bytes>::new()).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    if resp.status() != StatusCode::OK {
        return None;
    }
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).ok()
}

/// A real Prometheus scrapes `/stats/prometheus` (`up == 1` proves the scrape parsed)
/// and the Istio series arrive with their labels.
#[tokio::test]
async fn real_prometheus_scrapes_the_metrics_endpoint() {
    use tokio::io::AsyncBufReadExt;
    let prometheus = find_tool("prometheus").expect("prometheus not found: run scripts/setup.sh");

    let metrics = Arc::new(Metrics::new());
    let labels = RequestLabels {
        reporter: Reporter::Destination,
        source: Arc::default(),
        destination: Arc::default(),
        service: Arc::new(crate::telemetry::ServiceInfo {
            host: "reviews.default.svc.cluster.local".into(),
            name: "reviews".into(),
            namespace: "default".into(),
        }),
        protocol: RequestProtocol::Http,
        response_code: 200,
        grpc_status: None,
        response_flags: Cow::Borrowed("-"),
        security_policy: SecurityPolicy::MutualTls,
    };
    metrics.record_request(&labels, Duration::from_millis(3), 10, 20);
    metrics.proxy().config_applied("cds", "1");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve_metrics(listener, metrics, Arc::new(|| true), async {
        let _ = stopped.await;
    }));

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: weft\n    \
             metrics_path: /stats/prometheus\n    static_configs:\n      - targets: [\"{target}\"]\n"
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg("--web.listen-address=127.0.0.1:0")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    // Prometheus logs the address it actually bound, then that it is ready.
    let api = tokio::time::timeout(Duration::from_secs(20), async {
        // The two lines come from different goroutines, in either order.
        let (mut api, mut ready) = (None, false);
        while let Some(line) = log.next_line().await.unwrap() {
            if line.contains("msg=\"Listening on\"") {
                api = Some(line.rsplit("address=").next().unwrap().trim().to_string());
            }
            ready |= line.contains("Server is ready to receive web requests");
            if let (Some(a), true) = (&api, ready) {
                return a.clone();
            }
        }
        panic!("prometheus exited before becoming ready");
    })
    .await
    .expect("prometheus ready");
    // Keep draining its log so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (up, series) = loop {
        let up = get_json(&api, "/api/v1/query?query=up").await;
        let series = get_json(&api, "/api/v1/query?query=istio_requests_total").await;
        if let (Some(up), Some(series)) = (up, series) {
            let scraped = up["data"]["result"].as_array().is_some_and(|r| !r.is_empty());
            if scraped || tokio::time::Instant::now() > deadline {
                break (up, series);
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "Prometheus API never answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "scrape failed: {up}");
    let sample = &series["data"]["result"][0];
    assert_eq!(sample["value"][1], "1", "{series}");
    assert_eq!(sample["metric"]["destination_service_name"], "reviews");
    assert_eq!(sample["metric"]["reporter"], "destination");
    assert_eq!(sample["metric"]["connection_security_policy"], "mutual_tls");
    assert_eq!(sample["metric"]["source_workload"], "unknown");
}
