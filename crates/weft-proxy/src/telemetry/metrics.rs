//! Istio's standard metrics and the proxy's own health metrics, exposed in the classic
//! Prometheus text format (`text/plain; version=0.0.4`).
//!
//! Label sets hold `Arc`s to workload descriptions the proxy caches per peer, so recording
//! a request clones reference counts, never label strings.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use super::{WorkloadInfo, UNKNOWN};

/// Content type of [`Metrics::encode`]'s output.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Istio's buckets for `istio_request_duration_milliseconds`.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
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
        Self {
            host: UNKNOWN.into(),
            name: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
        }
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

/// Proxy health metrics (`weft_*`): xDS state, config versions and age, upstream retries
/// and connections, certificate expiry.
#[derive(Debug)]
pub struct ProxyHealth {
    xds_connected: Gauge,
    xds_nacks: Family<TypeLabel, Counter>,
    xds_updates: Family<TypeLabel, Counter>,
    config_version: Family<VersionLabels, Gauge>,
    config_age: Family<TypeLabel, Gauge<f64, AtomicU64>>,
    upstream_rq_retry: Family<ClusterLabel, Counter>,
    upstream_cx_active: Family<ClusterLabel, Gauge>,
    cert_expiry: Gauge<f64, AtomicU64>,
    access_log_dropped: Counter,
    /// Per xDS type: current version and when it was applied. Touched on config updates
    /// and scrapes only, never on the request path.
    applied: Mutex<HashMap<String, Applied>>,
}

/// All metrics of one proxy and the registry that encodes them.
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
    proxy: ProxyHealth,
}

#[derive(Debug)]
struct Applied {
    version: String,
    at: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TypeLabel {
    r#type: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct VersionLabels {
    r#type: String,
    version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClusterLabel {
    cluster: String,
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
        label(
            &mut enc,
            "response_code",
            fmt_u32(&mut code, self.response_code.into()),
        )?;
        let mut grpc = itoa_buf();
        let grpc = match self.grpc_status {
            Some(s) => fmt_u32(&mut grpc, s),
            None => "",
        };
        label(&mut enc, "grpc_response_status", grpc)?;
        label(&mut enc, "response_flags", &self.response_flags)?;
        label(
            &mut enc,
            "connection_security_policy",
            self.security_policy.as_str(),
        )
    }
}

impl EncodeLabelSet for TcpLabels {
    fn encode(&self, mut enc: LabelSetEncoder) -> fmt::Result {
        label(&mut enc, "reporter", self.reporter.as_str())?;
        encode_peers(&mut enc, &self.source, &self.destination, &self.service)?;
        label(&mut enc, "request_protocol", "tcp")?;
        label(&mut enc, "response_flags", &self.response_flags)?;
        label(
            &mut enc,
            "connection_security_policy",
            self.security_policy.as_str(),
        )
    }
}

impl EncodeLabelSet for TypeLabel {
    fn encode(&self, mut enc: LabelSetEncoder) -> fmt::Result {
        label(&mut enc, "type", &self.r#type)
    }
}

impl EncodeLabelSet for VersionLabels {
    fn encode(&self, mut enc: LabelSetEncoder) -> fmt::Result {
        label(&mut enc, "type", &self.r#type)?;
        label(&mut enc, "version", &self.version)
    }
}

impl EncodeLabelSet for ClusterLabel {
    fn encode(&self, mut enc: LabelSetEncoder) -> fmt::Result {
        label(&mut enc, "cluster", &self.cluster)
    }
}

impl ProxyHealth {
    fn register(registry: &mut Registry) -> Self {
        let health = Self {
            xds_connected: Gauge::default(),
            xds_nacks: Family::default(),
            xds_updates: Family::default(),
            config_version: Family::default(),
            config_age: Family::default(),
            upstream_rq_retry: Family::default(),
            upstream_cx_active: Family::default(),
            cert_expiry: Gauge::default(),
            access_log_dropped: Counter::default(),
            applied: Mutex::new(HashMap::new()),
        };
        registry.register(
            "weft_xds_connected",
            "1 while the ADS stream to the control plane is up",
            health.xds_connected.clone(),
        );
        registry.register(
            "weft_xds_nacks",
            "xDS responses rejected (NACKed) by this proxy",
            health.xds_nacks.clone(),
        );
        registry.register(
            "weft_xds_updates",
            "xDS responses applied (ACKed) by this proxy",
            health.xds_updates.clone(),
        );
        registry.register(
            "weft_config_version",
            "Version of the configuration in force, per xDS type (value is always 1)",
            health.config_version.clone(),
        );
        registry.register(
            "weft_config_age_seconds",
            "Seconds since the configuration of this xDS type was last applied",
            health.config_age.clone(),
        );
        registry.register(
            "weft_upstream_rq_retry",
            "Upstream request retries",
            health.upstream_rq_retry.clone(),
        );
        registry.register(
            "weft_upstream_cx_active",
            "Open upstream connections",
            health.upstream_cx_active.clone(),
        );
        registry.register(
            "weft_cert_expiry_timestamp_seconds",
            "Unix time at which the workload certificate expires",
            health.cert_expiry.clone(),
        );
        registry.register(
            "weft_access_log_dropped",
            "Access log lines dropped because the writer fell behind or failed",
            health.access_log_dropped.clone(),
        );
        health
    }

