//! Token buckets, and the per-proxy registry that keeps a bucket's state across
//! configuration updates that leave it unchanged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Envoy's `TokenBucket`: starts full with `max` tokens; every `interval` since its
/// creation adds `per_fill`, up to `max`. Lock-free: many requests may take tokens at once.
#[derive(Debug)]
pub struct TokenBucket {
    params: BucketParams,
    start: Instant,
    tokens: AtomicU64,
    /// Fill ticks already added (ticks since `start`).
    ticks: AtomicU64,
}

/// A token bucket's settings (`max_tokens`, `tokens_per_fill`, `fill_interval`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BucketParams {
    /// `max_tokens`.
    pub max: u64,
    /// `tokens_per_fill` (Envoy default 1).
    pub per_fill: u64,
    /// `fill_interval` (at least 50 ms, as Envoy requires).
    pub interval: Duration,
}

/// Which bucket: the place in the configuration it belongs to (listener filter, route,
/// descriptor) and its settings. A configuration update that keeps both keeps the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BucketKey {
    /// Where: `listener/<chain>/<filter>` or `route/<config>/<vhost>/<route>/<filter>`.
    pub scope: Arc<str>,
    /// The descriptor entries the bucket is for (empty: the default bucket).
    pub descriptor: Vec<(String, String)>,
    /// Settings.
    pub params: BucketParams,
}

/// One proxy's buckets by key. A compiled filter resolves its buckets here on its
/// first request, which may come after the configuration it replaces is gone, so the
/// registry holds the buckets itself. A bucket no configuration holds is dropped at the
/// second sweep that finds it so; sweeps run when the map has doubled since the last
/// one, so it stays bounded by the configuration.
#[derive(Debug, Default)]
pub struct BucketRegistry {
    inner: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    /// Bucket, and whether the last sweep found it unused.
    map: HashMap<BucketKey, (Arc<TokenBucket>, bool)>,
    swept_at: usize,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(params: BucketParams) -> TokenBucket {
        TokenBucket { params, start: Instant::now(), tokens: AtomicU64::new(params.max), ticks: AtomicU64::new(0) }
    }

    fn refill(&self, now: Instant) {
        let nanos = self.params.interval.as_nanos().max(1);
        let due = u64::try_from(now.saturating_duration_since(self.start).as_nanos() / nanos).unwrap_or(u64::MAX);
        let done = self.ticks.load(Ordering::Acquire);
        if due > done && self.ticks.compare_exchange(done, due, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            let add = (due - done).saturating_mul(self.params.per_fill);
            let max = self.params.max;
            let _ =
                self.tokens.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| Some(t.saturating_add(add).min(max)));
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&self) -> bool {
        self.refill(Instant::now());
        self.tokens.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| t.checked_sub(1)).is_ok()
    }

    /// Tokens left now.
    pub fn remaining(&self) -> u64 {
        self.refill(Instant::now());
        self.tokens.load(Ordering::Acquire)
    }

    /// The settings.
    pub fn params(&self) -> BucketParams {
        self.params
    }

    /// Time until the next fill.
    pub fn until_fill(&self) -> Duration {
        let nanos = self.params.interval.as_nanos().max(1);
        let since = Instant::now().saturating_duration_since(self.start).as_nanos() % nanos;
        Duration::from_nanos(u64::try_from(nanos - since).unwrap_or(u64::MAX))
    }
}

impl BucketRegistry {
    /// The live bucket for `key`, or a new full one.
    pub fn get(&self, key: &BucketKey) -> Arc<TokenBucket> {
        let mut r = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((b, _)) = r.map.get(key) {
            return b.clone();
        }
        let b = Arc::new(TokenBucket::new(key.params));
        r.map.insert(key.clone(), (b.clone(), false));
        if r.map.len() >= 2 * r.swept_at.max(32) {
            // Only the registry holds it: drop it if the last sweep found it so too.
            r.map.retain(|_, (b, unused)| {
                let now_unused = Arc::strong_count(b) == 1;
                let keep = !(now_unused && *unused);
                *unused = now_unused;
                keep
            });
            r.swept_at = r.map.len();
        }
        b
    }

    /// Buckets currently registered (live or not yet swept).
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).map.len()
    }

    /// True when no bucket is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
