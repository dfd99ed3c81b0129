//! Proxy health metrics (`weft_*`): xDS state, config versions and age, upstream retries
//! and connections, certificate expiry, access-log drops.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use super::exposition::label;

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
    upstream_rq_retry_overflow: Family<ClusterLabel, Counter>,
    upstream_rq_pending_overflow: Family<ClusterLabel, Counter>,
    upstream_cx_overflow: Family<ClusterLabel, Counter>,
    upstream_cx_active: Family<ClusterLabel, Gauge>,
    cert_expiry: Gauge<f64, AtomicU64>,
    access_log_dropped: Counter,
    on_demand_host_evictions: Counter,
    tap_active: Gauge,
    tap_dropped: Counter,
    tls_failures: Family<TlsFailureLabels, Counter>,
    upstream_tls_failures: Family<UpstreamTlsLabels, Counter>,
    /// Per xDS type: current version and when it was applied. Touched on config updates
    /// and scrapes only, never on the request path.
    applied: Mutex<HashMap<String, Applied>>,
}

/// All metrics of one proxy and the registry that encodes them.

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

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TlsFailureLabels {
    listener: String,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct UpstreamTlsLabels {
    cluster: String,
    reason: &'static str,
}

impl EncodeLabelSet for UpstreamTlsLabels {
    fn encode(&self, mut enc: LabelSetEncoder) -> fmt::Result {
        label(&mut enc, "cluster", &self.cluster)?;
        label(&mut enc, "reason", self.reason)
    }
}

impl EncodeLabelSet for TlsFailureLabels {
    fn encode(&self, mut enc: LabelSetEncoder) -> fmt::Result {
        label(&mut enc, "listener", &self.listener)?;
        label(&mut enc, "reason", self.reason)
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
    pub(super) fn register(registry: &mut Registry) -> Self {
        let health = Self {
            xds_connected: Gauge::default(),
            xds_nacks: Family::default(),
            xds_updates: Family::default(),
            config_version: Family::default(),
            config_age: Family::default(),
            upstream_rq_retry: Family::default(),
            upstream_rq_retry_overflow: Family::default(),
            upstream_rq_pending_overflow: Family::default(),
            upstream_cx_overflow: Family::default(),
            upstream_cx_active: Family::default(),
            cert_expiry: Gauge::default(),
            access_log_dropped: Counter::default(),
            on_demand_host_evictions: Counter::default(),
            tap_active: Gauge::default(),
            tap_dropped: Counter::default(),
            tls_failures: Family::default(),
            upstream_tls_failures: Family::default(),
            applied: Mutex::new(HashMap::new()),
        };
        registry.register(
            "weft_xds_connected",
            "1 while the ADS stream to the control plane is up",
            health.xds_connected.clone(),
        );
        registry.register(
            "weft_xds_nacks",
            "xDS responses rejected (NACKed) by this proxy, by type",
            health.xds_nacks.clone(),
        );
        registry.register(
            "weft_xds_updates",
            "xDS responses applied (ACKed) by this proxy, by type",
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
        registry.register("weft_upstream_rq_retry", "Upstream request retries", health.upstream_rq_retry.clone());
        registry.register(
            "weft_upstream_rq_retry_overflow",
            "Upstream retries not done because the cluster's max_retries or retry budget was reached (Envoy's upstream_rq_retry_overflow)",
            health.upstream_rq_retry_overflow.clone(),
        );
        registry.register(
            "weft_upstream_rq_pending_overflow",
            "Requests refused with 503 UO by the cluster's circuit breaker: max_requests, or max_pending_requests while waiting for a connection (Envoy's upstream_rq_pending_overflow)",
            health.upstream_rq_pending_overflow.clone(),
        );
        registry.register(
            "weft_upstream_cx_overflow",
            "TCP connections closed because the cluster's max_connections was reached (Envoy's upstream_cx_overflow)",
            health.upstream_cx_overflow.clone(),
        );
        registry.register("weft_upstream_cx_active", "Open upstream connections", health.upstream_cx_active.clone());
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
        registry.register(
            "weft_on_demand_host_evictions",
            "Hosts on-demand discovery forgot (and unsubscribed) to stay within its bound",
            health.on_demand_host_evictions.clone(),
        );
        registry.register(
            "weft_tap_active",
            "Taps (weft tap) this proxy is currently serving",
            health.tap_active.clone(),
        );
        registry.register(
            "weft_tap_dropped",
            "Tap events dropped because the queue to the control plane was full",
            health.tap_dropped.clone(),
        );
        registry.register(
            "weft_tls_handshake_failures",
            "Inbound TLS handshakes refused, by listener and reason (unknown_ca, expired, wrong_identity, no_client_certificate, ...)",
            health.tls_failures.clone(),
        );
        registry.register(
            "weft_upstream_tls_handshake_failures",
            "Upstream TLS handshakes this proxy refused or failed, by cluster and reason (wrong_identity, unknown_ca, expired, ...)",
            health.upstream_tls_failures.clone(),
        );
        health
    }

    /// Counts a failed upstream TLS handshake.
    pub fn upstream_tls_failed(&self, cluster: &str, reason: &'static str) {
        self.upstream_tls_failures.get_or_create(&UpstreamTlsLabels { cluster: cluster.to_owned(), reason }).inc();
    }

    /// Counts a refused inbound TLS handshake.
    pub fn tls_handshake_failed(&self, listener: &str, reason: &'static str) {
        self.tls_failures.get_or_create(&TlsFailureLabels { listener: listener.to_owned(), reason }).inc();
    }

    /// Records whether the ADS stream is up.
    pub fn set_xds_connected(&self, connected: bool) {
        self.xds_connected.set(i64::from(connected));
    }

    /// Counts a NACKed xDS response of `type_name` (the type URL's short name, e.g.
    /// `Cluster`), leaving the other types' series alone.
    pub fn xds_nack(&self, type_name: &str) {
        self.xds_nacks.get_or_create(&TypeLabel { r#type: type_name.to_owned() }).inc();
    }

    /// Records that `version` of `type_name` was applied now: counts the update, moves the
    /// `weft_config_version` series to the new version and resets the config age, of
    /// that type only.
    pub fn config_applied(&self, type_name: &str, version: &str) {
        self.xds_updates.get_or_create(&TypeLabel { r#type: type_name.to_owned() }).inc();
        let previous = {
            let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
            applied.insert(type_name.to_owned(), Applied { version: version.to_owned(), at: Instant::now() })
        };
        if let Some(prev) = previous {
            if prev.version != version {
                self.config_version.remove(&VersionLabels { r#type: type_name.to_owned(), version: prev.version });
            }
        }
        self.config_version
            .get_or_create(&VersionLabels { r#type: type_name.to_owned(), version: version.to_owned() })
            .set(1);
    }

    /// Counts one upstream retry to `cluster`.
    pub fn upstream_retry(&self, cluster: &str) {
        self.upstream_rq_retry.get_or_create(&cluster_label(cluster)).inc();
    }

    /// Counts a retry to `cluster` refused by its circuit breaker.
    pub fn upstream_rq_retry_overflow(&self, cluster: &str) {
        self.upstream_rq_retry_overflow.get_or_create(&cluster_label(cluster)).inc();
    }

    /// Counts a request to `cluster` refused by its circuit breaker.
    pub fn upstream_rq_pending_overflow(&self, cluster: &str) {
        self.upstream_rq_pending_overflow.get_or_create(&cluster_label(cluster)).inc();
    }

    /// Counts a TCP connection to `cluster` refused by its circuit breaker.
    pub fn upstream_cx_overflow(&self, cluster: &str) {
        self.upstream_cx_overflow.get_or_create(&cluster_label(cluster)).inc();
    }

    /// Counts a newly opened upstream connection to `cluster`.
    pub fn upstream_cx_opened(&self, cluster: &str) {
        self.upstream_cx_active.get_or_create(&cluster_label(cluster)).inc();
    }

    /// Counts a closed upstream connection to `cluster`.
    pub fn upstream_cx_closed(&self, cluster: &str) {
        self.upstream_cx_active.get_or_create(&cluster_label(cluster)).dec();
    }

    /// Records when the current workload certificate expires.
    pub fn set_cert_expiry(&self, not_after: SystemTime) {
        let secs = not_after.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        self.cert_expiry.set(secs);
    }

    /// The counter the access log increments when it drops a line.
    pub fn access_log_dropped(&self) -> Counter {
        self.access_log_dropped.clone()
    }

    /// The counter on-demand discovery increments when it forgets a host.
    pub fn on_demand_host_evictions(&self) -> Counter {
        self.on_demand_host_evictions.clone()
    }

    /// The gauge of taps in force and the counter of tap events dropped.
    pub fn tap(&self) -> (Gauge, Counter) {
        (self.tap_active.clone(), self.tap_dropped.clone())
    }

    /// Refreshes `weft_config_age_seconds` from the last-applied times.
    pub(super) fn refresh_ages(&self) {
        let now = Instant::now();
        let applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        for (type_name, a) in applied.iter() {
            self.config_age
                .get_or_create(&TypeLabel { r#type: type_name.clone() })
                .set(now.saturating_duration_since(a.at).as_secs_f64());
        }
    }
}

fn cluster_label(cluster: &str) -> ClusterLabel {
    ClusterLabel { cluster: cluster.to_owned() }
}