    /// Records whether the ADS stream is up.
    pub fn set_xds_connected(&self, connected: bool) {
        self.xds_connected.set(i64::from(connected));
    }

    /// Counts a NACKed xDS response of `type_name` (a type URL or short name).
    pub fn xds_nack(&self, type_name: &str) {
        self.xds_nacks
            .get_or_create(&TypeLabel {
                r#type: type_name.to_owned(),
            })
            .inc();
    }

    /// Records that `version` of `type_name` was applied now: counts the update, moves the
    /// `weft_config_version` series to the new version and resets the config age.
    pub fn config_applied(&self, type_name: &str, version: &str) {
        self.xds_updates
            .get_or_create(&TypeLabel {
                r#type: type_name.to_owned(),
            })
            .inc();
        let previous = {
            let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
            applied.insert(
                type_name.to_owned(),
                Applied {
                    version: version.to_owned(),
                    at: Instant::now(),
                },
            )
        };
        if let Some(prev) = previous {
            if prev.version != version {
                self.config_version.remove(&VersionLabels {
                    r#type: type_name.to_owned(),
                    version: prev.version,
                });
            }
        }
        self.config_version
            .get_or_create(&VersionLabels {
                r#type: type_name.to_owned(),
                version: version.to_owned(),
            })
            .set(1);
    }

    /// Counts one upstream retry to `cluster`.
    pub fn upstream_retry(&self, cluster: &str) {
        self.upstream_rq_retry
            .get_or_create(&cluster_label(cluster))
            .inc();
    }

    /// Counts a newly opened upstream connection to `cluster`.
    pub fn upstream_cx_opened(&self, cluster: &str) {
        self.upstream_cx_active
            .get_or_create(&cluster_label(cluster))
            .inc();
    }

    /// Counts a closed upstream connection to `cluster`.
    pub fn upstream_cx_closed(&self, cluster: &str) {
        self.upstream_cx_active
            .get_or_create(&cluster_label(cluster))
            .dec();
    }

    /// Records when the current workload certificate expires.
    pub fn set_cert_expiry(&self, not_after: SystemTime) {
        let secs = not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.cert_expiry.set(secs);
    }

    /// The counter the access log increments when it drops a line.
    pub fn access_log_dropped(&self) -> Counter {
        self.access_log_dropped.clone()
    }

    /// Refreshes `weft_config_age_seconds` from the last-applied times.
    fn refresh_ages(&self) {
        let now = Instant::now();
        let applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        for (type_name, a) in applied.iter() {
            self.config_age
                .get_or_create(&TypeLabel {
                    r#type: type_name.clone(),
                })
                .set(now.saturating_duration_since(a.at).as_secs_f64());
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
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
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds",
            duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body size in bytes",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body size in bytes",
            response_bytes.clone(),
        );
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
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            tcp_closed.clone(),
        );
        let proxy = ProxyHealth::register(&mut registry);
        Self {
            registry,
            requests,
            duration,
            request_bytes,
            response_bytes,
            tcp_sent,
            tcp_received,
            tcp_opened,
            tcp_closed,
            proxy,
        }
    }

