//! Upstream connection pools, shared by all snapshots (they live as long as the proxy).
//!
//! HTTP/1.1 (`h1_pool`, `h1_client`: weft's own client, driven from the request's task):
//! a keep-alive pool of idle connections per endpoint. A request takes one out, and its
//! response body gives it back once read to the end, unless the response or the request
//! said `connection: close` (or HTTP/1.0 without keep-alive), the body was dropped
//! half-read, or the connection is spent (`max_requests_per_connection`,
//! `max_connection_duration`): then it closes. There are at most as many busy connections
//! as requests in flight, which the cluster's circuit breaker bounds; idle ones are
//! bounded by `idle_timeout` and, at each `reap_interval`, by `max_idle_per_endpoint` (the
//! least recently used beyond it are closed). So N concurrent requests reuse their N
//! connections rather than opening (and handshaking) a new one per request, and once the
//! load is over the pool shrinks back, and with it the memory the connections' buffers held.
//! HTTP/2: one multiplexed connection per endpoint, re-established when it dies;
//! concurrent requests that find no live connection wait for the one being set up
//! rather than each opening their own.
//!
//! An idle HTTP/1.1 connection is read once without waiting at checkout: one the peer
//! closed while idle (end of stream, an error, bytes nobody asked for) is dropped and the
//! next one taken. A request that still fails on a *reused* connection before any byte
//! of it was written is sent once more on a fresh connection, so stale keep-alive never
//! surfaces as a 503. HTTP/2 (`h2_client`, the `h2` crate driven
//! from the request's task): a reused connection that takes no new stream (it ended, or
//! the peer sent GOAWAY) is replaced once; one reused after a quiet spell first lets the
//! runtime poll, so a close that arrived in the same turn is seen before the stream opens.
//!
//! The per-endpoint locks are `tokio` mutexes held only to take or return a connection
//! (and, for HTTP/2, while the one shared connection is being established).
//!
//! Circuit breaking, with Envoy's semantics, when the request names its cluster's
//! [`ClusterLoad`] ([`Upstream::breaker`]): pools are then per cluster and endpoint, as
//! Envoy's are. An HTTP/1 request that finds no ready connection is *pending* (counted
//! against `max_pending_requests`; beyond it the request fails at once with `Overflow`,
//! Envoy's `upstream_rq_pending_overflow`) until it has one: a new connection when the
//! cluster has fewer than `max_connections` open (or the endpoint has none at all, as
//! Envoy opens a host's first connection even over the limit), else the next of the
//! endpoint's busy connections to finish its response, or whatever the cluster frees
//! first. `max_requests_per_connection` closes a connection after that many requests,
//! `max_connection_duration` after that long (once its response is done),
//! `idle_timeout` once it has been idle that long, and TCP keepalive is set on new
//! connections.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::cluster::config::Limits;
use crate::cluster::endpoints::Endpoint;
use crate::cluster::ewma::ClusterLoad;
use crate::cluster::h1_client::{H1Body, H1Conn};
use crate::cluster::h1_pool::origin_form;
use crate::cluster::h2_client::{self, H2Body, H2Sender};
use crate::error::{ErrorKind, ProxyError};

/// The HTTP version spoken to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with a keep-alive pool.
    Http1,
    /// HTTP/2 (prior knowledge), one multiplexed connection per endpoint.
    Http2,
    /// Whatever the downstream spoke; the caller resolves this before sending.
    UseDownstream,
}

/// The request body type the pools send.
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A response body from an upstream, whichever HTTP version carried it.
#[derive(Debug)]
pub enum UpstreamBody {
    /// Read from an HTTP/1.1 connection (`h1_client`).
    Http1(H1Body),
    /// Read from an HTTP/2 stream.
    Http2(H2Body),
}

/// Pool settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Idle connections older than this are closed.
    pub idle_timeout: Duration,
    /// At most this many idle HTTP/1 connections are kept per endpoint (busy ones do not
    /// count): each `reap_interval` the least recently used idle ones beyond it are closed.
    pub max_idle_per_endpoint: usize,
    /// How often idle connections are looked at and closed (past `idle_timeout`, or
    /// beyond `max_idle_per_endpoint`).
    pub reap_interval: Duration,
}

