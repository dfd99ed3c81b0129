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
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    Response {
        status,
        headers,
        body: body.to_string(),
    }
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
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("serve_admin returned")
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err());
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
    tokio::spawn(serve_metrics(
        listener,
        metrics,
        Arc::new(move || probe.load(Ordering::SeqCst)),
        async {
            let _ = stopped.await;
        },
    ));

    let r = request(addr, "GET", "/stats/prometheus").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], TEXT_CONTENT_TYPE);
    assert!(r.headers["content-type"].starts_with("text/plain; version=0.0.4"));
    let line = r
        .body
        .lines()
        .find(|l| l.starts_with("istio_requests_total{"))
        .expect("request counter served");
    assert!(line.contains("response_code=\"404\"") && line.contains("response_flags=\"NR\""));
    assert!(line.ends_with(" 1"), "{line}");

    assert_eq!(request(addr, "GET", "/healthz/ready").await.status, 503);
    ready.store(true, Ordering::SeqCst);
    assert_eq!(request(addr, "GET", "/healthz/ready").await.status, 200);
    assert_eq!(request(addr, "POST", "/stats/prometheus").await.status, 405);
    assert_eq!(request(addr, "GET", "/config_dump").await.status, 404);
}
