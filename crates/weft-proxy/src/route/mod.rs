//! Routing: a `RouteConfiguration` compiled into an immutable [`RouteTable`], and the
//! matching of requests against it with Envoy's semantics.
//!
//! Stage entry: [`RouteTable::select`] picks the virtual host by authority and the
//! first matching route; the [`Route`] then says what to do ([`RouteAction`]) and
//! carries the request/response edits, retry policy and fault policy.

mod action;
mod compile;
mod cors;
mod fault;
mod headers;
pub(crate) mod matcher;
mod retry;
#[cfg(test)]
mod tests;
pub mod vhds;

use std::sync::Arc;

use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use weft_xds::domains::Domains;

pub use action::{
    ClusterChoice, ForwardAction, HashPolicy, HashSource, Mirror, PathRewrite, RedirectAction, RedirectPath, Route,
    RouteAction,
};
pub use cors::{CorsDecision, CorsPolicy};
pub use fault::{Abort, FaultDecision, FaultPolicy};
pub use headers::AppendAction;
pub(crate) use headers::HeaderEdits;
pub use matcher::is_grpc;
pub use retry::{RetryOn, RetryPolicy};

use crate::error::ConfigError;
use matcher::RequestView;

/// Header names routing reads, parsed once (a `&str` name is parsed at every lookup).
/// `x-forwarded-proto` is also what the connection manager sets and tracing reads: the
/// crate's one definition.
pub(crate) const X_FORWARDED_PROTO: http::HeaderName = http::HeaderName::from_static("x-forwarded-proto");
const X_ENVOY_INTERNAL: http::HeaderName = http::HeaderName::from_static("x-envoy-internal");

/// A compiled route configuration. Immutable; share it in an `Arc`.
#[derive(Debug)]
pub struct RouteTable {
    name: String,
    vhosts: Vec<VirtualHost>,
    /// Domains -> vhost index.
    domains: Domains<usize>,
    ignore_port: bool,
    /// Virtual hosts come on demand (`vhds`), see [`vhds`].
    on_demand: bool,
}

/// A compiled virtual host.
#[derive(Debug)]
struct VirtualHost {
    routes: Vec<Arc<Route>>,
    /// `require_tls`: the redirect to `https` answered instead of the routes, and whether
    /// it spares internal requests (`EXTERNAL_ONLY`).
    tls_redirect: Option<(Arc<Route>, bool)>,
}

impl RouteTable {
    /// Compiles a `RouteConfiguration`. Errors name the offending field, e.g.
    /// `virtual_hosts[1].routes[0].match.safe_regex.regex`, and are meant as NACKs.
    pub fn compile(rc: &RouteConfiguration) -> Result<RouteTable, ConfigError> {
        compile::compile_table(rc).map_err(|(field, message)| ConfigError::new(&rc.name, field, message))
    }

    /// The route configuration's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Selects the virtual host by `authority` (Envoy order: exact, then longest suffix
    /// wildcard `*.x`, then longest prefix wildcard `x.*`, then `*`; case-insensitive;
    /// when nothing but `*` would match with the port, the lookup is retried with the
    /// port stripped), then the first matching route. `runtime_fraction` matches use a
    /// fresh random value.
    pub fn select(&self, authority: &str, parts: &http::request::Parts) -> Option<Arc<Route>> {
        self.select_with_random(authority, parts, rand::random())
    }

    /// [`RouteTable::select`] with the random value for `runtime_fraction` given.
    pub fn select_with_random(&self, authority: &str, parts: &http::request::Parts, random: u64) -> Option<Arc<Route>> {
        let vh = &self.vhosts[self.find_vhost(authority)?];
        // Envoy checks `require_tls` first, on `x-forwarded-proto` (the HCM sets it
        // from the connection when the client sent none).
        if let Some((redirect, external_only)) = &vh.tls_redirect {
            let https =
                parts.headers.get(X_FORWARDED_PROTO).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
            let internal = parts.headers.get(X_ENVOY_INTERNAL).is_some_and(|v| v.as_bytes() == b"true");
            let spared = https || (*external_only && internal);
            if !spared {
                return Some(redirect.clone());
            }
        }
        let view = RequestView { authority, parts };
        vh.routes.iter().find(|r| r.matcher.matches(&view, random)).cloned()
    }

    fn find_vhost(&self, authority: &str) -> Option<usize> {
        self.domains.lookup(authority, self.ignore_port).copied()
    }
}

/// Converts a protobuf `Duration` (must be non-negative and normalized).
pub(crate) fn to_duration(
    d: &envoy_types::pb::google::protobuf::Duration,
    at: &str,
) -> Result<std::time::Duration, (String, String)> {
    // protobuf's Duration range (about 10,000 years), as Envoy validates it: larger values
    // would overflow the arithmetic done with them (backoff caps, deadlines).
    const MAX_SECONDS: u64 = 315_576_000_000;
    let secs = u64::try_from(d.seconds).ok().filter(|s| *s <= MAX_SECONDS);
    let nanos = u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000);
    match (secs, nanos) {
        (Some(s), Some(n)) => Ok(std::time::Duration::new(s, n)),
        _ => Err((
            at.to_string(),
            format!(
                "duration {}s {}ns must be non-negative, at most {MAX_SECONDS}s, with nanos in [0, 1e9)",
                d.seconds, d.nanos
            ),
        )),
    }
}
