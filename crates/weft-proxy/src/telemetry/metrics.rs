//! Istio's standard metrics and the proxy's own health metrics, exposed in the classic
//! Prometheus text format (`text/plain; version=0.0.4`).
//!
//! Label sets hold `Arc`s to workload descriptions the proxy caches per peer, so recording
//! a request clones reference counts, never label strings.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::exposition::{label, label_parts, openmetrics_to_text};
use super::health::ProxyHealth;
use super::{FastState, WorkloadInfo, UNKNOWN};

/// Content type of [`Metrics::encode`]'s output.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Default cap on distinct label sets per group (requests, TCP). Beyond it, new label sets
/// are recorded with `unknown` source and destination workloads, so a peer sending
/// random metadata cannot grow memory without bound.
pub const DEFAULT_MAX_SERIES: usize = 10_000;

/// Istio's buckets for `istio_request_duration_milliseconds`.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

/// Istio's buckets for `istio_request_bytes` and `istio_response_bytes`: 1, 10, ..., 1e9.
pub const SIZE_BUCKETS_BYTES: [f64; 10] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/// Which proxy reports a metric: the client side (`source`) or the server side
/// (`destination`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The outbound (client-side) proxy.
    Source,
    /// The inbound (server-side) proxy.
    Destination,
}

/// `request_protocol` of an HTTP-level request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestProtocol {
    /// HTTP/1.x or HTTP/2 that is not gRPC.
    Http,
    /// gRPC (`content-type: application/grpc*`).
    Grpc,
}

/// `connection_security_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecurityPolicy {
    /// The hop was mutual TLS between proxies.
    MutualTls,
    /// Plaintext.
    None,
    /// The reporter cannot tell (Istio's client side reports this).
    Unknown,
}

/// The destination service of a request or connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceInfo {
    /// `destination_service`: the host, e.g. `reviews.default.svc.cluster.local`.
    pub host: String,
    /// `destination_service_name`, e.g. `reviews`.
    pub name: String,
    /// `destination_service_namespace`, e.g. `default`.
    pub namespace: String,
}

impl Default for ServiceInfo {
    fn default() -> Self {
        Self { host: UNKNOWN.into(), name: UNKNOWN.into(), namespace: UNKNOWN.into() }
    }
}

/// Labels of `istio_requests_total`, `istio_request_duration_milliseconds`,
/// `istio_request_bytes` and `istio_response_bytes`, encoded with Istio's label names
/// (`source_workload`, `destination_service_name`, `response_flags`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestLabels {
    /// `reporter`.
    pub reporter: Reporter,
    /// `source_*` labels (workload, workload_namespace, principal, app, version, cluster,
    /// canonical_service, canonical_revision).
    pub source: Arc<WorkloadInfo>,
    /// `destination_*` workload labels, same set as `source`.
    pub destination: Arc<WorkloadInfo>,
    /// `destination_service`, `destination_service_name`, `destination_service_namespace`.
    pub service: Arc<ServiceInfo>,
    /// `request_protocol`.
    pub protocol: RequestProtocol,
    /// `response_code`; 0 when no response was received.
    pub response_code: u16,
    /// `grpc_response_status`; empty when `None`.
    pub grpc_status: Option<u32>,
    /// `response_flags`: Envoy flags such as `UF,URX`, `"-"` when none.
    pub response_flags: Cow<'static, str>,
    /// `connection_security_policy`.
    pub security_policy: SecurityPolicy,
}

/// Labels of the `istio_tcp_*` metrics: the request labels without `response_code` and
/// `grpc_response_status`, with `request_protocol="tcp"` (as Istio emits them).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TcpLabels {
    /// `reporter`.
    pub reporter: Reporter,
    /// `source_*` labels.
    pub source: Arc<WorkloadInfo>,
    /// `destination_*` workload labels.
    pub destination: Arc<WorkloadInfo>,
    /// `destination_service*` labels.
    pub service: Arc<ServiceInfo>,
    /// `response_flags`, `"-"` when none.
    pub response_flags: Cow<'static, str>,
    /// `connection_security_policy`.
    pub security_policy: SecurityPolicy,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    request_bytes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    response_bytes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    tcp_sent: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    request_series: SeriesCache<RequestLabels, RequestSeries>,
    /// The same series by the identity of the label set's shared parts (see [`ById`]).
    /// Each entry keeps its label set: see [`ById`].
    request_ids: RwLock<HashMap<ById, (RequestLabels, Arc<RequestSeries>), FastState>>,
    tcp_series: SeriesCache<TcpLabels, TcpSeries>,
    overflow: Counter,
    unknown: Arc<WorkloadInfo>,
    proxy: ProxyHealth,
    rbac: super::rbac::RbacMetrics,
    ratelimit: super::ratelimit::RateLimitMetrics,
    drain: super::drain::DrainMetrics,
    tracing: Arc<super::trace::TraceMetrics>,
}

