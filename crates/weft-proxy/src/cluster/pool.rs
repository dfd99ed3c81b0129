//! Upstream connection pools, shared by all snapshots (they live as long as the proxy).
//!
//! HTTP/1.1: a keep-alive pool per endpoint. A connection goes back into the pool as
//! soon as its request is sent; it is handed out again only when hyper says it can
//! take another request (the previous response was read to the end), so the next
//! request reuses it without waiting for any background task. A connection whose
//! response body was dropped half-read is closed by hyper and leaves the pool.
//! Busy connections are always kept (there are at most as many as requests in flight,
//! which the cluster's circuit breaker bounds); idle ones are bounded by `idle_timeout`
//! and, at each `reap_interval`, by `max_idle_per_endpoint` (the least recently used
//! beyond it are closed). So N concurrent requests reuse their N connections rather
//! than opening (and handshaking) a new one per request, and once the load is over the
//! pool shrinks back, and with it the memory the connections' buffers held.
//! HTTP/2: one multiplexed connection per endpoint, re-established when it dies;
//! concurrent requests that find no live connection wait for the one being set up
//! rather than each opening their own.
//!
//! A request that fails on a *reused* connection before hyper wrote it (the peer had
//! closed an idle keep-alive connection) is sent once more on a fresh connection, so
//! stale keep-alive never surfaces as a 503.
//!
//! The per-endpoint locks are `tokio` mutexes held only to take or return a connection
//! (and, for HTTP/2, while the one shared connection is being established).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::cluster::endpoints::Endpoint;
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
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: PoolConfig,
    connector: Connector,
    endpoints: ArcSwap<HashMap<(SocketAddr, u64), Arc<EndpointPool>>>,
}

#[derive(Debug, Default)]
struct EndpointPool {
    /// Pooled HTTP/1 connections, busy or idle; most recently used last.
    h1: Mutex<VecDeque<H1Conn>>,
    h2: Mutex<Option<H2Conn>>,
    http1_open: Arc<AtomicUsize>,
    http1_pooled: AtomicUsize,
    http2_open: Arc<AtomicUsize>,
}

/// The SPIFFE id in the certificate an upstream presented on the mTLS handshake of the
/// connection a response came over (a response extension; absent over plain TCP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamPrincipal(pub Arc<str>);

/// The peer's SPIFFE id, kept with the connection it was proven on.
type Principal = Option<Arc<str>>;

#[derive(Debug)]
struct H1Conn {
    tx: http1::SendRequest<BoxBody>,
    principal: Principal,
    /// When it was last handed out (idle time is measured from there).
    since: Instant,
}

