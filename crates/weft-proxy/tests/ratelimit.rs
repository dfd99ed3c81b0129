//! Local rate limiting (Envoy's `envoy.filters.http.local_ratelimit`), end to end: an
//! ADS server pushes the filter (in the connection manager, or per route through
//! `typed_per_filter_config`) to a weft proxy; real requests over real sockets go
//! through it to an echo server; each test counts what passed, what was refused and
//! what the proxy's counters say.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption, RuntimeFractionalPercent};
use envoy_types::pb::envoy::config::route::v3::rate_limit::action::{ActionSpecifier, RequestHeaders};
use envoy_types::pb::envoy::config::route::v3::rate_limit::Action;
use envoy_types::pb::envoy::config::route::v3::{RateLimit, RouteConfiguration};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{rate_limit_descriptor, LocalRateLimitDescriptor};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{http_filter, HttpFilter};
use envoy_types::pb::envoy::r#type::v3::{fractional_percent::DenominatorType, FractionalPercent, TokenBucket};
use envoy_types::pb::google::protobuf::{BoolValue, Duration as PbDuration, UInt32Value};
use envoy_types::util::pack_any;
use http_body_util::{BodyExt, Full};
use prost::Message;
use weft_proxy::proxy::ProxyHandle;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::{get_h1, Reply};
use weft_xds::build::{self, Routes};
use weft_xds::type_url;

const FILTER: &str = "envoy.filters.http.local_ratelimit";
const PREFIX: &str = "http_local_rate_limiter";

struct Setup {
    mesh: Mesh,
    proxy: ProxyHandle,
    out: SocketAddr,
    backend: EchoServer,
}

fn pct(n: u32) -> Option<RuntimeFractionalPercent> {
    Some(RuntimeFractionalPercent {
        default_value: Some(FractionalPercent { numerator: n, denominator: DenominatorType::Hundred as i32 }),
        runtime_key: "local_rate_limit_enabled".into(),
    })
}

fn bucket(max: u32, per_fill: u32, fill: Duration) -> Option<TokenBucket> {
    Some(TokenBucket {
        max_tokens: max,
        tokens_per_fill: Some(UInt32Value { value: per_fill }),
        fill_interval: Some(PbDuration { seconds: fill.as_secs() as i64, nanos: fill.subsec_nanos() as i32 }),
    })
}

fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue { key: key.into(), value: value.into(), ..Default::default() }),
        append_action: 2, // OVERWRITE_IF_EXISTS_OR_ADD
        ..Default::default()
    }
}

/// Istio's task configuration: enabled and enforced for every request, with the
/// `x-local-rate-limit: true` response header; `bucket` tokens.
fn limit(tb: Option<TokenBucket>) -> LocalRateLimit {
    LocalRateLimit {
        stat_prefix: PREFIX.into(),
        token_bucket: tb,
        filter_enabled: pct(100),
        filter_enforced: pct(100),
        response_headers_to_add: vec![header("x-local-rate-limit", "true")],
        ..Default::default()
    }
}

/// Listener `out` whose connection manager has `filter` before the router, and RDS `routes`.
fn listener(filter: Option<LocalRateLimit>) -> envoy_types::pb::google::protobuf::Any {
    let mut hcm = build::http_connection_manager("out", Routes::Rds("routes".into()), None, &[]);
    if let Some(f) = filter {
        let at = hcm.http_filters.len() - 1;
        hcm.http_filters.insert(
            at,
            HttpFilter {
                name: FILTER.into(),
                config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(f))),
                ..Default::default()
            },
        );
    }
    pack_any(build::http_listener("out", "127.0.0.1:0".parse().unwrap(), hcm))
}

fn everything(routes: Vec<envoy_types::pb::envoy::config::route::v3::Route>) -> RouteConfiguration {
    rc("routes", vec![vhost("all", &["*"], routes)])
}

