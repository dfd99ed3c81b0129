//! Connections closed because the configuration changed under them (see `conn.rs`).

use std::fmt;

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::exposition::label;

/// `weft_downstream_cx_drained_total{listener, reason}`.
#[derive(Debug)]
pub struct DrainMetrics {
    closed: Family<DrainLabels, Counter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DrainLabels {
    listener: String,
    reason: &'static str,
}

impl EncodeLabelSet for DrainLabels {
    fn encode(&self, mut enc: LabelSetEncoder) -> fmt::Result {
        label(&mut enc, "listener", &self.listener)?;
        label(&mut enc, "reason", self.reason)
    }
}

impl DrainMetrics {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let m = DrainMetrics { closed: Family::default() };
        registry.register(
            "weft_downstream_cx_drained",
            "Downstream connections drained (filter_chain_changed) or closed (rbac_denied) because a new configuration no longer applies to them in place",
            m.closed.clone(),
        );
        m
    }

    /// Counts a connection of `listener` ended by a configuration change, for `reason`
    /// (`filter_chain_changed` or `rbac_denied`).
    pub fn closed(&self, listener: &str, reason: &'static str) {
        self.closed.get_or_create(&DrainLabels { listener: listener.to_owned(), reason }).inc();
    }
}
