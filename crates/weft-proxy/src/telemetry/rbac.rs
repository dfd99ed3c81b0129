//! Counters of the RBAC (authorization) filters, `weft_rbac_*`, one series per filter:
//! `stat_prefix` is the HTTP connection manager's (or network filter's) stat prefix,
//! `rules_prefix` the filter's `rules_stat_prefix` (enforced counters) or
//! `shadow_rules_stat_prefix` (shadow counters), `action` the rule set's action.

use std::fmt;

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::exposition::label;

/// Labels of the `weft_rbac_*` counters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RbacLabels {
    /// The chain's stat prefix.
    pub stat_prefix: String,
    /// `rules_stat_prefix` or `shadow_rules_stat_prefix`.
    pub rules_prefix: String,
    /// `ALLOW`, `DENY` or `LOG`.
    pub action: &'static str,
}

/// Which counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RbacCount {
    /// Enforced rules allowed the request (`weft_rbac_allowed_total`).
    Allowed,
    /// Enforced rules denied it (`weft_rbac_denied_total`).
    Denied,
    /// Shadow rules would have allowed it (`weft_rbac_shadow_allowed_total`).
    ShadowAllowed,
    /// Shadow rules would have denied it (`weft_rbac_shadow_denied_total`).
    ShadowDenied,
    /// A LOG policy matched (`weft_rbac_logged_total`).
    Logged,
    /// No LOG policy matched (`weft_rbac_not_logged_total`).
    NotLogged,
}

/// The `weft_rbac_*` families.
#[derive(Debug)]
pub struct RbacMetrics {
    families: [Family<RbacLabels, Counter>; 6],
}

impl EncodeLabelSet for RbacLabels {
    fn encode(&self, mut enc: LabelSetEncoder) -> fmt::Result {
        label(&mut enc, "stat_prefix", &self.stat_prefix)?;
        label(&mut enc, "rules_prefix", &self.rules_prefix)?;
        label(&mut enc, "action", self.action)
    }
}

impl RbacMetrics {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let m = RbacMetrics { families: Default::default() };
        let help = [
            ("weft_rbac_allowed", "Requests or connections allowed by an RBAC filter's enforced rules"),
            ("weft_rbac_denied", "Requests or connections denied by an RBAC filter's enforced rules"),
            ("weft_rbac_shadow_allowed", "Requests or connections the shadow (dry-run) rules would allow"),
            ("weft_rbac_shadow_denied", "Requests or connections the shadow (dry-run) rules would deny"),
            ("weft_rbac_logged", "Requests or connections a LOG (audit) policy matched"),
            ("weft_rbac_not_logged", "Requests or connections no LOG (audit) policy matched"),
        ];
        for ((name, text), family) in help.iter().zip(m.families.iter()) {
            registry.register(*name, *text, family.clone());
        }
        m
    }

    /// Counters registered nowhere: for evaluations that must not be counted (an open
    /// connection's policy checked again after a configuration change).
    pub fn detached() -> Self {
        RbacMetrics { families: Default::default() }
    }

    /// The counter `which` of the series `labels` (a handle: keep it, increments are cheap).
    pub fn counter(&self, which: RbacCount, labels: &RbacLabels) -> Counter {
        self.families[which as usize].get_or_create(labels).clone()
    }
}
