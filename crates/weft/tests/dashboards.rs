//! Istio's Grafana dashboards work on weft: a real Prometheus (the Debian `prometheus`
//! package `scripts/setup.sh` installs) scrapes every sidecar of a `weft up` mesh
//! (`tests/dashboards/mesh.yaml`) every second, while the test sends traffic as the
//! `client` workload's application would (HTTP through its sidecar, a 404, a request the
//! `details` VirtualService aborts, bytes to the TCP service `tcp-echo`). Then the PromQL
//! of Istio's Mesh, Service and Workload dashboards goes to Prometheus's HTTP API, and
//! the series and label values must be those Istio documents.
//!
//! The second test runs the same mesh with `reviews-v2` behind a stock Envoy
//! (`weft up --envoy-sidecar reviews-v2`): Envoy exchanges Istio's peer metadata headers
//! through the route header edits the control plane gives it, so the weft sidecars on
//! either side of it report its workload, app, version and namespace as they would for a
//! weft sidecar.
//!
//! All label checks are gathered and reported together, so one run shows every
//! dashboard panel that disagrees with Istio.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/up_mesh.rs"]
mod up_mesh;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use up_mesh::{UpMesh, WEFT};
/// How long the traffic's series may take to show up in Prometheus (scraped every
/// second) with enough samples for the dashboards' `rate`s.
const SETTLE_DEADLINE: Duration = Duration::from_secs(60);
/// How long one dashboard query may take to return what it should, once settled.
const QUERY_DEADLINE: Duration = Duration::from_secs(5);
const NS: &str = "default";
const REVIEWS: &str = "reviews.default.svc.cluster.local";
const RATINGS: &str = "ratings.default.svc.cluster.local";
const DETAILS: &str = "details.default.svc.cluster.local";
const TCP_ECHO: &str = "tcp-echo.default.svc.cluster.local";

/// `weft up` on the test mesh.
struct Mesh {
    up: UpMesh,
    _resources: tempfile::TempDir,
    /// The client's TCP egress listener (Sidecar `bind`).
    tcp_egress: SocketAddr,
}

impl Mesh {
    fn start(envoy_sidecars: &[&str]) -> Mesh {
        let tcp_egress = weft_testkit::net::reserve_addr();
        let resources = tempfile::tempdir().unwrap();
        let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dashboards/mesh.yaml");
        let text = std::fs::read_to_string(&template).unwrap();
        std::fs::write(
            resources.path().join("mesh.yaml"),
            text.replace("__TCP_PORT__", &tcp_egress.port().to_string()),
        )
        .unwrap();
        let envoy = weft_testkit::envoy::binary();
        let envoy = envoy.to_string_lossy();
        let mut extra = vec!["--access-log", "off"];
        for name in envoy_sidecars {
            extra.extend(["--envoy-sidecar", name, "--envoy", &envoy]);
        }
        let up = UpMesh::start(Some(resources.path()), &extra, 5);
        Mesh { up, _resources: resources, tcp_egress }
    }

    fn addr(&self, workload: &str, port: u16) -> String {
        format!("{}:{port}", self.up.workloads[workload])
    }

    /// The sidecars Prometheus scrapes: every workload's `/stats/prometheus` on 15020
    /// (an Envoy sidecar has none: it reports no Istio metrics).
    fn scrape_targets(&self, envoy_sidecars: &[&str]) -> Vec<String> {
        self.up
            .workloads
            .keys()
            .filter(|w| !envoy_sidecars.contains(&w.as_str()))
            .map(|w| self.addr(w, 15020))
            .collect()
    }

    /// `GET url` as the client application: through its sidecar's outbound listener.
    fn client_get(&self, url: &str) -> u16 {
        let o = Command::new(weft_testkit::tools::require("curl"))
            .args(["-s", "-o", "/dev/null", "-m", "20", "-w", "%{http_code}", "-x"])
            .arg(format!("http://{}", self.addr("client", 15001)))
            .arg(url)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().parse().unwrap_or(0)
    }

