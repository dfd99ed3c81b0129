use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, DataSource, RuntimeFractionalPercent};
use envoy_types::pb::envoy::config::route::v3::{
    redirect_action::{PathRewriteSpecifier, SchemeRewriteSpecifier},
    route::Action,
    route_action::{ClusterSpecifier, HostRewriteSpecifier, RequestMirrorPolicy},
    route_match::PathSpecifier,
    weighted_cluster::ClusterWeight,
    DirectResponseAction, RedirectAction, RetryPolicy as RetryPolicyProto, Route as RouteProto, WeightedCluster,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatchAndSubstitute, RegexMatcher};
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};

use super::*;
use crate::route::{ClusterChoice, Route, RouteAction};

fn only(r: RouteProto) -> std::sync::Arc<Route> {
    table(vec![r])
        .select_with_random("h", &parts("GET", "/", &[]), 0)
        .unwrap_or_else(|| panic!("route did not match /"))
}

fn fwd(r: &Route) -> &crate::route::ForwardAction {
    match &r.action {
        RouteAction::Forward(f) => f,
        other => panic!("not a forward action: {other:?}"),
    }
}

fn weighted(ws: &[(&str, u32)]) -> ClusterSpecifier {
    ClusterSpecifier::WeightedClusters(WeightedCluster {
        clusters: ws
            .iter()
            .map(|(n, w)| ClusterWeight {
                name: n.to_string(),
                weight: Some(UInt32Value { value: *w }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
}

#[test]
fn weighted_pick_respects_weights_exactly() {
    let mut ra = forward("x");
    ra.cluster_specifier = Some(weighted(&[("a", 1), ("b", 0), ("c", 3), ("d", 6)]));
    let r = only(route_with("w", prefix("/"), ra));
    let choice = &fwd(&r).clusters;
    assert_eq!(
        choice,
        &ClusterChoice::Weighted(vec![("a".into(), 1), ("b".into(), 0), ("c".into(), 3), ("d".into(), 6)], 10)
    );
    let mut counts = std::collections::HashMap::new();
    // Three full cycles of r, starting at a large offset.
    for r in (u64::MAX - 29)..=u64::MAX {
        *counts.entry(choice.pick(r).to_string()).or_insert(0) += 1;
    }
    assert_eq!(counts.get("a"), Some(&3));
    assert_eq!(counts.get("b"), None);
    assert_eq!(counts.get("c"), Some(&9));
    assert_eq!(counts.get("d"), Some(&18));
    assert_eq!(&**ClusterChoice::Single("s".into()).pick(7), "s");
}

#[test]
fn forward_defaults_timeout_15s_and_zero_disables() {
    let r = only(route("a", prefix("/")));
    let f = fwd(&r);
    assert_eq!(f.timeout, Some(Duration::from_secs(15)));
    assert_eq!(f.idle_timeout, None);
    assert!(f.retry.is_none());
    assert_eq!(f.cluster_not_found_status, http::StatusCode::SERVICE_UNAVAILABLE);
    let mut ra = forward("a");
    ra.timeout = Some(PbDuration { seconds: 0, nanos: 0 });
    ra.idle_timeout = Some(PbDuration { seconds: 2, nanos: 500_000_000 });
    let r = only(route_with("a", prefix("/"), ra));
    assert_eq!(fwd(&r).timeout, None);
    assert_eq!(fwd(&r).idle_timeout, Some(Duration::from_millis(2500)));
}

#[test]
fn route_retry_policy_overrides_virtual_host_policy() {
    let mut vh = vhost("vh", &["*"], vec![route("inherit", prefix("/i"))]);
    vh.retry_policy = Some(RetryPolicyProto {
        retry_on: "5xx".into(),
        num_retries: Some(UInt32Value { value: 7 }),
        ..Default::default()
    });
    let mut ra = forward("own");
    ra.retry_policy = Some(RetryPolicyProto { retry_on: "reset".into(), ..Default::default() });
    vh.routes.push(route_with("own", prefix("/o"), ra));
    let t = RouteTable::compile(&rc(vec![vh])).unwrap();
    let get = |p: &str| t.select_with_random("h", &parts("GET", p, &[]), 0).unwrap();
    let i = get("/i");
    let rp = fwd(&i).retry.as_ref().unwrap();
    assert_eq!(rp.num_retries, 7);
    assert!(rp.retry_on.status_5xx);
    let o = get("/o");
    let rp = fwd(&o).retry.as_ref().unwrap();
    assert_eq!(rp.num_retries, 1);
    assert!(rp.retry_on.reset && !rp.retry_on.status_5xx);
}

#[test]
fn mirrors_take_the_most_specific_non_empty_list() {
    let mirror = |c: &str, pct: Option<u32>| RequestMirrorPolicy {
        cluster: c.into(),
        runtime_fraction: pct.map(|n| RuntimeFractionalPercent {
            default_value: Some(FractionalPercent { numerator: n, denominator: 1 }),
            runtime_key: String::new(),
        }),
        ..Default::default()
    };
    let mut vh = vhost("vh", &["*"], vec![route("inherit", prefix("/i"))]);
    vh.request_mirror_policies = vec![mirror("vh-shadow", None)];
    let mut ra = forward("own");
    ra.request_mirror_policies = vec![mirror("own-shadow", Some(2500))];
    vh.routes.push(route_with("own", prefix("/o"), ra));
    let t = RouteTable::compile(&rc(vec![vh])).unwrap();
    let i = t.select_with_random("h", &parts("GET", "/i", &[]), 0).unwrap();
    assert_eq!(fwd(&i).mirrors.len(), 1);
    assert_eq!(fwd(&i).mirrors[0].cluster, "vh-shadow");
    assert_eq!(fwd(&i).mirrors[0].percent, 100.0);
    assert!(fwd(&i).mirrors[0].append_shadow_suffix);
    let o = t.select_with_random("h", &parts("GET", "/o", &[]), 0).unwrap();
    assert_eq!(fwd(&o).mirrors[0].cluster, "own-shadow");
    assert_eq!(fwd(&o).mirrors[0].percent, 25.0);
}

fn rewrite(r: &Route, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut p = parts("GET", uri, headers);
    r.rewrite_request(&mut p);
    p
}

#[test]
fn prefix_rewrite_replaces_the_matched_prefix_and_keeps_the_query() {
    let mut ra = forward("a");
    ra.prefix_rewrite = "/v2/".into();
    let t = table(vec![route_with("a", prefix("/api/"), ra)]);
    let r = t.select_with_random("h", &parts("GET", "/api/users?id=1", &[]), 0).unwrap();
    let p = rewrite(&r, "/api/users?id=1", &[]);
    assert_eq!(p.uri.path_and_query().unwrap().as_str(), "/v2/users?id=1");
    // Exact path: the whole path is the matched part.
    let mut ra = forward("b");
    ra.prefix_rewrite = "/new".into();
    let t = table(vec![route_with("b", exact_path("/old"), ra)]);
    let r = t.select_with_random("h", &parts("GET", "/old?q", &[]), 0).unwrap();
    assert_eq!(rewrite(&r, "/old?q", &[]).uri.path_and_query().unwrap().as_str(), "/new?q");
}

#[test]
fn regex_rewrite_applies_to_the_path_only_with_re2_groups() {
    let mut ra = forward("a");
    ra.regex_rewrite = Some(RegexMatchAndSubstitute {
        pattern: Some(RegexMatcher { regex: "^/service/([^/]+)(/.*)$".into(), ..Default::default() }),
        substitution: "\\2/instance/\\1".into(),
    });
    let r = only(route_with("a", prefix("/"), ra));
    let p = rewrite(&r, "/service/foo/v1/api?service=/service/x/y", &[]);
    assert_eq!(p.uri.path_and_query().unwrap().as_str(), "/v1/api/instance/foo?service=/service/x/y");
}

#[test]
fn host_rewrite_literal_updates_host_header_and_uri_authority() {
    let mut ra = forward("a");
    ra.host_rewrite_specifier = Some(HostRewriteSpecifier::HostRewriteLiteral("new.svc:8080".into()));
    ra.append_x_forwarded_host = true;
    let r = only(route_with("a", prefix("/"), ra));
    let p = rewrite(&r, "/x?y", &[("host", "old.svc")]);
    assert_eq!(p.headers["host"], "new.svc:8080");
    assert_eq!(p.headers["x-forwarded-host"], "old.svc");
    assert_eq!(p.uri.path_and_query().unwrap().as_str(), "/x?y");
    // Absolute-form / HTTP/2 style URI: authority rewritten too.
    let p = rewrite(&r, "http://old.svc/x", &[]);
    assert_eq!(p.uri.authority().unwrap().as_str(), "new.svc:8080");
    assert_eq!(p.uri.to_string(), "http://new.svc:8080/x");
    // The authority lives in the URI; no Host header is invented next to it.
    assert!(!p.headers.contains_key("host"));
}

fn redirect_route(
    rd: RedirectAction,
    m: envoy_types::pb::envoy::config::route::v3::RouteMatch,
) -> std::sync::Arc<Route> {
    let r = RouteProto { name: "r".into(), r#match: Some(m), action: Some(Action::Redirect(rd)), ..Default::default() };
    table(vec![r]).select_with_random("h", &parts("GET", "/old/", &[]), 0).unwrap()
}

fn location(r: &Route, uri: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let resp = r.redirect_response(&parts("GET", uri, headers)).unwrap();
    (resp.status().as_u16(), resp.headers()["location"].to_str().unwrap().to_string())
}

#[test]
fn redirect_https_strips_default_port_and_defaults_to_301() {
    let r = redirect_route(
        RedirectAction {
            scheme_rewrite_specifier: Some(SchemeRewriteSpecifier::HttpsRedirect(true)),
            ..Default::default()
        },
        prefix("/"),
    );
    assert_eq!(location(&r, "/a?b=1", &[("host", "example.com:80")]), (301, "https://example.com/a?b=1".into()));
    assert_eq!(location(&r, "/a", &[("host", "example.com:8080")]).1, "https://example.com:8080/a");
    assert!(r.direct_response(&parts("GET", "/", &[])).is_none());
}

#[test]
fn redirect_host_port_path_and_strip_query_variants() {
    let r = redirect_route(
        RedirectAction {
            host_redirect: "new.example".into(),
            port_redirect: 8443,
            response_code: 1,
            path_rewrite_specifier: Some(PathRewriteSpecifier::PathRedirect("/landing".into())),
            ..Default::default()
        },
        prefix("/"),
    );
    assert_eq!(location(&r, "/old?x=1", &[("host", "a.com")]), (302, "http://new.example:8443/landing?x=1".into()));

    let r = redirect_route(
        RedirectAction {
            port_redirect: 9000,
            response_code: 2,
            strip_query: true,
            path_rewrite_specifier: Some(PathRewriteSpecifier::PrefixRewrite("/new/".into())),
            ..Default::default()
        },
        prefix("/old/"),
    );
    assert_eq!(location(&r, "/old/page?x=1", &[("host", "a.com:80")]), (303, "http://a.com:9000/new/page".into()));

    let r = redirect_route(
        RedirectAction {
            response_code: 3,
            strip_query: true,
            path_rewrite_specifier: Some(PathRewriteSpecifier::PathRedirect("/p?keep=1".into())),
            ..Default::default()
        },
        prefix("/"),
    );
    // A path_redirect's own query is never stripped.
    assert_eq!(location(&r, "/x?drop=1", &[("host", "a.com")]), (307, "http://a.com/p?keep=1".into()));

    let r = redirect_route(
        RedirectAction {
            response_code: 4,
            scheme_rewrite_specifier: Some(SchemeRewriteSpecifier::SchemeRedirect("https".into())),
            path_rewrite_specifier: Some(PathRewriteSpecifier::RegexRewrite(RegexMatchAndSubstitute {
                pattern: Some(RegexMatcher { regex: "/v1/".into(), ..Default::default() }),
                substitution: "/v2/".into(),
            })),
            ..Default::default()
        },
        prefix("/"),
    );
    assert_eq!(location(&r, "/v1/a/v1/?q=/v1/", &[("host", "a.com")]), (308, "https://a.com/v2/a/v2/?q=/v1/".into()));
}

#[test]
fn direct_response_has_status_body_and_content_type() {
    let r = RouteProto {
        name: "d".into(),
        r#match: Some(prefix("/")),
        action: Some(Action::DirectResponse(DirectResponseAction {
            status: 418,
            body: Some(DataSource { specifier: Some(Specifier::InlineString("teapot".into())), ..Default::default() }),
            ..Default::default()
        })),
        ..Default::default()
    };
    let r = table(vec![r]).select_with_random("h", &parts("GET", "/", &[]), 0).unwrap();
    match &r.action {
        RouteAction::Direct { status, body } => {
            assert_eq!(status.as_u16(), 418);
            assert_eq!(&body[..], b"teapot");
        }
        other => panic!("{other:?}"),
    }
    let resp = r.direct_response(&parts("GET", "/", &[])).unwrap();
    assert_eq!(resp.status().as_u16(), 418);
    assert_eq!(resp.headers()["content-type"], "text/plain");
    assert_eq!(&resp.body()[..], b"teapot");
    assert!(r.redirect_response(&parts("GET", "/", &[])).is_none());
}

#[test]
fn path_separated_prefix_rewrite_uses_the_prefix_length() {
    let mut ra = forward("a");
    ra.prefix_rewrite = "/b".into();
    let m = envoy_types::pb::envoy::config::route::v3::RouteMatch {
        path_specifier: Some(PathSpecifier::PathSeparatedPrefix("/a".into())),
        ..Default::default()
    };
    let t = table(vec![route_with("a", m, ra)]);
    let r = t.select_with_random("h", &parts("GET", "/a/x", &[]), 0).unwrap();
    assert_eq!(rewrite(&r, "/a/x?1", &[]).uri.path_and_query().unwrap().as_str(), "/b/x?1");
}

#[test]
fn upgrades_hash_policy_and_cluster_not_found_code_are_compiled() {
    use envoy_types::pb::envoy::config::route::v3::route_action::{
        hash_policy::{Header, PolicySpecifier},
        HashPolicy as HashPolicyProto, UpgradeConfig,
    };
    use envoy_types::pb::google::protobuf::BoolValue;
    let mut ra = forward("a");
    ra.upgrade_configs = vec![
        UpgradeConfig { upgrade_type: "WebSocket".into(), ..Default::default() },
        UpgradeConfig { upgrade_type: "h2c".into(), enabled: Some(BoolValue { value: false }), ..Default::default() },
    ];
    ra.hash_policy = vec![HashPolicyProto {
        terminal: true,
        policy_specifier: Some(PolicySpecifier::Header(Header { header_name: "x-user".into(), regex_rewrite: None })),
    }];
    ra.cluster_not_found_response_code = 1;
    let r = only(route_with("a", prefix("/"), ra));
    let f = fwd(&r);
    assert_eq!(f.upgrades, ["websocket"]);
    assert_eq!(
        f.hash_policy,
        [crate::route::HashPolicy {
            source: crate::route::HashSource::Header(http::HeaderName::from_static("x-user")),
            terminal: true
        }]
    );
    assert_eq!(f.cluster_not_found_status, http::StatusCode::NOT_FOUND);
}

#[test]
fn direct_response_body_over_the_limit_is_rejected() {
    let r = RouteProto {
        name: "d".into(),
        r#match: Some(prefix("/")),
        action: Some(Action::DirectResponse(DirectResponseAction {
            status: 200,
            body: Some(DataSource { specifier: Some(Specifier::InlineBytes(vec![b'x'; 4097])), ..Default::default() }),
            ..Default::default()
        })),
        ..Default::default()
    };
    let err = RouteTable::compile(&rc(vec![vhost("v", &["*"], vec![r])])).unwrap_err();
    assert_eq!(err.field, "virtual_hosts[0].routes[0].direct_response.body");
}

#[test]
fn require_tls_redirects_plaintext_requests_to_https_and_lets_https_through() {
    let mut vh = vhost("gw", &["*"], vec![route("app", prefix("/"))]);
    vh.require_tls = 2; // ALL
    let mut internal_ok = vhost("internal", &["internal.example"], vec![route("in", prefix("/"))]);
    internal_ok.require_tls = 1; // EXTERNAL_ONLY
    let t = RouteTable::compile(&rc(vec![vh, internal_ok])).unwrap();
    let plain = parts("GET", "/productpage?x=1", &[("host", "bookinfo.example:18080"), ("x-forwarded-proto", "http")]);
    let r = t.select("bookinfo.example:18080", &plain).unwrap();
    assert_eq!(r.virtual_host, "gw");
    let resp = r.redirect_response(&plain).unwrap();
    assert_eq!(resp.status(), 301);
    assert_eq!(resp.headers()["location"], "https://bookinfo.example:18080/productpage?x=1");
    // Already https (the connection was TLS, or a front proxy said so): routed.
    let secure = parts("GET", "/productpage", &[("host", "bookinfo.example"), ("x-forwarded-proto", "https")]);
    assert_eq!(t.select("bookinfo.example", &secure).unwrap().name, "app".into());
    // EXTERNAL_ONLY spares internal requests.
    let internal =
        parts("GET", "/", &[("host", "internal.example"), ("x-forwarded-proto", "http"), ("x-envoy-internal", "true")]);
    assert_eq!(t.select("internal.example", &internal).unwrap().name, "in".into());
    let external = parts("GET", "/", &[("host", "internal.example"), ("x-forwarded-proto", "http")]);
    assert!(matches!(t.select("internal.example", &external).unwrap().action, RouteAction::Redirect(_)));
}
