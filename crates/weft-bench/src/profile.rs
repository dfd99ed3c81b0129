//! Where a pair's cost goes: `weft-bench profile` (perf on both proxies under the outside
//! method's load, folded stacks and the top functions; `bench/flamegraph.py` draws them)
//! and `weft-bench instr` (user-space instructions per request under callgrind, the A/B
//! measure that other load on the machine does not move; the regression gate uses it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context};
use serde::{Deserialize, Serialize};

use crate::load;
use crate::outside::{loadavg, start_pair, tools};
use crate::procs::Pinning;

/// What `profile` records.
#[derive(Clone, Debug, clap::Args)]
pub struct ProfileArgs {
    /// The pair to profile.
    #[arg(long, default_value = "weft-h2")]
    pub pair: String,
    /// Requests per second; 0 = closed loop (maximum throughput).
    #[arg(long, default_value_t = 1000)]
    pub rps: u32,
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Sampling frequency (Hz) of `perf record`.
    #[arg(long, default_value_t = 999)]
    pub freq: u32,
    /// Output prefix: writes `<out>.folded` (perf script stacks folded, one line per
    /// stack with its sample count: the input of any flame-graph renderer) and
    /// `<out>.txt` (the top functions, self time).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "target/release/weft")]
    pub weft: PathBuf,
    #[arg(long, env = "WEFT_BENCH_PROXY", default_value = "target/release/weft-proxy")]
    pub weft_proxy: PathBuf,
}

/// Starts `pair`, records both proxies with `perf record --call-graph dwarf` under load,
/// and folds the stacks.
pub async fn profile(args: &ProfileArgs) -> anyhow::Result<()> {
    let tools = tools(&args.weft, &args.weft_proxy, None, None);
    let scratch = tempfile::Builder::new().prefix("weft-bench-profile-").tempdir()?;
    let (_echo, apps) = crate::run::start_echo(&Pinning { apps: None, proxies: None }, scratch.path()).await?;
    let stack = start_pair(&args.pair, &tools, apps).await?;
    load::h1_fixed_rate(&stack.h1, 1000, 16, Duration::from_secs(2)).await?;
    let data = scratch.path().join("perf.data");
    let perf = PerfRecord::start(&stack, &data, &["-F", &args.freq.to_string(), "--call-graph", "dwarf,16384"]).await?;
    let d = Duration::from_secs(args.secs);
    let r = if args.rps == 0 {
        load::h1_max(&stack.h1, 16, d).await?
    } else {
        load::h1_fixed_rate(&stack.h1, args.rps, 16, d).await?
    };
    perf.stop().await?;
    eprintln!("profile: {} requests, {:.0} req/s, p50 {:.0} us, loadavg {}", r.ok, r.rps, r.latency_us.p50, loadavg());
    let script = tokio::process::Command::new("perf")
        .args(["script", "-F", "comm,ip,sym", "--no-inline", "-i"])
        .arg(&data)
        .output()
        .await?;
    ensure!(script.status.success(), "perf script: {}", String::from_utf8_lossy(&script.stderr));
    let folded = fold(&String::from_utf8_lossy(&script.stdout));
    let mut lines: Vec<(String, u64)> = folded.into_iter().collect();
    lines.sort_by_key(|l| std::cmp::Reverse(l.1));
    let total: u64 = lines.iter().map(|l| l.1).sum();
    let text: String = lines.iter().map(|(s, n)| format!("{s} {n}\n")).collect();
    std::fs::write(args.out.with_extension("folded"), text)?;
    // Self time per function (the leaf of each stack).
    let mut leaf: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for (s, n) in &lines {
        *leaf.entry(s.rsplit(';').next().unwrap_or(s)).or_default() += n;
    }
    let mut leaf: Vec<_> = leaf.into_iter().collect();
    leaf.sort_by_key(|l| std::cmp::Reverse(l.1));
    let mut top = format!(
        "# {} at {} req/s for {} s: {} samples at {} Hz, {} req/s reached, load average {}\n# self %  function\n",
        args.pair,
        args.rps,
        args.secs,
        total,
        args.freq,
        r.rps.round(),
        loadavg()
    );
    for (f, n) in leaf.iter().take(60) {
        top.push_str(&format!("{:6.2}  {f}\n", *n as f64 * 100.0 / total.max(1) as f64));
    }
    std::fs::write(args.out.with_extension("txt"), top)?;
    eprintln!("profile: wrote {}.folded and .txt", args.out.display());
    Ok(())
}

