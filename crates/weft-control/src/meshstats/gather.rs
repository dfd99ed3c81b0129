//! The control plane's [`MeshStats`]: every `interval` it scrapes the `/stats/prometheus`
//! page of each connected proxy that announced its metrics address (`WEFT_METRICS` in
//! its node metadata: weft's proxy does; a stock Envoy has no Istio metrics, and its
//! traffic is reported by the weft proxies on the other end), turns the pages into
//! counter increases ([`super::scrape`]) and records them in the bounded
//! [`SeriesStore`].
//!
//! A proxy's first page is only a baseline. Scrapes run concurrently (at most
//! `concurrency` at once), each bounded by `timeout` and the page size; a failed scrape
//! keeps the proxy's previous baseline, so its increases show up at the next success.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use weft_xds::AdsServer;

use super::scrape::{PageDeltas, TargetState};
use super::series::{Delta, Point, SeriesKey, SeriesStore, DEFAULT_MAX_SERIES};
use super::{Edge, MeshStats, Selector, WindowStats};

/// Largest metrics page read from one proxy.
const MAX_PAGE_BYTES: usize = 16 << 20;

/// How the control plane gathers the proxies' metrics.
#[derive(Debug, Clone)]
pub struct GatherConfig {
    /// Time between scrapes of every proxy (10 s, the finest resolution kept).
    pub interval: Duration,
    /// Longest one scrape may take.
    pub timeout: Duration,
    /// Most aggregated series kept (see docs/dashboard.md for the memory this bounds).
    pub max_series: usize,
    /// Most samples read from one proxy's page.
    pub max_page_samples: usize,
    /// Most scrapes in flight at once.
    pub concurrency: usize,
    /// Read the statistics from this Prometheus (`http://HOST:PORT`) instead of
    /// scraping the proxies ([`super::prom::PromStats`]).
    pub prometheus: Option<String>,
}

/// Gathers and keeps the mesh's request statistics.
pub struct Gatherer {
    cfg: GatherConfig,
    store: Mutex<SeriesStore>,
    targets: Mutex<HashMap<String, TargetState>>,
    client: Client<HttpConnector, Empty<Bytes>>,
    rounds: watch::Sender<u64>,
    scrapes: AtomicU64,
    failures: AtomicU64,
    ignored: AtomicU64,
    last_targets: AtomicU64,
}

impl Default for GatherConfig {
    fn default() -> Self {
        GatherConfig {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            max_series: DEFAULT_MAX_SERIES,
            max_page_samples: 20_000,
            concurrency: 32,
            prometheus: None,
        }
    }
}

impl Gatherer {
    /// A gatherer with nothing gathered yet.
    pub fn new(cfg: GatherConfig) -> Arc<Gatherer> {
        let mut client = Client::builder(TokioExecutor::new());
        client.pool_idle_timeout(cfg.interval * 3).pool_max_idle_per_host(1);
        Arc::new(Gatherer {
            store: Mutex::new(SeriesStore::new(unix_now(), cfg.max_series)),
            targets: Mutex::new(HashMap::new()),
            client: client.build_http(),
            rounds: watch::channel(0).0,
            scrapes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            ignored: AtomicU64::new(0),
            last_targets: AtomicU64::new(0),
            cfg,
        })
    }

