//! `envoy.config.rbac.v3.RBAC` protos -> [`Engine`]. Every field weft does not
//! implement is rejected with its path, so an unsupported policy is NACKed instead of
//! silently allowing or denying more than it says.
// `metadata` and `source_ip` are deprecated in the proto but Istio still generates them.
#![allow(deprecated)]

use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3::{
    permission::Rule, principal::Identifier, rbac::Action as ActionProto, Permission as PermissionProto,
    Policy as PolicyProto, Principal as PrincipalProto, Rbac,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    double_matcher, list_matcher, metadata_matcher::path_segment::Segment, path_matcher, value_matcher,
    MetadataMatcher, PathMatcher, StringMatcher, ValueMatcher,
};

use super::engine::{Action, Cidr, Engine, MetadataMatch, Permission, Policy, Principal, ValueMatch};
use crate::route::matcher::{unsupported, HeaderMatcher, StringMatch};

/// The only metadata namespace weft's RBAC reads: Istio's request authentication result.
pub const ISTIO_AUTHN: &str = "istio_authn";

/// Nesting limit of and/or/not rules (a malicious config must not overflow the stack).
const MAX_DEPTH: usize = 64;

type Res<T> = Result<T, (String, String)>;

/// Compiles a rule set; `at` is its field path (`rules`, `shadow_rules`).
pub fn engine(r: &Rbac, at: &str) -> Res<Engine> {
    let action = match ActionProto::try_from(r.action) {
        Ok(ActionProto::Allow) => Action::Allow,
        Ok(ActionProto::Deny) => Action::Deny,
        Ok(ActionProto::Log) => Action::Log,
        Err(_) => return Err((format!("{at}.action"), format!("unknown action {}", r.action))),
    };
    if r.audit_logging_options.is_some() {
        return Err(unsupported(at, "audit_logging_options"));
    }
    let mut names: Vec<&String> = r.policies.keys().collect();
    names.sort();
    let mut policies = Vec::with_capacity(names.len());
    for name in names {
        let p = &r.policies[name];
        policies.push((name.as_str().into(), policy(p, &format!("{at}.policies[{name:?}]"))?));
    }
    Ok(Engine { action, policies })
}

fn policy(p: &PolicyProto, at: &str) -> Res<Policy> {
    if p.condition.is_some() || p.checked_condition.is_some() || p.cel_config.is_some() {
        return Err((
            format!("{at}.condition"),
            "CEL conditions are not supported by weft; express the rule with permissions and principals".into(),
        ));
    }
    if p.permissions.is_empty() {
        return Err((format!("{at}.permissions"), "at least one permission is required".into()));
    }
    if p.principals.is_empty() {
        return Err((format!("{at}.principals"), "at least one principal is required".into()));
    }
    let permissions = p
        .permissions
        .iter()
        .enumerate()
        .map(|(i, x)| permission(x, &format!("{at}.permissions[{i}]"), 0))
        .collect::<Res<Vec<_>>>()?;
    let principals = p
        .principals
        .iter()
        .enumerate()
        .map(|(i, x)| principal(x, &format!("{at}.principals[{i}]"), 0))
        .collect::<Res<Vec<_>>>()?;
    Ok(Policy { permissions, principals })
}

fn too_deep(at: &str) -> (String, String) {
    (at.to_string(), format!("rules nested deeper than {MAX_DEPTH} levels"))
}

