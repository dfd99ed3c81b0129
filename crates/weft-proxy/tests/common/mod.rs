//! Shared harness for the proxy's in-process integration tests: an ADS server with a
//! static source, proxies bootstrapped against it, and builders for route protos.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher, route, route_action, route_match, weighted_cluster, HeaderMatcher, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher, StringMatcher};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use envoy_types::util::pack_any;
use tokio::sync::watch;
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_xds::build::{self, Routes};
use weft_xds::{type_url, AdsServer, StaticSource};

pub const WAIT: Duration = Duration::from_secs(30);

/// An in-process control plane serving whatever the test sets.
pub struct Mesh {
    pub source: Arc<StaticSource>,
    pub server: AdsServer,
    pub xds: SocketAddr,
    _stop: watch::Sender<bool>,
}

impl Mesh {
    pub async fn start() -> Mesh {
        let source = Arc::new(StaticSource::new());
        let server = AdsServer::new(source.clone());
        let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let xds = sock.local_addr().unwrap();
        let (stop, mut rx) = watch::channel(false);
        tokio::spawn(server.clone().serve(sock, async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
        Mesh { source, server, xds, _stop: stop }
    }

    pub fn set(&self, type_url: &str, resources: Vec<Any>) {
        self.source.set(type_url, resources).unwrap();
    }

    /// Starts a proxy and waits until it is ready.
    pub async fn proxy(&self, id: &str, delta: bool) -> ProxyHandle {
        self.proxy_with_log(id, delta, "off").await
    }

    /// Like [`Mesh::proxy`], writing the access log to `access_log` (`off`, `stdout`, a path).
    pub async fn proxy_with_log(&self, id: &str, delta: bool, access_log: &str) -> ProxyHandle {
        let text = format!(
            "node:\n  id: {id}\n  cluster: test\n  name: {id}\n  namespace: default\n  labels:\n    app: {id}\n    version: v1\nxds:\n  address: http://{}\n  mode: {}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"{access_log}\"\ndrain_timeout: 2s\n",
            self.xds,
            if delta { "delta" } else { "sotw" }
        );
        let b = Bootstrap::parse(&text, Path::new("test-bootstrap.yaml")).unwrap();
        let p = ProxyHandle::start(b).await.unwrap();
        assert!(p.wait_ready(WAIT).await, "proxy {id} never became ready");
        p
    }

    /// Waits until `proxy` runs the source's current version of `type_url`.
    pub async fn synced(&self, proxy: &ProxyHandle, type_url: &str) {
        let want = self.source.version(type_url);
        let mut rx = proxy.context().store.subscribe();
        let ok = tokio::time::timeout(WAIT, async {
            loop {
                if proxy.context().store.snapshot().versions.get(type_url) == Some(&want) {
                    return;
                }
                let _ = rx.changed().await;
            }
        })
        .await;
        assert!(ok.is_ok(), "proxy did not apply {type_url} version {want}");
    }

    pub async fn synced_all(&self, proxy: &ProxyHandle) {
        for t in [type_url::CLUSTER, type_url::ENDPOINT, type_url::LISTENER, type_url::ROUTE] {
            if !self.source.version(t).is_empty() && self.source.version(t) != "0" {
                self.synced(proxy, t).await;
            }
        }
    }
}

/// Sets an outbound HTTP listener `out` (127.0.0.1:0, RDS `routes`) plus EDS clusters
/// named after each backend, with the given endpoints.
pub fn http_out(upgrades: &[&str]) -> Any {
    let hcm = build::http_connection_manager("out", Routes::Rds("routes".into()), None, upgrades);
    pack_any(build::http_listener("out", "127.0.0.1:0".parse().unwrap(), hcm))
}

pub fn clusters(mesh: &Mesh, backends: &[(&str, Vec<SocketAddr>)], http2: bool) {
    mesh.set(type_url::CLUSTER, backends.iter().map(|(n, _)| pack_any(build::eds_cluster(n, http2))).collect());
    mesh.set(
        type_url::ENDPOINT,
        backends
            .iter()
            .map(|(n, eps)| {
                pack_any(build::cla(n, &eps.iter().map(|a| (*a, 1, HealthStatus::Healthy)).collect::<Vec<_>>()))
            })
            .collect(),
    );
}

/// Listener `out` (RDS `routes`) sending every request to the one endpoint `backend` of
/// cluster `cluster`.
pub fn everything_to(mesh: &Mesh, cluster: &str, backend: SocketAddr) {
    clusters(mesh, &[(cluster, vec![backend])], false);
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), to(cluster))])]))],
    );
}

pub fn rc(name: &str, vhosts: Vec<VirtualHost>) -> RouteConfiguration {
    RouteConfiguration { name: name.into(), virtual_hosts: vhosts, ..Default::default() }
}

pub fn vhost(name: &str, domains: &[&str], routes: Vec<Route>) -> VirtualHost {
    VirtualHost {
        name: name.into(),
        domains: domains.iter().map(|d| d.to_string()).collect(),
        routes,
        ..Default::default()
    }
}

pub fn prefix(p: &str) -> RouteMatch {
    RouteMatch { path_specifier: Some(route_match::PathSpecifier::Prefix(p.into())), ..Default::default() }
}

pub fn exact_header(name: &str, value: &str) -> HeaderMatcher {
    HeaderMatcher {
        name: name.into(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Exact(value.into())),
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub fn to(cluster: &str) -> RouteAction {
    RouteAction {
        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    }
}

pub fn weighted(parts: &[(&str, u32)]) -> RouteAction {
    RouteAction {
        cluster_specifier: Some(route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: parts
                .iter()
                .map(|(n, w)| weighted_cluster::ClusterWeight {
                    name: n.to_string(),
                    weight: Some(UInt32Value { value: *w }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub fn route(name: &str, m: RouteMatch, action: RouteAction) -> Route {
    Route { name: name.into(), r#match: Some(m), action: Some(route::Action::Route(action)), ..Default::default() }
}
