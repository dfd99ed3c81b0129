//! Compiling `RouteConfiguration` protos into a [`RouteTable`]. Every error is a
//! `(field path, message)` pair; fields that would change behaviour and that weft does
//! not implement are rejected rather than ignored.
// Deprecated proto fields are read on purpose: Envoy still honours them.
#![allow(deprecated)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::config::route::v3::{
    redirect_action::{PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier},
    route::Action,
    route_action::{
        hash_policy::PolicySpecifier, ClusterSpecifier, HostRewriteSpecifier, InternalRedirectAction,
        RequestMirrorPolicy,
    },
    DirectResponseAction, FilterConfig, RedirectAction as RedirectProto, Route as RouteProto,
    RouteAction as RouteActionProto, RouteConfiguration, VirtualHost,
};
use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatchAndSubstitute;
use envoy_types::pb::google::protobuf::Any;
use http::StatusCode;
use prost::{Message, Name};
use weft_xds::domains::Domains;

use super::action::{
    re2_substitution, ClusterChoice, ForwardAction, HashPolicy, HashSource, HostRewrite, Mirror, PathRewrite,
    RedirectAction, RedirectPath, Route, RouteAction,
};
use super::cors::{CorsLevel, CorsPolicy, CORS_FILTER};
use super::fault::FaultPolicy;
use super::headers::HeaderEdits;
use super::matcher::{compile_search_regex, unsupported, Fraction, RouteMatcher};
use super::retry::RetryPolicy;
use super::{to_duration, RouteTable, VirtualHost as CompiledVhost};

type Err = (String, String);

/// The filter name whose per-route config carries the fault policy.
const FAULT_FILTER: &str = "envoy.filters.http.fault";
/// Envoy's default route timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// Envoy's default `max_direct_response_body_size_bytes`.
const DEFAULT_MAX_DIRECT_BODY: u32 = 4096;

/// What a level (route configuration or virtual host) passes down to its routes.
struct Level {
    req: Arc<HeaderEdits>,
    resp: Arc<HeaderEdits>,
    /// `None`: not configured here; `Some(None)`: disabled here.
    fault: Option<Option<FaultPolicy>>,
    cors: Option<CorsLevel>,
    mirrors: Vec<Mirror>,
    retry: Option<RetryPolicy>,
    /// Local rate limit configurations by filter name (`None`: disabled here).
    ratelimit: Vec<RateLimitEntry>,
    /// The virtual host's `rate_limits` (empty at the route configuration level).
    rate_limits: Vec<crate::ratelimit::RateLimitRule>,
}

type RateLimitEntry = (String, Option<Arc<crate::ratelimit::LocalRateLimitConfig>>);

struct Ctx<'a> {
    /// `route/<config>/<vhost>`: the bucket scope prefix of the vhost's routes.
    scope: &'a str,
    config: &'a Level,
    vhost: &'a Level,
    vhost_name: &'a str,
    most_specific_wins: bool,
    max_body: u32,
}

