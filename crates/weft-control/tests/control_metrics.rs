//! The control plane's Prometheus metrics on its API port, under istiod's names: a
//! control plane with its CA, one weft sidecar that gets its certificate and its
//! configuration, and NACKs a listener (its inbound address is taken by someone else).
//! The scrape shows the connected proxy, pushes per type, the rejected type (counted,
//! and the proxy named with its error), the CSR and the issued certificate, resource
//! counts and process metrics, and passes `promtool check metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mesh;

use std::path::Path;
use std::time::{Duration, Instant};

use weft_control::control::ControlPlane;
use weft_control::identity::IdentityConfig;
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::get_h1;
use weft_testkit::net::reserve_addr;
use weft_testkit::tools::promtool_check_metrics_allowing;

const WAIT: Duration = Duration::from_secs(30);

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: default}\nspec:\n  selector: {app: reviews}\n  ports: [{name: http, port: 9080}]\n";

/// Lints `promtool` raises on names Istio mandates: its counters have no `_total`, and
/// two of them end in `_count`.
const ISTIO_NAME_LINTS: [&str; 6] = [
    "pilot_xds_pushes counter metrics should have \"_total\" suffix",
    "pilot_total_xds_rejects counter metrics should have \"_total\" suffix",
    "citadel_server_csr_count counter metrics should have \"_total\" suffix",
    "citadel_server_csr_count non-histogram and non-summary metrics should not have \"_count\" suffix",
    "citadel_server_success_cert_issuance_count counter metrics should have \"_total\" suffix",
    "citadel_server_success_cert_issuance_count non-histogram and non-summary metrics should not have \"_count\" suffix",
];

/// The value of the sample `series` (name and labels, as written) on the page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

async fn scrape(cp: &ControlPlane, path: &str) -> (u16, String) {
    let r = get_h1(cp.api_addr, "weft", path).await.unwrap();
    (r.status.as_u16(), r.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_serves_istiod_metrics_for_pushes_nacks_proxies_and_certificates() {
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("svc.yaml"), SERVICE).unwrap();
    let mut identity = IdentityConfig::new(data.path());
    identity.cert_ttl = Duration::from_secs(3600);
    let cp = mesh::control_plane(Some(dir.path()), identity).await;

    // The sidecar's inbound address is held by someone else: its inbound listener
    // cannot bind, so the proxy NACKs that listener configuration.
    let app = EchoServer::start("reviews-app").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let inbound = taken.local_addr().unwrap();
    let token = mesh::join_token(&cp, "default", "bookinfo-reviews").await;
    let text = format!(
        "node:\n  id: reviews\n  cluster: reviews.default\n  name: reviews\n  namespace: default\n  service_account: bookinfo-reviews\n  labels:\n    app: reviews\n  outbound: {}\n  ports:\n  - {{name: http, port: {}, protocol: TCP}}\n  inbound: {inbound}\nxds:\n  address: http://{}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\ndrain_timeout: 1s\nidentity:\n  token: \"{token}\"\n",
        reserve_addr(),
        app.addr.port(),
        cp.xds_addr,
    );
    let proxy = ProxyHandle::start(Bootstrap::parse(&text, Path::new("sidecar.yaml")).unwrap()).await.unwrap();

    // Wait on the facts the page reports: the listener NACK and the issued certificate.
    let deadline = Instant::now() + WAIT;
    let page = loop {
        let (status, page) = scrape(&cp, "/metrics").await;
        assert_eq!(status, 200, "GET /metrics: {page}");
        let rejected = sample(&page, "pilot_total_xds_rejects{type=\"lds\"}").unwrap_or(0.0) >= 1.0;
        let issued = sample(&page, "citadel_server_success_cert_issuance_count").unwrap_or(0.0) >= 1.0;
        if rejected && issued {
            break page;
        }
        assert!(Instant::now() < deadline, "no LDS reject and issued certificate on the page:\n{page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let nack = cp.server.connections().iter().find_map(|c| {
        c.types.get(weft_xds::type_url::LISTENER).and_then(|t| t.last_nack.as_ref()).map(|n| n.error.clone())
    });
    assert!(nack.as_deref().is_some_and(|e| e.contains("cannot bind")), "the reject is the bind failure: {nack:?}");

    assert_eq!(sample(&page, "pilot_xds"), Some(1.0), "one connected proxy:\n{page}");
    // The Control Plane dashboard's "Rejected LDS Configs": this proxy, with its error.
    let lds_reject = page.lines().find(|l| l.starts_with("pilot_xds_lds_reject{")).unwrap_or_default();
    assert!(lds_reject.contains("node=\"reviews\"") && lds_reject.contains("cannot bind"), "{page}");
    assert!(lds_reject.ends_with(" 1"), "{page}");
    assert!(!page.contains("pilot_xds_cds_reject{"), "CDS was accepted:\n{page}");
    assert_eq!(sample(&page, "pilot_services"), Some(1.0), "{page}");
    assert_eq!(sample(&page, "pilot_virt_services"), Some(0.0), "{page}");
    assert!(sample(&page, "process_resident_memory_bytes").unwrap_or(0.0) > 0.0, "{page}");
    assert!(sample(&page, "process_virtual_memory_bytes").unwrap_or(0.0) > 0.0, "{page}");
    assert!(sample(&page, "process_cpu_seconds_total").is_some(), "{page}");
    assert!(sample(&page, "process_open_fds").unwrap_or(0.0) > 0.0, "{page}");
    assert!(page.contains("istio_build{component=\"pilot\",tag=\""), "{page}");
    for t in ["cds", "lds"] {
        let pushes = sample(&page, &format!("pilot_xds_pushes{{type=\"{t}\"}}")).unwrap_or(0.0);
        assert!(pushes >= 1.0, "{t} pushes counted:\n{page}");
        let timed = sample(&page, &format!("pilot_xds_push_time_count{{type=\"{t}\"}}")).unwrap_or(0.0);
        assert!(timed >= 1.0, "{t} push time observed:\n{page}");
    }
    assert!(page.contains("# TYPE pilot_xds_pushes counter\n"), "{page}");
    assert!(page.contains("# TYPE pilot_proxy_convergence_time histogram\n"), "{page}");
    assert!(sample(&page, "citadel_server_csr_count").unwrap_or(0.0) >= 1.0, "{page}");
    assert!(sample(&page, "istiod_uptime_seconds").is_some(), "{page}");
    promtool_check_metrics_allowing(&page, &ISTIO_NAME_LINTS).await.unwrap();

    // A config change reaches the proxy: its push is timed from the change.
    let before = sample(&page, "pilot_proxy_convergence_time_count").unwrap_or(0.0);
    let other = SERVICE.replace("reviews", "ratings");
    std::fs::write(dir.path().join("ratings.yaml"), other).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, page) = scrape(&cp, "/metrics").await;
        if sample(&page, "pilot_proxy_convergence_time_count").unwrap_or(0.0) > before {
            break;
        }
        assert!(Instant::now() < deadline, "no convergence time observed after a change:\n{page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Prometheus' sidecar convention works too.
    let (status, alias) = scrape(&cp, "/stats/prometheus").await;
    assert_eq!(status, 200);
    assert!(alias.contains("pilot_xds_pushes{"), "{alias}");

    drop(taken);
    proxy.shutdown().await;
    cp.shutdown().await;
}
