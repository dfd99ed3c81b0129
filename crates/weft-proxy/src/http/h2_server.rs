//! The downstream HTTP/2 server: the `h2` crate driven from the connection's own task.
//!
//! hyper's HTTP/2 server spawned a task per stream (`H2Stream`), moved the request's
//! future into it and handed the response back through its own machinery: per request a
//! task allocation, a spawn and the wake-ups between the stream's task and the
//! connection's (issue 20). Here one future, [`Server`], is the whole connection: it
//! polls the `h2` connection (reads frames, accepts streams, writes what the streams
//! queued) and the streams' futures, kept in a [`FuturesUnordered`] polled from the same
//! task. No task is spawned per stream and nothing goes through a channel.
//!
//! Fairness and back-pressure stay as with a task per stream: `FuturesUnordered` polls
//! only the streams whose wakers fired (one stream's progress does not poll the others)
//! and yields to the runtime after a bounded number of polls; a stream waiting on its
//! upstream, its request body or send window is `Pending` and costs nothing; flow control
//! is h2's, per stream and per connection. What changes is that the streams of one
//! connection share one thread at a time, as the connection's frames always did.
//!
//! The connection settings are hyper's server defaults, so the wire is unchanged.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::task::AtomicWaker;
use h2::server::{Connection, Handshake, SendResponse};
use h2::{Reason, RecvStream, SendStream};
use http::header::{HeaderName, CONNECTION, CONTENT_LENGTH, DATE, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tracing::debug;

use crate::cluster::h2_client::Pipe;
use crate::cluster::BoxBody;

// hyper 1.x's HTTP/2 server defaults (`proto::h2::server::Config::default`): the
// settings a downstream HTTP/2 client saw before.
const CONN_WINDOW: u32 = 1024 * 1024;
const STREAM_WINDOW: u32 = 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER_SIZE: usize = 400 * 1024;
const MAX_CONCURRENT_STREAMS: u32 = 200;
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// Most polls of the h2 connection within one poll of the server (usually one or two:
/// the requests read, then the answers written).
const MAX_CONN_POLLS: u32 = 4;

/// The future serving one stream (request and response), boxed once per stream.
pub type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Builds the future serving each stream a client opens.
///
/// A trait rather than an `FnMut` bound: a bound naming `StreamFuture` (a `dyn ... +
/// 'static`) on the `Future` impl made the connection future's `Send` unprovable inside
/// the listener's task (rustc: "implementation of `Send` is not general enough").
pub trait NewStream {
    /// The future serving the stream of `req`, answered through `respond`.
    fn open(&mut self, req: Request<RecvStream>, respond: SendResponse<Bytes>) -> StreamFuture;
}

/// One downstream HTTP/2 connection and the streams it carries.
pub struct Server<IO, F> {
    state: State<IO>,
    streams: FuturesUnordered<StreamFuture>,
    /// Builds the future serving a stream the client opened.
    new_stream: F,
    /// `graceful_shutdown` was asked for during the handshake.
    shutdown_pending: bool,
    /// Whether the h2 connection has anything to do (see [`ConnWake`]).
    conn_wake: Arc<ConnWake>,
    /// `conn_wake` as the waker the h2 connection is polled with.
    conn_waker: Waker,
}

/// The h2 connection's own waker, so that it is polled only when it has something to
/// do: its socket became ready, or a stream queued frames or released capacity (h2
/// wakes the connection's task then). The connection task also wakes for its streams
/// (an upstream response arrived, say); without this, each of those wake-ups polled the
/// h2 connection too (its locks, a read attempt, a flush: ~2 connection polls more per
/// request, bench/notes.md).
///
/// While [`Server::poll`] runs (`in_poll`), a wake only marks the connection (`woken`):
/// the poll checks the mark before it returns, so a stream answering inside the poll
/// does not cost the task a second poll just to write the answer out.
#[derive(Debug, Default)]
struct ConnWake {
    woken: AtomicBool,
    in_poll: AtomicBool,
    task: AtomicWaker,
}

impl Wake for ConnWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        // Outside the poll, the task must come back for it. (Inside, the poll sees the
        // mark: it clears `in_poll` before its last look at `woken`.)
        if !self.in_poll.load(Ordering::SeqCst) {
            self.task.wake();
        }
    }
}

enum State<IO> {
    Handshaking(Handshake<IO, Bytes>),
    Serving(Connection<IO, Bytes>),
}

