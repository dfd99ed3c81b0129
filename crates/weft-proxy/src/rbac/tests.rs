#![allow(clippy::unwrap_used, deprecated)]

use std::collections::HashMap;
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3::{
    permission, principal, rbac::Action as A, Permission as Perm, Policy as PolicyProto, Principal as Prin, Rbac,
};
use envoy_types::pb::envoy::config::route::v3::{header_matcher, HeaderMatcher as HeaderProto};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetRbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    list_matcher, metadata_matcher, path_matcher, string_matcher::MatchPattern, value_matcher, ListMatcher,
    MetadataMatcher, PathMatcher, RegexMatcher, StringMatcher, ValueMatcher,
};
use envoy_types::pb::envoy::r#type::v3::Int32Range;
use envoy_types::pb::google::protobuf::UInt32Value;
use envoy_types::util::pack_any;

use super::*;
use crate::telemetry::Metrics;

fn exact(s: &str) -> StringMatcher {
    StringMatcher { match_pattern: Some(MatchPattern::Exact(s.into())), ..Default::default() }
}
fn prefix(s: &str) -> StringMatcher {
    StringMatcher { match_pattern: Some(MatchPattern::Prefix(s.into())), ..Default::default() }
}
fn regex(s: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher { regex: s.into(), ..Default::default() })),
        ..Default::default()
    }
}
fn cidr(a: &str, len: u32) -> CidrRange {
    CidrRange { address_prefix: a.into(), prefix_len: Some(UInt32Value { value: len }) }
}
fn header(name: &str, m: StringMatcher) -> HeaderProto {
    HeaderProto {
        name: name.into(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(m)),
        ..Default::default()
    }
}
fn perm(r: permission::Rule) -> Perm {
    Perm { rule: Some(r) }
}
fn prin(i: principal::Identifier) -> Prin {
    Prin { identifier: Some(i) }
}
fn any_perm() -> Perm {
    perm(permission::Rule::Any(true))
}
fn any_prin() -> Prin {
    prin(principal::Identifier::Any(true))
}
fn authn(m: StringMatcher) -> Prin {
    prin(principal::Identifier::Authenticated(principal::Authenticated { principal_name: Some(m) }))
}
fn meta(path: &[&str], v: value_matcher::MatchPattern) -> MetadataMatcher {
    MetadataMatcher {
        filter: ISTIO_AUTHN.into(),
        path: path
            .iter()
            .map(|k| metadata_matcher::PathSegment {
                segment: Some(metadata_matcher::path_segment::Segment::Key(k.to_string())),
            })
            .collect(),
        value: Some(ValueMatcher { match_pattern: Some(v) }),
        invert: false,
    }
}

fn rbac(action: A, policies: Vec<(&str, Vec<Perm>, Vec<Prin>)>) -> Rbac {
    Rbac {
        action: action as i32,
        policies: policies
            .into_iter()
            .map(|(n, permissions, principals)| {
                (n.to_string(), PolicyProto { permissions, principals, ..Default::default() })
            })
            .collect::<HashMap<_, _>>(),
        ..Default::default()
    }
}

fn engine(r: &Rbac) -> Engine {
    compile::engine(r, "rules").unwrap()
}

/// A request and connection to evaluate against.
struct Req {
    parts: http::request::Parts,
    authority: String,
    peer: SocketAddr,
    destination: SocketAddr,
    principal: Option<String>,
    sni: Option<String>,
    auth: Option<RequestAuth>,
}

impl Req {
    fn get(path: &str) -> Req {
        let (parts, _) = http::Request::builder().method("GET").uri(path).body(()).unwrap().into_parts();
        Req {
            parts,
            authority: "httpbin.foo:8000".into(),
            peer: "10.1.2.3:40000".parse().unwrap(),
            destination: "10.0.0.7:8000".parse().unwrap(),
            principal: None,
            sni: None,
            auth: None,
        }
    }
    fn method(mut self, m: &str) -> Req {
        self.parts.method = m.parse().unwrap();
        self
    }
    fn header(mut self, k: &str, v: &str) -> Req {
        self.parts.headers.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        self
    }
    fn principal(mut self, p: &str) -> Req {
        self.principal = Some(p.into());
        self
    }
    fn input(&self) -> RbacInput<'_> {
        RbacInput {
            peer: self.peer,
            destination: self.destination,
            peer_principal: self.principal.as_deref(),
            server_name: self.sni.as_deref(),
            http: Some(HttpInput { view: RequestView { authority: &self.authority, parts: &self.parts } }),
            auth: self.auth.as_ref(),
        }
    }
    fn tcp_input(&self) -> RbacInput<'_> {
        RbacInput { http: None, auth: None, ..self.input() }
    }
}

