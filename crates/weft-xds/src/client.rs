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
/// The default cap is [`DEFAULT_MAX_BACKOFF`] (500 ms), not Envoy's 30 s: when every
/// control-plane replica was down and one comes back, each proxy is asleep for at most
/// the cap before it tries again, so the whole fleet is back on the returning replica
/// within that (plus a connect and a resumed subscription, which with unchanged
/// configuration pushes nothing): under the 1 s the project promises. The delay is drawn
/// per round over all the replica addresses, not per address (a refused connect moves
/// to the next address at once), so the number of replicas does not multiply it.
///
/// Why this is not a reconnect storm: a bound on the time to resync is a bound on the
/// window in which the whole fleet must arrive, and full jitter spreads the arrivals
/// uniformly over that window, the lowest peak any scheme with that bound can have (N
/// proxies arrive at about N / 500 ms, never at once). While every replica is down a
/// proxy tries one round (a refused TCP connect per address, no TLS) about every 250 ms
/// on average. After a healthy stream ends (one replica died, others are up) the first
/// delay is at most `initial` (250 ms).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// First cap (250 ms by default).
    pub initial: Duration,
    /// Largest cap ([`DEFAULT_MAX_BACKOFF`] by default).
    pub max: Duration,
}

/// How long a stream must stay open to count as healthy (the backoff restarts from its
/// first step after it ends) when no response came on it.
const HEALTHY_AFTER: Duration = Duration::from_secs(1);

/// Largest reconnect delay of [`Backoff::default`].
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_millis(500);

/// How long a connection attempt to one control-plane address may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Settings of an [`AdsClient`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Control-plane URL, e.g. `http://127.0.0.1:15010`; several replicas separated by
    /// commas (`http://a:15010,http://b:15010`): see [`ClientConfig::addresses`].
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
    /// The control-plane address of the current (or last) stream.
    pub server: String,
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
    /// The connection to the control plane was made (false: the address refused or
    /// timed out, and the next address is tried without a delay).
    connected: bool,
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

impl ClientConfig {
    /// The control-plane replicas to use, in order: `address` split at commas. The client
    /// starts at a random one (a fleet spreads over the replicas) and moves to the next
    /// whenever a stream ends or a connection fails: at once after a failed connect while
    /// some address of this round is untried, otherwise after the jittered backoff; the
    /// first retry after a healthy stream waits at most [`Backoff::initial`], so a proxy
    /// whose replica died is on another one within that (plus a connect).
    pub fn addresses(&self) -> Vec<String> {
        self.address.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_string).collect()
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
        // Addresses that refused a connection since the last delay.
        let mut refused: usize = 0;
        let addresses = self.config.addresses();
        let mut current = if addresses.len() > 1 { rand::rng().random_range(0..addresses.len()) } else { 0 };
        loop {
            let address = addresses.get(current).cloned().unwrap_or_else(|| self.config.address.clone());
            self.status.send_if_modified(|s| {
                let changed = s.server != address;
                s.server.clone_from(&address);
                changed
            });
            let end = tokio::select! {
                () = &mut shutdown => break,
                end = self.stream_once(&address, &mut memory) => end,
            };
            if end.healthy {
                attempt = 0;
            }
            if !addresses.is_empty() {
                current = (current + 1) % addresses.len();
            }
            refused = if end.connected { 0 } else { refused + 1 };
            if !end.connected && refused < addresses.len() {
                // A round over the replicas is one attempt: try the next one now.
                tracing::debug!(%address, error = %end.error, next = ?addresses.get(current), "xDS connect failed; trying the next address");
                continue;
            }
            refused = 0;
            let delay = self.config.backoff.delay(attempt);
            attempt = attempt.saturating_add(1);
            self.status.send_modify(|s| {
                s.connected = false;
                s.next_retry = Some(delay);
            });
            tracing::warn!(%address, error = %end.error, ?delay, next = ?addresses.get(current), "xDS stream ended; reconnecting");
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        self.status.send_modify(|s| s.connected = false);
    }

    async fn stream_once(&self, address: &str, memory: &mut Memory) -> StreamEnd {
        let mut healthy = false;
        let mut connected = false;
        let result = match self.connect(address).await {
            Ok(client) => {
                connected = true;
                match self.config.mode {
                    XdsMode::Sotw => sotw::run_stream(self, client, memory, &mut healthy).await,
                    XdsMode::Delta => delta::run_stream(self, client, memory, &mut healthy).await,
                }
            }
            Err(e) => Err(e),
        };
        StreamEnd {
            healthy,
            connected,
            error: match result {
                Ok(()) => "control plane closed the stream".to_string(),
                Err(e) => e,
            },
        }
    }

    async fn connect(&self, address: &str) -> Result<AggregatedDiscoveryServiceClient<Channel>, String> {
        // With a TLS transport, `https://host:port` is dialled as `http://` by the
        // transport's own TLS connector.
        let target = match (&self.transport, address.strip_prefix("https://")) {
            (Some(_), Some(rest)) => format!("http://{rest}"),
            _ => address.to_string(),
        };
        let endpoint = Endpoint::from_shared(target)
            .map_err(|e| format!("invalid xDS address {address:?}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let channel = match &self.transport {
            Some(t) => t.connect(endpoint).await,
            None => endpoint.connect().await.map_err(|e| e.to_string()),
        }
        .map_err(|e| format!("connect to {address}: {e}"))?;
        Ok(AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES))
    }

    fn mark_connected(&self) {
        self.status.send_modify(|s| {
            s.connected = true;
            s.next_retry = None;
            s.connects += 1;
        });
    }

    /// Notes an ACK: the type's version and update count, reusing the entries (and the
    /// version's buffer) the type already has, so an ACK allocates nothing once the type
    /// was ACKed before.
    fn record_ack(&self, type_url: &str, version: &str) {
        self.status.send_modify(|s| {
            match s.acked.get_mut(type_url) {
                Some(acked) => {
                    acked.clear();
                    acked.push_str(version);
                }
                None => {
                    s.acked.insert(type_url.to_string(), version.to_string());
                }
            }
            match s.updates.get_mut(type_url) {
                Some(count) => *count += 1,
                None => {
                    s.updates.insert(type_url.to_string(), 1);
                }
            }
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
