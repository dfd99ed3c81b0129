//! Unit tests of the translator on the produced protos.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::SystemTime;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{address, socket_address, TrafficDirection};
use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use envoy_types::pb::envoy::config::listener::v3::filter;
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher, route, route_action, route_match, Route, RouteAction, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{fault_abort, HttpFault};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::google::protobuf::value;
use prost::{Message, Name};
use weft_xds::{NodeInfo, PortInfo};

use super::*;
use crate::registry::{Registry, Workload, WorkloadSource};

const FQDN: &str = "reviews.default.svc.cluster.local";

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: 8080}]
"#;

fn resources(yaml: &str) -> Vec<weft_api::Resource> {
    let parsed = weft_api::parse_str(yaml, Path::new("t.yaml"));
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    parsed.resources
}

fn mesh(yaml: &str) -> MeshConfig {
    MeshConfig { resources: resources(yaml), ..MeshConfig::default() }
}

fn workload(id: &str, version: &str, ip: &str, inbound: Option<&str>) -> Workload {
    Workload {
        id: id.into(),
        name: id.into(),
        namespace: "default".into(),
        labels: BTreeMap::from([("app".into(), "reviews".into()), ("version".into(), version.into())]),
        service_account: "reviews".into(),
        ports: vec![PortInfo { name: "http".into(), port: 8080, protocol: "TCP".into(), app_protocol: None }],
        addresses: vec![ip.parse().unwrap()],
        inbound: inbound.map(|a| a.parse().unwrap()),
        ready: true,
        connected_since: SystemTime::UNIX_EPOCH,
        source: WorkloadSource::Proxy,
    }
}

fn registry(ws: Vec<Workload>) -> Registry {
    let r = Registry::new();
    for w in ws {
        r.upsert(w);
    }
    r
}

fn node(ns: &str) -> NodeInfo {
    NodeInfo {
        id: "client".into(),
        name: "client".into(),
        namespace: ns.into(),
        labels: BTreeMap::from([("app".into(), "client".into())]),
        ..NodeInfo::default()
    }
}

fn run(yaml: &str, ws: Vec<Workload>, mode: ProxyMode) -> ProxyXds {
    translate(&mesh(yaml), &registry(ws).snapshot(), &node("default"), mode)
}

fn eps(cla: &ClusterLoadAssignment) -> Vec<String> {
    cla.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| match &e.host_identifier {
            Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => match &ep.address.as_ref()?.address {
                Some(address::Address::SocketAddress(s)) => match s.port_specifier {
                    Some(socket_address::PortSpecifier::PortValue(p)) => Some(format!("{}:{p}", s.address)),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn lb_meta(c: &Cluster) -> Option<String> {
    let v = c.metadata.as_ref()?.filter_metadata.get("weft")?.fields.get("lb_policy")?;
    match &v.kind {
        Some(value::Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

fn vhost<'a>(x: &'a ProxyXds, rc: &str, name: &str) -> &'a VirtualHost {
    let rc = x.route(rc).unwrap_or_else(|| panic!("no route config {rc}"));
    rc.virtual_hosts.iter().find(|v| v.name == name).unwrap_or_else(|| panic!("no vhost {name}"))
}

fn action(r: &Route) -> &RouteAction {
    match &r.action {
        Some(route::Action::Route(a)) => a,
        other => panic!("not a route action: {other:?}"),
    }
}

fn cluster_of(r: &Route) -> String {
    match &action(r).cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => c.clone(),
        other => panic!("not a single cluster: {other:?}"),
    }
}

fn two_versions() -> Vec<Workload> {
    vec![
        workload("r1", "v1", "10.0.0.1", Some("127.0.0.1:7001")),
        workload("r2", "v2", "10.0.0.2", Some("127.0.0.1:7002")),
    ]
}

const SUBSETS: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}
"#;

#[test]
fn service_ports_become_eds_clusters_with_subset_clusters_and_filtered_endpoints() {
    let x = run(&format!("{SERVICE}{SUBSETS}"), two_versions(), ProxyMode::Transparent);
    let all = x.cluster(&format!("outbound|9080||{FQDN}")).unwrap();
    assert_eq!(
        all.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32))
    );
    // Istio's default balancer, for weft and Envoy alike.
    assert_eq!(lb_meta(all).as_deref(), Some("LEAST_REQUEST"));
    assert_eq!(all.lb_policy, cluster::LbPolicy::LeastRequest as i32);
    // Transparent: workload address and target port.
    assert_eq!(eps(x.endpoints_of(&format!("outbound|9080||{FQDN}")).unwrap()), ["10.0.0.1:8080", "10.0.0.2:8080"]);
    assert_eq!(eps(x.endpoints_of(&format!("outbound|9080|v1|{FQDN}")).unwrap()), ["10.0.0.1:8080"]);
    assert_eq!(eps(x.endpoints_of(&format!("outbound|9080|v2|{FQDN}")).unwrap()), ["10.0.0.2:8080"]);
    let v2 = x.cluster(&format!("outbound|9080|v2|{FQDN}")).unwrap();
    assert_eq!(lb_meta(v2).as_deref(), Some("ROUND_ROBIN"));
    assert_eq!(v2.lb_policy, cluster::LbPolicy::RoundRobin as i32);
}

#[test]
fn explicit_mode_endpoints_are_the_peers_inbound_listener_and_not_ready_workloads_are_left_out() {
    let mut ws = two_versions();
    ws[1].ready = false;
    ws.push(workload("r3", "v3", "10.0.0.3", None));
    let x = run(SERVICE, ws, ProxyMode::Explicit);
    assert_eq!(eps(x.endpoints_of(&format!("outbound|9080||{FQDN}")).unwrap()), ["10.0.0.3:8080", "127.0.0.1:7001"]);
}

#[test]
fn destination_rule_policies_map_to_cluster_settings() {
    let yaml = format!(
        r#"{SERVICE}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: reviews.default.svc.cluster.local
  trafficPolicy:
    loadBalancer: {{consistentHash: {{httpHeaderName: x-user}}}}
    connectionPool: {{tcp: {{maxConnections: 7, connectTimeout: 250ms}}, http: {{http2MaxRequests: 9, http1MaxPendingRequests: 3}}}}
    outlierDetection: {{consecutive5xxErrors: 4, interval: 5s, baseEjectionTime: 30s}}
"#
    );
    let x = run(&yaml, two_versions(), ProxyMode::Explicit);
    let c = x.cluster(&format!("outbound|9080||{FQDN}")).unwrap();
    assert_eq!(c.lb_policy, cluster::LbPolicy::RingHash as i32);
    assert_eq!(lb_meta(c), None);
    let t = &c.circuit_breakers.as_ref().unwrap().thresholds[0];
    assert_eq!(t.max_connections.map(|v| v.value), Some(7));
    assert_eq!(t.max_requests.map(|v| v.value), Some(9));
    assert_eq!(t.max_pending_requests.map(|v| v.value), Some(3));
    assert_eq!(c.connect_timeout.map(|d| d.nanos), Some(250_000_000));
    let o = c.outlier_detection.as_ref().unwrap();
    assert_eq!(o.consecutive_5xx.map(|v| v.value), Some(4));
    assert_eq!(o.base_ejection_time.map(|d| d.seconds), Some(30));
    // The hash key goes on the routes to the service.
    let vh = vhost(&x, "9080", &format!("{FQDN}:9080"));
    let hp = &action(&vh.routes[0]).hash_policy;
    assert_eq!(hp.len(), 1);
    assert!(matches!(
        &hp[0].policy_specifier,
        Some(route_action::hash_policy::PolicySpecifier::Header(h)) if h.header_name == "x-user"
    ));
}

#[test]
fn connection_pool_fields_and_the_retry_budget_translate_as_istio_does() {
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::UpstreamProtocolOptions;
    let yaml = format!(
        r#"{SERVICE}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: default
  annotations: {{weft.dev/retry-budget: "25%,5"}}
spec:
  host: reviews.default.svc.cluster.local
  trafficPolicy:
    connectionPool:
      tcp: {{maxConnections: 1, maxConnectionDuration: 1h, idleTimeout: 90s, tcpKeepalive: {{probes: 4, time: 30s, interval: 5s}}}}
      http: {{http1MaxPendingRequests: 1, maxRequestsPerConnection: 1, maxRetries: 2, useClientProtocol: true}}
"#
    );
    let x = run(&yaml, two_versions(), ProxyMode::Explicit);
    let c = x.cluster(&format!("outbound|9080||{FQDN}")).unwrap();
    let t = &c.circuit_breakers.as_ref().unwrap().thresholds[0];
    assert_eq!(t.max_connections.map(|v| v.value), Some(1));
    assert_eq!(t.max_pending_requests.map(|v| v.value), Some(1));
    assert_eq!(t.max_retries.map(|v| v.value), Some(2));
    assert_eq!(t.max_requests.map(|v| v.value), Some(u32::MAX), "Istio's default: no limit");
    let b = t.retry_budget.as_ref().expect("the annotation's budget");
    assert_eq!(b.budget_percent.as_ref().map(|p| p.value), Some(25.0));
    assert_eq!(b.min_retry_concurrency.map(|v| v.value), Some(5));
    let any = http_protocol_options(&x, &format!("outbound|9080||{FQDN}")).unwrap();
    let opts = HttpProtocolOptions::decode(any.value.as_slice()).unwrap();
    let common = opts.common_http_protocol_options.as_ref().unwrap();
    assert_eq!(common.max_requests_per_connection.map(|v| v.value), Some(1));
    assert_eq!(common.idle_timeout.map(|d| d.seconds), Some(90), "tcp.idleTimeout when http.idleTimeout is unset");
    assert_eq!(common.max_connection_duration.map(|d| d.seconds), Some(3600));
    assert!(matches!(opts.upstream_protocol_options, Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(_))));
    let k = c.upstream_connection_options.as_ref().and_then(|o| o.tcp_keepalive.as_ref()).unwrap();
    assert_eq!(k.keepalive_probes.map(|v| v.value), Some(4));
    assert_eq!(k.keepalive_time.map(|v| v.value), Some(30));
    assert_eq!(k.keepalive_interval.map(|v| v.value), Some(5));
    // weft's proxy reads all of it.
    let p = weft_proxy::cluster::ClusterConfig::compile(c).unwrap();
    assert_eq!((p.limits.max_connections, p.limits.max_pending_requests), (1, 1));
    assert_eq!(p.limits.retry_budget.map(|b| (b.budget_percent, b.min_retry_concurrency)), Some((25.0, 5)));
    assert_eq!(p.conn.max_requests_per_connection, Some(1));
    assert_eq!(p.conn.idle_timeout, Some(std::time::Duration::from_secs(90)));
    assert_eq!(p.protocol, weft_proxy::cluster::UpstreamProtocol::UseDownstream);
}

