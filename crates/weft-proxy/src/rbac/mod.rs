//! Authorization: Envoy's RBAC filters, HTTP (`envoy.extensions.filters.http.rbac.v3.RBAC`,
//! per request, before CORS, faults and the router) and network
//! (`envoy.extensions.filters.network.rbac.v3.RBAC`, per connection, before `tcp_proxy`).
//!
//! Stage entry: [`check`] runs a chain's filters in order. Per filter, as Envoy does:
//! the shadow rules (if any) are evaluated and their result only recorded (counters,
//! access-log metadata `<shadow_rules_stat_prefix>shadow_engine_result` /
//! `shadow_effective_policy_id`); then the enforced rules (if any): ALLOW allows iff a
//! policy matches, DENY denies iff one matches, LOG never blocks and marks the request
//! for the access log when one matches. The first denial stops the chain (HTTP: 403
//! `RBAC: access denied`, no response flag (`-`, as Envoy); network: the connection is closed).
//!
//! Inputs ([`RbacInput`]): the connection's peer and destination addresses, the peer
//! principal (URI SAN of a verified client certificate, `ConnInfo::peer_principal`),
//! SNI, the request headers and path, and [`RequestAuth`] for JWT-derived attributes.

mod compile;
mod engine;
#[cfg(test)]
mod tests;

use std::sync::{Arc, OnceLock};

use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::google::protobuf::Any;
use prometheus_client::metrics::counter::Counter;

pub use compile::ISTIO_AUTHN;
pub use engine::{Action, Engine, RbacInput, RequestAuth};

use engine::HttpInput;

use crate::proto::decode;
use crate::route::matcher::RequestView;
use crate::telemetry::rbac::{RbacCount, RbacLabels, RbacMetrics};

/// Type URL of the HTTP RBAC filter.
pub const HTTP_RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
/// Type URL of the network RBAC filter.
pub const NETWORK_RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";

/// Body of Envoy's RBAC denial.
pub const DENIED_BODY: &str = "RBAC: access denied";

/// One compiled RBAC filter (HTTP or network).
#[derive(Debug)]
pub struct RbacFilter {
    /// The filter's configured name.
    pub name: String,
    rules: Option<Engine>,
    shadow: Option<Engine>,
    rules_prefix: String,
    shadow_prefix: String,
    stat_prefix: String,
    /// The access-log metadata keys, built once (they were formatted per request).
    keys: MetadataKeys,
    counters: OnceLock<Counters>,
}

/// `<prefix>shadow_effective_policy_id`, `<prefix>shadow_engine_result`,
/// `<prefix>enforced_effective_policy_id`, `<prefix>enforced_engine_result`, and the
/// result values: shared, so a request's metadata clones reference counts, not strings.
#[derive(Debug)]
struct MetadataKeys {
    shadow_policy: Arc<str>,
    shadow_result: Arc<str>,
    enforced_policy: Arc<str>,
    enforced_result: Arc<str>,
    allowed: Arc<str>,
    denied: Arc<str>,
}

/// One access-log metadata entry of the RBAC filters: key and value.
pub type MetadataEntry = (Arc<str>, Arc<str>);

/// Counter handles of one filter, created on first use.
#[derive(Debug)]
struct Counters {
    allowed: Counter,
    denied: Counter,
    logged: Counter,
    not_logged: Counter,
    shadow_allowed: Counter,
    shadow_denied: Counter,
}

/// What a chain of RBAC filters decided about one request or connection.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Verdict {
    /// Set when a filter denied: the effective policy, or `none` (Envoy's response
    /// detail `rbac_access_denied_matched_policy[<this>]`).
    pub denied: Option<String>,
    /// Dynamic metadata of the filters for the access log, in evaluation order:
    /// `<prefix>shadow_engine_result`, `<prefix>shadow_effective_policy_id`,
    /// `<prefix>enforced_engine_result`, `<prefix>enforced_effective_policy_id`.
    pub metadata: Vec<MetadataEntry>,
    /// A LOG policy matched (Envoy's `envoy.common` `access_log_hint`).
    pub log_hint: bool,
}

