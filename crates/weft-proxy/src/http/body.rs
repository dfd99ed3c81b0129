//! Body wrappers: count bytes as they pass and finish the request's telemetry when the
//! response body ends (or is dropped because a side went away).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use std::future::Future;
use tokio::time::{Instant as TokioInstant, Sleep};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::cluster::h2_client::H2Body;
use crate::cluster::BoxBody;
use crate::context::Context;
use crate::error::ErrorKind;
use crate::io::BodyTally;
use crate::io::StreamGuard;
use crate::report::HttpReport;

/// Type-erased body error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Boxes any body into [`BoxBody`].
pub fn boxed<B>(b: B) -> BoxBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed_unsync()
}

/// A request body as the downstream connection delivers it: hyper's, on HTTP/1.x; the
/// stream's, read with `h2` directly, on HTTP/2 (see [`super::h2_server`]).
#[derive(Debug)]
pub enum DownstreamBody {
    /// From hyper's HTTP/1 server.
    Http1(hyper::body::Incoming),
    /// From an HTTP/2 stream.
    Http2(H2Body),
    /// None: an HTTP/2 CONNECT, whose stream carries the tunnel instead.
    Empty,
}

impl Body for DownstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // Errors are boxed as they happen (rarely), not per frame.
        match self.get_mut() {
            DownstreamBody::Http1(b) => Pin::new(b).poll_frame(cx).map(|f| f.map(|r| r.map_err(Into::into))),
            DownstreamBody::Http2(b) => Pin::new(b).poll_frame(cx).map(|f| f.map(|r| r.map_err(Into::into))),
            DownstreamBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            DownstreamBody::Http1(b) => b.is_end_stream(),
            DownstreamBody::Http2(b) => b.is_end_stream(),
            DownstreamBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            DownstreamBody::Http1(b) => b.size_hint(),
            DownstreamBody::Http2(b) => b.size_hint(),
            DownstreamBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A body of `bytes`.
///
/// No bytes make an empty body: it has no size, so boxing it allocates nothing (a
/// `Full` of no bytes behaves the same, ended at once with an exact length of 0, but
/// takes an allocation; every GET forwarded with a retry policy sends one per attempt).
pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    let bytes = bytes.into();
    if bytes.is_empty() {
        return boxed(http_body_util::Empty::<Bytes>::new());
    }
    boxed(http_body_util::Full::new(bytes))
}

/// A body that keeps `T` alive (a circuit-breaker permit, say) until it is dropped.
///
/// Generic over the body it wraps (the box around a response is made once, outside
/// all wrappers, instead of once per layer).
pub struct Hold<B, T> {
    inner: B,
    _held: T,
}

impl<B, T> Hold<B, T> {
    /// Wraps `inner`, holding `held` for the body's lifetime.
    pub fn new(inner: B, held: T) -> Self {
        Hold { inner, _held: held }
    }
}

impl<B, T> Body for Hold<B, T>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
    T: Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An upstream response body bounded in time: the route's overall deadline (Envoy's
/// route timeout covers the whole response) and the stream idle timeout (no frame for
/// that long). Either ends the body with an error, which resets the downstream stream.
///
/// The timers are armed only when the body has to wait for a frame: a response whose
/// frames are ready when asked (most small ones) is checked against the clock and never
/// allocates or registers a timer (two timer-wheel insertions and removals per response
/// before). The clock is read at most once per poll, and only for a route deadline not
/// yet armed or when the body starts waiting: the idle timeout counts from the first
/// wait after the latest frame (the frame itself only raises a flag), which differs
/// from the time of the frame by the time the downstream took to take it (Envoy also
/// counts the downstream's activity as activity).
pub struct DeadlineBody<B = BoxBody> {
    inner: B,
    idle: Option<Duration>,
    /// When the stream idle timeout fires, once the body has waited.
    idle_at: Option<TokioInstant>,
    /// A frame went by since `idle_at` was set: the next wait moves it on.
    moved: bool,
    idle_timer: Option<Pin<Box<Sleep>>>,
    deadline: Option<TokioInstant>,
    deadline_timer: Option<Pin<Box<Sleep>>>,
}

/// One reading of the clock, taken when first asked for within a poll.
struct Now(Option<TokioInstant>);

