//! Request authentication: Envoy's JWT filter (`envoy.filters.http.jwt_authn`,
//! `envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication`), first in the HTTP
//! stage, before RBAC.
//!
//! Stage entry: [`JwtFilter::authenticate`]. The first rule whose route match fits the
//! request gives the requirement (no rule: nothing is checked). Requirements follow
//! Envoy's verifier tree: `provider_name` / `provider_and_audiences` need a valid token
//! of that provider; `allow_missing` accepts no token and checks every present one
//! against the provider of its issuer (none: `Jwt issuer is not configured`);
//! `requires_any` passes when one child passes, and otherwise fails with the last
//! child's failure that is not "missing" (for a provider child, a token of another
//! issuer counts as missing); an `allow_missing_or_failed` child lets everything
//! through; `requires_all` needs every child. So Istio's `requires_any [provider,
//! allow_missing]` accepts no token and refuses expired, forged and foreign ones.
//!
//! Per token, in Envoy's order: format, issuer, time (`exp`/`nbf` with
//! `clock_skew_seconds`, default 60), audiences, then the signature against the JWKS
//! (inline `local_jwks`, or `remote_jwks` fetched over HTTP and cached for
//! `cache_duration`). A failure answers Envoy's local reply: `401` (`403` for
//! audiences) with the status text as body (`Jwt is missing`, `Jwt is expired`,
//! `Jwt verification fails`, `Jwt issuer is not configured`, `Audiences in Jwt are not
//! allowed`, ...) and `www-authenticate: Bearer realm="<url>"`.
//!
//! A verified token becomes the request's [`RequestAuth`] (Istio's
//! `request.auth.principal` `<iss>/<sub>`, audiences, presenter, claims) for RBAC, its
//! payload goes to `forward_payload_header` (base64url), claims to `claim_to_headers`,
//! and the token is removed from its header unless `forward`.

mod compile;
mod jwks;
#[cfg(test)]
mod tests;
mod token;

use std::sync::Arc;

use base64::Engine as _;
use envoy_types::pb::google::protobuf::Any;
use http::header::{HeaderName, HeaderValue};
use serde_json::Value;

pub use jwks::KeySet;
pub use token::Status;

use crate::rbac::RequestAuth;
use crate::route::matcher::{RequestView, RouteMatcher};
use jwks::JwksSource;

/// Type URL of the JWT filter.
pub const JWT_AUTHN_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication";

/// One compiled JWT filter.
#[derive(Debug)]
pub struct JwtFilter {
    /// The filter's configured name.
    pub name: String,
    providers: Vec<Arc<Provider>>,
    /// Route matches and their requirement (`None`: verification disabled).
    rules: Vec<(RouteMatcher, Option<Requirement>)>,
    bypass_cors_preflight: bool,
}

/// A token issuer (Envoy's `JwtProvider`).
#[derive(Debug)]
pub struct Provider {
    /// The provider's name in `providers`.
    pub name: String,
    issuer: String,
    audiences: Vec<String>,
    require_expiration: bool,
    forward: bool,
    locations: Vec<Location>,
    forward_payload_header: Option<HeaderName>,
    pad_forward_payload_header: bool,
    space_delimited_claims: Vec<String>,
    clock_skew: u64,
    claim_to_headers: Vec<(HeaderName, Vec<String>)>,
    jwks: JwksSource,
}

/// Where a provider looks for its token.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    /// A header, the token after `prefix`.
    Header(HeaderName, String),
    /// A query parameter.
    Param(String),
    /// A cookie.
    Cookie(String),
}

/// A compiled `JwtRequirement`.
#[derive(Debug, Clone)]
enum Requirement {
    /// A valid token of the provider (with these audiences instead of its own, when set).
    Provider(usize, Option<Vec<String>>),
    /// One of the children.
    Any { children: Vec<Requirement>, allow_missing: bool, allow_failed: bool },
    /// All children.
    All(Vec<Requirement>),
    /// No token, or a valid one of any provider.
    AllowMissing,
    /// Anything; valid tokens are still used.
    AllowMissingOrFailed,
}