/// `perf record` attached to both proxies of a pair, writing `data`.
pub struct PerfRecord(tokio::process::Child);

impl PerfRecord {
    /// Starts recording the proxies of `stack` with the extra `options` (`-F`, ...), and
    /// gives perf time to attach to every thread.
    pub async fn start(stack: &crate::stack::Stack, data: &Path, options: &[&str]) -> anyhow::Result<PerfRecord> {
        let pids: Vec<String> =
            stack.proxies.iter().map(|p| p.proc.pid().map(|p| p.to_string())).collect::<Result<_, _>>()?;
        let child = tokio::process::Command::new("perf")
            .args(["record", "-q"])
            .args(options)
            .arg("-o")
            .arg(data)
            .args(["-p", &pids.join(",")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .context("perf record (is perf installed, and may this user trace?)")?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(PerfRecord(child))
    }

    /// Stops recording; perf writes its file on SIGINT.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.0.id().ok_or_else(|| anyhow!("perf exited early"))?;
        std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status()?;
        self.0.wait().await?;
        Ok(())
    }
}

/// Folds `perf script -F comm,ip,sym` output: `comm;outer;...;leaf count` per stack.
pub fn fold(script: &str) -> std::collections::HashMap<String, u64> {
    let mut out = std::collections::HashMap::new();
    let mut comm = String::new();
    let mut frames: Vec<String> = Vec::new();
    let mut flush = |comm: &mut String, frames: &mut Vec<String>| {
        if !comm.is_empty() {
            let mut key = comm.clone();
            for f in frames.iter().rev() {
                key.push(';');
                key.push_str(f);
            }
            *out.entry(key).or_insert(0) += 1;
        }
        comm.clear();
        frames.clear();
    };
    for line in script.lines() {
        if line.trim().is_empty() {
            flush(&mut comm, &mut frames);
        } else if !line.starts_with([' ', '\t']) {
            flush(&mut comm, &mut frames);
            comm = line.split_whitespace().next().unwrap_or("?").to_string();
        } else {
            // "\t    7f.. symbol+0x12 (dso)" or "... symbol"
            let mut parts = line.trim().splitn(2, ' ');
            let _ip = parts.next();
            let sym = parts.next().unwrap_or("[unknown]").trim();
            let sym = sym.rsplit_once(" (").map_or(sym, |(s, _)| s);
            let sym = sym.rsplit_once("+0x").map_or(sym, |(s, _)| s);
            frames.push(sym.replace(';', ":"));
        }
    }
    flush(&mut comm, &mut frames);
    out
}

/// What `instr` counts.
#[derive(Clone, Debug, clap::Args)]
pub struct InstrArgs {
    /// Pairs to count: `weft-h2`, `weft-h1`, and `haproxy` (HAProxy's pair, run under
    /// callgrind the same way: the reference the issue compares with).
    #[arg(long, value_delimiter = ',', default_value = "weft-h2,weft-h1")]
    pub pairs: Vec<String>,
    /// Requests per second during the counted window (callgrind runs the proxies ~20×
    /// slower: keep it low).
    #[arg(long, default_value_t = 100)]
    pub rps: u32,
    /// Counted window, seconds.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Interleaved rounds.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Another `weft-proxy` build counted in the same rounds (A/B).
    #[arg(long)]
    pub alt_proxy: Option<PathBuf>,
    #[arg(long, default_value = "target/release/weft")]
    pub weft: PathBuf,
    #[arg(long, env = "WEFT_BENCH_PROXY", default_value = "target/release/weft-proxy")]
    pub weft_proxy: PathBuf,
    /// Keep the callgrind dumps here (for `callgrind_annotate`).
    #[arg(long)]
    pub keep: Option<PathBuf>,
    /// Also simulate the caches and branch predictor (callgrind `--cache-sim=yes
    /// --branch-sim=yes`, ~2x slower): adds L1 data, last-level and branch misses per
    /// request and callgrind's cycle estimate (see [`CacheSim`]).
    #[arg(long)]
    pub cache_sim: bool,
}

/// Callgrind's cache and branch simulation of one pair, per request, both proxies
/// together: where instructions alone hide what a request costs (the same number of
/// instructions that touch more memory take longer).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheSim {
    /// Level-1 data cache misses (reads and writes).
    pub d1_misses: f64,
    /// Level-1 instruction cache misses.
    pub i1_misses: f64,
    /// Last-level cache misses (instructions and data).
    pub ll_misses: f64,
    /// Mispredicted conditional and indirect branches.
    pub branch_misses: f64,
    /// Callgrind's estimate: instructions + 10 per L1 miss and mispredicted branch + 100
    /// per last-level miss (`callgrind_annotate`'s "Estimated Cycles" weights).
    pub est_cycles: f64,
}

