//! The decisions of a canary rollout, as pure functions of the spec, the state and one
//! interval's measurement: judge the interval (pass, fail, inconclusive), then advance,
//! hold, roll back or promote. No clock, store or network here, so every rule is tested
//! with hand-made numbers.

use std::time::Duration;

use weft_api::spec::rollout::{RolloutAnalysis, StepTraffic};
use weft_api::Rollout;

use super::state::{Measurement, Phase, RolloutState};
use crate::meshstats::WindowStats;

/// One interval's judgement.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Every bound held.
    Pass,
    /// A bound was broken (why).
    Fail(String),
    /// Too few requests to tell (why): neither a pass nor a failure.
    Inconclusive(String),
}

/// Judges one interval of the canary's requests against the analysis.
pub fn judge(a: &RolloutAnalysis, w: &WindowStats) -> (Verdict, Measurement) {
    let success = w.success_rate().map(|s| s * 100.0);
    let p99 = w.quantile_ms(0.99);
    let mut m = Measurement {
        requests: w.requests,
        success_rate: success,
        p99_ms: p99,
        verdict: String::new(),
        summary: summary(w.requests, success, p99),
        step: None,
    };
    let min = a.min_requests();
    if w.requests < min as f64 {
        let why = format!(
            "{} requests to the canary in the interval, fewer than minRequests {min}: inconclusive",
            w.requests.round()
        );
        m.verdict = "inconclusive".into();
        return (Verdict::Inconclusive(why), m);
    }
    let mut broken = Vec::new();
    if let (Some(min), Some(s)) = (a.success_rate.and_then(|t| t.min), success) {
        if s < min {
            broken.push(format!("success rate {s:.1}% < {min}%"));
        }
    }
    if let (Some(max), Some(p)) = (a.latency_p99.and_then(|t| t.max), p99) {
        if p > max {
            broken.push(format!("p99 latency {p:.0} ms > {max} ms"));
        }
    }
    if broken.is_empty() {
        m.verdict = "pass".into();
        (Verdict::Pass, m)
    } else {
        m.verdict = "fail".into();
        (Verdict::Fail(format!("{} ({})", broken.join(", "), m.summary)), m)
    }
}

/// `success rate 99.5%, p99 12 ms over 200 requests`.
fn summary(requests: f64, success: Option<f64>, p99: Option<f64>) -> String {
    let s = success.map(|s| format!("success rate {s:.1}%")).unwrap_or_else(|| "no success rate".into());
    let p = p99.map(|p| format!("p99 {p:.0} ms")).unwrap_or_else(|| "no latency".into());
    format!("{s}, {p} over {} requests", requests.round())
}

/// Moves a progressing rollout on at `now_ms` (milliseconds since the Unix epoch):
/// when an interval has passed since the last analysis, measures it with `measure`
/// (the canary's requests over that window), judges it and advances, holds, rolls
/// back or promotes. Returns true when the state changed.
pub fn progress(
    spec: &Rollout,
    st: &mut RolloutState,
    now_ms: u64,
    measure: impl FnOnce(Duration) -> WindowStats,
) -> bool {
    if st.phase != Phase::Progressing {
        return false;
    }
    let interval = spec.analysis.interval.0;
    if now_ms < st.last_analysis_ms.saturating_add(interval.as_millis() as u64) {
        return false;
    }
    let w = measure(interval);
    let (verdict, mut m) = judge(&spec.analysis, &w);
    st.last_analysis_ms = now_ms;
    let step = st.step + 1;
    let steps = spec.steps.len();
    let previous = st.last.as_ref().map(|l| l.verdict.clone());
    m.step = Some(step);
    st.last = Some(m.clone());
    st.failed_requests += w.errors;
    if let Some(budget) = spec.analysis.max_failed_requests {
        if st.failed_requests > budget as f64 {
            st.phase = Phase::RolledBack;
            st.event(
                now_ms,
                "RolledBack",
                format!(
                    "step {step}/{steps}: {} failed canary requests, over maxFailedRequests {budget} (last interval: {}); all traffic back to {}",
                    st.failed_requests.round(),
                    m.summary,
                    spec.stable.subset
                ),
            );
            return true;
        }
    }
    match verdict {
        Verdict::Inconclusive(why) => {
            if previous.as_deref() != Some("inconclusive") {
                st.event(now_ms, "Inconclusive", format!("step {step}/{steps}: {why}"));
            }
        }
        Verdict::Fail(why) => {
            st.failures += 1;
            let threshold = spec.analysis.failure_threshold();
            if st.failures >= threshold {
                st.phase = Phase::RolledBack;
                st.event(
                    now_ms,
                    "RolledBack",
                    format!(
                        "step {step}/{steps}: {} consecutive failed intervals (failureThreshold {threshold}), last: {why}; all traffic back to {}",
                        st.failures, spec.stable.subset
                    ),
                );
            } else {
                st.event(
                    now_ms,
                    "AnalysisFailed",
                    format!("step {step}/{steps}: {why} ({}/{threshold} failed intervals)", st.failures),
                );
            }
        }
        Verdict::Pass => {
            st.failures = 0;
            st.passes += 1;
            let pause = spec.steps.get(st.step).and_then(|s| s.pause).map(|p| p.0).unwrap_or_default();
            if now_ms.saturating_sub(st.step_started_ms) >= pause.as_millis() as u64 {
                advance(spec, st, now_ms, &format!("step {step}/{steps} passed ({})", m.summary));
            }
        }
    }
    true
}

/// Goes to the next step, or promotes after the last one.
pub fn advance(spec: &Rollout, st: &mut RolloutState, now_ms: u64, why: &str) {
    let steps = spec.steps.len();
    if st.step + 1 >= steps {
        st.phase = Phase::Succeeded;
        st.event(now_ms, "Promoted", format!("{why}; all {steps} steps done: all traffic to {}", spec.canary.subset));
        return;
    }
    st.step += 1;
    st.step_started_ms = now_ms;
    st.last_analysis_ms = now_ms;
    st.passes = 0;
    st.failures = 0;
    let traffic = describe(&spec.steps[st.step].traffic(), &spec.canary.subset);
    st.event(now_ms, "Advanced", format!("{why}; step {}/{steps}: {traffic}", st.step + 1));
}

/// `20% of requests to v3`, `requests matching [...] to v3`, `100% mirrored to v3`.
pub fn describe(t: &StepTraffic, canary: &str) -> String {
    match t {
        StepTraffic::Weight(w) => format!("{w}% of requests to {canary}"),
        StepTraffic::Match(m) => format!("requests matching {} header rule(s) to {canary}", m.len()),
        StepTraffic::Mirror(p) => format!("{p}% of requests mirrored to {canary} (answers dropped)"),
    }
}
