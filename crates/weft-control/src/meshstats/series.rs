//! Bounded time series of request counts, per aggregated series (reporter, source
//! workload, destination service and workload, mTLS), at three resolutions so windows
//! from 5 minutes to 28 days can be answered from counters the proxies expose.
//!
//! Each series keeps one ring per [`TIERS`] entry, allocated on the series' first sample;
//! a slot holds the counter increases of its step (requests, 5xx, 403 denials and the
//! cumulative latency buckets). Memory per series is fixed ([`SERIES_BYTES`]); the store
//! holds at most `max_series` series and counts the samples of series it had no room
//! for. A series with no traffic for the longest tier's span is dropped.

use std::collections::HashMap;
use std::time::Duration;

use super::{Edge, Reporter, Selector, WindowStats};

/// Istio's `istio_request_duration_milliseconds` bucket bounds (the `+Inf` bucket is the
/// request count).
pub const BOUNDS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];
const NB: usize = BOUNDS_MS.len();

/// Resolutions: (step in seconds, slots). 10 s for 1 hour, 10 minutes for 3 days,
/// 1 hour for 28 days.
pub const TIERS: [(u64, usize); 3] = [(10, 360), (600, 432), (3600, 672)];

/// Bytes of one series' rings (what the memory bound is computed from).
pub const SERIES_BYTES: usize = (TIERS[0].1 + TIERS[1].1 + TIERS[2].1) * std::mem::size_of::<Slot>();

/// Default cap on the number of series.
pub const DEFAULT_MAX_SERIES: usize = 2048;

/// What identifies an aggregated series (instances of a workload add up).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct SeriesKey {
    /// `reporter`.
    pub reporter: Reporter,
    /// `source_workload`.
    pub source_workload: String,
    /// `source_workload_namespace`.
    pub source_namespace: String,
    /// `destination_service`.
    pub destination_service: String,
    /// `destination_service_namespace`.
    pub destination_service_namespace: String,
    /// `destination_workload`.
    pub destination_workload: String,
    /// `destination_workload_namespace`.
    pub destination_workload_namespace: String,
    /// `destination_version`.
    pub destination_version: String,
    /// `connection_security_policy="mutual_tls"`.
    pub mtls: bool,
}

/// Counter increases of one series over one scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Delta {
    /// Requests.
    pub requests: u32,
    /// Of them, 5xx.
    pub errors: u32,
    /// Of them, 403s the destination's proxy answered without a response flag (what an
    /// AuthorizationPolicy denial looks like in Istio's metrics; an application's own
    /// 403 looks the same).
    pub denied: u32,
    /// Requests at or under each of [`BOUNDS_MS`].
    pub le: [u32; NB],
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// The step index (`unix seconds / step`) the counts belong to.
    step: u32,
    requests: u32,
    errors: u32,
    denied: u32,
    le: [u32; NB],
}

#[derive(Debug, Default)]
struct Series {
    rings: [Vec<Slot>; 3],
    /// Unix seconds of the last sample.
    last: u64,
}

/// The series of a mesh.
#[derive(Debug)]
pub struct SeriesStore {
    series: HashMap<SeriesKey, Series>,
    max_series: usize,
    dropped: u64,
    /// Unix seconds when gathering started (what a window's coverage is measured from).
    started: u64,
}

/// One point of a chart: slots `[start, start + step)` added up.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Unix seconds at the start of the point.
    pub start: u64,
    /// Seconds the point spans.
    pub step: u64,
    /// Totals (denials in [`Point::denied`]).
    pub stats: WindowStats,
    /// Denials (see [`Delta::denied`]).
    pub denied: f64,
}

impl Delta {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Delta) {
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        self.denied = self.denied.saturating_add(other.denied);
        for (a, b) in self.le.iter_mut().zip(other.le.iter()) {
            *a = a.saturating_add(*b);
        }
    }
}

impl Slot {
    fn add(&mut self, d: &Delta) {
        self.requests = self.requests.saturating_add(d.requests);
        self.errors = self.errors.saturating_add(d.errors);
        self.denied = self.denied.saturating_add(d.denied);
        for (a, b) in self.le.iter_mut().zip(d.le.iter()) {
            *a = a.saturating_add(*b);
        }
    }
}

/// Sums of slots, widened.
#[derive(Debug, Clone, Default)]
struct Sum {
    requests: f64,
    errors: f64,
    denied: f64,
    le: [f64; NB],
}

impl Sum {
    fn add(&mut self, s: &Slot) {
        self.requests += f64::from(s.requests);
        self.errors += f64::from(s.errors);
        self.denied += f64::from(s.denied);
        for (a, b) in self.le.iter_mut().zip(s.le.iter()) {
            *a += f64::from(*b);
        }
    }

