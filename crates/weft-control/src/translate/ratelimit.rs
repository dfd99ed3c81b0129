//! Local rate limits: the EnvoyFilter patches of Istio's local rate limit task and
//! weft's `RateLimit` resources selecting the proxy, applied to what the other stages
//! built, as the same Envoy configuration for weft's proxy and a stock Envoy: the
//! `envoy.filters.http.local_ratelimit` HTTP filter inserted into the connection
//! managers the patch's context and port select, and its per-route configurations
//! merged into `typed_per_filter_config` of the matching virtual hosts and routes.
//!
//! EnvoyFilters apply in Istio's order: the root namespace's first, then the proxy's
//! namespace's, each by `priority`, then name. An insert without `subFilter` goes first
//! (INSERT_BEFORE, INSERT_FIRST) or right before the router (INSERT_AFTER, ADD: Istio
//! would append after the router, which Envoy refuses). A filter name already in the
//! connection manager is not inserted twice.

use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValue, HeaderValueOption, RuntimeFractionalPercent,
};
use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
use envoy_types::pb::envoy::config::route::v3::{route, RouteConfiguration};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{rate_limit_descriptor, LocalRateLimitDescriptor};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, http_filter, HttpConnectionManager, HttpFilter,
};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, HttpStatus, TokenBucket};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration as PbDuration, UInt32Value};
use envoy_types::util::pack_any;
use prost::{Message, Name};
use weft_api::spec::ratelimit::{
    ApplyTo, LocalRateLimitSpec, Operation, PatchContext, RateLimitPatch, RouteActionKind, RouteConfigurationMatch,
    TokenBucketSpec,
};
use weft_api::spec::{EnvoyFilter, RateLimit};
use weft_api::{ObjectMeta, Spec};

use super::model::MeshView;
use super::ProxyXds;

#[cfg(test)]
mod tests;

/// The filter's name in weft's `RateLimit` translation.
pub const FILTER: &str = "envoy.filters.http.local_ratelimit";
const ROUTER: &[&str] = &["envoy.filters.http.router", "envoy.router"];

/// Applies the local rate limits selecting the proxy of `view` to `out`.
pub fn apply(view: &MeshView<'_>, out: &mut ProxyXds) {
    let gateway = view.node.is_gateway();
    for patch in patches(view) {
        match patch {
            RateLimitPatch::Filter { context, port, sub_filter, operation, name, config } => {
                let proto = pack_any(to_proto(&config));
                for_each_hcm(out, gateway, context, port, |hcm| {
                    insert_filter(hcm, &name, proto.clone(), sub_filter.as_deref(), operation)
                });
            }
            RateLimitPatch::PerRoute { context, apply_to, route_configuration, configs } => {
                let configs: Vec<(String, Any)> =
                    configs.iter().map(|(k, v)| (k.clone(), pack_any(to_proto(v)))).collect();
                for_each_route_config(out, gateway, context, |rc, port| {
                    merge_per_route(rc, port, apply_to, &route_configuration, &configs)
                });
            }
        }
    }
}

/// The patches selecting the proxy, in application order.
fn patches(view: &MeshView<'_>) -> Vec<RateLimitPatch> {
    let root = view.mesh.root_namespace.as_str();
    let selects = |meta: &ObjectMeta, labels: Option<&std::collections::BTreeMap<String, String>>| {
        (meta.namespace == root || meta.namespace == view.node.namespace)
            && labels.is_none_or(|l| l.iter().all(|(k, v)| view.node.labels.get(k) == Some(v)))
    };
    let mut filters: Vec<(&ObjectMeta, &EnvoyFilter)> = Vec::new();
    let mut limits: Vec<(&ObjectMeta, &RateLimit)> = Vec::new();
    for r in &view.mesh.resources {
        match &r.spec {
            Spec::EnvoyFilter(ef)
                if ef.target_refs.is_empty() && selects(&r.meta, ef.workload_selector.as_ref().map(|s| &s.labels)) =>
            {
                filters.push((&r.meta, ef));
            }
            Spec::RateLimit(rl)
                if !view.node.is_gateway() && selects(&r.meta, rl.selector.as_ref().map(|s| &s.match_labels)) =>
            {
                limits.push((&r.meta, rl));
            }
            _ => {}
        }
    }
    filters.sort_by_key(|(m, ef)| (m.namespace != root, ef.priority, m.namespace.clone(), m.name.clone()));
    limits.sort_by_key(|(m, _)| (m.namespace != root, m.namespace.clone(), m.name.clone()));
    let mut out: Vec<RateLimitPatch> =
        filters.into_iter().flat_map(|(_, ef)| ef.rate_limit_patches().into_iter().flatten().flatten()).collect();
    for (meta, rl) in limits {
        out.extend(rate_limit_patches(meta, rl));
    }
    out
}