/// A cluster's per-connection settings (Envoy's `common_http_protocol_options` and
/// `upstream_connection_options`); None means no limit (the pool's own idle timeout).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnSettings {
    /// Close a connection idle this long (`idle_timeout`).
    pub idle_timeout: Option<Duration>,
    /// Close a connection after this many requests (`max_requests_per_connection`).
    pub max_requests_per_connection: Option<u32>,
    /// Close a connection this long after it opened, once its requests are done
    /// (`max_connection_duration`).
    pub max_connection_duration: Option<Duration>,
    /// TCP keepalive on new connections (`upstream_connection_options.tcp_keepalive`).
    pub keepalive: Option<Keepalive>,
}

/// TCP keepalive settings; unset fields keep the system's defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Keepalive {
    /// Unanswered probes before the connection is dead (`keepalive_probes`).
    pub probes: Option<u32>,
    /// Idle time before the first probe (`keepalive_time`).
    pub time: Option<Duration>,
    /// Time between probes (`keepalive_interval`).
    pub interval: Option<Duration>,
}

/// Where and how one request goes: the cluster's transport, timeouts, per-connection
/// settings and circuit breaker.
#[derive(Debug, Clone, Copy)]
pub struct Upstream<'a> {
    /// TCP (and TLS) connect timeout.
    pub connect_timeout: Duration,
    /// Plain TCP or the cluster's TLS.
    pub connector: &'a Connector,
    /// Per-connection settings.
    pub conn: ConnSettings,
    /// The cluster's shared load and its limits; None: no circuit breaking, pools
    /// shared by every cluster reaching the endpoint.
    pub breaker: Option<(&'a Arc<ClusterLoad>, Limits)>,
    /// When the request set out: a clock reading the caller took anyway (the
    /// forwarding path's attempt start), taken by the pool as the time of the checkout
    /// (a connection's last use, the idle time of pooled ones) instead of reading the
    /// clock again.
    pub at: Instant,
}

/// How connections to upstreams are made. The extension point for mTLS to the peer
/// proxy: a `Tls` variant (client config + expected SPIFFE identity) will wrap the TCP
/// stream here and add an [`UpstreamStream`] variant; the pool key then becomes
/// (address, transport).
#[derive(Debug, Clone, Default)]
pub enum Connector {
    /// Plain TCP.
    #[default]
    Plain,
    /// TLS over TCP (a cluster's `UpstreamTlsContext`).
    Tls(Arc<crate::tls::UpstreamTls>),
}

impl PartialEq for Connector {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

/// A connection to an upstream, whatever the transport.
#[derive(Debug)]
pub enum UpstreamStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Open connections per endpoint, for the admin `/clusters` page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// One entry per endpoint the pools have talked to, sorted by address.
    pub endpoints: Vec<EndpointPoolStats>,
}

/// Connections to one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointPoolStats {
    /// The endpoint.
    pub addr: SocketAddr,
    /// Open HTTP/1 connections (busy or idle).
    pub http1_open: usize,
    /// HTTP/1 connections kept in the pool for reuse (busy or idle).
    pub http1_pooled: usize,
    /// Open HTTP/2 connections.
    pub http2_open: usize,
}

/// Upstream connections, shared by all snapshots (lives as long as the proxy).
#[derive(Debug, Clone)]
pub struct Pools {
    pub(super) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) cfg: PoolConfig,
    connector: Connector,
    endpoints: ArcSwap<PoolMap>,
    /// The smallest idle timeout any pool was given, in ms: the reaper looks at least
    /// four times as often.
    min_idle_ms: AtomicU64,
    /// Wakes the reaper when `min_idle_ms` went down (its next look may be due sooner).
    reaper: Arc<tokio::sync::Notify>,
}

/// Endpoint, transport, and the cluster's load when it has a circuit breaker (its
/// address: the registry keeps one `ClusterLoad` per cluster name across snapshots).
type PoolKey = (SocketAddr, u64, usize);

/// The pools by key, hashed with [`PoolKeyHasher`].
type PoolMap = HashMap<PoolKey, Arc<EndpointPool>, std::hash::BuildHasherDefault<PoolKeyHasher>>;