#[derive(Debug)]
struct H2Conn {
    tx: http2::SendRequest<BoxBody>,
    principal: Principal,
    last_used: Instant,
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
        match self {
            Connector::Plain => connect_tcp(addr, timeout).await.map(UpstreamStream::Plain),
            Connector::Tls(tls) => {
                let started = Instant::now();
                let tcp = connect_tcp(addr, timeout).await?;
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
        let inner = Arc::new(Inner { cfg, connector, endpoints: ArcSwap::from_pointee(HashMap::new()) });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(reap_idle(Arc::downgrade(&inner)));
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
    ) -> Result<Response<Incoming>, ProxyError> {
        let h2 = match proto {
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
            UpstreamProtocol::UseDownstream => req.version() == Version::HTTP_2,
        };
        let connector = &self.inner.connector;
        self.send_via(ep, h2, connect_timeout, connector, req).await
    }

    /// [`Pools::send`] over a cluster's own transport (TLS origination).
    pub async fn send_with(
        &self,
        ep: &Endpoint,
        proto: UpstreamProtocol,
        connect_timeout: Duration,
        connector: &Connector,
        req: Request<BoxBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let h2 = match proto {
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
            UpstreamProtocol::UseDownstream => req.version() == Version::HTTP_2,
        };
        self.send_via(ep, h2, connect_timeout, connector, req).await
    }

    async fn send_via(
        &self,
        ep: &Endpoint,
        h2: bool,
        connect_timeout: Duration,
        connector: &Connector,
        req: Request<BoxBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let pool = self.endpoint((ep.addr, connector.key()));
        let resp = if h2 {
            let req = absolute_form(req, ep.addr)?;
            self.send_h2(&pool, ep.addr, connect_timeout, connector, req).await
        } else {
            let req = origin_form(req)?;
            self.send_h1(&pool, ep.addr, connect_timeout, connector, req).await
        };
        resp.map(|(resp, principal)| {
            let mut resp = own_header_values(resp);
            if let Some(p) = principal {
                resp.extensions_mut().insert(UpstreamPrincipal(p));
            }
            resp
        })
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
        connect_tcp(addr, timeout).await
    }

    /// Open connections per endpoint.
    pub fn stats(&self) -> PoolStats {
        let map = self.inner.endpoints.load();
        let mut endpoints: Vec<EndpointPoolStats> = map
            .iter()
            .map(|((addr, _), p)| EndpointPoolStats {
                addr: *addr,
                http1_open: p.http1_open.load(Ordering::Relaxed),
                http1_pooled: p.http1_pooled.load(Ordering::Relaxed),
                http2_open: p.http2_open.load(Ordering::Relaxed),
            })
            .collect();
        endpoints.sort_by_key(|e| e.addr);
        PoolStats { endpoints }
    }

    fn endpoint(&self, addr: (SocketAddr, u64)) -> Arc<EndpointPool> {
        if let Some(p) = self.inner.endpoints.load().get(&addr) {
            return Arc::clone(p);
        }
        let fresh = Arc::new(EndpointPool::default());
        let mut result = Arc::clone(&fresh);
        self.inner.endpoints.rcu(|map| {
            if let Some(p) = map.get(&addr) {
                result = Arc::clone(p);
                return Arc::clone(map);
            }
            result = Arc::clone(&fresh);
            let mut next = HashMap::clone(map);
            next.insert(addr, Arc::clone(&fresh));
            Arc::new(next)
        });
        result
    }

    async fn send_h1(
        &self,
        pool: &Arc<EndpointPool>,
        addr: SocketAddr,
        timeout: Duration,
        connector: &Connector,
        mut req: Request<BoxBody>,
    ) -> Result<(Response<Incoming>, Principal), ProxyError> {
        if let Some((mut tx, principal)) = pool.checkout_h1(&self.inner.cfg).await {
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    self.release_h1(pool, tx, principal.clone()).await;
                    return Ok((resp, principal));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the connection was stale. Try a fresh one.
                    Some(back) => req = back,
                    None => return Err(map_hyper_error(addr, e.error(), false)),
                },
            }
        }
        let (mut tx, principal) = self.connect_h1(pool, addr, timeout, connector).await?;
        match tx.try_send_request(req).await {
            Ok(resp) => {
                self.release_h1(pool, tx, principal.clone()).await;
                Ok((resp, principal))
            }
            Err(e) => Err(map_hyper_error(addr, e.error(), e.message().is_some())),
        }
    }

    async fn connect_h1(
        &self,
        pool: &Arc<EndpointPool>,
        addr: SocketAddr,
        timeout: Duration,
        connector: &Connector,
    ) -> Result<(http1::SendRequest<BoxBody>, Principal), ProxyError> {
        let io = connector.connect(addr, timeout).await?;
        let principal = io.peer_principal();
        let (tx, conn) = http1::handshake(TokioIo::new(io)).await.map_err(|e| map_hyper_error(addr, &e, true))?;
        let open = Arc::clone(&pool.http1_open);
        open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "upstream http1 connection ended");
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
        Ok((tx, principal))
    }

    /// Keeps `tx` (busy with its response) for reuse once its response is done.
    async fn release_h1(&self, pool: &Arc<EndpointPool>, tx: http1::SendRequest<BoxBody>, principal: Principal) {
        let mut conns = pool.h1.lock().await;
        conns.retain(|c| !c.tx.is_closed());
        conns.push_back(H1Conn { tx, principal, since: Instant::now() });
        pool.http1_pooled.store(conns.len(), Ordering::Relaxed);
    }

    async fn send_h2(
        &self,
        pool: &Arc<EndpointPool>,
        addr: SocketAddr,
        timeout: Duration,
        connector: &Connector,
        req: Request<BoxBody>,
    ) -> Result<(Response<Incoming>, Principal), ProxyError> {
        let (mut tx, reused, principal) = self.h2_sender(pool, addr, timeout, connector).await?;
        let req = match tx.try_send_request(req).await {
            Ok(resp) => return Ok((resp, principal)),
            Err(mut e) => {
                let unsent = e.message().is_some();
                match e.take_message() {
                    Some(back) if reused => back,
                    _ => return Err(map_hyper_error(addr, e.error(), unsent)),
                }
            }
        };
        // The shared connection died before taking the request: replace it once.
        pool.drop_h2_if_closed().await;
        let (mut tx, _, principal) = self.h2_sender(pool, addr, timeout, connector).await?;
        let resp =
            tx.try_send_request(req).await.map_err(|e| map_hyper_error(addr, e.error(), e.message().is_some()))?;
        Ok((resp, principal))
    }

    /// The endpoint's live HTTP/2 connection, or a new one; true when reused.
    async fn h2_sender(
        &self,
        pool: &Arc<EndpointPool>,
        addr: SocketAddr,
        timeout: Duration,
        connector: &Connector,
    ) -> Result<(http2::SendRequest<BoxBody>, bool, Principal), ProxyError> {
        let mut slot = pool.h2.lock().await;
        if let Some(conn) = slot.as_mut() {
            if !conn.tx.is_closed() {
                conn.last_used = Instant::now();
                return Ok((conn.tx.clone(), true, conn.principal.clone()));
            }
        }
        let io = connector.connect(addr, timeout).await?;
        let principal = io.peer_principal();
        let (tx, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .map_err(|e| map_hyper_error(addr, &e, true))?;
        let open = Arc::clone(&pool.http2_open);
        open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "upstream http2 connection ended");
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
        *slot = Some(H2Conn { tx: tx.clone(), principal: principal.clone(), last_used: Instant::now() });
        Ok((tx, false, principal))
    }
}

