//! The rollouts' JSON API on a running control plane: a Rollout's status, commands and
//! their refusals, and a resource annotated `weft.dev/staged: "true"` taken as a staged
//! change rather than applied.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use bytes::Bytes;
use http::Method;
use weft_control::control::{ControlConfig, ControlPlane};
use weft_control::translate::{MeshConfig, ProxyMode};
use weft_testkit::http::{request, send_h1};

async fn control_plane() -> ControlPlane {
    ControlPlane::start(ControlConfig {
        dir: None,
        xds: "127.0.0.1:0".parse().unwrap(),
        api: "127.0.0.1:0".parse().unwrap(),
        mode: ProxyMode::Explicit,
        mesh: MeshConfig::default(),
        identity: None,
        inject: Default::default(),
        webhook: None,
        registry: None,
        stats: Default::default(),
        slo: Default::default(),
    })
    .await
    .unwrap()
}

async fn call(cp: &ControlPlane, method: Method, path: &str, body: &str) -> (u16, serde_json::Value) {
    let req = request(method, "weft", path, Bytes::from(body.to_string())).unwrap();
    let r = send_h1(cp.api_addr, req).await.unwrap();
    (r.status.as_u16(), serde_json::from_slice(&r.body).unwrap())
}

fn repo(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)).unwrap()
}

#[tokio::test]
async fn rollout_status_and_commands_over_the_api() {
    let cp = control_plane().await;
    let text = format!(
        "{}\n---\n{}",
        repo("samples/bookinfo/networking/destination-rule-all.yaml"),
        repo("samples/rollouts/reviews-rollout.yaml")
    );
    let (code, v) = call(&cp, Method::POST, "/api/v1/apply", &text).await;
    assert_eq!(code, 200, "{v}");
    // The controller picks it up within a tick or two.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        let (code, v) = call(&cp, Method::GET, "/api/v1/rollouts/default/reviews", "").await;
        if code == 200 && v["phase"] == "Progressing" {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "{code} {v}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!((status["step"].as_u64(), status["steps"].as_u64()), (Some(1), Some(4)), "{status}");
    assert_eq!(status["traffic"], "5% of requests to v3");
    let (code, v) = call(&cp, Method::POST, "/api/v1/rollouts/default/reviews/pause", "").await;
    assert_eq!((code, v["phase"].as_str()), (200, Some("Paused")), "{v}");
    let (code, v) = call(&cp, Method::POST, "/api/v1/rollouts/default/reviews/pause", "").await;
    assert_eq!(code, 409, "paused twice: {v}");
    let (code, v) = call(&cp, Method::POST, "/api/v1/rollouts/default/reviews/explode", "").await;
    assert_eq!(code, 400, "{v}");
    let (code, _) = call(&cp, Method::GET, "/api/v1/rollouts/default/nope", "").await;
    assert_eq!(code, 404);
    let (code, v) = call(&cp, Method::POST, "/api/v1/rollouts/default/reviews/promote?full=true", "").await;
    assert_eq!((code, v["phase"].as_str()), (200, Some("Succeeded")), "{v}");
    let (_, list) = call(&cp, Method::GET, "/api/v1/rollouts", "").await;
    assert_eq!(list["rollouts"].as_array().unwrap().len(), 1, "{list}");
    cp.shutdown().await;
}

#[tokio::test]
async fn a_resource_annotated_staged_is_staged_not_applied() {
    let cp = control_plane().await;
    let ap = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  annotations:\n    weft.dev/staged: \"true\"\nspec:\n  selector:\n    matchLabels: {app: reviews}\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/default/sa/x]\n";
    let (code, v) = call(&cp, Method::POST, "/api/v1/apply", ap).await;
    // No proxy runs reviews here: nothing to stage it on, and it is not applied either.
    assert_eq!(code, 400, "{v}");
    assert!(v["errors"][0].as_str().unwrap().contains("no running workload is affected"), "{v}");
    let (_, r) = call(&cp, Method::GET, "/api/v1/resources?kind=ap", "").await;
    assert!(r["items"].as_array().unwrap().is_empty(), "{r}");
    // Without the annotation it is applied as usual.
    let (code, v) = call(&cp, Method::POST, "/api/v1/apply", &ap.replace("\"true\"", "\"false\"")).await;
    assert_eq!(code, 200, "{v}");
    cp.shutdown().await;
}
