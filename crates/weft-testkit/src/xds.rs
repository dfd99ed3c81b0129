//! A ready-made xDS server for process-level proxy tests: one listener `out` on
//! `127.0.0.1:0` routing every request to one backend.

use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use envoy_types::pb::envoy::config::route::v3::{
    route, route_action, route_match, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
};
use envoy_types::util::pack_any;
use weft_xds::build::{self, Routes};
use weft_xds::{type_url, AdsServer, StaticSource};

/// Serves, until the runtime stops, a listener `out` (HTTP, inline routes) sending every
/// request to cluster `app` = `backend`. Returns the xDS server's address.
pub async fn single_route(backend: SocketAddr) -> std::io::Result<SocketAddr> {
    let source = Arc::new(StaticSource::new());
    let set = |t: &str, v| source.set(t, v).map_err(|e| std::io::Error::other(e.to_string()));
    set(type_url::CLUSTER, vec![pack_any(build::eds_cluster("app", false))])?;
    set(type_url::ENDPOINT, vec![pack_any(build::cla("app", &[(backend, 1, HealthStatus::Healthy)]))])?;
    let rc = RouteConfiguration {
        name: "r".into(),
        virtual_hosts: vec![VirtualHost {
            name: "all".into(),
            domains: vec!["*".into()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster("app".into())),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let hcm = build::http_connection_manager("out", Routes::Inline(Box::new(rc)), None, &[]);
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    set(type_url::LISTENER, vec![pack_any(build::http_listener("out", any, hcm))])?;
    let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let xds = sock.local_addr()?;
    tokio::spawn(AdsServer::new(source).serve(sock, std::future::pending()));
    Ok(xds)
}