fn permission(p: &PermissionProto, at: &str, depth: usize) -> Res<Permission> {
    if depth > MAX_DEPTH {
        return Err(too_deep(at));
    }
    let set = |rules: &[PermissionProto], field: &str| -> Res<Vec<Permission>> {
        rules.iter().enumerate().map(|(i, r)| permission(r, &format!("{at}.{field}.rules[{i}]"), depth + 1)).collect()
    };
    Ok(match &p.rule {
        None => return Err((format!("{at}.rule"), "a permission rule is required".into())),
        Some(Rule::Any(true)) => Permission::Any,
        Some(Rule::Any(false)) => {
            return Err((format!("{at}.any"), "any must be true (Envoy rejects false)".into()));
        }
        Some(Rule::AndRules(s)) => Permission::And(set(&s.rules, "and_rules")?),
        Some(Rule::OrRules(s)) => Permission::Or(set(&s.rules, "or_rules")?),
        Some(Rule::NotRule(r)) => Permission::Not(Box::new(permission(r, &format!("{at}.not_rule"), depth + 1)?)),
        Some(Rule::Header(h)) => Permission::Header(HeaderMatcher::compile(h, &format!("{at}.header"))?),
        Some(Rule::UrlPath(m)) => Permission::UrlPath(path(m, &format!("{at}.url_path"))?),
        Some(Rule::DestinationIp(c)) => Permission::DestinationIp(cidr(c, &format!("{at}.destination_ip"))?),
        Some(Rule::DestinationPort(port)) => {
            if *port > 65535 {
                return Err((format!("{at}.destination_port"), format!("{port} is not a port")));
            }
            Permission::DestinationPort(*port)
        }
        Some(Rule::DestinationPortRange(r)) => {
            if r.start > r.end {
                return Err((
                    format!("{at}.destination_port_range"),
                    format!("start {} must not exceed end {}", r.start, r.end),
                ));
            }
            Permission::DestinationPortRange(i64::from(r.start), i64::from(r.end))
        }
        Some(Rule::RequestedServerName(m)) => {
            Permission::RequestedServerName(string(m, &format!("{at}.requested_server_name"))?)
        }
        Some(Rule::Metadata(m)) => Permission::Metadata(metadata(m, &format!("{at}.metadata"))?),
        Some(Rule::Matcher(_)) => return Err(unsupported(at, "matcher")),
        Some(Rule::UriTemplate(_)) => return Err(unsupported(at, "uri_template")),
        Some(Rule::SourcedMetadata(_)) => return Err(unsupported(at, "sourced_metadata")),
    })
}

fn principal(p: &PrincipalProto, at: &str, depth: usize) -> Res<Principal> {
    if depth > MAX_DEPTH {
        return Err(too_deep(at));
    }
    let set = |ids: &[PrincipalProto], field: &str| -> Res<Vec<Principal>> {
        ids.iter().enumerate().map(|(i, r)| principal(r, &format!("{at}.{field}.ids[{i}]"), depth + 1)).collect()
    };
    Ok(match &p.identifier {
        None => return Err((format!("{at}.identifier"), "a principal identifier is required".into())),
        Some(Identifier::Any(true)) => Principal::Any,
        Some(Identifier::Any(false)) => {
            return Err((format!("{at}.any"), "any must be true (Envoy rejects false)".into()));
        }
        Some(Identifier::AndIds(s)) => Principal::And(set(&s.ids, "and_ids")?),
        Some(Identifier::OrIds(s)) => Principal::Or(set(&s.ids, "or_ids")?),
        Some(Identifier::NotId(r)) => Principal::Not(Box::new(principal(r, &format!("{at}.not_id"), depth + 1)?)),
        Some(Identifier::Authenticated(a)) => Principal::Authenticated(match &a.principal_name {
            Some(m) => Some(string(m, &format!("{at}.authenticated.principal_name"))?),
            None => None,
        }),
        Some(Identifier::SourceIp(c)) => Principal::DirectRemoteIp(cidr(c, &format!("{at}.source_ip"))?),
        Some(Identifier::DirectRemoteIp(c)) => Principal::DirectRemoteIp(cidr(c, &format!("{at}.direct_remote_ip"))?),
        Some(Identifier::RemoteIp(c)) => Principal::RemoteIp(cidr(c, &format!("{at}.remote_ip"))?),
        Some(Identifier::Header(h)) => Principal::Header(HeaderMatcher::compile(h, &format!("{at}.header"))?),
        Some(Identifier::UrlPath(m)) => Principal::UrlPath(path(m, &format!("{at}.url_path"))?),
        Some(Identifier::Metadata(m)) => Principal::Metadata(metadata(m, &format!("{at}.metadata"))?),
        Some(Identifier::FilterState(_)) => return Err(unsupported(at, "filter_state")),
        Some(Identifier::SourcedMetadata(_)) => return Err(unsupported(at, "sourced_metadata")),
        Some(Identifier::Custom(_)) => return Err(unsupported(at, "custom")),
    })
}

