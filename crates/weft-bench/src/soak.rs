//! `weft-bench soak`: memory under many concurrent connections. The weft stack (client
//! sidecar -> mTLS -> server sidecar -> echo) takes `--conns` concurrent closed-loop
//! connections (HTTP/2 with one request in flight each, as `h2load -c N -m 1`, or
//! HTTP/1.1) for `--secs`; both sidecars' resident memory is sampled every
//! `--sample-secs` before, during and for `--after-secs` after the load. A bounded proxy
//! levels off under constant concurrency and gives the memory back once the load is gone.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use serde::{Deserialize, Serialize};

use crate::load;
use crate::procs::Pinning;
use crate::stack::{Kind, ProxyOptions, Stack, Tools};

/// What `soak` runs and how long.
#[derive(Clone, Debug, clap::Args)]
pub struct SoakArgs {
    /// Concurrent connections of the load generator.
    #[arg(long, default_value_t = 500)]
    pub conns: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 300)]
    pub secs: u64,
    /// Seconds of sampling after the load stopped.
    #[arg(long, default_value_t = 60)]
    pub after_secs: u64,
    /// Seconds between two RSS samples.
    #[arg(long, default_value_t = 5)]
    pub sample_secs: u64,
    /// Downstream protocol: `h2` (h2c, one request in flight per connection) or `h1`.
    #[arg(long, default_value = "h2")]
    pub proto: String,
    /// Worker threads per proxy (default: one per CPU, like a sidecar without
    /// `--concurrency`).
    #[arg(long)]
    pub workers: Option<u32>,
    /// The `weft` binary (control plane); its build does not matter for the proxies.
    #[arg(long, default_value = "target/release/weft")]
    pub weft: PathBuf,
    /// The proxy-only binary the sidecars run.
    #[arg(long, env = "WEFT_BENCH_PROXY", default_value = "target/release/weft-proxy")]
    pub weft_proxy: PathBuf,
    /// A label for this run in the results (e.g. `before`, `after`).
    #[arg(long, default_value = "")]
    pub label: String,
    /// Where to write `soak-<date>.json`.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
}

/// One soak run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SoakResult {
    pub date: String,
    pub label: String,
    pub conns: usize,
    pub proto: String,
    pub workers: u32,
    pub load_secs: u64,
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub samples: Vec<Sample>,
    /// The proxies' own counters (every request went through both, over mTLS).
    pub evidence: serde_json::Value,
}

/// Both sidecars' memory at one moment.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the load started (negative: before it).
    pub t_s: f64,
    /// `idle`, `load` or `after`.
    pub phase: String,
    pub client: Mem,
    pub server: Mem,
}

/// A process's memory from `/proc/PID/status`, MiB.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Mem {
    /// VmRSS.
    pub rss: f64,
    /// RssAnon: the heap and stacks (VmRSS less mapped files).
    pub anon: f64,
}

impl Mem {
    fn read(pid: u32) -> anyhow::Result<Mem> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib = |key: &str| -> f64 {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Ok(Mem { rss: kib("VmRSS:") / 1024.0, anon: kib("RssAnon:") / 1024.0 })
    }
}

