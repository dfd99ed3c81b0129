//! `weft-bench outside`: the outside method of issue 20 as a scenario. Nothing is pinned;
//! HTTP/1.1 at a fixed rate (1,000 requests/s over 16 connections, latency-corrected,
//! 1 KiB answers) into the client proxy of each pair, then a closed-loop maximum with one
//! worker per proxy. The pairs:
//!
//! - `baseline`: no proxy (the load generator talks to the echo application);
//! - `weft-h2` / `weft-h1`: weft's sidecars, mTLS between them, HTTP/2
//!   (`h2UpgradePolicy: UPGRADE`) or HTTP/1.1 on that hop, every mesh feature on
//!   (metrics, peer metadata, an ALLOW AuthorizationPolicy evaluated on the server, access
//!   log off);
//! - `envoy-static`: Envoy 1.40 with a minimal static config (a router, mTLS + h2 between);
//! - `envoy-xds`: Envoy fed by `weft control` over xDS with the same resources as `weft-h2`;
//! - `haproxy`: HAProxy 2.6, mTLS + h2 between (the `haproxy` stack of `run`).
//!
//! Rounds are interleaved (every pair once per round, in order), and each figure is stated
//! per round: added p50/p99/p99.9 (the pair's minus the `baseline` of the same round), CPU
//! per request of both proxies together (`/proc/PID/task/*/schedstat`, nanosecond run
//! time), one-worker maximum requests/s, the larger proxy's peak RSS (`VmHWM`), and the
//! machine's load average before and after. `--alt-proxy` adds `weft-h2@alt` /
//! `weft-h1@alt` pairs run with another `weft-proxy` binary in the same rounds, for A/B.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context};
use serde::{Deserialize, Serialize};

use crate::load::{self, RunResult, Target};
use crate::procs::{command, free_port, wait_for, Pinning, Proc};
use crate::stack::{
    envoy_stack, haproxy_stack, wait_ready, wait_through, weft_stack, Apps, Kind, Proxy, ProxyOptions, Stack, Tools,
    MESH_SERVICE,
};

/// What `outside` measures and how long.
#[derive(Clone, Debug, clap::Args)]
pub struct OutsideArgs {
    /// Interleaved rounds (every pair once per round).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Requests per second of the fixed-rate run.
    #[arg(long, default_value_t = 1000)]
    pub rps: u32,
    /// Connections of the load generator.
    #[arg(long, default_value_t = 16)]
    pub conns: usize,
    /// Warm-up at the fixed rate before the measured window, seconds.
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// Measured fixed-rate window, seconds.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Measured closed-loop window, seconds (after a 1 s warm-up); 0 skips it.
    #[arg(long, default_value_t = 4)]
    pub max_secs: u64,
    /// Pairs to run (comma-separated): baseline, weft-h2, weft-h1, envoy-static,
    /// envoy-xds, haproxy.
    #[arg(long, value_delimiter = ',', default_value = "baseline,weft-h2,weft-h1,envoy-static,envoy-xds,haproxy")]
    pub pairs: Vec<String>,
    #[command(flatten)]
    pub builds: Builds,
    /// Where to write `outside-<date>.json` (and `outside-latest.json`).
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
}

/// One pair in one round.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PairRun {
    pub pair: String,
    pub round: usize,
    pub fixed: RunResult,
    /// Added latency against the same round's baseline, µs (`None` for the baseline).
    pub added_us: Option<Added>,
    /// CPU of both proxies per request at the fixed rate, µs.
    pub cpu_us_per_req: f64,
    /// The same per proxy (client, server order as started: server first).
    pub cpu_us_per_req_each: Vec<f64>,
    /// User and kernel CPU per request of each proxy at the fixed rate, µs
    /// (`/proc/PID/stat`, clock ticks; server, client). At 1,000 requests/s each request
    /// arrives alone: the kernel share is what the wake-ups cost (absent in older results).
    #[serde(default)]
    pub fixed_user_sys_us_per_req: Vec<(f64, f64)>,
    /// Closed loop, one worker per proxy.
    pub max: Option<RunResult>,
    /// CPU of both proxies per request at maximum throughput, µs.
    pub cpu_us_per_req_max: Option<f64>,
    /// Where the CPU went during the closed-loop window (absent in older results).
    #[serde(default)]
    pub saturation: Option<Saturation>,
    /// The larger proxy's VmHWM after everything, MiB.
    pub peak_rss_mib: f64,
    pub loadavg_before: String,
    pub loadavg_after: String,
    pub evidence: serde_json::Value,
}

