//! Differential test against real Envoy 1.40: the same xDS resources are served to Envoy
//! and to weft's proxy from one ADS server, the same requests are sent to both, and the
//! observable outcomes (status, which backend answered, the path it saw, local bodies)
//! must agree. Weighted splits are compared statistically.

#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use envoy_types::pb::envoy::config::core::v3::{data_source, DataSource};
use envoy_types::pb::envoy::config::route::v3::{
    route, route_match, DirectResponseAction, RetryPolicy, Route, RouteMatch,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{fault_abort, FaultAbort, HttpFault};
use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
use envoy_types::pb::envoy::r#type::v3::{fractional_percent::DenominatorType, FractionalPercent};
use envoy_types::pb::google::protobuf::UInt32Value;
use envoy_types::util::pack_any;
use weft_testkit::echo::EchoServer;
use weft_testkit::envoy::{ads_bootstrap, Envoy};
use weft_testkit::http::{send_h1, Reply};
use weft_xds::type_url;

/// What both proxies must agree on.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    status: u16,
    backend: Option<String>,
    upstream_path: Option<String>,
    local_body: Option<String>,
}

fn outcome(r: &Reply) -> Outcome {
    let backend = r.header("x-echo-server").map(str::to_string);
    let upstream_path =
        if backend.is_some() { r.json().ok().and_then(|j| j["path"].as_str().map(str::to_string)) } else { None };
    let local_body = if backend.is_none() && r.status != 503 { Some(r.text()) } else { None };
    Outcome { status: r.status.as_u16(), backend, upstream_path, local_body }
}

async fn send(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = weft_testkit::http::request(http::Method::GET, "svc.test", path, Bytes::new()).unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    send_h1(addr, req).await.unwrap()
}

