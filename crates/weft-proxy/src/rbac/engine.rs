//! The RBAC engine: compiled policies (permissions x principals) and their evaluation
//! against one request or connection, with Envoy's semantics
//! (`envoy.config.rbac.v3.RBAC`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde_json::Value;

use crate::net::in_range;
use crate::route::matcher::{HeaderMatcher, RequestView, StringMatch};

/// What a rule set does with requests its policies match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Allowed iff some policy matches.
    Allow,
    /// Denied iff some policy matches.
    Deny,
    /// Never blocks; a match marks the request for the access log.
    Log,
}

/// A compiled rule set: an action and named policies, kept sorted by name (Envoy keeps
/// them in a sorted map, so the first match, the "effective policy", is deterministic).
#[derive(Debug)]
pub struct Engine {
    pub(crate) action: Action,
    pub(crate) policies: Vec<(Arc<str>, Policy)>,
}

/// A policy: matches when any permission and any principal match.
#[derive(Debug)]
pub struct Policy {
    pub(crate) permissions: Vec<Permission>,
    pub(crate) principals: Vec<Principal>,
}

/// What is being accessed (Envoy's `Permission`).
#[derive(Debug)]
pub enum Permission {
    /// `any: true`.
    Any,
    /// `and_rules`: all match.
    And(Vec<Permission>),
    /// `or_rules`: one matches.
    Or(Vec<Permission>),
    /// `not_rule`.
    Not(Box<Permission>),
    /// `header` (pseudo headers `:method`, `:path`, `:authority`, `:scheme` included).
    Header(HeaderMatcher),
    /// `url_path`: the path without query and fragment.
    UrlPath(StringMatch),
    /// `destination_ip`.
    DestinationIp(Cidr),
    /// `destination_port`.
    DestinationPort(u32),
    /// `destination_port_range`: `[start, end)`.
    DestinationPortRange(i64, i64),
    /// `requested_server_name`: the SNI, empty without TLS.
    RequestedServerName(StringMatch),
    /// `metadata`.
    Metadata(MetadataMatch),
}

/// Who is accessing (Envoy's `Principal`).
#[derive(Debug)]
pub enum Principal {
    /// `any: true`.
    Any,
    /// `and_ids`.
    And(Vec<Principal>),
    /// `or_ids`.
    Or(Vec<Principal>),
    /// `not_id`.
    Not(Box<Principal>),
    /// `authenticated`: the connection has a verified peer certificate whose principal
    /// (URI SAN) matches, or any such peer when no name is given.
    Authenticated(Option<StringMatch>),
    /// `direct_remote_ip` (and the deprecated `source_ip`): the connection's peer.
    DirectRemoteIp(Cidr),
    /// `remote_ip`: the original client (the last `x-forwarded-for` entry, else the peer).
    RemoteIp(Cidr),
    /// `header`.
    Header(HeaderMatcher),
    /// `url_path`.
    UrlPath(StringMatch),
    /// `metadata`.
    Metadata(MetadataMatch),
}

/// An address range.
#[derive(Debug, Clone, Copy)]
pub struct Cidr {
    pub(crate) net: IpAddr,
    pub(crate) len: u8,
}

/// Envoy's `MetadataMatcher`, over the metadata weft knows: `istio_authn` (the request's
/// authentication result, [`RequestAuth`]).
#[derive(Debug)]
pub struct MetadataMatch {
    pub(crate) path: Vec<String>,
    pub(crate) value: ValueMatch,
    pub(crate) invert: bool,
}

/// Envoy's `ValueMatcher`.
#[derive(Debug)]
pub enum ValueMatch {
    /// `null_match`.
    Null,
    /// `double_match` range `[start, end)`.
    DoubleRange(f64, f64),
    /// `double_match` exact.
    DoubleExact(f64),
    /// `string_match`.
    String(StringMatch),
    /// `bool_match`.
    Bool(bool),
    /// `present_match`.
    Present(bool),
    /// `list_match.one_of`: the value is a list and one element matches.
    ListOneOf(Box<ValueMatch>),
    /// `or_match`.
    Or(Vec<ValueMatch>),
}