/// A token found in the request.
#[derive(Debug, Clone)]
struct Found {
    location: Location,
    token: String,
}

/// A token that passed verification.
#[derive(Debug, Clone)]
struct Verified {
    provider: Arc<Provider>,
    location: Location,
    payload_b64: String,
    claims: serde_json::Map<String, Value>,
}

/// A request the filter refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    /// Envoy's status.
    pub status: Status,
    /// `www-authenticate` value.
    pub www_authenticate: String,
}

/// Per-request verification state (tokens verified once, results reused).
struct Ctx<'a> {
    filter: &'a JwtFilter,
    parts: &'a http::request::Parts,
    now: u64,
    verified: Vec<Verified>,
}

impl JwtFilter {
    /// Compiles the filter configuration; errors name the field.
    pub fn from_any(any: &Any, name: &str) -> Result<JwtFilter, (String, String)> {
        compile::filter(any, name)
    }

    /// The providers, sorted by name.
    pub fn providers(&self) -> &[Arc<Provider>] {
        &self.providers
    }

    /// Authenticates the request: on success, fills [`RequestAuth`] into its extensions
    /// (when a token was verified) and edits its headers (payload header, claim headers,
    /// token removal); on failure, says what to answer.
    pub async fn authenticate(&self, parts: &mut http::request::Parts, authority: &str) -> Result<(), Denial> {
        if self.bypass_cors_preflight && is_cors_preflight(parts) {
            return Ok(());
        }
        let Some(requirement) = ({
            let view = RequestView { authority, parts };
            self.rules.iter().find(|(m, _)| m.matches(&view, rand::random())).and_then(|(_, r)| r.as_ref())
        }) else {
            return Ok(());
        };
        // Headers the filter writes are never taken from the client.
        for p in &self.providers {
            if let Some(h) = &p.forward_payload_header {
                parts.headers.remove(h);
            }
            for (h, _) in &p.claim_to_headers {
                parts.headers.remove(h);
            }
        }
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
        let mut ctx = Ctx { filter: self, parts, now, verified: Vec::new() };
        let status = ctx.check(requirement).await;
        let verified = std::mem::take(&mut ctx.verified);
        if status != Status::Ok {
            return Err(Denial { status, www_authenticate: www_authenticate(parts, authority, status) });
        }
        apply_verified(parts, verified);
        Ok(())
    }
}