/// Clusters without a rule get Istio's "no limit" thresholds too.
#[test]
fn clusters_without_a_connection_pool_get_istios_unlimited_thresholds() {
    let x = run(SERVICE, two_versions(), ProxyMode::Explicit);
    let c = x.cluster(&format!("outbound|9080||{FQDN}")).unwrap();
    let t = &c.circuit_breakers.as_ref().unwrap().thresholds[0];
    for v in [t.max_connections, t.max_pending_requests, t.max_requests, t.max_retries] {
        assert_eq!(v.map(|v| v.value), Some(u32::MAX));
    }
    assert!(t.retry_budget.is_none());
}

#[test]
fn destination_rule_tls_modes_set_the_upstream_transport_socket_with_port_level_overrides() {
    use envoy_types::pb::envoy::config::core::v3::{data_source, transport_socket};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{common_tls_context, UpstreamTlsContext};
    let yaml = format!(
        r#"{SERVICE}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: reviews
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: /etc/ca.pem, subjectAltNames: [reviews.example]}}
    portLevelSettings:
    - port: {{number: 9080}}
      tls: {{mode: MUTUAL, clientCertificate: /etc/c.pem, privateKey: /etc/k.pem, sni: api.example}}
  subsets:
  - name: v1
    labels: {{version: v1}}
    trafficPolicy:
      tls: {{mode: DISABLE}}
"#
    );
    let x = run(&yaml, two_versions(), ProxyMode::Explicit);
    let decode = |c: &Cluster| -> Option<UpstreamTlsContext> {
        let ts = c.transport_socket.as_ref()?;
        let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else { return None };
        Some(UpstreamTlsContext::decode(any.value.as_slice()).unwrap())
    };
    // Port-level MUTUAL wins over the rule's SIMPLE for port 9080.
    let base = decode(x.cluster(&format!("outbound|9080||{FQDN}")).unwrap()).expect("TLS on the base cluster");
    assert_eq!(base.sni, "api.example");
    let common = base.common_tls_context.unwrap();
    let file = |d: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>| match d
        .as_ref()
        .and_then(|d| d.specifier.clone())
    {
        Some(data_source::Specifier::Filename(f)) => f,
        other => panic!("{other:?}"),
    };
    assert_eq!(file(&common.tls_certificates[0].certificate_chain), "/etc/c.pem");
    assert_eq!(file(&common.tls_certificates[0].private_key), "/etc/k.pem");
    assert!(common.validation_context_type.is_none());
    // The subset's DISABLE applies to its own cluster.
    assert!(decode(x.cluster(&format!("outbound|9080|v1|{FQDN}")).unwrap()).is_none());
    // Without port-level settings, SIMPLE with the CA, SAN and the host as SNI.
    let simple = yaml.replace("- port: {number: 9080}", "- port: {number: 1}");
    let x = run(&simple, two_versions(), ProxyMode::Explicit);
    let base = decode(x.cluster(&format!("outbound|9080||{FQDN}")).unwrap()).unwrap();
    assert_eq!(base.sni, FQDN);
    let Some(common_tls_context::ValidationContextType::ValidationContext(v)) =
        base.common_tls_context.unwrap().validation_context_type
    else {
        panic!("no validation context")
    };
    assert_eq!(file(&v.trusted_ca), "/etc/ca.pem");
    assert_eq!(v.match_typed_subject_alt_names.len(), 1);
}

#[test]
fn grpc_ports_get_http2_upstream_and_http_ports_do_not() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: api, namespace: default}
spec:
  selector: {app: api}
  ports: [{name: grpc-api, port: 50051}, {name: web, port: 80, appProtocol: http}, {name: h2, port: 81, appProtocol: kubernetes.io/h2c}]