fn string(m: &StringMatcher, at: &str) -> Res<StringMatch> {
    StringMatch::compile(m, at)
}

fn path(m: &PathMatcher, at: &str) -> Res<StringMatch> {
    match &m.rule {
        Some(path_matcher::Rule::Path(s)) => string(s, &format!("{at}.path")),
        None => Err((format!("{at}.path"), "a path string matcher is required".into())),
    }
}

fn cidr(c: &CidrRange, at: &str) -> Res<Cidr> {
    let net: IpAddr = c
        .address_prefix
        .parse()
        .map_err(|_| (format!("{at}.address_prefix"), format!("{:?} is not an IP address", c.address_prefix)))?;
    let max = if net.is_ipv4() { 32 } else { 128 };
    // Envoy: an unset prefix_len is 0 (the whole address family).
    let len = c.prefix_len.as_ref().map_or(0, |l| l.value);
    if len > max {
        return Err((format!("{at}.prefix_len"), format!("{len} exceeds {max}")));
    }
    Ok(Cidr { net, len: len as u8 })
}

fn metadata(m: &MetadataMatcher, at: &str) -> Res<MetadataMatch> {
    if m.filter != ISTIO_AUTHN {
        return Err((
            format!("{at}.filter"),
            format!(
                "metadata of filter {:?} is not available in weft; only {ISTIO_AUTHN:?} (request authentication) is",
                m.filter
            ),
        ));
    }
    let path = m
        .path
        .iter()
        .enumerate()
        .map(|(i, s)| match &s.segment {
            Some(Segment::Key(k)) if !k.is_empty() => Ok(k.clone()),
            _ => Err((format!("{at}.path[{i}].key"), "a non-empty key is required".to_string())),
        })
        .collect::<Res<Vec<_>>>()?;
    if path.is_empty() {
        return Err((format!("{at}.path"), "at least one path segment is required".into()));
    }
    let value = match &m.value {
        Some(v) => value(v, &format!("{at}.value"), 0)?,
        None => return Err((format!("{at}.value"), "a value matcher is required".into())),
    };
    Ok(MetadataMatch { path, value, invert: m.invert })
}

fn value(v: &ValueMatcher, at: &str, depth: usize) -> Res<ValueMatch> {
    if depth > MAX_DEPTH {
        return Err(too_deep(at));
    }
    use value_matcher::MatchPattern as P;
    Ok(match &v.match_pattern {
        None => return Err((format!("{at}.match_pattern"), "a value match pattern is required".into())),
        Some(P::NullMatch(_)) => ValueMatch::Null,
        Some(P::DoubleMatch(d)) => match &d.match_pattern {
            Some(double_matcher::MatchPattern::Exact(x)) => ValueMatch::DoubleExact(*x),
            Some(double_matcher::MatchPattern::Range(r)) => ValueMatch::DoubleRange(r.start, r.end),
            None => return Err((format!("{at}.double_match"), "range or exact is required".into())),
        },
        Some(P::StringMatch(s)) => ValueMatch::String(string(s, &format!("{at}.string_match"))?),
        Some(P::BoolMatch(b)) => ValueMatch::Bool(*b),
        Some(P::PresentMatch(b)) => ValueMatch::Present(*b),
        Some(P::ListMatch(l)) => match &l.match_pattern {
            Some(list_matcher::MatchPattern::OneOf(inner)) => {
                ValueMatch::ListOneOf(Box::new(value(inner, &format!("{at}.list_match.one_of"), depth + 1)?))
            }
            None => return Err((format!("{at}.list_match"), "one_of is required".into())),
        },
        Some(P::OrMatch(o)) => ValueMatch::Or(
            o.value_matchers
                .iter()
                .enumerate()
                .map(|(i, m)| value(m, &format!("{at}.or_match.value_matchers[{i}]"), depth + 1))
                .collect::<Res<Vec<_>>>()?,
        ),
    })
}