/// Whether the closed-loop maximum was bound by the machine's CPU: every process of the
/// pipeline (load generator, proxies, application) shares the same CPUs, so a proxy that
/// shows a third of a core of run time may still be waiting for a CPU the rest of the time.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Saturation {
    /// Share of the machine's CPU time that was idle over the window, % (all CPUs).
    pub machine_idle_pct: f64,
    /// Per proxy (server, client): run time per second of the window, ms.
    pub proxy_run_ms_per_s: Vec<f64>,
    /// Per proxy: time runnable but waiting for a CPU (`schedstat`'s second field) per
    /// second of the window, ms.
    pub proxy_wait_ms_per_s: Vec<f64>,
    /// Per proxy: user-space CPU per request, µs (`/proc/PID/stat`, clock ticks).
    #[serde(default)]
    pub proxy_user_us_per_req: Vec<f64>,
    /// Per proxy: kernel CPU per request (system calls, TCP, wake-ups), µs.
    #[serde(default)]
    pub proxy_sys_us_per_req: Vec<f64>,
    /// The load generator's process (this one, its ended threads included) CPU per
    /// request, µs (`/proc/self/stat`, clock ticks).
    pub loadgen_us_per_req: f64,
    /// The echo application's run time per request, µs.
    pub app_us_per_req: f64,
}

/// Run and run-queue wait nanoseconds of a process's threads (`/proc/PID/task/*/schedstat`).
pub fn run_wait_ns(pid: u32) -> anyhow::Result<(u64, u64)> {
    let (mut run, mut wait) = (0u64, 0u64);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let mut f = text.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
        run += f.next().unwrap_or(0);
        wait += f.next().unwrap_or(0);
    }
    Ok((run, wait))
}

/// The machine's (idle, total) CPU time in clock ticks (`/proc/stat`, first line; idle
/// includes iowait).
pub fn machine_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> =
        text.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (idle, total)
}

/// User and system CPU seconds of a process, its ended threads included (`/proc/PID/stat`).
pub fn user_sys_s(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let tick = |i: usize| -> anyhow::Result<f64> {
        Ok(f.get(i).ok_or_else(|| anyhow!("short /proc/{pid}/stat"))?.parse::<f64>()? / crate::procs::CLK_TCK)
    };
    Ok((tick(11)?, tick(12)?))
}

/// The CPU counters [`Saturation`] is computed from, taken at both ends of a window.
struct SatSample {
    at: std::time::Instant,
    machine: (u64, u64),
    proxies: Vec<(u64, u64)>,
    proxies_user_sys: Vec<(f64, f64)>,
    loadgen: f64,
    app: u64,
}

impl SatSample {
    fn take(stack: &Stack, app_pid: Option<u32>) -> anyhow::Result<SatSample> {
        let proxies = stack.proxies.iter().map(|p| run_wait_ns(p.proc.pid()?)).collect::<anyhow::Result<_>>()?;
        let proxies_user_sys =
            stack.proxies.iter().map(|p| user_sys_s(p.proc.pid()?)).collect::<anyhow::Result<_>>()?;
        let (u, s) = user_sys_s(std::process::id())?;
        Ok(SatSample {
            at: std::time::Instant::now(),
            machine: machine_ticks(),
            proxies,
            proxies_user_sys,
            loadgen: u + s,
            app: app_pid.map_or(Ok(0), run_ns)?,
        })
    }