"#;
    let x = run(yaml, vec![], ProxyMode::Explicit);
    let h2 = |n: &str| http_protocol_options(&x, n);
    let opts = h2("outbound|50051||api.default.svc.cluster.local").expect("grpc port is HTTP/2");
    assert_eq!(opts.type_url, HttpProtocolOptions::type_url());
    assert!(h2("outbound|81||api.default.svc.cluster.local").is_some());
    assert!(h2("outbound|80||api.default.svc.cluster.local").is_none());
}

#[test]
fn h2_upgrade_policy_upgrades_http_ports_only_where_the_rule_says_upgrade() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80}, {name: http-admin, port: 8080}, {name: tcp-db, port: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: default}
spec:
  selector: {app: plain}
  ports: [{name: http, port: 80}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  trafficPolicy:
    connectionPool:
      http: {h2UpgradePolicy: UPGRADE}
    portLevelSettings:
    - port: {number: 8080}
      connectionPool:
        http: {h2UpgradePolicy: DO_NOT_UPGRADE}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      connectionPool:
        http: {h2UpgradePolicy: DEFAULT}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: plain, namespace: default}
spec:
  host: plain
  trafficPolicy:
    connectionPool:
      http: {http2MaxRequests: 10}
"#;
    let x = run(yaml, vec![], ProxyMode::Explicit);
    let h2 = |n: &str| http_protocol_options(&x, n).is_some();
    assert!(h2("outbound|80||web.default.svc.cluster.local"), "UPGRADE on the rule");
    assert!(h2("outbound|80|v1|web.default.svc.cluster.local"), "a subset inherits the rule's UPGRADE");
    assert!(!h2("outbound|80|v2|web.default.svc.cluster.local"), "the subset's DEFAULT (do not upgrade) wins");
    assert!(!h2("outbound|8080||web.default.svc.cluster.local"), "the port-level DO_NOT_UPGRADE wins");
    assert!(!h2("outbound|5432||web.default.svc.cluster.local"), "TCP ports are never upgraded");
    assert!(!h2("outbound|80||plain.default.svc.cluster.local"), "no policy: Istio's default is not to upgrade");
    let opts = http_protocol_options(&x, "outbound|80||web.default.svc.cluster.local").expect("upgraded");
    assert_eq!(opts.type_url, HttpProtocolOptions::type_url());
}

/// The cluster `name`'s upstream HTTP protocol options (present = HTTP/2 upstream).
fn http_protocol_options(x: &ProxyXds, name: &str) -> Option<envoy_types::pb::google::protobuf::Any> {
    let c = x.cluster(name).unwrap_or_else(|| panic!("no cluster {name}"));
    c.typed_extension_protocol_options.get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions").cloned()
}

#[test]
fn service_entry_resolutions_map_to_cluster_types() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: default}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.internal.example]
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 10.1.0.1}, {address: 10.1.0.2, ports: {tcp-pg: 6432}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: any, namespace: default}
spec:
  hosts: [any.example.org]
  ports: [{number: 80, name: http, protocol: HTTP}]
"#;
    let x = run(yaml, vec![], ProxyMode::Transparent);
    let dns = x.cluster("outbound|443||api.example.com").unwrap();
    assert_eq!(
        dns.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::StrictDns as i32))
    );
    assert_eq!(eps(dns.load_assignment.as_ref().unwrap()), ["api.example.com:443"]);
    assert!(x.endpoints_of("outbound|443||api.example.com").is_none());
    assert_eq!(eps(x.endpoints_of("outbound|5432||db.internal.example").unwrap()), ["10.1.0.1:5432", "10.1.0.2:6432"]);
    let none = x.cluster("outbound|80||any.example.org").unwrap();
    assert_eq!(
        none.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::OriginalDst as i32))
    );
    assert_eq!(none.lb_policy, cluster::LbPolicy::ClusterProvided as i32);
    // TCP port -> tcp_proxy listener in transparent mode.
    let l = x.listener("0.0.0.0_5432").unwrap();
    let f = &l.filter_chains[0].filters[0];
    assert_eq!(f.name, "envoy.filters.network.tcp_proxy");
}

#[test]
fn default_route_without_virtual_service_has_istio_defaults_and_all_domains() {
    let x = run(SERVICE, two_versions(), ProxyMode::Explicit);
    let vh = vhost(&x, "9080", &format!("{FQDN}:9080"));
    for d in ["reviews", "reviews:9080", "reviews.default", "reviews.default.svc:9080", FQDN, &format!("{FQDN}:9080")] {
        assert!(vh.domains.iter().any(|x| x == d), "missing domain {d}: {:?}", vh.domains);
    }
    let a = action(&vh.routes[0]);
    assert_eq!(cluster_of(&vh.routes[0]), format!("outbound|9080||{FQDN}"));
    assert_eq!(a.timeout.map(|d| (d.seconds, d.nanos)), Some((0, 0)), "Istio: no timeout by default");
    let rp = a.retry_policy.as_ref().unwrap();
    assert_eq!(rp.num_retries.map(|v| v.value), Some(2));
    assert_eq!(rp.retry_on, routes::DEFAULT_RETRY_ON);
    assert_eq!(rp.retriable_status_codes, [503]);
    let predicates: Vec<&str> = rp.retry_host_predicate.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(predicates, ["envoy.retry_host_predicates.previous_hosts"], "a retry avoids the hosts tried");
    assert_eq!(rp.host_selection_retry_max_attempts, 5);
    // weft-outbound: ports always in the authority (port-less names mean :80).
    let out = vhost(&x, OUTBOUND, &format!("{FQDN}:9080"));
    assert!(out.domains.contains(&"reviews:9080".to_string()));
    assert!(!out.domains.contains(&"reviews".to_string()));
}

#[test]
fn short_name_domain_only_for_proxies_in_the_service_namespace() {
    let x = translate(&mesh(SERVICE), &registry(vec![]).snapshot(), &node("other"), ProxyMode::Explicit);
    let vh = vhost(&x, "9080", &format!("{FQDN}:9080"));
    assert!(!vh.domains.contains(&"reviews".to_string()));
    assert!(vh.domains.contains(&"reviews.default".to_string()));
}

