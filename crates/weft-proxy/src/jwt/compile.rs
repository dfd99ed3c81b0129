//! `JwtAuthentication` -> [`JwtFilter`]. Fields weft does not implement are refused
//! with their path, never ignored.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{data_source, http_uri, DataSource};
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::{
    jwt_provider, jwt_requirement, requirement_rule, JwtAuthentication, JwtProvider, JwtRequirement,
};
use envoy_types::pb::google::protobuf::Any;
use http::header::HeaderName;

use super::jwks::{JwksSource, KeySet, RemoteJwks};
use super::{JwtFilter, Location, Provider, Requirement};
use crate::proto::decode;
use crate::route::matcher::RouteMatcher;

/// Envoy's default `cache_duration` of a remote JWKS.
const DEFAULT_CACHE: Duration = Duration::from_secs(600);
/// Envoy's default clock skew.
const DEFAULT_SKEW: u64 = 60;

type Error = (String, String);

pub(super) fn filter(any: &Any, name: &str) -> Result<JwtFilter, Error> {
    let cfg: JwtAuthentication = decode(any).map_err(|m| (String::new(), m))?;
    if cfg.filter_state_rules.is_some() {
        return Err(("filter_state_rules".into(), "filter_state_rules are not supported by weft; use rules".into()));
    }
    if cfg.strip_failure_response {
        return Err(("strip_failure_response".into(), "strip_failure_response is not supported by weft".into()));
    }
    // Providers sorted by name, so the order (and which token fills RequestAuth first)
    // does not depend on map iteration.
    let sorted: BTreeMap<&String, &JwtProvider> = cfg.providers.iter().collect();
    let mut providers = Vec::new();
    let mut index = BTreeMap::new();
    for (i, (pname, p)) in sorted.into_iter().enumerate() {
        let at = format!("providers[{pname}]");
        providers.push(Arc::new(provider(pname, p, &at)?));
        index.insert(pname.clone(), i);
    }
    let mut named = BTreeMap::new();
    let map: BTreeMap<&String, &JwtRequirement> = cfg.requirement_map.iter().collect();
    for (rname, r) in map {
        named.insert(rname.clone(), requirement(r, &index, &format!("requirement_map[{rname}]"))?);
    }
    let mut rules = Vec::new();
    for (i, r) in cfg.rules.iter().enumerate() {
        let at = format!("rules[{i}]");
        let m = r.r#match.as_ref().ok_or_else(|| (format!("{at}.match"), "a rule needs a match".to_string()))?;
        let matcher = RouteMatcher::compile(m, &format!("{at}.match"))?;
        let req = match &r.requirement_type {
            // No requirement: verification is disabled for matching requests.
            None => None,
            Some(requirement_rule::RequirementType::Requires(req)) => {
                Some(requirement(req, &index, &format!("{at}.requires"))?)
            }
            Some(requirement_rule::RequirementType::RequirementName(n)) => Some(
                named
                    .get(n)
                    .cloned()
                    .ok_or_else(|| (format!("{at}.requirement_name"), format!("no requirement_map entry {n:?}")))?,
            ),
        };
        rules.push((matcher, req));
    }
    Ok(JwtFilter { name: name.to_string(), providers, rules, bypass_cors_preflight: cfg.bypass_cors_preflight })
}

