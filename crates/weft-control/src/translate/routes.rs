//! Outbound HTTP routes: one RouteConfiguration per outbound port (named by the port, as
//! Istio) and `weft-outbound` for the explicit HTTP proxy; VirtualService rules compiled
//! into Envoy routes, first match wins.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::core::v3::{
    data_source, header_value_option::HeaderAppendAction, DataSource, HeaderValue, HeaderValueOption,
    RuntimeFractionalPercent,
};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher, query_parameter_matcher, redirect_action, route, route_action, route_match, weighted_cluster,
    DirectResponseAction, HeaderMatcher, QueryParameterMatcher, RedirectAction, RetryPolicy, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{fault_delay, FaultDelay};
use envoy_types::pb::envoy::extensions::filters::http::cors::v3::CorsPolicy;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{fault_abort, FaultAbort, HttpFault};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    string_matcher, RegexMatchAndSubstitute, RegexMatcher, StringMatcher,
};
use envoy_types::pb::envoy::r#type::v3::{fractional_percent, FractionalPercent};
use envoy_types::pb::google::protobuf::{BoolValue, Duration as PbDuration, UInt32Value};
use envoy_types::util::pack_any;
use weft_api::spec::{
    CorsPolicy as IstioCors, Destination, Headers, HttpBody, HttpMatchRequest, HttpRetry, HttpRoute, Percent,
    StringMatch,
};
use weft_api::{host, VirtualService};

use super::clusters::{duration, outbound_name};
use super::model::{Backing, MeshView, Protocol, Service, SvcPort, Target};
use super::{OutboundPolicy, ProxyMode, ProxyXds, OUTBOUND, PASSTHROUGH};

/// Istio's default retry conditions (applied when a route sets no `retries`).
pub const DEFAULT_RETRY_ON: &str = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";
/// Name of the CORS filter in `typed_per_filter_config`.
pub const CORS_FILTER: &str = "envoy.filters.http.cors";
/// Name of the fault filter in `typed_per_filter_config`.
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
/// A redirect `uri` starting with this (Istio's internal form, written by its Gateway API
/// conversion) replaces the matched prefix instead of the whole path.
pub const PREFIX_REDIRECT: &str = "%PREFIX()%";

/// Where VirtualService routes are compiled for: a sidecar's service port, or a
/// gateway's server port.
#[derive(Debug, Clone, Copy)]
pub struct RouteScope<'s> {
    /// The port `match.port` is compared with (service port, or gateway server port).
    pub port: u32,
    /// Sidecars: the service being routed (default destination, hash policy).
    pub service: Option<&'s Service>,
    /// Gateways: the gateways (`ns/name`) serving the routes; `None` for sidecars (`mesh`).
    pub gateways: Option<&'s BTreeSet<String>>,
}

impl RouteScope<'_> {
    /// Whether a rule's `match.gateways` (empty: the VirtualService's own, which already
    /// bound it here) includes this proxy: `mesh` for sidecars, one of `gateways`
    /// (`name` in the VirtualService's namespace, or `ns/name`) for a gateway.
    pub fn serves(&self, gateways: &[String], vs_ns: &str) -> bool {
        if gateways.is_empty() {
            return true;
        }
        match self.gateways {
            None => gateways.iter().any(|g| g == "mesh"),
            Some(mine) => gateways.iter().any(|g| g != "mesh" && mine.contains(&gateway_key(g, vs_ns))),
        }
    }
}

/// A gateway reference of a VirtualService (`name` in its namespace `vs_ns`, or
/// `ns/name`) as `ns/name`.
pub fn gateway_key(reference: &str, vs_ns: &str) -> String {
    match reference.split_once('/') {
        Some((ns, name)) => format!("{ns}/{name}"),
        None => format!("{vs_ns}/{reference}"),
    }
}

