//! Local rate limiting end to end, as an operator runs it: `weft control` watching a
//! directory with Istio's "Enabling Rate Limits using Envoy" task EnvoyFilters (copied
//! in `samples/tasks/policy-enforcement/`) or weft's `RateLimit`, `productpage` behind a
//! weft sidecar or a stock Envoy (`weft envoy-bootstrap`), and a client sidecar calling
//! it: five calls give `200 200 200 200 429`, as the task shows, the refusal carrying
//! `x-local-rate-limit: true`. `weft analyze` reports the EnvoyFilter patches weft does
//! not apply (WFT0010).

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use prost::Message;
use tokio::io::{AsyncBufReadExt, BufReader};
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::{get_via_proxy, Reply};
use weft_testkit::net::reserve_addr;

const WEFT: &str = env!("CARGO_BIN_EXE_weft");
const WAIT: Duration = Duration::from_secs(30);

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: productpage\nspec:\n  selector:\n    app: productpage\n  ports:\n  - name: http\n    port: 9080\n    targetPort: http\n";

const RATE_LIMIT: &str = "apiVersion: weft.dev/v1alpha1
kind: RateLimit
metadata:
  name: productpage
  namespace: default
spec:
  selector:
    matchLabels:
      app: productpage
  requestsPerUnit: 4
  unit: minute
";

