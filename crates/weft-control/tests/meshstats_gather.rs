//! The control plane's metrics gatherer against real proxies: a control plane with its
//! CA, a client sidecar (`productpage-v1`) and a server sidecar (`reviews-v2`) with mTLS
//! between them. Requests through both sidecars, and requests the client's sidecar
//! aborts with a fault (503), must show up in `MeshStats::window` from both reporters
//! with exact counts, and as two edges in `MeshStats::edges`: the mTLS edge to
//! `reviews-v2`, and the aborted requests' edge to an unknown workload with every
//! request an error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mesh;

use std::path::Path;
use std::time::{Duration, Instant};

use weft_control::control::{ControlConfig, ControlPlane};
use weft_control::identity::IdentityConfig;
use weft_control::meshstats::gather::GatherConfig;
use weft_control::meshstats::{Reporter, Selector, WindowStats};
use weft_control::translate::{MeshConfig, ProxyMode};
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::{get_h1, get_via_proxy};
use weft_testkit::net::{reserve_addr, reserve_consecutive};

const WAIT: Duration = Duration::from_secs(30);
const REVIEWS: &str = "reviews.default.svc.cluster.local";
const HOUR: Duration = Duration::from_secs(3600);

async fn sidecar(cp: &ControlPlane, workload: &str, app: &str, sa: &str, extra: &str) -> ProxyHandle {
    let token = mesh::join_token(cp, "default", sa).await;
    let text = format!(
        "node:\n  id: sidecar~127.0.0.1~{workload}-abcde.default~default.svc.cluster.local\n  cluster: {app}.default\n  name: {workload}-abcde\n  workload_name: {workload}\n  namespace: default\n  service_account: {sa}\n  labels:\n    app: {app}\n    version: v{}\n  outbound: {}\n{extra}xds:\n  address: http://{}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\ndrain_timeout: 1s\nidentity:\n  token: \"{token}\"\n",
        &workload[workload.len() - 1..],
        reserve_addr(),
        cp.xds_addr,
    );
    let b = Bootstrap::parse(&text, Path::new("sidecar.yaml")).unwrap();
    let p = ProxyHandle::start(b).await.unwrap();
    assert!(p.wait_ready(WAIT).await, "{workload} never became ready");
    p
}

/// Waits for `n` more completed scrape rounds.
async fn rounds(cp: &ControlPlane, n: u64) {
    let mut rx = cp.gatherer.rounds();
    let start = *rx.borrow_and_update();
    tokio::time::timeout(WAIT, rx.wait_for(|r| *r >= start + n)).await.expect("scrape rounds").expect("gatherer alive");
}

fn sel(reporter: Reporter) -> Selector {
    Selector { reporter, destination_service: Some(REVIEWS.into()), ..Default::default() }
}

