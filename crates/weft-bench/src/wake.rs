//! `weft-bench wake`: what each request costs the kernel at a fixed rate (issue 20). At
//! 1,000 requests/s over 16 connections each request arrives alone, so a proxy's cost per
//! request is mostly what each wake-up costs: system calls, context switches, kernel time.
//! For every pair (interleaved rounds, `--alt-proxy` for A/B as in `outside`), both
//! proxies are counted during one fixed-rate window:
//!
//! - system calls by kind with `perf stat` on syscall tracepoints (in-kernel counters:
//!   the process is not slowed the way `strace` slows it), reads that returned `EAGAIN`
//!   and `epoll_wait` calls with a zero timeout (a poll that cannot sleep);
//! - context switches (voluntary and not) per thread (`/proc/PID/task/*/status`), so a
//!   helper thread that wakes (the allocator trimmer, tokio's blocking pool) is named;
//! - TCP segments sent and received per request on the proxy's established sockets
//!   (`ss -tinp`, read every 100 ms through the window so that the load generator's
//!   connections, closed when the load stops, still count), data or not: a pure ACK that
//!   wakes nobody still costs the kernel;
//! - user and kernel CPU time (`/proc/PID/stat`, clock ticks) and run time
//!   (`schedstat`, nanoseconds).
//!
//! Each figure is divided by the requests answered in the window. Prints one JSON line
//! per proxy per pair per round, and a table.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context};
use serde::{Deserialize, Serialize};

use crate::load;
use crate::outside::{loadavg, run_ns, start_pair, user_sys_s, Builds};
use crate::procs::Pinning;
use crate::stack::Tools;

/// What `wake` counts and how long.
#[derive(Clone, Debug, clap::Args)]
pub struct WakeArgs {
    /// Pairs (weft-h1, weft-h2, haproxy, envoy-static, ...).
    #[arg(long, value_delimiter = ',', default_value = "weft-h1,weft-h2,haproxy")]
    pub pairs: Vec<String>,
    /// Interleaved rounds.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Requests per second of the fixed-rate window.
    #[arg(long, default_value_t = 1000)]
    pub rps: u32,
    /// Connections of the load generator.
    #[arg(long, default_value_t = 16)]
    pub conns: usize,
    /// Warm-up at the fixed rate, seconds.
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// Counted window, seconds.
    #[arg(long, default_value_t = 5)]
    pub secs: u64,
    #[command(flatten)]
    pub builds: Builds,
}

/// The counted events: (label, perf event, tracepoint filter).
const EVENTS: &[(&str, &str, Option<&str>)] = &[
    ("syscalls", "raw_syscalls:sys_enter", None),
    ("epoll_wait", "syscalls:sys_enter_epoll_wait", None),
    ("epoll_wait_t0", "syscalls:sys_enter_epoll_wait", Some("timeout == 0")),
    ("epoll_pwait", "syscalls:sys_enter_epoll_pwait", None),
    ("epoll_ctl", "syscalls:sys_enter_epoll_ctl", None),
    ("read", "syscalls:sys_enter_read", None),
    ("read_eagain", "syscalls:sys_exit_read", Some("ret == -11")),
    ("recvfrom", "syscalls:sys_enter_recvfrom", None),
    ("recvfrom_eagain", "syscalls:sys_exit_recvfrom", Some("ret == -11")),
    ("readv", "syscalls:sys_enter_readv", None),
    ("write", "syscalls:sys_enter_write", None),
    ("writev", "syscalls:sys_enter_writev", None),
    ("sendto", "syscalls:sys_enter_sendto", None),
    ("sendmsg", "syscalls:sys_enter_sendmsg", None),
    ("futex", "syscalls:sys_enter_futex", None),
    ("setsockopt", "syscalls:sys_enter_setsockopt", None),
    ("clock_nanosleep", "syscalls:sys_enter_clock_nanosleep", None),
    ("context_switches", "context-switches", None),
    ("page_faults", "page-faults", None),
    ("brk", "syscalls:sys_enter_brk", None),
    ("mmap", "syscalls:sys_enter_mmap", None),
    ("munmap", "syscalls:sys_enter_munmap", None),
    ("madvise", "syscalls:sys_enter_madvise", None),
];

