//! weft's `ServiceLevelObjective` (`weft.dev/v1alpha1`): a target for one service's
//! success rate or latency over a rolling window, with burn-rate alerts (docs/slo.md).

use serde::{Deserialize, Serialize};

/// `weft.dev/v1alpha1` `ServiceLevelObjective`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceLevelObjective {
    /// The service: a short name (`ratings`, resolved in the SLO's namespace),
    /// `name.namespace`, or an FQDN (`ratings.default.svc.cluster.local`).
    pub service: String,
    /// A subset of the service's DestinationRule: only requests served by its
    /// `version` (Istio's `destination_version` label) count.
    #[serde(default)]
    pub subset: Option<String>,
    /// Whose view counts (Istio's `reporter` label): `destination` (default), what the
    /// service's own sidecars answered; `source`, what its callers' sidecars saw,
    /// including what never reached the service (injected faults, connect failures).
    #[serde(default)]
    pub reporter: SloReporter,
    /// Not supported (Istio's metrics carry no route): present only to be refused
    /// with a precise error rather than ignored (never written back out).
    #[serde(default, skip_serializing)]
    pub route: Option<serde_json::Value>,
    /// What a good request is.
    pub sli: SliSpec,
    /// Objective in percent, `0 < target < 100` (e.g. `99.9`), as Istio writes
    /// percentages (`minHealthPercent`, `maxEjectionPercent`).
    pub target: f64,
    /// Rolling window in Prometheus' duration form (`28d`, `4w`, `30d`, `1h30m`).
    pub window: String,
    /// Where this SLO's alerts are sent (beside `weft control --alert-webhook`).
    #[serde(default)]
    pub alert: Option<SloAlertSpec>,
}

/// `reporter`: `destination` or `source`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SloReporter {
    /// The service's sidecars (`reporter="destination"`).
    #[default]
    Destination,
    /// The callers' sidecars (`reporter="source"`).
    Source,
}

impl SloReporter {
    /// The label value.
    pub fn as_str(&self) -> &'static str {
        match self {
            SloReporter::Destination => "destination",
            SloReporter::Source => "source",
        }
    }
}

/// `sli`: exactly one of `successRate` or `latency`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SliSpec {
    /// Good = any response but a 5xx (Istio's dashboards' error definition).
    #[serde(default)]
    pub success_rate: Option<SuccessRateSli>,
    /// Good = answered within `thresholdMs`.
    #[serde(default)]
    pub latency: Option<LatencySli>,
}

/// `sli.successRate` (no fields).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuccessRateSli {}

/// `sli.latency`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LatencySli {
    /// Threshold in milliseconds: one of the bounds of Istio's
    /// `istio_request_duration_milliseconds` buckets ([`LATENCY_BOUNDS_MS`]), so the
    /// control plane and Prometheus count exactly the same requests as good.
    pub threshold_ms: f64,
}

/// `alert`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SloAlertSpec {
    /// `http://` URL the alert notifications are POSTed to as JSON.
    #[serde(default)]
    pub webhook: Option<String>,
}

/// Which SLI, resolved from [`SliSpec`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sli {
    /// Share of requests that were not 5xx.
    SuccessRate,
    /// Share of requests answered within the threshold (milliseconds).
    Latency(f64),
}

/// The bucket bounds (ms) of Istio's `istio_request_duration_milliseconds`, which
/// weft's proxy uses too.
pub const LATENCY_BOUNDS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

impl ServiceLevelObjective {
    /// The SLI (success rate when both or neither are given; validation refuses that).
    pub fn sli(&self) -> Sli {
        match &self.sli.latency {
            Some(l) if self.sli.success_rate.is_none() => Sli::Latency(l.threshold_ms),
            _ => Sli::SuccessRate,
        }
    }

    /// The target as a ratio (`99.9` -> `0.999`, rounded to 12 decimals so it reads
    /// as written rather than `0.9990000000000001`).
    pub fn target_ratio(&self) -> f64 {
        (self.target * 1e10).round() / 1e12
    }

    /// The window as a duration (zero when invalid; validation refuses that).
    pub fn window_duration(&self) -> std::time::Duration {
        parse_window(&self.window).unwrap_or_default()
    }
}