pub(crate) fn compile_table(rc: &RouteConfiguration) -> Result<RouteTable, Err> {
    if let Some(v) = &rc.vhds {
        super::vhds::check(v)?;
    }
    if !rc.internal_only_headers.is_empty() {
        return Err(unsupported_top("internal_only_headers"));
    }
    if !rc.cluster_specifier_plugins.is_empty() {
        return Err(unsupported_top("cluster_specifier_plugins"));
    }
    if !rc.vhost_header.is_empty() {
        return Err(unsupported_top("vhost_header"));
    }
    if rc.ignore_path_parameters_in_path_matching {
        return Err(unsupported_top("ignore_path_parameters_in_path_matching"));
    }
    if !rc.route_specifiers.is_empty() {
        return Err(unsupported_top("route_specifiers"));
    }
    let scope = format!("route/{}", rc.name);
    let rc_filters = per_filter(&rc.typed_per_filter_config, "typed_per_filter_config", &scope)?;
    let config = Level {
        req: Arc::new(HeaderEdits::compile(
            &rc.request_headers_to_add,
            &rc.request_headers_to_remove,
            "request_headers_to_add",
            "request_headers_to_remove",
        )?),
        resp: Arc::new(HeaderEdits::compile(
            &rc.response_headers_to_add,
            &rc.response_headers_to_remove,
            "response_headers_to_add",
            "response_headers_to_remove",
        )?),
        fault: rc_filters.fault,
        cors: rc_filters.cors,
        mirrors: mirrors(&rc.request_mirror_policies, "request_mirror_policies")?,
        retry: None,
        ratelimit: rc_filters.ratelimit,
        rate_limits: Vec::new(),
    };
    let max_body = rc.max_direct_response_body_size_bytes.as_ref().map_or(DEFAULT_MAX_DIRECT_BODY, |v| v.value);
    let mut table = RouteTable {
        name: rc.name.clone(),
        vhosts: Vec::with_capacity(rc.virtual_hosts.len()),
        domains: Domains::default(),
        ignore_port: rc.ignore_port_in_host_matching,
        on_demand: rc.vhds.is_some(),
    };
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut domains = Vec::new();
    for (vi, vh) in rc.virtual_hosts.iter().enumerate() {
        let at = format!("virtual_hosts[{vi}]");
        if vh.domains.is_empty() {
            return Err((format!("{at}.domains"), "at least one domain is required".into()));
        }
        for (di, d) in vh.domains.iter().enumerate() {
            let d = d.to_ascii_lowercase();
            let dat = format!("{at}.domains[{di}]");
            if d.is_empty() {
                return Err((dat, "domain must not be empty".into()));
            }
            if let Some(prev) = seen.insert(d.clone(), vi) {
                return Err((
                    dat,
                    format!("domain {d:?} is already used by virtual_hosts[{prev}]; domains must be unique"),
                ));
            }
            domains.push((d, vi));
        }
        let vscope = format!("{scope}/{}", vh.name);
        let vlevel = vhost_level(vh, &at, &vscope)?;
        let ctx = Ctx {
            scope: &vscope,
            config: &config,
            vhost: &vlevel,
            vhost_name: &vh.name,
            most_specific_wins: rc.most_specific_header_mutations_wins,
            max_body,
        };
        let routes = vh
            .routes
            .iter()
            .enumerate()
            .map(|(ri, r)| compile_route(r, &format!("{at}.routes[{ri}]"), &ctx).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let tls_redirect = tls_redirect(vh, &at)?;
        table.vhosts.push(CompiledVhost { routes, tls_redirect });
    }
    table.domains = Domains::new(domains);
    Ok(table)
}

fn vhost_level(vh: &VirtualHost, at: &str, scope: &str) -> Result<Level, Err> {
    let checks: [(bool, &str); 8] = [
        (vh.matcher.is_some(), "matcher"),
        (vh.cors.is_some(), "cors"),
        (vh.include_request_attempt_count, "include_request_attempt_count"),
        (vh.include_attempt_count_in_response, "include_attempt_count_in_response"),
        (vh.retry_policy_typed_config.is_some(), "retry_policy_typed_config"),
        (vh.hedge_policy.is_some(), "hedge_policy"),
        (vh.include_is_timeout_retry_header, "include_is_timeout_retry_header"),
        (!vh.route_specifiers.is_empty(), "route_specifiers"),
    ];
    if let Some((_, f)) = checks.iter().find(|(bad, _)| *bad) {
        return Err(unsupported(at, f));
    }
    let vh_filters = per_filter(&vh.typed_per_filter_config, &format!("{at}.typed_per_filter_config"), scope)?;
    Ok(Level {
        req: Arc::new(HeaderEdits::compile(
            &vh.request_headers_to_add,
            &vh.request_headers_to_remove,
            &format!("{at}.request_headers_to_add"),
            &format!("{at}.request_headers_to_remove"),
        )?),
        resp: Arc::new(HeaderEdits::compile(
            &vh.response_headers_to_add,
            &vh.response_headers_to_remove,
            &format!("{at}.response_headers_to_add"),
            &format!("{at}.response_headers_to_remove"),
        )?),
        fault: vh_filters.fault,
        cors: vh_filters.cors,
        mirrors: mirrors(&vh.request_mirror_policies, &format!("{at}.request_mirror_policies"))?,
        retry: vh.retry_policy.as_ref().map(|p| RetryPolicy::compile(p, &format!("{at}.retry_policy"))).transpose()?,
        ratelimit: vh_filters.ratelimit,
        rate_limits: crate::ratelimit::compile_rate_limits(&vh.rate_limits, &format!("{at}.rate_limits"))?,
    })
}

/// `require_tls`: the route answering plaintext requests with a 301 to the same URL
/// over `https` (Envoy's SSL redirect), and whether internal requests are spared
/// (`EXTERNAL_ONLY`).
fn tls_redirect(vh: &VirtualHost, at: &str) -> Result<Option<(Arc<Route>, bool)>, Err> {
    use envoy_types::pb::envoy::config::route::v3::{route_match::PathSpecifier, virtual_host::TlsRequirementType};
    let external_only = match TlsRequirementType::try_from(vh.require_tls) {
        Ok(TlsRequirementType::None) => return Ok(None),
        Ok(TlsRequirementType::ExternalOnly) => true,
        Ok(TlsRequirementType::All) => false,
        Err(_) => return Err((format!("{at}.require_tls"), format!("unknown value {}", vh.require_tls))),
    };
    let all = envoy_types::pb::envoy::config::route::v3::RouteMatch {
        path_specifier: Some(PathSpecifier::Prefix("/".into())),
        ..Default::default()
    };
    let route = Route {
        name: Arc::from(""),
        virtual_host: vh.name.clone(),
        decorator: None,
        action: RouteAction::Redirect(RedirectAction {
            status: StatusCode::MOVED_PERMANENTLY,
            scheme: Some("https".into()),
            host: None,
            port: None,
            path: None,
            strip_query: false,
        }),
        fault: None,
        cors: None,
        matcher: RouteMatcher::compile(&all, &format!("{at}.require_tls"))?,
        path_rewrite: None,
        host_rewrite: None,
        append_x_forwarded_host: false,
        request_edits: Vec::new(),
        response_edits: Vec::new(),
        local_ratelimit: Vec::new(),
        rate_limits: Default::default(),
    };
    Ok(Some((Arc::new(route), external_only)))
}

fn compile_route(r: &RouteProto, at: &str, ctx: &Ctx<'_>) -> Result<Route, Err> {
    if !r.route_specifiers.is_empty() {
        return Err(unsupported(at, "route_specifiers"));
    }
    let Some(m) = &r.r#match else {
        return Err((format!("{at}.match"), "match is required".into()));
    };
    let matcher = RouteMatcher::compile(m, &format!("{at}.match"))?;
    let rscope = format!("{}/{}", ctx.scope, if r.name.is_empty() { at } else { &r.name });
    let filters = per_filter(&r.typed_per_filter_config, &format!("{at}.typed_per_filter_config"), &rscope)?;
    // The most specific level's configuration of each local rate limit filter.
    let mut local_ratelimit = filters.ratelimit.clone();
    for (name, c) in ctx.vhost.ratelimit.iter().chain(&ctx.config.ratelimit) {
        if !local_ratelimit.iter().any(|(n, _)| n == name) {
            local_ratelimit.push((name.clone(), c.clone()));
        }
    }
    let cors_levels: Vec<&CorsLevel> =
        [filters.cors.as_ref(), ctx.vhost.cors.as_ref(), ctx.config.cors.as_ref()].into_iter().flatten().collect();
    let cors = CorsPolicy::merge(&cors_levels).map(Arc::new);
    let fault = filters.fault.or_else(|| ctx.vhost.fault.clone()).or_else(|| ctx.config.fault.clone()).flatten();
    let route_req = Arc::new(HeaderEdits::compile(
        &r.request_headers_to_add,
        &r.request_headers_to_remove,
        &format!("{at}.request_headers_to_add"),
        &format!("{at}.request_headers_to_remove"),
    )?);
    let route_resp = Arc::new(HeaderEdits::compile(
        &r.response_headers_to_add,
        &r.response_headers_to_remove,
        &format!("{at}.response_headers_to_add"),
        &format!("{at}.response_headers_to_remove"),
    )?);
    let order = |route: Arc<HeaderEdits>, vh: &Arc<HeaderEdits>, rc: &Arc<HeaderEdits>| {
        let mut v = vec![route, vh.clone(), rc.clone()];
        if ctx.most_specific_wins {
            v.reverse();
        }
        v.retain(|e| !e.is_empty());
        v
    };
    let mut route = Route {
        name: Arc::from(r.name.as_str()),
        virtual_host: ctx.vhost_name.to_string(),
        action: RouteAction::Direct { status: StatusCode::NOT_FOUND, body: Bytes::new() },
        decorator: r.decorator.as_ref().map(|d| d.operation.clone()).filter(|o| !o.is_empty()),
        fault,
        cors,
        matcher,
        path_rewrite: None,
        host_rewrite: None,
        append_x_forwarded_host: false,
        request_edits: order(route_req, &ctx.vhost.req, &ctx.config.req),
        response_edits: order(route_resp, &ctx.vhost.resp, &ctx.config.resp),
        local_ratelimit,
        rate_limits: crate::ratelimit::RouteRateLimits { route: Vec::new(), vhost: ctx.vhost.rate_limits.clone() },
    };
    route.action = match &r.action {
        None => return Err((format!("{at}.action"), "one of route, redirect or direct_response is required".into())),
        Some(Action::Route(ra)) => compile_forward(ra, &format!("{at}.route"), ctx, &mut route)?,
        Some(Action::Redirect(rd)) => RouteAction::Redirect(compile_redirect(rd, &format!("{at}.redirect"))?),
        Some(Action::DirectResponse(d)) => compile_direct(d, &format!("{at}.direct_response"), ctx.max_body)?,
        Some(Action::FilterAction(_)) => return Err(unsupported(at, "filter_action")),
        Some(Action::NonForwardingAction(_)) => return Err(unsupported(at, "non_forwarding_action")),
    };
    Ok(route)
}

