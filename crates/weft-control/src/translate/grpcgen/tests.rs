//! Unit tests of the gRPC generator on the produced protos.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::google::protobuf::{Struct, Value};
use prost::Message;

use super::*;
use crate::registry::Registry;
use crate::translate::MeshConfig;

const FQDN: &str = "echo.default.svc.cluster.local";
const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  selector: {app: echo}
  ports: [{name: grpc, port: 7070}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: echo-1, namespace: default}
spec:
  address: 127.0.0.1
  ports: {grpc: 17070}
  labels: {app: echo, version: v1, security.istio.io/tlsMode: istio}
  serviceAccount: echo
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo]
  http:
  - match: [{headers: {x-variant: {exact: canary}}}]
    route: [{destination: {host: echo, subset: v1}}]
    timeout: 2s
    retries: {attempts: 4, retryOn: "unavailable,5xx"}
  - route:
    - {destination: {host: echo, subset: v1}, weight: 80}
    - {destination: {host: echo, subset: v2}, weight: 20}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: default}
spec:
  host: echo
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
    tls: {mode: ISTIO_MUTUAL}
    connectionPool: {http: {http2MaxRequests: 10}}
    outlierDetection: {consecutive5xxErrors: 2}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

fn mesh() -> MeshConfig {
    let parsed = weft_api::parse_str(MESH, Path::new("t.yaml"));
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    MeshConfig { resources: parsed.resources, ..MeshConfig::default() }
}

fn client() -> NodeInfo {
    NodeInfo { id: "client".into(), name: "client".into(), namespace: "default".into(), ..NodeInfo::default() }
}

fn xds() -> ProxyXds {
    translate(&mesh(), &Registry::new().snapshot(), &client(), ProxyMode::Explicit)
}

#[test]
fn grpc_nodes_are_recognised_by_user_agent_or_generator() {
    let ua = |ua: &str| Node { user_agent_name: ua.into(), ..Node::default() };
    assert!(is_grpc(&ua("gRPC C-core linux Python")));
    assert!(is_grpc(&ua("grpc-java")));
    assert!(!is_grpc(&ua("envoy")));
    assert!(!is_grpc(&ua("weft")));
    let generator = Node {
        user_agent_name: "istio-agent".into(),
        metadata: Some(Struct {
            fields: BTreeMap::from([(GENERATOR.to_string(), Value { kind: Some(Kind::StringValue("grpc".into())) })])
                .into_iter()
                .collect(),
        }),
        ..Node::default()
    };
    assert!(is_grpc(&generator));
}

#[test]
fn namespace_comes_from_an_istio_node_id_without_metadata() {
    let node = Node { id: "sidecar~10.0.0.1~client-7d9.shop~shop.svc.cluster.local".into(), ..Node::default() };
    let info = node_info(&node);
    assert_eq!((info.name.as_str(), info.namespace.as_str()), ("client-7d9", "shop"));
}

#[test]
fn listeners_are_api_listeners_per_service_name_and_port() {
    let out = xds();
    let names: Vec<&str> = out.listeners.iter().map(|l| l.name.as_str()).collect();
    for name in [format!("{FQDN}:7070"), "echo:7070".into(), "echo.default:7070".into(), "echo.default.svc:7070".into()]
    {
        assert!(names.contains(&name.as_str()), "{name} missing from {names:?}");
    }
    let l = out.listener("echo:7070").unwrap();
    assert!(l.filter_chains.is_empty());
    let hcm =
        HttpConnectionManager::decode(l.api_listener.as_ref().unwrap().api_listener.as_ref().unwrap().value.as_slice())
            .unwrap();
    let filters: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(filters, ["envoy.filters.http.fault", "envoy.filters.http.router"]);
    match hcm.route_specifier {
        Some(RouteSpecifier::Rds(rds)) => assert_eq!(rds.route_config_name, format!("outbound|7070||{FQDN}")),
        other => panic!("no RDS: {other:?}"),
    }
}

