//! One accepted connection: what the listener learned about it (peer, destination,
//! identity), and the filter chain it is served by, kept current as configuration changes.
//!
//! A connection does not keep the configuration it was accepted with. At each request,
//! and whenever a new snapshot is published, the connection's chain is looked up again in
//! the current snapshot: the same bound listener, the listener claiming the same original
//! destination, re-matched with the same connection facts ([`ConnFacts`]).
//!
//! - When the chain found differs from the accepted one only in what is decided per
//!   request (the HTTP connection manager's filters — RBAC, JWT, CORS, fault — and its
//!   routes), the connection carries on with the new chain: the next request after the
//!   proxy ACKs a policy sees it, on HTTP/1.1, HTTP/2 and gRPC alike.
//! - Network RBAC filters are evaluated again against the connection whenever its chain
//!   is recompiled; a connection they now deny is closed at once.
//! - When the listener is gone, no chain matches any more, or the chain differs in what
//!   was fixed at accept ([`FixedAtAccept`]: TLS or plaintext, certificates, the TCP proxy
//!   or connection manager settings), the connection drains as Envoy drains the
//!   connections of a changed filter chain: HTTP/1.1 answers its next response with
//!   `Connection: close`, HTTP/2 sends GOAWAY, and whatever is still open after the drain
//!   duration (Istio's `drainDuration`, 45 s by default) is closed; TCP connections are
//!   closed after the drain duration.
//!
//! [`FixedAtAccept`]: crate::config::listener::FixedAtAccept

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{ChainKind, ConnFacts, FilterChainConfig, ListenerConfig, ProxySnapshot};
use crate::context::Context;
use crate::io::WakeGated;
use crate::ratelimit::bucket::{BucketKey, TokenBucket};
use crate::rbac::{RbacFilter, RbacInput};

/// Most per-connection rate limit buckets a connection keeps; past it (many
/// configuration changes on one long-lived connection) they start over.
const MAX_CONN_BUCKETS: usize = 256;

/// Facts about one accepted connection, shared by the stages that serve it.
#[derive(Debug)]
pub struct ConnInfo {
    /// The listener (possibly the virtual one claiming the original destination) as it
    /// was when the connection was accepted (its name and direction; its chains are
    /// read through [`ConnInfo::chain`]).
    pub listener: Arc<ListenerConfig>,
    /// Peer address.
    pub peer: SocketAddr,
    /// Destination: the original destination when redirected, else the local address.
    pub destination: SocketAddr,
    /// Original destination when the connection was redirected by iptables.
    pub original_dst: Option<SocketAddr>,
    /// The peer's identity from a verified client certificate: its URI SAN
    /// (`spiffe://<td>/ns/<ns>/sa/<sa>`), as Envoy's RBAC `authenticated` matches it.
    /// `None` without TLS or without a client certificate.
    pub peer_principal: Option<Arc<str>>,
    /// SNI the client asked for (sniffed or from the TLS handshake).
    pub server_name: Option<Arc<str>>,
    /// The peer as telemetry names it when it sends no metadata header: unknown but for
    /// `peer_principal` (built once per connection, not per request).
    pub peer_workload: Option<Arc<crate::telemetry::WorkloadInfo>>,
    /// The proxy terminated TLS on this connection (`x-forwarded-proto: https` when the
    /// client sent none).
    pub tls: bool,
    /// Where the connection was accepted and how its chain was chosen.
    pub origin: Origin,
    /// The chain as of the last snapshot this connection looked at.
    view: ArcSwap<ChainView>,
    /// Local rate limit buckets of filters with `local_rate_limit_per_downstream_connection`.
    rate_limits: std::sync::Mutex<std::collections::HashMap<BucketKey, Arc<TokenBucket>>>,
}

/// How a connection's filter chain was chosen: what re-matching it needs.
#[derive(Debug)]
pub struct Origin {
    /// The bound listener that accepted it.
    pub bound: Arc<str>,
    /// That listener's configured address when it accepted.
    pub bound_address: SocketAddr,
    /// What chain matching looked at.
    pub facts: ConnFacts,
    /// The chain it was accepted on.
    pub accepted: Arc<FilterChainConfig>,
}

/// A connection's filter chain in one snapshot.
#[derive(Debug)]
pub struct ChainView {
    generation: u64,
    /// The chain to serve with: the current one, or the accepted one while draining.
    pub chain: Arc<FilterChainConfig>,
    /// The chain's network RBAC filters deny this connection: close it.
    pub denied: bool,
    /// The connection can no longer follow the configuration in place: drain it. Once
    /// set, it stays set.
    pub drain: bool,
}

/// Why a connection must stop following the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainEnd {
    /// Drain: finish what is in flight, take nothing new, close by the drain deadline.
    Drain,
    /// Network RBAC now denies the connection: close it now.
    Denied,
}

impl ChainEnd {
    /// The `reason` label of `weft_downstream_cx_drained_total`.
    pub fn reason(self) -> &'static str {
        match self {
            ChainEnd::Drain => "filter_chain_changed",
            ChainEnd::Denied => "rbac_denied",
        }
    }
}

