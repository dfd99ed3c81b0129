//! Translator tests: each AuthorizationPolicy field on the generated RBAC, rendered in a
//! compact text form so expectations read like the policy.
#![allow(clippy::unwrap_used, deprecated)]

use std::collections::BTreeMap;
use std::path::Path;

use envoy_types::pb::envoy::config::rbac::v3::{permission::Rule as P, principal::Identifier as I};
use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier as H;
use envoy_types::pb::envoy::r#type::matcher::v3::{path_matcher, value_matcher};
use prost::Message;
use weft_xds::NodeInfo;

use super::*;
use crate::registry::RegistrySnapshot;
use crate::translate::MeshConfig;

fn mesh(yaml: &str) -> MeshConfig {
    let parsed = weft_api::parse_str(yaml, Path::new("t.yaml"));
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    MeshConfig { resources: parsed.resources, ..MeshConfig::default() }
}

fn node(ns: &str, labels: &[(&str, &str)]) -> NodeInfo {
    NodeInfo {
        id: "n".into(),
        namespace: ns.into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        ..NodeInfo::default()
    }
}

fn authz_for(yaml: &str, ns: &str, labels: &[(&str, &str)]) -> InboundAuthz {
    let m = mesh(yaml);
    let reg = RegistrySnapshot::default();
    let n = node(ns, labels);
    InboundAuthz::new(&MeshView::new(&m, &reg, &n), None)
}

fn authz(yaml: &str) -> InboundAuthz {
    authz_for(yaml, "foo", &[("app", "httpbin")])
}

fn http_rbac(a: &InboundAuthz) -> Vec<HttpRbac> {
    a.http
        .iter()
        .map(|f| match &f.config_type {
            Some(http_filter::ConfigType::TypedConfig(any)) => HttpRbac::decode(any.value.as_slice()).unwrap(),
            _ => panic!("no typed config"),
        })
        .collect()
}

fn tcp_rbac(a: &InboundAuthz) -> Vec<NetworkRbac> {
    a.tcp
        .iter()
        .map(|f| match &f.config_type {
            Some(filter::ConfigType::TypedConfig(any)) => NetworkRbac::decode(any.value.as_slice()).unwrap(),
            _ => panic!("no typed config"),
        })
        .collect()
}

fn sm(m: &StringMatcher) -> String {
    let ic = if m.ignore_case { "~" } else { "" };
    match &m.match_pattern {
        Some(MatchPattern::Exact(s)) => format!("={ic}{s}"),
        Some(MatchPattern::Prefix(s)) => format!("^{ic}{s}"),
        Some(MatchPattern::Suffix(s)) => format!("${ic}{s}"),
        Some(MatchPattern::SafeRegex(r)) => format!("/{}/", r.regex),
        other => format!("{other:?}"),
    }
}

fn hm(h: &HeaderMatcher) -> String {
    let v = match &h.header_match_specifier {
        Some(H::StringMatch(m)) => sm(m),
        Some(H::PresentMatch(true)) => "present".into(),
        other => format!("{other:?}"),
    };
    format!("{}{v}", h.name)
}

fn perm(p: &Permission) -> String {
    match p.rule.as_ref().unwrap() {
        P::Any(true) => "any".into(),
        P::AndRules(s) => format!("and({})", s.rules.iter().map(perm).collect::<Vec<_>>().join(", ")),
        P::OrRules(s) => format!("or({})", s.rules.iter().map(perm).collect::<Vec<_>>().join(", ")),
        P::NotRule(r) => format!("not({})", perm(r)),
        P::Header(h) => hm(h),
        P::UrlPath(m) => match &m.rule {
            Some(path_matcher::Rule::Path(s)) => format!("path{}", sm(s)),
            None => "path?".into(),
        },
        P::DestinationPort(p) => format!("port={p}"),
        P::DestinationIp(c) => format!("dst={}/{}", c.address_prefix, c.prefix_len.as_ref().unwrap().value),
        P::RequestedServerName(m) => format!("sni{}", sm(m)),
        other => format!("{other:?}"),
    }
}

