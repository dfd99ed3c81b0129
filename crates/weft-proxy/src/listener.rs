//! Listeners: bind what LDS asks for, accept connections, pick the listener and filter
//! chain for each (original destination, sniffed protocol), and hand the connection to
//! the HTTP or TCP stage.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::{ChainKind, ConnFacts, ListenerConfig};
use crate::conn::{ConnInfo, Origin};
use crate::context::Context;
use crate::detect::{self, Detected};
use crate::http::preface::Alpn;
use crate::orig_dst::original_dst;
use crate::telemetry::mx;
use crate::{http, tcp};

struct Bound {
    configured: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Keeps the bound sockets in line with the listeners in the current snapshot.
pub struct ListenerManager {
    ctx: Arc<Context>,
    bound: BTreeMap<String, Bound>,
    addrs: watch::Sender<BTreeMap<String, SocketAddr>>,
}

impl ListenerManager {
    /// A manager with nothing bound yet.
    pub fn new(ctx: Arc<Context>) -> Self {
        ListenerManager { ctx, bound: BTreeMap::new(), addrs: watch::channel(BTreeMap::new()).0 }
    }

    /// Bound addresses by listener name (port 0 in config becomes the real port here).
    pub fn addresses(&self) -> watch::Receiver<BTreeMap<String, SocketAddr>> {
        self.addrs.subscribe()
    }

    /// Reconciles with every new snapshot until `shutdown` flips; then stops accepting.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.ctx.store.subscribe();
        loop {
            self.reconcile().await;
            tokio::select! {
                r = changes.changed() => if r.is_err() { break },
                _ = crate::context::flipped_each_turn(&mut shutdown) => break,
            }
        }
        self.ctx.store.close_listener_sockets();
        for (name, b) in std::mem::take(&mut self.bound) {
            debug!(listener = %name, "stop accepting");
            let _ = b.stop.send(true);
            let _ = b.task.await;
        }
        self.addrs.send_replace(BTreeMap::new());
    }

    async fn reconcile(&mut self) {
        let snap = self.ctx.store.snapshot();
        let wanted: BTreeMap<&String, &Arc<ListenerConfig>> = snap.listeners.iter().filter(|(_, l)| l.bind).collect();
        let stale: Vec<String> = self
            .bound
            .iter()
            .filter(|(n, b)| wanted.get(n).map(|l| l.address != b.configured).unwrap_or(true))
            .map(|(n, _)| n.clone())
            .collect();
        for name in stale {
            if let Some(b) = self.bound.remove(&name) {
                info!(listener = %name, "listener removed: stop accepting");
                let _ = b.stop.send(true);
            }
        }
        for (name, l) in wanted {
            if self.bound.contains_key(name) {
                continue;
            }
            // The store bound the socket when it accepted the listener (a bind failure
            // is a NACK); a listener without one was rejected.
            let Some((configured, socket)) = self.ctx.store.listener_socket(name) else { continue };
            if configured != l.address {
                continue;
            }
            match socket.try_clone().and_then(TcpListener::from_std) {
                Ok(sock) => {
                    let local = sock.local_addr().unwrap_or(l.address);
                    info!(listener = %name, address = %local, "listening");
                    let (stop, stop_rx) = watch::channel(false);
                    let task = tokio::spawn(accept_loop(self.ctx.clone(), name.clone(), sock, stop_rx));
                    self.bound.insert(name.clone(), Bound { configured: l.address, stop, task });
                    self.addrs.send_modify(|m| {
                        m.insert(name.clone(), local);
                    });
                }
                Err(e) => {
                    warn!(listener = %name, address = %l.address, error = %e, "cannot listen on the bound socket")
                }
            }
        }
        let names: Vec<String> = self.bound.keys().cloned().collect();
        self.addrs.send_modify(|m| m.retain(|k, _| names.contains(k)));
    }
}

