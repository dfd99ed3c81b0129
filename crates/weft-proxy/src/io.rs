//! Byte streams that report activity: bytes read, and the time of the last byte either
//! way, so idle timeouts can be enforced without a timer per read.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ErrorKind;

/// Activity shared by the two sides of a connection.
#[derive(Debug)]
pub struct Activity {
    started: Instant,
    last_ms: AtomicU64,
    /// Requests (streams) currently open on the connection.
    pub active: AtomicUsize,
}

impl Activity {
    /// Starts tracking now.
    pub fn new() -> Arc<Self> {
        Arc::new(Activity { started: Instant::now(), last_ms: AtomicU64::new(0), active: AtomicUsize::new(0) })
    }

    fn touch(&self) {
        self.last_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the last byte moved.
    pub fn idle_for(&self) -> Duration {
        self.started.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Resolves once nothing moved for `timeout` while no stream was open (never when
    /// `timeout` is `None`): Envoy's connection idle timeout.
    pub async fn idle(&self, timeout: Option<Duration>) {
        let Some(timeout) = timeout else { return std::future::pending().await };
        loop {
            let idle = self.idle_for();
            if idle >= timeout && self.active.load(Ordering::Relaxed) == 0 {
                return;
            }
            tokio::time::sleep(timeout.saturating_sub(idle).max(Duration::from_millis(50))).await;
        }
    }

    /// Counts an open stream until the guard drops.
    pub fn open_stream(self: &Arc<Self>) -> StreamGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.clone())
    }
}

/// Closes a stream's count on drop.
#[derive(Debug)]
pub struct StreamGuard(Arc<Activity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream that counts bytes read and stamps activity.
#[derive(Debug)]
pub struct Tracked<S> {
    inner: S,
    /// Bytes read from `inner`.
    pub read: u64,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Tracked { inner, read: 0, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
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
            self.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What passed through a request body on its way upstream: the bytes read from the
/// downstream and, when reading failed, whose failure it was. Shared between the body
/// (polled by the upstream connection) and the request's telemetry and error handling,
/// so a send error caused by the *downstream* is never blamed on the upstream.
#[derive(Debug, Default)]
pub struct BodyTally {
    bytes: AtomicU64,
    /// 0: no failure; else a [`ErrorKind`] code (see [`BodyTally::fail`]).
    failure: AtomicU8,
}

impl BodyTally {
    /// Bytes of body read from the downstream so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Adds `n` bytes read.
    pub fn add(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Records that reading from the downstream failed (`DownstreamProtocol` or
    /// `DownstreamClosed`); the first failure wins.
    pub fn fail(&self, kind: ErrorKind) {
        let code = match kind {
            ErrorKind::DownstreamClosed => 2,
            _ => 1,
        };
        let _ = self.failure.compare_exchange(0, code, Ordering::Release, Ordering::Relaxed);
    }

    /// The downstream failure recorded while reading the body, if any.
    pub fn failure(&self) -> Option<ErrorKind> {
        match self.failure.load(Ordering::Acquire) {
            0 => None,
            2 => Some(ErrorKind::DownstreamClosed),
            _ => Some(ErrorKind::DownstreamProtocol),
        }
    }
}
