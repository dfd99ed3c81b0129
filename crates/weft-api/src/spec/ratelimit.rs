//! Local rate limiting, in two forms that compile to the same Envoy configuration (the
//! `envoy.filters.http.local_ratelimit` filter):
//!
//! - Istio's `EnvoyFilter` (`networking.istio.io`), as Istio's "Enabling Rate Limits
//!   using Envoy" task writes it: an `HTTP_FILTER` patch inserting the filter into the
//!   connection manager, and optionally `HTTP_ROUTE` / `VIRTUAL_HOST` `MERGE` patches
//!   adding its per-route configuration (`typed_per_filter_config`). Every EnvoyFilter
//!   is accepted (it is valid Istio); the patches weft does not apply are reported by
//!   `analyze` (WFT0010) and `weft apply`. [`EnvoyFilter::rate_limit_patches`] reads the
//!   patches weft applies.
//! - weft's own [`RateLimit`] (`weft.dev/v1alpha1`).
//!
//! [`LocalRateLimitSpec`] is Envoy's `LocalRateLimit` message as YAML (snake_case field
//! names, as Istio's task writes them), with the fields weft implements.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::common::{Duration, LabelSelector, WorkloadSelector};

/// Istio `EnvoyFilter`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvoyFilter {
    /// Workloads the patches apply to (absent: every workload of the namespace; in the
    /// root namespace: of the mesh).
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
    /// Target references (not applied by weft).
    #[serde(default)]
    pub target_refs: Vec<Value>,
    /// The patches.
    #[serde(default)]
    pub config_patches: Vec<EnvoyConfigObjectPatch>,
    /// Order among EnvoyFilters.
    #[serde(default)]
    pub priority: i32,
}

/// One patch: what it applies to, where, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvoyConfigObjectPatch {
    /// The kind of Envoy object patched.
    pub apply_to: ApplyTo,
    /// Where.
    #[serde(default, rename = "match")]
    pub matches: Option<PatchMatch>,
    /// How.
    #[serde(default)]
    pub patch: Option<Patch>,
}

/// Istio `EnvoyFilter.ApplyTo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ApplyTo {
    /// Invalid.
    Invalid,
    /// A listener.
    Listener,
    /// A filter chain.
    FilterChain,
    /// A network filter.
    NetworkFilter,
    /// An HTTP filter of a connection manager.
    HttpFilter,
    /// A route configuration.
    RouteConfiguration,
    /// A virtual host.
    VirtualHost,
    /// A route.
    HttpRoute,
    /// A cluster.
    Cluster,
    /// An ECDS extension configuration.
    ExtensionConfig,
    /// The bootstrap.
    Bootstrap,
    /// A listener filter.
    ListenerFilter,
}

/// Istio `EnvoyFilter.PatchContext`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PatchContext {
    /// Everywhere.
    #[default]
    Any,
    /// Sidecars' outbound listeners and routes.
    SidecarOutbound,
    /// Sidecars' inbound listeners and routes.
    SidecarInbound,
    /// Gateways.
    Gateway,
}

/// Istio `EnvoyFilter.EnvoyConfigObjectMatch`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PatchMatch {
    /// Which proxies' configuration.
    #[serde(default)]
    pub context: PatchContext,
    /// Proxy version and metadata (not applied by weft).
    #[serde(default)]
    pub proxy: Option<Value>,
    /// Listener match.
    #[serde(default)]
    pub listener: Option<ListenerMatch>,
    /// Route configuration match.
    #[serde(default)]
    pub route_configuration: Option<RouteConfigurationMatch>,
    /// Cluster match.
    #[serde(default)]
    pub cluster: Option<Value>,
}

/// Istio `ListenerMatch`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerMatch {
    /// The service or workload port.
    #[serde(default)]
    pub port_number: Option<u32>,
    /// The filter chain.
    #[serde(default)]
    pub filter_chain: Option<FilterChainMatch>,
    /// A listener filter's name.
    #[serde(default)]
    pub listener_filter: Option<String>,
    /// The listener's name.
    #[serde(default)]
    pub name: Option<String>,
    /// Deprecated port name.
    #[serde(default)]
    pub port_name: Option<String>,
}