fn provider(name: &str, p: &JwtProvider, at: &str) -> Result<Provider, Error> {
    let unsupported = |field: &str| (format!("{at}.{field}"), format!("{field} is not supported by weft"));
    if p.subjects.is_some() {
        return Err(unsupported("subjects"));
    }
    if p.max_lifetime.is_some() {
        return Err(unsupported("max_lifetime"));
    }
    if !p.header_in_metadata.is_empty() {
        return Err(unsupported("header_in_metadata"));
    }
    if !p.failed_status_in_metadata.is_empty() {
        return Err(unsupported("failed_status_in_metadata"));
    }
    let mut locations = Vec::new();
    for (i, h) in p.from_headers.iter().enumerate() {
        let name = HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes())
            .map_err(|_| (format!("{at}.from_headers[{i}].name"), format!("invalid header name {:?}", h.name)))?;
        locations.push(Location::Header(name, h.value_prefix.clone()));
    }
    locations.extend(p.from_params.iter().cloned().map(Location::Param));
    locations.extend(p.from_cookies.iter().cloned().map(Location::Cookie));
    if locations.is_empty() {
        // Envoy's defaults: `Authorization: Bearer <token>` and `?access_token=`.
        locations.push(Location::Header(http::header::AUTHORIZATION, "Bearer ".into()));
        locations.push(Location::Param("access_token".into()));
    }
    let header = |field: &str, v: &str| {
        HeaderName::from_bytes(v.to_ascii_lowercase().as_bytes())
            .map_err(|_| (format!("{at}.{field}"), format!("invalid header name {v:?}")))
    };
    let forward_payload_header =
        (!p.forward_payload_header.is_empty()).then(|| header("forward_payload_header", &p.forward_payload_header));
    let mut claim_to_headers = Vec::new();
    for (i, c) in p.claim_to_headers.iter().enumerate() {
        let h = header(&format!("claim_to_headers[{i}].header_name"), &c.header_name)?;
        let path: Vec<String> = if c.claim_path.is_empty() {
            c.claim_name.split('.').map(str::to_string).collect()
        } else {
            c.claim_path.iter().map(|s| s.key.clone()).collect()
        };
        if path.iter().any(String::is_empty) {
            return Err((format!("{at}.claim_to_headers[{i}].claim_name"), "claim_name must not be empty".into()));
        }
        claim_to_headers.push((h, path));
    }
    let jwks = match &p.jwks_source_specifier {
        None => return Err((format!("{at}.jwks_source_specifier"), "local_jwks or remote_jwks is required".into())),
        Some(jwt_provider::JwksSourceSpecifier::LocalJwks(ds)) => {
            let text = data_source(ds, &format!("{at}.local_jwks"))?;
            let set = KeySet::parse(&text).map_err(|m| (format!("{at}.local_jwks"), m))?;
            JwksSource::Local(Arc::new(set))
        }
        Some(jwt_provider::JwksSourceSpecifier::RemoteJwks(r)) => {
            let rat = format!("{at}.remote_jwks");
            if r.retry_policy.is_some() {
                return Err((format!("{rat}.retry_policy"), "retry_policy is not supported by weft".into()));
            }
            let hu = r.http_uri.as_ref().ok_or_else(|| (format!("{rat}.http_uri"), "http_uri is required".into()))?;
            let uri: http::Uri =
                hu.uri.parse().map_err(|_| (format!("{rat}.http_uri.uri"), format!("invalid URI {:?}", hu.uri)))?;
            if uri.scheme_str() != Some("http") || uri.host().is_none() {
                return Err((
                    format!("{rat}.http_uri.uri"),
                    format!(
                        "weft fetches remote JWKS from http:// URLs only (got {:?}); inline the keys with local_jwks",
                        hu.uri
                    ),
                ));
            }
            // Envoy fetches through `cluster`; weft connects to the URI's host directly.
            let _cluster = match &hu.http_upstream_type {
                Some(http_uri::HttpUpstreamType::Cluster(c)) => c.clone(),
                None => String::new(),
            };
            let timeout = duration(hu.timeout.as_ref()).unwrap_or(Duration::from_secs(1));
            let cache = duration(r.cache_duration.as_ref()).unwrap_or(DEFAULT_CACHE);
            JwksSource::Remote(RemoteJwks::new(uri, timeout, cache))
        }
    };
    let space_delimited_claims =
        p.normalize_payload_in_metadata.as_ref().map(|n| n.space_delimited_claims.clone()).unwrap_or_default();
    Ok(Provider {
        name: name.to_string(),
        issuer: p.issuer.clone(),
        audiences: p.audiences.clone(),
        require_expiration: p.require_expiration,
        forward: p.forward,
        locations,
        forward_payload_header: forward_payload_header.transpose()?,
        pad_forward_payload_header: p.pad_forward_payload_header,
        space_delimited_claims,
        clock_skew: if p.clock_skew_seconds == 0 { DEFAULT_SKEW } else { u64::from(p.clock_skew_seconds) },
        claim_to_headers,
        jwks,
    })
}

fn requirement(r: &JwtRequirement, index: &BTreeMap<String, usize>, at: &str) -> Result<Requirement, Error> {
    let provider = |name: &str, field: &str| {
        index.get(name).copied().ok_or_else(|| (format!("{at}.{field}"), format!("no provider named {name:?}")))
    };
    use jwt_requirement::RequiresType as T;
    Ok(match &r.requires_type {
        None => return Err((at.to_string(), "a requirement needs a type".into())),
        Some(T::ProviderName(n)) => Requirement::Provider(provider(n, "provider_name")?, None),
        Some(T::ProviderAndAudiences(pa)) => Requirement::Provider(
            provider(&pa.provider_name, "provider_and_audiences.provider_name")?,
            Some(pa.audiences.clone()),
        ),
        Some(T::RequiresAny(list)) => {
            let (mut children, mut allow_missing, mut allow_failed) = (Vec::new(), false, false);
            for (i, c) in list.requirements.iter().enumerate() {
                match &c.requires_type {
                    Some(T::AllowMissing(_)) => allow_missing = true,
                    Some(T::AllowMissingOrFailed(_)) => allow_failed = true,
                    _ => children.push(requirement(c, index, &format!("{at}.requires_any.requirements[{i}]"))?),
                }
            }
            Requirement::Any { children, allow_missing, allow_failed }
        }
        Some(T::RequiresAll(list)) => Requirement::All(
            list.requirements
                .iter()
                .enumerate()
                .map(|(i, c)| requirement(c, index, &format!("{at}.requires_all.requirements[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Some(T::AllowMissing(_)) => Requirement::AllowMissing,
        Some(T::AllowMissingOrFailed(_)) => Requirement::AllowMissingOrFailed,
        Some(T::ExtractOnlyWithoutValidation(_)) => {
            return Err((
                format!("{at}.extract_only_without_validation"),
                "extract_only_without_validation is not supported by weft".into(),
            ))
        }
    })
}

fn data_source(ds: &DataSource, at: &str) -> Result<String, Error> {
    match &ds.specifier {
        Some(data_source::Specifier::InlineString(s)) => Ok(s.clone()),
        Some(data_source::Specifier::InlineBytes(b)) => {
            String::from_utf8(b.clone()).map_err(|_| (format!("{at}.inline_bytes"), "not UTF-8".into()))
        }
        Some(data_source::Specifier::Filename(f)) => {
            std::fs::read_to_string(f).map_err(|e| (format!("{at}.filename"), format!("cannot read {f:?}: {e}")))
        }
        Some(data_source::Specifier::EnvironmentVariable(v)) => {
            std::env::var(v).map_err(|_| (format!("{at}.environment_variable"), format!("{v} is not set")))
        }
        None => Err((at.to_string(), "a data source needs inline_string, inline_bytes or filename".into())),
    }
}

fn duration(d: Option<&envoy_types::pb::google::protobuf::Duration>) -> Option<Duration> {
    let d = d?;
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    let d = Duration::new(secs, nanos);
    (!d.is_zero()).then_some(d)
}
