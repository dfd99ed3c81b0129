//! Tap (`weft tap`): live events of the requests an operator asked to see, sent to the
//! control plane over a stream this proxy dials ([`weft_xds::tap`]).
//!
//! While no one taps, the request path pays one relaxed atomic load
//! ([`TapHub::is_active`]). While someone does, a finished request is matched against
//! the taps' filters (behind an `ArcSwap`) and, for each match, an event is put on a
//! bounded queue with `try_send`: a full queue drops the event and counts it. Events
//! carry no header values.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;
use weft_xds::tap::{TapCommand, TapEvent, TapFilter, TapUpdate};
use weft_xds::{Backoff, XdsTransport};

/// Events waiting to be sent to the control plane; more are dropped.
pub const QUEUE_CAPACITY: usize = 1024;

/// The request facts a filter is matched against.
pub struct TapView<'a> {
    /// `inbound` or `outbound`.
    pub direction: &'a str,
    /// Method.
    pub method: &'a str,
    /// Authority.
    pub authority: &'a str,
    /// Path, without the query string.
    pub path: &'a str,
    /// Response status.
    pub status: u16,
}

/// The taps in force on this proxy and the queue their events leave through.
pub struct TapHub {
    active: AtomicUsize,
    taps: ArcSwap<Vec<(u64, TapFilter)>>,
    queue: mpsc::Sender<TapEvent>,
    receiver: Mutex<Option<mpsc::Receiver<TapEvent>>>,
    /// Dropped since the last update sent (reported to the control plane).
    dropped: AtomicU64,
    active_gauge: Gauge,
    dropped_total: Counter,
}

impl TapHub {
    /// A hub with no taps; `metrics` are `weft_tap_active` and `weft_tap_dropped`.
    pub fn new(capacity: usize, metrics: (Gauge, Counter)) -> Self {
        let (queue, receiver) = mpsc::channel(capacity.max(1));
        TapHub {
            active: AtomicUsize::new(0),
            taps: ArcSwap::from_pointee(Vec::new()),
            queue,
            receiver: Mutex::new(Some(receiver)),
            dropped: AtomicU64::new(0),
            active_gauge: metrics.0,
            dropped_total: metrics.1,
        }
    }

