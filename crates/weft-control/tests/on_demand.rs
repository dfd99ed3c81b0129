//! On-demand xDS end to end: a delta weft proxy against the control plane holds nothing
//! of a mesh of thousands of services until a request names one; then it fetches that
//! service's virtual host (VHDS), cluster and endpoints, routes the very first request,
//! keeps receiving updates of what it subscribed to, and holds as much with 2,000
//! services in the mesh as with 10.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use weft_control::control::{ControlConfig, ControlPlane};
use weft_control::registry::{Workload, WorkloadSource};
use weft_control::translate::{MeshConfig, ProxyMode};
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::get_via_proxy;
use weft_xds::PortInfo;

const WAIT: Duration = Duration::from_secs(30);
const SVC_17: &str = "outbound|9080||svc-17.default.svc.cluster.local";

/// What a proxy holds: listeners, virtual hosts (over all route configurations),
/// clusters and endpoint sets.
#[derive(Debug, PartialEq)]
struct Held {
    listeners: usize,
    vhosts: BTreeSet<String>,
    clusters: BTreeSet<String>,
    endpoints: BTreeSet<String>,
}

fn held(p: &ProxyHandle) -> Held {
    let s = p.context().store.snapshot();
    Held {
        listeners: s.listeners.len(),
        vhosts: s.raw.routes.values().flat_map(|rc| rc.virtual_hosts.iter().map(|v| v.name.clone())).collect(),
        clusters: s.clusters.keys().cloned().collect(),
        endpoints: s.raw.endpoints.keys().cloned().collect(),
    }
}

