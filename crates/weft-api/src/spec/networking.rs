//! `networking.istio.io` VirtualService and DestinationRule.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::common::{Duration, Percent, PortSelector, StringMatch, WorkloadSelector};

/// Istio `VirtualService`: routing rules for a set of hosts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualService {
    /// Destination hosts the rules apply to (short names resolve in the resource's namespace).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Gateways (`ns/name` or `name`; `mesh` means all sidecars). Empty means `mesh`.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// HTTP routes, first match wins.
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    /// TLS (SNI) routes.
    #[serde(default)]
    pub tls: Vec<TlsRoute>,
    /// Opaque TCP routes.
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    /// Namespaces the resource is visible to (`.` = own, `*` = all). Empty means all.
    #[serde(default)]
    pub export_to: Vec<String>,
}

/// One HTTP route: match conditions and an action.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    /// Route name (for logs and delegation).
    #[serde(default)]
    pub name: Option<String>,
    /// Match conditions, ORed; empty matches everything.
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
    /// Redirect instead of forwarding.
    #[serde(default)]
    pub redirect: Option<HttpRedirect>,
    /// Answer directly instead of forwarding.
    #[serde(default)]
    pub direct_response: Option<HttpDirectResponse>,
    /// Delegate to another VirtualService.
    #[serde(default)]
    pub delegate: Option<Delegate>,
    /// URI/authority rewrite before forwarding.
    #[serde(default)]
    pub rewrite: Option<HttpRewrite>,
    /// Request timeout (disabled by default).
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// Retry policy.
    #[serde(default)]
    pub retries: Option<HttpRetry>,
    /// Fault injection.
    #[serde(default)]
    pub fault: Option<HttpFaultInjection>,
    /// Mirror traffic to this destination.
    #[serde(default)]
    pub mirror: Option<Destination>,
    /// Several mirrors.
    #[serde(default)]
    pub mirrors: Vec<HttpMirrorPolicy>,
    /// Fraction mirrored (default 100).
    #[serde(default)]
    pub mirror_percentage: Option<Percent>,
    /// Deprecated integer form of `mirrorPercentage`.
    #[serde(default)]
    pub mirror_percent: Option<u32>,
    /// CORS policy.
    #[serde(default)]
    pub cors_policy: Option<CorsPolicy>,
    /// Header manipulation.
    #[serde(default)]
    pub headers: Option<Headers>,
}

/// HTTP match conditions (all must hold).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatchRequest {
    /// Name of the match.
    #[serde(default)]
    pub name: Option<String>,
    /// URI path match.
    #[serde(default)]
    pub uri: Option<StringMatch>,
    /// Scheme match.
    #[serde(default)]
    pub scheme: Option<StringMatch>,
    /// Method match.
    #[serde(default)]
    pub method: Option<StringMatch>,
    /// Authority (Host) match.
    #[serde(default)]
    pub authority: Option<StringMatch>,
    /// Header matches (keys lowercase).
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    /// Destination port.
    #[serde(default)]
    pub port: Option<u32>,
    /// Source workload labels.
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    /// Gateways the match applies to.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Query parameter matches.
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    /// Case-insensitive URI match.
    #[serde(default)]
    pub ignore_uri_case: bool,
    /// Headers that must be absent / not match.
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    /// Source namespace.
    #[serde(default)]
    pub source_namespace: Option<String>,
    /// Stat prefix for this match.
    #[serde(default)]
    pub stat_prefix: Option<String>,
}

/// Where traffic goes: a host (service), optional subset and port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    /// Service host (short names resolve in the VirtualService's namespace).
    pub host: String,
    /// Subset defined in a DestinationRule.
    #[serde(default)]
    pub subset: Option<String>,
    /// Port on the host (required if the service has several ports).
    #[serde(default)]
    pub port: Option<PortSelector>,
}

/// A weighted HTTP destination.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteDestination {
    /// Destination.
    pub destination: Destination,
    /// Share of traffic, 0..=100; may be omitted for a single destination.
    #[serde(default)]
    pub weight: Option<i64>,
    /// Header edits for this destination.
    #[serde(default)]
    pub headers: Option<Headers>,
}