fn compile_forward(ra: &RouteActionProto, at: &str, ctx: &Ctx<'_>, route: &mut Route) -> Result<RouteAction, Err> {
    let checks: [(bool, &str); 13] = [
        (ra.metadata_match.is_some(), "metadata_match"),
        (ra.path_rewrite_policy.is_some(), "path_rewrite_policy"),
        (!ra.path_rewrite.is_empty(), "path_rewrite"),
        (ra.flush_timeout.is_some(), "flush_timeout"),
        (ra.retry_policy_typed_config.is_some(), "retry_policy_typed_config"),
        (ra.cors.is_some(), "cors"),
        (ra.max_grpc_timeout.is_some(), "max_grpc_timeout"),
        (ra.grpc_timeout_offset.is_some(), "grpc_timeout_offset"),
        (ra.internal_redirect_policy.is_some(), "internal_redirect_policy"),
        (
            ra.internal_redirect_action == InternalRedirectAction::HandleInternalRedirect as i32,
            "internal_redirect_action",
        ),
        (ra.hedge_policy.is_some(), "hedge_policy"),
        (ra.early_data_policy.is_some(), "early_data_policy"),
        (ra.upgrade_configs.iter().any(|u| u.connect_config.is_some()), "upgrade_configs.connect_config"),
    ];
    if let Some((_, f)) = checks.iter().find(|(bad, _)| *bad) {
        return Err(unsupported(at, f));
    }
    route.rate_limits.route = crate::ratelimit::compile_rate_limits(&ra.rate_limits, &format!("{at}.rate_limits"))?;
    route.path_rewrite = match (ra.prefix_rewrite.is_empty(), &ra.regex_rewrite) {
        (false, Some(_)) => {
            return Err((
                format!("{at}.regex_rewrite"),
                "only one of prefix_rewrite and regex_rewrite may be set".into(),
            ))
        }
        (false, None) => Some(PathRewrite::Prefix(ra.prefix_rewrite.clone())),
        (true, Some(rr)) => Some(regex_rewrite(rr, &format!("{at}.regex_rewrite"))?),
        (true, None) => None,
    };
    route.host_rewrite = match &ra.host_rewrite_specifier {
        None => None,
        Some(HostRewriteSpecifier::HostRewriteLiteral(h)) => {
            if http::uri::Authority::try_from(h.as_str()).is_err() {
                return Err((format!("{at}.host_rewrite_literal"), format!("{h:?} is not a valid host")));
            }
            Some(HostRewrite::Literal(h.clone()))
        }
        Some(HostRewriteSpecifier::HostRewriteHeader(h)) => Some(HostRewrite::Header(
            http::HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| (format!("{at}.host_rewrite_header"), format!("{h:?} is not a valid header name")))?,
        )),
        Some(HostRewriteSpecifier::AutoHostRewrite(b)) if !b.value => None,
        Some(HostRewriteSpecifier::AutoHostRewrite(_)) => return Err(unsupported(at, "auto_host_rewrite")),
        Some(HostRewriteSpecifier::HostRewritePathRegex(_)) => return Err(unsupported(at, "host_rewrite_path_regex")),
        Some(HostRewriteSpecifier::HostRewrite(_)) => return Err(unsupported(at, "host_rewrite")),
    };
    route.append_x_forwarded_host = ra.append_x_forwarded_host;
    let clusters = match &ra.cluster_specifier {
        None => {
            return Err((format!("{at}.cluster_specifier"), "one of cluster or weighted_clusters is required".into()))
        }
        Some(ClusterSpecifier::Cluster(c)) if c.is_empty() => {
            return Err((format!("{at}.cluster"), "cluster name must not be empty".into()))
        }
        Some(ClusterSpecifier::Cluster(c)) => ClusterChoice::Single(Arc::from(c.as_str())),
        Some(ClusterSpecifier::WeightedClusters(wc)) => {
            let wat = format!("{at}.weighted_clusters");
            if wc.random_value_specifier.is_some() {
                return Err(unsupported(&wat, "random_value_specifier"));
            }
            if wc.clusters.is_empty() {
                return Err((format!("{wat}.clusters"), "at least one cluster is required".into()));
            }
            let mut list = Vec::with_capacity(wc.clusters.len());
            let mut total: u64 = 0;
            for (i, cw) in wc.clusters.iter().enumerate() {
                let cat = format!("{wat}.clusters[{i}]");
                let checks = [
                    (!cw.cluster_header.is_empty(), "cluster_header"),
                    (cw.metadata_match.is_some(), "metadata_match"),
                    (!cw.request_headers_to_add.is_empty(), "request_headers_to_add"),
                    (!cw.request_headers_to_remove.is_empty(), "request_headers_to_remove"),
                    (!cw.response_headers_to_add.is_empty(), "response_headers_to_add"),
                    (!cw.response_headers_to_remove.is_empty(), "response_headers_to_remove"),
                    (!cw.typed_per_filter_config.is_empty(), "typed_per_filter_config"),
                    (cw.host_rewrite_specifier.is_some(), "host_rewrite_literal"),
                ];
                if let Some((_, f)) = checks.iter().find(|(bad, _)| *bad) {
                    return Err(unsupported(&cat, f));
                }
                if cw.name.is_empty() {
                    return Err((format!("{cat}.name"), "cluster name must not be empty".into()));
                }
                let w = cw.weight.as_ref().map_or(0, |w| w.value);
                total += u64::from(w);
                list.push((Arc::from(cw.name.as_str()), w));
            }
            let total = u32::try_from(total)
                .map_err(|_| (format!("{wat}.clusters"), "sum of weights exceeds 2^32-1".to_string()))?;
            if total == 0 {
                return Err((format!("{wat}.clusters"), "sum of weights must be greater than 0".into()));
            }
            if let Some(tw) = &wc.total_weight {
                if tw.value != 0 && tw.value != total {
                    return Err((
                        format!("{wat}.total_weight"),
                        format!("total_weight {} differs from the sum of weights {total}", tw.value),
                    ));
                }
            }
            ClusterChoice::Weighted(list, total)
        }
        Some(ClusterSpecifier::ClusterHeader(_)) => return Err(unsupported(at, "cluster_header")),
        Some(ClusterSpecifier::ClusterSpecifierPlugin(_)) => return Err(unsupported(at, "cluster_specifier_plugin")),
        Some(ClusterSpecifier::InlineClusterSpecifierPlugin(_)) => {
            return Err(unsupported(at, "inline_cluster_specifier_plugin"))
        }
    };
    let timeout = match &ra.timeout {
        None => Some(DEFAULT_TIMEOUT),
        Some(d) => Some(to_duration(d, &format!("{at}.timeout"))?).filter(|d| !d.is_zero()),
    };
    let idle_timeout = ra
        .idle_timeout
        .as_ref()
        .map(|d| to_duration(d, &format!("{at}.idle_timeout")))
        .transpose()?
        .filter(|d| !d.is_zero());
    let retry = match &ra.retry_policy {
        Some(p) => Some(RetryPolicy::compile(p, &format!("{at}.retry_policy"))?),
        None => ctx.vhost.retry.clone(),
    };
    let own = mirrors(&ra.request_mirror_policies, &format!("{at}.request_mirror_policies"))?;
    let mirrors = [own, ctx.vhost.mirrors.clone(), ctx.config.mirrors.clone()]
        .into_iter()
        .find(|m| !m.is_empty())
        .unwrap_or_default();
    let cluster_not_found_status = match ra.cluster_not_found_response_code {
        1 => StatusCode::NOT_FOUND,
        2 => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let msd = ra.max_stream_duration.as_ref();
    let dur = |d: Option<&envoy_types::pb::google::protobuf::Duration>, f: &str| {
        d.map(|d| to_duration(d, &format!("{at}.max_stream_duration.{f}"))).transpose()
    };
    if msd.is_some_and(|m| m.grpc_timeout_header_offset.is_some()) {
        return Err(unsupported(&format!("{at}.max_stream_duration"), "grpc_timeout_header_offset"));
    }
    let max_stream_duration =
        dur(msd.and_then(|m| m.max_stream_duration.as_ref()), "max_stream_duration")?.filter(|d| !d.is_zero());
    let grpc_timeout_header_max = dur(msd.and_then(|m| m.grpc_timeout_header_max.as_ref()), "grpc_timeout_header_max")?;
    let upgrades = ra
        .upgrade_configs
        .iter()
        .filter(|u| u.enabled.as_ref().is_none_or(|b| b.value))
        .map(|u| u.upgrade_type.to_ascii_lowercase())
        .collect();
    let mut hash_policy = Vec::with_capacity(ra.hash_policy.len());
    for (i, hp) in ra.hash_policy.iter().enumerate() {
        let hat = format!("{at}.hash_policy[{i}]");
        let source = match &hp.policy_specifier {
            None => return Err((format!("{hat}.policy_specifier"), "a hash policy specifier is required".into())),
            Some(PolicySpecifier::Header(h)) => {
                if h.regex_rewrite.is_some() {
                    return Err(unsupported(&format!("{hat}.header"), "regex_rewrite"));
                }
                HashSource::Header(http::HeaderName::from_bytes(h.header_name.as_bytes()).map_err(|_| {
                    (format!("{hat}.header.header_name"), format!("{:?} is not a valid header name", h.header_name))
                })?)
            }
            Some(PolicySpecifier::Cookie(c)) => {
                if !c.attributes.is_empty() {
                    return Err(unsupported(&format!("{hat}.cookie"), "attributes"));
                }
                HashSource::Cookie {
                    name: c.name.clone(),
                    ttl: c.ttl.as_ref().map(|d| to_duration(d, &format!("{hat}.cookie.ttl"))).transpose()?,
                    path: c.path.clone(),
                }
            }
            Some(PolicySpecifier::ConnectionProperties(cp)) if cp.source_ip => HashSource::SourceIp,
            Some(PolicySpecifier::ConnectionProperties(_)) => continue,
            Some(PolicySpecifier::QueryParameter(q)) => HashSource::QueryParameter(q.name.clone()),
            Some(PolicySpecifier::FilterState(_)) => return Err(unsupported(&hat, "filter_state")),
        };
        hash_policy.push(HashPolicy { source, terminal: hp.terminal });
    }
    Ok(RouteAction::Forward(ForwardAction {
        clusters,
        timeout,
        idle_timeout,
        retry,
        mirrors,
        cluster_not_found_status,
        max_stream_duration,
        grpc_timeout_header_max,
        upgrades,
        hash_policy,
        removes_x_forwarded_proto: route.request_edits.iter().any(|e| e.removes(&super::X_FORWARDED_PROTO)),
    }))
}

