//! The certificate service on a real gRPC server (127.0.0.1:0) and the proxy-side
//! certificate manager against it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use weft_identity::ca::verify_chain;
use weft_identity::manager::CertManagerConfig;
use weft_identity::service::{CertificateAuthority, CertificateClient};
use weft_identity::{Ca, CertManager, Credential, CredentialSource, IdentityError, SpiffeId, TokenIssuer};

struct Mesh {
    addr: SocketAddr,
    ca: Arc<Ca>,
    tokens: Arc<TokenIssuer>,
}

async fn mesh() -> Mesh {
    let ca = Arc::new(Ca::ephemeral("cluster.local").expect("ca"));
    let tokens = Arc::new(TokenIssuer::ephemeral().expect("tokens"));
    let authority = Arc::new(CertificateAuthority::new(
        ca.clone(),
        tokens.clone(),
        Duration::from_secs(3600),
        Duration::from_secs(86400),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(authority.service())
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Mesh { addr, ca, tokens }
}

fn web() -> SpiffeId {
    SpiffeId::new("cluster.local", "default", "web").expect("id")
}

fn config(m: &Mesh, token: &str, ttl: Duration) -> CertManagerConfig {
    let mut cfg =
        CertManagerConfig::new(format!("http://{}", m.addr), CredentialSource::JoinToken(token.to_string()), web());
    cfg.ttl = Some(ttl);
    cfg.backoff_initial = Duration::from_millis(100);
    cfg.backoff_max = Duration::from_millis(400);
    cfg.initial_timeout = Duration::from_secs(10);
    cfg
}

#[tokio::test]
async fn cert_manager_rotates_a_short_lived_certificate_several_times() {
    let m = mesh().await;
    let token = m.tokens.create("default", "web", Duration::from_secs(3600)).expect("token");
    let mgr = CertManager::start(config(&m, &token.token, Duration::from_secs(2))).await.expect("first certificate");
    let mut rx = mgr.identity();
    let first = rx.borrow_and_update().clone();
    assert_eq!(first.id, web());
    verify_chain(&first.certified_key.cert, &m.ca.trust_bundle()).expect("chains to the CA");
    let mut serials = vec![first.serial.clone()];
    let mut keys = vec![first.certified_key.key.public_key().expect("spki").as_ref().to_vec()];
    while serials.len() < 4 {
        tokio::time::timeout(Duration::from_secs(5), rx.changed()).await.expect("renewed in time").expect("open");
        let cur = rx.borrow_and_update().clone();
        assert!(cur.is_valid(), "a renewed certificate is valid");
        assert!(cur.not_after <= SystemTime::now() + Duration::from_secs(3), "short TTL honoured");
        verify_chain(&cur.certified_key.cert, &cur.roots.roots).expect("renewed leaf chains to the bundle");
        serials.push(cur.serial.clone());
        keys.push(cur.certified_key.key.public_key().expect("spki").as_ref().to_vec());
    }
    serials.dedup();
    keys.dedup();
    assert_eq!(serials.len(), 4, "every renewal is a new certificate");
    assert_eq!(keys.len(), 4, "every renewal uses a fresh key generated in process");
}

#[tokio::test]
async fn renewal_failures_keep_the_valid_certificate_until_it_can_renew() {
    let m = mesh().await;
    let token = m.tokens.create("default", "web", Duration::from_secs(3600)).expect("token");
    let mgr = CertManager::start(config(&m, &token.token, Duration::from_secs(4))).await.expect("first certificate");
    let first = mgr.current();
    m.tokens.revoke(&token.id, None).expect("revoke");
    // Renewal is due after ~2 s and is refused; the current certificate stays in place.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert_eq!(mgr.current().serial, first.serial, "the valid certificate is kept while renewal fails");
}

#[tokio::test]
async fn trust_bundle_updates_replace_the_roots_without_a_new_certificate() {
    let m = mesh().await;
    let token = m.tokens.create("default", "web", Duration::from_secs(3600)).expect("token");
    let mgr = CertManager::start(config(&m, &token.token, Duration::from_secs(600))).await.expect("first certificate");
    let before = mgr.current();
    assert_eq!(before.roots.roots, m.ca.trust_bundle(), "initially the root of the issued chain");
    m.ca.begin_root_rotation().expect("rotate");
    mgr.set_trust_bundle(m.ca.trust_bundle());
    let after = mgr.current();
    assert_eq!(after.serial, before.serial);
    assert_eq!(after.roots.roots.len(), 2);
    assert!(after.roots.from_control_plane);
    assert!(after.roots.version > before.roots.version);
}

#[tokio::test]
async fn a_refused_credential_fails_the_first_certificate_at_once() {
    let m = mesh().await;
    let other = TokenIssuer::ephemeral().expect("foreign issuer");
    let forged = other.create("default", "web", Duration::from_secs(3600)).expect("token");
    let err = CertManager::start(config(&m, &forged.token, Duration::from_secs(60))).await.err().expect("refused");
    assert!(matches!(err, IdentityError::Service { code: tonic::Code::Unauthenticated, .. }), "{err}");
    assert!(err.to_string().contains("signature does not verify"), "{err}");

    // A token for another service account cannot get a certificate for `web`.
    let db = m.tokens.create("default", "db", Duration::from_secs(3600)).expect("token");
    let err = CertManager::start(config(&m, &db.token, Duration::from_secs(60))).await.err().expect("refused");
    assert!(matches!(err, IdentityError::Service { code: tonic::Code::PermissionDenied, .. }), "{err}");
    assert!(err.to_string().contains("grants only spiffe://cluster.local/ns/default/sa/db"), "{err}");
}

#[tokio::test]
async fn the_service_refuses_requests_without_a_usable_credential() {
    let m = mesh().await;
    let mut client = CertificateClient::connect_lazy(&format!("http://{}", m.addr)).expect("client");
    let key = rcgen_csr();
    let err = client
        .create_certificate(&Credential::JoinToken("weft-jt1.e30.AAAA".into()), key.clone(), None)
        .await
        .expect_err("bad token");
    assert!(matches!(err, IdentityError::Service { code: tonic::Code::Unauthenticated, .. }), "{err}");
    let jwt = Credential::from_bearer("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln").expect("jwt");
    let err = client.create_certificate(&jwt, key, None).await.expect_err("k8s token");
    assert!(err.to_string().contains("not supported without Kubernetes"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn the_first_certificate_is_retried_until_the_initial_timeout_when_the_service_is_down() {
    // A port nobody listens on: connection refused, retried with backoff in paused time.
    let addr = weft_testkit::net::reserve_addr();
    let mut cfg =
        CertManagerConfig::new(format!("http://{addr}"), CredentialSource::JoinToken("weft-jt1.x.y".into()), web());
    cfg.initial_timeout = Duration::from_secs(30);
    let started = tokio::time::Instant::now();
    let err = CertManager::start(cfg).await.err().expect("service down");
    assert!(matches!(err, IdentityError::Service { code: tonic::Code::Unavailable, .. }), "{err}");
    assert!(started.elapsed() >= Duration::from_secs(30), "kept retrying until the initial timeout");
}

fn rcgen_csr() -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    rcgen::CertificateParams::default().serialize_request(&key).expect("csr").pem().expect("pem")
}

/// Istio's CA: a certificate TTL over the maximum is refused with INVALID_ARGUMENT
/// ("requested TTL ... is greater than the max allowed TTL ..."), however absurd the
/// number; the maximum itself is granted, no TTL gets the default.
#[tokio::test]
async fn certificate_ttls_over_the_maximum_are_refused_like_istios_ca() {
    use weft_identity::service::IstioCertificateRequest;
    let m = mesh().await;
    let (default, max) = (Duration::from_secs(3600), Duration::from_secs(86400));
    let authority = CertificateAuthority::new(m.ca.clone(), m.tokens.clone(), default, max);
    let token = m.tokens.create("default", "web", Duration::from_secs(3600)).expect("token").token;
    let bearer = format!("Bearer {token}");
    let request = |secs: i64| IstioCertificateRequest { csr: rcgen_csr(), validity_duration: secs, metadata: None };
    for secs in [86_401, 99_999_999_999_999, i64::MAX] {
        let err = authority.create_certificate(Some(&bearer), &request(secs)).await.expect_err("over the maximum");
        assert!(matches!(err, IdentityError::TtlTooLong { .. }), "{err}");
        assert_eq!(err.to_status().code(), tonic::Code::InvalidArgument);
        let text = err.to_string();
        assert!(text.contains(&format!("TTL {secs}s is greater than the max allowed TTL 86400s")), "{text}");
    }
    let lifetime = |chain: &[String]| {
        let der = weft_identity::cert::certs_from_pem(&chain[0], "leaf").expect("pem").remove(0);
        let info = weft_identity::cert::CertInfo::parse(&der).expect("leaf");
        info.not_after.duration_since(SystemTime::now()).expect("not expired")
    };
    let at_max = authority.create_certificate(Some(&bearer), &request(86_400)).await.expect("the maximum is granted");
    assert!(lifetime(&at_max) > max - Duration::from_secs(120), "{:?}", lifetime(&at_max));
    for none in [0, -5, i64::MIN] {
        let chain = authority.create_certificate(Some(&bearer), &request(none)).await.expect("the default");
        assert!(lifetime(&chain) <= default, "{:?}", lifetime(&chain));
    }

    // Over the wire (the client saturates u64 seconds to i64): INVALID_ARGUMENT, which
    // the proxy's certificate manager treats as permanent.
    let mut client = CertificateClient::connect_lazy(&format!("http://{}", m.addr)).expect("client");
    let err = client
        .create_certificate(&Credential::JoinToken(token), rcgen_csr(), Some(Duration::from_secs(u64::MAX)))
        .await
        .expect_err("over the maximum");
    assert!(matches!(err, IdentityError::Service { code: tonic::Code::InvalidArgument, .. }), "{err}");
    assert!(err.is_permanent());
}