const VS: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match:
    - headers: {end-user: {exact: jason}}
      withoutHeaders: {x-skip: {prefix: ""}}
      queryParams: {debug: {regex: "1|true"}}
      method: {exact: POST}
      uri: {regex: "/api/.*"}
    - uri: {exact: /only-on-80}
      port: 80
    route: [{destination: {host: reviews, subset: v2}}]
    timeout: 1.5s
    retries: {attempts: 4, perTryTimeout: 500ms, retryOn: "5xx,reset,429"}
    headers:
      request: {set: {x-a: "1"}, add: {x-b: "2"}, remove: [x-c]}
      response: {remove: [server]}
  - match: [{uri: {prefix: /fault}}]
    fault:
      abort: {httpStatus: 503, percentage: {value: 12.5}}
      delay: {fixedDelay: 2s}
    route: [{destination: {host: reviews, subset: v1}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 75}
    - {destination: {host: reviews, subset: v2}, weight: 25}
    - {destination: {host: reviews, subset: v3}, weight: 0}
    retries: {attempts: 0}
"#;

#[test]
fn virtual_service_http_routes_compile_in_order_with_matches_and_policies() {
    let x = run(&format!("{SERVICE}{SUBSETS}{VS}"), two_versions(), ProxyMode::Explicit);
    let vh = vhost(&x, "9080", &format!("{FQDN}:9080"));
    assert_eq!(vh.routes.len(), 3, "the port-80-only match is dropped on 9080: {:?}", vh.routes);
    let r = &vh.routes[0];
    assert_eq!(r.name, "jason");
    let m = r.r#match.as_ref().unwrap();
    assert!(matches!(&m.path_specifier, Some(route_match::PathSpecifier::SafeRegex(re)) if re.regex == "/api/.*"));
    let h = |n: &str| m.headers.iter().find(|h| h.name == n).unwrap();
    assert!(!h("end-user").invert_match);
    assert!(h("x-skip").invert_match);
    assert_eq!(h("x-skip").header_match_specifier, Some(header_matcher::HeaderMatchSpecifier::PresentMatch(true)));
    assert!(h(":method").header_match_specifier.is_some());
    assert_eq!(m.query_parameters[0].name, "debug");
    assert_eq!(cluster_of(r), format!("outbound|9080|v2|{FQDN}"));
    let a = action(r);
    assert_eq!(a.timeout.map(|d| (d.seconds, d.nanos)), Some((1, 500_000_000)));
    let rp = a.retry_policy.as_ref().unwrap();
    assert_eq!(rp.num_retries.map(|v| v.value), Some(4));
    assert_eq!(rp.retry_on, "5xx,reset,retriable-status-codes");
    assert_eq!(rp.retriable_status_codes, [429]);
    assert_eq!(rp.per_try_timeout.map(|d| d.nanos), Some(500_000_000));
    assert_eq!(r.request_headers_to_add.len(), 2);
    assert_eq!(r.request_headers_to_remove, ["x-c"]);
    assert_eq!(r.response_headers_to_remove, ["server"]);

    // Fault: per-route config of the fault filter, percentages per million.
    let any =
        vhost(&x, "9080", &format!("{FQDN}:9080")).routes[1].typed_per_filter_config.get(routes::FAULT_FILTER).unwrap();
    let f = HttpFault::decode(any.value.as_slice()).unwrap();
    let abort = f.abort.unwrap();
    assert_eq!(abort.error_type, Some(fault_abort::ErrorType::HttpStatus(503)));
    assert_eq!(abort.percentage.unwrap().numerator, 125_000);
    assert_eq!(f.delay.unwrap().percentage.unwrap().numerator, 1_000_000, "unset percentage means 100");

    // Weighted split: zero weights dropped; attempts 0 disables retries.
    let a = action(&vh.routes[2]);
    let Some(route_action::ClusterSpecifier::WeightedClusters(w)) = &a.cluster_specifier else { panic!("{a:?}") };
    let split: Vec<_> = w.clusters.iter().map(|c| (c.name.clone(), c.weight.map(|v| v.value))).collect();
    assert_eq!(split, [(format!("outbound|9080|v1|{FQDN}"), Some(75)), (format!("outbound|9080|v2|{FQDN}"), Some(25))]);
    assert!(a.retry_policy.is_none());
}

#[test]
fn match_on_source_labels_applies_only_to_matching_proxies() {
    let yaml = format!(
        r#"{SERVICE}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  http:
  - match: [{{sourceLabels: {{app: other}}}}]
    route: [{{destination: {{host: reviews}}}}]
    fault: {{abort: {{httpStatus: 500}}}}
  - route: [{{destination: {{host: reviews}}}}]
"#
    );
    let x = run(&yaml, vec![], ProxyMode::Explicit);
    let vh = vhost(&x, "9080", &format!("{FQDN}:9080"));
    assert_eq!(vh.routes.len(), 1);
    assert!(vh.routes[0].typed_per_filter_config.is_empty());
}

#[test]
fn redirect_direct_response_rewrite_and_mirror_compile() {
    let yaml = format!(
        r#"{SERVICE}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews.default.svc.cluster.local]
  http:
  - match: [{{uri: {{exact: /old}}}}]
    redirect: {{uri: /new, authority: b.example, redirectCode: 308}}
  - match: [{{uri: {{exact: /gone}}}}]
    directResponse: {{status: 410, body: {{bytes: aGVsbG8=}}}}
  - match: [{{uri: {{prefix: /v1}}}}]
    rewrite: {{uri: /v2, authority: backend}}
    route: [{{destination: {{host: reviews}}}}]
    mirror: {{host: reviews, subset: v2}}
    mirrorPercentage: {{value: 50}}
"#
    );
    let x = run(&yaml, vec![], ProxyMode::Explicit);
    let vh = vhost(&x, "9080", &format!("{FQDN}:9080"));
    let Some(route::Action::Redirect(rd)) = &vh.routes[0].action else { panic!() };
    assert_eq!(rd.host_redirect, "b.example");
    assert_eq!(rd.response_code, 4, "308 = PERMANENT_REDIRECT");
    let Some(route::Action::DirectResponse(dr)) = &vh.routes[1].action else { panic!() };
    assert_eq!(dr.status, 410);
    let body = dr.body.as_ref().and_then(|b| b.specifier.clone());
    assert_eq!(
        body,
        Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(b"hello".to_vec()))
    );
    let a = action(&vh.routes[2]);
    assert_eq!(a.prefix_rewrite, "/v2");
    assert_eq!(
        a.host_rewrite_specifier,
        Some(route_action::HostRewriteSpecifier::HostRewriteLiteral("backend".into()))
    );
    let mp = &a.request_mirror_policies[0];
    assert_eq!(mp.cluster, format!("outbound|9080|v2|{FQDN}"));
    assert_eq!(mp.runtime_fraction.as_ref().and_then(|f| f.default_value).map(|f| f.numerator), Some(500_000));
}

#[test]
fn explicit_mode_listeners_outbound_proxy_and_inbound_per_port() {
    let mut me = workload("client", "v1", "10.0.0.9", Some("127.0.0.1:7100"));
    me.ports.push(PortInfo { name: "tcp-db".into(), port: 5432, protocol: "TCP".into(), app_protocol: None });
    let mut n = node("default");
    n.ports = me.ports.clone();
    let x = translate(&mesh(SERVICE), &registry(vec![me]).snapshot(), &n, ProxyMode::Explicit);
    let out = x.listener(OUTBOUND).unwrap();
    assert_eq!(out.address, Some(weft_xds::build::address("127.0.0.1:15001".parse().unwrap())));
    let http = x.listener("inbound|8080").unwrap();
    assert_eq!(http.address, Some(weft_xds::build::address("127.0.0.1:7100".parse().unwrap())));
    assert_eq!(http.traffic_direction, TrafficDirection::Inbound as i32);
    let tcp = x.listener("inbound|5432").unwrap();
    assert_eq!(tcp.address, Some(weft_xds::build::address("127.0.0.1:7101".parse().unwrap())));
    let Some(filter::ConfigType::TypedConfig(any)) = &tcp.filter_chains[0].filters[0].config_type else { panic!() };
    let tp = TcpProxy::decode(any.value.as_slice()).unwrap();
    assert_eq!(tp.cluster_specifier, Some(tcp_proxy::ClusterSpecifier::Cluster("inbound|5432||".into())));
    let app = x.cluster("inbound|8080||").unwrap();
    assert_eq!(eps(app.load_assignment.as_ref().unwrap()), ["127.0.0.1:8080"]);
    assert!(x.listener("virtualOutbound").is_none());
    // Istio's unlimited thresholds, not Envoy's 1024 defaults (a burst queues at the
    // local app instead of failing with `overflow`).
    for name in ["inbound|8080||", "inbound|5432||"] {
        let c = x.cluster(name).unwrap_or_else(|| panic!("{name}"));
        let t = &c.circuit_breakers.as_ref().unwrap_or_else(|| panic!("{name}: no circuit breakers")).thresholds[0];
        for (what, v) in [
            ("max_connections", t.max_connections),
            ("max_pending_requests", t.max_pending_requests),
            ("max_requests", t.max_requests),
            ("max_retries", t.max_retries),
        ] {
            assert_eq!(v.map(|v| v.value), Some(u32::MAX), "{name}: {what}");
        }
    }
}

