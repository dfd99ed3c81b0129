//! The upstream HTTP/2 client: the `h2` crate driven from the request's own task.
//!
//! hyper's HTTP/2 client (`hyper::client::conn::http2`) hands each request over a
//! channel to its connection-side dispatch task, which opens the stream and spawns one
//! more task per request to await the response and send it back through a oneshot (and a
//! third to pipe a request body). On a one-thread runtime that is two or three task hops
//! and wake-ups per request (issue 20, bench/notes.md). Here the request's task opens the
//! stream itself (`SendRequest::ready`, `send_request`) and awaits the response in place;
//! only the connection (the `h2::client::Connection` future) has a task of its own, and a
//! request body that is not complete when the stream opens (a gRPC stream, an upload) gets
//! a pipe task, as with hyper.
//!
//! The connection settings are hyper's client defaults, so the wire is unchanged.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use h2::client::{Connection, SendRequest};
use h2::{Reason, RecvStream, SendStream};
use http::header::{HeaderName, CONNECTION, CONTENT_LENGTH, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

use super::pool::{BoxBody, UpstreamStream};
use crate::coalesce::Coalesced;
use crate::error::{ErrorKind, ProxyError};

/// hyper's HTTP/2 client defaults (`hyper::proto::h2::client`), kept so peers see the
/// same SETTINGS and windows as before: 5 MiB connection and 2 MiB stream receive
/// windows (the spec's 64 KiB throttles a single fast stream), 16 KiB frames, a 16 KiB
/// header list, 1 MiB of buffered send data per stream, 100 streams before the peer's
/// SETTINGS arrive, at most 1024 streams reset for local errors, no server push. hyper's
/// keep-alive pings and adaptive window are off by default and were never turned on.
const CONN_WINDOW: u32 = 5 * 1024 * 1024;
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER_SIZE: usize = 1024 * 1024;
const INITIAL_MAX_SEND_STREAMS: usize = 100;
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// Opens streams on one upstream HTTP/2 connection.
pub type H2Sender = SendRequest<Bytes>;

/// The connection's I/O and protocol state: a future that runs until the connection ends.
pub type H2Connection = Connection<Coalesced<UpstreamStream>, Bytes>;

/// A response body read from an upstream HTTP/2 stream. Received data is handed back to
/// flow control as it is passed on; dropping the body before its end resets the stream
/// (h2 sends `RST_STREAM(CANCEL)` once no handle to the stream is left, that is once a
/// request body pipe, if any, has finished too).
#[derive(Debug)]
pub struct H2Body {
    recv: RecvStream,
    /// The response's content-length minus the data passed on so far, when it had one.
    remaining: Option<u64>,
    /// A content-length means that much data follows (not so for a response to HEAD,
    /// nor a 204 or 304, which end with their headers).
    length_owed: bool,
    data_done: bool,
    /// The stream is known to have ended: [`Body::is_end_stream`] answers without taking
    /// h2's stream-store lock (~400 instructions a call, several calls per response).
    ended: AtomicBool,
}

/// Copies a body onto an HTTP/2 stream as the peer's flow control allows; then its
/// trailers or end of stream. A body error resets the stream (the peer must not take a
/// truncated body as complete); a reset from the peer stops the copy. Used for request
/// bodies not complete when their upstream stream opened, and for downstream responses
/// (`http::h2_server`).
pub(crate) struct Pipe {
    body: BoxBody,
    tx: SendStream<Bytes>,
    /// A data frame waiting for send capacity, and whether it ends the body.
    pending: Option<(Bytes, bool)>,
    /// What the debug log says when the body fails.
    failed: &'static str,
}

impl Pipe {
    /// Copies `body` onto `tx`; `failed` is logged (debug) when the body fails.
    pub(crate) fn new(body: BoxBody, tx: SendStream<Bytes>, failed: &'static str) -> Self {
        Pipe { body, tx, pending: None, failed }
    }
}

/// A [`Pipe`] running as its own task, stopped (the stream reset) when the request gives
/// up on the response before it arrives.
struct PipeTask {
    pipe: Pipe,
    cancelled: Option<oneshot::Receiver<()>>,
}

/// Held while the response is awaited: dropped early (a timeout, the downstream went
/// away), it tells the pipe task to reset the stream.
struct CancelPipe(Option<oneshot::Sender<()>>);

/// Performs the HTTP/2 handshake over `io` with hyper's default settings.
pub async fn handshake(
    io: Coalesced<UpstreamStream>,
    addr: SocketAddr,
) -> Result<(H2Sender, H2Connection), ProxyError> {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER_SIZE)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .enable_push(false);
    builder.handshake(io).await.map_err(|e| map_h2_error(addr, &e, true))
}

