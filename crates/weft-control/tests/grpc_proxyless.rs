//! Proxyless gRPC end to end, modelled on gRPC's own xDS interop cases: a real Python
//! grpcio client (`tests/data/grpc/xds_client.py`, `xds:///` target, bootstrap in
//! `GRPC_XDS_BOOTSTRAP`) resolves a Service through a weft control plane and calls
//! grpcio echo servers (`tests/data/grpc/echo_server.py`) registered as WorkloadEntries:
//! ping-pong, round robin, traffic splitting, path and header matching, timeouts, fault
//! injection, retries, ring hash and mTLS with certificates of weft's
//! CA read by grpcio's `file_watcher` certificate provider. `weft proxy-status`'s API
//! lists the client as `grpc` with what it ACKed.
//!
//! grpcio comes from `scripts/setup.sh` (`.tools/bin/grpc-python`, a venv).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mesh;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use weft_control::control::ControlPlane;
use weft_control::identity::IdentityConfig;
use weft_control::translate::grpcgen;
use weft_testkit::http::{request, send_h1};

/// Upper bound of one client run (its calls wait 30 s at most each; generous for
/// loaded machines).
const RUN: Duration = Duration::from_secs(300);
const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  selector: {app: echo}
  ports: [{name: grpc, port: 7070}]
"#;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/grpc").join(name)
}

fn python() -> PathBuf {
    weft_testkit::tools::require("grpc-python")
}

/// A grpcio echo server answering as `name` on a port of its own; killed on drop.
struct Backend {
    name: String,
    port: u16,
    _child: Child,
}

impl Backend {
    async fn start(name: &str, tls: Option<&Path>) -> Backend {
        let mut cmd = Command::new(python());
        cmd.arg(script("echo_server.py")).arg(name);
        if let Some(dir) = tls {
            cmd.args(["cert-chain.pem", "key.pem", "root-cert.pem"].map(|f| dir.join(f)));
        }
        let mut child =
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).kill_on_drop(true).spawn().expect("python starts");
        let stdout = child.stdout.take().expect("stdout");
        let line = tokio::time::timeout(RUN, BufReader::new(stdout).lines().next_line())
            .await
            .expect("the echo server starts in time")
            .expect("its stdout")
            .expect("a line with its port");
        let v: Value = serde_json::from_str(&line).expect("JSON");
        Backend { name: name.into(), port: v["port"].as_u64().expect("a port") as u16, _child: child }
    }

    /// A WorkloadEntry of the `echo` Service for this backend with `labels`.
    fn entry(&self, labels: &str) -> String {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {}, namespace: default}}\n\
             spec:\n  address: 127.0.0.1\n  ports: {{grpc: {}}}\n  serviceAccount: echo\n  labels: {{app: echo, {labels}}}\n",
            self.name, self.port
        )
    }
}

/// A control plane (with its CA) serving `yaml`, a join token for the gRPC client, and
/// the client's working directory.
struct Mesh {
    cp: ControlPlane,
    token: String,
    dir: tempfile::TempDir,
}