#[test]
fn transparent_mode_capture_listeners_follow_the_outbound_policy() {
    let mut n = node("default");
    n.ports = vec![PortInfo { name: "http".into(), port: 8080, protocol: "TCP".into(), app_protocol: None }];
    let snap = registry(vec![]).snapshot();
    let x = translate(&mesh(SERVICE), &snap, &n, ProxyMode::Transparent);
    let vo = x.listener("virtualOutbound").unwrap();
    assert_eq!(vo.use_original_dst.map(|b| b.value), Some(true));
    let Some(filter::ConfigType::TypedConfig(any)) = &vo.filter_chains[0].filters[0].config_type else { panic!() };
    let tp = TcpProxy::decode(any.value.as_slice()).unwrap();
    assert_eq!(tp.cluster_specifier, Some(tcp_proxy::ClusterSpecifier::Cluster(PASSTHROUGH.into())));
    let port = x.listener("0.0.0.0_9080").unwrap();
    assert_eq!(port.bind_to_port.map(|b| b.value), Some(false));
    let vi = x.listener("virtualInbound").unwrap();
    assert_eq!(
        vi.filter_chains[0].filter_chain_match.as_ref().and_then(|m| m.destination_port).map(|p| p.value),
        Some(8080)
    );
    assert!(vi.default_filter_chain.is_some());
    assert_eq!(vhost(&x, "9080", "allow_any").domains, ["*"]);

    let strict = MeshConfig { outbound_policy: OutboundPolicy::RegistryOnly, ..mesh(SERVICE) };
    let x = translate(&strict, &snap, &n, ProxyMode::Transparent);
    let vo = x.listener("virtualOutbound").unwrap();
    let Some(filter::ConfigType::TypedConfig(any)) = &vo.filter_chains[0].filters[0].config_type else { panic!() };
    let tp = TcpProxy::decode(any.value.as_slice()).unwrap();
    assert_eq!(tp.cluster_specifier, Some(tcp_proxy::ClusterSpecifier::Cluster(BLACKHOLE.into())));
    assert!(vhost(&x, "9080", "block_all").routes[0]
        .action
        .as_ref()
        .is_some_and(|a| matches!(a, route::Action::DirectResponse(d) if d.status == 502)));
}

#[test]
fn export_to_and_sidecar_egress_hosts_scope_what_a_proxy_sees() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: private, namespace: team-a, annotations: {networking.istio.io/exportTo: "."}}
spec: {selector: {app: p}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: public, namespace: team-a}
spec: {selector: {app: q}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: team-b}
spec: {selector: {app: o}, ports: [{name: http, port: 80}]}
"#;
    let snap = registry(vec![]).snapshot();
    let names = |x: &ProxyXds| x.clusters.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
    let x = translate(&mesh(yaml), &snap, &node("team-b"), ProxyMode::Explicit);
    assert_eq!(
        names(&x),
        ["outbound|80||other.team-b.svc.cluster.local", "outbound|80||public.team-a.svc.cluster.local"]
    );
    let x = translate(&mesh(yaml), &snap, &node("team-a"), ProxyMode::Explicit);
    assert_eq!(names(&x).len(), 3);

    let sidecar = format!(
        "{yaml}---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: team-b}}\nspec:\n  egress:\n  - hosts: [\"./*\"]\n  - port: {{number: 9000, protocol: HTTP, name: http}}\n    bind: 127.0.0.2\n    hosts: [\"team-a/public.team-a.svc.cluster.local\"]\n"
    );
    let x = translate(&mesh(&sidecar), &snap, &node("team-b"), ProxyMode::Explicit);
    assert_eq!(
        names(&x),
        ["outbound|80||other.team-b.svc.cluster.local", "outbound|80||public.team-a.svc.cluster.local"]
    );
    let bound = x.listener("127.0.0.2_9000").expect("egress bind listener");
    assert_eq!(bound.address, Some(weft_xds::build::address(SocketAddr::from(([127, 0, 0, 2], 9000)))));
    assert!(x.route("9000").is_some(), "the bound listener's routes exist");
}

#[test]
fn tcp_virtual_service_routes_become_weighted_tcp_proxies() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {selector: {app: db}, ports: [{name: tcp, port: 3306}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: default}
spec:
  hosts: [db]
  tcp:
  - route:
    - {destination: {host: db, subset: a}, weight: 90}
    - {destination: {host: db, subset: b}, weight: 10}
"#;
    let x = run(yaml, vec![], ProxyMode::Transparent);
    let l = x.listener("0.0.0.0_3306").unwrap();
    let Some(filter::ConfigType::TypedConfig(any)) = &l.filter_chains[0].filters[0].config_type else { panic!() };
    let tp = TcpProxy::decode(any.value.as_slice()).unwrap();
    let Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) = tp.cluster_specifier else { panic!("{tp:?}") };
    let split: Vec<_> = w.clusters.iter().map(|c| (c.name.as_str(), c.weight)).collect();
    assert_eq!(
        split,
        [("outbound|3306|a|db.default.svc.cluster.local", 90), ("outbound|3306|b|db.default.svc.cluster.local", 10)]
    );
    assert!(x.route("3306").is_none(), "TCP ports have no HTTP routes");
}

#[test]
fn output_is_deterministic_and_sorted() {
    let yaml = format!("{SERVICE}{SUBSETS}{VS}");
    let a = run(&yaml, two_versions(), ProxyMode::Transparent);
    let b = run(&yaml, two_versions().into_iter().rev().collect(), ProxyMode::Transparent);
    assert_eq!(a, b);
    let sorted = |v: Vec<&str>| v.windows(2).all(|w| w[0] < w[1]);
    assert!(sorted(a.clusters.iter().map(|c| c.name.as_str()).collect()));
    assert!(sorted(a.listeners.iter().map(|c| c.name.as_str()).collect()));
    assert!(sorted(a.routes.iter().map(|c| c.name.as_str()).collect()));
    let res = a.into_resources();
    assert_eq!(res.len(), 4);
    assert!(res[weft_xds::type_url::CLUSTER].iter().all(|any| any.type_url == Cluster::type_url()));
}

