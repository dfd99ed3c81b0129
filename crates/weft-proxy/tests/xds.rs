//! The proxy as an xDS client: NACKs with a readable error while the previous config keeps
//! serving, delta xDS, config changes under load without a single failed request, serving
//! on after the control plane goes away, graceful drain, and the admin views.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use envoy_types::pb::envoy::config::route::v3::{route_match, RouteMatch};
use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
use envoy_types::util::pack_any;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::get_h1;
use weft_xds::build;
use weft_xds::type_url;

fn regex_route(re: &str) -> envoy_types::pb::envoy::config::route::v3::Route {
    route(
        "re",
        RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::SafeRegex(RegexMatcher {
                regex: re.into(),
                ..Default::default()
            })),
            ..Default::default()
        },
        to("b"),
    )
}

async fn nack_keeps_previous_config(delta: bool) {
    let mesh = Mesh::start().await;
    let a = EchoServer::start("a").await;
    let b = EchoServer::start("b").await;
    clusters(&mesh, &[("a", vec![a.addr]), ("b", vec![b.addr])], false);
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), to("a"))])]))],
    );
    let proxy = mesh.proxy(if delta { "nack-delta" } else { "nack-sotw" }, delta).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    assert_eq!(get_h1(out, "svc", "/").await.unwrap().header("x-echo-server"), Some("a"));

    // An unparsable regex: the route configuration cannot be used.
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc(
            "routes",
            vec![vhost("all", &["*"], vec![regex_route("/(unclosed"), route("r", prefix("/"), to("b"))])],
        ))],
    );
    let mut st = proxy.xds_status();
    let nack =
        tokio::time::timeout(WAIT, st.wait_for(|s| s.nacks > 0)).await.expect("no NACK").unwrap().last_nack.clone();
    let nack = nack.expect("NACK error recorded");
    assert!(nack.contains("routes") && nack.contains("regex"), "NACK should name the resource and field: {nack}");
    // The server saw the NACK with the error text.
    let mut changes = mesh.server.status_changes();
    let seen = tokio::time::timeout(WAIT, async {
        loop {
            let nacked = mesh.server.connections().iter().any(|c| {
                c.types
                    .get(type_url::ROUTE)
                    .and_then(|t| t.last_nack.as_ref())
                    .map(|n| n.error.contains("regex"))
                    .unwrap_or(false)
            });
            if nacked {
                return;
            }
            let _ = changes.changed().await;
        }
    })
    .await;
    assert!(seen.is_ok(), "server did not record the NACK");
    let metrics = proxy.context().metrics.encode();
    let nacks: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("weft_xds_nacks_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(nacks >= 1.0, "the NACK is not counted in the proxy's metrics: {metrics}");
    // Previous routes still in force.
    for _ in 0..5 {
        assert_eq!(get_h1(out, "svc", "/").await.unwrap().header("x-echo-server"), Some("a"));
    }
    // A fixed version is accepted again.
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), to("b"))])]))],
    );
    mesh.synced(&proxy, type_url::ROUTE).await;
    assert_eq!(get_h1(out, "svc", "/").await.unwrap().header("x-echo-server"), Some("b"));
}

#[tokio::test]
async fn invalid_route_is_nacked_and_previous_routes_keep_serving_sotw() {
    nack_keeps_previous_config(false).await;
}

#[tokio::test]
async fn invalid_route_is_nacked_and_previous_routes_keep_serving_delta() {
    nack_keeps_previous_config(true).await;
}

