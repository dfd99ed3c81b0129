//! Each kind of mistake yields an error naming the file, exact line, field path and a hint.

use std::path::Path;

use weft_api::{parse_str, ApiError, Kind, Parsed};

fn parse(text: &str) -> Parsed {
    parse_str(text, Path::new("mistake.yaml"))
}

/// Parses `text`, expects exactly one error and returns it.
fn one_error(text: &str) -> ApiError {
    let p = parse(text);
    assert_eq!(p.errors.len(), 1, "{:#?}", p.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>());
    assert!(p.resources.is_empty(), "a resource with an error must not be returned");
    let e = p.errors.into_iter().next().expect("one error");
    assert_eq!(e.file, Path::new("mistake.yaml"));
    e
}

fn hint(e: &ApiError) -> &str {
    e.hint.as_deref().unwrap_or("")
}

const VS_HEAD: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
";

#[test]
fn unknown_field_suggests_the_nearest_valid_field() {
    let e = one_error(&format!(
        "{VS_HEAD}  http:
  - route:
    - destination:
        host: reviews
      wieght: 100
"
    ));
    assert_eq!(e.line, 12);
    assert_eq!(e.column, 7);
    assert_eq!(e.field, "spec.http[0].route[0].wieght");
    assert_eq!(e.resource.as_deref(), Some("VirtualService default/reviews"));
    assert_eq!(hint(&e), "did you mean `weight`?");
    assert_eq!(
        e.to_string(),
        "mistake.yaml:12:7: VirtualService default/reviews: spec.http[0].route[0].wieght: unknown field `wieght` (did you mean `weight`?)"
    );
}

#[test]
fn wrong_type_names_the_expected_type() {
    let e = one_error(&format!(
        "{VS_HEAD}  http:
  - route:
    - destination:
        host: reviews
      weight: heavy
"
    ));
    assert_eq!(e.line, 12);
    assert_eq!(e.field, "spec.http[0].route[0].weight");
    assert!(e.message.contains("string \"heavy\""), "{e}");
    assert_eq!(hint(&e), "expected an integer");
}

#[test]
fn bad_enum_value_lists_the_valid_ones() {
    let e = one_error(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUEL
",
    );
    assert_eq!(e.line, 9);
    assert_eq!(e.field, "spec.trafficPolicy.tls.mode");
    assert_eq!(e.message, "unknown value `ISTIO_MUTUEL`");
    assert!(hint(&e).starts_with("did you mean `ISTIO_MUTUAL`?"), "{e}");
    assert!(hint(&e).contains("`DISABLE`, `SIMPLE`, `MUTUAL`, `ISTIO_MUTUAL`"), "{e}");
}

#[test]
fn h2_upgrade_policy_must_be_a_known_policy() {
    let e = one_error(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      http:
        h2UpgradePolicy: UPGRAD
",
    );
    assert_eq!(e.line, 10);
    assert_eq!(e.field, "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy");
    assert_eq!(e.message, "unknown value `UPGRAD`");
    assert!(hint(&e).starts_with("did you mean `UPGRADE`?"), "{e}");
}

#[test]
fn peer_authentication_mode_must_be_a_known_mode() {
    let e = one_error(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: foo
spec:
  mtls:
    mode: STRICTER
",
    );
    assert_eq!(e.line, 8);
    assert_eq!(e.field, "spec.mtls.mode");
    assert!(hint(&e).contains("`UNSET`, `DISABLE`, `PERMISSIVE`, `STRICT`"), "{e}");
}

#[test]
fn weights_not_summing_to_100_are_rejected() {
    let e = one_error(&format!(
        "{VS_HEAD}  http:
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 80
    - destination:
        host: reviews
        subset: v2
      weight: 30
"
    ));
    assert_eq!((e.line, e.column), (9, 5));
    assert_eq!(e.field, "spec.http[0].route");
    assert_eq!(e.message, "weights sum to 110");
    assert!(hint(&e).contains("sum to 100"));
}

#[test]
fn bad_duration_says_what_a_duration_looks_like() {
    let e = one_error(&format!(
        "{VS_HEAD}  http:
  - route:
    - destination:
        host: reviews
    timeout: 10 seconds
"
    ));
    assert_eq!(e.line, 12);
    assert_eq!(e.field, "spec.http[0].timeout");
    assert!(e.message.contains("\"10 seconds\""), "{e}");
    assert!(e.message.contains("e.g. \"1.5s\""), "{e}");
}

