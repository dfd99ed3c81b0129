//! The engine against hand-computed statistics: SLI, budget, burn rates, alert
//! transitions with `since`, the API JSON, the metrics, and webhook delivery to a real
//! HTTP receiver.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::*;
use crate::leader::Leadership;
use crate::meshstats::{FixedStats, MeshStats, WindowStats};

/// Totals per window (the engine asks for each burn window and the SLO window).
#[derive(Default)]
struct PerWindow {
    sel: Selector,
    by_window: std::sync::Mutex<BTreeMap<Duration, WindowStats>>,
}

impl PerWindow {
    fn set(&self, window: Duration, requests: f64, errors: f64) {
        self.by_window.lock().unwrap().insert(window, WindowStats { requests, errors, ..WindowStats::default() });
    }
}

impl MeshStats for PerWindow {
    fn window(&self, sel: &Selector, window: Duration) -> WindowStats {
        if *sel != self.sel {
            return WindowStats::default();
        }
        self.by_window.lock().unwrap().get(&window).cloned().unwrap_or_default()
    }
    fn edges(&self, _: Duration) -> Vec<crate::meshstats::Edge> {
        Vec::new()
    }
}

fn resources(yaml: &str) -> Vec<Resource> {
    let p = weft_api::parse_str(yaml, Path::new("slo.yaml"));
    assert!(p.errors.is_empty(), "{:#?}", p.errors);
    p.resources
}

const RATINGS: &str = "apiVersion: weft.dev/v1alpha1
kind: ServiceLevelObjective
metadata: {name: ratings-availability, namespace: default}
spec:
  service: ratings
  sli: {successRate: {}}
  target: 99.9
  window: 28d
";