/// Polls until the window totals of `s` reach `want` (requests, errors), then checks one
/// more round does not overshoot.
async fn wait_totals(cp: &ControlPlane, s: &Selector, want: (f64, f64)) -> WindowStats {
    let deadline = Instant::now() + WAIT;
    loop {
        let w = cp.stats.window(s, HOUR);
        if (w.requests, w.errors) == want {
            rounds(cp, 2).await;
            let again = cp.stats.window(s, HOUR);
            assert_eq!((again.requests, again.errors), want, "{s:?} moved past the traffic sent");
            return again;
        }
        assert!(Instant::now() < deadline, "{s:?}: wanted {want:?}, have {w:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gathered_windows_and_edges_count_the_requests_both_sidecars_saw() {
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let app = EchoServer::start("reviews-app").await;
    let resources = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  selector: {{app: reviews}}\n  ports: [{{name: http, port: 9080, targetPort: {http}}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  hosts: [reviews]\n  http:\n  - match: [{{uri: {{prefix: /fault}}}}]\n    fault: {{abort: {{httpStatus: 503, percentage: {{value: 100}}}}}}\n    route: [{{destination: {{host: reviews}}}}]\n  - route: [{{destination: {{host: reviews}}}}]\n",
        http = app.addr.port(),
    );
    std::fs::write(dir.path().join("mesh.yaml"), resources).unwrap();
    let mut identity = IdentityConfig::new(data.path());
    identity.cert_ttl = Duration::from_secs(3600);
    let cp = ControlPlane::start(ControlConfig {
        dir: Some(dir.path().to_path_buf()),
        xds: "127.0.0.1:0".parse().unwrap(),
        api: "127.0.0.1:0".parse().unwrap(),
        mode: ProxyMode::Explicit,
        mesh: MeshConfig { explicit_outbound: "127.0.0.1:0".parse().unwrap(), ..MeshConfig::default() },
        identity: Some(identity),
        inject: Default::default(),
        webhook: None,
        registry: None,
        stats: GatherConfig { interval: Duration::from_millis(200), ..Default::default() },
    })
    .await
    .unwrap();

    let inbound = reserve_consecutive(1);
    let ports =
        format!("  ports:\n  - {{name: http, port: {}, protocol: TCP}}\n  inbound: {inbound}\n", app.addr.port());
    let reviews = sidecar(&cp, "reviews-v2", "reviews", "bookinfo-reviews", &ports).await;
    let productpage = sidecar(&cp, "productpage-v1", "productpage", "bookinfo-productpage", "").await;
    let out = productpage.listener_addr("weft-outbound", WAIT).await.unwrap();

    // Until the route works; what that took is the baseline.
    let deadline = Instant::now() + WAIT;
    while !get_via_proxy(out, "http://reviews:9080/ok").await.is_ok_and(|r| r.status == 200) {
        assert!(Instant::now() < deadline, "reviews never answered through both sidecars");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every warm-up request counted (or in a proxy's baseline page) before the baseline.
    rounds(&cp, 3).await;
    let base_dest = cp.stats.window(&sel(Reporter::Destination), HOUR);
    let base_src = cp.stats.window(&sel(Reporter::Source), HOUR);
    assert_eq!(base_dest.errors, 0.0);

    for i in 0..20 {
        let r = get_via_proxy(out, &format!("http://reviews:9080/ok/{i}")).await.unwrap();
        assert_eq!(r.status, 200);
    }
    for i in 0..5 {
        let r = get_via_proxy(out, &format!("http://reviews:9080/fault/{i}")).await.unwrap();
        assert_eq!(r.status, 503);
    }

    // The server's sidecar saw the 20 that reached it, the client's all 25 with 5 errors.
    let dest = wait_totals(&cp, &sel(Reporter::Destination), (base_dest.requests + 20.0, 0.0)).await;
    let src = wait_totals(&cp, &sel(Reporter::Source), (base_src.requests + 25.0, base_src.errors + 5.0)).await;
    assert_eq!(dest.latency_ms.last(), Some(&(f64::INFINITY, dest.requests)), "{dest:?}");
    assert!(dest.quantile_ms(0.99).is_some_and(|q| q > 0.0), "{dest:?}");
    assert_eq!(src.success_rate(), Some(1.0 - src.errors / src.requests));
    // A selector on the source workload and version picks the same requests.
    let by_workload = Selector {
        source_workload: Some("productpage-v1".into()),
        destination_workload: Some("reviews-v2".into()),
        destination_version: Some("v2".into()),
        ..sel(Reporter::Destination)
    };
    assert_eq!(cp.stats.window(&by_workload, HOUR).requests, dest.requests);

    let edges = cp.stats.edges(HOUR);
    let to_reviews: Vec<_> = edges.iter().filter(|e| e.destination_service == REVIEWS).collect();
    assert_eq!(to_reviews.len(), 2, "{edges:#?}");
    let served = to_reviews.iter().find(|e| e.destination_workload == "reviews-v2").expect("the served edge");
    assert_eq!(served.source_workload, "productpage-v1");
    assert_eq!(served.destination_version, "v2");
    assert!(served.mtls, "{served:?}");
    assert_eq!((served.stats.requests, served.stats.errors), (dest.requests, 0.0));
    let aborted = to_reviews.iter().find(|e| e.destination_workload == "unknown").expect("the aborted edge");
    assert_eq!((aborted.stats.requests, aborted.stats.errors), (5.0, 5.0), "{aborted:?}");
    assert!(!aborted.mtls);

    // The control plane's /metrics counts its own gathering.
    let text = get_h1(cp.api_addr, "weft", "/metrics").await.unwrap().text();
    assert!(text.contains("weft_meshstats_series "), "{text}");
    assert!(text.contains("weft_meshstats_scrape_targets 2"), "{text}");
    drop((reviews, productpage));
}
