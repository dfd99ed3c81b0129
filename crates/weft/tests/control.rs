//! The control plane end to end, as an operator runs it: `weft control` watching a
//! directory, weft proxies registering by connecting (explicit mode), traffic following
//! the VirtualService, a file edit reaching the proxies, `weft proxy-status` reporting
//! them SYNCED, a broken file changing nothing, and `weft apply` / `weft get` through the API.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::get_via_proxy;
use weft_testkit::net::reserve_addr;

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: reviews\nspec:\n  selector:\n    app: reviews\n  ports:\n  - name: http\n    port: 9080\n    targetPort: http\n";
const RULES: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: reviews\nspec:\n  host: reviews\n  subsets:\n  - name: v1\n    labels: {version: v1}\n  - name: v2\n    labels: {version: v2}\n";

fn route_to(subset: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination:\n        host: reviews\n        subset: {subset}\n")
}

async fn proxy(
    xds: SocketAddr,
    name: &str,
    labels: &str,
    app_port: Option<u16>,
    inbound: Option<SocketAddr>,
    outbound: SocketAddr,
) -> ProxyHandle {
    let ports =
        app_port.map(|p| format!("  ports:\n  - {{name: http, port: {p}, protocol: TCP}}\n")).unwrap_or_default();
    let inbound = inbound.map(|a| format!("  inbound: \"{a}\"\n")).unwrap_or_default();
    let text = format!(
        "node:\n  id: {name}.default\n  name: {name}\n  namespace: default\n  service_account: {name}\n  labels: {labels}\n{ports}{inbound}  outbound: \"{outbound}\"\nxds:\n  address: http://{xds}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\n"
    );
    let p = ProxyHandle::start(Bootstrap::parse(&text, Path::new("bootstrap.yaml")).unwrap()).await.unwrap();
    assert!(p.wait_ready(WAIT).await, "{name} never became ready");
    p
}

async fn served_by(outbound: SocketAddr) -> String {
    let r = get_via_proxy(outbound, "http://reviews:9080/").await.unwrap();
    r.header("x-echo-server").unwrap_or(&format!("status {}", r.status)).to_string()
}

/// How long a test waits for a fact (a push reaching the proxies, a file being read)
/// before failing: generous, since a loaded machine is slow, and never slept through.
const WAIT: Duration = Duration::from_secs(30);