fn ratings_selector() -> Selector {
    Selector { destination_service: Some("ratings.default.svc.cluster.local".into()), ..Selector::default() }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

const H: Duration = Duration::from_secs(3600);
const M: Duration = Duration::from_secs(60);

#[tokio::test]
async fn fixed_stats_give_the_hand_computed_sli_budget_and_burn_rates() {
    // 20,000 requests, 10 of them 5xx, in every window: SLI 0.9995, error ratio 0.0005,
    // budget 0.001 -> burn 0.5, half the budget left; no alert.
    let stats = FixedStats {
        windows: vec![(ratings_selector(), WindowStats { requests: 20_000.0, errors: 10.0, ..WindowStats::default() })],
        ..FixedStats::default()
    };
    let engine = SloEngine::new(Arc::new(stats), "cluster.local", SloConfig::default());
    engine.evaluate(&resources(RATINGS), SystemTime::now());
    let st = engine.status();
    let s = &st[0];
    assert_eq!(s.service, "ratings.default.svc.cluster.local");
    assert!(close(s.sli_value.unwrap(), 0.9995), "{s:?}");
    assert!(close(s.budget_remaining, 0.5), "{s:?}");
    assert!(s.burn_rates.values().all(|b| close(*b, 0.5)), "{s:?}");
    assert!(s.alerts.iter().all(|a| !a.firing && a.since.is_none()), "{s:?}");
}

#[tokio::test]
async fn a_fast_burn_pages_then_resolves_with_since_at_each_transition() {
    let stats = Arc::new(PerWindow { sel: ratings_selector(), ..PerWindow::default() });
    let engine = SloEngine::new(stats.clone(), "cluster.local", SloConfig::default());
    let slos = resources(RATINGS);
    // Healthy: 1 error in 10,000 everywhere.
    for (_, d) in BURN_WINDOWS {
        stats.set(d, 10_000.0, 1.0);
    }
    stats.set(28 * 24 * H, 1_000_000.0, 100.0);
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    engine.evaluate(&slos, t0);
    assert!(engine.status()[0].alerts.iter().all(|a| !a.firing));

    // 2% errors over the last hour, 5% over 5 minutes, quiet longer windows:
    // burn(1h) = 0.02 / 0.001 = 20 > 14.4 and burn(5m) = 50 > 14.4 -> the 1h/5m page.
    // burn(6h) = 0.005/0.001 = 5 < 6 -> no 6h/30m page; burn(3d) = 0.5 -> no ticket.
    stats.set(5 * M, 1000.0, 50.0);
    stats.set(30 * M, 6000.0, 120.0);
    stats.set(H, 10_000.0, 200.0);
    stats.set(6 * H, 60_000.0, 300.0);
    stats.set(72 * H, 500_000.0, 250.0);
    let t1 = t0 + Duration::from_secs(30);
    engine.evaluate(&slos, t1);
    let s = engine.status()[0].clone();
    assert!(close(s.burn_rates["1h"], 20.0) && close(s.burn_rates["5m"], 50.0), "{s:?}");
    assert!(close(s.burn_rates["30m"], 20.0) && close(s.burn_rates["6h"], 5.0), "{s:?}");
    assert!(close(s.burn_rates["3d"], 0.5), "{s:?}");
    let firing: Vec<(&str, &str, Option<SystemTime>)> =
        s.alerts.iter().filter(|a| a.firing).map(|a| (a.rule.long, a.rule.short, a.since)).collect();
    assert_eq!(firing, [("1h", "5m", Some(t1))]);

    // Still burning: `since` stays at the first transition.
    let t2 = t1 + Duration::from_secs(30);
    engine.evaluate(&slos, t2);
    assert_eq!(engine.status()[0].alerts[0].since, Some(t1));

    // The 5m window recovers (burn 0.5): the page resolves at once, 1h still high.
    stats.set(5 * M, 1000.0, 0.5);
    let t3 = t2 + Duration::from_secs(30);
    engine.evaluate(&slos, t3);
    let a = &engine.status()[0].alerts[0];
    assert!(!a.firing && a.since == Some(t3), "{a:?}");

    // The JSON shape of /api/v1/slos.
    let v = engine.to_json();
    let slo = &v["slos"][0];
    assert_eq!(slo["name"], "ratings-availability");
    assert_eq!(slo["namespace"], "default");
    assert_eq!(slo["service"], "ratings.default.svc.cluster.local");
    assert_eq!(slo["sli"], "success-rate");
    assert_eq!(slo["target"], 0.999);
    assert_eq!(slo["window"], "28d");
    assert!(close(slo["sli_value"].as_f64().unwrap(), 0.9999), "{slo}");
    assert!(close(slo["budget_remaining"].as_f64().unwrap(), 0.9), "{slo}");
    let burns: Vec<&String> = slo["burn_rates"].as_object().unwrap().keys().collect();
    assert_eq!(burns.len(), 5, "{slo}");
    assert_eq!(slo["alerts"][0]["severity"], "page");
    assert_eq!(slo["alerts"][0]["long"], "1h");
    assert_eq!(slo["alerts"][0]["short"], "5m");
    assert_eq!(slo["alerts"][0]["factor"], 14.4);
    assert_eq!(slo["alerts"][0]["firing"], false);
    assert_eq!(slo["alerts"][0]["since"], humantime::format_rfc3339_seconds(t3).to_string());
    assert_eq!(slo["alerts"][2]["severity"], "ticket");
    assert_eq!(slo["alerts"][2]["since"], serde_json::Value::Null);
}

#[tokio::test]
async fn the_slow_page_and_the_ticket_follow_their_windows() {
    let stats = Arc::new(PerWindow { sel: ratings_selector(), ..PerWindow::default() });
    let engine = SloEngine::new(stats.clone(), "cluster.local", SloConfig::default());
    // 0.7% errors everywhere: burn 7 -> the 6h/30m page (> 6) and the ticket (> 1),
    // not the 1h/5m page (7 < 14.4).
    for (_, d) in BURN_WINDOWS {
        stats.set(d, 1000.0, 7.0);
    }
    engine.evaluate(&resources(RATINGS), SystemTime::now());
    let firing: Vec<(&str, &str)> =
        engine.status()[0].alerts.iter().filter(|a| a.firing).map(|a| (a.rule.long, a.rule.short)).collect();
    assert_eq!(firing, [("6h", "30m"), ("3d", "6h")]);
}

#[tokio::test]
async fn a_subset_selects_its_version_and_an_unknown_subset_is_reported() {
    let yaml = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v3, labels: {version: v3}}
  - {name: canary, labels: {track: canary}}
---
apiVersion: weft.dev/v1alpha1
kind: ServiceLevelObjective
metadata: {name: reviews-v3, namespace: default}
spec:
  service: reviews.default.svc.cluster.local
  subset: v3
  sli: {latency: {thresholdMs: 250}}
  target: 99
  window: 7d
---
apiVersion: weft.dev/v1alpha1
kind: ServiceLevelObjective
metadata: {name: reviews-canary, namespace: default}
spec:
  service: reviews
  subset: canary
  sli: {successRate: {}}
  target: 99
  window: 7d
";
    let sel = Selector {
        destination_service: Some("reviews.default.svc.cluster.local".into()),
        destination_version: Some("v3".into()),
        ..Selector::default()
    };
    // 100 requests, 90 within 250 ms: latency SLI 0.9, burn 0.1/0.01 = 10.
    let w = WindowStats {
        requests: 100.0,
        errors: 0.0,
        latency_ms: vec![(100.0, 60.0), (250.0, 90.0), (f64::INFINITY, 100.0)],
        covered: H,
    };
    let stats = FixedStats { windows: vec![(sel, w)], ..FixedStats::default() };
    let engine = SloEngine::new(Arc::new(stats), "cluster.local", SloConfig::default());
    engine.evaluate(&resources(yaml), SystemTime::now());
    let st = engine.status();
    let v3 = st.iter().find(|s| s.name == "reviews-v3").unwrap();
    assert_eq!(v3.version.as_deref(), Some("v3"));
    assert!(close(v3.sli_value.unwrap(), 0.9) && close(v3.burn_rates["1h"], 10.0), "{v3:?}");
    let canary = st.iter().find(|s| s.name == "reviews-canary").unwrap();
    assert!(canary.error.as_deref().unwrap_or("").contains("no `version` label"), "{canary:?}");
    let v = engine.to_json();
    let canary = v["slos"].as_array().unwrap().iter().find(|s| s["name"] == "reviews-canary").unwrap();
    assert!(canary["error"].as_str().is_some_and(|e| e.contains("version")), "{canary}");
    assert_eq!(canary["sli_value"], serde_json::Value::Null);
}