/// Services `svc-<i>` for `i` in `range` on port 9080 (target port `http`), in namespace default.
fn services(range: std::ops::Range<usize>) -> String {
    range
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\n  namespace: default\nspec:\n  selector:\n    app: svc-{i}\n  ports:\n  - name: http\n    port: 9080\n    targetPort: http\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// A workload of `svc-17` serving on `addr` (its `http` port), with `version`.
fn backend(version: &str, addr: SocketAddr) -> Workload {
    Workload {
        id: format!("svc-17-{version}"),
        name: format!("svc-17-{version}"),
        namespace: "default".into(),
        labels: [("app", "svc-17"), ("version", version)].into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
        service_account: "svc-17".into(),
        ports: vec![PortInfo { name: "http".into(), port: addr.port(), protocol: "TCP".into(), app_protocol: None }],
        addresses: vec![addr.ip()],
        inbound: None,
        ready: true,
        connected_since: SystemTime::now(),
        source: WorkloadSource::Proxy,
    }
}

async fn control_plane(range: std::ops::Range<usize>) -> ControlPlane {
    let cfg = ControlConfig {
        dir: None,
        xds: "127.0.0.1:0".parse().unwrap(),
        api: "127.0.0.1:0".parse().unwrap(),
        mode: ProxyMode::Explicit,
        mesh: MeshConfig::default(),
        identity: None,
        inject: Default::default(),
        webhook: None,
        registry: None,
        slo: Default::default(),
        stats: Default::default(),
    };
    let cp = ControlPlane::start(cfg).await.unwrap();
    let result = cp.store.apply(&services(range), Path::new("mesh.yaml"));
    assert!(result.errors.is_empty(), "{:?}", result.errors);
    cp
}

/// A delta (on-demand) weft proxy using `outbound` as its explicit HTTP proxy port.
async fn on_demand_proxy(xds: SocketAddr, name: &str) -> (ProxyHandle, SocketAddr) {
    let outbound = weft_testkit::net::reserve_addr();
    let text = format!(
        "node:\n  id: {name}.default\n  name: {name}\n  namespace: default\n  labels: {{app: {name}}}\n  outbound: \"{outbound}\"\nxds:\n  address: http://{xds}\n  mode: delta\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\n"
    );
    let p = ProxyHandle::start(Bootstrap::parse(&text, Path::new("bootstrap.yaml")).unwrap()).await.unwrap();
    assert!(p.wait_ready(WAIT).await, "{name} never became ready");
    let out = p.listener_addr("weft-outbound", WAIT).await.expect("weft-outbound bound");
    (p, out)
}

async fn served_by(out: SocketAddr, url: &str) -> String {
    let r = get_via_proxy(out, url).await.unwrap();
    r.header("x-echo-server").map_or_else(|| format!("status {}", r.status), str::to_string)
}

#[tokio::test]
async fn on_demand_proxy_holds_only_what_requests_need_and_follows_updates() {
    let v1 = EchoServer::start("svc-17-v1").await;
    let v2 = EchoServer::start("svc-17-v2").await;
    let cp = control_plane(0..2_000).await;
    cp.registry.upsert(backend("v1", v1.addr));
    cp.registry.upsert(backend("v2", v2.addr));
    let (proxy, out) = on_demand_proxy(cp.xds_addr, "client").await;

    // Ready with the listener and its (empty) route configuration: no virtual host,
    // cluster or endpoint of the 2,000 services.
    let before = held(&proxy);
    assert_eq!(before.listeners, 1, "{before:?}");
    assert!(before.vhosts.is_empty() && before.clusters.is_empty() && before.endpoints.is_empty(), "{before:?}");
    let snap = proxy.context().store.snapshot();
    assert!(snap.raw.routes["weft-outbound"].vhds.is_some(), "the route configuration uses VHDS");

    // The first request succeeds: virtual host, cluster and endpoints come on demand.
    let first = served_by(out, "http://svc-17:9080/").await;
    assert!(first == "svc-17-v1" || first == "svc-17-v2", "first request: {first}");
    let after = held(&proxy);
    assert_eq!(after.vhosts, BTreeSet::from(["weft-outbound/svc-17.default.svc.cluster.local:9080".to_string()]));
    assert_eq!(after.clusters, BTreeSet::from([SVC_17.to_string()]));
    assert_eq!(after.endpoints, BTreeSet::from([SVC_17.to_string()]));
    assert_eq!(proxy.context().store.snapshot().on_demand.vhosts, 1);

    // Another authority of the same service reuses the virtual host.
    assert!(served_by(out, "http://svc-17.default.svc.cluster.local:9080/").await.starts_with("svc-17-"));
    assert_eq!(held(&proxy).vhosts.len(), 1);

    // An unknown host: answered "none" by the control plane (not a timeout), so the
    // explicit proxy's route configuration says 404 (no catch-all in explicit mode).
    let unknown = get_via_proxy(out, "http://nope:9080/").await.unwrap();
    assert_eq!(unknown.status, 404);
    let snap = proxy.context().store.snapshot();
    assert!(snap.on_demand.answered.contains("weft-outbound/nope:9080"), "the control plane answered the alias");
    assert_eq!(held(&proxy).vhosts.len(), 1);

    // A VirtualService for svc-17 reaches the proxy (its subscribed vhost is pushed),
    // and the subset cluster it names is fetched.
    let rules = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: svc-17\n  namespace: default\nspec:\n  host: svc-17\n  subsets:\n  - name: v1\n    labels: {version: v1}\n  - name: v2\n    labels: {version: v2}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: svc-17\n  namespace: default\nspec:\n  hosts: [svc-17]\n  http:\n  - route:\n    - destination: {host: svc-17, subset: v1}\n      weight: 0\n    - destination: {host: svc-17, subset: v2}\n      weight: 100\n";
    let result = cp.store.apply(rules, Path::new("rules.yaml"));
    assert!(result.errors.is_empty(), "{:?}", result.errors);
    let v2_cluster = "outbound|9080|v2|svc-17.default.svc.cluster.local";
    let mut changes = proxy.context().store.subscribe();
    let arrived = tokio::time::timeout(WAIT, async {
        while !proxy.context().store.snapshot().cluster_warm(v2_cluster) {
            let _ = changes.changed().await;
        }
    })
    .await;
    assert!(arrived.is_ok(), "the weighted route never reached the proxy: {:?}", held(&proxy));
    for _ in 0..20 {
        assert_eq!(served_by(out, "http://svc-17:9080/").await, "svc-17-v2");
    }
    let updated = held(&proxy);
    assert_eq!(updated.vhosts.len(), 1, "{updated:?}");
    assert_eq!(updated.clusters, BTreeSet::from([v2_cluster.to_string()]), "the unused cluster is dropped");
    cp.shutdown().await;
}

/// Proxy memory does not grow with the mesh: after the same request, a proxy holds the
/// same resources with 10 services in the mesh as with 2,000.
#[tokio::test]
async fn on_demand_proxy_holds_the_same_with_10_or_2000_services() {
    let echo = EchoServer::start("svc-17-v1").await;
    let mut results = Vec::new();
    // svc-10..svc-19 (10 services), then svc-0..svc-1999; both have svc-17.
    for range in [10..20, 0..2_000] {
        let cp = control_plane(range).await;
        cp.registry.upsert(backend("v1", echo.addr));
        let (proxy, out) = on_demand_proxy(cp.xds_addr, "client").await;
        let idle = held(&proxy);
        assert_eq!(served_by(out, "http://svc-17:9080/").await, "svc-17-v1");
        results.push((idle, held(&proxy)));
        cp.shutdown().await;
    }
    let (idle_small, busy_small) = &results[0];
    let (idle_big, busy_big) = &results[1];
    assert_eq!(idle_small, idle_big, "idle proxy: same resources whatever the mesh size");
    assert_eq!(busy_small, busy_big, "after one request: same resources whatever the mesh size");
    assert_eq!(busy_big.clusters.len(), 1);
}