    /// Records one finished HTTP or gRPC request.
    pub fn record_request(
        &self,
        labels: &RequestLabels,
        duration: Duration,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        self.requests.get_or_create(labels).inc();
        self.duration
            .get_or_create(labels)
            .observe(duration.as_secs_f64() * 1000.0);
        self.request_bytes
            .get_or_create(labels)
            .observe(request_bytes as f64);
        self.response_bytes
            .get_or_create(labels)
            .observe(response_bytes as f64);
    }

    /// Counts an opened TCP connection.
    pub fn tcp_opened(&self, labels: &TcpLabels) {
        self.tcp_opened.get_or_create(labels).inc();
    }

    /// Adds bytes of a TCP connection; may be called repeatedly while it is open.
    /// `sent` went to the downstream, `received` came from it.
    pub fn tcp_bytes(&self, labels: &TcpLabels, sent: u64, received: u64) {
        if sent > 0 {
            self.tcp_sent.get_or_create(labels).inc_by(sent);
        }
        if received > 0 {
            self.tcp_received.get_or_create(labels).inc_by(received);
        }
    }

    /// Counts a closed TCP connection.
    pub fn tcp_closed(&self, labels: &TcpLabels) {
        self.tcp_closed.get_or_create(labels).inc();
    }

    /// Proxy health metrics.
    pub fn proxy(&self) -> &ProxyHealth {
        &self.proxy
    }

    /// Encodes every metric in the classic Prometheus text format (version 0.0.4), served
    /// with [`TEXT_CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        self.proxy.refresh_ages();
        let mut open = String::new();
        if let Err(e) =
            prometheus_client::encoding::text::encode_registry(&mut open, &self.registry)
        {
            tracing::error!(error = %e, "encoding metrics failed; output is truncated");
        }
        openmetrics_to_text(&open)
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS_BYTES)
}

fn cluster_label(cluster: &str) -> ClusterLabel {
    ClusterLabel {
        cluster: cluster.to_owned(),
    }
}

/// Encodes one label. prometheus-client writes label values verbatim, so values (which
/// may come from peers) are escaped here as the text format requires.
fn label(enc: &mut LabelSetEncoder, key: &str, value: &str) -> fmt::Result {
    label_parts(enc, &[key], value)
}

fn label_parts(enc: &mut LabelSetEncoder, key: &[&str], value: &str) -> fmt::Result {
    let mut label_enc = enc.encode_label();
    let mut key_enc = label_enc.encode_label_key()?;
    for part in key {
        key_enc.write_str(part)?;
    }
    let mut value_enc = key_enc.encode_label_value()?;
    write_escaped(&mut value_enc, value)?;
    value_enc.finish()
}

/// Writes `value` escaping `\`, `"` and newlines as the exposition formats require.
fn write_escaped(w: &mut impl fmt::Write, value: &str) -> fmt::Result {
    let mut rest = value;
    while let Some(i) = rest.find(['\\', '"', '\n']) {
        w.write_str(&rest[..i])?;
        w.write_str(match rest.as_bytes()[i] {
            b'\\' => "\\\\",
            b'"' => "\\\"",
            _ => "\\n",
        })?;
        rest = &rest[i + 1..];
    }
    w.write_str(rest)
}

fn encode_peers(
    enc: &mut LabelSetEncoder,
    src: &WorkloadInfo,
    dst: &WorkloadInfo,
    svc: &ServiceInfo,
) -> fmt::Result {
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

/// Rewrites prometheus-client's OpenMetrics output into the classic text format that
/// `promtool check metrics` and every Prometheus version parse: counter families are
/// named with their `_total` suffix, `# UNIT` and `# EOF` lines are dropped, and
/// OpenMetrics-only types map to their classic equivalents.
fn openmetrics_to_text(open: &str) -> String {
    let mut out = String::with_capacity(open.len() + 256);
    let mut pending_help: Option<(&str, &str)> = None;
    for line in open.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            pending_help = Some((name, help));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (suffix, ty) = match ty {
                "counter" if !name.ends_with("_total") => ("_total", "counter"),
                "counter" => ("", "counter"),
                "gauge" | "histogram" | "summary" => ("", ty),
                "info" | "stateset" => ("", "gauge"),
                _ => ("", "untyped"),
            };
            if let Some((help_name, help)) = pending_help.take() {
                if help_name == name {
                    let _ = writeln!(out, "# HELP {name}{suffix} {help}");
                }
            }
            let _ = writeln!(out, "# TYPE {name}{suffix} {ty}");
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests;