#[tokio::test]
async fn route_and_endpoint_changes_under_load_fail_no_request() {
    let mesh = Mesh::start().await;
    let backends: Vec<EchoServer> =
        futures::future::join_all((0..4).map(|i| async move { EchoServer::start(&format!("e{i}")).await })).await;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let (a0, a1, a2, a3) = (addrs[0], addrs[1], addrs[2], addrs[3]);
    clusters(&mesh, &[("v1", vec![addrs[0], addrs[1]]), ("v2", vec![addrs[2]])], false);
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc(
            "routes",
            vec![vhost("all", &["*"], vec![route("r", prefix("/"), weighted(&[("v1", 100), ("v2", 0)]))])],
        ))],
    );
    let proxy = mesh.proxy("load", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();

    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for _ in 0..200 {
        let (ok, failed, mut stop) = (ok.clone(), failed.clone(), stop_rx.clone());
        workers.push(tokio::spawn(async move {
            while !*stop.borrow_and_update() {
                // Each request sleeps at the backend, so hundreds are in flight at each change.
                match get_h1(out, "svc", "/delay/30").await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    type Step = Box<dyn Fn(&Mesh)>;
    let steps: Vec<Step> = vec![
        Box::new(|m: &Mesh| {
            m.set(
                type_url::ROUTE,
                vec![pack_any(rc(
                    "routes",
                    vec![vhost("all", &["*"], vec![route("r", prefix("/"), weighted(&[("v1", 50), ("v2", 50)]))])],
                ))],
            )
        }),
        Box::new(move |m: &Mesh| {
            m.set(
                type_url::ENDPOINT,
                vec![
                    pack_any(build::cla("v1", &[(a1, 1, HealthStatus::Healthy), (a3, 1, HealthStatus::Healthy)])),
                    pack_any(build::cla("v2", &[(a2, 1, HealthStatus::Healthy)])),
                ],
            )
        }),
        Box::new(|m: &Mesh| {
            m.set(
                type_url::ROUTE,
                vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), to("v2"))])]))],
            )
        }),
        Box::new(move |m: &Mesh| {
            m.set(
                type_url::ENDPOINT,
                vec![
                    pack_any(build::cla("v1", &[(a0, 1, HealthStatus::Healthy)])),
                    pack_any(build::cla("v2", &[(a2, 1, HealthStatus::Healthy), (a3, 1, HealthStatus::Healthy)])),
                ],
            )
        }),
    ];
    // Each change lands while the workers are busy: wait for real progress (not wall
    // time, which a loaded CI machine stretches) before and after every step.
    let progress = |target: u64| {
        let ok = ok.clone();
        async move {
            let waited = tokio::time::timeout(Duration::from_secs(60), async {
                while ok.load(Ordering::Relaxed) < target {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            assert!(waited.is_ok(), "the load stalled below {target} requests");
        }
    };
    let mut target = 0;
    for step in steps {
        target += 200;
        progress(target).await;
        step(&mesh);
    }
    target += 200;
    progress(target).await;
    stop_tx.send_replace(true);
    for w in workers {
        w.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} requests failed across config changes ({ok} succeeded)");
    assert!(backends[3].requests() > 0, "the endpoint added mid-run never got traffic");
}

/// The start of both warming tests: clusters `v1` (endpoint `old`) and `v2` (endpoints
/// not sent: the control plane has not answered the proxy's EDS request for the new
/// cluster yet), routes to `v1`; then the route switch to `v2`, applied by the proxy.
async fn switch_to_a_cluster_without_endpoints(
    mesh: &Mesh,
    old: &EchoServer,
    id: &str,
) -> (ProxyHandle, std::net::SocketAddr) {
    clusters(mesh, &[("v1", vec![old.addr])], false);
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    let routes_to =
        |c: &str| vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), to(c))])]))];
    mesh.set(type_url::ROUTE, routes_to("v1"));
    let proxy = mesh.proxy(id, false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    mesh.set(
        type_url::CLUSTER,
        vec![pack_any(build::eds_cluster("v1", false)), pack_any(build::eds_cluster("v2", false))],
    );
    mesh.synced(&proxy, type_url::CLUSTER).await;
    mesh.set(type_url::ROUTE, routes_to("v2"));
    mesh.synced(&proxy, type_url::ROUTE).await;
    (proxy, out)
}

/// A DestinationRule's new subset and a VirtualService sending traffic to it, applied
/// together: the route switch reaches the proxy before the subset's endpoints. The
/// previous routes keep serving until the endpoints arrive, so no request fails (before,
/// every request in between was a 503 with no healthy upstream).
#[tokio::test]
async fn a_route_switch_to_a_cluster_waits_for_its_endpoints() {
    let mesh = Mesh::start().await;
    let old = EchoServer::start("old").await;
    let new = EchoServer::start("new").await;
    let (proxy, out) = switch_to_a_cluster_without_endpoints(&mesh, &old, "warm-routes").await;
    for _ in 0..5 {
        let r = get_h1(out, "svc", "/").await.unwrap();
        assert_eq!(
            (r.status, r.header("x-echo-server")),
            (http::StatusCode::OK, Some("old")),
            "the switch served before v2 had endpoints"
        );
    }
    // The endpoints arrive: the new routes serve.
    mesh.set(
        type_url::ENDPOINT,
        vec![
            pack_any(build::cla("v1", &[(old.addr, 1, HealthStatus::Healthy)])),
            pack_any(build::cla("v2", &[(new.addr, 1, HealthStatus::Healthy)])),
        ],
    );
    mesh.synced(&proxy, type_url::ENDPOINT).await;
    let r = get_h1(out, "svc", "/").await.unwrap();
    assert_eq!((r.status, r.header("x-echo-server")), (http::StatusCode::OK, Some("new")));
}

