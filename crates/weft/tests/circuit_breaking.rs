//! Istio's circuit-breaking task through real processes: `weft control` watches a
//! directory holding the task's DestinationRule for httpbin (`maxConnections: 1`,
//! `http1MaxPendingRequests: 1`, `maxRequestsPerConnection: 1`, samples/tasks/...), an
//! httpbin sidecar (`weft proxy`) serves a slow app, and a client sidecar takes a load
//! of concurrency 3: some calls pass, the others are refused by the client sidecar with
//! 503 `UO` and `x-envoy-overloaded`, counted in `istio_requests_total{response_flags="UO"}`
//! and `weft_upstream_rq_pending_overflow`, as the task shows with fortio and Envoy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};
use weft_testkit::echo::EchoServer;
use weft_testkit::http::{get_h1, get_via_proxy};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");
/// How long a test waits for a fact (a process up, a push applied) before failing.
const WAIT: Duration = Duration::from_secs(30);

/// What a `--log-json` process logged: admin and metrics addresses, the last lines.
#[derive(Default)]
struct Logged {
    admin: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
    tail: VecDeque<String>,
}

/// A `weft` child process, killed when dropped.
struct Proc {
    name: &'static str,
    _child: Child,
    log: Arc<Mutex<Logged>>,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command) -> (Proc, Option<tokio::process::ChildStdout>) {
        let mut child = cmd.stderr(Stdio::piped()).kill_on_drop(true).spawn().unwrap();
        let log = follow(child.stderr.take().unwrap());
        let stdout = child.stdout.take();
        (Proc { name, _child: child, log }, stdout)
    }

    fn tail(&self) -> String {
        let l = self.log.lock().unwrap();
        format!("--- {} log tail ---\n{}", self.name, l.tail.iter().cloned().collect::<Vec<_>>().join("\n"))
    }

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

    async fn metrics(&self) -> String {
        let addr = self.logged("its metrics address", |l| l.metrics).await;
        get_h1(addr, "m", "/stats/prometheus").await.unwrap().text()
    }
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
            }
            if l.tail.len() == 40 {
                l.tail.pop_front();
            }
            l.tail.push_back(line);
        }
    });
    log
}

/// `weft proxy` for workload `name`, serving `app_port` inbound when given; returns it
/// once ready, with its outbound (explicit proxy) address.
async fn sidecar(xds: SocketAddr, name: &'static str, app_port: Option<u16>) -> (Proc, SocketAddr) {
    let outbound = weft_testkit::net::reserve_addr();
    let inbound = app_port
        .map(|p| {
            format!(
                "  inbound: \"{}\"\n  ports:\n  - {{name: http, port: {p}, protocol: TCP}}\n",
                weft_testkit::net::reserve_addr()
            )
        })
        .unwrap_or_default();
    let text = format!(
        "node:\n  id: {name}\n  cluster: {name}.default\n  name: {name}\n  namespace: default\n  service_account: {name}\n  labels:\n    app: {name}\n    version: v1\n  outbound: \"{outbound}\"\n{inbound}xds:\n  address: http://{xds}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\n"
    );
    let mut cmd = Command::new(WEFT);
    cmd.args(["--log-json", "proxy", "--bootstrap-yaml", &text]).stdout(Stdio::null());
    let (p, _) = Proc::spawn(name, cmd);
    let admin = p.logged("its admin address", |l| l.admin).await;
    let deadline = Instant::now() + WAIT;
    while !weft_testkit::xds::wait_ready(admin).await {
        assert!(Instant::now() < deadline, "{name} never became ready\n{}", p.tail());
    }
    (p, outbound)
}

/// The sum of the samples of `name` whose line contains `needle`.
fn sample(metrics: &str, name: &str, needle: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn istios_circuit_breaking_task_refuses_part_of_a_concurrency_3_load_with_503_uo() {
    let dir = tempfile::tempdir().unwrap();
    let app = EchoServer::start("httpbin").await;
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: httpbin, namespace: default}}\nspec:\n  selector: {{app: httpbin}}\n  ports:\n  - {{name: http, port: 8000, targetPort: {}}}\n",
        app.addr.port()
    );
    std::fs::write(dir.path().join("httpbin.yaml"), service).unwrap();
    let rule = weft_testkit::conformance("tasks/traffic-management/circuit-breaking-httpbin-destination-rule.yaml");
    std::fs::write(dir.path().join("destination-rule.yaml"), rule).unwrap();

    let mut cmd = Command::new(WEFT);
    cmd.args(["--log-json", "control", "--insecure-dev", "--dir"]).arg(dir.path()).args([
        "--xds",
        "127.0.0.1:0",
        "--api",
        "127.0.0.1:0",
    ]);
    cmd.stdout(Stdio::piped());
    let (control, stdout) = Proc::spawn("weft control", cmd);
    let mut lines = BufReader::new(stdout.unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line()).await.expect("weft control started").unwrap().unwrap();
    let xds: SocketAddr = line.split("xDS on ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();

    let (_httpbin, _) = sidecar(xds, "httpbin", Some(app.addr.port())).await;
    let (client, out) = sidecar(xds, "fortio", None).await;
    // The client knows httpbin's endpoint once a call goes through.
    let deadline = Instant::now() + WAIT;
    while get_via_proxy(out, "http://httpbin:8000/").await.map(|r| r.status != 200).unwrap_or(true) {
        assert!(Instant::now() < deadline, "httpbin never reachable\n{}\n{}", client.tail(), control.tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // fortio load -c 3 -n 30, on a slow endpoint so that calls overlap.
    let workers = (0..3).map(|_| async move {
        let mut replies = Vec::new();
        for _ in 0..10 {
            replies.push(get_via_proxy(out, "http://httpbin:8000/delay/100").await.unwrap());
        }
        replies
    });
    let replies: Vec<_> = futures::future::join_all(workers).await.into_iter().flatten().collect();
    let refused: Vec<_> = replies.iter().filter(|r| r.status == 503).collect();
    let passed = replies.iter().filter(|r| r.status == 200).count();
    assert_eq!(refused.len() + passed, 30, "only 200 and 503");
    assert!(
        passed >= 1 && !refused.is_empty(),
        "{passed} passed, {} refused: the task shows a share of 503",
        refused.len()
    );
    assert!(refused.iter().all(|r| r.header("x-envoy-overloaded") == Some("true")));

    let m = client.metrics().await;
    let uo = sample(&m, "istio_requests_total{", "response_flags=\"UO\"");
    assert_eq!(uo, refused.len() as f64, "{m}");
    let overflow = sample(&m, "weft_upstream_rq_pending_overflow", "httpbin.default.svc.cluster.local");
    assert_eq!(overflow, refused.len() as f64, "{m}");
}
