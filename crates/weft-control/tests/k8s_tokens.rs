//! Kubernetes service-account tokens verified without the API server: a test issuer
//! (an ES256 key, its OIDC discovery document and JWKS served on 127.0.0.1:0) signs
//! projected tokens; the control plane finds the keys through discovery. The bootstrap
//! `weft inject` writes for a pod (the control plane's TLS port and the mesh root), with
//! the downward-API values filled in as the kubelet would, starts a weft proxy that gets
//! its certificate with the token over TLS and its configuration over mTLS, becomes ready
//! and completes mutual TLS as the pod's service account. A
//! token of another service account, an expired one and one for another audience are
//! refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mesh;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use weft_control::control::ControlPlane;
use weft_control::identity::IdentityConfig;
use weft_control::k8s_tokens::{KeySource, KubernetesTokenConfig};
use weft_identity::manager::CertManagerConfig;
use weft_identity::tls::{client_config, PeerIdentities};
use weft_identity::{CertManager, CredentialSource, SpiffeId};
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::net::reserve_addr;

const WAIT: Duration = Duration::from_secs(30);
const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: reviews-v1-5b4d9\n  namespace: default\n  labels: {app: reviews, version: v1}\nspec:\n  serviceAccountName: bookinfo-reviews\n  containers:\n  - name: reviews\n    image: docker.io/istio/examples-bookinfo-reviews-v1:1.20.2\n    ports:\n    - containerPort: 9080\n";

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: default}\nspec:\n  selector: {app: reviews}\n  ports: [{name: http, port: 9080}]\n";

/// A service-account token issuer: its signing key and the URL of its discovery document.
struct Issuer {
    key: jsonwebtoken::EncodingKey,
    discovery: String,
}

impl Issuer {
    /// Generates a P-256 key and serves discovery and JWKS on 127.0.0.1:0.
    async fn start() -> Issuer {
        let pair = rcgen::KeyPair::generate().unwrap();
        let key = jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        let point = pair.public_key_raw();
        assert_eq!(point.len(), 65, "an uncompressed P-256 point");
        let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "test-issuer-1", "alg": "ES256", "use": "sig",
            "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..])}]});
        let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = sock.local_addr().unwrap();
        let discovery = json!({"issuer": ISSUER, "jwks_uri": format!("http://{addr}/openid/v1/jwks"),
            "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"]});
        let docs = Arc::new((discovery.to_string(), jwks.to_string()));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = sock.accept().await else { return };
                let docs = docs.clone();
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let body = match req.uri().path() {
                        "/.well-known/openid-configuration" => Some(docs.0.clone()),
                        "/openid/v1/jwks" => Some(docs.1.clone()),
                        _ => None,
                    };
                    async move {
                        let mut r = http::Response::new(Full::new(Bytes::from(body.clone().unwrap_or_default())));
                        if body.is_none() {
                            *r.status_mut() = http::StatusCode::NOT_FOUND;
                        }
                        Ok::<_, Infallible>(r)
                    }
                });
                tokio::spawn(
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .into_owned(),
                );
            }
        });
        Issuer { key, discovery: format!("http://{addr}/.well-known/openid-configuration") }
    }

    /// A projected token for `ns`/`sa` with `aud`, expiring `exp_in` from now (negative:
    /// in the past).
    fn token(&self, ns: &str, sa: &str, aud: &str, exp_in: i64) -> String {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
        let claims = json!({"iss": ISSUER, "sub": format!("system:serviceaccount:{ns}:{sa}"), "aud": [aud],
            "iat": now - 60, "nbf": now - 60, "exp": now + exp_in,
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "0b9c"}}});
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("test-issuer-1".into());
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }
}

async fn control_plane(data: &Path, dir: &Path, issuer: &Issuer) -> ControlPlane {
    let mut identity = IdentityConfig::new(data);
    identity.kubernetes = Some(KubernetesTokenConfig {
        issuer: ISSUER.into(),
        keys: KeySource::Discovery(issuer.discovery.clone()),
        audiences: vec!["istio-ca".into()],
    });
    identity.xds_tls = Some("127.0.0.1:0".parse().unwrap());
    mesh::control_plane(Some(dir), identity).await
}