fn compile_redirect(rd: &RedirectProto, at: &str) -> Result<RedirectAction, Err> {
    let status = match RedirectResponseCode::try_from(rd.response_code) {
        Ok(RedirectResponseCode::MovedPermanently) => StatusCode::MOVED_PERMANENTLY,
        Ok(RedirectResponseCode::Found) => StatusCode::FOUND,
        Ok(RedirectResponseCode::SeeOther) => StatusCode::SEE_OTHER,
        Ok(RedirectResponseCode::TemporaryRedirect) => StatusCode::TEMPORARY_REDIRECT,
        Ok(RedirectResponseCode::PermanentRedirect) => StatusCode::PERMANENT_REDIRECT,
        Err(_) => return Err((format!("{at}.response_code"), format!("unknown response_code {}", rd.response_code))),
    };
    let scheme = match &rd.scheme_rewrite_specifier {
        None | Some(SchemeRewriteSpecifier::HttpsRedirect(false)) => None,
        Some(SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".to_string()),
        Some(SchemeRewriteSpecifier::SchemeRedirect(s)) if s.is_empty() => None,
        Some(SchemeRewriteSpecifier::SchemeRedirect(s)) => Some(s.to_ascii_lowercase()),
    };
    let port = match rd.port_redirect {
        0 => None,
        p => Some(u16::try_from(p).map_err(|_| (format!("{at}.port_redirect"), format!("{p} is not a port")))?),
    };
    let path = match &rd.path_rewrite_specifier {
        None => None,
        Some(PathRewriteSpecifier::PathRedirect(p)) => Some(RedirectPath::Replace(p.clone())),
        Some(PathRewriteSpecifier::PrefixRewrite(p)) => Some(RedirectPath::Rewrite(PathRewrite::Prefix(p.clone()))),
        Some(PathRewriteSpecifier::RegexRewrite(rr)) => {
            Some(RedirectPath::Rewrite(regex_rewrite(rr, &format!("{at}.regex_rewrite"))?))
        }
        Some(PathRewriteSpecifier::PathRewrite(_)) => return Err(unsupported(at, "path_rewrite")),
    };
    Ok(RedirectAction {
        status,
        scheme,
        host: (!rd.host_redirect.is_empty()).then(|| rd.host_redirect.clone()),
        port,
        path,
        strip_query: rd.strip_query,
    })
}

fn compile_direct(d: &DirectResponseAction, at: &str, max_body: u32) -> Result<RouteAction, Err> {
    if d.body_format.is_some() {
        return Err(unsupported(at, "body_format"));
    }
    let status = u16::try_from(d.status)
        .ok()
        .filter(|s| (200..600).contains(s))
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(|| (format!("{at}.status"), format!("{} is not in [200, 600)", d.status)))?;
    let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
        None => Bytes::new(),
        Some(Specifier::InlineString(s)) => Bytes::from(s.clone()),
        Some(Specifier::InlineBytes(b)) => Bytes::from(b.clone()),
        Some(Specifier::Filename(_)) => return Err(unsupported(&format!("{at}.body"), "filename")),
        Some(Specifier::EnvironmentVariable(_)) => {
            return Err(unsupported(&format!("{at}.body"), "environment_variable"))
        }
    };
    if body.len() as u64 > u64::from(max_body) {
        return Err((
            format!("{at}.body"),
            format!("body of {} bytes exceeds max_direct_response_body_size_bytes ({max_body})", body.len()),
        ));
    }
    Ok(RouteAction::Direct { status, body })
}