/// weft's `RateLimit` as the same two patch shapes: the filter (enabled by itself when
/// the resource has no `match`), and per-route configurations for each `match` entry.
fn rate_limit_patches(meta: &ObjectMeta, rl: &RateLimit) -> Vec<RateLimitPatch> {
    let name = format!("{FILTER}.{}.{}", meta.namespace, meta.name);
    let bucket = match (&rl.token_bucket, rl.requests_per_unit, rl.unit) {
        (Some(b), _, _) => TokenBucketSpec {
            max_tokens: b.max_tokens,
            tokens_per_fill: Some(b.tokens_per_fill.unwrap_or(b.max_tokens)),
            fill_interval: b.fill_interval,
        },
        (None, Some(n), Some(unit)) => {
            let secs = match unit {
                weft_api::spec::ratelimit::RateUnit::Second => 1,
                weft_api::spec::ratelimit::RateUnit::Minute => 60,
                weft_api::spec::ratelimit::RateUnit::Hour => 3600,
            };
            TokenBucketSpec {
                max_tokens: n,
                tokens_per_fill: Some(n),
                fill_interval: weft_api::spec::common::Duration(std::time::Duration::from_secs(secs)),
            }
        }
        _ => return Vec::new(),
    };
    let all = |n: u32| weft_api::spec::ratelimit::RuntimeFractionSpec {
        default_value: weft_api::spec::ratelimit::FractionSpec { numerator: n, denominator: None },
        runtime_key: None,
    };
    let headers = rl
        .response_headers
        .clone()
        .unwrap_or_else(|| [("x-local-rate-limit".to_string(), "true".to_string())].into_iter().collect());
    let stat_prefix = format!("{}_{}", meta.namespace, meta.name).replace(['.', '-'], "_");
    let config = LocalRateLimitSpec {
        stat_prefix: stat_prefix.clone(),
        status: rl.status.map(|code| weft_api::spec::ratelimit::HttpStatusSpec { code }),
        token_bucket: Some(bucket),
        filter_enabled: Some(all(100)),
        filter_enforced: Some(all(if rl.shadow { 0 } else { 100 })),
        response_headers_to_add: headers
            .into_iter()
            .map(|(key, value)| weft_api::spec::ratelimit::HeaderValueOptionSpec {
                header: weft_api::spec::ratelimit::HeaderSpec { key, value },
                append: None,
                append_action: Some("OVERWRITE_IF_EXISTS_OR_ADD".into()),
            })
            .collect(),
        local_rate_limit_per_downstream_connection: rl.per_connection,
        enable_x_ratelimit_headers: rl.rate_limit_headers.then(|| "DRAFT_VERSION_03".to_string()),
        ..Default::default()
    };
    let filter = |config| RateLimitPatch::Filter {
        context: PatchContext::SidecarInbound,
        port: None,
        sub_filter: Some(ROUTER[0].into()),
        operation: Operation::InsertBefore,
        name: name.clone(),
        config,
    };
    if rl.matches.is_empty() {
        return vec![filter(config)];
    }
    let mut out = vec![filter(LocalRateLimitSpec { stat_prefix, ..Default::default() })];
    for m in &rl.matches {
        let route = m.path_prefix.clone();
        out.push(RateLimitPatch::PerRoute {
            context: PatchContext::SidecarInbound,
            // A path prefix gets its own route (see `merge_per_route`).
            apply_to: ApplyTo::HttpRoute,
            route_configuration: RouteConfigurationMatch {
                port_number: m.port,
                vhost: route.map(|p| weft_api::spec::ratelimit::VirtualHostMatch {
                    name: None,
                    domain_name: None,
                    route: Some(weft_api::spec::ratelimit::RouteMatch {
                        name: Some(format!("{PATH_PREFIX_ROUTE}{p}")),
                        action: RouteActionKind::Any,
                    }),
                }),
                ..Default::default()
            },
            configs: [(name.clone(), config.clone())].into_iter().collect(),
        });
    }
    out
}