/// A multiply-rotate hash (FxHash's) for [`PoolKey`]s, looked up once per request. The
/// keys are endpoint addresses from the control plane and the proxy's own connector and
/// cluster identities, never chosen by a client or peer, so the default SipHash's
/// resistance to chosen collisions buys nothing there; it cost ~430 instructions per
/// lookup, this a few dozen.
#[derive(Debug, Default, Clone, Copy)]
struct PoolKeyHasher(u64);

impl PoolKeyHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl std::hash::Hasher for PoolKeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(c);
            self.add(u64::from_le_bytes(word));
        }
        let mut word = [0u8; 8];
        let rest = chunks.remainder();
        word[..rest.len()].copy_from_slice(rest);
        self.add(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 56));
    }
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }
    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[derive(Debug, Default)]
pub(super) struct EndpointPool {
    /// The cluster's idle timeout in ms (0: the pools' default), updated by each request.
    idle_ms: AtomicU64,
    /// The cluster's `max_connection_duration` in ms (0: none), updated by each request:
    /// the reaper closes idle connections past it that no checkout reaches.
    max_duration_ms: AtomicU64,
    /// Idle HTTP/1 connections; most recently used last.
    pub(super) h1: Mutex<VecDeque<H1Conn>>,
    h2: Mutex<Option<H2Conn>>,
    pub(super) http1_open: Arc<AtomicUsize>,
    /// HTTP/1 connections being opened (they count as the endpoint's connections when
    /// deciding whether its first one may exceed `max_connections`).
    pub(super) http1_connecting: AtomicUsize,
    /// HTTP/1 connections kept for reuse, busy or idle.
    pub(super) http1_pooled: Arc<AtomicUsize>,
    http2_open: Arc<AtomicUsize>,
}

/// The SPIFFE id in the certificate an upstream presented on the mTLS handshake of the
/// connection a response came over (a response extension of [`Pools::send`] and
/// [`Pools::send_with`]; absent over plain TCP). [`Pools::send_to`] returns it beside the
/// response instead: an extension costs three allocations (the map, its table, the value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamPrincipal(pub Arc<str>);

/// The peer's SPIFFE id, kept with the connection it was proven on.
pub type Principal = Option<Arc<str>>;

#[derive(Debug)]
struct H2Conn {
    tx: H2Sender,
    /// Set by the connection's task when it ends.
    closed: Arc<AtomicBool>,
    /// Tells this connection from its successors, to drop only the one that failed.
    id: u64,
    principal: Principal,
    last_used: Instant,
    opened: Instant,
    uses: u32,
}

/// What a sender vouches for about a request's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Headers {
    /// No connection-specific header (the forwarding path removed them).
    Stripped,
    /// Anything: the HTTP/2 client removes what HTTP/2 forbids.
    Unchecked,
}

/// The endpoint's HTTP/2 connection as one request uses it.
struct H2Checked {
    tx: H2Sender,
    id: u64,
    reused: bool,
    /// Reused after at least [`H2_QUIET`] without a new request.
    quiet: bool,
    principal: Principal,
}

/// An HTTP/2 connection reused after this long without a new request is given a chance
/// to notice that its peer went away first (see [`Pools::send_h2`]).
const H2_QUIET: Duration = Duration::from_millis(100);

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            UpstreamBody::Http1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Http2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Http1(b) => b.is_end_stream(),
            UpstreamBody::Http2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Http1(b) => b.size_hint(),
            UpstreamBody::Http2(b) => b.size_hint(),
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            idle_timeout: Duration::from_secs(60),
            max_idle_per_endpoint: 64,
            reap_interval: Duration::from_secs(15),
        }
    }
}

impl Connector {
    /// Connects to `addr` within `timeout`.
    pub async fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<UpstreamStream, ProxyError> {
        self.connect_with(addr, timeout, None).await
    }