impl ConnInfo {
    /// A connection accepted on `origin.accepted`, as of `snapshot_generation`.
    pub fn new(
        listener: Arc<ListenerConfig>,
        peer: SocketAddr,
        destination: SocketAddr,
        original_dst: Option<SocketAddr>,
        origin: Origin,
        snapshot_generation: u64,
    ) -> Self {
        let view =
            ChainView { generation: snapshot_generation, chain: origin.accepted.clone(), denied: false, drain: false };
        ConnInfo {
            listener,
            peer,
            destination,
            original_dst,
            peer_principal: None,
            server_name: origin.facts.server_name.as_deref().map(Arc::from),
            peer_workload: None,
            tls: false,
            origin,
            view: ArcSwap::from_pointee(view),
            rate_limits: Default::default(),
        }
    }

    /// This connection's bucket for `key` (per-connection local rate limits), created
    /// full on first use. Locks this connection's own map only.
    pub fn rate_limit_bucket(&self, key: &BucketKey) -> Arc<TokenBucket> {
        let mut map = self.rate_limits.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = map.get(key) {
            return b.clone();
        }
        if map.len() >= MAX_CONN_BUCKETS {
            map.clear();
        }
        let b = Arc::new(TokenBucket::new(key.params));
        map.insert(key.clone(), b.clone());
        b
    }

    /// The connection's chain in `snap`: cached per snapshot generation, so a request
    /// pays one atomic load unless the configuration changed since the last one.
    pub fn chain(&self, snap: &ProxySnapshot) -> Arc<ChainView> {
        let view = self.view.load_full();
        if view.generation >= snap.generation || view.drain || view.denied {
            return view;
        }
        let next = Arc::new(self.resolve(snap, &view));
        self.view.store(next.clone());
        next
    }

    /// Resolves when the connection can no longer follow the configuration in place
    /// (never while it can). Wakes at every new snapshot; polled again only then
    /// ([`WakeGated`]), not at every wake-up of the connection's task.
    pub fn ended<'a>(&'a self, ctx: &'a Context) -> WakeGated<impl Future<Output = ChainEnd> + Send + 'a> {
        WakeGated::new(self.ended_inner(ctx))
    }

    async fn ended_inner(&self, ctx: &Context) -> ChainEnd {
        let mut changes = ctx.store.subscribe();
        loop {
            let view = self.chain(&ctx.store.snapshot());
            if view.denied {
                return ChainEnd::Denied;
            }
            if view.drain {
                return ChainEnd::Drain;
            }
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// What a finished server-side TLS handshake says about the peer: its principal (the
    /// SPIFFE id of a verified client certificate) and the SNI it asked for.
    pub fn learn_peer(&mut self, tls: &rustls::ServerConnection) {
        self.peer_principal = crate::tls::peer_principal(tls.peer_certificates());
        if self.server_name.is_none() {
            self.server_name = tls.server_name().map(Arc::from);
        }
    }

    /// The RBAC input for the connection itself (network RBAC).
    pub fn rbac_input(&self) -> RbacInput<'_> {
        RbacInput {
            peer: self.peer,
            destination: self.destination,
            peer_principal: self.peer_principal.as_deref(),
            server_name: self.server_name.as_deref(),
            http: None,
            auth: None,
        }
    }

    /// The RBAC input for an HTTP request on the connection.
    pub fn rbac_http_input<'a>(&'a self, parts: &'a http::request::Parts, authority: &'a str) -> RbacInput<'a> {
        crate::rbac::http_input(self.rbac_input(), parts, authority)
    }

    fn resolve(&self, snap: &ProxySnapshot, previous: &ChainView) -> ChainView {
        let generation = snap.generation;
        let Some(chain) = self.rematch(snap) else {
            return ChainView { generation, chain: self.origin.accepted.clone(), denied: false, drain: true };
        };
        // Network RBAC is decided per connection: evaluate the new chain's filters again
        // (only when the chain was recompiled). Counted in the RBAC metrics only when it
        // denies, so a configuration push does not inflate the allowed counts.
        let denied = !Arc::ptr_eq(&chain, &previous.chain) && {
            let filters = network_rbac(&chain);
            !filters.is_empty() && {
                let sink = crate::telemetry::rbac::RbacMetrics::detached();
                crate::rbac::check(filters, &self.rbac_input(), &sink).denied.is_some()
            }
        };
        ChainView { generation, chain, denied, drain: false }
    }

    /// The chain this connection gets in `snap`, when it can carry on in place.
    fn rematch(&self, snap: &ProxySnapshot) -> Option<Arc<FilterChainConfig>> {
        let o = &self.origin;
        let bound = snap.listeners.get(&*o.bound)?;
        if bound.address != o.bound_address {
            return None;
        }
        let listener = snap.listener_for(&o.bound, self.original_dst)?;
        if listener.name != self.listener.name {
            return None;
        }
        let chain = listener.select_chain(&o.facts)?;
        (chain.fixed == o.accepted.fixed).then(|| chain.clone())
    }
}

/// The network RBAC filters a chain applies to its connections.
pub fn network_rbac(chain: &FilterChainConfig) -> &[Arc<RbacFilter>] {
    match &chain.kind {
        ChainKind::Http(h) => &h.network_rbac,
        ChainKind::Tcp(t) => &t.rbac,
    }
}
