//! Tap relay (`weft tap`, `GET /api/v1/tap`): proxies keep a tap stream open to the
//! control plane on the xDS port ([`weft_xds::tap`]); an API request starts a tap on the
//! proxies of its target, and the events they send are relayed to it as
//! newline-delimited JSON ([`http`]). When the API client goes away, the tap is stopped
//! on every proxy.

pub mod http;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::{debug, info};
use weft_xds::tap::{TapCommand, TapEvent, TapFilter, TapHandler, TapUpdate};
use weft_xds::{AdsServer, Caller, StreamAdmission};

/// Events waiting for one API client; more are dropped and counted.
const SESSION_QUEUE: usize = 1024;
/// How long a new stream may take to name its proxy.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most tap streams kept (node ids are what the proxies say): more are refused.
const MAX_STREAMS: usize = 100_000;

/// Connected tap streams (by proxy node id) and the taps in progress.
pub struct TapRelay {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    /// Whose xDS streams a tap stream must match.
    server: AdsServer,
    /// The xDS streams' admission, applied to the tap stream's credential and the node
    /// its xDS stream announced.
    admission: Arc<dyn StreamAdmission>,
}

#[derive(Default)]
struct Inner {
    /// Node id -> (stream id, command sender) of its latest stream.
    proxies: HashMap<String, (u64, mpsc::Sender<Result<TapCommand, Status>>)>,
    /// Tap id -> where its events go.
    taps: HashMap<u64, Sink>,
}

struct Sink {
    events: mpsc::Sender<TapEvent>,
    dropped: Arc<AtomicU64>,
}

/// A tap in progress, stopped on every proxy when dropped.
pub struct TapSession {
    relay: Arc<TapRelay>,
    id: u64,
    /// Node ids of the proxies the tap was started on.
    pub proxies: Vec<String>,
    /// The matched requests.
    pub events: mpsc::Receiver<TapEvent>,
    /// Events dropped before reaching this session (proxy queues, the relay's queue).
    pub dropped: Arc<AtomicU64>,
}

impl TapRelay {
    /// A relay for the proxies of `server`, admitted by `admission`.
    pub fn new(server: AdsServer, admission: Arc<dyn StreamAdmission>) -> Self {
        TapRelay { inner: Mutex::default(), next_id: AtomicU64::new(0), server, admission }
    }

    /// Node ids with a tap stream open.
    pub fn connected(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().proxies.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Taps in progress.
    pub fn taps(&self) -> usize {
        self.lock().taps.len()
    }

    /// Starts a tap with `filter` on those of `nodes` that have a stream open.
    pub fn start(self: &Arc<Self>, nodes: &[String], filter: TapFilter) -> TapSession {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, events) = mpsc::channel(SESSION_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut inner = self.lock();
        inner.taps.insert(id, Sink { events: tx, dropped: dropped.clone() });
        let mut proxies = Vec::new();
        for node in nodes {
            if let Some((_, commands)) = inner.proxies.get(node) {
                let cmd = TapCommand { tap_id: id, start: Some(filter.clone()) };
                if commands.try_send(Ok(cmd)).is_ok() {
                    proxies.push(node.clone());
                }
            }
        }
        drop(inner);
        info!(tap = id, proxies = proxies.len(), "tap started");
        TapSession { relay: self.clone(), id, proxies, events, dropped }
    }

    fn stop(&self, id: u64, nodes: &[String]) {
        let mut inner = self.lock();
        inner.taps.remove(&id);
        for node in nodes {
            if let Some((_, commands)) = inner.proxies.get(node) {
                // A full command queue means a stuck stream: it ends, and the proxy
                // clears its taps with it.
                let _ = commands.try_send(Ok(TapCommand { tap_id: id, start: None }));
            }
        }
        drop(inner);
        info!(tap = id, "tap stopped");
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn deliver(&self, event: TapEvent, proxy_dropped: u64) {
        let inner = self.lock();
        let Some(sink) = inner.taps.get(&event.tap_id) else { return };
        if proxy_dropped > 0 {
            sink.dropped.fetch_add(proxy_dropped, Ordering::Relaxed);
        }
        if sink.events.try_send(event).is_err() {
            sink.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The stream of the proxy `node_id` names may be this caller's: the node has an
    /// admitted xDS stream, and the caller's credential passes the same admission for
    /// the node that stream announced.
    async fn admit(&self, node_id: &str, caller: &Caller) -> Result<(), Status> {
        let Some(conn) = self.server.connections().into_iter().find(|c| c.node_id == node_id) else {
            return Err(Status::failed_precondition(format!(
                "node {node_id} has no xDS stream: a proxy opens its tap stream after its xDS stream"
            )));
        };
        self.admission.admit(&conn.raw_node, caller).await.map(|_| ())
    }

    async fn serve(
        self: Arc<Self>,
        caller: Caller,
        mut updates: Streaming<TapUpdate>,
        commands: mpsc::Sender<Result<TapCommand, Status>>,
    ) {
        let hello = tokio::time::timeout(HELLO_TIMEOUT, updates.message()).await;
        let node_id = match hello {
            Ok(Ok(Some(u))) if !u.node_id.is_empty() => u.node_id,
            _ => {
                let _ = commands.send(Err(Status::invalid_argument("the first tap update must name the node"))).await;
                return;
            }
        };
        if let Err(status) = self.admit(&node_id, &caller).await {
            debug!(node = %node_id, error = %status.message(), "tap stream refused");
            let _ = commands.send(Err(status)).await;
            return;
        }
        let stream = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let refused = {
            let mut inner = self.lock();
            if inner.proxies.len() >= MAX_STREAMS && !inner.proxies.contains_key(&node_id) {
                Some(commands)
            } else {
                inner.proxies.insert(node_id.clone(), (stream, commands));
                None
            }
        };
        if let Some(commands) = refused {
            let _ = commands.send(Err(Status::resource_exhausted("too many tap streams"))).await;
            return;
        }
        debug!(node = %node_id, "tap stream open");
        while let Ok(Some(update)) = updates.message().await {
            if let Some(event) = update.event {
                self.deliver(event, update.dropped);
            }
        }
        let mut inner = self.lock();
        if inner.proxies.get(&node_id).is_some_and(|(s, _)| *s == stream) {
            inner.proxies.remove(&node_id);
        }
        debug!(node = %node_id, "tap stream closed");
    }
}

/// The handler mounted on the xDS port.
pub struct RelayHandler(pub Arc<TapRelay>);

impl TapHandler for RelayHandler {
    fn open(&self, caller: Caller, updates: Streaming<TapUpdate>) -> ReceiverStream<Result<TapCommand, Status>> {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(self.0.clone().serve(caller, updates, tx));
        ReceiverStream::new(rx)
    }
}

impl Drop for TapSession {
    fn drop(&mut self) {
        self.relay.stop(self.id, &self.proxies);
    }
}

/// The gRPC service to mount on the xDS port.
pub fn service(relay: &Arc<TapRelay>) -> weft_xds::tap::TapServer<RelayHandler> {
    weft_xds::tap::TapServer::new(Arc::new(RelayHandler(relay.clone())))
}