fn perm_matches(p: Perm, r: &Req) -> bool {
    engine(&rbac(A::Allow, vec![("p", vec![p], vec![any_prin()])])).first_match(&r.input()).is_some()
}

fn prin_matches(p: Prin, r: &Req) -> bool {
    engine(&rbac(A::Allow, vec![("p", vec![any_perm()], vec![p])])).first_match(&r.input()).is_some()
}

#[test]
fn permissions_match_headers_paths_ports_ips_and_sni() {
    let r = Req::get("/status/200?x=1");
    assert!(perm_matches(any_perm(), &r));
    assert!(perm_matches(perm(permission::Rule::Header(header(":method", exact("GET")))), &r));
    assert!(!perm_matches(perm(permission::Rule::Header(header(":method", exact("POST")))), &r));
    assert!(perm_matches(perm(permission::Rule::Header(header(":path", exact("/status/200?x=1")))), &r));
    assert!(perm_matches(perm(permission::Rule::Header(header(":authority", prefix("httpbin.")))), &r));
    let path = |m| perm(permission::Rule::UrlPath(PathMatcher { rule: Some(path_matcher::Rule::Path(m)) }));
    assert!(perm_matches(path(exact("/status/200")), &r), "url_path ignores the query");
    assert!(!perm_matches(path(exact("/status/200?x=1")), &r));
    assert!(perm_matches(perm(permission::Rule::DestinationPort(8000)), &r));
    assert!(!perm_matches(perm(permission::Rule::DestinationPort(9000)), &r));
    let range = |start, end| perm(permission::Rule::DestinationPortRange(Int32Range { start, end }));
    assert!(perm_matches(range(8000, 8001), &r));
    assert!(!perm_matches(range(7000, 8000), &r), "the range end is exclusive");
    assert!(perm_matches(perm(permission::Rule::DestinationIp(cidr("10.0.0.0", 24))), &r));
    assert!(!perm_matches(perm(permission::Rule::DestinationIp(cidr("10.0.1.0", 24))), &r));
    assert!(perm_matches(perm(permission::Rule::RequestedServerName(exact(""))), &r), "no TLS: empty SNI");
    let mut tls = Req::get("/");
    tls.sni = Some("httpbin.foo".into());
    assert!(perm_matches(perm(permission::Rule::RequestedServerName(exact("httpbin.foo"))), &tls));
}

#[test]
fn permission_sets_combine_and_or_not() {
    let r = Req::get("/a");
    let get = || perm(permission::Rule::Header(header(":method", exact("GET"))));
    let post = || perm(permission::Rule::Header(header(":method", exact("POST"))));
    let and = |rules| perm(permission::Rule::AndRules(permission::Set { rules }));
    let or = |rules| perm(permission::Rule::OrRules(permission::Set { rules }));
    assert!(perm_matches(and(vec![get(), any_perm()]), &r));
    assert!(!perm_matches(and(vec![get(), post()]), &r));
    assert!(perm_matches(or(vec![post(), get()]), &r));
    assert!(!perm_matches(or(vec![post()]), &r));
    assert!(perm_matches(perm(permission::Rule::NotRule(Box::new(post()))), &r));
    assert!(!perm_matches(perm(permission::Rule::NotRule(Box::new(any_perm()))), &r));
}