#[test]
fn virtual_service_hosts_without_a_service_get_a_port_80_virtual_host() {
    let yaml = format!(
        r#"{SERVICE}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: front, namespace: default}}
spec:
  hosts: [bookinfo.example.com]
  http:
  - route: [{{destination: {{host: reviews, port: {{number: 9080}}}}}}]
"#
    );
    let x = run(&yaml, vec![], ProxyMode::Explicit);
    let vh = vhost(&x, OUTBOUND, "bookinfo.example.com:80");
    assert_eq!(vh.domains, ["bookinfo.example.com", "bookinfo.example.com:80"]);
    assert_eq!(cluster_of(&vh.routes[0]), format!("outbound|9080||{FQDN}"));
    assert!(x.route("80").is_some());
    assert!(x.cluster("outbound|80||bookinfo.example.com").is_none(), "no cluster for a host without service");
}

#[test]
fn workload_entries_and_service_entry_selectors_add_endpoints() {
    let yaml = format!(
        r#"{SERVICE}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: vm-1, namespace: default}}
spec: {{address: 10.9.0.1, labels: {{app: reviews, version: v9}}, ports: {{http: 9999}}, weight: 5}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: vm-other-ns, namespace: prod}}
spec: {{address: 10.9.0.2, labels: {{app: reviews}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: vms, namespace: default}}
spec:
  hosts: [vms.example.internal]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  workloadSelector: {{labels: {{version: v9}}}}
"#
    );
    let x = run(&yaml, two_versions(), ProxyMode::Transparent);
    let cla = x.endpoints_of(&format!("outbound|9080||{FQDN}")).unwrap();
    assert_eq!(eps(cla), ["10.0.0.1:8080", "10.0.0.2:8080", "10.9.0.1:9999"]);
    let weights: Vec<_> =
        cla.endpoints[0].lb_endpoints.iter().map(|e| e.load_balancing_weight.map(|w| w.value)).collect();
    assert_eq!(weights, [Some(1), Some(1), Some(5)]);
    // The entry names its own port for `http`, which wins over the targetPort.
    assert_eq!(eps(x.endpoints_of("outbound|80||vms.example.internal").unwrap()), ["10.9.0.1:9999"]);
}

#[test]
fn sidecar_outbound_traffic_policy_overrides_the_mesh_default() {
    let yaml = format!(
        "{SERVICE}---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: istio-system}}\nspec:\n  outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}\n"
    );
    let x = run(&yaml, vec![], ProxyMode::Transparent);
    let Some(filter::ConfigType::TypedConfig(any)) =
        &x.listener("virtualOutbound").unwrap().filter_chains[0].filters[0].config_type
    else {
        panic!()
    };
    let tp = TcpProxy::decode(any.value.as_slice()).unwrap();
    assert_eq!(tp.cluster_specifier, Some(tcp_proxy::ClusterSpecifier::Cluster(BLACKHOLE.into())));
}

fn meshed(mut w: Workload) -> Workload {
    w.labels.insert(mtls::TLS_MODE_LABEL.into(), "istio".into());
    w
}

fn meshed_node(ns: &str, port: u16) -> NodeInfo {
    let mut n = node(ns);
    n.labels.insert(mtls::TLS_MODE_LABEL.into(), "istio".into());
    n.service_account = "reviews".into();
    n.inbound = Some("127.0.0.1:7100".parse().unwrap());
    n.ports = vec![PortInfo { name: "http".into(), port, protocol: "TCP".into(), app_protocol: None }];
    n
}

#[test]
fn auto_mtls_targets_meshed_endpoints_with_their_spiffe_ids_and_only_from_meshed_clients() {
    let ws = vec![meshed(workload("r1", "v1", "10.0.0.1", None)), workload("r2", "v2", "10.0.0.2", None)];
    let x = translate(
        &mesh(SERVICE),
        &registry(ws.clone()).snapshot(),
        &meshed_node("default", 8080),
        ProxyMode::Transparent,
    );
    let name = format!("outbound|9080||{FQDN}");
    let c = x.cluster(&name).unwrap();
    assert_eq!(c.transport_socket_matches.len(), 2, "{c:?}");
    let m = &c.transport_socket_matches[0];
    assert_eq!(m.name, "tlsMode-istio");
    let Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(any)) =
        &m.transport_socket.as_ref().unwrap().config_type
    else {
        panic!()
    };
    let ctx = envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext::decode(
        any.value.as_slice(),
    )
    .unwrap();
    assert_eq!(ctx.sni, format!("outbound_.9080_._.{FQDN}"));
    let text = format!("{ctx:?}");
    assert!(text.contains("spiffe://cluster.local/ns/default/sa/reviews"), "{text}");
    assert!(text.contains("ROOTCA") && text.contains("\"default\""), "{text}");
    // Only the meshed endpoint carries tlsMode: istio.
    let cla = x.endpoints.iter().find(|e| e.cluster_name == name).unwrap();
    let meta: Vec<bool> = cla.endpoints[0].lb_endpoints.iter().map(|e| e.metadata.is_some()).collect();
    assert_eq!(meta.iter().filter(|m| **m).count(), 1, "{cla:?}");
    // A client without mesh identity sends plaintext.
    let x = translate(&mesh(SERVICE), &registry(ws.clone()).snapshot(), &node("default"), ProxyMode::Transparent);
    assert!(x.cluster(&name).unwrap().transport_socket_matches.is_empty());
    // So does a meshed client when the server's PeerAuthentication disables mTLS.
    let disabled = format!(
        "{SERVICE}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: r, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: reviews}}}}\n  mtls: {{mode: DISABLE}}\n"
    );
    let x =
        translate(&mesh(&disabled), &registry(ws).snapshot(), &meshed_node("default", 8080), ProxyMode::Transparent);
    assert!(x.cluster(&name).unwrap().transport_socket_matches.is_empty());
}

#[test]
fn inbound_listeners_follow_peer_authentication_precedence_and_port_level_mtls() {
    let chains = |yaml: &str, port: u16| -> Vec<String> {
        let x =
            translate(&mesh(yaml), &registry(vec![]).snapshot(), &meshed_node("default", port), ProxyMode::Explicit);
        let l = x.listeners.iter().find(|l| l.name == format!("inbound|{port}")).unwrap();
        l.filter_chains
            .iter()
            .map(|c| c.filter_chain_match.as_ref().map(|m| m.transport_protocol.clone()).unwrap_or_default())
            .collect()
    };
    // Default: PERMISSIVE, mTLS and plaintext on the same port.
    assert_eq!(chains(SERVICE, 8080), vec!["tls", "raw_buffer"]);
    let pa = |ns: &str, name: &str, body: &str| {
        format!("---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}\n")
    };
    let mesh_strict = format!("{SERVICE}{}", pa("istio-system", "default", "  mtls: {mode: STRICT}"));
    assert_eq!(chains(&mesh_strict, 8080), vec!["tls"]);
    // The namespace overrides the mesh, the workload the namespace, UNSET inherits.
    let ns_disable = format!("{mesh_strict}{}", pa("default", "default", "  mtls: {mode: DISABLE}"));
    assert_eq!(chains(&ns_disable, 8080), vec![""]);
    let wl_unset = format!(
        "{ns_disable}{}",
        pa("default", "wl", "  selector: {matchLabels: {app: client}}\n  mtls: {mode: UNSET}")
    );
    assert_eq!(chains(&wl_unset, 8080), vec![""]);
    let wl_port = format!(
        "{ns_disable}{}",
        pa("default", "wl", "  selector: {matchLabels: {app: client}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: PERMISSIVE}")
    );
    assert_eq!(chains(&wl_port, 8080), vec!["tls", "raw_buffer"]);
    assert_eq!(chains(&wl_port, 8081), vec!["tls"]);
}

