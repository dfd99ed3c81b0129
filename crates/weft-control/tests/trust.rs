//! Trust on the control channel: every xDS stream is bound to the identity its caller
//! proves. A forged registration (no credential), node metadata claiming another
//! service account, and a stolen node id presented with another identity are refused
//! with a gRPC status naming the reason and never registered; a weft proxy reaches the
//! TLS port (15012) with the mesh root from its bootstrap, gets its configuration over
//! mTLS and renews its certificate with it after its join token expired. The JSON API
//! refuses calls without the admin credential.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mesh;

use std::path::Path;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use weft_control::control::ControlPlane;
use weft_control::identity::IdentityConfig;
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::http::get_h1;
use weft_testkit::net::reserve_addr;
use weft_xds::{type_url, NodeInfo};

const WAIT: Duration = Duration::from_secs(30);

/// A control plane with its CA, its TLS port on 127.0.0.1:0 and certificates of `ttl`.
async fn control_plane(data: &Path, ttl: Duration) -> ControlPlane {
    let mut identity = IdentityConfig::new(data);
    identity.cert_ttl = ttl;
    identity.xds_tls = Some("127.0.0.1:0".parse().unwrap());
    mesh::control_plane(None, identity).await
}

/// A node of `namespace`/`sa` labelled `app: <app>`.
fn node(id: &str, namespace: &str, sa: &str, app: &str) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        cluster: format!("{app}.{namespace}"),
        name: id.into(),
        namespace: namespace.into(),
        service_account: sa.into(),
        labels: [("app".to_string(), app.to_string())].into(),
        instance_ips: vec!["127.0.0.9".into()],
        ..NodeInfo::default()
    }
}

/// An open ADS stream: its first response, or the status it ended with.
struct Stream {
    _tx: mpsc::UnboundedSender<DiscoveryRequest>,
    first: Result<DiscoveryResponse, tonic::Status>,
}

/// Opens a SotW stream to `cp`'s plaintext port as `node`, with `token` as bearer.
async fn open(cp: &ControlPlane, node: &NodeInfo, token: Option<&str>) -> Stream {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", cp.xds_addr)).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(DiscoveryRequest { node: Some(node.to_node()), type_url: type_url::LISTENER.into(), ..Default::default() })
        .unwrap();
    let mut request = tonic::Request::new(UnboundedReceiverStream::new(rx));
    if let Some(t) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let first = async {
        let mut responses = client.stream_aggregated_resources(request).await?.into_inner();
        match responses.message().await? {
            Some(r) => Ok(r),
            None => Err(tonic::Status::unknown("stream closed without a response")),
        }
    };
    let first = tokio::time::timeout(WAIT, first).await.expect("the control plane answers");
    Stream { _tx: tx, first }
}

async fn metrics(cp: &ControlPlane) -> String {
    get_h1(cp.api_addr, "weft", "/metrics").await.unwrap().text()
}

fn refused_count(text: &str, reason: &str) -> u64 {
    let prefix = format!("weft_xds_refused_streams_total{{reason=\"{reason}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn forged_registration_without_credential_is_refused_and_not_registered() {
    let data = tempfile::tempdir().unwrap();
    let cp = control_plane(data.path(), Duration::from_secs(3600)).await;
    let forged = node("reviews-v9", "default", "bookinfo-reviews", "reviews");
    let stream = open(&cp, &forged, None).await;
    let status = stream.first.expect_err("a stream without a credential is refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("no credential"), "{}", status.message());
    assert!(cp.registry.snapshot().get("reviews-v9").is_none(), "the forged node must not be registered");
    assert!(cp.server.connections().is_empty(), "no stream is listed");
    assert_eq!(refused_count(&metrics(&cp).await, "no_credential"), 1);
    cp.shutdown().await;
}

#[tokio::test]
async fn node_metadata_claiming_another_service_account_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let cp = control_plane(data.path(), Duration::from_secs(3600)).await;
    let ratings = mesh::join_token(&cp, "default", "bookinfo-ratings").await;
    let claims_reviews = node("reviews-v9", "default", "bookinfo-reviews", "reviews");
    let status = open(&cp, &claims_reviews, Some(&ratings)).await.first.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("\"bookinfo-reviews\"") && status.message().contains("\"bookinfo-ratings\""),
        "the reason names the claim and the proof: {}",
        status.message()
    );
    // Another namespace is refused the same way.
    let other_ns = node("ratings-x", "prod", "bookinfo-ratings", "ratings");
    let status = open(&cp, &other_ns, Some(&ratings)).await.first.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(cp.registry.snapshot().get("reviews-v9").is_none());
    assert!(cp.registry.snapshot().get("ratings-x").is_none());
    assert_eq!(refused_count(&metrics(&cp).await, "identity_mismatch"), 2);
    // The token's own identity is admitted and registered.
    let honest = node("ratings-v1", "default", "bookinfo-ratings", "ratings");
    let _admitted = open(&cp, &honest, Some(&ratings)).await;
    _admitted.first.as_ref().expect("the honest node gets its listeners");
    mesh_wait(&cp, "ratings-v1").await;
    cp.shutdown().await;
}

