//! HTTPRoute and GRPCRoute rules as Istio VirtualService `http` routes, with the Gateway
//! API's semantics where Istio's differ: `PathPrefix` matches whole path segments
//! (`/foo` is the exact path `/foo` or the prefix `/foo/`, so a prefix rewrite or redirect
//! of the second replaces `/foo/` by the replacement with a `/` after it), `ReplaceFullPath`
//! replaces the path whatever the match, redirects default to 302, a rule with no backend
//! it can use answers 500, and the routes of a host are ordered by the Gateway API's
//! precedence (exact path, longest prefix, method, most headers, most query parameters,
//! then route order and rule order).

use std::cmp::Reverse;
use std::collections::BTreeMap;

use weft_api::spec::gateway_api::{
    GrpcRouteMatch, HeaderModifier, HttpHeaderMatch, HttpRouteFilter, HttpRouteMatch, PathMatchType, PathModifier,
    PathModifierType, ValueMatchType,
};
use weft_api::spec::{
    Destination, Duration, HeaderOperations, Headers, HttpDirectResponse, HttpMatchRequest, HttpMirrorPolicy,
    HttpRedirect, HttpRewrite, HttpRoute, HttpRouteDestination, Percent, PortSelector, RegexRewrite, StringMatch,
};

/// Where a backend resolved to: a Service host and port, with its weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// FQDN.
    pub host: String,
    /// Service port.
    pub port: u32,
    /// Weight.
    pub weight: u32,
}

/// One rule, its references resolved.
pub struct Rule {
    /// Matches (HTTP ones, or gRPC ones turned into HTTP ones).
    pub matches: Vec<HttpRouteMatch>,
    /// Filters (gRPC ones as HTTP ones).
    pub filters: Vec<HttpRouteFilter>,
    /// Usable backends.
    pub backends: Vec<Backend>,
    /// Whether the rule named backends at all (none usable: 500).
    pub had_backends: bool,
    /// Mirror targets resolved, with their percentage.
    pub mirrors: Vec<(Backend, Option<u32>)>,
    /// The route timeout (`timeouts`), `None` for none.
    pub timeout: Option<Duration>,
    /// The rule's `name`, part of the Envoy route's name.
    pub name: Option<String>,
}

/// The Gateway API's precedence of a match: path kind (exact, regex, prefix), longer
/// path, method given, more headers, more query parameters; then route, rule and match
/// order.
pub type Precedence = (u8, Reverse<usize>, Reverse<bool>, Reverse<usize>, Reverse<usize>, usize, usize, usize);

/// One VirtualService http route with its precedence key.
pub struct Entry {
    /// Where it goes among the host's routes.
    pub key: Precedence,
    /// The route.
    pub route: HttpRoute,
}

/// The entries of one rule: one per match (two for a `PathPrefix` other than `/`).
/// `order` is the route's position among all routes, `rule` the rule's; `port` restricts
/// the matches to a Service port (GAMMA parents with a port).
pub fn entries(rule: &Rule, name: &str, order: usize, rule_index: usize, port: Option<u32>) -> Vec<Entry> {
    let default = [HttpRouteMatch::default()];
    let matches: &[HttpRouteMatch] = if rule.matches.is_empty() { &default } else { &rule.matches };
    let mut out = Vec::new();
    for (mi, m) in matches.iter().enumerate() {
        let kind = m.path.as_ref().and_then(|p| p.match_type).unwrap_or(PathMatchType::PathPrefix);
        let value = m.path.as_ref().and_then(|p| p.value.clone()).unwrap_or_else(|| "/".into());
        let rank = match kind {
            PathMatchType::Exact => 0,
            PathMatchType::RegularExpression => 1,
            PathMatchType::PathPrefix => 2,
        };
        let key = (
            rank,
            Reverse(value.len()),
            Reverse(m.method.is_some()),
            Reverse(m.headers.len()),
            Reverse(m.query_params.len()),
            order,
            rule_index,
            mi,
        );
        for part in split(kind, &value) {
            let mut vm = HttpMatchRequest {
                uri: Some(part.uri()),
                method: m.method.clone().map(StringMatch::Exact),
                headers: m.headers.iter().map(|h| (h.name.to_ascii_lowercase(), value_match(h))).collect(),
                query_params: m.query_params.iter().map(|q| (q.name.clone(), value_match(q))).collect(),
                port,
                ..HttpMatchRequest::default()
            };
            if vm.headers.is_empty() && vm.query_params.is_empty() && vm.method.is_none() && part.is_root() {
                vm.uri = Some(StringMatch::Prefix("/".into()));
            }
            out.push(Entry { key, route: http_route(rule, name, vm, &part) });
        }
    }
    out
}

