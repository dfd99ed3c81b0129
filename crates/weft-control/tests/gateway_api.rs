//! The Kubernetes Gateway API end to end: the Gateway API project's own manifests
//! (`tests/data/gateway-api/`: conformance routes and the http-routing guide's example,
//! unchanged) in the watched directory of a control plane, the conformance suite's base
//! objects and backends added by this test (echo servers behind WorkloadEntries), and
//! requests through a weft gateway and a stock Envoy gateway fed by the same control plane:
//! matches, header modifiers, rewrites, redirects, mirrors, timeouts, weights, then a
//! GAMMA route (a Service parent) on a weft sidecar; status conditions read from the API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mesh;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use serde_json::Value;
use weft_control::control::ControlPlane;
use weft_control::envoy_bootstrap::{render_node, EnvoyBootstrapOptions};
use weft_control::identity::IdentityConfig;
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::{EchoServer, DELAY_HEADER, SERVER_HEADER};
use weft_testkit::http::{get_via_proxy, request, send_h1, Reply};
use weft_testkit::net::reserve_addr;

const WAIT: Duration = Duration::from_secs(30);
const GATEWAY_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/gateway-api").join(rel)
}

/// The conformance suite's base objects (its `same-namespace` Gateway of class `istio`,
/// the backends' Services), the example's GatewayClass and Services, two routes that must
/// be refused (another namespace; a backend across namespaces without a grant), and
/// WorkloadEntries putting the echo servers behind the Services.
fn infra(backends: &BTreeMap<&str, (&str, &EchoServer)>, tcp_echo: SocketAddr) -> String {
    let out = String::from(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: same-namespace, namespace: gateway-conformance-infra}
spec:
  gatewayClassName: istio
  listeners:
  - name: http
    port: 80
    protocol: HTTP
    allowedRoutes: {namespaces: {from: Same}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: example-gateway-class}
spec: {controllerName: istio.io/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: my-tcp-gateway-class}
spec: {controllerName: istio.io/gateway-controller}
---
apiVersion: v1
kind: Service
metadata: {name: my-foo-service, namespace: default}
spec: {selector: {app: my-foo-service}, ports: [{name: tcp, port: 6000}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: my-foo-service, namespace: default}
spec: {address: 127.0.0.1, labels: {app: my-foo-service}, ports: {tcp: TCP_ECHO_PORT}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: unserved, namespace: default}
spec:
  gatewayClassName: someone-else
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: from-elsewhere, namespace: gateway-conformance-web-backend}
spec:
  parentRefs: [{name: same-namespace, namespace: gateway-conformance-infra}]
  rules: [{backendRefs: [{name: web-backend, port: 8080}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: across-namespaces, namespace: default}
spec:
  parentRefs: [{name: example-gateway}]
  hostnames: [across.example.com]
  rules: [{backendRefs: [{name: infra-backend-v1, namespace: gateway-conformance-infra, port: 8080}]}]
"#,
    );
    let mut out = out.replace("TCP_ECHO_PORT", &tcp_echo.port().to_string());
    for (svc, (ns, app)) in backends {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: {ns}}}\nspec:\n  selector: {{app: {svc}}}\n  ports: [{{name: http, port: {port}}}]\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {svc}, namespace: {ns}}}\nspec:\n  address: 127.0.0.1\n  labels: {{app: {svc}}}\n  ports: {{http: {echo}}}\n",
            port = if *svc == "echo" { 80 } else { 8080 },
            echo = app.addr.port(),
        ));
    }
    out
}

async fn start_proxy(text: &str) -> ProxyHandle {
    let b = Bootstrap::parse(text, Path::new("proxy.yaml")).unwrap();
    let p = ProxyHandle::start(b).await.unwrap();
    assert!(p.wait_ready(WAIT).await, "proxy never became ready:\n{text}");
    p
}