fn prin(p: &Principal) -> String {
    match p.identifier.as_ref().unwrap() {
        I::Any(true) => "any".into(),
        I::AndIds(s) => format!("and({})", s.ids.iter().map(prin).collect::<Vec<_>>().join(", ")),
        I::OrIds(s) => format!("or({})", s.ids.iter().map(prin).collect::<Vec<_>>().join(", ")),
        I::NotId(r) => format!("not({})", prin(r)),
        I::Authenticated(a) => format!("peer{}", sm(a.principal_name.as_ref().unwrap())),
        I::DirectRemoteIp(c) => format!("src={}/{}", c.address_prefix, c.prefix_len.as_ref().unwrap().value),
        I::RemoteIp(c) => format!("remote={}/{}", c.address_prefix, c.prefix_len.as_ref().unwrap().value),
        I::Header(h) => format!("hdr:{}", hm(h)),
        I::Metadata(m) => {
            let path: Vec<String> = m
                .path
                .iter()
                .map(|s| match &s.segment {
                    Some(metadata_matcher::path_segment::Segment::Key(k)) => k.clone(),
                    None => "?".into(),
                })
                .collect();
            let v = match m.value.as_ref().and_then(|v| v.match_pattern.as_ref()) {
                Some(value_matcher::MatchPattern::StringMatch(s)) => sm(s),
                Some(value_matcher::MatchPattern::ListMatch(l)) => match &l.match_pattern {
                    Some(list_matcher::MatchPattern::OneOf(v)) => match &v.match_pattern {
                        Some(value_matcher::MatchPattern::StringMatch(s)) => format!("oneof{}", sm(s)),
                        other => format!("{other:?}"),
                    },
                    None => "list?".into(),
                },
                other => format!("{other:?}"),
            };
            format!("{}:{}{v}", m.filter, path.join("."))
        }
        other => format!("{other:?}"),
    }
}

/// `name: [permissions] <- [principals]` of each policy, sorted by name.
fn policies(r: &Rbac) -> Vec<String> {
    let mut out: Vec<String> = r
        .policies
        .iter()
        .map(|(n, p)| {
            format!(
                "{n}: [{}] <- [{}]",
                p.permissions.iter().map(perm).collect::<Vec<_>>().join(" | "),
                p.principals.iter().map(prin).collect::<Vec<_>>().join(" | ")
            )
        })
        .collect();
    out.sort();
    out
}

fn one_policy(yaml: &str) -> String {
    let rs = http_rbac(&authz(yaml));
    assert_eq!(rs.len(), 1);
    let p = policies(rs[0].rules.as_ref().unwrap());
    assert_eq!(p.len(), 1, "{p:?}");
    p[0].split_once(": ").unwrap().1.to_string()
}

fn ap(action: &str, rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\nspec:\n  action: {action}\n  rules:\n{rules}"
    )
}