#[test]
fn transparent_strict_leaves_no_plaintext_path_into_the_workload() {
    // (port match, transport) of each virtualInbound chain, and whether a default chain
    // catches what none matches.
    let inbound = |yaml: &str| -> (Vec<(u32, String)>, bool) {
        let x =
            translate(&mesh(yaml), &registry(vec![]).snapshot(), &meshed_node("default", 8080), ProxyMode::Transparent);
        let l = x.listeners.iter().find(|l| l.name == "virtualInbound").unwrap();
        let chains = l
            .filter_chains
            .iter()
            .map(|c| {
                let m = c.filter_chain_match.clone().unwrap_or_default();
                (m.destination_port.map_or(0, |p| p.value), m.transport_protocol)
            })
            .collect();
        (chains, l.default_filter_chain.is_some())
    };
    let permissive = inbound(SERVICE);
    assert_eq!(
        permissive,
        (
            vec![
                (8080, "tls".to_string()),
                (8080, "raw_buffer".to_string()),
                (0, "tls".to_string()),
                (0, "raw_buffer".to_string())
            ],
            false
        )
    );
    let strict = format!(
        "{SERVICE}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: istio-system}}\nspec:\n  mtls: {{mode: STRICT}}\n"
    );
    // Plaintext to 8080 matches the port but no transport, and nothing catches it.
    assert_eq!(inbound(&strict), (vec![(8080, "tls".to_string()), (0, "tls".to_string())], false));
}

#[test]
fn istio_mutual_forces_mtls_with_the_rules_subject_alt_names() {
    let yaml = format!(
        "{SERVICE}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  host: reviews\n  trafficPolicy:\n    tls: {{mode: ISTIO_MUTUAL, subjectAltNames: [spiffe://cluster.local/ns/default/sa/pinned]}}\n"
    );
    // Even to endpoints without tlsMode, ISTIO_MUTUAL is mTLS for every connection.
    let ws = vec![workload("r1", "v1", "10.0.0.1", None)];
    let x = translate(&mesh(&yaml), &registry(ws).snapshot(), &meshed_node("default", 8080), ProxyMode::Transparent);
    let c = x.cluster(&format!("outbound|9080||{FQDN}")).unwrap();
    assert!(c.transport_socket_matches.is_empty());
    let Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(any)) =
        &c.transport_socket.as_ref().expect("mTLS transport socket").config_type
    else {
        panic!()
    };
    let ctx = envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext::decode(
        any.value.as_slice(),
    )
    .unwrap();
    let text = format!("{ctx:?}");
    assert!(text.contains("spiffe://cluster.local/ns/default/sa/pinned") && text.contains("ROOTCA"), "{text}");
    assert!(!text.contains("sa/reviews"), "{text}");
}

fn istio_services(c: &Cluster) -> Vec<(String, String, String)> {
    let Some(value::Kind::ListValue(list)) = c
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get("istio"))
        .and_then(|s| s.fields.get("services"))
        .and_then(|v| v.kind.clone())
    else {
        return Vec::new();
    };
    let text =
        |s: &envoy_types::pb::google::protobuf::Struct, k: &str| match s.fields.get(k).and_then(|v| v.kind.clone()) {
            Some(value::Kind::StringValue(t)) => t,
            other => panic!("{k} is {other:?}"),
        };
    list.values
        .iter()
        .map(|v| match &v.kind {
            Some(value::Kind::StructValue(s)) => (text(s, "host"), text(s, "name"), text(s, "namespace")),
            other => panic!("not a struct: {other:?}"),
        })
        .collect()
}

#[test]
fn inbound_clusters_carry_istio_service_metadata_of_the_services_selecting_the_workload_port() {
    let yaml = format!(
        "{SERVICE}---\napiVersion: v1\nkind: Service\nmetadata: {{name: reviews-alias, namespace: default}}\nspec:\n  selector: {{app: reviews}}\n  ports: [{{name: http, port: 80, targetPort: http}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: other}}\nspec:\n  selector: {{app: reviews}}\n  ports: [{{name: http, port: 8080}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: reviews-admin, namespace: default}}\nspec:\n  selector: {{app: reviews}}\n  ports: [{{name: http, port: 9999}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: ratings, namespace: default}}\nspec:\n  selector: {{app: ratings}}\n  ports: [{{name: http, port: 8080}}]\n"
    );
    let mut n = node("default");
    n.labels = BTreeMap::from([("app".into(), "reviews".into())]);
    n.ports = vec![
        PortInfo { name: "http".into(), port: 8080, protocol: "TCP".into(), app_protocol: None },
        PortInfo { name: "tcp-db".into(), port: 5432, protocol: "TCP".into(), app_protocol: None },
    ];
    n.inbound = Some("127.0.0.1:7100".parse().unwrap());
    for mode in [ProxyMode::Explicit, ProxyMode::Transparent] {
        let x = translate(&mesh(&yaml), &registry(vec![]).snapshot(), &n, mode);
        let app = x.cluster("inbound|8080||").unwrap();
        // Same namespace, selector matches, a port targets 8080 (by number or by the
        // workload port's name); sorted by host.
        assert_eq!(
            istio_services(app),
            [
                ("reviews-alias.default.svc.cluster.local".into(), "reviews-alias".into(), "default".into()),
                (FQDN.into(), "reviews".into(), "default".into()),
            ],
            "{mode:?}"
        );
        assert_eq!(lb_meta(app).as_deref(), Some("PEAK_EWMA"), "the balancer metadata stays");
        assert!(istio_services(x.cluster("inbound|5432||").unwrap()).is_empty(), "no service targets 5432");
    }
}

fn zoned(id: &str, ip: &str, zone: &str) -> Workload {
    let mut w = workload(id, "v1", ip, None);
    w.labels.insert(weft_xds::node::REGION_LABEL.into(), "r1".into());
    w.labels.insert(weft_xds::node::ZONE_LABEL.into(), zone.into());
    w
}

fn in_zone(zone: &str) -> NodeInfo {
    let mut n = node("default");
    n.labels.insert(weft_xds::node::REGION_LABEL.into(), "r1".into());
    n.labels.insert(weft_xds::node::ZONE_LABEL.into(), zone.into());
    n
}

/// (zone, priority, locality weight, endpoints) of each locality.
fn localities(cla: &ClusterLoadAssignment) -> Vec<(String, u32, u32, Vec<String>)> {
    cla.endpoints
        .iter()
        .map(|l| {
            let one = ClusterLoadAssignment { endpoints: vec![l.clone()], ..Default::default() };
            (
                l.locality.as_ref().map(|x| x.zone.clone()).unwrap_or_default(),
                l.priority,
                l.load_balancing_weight.map_or(0, |w| w.value),
                eps(&one),
            )
        })
        .collect()
}

