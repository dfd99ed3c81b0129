//! SLOs end to end against real proxies: a control plane with its CA and its metrics
//! gatherer, a server sidecar (`ratings-v1`, an echo app behind it) and a client sidecar
//! (`reviews-v1`). Ratings starts failing: its app answers 5xx, and a VirtualService
//! fault aborts requests in the caller's sidecar. The SLO over the service's own view
//! (`reporter: destination`) burns on the app's errors only, the SLO over the callers'
//! view (`reporter: source`) on both; each pages (1h/5m), the page is POSTed to the
//! alert webhook, and `/api/v1/slos` and `/metrics` show it, with the SLI the gathered
//! statistics give.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mesh;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use weft_control::control::{ControlConfig, ControlPlane};
use weft_control::identity::IdentityConfig;
use weft_control::meshstats::gather::GatherConfig;
use weft_control::meshstats::{Reporter, Selector};
use weft_control::slo::SloConfig;
use weft_control::translate::{MeshConfig, ProxyMode};
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::{get_h1, get_via_proxy};
use weft_testkit::net::{reserve_addr, reserve_consecutive};

const WAIT: Duration = Duration::from_secs(30);
const RATINGS: &str = "ratings.default.svc.cluster.local";
const WINDOW: Duration = Duration::from_secs(28 * 86_400);