impl Ctx<'_> {
    /// Envoy's verifier tree. Boxed: requirements nest.
    fn check<'s>(&'s mut self, r: &'s Requirement) -> futures::future::BoxFuture<'s, Status> {
        Box::pin(async move {
            match r {
                Requirement::Provider(i, audiences) => {
                    let Some(p) = self.filter.providers.get(*i).cloned() else { return Status::JwtMissed };
                    self.provider(&p, audiences.as_deref()).await
                }
                Requirement::All(children) => {
                    for c in children {
                        let s = self.check(c).await;
                        if s != Status::Ok {
                            return s;
                        }
                    }
                    Status::Ok
                }
                Requirement::Any { children, allow_missing, allow_failed } => {
                    let mut last = Status::JwtMissed;
                    for c in children {
                        match (self.check(c).await, c) {
                            (Status::Ok, _) => return Status::Ok,
                            (Status::JwtMissed, _) | (Status::JwtUnknownIssuer, Requirement::Provider(..)) => {}
                            (s, _) => last = s,
                        }
                    }
                    if *allow_missing {
                        // The `allow_missing` child: every token checked against the
                        // provider of its issuer; an unknown issuer is a failure here.
                        match self.any_provider().await {
                            Status::Ok | Status::JwtMissed => return Status::Ok,
                            s => last = s,
                        }
                    }
                    if *allow_failed {
                        // Tokens are still verified, so a valid one is used.
                        self.any_provider().await;
                        return Status::Ok;
                    }
                    last
                }
                Requirement::AllowMissing => match self.any_provider().await {
                    Status::JwtMissed => Status::Ok,
                    s => s,
                },
                Requirement::AllowMissingOrFailed => {
                    self.any_provider().await;
                    Status::Ok
                }
            }
        })
    }

    /// The token at `p`'s locations must be valid for `p`.
    async fn provider(&mut self, p: &Arc<Provider>, audiences: Option<&[String]>) -> Status {
        let found = p.extract(self.parts);
        let Some(f) = found.first() else { return Status::JwtMissed };
        if let Some(v) = self.verified.iter().find(|v| Arc::ptr_eq(&v.provider, p) && v.location == f.location) {
            let _ = v;
            return Status::Ok;
        }
        let parsed = match token::Jwt::parse(&f.token) {
            Ok(j) => j,
            Err(s) => return s,
        };
        // A token at a location only other issuers use is not this provider's.
        if !p.issuer.is_empty() && parsed.iss() != Some(p.issuer.as_str()) {
            return Status::JwtUnknownIssuer;
        }
        self.verify(p, f.clone(), parsed, audiences).await
    }

    /// Every token in the request (at any provider's locations) checked against the
    /// provider of its issuer: `JwtMissed` when there is none.
    async fn any_provider(&mut self) -> Status {
        let mut seen: Vec<Found> = Vec::new();
        for p in &self.filter.providers {
            for f in p.extract(self.parts) {
                if !seen.iter().any(|s| s.location == f.location) {
                    seen.push(f);
                }
            }
        }
        let mut status = Status::JwtMissed;
        for f in seen {
            if self.verified.iter().any(|v| v.location == f.location) {
                status = Status::Ok;
                continue;
            }
            let parsed = match token::Jwt::parse(&f.token) {
                Ok(j) => j,
                Err(s) => return s,
            };
            let provider = self
                .filter
                .providers
                .iter()
                .find(|p| p.locations.contains(&f.location) && (p.issuer.is_empty() || parsed.iss() == Some(&p.issuer)))
                .cloned();
            let Some(p) = provider else { return Status::JwtUnknownIssuer };
            status = self.verify(&p, f, parsed, None).await;
            if status != Status::Ok {
                return status;
            }
        }
        status
    }

    async fn verify(&mut self, p: &Arc<Provider>, f: Found, jwt: token::Jwt, audiences: Option<&[String]>) -> Status {
        let s = jwt.check_time(self.now, p.clock_skew, p.require_expiration);
        if s != Status::Ok {
            return s;
        }
        let audiences = audiences.unwrap_or(&p.audiences);
        if !audiences.is_empty() && !jwt.audience_allowed(audiences) {
            return Status::JwtAudienceNotAllowed;
        }
        let keys = match p.jwks.keys().await {
            Ok(k) => k,
            Err(s) => return s,
        };
        let s = keys.verify(&jwt);
        if s == Status::Ok {
            self.verified.push(Verified {
                provider: p.clone(),
                location: f.location,
                payload_b64: jwt.payload_b64().to_string(),
                claims: jwt.claims_normalized(&p.space_delimited_claims),
            });
        }
        s
    }
}

