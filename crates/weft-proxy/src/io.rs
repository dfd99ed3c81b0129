//! Byte streams that report activity: bytes read, and whether a byte moved either way,
//! so idle timeouts can be enforced without a timer or a clock read per read, and that
//! read from their stream again only once it can have something new ([`Tracked`]); and
//! [`WakeGated`], which keeps a connection's rarely-firing watchers from being polled at
//! each of its wake-ups.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use futures::task::AtomicWaker;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::error::ErrorKind;

/// Activity shared by the two sides of a connection.
///
/// A read or write only raises a flag (no clock read: reading the clock at every I/O
/// call was ~1% of a saturated sidecar's samples, issue 20); the idle watcher
/// ([`Activity::idle`]) looks at the flag every [`idle_tick`] and takes the time of
/// that look as the time of the last activity. The idle timeout therefore fires between
/// `timeout` and `timeout + idle_tick(timeout)` after the last byte moved (or the last
/// stream closed), where a timestamp per byte would make it fire at `timeout` exactly.
#[derive(Debug)]
pub struct Activity {
    /// Raised by every byte moved and every stream closed; lowered by the idle watcher.
    moved: AtomicBool,
    /// Requests (streams) currently open on the connection.
    pub active: AtomicUsize,
}

impl Activity {
    /// Starts tracking now.
    pub fn new() -> Arc<Self> {
        Arc::new(Activity { moved: AtomicBool::new(false), active: AtomicUsize::new(0) })
    }

    /// Records that something moved. A load first: while the flag is up (most calls),
    /// the shared cache line is only read, not written.
    fn touch(&self) {
        if !self.moved.load(Ordering::Relaxed) {
            self.moved.store(true, Ordering::Relaxed);
        }
    }

    /// Resolves once nothing moved for `timeout` while no stream was open (never when
    /// `timeout` is `None`): Envoy's connection idle timeout, within one
    /// [`idle_tick`] (see [`Activity`]). Polled again only when its timer fired
    /// ([`WakeGated`]), not at every wake-up of the connection's task.
    pub fn idle(&self, timeout: Option<Duration>) -> WakeGated<impl Future<Output = ()> + Send + '_> {
        WakeGated::new(self.idle_inner(timeout))
    }

    async fn idle_inner(&self, timeout: Option<Duration>) {
        let Some(timeout) = timeout else { return std::future::pending().await };
        let tick = idle_tick(timeout);
        // The last look that found activity (or the start): the last byte moved at most
        // one tick before it.
        let mut last = Instant::now();
        loop {
            let now = Instant::now();
            if self.moved.swap(false, Ordering::Relaxed) {
                last = now;
            } else if now.saturating_duration_since(last) >= timeout && self.active.load(Ordering::Relaxed) == 0 {
                return;
            }
            // Every tick, or at the timeout if that is sooner: a longer sleep could not
            // tell when, within it, the flag went up.
            let due = last + timeout;
            tokio::time::sleep_until(if due > now { due.min(now + tick) } else { now + tick }).await;
        }
    }

    /// Counts an open stream until the guard drops.
    pub fn open_stream(self: &Arc<Self>) -> StreamGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.clone())
    }
}

/// How often the idle watcher of a connection with idle timeout `timeout` looks for
/// activity: a sixteenth of the timeout (at least 10 ms), so the timeout fires at most
/// ~6% late; a connection with Envoy's default of one hour is looked at every 225 s.
pub fn idle_tick(timeout: Duration) -> Duration {
    (timeout / 16).max(Duration::from_millis(10))
}

/// A future polled only on its first poll and after one of the wakers it registered
/// fired; otherwise polling it returns `Pending` at the cost of an atomic swap.
///
/// `tokio::select!` polls every pending branch whenever its task wakes. A downstream
/// connection's task wakes several times per request (request bytes in, response ready,
/// response written) while its watchers — the idle timeout, a filter chain change — almost
/// never fire; polling them again at every wake-up re-registered a timer waker and a
/// `watch` waiter each time (~1k instructions per request per sidecar, callgrind: see
/// bench/notes.md, wip-wake). Behind the gate they run only when their own waker fired.
/// Boxes the inner future once (per connection, not per request).
pub struct WakeGated<F> {
    inner: Pin<Box<F>>,
    gate: Arc<Gate>,
}

/// What [`WakeGated`]'s inner future and [`Tracked`]'s stream wake: a flag, then the task
/// polling the gate.
#[derive(Debug, Default)]
struct Gate {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl std::task::Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> WakeGated<F> {
    /// Gates `inner`; its first poll goes through.
    pub fn new(inner: F) -> Self {
        let gate = Gate { woken: AtomicBool::new(true), task: AtomicWaker::new() };
        WakeGated { inner: Box::pin(inner), gate: Arc::new(gate) }
    }
}

impl<F: Future> Future for WakeGated<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        // Register before testing the flag: a wake-up between the two then finds the
        // current task and polls it again.
        self.gate.task.register(cx.waker());
        if !self.gate.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(self.gate.clone());
        self.inner.as_mut().poll(&mut TaskContext::from_waker(&waker))
    }
}