async fn setup(filter: Option<LocalRateLimit>, routes: RouteConfiguration) -> Setup {
    let mesh = Mesh::start().await;
    let backend = EchoServer::start("app").await;
    clusters(&mesh, &[("app", vec![backend.addr])], false);
    mesh.set(type_url::LISTENER, vec![listener(filter)]);
    mesh.set(type_url::ROUTE, vec![pack_any(routes)]);
    let proxy = mesh.proxy("ratelimit", false).await;
    mesh.synced_all(&proxy).await;
    let out = proxy.listener_addr("out", WAIT).await.expect("listener out bound");
    Setup { mesh, proxy, out, backend }
}

async fn get(s: &Setup, path: &str) -> Reply {
    get_h1(s.out, "svc", path).await.expect("request through the proxy")
}

async fn get_as(s: &Setup, path: &str, user: &str) -> Reply {
    let mut req = weft_testkit::http::request(http::Method::GET, "svc", path, Bytes::new()).unwrap();
    req.headers_mut().insert("x-user", user.parse().unwrap());
    weft_testkit::http::send_h1(s.out, req).await.unwrap()
}

/// The proxy's Prometheus page.
async fn metrics(s: &Setup) -> String {
    get_h1(s.proxy.metrics_addr(), "metrics", "/stats/prometheus").await.unwrap().text()
}

/// The value of `weft_http_local_rate_limit_<which>_total{stat_prefix=PREFIX}` (0 when absent).
fn counter(page: &str, which: &str) -> u64 {
    let series = format!("weft_http_local_rate_limit_{which}_total{{stat_prefix=\"{PREFIX}\"}} ");
    page.lines().find_map(|l| l.strip_prefix(&series)).map_or(0, |v| v.trim().parse().unwrap())
}

/// Sends `n` requests one after the other; returns the replies and how long it took.
async fn burst(s: &Setup, path: &str, n: usize) -> (Vec<Reply>, Duration) {
    let t = Instant::now();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(get(s, path).await);
    }
    (out, t.elapsed())
}

/// Requests that passed in a burst of a bucket of `max` tokens refilled by `per_fill`
/// every second: exactly `max` when the burst took less than the fill interval (the
/// bucket's first fill comes one interval after its first request).
fn assert_passed(ok: usize, max: usize, per_fill: usize, took: Duration) {
    let fills = took.as_secs() as usize;
    assert!(
        ok >= max && ok <= max + fills * per_fill,
        "{ok} requests passed in {took:?}; expected {max} (+{per_fill} per elapsed second)"
    );
    if took < Duration::from_secs(1) {
        assert_eq!(ok, max);
    }
}