#[tokio::test]
async fn stolen_node_id_with_another_identity_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let cp = control_plane(data.path(), Duration::from_secs(3600)).await;
    let reviews = mesh::join_token(&cp, "default", "bookinfo-reviews").await;
    let ratings = mesh::join_token(&cp, "default", "bookinfo-ratings").await;
    let owner = open(&cp, &node("reviews-v1", "default", "bookinfo-reviews", "reviews"), Some(&reviews)).await;
    owner.first.as_ref().expect("the owner is admitted");
    mesh_wait(&cp, "reviews-v1").await;
    // Same node id, metadata consistent with the thief's own (valid) credential.
    let thief = open(&cp, &node("reviews-v1", "default", "bookinfo-ratings", "evil"), Some(&ratings)).await;
    let status = thief.first.expect_err("a node id registered to another identity is refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("registered to"), "{}", status.message());
    let w = cp.registry.snapshot().get("reviews-v1").cloned().expect("the owner stays registered");
    assert_eq!(w.service_account, "bookinfo-reviews");
    assert_eq!(w.labels.get("app").map(String::as_str), Some("reviews"));
    assert_eq!(cp.server.connections().len(), 1, "only the owner's stream is open");
    assert_eq!(refused_count(&metrics(&cp).await, "node_id_taken"), 1);
    cp.shutdown().await;
}