async fn always_503() -> SocketAddr {
    let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = sock.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_r: hyper::Request<hyper::body::Incoming>| async {
                    let mut r = hyper::Response::new(http_body_util::Full::new(Bytes::from_static(b"down")));
                    *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                    Ok::<_, Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn pct100() -> Option<FractionalPercent> {
    Some(FractionalPercent { numerator: 100, denominator: DenominatorType::Hundred as i32 })
}

fn routes() -> envoy_types::pb::envoy::config::route::v3::RouteConfiguration {
    let path = |p: route_match::PathSpecifier| RouteMatch { path_specifier: Some(p), ..Default::default() };
    let mut hdr = prefix("/h");
    hdr.headers.push(exact_header("x-user", "jason"));
    let mut inv = prefix("/inv");
    let mut canary = exact_header("x-canary", "yes");
    canary.invert_match = true;
    inv.headers.push(canary);
    let mut rewrite = to("a");
    rewrite.prefix_rewrite = "/rewritten/".into();
    let mut abort = route("abort", prefix("/abort"), to("a"));
    abort.typed_per_filter_config.insert(
        "envoy.filters.http.fault".into(),
        pack_any(HttpFault {
            abort: Some(FaultAbort {
                percentage: pct100(),
                error_type: Some(fault_abort::ErrorType::HttpStatus(429)),
                ..Default::default()
            }),
            ..Default::default()
        }),
    );
    let mut retry = to("flaky");
    retry.retry_policy =
        Some(RetryPolicy { retry_on: "5xx".into(), num_retries: Some(UInt32Value { value: 5 }), ..Default::default() });
    let direct = Route {
        name: "direct".into(),
        r#match: Some(prefix("/direct")),
        action: Some(route::Action::DirectResponse(DirectResponseAction {
            status: 202,
            body: Some(DataSource {
                specifier: Some(data_source::Specifier::InlineString("accepted by proxy".into())),
                ..Default::default()
            }),
            ..Default::default()
        })),
        ..Default::default()
    };
    rc(
        "routes",
        vec![vhost(
            "svc",
            &["svc.test"],
            vec![
                route("exact", path(route_match::PathSpecifier::Path("/exact".into())), to("a")),
                route(
                    "regex",
                    path(route_match::PathSpecifier::SafeRegex(RegexMatcher {
                        regex: "/r/[a-z]+/[0-9]{2}".into(),
                        ..Default::default()
                    })),
                    to("b"),
                ),
                route("hdr", hdr, to("b")),
                route("inv", inv, to("a")),
                route("inv-rest", prefix("/inv"), to("b")),
                route("rewrite", prefix("/old/"), rewrite),
                direct,
                abort,
                route("retry", prefix("/retry"), retry),
                route("split", prefix("/split"), weighted(&[("a", 70), ("b", 30)])),
                route("rest", prefix("/"), to("c")),
            ],
        )],
    )
}

#[tokio::test]
async fn weft_and_envoy_agree_on_the_same_xds() {
    let mesh = Mesh::start().await;
    let a = EchoServer::start("a").await;
    let b = EchoServer::start("b").await;
    let c = EchoServer::start("c").await;
    let bad = always_503().await;
    // flaky: one endpoint that always fails, one that works; retries must find the good one.
    clusters(
        &mesh,
        &[("a", vec![a.addr]), ("b", vec![b.addr]), ("c", vec![c.addr]), ("flaky", vec![bad, a.addr])],
        false,
    );
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    mesh.set(type_url::ROUTE, vec![pack_any(routes())]);

    let weft = mesh.proxy("weft-diff", false).await;
    mesh.synced_all(&weft).await;
    let weft_addr = weft.listener_addr("out", WAIT).await.unwrap();
    let envoy = Envoy::start(&ads_bootstrap(mesh.xds, "envoy-diff", false)).await.expect("start envoy");
    let envoy_addr =
        envoy.listener_addr("out", Duration::from_secs(20)).await.unwrap_or_else(|e| panic!("{e}\n{}", envoy.log()));
    // Wait until Envoy has routes and endpoints too.
    mesh.server.wait_acked("envoy-diff", type_url::ROUTE, &mesh.source.version(type_url::ROUTE), WAIT).await.unwrap();
    mesh.server
        .wait_acked("envoy-diff", type_url::ENDPOINT, &mesh.source.version(type_url::ENDPOINT), WAIT)
        .await
        .unwrap();

    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("/exact", vec![]),
        ("/exact/not", vec![]),
        ("/r/abc/12", vec![]),
        ("/r/abc/123", vec![]),
        ("/h", vec![("x-user", "jason")]),
        ("/h", vec![("x-user", "JASON")]),
        ("/inv", vec![]),
        ("/inv", vec![("x-canary", "yes")]),
        ("/inv", vec![("x-canary", "no")]),
        ("/old/thing?q=1", vec![]),
        ("/direct", vec![]),
        ("/abort", vec![]),
        ("/retry", vec![]),
        ("/retry", vec![]),
        ("/retry", vec![]),
        ("/anything", vec![]),
    ];
    for (path, headers) in &cases {
        let w = outcome(&send(weft_addr, path, headers).await);
        let e = outcome(&send(envoy_addr, path, headers).await);
        assert_eq!(w, e, "weft and Envoy differ on {path} {headers:?}");
    }
    // A retried request must end at the healthy endpoint on both.
    assert_eq!(outcome(&send(weft_addr, "/retry", &[]).await).status, 200);

    // Weighted split: both near 70/30.
    let n = 300;
    for (name, addr) in [("weft", weft_addr), ("envoy", envoy_addr)] {
        let mut hits_a = 0;
        for _ in 0..n {
            if send(addr, "/split", &[]).await.header("x-echo-server") == Some("a") {
                hits_a += 1;
            }
        }
        // 70% of 300 = 210, binomial sd ~7.9: +-40 is 5 sigma.
        assert!((170..=250).contains(&hits_a), "{name}: {hits_a}/{n} to a");
    }
}

/// One request holding a cluster's only connection (`max_connections: 1`,
/// `max_pending_requests: 1`), then two more at once: Envoy and weft both queue one and
/// refuse the other with 503 and `x-envoy-overloaded`, on one upstream connection.
#[tokio::test]
async fn weft_and_envoy_agree_on_http1_circuit_breaking() {
    use envoy_types::pb::envoy::config::cluster::v3::{circuit_breakers::Thresholds, CircuitBreakers};
    use envoy_types::pb::envoy::config::core::v3::HealthStatus;
    let mesh = Mesh::start().await;
    let weft_app = EchoServer::start("cb").await;
    let envoy_app = EchoServer::start("cb").await;
    let limited = |name: &str| {
        let mut c = weft_xds::build::eds_cluster(name, false);
        c.circuit_breakers = Some(CircuitBreakers {
            thresholds: vec![Thresholds {
                max_connections: Some(UInt32Value { value: 1 }),
                max_pending_requests: Some(UInt32Value { value: 1 }),
                ..Default::default()
            }],
            ..Default::default()
        });
        pack_any(c)
    };
    // Each proxy gets its own app, so each app's connection count is that proxy's.
    mesh.set(type_url::CLUSTER, vec![limited("for-weft"), limited("for-envoy")]);
    mesh.set(
        type_url::ENDPOINT,
        vec![
            pack_any(weft_xds::build::cla("for-weft", &[(weft_app.addr, 1, HealthStatus::Healthy)])),
            pack_any(weft_xds::build::cla("for-envoy", &[(envoy_app.addr, 1, HealthStatus::Healthy)])),
        ],
    );
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    let by_header = |value: &str, cluster: &str| {
        let mut m = prefix("/");
        m.headers.push(exact_header("x-proxy", value));
        route(cluster, m, to(cluster))
    };
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc(
            "routes",
            vec![vhost("svc", &["*"], vec![by_header("weft", "for-weft"), by_header("envoy", "for-envoy")])],
        ))],
    );
    let weft = mesh.proxy("weft-cb", false).await;
    mesh.synced_all(&weft).await;
    let weft_addr = weft.listener_addr("out", WAIT).await.unwrap();
    let envoy = Envoy::start(&ads_bootstrap(mesh.xds, "envoy-cb", false)).await.expect("start envoy");
    let envoy_addr =
        envoy.listener_addr("out", Duration::from_secs(20)).await.unwrap_or_else(|e| panic!("{e}\n{}", envoy.log()));
    for t in [type_url::ROUTE, type_url::ENDPOINT] {
        mesh.server.wait_acked("envoy-cb", t, &mesh.source.version(t), WAIT).await.unwrap();
    }

    let mut results = Vec::new();
    for (who, addr, app) in [("weft", weft_addr, &weft_app), ("envoy", envoy_addr, &envoy_app)] {
        let first = tokio::spawn(async move { send(addr, "/delay/800", &[("x-proxy", who)]).await });
        app.wait_for_requests(1).await;
        let header = [("x-proxy", who)];
        let (a, b) = tokio::join!(send(addr, "/", &header), send(addr, "/", &header));
        let mut replies = [first.await.unwrap(), a, b];
        replies.sort_by_key(|r| r.status);
        let seen: Vec<(u16, Option<String>)> =
            replies.iter().map(|r| (r.status.as_u16(), r.header("x-envoy-overloaded").map(str::to_string))).collect();
        results.push((seen, app.connections()));
    }
    assert_eq!(results[0], results[1], "weft (left) and Envoy (right) differ\n{}", envoy.log());
    assert_eq!(results[0].0.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![200, 200, 503]);
}
