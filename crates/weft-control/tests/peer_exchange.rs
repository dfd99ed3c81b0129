//! Istio's peer metadata exchange between a stock Envoy fed by weft's control plane and
//! weft sidecars: each side reports the other's workload, namespace, app and version,
//! and neither application ever sees `x-envoy-peer-metadata` / `x-envoy-peer-metadata-id`
//! (the apps are echo servers that answer with the headers they received).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mesh;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use weft_control::control::ControlPlane;
use weft_control::identity::IdentityConfig;
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::{EchoServer, SERVER_HEADER};
use weft_testkit::http::{get_h1, send_h1, Reply};
use weft_testkit::net::reserve_addr;

const WAIT: Duration = Duration::from_secs(30);
const PEER_HEADERS: [&str; 2] = ["x-envoy-peer-metadata", "x-envoy-peer-metadata-id"];

const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec:
  selector: {app: ratings}
  ports: [{name: http, port: 9080}]
"#;

/// Mesh mTLS everywhere, so the principals are proven.
const STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec:
  mtls: {mode: STRICT}
"#;

/// A weft sidecar with a mesh identity, labelled `app: <name>, version: v1`; `app` is
/// the local application's address.
async fn sidecar(cp: &ControlPlane, name: &str, sa: &str, app: Option<SocketAddr>) -> ProxyHandle {
    let token = mesh::join_token(cp, "default", sa).await;
    let ports = app
        .map(|a| {
            format!("  ports:\n  - {{name: http, port: {}, protocol: TCP}}\n  inbound: {}\n", a.port(), reserve_addr())
        })
        .unwrap_or_default();
    let text = format!(
        "node:\n  id: {name}\n  cluster: {name}.default\n  name: {name}\n  namespace: default\n  service_account: {sa}\n  labels:\n    app: {name}\n    version: v1\n  outbound: {}\n{ports}xds:\n  address: http://{}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\ndrain_timeout: 1s\nidentity:\n  token: \"{token}\"\n",
        reserve_addr(),
        cp.xds_addr,
    );
    let b = Bootstrap::parse(&text, Path::new("sidecar.yaml")).unwrap();
    let p = ProxyHandle::start(b).await.unwrap();
    assert!(p.wait_ready(WAIT).await, "{name} never became ready");
    p
}

