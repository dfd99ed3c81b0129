//! What a matched route does: forward (clusters, timeouts, retries, mirrors), redirect
//! or answer directly, plus the request and response edits it carries.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, StatusCode, Uri};
use regex::Regex;

use super::cors::CorsPolicy;
use super::fault::FaultPolicy;
use super::headers::HeaderEdits;
use super::matcher::{request_scheme, RouteMatcher};
use super::retry::RetryPolicy;

/// One compiled route: a matcher and what to do with the requests it matches.
#[derive(Debug)]
pub struct Route {
    /// The route's name (may be empty); shared with the reports of its requests.
    pub name: Arc<str>,
    /// The name of the virtual host the route belongs to.
    pub virtual_host: String,
    /// What to do with a matching request.
    pub action: RouteAction,
    /// `decorator.operation`: the name of the request's tracing span.
    pub decorator: Option<String>,
    /// Fault injection, from `typed_per_filter_config["envoy.filters.http.fault"]` of
    /// the route, else of its virtual host, else of the route configuration.
    pub fault: Option<FaultPolicy>,
    /// CORS, from `typed_per_filter_config["envoy.filters.http.cors"]` of the route, its
    /// virtual host and the route configuration, merged field by field.
    pub cors: Option<Arc<CorsPolicy>>,
    pub(crate) matcher: RouteMatcher,
    pub(crate) path_rewrite: Option<PathRewrite>,
    pub(crate) host_rewrite: Option<HostRewrite>,
    pub(crate) append_x_forwarded_host: bool,
    /// Request edits in application order (route, vhost, config by default).
    pub(crate) request_edits: Vec<Arc<HeaderEdits>>,
    /// Response edits in application order.
    pub(crate) response_edits: Vec<Arc<HeaderEdits>>,
    /// Local rate limit configurations by filter name, the most specific level's
    /// (route, virtual host, route configuration); `None`: disabled there.
    pub local_ratelimit: Vec<(String, Option<Arc<crate::ratelimit::LocalRateLimitConfig>>)>,
    /// The `rate_limits` actions of the route and its virtual host.
    pub rate_limits: crate::ratelimit::RouteRateLimits,
}

/// The action of a route.
// Routes are compiled once and shared behind `Arc`; boxing would only add a hop.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum RouteAction {
    /// Forward upstream.
    Forward(ForwardAction),
    /// Answer with a redirect; build the response with [`Route::redirect_response`].
    Redirect(RedirectAction),
    /// Answer locally with this status and body ([`Route::direct_response`] builds it).
    Direct {
        /// Response status.
        status: StatusCode,
        /// Response body (may be empty).
        body: Bytes,
    },
}

/// How a request is forwarded.
#[derive(Debug, Clone)]
pub struct ForwardAction {
    /// The upstream cluster(s).
    pub clusters: ClusterChoice,
    /// Route timeout (Envoy default 15 s; configured 0 means none).
    pub timeout: Option<Duration>,
    /// Stream idle timeout override for this route (0 means disabled).
    pub idle_timeout: Option<Duration>,
    /// Retry policy; the route's replaces the virtual host's.
    pub retry: Option<RetryPolicy>,
    /// Shadow traffic; the most specific non-empty list (route, vhost, config).
    pub mirrors: Vec<Mirror>,
    /// Status answered when the cluster is unknown (Envoy default 503).
    pub cluster_not_found_status: StatusCode,
    /// `max_stream_duration.max_stream_duration`.
    pub max_stream_duration: Option<Duration>,
    /// `max_stream_duration.grpc_timeout_header_max`: when set, a `grpc-timeout`
    /// request header (capped at this value, 0 = uncapped) replaces the route timeout.
    pub grpc_timeout_header_max: Option<Duration>,
    /// Enabled upgrade types (`websocket`, ...), lowercased.
    pub upgrades: Vec<String>,
    /// Consistent-hash inputs, in order.
    pub hash_policy: Vec<HashPolicy>,
    /// The route's request header edits remove `x-forwarded-proto` (which the connection
    /// manager set before routing): forwarding then sets it again.
    pub removes_x_forwarded_proto: bool,
}