    fn stats(&self, covered: Duration) -> WindowStats {
        let latency_ms = if self.requests > 0.0 {
            let mut v: Vec<(f64, f64)> =
                BOUNDS_MS.iter().zip(self.le.iter()).map(|(b, n)| (*b, n.min(self.requests))).collect();
            v.push((f64::INFINITY, self.requests));
            v
        } else {
            Vec::new()
        };
        WindowStats { requests: self.requests, errors: self.errors, latency_ms, covered }
    }
}

impl SeriesKey {
    /// Whether `sel` picks this series.
    pub fn matches(&self, sel: &Selector) -> bool {
        let is = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        self.reporter == sel.reporter
            && is(&sel.destination_service, &self.destination_service)
            && is(&sel.destination_namespace, &self.destination_service_namespace)
            && is(&sel.destination_workload, &self.destination_workload)
            && is(&sel.destination_version, &self.destination_version)
            && is(&sel.source_workload, &self.source_workload)
            && is(&sel.source_namespace, &self.source_namespace)
    }
}

impl SeriesStore {
    /// An empty store started at `now` (unix seconds), holding at most `max_series`.
    pub fn new(now: u64, max_series: usize) -> SeriesStore {
        SeriesStore { series: HashMap::new(), max_series, dropped: 0, started: now }
    }

    /// Series held.
    pub fn len(&self) -> usize {
        self.series.len()
    }

    /// Whether no series is held.
    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// Samples refused because the store was full (each refused series, each scrape).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Records `d` for `key` at `now` (unix seconds).
    pub fn add(&mut self, key: &SeriesKey, now: u64, d: &Delta) {
        if !self.series.contains_key(key) {
            if self.series.len() >= self.max_series {
                self.dropped += 1;
                return;
            }
            self.series.insert(key.clone(), Series::default());
        }
        let Some(s) = self.series.get_mut(key) else { return };
        s.last = now;
        for (ring, (step, slots)) in s.rings.iter_mut().zip(TIERS) {
            if ring.is_empty() {
                *ring = vec![Slot::default(); slots];
            }
            let idx = now / step;
            let slot = &mut ring[(idx % slots as u64) as usize];
            if u64::from(slot.step) != idx {
                *slot = Slot { step: idx as u32, ..Slot::default() };
            }
            slot.add(d);
        }
    }

    /// Drops the series with no sample in the longest tier's span.
    pub fn sweep(&mut self, now: u64) {
        let (step, slots) = TIERS[TIERS.len() - 1];
        let keep = step * slots as u64;
        self.series.retain(|_, s| now.saturating_sub(s.last) < keep);
    }

    /// The tier answering a window of `window` seconds, and how many of its steps.
    fn tier_for(window: u64) -> (usize, u64) {
        for (i, (step, slots)) in TIERS.iter().enumerate() {
            if window <= step * *slots as u64 {
                return (i, window.div_ceil(*step).max(1));
            }
        }
        let last = TIERS.len() - 1;
        (last, TIERS[last].1 as u64)
    }

    /// The slots of `s` in tier `tier` whose step is in `(to - n, to]`.
    /// Visits only the `n` slots the window needs (a slot still holding an older step
    /// is skipped).
    fn sum_series(s: &Series, tier: usize, to: u64, n: u64, into: &mut Sum) {
        let ring = &s.rings[tier];
        let len = ring.len() as u64;
        if len == 0 {
            return;
        }
        for idx in to.saturating_sub(n.min(len)) + 1..=to {
            let slot = &ring[(idx % len) as usize];
            if u64::from(slot.step) == idx {
                into.add(slot);
            }
        }
    }

    /// The time the summed slots span: whole steps back from the current, partly
    /// filled one (at least one step), and never before gathering started.
    fn covered(&self, now: u64, window: u64) -> Duration {
        let (tier, n) = Self::tier_for(window);
        let step = TIERS[tier].0;
        let span = ((n - 1) * step + now % step).max(step.min(window));
        Duration::from_secs(span.min(window).min(now.saturating_sub(self.started)))
    }

    /// Totals over the last `window` at `now` of the series `sel` picks.
    pub fn window(&self, sel: &Selector, now: u64, window: Duration) -> WindowStats {
        let w = window.as_secs().max(1);
        let (tier, n) = Self::tier_for(w);
        let to = now / TIERS[tier].0;
        let mut sum = Sum::default();
        for (_, s) in self.series.iter().filter(|(k, _)| k.matches(sel)) {
            Self::sum_series(s, tier, to, n, &mut sum);
        }
        sum.stats(self.covered(now, w))
    }

    /// Denials (see [`Delta::denied`]) over the last `window` per series with any.
    pub fn denials(&self, now: u64, window: Duration) -> Vec<(SeriesKey, f64)> {
        let w = window.as_secs().max(1);
        let (tier, n) = Self::tier_for(w);
        let to = now / TIERS[tier].0;
        let mut out = Vec::new();
        for (k, s) in &self.series {
            let mut sum = Sum::default();
            Self::sum_series(s, tier, to, n, &mut sum);
            if sum.denied > 0.0 {
                out.push((k.clone(), sum.denied));
            }
        }
        out.sort_by(|a, b| b.1.total_cmp(&a.1));
        out
    }