    /// One TCP exchange with tcp-echo through the client's egress listener: an HTTP
    /// request as opaque bytes, read until the server closes.
    fn client_tcp(&self) -> usize {
        let Ok(mut s) = TcpStream::connect_timeout(&self.tcp_egress, Duration::from_secs(5)) else { return 0 };
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        if s.write_all(b"GET /details/0 HTTP/1.1\r\nHost: tcp-echo\r\nConnection: close\r\n\r\n").is_err() {
            return 0;
        }
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out.len()
    }
}

/// A real Prometheus scraping `targets` every second, as Istio's `envoy-stats` job does.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[String]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n\
             - job_name: envoy-stats\n  metrics_path: /stats/prometheus\n  static_configs:\n  - targets: [{}]\n",
            targets.join(", ")
        );
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let addr = weft_testkit::net::reserve_addr();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(weft_testkit::tools::require("prometheus"))
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Prometheus { child, addr, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while p.get("/-/ready").0 != 200 {
            assert!(Instant::now() < deadline, "prometheus not ready within 60 s: {}", p.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn get(&self, path: &str) -> (u16, String) {
        let o = Command::new(weft_testkit::tools::require("curl"))
            .args(["-s", "-m", "10", "-w", "\n%{http_code}"])
            .arg(format!("http://{}{path}", self.addr))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// An instant query through the HTTP API: each result's labels.
    fn query(&self, promql: &str) -> Vec<BTreeMap<String, String>> {
        let o = Command::new(weft_testkit::tools::require("curl"))
            .args(["-s", "-m", "10", "-G", "--data-urlencode"])
            .arg(format!("query={promql}"))
            .arg(format!("http://{}/api/v1/query", self.addr))
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{promql}: {e}: {}", String::from_utf8_lossy(&o.stdout)));
        assert_eq!(v["status"], "success", "{promql}: {v}");
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .collect()
    }

    /// Waits (bounded by `within`) until `promql` returns a series; returns them (empty
    /// on timeout).
    fn series(&self, promql: &str, within: Duration) -> Vec<BTreeMap<String, String>> {
        let deadline = Instant::now() + within;
        loop {
            let r = self.query(promql);
            if !r.is_empty() || Instant::now() > deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every disagreement with Istio, reported together at the end.
#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    /// `promql` (one dashboard panel's query) must return a series with `want`'s labels.
    fn expect(&mut self, prom: &Prometheus, panel: &str, promql: &str, want: &[(&str, &str)]) {
        let got = prom.series(promql, QUERY_DEADLINE);
        let matches =
            |s: &BTreeMap<String, String>| want.iter().all(|(k, v)| s.get(*k).map(String::as_str) == Some(*v));
        if got.iter().any(matches) {
            println!("ok   {panel}");
        } else {
            println!("FAIL {panel}");
            self.0.push(format!("{panel}\n  query: {promql}\n  want labels: {want:?}\n  got: {got:#?}"));
        }
    }

    fn assert_none(self) {
        assert!(self.0.is_empty(), "{} dashboard checks disagree with Istio:\n{}", self.0.len(), self.0.join("\n"));
    }
}

/// Traffic of every kind the dashboards show, until each kind has been answered.
fn drive_traffic(mesh: &Mesh) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ok = [false; 4];
    while !ok.iter().all(|o| *o) {
        assert!(Instant::now() < deadline, "traffic not answered as expected within 60 s: {ok:?}");
        // reviews v2 calls ratings: one request shows both hops.
        ok[0] |= mesh.client_get("http://reviews:9080/reviews/0") == 200;
        ok[1] |= mesh.client_get("http://reviews:9080/no-such-page") == 404;
        ok[2] |= mesh.client_get("http://details:9080/details/0") == 503;
        ok[3] |= mesh.client_tcp() > 0;
    }
    // A few more of each, so every rate window holds increases.
    for _ in 0..5 {
        mesh.client_get("http://reviews:9080/reviews/0");
        mesh.client_get("http://reviews:9080/no-such-page");
        mesh.client_get("http://details:9080/details/0");
        mesh.client_tcp();
    }
}

/// The labels each sidecar learns from its peer's metadata (workload namespace, app,
/// version, canonical service and revision), whatever sidecar reviews-v2 runs: the
/// client's report of its calls to reviews, ratings' report of reviews' calls to it.
/// (Matched by app rather than by service or workload name, which `check_dashboards`
/// checks.)
fn peer_labels(prom: &Prometheus) -> Findings {
    let mut f = Findings::default();
    let reviews = [
        ("destination_app", "reviews"),
        ("destination_version", "v2"),
        ("destination_workload_namespace", NS),
        ("destination_canonical_service", "reviews"),
        ("destination_canonical_revision", "v2"),
        ("source_app", "client"),
        ("source_version", "v1"),
        ("source_workload_namespace", NS),
    ];
    for code in ["200", "404"] {
        f.expect(
            prom,
            &format!("peer: the client learns reviews-v2's labels from its answer ({code})"),
            &format!(
                "istio_requests_total{{reporter=\"source\",destination_app=\"reviews\",response_code=\"{code}\"}}"
            ),
            &reviews,
        );
    }
    f.expect(
        prom,
        "peer: ratings learns reviews-v2's labels from its request, over mTLS",
        "istio_requests_total{reporter=\"destination\",destination_app=\"ratings\"}",
        &[
            ("source_app", "reviews"),
            ("source_version", "v2"),
            ("source_workload_namespace", NS),
            ("source_canonical_service", "reviews"),
            ("source_canonical_revision", "v2"),
            ("source_principal", "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"),
            ("connection_security_policy", "mutual_tls"),
            ("destination_version", "v1"),
            ("response_code", "200"),
        ],
    );
    f.expect(
        prom,
        "peer: a fault-injected abort reports its source only",
        "istio_requests_total{reporter=\"source\",response_flags=\"FI\"}",
        &[("source_app", "client"), ("response_code", "503"), ("destination_app", "unknown")],
    );
    f
}

/// What Istio's dashboards show about the mesh with a weft sidecar (or, for
/// `reviews_by_envoy`, an Envoy) beside reviews-v2.
fn check_dashboards(prom: &Prometheus, reviews_by_envoy: bool) -> Findings {
    let mut f = Findings::default();
    let (src, dst) = ("reporter=\"source\"", "reporter=\"destination\"");
    let reviews_dst = [
        ("destination_service", REVIEWS),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", NS),
        ("destination_workload", "reviews-v2"),
        ("destination_workload_namespace", NS),
        ("destination_app", "reviews"),
        ("destination_version", "v2"),
        ("destination_canonical_service", "reviews"),
        ("destination_canonical_revision", "v2"),
    ];
    let client_src = [
        ("source_workload", "client"),
        ("source_workload_namespace", NS),
        ("source_app", "client"),
        ("source_version", "v1"),
        ("source_canonical_service", "client"),
        ("source_canonical_revision", "v1"),
    ];
    let with = |a: &[(&'static str, &'static str)],
                b: &[(&'static str, &'static str)]|
     -> Vec<(&'static str, &'static str)> { a.iter().chain(b).copied().collect() };

    // Mesh dashboard: global request volume, 4xx, and the HTTP and TCP workload tables.
    f.expect(
        prom,
        "mesh: global request volume",
        "round(sum(irate(istio_requests_total{reporter=\"source\"}[1m])), 0.001)",
        &[],
    );
    f.expect(
        prom,
        "mesh: 4xxs",
        "sum(irate(istio_requests_total{reporter=\"source\", response_code=~\"4.*\"}[1m]))",
        &[],
    );
    f.expect(
        prom,
        "mesh: HTTP/gRPC workloads",
        "label_join(sum(rate(istio_requests_total{reporter=\"source\", response_code=\"200\"}[1m])) by \
         (destination_workload, destination_workload_namespace, destination_service), \"destination_workload_var\", \
         \".\", \"destination_workload\", \"destination_workload_namespace\")",
        &[
            ("destination_service", REVIEWS),
            ("destination_workload", "reviews-v2"),
            ("destination_workload_namespace", NS),
            ("destination_workload_var", "reviews-v2.default"),
        ],
    );
    f.expect(
        prom,
        "mesh: TCP workloads",
        "sum(rate(istio_tcp_sent_bytes_total{reporter=\"source\"}[1m])) by \
         (destination_workload, destination_workload_namespace, destination_service)",
        &[
            ("destination_service", TCP_ECHO),
            ("destination_workload", "tcp-echo"),
            ("destination_workload_namespace", NS),
        ],
    );

    // Service dashboard (service reviews): request volume and the incoming-requests panel.
    f.expect(
        prom,
        "service: requests to reviews",
        &format!("istio_requests_total{{reporter=~\"source|destination\",destination_service=~\"{REVIEWS}\"}}"),
        &with(&reviews_dst, &[("reporter", "source"), ("response_code", "200")]),
    );
    f.expect(
        prom,
        "service: 404 from reviews",
        &format!("istio_requests_total{{{src},destination_service=\"{REVIEWS}\",response_code=\"404\"}}"),
        &with(&reviews_dst, &client_src),
    );
    f.expect(
        prom,
        "service: incoming requests by source and response code (mTLS)",
        &format!(
            "round(sum(irate(istio_requests_total{{connection_security_policy=\"mutual_tls\",\
             destination_service=~\"{RATINGS}\",reporter=~\"destination\"}}[1m])) by \
             (source_workload, source_workload_namespace, response_code), 0.001)"
        ),
        &[("source_workload", "reviews-v2"), ("source_workload_namespace", NS), ("response_code", "200")],
    );
    // The ratings sidecar names its caller, reviews-v2, with every source label.
    f.expect(
        prom,
        "service: ratings called by reviews-v2",
        &format!("istio_requests_total{{{dst},destination_service=\"{RATINGS}\"}}"),
        &[
            ("source_workload", "reviews-v2"),
            ("source_workload_namespace", NS),
            ("source_app", "reviews"),
            ("source_version", "v2"),
            ("source_canonical_service", "reviews"),
            ("source_canonical_revision", "v2"),
            ("source_principal", "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"),
            ("destination_workload", "ratings-v1"),
            ("destination_app", "ratings"),
            ("destination_version", "v1"),
            ("response_code", "200"),
        ],
    );
    // Fault injection: the client's sidecar aborts; only the source reports it.
    f.expect(
        prom,
        "service: aborted by fault injection",
        &format!("istio_requests_total{{{src},destination_service=\"{DETAILS}\",response_flags=\"FI\"}}"),
        &with(&client_src, &[("response_code", "503"), ("destination_service_name", "details")]),
    );

    // Workload dashboard (workload reviews-v2): inbound and outbound.
    if !reviews_by_envoy {
        f.expect(
            prom,
            "workload: incoming request volume (reporter destination)",
            "round(sum(irate(istio_requests_total{reporter=~\"destination\", destination_workload_namespace=~\"default\", \
             destination_workload=~\"reviews-v2\"}[1m])) by (source_workload, response_code), 0.001)",
            &[("source_workload", "client"), ("response_code", "200")],
        );
        f.expect(
            prom,
            "workload: outgoing requests by destination (reporter source)",
            "sum(irate(istio_requests_total{reporter=~\"source\", source_workload_namespace=~\"default\", \
             source_workload=~\"reviews-v2\"}[1m])) by (destination_service, destination_workload, response_code)",
            &[("destination_service", RATINGS), ("destination_workload", "ratings-v1"), ("response_code", "200")],
        );
    }
    f.expect(
        prom,
        "workload: incoming requests seen by the caller",
        &format!(
            "istio_requests_total{{{src},destination_workload=\"reviews-v2\",destination_workload_namespace=\"default\"}}"
        ),
        &with(&reviews_dst, &client_src),
    );
    // TCP panels of the workload dashboard (workload tcp-echo).
    f.expect(
        prom,
        "workload: TCP bytes received by tcp-echo",
        "sum(irate(istio_tcp_received_bytes_total{reporter=~\"destination\", destination_workload_namespace=~\"default\", \
         destination_workload=~\"tcp-echo\"}[1m])) by (source_workload)",
        &[("source_workload", "client")],
    );
    f.expect(
        prom,
        "workload: TCP bytes sent by the client",
        &format!("istio_tcp_sent_bytes_total{{{src},destination_service=\"{TCP_ECHO}\"}}"),
        &with(&client_src, &[("destination_workload", "tcp-echo"), ("destination_service_name", "tcp-echo")]),
    );
    f.expect(
        prom,
        "workload: TCP connections opened",
        &format!("istio_tcp_connections_opened_total{{{dst},destination_service=\"{TCP_ECHO}\"}}"),
        &[("destination_workload", "tcp-echo"), ("source_workload", "client")],
    );
    f
}

fn run_scenario(envoy_sidecars: &[&str]) {
    let mesh = Mesh::start(envoy_sidecars);
    let targets = mesh.scrape_targets(envoy_sidecars);
    let prom = Prometheus::start(&targets);
    drive_traffic(&mesh);
    // Settled: every sidecar scraped and up, and every series of the traffic holds
    // enough samples for the dashboards' `rate` and `irate` over one minute.
    let up = prom.series(&format!("count(up{{job=\"envoy-stats\"}} == 1) == {}", targets.len()), SETTLE_DEADLINE);
    assert!(!up.is_empty(), "not every sidecar scraped: {:?}\n{}", prom.query("up"), prom.log());
    for metric in ["istio_requests_total", "istio_tcp_sent_bytes_total"] {
        let settled = prom.series(&format!("min(count_over_time({metric}[1m])) >= 3"), SETTLE_DEADLINE);
        assert!(!settled.is_empty(), "{metric}: no series with 3 samples: {:?}", prom.query(metric));
    }
    let mut findings = peer_labels(&prom);
    findings.0.extend(check_dashboards(&prom, !envoy_sidecars.is_empty()).0);
    findings.assert_none();
}

#[test]
fn istio_dashboard_queries_return_istios_series_from_weft_up() {
    run_scenario(&[]);
}

#[test]
fn an_envoy_sidecar_and_weft_sidecars_see_each_others_workloads() {
    run_scenario(&["reviews-v2"]);
}

#[test]
fn envoy_sidecar_for_an_unknown_workload_is_refused_by_name() {
    let resources = tempfile::tempdir().unwrap();
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dashboards/mesh.yaml");
    let text = std::fs::read_to_string(&template).unwrap();
    std::fs::write(resources.path().join("mesh.yaml"), text.replace("__TCP_PORT__", "9000")).unwrap();
    let state = tempfile::tempdir().unwrap();
    let ingress = weft_testkit::net::reserve_port().to_string();
    let o = Command::new(WEFT)
        .args(["up", "-f"])
        .arg(resources.path())
        .args(["--api", "127.0.0.1:0", "--xds", "127.0.0.1:0", "--ingress-port", &ingress])
        .args(["--envoy-sidecar", "reviews-v9"])
        .env("WEFT_STATE_DIR", state.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("--envoy-sidecar reviews-v9: no LocalWorkload of that name") && err.contains("reviews-v2"),
        "{err}"
    );
}