/// A weighted L4 destination (TCP and TLS routes).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteDestination {
    /// Destination.
    pub destination: Destination,
    /// Share of traffic, 0..=100.
    #[serde(default)]
    pub weight: Option<i64>,
}

/// Header edits for requests and responses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Headers {
    /// Request edits.
    #[serde(default)]
    pub request: Option<HeaderOperations>,
    /// Response edits.
    #[serde(default)]
    pub response: Option<HeaderOperations>,
}

/// Set, add and remove header operations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOperations {
    /// Overwrite.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Append.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// HTTP redirect.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRedirect {
    /// Replacement path.
    #[serde(default)]
    pub uri: Option<String>,
    /// Replacement authority.
    #[serde(default)]
    pub authority: Option<String>,
    /// Replacement port.
    #[serde(default)]
    pub port: Option<u32>,
    /// `FROM_PROTOCOL_DEFAULT` or `FROM_REQUEST_PORT`.
    #[serde(default)]
    pub derive_port: Option<String>,
    /// Replacement scheme.
    #[serde(default)]
    pub scheme: Option<String>,
    /// Status code (default 301).
    #[serde(default)]
    pub redirect_code: Option<u32>,
}

/// Direct response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpDirectResponse {
    /// Status code.
    pub status: u32,
    /// Body.
    #[serde(default)]
    pub body: Option<HttpBody>,
}

/// Direct response body: `string` or base64 `bytes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum HttpBody {
    /// Text body.
    String(String),
    /// Base64 body.
    Bytes(String),
}

/// Delegation to another VirtualService.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Delegate {
    /// Name of the delegate.
    pub name: String,
    /// Namespace of the delegate.
    #[serde(default)]
    pub namespace: Option<String>,
}

/// URI/authority rewrite.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRewrite {
    /// Replacement for the matched prefix/path.
    #[serde(default)]
    pub uri: Option<String>,
    /// Replacement authority.
    #[serde(default)]
    pub authority: Option<String>,
    /// Regex rewrite of the path.
    #[serde(default)]
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

/// Regex path rewrite.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegexRewrite {
    /// RE2 pattern.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Substitution.
    pub rewrite: String,
}

/// Retry policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRetry {
    /// Number of retries (>= 0).
    #[serde(default)]
    pub attempts: i64,
    /// Timeout per attempt.
    #[serde(default)]
    pub per_try_timeout: Option<Duration>,
    /// Envoy retry conditions, comma-separated.
    #[serde(default)]
    pub retry_on: Option<String>,
    /// Retry in other localities.
    #[serde(default)]
    pub retry_remote_localities: Option<bool>,
    /// Avoid previously tried hosts.
    #[serde(default)]
    pub retry_ignore_previous_hosts: Option<bool>,
    /// Base backoff interval.
    #[serde(default)]
    pub backoff: Option<Duration>,
}

/// Fault injection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpFaultInjection {
    /// Delay before forwarding.
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    /// Abort with a status.
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

/// Fault delay.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    /// Fixed delay.
    #[serde(default)]
    pub fixed_delay: Option<Duration>,
    /// Exponential delay (not implemented by Istio either).
    #[serde(default)]
    pub exponential_delay: Option<Duration>,
    /// Fraction of requests delayed.
    #[serde(default)]
    pub percentage: Option<Percent>,
    /// Deprecated integer percentage.
    #[serde(default)]
    pub percent: Option<i64>,
}

/// Fault abort.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    /// HTTP status to return.
    #[serde(default)]
    pub http_status: Option<u32>,
    /// gRPC status to return.
    #[serde(default)]
    pub grpc_status: Option<String>,
    /// HTTP/2 error.
    #[serde(default)]
    pub http2_error: Option<String>,
    /// Fraction of requests aborted.
    #[serde(default)]
    pub percentage: Option<Percent>,
}

