//! The proxy-only `weft-proxy` binary as an operator runs it: the same bootstrap errors
//! as `weft proxy`, its own flag errors, and a process that takes its bootstrap from
//! `WEFT_BOOTSTRAP_YAML`, serves what its control plane sends on one worker thread and
//! drains on `POST /quitquitquit` (SIGTERM is `weft proxy`'s test, same code).

#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::{get_h1, send_h1};

const WEFT_PROXY: &str = env!("CARGO_BIN_EXE_weft-proxy");

#[tokio::test]
async fn bad_bootstraps_and_flags_are_rejected_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bootstrap.yaml");
    std::fs::write(&path, "node:\n  id: a\nxds:\n  address: http://127.0.0.1:1\n  mode: turbo\n").unwrap();
    let out = tokio::process::Command::new(WEFT_PROXY).arg("--bootstrap").arg(&path).output().await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:5: field `xds.mode`", path.display())), "{err}");

    let out = tokio::process::Command::new(WEFT_PROXY)
        .env_remove("WEFT_BOOTSTRAP")
        .env_remove("WEFT_BOOTSTRAP_YAML")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("give a bootstrap"));

    let out = tokio::process::Command::new(WEFT_PROXY).args(["-b", "x.yaml", "--nope"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unexpected argument '--nope'"));

    let out = tokio::process::Command::new(WEFT_PROXY).arg("--help").output().await.unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--concurrency"));
}

#[tokio::test]
async fn serves_xds_config_from_env_bootstrap_and_drains_on_quitquitquit() {
    let echo = EchoServer::start("app").await;
    let xds = weft_testkit::xds::single_route(echo.addr).await.unwrap();

    let bootstrap = format!(
        "node:\n  id: bin-test\n  name: bin\n  namespace: default\nxds:\n  address: http://{xds}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\ndrain_timeout: 3s\n"
    );
    let mut child = tokio::process::Command::new(WEFT_PROXY)
        .env_remove("WEFT_BOOTSTRAP")
        .env("WEFT_BOOTSTRAP_YAML", bootstrap)
        .env("WEFT_LOG_JSON", "true")
        .args(["--concurrency", "1"])
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
    let quit = http::Request::post("/quitquitquit").header("host", "admin").body(Full::new(Bytes::new())).unwrap();
    assert_eq!(send_h1(admin, quit).await.unwrap().status, 200);
    let r = slow.await.unwrap().expect("in-flight request was cut by the drain");
    assert_eq!(r.status, 200);
    let status =
        tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("proxy did not exit").unwrap();
    assert!(status.success(), "exit status {status}");
}
