//! Gateway `credentialName` over SDS, end to end: a control plane with its CA watching
//! Kubernetes `Secret`s beside a Gateway and a DestinationRule that name them; a weft
//! proxy, then a stock Envoy, as the gateway (node id `router~...`, namespace
//! `istio-system`). Checked with curl: a SIMPLE server with a `kubernetes.io/tls` Secret,
//! a MUTUAL server whose client CA is the `<name>-cacert` Secret, rotation of a Secret
//! reaching the open listener for new handshakes, mutual TLS origination to an upstream
//! with a DestinationRule's `credentialName`; and the SDS authorization: no
//! `kubernetes://` secret for a sidecar, nor for a gateway of another namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mesh;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_control::control::ControlPlane;
use weft_control::envoy_bootstrap::{render_node, EnvoyBootstrapOptions};
use weft_control::identity::IdentityConfig;
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::EchoServer;
use weft_testkit::pki::TestCa;

const WAIT: Duration = Duration::from_secs(30);
const GATEWAY_SA: &str = "istio-ingressgateway";

/// The gateway's servers and what they route: `web.example` (SIMPLE, Secret `web-cred`),
/// `mtls.example` (MUTUAL, Secret `mtls-cred` and its CA Secret `mtls-cred-cacert`) and
/// `origin.example` (plain HTTP, routed to an HTTPS upstream with mutual TLS originated
/// with Secret `client-cred`).
fn mesh_yaml(web: SocketAddr, upstream: SocketAddr) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: default}}
spec:
  hosts: [web.internal]
  location: MESH_EXTERNAL
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: upstream, namespace: default}}
spec:
  hosts: [secure.upstream]
  location: MESH_EXTERNAL
  ports: [{{number: 443, name: https, protocol: HTTPS}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{https: {}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: upstream, namespace: istio-system}}
spec:
  host: secure.upstream
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 443}}
      tls: {{mode: MUTUAL, credentialName: client-cred, sni: secure.upstream}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 8443, name: https, protocol: HTTPS}}
    hosts: [web.example]
    tls: {{mode: SIMPLE, credentialName: web-cred}}
  - port: {{number: 9443, name: https-mtls, protocol: HTTPS}}
    hosts: [mtls.example]
    tls: {{mode: MUTUAL, credentialName: mtls-cred}}
  - port: {{number: 8080, name: http, protocol: HTTP}}
    hosts: [origin.example]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: istio-system}}
spec:
  hosts: [web.example, mtls.example]
  gateways: [gw]
  http:
  - route: [{{destination: {{host: web.internal, port: {{number: 80}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: origin, namespace: istio-system}}
spec:
  hosts: [origin.example]
  gateways: [gw]
  http:
  - route: [{{destination: {{host: secure.upstream, port: {{number: 443}}}}}}]
"#,
        web.port(),
        upstream.port()
    )
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A `kubernetes.io/tls` Secret (base64 `data`).
fn tls_secret(ns: &str, name: &str, cert: &str, key: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {ns}}}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n",
        b64(cert),
        b64(key)
    )
}

/// A generic Secret in Istio's `cert`/`key`/`cacert` keys (`stringData`).
fn generic_secret(ns: &str, name: &str, keys: &[(&str, &str)]) -> String {
    let mut out = format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {ns}}}\nstringData:\n");
    for (k, v) in keys {
        out.push_str(&format!("  {k}: |\n"));
        for line in v.lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out
}

