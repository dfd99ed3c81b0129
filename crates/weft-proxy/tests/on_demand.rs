//! On-demand delta xDS against a plain static control plane: virtual hosts fetched per
//! host over VHDS (merged after the route configuration's own catch-all), clusters by
//! name, a bad virtual host NACKed alone, and SotW refusing `vhds`.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use envoy_types::pb::envoy::config::core::v3::{config_source, AggregatedConfigSource, ConfigSource};
use envoy_types::pb::envoy::config::route::v3::{
    route, route_match, DirectResponseAction, Route, RouteConfiguration, RouteMatch, Vhds,
};
use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
use envoy_types::util::pack_any;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::get_h1;
use weft_xds::type_url;

fn vhds_rc(name: &str, own: Vec<envoy_types::pb::envoy::config::route::v3::VirtualHost>) -> RouteConfiguration {
    RouteConfiguration {
        vhds: Some(Vhds {
            config_source: Some(ConfigSource {
                config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
                ..Default::default()
            }),
        }),
        ..rc(name, own)
    }
}

fn teapot() -> Route {
    Route {
        name: "catch-all".into(),
        r#match: Some(prefix("/")),
        action: Some(route::Action::DirectResponse(DirectResponseAction { status: 418, ..Default::default() })),
        ..Default::default()
    }
}

#[tokio::test]
async fn virtual_hosts_and_clusters_come_on_demand_and_a_bad_vhost_is_nacked_alone() {
    let mesh = Mesh::start().await;
    let a = EchoServer::start("a").await;
    let b = EchoServer::start("b").await;
    clusters(&mesh, &[("a", vec![a.addr]), ("b", vec![b.addr]), ("unused", vec![b.addr])], false);
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    mesh.set(type_url::ROUTE, vec![pack_any(vhds_rc("routes", vec![vhost("any", &["*"], vec![teapot()])]))]);
    let bad_route = route(
        "bad",
        RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::SafeRegex(RegexMatcher {
                regex: "/(unclosed".into(),
                ..Default::default()
            })),
            ..Default::default()
        },
        to("b"),
    );
    mesh.set(
        type_url::VIRTUAL_HOST,
        vec![
            pack_any(vhost("routes/a", &["a.test", "*.a.test"], vec![route("r", prefix("/"), to("a"))])),
            pack_any(vhost("routes/b", &["b.test"], vec![route("r", prefix("/"), to("b"))])),
            pack_any(vhost("routes/bad", &["bad.test"], vec![bad_route])),
        ],
    );
    let proxy = mesh.proxy("on-demand", true).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    let snap = proxy.context().store.snapshot();
    assert!(snap.clusters.is_empty(), "no cluster before a request needs one: {:?}", snap.clusters.keys());

    // A host matching a wildcard domain: fetched, routed on the first request.
    assert_eq!(get_h1(out, "x.a.test", "/").await.unwrap().header("x-echo-server"), Some("a"));
    let snap = proxy.context().store.snapshot();
    assert_eq!(snap.on_demand.vhosts, 1);
    assert_eq!(snap.clusters.keys().collect::<Vec<_>>(), ["a"], "only the cluster the vhost names");
    // An unknown host falls to the route configuration's own catch-all.
    assert_eq!(get_h1(out, "nope.test", "/").await.unwrap().status, 418);
    assert!(proxy.context().store.snapshot().on_demand.answered.contains("routes/nope.test"));

    // A virtual host that does not compile is NACKed alone; the others keep serving.
    let mut st = proxy.xds_status();
    assert_eq!(get_h1(out, "bad.test", "/").await.unwrap().status, 418, "bad vhost not installed");
    let status = tokio::time::timeout(WAIT, st.wait_for(|s| s.nacks > 0)).await.unwrap().unwrap().clone();
    let nack = status.last_nack.unwrap_or_default();
    assert!(nack.contains("routes/bad") && nack.contains("regex"), "NACK names the virtual host and field: {nack}");
    assert_eq!(get_h1(out, "a.test", "/").await.unwrap().header("x-echo-server"), Some("a"));
    assert_eq!(get_h1(out, "b.test", "/").await.unwrap().header("x-echo-server"), Some("b"));
    let snap = proxy.context().store.snapshot();
    let held: Vec<&String> = snap.clusters.keys().collect();
    assert_eq!(held, ["a", "b"], "the unused cluster is never fetched");
}

