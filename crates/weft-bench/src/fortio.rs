//! Fortio's `load` on the benchmark's generator: `-c` keep-alive HTTP/1.1 connections
//! sending `-n` calls in all (or for a duration) at `-qps` in total (0: as fast as each
//! connection goes), every answer counted by status code (`-1` for a call that got no
//! answer: refused, reset, closed), latencies in the same histogram as the benchmarks.
//! `FortioResult::summary` prints Fortio's closing lines, which Istio's tasks quote
//! ("Code 200 : 17 (85.0 %)", "# target 50% 0.0046", ...).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::Request;
use http_body_util::{BodyExt, Empty};

use crate::load::{h1_connect, latency_histogram, on_own_thread, Target};

/// One `weft load` run.
#[derive(Clone, Debug)]
pub struct FortioOptions {
    /// Where to connect and the URI of every call (absolute form through a proxy).
    pub target: Target,
    /// The `Host` header.
    pub host: String,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// Connections (Fortio's `-c`), each with one call in flight.
    pub conns: usize,
    /// Total calls (`-n`); None: run for `duration`.
    pub calls: Option<u64>,
    /// Total calls per second over all connections (`-qps`); 0: no pacing.
    pub qps: f64,
    /// How long to run when `calls` is None (`-t`).
    pub duration: Duration,
}

/// What a run saw.
#[derive(Clone, Debug)]
pub struct FortioResult {
    /// Calls per HTTP status; `-1` for calls without an answer.
    pub codes: BTreeMap<i32, u64>,
    /// Latency of every call, answered or not, in nanoseconds.
    pub latency: Histogram<u64>,
    /// Connections opened.
    pub sockets: u64,
    /// Connections asked for.
    pub conns: usize,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl FortioResult {
    /// Calls made.
    pub fn calls(&self) -> u64 {
        self.codes.values().sum()
    }

    /// Calls answered with `code`.
    pub fn count(&self, code: i32) -> u64 {
        self.codes.get(&code).copied().unwrap_or(0)
    }

    /// Fortio's summary lines.
    pub fn summary(&self) -> String {
        let s = |ns: f64| ns / 1e9;
        let h = &self.latency;
        let calls = self.calls();
        let mut out = format!(
            "Aggregated Function Time : count {calls} avg {:.6} +/- {:.6} min {:.6} max {:.6} sum {:.6}\n",
            s(h.mean()),
            s(h.stdev()),
            s(h.min() as f64),
            s(h.max() as f64),
            s(h.mean() * calls as f64)
        );
        for (label, q) in [("50%", 0.5), ("75%", 0.75), ("90%", 0.9), ("99%", 0.99), ("99.9%", 0.999)] {
            out.push_str(&format!("# target {label} {:.6}\n", s(h.value_at_quantile(q) as f64)));
        }
        out.push_str(&format!("Sockets used: {} (for perfect keepalive, would be {})\n", self.sockets, self.conns));
        for (code, n) in &self.codes {
            let pct = if calls == 0 { 0.0 } else { *n as f64 * 100.0 / calls as f64 };
            out.push_str(&format!("Code {code} : {n} ({pct:.1} %)\n"));
        }
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        out.push_str(&format!(
            "All done {calls} calls (plus 0 warmup) {:.3} ms avg, {:.1} qps\n",
            h.mean() / 1e6,
            calls as f64 / secs
        ));
        out
    }
}

/// Runs the load on a thread of its own.
pub async fn run(opts: FortioOptions) -> anyhow::Result<FortioResult> {
    anyhow::ensure!(opts.conns > 0, "-c must be at least 1");
    anyhow::ensure!(opts.qps.is_finite() && opts.qps >= 0.0, "-qps must be 0 (no pacing) or more");
    on_own_thread(move || {
        Box::pin(async move {
            let start = Instant::now();
            let end = start + opts.duration;
            let conns = opts.conns;
            // Fortio's split: n / c calls per connection, the remainder to the first ones.
            let per_conn = |i: usize| opts.calls.map(|n| n / conns as u64 + u64::from((i as u64) < n % conns as u64));
            let period = (opts.qps > 0.0).then(|| Duration::from_secs_f64(conns as f64 / opts.qps));
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..conns {
                let opts = opts.clone();
                let limit = per_conn(i);
                tasks.spawn(async move {
                    let mut seen = Seen { codes: BTreeMap::new(), latency: latency_histogram(), sockets: 0 };
                    let mut conn = None;
                    let offset = period.map(|p| p.mul_f64(i as f64 / conns as f64)).unwrap_or_default();
                    for k in 0u32.. {
                        match limit {
                            Some(n) if u64::from(k) >= n => break,
                            None if Instant::now() >= end => break,
                            _ => {}
                        }
                        if let Some(p) = period {
                            tokio::time::sleep_until((start + offset + p * k).into()).await;
                        }
                        let sent = Instant::now();
                        let code = call(&mut conn, &opts, &mut seen.sockets).await;
                        let _ = seen.latency.record((sent.elapsed().as_nanos() as u64).max(1));
                        *seen.codes.entry(code).or_default() += 1;
                        if code == -1 && conn.is_none() {
                            // Nothing listens: do not spin.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    seen
                });
            }
            let mut all = Seen { codes: BTreeMap::new(), latency: latency_histogram(), sockets: 0 };
            while let Some(t) = tasks.join_next().await {
                let t = t?;
                let _ = all.latency.add(&t.latency);
                all.sockets += t.sockets;
                for (c, n) in t.codes {
                    *all.codes.entry(c).or_default() += n;
                }
            }
            Ok(FortioResult {
                codes: all.codes,
                latency: all.latency,
                sockets: all.sockets,
                conns,
                elapsed: start.elapsed(),
            })
        })
    })
    .await
}

struct Seen {
    codes: BTreeMap<i32, u64>,
    latency: Histogram<u64>,
    sockets: u64,
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// One call on the connection (opened first when there is none or it was closed): the
/// status, or -1 (and the connection dropped) when no answer came.
async fn call(conn: &mut Option<Sender>, opts: &FortioOptions, sockets: &mut u64) -> i32 {
    if conn.as_ref().is_none_or(|s| s.is_closed()) {
        *conn = None;
        match h1_connect(opts.target.addr).await {
            Ok(s) => {
                *sockets += 1;
                *conn = Some(s);
            }
            Err(_) => return -1,
        }
    }
    let Some(sender) = conn.as_mut() else { return -1 };
    let mut req =
        Request::get(opts.target.uri.clone()).header("host", &opts.host).header("user-agent", "fortio.org/fortio-weft");
    for (k, v) in &opts.headers {
        req = req.header(k, v);
    }
    let Ok(req) = req.body(Empty::new()) else { return -1 };
    let answer = async {
        sender.ready().await.ok()?;
        let resp = sender.send_request(req).await.ok()?;
        let status = i32::from(resp.status().as_u16());
        resp.into_body().collect().await.ok()?;
        Some(status)
    };
    match answer.await {
        Some(status) => status,
        None => {
            *conn = None;
            -1
        }
    }
}
