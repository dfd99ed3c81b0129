//! CORS (`envoy.filters.http.cors`): per-route `CorsPolicy` from
//! `typed_per_filter_config["envoy.filters.http.cors"]`, with Envoy's semantics.
//!
//! The policies of the route, its virtual host and the route configuration are merged
//! field by field when the table is compiled (the most specific non-empty value wins;
//! `filter_enabled`/`shadow_enabled` come from the most specific policy alone), so a
//! request does no merging. A request with an `Origin` is a CORS request; an `OPTIONS`
//! with `Access-Control-Request-Method` is a preflight, answered locally with 200
//! unless the origin is not allowed and `forward_not_matching_preflights` (default
//! true) sends it upstream. Responses to allowed CORS requests get
//! `access-control-allow-origin` (the request's origin), `-allow-credentials` and
//! `-expose-headers`.

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
use envoy_types::pb::envoy::extensions::filters::http::cors::v3::CorsPolicy as CorsProto;
use envoy_types::pb::google::protobuf::Any;
use http::header::{HeaderName, HeaderValue, ORIGIN};
use http::{HeaderMap, Method, Response, StatusCode};
use prost::{Message, Name};

use super::matcher::{Fraction, StringMatch};

/// The filter name whose per-route config carries a CORS policy.
pub(crate) const CORS_FILTER: &str = "envoy.filters.http.cors";

const REQUEST_METHOD: HeaderName = HeaderName::from_static("access-control-request-method");
const REQUEST_HEADERS: HeaderName = HeaderName::from_static("access-control-request-headers");
const REQUEST_PRIVATE_NETWORK: HeaderName = HeaderName::from_static("access-control-request-private-network");
const ALLOW_ORIGIN: HeaderName = HeaderName::from_static("access-control-allow-origin");
const ALLOW_CREDENTIALS: HeaderName = HeaderName::from_static("access-control-allow-credentials");
const ALLOW_METHODS: HeaderName = HeaderName::from_static("access-control-allow-methods");
const ALLOW_HEADERS: HeaderName = HeaderName::from_static("access-control-allow-headers");
const ALLOW_PRIVATE_NETWORK: HeaderName = HeaderName::from_static("access-control-allow-private-network");
const MAX_AGE: HeaderName = HeaderName::from_static("access-control-max-age");
const EXPOSE_HEADERS: HeaderName = HeaderName::from_static("access-control-expose-headers");

/// One level's `CorsPolicy`, as configured (fields may be empty / unset).
#[derive(Debug, Clone, Default)]
pub struct CorsLevel {
    allow_origins: Vec<StringMatch>,
    allow_methods: Option<HeaderValue>,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    allow_credentials: Option<bool>,
    allow_private_network_access: Option<bool>,
    forward_not_matching_preflights: Option<bool>,
    enabled: Option<Fraction>,
    shadow: Option<Fraction>,
}

/// The effective policy of one route: its levels merged, most specific first.
#[derive(Debug, Clone)]
pub struct CorsPolicy {
    allow_origins: Vec<StringMatch>,
    allow_methods: Option<HeaderValue>,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    allow_credentials: bool,
    allow_private_network_access: bool,
    forward_not_matching_preflights: bool,
    /// `None`: always enabled.
    enabled: Option<Fraction>,
}

/// What the filter does with a request.
#[derive(Debug)]
pub enum CorsDecision {
    /// Not a CORS request for this policy (or the origin is not allowed): route it unchanged.
    Pass,
    /// Answer the preflight locally with this response.
    Respond(Response<Bytes>),
    /// Route it, then add the CORS headers for this allowed origin to the response.
    Decorate(HeaderValue),
}

impl CorsLevel {
    /// The level of a `FilterConfig` with `disabled: true`: the filter is off here.
    pub(crate) fn disabled() -> CorsLevel {
        CorsLevel { enabled: Some(Fraction::NEVER), ..CorsLevel::default() }
    }