/// Istio `ListenerMatch.FilterChainMatch`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilterChainMatch {
    /// Chain name.
    #[serde(default)]
    pub name: Option<String>,
    /// SNI.
    #[serde(default)]
    pub sni: Option<String>,
    /// `tls` or `raw_buffer`.
    #[serde(default)]
    pub transport_protocol: Option<String>,
    /// ALPN.
    #[serde(default)]
    pub application_protocols: Option<String>,
    /// A network filter of the chain.
    #[serde(default)]
    pub filter: Option<FilterMatch>,
    /// Destination port.
    #[serde(default)]
    pub destination_port: Option<u32>,
}

/// Istio `ListenerMatch.FilterMatch`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilterMatch {
    /// Network filter name.
    #[serde(default)]
    pub name: Option<String>,
    /// An HTTP filter of a connection manager.
    #[serde(default)]
    pub sub_filter: Option<SubFilterMatch>,
}

/// Istio `ListenerMatch.SubFilterMatch`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubFilterMatch {
    /// HTTP filter name.
    #[serde(default)]
    pub name: Option<String>,
}

/// Istio `RouteConfigurationMatch`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteConfigurationMatch {
    /// Service port.
    #[serde(default)]
    pub port_number: Option<u32>,
    /// Port name (gateways).
    #[serde(default)]
    pub port_name: Option<String>,
    /// Gateway (`namespace/name`).
    #[serde(default)]
    pub gateway: Option<String>,
    /// Virtual host.
    #[serde(default)]
    pub vhost: Option<VirtualHostMatch>,
    /// Route configuration name.
    #[serde(default)]
    pub name: Option<String>,
}

/// Istio `RouteConfigurationMatch.VirtualHostMatch`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualHostMatch {
    /// Virtual host name (`inbound|http|9080`, `reviews.default.svc.cluster.local:9080`).
    #[serde(default)]
    pub name: Option<String>,
    /// A domain of the virtual host.
    #[serde(default)]
    pub domain_name: Option<String>,
    /// Route.
    #[serde(default)]
    pub route: Option<RouteMatch>,
}

/// Istio `RouteConfigurationMatch.RouteMatch`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    /// Route name.
    #[serde(default)]
    pub name: Option<String>,
    /// Route action kind.
    #[serde(default)]
    pub action: RouteActionKind,
}

/// Istio `RouteMatch.Action`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RouteActionKind {
    /// Any route.
    #[default]
    Any,
    /// Forwarding routes.
    Route,
    /// Redirects.
    Redirect,
    /// Direct responses.
    DirectResponse,
}

/// Istio `EnvoyFilter.Patch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Patch {
    /// Operation.
    #[serde(default)]
    pub operation: Operation,
    /// The Envoy object (or its part) to insert or merge.
    #[serde(default)]
    pub value: Option<Value>,
    /// Filter class (Wasm filters).
    #[serde(default)]
    pub filter_class: Option<String>,
}

/// Istio `Patch.Operation`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Operation {
    /// Invalid.
    #[default]
    Invalid,
    /// Merge into the matched object.
    Merge,
    /// Add.
    Add,
    /// Remove.
    Remove,
    /// Insert before the matched (sub)filter.
    InsertBefore,
    /// Insert after the matched (sub)filter.
    InsertAfter,
    /// Insert first.
    InsertFirst,
    /// Replace.
    Replace,
}

/// A patch weft applies.
#[derive(Debug, Clone, PartialEq)]
pub enum RateLimitPatch {
    /// `HTTP_FILTER` insert of the local rate limit filter named `name` into the
    /// connection managers the match selects.
    Filter {
        /// Where.
        context: PatchContext,
        /// Listener port, when matched.
        port: Option<u32>,
        /// Insert relative to this HTTP filter (`subFilter`), when given.
        sub_filter: Option<String>,
        /// How.
        operation: Operation,
        /// The filter's name.
        name: String,
        /// Its configuration.
        config: LocalRateLimitSpec,
    },
    /// `HTTP_ROUTE` / `VIRTUAL_HOST` `MERGE` of per-route configurations.
    PerRoute {
        /// Where.
        context: PatchContext,
        /// HTTP_ROUTE (each matching route) or VIRTUAL_HOST.
        apply_to: ApplyTo,
        /// Route configuration match.
        route_configuration: RouteConfigurationMatch,
        /// Filter name -> configuration.
        configs: BTreeMap<String, LocalRateLimitSpec>,
    },
}