#[test]
fn bad_regex_is_reported_at_the_match() {
    let e = one_error(&format!(
        "{VS_HEAD}  http:
  - match:
    - uri:
        regex: /api/(v1
    route:
    - destination:
        host: reviews
"
    ));
    assert_eq!(e.line, 11);
    assert_eq!(e.field, "spec.http[0].match[0].uri.regex");
    assert!(e.message.starts_with("invalid regular expression `/api/(v1`"), "{e}");
    assert_eq!(hint(&e), "expected RE2 syntax");
}

#[test]
fn missing_destination_host_is_reported() {
    let e = one_error(&format!(
        "{VS_HEAD}  http:
  - route:
    - destination:
        subset: v1
"
    ));
    assert_eq!(e.line, 10);
    assert_eq!(e.field, "spec.http[0].route[0].destination.host");
    assert_eq!(e.message, "missing required field `host`");
    assert_eq!(hint(&e), "add `host`");
}

#[test]
fn port_out_of_range_is_reported() {
    let e = one_error(
        "apiVersion: v1
kind: Service
metadata:
  name: reviews
spec:
  selector:
    app: reviews
  ports:
  - name: http
    port: 90800
",
    );
    assert_eq!(e.line, 10);
    assert_eq!(e.field, "spec.ports[0].port");
    assert_eq!(e.message, "port 90800 is out of range");
    assert_eq!(hint(&e), "expected 1..=65535");
}

#[test]
fn invalid_yaml_reports_the_parser_line() {
    let p = parse(&format!(
        "{VS_HEAD}  http:
  - route:
    - destination:
        host: reviews
       weight: 100
"
    ));
    assert_eq!(p.errors.len(), 1, "{:?}", p.errors);
    let e = &p.errors[0];
    assert!(e.message.starts_with("invalid YAML"), "{e}");
    assert_eq!(e.line, 12, "{e}");
    assert!(hint(e).contains("YAML syntax"));
}

#[test]
fn unknown_api_version_for_a_known_kind_names_supported_versions() {
    let e = one_error(
        "apiVersion: networking.istio.io/v2
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - route:
    - destination:
        host: reviews
",
    );
    assert_eq!(e.line, 1);
    assert_eq!(e.field, "apiVersion");
    assert_eq!(e.message, "unsupported apiVersion `networking.istio.io/v2` for VirtualService");
    assert_eq!(
        hint(&e),
        "supported: networking.istio.io/v1, networking.istio.io/v1beta1, networking.istio.io/v1alpha3"
    );
}

#[test]
fn unknown_kind_in_an_istio_group_suggests_a_kind() {
    let e = one_error(
        "apiVersion: networking.istio.io/v1
kind: VirtualServce
metadata:
  name: reviews
spec: {}
",
    );
    assert_eq!(e.line, 2);
    assert_eq!(e.field, "kind");
    assert_eq!(hint(&e), "did you mean `VirtualService`?");
}

#[test]
fn route_with_no_destination_is_rejected() {
    let e = one_error(&format!(
        "{VS_HEAD}  http:
  - match:
    - uri:
        prefix: /
    timeout: 1s
"
    ));
    assert_eq!(e.line, 9);
    assert_eq!(e.field, "spec.http[0].route");
    assert_eq!(e.message, "HTTP route has no destination");
    assert!(hint(&e).contains("`redirect`"));
}

#[test]
fn route_and_redirect_together_are_rejected() {
    let e = one_error(&format!(
        "{VS_HEAD}  http:
  - route:
    - destination:
        host: reviews
    redirect:
      uri: /v2
"
    ));
    assert_eq!(e.line, 12);
    assert_eq!(e.field, "spec.http[0].redirect");
    assert_eq!(e.message, "`route` and `redirect` cannot be used together");
}

#[test]
fn deny_policy_without_rules_is_rejected() {
    let e = one_error(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-nothing
  namespace: foo
spec:
  action: DENY
",
    );
    assert_eq!(e.line, 6);
    assert_eq!(e.field, "spec.rules");
    assert_eq!(e.resource.as_deref(), Some("AuthorizationPolicy foo/deny-nothing"));
    assert!(e.message.contains("DENY policy has no rules"), "{e}");
    assert!(hint(&e).contains("add rules"));
}

#[test]
fn duplicate_resource_in_one_file_is_rejected_and_the_first_kept() {
    let doc = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
";
    let p = parse(&format!("{doc}---\n{doc}"));
    assert_eq!(p.resources.len(), 1);
    assert_eq!(p.resources[0].source.line, 1);
    assert_eq!(p.errors.len(), 1);
    let e = &p.errors[0];
    assert_eq!(e.line, 8);
    assert_eq!(e.field, "metadata.name");
    assert_eq!(e.message, "duplicate resource DestinationRule default/reviews");
    assert_eq!(hint(e), "first defined at mistake.yaml:1; rename one or remove it");
}

#[test]
fn bad_subset_name_and_percentage_out_of_range() {
    let p = parse(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - name: V1_old
    labels:
      version: v1
",
    );
    assert_eq!(p.errors.len(), 1);
    assert_eq!(p.errors[0].line, 8);
    assert_eq!(p.errors[0].field, "spec.subsets[0].name");
    assert!(hint(&p.errors[0]).contains("lowercase"));

    let e = one_error(&format!(
        "{VS_HEAD}  http:
  - fault:
      abort:
        httpStatus: 503
        percentage:
          value: 150
    route:
    - destination:
        host: reviews
"
    ));
    assert_eq!(e.line, 13);
    assert_eq!(e.field, "spec.http[0].fault.abort.percentage.value");
    assert_eq!(hint(&e), "expected 0..=100");
}

#[test]
fn unknown_metadata_and_top_level_fields_suggest_names() {
    let e = one_error(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namepsace: prod
spec:
  host: reviews
",
    );
    assert_eq!(e.line, 5);
    assert_eq!(e.field, "metadata.namepsace");
    assert_eq!(hint(&e), "did you mean `namespace`?");

    let p = parse(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
sepc:
  host: reviews
",
    );
    // The misspelt key is reported, and so is what its absence means for `spec`.
    assert!(p.resources.is_empty());
    assert_eq!(p.errors.len(), 2, "{:?}", p.errors);
    assert_eq!(p.errors[0].line, 5);
    assert_eq!(p.errors[0].field, "sepc");
    assert_eq!(hint(&p.errors[0]), "did you mean `spec`?");
    assert_eq!(p.errors[1].field, "spec.host");
    assert_eq!(p.errors[1].message, "missing required field `host`");
}

#[test]
fn good_resources_of_a_file_with_one_bad_resource_are_returned() {
    let text = "apiVersion: v1
kind: Service
metadata:
  name: reviews
spec:
  selector: {app: reviews}
  ports:
  - name: http
    port: 9080
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - name: v1
    lables: {version: v1}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: reviews-v1
spec:
  anything: goes
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
";
    let p = parse(text);
    assert_eq!(p.errors.len(), 1, "{:?}", p.errors);
    assert_eq!(p.errors[0].line, 19);
    assert_eq!(p.errors[0].field, "spec.subsets[0].lables");
    assert_eq!(hint(&p.errors[0]), "did you mean `labels`?");
    let kinds: Vec<Kind> = p.resources.iter().map(|r| r.kind).collect();
    assert_eq!(kinds, [Kind::Service, Kind::VirtualService]);
    assert_eq!(p.resources[1].source.line, 28);
    assert_eq!(p.skipped.len(), 1);
    assert_eq!(
        (p.skipped[0].kind.as_str(), p.skipped[0].name.as_str(), p.skipped[0].line),
        ("Deployment", "reviews-v1", 21)
    );
}

#[test]
fn json_list_input_is_accepted_with_lines() {
    let text = r#"{
  "apiVersion": "v1",
  "kind": "List",
  "items": [
    {
      "apiVersion": "networking.istio.io/v1beta1",
      "kind": "DestinationRule",
      "metadata": {"name": "ratings", "namespace": "prod"},
      "spec": {"host": "ratings"}
    },
    {
      "apiVersion": "networking.istio.io/v1beta1",
      "kind": "DestinationRule",
      "metadata": {"name": "details"},
      "spec": {"hots": "details"}
    }
  ]
}"#;
    let p = parse(text);
    assert_eq!(p.resources.len(), 1, "{:?}", p.errors);
    assert_eq!(p.resources[0].meta.namespace, "prod");
    assert_eq!(p.resources[0].source.line, 5);
    assert_eq!(p.errors.len(), 1);
    assert_eq!(p.errors[0].line, 15);
    assert_eq!(p.errors[0].field, "spec.hots");
    assert_eq!(hint(&p.errors[0]), "did you mean `host`?");
}