    /// True while at least one tap is in force: the only tap work on the request path
    /// when none is.
    #[inline]
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed) != 0
    }

    /// Taps in force.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Applies a command from the control plane.
    pub fn apply(&self, cmd: TapCommand) {
        let id = cmd.tap_id;
        self.taps.rcu(|taps| {
            let mut next: Vec<(u64, TapFilter)> = taps.iter().filter(|(t, _)| *t != id).cloned().collect();
            if let Some(f) = &cmd.start {
                next.push((id, f.clone()));
            }
            next
        });
        self.publish_count();
    }

    /// Ends every tap (the stream to the control plane closed).
    pub fn clear(&self) {
        self.taps.store(Arc::new(Vec::new()));
        self.publish_count();
    }

    fn publish_count(&self) {
        let n = self.taps.load().len();
        self.active.store(n, Ordering::Relaxed);
        self.active_gauge.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Offers a finished request: for each tap whose filter matches `view`, the event
    /// `build` makes is queued (or dropped and counted when the queue is full).
    pub fn offer(&self, view: &TapView<'_>, build: impl FnOnce() -> TapEvent) {
        let taps = self.taps.load();
        let mut matched = taps.iter().filter(|(_, f)| matches(f, view)).map(|(id, _)| *id).peekable();
        if matched.peek().is_none() {
            return;
        }
        let event = build();
        for id in matched {
            if self.queue.try_send(TapEvent { tap_id: id, ..event.clone() }).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.dropped_total.inc();
            }
        }
    }

    /// The receiving end of the queue (once).
    fn take_receiver(&self) -> Option<mpsc::Receiver<TapEvent>> {
        self.receiver.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// True when `view` passes every condition `f` sets.
pub fn matches(f: &TapFilter, view: &TapView<'_>) -> bool {
    (f.direction.is_empty() || f.direction == view.direction)
        && (f.method.is_empty() || f.method.eq_ignore_ascii_case(view.method))
        && (f.authority.is_empty() || f.authority.eq_ignore_ascii_case(view.authority))
        && (f.path_prefix.is_empty() || view.path.starts_with(&f.path_prefix))
        && (f.status == 0 || f.status == u32::from(view.status))
}

/// Keeps the tap stream to the control plane at `address` (several replicas separated
/// by commas: one at a time, the next after each failure) open (reconnecting with
/// backoff) until `stop`: applies its commands to `hub` and sends the queued events.
/// Every tap ends when the stream does.
pub async fn run(
    hub: Arc<TapHub>,
    address: String,
    node_id: String,
    transport: Option<Arc<dyn XdsTransport>>,
    stop: impl Future<Output = ()>,
) {
    let Some(mut events) = hub.take_receiver() else { return };
    tokio::pin!(stop);
    let backoff = Backoff::default();
    let mut attempt = 0u32;
    // Several control-plane replicas (`a,b,c`): each reconnect tries the next one.
    let addresses: Vec<String> =
        address.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_string).collect();
    let mut tries = 0usize;
    loop {
        let address = addresses.get(tries % addresses.len().max(1)).cloned().unwrap_or_else(|| address.clone());
        tries = tries.wrapping_add(1);
        let session = serve_stream(&hub, &address, &node_id, transport.as_deref(), &mut events, &mut attempt);
        tokio::select! {
            _ = &mut stop => {
                hub.clear();
                return;
            }
            r = session => {
                hub.clear();
                // A control plane without the tap service: ask again rarely.
                let delay = match r {
                    Err(tonic::Code::Unimplemented) => Duration::from_secs(60),
                    _ => backoff.delay(attempt),
                };
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// One stream: returns when it ends (the code when it could not be opened).
async fn serve_stream(
    hub: &TapHub,
    address: &str,
    node_id: &str,
    transport: Option<&dyn XdsTransport>,
    events: &mut mpsc::Receiver<TapEvent>,
    attempt: &mut u32,
) -> Result<(), tonic::Code> {
    // As the xDS client: an `https://` address is the transport's TLS to do.
    let address = match (transport.is_some(), address.strip_prefix("https://")) {
        (true, Some(rest)) => format!("http://{rest}"),
        _ => address.to_string(),
    };
    let endpoint = tonic::transport::Endpoint::from_shared(address)
        .map_err(|_| tonic::Code::InvalidArgument)?
        .connect_timeout(Duration::from_secs(5));
    let channel = match transport {
        Some(t) => t.connect(endpoint).await,
        None => endpoint.connect().await.map_err(|e| e.to_string()),
    }
    .map_err(|_| tonic::Code::Unavailable)?;
    let authorization = transport.and_then(|t| t.authorization());
    let (tx, rx) = mpsc::channel(16);
    let hello = TapUpdate { node_id: node_id.to_string(), ..TapUpdate::default() };
    tx.send(hello).await.map_err(|_| tonic::Code::Unavailable)?;
    let mut commands =
        weft_xds::tap::open(channel, authorization, ReceiverStream::new(rx)).await.map_err(|s| s.code())?;
    *attempt = 0;
    // Events queued while no stream was open belong to taps that ended with it.
    while events.try_recv().is_ok() {}
    loop {
        tokio::select! {
            cmd = commands.message() => match cmd {
                Ok(Some(cmd)) => {
                    debug!(tap = cmd.tap_id, start = cmd.start.is_some(), "tap command");
                    hub.apply(cmd);
                }
                _ => return Ok(()),
            },
            Some(event) = events.recv() => {
                let dropped = hub.dropped.swap(0, Ordering::Relaxed);
                if tx.send(TapUpdate { event: Some(event), dropped, ..TapUpdate::default() }).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(status: u16) -> TapView<'static> {
        TapView { direction: "inbound", method: "GET", authority: "reviews:9080", path: "/reviews/1", status }
    }

    #[test]
    fn filters_match_each_condition() {
        let all = TapFilter::default();
        assert!(matches(&all, &view(200)));
        let f = TapFilter { path_prefix: "/reviews".into(), method: "get".into(), status: 200, ..all.clone() };
        assert!(matches(&f, &view(200)));
        assert!(!matches(&f, &view(500)));
        assert!(!matches(&TapFilter { direction: "outbound".into(), ..all.clone() }, &view(200)));
        assert!(!matches(&TapFilter { path_prefix: "/ratings".into(), ..all.clone() }, &view(200)));
        assert!(!matches(&TapFilter { authority: "ratings:9080".into(), ..all }, &view(200)));
    }

    #[test]
    fn full_queue_drops_and_counts() {
        let hub = TapHub::new(1, (Gauge::default(), Counter::default()));
        assert!(!hub.is_active());
        hub.apply(TapCommand { tap_id: 7, start: Some(TapFilter::default()) });
        assert_eq!(hub.active(), 1);
        for _ in 0..3 {
            hub.offer(&view(200), TapEvent::default);
        }
        assert_eq!(hub.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(hub.dropped_total.get(), 2);
        hub.apply(TapCommand { tap_id: 7, start: None });
        assert!(!hub.is_active());
        assert_eq!(hub.active_gauge.get(), 0);
    }
}
