//! Precedence of Telemetry tracing and what it becomes on the proxy's xDS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use envoy_types::pb::envoy::config::cluster::v3::cluster;
use envoy_types::pb::envoy::config::listener::v3::filter;
use envoy_types::pb::envoy::config::trace::v3::{tracing as trace_http, OpenTelemetryConfig, ZipkinConfig};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::Tracing, HttpConnectionManager,
};
use envoy_types::pb::envoy::r#type::tracing::v3::custom_tag;
use prost::Message;
use weft_xds::{NodeInfo, PortInfo};

use super::*;
use crate::meshconfig::MeshConfigFile;
use crate::registry::Registry;
use crate::translate::{translate, MeshConfig};

const MESH_CONFIG: &str = "
defaultConfig: {tracing: {sampling: 5}}
defaultProviders: {tracing: [otel]}
extensionProviders:
- name: otel
  opentelemetry: {service: 127.0.0.1, port: 4317}
- name: zipkin
  zipkin: {service: zipkin.example.com, port: 9411}
";

fn resources(yaml: &str) -> Vec<weft_api::Resource> {
    let parsed = weft_api::parse_str(yaml, Path::new("t.yaml"));
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    parsed.resources
}

fn mesh(yaml: &str, mesh_config: &str) -> MeshConfig {
    let tracing = MeshConfigFile::parse(mesh_config).unwrap().tracing;
    MeshConfig { resources: resources(yaml), tracing, ..MeshConfig::default() }
}

fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_string(), app.to_string()), ("version".to_string(), "v1".to_string())])
}

fn effective(yaml: &str, ns: &str, app: &str, client: bool) -> Option<EffectiveTracing> {
    let m = mesh(yaml, MESH_CONFIG);
    let ts = applicable(&m.resources, &m.root_namespace, ns, &labels(app));
    resolve(&ts, &m.tracing, client)
}

const LEVELS: &str = "
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - randomSamplingPercentage: 10
    customTags:
      level: {literal: {value: mesh}}
      cluster: {environment: {name: CLUSTER, defaultValue: none}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: ns, namespace: shop}
spec:
  tracing:
  - providers: [{name: zipkin}]
    customTags:
      level: {literal: {value: namespace}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: reviews, namespace: shop}
spec:
  selector: {matchLabels: {app: reviews}}
  tracing:
  - randomSamplingPercentage: 50
  - match: {mode: SERVER}
    disableSpanReporting: true
";

#[test]
fn mesh_then_namespace_then_workload_each_field_from_the_most_specific() {
    // Mesh level only (another namespace): the mesh's sampling and tags, default provider.
    let t = effective(LEVELS, "other", "reviews", true).unwrap();
    assert_eq!(t.provider.as_ref().map(|p| p.0.as_str()), Some("otel"));
    assert_eq!(t.sampling, 10.0);
    assert_eq!(t.custom_tags.keys().collect::<Vec<_>>(), ["cluster", "level"]);
    // Namespace: provider overridden, sampling inherited, customTags replaced whole.
    let t = effective(LEVELS, "shop", "productpage", true).unwrap();
    assert_eq!(t.provider.as_ref().map(|p| p.0.as_str()), Some("zipkin"));
    assert_eq!(t.sampling, 10.0);
    assert_eq!(t.custom_tags.keys().collect::<Vec<_>>(), ["level"]);
    assert_eq!(t.custom_tags["level"].literal.as_ref().unwrap().value, "namespace");
    // Workload: sampling overridden; its SERVER rule stops span reporting inbound only.
    let client = effective(LEVELS, "shop", "reviews", true).unwrap();
    assert_eq!(client.sampling, 50.0);
    assert_eq!(client.provider.as_ref().map(|p| p.0.as_str()), Some("zipkin"));
    let server = effective(LEVELS, "shop", "reviews", false).unwrap();
    assert_eq!(server.sampling, 50.0);
    assert_eq!(server.provider, None, "disableSpanReporting: propagate, report nothing");
}

