//! SLOs through a running control plane: an SLO applied over the API is evaluated
//! against the statistics it is given, shown by `GET /api/v1/slos`, exported as
//! `weft_slo_*` metrics, its page alert POSTed to `--alert-webhook`, and its Prometheus
//! rules served at `/api/v1/slos/rules`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use weft_control::control::{ControlConfig, ControlPlane};
use weft_control::meshstats::{FixedStats, Selector, WindowStats};
use weft_control::slo::SloConfig;
use weft_control::translate::{MeshConfig, ProxyMode};
use weft_testkit::http::{get_h1, request, send_h1};

const SLO: &str = "apiVersion: weft.dev/v1alpha1
kind: ServiceLevelObjective
metadata: {name: ratings-availability, namespace: default}
spec:
  service: ratings
  sli: {successRate: {}}
  target: 99
  window: 28d
";

/// A webhook receiver on port 0: every POSTed body, in order.
async fn receiver() -> (String, tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>) {
    use http_body_util::BodyExt;
    let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/alerts", sock.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = sock.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let _ = tx.send(serde_json::from_slice(&body).unwrap_or_default());
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (url, rx)
}

#[tokio::test]
async fn an_applied_slo_is_evaluated_served_exported_and_alerted() -> anyhow::Result<()> {
    let (webhook, mut alerts) = receiver().await;
    // 1,000 requests, 200 of them 5xx in every window: SLI 0.8, burn 20 against a 1%
    // budget, budget left 1 - 20 = -19; every alert fires.
    let stats = FixedStats {
        windows: vec![(
            Selector { destination_service: Some("ratings.default.svc.cluster.local".into()), ..Selector::default() },
            WindowStats { requests: 1000.0, errors: 200.0, ..WindowStats::default() },
        )],
        ..FixedStats::default()
    };
    let cp = ControlPlane::start(ControlConfig {
        dir: None,
        xds: "127.0.0.1:0".parse()?,
        api: "127.0.0.1:0".parse()?,
        mode: ProxyMode::Explicit,
        mesh: MeshConfig::default(),
        identity: None,
        inject: Default::default(),
        webhook: None,
        registry: None,
        slo: SloConfig { interval: Duration::from_millis(100), webhook: Some(webhook), stats: Some(Arc::new(stats)) },
        stats: Default::default(),
    })
    .await
    .map_err(anyhow::Error::msg)?;

    let before = get_h1(cp.api_addr, "weft", "/api/v1/slos").await?;
    assert_eq!(before.json()?, serde_json::json!({"slos": []}));
    let reply = send_h1(cp.api_addr, request(Method::POST, "weft", "/api/v1/apply", Bytes::from(SLO))?).await?;
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));

    // The page alert reaches the webhook once the engine has evaluated the SLO.
    let first = tokio::time::timeout(Duration::from_secs(30), alerts.recv()).await?.expect("alert");
    assert_eq!((first["status"].as_str(), first["severity"].as_str()), (Some("firing"), Some("page")), "{first}");
    assert_eq!(first["slo"]["name"], "ratings-availability");

    let v: serde_json::Value = get_h1(cp.api_addr, "weft", "/api/v1/slos").await?.json()?;
    let slo = &v["slos"][0];
    assert_eq!(slo["service"], "ratings.default.svc.cluster.local", "{v}");
    assert_eq!(slo["target"], 0.99, "{v}");
    assert!((slo["sli_value"].as_f64().unwrap() - 0.8).abs() < 1e-9, "{v}");
    assert!((slo["budget_remaining"].as_f64().unwrap() + 19.0).abs() < 1e-9, "{v}");
    assert!((slo["burn_rates"]["5m"].as_f64().unwrap() - 20.0).abs() < 1e-9, "{v}");
    assert!(slo["alerts"].as_array().unwrap().iter().all(|a| a["firing"] == true && a["since"].is_string()), "{v}");

    let metrics = String::from_utf8(get_h1(cp.api_addr, "weft", "/metrics").await?.body.to_vec())?;
    assert!(
        metrics.contains("weft_slo_alert_firing{slo=\"ratings-availability\",namespace=\"default\",service=\"ratings.default.svc.cluster.local\",severity=\"page\",long=\"1h\",short=\"5m\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("pilot_xds_pushes"), "the control plane's own metrics stay: {metrics}");
    // The SLO families are well-formed (the control plane's own carry Istio's names,
    // which promtool lints; tests/control_metrics.rs checks those).
    let slo_part = &metrics[metrics.find("# HELP weft_slo_sli").unwrap_or(0)..];
    weft_testkit::tools::promtool_check_metrics(slo_part).await?;

    let rules: serde_json::Value = get_h1(cp.api_addr, "weft", "/api/v1/slos/rules").await?.json()?;
    let text = rules["rules"].as_str().unwrap_or_default();
    assert!(text.contains("weft:slo_error_ratio:rate28d") && text.contains("alert: WeftSLOErrorBudgetBurn"), "{rules}");
    cp.shutdown().await;
    Ok(())
}