/// One proxy of one pair in one round, per request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WakeRun {
    pub pair: String,
    pub round: usize,
    /// `server` or `client`.
    pub role: String,
    pub requests: u64,
    /// Event counts per request (labels of [`EVENTS`]).
    pub per_req: BTreeMap<String, f64>,
    /// Voluntary + involuntary context switches per request, by thread name.
    pub switches_by_thread: BTreeMap<String, f64>,
    pub user_us_per_req: f64,
    pub sys_us_per_req: f64,
    pub run_us_per_req: f64,
    pub loadavg: String,
}

/// Context switches of each thread of `pid`, summed by thread name.
fn switches(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("status")) else { continue };
        let mut name = String::from("?");
        let mut n = 0;
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("Name:") {
                name = v.trim().to_string();
            } else if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                n += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
        *out.entry(name).or_default() += n;
    }
    out
}

/// TCP segment counters of a process's established sockets, by socket (`ss -tinp`):
/// `[segs_out, data_segs_out, segs_in, data_segs_in]`. A segment that is not a data
/// segment is (on an established connection) a pure ACK or a window update.
fn segments(pid: u32) -> BTreeMap<String, [u64; 4]> {
    match std::process::Command::new("ss").args(["-tinpH", "state", "established"]).output() {
        Ok(o) => parse_segments(&String::from_utf8_lossy(&o.stdout), pid),
        Err(_) => BTreeMap::new(),
    }
}

/// [`segments`] from the text of `ss -tinpH state established`: a line per socket
/// (`Recv-Q Send-Q local peer users:((..,pid=N,..))`), then an indented line of counters.
/// A socket is keyed by its two addresses only: its queues change from one reading to the
/// next (a response not yet acknowledged sits in Send-Q), and a key with them made the
/// same socket look new, counted from zero with all its past segments (the server
/// sidecar's ~2.4 segments per request where each of its sockets sent one per request).
fn parse_segments(text: &str, pid: u32) -> BTreeMap<String, [u64; 4]> {
    let mut out = BTreeMap::new();
    let owner = format!("pid={pid},");
    let mut current: Option<String> = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            current = line.contains(&owner).then(|| socket_key(line));
            continue;
        }
        let Some(key) = current.take() else { continue };
        let field = |name: &str| -> u64 {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(name).and_then(|v| v.strip_prefix(':')))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        out.insert(key, [field("segs_out"), field("data_segs_out"), field("segs_in"), field("data_segs_in")]);
    }
    out
}

/// A socket's `local peer` addresses from its `ss` line (the 3rd and 4th columns).
fn socket_key(line: &str) -> String {
    line.split_whitespace().skip(2).take(2).collect::<Vec<_>>().join(" ")
}

/// Follows the segment counters of a process's sockets through the counted window: a
/// thread reads [`segments`] every [`SEGMENT_SAMPLE`] and keeps each socket's latest
/// counters, so a socket closed before the window's end (the load generator's connections
/// to the client sidecar close when the load stops, before the last reading) still
/// counts, up to its last sample.
struct SegmentWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<BTreeMap<String, [u64; 4]>>,
}

/// How often [`SegmentWatch`] reads the counters: a closed socket's last moments (at most
/// this long) are lost.
const SEGMENT_SAMPLE: Duration = Duration::from_millis(100);

impl SegmentWatch {
    /// Starts following `pid`'s sockets.
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut latest = BTreeMap::new();
            while !flag.load(Ordering::Relaxed) {
                keep_latest(&mut latest, segments(pid));
                std::thread::sleep(SEGMENT_SAMPLE);
            }
            latest
        });
        SegmentWatch { stop, thread }
    }

    /// Stops following; every socket seen, with its latest counters (`last`, a reading
    /// taken now, included).
    fn finish(self, last: BTreeMap<String, [u64; 4]>) -> BTreeMap<String, [u64; 4]> {
        self.stop.store(true, Ordering::Relaxed);
        let mut latest = self.thread.join().unwrap_or_default();
        keep_latest(&mut latest, last);
        latest
    }
}

