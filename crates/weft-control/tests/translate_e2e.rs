//! Acceptance test of the translator: Istio resources + registry -> xDS -> a real weft
//! proxy routing HTTP to echo workloads as Istio documents, and a real Envoy ACKing the
//! same xDS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::watch;
use weft_control::registry::{Registry, Workload, WorkloadSource};
use weft_control::translate::{translate, MeshConfig, ProxyMode};
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::{EchoServer, SERVER_HEADER};
use weft_testkit::http::{get_h1, get_via_proxy, request, send_h1};
use weft_xds::{type_url, AdsServer, NodeInfo, PortInfo, StaticSource};

const WAIT: Duration = Duration::from_secs(30);

const RESOURCES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{uri: {prefix: /abort}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /fault-delay}}]
    fault: {delay: {fixedDelay: 300ms, percentage: {value: 100}}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /delay/}}]
    timeout: 200ms
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /rewrite}}]
    rewrite: {uri: /rewritten}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {exact: /redirect}}]
    redirect: {uri: /moved, authority: elsewhere.example}
  - match: [{uri: {prefix: /mirror}}]
    route: [{destination: {host: reviews, subset: v1}}]
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 100}
  - match: [{uri: {prefix: /cors}}]
    corsPolicy:
      allowOrigins: [{exact: "https://app.example"}, {prefix: "https://dev."}]
      allowMethods: [GET, POST]
      allowHeaders: [x-custom]
      exposeHeaders: [x-trace]
      maxAge: 24h
      allowCredentials: true
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /headers}}]
    headers:
      request: {set: {x-route: headers}, remove: [x-drop]}
      response: {add: {x-served-by: weft-test}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /retry}}]
    route: [{destination: {host: reviews, subset: v3}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews, subset: v2}, weight: 20}
"#;

fn workload(id: &str, version: &str, inbound: SocketAddr) -> Workload {
    Workload {
        id: id.into(),
        name: id.into(),
        namespace: "default".into(),
        labels: BTreeMap::from([("app".into(), "reviews".into()), ("version".into(), version.into())]),
        service_account: "bookinfo-reviews".into(),
        ports: vec![PortInfo { name: "http".into(), port: 9080, protocol: "TCP".into(), app_protocol: None }],
        addresses: vec![inbound.ip()],
        inbound: Some(inbound),
        ready: true,
        connected_since: SystemTime::now(),
        source: WorkloadSource::Proxy,
    }
}

fn client_node() -> NodeInfo {
    NodeInfo {
        id: "productpage".into(),
        cluster: "productpage.default".into(),
        name: "productpage".into(),
        namespace: "default".into(),
        labels: BTreeMap::from([("app".into(), "productpage".into())]),
        ..NodeInfo::default()
    }
}

struct ControlPlane {
    source: Arc<StaticSource>,
    server: AdsServer,
    xds: SocketAddr,
    _stop: watch::Sender<bool>,
}

async fn control_plane() -> ControlPlane {
    let source = Arc::new(StaticSource::new());
    let server = AdsServer::new(source.clone());
    let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let xds = sock.local_addr().unwrap();
    let (stop, mut rx) = watch::channel(false);
    tokio::spawn(server.clone().serve(sock, async move {
        let _ = rx.wait_for(|s| *s).await;
    }));
    ControlPlane { source, server, xds, _stop: stop }
}

async fn weft_proxy(xds: SocketAddr) -> ProxyHandle {
    let node = "node:\n  id: productpage\n  cluster: productpage.default\n  name: productpage\n  namespace: default\n  labels:\n    app: productpage\n";
    weft_proxy_as(node, xds).await
}

async fn weft_proxy_as(node_yaml: &str, xds: SocketAddr) -> ProxyHandle {
    weft_proxy_logging(node_yaml, xds, "off").await
}

/// A weft proxy whose access log goes to `access_log` (`off`, `stdout` or a file).
async fn weft_proxy_logging(node_yaml: &str, xds: SocketAddr, access_log: &str) -> ProxyHandle {
    let text = format!(
        "{node_yaml}xds:\n  address: http://{xds}\n  mode: sotw\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"{access_log}\"\ndrain_timeout: 1s\n"
    );
    let b = Bootstrap::parse(&text, Path::new("productpage.yaml")).unwrap();
    let p = ProxyHandle::start(b).await.unwrap();
    assert!(p.wait_ready(WAIT).await, "weft proxy never became ready");
    p
}