impl Mesh {
    async fn start(yaml: &str) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        std::fs::create_dir_all(&config).unwrap();
        std::fs::write(config.join("mesh.yaml"), yaml).unwrap();
        let cp = mesh::control_plane(Some(&config), IdentityConfig::new(dir.path().join("data"))).await;
        let token = mesh::join_token(&cp, "default", "client").await;
        Mesh { cp, token, dir }
    }

    /// The bootstrap of a client `name` (with certificate files from `certs`).
    fn bootstrap(&self, name: &str, certs: Option<&Path>) -> PathBuf {
        let b = grpcgen::bootstrap(
            &self.cp.xds_addr.to_string(),
            name,
            "default",
            certs,
            &[("SERVICE_ACCOUNT", "client"), ("WEFT_JOIN_TOKEN", &self.token)],
        );
        let path = self.dir.path().join(format!("{name}-bootstrap.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(&b).unwrap()).unwrap();
        path
    }

    /// Runs the client: `calls` calls to `target` with `args`; its JSON summary.
    async fn run(&self, target: &str, calls: usize, args: &[&str]) -> Summary {
        self.run_with(&self.bootstrap("client", None), target, calls, args).await
    }

    async fn run_with(&self, bootstrap: &Path, target: &str, calls: usize, args: &[&str]) -> Summary {
        let out = tokio::time::timeout(
            RUN,
            Command::new(python())
                .arg(script("xds_client.py"))
                .arg(target)
                .arg(calls.to_string())
                .args(args)
                .env("GRPC_XDS_BOOTSTRAP", bootstrap)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("the client finishes in time")
        .expect("python runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if std::env::var_os("WEFT_GRPC_DEBUG").is_some() {
            // With GRPC_TRACE=xds_client (say) in the environment: what grpcio saw.
            eprintln!("{stderr}");
        }
        assert!(out.status.success(), "client failed: {stdout}\n{stderr}");
        let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"));
        let counts = |k: &str| -> BTreeMap<String, u64> {
            v[k].as_object().unwrap().iter().map(|(k, n)| (k.clone(), n.as_u64().unwrap())).collect()
        };
        Summary { servers: counts("servers"), codes: counts("codes"), raw: v }
    }
}

/// What a client run got.
#[derive(Debug)]
struct Summary {
    servers: BTreeMap<String, u64>,
    codes: BTreeMap<String, u64>,
    raw: Value,
}

impl Summary {
    fn code(&self, code: &str) -> u64 {
        self.codes.get(code).copied().unwrap_or(0)
    }
    fn server(&self, name: &str) -> u64 {
        self.servers.get(name).copied().unwrap_or(0)
    }
}

async fn backends(names: &[&str]) -> Vec<Backend> {
    let mut out = Vec::new();
    for n in names {
        out.push(Backend::start(n, None).await);
    }
    out
}

const SUBSETS: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: default}
spec:
  host: echo
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

#[tokio::test]
async fn ping_pong_through_an_xds_target_and_proxy_status_lists_the_grpc_client() {
    let b = backends(&["a"]).await;
    let mesh = Mesh::start(&format!("{SERVICE}{}", b[0].entry("version: v1"))).await;
    // Istio's short and fully qualified names both resolve.
    for target in ["xds:///echo:7070", "xds:///echo.default.svc.cluster.local:7070"] {
        let s = mesh.run(target, 5, &[]).await;
        assert_eq!((s.code("OK"), s.server("a")), (5, 5), "{target}: {:?}", s.raw);
    }
    // A client that stays connected is listed as gRPC, with every type ACKed.
    let bootstrap = mesh.bootstrap("holder", None);
    let mut holder = Command::new(python())
        .arg(script("xds_client.py"))
        .args(["xds:///echo:7070", "1", "--hold"])
        .env("GRPC_XDS_BOOTSTRAP", &bootstrap)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let line = tokio::time::timeout(RUN, BufReader::new(holder.stdout.take().unwrap()).lines().next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(line.contains("\"OK\": 1"), "{line}");
    let deadline = tokio::time::Instant::now() + RUN;
    loop {
        let req = mesh::admin(&mesh.cp, request(Method::GET, "weft", "/api/v1/proxies", Bytes::new()).unwrap());
        let v: Value = send_h1(mesh.cp.api_addr, req).await.unwrap().json().unwrap();
        let p = v["proxies"].as_array().unwrap().iter().find(|p| p["name"] == "holder").cloned();
        let synced = p.as_ref().is_some_and(|p| {
            ["Listener", "RouteConfiguration", "Cluster", "ClusterLoadAssignment"]
                .iter()
                .all(|t| p["types"][t]["status"] == "SYNCED" && p["types"][t]["acked"].is_string())
        });
        if synced {
            assert_eq!(p.unwrap()["kind"], "grpc");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the gRPC client never showed every type ACKed: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn round_robin_spreads_calls_evenly() {
    let b = backends(&["a", "b", "c"]).await;
    let entries: String = b.iter().map(|b| b.entry("version: v1")).collect();
    let dr =
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo, namespace: default}\n\
              spec:\n  host: echo\n  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\n";
    let mesh = Mesh::start(&format!("{SERVICE}{entries}{dr}")).await;
    let s = mesh.run("xds:///echo:7070", 30, &["--warmup", "3"]).await;
    assert_eq!(s.code("OK"), 30, "{:?}", s.raw);
    for n in ["a", "b", "c"] {
        // Strict rotation once every backend is connected: 10 each (one off at most
        // when a connection blinks).
        assert!((9..=11).contains(&s.server(n)), "{n}: {:?}", s.raw);
    }
}

#[tokio::test]
async fn traffic_splitting_follows_the_weights() {
    let b = backends(&["v1", "v2"]).await;
    let vs = r#"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo]
  http:
  - route:
    - {destination: {host: echo, subset: v1}, weight: 80}
    - {destination: {host: echo, subset: v2}, weight: 20}
"#;
    let mesh =
        Mesh::start(&format!("{SERVICE}{}{}{SUBSETS}{vs}", b[0].entry("version: v1"), b[1].entry("version: v2"))).await;
    let s = mesh.run("xds:///echo:7070", 500, &["--warmup", "2"]).await;
    assert_eq!(s.code("OK"), 500, "{:?}", s.raw);
    // 20% of 500 = 100, binomial sd ~9: 3.3 sd either side.
    assert!((70..=130).contains(&s.server("v2")), "{:?}", s.servers);
}

#[tokio::test]
async fn path_and_header_matches_pick_the_route() {
    let b = backends(&["v1", "v2"]).await;
    let vs = r#"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo]
  http:
  - match: [{uri: {exact: /echo.Echo/Other}}]
    route: [{destination: {host: echo, subset: v2}}]
  - match: [{uri: {prefix: /echo.Echo/}, headers: {x-variant: {exact: canary}}}]
    route: [{destination: {host: echo, subset: v2}}]
  - match: [{uri: {regex: "/echo\\.Echo/Re.*"}}]
    route: [{destination: {host: echo, subset: v2}}]
  - route: [{destination: {host: echo, subset: v1}}]
"#;
    let mesh =
        Mesh::start(&format!("{SERVICE}{}{}{SUBSETS}{vs}", b[0].entry("version: v1"), b[1].entry("version: v2"))).await;
    let plain = mesh.run("xds:///echo:7070", 10, &[]).await;
    assert_eq!(plain.server("v1"), 10, "{:?}", plain.raw);
    let path = mesh.run("xds:///echo:7070", 10, &["--method", "/echo.Echo/Other"]).await;
    assert_eq!(path.server("v2"), 10, "{:?}", path.raw);
    let regex = mesh.run("xds:///echo:7070", 10, &["--method", "/echo.Echo/Reverse"]).await;
    assert_eq!(regex.server("v2"), 10, "{:?}", regex.raw);
    let header = mesh.run("xds:///echo:7070", 10, &["--md", "x-variant=canary"]).await;
    assert_eq!(header.server("v2"), 10, "{:?}", header.raw);
    let other = mesh.run("xds:///echo:7070", 10, &["--md", "x-variant=stable"]).await;
    assert_eq!(other.server("v1"), 10, "{:?}", other.raw);
}

#[tokio::test]
async fn virtual_service_timeout_ends_slow_calls_with_deadline_exceeded() {
    // Three seconds: on this test machine grpcio 1.85 ends every call at once under a
    // max_stream_duration of 1 s or less (500ms and 1s seen; 1.5s and 3s behave, as
    // does a 500 ms deadline set by the application), so the margin is wide.
    let b = backends(&["a"]).await;
    let vs = r#"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo]
  http:
  - route: [{destination: {host: echo}}]
    timeout: 3s
"#;
    let mesh = Mesh::start(&format!("{SERVICE}{}{vs}", b[0].entry("version: v1"))).await;
    let fast = mesh.run("xds:///echo:7070", 3, &[]).await;
    assert_eq!(fast.code("OK"), 3, "{:?}", fast.raw);
    let slow = mesh.run("xds:///echo:7070", 3, &["--md", "x-delay-ms=10000"]).await;
    assert_eq!(slow.code("DEADLINE_EXCEEDED"), 3, "{:?}", slow.raw);
}

#[tokio::test]
async fn fault_injection_aborts_a_share_of_calls_and_delays_others() {
    let b = backends(&["a"]).await;
    let vs = r#"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo]
  http:
  - match: [{headers: {x-fault: {exact: delay}}}]
    fault: {delay: {fixedDelay: 5s, percentage: {value: 100}}}
    route: [{destination: {host: echo}}]
  - fault: {abort: {grpcStatus: PERMISSION_DENIED, percentage: {value: 50}}}
    route: [{destination: {host: echo}}]
"#;
    let mesh = Mesh::start(&format!("{SERVICE}{}{vs}", b[0].entry("version: v1"))).await;
    let s = mesh.run("xds:///echo:7070", 200, &[]).await;
    // Half aborted: 100 +- 3.5 sd.
    assert!((65..=135).contains(&s.code("PERMISSION_DENIED")), "{:?}", s.codes);
    assert_eq!(s.code("OK") + s.code("PERMISSION_DENIED"), 200, "{:?}", s.codes);
    // The delay outlasts the client's own 1 s deadline.
    let d = mesh.run("xds:///echo:7070", 2, &["--md", "x-fault=delay", "--deadline", "1"]).await;
    assert_eq!(d.code("DEADLINE_EXCEEDED"), 2, "{:?}", d.raw);
}

#[tokio::test]
async fn retries_on_unavailable_reach_a_success() {
    let b = backends(&["a"]).await;
    // The backend fails each call key 3 times: 4 attempts are needed, more than Istio's
    // default 2 retries give.
    let vs = r#"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo]
  http:
  - match: [{headers: {x-retry: {exact: "yes"}}}]
    route: [{destination: {host: echo}}]
    retries: {attempts: 4, retryOn: unavailable}
  - route: [{destination: {host: echo}}]
"#;
    let mesh = Mesh::start(&format!("{SERVICE}{}{vs}", b[0].entry("version: v1"))).await;
    let retried = mesh
        .run("xds:///echo:7070", 5, &["--md", "x-fail-times=3", "--md", "x-request-key=r{i}", "--md", "x-retry=yes"])
        .await;
    assert_eq!(retried.code("OK"), 5, "{:?}", retried.raw);
    let default = mesh.run("xds:///echo:7070", 5, &["--md", "x-fail-times=3", "--md", "x-request-key=d{i}"]).await;
    assert_eq!(default.code("UNAVAILABLE"), 5, "{:?}", default.raw);
}

#[tokio::test]
async fn ring_hash_keeps_a_header_on_one_backend() {
    let b = backends(&["a", "b", "c"]).await;
    let entries: String = b.iter().map(|b| b.entry("version: v1")).collect();
    let dr =
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo, namespace: default}\n\
              spec:\n  host: echo\n  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}\n";
    let mesh = Mesh::start(&format!("{SERVICE}{entries}{dr}")).await;
    let same = mesh.run("xds:///echo:7070", 30, &["--md", "x-user=alice"]).await;
    assert_eq!(same.code("OK"), 30, "{:?}", same.raw);
    assert_eq!(same.servers.len(), 1, "one user, one backend: {:?}", same.servers);
    let many = mesh.run("xds:///echo:7070", 60, &["--md", "x-user=user-{i}"]).await;
    assert_eq!(many.code("OK"), 60, "{:?}", many.raw);
    assert!(many.servers.len() >= 2, "many users spread: {:?}", many.servers);
}

/// Writes a certificate of weft's CA for `sa` (and the roots) into `dir` under Istio's
/// file names, as grpcio's `file_watcher` provider and the echo server read them.
fn write_certs(cp: &ControlPlane, sa: &str, dir: &Path) {
    let ca = cp.identity.as_ref().expect("a CA").ca();
    let id = weft_identity::SpiffeId::new("cluster.local", "default", sa).unwrap();
    let (key, issued) = ca.issue_with_key(&id, Duration::from_secs(3600)).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    // The leaf and any intermediates; the root goes to root-cert.pem.
    let mut chain = issued.leaf_pem.clone();
    for pem in issued.chain_pems.iter().take(issued.chain_pems.len().saturating_sub(1)) {
        chain.push_str(pem);
    }
    std::fs::write(dir.join("cert-chain.pem"), chain).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    std::fs::write(dir.join("root-cert.pem"), ca.trust_bundle_pem()).unwrap();
}

#[tokio::test]
async fn mtls_uses_file_watcher_certificates_of_the_mesh_ca_and_checks_the_server_identity() {
    // Three names for one mTLS-only backend: ISTIO_MUTUAL (the endpoints' identity as
    // SAN), no TLS setting (plaintext: refused by the server), and ISTIO_MUTUAL expecting
    // another identity (refused by the client).
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  selector: {app: echo}
  ports: [{name: grpc, port: 7070}]
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: default}
spec:
  selector: {app: echo}
  ports: [{name: grpc, port: 7070}]
---
apiVersion: v1
kind: Service
metadata: {name: wrong-san, namespace: default}
spec:
  selector: {app: echo}
  ports: [{name: grpc, port: 7070}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: default}
spec:
  host: echo
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: wrong-san, namespace: default}
spec:
  host: wrong-san
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL, subjectAltNames: ["spiffe://cluster.local/ns/default/sa/other"]}}
"#;
    let mesh = Mesh::start(yaml).await;
    let server_certs = mesh.dir.path().join("server-certs");
    let client_certs = mesh.dir.path().join("client-certs");
    write_certs(&mesh.cp, "echo", &server_certs);
    write_certs(&mesh.cp, "client", &client_certs);
    let b = Backend::start("tls", Some(&server_certs)).await;
    let before = mesh.cp.store.snapshot().resources.len();
    std::fs::write(
        mesh.dir.path().join("config/entries.yaml"),
        b.entry("version: v1, security.istio.io/tlsMode: istio"),
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + RUN;
    while mesh.cp.store.snapshot().resources.len() == before {
        assert!(tokio::time::Instant::now() < deadline, "the WorkloadEntry never reached the store");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bootstrap = mesh.bootstrap("client", Some(&client_certs));
    let tls = mesh.run_with(&bootstrap, "xds:///echo:7070", 5, &["--xds-creds"]).await;
    assert_eq!((tls.code("OK"), tls.server("tls")), (5, 5), "{:?}", tls.raw);
    let plain = mesh.run_with(&bootstrap, "xds:///plain:7070", 2, &["--xds-creds", "--deadline", "3"]).await;
    assert_eq!(plain.code("OK"), 0, "plaintext reached an mTLS-only server: {:?}", plain.raw);
    let wrong = mesh.run_with(&bootstrap, "xds:///wrong-san:7070", 2, &["--xds-creds", "--deadline", "3"]).await;
    assert_eq!(wrong.code("OK"), 0, "a server of another identity was accepted: {:?}", wrong.raw);
}