#[tokio::test]
async fn a_burst_over_the_token_bucket_is_refused_with_429_and_the_configured_headers() {
    let mut f = limit(bucket(10, 10, Duration::from_secs(1)));
    f.enable_x_ratelimit_headers = 1; // DRAFT_VERSION_03
    let s = setup(Some(f), everything(vec![route("r", prefix("/"), to("app"))])).await;
    let (replies, took) = burst(&s, "/", 15).await;
    let ok: Vec<&Reply> = replies.iter().filter(|r| r.status == 200).collect();
    let limited: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok.len() + limited.len(), 15, "only 200s and 429s");
    assert_passed(ok.len(), 10, 10, took);
    for r in &limited {
        assert_eq!(r.text(), "local_rate_limited");
        assert_eq!(r.header("x-local-rate-limit"), Some("true"));
        assert_eq!(r.header("x-ratelimit-limit"), Some("10"));
        assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
        assert!(r.header("x-echo-server").is_none(), "a refused request reached the app");
    }
    for r in &ok {
        assert!(r.header("x-local-rate-limit").is_none(), "the header is for refused requests only");
        assert_eq!(r.header("x-ratelimit-limit"), Some("10"), "x-ratelimit-* on every response");
        assert!(r.header("x-ratelimit-reset").is_some());
    }
    assert_eq!(ok[0].header("x-ratelimit-remaining"), Some("9"));
    assert_eq!(s.backend.requests(), ok.len() as u64, "the app saw only the requests that passed");
    let page = metrics(&s).await;
    assert_eq!(counter(&page, "enabled"), 15, "{page}");
    assert_eq!(counter(&page, "ok"), ok.len() as u64);
    assert_eq!(counter(&page, "rate_limited"), limited.len() as u64);
    assert_eq!(counter(&page, "enforced"), limited.len() as u64);
    assert!(page.contains("response_flags=\"RL\""), "refusals are reported with flag RL");
    weft_testkit::tools::promtool_check_metrics(&page).await.expect("promtool check metrics");
    // The bucket refills after the fill interval.
    let refilled = tokio::time::timeout(WAIT, async {
        loop {
            let r = get(&s, "/").await;
            if r.status == 200 {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the bucket never refilled");
    assert_eq!(refilled.header("x-ratelimit-limit"), Some("10"));
    drop(s.mesh);
}

#[tokio::test]
async fn shadow_mode_counts_refusals_but_lets_requests_through() {
    let mut f = limit(bucket(3, 3, Duration::from_secs(60)));
    f.filter_enforced = pct(0);
    f.request_headers_to_add_when_not_enforced = vec![header("x-rate-limited-shadow", "true")];
    let s = setup(Some(f), everything(vec![route("r", prefix("/"), to("app"))])).await;
    let (replies, _) = burst(&s, "/", 5).await;
    assert!(replies.iter().all(|r| r.status == 200), "shadow mode refuses nothing");
    let shadowed: Vec<bool> =
        replies.iter().map(|r| r.json().unwrap()["headers"].get("x-rate-limited-shadow").is_some()).collect();
    assert_eq!(shadowed, [false, false, false, true, true], "the header marks requests over the limit");
    assert_eq!(s.backend.requests(), 5);
    let page = metrics(&s).await;
    assert_eq!(counter(&page, "enabled"), 5);
    assert_eq!(counter(&page, "ok"), 3);
    assert_eq!(counter(&page, "rate_limited"), 2);
    assert_eq!(counter(&page, "enforced"), 0);
}

#[tokio::test]
async fn per_route_configs_and_descriptors_have_their_own_buckets() {
    // Istio's second form: the connection manager's filter has only a stat prefix (off),
    // the route's typed_per_filter_config carries the buckets.
    let hcm_filter = LocalRateLimit { stat_prefix: PREFIX.into(), ..Default::default() };
    let mut per_route = limit(bucket(3, 3, Duration::from_secs(60)));
    per_route.descriptors = vec![LocalRateLimitDescriptor {
        entries: vec![rate_limit_descriptor::Entry { key: "user".into(), value: "alice".into() }],
        token_bucket: bucket(1, 1, Duration::from_secs(60)),
        shadow_mode: false,
    }];
    let mut limited = route("limited", prefix("/limited"), to("app"));
    limited.typed_per_filter_config.insert(FILTER.into(), pack_any(per_route));
    if let Some(envoy_types::pb::envoy::config::route::v3::route::Action::Route(ra)) = &mut limited.action {
        ra.rate_limits = vec![RateLimit {
            actions: vec![Action {
                action_specifier: Some(ActionSpecifier::RequestHeaders(RequestHeaders {
                    header_name: "x-user".into(),
                    descriptor_key: "user".into(),
                    skip_if_absent: false,
                })),
            }],
            ..Default::default()
        }];
    }
    let open = route("open", prefix("/"), to("app"));
    let s = setup(Some(hcm_filter), everything(vec![limited, open])).await;
    // alice: her descriptor's one token (the default bucket is consumed too).
    assert_eq!(get_as(&s, "/limited", "alice").await.status, 200);
    let r = get_as(&s, "/limited", "alice").await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-local-rate-limit")),
        (429, Some("true")),
        "alice's descriptor bucket is empty"
    );
    // bob matches no descriptor: the route's default bucket has 2 of its 3 tokens left.
    assert_eq!(get_as(&s, "/limited", "bob").await.status, 200);
    assert_eq!(get_as(&s, "/limited", "bob").await.status, 200);
    assert_eq!(get_as(&s, "/limited", "bob").await.status, 429, "the route's default bucket is empty");
    // Other routes: the connection manager's filter is not enabled.
    let (replies, _) = burst(&s, "/other", 10).await;
    assert!(replies.iter().all(|r| r.status == 200), "a route without a per-route config is not limited");
}

/// An HTTP/1.1 connection kept open for several requests.
struct Conn(hyper::client::conn::http1::SendRequest<Full<Bytes>>);

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        Conn(send)
    }

    async fn status(&mut self, path: &str) -> u16 {
        let req = weft_testkit::http::request(http::Method::GET, "svc", path, Bytes::new()).unwrap();
        self.0.ready().await.unwrap();
        let resp = self.0.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        status
    }
}