    fn since(&self, before: &SatSample, requests: u64) -> Saturation {
        let secs = self.at.duration_since(before.at).as_secs_f64().max(1e-9);
        let (idle, total) = (self.machine.0 - before.machine.0, self.machine.1 - before.machine.1);
        let per_req = |a: u64, b: u64| a.saturating_sub(b) as f64 / 1000.0 / requests.max(1) as f64;
        Saturation {
            machine_idle_pct: if total == 0 { 0.0 } else { 100.0 * idle as f64 / total as f64 },
            proxy_run_ms_per_s: self
                .proxies
                .iter()
                .zip(&before.proxies)
                .map(|(a, b)| a.0.saturating_sub(b.0) as f64 / 1e6 / secs)
                .collect(),
            proxy_wait_ms_per_s: self
                .proxies
                .iter()
                .zip(&before.proxies)
                .map(|(a, b)| a.1.saturating_sub(b.1) as f64 / 1e6 / secs)
                .collect(),
            proxy_user_us_per_req: self
                .proxies_user_sys
                .iter()
                .zip(&before.proxies_user_sys)
                .map(|(a, b)| (a.0 - b.0) * 1e6 / requests.max(1) as f64)
                .collect(),
            proxy_sys_us_per_req: self
                .proxies_user_sys
                .iter()
                .zip(&before.proxies_user_sys)
                .map(|(a, b)| (a.1 - b.1) * 1e6 / requests.max(1) as f64)
                .collect(),
            loadgen_us_per_req: (self.loadgen - before.loadgen) * 1e6 / requests.max(1) as f64,
            app_us_per_req: per_req(self.app, before.app),
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Added {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

/// Everything one `outside` run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutsideResults {
    pub date: String,
    pub method: String,
    pub settings: serde_json::Value,
    pub runs: Vec<PairRun>,
}

/// The mesh resources of the weft and xDS-fed Envoy pairs: the echo Service, an ALLOW
/// AuthorizationPolicy on it (so RBAC is evaluated per request) and, for h2 between the
/// proxies, Istio's `h2UpgradePolicy: UPGRADE`.
pub fn mesh_resources(h2: bool) -> String {
    let mut r = format!(
        "{MESH_SERVICE}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: echo-allow, namespace: default}}\nspec:\n  selector:\n    matchLabels: {{app: echo}}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/client\"]\n"
    );
    if h2 {
        r.push_str("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo-h2, namespace: default}\nspec:\n  host: echo.default.svc.cluster.local\n  trafficPolicy:\n    connectionPool:\n      http: {h2UpgradePolicy: UPGRADE}\n");
    }
    r
}

/// CPU nanoseconds a process's threads have run (`/proc/PID/task/*/schedstat`, first field).
pub fn run_ns(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        // A thread may end between the listing and the read.
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        total += text.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Ok(total)
}

fn stack_run_ns(stack: &Stack) -> anyhow::Result<Vec<u64>> {
    stack.proxies.iter().map(|p| run_ns(p.proc.pid()?)).collect()
}

/// User and system CPU seconds of each proxy of `stack`.
fn stack_user_sys(stack: &Stack) -> anyhow::Result<Vec<(f64, f64)>> {
    stack.proxies.iter().map(|p| user_sys_s(p.proc.pid()?)).collect()
}

fn per_req_us(before: &[u64], after: &[u64], requests: u64) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| if requests == 0 { 0.0 } else { a.saturating_sub(*b) as f64 / 1000.0 / requests as f64 })
        .collect()
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Starts `pair` unpinned, one worker per proxy; only the HTTP/1.1 path is awaited.
pub async fn start_pair(pair: &str, tools: &Tools, apps: Apps) -> anyhow::Result<Stack> {
    let pin = Pinning { apps: None, proxies: None };
    let opts = ProxyOptions { workers: 1 };
    let base = pair.split('@').next().unwrap_or(pair);
    let dir = tempfile::Builder::new().prefix(&format!("weft-bench-{base}-")).tempdir()?;
    let mut stack = match base {
        "baseline" => Stack {
            kind: Kind::Baseline,
            h1: Target { addr: apps.h1, uri: "http://echo:9080/".parse()? },
            grpc: Target { addr: apps.grpc, uri: "http://echo:9090/echo.Echo/Unary".parse()? },
            proxies: Vec::new(),
            _control: None,
            _dir: dir,
        },
        "weft-h2" => weft_stack(dir, tools, apps, &pin, opts, &mesh_resources(true)).await?,
        "weft-h1" => weft_stack(dir, tools, apps, &pin, opts, &mesh_resources(false)).await?,
        "envoy-xds" => envoy_stack(dir, tools, apps, &pin, opts, &mesh_resources(true)).await?,
        "envoy-static" => envoy_static_stack(dir, tools, apps).await?,
        "haproxy" => haproxy_stack(dir, tools, apps, &pin, opts).await?,
        other => bail!("unknown pair {other:?}"),
    };
    let h1 = stack.h1.clone();
    if let Err(e) = wait_through(&h1, false, &mut stack.proxies).await {
        bail!("{pair}: HTTP/1.1 through the pair never succeeded: {e}{}", stack.logs());
    }
    Ok(stack)
}

/// One pair, fresh, in one round.
pub async fn one_pair(
    pair: &str,
    round: usize,
    args: &OutsideArgs,
    tools: &Tools,
    apps: Apps,
    app_pid: Option<u32>,
) -> anyhow::Result<PairRun> {
    let loadavg_before = loadavg();
    let stack = start_pair(pair, tools, apps).await?;
    let fail = |what: &str, e: anyhow::Error| anyhow!("{pair} round {round}: {what}: {e:#}{}", stack.logs());
    let mut total = 0u64;
    total += load::h1_fixed_rate(&stack.h1, args.rps, args.conns, Duration::from_secs(args.warmup_secs))
        .await
        .map_err(|e| fail("warm-up", e))?
        .ok;
    let c0 = stack_run_ns(&stack)?;
    let us0 = stack_user_sys(&stack)?;
    let fixed = load::h1_fixed_rate(&stack.h1, args.rps, args.conns, Duration::from_secs(args.secs))
        .await
        .map_err(|e| fail("fixed rate", e))?;
    let c1 = stack_run_ns(&stack)?;
    let us1 = stack_user_sys(&stack)?;
    let n = fixed.ok.max(1) as f64;
    let fixed_user_sys_us_per_req =
        us0.iter().zip(&us1).map(|(b, a)| ((a.0 - b.0) * 1e6 / n, (a.1 - b.1) * 1e6 / n)).collect();
    total += fixed.ok;
    let each = per_req_us(&c0, &c1, fixed.ok);
    let (mut max, mut cpu_max, mut saturation) = (None, None, None);
    if args.max_secs > 0 {
        total +=
            load::h1_max(&stack.h1, args.conns, Duration::from_secs(1)).await.map_err(|e| fail("max warm-up", e))?.ok;
        let m0 = stack_run_ns(&stack)?;
        let s0 = SatSample::take(&stack, app_pid)?;
        let m = load::h1_max(&stack.h1, args.conns, Duration::from_secs(args.max_secs))
            .await
            .map_err(|e| fail("maximum throughput", e))?;
        let s1 = SatSample::take(&stack, app_pid)?;
        let m1 = stack_run_ns(&stack)?;
        total += m.ok;
        cpu_max = Some(per_req_us(&m0, &m1, m.ok).iter().sum());
        saturation = Some(s1.since(&s0, m.ok));
        max = Some(m);
    }
    let stats = stack.stats()?;
    let peak_rss_mib = stats.iter().map(|s| s.hwm_kib as f64 / 1024.0).fold(0.0, f64::max);
    let evidence = stack.verify(total).await.map_err(|e| fail("verification", e))?;
    let run = PairRun {
        pair: pair.to_string(),
        round,
        fixed,
        added_us: None,
        cpu_us_per_req: each.iter().sum(),
        cpu_us_per_req_each: each,
        fixed_user_sys_us_per_req,
        max,
        cpu_us_per_req_max: cpu_max,
        saturation,
        peak_rss_mib,
        loadavg_before,
        loadavg_after: loadavg(),
        evidence,
    };
    eprintln!(
        "bench: {pair:>14} round {round}: p50 {:.0} p99 {:.0} p99.9 {:.0} us | CPU {:.0} us/req (pair) | max {} rps | RSS {:.1} MiB | load {} -> {}",
        run.fixed.latency_us.p50,
        run.fixed.latency_us.p99,
        run.fixed.latency_us.p999,
        run.cpu_us_per_req,
        run.max.as_ref().map_or("-".to_string(), |m| format!("{:.0}", m.rps)),
        run.peak_rss_mib,
        run.loadavg_before,
        run.loadavg_after
    );
    eprintln!(
        "bench: {pair:>14} round {round}: at the fixed rate, (user, sys) us/req per proxy (server, client): {:?}",
        run.fixed_user_sys_us_per_req.iter().map(|(u, s)| (u.round(), s.round())).collect::<Vec<_>>()
    );
    if let Some(s) = &run.saturation {
        eprintln!(
            "bench: {pair:>14} round {round}: at max: machine idle {:.0}% | proxies (server, client) run {:?} ms/s, waiting for a CPU {:?} ms/s, user {:?} sys {:?} us/req | load generator {:.0} us/req, echo {:.0} us/req",
            s.machine_idle_pct,
            s.proxy_run_ms_per_s.iter().map(|v| v.round()).collect::<Vec<_>>(),
            s.proxy_wait_ms_per_s.iter().map(|v| v.round()).collect::<Vec<_>>(),
            s.proxy_user_us_per_req.iter().map(|v| v.round()).collect::<Vec<_>>(),
            s.proxy_sys_us_per_req.iter().map(|v| v.round()).collect::<Vec<_>>(),
            s.loadgen_us_per_req,
            s.app_us_per_req
        );
    }
    Ok(run)
}

/// Fills `added_us` from the baseline of the same round.
pub fn fill_added(runs: &mut [PairRun]) {
    let base: Vec<(usize, crate::load::Latency)> =
        runs.iter().filter(|r| r.pair == "baseline").map(|r| (r.round, r.fixed.latency_us.clone())).collect();
    for r in runs.iter_mut().filter(|r| r.pair != "baseline") {
        if let Some((_, b)) = base.iter().find(|(round, _)| *round == r.round) {
            let l = &r.fixed.latency_us;
            r.added_us = Some(Added { p50: l.p50 - b.p50, p99: l.p99 - b.p99, p999: l.p999 - b.p999 });
        }
    }
}

/// The binaries a pair runs (`outside`, `wake`): weft's two, another `weft-proxy` build
/// for an A/B, and the peers.
#[derive(Clone, Debug, clap::Args)]
pub struct Builds {
    /// Another `weft-proxy` binary: its `weft-h2@alt` / `weft-h1@alt` pairs run in the
    /// same rounds, right after the current build's (A/B).
    #[arg(long)]
    pub alt_proxy: Option<PathBuf>,
    /// `weft control` (only configures; not on the data path).
    #[arg(long, default_value = "target/release/weft")]
    pub weft: PathBuf,
    /// The proxy-only binary the weft sidecars run.
    #[arg(long, env = "WEFT_BENCH_PROXY", default_value = "target/release/weft-proxy")]
    pub weft_proxy: PathBuf,
    /// Envoy (default: `$WEFT_ENVOY`, else `.tools/bin/envoy`).
    #[arg(long)]
    pub envoy: Option<PathBuf>,
    /// HAProxy (default: `haproxy` on PATH or /usr/sbin/haproxy).
    #[arg(long)]
    pub haproxy: Option<PathBuf>,
}

impl Builds {
    /// The tools of the current build, and those of the `--alt-proxy` build if any.
    pub fn tools(&self) -> (Tools, Option<Tools>) {
        let current = tools(&self.weft, &self.weft_proxy, self.envoy.as_ref(), self.haproxy.as_ref());
        let alt = self.alt_proxy.as_ref().map(|alt| Tools { weft_proxy: alt.clone(), ..current.clone() });
        (current, alt)
    }
}

pub fn tools(weft: &Path, weft_proxy: &Path, envoy: Option<&PathBuf>, haproxy: Option<&PathBuf>) -> Tools {
    let envoy = envoy
        .cloned()
        .or_else(|| std::env::var_os("WEFT_ENVOY").filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(".tools/bin/envoy"));
    let haproxy = haproxy
        .cloned()
        .or_else(|| crate::procs::which("haproxy"))
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/haproxy"));
    Tools { weft: weft.to_path_buf(), weft_proxy: weft_proxy.to_path_buf(), envoy, haproxy, quiet_control: false }
}

/// Runs every round and writes the results; returns them and the file.
pub async fn run(args: &OutsideArgs) -> anyhow::Result<(OutsideResults, PathBuf)> {
    let (tools, alt_tools) = args.builds.tools();
    ensure!(tools.weft.is_file(), "{} not found: cargo build --release -p weft", tools.weft.display());
    ensure!(
        tools.weft_proxy.is_file(),
        "{} not found: cargo build --release -p weft-proxy",
        tools.weft_proxy.display()
    );
    let wanted = |k: &str| args.pairs.iter().any(|p| p.starts_with(k));
    if wanted("envoy") {
        ensure!(tools.envoy.is_file(), "Envoy not found at {}: run scripts/setup.sh", tools.envoy.display());
    }
    if wanted("haproxy") {
        ensure!(tools.haproxy.is_file(), "HAProxy not found at {}: run scripts/setup.sh", tools.haproxy.display());
    }
    // Every proxy binary starts from the same page-cache state (peak RSS depends on it).
    let mut binaries = vec![&tools.weft_proxy, &tools.envoy, &tools.haproxy];
    binaries.extend(alt_tools.as_ref().map(|t| &t.weft_proxy));
    for bin in binaries.into_iter().filter(|b| b.is_file()) {
        if let Err(e) = crate::procs::evict_from_page_cache(bin) {
            eprintln!("bench: {e:#} (peak RSS may depend on the page cache)");
        }
    }
    let mut pairs: Vec<String> = Vec::new();
    for p in &args.pairs {
        pairs.push(p.clone());
        if args.builds.alt_proxy.is_some() && p.starts_with("weft-") {
            pairs.push(format!("{p}@alt"));
        }
    }
    let scratch = tempfile::Builder::new().prefix("weft-bench-outside-").tempdir()?;
    let (echo, apps) = crate::run::start_echo(&Pinning { apps: None, proxies: None }, scratch.path()).await?;
    let app_pid = echo.pid().ok();
    eprintln!("bench: outside method, no pinning; pairs {pairs:?}; loadavg {}", loadavg());
    let mut runs = Vec::new();
    for round in 1..=args.rounds {
        for pair in &pairs {
            let t = if pair.ends_with("@alt") { alt_tools.as_ref().unwrap_or(&tools) } else { &tools };
            runs.push(one_pair(pair, round, args, t, apps, app_pid).await?);
        }
    }
    fill_added(&mut runs);
    let date = crate::report::utc_now();
    let results = OutsideResults {
        date: date.clone(),
        method: "no pinning; HTTP/1.1 open loop at a fixed rate, latency-corrected, 1 KiB answers; one worker per proxy; rounds interleaved".into(),
        settings: serde_json::json!({
            "rounds": args.rounds, "rps": args.rps, "conns": args.conns, "warmup_s": args.warmup_secs,
            "secs": args.secs, "max_s": args.max_secs, "pairs": pairs,
            "weft_proxy": tools.weft_proxy, "alt_proxy": args.builds.alt_proxy,
            "cpus": crate::procs::online_cpus(),
        }),
        runs,
    };
    std::fs::create_dir_all(&args.out)?;
    let file = args.out.join(format!("outside-{}.json", date.replace(':', "-")));
    let text = serde_json::to_string_pretty(&results)?;
    std::fs::write(&file, &text)?;
    std::fs::write(args.out.join("outside-latest.json"), &text)?;
    Ok((results, file))
}

/// Markdown: one row per pair, medians over rounds with the per-round values.
pub fn table(results: &OutsideResults) -> String {
    use std::fmt::Write as _;
    let mut pairs: Vec<&str> = Vec::new();
    for r in &results.runs {
        if !pairs.contains(&r.pair.as_str()) {
            pairs.push(&r.pair);
        }
    }
    let mut out = String::from(
        "| pair | p50 (µs) | added p50 | added p99 | added p99.9 | CPU µs / req (pair) | CPU µs / req at max | max req/s, 1 worker | machine idle at max (%) | peak RSS (MiB) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in pairs {
        let rs: Vec<&PairRun> = results.runs.iter().filter(|r| r.pair == p).collect();
        let show = |v: Vec<f64>, prec: usize| -> String {
            if v.is_empty() {
                return "–".into();
            }
            let mut s = v.clone();
            s.sort_by(f64::total_cmp);
            let med = if s.len() % 2 == 1 { s[s.len() / 2] } else { (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0 };
            let each: Vec<String> = v.iter().map(|x| format!("{x:.prec$}")).collect();
            if v.len() == 1 {
                format!("{med:.prec$}")
            } else {
                format!("{med:.prec$} ({})", each.join(", "))
            }
        };
        let _ = writeln!(
            out,
            "| {p} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            show(rs.iter().map(|r| r.fixed.latency_us.p50).collect(), 0),
            show(rs.iter().filter_map(|r| r.added_us.map(|a| a.p50)).collect(), 0),
            show(rs.iter().filter_map(|r| r.added_us.map(|a| a.p99)).collect(), 0),
            show(rs.iter().filter_map(|r| r.added_us.map(|a| a.p999)).collect(), 0),
            if p == "baseline" { "–".into() } else { show(rs.iter().map(|r| r.cpu_us_per_req).collect(), 0) },
            if p == "baseline" {
                "–".into()
            } else {
                show(rs.iter().filter_map(|r| r.cpu_us_per_req_max).collect(), 0)
            },
            show(rs.iter().filter_map(|r| r.max.as_ref().map(|m| m.rps)).collect(), 0),
            show(rs.iter().filter_map(|r| r.saturation.as_ref().map(|s| s.machine_idle_pct)).collect(), 0),
            if p == "baseline" { "–".into() } else { show(rs.iter().map(|r| r.peak_rss_mib).collect(), 1) },
        );
    }
    let loads: Vec<String> = results
        .runs
        .iter()
        .filter(|r| r.pair == "baseline")
        .map(|r| format!("round {}: {}", r.round, r.loadavg_before))
        .collect();
    if !loads.is_empty() {
        let _ = writeln!(out, "\nLoad average (1/5/15 min) at the start of each round: {}.", loads.join("; "));
    }
    out
}

/// A CA and a server and a client certificate (PEM files: chain, key) for the static Envoys.
fn envoy_certs(dir: &Path) -> anyhow::Result<(PathBuf, [(PathBuf, PathBuf); 2])> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "weft-bench CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem())?;
    let pair = |name: &str| -> anyhow::Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![format!("{name}.bench")])?;
        params.distinguished_name.push(DnType::CommonName, format!("{name}.bench"));
        let cert = params.signed_by(&key, &ca)?;
        let (c, k) = (dir.join(format!("{name}-cert.pem")), dir.join(format!("{name}-key.pem")));
        std::fs::write(&c, cert.pem())?;
        std::fs::write(&k, key.serialize_pem())?;
        Ok((c, k))
    };
    let server = pair("server")?;
    let client = pair("client")?;
    Ok((ca_file, [server, client]))
}