/// gRPC matches as HTTP ones: the path `/<service>/<method>`.
pub fn grpc_matches(ms: &[GrpcRouteMatch]) -> Vec<HttpRouteMatch> {
    use weft_api::spec::gateway_api::HttpPathMatch;
    ms.iter()
        .map(|m| {
            let path = m.method.as_ref().map(|mm| {
                let regex = mm.match_type == Some(ValueMatchType::RegularExpression);
                match (regex, mm.service.as_deref(), mm.method.as_deref()) {
                    (false, Some(s), Some(me)) => (PathMatchType::Exact, format!("/{s}/{me}")),
                    (false, Some(s), None) => (PathMatchType::PathPrefix, format!("/{s}")),
                    (false, None, Some(me)) => {
                        (PathMatchType::RegularExpression, format!("/[^/]+/{}", regex_quote(me)))
                    }
                    (_, s, me) => (
                        PathMatchType::RegularExpression,
                        format!("/{}/{}", s.unwrap_or("[^/]+"), me.unwrap_or("[^/]+")),
                    ),
                }
            });
            HttpRouteMatch {
                path: path.map(|(t, v)| HttpPathMatch { match_type: Some(t), value: Some(v) }),
                headers: m.headers.clone(),
                ..HttpRouteMatch::default()
            }
        })
        .collect()
}

/// A path match as Istio can write it.
enum Part {
    Exact(String),
    /// A segment prefix ending in `/` (or `/` alone).
    Prefix(String),
    Regex(String),
}

impl Part {
    fn uri(&self) -> StringMatch {
        match self {
            Part::Exact(p) => StringMatch::Exact(p.clone()),
            Part::Prefix(p) => StringMatch::Prefix(p.clone()),
            Part::Regex(r) => StringMatch::Regex(r.clone()),
        }
    }

    fn is_root(&self) -> bool {
        matches!(self, Part::Prefix(p) if p == "/")
    }
}

/// `PathPrefix /foo` (or `/foo/`) is the exact path `/foo` or the prefix `/foo/`.
fn split(kind: PathMatchType, value: &str) -> Vec<Part> {
    match kind {
        PathMatchType::Exact => vec![Part::Exact(value.to_string())],
        PathMatchType::RegularExpression => vec![Part::Regex(value.to_string())],
        PathMatchType::PathPrefix => {
            let p = value.trim_end_matches('/');
            if p.is_empty() {
                vec![Part::Prefix("/".into())]
            } else {
                vec![Part::Exact(p.to_string()), Part::Prefix(format!("{p}/"))]
            }
        }
    }
}

fn value_match(h: &HttpHeaderMatch) -> StringMatch {
    match h.match_type {
        Some(ValueMatchType::RegularExpression) => StringMatch::Regex(h.value.clone()),
        _ => StringMatch::Exact(h.value.clone()),
    }
}