#[tokio::test]
async fn per_connection_buckets_limit_each_connection_alone() {
    let mut f = limit(bucket(2, 2, Duration::from_secs(60)));
    f.local_rate_limit_per_downstream_connection = true;
    let s = setup(Some(f), everything(vec![route("r", prefix("/"), to("app"))])).await;
    let mut first = Conn::open(s.out).await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(first.status("/").await);
    }
    assert_eq!(statuses, [200, 200, 429]);
    let mut second = Conn::open(s.out).await;
    assert_eq!((second.status("/").await, second.status("/").await), (200, 200), "a new connection, a new bucket");
    assert_eq!(first.status("/").await, 429, "the first connection's bucket is still empty");
}

#[tokio::test]
async fn a_bucket_keeps_its_tokens_across_updates_that_keep_it_and_changes_reach_open_connections() {
    let s = setup(None, everything(vec![route("r", prefix("/"), to("app"))])).await;
    let mut conn = Conn::open(s.out).await;
    assert_eq!(conn.status("/").await, 200, "no filter yet");
    // The filter arrives: the open connection's next requests are limited.
    s.mesh.set(type_url::LISTENER, vec![listener(Some(limit(bucket(2, 2, Duration::from_secs(60)))))]);
    s.mesh.synced(&s.proxy, type_url::LISTENER).await;
    let statuses = [conn.status("/").await, conn.status("/").await, conn.status("/").await];
    assert_eq!(statuses, [200, 200, 429], "the open connection follows the new filter");
    // An unrelated route change keeps the bucket (empty).
    s.mesh.set(
        type_url::ROUTE,
        vec![pack_any(everything(vec![route("r", prefix("/"), to("app")), route("x", prefix("/x"), to("app"))]))],
    );
    s.mesh.synced(&s.proxy, type_url::ROUTE).await;
    assert_eq!(conn.status("/").await, 429, "the route update did not refill the bucket");
    // So does a listener update that recompiles the filter without changing its bucket
    // (another, optional, filter added to the connection manager).
    let mut l = listener(Some(limit(bucket(2, 2, Duration::from_secs(60)))));
    let mut decoded = envoy_types::pb::envoy::config::listener::v3::Listener::decode(l.value.as_slice()).unwrap();
    let f = &mut decoded.filter_chains[0].filters[0];
    let Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(any)) = &mut f.config_type
    else {
        panic!("no connection manager")
    };
    let mut hcm =
        envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager::decode(
            any.value.as_slice(),
        )
        .unwrap();
    hcm.http_filters.insert(
        0,
        HttpFilter {
            name: "unrelated".into(),
            is_optional: true,
            config_type: Some(http_filter::ConfigType::TypedConfig(envoy_types::pb::google::protobuf::Any {
                type_url: "type.googleapis.com/example.Unrelated".into(),
                value: Vec::new(),
            })),
            ..Default::default()
        },
    );
    *any = pack_any(hcm);
    l = pack_any(decoded);
    s.mesh.set(type_url::LISTENER, vec![l]);
    s.mesh.synced(&s.proxy, type_url::LISTENER).await;
    assert_eq!(conn.status("/").await, 429, "the listener update did not refill the bucket");
    // A different bucket starts full.
    s.mesh.set(type_url::LISTENER, vec![listener(Some(limit(bucket(5, 5, Duration::from_secs(60)))))]);
    s.mesh.synced(&s.proxy, type_url::LISTENER).await;
    assert_eq!(Conn::open(s.out).await.status("/").await, 200, "new bucket settings, a new bucket");
}

