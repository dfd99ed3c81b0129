//! The `weft` binary as an operator runs it: precise errors for a bad bootstrap, and a
//! proxy process that serves what its control plane sends and drains on SIGTERM.

#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use weft_testkit::echo::EchoServer;
use weft_testkit::http::get_h1;

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

#[tokio::test]
async fn a_bad_bootstrap_is_rejected_with_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bootstrap.yaml");
    std::fs::write(&path, "node:\n  id: a\nxds:\n  address: http://127.0.0.1:1\n  mode: turbo\n").unwrap();
    let out = tokio::process::Command::new(WEFT).args(["proxy", "--bootstrap"]).arg(&path).output().await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:5: field `xds.mode`", path.display())), "{err}");
    assert!(err.contains("sotw") && err.contains("delta"), "the error must say what is expected: {err}");

    let out = tokio::process::Command::new(WEFT)
        .args(["proxy", "--bootstrap", "/nonexistent/b.yaml"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/b.yaml: cannot read"));
}

#[tokio::test]
async fn proxy_process_serves_xds_config_and_drains_on_sigterm() {
    let echo = EchoServer::start("app").await;
    let xds = weft_testkit::xds::single_route(echo.addr).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bootstrap.yaml");
    std::fs::write(
        &path,
        format!("node:\n  id: cli-test\n  name: cli\n  namespace: default\nxds:\n  address: http://{xds}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\ndrain_timeout: 3s\n"),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(WEFT)
        .args(["--log-json", "proxy", "--bootstrap"])
        .arg(&path)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The proxy logs the address each listener bound (port 0 here).
    let (admin, out) = weft_testkit::xds::bound_addresses(child.stderr.take().unwrap(), "out").await;
    // Ready once the routes and endpoints its listeners and clusters name have arrived.
    assert!(weft_testkit::xds::wait_ready(admin).await, "proxy never reported ready");
    assert_eq!(get_h1(out, "svc", "/first").await.unwrap().header("x-echo-server"), Some("app"));
    let before = echo.requests();
    let slow = tokio::spawn(async move { get_h1(out, "svc", "/delay/700").await });
    echo.wait_for_requests(before + 1).await; // the slow request is in flight
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id().unwrap() as i32), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let r = slow.await.unwrap().expect("in-flight request was cut by the drain");
    assert_eq!(r.status, 200);
    let status =
        tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("proxy did not exit").unwrap();
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn grpc_bootstrap_prints_a_grpc_xds_bootstrap_with_the_file_watcher_provider() {
    let out = tokio::process::Command::new(WEFT)
        .args(["grpc-bootstrap", "--name", "client", "--namespace", "shop", "--xds", "127.0.0.1:15999"])
        .args(["--join-token", "t0k", "--cert-dir", "/var/run/certs"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(b["xds_servers"][0]["server_uri"], "127.0.0.1:15999");
    assert_eq!(b["node"]["id"], "sidecar~127.0.0.1~client.shop~shop.svc.cluster.local");
    assert_eq!(b["node"]["metadata"]["GENERATOR"], "grpc");
    assert_eq!(b["node"]["metadata"]["WEFT_JOIN_TOKEN"], "t0k");
    let provider = &b["certificate_providers"]["default"];
    assert_eq!(provider["plugin_name"], "file_watcher");
    assert_eq!(provider["config"]["certificate_file"], "/var/run/certs/cert-chain.pem");
}

#[tokio::test]
async fn envoy_bootstrap_prints_a_registered_node_and_rejects_bad_labels() {
    let out = tokio::process::Command::new(WEFT)
        .args([
            "envoy-bootstrap",
            "--name",
            "reviews-v1",
            "--namespace",
            "bookinfo",
            "--labels",
            "app=reviews,version=v1",
        ])
        .args(["--ports", "http:9080", "--xds", "127.0.0.1:15999", "--admin-port", "0"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let yaml: serde_json::Value = serde_yaml_ng::from_slice(&out.stdout).unwrap();
    assert_eq!(yaml["node"]["id"], "sidecar~127.0.0.1~reviews-v1.bookinfo~bookinfo.svc.cluster.local");
    assert_eq!(yaml["node"]["cluster"], "reviews.bookinfo");
    assert_eq!(yaml["node"]["metadata"]["LABELS"]["version"], "v1");
    assert_eq!(yaml["admin"]["address"]["socket_address"]["port_value"], 0);

    let out = tokio::process::Command::new(WEFT)
        .args(["envoy-bootstrap", "--name", "x", "--ports", "http:99999"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ports") && err.contains("99999"), "{err}");
}

#[tokio::test]
async fn envoy_bootstrap_joins_a_gateway_with_its_port_map() {
    let out = tokio::process::Command::new(WEFT)
        .args(["envoy-bootstrap", "--name", "gw", "--namespace", "istio-system", "--labels", "istio=ingressgateway"])
        .args(["--gateway", "--gateway-ports", "8080=18080, 443=18443", "--gateway-address", "127.0.0.1"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let yaml: serde_json::Value = serde_yaml_ng::from_slice(&out.stdout).unwrap();
    assert_eq!(yaml["node"]["id"], "router~127.0.0.1~gw.istio-system~istio-system.svc.cluster.local");
    assert_eq!(yaml["node"]["metadata"]["WEFT_GATEWAY_PORTS"], "443=18443,8080=18080");
    assert_eq!(yaml["node"]["metadata"]["WEFT_GATEWAY_ADDRESS"], "127.0.0.1");
    assert_eq!(yaml["node"]["metadata"]["LABELS"]["istio"], "ingressgateway");

    let out = tokio::process::Command::new(WEFT)
        .args(["envoy-bootstrap", "--name", "gw", "--gateway", "--gateway-ports", "80:1"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--gateway-ports") && err.contains("80:1"), "{err}");
}

#[tokio::test]
async fn analyze_reports_parse_errors_and_cross_resource_findings_with_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("vs.yaml");
    std::fs::write(
        &bad,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination:\n        host: reviews\n        subset: v9\n      wieght: 100\n",
    )
    .unwrap();
    let out = tokio::process::Command::new(WEFT).args(["analyze", "-f"]).arg(&bad).output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(79), "{text}");
    assert!(text.contains(&format!("{}:12:", bad.display())) && text.contains("did you mean `weight`?"), "{text}");

    // Bookinfo's services, default destination rules and a canary split: clean.
    let bookinfo = weft_testkit::conformance_dir().join("bookinfo");
    let out = tokio::process::Command::new(WEFT)
        .args(["analyze", "-f"])
        .arg(bookinfo.join("platform/kube/bookinfo.yaml"))
        .arg("-f")
        .arg(bookinfo.join("networking/destination-rule-all.yaml"))
        .arg("-f")
        .arg(bookinfo.join("networking/virtual-service-reviews-80-20.yaml"))
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Without the services and rules, the host and subset references dangle: IST0101.
    let out = tokio::process::Command::new(WEFT)
        .args(["analyze", "-f"])
        .arg(bookinfo.join("networking/virtual-service-reviews-80-20.yaml"))
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(79));
    assert!(String::from_utf8_lossy(&out.stdout).contains("IST0101"));
}

#[tokio::test]
async fn bad_tracing_settings_stop_the_control_plane_and_weft_up_with_a_precise_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, "extensionProviders:\n- name: otel\n  opentelemetry: {service: collector, prot: 4317}\n")
        .unwrap();
    let out = tokio::process::Command::new(WEFT)
        .args(["control", "--insecure-dev", "--xds", "127.0.0.1:0", "--api", "127.0.0.1:0", "--mesh-config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("--mesh-config {}: line 3 column", path.display()))
            && err.contains("extensionProviders[0].opentelemetry: unknown field `prot`"),
        "{err}"
    );

    let out = tokio::process::Command::new(WEFT)
        .args(["up", "--api", "127.0.0.1:0", "--xds", "127.0.0.1:0", "--tracing", "jaeger://127.0.0.1:14268"])
        .env("WEFT_STATE_DIR", dir.path())
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tracing `jaeger://127.0.0.1:14268`: unknown scheme `jaeger`"), "{err}");
    assert!(err.contains("otlp://HOST:PORT"), "says what is expected: {err}");
}

#[tokio::test]
async fn analyze_fails_on_telemetry_settings_weft_does_not_apply() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("telemetry.yaml");
    std::fs::write(
        &path,
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t, namespace: istio-system}\nspec:\n  tracing: [{randomSamplingPercentage: 10}]\n  metrics:\n  - overrides: [{match: {metric: REQUEST_COUNT}, disabled: true}]\n",
    )
    .unwrap();
    let out = tokio::process::Command::new(WEFT).args(["analyze", "-f"]).arg(&path).output().await.unwrap();
    assert_eq!(out.status.code(), Some(79), "istioctl's exit code for issues found");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Error [WFT0003]") && text.contains("spec.metrics[0] is not applied"), "{text}");
}

#[test]
fn a_report_piped_into_a_reader_that_closed_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("vs.yaml");
    std::fs::write(
        &bad,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination:\n        host: reviews\n        subset: v9\n",
    )
    .unwrap();
    // `weft analyze ... | head -0`: the reader is gone before the first line is written.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(WEFT)
        .args(["analyze", "-f"])
        .arg(&bad)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "a closed stdout must not panic: {err}");
    assert_eq!(
        out.status.signal(),
        Some(nix::sys::signal::Signal::SIGPIPE as i32),
        "ends as Unix tools do, by SIGPIPE: {:?} {err}",
        out.status
    );
}
