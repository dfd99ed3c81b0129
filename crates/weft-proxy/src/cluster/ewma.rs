//! Per-endpoint load: outstanding requests and peak-EWMA latency, lock-free.
//!
//! Peak EWMA (Finagle, linkerd2-proxy): a latency above the estimate replaces it at
//! once (the peak); a lower one is blended in with weight `1 - exp(-elapsed / TAU)`,
//! so the estimate forgets slowly when requests are frequent and quickly when they
//! are rare. While an endpoint has nothing in flight its estimate also decays towards
//! zero with the same time constant, so an endpoint that was slow is tried again later.
//! The balancer's cost is `estimate * (in_flight + 1)`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::outlier::OutlierState;

/// The decay time constant of the latency estimate.
pub const TAU: Duration = Duration::from_secs(10);

/// The latency assumed for an endpoint that has not answered yet.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// Outstanding requests and latency estimate of one endpoint.
#[derive(Debug)]
pub struct EndpointLoad {
    in_flight: AtomicU64,
    /// The estimate in nanoseconds, as `f64` bits.
    ewma_ns: AtomicU64,
    /// When the estimate was last updated, in nanoseconds since `epoch`; 0 until the
    /// first observation (the estimate is then exactly [`DEFAULT_RTT`], so fresh
    /// endpoints tie and the balancer's weighted sampling decides between them).
    updated_ns: AtomicU64,
    epoch: Instant,
    /// Outlier detection state.
    pub(crate) outlier: OutlierState,
}

/// A request in flight to an endpoint. [`InFlight::finish`] records its latency;
/// dropping it without finishing only ends it (errors, cancellations).
#[derive(Debug)]
pub struct InFlight {
    load: Arc<EndpointLoad>,
    started: Instant,
}

/// The circuit-breaker state of a whole cluster, shared across snapshots (so a config
/// update keeps what is in flight, as Envoy's resource managers do): outstanding
/// requests (`max_requests`, the caller raises `Overflow`), open HTTP connections
/// (`max_connections`), requests waiting for a connection (`max_pending_requests`) and
/// retries in progress (`max_retries` or the retry budget).
#[derive(Debug, Default)]
pub struct ClusterLoad {
    requests: AtomicU32,
    connections: AtomicU32,
    pending: AtomicU32,
    retries: AtomicU32,
    /// Woken when a connection of the cluster closes or is handed back, so pending
    /// requests look again.
    freed: tokio::sync::Notify,
    /// The latest end of any endpoint's ejection ([`super::outlier::now_ms`] clock):
    /// while it is in the past, picks skip the ejection checks.
    ejected_until: AtomicU64,
}

/// A request counted against [`ClusterLoad`]; released on drop.
#[derive(Debug)]
pub struct RequestPermit {
    load: Arc<ClusterLoad>,
}

/// One of a [`ClusterLoad`]'s gauges (connections, pending requests, retries), held
/// while the thing it counts lives; released on drop.
#[derive(Debug)]
pub struct Slot {
    load: Arc<ClusterLoad>,
    which: Gauge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gauge {
    Connections,
    Pending,
    Retries,
}

/// Envoy's `retry_budget`: concurrent retries may be `budget_percent` of the cluster's
/// active and pending requests, and never fewer than `min_retry_concurrency`. When set,
/// it replaces `max_retries`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    /// Percent of active requests that may be retries (Envoy's default 20).
    pub budget_percent: f64,
    /// Retries always allowed, whatever the load (Envoy's default 3).
    pub min_retry_concurrency: u32,
}

/// Keeps [`EndpointLoad`] per (cluster, addr) alive across config recompiles so EWMA and
/// in-flight counts survive a snapshot swap; prunes entries no snapshot uses.
///
/// Only config compilation touches its lock, never the request path.
#[derive(Debug, Default)]
pub struct LoadRegistry {
    inner: Mutex<RegistryInner>,
}

#[derive(Debug, Default)]
struct RegistryInner {
    endpoints: HashMap<(String, SocketAddr), Weak<EndpointLoad>>,
    clusters: HashMap<String, Weak<ClusterLoad>>,
    pruned_len: usize,
}

impl EndpointLoad {
    /// A fresh load: nothing in flight, estimate [`DEFAULT_RTT`].
    pub fn new() -> Self {
        EndpointLoad {
            in_flight: AtomicU64::new(0),
            ewma_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            updated_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            outlier: OutlierState::default(),
        }
    }