impl CacheSim {
    /// From a dump's `events:` and `totals:` (or `summary:`) lines, divided by `requests`.
    /// None when the dump has no simulated events.
    pub fn from_dump(text: &str, requests: u64) -> Option<CacheSim> {
        let events: Vec<&str> = text.lines().find_map(|l| l.strip_prefix("events:"))?.split_whitespace().collect();
        let totals = text.lines().find_map(|l| l.strip_prefix("totals:").or_else(|| l.strip_prefix("summary:")))?;
        let values: Vec<u64> = totals.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect();
        let get = |name: &str| -> Option<f64> {
            let i = events.iter().position(|e| *e == name)?;
            Some(values.get(i).copied().unwrap_or(0) as f64)
        };
        let n = requests.max(1) as f64;
        let ir = get("Ir")?;
        let d1 = get("D1mr")? + get("D1mw")?;
        let i1 = get("I1mr")?;
        let ll = get("ILmr")? + get("DLmr")? + get("DLmw")?;
        let branches = get("Bcm")? + get("Bim")?;
        Some(CacheSim {
            d1_misses: d1 / n,
            i1_misses: i1 / n,
            ll_misses: ll / n,
            branch_misses: branches / n,
            est_cycles: (ir + 10.0 * (d1 + i1 + branches) + 100.0 * ll) / n,
        })
    }

    fn add(&mut self, o: &CacheSim) {
        self.d1_misses += o.d1_misses;
        self.i1_misses += o.i1_misses;
        self.ll_misses += o.ll_misses;
        self.branch_misses += o.branch_misses;
        self.est_cycles += o.est_cycles;
    }
}

/// Instructions per request of one pair, counted by callgrind.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstrRun {
    pub pair: String,
    pub binary: String,
    pub round: usize,
    pub requests: u64,
    /// Instructions (user space) per request, both proxies together.
    pub instructions_per_req: f64,
    /// The same per proxy (server, client).
    pub each: Vec<f64>,
    /// With `--cache-sim`: the simulated misses and cycles per request, both proxies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSim>,
}

/// Writes `dir/weft-proxy`, a script that runs `bin` under callgrind (dumps to
/// `dir/cg.<pid>[.<n>]`, no per-instruction detail) with `flags` added.
pub fn callgrind_wrapper(dir: &Path, bin: &Path, flags: &str) -> anyhow::Result<PathBuf> {
    let wrapper = dir.join("weft-proxy");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec valgrind -q --tool=callgrind {flags} --dump-instr=no --callgrind-out-file={}/cg.%p \"{}\" \"$@\"\n",
            dir.display(),
            bin.display()
        ),
    )?;
    let status = std::process::Command::new("chmod").arg("+x").arg(&wrapper).status()?;
    ensure!(status.success(), "chmod +x {}", wrapper.display());
    Ok(wrapper)
}

