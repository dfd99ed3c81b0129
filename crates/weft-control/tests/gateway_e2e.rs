//! Ingress gateway end to end: a control plane with its CA watching Istio's own
//! `bookinfo-gateway.yaml` plus a few more resources, a weft proxy as the ingress gateway
//! (node id `router~...`, labels `istio: ingressgateway`), and an echo `productpage` in
//! two versions and a TCP echo behind weft sidecars under STRICT mTLS. Requests go
//! through the gateway's listeners (HTTP routes, 404s, header match, weighted split,
//! httpsRedirect, HTTPS terminated with certificate files and checked by curl, a TCP
//! server); then a stock Envoy 1.40 is started as the gateway on the same control plane
//! and must answer the same (differential).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mesh;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use weft_control::control::ControlPlane;
use weft_control::envoy_bootstrap::{render_node, EnvoyBootstrapOptions};
use weft_control::identity::IdentityConfig;
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::conformance;
use weft_testkit::echo::{EchoServer, SERVER_HEADER};
use weft_testkit::http::{get_h1, request, send_h1};
use weft_testkit::net::reserve_addr;

const WAIT: Duration = Duration::from_secs(30);

/// Besides bookinfo-gateway.yaml: the productpage Service in two versions, STRICT mTLS,
/// a VirtualService on the same Gateway for host `split.example` (header match and a
/// 50/50 split), and a second Gateway whose server redirects to HTTPS.
const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: productpage, namespace: default}
spec:
  selector: {app: productpage}
  ports: [{name: http, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: productpage, namespace: default}
spec:
  host: productpage
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec:
  mtls: {mode: STRICT}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: split, namespace: default}
spec:
  hosts: [split.example]
  gateways: [bookinfo-gateway]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: productpage, subset: v2, port: {number: 9080}}}]
  - route:
    - {destination: {host: productpage, subset: v1, port: {number: 9080}}, weight: 50}
    - {destination: {host: productpage, subset: v2, port: {number: 9080}}, weight: 50}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: secure-gateway, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8081, name: http, protocol: HTTP}
    hosts: [secure.example]
    tls: {httpsRedirect: true}
"#;

/// An HTTPS server terminating TLS with certificate files, and what it routes.
fn https_resources(cert: &Path, key: &Path) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: tls-gateway, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 8443, name: https, protocol: HTTPS}}
    hosts: [secure.example]
    tls: {{mode: SIMPLE, serverCertificate: {}, privateKey: {}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: secure, namespace: default}}
spec:
  hosts: [secure.example]
  gateways: [istio-system/tls-gateway]
  http:
  - route: [{{destination: {{host: productpage, subset: v1, port: {{number: 9080}}}}}}]
"#,
        cert.display(),
        key.display()
    )
}

/// A CA and a server certificate for `secure.example`, written to `dir`: (ca, cert, key).
fn server_pki(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    weft_testkit::pki::TestCa::new("gateway test CA").write(dir, &["secure.example"]);
    (dir.join("ca.pem"), dir.join("tls.crt"), dir.join("tls.key"))
}

/// `curl https://<host>:<port><path>` resolved to `addr`, trusting `ca`: the status and
/// the response headers and body, or curl's error.
fn curl_https(addr: SocketAddr, host: &str, path: &str, ca: &Path) -> Result<(u16, String), String> {
    let curl = weft_testkit::tools::require("curl");
    let port = addr.port();
    let out = std::process::Command::new(curl)
        .args(["-sS", "-i", "--max-time", "10", "--cacert"])
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{host}:{port}:{}", addr.ip()))
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, text))
}

/// A TCP server on the gateway, routed by a VirtualService `tcp` route to an echo
/// service behind a sidecar.
const TCP_MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: tcp-echo, namespace: default}
spec:
  selector: {app: tcp-echo}
  ports: [{name: tcp, port: 9000}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: tcp-gateway, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 31400, name: tcp, protocol: TCP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp-echo, namespace: default}
spec:
  hosts: [tcp-echo]
  gateways: [istio-system/tcp-gateway]
  tcp:
  - match: [{port: 31400}]
    route: [{destination: {host: tcp-echo, port: {number: 9000}}}]
"#;

const GATEWAY_SA: &str = "istio-ingressgateway";

