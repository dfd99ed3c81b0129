//! Tracing, the way Istio configures Envoy: the effective `Telemetry` tracing of a proxy
//! (mesh-wide in the root namespace < namespace-wide < workload selector; a shallow merge
//! per field, `customTags` replaced whole, as Istio documents) and the mesh's default
//! provider become `HttpConnectionManager.tracing` on every HTTP connection manager of the
//! proxy (inbound ones as SERVER, the others as CLIENT, each with the rules matching its
//! mode), a route `decorator.operation` `<host>:<port>/*` on every route, and the
//! collector's cluster (`outbound|PORT||HOST`: the mesh service's own cluster when the
//! proxy has it, else a STATIC or STRICT_DNS one made here).
//!
//! Runs as the last stage of [`super::translate`] over what the other stages built, so
//! those stay unaware of tracing. A proxy with no provider resolved gets nothing: no
//! `tracing` field, no decorators (tracing off, as before).

use std::collections::BTreeMap;
use std::net::IpAddr;

use envoy_types::pb::envoy::config::cluster::v3::cluster;
use envoy_types::pb::envoy::config::core::v3::{
    grpc_service, header_value_option, http_uri, GrpcService, HeaderValue, HeaderValueOption, HttpService, HttpUri,
    TrafficDirection,
};
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, Listener};
use envoy_types::pb::envoy::config::route::v3::{route, route_action, Decorator, RouteConfiguration, VirtualHost};
use envoy_types::pb::envoy::config::trace::v3::{
    tracing as trace_http, zipkin_config, OpenTelemetryConfig, ZipkinConfig,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{self, RouteSpecifier},
    HttpConnectionManager,
};
use envoy_types::pb::envoy::r#type::tracing::v3::{custom_tag, CustomTag as PbCustomTag};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
use envoy_types::util::pack_any;
use prost::Message as _;
use weft_api::spec::{CustomTag, Telemetry};
use weft_api::{Resource, Spec};
use weft_xds::build;

use super::clusters::{cla, duration, outbound_name};
use super::model::{Ep, MeshView};
use super::{ProxyMode, ProxyXds};
use crate::meshconfig::{MeshTracing, TracingProvider};

/// The name Envoy knows the HTTP connection manager filter by.
const HCM: &str = "envoy.filters.network.http_connection_manager";

/// The tracing a proxy applies to one direction of its traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct EffectiveTracing {
    /// Provider name and settings; None: spans are not reported (`disableSpanReporting`).
    pub provider: Option<(String, TracingProvider)>,
    /// Percent of new traces sampled.
    pub sampling: f64,
    /// Custom span attributes, by tag.
    pub custom_tags: BTreeMap<String, CustomTag>,
}

/// The merged rule fields, before the mesh defaults fill the gaps.
#[derive(Debug, Default)]
struct Merged {
    provider: Option<String>,
    sampling: Option<f64>,
    disable_reporting: Option<bool>,
    custom_tags: Option<BTreeMap<String, CustomTag>>,
    any_rule: bool,
}

/// The Telemetry resources that apply to a workload in `namespace` with `labels`, least
/// specific first: the root namespace's selector-less one, the namespace's selector-less
/// one, then the first (by name) whose selector matches. Several at one level (IST0160):
/// the first by name wins.
pub fn applicable<'a>(
    resources: &'a [Resource],
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Vec<&'a Telemetry> {
    let mut telemetries: Vec<(&Resource, &Telemetry)> = resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::Telemetry(t) => Some((r, t)),
            _ => None,
        })
        .collect();
    telemetries.sort_by(|a, b| (&a.0.meta.namespace, &a.0.meta.name).cmp(&(&b.0.meta.namespace, &b.0.meta.name)));
    let wide =
        |ns: &str| telemetries.iter().find(|(r, t)| r.meta.namespace == ns && t.is_namespace_wide()).map(|x| x.1);
    let mut out = Vec::new();
    if namespace != root_namespace {
        out.extend(wide(root_namespace));
    }
    out.extend(wide(namespace));
    let selected = telemetries.iter().find(|(r, t)| {
        r.meta.namespace == namespace
            && t.selector.as_ref().is_some_and(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
    });
    out.extend(selected.map(|x| x.1));
    out
}