#[tokio::test]
async fn proxy_on_the_tls_port_gets_config_and_renews_over_mtls_after_its_token_expired() {
    let data = tempfile::tempdir().unwrap();
    let cp = control_plane(data.path(), Duration::from_secs(2)).await;
    let tls = cp.xds_tls_addr.expect("the TLS port is bound");
    let authority = cp.identity.clone().unwrap();
    // A join token that lives 3 s: later renewals can only be proven by the certificate.
    let token = authority.tokens().create("default", "bookinfo-reviews", Duration::from_secs(3)).unwrap().token;
    let root = authority.ca().trust_bundle_pem();
    let root_file = data.path().join("mesh-root.pem");
    std::fs::write(&root_file, &root).unwrap();
    let text = format!(
        "node:\n  id: reviews-tls\n  cluster: reviews.default\n  name: reviews-tls\n  namespace: default\n  service_account: bookinfo-reviews\n  labels:\n    app: reviews\n  outbound: {}\nxds:\n  address: https://{tls}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\ndrain_timeout: 1s\nidentity:\n  token: \"{token}\"\n  root_cert_file: {}\n  cert_ttl: 2s\n",
        reserve_addr(),
        root_file.display()
    );
    let b = Bootstrap::parse(&text, Path::new("sidecar.yaml")).unwrap();
    let p = ProxyHandle::start(b).await.unwrap();
    assert!(p.wait_ready(WAIT).await, "the proxy on the TLS port never became ready");
    let conn = cp.server.connections().into_iter().find(|c| c.node_id == "reviews-tls").expect("registered");
    assert!(conn.peer.is_some(), "the TLS listener reports the peer address");
    // Past the token's expiry, certificates keep being issued to this proxy.
    let deadline = Instant::now() + WAIT;
    while authority.tokens().verify(&token).is_ok() {
        assert!(Instant::now() < deadline, "the token never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let issued = authority.stats().issued();
    while authority.stats().issued() < issued + 2 {
        assert!(Instant::now() < deadline, "no renewal over mTLS after the token expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        cp.server.connections().iter().any(|c| c.node_id == "reviews-tls"),
        "the proxy's xDS stream over mTLS stays open"
    );
    // The expired token alone no longer opens a stream on the plaintext port.
    let status = open(&cp, &node("reviews-tls2", "default", "bookinfo-reviews", "reviews"), Some(&token))
        .await
        .first
        .expect_err("expired token refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    p.shutdown().await;
    cp.shutdown().await;
}

/// Waits until `id` is registered.
async fn mesh_wait(cp: &ControlPlane, id: &str) {
    let deadline = Instant::now() + WAIT;
    let mut changes = cp.registry.changes();
    while cp.registry.snapshot().get(id).is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{id} never registered");
        let _ = tokio::time::timeout(left, changes.changed()).await;
    }
}

#[tokio::test]
async fn api_calls_without_the_admin_credential_are_refused() {
    use bytes::Bytes;
    use http::Method;
    use weft_testkit::http::{request, send_h1};
    let data = tempfile::tempdir().unwrap();
    let cp = control_plane(data.path(), Duration::from_secs(3600)).await;
    let (token, file) = cp.admin_token.clone().expect("an admin token with a data directory");
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), token, "kept in the data directory");
    let body = || Bytes::from(r#"{"namespace":"default","serviceAccount":"x"}"#);
    let apply = || {
        Bytes::from("apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: default}\nspec:\n  ports: [{name: http, port: 80}]\n")
    };
    for (method, path, body, what) in [
        (Method::POST, "/api/v1/tokens", body(), "minting a join token"),
        (Method::POST, "/api/v1/apply", apply(), "applying configuration"),
        (Method::POST, "/api/v1/ca/rotate?step=begin", Bytes::new(), "rotating the CA"),
        (Method::GET, "/api/v1/tap", Bytes::new(), "tapping traffic"),
        (Method::GET, "/api/v1/proxies", Bytes::new(), "reading (not opened)"),
    ] {
        let anonymous =
            send_h1(cp.api_addr, request(method.clone(), "weft", path, body.clone()).unwrap()).await.unwrap();
        assert_eq!(anonymous.status, 401, "{what}: {}", anonymous.text());
        let mut wrong = request(method, "weft", path, body).unwrap();
        wrong.headers_mut().insert("authorization", "Bearer weft-admin.guess".parse().unwrap());
        assert_eq!(send_h1(cp.api_addr, wrong).await.unwrap().status, 401, "{what} with a wrong token");
    }
    assert!(cp.store.snapshot().resources.is_empty(), "nothing was applied");
    // With the token: a join token is minted; metrics stay open for Prometheus.
    let mut req = request(Method::POST, "weft", "/api/v1/tokens", body()).unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let ok = send_h1(cp.api_addr, req).await.unwrap();
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(get_h1(cp.api_addr, "weft", "/metrics").await.unwrap().status, 200);
    cp.shutdown().await;
}

#[tokio::test]
async fn stock_envoy_reaches_the_tls_port_with_the_mesh_root_and_its_join_token() {
    use weft_control::envoy_bootstrap::{render, with_xds_tls, EnvoyBootstrapOptions};
    let data = tempfile::tempdir().unwrap();
    let cp = control_plane(data.path(), Duration::from_secs(3600)).await;
    let tls = cp.xds_tls_addr.expect("the TLS port is bound");
    let root_file = data.path().join("mesh-root.pem");
    std::fs::write(&root_file, cp.identity.as_ref().unwrap().ca().trust_bundle_pem()).unwrap();
    let opts = EnvoyBootstrapOptions {
        name: "reviews-envoy".into(),
        namespace: "default".into(),
        labels: [("app".to_string(), "reviews".to_string())].into(),
        service_account: "bookinfo-reviews".into(),
        ports: Vec::new(),
        instance_ip: "127.0.0.1".parse().unwrap(),
        xds: tls,
        admin_port: 0,
        cluster_id: "Kubernetes".into(),
        delta: false,
        inbound: Some(reserve_addr()),
        outbound: Some(reserve_addr()),
        join_token: Some(mesh::join_token(&cp, "default", "bookinfo-reviews").await),
    };
    let yaml = with_xds_tls(&render(&opts), &root_file, "cluster.local").unwrap();
    let envoy = weft_testkit::envoy::Envoy::start(&yaml).await.unwrap();
    // Envoy takes its configuration over the TLS port.
    let node_id = opts.node_id();
    let mut changes = cp.server.status_changes();
    let acked = tokio::time::timeout(WAIT, async {
        loop {
            let secret = cp
                .server
                .connections()
                .into_iter()
                .find(|c| c.node_id == node_id)
                .and_then(|c| c.types.get(type_url::LISTENER).cloned());
            if secret.as_ref().is_some_and(|s| s.acked_version.is_some()) {
                return;
            }
            let _ = changes.changed().await;
        }
    })
    .await;
    assert!(acked.is_ok(), "Envoy never ACKed its listeners over TLS\n--- envoy.log ---\n{}", envoy.log_tail());
    envoy.listener_addr("weft-outbound", WAIT).await.expect("Envoy serves what it got over TLS");
    // The same bootstrap without the token is refused (no credential).
    let anonymous = EnvoyBootstrapOptions { name: "anon".into(), join_token: None, ..opts.clone() };
    let refused =
        weft_testkit::envoy::Envoy::start(&with_xds_tls(&render(&anonymous), &root_file, "cluster.local").unwrap())
            .await
            .unwrap();
    let deadline = Instant::now() + WAIT;
    while refused_count(&metrics(&cp).await, "no_credential") == 0 {
        assert!(Instant::now() < deadline, "the anonymous Envoy was never refused\n{}", refused.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!cp.server.connections().iter().any(|c| c.node_id == anonymous.node_id()), "never registered");
    cp.shutdown().await;
}
