//! The dashboard in a real browser: Debian's Chromium (headless, driven over WebDriver by
//! chromedriver; both installed by `scripts/setup.sh`, the test fails without them)
//! against `weft up`'s Bookinfo under traffic through the ingress gateway.
//!
//! What the page shows is read back from the rendered SVG (each edge carries its numbers
//! in `data-*` attributes): the graph has Bookinfo's workloads, services and edges with
//! plausible rates and mTLS, the ingress gateway, and a caller outside the mesh (requests
//! straight to productpage's sidecar) as `unknown`; an abort injected on `ratings` burns
//! the ratings SLO's error budget in the SLO panel and turns the reviews → ratings
//! edges red while productpage → details stays healthy; a weight shift on `reviews` moves
//! the traffic to the `reviews-v3` edge and the v1/v2 edges go away. Screenshots of each
//! step are kept under `target/dashboard-browser/` (the test prints the path).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/up_mesh.rs"]
mod up_mesh;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use up_mesh::UpMesh;

/// How long the page may take to show what the mesh does (scrapes every second, the
/// page polls every 5 s, the 30 s window must roll past the previous traffic).
const SHOW_DEADLINE: Duration = Duration::from_secs(120);
const RATINGS: &str = "svc:ratings.default.svc.cluster.local";
const REVIEWS: &str = "svc:reviews.default.svc.cluster.local";
const DETAILS: &str = "svc:details.default.svc.cluster.local";
const PRODUCTPAGE: &str = "svc:productpage.default.svc.cluster.local";

/// chromedriver with one headless Chromium session.
struct Browser {
    child: Child,
    base: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let chromedriver = weft_testkit::tools::require("chromedriver");
        let chromium = weft_testkit::tools::require("chromium");
        let profile = tempfile::tempdir().unwrap();
        let port = weft_testkit::net::reserve_port();
        let log = std::fs::File::create(profile.path().join("chromedriver.log")).unwrap();
        let child = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut b =
            Browser { child, base: format!("http://127.0.0.1:{port}"), session: String::new(), _profile: profile };
        let deadline = Instant::now() + Duration::from_secs(30);
        while b.call("GET", "/status", None).map(|v| v["value"]["ready"] != json!(true)).unwrap_or(true) {
            assert!(Instant::now() < deadline, "chromedriver not ready within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.to_string_lossy(),
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--disable-dev-shm-usage", "--window-size=1500,1000",
                         format!("--user-data-dir={}", b._profile.path().join("profile").display())],
            },
        }}});
        let v = b.call("POST", "/session", Some(caps)).expect("a Chromium session");
        b.session = v["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {v}")).to_string();
        b
    }

    /// One WebDriver command (through curl): the JSON answer, or the error it carries.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let mut c = Command::new(weft_testkit::tools::require("curl"));
        c.args(["-s", "-m", "60", "-X", method, "-H", "content-type: application/json"]);
        if let Some(b) = body {
            c.arg("--data-binary").arg(b.to_string());
        }
        let o = c.arg(format!("{}{path}", self.base)).stderr(Stdio::null()).output().map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&o.stdout).map_err(|e| format!("{method} {path}: {e}"))?;
        match v["value"].get("error") {
            Some(e) => Err(format!("{method} {path}: {e}: {}", v["value"]["message"])),
            None => Ok(v),
        }
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body).unwrap()
    }

    fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({"url": url})));
    }

    fn script(&self, js: &str) -> Value {
        self.session_call("POST", "/execute/sync", Some(json!({"script": js, "args": []})))["value"].clone()
    }

    fn screenshot(&self, path: &Path) {
        let v = self.session_call("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD.decode(v["value"].as_str().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
        println!("screenshot: {}", path.display());
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The graph as rendered: nodes (id -> kind) and edges.
#[derive(Debug)]
struct Shown {
    nodes: Vec<(String, String)>,
    edges: Vec<EdgeShown>,
}

#[derive(Debug, Clone)]
struct EdgeShown {
    source: String,
    target: String,
    rps: f64,
    requests: f64,
    errors: f64,
    success: Option<f64>,
    mtls: bool,
}

impl Shown {
    fn read(b: &Browser) -> Shown {
        let v = b.script(
            "return {nodes: Array.from(document.querySelectorAll('#graph g.node')).map(n => [n.dataset.id, n.dataset.kind]),
                     edges: Array.from(document.querySelectorAll('#graph g.edge')).map(e => Object.assign({}, e.dataset))};",
        );
        let nodes = v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| (n[0].as_str().unwrap_or("").to_string(), n[1].as_str().unwrap_or("").to_string()))
            .collect();
        let num = |e: &Value, k: &str| e[k].as_str().and_then(|s| s.parse::<f64>().ok());
        let edges = v["edges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| EdgeShown {
                source: e["source"].as_str().unwrap_or("").to_string(),
                target: e["target"].as_str().unwrap_or("").to_string(),
                rps: num(e, "rps").unwrap_or(0.0),
                requests: num(e, "requests").unwrap_or(0.0),
                errors: num(e, "errors").unwrap_or(0.0),
                success: num(e, "success"),
                mtls: e["mtls"] == "true",
            })
            .collect();
        Shown { nodes, edges }
    }

    fn edge(&self, source: &str, target: &str) -> Option<&EdgeShown> {
        self.edges.iter().find(|e| e.source == source && e.target == target)
    }

    fn has_node(&self, id: &str) -> bool {
        self.nodes.iter().any(|(n, _)| n == id)
    }
}