#[test]
fn routes_carry_matches_weights_timeouts_and_grpc_retry_codes() {
    let out = xds();
    let rc = out.route(&format!("outbound|7070||{FQDN}")).unwrap();
    assert_eq!(rc.virtual_hosts.len(), 1);
    assert!(rc.virtual_hosts[0].domains.contains(&"echo:7070".to_string()));
    let routes = &rc.virtual_hosts[0].routes;
    let Some(route::Action::Route(first)) = &routes[0].action else { panic!("not a route") };
    assert_eq!(routes[0].r#match.as_ref().unwrap().headers[0].name, "x-variant");
    assert_eq!(first.max_stream_duration.as_ref().unwrap().max_stream_duration.as_ref().unwrap().seconds, 2);
    let retry = first.retry_policy.as_ref().unwrap();
    assert_eq!(retry.retry_on, "unavailable");
    assert_eq!(retry.num_retries.as_ref().unwrap().value, 4);
    assert!(retry.retry_host_predicate.is_empty());
    assert_eq!(first.hash_policy.len(), 1);
    let Some(route::Action::Route(second)) = &routes[1].action else { panic!("not a route") };
    match &second.cluster_specifier {
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
            let weights: Vec<(String, u32)> =
                w.clusters.iter().map(|c| (c.name.clone(), c.weight.unwrap().value)).collect();
            assert_eq!(weights, [(format!("outbound|7070|v1|{FQDN}"), 80), (format!("outbound|7070|v2|{FQDN}"), 20)]);
        }
        other => panic!("not weighted: {other:?}"),
    }
    assert!(second.max_stream_duration.is_none(), "no timeout, no max_stream_duration");
}

#[test]
fn clusters_are_eds_ring_hash_with_grpc_mtls_and_weighted_localities() {
    let out = xds();
    let c = out.cluster(&format!("outbound|7070|v1|{FQDN}")).unwrap();
    assert_eq!(c.lb_policy, cluster::LbPolicy::RingHash as i32);
    assert_eq!(c.eds_cluster_config.as_ref().unwrap().service_name, c.name);
    let limits = &c.circuit_breakers.as_ref().unwrap().thresholds[0];
    assert_eq!(limits.max_requests.unwrap().value, 10);
    assert!(limits.max_connections.is_none(), "gRPC reads max_requests only");
    assert!(c.outlier_detection.is_none(), "not sent, as Istio");
    let ts = c.transport_socket.as_ref().unwrap();
    assert_eq!(ts.name, "envoy.transport_sockets.tls");
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else { panic!() };
    let ctx = UpstreamTlsContext::decode(any.value.as_slice()).unwrap();
    let common = ctx.common_tls_context.unwrap();
    assert_eq!(common.tls_certificate_provider_instance.unwrap().instance_name, "default");
    let Some(common_tls_context::ValidationContextType::ValidationContext(v)) = common.validation_context_type else {
        panic!()
    };
    assert_eq!(v.ca_certificate_provider_instance.unwrap().certificate_name, "ROOTCA");
    #[allow(deprecated)]
    let sans: Vec<_> = v.match_subject_alt_names.iter().map(|m| m.match_pattern.clone()).collect();
    assert_eq!(sans, [Some(string_matcher::MatchPattern::Exact("spiffe://cluster.local/ns/default/sa/echo".into()))]);
    let cla = out.endpoints_of(&c.name).unwrap();
    assert!(cla.endpoints.iter().all(|l| l.locality.is_some() && l.load_balancing_weight.is_some_and(|w| w.value > 0)));
    assert_eq!(cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum::<usize>(), 1);
}

#[test]
fn bootstrap_names_the_file_watcher_provider() {
    let b = bootstrap("127.0.0.1:15010", "client", "default", Some(Path::new("/certs")), &[]);
    assert_eq!(b["certificate_providers"]["default"]["plugin_name"], "file_watcher");
    assert_eq!(b["node"]["metadata"]["GENERATOR"], "grpc");
    assert_eq!(b["xds_servers"][0]["server_features"][0], "xds_v3");
}
