//! ADS client: one aggregated stream to the control plane, reconnecting with backoff.
//!
//! The client owns no configuration: it decodes responses, hands them to a
//! [`ResourceHandler`] (the proxy's state store), ACKs or NACKs what the handler said,
//! and keeps the subscription equal to the handler's [`ResourceHandler::interest`].
//! On disconnect nothing is cleared: the handler keeps serving its last good config.

mod delta;
mod sotw;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc;
use rand::Rng;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::node::NodeInfo;
use crate::XdsMode;

/// Largest response the client accepts (a big mesh's CDS fits comfortably).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// gRPC code sent in a NACK's `error_detail` (INVALID_ARGUMENT).
const NACK_CODE: i32 = 3;

/// One batch of resources of one type, as received.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResourceUpdate {
    /// `version_info` (SotW) or `system_version_info` (delta) of the response.
    pub version: String,
    /// Resources added or changed, by name.
    pub upserts: Vec<(String, Any)>,
    /// Names removed (delta `removed_resources`; for SotW full-state updates, the names
    /// of the previous accepted response that are absent now).
    pub removals: Vec<String>,
    /// true for SotW responses of wildcard types (LDS, CDS): names absent from `upserts` are removed
    pub full_state: bool,
    /// Delta, for types whose names are aliases (VHDS): what each requested name the
    /// response answers resolved to, `None` = the server has no such resource.
    pub resolved: Vec<(String, Option<String>)>,
}

/// The consumer of resources (the proxy). Owns the state.
pub trait ResourceHandler: Send + Sync + 'static {
    /// Types to subscribe to, in ADS order (CDS, EDS, LDS, RDS[, SDS]).
    fn type_urls(&self) -> Vec<&'static str>;
    /// Apply an update. Err(message) = NACK with that error_detail; the handler keeps
    /// the previous version of every resource it rejected (it may accept the good ones).
    fn apply(&self, type_url: &str, update: ResourceUpdate) -> Result<(), String>;
    /// Names wanted for a type: None = wildcard (LDS, CDS); Some(set) for RDS/EDS/SDS.
    /// Called after every apply; when it changes, the client updates its subscription.
    fn interest(&self, type_url: &str) -> Option<BTreeSet<String>>;
    /// Ticks when interest changed outside [`ResourceHandler::apply`] (a request asked
    /// for a virtual host or cluster on demand); the delta client then re-reads it.
    fn interest_changes(&self) -> Option<watch::Receiver<u64>> {
        None
    }
}

/// Reconnect delays: exponential from `initial`, capped at `max`, with full jitter
/// (each delay is uniform in `[0, min(max, initial * 2^attempt)]`).
///
/// The default cap is [`DEFAULT_MAX_BACKOFF`] (3 s), not Envoy's 30 s: a control plane
/// that comes back (a restart, a rollout) sees every proxy again within about 3 s, so
/// its restored registry (see `weft-control`'s reconnect grace) is confirmed quickly and
/// a proxy's callers never wait on its registration. Full jitter still spreads a fleet's
/// reconnects over the whole window, so a returning control plane is not hit at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// First cap (250 ms by default).
    pub initial: Duration,
    /// Largest cap ([`DEFAULT_MAX_BACKOFF`] by default).
    pub max: Duration,
}

/// Largest reconnect delay of [`Backoff::default`].
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(3);

/// Settings of an [`AdsClient`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Control-plane URL, e.g. `http://127.0.0.1:15010`.
    pub address: String,
    /// Identity announced in the `Node` of the first request of each stream.
    pub node: NodeInfo,
    /// SotW or delta.
    pub mode: XdsMode,
    /// Reconnect delays.
    pub backoff: Backoff,
}

/// What the client has done so far, published on a `watch`.
#[derive(Clone, Debug, Default)]
pub struct ClientStatus {
    /// A stream is open.
    pub connected: bool,
    /// Streams opened so far.
    pub connects: u64,
    /// Last ACKed version per type URL.
    pub acked: BTreeMap<String, String>,
    /// Responses applied (ACKed) so far, per type URL.
    pub updates: BTreeMap<String, u64>,
    /// NACKs sent so far.
    pub nacks: u64,
    /// NACKs sent so far, per type URL (of the response NACKed).
    pub nacks_by_type: BTreeMap<String, u64>,
    /// Error detail of the last NACK.
    pub last_nack: Option<String>,
    /// When the last response was applied (ACKed).
    pub last_update: Option<SystemTime>,
    /// While disconnected: the delay drawn before the next connection attempt.
    pub next_retry: Option<Duration>,
}

/// How a client reaches its control plane when plain HTTP/2 is not enough: a TLS
/// connection presenting the proxy's current certificate, and/or a credential sent as
/// `authorization` metadata on every stream (see [`AdsClient::with_transport`]).
pub trait XdsTransport: Send + Sync + 'static {
    /// Opens a channel to `endpoint` (its URI is always `http://host:port`: TLS, if
    /// any, is the transport's own business). Called on every (re)connect.
    fn connect(
        &self,
        endpoint: Endpoint,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Channel, String>> + Send + 'static>> {
        Box::pin(async move { endpoint.connect().await.map_err(|e| e.to_string()) })
    }

    /// The `authorization` metadata value of a new stream (`Bearer <token>`), read at
    /// each (re)connect so a rotated token file is picked up; None: no metadata.
    fn authorization(&self) -> Option<String> {
        None
    }
}