impl EndpointPool {
    /// The most recently used pooled connection that can take a request now.
    async fn checkout_h1(&self, cfg: &PoolConfig) -> Option<(http1::SendRequest<BoxBody>, Principal)> {
        let mut conns = self.h1.lock().await;
        prune_h1(&mut conns, cfg, false);
        let pos = conns.iter().rposition(|c| c.tx.is_ready());
        let found = pos.and_then(|i| conns.remove(i)).map(|c| (c.tx, c.principal));
        self.http1_pooled.store(conns.len(), Ordering::Relaxed);
        found
    }

    async fn drop_h2_if_closed(&self) {
        let mut slot = self.h2.lock().await;
        if slot.as_ref().is_some_and(|c| c.tx.is_closed()) {
            *slot = None;
        }
    }

    /// Closes idle connections older than `idle_timeout` and HTTP/1 ones beyond
    /// `max_idle_per_endpoint`; true when nothing is left.
    async fn reap(&self, cfg: &PoolConfig) -> bool {
        let idle_timeout = cfg.idle_timeout;
        {
            let mut conns = self.h1.lock().await;
            prune_h1(&mut conns, cfg, true);
            self.http1_pooled.store(conns.len(), Ordering::Relaxed);
        }
        {
            let mut slot = self.h2.lock().await;
            if slot.as_ref().is_some_and(|c| c.tx.is_closed() || c.last_used.elapsed() >= idle_timeout) {
                *slot = None;
            }
        }
        self.http1_open.load(Ordering::Relaxed) == 0 && self.http2_open.load(Ordering::Relaxed) == 0
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

/// Drops (and so closes) closed connections, idle ones older than the idle timeout and,
/// when `bound_idle`, the least recently used idle ones beyond `max_idle_per_endpoint`.
/// Busy connections stay: they are handed out again once their response is done.
fn prune_h1(conns: &mut VecDeque<H1Conn>, cfg: &PoolConfig, bound_idle: bool) {
    let mut excess = if bound_idle {
        let idle = conns.iter().filter(|c| c.tx.is_ready()).count();
        idle.saturating_sub(cfg.max_idle_per_endpoint)
    } else {
        0
    };
    // Least recently used first: the excess idle connections are the first ones met.
    conns.retain(|c| {
        if c.tx.is_closed() {
            return false;
        }
        if !c.tx.is_ready() {
            return true;
        }
        if excess > 0 {
            excess -= 1;
            return false;
        }
        c.since.elapsed() < cfg.idle_timeout
    });
}

/// Closes idle connections every `reap_interval` until the pools are dropped.
async fn reap_idle(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(i) => i.cfg.reap_interval.max(Duration::from_millis(10)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let map = inner.endpoints.load_full();
        let mut empty = Vec::new();
        for (addr, pool) in map.iter() {
            if pool.reap(&inner.cfg).await && Arc::strong_count(pool) <= 1 {
                empty.push(*addr);
            }
        }
        if !empty.is_empty() {
            // Forget endpoints with no connection and no request using them.
            inner.endpoints.rcu(|m| {
                let mut next = HashMap::clone(m);
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

/// Gives the response's header values allocations of their own. hyper hands them out as
/// slices of the buffer it read the response into (8 KiB or more, shared with the body),
/// and a downstream HTTP/2 connection's HPACK encoder keeps the values it indexes for as
/// long as that connection lives: each kept value would pin a whole upstream read buffer.
/// Measured (`weft-bench soak`, heaptrack): 500 downstream HTTP/2 connections pinned
/// ~1.5 KiB per request, 250 MiB after a minute. Copying costs a few small allocations
/// per response.
fn own_header_values<B>(mut resp: Response<B>) -> Response<B> {
    for v in resp.headers_mut().values_mut() {
        if let Ok(mut own) = header::HeaderValue::from_bytes(v.as_bytes()) {
            own.set_sensitive(v.is_sensitive());
            *v = own;
        }
    }
    resp
}

/// Plain TCP connect with timeout; failures are `ConnectFailure` and never sent.
pub async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ProxyError> {
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
    Ok(stream)
}

/// HTTP/1 wants origin-form (`/path?q`) and a Host header.
fn origin_form(mut req: Request<BoxBody>) -> Result<Request<BoxBody>, ProxyError> {
    if !req.headers().contains_key(header::HOST) {
        if let Some(auth) = req.uri().authority() {
            let value = header::HeaderValue::from_str(auth.as_str())
                .map_err(|e| ProxyError::new(ErrorKind::DownstreamProtocol, format!("bad authority: {e}")))?;
            req.headers_mut().insert(header::HOST, value);
        }
    }
    let pq = req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from(pq);
    *req.version_mut() = Version::HTTP_11;
    Ok(req)
}

/// HTTP/2 wants scheme and authority: from the URI, else the Host header, else the
/// endpoint address.
fn absolute_form(mut req: Request<BoxBody>, addr: SocketAddr) -> Result<Request<BoxBody>, ProxyError> {
    let bad = |e: String| ProxyError::new(ErrorKind::DownstreamProtocol, e);
    let authority = match req.uri().authority() {
        Some(a) => a.clone(),
        None => match req.headers().get(header::HOST) {
            Some(h) => {
                let s = h.to_str().map_err(|e| bad(format!("bad Host header: {e}")))?;
                s.parse::<Authority>().map_err(|e| bad(format!("bad Host header {s:?}: {e}")))?
            }
            None => addr.to_string().parse::<Authority>().map_err(|e| bad(format!("bad endpoint authority: {e}")))?,
        },
    };
    let scheme = req.uri().scheme().cloned().unwrap_or(Scheme::HTTP);
    let pq = req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(pq)
        .build()
        .map_err(|e| bad(format!("cannot build URI: {e}")))?;
    // :authority carries the host; a Host header would be sent twice.
    req.headers_mut().remove(header::HOST);
    *req.version_mut() = Version::HTTP_2;
    Ok(req)
}

/// Maps a hyper client error; `not_sent` when hyper handed the request back unwritten.
fn map_hyper_error(addr: SocketAddr, e: &hyper::Error, not_sent: bool) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            if h2e.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return ProxyError::new(ErrorKind::RefusedStream, format!("{addr}: {e}")).not_sent();
            }
            if h2e.is_go_away() && h2e.is_remote() {
                // h2 fails only streams above GOAWAY's last-stream-id this way.
                return ProxyError::new(ErrorKind::UpstreamReset, format!("{addr}: {e}")).not_sent();
            }
        }
        source = s.source();
    }
    let kind = if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() {
        ErrorKind::UpstreamProtocol
    } else {
        ErrorKind::UpstreamReset
    };
    let err = ProxyError::new(kind, format!("{addr}: {e}"));
    if not_sent {
        err.not_sent()
    } else {
        err
    }
}