/// Envoy's `LocalRateLimit` (`envoy.extensions.filters.http.local_ratelimit.v3`), as
/// YAML.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalRateLimitSpec {
    /// `stat_prefix` (required).
    pub stat_prefix: String,
    /// `status: {code}`.
    #[serde(default)]
    pub status: Option<HttpStatusSpec>,
    /// `token_bucket`.
    #[serde(default)]
    pub token_bucket: Option<TokenBucketSpec>,
    /// `filter_enabled` (unset: 0%).
    #[serde(default)]
    pub filter_enabled: Option<RuntimeFractionSpec>,
    /// `filter_enforced` (unset: 0%).
    #[serde(default)]
    pub filter_enforced: Option<RuntimeFractionSpec>,
    /// Request headers added when rate limited but not enforced.
    #[serde(default)]
    pub request_headers_to_add_when_not_enforced: Vec<HeaderValueOptionSpec>,
    /// Response headers added to rate-limited responses.
    #[serde(default)]
    pub response_headers_to_add: Vec<HeaderValueOptionSpec>,
    /// Descriptors with their own buckets.
    #[serde(default)]
    pub descriptors: Vec<DescriptorSpec>,
    /// Rate limit stage.
    #[serde(default)]
    pub stage: u32,
    /// One bucket per downstream connection.
    #[serde(default)]
    pub local_rate_limit_per_downstream_connection: bool,
    /// `OFF` or `DRAFT_VERSION_03`.
    #[serde(default)]
    pub enable_x_ratelimit_headers: Option<String>,
    /// `OVERRIDE`, `INCLUDE` or `IGNORE`.
    #[serde(default)]
    pub vh_rate_limits: Option<String>,
    /// Consume the default bucket even when a descriptor matched (default true).
    #[serde(default)]
    pub always_consume_default_token_bucket: Option<bool>,
    /// gRPC status RESOURCE_EXHAUSTED instead of UNAVAILABLE.
    #[serde(default)]
    pub rate_limited_as_resource_exhausted: bool,
}

/// `{code: 429}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpStatusSpec {
    /// Status code.
    pub code: u32,
}

/// Envoy's `TokenBucket`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketSpec {
    /// Bucket size (at least 1).
    pub max_tokens: u32,
    /// Tokens added per fill (default 1).
    #[serde(default)]
    pub tokens_per_fill: Option<u32>,
    /// Fill interval (at least 50ms).
    pub fill_interval: Duration,
}

/// Envoy's `RuntimeFractionalPercent` (the runtime key is not read: weft has no runtime).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeFractionSpec {
    /// The fraction.
    pub default_value: FractionSpec,
    /// Runtime key (ignored).
    #[serde(default)]
    pub runtime_key: Option<String>,
}

/// Envoy's `FractionalPercent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FractionSpec {
    /// Numerator.
    #[serde(default)]
    pub numerator: u32,
    /// `HUNDRED` (default), `TEN_THOUSAND` or `MILLION`.
    #[serde(default)]
    pub denominator: Option<String>,
}

/// Envoy's `HeaderValueOption`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderValueOptionSpec {
    /// The header.
    pub header: HeaderSpec,
    /// Deprecated `append` (false: overwrite).
    #[serde(default)]
    pub append: Option<bool>,
    /// `APPEND_IF_EXISTS_OR_ADD`, `ADD_IF_ABSENT`, `OVERWRITE_IF_EXISTS_OR_ADD`, `OVERWRITE_IF_EXISTS`.
    #[serde(default)]
    pub append_action: Option<String>,
}

/// `{key, value}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderSpec {
    /// Name.
    pub key: String,
    /// Value.
    #[serde(default)]
    pub value: String,
}