impl RbacFilter {
    /// Compiles an HTTP RBAC filter of a connection manager with `stat_prefix`.
    pub fn from_http(any: &Any, name: &str, stat_prefix: &str) -> Result<RbacFilter, (String, String)> {
        let cfg: HttpRbac = decode(any).map_err(|m| (String::new(), m))?;
        if cfg.matcher.is_some() {
            return Err(("matcher".into(), "the matcher API is not supported by weft; use rules".into()));
        }
        if cfg.shadow_matcher.is_some() {
            return Err(("shadow_matcher".into(), "the matcher API is not supported by weft; use shadow_rules".into()));
        }
        RbacFilter::new(
            name,
            cfg.rules.as_ref(),
            cfg.shadow_rules.as_ref(),
            cfg.rules_stat_prefix,
            cfg.shadow_rules_stat_prefix,
            stat_prefix,
        )
    }

    /// Compiles a network RBAC filter (`stat_prefix` is its own).
    pub fn from_network(any: &Any, name: &str) -> Result<RbacFilter, (String, String)> {
        let cfg: NetworkRbac = decode(any).map_err(|m| (String::new(), m))?;
        if cfg.matcher.is_some() {
            return Err(("matcher".into(), "the matcher API is not supported by weft; use rules".into()));
        }
        if cfg.shadow_matcher.is_some() {
            return Err(("shadow_matcher".into(), "the matcher API is not supported by weft; use shadow_rules".into()));
        }
        if cfg.delay_deny.as_ref().is_some_and(|d| d.seconds != 0 || d.nanos != 0) {
            return Err(("delay_deny".into(), "delay_deny is not supported by weft".into()));
        }
        // enforcement_type: weft evaluates once, before connecting upstream; the inputs
        // (addresses, peer certificate, SNI) cannot change afterwards, so CONTINUOUS
        // gives the same decisions.
        RbacFilter::new(
            name,
            cfg.rules.as_ref(),
            cfg.shadow_rules.as_ref(),
            String::new(),
            cfg.shadow_rules_stat_prefix,
            &cfg.stat_prefix,
        )
    }

    fn new(
        name: &str,
        rules: Option<&envoy_types::pb::envoy::config::rbac::v3::Rbac>,
        shadow: Option<&envoy_types::pb::envoy::config::rbac::v3::Rbac>,
        rules_prefix: String,
        shadow_prefix: String,
        stat_prefix: &str,
    ) -> Result<RbacFilter, (String, String)> {
        Ok(RbacFilter {
            name: name.to_string(),
            rules: rules.map(|r| compile::engine(r, "rules")).transpose()?,
            shadow: shadow.map(|r| compile::engine(r, "shadow_rules")).transpose()?,
            keys: MetadataKeys {
                shadow_policy: format!("{shadow_prefix}shadow_effective_policy_id").into(),
                shadow_result: format!("{shadow_prefix}shadow_engine_result").into(),
                enforced_policy: format!("{rules_prefix}enforced_effective_policy_id").into(),
                enforced_result: format!("{rules_prefix}enforced_engine_result").into(),
                allowed: engine_result(true).into(),
                denied: engine_result(false).into(),
            },
            rules_prefix,
            shadow_prefix,
            stat_prefix: stat_prefix.to_string(),
            counters: OnceLock::new(),
        })
    }

    /// The enforced rules, if any.
    pub fn rules(&self) -> Option<&Engine> {
        self.rules.as_ref()
    }

    /// The shadow rules, if any.
    pub fn shadow_rules(&self) -> Option<&Engine> {
        self.shadow.as_ref()
    }

