//! Every routing feature, end to end: an ADS server pushes listeners, routes, clusters
//! and endpoints to a weft proxy; real HTTP requests go through it to echo servers, and
//! each test asserts which backend answered, with what status and headers.

#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use envoy_types::pb::envoy::config::core::v3::{data_source, DataSource, HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::config::route::v3::{
    redirect_action, route, route_match, DirectResponseAction, QueryParameterMatcher, RedirectAction, RetryPolicy,
    Route, RouteConfiguration,
};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{fault_delay, FaultDelay};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{fault_abort, FaultAbort, HttpFault};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    string_matcher, RegexMatchAndSubstitute, RegexMatcher, StringMatcher,
};
use envoy_types::pb::envoy::r#type::v3::{fractional_percent::DenominatorType, FractionalPercent};
use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};
use envoy_types::util::pack_any;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::{get_h1, get_via_proxy, Reply};
use weft_xds::type_url;

struct Setup {
    mesh: Mesh,
    proxy: ProxyHandle,
    out: SocketAddr,
    _backends: Vec<EchoServer>,
}

/// Backends `a`, `b`, `c` (echo servers named so), listener `out`, and `routes`.
async fn setup(routes: RouteConfiguration) -> Setup {
    let mesh = Mesh::start().await;
    let backends = vec![EchoServer::start("a").await, EchoServer::start("b").await, EchoServer::start("c").await];
    clusters(
        &mesh,
        &[("a", vec![backends[0].addr]), ("b", vec![backends[1].addr]), ("c", vec![backends[2].addr])],
        false,
    );
    mesh.set(type_url::LISTENER, vec![http_out(&["websocket", "CONNECT"])]);
    mesh.set(type_url::ROUTE, vec![pack_any(routes)]);
    let proxy = mesh.proxy("routing", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.expect("listener out bound");
    Setup { mesh, proxy, out, _backends: backends }
}

fn server(r: &Reply) -> String {
    r.header("x-echo-server").unwrap_or("<local>").to_string()
}

async fn get(s: &Setup, host: &str, path: &str) -> Reply {
    get_h1(s.out, host, path).await.expect("request through the proxy")
}

async fn get_with(s: &Setup, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = weft_testkit::http::request(http::Method::GET, host, path, Bytes::new()).unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    weft_testkit::http::send_h1(s.out, req).await.unwrap()
}

fn path_match(spec: route_match::PathSpecifier) -> envoy_types::pb::envoy::config::route::v3::RouteMatch {
    envoy_types::pb::envoy::config::route::v3::RouteMatch { path_specifier: Some(spec), ..Default::default() }
}

fn safe_regex(r: &str) -> RegexMatcher {
    RegexMatcher { regex: r.into(), ..Default::default() }
}

#[tokio::test]
async fn path_exact_prefix_and_regex_choose_the_backend_in_order() {
    let s = setup(rc(
        "routes",
        vec![vhost(
            "all",
            &["*"],
            vec![
                route("exact", path_match(route_match::PathSpecifier::Path("/exact".into())), to("a")),
                route("regex", path_match(route_match::PathSpecifier::SafeRegex(safe_regex("/items/[0-9]+"))), to("b")),
                route("prefix", prefix("/"), to("c")),
            ],
        )],
    ))
    .await;
    assert_eq!(server(&get(&s, "svc", "/exact").await), "a");
    assert_eq!(server(&get(&s, "svc", "/exact/more").await), "c", "exact must not match a longer path");
    assert_eq!(server(&get(&s, "svc", "/items/42").await), "b");
    assert_eq!(server(&get(&s, "svc", "/items/42x").await), "c", "regex must match the whole path");
    assert_eq!(server(&get(&s, "svc", "/items/7?q=1").await), "b", "the query is not part of the path");
}

#[tokio::test]
async fn virtual_hosts_are_chosen_by_authority_and_unknown_hosts_get_404() {
    let s = setup(rc(
        "routes",
        vec![
            vhost("reviews", &["reviews", "reviews:9080"], vec![route("r", prefix("/"), to("a"))]),
            vhost("wild", &["*.example.com"], vec![route("w", prefix("/"), to("b"))]),
        ],
    ))
    .await;
    assert_eq!(server(&get(&s, "reviews", "/").await), "a");
    assert_eq!(server(&get(&s, "reviews:9080", "/").await), "a");
    assert_eq!(server(&get(&s, "api.example.com", "/").await), "b");
    let r = get(&s, "nowhere", "/").await;
    assert_eq!(r.status, 404, "no virtual host: NR");
    // Explicit proxy mode: the absolute-form authority selects the virtual host.
    let r = get_via_proxy(s.out, "http://api.example.com/x").await.unwrap();
    assert_eq!(server(&r), "b");
    assert_eq!(r.json().unwrap()["path"], "/x", "absolute-form is sent upstream in origin-form");
}

#[tokio::test]
async fn header_and_query_matchers_with_invert() {
    let mut jason = prefix("/");
    jason.headers.push(exact_header("end-user", "jason"));
    let mut not_canary = prefix("/");
    let mut h = exact_header("x-canary", "yes");
    h.invert_match = true;
    not_canary.headers.push(h);
    not_canary.query_parameters.push(QueryParameterMatcher {
        name: "debug".into(),
        query_parameter_match_specifier: Some(
            envoy_types::pb::envoy::config::route::v3::query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(true),
        ),
    });
    let s = setup(rc(
        "routes",
        vec![vhost(
            "all",
            &["*"],
            vec![
                route("jason", jason, to("a")),
                route("debug", not_canary, to("b")),
                route("rest", prefix("/"), to("c")),
            ],
        )],
    ))
    .await;
    assert_eq!(server(&get_with(&s, "svc", "/", &[("end-user", "jason")]).await), "a");
    assert_eq!(server(&get_with(&s, "svc", "/", &[("end-user", "bob")]).await), "c");
    assert_eq!(server(&get_with(&s, "svc", "/p?debug=1", &[("x-canary", "no")]).await), "b");
    assert_eq!(server(&get_with(&s, "svc", "/p", &[("x-canary", "no")]).await), "c", "query parameter must be present");
    assert_eq!(server(&get_with(&s, "svc", "/p?debug=1", &[("x-canary", "yes")]).await), "c", "inverted header match");
    // As in Envoy 1.40 (checked by the differential test): a missing header never
    // matches, even inverted, unless treat_missing_header_as_empty is set.
    assert_eq!(server(&get(&s, "svc", "/p?debug=1").await), "c");
}

#[tokio::test]
async fn weighted_clusters_split_traffic_by_weight() {
    let s = setup(rc(
        "routes",
        vec![vhost("all", &["*"], vec![route("split", prefix("/"), weighted(&[("a", 75), ("b", 25)]))])],
    ))
    .await;
    let n = 400;
    let mut a = 0;
    for _ in 0..n {
        match server(&get(&s, "svc", "/").await).as_str() {
            "a" => a += 1,
            "b" => {}
            other => panic!("unexpected backend {other}"),
        }
    }
    // 75% of 400 = 300; a binomial 5-sigma band is about +-43.
    assert!((257..=343).contains(&a), "a got {a} of {n}");
}

#[tokio::test]
async fn prefix_regex_and_host_rewrites_change_what_upstream_sees() {
    let mut pre = to("a");
    pre.prefix_rewrite = "/v2/".into();
    let mut re = to("b");
    re.regex_rewrite = Some(RegexMatchAndSubstitute {
        pattern: Some(safe_regex("^/users/([0-9]+)/profile$")),
        substitution: "/profile?id=\\1".into(),
    });
    let mut host = to("c");
    host.host_rewrite_specifier =
        Some(envoy_types::pb::envoy::config::route::v3::route_action::HostRewriteSpecifier::HostRewriteLiteral(
            "internal.svc".into(),
        ));
    let s = setup(rc(
        "routes",
        vec![vhost(
            "all",
            &["*"],
            vec![
                route("pre", prefix("/v1/"), pre),
                route("re", prefix("/users/"), re),
                route("host", prefix("/h"), host),
            ],
        )],
    ))
    .await;
    let r = get(&s, "svc", "/v1/items?x=1").await;
    assert_eq!(server(&r), "a");
    assert_eq!(r.json().unwrap()["path"], "/v2/items?x=1");
    let r = get(&s, "svc", "/users/17/profile").await;
    assert_eq!(r.json().unwrap()["path"], "/profile?id=17");
    let r = get(&s, "svc", "/h").await;
    assert_eq!(r.json().unwrap()["headers"]["host"], "internal.svc");
}

#[tokio::test]
async fn redirect_and_direct_response_are_answered_by_the_proxy() {
    let redirect = Route {
        name: "moved".into(),
        r#match: Some(prefix("/old")),
        action: Some(route::Action::Redirect(RedirectAction {
            host_redirect: "new.example.com".into(),
            path_rewrite_specifier: Some(redirect_action::PathRewriteSpecifier::PathRedirect("/new".into())),
            response_code: redirect_action::RedirectResponseCode::PermanentRedirect as i32,
            ..Default::default()
        })),
        ..Default::default()
    };
    let direct = Route {
        name: "teapot".into(),
        r#match: Some(prefix("/tea")),
        action: Some(route::Action::DirectResponse(DirectResponseAction {
            status: 418,
            body: Some(DataSource {
                specifier: Some(data_source::Specifier::InlineString("short and stout".into())),
                ..Default::default()
            }),
            ..Default::default()
        })),
        ..Default::default()
    };
    let s =
        setup(rc("routes", vec![vhost("all", &["*"], vec![redirect, direct, route("rest", prefix("/"), to("a"))])]))
            .await;
    let r = get(&s, "svc", "/old").await;
    assert_eq!(r.status, 308);
    assert_eq!(r.header("location"), Some("http://new.example.com/new"));
    let r = get(&s, "svc", "/tea").await;
    assert_eq!(r.status, 418);
    assert_eq!(r.text(), "short and stout");
    assert!(r.header("x-echo-server").is_none());
}

fn hv(k: &str, v: &str, action: i32) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue { key: k.into(), value: v.into(), ..Default::default() }),
        append_action: action,
        ..Default::default()
    }
}