    /// Connects to `addr` within `timeout`, with TCP keepalive when given.
    pub async fn connect_with(
        &self,
        addr: SocketAddr,
        timeout: Duration,
        keepalive: Option<Keepalive>,
    ) -> Result<UpstreamStream, ProxyError> {
        match self {
            Connector::Plain => connect_tcp(addr, timeout, keepalive).await.map(UpstreamStream::Plain),
            Connector::Tls(tls) => {
                let started = Instant::now();
                let tcp = connect_tcp(addr, timeout, keepalive).await?;
                let name =
                    tls.sni.clone().unwrap_or_else(|| rustls::pki_types::ServerName::IpAddress(addr.ip().into()));
                let left = timeout.saturating_sub(started.elapsed());
                match tokio::time::timeout(
                    left,
                    tokio_rustls::TlsConnector::from(tls.config.clone()).connect(name, tcp),
                )
                .await
                {
                    Ok(Ok(s)) => Ok(UpstreamStream::Tls(Box::new(s))),
                    Ok(Err(e)) => {
                        let reason = e
                            .get_ref()
                            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                            .map_or("handshake", weft_identity::tls::rejection_reason);
                        tracing::warn!(upstream = %addr, reason, error = %e, "upstream TLS handshake refused");
                        Err(ProxyError::new(
                            ErrorKind::ConnectFailure,
                            format!("TLS handshake with {addr} failed ({reason}): {e}"),
                        )
                        .with_tls_reason(reason)
                        .not_sent())
                    }
                    Err(_) => {
                        Err(ProxyError::new(ErrorKind::ConnectFailure, format!("TLS handshake with {addr} timed out"))
                            .not_sent())
                    }
                }
            }
        }
    }

    /// Distinguishes connection pools: 0 for plain TCP, a hash of the TLS settings otherwise.
    pub fn key(&self) -> u64 {
        match self {
            Connector::Plain => 0,
            Connector::Tls(t) => t.key.max(1),
        }
    }
}

impl Pools {
    /// Empty pools with plain-TCP connections. Inside a tokio runtime this also starts
    /// a task that closes idle connections; it ends when the last clone is dropped.
    pub fn new(cfg: PoolConfig) -> Self {
        Pools::with_connector(cfg, Connector::Plain)
    }