/// Endpoints that never come do not hold the new routes back for ever: they serve after
/// the warming limit (5 s).
#[tokio::test]
async fn a_route_switch_waits_for_endpoints_only_so_long() {
    let mesh = Mesh::start().await;
    let old = EchoServer::start("old").await;
    let (proxy, out) = switch_to_a_cluster_without_endpoints(&mesh, &old, "warm-limit").await;
    let names = |proxy: &ProxyHandle| proxy.context().store.snapshot().routes.get("routes").map(|t| t.cluster_names());
    assert_eq!(names(&proxy), Some(["v1".to_string()].into()), "held routes serve the previous table");
    let released = tokio::time::timeout(Duration::from_secs(15), async {
        while names(&proxy) != Some(["v2".to_string()].into()) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(released.is_ok(), "the new routes never served without their endpoints");
    assert_eq!(get_h1(out, "svc", "/").await.unwrap().status, 503, "v2 has no endpoints");
}

#[tokio::test]
async fn proxy_keeps_serving_its_last_config_when_the_control_plane_goes_away() {
    let mesh = Mesh::start().await;
    let a = EchoServer::start("a").await;
    everything_to(&mesh, "a", a.addr);
    let proxy = mesh.proxy("orphan", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    drop(mesh);
    let mut st = proxy.xds_status();
    tokio::time::timeout(WAIT, st.wait_for(|s| !s.connected)).await.expect("disconnect not noticed").unwrap();
    for _ in 0..5 {
        assert_eq!(get_h1(out, "svc", "/").await.unwrap().header("x-echo-server"), Some("a"));
    }
}

#[tokio::test]
async fn drain_finishes_in_flight_requests_and_stops_accepting() {
    let mesh = Mesh::start().await;
    let a = EchoServer::start("a").await;
    everything_to(&mesh, "a", a.addr);
    let proxy = mesh.proxy("drain", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    let before = a.requests();
    let slow = tokio::spawn(async move { get_h1(out, "svc", "/delay/500").await });
    a.wait_for_requests(before + 1).await; // the slow request is in flight
    proxy.shutdown().await;
    let r = slow.await.unwrap().expect("in-flight request failed during drain");
    assert_eq!(r.status, 200);
    // The listener is closed: its port can be bound again (or, if another test's port-0
    // socket took it meanwhile, whatever answers there is not this proxy).
    if tokio::net::TcpListener::bind(out).await.is_err() {
        let answer = tokio::time::timeout(Duration::from_secs(2), get_h1(out, "svc", "/")).await;
        let via_proxy = matches!(answer, Ok(Ok(r)) if r.header("x-echo-server") == Some("a"));
        assert!(!via_proxy, "listener still accepting after drain");
    }
}

/// Draining an HTTP/2 connection: a GOAWAY first (new streams refused), the request in
/// flight finishes, then the connection closes.
#[tokio::test]
async fn drain_sends_http2_clients_a_goaway_and_finishes_their_streams() {
    let mesh = Mesh::start().await;
    let a = EchoServer::start("a").await;
    everything_to(&mesh, "a", a.addr);
    let proxy = mesh.proxy("drain-h2", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    let tcp = tokio::net::TcpStream::connect(out).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let before = a.requests();
    let req = http::Request::get("http://svc/delay/500").body(()).unwrap();
    let (response, _) = client.send_request(req, true).unwrap();
    a.wait_for_requests(before + 1).await; // the slow request is in flight
    let shutdown = tokio::spawn(proxy.shutdown());
    // The GOAWAY (and its ping round trip) arrives while the slow request is in flight:
    // a new stream is then refused, whereas the connection would still have served it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late = http::Request::get("http://svc/late").body(()).unwrap();
    let refused = match client.send_request(late, true) {
        Err(_) => true,
        Ok((late, _)) => tokio::time::timeout(Duration::from_secs(5), late).await.unwrap().is_err(),
    };
    assert!(refused, "a new stream was served after the drain began: no GOAWAY");
    let resp = tokio::time::timeout(Duration::from_secs(5), response).await.unwrap().expect("in-flight stream failed");
    assert_eq!(resp.status(), 200);
    drop(resp);
    drop(client);
    let closed = tokio::time::timeout(Duration::from_secs(5), conn).await.expect("connection not closed after drain");
    assert!(matches!(closed, Ok(Ok(()))), "connection not closed cleanly with a GOAWAY: {closed:?}");
    shutdown.await.unwrap();
}

#[tokio::test]
async fn admin_shows_config_clusters_and_readiness() {
    let mesh = Mesh::start().await;
    let a = EchoServer::start("a").await;
    everything_to(&mesh, "a", a.addr);
    let proxy = mesh.proxy("admin", false).await;
    mesh.synced_all(&proxy).await;
    let admin = proxy.admin_addr();
    let dump = get_h1(admin, "admin", "/config_dump").await.unwrap();
    assert_eq!(dump.status, 200);
    let j = dump.json().unwrap();
    assert_eq!(j["listeners"][0]["name"], "out");
    assert_eq!(j["routes"][0]["name"], "routes");
    assert_eq!(j["clusters"][0]["endpoints"][0]["address"], a.addr.to_string());
    let clusters = get_h1(admin, "admin", "/clusters").await.unwrap().text();
    assert!(clusters.contains(&format!("a::{}::health_flags::healthy", a.addr)), "{clusters}");
    assert_eq!(get_h1(admin, "admin", "/ready").await.unwrap().status, 200);
    let ready = get_h1(proxy.metrics_addr(), "m", "/healthz/ready").await.unwrap();
    assert_eq!(ready.status, 200);
}

/// A listener whose address is taken is NACKed with the reason, as Envoy does, instead
/// of being ACKed and left unreachable; the other listeners keep serving, and the
/// listener is bound once its address frees up.
#[tokio::test]
async fn a_listener_that_cannot_bind_is_nacked_with_the_reason() {
    let mesh = Mesh::start().await;
    let a = EchoServer::start("a").await;
    everything_to(&mesh, "a", a.addr);
    let proxy = mesh.proxy("bind-nack", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();

    // Someone else holds the port the new listener wants.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap();
    let hcm = build::http_connection_manager("ingress", build::Routes::Rds("routes".into()), None, &[]);
    let ingress = pack_any(build::http_listener("ingress", port, hcm));
    mesh.set(type_url::LISTENER, vec![http_out(&[]), ingress.clone()]);
    let mut st = proxy.xds_status();
    let nack =
        tokio::time::timeout(WAIT, st.wait_for(|s| s.nacks > 0)).await.expect("no NACK").unwrap().last_nack.clone();
    let nack = nack.expect("NACK error recorded");
    assert!(nack.contains("ingress") && nack.contains("cannot bind") && nack.contains(&port.to_string()), "{nack}");
    // The control plane sees the NACK with the reason (what `weft proxy-status` shows).
    let mut changes = mesh.server.status_changes();
    let seen = tokio::time::timeout(WAIT, async {
        loop {
            let nacked = mesh.server.connections().iter().any(|c| {
                c.types
                    .get(type_url::LISTENER)
                    .and_then(|t| t.last_nack.as_ref())
                    .is_some_and(|n| n.error.contains("cannot bind"))
            });
            if nacked {
                return;
            }
            let _ = changes.changed().await;
        }
    })
    .await;
    assert!(seen.is_ok(), "the server did not record the bind failure");
    assert!(!proxy.listener_addrs().contains_key("ingress"));
    assert_eq!(get_h1(out, "svc", "/").await.unwrap().status, 200, "the other listener keeps serving");

    // Once the port is free, the same listener is accepted and bound.
    drop(taken);
    mesh.set(type_url::LISTENER, vec![http_out(&[]), ingress]);
    mesh.synced(&proxy, type_url::LISTENER).await;
    let bound = proxy.listener_addr("ingress", WAIT).await.expect("ingress bound after the port freed up");
    assert_eq!(bound, port);
    assert_eq!(get_h1(bound, "svc", "/").await.unwrap().status, 200);
}