#[tokio::test]
async fn request_and_response_headers_are_added_set_and_removed() {
    let mut r = route("edit", prefix("/"), to("a"));
    r.request_headers_to_add = vec![hv("x-added", "1", 0), hv("x-overwrite", "new", 2)];
    r.request_headers_to_remove = vec!["x-secret".into()];
    r.response_headers_to_add = vec![hv("x-served-by", "weft", 2)];
    r.response_headers_to_remove = vec!["x-echo-server".into()];
    let s = setup(rc("routes", vec![vhost("all", &["*"], vec![r])])).await;
    let reply = get_with(&s, "svc", "/", &[("x-overwrite", "old"), ("x-secret", "s3cr3t")]).await;
    let h = &reply.json().unwrap()["headers"];
    assert_eq!(h["x-added"], "1");
    assert_eq!(h["x-overwrite"], "new");
    assert!(h.get("x-secret").is_none(), "removed request header reached upstream: {h}");
    assert_eq!(reply.header("x-served-by"), Some("weft"));
    assert!(reply.header("x-echo-server").is_none());
}

fn pct(n: u32) -> Option<FractionalPercent> {
    Some(FractionalPercent { numerator: n, denominator: DenominatorType::Hundred as i32 })
}

#[tokio::test]
async fn fault_filter_aborts_and_delays_by_route() {
    let mut abort = route("abort", prefix("/abort"), to("a"));
    abort.typed_per_filter_config.insert(
        "envoy.filters.http.fault".into(),
        pack_any(HttpFault {
            abort: Some(FaultAbort {
                percentage: pct(100),
                error_type: Some(fault_abort::ErrorType::HttpStatus(503)),
                ..Default::default()
            }),
            ..Default::default()
        }),
    );
    let mut delay = route("delay", prefix("/delay"), to("a"));
    delay.typed_per_filter_config.insert(
        "envoy.filters.http.fault".into(),
        pack_any(HttpFault {
            delay: Some(FaultDelay {
                percentage: pct(100),
                fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(PbDuration {
                    seconds: 0,
                    nanos: 300_000_000,
                })),
            }),
            ..Default::default()
        }),
    );
    let s =
        setup(rc("routes", vec![vhost("all", &["*"], vec![abort, delay, route("rest", prefix("/"), to("a"))])])).await;
    for _ in 0..5 {
        let r = get(&s, "svc", "/abort").await;
        assert_eq!(r.status, 503);
        assert_eq!(r.text(), "fault filter abort");
    }
    let t = Instant::now();
    let r = get(&s, "svc", "/delay").await;
    assert_eq!(server(&r), "a");
    assert!(t.elapsed() >= Duration::from_millis(300), "delay not injected: {:?}", t.elapsed());
    assert_eq!(server(&get(&s, "svc", "/other").await), "a");
}