impl<F> std::fmt::Debug for WakeGated<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WakeGated").field("gate", &self.gate).finish_non_exhaustive()
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

/// A stream that counts bytes read and records activity ([`Activity`]), and reads from
/// `inner` again after a `Pending` only once the waker that read registered has fired.
///
/// hyper's HTTP/1 connection reads at each wake-up of its task (to notice a close
/// between requests) and h2 at each poll of its connection, so a downstream connection
/// read ~3 times per request only to hear `Pending` again; over TLS each of those went
/// down through tokio-rustls, rustls and the socket's readiness (~0.5k instructions;
/// bench/notes.md, wip-conn). Here `inner` reads with a waker of this stream's own (a
/// flag, then the reading task's waker, as [`WakeGated`]): until it fires, nothing can
/// have arrived (a stream answers `Pending` only with no data left and its waker
/// registered), and the read answers `Pending` at once, the registration still standing.
#[derive(Debug)]
pub struct Tracked<S> {
    inner: S,
    /// Bytes read from `inner`.
    pub read: u64,
    activity: Arc<Activity>,
    /// `inner`'s last read was `Pending`.
    parked: bool,
    /// What `inner`'s reads register: raises the flag and wakes the reading task.
    gate: Arc<Gate>,
    /// `gate` as a waker, made once.
    gate_waker: Waker,
}

