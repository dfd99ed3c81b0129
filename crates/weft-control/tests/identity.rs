//! The control plane's identity side end to end: CA in a data directory, join tokens
//! through the JSON API, the certificate service on the xDS port, a CertManager rotating
//! a short-lived certificate against it, and a real Envoy taking its certificate and
//! trust bundle over SDS and serving mTLS with them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::Method;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use weft_control::control::{ControlConfig, ControlPlane};
use weft_control::identity::IdentityConfig;
use weft_control::translate::{MeshConfig, ProxyMode};
use weft_identity::ca::verify_chain;
use weft_identity::manager::CertManagerConfig;
use weft_identity::tls::{client_config, PeerIdentities};
use weft_identity::{CertManager, CredentialSource, IdentityError, SpiffeId};
use weft_testkit::envoy::Envoy;
use weft_testkit::http::{request, send_h1};
use weft_xds::type_url::SECRET;

async fn control_plane(data: &std::path::Path) -> anyhow::Result<ControlPlane> {
    let mut identity = IdentityConfig::new(data);
    identity.cert_ttl = Duration::from_secs(3600);
    ControlPlane::start(ControlConfig {
        dir: None,
        xds: "127.0.0.1:0".parse()?,
        api: "127.0.0.1:0".parse()?,
        mode: ProxyMode::Explicit,
        mesh: MeshConfig::default(),
        identity: Some(identity),
        inject: Default::default(),
        webhook: None,
        registry: None,
        slo: Default::default(),
        stats: Default::default(),
    })
    .await
    .map_err(anyhow::Error::msg)
}

/// Adds the control plane's admin credential.
fn admin(cp: &ControlPlane, headers: &mut http::HeaderMap) {
    if let Some((token, _)) = &cp.admin_token {
        headers.insert(http::header::AUTHORIZATION, format!("Bearer {token}").parse().expect("a header"));
    }
}

async fn api_post(cp: &ControlPlane, path: &str, body: serde_json::Value) -> anyhow::Result<(u16, serde_json::Value)> {
    let mut req = request(Method::POST, "weft", path, Bytes::from(body.to_string()))?;
    admin(cp, req.headers_mut());
    let reply = send_h1(cp.api_addr, req).await?;
    Ok((reply.status.as_u16(), reply.json()?))
}

async fn new_token(cp: &ControlPlane, ns: &str, sa: &str) -> anyhow::Result<(String, String)> {
    let (status, v) =
        api_post(cp, "/api/v1/tokens", serde_json::json!({"namespace": ns, "serviceAccount": sa, "ttlSeconds": 3600}))
            .await?;
    anyhow::ensure!(status == 200, "token create answered {status}: {v}");
    Ok((v["id"].as_str().context("id")?.to_string(), v["token"].as_str().context("token")?.to_string()))
}

fn web() -> SpiffeId {
    SpiffeId::new("cluster.local", "default", "web").expect("id")
}

/// The filters of the Envoy listener that terminates mTLS with SDS secrets.
const MTLS_FILTERS: &str = r#"      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: mtls
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                direct_response: { status: 200, body: { inline_string: "hello over mtls" } }
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }"#;

#[tokio::test]
async fn a_proxy_rotates_its_certificate_from_the_control_plane_on_the_xds_port() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let cp = control_plane(data.path()).await?;
    let (id, token) = new_token(&cp, "default", "web").await?;
    let mut cfg =
        CertManagerConfig::new(format!("http://{}", cp.xds_addr), CredentialSource::JoinToken(token.clone()), web());
    cfg.ttl = Some(Duration::from_secs(2));
    let mgr = CertManager::start(cfg.clone()).await?;
    let mut rx = mgr.identity();
    let bundle = cp.identity.as_ref().context("identity enabled")?.ca().trust_bundle();
    let mut serials = vec![rx.borrow_and_update().serial.clone()];
    while serials.len() < 3 {
        tokio::time::timeout(Duration::from_secs(5), rx.changed()).await??;
        let cur = rx.borrow_and_update().clone();
        verify_chain(&cur.certified_key.cert, &bundle)?;
        serials.push(cur.serial.clone());
    }
    serials.dedup();
    assert_eq!(serials.len(), 3, "two renewals, each a new certificate");

    // Revoked through the API: a new proxy with the same token is refused.
    let (status, v) = api_post(&cp, &format!("/api/v1/tokens/{id}/revoke"), serde_json::json!({})).await?;
    assert_eq!(status, 200, "{v}");
    let err = CertManager::start(cfg).await.err().context("revoked token must be refused")?;
    assert!(matches!(err, IdentityError::Service { code: tonic::Code::Unauthenticated, .. }), "{err}");
    assert!(err.to_string().contains("revoked"), "{err}");
    cp.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn token_api_validates_its_input() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let cp = control_plane(data.path()).await?;
    let (status, v) = api_post(&cp, "/api/v1/tokens", serde_json::json!({"namespace": "default"})).await?;
    assert_eq!(status, 400, "{v}");
    let (status, v) =
        api_post(&cp, "/api/v1/tokens", serde_json::json!({"namespace": "Bad NS", "serviceAccount": "x"})).await?;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap_or_default().contains("namespace"), "{v}");
    cp.shutdown().await;
    Ok(())
}

