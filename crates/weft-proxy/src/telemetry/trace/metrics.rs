//! The tracer's own metrics: spans exported, spans dropped (and why), spans waiting.

use std::fmt;

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::telemetry::exposition::label;

/// `weft_tracing_spans_exported_total`, `weft_tracing_spans_dropped_total{reason}`,
/// `weft_tracing_queue_spans`.
#[derive(Debug, Default)]
pub struct TraceMetrics {
    exported: Counter,
    dropped: Family<DropLabels, Counter>,
    queue: Gauge,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DropLabels {
    reason: &'static str,
}

impl EncodeLabelSet for DropLabels {
    fn encode(&self, mut enc: LabelSetEncoder) -> fmt::Result {
        label(&mut enc, "reason", self.reason)
    }
}

impl TraceMetrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = TraceMetrics::default();
        registry.register("weft_tracing_spans_exported", "Spans accepted by the tracing collector", m.exported.clone());
        registry.register(
            "weft_tracing_spans_dropped",
            "Spans not exported, by reason: queue_full (the collector is slower than traffic), export_failed (connect error, timeout or error answer), no_collector (the provider's cluster has no endpoint), exporter_stopped",
            m.dropped.clone(),
        );
        registry.register("weft_tracing_queue_spans", "Finished spans waiting for export", m.queue.clone());
        m
    }

    /// Metrics that are not exposed (tests).
    pub fn detached() -> Self {
        TraceMetrics::default()
    }

    /// `n` spans went into the queue.
    pub fn queued(&self, n: i64) {
        self.queue.inc_by(n);
    }

    /// `n` spans left the queue.
    pub fn dequeued(&self, n: i64) {
        self.queue.dec_by(n);
    }

    /// `n` spans were dropped for `reason`.
    pub fn dropped(&self, reason: &'static str, n: u64) {
        self.dropped.get_or_create(&DropLabels { reason }).inc_by(n);
    }

    /// `n` spans were exported.
    pub fn exported(&self, n: u64) {
        self.exported.inc_by(n);
    }

    /// Spans dropped so far for `reason`.
    pub fn dropped_count(&self, reason: &'static str) -> u64 {
        self.dropped.get_or_create(&DropLabels { reason }).get()
    }

    /// Spans exported so far.
    pub fn exported_count(&self) -> u64 {
        self.exported.get()
    }

    /// Spans in the queue now.
    pub fn queue_len(&self) -> i64 {
        self.queue.get()
    }
}
