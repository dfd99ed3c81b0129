use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier,
    query_parameter_matcher::QueryParameterMatchSpecifier,
    route_match::{ConnectMatcher, GrpcRouteMatchOptions, PathSpecifier},
    CookieMatcher, HeaderMatcher, QueryParameterMatcher, RouteConfiguration, RouteMatch,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher::MatchPattern, RegexMatcher, StringMatcher};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, Int64Range};
use envoy_types::pb::google::protobuf::BoolValue;

use super::*;

fn path_match(spec: PathSpecifier) -> RouteMatch {
    RouteMatch { path_specifier: Some(spec), ..Default::default() }
}

fn regex(r: &str) -> RegexMatcher {
    RegexMatcher { regex: r.into(), ..Default::default() }
}

fn sm(p: MatchPattern, ignore_case: bool) -> StringMatcher {
    StringMatcher { ignore_case, match_pattern: Some(p) }
}

fn header(name: &str, spec: Option<HeaderMatchSpecifier>, invert: bool, missing_empty: bool) -> HeaderMatcher {
    HeaderMatcher {
        name: name.into(),
        header_match_specifier: spec,
        invert_match: invert,
        treat_missing_header_as_empty: missing_empty,
    }
}

/// One route "h" guarded by header matcher `h`, then a catch-all "fallback".
fn header_table(h: HeaderMatcher) -> RouteTable {
    let mut m = prefix("/");
    m.headers.push(h);
    table(vec![route("h", m), route("fallback", prefix("/"))])
}

fn hits(t: &RouteTable, headers: &[(&str, &str)]) -> bool {
    pick(t, "any", "GET", "/", headers).as_deref() == Some("h")
}

#[test]
fn prefix_exact_regex_and_separated_prefix_match_the_path_without_query() {
    let t = table(vec![
        route("exact", path_match(PathSpecifier::Path("/exact".into()))),
        route("regex", path_match(PathSpecifier::SafeRegex(regex("/re/[0-9]+")))),
        route("sep", path_match(PathSpecifier::PathSeparatedPrefix("/api".into()))),
        route("prefix", prefix("/p")),
    ]);
    let p = |u: &str| pick(&t, "h", "GET", u, &[]);
    assert_eq!(p("/exact?x=1").as_deref(), Some("exact"));
    assert_eq!(p("/exact/more"), None);
    assert_eq!(p("/re/123?q").as_deref(), Some("regex"));
    // The regex must match the whole path, not a substring.
    assert_eq!(p("/re/123x"), None);
    assert_eq!(p("/x/re/1"), None);
    assert_eq!(p("/api").as_deref(), Some("sep"));
    assert_eq!(p("/api/v1").as_deref(), Some("sep"));
    assert_eq!(p("/api?x").as_deref(), Some("sep"));
    assert_eq!(p("/apiv1"), None);
    assert_eq!(p("/pq").as_deref(), Some("prefix"));
}

#[test]
fn case_insensitive_path_matching_when_case_sensitive_is_false() {
    let mut m = prefix("/Foo");
    m.case_sensitive = Some(BoolValue { value: false });
    let mut e = path_match(PathSpecifier::Path("/Bar".into()));
    e.case_sensitive = Some(BoolValue { value: false });
    let t = table(vec![route("foo", m), route("bar", e), route("sens", prefix("/Baz"))]);
    assert_eq!(pick(&t, "h", "GET", "/fOO/x", &[]).as_deref(), Some("foo"));
    assert_eq!(pick(&t, "h", "GET", "/BAR", &[]).as_deref(), Some("bar"));
    assert_eq!(pick(&t, "h", "GET", "/baz", &[]), None);
}

#[test]
fn connect_matcher_matches_only_connect_requests() {
    let t = table(vec![route("c", path_match(PathSpecifier::ConnectMatcher(ConnectMatcher {})))]);
    let connect = http::Request::builder().method("CONNECT").uri("example.com:443").body(()).unwrap().into_parts().0;
    assert_eq!(t.select_with_random("example.com:443", &connect, 0).map(|r| r.name.clone()).as_deref(), Some("c"));
    assert_eq!(pick(&t, "h", "GET", "/", &[]), None);
}