    /// Empty pools that connect with `connector`.
    pub fn with_connector(cfg: PoolConfig, connector: Connector) -> Self {
        let inner = Arc::new(Inner {
            cfg,
            connector,
            endpoints: ArcSwap::from_pointee(PoolMap::default()),
            min_idle_ms: AtomicU64::new(u64::MAX),
            reaper: Arc::new(tokio::sync::Notify::new()),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(reap_idle(Arc::downgrade(&inner), Arc::clone(&inner.reaper)));
        }
        Pools { inner }
    }

    /// Send one request to `ep` over a pooled connection. HTTP/1: keep-alive pool per
    /// endpoint; HTTP/2: one multiplexed connection per endpoint, re-established when
    /// it dies. The request URI is made origin-form for HTTP/1 (Host set from the URI
    /// when missing); for HTTP/2 it carries scheme and authority from the request's
    /// Host so `:authority` is the original host, not the endpoint IP.
    /// `UseDownstream` follows the request's version. A request that fails on a reused
    /// connection before it was written is retried once on a fresh connection.
    pub async fn send(
        &self,
        ep: &Endpoint,
        proto: UpstreamProtocol,
        connect_timeout: Duration,
        req: Request<BoxBody>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let connector = self.inner.connector.clone();
        let up = Upstream {
            connect_timeout,
            connector: &connector,
            conn: ConnSettings::default(),
            breaker: None,
            at: Instant::now(),
        };
        self.send_headers(ep, proto, &up, req, Headers::Unchecked).await.map(with_principal)
    }

    /// [`Pools::send`] over a cluster's own transport (TLS origination).
    pub async fn send_with(
        &self,
        ep: &Endpoint,
        proto: UpstreamProtocol,
        connect_timeout: Duration,
        connector: &Connector,
        req: Request<BoxBody>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let up =
            Upstream { connect_timeout, connector, conn: ConnSettings::default(), breaker: None, at: Instant::now() };
        self.send_headers(ep, proto, &up, req, Headers::Unchecked).await.map(with_principal)
    }

    /// [`Pools::send`] with a cluster's transport, per-connection settings and circuit
    /// breaker: the forwarding path's entry. Fails with `Overflow` (not sent) when the
    /// request would wait for a connection beyond `max_pending_requests`. `req` must
    /// carry no connection-specific header (`http::forward` strips them before): an
    /// HTTP/2 upstream gets its headers without a second look for them. The upstream's
    /// proven identity comes beside the response (no extension).
    ///
    /// Not an `async fn` around `send_headers`: that would be one more future
    /// level, its arguments (the request: 240 bytes) kept in every request's state and
    /// copied with it.
    pub fn send_to<'a>(
        &'a self,
        ep: &'a Endpoint,
        proto: UpstreamProtocol,
        up: &'a Upstream<'a>,
        req: Request<BoxBody>,
    ) -> impl Future<Output = Result<(Response<UpstreamBody>, Principal), ProxyError>> + Send + 'a {
        self.send_headers(ep, proto, up, req, Headers::Stripped)
    }

    /// Picks the version, the endpoint's pool and the request's form, then returns that
    /// version's send. Not an `async fn`: nothing here waits, and as one it was a future
    /// level of its own around the send, holding the request twice (as its argument and
    /// in the form the send takes), and every request's future held and copied it.
    fn send_headers<'a>(
        &'a self,
        ep: &'a Endpoint,
        proto: UpstreamProtocol,
        up: &'a Upstream<'a>,
        req: Request<BoxBody>,
        headers: Headers,
    ) -> impl Future<Output = Result<(Response<UpstreamBody>, Principal), ProxyError>> + Send + 'a {
        use futures::future::{ready, Either, FutureExt};
        let h2 = match proto {
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
            UpstreamProtocol::UseDownstream => req.version() == Version::HTTP_2,
        };
        let cluster = up.breaker.map_or(0, |(load, _)| Arc::as_ptr(load) as usize);
        let pool = self.endpoint((ep.addr, up.connector.key(), cluster));
        if let Some(idle) = up.conn.idle_timeout {
            let ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX).max(1);
            pool.idle_ms.store(ms, Ordering::Relaxed);
            if self.inner.min_idle_ms.fetch_min(ms, Ordering::Relaxed) > ms {
                self.inner.reaper.notify_one();
            }
        }
        let max_duration =
            up.conn.max_connection_duration.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1));
        // Written only when it changed: a store per request would dirty the pool's line.
        if pool.max_duration_ms.load(Ordering::Relaxed) != max_duration {
            pool.max_duration_ms.store(max_duration, Ordering::Relaxed);
        }
        let sent = if h2 {
            absolute_form(req, ep.addr).map(|req| {
                let send = self.send_h2(pool, ep.addr, up, req, headers);
                Either::Left(send.map(|r| r.map(|(r, p)| (r.map(UpstreamBody::Http2), p))))
            })
        } else {
            origin_form(req).map(|req| {
                let send = self.send_h1(pool, ep.addr, up, req);
                Either::Right(send.map(|r| r.map(|(r, p)| (r.map(UpstreamBody::Http1), p))))
            })
        };
        match sent {
            Ok(send) => Either::Left(send),
            Err(e) => Either::Right(ready(Err(e))),
        }
    }

    /// A connection over a cluster's transport (plain or TLS), for byte streams.
    pub async fn connect_stream(
        &self,
        addr: SocketAddr,
        timeout: Duration,
        connector: &Connector,
    ) -> Result<UpstreamStream, ProxyError> {
        connector.connect(addr, timeout).await
    }

    /// Plain TCP connect with timeout (tcp_proxy, CONNECT, upgrades).
    pub async fn connect_tcp(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ProxyError> {
        connect_tcp(addr, timeout, None).await
    }

    /// Open connections per endpoint (summed over the clusters reaching it).
    pub fn stats(&self) -> PoolStats {
        let map = self.inner.endpoints.load();
        let mut by_addr: BTreeMap<SocketAddr, EndpointPoolStats> = BTreeMap::new();
        for ((addr, _, _), p) in map.iter() {
            let e = by_addr.entry(*addr).or_insert(EndpointPoolStats {
                addr: *addr,
                http1_open: 0,
                http1_pooled: 0,
                http2_open: 0,
            });
            e.http1_open += p.http1_open.load(Ordering::Relaxed);
            e.http1_pooled += p.http1_pooled.load(Ordering::Relaxed);
            e.http2_open += p.http2_open.load(Ordering::Relaxed);
        }
        PoolStats { endpoints: by_addr.into_values().collect() }
    }

    fn endpoint(&self, key: PoolKey) -> Arc<EndpointPool> {
        if let Some(p) = self.inner.endpoints.load().get(&key) {
            return Arc::clone(p);
        }
        let fresh = Arc::new(EndpointPool::default());
        let mut result = Arc::clone(&fresh);
        self.inner.endpoints.rcu(|map| {
            if let Some(p) = map.get(&key) {
                result = Arc::clone(p);
                return Arc::clone(map);
            }
            result = Arc::clone(&fresh);
            let mut next = PoolMap::clone(map);
            next.insert(key, Arc::clone(&fresh));
            Arc::new(next)
        });
        result
    }

    /// Sends on the endpoint's HTTP/2 connection (opened when there is none). A reused
    /// connection that cannot take a new stream (it died, or the peer sent GOAWAY) is
    /// replaced once; the request was not sent on it.
    async fn send_h2(
        &self,
        pool: Arc<EndpointPool>,
        addr: SocketAddr,
        up: &Upstream<'_>,
        req: Request<BoxBody>,
        headers: Headers,
    ) -> Result<(Response<H2Body>, Principal), ProxyError> {
        let conn = self.h2_sender(&pool, addr, up).await?;
        if conn.quiet {
            // The connection's task learns that the peer closed the connection only once
            // the runtime has polled for I/O; a request arriving in the same turn would
            // open its stream on a dead connection and fail as sent. After a quiet spell
            // (when peers close idle connections), one yield lets the runtime poll and
            // the connection's task fail it first, so `ready` refuses it and the request
            // goes on a fresh connection. Busy connections skip this (it costs a turn).
            tokio::task::yield_now().await;
        }
        let (tx, principal) = match conn.tx.ready().await {
            Ok(tx) => (tx, conn.principal),
            Err(e) if conn.reused => {
                tracing::debug!(%addr, error = %e, "pooled http2 connection takes no new stream, replacing it");
                pool.drop_h2(conn.id).await;
                let fresh = self.h2_sender(&pool, addr, up).await?;
                let tx = fresh.tx.ready().await.map_err(|e| h2_client::map_h2_error(addr, &e, true))?;
                (tx, fresh.principal)
            }
            Err(e) => return Err(h2_client::map_h2_error(addr, &e, true)),
        };
        let resp = h2_client::send(tx, addr, req, headers == Headers::Stripped).await?;
        Ok((resp, principal))
    }

    /// The endpoint's live HTTP/2 connection, or a new one. A connection that reaches
    /// `max_requests_per_connection` or `max_connection_duration` takes no new streams
    /// (those in flight finish on it).
    async fn h2_sender(
        &self,
        pool: &Arc<EndpointPool>,
        addr: SocketAddr,
        up: &Upstream<'_>,
    ) -> Result<H2Checked, ProxyError> {
        let mut slot = pool.h2.lock().await;
        if let Some(conn) = slot.as_mut() {
            if !conn.closed.load(Ordering::Acquire) && !spent(&up.conn, conn.opened, conn.uses) {
                let now = up.at.max(conn.last_used);
                let quiet = now.saturating_duration_since(conn.last_used) >= H2_QUIET;
                conn.last_used = now;
                conn.uses += 1;
                let checked = H2Checked {
                    tx: conn.tx.clone(),
                    id: conn.id,
                    reused: true,
                    quiet,
                    principal: conn.principal.clone(),
                };
                if spent(&up.conn, conn.opened, conn.uses) {
                    *slot = None;
                }
                return Ok(checked);
            }
        }
        // Boxed: connecting (TCP, TLS, handshake) is the slow path; inline, its state
        // would enlarge the future of every request, which is moved several times.
        let fresh = Box::pin(Self::open_h2(pool, addr, up)).await?;
        let checked = H2Checked {
            tx: fresh.tx.clone(),
            id: fresh.id,
            reused: false,
            quiet: false,
            principal: fresh.principal.clone(),
        };
        *slot = (!spent(&up.conn, fresh.opened, fresh.uses)).then_some(fresh);
        Ok(checked)
    }
}