/// The cluster(s) a forward action sends to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterChoice {
    /// Always this cluster.
    Single(Arc<str>),
    /// Weighted clusters and the sum of their weights (> 0).
    Weighted(Vec<(Arc<str>, u32)>, u32),
}

/// A request mirroring policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    /// The shadow cluster.
    pub cluster: String,
    /// Share of requests mirrored, 0..=100 (Envoy default 100).
    pub percent: f64,
    /// Append `-shadow` to the mirrored request's host (Envoy default true).
    pub append_shadow_suffix: bool,
}

/// One consistent-hash input (`RouteAction.hash_policy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashPolicy {
    /// What is hashed.
    pub source: HashSource,
    /// Stop at this policy if it produced a hash.
    pub terminal: bool,
}

/// What a [`HashPolicy`] hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashSource {
    /// A request header's value.
    Header(http::HeaderName),
    /// A cookie; when absent and `ttl` is set the proxy generates it.
    Cookie {
        /// Cookie name.
        name: String,
        /// Cookie lifetime for generated cookies.
        ttl: Option<Duration>,
        /// Cookie path for generated cookies.
        path: String,
    },
    /// The downstream source IP.
    SourceIp,
    /// A query parameter's value.
    QueryParameter(String),
}

/// A compiled `RedirectAction`.
#[derive(Debug, Clone)]
pub struct RedirectAction {
    /// 301 (default), 302, 303, 307 or 308.
    pub status: StatusCode,
    /// New scheme (`https_redirect` gives `https`).
    pub scheme: Option<String>,
    /// New host (may include a port).
    pub host: Option<String>,
    /// New port.
    pub port: Option<u16>,
    /// How the path changes.
    pub path: Option<RedirectPath>,
    /// Drop the query string (not when `path_redirect` has its own).
    pub strip_query: bool,
}

/// The path part of a redirect.
#[derive(Debug, Clone)]
pub enum RedirectPath {
    /// `path_redirect`: replace the path (its own query, if any, wins).
    Replace(String),
    /// `prefix_rewrite` / `regex_rewrite`: rewrite the request path.
    Rewrite(PathRewrite),
}

/// A path rewrite (on the path only; the query is kept).
#[derive(Debug, Clone)]
pub enum PathRewrite {
    /// `prefix_rewrite`: replace the matched prefix.
    Prefix(String),
    /// `regex_rewrite`: replace every match (substitution in `regex` syntax).
    Regex(Regex, String),
}

/// A host rewrite.
#[derive(Debug, Clone)]
pub(crate) enum HostRewrite {
    /// `host_rewrite_literal`.
    Literal(String),
    /// `host_rewrite_header`: the value of this request header, when present.
    Header(http::HeaderName),
}

/// What [`ClusterChoice::pick`] answers for an empty weighted list (compile refuses one).
static NO_CLUSTER: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));

impl ClusterChoice {
    /// Picks a cluster for the uniform random value `r`: `r % total` falls into the
    /// cluster whose cumulative weight range contains it (Envoy's algorithm), so over
    /// `r = 0..total` each cluster is picked exactly `weight` times. The name is shared:
    /// a request that keeps it (its report) takes a reference, not a copy.
    pub fn pick(&self, r: u64) -> &Arc<str> {
        match self {
            ClusterChoice::Single(c) => c,
            ClusterChoice::Weighted(list, total) => {
                let v = r % u64::from((*total).max(1));
                let mut acc = 0u64;
                for (name, w) in list {
                    acc += u64::from(*w);
                    if v < acc {
                        return name;
                    }
                }
                // Unreachable when total is the sum of weights (compile ensures it).
                match list.last() {
                    Some((n, _)) => n,
                    None => &NO_CLUSTER,
                }
            }
        }
    }
}

