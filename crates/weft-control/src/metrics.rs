//! The control plane's Prometheus metrics, served as `GET /metrics` (and
//! `/stats/prometheus`) on the API port under istiod's names, so Istio's Control Plane
//! dashboard reads them.
//!
//! The xDS server reports pushes and NACKs through [`XdsObserver`] (counted here with
//! atomics); connected proxies and the certificate service's counts are read when a
//! scrape comes. Istio names its counters without `_total` (`pilot_xds_pushes`,
//! `citadel_server_csr_count`) and its dashboards query those names, so
//! [`IstioCounter`] is a counter whose sample keeps the family's name.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use weft_identity::service::CertificateStats;
use weft_xds::{type_url, XdsObserver};

/// Istio's `type` label values, in exposition order; the last one takes any other type.
const TYPES: [&str; 7] = ["cds", "eds", "lds", "rds", "sds", "vhds", "other"];
/// `pilot_proxy_convergence_time` buckets (Istio's), seconds.
const CONVERGENCE_BUCKETS: [f64; 8] = [0.1, 0.5, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0];
/// `pilot_xds_push_time` buckets (Istio's), seconds.
const PUSH_TIME_BUCKETS: [f64; 8] = [0.01, 0.1, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0];

/// Every control-plane metric and the registry that encodes them.
pub struct ControlMetrics {
    registry: Registry,
    xds: Arc<XdsMetrics>,
    connected: Gauge,
    csrs: IstioCounter,
    issued: IstioCounter,
    uptime: Gauge<f64, AtomicU64>,
    started: Instant,
}

/// What the xDS server reports: pushes, push time, convergence time and NACKs.
#[derive(Debug)]
pub struct XdsMetrics {
    pushes: ByType<IstioCounter>,
    push_time: ByType<Histogram>,
    rejects: ByType<IstioCounter>,
    convergence: Histogram,
}

/// A counter exposed under its family's name, without `_total`, as istiod does.
#[derive(Clone, Debug, Default)]
pub struct IstioCounter(Arc<AtomicU64>);

/// One metric per xDS type, labelled `type` with Istio's short names; a type never
/// touched is not exposed.
#[derive(Clone, Debug)]
struct ByType<M> {
    inner: Arc<ByTypeInner<M>>,
}

#[derive(Debug)]
struct ByTypeInner<M> {
    metrics: [M; TYPES.len()],
    used: [AtomicBool; TYPES.len()],
}

impl ControlMetrics {
    /// Registers every metric; the clock of `istiod_uptime_seconds` starts now.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let xds = Arc::new(XdsMetrics {
            pushes: ByType::new(IstioCounter::default),
            push_time: ByType::new(|| Histogram::new(PUSH_TIME_BUCKETS)),
            rejects: ByType::new(IstioCounter::default),
            convergence: Histogram::new(CONVERGENCE_BUCKETS),
        });
        let connected = Gauge::default();
        let (csrs, issued) = (IstioCounter::default(), IstioCounter::default());
        let uptime = Gauge::<f64, AtomicU64>::default();
        registry.register("pilot_xds", "Number of endpoints connected to this pilot using XDS", connected.clone());
        registry.register(
            "pilot_xds_pushes",
            "Responses sent to proxies, by xDS type (cds, eds, lds, rds, sds)",
            xds.pushes.clone(),
        );
        registry.register(
            "pilot_xds_push_time",
            "Time in seconds to build and send one xDS response, by type",
            xds.push_time.clone(),
        );
        registry.register(
            "pilot_total_xds_rejects",
            "Total number of XDS responses from pilot rejected by proxy",
            xds.rejects.clone(),
        );
        registry.register(
            "pilot_proxy_convergence_time",
            "Delay in seconds between a config change and the response carrying it being sent to a proxy",
            xds.convergence.clone(),
        );
        registry.register("citadel_server_csr_count", "The number of CSRs received by Citadel server", csrs.clone());
        registry.register(
            "citadel_server_success_cert_issuance_count",
            "The number of certificates issuances that have succeeded",
            issued.clone(),
        );
        registry.register("istiod_uptime_seconds", "Current istiod server uptime in seconds", uptime.clone());
        ControlMetrics { registry, xds, connected, csrs, issued, uptime, started: Instant::now() }
    }

    /// What the xDS server reports to.
    pub fn xds(&self) -> Arc<XdsMetrics> {
        self.xds.clone()
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric, with the values
    /// read now: `connected` xDS streams and the certificate service's counts.
    pub fn render(&self, connected: usize, certificates: Option<&CertificateStats>) -> String {
        self.connected.set(i64::try_from(connected).unwrap_or(i64::MAX));
        if let Some(stats) = certificates {
            self.csrs.set(stats.csrs());
            self.issued.set(stats.issued());
        }
        self.uptime.set(self.started.elapsed().as_secs_f64());
        let mut open = String::new();
        if prometheus_client::encoding::text::encode(&mut open, &self.registry).is_err() {
            return String::new();
        }
        openmetrics_to_text(&open)
    }
}

