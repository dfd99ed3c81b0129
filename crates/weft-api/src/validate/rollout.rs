//! weft.dev Rollout: a host, two different subsets, steps that each route one way, an
//! analysis with an interval and at least one bound.

use super::V;
use crate::spec::rollout::{Rollout, Threshold};

/// Shortest analysis interval: the proxies' metrics are gathered every second or so.
const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

pub(crate) fn rollout(v: &mut V, r: &Rollout) {
    v.non_empty("spec.host", "host", &r.host);
    if r.host.contains('*') {
        v.err("spec.host", format!("host `{}` is a wildcard", r.host), "a rollout moves one service".to_string());
    }
    v.dns_label("spec.stable.subset", "subset name", &r.stable.subset);
    v.dns_label("spec.canary.subset", "subset name", &r.canary.subset);
    if !r.canary.subset.is_empty() && r.canary.subset == r.stable.subset {
        v.err(
            "spec.canary.subset",
            format!("the canary subset is the stable subset `{}`", r.stable.subset),
            "name the new version's DestinationRule subset".to_string(),
        );
    }
    if r.steps.is_empty() {
        v.err("spec.steps", "a rollout needs at least one step", "e.g. weights 5, 20, 50, 100".to_string());
    }
    for (i, s) in r.steps.iter().enumerate() {
        let path = format!("spec.steps[{i}]");
        let set: Vec<&str> =
            [(s.weight.is_some(), "weight"), (!s.matches.is_empty(), "match"), (s.mirror.is_some(), "mirror")]
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, n)| *n)
                .collect();
        match set.as_slice() {
            [] => v.err(
                format!("{path}.weight"),
                "a step routes nothing",
                "set one of `weight`, `match` or `mirror`".to_string(),
            ),
            [_] => {}
            [a, b, ..] => v.err(
                format!("{path}.{b}"),
                format!("`{a}` and `{b}` cannot be used together"),
                "a step routes one way: a weight, a header match or a mirror".to_string(),
            ),
        }
        if let Some(w) = s.weight {
            if w > 100 {
                v.err(format!("{path}.weight"), format!("weight {w} is out of range"), "expected 0..=100".to_string());
            }
        }
        if let Some(m) = s.mirror {
            if !(m > 0.0 && m <= 100.0) {
                v.err(
                    format!("{path}.mirror"),
                    format!("mirror percentage {m} is out of range"),
                    "expected (0, 100]".to_string(),
                );
            }
        }
        for (j, m) in s.matches.iter().enumerate() {
            let mp = format!("{path}.match[{j}]");
            v.string_match(&format!("{mp}.uri"), &m.uri);
            v.string_match(&format!("{mp}.method"), &m.method);
            v.string_match(&format!("{mp}.authority"), &m.authority);
            for (k, sm) in m.headers.iter() {
                v.string_match(&format!("{mp}.headers.{k}"), &Some(sm.clone()));
            }
            for (k, sm) in m.query_params.iter() {
                v.string_match(&format!("{mp}.queryParams.{k}"), &Some(sm.clone()));
            }
        }
        v.duration(&format!("{path}.pause"), &s.pause);
    }
    let a = &r.analysis;
    if a.interval.0 < MIN_INTERVAL {
        v.err(
            "spec.analysis.interval",
            format!("interval {} is too short", a.interval),
            "expected at least 1s (the proxies' metrics are gathered about every second)".to_string(),
        );
    }
    if a.failure_threshold == Some(0) {
        v.err("spec.analysis.failureThreshold", "failureThreshold must be at least 1", None);
    }
    if a.max_failed_requests == Some(0) {
        v.err(
            "spec.analysis.maxFailedRequests",
            "maxFailedRequests must be at least 1",
            "leave it out for no budget".to_string(),
        );
    }
    if a.min_requests == Some(0) {
        v.err("spec.analysis.minRequests", "minRequests must be at least 1", None);
    }
    if a.success_rate.is_none() && a.latency_p99.is_none() {
        v.err(
            "spec.analysis",
            "the analysis has no bound",
            "set `successRate: {min: PERCENT}` and/or `latencyP99: {max: MILLISECONDS}`".to_string(),
        );
    }
    if let Some(t) = &a.success_rate {
        bound(v, "spec.analysis.successRate", t, "min", Some(100.0));
    }
    if let Some(t) = &a.latency_p99 {
        bound(v, "spec.analysis.latencyP99", t, "max", None);
    }
}

/// A threshold with exactly the `want` side set, in range.
fn bound(v: &mut V, path: &str, t: &Threshold, want: &str, upper: Option<f64>) {
    let (given, other) = if want == "min" { (t.min, t.max) } else { (t.max, t.min) };
    let other_name = if want == "min" { "max" } else { "min" };
    if other.is_some() {
        v.err(format!("{path}.{other_name}"), format!("`{other_name}` is not a bound here"), format!("use `{want}`"));
    }
    match given {
        None => v.err(format!("{path}.{want}"), format!("`{want}` is required"), None),
        Some(x) if x < 0.0 || !x.is_finite() || upper.is_some_and(|u| x > u) => v.err(
            format!("{path}.{want}"),
            format!("{x} is out of range"),
            match upper {
                Some(u) => format!("expected 0..={u}"),
                None => "expected a non-negative number".to_string(),
            },
        ),
        Some(_) => {}
    }
}