    /// Starts a request: counts it in flight until the guard is finished or dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.start_at(Instant::now())
    }

    /// [`EndpointLoad::start`] for a request that started at `now`, a clock reading
    /// the caller took anyway (the forwarding path reads the clock once per attempt).
    pub fn start_at(self: &Arc<Self>, now: Instant) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { load: Arc::clone(self), started: now }
    }

    /// Requests currently in flight.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The current latency estimate.
    pub fn ewma(&self) -> Duration {
        Duration::from_nanos(self.decayed_ns(self.now_ns()) as u64)
    }

    /// The balancer's cost: estimate in nanoseconds times (in flight + 1).
    pub fn cost(&self) -> f64 {
        let pending = self.in_flight() as f64;
        self.decayed_ns(self.now_ns()) * (pending + 1.0)
    }

    /// Records one observed latency.
    pub fn observe(&self, rtt: Duration) {
        self.observe_at(rtt, Instant::now());
    }

    /// [`EndpointLoad::observe`] of a latency that ended at `now`.
    fn observe_at(&self, rtt: Duration, now: Instant) {
        let now = self.ns_at(now);
        let rtt_ns = rtt.as_nanos() as f64;
        let now = now.max(1);
        let last = self.updated_ns.swap(now, Ordering::Relaxed);
        let w = if last == 0 {
            // First observation: the default estimate carries no information.
            0.0
        } else {
            decay_weight(now.saturating_sub(last))
        };
        // A racing update may be lost; the estimate stays a valid blend either way.
        let _ = self.ewma_ns.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            let old = f64::from_bits(bits);
            let new = if rtt_ns > old { rtt_ns } else { old * w + rtt_ns * (1.0 - w) };
            Some(new.to_bits())
        });
    }

    fn decayed_ns(&self, now: u64) -> f64 {
        let est = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        if self.in_flight() > 0 {
            // Something is outstanding: it may be slow, do not forget the estimate.
            return est;
        }
        let last = self.updated_ns.load(Ordering::Relaxed);
        if last == 0 {
            return est;
        }
        est * decay_weight(now.saturating_sub(last))
    }

    fn now_ns(&self) -> u64 {
        self.ns_at(Instant::now())
    }

    /// `at` in nanoseconds since the load's epoch.
    fn ns_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

impl Default for EndpointLoad {
    fn default() -> Self {
        EndpointLoad::new()
    }
}

impl InFlight {
    /// Ends the request and records its latency.
    pub fn finish(self, rtt: Duration) {
        self.load.observe(rtt);
        // Drop decrements the in-flight count.
    }

    /// Ends the request at `now` (a clock reading the caller took anyway) and records
    /// its latency since [`EndpointLoad::start_at`]. Returns that latency.
    pub fn finish_at(self, now: Instant) -> Duration {
        let rtt = now.saturating_duration_since(self.started);
        self.load.observe_at(rtt, now);
        rtt
    }

