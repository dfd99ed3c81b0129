//! `LocalRateLimit` and route `rate_limits` protos -> compiled configuration. Errors are
//! `(field, message)` pairs relative to the message compiled, meant as NACKs.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
use envoy_types::pb::envoy::config::route::v3::rate_limit::action::ActionSpecifier;
use envoy_types::pb::envoy::config::route::v3::RateLimit;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::r#type::v3::TokenBucket;
use envoy_types::pb::google::protobuf::Any;
use http::StatusCode;
use prost::Message;

use super::bucket::BucketParams;
use super::{Action, Descriptor, LocalRateLimitConfig, RateLimitFilter, RateLimitRule, VhRateLimits};
use crate::route::matcher::Fraction;
use crate::route::HeaderEdits;

type Err = (String, String);

const TYPED_STRUCTS: &[&str] =
    &["type.googleapis.com/udpa.type.v1.TypedStruct", "type.googleapis.com/xds.type.v3.TypedStruct"];

/// Compiles the filter of an HTTP connection manager; `scope` names its place
/// (listener and chain) for its buckets.
pub fn compile_filter(any: &Any, name: &str, scope: &str) -> Result<RateLimitFilter, Err> {
    let config = compile_any(any, &format!("{scope}/{name}"))?;
    Ok(RateLimitFilter { name: name.to_string(), config: Arc::new(config) })
}

/// Compiles a per-route configuration (`typed_per_filter_config`); `scope` names the
/// route, virtual host or route configuration.
pub fn compile_per_route(any: &Any, scope: &str) -> Result<Arc<LocalRateLimitConfig>, Err> {
    compile_any(any, scope).map(Arc::new)
}

fn compile_any(any: &Any, scope: &str) -> Result<LocalRateLimitConfig, Err> {
    if TYPED_STRUCTS.contains(&any.type_url.as_str()) {
        return Err((
            String::new(),
            "a TypedStruct is not decoded by weft: send the LocalRateLimit message itself (the control plane converts it)"
                .into(),
        ));
    }
    if any.type_url != super::LOCAL_RATELIMIT_TYPE {
        return Err((String::new(), format!("expected {}, found {}", super::LOCAL_RATELIMIT_TYPE, any.type_url)));
    }
    let l = LocalRateLimit::decode(any.value.as_slice())
        .map_err(|e| (String::new(), format!("cannot decode LocalRateLimit: {e}")))?;
    compile(&l, scope)
}

fn compile(l: &LocalRateLimit, scope: &str) -> Result<LocalRateLimitConfig, Err> {
    if l.stat_prefix.is_empty() {
        return Err(("stat_prefix".into(), "stat_prefix is required".into()));
    }
    let unsupported = [
        (l.local_cluster_rate_limit.is_some(), "local_cluster_rate_limit"),
        (l.max_dynamic_descriptors.is_some(), "max_dynamic_descriptors"),
        (l.enable_retry_after_header, "enable_retry_after_header"),
    ];
    if let Some((_, f)) = unsupported.iter().find(|(bad, _)| *bad) {
        return Err((
            f.to_string(),
            format!("{f} is not supported by weft; remove it (accepting it would silently change behaviour)"),
        ));
    }
    // Envoy: a status below 400 is replaced by 429.
    let status = match &l.status {
        Some(s) if s.code >= 400 => StatusCode::from_u16(u16::try_from(s.code).unwrap_or(0))
            .map_err(|_| ("status.code".to_string(), format!("{} is not an HTTP status", s.code)))?,
        _ => StatusCode::TOO_MANY_REQUESTS,
    };
    let default_bucket = l.token_bucket.as_ref().map(|b| bucket(b, "token_bucket")).transpose()?;
    let mut descriptors = Vec::with_capacity(l.descriptors.len());
    for (i, d) in l.descriptors.iter().enumerate() {
        let at = format!("descriptors[{i}]");
        if d.entries.is_empty() {
            return Err((format!("{at}.entries"), "a descriptor needs at least one entry".into()));
        }
        let tb =
            d.token_bucket.as_ref().ok_or_else(|| (format!("{at}.token_bucket"), "token_bucket is required".into()))?;
        descriptors.push(Descriptor {
            entries: d.entries.iter().map(|e| (e.key.clone(), e.value.clone())).collect(),
            params: bucket(tb, &format!("{at}.token_bucket"))?,
            shadow: d.shadow_mode,
        });
    }
    let x_ratelimit_headers = match l.enable_x_ratelimit_headers {
        0 => false,
        1 => true,
        v => return Err(("enable_x_ratelimit_headers".into(), format!("unknown value {v}"))),
    };
    let vh_rate_limits = match l.vh_rate_limits {
        0 => VhRateLimits::Override,
        1 => VhRateLimits::Include,
        2 => VhRateLimits::Ignore,
        v => return Err(("vh_rate_limits".into(), format!("unknown value {v}"))),
    };
    Ok(LocalRateLimitConfig {
        stat_prefix: l.stat_prefix.clone(),
        scope: Arc::from(scope),
        status,
        bucket: default_bucket,
        enabled: fraction(l.filter_enabled.as_ref(), "filter_enabled")?,
        enforced: fraction(l.filter_enforced.as_ref(), "filter_enforced")?,
        response_headers: HeaderEdits::compile(&l.response_headers_to_add, &[], "response_headers_to_add", "")?,
        request_headers_when_not_enforced: HeaderEdits::compile(
            &l.request_headers_to_add_when_not_enforced,
            &[],
            "request_headers_to_add_when_not_enforced",
            "",
        )?,
        descriptors,
        per_connection: l.local_rate_limit_per_downstream_connection,
        x_ratelimit_headers,
        always_consume_default: l.always_consume_default_token_bucket.as_ref().is_none_or(|b| b.value),
        resource_exhausted: l.rate_limited_as_resource_exhausted,
        stage: l.stage,
        vh_rate_limits,
        rate_limits: compile_rate_limits(&l.rate_limits, "rate_limits")?,
        buckets: OnceLock::new(),
        counters: OnceLock::new(),
    })
}

