//! Control-plane scale benchmark (not a test): N simulated proxies (ADS clients, in this
//! process) against one `weft control` process serving Bookinfo. Measures the time from a
//! config change (`weft apply` of a VirtualService) until every proxy has received and
//! ACKed the new routes, and the control plane's resident memory.
//!
//! `cargo run --release -p weft --example xds_scale -- 1000` (builds `weft` first:
//! `cargo build --release -p weft`). Prints one JSON line per run.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weft_xds::{type_url, AdsClient, Backoff, ClientConfig, NodeInfo, ResourceHandler, ResourceUpdate, XdsMode};

/// Accepts everything; notes when a ROUTE update arrives after the change.
struct Sim {
    changed_at: Arc<Mutex<Option<Instant>>>,
    latencies: Arc<Mutex<Vec<Duration>>>,
    synced: Arc<AtomicUsize>,
    seen_initial: Mutex<bool>,
}

impl ResourceHandler for Sim {
    fn type_urls(&self) -> Vec<&'static str> {
        vec![type_url::CLUSTER, type_url::ENDPOINT, type_url::LISTENER, type_url::ROUTE]
    }
    fn apply(&self, type_url: &str, _u: ResourceUpdate) -> Result<(), String> {
        if type_url == type_url::ROUTE {
            let mut first = self.seen_initial.lock().unwrap_or_else(|p| p.into_inner());
            if !*first {
                *first = true;
                self.synced.fetch_add(1, Ordering::Relaxed);
            } else if let Some(t0) = *self.changed_at.lock().unwrap_or_else(|p| p.into_inner()) {
                self.latencies.lock().unwrap_or_else(|p| p.into_inner()).push(t0.elapsed());
            }
        }
        Ok(())
    }
    fn interest(&self, type_url: &str) -> Option<BTreeSet<String>> {
        match type_url {
            // Ask for every route and endpoint name the explicit-mode translator emits.
            type_url::ROUTE => Some(["weft-outbound".to_string(), "9080".to_string()].into()),
            type_url::ENDPOINT => Some(
                ["details", "productpage", "ratings", "reviews"]
                    .iter()
                    .map(|s| format!("outbound|9080||{s}.default.svc.cluster.local"))
                    .collect(),
            ),
            _ => None,
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let weft = root.join("target/release/weft");
    anyhow::ensure!(weft.is_file(), "build it first: cargo build --release -p weft");
    let bookinfo = root.join("samples/bookinfo");
    let dir = tempfile::tempdir()?;
    for f in [
        "platform/kube/bookinfo.yaml",
        "networking/destination-rule-all.yaml",
        "networking/virtual-service-all-v1.yaml",
    ] {
        let src: PathBuf = bookinfo.join(f);
        std::fs::copy(&src, dir.path().join(src.file_name().unwrap_or_default()))?;
    }
    let mut control = tokio::process::Command::new(&weft)
        .args(["control", "--dir"])
        .arg(dir.path())
        .args(["--xds", "127.0.0.1:0", "--api", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = control.id().unwrap_or(0);
    use tokio::io::AsyncBufReadExt;
    let mut lines =
        tokio::io::BufReader::new(control.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?).lines();
    let line = lines.next_line().await?.ok_or_else(|| anyhow::anyhow!("control plane exited"))?;
    let xds = line
        .split("xDS on ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .ok_or_else(|| anyhow::anyhow!("{line}"))?
        .to_string();
    let api = line.split("API on ").nth(1).ok_or_else(|| anyhow::anyhow!("{line}"))?.trim().to_string();
    let rss_idle = rss_kib(pid);

    let changed_at = Arc::new(Mutex::new(None));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let synced = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    for i in 0..n {
        let node = NodeInfo {
            id: format!("sim-{i}"),
            name: format!("productpage-{i}"),
            namespace: "default".into(),
            labels: [("app".to_string(), "productpage".to_string())].into(),
            ..NodeInfo::default()
        };
        let handler = Arc::new(Sim {
            changed_at: changed_at.clone(),
            latencies: latencies.clone(),
            synced: synced.clone(),
            seen_initial: Mutex::new(false),
        });
        let client = AdsClient::new(
            ClientConfig { address: format!("http://{xds}"), node, mode: XdsMode::Sotw, backoff: Backoff::default() },
            handler,
        );
        tokio::spawn(client.run(std::future::pending()));
        if i % 200 == 199 {
            tokio::task::yield_now().await;
        }
    }
    while synced.load(Ordering::Relaxed) < n {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "only {} of {n} synced",
            synced.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let initial_sync = started.elapsed();
    let rss_connected = rss_kib(pid);

    // The change: reviews to v2, through the API.
    let vs = dir.path().join("change.yaml");
    std::fs::write(&vs, "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination:\n        host: reviews\n        subset: v2\n")?;
    *changed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    let status =
        tokio::process::Command::new(&weft).args(["apply", "-f"]).arg(&vs).args(["--server", &api]).output().await?;
    anyhow::ensure!(status.status.success(), "apply failed: {}", String::from_utf8_lossy(&status.stderr));
    let t0 = Instant::now();
    while latencies.lock().unwrap_or_else(|p| p.into_inner()).len() < n {
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(600), "change did not reach everyone");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut l = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    l.sort();
    println!(
        "{}",
        serde_json::json!({
            "clients": n,
            "initial_sync_s": initial_sync.as_secs_f64(),
            "change_to_all_acked_ms": { "p50": pct(&l, 0.5), "p99": pct(&l, 0.99), "max": pct(&l, 1.0) },
            "control_plane_rss_mib": { "idle": rss_idle as f64 / 1024.0, "connected": rss_connected as f64 / 1024.0, "after_change": rss_kib(pid) as f64 / 1024.0 },
        })
    );
    Ok(())
}