/// A backend that always answers 503 and counts requests.
async fn failing_backend() -> (SocketAddr, Arc<AtomicU64>) {
    let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = sock.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                    h.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let mut r = hyper::Response::new(http_body_util::Full::new(Bytes::from_static(b"down")));
                        *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

#[tokio::test]
async fn retry_on_5xx_moves_to_a_healthy_endpoint() {
    let mesh = Mesh::start().await;
    let good = EchoServer::start("good").await;
    let (bad, bad_hits) = failing_backend().await;
    clusters(&mesh, &[("mixed", vec![good.addr, bad]), ("onlybad", vec![bad])], false);
    // Round robin, so the failing endpoint is certainly chosen first for some requests.
    let mut mixed = weft_xds::build::eds_cluster("mixed", false);
    mixed.metadata = None;
    mesh.set(type_url::CLUSTER, vec![pack_any(mixed), pack_any(weft_xds::build::eds_cluster("onlybad", false))]);
    let mut retrying = to("mixed");
    retrying.retry_policy =
        Some(RetryPolicy { retry_on: "5xx".into(), num_retries: Some(UInt32Value { value: 3 }), ..Default::default() });
    let mut no_retry = to("onlybad");
    no_retry.retry_policy = None;
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc(
            "routes",
            vec![vhost("all", &["*"], vec![route("nr", prefix("/bad"), no_retry), route("r", prefix("/"), retrying)])],
        ))],
    );
    let proxy = mesh.proxy("retry", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    for _ in 0..30 {
        let r = get_h1(out, "svc", "/").await.unwrap();
        assert_eq!(r.status, 200, "a retry should have reached the healthy endpoint");
        assert_eq!(r.header("x-echo-server"), Some("good"));
        // Every attempt, the retried one included, carries the request's headers.
        let seen = r.json().unwrap();
        assert_eq!(seen["headers"]["host"], "svc", "the attempt that answered lost the Host header: {seen}");
        assert!(seen["headers"]["x-request-id"].is_string(), "the attempt that answered lost x-request-id: {seen}");
    }
    assert!(bad_hits.load(Ordering::SeqCst) > 0, "the failing endpoint was never tried, so nothing was retried");
    let r = get_h1(out, "svc", "/bad").await.unwrap();
    assert_eq!(r.status, 503, "without a retry policy the upstream 503 is returned as is");
    assert_eq!(r.text(), "down");
}

