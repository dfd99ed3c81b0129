//! A control plane with its mesh CA on loopback (explicit mode, resources from a watched
//! directory), and join tokens from its API: what the mTLS, gateway and open-connection
//! tests start their sidecars against.
#![allow(dead_code)]

use std::path::Path;

use bytes::Bytes;
use http::Method;
use weft_control::control::{ControlConfig, ControlPlane};
use weft_control::identity::IdentityConfig;
use weft_control::translate::{MeshConfig, ProxyMode};
use weft_testkit::http::{request, send_h1};

/// A control plane with the mesh CA `identity`, watching `dir` when given.
pub async fn control_plane(dir: Option<&Path>, identity: IdentityConfig) -> ControlPlane {
    ControlPlane::start(ControlConfig {
        dir: dir.map(Path::to_path_buf),
        xds: "127.0.0.1:0".parse().expect("loopback address"),
        api: "127.0.0.1:0".parse().expect("loopback address"),
        mode: ProxyMode::Explicit,
        mesh: MeshConfig {
            explicit_outbound: "127.0.0.1:0".parse().expect("loopback address"),
            ..MeshConfig::default()
        },
        identity: Some(identity),
        inject: Default::default(),
        webhook: None,
        registry: None,
        slo: Default::default(),
        stats: Default::default(),
    })
    .await
    .expect("the control plane starts")
}

/// A join token for `namespace`/`sa` from the control plane's API (one hour).
pub async fn join_token(cp: &ControlPlane, namespace: &str, sa: &str) -> String {
    let body = serde_json::json!({"namespace": namespace, "serviceAccount": sa, "ttlSeconds": 3600});
    let req =
        admin(cp, request(Method::POST, "weft", "/api/v1/tokens", Bytes::from(body.to_string())).expect("a request"));
    let reply = send_h1(cp.api_addr, req).await.expect("the API answers");
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json().expect("JSON")["token"].as_str().expect("a token").to_string()
}

/// `req` with the control plane's admin credential (`Authorization: Bearer`).
pub fn admin<B>(cp: &ControlPlane, mut req: http::Request<B>) -> http::Request<B> {
    if let Some((token, _)) = &cp.admin_token {
        req.headers_mut().insert(http::header::AUTHORIZATION, format!("Bearer {token}").parse().expect("a header"));
    }
    req
}
