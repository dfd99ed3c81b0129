//! The control plane's metrics gatherer against real proxies: a control plane with its
//! CA, a client sidecar (`productpage-v1`) and a server sidecar (`reviews-v2`) with mTLS
//! between them. Requests through both sidecars, and requests the client's sidecar
//! aborts with a fault (503), must show up in `MeshStats::window` from both reporters
//! with exact counts, and as two edges in `MeshStats::edges`: the mTLS edge to
//! `reviews-v2`, and the aborted requests' edge to an unknown workload with every
//! request an error. Requests an AuthorizationPolicy denies are the recent denials.
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

/// The control plane, both sidecars and the client's outbound listener, the route
/// warmed up (one success, and with `all_codes` one abort and one denial too).
struct Mesh {
    cp: ControlPlane,
    reviews: ProxyHandle,
    productpage: ProxyHandle,
    out: std::net::SocketAddr,
    _app: EchoServer,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn mesh(stats: GatherConfig, all_codes: bool) -> Mesh {
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let app = EchoServer::start("reviews-app").await;
    let resources = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  selector: {{app: reviews}}\n  ports: [{{name: http, port: 9080, targetPort: {http}}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  hosts: [reviews]\n  http:\n  - match: [{{uri: {{prefix: /fault}}}}]\n    fault: {{abort: {{httpStatus: 503, percentage: {{value: 100}}}}}}\n    route: [{{destination: {{host: reviews}}}}]\n  - route: [{{destination: {{host: reviews}}}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-denied, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: reviews}}}}\n  action: DENY\n  rules: [{{to: [{{operation: {{paths: [/denied]}}}}]}}]\n",
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
        slo: Default::default(),
        stats,
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
    if all_codes {
        assert_eq!(get_via_proxy(out, "http://reviews:9080/fault/warm").await.unwrap().status, 503);
        assert_eq!(get_via_proxy(out, "http://reviews:9080/denied").await.unwrap().status, 403);
    }
    Mesh { cp, reviews, productpage, out, _app: app, _dirs: (data, dir) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gathered_windows_and_edges_count_the_requests_both_sidecars_saw() {
    let m = mesh(GatherConfig { interval: Duration::from_millis(200), ..Default::default() }, false).await;
    let (cp, out) = (&m.cp, m.out);
    // Every warm-up request counted (or in a proxy's baseline page) before the baseline.
    rounds(cp, 3).await;
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
    for _ in 0..3 {
        let r = get_via_proxy(out, "http://reviews:9080/denied").await.unwrap();
        assert_eq!(r.status, 403);
    }

    // The server's sidecar saw the 23 that reached it (3 denied), the client's all 28
    // with 5 errors.
    let dest = wait_totals(cp, &sel(Reporter::Destination), (base_dest.requests + 23.0, 0.0)).await;
    let src = wait_totals(cp, &sel(Reporter::Source), (base_src.requests + 28.0, base_src.errors + 5.0)).await;
    // The denials, per caller, as the server's sidecar answered them.
    let denials = cp.stats.denials(HOUR);
    assert_eq!(denials.len(), 1, "{denials:?}");
    assert_eq!((denials[0].0.source_workload.as_str(), denials[0].1), ("productpage-v1", 3.0), "{denials:?}");
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
}

/// A real Prometheus (installed by `scripts/setup.sh`) scraping `targets` every second.
struct Prometheus {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    async fn start(targets: &[std::net::SocketAddr]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n- job_name: envoy-stats\n  metrics_path: /stats/prometheus\n  static_configs:\n  - targets: [{}]\n",
            targets.join(", ")
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let addr = reserve_addr();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = std::process::Command::new(weft_testkit::tools::require("prometheus"))
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Prometheus { child, addr, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !get_h1(p.addr, "prometheus", "/-/ready").await.is_ok_and(|r| r.status == 200) {
            assert!(Instant::now() < deadline, "prometheus not ready within 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        p
    }

    /// The number of series an instant query returns.
    async fn count(&self, promql: &str) -> usize {
        let encoded: String = promql
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() || b == b'_' { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect();
        let path = format!("/api/v1/query?query={encoded}");
        let Ok(r) = get_h1(self.addr, "prometheus", &path).await else { return 0 };
        r.json().ok().and_then(|v: serde_json::Value| v["data"]["result"].as_array().map(Vec::len)).unwrap_or(0)
    }
}

/// `MeshStats` over PromQL (`weft control --prometheus`): a real Prometheus scrapes the
/// two sidecars; the same traffic shows up in `window`, `edges`, `series` and `denials`,
/// within what Prometheus's `increase` extrapolation allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_backed_stats_see_the_same_traffic() {
    let m = mesh(GatherConfig::default(), true).await;
    let out = m.out;
    let prom = Prometheus::start(&[m.reviews.metrics_addr(), m.productpage.metrics_addr()]).await;
    let stats = weft_control::meshstats::prom::PromStats::new(&format!("http://{}", prom.addr), WAIT).unwrap();
    // Every warm-up series (200, 503, 403 from both reporters) scraped twice, so the
    // increases that follow are counted from a sample before them.
    let deadline = Instant::now() + WAIT;
    while prom.count("count_over_time(istio_requests_total[1m]) >= 2").await < 5 {
        assert!(Instant::now() < deadline, "Prometheus never scraped the warm-up series twice");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in 0..20 {
        assert_eq!(get_via_proxy(out, &format!("http://reviews:9080/ok/{i}")).await.unwrap().status, 200);
    }
    for i in 0..5 {
        assert_eq!(get_via_proxy(out, &format!("http://reviews:9080/fault/{i}")).await.unwrap().status, 503);
    }
    for _ in 0..3 {
        assert_eq!(get_via_proxy(out, "http://reviews:9080/denied").await.unwrap().status, 403);
    }
    // Run the synchronous reads off the test's runtime thread, as the API does.
    let stats: weft_control::meshstats::SharedStats = std::sync::Arc::new(stats);
    let window = Duration::from_secs(120);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (dest, src) = loop {
        let s = stats.clone();
        let (dest, src) = tokio::task::spawn_blocking(move || {
            (s.window(&sel(Reporter::Destination), window), s.window(&sel(Reporter::Source), window))
        })
        .await
        .unwrap();
        // At least what was sent after the warm-up (plus the warm-up's own tail).
        if dest.requests >= 23.0 && src.requests >= 28.0 && src.errors >= 5.0 {
            break (dest, src);
        }
        assert!(Instant::now() < deadline, "Prometheus never showed the traffic: {dest:?} {src:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // increase() extrapolates past the samples (and may count the warm-up's sample); never
    // to double.
    assert!(dest.requests < 2.0 * 25.0, "{dest:?}");
    assert!(src.errors < 2.0 * 6.0, "{src:?}");
    assert_eq!(dest.errors, 0.0, "{dest:?}");
    assert!(dest.quantile_ms(0.5).is_some_and(|q| q > 0.0), "{dest:?}");
    let s = stats.clone();
    let (edges, points, denials) = tokio::task::spawn_blocking(move || {
        (s.edges(window), s.series(&sel(Reporter::Destination), window, Duration::from_secs(10)), s.denials(window))
    })
    .await
    .unwrap();
    let served = edges.iter().find(|e| e.destination_workload == "reviews-v2").expect("the served edge");
    assert!(served.mtls && served.source_workload == "productpage-v1", "{served:?}");
    let aborted = edges.iter().find(|e| e.destination_workload == "unknown").expect("the aborted edge");
    // Every aborted request is an error (two queries, each extrapolated on its own).
    assert!(aborted.stats.errors > 0.0 && aborted.stats.errors >= 0.9 * aborted.stats.requests, "{aborted:?}");
    assert!(points.len() <= 13, "a 120 s window in 10 s steps: {points:?}");
    // The chart: a point with the traffic (its range must hold two samples around it).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = stats.clone();
        let points =
            tokio::task::spawn_blocking(move || s.series(&sel(Reporter::Destination), window, Duration::from_secs(10)))
                .await
                .unwrap();
        if points.iter().any(|p| p.stats.requests > 0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "no chart point with the traffic: {points:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(denials.iter().any(|(k, n)| k.source_workload == "productpage-v1" && *n >= 3.0), "{denials:?}");
}