/// Envoy's `LocalRateLimitDescriptor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorSpec {
    /// Entries (`key`, `value`; an empty value matches any).
    pub entries: Vec<EntrySpec>,
    /// The descriptor's bucket.
    pub token_bucket: TokenBucketSpec,
    /// Count, never refuse.
    #[serde(default)]
    pub shadow_mode: bool,
}

/// A descriptor entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntrySpec {
    /// Key.
    pub key: String,
    /// Value.
    #[serde(default)]
    pub value: String,
}

/// `weft.dev/v1alpha1` `RateLimit`: a local (per proxy) rate limit on the inbound HTTP
/// traffic of the selected workloads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// Workloads (absent: every workload of the namespace; in the root namespace: of the mesh).
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    /// Which requests (absent: all); a request matching any entry is limited.
    #[serde(default, rename = "match")]
    pub matches: Vec<RateLimitMatch>,
    /// Requests per unit, refilled in full every unit (one bucket of `requestsPerUnit`).
    #[serde(default)]
    pub requests_per_unit: Option<u32>,
    /// `second`, `minute` or `hour` (with `requestsPerUnit`).
    #[serde(default)]
    pub unit: Option<RateUnit>,
    /// An explicit token bucket (instead of `requestsPerUnit`/`unit`).
    #[serde(default)]
    pub token_bucket: Option<RateLimitBucket>,
    /// Count requests over the limit but let them through.
    #[serde(default)]
    pub shadow: bool,
    /// One bucket per downstream connection instead of one per proxy.
    #[serde(default)]
    pub per_connection: bool,
    /// Status of refused requests (default 429).
    #[serde(default)]
    pub status: Option<u32>,
    /// Headers added to refused responses (default `x-local-rate-limit: "true"`).
    #[serde(default)]
    pub response_headers: Option<BTreeMap<String, String>>,
    /// Add `x-ratelimit-limit`, `-remaining`, `-reset` to every response.
    #[serde(default)]
    pub rate_limit_headers: bool,
}

/// A `RateLimit` request match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitMatch {
    /// Workload port.
    #[serde(default)]
    pub port: Option<u32>,
    /// Path prefix.
    #[serde(default)]
    pub path_prefix: Option<String>,
}

/// `second`, `minute`, `hour`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateUnit {
    /// Per second.
    Second,
    /// Per minute.
    Minute,
    /// Per hour.
    Hour,
}

/// `RateLimit.tokenBucket`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitBucket {
    /// Bucket size.
    pub max_tokens: u32,
    /// Tokens per fill (default `maxTokens`).
    #[serde(default)]
    pub tokens_per_fill: Option<u32>,
    /// Fill interval (at least 50ms).
    pub fill_interval: Duration,
}

/// The type URLs a filter's configuration may be given with.
pub const LOCAL_RATELIMIT_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
const TYPED_STRUCTS: &[&str] =
    &["type.googleapis.com/udpa.type.v1.TypedStruct", "type.googleapis.com/xds.type.v3.TypedStruct"];
/// Names of the HTTP connection manager in a filter match (current and deprecated).
pub const HCM_NAMES: &[&str] = &["envoy.filters.network.http_connection_manager", "envoy.http_connection_manager"];

/// Why a patch is not one weft applies (for analyze): the field path and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unapplied {
    /// `spec.configPatches[i]...`.
    pub path: String,
    /// Why.
    pub reason: String,
}

impl EnvoyFilter {
    /// Each patch read as a patch weft applies: `Ok(Some)`, `Ok(None)` (a shape weft
    /// does not apply: see [`EnvoyFilter::unapplied`]) or `Err((path, message))` for a
    /// local rate limit configuration that is wrong.
    pub fn rate_limit_patches(&self) -> Vec<Result<Option<RateLimitPatch>, (String, String)>> {
        self.config_patches
            .iter()
            .enumerate()
            .map(|(i, p)| read_patch(p, &format!("spec.configPatches[{i}]")))
            .collect()
    }

