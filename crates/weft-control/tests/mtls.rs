//! Mesh mTLS between weft sidecars, end to end: a control plane with its CA, two weft
//! proxies that get their certificates with join tokens, auto mTLS from the client's
//! sidecar to the server's, and the server's inbound listener following
//! PeerAuthentication. Evidence comes from the wire (our own TLS handshakes against the
//! server's inbound port) and from what the server proxy derived from the verified
//! client certificate (its Istio metrics), never from a configuration flag.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mesh;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_control::control::ControlPlane;
use weft_control::identity::IdentityConfig;
use weft_identity::manager::CertManagerConfig;
use weft_identity::tls::{client_config, PeerIdentities};
use weft_identity::{CertManager, CredentialSource, SpiffeId};
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::{EchoServer, SERVER_HEADER};
use weft_testkit::http::{get_h1, get_via_proxy, request, send_h1};
use weft_testkit::net::reserve_addr;

const WAIT: Duration = Duration::from_secs(30);

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: default}\nspec:\n  selector: {app: reviews}\n  ports: [{name: http, port: 9080}]\n";

/// A weft sidecar with a mesh identity; `app` is the local application's port.
async fn sidecar(
    cp: &ControlPlane,
    name: &str,
    sa: &str,
    app: Option<u16>,
    inbound: Option<SocketAddr>,
) -> ProxyHandle {
    sidecar_with_ttl(cp, name, sa, app, inbound, None).await
}

/// Like [`sidecar`], asking for certificates that live `ttl` (`3s`).
async fn sidecar_with_ttl(
    cp: &ControlPlane,
    name: &str,
    sa: &str,
    app: Option<u16>,
    inbound: Option<SocketAddr>,
    ttl: Option<&str>,
) -> ProxyHandle {
    let token = mesh::join_token(cp, "default", sa).await;
    let ports = app.map(|p| format!("  ports:\n  - {{name: http, port: {p}, protocol: TCP}}\n")).unwrap_or_default();
    let inbound = inbound.map(|a| format!("  inbound: {a}\n")).unwrap_or_default();
    let text = format!(
        "node:\n  id: {name}\n  cluster: {name}.default\n  name: {name}\n  namespace: default\n  service_account: {sa}\n  labels:\n    app: {name}\n  outbound: {}\n{ports}{inbound}xds:\n  address: http://{}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\ndrain_timeout: 1s\nidentity:\n  token: \"{token}\"\n{}",
        reserve_addr(),
        cp.xds_addr,
        ttl.map(|t| format!("  cert_ttl: {t}\n")).unwrap_or_default()
    );
    let b = Bootstrap::parse(&text, Path::new("sidecar.yaml")).unwrap();
    let p = ProxyHandle::start(b).await.unwrap();
    assert!(p.wait_ready(WAIT).await, "{name} never became ready");
    p
}

/// Our own mesh client identity (a CSR with a join token, as a proxy makes).
async fn client_identity(cp: &ControlPlane, sa: &str) -> CertManager {
    let id = SpiffeId::new("cluster.local", "default", sa).unwrap();
    let cfg = CertManagerConfig::new(
        format!("http://{}", cp.xds_addr),
        CredentialSource::JoinToken(mesh::join_token(cp, "default", sa).await),
        id,
    );
    CertManager::start(cfg).await.unwrap()
}