impl Default for ControlMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl XdsObserver for XdsMetrics {
    fn pushed(&self, type_url: &str, push_time: Duration, convergence: Option<Duration>) {
        self.pushes.get(type_url).inc();
        self.push_time.get(type_url).observe(push_time.as_secs_f64());
        if let Some(c) = convergence {
            self.convergence.observe(c.as_secs_f64());
        }
    }

    fn rejected(&self, type_url: &str) {
        self.rejects.get(type_url).inc();
    }
}

impl IstioCounter {
    fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Mirrors a count kept elsewhere (the certificate service's).
    fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
}

impl TypedMetric for IstioCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for IstioCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        // A gauge sample is written under the family's name; the family stays a counter.
        encoder.encode_gauge(&self.0.load(Ordering::Relaxed))
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

impl<M> ByType<M> {
    fn new(make: impl Fn() -> M) -> Self {
        ByType {
            inner: Arc::new(ByTypeInner {
                metrics: std::array::from_fn(|_| make()),
                used: std::array::from_fn(|_| AtomicBool::new(false)),
            }),
        }
    }

    /// The metric of `type_url`, marked as exposed.
    fn get(&self, type_url: &str) -> &M {
        let i = type_index(type_url);
        self.inner.used[i].store(true, Ordering::Relaxed);
        &self.inner.metrics[i]
    }
}

impl<M: EncodeMetric + TypedMetric> TypedMetric for ByType<M> {
    const TYPE: MetricType = M::TYPE;
}

impl<M: EncodeMetric + TypedMetric> EncodeMetric for ByType<M> {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        for (i, name) in TYPES.iter().enumerate() {
            if self.inner.used[i].load(Ordering::Relaxed) {
                let labels = [("type", *name)];
                self.inner.metrics[i].encode(encoder.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }
}

/// Index in [`TYPES`] of a type URL: Istio's short name, or "other".
fn type_index(type_url: &str) -> usize {
    let short = match type_url {
        type_url::CLUSTER => "cds",
        type_url::ENDPOINT => "eds",
        type_url::LISTENER => "lds",
        type_url::ROUTE => "rds",
        type_url::SECRET => "sds",
        type_url::VIRTUAL_HOST => "vhds",
        _ => "other",
    };
    TYPES.iter().position(|t| *t == short).unwrap_or(TYPES.len() - 1)
}

/// prometheus-client's OpenMetrics output as the classic text format every Prometheus
/// and `promtool check metrics` read: `# UNIT` and `# EOF` dropped. Names are kept as
/// registered (Istio's counters have no `_total`; their samples carry the same name).
fn openmetrics_to_text(open: &str) -> String {
    let mut out = String::with_capacity(open.len());
    for line in open.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let _ = writeln!(out, "{line}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_keep_istios_names_and_types_are_labelled_short() {
        let metrics = ControlMetrics::new();
        let xds = metrics.xds();
        xds.pushed(type_url::CLUSTER, Duration::from_millis(2), Some(Duration::from_millis(5)));
        xds.rejected(type_url::LISTENER);
        let text = metrics.render(3, None);
        assert!(text.contains("# TYPE pilot_xds_pushes counter\n"), "{text}");
        assert!(text.contains("pilot_xds_pushes{type=\"cds\"} 1\n"), "{text}");
        assert!(!text.contains("type=\"eds\""), "untouched types are not exposed: {text}");
        assert!(text.contains("pilot_total_xds_rejects{type=\"lds\"} 1\n"), "{text}");
        assert!(text.contains("pilot_proxy_convergence_time_count 1\n"), "{text}");
        assert!(text.contains("pilot_xds 3\n"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
    }
}