    /// What weft does not apply, with the field paths.
    pub fn unapplied(&self) -> Vec<Unapplied> {
        let mut out = Vec::new();
        if !self.target_refs.is_empty() {
            out.push(Unapplied {
                path: "spec.targetRefs".into(),
                reason: "an EnvoyFilter with targetRefs applies to no proxy in weft (use spec.workloadSelector)".into(),
            });
        }
        for (i, p) in self.config_patches.iter().enumerate() {
            let at = format!("spec.configPatches[{i}]");
            if let Err(reason) = supported_shape(p, &at) {
                out.push(Unapplied { path: reason.0, reason: reason.1 });
            }
        }
        out
    }
}

fn read_patch(p: &EnvoyConfigObjectPatch, at: &str) -> Result<Option<RateLimitPatch>, (String, String)> {
    if supported_shape(p, at).is_err() {
        return Ok(None);
    }
    let m = p.matches.clone().unwrap_or_default();
    let Some(patch) = &p.patch else { return Ok(None) };
    let Some(value) = &patch.value else { return Ok(None) };
    let vat = format!("{at}.patch.value");
    match p.apply_to {
        ApplyTo::HttpFilter => {
            let name = value.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
            let Some(tc) = value.get("typed_config").or_else(|| value.get("typedConfig")) else { return Ok(None) };
            let config = typed_config(tc, &format!("{vat}.typed_config"))?;
            let listener = m.listener.clone().unwrap_or_default();
            let sub_filter =
                listener.filter_chain.and_then(|c| c.filter).and_then(|f| f.sub_filter).and_then(|s| s.name);
            Ok(Some(RateLimitPatch::Filter {
                context: m.context,
                port: listener.port_number,
                sub_filter,
                operation: patch.operation,
                name,
                config,
            }))
        }
        _ => {
            let map = value.get("typed_per_filter_config").or_else(|| value.get("typedPerFilterConfig"));
            let Some(Value::Object(map)) = map else { return Ok(None) };
            let mut configs = BTreeMap::new();
            for (k, v) in map {
                configs.insert(k.clone(), typed_config(v, &format!("{vat}.typed_per_filter_config.{k}"))?);
            }
            Ok(Some(RateLimitPatch::PerRoute {
                context: m.context,
                apply_to: p.apply_to,
                route_configuration: m.route_configuration.unwrap_or_default(),
                configs,
            }))
        }
    }
}