impl Pools {
    /// A new HTTP/2 connection to `addr`, its connection task spawned. One HTTP/2
    /// connection per endpoint: counted against max_connections, never refused
    /// (requests are bounded by max_requests instead).
    async fn open_h2(pool: &Arc<EndpointPool>, addr: SocketAddr, up: &Upstream<'_>) -> Result<H2Conn, ProxyError> {
        static IDS: AtomicU64 = AtomicU64::new(0);
        let cx = up.breaker.and_then(|(load, limits)| load.try_connection(limits.max_connections, true));
        let io = up.connector.connect_with(addr, up.connect_timeout, up.conn.keepalive).await?;
        let principal = io.peer_principal();
        // One write (one TLS record) per poll of the connection task: crate::coalesce.
        let (io, flusher) = crate::coalesce::Coalesced::new(io);
        let (tx, conn) = h2_client::handshake(io, addr).await?;
        let conn = flusher.wrap(conn);
        let open = Arc::clone(&pool.http2_open);
        open.fetch_add(1, Ordering::AcqRel);
        let closed = Arc::new(AtomicBool::new(false));
        let ended = Arc::clone(&closed);
        // Boxed: the connection (codec, buffers, TLS stream) is large, and tokio's spawn
        // path moves what it is given.
        tokio::spawn(Box::pin(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "upstream http2 connection ended");
            }
            ended.store(true, Ordering::Release);
            open.fetch_sub(1, Ordering::AcqRel);
            drop(cx);
        }));
        let now = Instant::now();
        let id = IDS.fetch_add(1, Ordering::Relaxed);
        Ok(H2Conn { tx, closed, id, principal, last_used: now, opened: now, uses: 1 })
    }
}