/// Name prefix of the routes a `RateLimit` path prefix adds (`weft-ratelimit:/api`).
const PATH_PREFIX_ROUTE: &str = "weft-ratelimit:";

/// Runs `f` on every connection manager of `out`'s listeners that `context` and `port` select.
fn for_each_hcm(
    out: &mut ProxyXds,
    gateway: bool,
    context: PatchContext,
    port: Option<u32>,
    mut f: impl FnMut(&mut HttpConnectionManager),
) {
    for l in &mut out.listeners {
        let inbound = l.traffic_direction == envoy_types::pb::envoy::config::core::v3::TrafficDirection::Inbound as i32;
        if !context_matches(context, gateway, inbound) {
            continue;
        }
        let lport = listener_port(l);
        for chain in l.filter_chains.iter_mut().chain(l.default_filter_chain.iter_mut()) {
            let chain_port = port_of_name(&chain.name).or(lport);
            if port.is_some() && chain_port != port {
                continue;
            }
            edit_hcms(&mut chain.filters, &mut f);
        }
    }
}

fn edit_hcms(
    filters: &mut [envoy_types::pb::envoy::config::listener::v3::Filter],
    f: &mut impl FnMut(&mut HttpConnectionManager),
) {
    for nf in filters {
        let Some(filter::ConfigType::TypedConfig(any)) = &mut nf.config_type else { continue };
        if any.type_url != HttpConnectionManager::type_url() {
            continue;
        }
        let Ok(mut hcm) = HttpConnectionManager::decode(any.value.as_slice()) else { continue };
        f(&mut hcm);
        *any = pack_any(hcm);
    }
}

/// Runs `f` on the route configurations `context` selects: the inline ones of inbound
/// listeners (with their port) and the RDS ones (outbound or gateway).
fn for_each_route_config(
    out: &mut ProxyXds,
    gateway: bool,
    context: PatchContext,
    mut f: impl FnMut(&mut RouteConfiguration, Option<u32>),
) {
    if context_matches(context, gateway, false) {
        for rc in &mut out.routes {
            // Sidecars name RDS route configurations by port, gateways `http.PORT`.
            let port = rc.name.strip_prefix("http.").unwrap_or(&rc.name).parse::<u32>().ok();
            f(rc, port);
        }
    }
    for l in &mut out.listeners {
        let inbound = l.traffic_direction == envoy_types::pb::envoy::config::core::v3::TrafficDirection::Inbound as i32;
        if !context_matches(context, gateway, inbound) || !inbound {
            continue;
        }
        for chain in l.filter_chains.iter_mut().chain(l.default_filter_chain.iter_mut()) {
            edit_hcms(&mut chain.filters, &mut |hcm: &mut HttpConnectionManager| {
                if let Some(RouteSpecifier::RouteConfig(rc)) = &mut hcm.route_specifier {
                    let port = port_of_name(&rc.name);
                    f(rc, port);
                }
            });
        }
    }
}

fn context_matches(context: PatchContext, gateway: bool, inbound: bool) -> bool {
    match context {
        PatchContext::Any => true,
        PatchContext::Gateway => gateway,
        PatchContext::SidecarInbound => !gateway && inbound,
        PatchContext::SidecarOutbound => !gateway && !inbound,
    }
}

