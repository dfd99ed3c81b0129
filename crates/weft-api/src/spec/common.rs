//! Types shared by several Istio messages: durations, percentages, string
//! matches, port selectors, workload selectors and policy target references.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

/// A duration written as Istio accepts it: `"1.5s"`, `"500ms"`, `"1h"`, `"1m30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Duration(pub std::time::Duration);

/// A percentage in 0..=100 (`{value: 12.5}`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Percent {
    /// The percentage, 0 to 100.
    pub value: f64,
}

/// Istio `StringMatch`: exactly one of `exact`, `prefix` or `regex` (RE2 syntax).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum StringMatch {
    /// Exact string match.
    Exact(String),
    /// Prefix match.
    Prefix(String),
    /// Regular expression match (the whole value must match).
    Regex(String),
}

/// Istio `PortSelector`: a port by number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSelector {
    /// Port number (1..=65535).
    pub number: u32,
}

/// Istio `WorkloadSelector` (`labels`), used by Sidecar, DestinationRule and ServiceEntry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels a workload must carry.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Istio `type.WorkloadSelector` (`matchLabels`), used by security and telemetry kinds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    /// Labels a workload must carry.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// Istio `PolicyTargetReference`: a policy attached to a Gateway-API object or Service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// API group, e.g. `gateway.networking.k8s.io` or `""` for core.
    #[serde(default)]
    pub group: String,
    /// Kind, e.g. `Gateway` or `Service`.
    pub kind: String,
    /// Name of the target.
    pub name: String,
    /// Namespace (must equal the policy's namespace when set).
    #[serde(default)]
    pub namespace: Option<String>,
}

/// Istio `Port` (Gateway servers, ServiceEntry and Sidecar listeners).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Port {
    /// Port number.
    pub number: u32,
    /// Protocol: HTTP, HTTPS, GRPC, HTTP2, MONGO, TCP, TLS.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Port name.
    #[serde(default)]
    pub name: Option<String>,
    /// Port on the endpoint that receives the traffic.
    #[serde(default)]
    pub target_port: Option<u32>,
}

/// Protocols Istio accepts on `Port.protocol` (case-insensitive).
pub const PROTOCOLS: &[&str] =
    &["HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS", "UDP", "REDIS", "MYSQL"];

impl Duration {
    /// Parses a Go-style duration (`300ms`, `1.5s`, `1h30m`), the form Istio accepts.
    pub fn parse(s: &str) -> Result<Duration, String> {
        let expected = "expected a number followed by a unit (h, m, s, ms, us, ns), e.g. \"1.5s\" or \"500ms\"";
        let t = s.trim();
        if t.is_empty() {
            return Err(format!("empty duration, {expected}"));
        }
        if t.starts_with('-') {
            return Err(format!("negative duration \"{s}\", durations must be >= 0"));
        }
        if t == "0" {
            return Ok(Duration(std::time::Duration::ZERO));
        }
        let mut total = 0f64;
        let mut rest = t;
        while !rest.is_empty() {
            let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
            if num_len == 0 {
                return Err(format!("invalid duration \"{s}\": {expected}"));
            }
            let n: f64 = rest[..num_len].parse().map_err(|_| format!("invalid duration \"{s}\": {expected}"))?;
            rest = &rest[num_len..];
            let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
            let secs = match &rest[..unit_len] {
                "h" => 3600.0,
                "m" => 60.0,
                "s" => 1.0,
                "ms" => 1e-3,
                "us" | "µs" => 1e-6,
                "ns" => 1e-9,
                "" => return Err(format!("missing unit in duration \"{s}\": {expected}")),
                u => return Err(format!("unknown unit `{u}` in duration \"{s}\": {expected}")),
            };
            total += n * secs;
            rest = &rest[unit_len..];
        }
        std::time::Duration::try_from_secs_f64(total)
            .map(Duration)
            .map_err(|_| format!("duration \"{s}\" is out of range"))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"1.5s\" or \"500ms\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                Duration::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

impl StringMatch {
    /// The pattern text, whatever the kind of match.
    pub fn pattern(&self) -> &str {
        match self {
            StringMatch::Exact(s) | StringMatch::Prefix(s) | StringMatch::Regex(s) => s,
        }
    }

    /// Whether `value` matches (regex is anchored on both ends, like Envoy's).
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => s == value,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Regex(r) => {
                regex::Regex::new(&format!("^(?:{r})$")).map(|re| re.is_match(value)).unwrap_or(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        let ms = |s: &str| Duration::parse(s).map(|d| d.0.as_millis());
        assert_eq!(ms("1.5s"), Ok(1500));
        assert_eq!(ms("500ms"), Ok(500));
        assert_eq!(ms("1h"), Ok(3_600_000));
        assert_eq!(ms("1m30s"), Ok(90_000));
        assert_eq!(ms("3m"), Ok(180_000));
        assert!(ms("5").unwrap_err().contains("missing unit"));
        assert!(ms("5x").unwrap_err().contains("unknown unit `x`"));
        assert!(ms("-1s").unwrap_err().contains("negative"));
    }

    #[test]
    fn string_match_regex_is_anchored() {
        let m = StringMatch::Regex("v[0-9]+".into());
        assert!(m.matches("v12"));
        assert!(!m.matches("xv12"));
        assert!(StringMatch::Prefix("/api".into()).matches("/api/v1"));
    }
}
