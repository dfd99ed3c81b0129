//! Retry policy of a route (Envoy `RetryPolicy`, `x-envoy-retry-on` vocabulary).

use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3::{
    retry_policy::retry_host_predicate::ConfigType, RetryPolicy as RetryPolicyProto,
};

use super::matcher::{unsupported, HeaderMatcher, RequestView};
use super::to_duration;
use crate::error::{ErrorKind, ProxyError};

/// Envoy's default retry back-off base interval.
const DEFAULT_BASE_INTERVAL: Duration = Duration::from_millis(25);

/// The retry conditions of `retry_on`, one flag per token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// `5xx`
    pub status_5xx: bool,
    /// `gateway-error`
    pub gateway_error: bool,
    /// `reset`
    pub reset: bool,
    /// `reset-before-request`
    pub reset_before_request: bool,
    /// `connect-failure`
    pub connect_failure: bool,
    /// `retriable-4xx` (409 only)
    pub retriable_4xx: bool,
    /// `refused-stream`
    pub refused_stream: bool,
    /// `retriable-status-codes`
    pub retriable_status_codes: bool,
    /// `retriable-headers`
    pub retriable_headers: bool,
    /// `envoy-ratelimited`
    pub envoy_ratelimited: bool,
    /// `cancelled` (gRPC 1)
    pub grpc_cancelled: bool,
    /// `deadline-exceeded` (gRPC 4)
    pub grpc_deadline_exceeded: bool,
    /// `resource-exhausted` (gRPC 8)
    pub grpc_resource_exhausted: bool,
    /// `internal` (gRPC 13)
    pub grpc_internal: bool,
    /// `unavailable` (gRPC 14)
    pub grpc_unavailable: bool,
}

/// A compiled retry policy.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Conditions that trigger a retry.
    pub retry_on: RetryOn,
    /// Maximum number of retries (Envoy default 1).
    pub num_retries: u32,
    /// Timeout of each attempt; `None` means the route timeout alone applies.
    pub per_try_timeout: Option<Duration>,
    /// Idle timeout of each attempt.
    pub per_try_idle_timeout: Option<Duration>,
    /// Status codes retried under `retriable-status-codes`.
    pub retriable_status_codes: Vec<u16>,
    /// Back-off base interval (default 25 ms).
    pub base_interval: Duration,
    /// Back-off cap (default 10 x base).
    pub max_interval: Duration,
    /// `envoy.retry_host_predicates.previous_hosts`: avoid hosts already tried.
    pub avoid_previous_hosts: bool,
    /// Attempts at picking a host that passes the host predicates (Envoy default 1).
    pub host_selection_retry_max_attempts: u32,
    retriable_headers: Vec<HeaderMatcher>,
    retriable_request_headers: Vec<HeaderMatcher>,
}

/// Response headers every retry decision reads, parsed once.
const X_ENVOY_RATELIMITED: http::HeaderName = http::HeaderName::from_static("x-envoy-ratelimited");
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