impl<S> Tracked<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        let gate = Arc::new(Gate::default());
        let gate_waker = Waker::from(gate.clone());
        Tracked { inner, read: 0, activity, parked: false, gate, gate_waker }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        // Register before testing the flag: a wake-up between the two finds this task.
        this.gate.task.register(cx.waker());
        let woken = this.gate.woken.swap(false, Ordering::AcqRel);
        if this.parked && !woken {
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(&mut TaskContext::from_waker(&this.gate_waker), buf);
        this.parked = r.is_pending();
        let n = buf.filled().len() - before;
        if n > 0 {
            this.read += n as u64;
            this.activity.touch();
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

/// A stream that first yields `prefix` (bytes already read from `inner`), then `inner`.
#[derive(Debug)]
pub struct Replay<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Replay<S> {
    /// `inner`, read after `prefix`.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Replay { prefix, at: 0, inner }
    }

    /// `inner` with nothing to replay.
    pub fn plain(inner: S) -> Self {
        Replay { prefix: Vec::new(), at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A future that counts its polls and keeps the last waker it was given.
    struct Probe {
        polls: Arc<AtomicUsize>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
        ready: Arc<AtomicBool>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.ready.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    /// The point of the gate: polling it again without a wake-up of its own does not
    /// poll the inner future; its waker firing does, and the gate resolves with it.
    #[test]
    fn a_gated_future_is_polled_only_after_its_own_wake_up() {
        let (polls, waker, ready) = (Arc::new(AtomicUsize::new(0)), Arc::default(), Arc::new(AtomicBool::new(false)));
        let mut gated = WakeGated::new(Probe { polls: polls.clone(), waker: Arc::clone(&waker), ready: ready.clone() });
        let task = futures::task::noop_waker();
        let mut cx = TaskContext::from_waker(&task);
        for _ in 0..3 {
            assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled again without being woken");
        ready.store(true, Ordering::SeqCst);
        let inner: Option<Waker> = waker.lock().unwrap().take();
        inner.expect("the inner future registered a waker").wake();
        assert!(Pin::new(&mut gated).poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    /// The wake-up reaches the task that polled the gate last.
    #[test]
    fn the_inner_wake_up_wakes_the_polling_task() {
        let (polls, waker, ready) = (Arc::new(AtomicUsize::new(0)), Arc::default(), Arc::new(AtomicBool::new(false)));
        let mut gated = WakeGated::new(Probe { polls, waker: Arc::clone(&waker), ready });
        let (task, count) = futures_test_waker();
        let mut cx = TaskContext::from_waker(&task);
        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        let inner: Option<Waker> = waker.lock().unwrap().take();
        inner.expect("registered").wake();
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    /// A waker counting its wake-ups.
    fn futures_test_waker() -> (Waker, Arc<AtomicUsize>) {
        struct Count(Arc<AtomicUsize>);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(AtomicUsize::new(0));
        (Waker::from(Arc::new(Count(count.clone()))), count)
    }

    /// A stream whose reads are counted: `Pending` (its waker kept) until data is given.
    #[derive(Default)]
    struct Reads {
        calls: usize,
        data: Vec<u8>,
        waker: Option<Waker>,
    }

    struct CountedReads(Arc<std::sync::Mutex<Reads>>);

    impl AsyncRead for CountedReads {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut TaskContext<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let mut s = self.0.lock().unwrap();
            s.calls += 1;
            if s.data.is_empty() {
                s.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            buf.put_slice(&std::mem::take(&mut s.data));
            Poll::Ready(Ok(()))
        }
    }

    /// After a `Pending`, reads do not go down to the stream until the waker it
    /// registered fires; that wake-up reaches the reading task, and the next read gets
    /// the data.
    #[test]
    fn a_read_after_pending_waits_for_the_streams_own_wake_up() {
        let state = Arc::new(std::sync::Mutex::new(Reads::default()));
        let mut tracked = Tracked::new(CountedReads(state.clone()), Activity::new());
        let (task, woken) = futures_test_waker();
        let mut cx = TaskContext::from_waker(&task);
        let mut bytes = [0u8; 8];
        for _ in 0..3 {
            assert!(Pin::new(&mut tracked).poll_read(&mut cx, &mut ReadBuf::new(&mut bytes)).is_pending());
        }
        assert_eq!(state.lock().unwrap().calls, 1, "read the stream again without its wake-up");
        let stream_waker = {
            let mut s = state.lock().unwrap();
            s.data = b"GET".to_vec();
            s.waker.take().expect("the stream kept a waker")
        };
        stream_waker.wake();
        assert_eq!(woken.load(Ordering::SeqCst), 1, "the reading task is woken");
        let mut buf = ReadBuf::new(&mut bytes);
        assert!(matches!(Pin::new(&mut tracked).poll_read(&mut cx, &mut buf), Poll::Ready(Ok(()))));
        assert_eq!(buf.filled(), b"GET");
        assert_eq!(tracked.read, 3);
    }

    /// Reads that return data do not hold the next read back.
    #[test]
    fn reads_that_return_data_go_straight_through() {
        let state = Arc::new(std::sync::Mutex::new(Reads::default()));
        let mut tracked = Tracked::new(CountedReads(state.clone()), Activity::new());
        let (task, _) = futures_test_waker();
        let mut cx = TaskContext::from_waker(&task);
        let mut bytes = [0u8; 8];
        for round in 1..=3 {
            state.lock().unwrap().data = b"x".to_vec();
            assert!(Pin::new(&mut tracked).poll_read(&mut cx, &mut ReadBuf::new(&mut bytes)).is_ready());
            assert_eq!(state.lock().unwrap().calls, round);
        }
    }

    /// The idle timeout still fires behind the gate, and only once nothing moved for it.
    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_fires_behind_the_gate() {
        let activity = Activity::new();
        let started = tokio::time::Instant::now();
        activity.idle(Some(Duration::from_secs(5))).await;
        assert!(started.elapsed() >= Duration::from_secs(5));
        let stream = activity.open_stream();
        let open = tokio::time::timeout(Duration::from_secs(30), activity.idle(Some(Duration::from_secs(5)))).await;
        assert!(open.is_err(), "an open stream keeps the connection from idling out");
        drop(stream);
    }

    /// The idle timeout counts from the last byte moved, not from the connection's
    /// start, and fires within one tick of `timeout` after it.
    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_counts_from_the_last_byte_moved() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let timeout = Duration::from_secs(5);
        let activity = Activity::new();
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut tracked = Tracked::new(ours, activity.clone());
        let started = Instant::now();
        let idle = activity.idle(Some(timeout));
        tokio::pin!(idle);
        // Three seconds in, a byte arrives and is read.
        assert!(tokio::time::timeout(Duration::from_secs(3), idle.as_mut()).await.is_err());
        theirs.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        tracked.read_exact(&mut byte).await.unwrap();
        assert_eq!(tracked.read, 1);
        let moved = Instant::now();
        idle.await;
        let fired = Instant::now();
        assert!(fired - moved >= timeout, "fired {:?} after the last byte", fired - moved);
        assert!(fired - moved <= timeout + idle_tick(timeout), "fired {:?} after the last byte", fired - moved);
        assert!(fired - started > timeout + Duration::from_secs(2));
    }

    /// A closed stream counts as activity: the timeout starts over when it closes.
    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_counts_from_the_last_stream_closed() {
        let timeout = Duration::from_secs(5);
        let activity = Activity::new();
        let stream = activity.open_stream();
        let idle = activity.idle(Some(timeout));
        tokio::pin!(idle);
        assert!(tokio::time::timeout(Duration::from_secs(20), idle.as_mut()).await.is_err());
        drop(stream);
        let closed = Instant::now();
        idle.await;
        let waited = Instant::now() - closed;
        assert!(waited >= timeout && waited <= timeout + idle_tick(timeout), "fired {waited:?} after the close");
    }
}