#[test]
fn first_matching_route_wins() {
    let t = table(vec![route("a", prefix("/a")), route("ab", prefix("/ab")), route("all", prefix("/"))]);
    assert_eq!(pick(&t, "h", "GET", "/abc", &[]).as_deref(), Some("a"));
    assert_eq!(pick(&t, "h", "GET", "/b", &[]).as_deref(), Some("all"));
}

#[test]
fn header_string_matchers_exact_prefix_suffix_contains_regex() {
    let cases = [
        (MatchPattern::Exact("abc".into()), "abc", "abcd"),
        (MatchPattern::Prefix("ab".into()), "abz", "zab"),
        (MatchPattern::Suffix("yz".into()), "xyz", "yzx"),
        (MatchPattern::Contains("mid".into()), "amidb", "mi-d"),
        (MatchPattern::SafeRegex(regex("v[0-9]")), "v1", "v12"),
    ];
    for (pat, yes, no) in cases {
        let t =
            header_table(header("x-h", Some(HeaderMatchSpecifier::StringMatch(sm(pat.clone(), false))), false, false));
        assert!(hits(&t, &[("x-h", yes)]), "{pat:?} should match {yes}");
        assert!(!hits(&t, &[("x-h", no)]), "{pat:?} should not match {no}");
        assert!(!hits(&t, &[]), "{pat:?} should not match a missing header");
    }
}

#[test]
fn header_string_match_ignore_case() {
    let t = header_table(header(
        "x-h",
        Some(HeaderMatchSpecifier::StringMatch(sm(MatchPattern::Exact("AbC".into()), true))),
        false,
        false,
    ));
    assert!(hits(&t, &[("x-h", "aBc")]));
    let t = header_table(header(
        "x-h",
        Some(HeaderMatchSpecifier::StringMatch(sm(MatchPattern::Exact("AbC".into()), false))),
        false,
        false,
    ));
    assert!(!hits(&t, &[("x-h", "aBc")]));
}

#[test]
fn deprecated_header_matchers_still_work() {
    let cases = [
        (HeaderMatchSpecifier::ExactMatch("a".into()), "a", "b"),
        (HeaderMatchSpecifier::PrefixMatch("a".into()), "ab", "ba"),
        (HeaderMatchSpecifier::SuffixMatch("a".into()), "ba", "ab"),
        (HeaderMatchSpecifier::ContainsMatch("a".into()), "bab", "bbb"),
        (HeaderMatchSpecifier::SafeRegexMatch(regex("a+")), "aaa", "aab"),
    ];
    for (spec, yes, no) in cases {
        let t = header_table(header("x-h", Some(spec.clone()), false, false));
        assert!(hits(&t, &[("x-h", yes)]), "{spec:?}");
        assert!(!hits(&t, &[("x-h", no)]), "{spec:?}");
    }
    // Envoy: a deprecated exact_match with an empty value only checks presence.
    let t = header_table(header("x-h", Some(HeaderMatchSpecifier::ExactMatch(String::new())), false, false));
    assert!(hits(&t, &[("x-h", "anything")]));
    assert!(!hits(&t, &[]));
}

#[test]
fn header_invert_range_present_and_missing_semantics() {
    let inv = header_table(header("x-h", Some(HeaderMatchSpecifier::ExactMatch("a".into())), true, false));
    assert!(inv.select_with_random("h", &parts("GET", "/", &[("x-h", "b")]), 0).is_some_and(|r| &*r.name == "h"));
    assert!(!hits(&inv, &[("x-h", "a")]));
    // A missing header does not match even when inverted (unless treated as empty).
    assert!(!hits(&inv, &[]));
    let inv_empty = header_table(header("x-h", Some(HeaderMatchSpecifier::ExactMatch("a".into())), true, true));
    assert!(hits(&inv_empty, &[]));

    let range = header_table(header(
        "x-n",
        Some(HeaderMatchSpecifier::RangeMatch(Int64Range { start: -10, end: 0 })),
        false,
        false,
    ));
    assert!(hits(&range, &[("x-n", "-1")]));
    assert!(hits(&range, &[("x-n", "-10")]));
    assert!(!hits(&range, &[("x-n", "0")]));
    assert!(!hits(&range, &[("x-n", "abc")]));
    let range_inv_empty = header_table(header(
        "x-n",
        Some(HeaderMatchSpecifier::RangeMatch(Int64Range { start: 0, end: 10 })),
        true,
        true,
    ));
    assert!(hits(&range_inv_empty, &[]));

    let present = header_table(header("x-p", Some(HeaderMatchSpecifier::PresentMatch(true)), false, false));
    assert!(hits(&present, &[("x-p", "")]));
    assert!(!hits(&present, &[]));
    let absent = header_table(header("x-p", Some(HeaderMatchSpecifier::PresentMatch(false)), false, false));
    assert!(hits(&absent, &[]));
    assert!(!hits(&absent, &[("x-p", "1")]));
    let present_inv = header_table(header("x-p", Some(HeaderMatchSpecifier::PresentMatch(true)), true, false));
    assert!(hits(&present_inv, &[]));
    assert!(!hits(&present_inv, &[("x-p", "1")]));
    // No specifier means "present".
    let bare = header_table(header("X-P", None, false, false));
    assert!(hits(&bare, &[("x-p", "1")]));
    assert!(!hits(&bare, &[]));
}