/// One of several mirrors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMirrorPolicy {
    /// Mirror destination.
    pub destination: Destination,
    /// Fraction mirrored.
    #[serde(default)]
    pub percentage: Option<Percent>,
}

/// CORS policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CorsPolicy {
    /// Allowed origins.
    #[serde(default)]
    pub allow_origins: Vec<StringMatch>,
    /// Deprecated exact origins.
    #[serde(default)]
    pub allow_origin: Vec<String>,
    /// Allowed methods.
    #[serde(default)]
    pub allow_methods: Vec<String>,
    /// Allowed headers.
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Exposed headers.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Preflight cache time.
    #[serde(default)]
    pub max_age: Option<Duration>,
    /// Allow credentials.
    #[serde(default)]
    pub allow_credentials: Option<bool>,
    /// `FORWARD` or `IGNORE` unmatched preflights.
    #[serde(default)]
    pub unmatched_preflights: Option<String>,
}

/// TLS route (by SNI).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsRoute {
    /// Match conditions (required).
    #[serde(rename = "match")]
    pub matches: Vec<TlsMatchAttributes>,
    /// Destinations.
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

/// TLS match attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsMatchAttributes {
    /// SNI values.
    pub sni_hosts: Vec<String>,
    /// Destination subnets.
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    /// Port.
    #[serde(default)]
    pub port: Option<u32>,
    /// Source labels.
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    /// Gateways.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Source namespace.
    #[serde(default)]
    pub source_namespace: Option<String>,
}

/// TCP route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRoute {
    /// Match conditions.
    #[serde(default, rename = "match")]
    pub matches: Vec<L4MatchAttributes>,
    /// Destinations.
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

/// L4 match attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4MatchAttributes {
    /// Destination subnets.
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    /// Port.
    #[serde(default)]
    pub port: Option<u32>,
    /// Source labels.
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    /// Gateways.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Source namespace.
    #[serde(default)]
    pub source_namespace: Option<String>,
}

/// Istio `DestinationRule`: policies applied after routing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRule {
    /// Host the rule applies to.
    pub host: String,
    /// Policy for all subsets.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    /// Named subsets (by labels).
    #[serde(default)]
    pub subsets: Vec<Subset>,
    /// Visibility.
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Workloads the rule applies to (sidecar-side).
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
}

/// A named subset of a service's endpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    /// Subset name (a DNS label).
    pub name: String,
    /// Endpoint labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Subset-level policy overriding the rule's.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// Traffic policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    /// Load balancing.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Connection pool limits.
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Outlier detection.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// Client TLS.
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
    /// Per-port overrides.
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

/// Per-port traffic policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortTrafficPolicy {
    /// Port.
    #[serde(default)]
    pub port: Option<PortSelector>,
    /// Load balancing.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Connection pool limits.
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Outlier detection.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// Client TLS.
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
}

/// Simple load-balancing algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    /// Proxy default.
    Unspecified,
    /// Deprecated: least request.
    LeastConn,
    /// Random.
    Random,
    /// Original destination.
    Passthrough,
    /// Round robin.
    RoundRobin,
    /// Least request (P2C).
    LeastRequest,
}

/// Load balancer settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSettings {
    /// Simple algorithm.
    #[serde(default)]
    pub simple: Option<SimpleLb>,
    /// Consistent hashing.
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHashLb>,
    /// Locality-aware load balancing.
    #[serde(default)]
    pub locality_lb_setting: Option<LocalityLbSetting>,
    /// Warm-up duration.
    #[serde(default)]
    pub warmup_duration_secs: Option<Duration>,
}

/// Istio's `LocalityLoadBalancerSetting`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityLbSetting {
    /// Weighted distribution: the first rule whose `from` matches the client applies.
    #[serde(default)]
    pub distribute: Vec<LocalityDistribute>,
    /// Region failover rules.
    #[serde(default)]
    pub failover: Vec<LocalityFailover>,
    /// Label keys in order of preference (`failoverPriority`).
    #[serde(default)]
    pub failover_priority: Vec<String>,
    /// Unset counts as enabled.
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// One `distribute` rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalityDistribute {
    /// The client locality pattern (`region/zone/subzone`, `*` wildcards).
    #[serde(default)]
    pub from: String,
    /// Locality pattern -> weight.
    #[serde(default)]
    pub to: BTreeMap<String, u32>,
}

