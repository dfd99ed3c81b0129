//! Cluster behaviour seen from outside: DNS clusters resolve their hostnames, the
//! max_requests circuit breaker answers 503 UO, and unhealthy endpoints get no traffic.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::config::cluster::v3::{circuit_breakers::Thresholds, cluster, CircuitBreakers};
use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use envoy_types::pb::envoy::config::route::v3::RetryPolicy;
use envoy_types::pb::google::protobuf::UInt32Value;
use envoy_types::util::pack_any;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::get_h1;
use weft_xds::build;
use weft_xds::type_url;

#[tokio::test]
async fn strict_dns_cluster_routes_to_the_resolved_addresses() {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start("dns").await;
    let mut c = build::static_cluster("by-name", &[echo.addr], false);
    c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::StrictDns as i32));
    // Replace the IP with a hostname: the proxy must resolve it.
    let la = c.load_assignment.as_mut().unwrap();
    let ep = la.endpoints[0].lb_endpoints[0].clone();
    let mut named = ep.clone();
    if let Some(envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(e)) =
        named.host_identifier.as_mut()
    {
        e.address = Some(build::address(echo.addr));
        if let Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(sa)) =
            e.address.as_mut().and_then(|a| a.address.as_mut())
        {
            sa.address = "localhost".into();
        }
    }
    la.endpoints[0].lb_endpoints = vec![named];
    mesh.set(type_url::CLUSTER, vec![pack_any(c)]);
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    // localhost may also resolve to ::1, where nothing listens: connect failures retry.
    let mut action = to("by-name");
    action.retry_policy = Some(RetryPolicy {
        retry_on: "connect-failure".into(),
        num_retries: Some(UInt32Value { value: 3 }),
        ..Default::default()
    });
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), action)])]))],
    );
    let proxy = mesh.proxy("dns", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    // Resolution happens in the background right after the cluster is accepted.
    let mut last = None;
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        let r = get_h1(out, "svc", "/").await.unwrap();
        if r.status == 200 {
            last = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = last.expect("the DNS cluster never resolved localhost");
    assert_eq!(r.header("x-echo-server"), Some("dns"));
}

#[tokio::test]
async fn max_requests_circuit_breaker_answers_503_with_uo() {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start("cb").await;
    let mut c = build::eds_cluster("cb", false);
    c.circuit_breakers = Some(CircuitBreakers {
        thresholds: vec![Thresholds { max_requests: Some(UInt32Value { value: 2 }), ..Default::default() }],
        ..Default::default()
    });
    mesh.set(type_url::CLUSTER, vec![pack_any(c)]);
    mesh.set(type_url::ENDPOINT, vec![pack_any(build::cla("cb", &[(echo.addr, 1, HealthStatus::Healthy)]))]);
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), to("cb"))])]))],
    );
    let proxy = mesh.proxy("cb", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    let calls = (0..6).map(|_| async move { get_h1(out, "svc", "/delay/600").await.unwrap().status.as_u16() });
    let mut statuses = futures::future::join_all(calls).await;
    statuses.sort();
    assert_eq!(statuses, vec![200, 200, 503, 503, 503, 503], "exactly max_requests may be in flight");
    let m = proxy.context().metrics.encode();
    assert!(m.lines().any(|l| l.starts_with("istio_requests_total{") && l.contains("response_flags=\"UO\"")), "{m}");
    // Permits are returned: the next request succeeds.
    assert_eq!(get_h1(out, "svc", "/").await.unwrap().status, 200);
}

#[tokio::test]
async fn unhealthy_endpoints_receive_no_traffic() {
    let mesh = Mesh::start().await;
    let good = EchoServer::start("good").await;
    let sick = EchoServer::start("sick").await;
    mesh.set(type_url::CLUSTER, vec![pack_any(build::eds_cluster("mixed", false))]);
    mesh.set(
        type_url::ENDPOINT,
        vec![pack_any(build::cla(
            "mixed",
            &[(good.addr, 1, HealthStatus::Healthy), (sick.addr, 1, HealthStatus::Unhealthy)],
        ))],
    );
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), to("mixed"))])]))],
    );
    let proxy = mesh.proxy("health", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    for _ in 0..30 {
        assert_eq!(get_h1(out, "svc", "/").await.unwrap().header("x-echo-server"), Some("good"));
    }
    assert_eq!(sick.requests(), 0);
}

#[tokio::test]
async fn ring_hash_keeps_each_hash_key_on_one_endpoint() {
    use envoy_types::pb::envoy::config::route::v3::route_action::{hash_policy, HashPolicy};
    let mesh = Mesh::start().await;
    let backends = [EchoServer::start("h0").await, EchoServer::start("h1").await, EchoServer::start("h2").await];
    let mut c = build::eds_cluster("sticky", false);
    c.metadata = None;
    c.lb_policy = envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy::RingHash as i32;
    mesh.set(type_url::CLUSTER, vec![pack_any(c)]);
    mesh.set(
        type_url::ENDPOINT,
        vec![pack_any(build::cla(
            "sticky",
            &backends.iter().map(|b| (b.addr, 1, HealthStatus::Healthy)).collect::<Vec<_>>(),
        ))],
    );
    let mut action = to("sticky");
    action.hash_policy = vec![HashPolicy {
        policy_specifier: Some(hash_policy::PolicySpecifier::Header(hash_policy::Header {
            header_name: "x-user".into(),
            ..Default::default()
        })),
        ..Default::default()
    }];
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), action)])]))],
    );
    let proxy = mesh.proxy("ring", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    let mut used = std::collections::BTreeSet::new();
    for user in 0..24 {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..4 {
            let mut req = weft_testkit::http::request(http::Method::GET, "svc", "/", bytes::Bytes::new()).unwrap();
            req.headers_mut().insert("x-user", format!("user-{user}").parse().unwrap());
            let r = weft_testkit::http::send_h1(out, req).await.unwrap();
            seen.insert(r.header("x-echo-server").unwrap().to_string());
        }
        assert_eq!(seen.len(), 1, "user-{user} moved between endpoints: {seen:?}");
        used.extend(seen);
    }
    assert!(used.len() >= 2, "24 keys all hashed to one endpoint: {used:?}");
}

