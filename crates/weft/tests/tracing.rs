//! Tracing end to end, as a user runs it: in-test collectors (OTLP/gRPC decoded with the
//! official OpenTelemetry protos, Zipkin v2 JSON), the real `weft up --tracing ...` with
//! Bookinfo, requests through the ingress gateway. Each request must become one trace,
//! gateway -> productpage -> details / reviews -> ratings, with parent ids chained and
//! Istio's attributes; a Telemetry resource's sampling must hold statistically; a
//! collector that is down must cost no request and leave the proxies' span queues bounded.
//! And the same trees in a real Jaeger (v2, built by `scripts/setup.sh`), read back through
//! the query API its UI uses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "tracing/collectors.rs"]
mod collectors;
#[path = "support/up_mesh.rs"]
mod up_mesh;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use collectors::{Collector, Kind, Span};
use up_mesh::UpMesh;

/// The ingress gateway `weft up` runs (its proxy name).
const GATEWAY: &str = "istio-ingressgateway-local";

/// A running `weft up` (Bookinfo) with `--tracing`.
struct Mesh {
    up: UpMesh,
    ingress: String,
    /// Workload name -> address (from the summary).
    workloads: BTreeMap<String, String>,
}

impl Mesh {
    fn start(tracing: &str) -> Mesh {
        let up = UpMesh::start(None, &["--access-log", "off", "--tracing", tracing, "--trace-sampling", "100"], 6);
        assert!(
            up.output.iter().any(|l| l.trim_start().starts_with("tracing") && l.contains(tracing)),
            "the summary names the collector: {:#?}",
            up.output
        );
        let (ingress, workloads) = (up.ingress.clone(), up.workloads.clone());
        Mesh { up, ingress, workloads }
    }

    fn weft(&self, args: &[&str]) -> (bool, String) {
        self.up.weft(args)
    }

