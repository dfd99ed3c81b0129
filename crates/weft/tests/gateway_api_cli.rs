//! `weft get <Gateway API kind> NAME -o yaml`: the resource as Kubernetes shows it, with the
//! status conditions the control plane computes (Istio's), read from a `weft control`
//! process; `weft analyze` names a Gateway whose class weft does not serve.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");
const WAIT: Duration = Duration::from_secs(30);

const RESOURCES: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: web, namespace: default}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 8080, protocol: HTTP, hostname: "*.example.com"}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: other, namespace: default}
spec:
  gatewayClassName: nginx
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: v1
kind: Service
metadata: {name: shop, namespace: default}
spec: {selector: {app: shop}, ports: [{name: http, port: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop, namespace: default}
spec:
  parentRefs: [{name: web}, {name: web, sectionName: https}]
  hostnames: [shop.example.com]
  rules:
  - backendRefs: [{name: shop, port: 8080}, {name: gone, port: 8080}]
"#;

async fn weft(args: &[&str]) -> (i32, String, String) {
    let o = tokio::process::Command::new(WEFT).args(args).output().await.unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

async fn start_control(dir: &Path) -> (tokio::process::Child, SocketAddr, String) {
    let mut control = tokio::process::Command::new(WEFT)
        .args(["control", "--dir"])
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

/// `(status, reason)` of condition `kind` in a YAML conditions list.
fn condition(list: &serde_yaml_ng::Value, kind: &str) -> (String, String) {
    let c = list.as_sequence().into_iter().flatten().find(|c| c["type"].as_str() == Some(kind));
    let s = |k: &str| c.and_then(|c| c[k].as_str()).unwrap_or("-").to_string();
    (s("status"), s("reason"))
}

#[tokio::test]
async fn weft_get_o_yaml_shows_gateway_api_status_as_istio_sets_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway-api.yaml"), RESOURCES).unwrap();
    let (_control, _xds, api) = start_control(dir.path()).await;

    // The control plane reads the directory on its own schedule: wait until the route is there.
    let deadline = Instant::now() + WAIT;
    let out = loop {
        let (code, out, err) = weft(&["get", "httproute", "shop", "-o", "yaml", "--server", &api]).await;
        assert_eq!(code, 0, "{err}");
        if out.contains("kind: HTTPRoute") {
            break out;
        }
        assert!(Instant::now() < deadline, "the route never showed: {out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(out.trim_start_matches("---\n")).unwrap();
    assert_eq!(doc["apiVersion"].as_str(), Some("gateway.networking.k8s.io/v1"), "{out}");
    assert_eq!(doc["metadata"]["name"].as_str(), Some("shop"), "{out}");
    assert_eq!(doc["spec"]["hostnames"][0].as_str(), Some("shop.example.com"), "{out}");
    let parents = &doc["status"]["parents"];
    assert_eq!(parents[0]["controllerName"].as_str(), Some("istio.io/gateway-controller"), "{out}");
    let c = &parents[0]["conditions"];
    assert_eq!(condition(c, "Accepted"), ("True".into(), "Accepted".into()), "{out}");
    assert_eq!(condition(c, "ResolvedRefs"), ("False".into(), "BackendNotFound".into()), "{out}");
    let c = &parents[1]["conditions"];
    assert_eq!(condition(c, "Accepted"), ("False".into(), "NoMatchingParent".into()), "{out}");
    assert_eq!(parents[1]["parentRef"]["sectionName"].as_str(), Some("https"), "{out}");

    // The Gateway: accepted, one route attached, no proxy to program.
    let (code, out, err) = weft(&["get", "gtw", "web", "-o", "yaml", "--server", &api]).await;
    assert_eq!(code, 0, "{err}");
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(out.trim_start_matches("---\n")).unwrap();
    assert_eq!(doc["kind"].as_str(), Some("Gateway"), "{out}");
    let st = &doc["status"];
    assert_eq!(condition(&st["conditions"], "Accepted"), ("True".into(), "Accepted".into()), "{out}");
    assert_eq!(condition(&st["conditions"], "Programmed"), ("False".into(), "AddressNotAssigned".into()), "{out}");
    assert_eq!(st["listeners"][0]["attachedRoutes"].as_u64(), Some(1), "{out}");
    assert_eq!(st["listeners"][0]["supportedKinds"][0]["kind"].as_str(), Some("HTTPRoute"), "{out}");
    // `weft get gateway` is Istio's Gateway: none here.
    let (_, out, _) = weft(&["get", "gateway", "-o", "yaml", "--server", &api]).await;
    assert!(out.trim().is_empty(), "{out}");

    // A class weft does not serve: Pending in the status, WFT0023 from analyze.
    let (_, out, _) = weft(&["get", "gtw", "other", "-o", "yaml", "--server", &api]).await;
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(out.trim_start_matches("---\n")).unwrap();
    assert_eq!(condition(&doc["status"]["conditions"], "Accepted"), ("Unknown".into(), "Pending".into()), "{out}");
    let file = dir.path().join("gateway-api.yaml");
    let (_, out, _) = weft(&["analyze", "-f", file.to_str().unwrap()]).await;
    assert!(out.contains("WFT0023") && out.contains("\"nginx\""), "{out}");
}