#[test]
fn principals_match_peer_identity_addresses_headers_and_paths() {
    let r = Req::get("/x").principal("spiffe://cluster.local/ns/foo/sa/sleep").header("x-token", "admin");
    assert!(prin_matches(authn(exact("spiffe://cluster.local/ns/foo/sa/sleep")), &r));
    assert!(prin_matches(authn(regex(".*/ns/foo/.*")), &r));
    assert!(!prin_matches(authn(regex(".*/ns/bar/.*")), &r));
    let any_authn = || prin(principal::Identifier::Authenticated(principal::Authenticated { principal_name: None }));
    assert!(prin_matches(any_authn(), &r));
    let plain = Req::get("/x");
    assert!(!prin_matches(any_authn(), &plain), "no peer certificate: not authenticated");
    assert!(!prin_matches(authn(regex(".*")), &plain));
    assert!(prin_matches(prin(principal::Identifier::DirectRemoteIp(cidr("10.1.0.0", 16))), &r));
    assert!(!prin_matches(prin(principal::Identifier::DirectRemoteIp(cidr("10.2.0.0", 16))), &r));
    assert!(prin_matches(prin(principal::Identifier::SourceIp(cidr("10.1.2.3", 32))), &r));
    // remote_ip: the last x-forwarded-for entry, else the peer.
    assert!(prin_matches(prin(principal::Identifier::RemoteIp(cidr("10.1.2.3", 32))), &r));
    let xff = Req::get("/x").header("x-forwarded-for", "1.1.1.1, 192.168.7.9");
    assert!(prin_matches(prin(principal::Identifier::RemoteIp(cidr("192.168.0.0", 16))), &xff));
    assert!(!prin_matches(prin(principal::Identifier::RemoteIp(cidr("10.1.2.3", 32))), &xff));
    assert!(prin_matches(prin(principal::Identifier::Header(header("x-token", exact("admin")))), &r));
    assert!(!prin_matches(prin(principal::Identifier::Header(header("x-token", exact("guest")))), &r));
    let path = |m| prin(principal::Identifier::UrlPath(PathMatcher { rule: Some(path_matcher::Rule::Path(m)) }));
    assert!(prin_matches(path(prefix("/x")), &r));
    let sets = |ids| prin(principal::Identifier::AndIds(principal::Set { ids }));
    assert!(prin_matches(sets(vec![any_prin(), authn(prefix("spiffe://"))]), &r));
    assert!(!prin_matches(sets(vec![any_prin(), authn(prefix("x"))]), &r));
    let or = |ids| prin(principal::Identifier::OrIds(principal::Set { ids }));
    assert!(prin_matches(or(vec![authn(prefix("x")), any_prin()]), &r));
    assert!(prin_matches(prin(principal::Identifier::NotId(Box::new(authn(prefix("x"))))), &r));
}

#[test]
fn metadata_matchers_read_the_request_authentication() {
    let mut r = Req::get("/");
    let principal = || {
        prin(principal::Identifier::Metadata(meta(
            &["request.auth.principal"],
            value_matcher::MatchPattern::StringMatch(exact("https://issuer/alice")),
        )))
    };
    assert!(!prin_matches(principal(), &r), "no JWT: no request principal");
    let mut claims = serde_json::Map::new();
    claims.insert("groups".into(), serde_json::json!(["dev", "ops"]));
    claims.insert("iss".into(), serde_json::json!("https://issuer"));
    claims.insert("nested".into(), serde_json::json!({"key": "v"}));
    r.auth = Some(RequestAuth {
        principal: Some("https://issuer/alice".into()),
        audiences: vec!["a".into()],
        presenter: None,
        claims,
    });
    assert!(prin_matches(principal(), &r));
    let claim = |path: &[&str], v: &str| {
        prin(principal::Identifier::Metadata(meta(
            path,
            value_matcher::MatchPattern::ListMatch(Box::new(ListMatcher {
                match_pattern: Some(list_matcher::MatchPattern::OneOf(Box::new(ValueMatcher {
                    match_pattern: Some(value_matcher::MatchPattern::StringMatch(exact(v))),
                }))),
            })),
        )))
    };
    assert!(prin_matches(claim(&["request.auth.claims", "groups"], "ops"), &r));
    assert!(!prin_matches(claim(&["request.auth.claims", "groups"], "qa"), &r));
    assert!(prin_matches(claim(&["request.auth.claims", "iss"], "https://issuer"), &r), "string claims are lists");
    assert!(prin_matches(claim(&["request.auth.claims", "nested", "key"], "v"), &r));
    let aud = prin(principal::Identifier::Metadata(meta(
        &["request.auth.audiences"],
        value_matcher::MatchPattern::StringMatch(exact("a")),
    )));
    assert!(prin_matches(aud, &r));
    let mut inverted = meta(&["request.auth.presenter"], value_matcher::MatchPattern::PresentMatch(true));
    inverted.invert = true;
    assert!(prin_matches(prin(principal::Identifier::Metadata(inverted)), &r), "no presenter, inverted");
}