impl<IO, F> Server<IO, F>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: NewStream,
{
    /// Starts the handshake over `io` (the client's preface, then the settings).
    /// `max_header_list_size` is the filter chain's limit on request headers (h2 answers
    /// 431 above it, as hyper's server did through it).
    pub fn new(io: IO, max_header_list_size: u32, new_stream: F) -> Self {
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_header_list_size(max_header_list_size)
            .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
            .max_send_buffer_size(MAX_SEND_BUFFER_SIZE)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
        let conn_wake = Arc::new(ConnWake::default());
        // The first poll after the handshake polls the connection.
        conn_wake.woken.store(true, Ordering::SeqCst);
        Server {
            state: State::Handshaking(builder.handshake(io)),
            streams: FuturesUnordered::new(),
            new_stream,
            shutdown_pending: false,
            conn_waker: Waker::from(conn_wake.clone()),
            conn_wake,
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin, F> Server<IO, F> {
    /// Drains: a GOAWAY now (or once the handshake is done); the connection ends when
    /// the streams already open have finished.
    pub fn graceful_shutdown(&mut self) {
        match &mut self.state {
            State::Handshaking(_) => self.shutdown_pending = true,
            State::Serving(conn) => {
                conn.graceful_shutdown();
                // The GOAWAY is the connection's to send at its next poll.
                self.conn_wake.woken.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// Nothing in it is pinned in place: the h2 connection and handshake are `Unpin` over an
/// `Unpin` IO, the stream futures are boxed.
impl<IO: Unpin, F> Unpin for Server<IO, F> {}

impl<IO, F> Future for Server<IO, F>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: NewStream,
{
    type Output = Result<(), h2::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let conn = match &mut this.state {
            State::Handshaking(hs) => {
                let mut conn = std::task::ready!(Pin::new(hs).poll(cx))?;
                if this.shutdown_pending {
                    conn.graceful_shutdown();
                }
                this.state = State::Serving(conn);
                let State::Serving(conn) = &mut this.state else { unreachable!("just set") };
                conn
            }
            State::Serving(conn) => conn,
        };
        let wake = &*this.conn_wake;
        wake.task.register(cx.waker());
        wake.in_poll.store(true, Ordering::SeqCst);
        let mut conn_cx = Context::from_waker(&this.conn_waker);
        let mut conn_polls = 0;
        loop {
            // The streams first: what they queue (a response, body data) is written by
            // the connection's poll below, in this same poll of the task.
            while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(cx) {}
            if !wake.woken.swap(false, Ordering::SeqCst) {
                wake.in_poll.store(false, Ordering::SeqCst);
                // A wake between the swap and the store left its mark: look once more.
                if !wake.woken.swap(false, Ordering::SeqCst) {
                    return Poll::Pending;
                }
                wake.in_poll.store(true, Ordering::SeqCst);
            }
            if conn_polls == MAX_CONN_POLLS {
                // Woken again and again within one poll (tokio's cooperative budget
                // spent: the socket answers Pending and wakes at once): yield to the
                // runtime and come back, rather than spin here.
                wake.woken.store(true, Ordering::SeqCst);
                wake.in_poll.store(false, Ordering::SeqCst);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            conn_polls += 1;
            // The connection: reads frames, writes what is queued, accepts new streams
            // (polled again in this loop: their first poll, and what they queue).
            loop {
                match conn.poll_accept(&mut conn_cx) {
                    Poll::Ready(Some(Ok((req, respond)))) => {
                        this.streams.push(this.new_stream.open(req, respond));
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    // Closed (GOAWAY and no stream left, or the client went away): the
                    // streams left, if any, can send nothing more.
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
        }
    }
}

/// Serves one stream: runs `handle` (the request's future) until it answers, unless
/// the client resets the stream first (then `handle` is dropped, cancelling whatever it
/// was doing upstream), and sends the response. A `CONNECT` stream (`connect`) answered
/// with a 2xx becomes the tunnel's downstream end ([`H2Tunnel`]), as hyper's server made it.
pub async fn serve_stream<H>(mut respond: SendResponse<Bytes>, handle: H, connect: Option<ConnectParts>)
where
    H: Future<Output = Response<BoxBody>>,
{
    let mut handle = std::pin::pin!(handle);
    let resp = poll_fn(|cx| {
        if let Poll::Ready(resp) = handle.as_mut().poll(cx) {
            return Poll::Ready(Some(resp));
        }
        match respond.poll_reset(cx) {
            Poll::Ready(reason) => {
                debug!(?reason, "downstream stream reset before its response: request cancelled");
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    let Some(resp) = resp else { return };
    let (mut head, body) = resp.into_parts();
    strip_connection_headers(&mut head.headers);
    // `date` goes out as a never-indexed literal (what HAProxy's encoder does for every
    // header): its value changes each second, and the h2 crate's encoder walks every
    // earlier value of a name, oldest first, before inserting a new one. On a connection
    // some minutes old that was the whole dynamic table of past dates (~50 comparisons,
    // ~5k instructions) per response; the literal costs ~22 bytes on the wire.
    match head.headers.entry(DATE) {
        http::header::Entry::Occupied(mut e) => e.get_mut().set_sensitive(true),
        http::header::Entry::Vacant(e) => {
            let mut v = date::now();
            v.set_sensitive(true);
            e.insert(v);
        }
    }
    if let Some(connect) = connect.filter(|_| head.status.is_success()) {
        // The tunnel's bytes follow as DATA frames: no length, no end of stream.
        head.headers.remove(CONTENT_LENGTH);
        match respond.send_response(Response::from_parts(head, ()), false) {
            Ok(send) => {
                let tunnel = H2Tunnel { send, recv: connect.recv, unread: Bytes::new() };
                if connect.tunnel.send(tunnel).is_err() {
                    debug!("CONNECT answered but nobody waits for its tunnel");
                }
            }
            Err(e) => debug!(error = %e, "sending a CONNECT response on a downstream HTTP/2 stream"),
        }
        return;
    }
    let eos = body.is_end_stream();
    if !eos {
        if let Some(len) = body.size_hint().exact() {
            head.headers.entry(CONTENT_LENGTH).or_insert_with(|| HeaderValue::from(len));
        }
    }
    match respond.send_response(Response::from_parts(head, ()), eos) {
        Ok(tx) if !eos => {
            if let Err(e) = Pipe::new(body, tx, "response body failed, resetting the downstream stream").await {
                debug!(error = %e, "downstream HTTP/2 response body ended early");
            }
        }
        Ok(_) => {}
        Err(e) => {
            debug!(error = %e, "sending a response head on a downstream HTTP/2 stream");
            respond.send_reset(Reason::INTERNAL_ERROR);
        }
    }
}

/// What a `CONNECT` stream keeps aside for its tunnel while the request is handled.
pub struct ConnectParts {
    /// The stream's incoming half: the tunnel's bytes from the client.
    pub recv: RecvStream,
    /// Where the tunnel goes once the CONNECT is answered with a 2xx.
    pub tunnel: oneshot::Sender<H2Tunnel>,
}

/// A `CONNECT` request's promise of its tunnel (in the request's extensions, which want
/// `Clone`: taken once, by `http::tunnel::connect`).
#[derive(Clone, Debug)]
pub struct PendingTunnel(Arc<Mutex<Option<oneshot::Receiver<H2Tunnel>>>>);

impl PendingTunnel {
    /// A promise and the [`ConnectParts`] that keep it.
    pub fn new(recv: RecvStream) -> (PendingTunnel, ConnectParts) {
        let (tunnel, rx) = oneshot::channel();
        (PendingTunnel(Arc::new(Mutex::new(Some(rx)))), ConnectParts { recv, tunnel })
    }

    /// The tunnel, once the CONNECT is answered (an error when it was not, with a 2xx).
    pub fn take(&self) -> Option<oneshot::Receiver<H2Tunnel>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}

/// An HTTP/2 `CONNECT` stream as a byte stream: DATA frames in, DATA frames out, within
/// the client's flow control; shutting it down ends the stream.
#[derive(Debug)]
pub struct H2Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not yet read.
    unread: Bytes,
}

impl AsyncRead for H2Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.unread.is_empty() {
            match std::task::ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The stream is gone when this fails; the next read reports it.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.unread = data;
                }
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Tunnel {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.send;
        send.reserve_capacity(data.len());
        while send.capacity() == 0 {
            match std::task::ready!(send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
                None => return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            }
        }
        let n = send.capacity().min(data.len());
        send.send_data(Bytes::copy_from_slice(&data[..n]), false).map_err(std::io::Error::other)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // Already ended or reset: nothing more to end.
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

/// Removes what HTTP/2 forbids in a response (RFC 9113 §8.2.2; h2 refuses to send a
/// head carrying any), as hyper's server did: connection-specific headers, those named
/// by `Connection`, and `TE`.
fn strip_connection_headers(h: &mut HeaderMap) {
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    // One pass over the names: most responses carry none of these.
    if !h.keys().any(|n| {
        n == CONNECTION || n == TRANSFER_ENCODING || n == UPGRADE || n == TE || n == KEEP_ALIVE || n == PROXY_CONNECTION
    }) {
        return;
    }
    if let Some(named) = h.remove(CONNECTION) {
        if let Ok(names) = named.to_str() {
            for name in names.split(',') {
                h.remove(name.trim());
            }
        }
    }
    for n in [TRANSFER_ENCODING, UPGRADE, KEEP_ALIVE, PROXY_CONNECTION, TE] {
        h.remove(n);
    }
}

/// The `Date` header hyper's server added to responses without one.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    use http::HeaderValue;

    thread_local! {
        /// The second last rendered and its value: rendered once a second per thread.
        static CACHE: RefCell<Option<(u64, HeaderValue)>> = const { RefCell::new(None) };
    }

    /// Now, as an HTTP date (`Mon, 07 Dec 2026 14:00:00 GMT`).
    pub fn now() -> HeaderValue {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            match &*c {
                Some((s, v)) if *s == secs => v.clone(),
                _ => {
                    let v = HeaderValue::from_str(&httpdate::fmt_http_date(now))
                        .unwrap_or_else(|_| HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"));
                    *c = Some((secs, v.clone()));
                    v
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_specific_headers_are_stripped_from_responses() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("close, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_connection_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    /// The first HEADERS frame's header block on stream 1, read from a raw client's
    /// side of the connection (frames: 9-byte header, then the payload).
    async fn first_response_block(io: &mut tokio::io::DuplexStream) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        loop {
            let mut head = [0u8; 9];
            io.read_exact(&mut head).await.unwrap();
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            io.read_exact(&mut payload).await.unwrap();
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            if head[3] == 0x1 && stream == 1 {
                // No PADDED or PRIORITY flag from h2's encoder.
                assert_eq!(head[4] & 0x28, 0, "unexpected flags {:#x}", head[4]);
                return payload;
            }
        }
    }

    /// The date (the application's, and the one weft adds) leaves as a never-indexed
    /// literal: HPACK's `0001` pattern with the static name index 33 (`0x1f 0x12`), not
    /// inserted into the dynamic table (`0x61`, with incremental indexing), where every
    /// new value made the encoder walk all earlier ones.
    #[tokio::test]
    async fn the_date_is_sent_as_a_never_indexed_literal() {
        use tokio::io::AsyncWriteExt;
        for app_date in [Some("Mon, 07 Dec 2026 10:00:00 GMT"), None] {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let serve = tokio::spawn(async move {
                let mut conn = h2::server::handshake(server).await.unwrap();
                let (_req, respond) = conn.accept().await.unwrap().unwrap();
                let mut resp = Response::new(crate::http::body::full(Bytes::new()));
                if let Some(d) = app_date {
                    resp.headers_mut().insert(DATE, HeaderValue::from_static(d));
                }
                let driver = tokio::spawn(async move { while conn.accept().await.is_some() {} });
                serve_stream(respond, async { resp }, None).await;
                driver.abort_handle()
            });
            client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
            // Empty SETTINGS, then HEADERS (END_STREAM | END_HEADERS) on stream 1: GET
            // (0x82), http (0x86), / (0x84), :authority "a" (literal, indexed name 1).
            client.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]).await.unwrap();
            let block = [0x82, 0x86, 0x84, 0x41, 0x01, b'a'];
            client.write_all(&[0, 0, block.len() as u8, 0x1, 0x5, 0, 0, 0, 1]).await.unwrap();
            client.write_all(&block).await.unwrap();
            let got = first_response_block(&mut client).await;
            // :status 200 (static index 8), then the date.
            assert_eq!(got[0], 0x88, "{got:x?}");
            assert_eq!(&got[1..3], &[0x1f, 0x12], "date not a never-indexed literal: {got:x?}");
            serve.await.unwrap().abort();
        }
    }

    #[test]
    fn the_date_is_an_http_date() {
        let v = date::now();
        assert!(httpdate::parse_http_date(v.to_str().unwrap()).is_ok(), "{v:?}");
    }
}