impl Now {
    fn get(&mut self) -> TokioInstant {
        *self.0.get_or_insert_with(TokioInstant::now)
    }
}

impl<B> DeadlineBody<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, idle: Option<Duration>, deadline: Option<Instant>) -> Self {
        DeadlineBody {
            inner,
            idle,
            idle_at: None,
            moved: true,
            idle_timer: None,
            deadline: deadline.map(TokioInstant::from),
            deadline_timer: None,
        }
    }

    /// True when the route deadline has passed: asks the timer once armed, else the clock.
    fn deadline_passed(&mut self, cx: &mut TaskContext<'_>, now: &mut Now) -> bool {
        let Some(at) = self.deadline else { return false };
        match self.deadline_timer.as_mut() {
            Some(t) => t.as_mut().poll(cx).is_ready(),
            None => now.get() >= at,
        }
    }

    /// The body waits for a frame: arms both timers (the idle one a stream idle timeout
    /// from now when a frame went by since it was last set) so that either wakes the
    /// task; the timeout that has already fired, if any.
    fn arm(&mut self, cx: &mut TaskContext<'_>, now: &mut Now) -> Result<(), BodyTimeout> {
        if let Some(at) = self.deadline {
            let t = self.deadline_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if t.as_mut().poll(cx).is_ready() {
                return Err(BodyTimeout::Route);
            }
        }
        if let Some(idle) = self.idle {
            if std::mem::take(&mut self.moved) {
                self.idle_at = Some(now.get() + idle);
            }
        }
        if let Some(at) = self.idle_at {
            let t = self.idle_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if t.deadline() != at {
                t.as_mut().reset(at);
            }
            if t.as_mut().poll(cx).is_ready() {
                return Err(BodyTimeout::Idle);
            }
        }
        Ok(())
    }
}

/// Why a [`DeadlineBody`] ended early.
#[derive(Debug, thiserror::Error)]
pub enum BodyTimeout {
    /// The route timeout passed mid-response.
    #[error("upstream request timeout")]
    Route,
    /// No frame within the stream idle timeout.
    #[error("stream idle timeout")]
    Idle,
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut now = Now(None);
        if this.deadline_passed(cx, &mut now) {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout::Route))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(f) => {
                this.moved = true;
                Poll::Ready(f)
            }
            Poll::Pending => match this.arm(cx, &mut now) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Some(Err(Box::new(e)))),
            },
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Classifies an error reading a request body from the downstream: the client went
/// away (`DC`: connection closed or reset, stream cancelled) or sent something
/// malformed (`DPE`: bad chunked encoding, length mismatch, HTTP/2 protocol error).
pub fn downstream_body_error(e: &(dyn std::error::Error + 'static)) -> ErrorKind {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                return ErrorKind::DownstreamClosed;
            }
        }
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            if h2e.is_io() || (h2e.is_remote() && (h2e.is_reset() || h2e.is_go_away())) {
                return ErrorKind::DownstreamClosed;
            }
            return ErrorKind::DownstreamProtocol;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as Io;
            if matches!(io.kind(), Io::UnexpectedEof | Io::ConnectionReset | Io::ConnectionAborted | Io::BrokenPipe) {
                return ErrorKind::DownstreamClosed;
            }
        }
        source = s.source();
    }
    ErrorKind::DownstreamProtocol
}

/// A request body on its way upstream: counts its bytes and records a failure to read
/// it from the downstream in a shared [`BodyTally`].
pub struct CountingBody<B = BoxBody> {
    inner: B,
    tally: Arc<BodyTally>,
}

impl<B> CountingBody<B> {
    /// Wraps `inner` (the body read from the downstream).
    pub fn new(inner: B, tally: Arc<BodyTally>) -> Self {
        CountingBody { inner, tally }
    }
}

impl<B> Body for CountingBody<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.tally.add(d.len() as u64);
                }
            }
            Poll::Ready(Some(Err(e))) => self.tally.fail(downstream_body_error(e.as_ref())),
            _ => {}
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response body sent downstream: counts bytes, notes the gRPC status from the
/// trailers, and reports the request when it ends or is dropped.
pub struct ReportingBody {
    inner: BoxBody,
    ctx: Arc<Context>,
    report: Option<Box<HttpReport>>,
    stream: Option<StreamGuard>,
}

