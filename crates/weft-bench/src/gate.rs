//! `weft-bench gate`: a short regression check of weft's proxy pair against a saved
//! baseline (`bench/gate-baseline.json`). Not part of the test suite: it takes a few
//! minutes and needs release builds.
//!
//! Each round runs, interleaved, `baseline` (no proxy), `weft-h2` and `weft-h1` (the
//! outside method's pairs, fresh, unpinned, one worker each). The figures compared are the
//! best round of each (on a shared machine noise only ever makes a round worse, so the
//! best round is the least noisy estimate) against the saved best round:
//! - CPU µs per request of both proxies at 1,000 requests/s (schedstat run time: the
//!   figure least sensitive to other load);
//! - CPU µs per request at maximum throughput;
//! - added p50 latency (against the same round's no-proxy run);
//! - one-worker maximum requests/s;
//! - peak RSS of the larger proxy;
//! - user-space instructions per request of both proxies (callgrind, `weft-bench instr`):
//!   the figure other load on the machine does not move, so its threshold is tight.
//!
//! A figure regresses when its best round is worse than the saved best by more than its
//! tolerance (instructions 5%, CPU 15%, latency 30% and at least 30 µs, throughput 15%,
//! RSS 1 MiB), where
//! the tolerance also grows with the spread seen across this run's rounds, so a noisy run
//! does not fail on noise alone. `--save` writes the run as the new baseline.

use std::path::PathBuf;

use anyhow::{ensure, Context};
use serde::{Deserialize, Serialize};

use crate::outside::{self, OutsideArgs, PairRun};

#[derive(Clone, Debug, clap::Args)]
pub struct GateArgs {
    /// The saved baseline.
    #[arg(long, default_value = "bench/gate-baseline.json")]
    pub baseline: PathBuf,
    /// Write this run as the new baseline instead of comparing.
    #[arg(long)]
    pub save: bool,
    /// Interleaved rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Measured fixed-rate window per pair and round, seconds.
    #[arg(long, default_value_t = 8)]
    pub secs: u64,
    /// Measured closed-loop window per pair and round, seconds.
    #[arg(long, default_value_t = 3)]
    pub max_secs: u64,
    /// Skip the callgrind count of instructions per request (needs valgrind).
    #[arg(long)]
    pub no_instr: bool,
    #[arg(long, default_value = "target/release/weft")]
    pub weft: PathBuf,
    #[arg(long, env = "WEFT_BENCH_PROXY", default_value = "target/release/weft-proxy")]
    pub weft_proxy: PathBuf,
    /// The linker's symbol ordering list (`weft-bench layout`); the gate fails when less
    /// than 80% of its functions are in the build (a list from another configuration).
    #[arg(long, default_value = "crates/weft-proxy/link/symbol-order.txt")]
    pub symbol_order: PathBuf,
}

/// The best round of each figure of one pair.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Best {
    pub cpu_us_per_req: f64,
    pub cpu_us_per_req_max: f64,
    pub added_p50_us: f64,
    pub max_rps: f64,
    pub peak_rss_mib: f64,
    /// Relative spread (max − min) / min of the CPU per request over rounds.
    pub cpu_spread: f64,
    /// User-space instructions per request, both proxies (callgrind); 0 when not counted.
    #[serde(default)]
    pub instructions_per_req: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GateFile {
    pub date: String,
    pub weft_proxy: String,
    pub loadavg: Vec<String>,
    pub pairs: std::collections::BTreeMap<String, Best>,
}

fn min(v: impl Iterator<Item = f64>) -> f64 {
    v.fold(f64::INFINITY, f64::min)
}

fn max(v: impl Iterator<Item = f64>) -> f64 {
    v.fold(f64::NEG_INFINITY, f64::max)
}

fn best(runs: &[&PairRun]) -> Best {
    let cpu_min = min(runs.iter().map(|r| r.cpu_us_per_req));
    let cpu_max = max(runs.iter().map(|r| r.cpu_us_per_req));
    Best {
        cpu_us_per_req: cpu_min,
        cpu_us_per_req_max: min(runs.iter().filter_map(|r| r.cpu_us_per_req_max)),
        added_p50_us: min(runs.iter().filter_map(|r| r.added_us.map(|a| a.p50))),
        max_rps: max(runs.iter().filter_map(|r| r.max.as_ref().map(|m| m.rps))),
        peak_rss_mib: min(runs.iter().map(|r| r.peak_rss_mib)),
        cpu_spread: if cpu_min > 0.0 { (cpu_max - cpu_min) / cpu_min } else { 0.0 },
        instructions_per_req: 0.0,
    }
}

/// One comparison: `worse_by` is how much worse `now` is than `saved` (relative, > 0 is
/// worse), `allowed` the tolerance.
struct Check {
    pair: String,
    what: &'static str,
    saved: f64,
    now: f64,
    allowed: String,
    regressed: bool,
}

