//! Opaque TCP proxying (Envoy's `tcp_proxy`): pick a cluster and endpoint, connect, and
//! copy bytes both ways until either side closes or the idle timeout passes.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use crate::cluster::{Cluster, Discovery};
use crate::config::{Snapshot, TcpChain};
use crate::context::Context;
use crate::error::{ErrorKind, ProxyError};
use crate::listener::ConnInfo;
use crate::report::TcpReport;

/// Proxies one TCP connection through `chain`.
pub async fn proxy(ctx: Arc<Context>, conn: Arc<ConnInfo>, chain: Arc<TcpChain>, downstream: TcpStream) {
    let snap = ctx.store.snapshot();
    let cluster_name = chain.clusters.pick(rand::random::<u64>()).to_string();
    let mut report = TcpReport::open(&ctx, &conn, &cluster_name);
    let upstream = match connect(&ctx, &snap, &conn, &cluster_name).await {
        Ok((s, addr)) => {
            report.upstream_host = Some(addr);
            s
        }
        Err(e) => {
            debug!(cluster = %cluster_name, error = %e, "tcp upstream connect failed");
            report.close(&ctx, Some(e.kind()));
            return;
        }
    };
    drop(snap);
    let activity = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut down = Metered::new(downstream, activity.clone(), started);
    let mut up = Metered::new(upstream, activity.clone(), started);
    let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
    let flag = tokio::select! {
        r = copy => match r {
            Ok(_) => None,
            Err(_) => Some(ErrorKind::UpstreamReset),
        },
        _ = idle(chain.idle_timeout, activity.clone(), started) => Some(ErrorKind::StreamIdleTimeout),
    };
    report.received = down.read;
    report.sent = up.read;
    report.close(&ctx, flag);
}

/// Connects to an endpoint of `cluster_name` (or to the original destination for
/// ORIGINAL_DST clusters), trying another endpoint once when the first refuses.
async fn connect(
    ctx: &Context,
    snap: &Snapshot,
    conn: &ConnInfo,
    cluster_name: &str,
) -> Result<(TcpStream, std::net::SocketAddr), ProxyError> {
    let cluster: &Arc<Cluster> = snap
        .clusters
        .get(cluster_name)
        .ok_or_else(|| ProxyError::new(ErrorKind::NoCluster, format!("unknown cluster {cluster_name}")))?;
    let timeout = cluster.config.connect_timeout;
    if matches!(cluster.config.discovery, Discovery::OriginalDst) {
        let dst = conn
            .original_dst
            .ok_or_else(|| ProxyError::new(ErrorKind::NoHealthyUpstream, "no original destination"))?;
        return ctx.pools.connect_tcp(dst, timeout).await.map(|s| (s, dst));
    }
    let mut tried = Vec::new();
    let mut last = None;
    for _ in 0..2 {
        let Some(ep) = cluster.pick(&tried) else {
            break;
        };
        tried.push(ep.addr);
        match ctx.pools.connect_tcp(ep.addr, timeout).await {
            Ok(s) => return Ok((s, ep.addr)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        ProxyError::new(ErrorKind::NoHealthyUpstream, format!("no healthy endpoint in {cluster_name}"))
    }))
}

/// Resolves when no byte moved for `timeout`.
async fn idle(timeout: Option<Duration>, activity: Arc<AtomicU64>, started: Instant) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    loop {
        let last = Duration::from_millis(activity.load(Ordering::Relaxed));
        let since = started.elapsed().saturating_sub(last);
        if since >= timeout {
            return;
        }
        tokio::time::sleep(timeout - since).await;
    }
}

/// A stream that counts bytes read and stamps the time of the last activity.
struct Metered<S> {
    inner: S,
    read: u64,
    activity: Arc<AtomicU64>,
    started: Instant,
}

impl<S> Metered<S> {
    fn new(inner: S, activity: Arc<AtomicU64>, started: Instant) -> Self {
        Metered { inner, read: 0, activity, started }
    }
    fn touch(&self) {
        self.activity.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read += n as u64;
            self.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