/// Sends `req` on a stream of the connection behind `tx` (ready: see
/// [`SendRequest::ready`]) and awaits the response head in place. A request body that
/// is not complete once the stream is open is piped by a task of its own. `stripped`:
/// the caller removed the connection-specific headers already (the forwarding path),
/// so they are not looked for again.
pub async fn send(
    mut tx: H2Sender,
    addr: SocketAddr,
    req: Request<BoxBody>,
    stripped: bool,
) -> Result<Response<H2Body>, ProxyError> {
    let (parts, body) = req.into_parts();
    let mut head = Request::from_parts(parts, ());
    if stripped {
        debug_assert!(
            {
                let mut checked = head.headers().clone();
                strip_connection_headers(&mut checked);
                checked == *head.headers()
            },
            "a caller vouched for headers HTTP/2 forbids"
        );
    } else {
        strip_connection_headers(head.headers_mut());
    }
    if let Some(len) = body.size_hint().exact() {
        // As hyper: a body of known length announces it (not an empty GET, HEAD, DELETE).
        if len != 0 || !matches!(*head.method(), Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT) {
            head.headers_mut().entry(CONTENT_LENGTH).or_insert_with(|| HeaderValue::from(len));
        }
    }
    let eos = body.is_end_stream();
    let head_request = head.method() == Method::HEAD;
    let (response, stream) = tx.send_request(head, eos).map_err(|e| map_h2_error(addr, &e, true))?;
    drop(tx);
    let mut cancel = CancelPipe(None);
    if !eos {
        let mut pipe = Pipe::new(body, stream, "request body failed, resetting the upstream stream");
        // A body already complete (buffered for retries, say) goes out now, without a task.
        let done = poll_fn(|cx| Poll::Ready(Pin::new(&mut pipe).poll(cx).is_ready())).await;
        if !done {
            let (stop, cancelled) = oneshot::channel();
            cancel.0 = Some(stop);
            tokio::spawn(PipeTask { pipe, cancelled: Some(cancelled) });
        }
    }
    let result = response.await;
    cancel.disarm();
    let resp = result.map_err(|e| map_h2_error(addr, &e, false))?;
    let remaining = content_length(resp.headers());
    let length_owed = !head_request && !matches!(resp.status().as_u16(), 204 | 304);
    Ok(resp.map(|recv| H2Body::new(recv, remaining, length_owed)))
}

/// Maps an h2 error as hyper's were mapped: a refused stream, and a stream beyond the
/// last one a GOAWAY accepted, were never processed (`not_sent`: safe to retry); anything
/// else resets the request, unsent only when `not_sent` (the stream was never opened).
pub fn map_h2_error(addr: SocketAddr, e: &h2::Error, not_sent: bool) -> ProxyError {
    if e.reason() == Some(Reason::REFUSED_STREAM) {
        return ProxyError::new(ErrorKind::RefusedStream, format!("{addr}: http2 error: {e}")).not_sent();
    }
    if e.is_go_away() && e.is_remote() {
        // h2 fails only streams above GOAWAY's last-stream-id this way.
        return ProxyError::new(ErrorKind::UpstreamReset, format!("{addr}: http2 error: {e}")).not_sent();
    }
    let err = ProxyError::new(ErrorKind::UpstreamReset, format!("{addr}: http2 error: {e}"));
    if not_sent {
        err.not_sent()
    } else {
        err
    }
}

impl H2Body {
    /// `recv`'s body; `remaining` is its content-length, when it announced one;
    /// `length_owed` when that length is data to come (not for a response to HEAD, a 204
    /// or a 304).
    pub(crate) fn new(recv: RecvStream, remaining: Option<u64>, length_owed: bool) -> Self {
        // A stream that already ended has no body, whatever its headers said.
        let remaining = if remaining.is_none() && recv.is_end_stream() { Some(0) } else { remaining };
        H2Body { recv, remaining, length_owed, data_done: false, ended: AtomicBool::new(false) }
    }

