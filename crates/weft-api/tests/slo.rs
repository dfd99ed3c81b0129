//! `ServiceLevelObjective` (weft.dev/v1alpha1): accepted as documented (docs/slo.md);
//! wrong values are errors with file, line and field, never accepted and ignored.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use weft_api::spec::slo::Sli;
use weft_api::{parse_str, Kind, Spec};

fn slo(spec: &str) -> String {
    format!("apiVersion: weft.dev/v1alpha1\nkind: ServiceLevelObjective\nmetadata: {{name: s, namespace: default}}\nspec:\n{spec}")
}

fn errors(spec: &str) -> Vec<(String, usize, String)> {
    parse_str(&slo(spec), Path::new("slo.yaml"))
        .errors
        .into_iter()
        .map(|e| (e.field.clone(), e.line, e.to_string()))
        .collect()
}

#[test]
fn the_sample_slos_parse_with_their_sli_target_and_window() {
    let text = std::fs::read_to_string(weft_testkit::conformance_dir().join("slo/bookinfo-slos.yaml")).unwrap();
    let p = parse_str(&text, Path::new("bookinfo-slos.yaml"));
    assert!(p.errors.is_empty(), "{:#?}", p.errors);
    let slos: Vec<_> = p
        .resources
        .iter()
        .map(|r| match &r.spec {
            Spec::ServiceLevelObjective(o) => (r.meta.name.clone(), o.clone()),
            other => panic!("not an SLO: {other:?}"),
        })
        .collect();
    assert_eq!(slos.len(), 2);
    let (name, avail) = &slos[0];
    assert_eq!(name, "ratings-availability");
    assert_eq!((avail.service.as_str(), avail.sli(), avail.target_ratio()), ("ratings", Sli::SuccessRate, 0.999));
    assert_eq!(avail.window_duration(), Duration::from_secs(28 * 86400));
    let (_, lat) = &slos[1];
    assert_eq!((lat.subset.as_deref(), lat.sli()), (Some("v3"), Sli::Latency(250.0)));
    assert_eq!(Kind::parse("slo"), Some(Kind::ServiceLevelObjective));
    assert_eq!(Kind::parse("serviceLevelObjectives"), Some(Kind::ServiceLevelObjective));
}

#[test]
fn wrong_slo_fields_are_errors_with_their_line_and_field() {
    // Line 5 is the first line of the spec.
    let e = errors("  service: ratings\n  sli: {successRate: {}}\n  target: 100\n  window: 28d\n");
    assert_eq!((e[0].0.as_str(), e[0].1), ("spec.target", 7), "{e:?}");
    let e = errors("  service: ratings\n  sli: {successRate: {}}\n  target: 0.999\n  window: 28d\n");
    assert!(e[0].2.contains("for 99.9% write 99.9"), "{e:?}");
    let e = errors("  service: ratings\n  sli: {successRate: {}}\n  target: 99\n  window: 28 days\n");
    assert_eq!((e[0].0.as_str(), e[0].1), ("spec.window", 8), "{e:?}");
    let e = errors("  service: ratings\n  sli: {successRate: {}}\n  target: 99\n  window: 5m\n");
    assert_eq!(e[0].0, "spec.window", "{e:?}");
    let e = errors("  service: ratings\n  sli:\n    latency: {thresholdMs: 300}\n  target: 99\n  window: 28d\n");
    assert_eq!((e[0].0.as_str(), e[0].1), ("spec.sli.latency.thresholdMs", 7), "{e:?}");
    let e = errors("  service: ratings\n  sli: {}\n  target: 99\n  window: 28d\n");
    assert_eq!(e[0].0, "spec.sli", "{e:?}");
    let e = errors(
        "  service: ratings\n  sli: {successRate: {}, latency: {thresholdMs: 250}}\n  target: 99\n  window: 28d\n",
    );
    assert_eq!(e[0].0, "spec.sli", "{e:?}");
    let e = errors("  service: '*.example.com'\n  sli: {successRate: {}}\n  target: 99\n  window: 28d\n");
    assert_eq!((e[0].0.as_str(), e[0].1), ("spec.service", 5), "{e:?}");
    let e = errors("  service: ratings\n  subset: V_1\n  sli: {successRate: {}}\n  target: 99\n  window: 28d\n");
    assert_eq!((e[0].0.as_str(), e[0].1), ("spec.subset", 6), "{e:?}");
    let e = errors(
        "  service: ratings\n  sli: {successRate: {}}\n  target: 99\n  window: 28d\n  alert: {webhook: 'https://x/'}\n",
    );
    assert_eq!(e[0].0, "spec.alert.webhook", "{e:?}");
    let e = errors("  service: ratings\n  reporter: client\n  sli: {successRate: {}}\n  target: 99\n  window: 28d\n");
    assert_eq!((e[0].0.as_str(), e[0].1), ("spec.reporter", 6), "{e:?}");
    let e = errors("  service: ratings\n  sli: {successRate: {}}\n  target: 99\n  window: 28d\n  targt: 1\n");
    assert_eq!(e[0].0, "spec.targt", "{e:?}");
}

#[test]
fn a_route_is_refused_rather_than_ignored() {
    let e = errors("  service: ratings\n  route: default\n  sli: {successRate: {}}\n  target: 99\n  window: 28d\n");
    assert_eq!((e[0].0.as_str(), e[0].1), ("spec.route", 6), "{e:?}");
    assert!(e[0].2.contains("no route label"), "{e:?}");
}

#[test]
fn analyze_reports_an_slo_whose_service_or_subset_nothing_defines() {
    let text = "apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: weft.dev/v1alpha1
kind: ServiceLevelObjective
metadata: {name: good, namespace: default}
spec: {service: reviews, subset: v1, sli: {successRate: {}}, target: 99, window: 28d}
---
apiVersion: weft.dev/v1alpha1
kind: ServiceLevelObjective
metadata: {name: no-subset, namespace: default}
spec: {service: reviews, subset: v9, sli: {successRate: {}}, target: 99, window: 28d}
---
apiVersion: weft.dev/v1alpha1
kind: ServiceLevelObjective
metadata: {name: no-service, namespace: default}
spec: {service: ratings, sli: {successRate: {}}, target: 99, window: 28d}
";
    let p = parse_str(text, Path::new("slo.yaml"));
    assert!(p.errors.is_empty(), "{:#?}", p.errors);
    let msgs: Vec<(String, &str, String)> = weft_api::analyze::analyze(&p.resources)
        .iter()
        .map(|m| (m.resource.name.clone(), m.code, m.text.clone()))
        .collect();
    assert_eq!(
        msgs,
        [
            (
                "no-subset".to_string(),
                "IST0101",
                "Referenced host+subset in destinationrule not found: \"reviews+v9\"".to_string()
            ),
            ("no-service".to_string(), "IST0101", "Referenced host not found: \"ratings\"".to_string()),
        ]
    );
}