/// The port in `inbound|9080`, `inbound|9080|mtls`, `0.0.0.0_9080`.
fn port_of_name(name: &str) -> Option<u32> {
    if let Some(rest) = name.strip_prefix("inbound|") {
        return rest.split('|').next()?.parse().ok();
    }
    name.rsplit_once('_').and_then(|(_, p)| p.parse().ok())
}

fn listener_port(l: &Listener) -> Option<u32> {
    port_of_name(&l.name)
}

fn insert_filter(hcm: &mut HttpConnectionManager, name: &str, config: Any, sub: Option<&str>, op: Operation) {
    if hcm.http_filters.iter().any(|f| f.name == name) {
        return;
    }
    let names_match =
        |f: &HttpFilter, want: &str| f.name == want || (ROUTER.contains(&want) && ROUTER.contains(&f.name.as_str()));
    let router =
        hcm.http_filters.iter().position(|f| ROUTER.contains(&f.name.as_str())).unwrap_or(hcm.http_filters.len());
    let at = match (sub, op) {
        (Some(s), Operation::InsertBefore) => match hcm.http_filters.iter().position(|f| names_match(f, s)) {
            Some(i) => i,
            None => return,
        },
        (Some(s), Operation::InsertAfter) => match hcm.http_filters.iter().position(|f| names_match(f, s)) {
            Some(i) => (i + 1).min(router),
            None => return,
        },
        (None, Operation::InsertBefore | Operation::InsertFirst) | (Some(_), Operation::InsertFirst) => 0,
        _ => router,
    };
    let filter = HttpFilter {
        name: name.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    };
    hcm.http_filters.insert(at, filter);
}

/// `MERGE` of per-route configurations into the virtual hosts / routes of `rc` that
/// `m` selects. A route name `weft-ratelimit:<prefix>` (weft's `RateLimit` path
/// prefix) that the virtual host lacks is added first, as a copy of the virtual host's
/// first route matching that prefix.
fn merge_per_route(
    rc: &mut RouteConfiguration,
    port: Option<u32>,
    apply_to: ApplyTo,
    m: &RouteConfigurationMatch,
    configs: &[(String, Any)],
) {
    if m.port_number.is_some() && m.port_number != port {
        return;
    }
    if m.name.as_ref().is_some_and(|n| *n != rc.name) {
        return;
    }
    let vm = m.vhost.clone().unwrap_or_default();
    for vh in &mut rc.virtual_hosts {
        if vm.name.as_ref().is_some_and(|n| *n != vh.name) {
            continue;
        }
        if apply_to == ApplyTo::VirtualHost {
            vh.typed_per_filter_config.extend(configs.iter().cloned());
            continue;
        }
        let rm = vm.route.clone().unwrap_or_default();
        if let Some(prefix) = rm.name.as_deref().and_then(|n| n.strip_prefix(PATH_PREFIX_ROUTE)) {
            add_prefix_route(vh, rm.name.as_deref().unwrap_or_default(), prefix);
        }
        for r in &mut vh.routes {
            if rm.name.as_ref().is_some_and(|n| *n != r.name) {
                continue;
            }
            let kind = match &r.action {
                Some(route::Action::Route(_)) => RouteActionKind::Route,
                Some(route::Action::Redirect(_)) => RouteActionKind::Redirect,
                Some(route::Action::DirectResponse(_)) => RouteActionKind::DirectResponse,
                _ => RouteActionKind::Any,
            };
            if rm.action != RouteActionKind::Any && rm.action != kind {
                continue;
            }
            r.typed_per_filter_config.extend(configs.iter().cloned());
        }
    }
}

fn add_prefix_route(vh: &mut envoy_types::pb::envoy::config::route::v3::VirtualHost, name: &str, prefix: &str) {
    use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
    if vh.routes.iter().any(|r| r.name == name) {
        return;
    }
    let covers = |r: &&envoy_types::pb::envoy::config::route::v3::Route| matches!(r.r#match.as_ref().and_then(|m| m.path_specifier.as_ref()), Some(PathSpecifier::Prefix(p)) if prefix.starts_with(p.as_str()));
    let Some(template) = vh.routes.iter().find(covers).cloned() else { return };
    let at = vh.routes.iter().position(|r| r.name == template.name).unwrap_or(0);
    let mut r = template;
    r.name = name.into();
    if let Some(m) = &mut r.r#match {
        m.path_specifier = Some(PathSpecifier::Prefix(prefix.into()));
    }
    vh.routes.insert(at, r);
}

