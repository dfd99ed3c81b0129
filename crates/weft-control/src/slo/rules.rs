//! `weft slo rules`: the SLOs as Prometheus recording and alerting rules over Istio's
//! standard metrics (`reporter="destination"`, or `"source"` when the SLO says so), for
//! teams that alert from their own Prometheus. One rule group per SLO:
//!
//! - `weft:slo_error_ratio:rate<W>` for each burn-rate window and the SLO window: the
//!   share of bad requests (5xx for success rate; over the threshold's bucket for
//!   latency), labelled `slo`, `slo_namespace`, `service`;
//! - `weft:slo_error_budget_remaining:ratio`: `1 - ratio(window) / (1 - target)`;
//! - `WeftSLOErrorBudgetBurn` alerts, one per workbook rule ([`super::calc::ALERT_RULES`]),
//!   labelled `severity`, `long`, `short`.
//!
//! The engine computes the same numbers from the proxies' statistics (docs/slo.md).

use serde::Serialize;
use weft_api::spec::slo::Sli;
use weft_api::{Resource, Spec};

use super::calc::{ALERT_RULES, BURN_WINDOWS};

/// The alert's name.
pub const ALERT_NAME: &str = "WeftSLOErrorBudgetBurn";

#[derive(Serialize)]
struct RuleFile {
    groups: Vec<Group>,
}

#[derive(Serialize)]
struct Group {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Serialize)]
struct Rule {
    #[serde(skip_serializing_if = "Option::is_none")]
    record: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    alert: Option<String>,
    expr: String,
    labels: std::collections::BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    annotations: Option<std::collections::BTreeMap<String, String>>,
}

/// The recording rule name of the error ratio over `window` (`5m`, `28d`).
pub fn ratio_record(window: &str) -> String {
    format!("weft:slo_error_ratio:rate{window}")
}

/// The rules for every SLO among `resources` (short service names resolved in
/// `domain`), as a Prometheus rule file (YAML).
pub fn rules_yaml(resources: &[Resource], domain: &str) -> Result<String, String> {
    let mut groups = Vec::new();
    for r in resources {
        let Spec::ServiceLevelObjective(o) = &r.spec else { continue };
        let service = weft_api::host::fqdn(&o.service, &r.meta.namespace, domain);
        let mut matcher = format!("reporter=\"{}\",destination_service=\"{}\"", o.reporter.as_str(), escape(&service));
        if let Some(subset) = &o.subset {
            let version = super::subset_version(resources, &service, subset, domain)
                .map_err(|e| format!("ServiceLevelObjective {}/{}: {e}", r.meta.namespace, r.meta.name))?;
            matcher.push_str(&format!(",destination_version=\"{}\"", escape(&version)));
        }
        let ident = [("slo", r.meta.name.clone()), ("slo_namespace", r.meta.namespace.clone()), ("service", service)];
        let labels = |extra: &[(&str, &str)]| {
            ident
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let slo_window = o.window.clone();
        let mut rules = Vec::new();
        let mut windows: Vec<String> = BURN_WINDOWS.iter().map(|(w, _)| w.to_string()).collect();
        if !windows.contains(&slo_window) {
            windows.push(slo_window.clone());
        }
        for w in &windows {
            rules.push(Rule {
                record: Some(ratio_record(w)),
                alert: None,
                expr: error_ratio_expr(o.sli(), &matcher, w),
                labels: labels(&[]),
                annotations: None,
            });
        }
        let budget = number(1.0 - o.target_ratio());
        let select = format!("{{slo=\"{}\",slo_namespace=\"{}\"}}", escape(&r.meta.name), escape(&r.meta.namespace));
        rules.push(Rule {
            record: Some("weft:slo_error_budget_remaining:ratio".into()),
            alert: None,
            expr: format!("1 - {}{select} / {budget}", ratio_record(&slo_window)),
            labels: labels(&[]),
            annotations: None,
        });
        for a in ALERT_RULES {
            let threshold = format!("({} * {budget})", a.factor);
            let summary =
                format!("SLO {}/{} burns its error budget {}x too fast", r.meta.namespace, r.meta.name, a.factor);
            rules.push(Rule {
                record: None,
                alert: Some(ALERT_NAME.into()),
                expr: format!(
                    "{long}{select} > {threshold}\nand\n{short}{select} > {threshold}",
                    long = ratio_record(a.long),
                    short = ratio_record(a.short),
                ),
                labels: labels(&[("severity", a.severity.as_str()), ("long", a.long), ("short", a.short)]),
                annotations: Some(
                    [
                        ("summary".to_string(), summary),
                        (
                            "description".to_string(),
                            format!(
                                "Error ratio above {} x {budget} over {} and {} (target {}% over {}).",
                                a.factor, a.long, a.short, o.target, o.window
                            ),
                        ),
                    ]
                    .into_iter()
                    .collect(),
                ),
            });
        }
        groups.push(Group { name: format!("weft-slo-{}-{}", r.meta.namespace, r.meta.name), rules });
    }
    serde_yaml_ng::to_string(&RuleFile { groups }).map_err(|e| e.to_string())
}

/// Share of bad requests over `window` for the requests `matcher` selects.
fn error_ratio_expr(sli: Sli, matcher: &str, window: &str) -> String {
    match sli {
        Sli::SuccessRate => format!(
            "sum(rate(istio_requests_total{{{matcher},response_code=~\"5..\"}}[{window}]))\n/\n\
             sum(rate(istio_requests_total{{{matcher}}}[{window}]))"
        ),
        Sli::Latency(threshold) => format!(
            "1 - (\n  sum(rate(istio_request_duration_milliseconds_bucket{{{matcher},le=~\"{le}\"}}[{window}]))\n  /\n  \
             sum(rate(istio_request_duration_milliseconds_count{{{matcher}}}[{window}]))\n)",
            le = le_regex(threshold)
        ),
    }
}

/// Matches the bucket's `le` as Envoy and weft write it (`250`) and as Prometheus 3
/// normalises it (`250.0`).
fn le_regex(threshold: f64) -> String {
    if threshold.fract() == 0.0 {
        format!("{threshold:.0}(\\\\.0)?")
    } else {
        threshold.to_string().replace('.', "\\\\.")
    }
}

/// A ratio as people write it (`0.001`, not `0.0010000000000000009`).
fn number(v: f64) -> String {
    let s = format!("{v:.12}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}
