//! Each cross-resource check reports its Istio code on small in-memory resource sets.

use std::path::Path;

use weft_api::analyze::{analyze, analyze_with_workloads, exit_code, Level, Message, Workload};
use weft_api::{parse_file, parse_str, Kind, Resource};

fn resources(text: &str) -> Vec<Resource> {
    let p = parse_str(text, Path::new("mesh.yaml"));
    assert!(p.errors.is_empty(), "{:#?}", p.errors);
    p.resources
}

fn codes(msgs: &[Message]) -> Vec<(&'static str, String)> {
    msgs.iter().map(|m| (m.code, format!("{} {}", m.resource, m.text))).collect()
}

fn only(msgs: &[Message], code: &str) -> Vec<Message> {
    msgs.iter().filter(|m| m.code == code).cloned().collect()
}

const REVIEWS_SVC: &str = "apiVersion: v1
kind: Service
metadata:
  name: reviews
spec:
  selector: {app: reviews}
  ports:
  - name: http
    port: 9080
---
";

const REVIEWS_DR: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
---
";

fn vs_to(dest: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {dest}
"
    )
}

#[test]
fn consistent_set_has_no_messages() {
    let rs = resources(&format!("{REVIEWS_SVC}{REVIEWS_DR}{}", vs_to("{host: reviews, subset: v1}")));
    let msgs = analyze(&rs);
    assert!(msgs.is_empty(), "{:#?}", codes(&msgs));
    assert_eq!(exit_code(&msgs, Level::Error), 0);
}

#[test]
fn ist0101_referenced_host_not_found() {
    let rs = resources(&format!("{REVIEWS_SVC}{}", vs_to("{host: reviewz}")));
    let msgs = analyze(&rs);
    assert_eq!(msgs.len(), 1, "{:#?}", codes(&msgs));
    let m = &msgs[0];
    assert_eq!((m.code, m.level), ("IST0101", Level::Error));
    assert_eq!(m.resource.to_string(), "VirtualService default/reviews");
    assert_eq!(m.text, "Referenced host not found: \"reviewz\"");
    assert_eq!(m.source.line, 11);
    assert_eq!(exit_code(&msgs, Level::Error), 79);
    assert!(m.to_string().starts_with("Error [IST0101] (VirtualService default/reviews mesh.yaml:11)"));
}

#[test]
fn ist0101_subset_not_defined_in_any_destination_rule() {
    let rs = resources(&format!("{REVIEWS_SVC}{REVIEWS_DR}{}", vs_to("{host: reviews, subset: v2}")));
    let msgs = analyze(&rs);
    assert_eq!(
        codes(&msgs),
        [(
            "IST0101",
            "VirtualService default/reviews Referenced host+subset in destinationrule not found: \"reviews+v2\""
                .to_string()
        )]
    );
}

#[test]
fn ist0101_host_in_service_entry_and_other_namespace_forms_are_found() {
    let rs = resources(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: google
spec:
  hosts: [www.google.com]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: DNS
---
apiVersion: v1
kind: Service
metadata:
  name: httpbin
  namespace: foo
spec:
  ports: [{name: http, port: 8000}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: mixed
spec:
  hosts: [mixed]
  http:
  - match: [{uri: {prefix: /g}}]
    route: [{destination: {host: www.google.com}}]
  - match: [{uri: {prefix: /a}}]
    route: [{destination: {host: httpbin.foo}}]
  - route: [{destination: {host: httpbin.foo.svc.cluster.local}}]
",
    );
    let msgs = analyze(&rs);
    assert!(only(&msgs, "IST0101").is_empty(), "{:#?}", codes(&msgs));
}

#[test]
fn ist0101_gateway_not_found_and_ist0132_host_not_in_gateway() {
    let rs = resources(&format!(
        "{REVIEWS_SVC}apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: gw
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: [\"*.example.com\"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: edge
spec:
  hosts: [shop.example.org]
  gateways: [gw, missing-gw]
  http:
  - route: [{{destination: {{host: reviews}}}}]
"
    ));
    let msgs = analyze(&rs);
    let c = codes(&msgs);
    assert!(
        c.contains(&("IST0101", "VirtualService default/edge Referenced gateway not found: \"missing-gw\"".into())),
        "{c:#?}"
    );
    let m = only(&msgs, "IST0132");
    assert_eq!(m.len(), 1, "{c:#?}");
    assert!(m[0].text.contains("shop.example.org"));
    assert_eq!(m[0].level, Level::Warning);
}

#[test]
fn ist0101_destination_rule_host_with_no_service() {
    let rs = resources(REVIEWS_DR.trim_end_matches("---\n"));
    let msgs = analyze(&rs);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].code, "IST0101");
    assert_eq!(msgs[0].resource.kind, Kind::DestinationRule);
    assert!(msgs[0].text.contains("no Service or ServiceEntry"));
}