    /// Compiles a `CorsPolicy` packed in an `Any`.
    pub(crate) fn from_any(any: &Any) -> Result<CorsLevel, String> {
        if any.type_url != CorsProto::type_url() {
            return Err(format!("expected {}, found {}", CorsProto::type_url(), any.type_url));
        }
        let p = CorsProto::decode(any.value.as_slice()).map_err(|e| format!("cannot decode CorsPolicy: {e}"))?;
        let allow_origins = p
            .allow_origin_string_match
            .iter()
            .enumerate()
            .map(|(i, m)| StringMatch::compile(m, &format!("allow_origin_string_match[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|(f, m)| format!("{f}: {m}"))?;
        let value = |s: &str, field: &str| -> Result<Option<HeaderValue>, String> {
            if s.is_empty() {
                return Ok(None);
            }
            HeaderValue::from_str(s).map(Some).map_err(|_| format!("{field}: {s:?} is not a valid header value"))
        };
        if !p.max_age.is_empty() && p.max_age.parse::<u64>().is_err() {
            return Err(format!("max_age: {:?} is not a number of seconds", p.max_age));
        }
        Ok(CorsLevel {
            allow_origins,
            allow_methods: value(&p.allow_methods, "allow_methods")?,
            allow_headers: value(&p.allow_headers, "allow_headers")?,
            expose_headers: value(&p.expose_headers, "expose_headers")?,
            max_age: value(&p.max_age, "max_age")?,
            allow_credentials: p.allow_credentials.map(|b| b.value),
            allow_private_network_access: p.allow_private_network_access.map(|b| b.value),
            forward_not_matching_preflights: p.forward_not_matching_preflights.map(|b| b.value),
            enabled: runtime_fraction(p.filter_enabled.as_ref(), "filter_enabled")?,
            shadow: runtime_fraction(p.shadow_enabled.as_ref(), "shadow_enabled")?,
        })
    }
}

impl CorsPolicy {
    /// Merges the configured levels, most specific first (route, virtual host, route
    /// configuration). `None` when no level has a policy.
    pub(crate) fn merge(levels: &[&CorsLevel]) -> Option<CorsPolicy> {
        let first = levels.first()?;
        let pick = |f: fn(&CorsLevel) -> Option<HeaderValue>| levels.iter().find_map(|l| f(l));
        let flag = |f: fn(&CorsLevel) -> Option<bool>| levels.iter().find_map(|l| f(l));
        Some(CorsPolicy {
            allow_origins: levels
                .iter()
                .find(|l| !l.allow_origins.is_empty())
                .map(|l| l.allow_origins.clone())
                .unwrap_or_default(),
            allow_methods: pick(|l| l.allow_methods.clone()),
            allow_headers: pick(|l| l.allow_headers.clone()),
            expose_headers: pick(|l| l.expose_headers.clone()),
            max_age: pick(|l| l.max_age.clone()),
            allow_credentials: flag(|l| l.allow_credentials).unwrap_or(false),
            allow_private_network_access: flag(|l| l.allow_private_network_access).unwrap_or(false),
            forward_not_matching_preflights: flag(|l| l.forward_not_matching_preflights).unwrap_or(true),
            // Shadow mode evaluates origins for statistics only: it changes nothing on
            // the wire, so a shadow-only policy behaves as a disabled one.
            enabled: first.enabled.or(if first.shadow.is_some() { Some(Fraction::NEVER) } else { None }),
        })
    }

    /// Envoy's `decodeHeaders`. `random` draws `filter_enabled`.
    pub fn decide(&self, method: &Method, headers: &HeaderMap, random: u64) -> CorsDecision {
        if self.enabled.as_ref().is_some_and(|f| !f.hit(random)) {
            return CorsDecision::Pass;
        }
        let Some(origin) = headers.get(ORIGIN).filter(|o| !o.is_empty()) else {
            return CorsDecision::Pass;
        };
        let allowed = self.origin_allowed(origin);
        let request_method = headers.get(REQUEST_METHOD).filter(|v| !v.is_empty());
        let Some(request_method) = request_method.filter(|_| method == Method::OPTIONS) else {
            return if allowed { CorsDecision::Decorate(origin.clone()) } else { CorsDecision::Pass };
        };
        if !allowed && self.forward_not_matching_preflights {
            return CorsDecision::Pass;
        }
        let mut resp = Response::new(Bytes::new());
        *resp.status_mut() = StatusCode::OK;
        let h = resp.headers_mut();
        if allowed {
            h.insert(ALLOW_ORIGIN, origin.clone());
        }
        if self.allow_credentials {
            h.insert(ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        if let Some(m) = &self.allow_methods {
            let v = if m == "*" { request_method.clone() } else { m.clone() };
            h.insert(ALLOW_METHODS, v);
        }
        if let Some(a) = &self.allow_headers {
            let v = if a == "*" {
                headers.get(REQUEST_HEADERS).cloned().unwrap_or_else(|| HeaderValue::from_static(""))
            } else {
                a.clone()
            };
            h.insert(ALLOW_HEADERS, v);
        }
        if let Some(m) = &self.max_age {
            h.insert(MAX_AGE, m.clone());
        }
        if self.allow_private_network_access && headers.get(REQUEST_PRIVATE_NETWORK).is_some_and(|v| v == "true") {
            h.insert(ALLOW_PRIVATE_NETWORK, HeaderValue::from_static("true"));
        }
        CorsDecision::Respond(resp)
    }

    /// Envoy's `encodeHeaders` for an allowed CORS request.
    pub fn decorate(&self, response: &mut HeaderMap, origin: HeaderValue) {
        response.insert(ALLOW_ORIGIN, origin);
        if self.allow_credentials {
            response.insert(ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        if let Some(e) = &self.expose_headers {
            response.insert(EXPOSE_HEADERS, e.clone());
        }
    }

    fn origin_allowed(&self, origin: &HeaderValue) -> bool {
        let Ok(origin) = origin.to_str() else { return false };
        self.allow_origins.iter().any(|m| m.matches("*") || m.matches(origin))
    }
}

fn runtime_fraction(f: Option<&RuntimeFractionalPercent>, at: &str) -> Result<Option<Fraction>, String> {
    let Some(f) = f else { return Ok(None) };
    match &f.default_value {
        None => Ok(None),
        Some(fp) => {
            Fraction::compile(fp, &format!("{at}.default_value")).map(Some).map_err(|(f, m)| format!("{f}: {m}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher::MatchPattern, StringMatcher};
    use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
    use envoy_types::pb::google::protobuf::BoolValue;
    use envoy_types::util::pack_any;

    fn level(p: CorsProto) -> CorsLevel {
        CorsLevel::from_any(&pack_any(p)).unwrap()
    }

    fn exact(s: &str) -> StringMatcher {
        StringMatcher { match_pattern: Some(MatchPattern::Exact(s.into())), ..Default::default() }
    }

    fn policy() -> CorsProto {
        CorsProto {
            allow_origin_string_match: vec![exact("https://example.com")],
            allow_methods: "GET,POST".into(),
            allow_headers: "x-custom".into(),
            expose_headers: "x-trace".into(),
            max_age: "86400".into(),
            allow_credentials: Some(BoolValue { value: true }),
            ..Default::default()
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn preflight_from_allowed_origin_is_answered_locally_with_the_policy() {
        let l = level(policy());
        let p = CorsPolicy::merge(&[&l]).unwrap();
        let h = headers(&[("origin", "https://example.com"), ("access-control-request-method", "POST")]);
        let CorsDecision::Respond(r) = p.decide(&Method::OPTIONS, &h, 0) else { panic!("not answered") };
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["access-control-allow-origin"], "https://example.com");
        assert_eq!(r.headers()["access-control-allow-methods"], "GET,POST");
        assert_eq!(r.headers()["access-control-allow-headers"], "x-custom");
        assert_eq!(r.headers()["access-control-max-age"], "86400");
        assert_eq!(r.headers()["access-control-allow-credentials"], "true");
    }

    #[test]
    fn preflight_from_other_origin_is_forwarded_unless_told_otherwise() {
        let l = level(policy());
        let p = CorsPolicy::merge(&[&l]).unwrap();
        let h = headers(&[("origin", "https://evil.example"), ("access-control-request-method", "POST")]);
        assert!(matches!(p.decide(&Method::OPTIONS, &h, 0), CorsDecision::Pass));
        let l = level(CorsProto { forward_not_matching_preflights: Some(BoolValue { value: false }), ..policy() });
        let p = CorsPolicy::merge(&[&l]).unwrap();
        let CorsDecision::Respond(r) = p.decide(&Method::OPTIONS, &h, 0) else { panic!("not answered") };
        assert!(r.headers().get("access-control-allow-origin").is_none());
    }

    #[test]
    fn actual_request_from_allowed_origin_is_decorated_and_others_are_not() {
        let l = level(policy());
        let p = CorsPolicy::merge(&[&l]).unwrap();
        let h = headers(&[("origin", "https://example.com")]);
        let CorsDecision::Decorate(o) = p.decide(&Method::GET, &h, 0) else { panic!("not decorated") };
        let mut resp = HeaderMap::new();
        p.decorate(&mut resp, o);
        assert_eq!(resp["access-control-allow-origin"], "https://example.com");
        assert_eq!(resp["access-control-expose-headers"], "x-trace");
        assert!(matches!(p.decide(&Method::GET, &headers(&[("origin", "https://x.example")]), 0), CorsDecision::Pass));
        assert!(matches!(p.decide(&Method::GET, &HeaderMap::new(), 0), CorsDecision::Pass));
    }

    #[test]
    fn levels_merge_field_by_field_most_specific_first() {
        let route = level(CorsProto { allow_methods: "PUT".into(), ..Default::default() });
        let vhost = level(policy());
        let p = CorsPolicy::merge(&[&route, &vhost]).unwrap();
        let h = headers(&[("origin", "https://example.com"), ("access-control-request-method", "PUT")]);
        let CorsDecision::Respond(r) = p.decide(&Method::OPTIONS, &h, 0) else { panic!("not answered") };
        assert_eq!(r.headers()["access-control-allow-methods"], "PUT");
        assert_eq!(r.headers()["access-control-allow-headers"], "x-custom");
    }

    #[test]
    fn wildcard_origin_and_disabled_filter() {
        let l = level(CorsProto { allow_origin_string_match: vec![exact("*")], ..Default::default() });
        let p = CorsPolicy::merge(&[&l]).unwrap();
        let h = headers(&[("origin", "https://anything.example")]);
        assert!(matches!(p.decide(&Method::GET, &h, 0), CorsDecision::Decorate(_)));
        let off = RuntimeFractionalPercent {
            default_value: Some(FractionalPercent { numerator: 0, denominator: 0 }),
            ..Default::default()
        };
        let l = level(CorsProto { filter_enabled: Some(off), ..policy() });
        let p = CorsPolicy::merge(&[&l]).unwrap();
        assert!(matches!(
            p.decide(&Method::GET, &headers(&[("origin", "https://example.com")]), 0),
            CorsDecision::Pass
        ));
    }

    #[test]
    fn bad_max_age_is_rejected() {
        let err = CorsLevel::from_any(&pack_any(CorsProto { max_age: "1d".into(), ..Default::default() })).unwrap_err();
        assert!(err.contains("max_age"), "{err}");
    }
}