async fn start_control(dir: &Path) -> (tokio::process::Child, SocketAddr) {
    let mut control = tokio::process::Command::new(WEFT)
        .args(["control", "--insecure-dev", "--dir"])
        .arg(dir)
        .args(["--xds", "127.0.0.1:0", "--api", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(control.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().unwrap();
    let xds: SocketAddr = line.split("xDS on ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    (control, xds)
}

async fn proxy(xds: SocketAddr, name: &str, app_port: Option<u16>, outbound: SocketAddr) -> ProxyHandle {
    let ports =
        app_port.map(|p| format!("  ports:\n  - {{name: http, port: {p}, protocol: TCP}}\n")).unwrap_or_default();
    let inbound = app_port.map(|_| format!("  inbound: \"{}\"\n", reserve_addr())).unwrap_or_default();
    let text = format!(
        "node:\n  id: {name}.default\n  name: {name}\n  namespace: default\n  service_account: {name}\n  labels: {{app: {name}, version: v1}}\n{ports}{inbound}  outbound: \"{outbound}\"\nxds:\n  address: http://{xds}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\n"
    );
    let p = ProxyHandle::start(Bootstrap::parse(&text, Path::new("bootstrap.yaml")).unwrap()).await.unwrap();
    assert!(p.wait_ready(WAIT).await, "{name} never became ready");
    p
}

/// The HTTP filter names and the per-route filter keys of the proxy's inbound listener
/// for `port`, as last received.
fn inbound_filters(p: &ProxyHandle, port: u16) -> (Vec<String>, Vec<String>) {
    let snap = p.context().store.snapshot();
    let Some(l) = snap.raw.listeners.get(&format!("inbound|{port}")) else { return Default::default() };
    let mut out = (Vec::new(), Vec::new());
    for f in l.filter_chains.iter().flat_map(|c| &c.filters) {
        let Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(any)) = &f.config_type
        else {
            continue;
        };
        let Ok(hcm) = HttpConnectionManager::decode(any.value.as_slice()) else { continue };
        out.0.extend(hcm.http_filters.iter().map(|f| f.name.clone()));
        if let Some(RouteSpecifier::RouteConfig(rc)) = &hcm.route_specifier {
            let routes = rc.virtual_hosts.iter().flat_map(|v| &v.routes);
            out.1.extend(routes.flat_map(|r| r.typed_per_filter_config.keys().cloned()));
        }
    }
    out
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn call(out: SocketAddr) -> Reply {
    get_via_proxy(out, "http://productpage:9080/productpage").await.unwrap()
}

/// Five calls, as the task's `for i in {1..5}` loop; their statuses and the last reply.
async fn five(out: SocketAddr) -> (Vec<u16>, Reply) {
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..5 {
        let r = call(out).await;
        statuses.push(r.status.as_u16());
        last = Some(r);
    }
    (statuses, last.unwrap())
}

#[tokio::test]
async fn istios_local_rate_limit_task_and_weft_rate_limit_limit_productpage_to_four_a_minute() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("service.yaml"), SERVICE).unwrap();
    let (_control, xds) = start_control(dir.path()).await;
    let app = EchoServer::start("productpage-v1").await;
    let port = app.addr.port();
    let pp = proxy(xds, "productpage", Some(port), reserve_addr()).await;
    let out = reserve_addr();
    let _ratings = proxy(xds, "ratings", None, out).await;
    // Routing works before any limit: a dozen calls all pass.
    let deadline = Instant::now() + WAIT;
    while call(out).await.status != 200 {
        assert!(Instant::now() < deadline, "productpage never reachable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..12 {
        assert_eq!(call(out).await.status, 200);
    }

    // 1. The task's first EnvoyFilter: the bucket in the connection manager's filter.
    let ef = dir.path().join("ratelimit.yaml");
    std::fs::write(&ef, weft_testkit::conformance("tasks/policy-enforcement/local-rate-limit.yaml")).unwrap();
    wait_for("the filter reaches productpage's sidecar", || {
        inbound_filters(&pp, port).0.iter().any(|f| f == "envoy.filters.http.local_ratelimit")
    })
    .await;
    let (statuses, refused) = five(out).await;
    assert_eq!(statuses, [200, 200, 200, 200, 429], "no more than 4 req/min per productpage instance");
    assert_eq!(refused.header("x-local-rate-limit"), Some("true"));
    assert_eq!(refused.text(), "local_rate_limited");

    // 2. The task's second EnvoyFilter: the bucket per route of `inbound|http|9080`...
    // weft names the inbound virtual host after the workload port, as Istio does.
    let route_form = weft_testkit::conformance("tasks/policy-enforcement/local-rate-limit-route.yaml")
        .replace("inbound|http|9080", &format!("inbound|http|{port}"));
    std::fs::write(&ef, route_form).unwrap();
    wait_for("the per-route configuration reaches productpage's sidecar", || {
        inbound_filters(&pp, port).1.iter().any(|f| f == "envoy.filters.http.local_ratelimit")
    })
    .await;
    let (statuses, refused) = five(out).await;
    assert_eq!(statuses, [200, 200, 200, 200, 429], "the route's own bucket: 4 per minute");
    assert_eq!(refused.header("x-local-rate-limit"), Some("true"));

    // 3. weft's RateLimit does the same.
    std::fs::remove_file(&ef).unwrap();
    std::fs::write(dir.path().join("ratelimit-weft.yaml"), RATE_LIMIT).unwrap();
    wait_for("the RateLimit reaches productpage's sidecar", || {
        let (filters, per_route) = inbound_filters(&pp, port);
        filters.iter().any(|f| f == "envoy.filters.http.local_ratelimit.default.productpage") && per_route.is_empty()
    })
    .await;
    let (statuses, refused) = five(out).await;
    assert_eq!(statuses, [200, 200, 200, 200, 429], "requestsPerUnit: 4, unit: minute");
    assert_eq!(refused.header("x-local-rate-limit"), Some("true"));
    assert_eq!(app.requests(), 12 + 1 + 4 * 3, "refused calls never reached the app");

    // 4. Scoped to a path prefix: /productpage is limited, /health is not.
    let scoped = format!("{RATE_LIMIT}  match:\n  - pathPrefix: /productpage\n");
    std::fs::write(dir.path().join("ratelimit-weft.yaml"), scoped).unwrap();
    wait_for("the scoped RateLimit reaches productpage's sidecar", || {
        inbound_filters(&pp, port).1.iter().any(|f| f == "envoy.filters.http.local_ratelimit.default.productpage")
    })
    .await;
    let (statuses, _) = five(out).await;
    assert_eq!(statuses, [200, 200, 200, 200, 429], "the /productpage route's own bucket");
    for _ in 0..6 {
        let r = get_via_proxy(out, "http://productpage:9080/health").await.unwrap();
        assert_eq!(r.status, 200, "paths outside the prefix are not limited");
    }
}

#[tokio::test]
async fn a_stock_envoy_sidecar_fed_the_task_envoy_filter_limits_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("service.yaml"), SERVICE).unwrap();
    std::fs::write(
        dir.path().join("ratelimit.yaml"),
        weft_testkit::conformance("tasks/policy-enforcement/local-rate-limit.yaml"),
    )
    .unwrap();
    let (_control, xds) = start_control(dir.path()).await;
    let app = EchoServer::start("productpage-v1").await;
    let inbound = reserve_addr();
    let o = tokio::process::Command::new(WEFT)
        .args(["envoy-bootstrap", "--name", "productpage", "--namespace", "default"])
        .args(["--labels", "app=productpage,version=v1", "--ports", &format!("http:{}", app.addr.port())])
        .args(["--xds", &xds.to_string(), "--admin-port", "0", "--inbound", &inbound.to_string()])
        .args(["--outbound", &reserve_addr().to_string()])
        .output()
        .await
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let envoy = weft_testkit::envoy::Envoy::start(&String::from_utf8_lossy(&o.stdout)).await.unwrap();
    let out = reserve_addr();
    let _ratings = proxy(xds, "ratings", None, out).await;
    // Envoy has the filter once its inbound listener is up (the EnvoyFilter was there
    // from the start); the client's first call may race its own configuration.
    let name = format!("inbound|{}", app.addr.port());
    envoy.listener_addr(&name, WAIT).await.unwrap_or_else(|e| panic!("{e}\n{}", envoy.log_tail()));
    let deadline = Instant::now() + WAIT;
    let mut first = call(out).await;
    while first.status == 503 && first.header("x-local-rate-limit").is_none() {
        assert!(Instant::now() < deadline, "productpage never reachable: {}", envoy.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
        first = call(out).await;
    }
    let mut statuses = vec![first.status.as_u16()];
    let mut last = first;
    for _ in 0..4 {
        last = call(out).await;
        statuses.push(last.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429], "{}", envoy.log_tail());
    assert_eq!(last.header("x-local-rate-limit"), Some("true"));
    assert_eq!(last.text(), "local_rate_limited");
    let stats = envoy.admin_get("/stats?filter=http_local_rate_limit").await.unwrap();
    assert!(stats.contains("http_local_rate_limiter.http_local_rate_limit.rate_limited: 1"), "{stats}");

    // weft's RateLimit, scoped to a path prefix: Envoy limits /productpage, not /health.
    std::fs::remove_file(dir.path().join("ratelimit.yaml")).unwrap();
    let scoped = format!("{RATE_LIMIT}  match:\n  - pathPrefix: /productpage\n");
    std::fs::write(dir.path().join("ratelimit-weft.yaml"), scoped).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let dump = envoy.admin_get("/config_dump").await.unwrap();
        if dump.contains("weft-ratelimit:/productpage") && !dump.contains("http_local_rate_limiter") {
            break;
        }
        assert!(Instant::now() < deadline, "the RateLimit never reached Envoy: {}", envoy.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Envoy keeps serving open connections with the filter chain they were accepted on
    // until they drain (weft's proxy applies the change at their next request): a new
    // client, with new connections, sees the new configuration.
    let out = reserve_addr();
    let _client = proxy(xds, "reviews", None, out).await;
    let deadline = Instant::now() + WAIT;
    while get_via_proxy(out, "http://productpage:9080/health").await.unwrap().status != 200 {
        assert!(Instant::now() < deadline, "productpage never reachable from the new client");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (statuses, refused) = five(out).await;
    assert_eq!(statuses, [200, 200, 200, 200, 429], "{}", envoy.log_tail());
    assert_eq!(refused.header("x-local-rate-limit"), Some("true"));
    let stats = envoy.admin_get("/stats?filter=default_productpage").await.unwrap();
    assert!(stats.contains("default_productpage.http_local_rate_limit.rate_limited: 1"), "{stats}");
    for _ in 0..6 {
        let r = get_via_proxy(out, "http://productpage:9080/health").await.unwrap();
        assert_eq!(r.status, 200, "paths outside the prefix are not limited");
    }
}

#[tokio::test]
async fn analyze_reports_envoy_filter_patches_weft_does_not_apply() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lua.yaml");
    std::fs::write(
        &path,
        "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: lua, namespace: default}\nspec:\n  configPatches:\n  - applyTo: HTTP_FILTER\n    match: {context: SIDECAR_INBOUND}\n    patch:\n      operation: INSERT_BEFORE\n      value:\n        name: envoy.filters.http.lua\n        typed_config: {'@type': type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua}\n",
    )
    .unwrap();
    let out = tokio::process::Command::new(WEFT).args(["analyze", "-f"]).arg(&path).output().await.unwrap();
    assert_eq!(out.status.code(), Some(79), "istioctl's exit code for issues found");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Error [WFT0010]") && text.contains("spec.configPatches[0].patch.value is not applied by weft"),
        "{text}"
    );
    let task = weft_testkit::conformance_dir().join("tasks/policy-enforcement/local-rate-limit.yaml");
    let out = tokio::process::Command::new(WEFT).args(["analyze", "-f"]).arg(&task).output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("WFT0010"), "the task's patches are applied: {text}");
}