async fn accept_loop(ctx: Arc<Context>, name: String, sock: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = crate::context::flipped_each_turn(&mut stop) => return,
            r = sock.accept() => match r {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    // Boxed: the connection's future (TLS, the HTTP server, the
                    // forwarding state) is large, and tokio's spawn path moved it whole
                    // several times (~139k instructions per accepted connection, counted
                    // with callgrind); boxed, it is written once and a pointer is moved.
                    tokio::spawn(Box::pin(serve_connection(ctx.clone(), name.clone(), stream, peer)));
                }
                Err(e) => {
                    warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    }
}

async fn serve_connection(ctx: Arc<Context>, name: String, stream: TcpStream, peer: SocketAddr) {
    let _guard = ctx.track_connection();
    let snap = ctx.store.snapshot();
    let Some(bound) = snap.listeners.get(&name) else {
        return;
    };
    let odst = if bound.use_original_dst || bound.original_dst_filter { original_dst(&stream) } else { None };
    let Some(listener) = snap.listener_for(&name, odst) else {
        return;
    };
    let local = stream.local_addr().unwrap_or(listener.address);
    let destination = odst.unwrap_or(local);
    let detected = if listener.needs_sniffing {
        detect::sniff(&stream, listener.sniff_timeout).await
    } else {
        Detected { transport: "raw_buffer", application: vec![], server_name: None }
    };
    let facts = ConnFacts {
        source: peer,
        destination,
        transport_protocol: detected.transport,
        application_protocols: detected.application,
        server_name: detected.server_name,
    };
    let Some(chain) = listener.select_chain(&facts).cloned() else {
        debug!(listener = %listener.name, %peer, %destination, "no filter chain matches: closing");
        return;
    };
    let origin =
        Origin { bound: Arc::from(name.as_str()), bound_address: bound.address, facts, accepted: chain.clone() };
    let mut conn = ConnInfo::new(listener.clone(), peer, destination, odst, origin, snap.generation);
    drop(snap);
    match &chain.tls {
        None => dispatch(ctx, Arc::new(conn), &chain.kind, stream, Alpn::None).await,
        Some(cfg) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    conn.tls = true;
                    conn.learn_peer(tls.get_ref().1);
                    conn.peer_workload =
                        conn.peer_principal.as_ref().map(|p| Arc::new(crate::report::peer_from_principal(p)));
                    let exchange =
                        matches!(chain.kind, ChainKind::Tcp(_)) && mx::negotiated(tls.get_ref().1.alpn_protocol());
                    if !exchange {
                        let alpn = Alpn::from_protocol(tls.get_ref().1.alpn_protocol());
                        return dispatch(ctx, Arc::new(conn), &chain.kind, tls, alpn).await;
                    }
                    // Istio's TCP metadata exchange: the caller's workload for the metrics.
                    match mx::exchange(tls, &ctx.local_peer.tcp_frame).await {
                        Ok((stream, peer)) => {
                            if peer.is_some() {
                                conn.peer_workload = peer;
                            }
                            dispatch(ctx, Arc::new(conn), &chain.kind, stream, Alpn::None).await
                        }
                        Err(e) => debug!(listener = %listener.name, %peer, error = %e, "peer metadata exchange failed"),
                    }
                }
                Ok(Err(e)) => {
                    let reason = e
                        .get_ref()
                        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                        .map_or("handshake", weft_identity::tls::rejection_reason);
                    ctx.metrics.proxy().tls_handshake_failed(&listener.name, reason);
                    warn!(listener = %listener.name, %peer, reason, error = %e, "TLS handshake refused");
                }
                Err(_) => {
                    ctx.metrics.proxy().tls_handshake_failed(&listener.name, "timeout");
                    debug!(%peer, "TLS handshake timed out");
                }
            }
        }
    }
}

/// How long a client may take to complete the TLS handshake (Envoy's
/// `transport_socket_connect_timeout` is unset by default; weft bounds it).
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the connection with its filter chain's stage; `alpn` is what its TLS
/// handshake negotiated (the HTTP version, when it says).
async fn dispatch<S>(ctx: Arc<Context>, conn: Arc<ConnInfo>, kind: &ChainKind, stream: S, alpn: Alpn)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match kind {
        ChainKind::Http(_) => http::serve(ctx, conn, stream, alpn).await,
        ChainKind::Tcp(t) => tcp::proxy(ctx, conn, t.clone(), stream).await,
    }
}
