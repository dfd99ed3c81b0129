//! RequestAuthentication end to end: the translator's inbound listener (explicit mode)
//! with the JWT filter, served to a real weft proxy (and Envoy 1.40) in front of an echo
//! app; tokens signed in the test with a generated ES256 key. Checks Istio's documented
//! behaviour: valid token accepted, expired / wrong issuer / bad signature refused with
//! 401, no token accepted unless an ALLOW policy requires `requestPrincipals`, claims in
//! `when`, `outputPayloadToHeader`, `forwardOriginalToken`, `fromHeaders`/`fromParams`,
//! and `jwksUri` fetched by the control plane.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use envoy_types::util::pack_any;
use serde_json::json;
use tokio::sync::watch;
use weft_control::registry::RegistrySnapshot;
use weft_control::translate::{translate, MeshConfig, ProxyMode};
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::{request, send_h1, Reply};
use weft_testkit::jwt::{JwksServer, JwtSigner};
use weft_xds::{type_url, AdsServer, NodeInfo, PortInfo, StaticSource};

const WAIT: Duration = Duration::from_secs(30);
const ISS: &str = "testing@secure.istio.io";

/// The xDS server, the echo app, and the inbound listener of `httpbin` in `foo`.
struct Mesh {
    source: Arc<StaticSource>,
    server: AdsServer,
    _stop: watch::Sender<bool>,
    xds: SocketAddr,
    app: EchoServer,
}

impl Mesh {
    async fn start() -> Mesh {
        let app = EchoServer::start("httpbin").await;
        let source = Arc::new(StaticSource::new());
        let server = AdsServer::new(source.clone());
        let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let xds = sock.local_addr().unwrap();
        let (stop, mut rx) = watch::channel(false);
        tokio::spawn(server.clone().serve(sock, async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
        Mesh { source, server, _stop: stop, xds, app }
    }

    fn listener(&self) -> String {
        format!("inbound|{}", self.app.addr.port())
    }

    /// Translates `yaml` (with fetched `jwks`) and serves the inbound listener and cluster.
    fn apply(&self, yaml: &str, jwks: BTreeMap<String, String>) {
        let parsed = weft_api::parse_str(yaml, Path::new("policies.yaml"));
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let mesh = MeshConfig { resources: parsed.resources, jwks, ..MeshConfig::default() };
        let port = self.app.addr.port();
        let node = NodeInfo {
            id: "httpbin".into(),
            name: "httpbin".into(),
            namespace: "foo".into(),
            labels: BTreeMap::from([("app".to_string(), "httpbin".to_string())]),
            ports: vec![PortInfo { name: "http".into(), port, protocol: "TCP".into(), app_protocol: None }],
            inbound: Some("127.0.0.1:0".parse().unwrap()),
            ..NodeInfo::default()
        };
        let out = translate(&mesh, &RegistrySnapshot::default(), &node, ProxyMode::Explicit);
        let l = out.listener(&self.listener()).unwrap().clone();
        let c = out.cluster(&format!("inbound|{port}||")).unwrap().clone();
        self.source.set(type_url::CLUSTER, vec![pack_any(c)]).unwrap();
        self.source.set(type_url::LISTENER, vec![pack_any(l)]).unwrap();
    }

    /// A weft proxy that has applied the current listener version.
    async fn weft(&self) -> (ProxyHandle, SocketAddr) {
        let text = format!(
            "node:\n  id: httpbin\n  cluster: httpbin.foo\n  name: httpbin\n  namespace: foo\nxds:\n  address: http://{}\n  mode: sotw\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\ndrain_timeout: 1s\n",
            self.xds
        );
        let p = ProxyHandle::start(Bootstrap::parse(&text, Path::new("httpbin.yaml")).unwrap()).await.unwrap();
        assert!(p.wait_ready(WAIT).await, "weft proxy never became ready");
        let addr = p.listener_addr(&self.listener(), WAIT).await.unwrap();
        self.synced(&p).await;
        (p, addr)
    }

    /// Waits until `p` runs the served listener version.
    async fn synced(&self, p: &ProxyHandle) {
        let want = self.source.version(type_url::LISTENER);
        let mut rx = p.context().store.subscribe();
        let ok = tokio::time::timeout(WAIT, async {
            while p.context().store.snapshot().versions.get(type_url::LISTENER) != Some(&want) {
                let _ = rx.changed().await;
            }
        })
        .await;
        assert!(ok.is_ok(), "proxy did not apply listener {want}");
    }
}

async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = request(http::Method::GET, "httpbin.foo:8000", path, Bytes::new()).unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    send_h1(addr, req).await.unwrap()
}

async fn bearer(addr: SocketAddr, token: &str) -> (u16, String) {
    let r = get(addr, "/headers", &[("authorization", &format!("Bearer {token}"))]).await;
    (r.status.as_u16(), r.text())
}

fn request_authn(rule: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin}}}}\n  jwtRules:\n  - {rule}\n---\n"
    )
}