impl Route {
    /// Request-side edits in this order: path rewrite (`prefix_rewrite` /
    /// `regex_rewrite`, on the path only, query kept), host rewrite (URI authority and
    /// `Host` header kept consistent; `x-forwarded-host` appended when asked), then the
    /// header edits of route, virtual host and route configuration (each level removes
    /// first, then adds per its `append_action`).
    pub fn rewrite_request(&self, parts: &mut http::request::Parts) {
        if let (RouteAction::Forward(_), Some(rw)) = (&self.action, &self.path_rewrite) {
            let pq = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str).to_string();
            let new = apply_path_rewrite(rw, &self.matcher, &pq);
            set_path_and_query(parts, &new);
        }
        if let Some(hr) = &self.host_rewrite {
            let new = match hr {
                HostRewrite::Literal(h) => Some(h.clone()),
                HostRewrite::Header(name) => {
                    parts.headers.get(name).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty()).map(str::to_string)
                }
            };
            if let Some(new) = new {
                let original = request_host(parts).map(str::to_string);
                if set_authority(parts, &new) && self.append_x_forwarded_host {
                    if let Some(orig) = original.and_then(|o| HeaderValue::from_str(&o).ok()) {
                        parts.headers.append("x-forwarded-host", orig);
                    }
                }
            }
        }
        for edits in &self.request_edits {
            edits.apply(&mut parts.headers);
        }
    }

    /// Response header edits of route, virtual host and route configuration.
    pub fn edit_response_headers(&self, headers: &mut http::HeaderMap) {
        for edits in &self.response_edits {
            edits.apply(headers);
        }
    }

    /// For redirect routes, the redirect response: status and `Location` (scheme, host,
    /// port, path, prefix/regex rewrite, `strip_query`, following Envoy's `newUri`),
    /// empty body, response header edits already applied. `None` for other routes.
    pub fn redirect_response(&self, parts: &http::request::Parts) -> Option<http::Response<Bytes>> {
        let RouteAction::Redirect(r) = &self.action else {
            return None;
        };
        let location = self.redirect_location(r, parts);
        let mut resp = http::Response::new(Bytes::new());
        *resp.status_mut() = r.status;
        match HeaderValue::from_str(&location) {
            Ok(v) => {
                resp.headers_mut().insert(http::header::LOCATION, v);
            }
            Err(_) => {
                tracing::debug!(%location, "redirect location is not a valid header value");
                *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            }
        }
        self.edit_response_headers(resp.headers_mut());
        Some(resp)
    }

    /// For direct-response routes, the response: status, body (`content-type:
    /// text/plain` when non-empty), `Location` for 201 and 3xx (Envoy), response header
    /// edits applied. `None` for other routes.
    pub fn direct_response(&self, parts: &http::request::Parts) -> Option<http::Response<Bytes>> {
        let RouteAction::Direct { status, body } = &self.action else {
            return None;
        };
        let mut resp = http::Response::new(body.clone());
        *resp.status_mut() = *status;
        if !body.is_empty() {
            resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        if status.is_redirection() || *status == StatusCode::CREATED {
            let plain = RedirectAction {
                status: *status,
                scheme: None,
                host: None,
                port: None,
                path: None,
                strip_query: false,
            };
            if let Ok(v) = HeaderValue::from_str(&self.redirect_location(&plain, parts)) {
                resp.headers_mut().insert(http::header::LOCATION, v);
            }
        }
        self.edit_response_headers(resp.headers_mut());
        Some(resp)
    }

    fn redirect_location(&self, r: &RedirectAction, parts: &http::request::Parts) -> String {
        let request_scheme = request_scheme(parts);
        let scheme = r.scheme.as_deref().unwrap_or(request_scheme);
        let port = r.port.map(|p| format!(":{p}")).unwrap_or_default();
        let host = match &r.host {
            Some(h) => h.clone(),
            None => {
                let h = request_host(parts).unwrap_or("");
                strip_port_for_redirect(h, request_scheme, scheme, r.port.is_some()).to_string()
            }
        };
        let current = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
        let mut path_has_query = false;
        let mut path = match &r.path {
            Some(RedirectPath::Replace(p)) => {
                if p.contains('?') {
                    path_has_query = true;
                    p.clone()
                } else {
                    match current.find('?') {
                        Some(i) => format!("{p}{}", &current[i..]),
                        None => p.clone(),
                    }
                }
            }
            Some(RedirectPath::Rewrite(rw)) => apply_path_rewrite(rw, &self.matcher, current),
            None => current.to_string(),
        };
        if !path.starts_with('/') {
            path.insert(0, '/');
        }
        if r.strip_query && !path_has_query {
            if let Some(i) = path.find('?') {
                path.truncate(i);
            }
        }
        format!("{scheme}://{host}{port}{path}")
    }
}