/// ADS client. Build with [`AdsClient::new`], drive with [`AdsClient::run`].
pub struct AdsClient {
    config: ClientConfig,
    handler: Arc<dyn ResourceHandler>,
    status: watch::Sender<ClientStatus>,
    transport: Option<Arc<dyn XdsTransport>>,
}

/// What survives a reconnect: accepted versions, used to resubscribe.
#[derive(Default)]
struct Memory {
    /// SotW: names of the last accepted response per type (to report removals).
    sotw_names: BTreeMap<String, BTreeSet<String>>,
    /// Delta: resource versions the handler accepted, per type and name.
    delta_versions: BTreeMap<String, BTreeMap<String, String>>,
}

/// Why a stream ended.
struct StreamEnd {
    /// The stream delivered at least one response (resets the backoff).
    healthy: bool,
    error: String,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_millis(250), max: DEFAULT_MAX_BACKOFF }
    }
}

impl Backoff {
    /// Delay before reconnect attempt `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX);
        let cap = self.initial.saturating_mul(factor).min(self.max);
        let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}

impl AdsClient {
    /// A client that will feed `handler`. Nothing happens until [`AdsClient::run`].
    pub fn new(config: ClientConfig, handler: Arc<dyn ResourceHandler>) -> Self {
        AdsClient { config, handler, status: watch::channel(ClientStatus::default()).0, transport: None }
    }

    /// The client connecting through `transport` (TLS, credentials) instead of plain
    /// HTTP/2. An `https://` address is dialled as `http://` and left to the transport.
    pub fn with_transport(mut self, transport: Arc<dyn XdsTransport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// A stream's request with the transport's `authorization` metadata, if any.
    fn stream_request<T>(&self, body: T) -> Result<tonic::Request<T>, String> {
        let mut request = tonic::Request::new(body);
        if let Some(value) = self.transport.as_ref().and_then(|t| t.authorization()) {
            let value = value.parse().map_err(|_| "the xDS credential holds characters not allowed in metadata")?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }

    /// Status updates (connection, ACKed versions, NACKs).
    pub fn status(&self) -> watch::Receiver<ClientStatus> {
        self.status.subscribe()
    }

    /// Runs until `shutdown` resolves: connect, subscribe, apply, ACK/NACK; on any stream
    /// error reconnect with jittered exponential backoff (reset after a healthy stream).
    /// Never clears handler state on disconnect (last good config keeps serving).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut memory = Memory::default();
        let mut attempt: u32 = 0;
        loop {
            let end = tokio::select! {
                () = &mut shutdown => break,
                end = self.stream_once(&mut memory) => end,
            };
            if end.healthy {
                attempt = 0;
            }
            let delay = self.config.backoff.delay(attempt);
            attempt = attempt.saturating_add(1);
            self.status.send_modify(|s| {
                s.connected = false;
                s.next_retry = Some(delay);
            });
            tracing::warn!(address = %self.config.address, error = %end.error, ?delay, "xDS stream ended; reconnecting");
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        self.status.send_modify(|s| s.connected = false);
    }

    async fn stream_once(&self, memory: &mut Memory) -> StreamEnd {
        let mut healthy = false;
        let result = match self.connect().await {
            Ok(client) => match self.config.mode {
                XdsMode::Sotw => sotw::run_stream(self, client, memory, &mut healthy).await,
                XdsMode::Delta => delta::run_stream(self, client, memory, &mut healthy).await,
            },
            Err(e) => Err(e),
        };
        StreamEnd {
            healthy,
            error: match result {
                Ok(()) => "control plane closed the stream".to_string(),
                Err(e) => e,
            },
        }
    }

    async fn connect(&self) -> Result<AggregatedDiscoveryServiceClient<Channel>, String> {
        let address = match (&self.transport, self.config.address.strip_prefix("https://")) {
            (Some(_), Some(rest)) => format!("http://{rest}"),
            _ => self.config.address.clone(),
        };
        let endpoint = Endpoint::from_shared(address)
            .map_err(|e| format!("invalid xDS address {:?}: {e}", self.config.address))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let channel = match &self.transport {
            Some(t) => t.connect(endpoint).await,
            None => endpoint.connect().await.map_err(|e| e.to_string()),
        }
        .map_err(|e| format!("connect to {}: {e}", self.config.address))?;
        Ok(AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES))
    }

    fn mark_connected(&self) {
        self.status.send_modify(|s| {
            s.connected = true;
            s.next_retry = None;
            s.connects += 1;
        });
    }

    fn record_ack(&self, type_url: &str, version: &str) {
        self.status.send_modify(|s| {
            s.acked.insert(type_url.to_string(), version.to_string());
            *s.updates.entry(type_url.to_string()).or_default() += 1;
            s.last_update = Some(SystemTime::now());
        });
    }

    fn record_nack(&self, type_url: &str, error: &str) {
        tracing::warn!(type_url, error, "NACK");
        self.status.send_modify(|s| {
            s.nacks += 1;
            *s.nacks_by_type.entry(type_url.to_string()).or_default() += 1;
            s.last_nack = Some(error.to_string());
        });
    }

    fn acked_version(&self, type_url: &str) -> String {
        self.status.borrow().acked.get(type_url).cloned().unwrap_or_default()
    }
}

fn nack_status(message: &str) -> rpc::Status {
    rpc::Status { code: NACK_CODE, message: message.to_string(), details: Vec::new() }
}
