//! Istio's egress tasks end to end on `weft up -f samples/egress` (a `sleep` workload with
//! its sidecar, plus the egress gateway `weft up` runs), with the task YAMLs of
//! `crates/weft/tests/data/egress-tasks/` (copied from istio.io, adapted to servers on
//! this machine) and local servers standing for the external hosts: an HTTPS server with
//! a certificate from a CA made for the test, on 127.0.0.1:0. Requests are made from
//! inside `sleep` (`weft exec sleep -- curl ...`, through its sidecar).
//!
//! - "Accessing External Services": under REGISTRY_ONLY an unregistered host gets 502
//!   over HTTP and no tunnel over HTTPS; a ServiceEntry for the HTTPS host lets curl
//!   through its sidecar (CONNECT) to the server, which curl verifies.
//! - "Egress TLS Origination": sleep sends plain HTTP, its sidecar originates TLS and
//!   verifies the server against the DestinationRule's CA.
//! - "Egress Gateways" (HTTP): the request leaves through the egress gateway.
//! - "Egress Gateways with TLS Origination": sidecar to gateway over mesh mTLS, the
//!   gateway originates TLS; then mutual TLS origination with the client certificate of
//!   the `credentialName` Secret.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/up_mesh.rs"]
mod up_mesh;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use up_mesh::UpMesh;
use weft_testkit::pki::TestCa;

fn sample(task: &str) -> PathBuf {
    weft_testkit::conformance_dir().join(task)
}

/// A task file with the test's ports and CA file in place of the placeholders.
fn task(name: &str, https: u16, http: u16, ca: &Path) -> String {
    // Templates (test ports and CA file as placeholders), kept out of samples/: not
    // appliable as they are.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/egress-tasks").join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .replace("18443", &https.to_string())
        .replace("18080", &http.to_string())
        .replace("/tmp/egress-ca.pem", ca.to_str().unwrap())
}