async fn sidecar(cp: &ControlPlane, workload: &str, app: &str, sa: &str, extra: &str) -> ProxyHandle {
    let token = mesh::join_token(cp, "default", sa).await;
    let text = format!(
        "node:\n  id: sidecar~127.0.0.1~{workload}-abcde.default~default.svc.cluster.local\n  cluster: {app}.default\n  name: {workload}-abcde\n  workload_name: {workload}\n  namespace: default\n  service_account: {sa}\n  labels:\n    app: {app}\n    version: v1\n  outbound: {}\n{extra}xds:\n  address: http://{}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\ndrain_timeout: 1s\nidentity:\n  token: \"{token}\"\n",
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

/// A webhook receiver on port 0: every POSTed body, in order.
async fn receiver() -> (String, tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>) {
    use http_body_util::BodyExt;
    let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/alerts", sock.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = sock.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let _ = tx.send(serde_json::from_slice(&body).unwrap_or_default());
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (url, rx)
}

/// The SLO named `name` in `GET /api/v1/slos`.
async fn slo(cp: &ControlPlane, name: &str) -> serde_json::Value {
    let v = get_h1(cp.api_addr, "weft", "/api/v1/slos").await.unwrap().json().unwrap();
    v["slos"].as_array().unwrap().iter().find(|s| s["name"] == name).cloned().unwrap_or_else(|| panic!("{name}: {v}"))
}

fn page_fires(slo: &serde_json::Value) -> bool {
    slo["alerts"].as_array().unwrap().iter().any(|a| a["long"] == "1h" && a["firing"] == true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_ratings_burns_its_slos_and_the_page_reaches_the_webhook() {
    let (webhook, mut alerts) = receiver().await;
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let app = EchoServer::start("ratings-app").await;
    let slos = ["served", "callers"]
        .map(|name| {
            let reporter = if name == "served" { "destination" } else { "source" };
            format!("---\napiVersion: weft.dev/v1alpha1\nkind: ServiceLevelObjective\nmetadata: {{name: ratings-{name}, namespace: default}}\nspec:\n  service: ratings\n  reporter: {reporter}\n  sli: {{successRate: {{}}}}\n  target: 99\n  window: 28d\n")
        })
        .join("");
    let resources = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: ratings, namespace: default}}\nspec:\n  selector: {{app: ratings}}\n  ports: [{{name: http, port: 9080, targetPort: {http}}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: ratings, namespace: default}}\nspec:\n  hosts: [ratings]\n  http:\n  - match: [{{uri: {{prefix: /fault}}}}]\n    fault: {{abort: {{httpStatus: 500, percentage: {{value: 100}}}}}}\n    route: [{{destination: {{host: ratings}}}}]\n  - route: [{{destination: {{host: ratings}}}}]\n{slos}",
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
        slo: SloConfig { interval: Duration::from_millis(100), webhook: Some(webhook), stats: None },
        stats: GatherConfig { interval: Duration::from_millis(200), ..Default::default() },
    })
    .await
    .unwrap();
    assert!(cp.store.snapshot().errors.is_empty(), "{:?}", cp.store.snapshot().errors);

    let inbound = reserve_consecutive(1);
    let ports =
        format!("  ports:\n  - {{name: http, port: {}, protocol: TCP}}\n  inbound: {inbound}\n", app.addr.port());
    let _ratings = sidecar(&cp, "ratings-v1", "ratings", "bookinfo-ratings", &ports).await;
    let reviews = sidecar(&cp, "reviews-v1", "reviews", "bookinfo-reviews", "").await;
    let out = reviews.listener_addr("weft-outbound", WAIT).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while !get_via_proxy(out, "http://ratings:9080/ok").await.is_ok_and(|r| r.status == 200) {
        assert!(Instant::now() < deadline, "ratings never answered through both sidecars");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Healthy traffic first: the served SLO sees it all succeed and does not page.
    rounds(&cp, 3).await;
    for i in 0..10 {
        assert_eq!(get_via_proxy(out, &format!("http://ratings:9080/ok/{i}")).await.unwrap().status, 200);
    }
    let dest =
        Selector { reporter: Reporter::Destination, destination_service: Some(RATINGS.into()), ..Default::default() };
    let src = Selector { reporter: Reporter::Source, ..dest.clone() };
    let deadline = Instant::now() + WAIT;
    loop {
        let s = slo(&cp, "ratings-served").await;
        if s["sli_value"] == 1.0 {
            assert!(!page_fires(&s), "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "the served SLO never saw the healthy traffic: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let base_dest = cp.stats.window(&dest, WINDOW);
    let base_src = cp.stats.window(&src, WINDOW);
    assert_eq!(base_dest.errors, 0.0, "{base_dest:?}");

    // Ratings fails: 20 answers of its app are 500, 20 requests abort in the caller.
    for i in 0..20 {
        assert_eq!(get_via_proxy(out, &format!("http://ratings:9080/status/500?{i}")).await.unwrap().status, 500);
        assert_eq!(get_via_proxy(out, &format!("http://ratings:9080/fault/{i}")).await.unwrap().status, 500);
    }

    // Both SLOs page, and the webhook hears it.
    let mut paged = std::collections::BTreeSet::new();
    while paged.len() < 2 {
        let n = tokio::time::timeout(WAIT, alerts.recv()).await.expect("a page within 30 s").unwrap();
        assert_eq!(n["status"], "firing", "nothing resolves while ratings fails: {n}");
        assert_eq!(n["slo"]["service"], RATINGS, "{n}");
        if n["severity"] == "page" && n["long"] == "1h" {
            paged.insert(n["slo"]["name"].as_str().unwrap().to_string());
        }
    }

    // The served SLO counted the app's 20 errors and none of the aborted requests; the
    // callers' SLO both; each SLI is what the gathered statistics give.
    let deadline = Instant::now() + WAIT;
    loop {
        let (d, s) = (cp.stats.window(&dest, WINDOW), cp.stats.window(&src, WINDOW));
        if d.errors == base_dest.errors + 20.0 && s.errors >= base_src.errors + 40.0 {
            let served = slo(&cp, "ratings-served").await;
            let callers = slo(&cp, "ratings-callers").await;
            let want = (d.success_rate().unwrap(), cp.stats.window(&src, WINDOW).success_rate().unwrap());
            let got = (served["sli_value"].as_f64().unwrap(), callers["sli_value"].as_f64().unwrap());
            if (got.0 - want.0).abs() < 1e-9 && (got.1 - want.1).abs() < 1e-9 {
                assert!(page_fires(&served) && page_fires(&callers), "{served}\n{callers}");
                assert!(served["budget_remaining"].as_f64().unwrap() < 0.0, "{served}");
                assert!(got.1 < got.0, "the callers saw the aborted requests too: {served}\n{callers}");
                break;
            }
        }
        assert!(Instant::now() < deadline, "SLIs never matched the statistics: {d:?} {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = get_h1(cp.api_addr, "weft", "/metrics").await.unwrap().text();
    let firing = format!(
        "weft_slo_alert_firing{{slo=\"ratings-served\",namespace=\"default\",service=\"{RATINGS}\",severity=\"page\",long=\"1h\",short=\"5m\"}} 1"
    );
    assert!(metrics.contains(&firing), "{metrics}");
}