async fn start_proxy(text: &str) -> ProxyHandle {
    let b = Bootstrap::parse(text, Path::new("proxy.yaml")).unwrap();
    let p = ProxyHandle::start(b).await.unwrap();
    assert!(p.wait_ready(WAIT).await, "proxy never became ready:\n{text}");
    p
}

/// A productpage instance: a weft sidecar with a mesh identity in front of `app`.
async fn backend(cp: &ControlPlane, version: &str, app: &EchoServer) -> ProxyHandle {
    let token = mesh::join_token(cp, "default", "bookinfo-productpage").await;
    let text = format!(
        "node:\n  id: sidecar~127.0.0.1~productpage-{version}.default~default.svc.cluster.local\n  name: productpage-{version}\n  namespace: default\n  service_account: bookinfo-productpage\n  labels: {{app: productpage, version: {version}}}\n  outbound: {}\n  inbound: {}\n  ports:\n  - {{name: http, port: {}, protocol: TCP}}\nxds:\n  address: http://{}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\ndrain_timeout: 1s\nidentity:\n  token: \"{token}\"\n",
        reserve_addr(),
        reserve_addr(),
        app.addr.port(),
        cp.xds_addr,
    );
    start_proxy(&text).await
}

/// The tcp-echo instance: a weft sidecar with a mesh identity in front of a TCP echo.
async fn tcp_backend(cp: &ControlPlane, app: SocketAddr) -> ProxyHandle {
    let token = mesh::join_token(cp, "default", "tcp-echo").await;
    let text = format!(
        "node:\n  id: sidecar~127.0.0.1~tcp-echo-1.default~default.svc.cluster.local\n  name: tcp-echo-1\n  namespace: default\n  service_account: tcp-echo\n  labels: {{app: tcp-echo}}\n  outbound: {}\n  inbound: {}\n  ports:\n  - {{name: tcp, port: {}, protocol: TCP}}\nxds:\n  address: http://{}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\ndrain_timeout: 1s\nidentity:\n  token: \"{token}\"\n",
        reserve_addr(),
        reserve_addr(),
        app.port(),
        cp.xds_addr,
    );
    start_proxy(&text).await
}

/// Bytes sent through the gateway's TCP listener come back from the echo behind it.
async fn check_tcp(addr: SocketAddr, who: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for msg in [&b"ping through the gateway"[..], b"second connection"] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        let read = tokio::time::timeout(WAIT, s.read_exact(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(_))), "{who}: no echo through the TCP server: {read:?}");
        assert_eq!(buf, msg, "{who}");
    }
}

/// The ingress gateway as a weft proxy: Istio's gateway node id, server ports 8080, 8081
/// and 8443 mapped to free ports on 127.0.0.1.
async fn weft_gateway(cp: &ControlPlane) -> ProxyHandle {
    let token = mesh::join_token(cp, "istio-system", GATEWAY_SA).await;
    let text = format!(
        "node:\n  id: router~127.0.0.1~ingress-weft.istio-system~istio-system.svc.cluster.local\n  name: ingress-weft-5d8f7\n  workload_name: istio-ingressgateway\n  namespace: istio-system\n  service_account: {GATEWAY_SA}\n  labels: {{istio: ingressgateway}}\n  gateway_ports: {{8080: 0, 8081: 0, 8443: 0, 31400: 0}}\n  gateway_address: 127.0.0.1\nxds:\n  address: http://{}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\ndrain_timeout: 1s\nidentity:\n  token: \"{token}\"\n",
        cp.xds_addr,
    );
    start_proxy(&text).await
}

