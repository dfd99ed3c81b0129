//! AuthorizationPolicy -> Envoy RBAC filters on the proxy's inbound listeners, with
//! Istio's semantics (istio/istio `pilot/pkg/security/authz/builder` and `model`):
//!
//! - Selection: a policy in the root namespace without selector applies mesh-wide; one
//!   in the proxy's namespace without selector to every workload there; a
//!   `selector.matchLabels` (root namespace: in any namespace) to workloads carrying
//!   those labels. Policies with `targetRef(s)` address gateways / waypoints and are
//!   skipped for sidecars.
//! - One RBAC filter per action, in the order CUSTOM, AUDIT (`LOG`), DENY, ALLOW.
//!   CUSTOM needs an ext_authz provider weft does not have: like Istio with an unusable
//!   provider, its rules become DENY rules. Policies annotated `istio.io/dry-run: "true"`
//!   go to `shadow_rules` (stat prefix `istio_dry_run_allow_` / `istio_dry_run_deny_`).
//! - Each rule is one policy `ns[NS]-policy[NAME]-rule[I]`: permissions are the `to`
//!   operations (each the AND of its fields and the `when` conditions on the
//!   destination), principals the `from` sources (AND of fields and the other
//!   conditions); a missing side is `any`. A policy without rules never matches (ALLOW:
//!   deny everything; DENY: deny nothing); `rules: [{}]` matches everything.
//! - Values: `*` any (non-empty), `x*` prefix, `*x` suffix, else exact; `notValues` are
//!   ORed under a NOT. Principals get `spiffe://`; namespaces match the principal with
//!   `.*/ns/NS/.*`; hosts are case-insensitive and match with or without a port.
//! - TCP (network filter, stat prefix `tcp.`): HTTP-only fields (hosts, methods, paths,
//!   request principals, headers, `request.auth.*`) make an ALLOW rule match nothing
//!   (the rule is dropped) and are ignored in DENY/AUDIT rules (the rule gets wider), as
//!   Istio documents. Unknown `when` keys and invalid values are handled the same way.

use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter};
use envoy_types::pb::envoy::config::rbac::v3::{
    permission, principal, rbac::Action, Permission, Policy, Principal, Rbac,
};
use envoy_types::pb::envoy::config::route::v3::{header_matcher, HeaderMatcher};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter, HttpConnectionManager, HttpFilter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    list_matcher, metadata_matcher, path_matcher, string_matcher::MatchPattern, value_matcher, ListMatcher,
    MetadataMatcher, PathMatcher, RegexMatcher, StringMatcher, ValueMatcher,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use envoy_types::util::pack_any;
use weft_api::spec::{AuthorizationPolicy, AuthzAction, Rule};
use weft_api::{ObjectMeta, Spec};

use super::model::MeshView;

/// Annotation that turns a policy into a dry run (shadow rules).
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";
/// Shadow stat prefix of dry-run ALLOW policies.
pub const DRY_RUN_ALLOW_PREFIX: &str = "istio_dry_run_allow_";
/// Shadow stat prefix of dry-run DENY policies.
pub const DRY_RUN_DENY_PREFIX: &str = "istio_dry_run_deny_";
/// Stat prefix of the network RBAC filters.
pub const TCP_STAT_PREFIX: &str = "tcp.";
/// Name of the HTTP RBAC filter.
pub const HTTP_FILTER_NAME: &str = "envoy.filters.http.rbac";
/// Name of the network RBAC filter.
pub const NETWORK_FILTER_NAME: &str = "envoy.filters.network.rbac";
/// Metadata namespace of request authentication (JWT) results.
const ISTIO_AUTHN: &str = "istio_authn";

/// The RBAC filters of one proxy's inbound listeners.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InboundAuthz {
    /// HTTP filters, to go first in each inbound connection manager.
    pub http: Vec<HttpFilter>,
    /// Network filters, to go before each inbound `tcp_proxy`.
    pub tcp: Vec<Filter>,
}

/// Policies of one action.
#[derive(Default)]
struct Group<'a> {
    policies: Vec<(&'a ObjectMeta, &'a AuthorizationPolicy)>,
}