/// Parses a Prometheus duration: one or more `<integer><unit>` with units `y`, `w`,
/// `d`, `h`, `m`, `s`, `ms`, largest first (`28d`, `1h30m`).
pub fn parse_window(s: &str) -> Result<std::time::Duration, String> {
    let expected = "expected a Prometheus duration such as \"28d\", \"4w\" or \"1h30m\" (units y, w, d, h, m, s, ms)";
    if s.is_empty() {
        return Err(format!("empty window, {expected}"));
    }
    let units: [(&str, u64); 7] = [
        ("y", 365 * 86_400_000),
        ("w", 7 * 86_400_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("ms", 1),
        ("m", 60_000),
        ("s", 1000),
    ];
    let mut total: u64 = 0;
    let mut rest = s;
    let mut last_rank = usize::MAX;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("invalid window {s:?}: {expected}"));
        }
        let n: u64 = rest[..digits].parse().map_err(|_| format!("invalid window {s:?}: number too large"))?;
        rest = &rest[digits..];
        let Some((rank, (unit, ms))) =
            units.iter().enumerate().find(|(_, (u, _))| rest.starts_with(u) && !(*u == "m" && rest.starts_with("ms")))
        else {
            return Err(format!("invalid window {s:?}: missing or unknown unit, {expected}"));
        };
        // Prometheus orders units largest first; `ms` sits after `h` in the table only
        // to be matched before `m`.
        let order = match *unit {
            "ms" => 6,
            "m" => 4,
            "s" => 5,
            _ => rank,
        };
        if last_rank != usize::MAX && order <= last_rank {
            return Err(format!("invalid window {s:?}: units must go from largest to smallest, each once"));
        }
        last_rank = order;
        rest = &rest[unit.len()..];
        total = n
            .checked_mul(*ms)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("invalid window {s:?}: too long"))?;
    }
    Ok(std::time::Duration::from_millis(total))
}

/// Formats a duration the way Prometheus does (`28d`, `1h30m`, `5m`).
pub fn format_window(d: std::time::Duration) -> String {
    let mut ms = d.as_millis() as u64;
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in [
        ("y", 365 * 86_400_000),
        ("w", 7 * 86_400_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
        ("ms", 1),
    ] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    out
}

/// An alert webhook URL weft can POST to: `http://host[:port]/path`.
pub fn check_webhook(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(if url.starts_with("https://") {
            format!("{url:?}: https webhooks are not supported yet")
        } else {
            format!("{url:?} is not an http:// URL")
        });
    };
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let name = match host.rsplit_once(':') {
        Some((h, p)) if !host.ends_with(']') => (h, Some(p)),
        _ => (host, None),
    };
    if name.0.is_empty() || name.0.contains('@') || name.1.is_some_and(|p| p.parse::<u16>().is_err()) {
        return Err(format!("{url:?} has no valid host[:port]"));
    }
    if !name.0.starts_with('[') && !name.0.split('.').all(|l| crate::validate::is_dns_label(&l.to_ascii_lowercase())) {
        return Err(format!("{url:?} has no valid host[:port]"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn windows_parse_like_prometheus() {
        assert_eq!(parse_window("28d"), Ok(Duration::from_secs(28 * 86400)));
        assert_eq!(parse_window("4w"), Ok(Duration::from_secs(28 * 86400)));
        assert_eq!(parse_window("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_window("1m500ms"), Ok(Duration::from_millis(60_500)));
        assert!(parse_window("").is_err());
        assert!(parse_window("28").is_err());
        assert!(parse_window("1.5d").is_err());
        assert!(parse_window("30m1h").is_err());
        assert!(parse_window("1d1d").is_err());
        assert!(parse_window("-1d").is_err());
        assert!(parse_window("99999999999999999999d").is_err());
    }

    #[test]
    fn webhooks_must_be_http_urls() {
        assert!(check_webhook("http://127.0.0.1:9000/hook").is_ok());
        assert!(check_webhook("http://alerts.example/x?y=1").is_ok());
        assert!(check_webhook("http://[::1]:9000/hook").is_ok());
        assert!(check_webhook("http://[::1]/hook").is_ok());
        assert!(check_webhook("https://alerts.example/x").is_err());
        assert!(check_webhook("http://:80/").is_err());
        assert!(check_webhook("http://a:b@x/").is_err());
        assert!(check_webhook("http://x:99999/").is_err());
        assert!(check_webhook("ftp://x/").is_err());
    }

    #[test]
    fn windows_format_like_prometheus() {
        assert_eq!(format_window(Duration::from_secs(28 * 86400)), "4w");
        assert_eq!(format_window(Duration::from_secs(30 * 86400)), "4w2d");
        assert_eq!(format_window(Duration::from_secs(300)), "5m");
        assert_eq!(format_window(Duration::from_secs(3 * 86400)), "3d");
    }
}