    /// Ends the body: `is_end_stream` is true from now on.
    fn end<T>(&self, last: Poll<Option<T>>) -> Poll<Option<T>> {
        self.ended.store(true, Ordering::Relaxed);
        last
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match this.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    // The stream is gone when this fails; the next poll reports it.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(r) = this.remaining.as_mut() {
                        *r = r.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // A reset with NO_ERROR: the peer has all it wanted and ends the stream.
                Poll::Ready(Some(Err(e))) if e.reason() == Some(Reason::NO_ERROR) => {
                    return this.end(Poll::Ready(None))
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => this.data_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        match this.recv.poll_trailers(cx) {
            Poll::Ready(Ok(t)) => this.end(Poll::Ready(t.map(|t| Ok(Frame::trailers(t))))),
            Poll::Ready(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => this.end(Poll::Ready(None)),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Answered without h2's lock while the answer is known: true once the body ended,
    /// false while its content-length promises more data (hyper's HTTP/1 dispatcher asks
    /// before the first frame and after each one). Only a body that may have ended (its
    /// length reached, none given, or a response that has no body whatever its length
    /// says) asks h2, and remembers a true answer.
    fn is_end_stream(&self) -> bool {
        if self.ended.load(Ordering::Relaxed) {
            return true;
        }
        if self.length_owed && self.remaining.is_some_and(|r| r > 0) {
            return false;
        }
        let ended = self.recv.is_end_stream();
        if ended {
            self.ended.store(true, Ordering::Relaxed);
        }
        ended
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining.map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

impl Future for Pipe {
    type Output = Result<(), h2::Error>;

    /// The body first: a frame that is already there goes out without asking h2 about a
    /// reset (each question takes h2's stream-store lock); the peer's reset is looked for
    /// when the pipe has to wait (on the body, or for send window), so that it still
    /// stops a pipe that waits. A reset stream that is sent to fails the send.
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            if let Some((data, eos)) = this.pending.take() {
                if let Poll::Ready(reset) = this.tx.poll_reset(cx) {
                    // The peer reset the stream (or the connection is gone): stop sending.
                    return Poll::Ready(Err(reset.map_or_else(|e| e, h2::Error::from)));
                }
                while this.tx.capacity() == 0 {
                    match this.tx.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                        Poll::Ready(None) => return Poll::Ready(Err(h2::Error::from(Reason::CANCEL))),
                        Poll::Pending => {
                            this.pending = Some((data, eos));
                            return Poll::Pending;
                        }
                    }
                }
                this.tx.send_data(data, eos)?;
                if eos {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let frame = match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(Some(Err(e))) => {
                    // The peer must not take a truncated body as complete.
                    let reason = h2_reason(&*e).unwrap_or(Reason::INTERNAL_ERROR);
                    tracing::debug!(error = %e, ?reason, "{}", this.failed);
                    this.tx.send_reset(reason);
                    return Poll::Ready(Err(h2::Error::from(reason)));
                }
                Poll::Ready(None) => return Poll::Ready(this.tx.send_data(Bytes::new(), true)),
                Poll::Pending => {
                    // Waiting on the body: the peer's reset must still end the pipe.
                    if let Poll::Ready(reset) = this.tx.poll_reset(cx) {
                        return Poll::Ready(Err(reset.map_or_else(|e| e, h2::Error::from)));
                    }
                    return Poll::Pending;
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    let eos = this.body.is_end_stream();
                    if data.has_remaining() && !eos {
                        // Waits for (some) window before handing h2 the frame, so a fast
                        // body does not pile up in h2's send buffer.
                        this.tx.reserve_capacity(1);
                        this.pending = Some((data, eos));
                    } else {
                        // The last frame (a small response's only one) goes to h2 at once:
                        // nothing is read after it, so nothing piles up, and h2 sends it
                        // as the peer's window allows (it asks for the capacity itself):
                        // one of h2's stream-store locks instead of five (two reset
                        // checks, reserving and reading capacity, the send).
                        this.tx.send_data(data, eos)?;
                        if eos {
                            return Poll::Ready(Ok(()));
                        }
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        this.tx.reserve_capacity(0);
                        this.tx.send_trailers(trailers)?;
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }
}

impl Future for PipeTask {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if let Some(rx) = this.cancelled.as_mut() {
            match Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(())) => {
                    this.pipe.tx.send_reset(Reason::CANCEL);
                    return Poll::Ready(());
                }
                // The response arrived (or failed): the body keeps flowing on its own.
                Poll::Ready(Err(_)) => this.cancelled = None,
                Poll::Pending => {}
            }
        }
        match Pin::new(&mut this.pipe).poll(cx) {
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "upstream request body ended early");
                Poll::Ready(())
            }
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl CancelPipe {
    /// The response arrived (or failed): the pipe, if any, carries on alone.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for CancelPipe {
    fn drop(&mut self) {
        if let Some(stop) = self.0.take() {
            let _ = stop.send(());
        }
    }
}

/// The reason of the first h2 error in `e`'s chain of sources (a downstream stream reset).
pub(crate) fn h2_reason(e: &(dyn std::error::Error + 'static)) -> Option<Reason> {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            return h2e.reason();
        }
        source = s.source();
    }
    None
}

/// Removes what HTTP/2 forbids (RFC 9113 §8.2.2; h2 refuses to send a request carrying
/// any): connection-specific headers and a `TE` other than `trailers`. The forwarding
/// path already dropped them; other senders (mirrors, trace export) may not have.
fn strip_connection_headers(h: &mut HeaderMap) {
    // One pass over the names: most requests carry none of these.
    if !has_connection_headers(h) {
        return;
    }
    if let Some(named) = h.remove(CONNECTION) {
        if let Ok(names) = named.to_str() {
            for name in names.split(',') {
                h.remove(name.trim());
            }
        }
    }
    for n in [TRANSFER_ENCODING, UPGRADE, KEEP_ALIVE, PROXY_CONNECTION] {
        h.remove(n);
    }
    if h.get(TE).is_some_and(|te| te != "trailers") {
        h.remove(TE);
    }
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// True when `h` names a connection-specific header (or `TE`, allowed as `trailers`).
fn has_connection_headers(h: &HeaderMap) -> bool {
    h.keys().any(|n| {
        n == CONNECTION || n == TRANSFER_ENCODING || n == UPGRADE || n == TE || n == KEEP_ALIVE || n == PROXY_CONNECTION
    })
}

/// The content-length all of `h`'s Content-Length values agree on (hyper's rule: a
/// value may also be a comma-separated list of the same length); None when absent,
/// malformed or conflicting.
pub(crate) fn content_length(h: &HeaderMap) -> Option<u64> {
    let mut found = None;
    let mut agree = |n: u64| match found {
        Some(f) if f != n => None,
        _ => {
            found = Some(n);
            Some(())
        }
    };
    for v in h.get_all(CONTENT_LENGTH) {
        // One plain number, nearly always: read as is, without splitting.
        match digits(v.as_bytes()) {
            Some(n) => agree(n)?,
            None => {
                for part in v.as_bytes().split(|&b| b == b',') {
                    agree(digits(part.trim_ascii())?)?;
                }
            }
        }
    }
    found
}

/// A non-empty run of ASCII digits as a number (no sign, no overflow).
fn digits(b: &[u8]) -> Option<u64> {
    if b.is_empty() {
        return None;
    }
    b.iter().try_fold(0u64, |n, &d| {
        let d = d.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lengths(values: &[&'static str]) -> Option<u64> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(CONTENT_LENGTH, HeaderValue::from_static(v));
        }
        content_length(&h)
    }

    /// The last frame of a body is handed to h2 at once: the pipe finishes while the
    /// peer's window is still closed, and h2 sends the data once the peer opens it.
    #[tokio::test]
    async fn a_bodys_last_frame_does_not_wait_for_send_window() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.expect("server handshake");
            let (_req, mut respond) = conn.accept().await.expect("a request").expect("accepted");
            let tx = respond.send_response(Response::new(()), false).expect("response head");
            let mut pipe = Pipe::new(crate::http::body::full(&b"0123456789"[..]), tx, "test body failed");
            let finished = poll_fn(|cx| Poll::Ready(Pin::new(&mut pipe).poll(cx).is_ready())).await;
            tokio::spawn(async move { poll_fn(|cx| conn.poll_closed(cx)).await });
            finished
        });
        let mut builder = h2::client::Builder::new();
        builder.initial_window_size(0);
        let (mut sender, mut conn) = builder.handshake::<_, Bytes>(client_io).await.expect("client handshake");
        let (open, mut opened) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut open_once = Some(&mut opened);
            poll_fn(|cx| {
                if let Some(rx) = open_once.as_mut() {
                    if Pin::new(&mut **rx).poll(cx).is_ready() {
                        open_once = None;
                        conn.set_initial_window_size(65_535).expect("window setting");
                    }
                }
                Pin::new(&mut conn).poll(cx)
            })
            .await
        });
        let (response, _) = sender.send_request(Request::new(()), true).expect("request sent");
        let mut body = response.await.expect("response head").into_body();
        assert!(server.await.expect("server task"), "the pipe finished with the window closed");
        open.send(()).expect("client connection running");
        let data = body.data().await.expect("a data frame").expect("data");
        assert_eq!(&data[..], b"0123456789");
    }

    #[test]
    fn content_length_follows_hypers_rule() {
        assert_eq!(lengths(&[]), None);
        assert_eq!(lengths(&["42"]), Some(42));
        assert_eq!(lengths(&["42", "42"]), Some(42));
        assert_eq!(lengths(&["42, 42"]), Some(42));
        assert_eq!(lengths(&["42", "43"]), None);
        assert_eq!(lengths(&["42,43"]), None);
        assert_eq!(lengths(&["+42"]), None);
        assert_eq!(lengths(&[""]), None);
        assert_eq!(lengths(&["99999999999999999999"]), None);
    }
}
