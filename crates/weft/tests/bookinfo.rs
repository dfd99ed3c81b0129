//! `weft demo <service>`: Istio's Bookinfo applications as real processes on 127.0.0.1:0,
//! checked for the API, JSON shapes, HTML markers, failure handling (timeouts, retry,
//! unavailable ratings), login / `end-user`, header propagation and the HTTP proxy option.
//! Stand-ins for upstreams are small recording servers in the test.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderMap;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStdout};
use weft_testkit::http::{get_h1, request, send_h1, Reply};
use weft_xds::build::{self, Routes};
use weft_xds::{type_url, AdsServer, StaticSource};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

/// Variables of the Bookinfo images that must not leak from the test's environment.
const BOOKINFO_ENV: &[&str] = &[
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
    "SERVICE_VERSION",
    "DETAILS_HOSTNAME",
    "REVIEWS_HOSTNAME",
    "RATINGS_HOSTNAME",
    "SERVICES_DOMAIN",
    "STAR_COLOR",
    "ENABLE_RATINGS",
    "POD_NAME",
    "CLUSTER_NAME",
    "WEFT_DEMO_ADDRESS",
];

/// A `weft demo <service>` process, killed on drop.
struct App {
    addr: SocketAddr,
    _child: Child,
    _stdout: Lines<BufReader<ChildStdout>>,
}

impl App {
    async fn start(service: &str, env: &[(&str, String)]) -> App {
        let mut cmd = tokio::process::Command::new(WEFT);
        cmd.args(["demo", service, "--port", "0", "--address", "127.0.0.1"]);
        for name in BOOKINFO_ENV {
            cmd.env_remove(name);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("weft demo {service} did not start"))
            .unwrap()
            .unwrap_or_else(|| panic!("weft demo {service} exited before listening"));
        let addr = line.rsplit("listening on ").next().unwrap().trim().parse().unwrap();
        App { addr, _child: child, _stdout: stdout }
    }

    /// `host:port` for the `*_HOSTNAME` variables.
    fn host(&self) -> String {
        self.addr.to_string()
    }

    async fn get(&self, path: &str) -> Reply {
        get_h1(self.addr, "bookinfo", path).await.unwrap()
    }

    async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = request(Method::GET, "bookinfo", path, Bytes::new()).unwrap();
        for (k, v) in headers {
            req.headers_mut().append(hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        send_h1(self.addr, req).await.unwrap()
    }
}

/// One request a [`Recorder`] saw.
#[derive(Clone, Debug)]
struct Seen {
    uri: String,
    headers: HeaderMap,
}

/// An HTTP/1.1 server that records every request and answers with `answer(&seen)`:
/// status, JSON body and a delay before answering.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
}

type Answer = Arc<dyn Fn(&Seen) -> (u16, String, Duration) + Send + Sync>;