#[test]
fn without_telemetry_the_mesh_default_provider_and_sampling_apply_and_nothing_without_one() {
    let t = effective("", "default", "reviews", true).unwrap();
    assert_eq!(t.provider.as_ref().map(|p| p.0.as_str()), Some("otel"));
    assert_eq!(t.sampling, 5.0);
    let m = mesh("", "extensionProviders: [{name: otel, opentelemetry: {service: c, port: 4317}}]");
    assert_eq!(resolve(&[], &m.tracing, true), None, "no default provider, no Telemetry: tracing off");
    let off = mesh("", &format!("enableTracing: false\n{MESH_CONFIG}"));
    assert_eq!(resolve(&[], &off.tracing, true), None, "enableTracing: false turns the default off");
    let unknown = mesh(
        "apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: t, namespace: istio-system}
spec:
  tracing: [{providers: [{name: nope}]}]
",
        MESH_CONFIG,
    );
    let ts = applicable(&unknown.resources, "istio-system", "default", &labels("x"));
    assert_eq!(resolve(&ts, &unknown.tracing, true), None, "an undefined provider: tracing off");
}

fn hcm_tracing(x: &ProxyXds, listener: &str) -> Option<Tracing> {
    let l = x.listener(listener).unwrap_or_else(|| panic!("no listener {listener}"));
    let f = &l.filter_chains[0].filters[0];
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else { panic!() };
    HttpConnectionManager::decode(any.value.as_slice()).unwrap().tracing
}

fn typed(p: &trace_http::Http) -> &[u8] {
    match &p.config_type {
        Some(trace_http::http::ConfigType::TypedConfig(a)) => a.value.as_slice(),
        None => panic!("no typed config"),
    }
}

const BOOKINFO: &str = "
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec:
  selector: {app: ratings}
  ports: [{name: http, port: 9080}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: reviews, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  tracing:
  - randomSamplingPercentage: 25
    customTags:
      user: {header: {name: end-user, defaultValue: anonymous}}
";

fn reviews_node() -> NodeInfo {
    NodeInfo {
        id: "sidecar~10.0.0.1~reviews-v1.default~default.svc.cluster.local".into(),
        name: "reviews-v1".into(),
        namespace: "default".into(),
        labels: labels("reviews"),
        ports: vec![PortInfo { name: "http".into(), port: 9080, protocol: "TCP".into(), app_protocol: None }],
        inbound: Some("127.0.0.1:15006".parse().unwrap()),
        ..NodeInfo::default()
    }
}

#[test]
fn hcm_tracing_carries_provider_sampling_and_tags_and_routes_get_decorators() {
    let m = mesh(BOOKINFO, MESH_CONFIG);
    let x = translate(&m, &Registry::new().snapshot(), &reviews_node(), ProxyMode::Explicit);
    let out = hcm_tracing(&x, crate::translate::OUTBOUND).expect("outbound HCM traced");
    let inb = hcm_tracing(&x, "inbound|9080").expect("inbound HCM traced");
    for t in [&out, &inb] {
        assert_eq!(t.random_sampling.as_ref().unwrap().value, 25.0);
        assert_eq!(t.custom_tags.len(), 1);
        assert_eq!(t.custom_tags[0].tag, "user");
        let Some(custom_tag::Type::RequestHeader(h)) = &t.custom_tags[0].r#type else { panic!() };
        assert_eq!((h.name.as_str(), h.default_value.as_str()), ("end-user", "anonymous"));
        let p = t.provider.as_ref().unwrap();
        assert_eq!(p.name, "envoy.tracers.opentelemetry");
        let otel = OpenTelemetryConfig::decode(typed(p)).unwrap();
        let Some(grpc_service::TargetSpecifier::EnvoyGrpc(g)) = otel.grpc_service.unwrap().target_specifier else {
            panic!()
        };
        assert_eq!(g.cluster_name, "outbound|4317||127.0.0.1");
        assert_eq!(otel.service_name, "reviews.default");
    }
    let c = x.cluster("outbound|4317||127.0.0.1").expect("collector cluster");
    assert_eq!(
        c.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Static as i32))
    );
    assert!(c.typed_extension_protocol_options.contains_key("envoy.extensions.upstreams.http.v3.HttpProtocolOptions"));
    // Outbound routes: Istio's `<host>:<port>/*`; inbound: the workload's own service.
    let rc = x.route("9080").expect("route 9080");
    let ops: Vec<&str> = rc
        .virtual_hosts
        .iter()
        .flat_map(|v| &v.routes)
        .filter_map(|r| r.decorator.as_ref().map(|d| d.operation.as_str()))
        .collect();
    assert!(ops.contains(&"ratings.default.svc.cluster.local:9080/*"), "{ops:?}");
    let l = x.listener("inbound|9080").unwrap();
    let Some(filter::ConfigType::TypedConfig(any)) = &l.filter_chains[0].filters[0].config_type else { panic!() };
    let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
    let Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) = hcm.route_specifier else { panic!() };
    assert_eq!(
        rc.virtual_hosts[0].routes[0].decorator.as_ref().map(|d| d.operation.as_str()),
        Some("reviews.default.svc.cluster.local:9080/*")
    );
}

