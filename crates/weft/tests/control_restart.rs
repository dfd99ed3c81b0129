//! A control plane restarted under load: `weft control` (a real process, with a data
//! directory) is stopped and started again on the same address while a client sends a
//! steady stream of requests from one sidecar to another. The callee's sidecar is kept
//! away from the new control plane (a gate on its xDS connection) until the caller has
//! resynced, as a sidecar deep in its reconnect backoff would be: the restored registry
//! must keep the callee an endpoint meanwhile, so no request fails and the caller's
//! endpoint list never loses it.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::get_via_proxy;

const WEFT: &str = env!("CARGO_BIN_EXE_weft");
const WAIT: Duration = Duration::from_secs(30);
const CLA: &str = "outbound|9080||reviews.default.svc.cluster.local";

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: reviews\nspec:\n  selector:\n    app: reviews\n  ports:\n  - name: http\n    port: 9080\n    targetPort: http\n";

/// `weft control` on `dir` and `data`, xDS on `xds` (port 0: any).
async fn start_control(dir: &Path, data: &Path, xds: SocketAddr) -> (tokio::process::Child, SocketAddr, String) {
    let mut control = tokio::process::Command::new(WEFT)
        .args(["control", "--dir"])
        .arg(dir)
        .arg("--data-dir")
        .arg(data)
        .args(["--xds", &xds.to_string(), "--api", "127.0.0.1:0"])
        // Its sidecars have no mesh identity and the test reads the API with curl-like
        // GETs: both opened explicitly (the defaults refuse them).
        .args(["--xds-allow-anonymous", "--api-read-anonymous"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(control.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().unwrap();
    let xds: SocketAddr = line.split("xDS on ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    let api = line.split("API on ").nth(1).unwrap().trim().to_string();
    (control, xds, api)
}

/// Stops `weft control` as an operator or a rollout does (SIGTERM) and waits for it.
async fn stop_control(mut control: tokio::process::Child) {
    let pid = control.id().unwrap().to_string();
    let status = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(WAIT, control.wait()).await.unwrap().unwrap();
    assert!(exit.success(), "weft control exited with {exit}");
}

async fn api_get(api: &str, path: &str) -> serde_json::Value {
    let r = weft_testkit::http::get_h1(api.parse().unwrap(), api, path).await.unwrap();
    assert_eq!(r.status, 200, "{path}: {:?}", r.body);
    serde_json::from_slice(&r.body).unwrap()
}

/// Polls the API until `cond` holds on `path`'s answer.
async fn wait_api(api: &str, path: &str, what: &str, cond: impl Fn(&serde_json::Value) -> bool) {
    let mut last = serde_json::Value::Null;
    for _ in 0..300 {
        last = api_get(api, path).await;
        if cond(&last) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}: {last}");
}

fn registry_source(v: &serde_json::Value, id: &str) -> Option<String> {
    v["workloads"].as_array()?.iter().find(|w| w["id"] == id).map(|w| w["source"].as_str().unwrap_or("").to_string())
}

/// A TCP relay to `target` that can be shut: while shut it refuses (accepts and drops)
/// new connections and cuts the ones it carries.
async fn gate(target: SocketAddr) -> (SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (open, open_rx) = watch::channel(true);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            if !*open_rx.borrow() {
                continue;
            }
            let mut shut = open_rx.clone();
            tokio::spawn(async move {
                let Ok(mut upstream) = TcpStream::connect(target).await else { return };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                    _ = shut.wait_for(|open| !*open) => {}
                }
            });
        }
    });
    (addr, open)
}

async fn proxy(xds: SocketAddr, name: &str, app: Option<SocketAddr>, outbound: SocketAddr) -> ProxyHandle {
    let (labels, ports, inbound) = match app {
        Some(a) => (
            "{app: reviews}",
            format!("  ports:\n  - {{name: http, port: {}, protocol: TCP}}\n", a.port()),
            format!("  inbound: \"{}\"\n", weft_testkit::net::reserve_addr()),
        ),
        None => ("{app: productpage}", String::new(), String::new()),
    };
    let text = format!(
        "node:\n  id: {name}.default\n  name: {name}\n  namespace: default\n  service_account: {name}\n  labels: {labels}\n{ports}{inbound}  outbound: \"{outbound}\"\nxds:\n  address: http://{xds}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\n"
    );
    let p = ProxyHandle::start(Bootstrap::parse(&text, Path::new("bootstrap.yaml")).unwrap()).await.unwrap();
    assert!(p.wait_ready(WAIT).await, "{name} never became ready");
    p
}

