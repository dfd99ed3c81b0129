//! AuthorizationPolicy end to end: the translator's inbound listeners (explicit mode)
//! served to a real weft proxy in front of echo apps; clients connect over mutual TLS
//! with SPIFFE certificates (the test puts a client-certificate DownstreamTlsContext on
//! the inbound listeners, as automatic mTLS will), so the proxy knows their principal.
//! Checks Istio's documented behaviour: ALLOW by principal, DENY by method and path,
//! deny-all, allow-nothing, AUDIT not blocking, dry-run recorded but not enforced, TCP
//! denial closing the connection, and the Istio security task samples.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{data_source, transport_socket, DataSource, TransportSocket};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::ValidationContextType, CertificateValidationContext, CommonTlsContext, DownstreamTlsContext,
    TlsCertificate,
};
use envoy_types::pb::google::protobuf::BoolValue;
use envoy_types::util::pack_any;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use weft_control::registry::RegistrySnapshot;
use weft_control::translate::{translate, MeshConfig, ProxyMode};
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::{EchoServer, TcpEchoServer};
use weft_xds::{type_url, AdsServer, NodeInfo, PortInfo, StaticSource};

const WAIT: Duration = Duration::from_secs(30);

/// A CA, the server certificate of the sidecar, and client certificates by principal.
struct Pki {
    ca_pem: String,
    ca: CertifiedIssuer<'static, KeyPair>,
    server: (String, String),
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "authz test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["httpbin.foo".to_string()]).unwrap();
        params.subject_alt_names.push(SanType::URI("spiffe://cluster.local/ns/foo/sa/httpbin".try_into().unwrap()));
        let server = (params.signed_by(&key, &ca).unwrap().pem(), key.serialize_pem());
        Pki { ca_pem: ca.pem(), ca, server }
    }

    /// A client configuration presenting `spiffe://cluster.local/<id>`, or no certificate.
    fn client(&self, id: Option<&str>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let b = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let cfg = match id {
            None => b.with_no_client_auth(),
            Some(id) => {
                let key = KeyPair::generate().unwrap();
                let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
                params.subject_alt_names =
                    vec![SanType::URI(format!("spiffe://cluster.local/{id}").as_str().try_into().unwrap())];
                let cert = params.signed_by(&key, &self.ca).unwrap();
                let chain = vec![CertificateDer::from(cert.der().to_vec())];
                let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
                b.with_client_auth_cert(chain, key).unwrap()
            }
        };
        Arc::new(cfg)
    }

    fn downstream_tls(&self) -> TransportSocket {
        let inline = |s: &str| {
            Some(DataSource { specifier: Some(data_source::Specifier::InlineString(s.into())), ..Default::default() })
        };
        let ctx = DownstreamTlsContext {
            common_tls_context: Some(CommonTlsContext {
                tls_certificates: vec![TlsCertificate {
                    certificate_chain: inline(&self.server.0),
                    private_key: inline(&self.server.1),
                    ..Default::default()
                }],
                validation_context_type: Some(ValidationContextType::ValidationContext(CertificateValidationContext {
                    trusted_ca: inline(&self.ca_pem),
                    ..Default::default()
                })),
                ..Default::default()
            }),
            // Optional, so clients without a certificate reach the RBAC filters unauthenticated.
            require_client_certificate: Some(BoolValue { value: false }),
            ..Default::default()
        };
        TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(ctx))),
        }
    }
}

/// The sidecar of `httpbin` in namespace `foo`: an HTTP port and a TCP port, each an
/// `inbound|PORT` listener from the translator, behind TLS.
struct Sidecar {
    pki: Pki,
    source: Arc<StaticSource>,
    _server: AdsServer,
    _stop: watch::Sender<bool>,
    proxy: ProxyHandle,
    http_port: u16,
    tcp_port: u16,
    http: SocketAddr,
    tcp: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
    _app: EchoServer,
    _tcp_app: TcpEchoServer,
}

fn node(ns: &str, labels: &BTreeMap<String, String>, port: PortInfo) -> NodeInfo {
    NodeInfo {
        id: "httpbin".into(),
        name: "httpbin".into(),
        namespace: ns.into(),
        labels: labels.clone(),
        ports: vec![port],
        inbound: Some("127.0.0.1:0".parse().unwrap()),
        ..NodeInfo::default()
    }
}