#[test]
fn zipkin_provider_and_mode_rules_apply_per_direction_and_no_provider_means_no_tracing() {
    let yaml = format!(
        "{BOOKINFO}---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: mesh, namespace: istio-system}}
spec:
  tracing:
  - providers: [{{name: zipkin}}]
    match: {{mode: CLIENT}}
"
    );
    let m = mesh(&yaml, "extensionProviders: [{name: zipkin, zipkin: {service: zipkin.example.com, port: 9411}}]");
    let x = translate(&m, &Registry::new().snapshot(), &reviews_node(), ProxyMode::Explicit);
    let out = hcm_tracing(&x, crate::translate::OUTBOUND).expect("CLIENT rule: outbound traced");
    let p = out.provider.as_ref().unwrap();
    assert_eq!(p.name, "envoy.tracers.zipkin");
    let z = ZipkinConfig::decode(typed(p)).unwrap();
    assert_eq!(z.collector_cluster, "outbound|9411||zipkin.example.com");
    assert_eq!(z.collector_endpoint, "/api/v2/spans");
    assert!(z.trace_id_128bit);
    assert_eq!(z.shared_span_context.map(|b| b.value), Some(false));
    assert_eq!(out.random_sampling.unwrap().value, 25.0, "the workload rule's sampling still applies");
    assert_eq!(hcm_tracing(&x, "inbound|9080"), None, "no SERVER rule and no default provider: inbound untraced");
    let c = x.cluster("outbound|9411||zipkin.example.com").unwrap();
    assert_eq!(
        c.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::StrictDns as i32))
    );
    // No mesh config at all: nothing changes.
    let plain = MeshConfig { resources: resources(BOOKINFO), ..MeshConfig::default() };
    let x = translate(&plain, &Registry::new().snapshot(), &reviews_node(), ProxyMode::Explicit);
    assert_eq!(hcm_tracing(&x, crate::translate::OUTBOUND), None);
    assert!(x.routes.iter().flat_map(|r| &r.virtual_hosts).flat_map(|v| &v.routes).all(|r| r.decorator.is_none()));
}

#[test]
fn a_mesh_service_collector_uses_its_outbound_cluster() {
    let yaml = format!(
        "{BOOKINFO}---
apiVersion: v1
kind: Service
metadata: {{name: otel-collector, namespace: observability}}
spec:
  selector: {{app: otel}}
  ports: [{{name: grpc-otlp, port: 4317}}]
"
    );
    let m = mesh(
        &yaml,
        "defaultProviders: {tracing: [otel]}
extensionProviders: [{name: otel, opentelemetry: {service: otel-collector.observability.svc.cluster.local, port: 4317}}]",
    );
    let x = translate(&m, &Registry::new().snapshot(), &reviews_node(), ProxyMode::Explicit);
    let name = "outbound|4317||otel-collector.observability.svc.cluster.local";
    let c = x.cluster(name).expect("the service's own cluster");
    assert_eq!(c.cluster_discovery_type, Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32)));
    assert_eq!(x.clusters.iter().filter(|c| c.name == name).count(), 1);
}