/// Runs the soak and writes `soak-<date>.json`; prints the samples as a table.
pub async fn run(args: &SoakArgs) -> anyhow::Result<(SoakResult, PathBuf)> {
    anyhow::ensure!(matches!(args.proto.as_str(), "h1" | "h2"), "--proto must be h1 or h2, not {:?}", args.proto);
    anyhow::ensure!(args.sample_secs > 0, "--sample-secs must be at least 1");
    for (what, p) in [("weft", &args.weft), ("weft-proxy", &args.weft_proxy)] {
        anyhow::ensure!(p.is_file(), "{} not found: build {what} (see bench/run.sh)", p.display());
    }
    let tools = Tools {
        weft: args.weft.clone(),
        weft_proxy: args.weft_proxy.clone(),
        envoy: PathBuf::new(),
        haproxy: PathBuf::new(),
        quiet_control: false,
    };
    let pin = Pinning::detect();
    let workers = args.workers.unwrap_or_else(|| crate::procs::online_cpus() as u32);
    let scratch = tempfile::Builder::new().prefix("weft-bench-soak-").tempdir()?;
    let (_echo, apps) = crate::run::start_echo(&pin, scratch.path()).await?;
    let stack = Stack::start(Kind::Weft, &tools, apps, &pin, ProxyOptions { workers }).await?;
    let pids = (stack.proxies[0].proc.pid()?, stack.proxies[1].proc.pid()?);
    let sample = |t_s: f64, phase: &str| -> anyhow::Result<Sample> {
        let (server, client) = (Mem::read(pids.0)?, Mem::read(pids.1)?);
        Ok(Sample { t_s, phase: phase.to_string(), client, server })
    };
    let mut samples = vec![sample(-1.0, "idle")?];
    eprintln!(
        "bench: soak: {} {} connections for {} s, {workers} workers per proxy",
        args.conns, args.proto, args.secs
    );

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let target = stack.h1.clone();
    let (conns, h2) = (args.conns, args.proto == "h2");
    let load = tokio::spawn(async move {
        if h2 {
            load::h2_until(&target, conns, stop).await
        } else {
            load::h1_until(&target, conns, stop).await
        }
    });
    let every = Duration::from_secs(args.sample_secs);
    let t0 = Instant::now();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    while t0.elapsed() < Duration::from_secs(args.secs) {
        tick.tick().await;
        let s = sample(t0.elapsed().as_secs_f64(), "load")?;
        eprintln!("bench: soak t={:>4.0}s client {:.1} MiB server {:.1} MiB", s.t_s, s.client.rss, s.server.rss);
        samples.push(s);
    }
    stop_tx.send_replace(true);
    let result = load.await.map_err(|e| anyhow!("load generator: {e}"))?.context("soak load")?;
    let stopped = Instant::now();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    while stopped.elapsed() < Duration::from_secs(args.after_secs) {
        tick.tick().await;
        let s = sample(t0.elapsed().as_secs_f64(), "after")?;
        eprintln!(
            "bench: soak t={:>4.0}s (after) client {:.1} MiB server {:.1} MiB",
            s.t_s, s.client.rss, s.server.rss
        );
        samples.push(s);
    }
    let evidence = stack.verify(result.ok).await.map_err(|e| anyhow!("soak: {e:#}{}", stack.logs()))?;

    let date = crate::report::utc_now();
    let out = SoakResult {
        date: date.clone(),
        label: args.label.clone(),
        conns: args.conns,
        proto: args.proto.clone(),
        workers,
        load_secs: args.secs,
        requests: result.ok,
        errors: result.errors,
        rps: result.rps,
        samples,
        evidence,
    };
    std::fs::create_dir_all(&args.out)?;
    let file = args.out.join(format!("soak-{}.json", date.replace(':', "-")));
    std::fs::write(&file, serde_json::to_string_pretty(&out)?)?;
    println!("{}", table(&out));
    Ok((out, file))
}

/// The samples as a Markdown table (RSS and anonymous RSS of both sidecars).
pub fn table(r: &SoakResult) -> String {
    let mut s = format!(
        "{} {} connections, {} s, {} workers per proxy: {} requests ({:.0}/s), {} errors\n\n",
        r.conns, r.proto, r.load_secs, r.workers, r.requests, r.rps, r.errors
    );
    s.push_str("| t (s) | phase | client RSS (MiB) | client anon | server RSS (MiB) | server anon |\n");
    s.push_str("|---:|---|---:|---:|---:|---:|\n");
    for x in &r.samples {
        s.push_str(&format!(
            "| {:.0} | {} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            x.t_s, x.phase, x.client.rss, x.client.anon, x.server.rss, x.server.anon
        ));
    }
    s
}
