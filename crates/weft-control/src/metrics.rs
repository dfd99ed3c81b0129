//! The control plane's Prometheus metrics, served as `GET /metrics` (and
//! `/stats/prometheus`) on the API port under istiod's names, so Istio's Control Plane
//! dashboard reads them.
//!
//! The xDS server reports pushes and NACKs through [`XdsObserver`] (counted here with
//! atomics); connected proxies, the proxies whose latest response of a type was rejected,
//! the resource counts, the certificate service's counts and the process's CPU, memory
//! and file descriptors are read when a scrape comes ([`MeshView`], [`process`]). Istio names its counters without `_total` (`pilot_xds_pushes`,
//! `citadel_server_csr_count`) and its dashboards query those names, so
//! [`IstioCounter`] is a counter whose sample keeps the family's name.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use weft_identity::service::CertificateStats;
use weft_xds::server::ConnectionStatus;
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
    /// `pilot_xds_{cds,eds,lds,rds}_reject{node,err}`: 1 per proxy whose latest response
    /// of that type it rejected, rebuilt at each scrape.
    type_rejects: [Family<RejectLabels, Gauge>; 4],
    services: Gauge,
    virtual_services: Gauge,
    process: ProcessMetrics,
    xds_refused: crate::xds_auth::RefusedStreams,
}

/// What a scrape reads from the rest of the control plane.
#[derive(Default)]
pub struct MeshView<'a> {
    /// The open xDS streams.
    pub connections: &'a [ConnectionStatus],
    /// The certificate service's counts, when identity is on.
    pub certificates: Option<&'a CertificateStats>,
    /// Services known (Kubernetes Services plus ServiceEntry hosts): `pilot_services`.
    pub services: usize,
    /// VirtualServices in force: `pilot_virt_services`.
    pub virtual_services: usize,
}

/// Labels of the per-type reject gauges, as istiod names them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RejectLabels {
    node: String,
    err: String,
}

/// The standard `process_*` metrics Prometheus client libraries export (Istio's Control
/// Plane dashboard plots the virtual and resident memory and the CPU of istiod's).
#[derive(Default)]
struct ProcessMetrics {
    cpu: SecondsCounter,
    resident: Gauge,
    virtual_memory: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time: Gauge<f64, AtomicU64>,
}