impl Provider {
    /// Tokens at this provider's locations, in configuration order.
    fn extract(&self, parts: &http::request::Parts) -> Vec<Found> {
        let mut out = Vec::new();
        for l in &self.locations {
            let token = match l {
                Location::Header(name, prefix) => parts.headers.get_all(name).iter().find_map(|v| {
                    let v = v.to_str().ok()?.trim();
                    let rest = if prefix.is_empty() {
                        Some(v)
                    } else if v.len() >= prefix.len() && v[..prefix.len()].eq_ignore_ascii_case(prefix) {
                        Some(&v[prefix.len()..])
                    } else {
                        // Envoy also finds the prefix later in the value (`Bearer` after a scheme list).
                        v.find(prefix.as_str()).map(|i| &v[i + prefix.len()..])
                    }?;
                    let t = rest.trim().split([',', ' ']).next().unwrap_or("").to_string();
                    (!t.is_empty()).then_some(t)
                }),
                Location::Param(name) => parts.uri.query().and_then(|q| {
                    crate::route::matcher::parse_query(q).into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
                }),
                Location::Cookie(name) => parts.headers.get_all(http::header::COOKIE).iter().find_map(|v| {
                    v.to_str().ok()?.split(';').find_map(|c| {
                        let (k, v) = c.trim().split_once('=')?;
                        (k == name).then(|| v.to_string())
                    })
                }),
            };
            if let Some(token) = token.filter(|t| !t.is_empty()) {
                out.push(Found { location: l.clone(), token });
            }
        }
        out
    }
}

/// Applies what verified tokens give the request: [`RequestAuth`] from the first, the
/// payload and claim headers, and token removal.
fn apply_verified(parts: &mut http::request::Parts, verified: Vec<Verified>) {
    if let Some(first) = verified.first() {
        parts.extensions.insert(request_auth(&first.claims));
    }
    for v in &verified {
        let p = &v.provider;
        if let Some(h) = &p.forward_payload_header {
            let mut payload = v.payload_b64.clone();
            if p.pad_forward_payload_header {
                let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.as_bytes());
                if let Ok(bytes) = decoded {
                    payload = base64::engine::general_purpose::URL_SAFE.encode(bytes);
                }
            }
            if let Ok(value) = HeaderValue::from_str(&payload) {
                parts.headers.insert(h.clone(), value);
            }
        }
        for (h, path) in &p.claim_to_headers {
            if let Some(value) = claim_header_value(&v.claims, path) {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    parts.headers.insert(h.clone(), value);
                }
            }
        }
        if !p.forward {
            if let Location::Header(name, _) = &v.location {
                parts.headers.remove(name);
            }
        }
    }
}

/// Istio's `istio_authn` attributes of a verified payload.
fn request_auth(claims: &serde_json::Map<String, Value>) -> RequestAuth {
    let s = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_string);
    let principal = match (s("iss"), s("sub")) {
        (Some(iss), Some(sub)) => Some(format!("{iss}/{sub}")),
        _ => None,
    };
    let audiences = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        _ => Vec::new(),
    };
    RequestAuth { principal, audiences, presenter: s("azp"), claims: claims.clone() }
}

/// A claim as a header value: strings as they are, numbers and booleans printed, lists
/// joined with commas (Envoy's `claim_to_headers`); objects are not copied.
fn claim_header_value(claims: &serde_json::Map<String, Value>, path: &[String]) -> Option<String> {
    let (first, rest) = path.split_first()?;
    let mut v = claims.get(first)?;
    for k in rest {
        v = v.as_object()?.get(k)?;
    }
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Array(items) => {
            let parts: Vec<String> = items
                .iter()
                .filter_map(|i| match i {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    Value::Bool(b) => Some(b.to_string()),
                    _ => None,
                })
                .collect();
            Some(parts.join(","))
        }
        _ => None,
    }
}

fn is_cors_preflight(parts: &http::request::Parts) -> bool {
    parts.method == http::Method::OPTIONS
        && parts.headers.contains_key(http::header::ORIGIN)
        && parts.headers.contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// Envoy's `www-authenticate` for a failure: the realm is the request URL without query.
fn www_authenticate(parts: &http::request::Parts, authority: &str, status: Status) -> String {
    let scheme = crate::route::matcher::request_scheme(parts);
    let mut v = format!("Bearer realm=\"{scheme}://{authority}{}\"", parts.uri.path());
    if status != Status::JwtMissed {
        v.push_str(", error=\"invalid_token\"");
    }
    v
}
