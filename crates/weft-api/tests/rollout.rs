//! weft's `Rollout` in the API: the samples parse into steps and an analysis; wrong
//! values are errors with file, line and field; `analyze` reports a VirtualService the
//! rollout does not own (WFT0030) and missing subsets (WFT0031).

#![allow(clippy::unwrap_used)]

use std::path::Path;

use weft_api::analyze::analyze;
use weft_api::spec::rollout::StepTraffic;
use weft_api::{parse_str, Spec};

fn sample(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../samples/rollouts").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn bookinfo_dr() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../samples/bookinfo/networking/destination-rule-all.yaml");
    std::fs::read_to_string(&p).unwrap()
}

#[test]
fn the_samples_parse_into_steps_and_an_analysis() {
    let p = parse_str(&sample("reviews-rollout.yaml"), Path::new("r.yaml"));
    assert!(p.errors.is_empty(), "{:#?}", p.errors);
    let Spec::Rollout(r) = &p.resources[0].spec else { panic!("not a Rollout") };
    assert_eq!((r.host.as_str(), r.stable.subset.as_str(), r.canary.subset.as_str()), ("reviews", "v1", "v3"));
    let weights: Vec<StepTraffic> = r.steps.iter().map(|s| s.traffic()).collect();
    assert_eq!(
        weights,
        vec![StepTraffic::Weight(5), StepTraffic::Weight(20), StepTraffic::Weight(50), StepTraffic::Weight(100)]
    );
    assert_eq!(r.steps[0].pause.unwrap().0.as_secs(), 30);
    assert_eq!(r.analysis.interval.0.as_secs(), 10);
    assert_eq!((r.analysis.failure_threshold(), r.analysis.min_requests()), (2, 10));
    assert_eq!(r.analysis.success_rate.unwrap().min, Some(99.0));
    assert_eq!(r.analysis.latency_p99.unwrap().max, Some(500.0));

    let p = parse_str(&sample("reviews-rollout-ab.yaml"), Path::new("ab.yaml"));
    assert!(p.errors.is_empty(), "{:#?}", p.errors);
    let Spec::Rollout(r) = &p.resources[0].spec else { panic!("not a Rollout") };
    assert_eq!(r.steps[0].traffic(), StepTraffic::Mirror(100.0));
    let StepTraffic::Match(m) = r.steps[1].traffic() else { panic!("{:?}", r.steps[1]) };
    assert!(m[0].headers.contains_key("end-user"));
}

#[test]
fn wrong_values_are_errors_with_line_and_field() {
    let cases = [
        ("  - weight: 20\n", "  - weight: 120\n", "spec.steps[1].weight", "out of range"),
        ("  - weight: 50\n", "  - weight: 50\n    mirror: 10\n", "spec.steps[2].mirror", "cannot be used together"),
        ("    interval: 10s\n", "    interval: 100ms\n", "spec.analysis.interval", "too short"),
        ("      min: 99\n", "      min: 199\n", "spec.analysis.successRate.min", "out of range"),
        ("    subset: v3\n", "    subset: v1\n", "spec.canary.subset", "is the stable subset"),
        ("    failureThreshold: 2\n", "    failureTreshold: 2\n", "spec.analysis.failureTreshold", "unknown field"),
        ("      max: 500\n", "      min: 500\n", "spec.analysis.latencyP99.min", "not a bound"),
        (
            "    minRequests: 10\n",
            "    minRequests: 10\n    maxFailedRequests: 0\n",
            "spec.analysis.maxFailedRequests",
            "at least 1",
        ),
    ];
    let text = sample("reviews-rollout.yaml");
    for (from, to, field, message) in cases {
        assert!(text.contains(from), "{from:?}");
        let p = parse_str(&text.replacen(from, to, 1), Path::new("r.yaml"));
        assert!(p.resources.is_empty(), "{to:?} accepted");
        let e = p.errors.iter().find(|e| e.field == field).unwrap_or_else(|| panic!("{field}: {:#?}", p.errors));
        assert!(e.message.contains(message), "{e}");
        assert!(e.line > 0 && e.to_string().starts_with("r.yaml:"), "{e}");
        assert_eq!(e.resource.as_deref(), Some("Rollout default/reviews"), "{e}");
    }
    // The line is the field's own.
    let p = parse_str(&text.replacen("  - weight: 20\n", "  - weight: 120\n", 1), Path::new("r.yaml"));
    let line = text.lines().position(|l| l == "  - weight: 20").unwrap() + 1;
    assert_eq!(p.errors[0].line, line, "{}", p.errors[0]);
}

#[test]
fn a_rollout_without_bounds_or_steps_is_refused() {
    let text = "apiVersion: weft.dev/v1alpha1\nkind: Rollout\nmetadata:\n  name: r\nspec:\n  host: reviews\n  stable: {subset: v1}\n  canary: {subset: v2}\n  steps: []\n  analysis:\n    interval: 5s\n";
    let p = parse_str(text, Path::new("r.yaml"));
    let fields: Vec<&str> = p.errors.iter().map(|e| e.field.as_str()).collect();
    assert!(fields.contains(&"spec.steps") && fields.contains(&"spec.analysis"), "{:#?}", p.errors);
}

#[test]
fn analyze_reports_a_virtual_service_the_rollout_does_not_own_and_missing_subsets() {
    let user_vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v1}\n";
    let owned_vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews-rollout\n  labels: {weft.dev/rollout: reviews}\n  annotations: {weft.dev/managed-by: rollout}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v1}\n";
    let ro = sample("reviews-rollout.yaml");
    let all = format!("{ro}\n---\n{}\n---\n{owned_vs}", bookinfo_dr());
    let p = parse_str(&all, Path::new("a.yaml"));
    assert!(p.errors.is_empty(), "{:#?}", p.errors);
    let codes: Vec<&str> = analyze(&p.resources).iter().map(|m| m.code).collect();
    assert!(!codes.contains(&"WFT0030") && !codes.contains(&"WFT0031"), "{codes:?}");

    let p = parse_str(&format!("{ro}\n---\n{}\n---\n{user_vs}", bookinfo_dr()), Path::new("a.yaml"));
    let m = analyze(&p.resources);
    let m = m.iter().find(|m| m.code == "WFT0030").unwrap_or_else(|| panic!("{m:#?}"));
    assert!(m.text.contains("VirtualService default/reviews"), "{m}");

    let p = parse_str(&ro.replace("subset: v3", "subset: v9"), Path::new("a.yaml"));
    let m = analyze(&p.resources);
    assert!(m.iter().any(|m| m.code == "WFT0031" && m.text.contains("\"v9\"")), "{m:#?}");
}
