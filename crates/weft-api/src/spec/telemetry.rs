//! `telemetry.istio.io` Telemetry: tracing, access logging and metrics settings for the
//! workloads a resource selects (the root namespace without selector: the whole mesh).
//!
//! What the translator applies and what `analyze` reports as not applied (WFT0002,
//! WFT0003, WFT0004) is listed in docs/observability.md.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::common::{Duration, LabelSelector, TargetRef};
use super::security::ExtensionProvider;

/// Istio `Telemetry`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Telemetry {
    /// Workloads (absent: the namespace; in the root namespace: the mesh).
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    /// Target reference.
    #[serde(default)]
    pub target_ref: Option<TargetRef>,
    /// Several target references.
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    /// Tracing settings.
    #[serde(default)]
    pub tracing: Vec<Tracing>,
    /// Metrics settings.
    #[serde(default)]
    pub metrics: Vec<Metrics>,
    /// Access logging settings.
    #[serde(default)]
    pub access_logging: Vec<AccessLogging>,
}

/// Which side of the traffic a setting applies to (Istio `WorkloadMode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkloadMode {
    /// Both (the default).
    #[default]
    ClientAndServer,
    /// Outbound traffic only.
    Client,
    /// Inbound traffic only.
    Server,
}

/// `match: {mode}` of tracing and access logging.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadModeSelector {
    /// Mode (default CLIENT_AND_SERVER).
    #[serde(default)]
    pub mode: WorkloadMode,
}

/// Tracing settings (Istio `Tracing`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tracing {
    /// Which traffic this applies to.
    #[serde(default, rename = "match")]
    pub matches: Option<WorkloadModeSelector>,
    /// Providers (`{name}` of a MeshConfig extension provider; at most one).
    #[serde(default)]
    pub providers: Vec<ExtensionProvider>,
    /// Sampling percentage 0..=100.
    #[serde(default)]
    pub random_sampling_percentage: Option<f64>,
    /// Keep propagating and sampling, report no spans.
    #[serde(default)]
    pub disable_span_reporting: Option<bool>,
    /// Extra span attributes, by tag name.
    #[serde(default)]
    pub custom_tags: BTreeMap<String, CustomTag>,
    /// Use `x-request-id` for the sampling decision.
    #[serde(default)]
    pub use_request_id_for_trace_sampling: Option<bool>,
    /// Add Istio's default span attributes (Istio 1.22+).
    #[serde(default)]
    pub enable_istio_tags: Option<bool>,
}

/// A custom span attribute: exactly one of `literal`, `environment`, `header`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CustomTag {
    /// A fixed value.
    #[serde(default)]
    pub literal: Option<LiteralTag>,
    /// An environment variable of the proxy.
    #[serde(default)]
    pub environment: Option<EnvironmentTag>,
    /// A request header.
    #[serde(default)]
    pub header: Option<HeaderTag>,
}

/// `literal: {value}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LiteralTag {
    /// The value.
    pub value: String,
}

/// `environment: {name, defaultValue}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvironmentTag {
    /// Variable name.
    pub name: String,
    /// Value when unset.
    #[serde(default)]
    pub default_value: Option<String>,
}

/// `header: {name, defaultValue}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderTag {
    /// Request header name.
    pub name: String,
    /// Value when absent.
    #[serde(default)]
    pub default_value: Option<String>,
}

/// Access logging settings (Istio `AccessLogging`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogging {
    /// Which traffic this applies to.
    #[serde(default, rename = "match")]
    pub matches: Option<WorkloadModeSelector>,
    /// Providers.
    #[serde(default)]
    pub providers: Vec<ExtensionProvider>,
    /// Turn access logging off.
    #[serde(default)]
    pub disabled: Option<bool>,
    /// Log only requests for which the CEL expression holds.
    #[serde(default)]
    pub filter: Option<AccessLogFilter>,
}

/// `filter: {expression}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogFilter {
    /// CEL expression.
    pub expression: String,
}

/// Metrics settings (Istio `Metrics`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metrics {
    /// Providers.
    #[serde(default)]
    pub providers: Vec<ExtensionProvider>,
    /// Per-metric changes.
    #[serde(default)]
    pub overrides: Vec<MetricsOverride>,
    /// How often metrics are reported.
    #[serde(default)]
    pub reporting_interval: Option<Duration>,
}

/// One override (Istio `MetricsOverrides`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricsOverride {
    /// Which metrics.
    #[serde(default, rename = "match")]
    pub matches: Option<MetricSelector>,
    /// Turn the metrics off.
    #[serde(default)]
    pub disabled: Option<bool>,
    /// Label changes, by label name.
    #[serde(default)]
    pub tag_overrides: BTreeMap<String, TagOverride>,
}

/// `match: {metric | customMetric, mode}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricSelector {
    /// A standard Istio metric.
    #[serde(default)]
    pub metric: Option<IstioMetric>,
    /// A metric by name.
    #[serde(default)]
    pub custom_metric: Option<String>,
    /// Which side reports it.
    #[serde(default)]
    pub mode: WorkloadMode,
}

/// Istio's standard metrics (`MetricSelector.IstioMetric`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum IstioMetric {
    /// All of them.
    AllMetrics,
    /// `istio_requests_total`.
    RequestCount,
    /// `istio_request_duration_milliseconds`.
    RequestDuration,
    /// `istio_request_bytes`.
    RequestSize,
    /// `istio_response_bytes`.
    ResponseSize,
    /// `istio_tcp_connections_opened_total`.
    TcpOpenedConnections,
    /// `istio_tcp_connections_closed_total`.
    TcpClosedConnections,
    /// `istio_tcp_sent_bytes_total`.
    TcpSentBytes,
    /// `istio_tcp_received_bytes_total`.
    TcpReceivedBytes,
    /// `istio_request_messages_total`.
    GrpcRequestMessages,
    /// `istio_response_messages_total`.
    GrpcResponseMessages,
}

/// `tagOverrides.<name>: {operation, value}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TagOverride {
    /// UPSERT (default) or REMOVE.
    #[serde(default)]
    pub operation: Option<TagOperation>,
    /// CEL expression of the value (UPSERT only).
    #[serde(default)]
    pub value: Option<String>,
}

/// Tag override operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TagOperation {
    /// Insert or replace.
    Upsert,
    /// Remove.
    Remove,
}

impl Telemetry {
    /// Whether the resource has no selector nor target (namespace- or mesh-wide).
    pub fn is_namespace_wide(&self) -> bool {
        self.selector.is_none() && self.target_ref.is_none() && self.target_refs.is_empty()
    }
}

impl Tracing {
    /// The mode this entry applies to.
    pub fn mode(&self) -> WorkloadMode {
        self.matches.map(|m| m.mode).unwrap_or_default()
    }
}

impl WorkloadMode {
    /// Whether an entry with this mode applies to `client` (outbound) or server traffic.
    pub fn covers(self, client: bool) -> bool {
        match self {
            WorkloadMode::ClientAndServer => true,
            WorkloadMode::Client => client,
            WorkloadMode::Server => !client,
        }
    }
}