/// What the rules are built for.
#[derive(Debug, Clone, Copy)]
struct Ctx {
    /// A network filter (TCP port).
    tcp: bool,
    /// The workload port, when the listener's own port is not it.
    port: Option<u32>,
}

/// Why a value could not become a matcher.
#[derive(Debug)]
struct Skip;

impl InboundAuthz {
    /// The filters the policies selecting `view`'s proxy call for. `port`: the workload
    /// port a listener serves when the proxy cannot see it as the destination (explicit
    /// mode: the inbound listener has its own port), so `ports` / `destination.port` are
    /// decided here, as Istio does for waypoints; `None` leaves them to the proxy.
    pub fn new(view: &MeshView<'_>, port: Option<u32>) -> InboundAuthz {
        let (mut custom, mut audit, mut deny, mut allow) =
            (Group::default(), Group::default(), Group::default(), Group::default());
        for r in &view.mesh.resources {
            let Spec::AuthorizationPolicy(ap) = &r.spec else { continue };
            if !selects(view, &r.meta, ap) {
                continue;
            }
            let group = match ap.action {
                AuthzAction::Custom => &mut custom,
                AuthzAction::Audit => &mut audit,
                AuthzAction::Deny => &mut deny,
                AuthzAction::Allow => &mut allow,
            };
            group.policies.push((&r.meta, ap));
        }
        let groups = [(custom, Action::Deny), (audit, Action::Log), (deny, Action::Deny), (allow, Action::Allow)];
        let mut out = InboundAuthz::default();
        for (group, action) in &groups {
            if group.policies.is_empty() {
                continue;
            }
            let (rules, shadow) = group.build(*action, Ctx { tcp: false, port });
            out.http.push(HttpFilter {
                name: HTTP_FILTER_NAME.into(),
                config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(HttpRbac {
                    shadow_rules_stat_prefix: shadow_prefix(shadow.as_ref()),
                    rules,
                    shadow_rules: shadow,
                    ..Default::default()
                }))),
                ..Default::default()
            });
            let (rules, shadow) = group.build(*action, Ctx { tcp: true, port });
            out.tcp.push(Filter {
                name: NETWORK_FILTER_NAME.into(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(NetworkRbac {
                    stat_prefix: TCP_STAT_PREFIX.into(),
                    shadow_rules_stat_prefix: shadow_prefix(shadow.as_ref()),
                    rules,
                    shadow_rules: shadow,
                    ..Default::default()
                }))),
            });
        }
        out
    }

    /// Puts the HTTP filters first in `hcm`'s chain (before CORS, fault, router).
    pub fn apply_http(&self, hcm: &mut HttpConnectionManager) {
        hcm.http_filters.splice(0..0, self.http.iter().cloned());
    }

    /// Puts the network filters first in a TCP filter chain (before `tcp_proxy`).
    pub fn apply_tcp(&self, filters: &mut Vec<Filter>) {
        filters.splice(0..0, self.tcp.iter().cloned());
    }
}

impl Group<'_> {
    /// Enforced and shadow rule sets (each `None` when no policy of that kind).
    fn build(&self, action: Action, cx: Ctx) -> (Option<Rbac>, Option<Rbac>) {
        let mut enforced: Option<Rbac> = None;
        let mut shadow: Option<Rbac> = None;
        for (meta, ap) in &self.policies {
            let target = if dry_run(meta) { &mut shadow } else { &mut enforced };
            let set = target.get_or_insert_with(|| Rbac { action: action as i32, ..Default::default() });
            for (i, rule) in ap.rules.iter().enumerate() {
                if let Some(p) = policy(rule, action, cx) {
                    set.policies.insert(policy_name(meta, i), p);
                }
            }
            if ap.rules.is_empty() {
                set.policies.insert(policy_name(meta, 0), match_never());
            }
        }
        (enforced, shadow)
    }
}

/// Whether `ap` (with `meta`) applies to the proxy of `view`.
fn selects(view: &MeshView<'_>, meta: &ObjectMeta, ap: &AuthorizationPolicy) -> bool {
    if ap.target_ref.is_some() || !ap.target_refs.is_empty() {
        return false;
    }
    let root = meta.namespace == view.mesh.root_namespace;
    if !root && meta.namespace != view.node.namespace {
        return false;
    }
    match &ap.selector {
        None => true,
        Some(sel) => sel.match_labels.iter().all(|(k, v)| view.node.labels.get(k) == Some(v)),
    }
}

