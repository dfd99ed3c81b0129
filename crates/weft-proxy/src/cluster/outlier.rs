//! Outlier detection (Envoy's `outlier_detection`, Istio's `outlierDetection`):
//! endpoints that fail in a row are ejected from load balancing for a while.
//!
//! Semantics, as Envoy's consecutive detectors:
//! - every upstream response or failure of a request attempt is reported with
//!   [`EndpointLoad::report`](super::EndpointLoad); a 5xx response counts towards
//!   `consecutive_5xx`, a 502/503/504 towards `consecutive_gateway_failure`, and a
//!   locally originated failure (connect failure, reset, timeout) towards both;
//!   anything else resets both counters;
//! - reaching a threshold whose `enforcing_*` is above 0 ejects the endpoint for
//!   `base_ejection_time * n` (n = how many times it was ejected, less one per healthy
//!   `interval` since; capped at `max(max_ejection_time, base_ejection_time)`), unless
//!   that would put more than `max_ejection_percent` of the cluster's endpoints out
//!   (one endpoint can always be ejected);
//! - an ejected endpoint comes back on its own when its time is up (lazily, on the
//!   next pick, rather than on an interval tick);
//! - when fewer than `healthy_panic_threshold` percent (default 50; Istio sets 0 unless
//!   `minHealthPercent`) of the endpoints are healthy and not ejected, the cluster is in
//!   panic and ignores ejections.
//!
//! Success-rate and failure-percentage detectors are not implemented; their fields are
//! accepted and ignored only while they cannot enforce (`enforcing_* = 0` or unset
//! thresholds, which is how Istio configures clusters).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3::OutlierDetection;

use crate::error::ErrorKind;

/// Envoy's defaults.
const DEFAULT_CONSECUTIVE: u32 = 5;
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

/// A compiled `OutlierDetection`.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    /// Consecutive 5xx (incl. local-origin failures) that eject; None: not enforced.
    pub consecutive_5xx: Option<u32>,
    /// Consecutive 502/503/504 (incl. local-origin failures) that eject; None: not enforced.
    pub consecutive_gateway: Option<u32>,
    /// Envoy's `interval`: here, how often the ejection multiplier decays.
    pub interval: Duration,
    /// Base ejection time (multiplied by the number of ejections).
    pub base_ejection: Duration,
    /// Cap of one ejection.
    pub max_ejection: Duration,
    /// Most endpoints of a cluster ejected at once, in percent.
    pub max_ejection_percent: u32,
}

/// What one request attempt to an endpoint came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500.
    Success,
    /// An upstream response with this 5xx status.
    Status(u16),
    /// A failure of the proxy's own making: connect failure, reset, timeout.
    LocalFailure,
}

/// Per-endpoint detector state, shared across snapshots (lives in `EndpointLoad`).
#[derive(Debug, Default)]
pub struct OutlierState {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Ejected until this time (ms since the load's epoch); 0: not ejected.
    ejected_until_ms: AtomicU64,
    /// Ejections so far (the multiplier), as of `multiplier_at_ms`.
    ejections: AtomicU32,
    multiplier_at_ms: AtomicU64,
}

/// The result of a report: whether the endpoint should now be ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Keep,
    Eject,
}