/// Handles to the four series of one request label set, so recording a request hashes
/// its labels once instead of once per metric.
#[derive(Debug)]
struct RequestSeries {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// Entries [`Metrics`] keeps by identity before starting afresh (a request's peers,
/// service and local workload are shared `Arc`s from the proxy's caches, so a steady
/// workload needs a handful; the bound keeps churn from growing it).
const ID_CACHE_ENTRIES: usize = 256;

/// A request label set by the identity of its workloads and service (the addresses of
/// the `Arc`s it holds) and by value for the rest: hashing it is three addresses and a
/// few small fields instead of the ~20 label strings of the content key (~1.2k
/// instructions per request). Built from borrowed labels: a lookup clones no `Arc` (the
/// clone and its drop were ~0.3% of a saturated sidecar's samples). The entry it keys
/// keeps its label set, hence those `Arc`s, alive, so an address cannot be reused while
/// the entry exists. Equal identities imply equal labels, so an entry always names the
/// series the content key would; a label set built afresh just misses and takes the
/// content path.
#[derive(Debug, PartialEq, Eq, Hash)]
struct ById {
    source: usize,
    destination: usize,
    service: usize,
    reporter: Reporter,
    protocol: RequestProtocol,
    response_code: u16,
    grpc_status: Option<u32>,
    /// A copy of a static string but for several flags together (rare).
    response_flags: Cow<'static, str>,
    security_policy: SecurityPolicy,
}

impl ById {
    fn of(l: &RequestLabels) -> Self {
        ById {
            source: Arc::as_ptr(&l.source) as usize,
            destination: Arc::as_ptr(&l.destination) as usize,
            service: Arc::as_ptr(&l.service) as usize,
            reporter: l.reporter,
            protocol: l.protocol,
            response_code: l.response_code,
            grpc_status: l.grpc_status,
            response_flags: l.response_flags.clone(),
            security_policy: l.security_policy,
        }
    }
}

/// Handles to the four series of one TCP label set.
#[derive(Debug)]
struct TcpSeries {
    sent: Counter,
    received: Counter,
    opened: Counter,
    closed: Counter,
}

/// Label set -> series handles, capped at `max` entries (plus folded overflow sets).
/// Hashed with foldhash (seeded per process, so peers cannot aim collisions at it):
/// a label set is ~20 strings and SipHash over them showed up in profiles.
#[derive(Debug)]
struct SeriesCache<L, S> {
    map: RwLock<HashMap<L, Arc<S>, FastState>>,
    max: usize,
}

impl Reporter {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

impl RequestProtocol {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestProtocol::Http => "http",
            RequestProtocol::Grpc => "grpc",
        }
    }
}

impl SecurityPolicy {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityPolicy::MutualTls => "mutual_tls",
            SecurityPolicy::None => "none",
            SecurityPolicy::Unknown => "unknown",
        }
    }
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, mut enc: LabelSetEncoder) -> fmt::Result {
        label(&mut enc, "reporter", self.reporter.as_str())?;
        encode_peers(&mut enc, &self.source, &self.destination, &self.service)?;
        label(&mut enc, "request_protocol", self.protocol.as_str())?;
        let mut code = itoa_buf();
        label(&mut enc, "response_code", fmt_u32(&mut code, self.response_code.into()))?;
        let mut grpc = itoa_buf();
        let grpc = match self.grpc_status {
            Some(s) => fmt_u32(&mut grpc, s),
            None => "",
        };
        label(&mut enc, "grpc_response_status", grpc)?;
        label(&mut enc, "response_flags", &self.response_flags)?;
        label(&mut enc, "connection_security_policy", self.security_policy.as_str())
    }
}

