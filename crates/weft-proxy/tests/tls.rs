//! TLS from Envoy transport sockets, with real handshakes: a listener terminates TLS and
//! speaks HTTP/2 when ALPN says so (checked with curl and a rustls client), a cluster
//! originates TLS and verifies the server against its CA, and a listener that requires
//! client certificates refuses clients without one.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use envoy_types::pb::envoy::config::core::v3::{
    data_source, transport_socket, DataSource, HealthStatus, TransportSocket,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::ValidationContextType, CertificateValidationContext, CommonTlsContext, DownstreamTlsContext,
    TlsCertificate, UpstreamTlsContext,
};
use envoy_types::pb::google::protobuf::BoolValue;
use envoy_types::util::pack_any;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::get_h1;
use weft_xds::build::{self, Routes};
use weft_xds::type_url;

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: OpenSSL treats a leaf whose issuer equals its subject as self-signed.
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "weft test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, names[0].clone());
        let cert = params.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca_pem: ca.pem(),
        server: leaf(vec!["svc.test".into(), "127.0.0.1".into()]),
        client: leaf(vec!["client.test".into()]),
    }
}

fn inline(s: &str) -> Option<DataSource> {
    Some(DataSource { specifier: Some(data_source::Specifier::InlineString(s.into())), ..Default::default() })
}

fn cert(pair: &(String, String)) -> TlsCertificate {
    TlsCertificate { certificate_chain: inline(&pair.0), private_key: inline(&pair.1), ..Default::default() }
}

fn ca(pem: &str) -> Option<ValidationContextType> {
    Some(ValidationContextType::ValidationContext(CertificateValidationContext {
        trusted_ca: inline(pem),
        ..Default::default()
    }))
}

fn ts(any: envoy_types::pb::google::protobuf::Any) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any)),
    }
}

/// Listener `tls` terminates TLS (optionally requiring client certs) in front of `app`;
/// listener `out` is plain and routes to cluster `secure`, which originates TLS to `tls`.
async fn setup(
    p: &Pki,
    require_client: bool,
    upstream: UpstreamTlsContext,
) -> (Mesh, weft_proxy::proxy::ProxyHandle, EchoServer) {
    let mesh = Mesh::start().await;
    let echo = EchoServer::start("app").await;
    let hcm = build::http_connection_manager(
        "tls",
        Routes::Inline(Box::new(rc("tls", vec![vhost("all", &["*"], vec![route("r", prefix("/"), to("app"))])]))),
        None,
        &[],
    );
    let mut tls_listener = build::http_listener("tls", "127.0.0.1:0".parse().unwrap(), hcm);
    let down = DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificates: vec![cert(&p.server)],
            alpn_protocols: vec!["h2".into(), "http/1.1".into()],
            validation_context_type: if require_client { ca(&p.ca_pem) } else { None },
            ..Default::default()
        }),
        require_client_certificate: Some(BoolValue { value: require_client }),
        ..Default::default()
    };
    tls_listener.filter_chains[0].transport_socket = Some(ts(pack_any(down)));
    mesh.set(type_url::LISTENER, vec![pack_any(tls_listener), http_out(&[])]);
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), to("secure"))])]))],
    );
    let mut secure = build::eds_cluster("secure", true);
    secure.transport_socket = Some(ts(pack_any(upstream)));
    mesh.set(type_url::CLUSTER, vec![pack_any(build::eds_cluster("app", false)), pack_any(secure)]);
    mesh.set(
        type_url::ENDPOINT,
        vec![
            pack_any(build::cla("app", &[(echo.addr, 1, HealthStatus::Healthy)])),
            pack_any(build::cla("secure", &[])),
        ],
    );
    let proxy = mesh.proxy("tls", false).await;
    let tls_addr = proxy.listener_addr("tls", WAIT).await.unwrap();
    mesh.set(
        type_url::ENDPOINT,
        vec![
            pack_any(build::cla("app", &[(echo.addr, 1, HealthStatus::Healthy)])),
            pack_any(build::cla("secure", &[(tls_addr, 1, HealthStatus::Healthy)])),
        ],
    );
    mesh.synced_all(&proxy).await;
    (mesh, proxy, echo)
}