/// Rejected types with a gauge of their own, in [`ControlMetrics::type_rejects`] order.
const REJECT_TYPES: [(&str, &str); 4] = [
    (type_url::CLUSTER, "pilot_xds_cds_reject"),
    (type_url::ENDPOINT, "pilot_xds_eds_reject"),
    (type_url::LISTENER, "pilot_xds_lds_reject"),
    (type_url::ROUTE, "pilot_xds_rds_reject"),
];

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
        let type_rejects: [Family<RejectLabels, Gauge>; 4] = std::array::from_fn(|_| Family::default());
        for ((_, name), family) in REJECT_TYPES.iter().zip(&type_rejects) {
            registry.register(*name, "Proxies whose latest response of this type they rejected", family.clone());
        }
        let build = Family::<BuildLabels, Gauge>::default();
        build.get_or_create(&BuildLabels { component: "pilot", tag: env!("CARGO_PKG_VERSION") }).set(1);
        registry.register("istio_build", "Istio component build info", build);
        let (services, virtual_services) = (Gauge::default(), Gauge::default());
        registry.register("pilot_services", "Total services known to pilot", services.clone());
        registry.register("pilot_virt_services", "Total virtual services known to pilot", virtual_services.clone());
        let process = ProcessMetrics::default();
        process.register(&mut registry);
        let xds_refused = crate::xds_auth::RefusedStreams::default();
        registry.register(
            "weft_xds_refused_streams",
            "xDS streams refused before registering: no or a bad credential, or node metadata claiming another identity",
            xds_refused.clone(),
        );
        ControlMetrics {
            registry,
            xds,
            connected,
            csrs,
            issued,
            uptime,
            started: Instant::now(),
            type_rejects,
            services,
            virtual_services,
            process,
            xds_refused,
        }
    }

    /// Refused xDS streams, counted by the admission (`weft_xds_refused_streams_total{reason}`).
    pub fn xds_refused(&self) -> crate::xds_auth::RefusedStreams {
        self.xds_refused.clone()
    }

    /// What the xDS server reports to.
    pub fn xds(&self) -> Arc<XdsMetrics> {
        self.xds.clone()
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric, with the values
    /// read now from `view` and the process.
    pub fn render(&self, view: &MeshView<'_>) -> String {
        self.connected.set(gauge_value(view.connections.len()));
        if let Some(stats) = view.certificates {
            self.csrs.set(stats.csrs());
            self.issued.set(stats.issued());
        }
        self.uptime.set(self.started.elapsed().as_secs_f64());
        for ((type_url, _), family) in REJECT_TYPES.iter().zip(&self.type_rejects) {
            family.clear();
            for c in view.connections {
                if let Some(err) = current_reject(c, type_url) {
                    family.get_or_create(&RejectLabels { node: c.node_id.clone(), err }).set(1);
                }
            }
        }
        self.services.set(gauge_value(view.services));
        self.virtual_services.set(gauge_value(view.virtual_services));
        self.process.refresh();
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

/// `istio_build`'s labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    tag: &'static str,
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The error of `c`'s latest response of `type_url`, when the proxy rejected it (a later
/// response, ACKed or not yet answered, clears it). Istio's `err` label holds the error
/// text; it is cut to a line of at most 200 bytes to bound the series size, with quotes
/// and backslashes replaced.
fn current_reject(c: &ConnectionStatus, type_url: &str) -> Option<String> {
    let t = c.types.get(type_url)?;
    let nack = t.last_nack.as_ref()?;
    if t.sent_nonce.as_deref() != Some(nack.nonce.as_str()) {
        return None;
    }
    let line = nack.error.lines().next().unwrap_or_default();
    let mut end = line.len().min(200);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    // prometheus-client writes label values verbatim: keep out what the text format
    // would need escaped.
    Some(line[..end].replace('"', "'").replace('\\', "/"))
}

impl ProcessMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds",
            self.cpu.clone(),
        );
        registry.register("process_resident_memory_bytes", "Resident memory size in bytes", self.resident.clone());
        registry.register("process_virtual_memory_bytes", "Virtual memory size in bytes", self.virtual_memory.clone());
        registry.register("process_open_fds", "Number of open file descriptors", self.open_fds.clone());
        registry.register("process_max_fds", "Maximum number of open file descriptors", self.max_fds.clone());
        registry.register(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            self.start_time.clone(),
        );
    }

    /// Reads the process's numbers now (Linux `/proc/self`; elsewhere they stay 0).
    fn refresh(&self) {
        let Some(p) = process::read() else { return };
        self.cpu.set(p.cpu_seconds);
        self.resident.set(gauge_value(p.resident_bytes));
        self.virtual_memory.set(gauge_value(p.virtual_bytes));
        self.open_fds.set(gauge_value(p.open_fds));
        self.max_fds.set(gauge_value(p.max_fds));
        self.start_time.set(p.start_time_seconds);
    }
}

/// The process's own numbers from Linux's `/proc/self`.
pub mod process {
    /// One reading.
    #[derive(Debug, Clone, PartialEq)]
    pub struct ProcessStats {
        /// User plus system CPU time.
        pub cpu_seconds: f64,
        /// Resident set size.
        pub resident_bytes: usize,
        /// Virtual memory size.
        pub virtual_bytes: usize,
        /// Open file descriptors.
        pub open_fds: usize,
        /// The soft limit on open file descriptors.
        pub max_fds: usize,
        /// Start time, seconds since the Unix epoch.
        pub start_time_seconds: f64,
    }