impl Sidecar {
    async fn start() -> Sidecar {
        let app = EchoServer::start("httpbin").await;
        let tcp_app = TcpEchoServer::start().await;
        let source = Arc::new(StaticSource::new());
        let server = AdsServer::new(source.clone());
        let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let xds = sock.local_addr().unwrap();
        let (stop, mut rx) = watch::channel(false);
        tokio::spawn(server.clone().serve(sock, async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("access.log");
        let mut sc = Sidecar {
            pki: Pki::new(),
            source,
            _server: server,
            _stop: stop,
            proxy: proxy(xds, &log, false).await,
            http_port: app.addr.port(),
            tcp_port: tcp_app.addr.port(),
            http: "127.0.0.1:0".parse().unwrap(),
            tcp: "127.0.0.1:0".parse().unwrap(),
            log,
            _dir: dir,
            _app: app,
            _tcp_app: tcp_app,
        };
        sc.apply("", "foo", &[("app", "httpbin")]).await;
        sc.http = sc.proxy.listener_addr(&format!("inbound|{}", sc.http_port), WAIT).await.unwrap();
        sc.tcp = sc.proxy.listener_addr(&format!("inbound|{}", sc.tcp_port), WAIT).await.unwrap();
        sc
    }

    /// Translates `yaml` for a workload in `ns` with `labels` and serves the inbound
    /// listeners (TLS added) and clusters; waits until the proxy runs them.
    async fn apply(&self, yaml: &str, ns: &str, labels: &[(&str, &str)]) {
        let parsed = weft_api::parse_str(yaml, Path::new("policies.yaml"));
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let mesh = MeshConfig { resources: parsed.resources, ..MeshConfig::default() };
        let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let reg = RegistrySnapshot::default();
        let (mut listeners, mut clusters) = (Vec::new(), Vec::new());
        for (port, name) in [(self.http_port, "http"), (self.tcp_port, "tcp")] {
            let p = PortInfo { name: name.into(), port, protocol: "TCP".into(), app_protocol: None };
            let out = translate(&mesh, &reg, &node(ns, &labels, p), ProxyMode::Explicit);
            let mut l: Listener = out.listener(&format!("inbound|{port}")).unwrap().clone();
            for c in &mut l.filter_chains {
                c.transport_socket = Some(self.pki.downstream_tls());
            }
            listeners.push(pack_any(l));
            clusters.push(pack_any(out.cluster(&format!("inbound|{port}||")).unwrap().clone()));
        }
        self.source.set(type_url::CLUSTER, clusters).unwrap();
        self.source.set(type_url::LISTENER, listeners).unwrap();
        for t in [type_url::CLUSTER, type_url::LISTENER] {
            let want = self.source.version(t);
            let mut rx = self.proxy.context().store.subscribe();
            let ok = tokio::time::timeout(WAIT, async {
                while self.proxy.context().store.snapshot().versions.get(t) != Some(&want) {
                    let _ = rx.changed().await;
                }
            })
            .await;
            assert!(ok.is_ok(), "proxy did not apply {t} {want}");
        }
    }

    /// One HTTP/1.1 request over mutual TLS as `id` (`ns/foo/sa/sleep`); status and body.
    async fn http(&self, id: Option<&str>, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let mut s = self.tls(id, self.http).await;
        let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        let req = format!("{method} {path} HTTP/1.1\r\nhost: httpbin.foo:8000\r\n{extra}connection: close\r\ncontent-length: 0\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        let text = String::from_utf8_lossy(&buf).to_string();
        let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    }

    /// Sends `ping` over TCP as `id`; the echoed bytes (empty when the proxy closed).
    async fn tcp_echo(&self, id: Option<&str>) -> Vec<u8> {
        let mut s = self.tls(id, self.tcp).await;
        if s.write_all(b"ping").await.is_err() {
            return Vec::new();
        }
        let mut buf = [0u8; 4];
        match tokio::time::timeout(WAIT, s.read_exact(&mut buf)).await {
            Ok(Ok(_)) => buf.to_vec(),
            _ => Vec::new(),
        }
    }

    async fn tls(&self, id: Option<&str>, addr: SocketAddr) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("httpbin.foo").unwrap();
        tokio_rustls::TlsConnector::from(self.pki.client(id)).connect(name, tcp).await.unwrap()
    }

    async fn log_lines(&self) -> Vec<serde_json::Value> {
        self.proxy.context().access_log.flush().await;
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

async fn proxy(xds: SocketAddr, log: &Path, _delta: bool) -> ProxyHandle {
    let text = format!(
        "node:\n  id: httpbin\n  cluster: httpbin.foo\n  name: httpbin\n  namespace: foo\n  labels:\n    app: httpbin\nxds:\n  address: http://{xds}\n  mode: sotw\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"{}\"\ndrain_timeout: 1s\n",
        log.display()
    );
    let b = Bootstrap::parse(&text, Path::new("httpbin.yaml")).unwrap();
    let p = ProxyHandle::start(b).await.unwrap();
    assert!(p.wait_ready(WAIT).await, "weft proxy never became ready");
    p
}

const SLEEP: Option<&str> = Some("ns/foo/sa/sleep");
const OTHER: Option<&str> = Some("ns/bar/sa/other");
const DENIED: (u16, &str) = (403, "RBAC: access denied");

fn policy(name: &str, spec: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: foo}}\nspec:\n{spec}---\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_policies_allow_deny_audit_and_dry_run_as_istio_documents() {
    let sc = Sidecar::start().await;
    // Without policies everything passes.
    assert_eq!(sc.http(OTHER, "GET", "/get", &[]).await.0, 200);

    let policies = [
        policy("allow-sleep", "  selector: {matchLabels: {app: httpbin}}\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]\n"),
        // Scoped to the HTTP port: on a TCP port, Istio drops the HTTP-only fields of a
        // DENY rule and would deny every connection (checked below).
        policy(
            "deny-delete-admin",
            &format!(
                "  action: DENY\n  rules:\n  - to: [{{operation: {{methods: [DELETE], ports: [\"{p}\"]}}}}]\n  - to: [{{operation: {{paths: [/admin*], ports: [\"{p}\"]}}}}]\n",
                p = sc.http_port
            ),
        ),
        policy("audit", "  action: AUDIT\n  rules:\n  - to: [{operation: {paths: [/audit]}}]\n"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: dry-deny-headers\n  namespace: foo\n  annotations: {istio.io/dry-run: \"true\"}\nspec:\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [/headers]}}]\n".into(),
    ]
    .concat();
    sc.apply(&policies, "foo", &[("app", "httpbin")]).await;

    // ALLOW by principal: sleep passes; another principal and a client without a
    // certificate are denied with Envoy's 403.
    assert_eq!(sc.http(SLEEP, "GET", "/get", &[]).await.0, 200);
    let (status, body) = sc.http(OTHER, "GET", "/get", &[]).await;
    assert_eq!((status, body.as_str()), DENIED);
    assert_eq!(sc.http(None, "GET", "/get", &[]).await.0, 403);
    // DENY by method and by path wins over ALLOW.
    assert_eq!(sc.http(SLEEP, "DELETE", "/get", &[]).await.0, 403);
    assert_eq!(sc.http(SLEEP, "GET", "/admin/users", &[]).await.0, 403);
    assert_eq!(sc.http(SLEEP, "POST", "/post", &[]).await.0, 200);
    // AUDIT never blocks; the access log carries the hint.
    assert_eq!(sc.http(SLEEP, "GET", "/audit", &[]).await.0, 200);
    // The dry-run DENY is recorded, not enforced.
    assert_eq!(sc.http(SLEEP, "GET", "/headers", &[]).await.0, 200);

    let lines = sc.log_lines().await;
    let line = |path: &str| {
        lines
            .iter()
            .rev()
            .find(|l| l["path"] == path)
            .cloned()
            .unwrap_or_else(|| panic!("no log line for {path}: {lines:?}"))
    };
    let audit = line("/audit");
    assert_eq!(audit["rbac"]["access_log_hint"], "true", "{audit}");
    let dry = line("/headers");
    assert_eq!(dry["response_code"], 200);
    assert_eq!(dry["rbac"]["istio_dry_run_deny_shadow_engine_result"], "denied", "{dry}");
    assert_eq!(
        dry["rbac"]["istio_dry_run_deny_shadow_effective_policy_id"],
        "ns[foo]-policy[dry-deny-headers]-rule[0]"
    );
    let denied = line("/admin/users");
    assert_eq!(denied["response_flags"], "-", "Envoy's RBAC filter sets no response flag");
    assert_eq!(
        denied["response_code_details"],
        "rbac_access_denied_matched_policy[ns[foo]-policy[deny-delete-admin]-rule[1]]"
    );
    let metrics = sc.proxy.context().metrics.encode();
    let stat = format!("stat_prefix=\"inbound|{}\"", sc.http_port);
    let has = |name: &str, extra: &str| {
        metrics.lines().any(|l| l.starts_with(name) && l.contains(&stat) && l.contains(extra) && !l.ends_with(" 0"))
    };
    assert!(has("weft_rbac_shadow_denied_total", "istio_dry_run_deny_"), "{metrics}");
    assert!(has("weft_rbac_shadow_allowed_total", "istio_dry_run_deny_"), "{metrics}");
    assert!(has("weft_rbac_denied_total", "action=\"DENY\""), "{metrics}");
    assert!(has("weft_rbac_denied_total", "action=\"ALLOW\""), "{metrics}");
    assert!(has("weft_rbac_logged_total", "action=\"LOG\""), "{metrics}");
    assert!(
        metrics.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("response_code=\"403\"")
            && l.contains("response_flags=\"-\"")),
        "denials are reported in istio_requests_total as 403 without a flag: {metrics}"
    );

    // TCP port: ALLOW by principal; others' connections are closed without reaching the app.
    assert_eq!(sc.tcp_echo(SLEEP).await, b"ping");
    assert_eq!(sc.tcp_echo(OTHER).await, b"");
    assert_eq!(sc.tcp_echo(None).await, b"");

    // Deny all: a DENY policy whose one rule is empty matches everything.
    sc.apply(&policy("deny-all", "  action: DENY\n  rules: [{}]\n"), "foo", &[("app", "httpbin")]).await;
    assert_eq!(sc.http(SLEEP, "GET", "/get", &[]).await.0, 403);
    assert_eq!(sc.tcp_echo(SLEEP).await, b"");
    // Allow nothing: an ALLOW policy without rules.
    sc.apply(&policy("allow-nothing", "  {}\n"), "foo", &[("app", "httpbin")]).await;
    assert_eq!(sc.http(SLEEP, "GET", "/get", &[]).await.0, 403);
    assert_eq!(sc.tcp_echo(SLEEP).await, b"");
    // Allow all: rules: [{}].
    sc.apply(
        &[policy("allow-nothing", "  {}\n"), policy("allow-all", "  rules: [{}]\n")].concat(),
        "foo",
        &[("app", "httpbin")],
    )
    .await;
    assert_eq!(sc.http(OTHER, "GET", "/get", &[]).await.0, 200);
    assert_eq!(sc.tcp_echo(None).await, b"ping");
    // A DENY policy with HTTP-only fields still denies on TCP (wider); an ALLOW policy
    // with only HTTP-only fields allows nothing on TCP.
    sc.apply(&policy("deny-get", "  action: DENY\n  rules: [{to: [{operation: {methods: [GET]}}]}]\n"), "foo", &[])
        .await;
    assert_eq!(sc.http(SLEEP, "POST", "/post", &[]).await.0, 200);
    assert_eq!(sc.tcp_echo(SLEEP).await, b"");
    sc.apply(&policy("allow-get", "  rules: [{to: [{operation: {methods: [GET]}}]}]\n"), "foo", &[]).await;
    assert_eq!(sc.http(SLEEP, "GET", "/get", &[]).await.0, 200);
    assert_eq!(sc.tcp_echo(SLEEP).await, b"");
}

/// The AuthorizationPolicy samples of Istio's security tasks, with the behaviour each
/// task documents (all expressible with principals, methods, paths and headers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_security_task_samples_behave_as_the_tasks_document() {
    let read = |f: &str| weft_testkit::conformance(&format!("tasks/security/{f}"));
    let sc = Sidecar::start().await;
    let httpbin = [("app", "httpbin")];

    // Authorization on HTTP traffic (bookinfo, namespace default).
    sc.apply(&read("authz-http-deny-all.yaml"), "default", &[("app", "productpage")]).await;
    assert_eq!(sc.http(SLEEP, "GET", "/productpage", &[]).await.0, 403);
    let viewer = format!("{}---\n{}", read("authz-http-deny-all.yaml"), read("authz-http-productpage-viewer.yaml"));
    sc.apply(&viewer, "default", &[("app", "productpage")]).await;
    assert_eq!(sc.http(None, "GET", "/productpage", &[]).await.0, 200);
    assert_eq!(sc.http(None, "POST", "/productpage", &[]).await.0, 403);
    for (file, app, client) in [
        ("authz-http-details-viewer.yaml", "details", "ns/default/sa/bookinfo-productpage"),
        ("authz-http-reviews-viewer.yaml", "reviews", "ns/default/sa/bookinfo-productpage"),
        ("authz-http-ratings-viewer.yaml", "ratings", "ns/default/sa/bookinfo-reviews"),
    ] {
        let yaml = format!("{}---\n{}", read("authz-http-deny-all.yaml"), read(file));
        sc.apply(&yaml, "default", &[("app", app)]).await;
        assert_eq!(sc.http(Some(client), "GET", "/x", &[]).await.0, 200, "{file}: {client} may GET");
        assert_eq!(sc.http(Some(client), "POST", "/x", &[]).await.0, 403, "{file}: only GET");
        assert_eq!(sc.http(SLEEP, "GET", "/x", &[]).await.0, 403, "{file}: other principals denied");
    }

    // Explicit deny (namespace foo, httpbin).
    sc.apply(&read("authz-deny-method-get.yaml"), "foo", &httpbin).await;
    assert_eq!(sc.http(SLEEP, "GET", "/get", &[]).await.0, 403);
    assert_eq!(sc.http(SLEEP, "POST", "/post", &[]).await.0, 200);
    sc.apply(&read("authz-deny-method-get-unless-x-token-admin.yaml"), "foo", &httpbin).await;
    assert_eq!(sc.http(SLEEP, "GET", "/get", &[("x-token", "admin")]).await.0, 200);
    assert_eq!(sc.http(SLEEP, "GET", "/get", &[("x-token", "guest")]).await.0, 403);
    let allow_ip = format!(
        "{}---\n{}",
        read("authz-deny-method-get-unless-x-token-admin.yaml"),
        read("authz-deny-allow-path-ip.yaml")
    );
    sc.apply(&allow_ip, "foo", &httpbin).await;
    assert_eq!(sc.http(SLEEP, "GET", "/ip", &[("x-token", "admin")]).await.0, 200);
    assert_eq!(sc.http(SLEEP, "GET", "/headers", &[("x-token", "admin")]).await.0, 403);

    // Dry run (the sample has no namespace: `default`).
    sc.apply(&read("authz-dry-run-deny-path-headers.yaml"), "default", &httpbin).await;
    assert_eq!(sc.http(SLEEP, "GET", "/headers", &[]).await.0, 200);
    let lines = sc.log_lines().await;
    let last = lines.iter().rev().find(|l| l["path"] == "/headers").unwrap();
    assert_eq!(last["rbac"]["istio_dry_run_deny_shadow_engine_result"], "denied", "{last}");
}

/// Every AuthorizationPolicy field, as one mesh.
const ALL_FIELDS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: all-fields, namespace: foo}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/foo/sa/sleep", "cluster.local/ns/a/*", "*/sa/x", "*"]
        notPrincipals: ["cluster.local/ns/foo/sa/bad"]
        requestPrincipals: ["https://iss/sub", "*"]
        notRequestPrincipals: ["https://iss/bad"]
        namespaces: ["foo", "dev-*"]
        notNamespaces: ["prod"]
        ipBlocks: ["10.0.0.0/8", "127.0.0.1"]
        notIpBlocks: ["10.9.0.0/16"]
        remoteIpBlocks: ["1.2.3.4"]
        notRemoteIpBlocks: ["::1/128"]
    to:
    - operation:
        hosts: ["httpbin.foo", "*.example.com", "api.*", "admin.foo:8000", "*"]
        notHosts: ["evil.com"]
        ports: ["8000"]
        notPorts: ["9000"]
        methods: ["GET", "HEAD"]
        notMethods: ["DELETE"]
        paths: ["/ip", "/api/*", "*/info", "*", "/v1/{*}/items/{**}"]
        notPaths: ["/admin"]
    when:
    - {key: "request.headers[x-token]", values: ["admin", "ops-*", "*-x", "*"], notValues: ["guest"]}
    - {key: source.ip, values: ["10.1.0.0/16"]}
    - {key: remote.ip, notValues: ["9.9.9.9"]}
    - {key: source.namespace, values: [foo]}
    - {key: source.principal, values: ["cluster.local/ns/foo/sa/sleep"]}
    - {key: destination.port, values: ["8000"]}
    - {key: destination.ip, values: ["10.0.0.7"]}
    - {key: connection.sni, values: ["*.foo.svc"]}
    - {key: request.auth.principal, values: ["iss/sub"]}
    - {key: request.auth.audiences, values: ["aud"]}
    - {key: request.auth.presenter, values: ["azp"]}
    - {key: "request.auth.claims[groups]", values: ["dev"]}
    - {key: "request.auth.claims[nested][key]", values: ["v*"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: foo}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: foo}
spec:
  action: AUDIT
  rules: [{to: [{operation: {paths: ["/audit"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: dry-allow
  namespace: foo
  annotations: {istio.io/dry-run: "true"}
spec:
  rules: [{from: [{source: {namespaces: [foo]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: foo}
spec:
  rules: [{}]
"#;

/// The translated RBAC filters (every field, explicit and transparent style) are ACKed
/// by Envoy 1.40 and by weft; both deny the same request with Envoy's 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_weft_accept_the_translated_rbac_and_deny_alike() {
    let app = EchoServer::start("httpbin").await;
    let tcp_app = TcpEchoServer::start().await;
    let parsed = weft_api::parse_str(ALL_FIELDS, Path::new("all.yaml"));
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let mesh = MeshConfig { resources: parsed.resources, ..MeshConfig::default() };
    let reg = RegistrySnapshot::default();
    let labels = BTreeMap::from([("app".to_string(), "httpbin".to_string())]);
    let (mut listeners, mut clusters) = (Vec::new(), Vec::new());
    for (port, name) in [(app.addr.port(), "http"), (tcp_app.addr.port(), "tcp")] {
        let p = PortInfo { name: name.into(), port, protocol: "TCP".into(), app_protocol: None };
        let n = node("foo", &labels, p);
        let out = translate(&mesh, &reg, &n, ProxyMode::Explicit);
        let l = out.listener(&format!("inbound|{port}")).unwrap().clone();
        // Also the transparent-mode form (ports left to the proxy) on a copy of the TCP listener.
        let view = weft_control::translate::model::MeshView::new(&mesh, &reg, &n);
        let dynamic = weft_control::translate::authz::InboundAuthz::new(&view, None);
        let mut l2 = l.clone();
        l2.name = format!("{}-dynamic", l.name);
        for c in &mut l2.filter_chains {
            c.filters.retain(|f| !f.name.ends_with(".rbac"));
            if name == "tcp" {
                dynamic.apply_tcp(&mut c.filters);
            }
        }
        listeners.push(pack_any(l));
        if name == "tcp" {
            listeners.push(pack_any(l2));
        }
        clusters.push(pack_any(out.cluster(&format!("inbound|{port}||")).unwrap().clone()));
    }
    let source = Arc::new(StaticSource::new());
    let server = AdsServer::new(source.clone());
    source.set(type_url::CLUSTER, clusters).unwrap();
    source.set(type_url::LISTENER, listeners).unwrap();
    let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let xds = sock.local_addr().unwrap();
    let (_stop, mut rx) = watch::channel(false);
    tokio::spawn(server.clone().serve(sock, async move {
        let _ = rx.wait_for(|s| *s).await;
    }));

    let envoy = weft_testkit::envoy::Envoy::start(&weft_testkit::envoy::ads_bootstrap(xds, "envoy-sidecar", false))
        .await
        .unwrap();
    let mut changes = server.status_changes();
    let acked = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(c) = server.connections().iter().find(|c| c.node_id == "envoy-sidecar") {
                for (t, s) in &c.types {
                    assert!(s.last_nack.is_none(), "Envoy NACKed {t}: {:?}", s.last_nack);
                }
                if [type_url::LISTENER, type_url::CLUSTER]
                    .iter()
                    .all(|t| c.types.get(*t).and_then(|s| s.acked_version.clone()) == Some(source.version(t)))
                {
                    return;
                }
            }
            let _ = changes.changed().await;
        }
    })
    .await;
    assert!(acked.is_ok(), "Envoy did not ACK: {:?}\n{}", server.connections(), envoy.log_tail());

    let dir = tempfile::tempdir().unwrap();
    let weft = proxy(xds, &dir.path().join("a.log"), false).await;
    let http_listener = format!("inbound|{}", app.addr.port());
    let weft_addr = weft.listener_addr(&http_listener, WAIT).await.unwrap();
    let envoy_addr = envoy.listener_addr(&http_listener, WAIT).await.unwrap();
    for (who, addr) in [("weft", weft_addr), ("envoy", envoy_addr)] {
        let r = weft_testkit::http::get_h1(addr, "httpbin.foo", "/admin/x").await.unwrap();
        assert_eq!((r.status.as_u16(), r.text()), (403, "RBAC: access denied".to_string()), "{who}");
        let r = weft_testkit::http::get_h1(addr, "httpbin.foo", "/ip").await.unwrap();
        assert_eq!(r.status.as_u16(), 200, "{who}: {}", r.text());
    }
}
