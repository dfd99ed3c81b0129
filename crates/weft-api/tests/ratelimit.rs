//! Local rate limiting in the API: Istio's EnvoyFilter form (the task's files parse;
//! wrong rate limit values are errors with file, line and field; patches weft does not
//! apply are reported as WFT0010) and weft's `RateLimit`.

use std::path::Path;

use weft_api::analyze::{analyze, Level};
use weft_api::spec::ratelimit::{Operation, PatchContext, RateLimitPatch};
use weft_api::{parse_str, Spec};

fn task(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../samples/tasks/policy-enforcement").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn istios_local_rate_limit_task_files_parse_into_the_patches_weft_applies() {
    let p = parse_str(&task("local-rate-limit.yaml"), Path::new("a.yaml"));
    assert!(p.errors.is_empty(), "{:#?}", p.errors);
    let Spec::EnvoyFilter(ef) = &p.resources[0].spec else { panic!("not an EnvoyFilter") };
    let patches = ef.rate_limit_patches();
    let Ok(Some(RateLimitPatch::Filter { context, operation, name, config, .. })) = &patches[0] else {
        panic!("{patches:?}")
    };
    assert_eq!(
        (*context, *operation, name.as_str()),
        (PatchContext::SidecarInbound, Operation::InsertBefore, "envoy.filters.http.local_ratelimit")
    );
    let tb = config.token_bucket.as_ref().unwrap();
    assert_eq!((tb.max_tokens, tb.tokens_per_fill, tb.fill_interval.0.as_secs()), (4, Some(4), 60));
    assert_eq!(config.response_headers_to_add[0].header.key, "x-local-rate-limit");
    assert!(analyze(&p.resources).iter().all(|m| m.code != "WFT0010"), "everything in the task is applied");

    let p = parse_str(&task("local-rate-limit-route.yaml"), Path::new("b.yaml"));
    assert!(p.errors.is_empty(), "{:#?}", p.errors);
    let Spec::EnvoyFilter(ef) = &p.resources[0].spec else { panic!("not an EnvoyFilter") };
    let patches = ef.rate_limit_patches();
    let Ok(Some(RateLimitPatch::PerRoute { route_configuration, configs, .. })) = &patches[1] else {
        panic!("{patches:?}")
    };
    assert_eq!(route_configuration.vhost.as_ref().unwrap().name.as_deref(), Some("inbound|http|9080"));
    assert_eq!(configs["envoy.filters.http.local_ratelimit"].token_bucket.as_ref().unwrap().max_tokens, 4);
    assert!(analyze(&p.resources).iter().all(|m| m.code != "WFT0010"));
}

#[test]
fn a_wrong_token_bucket_in_an_envoy_filter_is_an_error_with_its_line_and_field() {
    let text = task("local-rate-limit.yaml").replace("fill_interval: 60s", "fill_interval: 10ms");
    let p = parse_str(&text, Path::new("a.yaml"));
    assert!(p.resources.is_empty());
    let e = &p.errors[0];
    assert_eq!(e.field, "spec.configPatches[0].patch.value.typed_config.value.token_bucket.fill_interval", "{e}");
    assert!(e.message.contains("at least 50ms"), "{e}");
    assert_eq!(e.line, 30, "{e}");
    let text = task("local-rate-limit.yaml").replace("max_tokens: 4", "max_tokns: 4");
    let e = &parse_str(&text, Path::new("a.yaml")).errors[0];
    assert!(
        e.field.ends_with("typed_config.value.token_bucket.max_tokns") && e.message.contains("unknown field"),
        "{e}"
    );
}

#[test]
fn envoy_filter_patches_weft_does_not_apply_are_reported_as_wft0010_with_their_path() {
    let text = "apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: lua, namespace: default}
spec:
  workloadSelector: {labels: {app: reviews}}
  configPatches:
  - applyTo: HTTP_FILTER
    match:
      context: SIDECAR_INBOUND
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.lua
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
          inlineCode: 'function envoy_on_request(h) end'
  - applyTo: CLUSTER
    patch:
      operation: MERGE
      value: {connect_timeout: 1s}
";
    let p = parse_str(text, Path::new("ef.yaml"));
    assert!(p.errors.is_empty(), "a valid EnvoyFilter is accepted: {:#?}", p.errors);
    let msgs: Vec<_> = analyze(&p.resources).into_iter().filter(|m| m.code == "WFT0010").collect();
    assert_eq!(msgs.len(), 2, "{msgs:#?}");
    assert!(msgs.iter().all(|m| m.level == Level::Error));
    assert!(msgs[0].text.starts_with("spec.configPatches[0].patch.value is not applied by weft"), "{}", msgs[0].text);
    assert!(msgs[1].text.starts_with("spec.configPatches[1].applyTo is not applied by weft"), "{}", msgs[1].text);
}

#[test]
fn rate_limit_resources_are_validated_with_file_line_and_field() {
    let ok = "apiVersion: weft.dev/v1alpha1
kind: RateLimit
metadata: {name: productpage, namespace: default}
spec:
  selector: {matchLabels: {app: productpage}}
  requestsPerUnit: 4
  unit: minute
";
    let p = parse_str(ok, Path::new("rl.yaml"));
    assert!(p.errors.is_empty(), "{:#?}", p.errors);
    let bad = "apiVersion: weft.dev/v1alpha1
kind: RateLimit
metadata: {name: productpage}
spec:
  requestsPerUnit: 4
  unit: fortnight
";
    let e = &parse_str(bad, Path::new("rl.yaml")).errors[0];
    assert_eq!((e.field.as_str(), e.line), ("spec.unit", 6), "{e}");
    let bad = "apiVersion: weft.dev/v1alpha1
kind: RateLimit
metadata: {name: productpage}
spec:
  tokenBucket: {maxTokens: 0, fillInterval: 1s}
  match:
  - pathPrefix: api
";
    let errs = parse_str(bad, Path::new("rl.yaml")).errors;
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["spec.tokenBucket.maxTokens", "spec.match[0].pathPrefix"], "{errs:#?}");
}