    /// `/proc` reports times in USER_HZ, which Linux fixes at 100 for user space.
    const USER_HZ: f64 = 100.0;

    /// Reads `/proc/self`; `None` where it does not exist or cannot be parsed.
    pub fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let boot = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0);
        parse(&stat, &status, &limits, &boot, open_fds)
    }

    /// [`read`] on given file contents.
    pub fn parse(stat: &str, status: &str, limits: &str, proc_stat: &str, open_fds: usize) -> Option<ProcessStats> {
        // The command name (field 2) is in parentheses and may hold spaces: count the
        // fields after its closing parenthesis, which start at field 3 (state).
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
        let cpu_seconds = (field(14)? + field(15)?) / USER_HZ;
        let start_ticks = field(22)?;
        let kib = |key: &str| -> Option<usize> {
            let line = status.lines().find(|l| l.starts_with(key))?;
            let n: usize = line[key.len()..].split_whitespace().next()?.parse().ok()?;
            Some(n * 1024)
        };
        let max_fds = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l["Max open files".len()..].split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let boot_time: f64 =
            proc_stat.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0);
        Some(ProcessStats {
            cpu_seconds,
            resident_bytes: kib("VmRSS:").unwrap_or(0),
            virtual_bytes: kib("VmSize:").unwrap_or(0),
            open_fds,
            max_fds,
            start_time_seconds: boot_time + start_ticks / USER_HZ,
        })
    }
}

/// A counter of seconds mirrored from the kernel's count, exposed under its family's
/// name (`process_cpu_seconds_total`, as Prometheus client libraries name it).
#[derive(Clone, Debug, Default)]
struct SecondsCounter(Arc<AtomicU64>);

impl SecondsCounter {
    /// Mirrors the kernel's total; a counter never goes back, so a smaller value is ignored.
    fn set(&self, seconds: f64) {
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            (seconds > f64::from_bits(bits)).then_some(seconds.to_bits())
        });
    }
}

impl TypedMetric for SecondsCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for SecondsCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        encoder.encode_gauge(&f64::from_bits(self.0.load(Ordering::Relaxed)))
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
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
        let conns: Vec<ConnectionStatus> = Vec::new();
        let text = metrics.render(&MeshView { connections: &conns, ..MeshView::default() });
        assert!(text.contains("# TYPE pilot_xds_pushes counter\n"), "{text}");
        assert!(text.contains("pilot_xds_pushes{type=\"cds\"} 1\n"), "{text}");
        assert!(!text.contains("type=\"eds\""), "untouched types are not exposed: {text}");
        assert!(text.contains("pilot_total_xds_rejects{type=\"lds\"} 1\n"), "{text}");
        assert!(text.contains("pilot_proxy_convergence_time_count 1\n"), "{text}");
        assert!(text.contains("pilot_xds 0\n"), "{text}");
        assert!(text.contains("istio_build{component=\"pilot\",tag=\""), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
    }

    #[test]
    fn process_stats_parse_procfs() {
        // A command name with spaces and a parenthesis must not shift the fields.
        let stat = "4242 (weft (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 9 0 12345 0 0";
        let status = "Name:\tweft\nVmSize:\t  204800 kB\nVmRSS:\t    10240 kB\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        let p = process::parse(stat, status, limits, "cpu 1 2 3\nbtime 1700000000\n", 7).unwrap();
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.resident_bytes, 10 * 1024 * 1024);
        assert_eq!(p.virtual_bytes, 200 * 1024 * 1024);
        assert_eq!(p.max_fds, 1024);
        assert_eq!(p.open_fds, 7);
        assert_eq!(p.start_time_seconds, 1_700_000_000.0 + 123.45);
        assert_eq!(process::parse("garbage", status, limits, "", 0), None);
        assert!(process::read().is_some(), "this test runs on Linux");
    }
}
