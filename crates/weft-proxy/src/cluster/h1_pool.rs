//! The pools' HTTP/1.1 side: a keep-alive pool of idle [`H1Conn`]s per endpoint.
//!
//! Only idle connections are in the pool. A request takes the most recently used one
//! (after checking that the upstream did not close it while it was idle), owns it while it
//! writes and reads the head, and its response body gives it back once read to the end
//! ([`Home::give_back`]), which also wakes requests pending on the cluster's breaker.
//! `http1_pooled` counts the connections kept for reuse, busy or idle (not those spent by
//! `max_requests_per_connection` or `max_connection_duration`, which close after their
//! response); `http1_open` every open one.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http::uri::PathAndQuery;
use http::{header, Request, Response, Uri, Version};

use super::ewma::{ClusterLoad, Slot};
use super::h1_client::{self, Failed, H1Body, H1Conn};
use super::pool::{spent, ConnSettings, Counted, EndpointPool, PoolConfig, Pools, Principal, Upstream};
use super::BoxBody;
use crate::error::{ErrorKind, ProxyError};

/// Where a connection goes back once its response was read: its endpoint's pool, and
/// the cluster whose pending requests wait for it.
#[derive(Debug)]
pub(crate) struct Home {
    pool: Arc<EndpointPool>,
    load: Option<Arc<ClusterLoad>>,
}

impl Home {
    /// Puts `conn` back among the idle connections (most recently used last) and wakes
    /// the requests waiting for one.
    pub(crate) fn give_back(self, mut conn: H1Conn) {
        conn.state().idle_since = None;
        let mut conn = Some(conn);
        if let Ok(mut idle) = self.pool.h1.try_lock() {
            idle.extend(conn.take());
        }
        if let Some(conn) = conn {
            // Held by a checkout or the reaper for a moment: hand it over without waiting,
            // and wake the pending requests once it is there.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let Home { pool, load } = self;
                rt.spawn(async move {
                    pool.h1.lock().await.push_back(conn);
                    if let Some(load) = load {
                        load.wake();
                    }
                });
            }
            return;
        }
        if let Some(load) = self.load {
            load.wake();
        }
    }
}

impl Pools {
    /// Sends over a pooled connection, else (pending, within the cluster's breaker) a new
    /// one or the first one given back. A request that fails on a reused connection
    /// before any byte of it was written goes once more on a new connection.
    pub(super) async fn send_h1(
        &self,
        pool: Arc<EndpointPool>,
        addr: SocketAddr,
        up: &Upstream<'_>,
        mut req: Request<BoxBody>,
    ) -> Result<(Response<H1Body>, Principal), ProxyError> {
        let mut fresh_only = false;
        loop {
            let idle = if fresh_only { None } else { pool.checkout_h1(&self.inner.cfg, &up.conn, up.at).await };
            let (mut conn, reused) = match idle {
                Some(c) => (c, true),
                // Boxed: waiting and connecting (TCP, TLS) are the slow path; inline,
                // their state would enlarge every request's future.
                None => (Box::pin(self.wait_h1(&pool, addr, up, fresh_only)).await?, false),
            };
            let c = conn.state();
            c.uses += 1;
            let keep = !spent(&up.conn, c.opened, c.uses);
            let principal = c.principal.clone();
            conn.set_pooled(keep.then_some(&pool.http1_pooled));
            let home = keep.then(|| Home { pool: Arc::clone(&pool), load: up.breaker.map(|(l, _)| Arc::clone(l)) });
            match h1_client::send(conn, addr, req, home).await {
                Ok(resp) => return Ok((resp, principal)),
                // Never written on a reused connection: it was stale. Try a fresh one.
                Err(Failed { back: Some(back), err }) if reused => {
                    tracing::debug!(%addr, error = %err, "pooled http1 connection failed before the request, retrying");
                    req = back;
                    fresh_only = true;
                }
                Err(f) => return Err(f.err),
            }
        }
    }

    /// A connection for a request that found none idle: counted pending while it waits
    /// (`Overflow` beyond `max_pending_requests`), it gets a new connection when the
    /// cluster's `max_connections` allows, else the first of the endpoint's connections
    /// given back, else whatever the cluster frees first.
    async fn wait_h1(
        &self,
        pool: &Arc<EndpointPool>,
        addr: SocketAddr,
        up: &Upstream<'_>,
        fresh_only: bool,
    ) -> Result<H1Conn, ProxyError> {
        let Some((load, limits)) = up.breaker else {
            return connect_h1(pool, addr, up, None).await;
        };
        let _pending = load.try_pending(limits.max_pending_requests).ok_or_else(|| {
            ProxyError::new(ErrorKind::Overflow, format!("{addr}: max_pending_requests reached")).not_sent()
        })?;
        loop {
            let freed = load.freed();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if !fresh_only {
                // A clock reading of its own: the request may have waited since `up.at`.
                if let Some(c) = pool.checkout_h1(&self.inner.cfg, &up.conn, Instant::now()).await {
                    return Ok(c);
                }
            }
            let first =
                pool.http1_open.load(Ordering::Acquire) == 0 && pool.http1_connecting.load(Ordering::Acquire) == 0;
            if let Some(slot) = load.try_connection(limits.max_connections, first) {
                return connect_h1(pool, addr, up, Some(slot)).await;
            }
            freed.await;
        }
    }
}