    /// Applies the mesh-wide Telemetry: `percent` sampling, the request's
    /// `x-test-request` header and a literal as custom tags; returns once the gateway
    /// is served that sampling and every proxy has ACKed what it is served.
    fn telemetry(&self, percent: u32) {
        let yaml = format!(
            "apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: mesh-default, namespace: istio-system}}
spec:
  tracing:
  - randomSamplingPercentage: {percent}
    customTags:
      test.request: {{header: {{name: x-test-request, defaultValue: none}}}}
      test.mesh: {{literal: {{value: weft}}}}
"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("telemetry.yaml");
        std::fs::write(&file, yaml).unwrap();
        let (ok, out) = self.weft(&["apply", "-f", file.to_str().unwrap()]);
        assert!(ok, "weft apply: {out}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, config) = self.weft(&["proxy-config", GATEWAY, "listeners", "-o", "json"]);
            let mut sampling = Vec::new();
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&config) {
                collect_key(&v, "random_sampling", &mut sampling);
            }
            let served = !sampling.is_empty() && sampling.iter().all(|s| s.as_f64() == Some(f64::from(percent)));
            let (_, status) = self.weft(&["proxy-status", "-o", "json"]);
            let synced = serde_json::from_str::<serde_json::Value>(&status).is_ok_and(|v| {
                let proxies = v["proxies"].as_array().cloned().unwrap_or_default();
                proxies.len() == 8
                    && proxies.iter().all(|p| {
                        p["types"]
                            .as_object()
                            .is_some_and(|t| t.values().all(|s| s["status"] == "SYNCED" || s["status"] == "NOT SENT"))
                    })
            });
            if served && synced {
                return;
            }
            assert!(Instant::now() < deadline, "sampling {percent} not served and ACKed in 30 s: {config}\n{status}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// GET through the ingress with `x-test-request: tag`: the status.
    fn get(&self, path: &str, tag: &str) -> u16 {
        let o = Command::new(weft_testkit::tools::require("curl"))
            .args(["-s", "-o", "/dev/null", "-m", "20", "-w", "%{http_code}", "-H"])
            .arg(format!("x-test-request: {tag}"))
            .arg(format!("http://{}{path}", self.ingress))
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().parse().unwrap_or(0)
    }

    fn metrics(&self, workload: &str) -> String {
        let ip = &self.workloads[workload];
        let o = Command::new(weft_testkit::tools::require("curl"))
            .args(["-s", "-m", "5", &format!("http://{ip}:15020/stats/prometheus")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

fn collect_key(v: &serde_json::Value, key: &str, out: &mut Vec<serde_json::Value>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if k == key && !x.is_null() {
                    out.push(x.clone());
                }
                collect_key(x, key, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_key(x, key, out)),
        _ => {}
    }
}

/// Waits up to 60 s for `check` to pass on the collector's spans; panics with its last
/// complaint.
fn eventually<T>(collector: &Collector, what: &str, check: impl Fn(&[Span]) -> Result<T, String>) -> T {
    eventually_on(|| collector.spans(), what, check)
}

/// [`eventually`] on the spans `fetch` returns.
fn eventually_on<T>(fetch: impl Fn() -> Vec<Span>, what: &str, check: impl Fn(&[Span]) -> Result<T, String>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let spans = fetch();
        match check(&spans) {
            Ok(t) => return t,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}\n{} spans received", spans.len()),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn attr<'a>(s: &'a Span, k: &str) -> &'a str {
    s.attrs.get(k).map(String::as_str).unwrap_or("")
}

fn service(s: &Span) -> &str {
    attr(s, "istio.canonical_service")
}

/// The root (gateway) span of the request tagged `tag`.
fn root<'a>(spans: &'a [Span], tag: &str) -> Option<&'a Span> {
    spans.iter().find(|s| s.parent_id.is_none() && attr(s, "test.request") == tag)
}

/// The one span of `trace` from `svc` of `kind` whose parent is `parent` (and, for client
/// spans, whose upstream cluster names `upstream`).
fn child<'a>(trace: &[&'a Span], parent: &Span, svc: &str, kind: Kind, upstream: &str) -> Result<&'a Span, String> {
    let found: Vec<&&Span> = trace
        .iter()
        .filter(|s| service(s) == svc && s.kind == kind && attr(s, "upstream_cluster").contains(upstream))
        .collect();
    match found.as_slice() {
        [one] if one.parent_id.as_deref() == Some(parent.span_id.as_str()) => Ok(one),
        [one] => Err(format!(
            "{svc} {kind:?} span's parent is {:?}, not {} ({}'s span)",
            one.parent_id,
            parent.span_id,
            service(parent)
        )),
        other => Err(format!("{} {svc} {kind:?} spans (upstream {upstream:?}) in the trace", other.len())),
    }
}

/// The whole trace of the `/productpage` request tagged `tag`: gateway -> productpage
/// (server) -> productpage clients -> details and reviews (servers) -> reviews client ->
/// ratings (server, unless reviews v1 answered), every parent id the span before, every
/// span carrying Istio's attributes and the request's id.
fn productpage_trace(spans: &[Span], tag: &str) -> Result<usize, String> {
    let g = root(spans, tag).ok_or_else(|| format!("no gateway span tagged {tag} yet"))?;
    let trace: Vec<&Span> = spans.iter().filter(|s| s.trace_id == g.trace_id).collect();
    let req = |svc, kind, up| (svc, kind, up);
    let pp = child(&trace, g, "productpage", Kind::Server, "").map_err(|e| format!("{tag}: {e}"))?;
    let mut expected = vec![
        (g, req("istio-ingressgateway", Kind::Client, "productpage")),
        (pp, req("productpage", Kind::Server, "inbound")),
    ];
    let to_details = child(&trace, pp, "productpage", Kind::Client, "details").map_err(|e| format!("{tag}: {e}"))?;
    let details = child(&trace, to_details, "details", Kind::Server, "").map_err(|e| format!("{tag}: {e}"))?;
    let to_reviews = child(&trace, pp, "productpage", Kind::Client, "reviews").map_err(|e| format!("{tag}: {e}"))?;
    let reviews = child(&trace, to_reviews, "reviews", Kind::Server, "").map_err(|e| format!("{tag}: {e}"))?;
    expected.extend([
        (to_details, req("productpage", Kind::Client, "details")),
        (details, req("details", Kind::Server, "inbound")),
        (to_reviews, req("productpage", Kind::Client, "reviews")),
        (reviews, req("reviews", Kind::Server, "inbound")),
    ]);
    if !attr(reviews, "node_id").contains("reviews-v1") {
        let to_ratings =
            child(&trace, reviews, "reviews", Kind::Client, "ratings").map_err(|e| format!("{tag}: {e}"))?;
        let ratings = child(&trace, to_ratings, "ratings", Kind::Server, "").map_err(|e| format!("{tag}: {e}"))?;
        expected.extend([
            (to_ratings, req("reviews", Kind::Client, "ratings")),
            (ratings, req("ratings", Kind::Server, "inbound")),
        ]);
    }
    if trace.len() != expected.len() {
        return Err(format!("{tag}: {} spans in the trace, expected {}: {trace:#?}", trace.len(), expected.len()));
    }
    let request_id = attr(g, "guid:x-request-id");
    assert!(!request_id.is_empty(), "the gateway span carries guid:x-request-id: {g:#?}");
    for (s, (svc, kind, upstream)) in &expected {
        let ctx = format!("{tag}: {svc} {kind:?} span {s:#?}");
        assert_eq!(s.trace_id.len(), 32, "128-bit trace id: {ctx}");
        assert_eq!(s.span_id.len(), 16, "{ctx}");
        let gateway = *svc == "istio-ingressgateway";
        assert!(attr(s, "node_id").starts_with(if gateway { "router~" } else { "sidecar~" }), "node_id: {ctx}");
        assert_eq!(attr(s, "http.method"), "GET", "{ctx}");
        assert_eq!(attr(s, "http.status_code"), "200", "{ctx}");
        assert_eq!(attr(s, "guid:x-request-id"), request_id, "the request id the apps forward: {ctx}");
        assert_eq!(attr(s, "istio.namespace"), if gateway { "istio-system" } else { "default" }, "{ctx}");
        assert_eq!(attr(s, "istio.mesh_id"), "cluster.local", "{ctx}");
        assert!(attr(s, "upstream_cluster").contains(upstream), "upstream_cluster: {ctx}");
        assert_eq!(attr(s, "test.mesh"), "weft", "literal custom tag: {ctx}");
        // The header custom tag: the gateway and productpage's inbound see the test's
        // header; the apps do not forward it, so later hops record the default.
        let seen = gateway || (*svc == "productpage" && *kind == Kind::Server);
        assert_eq!(attr(s, "test.request"), if seen { tag } else { "none" }, "header custom tag: {ctx}");
        if *kind == Kind::Client && !gateway {
            // Istio's decorator: the destination service's `<host>:<port>/*`.
            assert!(s.name.ends_with(".default.svc.cluster.local:9080/*"), "span name: {ctx}");
        }
    }
    assert_eq!(g.name, "productpage.default.svc.cluster.local:9080/*", "gateway span name");
    Ok(trace.len())
}

/// `count` of `n` draws with probability `p` is within 4.5 standard deviations.
fn within(count: usize, n: usize, p: f64) -> bool {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    (count as f64 - mean).abs() <= 4.5 * sd + 0.5
}

/// The sum of a Prometheus counter family in `text`.
fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.trim().parse::<f64>().ok()))
        .sum()
}