/// One `failover` rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalityFailover {
    /// The client's region.
    #[serde(default)]
    pub from: String,
    /// The region to fail over to.
    #[serde(default)]
    pub to: String,
}

/// Consistent hash key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHashLb {
    /// Hash on a header.
    #[serde(default)]
    pub http_header_name: Option<String>,
    /// Hash on a cookie.
    #[serde(default)]
    pub http_cookie: Option<HttpCookie>,
    /// Hash on the source IP.
    #[serde(default)]
    pub use_source_ip: Option<bool>,
    /// Hash on a query parameter.
    #[serde(default)]
    pub http_query_parameter_name: Option<String>,
    /// Ring hash settings (raw).
    #[serde(default)]
    pub ring_hash: Option<serde_json::Value>,
    /// Maglev settings (raw).
    #[serde(default)]
    pub maglev: Option<serde_json::Value>,
    /// Deprecated ring size.
    #[serde(default)]
    pub minimum_ring_size: Option<u64>,
}

/// Hash cookie.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCookie {
    /// Cookie name.
    pub name: String,
    /// Cookie path.
    #[serde(default)]
    pub path: Option<String>,
    /// Cookie lifetime.
    #[serde(default)]
    pub ttl: Option<Duration>,
}

/// Connection pool settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPoolSettings {
    /// TCP limits.
    #[serde(default)]
    pub tcp: Option<TcpSettings>,
    /// HTTP limits.
    #[serde(default)]
    pub http: Option<HttpSettings>,
}

/// TCP pool limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpSettings {
    /// Max connections per host.
    #[serde(default)]
    pub max_connections: Option<i64>,
    /// Connect timeout.
    #[serde(default)]
    pub connect_timeout: Option<Duration>,
    /// TCP keepalive on upstream connections.
    #[serde(default)]
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// Max connection lifetime.
    #[serde(default)]
    pub max_connection_duration: Option<Duration>,
    /// Idle timeout.
    #[serde(default)]
    pub idle_timeout: Option<Duration>,
}

/// Istio's `ConnectionPoolSettings.TCPSettings.TcpKeepalive`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpKeepalive {
    /// Unanswered probes before the connection is dead (system default when unset).
    #[serde(default)]
    pub probes: Option<u32>,
    /// Idle time before the first probe (system default when unset).
    #[serde(default)]
    pub time: Option<Duration>,
    /// Time between probes (system default when unset).
    #[serde(default)]
    pub interval: Option<Duration>,
}

/// HTTP pool limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSettings {
    /// Max pending HTTP/1 requests.
    #[serde(default)]
    pub http1_max_pending_requests: Option<i64>,
    /// Max concurrent requests.
    #[serde(default)]
    pub http2_max_requests: Option<i64>,
    /// Max requests per connection (1 disables keep-alive).
    #[serde(default)]
    pub max_requests_per_connection: Option<i64>,
    /// Max concurrent retries.
    #[serde(default)]
    pub max_retries: Option<i64>,
    /// Idle timeout.
    #[serde(default)]
    pub idle_timeout: Option<Duration>,
    /// Whether HTTP/1.1 requests travel upstream over HTTP/2.
    #[serde(default)]
    pub h2_upgrade_policy: Option<H2UpgradePolicy>,
    /// Use the client's protocol upstream.
    #[serde(default)]
    pub use_client_protocol: Option<bool>,
    /// Max concurrent streams per HTTP/2 connection.
    #[serde(default)]
    pub max_concurrent_streams: Option<i64>,
}

