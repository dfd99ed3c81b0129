//! Control-plane replicas on an etcd cluster that requires TLS and client certificates
//! (`--client-cert-auth --trusted-ca-file ... --cert-file ... --key-file ...`, peers over
//! TLS too): the replicas connect with `--etcd-ca`, `--etcd-cert`, `--etcd-key` and share
//! resources through it; a wrong CA, a missing or foreign client certificate and a
//! missing `--etcd-ca` each fail the start with an error naming the cause.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use weft_control::control::{ControlConfig, ControlPlane};
use weft_control::etcd::tls::EtcdTls;
use weft_control::etcd::EtcdConfig;
use weft_control::identity::IdentityConfig;
use weft_control::translate::{MeshConfig, ProxyMode};
use weft_testkit::etcd::EtcdCluster;
use weft_testkit::http::{request, send_h1};

const ADMIN_TOKEN: &str = "etcd-tls-test-admin-token";
const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: reviews\nspec:\n  selector: {app: reviews}\n  ports:\n  - name: http\n    port: 9080\n";

fn config(data: &Path, token_file: &Path) -> ControlConfig {
    ControlConfig {
        dir: None,
        xds: "127.0.0.1:0".parse().unwrap(),
        api: "127.0.0.1:0".parse().unwrap(),
        mode: ProxyMode::Explicit,
        mesh: MeshConfig::default(),
        identity: Some(IdentityConfig {
            api: weft_control::api_auth::ApiAuthConfig {
                token_file: Some(token_file.to_path_buf()),
                read_anonymous: false,
            },
            ..IdentityConfig::new(data)
        }),
        inject: Default::default(),
        webhook: None,
        registry: None,
        stats: Default::default(),
        slo: Default::default(),
    }
}

/// The cluster's `--store` with `files`.
fn store(etcd: &EtcdCluster, files: EtcdTls) -> EtcdConfig {
    EtcdConfig { lease_ttl: Duration::from_secs(2), ..EtcdConfig::parse(&etcd.store_url()).unwrap() }.with_tls(files)
}

fn good_files(etcd: &EtcdCluster) -> EtcdTls {
    let t = etcd.tls.as_ref().unwrap();
    EtcdTls { ca: Some(t.ca.clone()), cert: Some(t.client_cert.clone()), key: Some(t.client_key.clone()) }
}

#[tokio::test]
async fn replicas_share_a_tls_etcd_with_client_certificates() {
    let etcd = EtcdCluster::start_tls(3).await;
    assert!(etcd.store_url().starts_with("etcds://"));
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin-token");
    std::fs::write(&token, ADMIN_TOKEN).unwrap();
    let a = ControlPlane::start_replica(config(&dir.path().join("a"), &token), store(&etcd, good_files(&etcd)))
        .await
        .unwrap();
    let b = ControlPlane::start_replica(config(&dir.path().join("b"), &token), store(&etcd, good_files(&etcd)))
        .await
        .unwrap();
    let mut req = request(Method::POST, "weft", "/api/v1/apply", Bytes::from(SERVICE)).unwrap();
    req.headers_mut().insert(http::header::AUTHORIZATION, format!("Bearer {ADMIN_TOKEN}").parse().unwrap());
    let reply = send_h1(a.api_addr, req).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !b.store.snapshot().resources.iter().any(|r| r.meta.name == "reviews") {
        assert!(tokio::time::Instant::now() < deadline, "the Service applied through A never reached B");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One CA for both, shared through the TLS store.
    let root = |cp: &ControlPlane| cp.identity.as_ref().unwrap().ca().trust_bundle_pem();
    assert_eq!(root(&a), root(&b));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn wrong_ca_or_client_certificate_fails_with_the_cause() {
    let etcd = EtcdCluster::start_tls(1).await;
    let t = etcd.tls.as_ref().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin-token");
    std::fs::write(&token, ADMIN_TOKEN).unwrap();
    let start = |name: &str, files: EtcdTls| {
        let cfg = config(&dir.path().join(name), &token);
        let store = store(&etcd, files);
        async move {
            match ControlPlane::start_replica(cfg, store).await {
                Ok(cp) => {
                    cp.shutdown().await;
                    panic!("started although its etcd TLS settings are wrong")
                }
                Err(e) => e,
            }
        }
    };
    let good = good_files(&etcd);
    let (wrong_ca, no_cert, foreign_cert, no_ca) = tokio::join!(
        start("wrong-ca", EtcdTls { ca: Some(t.foreign_ca.clone()), ..good.clone() }),
        start("no-cert", EtcdTls { cert: None, key: None, ..good.clone() }),
        start(
            "foreign-cert",
            EtcdTls { cert: Some(t.foreign_cert.clone()), key: Some(t.foreign_key.clone()), ..good.clone() }
        ),
        start("no-ca", EtcdTls { ca: None, ..good.clone() }),
    );
    assert!(wrong_ca.contains("not signed by the CA in --etcd-ca"), "{wrong_ca}");
    assert!(no_cert.contains("client certificate") && no_cert.contains("--etcd-cert"), "{no_cert}");
    assert!(foreign_cert.contains("refused the client certificate --etcd-cert"), "{foreign_cert}");
    assert!(no_ca.contains("needs --etcd-ca"), "{no_ca}");
}