impl RetryPolicy {
    /// Compiles a route or virtual host `RetryPolicy`; `at` is its field path.
    pub(crate) fn compile(p: &RetryPolicyProto, at: &str) -> Result<RetryPolicy, (String, String)> {
        if p.retry_priority.is_some() {
            return Err(unsupported(at, "retry_priority"));
        }
        if !p.retry_options_predicates.is_empty() {
            return Err(unsupported(at, "retry_options_predicates"));
        }
        if p.rate_limited_retry_back_off.is_some() {
            return Err(unsupported(at, "rate_limited_retry_back_off"));
        }
        let mut avoid_previous_hosts = false;
        for (i, pred) in p.retry_host_predicate.iter().enumerate() {
            let known = pred.name == "envoy.retry_host_predicates.previous_hosts"
                || matches!(&pred.config_type, Some(ConfigType::TypedConfig(a))
                    if a.type_url.ends_with("envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"));
            if !known {
                return Err((
                    format!("{at}.retry_host_predicate[{i}]"),
                    format!("retry host predicate {:?} is not supported (only previous_hosts)", pred.name),
                ));
            }
            avoid_previous_hosts = true;
        }
        let retry_on = parse_retry_on(&p.retry_on);
        let mut codes = Vec::new();
        for (i, c) in p.retriable_status_codes.iter().enumerate() {
            match u16::try_from(*c) {
                Ok(c) if (100..=999).contains(&c) => codes.push(c),
                _ => {
                    return Err((
                        format!("{at}.retriable_status_codes[{i}]"),
                        format!("{c} is not an HTTP status code"),
                    ))
                }
            }
        }
        let (base_interval, max_interval) = match &p.retry_back_off {
            None => (DEFAULT_BASE_INTERVAL, DEFAULT_BASE_INTERVAL * 10),
            Some(b) => {
                let bat = format!("{at}.retry_back_off.base_interval");
                let base = match &b.base_interval {
                    None => return Err((bat, "base_interval is required".into())),
                    Some(d) => to_duration(d, &bat)?,
                };
                if base < Duration::from_millis(1) {
                    return Err((bat, "base_interval must be at least 1ms".into()));
                }
                let max = match &b.max_interval {
                    None => base.saturating_mul(10),
                    Some(d) => to_duration(d, &format!("{at}.retry_back_off.max_interval"))?,
                };
                if max < base {
                    return Err((
                        format!("{at}.retry_back_off.max_interval"),
                        "max_interval must be greater than or equal to base_interval".into(),
                    ));
                }
                (base, max)
            }
        };
        let matchers = |list: &[_], field: &str| {
            list.iter()
                .enumerate()
                .map(|(i, h)| HeaderMatcher::compile(h, &format!("{at}.{field}[{i}]")))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(RetryPolicy {
            retry_on,
            num_retries: p.num_retries.as_ref().map_or(1, |n| n.value),
            per_try_timeout: opt_nonzero(p.per_try_timeout.as_ref(), &format!("{at}.per_try_timeout"))?,
            per_try_idle_timeout: opt_nonzero(p.per_try_idle_timeout.as_ref(), &format!("{at}.per_try_idle_timeout"))?,
            retriable_status_codes: codes,
            base_interval,
            max_interval,
            avoid_previous_hosts,
            host_selection_retry_max_attempts: u32::try_from(p.host_selection_retry_max_attempts).unwrap_or(0).max(1),
            retriable_headers: matchers(&p.retriable_headers, "retriable_headers")?,
            retriable_request_headers: matchers(&p.retriable_request_headers, "retriable_request_headers")?,
        })
    }

    /// Whether this request may be retried at all (`retriable_request_headers`: when
    /// set, at least one must match the request; pseudo headers such as `:method` work).
    pub fn request_is_retriable(&self, parts: &http::request::Parts) -> bool {
        if self.retriable_request_headers.is_empty() {
            return true;
        }
        let authority = parts
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| parts.uri.authority().map(http::uri::Authority::as_str))
            .unwrap_or("");
        let view = RequestView { authority, parts };
        self.retriable_request_headers.iter().any(|m| m.matches_request(&view))
    }

    /// Whether a response with `status` and `headers` (gRPC trailers-only responses
    /// carry `grpc-status` in the headers) is retried. Envoy's order: a response with
    /// `x-envoy-ratelimited` is retried only under `envoy-ratelimited`.
    pub fn retry_on_response(&self, status: http::StatusCode, headers: &http::HeaderMap) -> bool {
        // A rate-limited response (`x-envoy-ratelimited`) is retried only on
        // `envoy-ratelimited`, whatever else matches. The header is looked up only when
        // its presence can change the answer: most responses match nothing else.
        let ratelimited = || headers.contains_key(X_ENVOY_RATELIMITED);
        if self.retry_on.envoy_ratelimited && ratelimited() {
            return true;
        }
        self.retry_on_status_or_headers(status, headers) && !ratelimited()
    }

