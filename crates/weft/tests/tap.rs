//! `weft tap` as an operator runs it: `weft control` (the binary) with two weft proxies
//! (`productpage` calling `reviews`); `weft tap deploy/reviews` prints one Linkerd-style
//! line per request, without header values, and its tap ends on the proxy when the
//! command is stopped; `/dashboard/tap` shows the same in headless Chromium.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use tokio::io::{AsyncBufReadExt, BufReader};
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::send_h1;
use weft_testkit::net::reserve_addr;

const WEFT: &str = env!("CARGO_BIN_EXE_weft");
const WAIT: Duration = Duration::from_secs(30);
const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: reviews\nspec:\n  selector:\n    app: reviews\n  ports:\n  - name: http\n    port: 9080\n    targetPort: http\n";

async fn proxy(xds: SocketAddr, name: &str, app_port: Option<u16>) -> ProxyHandle {
    let ports = app_port
        .map(|p| format!("  ports:\n  - {{name: http, port: {p}, protocol: TCP}}\n  inbound: \"{}\"\n", reserve_addr()))
        .unwrap_or_default();
    let text = format!(
        "node:\n  id: {name}.default\n  name: {name}\n  namespace: default\n  service_account: {name}\n  labels: {{app: {name}}}\n{ports}  outbound: \"{}\"\nxds:\n  address: http://{xds}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\n",
        reserve_addr()
    );
    let p = ProxyHandle::start(Bootstrap::parse(&text, Path::new("bootstrap.yaml")).unwrap()).await.unwrap();
    assert!(p.wait_ready(WAIT).await, "{name} never became ready");
    p
}

async fn call(out: SocketAddr, path: &str, headers: &[(&str, &str)]) -> u16 {
    let mut req = http::Request::get(format!("http://reviews:9080{path}")).header(http::header::HOST, "reviews:9080");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send_h1(out, req.body(Full::new(Bytes::new())).unwrap()).await.map(|r| r.status.as_u16()).unwrap_or(0)
}

async fn wait_active(p: &ProxyHandle, want: usize) {
    let deadline = Instant::now() + WAIT;
    while p.context().tap.active() != want {
        assert!(Instant::now() < deadline, "the proxy's taps stayed {}, want {want}", p.context().tap.active());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `weft control` (the binary, open API) with `reviews` (in front of an echo app) and
/// `productpage` proxies, reviews answering through both.
struct Mesh {
    api: String,
    reviews: ProxyHandle,
    productpage: ProxyHandle,
    out: SocketAddr,
    _control: tokio::process::Child,
    _app: EchoServer,
    _dir: tempfile::TempDir,
}

async fn mesh() -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("service.yaml"), SERVICE).unwrap();
    let mut control = tokio::process::Command::new(WEFT)
        .args(["control", "--insecure-dev", "--dir"])
        .arg(dir.path())
        .args(["--xds", "127.0.0.1:0", "--api", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(control.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().unwrap();
    let xds: SocketAddr = line.split("xDS on ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    let api = line.split("API on ").nth(1).unwrap().trim().to_string();
    let app = EchoServer::start("reviews-app").await;
    let reviews = proxy(xds, "reviews", Some(app.addr.port())).await;
    let productpage = proxy(xds, "productpage", None).await;
    let out = productpage.listener_addr("weft-outbound", WAIT).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while call(out, "/warmup", &[]).await != 200 {
        assert!(Instant::now() < deadline, "reviews never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Mesh { api, reviews, productpage, out, _control: control, _app: app, _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_tap_prints_one_line_per_request_without_header_values() {
    let m = mesh().await;
    let (api, reviews, out) = (&m.api, &m.reviews, m.out);

    // `weft tap` exits with an error until the proxy's tap stream is up: retry.
    let deadline = Instant::now() + WAIT;
    let (mut tap, mut out_lines) = loop {
        let mut child = tokio::process::Command::new(WEFT)
            .args(["tap", "deploy/reviews", "--path", "/cli", "--server", api])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        match tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap() {
            Some(first) => {
                assert_eq!(first, "# tapping 1 proxy (max 100 events/s)");
                break (child, lines);
            }
            None => assert!(Instant::now() < deadline, "weft tap never started"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    wait_active(reviews, 1).await;
    assert_eq!(call(out, "/not-tapped", &[]).await, 200);
    assert_eq!(call(out, "/cli/one?key=qu3ry", &[("authorization", "Bearer s3cret")]).await, 200);
    let line = tokio::time::timeout(WAIT, out_lines.next_line()).await.unwrap().unwrap().unwrap();
    let (id, rest) = line.strip_prefix("req id=").unwrap().split_once(' ').unwrap();
    assert!(!id.is_empty(), "{line}");
    let (fields, latency) = rest.split_once(" latency=").unwrap();
    assert_eq!(
        fields,
        "proxy=in src=productpage.default dst=reviews.default tls=false :method=GET :authority=reviews:9080 :path=/cli/one rsp :status=200"
    );
    assert!(latency.ends_with("ms flags=-"), "{line}");
    assert!(!line.contains("s3cret") && !line.contains("qu3ry"), "{line}");

    tap.kill().await.unwrap();
    wait_active(reviews, 0).await;
    m.reviews.shutdown().await;
    m.productpage.shutdown().await;
}

/// The page `/dashboard/tap?target=..` in headless Chromium (installed by
/// `scripts/setup.sh`): the DOM after a few seconds of virtual time.
fn chromium_dom(url: &str) -> String {
    let chromium = weft_testkit::tools::require("chromium");
    let profile = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=4000", "--dump-dom"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tap_page_streams_requests_into_its_table_in_chromium() {
    let m = mesh().await;
    // Traffic with a credential header until the page has been read.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (flag, out) = (stop.clone(), m.out);
    let traffic = tokio::spawn(async move {
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            call(out, "/browser/page?key=qu3ry", &[("authorization", "Bearer s3cret")]).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let url = format!("http://{}/dashboard/tap?target=deploy/reviews&path=/browser", m.api);
    let deadline = Instant::now() + WAIT;
    let dom = loop {
        let u = url.clone();
        let dom = tokio::task::spawn_blocking(move || chromium_dom(&u)).await.unwrap();
        if dom.contains("<td>/browser/page</td>") || Instant::now() > deadline {
            break dom;
        }
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.await.unwrap();
    assert!(dom.contains("<td>/browser/page</td>"), "no tapped request in the page:\n{dom}");
    assert!(dom.contains("tapping 1 proxy<"), "{dom}");
    assert!(dom.contains("<td>productpage.default</td><td>reviews.default</td><td>plain</td><td>GET</td>"), "{dom}");
    assert!(!dom.contains("s3cret") && !dom.contains("qu3ry"), "a header or query value reached the page:\n{dom}");
    m.reviews.shutdown().await;
    m.productpage.shutdown().await;
}