fn inline_rule(signer: &JwtSigner) -> String {
    format!("{{issuer: \"{ISS}\", jwks: '{}'}}", signer.jwks())
}

fn allow(name: &str, rules: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin}}}}\n  rules:\n{rules}---\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_expired_wrong_issuer_and_missing_tokens_behave_as_istio_documents() {
    let signer = JwtSigner::es256("k1").unwrap();
    let other = JwtSigner::es256("k1").unwrap();
    let mesh = Mesh::start().await;
    mesh.apply(&request_authn(&inline_rule(&signer)), BTreeMap::new());
    let (_p, addr) = mesh.weft().await;

    // Valid: accepted, the token is removed before the app (forwardOriginalToken unset).
    let valid = signer.token(ISS, "alice", 3600, json!({})).unwrap();
    let r = get(addr, "/headers", &[("authorization", &format!("Bearer {valid}"))]).await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text());
    assert!(r.json().unwrap()["headers"].get("authorization").is_none(), "{}", r.text());
    // Missing: RequestAuthentication alone lets it through.
    assert_eq!(get(addr, "/headers", &[]).await.status.as_u16(), 200);
    // Expired.
    let expired = signer.token(ISS, "alice", -3600, json!({})).unwrap();
    assert_eq!(bearer(addr, &expired).await, (401, "Jwt is expired".to_string()));
    // Right issuer, wrong key.
    let forged = other.token(ISS, "alice", 3600, json!({})).unwrap();
    assert_eq!(bearer(addr, &forged).await, (401, "Jwt verification fails".to_string()));
    // Not a JWT.
    assert_eq!(bearer(addr, "deadbeef").await.0, 401);
    let r = get(addr, "/headers", &[("authorization", &format!("Bearer {expired}"))]).await;
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"http://httpbin.foo:8000/headers\", error=\"invalid_token\"")
    );
    // Wrong issuer.
    let stranger = other.token("someone-else", "alice", 3600, json!({})).unwrap();
    let (code, body) = bearer(addr, &stranger).await;
    assert_eq!((code, body.as_str()), (401, "Jwt issuer is not configured"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_principals_and_claims_are_usable_in_authorization_policies() {
    let signer = JwtSigner::es256("k1").unwrap();
    let mesh = Mesh::start().await;
    let yaml = request_authn(&inline_rule(&signer))
        + &allow(
            "require-jwt",
            &format!("  - from: [{{source: {{requestPrincipals: [\"{ISS}/alice\", \"{ISS}/bob\"]}}}}]\n"),
        );
    mesh.apply(&yaml, BTreeMap::new());
    let (p, addr) = mesh.weft().await;
    let alice = signer.token(ISS, "alice", 3600, json!({"groups": ["admin"]})).unwrap();
    let bob = signer.token(ISS, "bob", 3600, json!({"groups": ["dev"]})).unwrap();
    let carol = signer.token(ISS, "carol", 3600, json!({})).unwrap();
    assert_eq!(bearer(addr, &alice).await.0, 200);
    assert_eq!(bearer(addr, &bob).await.0, 200);
    assert_eq!(bearer(addr, &carol).await, (403, "RBAC: access denied".to_string()));
    assert_eq!(get(addr, "/headers", &[]).await.status.as_u16(), 403, "no token, no principal");

    // `requestPrincipals: ["*"]` plus a claim condition.
    let yaml = request_authn(&inline_rule(&signer))
        + &allow(
            "admins",
            "  - from: [{source: {requestPrincipals: [\"*\"]}}]\n    when: [{key: \"request.auth.claims[groups]\", values: [admin]}]\n",
        );
    mesh.apply(&yaml, BTreeMap::new());
    mesh.synced(&p).await;
    assert_eq!(bearer(addr, &alice).await.0, 200);
    assert_eq!(bearer(addr, &bob).await.0, 403);
    assert_eq!(get(addr, "/headers", &[]).await.status.as_u16(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_payload_to_header_forward_original_token_and_custom_locations() {
    let signer = JwtSigner::es256("k1").unwrap();
    let mesh = Mesh::start().await;
    let rule = format!(
        "{{issuer: \"{ISS}\", jwks: '{}', fromHeaders: [{{name: x-jwt-assertion}}], fromParams: [my_token], outputPayloadToHeader: x-jwt-payload, forwardOriginalToken: true, outputClaimToHeaders: [{{header: x-sub, claim: sub}}]}}",
        signer.jwks()
    );
    mesh.apply(&request_authn(&rule), BTreeMap::new());
    let (_p, addr) = mesh.weft().await;
    let token = signer.token(ISS, "alice", 3600, json!({"scope": "read write"})).unwrap();
    let r =
        get(addr, "/headers", &[("x-jwt-assertion", &token), ("x-jwt-payload", "forged"), ("x-sub", "forged")]).await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text());
    let headers = r.json().unwrap()["headers"].clone();
    assert_eq!(headers["x-jwt-assertion"], json!(token), "forwardOriginalToken keeps the token");
    assert_eq!(headers["x-sub"], json!("alice"));
    let payload = headers["x-jwt-payload"].as_str().unwrap().to_string();
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&decoded).unwrap();
    assert_eq!((claims["iss"].as_str(), claims["sub"].as_str()), (Some(ISS), Some("alice")));
    // The query parameter location.
    assert_eq!(get(addr, &format!("/get?my_token={token}"), &[]).await.status.as_u16(), 200);
    let expired = signer.token(ISS, "alice", -3600, json!({})).unwrap();
    let r = get(addr, &format!("/get?my_token={expired}"), &[]).await;
    assert_eq!((r.status.as_u16(), r.text()), (401, "Jwt is expired".to_string()));
    // The default location is not used once fromHeaders/fromParams are set.
    let r = get(addr, "/headers", &[("authorization", &format!("Bearer {expired}"))]).await;
    assert_eq!(r.status.as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_uri_is_fetched_by_the_control_plane_and_inlined() {
    let signer = JwtSigner::es256("k1").unwrap();
    let keys = JwksServer::start(signer.jwks()).await.unwrap();
    let yaml = request_authn(&format!("{{issuer: \"{ISS}\", jwksUri: \"{}\"}}", keys.uri()));
    let parsed = weft_api::parse_str(&yaml, Path::new("ra.yaml"));
    let uris = weft_control::translate::jwt::jwks_uris(&parsed.resources);
    assert_eq!(uris, BTreeSet::from([keys.uri()]));

    let mesh = Mesh::start().await;
    // Before the keys are fetched: tokens of that issuer are refused, no token passes.
    mesh.apply(&yaml, BTreeMap::new());
    let (p, addr) = mesh.weft().await;
    let token = signer.token(ISS, "alice", 3600, json!({})).unwrap();
    assert_eq!(bearer(addr, &token).await.0, 401);
    assert_eq!(get(addr, "/headers", &[]).await.status.as_u16(), 200);

    let resolver = weft_control::jwks::JwksResolver::start(Duration::from_secs(3600), Duration::from_secs(5));
    let mut changes = resolver.changes();
    resolver.want(uris);
    tokio::time::timeout(WAIT, changes.changed()).await.unwrap().unwrap();
    assert!(keys.hits() >= 1);
    mesh.apply(&yaml, (*resolver.snapshot()).clone());
    mesh.synced(&p).await;
    assert_eq!(bearer(addr, &token).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_accepts_the_translated_jwt_filter_and_answers_like_weft() {
    let signer = JwtSigner::es256("k1").unwrap();
    let other = JwtSigner::es256("k1").unwrap();
    let mesh = Mesh::start().await;
    let rules = format!(
        "{{issuer: \"{ISS}\", audiences: [svc-a], jwks: '{}', outputPayloadToHeader: x-jwt-payload}}\n  - {{issuer: \"second@example.com\", jwks: '{}', fromHeaders: [{{name: x-second, prefix: \"Token \"}}]}}",
        signer.jwks(),
        other.jwks()
    );
    mesh.apply(&request_authn(&rules), BTreeMap::new());
    let envoy =
        weft_testkit::envoy::Envoy::start(&weft_testkit::envoy::ads_bootstrap(mesh.xds, "envoy-sidecar", false))
            .await
            .unwrap();
    let mut changes = mesh.server.status_changes();
    let acked = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(c) = mesh.server.connections().iter().find(|c| c.node_id == "envoy-sidecar") {
                for (t, s) in &c.types {
                    assert!(s.last_nack.is_none(), "Envoy NACKed {t}: {:?}", s.last_nack);
                }
                if c.types.get(type_url::LISTENER).and_then(|s| s.acked_version.clone())
                    == Some(mesh.source.version(type_url::LISTENER))
                {
                    return;
                }
            }
            let _ = changes.changed().await;
        }
    })
    .await;
    assert!(acked.is_ok(), "Envoy did not ACK: {:?}\n{}", mesh.server.connections(), envoy.log_tail());
    let envoy_addr = envoy.listener_addr(&mesh.listener(), WAIT).await.unwrap();
    let (_p, weft_addr) = mesh.weft().await;

    let aud = json!({"aud": "svc-a"});
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("missing", vec![]),
        (
            "valid",
            vec![("authorization", format!("Bearer {}", signer.token(ISS, "alice", 3600, aud.clone()).unwrap()))],
        ),
        (
            "expired",
            vec![("authorization", format!("Bearer {}", signer.token(ISS, "alice", -3600, aud.clone()).unwrap()))],
        ),
        (
            "wrong audience",
            vec![(
                "authorization",
                format!("Bearer {}", signer.token(ISS, "alice", 3600, json!({"aud": "x"})).unwrap()),
            )],
        ),
        (
            "wrong issuer",
            vec![("authorization", format!("Bearer {}", signer.token("nobody", "alice", 3600, aud.clone()).unwrap()))],
        ),
        (
            "bad signature",
            vec![("authorization", format!("Bearer {}", other.token(ISS, "alice", 3600, aud.clone()).unwrap()))],
        ),
        ("garbage", vec![("authorization", "Bearer abc.def".to_string())]),
        (
            "second provider",
            vec![("x-second", format!("Token {}", other.token("second@example.com", "bob", 3600, json!({})).unwrap()))],
        ),
        (
            "second provider expired",
            vec![(
                "x-second",
                format!("Token {}", other.token("second@example.com", "bob", -3600, json!({})).unwrap()),
            )],
        ),
        (
            "second issuer in the first location",
            vec![(
                "authorization",
                format!("Bearer {}", other.token("second@example.com", "bob", 3600, json!({})).unwrap()),
            )],
        ),
    ];
    for (name, headers) in &cases {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let e = get(envoy_addr, "/headers", &h).await;
        let w = get(weft_addr, "/headers", &h).await;
        let summary = |r: &Reply| {
            let body = if r.status.as_u16() == 200 { String::new() } else { r.text() };
            (r.status.as_u16(), body, r.header("www-authenticate").map(str::to_string))
        };
        assert_eq!(summary(&w), summary(&e), "{name}: weft vs Envoy");
        if *name == "valid" {
            let (we, ww) = (e.json().unwrap(), w.json().unwrap());
            assert_eq!(
                we["headers"]["x-jwt-payload"].as_str().map(|s| s.trim_end_matches('=').to_string()),
                ww["headers"]["x-jwt-payload"].as_str().map(|s| s.trim_end_matches('=').to_string())
            );
            assert!(ww["headers"].get("authorization").is_none());
        }
    }
}