#[test]
fn otlp_traces_bookinfo_requests_end_to_end_samples_per_telemetry_and_survives_a_dead_collector() {
    let mut otlp = collectors::otlp();
    let mesh = Mesh::start(&format!("otlp://{}", otlp.addr));
    mesh.telemetry(100);
    // What weft does not apply is said at apply time, with analyze's code.
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs.yaml");
    let text = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: logs, namespace: default}\nspec:\n  accessLogging: [{disabled: true}]\n";
    std::fs::write(&logs, text).unwrap();
    let (ok, out) = mesh.weft(&["apply", "-f", logs.to_str().unwrap()]);
    assert!(ok && out.contains("warning: Error [WFT0002]") && out.contains("accessLogging[0] is not applied"), "{out}");
    let (ok, out) = mesh.weft(&["delete", "-f", logs.to_str().unwrap()]);
    assert!(ok, "{out}");

    // One trace per request, the whole Bookinfo call tree in it.
    let tags: Vec<String> = (0..12).map(|i| format!("tree-{i}")).collect();
    for t in &tags {
        assert_eq!(mesh.get("/productpage", t), 200, "{t}");
    }
    let mut traces = BTreeSet::new();
    for t in &tags {
        eventually(&otlp, "the request's trace is complete", |spans| productpage_trace(spans, t));
        traces.insert(root(&otlp.spans(), t).unwrap().trace_id.clone());
    }
    assert_eq!(traces.len(), tags.len(), "each request is its own trace");
    let spans = otlp.spans();
    println!("{} spans in {} traces; one: {:#?}", spans.len(), traces.len(), root(&spans, "tree-0"));
    let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    for s in ["istio-ingressgateway.istio-system", "productpage.default", "details.default", "reviews.default"] {
        assert!(services.contains(s), "OTLP resource service.name {s} in {services:?}");
    }

    // Sampling at 50% (a Telemetry resource), decided once at the gateway.
    mesh.telemetry(50);
    let n = 200;
    for i in 0..n {
        assert_eq!(mesh.get("/api/v1/products", &format!("sample-{i}")), 200);
    }
    mesh.telemetry(100);
    assert_eq!(mesh.get("/api/v1/products", "marker"), 200);
    // The gateway exports its spans in order: once the marker is in, so is every
    // sampled request before it.
    eventually(&otlp, "the marker's gateway span", |spans| {
        root(spans, "marker").map(|_| ()).ok_or_else(|| "not yet".to_string())
    });
    let spans = otlp.spans();
    let sampled: BTreeSet<&str> = spans
        .iter()
        .filter(|s| s.parent_id.is_none() && attr(s, "test.request").starts_with("sample-"))
        .map(|s| s.trace_id.as_str())
        .collect();
    println!("{} of {n} requests sampled at 50%", sampled.len());
    assert!(within(sampled.len(), n, 0.5), "{} of {n} requests sampled at 50%", sampled.len());
    let downstream: BTreeSet<&str> = spans
        .iter()
        .filter(|s| s.parent_id.is_some() && attr(s, "test.request").starts_with("sample-"))
        .map(|s| s.trace_id.as_str())
        .collect();
    assert!(downstream.is_subset(&sampled), "productpage follows the gateway's decision");

    // The collector goes down: every request still succeeds, the span queues stay bounded.
    otlp.stop();
    let before = sum(&mesh.metrics("productpage-v1"), "weft_tracing_spans_dropped_total");
    for i in 0..100 {
        assert_eq!(mesh.get("/productpage", &format!("down-{i}")), 200, "request {i} with the collector down");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = mesh.metrics("productpage-v1");
        let dropped = sum(&m, "weft_tracing_spans_dropped_total");
        let queued = sum(&m, "weft_tracing_queue_spans");
        assert!(queued <= 4096.0, "the span queue is bounded: {queued}");
        if dropped > before {
            break;
        }
        assert!(Instant::now() < deadline, "no span counted as dropped with the collector down: {m}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn zipkin_receives_the_same_bookinfo_trace_tree_as_json() {
    let zipkin = collectors::zipkin();
    let mesh = Mesh::start(&format!("zipkin://{}", zipkin.addr));
    mesh.telemetry(100);
    let tags: Vec<String> = (0..6).map(|i| format!("zipkin-{i}")).collect();
    for t in &tags {
        assert_eq!(mesh.get("/productpage", t), 200, "{t}");
    }
    let mut traces = BTreeSet::new();
    for t in &tags {
        eventually(&zipkin, "the request's trace is complete", |spans| productpage_trace(spans, t));
        traces.insert(root(&zipkin.spans(), t).unwrap().trace_id.clone());
    }
    assert_eq!(traces.len(), tags.len(), "each request is its own trace");
    let spans = zipkin.spans();
    let ids: BTreeSet<(&str, &str)> = spans.iter().map(|s| (s.trace_id.as_str(), s.span_id.as_str())).collect();
    assert_eq!(ids.len(), spans.len(), "shared_span_context false: every span has its own id");
    assert!(spans.iter().any(|s| s.service == "productpage.default"), "localEndpoint.serviceName");
}

/// A real Jaeger v2 (`.tools/bin/jaeger`): OTLP/gRPC in, in-memory storage, the query
/// API on its own port. Killed on drop.
struct Jaeger {
    child: Child,
    otlp: String,
    query: String,
    _dir: tempfile::TempDir,
}

impl Jaeger {
    fn start() -> Jaeger {
        let dir = tempfile::tempdir().unwrap();
        let [otlp, query, query_grpc] = [(); 3].map(|_| format!("127.0.0.1:{}", weft_testkit::net::reserve_port()));
        let config = format!(
            "service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
extensions:
  jaeger_storage:
    backends:
      mem:
        memory:
          max_traces: 10000
  jaeger_query:
    storage:
      traces: mem
    http:
      endpoint: {query}
    grpc:
      endpoint: {query_grpc}
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: {otlp}
processors:
  batch:
    timeout: 200ms
exporters:
  jaeger_storage_exporter:
    trace_storage: mem
"
        );
        let file = dir.path().join("jaeger.yaml");
        std::fs::write(&file, config).unwrap();
        let log = std::fs::File::create(dir.path().join("jaeger.log")).unwrap();
        let child = Command::new(weft_testkit::tools::require("jaeger"))
            .arg("--config")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut jaeger = Jaeger { child, otlp, query, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while jaeger.get("/api/services").is_none() || std::net::TcpStream::connect(&jaeger.otlp).is_err() {
            if let Ok(Some(status)) = jaeger.child.try_wait() {
                let log = std::fs::read_to_string(jaeger._dir.path().join("jaeger.log")).unwrap_or_default();
                panic!("jaeger exited ({status}): {log}");
            }
            assert!(Instant::now() < deadline, "jaeger not serving within 60 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        jaeger
    }

    /// The JSON of a GET on the query API, if it answered 200.
    fn get(&self, path: &str) -> Option<serde_json::Value> {
        let o = Command::new(weft_testkit::tools::require("curl"))
            .args(["-s", "-f", "-m", "5", &format!("http://{}{path}", self.query)])
            .output()
            .ok()?;
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    /// Every span of the traces that touch `service`, as the UI's API returns them.
    fn spans(&self, service: &str) -> Vec<Span> {
        let Some(v) = self.get(&format!("/api/traces?service={service}&limit=1000")) else { return Vec::new() };
        let mut out = Vec::new();
        for trace in v["data"].as_array().into_iter().flatten() {
            let processes = &trace["processes"];
            for s in trace["spans"].as_array().into_iter().flatten() {
                let text = |v: &serde_json::Value| match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let attrs: BTreeMap<String, String> = s["tags"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| (t["key"].as_str().unwrap_or_default().to_string(), text(&t["value"])))
                    .collect();
                let parent = s["references"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|r| r["refType"] == "CHILD_OF")
                    .and_then(|r| r["spanID"].as_str())
                    .map(str::to_string);
                let kind = match attrs.get("span.kind").map(String::as_str) {
                    Some("server") => Kind::Server,
                    Some("client") => Kind::Client,
                    _ => Kind::Other,
                };
                let process = s["processID"].as_str().unwrap_or_default();
                out.push(Span {
                    trace_id: s["traceID"].as_str().unwrap_or_default().to_string(),
                    span_id: s["spanID"].as_str().unwrap_or_default().to_string(),
                    parent_id: parent,
                    name: s["operationName"].as_str().unwrap_or_default().to_string(),
                    kind,
                    service: processes[process]["serviceName"].as_str().unwrap_or_default().to_string(),
                    attrs,
                });
            }
        }
        out
    }
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_real_jaeger_shows_each_bookinfo_request_as_one_trace() {
    let jaeger = Jaeger::start();
    let mesh = Mesh::start(&format!("otlp://{}", jaeger.otlp));
    mesh.telemetry(100);
    let tags: Vec<String> = (0..4).map(|i| format!("jaeger-{i}")).collect();
    for t in &tags {
        assert_eq!(mesh.get("/productpage", t), 200, "{t}");
    }
    let mut traces = BTreeSet::new();
    for t in &tags {
        let fetch = || jaeger.spans("productpage.default");
        eventually_on(fetch, "Jaeger holds the request's whole trace", |spans| productpage_trace(spans, t));
        traces.insert(root(&jaeger.spans("productpage.default"), t).unwrap().trace_id.clone());
    }
    assert_eq!(traces.len(), tags.len(), "each request is its own trace in Jaeger");
    // Jaeger lists every service that reported, under the names Istio's sidecars use.
    let services = jaeger.get("/api/services").unwrap();
    let names: BTreeSet<&str> = services["data"].as_array().unwrap().iter().filter_map(|s| s.as_str()).collect();
    for svc in ["productpage.default", "details.default", "reviews.default"] {
        assert!(names.contains(svc), "{svc} in {names:?}");
    }
}