/// The `istio_requests_total` line of `p` with `reporter`, once there is one.
async fn request_line(p: &ProxyHandle, reporter: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = get_h1(p.metrics_addr(), "m", "/stats/prometheus").await.unwrap().text();
        let found = m.lines().find(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains(&format!("reporter=\"{reporter}\""))
                && l.contains("response_code=\"200\"")
        });
        if let Some(l) = found {
            return l.to_string();
        }
        assert!(Instant::now() < deadline, "no {reporter} report:\n{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `reply` came from the echo app `app`, which saw no peer metadata header, and carries
/// none back to the calling application.
fn assert_clean(reply: &Reply, app: &str) {
    assert_eq!((reply.status.as_u16(), reply.header(SERVER_HEADER)), (200, Some(app)), "{}", reply.text());
    let seen = &reply.json().unwrap()["headers"];
    for h in PEER_HEADERS {
        assert!(seen.get(h).is_none(), "{app} received {h}: {seen}");
        assert!(reply.header(h).is_none(), "{h} reached the calling application from {app}");
    }
}

/// GET `url` through the HTTP proxy `proxy`, as an application that forges peer metadata.
async fn get_forging(proxy: SocketAddr, url: &str) -> Reply {
    let uri: http::Uri = url.parse().unwrap();
    let forged = weft_xds::peer::PeerMetadata {
        workload_name: "forged".into(),
        namespace: "forged".into(),
        labels: [("app".to_string(), "forged".to_string())].into(),
        ..Default::default()
    };
    let req = http::Request::get(uri.clone())
        .header(http::header::HOST, uri.authority().unwrap().as_str())
        .header("x-envoy-peer-metadata", forged.encode())
        .header("x-envoy-peer-metadata-id", "forged")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    send_h1(proxy, req).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_weft_sidecars_exchange_istio_peer_metadata_and_no_app_sees_it() {
    use weft_control::envoy_bootstrap::{parse_ports, render, EnvoyBootstrapOptions};
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), format!("{MESH}---{STRICT}")).unwrap();
    let cp = mesh::control_plane(Some(dir.path()), IdentityConfig::new(data.path())).await;

    // productpage (weft) -> reviews (Envoy) -> ratings (weft).
    let reviews_app = EchoServer::start("reviews-app").await;
    let ratings_app = EchoServer::start("ratings-app").await;
    let opts = EnvoyBootstrapOptions {
        name: "reviews-v2".into(),
        namespace: "default".into(),
        labels: [("app".to_string(), "reviews".to_string()), ("version".to_string(), "v2".to_string())].into(),
        service_account: "bookinfo-reviews".into(),
        ports: parse_ports(&format!("http:{}", reviews_app.addr.port())).unwrap(),
        instance_ip: "127.0.0.1".parse().unwrap(),
        xds: cp.xds_addr,
        admin_port: 0,
        cluster_id: "Kubernetes".into(),
        delta: false,
        inbound: Some(reserve_addr()),
        outbound: Some(reserve_addr()),
        join_token: Some(mesh::join_token(&cp, "default", "bookinfo-reviews").await),
    };
    let envoy = weft_testkit::envoy::Envoy::start(&render(&opts)).await.unwrap();
    let ratings = sidecar(&cp, "ratings", "bookinfo-ratings", Some(ratings_app.addr)).await;
    let productpage = sidecar(&cp, "productpage", "bookinfo-productpage", None).await;
    let weft_out = productpage.listener_addr("weft-outbound", WAIT).await.unwrap();
    let envoy_out = envoy.listener_addr("weft-outbound", WAIT).await.unwrap();

    // weft -> Envoy: Envoy's inbound strips productpage's metadata before its app and
    // answers with its own, which productpage's sidecar reads and strips.
    let deadline = Instant::now() + WAIT;
    let reply = loop {
        let r = get_forging(weft_out, "http://reviews:9080/a").await;
        if r.status == 200 {
            break r;
        }
        assert!(Instant::now() < deadline, "weft -> Envoy: {} {}\n{}", r.status, r.text(), envoy.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_clean(&reply, "reviews-app");
    let line = request_line(&productpage, "source").await;
    for label in [
        "destination_app=\"reviews\"",
        "destination_version=\"v2\"",
        "destination_workload=\"reviews-v2\"",
        "destination_workload_namespace=\"default\"",
        "destination_canonical_service=\"reviews\"",
        "destination_canonical_revision=\"v2\"",
        "source_app=\"productpage\"",
    ] {
        assert!(line.contains(label), "productpage's sidecar lacks {label}: {line}");
    }

    // Envoy -> weft: Envoy sends its own metadata (replacing what its app forged), ratings'
    // sidecar reads and strips it, and Envoy strips ratings' answer before its app.
    let deadline = Instant::now() + WAIT;
    let reply = loop {
        let r = get_forging(envoy_out, "http://ratings:9080/r").await;
        if r.status == 200 {
            break r;
        }
        assert!(Instant::now() < deadline, "Envoy -> weft: {} {}\n{}", r.status, r.text(), envoy.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_clean(&reply, "ratings-app");
    let line = request_line(&ratings, "destination").await;
    for label in [
        "source_app=\"reviews\"",
        "source_version=\"v2\"",
        "source_workload=\"reviews-v2\"",
        "source_workload_namespace=\"default\"",
        "source_canonical_service=\"reviews\"",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-reviews\"",
        "connection_security_policy=\"mutual_tls\"",
        "destination_app=\"ratings\"",
    ] {
        assert!(line.contains(label), "ratings' sidecar lacks {label}: {line}");
    }
    assert!(!line.contains("forged"), "an application's forged metadata reached telemetry: {line}");

    ratings.shutdown().await;
    productpage.shutdown().await;
}

/// Between weft sidecars: an application's forged metadata is replaced, neither app sees
/// any, and a caller outside the mesh learns nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_sidecars_replace_forged_metadata_and_strip_it_both_ways() {
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), MESH).unwrap();
    let cp = mesh::control_plane(Some(dir.path()), IdentityConfig::new(data.path())).await;
    let ratings_app = EchoServer::start("ratings-app").await;
    let ratings = sidecar(&cp, "ratings", "bookinfo-ratings", Some(ratings_app.addr)).await;
    let reviews = sidecar(&cp, "reviews", "bookinfo-reviews", None).await;
    let out = reviews.listener_addr("weft-outbound", WAIT).await.unwrap();
    let deadline = Instant::now() + WAIT;
    let reply = loop {
        let r = get_forging(out, "http://ratings:9080/r").await;
        if r.status == 200 {
            break r;
        }
        assert!(Instant::now() < deadline, "reviews -> ratings: {} {}", r.status, r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_clean(&reply, "ratings-app");
    let dst = request_line(&ratings, "destination").await;
    assert!(dst.contains("source_workload=\"reviews\"") && !dst.contains("forged"), "{dst}");
    let src = request_line(&reviews, "source").await;
    assert!(src.contains("destination_workload=\"ratings\"") && src.contains("destination_version=\"v1\""), "{src}");
    // A caller outside the mesh (plaintext, no metadata; PERMISSIVE by default) is told
    // nothing about the workload.
    let inbound = ratings.listener_addr(&format!("inbound|{}", ratings_app.addr.port()), WAIT).await.unwrap();
    let outside = get_h1(inbound, "ratings", "/outside").await.unwrap();
    assert_clean(&outside, "ratings-app");
    ratings.shutdown().await;
    reviews.shutdown().await;
}
