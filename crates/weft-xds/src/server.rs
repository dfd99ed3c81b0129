//! In-memory ADS server: serves a [`XdsSource`] over SotW and delta ADS and keeps,
//! per connection, what was sent, ACKed and NACKed.
//!
//! Each stream is one task owning its per-type state; it wakes on a request from the
//! proxy, on [`XdsSource::changes`], or on server shutdown. `stream` runs that loop
//! and the bookkeeping both variants share; `sotw` and `delta` hold what differs.

mod delta;
mod sotw;
mod stream;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use crate::node::NodeInfo;
use crate::source::XdsSource;
use crate::{XdsError, XdsMode};

/// Largest message the server accepts or sends.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Responses buffered per stream before the stream task waits for the peer.
const RESPONSE_BUFFER: usize = 16;

/// ADS server over a [`XdsSource`]. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct AdsServer {
    shared: Arc<Shared>,
}

/// The tonic service of an [`AdsServer`], to mount in a larger tonic server.
#[derive(Clone)]
pub struct AdsService {
    shared: Arc<Shared>,
}

/// One open ADS stream as the server sees it.
#[derive(Clone, Debug)]
pub struct ConnectionStatus {
    /// Server-local id of the stream.
    pub id: u64,
    /// `node.id` of the first request.
    pub node_id: String,
    /// The node's identity, if its metadata parses.
    pub node: Option<NodeInfo>,
    /// Why the metadata did not parse.
    pub node_error: Option<String>,
    /// The node exactly as the peer sent it (for metadata beyond [`NodeInfo`]); shared,
    /// so copying every connection's status (the API, the proxy-state publisher) does not
    /// copy each node's metadata.
    pub raw_node: Arc<Node>,
    /// Peer address, if known.
    pub peer: Option<SocketAddr>,
    /// When the stream opened.
    pub connected_since: SystemTime,
    /// SotW or delta.
    pub mode: XdsMode,
    /// Per type URL.
    pub types: BTreeMap<String, TypeStatus>,
    /// Bumped by every change of `types`: a reader that kept what it built from a
    /// connection (the proxy-state publisher) rebuilds it only when this moved.
    pub revision: u64,
}

/// Per-type state of one connection.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TypeStatus {
    /// Version of the last response sent.
    pub sent_version: Option<String>,
    /// Nonce of the last response sent.
    pub sent_nonce: Option<String>,
    /// Last version the peer ACKed.
    pub acked_version: Option<String>,
    /// When the last ACK arrived (the age of the config the peer runs).
    pub acked_at: Option<SystemTime>,
    /// Last NACK received.
    pub last_nack: Option<NackInfo>,
    /// The source's version of this type for this node when the stream last looked (on
    /// each source change and request): what `acked_version` is compared with to tell
    /// SYNCED from STALE without asking the source again for every connection.
    pub current_version: Option<String>,
}

/// A rejected response.
#[derive(Clone, Debug, PartialEq)]
pub struct NackInfo {
    /// Version that was rejected.
    pub version: String,
    /// Nonce of the rejected response.
    pub nonce: String,
    /// The peer's error detail.
    pub error: String,
}

/// What an [`AdsServer`] reports as it serves, for metrics. Called on the stream tasks
/// after the fact: implementations keep it cheap (atomics) and never block.
pub trait XdsObserver: Send + Sync + 'static {
    /// A response of `type_url` went out: `push_time` from starting to build it to
    /// handing it to the stream; `convergence` from the moment the stream saw the source
    /// change that called for it to that hand-over (None for a response to a request).
    fn pushed(&self, type_url: &str, push_time: Duration, convergence: Option<Duration>) {
        let _ = (type_url, push_time, convergence);
    }

    /// The peer rejected (NACKed) a response of `type_url`.
    fn rejected(&self, type_url: &str) {
        let _ = type_url;
    }
}

/// Who may open a stream, decided on its first request (before the node registers).
///
/// The control plane binds a node's claimed identity (its metadata) to the credential
/// the caller proved (a verified client certificate, a bearer token); a refused stream
/// ends with the returned status and never appears in [`AdsServer::connections`].
pub trait StreamAdmission: Send + Sync + 'static {
    /// Decides on `node` opening a stream with `caller`'s credentials: `Ok` with the
    /// peer address to record (the transport's, or one the admission learned, e.g. from
    /// a TLS listener's connection info) or the status the peer gets.
    fn admit<'a>(&'a self, node: &'a Node, caller: &'a Caller) -> AdmitFuture<'a>;
}

