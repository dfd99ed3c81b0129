//! Which proxies and which parts of their configuration the local rate limit patches
//! reach: selector and namespace scoping, context, port, route and prefix matches.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use envoy_types::pb::envoy::config::listener::v3::filter;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use prost::Message;
use weft_xds::{NodeInfo, PortInfo};

use crate::registry::RegistrySnapshot;
use crate::translate::{translate, MeshConfig, ProxyMode, ProxyXds};

fn task(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../samples/tasks/policy-enforcement").join(name);
    std::fs::read_to_string(p).unwrap()
}

fn node(ns: &str, app: &str) -> NodeInfo {
    NodeInfo {
        id: app.into(),
        name: app.into(),
        namespace: ns.into(),
        labels: BTreeMap::from([("app".into(), app.into())]),
        ports: vec![
            PortInfo { name: "http".into(), port: 9080, protocol: "TCP".into(), app_protocol: None },
            PortInfo { name: "http-admin".into(), port: 9090, protocol: "TCP".into(), app_protocol: None },
        ],
        inbound: Some("127.0.0.1:0".parse().unwrap()),
        ..NodeInfo::default()
    }
}

fn xds(yaml: &str, node: &NodeInfo) -> ProxyXds {
    let parsed = weft_api::parse_str(yaml, Path::new("t.yaml"));
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let mesh = MeshConfig { resources: parsed.resources, ..MeshConfig::default() };
    translate(&mesh, &RegistrySnapshot::default(), node, ProxyMode::Explicit)
}

/// The connection manager of listener `name`.
fn hcm(out: &ProxyXds, name: &str) -> HttpConnectionManager {
    let l = out.listener(name).unwrap_or_else(|| panic!("no listener {name}"));
    let Some(filter::ConfigType::TypedConfig(any)) = &l.filter_chains[0].filters.last().unwrap().config_type else {
        panic!("no typed config")
    };
    HttpConnectionManager::decode(any.value.as_slice()).unwrap()
}

fn filter_names(h: &HttpConnectionManager) -> Vec<&str> {
    h.http_filters.iter().map(|f| f.name.as_str()).collect()
}

/// (route name, per-filter keys) of the inbound route configuration.
fn inbound_routes(h: &HttpConnectionManager) -> Vec<(String, Vec<String>)> {
    let Some(RouteSpecifier::RouteConfig(rc)) = &h.route_specifier else { panic!("not inline") };
    rc.virtual_hosts
        .iter()
        .flat_map(|v| &v.routes)
        .map(|r| (r.name.clone(), r.typed_per_filter_config.keys().cloned().collect()))
        .collect()
}

#[test]
fn the_task_filter_goes_into_the_selected_workloads_inbound_connection_managers_only() {
    let out = xds(&task("local-rate-limit.yaml"), &node("default", "productpage"));
    for port in [9080, 9090] {
        let names =
            filter_names(&hcm(&out, &format!("inbound|{port}"))).into_iter().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(names[0], "envoy.filters.http.local_ratelimit", "INSERT_BEFORE without subFilter: first");
        assert_eq!(names.last().map(String::as_str), Some("envoy.filters.http.router"));
    }
    assert!(
        !filter_names(&hcm(&out, "weft-outbound")).contains(&"envoy.filters.http.local_ratelimit"),
        "SIDECAR_INBOUND only"
    );
    // The root namespace's EnvoyFilter reaches productpage in any namespace, and no other app.
    let other_ns = xds(&task("local-rate-limit.yaml"), &node("shop", "productpage"));
    assert!(filter_names(&hcm(&other_ns, "inbound|9080")).contains(&"envoy.filters.http.local_ratelimit"));
    let other_app = xds(&task("local-rate-limit.yaml"), &node("default", "reviews"));
    assert!(!filter_names(&hcm(&other_app, "inbound|9080")).contains(&"envoy.filters.http.local_ratelimit"));
    // In a namespace other than the root, it stays in its namespace.
    let local = task("local-rate-limit.yaml").replace("namespace: istio-system", "namespace: default");
    assert!(filter_names(&hcm(&xds(&local, &node("default", "productpage")), "inbound|9080"))
        .contains(&"envoy.filters.http.local_ratelimit"));
    assert!(!filter_names(&hcm(&xds(&local, &node("shop", "productpage")), "inbound|9080"))
        .contains(&"envoy.filters.http.local_ratelimit"));
}

#[test]
fn the_task_route_patch_reaches_the_routes_of_the_named_virtual_host_only() {
    let out = xds(&task("local-rate-limit-route.yaml"), &node("default", "productpage"));
    let routes = inbound_routes(&hcm(&out, "inbound|9080"));
    assert_eq!(routes, [("default".to_string(), vec!["envoy.filters.http.local_ratelimit".to_string()])]);
    assert_eq!(
        inbound_routes(&hcm(&out, "inbound|9090")),
        [("default".to_string(), vec![])],
        "vhost inbound|http|9090"
    );
}

#[test]
fn a_rate_limit_with_a_port_and_path_prefix_gets_its_own_route_and_an_idle_filter() {
    let yaml = "apiVersion: weft.dev/v1alpha1
kind: RateLimit
metadata: {name: api, namespace: default}
spec:
  selector: {matchLabels: {app: productpage}}
  requestsPerUnit: 10
  unit: second
  match:
  - {port: 9080, pathPrefix: /api}
";
    let out = xds(yaml, &node("default", "productpage"));
    let h = hcm(&out, "inbound|9080");
    let name = "envoy.filters.http.local_ratelimit.default.api";
    let f = h.http_filters.iter().position(|f| f.name == name).expect("the filter");
    assert_eq!(h.http_filters[f + 1].name, "envoy.filters.http.router", "right before the router");
    let routes = inbound_routes(&h);
    assert_eq!(routes[0], ("weft-ratelimit:/api".to_string(), vec![name.to_string()]), "the prefix route first");
    assert_eq!(routes[1], ("default".to_string(), vec![]), "the catch-all is not limited");
    assert_eq!(inbound_routes(&hcm(&out, "inbound|9090")), [("default".to_string(), vec![])], "other ports are not");
}
