//! `weft-bench run`: every scenario, round after round, then mesh size, startup and
//! control-plane scale; writes the raw results as JSON.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context};
use serde::{Deserialize, Serialize};

use crate::load::{self, RunResult};
use crate::procs::{command, Pinning, Proc, ProcStats};
use crate::stack::{Apps, Kind, ProxyOptions, Stack, Tools};

/// What `run` measures and how long.
#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// Rounds: every scenario once per round (medians and spread are over rounds).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Requests per second of the fixed-rate runs.
    #[arg(long, default_value_t = 1000)]
    pub rps: u32,
    /// Connections of the load generator.
    #[arg(long, default_value_t = 16)]
    pub conns: usize,
    /// Warm-up before each measured fixed-rate run, seconds.
    #[arg(long, default_value_t = 5)]
    pub warmup_secs: u64,
    /// Measured HTTP/1.1 fixed-rate run, seconds.
    #[arg(long, default_value_t = 30)]
    pub h1_secs: u64,
    /// Measured gRPC fixed-rate run, seconds.
    #[arg(long, default_value_t = 10)]
    pub grpc_secs: u64,
    /// Measured maximum-throughput run, seconds (after a 1 s warm-up).
    #[arg(long, default_value_t = 5)]
    pub max_secs: u64,
    /// Worker threads per proxy.
    #[arg(long, default_value_t = 1)]
    pub workers: u32,
    /// Scenarios to run (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "baseline,weft,envoy,haproxy")]
    pub scenarios: Vec<String>,
    /// Mesh sizes (services) for the proxy-memory run; empty to skip.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "10,10000")]
    pub mesh_sizes: Vec<usize>,
    /// Simulated proxies for the control-plane scale run; empty to skip.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "1000,10000")]
    pub cp_clients: Vec<usize>,
    /// The release `weft` binary.
    #[arg(long, default_value = "target/release/weft")]
    pub weft: PathBuf,
    /// The proxy-only binary the weft sidecars run (`cargo build --release -p weft-proxy
    /// --bin weft-proxy`), as Envoy's sidecars run Envoy's own binary. The bench scripts
    /// set `WEFT_BENCH_PROXY` to the shipped build (`scripts/build-proxy.sh`: laid out by BOLT).
    #[arg(long, env = "WEFT_BENCH_PROXY", default_value = "target/release/weft-proxy")]
    pub weft_proxy: PathBuf,
    /// The control-plane scale example (`cargo build --release -p weft --example xds_scale`).
    #[arg(long, default_value = "target/release/examples/xds_scale")]
    pub xds_scale: PathBuf,
    /// Envoy (default: `$WEFT_ENVOY`, else `.tools/bin/envoy`).
    #[arg(long)]
    pub envoy: Option<PathBuf>,
    /// HAProxy (default: `haproxy` on PATH or /usr/sbin/haproxy).
    #[arg(long)]
    pub haproxy: Option<PathBuf>,
    /// Where to write `<date>.json` (and `latest.json`).
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
}

/// Everything one `run` measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub date: String,
    pub machine: serde_json::Value,
    pub settings: serde_json::Value,
    pub scenarios: Vec<ScenarioRun>,
    pub mesh_size: Vec<serde_json::Value>,
    pub control_plane: Vec<serde_json::Value>,
    pub duration_s: f64,
    /// Seconds `bench/run.sh` spent on set-up and the release build before the harness
    /// started (`WEFT_BENCH_PREPARE_SECS`); `None` when the harness ran on its own.
    #[serde(default)]
    pub prepare_s: Option<f64>,
}

/// One scenario in one round.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScenarioRun {
    pub kind: Kind,
    pub round: usize,
    pub http1: RunResult,
    pub grpc: RunResult,
    pub max: RunResult,
    pub proxies: Vec<ProxyFigures>,
    /// The proxies' own counters that prove the load went through them over mTLS.
    pub evidence: serde_json::Value,
}

/// One proxy in one round.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProxyFigures {
    pub role: String,
    /// CPU seconds per 10,000 requests at the fixed HTTP/1.1 rate.
    pub cpu_s_per_10k_http1: f64,
    /// CPU seconds per 10,000 calls at the fixed gRPC rate.
    pub cpu_s_per_10k_grpc: f64,
    /// CPU seconds per 10,000 requests at maximum throughput.
    pub cpu_s_per_10k_max: f64,
    /// Peak RSS (VmHWM) after the fixed-rate runs, MiB.
    pub peak_rss_mib: f64,
    /// Peak RSS after the maximum-throughput run too, MiB.
    pub peak_rss_after_max_mib: f64,
    /// Spawn to ready, ms.
    pub ready_ms: Option<f64>,
}