fn server_of(r: &weft_testkit::http::Reply) -> String {
    r.header(SERVER_HEADER).unwrap_or("<none>").to_string()
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The gateway's listeners of server ports 8080, 8081 (redirect) and 8443 (HTTPS).
struct Listeners {
    http: SocketAddr,
    redirect: SocketAddr,
    https: SocketAddr,
}

/// What a client of the gateway sees (`who` names the gateway in failures).
async fn check_gateway(l: &Listeners, ca: &Path, who: &str, v1: &EchoServer, v2: &EchoServer) {
    let (http, redirect) = (l.http, l.redirect);
    eventually(&format!("{who}: /productpage through the gateway"), || async {
        get_h1(http, "bookinfo.local", "/productpage").await.map(|r| r.status == 200).unwrap_or(false)
    })
    .await;
    // bookinfo-gateway.yaml: its five matches reach productpage (either version)...
    for path in ["/productpage", "/static/style.css", "/login", "/logout", "/api/v1/products/0"] {
        let r = get_h1(http, "bookinfo.local", path).await.unwrap();
        assert_eq!(r.status, 200, "{who}: {path}: {}", r.text());
        assert!(["productpage-v1", "productpage-v2"].contains(&server_of(&r).as_str()), "{who}: {path}");
        assert_eq!(r.json().unwrap()["path"], path, "{who}: the path reaches the app unchanged");
    }
    // ... on any host (the VirtualService's `*`), also with a port in Host ...
    let r = get_h1(http, "203.0.113.7:8080", "/productpage").await.unwrap();
    assert_eq!(r.status, 200, "{who}: host with port");
    // ... and anything else is a 404 from the gateway that never reaches an app.
    let before = v1.requests() + v2.requests();
    for path in ["/", "/productpage/extra", "/admin", "/loginx"] {
        let r = get_h1(http, "bookinfo.local", path).await.unwrap();
        assert_eq!(r.status, 404, "{who}: {path} should not be routed");
    }
    assert_eq!(v1.requests() + v2.requests(), before, "{who}: an unrouted request reached an app");

    // A second VirtualService on the same Gateway, for split.example: header match...
    for _ in 0..10 {
        let mut req = request(Method::GET, "split.example", "/", Bytes::new()).unwrap();
        req.headers_mut().insert("end-user", "jason".parse().unwrap());
        let r = send_h1(http, req).await.unwrap();
        assert_eq!(r.status, 200, "{who}: {}", r.text());
        assert_eq!(server_of(&r), "productpage-v2", "{who}: header match");
    }
    // ... and a 50/50 split (bounds beyond 5 standard deviations for 200 requests).
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..200 {
        let r = get_h1(http, "split.example", "/").await.unwrap();
        assert_eq!(r.status, 200, "{who}: {}", r.text());
        *counts.entry(server_of(&r)).or_default() += 1;
    }
    let v1_share = counts.get("productpage-v1").copied().unwrap_or(0);
    assert!((65..=135).contains(&v1_share), "{who}: 50/50 split violated: {counts:?}");
    assert_eq!(counts.len(), 2, "{who}: {counts:?}");

    // httpsRedirect: 301 to the same URL over https, routes or not.
    let r = get_h1(redirect, "secure.example", "/orders?id=1").await.unwrap();
    assert_eq!(r.status, 301, "{who}: httpsRedirect: {}", r.text());
    assert_eq!(r.header("location"), Some("https://secure.example/orders?id=1"), "{who}");
    let r = get_h1(redirect, "other.example", "/").await.unwrap();
    assert_eq!(r.status, 404, "{who}: a host the redirecting server does not serve");

    // HTTPS: TLS terminated with the server's certificate files (curl verifies it against
    // our CA, SNI secure.example), then routed; the app learns the original scheme.
    let https = l.https;
    let (status, text) = tokio::task::spawn_blocking({
        let ca = ca.to_path_buf();
        move || curl_https(https, "secure.example", "/productpage", &ca)
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("{who}: curl over TLS failed: {e}"));
    assert_eq!(status, 200, "{who}: {text}");
    let lower = text.to_ascii_lowercase();
    assert!(lower.contains("x-echo-server: productpage-v1"), "{who}: {text}");
    let body: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap_or("")).unwrap();
    assert_eq!(body["headers"]["x-forwarded-proto"], "https", "{who}: the app should see https: {text}");
    // A server name the gateway has no certificate for gets no TLS at all.
    let refused = tokio::task::spawn_blocking({
        let ca = ca.to_path_buf();
        move || curl_https(https, "other.example", "/productpage", &ca)
    })
    .await
    .unwrap();
    assert!(refused.is_err(), "{who}: other.example was served: {refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookinfo_gateway_routes_through_weft_and_envoy_gateways_to_mtls_sidecars() {
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bookinfo-gateway.yaml"), conformance("bookinfo/networking/bookinfo-gateway.yaml"))
        .unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), MESH).unwrap();
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = server_pki(certs.path());
    std::fs::write(dir.path().join("https.yaml"), https_resources(&cert, &key)).unwrap();
    std::fs::write(dir.path().join("tcp.yaml"), TCP_MESH).unwrap();
    let mut identity = IdentityConfig::new(data.path());
    identity.cert_ttl = Duration::from_secs(3600);
    let cp = mesh::control_plane(Some(dir.path()), identity).await;

    let v1 = EchoServer::start("productpage-v1").await;
    let v2 = EchoServer::start("productpage-v2").await;
    let b1 = backend(&cp, "v1", &v1).await;
    let _b2 = backend(&cp, "v2", &v2).await;
    let tcp_app = weft_testkit::echo::TcpEchoServer::start().await;
    let _tcp = tcp_backend(&cp, tcp_app.addr).await;

    let gw = weft_gateway(&cp).await;
    // A gateway has no sidecar listeners, only its servers' (at the mapped ports).
    let l = Listeners {
        http: gw.listener_addr("0.0.0.0_8080", WAIT).await.expect("0.0.0.0_8080 is bound"),
        redirect: gw.listener_addr("0.0.0.0_8081", WAIT).await.expect("0.0.0.0_8081 is bound"),
        https: gw.listener_addr("0.0.0.0_8443", WAIT).await.expect("0.0.0.0_8443 is bound"),
    };
    assert_eq!(l.http.ip().to_string(), "127.0.0.1");
    assert_ne!(l.http.port(), 8080, "WEFT_GATEWAY_PORTS maps 8080 to a free port");
    let names: Vec<String> = gw.listener_addrs().into_keys().collect();
    assert_eq!(
        names,
        ["0.0.0.0_31400", "0.0.0.0_8080", "0.0.0.0_8081", "0.0.0.0_8443"],
        "a gateway gets no sidecar listeners"
    );
    check_gateway(&l, &ca, "weft", &v1, &v2).await;
    check_tcp(gw.listener_addr("0.0.0.0_31400", WAIT).await.unwrap(), "weft").await;

    // The sidecar verified the gateway's certificate: STRICT took the requests, and the
    // peer identity is the gateway's.
    let m = get_h1(b1.metrics_addr(), "m", "/stats/prometheus").await.unwrap().text();
    let line = m
        .lines()
        .find(|l| l.starts_with("istio_requests_total{") && l.contains("reporter=\"destination\""))
        .unwrap_or_else(|| panic!("{m}"));
    let principal = format!("source_principal=\"spiffe://cluster.local/ns/istio-system/sa/{GATEWAY_SA}\"");
    assert!(line.contains(&principal), "{line}");
    assert!(line.contains("connection_security_policy=\"mutual_tls\""), "{line}");
    // The gateway reports as the source, as its workload, with the service's FQDN and
    // the identity the sidecar's certificate proved.
    let m = get_h1(gw.metrics_addr(), "m", "/stats/prometheus").await.unwrap().text();
    let line = m
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("response_code=\"200\"")
                && l.contains("destination_service=\"productpage.default.svc.cluster.local\"")
        })
        .unwrap_or_else(|| panic!("{m}"));
    for label in [
        "reporter=\"source\"",
        "source_workload=\"istio-ingressgateway\"",
        "source_workload_namespace=\"istio-system\"",
        "destination_service_name=\"productpage\"",
        "destination_service_namespace=\"default\"",
        "destination_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-productpage\"",
        "connection_security_policy=\"unknown\"",
    ] {
        assert!(line.contains(label), "{label} in {line}");
    }

    // The same control plane feeds a stock Envoy as the gateway: same answers.
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
    let node = opts
        .gateway_node_info([(8080, 0), (8081, 0), (8443, 0), (31400, 0)].into(), Some("127.0.0.1".parse().unwrap()));
    let envoy = weft_testkit::envoy::Envoy::start(&render_node(&opts, &node)).await.unwrap();
    let l = Listeners {
        http: envoy.listener_addr("0.0.0.0_8080", WAIT).await.unwrap(),
        redirect: envoy.listener_addr("0.0.0.0_8081", WAIT).await.unwrap(),
        https: envoy.listener_addr("0.0.0.0_8443", WAIT).await.unwrap(),
    };
    check_gateway(&l, &ca, "envoy", &v1, &v2).await;
    check_tcp(envoy.listener_addr("0.0.0.0_31400", WAIT).await.unwrap(), "envoy").await;
    let nacks: Vec<String> = cp
        .server
        .connections()
        .into_iter()
        .flat_map(|c| c.types.into_values().filter_map(|t| t.last_nack.map(|n| format!("{n:?}"))))
        .collect();
    assert!(nacks.is_empty(), "NACKs: {nacks:?}\n{}", envoy.log_tail());
    gw.shutdown().await;
}