/// A weft proxy as the gateway Istio would deploy for Gateway `name` (`<name>-istio`,
/// labelled with the gateway's name), server port 80 on a free port.
async fn weft_gateway(cp: &ControlPlane, ns: &str, name: &str, port: u16) -> ProxyHandle {
    let token = mesh::join_token(cp, ns, &format!("{name}-istio")).await;
    let text = format!(
        "node:\n  id: router~127.0.0.1~{name}-istio-1.{ns}~{ns}.svc.cluster.local\n  name: {name}-istio-1\n  workload_name: {name}-istio\n  namespace: {ns}\n  service_account: {name}-istio\n  labels: {{\"{GATEWAY_LABEL}\": {name}}}\n  gateway_ports: {{{port}: 0}}\n  gateway_address: 127.0.0.1\nxds:\n  address: http://{}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\ndrain_timeout: 1s\nidentity:\n  token: \"{token}\"\n",
        cp.xds_addr,
    );
    start_proxy(&text).await
}

/// A stock Envoy as the same gateway.
async fn envoy_gateway(cp: &ControlPlane, ns: &str, name: &str, port: u16) -> weft_testkit::envoy::Envoy {
    let sa = format!("{name}-istio");
    let opts = EnvoyBootstrapOptions {
        name: format!("{name}-istio-envoy"),
        namespace: ns.into(),
        labels: [(GATEWAY_LABEL.to_string(), name.to_string())].into(),
        service_account: sa.clone(),
        ports: Vec::new(),
        instance_ip: "127.0.0.1".parse().unwrap(),
        xds: cp.xds_addr,
        admin_port: 0,
        cluster_id: "Kubernetes".into(),
        delta: false,
        inbound: None,
        outbound: None,
        join_token: Some(mesh::join_token(cp, ns, &sa).await),
    };
    let node = opts.gateway_node_info([(port, 0)].into(), Some("127.0.0.1".parse().unwrap()));
    weft_testkit::envoy::Envoy::start(&render_node(&opts, &node)).await.unwrap()
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

async fn send(addr: SocketAddr, method: Method, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = request(method, host, path, Bytes::new()).unwrap();
    for (k, v) in headers {
        req.headers_mut().append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    send_h1(addr, req).await.unwrap()
}

async fn get(addr: SocketAddr, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    send(addr, Method::GET, host, path, headers).await
}

fn server(r: &Reply) -> String {
    r.header(SERVER_HEADER).unwrap_or("<none>").to_string()
}

/// The header `name` the app received (values joined by `,`), if any.
fn seen(r: &Reply, name: &str) -> Option<String> {
    r.json().ok()?["headers"][name].as_str().map(str::to_string)
}

fn path_seen(r: &Reply) -> String {
    r.json().map(|j| j["path"].as_str().unwrap_or_default().to_string()).unwrap_or_default()
}

/// `GET /api/v1/resources` of one object: its status.
async fn status(cp: &ControlPlane, kind: &str, name: &str) -> Value {
    let req = mesh::admin(
        cp,
        request(Method::GET, "weft", &format!("/api/v1/resources?kind={kind}&name={name}"), Bytes::new()).unwrap(),
    );
    let r = send_h1(cp.api_addr, req).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json().unwrap()["items"][0]["status"].clone()
}

/// The condition `kind` of a conditions list: (status, reason).
fn condition(conditions: &Value, kind: &str) -> (String, String) {
    let c = conditions.as_array().into_iter().flatten().find(|c| c["type"] == kind).cloned().unwrap_or_default();
    (c["status"].as_str().unwrap_or("-").to_string(), c["reason"].as_str().unwrap_or("-").to_string())
}

fn yes(reason: &str) -> (String, String) {
    ("True".into(), reason.into())
}

fn no(reason: &str) -> (String, String) {
    ("False".into(), reason.into())
}

/// Conformance: RequestHeaderModifier, URLRewrite (with header edits), RequestRedirect,
/// RequestMirror, backendRequest timeouts and method matches, on the `same-namespace`
/// Gateway (any host).
async fn check_conformance(gw: SocketAddr, who: &str, apps: &Apps) {
    let h = "conformance.example";
    // RequestHeaderModifier.
    let r = get(gw, h, "/set", &[("X-Header-Set", "some-other-value")]).await;
    assert_eq!(r.status, 200, "{who}: {}", r.text());
    assert_eq!(server(&r), "infra-backend-v1", "{who}");
    assert_eq!(seen(&r, "x-header-set").as_deref(), Some("set-overwrites-values"), "{who}: set overwrites");
    let r = get(gw, h, "/add", &[("X-Header-Add", "some-other-value")]).await;
    assert_eq!(seen(&r, "x-header-add").as_deref(), Some("some-other-value,add-appends-values"), "{who}: add appends");
    let r = get(gw, h, "/remove", &[("X-Header-Remove", "val")]).await;
    assert_eq!(seen(&r, "x-header-remove"), None, "{who}: remove removes");
    let r =
        get(gw, h, "/multiple", &[("X-Header-Set-2", "x"), ("X-Header-Remove-1", "y"), ("X-Header-Add-3", "z")]).await;
    assert_eq!(seen(&r, "x-header-set-1").as_deref(), Some("header-set-1"), "{who}");
    assert_eq!(seen(&r, "x-header-set-2").as_deref(), Some("header-set-2"), "{who}");
    assert_eq!(seen(&r, "x-header-add-3").as_deref(), Some("z,header-add-3"), "{who}");
    assert_eq!(seen(&r, "x-header-remove-1"), None, "{who}");
    // URLRewrite: prefixes replaced segment-wise, full paths replaced, query kept.
    for (from, to) in [
        ("/prefix/one/two", "/one/two"),
        ("/prefix/one", "/one"),
        ("/strip-prefix/three", "/three"),
        ("/strip-prefix", "/"),
        ("/full/one/two", "/one"),
        ("/full/one?q=1", "/one?q=1"),
        ("/full/rewrite-path-and-modify-headers/x", "/test"),
        ("/prefix/rewrite-path-and-modify-headers/one", "/prefix/one"),
    ] {
        let r = get(gw, h, from, &[("X-Header-Remove", "gone"), ("X-Header-Add", "kept")]).await;
        assert_eq!(r.status, 200, "{who}: {from}: {}", r.text());
        assert_eq!(path_seen(&r), to, "{who}: {from}");
        if from.contains("modify-headers") {
            assert_eq!(seen(&r, "x-header-set").as_deref(), Some("set-overwrites-values"), "{who}: {from}");
            assert_eq!(seen(&r, "x-header-add").as_deref(), Some("kept,header-val-1"), "{who}: {from}");
            assert_eq!(seen(&r, "x-header-remove"), None, "{who}: {from}");
        }
    }
    // PathPrefix matches whole segments: /prefix/onetwo is not under /prefix/one.
    let r = get(gw, h, "/prefix/onetwo", &[]).await;
    assert_ne!(path_seen(&r), "/onetwo", "{who}: /prefix/onetwo must not be rewritten as /prefix/one");
    // RequestRedirect: 302 by default, the status asked for otherwise.
    for (from, code, location) in [
        ("/original-prefix/lemon", 302, "/replacement-prefix/lemon"),
        ("/original-prefix", 302, "/replacement-prefix"),
        ("/full/path/original", 302, "/full-path-replacement"),
        ("/path-and-host", 302, "http://example.org/replacement-prefix"),
        ("/path-and-status", 301, "/replacement-prefix"),
        ("/full-path-and-host", 302, "http://example.org/replacement-full"),
        ("/full-path-and-status", 301, "/replacement-full"),
    ] {
        let r = get(gw, h, from, &[]).await;
        assert_eq!(r.status, code, "{who}: {from}: {}", r.text());
        let got = r.header("location").unwrap_or_default().to_string();
        let ok = if location.starts_with("http://") {
            got == location
        } else {
            got == location || got.ends_with(&format!("{h}{location}")) || got.ends_with(&format!(":80{location}"))
        };
        assert!(ok, "{who}: {from}: location {got:?}, want {location:?}");
    }
    // RequestMirror: the answer is v1's, and a copy reaches mirrored-backend.
    let before = apps.mirrored.requests();
    let r = get(gw, h, "/mirror", &[]).await;
    assert_eq!((r.status.as_u16(), server(&r)), (200, "infra-backend-v1".to_string()), "{who}");
    eventually(&format!("{who}: the mirror receives a copy"), || async { apps.mirrored.requests() > before }).await;
    // Timeouts: backendRequest 500ms ends a 2s answer with 504; "0s" waits.
    let r = get(gw, h, "/backend-timeout", &[(DELAY_HEADER, "2000")]).await;
    assert_eq!(r.status, 504, "{who}: backendRequest 500ms: {}", r.text());
    let r = get(gw, h, "/disabled-backend-timeout", &[(DELAY_HEADER, "1000")]).await;
    assert_eq!(r.status, 200, "{who}: backendRequest 0s: {}", r.text());
    // Method matches (precedence: a method match beats none at the same path).
    let r = send(gw, Method::POST, h, "/", &[]).await;
    assert_eq!(server(&r), "infra-backend-v1", "{who}: POST");
    let r = get(gw, h, "/", &[]).await;
    assert_eq!(server(&r), "infra-backend-v2", "{who}: GET");
}

/// The http-routing guide: hosts, a prefix and a header match on `example-gateway`;
/// the guide's `example-svc` does not exist (500); a backend in another namespace without
/// a ReferenceGrant is refused (500).
async fn check_example(gw: SocketAddr, who: &str) {
    for path in ["/login", "/login/user", "/login?next=/"] {
        let r = get(gw, "foo.example.com", path, &[]).await;
        assert_eq!((r.status.as_u16(), server(&r)), (200, "foo-svc".to_string()), "{who}: {path}: {}", r.text());
    }
    for path in ["/loginx", "/", "/other"] {
        assert_eq!(get(gw, "foo.example.com", path, &[]).await.status, 404, "{who}: {path}");
    }
    let r = get(gw, "bar.example.com", "/any", &[("env", "canary")]).await;
    assert_eq!(server(&r), "bar-svc-canary", "{who}");
    let r = get(gw, "bar.example.com", "/any", &[("env", "prod")]).await;
    assert_eq!(server(&r), "bar-svc", "{who}");
    assert_eq!(get(gw, "example.com", "/", &[]).await.status, 500, "{who}: a missing backend answers 500");
    assert_eq!(get(gw, "across.example.com", "/", &[]).await.status, 500, "{who}: an ungranted backend answers 500");
    assert_eq!(get(gw, "unknown.example.com", "/", &[]).await.status, 404, "{who}: no route for the host");
}

/// Weights 70/30/0 (statistically: bounds 6 standard deviations wide for 400 requests)
/// and ResponseHeaderModifier, the second set of conformance routes.
async fn check_weights_and_response_headers(gw: SocketAddr, who: &str) {
    let h = "conformance.example";
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..400 {
        let r = get(gw, h, "/weights", &[]).await;
        assert_eq!(r.status, 200, "{who}: {}", r.text());
        *counts.entry(server(&r)).or_default() += 1;
    }
    let v1 = counts.get("infra-backend-v1").copied().unwrap_or(0);
    assert!((235..=325).contains(&v1), "{who}: 70/30 split violated: {counts:?}");
    assert_eq!(counts.get("infra-backend-v3"), None, "{who}: weight 0 gets nothing: {counts:?}");
    let r = get(gw, h, "/set", &[]).await;
    assert_eq!(r.header("x-header-set"), Some("set-overwrites-values"), "{who}: response set");
    let r = get(gw, h, "/add", &[]).await;
    assert_eq!(r.header("x-header-add"), Some("add-appends-values"), "{who}: response add");
    let r = get(gw, h, "/multiple", &[]).await;
    assert_eq!(r.header("x-header-set-2"), Some("header-set-2"), "{who}");
    assert_eq!(r.header("x-header-add-3"), Some("header-add-3"), "{who}");
    let r = get(gw, h, "/case-insensitivity", &[]).await;
    assert_eq!(r.header("x-header-set"), Some("header-set"), "{who}");
}

struct Apps {
    mirrored: EchoServer,
    /// The backends in the order of their names; the mesh's `echo` last.
    all: Vec<EchoServer>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_manifests_behave_as_specified_through_weft_and_envoy_gateways() {
    let data_dir = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let names = [
        ("infra-backend-v1", "gateway-conformance-infra"),
        ("infra-backend-v2", "gateway-conformance-infra"),
        ("infra-backend-v3", "gateway-conformance-infra"),
        ("web-backend", "gateway-conformance-web-backend"),
        ("foo-svc", "default"),
        ("bar-svc", "default"),
        ("bar-svc-canary", "default"),
        ("echo", "gateway-conformance-mesh"),
    ];
    let mut servers = Vec::new();
    for (n, _) in names {
        servers.push(EchoServer::start(n).await);
    }
    let mirrored = EchoServer::start("mirrored-backend").await;
    let mut backends: BTreeMap<&str, (&str, &EchoServer)> =
        names.iter().zip(&servers).map(|((n, ns), s)| (*n, (*ns, s))).collect();
    backends.insert("mirrored-backend", ("gateway-conformance-infra", &mirrored));
    let tcp_echo = weft_testkit::echo::TcpEchoServer::start().await;
    std::fs::write(dir.path().join("infra.yaml"), infra(&backends, tcp_echo.addr)).unwrap();
    let conformance = [
        "httproute-request-header-modifier.yaml",
        "httproute-rewrite-path.yaml",
        "httproute-redirect-path.yaml",
        "httproute-request-mirror.yaml",
        "httproute-timeout-backend-request.yaml",
        "httproute-method-matching.yaml",
    ];
    for f in conformance {
        std::fs::copy(data(&format!("conformance/{f}")), dir.path().join(f)).unwrap();
    }
    for f in ["gateway.yaml", "foo-httproute.yaml", "bar-httproute.yaml"] {
        std::fs::copy(data(&format!("examples/http-routing/{f}")), dir.path().join(format!("example-{f}"))).unwrap();
    }
    for f in ["gateway.yaml", "tcp-route.yaml"] {
        std::fs::copy(data(&format!("examples/tcp-routing/{f}")), dir.path().join(format!("tcp-{f}"))).unwrap();
    }
    std::fs::copy(data("mesh/httproute-redirect-path.yaml"), dir.path().join("mesh-redirect.yaml")).unwrap();
    let mut identity = IdentityConfig::new(data_dir.path());
    identity.cert_ttl = Duration::from_secs(3600);
    let cp = mesh::control_plane(Some(dir.path()), identity).await;
    let apps = Apps { mirrored, all: servers };

    // Status before any gateway proxy: accepted, not programmed.
    let st = status(&cp, "gtw", "same-namespace").await;
    assert_eq!(condition(&st["conditions"], "Accepted"), yes("Accepted"), "{st:#}");
    assert_eq!(condition(&st["conditions"], "Programmed"), no("AddressNotAssigned"), "{st:#}");

    let infra_gw = weft_gateway(&cp, "gateway-conformance-infra", "same-namespace", 80).await;
    let example_gw = weft_gateway(&cp, "default", "example-gateway", 80).await;
    let infra_addr = infra_gw.listener_addr("0.0.0.0_80", WAIT).await.expect("the conformance gateway listens");
    let example_addr = example_gw.listener_addr("0.0.0.0_80", WAIT).await.expect("the example gateway listens");
    eventually("the conformance routes on the weft gateway", || async {
        get(infra_addr, "conformance.example", "/method", &[]).await.status == 200
    })
    .await;
    check_conformance(infra_addr, "weft", &apps).await;
    check_example(example_addr, "weft").await;

    let envoy_infra = envoy_gateway(&cp, "gateway-conformance-infra", "same-namespace", 80).await;
    let envoy_example = envoy_gateway(&cp, "default", "example-gateway", 80).await;
    let e_infra = envoy_infra.listener_addr("0.0.0.0_80", WAIT).await.unwrap();
    let e_example = envoy_example.listener_addr("0.0.0.0_80", WAIT).await.unwrap();
    eventually("the conformance routes on the Envoy gateway", || async {
        get(e_infra, "conformance.example", "/method", &[]).await.status == 200
    })
    .await;
    check_conformance(e_infra, "envoy", &apps).await;
    check_example(e_example, "envoy").await;

    // The tcp-routing example: a TCPRoute on the TCP listener, through both gateways.
    let tcp_gw = weft_gateway(&cp, "default", "my-tcp-gateway", 8080).await;
    let envoy_tcp = envoy_gateway(&cp, "default", "my-tcp-gateway", 8080).await;
    for (addr, who) in [
        (tcp_gw.listener_addr("0.0.0.0_8080", WAIT).await.expect("the TCP gateway listens"), "weft"),
        (envoy_tcp.listener_addr("0.0.0.0_8080", WAIT).await.expect("the Envoy TCP gateway listens"), "envoy"),
    ] {
        check_tcp(addr, who).await;
    }
    let st = status(&cp, "tcproute", "tcp-app-1").await;
    assert_eq!(condition(&st["parents"][0]["conditions"], "Accepted"), yes("Accepted"), "{st:#}");

    // Status, as Istio sets it.
    let st = status(&cp, "gtw", "same-namespace").await;
    assert_eq!(condition(&st["conditions"], "Programmed"), yes("Programmed"), "{st:#}");
    let l = &st["listeners"][0];
    assert_eq!(l["attachedRoutes"], 6, "{st:#}");
    assert_eq!(condition(&l["conditions"], "Accepted"), yes("Accepted"), "{st:#}");
    assert_eq!(condition(&l["conditions"], "ResolvedRefs"), yes("ResolvedRefs"), "{st:#}");
    assert_eq!(condition(&l["conditions"], "Conflicted"), no("NoConflicts"), "{st:#}");
    let st = status(&cp, "gtw", "unserved").await;
    assert_eq!(condition(&st["conditions"], "Accepted").0, "Unknown", "{st:#}");
    let st = status(&cp, "gatewayclass", "example-gateway-class").await;
    assert_eq!(condition(&st["conditions"], "Accepted"), yes("Accepted"), "{st:#}");
    for (route, accepted, resolved) in [
        ("foo-route", yes("Accepted"), yes("ResolvedRefs")),
        ("example-route", yes("Accepted"), no("BackendNotFound")),
        ("across-namespaces", yes("Accepted"), no("RefNotPermitted")),
        ("from-elsewhere", no("NotAllowedByListeners"), yes("ResolvedRefs")),
        ("mesh-redirect-path", yes("Accepted"), yes("ResolvedRefs")),
    ] {
        let st = status(&cp, "httproute", route).await;
        let c = &st["parents"][0]["conditions"];
        assert_eq!((condition(c, "Accepted"), condition(c, "ResolvedRefs")), (accepted, resolved), "{route}: {st:#}");
        assert_eq!(st["parents"][0]["controllerName"], "istio.io/gateway-controller");
    }

    // The second set of conformance routes (same names and paths as some of the first).
    for f in ["httproute-request-header-modifier.yaml", "httproute-method-matching.yaml"] {
        std::fs::remove_file(dir.path().join(f)).unwrap();
    }
    // The weight route matches every path: the rest of the first set goes too.
    for f in conformance.iter().skip(1) {
        let _ = std::fs::remove_file(dir.path().join(f));
    }
    for f in ["httproute-weight.yaml", "httproute-response-header-modifier.yaml"] {
        write_renamed(&data(&format!("conformance/{f}")), &dir.path().join(f));
    }
    for (gw, who) in [(infra_addr, "weft"), (e_infra, "envoy")] {
        eventually(&format!("{who}: the response header routes"), || async {
            get(gw, "conformance.example", "/set", &[]).await.header("x-header-set") == Some("set-overwrites-values")
        })
        .await;
        check_weights_and_response_headers(gw, who).await;
    }

    // GAMMA: the mesh redirect route on a weft sidecar calling the `echo` Service.
    let client = sidecar(&cp).await;
    let out = client.listener_addr("weft-outbound", WAIT).await.unwrap();
    let base = "http://echo.gateway-conformance-mesh.svc.cluster.local";
    eventually("the mesh route on the sidecar", || async {
        get_via_proxy(out, &format!("{base}/original-prefix/lemon")).await.is_ok_and(|r| r.status == 302)
    })
    .await;
    for (path, code, location) in [
        ("/original-prefix/lemon", 302, "/replacement-prefix/lemon"),
        ("/full/path/original", 302, "/full-path-replacement"),
        ("/path-and-host", 302, "http://example.org/replacement-prefix"),
        ("/path-and-temporary", 307, "/replacement-prefix"),
        ("/path-and-permanent", 308, "/replacement-prefix"),
        ("/full-path-and-status", 301, "/replacement-full"),
    ] {
        let r = get_via_proxy(out, &format!("{base}{path}")).await.unwrap();
        assert_eq!(r.status, code, "mesh: {path}: {}", r.text());
        let got = r.header("location").unwrap_or_default();
        assert!(got == location || got.ends_with(location), "mesh: {path}: location {got:?}, want {location:?}");
    }
    // The route replaces the Service's routing: a path no rule matches finds no route
    // (404, as with Istio), and the app never sees it.
    let before = apps.all.last().map(EchoServer::requests);
    let r = get_via_proxy(out, &format!("{base}/elsewhere")).await.unwrap();
    assert_eq!(r.status, 404, "mesh: unmatched path: {}", r.text());
    assert_eq!(apps.all.last().map(EchoServer::requests), before);

    let nacks: Vec<String> = cp
        .server
        .connections()
        .into_iter()
        .flat_map(|c| c.types.into_values().filter_map(|t| t.last_nack.map(|n| format!("{n:?}"))))
        .collect();
    assert!(nacks.is_empty(), "NACKs: {nacks:?}\n{}", envoy_infra.log_tail());
    infra_gw.shutdown().await;
    example_gw.shutdown().await;
    tcp_gw.shutdown().await;
}

/// Bytes sent through a TCP listener come back from the echo behind it.
async fn check_tcp(addr: SocketAddr, who: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for msg in [&b"ping through the gateway"[..], b"second connection"] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        let read = tokio::time::timeout(WAIT, s.read_exact(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(_))), "{who}: no echo through the TCP listener: {read:?}");
        assert_eq!(buf, msg, "{who}");
    }
}

/// Writes `from` to `to` through a temporary name, so the directory poll never reads it half-written.
fn write_renamed(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// A weft sidecar in `gateway-conformance-mesh` with no app (a client).
async fn sidecar(cp: &ControlPlane) -> ProxyHandle {
    let ns = "gateway-conformance-mesh";
    let token = mesh::join_token(cp, ns, "client").await;
    let text = format!(
        "node:\n  id: sidecar~127.0.0.1~client-1.{ns}~{ns}.svc.cluster.local\n  name: client-1\n  namespace: {ns}\n  service_account: client\n  labels: {{app: client}}\n  outbound: {}\n  inbound: {}\nxds:\n  address: http://{}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\ndrain_timeout: 1s\nidentity:\n  token: \"{token}\"\n",
        reserve_addr(),
        reserve_addr(),
        cp.xds_addr,
    );
    start_proxy(&text).await
}