    /// [`RetryPolicy::retry_on_response`] apart from rate limiting: the status, the
    /// retriable headers and the gRPC status.
    fn retry_on_status_or_headers(&self, status: http::StatusCode, headers: &http::HeaderMap) -> bool {
        let on = &self.retry_on;
        let code = status.as_u16();
        if on.status_5xx && status.is_server_error() {
            return true;
        }
        if on.gateway_error && matches!(code, 502..=504) {
            return true;
        }
        if on.retriable_4xx && code == 409 {
            return true;
        }
        if on.retriable_status_codes && self.retriable_status_codes.contains(&code) {
            return true;
        }
        if on.retriable_headers && self.retriable_headers.iter().any(|m| m.matches_headers(headers)) {
            return true;
        }
        // `grpc-status` (a hashed lookup of a custom name) only when a gRPC code is retried.
        if !(on.grpc_cancelled
            || on.grpc_deadline_exceeded
            || on.grpc_resource_exhausted
            || on.grpc_internal
            || on.grpc_unavailable)
        {
            return false;
        }
        let grpc = headers.get(GRPC_STATUS).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u32>().ok());
        matches!(
            (grpc, on),
            (Some(1), RetryOn { grpc_cancelled: true, .. })
                | (Some(4), RetryOn { grpc_deadline_exceeded: true, .. })
                | (Some(8), RetryOn { grpc_resource_exhausted: true, .. })
                | (Some(13), RetryOn { grpc_internal: true, .. })
                | (Some(14), RetryOn { grpc_unavailable: true, .. })
        )
    }

    /// Whether a failed attempt is retried. Follows Envoy's `wouldRetryFromReset`:
    /// overflow never; `reset`, `5xx` and `gateway-error` retry every upstream reset,
    /// connect failure and per-try timeout; `reset-before-request` retries failures
    /// where the request was never sent; `refused-stream` and `connect-failure` retry
    /// their own kind. Other kinds (route timeout, no route, no healthy upstream,
    /// downstream errors, fault aborts) are never retried.
    pub fn retry_on_error(&self, err: &ProxyError) -> bool {
        let on = &self.retry_on;
        let kind = err.kind();
        let upstream_failure = matches!(
            kind,
            ErrorKind::ConnectFailure
                | ErrorKind::UpstreamReset
                | ErrorKind::RefusedStream
                | ErrorKind::UpstreamTerminated
                | ErrorKind::UpstreamProtocol
                | ErrorKind::PerTryTimeout
        );
        if !upstream_failure {
            return false;
        }
        if on.reset || on.status_5xx || on.gateway_error {
            return true;
        }
        if on.reset_before_request && err.was_not_sent() {
            return true;
        }
        match kind {
            ErrorKind::RefusedStream => on.refused_stream,
            ErrorKind::ConnectFailure => on.connect_failure,
            _ => false,
        }
    }

    /// Envoy's fully jittered exponential back-off before retry number `attempt + 1`
    /// (`attempt` 0 for the first retry): uniform in `[0, min(base * 2^attempt, max))`
    /// at millisecond granularity, `r` being a uniform random value.
    pub fn backoff(&self, attempt: u32, r: u64) -> Duration {
        let base = u64::try_from(self.base_interval.as_millis()).unwrap_or(u64::MAX).max(1);
        let max = u64::try_from(self.max_interval.as_millis()).unwrap_or(u64::MAX).max(1);
        let bound = base.checked_shl(attempt).filter(|b| b >> attempt == base).map_or(max, |b| b.min(max));
        Duration::from_millis(r % bound)
    }
}

/// Parses `retry_on`; unknown tokens are ignored, as Envoy does.
fn parse_retry_on(s: &str) -> RetryOn {
    let mut on = RetryOn::default();
    for token in s.split(',').map(str::trim) {
        match token {
            "5xx" => on.status_5xx = true,
            "gateway-error" => on.gateway_error = true,
            "reset" => on.reset = true,
            "reset-before-request" => on.reset_before_request = true,
            "connect-failure" => on.connect_failure = true,
            "retriable-4xx" => on.retriable_4xx = true,
            "refused-stream" => on.refused_stream = true,
            "retriable-status-codes" => on.retriable_status_codes = true,
            "retriable-headers" => on.retriable_headers = true,
            "envoy-ratelimited" => on.envoy_ratelimited = true,
            "cancelled" => on.grpc_cancelled = true,
            "deadline-exceeded" => on.grpc_deadline_exceeded = true,
            "resource-exhausted" => on.grpc_resource_exhausted = true,
            "internal" => on.grpc_internal = true,
            "unavailable" => on.grpc_unavailable = true,
            _ => {}
        }
    }
    on
}

/// An optional duration where zero means "none".
fn opt_nonzero(
    d: Option<&envoy_types::pb::google::protobuf::Duration>,
    at: &str,
) -> Result<Option<Duration>, (String, String)> {
    match d {
        None => Ok(None),
        Some(d) => {
            let d = to_duration(d, at)?;
            Ok((!d.is_zero()).then_some(d))
        }
    }
}