async fn eventually(outbound: SocketAddr, want: &str) {
    let deadline = Instant::now() + WAIT;
    while served_by(outbound).await != want {
        assert!(Instant::now() < deadline, "traffic never moved to {want} (still {})", served_by(outbound).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn weft(args: &[&str]) -> (i32, String, String) {
    let o = tokio::process::Command::new(WEFT).args(args).output().await.unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test]
async fn control_plane_routes_registered_proxies_and_follows_file_edits() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("service.yaml"), SERVICE).unwrap();
    std::fs::write(dir.path().join("rules.yaml"), RULES).unwrap();
    let vs = dir.path().join("vs.yaml");
    std::fs::write(&vs, route_to("v1")).unwrap();

    let mut control = tokio::process::Command::new(WEFT)
        .args(["control", "--insecure-dev", "--dir"])
        .arg(dir.path())
        .args(["--xds", "127.0.0.1:0", "--api", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(control.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().unwrap();
    // "weft control: xDS on A, API on B"
    let xds: SocketAddr = line.split("xDS on ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    let api = line.split("API on ").nth(1).unwrap().trim().to_string();

    let v1 = EchoServer::start("reviews-v1").await;
    let v2 = EchoServer::start("reviews-v2").await;
    let _p1 = proxy(
        xds,
        "reviews-v1",
        "{app: reviews, version: v1}",
        Some(v1.addr.port()),
        Some(reserve_addr()),
        reserve_addr(),
    )
    .await;
    let _p2 = proxy(
        xds,
        "reviews-v2",
        "{app: reviews, version: v2}",
        Some(v2.addr.port()),
        Some(reserve_addr()),
        reserve_addr(),
    )
    .await;
    let out = reserve_addr();
    let _client = proxy(xds, "productpage", "{app: productpage, version: v1}", None, None, out).await;

    // The VirtualService sends everything to v1 (through v1's sidecar inbound listener).
    eventually(out, "reviews-v1").await;
    for _ in 0..10 {
        assert_eq!(served_by(out).await, "reviews-v1");
    }

    // Editing the file reaches the proxies.
    std::fs::write(&vs, route_to("v2") + "\n").unwrap();
    eventually(out, "reviews-v2").await;

    // proxy-status: every proxy SYNCED once the push is ACKed.
    let mut synced = false;
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let (code, stdout, _) = weft(&["proxy-status", "-o", "json", "--server", &api]).await;
        assert_eq!(code, 0);
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let proxies = v["proxies"].as_array().unwrap();
        assert_eq!(proxies.len(), 3, "{stdout}");
        synced = proxies.iter().all(|p| {
            ["Cluster", "Listener", "RouteConfiguration", "ClusterLoadAssignment"]
                .iter()
                .all(|t| p["types"][*t]["status"] == "SYNCED")
        });
        if synced {
            let client = proxies.iter().find(|p| p["name"] == "productpage").unwrap();
            assert_eq!(client["identity"], "spiffe://cluster.local/ns/default/sa/productpage");
            // The addresses scripts need: admin and metrics answer where proxy-status says.
            let admin: SocketAddr = client["admin"].as_str().unwrap().parse().unwrap();
            let metrics: SocketAddr = client["metrics"].as_str().unwrap().parse().unwrap();
            assert_eq!(weft_testkit::http::get_h1(admin, "admin", "/ready").await.unwrap().status, 200);
            assert_eq!(weft_testkit::http::get_h1(metrics, "m", "/healthz/ready").await.unwrap().status, 200);
            assert_eq!(client["outbound"], out.to_string());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(synced, "proxies never reported SYNCED");
    let (code, table, _) = weft(&["proxy-status", "--server", &api]).await;
    assert_eq!(code, 0);
    assert!(table.contains("productpage.default") && table.contains("SYNCED"), "{table}");
    // The KIND column: weft's own proxies are sidecars (gRPC clients show `grpc`).
    assert!(table.lines().next().is_some_and(|h| h.contains("KIND")), "{table}");
    assert!(table.lines().any(|l| l.starts_with("productpage.default") && l.contains(" sidecar ")), "{table}");

    // proxy-config: the resources the client is served, decoded.
    let fqdn = "outbound|9080||reviews.default.svc.cluster.local";
    let (code, stdout, stderr) =
        weft(&["proxy-config", "productpage", "clusters", "-o", "json", "--server", &api]).await;
    assert_eq!(code, 0, "{stderr}");
    let clusters: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let c = clusters.as_array().unwrap().iter().find(|c| c["name"] == fqdn).unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(c["type"], "EDS");
    let (code, stdout, _) = weft(&["proxy-config", "productpage", "endpoints", "-o", "yaml", "--server", &api]).await;
    assert_eq!(code, 0);
    let eps: serde_json::Value = serde_yaml_ng::from_str(&stdout).unwrap();
    let v2_eps = eps
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["cluster_name"] == "outbound|9080|v2|reviews.default.svc.cluster.local")
        .unwrap();
    assert_eq!(v2_eps["endpoints"].as_array().unwrap().len(), 1, "{stdout}");
    assert_eq!(v2_eps["endpoints"][0]["health"], "HEALTHY", "{stdout}");
    let (code, table, _) = weft(&["proxy-config", "productpage", "routes", "--server", &api]).await;
    assert_eq!(code, 0);
    assert!(table.lines().any(|l| l.contains("prefix /") && l.contains("outbound|9080|v2|reviews")), "{table}");
    let (code, _, stderr) = weft(&["proxy-config", "productpage", "nonsense", "--server", &api]).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("listeners"), "{stderr}");

    // analyze --live: the stored resources and the registered workloads are consistent...
    let (code, stdout, stderr) = weft(&["analyze", "--live", "--server", &api]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stderr.contains("3 workload(s)"), "{stderr}");
    // ... and files laid over them are checked against both: a subset no DestinationRule
    // defines, and a policy whose selector matches none of the live workloads (one that
    // matches a live workload is fine). Offline, without workloads, the selector check
    // cannot run.
    let outside = tempfile::tempdir().unwrap(); // not the watched directory
    let extra = outside.path().join("extra.yaml");
    std::fs::write(
        &extra,
        route_to("v9").replace("name: reviews\nspec", "name: reviews-v9\nspec")
            + "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: ghost, namespace: default}\nspec:\n  selector: {matchLabels: {app: ghost}}\n  mtls: {mode: STRICT}\n"
            + "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: real, namespace: default}\nspec:\n  selector: {matchLabels: {app: reviews}}\n  mtls: {mode: STRICT}\n",
    )
    .unwrap();
    let extra_path = extra.to_str().unwrap().to_string();
    let (code, stdout, _) = weft(&["analyze", "--live", "-f", &extra_path, "--server", &api]).await;
    assert_eq!(code, 79, "{stdout}");
    assert!(stdout.contains("IST0101") && stdout.contains("v9"), "{stdout}");
    assert!(stdout.contains("IST0127") && stdout.contains("default/ghost"), "{stdout}");
    assert!(!stdout.contains("default/real"), "{stdout}");
    let (_, offline, _) = weft(&["analyze", "-f", &extra_path]).await;
    assert!(!offline.contains("IST0127"), "{offline}");

    // A broken file: the error is reported, the proxies keep their config.
    // Written whole and renamed into place (as editors save): the control plane polls
    // the directory and must not catch the file half-written (empty, a valid file).
    let tmp = dir.path().join(".vs.yaml.tmp");
    std::fs::write(&tmp, "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: [\n").unwrap();
    std::fs::rename(&tmp, &vs).unwrap();
    // Wait until the control plane has read the file (it reports the error), not a guess.
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, got, _) = weft(&["get", "vs", "-o", "json", "--server", &api]).await;
        let got: serde_json::Value = serde_json::from_str(&got).unwrap();
        let reported = got["errors"].as_array().unwrap().iter().any(|e| {
            let e = e.as_str().unwrap();
            e.contains("vs.yaml:") && e.contains("invalid YAML")
        });
        if reported {
            break;
        }
        assert!(Instant::now() < deadline, "the broken file was never reported: {got}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..5 {
        assert_eq!(served_by(out).await, "reviews-v2");
    }

    // weft apply through the API, with one bad resource rejected alone.
    let applied = dir.path().join("applied.yaml");
    std::fs::write(
        &applied,
        route_to("v1").replace("name: reviews\nspec", "name: reviews-api\nspec")
            + "---\n"
            + &route_to("v9").replace("subset:", "subet:"),
    )
    .unwrap();
    let (code, stdout, stderr) = weft(&["apply", "-f", applied.to_str().unwrap(), "--server", &api]).await;
    assert_ne!(code, 0, "a rejected resource must fail the command");
    assert!(stdout.contains("VirtualService default/reviews-api configured"), "{stdout}");
    assert!(stderr.contains("subet") && stderr.contains("did you mean `subset`?"), "{stderr}");
    let (code, table, _) = weft(&["get", "virtualservice", "--server", &api]).await;
    assert_eq!(code, 0);
    assert!(table.contains("reviews-api"), "{table}");
}

/// Starts `weft control` on `dir`; returns the process and its xDS and API addresses.
async fn start_control(dir: &Path) -> (tokio::process::Child, SocketAddr, String) {
    let mut control = tokio::process::Command::new(WEFT)
        .args(["control", "--insecure-dev", "--dir"])
        .arg(dir)
        .args(["--xds", "127.0.0.1:0", "--api", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(control.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().unwrap();
    let xds: SocketAddr = line.split("xDS on ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    let api = line.split("API on ").nth(1).unwrap().trim().to_string();
    (control, xds, api)
}

#[tokio::test]
async fn envoy_from_weft_envoy_bootstrap_and_a_weft_proxy_ack_the_whole_conformance_set() {
    let conformance = weft_testkit::conformance_dir();
    let (_control, xds, api) = start_control(&conformance).await;

    let envoy_out = reserve_addr();
    let (code, yaml, err) = weft(&[
        "envoy-bootstrap",
        "--name",
        "sleep",
        "--namespace",
        "default",
        "--labels",
        "app=sleep,version=v1",
        "--ports",
        "http:8080",
        "--xds",
        &xds.to_string(),
        "--admin-port",
        "0",
        "--inbound",
        &reserve_addr().to_string(),
        "--outbound",
        &envoy_out.to_string(),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let envoy = weft_testkit::envoy::Envoy::start(&yaml).await.expect("envoy starts from weft envoy-bootstrap");
    // productpage v1 (the subset virtual-service-all-v1 routes to) behind a weft sidecar.
    let app = EchoServer::start("productpage-v1").await;
    let _weft = proxy(
        xds,
        "productpage-v1",
        "{app: productpage, version: v1}",
        Some(app.addr.port()),
        Some(reserve_addr()),
        reserve_addr(),
    )
    .await;

    // Both ACK every type: proxy-status shows no NACK and everything SYNCED.
    let mut last = String::new();
    let mut ok = false;
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let (_, stdout, _) = weft(&["proxy-status", "-o", "json", "--server", &api]).await;
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let proxies = v["proxies"].as_array().cloned().unwrap_or_default();
        ok = proxies.len() == 2
            && proxies.iter().all(|p| {
                ["Cluster", "Listener", "RouteConfiguration", "ClusterLoadAssignment"]
                    .iter()
                    .all(|t| p["types"][*t]["status"] == "SYNCED")
            });
        last = stdout;
        if ok {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "not every proxy SYNCED on the whole conformance set:\n{last}\n{}", envoy.log_tail());
    let stats = envoy.admin_get("/stats?filter=update_rejected").await.unwrap();
    assert!(stats.lines().any(|l| l.contains("lds.update_rejected")), "no LDS stats: {stats}");
    let rejected: Vec<&str> = stats.lines().filter(|l| !l.trim_end().ends_with(": 0")).collect();
    assert!(rejected.is_empty(), "Envoy rejected updates: {rejected:?}");
    let listeners = envoy.admin_get("/listeners").await.unwrap();
    assert!(listeners.contains("weft-outbound"), "{listeners}");

    // Envoy routes per the VirtualService: productpage -> subset v1 -> the weft sidecar's
    // inbound listener -> the app.
    let mut served = String::new();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Ok(r) = get_via_proxy(envoy_out, "http://productpage:9080/productpage").await {
            served = r.header("x-echo-server").unwrap_or(&format!("status {}", r.status)).to_string();
            if served == "productpage-v1" {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served, "productpage-v1", "{}", envoy.log_tail());
}