fn dry_run(meta: &ObjectMeta) -> bool {
    // Go's strconv.ParseBool, as Istio reads the annotation.
    matches!(
        meta.annotations.get(DRY_RUN_ANNOTATION).map(String::as_str),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True")
    )
}

fn shadow_prefix(shadow: Option<&Rbac>) -> String {
    match shadow.map(|s| Action::try_from(s.action)) {
        Some(Ok(Action::Allow)) => DRY_RUN_ALLOW_PREFIX.into(),
        Some(Ok(Action::Deny)) => DRY_RUN_DENY_PREFIX.into(),
        _ => String::new(),
    }
}

/// `ns[NS]-policy[NAME]-rule[I]`.
pub fn policy_name(meta: &ObjectMeta, rule: usize) -> String {
    format!("ns[{}]-policy[{}]-rule[{rule}]", meta.namespace, meta.name)
}

fn match_never() -> Policy {
    Policy {
        permissions: vec![Permission {
            rule: Some(permission::Rule::NotRule(Box::new(Permission { rule: Some(permission::Rule::Any(true)) }))),
        }],
        principals: vec![Principal {
            identifier: Some(principal::Identifier::NotId(Box::new(Principal {
                identifier: Some(principal::Identifier::Any(true)),
            }))),
        }],
        ..Default::default()
    }
}

/// Which matcher an attribute becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attr<'a> {
    // Permissions (what is accessed).
    Host,
    Method,
    Path,
    DestPort,
    DestIp,
    Sni,
    // Principals (who accesses).
    SrcPrincipal,
    SrcNamespace,
    SrcIp,
    RemoteIp,
    RequestPrincipal,
    RequestAudiences,
    RequestPresenter,
    RequestHeader(&'a str),
    RequestClaim(&'a str),
    /// A key weft cannot translate.
    Unknown,
}

/// One attribute's accepted and rejected values.
struct Item<'a> {
    attr: Attr<'a>,
    values: &'a [String],
    not_values: &'a [String],
}

/// One rule as Istio's model sees it: a policy, or `None` when the rule is dropped.
fn policy(rule: &Rule, action: Action, cx: Ctx) -> Option<Policy> {
    let mut base_perm = Vec::new();
    let mut base_prin = Vec::new();
    for c in &rule.when {
        let attr = when_attr(&c.key);
        let item = Item { attr, values: &c.values, not_values: &c.not_values };
        if attr.is_permission() {
            base_perm.push(item);
        } else {
            base_prin.push(item);
        }
    }
    let item = |attr, values, not_values| Item { attr, values, not_values };
    let mut permissions = Vec::new();
    for to in &rule.to {
        let o = &to.operation;
        let mut items = vec![
            item(Attr::Host, &o.hosts[..], &o.not_hosts[..]),
            item(Attr::Method, &o.methods, &o.not_methods),
            item(Attr::Path, &o.paths, &o.not_paths),
            item(Attr::DestPort, &o.ports, &o.not_ports),
        ];
        items.extend(base_perm.iter().map(|i| item(i.attr, i.values, i.not_values)));
        permissions.push(and_permissions(&items, action, cx)?);
    }
    if rule.to.is_empty() {
        permissions.push(and_permissions(&base_perm, action, cx)?);
    }
    let mut principals = Vec::new();
    for from in &rule.from {
        let s = &from.source;
        let mut items = vec![
            item(Attr::SrcPrincipal, &s.principals[..], &s.not_principals[..]),
            item(Attr::RequestPrincipal, &s.request_principals, &s.not_request_principals),
            item(Attr::SrcNamespace, &s.namespaces, &s.not_namespaces),
            item(Attr::RemoteIp, &s.remote_ip_blocks, &s.not_remote_ip_blocks),
            item(Attr::SrcIp, &s.ip_blocks, &s.not_ip_blocks),
        ];
        items.extend(base_prin.iter().map(|i| item(i.attr, i.values, i.not_values)));
        principals.push(and_principals(&items, action, cx.tcp)?);
    }
    if rule.from.is_empty() {
        principals.push(and_principals(&base_prin, action, cx.tcp)?);
    }
    Some(Policy { permissions, principals, ..Default::default() })
}