impl EncodeLabelSet for TcpLabels {
    fn encode(&self, mut enc: LabelSetEncoder) -> fmt::Result {
        label(&mut enc, "reporter", self.reporter.as_str())?;
        encode_peers(&mut enc, &self.source, &self.destination, &self.service)?;
        label(&mut enc, "request_protocol", "tcp")?;
        label(&mut enc, "response_flags", &self.response_flags)?;
        label(&mut enc, "connection_security_policy", self.security_policy.as_str())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric, with [`DEFAULT_MAX_SERIES`].
    pub fn new() -> Self {
        Self::with_max_series(DEFAULT_MAX_SERIES)
    }

    /// Creates and registers every metric, keeping at most `max_series` distinct label
    /// sets per group before folding peers into `unknown`.
    pub fn with_max_series(max_series: usize) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration: Family<RequestLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        let request_bytes: Family<RequestLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(size_histogram);
        let response_bytes: Family<RequestLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(size_histogram);
        let tcp_sent = Family::<TcpLabels, Counter>::default();
        let tcp_received = Family::<TcpLabels, Counter>::default();
        let tcp_opened = Family::<TcpLabels, Counter>::default();
        let tcp_closed = Family::<TcpLabels, Counter>::default();
        // Counters are registered without `_total`: the encoder appends it.
        registry.register("istio_requests", "Requests handled", requests.clone());
        registry.register("istio_request_duration_milliseconds", "Request duration in milliseconds", duration.clone());
        registry.register("istio_request_bytes", "Request body size in bytes", request_bytes.clone());
        registry.register("istio_response_bytes", "Response body size in bytes", response_bytes.clone());
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the downstream during TCP connections",
            tcp_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the downstream during TCP connections",
            tcp_received.clone(),
        );
        registry.register("istio_tcp_connections_opened", "TCP connections opened", tcp_opened.clone());
        registry.register("istio_tcp_connections_closed", "TCP connections closed", tcp_closed.clone());
        let overflow = Counter::default();
        registry.register(
            "weft_metrics_series_overflow",
            "Recordings whose peer workloads were folded into unknown because the series cap was reached",
            overflow.clone(),
        );
        let proxy = ProxyHealth::register(&mut registry);
        let rbac = super::rbac::RbacMetrics::register(&mut registry);
        let ratelimit = super::ratelimit::RateLimitMetrics::register(&mut registry);
        let drain = super::drain::DrainMetrics::register(&mut registry);
        let tracing = Arc::new(super::trace::TraceMetrics::register(&mut registry));
        Self {
            drain,
            tracing,
            registry,
            requests,
            duration,
            request_bytes,
            response_bytes,
            tcp_sent,
            tcp_received,
            tcp_opened,
            tcp_closed,
            request_series: SeriesCache::new(max_series),
            request_ids: RwLock::new(HashMap::with_hasher(FastState::default())),
            tcp_series: SeriesCache::new(max_series),
            overflow,
            unknown: Arc::new(WorkloadInfo::default()),
            proxy,
            rbac,
            ratelimit,
        }
    }

    fn request_series(&self, labels: &RequestLabels) -> Arc<RequestSeries> {
        let key = ById::of(labels);
        if let Some((_, series)) = self.request_ids.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return series.clone();
        }
        let (series, kept) = self.request_series.get_or_insert(
            labels,
            |l| {
                self.overflow.inc();
                RequestLabels { source: self.unknown.clone(), destination: self.unknown.clone(), ..l.clone() }
            },
            |l| RequestSeries {
                requests: self.requests.get_or_create(l).clone(),
                duration: self.duration.get_or_create(l).clone(),
                request_bytes: self.request_bytes.get_or_create(l).clone(),
                response_bytes: self.response_bytes.get_or_create(l).clone(),
            },
        );
        // A folded label set is not kept: each of its recordings counts as an overflow.
        if kept {
            let mut ids = self.request_ids.write().unwrap_or_else(|e| e.into_inner());
            if ids.len() >= ID_CACHE_ENTRIES {
                ids.clear();
            }
            ids.insert(key, (labels.clone(), series.clone()));
        }
        series
    }

    fn tcp_series(&self, labels: &TcpLabels) -> Arc<TcpSeries> {
        self.tcp_series
            .get_or_insert(
                labels,
                |l| {
                    self.overflow.inc();
                    TcpLabels { source: self.unknown.clone(), destination: self.unknown.clone(), ..l.clone() }
                },
                |l| TcpSeries {
                    sent: self.tcp_sent.get_or_create(l).clone(),
                    received: self.tcp_received.get_or_create(l).clone(),
                    opened: self.tcp_opened.get_or_create(l).clone(),
                    closed: self.tcp_closed.get_or_create(l).clone(),
                },
            )
            .0
    }

    /// Records one finished HTTP or gRPC request.
    pub fn record_request(&self, labels: &RequestLabels, duration: Duration, request_bytes: u64, response_bytes: u64) {
        let series = self.request_series(labels);
        series.requests.inc();
        series.duration.observe(duration.as_secs_f64() * 1000.0);
        series.request_bytes.observe(request_bytes as f64);
        series.response_bytes.observe(response_bytes as f64);
    }

    /// Counts an opened TCP connection.
    pub fn tcp_opened(&self, labels: &TcpLabels) {
        self.tcp_series(labels).opened.inc();
    }

    /// Adds bytes of a TCP connection; may be called repeatedly while it is open.
    /// `sent` went to the downstream, `received` came from it.
    pub fn tcp_bytes(&self, labels: &TcpLabels, sent: u64, received: u64) {
        let series = self.tcp_series(labels);
        series.sent.inc_by(sent);
        series.received.inc_by(received);
    }

    /// Counts a closed TCP connection.
    pub fn tcp_closed(&self, labels: &TcpLabels) {
        self.tcp_series(labels).closed.inc();
    }

    /// Proxy health metrics.
    pub fn proxy(&self) -> &ProxyHealth {
        &self.proxy
    }

    /// The RBAC filters' counters.
    pub fn rbac(&self) -> &super::rbac::RbacMetrics {
        &self.rbac
    }

    /// The local rate limit filters' counters.
    pub fn ratelimit(&self) -> &super::ratelimit::RateLimitMetrics {
        &self.ratelimit
    }

    /// The tracer's counters (spans exported and dropped).
    pub fn tracing(&self) -> &Arc<super::trace::TraceMetrics> {
        &self.tracing
    }

    /// Connections ended by configuration changes.
    pub fn drain(&self) -> &super::drain::DrainMetrics {
        &self.drain
    }

    /// Encodes every metric in the classic Prometheus text format (version 0.0.4), served
    /// with [`TEXT_CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        self.proxy.refresh_ages();
        let mut open = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode_registry(&mut open, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed; output is truncated");
        }
        openmetrics_to_text(&open)
    }
}

