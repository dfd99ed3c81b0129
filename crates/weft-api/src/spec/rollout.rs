//! `weft.dev/v1alpha1` `Rollout`: a canary of one service driven by the control plane.
//! Traffic moves from the stable subset to the canary subset (DestinationRule subsets)
//! step by step while the canary's own metrics pass the analysis; it rolls back on its
//! own when they fail. Field names follow Flagger's `Canary` where they mean the same
//! thing, in Istio's camelCase. See docs/rollouts.md.

use serde::{Deserialize, Serialize};

use super::common::Duration;
use super::networking::HttpMatchRequest;

/// Label on the VirtualService a rollout writes: the rollout's name.
pub const ROLLOUT_LABEL: &str = "weft.dev/rollout";
/// Annotation on the VirtualService a rollout writes: `rollout` (weft owns it).
pub const MANAGED_BY_ANNOTATION: &str = "weft.dev/managed-by";
/// Annotation asking for a staged (canary) rollout of a configuration change on
/// `weft apply` (`"true"`), as `weft apply --staged` does.
pub const STAGED_ANNOTATION: &str = "weft.dev/staged";

/// `weft.dev/v1alpha1` `Rollout`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rollout {
    /// The service host (`reviews`, `reviews.default.svc.cluster.local`): the host of the
    /// VirtualService the rollout writes.
    pub host: String,
    /// The subset serving now (a subset of the host's DestinationRule).
    pub stable: RolloutTarget,
    /// The new version's subset.
    pub canary: RolloutTarget,
    /// The steps, in order; the rollout is promoted after the last one passes.
    pub steps: Vec<RolloutStep>,
    /// When a step passes or fails.
    pub analysis: RolloutAnalysis,
}

/// A subset of the host's DestinationRule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutTarget {
    /// Subset name.
    pub subset: String,
    /// The `version` label of the subset's workloads, as the metrics report it
    /// (`destination_version`); absent: the subset's `version` label in the
    /// DestinationRule, else the subset's name.
    #[serde(default)]
    pub version: Option<String>,
}

/// One step: live traffic by weight, a header-matched (A/B) share, or a mirror (no
/// live traffic), held at least `pause` while the analysis passes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutStep {
    /// Percentage of live requests sent to the canary (0..=100).
    #[serde(default)]
    pub weight: Option<u32>,
    /// A/B: only requests matching one of these go to the canary (Istio's
    /// `HTTPMatchRequest`), all others to stable.
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    /// Mirroring: this percentage of requests is copied to the canary, whose answers
    /// are dropped; every caller is still served by stable.
    #[serde(default)]
    pub mirror: Option<f64>,
    /// How long the step lasts at least (absent: one passing interval).
    #[serde(default)]
    pub pause: Option<Duration>,
}

/// The analysis run every `interval` on the canary's requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutAnalysis {
    /// How often the canary is measured, over that much time.
    pub interval: Duration,
    /// Consecutive failed intervals before the rollout rolls back (default 1).
    #[serde(default)]
    pub failure_threshold: Option<u32>,
    /// Fewest requests an interval needs to judge (default 1): with fewer, the interval
    /// is inconclusive, neither a pass nor a failure.
    #[serde(default)]
    pub min_requests: Option<u64>,
    /// Share of non-5xx responses, in percent: `{min: 99}`.
    #[serde(default)]
    pub success_rate: Option<Threshold>,
    /// 99th percentile latency, in milliseconds: `{max: 500}`.
    #[serde(default)]
    pub latency_p99: Option<Threshold>,
    /// Budget of failed (5xx) canary requests over the whole rollout: once the canary
    /// has answered more, it rolls back at that interval, whatever `failureThreshold`.
    #[serde(default)]
    pub max_failed_requests: Option<u64>,
}

/// A bound (Flagger's `thresholdRange`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Threshold {
    /// Lowest passing value.
    #[serde(default)]
    pub min: Option<f64>,
    /// Highest passing value.
    #[serde(default)]
    pub max: Option<f64>,
}

/// What a step routes.
#[derive(Debug, Clone, PartialEq)]
pub enum StepTraffic {
    /// `weight` percent of live traffic to the canary.
    Weight(u32),
    /// Requests matching these to the canary.
    Match(Vec<HttpMatchRequest>),
    /// This percentage mirrored to the canary.
    Mirror(f64),
}

impl RolloutStep {
    /// What the step routes (validation guarantees exactly one is set; an empty step
    /// is weight 0).
    pub fn traffic(&self) -> StepTraffic {
        if let Some(m) = self.mirror {
            StepTraffic::Mirror(m)
        } else if !self.matches.is_empty() {
            StepTraffic::Match(self.matches.clone())
        } else {
            StepTraffic::Weight(self.weight.unwrap_or(0))
        }
    }
}

impl RolloutAnalysis {
    /// Consecutive failures that roll back.
    pub fn failure_threshold(&self) -> u32 {
        self.failure_threshold.unwrap_or(1).max(1)
    }

    /// Fewest requests for a conclusive interval.
    pub fn min_requests(&self) -> u64 {
        self.min_requests.unwrap_or(1).max(1)
    }
}