/// Istio's `checkError`: an untranslatable value drops the whole rule of an ALLOW
/// policy (`None`) and is ignored in DENY / AUDIT policies (`Some(None)`).
fn check<T>(r: Result<T, Skip>, action: Action) -> Option<Option<T>> {
    match r {
        Ok(t) => Some(Some(t)),
        Err(Skip) if action == Action::Allow => None,
        Err(Skip) => Some(None),
    }
}

fn and_permissions(items: &[Item<'_>], action: Action, cx: Ctx) -> Option<Permission> {
    let mut and = Vec::new();
    for it in items {
        let mut or = Vec::new();
        for v in it.values {
            or.extend(check(permission_for(it.attr, v, cx), action)?);
        }
        if !or.is_empty() {
            and.push(perm(permission::Rule::OrRules(permission::Set { rules: or })));
        }
        let mut not = Vec::new();
        for v in it.not_values {
            not.extend(check(permission_for(it.attr, v, cx), action)?);
        }
        if !not.is_empty() {
            let or = perm(permission::Rule::OrRules(permission::Set { rules: not }));
            and.push(perm(permission::Rule::NotRule(Box::new(or))));
        }
    }
    if and.is_empty() {
        and.push(perm(permission::Rule::Any(true)));
    }
    Some(perm(permission::Rule::AndRules(permission::Set { rules: and })))
}

fn and_principals(items: &[Item<'_>], action: Action, tcp: bool) -> Option<Principal> {
    let mut and = Vec::new();
    for it in items {
        let mut or = Vec::new();
        for v in it.values {
            or.extend(check(principal_for(it.attr, v, tcp), action)?);
        }
        if !or.is_empty() {
            and.push(prin(principal::Identifier::OrIds(principal::Set { ids: or })));
        }
        let mut not = Vec::new();
        for v in it.not_values {
            not.extend(check(principal_for(it.attr, v, tcp), action)?);
        }
        if !not.is_empty() {
            let or = prin(principal::Identifier::OrIds(principal::Set { ids: not }));
            and.push(prin(principal::Identifier::NotId(Box::new(or))));
        }
    }
    if and.is_empty() {
        and.push(prin(principal::Identifier::Any(true)));
    }
    Some(prin(principal::Identifier::AndIds(principal::Set { ids: and })))
}

fn perm(r: permission::Rule) -> Permission {
    Permission { rule: Some(r) }
}

fn prin(i: principal::Identifier) -> Principal {
    Principal { identifier: Some(i) }
}

fn when_attr(key: &str) -> Attr<'_> {
    match key {
        "destination.ip" => Attr::DestIp,
        "destination.port" => Attr::DestPort,
        "connection.sni" => Attr::Sni,
        "source.ip" => Attr::SrcIp,
        "remote.ip" => Attr::RemoteIp,
        "source.namespace" => Attr::SrcNamespace,
        "source.principal" => Attr::SrcPrincipal,
        "request.auth.principal" => Attr::RequestPrincipal,
        "request.auth.audiences" => Attr::RequestAudiences,
        "request.auth.presenter" => Attr::RequestPresenter,
        _ => {
            if let Some(name) = key.strip_prefix("request.headers[").and_then(|r| r.strip_suffix(']')) {
                if !name.is_empty() && !name.contains(['[', ']']) {
                    return Attr::RequestHeader(name);
                }
            }
            if let Some(claims) = key.strip_prefix("request.auth.claims[").and_then(|r| r.strip_suffix(']')) {
                if !claims.is_empty() && claims.split("][").all(|c| !c.is_empty() && !c.contains(['[', ']'])) {
                    return Attr::RequestClaim(claims);
                }
            }
            Attr::Unknown
        }
    }
}

impl Attr<'_> {
    fn is_permission(self) -> bool {
        matches!(self, Attr::Host | Attr::Method | Attr::Path | Attr::DestPort | Attr::DestIp | Attr::Sni)
    }

    fn http_only(self) -> bool {
        matches!(
            self,
            Attr::Host
                | Attr::Method
                | Attr::Path
                | Attr::RequestPrincipal
                | Attr::RequestAudiences
                | Attr::RequestPresenter
                | Attr::RequestHeader(_)
                | Attr::RequestClaim(_)
        )
    }
}

