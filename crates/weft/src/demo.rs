//! `weft demo`: the smallest working mesh in one process, to see the proxy route real
//! traffic before the control plane exists: an in-process xDS server pushes a listener,
//! routes and two clusters to a weft proxy in front of two local backends.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use envoy_types::pb::envoy::config::core::v3::{data_source, DataSource, HealthStatus};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher, route, route_action, route_match, weighted_cluster, DirectResponseAction, HeaderMatcher, Route,
    RouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher, StringMatcher};
use envoy_types::pb::google::protobuf::UInt32Value;
use envoy_types::util::pack_any;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use weft_xds::build::{self, Routes};
use weft_xds::{type_url, AdsServer, StaticSource};

/// Runs the demo until Ctrl-C / SIGTERM.
pub async fn run(port: u16) -> anyhow::Result<()> {
    let v1 = backend("demo-v1").await?;
    let v2 = backend("demo-v2").await?;

    let source = Arc::new(StaticSource::new());
    source.set(
        type_url::CLUSTER,
        vec![pack_any(build::eds_cluster("demo-v1", false)), pack_any(build::eds_cluster("demo-v2", false))],
    )?;
    source.set(
        type_url::ENDPOINT,
        vec![
            pack_any(build::cla("demo-v1", &[(v1, 1, HealthStatus::Healthy)])),
            pack_any(build::cla("demo-v2", &[(v2, 1, HealthStatus::Healthy)])),
        ],
    )?;
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let hcm = build::http_connection_manager("demo", Routes::Rds("demo-routes".into()), None, &["websocket"]);
    source.set(type_url::LISTENER, vec![pack_any(build::http_listener("demo", listen, hcm))])?;
    source.set(type_url::ROUTE, vec![pack_any(demo_routes())])?;

    let xds_sock = TcpListener::bind("127.0.0.1:0").await.context("binding the demo xDS server")?;
    let xds_addr = xds_sock.local_addr()?;
    let server = AdsServer::new(source.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut server_stop = stop_rx.clone();
    tokio::spawn(server.serve(xds_sock, async move {
        let _ = server_stop.wait_for(|s| *s).await;
    }));

    let bootstrap_text = format!(
        "node:\n  id: sidecar~127.0.0.1~demo.default~default.svc.cluster.local\n  cluster: demo.default\n  name: demo\n  namespace: default\nxds:\n  address: http://{xds_addr}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\n"
    );
    let bootstrap = weft_proxy::bootstrap::Bootstrap::parse(&bootstrap_text, std::path::Path::new("<demo>"))?;
    let proxy = weft_proxy::proxy::ProxyHandle::start(bootstrap).await?;
    if !proxy.wait_ready(std::time::Duration::from_secs(10)).await {
        anyhow::bail!("the demo proxy did not receive its configuration within 10s");
    }
    let addr = proxy
        .listener_addr("demo", std::time::Duration::from_secs(5))
        .await
        .with_context(|| format!("the demo listener could not bind {listen}"))?;
    println!("weft demo is running (Ctrl-C to stop)");
    println!("  proxy listener   http://{addr}   (backends demo-v1 {v1}, demo-v2 {v2})");
    println!("  admin            http://{}/config_dump", proxy.admin_addr());
    println!("  metrics          http://{}/stats/prometheus", proxy.metrics_addr());
    println!("try:");
    println!("  curl -s http://{addr}/hello                       # 80% demo-v1, 20% demo-v2");
    println!("  curl -s -H 'end-user: jason' http://{addr}/hello  # always demo-v2");
    println!("  curl -s http://{addr}/healthz                     # direct response from the proxy");
    println!("  curl -s -x http://{addr} http://demo.local/hello  # explicit HTTP proxy mode");
    crate::shutdown_signal().await;
    println!("draining...");
    proxy.shutdown().await;
    let _ = stop_tx.send(true);
    Ok(())
}

fn demo_routes() -> RouteConfiguration {
    let to = |cluster: &str| {
        route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        })
    };
    let prefix = |p: &str| Some(route_match::PathSpecifier::Prefix(p.into()));
    RouteConfiguration {
        name: "demo-routes".into(),
        virtual_hosts: vec![VirtualHost {
            name: "demo".into(),
            domains: vec!["*".into()],
            routes: vec![
                Route {
                    name: "healthz".into(),
                    r#match: Some(RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Path("/healthz".into())),
                        ..Default::default()
                    }),
                    action: Some(route::Action::DirectResponse(DirectResponseAction {
                        status: 200,
                        body: Some(DataSource {
                            specifier: Some(data_source::Specifier::InlineString("ok\n".into())),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                },
                Route {
                    name: "jason".into(),
                    r#match: Some(RouteMatch {
                        path_specifier: prefix("/"),
                        headers: vec![HeaderMatcher {
                            name: "end-user".into(),
                            header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
                                StringMatcher {
                                    match_pattern: Some(string_matcher::MatchPattern::Exact("jason".into())),
                                    ..Default::default()
                                },
                            )),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    action: Some(to("demo-v2")),
                    ..Default::default()
                },
                Route {
                    name: "split".into(),
                    r#match: Some(RouteMatch { path_specifier: prefix("/"), ..Default::default() }),
                    action: Some(route::Action::Route(RouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
                            clusters: vec![
                                weighted_cluster::ClusterWeight {
                                    name: "demo-v1".into(),
                                    weight: Some(UInt32Value { value: 80 }),
                                    ..Default::default()
                                },
                                weighted_cluster::ClusterWeight {
                                    name: "demo-v2".into(),
                                    weight: Some(UInt32Value { value: 20 }),
                                    ..Default::default()
                                },
                            ],
                            ..Default::default()
                        })),
                        ..Default::default()
                    })),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A tiny HTTP backend answering with its name and the request line.
async fn backend(name: &'static str) -> anyhow::Result<SocketAddr> {
    let sock = TcpListener::bind("127.0.0.1:0").await?;
    let addr = sock.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = sock.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| async move {
                    let text = format!("hello from {name}: {} {}\n", req.method(), req.uri());
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}