#[test]
fn policies_select_by_root_namespace_namespace_and_labels() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh, namespace: istio-system}
spec: {action: DENY, rules: [{to: [{operation: {paths: ["/mesh"]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ns, namespace: foo}
spec: {action: DENY, rules: [{to: [{operation: {paths: ["/ns"]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other-ns, namespace: bar}
spec: {action: DENY, rules: [{to: [{operation: {paths: ["/bar"]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin, namespace: foo}
spec: {selector: {matchLabels: {app: httpbin}}, action: DENY, rules: [{to: [{operation: {paths: ["/sel"]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: sleep, namespace: foo}
spec: {selector: {matchLabels: {app: sleep}}, action: DENY, rules: [{to: [{operation: {paths: ["/sleep"]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: root-sel, namespace: istio-system}
spec: {selector: {matchLabels: {app: httpbin}}, action: DENY, rules: [{to: [{operation: {paths: ["/root-sel"]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: gw, namespace: foo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/gw"]}}]}]
"#;
    let rs = http_rbac(&authz(yaml));
    assert_eq!(rs.len(), 1);
    let names: Vec<String> = policies(rs[0].rules.as_ref().unwrap())
        .into_iter()
        .map(|p| p.split_once(": ").unwrap().0.to_string())
        .collect();
    assert_eq!(
        names,
        vec![
            "ns[foo]-policy[httpbin]-rule[0]",
            "ns[foo]-policy[ns]-rule[0]",
            "ns[istio-system]-policy[mesh]-rule[0]",
            "ns[istio-system]-policy[root-sel]-rule[0]",
        ]
    );
    // A workload in another namespace sees only the mesh-wide policy and its own.
    let bar = http_rbac(&authz_for(yaml, "bar", &[("app", "httpbin")]));
    assert_eq!(bar[0].rules.as_ref().unwrap().policies.len(), 3);
    // No policy: no filter at all.
    assert_eq!(authz_for("", "foo", &[]), InboundAuthz::default());
}

#[test]
fn actions_become_one_filter_each_in_istio_order() {
    let yaml = [
        ap("ALLOW", "  - to: [{operation: {methods: [GET]}}]\n"),
        ap("DENY", "  - to: [{operation: {methods: [DELETE]}}]\n").replace("name: p", "name: d"),
        ap("AUDIT", "  - to: [{operation: {methods: [POST]}}]\n").replace("name: p", "name: a"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: c, namespace: foo}\nspec:\n  action: CUSTOM\n  provider: {name: opa}\n  rules: [{to: [{operation: {paths: [\"/ext\"]}}]}]\n".to_string(),
    ]
    .join("---\n");
    let rs = http_rbac(&authz(&yaml));
    let actions: Vec<i32> = rs.iter().map(|r| r.rules.as_ref().unwrap().action).collect();
    // CUSTOM (as DENY: no ext_authz provider), AUDIT (LOG), DENY, ALLOW.
    assert_eq!(actions, vec![Action::Deny as i32, Action::Log as i32, Action::Deny as i32, Action::Allow as i32]);
    assert!(policies(rs[0].rules.as_ref().unwrap())[0].contains("path=/ext"));
    let tcp = tcp_rbac(&authz(&yaml));
    assert_eq!(tcp.len(), 4);
    assert!(tcp.iter().all(|t| t.stat_prefix == TCP_STAT_PREFIX));
}

#[test]
fn empty_rules_and_empty_rule_follow_istio() {
    // ALLOW with no rules: a policy that never matches -> deny everything.
    let allow_nothing = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: foo}\nspec: {}\n";
    assert_eq!(one_policy(allow_nothing), "[not(any)] <- [not(any)]");
    // rules: [{}] matches everything -> allow everything.
    assert_eq!(one_policy(&ap("ALLOW", "  - {}\n")), "[and(any)] <- [and(any)]");
}

#[test]
fn dry_run_policies_go_to_shadow_rules() {
    let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-path-headers\n  namespace: foo\n  annotations: {\"istio.io/dry-run\": \"true\"}\nspec:\n  action: DENY\n  rules: [{to: [{operation: {paths: [\"/headers\"]}}]}]\n";
    let rs = http_rbac(&authz(yaml));
    assert!(rs[0].rules.is_none(), "a dry-run-only action enforces nothing");
    assert_eq!(rs[0].shadow_rules_stat_prefix, DRY_RUN_DENY_PREFIX);
    assert_eq!(
        policies(rs[0].shadow_rules.as_ref().unwrap()),
        vec!["ns[foo]-policy[deny-path-headers]-rule[0]: [and(or(path=/headers))] <- [and(any)]"]
    );
    let allow = yaml.replace("DENY", "ALLOW");
    let rs = http_rbac(&authz(&allow));
    assert_eq!(rs[0].shadow_rules_stat_prefix, DRY_RUN_ALLOW_PREFIX);
    // Mixed: the enforced policy stays in rules.
    let mixed = format!("{yaml}---\n{}", ap("DENY", "  - to: [{operation: {paths: [\"/x\"]}}]\n"));
    let rs = http_rbac(&authz(&mixed));
    assert_eq!(rs[0].rules.as_ref().unwrap().policies.len(), 1);
    assert_eq!(rs[0].shadow_rules.as_ref().unwrap().policies.len(), 1);
}

#[test]
fn source_fields_become_principals() {
    let got = one_policy(&ap(
        "ALLOW",
        r#"  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep", "cluster.local/ns/a/*", "*/sa/x", "*"]
        notPrincipals: ["cluster.local/ns/default/sa/bad"]
        requestPrincipals: ["https://iss/sub"]
        namespaces: ["foo", "dev-*"]
        notNamespaces: ["prod"]
        remoteIpBlocks: ["1.2.3.4"]
        ipBlocks: ["10.0.0.0/8"]
        notIpBlocks: ["10.9.0.0/16"]
"#,
    ));
    assert_eq!(
        got,
        "[and(any)] <- [and(\
or(peer=spiffe://cluster.local/ns/default/sa/sleep, peer^spiffe://cluster.local/ns/a/, peer/spiffe://.*/sa/x/, peer/.+/), \
not(or(peer=spiffe://cluster.local/ns/default/sa/bad)), \
or(istio_authn:request.auth.principal=https://iss/sub), \
or(peer/.*/ns/foo/.*/, peer/.*/ns/dev-.*/.*/), \
not(or(peer/.*/ns/prod/.*/)), \
or(remote=1.2.3.4/32), \
or(src=10.0.0.0/8), \
not(or(src=10.9.0.0/16)))]"
    );
}

#[test]
fn operation_fields_become_permissions() {
    let got = one_policy(&ap(
        "ALLOW",
        r#"  - to:
    - operation:
        hosts: ["httpbin.foo", "*.example.com", "api.*", "admin.foo:8000"]
        notHosts: ["*"]
        methods: ["GET", "HEAD"]
        notMethods: ["DELETE"]
        paths: ["/ip", "/api/*", "*/info", "*", "/v1/{*}/items/{**}"]
        notPaths: ["/admin"]
        ports: ["8000"]
        notPorts: ["9000"]
"#,
    ));
    assert_eq!(
        got,
        "[and(\
or(:authority/(?i)httpbin\\.foo(:[0-9]+)?/, :authority/(?i).*\\.example\\.com(:[0-9]+)?/, :authority^~api., :authority=~admin.foo:8000), \
not(or(:authoritypresent)), \
or(:method=GET, :method=HEAD), \
not(or(:method=DELETE)), \
or(path=/ip, path^/api/, path$/info, path/.+/, path//v1/[^/]+/items/.*/), \
not(or(path=/admin)), \
or(port=8000), \
not(or(port=9000)))] <- [and(any)]"
    );
}

#[test]
fn several_from_and_to_entries_are_ored() {
    let got = one_policy(&ap(
        "ALLOW",
        "  - from: [{source: {namespaces: [a]}}, {source: {namespaces: [b]}}]\n    to: [{operation: {methods: [GET]}}, {operation: {paths: [/x]}}]\n",
    ));
    assert_eq!(
        got,
        "[and(or(:method=GET)) | and(or(path=/x))] <- [and(or(peer/.*/ns/a/.*/)) | and(or(peer/.*/ns/b/.*/))]"
    );
}

#[test]
fn when_conditions_join_the_matching_side() {
    let got = one_policy(&ap(
        "ALLOW",
        r#"  - to: [{operation: {methods: [GET]}}]
    when:
    - {key: "request.headers[x-token]", values: ["admin", "ops-*"], notValues: ["*-test"]}
    - {key: source.ip, values: ["10.1.0.0/16"]}
    - {key: remote.ip, notValues: ["9.9.9.9"]}
    - {key: source.namespace, values: [foo]}
    - {key: source.principal, values: ["cluster.local/ns/foo/sa/sleep"]}
    - {key: destination.port, values: ["8000"]}
    - {key: destination.ip, values: ["10.0.0.7"]}
    - {key: connection.sni, values: ["*.foo.svc"]}
    - {key: request.auth.principal, values: ["iss/sub"]}
    - {key: request.auth.audiences, values: ["aud"]}
    - {key: request.auth.presenter, values: ["azp"]}
    - {key: "request.auth.claims[groups]", values: ["dev"]}
    - {key: "request.auth.claims[nested][key]", values: ["v*"]}
"#,
    ));
    assert_eq!(
        got,
        "[and(or(:method=GET), or(port=8000), or(dst=10.0.0.7/32), or(sni$.foo.svc))] <- [and(\
or(hdr:x-token=admin, hdr:x-token^ops-), not(or(hdr:x-token$-test)), \
or(src=10.1.0.0/16), \
not(or(remote=9.9.9.9/32)), \
or(peer/.*/ns/foo/.*/), \
or(peer=spiffe://cluster.local/ns/foo/sa/sleep), \
or(istio_authn:request.auth.principal=iss/sub), \
or(istio_authn:request.auth.audiences=aud), \
or(istio_authn:request.auth.presenter=azp), \
or(istio_authn:request.auth.claims.groupsoneof=dev), \
or(istio_authn:request.auth.claims.nested.keyoneof^v))]"
    );
}

#[test]
fn tcp_filters_drop_allow_rules_with_http_fields_and_widen_deny_rules() {
    let allow = ap(
        "ALLOW",
        "  - to: [{operation: {methods: [GET]}}]\n  - from: [{source: {principals: [\"cluster.local/ns/foo/sa/a\"]}}]\n",
    );
    let tcp = tcp_rbac(&authz(&allow));
    // The HTTP-only rule 0 never matches on TCP: it is gone; rule 1 stays.
    assert_eq!(
        policies(tcp[0].rules.as_ref().unwrap()),
        vec!["ns[foo]-policy[p]-rule[1]: [and(any)] <- [and(or(peer=spiffe://cluster.local/ns/foo/sa/a))]"]
    );
    let deny = ap("DENY", "  - to: [{operation: {methods: [GET], ports: [\"8000\"]}}]\n");
    let tcp = tcp_rbac(&authz(&deny));
    // DENY: the method is ignored, the rule still denies port 8000.
    assert_eq!(
        policies(tcp[0].rules.as_ref().unwrap()),
        vec!["ns[foo]-policy[p]-rule[0]: [and(or(port=8000))] <- [and(any)]"]
    );
    // Unknown keys and invalid values follow the same rule.
    let unknown = ap("ALLOW", "  - when: [{key: \"experimental.envoy.filters.x[y]\", values: [z]}]\n");
    assert!(http_rbac(&authz(&unknown))[0].rules.as_ref().unwrap().policies.is_empty());
    let bad_ip =
        ap("DENY", "  - from: [{source: {ipBlocks: [\"not-an-ip\"]}}]\n    to: [{operation: {paths: [/x]}}]\n");
    assert_eq!(one_policy(&bad_ip), "[and(or(path=/x))] <- [and(any)]");
}

#[test]
fn inbound_listeners_carry_the_filters_before_cors_fault_router() {
    use crate::translate::{translate, ProxyMode};
    let yaml = ap("DENY", "  - to: [{operation: {methods: [DELETE]}}]\n");
    let m = mesh(&yaml);
    let mut n = node("foo", &[("app", "httpbin")]);
    n.inbound = Some("127.0.0.1:15006".parse().unwrap());
    n.ports = vec![
        weft_xds::PortInfo { name: "http".into(), port: 8000, protocol: "TCP".into(), app_protocol: None },
        weft_xds::PortInfo { name: "tcp".into(), port: 9000, protocol: "TCP".into(), app_protocol: None },
    ];
    let out = translate(&m, &RegistrySnapshot::default(), &n, ProxyMode::Explicit);
    let http = out.listener("inbound|8000").unwrap();
    let filter = &http.filter_chains[0].filters[0];
    let hcm = match &filter.config_type {
        Some(filter::ConfigType::TypedConfig(a)) => HttpConnectionManager::decode(a.value.as_slice()).unwrap(),
        _ => panic!(),
    };
    let names: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        ["envoy.filters.http.rbac", "envoy.filters.http.cors", "envoy.filters.http.fault", "envoy.filters.http.router"]
    );
    let tcp = out.listener("inbound|9000").unwrap();
    let names: Vec<&str> = tcp.filter_chains[0].filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["envoy.filters.network.rbac", "envoy.filters.network.tcp_proxy"]);
    // Explicit mode: the listener's own port is not the workload's, so ports are
    // decided statically (8000: any; other ports: never).
    let ported =
        ap("DENY", "  - to: [{operation: {ports: [\"8000\"]}}]\n  - to: [{operation: {notPorts: [\"8000\"]}}]\n");
    let out = translate(&mesh(&ported), &RegistrySnapshot::default(), &n, ProxyMode::Explicit);
    let rbac_of = |l: &str| {
        let hcm = match &out.listener(l).unwrap().filter_chains[0].filters[0].config_type {
            Some(filter::ConfigType::TypedConfig(a)) => a.clone(),
            _ => panic!(),
        };
        let rules = match hcm.type_url.ends_with("network.rbac.v3.RBAC") {
            true => NetworkRbac::decode(hcm.value.as_slice()).unwrap().rules.unwrap(),
            false => {
                let hcm = HttpConnectionManager::decode(hcm.value.as_slice()).unwrap();
                match &hcm.http_filters[0].config_type {
                    Some(http_filter::ConfigType::TypedConfig(a)) => {
                        HttpRbac::decode(a.value.as_slice()).unwrap().rules.unwrap()
                    }
                    _ => panic!(),
                }
            }
        };
        policies(&rules)
    };
    assert_eq!(
        rbac_of("inbound|8000"),
        vec![
            "ns[foo]-policy[p]-rule[0]: [and(or(any))] <- [and(any)]",
            "ns[foo]-policy[p]-rule[1]: [and(not(or(any)))] <- [and(any)]"
        ]
    );
    assert_eq!(
        rbac_of("inbound|9000"),
        vec![
            "ns[foo]-policy[p]-rule[0]: [and(or(not(any)))] <- [and(any)]",
            "ns[foo]-policy[p]-rule[1]: [and(not(or(not(any))))] <- [and(any)]"
        ]
    );
    // The outbound listener has no authorization.
    let outbound = out.listener(crate::translate::OUTBOUND).unwrap();
    assert_eq!(outbound.filter_chains[0].filters.len(), 1);
    // Transparent mode: the virtualInbound chains get them too.
    let out = translate(&m, &RegistrySnapshot::default(), &n, ProxyMode::Transparent);
    let vi = out.listener("virtualInbound").unwrap();
    assert_eq!(vi.filter_chains[1].filters[0].name, "envoy.filters.network.rbac");
    assert_eq!(vi.default_filter_chain.as_ref().unwrap().filters[0].name, "envoy.filters.network.rbac");
}

#[test]
fn every_istio_security_task_sample_translates() {
    let dir = weft_testkit::conformance_dir().join("tasks/security");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut seen = 0;
    for e in entries {
        let path = e.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let parsed = weft_api::parse_str(&text, &path);
        assert!(parsed.errors.is_empty(), "{}: {:?}", path.display(), parsed.errors);
        for r in &parsed.resources {
            let Spec::AuthorizationPolicy(ap) = &r.spec else { continue };
            seen += 1;
            let labels: Vec<(&str, &str)> = ap
                .selector
                .as_ref()
                .map(|s| s.match_labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect())
                .unwrap_or_default();
            let m = MeshConfig { resources: parsed.resources.clone(), ..MeshConfig::default() };
            let reg = RegistrySnapshot::default();
            let n = node(&r.meta.namespace, &labels);
            let a = InboundAuthz::new(&MeshView::new(&m, &reg, &n), None);
            assert!(!a.http.is_empty() && !a.tcp.is_empty(), "{}: no filter", path.display());
        }
    }
    assert!(seen >= 9, "only {seen} AuthorizationPolicy samples found");
}