fn permission_for(attr: Attr<'_>, v: &str, cx: Ctx) -> Result<Permission, Skip> {
    if cx.tcp && attr.http_only() {
        return Err(Skip);
    }
    if let (Attr::DestPort, Some(known)) = (attr, cx.port) {
        let any = perm(permission::Rule::Any(true));
        return Ok(if port(v)? == known { any } else { perm(permission::Rule::NotRule(Box::new(any))) });
    }
    Ok(perm(match attr {
        Attr::Host => permission::Rule::Header(host_matcher(v)),
        Attr::Method => permission::Rule::Header(header_matcher(":method", v)),
        Attr::Path => {
            permission::Rule::UrlPath(PathMatcher { rule: Some(path_matcher::Rule::Path(path_matcher_for(v))) })
        }
        Attr::DestPort => permission::Rule::DestinationPort(port(v)?),
        Attr::DestIp => permission::Rule::DestinationIp(cidr(v)?),
        Attr::Sni => permission::Rule::RequestedServerName(string_matcher(v, "")),
        _ => return Err(Skip),
    }))
}

fn principal_for(attr: Attr<'_>, v: &str, tcp: bool) -> Result<Principal, Skip> {
    if tcp && attr.http_only() {
        return Err(Skip);
    }
    let authenticated = |m| principal::Identifier::Authenticated(principal::Authenticated { principal_name: Some(m) });
    Ok(prin(match attr {
        Attr::SrcPrincipal => authenticated(string_matcher(v, "spiffe://")),
        Attr::SrcNamespace => authenticated(regex(&format!(".*/ns/{}/.*", v.replace('*', ".*")))),
        Attr::SrcIp => principal::Identifier::DirectRemoteIp(cidr(v)?),
        Attr::RemoteIp => principal::Identifier::RemoteIp(cidr(v)?),
        Attr::RequestPrincipal => metadata(&["request.auth.principal"], string_value(v)),
        Attr::RequestAudiences => metadata(&["request.auth.audiences"], string_value(v)),
        Attr::RequestPresenter => metadata(&["request.auth.presenter"], string_value(v)),
        Attr::RequestHeader(name) => principal::Identifier::Header(header_matcher(name, v)),
        Attr::RequestClaim(claims) => {
            let mut path = vec!["request.auth.claims"];
            path.extend(claims.split("]["));
            metadata(
                &path,
                value_matcher::MatchPattern::ListMatch(Box::new(ListMatcher {
                    match_pattern: Some(list_matcher::MatchPattern::OneOf(Box::new(ValueMatcher {
                        match_pattern: Some(string_value(v)),
                    }))),
                })),
            )
        }
        _ => return Err(Skip),
    }))
}

// `metadata` is deprecated in favour of `sourced_metadata`; Istio still emits it.
#[allow(deprecated)]
fn metadata(path: &[&str], value: value_matcher::MatchPattern) -> principal::Identifier {
    principal::Identifier::Metadata(MetadataMatcher {
        filter: ISTIO_AUTHN.into(),
        path: path
            .iter()
            .map(|k| metadata_matcher::PathSegment {
                segment: Some(metadata_matcher::path_segment::Segment::Key(k.to_string())),
            })
            .collect(),
        value: Some(ValueMatcher { match_pattern: Some(value) }),
        invert: false,
    })
}

fn string_value(v: &str) -> value_matcher::MatchPattern {
    value_matcher::MatchPattern::StringMatch(string_matcher(v, ""))
}

fn regex(r: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher { regex: r.into(), ..Default::default() })),
        ..Default::default()
    }
}

fn sm(p: MatchPattern, ignore_case: bool) -> StringMatcher {
    StringMatcher { match_pattern: Some(p), ignore_case }
}