/// A new connection to `addr`, counted open (and holding the cluster's `slot`) until it
/// closes.
async fn connect_h1(
    pool: &Arc<EndpointPool>,
    addr: SocketAddr,
    up: &Upstream<'_>,
    slot: Option<Slot>,
) -> Result<H1Conn, ProxyError> {
    let connecting = Counted::new(&pool.http1_connecting);
    let io = up.connector.connect_with(addr, up.connect_timeout, up.conn.keepalive).await?;
    let conn = H1Conn::new(io, &pool.http1_open, slot);
    drop(connecting);
    Ok(conn)
}

impl EndpointPool {
    /// The most recently used idle connection that can take a request now (`now`: the
    /// request's [`Upstream::at`]). Looks from the most recently used end and stops at
    /// the first usable connection: the rest of the pool is left to the reaper
    /// ([`prune_h1`]). A connection the upstream closed while idle is dropped and the
    /// next one looked at.
    pub(super) async fn checkout_h1(&self, cfg: &PoolConfig, settings: &ConnSettings, now: Instant) -> Option<H1Conn> {
        loop {
            let mut conn = {
                let mut idle = self.h1.lock().await;
                take_ready_h1(&mut idle, self.idle_timeout(cfg), settings.max_connection_duration, now)?
            };
            if !poll_fn(|cx| Poll::Ready(conn.is_stale(cx))).await {
                return Some(conn);
            }
            tracing::debug!("pooled http1 connection was closed by the upstream while idle, dropping it");
        }
    }

    /// Closes idle connections the upstream closed, those past the idle timeout or
    /// `max_duration`, and (when `bound_idle`) the least recently used beyond
    /// `max_idle_per_endpoint`.
    pub(super) async fn reap_h1(&self, cfg: &PoolConfig, idle_timeout: Duration, max_duration: Option<Duration>) {
        let mut idle = self.h1.lock().await;
        prune_h1(&mut idle, cfg, idle_timeout, max_duration, Instant::now());
    }
}

/// Takes the most recently used connection that may still be used out of the pool;
/// those met first that a prune would close ([`idle_usable`]) are dropped on the way.
fn take_ready_h1(
    conns: &mut VecDeque<H1Conn>,
    idle_timeout: Duration,
    max_duration: Option<Duration>,
    now: Instant,
) -> Option<H1Conn> {
    let idle_cutoff = now.checked_sub(idle_timeout);
    while let Some(mut c) = conns.pop_back() {
        if idle_usable(&mut c, idle_timeout, idle_cutoff, max_duration, now) {
            return Some(c);
        }
    }
    None
}

/// Drops (and so closes) connections the upstream closed, idle ones past `idle_timeout`
/// (idle time counts from when a prune or checkout first saw the connection idle), ones
/// older than `max_duration`, and the least recently used beyond `max_idle_per_endpoint`.
/// `now` is the time of the prune.
fn prune_h1(
    conns: &mut VecDeque<H1Conn>,
    cfg: &PoolConfig,
    idle_timeout: Duration,
    max_duration: Option<Duration>,
    now: Instant,
) {
    let mut excess = conns.len().saturating_sub(cfg.max_idle_per_endpoint);
    let idle_cutoff = now.checked_sub(idle_timeout);
    // Nobody waits on an idle connection: a read without a waker tells whether it ended.
    let mut cx = Context::from_waker(Waker::noop());
    // Least recently used first: the excess idle connections are the first ones met.
    conns.retain_mut(|c| {
        if excess > 0 {
            excess -= 1;
            return false;
        }
        !c.is_stale(&mut cx) && idle_usable(c, idle_timeout, idle_cutoff, max_duration, now)
    });
}

/// Whether an idle connection may still be used at `now`: younger than `max_duration`,
/// and idle for less than `idle_timeout` since a prune or checkout first saw it idle (its
/// idle time starts now when none did). `idle_cutoff` is `now - idle_timeout` (None: the
/// clock is younger than the timeout, nothing has been idle that long).
fn idle_usable(
    c: &mut H1Conn,
    idle_timeout: Duration,
    idle_cutoff: Option<Instant>,
    max_duration: Option<Duration>,
    now: Instant,
) -> bool {
    let c = c.state();
    if max_duration.is_some_and(|d| now.saturating_duration_since(c.opened) >= d) {
        return false;
    }
    let since = *c.idle_since.get_or_insert(now);
    !idle_timeout.is_zero() && idle_cutoff.is_none_or(|cutoff| since > cutoff)
}

/// HTTP/1 wants origin-form (`/path?q`) and a Host header: one is set from the URI's
/// authority when missing (hyper's connection-level client adds none).
pub(super) fn origin_form(mut req: Request<BoxBody>) -> Result<Request<BoxBody>, ProxyError> {
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
