//! What every connection handler shares: the config store, upstream pools, telemetry,
//! the local workload's identity, and the drain signal.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::cluster::Pools;
use crate::config::ProxyStore;
use crate::io::WakeGated;
use crate::telemetry::accesslog::AccessLog;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::WorkloadInfo;

/// Shared state of one proxy process.
pub struct Context {
    /// Compiled configuration.
    pub store: Arc<ProxyStore>,
    /// Upstream connection pools.
    pub pools: Pools,
    /// Istio-style metrics.
    pub metrics: Arc<Metrics>,
    /// Access log writer.
    pub access_log: AccessLog,
    /// Who this proxy runs beside, with its SPIFFE id (the side of an mTLS hop).
    pub local: Arc<WorkloadInfo>,
    /// `local` with the principal `unknown` (the side of a plaintext hop).
    pub local_plain: Arc<WorkloadInfo>,
    /// The `destination_service*` labels inbound traffic no service metadata names:
    /// the local canonical service in the local namespace (as Istio reports it).
    pub local_service: Arc<crate::telemetry::ServiceInfo>,
    /// `local` and the node id, encoded once for the peer-metadata headers.
    pub local_peer: crate::telemetry::peer::LocalPeer,
    /// Peers' metadata, decoded once per distinct header value.
    pub peers: crate::telemetry::peer::DecodeCache,
    /// Labels for a peer that sent no metadata.
    pub unknown_peer: Arc<WorkloadInfo>,
    /// `destination_service*` labels of a destination no service is known for.
    pub unknown_service: Arc<crate::telemetry::ServiceInfo>,
    /// Destination-service labels, built once per cluster (or authority).
    pub services: crate::telemetry::services::ServiceCache,
    /// Flips to true when the proxy starts draining.
    pub draining: watch::Receiver<bool>,
    /// How long a drain waits for in-flight work.
    pub drain_timeout: Duration,
    /// How long a connection whose filter chain changed under it may finish its work
    /// before it is closed (Istio's `drainDuration`).
    pub drain_duration: Duration,
    /// Connections currently open (all listeners).
    pub active_connections: AtomicUsize,
    /// Distributed tracing: the node's span attributes and the export queue.
    pub tracer: crate::telemetry::trace::Tracer,
    /// Live taps (`weft tap`); idle, one relaxed load per request.
    pub tap: Arc<crate::telemetry::tap::TapHub>,
}

impl Context {
    /// True once draining has started.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Counts a connection for as long as the guard lives.
    pub fn track_connection(self: &Arc<Self>) -> ConnectionGuard {
        self.active_connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self.clone())
    }
}

/// Resolves once `rx` holds `true` (or its sender is gone): the drain watcher a
/// connection selects on for its whole life. Polled again only when the watch woke it
/// ([`WakeGated`]), not at every wake-up of the connection's task (~0.6k instructions
/// per request per sidecar: bench/notes.md, wip-scan). Boxes once per call: a loop that
/// builds a new watcher each turn takes [`flipped_each_turn`].
pub fn flipped(rx: &mut watch::Receiver<bool>) -> WakeGated<impl Future<Output = ()> + Send + '_> {
    WakeGated::new(flipped_each_turn(rx))
}

/// [`flipped`] without the gate (and its allocation), for a `select!` in a loop that
/// builds a new watcher each turn (an accept loop).
pub async fn flipped_each_turn(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Decrements the active connection count on drop.
pub struct ConnectionGuard(Arc<Context>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.active_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::task::{Context as TaskContext, Poll, Waker};

    /// The gate must let the watch's own wake-up through: a drain reaches a connection
    /// whose watcher was already pending, and a flip before the first poll is seen.
    #[tokio::test]
    async fn flipped_resolves_when_the_watch_flips_after_a_pending_poll() {
        let (tx, mut rx) = watch::channel(false);
        let mut watcher = Box::pin(flipped(&mut rx));
        let mut cx = TaskContext::from_waker(Waker::noop());
        assert!(watcher.as_mut().poll(&mut cx).is_pending());
        // Polled again without a wake-up of its own: the gate holds it back.
        assert!(watcher.as_mut().poll(&mut cx).is_pending());
        tx.send_replace(true);
        assert_eq!(watcher.as_mut().poll(&mut cx), Poll::Ready(()));

        let (tx, mut rx) = watch::channel(false);
        tx.send_replace(true);
        assert_eq!(Box::pin(flipped(&mut rx)).as_mut().poll(&mut cx), Poll::Ready(()));
    }
}