/// The effective tracing of `client` (outbound) or server traffic under `telemetries`
/// (least specific first), with the mesh's defaults. None: tracing off.
pub fn resolve(telemetries: &[&Telemetry], mesh: &MeshTracing, client: bool) -> Option<EffectiveTracing> {
    let mut m = Merged::default();
    for t in telemetries {
        for rule in t.tracing.iter().filter(|r| r.mode().covers(client)) {
            m.any_rule = true;
            if let Some(p) = rule.providers.first() {
                m.provider = Some(p.name.clone());
            }
            m.sampling = rule.random_sampling_percentage.or(m.sampling);
            m.disable_reporting = rule.disable_span_reporting.or(m.disable_reporting);
            if !rule.custom_tags.is_empty() {
                m.custom_tags = Some(rule.custom_tags.clone());
            }
        }
    }
    let name = match m.provider {
        Some(p) => p,
        // A Telemetry rule without provider uses the default provider even when
        // `enableTracing` is false; with no rule at all, only an enabled default applies.
        None if m.any_rule => mesh.default_providers.first()?.clone(),
        None => mesh.default_provider()?.to_string(),
    };
    let sampling = m.sampling.unwrap_or(mesh.default_sampling).clamp(0.0, 100.0);
    let custom_tags = m.custom_tags.unwrap_or_default();
    if m.disable_reporting == Some(true) {
        return Some(EffectiveTracing { provider: None, sampling, custom_tags });
    }
    let Some(provider) = mesh.providers.get(&name) else {
        ::tracing::warn!(provider = %name, "Telemetry names a tracing provider the mesh config does not define: tracing off");
        return None;
    };
    Some(EffectiveTracing { provider: Some((name, provider.clone())), sampling, custom_tags })
}

/// Adds tracing to what [`super::translate`] built for the proxy of `view`.
pub fn apply(view: &MeshView<'_>, mode: ProxyMode, out: &mut ProxyXds) {
    let mesh = &view.mesh.tracing;
    let node = view.node;
    let telemetries = applicable(&view.mesh.resources, &view.mesh.root_namespace, &node.namespace, &node.labels);
    let client = resolve(&telemetries, mesh, true);
    let server = resolve(&telemetries, mesh, false);
    if client.is_none() && server.is_none() {
        return;
    }
    let service_name = format!("{}.{}", canonical_service(view), node.namespace);
    let mut collectors = Vec::new();
    let mut hcm_tracing = |t: &Option<EffectiveTracing>| {
        t.as_ref().map(|t| {
            let provider = t.provider.as_ref().map(|(_, p)| {
                let cluster = collector_cluster(p);
                collectors.push((cluster.clone(), p.clone()));
                provider_config(p, &cluster, &service_name)
            });
            hcm_tracing_config(t, provider)
        })
    };
    let client_cfg = hcm_tracing(&client);
    let server_cfg = hcm_tracing(&server);
    for (name, p) in collectors {
        ensure_collector(view, mode, out, &name, &p);
    }
    for l in &mut out.listeners {
        let inbound = l.traffic_direction == TrafficDirection::Inbound as i32;
        let cfg = if inbound { &server_cfg } else { &client_cfg };
        let Some(cfg) = cfg else { continue };
        for_each_hcm(l, |hcm| {
            hcm.tracing = Some(cfg.clone());
            if let Some(RouteSpecifier::RouteConfig(rc)) = &mut hcm.route_specifier {
                decorate(view, rc);
            }
        });
    }
    for rc in &mut out.routes {
        decorate(view, rc);
    }
}

/// The collector's cluster name: Istio's `outbound|PORT||HOST`.
fn collector_cluster(p: &TracingProvider) -> String {
    let (host, port) = p.target();
    outbound_name(u32::from(port), "", host)
}