fn http_route(rule: &Rule, name: &str, m: HttpMatchRequest, part: &Part) -> HttpRoute {
    let name = match &rule.name {
        Some(rule_name) => format!("{name}.{rule_name}"),
        None => name.to_string(),
    };
    let mut r = HttpRoute { name: Some(name), matches: vec![m], ..HttpRoute::default() };
    let mut headers = Headers::default();
    for f in &rule.filters {
        if let Some(h) = &f.request_header_modifier {
            headers.request = Some(operations(h));
        }
        if let Some(h) = &f.response_header_modifier {
            headers.response = Some(operations(h));
        }
        if let Some(rd) = &f.request_redirect {
            r.redirect = Some(HttpRedirect {
                uri: rd.path.as_ref().map(|p| redirect_path(p, part)),
                authority: rd.hostname.clone(),
                port: rd.port,
                scheme: rd.scheme.clone(),
                redirect_code: Some(rd.status_code.unwrap_or(302)),
                ..HttpRedirect::default()
            });
        }
        if let Some(rw) = &f.url_rewrite {
            let mut rewrite = HttpRewrite { authority: rw.hostname.clone(), ..HttpRewrite::default() };
            match rw.path.as_ref() {
                Some(p) if p.modifier_type == PathModifierType::ReplaceFullPath => {
                    rewrite.uri_regex_rewrite = Some(RegexRewrite {
                        pattern: "^.*$".into(),
                        rewrite: p.replace_full_path.clone().unwrap_or_else(|| "/".into()),
                    });
                }
                Some(p) => rewrite.uri = Some(prefix_replacement(p, part)),
                None => {}
            }
            r.rewrite = Some(rewrite);
        }
    }
    if headers != Headers::default() {
        r.headers = Some(headers);
    }
    r.mirrors = rule
        .mirrors
        .iter()
        .map(|(b, pct)| HttpMirrorPolicy {
            destination: destination(b),
            percentage: pct.map(|p| Percent { value: f64::from(p) }),
        })
        .collect();
    r.timeout = rule.timeout;
    if r.redirect.is_some() {
        return r;
    }
    let total: u64 = rule.backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        // No backend to forward to (none given, none valid, or all weighted 0).
        let _ = rule.had_backends;
        r.direct_response = Some(HttpDirectResponse { status: 500, body: None });
        r.rewrite = None;
        return r;
    }
    let weighted = rule.backends.len() > 1;
    r.route = rule
        .backends
        .iter()
        .map(|b| HttpRouteDestination {
            destination: destination(b),
            weight: weighted.then_some(i64::from(b.weight)),
            headers: None,
        })
        .collect();
    r
}

fn destination(b: &Backend) -> Destination {
    Destination { host: b.host.clone(), subset: None, port: Some(PortSelector { number: b.port }) }
}

fn operations(h: &HeaderModifier) -> HeaderOperations {
    HeaderOperations {
        set: h.set.iter().map(|x| (x.name.to_ascii_lowercase(), x.value.clone())).collect::<BTreeMap<_, _>>(),
        add: h.add.iter().map(|x| (x.name.to_ascii_lowercase(), x.value.clone())).collect::<BTreeMap<_, _>>(),
        remove: h.remove.iter().map(|x| x.to_ascii_lowercase()).collect(),
    }
}

/// The redirect path: a full path, or (for the prefix part of a `PathPrefix`) Istio's
/// `%PREFIX()%` form, which the route translator turns into Envoy's `prefix_rewrite`.
fn redirect_path(p: &PathModifier, part: &Part) -> String {
    match p.modifier_type {
        PathModifierType::ReplaceFullPath => p.replace_full_path.clone().unwrap_or_else(|| "/".into()),
        PathModifierType::ReplacePrefixMatch => match part {
            Part::Prefix(_) => format!("{}{}", crate::translate::routes::PREFIX_REDIRECT, prefix_replacement(p, part)),
            _ => prefix_replacement(p, part),
        },
    }
}

/// What replaces the matched prefix: for the exact part, the whole path; for the prefix
/// part (`/foo/`), the replacement followed by one `/`.
fn prefix_replacement(p: &PathModifier, part: &Part) -> String {
    let repl = p.replace_prefix_match.clone().unwrap_or_else(|| "/".into());
    match part {
        Part::Prefix(_) => format!("{}/", repl.trim_end_matches('/')),
        _ => repl,
    }
}

fn regex_quote(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$".contains(c);
            special.then_some('\\').into_iter().chain(std::iter::once(c))
        })
        .collect()
}