#[test]
fn ist0109_virtual_services_conflict_for_the_same_host() {
    let second = vs_to("{host: reviews}").replace("name: reviews\nspec", "name: reviews-b\nspec");
    let rs = resources(&format!("{REVIEWS_SVC}{}---\n{second}", vs_to("{host: reviews}")));
    let msgs = only(&analyze(&rs), "IST0109");
    assert_eq!(msgs.len(), 2, "both VirtualServices are reported");
    assert!(msgs[0]
        .text
        .contains("default/reviews,default/reviews-b associated with mesh gateway define the same host reviews.default.svc.cluster.local"));
}

#[test]
fn ist0112_multi_port_service_needs_a_destination_port() {
    let rs = resources(&format!(
        "apiVersion: v1
kind: Service
metadata:
  name: reviews
spec:
  ports:
  - {{name: http, port: 9080}}
  - {{name: grpc, port: 9090}}
---
{}",
        vs_to("{host: reviews}")
    ));
    let msgs = only(&analyze(&rs), "IST0112");
    assert_eq!(msgs.len(), 1);
    assert!(msgs[0].text.contains("[9080, 9090]"));

    let rs = resources(&format!(
        "apiVersion: v1
kind: Service
metadata:
  name: reviews
spec:
  ports:
  - {{name: http, port: 9080}}
  - {{name: grpc, port: 9090}}
---
{}",
        vs_to("{host: reviews, port: {number: 9080}}")
    ));
    assert!(only(&analyze(&rs), "IST0112").is_empty());
}

#[test]
fn ist0113_strict_mtls_for_a_workload_whose_callers_disable_tls() {
    let rs = resources(&format!(
        "{REVIEWS_SVC}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  trafficPolicy:
    tls: {{mode: DISABLE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls: {{mode: STRICT}}
"
    ));
    let msgs = only(&analyze(&rs), "IST0113");
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].resource.to_string(), "DestinationRule default/reviews");
    assert!(msgs[0].text.contains("istio-system/default"), "{}", msgs[0].text);
    assert!(msgs[0].text.contains("specifies Strict"));

    // A namespace-level PERMISSIVE policy overrides the mesh-wide STRICT one.
    let mut more = rs.clone();
    more.extend(resources(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
spec:
  mtls: {mode: PERMISSIVE}
",
    ));
    assert!(only(&analyze(&more), "IST0113").is_empty());
}

#[test]
fn ist0130_rules_after_a_catch_all_are_unreachable() {
    let rs = resources(&format!(
        "{REVIEWS_SVC}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - route: [{{destination: {{host: reviews}}}}]
  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    route: [{{destination: {{host: reviews}}}}]
"
    ));
    let msgs = only(&analyze(&rs), "IST0130");
    assert_eq!(msgs.len(), 1);
    assert!(msgs[0].text.starts_with("VirtualService rule #1 not used"));
}

#[test]
fn ist0118_port_name_without_protocol() {
    let rs = resources(
        "apiVersion: v1
kind: Service
metadata:
  name: legacy
spec:
  ports:
  - {name: web, port: 80}
  - {name: metrics, port: 9090, appProtocol: http}
  - {name: http-admin, port: 8080}
",
    );
    let msgs = analyze(&rs);
    assert_eq!(msgs.len(), 1, "{:#?}", codes(&msgs));
    assert_eq!((msgs[0].code, msgs[0].level), ("IST0118", Level::Info));
    assert!(msgs[0].text.starts_with("Port name web (port: 80"));
    assert_eq!(exit_code(&msgs, Level::Error), 0);
    assert_eq!(exit_code(&msgs, Level::Info), 79);
}