#[test]
fn allow_deny_and_log_actions_follow_envoy() {
    let r = Req::get("/admin");
    let admin = || perm(permission::Rule::Header(header(":path", prefix("/admin"))));
    let allow = engine(&rbac(A::Allow, vec![("admin", vec![admin()], vec![any_prin()])]));
    assert_eq!(allow.decide(&r.input()), (true, Some("admin")));
    assert_eq!(allow.decide(&Req::get("/other").input()), (false, None));
    let deny = engine(&rbac(A::Deny, vec![("admin", vec![admin()], vec![any_prin()])]));
    assert_eq!(deny.decide(&r.input()), (false, Some("admin")));
    assert_eq!(deny.decide(&Req::get("/other").input()), (true, None));
    let log = engine(&rbac(A::Log, vec![("admin", vec![admin()], vec![any_prin()])]));
    assert_eq!(log.decide(&r.input()), (true, Some("admin")));
    // Empty rule sets: ALLOW denies everything, DENY allows everything.
    assert_eq!(engine(&rbac(A::Allow, vec![])).decide(&r.input()), (false, None));
    assert_eq!(engine(&rbac(A::Deny, vec![])).decide(&r.input()), (true, None));
    // The effective policy is the first matching one by name.
    let two =
        engine(&rbac(A::Deny, vec![("b", vec![any_perm()], vec![any_prin()]), ("a", vec![admin()], vec![any_prin()])]));
    assert_eq!(two.decide(&r.input()).1, Some("a"));
    // A policy needs a matching permission AND a matching principal.
    let both = engine(&rbac(A::Allow, vec![("p", vec![admin()], vec![authn(prefix("spiffe://"))])]));
    assert!(!both.decide(&r.input()).0);
    assert!(both.decide(&Req::get("/admin").principal("spiffe://x").input()).0);
}

fn http_filter(rules: Option<Rbac>, shadow: Option<Rbac>, shadow_prefix: &str) -> Arc<RbacFilter> {
    let cfg =
        HttpRbac { rules, shadow_rules: shadow, shadow_rules_stat_prefix: shadow_prefix.into(), ..Default::default() };
    Arc::new(RbacFilter::from_http(&pack_any(cfg), "envoy.filters.http.rbac", "inbound|8000").unwrap())
}