/// Writes `text` whole, then renames it into place (the directory poll never sees half).
fn put(dir: &Path, file: &str, text: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

/// The PKI of the test, written to files curl reads.
struct Pki {
    dir: tempfile::TempDir,
    server_ca: TestCa,
    client_ca: TestCa,
}

impl Pki {
    fn new() -> Pki {
        let p = Pki {
            dir: tempfile::tempdir().unwrap(),
            server_ca: TestCa::new("sds test server CA"),
            client_ca: TestCa::new("sds test client CA"),
        };
        std::fs::write(p.path("server-ca.pem"), p.server_ca.pem()).unwrap();
        let (cert, key) = p.client_ca.leaf(&["client.example"], 7);
        std::fs::write(p.path("client.crt"), cert).unwrap();
        std::fs::write(p.path("client.key"), key).unwrap();
        p
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }
}

/// curl over TLS to `host` resolved to `addr`, trusting `ca`, with an optional client
/// certificate: the status and body, or curl's error.
fn curl(addr: SocketAddr, host: &str, ca: &Path, client: Option<(&Path, &Path)>) -> Result<(u16, String), String> {
    let bin = weft_testkit::tools::require("curl");
    let mut cmd = std::process::Command::new(bin);
    cmd.args(["-sS", "--max-time", "10", "-w", "\n%{http_code}", "--cacert"]).arg(ca);
    if let Some((cert, key)) = client {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    cmd.arg("--resolve").arg(format!("{host}:{}:{}", addr.port(), addr.ip()));
    cmd.arg(format!("https://{host}:{}/hello", addr.port()));
    let out = cmd.output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

async fn curl_async(
    addr: SocketAddr,
    host: &'static str,
    ca: PathBuf,
    client: Option<(PathBuf, PathBuf)>,
) -> Result<(u16, String), String> {
    tokio::task::spawn_blocking(move || curl(addr, host, &ca, client.as_ref().map(|(c, k)| (c.as_path(), k.as_path()))))
        .await
        .unwrap()
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        match f().await {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("timed out waiting for {what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// An HTTPS server requiring a client certificate from `client_ca`, presenting a
/// certificate for `secure.upstream` from `server_ca`; answers every request with 200
/// and `upstream saw a client certificate`.
async fn mtls_upstream(server_ca: &TestCa, client_ca: &TestCa) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = server_ca.leaf(&["secure.upstream"], 9);
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(client_ca.pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = sock.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let has_cert = tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let body = if has_cert { "upstream saw a client certificate" } else { "no client certificate" };
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(reply.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

/// The gateway's bound listeners.
struct Ports {
    https: SocketAddr,
    mtls: SocketAddr,
    http: SocketAddr,
}

/// Every behaviour of the gateway (`who`: weft or Envoy).
async fn check_gateway(p: &Pki, ports: &Ports, web: &EchoServer, who: &str) {
    let ca = p.path("server-ca.pem");
    // SIMPLE from the kubernetes.io/tls Secret: curl verifies the certificate.
    let https = ports.https;
    eventually(&format!("{who}: HTTPS with the Secret's certificate"), || {
        let ca = ca.clone();
        async move {
            match curl_async(https, "web.example", ca, None).await? {
                (200, _) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    let before = web.requests();
    let (status, body) = curl_async(https, "web.example", ca.clone(), None).await.unwrap();
    assert_eq!(status, 200, "{who}: {body}");
    assert!(web.requests() > before, "{who}: the request reached the app");
    let echoed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echoed["server"], "web", "{who}: {body}");

    // MUTUAL: the CA from the `-cacert` Secret; no client certificate, no service.
    let mtls = ports.mtls;
    let client = Some((p.path("client.crt"), p.path("client.key")));
    eventually(&format!("{who}: MUTUAL with a client certificate"), || {
        let (ca, client) = (ca.clone(), client.clone());
        async move {
            match curl_async(mtls, "mtls.example", ca, client).await? {
                (200, _) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    let refused = curl_async(mtls, "mtls.example", ca.clone(), None).await;
    assert!(!matches!(refused, Ok((200, _))), "{who}: MUTUAL served a client without a certificate: {refused:?}");
    // A client certificate from another CA is refused too.
    let rogue = TestCa::new("rogue CA");
    let (cert, key) = rogue.leaf(&["client.example"], 3);
    std::fs::write(p.path("rogue.crt"), cert).unwrap();
    std::fs::write(p.path("rogue.key"), key).unwrap();
    let refused = curl_async(mtls, "mtls.example", ca.clone(), Some((p.path("rogue.crt"), p.path("rogue.key")))).await;
    assert!(!matches!(refused, Ok((200, _))), "{who}: MUTUAL took a certificate of another CA: {refused:?}");

    // Mutual TLS origination with the DestinationRule's credentialName.
    let http = ports.http;
    let deadline = Instant::now() + WAIT;
    loop {
        let r = weft_testkit::http::get_h1(http, "origin.example", "/").await;
        match r {
            Ok(r) if r.status == 200 => {
                assert_eq!(r.text(), "upstream saw a client certificate", "{who}");
                break;
            }
            other if Instant::now() > deadline => panic!("{who}: origination never worked: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn start_proxy(text: &str) -> ProxyHandle {
    let b = Bootstrap::parse(text, Path::new("proxy.yaml")).unwrap();
    let p = ProxyHandle::start(b).await.unwrap();
    assert!(p.wait_ready(WAIT).await, "proxy never became ready:\n{text}");
    p
}

async fn weft_gateway(cp: &ControlPlane) -> ProxyHandle {
    let token = mesh::join_token(cp, "istio-system", GATEWAY_SA).await;
    let text = format!(
        "node:\n  id: router~127.0.0.1~ingress-weft.istio-system~istio-system.svc.cluster.local\n  name: ingress-weft-1\n  workload_name: istio-ingressgateway\n  namespace: istio-system\n  service_account: {GATEWAY_SA}\n  labels: {{istio: ingressgateway}}\n  gateway_ports: {{8443: 0, 9443: 0, 8080: 0}}\n  gateway_address: 127.0.0.1\nxds:\n  address: http://{}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\ndrain_timeout: 1s\nidentity:\n  token: \"{token}\"\n",
        cp.xds_addr,
    );
    start_proxy(&text).await
}

/// Writes the Secrets (server certificates from `server_ca`).
fn write_secrets(dir: &Path, p: &Pki) {
    let (cert, key) = p.server_ca.leaf(&["web.example"], 1);
    put(dir, "web-cred.yaml", &tls_secret("istio-system", "web-cred", &cert, &key));
    let (cert, key) = p.server_ca.leaf(&["mtls.example"], 2);
    put(dir, "mtls-cred.yaml", &tls_secret("istio-system", "mtls-cred", &cert, &key));
    let ca = p.client_ca.pem();
    put(dir, "mtls-cred-cacert.yaml", &generic_secret("istio-system", "mtls-cred-cacert", &[("cacert", &ca)]));
    let (cert, key) = p.client_ca.leaf(&["gateway.client"], 4);
    let server_ca = p.server_ca.pem();
    put(
        dir,
        "client-cred.yaml",
        &generic_secret("istio-system", "client-cred", &[("cert", &cert), ("key", &key), ("cacert", &server_ca)]),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_credential_names_are_served_over_sds_to_weft_and_envoy_gateways_and_rotate() {
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let web = EchoServer::start("web").await;
    let upstream = mtls_upstream(&pki.server_ca, &pki.client_ca).await;
    put(dir.path(), "mesh.yaml", &mesh_yaml(web.addr, upstream));
    write_secrets(dir.path(), &pki);
    let mut identity = IdentityConfig::new(data.path());
    identity.cert_ttl = Duration::from_secs(3600);
    let cp = mesh::control_plane(Some(dir.path()), identity).await;

    let gw = weft_gateway(&cp).await;
    let ports = Ports {
        https: gw.listener_addr("0.0.0.0_8443", WAIT).await.expect("0.0.0.0_8443 is bound"),
        mtls: gw.listener_addr("0.0.0.0_9443", WAIT).await.expect("0.0.0.0_9443 is bound"),
        http: gw.listener_addr("0.0.0.0_8080", WAIT).await.expect("0.0.0.0_8080 is bound"),
    };
    check_gateway(&pki, &ports, &web, "weft").await;

    // Rotation: the Secret now holds a certificate of another CA. The listener stays
    // open (same address) and new handshakes present the new certificate.
    let next_ca = TestCa::new("sds test rotated CA");
    std::fs::write(pki.path("next-ca.pem"), next_ca.pem()).unwrap();
    let (cert, key) = next_ca.leaf(&["web.example"], 5);
    put(dir.path(), "web-cred.yaml", &tls_secret("istio-system", "web-cred", &cert, &key));
    let https = ports.https;
    eventually("weft: the rotated certificate", || {
        let ca = pki.path("next-ca.pem");
        async move {
            match curl_async(https, "web.example", ca, None).await? {
                (200, _) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert_eq!(gw.listener_addr("0.0.0.0_8443", WAIT).await, Some(https), "the listener was not replaced");
    let old = curl_async(https, "web.example", pki.path("server-ca.pem"), None).await;
    assert!(old.is_err(), "the old certificate is still served: {old:?}");
    // Back to the first CA for the Envoy run.
    let (cert, key) = pki.server_ca.leaf(&["web.example"], 6);
    put(dir.path(), "web-cred.yaml", &tls_secret("istio-system", "web-cred", &cert, &key));

    // A stock Envoy as the gateway fetches the same secrets by name over ADS.
    let opts = EnvoyBootstrapOptions {
        name: "ingress-envoy".into(),
        namespace: "istio-system".into(),
        labels: [("istio".to_string(), "ingressgateway".to_string())].into(),
        service_account: GATEWAY_SA.into(),
        ports: Vec::new(),
        instance_ip: "127.0.0.1".parse().unwrap(),
        xds: cp.xds_addr,
        admin_port: 0,
        cluster_id: "Kubernetes".into(),
        delta: false,
        inbound: None,
        outbound: None,
        join_token: Some(mesh::join_token(&cp, "istio-system", GATEWAY_SA).await),
    };
    let node = opts.gateway_node_info([(8443, 0), (9443, 0), (8080, 0)].into(), Some("127.0.0.1".parse().unwrap()));
    let envoy = weft_testkit::envoy::Envoy::start(&render_node(&opts, &node)).await.unwrap();
    let ports = Ports {
        https: envoy.listener_addr("0.0.0.0_8443", WAIT).await.unwrap(),
        mtls: envoy.listener_addr("0.0.0.0_9443", WAIT).await.unwrap(),
        http: envoy.listener_addr("0.0.0.0_8080", WAIT).await.unwrap(),
    };
    check_gateway(&pki, &ports, &web, "envoy").await;
    drop(envoy);
    drop(gw);
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_secrets_go_to_gateways_of_their_namespace_only() {
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    write_secrets(dir.path(), &pki);
    let cp = mesh::control_plane(Some(dir.path()), IdentityConfig::new(data.path())).await;
    let source = weft_control::secrets::SecretSource::new(
        cp.source.clone(),
        cp.identity.clone().expect("identity"),
        Duration::from_secs(3600),
    );
    let node = |id: &str, ns: &str| {
        let mut info =
            weft_xds::NodeInfo { id: id.into(), name: "proxy".into(), namespace: ns.into(), ..Default::default() };
        info.cluster = format!("{id}.{ns}");
        info.to_node()
    };
    let names = |id: &str, ns: &str| -> Vec<String> {
        source.secrets(&node(id, ns)).into_keys().filter(|n| n.starts_with("kubernetes://")).collect()
    };
    let gateway = "router~127.0.0.1~gw.istio-system~istio-system.svc.cluster.local";
    let deadline = Instant::now() + WAIT;
    while names(gateway, "istio-system").is_empty() {
        assert!(Instant::now() < deadline, "the Secrets never reached the store");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        names(gateway, "istio-system"),
        [
            "kubernetes://client-cred",
            "kubernetes://client-cred-cacert",
            "kubernetes://istio-system/client-cred",
            "kubernetes://istio-system/client-cred-cacert",
            "kubernetes://istio-system/mtls-cred",
            "kubernetes://istio-system/mtls-cred-cacert",
            "kubernetes://istio-system/web-cred",
            "kubernetes://mtls-cred",
            "kubernetes://mtls-cred-cacert",
            "kubernetes://web-cred",
        ]
    );
    // A sidecar in the same namespace, and a gateway of another namespace, get none.
    assert!(names("sidecar~127.0.0.1~app.istio-system~istio-system.svc.cluster.local", "istio-system").is_empty());
    assert!(names("router~127.0.0.1~gw.other~other.svc.cluster.local", "other").is_empty());
    cp.shutdown().await;
}