impl Recorder {
    async fn start(answer: impl Fn(&Seen) -> (u16, String, Duration) + Send + Sync + 'static) -> Recorder {
        let answer: Answer = Arc::new(answer);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let connections = Arc::new(AtomicUsize::new(0));
        let accepted = connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                accepted.fetch_add(1, Ordering::SeqCst);
                let answer = answer.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let answer = answer.clone();
                        let log = log.clone();
                        async move {
                            let s = Seen { uri: req.uri().to_string(), headers: req.headers().clone() };
                            log.lock().unwrap().push(s.clone());
                            let (status, body, delay) = answer(&s);
                            tokio::time::sleep(delay).await;
                            let mut resp = Response::new(Full::new(Bytes::from(body)));
                            *resp.status_mut() = status.try_into().unwrap();
                            resp.headers_mut().insert("content-type", "application/json".parse().unwrap());
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Recorder { addr, seen, connections }
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// TCP connections accepted so far.
    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// A raw HTTP/1.1 server that answers each connection's first request with `body` (no
/// `Connection: close`: the answer says the connection stays open) and then closes it, as
/// a server does with an idle keep-alive connection; returns its address and the count of
/// requests answered.
async fn closing_server(body: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let count = count.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(answer.as_bytes()).await.is_ok() {
                    count.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    (addr, answered)
}

const DETAILS_JSON: &str = r#"{"id":0,"author":"William Shakespeare","year":1595,"type":"paperback","pages":200,"publisher":"PublisherA","language":"English","ISBN-10":"1234567890","ISBN-13":"123-1234567890"}"#;
const REVIEWS_JSON: &str = r#"{"id":"0","podname":"reviews-v2-test","clustername":"null","reviews":[{"reviewer":"Reviewer1","text":"good","rating":{"stars":5,"color":"black"}},{"reviewer":"Reviewer2","text":"fine","rating":{"stars":4,"color":"black"}}]}"#;
const RATINGS_JSON: &str = r#"{"id":0,"ratings":{"Reviewer1":5,"Reviewer2":4}}"#;

fn ok(body: &'static str) -> impl Fn(&Seen) -> (u16, String, Duration) + Send + Sync + 'static {
    move |_| (200, body.to_owned(), Duration::ZERO)
}

/// An address nothing listens on.
async fn closed_port() -> String {
    weft_testkit::net::reserve_addr().to_string()
}

fn header<'a>(s: &'a Seen, name: &str) -> Option<&'a str> {
    s.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn details_answers_book_details_and_400_for_a_non_numeric_id() {
    let details = App::start("details", &[]).await;
    let r = details.get("/details/0").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let j = r.json().unwrap();
    assert_eq!(j["id"], 0);
    assert_eq!(j["author"], "William Shakespeare");
    assert_eq!(j["year"], 1595);
    assert_eq!(j["type"], "paperback");
    assert_eq!(j["pages"], 200);
    assert_eq!(j["publisher"], "PublisherA");
    assert_eq!(j["language"], "English");
    assert_eq!(j["ISBN-10"], "1234567890");
    assert_eq!(j["ISBN-13"], "123-1234567890");
    assert_eq!(details.get("/details/7").await.json().unwrap()["id"], 7);

    let bad = details.get("/details/abc").await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json().unwrap()["error"], "please provide numeric product id");
    let health = details.get("/health").await;
    assert_eq!((health.status.as_u16(), health.json().unwrap()["status"].clone()), (200, "Details is healthy".into()));
    assert_eq!(details.get("/nothing").await.status, 404);
}

#[tokio::test]
async fn ratings_answers_stars_per_reviewer_and_keeps_posted_ratings() {
    let ratings = App::start("ratings", &[]).await;
    let r = ratings.get("/ratings/0").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json().unwrap(), serde_json::json!({"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}));
    let bad = ratings.get("/ratings/abc").await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json().unwrap()["error"], "please provide numeric product ID");

    let post = request(Method::POST, "ratings", "/ratings/1", Bytes::from(r#"{"Reviewer1":1,"Reviewer2":2}"#)).unwrap();
    let posted = send_h1(ratings.addr, post).await.unwrap();
    assert_eq!(posted.status, 200);
    let want = serde_json::json!({"id": 1, "ratings": {"Reviewer1": 1, "Reviewer2": 2}});
    assert_eq!(posted.json().unwrap(), want);
    assert_eq!(ratings.get("/ratings/1").await.json().unwrap(), want);
    assert_eq!(ratings.get("/ratings/0").await.json().unwrap()["ratings"]["Reviewer1"], 5);

    let health = ratings.get("/health").await;
    assert_eq!((health.status.as_u16(), health.json().unwrap()["status"].clone()), (200, "Ratings is healthy".into()));
}

#[tokio::test]
async fn reviews_versions_report_their_podname_and_no_stars_black_stars_or_red_stars() {
    let ratings = App::start("ratings", &[]).await;
    let mut seen = Vec::new();
    for (version, color) in [("v1", None), ("v2", Some("black")), ("v3", Some("red"))] {
        let reviews =
            App::start("reviews", &[("SERVICE_VERSION", version.into()), ("RATINGS_HOSTNAME", ratings.host())]).await;
        let r = reviews.get("/reviews/0").await;
        assert_eq!(r.status, 200);
        let j = r.json().unwrap();
        assert_eq!(j["id"], "0");
        let podname = j["podname"].as_str().unwrap().to_owned();
        assert!(podname.starts_with(&format!("reviews-{version}-")), "{podname}");
        assert!(j["clustername"].is_string());
        let list = j["reviews"].as_array().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0]["reviewer"], "Reviewer1");
        assert_eq!(list[1]["reviewer"], "Reviewer2");
        assert!(list[0]["text"].as_str().unwrap().contains("Shakespeare"));
        match color {
            None => assert!(list.iter().all(|r| r.get("rating").is_none()), "{j}"),
            Some(color) => {
                assert_eq!(list[0]["rating"], serde_json::json!({"stars": 5, "color": color}));
                assert_eq!(list[1]["rating"], serde_json::json!({"stars": 4, "color": color}));
            }
        }
        let health = reviews.get("/health").await.json().unwrap();
        assert_eq!(health["status"], "Reviews is healthy");
        assert_eq!(reviews.get("/reviews/abc").await.status, 404);
        seen.push(podname);
    }
    seen.dedup();
    assert_eq!(seen.len(), 3);
}

#[tokio::test]
async fn reviews_report_ratings_unavailable_when_ratings_is_down_or_failing() {
    let down =
        App::start("reviews", &[("SERVICE_VERSION", "v2".into()), ("RATINGS_HOSTNAME", closed_port().await)]).await;
    let failing = Recorder::start(|_| (503, r#"{"error":"Service unavailable"}"#.into(), Duration::ZERO)).await;
    let erroring =
        App::start("reviews", &[("SERVICE_VERSION", "v3".into()), ("RATINGS_HOSTNAME", failing.host())]).await;
    for reviews in [&down, &erroring] {
        let j = reviews.get("/reviews/0").await.json().unwrap();
        for review in j["reviews"].as_array().unwrap() {
            assert_eq!(review["rating"], serde_json::json!({"error": "Ratings service is currently unavailable"}));
        }
    }
    assert_eq!(failing.seen().len(), 1);
}

#[tokio::test]
async fn productpage_shows_the_book_with_black_red_or_no_stars_per_reviews_version() {
    let details = App::start("details", &[]).await;
    let ratings = App::start("ratings", &[]).await;
    for (version, marker) in [("v1", None), ("v2", Some("black")), ("v3", Some("red"))] {
        let reviews =
            App::start("reviews", &[("SERVICE_VERSION", version.into()), ("RATINGS_HOSTNAME", ratings.host())]).await;
        let page =
            App::start("productpage", &[("DETAILS_HOSTNAME", details.host()), ("REVIEWS_HOSTNAME", reviews.host())])
                .await;
        let r = page.get("/productpage").await;
        assert_eq!(r.status, 200);
        let html = r.text();
        assert!(html.contains("The Comedy of Errors"), "{html}");
        assert!(html.contains("Book Details") && html.contains("PublisherA") && html.contains("123-1234567890"));
        assert!(html.contains("Book Reviews") && html.contains("Reviewer1") && html.contains("Reviewer2"));
        match marker {
            None => assert!(!html.contains("<span class=\"glyphicon glyphicon-star"), "v1 shows no stars: {html}"),
            Some(color) => {
                assert!(html.contains(&format!("<font color=\"{color}\">")), "{html}");
                // Reviewer1: 5 full; Reviewer2: 4 full and 1 empty.
                assert_eq!(html.matches("glyphicon glyphicon-star\"").count(), 9, "{html}");
                assert_eq!(html.matches("glyphicon glyphicon-star-empty\"").count(), 1, "{html}");
            }
        }
    }
}

#[tokio::test]
async fn productpage_api_serves_products_details_reviews_and_ratings_json() {
    let details = App::start("details", &[]).await;
    let ratings = App::start("ratings", &[]).await;
    let reviews =
        App::start("reviews", &[("SERVICE_VERSION", "v2".into()), ("RATINGS_HOSTNAME", ratings.host())]).await;
    let page = App::start(
        "productpage",
        &[
            ("DETAILS_HOSTNAME", details.host()),
            ("REVIEWS_HOSTNAME", reviews.host()),
            ("RATINGS_HOSTNAME", ratings.host()),
        ],
    )
    .await;
    let products = page.get("/api/v1/products").await;
    assert_eq!(products.status, 200);
    assert_eq!(products.header("content-type"), Some("application/json"));
    let list = products.json().unwrap();
    assert_eq!(list[0]["id"], 0);
    assert_eq!(list[0]["title"], "The Comedy of Errors");
    assert!(list[0]["descriptionHtml"].as_str().unwrap().contains("Wikipedia Summary"));

    let d = page.get("/api/v1/products/0").await;
    assert_eq!(d.status, 200);
    assert_eq!(d.json().unwrap()["publisher"], "PublisherA");
    let bad = page.get("/api/v1/products/abc").await;
    assert_eq!(bad.status, 400, "details' status is passed on");
    assert_eq!(bad.json().unwrap()["error"], "Sorry, product details are currently unavailable for this book.");

    let r = page.get("/api/v1/products/0/reviews").await;
    assert_eq!(r.status, 200);
    let r = r.json().unwrap();
    assert!(r["podname"].as_str().unwrap().starts_with("reviews-v2-"));
    assert_eq!(r["reviews"][0]["rating"]["stars"], 5);

    let s = page.get("/api/v1/products/0/ratings").await;
    assert_eq!(s.status, 200);
    assert_eq!(s.json().unwrap()["ratings"]["Reviewer2"], 4);

    assert_eq!(page.get("/health").await.text(), "Product page is healthy");
    assert!(page.get("/").await.text().contains("productpage?u=normal"));
    assert_eq!(page.get("/nothing").await.status, 404);
}

#[tokio::test]
async fn productpage_says_sorry_when_reviews_is_too_slow_after_a_3s_timeout_and_one_retry() {
    let details = App::start("details", &[]).await;
    let slow = Recorder::start(|_| (200, REVIEWS_JSON.into(), Duration::from_secs(30))).await;
    let page =
        App::start("productpage", &[("DETAILS_HOSTNAME", details.host()), ("REVIEWS_HOSTNAME", slow.host())]).await;
    let started = Instant::now();
    let r = page.get("/productpage").await;
    let took = started.elapsed();
    assert_eq!(r.status, 200);
    let html = r.text();
    assert!(html.contains("Error fetching product reviews!"), "{html}");
    assert!(html.contains("Sorry, product reviews are currently unavailable for this book."), "{html}");
    assert!(html.contains("PublisherA"), "details still shown: {html}");
    assert_eq!(slow.seen().len(), 2, "one attempt and one retry");
    assert!(took >= Duration::from_secs(6), "two 3 s timeouts, took {took:?}");
}

#[tokio::test]
async fn productpage_and_reviews_keep_their_upstream_connections_alive_between_pages() {
    let details = Recorder::start(ok(DETAILS_JSON)).await;
    let ratings = Recorder::start(ok(RATINGS_JSON)).await;
    let reviews =
        App::start("reviews", &[("SERVICE_VERSION", "v2".into()), ("RATINGS_HOSTNAME", ratings.host())]).await;
    let page =
        App::start("productpage", &[("DETAILS_HOSTNAME", details.host()), ("REVIEWS_HOSTNAME", reviews.host())]).await;
    for _ in 0..5 {
        let html = page.get("/productpage").await.text();
        assert!(html.contains("PublisherA") && !html.contains("Sorry, "), "{html}");
    }
    assert_eq!(details.seen().len(), 5);
    assert_eq!(ratings.seen().len(), 5);
    assert_eq!(details.connections(), 1, "productpage reuses its connection to details");
    assert_eq!(ratings.connections(), 1, "reviews reuses its connection to ratings");
}

#[tokio::test]
async fn an_upstream_closing_idle_keep_alive_connections_costs_no_failed_page() {
    let (details, answered) = closing_server(DETAILS_JSON).await;
    let reviews = Recorder::start(ok(REVIEWS_JSON)).await;
    let page =
        App::start("productpage", &[("DETAILS_HOSTNAME", details.to_string()), ("REVIEWS_HOSTNAME", reviews.host())])
            .await;
    for _ in 0..5 {
        let html = page.get("/productpage").await.text();
        assert!(html.contains("PublisherA") && !html.contains("Sorry, "), "{html}");
    }
    assert_eq!(answered.load(Ordering::SeqCst), 5, "each page's details on a connection of its own");
}

#[tokio::test]
async fn productpage_retries_failing_reviews_once_and_passes_the_status_on() {
    let failing = Recorder::start(|_| (503, "{}".into(), Duration::ZERO)).await;
    let page =
        App::start("productpage", &[("DETAILS_HOSTNAME", closed_port().await), ("REVIEWS_HOSTNAME", failing.host())])
            .await;
    let r = page.get("/api/v1/products/0/reviews").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json().unwrap()["error"], "Sorry, product reviews are currently unavailable for this book.");
    assert_eq!(failing.seen().len(), 2);

    let d = page.get("/api/v1/products/0").await;
    assert_eq!(d.status, 500, "details unreachable");
    assert_eq!(d.json().unwrap()["error"], "Sorry, product details are currently unavailable for this book.");
    let html = page.get("/productpage").await.text();
    assert!(html.contains("Error fetching product details!"), "{html}");
}

#[tokio::test]
async fn login_sets_the_user_cookie_that_becomes_end_user_until_logout() {
    let details = Recorder::start(ok(DETAILS_JSON)).await;
    let reviews = Recorder::start(ok(REVIEWS_JSON)).await;
    let page =
        App::start("productpage", &[("DETAILS_HOSTNAME", details.host()), ("REVIEWS_HOSTNAME", reviews.host())]).await;

    let mut login = request(Method::POST, "bookinfo", "/login", Bytes::from("username=jason&passwd=x")).unwrap();
    login.headers_mut().insert("content-type", "application/x-www-form-urlencoded".parse().unwrap());
    login.headers_mut().insert("referer", "http://bookinfo/productpage".parse().unwrap());
    let r = send_h1(page.addr, login).await.unwrap();
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("http://bookinfo/productpage"));
    let cookie = r.header("set-cookie").unwrap().to_owned();
    assert!(cookie.starts_with("user=jason;"), "{cookie}");

    let html = page.get_with("/productpage", &[("cookie", "user=jason")]).await.text();
    assert!(html.contains("jason") && html.contains("sign out"), "{html}");
    let last = reviews.seen().pop().unwrap();
    assert_eq!(header(&last, "end-user"), Some("jason"));
    assert_eq!(header(&details.seen().pop().unwrap(), "end-user"), Some("jason"));

    let out = page.get_with("/logout", &[("referer", "http://bookinfo/productpage")]).await;
    assert_eq!(out.status, 302);
    let cleared = out.header("set-cookie").unwrap();
    assert!(cleared.starts_with("user=;") && cleared.contains("Max-Age=0"), "{cleared}");
    let html = page.get("/productpage").await.text();
    assert!(html.contains("Please sign in"), "{html}");
    assert_eq!(header(&reviews.seen().pop().unwrap(), "end-user"), None);
}

#[tokio::test]
async fn incoming_end_user_and_trace_headers_are_forwarded_to_details_reviews_and_ratings() {
    let details = Recorder::start(ok(DETAILS_JSON)).await;
    let reviews = Recorder::start(ok(REVIEWS_JSON)).await;
    let page =
        App::start("productpage", &[("DETAILS_HOSTNAME", details.host()), ("REVIEWS_HOSTNAME", reviews.host())]).await;
    let trace: &[(&str, &str)] = &[
        ("x-request-id", "req-1"),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("tracestate", "vendor=1"),
        ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
        ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ("x-b3-parentspanid", "05e3ac9a4f6e3b90"),
        ("x-b3-sampled", "1"),
        ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        ("end-user", "tester"),
        ("user-agent", "bookinfo-test"),
    ];
    let r = page.get_with("/productpage", trace).await;
    assert_eq!(r.status, 200);
    for seen in [details.seen().pop().unwrap(), reviews.seen().pop().unwrap()] {
        for (name, value) in trace {
            assert_eq!(header(&seen, name), Some(*value), "{name} to {}", seen.uri);
        }
    }

    // Without incoming trace headers productpage invents none (Istio's productpage only
    // re-injects a B3 context it extracted): the sidecars start traces and sample.
    page.get("/productpage").await;
    for seen in [details.seen().pop().unwrap(), reviews.seen().pop().unwrap()] {
        for name in ["x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "b3", "traceparent"] {
            assert_eq!(header(&seen, name), None, "{name} to {}", seen.uri);
        }
    }

    // reviews -> ratings.
    let ratings = Recorder::start(ok(RATINGS_JSON)).await;
    let reviews_app =
        App::start("reviews", &[("SERVICE_VERSION", "v2".into()), ("RATINGS_HOSTNAME", ratings.host())]).await;
    let j = reviews_app.get_with("/reviews/0", trace).await.json().unwrap();
    assert_eq!(j["reviews"][0]["rating"]["stars"], 5);
    let seen = ratings.seen().pop().unwrap();
    assert_eq!(seen.uri, "/ratings/0");
    for (name, value) in trace {
        assert_eq!(header(&seen, name), Some(*value), "{name} to ratings");
    }
}

#[tokio::test]
async fn outbound_calls_go_through_http_proxy_as_absolute_form_requests() {
    let proxy = Recorder::start(|s| {
        let body = if s.uri.contains("/details/") {
            DETAILS_JSON
        } else if s.uri.contains("/reviews/") {
            REVIEWS_JSON
        } else {
            RATINGS_JSON
        };
        (200, body.into(), Duration::ZERO)
    })
    .await;
    let proxy_url = format!("http://{}", proxy.addr);
    // Default upstreams (details:9080, reviews:9080) do not resolve here: only the proxy
    // can have answered.
    let page = App::start("productpage", &[("HTTP_PROXY", proxy_url.clone())]).await;
    let html = page.get("/productpage").await.text();
    assert!(html.contains("PublisherA") && html.contains("Reviewer1"), "{html}");
    let seen = proxy.seen();
    let uris: Vec<_> = seen.iter().map(|s| s.uri.as_str()).collect();
    assert_eq!(uris, ["http://details:9080/details/0", "http://reviews:9080/reviews/0"]);
    assert_eq!(header(&seen[0], "host"), Some("details:9080"));

    // reviews reads the lower-case variable too, and SERVICES_DOMAIN qualifies the host.
    let reviews = App::start(
        "reviews",
        &[
            ("SERVICE_VERSION", "v3".into()),
            ("http_proxy", proxy_url.clone()),
            ("SERVICES_DOMAIN", "bookinfo.svc".into()),
        ],
    )
    .await;
    let j = reviews.get("/reviews/0").await.json().unwrap();
    assert_eq!(j["reviews"][1]["rating"], serde_json::json!({"stars": 4, "color": "red"}));
    assert_eq!(proxy.seen().pop().unwrap().uri, "http://ratings.bookinfo.svc:9080/ratings/0");

    // NO_PROXY hosts are called directly.
    let details = App::start("details", &[]).await;
    let before = proxy.seen().len();
    let page = App::start(
        "productpage",
        &[("HTTP_PROXY", proxy_url), ("NO_PROXY", "localhost,127.0.0.1".into()), ("DETAILS_HOSTNAME", details.host())],
    )
    .await;
    let d = page.get("/api/v1/products/3").await.json().unwrap();
    assert_eq!(d["id"], 3);
    assert_eq!(proxy.seen().len(), before, "details bypassed the proxy");
}

#[tokio::test]
async fn bad_bookinfo_settings_are_rejected_with_the_variable_named() {
    let out = tokio::process::Command::new(WEFT)
        .args(["demo", "productpage", "--port", "0"])
        .env("HTTP_PROXY", "https://proxy:3128")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HTTP_PROXY") && err.contains("https"), "{err}");
}

/// Istio's request-routing task through a real weft proxy used as the apps' HTTP proxy
/// (explicit mode): `end-user: jason` goes to reviews v2 (black stars), everyone else to
/// v1 (no stars); reviews v2 reaches ratings through the proxy too.
#[tokio::test]
async fn bookinfo_through_a_weft_proxy_routes_reviews_by_the_signed_in_user() {
    use envoy_types::pb::envoy::config::route::v3::{
        header_matcher, route, route_action, route_match, HeaderMatcher, Route, RouteAction, RouteConfiguration,
        RouteMatch, VirtualHost,
    };
    use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher, StringMatcher};
    use envoy_types::util::pack_any;

    let details = App::start("details", &[]).await;
    let ratings = App::start("ratings", &[]).await;
    let reviews_v1 = App::start("reviews", &[("SERVICE_VERSION", "v1".into())]).await;

    let to = |cluster: &str| {
        Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        }))
    };
    let any_path = || Some(route_match::PathSpecifier::Prefix("/".into()));
    let vhost = |service: &str, routes: Vec<Route>| VirtualHost {
        name: service.into(),
        domains: vec![service.into(), format!("{service}:9080")],
        routes,
        ..Default::default()
    };
    let plain = |cluster: &str| Route {
        r#match: Some(RouteMatch { path_specifier: any_path(), ..Default::default() }),
        action: to(cluster),
        ..Default::default()
    };
    let jason = Route {
        r#match: Some(RouteMatch {
            path_specifier: any_path(),
            headers: vec![HeaderMatcher {
                name: "end-user".into(),
                header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Exact("jason".into())),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }),
        action: to("reviews-v2"),
        ..Default::default()
    };
    let routes = RouteConfiguration {
        name: "bookinfo".into(),
        virtual_hosts: vec![
            vhost("details", vec![plain("details")]),
            vhost("ratings", vec![plain("ratings")]),
            vhost("reviews", vec![jason, plain("reviews-v1")]),
        ],
        ..Default::default()
    };
    let source = Arc::new(StaticSource::new());
    let hcm = build::http_connection_manager("out", Routes::Inline(Box::new(routes)), None, &[]);
    source
        .set(type_url::LISTENER, vec![pack_any(build::http_listener("out", "127.0.0.1:0".parse().unwrap(), hcm))])
        .unwrap();
    let sock = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let xds = sock.local_addr().unwrap();
    tokio::spawn(AdsServer::new(source.clone()).serve(sock, std::future::pending()));
    let bootstrap = format!(
        "node:\n  id: bookinfo-test\n  name: bookinfo\n  namespace: default\nxds:\n  address: http://{xds}\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\n"
    );
    let bootstrap = weft_proxy::bootstrap::Bootstrap::parse(&bootstrap, std::path::Path::new("<test>")).unwrap();
    let proxy = weft_proxy::proxy::ProxyHandle::start(bootstrap).await.unwrap();
    let out = proxy.listener_addr("out", Duration::from_secs(10)).await.unwrap();
    let proxy_url = format!("http://{out}");

    // reviews v2 needs the proxy's address, the proxy's clusters need reviews v2's.
    let reviews_v2 =
        App::start("reviews", &[("SERVICE_VERSION", "v2".into()), ("HTTP_PROXY", proxy_url.clone())]).await;
    source
        .set(
            type_url::CLUSTER,
            vec![
                pack_any(build::static_cluster("details", &[details.addr], false)),
                pack_any(build::static_cluster("ratings", &[ratings.addr], false)),
                pack_any(build::static_cluster("reviews-v1", &[reviews_v1.addr], false)),
                pack_any(build::static_cluster("reviews-v2", &[reviews_v2.addr], false)),
            ],
        )
        .unwrap();
    // Clusters arrived after the listener: wait until the admin API lists them all.
    let mut clusters = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        clusters = get_h1(proxy.admin_addr(), "admin", "/clusters").await.unwrap().text();
        if ["details", "ratings", "reviews-v1", "reviews-v2"].iter().all(|c| clusters.contains(&format!("{c}::"))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(clusters.contains("reviews-v2::"), "clusters never arrived: {clusters}");
    let page = App::start("productpage", &[("HTTP_PROXY", proxy_url)]).await;

    let anonymous = page.get("/productpage").await.text();
    assert!(anonymous.contains("PublisherA") && anonymous.contains("Reviewer1"), "{anonymous}");
    assert!(!anonymous.contains("<span class=\"glyphicon glyphicon-star"), "v1 for everyone else: {anonymous}");

    let jason = page.get_with("/productpage", &[("cookie", "user=jason")]).await.text();
    assert!(jason.contains("<font color=\"black\">"), "v2 for jason: {jason}");
    assert_eq!(jason.matches("glyphicon glyphicon-star\"").count(), 9, "ratings reached through the proxy: {jason}");
    proxy.shutdown().await;
}