impl<L: Clone + Eq + Hash, S> SeriesCache<L, S> {
    fn new(max: usize) -> Self {
        Self { map: RwLock::new(HashMap::with_hasher(FastState::default())), max }
    }

    /// The series of `labels`, created with `make` on first sight. Once the cache holds
    /// `max` label sets, a new set is replaced by `fold(labels)` (which has bounded
    /// cardinality) before lookup. The flag is false when `labels` were folded.
    fn get_or_insert(&self, labels: &L, fold: impl FnOnce(&L) -> L, make: impl FnOnce(&L) -> S) -> (Arc<S>, bool) {
        let (key, kept) = {
            let map = self.map.read().unwrap_or_else(|e| e.into_inner());
            if let Some(series) = map.get(labels) {
                return (series.clone(), true);
            }
            if map.len() < self.max {
                (labels.clone(), true)
            } else {
                let folded = fold(labels);
                if let Some(series) = map.get(&folded) {
                    return (series.clone(), false);
                }
                (folded, false)
            }
        };
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        (map.entry(key).or_insert_with_key(|key| Arc::new(make(key))).clone(), kept)
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS_BYTES)
}

fn encode_peers(enc: &mut LabelSetEncoder, src: &WorkloadInfo, dst: &WorkloadInfo, svc: &ServiceInfo) -> fmt::Result {
    for (prefix, w) in [("source", src), ("destination", dst)] {
        let fields: [(&str, &str); 8] = [
            ("workload", &w.workload),
            ("workload_namespace", &w.namespace),
            ("principal", &w.principal),
            ("app", &w.app),
            ("version", &w.version),
            ("cluster", &w.cluster),
            ("canonical_service", &w.canonical_service),
            ("canonical_revision", &w.canonical_revision),
        ];
        for (suffix, value) in fields {
            label_parts(enc, &[prefix, "_", suffix], value)?;
        }
    }
    label(enc, "destination_service", &svc.host)?;
    label(enc, "destination_service_name", &svc.name)?;
    label(enc, "destination_service_namespace", &svc.namespace)
}

/// A stack buffer for formatting small integers without allocating.
fn itoa_buf() -> [u8; 10] {
    [0; 10]
}

fn fmt_u32(buf: &mut [u8; 10], mut v: u32) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    std::str::from_utf8(&buf[i..]).unwrap_or("")
}

#[cfg(test)]
mod tests;