/// What [`StreamAdmission::admit`] answers with (a future: verifying a credential may
/// ask another server, e.g. Kubernetes' TokenReview).
pub type AdmitFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<SocketAddr>, Status>> + Send + 'a>>;

/// What a stream's caller presented: the gRPC request metadata and extensions (a TLS
/// listener puts its connection info there), and the transport's peer address.
pub struct Caller {
    /// The peer address tonic knows (plain TCP listeners).
    pub remote_addr: Option<SocketAddr>,
    /// The request's metadata (`authorization`).
    pub metadata: tonic::metadata::MetadataMap,
    /// The request's extensions (connection info of custom listeners).
    pub extensions: tonic::Extensions,
}

/// The observer of a server nobody observes.
struct Unobserved;

impl XdsObserver for Unobserved {}

struct Shared {
    source: Arc<dyn XdsSource>,
    observer: Arc<dyn XdsObserver>,
    admission: Option<Arc<dyn StreamAdmission>>,
    connections: Mutex<BTreeMap<u64, ConnectionStatus>>,
    changes: watch::Sender<u64>,
    /// Bumped only when a stream opens or closes.
    membership: watch::Sender<u64>,
    stop: watch::Sender<bool>,
    next_id: AtomicU64,
}

/// Keeps a connection listed while its stream task lives.
struct Registration {
    shared: Arc<Shared>,
    id: u64,
    node: Node,
}

impl AdsServer {
    /// A server for `source`.
    pub fn new(source: Arc<dyn XdsSource>) -> Self {
        Self::observed(source, Arc::new(Unobserved))
    }

    /// A server for `source` that reports its pushes and NACKs to `observer`.
    pub fn observed(source: Arc<dyn XdsSource>, observer: Arc<dyn XdsObserver>) -> Self {
        Self::admitting(source, observer, None)
    }