fn wl(name: &str) -> String {
    format!("wl:default/{name}")
}

/// Polls the rendered graph until `check` passes; panics with the last graph and
/// reason otherwise.
fn wait_graph(b: &Browser, what: &str, check: impl Fn(&Shown) -> Result<(), String>) -> Shown {
    let deadline = Instant::now() + SHOW_DEADLINE;
    loop {
        let shown = Shown::read(b);
        match check(&shown) {
            Ok(()) => return shown,
            Err(why) => assert!(Instant::now() < deadline, "{what}: {why}\nshown: {shown:#?}"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One `GET path` to `addr` (HTTP/1.1, closed after): whether it answered 200.
fn get(addr: &str, host: &str, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let mut out = Vec::new();
    s.write_all(req.as_bytes()).is_ok() && s.read_to_end(&mut out).is_ok() && out.starts_with(b"HTTP/1.1 200")
}

/// `GET /productpage` through the ingress gateway in a loop until stopped, counting
/// 200s; every fifth time also straight to productpage's sidecar (`direct`, its inbound
/// port), as a caller outside the mesh.
fn traffic(ingress: String, direct: String, stop: Arc<AtomicBool>, ok: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if get(&ingress, &ingress, "/productpage") {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            if n.is_multiple_of(5) {
                get(&direct, "productpage:9080", "/productpage");
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

fn artefacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/dashboard-browser");
    std::fs::create_dir_all(&dir).unwrap();
    dir.canonicalize().unwrap()
}

#[test]
fn the_dashboard_shows_bookinfo_its_faults_and_weight_shifts_in_chromium() {
    let browser = Browser::start();
    let up = UpMesh::start(None, &["--access-log", "off", "--stats-interval", "1s"], 6);
    let url = up
        .output
        .iter()
        .find_map(|l| l.trim_start().strip_prefix("dashboard")?.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| panic!("weft up prints the dashboard URL: {:#?}", up.output));
    let (ok, printed) = up.weft(&["dashboard"]);
    assert!(ok && printed.trim() == url, "weft dashboard prints {url}: {printed}");
    let dir = artefacts();
    // Bookinfo's SLOs (samples/slo): ratings' availability as its callers see it.
    up.apply_yaml(&weft_testkit::conformance("slo/bookinfo-slos.yaml"));

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let direct = format!("{}:15006", up.workloads["productpage-v1"]);
    let load = traffic(up.ingress.clone(), direct, stop.clone(), served.clone());

    browser.goto(&format!("{url}?window=30s#graph"));
    // 1. Bookinfo: every workload and service, the ingress and its edges, all healthy
    //    and mTLS inside the mesh; productpage calls details and reviews once per page.
    let shown = wait_graph(&browser, "Bookinfo's graph", |g| {
        for n in ["productpage-v1", "details-v1", "reviews-v1", "reviews-v2", "reviews-v3", "ratings-v1"] {
            if !g.has_node(&wl(n)) {
                return Err(format!("no node {n}"));
            }
        }
        let ingress = g.nodes.iter().find(|(_, k)| k == "ingress").ok_or("no ingress node")?;
        g.edge(&ingress.0, PRODUCTPAGE).ok_or("no ingress -> productpage edge")?;
        // The caller outside the mesh, plain text.
        let outside = g.edge("unknown", PRODUCTPAGE).ok_or("no unknown -> productpage edge")?;
        if outside.mtls || outside.rps <= 0.0 {
            return Err(format!("the outside caller's edge: {outside:?}"));
        }
        for (s, t) in [
            (wl("productpage-v1"), DETAILS),
            (wl("productpage-v1"), REVIEWS),
            (REVIEWS.to_string(), &wl("reviews-v1")),
            (REVIEWS.to_string(), &wl("reviews-v2")),
            (REVIEWS.to_string(), &wl("reviews-v3")),
            (wl("reviews-v2"), RATINGS),
            (wl("reviews-v3"), RATINGS),
            (RATINGS.to_string(), &wl("ratings-v1")),
        ] {
            let e = g.edge(&s, t).ok_or(format!("no edge {s} -> {t}"))?;
            if e.rps <= 0.0 || e.success != Some(1.0) || !e.mtls {
                return Err(format!("edge {s} -> {t} not healthy mTLS traffic: {e:?}"));
            }
        }
        if g.edge(&wl("reviews-v1"), RATINGS).is_some() {
            return Err("reviews-v1 does not call ratings".into());
        }
        Ok(())
    });
    let details = shown.edge(&wl("productpage-v1"), DETAILS).unwrap().clone();
    let reviews = shown.edge(&wl("productpage-v1"), REVIEWS).unwrap().clone();
    let ingress_id = shown.nodes.iter().find(|(_, k)| k == "ingress").unwrap().0.clone();
    let pages =
        shown.edge(&ingress_id, PRODUCTPAGE).unwrap().requests + shown.edge("unknown", PRODUCTPAGE).unwrap().requests;
    // Plausible rates: each page (through the ingress or not) is one call to details and
    // one to reviews (counted in the same window, so within a scrape's worth of each
    // other), and the reviews versions add up to what productpage sent.
    let close = |a: f64, b: f64| (a - b).abs() <= 0.25 * a.max(b) + 5.0;
    assert!(close(details.requests, pages), "details {details:?} vs {pages} pages");
    assert!(close(reviews.requests, pages), "reviews {reviews:?} vs {pages} pages");
    let versions: f64 =
        ["reviews-v1", "reviews-v2", "reviews-v3"].iter().map(|v| shown.edge(REVIEWS, &wl(v)).unwrap().requests).sum();
    assert!(close(versions, reviews.requests), "versions {versions} vs productpage -> reviews {reviews:?}");
    assert!(served.load(Ordering::Relaxed) > 0, "the ingress served pages");
    browser.screenshot(&dir.join("graph.png"));

    // The service page: charts drawn from the time series, the config that applies.
    browser.goto(&format!("{url}?window=5m#service/reviews.default.svc.cluster.local"));
    let deadline = Instant::now() + SHOW_DEADLINE;
    loop {
        let v = browser.script("return {title: document.querySelector('#detail-title').textContent, points: (document.querySelector('#chart-rps polyline') || {getAttribute: () => ''}).getAttribute('points') || '', edges: document.querySelectorAll('#detail-edges tr').length};");
        let points = v["points"].as_str().unwrap_or("").split_whitespace().count();
        if v["title"].as_str().is_some_and(|t| t.contains("reviews.default"))
            && points >= 2
            && v["edges"].as_u64() >= Some(4)
        {
            break;
        }
        assert!(Instant::now() < deadline, "the reviews page never showed its charts and edges: {v}");
        std::thread::sleep(Duration::from_millis(500));
    }
    browser.screenshot(&dir.join("service-reviews.png"));
    // The SLO panel renders whatever /api/v1/slos says (or that there is none).
    browser.goto(&format!("{url}#slos"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while browser.script("return document.querySelector('#slos').textContent;").as_str().unwrap_or("").is_empty() {
        assert!(Instant::now() < deadline, "the SLO panel stayed empty");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        browser.script("return document.querySelector('#tap-link').getAttribute('href');"),
        json!("/dashboard/tap")
    );

    // 2. A fault on ratings: the reviews -> ratings edges fail, details stays healthy.
    let faults = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings]
  http:
  - fault: {abort: {httpStatus: 500, percentage: {value: 100}}}
    route: [{destination: {host: ratings}}]
";
    up.apply_yaml(faults);
    browser.goto(&format!("{url}?window=30s#graph"));
    wait_graph(&browser, "the ratings fault", |g| {
        for v in ["reviews-v2", "reviews-v3"] {
            let e = g.edge(&wl(v), RATINGS).ok_or(format!("no {v} -> ratings edge"))?;
            if e.errors <= 0.0 || e.success.is_none_or(|s| s > 0.5) {
                return Err(format!("{v} -> ratings does not show the aborts: {e:?}"));
            }
        }
        let d = g.edge(&wl("productpage-v1"), DETAILS).ok_or("no productpage -> details edge")?;
        if d.success != Some(1.0) || d.errors > 0.0 {
            return Err(format!("productpage -> details should stay healthy: {d:?}"));
        }
        Ok(())
    });
    browser.screenshot(&dir.join("ratings-fault.png"));
    // The fault burns ratings' error budget: the SLO panel shows its SLI under 100% and
    // the budget left under 100% (the control plane evaluates SLOs every 30 s).
    browser.goto(&format!("{url}#slos"));
    let row = "document.querySelector('tr.slo[data-name=\"ratings-availability\"]')";
    let cell = |i: usize| -> Option<f64> {
        let js = format!("const r = {row}; return r ? r.cells[{i}].textContent : null;");
        browser.script(&js).as_str().and_then(|t| t.trim().trim_end_matches('%').trim().parse::<f64>().ok())
    };
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        // Columns: SLO, service, SLI, target, window, SLI now, budget left, burn rates...
        match (cell(5), cell(6)) {
            (Some(sli), Some(left)) if sli < 100.0 && left < 100.0 => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "the ratings SLO never showed the fault burning its budget: {other:?}"
                );
                std::thread::sleep(Duration::from_secs(2));
                browser.goto(&format!("{url}#slos"));
            }
        }
    }
    browser.screenshot(&dir.join("ratings-slo-burn.png"));
    browser.goto(&format!("{url}?window=30s#graph"));
    // The fault lifted (same VirtualService, plain route).
    up.apply_yaml(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings]
  http:
  - route: [{destination: {host: ratings}}]
",
    );

    // 3. A weight shift on reviews: everything to v3; the v1 and v2 edges go away.
    up.apply_yaml(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v3}, weight: 100}
",
    );
    wait_graph(&browser, "the weight shift to reviews-v3", |g| {
        let v3 = g.edge(REVIEWS, &wl("reviews-v3")).ok_or("no reviews -> reviews-v3 edge")?;
        let to_reviews = g.edge(&wl("productpage-v1"), REVIEWS).ok_or("no productpage -> reviews edge")?;
        for v in ["reviews-v1", "reviews-v2"] {
            if let Some(e) = g.edge(REVIEWS, &wl(v)) {
                return Err(format!("{v} still has traffic: {e:?}"));
            }
        }
        if v3.requests < 0.75 * to_reviews.requests {
            return Err(format!("reviews-v3 {v3:?} does not carry productpage's {to_reviews:?}"));
        }
        Ok(())
    });
    browser.screenshot(&dir.join("weight-shift.png"));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    println!("screenshots in {}", dir.display());
}