/// A TLS handshake with `addr` presenting `mgr`'s certificate and expecting `server`;
/// then one HTTP/1.1 request over it. Returns the server's SPIFFE id and the status line.
async fn mtls_request(mgr: &CertManager, addr: SocketAddr, server: &str) -> Result<(String, String), String> {
    let expected = PeerIdentities::OneOf(vec![server.parse().unwrap()]);
    let mut cfg = client_config(mgr.identity(), expected).map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("reviews.default.svc.cluster.local").unwrap();
    let mut tls =
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.map_err(|e| e.to_string())?;
    let peer = weft_identity::tls::peer_identity(tls.get_ref().1.peer_certificates()).map(|p| p.to_string());
    tls.write_all(b"GET /hello HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    Ok((peer.unwrap_or_default(), text.lines().next().unwrap_or_default().to_string()))
}

async fn plaintext_request(addr: SocketAddr) -> Result<u16, String> {
    get_h1(addr, "reviews", "/hello").await.map(|r| r.status.as_u16()).map_err(|e| e.to_string())
}

async fn metrics(p: &ProxyHandle) -> String {
    get_h1(p.metrics_addr(), "m", "/stats/prometheus").await.unwrap().text()
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_talk_mtls_and_the_server_enforces_peer_authentication() {
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("svc.yaml"), SERVICE).unwrap();
    let mut identity = IdentityConfig::new(data.path());
    identity.cert_ttl = Duration::from_secs(3600);
    let cp = mesh::control_plane(Some(dir.path()), identity).await;

    let app = EchoServer::start("reviews-app").await;
    let inbound = reserve_addr();
    let server = sidecar(&cp, "reviews", "bookinfo-reviews", Some(app.addr.port()), Some(inbound)).await;
    let client = sidecar(&cp, "productpage", "bookinfo-productpage", None, None).await;
    let out = client.listener_addr("weft-outbound", WAIT).await.unwrap();

    // Client sidecar -> server sidecar -> app.
    eventually("traffic through both sidecars", || async {
        get_via_proxy(out, "http://reviews:9080/x").await.map(|r| r.status == 200).unwrap_or(false)
    })
    .await;
    let r = get_via_proxy(out, "http://reviews:9080/x").await.unwrap();
    assert_eq!(r.header(SERVER_HEADER), Some("reviews-app"));
    // The server proxy saw the client's identity from its verified certificate.
    let m = metrics(&server).await;
    let line = m
        .lines()
        .find(|l| l.starts_with("istio_requests_total{") && l.contains("reporter=\"destination\""))
        .unwrap_or_else(|| panic!("{m}"));
    assert!(line.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-productpage\""), "{line}");
    assert!(line.contains("connection_security_policy=\"mutual_tls\""), "{line}");

    // On the wire: the server's inbound port completes a TLS handshake presenting the
    // reviews identity to a mesh client, and serves the request.
    let inbound_addr = server.listener_addr(&format!("inbound|{}", app.addr.port()), WAIT).await.unwrap();
    assert_eq!(inbound_addr, inbound);
    let me = client_identity(&cp, "tester").await;
    let (peer, status) =
        mtls_request(&me, inbound_addr, "spiffe://cluster.local/ns/default/sa/bookinfo-reviews").await.unwrap();
    assert_eq!(peer, "spiffe://cluster.local/ns/default/sa/bookinfo-reviews");
    assert!(status.contains("200"), "{status}");
    // Expecting another identity fails the handshake on the client side.
    let wrong = mtls_request(&me, inbound_addr, "spiffe://cluster.local/ns/default/sa/ratings").await;
    assert!(wrong.is_err(), "a server with the wrong SPIFFE id was accepted");

    // PERMISSIVE (default): plaintext is accepted on the same port.
    assert_eq!(plaintext_request(inbound_addr).await, Ok(200));

    // STRICT: plaintext refused, mTLS still works, the client sidecar still gets through.
    let strict = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: default}\nspec:\n  mtls: {mode: STRICT}\n";
    std::fs::write(dir.path().join("pa.yaml"), strict).unwrap();
    eventually("STRICT to refuse plaintext", || async { plaintext_request(inbound_addr).await != Ok(200) }).await;
    let (_, status) =
        mtls_request(&me, inbound_addr, "spiffe://cluster.local/ns/default/sa/bookinfo-reviews").await.unwrap();
    assert!(status.contains("200"), "{status}");
    assert_eq!(get_via_proxy(out, "http://reviews:9080/y").await.unwrap().status, 200);

    // Port-level override: the workload's app port back to PERMISSIVE.
    let port_level = format!(
        "{strict}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: reviews}}}}\n  mtls: {{mode: STRICT}}\n  portLevelMtls:\n    {}: {{mode: PERMISSIVE}}\n",
        app.addr.port()
    );
    std::fs::write(dir.path().join("pa.yaml"), port_level).unwrap();
    eventually("port-level PERMISSIVE", || async { plaintext_request(inbound_addr).await == Ok(200) }).await;

    // The client refuses a server whose certificate is not the identity the registry
    // expects there: a WorkloadEntry claims the reviews sidecar's address runs as
    // `impostor-sa`, the sidecar presents bookinfo-reviews.
    let impostor = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: impostor, namespace: default}}\nspec:\n  selector: {{app: impostor}}\n  ports: [{{name: http, port: 9080}}]\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: impostor, namespace: default}}\nspec:\n  address: 127.0.0.1\n  ports: {{http: {}}}\n  serviceAccount: impostor-sa\n  labels: {{app: impostor, security.istio.io/tlsMode: istio}}\n",
        inbound_addr.port()
    );
    std::fs::write(dir.path().join("impostor.yaml"), impostor).unwrap();
    eventually("the client to refuse the impostor", || async {
        let refused = get_via_proxy(out, "http://impostor:9080/z").await.map(|r| r.status == 503).unwrap_or(false);
        refused
            && metrics(&client).await.lines().any(|l| {
                l.starts_with("weft_upstream_tls_handshake_failures")
                    && l.contains("wrong_identity")
                    && l.contains("impostor")
            })
    })
    .await;
    assert_eq!(get_via_proxy(out, "http://reviews:9080/y").await.unwrap().status, 200, "the real service still works");

    // A certificate from another CA (another control plane's) is refused, with a log
    // line and a metric naming the reason.
    let other_data = tempfile::tempdir().unwrap();
    let other = mesh::control_plane(None, IdentityConfig::new(other_data.path())).await;
    let stranger = client_identity(&other, "bookinfo-productpage").await;
    // It trusts our CA, so the handshake gets as far as the server judging its certificate.
    stranger.set_trust_bundle(cp.identity.as_ref().unwrap().ca().trust_bundle());
    let refused = mtls_request(&stranger, inbound_addr, "spiffe://cluster.local/ns/default/sa/bookinfo-reviews").await;
    assert!(refused.is_err() || !refused.as_ref().unwrap().1.contains("200"), "{refused:?}");
    eventually("the refusal metric", || async {
        metrics(&server).await.lines().any(|l| l.starts_with("weft_tls_handshake_failures") && l.contains("unknown_ca"))
    })
    .await;
    // An expired certificate from our own CA is refused too (reason `expired`).
    let ca = cp.identity.as_ref().unwrap().ca().clone();
    let id = SpiffeId::new("cluster.local", "default", "bookinfo-productpage").unwrap();
    let (key_pem, issued) = ca.issue_with_key(&id, Duration::from_secs(1)).unwrap();
    // X.509 times have whole seconds and the check is `now > notAfter` in seconds: 2.5 s
    // after issue the second has certainly passed (1.5 s fails half the time).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let chain: Vec<rustls::pki_types::CertificateDer<'static>> = std::iter::once(issued.leaf_pem.as_str())
        .chain(issued.chain_pems.iter().map(String::as_str).take(issued.chain_pems.len().saturating_sub(1)))
        .map(|pem| rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let expired = weft_identity::Identity::from_parts(chain, key, ca.trust_bundle()).unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(expired));
    let expected =
        PeerIdentities::OneOf(vec!["spiffe://cluster.local/ns/default/sa/bookinfo-reviews".parse().unwrap()]);
    let mut cfg = client_config(rx, expected).unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(inbound_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("reviews").unwrap();
    let mut buf = [0u8; 1];
    if let Ok(mut tls) = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await {
        // TLS 1.3: the server judges the client certificate after our side finished.
        let _ = tls.write_all(b"GET / HTTP/1.1\r\nhost: r\r\n\r\n").await;
        assert!(!matches!(tls.read(&mut buf).await, Ok(n) if n > 0), "an expired certificate was served");
    }
    eventually("the expired-certificate metric", || async {
        metrics(&server).await.lines().any(|l| l.starts_with("weft_tls_handshake_failures") && l.contains("expired"))
    })
    .await;
    server.shutdown().await;
    client.shutdown().await;
}