#[tokio::test]
async fn a_bad_rate_limit_config_is_nacked_with_its_field_and_the_previous_one_stays() {
    let s =
        setup(Some(limit(bucket(1, 1, Duration::from_secs(60)))), everything(vec![route("r", prefix("/"), to("app"))]))
            .await;
    assert_eq!(get(&s, "/").await.status, 200);
    let mut st = s.proxy.xds_status();
    s.mesh.set(type_url::LISTENER, vec![listener(Some(limit(bucket(1, 1, Duration::from_millis(10)))))]);
    let nack =
        tokio::time::timeout(WAIT, st.wait_for(|s| s.nacks > 0)).await.expect("no NACK").unwrap().last_nack.clone();
    let nack = nack.expect("NACK text");
    assert!(
        nack.contains("token_bucket.fill_interval") && nack.contains("at least 50ms"),
        "the NACK names the field: {nack}"
    );
    assert_eq!(get(&s, "/").await.status, 429, "the previous filter (1 token, used) is still in force");
    // A per-route config with an unknown status type is refused too, by field.
    let mut bad = route("r", prefix("/"), to("app"));
    let mut cfg = limit(bucket(0, 1, Duration::from_secs(1)));
    cfg.always_consume_default_token_bucket = Some(BoolValue { value: true });
    bad.typed_per_filter_config.insert(FILTER.into(), pack_any(cfg));
    s.mesh.set(type_url::ROUTE, vec![pack_any(everything(vec![bad]))]);
    let nack =
        tokio::time::timeout(WAIT, st.wait_for(|s| s.last_nack.as_deref().is_some_and(|n| n.contains("max_tokens"))))
            .await
            .expect("no NACK for the route")
            .unwrap()
            .last_nack
            .clone()
            .unwrap();
    assert!(
        nack.contains("typed_per_filter_config[envoy.filters.http.local_ratelimit].token_bucket.max_tokens"),
        "{nack}"
    );
}

#[tokio::test]
async fn grpc_calls_over_the_limit_get_unavailable_or_resource_exhausted() {
    for (exhausted, code) in [(false, "14"), (true, "8")] {
        let mesh = Mesh::start().await;
        let grpc = weft_testkit::echo::GrpcEchoServer::start("g").await;
        clusters(&mesh, &[("app", vec![grpc.addr])], true);
        let mut f = limit(bucket(1, 1, Duration::from_secs(60)));
        f.rate_limited_as_resource_exhausted = exhausted;
        mesh.set(type_url::LISTENER, vec![listener(Some(f))]);
        mesh.set(type_url::ROUTE, vec![pack_any(everything(vec![route("r", prefix("/"), to("app"))]))]);
        let proxy = mesh.proxy("ratelimit-grpc", false).await;
        mesh.synced_all(&proxy).await;
        let out = proxy.listener_addr("out", WAIT).await.unwrap();
        let call =
            || weft_testkit::echo::grpc_call(out, "echo.svc", "/echo.Echo/Unary", vec![Bytes::from_static(b"hi")]);
        let ok = call().await.unwrap();
        assert_eq!(ok.trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
        let refused = call().await.unwrap();
        assert_eq!(refused.status, 200, "gRPC refusals are trailers-only 200s");
        assert_eq!(refused.headers.get("grpc-status").map(|v| v.to_str().unwrap()), Some(code));
        assert_eq!(refused.headers.get("grpc-message").map(|v| v.to_str().unwrap()), Some("local_rate_limited"));
        assert_eq!(refused.headers.get("x-local-rate-limit").map(|v| v.to_str().unwrap()), Some("true"));
    }
}

#[tokio::test]
async fn the_configured_status_answers_refusals_and_statuses_below_400_mean_429() {
    for (code, want) in [(503, 503), (200, 429)] {
        let mut f = limit(bucket(1, 1, Duration::from_secs(60)));
        f.status = Some(envoy_types::pb::envoy::r#type::v3::HttpStatus { code });
        let s = setup(Some(f), everything(vec![route("r", prefix("/"), to("app"))])).await;
        assert_eq!(get(&s, "/").await.status, 200);
        let r = get(&s, "/").await;
        assert_eq!((r.status.as_u16(), r.text()), (want, "local_rate_limited".to_string()));
    }
}