fn locality_weighted(c: &Cluster) -> bool {
    matches!(
        c.common_lb_config.as_ref().and_then(|l| l.locality_config_specifier.as_ref()),
        Some(cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
    )
}

fn dr(traffic_policy: &str) -> String {
    format!(
        r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: reviews
  trafficPolicy: {traffic_policy}
"#
    )
}

#[test]
fn endpoints_are_grouped_by_locality_and_failover_orders_them_from_the_client_zone() {
    let ws = vec![zoned("a", "10.0.0.1", "za"), zoned("b", "10.0.0.2", "zb")];
    let name = format!("outbound|9080||{FQDN}");
    // Without outlier detection: localities, no priorities (Istio's rule).
    let x = translate(&mesh(SERVICE), &registry(ws.clone()).snapshot(), &in_zone("zb"), ProxyMode::Transparent);
    assert_eq!(
        localities(x.endpoints_of(&name).unwrap()),
        vec![("za".into(), 0, 1, vec!["10.0.0.1:8080".into()]), ("zb".into(), 0, 1, vec!["10.0.0.2:8080".into()])]
    );
    assert!(!locality_weighted(x.cluster(&name).unwrap()));
    // With it: the client's zone first, whatever the order of the registry.
    let yaml = format!("{SERVICE}{}", dr("{outlierDetection: {consecutive5xxErrors: 1}}"));
    let x = translate(&mesh(&yaml), &registry(ws.clone()).snapshot(), &in_zone("zb"), ProxyMode::Transparent);
    let mut got = localities(x.endpoints_of(&name).unwrap());
    got.sort_by_key(|l| l.1);
    assert_eq!(got[0], ("zb".into(), 0, 1, vec!["10.0.0.2:8080".into()]));
    assert_eq!(got[1], ("za".into(), 1, 1, vec!["10.0.0.1:8080".into()]));
    assert!(locality_weighted(x.cluster(&name).unwrap()));
    // `enabled: false` turns it off.
    let yaml = format!(
        "{SERVICE}{}",
        dr("{outlierDetection: {consecutive5xxErrors: 1}, loadBalancer: {localityLbSetting: {enabled: false}}}")
    );
    let x = translate(&mesh(&yaml), &registry(ws).snapshot(), &in_zone("zb"), ProxyMode::Transparent);
    assert!(localities(x.endpoints_of(&name).unwrap()).iter().all(|l| l.1 == 0));
}

#[test]
fn distribute_sets_locality_weights_for_clients_it_is_from() {
    let ws = vec![zoned("a", "10.0.0.1", "za"), zoned("b", "10.0.0.2", "zb"), zoned("c", "10.0.0.3", "zc")];
    let yaml = format!(
        "{SERVICE}{}",
        dr(
            r#"{outlierDetection: {consecutive5xxErrors: 1}, loadBalancer: {localityLbSetting: {distribute: [{from: "r1/za/*", to: {"r1/za/*": 80, "r1/zb/*": 20}}]}}}"#
        )
    );
    let name = format!("outbound|9080||{FQDN}");
    let x = translate(&mesh(&yaml), &registry(ws).snapshot(), &in_zone("za"), ProxyMode::Transparent);
    let got: Vec<(String, u32)> = localities(x.endpoints_of(&name).unwrap()).into_iter().map(|l| (l.0, l.2)).collect();
    assert_eq!(got, vec![("za".into(), 80), ("zb".into(), 20)], "zc is left out");
    assert!(locality_weighted(x.cluster(&name).unwrap()));
}

#[test]
fn maglev_and_ring_hash_sizes_follow_istio() {
    let name = format!("outbound|9080||{FQDN}");
    let lb = |yaml: &str| {
        let x = run(&format!("{SERVICE}{}", dr(yaml)), two_versions(), ProxyMode::Transparent);
        let c = x.cluster(&name).unwrap().clone();
        (c.lb_policy, c.lb_config)
    };
    let (policy, config) = lb("{loadBalancer: {consistentHash: {httpHeaderName: x, maglev: {tableSize: 251}}}}");
    assert_eq!(policy, cluster::LbPolicy::Maglev as i32);
    assert_eq!(
        config,
        Some(cluster::LbConfig::MaglevLbConfig(cluster::MaglevLbConfig {
            table_size: Some(envoy_types::pb::google::protobuf::UInt64Value { value: 251 })
        }))
    );
    let (policy, config) =
        lb("{loadBalancer: {consistentHash: {httpHeaderName: x, ringHash: {minimumRingSize: 2048}}}}");
    assert_eq!(policy, cluster::LbPolicy::RingHash as i32);
    let Some(cluster::LbConfig::RingHashLbConfig(r)) = config else { panic!("{config:?}") };
    assert_eq!(r.minimum_ring_size.map(|v| v.value), Some(2048));
    let (_, config) = lb("{loadBalancer: {consistentHash: {httpHeaderName: x}}}");
    let Some(cluster::LbConfig::RingHashLbConfig(r)) = config else { panic!("{config:?}") };
    assert_eq!(r.minimum_ring_size.map(|v| v.value), Some(1024));
}

/// The hash policy on a route is the DestinationRule's consistent hash merged for the
/// destination's port and subset as Istio's `MergeTrafficPolicy` does: a subset's load
/// balancer replaces the rule's, and a matching `portLevelSettings` entry replaces the
/// whole policy (what it omits takes the defaults: no consistent hash).
#[test]
fn route_hash_policy_merges_subset_and_port_level_settings_as_istio_does() {
    use route_action::hash_policy::PolicySpecifier;
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: 8080}, {name: http-admin, port: 9090}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews.default.svc.cluster.local
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
    outlierDetection: {consecutive5xxErrors: 9}
    portLevelSettings:
    - port: {number: 9090}
      connectionPool: {http: {http2MaxRequests: 5}}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: sticky, ttl: 0s}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /v2}}]
    route: [{destination: {host: reviews, subset: v2, port: {number: 9080}}}]
  - match: [{uri: {prefix: /admin}}]
    route: [{destination: {host: reviews, subset: v1, port: {number: 9090}}}]
  - route: [{destination: {host: reviews, subset: v1, port: {number: 9080}}}]
"#;
    let x = run(yaml, two_versions(), ProxyMode::Explicit);
    let vh = vhost(&x, "9080", &format!("{FQDN}:9080"));
    let spec = |i: usize| action(&vh.routes[i]).hash_policy.first().and_then(|h| h.policy_specifier.clone());
    // Subset v2's own consistent hash replaces the rule's.
    assert!(matches!(spec(0), Some(PolicySpecifier::Cookie(c)) if c.name == "sticky"), "{:?}", spec(0));
    // Port 9090 has a port-level entry without a load balancer: no consistent hash.
    assert_eq!(spec(1), None);
    // Subset v1 on 9080 inherits the rule's header hash.
    assert!(matches!(spec(2), Some(PolicySpecifier::Header(h)) if h.header_name == "x-user"), "{:?}", spec(2));
    // The port-level entry replaces the outlier detection too (defaults: none).
    let c9090 = x.cluster(&format!("outbound|9090||{FQDN}")).unwrap();
    assert!(c9090.outlier_detection.is_none(), "a port-level entry does not inherit outlierDetection");
    let c9080 = x.cluster(&format!("outbound|9080||{FQDN}")).unwrap();
    assert!(c9080.outlier_detection.is_some());
}