/// A cookie hash policy with a ttl generates the cookie Envoy's way when the request has
/// none (`Set-Cookie: name="<16 hex>"; Max-Age=<ttl>; Path=<path>; HttpOnly`, a session
/// cookie without Max-Age for a zero ttl), and a client that sends it back stays on one
/// endpoint; without a ttl nothing is generated.
#[tokio::test]
async fn cookie_hash_policy_generates_the_cookie_and_sticks_to_it() {
    use envoy_types::pb::envoy::config::route::v3::route_action::{hash_policy, HashPolicy};
    use envoy_types::pb::google::protobuf::Duration as PbDuration;
    let mesh = Mesh::start().await;
    let backends = [EchoServer::start("c0").await, EchoServer::start("c1").await, EchoServer::start("c2").await];
    let mut c = build::eds_cluster("sticky", false);
    c.metadata = None;
    c.lb_policy = envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy::RingHash as i32;
    mesh.set(type_url::CLUSTER, vec![pack_any(c)]);
    mesh.set(
        type_url::ENDPOINT,
        vec![pack_any(build::cla(
            "sticky",
            &backends.iter().map(|b| (b.addr, 1, HealthStatus::Healthy)).collect::<Vec<_>>(),
        ))],
    );
    let cookie = |name: &str, ttl: Option<i64>| {
        let mut action = to("sticky");
        action.hash_policy = vec![HashPolicy {
            policy_specifier: Some(hash_policy::PolicySpecifier::Cookie(hash_policy::Cookie {
                name: name.into(),
                ttl: ttl.map(|s| PbDuration { seconds: s, nanos: 0 }),
                path: "/app".into(),
                ..Default::default()
            })),
            ..Default::default()
        }];
        action
    };
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc(
            "routes",
            vec![vhost(
                "all",
                &["*"],
                vec![
                    route("ttl", prefix("/app"), cookie("session", Some(90))),
                    route("session", prefix("/browser"), cookie("tab", Some(0))),
                    route("none", prefix("/"), cookie("plain", None)),
                ],
            )],
        ))],
    );
    let proxy = mesh.proxy("cookie", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    let get = |path: &'static str, cookie: Option<String>| async move {
        let mut req = weft_testkit::http::request(http::Method::GET, "svc", path, bytes::Bytes::new()).unwrap();
        if let Some(c) = cookie {
            req.headers_mut().insert(http::header::COOKIE, c.parse().unwrap());
        }
        weft_testkit::http::send_h1(out, req).await.unwrap()
    };

    let first = get("/app/x", None).await;
    assert_eq!(first.status, 200);
    let set = first.header("set-cookie").expect("a generated cookie").to_string();
    let value = set
        .strip_prefix("session=\"")
        .and_then(|r| r.split_once('"'))
        .map(|(v, rest)| (v.to_string(), rest.to_string()))
        .unwrap_or_else(|| panic!("not Envoy's cookie form: {set}"));
    assert_eq!(value.0.len(), 16, "16 hex digits: {set}");
    assert!(value.0.chars().all(|c| c.is_ascii_hexdigit()), "{set}");
    assert_eq!(value.1, "; Max-Age=90; Path=/app; HttpOnly");

    // The browser sends the cookie back (quoted, as it was set): one endpoint, and no
    // new cookie.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let r = get("/app/y", Some(format!("other=1; session=\"{}\"", value.0))).await;
        assert!(r.header("set-cookie").is_none(), "a cookie the client has is not set again");
        seen.insert(r.header("x-echo-server").unwrap().to_string());
    }
    assert_eq!(seen.len(), 1, "requests with one cookie moved between endpoints: {seen:?}");
    // Different cookie values spread over the endpoints.
    let mut used = std::collections::BTreeSet::new();
    for i in 0..24 {
        let r = get("/app/z", Some(format!("session=user-{i}"))).await;
        used.insert(r.header("x-echo-server").unwrap().to_string());
    }
    assert!(used.len() >= 2, "24 cookies all hashed to one endpoint: {used:?}");

    // A zero ttl: a session cookie (no Max-Age).
    let session = get("/browser", None).await;
    let set = session.header("set-cookie").expect("a generated session cookie").to_string();
    assert!(set.starts_with("tab=\"") && set.ends_with("\"; Path=/app; HttpOnly"), "{set}");
    // No ttl: no cookie is generated.
    let plain = get("/other", None).await;
    assert_eq!(plain.status, 200);
    assert!(plain.header("set-cookie").is_none());
}