impl ReportingBody {
    /// Wraps `inner`; `report` is finished exactly once, and the stream counts as open
    /// on its connection until then.
    pub fn new(inner: BoxBody, ctx: Arc<Context>, report: Box<HttpReport>, stream: StreamGuard) -> Self {
        ReportingBody { inner, ctx, report: Some(report), stream: Some(stream) }
    }

    fn finish(&mut self, error: bool) {
        if let Some(mut r) = self.report.take() {
            if error {
                r.downstream_or_upstream_reset();
            }
            r.finish(&self.ctx);
        }
        self.stream.take();
    }
}

impl Body for ReportingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    if let Some(rep) = self.report.as_mut() {
                        rep.response_bytes += d.len() as u64;
                    }
                } else if let Some(t) = f.trailers_ref() {
                    if let (Some(rep), Some(s)) = (self.report.as_mut(), t.get("grpc-status")) {
                        rep.grpc_status = s.to_str().ok().map(str::to_string);
                    }
                }
                if self.inner.is_end_stream() {
                    self.finish(false);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(true),
            Poll::Ready(None) => self.finish(false),
            Poll::Pending => {}
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ReportingBody {
    fn drop(&mut self) {
        // Dropped before the end: the downstream went away mid-response.
        let early = self.report.is_some() && !self.inner.is_end_stream();
        self.finish(early);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use http_body_util::BodyExt;

    use super::{boxed, full, BodyTimeout, DeadlineBody};

    #[tokio::test(start_paused = true)]
    async fn deadline_body_with_ready_frames_arms_no_timer() {
        let route = Instant::now() + Duration::from_secs(15);
        let mut body =
            DeadlineBody::new(full(Bytes::from_static(b"hello")), Some(Duration::from_secs(300)), Some(route));
        let data = (&mut body).collect().await.expect("the body ends normally").to_bytes();
        assert_eq!(&data[..], b"hello");
        assert!(body.idle_timer.is_none() && body.deadline_timer.is_none(), "no timer for frames that were ready");
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_body_that_stalls_ends_at_the_idle_timeout() {
        let stalled = http_body_util::StreamBody::new(futures::stream::pending::<
            Result<http_body::Frame<Bytes>, std::io::Error>,
        >());
        let started = tokio::time::Instant::now();
        let body = DeadlineBody::new(boxed(stalled), Some(Duration::from_secs(5)), None);
        let err = body.collect().await.expect_err("the stalled body fails");
        assert!(matches!(err.downcast_ref::<BodyTimeout>(), Some(BodyTimeout::Idle)), "{err}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(5) && waited < Duration::from_secs(6), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_body_that_stalls_ends_at_the_route_deadline() {
        let stalled = http_body_util::StreamBody::new(futures::stream::pending::<
            Result<http_body::Frame<Bytes>, std::io::Error>,
        >());
        let started = tokio::time::Instant::now();
        let route = Instant::now() + Duration::from_secs(2);
        let body = DeadlineBody::new(boxed(stalled), Some(Duration::from_secs(5)), Some(route));
        let err = body.collect().await.expect_err("the stalled body fails");
        assert!(matches!(err.downcast_ref::<BodyTimeout>(), Some(BodyTimeout::Route)), "{err}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(3), "{waited:?}");
    }

    /// The stream idle timeout counts from the latest frame (the first wait after it),
    /// not from the start of the body.
    #[tokio::test(start_paused = true)]
    async fn deadline_body_idle_timeout_counts_from_the_latest_frame() {
        use futures::StreamExt;
        let late_frame = futures::stream::once(async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from_static(b"x")))
        })
        .chain(futures::stream::pending());
        let started = tokio::time::Instant::now();
        let body =
            DeadlineBody::new(boxed(http_body_util::StreamBody::new(late_frame)), Some(Duration::from_secs(5)), None);
        let err = body.collect().await.expect_err("the stalled body fails");
        assert!(matches!(err.downcast_ref::<BodyTimeout>(), Some(BodyTimeout::Idle)), "{err}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(8) && waited < Duration::from_secs(9), "{waited:?}");
    }
}