impl EndpointPool {
    /// The cluster's idle timeout, or the pools' default.
    pub(super) fn idle_timeout(&self, cfg: &PoolConfig) -> Duration {
        match self.idle_ms.load(Ordering::Relaxed) {
            0 => cfg.idle_timeout,
            ms => Duration::from_millis(ms),
        }
    }

    /// Forgets HTTP/2 connection `id` if it is still the endpoint's: it takes no new
    /// streams (those in flight finish on it).
    async fn drop_h2(&self, id: u64) {
        let mut slot = self.h2.lock().await;
        if slot.as_ref().is_some_and(|c| c.id == id) {
            *slot = None;
        }
    }

    /// Closes idle connections older than the idle timeout and HTTP/1 ones beyond
    /// `max_idle_per_endpoint`; true when nothing is left.
    async fn reap(&self, cfg: &PoolConfig) -> bool {
        let idle_timeout = self.idle_timeout(cfg);
        let max_duration = match self.max_duration_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        };
        self.reap_h1(cfg, idle_timeout, max_duration).await;
        {
            let mut slot = self.h2.lock().await;
            if slot.as_ref().is_some_and(|c| c.closed.load(Ordering::Acquire) || c.last_used.elapsed() >= idle_timeout)
            {
                *slot = None;
            }
        }
        self.http1_open.load(Ordering::Relaxed) == 0 && self.http2_open.load(Ordering::Relaxed) == 0
    }
}

/// Counts one in `counter` while it lives (also when the future holding it is dropped).
pub(super) struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    pub(super) fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Counted(counter)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// True when a connection opened at `opened` that served `uses` requests must take no more.
pub(super) fn spent(settings: &ConnSettings, opened: Instant, uses: u32) -> bool {
    settings.max_requests_per_connection.is_some_and(|max| uses >= max)
        || settings.max_connection_duration.is_some_and(|d| opened.elapsed() >= d)
}

