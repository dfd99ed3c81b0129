use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::PrivateKeyDer;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::cert::certs_from_pem;
use crate::Ca;

const TTL: Duration = Duration::from_secs(600);

fn identity_from(ca: &Ca, ns: &str, sa: &str, roots: Vec<CertificateDer<'static>>) -> watch::Sender<Arc<Identity>> {
    let id = SpiffeId::new("cluster.local", ns, sa).expect("id");
    let (key_pem, issued) = ca.issue_with_key(&id, TTL).expect("issue");
    let mut chain = certs_from_pem(&issued.cert_chain().concat(), "chain").expect("pem");
    chain.pop();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
    watch::channel(Arc::new(Identity::from_parts(chain, key, roots).expect("identity"))).0
}

fn sid(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).expect("id")
}

/// One TLS handshake over 127.0.0.1 and a byte each way; the client's outcome and the
/// SPIFFE id the server recorded for the client.
async fn handshake(client: ClientConfig, server: ServerConfig) -> (Result<(), rustls::Error>, Option<SpiffeId>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.ok()?;
        let mut tls = acceptor.accept(tcp).await.ok()?;
        let peer = peer_identity(tls.get_ref().1.peer_certificates());
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.ok()?;
        tls.write_all(&b).await.ok()?;
        tls.flush().await.ok()?;
        peer
    });
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("workload.weft.invalid").expect("name");
    let result = async {
        let mut tls = TlsConnector::from(Arc::new(client)).connect(name, tcp).await?;
        tls.write_all(b"x").await?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await?;
        Ok::<_, std::io::Error>(())
    }
    .await;
    let client_result = result.map_err(|e| {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .cloned()
            .unwrap_or_else(|| rustls::Error::General(e.to_string()))
    });
    let peer = tokio::time::timeout(Duration::from_secs(5), server_task).await.ok().and_then(|r| r.ok()).flatten();
    (client_result, peer)
}

#[tokio::test]
async fn two_sidecars_negotiate_aes_128_gcm_as_two_envoys_do() {
    let ca = Ca::ephemeral("cluster.local").expect("ca");
    let client = identity_from(&ca, "default", "web", ca.trust_bundle());
    let server = identity_from(&ca, "default", "db", ca.trust_bundle());
    let ccfg = client_config(client.subscribe(), PeerIdentities::Any).expect("client");
    let scfg = server_config(server.subscribe(), PeerIdentities::Any, true).expect("server");
    let (c, s) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(Arc::new(scfg));
    let server_side = tokio::spawn(async move {
        let tls = acceptor.accept(s).await.expect("server handshake");
        tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite())
    });
    let name = ServerName::try_from("workload.weft.invalid").expect("name");
    let tls = TlsConnector::from(Arc::new(ccfg)).connect(name, c).await.expect("client handshake");
    let aes128 = Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    assert_eq!(tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()), aes128);
    assert_eq!(server_side.await.expect("server task"), aes128);
}

#[tokio::test]
async fn mutual_tls_succeeds_and_the_server_records_the_client_spiffe_id() {
    let ca = Ca::ephemeral("cluster.local").expect("ca");
    let client = identity_from(&ca, "default", "web", ca.trust_bundle());
    let server = identity_from(&ca, "default", "db", ca.trust_bundle());
    let ccfg = client_config(client.subscribe(), PeerIdentities::OneOf(vec![sid("default", "db")])).expect("client");
    let scfg = server_config(server.subscribe(), PeerIdentities::Any, true).expect("server");
    let (res, peer) = handshake(ccfg, scfg).await;
    res.expect("handshake");
    assert_eq!(peer, Some(sid("default", "web")));
}