/// What request authentication (JWT, `RequestAuthentication`) established about a
/// request; the RBAC `metadata` matchers on filter `istio_authn` read it, with the keys
/// Istio's authn filter writes:
///
/// | key | value |
/// |---|---|
/// | `request.auth.principal` | `principal` (`<iss>/<sub>`) |
/// | `request.auth.audiences` | `audiences` (a string when there is one, else a list) |
/// | `request.auth.presenter` | `presenter` (`azp`) |
/// | `request.auth.claims` `<name>` ... | the claim; a string claim reads as a one-element list, as Istio stores claims |
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestAuth {
    /// `<iss>/<sub>` of the validated token.
    pub principal: Option<String>,
    /// `aud`.
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    /// The token's claims.
    pub claims: serde_json::Map<String, Value>,
}

/// The HTTP side of an RBAC input.
pub(crate) struct HttpInput<'a> {
    /// The request as route matchers see it.
    pub(crate) view: RequestView<'a>,
}

/// Everything the engine reads about one request (HTTP filter) or connection (network
/// filter).
pub struct RbacInput<'a> {
    /// Peer of the downstream connection.
    pub peer: SocketAddr,
    /// Local (or original) destination of the connection.
    pub destination: SocketAddr,
    /// The verified peer certificate's principal (`spiffe://...`).
    pub peer_principal: Option<&'a str>,
    /// TLS SNI of the connection.
    pub server_name: Option<&'a str>,
    /// The request, for the HTTP filter; `None` for the network filter.
    pub(crate) http: Option<HttpInput<'a>>,
    /// The request's authentication result, when a JWT was validated.
    pub auth: Option<&'a RequestAuth>,
}

impl Engine {
    /// The name of the first policy (by name) matching `input`.
    pub fn first_match(&self, input: &RbacInput<'_>) -> Option<&str> {
        self.first_match_named(input).map(|n| &**n)
    }

    /// [`Engine::first_match`], the name shared (the access-log metadata keeps it
    /// without a copy per request).
    pub(crate) fn first_match_named(&self, input: &RbacInput<'_>) -> Option<&Arc<str>> {
        self.policies.iter().find(|(_, p)| p.matches(input)).map(|(n, _)| n)
    }

    /// Envoy's decision: whether the request is allowed, and the effective policy (the
    /// matching one, when a policy matched).
    pub fn decide(&self, input: &RbacInput<'_>) -> (bool, Option<&str>) {
        let (allowed, matched) = self.decide_named(input);
        (allowed, matched.map(|n| &**n))
    }

    /// [`Engine::decide`] with the policy's name shared.
    pub(crate) fn decide_named(&self, input: &RbacInput<'_>) -> (bool, Option<&Arc<str>>) {
        let matched = self.first_match_named(input);
        let allowed = match self.action {
            Action::Allow => matched.is_some(),
            Action::Deny => matched.is_none(),
            Action::Log => true,
        };
        (allowed, matched)
    }

    /// The action.
    pub fn action(&self) -> Action {
        self.action
    }
}

impl Policy {
    fn matches(&self, input: &RbacInput<'_>) -> bool {
        self.permissions.iter().any(|p| p.matches(input)) && self.principals.iter().any(|p| p.matches(input))
    }
}

impl Permission {
    /// Whether the permission matches.
    pub fn matches(&self, input: &RbacInput<'_>) -> bool {
        match self {
            Permission::Any => true,
            Permission::And(all) => all.iter().all(|p| p.matches(input)),
            Permission::Or(any) => any.iter().any(|p| p.matches(input)),
            Permission::Not(p) => !p.matches(input),
            Permission::Header(h) => header_matches(h, input),
            Permission::UrlPath(m) => path_matches(m, input),
            Permission::DestinationIp(c) => c.contains(input.destination.ip()),
            Permission::DestinationPort(p) => u32::from(input.destination.port()) == *p,
            Permission::DestinationPortRange(start, end) => {
                let p = i64::from(input.destination.port());
                p >= *start && p < *end
            }
            Permission::RequestedServerName(m) => m.matches(input.server_name.unwrap_or("")),
            Permission::Metadata(m) => m.matches(input.auth),
        }
    }
}