    /// The graph's edges over the last `window`: per (source workload, destination
    /// service, destination workload, version), the destination reporter's totals when
    /// it saw any, else the source reporter's.
    pub fn edges(&self, now: u64, window: Duration) -> Vec<Edge> {
        let w = window.as_secs().max(1);
        let (tier, n) = Self::tier_for(w);
        let to = now / TIERS[tier].0;
        let covered = self.covered(now, w);
        let per_series = self.series.iter().filter_map(|(k, s)| {
            let mut sum = Sum::default();
            Self::sum_series(s, tier, to, n, &mut sum);
            (sum.requests > 0.0).then(|| (k.clone(), sum.stats(covered)))
        });
        edges_of(per_series)
    }

    /// Points of `step` seconds (rounded up to a whole number of the tier's steps)
    /// covering the last `window`, oldest first, for the series `sel` picks.
    pub fn series(&self, sel: &Selector, now: u64, window: Duration, step: Duration) -> Vec<Point> {
        let w = window.as_secs().max(1);
        let (tier, n) = Self::tier_for(w);
        let tier_step = TIERS[tier].0;
        let per_point = step.as_secs().div_ceil(tier_step).max(1);
        let to = now / tier_step;
        let from = to.saturating_sub(n);
        let points = n.div_ceil(per_point);
        let mut sums = vec![Sum::default(); points as usize];
        for (_, s) in self.series.iter().filter(|(k, _)| k.matches(sel)) {
            for slot in &s.rings[tier] {
                let st = u64::from(slot.step);
                if st > from && st <= to {
                    let i = ((st - from - 1) / per_point) as usize;
                    if let Some(p) = sums.get_mut(i) {
                        p.add(slot);
                    }
                }
            }
        }
        let span = per_point * tier_step;
        sums.into_iter()
            .enumerate()
            .map(|(i, s)| {
                let start = (from + 1 + i as u64 * per_point) * tier_step;
                Point { start, step: span, denied: s.denied, stats: s.stats(Duration::from_secs(span)) }
            })
            .collect()
    }
}

/// The graph's edges from per-series totals: per (source workload, destination
/// service, destination workload, version), the destination reporter's totals when it
/// saw any (mTLS when all of them were), else the source reporter's.
pub fn edges_of(per_series: impl Iterator<Item = (SeriesKey, WindowStats)>) -> Vec<Edge> {
    type EdgeKey = (String, String, String, String, String, String);
    // Per edge: (destination totals, destination mTLS requests, source totals).
    let mut by_edge: HashMap<EdgeKey, (WindowStats, f64, WindowStats)> = HashMap::new();
    for (k, stats) in per_series {
        if stats.requests <= 0.0 {
            continue;
        }
        let dest_ns = if k.destination_workload_namespace.is_empty() || k.destination_workload_namespace == "unknown" {
            k.destination_service_namespace.clone()
        } else {
            k.destination_workload_namespace.clone()
        };
        let key = (
            k.source_workload,
            k.source_namespace,
            k.destination_service,
            k.destination_workload,
            dest_ns,
            k.destination_version,
        );
        let e = by_edge.entry(key).or_default();
        match k.reporter {
            Reporter::Destination => {
                if k.mtls {
                    e.1 += stats.requests;
                }
                add_stats(&mut e.0, &stats);
            }
            Reporter::Source => add_stats(&mut e.2, &stats),
        }
    }
    let mut out: Vec<Edge> = by_edge
        .into_iter()
        .map(|((sw, sns, svc, dw, dns, dv), (dest, mtls, src))| {
            let all_mtls = mtls >= dest.requests;
            let (stats, mtls) = if dest.requests > 0.0 { (dest, all_mtls) } else { (src, false) };
            Edge {
                source_workload: sw,
                source_namespace: sns,
                destination_service: svc,
                destination_workload: dw,
                destination_namespace: dns,
                destination_version: dv,
                mtls,
                stats,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        (&a.source_workload, &a.destination_service, &a.destination_workload).cmp(&(
            &b.source_workload,
            &b.destination_service,
            &b.destination_workload,
        ))
    });
    out
}

/// Adds `b` into `a`: counts add, histograms with the same bounds add bucket by bucket.
pub fn add_stats(a: &mut WindowStats, b: &WindowStats) {
    a.requests += b.requests;
    a.errors += b.errors;
    a.covered = a.covered.max(b.covered);
    if a.latency_ms.is_empty() {
        a.latency_ms = b.latency_ms.clone();
    } else if a.latency_ms.len() == b.latency_ms.len() {
        for (x, y) in a.latency_ms.iter_mut().zip(&b.latency_ms) {
            x.1 += y.1;
        }
    }
}

#[cfg(test)]
mod tests;