const ROUTER: &str = "          http_filters:\n          - name: envoy.filters.http.router\n            typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}\n";

fn hcm(stat: &str, cluster: &str) -> String {
    format!(
        "      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: {stat}\n          route_config:\n            virtual_hosts:\n            - name: all\n              domains: [\"*\"]\n              routes: [{{match: {{prefix: \"/\"}}, route: {{cluster: \"{cluster}\"}}}}]\n{ROUTER}"
    )
}

fn static_cluster(name: &str, to: SocketAddr, extra: &str) -> String {
    format!(
        "  - name: \"{name}\"\n    type: STATIC\n    connect_timeout: 5s\n    load_assignment:\n      cluster_name: \"{name}\"\n      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: \"{}\", port_value: {}}}}}}}}}]}}]\n{extra}",
        to.ip(),
        to.port()
    )
}

/// Envoy's two minimal static configs: client (plain HTTP in, mTLS + h2 out), server (mTLS
/// with a required client certificate in, HTTP/1.1 to the application).
pub fn envoy_static_configs(
    ca: &Path,
    server: &(PathBuf, PathBuf),
    client: &(PathBuf, PathBuf),
    outbound: SocketAddr,
    inbound: SocketAddr,
    app: SocketAddr,
) -> (String, String) {
    let tls_cert = |(c, k): &(PathBuf, PathBuf)| {
        format!(
            "[{{certificate_chain: {{filename: \"{}\"}}, private_key: {{filename: \"{}\"}}}}]",
            c.display(),
            k.display()
        )
    };
    let admin = "admin:\n  address: {socket_address: {address: 127.0.0.1, port_value: 0}}\n";
    let client_cfg = format!(
        "{admin}static_resources:\n  listeners:\n  - name: outbound\n    address: {{socket_address: {{address: \"{}\", port_value: {}}}}}\n    filter_chains:\n    - filters:\n{}  clusters:\n{}",
        outbound.ip(),
        outbound.port(),
        hcm("outbound", "outbound|9080||echo"),
        static_cluster(
            "outbound|9080||echo",
            inbound,
            &format!(
                "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {{http2_protocol_options: {{}}}}\n    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n        sni: server.bench\n        common_tls_context:\n          alpn_protocols: [h2]\n          tls_certificates: {}\n          validation_context:\n            trusted_ca: {{filename: \"{}\"}}\n            match_typed_subject_alt_names: [{{san_type: DNS, matcher: {{exact: server.bench}}}}]\n",
                tls_cert(client),
                ca.display()
            )
        ),
    );
    let server_cfg = format!(
        "{admin}static_resources:\n  listeners:\n  - name: inbound\n    address: {{socket_address: {{address: \"{}\", port_value: {}}}}}\n    filter_chains:\n    - transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n          require_client_certificate: true\n          common_tls_context:\n            alpn_protocols: [h2, http/1.1]\n            tls_certificates: {}\n            validation_context:\n              trusted_ca: {{filename: \"{}\"}}\n              match_typed_subject_alt_names: [{{san_type: DNS, matcher: {{exact: client.bench}}}}]\n      filters:\n{}  clusters:\n{}",
        inbound.ip(),
        inbound.port(),
        tls_cert(server),
        ca.display(),
        hcm("inbound", "inbound|9080||"),
        static_cluster("inbound|9080||", app, ""),
    );
    (client_cfg, server_cfg)
}