fn cpu_per_10k(before: &[ProcStats], after: &[ProcStats], i: usize, requests: u64) -> f64 {
    let d = after.get(i).map_or(0.0, |a| a.cpu_s) - before.get(i).map_or(0.0, |b| b.cpu_s);
    if requests == 0 {
        0.0
    } else {
        d / requests as f64 * 10_000.0
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

async fn one_scenario(
    kind: Kind,
    round: usize,
    args: &RunArgs,
    tools: &Tools,
    apps: Apps,
    pin: &Pinning,
) -> anyhow::Result<ScenarioRun> {
    let stack = Stack::start(kind, tools, apps, pin, ProxyOptions { workers: args.workers }).await?;
    let name = kind.name();
    let fail = |what: &str, e: anyhow::Error| anyhow!("{name} round {round}: {what}: {e:#}{}", stack.logs());
    let mut total = 0u64;
    let warm = Duration::from_secs(args.warmup_secs);

    total +=
        load::h1_fixed_rate(&stack.h1, args.rps, args.conns, warm).await.map_err(|e| fail("HTTP/1.1 warm-up", e))?.ok;
    let s0 = stack.stats()?;
    let http1 = load::h1_fixed_rate(&stack.h1, args.rps, args.conns, Duration::from_secs(args.h1_secs))
        .await
        .map_err(|e| fail("HTTP/1.1 at a fixed rate", e))?;
    let s1 = stack.stats()?;
    total += http1.ok;

    total += load::grpc_fixed_rate(&stack.grpc, args.rps, args.conns, Duration::from_secs(2))
        .await
        .map_err(|e| fail("gRPC warm-up", e))?
        .ok;
    let g0 = stack.stats()?;
    let grpc = load::grpc_fixed_rate(&stack.grpc, args.rps, args.conns, Duration::from_secs(args.grpc_secs))
        .await
        .map_err(|e| fail("gRPC at a fixed rate", e))?;
    let g1 = stack.stats()?;
    total += grpc.ok;

    total += load::h1_max(&stack.h1, args.conns, Duration::from_secs(1)).await.map_err(|e| fail("max warm-up", e))?.ok;
    let m0 = stack.stats()?;
    let max = load::h1_max(&stack.h1, args.conns, Duration::from_secs(args.max_secs))
        .await
        .map_err(|e| fail("maximum throughput", e))?;
    let m1 = stack.stats()?;
    total += max.ok;

    let evidence = stack.verify(total).await.map_err(|e| fail("verification", e))?;
    let proxies = stack
        .proxies
        .iter()
        .enumerate()
        .map(|(i, p)| ProxyFigures {
            role: p.role.to_string(),
            cpu_s_per_10k_http1: cpu_per_10k(&s0, &s1, i, http1.ok),
            cpu_s_per_10k_grpc: cpu_per_10k(&g0, &g1, i, grpc.ok),
            cpu_s_per_10k_max: cpu_per_10k(&m0, &m1, i, max.ok),
            peak_rss_mib: g1.get(i).map_or(0.0, |s| mib(s.hwm_kib)),
            peak_rss_after_max_mib: m1.get(i).map_or(0.0, |s| mib(s.hwm_kib)),
            ready_ms: p.ready_ms,
        })
        .collect();
    eprintln!(
        "bench: {name:>8} round {round}: HTTP/1.1 p50 {:.0} us p99 {:.0} us p99.9 {:.0} us | gRPC p50 {:.0} us p99 {:.0} us | max {:.0} rps | verified {total} requests",
        http1.latency_us.p50, http1.latency_us.p99, http1.latency_us.p999, grpc.latency_us.p50, grpc.latency_us.p99, max.rps
    );
    Ok(ScenarioRun { kind, round, http1, grpc, max, proxies, evidence })
}

fn machine() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model =
        cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|s| s.trim_start_matches([' ', '\t', ':']));
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|s| s.trim_matches('"').to_string());
    serde_json::json!({
        "cpu": model,
        "cpus": crate::procs::online_cpus(),
        "memory_gib": mem_kib as f64 / 1024.0 / 1024.0,
        "os": os,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

async fn version(program: &Path, arg: &str) -> String {
    match tokio::process::Command::new(program).arg(arg).output().await {
        Ok(o) => {
            let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            text.lines().find(|l| !l.trim().is_empty()).unwrap_or_default().trim().to_string()
        }
        Err(e) => format!("unknown ({e})"),
    }
}

fn tools(args: &RunArgs) -> anyhow::Result<Tools> {
    ensure!(args.weft.is_file(), "{} not found: build it with `cargo build --release -p weft`", args.weft.display());
    ensure!(
        args.weft_proxy.is_file(),
        "{} not found: build it with `cargo build --release -p weft-proxy --bin weft-proxy`",
        args.weft_proxy.display()
    );
    let envoy = args
        .envoy
        .clone()
        .or_else(|| std::env::var_os("WEFT_ENVOY").filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(".tools/bin/envoy"));
    let haproxy = args
        .haproxy
        .clone()
        .or_else(|| crate::procs::which("haproxy"))
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/haproxy"));
    let wanted = |k: &str| args.scenarios.iter().any(|s| s == k);
    if wanted("envoy") {
        ensure!(envoy.is_file(), "Envoy not found at {}: run scripts/setup.sh", envoy.display());
    }
    if wanted("haproxy") {
        ensure!(haproxy.is_file(), "HAProxy not found at {}: apt-get install haproxy", haproxy.display());
    }
    Ok(Tools { weft: args.weft.clone(), weft_proxy: args.weft_proxy.clone(), envoy, haproxy, quiet_control: false })
}

/// Starts the echo application (this binary's `echo` command) on the applications' CPU.
pub async fn start_echo(pin: &Pinning, dir: &Path) -> anyhow::Result<(Proc, Apps)> {
    let me = std::env::current_exe()?;
    let mut cmd = command(pin.apps.as_deref(), &me);
    cmd.arg("echo");
    let mut proc = Proc::spawn("echo", cmd, &dir.join("echo.log"), true)?;
    let line = proc.first_line(Duration::from_secs(10)).await?;
    let addr = |key: &str| -> anyhow::Result<std::net::SocketAddr> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .ok_or_else(|| anyhow!("unexpected echo line: {line}"))?
            .parse()
            .context("echo address")
    };
    let apps = Apps { h1: addr("h1=")?, grpc: addr("grpc=")? };
    Ok((proc, apps))
}

/// Runs everything `args` asks for and writes the results; returns them.
pub async fn run(args: &RunArgs) -> anyhow::Result<(Results, PathBuf)> {
    let t0 = std::time::Instant::now();
    let tools = tools(args)?;
    let pin = Pinning::detect();
    let kinds: Vec<Kind> = Kind::ALL.into_iter().filter(|k| args.scenarios.iter().any(|s| s == k.name())).collect();
    ensure!(!kinds.is_empty() || !args.mesh_sizes.is_empty(), "nothing to run");
    let scratch = tempfile::Builder::new().prefix("weft-bench-").tempdir()?;
    let (_echo, apps) = start_echo(&pin, scratch.path()).await?;
    let load_start = loadavg();
    eprintln!("bench: pinning {pin:?}; loadavg {load_start}");

    let mut scenarios = Vec::new();
    for round in 1..=args.runs {
        for &kind in &kinds {
            scenarios.push(one_scenario(kind, round, args, &tools, apps, &pin).await?);
        }
    }
    let mut mesh_size = Vec::new();
    for &n in &args.mesh_sizes {
        let r =
            crate::mesh::proxy_memory(&tools, &pin, apps, n).await.with_context(|| format!("mesh of {n} services"))?;
        eprintln!("bench: mesh of {n} services: {r}");
        mesh_size.push(r);
    }
    let mut control_plane = Vec::new();
    for &n in &args.cp_clients {
        ensure!(
            args.xds_scale.is_file(),
            "{} not found: cargo build --release -p weft --example xds_scale",
            args.xds_scale.display()
        );
        // Not pinned: the control plane and its simulated proxies get every CPU.
        let all = format!("0-{}", crate::procs::online_cpus() - 1);
        let out = command(pin.apps.as_ref().map(|_| all.as_str()), &args.xds_scale)
            .arg(n.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .output()
            .await?;
        let text = String::from_utf8_lossy(&out.stdout);
        // A failed scale run is recorded, not fatal: the scenarios above stay.
        let v: serde_json::Value = match text.lines().rfind(|l| l.starts_with('{')) {
            Some(line) if out.status.success() => serde_json::from_str(line)?,
            _ => serde_json::json!({
                "clients": n,
                "error": format!("xds_scale {n} failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
            }),
        };
        eprintln!("bench: control plane with {n} proxies: {v}");
        control_plane.push(v);
    }

    let date = crate::report::utc_now();
    let results = Results {
        date: date.clone(),
        machine: {
            let mut m = machine();
            m["loadavg_start"] = loadavg_start_end(&load_start);
            m["loadavg_end"] = loadavg_start_end(&loadavg());
            m["pinning"] = serde_json::json!({"apps_cpu": pin.apps, "proxies_cpu": pin.proxies});
            m
        },
        settings: serde_json::json!({
            "runs": args.runs, "rps": args.rps, "conns": args.conns, "warmup_s": args.warmup_secs,
            "http1_s": args.h1_secs, "grpc_s": args.grpc_secs, "max_s": args.max_secs, "workers": args.workers,
            "versions": {
                "weft": version(&tools.weft, "--version").await,
                "weft_proxy": version(&tools.weft_proxy, "--version").await,
                "envoy": version(&tools.envoy, "--version").await,
                "haproxy": version(&tools.haproxy, "-v").await,
            },
        }),
        scenarios,
        mesh_size,
        control_plane,
        duration_s: t0.elapsed().as_secs_f64(),
        prepare_s: std::env::var("WEFT_BENCH_PREPARE_SECS").ok().and_then(|v| v.trim().parse().ok()),
    };
    std::fs::create_dir_all(&args.out)?;
    let file = args.out.join(format!("{}.json", date.replace(':', "-")));
    let text = serde_json::to_string_pretty(&results)?;
    std::fs::write(&file, &text)?;
    std::fs::write(args.out.join("latest.json"), &text)?;
    Ok((results, file))
}

fn loadavg_start_end(s: &str) -> serde_json::Value {
    serde_json::Value::String(s.to_string())
}