/// Certificates that live 3 s rotate several times under continuous load through both
/// sidecars without a single failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_load_fails_no_request() {
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("svc.yaml"), SERVICE).unwrap();
    let cp = mesh::control_plane(Some(dir.path()), IdentityConfig::new(data.path())).await;
    let app = EchoServer::start("reviews-app").await;
    let server =
        sidecar_with_ttl(&cp, "reviews", "bookinfo-reviews", Some(app.addr.port()), Some(reserve_addr()), Some("3s"))
            .await;
    let client = sidecar_with_ttl(&cp, "productpage", "bookinfo-productpage", None, None, Some("3s")).await;
    let out = client.listener_addr("weft-outbound", WAIT).await.unwrap();
    eventually("traffic through both sidecars", || async {
        get_via_proxy(out, "http://reviews:9080/x").await.map(|r| r.status == 200).unwrap_or(false)
    })
    .await;
    let expiry = |m: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with("weft_cert_expiry_timestamp_seconds"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let first = expiry(&metrics(&server).await);
    assert!(first > 0.0, "the certificate expiry is not reported");
    // 8 s of requests: at least two renewals of each 3 s certificate on both sides, on
    // new connections (the client's pool reconnects) and on kept-alive ones.
    let start = Instant::now();
    let (mut ok, mut failed) = (0, Vec::new());
    while start.elapsed() < Duration::from_secs(8) {
        match get_via_proxy(out, "http://reviews:9080/load").await {
            Ok(r) if r.status == 200 => ok += 1,
            Ok(r) => failed.push(format!("{} {}", r.status, r.text())),
            Err(e) => failed.push(e.to_string()),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    let last = expiry(&metrics(&server).await);
    assert!(last >= first + 4.0, "the certificate did not rotate: expiry {first} then {last}");
    // Rotation changes no filter chain (the SDS secret names stay): no connection drained.
    let m = metrics(&server).await;
    assert!(!m.lines().any(|l| l.starts_with("weft_downstream_cx_drained_total")), "rotation drained connections: {m}");
    server.shutdown().await;
    client.shutdown().await;
}

const INTEROP: &str = r#"
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
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-from-productpage, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/bookinfo-productpage]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-no-admin, namespace: default}
spec:
  selector: {matchLabels: {app: ratings}}
  action: DENY
  rules:
  - to: [{operation: {paths: [/admin*]}}]
