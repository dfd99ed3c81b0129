//! `ServiceLevelObjective` (weft.dev/v1alpha1): what the SLO engine and `weft slo rules`
//! need to be exact, refused precisely rather than ignored.

use super::V;
use crate::spec::slo::{check_webhook, parse_window, ServiceLevelObjective, LATENCY_BOUNDS_MS};

/// Shortest and longest windows accepted.
const MIN_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);
const MAX_WINDOW: std::time::Duration = std::time::Duration::from_secs(366 * 86_400);

pub(super) fn service_level_objective(v: &mut V, o: &ServiceLevelObjective) {
    if o.service.trim().is_empty() {
        v.err(
            "spec.service",
            "service must not be empty",
            "expected a host such as `ratings` or `ratings.default.svc.cluster.local`".to_string(),
        );
    } else if o.service.contains('*') || o.service.contains('/') || o.service.contains(' ') {
        v.err(
            "spec.service",
            format!("`{}` is not one service's host", o.service),
            "expected a host without wildcards, e.g. `ratings` or `ratings.default.svc.cluster.local`".to_string(),
        );
    }
    if let Some(s) = &o.subset {
        v.dns_label("spec.subset", "subset name", s);
    }
    if o.route.is_some() {
        v.err(
            "spec.route",
            "route is not supported",
            "Istio's request metrics carry no route label, so a route's requests cannot be told apart; \
             use `subset`, or give the route's traffic its own service"
                .to_string(),
        );
    }
    match (&o.sli.success_rate, &o.sli.latency) {
        (Some(_), Some(_)) => {
            v.err("spec.sli", "give either successRate or latency, not both", "write one SLO per SLI".to_string())
        }
        (None, None) => v.err(
            "spec.sli",
            "an SLI is required",
            "expected `successRate: {}` or `latency: {thresholdMs: 250}`".to_string(),
        ),
        (None, Some(l)) => {
            if !LATENCY_BOUNDS_MS.contains(&l.threshold_ms) {
                let bounds: Vec<String> = LATENCY_BOUNDS_MS.iter().map(|b| b.to_string()).collect();
                v.err(
                    "spec.sli.latency.thresholdMs",
                    format!("{} is not a bucket bound of istio_request_duration_milliseconds", l.threshold_ms),
                    format!(
                        "expected one of {} (the SLI counts the requests of whole buckets, in weft and in Prometheus)",
                        bounds.join(", ")
                    ),
                );
            }
        }
        (Some(_), None) => {}
    }
    if !o.target.is_finite() || o.target <= 0.0 || o.target >= 100.0 {
        v.err(
            "spec.target",
            format!("target {} is out of range", o.target),
            "expected a percentage between 0 and 100, exclusive (100 leaves no error budget), e.g. 99.9".to_string(),
        );
    } else if o.target < 1.0 {
        v.err(
            "spec.target",
            format!("target {} reads as {}%", o.target, o.target),
            format!("target is a percentage: for {}% write {}", o.target * 100.0, o.target * 100.0),
        );
    }
    match parse_window(&o.window) {
        Err(e) => v.err("spec.window", e, None),
        Ok(w) if !(MIN_WINDOW..=MAX_WINDOW).contains(&w) => v.err(
            "spec.window",
            format!("window {} is out of range", o.window),
            "expected between 1h and 366d; SLOs usually use 28d or 30d".to_string(),
        ),
        Ok(_) => {}
    }
    if let Some(url) = o.alert.as_ref().and_then(|a| a.webhook.as_ref()) {
        if let Err(e) = check_webhook(url) {
            v.err("spec.alert.webhook", e, "expected an http:// URL, e.g. http://alerts.example:9000/hook".to_string());
        }
    }
}