/// Adds the collector's cluster unless the proxy already has it (a mesh service the
/// translator made a cluster for): STATIC for an IP, STRICT_DNS for a name.
fn ensure_collector(view: &MeshView<'_>, mode: ProxyMode, out: &mut ProxyXds, name: &str, p: &TracingProvider) {
    if out.clusters.iter().any(|c| c.name == name) {
        return;
    }
    let (host, port) = p.target();
    let http2 = matches!(p, TracingProvider::OpenTelemetry { http: None, .. });
    // A mesh service the Sidecar scope hid from this proxy: its endpoints are still
    // the registry's.
    let known = view.service(host).and_then(|svc| svc.port(u32::from(port)).map(|sp| (svc, sp)));
    let eps: Vec<Ep> = match known {
        Some((svc, sp)) => view.endpoints(svc, sp, None, mode),
        None => vec![Ep::plain(host.to_string(), u32::from(port))],
    };
    let mut c = build::static_cluster(name, &[], http2);
    if known.is_none() && host.parse::<IpAddr>().is_err() {
        c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::StrictDns as i32));
    }
    // The collector is reached in plaintext: no mesh mTLS endpoint metadata.
    let eps: Vec<Ep> = eps.into_iter().map(|e| Ep { identity: None, ..e }).collect();
    c.load_assignment = Some(cla(name, &eps));
    out.clusters.push(c);
    out.clusters.sort_by(|a, b| a.name.cmp(&b.name));
}

fn provider_config(p: &TracingProvider, cluster: &str, service_name: &str) -> trace_http::Http {
    let (host, port) = p.target();
    let (envoy_name, config) = match p {
        TracingProvider::OpenTelemetry { http: None, .. } => (
            "envoy.tracers.opentelemetry",
            pack_any(OpenTelemetryConfig {
                grpc_service: Some(GrpcService {
                    target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(grpc_service::EnvoyGrpc {
                        cluster_name: cluster.into(),
                        authority: host.into(),
                        ..Default::default()
                    })),
                    ..Default::default()
                }),
                service_name: service_name.into(),
                ..Default::default()
            }),
        ),
        TracingProvider::OpenTelemetry { http: Some(h), .. } => (
            "envoy.tracers.opentelemetry",
            pack_any(OpenTelemetryConfig {
                http_service: Some(HttpService {
                    http_uri: Some(HttpUri {
                        uri: format!("http://{host}:{port}{}", h.path),
                        timeout: Some(duration(h.timeout.unwrap_or(std::time::Duration::from_secs(5)))),
                        http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster(cluster.into())),
                    }),
                    request_headers_to_add: h
                        .headers
                        .iter()
                        .map(|(k, v)| HeaderValueOption {
                            header: Some(HeaderValue { key: k.clone(), value: v.clone(), ..Default::default() }),
                            append_action: header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }),
                service_name: service_name.into(),
                ..Default::default()
            }),
        ),
        TracingProvider::Zipkin { path, .. } => (
            "envoy.tracers.zipkin",
            pack_any(ZipkinConfig {
                collector_cluster: cluster.into(),
                collector_endpoint: path.clone(),
                trace_id_128bit: true,
                shared_span_context: Some(BoolValue { value: false }),
                collector_endpoint_version: zipkin_config::CollectorEndpointVersion::HttpJson as i32,
                collector_hostname: host.into(),
                ..Default::default()
            }),
        ),
    };
    trace_http::Http { name: envoy_name.into(), config_type: Some(trace_http::http::ConfigType::TypedConfig(config)) }
}

fn hcm_tracing_config(t: &EffectiveTracing, provider: Option<trace_http::Http>) -> http_connection_manager::Tracing {
    let max_path_tag_length = match &t.provider {
        Some((_, TracingProvider::Zipkin { max_tag_length: Some(n), .. })) => Some(UInt32Value { value: *n }),
        _ => None,
    };
    http_connection_manager::Tracing {
        // Istio's: client-forced and overall sampling at 100, the random share as set.
        client_sampling: Some(Percent { value: 100.0 }),
        random_sampling: Some(Percent { value: t.sampling }),
        overall_sampling: Some(Percent { value: 100.0 }),
        custom_tags: t.custom_tags.iter().map(|(tag, c)| custom_tag(tag, c)).collect(),
        max_path_tag_length,
        provider,
        ..Default::default()
    }
}