"#;

/// Envoy 1.40 bootstrapped by `weft envoy-bootstrap --join-token` and weft sidecars talk
/// mTLS in both directions under STRICT, with authorization enforced on each side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_weft_sidecars_talk_mtls_both_ways_with_authorization() {
    use weft_control::envoy_bootstrap::{parse_ports, render, EnvoyBootstrapOptions};
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), INTEROP).unwrap();
    let cp = mesh::control_plane(Some(dir.path()), IdentityConfig::new(data.path())).await;

    // reviews: an Envoy sidecar in front of its app; ratings: a weft sidecar.
    let reviews_app = EchoServer::start("reviews-app").await;
    let ratings_app = EchoServer::start("ratings-app").await;
    let envoy_inbound = reserve_addr();
    let envoy_outbound = reserve_addr();
    let opts = EnvoyBootstrapOptions {
        name: "reviews".into(),
        namespace: "default".into(),
        labels: [("app".to_string(), "reviews".to_string())].into(),
        service_account: "bookinfo-reviews".into(),
        ports: parse_ports(&format!("http:{}", reviews_app.addr.port())).unwrap(),
        instance_ip: "127.0.0.1".parse().unwrap(),
        xds: cp.xds_addr,
        admin_port: 0,
        cluster_id: "Kubernetes".into(),
        delta: false,
        inbound: Some(envoy_inbound),
        outbound: Some(envoy_outbound),
        join_token: Some(mesh::join_token(&cp, "default", "bookinfo-reviews").await),
    };
    let envoy = weft_testkit::envoy::Envoy::start(&render(&opts)).await.unwrap();
    let ratings =
        sidecar(&cp, "ratings", "bookinfo-ratings", Some(ratings_app.addr.port()), Some(reserve_addr())).await;
    let productpage = sidecar(&cp, "productpage", "bookinfo-productpage", None, None).await;
    let weft_out = productpage.listener_addr("weft-outbound", WAIT).await.unwrap();
    let envoy_out = envoy.listener_addr("weft-outbound", WAIT).await.unwrap();
    let envoy_in = envoy.listener_addr(&format!("inbound|{}", reviews_app.addr.port()), WAIT).await.unwrap();

    // weft (productpage) -> Envoy (reviews): mTLS, and reviews' ALLOW admits productpage.
    eventually("weft -> Envoy over mTLS", || async {
        get_via_proxy(weft_out, "http://reviews:9080/a").await.map(|r| r.status == 200).unwrap_or(false)
    })
    .await;
    assert_eq!(
        get_via_proxy(weft_out, "http://reviews:9080/a").await.unwrap().header(SERVER_HEADER),
        Some("reviews-app")
    );
    // STRICT on Envoy's side: plaintext straight to its inbound listener is refused.
    assert_ne!(plaintext_request(envoy_in).await, Ok(200));
    // Envoy verified a client certificate on those connections.
    let stats = envoy.admin_get("/stats").await.unwrap();
    let handshakes: u64 = stats
        .lines()
        .filter(|l| l.starts_with("listener.") && l.contains(".ssl.handshake:"))
        .filter_map(|l| l.rsplit(" ").next()?.parse::<u64>().ok())
        .sum();
    assert!(handshakes > 0, "Envoy saw no TLS handshake on its inbound listener:\n{stats}");
    // Another mesh identity is refused by reviews' ALLOW policy (403 from Envoy's RBAC).
    let other = sidecar(&cp, "details", "bookinfo-details", None, None).await;
    let other_out = other.listener_addr("weft-outbound", WAIT).await.unwrap();
    eventually("Envoy's RBAC to deny details", || async {
        get_via_proxy(other_out, "http://reviews:9080/a").await.map(|r| r.status == 403).unwrap_or(false)
    })
    .await;

    // Envoy (reviews) -> weft (ratings): mTLS; ratings' DENY on /admin applies.
    let deadline = Instant::now() + WAIT;
    loop {
        let r = get_via_proxy(envoy_out, "http://ratings:9080/r").await;
        if r.as_ref().is_ok_and(|r| r.status == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Envoy -> weft failed: {:?}\nweft: {}\n{}",
            r.map(|r| (r.status, r.text())),
            metrics(&ratings)
                .await
                .lines()
                .filter(|l| l.contains("tls") || l.contains("destination"))
                .collect::<Vec<_>>()
                .join("\n"),
            envoy.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = metrics(&ratings).await;
    let line = m
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("response_code=\"200\"")
        })
        .unwrap_or_else(|| panic!("{m}"));
    assert!(line.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-reviews\""), "{line}");
    assert!(line.contains("connection_security_policy=\"mutual_tls\""), "{line}");
    let r = get_via_proxy(envoy_out, "http://ratings:9080/admin/x").await.unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.text(), "RBAC: access denied");

    other.shutdown().await;
    ratings.shutdown().await;
    productpage.shutdown().await;
}