fn server_of(reply: &weft_testkit::http::Reply) -> String {
    reply.header(SERVER_HEADER).unwrap_or("<none>").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_routing_semantics_hold_through_weft_proxy_and_through_envoy_fed_the_same_xds() {
    let v1 = EchoServer::start("v1").await;
    let v2 = EchoServer::start("v2").await;
    let v3 = EchoServer::start("v3").await;
    // A v3 instance whose inbound listener is gone: only retries reach the healthy one.
    let dead = weft_testkit::net::reserve_addr();

    let registry = Registry::new();
    registry.upsert(workload("reviews-v1", "v1", v1.addr));
    registry.upsert(workload("reviews-v2", "v2", v2.addr));
    registry.upsert(workload("reviews-v3", "v3", v3.addr));
    registry.upsert(workload("reviews-v3-dead", "v3", dead));

    let parsed = weft_api::parse_str(RESOURCES, Path::new("bookinfo.yaml"));
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let mesh = MeshConfig {
        resources: parsed.resources,
        explicit_outbound: "127.0.0.1:0".parse().unwrap(),
        ..MeshConfig::default()
    };
    let xds = translate(&mesh, &registry.snapshot(), &client_node(), ProxyMode::Explicit);
    let cp = control_plane().await;
    for (t, resources) in xds.into_resources() {
        cp.source.set(t, resources).unwrap();
    }

    let proxy = weft_proxy(cp.xds).await;
    acked_everything(&cp, "productpage", String::new).await;
    let out = proxy.listener_addr("weft-outbound", WAIT).await.expect("weft-outbound is bound");

    check_istio_semantics(out, "weft", &v1, &v2).await;

    // The same xDS, fed to Envoy 1.40, is accepted in full.
    let envoy = weft_testkit::envoy::Envoy::start(&weft_testkit::envoy::ads_bootstrap(cp.xds, "envoy-sidecar", false))
        .await
        .unwrap();
    acked_everything(&cp, "envoy-sidecar", || envoy.log_tail()).await;
    // ... and Envoy routes the same requests the same way.
    let envoy_out = envoy.listener_addr("weft-outbound", WAIT).await.unwrap();
    check_istio_semantics(envoy_out, "envoy", &v1, &v2).await;
    proxy.shutdown().await;
}

/// Drives every VirtualService feature of [`RESOURCES`] through an explicit outbound
/// listener (`who` names the proxy in failure messages) and checks Istio's semantics.
async fn check_istio_semantics(out: SocketAddr, who: &str, v1: &EchoServer, v2: &EchoServer) {
    accepting(out).await;
    // Weighted split 80/20 (200 requests; bounds are more than 5 standard deviations).
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..200 {
        let r = get_via_proxy(out, "http://reviews:9080/").await.unwrap();
        assert_eq!(r.status, 200, "{who}: {}", r.text());
        *counts.entry(server_of(&r)).or_default() += 1;
    }
    let v1_share = counts.get("v1").copied().unwrap_or(0);
    assert!((130..=190).contains(&v1_share), "{who}: 80/20 split violated: {counts:?}");
    assert_eq!(counts.keys().filter(|k| *k != "v1" && *k != "v2").count(), 0, "{counts:?}");

    // Header match: end-user: jason -> v2, every time.
    for _ in 0..10 {
        let mut req = request(http::Method::GET, "reviews:9080", "/", Bytes::new()).unwrap();
        req.headers_mut().insert("end-user", "jason".parse().unwrap());
        let r = send_h1(out, req).await.unwrap();
        assert_eq!(server_of(&r), "v2", "{who}: header match");
    }

    // Fault abort 100% answers the configured status without reaching the workload.
    let before = v1.requests();
    let r = get_h1(out, "reviews:9080", "/abort").await.unwrap();
    assert_eq!(r.status, 418, "{who}: fault abort");
    assert_eq!(v1.requests(), before, "{who}: aborted request reached the app");

    // Fault delay holds the request at least the configured time, then forwards it.
    let start = Instant::now();
    let r = get_h1(out, "reviews:9080", "/fault-delay").await.unwrap();
    assert_eq!(r.status, 200, "{who}: fault delay");
    // (Envoy's timers may fire a fraction of a millisecond early relative to this clock.)
    assert!(start.elapsed() >= Duration::from_millis(290), "{who}: delay not injected: {:?}", start.elapsed());

    // Route timeout: a 2 s response with a 200 ms timeout is a 504.
    let start = Instant::now();
    let r = get_h1(out, "reviews:9080", "/delay/2000").await.unwrap();
    assert_eq!(r.status, 504, "{who}: timeout: {}", r.text());
    assert!(start.elapsed() < Duration::from_millis(1500), "{who}: timeout not applied");

    // URI rewrite replaces the matched prefix.
    let r = get_h1(out, "reviews:9080", "/rewrite/x?q=1").await.unwrap();
    assert_eq!(r.json().unwrap()["path"], "/rewritten/x?q=1", "{who}: rewrite");

    // Redirect.
    let r = get_h1(out, "reviews:9080", "/redirect").await.unwrap();
    assert_eq!(r.status, 301, "{who}: redirect");
    assert_eq!(r.header("location"), Some("http://elsewhere.example/moved"));

    // Retries (Istio's default policy, connect-failure) always reach the healthy v3.
    for _ in 0..20 {
        let r = get_h1(out, "reviews:9080", "/retry").await.unwrap();
        assert_eq!(r.status, 200, "{who}: {}", r.text());
        assert_eq!(server_of(&r), "v3", "{who}: retry");
    }

    // Mirror: the answer comes from v1, a copy reaches v2.
    let mirrored_before = v2.requests();
    let r = get_h1(out, "reviews:9080", "/mirror").await.unwrap();
    assert_eq!(server_of(&r), "v1", "{who}: mirror answer");
    let deadline = Instant::now() + WAIT;
    while v2.requests() == mirrored_before {
        assert!(Instant::now() < deadline, "{who}: mirror never reached v2");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // corsPolicy: a preflight from an allowed origin is answered by the proxy itself.
    let before = v1.requests();
    let mut req = request(http::Method::OPTIONS, "reviews:9080", "/cors", Bytes::new()).unwrap();
    req.headers_mut().insert("origin", "https://app.example".parse().unwrap());
    req.headers_mut().insert("access-control-request-method", "POST".parse().unwrap());
    let r = send_h1(out, req).await.unwrap();
    assert_eq!(r.status, 200, "{who}: preflight");
    assert_eq!(r.header("access-control-allow-origin"), Some("https://app.example"), "{who}: preflight origin");
    assert_eq!(r.header("access-control-allow-methods"), Some("GET,POST"), "{who}");
    assert_eq!(r.header("access-control-allow-headers"), Some("x-custom"), "{who}");
    assert_eq!(r.header("access-control-max-age"), Some("86400"), "{who}");
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"), "{who}");
    assert_eq!(v1.requests(), before, "{who}: the preflight reached the app");
    // An actual request from an allowed origin (prefix match) gets the CORS headers...
    let mut req = request(http::Method::GET, "reviews:9080", "/cors", Bytes::new()).unwrap();
    req.headers_mut().insert("origin", "https://dev.team.example".parse().unwrap());
    let r = send_h1(out, req).await.unwrap();
    assert_eq!(server_of(&r), "v1", "{who}");
    assert_eq!(r.header("access-control-allow-origin"), Some("https://dev.team.example"), "{who}: actual origin");
    assert_eq!(r.header("access-control-expose-headers"), Some("x-trace"), "{who}");
    // ... one from another origin does not, and its preflight is forwarded (FORWARD).
    let mut req = request(http::Method::GET, "reviews:9080", "/cors", Bytes::new()).unwrap();
    req.headers_mut().insert("origin", "https://evil.example".parse().unwrap());
    let r = send_h1(out, req).await.unwrap();
    assert_eq!(r.header("access-control-allow-origin"), None, "{who}: foreign origin allowed");
    let before = v1.requests();
    let mut req = request(http::Method::OPTIONS, "reviews:9080", "/cors", Bytes::new()).unwrap();
    req.headers_mut().insert("origin", "https://evil.example".parse().unwrap());
    req.headers_mut().insert("access-control-request-method", "POST".parse().unwrap());
    let r = send_h1(out, req).await.unwrap();
    assert_eq!(r.header("access-control-allow-origin"), None, "{who}");
    assert_eq!(v1.requests(), before + 1, "{who}: unmatched preflight not forwarded");

    // headers: request set/remove reach the app, response add reaches the client.
    let mut req = request(http::Method::GET, "reviews:9080", "/headers", Bytes::new()).unwrap();
    req.headers_mut().insert("x-drop", "1".parse().unwrap());
    let r = send_h1(out, req).await.unwrap();
    let seen = &r.json().unwrap()["headers"];
    assert_eq!(seen["x-route"], "headers", "{who}: request header set: {seen}");
    assert!(seen.get("x-drop").is_none(), "{who}: request header not removed: {seen}");
    assert_eq!(r.header("x-served-by"), Some("weft-test"), "{who}: response header add");
}

/// Sidecar to sidecar: the client proxy's endpoint for `reviews` is the reviews proxy's
/// `inbound|PORT` listener (its WEFT_INBOUND address), which forwards to the local app.
/// A client proxy and a server proxy (explicit mode) for the Service `reviews` (port
/// 9080) backed by one app, with `extra` resources (YAML documents) in the mesh and the
/// server proxy's access log at `server_log`.
struct ExplicitPair {
    app: EchoServer,
    client: ProxyHandle,
    server: ProxyHandle,
    /// The client proxy's outbound listener.
    out: SocketAddr,
    /// The server proxy's inbound listener.
    inbound: SocketAddr,
    /// The two proxies' control planes, serving as long as the pair lives.
    _control: [ControlPlane; 2],
}

async fn explicit_pair(extra: &str, server_log: &str) -> ExplicitPair {
    let app = EchoServer::start("reviews-app").await;
    let port = app.addr.port();
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  selector: {{app: reviews}}\n  ports: [{{name: http, port: 9080, targetPort: {port}}}]\n{extra}"
    );
    let parsed = weft_api::parse_str(&yaml, Path::new("svc.yaml"));
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let mesh = MeshConfig {
        resources: parsed.resources,
        explicit_outbound: "127.0.0.1:0".parse().unwrap(),
        ..MeshConfig::default()
    };
    let registry = Registry::new();
    let mut server = workload("reviews-v1", "v1", "127.0.0.1:0".parse().unwrap());
    server.ports[0].port = port;
    registry.upsert(server.clone());

    // The server's proxy: inbound|PORT bound on its WEFT_INBOUND address (port 0 here).
    let server_node = NodeInfo {
        id: "reviews-v1".into(),
        namespace: "default".into(),
        labels: server.labels.clone(),
        ports: server.ports.clone(),
        ..NodeInfo::default()
    };
    let server_cp = control_plane().await;
    for (t, r) in translate(&mesh, &registry.snapshot(), &server_node, ProxyMode::Explicit).into_resources() {
        server_cp.source.set(t, r).unwrap();
    }
    let node_yaml = format!(
        "node:\n  id: reviews-v1\n  cluster: reviews.default\n  name: reviews-v1\n  namespace: default\n  labels:\n    app: reviews\n    version: v1\n  ports: [{{name: http, port: {port}, protocol: TCP}}]\n"
    );
    let server_proxy = weft_proxy_logging(&node_yaml, server_cp.xds, server_log).await;
    let inbound = server_proxy.listener_addr(&format!("inbound|{port}"), WAIT).await.expect("inbound listener bound");

    // The registry learns where the inbound listener is; the client's xDS follows.
    server.inbound = Some(inbound);
    registry.upsert(server);
    let client_xds = translate(&mesh, &registry.snapshot(), &client_node(), ProxyMode::Explicit);
    let cla = client_xds.endpoints_of("outbound|9080||reviews.default.svc.cluster.local").unwrap();
    let eps = &cla.endpoints[0].lb_endpoints;
    assert_eq!(eps.len(), 1);
    let Some(envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(ep)) =
        &eps[0].host_identifier
    else {
        panic!("{eps:?}")
    };
    assert_eq!(ep.address, Some(weft_xds::build::address(inbound)), "endpoint is the peer's inbound listener");
    let client_cp = control_plane().await;
    for (t, r) in client_xds.into_resources() {
        client_cp.source.set(t, r).unwrap();
    }
    let client = weft_proxy(client_cp.xds).await;
    acked_everything(&client_cp, "productpage", String::new).await;
    let out = client.listener_addr("weft-outbound", WAIT).await.unwrap();
    ExplicitPair { app, client, server: server_proxy, out, inbound, _control: [server_cp, client_cp] }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_mode_traffic_flows_client_proxy_to_server_proxy_inbound_to_app() {
    let p = explicit_pair("", "off").await;
    let before = p.app.requests();
    let r = get_via_proxy(p.out, "http://reviews.default.svc.cluster.local:9080/hello").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(server_of(&r), "reviews-app");
    assert_eq!(r.json().unwrap()["path"], "/hello");
    assert_eq!(p.app.requests(), before + 1);
    assert_ne!(p.inbound, p.app.addr, "traffic went through the server proxy, not straight to the app");
    p.client.shutdown().await;
    p.server.shutdown().await;
}

/// The protocol of the server proxy's inbound requests, from its access log.
async fn inbound_protocols(policy: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server-access.log");
    let dr = format!(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  host: reviews\n  trafficPolicy:\n    connectionPool:\n      http: {{h2UpgradePolicy: {policy}}}\n"
    );
    let p = explicit_pair(&dr, log.to_str().unwrap()).await;
    for _ in 0..3 {
        let r = get_via_proxy(p.out, "http://reviews.default.svc.cluster.local:9080/h2").await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(server_of(&r), "reviews-app");
    }
    // Shutting down flushes the access log.
    p.client.shutdown().await;
    p.server.shutdown().await;
    let text = std::fs::read_to_string(&log).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["protocol"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upgrade_policy_makes_the_hop_between_sidecars_http2_and_the_app_still_gets_http1() {
    // The client sends HTTP/1.1; with UPGRADE the sidecars talk HTTP/2 to each other
    // (the server proxy's inbound sees HTTP/2), and the app answers as before.
    assert_eq!(inbound_protocols("UPGRADE").await, ["HTTP/2"; 3]);
    assert_eq!(inbound_protocols("DO_NOT_UPGRADE").await, ["HTTP/1.1"; 3]);
}

const RESILIENCE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec:
  selector: {app: ratings}
  ports: [{name: http, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: default}
spec:
  host: ratings
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 5m, maxEjectionPercent: 100}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings]
  http:
  - route: [{destination: {host: ratings}}]
    retries: {attempts: 0}
---
apiVersion: v1
kind: Service
metadata: {name: details, namespace: default}
spec:
  selector: {app: details}
  ports: [{name: http, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: details, namespace: default}
spec:
  host: details
  trafficPolicy:
    connectionPool:
      http: {http2MaxRequests: 1, http1MaxPendingRequests: 1}
"#;

fn app_workload(app: &str, id: &str, addr: SocketAddr) -> Workload {
    Workload {
        id: id.into(),
        name: id.into(),
        labels: BTreeMap::from([("app".into(), app.into())]),
        ..workload(id, "v1", addr)
    }
}

/// DestinationRule trafficPolicy: outlierDetection ejects an endpoint that fails (here:
/// refuses connections, with retries off) so later requests all succeed; connectionPool
/// limits concurrent requests (the overflow is a 503). Checked on weft and on Envoy fed
/// the same xDS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_rule_outlier_detection_and_connection_pool_behave_as_istio_documents() {
    let ok = EchoServer::start("ratings-ok").await;
    let dead = weft_testkit::net::reserve_addr();
    let details = EchoServer::start("details").await;
    let registry = Registry::new();
    registry.upsert(app_workload("ratings", "ratings-ok", ok.addr));
    registry.upsert(app_workload("ratings", "ratings-dead", dead));
    registry.upsert(app_workload("details", "details-1", details.addr));
    let parsed = weft_api::parse_str(RESILIENCE, Path::new("resilience.yaml"));
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let mesh = MeshConfig {
        resources: parsed.resources,
        explicit_outbound: "127.0.0.1:0".parse().unwrap(),
        ..MeshConfig::default()
    };
    let xds = translate(&mesh, &registry.snapshot(), &client_node(), ProxyMode::Explicit);
    let cp = control_plane().await;
    for (t, resources) in xds.into_resources() {
        cp.source.set(t, resources).unwrap();
    }
    let proxy = weft_proxy(cp.xds).await;
    // Ready can also mean "the initial fetch timed out": wait for the ACKs, so no request
    // races the configuration (a 404 where the routes were not in yet).
    acked_everything(&cp, "productpage", String::new).await;
    let out = proxy.listener_addr("weft-outbound", WAIT).await.unwrap();
    check_resilience(out, "weft", &details).await;

    let envoy = weft_testkit::envoy::Envoy::start(&weft_testkit::envoy::ads_bootstrap(cp.xds, "envoy-sidecar", false))
        .await
        .unwrap();
    acked_everything(&cp, "envoy-sidecar", || envoy.log_tail()).await;
    let envoy_out = envoy.listener_addr("weft-outbound", WAIT).await.unwrap();
    check_resilience(envoy_out, "envoy", &details).await;
    proxy.shutdown().await;
}

/// Waits until the proxy `node_id` has ACKed the version the control plane serves of
/// every type, with no NACK on the way (`context()`, e.g. Envoy's log, goes into the
/// failure message): from then on its requests see the whole configuration.
async fn acked_everything(cp: &ControlPlane, node_id: &str, context: impl Fn() -> String) {
    let mut changes = cp.server.status_changes();
    let acked = tokio::time::timeout(WAIT, async {
        loop {
            let conns = cp.server.connections();
            if let Some(c) = conns.iter().find(|c| c.node_id == node_id) {
                for (t, s) in &c.types {
                    assert!(s.last_nack.is_none(), "{node_id} NACKed {t}: {:?}\n{}", s.last_nack, context());
                }
                let all = [type_url::LISTENER, type_url::ROUTE, type_url::CLUSTER, type_url::ENDPOINT]
                    .iter()
                    .all(|t| c.types.get(*t).and_then(|s| s.acked_version.clone()) == Some(cp.source.version(t)));
                if all {
                    return;
                }
            }
            let _ = changes.changed().await;
        }
    })
    .await;
    assert!(acked.is_ok(), "{node_id} did not ACK every type: {:?}\n{}", cp.server.connections(), context());
}

/// Waits until `addr` accepts connections (a listener can be reported bound a moment
/// before it accepts, notably Envoy's after a listener update).
async fn accepting(addr: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{addr} never accepted a connection");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn check_resilience(out: SocketAddr, who: &str, details: &EchoServer) {
    accepting(out).await;
    // Round robin: without outlier detection half of 40 requests would hit the dead endpoint;
    // with consecutive5xxErrors: 1 it is ejected after its first failure.
    let mut failures = 0;
    for _ in 0..40 {
        let r = get_h1(out, "ratings:9080", "/").await.unwrap();
        if r.status != 200 {
            assert_eq!(r.status, 503, "{who}: {}", r.text());
            failures += 1;
        } else {
            assert_eq!(server_of(&r), "ratings-ok", "{who}");
        }
    }
    assert!(failures <= 1, "{who}: the failing endpoint was not ejected: {failures} of 40 requests failed");

    // http2MaxRequests: 1 — while one request is in flight, a second one overflows.
    let before = details.requests();
    let slow = tokio::spawn(async move { get_h1(out, "details:9080", "/delay/1500").await.unwrap() });
    // In flight once the app has it (not after a guessed delay).
    details.wait_for_requests(before + 1).await;
    let r = get_h1(out, "details:9080", "/").await.unwrap();
    assert_eq!(r.status, 503, "{who}: second concurrent request was not rejected: {}", r.text());
    assert_eq!(slow.await.unwrap().status, 200, "{who}");
    let r = get_h1(out, "details:9080", "/").await.unwrap();
    assert_eq!(r.status, 200, "{who}: limit not released");
}