/// An HTTPS server for `names` (certificate from `ca`), requiring a client certificate
/// from `client_ca` when given. Every request gets 200 and
/// `tls server <name>: <path> client-cert=<bool>`; `hits` counts them.
struct TlsServer {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl TlsServer {
    fn start(rt: &tokio::runtime::Runtime, names: &[&str], ca: &TestCa, client_ca: Option<&TestCa>) -> TlsServer {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let (cert, key) = ca.leaf(names, 11);
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(cca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(cca.pem().as_bytes()) {
                    roots.add(c.unwrap()).unwrap();
                }
                let v = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .unwrap();
                builder.with_client_cert_verifier(v)
            }
            None => builder.with_no_client_auth(),
        };
        let cfg = builder.with_single_cert(chain, key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let sock = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = sock.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let (counter, name) = (hits.clone(), names[0].to_string());
        rt.spawn(async move {
            while let Ok((tcp, _)) = sock.accept().await {
                let (acceptor, counter, name) = (acceptor.clone(), counter.clone(), name.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let client_cert = tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
                    let mut got = Vec::new();
                    let mut buf = vec![0u8; 8192];
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&got).to_string();
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    counter.fetch_add(1, Ordering::SeqCst);
                    let body = format!("tls server {name}: {path} client-cert={client_cert}");
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(reply.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        TlsServer { addr, hits }
    }
}

/// `curl ARGS` inside sleep (through its sidecar): (exit status ok, stdout + stderr).
fn curl(mesh: &UpMesh, args: &[&str]) -> (bool, String) {
    let mut all = vec!["exec", "sleep", "--", "curl", "-sS", "-m", "20"];
    all.extend_from_slice(args);
    mesh.weft(&all)
}

/// `curl` inside sleep with sleep's sidecar as its HTTPS proxy too (`-x $HTTP_PROXY`:
/// curl sends CONNECT), trusting `ca`.
fn curl_https(mesh: &UpMesh, url: &str, ca: &Path) -> (bool, String) {
    let script = format!("curl -sS -m 20 -x \"$HTTP_PROXY\" --cacert {} -w '\\n%{{http_code}}' {url}", ca.display());
    mesh.weft(&["exec", "sleep", "--", "sh", "-c", &script])
}

fn write_ca(dir: &Path, ca: &TestCa) -> PathBuf {
    let p = dir.join("egress-ca.pem");
    std::fs::write(&p, ca.pem()).unwrap();
    p
}

#[test]
fn registry_only_blocks_unknown_hosts_and_a_service_entry_opens_an_https_host() {
    weft_testkit::tools::require("curl");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("egress test CA");
    let ca_file = write_ca(dir.path(), &ca);
    let google = TlsServer::start(&rt, &["www.google.com"], &ca, None);
    let mesh = UpMesh::start(Some(&sample("egress")), &["--outbound-traffic-policy", "REGISTRY_ONLY"], 1);
    assert!(mesh.output.iter().any(|l| l.contains("istio-egressgateway.istio-system")), "{:#?}", mesh.output);

    // REGISTRY_ONLY, Istio's documented answers: HTTP to an unknown host is a 502 from the
    // sidecar; HTTPS gets no connection (here: the CONNECT tunnel is refused with 502).
    let (_, out) = curl(&mesh, &["-o", "/dev/null", "-w", "%{http_code}", "http://unknown.example.com/"]);
    assert_eq!(out.trim(), "502", "{out}");
    let (ok, out) = curl_https(&mesh, "https://www.google.com/", &ca_file);
    assert!(!ok && out.contains("502"), "an unregistered HTTPS host was reached: {out}");
    assert_eq!(google.hits.load(Ordering::SeqCst), 0);

    // The task's ServiceEntry for the HTTPS host: curl reaches the server through its
    // sidecar and verifies its certificate.
    mesh.apply_yaml(&task("external-https-serviceentry.yaml", google.addr.port(), 0, &ca_file));
    mesh.wait_config("sleep", "routes", |c| c.contains("www.google.com:443"));
    let (ok, out) = curl_https(&mesh, "https://www.google.com/search", &ca_file);
    assert!(ok && out.ends_with("200"), "{out}");
    assert!(out.contains("tls server www.google.com: /search"), "{out}");
    assert_eq!(google.hits.load(Ordering::SeqCst), 1);
    // Other hosts stay blocked.
    let (_, out) = curl(&mesh, &["-o", "/dev/null", "-w", "%{http_code}", "http://unknown.example.com/"]);
    assert_eq!(out.trim(), "502", "{out}");
}

#[test]
fn tls_origination_and_the_egress_gateway_tasks_reach_local_servers() {
    weft_testkit::tools::require("curl");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("egress test CA");
    let ca_file = write_ca(dir.path(), &ca);
    let cnn = TlsServer::start(&rt, &["edition.cnn.com"], &ca, None);
    let plain = rt.block_on(weft_testkit::echo::EchoServer::start("edition-cnn-http"));
    let mesh = UpMesh::start(Some(&sample("egress")), &[], 1);
    let gateway_log = || std::fs::read_to_string(mesh.logs.join("istio-egressgateway.log")).unwrap_or_default();
    let apply = |file: &str, http: u16| {
        let text = task(file, cnn.addr.port(), http, &ca_file);
        let path = dir.path().join(file);
        std::fs::write(&path, &text).unwrap();
        mesh.apply(&path);
        path
    };
    let delete = |path: &Path| {
        let (ok, out) = mesh.weft(&["delete", "-f", path.to_str().unwrap()]);
        assert!(ok, "{out}");
    };

    // Egress TLS Origination: plain HTTP from sleep, TLS from its sidecar to the server
    // (which speaks nothing else), verified against the DestinationRule's CA.
    let f = apply("tls-origination.yaml", 0);
    mesh.wait_config("sleep", "clusters", |c| {
        c.contains("outbound|80||edition.cnn.com") && c.contains("envoy.transport_sockets.tls")
    });
    let (ok, out) = curl(&mesh, &["-w", "\n%{http_code}", "http://edition.cnn.com/politics"]);
    assert!(ok && out.ends_with("200"), "{out}");
    assert!(out.contains("tls server edition.cnn.com: /politics"), "{out}");
    delete(&f);

    // Egress Gateways (HTTP): sleep -> its sidecar -> the egress gateway -> the server.
    let before = plain.requests();
    let f = apply("egress-gateway-http.yaml", plain.addr.port());
    mesh.wait_config("sleep", "routes", |c| c.contains("istio-egressgateway"));
    UpMesh::wait_for(
        "the request through the egress gateway",
        || curl(&mesh, &["-w", "\n%{http_code}", "http://edition.cnn.com/politics?via=gateway"]).1,
        |out| out.ends_with("200"),
    );
    assert!(plain.requests() > before, "the server got nothing");
    UpMesh::wait_for("the gateway's access log", gateway_log, |l| l.contains("/politics?via=gateway"));
    delete(&f);

    // Egress Gateways (HTTPS): sleep's own TLS, tunnelled by its sidecar (CONNECT, routed
    // by the VirtualService's mesh `tls` route) to the egress gateway, which passes it
    // through by SNI (PASSTHROUGH) to the server; curl checks the server's certificate.
    let hits = cnn.hits.load(Ordering::SeqCst);
    let f = apply("egress-gateway-https.yaml", 0);
    mesh.wait_config("sleep", "routes", |c| c.contains("outbound|443|cnn|istio-egressgateway"));
    UpMesh::wait_for(
        "HTTPS through the egress gateway",
        || curl_https(&mesh, "https://edition.cnn.com/politics?via=passthrough", &ca_file).1,
        |out| out.ends_with("200") && out.contains("tls server edition.cnn.com: /politics?via=passthrough"),
    );
    assert!(cnn.hits.load(Ordering::SeqCst) > hits);
    // The gateway carried the connection (not sleep's sidecar straight to the server).
    UpMesh::wait_for("the gateway's access log", gateway_log, |l| l.contains("outbound|443||edition.cnn.com"));
    delete(&f);

    // Egress Gateways with TLS Origination: mTLS to the gateway, TLS from it.
    let hits = cnn.hits.load(Ordering::SeqCst);
    let f = apply("egress-gateway-tls-origination.yaml", 0);
    UpMesh::wait_for(
        "TLS origination at the egress gateway",
        || curl(&mesh, &["-w", "\n%{http_code}", "http://edition.cnn.com/politics?via=tls-gateway"]).1,
        |out| out.ends_with("200") && out.contains("tls server edition.cnn.com: /politics?via=tls-gateway"),
    );
    assert!(cnn.hits.load(Ordering::SeqCst) > hits);
    UpMesh::wait_for("the gateway's access log", gateway_log, |l| l.contains("/politics?via=tls-gateway"));
    delete(&f);

    // Mutual TLS origination at the gateway, the client certificate from the Secret.
    let client_ca = TestCa::new("egress client CA");
    let nginx = TlsServer::start(&rt, &["my-nginx.mesh-external.svc.cluster.local"], &ca, Some(&client_ca));
    let (cert, key) = client_ca.leaf(&["client.example.com"], 21);
    let indent = |s: &str| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: client-credential, namespace: istio-system}}\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}  ca.crt: |\n{}",
        indent(&cert),
        indent(&key),
        indent(&ca.pem())
    );
    mesh.apply_yaml(&secret);
    let text = task("egress-gateway-mtls-origination.yaml", nginx.addr.port(), 0, &ca_file);
    mesh.apply_yaml(&text);
    UpMesh::wait_for(
        "mutual TLS origination with the credentialName Secret",
        || curl(&mesh, &["-w", "\n%{http_code}", "http://my-nginx.mesh-external.svc.cluster.local/"]).1,
        |out| out.ends_with("200"),
    );
    let (_, out) = curl(&mesh, &["http://my-nginx.mesh-external.svc.cluster.local/mtls"]);
    assert!(out.contains("/mtls client-cert=true"), "{out}");
}