    fn counters(&self, metrics: &RbacMetrics) -> &Counters {
        self.counters.get_or_init(|| {
            let labels = |prefix: &str, engine: Option<&Engine>| RbacLabels {
                stat_prefix: self.stat_prefix.clone(),
                rules_prefix: prefix.to_string(),
                action: engine.map_or("", |e| action_name(e.action())),
            };
            let enforced = labels(&self.rules_prefix, self.rules.as_ref());
            let shadow = labels(&self.shadow_prefix, self.shadow.as_ref());
            Counters {
                allowed: metrics.counter(RbacCount::Allowed, &enforced),
                denied: metrics.counter(RbacCount::Denied, &enforced),
                logged: metrics.counter(RbacCount::Logged, &enforced),
                not_logged: metrics.counter(RbacCount::NotLogged, &enforced),
                shadow_allowed: metrics.counter(RbacCount::ShadowAllowed, &shadow),
                shadow_denied: metrics.counter(RbacCount::ShadowDenied, &shadow),
            }
        })
    }

    /// Evaluates this filter, recording into `verdict`; returns false when it denies.
    fn apply(&self, input: &RbacInput<'_>, metrics: &RbacMetrics, verdict: &mut Verdict) -> bool {
        let counters = self.counters(metrics);
        if let Some(shadow) = &self.shadow {
            let (allowed, policy) = shadow.decide_named(input);
            if allowed {
                counters.shadow_allowed.inc();
            } else {
                counters.shadow_denied.inc();
            }
            if let Some(policy) = policy {
                verdict.metadata.push((self.keys.shadow_policy.clone(), policy.clone()));
            }
            verdict.metadata.push((self.keys.shadow_result.clone(), self.keys.result(allowed)));
        }
        let Some(rules) = &self.rules else { return true };
        let (allowed, policy) = rules.decide_named(input);
        if rules.action() == Action::Log {
            if policy.is_some() {
                counters.logged.inc();
                verdict.log_hint = true;
            } else {
                counters.not_logged.inc();
            }
            return true;
        }
        if let Some(policy) = policy {
            verdict.metadata.push((self.keys.enforced_policy.clone(), policy.clone()));
        }
        verdict.metadata.push((self.keys.enforced_result.clone(), self.keys.result(allowed)));
        if allowed {
            counters.allowed.inc();
        } else {
            counters.denied.inc();
            verdict.denied = Some(policy.map_or("none", |p| &**p).to_string());
        }
        allowed
    }
}

impl MetadataKeys {
    fn result(&self, allowed: bool) -> Arc<str> {
        if allowed {
            self.allowed.clone()
        } else {
            self.denied.clone()
        }
    }
}

impl Verdict {
    /// Envoy's response code detail for a denial.
    pub fn details(&self) -> Option<String> {
        self.denied.as_ref().map(|p| format!("rbac_access_denied_matched_policy[{p}]"))
    }

    /// The metadata for the access log, `access_log_hint` included when a LOG policy
    /// matched.
    pub fn into_log_metadata(mut self) -> Vec<MetadataEntry> {
        if self.log_hint {
            self.metadata.push(("access_log_hint".into(), "true".into()));
        }
        self.metadata
    }
}

/// Runs `filters` in order for one request or connection; stops at the first denial.
pub fn check(filters: &[Arc<RbacFilter>], input: &RbacInput<'_>, metrics: &RbacMetrics) -> Verdict {
    let mut verdict = Verdict::default();
    for f in filters {
        if !f.apply(input, metrics, &mut verdict) {
            break;
        }
    }
    verdict
}

/// The input for an HTTP request: the connection's input (see
/// `ConnInfo::rbac_input`) with the request and its [`RequestAuth`], when request
/// authentication put one in its extensions.
pub fn http_input<'a>(conn: RbacInput<'a>, parts: &'a http::request::Parts, authority: &'a str) -> RbacInput<'a> {
    RbacInput {
        http: Some(HttpInput { view: RequestView { authority, parts } }),
        auth: parts.extensions.get::<RequestAuth>(),
        ..conn
    }
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Allow => "ALLOW",
        Action::Deny => "DENY",
        Action::Log => "LOG",
    }
}

fn engine_result(allowed: bool) -> &'static str {
    if allowed {
        "allowed"
    } else {
        "denied"
    }
}
