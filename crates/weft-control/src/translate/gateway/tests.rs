//! Unit tests of the gateway translation on the produced protos.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
use envoy_types::pb::envoy::config::route::v3::{route, route_action, route_match, virtual_host, Route, VirtualHost};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;
use prost::Message;
use weft_testkit::conformance;
use weft_xds::NodeInfo;

use crate::registry::RegistrySnapshot;
use crate::translate::{translate, MeshConfig, ProxyMode, ProxyXds};

const PRODUCTPAGE: &str = "outbound|9080||productpage.default.svc.cluster.local";

/// Istio's bookinfo.yaml (Services, Deployments) and bookinfo-gateway.yaml.
fn bookinfo() -> String {
    format!(
        "{}\n---\n{}",
        conformance("bookinfo/platform/kube/bookinfo.yaml"),
        conformance("bookinfo/networking/bookinfo-gateway.yaml")
    )
}

fn mesh(yaml: &str) -> MeshConfig {
    let parsed = weft_api::parse_str(yaml, Path::new("t.yaml"));
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let resources = parsed
        .resources
        .into_iter()
        .map(|mut r| {
            if r.meta.namespace.is_empty() {
                r.meta.namespace = "default".into();
            }
            r
        })
        .collect();
    MeshConfig { resources, ..MeshConfig::default() }
}

/// An ingress gateway proxy in `istio-system` with `labels`.
fn gateway_node(labels: &[(&str, &str)]) -> NodeInfo {
    NodeInfo {
        id: "router~10.0.0.9~ingress-1.istio-system~istio-system.svc.cluster.local".into(),
        name: "ingress-1".into(),
        namespace: "istio-system".into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..NodeInfo::default()
    }
}

fn ingress() -> NodeInfo {
    gateway_node(&[("istio", "ingressgateway")])
}

fn run(yaml: &str, node: &NodeInfo, mode: ProxyMode) -> ProxyXds {
    translate(&mesh(yaml), &RegistrySnapshot::default(), node, mode)
}

fn hcm(l: &Listener, chain: usize) -> HttpConnectionManager {
    match &l.filter_chains[chain].filters[0].config_type {
        Some(filter::ConfigType::TypedConfig(any)) => HttpConnectionManager::decode(any.value.as_slice()).unwrap(),
        other => panic!("no typed config: {other:?}"),
    }
}

fn rds(l: &Listener, chain: usize) -> String {
    match hcm(l, chain).route_specifier {
        Some(RouteSpecifier::Rds(r)) => r.route_config_name,
        other => panic!("not RDS: {other:?}"),
    }
}

fn tcp(l: &Listener, chain: usize) -> tcp_proxy::ClusterSpecifier {
    let f = &l.filter_chains[chain].filters[0];
    assert_eq!(f.name, "envoy.filters.network.tcp_proxy");
    match &f.config_type {
        Some(filter::ConfigType::TypedConfig(any)) => {
            TcpProxy::decode(any.value.as_slice()).unwrap().cluster_specifier.unwrap()
        }
        other => panic!("no typed config: {other:?}"),
    }
}

fn bound(l: &Listener) -> String {
    match &l.address.as_ref().unwrap().address {
        Some(address::Address::SocketAddress(s)) => match s.port_specifier {
            Some(socket_address::PortSpecifier::PortValue(p)) => format!("{}:{p}", s.address),
            _ => panic!("no port"),
        },
        other => panic!("not a socket address: {other:?}"),
    }
}

fn cluster(r: &Route) -> String {
    match &r.action {
        Some(route::Action::Route(a)) => match &a.cluster_specifier {
            Some(route_action::ClusterSpecifier::Cluster(c)) => c.clone(),
            other => panic!("not one cluster: {other:?}"),
        },
        other => panic!("not a route action: {other:?}"),
    }
}

fn vhosts<'a>(x: &'a ProxyXds, rc: &str) -> BTreeMap<&'a str, &'a VirtualHost> {
    x.route(rc)
        .unwrap_or_else(|| panic!("no route configuration {rc}"))
        .virtual_hosts
        .iter()
        .map(|v| (v.name.as_str(), v))
        .collect()
}