    /// A server for `source`, reporting to `observer`, whose streams `admission` lets in
    /// (None: every stream with a node id).
    pub fn admitting(
        source: Arc<dyn XdsSource>,
        observer: Arc<dyn XdsObserver>,
        admission: Option<Arc<dyn StreamAdmission>>,
    ) -> Self {
        AdsServer {
            shared: Arc::new(Shared {
                source,
                observer,
                admission,
                connections: Mutex::new(BTreeMap::new()),
                changes: watch::channel(0).0,
                membership: watch::channel(0).0,
                stop: watch::channel(false).0,
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// The gRPC service, to mount in a larger tonic server.
    pub fn service(&self) -> AggregatedDiscoveryServiceServer<AdsService> {
        AggregatedDiscoveryServiceServer::new(AdsService { shared: self.shared.clone() })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Serves ADS on `listener` until `shutdown` resolves; then ends every open stream
    /// (clients see the stream close and reconnect elsewhere) and returns.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), XdsError> {
        self.serve_with(listener, shutdown, tonic::service::Routes::default()).await
    }

    /// Like [`AdsServer::serve`], with more gRPC services on the same port (the control
    /// plane's certificate service rides on the xDS port, as in Istio).
    pub async fn serve_with(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()>,
        routes: tonic::service::Routes,
    ) -> Result<(), XdsError> {
        // Small xDS and certificate answers must not wait for delayed ACKs (Nagle):
        // tonic sets TCP_NODELAY only on sockets it binds itself.
        self.serve_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown, routes).await
    }

    /// Like [`AdsServer::serve_with`], on connections from `incoming` (a TLS listener's
    /// handshaken streams: their [`tonic::transport::server::Connected`] info reaches the
    /// [`StreamAdmission`] in the request extensions).
    pub async fn serve_incoming<S, IO, E>(
        self,
        incoming: S,
        shutdown: impl Future<Output = ()>,
        routes: tonic::service::Routes,
    ) -> Result<(), XdsError>
    where
        S: tokio_stream::Stream<Item = Result<IO, E>> + Send + 'static,
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + tonic::transport::server::Connected + Unpin + Send + 'static,
        IO::ConnectInfo: Clone + Send + Sync + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let shared = self.shared.clone();
        let signal = async move {
            shutdown.await;
            shared.stop.send_replace(true);
        };
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_routes(routes.add_service(self.service()))
            .serve_with_incoming_shutdown(incoming, signal)
            .await?;
        Ok(())
    }

    /// Open connections.
    pub fn connections(&self) -> Vec<ConnectionStatus> {
        self.shared.lock().values().cloned().collect()
    }

    /// Calls `f` with every open connection, without copying their status (the
    /// proxy-state publisher reads a few fields of thousands). It runs under the lock the
    /// stream tasks take to record each send and reply: `f` must be quick (no I/O, no
    /// waiting, no call back into this server).
    pub fn for_each_connection(&self, mut f: impl FnMut(&ConnectionStatus)) {
        for c in self.shared.lock().values() {
            f(c);
        }
    }

    /// Number of open connections (without copying their status).
    pub fn connection_count(&self) -> usize {
        self.shared.lock().len()
    }

    /// Bumps on every ACK/NACK/send/connect/disconnect.
    pub fn status_changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Bumps only when a stream opens or closes (not on its sends, ACKs and NACKs): what
    /// follows the set of connected proxies (the registry) wakes once per arrival or
    /// departure instead of once per ACK of a push to every proxy.
    pub fn membership_changes(&self) -> watch::Receiver<u64> {
        self.shared.membership.subscribe()
    }

    /// Waits until a connection of `node_id` has ACKed `version` of `type_url`.
    pub async fn wait_acked(
        &self,
        node_id: &str,
        type_url: &str,
        version: &str,
        timeout: Duration,
    ) -> Result<(), XdsError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.status_changes();
        loop {
            let acked = self.shared.lock().values().any(|c| {
                c.node_id == node_id && c.types.get(type_url).and_then(|t| t.acked_version.as_deref()) == Some(version)
            });
            if acked {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(XdsError::Closed("server dropped".to_string())),
                Err(_) => {
                    return Err(XdsError::Timeout {
                        node_id: node_id.to_string(),
                        type_url: type_url.to_string(),
                        version: version.to_string(),
                        timeout,
                    })
                }
            }
        }
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(self.open::<sotw::Sotw>(request))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(self.open::<delta::Delta>(request))
    }
}

impl AdsService {
    /// Starts the task serving one stream; its responses are the gRPC response stream.
    fn open<V: stream::Variant>(
        &self,
        request: Request<Streaming<V::Request>>,
    ) -> Response<ReceiverStream<Result<V::Response, Status>>> {
        let remote_addr = request.remote_addr();
        let (metadata, extensions, requests) = request.into_parts();
        let caller = Caller { remote_addr, metadata, extensions };
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        tokio::spawn(stream::drive::<V>(self.shared.clone(), caller, requests, tx));
        Response::new(ReceiverStream::new(rx))
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ConnectionStatus>> {
        self.connections.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn bump_membership(&self) {
        self.membership.send_modify(|n| *n = n.wrapping_add(1));
        self.bump();
    }
}

impl Registration {
    /// Lists a new connection from the node of its first request.
    fn new(
        shared: Arc<Shared>,
        node: Option<Node>,
        peer: Option<SocketAddr>,
        mode: XdsMode,
    ) -> Result<Registration, Status> {
        let node = match node {
            Some(node) if !node.id.is_empty() => node,
            _ => {
                return Err(Status::invalid_argument("the first xDS request of a stream must carry a node with an id"))
            }
        };
        let (info, node_error) = match NodeInfo::from_node(&node) {
            Ok(info) => (Some(info), None),
            Err(e) => (None, Some(e)),
        };
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        tracing::info!(id, node = %node.id, ?peer, ?mode, "xDS stream opened");
        shared.lock().insert(
            id,
            ConnectionStatus {
                id,
                node_id: node.id.clone(),
                node: info,
                node_error,
                raw_node: Arc::new(node.clone()),
                peer,
                connected_since: SystemTime::now(),
                mode,
                types: BTreeMap::new(),
                revision: 0,
            },
        );
        shared.bump_membership();
        Ok(Registration { shared, id, node })
    }

    /// Changes this connection's status of one type and notifies watchers.
    fn update(&self, type_url: &str, change: impl FnOnce(&mut TypeStatus)) {
        if let Some(conn) = self.shared.lock().get_mut(&self.id) {
            conn.revision = conn.revision.wrapping_add(1);
            // Known types (every send and ACK after the first) without a key copy.
            match conn.types.get_mut(type_url) {
                Some(status) => change(status),
                None => change(conn.types.entry(type_url.to_string()).or_default()),
            }
        }
        self.shared.bump();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        tracing::info!(id = self.id, node = %self.node.id, "xDS stream closed");
        self.shared.lock().remove(&self.id);
        self.shared.bump_membership();
    }
}