async fn rotate(cp: &ControlPlane, step: &str) -> serde_json::Value {
    let req = mesh::admin(
        cp,
        request(Method::POST, "weft", &format!("/api/v1/ca/rotate?step={step}"), Bytes::new()).unwrap(),
    );
    let reply = send_h1(cp.api_addr, req).await.unwrap();
    assert_eq!(reply.status, 200, "{step}: {}", reply.text());
    reply.json().unwrap()
}

/// A root rotation (begin: both roots trusted; complete: the new root signs; retire: the
/// old root goes) under continuous load through both sidecars fails no request and
/// needs no restart; afterwards the server presents a certificate from the new root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_under_load_fails_no_request() {
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("svc.yaml"), SERVICE).unwrap();
    let cp = mesh::control_plane(Some(dir.path()), IdentityConfig::new(data.path())).await;
    let app = EchoServer::start("reviews-app").await;
    let inbound = reserve_addr();
    let server =
        sidecar_with_ttl(&cp, "reviews", "bookinfo-reviews", Some(app.addr.port()), Some(inbound), Some("2s")).await;
    let client = sidecar_with_ttl(&cp, "productpage", "bookinfo-productpage", None, None, Some("2s")).await;
    let out = client.listener_addr("weft-outbound", WAIT).await.unwrap();
    eventually("traffic through both sidecars", || async {
        get_via_proxy(out, "http://reviews:9080/x").await.map(|r| r.status == 200).unwrap_or(false)
    })
    .await;
    let old_root = cp.identity.as_ref().unwrap().ca().trust_bundle();

    let load = tokio::spawn(async move {
        let (mut ok, mut failed) = (0u32, Vec::new());
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(9) {
            match get_via_proxy(out, "http://reviews:9080/load").await {
                Ok(r) if r.status == 200 => ok += 1,
                Ok(r) => failed.push(format!("{} {}", r.status, r.text())),
                Err(e) => failed.push(e.to_string()),
            }
        }
        (ok, failed)
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rotate(&cp, "begin").await["roots"], 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rotate(&cp, "complete").await;
    // Every 2 s leaf renews within about a second: wait for two renewals, then retire.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rotate(&cp, "retire").await["roots"], 1);
    let (ok, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 50, "too little load to mean anything: {ok}");

    // The server now presents a leaf from the new root, and only the new root is trusted.
    let new_root = cp.identity.as_ref().unwrap().ca().trust_bundle();
    assert_ne!(new_root, old_root);
    let me = client_identity(&cp, "tester").await;
    let (peer, status) =
        mtls_request(&me, inbound, "spiffe://cluster.local/ns/default/sa/bookinfo-reviews").await.unwrap();
    assert_eq!(peer, "spiffe://cluster.local/ns/default/sa/bookinfo-reviews");
    assert!(status.contains("200"), "{status}");
    server.shutdown().await;
    client.shutdown().await;
}