    /// Time since the request started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ClusterLoad {
    /// Counts a request unless `max` are already outstanding (then the caller
    /// answers with `Overflow`).
    pub fn try_start(self: &Arc<Self>, max: u32) -> Option<RequestPermit> {
        self.requests
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| RequestPermit { load: Arc::clone(self) })
    }

    /// Requests outstanding.
    pub fn requests(&self) -> u32 {
        self.requests.load(Ordering::Acquire)
    }

    /// Counts an open connection unless `max` are open; `force` counts it anyway
    /// (Envoy opens a host's first connection even over the limit, so requests queued
    /// for that host are never stuck). None: at the limit.
    pub fn try_connection(self: &Arc<Self>, max: u32, force: bool) -> Option<Slot> {
        if force {
            self.connections.fetch_add(1, Ordering::AcqRel);
            return Some(Slot { load: Arc::clone(self), which: Gauge::Connections });
        }
        self.try_slot(&self.connections, max, Gauge::Connections)
    }

    /// Counts a request waiting for a connection unless `max` already wait.
    pub fn try_pending(self: &Arc<Self>, max: u32) -> Option<Slot> {
        self.try_slot(&self.pending, max, Gauge::Pending)
    }

    /// Counts a retry unless the cluster's retry limit is reached: the `budget` when set
    /// (`max(min_retry_concurrency, budget_percent% of active + pending requests)`),
    /// else `max_retries`.
    pub fn try_retry(self: &Arc<Self>, max_retries: u32, budget: Option<RetryBudget>) -> Option<Slot> {
        let max = match budget {
            None => max_retries,
            Some(b) => {
                let active = f64::from(self.requests()) + f64::from(self.pending());
                let share = (b.budget_percent / 100.0 * active).floor();
                (share.min(f64::from(u32::MAX)) as u32).max(b.min_retry_concurrency)
            }
        };
        self.try_slot(&self.retries, max, Gauge::Retries)
    }

    /// Open HTTP connections counted against `max_connections`.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Acquire)
    }

    /// Requests waiting for a connection.
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Acquire)
    }

    /// Retries in progress.
    pub fn retries(&self) -> u32 {
        self.retries.load(Ordering::Acquire)
    }

    /// Resolves once a connection of the cluster was closed or handed back after
    /// [`tokio::sync::futures::Notified::enable`] was called on it.
    pub(crate) fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }

    /// Wakes the requests waiting for a connection.
    pub(crate) fn wake(&self) {
        self.freed.notify_waiters();
    }

    fn try_slot(self: &Arc<Self>, gauge: &AtomicU32, max: u32, which: Gauge) -> Option<Slot> {
        gauge
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Slot { load: Arc::clone(self), which })
    }

    /// Notes an ejection lasting until `until`.
    pub(crate) fn note_ejection(&self, until: u64) {
        self.ejected_until.fetch_max(until, Ordering::AcqRel);
    }

    /// Whether some endpoint may be ejected at `now`.
    pub(crate) fn any_ejected(&self, now: u64) -> bool {
        now < self.ejected_until.load(Ordering::Acquire)
    }
}

impl Drop for RequestPermit {
    fn drop(&mut self) {
        self.load.requests.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let gauge = match self.which {
            Gauge::Connections => &self.load.connections,
            Gauge::Pending => &self.load.pending,
            Gauge::Retries => &self.load.retries,
        };
        gauge.fetch_sub(1, Ordering::AcqRel);
        if self.which == Gauge::Connections {
            self.load.wake();
        }
    }
}

impl LoadRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        LoadRegistry::default()
    }

    /// The load of `addr` in `cluster`: the one a live snapshot already uses, or a new one.
    pub fn get(&self, cluster: &str, addr: SocketAddr) -> Arc<EndpointLoad> {
        let mut inner = self.lock();
        let key = (cluster.to_string(), addr);
        if let Some(load) = inner.endpoints.get(&key).and_then(Weak::upgrade) {
            return load;
        }
        let load = Arc::new(EndpointLoad::new());
        inner.endpoints.insert(key, Arc::downgrade(&load));
        inner.maybe_prune();
        load
    }

    /// The request counter of `cluster`, shared by all snapshots that use it.
    pub fn cluster(&self, cluster: &str) -> Arc<ClusterLoad> {
        let mut inner = self.lock();
        if let Some(load) = inner.clusters.get(cluster).and_then(Weak::upgrade) {
            return load;
        }
        let load = Arc::new(ClusterLoad::default());
        inner.clusters.insert(cluster.to_string(), Arc::downgrade(&load));
        inner.maybe_prune();
        load
    }

    /// Drops entries no snapshot uses any more.
    pub fn prune(&self) {
        self.lock().prune();
    }

    /// Endpoint entries held (live or not yet pruned).
    pub fn len(&self) -> usize {
        self.lock().endpoints.len()
    }

    /// True when no endpoint entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, RegistryInner> {
        // The map stays consistent even if a holder panicked: recover it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl RegistryInner {
    /// Prunes when the maps doubled since the last prune: amortised O(1) per insert.
    fn maybe_prune(&mut self) {
        let len = self.endpoints.len() + self.clusters.len();
        if len > 2 * self.pruned_len + 16 {
            self.prune();
        }
    }

    fn prune(&mut self) {
        self.endpoints.retain(|_, w| w.strong_count() > 0);
        self.clusters.retain(|_, w| w.strong_count() > 0);
        self.pruned_len = self.endpoints.len() + self.clusters.len();
    }
}

/// `exp(-elapsed / TAU)`: the weight of the old estimate after `elapsed_ns`.
fn decay_weight(elapsed_ns: u64) -> f64 {
    (-(elapsed_ns as f64) / TAU.as_nanos() as f64).exp()
}