fn upstream(p: &Pki, ca_pem: &str, client_cert: bool) -> UpstreamTlsContext {
    UpstreamTlsContext {
        sni: "svc.test".into(),
        common_tls_context: Some(CommonTlsContext {
            validation_context_type: ca(ca_pem),
            tls_certificates: if client_cert { vec![cert(&p.client)] } else { vec![] },
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn listener_terminates_tls_and_negotiates_h2_with_alpn() {
    let p = pki();
    let (_mesh, proxy, echo) = setup(&p, false, upstream(&p, &p.ca_pem.clone(), false)).await;
    let tls_addr = proxy.listener_addr("tls", WAIT).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &p.ca_pem).unwrap();
    let curl = weft_testkit::tools::require("curl");
    let port = tls_addr.port();
    let out = tokio::process::Command::new(curl)
        .args(["-sS", "--cacert"])
        .arg(&ca_file)
        .args([
            "--resolve",
            &format!("svc.test:{port}:127.0.0.1"),
            "-w",
            "\n%{http_version}",
            &format!("https://svc.test:{port}/over-tls"),
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("\"/over-tls\""), "{text}");
    assert_eq!(text.lines().last(), Some("2"), "ALPN should have negotiated HTTP/2: {text}");
    assert_eq!(echo.requests(), 1);
}

/// HTTP/1.1 over TLS: negotiated with ALPN (`http/1.1`), and without ALPN at all (the
/// proxy then reads the client's first bytes to tell the version).
#[tokio::test]
async fn listener_serves_http1_over_tls_with_and_without_alpn() {
    let p = pki();
    let (_mesh, proxy, echo) = setup(&p, false, upstream(&p, &p.ca_pem.clone(), false)).await;
    let tls_addr = proxy.listener_addr("tls", WAIT).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &p.ca_pem).unwrap();
    let curl = weft_testkit::tools::require("curl");
    let port = tls_addr.port();
    for (served, flag) in [(1, "--http1.1"), (2, "--no-alpn")] {
        let out = tokio::process::Command::new(&curl)
            .args(["-sS", flag, "--cacert"])
            .arg(&ca_file)
            .args([
                "--resolve",
                &format!("svc.test:{port}:127.0.0.1"),
                "-w",
                "\n%{http_version}",
                &format!("https://svc.test:{port}/h1-over-tls"),
            ])
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "curl {flag} failed: {}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("\"/h1-over-tls\""), "{flag}: {text}");
        assert_eq!(text.lines().last(), Some("1.1"), "{flag}: {text}");
        assert_eq!(echo.requests(), served);
    }
}

#[tokio::test]
async fn cluster_originates_tls_and_verifies_the_server_ca() {
    let p = pki();
    let (_mesh, proxy, _echo) = setup(&p, false, upstream(&p, &p.ca_pem.clone(), false)).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    // plain -> proxy -> TLS (h2 by ALPN) -> proxy's TLS listener -> app
    let r = get_h1(out, "svc.test", "/through-tls").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-echo-server"), Some("app"));

    // A CA that did not sign the server certificate: the handshake fails -> 503.
    let other = pki();
    let (_mesh2, proxy2, echo2) = setup(&p, false, upstream(&p, &other.ca_pem, false)).await;
    let out2 = proxy2.listener_addr("out", WAIT).await.unwrap();
    let r = get_h1(out2, "svc.test", "/untrusted").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(echo2.requests(), 0);
}

#[tokio::test]
async fn listener_requiring_client_certificates_refuses_clients_without_one() {
    let p = pki();
    // The cluster presents a client certificate: accepted.
    let (_mesh, proxy, _echo) = setup(&p, true, upstream(&p, &p.ca_pem.clone(), true)).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    assert_eq!(get_h1(out, "svc.test", "/mtls").await.unwrap().status, 200);

    // A client without a certificate is refused during the handshake.
    let tls_addr = proxy.listener_addr("tls", WAIT).await.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(p.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("svc.test").unwrap();
    let refused = match tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await {
        Err(_) => true,
        // TLS 1.3: the server's refusal arrives after the client's Finished; the first read fails.
        Ok(mut s) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: svc.test\r\n\r\n").await;
            let mut buf = [0u8; 64];
            !matches!(s.read(&mut buf).await, Ok(n) if n > 0)
        }
    };
    assert!(refused, "a client without a certificate got through");
}

/// `match_typed_subject_alt_names` (DestinationRule `subjectAltNames`): the server
/// certificate must be valid for one of the names, whatever SNI was sent.
#[tokio::test]
async fn cluster_checks_the_server_certificate_against_subject_alt_names() {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::subject_alt_name_matcher::SanType;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::SubjectAltNameMatcher;
    use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher::MatchPattern, StringMatcher};
    let p = pki();
    let with_san = |san: &str| {
        let mut u = upstream(&p, &p.ca_pem, false);
        u.sni = "other-name.test".into();
        let common = u.common_tls_context.as_mut().unwrap();
        common.validation_context_type = Some(ValidationContextType::ValidationContext(CertificateValidationContext {
            trusted_ca: inline(&p.ca_pem),
            match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                san_type: SanType::Dns as i32,
                matcher: Some(StringMatcher {
                    match_pattern: Some(MatchPattern::Exact(san.into())),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }));
        u
    };
    // The certificate is for svc.test: accepted although SNI names another host.
    let (_m1, proxy, _e1) = setup(&p, false, with_san("svc.test")).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    assert_eq!(get_h1(out, "svc.test", "/san-ok").await.unwrap().status, 200);
    // Expecting a name the certificate does not carry: refused.
    let (_m2, proxy2, echo2) = setup(&p, false, with_san("payments.test")).await;
    let out2 = proxy2.listener_addr("out", WAIT).await.unwrap();
    assert_eq!(get_h1(out2, "svc.test", "/san-wrong").await.unwrap().status, 503);
    assert_eq!(echo2.requests(), 0);
}
