//! `weft control` is secure by default: without `--data-dir` it still runs its CA and asks
//! every caller for a credential (state in a temporary directory): an xDS stream without
//! one is refused, an API write without the admin token gets 401, while the operator
//! commands on the same machine find the temporary admin token by the API address. Only
//! `--insecure-dev` lets unauthenticated callers in, and it cannot be combined with a
//! data directory.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use http::Method;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use weft_testkit::http::{request, send_h1};
use weft_xds::{type_url, NodeInfo};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");
const WAIT: Duration = Duration::from_secs(30);
const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: reviews\nspec:\n  selector: {app: reviews}\n  ports:\n  - name: http\n    port: 9080\n";

/// `weft control` with `extra` flags, its state directory `state` (where it records its
/// API for the CLI); the process, xDS and API addresses.
async fn start(state: &Path, extra: &[&str]) -> (Child, SocketAddr, SocketAddr) {
    let mut child = Command::new(WEFT)
        .arg("control")
        .args(extra)
        .args(["--xds", "127.0.0.1:0", "--api", "127.0.0.1:0"])
        .env("WEFT_STATE_DIR", state)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().unwrap();
    let xds = line.split("xDS on ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    let api = line.split("API on ").nth(1).unwrap().trim().parse().unwrap();
    (child, xds, api)
}

/// The first answer of a SotW ADS stream opened as an `app: reviews` node of service
/// account `reviews` with `token` as bearer (None: no credential), or the status it
/// ended with.
async fn stream(xds: SocketAddr, token: Option<&str>) -> Result<DiscoveryResponse, tonic::Status> {
    let node = NodeInfo {
        id: "forged~127.0.0.9~reviews-v1.default~default.svc.cluster.local".into(),
        cluster: "reviews.default".into(),
        name: "forged".into(),
        namespace: "default".into(),
        service_account: "reviews".into(),
        labels: [("app".to_string(), "reviews".to_string())].into(),
        instance_ips: vec!["127.0.0.9".into()],
        ..NodeInfo::default()
    };
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}")).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(DiscoveryRequest { node: Some(node.to_node()), type_url: type_url::LISTENER.into(), ..Default::default() })
        .unwrap();
    let mut request = tonic::Request::new(UnboundedReceiverStream::new(rx));
    if let Some(t) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let first = async {
        let mut responses = client.stream_aggregated_resources(request).await?.into_inner();
        match responses.message().await? {
            Some(r) => Ok(r),
            None => Err(tonic::Status::unknown("stream closed without a response")),
        }
    };
    let first = tokio::time::timeout(WAIT, first).await.expect("the control plane answers");
    drop(tx);
    first
}

/// `POST /api/v1/apply` of a Service without any credential: the status.
async fn anonymous_apply(api: SocketAddr) -> (u16, String) {
    let reply =
        send_h1(api, request(Method::POST, "weft", "/api/v1/apply", Bytes::from(SERVICE)).unwrap()).await.unwrap();
    (reply.status.as_u16(), reply.text())
}

/// `weft ARGS` with the state directory `state` (and no token in the environment).
async fn cli(state: &Path, args: &[&str]) -> std::process::Output {
    Command::new(WEFT)
        .args(args)
        .env("WEFT_STATE_DIR", state)
        .env_remove("WEFT_TOKEN")
        .env_remove("WEFT_TOKEN_FILE")
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn default_control_plane_refuses_callers_without_credentials() {
    let state = tempfile::tempdir().unwrap();
    let (mut control, xds, api) = start(state.path(), &[]).await;

    let status = stream(xds, None).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    let (code, body) = anonymous_apply(api).await;
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("admin"), "{body}");

    // The CLI on this machine finds the temporary admin token by the API address.
    let file = state.path().join("svc.yaml");
    std::fs::write(&file, SERVICE).unwrap();
    let out = cli(state.path(), &["apply", "--server", &api.to_string(), "-f", file.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // ... and mints a join token with it: the credential a proxy then joins with.
    let out = cli(
        state.path(),
        &["token", "create", "--server", &api.to_string(), "--namespace", "default", "--service-account", "reviews"],
    )
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let first = stream(xds, Some(&token)).await;
    assert!(first.is_ok(), "the join token is accepted: {first:?}");

    // The record goes when the control plane stops (SIGTERM).
    let records = || {
        std::fs::read_dir(state.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("control-"))
            .count()
    };
    assert_eq!(records(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(control.id().unwrap()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = tokio::time::timeout(WAIT, control.wait()).await.unwrap();
    assert_eq!(records(), 0);
}

#[tokio::test]
async fn insecure_dev_lets_unauthenticated_callers_in() {
    let state = tempfile::tempdir().unwrap();
    let (_control, xds, api) = start(state.path(), &["--insecure-dev"]).await;
    let first = stream(xds, None).await;
    assert!(first.is_ok(), "{first:?}");
    let (code, body) = anonymous_apply(api).await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test]
async fn insecure_dev_does_not_combine_with_a_data_directory() {
    let state = tempfile::tempdir().unwrap();
    let out = cli(state.path(), &["control", "--insecure-dev", "--data-dir", state.path().to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--insecure-dev") && stderr.contains("--data-dir"), "{stderr}");
}