impl Principal {
    /// Whether the principal matches.
    pub fn matches(&self, input: &RbacInput<'_>) -> bool {
        match self {
            Principal::Any => true,
            Principal::And(all) => all.iter().all(|p| p.matches(input)),
            Principal::Or(any) => any.iter().any(|p| p.matches(input)),
            Principal::Not(p) => !p.matches(input),
            Principal::Authenticated(name) => match (input.peer_principal, name) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(p), Some(m)) => m.matches(p),
            },
            Principal::DirectRemoteIp(c) => c.contains(input.peer.ip()),
            Principal::RemoteIp(c) => c.contains(remote_ip(input)),
            Principal::Header(h) => header_matches(h, input),
            Principal::UrlPath(m) => path_matches(m, input),
            Principal::Metadata(m) => m.matches(input.auth),
        }
    }
}

impl Cidr {
    fn contains(&self, ip: IpAddr) -> bool {
        in_range(ip, self.net, self.len)
    }
}

impl MetadataMatch {
    fn matches(&self, auth: Option<&RequestAuth>) -> bool {
        let value = auth.and_then(|a| a.lookup(&self.path));
        self.value.matches(value.as_ref()) != self.invert
    }
}

impl ValueMatch {
    fn matches(&self, v: Option<&Value>) -> bool {
        match (self, v) {
            (ValueMatch::Present(p), v) => v.is_some() == *p,
            (_, None) => false,
            (ValueMatch::Null, Some(v)) => v.is_null(),
            (ValueMatch::DoubleRange(start, end), Some(v)) => v.as_f64().is_some_and(|d| d >= *start && d < *end),
            (ValueMatch::DoubleExact(x), Some(v)) => v.as_f64() == Some(*x),
            (ValueMatch::String(m), Some(Value::String(s))) => m.matches(s),
            (ValueMatch::String(_), Some(_)) => false,
            (ValueMatch::Bool(b), Some(v)) => v.as_bool() == Some(*b),
            (ValueMatch::ListOneOf(inner), Some(Value::Array(items))) => items.iter().any(|i| inner.matches(Some(i))),
            (ValueMatch::ListOneOf(_), Some(_)) => false,
            (ValueMatch::Or(ms), v) => ms.iter().any(|m| m.matches(v)),
        }
    }
}

impl RequestAuth {
    /// The `istio_authn` metadata value at `path`.
    pub fn lookup(&self, path: &[String]) -> Option<Value> {
        let (first, rest) = path.split_first()?;
        match (first.as_str(), rest) {
            ("request.auth.principal", []) => self.principal.clone().map(Value::String),
            ("request.auth.presenter", []) => self.presenter.clone().map(Value::String),
            ("request.auth.audiences", []) => match self.audiences.as_slice() {
                [] => None,
                [one] => Some(Value::String(one.clone())),
                many => Some(Value::Array(many.iter().cloned().map(Value::String).collect())),
            },
            ("request.auth.claims", [claim, nested @ ..]) => {
                let mut v = self.claims.get(claim)?;
                for key in nested {
                    v = v.as_object()?.get(key)?;
                }
                Some(match v {
                    Value::String(s) => Value::Array(vec![Value::String(s.clone())]),
                    other => other.clone(),
                })
            }
            _ => None,
        }
    }
}

fn header_matches(h: &HeaderMatcher, input: &RbacInput<'_>) -> bool {
    match &input.http {
        Some(http) => h.matches_request(&http.view),
        // The network filter sees no headers (Envoy evaluates against an empty map).
        None => h.matches_headers(&http::HeaderMap::new()),
    }
}

fn path_matches(m: &StringMatch, input: &RbacInput<'_>) -> bool {
    match &input.http {
        Some(http) => m.matches(http.view.parts.uri.path()),
        None => false,
    }
}

/// The original client address: the last `x-forwarded-for` entry (Envoy with
/// `use_remote_address: false` and no trusted hops), else the connection's peer.
fn remote_ip(input: &RbacInput<'_>) -> IpAddr {
    input
        .http
        .as_ref()
        .and_then(|h| h.view.parts.headers.get_all("x-forwarded-for").iter().next_back())
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|last| last.trim().parse::<IpAddr>().ok())
        .unwrap_or(input.peer.ip())
}