/// `ttlSeconds` over `--max-token-ttl` (90 days by default) is refused with 400 naming
/// both, however absurd (no overflow, the API keeps answering); the maximum is granted.
#[tokio::test]
async fn token_api_refuses_ttls_over_the_maximum() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let cp = control_plane(data.path()).await?;
    let max = weft_identity::token::DEFAULT_MAX_TOKEN_TTL.as_secs();
    let body = |ttl: serde_json::Value| serde_json::json!({"namespace": "default", "serviceAccount": "web", "ttlSeconds": ttl});
    for ttl in [serde_json::json!(max + 1), serde_json::json!(99_999_999_999_999_u64), serde_json::json!(u64::MAX)] {
        let (status, v) = api_post(&cp, "/api/v1/tokens", body(ttl.clone())).await?;
        assert_eq!(status, 400, "{ttl}: {v}");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(error.contains(&format!("token TTL {ttl}s is greater than the max allowed TTL {max}s")), "{v}");
        assert_eq!(v["maxTtlSeconds"], max, "{v}");
    }
    for bad in [serde_json::json!(1e300), serde_json::json!(-1), serde_json::json!("90d")] {
        let (status, v) = api_post(&cp, "/api/v1/tokens", body(bad.clone())).await?;
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(v["error"].as_str().unwrap_or_default().contains("ttlSeconds must be a positive integer"), "{v}");
    }
    let (status, v) = api_post(&cp, "/api/v1/tokens", body(serde_json::json!(max))).await?;
    assert_eq!(status, 200, "{v}");
    cp.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_default_certificate_ttl_over_the_maximum_stops_the_start() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let mut identity = IdentityConfig::new(data.path());
    identity.cert_ttl = Duration::from_secs(100 * 86_400);
    let err = identity.start().err().context("--cert-ttl over --max-cert-ttl must not start")?;
    assert!(err.contains("--cert-ttl") && err.contains("--max-cert-ttl"), "{err}");
    Ok(())
}

#[tokio::test]
async fn envoy_takes_its_certificate_and_trust_bundle_over_sds_and_serves_mtls() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let cp = control_plane(data.path()).await?;
    let (_, gw_token) = new_token(&cp, "default", "gateway").await?;
    let envoy = Envoy::start(&weft_testkit::envoy::sds_mtls_bootstrap(cp.xds_addr, &gw_token, MTLS_FILTERS)).await?;
    // Envoy ACKs the secrets (a NACK or a missing secret keeps the listener warming).
    let mut changes = cp.server.status_changes();
    let acked = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let status = cp
                .server
                .connections()
                .into_iter()
                .filter(|c| c.node_id == "envoy-gw")
                .find_map(|c| c.types.get(SECRET).cloned());
            if let Some(st) = status.filter(|s| s.acked_version.is_some() || s.last_nack.is_some()) {
                return st;
            }
            if changes.changed().await.is_err() {
                return Default::default();
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("Envoy never answered the secrets\n--- envoy.log ---\n{}", envoy.log_tail()))?;
    assert!(acked.acked_version.is_some() && acked.last_nack.is_none(), "Envoy ACKed the secrets: {acked:?}");
    let addr = envoy.listener_addr("mtls", Duration::from_secs(20)).await?;
    // proxy-config lists both secrets by kind, without key material.
    let mut req = request(Method::GET, "weft", "/api/v1/proxies/envoy-gw/config", Bytes::new())?;
    admin(&cp, req.headers_mut());
    let config = send_h1(cp.api_addr, req).await?.json()?;
    let secrets = &config["resources"]["Secret"];
    assert_eq!(secrets["names"], serde_json::json!(["ROOTCA", "default"]), "{config}");
    assert!(!secrets.to_string().contains("PRIVATE KEY"), "key material must not be shown: {secrets}");

    // A weft workload with a certificate from the same CA connects with mTLS and checks
    // that Envoy presents the identity its token grants.
    let (_, web_token) = new_token(&cp, "default", "web").await?;
    let cfg = CertManagerConfig::new(format!("http://{}", cp.xds_addr), CredentialSource::JoinToken(web_token), web());
    let mgr = CertManager::start(cfg).await?;
    let gateway = SpiffeId::new("cluster.local", "default", "gateway")?;
    let tls = client_config(mgr.identity(), PeerIdentities::OneOf(vec![gateway]))?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("gateway.default.svc")?;
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await.map_err(|e| {
        anyhow::anyhow!("mTLS handshake with Envoy failed: {e}\n--- envoy.log ---\n{}", envoy.log_tail())
    })?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n").await?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await?;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.ends_with("hello over mtls"), "{reply}");
    cp.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn envoy_without_a_join_token_gets_the_trust_bundle_but_no_certificate() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let cp = control_plane(data.path()).await?;
    let node = envoy_types::pb::envoy::config::core::v3::Node {
        id: "envoy-anon".into(),
        user_agent_name: "envoy".into(),
        ..Default::default()
    };
    let source = weft_control::secrets::SecretSource::new(
        cp.source.clone(),
        cp.identity.clone().context("identity")?,
        Duration::from_secs(3600),
    );
    let names: Vec<String> = source.secrets(&node).into_keys().collect();
    assert_eq!(names, vec!["ROOTCA".to_string()]);
    cp.shutdown().await;
    Ok(())
}