fn regex_rewrite(rr: &RegexMatchAndSubstitute, at: &str) -> Result<PathRewrite, Err> {
    let Some(p) = &rr.pattern else {
        return Err((format!("{at}.pattern"), "pattern is required".into()));
    };
    let re = compile_search_regex(p, &format!("{at}.pattern"))?;
    let sub = re2_substitution(&rr.substitution).map_err(|m| (format!("{at}.substitution"), m))?;
    Ok(PathRewrite::Regex(re, sub))
}

fn mirrors(list: &[RequestMirrorPolicy], at: &str) -> Result<Vec<Mirror>, Err> {
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let mat = format!("{at}[{i}]");
        if !m.cluster_header.is_empty() {
            return Err(unsupported(&mat, "cluster_header"));
        }
        if !m.request_headers_mutations.is_empty() {
            return Err(unsupported(&mat, "request_headers_mutations"));
        }
        if !m.host_rewrite_literal.is_empty() {
            return Err(unsupported(&mat, "host_rewrite_literal"));
        }
        if m.cluster.is_empty() {
            return Err((format!("{mat}.cluster"), "cluster name must not be empty".into()));
        }
        let percent = match &m.runtime_fraction {
            None => 100.0,
            Some(rf) => match &rf.default_value {
                None => {
                    return Err((format!("{mat}.runtime_fraction.default_value"), "default_value is required".into()))
                }
                Some(fp) => Fraction::compile(fp, &format!("{mat}.runtime_fraction.default_value"))?.percent(),
            },
        };
        out.push(Mirror {
            cluster: m.cluster.clone(),
            percent,
            append_shadow_suffix: !m.disable_shadow_host_suffix_append,
        });
    }
    Ok(out)
}