/// The Envoy pair with minimal static configs (no control plane).
pub async fn envoy_static_stack(dir: tempfile::TempDir, tools: &Tools, apps: Apps) -> anyhow::Result<Stack> {
    let (ca, [server, client]) = envoy_certs(dir.path())?;
    let (outbound, inbound) = (free_port()?, free_port()?);
    let (client_cfg, server_cfg) = envoy_static_configs(&ca, &server, &client, outbound, inbound, apps.h1);
    let mut proxies = Vec::new();
    for (role, cfg) in [("server", server_cfg), ("client", client_cfg)] {
        let file = dir.path().join(format!("{role}-envoy.yaml"));
        std::fs::write(&file, cfg)?;
        let admin_file = dir.path().join(format!("{role}-admin"));
        let mut cmd = command(None, &tools.envoy);
        cmd.arg("-c").arg(&file).args(["--concurrency", "1", "--use-dynamic-base-id", "-l", "warn"]);
        cmd.arg("--admin-address-path").arg(&admin_file);
        let mut proc =
            Proc::spawn(&format!("envoy static ({role})"), cmd, &dir.path().join(format!("{role}-envoy.log")), false)?;
        let admin: SocketAddr =
            wait_for("Envoy's admin address", Duration::from_secs(60), Duration::from_millis(2), || async {
                std::fs::read_to_string(&admin_file).ok().and_then(|s| s.trim().parse().ok())
            })
            .await
            .map_err(|e| anyhow!("{e}; log: {}", proc.log_tail()))?;
        let ready = wait_ready(&mut proc, admin).await.context("static Envoy")?;
        proxies.push(Proxy {
            role,
            proc,
            admin: Some(admin),
            metrics: None,
            stats_socket: None,
            ready_ms: Some(ready),
        });
    }
    Ok(Stack {
        kind: Kind::Envoy,
        h1: Target { addr: outbound, uri: "http://echo:9080/".parse()? },
        grpc: Target { addr: outbound, uri: "http://echo:9080/".parse()? },
        proxies,
        _control: None,
        _dir: dir,
    })
}