fn reviews_endpoints(p: &ProxyHandle) -> usize {
    p.context()
        .store
        .snapshot()
        .raw
        .endpoints
        .get(CLA)
        .map_or(0, |cla| cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum())
}

#[tokio::test]
async fn restarted_control_plane_keeps_unreconnected_endpoints_and_no_request_fails() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("service.yaml"), SERVICE).unwrap();
    let (control, xds, _) = start_control(dir.path(), data.path(), "127.0.0.1:0".parse().unwrap()).await;

    let app = EchoServer::start("reviews-v1").await;
    let (gate_addr, gate_open) = gate(xds).await;
    let _callee = proxy(gate_addr, "reviews-v1", Some(app.addr), weft_testkit::net::reserve_addr()).await;
    let out = weft_testkit::net::reserve_addr();
    let caller = proxy(xds, "productpage-v1", None, out).await;
    for _ in 0..600 {
        if reviews_endpoints(&caller) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(reviews_endpoints(&caller), 1, "the caller never got the callee's endpoint");
    // The registry file holds both before the control plane goes away.
    let file = data.path().join("registry.json");
    for _ in 0..300 {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if text.contains("reviews-v1.default") && text.contains("productpage-v1.default") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Steady load, and a watch on every configuration the caller applies.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let load = tokio::spawn({
        let (stop, ok, sent, failures) = (stop.clone(), ok.clone(), sent.clone(), failures.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                sent.fetch_add(1, Ordering::Relaxed);
                match get_via_proxy(out, "http://reviews:9080/").await {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures.lock().unwrap().push(format!(
                        "status {}: {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    )),
                    Err(e) => failures.lock().unwrap().push(format!("error {e}")),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let fewest = Arc::new(AtomicU64::new(u64::MAX));
    let mut config = caller.context().store.subscribe();
    let watcher = tokio::spawn({
        let (fewest, store) = (fewest.clone(), caller.context().store.clone());
        async move {
            while config.changed().await.is_ok() {
                let n = store
                    .snapshot()
                    .raw
                    .endpoints
                    .get(CLA)
                    .map_or(0, |cla| cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum::<usize>());
                fewest.fetch_min(n as u64, Ordering::Relaxed);
            }
        }
    });
    let requests_before = |n: u64| {
        let sent = sent.clone();
        async move {
            for _ in 0..600 {
                if sent.load(Ordering::Relaxed) >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the load stalled below {n} requests");
        }
    };
    requests_before(20).await;

    // Stop the control plane; keep the callee's sidecar away from its successor.
    stop_control(control).await;
    gate_open.send_replace(false);
    let (control, xds2, api) = start_control(dir.path(), data.path(), xds).await;
    assert_eq!(xds2, xds);
    wait_api(&api, "/api/v1/registry", "the callee restored", |v| {
        registry_source(v, "reviews-v1.default").as_deref() == Some("restored")
    })
    .await;
    // The caller reconnects (within its capped backoff) and ACKs everything the new
    // control plane serves it, while the callee is still away.
    wait_api(&api, "/api/v1/proxies", "the caller synced on the new control plane", |v| {
        v["proxies"].as_array().is_some_and(|ps| {
            ps.iter().any(|p| {
                p["id"] == "productpage-v1.default"
                    && ["Cluster", "Listener", "ClusterLoadAssignment"]
                        .iter()
                        .all(|t| p["types"][*t]["status"] == "SYNCED")
            })
        })
    })
    .await;
    let synced_at = sent.load(Ordering::Relaxed);
    requests_before(synced_at + 30).await;

    // The callee's sidecar comes back: its registration replaces the restored one.
    gate_open.send_replace(true);
    wait_api(&api, "/api/v1/registry", "the callee reconnected", |v| {
        registry_source(v, "reviews-v1.default").as_deref() == Some("proxy") && v["restored"] == 0
    })
    .await;
    let back_at = sent.load(Ordering::Relaxed);
    requests_before(back_at + 20).await;

    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    watcher.abort();
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        sent.load(Ordering::Relaxed),
        &failures[..failures.len().min(5)]
    );
    assert_ne!(fewest.load(Ordering::Relaxed), 0, "the caller's endpoints for reviews were emptied");
    assert_eq!(reviews_endpoints(&caller), 1);
    let cache = api_get(&api, "/api/v1/cache").await;
    assert_eq!(cache["bound"], 1024, "{cache}");
    assert!(cache["entries"].as_u64().is_some_and(|n| (1..=2).contains(&n)), "{cache}");
    stop_control(control).await;
}