/// Applies a path rewrite to `path_and_query`, keeping the query.
pub(crate) fn apply_path_rewrite(rw: &PathRewrite, m: &RouteMatcher, path_and_query: &str) -> String {
    let (path, rest) = match path_and_query.find('?') {
        Some(i) => path_and_query.split_at(i),
        None => (path_and_query, ""),
    };
    let new_path = match rw {
        PathRewrite::Prefix(p) => {
            let n = m.matched_len(path);
            format!("{p}{}", path.get(n..).unwrap_or(""))
        }
        PathRewrite::Regex(re, sub) => re.replace_all(path, sub.as_str()).into_owned(),
    };
    let new_path = if new_path.is_empty() { "/".to_string() } else { new_path };
    format!("{new_path}{rest}")
}

/// Converts an RE2 rewrite string (`\1` groups, `\\` backslash) to `regex` syntax.
pub(crate) fn re2_substitution(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len() + 8);
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(d @ '0'..='9') => {
                    out.push_str("${");
                    out.push(d);
                    out.push('}');
                }
                Some('\\') => out.push('\\'),
                other => {
                    return Err(format!(
                        "invalid escape \\{} in substitution {s:?} (only \\0-\\9 and \\\\)",
                        other.map(String::from).unwrap_or_default()
                    ))
                }
            },
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// The request's host: the `Host` header, else the URI authority.
fn request_host(parts: &http::request::Parts) -> Option<&str> {
    parts
        .headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| parts.uri.authority().map(Authority::as_str))
}

/// Envoy's `processRequestHost`: drop the port when a new port is set, or when the
/// scheme changes and the port was the old scheme's default.
fn strip_port_for_redirect<'a>(host: &'a str, old_scheme: &str, new_scheme: &str, new_port: bool) -> &'a str {
    let port_at = if host.starts_with('[') { host.rfind("]:").map(|i| i + 1) } else { host.rfind(':') };
    let Some(i) = port_at else { return host };
    let port = &host[i..];
    let mut remove = new_port;
    if new_scheme != old_scheme {
        remove |= old_scheme.eq_ignore_ascii_case("https") && port == ":443";
        remove |= old_scheme.eq_ignore_ascii_case("http") && port == ":80";
    }
    if remove {
        &host[..i]
    } else {
        host
    }
}

fn set_path_and_query(parts: &mut http::request::Parts, new: &str) {
    let Ok(pq) = PathAndQuery::try_from(new) else {
        tracing::debug!(path = new, "rewritten path is not a valid URI path; left unchanged");
        return;
    };
    let mut up = parts.uri.clone().into_parts();
    up.path_and_query = Some(pq);
    match Uri::from_parts(up) {
        Ok(u) => parts.uri = u,
        Err(e) => tracing::debug!(error = %e, "cannot rebuild URI after path rewrite"),
    }
}

/// Sets the authority in the URI (when it has one) and the `Host` header (when present
/// or when the URI has no authority). Returns false when `host` is not valid.
fn set_authority(parts: &mut http::request::Parts, host: &str) -> bool {
    let (Ok(auth), Ok(hv)) = (Authority::try_from(host), HeaderValue::from_str(host)) else {
        tracing::debug!(host, "rewritten host is not a valid authority; left unchanged");
        return false;
    };
    if parts.uri.authority().is_some() {
        let mut up = parts.uri.clone().into_parts();
        up.authority = Some(auth);
        match Uri::from_parts(up) {
            Ok(u) => parts.uri = u,
            Err(e) => {
                tracing::debug!(error = %e, "cannot rebuild URI after host rewrite");
                return false;
            }
        }
    }
    if parts.headers.contains_key(http::header::HOST) || parts.uri.authority().is_none() {
        parts.headers.insert(http::header::HOST, hv);
    }
    true
}