#[test]
fn multiple_header_values_are_joined_with_commas() {
    let t = header_table(header("x-h", Some(HeaderMatchSpecifier::ExactMatch("a,b".into())), false, false));
    assert!(hits(&t, &[("x-h", "a"), ("x-h", "b")]));
}

#[test]
fn pseudo_headers_method_authority_path_scheme_match() {
    let exact = |n: &str, v: &str| header(n, Some(HeaderMatchSpecifier::ExactMatch(v.into())), false, false);
    let t = header_table(exact(":method", "POST"));
    assert_eq!(pick(&t, "h", "POST", "/", &[]).as_deref(), Some("h"));
    assert_eq!(pick(&t, "h", "GET", "/", &[]).as_deref(), Some("fallback"));
    let t = header_table(exact(":authority", "svc:8080"));
    assert_eq!(pick(&t, "svc:8080", "GET", "/", &[]).as_deref(), Some("h"));
    assert_eq!(pick(&t, "other", "GET", "/", &[]).as_deref(), Some("fallback"));
    let t = header_table(exact(":path", "/a?b=c"));
    assert_eq!(pick(&t, "h", "GET", "/a?b=c", &[]).as_deref(), Some("h"));
    assert_eq!(pick(&t, "h", "GET", "/a", &[]).as_deref(), Some("fallback"));
    let t = header_table(exact(":scheme", "https"));
    assert_eq!(pick(&t, "h", "GET", "https://h/", &[]).as_deref(), Some("h"));
    assert_eq!(pick(&t, "h", "GET", "/", &[]).as_deref(), Some("fallback"));
}

#[test]
fn query_parameter_string_and_present_matchers() {
    let mut m = prefix("/");
    m.query_parameters.push(QueryParameterMatcher {
        name: "v".into(),
        query_parameter_match_specifier: Some(QueryParameterMatchSpecifier::StringMatch(sm(
            MatchPattern::Exact("a b".into()),
            false,
        ))),
    });
    m.query_parameters.push(QueryParameterMatcher {
        name: "debug".into(),
        query_parameter_match_specifier: Some(QueryParameterMatchSpecifier::PresentMatch(true)),
    });
    let t = table(vec![route("q", m)]);
    assert_eq!(pick(&t, "h", "GET", "/?v=a%20b&debug", &[]).as_deref(), Some("q"));
    // Only the first value of a parameter is matched.
    assert_eq!(pick(&t, "h", "GET", "/?v=x&v=a%20b&debug", &[]), None);
    assert_eq!(pick(&t, "h", "GET", "/?v=a%20b", &[]), None);
    assert_eq!(pick(&t, "h", "GET", "/?debug", &[]), None);
}

#[test]
fn cookie_matcher_with_invert() {
    let mut m = prefix("/");
    m.cookies.push(CookieMatcher {
        name: "user".into(),
        string_match: Some(sm(MatchPattern::Exact("bob".into()), false)),
        invert_match: false,
    });
    let t = table(vec![route("c", m)]);
    assert_eq!(pick(&t, "h", "GET", "/", &[("cookie", "a=1; user=bob")]).as_deref(), Some("c"));
    assert_eq!(pick(&t, "h", "GET", "/", &[("cookie", "user=al")]), None);
    assert_eq!(pick(&t, "h", "GET", "/", &[]), None);
}