#[tokio::test]
async fn metrics_carry_the_slo_labels_and_pass_promtool() {
    let stats = FixedStats {
        windows: vec![(ratings_selector(), WindowStats { requests: 1000.0, errors: 20.0, ..WindowStats::default() })],
        ..FixedStats::default()
    };
    let engine = SloEngine::new(Arc::new(stats), "cluster.local", SloConfig::default());
    engine.evaluate(&resources(RATINGS), SystemTime::now());
    let text = engine.render_metrics();
    let l = "slo=\"ratings-availability\",namespace=\"default\",service=\"ratings.default.svc.cluster.local\"";
    let value = |series: String| -> f64 {
        let line =
            text.lines().find(|x| x.starts_with(&format!("{series} "))).unwrap_or_else(|| panic!("{series}: {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(close(value(format!("weft_slo_sli{{{l}}}")), 0.98));
    assert!(close(value(format!("weft_slo_burn_rate{{{l},window=\"1h\"}}")), 20.0));
    assert!(close(value(format!("weft_slo_error_budget_remaining{{{l}}}")), -19.0));
    assert_eq!(value(format!("weft_slo_alert_firing{{{l},severity=\"page\",long=\"1h\",short=\"5m\"}}")), 1.0);
    assert_eq!(value(format!("weft_slo_alert_firing{{{l},severity=\"ticket\",long=\"3d\",short=\"6h\"}}")), 1.0);
    if let Err(e) = weft_testkit::tools::promtool_check_metrics(&text).await {
        panic!("promtool: {e}\n{text}");
    }
}

/// An HTTP receiver on port 0 that hands every POSTed body to the test.
async fn receiver() -> (String, tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>) {
    use http_body_util::BodyExt;
    let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", sock.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = sock.accept().await else { return };
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let _ = tx.send(serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null));
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::new(),
                        )))
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
async fn firing_and_resolved_are_posted_to_the_slo_and_global_webhooks() {
    let (global, mut global_rx) = receiver().await;
    let (own, mut own_rx) = receiver().await;
    let stats = Arc::new(PerWindow { sel: ratings_selector(), ..PerWindow::default() });
    let cfg = SloConfig { webhook: Some(global), ..SloConfig::default() };
    let engine = SloEngine::new(stats.clone(), "cluster.local", cfg);
    let yaml = format!("{RATINGS}  alert: {{webhook: '{own}'}}\n");
    let slos = resources(&yaml);
    for (_, d) in BURN_WINDOWS {
        stats.set(d, 1000.0, 100.0); // burn 100 everywhere: all three alerts fire
    }
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    engine.evaluate(&slos, t);
    engine.evaluate(&slos, t + Duration::from_secs(1)); // no transition, nothing sent
    for (_, d) in BURN_WINDOWS {
        stats.set(d, 1000.0, 0.0);
    }
    engine.evaluate(&slos, t + Duration::from_secs(2));
    for rx in [&mut global_rx, &mut own_rx] {
        let mut got = Vec::new();
        for _ in 0..6 {
            let v = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.expect("notification").unwrap();
            got.push((v["status"].as_str().unwrap().to_string(), v["long"].as_str().unwrap().to_string()));
            assert_eq!(v["slo"]["name"], "ratings-availability");
            assert_eq!(v["slo"]["service"], "ratings.default.svc.cluster.local");
        }
        let want: Vec<(String, String)> = ["firing", "resolved"]
            .iter()
            .flat_map(|s| ["1h", "6h", "3d"].iter().map(move |l| (s.to_string(), l.to_string())))
            .collect();
        assert_eq!(got, want);
    }
    // The unchanged evaluation between the two sent nothing: the queue is in order, so
    // anything it sent would sit between the firing and the resolved notifications.
}