/// Whether weft applies this patch; `Err((path, reason))` when not.
fn supported_shape(p: &EnvoyConfigObjectPatch, at: &str) -> Result<(), (String, String)> {
    let no = |path: String, why: &str| Err((path, why.to_string()));
    let m = p.matches.clone().unwrap_or_default();
    if m.proxy.is_some() {
        return no(format!("{at}.match.proxy"), "proxy version/metadata matches are not applied by weft");
    }
    let Some(patch) = &p.patch else { return no(format!("{at}.patch"), "a patch is required") };
    let value = patch.value.as_ref();
    match p.apply_to {
        ApplyTo::HttpFilter => {
            if !matches!(
                patch.operation,
                Operation::InsertBefore | Operation::InsertAfter | Operation::InsertFirst | Operation::Add
            ) {
                return no(
                    format!("{at}.patch.operation"),
                    "weft applies HTTP_FILTER patches that insert the local rate limit filter (INSERT_BEFORE, INSERT_AFTER, INSERT_FIRST, ADD) only",
                );
            }
            if m.route_configuration.is_some() || m.cluster.is_some() {
                return no(format!("{at}.match"), "an HTTP_FILTER patch matches a listener");
            }
            let listener = m.listener.clone().unwrap_or_default();
            let unsupported_listener = [
                (listener.name.is_some(), "name"),
                (listener.listener_filter.is_some(), "listenerFilter"),
                (listener.port_name.is_some(), "portName"),
            ];
            if let Some((_, f)) = unsupported_listener.iter().find(|(bad, _)| *bad) {
                return no(format!("{at}.match.listener.{f}"), "not applied by weft (match by context and portNumber)");
            }
            if let Some(fc) = &listener.filter_chain {
                let bad = [
                    (fc.name.is_some(), "name"),
                    (fc.sni.is_some(), "sni"),
                    (fc.transport_protocol.is_some(), "transportProtocol"),
                    (fc.application_protocols.is_some(), "applicationProtocols"),
                    (fc.destination_port.is_some(), "destinationPort"),
                ];
                if let Some((_, f)) = bad.iter().find(|(bad, _)| *bad) {
                    return no(format!("{at}.match.listener.filterChain.{f}"), "not applied by weft");
                }
                if let Some(name) = fc.filter.as_ref().and_then(|f| f.name.as_deref()) {
                    if !HCM_NAMES.contains(&name) {
                        return no(
                            format!("{at}.match.listener.filterChain.filter.name"),
                            "weft inserts HTTP filters into the HTTP connection manager only",
                        );
                    }
                }
            }
            let is_rl = value
                .and_then(|v| v.get("typed_config").or_else(|| v.get("typedConfig")))
                .is_some_and(is_local_ratelimit);
            if !is_rl {
                return no(
                    format!("{at}.patch.value"),
                    "weft applies HTTP_FILTER patches for envoy.filters.http.local_ratelimit only",
                );
            }
            Ok(())
        }
        ApplyTo::HttpRoute | ApplyTo::VirtualHost => {
            if patch.operation != Operation::Merge {
                return no(format!("{at}.patch.operation"), "weft applies MERGE of typed_per_filter_config only");
            }
            if m.listener.is_some() || m.cluster.is_some() {
                return no(format!("{at}.match"), "a route patch matches a routeConfiguration");
            }
            let rc = m.route_configuration.clone().unwrap_or_default();
            let bad = [(rc.gateway.is_some(), "gateway"), (rc.port_name.is_some(), "portName")];
            if let Some((_, f)) = bad.iter().find(|(bad, _)| *bad) {
                return no(format!("{at}.match.routeConfiguration.{f}"), "not applied by weft");
            }
            if rc.vhost.as_ref().is_some_and(|v| v.domain_name.is_some()) {
                return no(format!("{at}.match.routeConfiguration.vhost.domainName"), "not applied by weft");
            }
            let Some(Value::Object(obj)) = value else {
                return no(format!("{at}.patch.value"), "a mapping with typed_per_filter_config is expected");
            };
            for k in obj.keys() {
                if k != "typed_per_filter_config" && k != "typedPerFilterConfig" {
                    return no(
                        format!("{at}.patch.value.{k}"),
                        "weft merges typed_per_filter_config of the local rate limit filter only",
                    );
                }
            }
            let map = obj.get("typed_per_filter_config").or_else(|| obj.get("typedPerFilterConfig"));
            let Some(Value::Object(map)) = map else {
                return no(format!("{at}.patch.value.typed_per_filter_config"), "a mapping is expected");
            };
            for (k, v) in map {
                if !is_local_ratelimit(v) {
                    return no(
                        format!("{at}.patch.value.typed_per_filter_config.{k}"),
                        "weft merges per-route configurations of the local rate limit filter only",
                    );
                }
            }
            Ok(())
        }
        _ => no(
            format!("{at}.applyTo"),
            "weft applies HTTP_FILTER, HTTP_ROUTE and VIRTUAL_HOST patches of the local rate limit filter only",
        ),
    }
}

/// A `typed_config` (`@type` LocalRateLimit, or a TypedStruct wrapping one).
fn is_local_ratelimit(tc: &Value) -> bool {
    let ty = tc.get("@type").and_then(Value::as_str).unwrap_or_default();
    ty == LOCAL_RATELIMIT_TYPE
        || (TYPED_STRUCTS.contains(&ty) && tc.get("type_url").and_then(Value::as_str) == Some(LOCAL_RATELIMIT_TYPE))
}

/// Reads a local rate limit `typed_config` found at `at`.
fn typed_config(tc: &Value, at: &str) -> Result<LocalRateLimitSpec, (String, String)> {
    let ty = tc.get("@type").and_then(Value::as_str).unwrap_or_default();
    let (value, vat) = if TYPED_STRUCTS.contains(&ty) {
        (tc.get("value").cloned().unwrap_or(Value::Object(Default::default())), format!("{at}.value"))
    } else {
        let mut v = tc.clone();
        if let Value::Object(o) = &mut v {
            o.remove("@type");
        }
        (v, at.to_string())
    };
    let spec: LocalRateLimitSpec = serde_path_to_error::deserialize(&value).map_err(|e| {
        let inner = e.path().to_string();
        let path = if inner == "." { vat.clone() } else { format!("{vat}.{inner}") };
        (path, e.into_inner().to_string())
    })?;
    check_spec(&spec, &vat)?;
    Ok(spec)
}