#[test]
fn a_chain_applies_filters_in_order_and_stops_at_the_first_denial() {
    let metrics = Metrics::new();
    let get = || perm(permission::Rule::Header(header(":method", exact("GET"))));
    let deny_get = http_filter(Some(rbac(A::Deny, vec![("deny-get", vec![get()], vec![any_prin()])])), None, "");
    let allow_all = http_filter(Some(rbac(A::Allow, vec![("all", vec![any_perm()], vec![any_prin()])])), None, "");
    let audit = http_filter(Some(rbac(A::Log, vec![("audit", vec![any_perm()], vec![any_prin()])])), None, "");
    let chain = vec![audit.clone(), deny_get.clone(), allow_all.clone()];
    let v = check(&chain, &Req::get("/").input(), metrics.rbac());
    assert_eq!(v.denied.as_deref(), Some("deny-get"));
    assert_eq!(v.details().as_deref(), Some("rbac_access_denied_matched_policy[deny-get]"));
    assert!(v.log_hint, "the LOG filter ran first and matched");
    let v = check(&chain, &Req::get("/").method("POST").input(), metrics.rbac());
    assert_eq!(v.denied, None);
    assert!(v.metadata.contains(&("enforced_effective_policy_id".into(), "all".into())));
    // ALLOW with nothing matching denies with policy `none`.
    let allow_nothing = http_filter(Some(rbac(A::Allow, vec![])), None, "");
    let v = check(&[allow_nothing], &Req::get("/").input(), metrics.rbac());
    assert_eq!(v.details().as_deref(), Some("rbac_access_denied_matched_policy[none]"));
    let text = metrics.encode();
    assert!(
        text.contains(r#"weft_rbac_denied_total{stat_prefix="inbound|8000",rules_prefix="",action="DENY"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"weft_rbac_allowed_total{stat_prefix="inbound|8000",rules_prefix="",action="ALLOW"} 1"#));
    assert!(text.contains(r#"weft_rbac_logged_total{stat_prefix="inbound|8000",rules_prefix="",action="LOG"} 2"#));
}

#[test]
fn shadow_rules_are_recorded_but_never_enforced() {
    let metrics = Metrics::new();
    let headers = || perm(permission::Rule::Header(header(":path", exact("/headers"))));
    let dry_run = http_filter(
        None,
        Some(rbac(A::Deny, vec![("ns[foo]-policy[deny-path-headers]-rule[0]", vec![headers()], vec![any_prin()])])),
        "istio_dry_run_deny_",
    );
    let v = check(std::slice::from_ref(&dry_run), &Req::get("/headers").input(), metrics.rbac());
    assert_eq!(v.denied, None, "shadow rules never deny");
    assert_eq!(
        v.metadata,
        vec![
            (
                "istio_dry_run_deny_shadow_effective_policy_id".into(),
                "ns[foo]-policy[deny-path-headers]-rule[0]".into()
            ),
            ("istio_dry_run_deny_shadow_engine_result".into(), "denied".into()),
        ]
    );
    let v = check(&[dry_run], &Req::get("/ip").input(), metrics.rbac());
    assert_eq!(v.metadata, vec![("istio_dry_run_deny_shadow_engine_result".into(), "allowed".into())]);
    let text = metrics.encode();
    assert!(text.contains(r#"weft_rbac_shadow_denied_total{stat_prefix="inbound|8000",rules_prefix="istio_dry_run_deny_",action="DENY"} 1"#), "{text}");
    assert!(text.contains(r#"weft_rbac_shadow_allowed_total{stat_prefix="inbound|8000",rules_prefix="istio_dry_run_deny_",action="DENY"} 1"#));
}

#[test]
fn network_filters_see_no_http_attributes() {
    let metrics = Metrics::new();
    let cfg = NetRbac {
        stat_prefix: "tcp.".into(),
        rules: Some(rbac(
            A::Allow,
            vec![(
                "p",
                vec![perm(permission::Rule::DestinationPort(8000))],
                vec![authn(prefix("spiffe://cluster.local/ns/foo/"))],
            )],
        )),
        ..Default::default()
    };
    let f = Arc::new(RbacFilter::from_network(&pack_any(cfg), "envoy.filters.network.rbac").unwrap());
    let r = Req::get("/").principal("spiffe://cluster.local/ns/foo/sa/sleep");
    assert_eq!(check(std::slice::from_ref(&f), &r.tcp_input(), metrics.rbac()).denied, None);
    let other = Req::get("/").principal("spiffe://cluster.local/ns/bar/sa/sleep");
    assert!(check(std::slice::from_ref(&f), &other.tcp_input(), metrics.rbac()).denied.is_some());
    // Header and path permissions never match without a request.
    let r = Req::get("/a");
    assert!(!perm_matches_tcp(perm(permission::Rule::Header(header(":method", exact("GET")))), &r));
    let path = perm(permission::Rule::UrlPath(PathMatcher { rule: Some(path_matcher::Rule::Path(prefix("/"))) }));
    assert!(!perm_matches_tcp(path, &r));
}

fn perm_matches_tcp(p: Perm, r: &Req) -> bool {
    engine(&rbac(A::Allow, vec![("p", vec![p], vec![any_prin()])])).first_match(&r.tcp_input()).is_some()
}

#[test]
fn unsupported_fields_are_rejected_with_their_path() {
    let err = |r: Rbac| compile::engine(&r, "rules").unwrap_err();
    let (field, msg) = err(rbac(A::Allow, vec![("p", vec![], vec![any_prin()])]));
    assert_eq!(field, r#"rules.policies["p"].permissions"#, "{msg}");
    let (field, _) = err(rbac(
        A::Allow,
        vec![("p", vec![any_perm()], vec![prin(principal::Identifier::FilterState(Default::default()))])],
    ));
    assert_eq!(field, r#"rules.policies["p"].principals[0].filter_state"#);
    let mut bad_meta = meta(&["x"], value_matcher::MatchPattern::PresentMatch(true));
    bad_meta.filter = "envoy.filters.http.jwt_authn".into();
    let (field, msg) =
        err(rbac(A::Allow, vec![("p", vec![perm(permission::Rule::Metadata(bad_meta))], vec![any_prin()])]));
    assert_eq!(field, r#"rules.policies["p"].permissions[0].metadata.filter"#);
    assert!(msg.contains("istio_authn"), "{msg}");
    let (field, _) = err(rbac(
        A::Allow,
        vec![(
            "p",
            vec![perm(permission::Rule::AndRules(permission::Set {
                rules: vec![perm(permission::Rule::UriTemplate(Default::default()))],
            }))],
            vec![any_prin()],
        )],
    ));
    assert_eq!(field, r#"rules.policies["p"].permissions[0].and_rules.rules[0].uri_template"#);
    let (field, _) = err(rbac(
        A::Allow,
        vec![("p", vec![perm(permission::Rule::DestinationIp(cidr("not-an-ip", 8)))], vec![any_prin()])],
    ));
    assert_eq!(field, r#"rules.policies["p"].permissions[0].destination_ip.address_prefix"#);
    let mut cel = rbac(A::Allow, vec![("p", vec![any_perm()], vec![any_prin()])]);
    cel.policies.get_mut("p").unwrap().condition = Some(Default::default());
    assert_eq!(err(cel).0, r#"rules.policies["p"].condition"#);
    let http = HttpRbac { matcher: Some(Default::default()), ..Default::default() };
    assert_eq!(RbacFilter::from_http(&pack_any(http), "x", "").unwrap_err().0, "matcher");
}