/// The report's section for an `outside` run: what was measured and the table.
pub fn section(r: &OutsideResults) -> String {
    let st = &r.settings;
    format!(
        "\n## Outside method (issue 20): unpinned pairs, Envoy and HAProxy with minimal configs\n\n\
Generated by `weft-bench outside` on {} (`bench/outside.sh`; raw: `bench/results/outside-latest.json`). \
Nothing pinned; {} interleaved rounds (every pair once per round, in the order of the table); per pair and round: \
{} s warm-up and {} s measured of HTTP/1.1 at {} requests/s over {} connections (open loop, latency-corrected, \
1 KiB answers), then 1 s + {} s closed loop over {} connections; one worker per proxy. Figures are medians \
over rounds, each round's value in brackets. Added latency = the pair's percentile minus the no-proxy \
percentile of the same round. CPU = both proxies' run time (`/proc/PID/task/*/schedstat`) over the \
measured window, per request. Machine idle at max = the share of all CPUs' time that was idle during the closed-loop window \
(`/proc/stat`): near 0, the maximum is the machine's (load generator, proxies and application share its CPUs), \
not a proxy's; `weft-bench outside` prints each proxy's run and run-queue wait, user and system CPU per request \
and the load generator's and application's CPU per request for that window. \
Peak RSS = the larger proxy's `VmHWM` after the run. Pairs: \
`weft-h2`/`weft-h1` = weft's sidecars with mTLS and HTTP/2 (`h2UpgradePolicy: UPGRADE`) or HTTP/1.1 \
between them, metrics, peer metadata, an ALLOW AuthorizationPolicy evaluated on the server, access log off; \
`envoy-static` = Envoy 1.40, a router and mTLS + HTTP/2 between, nothing else; `envoy-xds` = Envoy fed the \
`weft-h2` resources by `weft control` (Istio's filters: metadata exchange, stats, RBAC); `haproxy` = \
HAProxy 2.6, mTLS + HTTP/2 between. `@alt` pairs (when present) ran another `weft-proxy` build in the same \
rounds.\n\n{}",
        r.date,
        st["rounds"],
        st["warmup_s"],
        st["secs"],
        st["rps"],
        st["conns"],
        st["max_s"],
        st["conns"],
        table(r)
    )
}