    /// Scrapes `server`'s connected proxies every interval until the gatherer is dropped.
    pub fn spawn(self: &Arc<Self>, server: AdsServer) -> JoinHandle<()> {
        let weak = Arc::downgrade(self);
        // A zero interval (a flag's `0s`) would spin: at least 100 ms.
        let interval = self.cfg.interval.max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { return };
                me.scrape_all(&server).await;
            }
        })
    }

    /// Completed scrape rounds (bumped after each round's increases are recorded).
    pub fn rounds(&self) -> watch::Receiver<u64> {
        self.rounds.subscribe()
    }

    /// One round: every connected proxy with a metrics address, concurrently.
    pub async fn scrape_all(&self, server: &AdsServer) {
        // Read in place: a copy of every connection's status (thousands, with their
        // nodes) every round cost a busy control plane more than the scrapes.
        let mut targets: Vec<(String, SocketAddr)> = Vec::new();
        server.for_each_connection(|c| {
            let Some(mut addr) = c.node.as_ref().and_then(|n| n.metrics) else { return };
            if addr.ip().is_unspecified() {
                let Some(peer) = c.peer else { return };
                addr.set_ip(peer.ip());
            }
            targets.push((c.node_id.clone(), addr));
        });
        let mut states = std::mem::take(&mut *self.targets.lock().unwrap_or_else(|p| p.into_inner()));
        let limit = Arc::new(Semaphore::new(self.cfg.concurrency.max(1)));
        let mut jobs = tokio::task::JoinSet::new();
        for (id, addr) in targets {
            let mut state = states.remove(&id).unwrap_or_default();
            let client = self.client.clone();
            let (timeout, max) = (self.cfg.timeout, self.cfg.max_page_samples);
            let limit = limit.clone();
            jobs.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let page = match tokio::time::timeout(timeout, fetch(&client, addr)).await {
                    Ok(Ok(page)) => page,
                    Ok(Err(e)) => {
                        tracing::debug!(proxy = %id, %addr, error = %e, "metrics scrape failed");
                        return (id, state, None);
                    }
                    Err(_) => {
                        tracing::debug!(proxy = %id, %addr, "metrics scrape timed out");
                        return (id, state, None);
                    }
                };
                let deltas = state.read(&page, max);
                (id, state, Some(deltas))
            });
        }
        let mut merged: HashMap<SeriesKey, Delta> = HashMap::new();
        let mut kept = HashMap::new();
        while let Some(done) = jobs.join_next().await {
            let Ok((id, state, deltas)) = done else { continue };
            kept.insert(id, state);
            match deltas {
                Some(PageDeltas { deltas, ignored }) => {
                    self.scrapes.fetch_add(1, Ordering::Relaxed);
                    self.ignored.fetch_add(ignored, Ordering::Relaxed);
                    for (k, d) in deltas {
                        merged.entry(k).or_default().add(&d);
                    }
                }
                None => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.last_targets.store(kept.len() as u64, Ordering::Relaxed);
        *self.targets.lock().unwrap_or_else(|p| p.into_inner()) = kept;
        let now = unix_now();
        {
            let mut store = self.store();
            for (k, d) in &merged {
                store.add(k, now, d);
            }
            store.sweep(now);
        }
        self.rounds.send_modify(|r| *r += 1);
    }

    fn store(&self) -> std::sync::MutexGuard<'_, SeriesStore> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl MeshStats for Gatherer {
    fn window(&self, sel: &Selector, window: Duration) -> WindowStats {
        self.store().window(sel, unix_now(), window)
    }

    fn edges(&self, window: Duration) -> Vec<Edge> {
        self.store().edges(unix_now(), window)
    }

    fn series(&self, sel: &Selector, window: Duration, step: Duration) -> Vec<Point> {
        self.store().series(sel, unix_now(), window, step)
    }

    fn denials(&self, window: Duration) -> Vec<(SeriesKey, f64)> {
        self.store().denials(unix_now(), window)
    }

    fn self_metrics(&self) -> String {
        let (series, dropped) = {
            let s = self.store();
            (s.len(), s.dropped())
        };
        format!(
            "# HELP weft_meshstats_series Aggregated request series the control plane keeps for the dashboard and SLOs.\n# TYPE weft_meshstats_series gauge\nweft_meshstats_series {series}\n\
             # HELP weft_meshstats_dropped_series_total Series updates refused because the series cap was reached.\n# TYPE weft_meshstats_dropped_series_total counter\nweft_meshstats_dropped_series_total {dropped}\n\
             # HELP weft_meshstats_scrape_targets Proxies scraped in the last round.\n# TYPE weft_meshstats_scrape_targets gauge\nweft_meshstats_scrape_targets {}\n\
             # HELP weft_meshstats_scrapes_total Proxy metrics pages read.\n# TYPE weft_meshstats_scrapes_total counter\nweft_meshstats_scrapes_total {}\n\
             # HELP weft_meshstats_scrape_failures_total Proxy metrics scrapes that failed or timed out.\n# TYPE weft_meshstats_scrape_failures_total counter\nweft_meshstats_scrape_failures_total {}\n\
             # HELP weft_meshstats_ignored_samples_total Samples ignored because a proxy's page had too many.\n# TYPE weft_meshstats_ignored_samples_total counter\nweft_meshstats_ignored_samples_total {}\n",
            self.last_targets.load(Ordering::Relaxed),
            self.scrapes.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
            self.ignored.load(Ordering::Relaxed),
        )
    }
}

/// GETs `http://addr/stats/prometheus`.
async fn fetch(client: &Client<HttpConnector, Empty<Bytes>>, addr: SocketAddr) -> Result<String, String> {
    let uri: http::Uri = format!("http://{addr}/stats/prometheus").parse().map_err(|e| format!("{e}"))?;
    let resp = client.get(uri).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_PAGE_BYTES);
    let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    String::from_utf8(bytes.to_vec()).map_err(|_| "the metrics page is not UTF-8".to_string())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
