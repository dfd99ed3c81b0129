//! Opaque TCP proxying (Envoy's `tcp_proxy`): pick a cluster and endpoint, connect, and
//! copy bytes both ways until either side closes or the idle timeout passes. A cluster
//! at its `max_connections` refuses the connection (closed, flag `UO`).

use std::sync::Arc;

use tracing::debug;

use crate::cluster::{Cluster, Discovery, Outcome, UpstreamStream};
use crate::config::{ProxySnapshot, TcpChain};
use crate::conn::ChainEnd;
use crate::conn::ConnInfo;
use crate::context::Context;
use crate::error::{ErrorKind, ProxyError};
use crate::io::{Activity, Tracked};
use crate::report::TcpReport;
use crate::telemetry::mx;

/// Proxies one TCP connection through `chain`.
pub async fn proxy<S>(ctx: Arc<Context>, conn: Arc<ConnInfo>, chain: Arc<TcpChain>, downstream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let snap = ctx.store.snapshot();
    let cluster_name = chain.clusters.pick(rand::random::<u64>()).to_string();
    let mut report = TcpReport::open(&ctx, &conn, &cluster_name);
    if !chain.rbac.is_empty() {
        // Evaluated before connecting upstream: a denied client never reaches the app
        // (nor sees a server-first banner); dropping the stream closes the connection.
        let verdict = crate::rbac::check(&chain.rbac, &conn.rbac_input(), ctx.metrics.rbac());
        let denied = verdict.denied.is_some();
        report.rbac(verdict);
        if denied {
            debug!(peer = %conn.peer, "connection denied by RBAC: closing");
            report.close(&ctx, Some(ErrorKind::RbacDenied));
            return;
        }
    }
    // Envoy's tcp_proxy honours the cluster's max_connections: over it, the downstream
    // connection is closed (`UO`). The slot is held while the connection is proxied.
    let _slot = match snap.clusters.get(&cluster_name) {
        Some(c) => match c.load().try_connection(c.config.limits.max_connections, false) {
            Some(slot) => Some(slot),
            None => {
                debug!(cluster = %cluster_name, "max_connections reached: closing the connection");
                ctx.metrics.proxy().upstream_cx_overflow(&cluster_name);
                report.close(&ctx, Some(ErrorKind::Overflow));
                return;
            }
        },
        None => None,
    };
    let upstream = match connect(&ctx, &snap, &conn, &cluster_name).await {
        Ok((s, addr)) => {
            let principal = s.peer_principal();
            let s = if mx::negotiated(s.alpn()) {
                // Istio's TCP metadata exchange: the upstream's workload for the metrics.
                match mx::exchange(s, &ctx.local_peer.tcp_frame).await {
                    Ok((s, peer)) => {
                        if let Some(peer) = peer {
                            report.upstream_peer(peer);
                        }
                        s
                    }
                    Err(e) => {
                        debug!(cluster = %cluster_name, error = %e, "peer metadata exchange failed");
                        report.close(&ctx, Some(ErrorKind::UpstreamReset));
                        return;
                    }
                }
            } else {
                crate::io::Replay::plain(s)
            };
            report.connected(&ctx, addr, principal);
            s
        }
        Err(e) => {
            debug!(cluster = %cluster_name, error = %e, "tcp upstream connect failed");
            report.close(&ctx, Some(e.kind()));
            return;
        }
    };
    drop(snap);
    let activity = Activity::new();
    let mut down = Tracked::new(downstream, activity.clone());
    let mut up = Tracked::new(upstream, activity.clone());
    let flag = {
        let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
        tokio::pin!(copy);
        tokio::select! {
            r = copy.as_mut() => copy_outcome(r),
            _ = activity.idle(chain.idle_timeout) => Some(ErrorKind::StreamIdleTimeout),
            end = conn.ended(&ctx) => {
                ctx.metrics.drain().closed(&conn.listener.name, end.reason());
                match end {
                    // Denied by the network RBAC policy now in force: close now.
                    ChainEnd::Denied => Some(ErrorKind::RbacDenied),
                    // The chain changed under the connection: it may finish within the drain
                    // duration, then it is closed (Envoy's drain of a changed filter chain).
                    ChainEnd::Drain => match tokio::time::timeout(ctx.drain_duration, copy.as_mut()).await {
                        Ok(r) => copy_outcome(r),
                        Err(_) => None,
                    },
                }
            }
        }
    };
    report.received = down.read;
    report.sent = up.read;
    report.close(&ctx, flag);
}

fn copy_outcome(r: std::io::Result<(u64, u64)>) -> Option<ErrorKind> {
    match r {
        Ok(_) => None,
        Err(_) => Some(ErrorKind::UpstreamReset),
    }
}

/// Connects to an endpoint of `cluster_name` (or to the original destination for
/// ORIGINAL_DST clusters), trying another endpoint once when the first refuses.
async fn connect(
    ctx: &Context,
    snap: &ProxySnapshot,
    conn: &ConnInfo,
    cluster_name: &str,
) -> Result<(UpstreamStream, std::net::SocketAddr), ProxyError> {
    let cluster: &Arc<Cluster> = snap
        .clusters
        .get(cluster_name)
        .ok_or_else(|| ProxyError::new(ErrorKind::NoCluster, format!("unknown cluster {cluster_name}")))?;
    let timeout = cluster.config.connect_timeout;
    if matches!(cluster.config.discovery, Discovery::OriginalDst) {
        let dst = conn
            .original_dst
            .ok_or_else(|| ProxyError::new(ErrorKind::NoHealthyUpstream, "no original destination"))?;
        return ctx.pools.connect_stream(dst, timeout, &cluster.config.transport).await.map(|s| (s, dst));
    }
    let mut tried = Vec::new();
    let mut last = None;
    for _ in 0..2 {
        let Some(ep) = cluster.pick(&tried) else {
            break;
        };
        tried.push(ep.addr);
        match ctx.pools.connect_stream(ep.addr, timeout, cluster.config.connector_for(ep.metadata.as_ref())).await {
            Ok(s) => {
                cluster.report(&ep, Outcome::Success);
                return Ok((s, ep.addr));
            }
            Err(e) => {
                if let Some(reason) = e.tls_reason() {
                    ctx.metrics.proxy().upstream_tls_failed(&cluster.config.name, reason);
                }
                if let Some(o) = Outcome::of_error(e.kind()) {
                    cluster.report(&ep, o);
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        ProxyError::new(ErrorKind::NoHealthyUpstream, format!("no healthy endpoint in {cluster_name}"))
    }))
}
