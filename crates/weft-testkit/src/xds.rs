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

/// Reads a `--log-json` proxy's stderr until it has logged its admin address and the
/// address its listener `listener` bound (port 0 in tests), then keeps draining the
/// stream so the proxy never blocks on it. Panics after 20 s or when the stream ends.
pub async fn bound_addresses(stderr: tokio::process::ChildStderr, listener: &str) -> (SocketAddr, SocketAddr) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut lines = BufReader::new(stderr).lines();
    let found = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        let (mut admin, mut out) = (None, None);
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            if let Some(a) = v["fields"]["admin_addr"].as_str() {
                admin = a.parse().ok();
            }
            if v["fields"]["listener"] == listener {
                out = v["fields"]["address"].as_str().and_then(|a| a.parse().ok());
            }
            if let (Some(a), Some(o)) = (admin, out) {
                return Some((a, o));
            }
        }
        None
    })
    .await;
    let Ok(Some(addrs)) = found else {
        panic!("the proxy did not log its admin and `{listener}` addresses within 20 s")
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    addrs
}

/// Whether the proxy's admin `/ready` answers 200 within 5 s.
pub async fn wait_ready(admin: SocketAddr) -> bool {
    for _ in 0..100 {
        if crate::http::get_h1(admin, "admin", "/ready").await.map(|r| r.status == 200).unwrap_or(false) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}