#[test]
fn local_workload_is_parsed_and_read_errors_have_line_zero() {
    let p = parse(
        "apiVersion: weft.dev/v1alpha1
kind: LocalWorkload
metadata:
  name: reviews-v1
spec:
  labels: {app: reviews, version: v1}
  serviceAccount: bookinfo-reviews
  command: [python3, -m, http.server, \"9080\"]
  env: {PORT: \"9080\"}
  ports:
  - name: http
    port: 9080
    protocol: HTTP
",
    );
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let weft_api::Spec::LocalWorkload(lw) = &p.resources[0].spec else { panic!("not a LocalWorkload") };
    assert_eq!(lw.command.len(), 4);
    assert_eq!(lw.ports[0].port, 9080);

    let missing = weft_api::parse_file(Path::new("/nonexistent/weft.yaml"));
    assert_eq!(missing.errors.len(), 1);
    assert_eq!(missing.errors[0].line, 0);
    assert!(missing.errors[0].message.starts_with("cannot read file"));
}

#[test]
fn typo_in_a_string_match_key_suggests_the_match_kind() {
    let e = one_error(&format!(
        "{VS_HEAD}  http:
  - match:
    - uri:
        prefx: /api
    route:
    - destination:
        host: reviews
"
    ));
    assert_eq!(e.line, 11);
    assert_eq!(e.field, "spec.http[0].match[0].uri.prefx");
    assert_eq!(e.message, "unknown field `prefx`");
    assert_eq!(hint(&e), "did you mean `prefix`?");

    let e = one_error(&format!(
        "{VS_HEAD}  http:
  - match:
    - uri: /api
    route:
    - destination:
        host: reviews
"
    ));
    assert_eq!(e.line, 10);
    assert_eq!(e.field, "spec.http[0].match[0].uri");
    assert_eq!(hint(&e), "expected a mapping with exactly one of `exact`, `prefix`, `regex`");
}

#[test]
fn namespace_defaults_to_the_one_given_like_kubectl_n() {
    let text = "apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default
spec:
  mtls:
    mode: STRICT
";
    let p = weft_api::parse_str_in(text, Path::new("pa.yaml"), "foo");
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert_eq!(p.resources[0].meta.namespace, "foo");
    assert_eq!(parse(text).resources[0].meta.namespace, "default");
}

const TELEMETRY_HEAD: &str = "apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata:
  name: mesh-default
  namespace: istio-system
spec:
";

#[test]
fn telemetry_sampling_out_of_range_names_its_line_and_field() {
    let e = one_error(&format!(
        "{TELEMETRY_HEAD}  tracing:
  - providers: [{{name: otel}}]
    randomSamplingPercentage: 101
"
    ));
    assert_eq!(e.line, 9);
    assert_eq!(e.field, "spec.tracing[0].randomSamplingPercentage");
    assert!(e.to_string().contains("percentage 101 is out of range"), "{e}");
    assert_eq!(hint(&e), "expected 0..=100");
}

#[test]
fn telemetry_custom_tag_needs_exactly_one_source() {
    let e = one_error(&format!(
        "{TELEMETRY_HEAD}  tracing:
  - customTags:
      team:
        literal: {{value: books}}
        header: {{name: x-team}}
"
    ));
    assert_eq!(e.field, "spec.tracing[0].customTags.team");
    assert_eq!(e.line, 9);
    assert!(e.to_string().contains("exactly one of literal, environment or header"), "{e}");
}

#[test]
fn telemetry_unknown_tracing_field_and_mode_are_precise() {
    let e = one_error(&format!(
        "{TELEMETRY_HEAD}  tracing:
  - randomSamplingPercent: 10
"
    ));
    assert_eq!(e.field, "spec.tracing[0].randomSamplingPercent");
    assert_eq!(hint(&e), "did you mean `randomSamplingPercentage`?");
    let e = one_error(&format!(
        "{TELEMETRY_HEAD}  tracing:
  - match: {{mode: CLIENTS}}
"
    ));
    assert_eq!(e.field, "spec.tracing[0].match.mode");
    assert!(hint(&e).contains("CLIENT"), "{e}");
}

#[test]
fn telemetry_rejects_two_providers_and_bad_tag_overrides() {
    let e = one_error(&format!(
        "{TELEMETRY_HEAD}  tracing:
  - providers: [{{name: a}}, {{name: b}}]
"
    ));
    assert_eq!(e.field, "spec.tracing[0].providers");
    assert!(hint(&e).contains("single provider"), "{e}");
    let e = one_error(&format!(
        "{TELEMETRY_HEAD}  metrics:
  - overrides:
    - match: {{metric: REQUEST_COUNT}}
      tagOverrides:
        request_protocol: {{operation: REMOVE, value: x}}
"
    ));
    assert_eq!(e.field, "spec.metrics[0].overrides[0].tagOverrides.request_protocol.value");
    assert!(e.to_string().contains("REMOVE takes no value"), "{e}");
}
