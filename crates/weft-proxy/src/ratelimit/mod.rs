//! Local rate limiting: Envoy's HTTP `envoy.filters.http.local_ratelimit`
//! (`envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit`), in the HTTP
//! connection manager's filters and per route / virtual host / route configuration in
//! `typed_per_filter_config` (the most specific level wins, as in Envoy).
//!
//! Stage entry: [`check`], after authentication and authorization and route selection,
//! before CORS, faults and the router. Per request: `filter_enabled` decides whether
//! the filter looks at it at all (`enabled` counter); the request's descriptors (from
//! the route's or the filter's `rate_limits` actions) pick descriptor buckets, then the
//! default bucket; a request that finds no token is `rate_limited`, and is refused with
//! `status` (429), body `local_rate_limited` and `response_headers_to_add` only when
//! `filter_enforced` says so (`enforced`); otherwise it passes with
//! `request_headers_to_add_when_not_enforced` (shadow mode). Buckets are per proxy
//! process (Envoy: per process, shared by its workers), or per downstream connection with
//! `local_rate_limit_per_downstream_connection`; a bucket keeps its tokens across
//! configuration updates that keep its place and settings ([`bucket::BucketRegistry`]).

pub mod bucket;
mod compile;
#[cfg(test)]
mod tests;

use std::sync::{Arc, OnceLock};

use http::{HeaderMap, HeaderValue, StatusCode};
use prometheus_client::metrics::counter::Counter;

use crate::route::matcher::Fraction;
use crate::route::HeaderEdits;
use crate::telemetry::ratelimit::{RateLimitCount, RateLimitMetrics};
use bucket::{BucketKey, BucketParams, BucketRegistry, TokenBucket};

pub use compile::{compile_filter, compile_per_route, compile_rate_limits};

/// The type URL of the filter's configuration.
pub const LOCAL_RATELIMIT_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
/// The filter's well-known name (the usual key of its per-route configurations).
pub const FILTER_NAME: &str = "envoy.filters.http.local_ratelimit";
/// The body of a rate-limited response (Envoy's).
pub const RATE_LIMITED_BODY: &str = "local_rate_limited";

/// The filter as it sits in an HTTP connection manager.
#[derive(Debug)]
pub struct RateLimitFilter {
    /// The filter's name: the key of its per-route configurations.
    pub name: String,
    /// The filter-level configuration (applies where no per-route one does).
    pub config: Arc<LocalRateLimitConfig>,
}

/// One compiled `LocalRateLimit`.
#[derive(Debug)]
pub struct LocalRateLimitConfig {
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// Where in the configuration it sits (part of its buckets' keys).
    scope: Arc<str>,
    status: StatusCode,
    bucket: Option<BucketParams>,
    enabled: Fraction,
    enforced: Fraction,
    response_headers: HeaderEdits,
    request_headers_when_not_enforced: HeaderEdits,
    descriptors: Vec<Descriptor>,
    per_connection: bool,
    x_ratelimit_headers: bool,
    always_consume_default: bool,
    resource_exhausted: bool,
    stage: u32,
    vh_rate_limits: VhRateLimits,
    /// The filter's own `rate_limits` (replace the route's when set).
    rate_limits: Vec<RateLimitRule>,
    buckets: OnceLock<Buckets>,
    counters: OnceLock<Counters>,
}

/// `vh_rate_limits`: whether the virtual host's `rate_limits` count for a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VhRateLimits {
    /// The virtual host's apply only when the route has none (Envoy's default).
    Override,
    /// Both apply.
    Include,
    /// Only the route's.
    Ignore,
}

#[derive(Debug)]
struct Descriptor {
    entries: Vec<(String, String)>,
    params: BucketParams,
    shadow: bool,
}

/// Route `rate_limits` entry: actions that build one descriptor.
#[derive(Debug, Clone)]
pub struct RateLimitRule {
    stage: u32,
    actions: Vec<Action>,
}

/// The rate limit actions weft implements.
#[derive(Debug, Clone)]
enum Action {
    GenericKey { key: String, value: String },
    RequestHeaders { header: http::HeaderName, key: String, skip_if_absent: bool },
    RemoteAddress,
}

/// The rate limit actions that apply to a route: its own and its virtual host's.
#[derive(Debug, Clone, Default)]
pub struct RouteRateLimits {
    /// The route action's `rate_limits`.
    pub route: Vec<RateLimitRule>,
    /// The virtual host's `rate_limits`.
    pub vhost: Vec<RateLimitRule>,
}

#[derive(Debug)]
struct Buckets {
    default: Option<Arc<TokenBucket>>,
    descriptors: Vec<Arc<TokenBucket>>,
}

#[derive(Debug)]
struct Counters {
    enabled: Counter,
    enforced: Counter,
    rate_limited: Counter,
    ok: Counter,
}