fn compare(pair: &str, saved: &Best, now: &Best) -> Vec<Check> {
    // Tolerances widen with the spread this run saw (half of it), never below the floor.
    let noise = now.cpu_spread.max(saved.cpu_spread) / 2.0;
    let rel = |floor: f64| floor.max(noise);
    let mut out = Vec::new();
    if saved.instructions_per_req > 0.0 && now.instructions_per_req > 0.0 {
        let limit = saved.instructions_per_req * 1.05;
        out.push(Check {
            pair: pair.into(),
            what: "instructions / req (pair, callgrind)",
            saved: saved.instructions_per_req,
            now: now.instructions_per_req,
            allowed: format!("≤ {limit:.0}"),
            regressed: now.instructions_per_req > limit,
        });
    }
    let mut cost = |what: &'static str, s: f64, n: f64, tol: f64, abs: f64| {
        let limit = (s * (1.0 + tol)).max(s + abs);
        out.push(Check {
            pair: pair.into(),
            what,
            saved: s,
            now: n,
            allowed: format!("≤ {limit:.1}"),
            regressed: n > limit,
        });
    };
    cost("CPU µs / req at 1,000/s (pair)", saved.cpu_us_per_req, now.cpu_us_per_req, rel(0.15), 0.0);
    cost("CPU µs / req at max (pair)", saved.cpu_us_per_req_max, now.cpu_us_per_req_max, rel(0.15), 0.0);
    cost("added p50 µs", saved.added_p50_us, now.added_p50_us, rel(0.30), 30.0);
    cost("peak RSS MiB", saved.peak_rss_mib, now.peak_rss_mib, 0.0, 1.0);
    let floor = saved.max_rps * (1.0 - rel(0.15));
    out.push(Check {
        pair: pair.into(),
        what: "max req/s, 1 worker",
        saved: saved.max_rps,
        now: now.max_rps,
        allowed: format!("≥ {floor:.0}"),
        regressed: now.max_rps < floor,
    });
    out
}

/// Runs the gate; `Ok(true)` when nothing regressed (or the baseline was saved).
pub async fn run(args: &GateArgs) -> anyhow::Result<bool> {
    let (found, listed) = crate::layout::coverage(&args.weft_proxy, &args.symbol_order)?;
    let layout_ok = found * 5 >= listed * 4;
    eprintln!(
        "gate: {found} of the {listed} functions in {} are in {}{}",
        args.symbol_order.display(),
        args.weft_proxy.display(),
        if layout_ok { "" } else { ": the list is stale, run `weft-bench layout` on this build (README)" }
    );
    let o = OutsideArgs {
        rounds: args.rounds,
        rps: 1000,
        conns: 16,
        warmup_secs: 2,
        secs: args.secs,
        max_secs: args.max_secs,
        pairs: vec!["baseline".into(), "weft-h2".into(), "weft-h1".into()],
        builds: outside::Builds {
            alt_proxy: None,
            weft: args.weft.clone(),
            weft_proxy: args.weft_proxy.clone(),
            envoy: None,
            haproxy: None,
        },
        out: std::env::temp_dir(),
    };
    let (results, _) = outside::run(&o).await?;
    let mut pairs = std::collections::BTreeMap::new();
    for p in ["weft-h2", "weft-h1"] {
        let runs: Vec<&PairRun> = results.runs.iter().filter(|r| r.pair == p).collect();
        ensure!(!runs.is_empty(), "no {p} runs");
        pairs.insert(p.to_string(), best(&runs));
    }
    if !args.no_instr {
        let i = crate::profile::InstrArgs {
            pairs: vec!["weft-h2".into(), "weft-h1".into()],
            rps: 100,
            secs: 6,
            rounds: 1,
            alt_proxy: None,
            weft: args.weft.clone(),
            weft_proxy: args.weft_proxy.clone(),
            keep: None,
            cache_sim: false,
        };
        for r in crate::profile::instr(&i).await? {
            if let Some(b) = pairs.get_mut(&r.pair) {
                b.instructions_per_req = if b.instructions_per_req > 0.0 {
                    b.instructions_per_req.min(r.instructions_per_req)
                } else {
                    r.instructions_per_req
                };
            }
        }
    }
    let now = GateFile {
        date: results.date.clone(),
        weft_proxy: args.weft_proxy.display().to_string(),
        loadavg: results.runs.iter().filter(|r| r.pair == "baseline").map(|r| r.loadavg_before.clone()).collect(),
        pairs,
    };
    if args.save {
        std::fs::write(&args.baseline, serde_json::to_string_pretty(&now)? + "\n")?;
        eprintln!(
            "gate: saved {} as the baseline (load average per round: {:?})",
            args.baseline.display(),
            now.loadavg
        );
        return Ok(true);
    }
    let text = std::fs::read_to_string(&args.baseline)
        .with_context(|| format!("{} (save one with `weft-bench gate --save`)", args.baseline.display()))?;
    let saved: GateFile = serde_json::from_str(&text).with_context(|| args.baseline.display().to_string())?;
    let mut ok = layout_ok;
    println!("| pair | figure (best round) | baseline {} | now | allowed | verdict |", saved.date);
    println!("|---|---|---:|---:|---:|---|");
    println!(
        "| – | functions of the symbol order list in the build | – | {found} of {listed} | ≥ 80% | {} |",
        if layout_ok { "ok" } else { "**STALE**" }
    );
    for (pair, n) in &now.pairs {
        let Some(s) = saved.pairs.get(pair) else { continue };
        for c in compare(pair, s, n) {
            ok &= !c.regressed;
            println!(
                "| {} | {} | {:.1} | {:.1} | {} | {} |",
                c.pair,
                c.what,
                c.saved,
                c.now,
                c.allowed,
                if c.regressed { "**REGRESSED**" } else { "ok" }
            );
        }
    }
    println!("\nload average per round: now {:?}, baseline {:?}", now.loadavg, saved.loadavg);
    Ok(ok)
}