/// Compiles route or virtual host `rate_limits` (the actions weft implements:
/// `generic_key`, `request_headers`, `remote_address`).
pub fn compile_rate_limits(list: &[RateLimit], at: &str) -> Result<Vec<RateLimitRule>, Err> {
    let mut out = Vec::with_capacity(list.len());
    for (i, r) in list.iter().enumerate() {
        let at = format!("{at}[{i}]");
        let unsupported = [
            (!r.disable_key.is_empty(), "disable_key"),
            (r.limit.is_some(), "limit"),
            (r.hits_addend.is_some(), "hits_addend"),
            (r.apply_on_stream_done, "apply_on_stream_done"),
        ];
        if let Some((_, f)) = unsupported.iter().find(|(bad, _)| *bad) {
            return Err((format!("{at}.{f}"), format!("{f} is not supported by weft; remove it")));
        }
        if r.actions.is_empty() {
            return Err((format!("{at}.actions"), "at least one action is required".into()));
        }
        let mut actions = Vec::with_capacity(r.actions.len());
        for (j, a) in r.actions.iter().enumerate() {
            let aat = format!("{at}.actions[{j}]");
            actions.push(match &a.action_specifier {
                Some(ActionSpecifier::GenericKey(g)) => Action::GenericKey {
                    key: if g.descriptor_key.is_empty() { "generic_key".into() } else { g.descriptor_key.clone() },
                    value: g.descriptor_value.clone(),
                },
                Some(ActionSpecifier::RequestHeaders(h)) => {
                    if h.descriptor_key.is_empty() {
                        return Err((
                            format!("{aat}.request_headers.descriptor_key"),
                            "descriptor_key is required".into(),
                        ));
                    }
                    let header = http::HeaderName::from_bytes(h.header_name.as_bytes()).map_err(|_| {
                        (
                            format!("{aat}.request_headers.header_name"),
                            format!("{:?} is not a header name", h.header_name),
                        )
                    })?;
                    Action::RequestHeaders { header, key: h.descriptor_key.clone(), skip_if_absent: h.skip_if_absent }
                }
                Some(ActionSpecifier::RemoteAddress(_)) => Action::RemoteAddress,
                Some(_) => return Err((
                    aat,
                    "rate limit action not supported by weft (supported: generic_key, request_headers, remote_address)"
                        .into(),
                )),
                None => return Err((aat, "an action is required".into())),
            });
        }
        out.push(RateLimitRule { stage: r.stage.map_or(0, |s| s.value), actions });
    }
    Ok(out)
}

fn bucket(b: &TokenBucket, at: &str) -> Result<BucketParams, Err> {
    if b.max_tokens == 0 {
        return Err((format!("{at}.max_tokens"), "max_tokens must be greater than 0".into()));
    }
    let per_fill = b.tokens_per_fill.map_or(1, |v| v.value);
    if per_fill == 0 {
        return Err((format!("{at}.tokens_per_fill"), "tokens_per_fill must be greater than 0".into()));
    }
    let Some(d) = &b.fill_interval else {
        return Err((format!("{at}.fill_interval"), "fill_interval is required".into()));
    };
    let interval = crate::route::to_duration(d, &format!("{at}.fill_interval"))?;
    if interval < Duration::from_millis(50) {
        return Err((
            format!("{at}.fill_interval"),
            format!("{interval:?} is too short: the fill interval must be at least 50ms (as Envoy requires)"),
        ));
    }
    Ok(BucketParams { max: u64::from(b.max_tokens), per_fill: u64::from(per_fill), interval })
}

/// `filter_enabled` / `filter_enforced`: the default value (runtime keys are not read:
/// weft has no runtime); unset is 0%, as in Envoy.
fn fraction(f: Option<&RuntimeFractionalPercent>, at: &str) -> Result<Fraction, Err> {
    match f {
        None => Ok(Fraction::NEVER),
        Some(r) => match &r.default_value {
            None => Err((format!("{at}.default_value"), "default_value is required".into())),
            Some(fp) => Fraction::compile(fp, &format!("{at}.default_value")),
        },
    }
}