/// What the filter decided for one request.
#[derive(Debug)]
pub enum Verdict {
    /// Not enabled for this request, or a token was found.
    Pass(Option<XRateLimit>),
    /// No token, not enforced (shadow): forward with these request headers.
    Shadow(Option<XRateLimit>),
    /// No token, enforced: answer with this.
    Deny(Denial),
}

/// The local reply of a rate-limited request.
#[derive(Debug)]
pub struct Denial {
    /// `status`.
    pub status: StatusCode,
    /// gRPC status for gRPC requests (UNAVAILABLE, or RESOURCE_EXHAUSTED with
    /// `rate_limited_as_resource_exhausted`).
    pub grpc_status: u32,
    config: Arc<LocalRateLimitConfig>,
    x: Option<XRateLimit>,
}

/// The draft-03 `x-ratelimit-*` headers for a response.
#[derive(Debug, Clone)]
pub struct XRateLimit {
    limit: u64,
    remaining: u64,
    reset_secs: u64,
}

/// What [`check`] needs to know about the request.
pub struct CheckInput<'a> {
    /// The request.
    pub parts: &'a http::request::Parts,
    /// The downstream peer address (`remote_address` action).
    pub peer: std::net::IpAddr,
    /// The route's rate limit actions.
    pub route: &'a RouteRateLimits,
    /// The route's per-filter configurations by filter name (`None`: disabled there).
    pub per_route: &'a [(String, Option<Arc<LocalRateLimitConfig>>)],
    /// Random values for `filter_enabled` / `filter_enforced`.
    pub random: (u64, u64),
}

impl LocalRateLimitConfig {
    /// Resolves the buckets (once per compiled configuration).
    fn buckets(&self, registry: &BucketRegistry) -> &Buckets {
        self.buckets.get_or_init(|| self.make_buckets(|k| registry.get(k)))
    }

    fn make_buckets(&self, mut get: impl FnMut(&BucketKey) -> Arc<TokenBucket>) -> Buckets {
        let key =
            |descriptor: Vec<(String, String)>, params| BucketKey { scope: self.scope.clone(), descriptor, params };
        Buckets {
            default: self.bucket.map(|p| get(&key(Vec::new(), p))),
            descriptors: self.descriptors.iter().map(|d| get(&key(d.entries.clone(), d.params))).collect(),
        }
    }

    fn counters(&self, metrics: &RateLimitMetrics) -> &Counters {
        self.counters.get_or_init(|| Counters {
            enabled: metrics.counter(RateLimitCount::Enabled, &self.stat_prefix),
            enforced: metrics.counter(RateLimitCount::Enforced, &self.stat_prefix),
            rate_limited: metrics.counter(RateLimitCount::RateLimited, &self.stat_prefix),
            ok: metrics.counter(RateLimitCount::Ok, &self.stat_prefix),
        })
    }

    /// Envoy's `requestAllowed`: every matching descriptor's bucket (all must have a
    /// token; shadow descriptors never refuse), then the default bucket unless a
    /// descriptor matched and `always_consume_default_token_bucket` is false. Returns
    /// whether allowed and the bucket the `x-ratelimit-*` headers describe.
    fn allowed(&self, buckets: &Buckets, request: &[Vec<(String, String)>]) -> (bool, Option<Arc<TokenBucket>>) {
        let mut matched: Vec<(usize, &Descriptor)> = self
            .descriptors
            .iter()
            .enumerate()
            .filter(|(_, d)| request.iter().any(|r| descriptor_matches(&d.entries, r)))
            .collect();
        // The strictest limit first, as Envoy orders them.
        matched.sort_by(|(_, a), (_, b)| {
            let rate = |d: &Descriptor| d.params.per_fill as f64 / d.params.interval.as_secs_f64();
            rate(a).total_cmp(&rate(b))
        });
        for (i, d) in &matched {
            let b = &buckets.descriptors[*i];
            if !b.try_take() && !d.shadow {
                return (false, Some(b.clone()));
            }
        }
        let first = matched.first().map(|(i, _)| buckets.descriptors[*i].clone());
        if !matched.is_empty() && !self.always_consume_default {
            return (true, first);
        }
        match &buckets.default {
            Some(b) => (b.try_take(), first.or_else(|| Some(b.clone()))),
            None => (true, first),
        }
    }
}

impl Denial {
    /// Adds `response_headers_to_add` (and the `x-ratelimit-*` headers) to the local reply.
    pub fn decorate(&self, headers: &mut HeaderMap) {
        self.config.response_headers.apply(headers);
        if let Some(x) = &self.x {
            x.apply(headers);
        }
    }
}

impl XRateLimit {
    fn of(b: &TokenBucket) -> XRateLimit {
        XRateLimit {
            limit: b.params().max,
            remaining: b.remaining(),
            reset_secs: b.until_fill().as_secs_f64().ceil() as u64,
        }
    }

    /// Writes `x-ratelimit-limit`, `x-ratelimit-remaining` and `x-ratelimit-reset`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert("x-ratelimit-limit", HeaderValue::from(self.limit));
        headers.insert("x-ratelimit-remaining", HeaderValue::from(self.remaining));
        headers.insert("x-ratelimit-reset", HeaderValue::from(self.reset_secs));
    }
}