#[test]
fn ist0127_gateway_and_policy_selectors_matching_nothing() {
    let rs = resources(
        "apiVersion: weft.dev/v1alpha1
kind: LocalWorkload
metadata:
  name: httpbin
  namespace: foo
spec:
  labels: {app: httpbin}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: gw
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ['*']}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: good
  namespace: foo
spec:
  selector: {matchLabels: {app: httpbin}}
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: typo
  namespace: foo
spec:
  selector: {matchLabels: {app: httpbim}}
  rules: [{}]
",
    );
    let msgs = only(&analyze(&rs), "IST0127");
    let who: Vec<String> = msgs.iter().map(|m| m.resource.to_string()).collect();
    assert_eq!(who, ["Gateway default/gw", "AuthorizationPolicy foo/typo"]);
    assert!(msgs[1].text.ends_with("labels: app=httpbim"));

    // A live ingress gateway workload satisfies the Gateway selector.
    let live = [Workload {
        namespace: "istio-system".into(),
        labels: [("istio".to_string(), "ingressgateway".to_string())].into(),
    }];
    let msgs = only(&analyze_with_workloads(&rs, &live), "IST0127");
    assert_eq!(msgs.len(), 1);
}

#[test]
fn ist0111_and_ist0160_several_selectorless_singletons() {
    let rs = resources(
        "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: a}
spec:
  egress: [{hosts: ['./*']}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: b}
spec:
  egress: [{hosts: ['istio-system/*']}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: t1}
spec:
  tracing: [{randomSamplingPercentage: 10}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: t2}
spec:
  tracing: [{randomSamplingPercentage: 20}]
",
    );
    let msgs = analyze(&rs);
    assert_eq!(only(&msgs, "IST0111").len(), 2);
    assert_eq!(only(&msgs, "IST0160").len(), 2);
}

#[test]
fn bookinfo_with_default_rules_analyzes_clean_of_errors() {
    let dir = weft_testkit::conformance_dir();
    let mut rs = Vec::new();
    for f in [
        "bookinfo/platform/kube/bookinfo.yaml",
        "bookinfo/networking/destination-rule-all.yaml",
        "bookinfo/networking/virtual-service-all-v1.yaml",
        "bookinfo/networking/bookinfo-gateway.yaml",
    ] {
        let p = parse_file(&dir.join(f));
        assert!(p.errors.is_empty());
        rs.extend(p.resources);
    }
    let msgs = analyze(&rs);
    let errors: Vec<_> = msgs.iter().filter(|m| m.level == Level::Error).collect();
    assert!(errors.is_empty(), "{errors:#?}");

    // Dropping the DestinationRules makes every subset reference dangle.
    rs.retain(|r| r.kind != Kind::DestinationRule);
    let msgs = only(&analyze(&rs), "IST0101");
    assert_eq!(msgs.len(), 4, "{:#?}", codes(&msgs));
}

#[test]
fn ist0109_ignores_two_versions_of_the_same_virtual_service() {
    let mut rs = resources(&format!("{REVIEWS_SVC}{}", vs_to("{host: reviews}")));
    rs.extend(resources(&vs_to("{host: reviews}")));
    assert!(only(&analyze(&rs), "IST0109").is_empty());
}

#[test]
fn pool_fields_weft_does_not_apply_or_enforce_are_reported_where_they_are_set() {
    let r = resources(&format!(
        "{REVIEWS_SVC}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      http: {{h2UpgradePolicy: UPGRADE, useClientProtocol: true}}
    portLevelSettings:
    - port: {{number: 9080}}
      connectionPool:
        tcp: {{idleTimeout: 30s}}
  subsets:
  - name: v1
    labels: {{version: v1}}
    trafficPolicy:
      connectionPool:
        http: {{maxConcurrentStreams: 10}}
"
    ));
    let msgs = analyze(&r);
    let found = only(&msgs, "WFT0001");
    assert_eq!(found.len(), 1, "{:#?}", codes(&found));
    assert_eq!(found[0].level, Level::Warning);
    assert!(
        found[0].text.starts_with("spec.trafficPolicy.portLevelSettings[0].connectionPool.tcp.idleTimeout"),
        "{}",
        found[0].text
    );
    let streams = only(&msgs, "WFT0005");
    assert_eq!(streams.len(), 1, "{:#?}", codes(&streams));
    assert!(
        streams[0].text.starts_with("spec.subsets[0].trafficPolicy.connectionPool.http.maxConcurrentStreams"),
        "{}",
        streams[0].text
    );
}

