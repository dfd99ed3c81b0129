//! Proxy memory against mesh size (not a test): one `weft control` process serving N
//! Services (`svc-10..svc-<10+N>`, HTTP port 9080; `svc-17` backed by a WorkloadEntry pointing at
//! an echo server in this process) and one `weft proxy` process (explicit mode) in
//! on-demand delta mode, then in state-of-the-world mode for comparison. Reports the
//! proxy's resident memory (`/proc/PID/status` VmRSS) once ready and after one request to
//! `svc-17:9080`, with what it holds (from `/config_dump`).
//!
//! `cargo build --release -p weft --bin weft --example proxy_rss`, then
//! `./target/release/examples/proxy_rss 10 10000`. Prints one JSON line per run.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use weft_testkit::echo::EchoServer;
use weft_testkit::http::{get_h1, get_via_proxy};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// N Services (`svc-10..svc-<10+N>`, so 10 services include `svc-17`) and the
/// WorkloadEntry behind `svc-17`.
fn mesh(n: usize, backend: SocketAddr) -> String {
    let mut docs: Vec<String> = (10..10 + n)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\n  namespace: default\nspec:\n  selector:\n    app: svc-{i}\n  ports:\n  - name: http\n    port: 9080\n    targetPort: http\n"
            )
        })
        .collect();
    docs.push(format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: svc-17-a\n  namespace: default\nspec:\n  address: {}\n  labels: {{app: svc-17}}\n  ports: {{http: {}}}\n",
        backend.ip(),
        backend.port()
    ));
    docs.join("---\n")
}

async fn start_control(weft: &Path, dir: &Path) -> anyhow::Result<(Child, String)> {
    let mut control = Command::new(weft)
        .args(["control", "--insecure-dev", "--dir"])
        .arg(dir)
        .args(["--xds", "127.0.0.1:0", "--api", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = control.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let line = tokio::io::BufReader::new(stdout)
        .lines()
        .next_line()
        .await?
        .ok_or_else(|| anyhow::anyhow!("control plane exited"))?;
    let xds = line
        .split("xDS on ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .ok_or_else(|| anyhow::anyhow!("{line}"))?
        .to_string();
    Ok((control, xds))
}

/// One run: RSS of a proxy in `mode` against a mesh of `n` services.
async fn run(weft: &Path, n: usize, delta: bool, backend: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("mesh.yaml"), mesh(n, backend))?;
    let (_control, xds) = start_control(weft, dir.path()).await?;
    let (admin, outbound) = (weft_testkit::net::reserve_addr(), weft_testkit::net::reserve_addr());
    let bootstrap = dir.path().join("bootstrap.yaml");
    std::fs::write(
        &bootstrap,
        format!(
            "node:\n  id: client.default\n  name: client\n  namespace: default\n  labels: {{app: client}}\n  outbound: \"{outbound}\"\nxds:\n  address: http://{xds}\n  mode: {}\nadmin: {admin}\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\n",
            if delta { "delta" } else { "sotw" }
        ),
    )?;
    let proxy = Command::new(weft)
        .arg("proxy")
        .arg("--bootstrap")
        .arg(&bootstrap)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = proxy.id().unwrap_or(0);
    let started = Instant::now();
    loop {
        if get_h1(admin, "admin", "/ready").await.is_ok_and(|r| r.status == 200) {
            break;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(120), "proxy never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_ready = rss_kib(pid);
    let reply = get_via_proxy(outbound, "http://svc-17:9080/").await?;
    anyhow::ensure!(reply.status == 200, "request to svc-17 failed: {}", reply.status);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = rss_kib(pid);
    let dump: serde_json::Value = serde_json::from_slice(&get_h1(admin, "admin", "/config_dump").await?.body)?;
    let count = |key: &str| dump[key].as_array().map_or(0, Vec::len);
    let vhosts: usize = dump["routes"]
        .as_array()
        .map_or(0, |rs| rs.iter().map(|r| r["virtual_hosts"].as_array().map_or(0, Vec::len)).sum());
    Ok(serde_json::json!({
        "services": n,
        "mode": if delta { "delta on-demand" } else { "sotw" },
        "ready_s": ready_s,
        "proxy_rss_mib": { "ready": rss_ready as f64 / 1024.0, "after_request": rss_after as f64 / 1024.0 },
        "held": { "listeners": count("listeners"), "virtual_hosts": vhosts, "clusters": count("clusters") },
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::args().skip(1).map(|s| s.parse()).collect::<Result<_, _>>()?;
    let sizes = if sizes.is_empty() { vec![10, 10_000] } else { sizes };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let weft = root.join("target/release/weft");
    anyhow::ensure!(weft.is_file(), "build it first: cargo build --release -p weft");
    let backend = EchoServer::start("svc-17").await;
    for delta in [true, false] {
        for n in &sizes {
            println!("{}", run(&weft, *n, delta, backend.addr).await?);
        }
    }
    Ok(())
}