#[tokio::test]
async fn route_timeout_answers_504_and_per_try_timeout_retries() {
    let mut slow = to("a");
    slow.timeout = Some(PbDuration { seconds: 0, nanos: 200_000_000 });
    let s = setup(rc("routes", vec![vhost("all", &["*"], vec![route("slow", prefix("/"), slow)])])).await;
    let t = Instant::now();
    let r = get(&s, "svc", "/delay/2000").await;
    assert_eq!(r.status, 504);
    assert_eq!(r.text(), "upstream request timeout");
    assert!(t.elapsed() < Duration::from_millis(1500), "timeout did not fire: {:?}", t.elapsed());
    let r = get(&s, "svc", "/delay/10").await;
    assert_eq!(r.status, 200);
    drop(s.mesh);
    drop(s.proxy);
}

#[tokio::test]
async fn unknown_cluster_gives_503_and_no_route_gives_404() {
    let s = setup(rc(
        "routes",
        vec![vhost(
            "all",
            &["*"],
            vec![route("ghost", prefix("/ghost"), to("missing")), route("a", prefix("/a"), to("a"))],
        )],
    ))
    .await;
    assert_eq!(get(&s, "svc", "/ghost").await.status, 503);
    assert_eq!(get(&s, "svc", "/zzz").await.status, 404);
    assert_eq!(get(&s, "svc", "/a").await.status, 200);
    let _ =
        StringMatcher { match_pattern: Some(string_matcher::MatchPattern::Exact("x".into())), ..Default::default() };
}