/// Adds the per-port RouteConfigurations and `weft-outbound`.
pub fn build(view: &MeshView<'_>, mode: ProxyMode, out: &mut ProxyXds) {
    let ns = view.namespace();
    let extra = virtual_hosts_without_service(view);
    let services: Vec<&Service> = view.services.iter().chain(&extra).collect();
    let ports: BTreeSet<u32> =
        services.iter().flat_map(|s| s.ports.iter().filter(|p| p.protocol.is_http()).map(|p| p.number)).collect();
    for port in ports {
        let mut seen = BTreeSet::new();
        let mut vhosts = Vec::new();
        for svc in services.iter().filter(|s| s.port(port).is_some_and(|p| p.protocol.is_http())) {
            let mut domains = Vec::new();
            for name in svc.names(ns) {
                domains.push(name.clone());
                domains.push(format!("{name}:{port}"));
            }
            domains.retain(|d| seen.insert(d.clone()));
            vhosts.push(vhost(view, svc, port, domains));
        }
        if mode == ProxyMode::Transparent {
            vhosts.push(catch_all(view));
        }
        out.routes.push(RouteConfiguration {
            name: port.to_string(),
            virtual_hosts: vhosts,
            validate_clusters: Some(BoolValue { value: false }),
            ..Default::default()
        });
    }
    let mut seen = BTreeSet::new();
    let mut vhosts = Vec::new();
    for svc in &services {
        for p in svc.ports.iter().filter(|p| p.protocol.is_http()) {
            let mut domains = Vec::new();
            for name in svc.names(ns) {
                if p.number == 80 {
                    domains.push(name.clone());
                }
                domains.push(format!("{name}:{}", p.number));
            }
            domains.retain(|d| seen.insert(d.clone()));
            vhosts.push(vhost(view, svc, p.number, domains));
        }
    }
    // CONNECT to a TLS or TCP port of an external host (a MESH_EXTERNAL ServiceEntry:
    // `curl https://...` through the explicit proxy): a tunnel to the port's cluster.
    let external = |s: &&&Service| matches!(s.backing, Backing::Entry { external: true, .. });
    for svc in services.iter().filter(external) {
        for p in svc.ports.iter().filter(|p| !p.protocol.is_http()) {
            let mut domains: Vec<String> = svc.names(ns).iter().map(|n| format!("{n}:{}", p.number)).collect();
            domains.retain(|d| seen.insert(d.clone()));
            if !domains.is_empty() {
                vhosts.push(connect_vhost(&svc.host, p.number, domains, connect_target(view, svc, p.number)));
            }
        }
    }
    // REGISTRY_ONLY: a host the mesh does not know gets Istio's `block_all` 502, CONNECT
    // included (ALLOW_ANY has no pass-through by name here: such hosts get 404).
    if view.outbound_policy() == OutboundPolicy::RegistryOnly {
        let mut block = catch_all(view);
        // CONNECT carries no path: it matches a connect_matcher route only.
        let mut connect = block.routes[0].clone();
        connect.r#match = Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::ConnectMatcher(route_match::ConnectMatcher {})),
            ..Default::default()
        });
        block.routes.insert(0, connect);
        vhosts.push(block);
    }
    out.routes.push(RouteConfiguration {
        name: OUTBOUND.into(),
        virtual_hosts: vhosts,
        validate_clusters: Some(BoolValue { value: false }),
        ..Default::default()
    });
}

/// Hosts of VirtualServices (with http routes) that name no service, such as
/// `bookinfo.example.com`: like Istio, they get a virtual host on port 80.
fn virtual_hosts_without_service(view: &MeshView<'_>) -> Vec<Service> {
    let mut hosts = BTreeSet::new();
    for (m, vs) in view.virtual_services.iter().filter(|(_, vs)| !vs.http.is_empty()) {
        for h in &vs.hosts {
            let h = host::fqdn(h, &m.namespace, &view.mesh.domain);
            if !h.contains('*') && view.service(&h).is_none() {
                hosts.insert((h, m.namespace.clone()));
            }
        }
    }
    hosts
        .into_iter()
        .map(|(host, namespace)| Service {
            host,
            short: None,
            namespace,
            ports: vec![SvcPort { number: 80, name: "http".into(), protocol: Protocol::Http, target: Target::Same }],
            backing: Backing::Selector(Default::default()),
        })
        .collect()
}