#[test]
fn grpc_match_requires_grpc_content_type() {
    let mut m = prefix("/");
    m.grpc = Some(GrpcRouteMatchOptions {});
    let t = table(vec![route("g", m)]);
    assert_eq!(pick(&t, "h", "POST", "/s/M", &[("content-type", "application/grpc")]).as_deref(), Some("g"));
    assert_eq!(pick(&t, "h", "POST", "/s/M", &[("content-type", "application/grpc+proto")]).as_deref(), Some("g"));
    assert_eq!(pick(&t, "h", "POST", "/s/M", &[("content-type", "application/grpcx")]), None);
    assert_eq!(pick(&t, "h", "POST", "/s/M", &[("content-type", "application/json")]), None);
}

#[test]
fn runtime_fraction_uses_the_random_value() {
    let mut m = prefix("/");
    m.runtime_fraction = Some(RuntimeFractionalPercent {
        default_value: Some(FractionalPercent { numerator: 25, denominator: 0 }),
        runtime_key: String::new(),
    });
    let t = table(vec![route("quarter", m), route("rest", prefix("/"))]);
    let chosen = (0..100u64)
        .filter(|r| t.select_with_random("h", &parts("GET", "/", &[]), *r).unwrap().name.as_ref() == "quarter")
        .count();
    assert_eq!(chosen, 25);
    assert_eq!(t.select_with_random("h", &parts("GET", "/", &[]), 124).unwrap().name, "quarter".into());
    assert_eq!(t.select_with_random("h", &parts("GET", "/", &[]), 125).unwrap().name, "rest".into());
}

fn domains_table(ignore_port: bool) -> RouteTable {
    let vh = |n: &str, d: &[&str]| vhost(n, d, vec![route(n, prefix("/"))]);
    RouteTable::compile(&RouteConfiguration {
        ignore_port_in_host_matching: ignore_port,
        ..rc(vec![
            vh("default", &["*"]),
            vh("exact", &["api.example.com", "api.example.com:8080"]),
            vh("suffix", &["*.example.com"]),
            vh("long-suffix", &["*.api.example.com"]),
            vh("prefix", &["api.*"]),
            vh("long-prefix", &["api.example.*"]),
            vh("port-only", &["svc:9090"]),
        ])
    })
    .unwrap()
}

#[test]
fn virtual_host_precedence_exact_suffix_prefix_default() {
    let t = domains_table(false);
    let vh = |h: &str| pick(&t, h, "GET", "/", &[]).unwrap();
    assert_eq!(vh("api.example.com"), "exact");
    assert_eq!(vh("API.Example.COM"), "exact");
    assert_eq!(vh("www.example.com"), "suffix");
    assert_eq!(vh("v1.api.example.com"), "long-suffix");
    assert_eq!(vh("api.example.org"), "long-prefix");
    assert_eq!(vh("api.other"), "prefix");
    assert_eq!(vh("other.org"), "default");
    // A wildcard never matches the empty string.
    assert_eq!(vh(".example.com"), "default");
    assert_eq!(vh("api."), "default");
}

#[test]
fn virtual_host_port_is_matched_then_stripped() {
    let t = domains_table(false);
    let vh = |h: &str| pick(&t, h, "GET", "/", &[]).unwrap();
    assert_eq!(vh("api.example.com:8080"), "exact");
    // Wildcards see the port too: "api.example.*" matches before any stripping.
    assert_eq!(vh("api.example.com:9999"), "long-prefix");
    // No domain matches with this port: retried without it.
    assert_eq!(vh("www.example.com:80"), "suffix");
    assert_eq!(vh("svc:9090"), "port-only");
    assert_eq!(vh("svc:9091"), "default");
    let t = domains_table(true);
    assert_eq!(pick(&t, "svc:9090", "GET", "/", &[]).unwrap(), "default");
    assert_eq!(pick(&t, "api.example.com:1", "GET", "/", &[]).unwrap(), "exact");
}

#[test]
fn no_virtual_host_means_no_route() {
    let t = RouteTable::compile(&rc(vec![vhost("a", &["a.com"], vec![route("a", prefix("/"))])])).unwrap();
    assert_eq!(pick(&t, "b.com", "GET", "/", &[]), None);
    assert_eq!(t.name(), "rc");
}
