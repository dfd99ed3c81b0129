//! Mesh-wide request statistics, as the control plane sees them: the proxies' own Istio
//! standard metrics (`istio_requests_total`, `istio_request_duration_milliseconds`),
//! gathered into bounded time series. The dashboard, SLOs and rollouts read them only
//! through [`MeshStats`], so each can be tested against a [`FixedStats`] with
//! hand-computed numbers, and the gathering (scraping the proxies) stays in one place.

use std::sync::Arc;
use std::time::Duration;

pub mod gather;
pub mod prom;
pub mod scrape;
pub mod series;

/// Which reporter's view (Istio's `reporter` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Reporter {
    /// The server side's proxy (`reporter="destination"`): what a service served.
    #[default]
    Destination,
    /// The client side's proxy (`reporter="source"`): what callers saw.
    Source,
}

/// Which requests: every `Some` field must match the series' label of the same name;
/// `None` matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    /// `reporter`.
    pub reporter: Reporter,
    /// `destination_service` (the FQDN, e.g. `reviews.default.svc.cluster.local`).
    pub destination_service: Option<String>,
    /// `destination_service_namespace`.
    pub destination_namespace: Option<String>,
    /// `destination_workload`.
    pub destination_workload: Option<String>,
    /// `destination_version` (the subset's `version` label).
    pub destination_version: Option<String>,
    /// `source_workload`.
    pub source_workload: Option<String>,
    /// `source_workload_namespace`.
    pub source_namespace: Option<String>,
}

/// Totals over one window for the requests a [`Selector`] picked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowStats {
    /// Requests completed in the window.
    pub requests: f64,
    /// Of them, with a 5xx `response_code` (Istio's dashboards' definition of an error;
    /// gRPC status is not counted).
    pub errors: f64,
    /// Cumulative latency histogram over the window: (`le` in milliseconds, requests at
    /// or under it), ascending, the last bound `f64::INFINITY`. Empty when no requests.
    pub latency_ms: Vec<(f64, f64)>,
    /// How much of the asked window the data really covers (less right after a start).
    pub covered: Duration,
}

impl WindowStats {
    /// Share of requests that were not errors; None without requests.
    pub fn success_rate(&self) -> Option<f64> {
        (self.requests > 0.0).then(|| 1.0 - self.errors / self.requests)
    }

    /// Share of requests at or under `threshold_ms`, interpolated linearly inside the
    /// bucket holding it (as `histogram_quantile` does); None without requests.
    pub fn share_within(&self, threshold_ms: f64) -> Option<f64> {
        let total = self.latency_ms.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let mut prev = (0.0, 0.0);
        for &(le, n) in &self.latency_ms {
            if threshold_ms <= le {
                if le.is_infinite() {
                    return Some(prev.1 / total);
                }
                let span = le - prev.0;
                let frac = if span > 0.0 { (threshold_ms - prev.0) / span } else { 1.0 };
                return Some((prev.1 + (n - prev.1) * frac) / total);
            }
            prev = (le, n);
        }
        Some(1.0)
    }

    /// Latency quantile `q` (0..=1) in milliseconds, Prometheus' `histogram_quantile`
    /// arithmetic (linear inside a bucket; the highest finite bound when the quantile
    /// falls in the `+Inf` bucket); None without requests.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.latency_ms.last()?.1;
        if total <= 0.0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = q * total;
        let mut prev = (0.0, 0.0);
        for &(le, n) in &self.latency_ms {
            if n >= rank {
                if le.is_infinite() {
                    return Some(prev.0);
                }
                let inside = n - prev.1;
                let frac = if inside > 0.0 { (rank - prev.1) / inside } else { 1.0 };
                return Some(prev.0 + (le - prev.0) * frac);
            }
            prev = (le, n);
        }
        Some(prev.0)
    }
}