/// A backend that sends its headers and a first chunk at once, then stalls for 2 s
/// before the last chunk.
async fn trickle_backend() -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = sock.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n").await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                let _ = s.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await;
            });
        }
    });
    addr
}

async fn read_all(addr: SocketAddr, path: &str) -> (String, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    (String::from_utf8_lossy(&out).into_owned(), t.elapsed())
}

#[tokio::test]
async fn stream_idle_and_route_timeouts_cut_a_stalled_response_body() {
    let mesh = Mesh::start().await;
    let slow = trickle_backend().await;
    clusters(&mesh, &[("slow", vec![slow])], false);
    let mut idle = to("slow");
    idle.idle_timeout = Some(PbDuration { seconds: 0, nanos: 300_000_000 });
    idle.timeout = Some(PbDuration { seconds: 0, nanos: 0 });
    let mut overall = to("slow");
    overall.timeout = Some(PbDuration { seconds: 0, nanos: 500_000_000 });
    let mut patient = to("slow");
    patient.timeout = Some(PbDuration { seconds: 5, nanos: 0 });
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc(
            "routes",
            vec![vhost(
                "all",
                &["*"],
                vec![
                    route("idle", prefix("/idle"), idle),
                    route("overall", prefix("/overall"), overall),
                    route("ok", prefix("/"), patient),
                ],
            )],
        ))],
    );
    let proxy = mesh.proxy("body-timeouts", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    for path in ["/idle", "/overall"] {
        let (text, took) = read_all(out, path).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{path}: {text}");
        assert!(text.contains("first"), "{path}: {text}");
        assert!(!text.contains("second") && !text.ends_with("0\r\n\r\n"), "{path}: body not cut: {text}");
        assert!(took < Duration::from_millis(1800), "{path}: cut too late: {took:?}");
    }
    let (text, _) = read_all(out, "/ok").await;
    assert!(text.contains("second") && text.ends_with("0\r\n\r\n"), "a patient route must get the whole body: {text}");
}

/// Accepts connections and reads requests but never answers; counts connections.
async fn stalled_backend() -> (SocketAddr, Arc<AtomicU64>) {
    let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let conns = Arc::new(AtomicU64::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = sock.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    (addr, conns)
}

#[tokio::test]
async fn per_try_timeout_abandons_a_stalled_endpoint_and_retries_elsewhere() {
    let mesh = Mesh::start().await;
    let good = EchoServer::start("good").await;
    let (stalled, stalled_conns) = stalled_backend().await;
    let mut c = weft_xds::build::eds_cluster("mixed", false);
    c.metadata = None; // round robin: the stalled endpoint is certainly tried
    mesh.set(type_url::CLUSTER, vec![pack_any(c)]);
    mesh.set(
        type_url::ENDPOINT,
        vec![pack_any(weft_xds::build::cla(
            "mixed",
            &[
                (good.addr, 1, envoy_types::pb::envoy::config::core::v3::HealthStatus::Healthy),
                (stalled, 1, envoy_types::pb::envoy::config::core::v3::HealthStatus::Healthy),
            ],
        ))],
    );
    let mut action = to("mixed");
    action.timeout = Some(PbDuration { seconds: 5, nanos: 0 });
    action.retry_policy = Some(RetryPolicy {
        retry_on: "5xx".into(),
        num_retries: Some(UInt32Value { value: 2 }),
        per_try_timeout: Some(PbDuration { seconds: 0, nanos: 200_000_000 }),
        ..Default::default()
    });
    mesh.set(type_url::LISTENER, vec![http_out(&[])]);
    mesh.set(
        type_url::ROUTE,
        vec![pack_any(rc("routes", vec![vhost("all", &["*"], vec![route("r", prefix("/"), action)])]))],
    );
    let proxy = mesh.proxy("per-try", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.unwrap();
    for _ in 0..6 {
        let t = Instant::now();
        let r = get_h1(out, "svc", "/").await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-echo-server"), Some("good"));
        assert!(t.elapsed() < Duration::from_millis(1500), "a stalled try was not cut at 200 ms: {:?}", t.elapsed());
    }
    assert!(stalled_conns.load(Ordering::SeqCst) > 0, "the stalled endpoint was never tried");
}
