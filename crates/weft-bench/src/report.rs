//! Renders `docs/benchmarks.md` from a results file: tables with medians over rounds and
//! their spread, ratios weft/Envoy, each target met or not, then the hand-written notes
//! (`bench/notes.md`: method details and profile evidence).

use std::fmt::Write as _;

use crate::run::{Results, ScenarioRun};
use crate::stack::Kind;

/// `YYYY-MM-DDTHH:MM:SSZ` now.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A figure over rounds: median and range.
#[derive(Clone, Copy, Debug)]
struct Fig {
    med: f64,
    min: f64,
    max: f64,
}

impl Fig {
    fn of(v: Vec<f64>) -> Fig {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Fig { med: median(v), min, max }
    }

    /// `med (min–max)` with `prec` decimals.
    fn show(self, prec: usize) -> String {
        if self.med.is_nan() {
            return "–".into();
        }
        format!("{:.p$} ({:.p$}–{:.p$})", self.med, self.min, self.max, p = prec)
    }
}

struct Summary<'a> {
    runs: Vec<&'a ScenarioRun>,
}

impl<'a> Summary<'a> {
    fn new(results: &'a Results, kind: Kind) -> Summary<'a> {
        Summary { runs: results.scenarios.iter().filter(|s| s.kind == kind).collect() }
    }

    fn fig(&self, f: impl Fn(&ScenarioRun) -> f64) -> Fig {
        Fig::of(self.runs.iter().map(|r| f(r)).collect())
    }

    fn proxy_fig(&self, role: &str, f: impl Fn(&crate::run::ProxyFigures) -> f64) -> Fig {
        Fig::of(self.runs.iter().filter_map(|r| r.proxies.iter().find(|p| p.role == role).map(&f)).collect())
    }

    fn has_proxies(&self) -> bool {
        self.runs.iter().any(|r| !r.proxies.is_empty())
    }

    /// CPU seconds per 10,000 requests of both proxies together.
    fn cpu(&self, f: impl Fn(&crate::run::ProxyFigures) -> f64) -> Fig {
        self.fig(|r| r.proxies.iter().map(&f).sum())
    }

    /// The larger of the two proxies' peak RSS.
    fn peak_rss(&self) -> Fig {
        self.fig(|r| r.proxies.iter().map(|p| p.peak_rss_mib).fold(0.0, f64::max))
    }
}

type Pick = fn(&crate::load::Latency) -> f64;

const PERCENTILES: [(&str, Pick); 5] =
    [("p50", |l| l.p50), ("p90", |l| l.p90), ("p99", |l| l.p99), ("p99.9", |l| l.p999), ("max", |l| l.max)];

fn latency_table(out: &mut String, results: &Results, grpc: bool) {
    let pick = |r: &ScenarioRun| if grpc { r.grpc.latency_us.clone() } else { r.http1.latency_us.clone() };
    let base = Summary::new(results, Kind::Baseline);
    let _ = writeln!(
        out,
        "| scenario | p50 | p90 | p99 | p99.9 | max | added p50 | added p90 | added p99 | added p99.9 |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for kind in Kind::ALL {
        let s = Summary::new(results, kind);
        if s.runs.is_empty() {
            continue;
        }
        let mut row = format!("| {} ", kind.name());
        for (_, p) in PERCENTILES {
            let _ = write!(row, "| {} ", s.fig(|r| p(&pick(r))).show(0));
        }
        for (_, p) in &PERCENTILES[..4] {
            let added = s.fig(|r| p(&pick(r))).med - base.fig(|r| p(&pick(r))).med;
            let _ = write!(
                row,
                "| {} ",
                if kind == Kind::Baseline || added.is_nan() { "–".into() } else { format!("{added:.0}") }
            );
        }
        let _ = writeln!(out, "{row}|");
    }
}

/// Added latency (median of the scenario minus median of the baseline), µs.
fn added(results: &Results, kind: Kind, p: Pick) -> f64 {
    let s = Summary::new(results, kind).fig(|r| p(&r.http1.latency_us)).med;
    let b = Summary::new(results, Kind::Baseline).fig(|r| p(&r.http1.latency_us)).med;
    s - b
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "**met**"
    } else {
        "**missed**"
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() || b == 0.0 {
        "–".into()
    } else {
        format!("{:.2}", a / b)
    }
}

/// The markdown report.
pub fn render(
    results: &Results,
    outside: Option<&crate::outside::OutsideResults>,
    notes: &str,
    command: &str,
) -> String {
    let mut out = String::new();
    let m = &results.machine;
    let st = &results.settings;
    let _ = writeln!(out, "# Benchmarks\n");
    let took = match results.prepare_s {
        Some(p) => format!(
            "set-up and release build {p:.0} s, measurements {:.0} s: {:.1} minutes in all",
            results.duration_s,
            (p + results.duration_s) / 60.0
        ),
        None => format!("the measurements took {:.0} s", results.duration_s),
    };
    let _ = writeln!(
        out,
        "Generated by `{command}` on {} ({took}). Raw results: `bench/results/` (JSON). Do not edit the tables by hand: edit `bench/notes.md` (the text after the tables) or the harness (`crates/weft-bench`) and run the command again.\n",
        results.date
    );
    let _ = writeln!(out, "## Machine and settings\n");
    let _ = writeln!(
        out,
        "- Machine: {} CPUs ({}), {:.1} GiB RAM, {}, kernel {}.",
        m["cpus"],
        m["cpu"].as_str().unwrap_or("?"),
        m["memory_gib"].as_f64().unwrap_or(0.0),
        m["os"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        out,
        "- Load average (1/5/15 min) at the start: {}; at the end: {}. The machine is shared with other builds: read the spreads.",
        m["loadavg_start"].as_str().unwrap_or("?"),
        m["loadavg_end"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        out,
        "- Pinning (`taskset`): load generator, echo server and control plane on CPU {}, every proxy (both sidecars of a scenario) on CPU {}.",
        m["pinning"]["apps_cpu"].as_str().unwrap_or("none"),
        m["pinning"]["proxies_cpu"].as_str().unwrap_or("none")
    );
    // Results from before the proxy-only binary have no `weft_proxy`: their sidecars
    // ran `weft proxy`.
    let sidecars = match st["versions"]["weft_proxy"].as_str() {
        Some(v) => format!(" (control plane; the sidecars run the proxy-only binary, {v})"),
        None => " (sidecars: `weft proxy`)".to_string(),
    };
    let _ = writeln!(
        out,
        "- Versions: {}{}; {}; {}.",
        st["versions"]["weft"].as_str().unwrap_or("?"),
        sidecars,
        st["versions"]["envoy"].as_str().unwrap_or("?"),
        st["versions"]["haproxy"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        out,
        "- Load: {} rounds; in each round every scenario starts fresh and gets {} s of HTTP/1.1 warm-up, {} s of HTTP/1.1 at {} requests/s over {} connections, 2 s gRPC warm-up, {} s of gRPC unary at the same rate, 1 s + {} s of maximum throughput (closed loop, {} connections). {} worker thread(s) per proxy throughout. Figures are medians over rounds, (min–max) in brackets.\n",
        st["runs"], st["warmup_s"], st["http1_s"], st["rps"], st["conns"], st["grpc_s"], st["max_s"], st["conns"], st["workers"]
    );

    let _ =
        writeln!(out, "## Latency, HTTP/1.1, 1 KiB responses, {} requests/s, mTLS between sidecars (µs)\n", st["rps"]);
    latency_table(&mut out, results, false);
    let _ = writeln!(out, "\n## Latency, gRPC unary (HTTP/2), 1 KiB responses, {} calls/s (µs)\n", st["rps"]);
    latency_table(&mut out, results, true);

    let _ = writeln!(out, "\n## Proxy cost\n");
    let _ = writeln!(
        out,
        "CPU: user + system seconds of both proxies together (`/proc/PID/stat`) per 10,000 requests in the measured window. Peak RSS: `VmHWM` of each proxy after the fixed-rate runs. Max throughput: closed loop, one worker per proxy. Ready: process start to `/ready` (weft and Envoy: config and certificate in; HAProxy: stats socket up).\n"
    );
    let _ = writeln!(
        out,
        "| scenario | CPU s / 10k req, HTTP/1.1 | CPU s / 10k calls, gRPC | CPU s / 10k req at max | peak RSS client (MiB) | peak RSS server (MiB) | max req/s, 1 worker | ready client (ms) | ready server (ms) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for kind in Kind::ALL {
        let s = Summary::new(results, kind);
        if s.runs.is_empty() {
            continue;
        }
        let dash = |f: Fig, p: usize| if s.has_proxies() { f.show(p) } else { "–".into() };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            kind.name(),
            dash(s.cpu(|p| p.cpu_s_per_10k_http1), 2),
            dash(s.cpu(|p| p.cpu_s_per_10k_grpc), 2),
            dash(s.cpu(|p| p.cpu_s_per_10k_max), 2),
            dash(s.proxy_fig("client", |p| p.peak_rss_mib), 1),
            dash(s.proxy_fig("server", |p| p.peak_rss_mib), 1),
            s.fig(|r| r.max.rps).show(0),
            dash(s.proxy_fig("client", |p| p.ready_ms.unwrap_or(f64::NAN)), 0),
            dash(s.proxy_fig("server", |p| p.ready_ms.unwrap_or(f64::NAN)), 0),
        );
    }

    // Targets.
    let (w, e, h) =
        (Summary::new(results, Kind::Weft), Summary::new(results, Kind::Envoy), Summary::new(results, Kind::Haproxy));
    if !w.runs.is_empty() && !e.runs.is_empty() {
        let _ = writeln!(out, "\n## Targets (ratios from the same run)\n");
        let _ = writeln!(
            out,
            "| target | weft | Envoy | HAProxy | weft / Envoy | verdict |\n|---|---:|---:|---:|---:|---|"
        );
        for (name, p) in [("p50", PERCENTILES[0].1), ("p99", PERCENTILES[2].1), ("p99.9", PERCENTILES[3].1)] {
            let (aw, ae, ah) =
                (added(results, Kind::Weft, p), added(results, Kind::Envoy, p), added(results, Kind::Haproxy, p));
            let vs_haproxy = if h.runs.is_empty() { "no HAProxy run" } else { verdict(aw <= ah) };
            let _ = writeln!(
                out,
                "| added latency {name} (µs) ≤ 0.5× Envoy's and ≤ HAProxy's | {aw:.0} | {ae:.0} | {} | {} | vs Envoy {}, vs HAProxy {vs_haproxy} |",
                if h.runs.is_empty() { "–".into() } else { format!("{ah:.0}") },
                ratio(aw, ae),
                verdict(aw <= 0.5 * ae)
            );
        }
        let (rw, re, rh) = (w.peak_rss().med, e.peak_rss().med, h.peak_rss().med);
        let _ = writeln!(
            out,
            "| peak RSS per proxy (MiB, larger of the two) ≤ 0.25× Envoy's and ≤ 12 MB (11.4 MiB) | {rw:.1} | {re:.1} | {rh:.1} | {} | {} |",
            ratio(rw, re),
            verdict(rw <= 0.25 * re && rw * 1024.0 * 1024.0 <= 12e6)
        );
        let (cw, ce, ch) = (
            w.cpu(|p| p.cpu_s_per_10k_http1).med,
            e.cpu(|p| p.cpu_s_per_10k_http1).med,
            h.cpu(|p| p.cpu_s_per_10k_http1).med,
        );
        let _ = writeln!(
            out,
            "| CPU s per 10k requests, both proxies, HTTP/1.1 ≤ 0.5× Envoy's | {cw:.2} | {ce:.2} | {ch:.2} | {} | {} |",
            ratio(cw, ce),
            verdict(cw <= 0.5 * ce)
        );
        let (mw, me, mh) = (w.fig(|r| r.max.rps).med, e.fig(|r| r.max.rps).med, h.fig(|r| r.max.rps).med);
        let _ = writeln!(
            out,
            "| max req/s at one worker ≥ 1.5× Envoy's | {mw:.0} | {me:.0} | {mh:.0} | {} | {} |",
            ratio(mw, me),
            verdict(mw >= 1.5 * me)
        );
        let ready_w = Fig::of(w.runs.iter().flat_map(|r| r.proxies.iter().filter_map(|p| p.ready_ms)).collect());
        let ready_e = Fig::of(e.runs.iter().flat_map(|r| r.proxies.iter().filter_map(|p| p.ready_ms)).collect());
        let _ = writeln!(
            out,
            "| proxy ready after start (ms, config and certificate in) ≤ 100 | {:.0} | {:.0} | – | {} | {} |",
            ready_w.med,
            ready_e.med,
            ratio(ready_w.med, ready_e.med),
            verdict(ready_w.max <= 100.0)
        );
        if let (Some(small), Some(big)) = (results.mesh_size.first(), results.mesh_size.last()) {
            let rss = |v: &serde_json::Value| v["rss_mib"]["after_requests"].as_f64().unwrap_or(f64::NAN);
            let r = rss(big) / rss(small);
            let _ = writeln!(
                out,
                "| proxy RSS with {} services ≤ 1.1× with {} | {:.1} vs {:.1} MiB | – | – | {r:.2}× | {} |",
                big["services"],
                small["services"],
                rss(big),
                rss(small),
                verdict(r <= 1.1)
            );
        }
        if let Some(p) = results.prepare_s {
            let all = (p + results.duration_s) / 60.0;
            let _ = writeln!(
                out,
                "| one command: set-up, release build and every table (minutes) < 20 | {all:.1} | – | – | – | {} |",
                verdict(all < 20.0)
            );
        }
        let _ = writeln!(
            out,
            "\nThe ready target is judged on the slowest weft start of all rounds (both sidecars); the others on medians."
        );
    }

    if let Some(o) = outside {
        out.push_str(&crate::outside::section(o));
    }

    if !results.mesh_size.is_empty() {
        let _ = writeln!(out, "\n## Proxy memory against mesh size\n");
        let _ = writeln!(
            out,
            "One weft sidecar (delta xDS, on demand, mesh identity) talks to 2 services (`svc-0`, `svc-1`, 200 requests/s each for 2 s) while the control plane holds N. RSS 1 s after ready and 1 s after the requests; held = what `/config_dump` lists afterwards.\n"
        );
        let _ = writeln!(out, "| services in the mesh | ready (ms) | RSS ready (MiB) | RSS after requests (MiB) | peak (MiB) | held vhosts / clusters |\n|---:|---:|---:|---:|---:|---:|");
        for v in &results.mesh_size {
            let _ = writeln!(
                out,
                "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {} / {} |",
                v["services"],
                v["ready_ms"].as_f64().unwrap_or(f64::NAN),
                v["rss_mib"]["ready"].as_f64().unwrap_or(f64::NAN),
                v["rss_mib"]["after_requests"].as_f64().unwrap_or(f64::NAN),
                v["rss_mib"]["peak"].as_f64().unwrap_or(f64::NAN),
                v["held"]["virtual_hosts"],
                v["held"]["clusters"]
            );
        }
    }

    if !results.control_plane.is_empty() {
        let _ = writeln!(out, "\n## Control plane: config change to all ACKs\n");
        let _ = writeln!(
            out,
            "`crates/weft/examples/xds_scale.rs`: one `weft control` serving Bookinfo to N simulated proxies (weft's ADS client, state of the world, one HTTP/2 connection each, in the example's process); after all have their config, `weft apply` changes the `reviews` VirtualService; time from just before the apply until each client has the new routes. RSS is the control plane's.\n"
        );
        let _ = writeln!(out, "| clients | initial sync of all (s) | change -> all ACKed p50 (ms) | p99 | max | CP RSS idle (MiB) | CP RSS connected (MiB) |\n|---:|---:|---:|---:|---:|---:|---:|");
        for v in &results.control_plane {
            if let Some(e) = v["error"].as_str() {
                let _ = writeln!(out, "| {} | failed: {} | | | | | |", v["clients"], e.lines().next().unwrap_or(e));
                continue;
            }
            let c = &v["change_to_all_acked_ms"];
            let r = &v["control_plane_rss_mib"];
            let f = |x: &serde_json::Value| x.as_f64().unwrap_or(f64::NAN);
            let _ = writeln!(
                out,
                "| {} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} |",
                v["clients"],
                f(&v["initial_sync_s"]),
                f(&c["p50"]),
                f(&c["p99"]),
                f(&c["max"]),
                f(&r["idle"]),
                f(&r["connected"])
            );
        }
    }

    let _ = writeln!(out, "\n## Proof that the load went through the proxies (last round)\n");
    let _ = writeln!(
        out,
        "After every scenario the harness reads the proxies' own counters and fails (non-zero exit, message naming the counter) unless both proxies counted at least every request the load generator got an answer to, and the hop between them was mTLS. Last round's counters:\n"
    );
    for kind in [Kind::Weft, Kind::Envoy, Kind::Haproxy] {
        if let Some(r) = results.scenarios.iter().rev().find(|s| s.kind == kind) {
            let total = r.http1.ok + r.grpc.ok + r.max.ok;
            let _ = writeln!(out, "- {} (≥ {total} measured requests plus warm-ups): `{}`", kind.name(), r.evidence);
        }
    }
    let _ = writeln!(out, "\n{}", notes.trim());
    out
}