impl UpstreamStream {
    /// The ALPN protocol the TLS handshake settled on.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            UpstreamStream::Plain(_) => None,
            UpstreamStream::Tls(s) => s.get_ref().1.alpn_protocol(),
        }
    }

    /// The SPIFFE id the upstream's certificate proved (TLS with a SPIFFE URI SAN).
    pub fn peer_principal(&self) -> Option<Arc<str>> {
        match self {
            UpstreamStream::Plain(_) => None,
            UpstreamStream::Tls(s) => crate::tls::peer_principal(s.get_ref().1.peer_certificates()),
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The response with the upstream's proven identity as its [`UpstreamPrincipal`] extension.
fn with_principal((mut resp, principal): (Response<UpstreamBody>, Principal)) -> Response<UpstreamBody> {
    if let Some(p) = principal {
        resp.extensions_mut().insert(UpstreamPrincipal(p));
    }
    resp
}

/// Closes idle connections every `reap_interval` (or a quarter of the smallest idle
/// timeout a cluster asked for, at least 10 ms) until the pools are dropped.
async fn reap_idle(inner: Weak<Inner>, reconfigured: Arc<tokio::sync::Notify>) {
    loop {
        let period = match inner.upgrade() {
            Some(i) => {
                let quarter = Duration::from_millis(i.min_idle_ms.load(Ordering::Relaxed) / 4);
                i.cfg.reap_interval.min(quarter).max(Duration::from_millis(10))
            }
            None => return,
        };
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            // A shorter idle timeout arrived: recompute the period first.
            _ = reconfigured.notified() => continue,
        }
        let Some(inner) = inner.upgrade() else { return };
        let map = inner.endpoints.load_full();
        let mut empty = Vec::new();
        for (key, pool) in map.iter() {
            if pool.reap(&inner.cfg).await && Arc::strong_count(pool) <= 1 {
                empty.push(*key);
            }
        }
        if !empty.is_empty() {
            // Forget endpoints with no connection and no request using them.
            inner.endpoints.rcu(|m| {
                let mut next = PoolMap::clone(m);
                for a in &empty {
                    if next.get(a).is_some_and(|p| Arc::strong_count(p) <= 2) {
                        next.remove(a);
                    }
                }
                next
            });
        }
    }
}

/// Plain TCP connect with timeout and, when given, TCP keepalive; failures are
/// `ConnectFailure` and never sent.
pub async fn connect_tcp(
    addr: SocketAddr,
    timeout: Duration,
    keepalive: Option<Keepalive>,
) -> Result<TcpStream, ProxyError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(ProxyError::new(ErrorKind::ConnectFailure, format!("connect to {addr}: {e}")).not_sent())
        }
        Err(_) => {
            return Err(ProxyError::new(
                ErrorKind::ConnectFailure,
                format!("connect to {addr}: timed out after {timeout:?}"),
            )
            .not_sent())
        }
    };
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%addr, error = %e, "cannot set TCP_NODELAY");
    }
    if let Some(k) = keepalive {
        set_keepalive(&stream, k, addr);
    }
    Ok(stream)
}

/// Turns TCP keepalive on with the given settings (system defaults for unset ones).
fn set_keepalive(stream: &TcpStream, k: Keepalive, addr: SocketAddr) {
    let mut ka = socket2::TcpKeepalive::new();
    if let Some(t) = k.time {
        ka = ka.with_time(t);
    }
    if let Some(i) = k.interval {
        ka = ka.with_interval(i);
    }
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    if let Some(p) = k.probes {
        ka = ka.with_retries(p);
    }
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        tracing::debug!(%addr, error = %e, "cannot set TCP keepalive");
    }
}

/// HTTP/2 wants scheme and authority: from the URI, else the Host header, else the
/// endpoint address.
fn absolute_form(mut req: Request<BoxBody>, addr: SocketAddr) -> Result<Request<BoxBody>, ProxyError> {
    let bad = |e: String| ProxyError::new(ErrorKind::DownstreamProtocol, e);
    // :authority carries the host; a Host header would be sent twice.
    let host = req.headers_mut().remove(header::HOST);
    let mut uri = std::mem::take(req.uri_mut()).into_parts();
    if uri.authority.is_none() {
        uri.authority = Some(match host {
            // The authority parser checks every byte (ASCII only): no separate UTF-8 pass.
            Some(h) => Authority::try_from(h.as_bytes())
                .map_err(|e| bad(format!("bad Host header {:?}: {e}", String::from_utf8_lossy(h.as_bytes()))))?,
            None => addr.to_string().parse::<Authority>().map_err(|e| bad(format!("bad endpoint authority: {e}")))?,
        });
    }
    if uri.scheme.is_none() {
        uri.scheme = Some(Scheme::HTTP);
    }
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(uri).map_err(|e| bad(format!("cannot build URI: {e}")))?;
    *req.version_mut() = Version::HTTP_2;
    Ok(req)
}