impl OutlierConfig {
    /// Compiles Envoy's `OutlierDetection`. Errors are `(field, message)`.
    pub fn compile(o: &OutlierDetection) -> Result<OutlierConfig, (String, String)> {
        let enforced = |threshold: Option<u32>, enforcing: Option<u32>, default_enforcing: u32| {
            let t = threshold.unwrap_or(DEFAULT_CONSECUTIVE);
            (enforcing.unwrap_or(default_enforcing) > 0 && t > 0).then_some(t)
        };
        let dur = |d: Option<&envoy_types::pb::google::protobuf::Duration>, field: &str, default: Duration| match d {
            None => Ok(default),
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                Err((format!("outlier_detection.{field}"), "expected a non-negative duration".to_string()))
            }
            Some(d) => Ok(Duration::new(d.seconds.unsigned_abs(), d.nanos.unsigned_abs())),
        };
        let interval = dur(o.interval.as_ref(), "interval", DEFAULT_INTERVAL)?;
        if interval.is_zero() {
            return Err(("outlier_detection.interval".into(), "must be greater than 0".into()));
        }
        let max_pct = o.max_ejection_percent.map(|v| v.value).unwrap_or(DEFAULT_MAX_EJECTION_PERCENT);
        if max_pct > 100 {
            return Err(("outlier_detection.max_ejection_percent".into(), format!("{max_pct} is above 100")));
        }
        Ok(OutlierConfig {
            consecutive_5xx: enforced(
                o.consecutive_5xx.map(|v| v.value),
                o.enforcing_consecutive_5xx.map(|v| v.value),
                100,
            ),
            consecutive_gateway: enforced(
                o.consecutive_gateway_failure.map(|v| v.value),
                o.enforcing_consecutive_gateway_failure.map(|v| v.value),
                0,
            ),
            interval,
            base_ejection: dur(o.base_ejection_time.as_ref(), "base_ejection_time", DEFAULT_BASE_EJECTION)?,
            max_ejection: dur(o.max_ejection_time.as_ref(), "max_ejection_time", DEFAULT_MAX_EJECTION)?,
            max_ejection_percent: max_pct,
        })
    }

    /// Whether one more ejection is allowed with `active` of `total` endpoints ejected.
    pub(crate) fn may_eject(&self, active: usize, total: usize) -> bool {
        active == 0 || (active + 1) * 100 <= self.max_ejection_percent as usize * total
    }
}

impl Outcome {
    /// The outcome of an attempt that failed before a response (None: not the
    /// endpoint's fault, e.g. an overflow or the client going away).
    pub fn of_error(kind: ErrorKind) -> Option<Outcome> {
        match kind {
            ErrorKind::ConnectFailure
            | ErrorKind::UpstreamReset
            | ErrorKind::RefusedStream
            | ErrorKind::UpstreamTerminated
            | ErrorKind::Timeout
            | ErrorKind::PerTryTimeout
            | ErrorKind::UpstreamProtocol => Some(Outcome::LocalFailure),
            _ => None,
        }
    }

    /// The outcome of a response status.
    pub fn of_status(status: u16) -> Outcome {
        if status >= 500 {
            Outcome::Status(status)
        } else {
            Outcome::Success
        }
    }
}

impl OutlierState {
    /// Counts an outcome; says whether a threshold was just reached.
    pub(crate) fn record(&self, cfg: &OutlierConfig, outcome: Outcome) -> Verdict {
        let (five, gateway) = match outcome {
            Outcome::Success => {
                self.consecutive_5xx.store(0, Ordering::Relaxed);
                self.consecutive_gateway.store(0, Ordering::Relaxed);
                return Verdict::Keep;
            }
            Outcome::Status(s) => (true, matches!(s, 502..=504)),
            Outcome::LocalFailure => (true, true),
        };
        let bump = |c: &AtomicU32, counts: bool| if counts { c.fetch_add(1, Ordering::Relaxed) + 1 } else { 0 };
        let n5 = bump(&self.consecutive_5xx, five);
        let ng = if gateway {
            bump(&self.consecutive_gateway, true)
        } else {
            self.consecutive_gateway.store(0, Ordering::Relaxed);
            0
        };
        let hit5 = cfg.consecutive_5xx.is_some_and(|t| n5 == t);
        let hitg = cfg.consecutive_gateway.is_some_and(|t| ng == t);
        if hit5 || hitg {
            Verdict::Eject
        } else {
            Verdict::Keep
        }
    }