#[tokio::test]
async fn vhds_route_configuration_is_nacked_in_state_of_the_world_mode() {
    let mesh = Mesh::start().await;
    let a = EchoServer::start("a").await;
    clusters(&mesh, &[("a", vec![a.addr])], false);
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    mesh.set(type_url::ROUTE, vec![pack_any(rc("routes", vec![vhost("any", &["*"], vec![teapot()])]))]);
    let proxy = mesh.proxy("sotw-vhds", false).await;
    let mut st = proxy.xds_status();
    mesh.set(type_url::ROUTE, vec![pack_any(vhds_rc("routes", vec![vhost("any", &["*"], vec![teapot()])]))]);
    let status = tokio::time::timeout(WAIT, st.wait_for(|s| s.nacks > 0)).await.unwrap().unwrap().clone();
    let nack = status.last_nack.unwrap_or_default();
    assert!(nack.contains("vhds") && nack.contains("delta"), "{nack}");
}

#[tokio::test]
async fn hosts_asked_for_on_demand_stay_within_the_bound_and_legit_hosts_keep_working() {
    const MAX: usize = 8;
    const BOGUS: usize = 40;
    let mesh = Mesh::start().await;
    let a = EchoServer::start("a").await;
    clusters(&mesh, &[("a", vec![a.addr])], false);
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    mesh.set(type_url::ROUTE, vec![pack_any(vhds_rc("routes", vec![vhost("any", &["*"], vec![teapot()])]))]);
    mesh.set(
        type_url::VIRTUAL_HOST,
        vec![pack_any(vhost("routes/a", &["a.test"], vec![route("r", prefix("/"), to("a"))]))],
    );
    let proxy = mesh.proxy("on-demand-bound", true).await;
    let store = &proxy.context().store;
    store.set_max_on_demand_hosts(MAX);
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    assert_eq!(get_h1(out, "a.test", "/").await.unwrap().header("x-echo-server"), Some("a"));

    // A client sending a new Host header with every request.
    for i in 0..BOGUS {
        assert_eq!(get_h1(out, &format!("scan-{i}.test"), "/").await.unwrap().status, 418);
        assert!(store.on_demand_hosts() <= MAX, "{} hosts remembered after {i}", store.on_demand_hosts());
    }
    let snap = store.snapshot();
    assert!(snap.on_demand.answered.len() <= MAX);
    let subscribed = weft_xds::ResourceHandler::interest(&**store, type_url::VIRTUAL_HOST).unwrap();
    assert!(subscribed.len() <= MAX, "forgotten hosts are unsubscribed: {subscribed:?}");
    // Unknown hosts made room for each other; the host the control plane resolved stayed.
    assert!(snap.on_demand.answered.contains("routes/a.test"), "{:?}", snap.on_demand.answered);
    assert_eq!(get_h1(out, "a.test", "/").await.unwrap().header("x-echo-server"), Some("a"));
    let page = get_h1(proxy.metrics_addr(), "metrics", "/stats/prometheus").await.unwrap().text();
    let evictions = page.lines().find_map(|l| l.strip_prefix("weft_on_demand_host_evictions_total "));
    assert_eq!(evictions, Some((BOGUS + 1 - MAX).to_string().as_str()), "{page}");
    // A forgotten host is asked for again and answered as before.
    assert_eq!(get_h1(out, "scan-0.test", "/").await.unwrap().status, 418);
    assert!(store.on_demand_hosts() <= MAX);
}