/// What Envoy would refuse in a `LocalRateLimit`.
pub fn check_spec(s: &LocalRateLimitSpec, at: &str) -> Result<(), (String, String)> {
    if s.stat_prefix.is_empty() {
        return Err((format!("{at}.stat_prefix"), "stat_prefix is required".into()));
    }
    let buckets = s.token_bucket.iter().map(|b| (format!("{at}.token_bucket"), b));
    let descriptors =
        s.descriptors.iter().enumerate().map(|(i, d)| (format!("{at}.descriptors[{i}].token_bucket"), &d.token_bucket));
    for (bat, b) in buckets.chain(descriptors) {
        check_bucket(b.max_tokens, b.tokens_per_fill, b.fill_interval, &bat)?;
    }
    for (i, d) in s.descriptors.iter().enumerate() {
        if d.entries.is_empty() {
            return Err((format!("{at}.descriptors[{i}].entries"), "a descriptor needs at least one entry".into()));
        }
    }
    for (f, frac) in [("filter_enabled", &s.filter_enabled), ("filter_enforced", &s.filter_enforced)] {
        if let Some(d) = frac.as_ref().and_then(|f| f.default_value.denominator.as_deref()) {
            if !["HUNDRED", "TEN_THOUSAND", "MILLION"].contains(&d) {
                return Err((format!("{at}.{f}.default_value.denominator"), format!("unknown denominator {d:?}")));
            }
        }
    }
    let enums: [(&str, &Option<String>, &[&str]); 2] = [
        ("enable_x_ratelimit_headers", &s.enable_x_ratelimit_headers, &["OFF", "DRAFT_VERSION_03"]),
        ("vh_rate_limits", &s.vh_rate_limits, &["OVERRIDE", "INCLUDE", "IGNORE"]),
    ];
    for (f, v, allowed) in enums {
        if let Some(v) = v {
            if !allowed.contains(&v.as_str()) {
                return Err((
                    format!("{at}.{f}"),
                    format!("unknown value {v:?}; expected one of {}", allowed.join(", ")),
                ));
            }
        }
    }
    let headers = s.response_headers_to_add.iter().map(|h| ("response_headers_to_add", h));
    let headers = headers.chain(
        s.request_headers_to_add_when_not_enforced.iter().map(|h| ("request_headers_to_add_when_not_enforced", h)),
    );
    for (i, (f, h)) in headers.enumerate() {
        if h.header.key.is_empty() || h.header.key.starts_with(':') || h.header.value.contains('%') {
            return Err((
                format!("{at}.{f}"),
                format!(
                    "header {:?}: a plain header name and a literal value (no %COMMAND%) are required (entry {i})",
                    h.header.key
                ),
            ));
        }
        if let Some(a) = &h.append_action {
            if !["APPEND_IF_EXISTS_OR_ADD", "ADD_IF_ABSENT", "OVERWRITE_IF_EXISTS_OR_ADD", "OVERWRITE_IF_EXISTS"]
                .contains(&a.as_str())
            {
                return Err((format!("{at}.{f}"), format!("unknown append_action {a:?}")));
            }
        }
    }
    Ok(())
}

/// Envoy's token bucket rules: at least one token, at least one per fill, a fill
/// interval of at least 50ms.
pub fn check_bucket(max: u32, per_fill: Option<u32>, fill: Duration, at: &str) -> Result<(), (String, String)> {
    if max == 0 {
        return Err((format!("{at}.max_tokens"), "max_tokens must be at least 1".into()));
    }
    if per_fill == Some(0) {
        return Err((format!("{at}.tokens_per_fill"), "tokens_per_fill must be at least 1".into()));
    }
    if fill.0 < std::time::Duration::from_millis(50) {
        return Err((
            format!("{at}.fill_interval"),
            "the fill interval must be at least 50ms (as Envoy requires)".into(),
        ));
    }
    Ok(())
}