fn custom_tag(tag: &str, c: &CustomTag) -> PbCustomTag {
    let r#type = if let Some(l) = &c.literal {
        custom_tag::Type::Literal(custom_tag::Literal { value: l.value.clone() })
    } else if let Some(e) = &c.environment {
        custom_tag::Type::Environment(custom_tag::Environment {
            name: e.name.clone(),
            default_value: e.default_value.clone().unwrap_or_default(),
        })
    } else {
        let h = c.header.clone().unwrap_or_default();
        custom_tag::Type::RequestHeader(custom_tag::Header {
            name: h.name,
            default_value: h.default_value.unwrap_or_default(),
        })
    };
    PbCustomTag { tag: tag.into(), r#type: Some(r#type) }
}

/// Istio's canonical service of the proxy's workload: the
/// `service.istio.io/canonical-name` label, else `app.kubernetes.io/name`, else `app`,
/// else the workload's name.
fn canonical_service(view: &MeshView<'_>) -> String {
    let l = &view.node.labels;
    ["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"]
        .iter()
        .find_map(|k| l.get(*k).cloned())
        .unwrap_or_else(|| view.node.name.clone())
}

/// Decodes, edits and re-encodes every HTTP connection manager of `l`.
fn for_each_hcm(l: &mut Listener, mut f: impl FnMut(&mut HttpConnectionManager)) {
    let chains = l.filter_chains.iter_mut().chain(l.default_filter_chain.iter_mut());
    for chain in chains {
        for Filter { name, config_type } in &mut chain.filters {
            if name != HCM {
                continue;
            }
            let Some(filter::ConfigType::TypedConfig(any)) = config_type else { continue };
            let Ok(mut hcm) = HttpConnectionManager::decode(any.value.as_slice()) else { continue };
            f(&mut hcm);
            any.value = hcm.encode_to_vec();
        }
    }
}

/// Sets Istio's `decorator.operation` (`<host>:<port>/*` of the route's destination) on
/// every route of `rc` that forwards and has none.
fn decorate(view: &MeshView<'_>, rc: &mut RouteConfiguration) {
    for vh in &mut rc.virtual_hosts {
        decorate_vhost(view, vh);
    }
}

fn decorate_vhost(view: &MeshView<'_>, vh: &mut VirtualHost) {
    for r in &mut vh.routes {
        if r.decorator.is_some() {
            continue;
        }
        let Some(route::Action::Route(a)) = &r.action else { continue };
        let cluster = match &a.cluster_specifier {
            Some(route_action::ClusterSpecifier::Cluster(c)) => c.clone(),
            Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
                w.clusters.first().map(|c| c.name.clone()).unwrap_or_default()
            }
            _ => continue,
        };
        if let Some(op) = operation(view, &cluster) {
            r.decorator = Some(Decorator { operation: op, propagate: None });
        }
    }
}

/// `reviews.default.svc.cluster.local:9080/*` for `outbound|9080|v1|reviews...`; for
/// `inbound|PORT||` the proxy's own service on that port.
fn operation(view: &MeshView<'_>, cluster: &str) -> Option<String> {
    let mut parts = cluster.split('|');
    match (parts.next()?, parts.next()?) {
        ("outbound", port) => {
            let host = parts.nth(1)?;
            Some(format!("{host}:{port}/*"))
        }
        ("inbound", port) => {
            let port: u32 = port.parse().ok()?;
            let node = view.node;
            let serves = |t: &super::model::Target, number: u32| match t {
                super::model::Target::Same => number == port,
                super::model::Target::Number(n) => *n == port,
                super::model::Target::Name(n) => {
                    node.ports.iter().any(|np| &np.name == n && u32::from(np.port) == port)
                }
            };
            let found = view.services.iter().find_map(|s| {
                let selects = matches!(&s.backing, super::model::Backing::Selector(sel)
                    if !sel.is_empty() && sel.iter().all(|(k, v)| node.labels.get(k) == Some(v)));
                if s.namespace != node.namespace || !selects {
                    return None;
                }
                s.ports.iter().find(|p| serves(&p.target, p.number)).map(|p| format!("{}:{}/*", s.host, p.number))
            });
            Some(found.unwrap_or_else(|| format!("{}.{}:{port}/*", canonical_service(view), node.namespace)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