/// Outlier detection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Split local-origin errors.
    #[serde(default)]
    pub split_external_local_origin_errors: Option<bool>,
    /// Consecutive local-origin failures.
    #[serde(default)]
    pub consecutive_local_origin_failures: Option<u32>,
    /// Consecutive 502/503/504.
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    /// Consecutive 5xx.
    #[serde(default, rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    /// Deprecated alias of consecutive errors.
    #[serde(default)]
    pub consecutive_errors: Option<i64>,
    /// Sweep interval.
    #[serde(default)]
    pub interval: Option<Duration>,
    /// Base ejection time.
    #[serde(default)]
    pub base_ejection_time: Option<Duration>,
    /// Max ejected percent.
    #[serde(default)]
    pub max_ejection_percent: Option<i64>,
    /// Min healthy percent for ejection.
    #[serde(default)]
    pub min_health_percent: Option<i64>,
}

/// Istio's `H2UpgradePolicy`: whether an HTTP/1.1 port's connections to the destination
/// are upgraded to HTTP/2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum H2UpgradePolicy {
    /// The mesh-wide default (Istio's default: do not upgrade).
    Default,
    /// Keep HTTP/1.1 upstream.
    DoNotUpgrade,
    /// Speak HTTP/2 upstream.
    Upgrade,
}

/// Client TLS modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClientTlsMode {
    /// Plaintext.
    Disable,
    /// TLS to the upstream.
    Simple,
    /// mTLS with given certificates.
    Mutual,
    /// mTLS with Istio certificates.
    IstioMutual,
}

/// Client TLS settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientTlsSettings {
    /// Mode.
    pub mode: ClientTlsMode,
    /// Client cert path.
    #[serde(default)]
    pub client_certificate: Option<String>,
    /// Client key path.
    #[serde(default)]
    pub private_key: Option<String>,
    /// CA path.
    #[serde(default)]
    pub ca_certificates: Option<String>,
    /// Secret name.
    #[serde(default)]
    pub credential_name: Option<String>,
    /// Accepted SANs.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// SNI.
    #[serde(default)]
    pub sni: Option<String>,
    /// Skip verification.
    #[serde(default)]
    pub insecure_skip_verify: Option<bool>,
    /// CRL path.
    #[serde(default)]
    pub ca_crl: Option<String>,
}

/// The DestinationRule annotation that gives every cluster of the rule an Envoy
/// `retry_budget` (weft's extension: Istio has no field for it). Value:
/// `"<budget percent>%"` or `"<budget percent>%,<min retry concurrency>"`, e.g. `"20%,3"`.
pub const RETRY_BUDGET_ANNOTATION: &str = "weft.dev/retry-budget";

/// Envoy's `retry_budget`: concurrent retries may be `budget_percent` of the cluster's
/// active requests, and never fewer than `min_retry_concurrency`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    /// Percent of active requests that may be retries, 0 to 100 (Envoy's default 20).
    pub budget_percent: f64,
    /// Retries always allowed (Envoy's default 3).
    pub min_retry_concurrency: u32,
}

impl RetryBudget {
    /// Parses the [`RETRY_BUDGET_ANNOTATION`] value; the error says what was expected.
    pub fn parse(value: &str) -> Result<RetryBudget, String> {
        let expected = "expected \"<percent>%\" or \"<percent>%,<min retry concurrency>\", e.g. \"20%,3\"";
        let (pct, min) = match value.split_once(',') {
            Some((p, m)) => (p.trim(), Some(m.trim())),
            None => (value.trim(), None),
        };
        let number =
            pct.strip_suffix('%').ok_or_else(|| format!("{value:?}: the percentage needs a '%'; {expected}"))?;
        let budget_percent: f64 = number
            .trim()
            .parse()
            .ok()
            .filter(|p: &f64| p.is_finite() && (0.0..=100.0).contains(p))
            .ok_or_else(|| format!("{value:?}: {number:?} is not a percentage from 0 to 100; {expected}"))?;
        let min_retry_concurrency = match min {
            None => 3,
            Some(m) => {
                m.parse().map_err(|_| format!("{value:?}: {m:?} is not a whole number of retries; {expected}"))?
            }
        };
        Ok(RetryBudget { budget_percent, min_retry_concurrency })
    }
}