#[tokio::test]
async fn a_server_with_another_identity_than_expected_is_refused() {
    let ca = Ca::ephemeral("cluster.local").expect("ca");
    let client = identity_from(&ca, "default", "web", ca.trust_bundle());
    let server = identity_from(&ca, "default", "impostor", ca.trust_bundle());
    let ccfg = client_config(client.subscribe(), PeerIdentities::OneOf(vec![sid("default", "db")])).expect("client");
    let scfg = server_config(server.subscribe(), PeerIdentities::Any, true).expect("server");
    let (res, _) = handshake(ccfg, scfg).await;
    let err = res.expect_err("must refuse");
    assert_eq!(rejection_reason(&err), "wrong_identity", "{err}");
    assert!(err.to_string().contains("spiffe://cluster.local/ns/default/sa/impostor"), "{err}");
}

#[tokio::test]
async fn a_client_outside_the_allowed_identities_is_refused_by_the_server() {
    let ca = Ca::ephemeral("cluster.local").expect("ca");
    let client = identity_from(&ca, "default", "web", ca.trust_bundle());
    let server = identity_from(&ca, "default", "db", ca.trust_bundle());
    let ccfg = client_config(client.subscribe(), PeerIdentities::Any).expect("client");
    let allowed = PeerIdentities::OneOf(vec![sid("default", "api")]);
    let scfg = server_config(server.subscribe(), allowed, true).expect("server");
    let (res, peer) = handshake(ccfg, scfg).await;
    assert!(res.is_err(), "the server aborts the handshake");
    assert_eq!(peer, None);
}

#[tokio::test]
async fn a_peer_from_another_ca_is_refused_until_the_bundle_trusts_it() {
    let ours = Ca::ephemeral("cluster.local").expect("ca");
    let theirs = Ca::ephemeral("cluster.local").expect("other ca");
    let client = identity_from(&ours, "default", "web", ours.trust_bundle());
    let server = identity_from(&theirs, "default", "db", [ours.trust_bundle(), theirs.trust_bundle()].concat());
    let scfg = || server_config(server.subscribe(), PeerIdentities::Any, true).expect("server");
    // The client config is built once; only the watched bundle changes.
    let ccfg = client_config(client.subscribe(), PeerIdentities::Any).expect("client");
    let (res, _) = handshake(ccfg.clone(), scfg()).await;
    let err = res.expect_err("unknown CA");
    assert_eq!(rejection_reason(&err), "unknown_ca", "{err}");

    client.send_modify(|cur| {
        let mut next = (**cur).clone();
        next.roots = Arc::new(crate::TrustBundle::new(
            [ours.trust_bundle(), theirs.trust_bundle()].concat(),
            cur.roots.version + 1,
            true,
        ));
        *cur = Arc::new(next);
    });
    let (res, peer) = handshake(ccfg, scfg()).await;
    res.expect("trusted after the bundle update");
    assert_eq!(peer, Some(sid("default", "web")));
}

#[test]
fn an_expired_peer_certificate_is_refused_as_expired() {
    let ca = Ca::ephemeral("cluster.local").expect("ca");
    let me = identity_from(&ca, "default", "web", ca.trust_bundle());
    let peer = identity_from(&ca, "default", "db", ca.trust_bundle());
    let leaf = peer.borrow().certified_key.cert[0].clone();
    let later = UnixTime::since_unix_epoch(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("now") + TTL * 2,
    );
    let name = ServerName::try_from("x.invalid").expect("name");
    let v = SpiffeServerVerifier::new(me.subscribe(), PeerIdentities::Any);
    let err = v.verify_server_cert(&leaf, &[], &name, &[], later).expect_err("expired");
    assert_eq!(rejection_reason(&err), "expired", "{err}");
    let v = SpiffeClientVerifier::new(me.subscribe(), PeerIdentities::Any, true);
    let err = v.verify_client_cert(&leaf, &[], later).expect_err("expired");
    assert_eq!(rejection_reason(&err), "expired", "{err}");
    // And now it is fine.
    let now = UnixTime::now();
    SpiffeServerVerifier::new(me.subscribe(), PeerIdentities::Any)
        .verify_server_cert(&leaf, &[], &name, &[], now)
        .expect("valid now");
}