fn path_of(r: &Route) -> String {
    match r.r#match.as_ref().unwrap().path_specifier.as_ref().unwrap() {
        route_match::PathSpecifier::Path(p) => format!("exact {p}"),
        route_match::PathSpecifier::Prefix(p) => format!("prefix {p}"),
        other => format!("{other:?}"),
    }
}

#[test]
fn bookinfo_gateway_gives_listener_8080_and_http_8080_routes_to_productpage() {
    for mode in [ProxyMode::Explicit, ProxyMode::Transparent] {
        let x = run(&bookinfo(), &ingress(), mode);
        // Only the gateway listener: no sidecar listeners in either mode.
        let names: Vec<&str> = x.listeners.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["0.0.0.0_8080"], "{mode:?}");
        let l = x.listener("0.0.0.0_8080").unwrap();
        assert_eq!(bound(l), "0.0.0.0:8080");
        assert_eq!(rds(l, 0), "http.8080");
        let routes: Vec<&str> = x.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(routes, ["http.8080"], "{mode:?}");
        let rc = x.route("http.8080").unwrap();
        assert!(rc.ignore_port_in_host_matching, "a mapped listen port must not break host matching");
        let vh = vhosts(&x, "http.8080");
        let star = vh["*:8080"];
        assert_eq!(star.domains, ["*"]);
        let paths: Vec<String> = star.routes.iter().map(path_of).collect();
        assert_eq!(
            paths,
            ["exact /productpage", "prefix /static", "exact /login", "exact /logout", "prefix /api/v1/products"]
        );
        assert!(star.routes.iter().all(|r| cluster(r) == PRODUCTPAGE));
        // The outbound clusters its routes use are there, with their endpoints.
        assert!(x.cluster(PRODUCTPAGE).is_some());
        assert!(x.endpoints_of(PRODUCTPAGE).is_some());
    }
}

#[test]
fn gateway_ports_and_address_from_node_metadata_choose_the_bound_socket() {
    let mut node = ingress();
    node.gateway_ports = BTreeMap::from([(8080, 18080)]);
    node.gateway_address = Some("127.0.0.1".parse().unwrap());
    let x = run(&bookinfo(), &node, ProxyMode::Explicit);
    let l = x.listener("0.0.0.0_8080").expect("the listener keeps Istio's name");
    assert_eq!(bound(l), "127.0.0.1:18080");
    assert_eq!(rds(l, 0), "http.8080", "routes stay named by the server port");
}

#[test]
fn gateways_not_selecting_the_proxy_and_sidecars_get_no_gateway_config() {
    let other = run(&bookinfo(), &gateway_node(&[("istio", "egressgateway")]), ProxyMode::Explicit);
    assert!(other.listeners.is_empty(), "{:?}", other.listeners);
    assert!(other.routes.is_empty());

    // A sidecar ignores a VirtualService bound only to a gateway: `productpage` keeps
    // its default route, and `*` gets no virtual host of its own.
    let sidecar = NodeInfo {
        id: "sidecar~10.0.0.1~reviews-1.default~default.svc.cluster.local".into(),
        name: "reviews-1".into(),
        namespace: "default".into(),
        ..NodeInfo::default()
    };
    let x = run(&bookinfo(), &sidecar, ProxyMode::Explicit);
    assert!(x.listener("weft-outbound").is_some());
    assert!(x.listener("0.0.0.0_8080").is_none());
    let vh = vhosts(&x, "9080");
    let pp = vh["productpage.default.svc.cluster.local:9080"];
    assert_eq!(pp.routes.len(), 1);
    assert_eq!(pp.routes[0].name, "default");
}

const HOSTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: shop, namespace: ns2}
spec:
  selector: {app: shop}
  ports: [{name: http, port: 80}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["bookinfo.example.com", "ns2/*.shop.example", "./admin.example"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bound, namespace: default}
spec:
  hosts: [bookinfo.example.com, other.example]
  gateways: [istio-system/gw]
  http:
  - route: [{destination: {host: web}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: mesh-only, namespace: default}
spec:
  hosts: [bookinfo.example.com]
  http:
  - match: [{uri: {prefix: /mesh}}]
    route: [{destination: {host: web}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: wrong-ns, namespace: default}
spec:
  hosts: ["*.shop.example", admin.example]
  gateways: [istio-system/gw]
  http:
  - match: [{uri: {prefix: /wrong}}]
    route: [{destination: {host: web}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: ns2}
spec:
  hosts: ["*"]
  gateways: [istio-system/gw, mesh]
  http:
  - match: [{uri: {prefix: /only-mesh}, gateways: [mesh]}]
    route: [{destination: {host: shop}}]
  - route: [{destination: {host: shop.ns2.svc.cluster.local}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: admin, namespace: istio-system}
spec:
  hosts: [admin.example]
  gateways: [gw]
  http:
  - route: [{destination: {host: web.default.svc.cluster.local}}]
"#;

#[test]
fn virtual_hosts_follow_gateway_binding_and_server_hosts() {
    let x = run(HOSTS, &ingress(), ProxyMode::Explicit);
    let vh = vhosts(&x, "http.80");
    let names: Vec<&str> = vh.keys().copied().collect();
    // bound: only its host the server allows; mesh-only: nothing; wrong-ns: its
    // namespace may bind neither `ns2/*.shop.example` nor `./admin.example`; shop (ns2):
    // `*` narrowed to the server's hosts open to ns2; admin: `./` = the Gateway's namespace.
    assert_eq!(names, ["*.shop.example:80", "admin.example:80", "bookinfo.example.com:80"]);
    let web = "outbound|80||web.default.svc.cluster.local";
    let bi = vh["bookinfo.example.com:80"];
    assert_eq!(bi.domains, ["bookinfo.example.com"]);
    // `shop` (hosts `*`) also covers the server's `bookinfo.example.com`: routes of
    // several VirtualServices on one host are concatenated in resource order.
    assert_eq!(bi.routes.iter().map(cluster).collect::<Vec<_>>(), [web, "outbound|80||shop.ns2.svc.cluster.local"]);
    assert_eq!(cluster(&vh["admin.example:80"].routes[0]), web);
    // `match.gateways: [mesh]` keeps a rule off the gateway.
    let shop = vh["*.shop.example:80"];
    assert_eq!(shop.domains, ["*.shop.example"]);
    assert_eq!(shop.routes.len(), 1);
    assert_eq!(cluster(&shop.routes[0]), "outbound|80||shop.ns2.svc.cluster.local");
    assert!(shop.routes.iter().all(|r| path_of(r) == "prefix /"));

    // The same VirtualService (gateways: [gw, mesh]) applies to sidecars too, with the
    // rule bound to `mesh`.
    let sidecar = NodeInfo {
        id: "sidecar~10.0.0.1~c.ns2~ns2.svc.cluster.local".into(),
        name: "c".into(),
        namespace: "ns2".into(),
        ..NodeInfo::default()
    };
    let s = run(HOSTS, &sidecar, ProxyMode::Explicit);
    let shop = vhosts(&s, "80")["shop.ns2.svc.cluster.local:80"];
    assert_eq!(shop.routes.iter().map(path_of).collect::<Vec<_>>(), ["prefix /only-mesh", "prefix /"]);
}

const REDIRECT: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [secure.example, bare.example]
    tls: {httpsRedirect: true}
  - port: {number: 80, name: http-plain, protocol: HTTP}
    hosts: [plain.example]
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [secure.example]
    tls: {mode: SIMPLE, serverCertificate: /certs/tls.crt, privateKey: /certs/tls.key}
  - port: {number: 443, name: https-k8s, protocol: HTTPS}
    hosts: [k8s.example]
    tls: {mode: SIMPLE, credentialName: k8s-cert}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [secure.example, plain.example]
  gateways: [gw]
  http:
  - route: [{destination: {host: web}}]
"#;

#[test]
fn https_redirect_requires_tls_and_https_servers_terminate_with_their_files_or_credentials() {
    let x = run(REDIRECT, &ingress(), ProxyMode::Explicit);
    let vh = vhosts(&x, "http.80");
    let all = virtual_host::TlsRequirementType::All as i32;
    assert_eq!(vh["secure.example:80"].require_tls, all);
    assert_eq!(vh["secure.example:80"].routes.len(), 1);
    // A redirecting host without routes still redirects.
    assert_eq!(vh["bare.example:80"].require_tls, all);
    assert!(vh["bare.example:80"].routes.is_empty());
    assert_eq!(vh["plain.example:80"].require_tls, 0);

    // 443: a TLS chain per server, SNI from its hosts, the certificate files (or the
    // credential's SDS secret), HTTP routes of its own.
    let l = x.listener("0.0.0.0_443").unwrap();
    assert_eq!(l.filter_chains.len(), 2, "{:?}", l.filter_chains);
    let k8s = &l.filter_chains[1];
    assert_eq!(k8s.filter_chain_match.as_ref().unwrap().server_names, ["k8s.example"]);
    let ctx = match &k8s.transport_socket.as_ref().unwrap().config_type {
        Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(a)) => {
            DownstreamTlsContext::decode(a.value.as_slice()).unwrap()
        }
        None => panic!("no TLS context"),
    };
    let common = ctx.common_tls_context.unwrap();
    assert!(common.tls_certificates.is_empty());
    assert_eq!(common.tls_certificate_sds_secret_configs[0].name, "kubernetes://k8s-cert");
    assert!(common.validation_context_type.is_none(), "SIMPLE verifies no client");
    let chain = &l.filter_chains[0];
    assert_eq!(chain.filter_chain_match.as_ref().unwrap().server_names, ["secure.example"]);
    assert_eq!(l.listener_filters[0].name, "envoy.filters.listener.tls_inspector");
    let ts = chain.transport_socket.as_ref().unwrap();
    let ctx = match &ts.config_type {
        Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(a)) => {
            DownstreamTlsContext::decode(a.value.as_slice()).unwrap()
        }
        None => panic!("no TLS context"),
    };
    let cert = &ctx.common_tls_context.as_ref().unwrap().tls_certificates[0];
    assert_eq!(
        format!("{:?}", cert.certificate_chain.as_ref().unwrap().specifier),
        "Some(Filename(\"/certs/tls.crt\"))"
    );
    assert_eq!(rds(l, 0), "https.443.https.gw.default");
    let https = vhosts(&x, "https.443.https.gw.default");
    assert_eq!(https.keys().copied().collect::<Vec<_>>(), ["secure.example:443"]);
    assert_eq!(https["secure.example:443"].require_tls, 0);
}

const TCP: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec:
  selector: {app: db}
  ports: [{name: tcp, port: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: default}
spec:
  selector: {app: api}
  ports: [{name: https, port: 443}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 31400, name: tcp, protocol: TCP}
    hosts: ["*"]
  - port: {number: 8443, name: tls, protocol: TLS}
    hosts: ["*.example.com"]
    tls: {mode: PASSTHROUGH}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: default}
spec:
  hosts: ["*"]
  gateways: [gw]
  tcp:
  - match: [{port: 31400}]
    route: [{destination: {host: db, port: {number: 5432}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: default}
spec:
  hosts: [api.example.com]
  gateways: [gw]
  tls:
  - match: [{port: 8443, sniHosts: [api.example.com]}]
    route: [{destination: {host: api, port: {number: 443}}}]
  - match: [{port: 8443, sniHosts: [other.org]}]
    route: [{destination: {host: api, port: {number: 443}}}]
"#;

#[test]
fn tcp_servers_proxy_to_tcp_routes_and_passthrough_servers_route_by_sni() {
    let x = run(TCP, &ingress(), ProxyMode::Transparent);
    let l = x.listener("0.0.0.0_31400").unwrap();
    assert_eq!(tcp(l, 0), tcp_proxy::ClusterSpecifier::Cluster("outbound|5432||db.default.svc.cluster.local".into()));
    let l = x.listener("0.0.0.0_8443").unwrap();
    assert_eq!(l.filter_chains.len(), 1, "the SNI outside the server's hosts has no chain");
    assert_eq!(l.filter_chains[0].filter_chain_match.as_ref().unwrap().server_names, ["api.example.com"]);
    assert!(l.filter_chains[0].transport_socket.is_none(), "passthrough does not terminate TLS");
    assert_eq!(tcp(l, 0), tcp_proxy::ClusterSpecifier::Cluster("outbound|443||api.default.svc.cluster.local".into()));
}