/// The proxy bootstrap `weft inject` writes into the pod (control plane on its TLS port,
/// the mesh root inline), expanded as the kubelet does (downward API), with the token at
/// `token_file` and the proxy's ports on loopback.
fn injected_bootstrap(cp: &ControlPlane, token_file: &Path) -> Bootstrap {
    let cfg = weft_control::inject::InjectConfig {
        control_plane: format!("https://{}", cp.xds_tls_addr.expect("the TLS port")),
        root_cert: Some(cp.identity.as_ref().unwrap().ca().trust_bundle_pem()),
        ..Default::default()
    };
    let out = weft_control::inject::inject_manifests(POD, Path::new("pod.yaml"), &cfg).unwrap();
    let pod: serde_json::Value = serde_yaml_ng::from_str(&out.text).unwrap();
    let env = pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == weft_control::inject::PROXY_CONTAINER)
        .expect("the proxy container")["env"]
        .as_array()
        .unwrap()
        .clone();
    let text = env.iter().find(|e| e["name"] == "WEFT_BOOTSTRAP_YAML").unwrap()["value"].as_str().unwrap().to_string();
    let downward = [
        ("POD_NAME", "reviews-v1-5b4d9"),
        ("POD_NAMESPACE", "default"),
        ("INSTANCE_IP", "127.0.0.1"),
        ("SERVICE_ACCOUNT", "bookinfo-reviews"),
    ];
    let text =
        weft_api::spec::expand_vars(&text, |v| downward.iter().find(|(k, _)| *k == v).map(|(_, x)| x.to_string()));
    let mut b = Bootstrap::parse(&text, Path::new("$WEFT_BOOTSTRAP_YAML")).unwrap();
    let id = b.identity.as_mut().expect("an identity section");
    assert_eq!(
        id.kubernetes_token_file.as_deref(),
        Some(Path::new("/var/run/secrets/tokens/istio-token")),
        "the projected token is the credential"
    );
    assert!(id.root_cert.as_deref().is_some_and(|r| r.contains("BEGIN CERTIFICATE")), "the mesh root is inlined");
    id.kubernetes_token_file = Some(token_file.to_path_buf());
    // Loopback instead of the pod's own network namespace.
    b.admin = "127.0.0.1:0".parse().unwrap();
    b.metrics = "127.0.0.1:0".parse().unwrap();
    b.access_log = "off".into();
    b.node.inbound = Some(reserve_addr());
    b.node.outbound = Some(reserve_addr());
    b
}

#[tokio::test]
async fn an_injected_pod_with_a_service_account_token_becomes_ready_and_talks_mtls() {
    let issuer = Issuer::start().await;
    let (data, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(dir.path().join("reviews.yaml"), SERVICE).unwrap();
    let cp = control_plane(data.path(), dir.path(), &issuer).await;
    let token_file = data.path().join("istio-token");
    std::fs::write(&token_file, issuer.token("default", "bookinfo-reviews", "istio-ca", 3600)).unwrap();
    let p = ProxyHandle::start(injected_bootstrap(&cp, &token_file)).await.expect("the sidecar gets its certificate");
    assert!(p.wait_ready(WAIT).await, "the injected sidecar never became ready");
    let conn =
        cp.server.connections().into_iter().find(|c| c.node_id.contains("reviews-v1-5b4d9")).expect("registered");
    assert_eq!(conn.node.as_ref().unwrap().service_account, "bookinfo-reviews");

    // Mutual TLS with its inbound listener: it presents the pod's identity and accepts ours.
    let inbound = loop {
        if let Some((_, a)) = p.listener_addrs().into_iter().find(|(n, _)| n.starts_with("inbound")) {
            break a;
        }
        assert!(p.wait_ready(WAIT).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let me = CertManager::start(CertManagerConfig::new(
        format!("http://{}", cp.xds_addr),
        CredentialSource::JoinToken(mesh::join_token(&cp, "default", "bookinfo-productpage").await),
        SpiffeId::new("cluster.local", "default", "bookinfo-productpage").unwrap(),
    ))
    .await
    .unwrap();
    let expected: SpiffeId = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews".parse().unwrap();
    let mut cfg = client_config(me.identity(), PeerIdentities::OneOf(vec![expected.clone()])).unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("reviews.default.svc.cluster.local").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.expect("mutual TLS");
    let peer = weft_identity::tls::peer_identity(tls.get_ref().1.peer_certificates());
    assert_eq!(peer, Some(expected));
    p.shutdown().await;
    cp.shutdown().await;
}

#[tokio::test]
async fn tokens_of_another_service_account_expired_or_for_another_audience_are_refused() {
    let issuer = Issuer::start().await;
    let (data, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cp = control_plane(data.path(), dir.path(), &issuer).await;
    let reviews = SpiffeId::new("cluster.local", "default", "bookinfo-reviews").unwrap();
    let ask = |token: String, name: &str| {
        let path = data.path().join(name);
        std::fs::write(&path, token).unwrap();
        let mut cfg = CertManagerConfig::new(
            format!("http://{}", cp.xds_addr),
            CredentialSource::KubernetesTokenFile(path),
            reviews.clone(),
        );
        cfg.initial_timeout = Duration::from_secs(10);
        async move { CertManager::start(cfg).await.map(|_| ()).map_err(|e| e.to_string()) }
    };
    // Accepted first (the keys are fetched through discovery), so the refusals below are
    // the tokens' fault.
    ask(issuer.token("default", "bookinfo-reviews", "istio-ca", 600), "ok").await.expect("a valid token");
    let other = ask(issuer.token("default", "bookinfo-ratings", "istio-ca", 600), "other").await.unwrap_err();
    assert!(other.contains("bookinfo-ratings"), "another service account: {other}");
    let expired = ask(issuer.token("default", "bookinfo-reviews", "istio-ca", -120), "expired").await.unwrap_err();
    assert!(expired.contains("expired"), "{expired}");
    let audience = ask(issuer.token("default", "bookinfo-reviews", "api", 600), "aud").await.unwrap_err();
    assert!(audience.contains("audience"), "{audience}");
    cp.shutdown().await;
}