#[tokio::test]
async fn a_source_reporter_slo_reads_what_the_callers_saw() {
    // The callers' sidecars saw 100 requests, 50 aborted by an injected fault; the
    // service's own sidecars saw the other 50, all fine.
    let source = Selector { reporter: Reporter::Source, ..ratings_selector() };
    let stats = FixedStats {
        windows: vec![
            (source, WindowStats { requests: 100.0, errors: 50.0, ..WindowStats::default() }),
            (ratings_selector(), WindowStats { requests: 50.0, errors: 0.0, ..WindowStats::default() }),
        ],
        ..FixedStats::default()
    };
    let engine = SloEngine::new(Arc::new(stats), "cluster.local", SloConfig::default());
    let yaml = format!("{RATINGS}  reporter: source\n---\n{}", RATINGS.replace("ratings-availability", "served"));
    engine.evaluate(&resources(&yaml), SystemTime::now());
    let st = engine.status();
    assert!(close(st[0].sli_value.unwrap(), 0.5), "{:?}", st[0]);
    assert!(close(st[1].sli_value.unwrap(), 1.0), "{:?}", st[1]);
}

#[tokio::test]
async fn only_the_leader_notifies_and_a_new_leader_sends_only_what_was_not_sent() {
    let (url, mut rx) = receiver().await;
    let stats = Arc::new(PerWindow { sel: ratings_selector(), ..PerWindow::default() });
    let shared: Arc<dyn crate::rollout::RolloutStateStore> = Arc::new(crate::rollout::MemoryStateStore::default());
    let (a_lead, a_rx) = tokio::sync::watch::channel(true);
    let (b_lead, b_rx) = tokio::sync::watch::channel(false);
    let engine = |rx| {
        let cfg = SloConfig { webhook: Some(url.clone()), ..SloConfig::default() };
        SloEngine::replicated(stats.clone(), "cluster.local", cfg, shared.clone(), Leadership::following(rx))
    };
    let (a, b) = (engine(a_rx), engine(b_rx));
    let slos = resources(RATINGS);
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    // Burning: both replicas see the three alerts fire; only the leader (a) notifies.
    for (_, d) in BURN_WINDOWS {
        stats.set(d, 1000.0, 100.0);
    }
    a.evaluate(&slos, t);
    b.evaluate(&slos, t);
    assert!(b.status()[0].alerts.iter().all(|x| x.firing), "the follower evaluates too");
    for _ in 0..3 {
        next(&mut rx, "firing").await;
    }
    // Failover while still firing: the new leader (b) finds the firing already sent.
    a_lead.send_replace(false);
    b_lead.send_replace(true);
    b.evaluate(&slos, t + Duration::from_secs(1));
    a.evaluate(&slos, t + Duration::from_secs(1));
    // The burning stops: the new leader sends the three resolved, the old one nothing.
    for (_, d) in BURN_WINDOWS {
        stats.set(d, 1000.0, 0.0);
    }
    a.evaluate(&slos, t + Duration::from_secs(2));
    b.evaluate(&slos, t + Duration::from_secs(2));
    for _ in 0..3 {
        next(&mut rx, "resolved").await;
    }
    // Every POST was answered: a sent the firing three, b the resolved three, no more.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while a.notifications().sent + b.notifications().sent < 6 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!((a.notifications().sent, b.notifications().sent), (3, 3));
}

async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>, want: &str) {
    let v = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.expect("notification").unwrap();
    assert_eq!(v["status"], want, "{v}");
}