/// One observed caller → callee edge of the service graph over a window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Edge {
    /// Source workload (`unknown` for callers outside the mesh) and namespace.
    pub source_workload: String,
    /// Source namespace.
    pub source_namespace: String,
    /// Destination service FQDN (or the passthrough/blackhole name).
    pub destination_service: String,
    /// Destination workload and namespace (`unknown` when not in the mesh).
    pub destination_workload: String,
    /// Destination namespace.
    pub destination_namespace: String,
    /// Destination version.
    pub destination_version: String,
    /// Whether the requests on this edge were mutual TLS.
    pub mtls: bool,
    /// The edge's totals (the reporter that saw it, destination preferred).
    pub stats: WindowStats,
}

/// Read access to the mesh's request statistics.
pub trait MeshStats: Send + Sync {
    /// Totals over the last `window` for the requests `sel` picks.
    fn window(&self, sel: &Selector, window: Duration) -> WindowStats;
    /// The service graph's edges with traffic in the last `window`.
    fn edges(&self, window: Duration) -> Vec<Edge>;
    /// Chart points over the last `window`, `step` apart (at least the resolution the
    /// window is kept at), oldest first. Default: none.
    fn series(&self, _sel: &Selector, _window: Duration, _step: Duration) -> Vec<series::Point> {
        Vec::new()
    }
    /// Requests the destination's proxy answered 403 without a response flag (how an
    /// AuthorizationPolicy denial shows in Istio's metrics) in the last `window`, per
    /// series, most first. Default: none.
    fn denials(&self, _window: Duration) -> Vec<(series::SeriesKey, f64)> {
        Vec::new()
    }
    /// The gatherer's own metrics (Prometheus text) for the control plane's `/metrics`.
    /// Default: none.
    fn self_metrics(&self) -> String {
        String::new()
    }
}

/// Shared handle the control plane passes around.
pub type SharedStats = Arc<dyn MeshStats>;

/// Statistics fixed in advance, for tests of what reads them: each selector returns the
/// totals registered for it (whatever the window), anything else an empty window.
#[derive(Debug, Default, Clone)]
pub struct FixedStats {
    /// Totals by selector.
    pub windows: Vec<(Selector, WindowStats)>,
    /// Graph edges.
    pub edges: Vec<Edge>,
}

impl MeshStats for FixedStats {
    fn window(&self, sel: &Selector, _window: Duration) -> WindowStats {
        self.windows.iter().find(|(s, _)| s == sel).map(|(_, w)| w.clone()).unwrap_or_default()
    }

    fn edges(&self, _window: Duration) -> Vec<Edge> {
        self.edges.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist() -> WindowStats {
        // 100 requests: 50 at or under 10 ms, 90 under 100 ms, all under +Inf.
        WindowStats {
            requests: 100.0,
            errors: 5.0,
            latency_ms: vec![(10.0, 50.0), (100.0, 90.0), (f64::INFINITY, 100.0)],
            covered: Duration::from_secs(60),
        }
    }

    #[test]
    fn success_rate_counts_5xx_as_errors() {
        assert_eq!(hist().success_rate(), Some(0.95));
        assert_eq!(WindowStats::default().success_rate(), None);
    }

    #[test]
    fn quantiles_interpolate_like_histogram_quantile() {
        let h = hist();
        // rank 50 is the top of the first bucket.
        assert_eq!(h.quantile_ms(0.5), Some(10.0));
        // rank 70: 20 of the 40 in (10, 100] -> 10 + 90 * 0.5 = 55.
        assert_eq!(h.quantile_ms(0.7), Some(55.0));
        // rank 99 falls in +Inf: the highest finite bound.
        assert_eq!(h.quantile_ms(0.99), Some(100.0));
    }

    #[test]
    fn share_within_interpolates_inside_a_bucket() {
        let h = hist();
        assert_eq!(h.share_within(10.0), Some(0.5));
        assert_eq!(h.share_within(55.0), Some(0.7));
        assert_eq!(h.share_within(1000.0), Some(0.9));
    }
}