/// Where a CONNECT tunnel to `svc:port` goes: the first `tls` route of a VirtualService
/// for the mesh whose match names the host among its `sniHosts` (the client's SNI is the
/// tunnel's host, as curl sends it) and the port, as Istio's sidecars route TLS by SNI,
/// e.g. to an egress gateway; `None`: the port's own cluster.
fn connect_target(view: &MeshView<'_>, svc: &Service, port: u32) -> Option<route_action::ClusterSpecifier> {
    let domain = &view.mesh.domain;
    let sni = |pattern: &str| {
        pattern == svc.host || pattern.strip_prefix('*').is_some_and(|suffix| svc.host.ends_with(suffix))
    };
    let mesh = |gws: &[String]| gws.is_empty() || gws.iter().any(|g| g == "mesh");
    let (ns, route) = view
        .virtual_services
        .iter()
        .filter(|(m, vs)| vs.hosts.iter().any(|h| host::fqdn(h, &m.namespace, domain) == svc.host || sni(h)))
        .find_map(|(m, vs)| {
            let bound = mesh(&vs.gateways);
            vs.tls
                .iter()
                .find(|r| {
                    r.matches.iter().any(|mm| {
                        mm.sni_hosts.iter().any(|h| sni(h))
                            && mm.port.is_none_or(|p| p == port)
                            && mm.source_labels.iter().all(|(k, v)| view.node.labels.get(k) == Some(v))
                            && mm.source_namespace.as_deref().is_none_or(|ns| ns == view.node.namespace)
                            && if mm.gateways.is_empty() { bound } else { mesh(&mm.gateways) }
                    })
                })
                .map(|r| (m.namespace.as_str(), r))
        })?;
    Some(match super::listeners::tcp_destinations(view, ns, &route.route, port)? {
        tcp_proxy::ClusterSpecifier::Cluster(name) => route_action::ClusterSpecifier::Cluster(name),
        tcp_proxy::ClusterSpecifier::WeightedClusters(w) => {
            route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
                clusters: w
                    .clusters
                    .into_iter()
                    .map(|c| weighted_cluster::ClusterWeight {
                        name: c.name,
                        weight: Some(UInt32Value { value: c.weight }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        }
    })
}

/// The explicit proxy's virtual host for CONNECT to a non-HTTP port: a tunnel to
/// `target` (a `tls` route's destinations), else to `outbound|PORT||host`; any other
/// method finds no route (404).
fn connect_vhost(
    host: &str,
    port: u32,
    domains: Vec<String>,
    target: Option<route_action::ClusterSpecifier>,
) -> VirtualHost {
    let action = RouteAction {
        cluster_specifier: Some(
            target.unwrap_or_else(|| route_action::ClusterSpecifier::Cluster(outbound_name(port, "", host))),
        ),
        timeout: Some(PbDuration::default()),
        ..Default::default()
    };
    VirtualHost {
        name: format!("{host}:{port}"),
        domains,
        routes: vec![Route {
            name: "connect".into(),
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::ConnectMatcher(route_match::ConnectMatcher {})),
                ..Default::default()
            }),
            action: Some(route::Action::Route(action)),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Istio's `allow_any` / `block_all` virtual host for unknown authorities.
fn catch_all(view: &MeshView<'_>) -> VirtualHost {
    let allow = view.outbound_policy() == OutboundPolicy::AllowAny;
    let action = if allow {
        route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(PASSTHROUGH.into())),
            timeout: Some(PbDuration::default()),
            ..Default::default()
        })
    } else {
        route::Action::DirectResponse(DirectResponseAction { status: 502, ..Default::default() })
    };
    VirtualHost {
        name: if allow { "allow_any" } else { "block_all" }.into(),
        domains: vec!["*".into()],
        routes: vec![Route {
            name: if allow { "allow_any" } else { "block_all" }.into(),
            r#match: Some(prefix("/")),
            action: Some(action),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The virtual host of `svc` on `port`: its VirtualService's routes, else one default
/// route to `outbound|PORT||FQDN`.
fn vhost(view: &MeshView<'_>, svc: &Service, port: u32, domains: Vec<String>) -> VirtualHost {
    let routes = match virtual_service_for(view, svc) {
        Some((vs_ns, vs)) if !vs.http.is_empty() => {
            http_routes(view, vs_ns, vs, &RouteScope { port, service: Some(svc), gateways: None })
        }
        _ => {
            let cluster = outbound_name(port, "", &svc.host);
            let action = RouteAction {
                cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster)),
                timeout: Some(PbDuration::default()),
                retry_policy: Some(retry_policy(None)),
                hash_policy: hash_policy(view, svc, port, None),
                ..Default::default()
            };
            vec![Route {
                name: "default".into(),
                r#match: Some(prefix("/")),
                action: Some(route::Action::Route(action)),
                ..Default::default()
            }]
        }
    };
    VirtualHost { name: format!("{}:{port}", svc.host), domains, routes, ..Default::default() }
}

/// The VirtualService for `svc`: the first (in resource order) naming its host exactly,
/// else the first whose wildcard host covers it.
fn virtual_service_for<'a>(view: &MeshView<'a>, svc: &Service) -> Option<(&'a str, &'a VirtualService)> {
    let domain = &view.mesh.domain;
    let hosts = |m: &weft_api::ObjectMeta, vs: &VirtualService| -> Vec<String> {
        vs.hosts.iter().map(|h| host::fqdn(h, &m.namespace, domain)).collect()
    };
    let vss = &view.virtual_services;
    vss.iter()
        .find(|(m, vs)| hosts(m, vs).contains(&svc.host))
        .or_else(|| vss.iter().find(|(m, vs)| hosts(m, vs).iter().any(|h| host::matches(h, &svc.host))))
        .map(|(m, vs)| (m.namespace.as_str(), *vs))
}

/// The Envoy routes of a VirtualService's `http` rules in `scope`, in order.
pub fn http_routes(view: &MeshView<'_>, vs_ns: &str, vs: &VirtualService, scope: &RouteScope<'_>) -> Vec<Route> {
    vs.http.iter().enumerate().flat_map(|(i, r)| http_route(view, vs_ns, r, i, scope)).collect()
}

/// One VirtualService http route: an Envoy route per match that applies in `scope`.
fn http_route(view: &MeshView<'_>, vs_ns: &str, r: &HttpRoute, index: usize, scope: &RouteScope<'_>) -> Vec<Route> {
    if r.delegate.is_some() {
        return Vec::new(); // delegation is for gateways' root VirtualServices; not supported
    }
    let all = [HttpMatchRequest::default()];
    let matches: &[HttpMatchRequest] = if r.matches.is_empty() { &all } else { &r.matches };
    let name = r.name.clone().unwrap_or_else(|| format!("route-{index}"));
    matches
        .iter()
        .filter(|m| applies(view, vs_ns, m, scope))
        .filter_map(|m| Some((m, action(view, vs_ns, r, m, scope)?)))
        .map(|(m, action)| Route {
            // Istio names a route `<rule name>.<match name>` when the match has a name.
            name: match &m.name {
                Some(n) => format!("{name}.{n}"),
                _ => name.clone(),
            },
            r#match: Some(route_match(m)),
            action: Some(action),
            request_headers_to_add: r.headers.as_ref().map(|h| set_add(h, true)).unwrap_or_default(),
            request_headers_to_remove: r.headers.as_ref().map(|h| removes(h, true)).unwrap_or_default(),
            response_headers_to_add: r.headers.as_ref().map(|h| set_add(h, false)).unwrap_or_default(),
            response_headers_to_remove: r.headers.as_ref().map(|h| removes(h, false)).unwrap_or_default(),
            typed_per_filter_config: r
                .fault
                .as_ref()
                .map(|f| (FAULT_FILTER.to_string(), pack_any(fault(f))))
                .into_iter()
                .chain(r.cors_policy.as_ref().map(|c| (CORS_FILTER.to_string(), pack_any(cors(c)))))
                .collect(),
            ..Default::default()
        })
        .collect()
}

/// Whether a match applies to this proxy and port (port, source labels, namespace and
/// gateways are decided here, per proxy, as Istio does).
fn applies(view: &MeshView<'_>, vs_ns: &str, m: &HttpMatchRequest, scope: &RouteScope<'_>) -> bool {
    m.port.is_none_or(|p| p == scope.port)
        && m.source_labels.iter().all(|(k, v)| view.node.labels.get(k) == Some(v))
        && m.source_namespace.as_deref().is_none_or(|ns| ns == view.namespace())
        && scope.serves(&m.gateways, vs_ns)
}

/// The action of a rule; `None` when it has nothing to do in `scope` (no destination,
/// redirect or direct response, and no service to default to, as on a gateway).
fn action(
    view: &MeshView<'_>,
    vs_ns: &str,
    r: &HttpRoute,
    m: &HttpMatchRequest,
    scope: &RouteScope<'_>,
) -> Option<route::Action> {
    let port = scope.port;
    if let Some(d) = &r.direct_response {
        let body = d.body.as_ref().map(|b| DataSource {
            specifier: Some(match b {
                HttpBody::String(s) => data_source::Specifier::InlineString(s.clone()),
                HttpBody::Bytes(b64) => match base64_decode(b64) {
                    Some(bytes) => data_source::Specifier::InlineBytes(bytes),
                    None => data_source::Specifier::InlineString(String::new()),
                },
            }),
            ..Default::default()
        });
        return Some(route::Action::DirectResponse(DirectResponseAction {
            status: d.status,
            body,
            ..Default::default()
        }));
    }
    if let Some(rd) = &r.redirect {
        let code = match rd.redirect_code.unwrap_or(301) {
            302 => redirect_action::RedirectResponseCode::Found,
            303 => redirect_action::RedirectResponseCode::SeeOther,
            307 => redirect_action::RedirectResponseCode::TemporaryRedirect,
            308 => redirect_action::RedirectResponseCode::PermanentRedirect,
            _ => redirect_action::RedirectResponseCode::MovedPermanently,
        };
        return Some(route::Action::Redirect(RedirectAction {
            host_redirect: rd.authority.clone().unwrap_or_default(),
            // `derivePort: FROM_REQUEST_PORT`: routes are built per listening port, so
            // the request's port is this one (as Istio does).
            port_redirect: rd
                .port
                .or_else(|| (rd.derive_port.as_deref() == Some("FROM_REQUEST_PORT")).then_some(port))
                .unwrap_or(0),
            path_rewrite_specifier: rd.uri.as_deref().map(|u| match u.strip_prefix(PREFIX_REDIRECT) {
                Some(prefix) => redirect_action::PathRewriteSpecifier::PrefixRewrite(prefix.to_string()),
                None => redirect_action::PathRewriteSpecifier::PathRedirect(u.to_string()),
            }),
            scheme_rewrite_specifier: rd.scheme.clone().map(redirect_action::SchemeRewriteSpecifier::SchemeRedirect),
            response_code: code as i32,
            ..Default::default()
        }));
    }
    let cluster_of = |d: &Destination| destination_cluster(view, vs_ns, d, port);
    let dests: Vec<_> = if r.route.len() > 1 {
        r.route.iter().filter(|d| d.weight.unwrap_or(0) > 0).collect()
    } else {
        r.route.iter().collect()
    };
    let specifier = match dests.as_slice() {
        [] => route_action::ClusterSpecifier::Cluster(outbound_name(port, "", &scope.service?.host)),
        [one] => route_action::ClusterSpecifier::Cluster(cluster_of(&one.destination)),
        many => route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: many
                .iter()
                .map(|d| weighted_cluster::ClusterWeight {
                    name: cluster_of(&d.destination),
                    weight: Some(UInt32Value { value: u32::try_from(d.weight.unwrap_or(0)).unwrap_or(0) }),
                    request_headers_to_add: d.headers.as_ref().map(|h| set_add(h, true)).unwrap_or_default(),
                    request_headers_to_remove: d.headers.as_ref().map(|h| removes(h, true)).unwrap_or_default(),
                    response_headers_to_add: d.headers.as_ref().map(|h| set_add(h, false)).unwrap_or_default(),
                    response_headers_to_remove: d.headers.as_ref().map(|h| removes(h, false)).unwrap_or_default(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    };
    // The first destination with a consistent hash gives the route's hash policy (one
    // RouteAction has one list for all its weighted clusters).
    let hash = dests
        .iter()
        .map(|d| {
            let svc = view.service(&host::fqdn(&d.destination.host, vs_ns, &view.mesh.domain));
            let dport = d.destination.port.map_or(port, |p| p.number);
            svc.map(|svc| hash_policy(view, svc, dport, d.destination.subset.as_deref())).unwrap_or_default()
        })
        .find(|h| !h.is_empty())
        .or_else(|| dests.is_empty().then(|| scope.service.map(|svc| hash_policy(view, svc, port, None))).flatten())
        .unwrap_or_default();
    let mut a = RouteAction {
        cluster_specifier: Some(specifier),
        timeout: Some(r.timeout.map(|t| duration(t.0)).unwrap_or_default()),
        retry_policy: r
            .retries
            .as_ref()
            .map_or(Some(retry_policy(None)), |rt| (rt.attempts > 0).then(|| retry_policy(Some(rt)))),
        hash_policy: hash,
        ..Default::default()
    };
    if let Some(rw) = &r.rewrite {
        if let Some(uri) = &rw.uri {
            match &m.uri {
                // Istio: a prefix match has its prefix replaced; exact and regex matches
                // have the whole path replaced (for exact, the prefix is the whole path).
                Some(StringMatch::Regex(_)) => {
                    a.regex_rewrite = Some(RegexMatchAndSubstitute {
                        pattern: Some(RegexMatcher { regex: "^.*$".into(), ..Default::default() }),
                        substitution: uri.clone(),
                    })
                }
                _ => a.prefix_rewrite = uri.clone(),
            }
        }
        if let Some(rx) = &rw.uri_regex_rewrite {
            a.regex_rewrite = Some(RegexMatchAndSubstitute {
                pattern: Some(RegexMatcher { regex: rx.pattern.clone(), ..Default::default() }),
                substitution: rx.rewrite.clone(),
            });
        }
        if let Some(auth) = &rw.authority {
            a.host_rewrite_specifier = Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(auth.clone()));
        }
    }
    let mut mirrors: Vec<(Destination, f64)> = Vec::new();
    if let Some(d) = &r.mirror {
        let pct = r.mirror_percentage.map(|p| p.value).or(r.mirror_percent.map(f64::from)).unwrap_or(100.0);
        mirrors.push((d.clone(), pct));
    }
    for m in &r.mirrors {
        mirrors.push((m.destination.clone(), m.percentage.map_or(100.0, |p| p.value)));
    }
    a.request_mirror_policies = mirrors
        .iter()
        .filter(|(_, pct)| *pct > 0.0)
        .map(|(d, pct)| route_action::RequestMirrorPolicy {
            cluster: cluster_of(d),
            runtime_fraction: Some(RuntimeFractionalPercent {
                default_value: Some(fraction(Some(Percent { value: *pct }))),
                runtime_key: String::new(),
            }),
            ..Default::default()
        })
        .collect();
    Some(route::Action::Route(a))
}

/// `outbound|PORT|SUBSET|FQDN` of a destination: its port, else the service's only port,
/// else the port being routed.
pub(super) fn destination_cluster(view: &MeshView<'_>, vs_ns: &str, d: &Destination, port: u32) -> String {
    let h = host::fqdn(&d.host, vs_ns, &view.mesh.domain);
    let p = d.port.map(|p| p.number).unwrap_or_else(|| match view.service(&h).map(|s| s.ports.as_slice()) {
        Some([only]) => only.number,
        _ => port,
    });
    outbound_name(p, d.subset.as_deref().unwrap_or(""), &h)
}

/// A retry policy from Istio's `retries`, or Istio's default when `None`.
pub fn retry_policy(r: Option<&HttpRetry>) -> RetryPolicy {
    let (on, attempts) = match r {
        Some(r) => (r.retry_on.clone().unwrap_or_else(|| DEFAULT_RETRY_ON.into()), r.attempts),
        None => (DEFAULT_RETRY_ON.into(), 2),
    };
    let mut conditions = Vec::new();
    let mut codes = Vec::new();
    for part in on.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match part.parse::<u32>() {
            Ok(code) => codes.push(code),
            Err(_) => conditions.push(part.to_string()),
        }
    }
    if r.is_none_or(|r| r.retry_on.is_none()) {
        codes.push(503);
    }
    if !codes.is_empty() && !conditions.iter().any(|c| c == "retriable-status-codes") {
        conditions.push("retriable-status-codes".into());
    }
    let ignore_previous = r.and_then(|r| r.retry_ignore_previous_hosts).unwrap_or(true);
    RetryPolicy {
        retry_on: conditions.join(","),
        num_retries: Some(UInt32Value { value: u32::try_from(attempts).unwrap_or(0) }),
        per_try_timeout: r.and_then(|r| r.per_try_timeout).map(|d| duration(d.0)),
        retriable_status_codes: codes,
        // Istio's default: a retry avoids the hosts already tried (5 picks at most);
        // `retryIgnorePreviousHosts: false` turns that off.
        retry_host_predicate: if ignore_previous {
            vec![envoy_types::pb::envoy::config::route::v3::retry_policy::RetryHostPredicate {
                name: "envoy.retry_host_predicates.previous_hosts".into(),
                config_type: Some(envoy_types::pb::envoy::config::route::v3::retry_policy::retry_host_predicate::ConfigType::TypedConfig(pack_any(
                    envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate::default(),
                ))),
            }]
        } else {
            Vec::new()
        },
        host_selection_retry_max_attempts: if ignore_previous { 5 } else { 0 },
        // `backoff`: the base interval of Envoy's exponential back-off (25 ms otherwise).
        retry_back_off: r.and_then(|r| r.backoff).map(|b| {
            envoy_types::pb::envoy::config::route::v3::retry_policy::RetryBackOff {
                base_interval: Some(duration(b.0)),
                max_interval: None,
            }
        }),
        ..Default::default()
    }
}

/// Route hash policy from the service's DestinationRule `consistentHash`.
/// The route's hash policy for a destination of `svc` on `port` (subset `subset`): the
/// consistent hash of the DestinationRule's policy merged as Istio's
/// `MergeTrafficPolicy` does for that port and subset, where a matching
/// `portLevelSettings` entry replaces the load balancer (an entry without one means no
/// consistent hash) and a subset's policy overrides the rule's.
fn hash_policy(view: &MeshView<'_>, svc: &Service, port: u32, subset: Option<&str>) -> Vec<route_action::HashPolicy> {
    use route_action::hash_policy::{self, PolicySpecifier};
    let Some(dr) = view.destination_rule(svc) else { return Vec::new() };
    let merged = |tp: &'_ weft_api::spec::TrafficPolicy,
                  lb: Option<&'_ weft_api::spec::LoadBalancerSettings>|
     -> Option<weft_api::spec::LoadBalancerSettings> {
        let lb = tp.load_balancer.as_ref().or(lb).cloned();
        match tp.port_level_settings.iter().find(|p| p.port.is_some_and(|s| s.number == port)) {
            Some(p) => p.load_balancer.clone(),
            None => lb,
        }
    };
    let mut lb = dr.traffic_policy.as_ref().and_then(|tp| merged(tp, None));
    if let Some(tp) =
        subset.and_then(|n| dr.subsets.iter().find(|s| s.name == n)).and_then(|s| s.traffic_policy.as_ref())
    {
        lb = merged(tp, lb.as_ref());
    }
    let Some(ch) = lb.as_ref().and_then(|l| l.consistent_hash.as_ref()) else {
        return Vec::new();
    };
    let spec = if let Some(h) = &ch.http_header_name {
        PolicySpecifier::Header(hash_policy::Header { header_name: h.clone(), ..Default::default() })
    } else if let Some(c) = &ch.http_cookie {
        PolicySpecifier::Cookie(hash_policy::Cookie {
            name: c.name.clone(),
            path: c.path.clone().unwrap_or_default(),
            ttl: c.ttl.map(|d| duration(d.0)),
            ..Default::default()
        })
    } else if ch.use_source_ip == Some(true) {
        PolicySpecifier::ConnectionProperties(hash_policy::ConnectionProperties { source_ip: true })
    } else if let Some(q) = &ch.http_query_parameter_name {
        PolicySpecifier::QueryParameter(hash_policy::QueryParameter { name: q.clone() })
    } else {
        return Vec::new();
    };
    vec![route_action::HashPolicy { policy_specifier: Some(spec), terminal: false }]
}

fn prefix(p: &str) -> RouteMatch {
    RouteMatch { path_specifier: Some(route_match::PathSpecifier::Prefix(p.into())), ..Default::default() }
}

/// An Envoy RouteMatch for an Istio match (uri, headers, withoutHeaders, queryParams,
/// method, authority, scheme).
pub fn route_match(m: &HttpMatchRequest) -> RouteMatch {
    let path = match &m.uri {
        None => route_match::PathSpecifier::Prefix("/".into()),
        Some(StringMatch::Exact(p)) => route_match::PathSpecifier::Path(p.clone()),
        Some(StringMatch::Prefix(p)) => route_match::PathSpecifier::Prefix(p.clone()),
        Some(StringMatch::Regex(r)) => {
            route_match::PathSpecifier::SafeRegex(RegexMatcher { regex: r.clone(), ..Default::default() })
        }
    };
    let mut headers: Vec<HeaderMatcher> = m.headers.iter().map(|(k, v)| header(k, v, false)).collect();
    headers.extend(m.without_headers.iter().map(|(k, v)| header(k, v, true)));
    for (pseudo, sm) in [(":method", &m.method), (":authority", &m.authority), (":scheme", &m.scheme)] {
        if let Some(sm) = sm {
            headers.push(header(pseudo, sm, false));
        }
    }
    RouteMatch {
        path_specifier: Some(path),
        case_sensitive: m.ignore_uri_case.then_some(BoolValue { value: false }),
        headers,
        query_parameters: m
            .query_params
            .iter()
            .map(|(k, v)| QueryParameterMatcher {
                name: k.clone(),
                query_parameter_match_specifier: Some(
                    query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(string_matcher(v)),
                ),
            })
            .collect(),
        ..Default::default()
    }
}

fn header(name: &str, m: &StringMatch, invert: bool) -> HeaderMatcher {
    // Istio: an empty prefix means "present with any value".
    let spec = match m {
        StringMatch::Prefix(p) if p.is_empty() => header_matcher::HeaderMatchSpecifier::PresentMatch(true),
        _ => header_matcher::HeaderMatchSpecifier::StringMatch(string_matcher(m)),
    };
    HeaderMatcher {
        name: name.to_ascii_lowercase(),
        header_match_specifier: Some(spec),
        invert_match: invert,
        ..Default::default()
    }
}

/// An Envoy StringMatcher for an Istio StringMatch.
pub fn string_matcher(m: &StringMatch) -> StringMatcher {
    let pattern = match m {
        StringMatch::Exact(s) => string_matcher::MatchPattern::Exact(s.clone()),
        StringMatch::Prefix(s) => string_matcher::MatchPattern::Prefix(s.clone()),
        StringMatch::Regex(r) => {
            string_matcher::MatchPattern::SafeRegex(RegexMatcher { regex: r.clone(), ..Default::default() })
        }
    };
    StringMatcher { match_pattern: Some(pattern), ignore_case: false }
}

fn set_add(h: &Headers, request: bool) -> Vec<HeaderValueOption> {
    let Some(ops) = (if request { &h.request } else { &h.response }) else { return Vec::new() };
    let one = |k: &String, v: &String, action: HeaderAppendAction| HeaderValueOption {
        header: Some(HeaderValue { key: k.clone(), value: v.clone(), ..Default::default() }),
        append_action: action as i32,
        ..Default::default()
    };
    ops.set
        .iter()
        .map(|(k, v)| one(k, v, HeaderAppendAction::OverwriteIfExistsOrAdd))
        .chain(ops.add.iter().map(|(k, v)| one(k, v, HeaderAppendAction::AppendIfExistsOrAdd)))
        .collect()
}

fn removes(h: &Headers, request: bool) -> Vec<String> {
    (if request { &h.request } else { &h.response }).as_ref().map(|o| o.remove.clone()).unwrap_or_default()
}

/// Istio fault injection as the fault filter's per-route config (percentages default to 100).
/// Istio's `corsPolicy` as Envoy's per-route CORS policy (Istio's translation: lists
/// joined with `,`, `maxAge` in seconds, the filter enabled for every request).
fn cors(c: &IstioCors) -> CorsPolicy {
    let origins: Vec<StringMatcher> = if c.allow_origins.is_empty() {
        c.allow_origin
            .iter()
            .map(|o| StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact(o.clone())),
                ..Default::default()
            })
            .collect()
    } else {
        c.allow_origins.iter().map(string_matcher).collect()
    };
    CorsPolicy {
        allow_origin_string_match: origins,
        allow_methods: c.allow_methods.join(","),
        allow_headers: c.allow_headers.join(","),
        expose_headers: c.expose_headers.join(","),
        max_age: c.max_age.map(|d| d.0.as_secs().to_string()).unwrap_or_default(),
        allow_credentials: c.allow_credentials.map(|value| BoolValue { value }),
        filter_enabled: Some(RuntimeFractionalPercent {
            default_value: Some(FractionalPercent {
                numerator: 100,
                denominator: fractional_percent::DenominatorType::Hundred as i32,
            }),
            ..Default::default()
        }),
        forward_not_matching_preflights: match c.unmatched_preflights.as_deref() {
            Some("IGNORE") => Some(BoolValue { value: false }),
            _ => None,
        },
        ..Default::default()
    }
}

fn fault(f: &weft_api::spec::HttpFaultInjection) -> HttpFault {
    let delay = f.delay.as_ref().and_then(|d| {
        let fixed = d.fixed_delay.or(d.exponential_delay)?;
        let pct = d.percentage.or(d.percent.map(|p| Percent { value: p as f64 }));
        Some(FaultDelay {
            fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(duration(fixed.0))),
            percentage: Some(fraction(pct)),
        })
    });
    let abort = f.abort.as_ref().and_then(|a| {
        let error = if let Some(s) = a.http_status {
            fault_abort::ErrorType::HttpStatus(s)
        } else if let Some(g) = &a.grpc_status {
            fault_abort::ErrorType::GrpcStatus(grpc_code(g)?)
        } else {
            return None;
        };
        Some(FaultAbort { error_type: Some(error), percentage: Some(fraction(a.percentage)), ..Default::default() })
    });
    HttpFault { delay, abort, ..Default::default() }
}

fn grpc_code(name: &str) -> Option<u32> {
    const CODES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    name.parse::<u32>().ok().or_else(|| CODES.iter().position(|c| *c == name).and_then(|i| u32::try_from(i).ok()))
}

/// A percentage (default 100) as a per-million fraction, as Istio encodes it.
fn fraction(p: Option<Percent>) -> FractionalPercent {
    let value = p.map_or(100.0, |p| p.value).clamp(0.0, 100.0);
    FractionalPercent {
        numerator: (value * 10_000.0).round() as u32,
        denominator: fractional_percent::DenominatorType::Million as i32,
    }
}

/// Standard base64 (with or without padding); `None` on bad input.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    Some(out)
}
