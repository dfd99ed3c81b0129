//! The arithmetic of SLOs, after the Google SRE workbook ("Alerting on SLOs"): error
//! ratio, remaining error budget, burn rate, and the multi-window, multi-burn-rate
//! alert conditions. Pure functions over [`WindowStats`], so tests check them by hand.

use std::time::Duration;

use weft_api::spec::slo::Sli;

use crate::meshstats::WindowStats;

/// The burn-rate windows, shortest first, named as in the API and the metrics.
pub const BURN_WINDOWS: [(&str, Duration); 5] = [
    ("5m", Duration::from_secs(5 * 60)),
    ("30m", Duration::from_secs(30 * 60)),
    ("1h", Duration::from_secs(3600)),
    ("6h", Duration::from_secs(6 * 3600)),
    ("3d", Duration::from_secs(3 * 86_400)),
];

/// Who is woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Someone is paged now.
    Page,
    /// A ticket for working hours.
    Ticket,
}

/// One multi-window burn-rate alert: fires while the burn rate over both the long and
/// the short window is above `factor`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlertRule {
    /// Severity.
    pub severity: Severity,
    /// Long window's name (a key of [`BURN_WINDOWS`]).
    pub long: &'static str,
    /// Short window's name (a key of [`BURN_WINDOWS`]).
    pub short: &'static str,
    /// Burn rate both windows must exceed.
    pub factor: f64,
}

/// The workbook's recommended set: 2% of a 30-day budget in 1 h and 5% in 6 h page,
/// 10% in 3 d opens a ticket; each long window is checked with a short one (1/12 of it)
/// so the alert resolves soon after the burning stops.
pub const ALERT_RULES: [AlertRule; 3] = [
    AlertRule { severity: Severity::Page, long: "1h", short: "5m", factor: 14.4 },
    AlertRule { severity: Severity::Page, long: "6h", short: "30m", factor: 6.0 },
    AlertRule { severity: Severity::Ticket, long: "3d", short: "6h", factor: 1.0 },
];

impl Severity {
    /// `page` or `ticket`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Severity::Page => "page",
            Severity::Ticket => "ticket",
        }
    }
}

impl AlertRule {
    /// Whether the alert's condition holds for these burn rates (by window name); a
    /// window without a value does not fire.
    pub fn holds(&self, burn: impl Fn(&str) -> Option<f64>) -> bool {
        matches!((burn(self.long), burn(self.short)), (Some(l), Some(s)) if l > self.factor && s > self.factor)
    }
}

/// Share of bad requests (`1 - SLI`) over a window; None without requests.
pub fn error_ratio(stats: &WindowStats, sli: Sli) -> Option<f64> {
    let good = match sli {
        Sli::SuccessRate => stats.success_rate()?,
        Sli::Latency(threshold_ms) => stats.share_within(threshold_ms)?,
    };
    Some((1.0 - good).clamp(0.0, 1.0))
}

/// How fast the budget burns: the error ratio over the budget `1 - target` (1 spends
/// exactly the whole budget over the SLO window). No requests burn nothing.
pub fn burn_rate(error_ratio: Option<f64>, target: f64) -> f64 {
    error_ratio.map(|e| e / (1.0 - target)).unwrap_or(0.0)
}

/// Share of the window's error budget left: `1 - (bad/total) / (1 - target)`; below 0
/// once overspent; 1 without requests.
pub fn budget_remaining(error_ratio: Option<f64>, target: f64) -> f64 {
    1.0 - burn_rate(error_ratio, target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(requests: f64, errors: f64) -> WindowStats {
        WindowStats { requests, errors, ..WindowStats::default() }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn budget_and_burn_rate_by_hand() {
        // 10,000 requests, 4 errors, target 99.9%: error ratio 0.0004, budget 0.001,
        // burn 0.4, remaining 0.6.
        let e = error_ratio(&stats(10_000.0, 4.0), Sli::SuccessRate);
        assert!(close(e.unwrap(), 0.0004));
        assert!(close(burn_rate(e, 0.999), 0.4));
        assert!(close(budget_remaining(e, 0.999), 0.6));
        // 1,000 requests, 30 errors, target 99%: ratio 0.03, burn 3, remaining -2.
        let e = error_ratio(&stats(1000.0, 30.0), Sli::SuccessRate);
        assert!(close(burn_rate(e, 0.99), 3.0));
        assert!(close(budget_remaining(e, 0.99), -2.0));
        // No traffic: nothing burnt.
        let e = error_ratio(&stats(0.0, 0.0), Sli::SuccessRate);
        assert_eq!((e, burn_rate(e, 0.99), budget_remaining(e, 0.99)), (None, 0.0, 1.0));
    }

    #[test]
    fn latency_sli_counts_requests_over_the_threshold_as_bad() {
        // 200 requests: 180 at or under 250 ms, 200 under +Inf. Target 95%: ratio 0.1,
        // burn 2.
        let s = WindowStats {
            requests: 200.0,
            errors: 50.0,
            latency_ms: vec![(100.0, 120.0), (250.0, 180.0), (f64::INFINITY, 200.0)],
            covered: Duration::from_secs(60),
        };
        let e = error_ratio(&s, Sli::Latency(250.0));
        assert!(close(e.unwrap(), 0.1));
        assert!(close(burn_rate(e, 0.95), 2.0));
    }

    #[test]
    fn alerts_need_both_windows_above_the_factor() {
        let page = ALERT_RULES[0];
        let burns = |l: f64, s: f64| {
            move |w: &str| {
                Some(if w == "1h" {
                    l
                } else if w == "5m" {
                    s
                } else {
                    0.0
                })
            }
        };
        assert!(page.holds(burns(15.0, 20.0)));
        assert!(!page.holds(burns(15.0, 14.4)), "the short window at the factor does not fire");
        assert!(!page.holds(burns(14.4, 100.0)));
        assert!(!page.holds(|_| None));
    }
}