pub fn callgrind_control(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("callgrind_control").args(args).output().context("callgrind_control")?;
    ensure!(out.status.success(), "callgrind_control {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// The text of the last dump of `pid` in `dir`.
fn last_dump(dir: &Path, pid: u32) -> anyhow::Result<(PathBuf, String)> {
    let prefix = format!("cg.{pid}.");
    let mut best: Option<(u32, PathBuf)> = None;
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        let Some(n) = path.file_name().and_then(|f| f.to_str()).and_then(|f| f.strip_prefix(&prefix)) else {
            continue;
        };
        if let Ok(n) = n.parse::<u32>() {
            if best.as_ref().is_none_or(|(b, _)| n > *b) {
                best = Some((n, path));
            }
        }
    }
    let (_, path) = best.ok_or_else(|| anyhow!("no callgrind dump of {pid} in {}", dir.display()))?;
    let text = std::fs::read_to_string(&path)?;
    Ok((path, text))
}

/// The instructions (first event of `totals:` or `summary:`) of the last dump of `pid`.
fn last_dump_total(dir: &Path, pid: u32) -> anyhow::Result<u64> {
    let (path, text) = last_dump(dir, pid)?;
    text.lines()
        .find_map(|l| l.strip_prefix("totals:").or_else(|| l.strip_prefix("summary:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no totals in {}", path.display()))
}

/// Counts the user-space instructions each request costs the weft pairs (callgrind,
/// instrumentation switched on only for the window): a figure the machine's other load
/// does not move, for A/B comparisons of proxy builds.
pub async fn instr(args: &InstrArgs) -> anyhow::Result<Vec<InstrRun>> {
    let scratch = tempfile::Builder::new().prefix("weft-bench-instr-").tempdir()?;
    let (_echo, apps) = crate::run::start_echo(&Pinning { apps: None, proxies: None }, scratch.path()).await?;
    let mut binaries = vec![args.weft_proxy.clone()];
    binaries.extend(args.alt_proxy.clone());
    let haproxy = tools(&args.weft, &args.weft_proxy, None, None).haproxy;
    let mut runs = Vec::new();
    for round in 1..=args.rounds {
        for pair in &args.pairs {
            // HAProxy's pair has one build to count: the one on the machine.
            let builds = if pair == "haproxy" { std::slice::from_ref(&haproxy) } else { &binaries[..] };
            for (b, bin) in builds.iter().enumerate() {
                let dir = scratch.path().join(format!("r{round}-{pair}-{b}"));
                std::fs::create_dir_all(&dir)?;
                let bin = std::fs::canonicalize(bin).with_context(|| bin.display().to_string())?;
                let flags = if args.cache_sim {
                    "--instr-atstart=no --cache-sim=yes --branch-sim=yes"
                } else {
                    "--instr-atstart=no"
                };
                let wrapper = callgrind_wrapper(&dir, &bin, flags)?;
                let mut tools = if pair == "haproxy" {
                    tools(&args.weft, &args.weft_proxy, None, Some(&wrapper))
                } else {
                    tools(&args.weft, &wrapper, None, None)
                };
                // No dashboard scrapes inside the counted window.
                tools.quiet_control = true;
                let stack = start_pair(pair, &tools, apps).await?;
                // Warm up as the window will run (16 connections, same rate), so the
                // upstream pool has the connections it needs before counting starts: a
                // TLS handshake inside the window would be counted against its requests.
                load::h1_fixed_rate(&stack.h1, args.rps, 16, Duration::from_secs(3)).await?;
                // Then 16 requests in flight at once, so the HTTP/1.1 pool between the
                // proxies holds 16 connections before counting (under callgrind the fixed
                // rate overlaps requests at random, and the window otherwise opened new
                // connections in some runs and not in others: 195k or 340k instructions
                // per request, the difference being TLS handshakes).
                load::h1_max(&stack.h1, 16, Duration::from_secs(1)).await?;
                let pids: Vec<u32> = stack.proxies.iter().map(|p| p.proc.pid()).collect::<Result<_, _>>()?;
                for pid in &pids {
                    callgrind_control(&["-i", "on", &pid.to_string()])?;
                }
                let r = load::h1_fixed_rate(&stack.h1, args.rps, 16, Duration::from_secs(args.secs)).await?;
                for pid in &pids {
                    callgrind_control(&["-d", &pid.to_string()])?;
                    callgrind_control(&["-i", "off", &pid.to_string()])?;
                }
                let each: Vec<f64> = pids
                    .iter()
                    .map(|pid| last_dump_total(&dir, *pid).map(|t| t as f64 / r.ok.max(1) as f64))
                    .collect::<Result<_, _>>()?;
                let cache = if args.cache_sim {
                    let mut sum = CacheSim::default();
                    for pid in &pids {
                        let (path, text) = last_dump(&dir, *pid)?;
                        let sim = CacheSim::from_dump(&text, r.ok)
                            .ok_or_else(|| anyhow!("no cache simulation events in {}", path.display()))?;
                        sum.add(&sim);
                    }
                    Some(sum)
                } else {
                    None
                };
                stack.verify(r.ok).await?;
                if let Some(keep) = &args.keep {
                    std::fs::create_dir_all(keep)?;
                    for e in std::fs::read_dir(&dir)? {
                        let path = e?.path();
                        if let Some(name) = path.file_name().and_then(|f| f.to_str()).filter(|f| f.starts_with("cg.")) {
                            std::fs::copy(&path, keep.join(format!("r{round}-{pair}-{b}-{name}")))?;
                        }
                    }
                }
                let run = InstrRun {
                    pair: pair.clone(),
                    binary: bin.display().to_string(),
                    round,
                    requests: r.ok,
                    instructions_per_req: each.iter().sum(),
                    each,
                    cache,
                };
                eprintln!(
                    "instr: {pair} {} round {round}: {:.0} instructions per request (server {:.0}, client {:.0}) over {} requests",
                    run.binary,
                    run.instructions_per_req,
                    run.each.first().copied().unwrap_or(0.0),
                    run.each.get(1).copied().unwrap_or(0.0),
                    run.requests
                );
                if let Some(c) = &run.cache {
                    eprintln!(
                        "instr: {pair} round {round}: per request {:.0} L1 data misses, {:.0} L1 instruction, {:.0} last-level, {:.0} mispredicted branches, {:.0} estimated cycles",
                        c.d1_misses, c.i1_misses, c.ll_misses, c.branch_misses, c.est_cycles
                    );
                }
                runs.push(run);
            }
        }
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::CacheSim;

    #[test]
    fn cache_sim_reads_the_dump_totals_by_event_name() {
        let dump = "version: 1\nevents: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw Bc Bcm Bi Bim\n\
                    fn=(1) main\n1 5\nsummary: 1000 300 200 20 40 60 1 2 3 150 30 10 10\n";
        let c = CacheSim::from_dump(dump, 10).expect("simulated events");
        assert_eq!(c.d1_misses, 10.0);
        assert_eq!(c.i1_misses, 2.0);
        assert_eq!(c.ll_misses, 0.6);
        assert_eq!(c.branch_misses, 4.0);
        // (1000 + 10 * (100 + 20 + 40) + 100 * 6) / 10
        assert_eq!(c.est_cycles, 320.0);
    }

    #[test]
    fn cache_sim_is_none_without_simulated_events() {
        assert_eq!(CacheSim::from_dump("events: Ir\ntotals: 1000\n", 10), None);
        assert_eq!(CacheSim::from_dump("no events here\n", 10), None);
    }
}