/// Istio's `StringMatcherWithPrefix`: `*` -> `.+`, `*x` -> suffix (regex after a
/// prefix), `x*` -> prefix, else exact; `prefix` is put in front.
fn string_matcher(v: &str, prefix: &str) -> StringMatcher {
    if v == "*" {
        regex(".+")
    } else if let Some(rest) = v.strip_prefix('*') {
        if prefix.is_empty() {
            sm(MatchPattern::Suffix(rest.into()), false)
        } else {
            regex(&format!("{}.*{}", regex_escape(prefix), regex_escape(rest)))
        }
    } else if let Some(rest) = v.strip_suffix('*') {
        sm(MatchPattern::Prefix(format!("{prefix}{rest}")), false)
    } else {
        sm(MatchPattern::Exact(format!("{prefix}{v}")), false)
    }
}

/// Paths: Istio's string matching, plus path templates (`{*}` one segment, `{**}` any
/// rest) as a regex.
fn path_matcher_for(v: &str) -> StringMatcher {
    if !v.contains("{*}") && !v.contains("{**}") {
        return string_matcher(v, "");
    }
    let mut out = String::new();
    let mut rest = v;
    while let Some(i) = rest.find('{') {
        out.push_str(&regex_escape(&rest[..i]));
        if let Some(r) = rest[i..].strip_prefix("{**}") {
            out.push_str(".*");
            rest = r;
        } else if let Some(r) = rest[i..].strip_prefix("{*}") {
            out.push_str("[^/]+");
            rest = r;
        } else {
            out.push_str("\\{");
            rest = &rest[i + 1..];
        }
    }
    out.push_str(&regex_escape(rest));
    regex(&out)
}

/// Istio's `HeaderMatcher`: `*` present, `*x` suffix, `x*` prefix, else exact.
fn header_matcher(name: &str, v: &str) -> HeaderMatcher {
    let spec = if v == "*" {
        header_matcher::HeaderMatchSpecifier::PresentMatch(true)
    } else {
        header_matcher::HeaderMatchSpecifier::StringMatch(if let Some(rest) = v.strip_prefix('*') {
            sm(MatchPattern::Suffix(rest.into()), false)
        } else if let Some(rest) = v.strip_suffix('*') {
            sm(MatchPattern::Prefix(rest.into()), false)
        } else {
            sm(MatchPattern::Exact(v.into()), false)
        })
    };
    HeaderMatcher { name: name.into(), header_match_specifier: Some(spec), ..Default::default() }
}

/// `:authority` matching: case-insensitive; a host without a port also matches the
/// authority with any port (`httpbin.foo` matches `httpbin.foo:8000`).
fn host_matcher(v: &str) -> HeaderMatcher {
    let has_port =
        v.rsplit_once(':').is_some_and(|(_, p)| p == "*" || (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())));
    let spec = if v == "*" {
        header_matcher::HeaderMatchSpecifier::PresentMatch(true)
    } else if let Some(rest) = v.strip_suffix('*') {
        header_matcher::HeaderMatchSpecifier::StringMatch(sm(MatchPattern::Prefix(rest.into()), true))
    } else if has_port {
        header_matcher::HeaderMatchSpecifier::StringMatch(match v.strip_prefix('*') {
            Some(rest) => sm(MatchPattern::Suffix(rest.into()), true),
            None => sm(MatchPattern::Exact(v.into()), true),
        })
    } else {
        let body = match v.strip_prefix('*') {
            Some(rest) => format!(".*{}", regex_escape(rest)),
            None => regex_escape(v),
        };
        header_matcher::HeaderMatchSpecifier::StringMatch(regex(&format!("(?i){body}(:[0-9]+)?")))
    };
    HeaderMatcher { name: ":authority".into(), header_match_specifier: Some(spec), ..Default::default() }
}

fn port(v: &str) -> Result<u32, Skip> {
    v.parse::<u32>().ok().filter(|p| *p <= 65535).ok_or(Skip)
}

/// `10.1.2.3` (a /32 or /128) or `10.1.0.0/16`.
fn cidr(v: &str) -> Result<CidrRange, Skip> {
    let (addr, len) = match v.split_once('/') {
        Some((a, l)) => (a, Some(l.parse::<u32>().map_err(|_| Skip)?)),
        None => (v, None),
    };
    let ip: IpAddr = addr.parse().map_err(|_| Skip)?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    if len > max {
        return Err(Skip);
    }
    Ok(CidrRange { address_prefix: ip.to_string(), prefix_len: Some(UInt32Value { value: len }) })
}

/// RE2 / regex-crate escaping of a literal.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests;