    /// Ejects the endpoint now (`now_ms` since the load's epoch).
    pub(crate) fn eject(&self, cfg: &OutlierConfig, now_ms: u64) {
        let interval_ms = cfg.interval.as_millis().max(1) as u64;
        let since = now_ms.saturating_sub(self.multiplier_at_ms.load(Ordering::Relaxed));
        let decayed = u32::try_from(since / interval_ms).unwrap_or(u32::MAX);
        let n = self.ejections.load(Ordering::Relaxed).saturating_sub(decayed) + 1;
        self.ejections.store(n, Ordering::Relaxed);
        let cap = cfg.max_ejection.max(cfg.base_ejection);
        let time = cfg.base_ejection.saturating_mul(n).min(cap);
        let until = now_ms + time.as_millis() as u64;
        self.multiplier_at_ms.store(until, Ordering::Relaxed);
        self.ejected_until_ms.store(until.max(1), Ordering::Release);
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
    }

    /// Whether the endpoint is ejected at `now_ms`.
    pub(crate) fn is_ejected(&self, now_ms: u64) -> bool {
        now_ms < self.ejected_until_ms.load(Ordering::Acquire)
    }

    /// When the current ejection ends (ms since the epoch; 0 if never ejected).
    pub(crate) fn ejected_until(&self) -> u64 {
        self.ejected_until_ms.load(Ordering::Acquire)
    }
}

/// Milliseconds since the first call in this process: the clock of ejections.
pub(crate) fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};

    fn cfg() -> OutlierConfig {
        OutlierConfig::compile(&OutlierDetection {
            consecutive_5xx: Some(UInt32Value { value: 3 }),
            base_ejection_time: Some(PbDuration { seconds: 10, nanos: 0 }),
            interval: Some(PbDuration { seconds: 1, nanos: 0 }),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn envoy_defaults_enforce_5xx_but_not_gateway_errors() {
        let c = OutlierConfig::compile(&OutlierDetection::default()).unwrap();
        assert_eq!(c.consecutive_5xx, Some(5));
        assert_eq!(c.consecutive_gateway, None);
        assert_eq!(c.base_ejection, Duration::from_secs(30));
        assert_eq!(c.max_ejection_percent, 10);
        let off = OutlierDetection { enforcing_consecutive_5xx: Some(UInt32Value { value: 0 }), ..Default::default() };
        assert_eq!(OutlierConfig::compile(&off).unwrap().consecutive_5xx, None);
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let c = cfg();
        let s = OutlierState::default();
        assert_eq!(s.record(&c, Outcome::Status(500)), Verdict::Keep);
        assert_eq!(s.record(&c, Outcome::LocalFailure), Verdict::Keep);
        assert_eq!(s.record(&c, Outcome::Success), Verdict::Keep);
        assert_eq!(s.record(&c, Outcome::Status(503)), Verdict::Keep);
        assert_eq!(s.record(&c, Outcome::Status(500)), Verdict::Keep);
        assert_eq!(s.record(&c, Outcome::Status(502)), Verdict::Eject);
    }

    #[test]
    fn ejection_time_grows_with_repeated_ejections_and_decays_per_interval() {
        let c = cfg();
        let s = OutlierState::default();
        s.eject(&c, 1_000);
        assert!(s.is_ejected(1_000) && s.is_ejected(10_999) && !s.is_ejected(11_000));
        // Ejected again right after coming back: twice the base time.
        s.eject(&c, 11_000);
        assert_eq!(s.ejected_until(), 31_000);
        // After a long healthy stretch the multiplier has decayed back to one.
        s.eject(&c, 1_000_000);
        assert_eq!(s.ejected_until(), 1_010_000);
    }

    #[test]
    fn max_ejection_percent_leaves_at_least_one_ejectable() {
        let c = cfg(); // 10%
        assert!(c.may_eject(0, 3));
        assert!(!c.may_eject(1, 3));
        assert!(c.may_eject(1, 20));
        assert!(!c.may_eject(2, 20));
    }
}