/// Merges a [`segments`] reading into `latest`: the counters only grow, so a socket's
/// newest reading replaces its older one, and a socket gone from `reading` keeps its last.
fn keep_latest(latest: &mut BTreeMap<String, [u64; 4]>, reading: BTreeMap<String, [u64; 4]>) {
    latest.extend(reading);
}

/// Segments per request between two [`segments`] readings: sockets opened in between
/// count from zero, sockets closed in between are left out ([`SegmentWatch`] keeps them).
fn segments_per_req(
    before: &BTreeMap<String, [u64; 4]>,
    after: &BTreeMap<String, [u64; 4]>,
    n: f64,
) -> [(&'static str, f64); 4] {
    let mut d = [0u64; 4];
    for (key, a) in after {
        let b = before.get(key).copied().unwrap_or([0; 4]);
        for i in 0..4 {
            d[i] += a[i].saturating_sub(b[i]);
        }
    }
    [
        ("tcp_data_segs_out", d[1] as f64 / n),
        ("tcp_other_segs_out", d[0].saturating_sub(d[1]) as f64 / n),
        ("tcp_data_segs_in", d[3] as f64 / n),
        ("tcp_other_segs_in", d[2].saturating_sub(d[3]) as f64 / n),
    ]
}

/// Starts `perf stat` counting [`EVENTS`] on `pid`, writing CSV to `out`.
fn start_perf(pid: u32, out: &Path) -> anyhow::Result<std::process::Child> {
    let mut cmd = std::process::Command::new("perf");
    cmd.args(["stat", "-x", ",", "-o"]).arg(out);
    for (_, event, filter) in EVENTS {
        cmd.args(["-e", event]);
        if let Some(f) = filter {
            cmd.args(["--filter", f]);
        }
    }
    cmd.args(["-p", &pid.to_string()]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    cmd.spawn().context("perf stat (is perf installed, and may this user trace?)")
}

/// Stops `perf` (SIGINT makes it print its counts) and reads them in [`EVENTS`] order.
fn stop_perf(mut perf: std::process::Child, out: &Path) -> anyhow::Result<Vec<u64>> {
    std::process::Command::new("kill").args(["-INT", &perf.id().to_string()]).status()?;
    perf.wait()?;
    let text = std::fs::read_to_string(out)?;
    let counts: Vec<u64> = text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(','))
        .map(|l| l.split(',').next().unwrap_or("").trim().parse::<u64>().unwrap_or(0))
        .collect();
    ensure!(counts.len() == EVENTS.len(), "perf stat gave {} counts, expected {}: {text}", counts.len(), EVENTS.len());
    Ok(counts)
}

async fn one(
    pair: &str,
    round: usize,
    args: &WakeArgs,
    tools: &Tools,
    apps: crate::stack::Apps,
    scratch: &Path,
) -> anyhow::Result<Vec<WakeRun>> {
    let stack = start_pair(pair, tools, apps).await?;
    load::h1_fixed_rate(&stack.h1, args.rps, args.conns, Duration::from_secs(args.warmup_secs)).await?;
    let mut probes = Vec::new();
    for (i, p) in stack.proxies.iter().enumerate() {
        let pid = p.proc.pid()?;
        let out = scratch.join(format!("perf-{round}-{}-{i}.csv", pair.replace('@', "_")));
        let perf = start_perf(pid, &out)?;
        probes.push((p.role.to_string(), pid, out, perf));
    }
    // perf attaches to every thread before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before: Vec<_> = probes
        .iter()
        .map(|(_, pid, _, _)| Ok((switches(*pid), user_sys_s(*pid)?, run_ns(*pid)?, segments(*pid))))
        .collect::<anyhow::Result<_>>()?;
    let watches: Vec<SegmentWatch> = probes.iter().map(|(_, pid, _, _)| SegmentWatch::start(*pid)).collect();
    let r = load::h1_fixed_rate(&stack.h1, args.rps, args.conns, Duration::from_secs(args.secs)).await?;
    let after: Vec<_> = probes
        .iter()
        .zip(watches)
        .map(|((_, pid, _, _), w)| Ok((switches(*pid), user_sys_s(*pid)?, run_ns(*pid)?, w.finish(segments(*pid)))))
        .collect::<anyhow::Result<_>>()?;
    let n = r.ok.max(1) as f64;
    let mut runs = Vec::new();
    for ((role, _, out, perf), (b, a)) in probes.into_iter().zip(before.iter().zip(&after)) {
        let counts = stop_perf(perf, &out)?;
        let mut per_req: BTreeMap<String, f64> =
            EVENTS.iter().zip(&counts).map(|((label, _, _), c)| (label.to_string(), *c as f64 / n)).collect();
        per_req.extend(segments_per_req(&b.3, &a.3, n).iter().map(|(k, v)| (k.to_string(), *v)));
        let switches_by_thread =
            a.0.iter()
                .map(|(name, v)| (name.clone(), v.saturating_sub(b.0.get(name).copied().unwrap_or(0)) as f64 / n))
                .filter(|(_, v)| *v > 0.0)
                .collect();
        runs.push(WakeRun {
            pair: pair.to_string(),
            round,
            role,
            requests: r.ok,
            per_req,
            switches_by_thread,
            user_us_per_req: (a.1 .0 - b.1 .0) * 1e6 / n,
            sys_us_per_req: (a.1 .1 - b.1 .1) * 1e6 / n,
            run_us_per_req: a.2.saturating_sub(b.2) as f64 / 1000.0 / n,
            loadavg: loadavg(),
        });
    }
    ensure!(r.errors == 0, "{pair} round {round}: {} failed requests", r.errors);
    Ok(runs)
}

/// Counts every pair in interleaved rounds.
pub async fn run(args: &WakeArgs) -> anyhow::Result<Vec<WakeRun>> {
    let (tools, alt) = args.builds.tools();
    let mut pairs: Vec<String> = Vec::new();
    for p in &args.pairs {
        pairs.push(p.clone());
        if alt.is_some() && p.starts_with("weft-") {
            pairs.push(format!("{p}@alt"));
        }
    }
    let scratch = tempfile::Builder::new().prefix("weft-bench-wake-").tempdir()?;
    let (_echo, apps) = crate::run::start_echo(&Pinning { apps: None, proxies: None }, scratch.path()).await?;
    let mut runs = Vec::new();
    for round in 1..=args.rounds {
        for pair in &pairs {
            let t =
                if pair.ends_with("@alt") { alt.as_ref().ok_or_else(|| anyhow!("no --alt-proxy"))? } else { &tools };
            let got = one(pair, round, args, t, apps, scratch.path()).await?;
            for w in &got {
                eprintln!("wake: {}", line(w));
            }
            runs.extend(got);
        }
    }
    Ok(runs)
}

/// One run as a line of the table.
pub fn line(w: &WakeRun) -> String {
    let g = |k: &str| w.per_req.get(k).copied().unwrap_or(0.0);
    format!(
        "{:>13} r{} {:6} | sys/req {:5.1} | epoll_wait {:4.2} (t0 {:4.2}) | read {:4.2} EAGAIN {:4.2} | recvfrom {:4.2} EAGAIN {:4.2} | write {:4.2} writev {:4.2} sendto {:4.2} | futex {:4.2} | cs {:4.2} | faults {:4.2} | TCP segs out {:4.2} (+{:4.2} non-data) in {:4.2} (+{:4.2}) | user {:5.1} sys {:5.1} run {:5.1} us/req | {:?} | load {}",
        w.pair,
        w.round,
        w.role,
        g("syscalls"),
        g("epoll_wait") + g("epoll_pwait"),
        g("epoll_wait_t0"),
        g("read") + g("readv"),
        g("read_eagain"),
        g("recvfrom"),
        g("recvfrom_eagain"),
        g("write"),
        g("writev"),
        g("sendto") + g("sendmsg"),
        g("futex"),
        g("context_switches"),
        g("page_faults"),
        g("tcp_data_segs_out"),
        g("tcp_other_segs_out"),
        g("tcp_data_segs_in"),
        g("tcp_other_segs_in"),
        w.user_us_per_req,
        w.sys_us_per_req,
        w.run_us_per_req,
        w.switches_by_thread.iter().map(|(k, v)| format!("{k}={v:.2}")).collect::<Vec<_>>(),
        w.loadavg
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SS: &str = "0      0      127.0.0.1:36977 127.0.0.1:51196 users:((\"weft-proxy\",pid=9846,fd=32))
\t bbr wscale:10,10 rto:208 segs_out:546 segs_in:583 data_segs_out:542 data_segs_in:543 lastsnd:12
0      1128   127.0.0.1:33869 127.0.0.1:60876 users:((\"weft-proxy\",pid=98461,fd=29))
\t bbr segs_out:368 segs_in:370 data_segs_out:365 data_segs_in:365
";

    #[test]
    fn segments_are_read_for_the_sockets_of_one_process_only() {
        let got = parse_segments(SS, 9846);
        assert_eq!(got.len(), 1, "pid=98461 is another process: {got:?}");
        assert_eq!(got.values().next(), Some(&[546, 542, 583, 543]));
    }

    #[test]
    fn a_socket_whose_queues_changed_between_readings_is_the_same_socket() {
        let before = parse_segments(SS, 9846);
        let later = SS.replace("0      0      127.0.0.1:36977", "0      1627   127.0.0.1:36977").replace(
            "segs_out:546 segs_in:583 data_segs_out:542 data_segs_in:543",
            "segs_out:556 segs_in:593 data_segs_out:552 data_segs_in:553",
        );
        let after = parse_segments(&later, 9846);
        assert_eq!(before.keys().collect::<Vec<_>>(), ["127.0.0.1:36977 127.0.0.1:51196"]);
        assert_eq!(
            after.keys().collect::<Vec<_>>(),
            before.keys().collect::<Vec<_>>(),
            "Send-Q is not part of the key"
        );
        let got = segments_per_req(&before, &after, 10.0);
        assert_eq!(got[0], ("tcp_data_segs_out", 1.0), "10 data segments in 10 requests, not the socket's whole past");
    }

    #[test]
    fn a_socket_closed_during_the_window_keeps_its_last_reading() {
        let mut latest = BTreeMap::new();
        keep_latest(&mut latest, BTreeMap::from([("load".to_string(), [5, 4, 5, 4]), ("a".to_string(), [1, 1, 1, 1])]));
        keep_latest(&mut latest, BTreeMap::from([("load".to_string(), [9, 8, 9, 8])]));
        keep_latest(&mut latest, BTreeMap::from([("a".to_string(), [3, 2, 3, 2])]));
        assert_eq!(
            latest,
            BTreeMap::from([("load".to_string(), [9, 8, 9, 8]), ("a".to_string(), [3, 2, 3, 2])]),
            "the closed socket `load` keeps its newest counters, `a` moves on"
        );
    }

    #[test]
    fn segments_per_request_count_new_sockets_from_zero_and_leave_closed_ones_out() {
        let before = BTreeMap::from([("a".to_string(), [10, 8, 10, 9]), ("gone".to_string(), [99, 0, 99, 0])]);
        let after = BTreeMap::from([("a".to_string(), [30, 26, 31, 29]), ("new".to_string(), [4, 4, 2, 1])]);
        let got = segments_per_req(&before, &after, 2.0);
        // a: 20 out (18 data), 21 in (20 data); new: 4 out (4 data), 2 in (1 data).
        assert_eq!(
            got,
            [
                ("tcp_data_segs_out", 11.0),
                ("tcp_other_segs_out", 1.0),
                ("tcp_data_segs_in", 10.5),
                ("tcp_other_segs_in", 1.0)
            ]
        );
    }
}