#[test]
fn a_bad_retry_budget_annotation_is_an_error_at_its_line() {
    let yaml = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  annotations:
    weft.dev/retry-budget: \"twenty,3\"
spec:
  host: reviews
";
    let out = weft_api::parse_str(yaml, std::path::Path::new("dr.yaml"));
    assert!(out.resources.is_empty());
    let e = &out.errors[0];
    assert_eq!(e.line, 6, "{e}");
    assert!(e.field.ends_with("weft.dev/retry-budget") && e.message.contains("needs a '%'"), "{e}");
    let good = yaml.replace("twenty,3", "25%,5");
    let out = weft_api::parse_str(&good, std::path::Path::new("dr.yaml"));
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let v = &out.resources[0].meta.annotations[weft_api::spec::RETRY_BUDGET_ANNOTATION];
    let b = weft_api::spec::RetryBudget::parse(v).unwrap();
    assert_eq!((b.budget_percent, b.min_retry_concurrency), (25.0, 5));
}

#[test]
fn telemetry_settings_weft_does_not_apply_are_reported_with_their_codes() {
    let rs = resources(
        "apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - providers: [{name: otel}]
    randomSamplingPercentage: 10
    useRequestIdForTraceSampling: false
  accessLogging:
  - disabled: true
  metrics:
  - overrides:
    - match: {metric: REQUEST_COUNT}
      disabled: true
",
    );
    let msgs = analyze(&rs);
    let al = only(&msgs, "WFT0002");
    assert_eq!(al.len(), 1, "{:#?}", codes(&msgs));
    assert_eq!(al[0].level, Level::Error);
    assert!(al[0].text.starts_with("spec.accessLogging[0] is not applied"), "{}", al[0].text);
    let m = only(&msgs, "WFT0003");
    assert_eq!(m.len(), 1, "{:#?}", codes(&msgs));
    assert_eq!(m[0].level, Level::Error);
    let t = only(&msgs, "WFT0004");
    assert_eq!(t.len(), 1, "{:#?}", codes(&msgs));
    assert!(t[0].text.starts_with("spec.tracing[0].useRequestIdForTraceSampling"), "{}", t[0].text);
    assert_eq!(exit_code(&msgs, Level::Error), weft_api::analyze::EXIT_ISSUES_FOUND);
}

#[test]
fn applied_tracing_settings_analyze_clean() {
    let rs = resources(
        "apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - providers: [{name: otel}]
    randomSamplingPercentage: 10
    disableSpanReporting: false
    match: {mode: CLIENT_AND_SERVER}
    customTags:
      team: {literal: {value: books}}
      user: {header: {name: end-user, defaultValue: anonymous}}
      host: {environment: {name: HOSTNAME}}
",
    );
    let msgs = analyze(&rs);
    assert!(msgs.is_empty(), "{:#?}", codes(&msgs));
}

#[test]
fn wft0020_names_istio_and_gateway_api_kinds_weft_skips_but_not_plain_kubernetes_ones() {
    let text = "apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: auth, namespace: shop}
spec: {url: oci://example/auth:1}
---
apiVersion: gateway.networking.x-k8s.io/v1alpha1
kind: XListenerSet
metadata: {name: web}
spec: {}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web}
spec: {}
";
    let p = parse_str(text, Path::new("kinds.yaml"));
    assert!(p.errors.is_empty(), "{p:#?}");
    // The Gateway API's standard kinds are applied now (docs/resources.md).
    assert_eq!(p.resources.iter().map(|r| r.kind).collect::<Vec<_>>(), [weft_api::Kind::HttpRoute]);
    let found: Vec<String> = weft_api::analyze::unapplied_kinds(&p.skipped).iter().map(|m| m.to_string()).collect();
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(
        found[0].starts_with("Warning [WFT0020] (WasmPlugin shop/auth kinds.yaml:1) kind WasmPlugin"),
        "{found:#?}"
    );
    assert!(
        found[1].starts_with("Warning [WFT0020] (XListenerSet default/web kinds.yaml:6) kind XListenerSet"),
        "{found:#?}"
    );
}