/// The per-filter configs of one level that weft implements.
struct PerFilter {
    /// `None`: not configured here; `Some(None)`: disabled here.
    fault: Option<Option<FaultPolicy>>,
    cors: Option<CorsLevel>,
    ratelimit: Vec<RateLimitEntry>,
}

/// The fault and CORS policies in a `typed_per_filter_config` map. Other filters'
/// configs are rejected unless marked optional or disabled (weft has no such filter).
fn per_filter(map: &HashMap<String, Any>, at: &str, scope: &str) -> Result<PerFilter, Err> {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    let mut out = PerFilter { fault: None, cors: None, ratelimit: Vec::new() };
    for k in keys {
        let Some(any) = map.get(k) else { continue };
        let fat = format!("{at}[{k}]");
        let (inner, optional, disabled) = if any.type_url == FilterConfig::type_url() {
            let fc = FilterConfig::decode(any.value.as_slice())
                .map_err(|e| (fat.clone(), format!("cannot decode FilterConfig: {e}")))?;
            (fc.config, fc.is_optional, fc.disabled)
        } else {
            (Some(any.clone()), false, false)
        };
        // Local rate limit configurations are found by type (their key is the name of the
        // filter in the connection manager, which may be any).
        let is_ratelimit = k == crate::ratelimit::FILTER_NAME
            || inner.as_ref().is_some_and(|i| i.type_url == crate::ratelimit::LOCAL_RATELIMIT_TYPE);
        if is_ratelimit {
            let config = match (disabled, &inner) {
                (true, _) => None,
                (false, None) => return Err((format!("{fat}.config"), "config is required".into())),
                (false, Some(i)) => Some(
                    crate::ratelimit::compile_per_route(i, &format!("{scope}/{k}"))
                        .map_err(|(f, m)| (if f.is_empty() { fat.clone() } else { format!("{fat}.{f}") }, m))?,
                ),
            };
            out.ratelimit.push((k.clone(), config));
            continue;
        }
        let known = k == FAULT_FILTER || k == CORS_FILTER;
        if known && disabled {
            if k == FAULT_FILTER {
                out.fault = Some(None);
            } else {
                out.cors = Some(CorsLevel::disabled());
            }
            continue;
        }
        if !known {
            if !(optional || disabled) {
                return Err((fat, format!("per-route config for filter {k:?} is not supported by weft")));
            }
            continue;
        }
        let Some(inner) = inner else {
            return Err((format!("{fat}.config"), "config is required".into()));
        };
        if k == FAULT_FILTER {
            out.fault = Some(Some(FaultPolicy::from_any(&inner).map_err(|m| (fat, m))?));
        } else {
            out.cors = Some(CorsLevel::from_any(&inner).map_err(|m| (fat, m))?);
        }
    }
    Ok(out)
}

fn unsupported_top(field: &str) -> Err {
    (
        field.to_string(),
        format!("{field} is not supported by weft; remove it (accepting it would silently change behaviour)"),
    )
}