/// The `LocalRateLimit` message of a spec.
pub fn to_proto(s: &LocalRateLimitSpec) -> LocalRateLimit {
    let fraction = |f: &Option<weft_api::spec::ratelimit::RuntimeFractionSpec>| {
        f.as_ref().map(|f| RuntimeFractionalPercent {
            default_value: Some(FractionalPercent {
                numerator: f.default_value.numerator,
                denominator: match f.default_value.denominator.as_deref() {
                    Some("TEN_THOUSAND") => 1,
                    Some("MILLION") => 2,
                    _ => 0,
                },
            }),
            runtime_key: f.runtime_key.clone().unwrap_or_default(),
        })
    };
    let headers = |list: &[weft_api::spec::ratelimit::HeaderValueOptionSpec]| {
        list.iter()
            .map(|h| {
                let action = match (h.append_action.as_deref(), h.append) {
                    (Some("ADD_IF_ABSENT"), _) => HeaderAppendAction::AddIfAbsent,
                    (Some("OVERWRITE_IF_EXISTS_OR_ADD"), _) | (None, Some(false)) => {
                        HeaderAppendAction::OverwriteIfExistsOrAdd
                    }
                    (Some("OVERWRITE_IF_EXISTS"), _) => HeaderAppendAction::OverwriteIfExists,
                    _ => HeaderAppendAction::AppendIfExistsOrAdd,
                };
                HeaderValueOption {
                    header: Some(HeaderValue {
                        key: h.header.key.clone(),
                        value: h.header.value.clone(),
                        ..Default::default()
                    }),
                    append_action: action as i32,
                    ..Default::default()
                }
            })
            .collect()
    };
    LocalRateLimit {
        stat_prefix: s.stat_prefix.clone(),
        status: s.status.as_ref().map(|st| HttpStatus { code: i32::try_from(st.code).unwrap_or(429) }),
        token_bucket: s.token_bucket.as_ref().map(bucket),
        filter_enabled: fraction(&s.filter_enabled),
        filter_enforced: fraction(&s.filter_enforced),
        request_headers_to_add_when_not_enforced: headers(&s.request_headers_to_add_when_not_enforced),
        response_headers_to_add: headers(&s.response_headers_to_add),
        descriptors: s
            .descriptors
            .iter()
            .map(|d| LocalRateLimitDescriptor {
                entries: d
                    .entries
                    .iter()
                    .map(|e| rate_limit_descriptor::Entry { key: e.key.clone(), value: e.value.clone() })
                    .collect(),
                token_bucket: Some(bucket(&d.token_bucket)),
                shadow_mode: d.shadow_mode,
            })
            .collect(),
        stage: s.stage,
        local_rate_limit_per_downstream_connection: s.local_rate_limit_per_downstream_connection,
        enable_x_ratelimit_headers: i32::from(s.enable_x_ratelimit_headers.as_deref() == Some("DRAFT_VERSION_03")),
        vh_rate_limits: match s.vh_rate_limits.as_deref() {
            Some("INCLUDE") => 1,
            Some("IGNORE") => 2,
            _ => 0,
        },
        always_consume_default_token_bucket: s.always_consume_default_token_bucket.map(|value| BoolValue { value }),
        rate_limited_as_resource_exhausted: s.rate_limited_as_resource_exhausted,
        ..Default::default()
    }
}

fn bucket(b: &TokenBucketSpec) -> TokenBucket {
    let d = b.fill_interval.0;
    TokenBucket {
        max_tokens: b.max_tokens,
        tokens_per_fill: b.tokens_per_fill.map(|value| UInt32Value { value }),
        fill_interval: Some(PbDuration {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        }),
    }
}