/// What the filters let through: the `x-ratelimit-*` headers for the response, and the
/// configurations whose `request_headers_to_add_when_not_enforced` apply (shadow mode).
#[derive(Debug, Default)]
pub struct Passed {
    /// Headers for the response.
    pub x: Option<XRateLimit>,
    shadow: Vec<Arc<LocalRateLimitConfig>>,
}

impl Passed {
    /// Adds the shadow-mode request headers.
    pub fn edit_request(&self, headers: &mut HeaderMap) {
        for c in &self.shadow {
            c.request_headers_when_not_enforced.apply(headers);
        }
    }
}

/// Runs the connection manager's local rate limit filters for one request, in chain
/// order; the first that refuses it answers.
pub fn check(
    filters: &[Arc<RateLimitFilter>],
    input: &CheckInput<'_>,
    conn: &crate::conn::ConnInfo,
    registry: &BucketRegistry,
    metrics: &RateLimitMetrics,
) -> Result<Passed, Denial> {
    let mut out = Passed::default();
    for f in filters {
        let config = match input.per_route.iter().find(|(n, _)| *n == f.name) {
            Some((_, None)) => continue,
            Some((_, Some(c))) => c,
            None => &f.config,
        };
        match verdict(config, input, conn, registry, metrics) {
            Verdict::Pass(x) => out.x = x.or(out.x),
            Verdict::Shadow(x) => {
                out.shadow.push(config.clone());
                out.x = x.or(out.x);
            }
            Verdict::Deny(d) => return Err(d),
        }
    }
    Ok(out)
}

fn verdict(
    config: &Arc<LocalRateLimitConfig>,
    input: &CheckInput<'_>,
    conn: &crate::conn::ConnInfo,
    registry: &BucketRegistry,
    metrics: &RateLimitMetrics,
) -> Verdict {
    if !config.enabled.hit(input.random.0) {
        return Verdict::Pass(None);
    }
    let counters = config.counters(metrics);
    counters.enabled.inc();
    let descriptors = descriptors(config, input);
    let (allowed, bucket) = if config.per_connection {
        let buckets = config.make_buckets(|k| conn.rate_limit_bucket(k));
        config.allowed(&buckets, &descriptors)
    } else {
        config.allowed(config.buckets(registry), &descriptors)
    };
    let x = bucket.filter(|_| config.x_ratelimit_headers).map(|b| XRateLimit::of(&b));
    if allowed {
        counters.ok.inc();
        return Verdict::Pass(x);
    }
    counters.rate_limited.inc();
    if !config.enforced.hit(input.random.1) {
        return Verdict::Shadow(x);
    }
    counters.enforced.inc();
    Verdict::Deny(Denial {
        status: config.status,
        grpc_status: if config.resource_exhausted { 8 } else { 14 },
        config: config.clone(),
        x,
    })
}

/// The request's descriptors: one per rate limit rule of the filter's stage whose
/// actions all produce an entry.
fn descriptors(config: &LocalRateLimitConfig, input: &CheckInput<'_>) -> Vec<Vec<(String, String)>> {
    let rules: Vec<&RateLimitRule> = if !config.rate_limits.is_empty() {
        config.rate_limits.iter().collect()
    } else {
        let vhost = match config.vh_rate_limits {
            VhRateLimits::Override if input.route.route.is_empty() => input.route.vhost.as_slice(),
            VhRateLimits::Include => input.route.vhost.as_slice(),
            _ => &[],
        };
        input.route.route.iter().chain(vhost).collect()
    };
    rules
        .into_iter()
        .filter(|r| r.stage == config.stage)
        .filter_map(|r| {
            r.actions
                .iter()
                .map(|a| match a {
                    Action::GenericKey { key, value } => Some(Some((key.clone(), value.clone()))),
                    Action::RemoteAddress => Some(Some(("remote_address".into(), input.peer.to_string()))),
                    Action::RequestHeaders { header, key, skip_if_absent } => {
                        match input.parts.headers.get(header).and_then(|v| v.to_str().ok()) {
                            Some(v) => Some(Some((key.clone(), v.to_string()))),
                            None if *skip_if_absent => Some(None),
                            None => None,
                        }
                    }
                })
                .collect::<Option<Vec<Option<(String, String)>>>>()
                .map(|entries| entries.into_iter().flatten().collect::<Vec<_>>())
                .filter(|e| !e.is_empty())
        })
        .collect()
}

/// A configured descriptor matches a request's when the keys agree in order and each
/// value is equal, or empty in the configuration (any value).
fn descriptor_matches(config: &[(String, String)], request: &[(String, String)]) -> bool {
    config.len() == request.len()
        && config.iter().zip(request).all(|((ck, cv), (rk, rv))| ck == rk && (cv.is_empty() || cv == rv))
}
