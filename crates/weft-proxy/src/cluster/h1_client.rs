//! The upstream HTTP/1.1 client: a pooled connection driven from the request's own task.
//!
//! hyper's client (`hyper::client::conn::http1`) gave each connection a task of its own:
//! a request went to it over a channel, its head came back through a oneshot and its
//! body through another channel, so every request cost two channel sends and one or two
//! more task wake-ups and polls (issue 20, bench/notes.md). Here a connection is an owned
//! value ([`H1Conn`]: the stream, its read buffer, counters and breaker slot). The
//! request's task takes it from the pool, writes the request (head and a body already at
//! hand in one write), reads the response head, and hands the connection to the response
//! body ([`H1Body`]), which reads the rest and gives the connection back to its pool when
//! the body ended cleanly and the connection may carry another request. Dropped anywhere
//! else, the connection closes, and its counters and breaker slot are released.
//!
//! The wire is hyper's: the same framing of request bodies, the same head limits, 1xx
//! interim responses skipped ([`super::h1_codec`]).

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderValue, CONNECTION};
use http::{HeaderMap, Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::ewma::Slot;
use super::h1_codec::{self, Chunk, Decoded, Framing, HeadError, ResponseFraming};
use super::h1_pool::Home;
use super::pool::{BoxBody, Principal, UpstreamStream};
use crate::error::{ErrorKind, ProxyError};

/// Bytes asked of the socket per read (hyper's initial read buffer).
const READ_SIZE: usize = 8192;
/// Body data up to this size is copied behind the head (one write); larger frames are
/// written from their own buffer.
const COPY_MAX: usize = 16 * 1024;
/// A write buffer grown beyond this by a large request is not kept with the connection.
const KEEP_WBUF: usize = 64 * 1024;

/// An upstream HTTP/1.1 connection, owned by the pool while idle and by one request (then
/// its response body) while busy. Boxed: it moves between the pool, the request's future
/// and the body.
#[derive(Debug)]
pub struct H1Conn(Box<Conn>);

#[derive(Debug)]
pub(crate) struct Conn {
    io: UpstreamStream,
    /// Read but not yet consumed.
    rbuf: BytesMut,
    /// The next write (kept to be reused by the next request).
    wbuf: Vec<u8>,
    /// The SPIFFE id the upstream's certificate proved.
    pub(crate) principal: Principal,
    pub(crate) opened: Instant,
    /// When a checkout or prune first saw it idle; None while busy.
    pub(crate) idle_since: Option<Instant>,
    /// Requests sent on it.
    pub(crate) uses: u32,
    /// The upstream answered HTTP/1.0: requests go as HTTP/1.0 with `keep-alive` (hyper
    /// does the same once it has seen an HTTP/1.0 response).
    http10: bool,
    _open: Gauge,
    /// Counted among the endpoint's pooled connections while set.
    pooled: Option<Gauge>,
    /// The cluster's `max_connections` slot, when it has a breaker.
    _slot: Option<Slot>,
}

/// One in a shared counter while it lives.
#[derive(Debug)]
pub(crate) struct Gauge(Arc<AtomicUsize>);

/// A response body read from an upstream HTTP/1.1 connection.
#[derive(Debug)]
pub struct H1Body {
    state: Read,
    /// The connection while the body is read from it.
    conn: Option<H1Conn>,
    /// Where the connection goes once the body ended cleanly; None: it is closed.
    home: Option<Home>,
    /// The rest of a request body the upstream answered before its end: written on while
    /// the response is read (as Envoy does), dropped when the response ends.
    upload: Option<Box<Upload>>,
}

/// A request body on its way out: what is queued, its encoder, the body itself.
#[derive(Debug)]
struct Upload {
    body: BoxBody,
    out: Out,
    enc: Encoder,
    flushed: bool,
}

#[derive(Debug)]
enum Read {
    /// Nothing left.
    Done,
    /// The whole body, read with the head (the connection is already back).
    Full(Bytes),
    /// This many bytes left (content-length).
    Length(u64),
    /// Chunked.
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    UntilClose,
}

/// A request that failed; `back` when nothing of it was written, so it can go again.
pub(crate) struct Failed {
    pub(crate) err: ProxyError,
    pub(crate) back: Option<Request<BoxBody>>,
}

/// The request's bytes on their way out.
#[derive(Debug)]
struct Out {
    buf: Vec<u8>,
    pos: usize,
    /// A large data frame, written after `buf`.
    big: Option<Bytes>,
    /// Bytes written so far.
    written: usize,
}

/// Encodes the request body's frames as its framing says.
#[derive(Debug)]
struct Encoder {
    framing: Framing,
    /// Body bytes still owed under a content-length.
    left: u64,
    /// The previous chunk's CRLF is not written yet.
    crlf_owed: bool,
    /// The body ended but its end (the last chunk) waits for `big` to be written.
    end_owed: Option<Option<HeaderMap>>,
    done: bool,
}

impl Gauge {
    pub(crate) fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Gauge(Arc::clone(counter))
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl H1Conn {
    /// A new connection over `io`, counted in `open` and holding `slot` until it closes.
    pub(crate) fn new(io: UpstreamStream, open: &Arc<AtomicUsize>, slot: Option<Slot>) -> Self {
        let principal = io.peer_principal();
        H1Conn(Box::new(Conn {
            io,
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
            principal,
            opened: Instant::now(),
            idle_since: None,
            uses: 0,
            http10: false,
            _open: Gauge::new(open),
            pooled: None,
            _slot: slot,
        }))
    }

    /// Its bookkeeping.
    pub(crate) fn state(&mut self) -> &mut Conn {
        &mut self.0
    }

    /// Counts it among the endpoint's pooled connections (those kept for reuse) or not.
    pub(crate) fn set_pooled(&mut self, pooled: Option<&Arc<AtomicUsize>>) {
        match (pooled, &self.0.pooled) {
            (Some(p), None) => self.0.pooled = Some(Gauge::new(p)),
            (None, Some(_)) => self.0.pooled = None,
            _ => {}
        }
    }

    /// True when an idle connection cannot take a request: the upstream closed it, it
    /// failed, or it sent bytes no request asked for. Reads once without waiting
    /// (`cx`'s waker is registered when nothing is there, which is harmless: the
    /// connection is read again soon or dropped).
    pub(crate) fn is_stale(&mut self, cx: &mut Context<'_>) -> bool {
        let c = &mut *self.0;
        if !c.rbuf.is_empty() {
            return true;
        }
        // Whatever is read means the connection cannot be used: a small buffer will do,
        // and the connection's own keeps its spare room for the response.
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 64];
        let mut rb = ReadBuf::uninit(&mut probe);
        !matches!(Pin::new(&mut c.io).poll_read(cx, &mut rb), Poll::Pending)
    }
}

impl Conn {
    /// Reads what the socket has into `rbuf`; Ok(0) at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < 1024 {
            self.rbuf.reserve(READ_SIZE);
        }
        let n = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf))?;
        Poll::Ready(Ok(n))
    }
}

impl Out {
    fn has_data(&self) -> bool {
        self.pos < self.buf.len() || self.big.is_some()
    }

    /// Writes everything queued.
    fn poll_write(&mut self, io: &mut UpstreamStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let head = &self.buf[self.pos..];
            let n = match &self.big {
                None if head.is_empty() => break,
                None => ready!(Pin::new(&mut *io).poll_write(cx, head))?,
                Some(big) if head.is_empty() => ready!(Pin::new(&mut *io).poll_write(cx, big))?,
                Some(big) => {
                    let bufs = [io::IoSlice::new(head), io::IoSlice::new(big)];
                    ready!(Pin::new(&mut *io).poll_write_vectored(cx, &bufs))?
                }
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
            let in_head = n.min(head.len());
            self.pos += in_head;
            if let Some(big) = &mut self.big {
                big.advance(n - in_head);
                if big.is_empty() {
                    self.big = None;
                }
            }
        }
        self.buf.clear();
        self.pos = 0;
        Poll::Ready(Ok(()))
    }

    fn push(&mut self, data: Bytes) {
        if data.len() <= COPY_MAX {
            self.buf.extend_from_slice(&data);
        } else {
            self.big = Some(data);
        }
    }
}

impl Encoder {
    fn new(framing: Framing) -> Self {
        let (left, done) = match framing {
            Framing::Length(n) => (n, n == 0),
            Framing::Chunked(_) => (0, false),
        };
        Encoder { framing, left, crlf_owed: false, end_owed: None, done }
    }

    /// Queues one frame of the body; `eos` when the body said it ended with it.
    fn encode(&mut self, frame: Frame<Bytes>, eos: bool, out: &mut Out) -> io::Result<()> {
        match frame.into_data() {
            Ok(data) => {
                match self.framing {
                    Framing::Length(_) => {
                        if data.len() as u64 > self.left {
                            return Err(io::Error::other("request body longer than its content-length"));
                        }
                        self.left -= data.len() as u64;
                        if !data.is_empty() {
                            out.push(data);
                        }
                        if self.left == 0 {
                            self.done = true;
                        } else if eos {
                            return Err(io::Error::other("request body shorter than its content-length"));
                        }
                    }
                    Framing::Chunked(_) => {
                        if !data.is_empty() {
                            if self.crlf_owed {
                                out.buf.extend_from_slice(b"\r\n");
                            }
                            h1_codec::encode_chunk_size(data.len(), &mut out.buf);
                            out.push(data);
                            self.crlf_owed = true;
                        }
                        if eos {
                            self.end_owed = Some(None);
                        }
                    }
                }
                Ok(())
            }
            Err(frame) => {
                let trailers = frame.into_trailers().ok();
                self.finish(trailers, out)
            }
        }
    }

    /// The body ended (with `trailers`).
    fn finish(&mut self, trailers: Option<HeaderMap>, out: &mut Out) -> io::Result<()> {
        match self.framing {
            Framing::Length(_) if self.left > 0 => {
                Err(io::Error::other("request body shorter than its content-length"))
            }
            Framing::Length(_) => {
                self.done = true;
                Ok(())
            }
            Framing::Chunked(_) => {
                self.end_owed = Some(trailers);
                self.write_end(out);
                Ok(())
            }
        }
    }

    /// Writes an owed last chunk once no large frame is before it.
    fn write_end(&mut self, out: &mut Out) {
        if out.big.is_some() {
            return;
        }
        let (Some(trailers), Framing::Chunked(allowed)) = (self.end_owed.take(), &self.framing) else {
            return;
        };
        if self.crlf_owed {
            out.buf.extend_from_slice(b"\r\n");
            self.crlf_owed = false;
        }
        h1_codec::encode_last_chunk(trailers.as_ref(), allowed, &mut out.buf);
        self.done = true;
    }
}

impl Upload {
    /// Writes the body's frames as they come (those at hand join what is queued: the
    /// head and a complete body leave in one write). Ready(Ok) once all is written and
    /// flushed; `polled` is set once a frame was taken from the body.
    fn poll(&mut self, io: &mut UpstreamStream, cx: &mut Context<'_>, polled: &mut bool) -> Poll<Result<(), String>> {
        let Upload { body, out, enc, flushed } = self;
        loop {
            let mut more = false;
            if !enc.done && out.big.is_none() && out.buf.len() < KEEP_WBUF {
                if enc.end_owed.is_some() {
                    enc.write_end(out);
                    more = true;
                } else if let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx) {
                    *polled = true;
                    let queued = match frame {
                        Some(Ok(frame)) => {
                            let eos = body.is_end_stream();
                            enc.encode(frame, eos, out)
                        }
                        Some(Err(e)) => Err(io::Error::other(e)),
                        None => enc.finish(None, out),
                    };
                    if let Err(e) = queued {
                        return Poll::Ready(Err(format!("request body: {e}")));
                    }
                    more = true;
                }
            }
            if more && !enc.done {
                continue;
            }
            if out.has_data() {
                match out.poll_write(io, cx) {
                    Poll::Ready(Ok(())) => *flushed = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.to_string())),
                    Poll::Pending => return Poll::Pending,
                }
                if !enc.done {
                    continue;
                }
            }
            if !*flushed {
                match Pin::new(&mut *io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => *flushed = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.to_string())),
                    Poll::Pending => return Poll::Pending,
                }
            }
            return if enc.done { Poll::Ready(Ok(())) } else { Poll::Pending };
        }
    }

    /// Everything was written.
    fn finished(&self) -> bool {
        self.enc.done && !self.out.has_data() && self.flushed
    }
}

/// Sends `req` on `conn` and reads the response head, from the request's own task.
/// `home`: where the connection goes once the response is read, when it may carry
/// another request (None: it closes after this response).
///
/// A request body already complete goes with the head in one write; one still coming is
/// written as it comes while the response is watched. A final response head arriving
/// before the body's end is returned at once; the body goes on being written while the
/// response is read (an upstream may answer and stream while it still reads, as Envoy and
/// hyper allow), and stops when the response ends; the connection then closes (Envoy resets
/// the stream, closing an HTTP/1 connection, when the response completes first).
pub(crate) async fn send(
    mut conn: H1Conn,
    addr: SocketAddr,
    req: Request<BoxBody>,
    mut home: Option<Home>,
) -> Result<Response<H1Body>, Failed> {
    let (mut parts, body) = req.into_parts();
    let c = &mut *conn.0;
    let framing = h1_codec::frame_request(
        &parts.method,
        &mut parts.headers,
        body.is_end_stream(),
        body.size_hint().exact(),
        c.http10,
    );
    if h1_codec::wants_close(&parts.headers) {
        home = None;
    } else if c.http10 && !parts.headers.get_all(CONNECTION).iter().any(|v| h1_codec::has_token(v, b"keep-alive")) {
        parts.headers.append(CONNECTION, HeaderValue::from_static("keep-alive"));
    }
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut out = Out { buf: std::mem::take(&mut c.wbuf), pos: 0, big: None, written: 0 };
    h1_codec::encode_head(&parts.method, path, c.http10, &parts.headers, &mut out.buf);
    let mut up = Upload { body, out, enc: Encoder::new(framing), flushed: true };
    // Whether a frame was taken from the body: a request that failed before any byte of
    // it was written goes again only with its body untouched (the request bodies at hand
    // are not copied for this rare case; the checkout's stale check makes it rarer).
    let mut polled = false;
    let method = &parts.method;
    let result = poll_fn(|cx| {
        // The response is watched while the body is written: an early answer stops the
        // wait for the body's end.
        if let Poll::Ready(Err(e)) = up.poll(&mut c.io, cx, &mut polled) {
            return Poll::Ready(Err((ErrorKind::UpstreamReset, e, true)));
        }
        read_head(c, cx, method).map_err(|(kind, detail)| (kind, detail, false))
    })
    .await;
    let written = up.out.written;
    let finished = up.finished();
    if finished && up.out.buf.capacity() <= KEEP_WBUF {
        up.out.buf.clear();
        c.wbuf = std::mem::take(&mut up.out.buf);
    }
    let head = match result {
        Ok(head) => head,
        Err((kind, detail, writing)) => {
            let err = ProxyError::new(kind, format!("{addr}: {detail}"));
            // Nothing of it reached the upstream: it may go again.
            if writing && written == 0 {
                let back = (!polled).then(|| Request::from_parts(parts, up.body));
                return Err(Failed { err: err.not_sent(), back });
            }
            return Err(Failed { err, back: None });
        }
    };
    if !finished || !head.keep_alive {
        // An early answer (the body was not all written), or no keep-alive: closed after.
        home = None;
    }
    if head.version == http::Version::HTTP_10 {
        c.http10 = true;
    }
    let state = match head.framing {
        ResponseFraming::Empty | ResponseFraming::Length(0) => Read::Done,
        ResponseFraming::Length(n) if (c.rbuf.len() as u64) >= n => {
            // The whole body came with the head (most small responses): the connection
            // goes back before the response is even passed on.
            Read::Full(c.rbuf.split_to(n as usize).freeze())
        }
        ResponseFraming::Length(n) => Read::Length(n),
        ResponseFraming::Chunked => Read::Chunked(Chunk::Size),
        ResponseFraming::UntilClose => {
            home = None;
            Read::UntilClose
        }
    };
    let mut resp = Response::new(H1Body { state, conn: None, home: None, upload: None });
    *resp.status_mut() = head.status;
    *resp.version_mut() = head.version;
    *resp.headers_mut() = head.headers;
    if let Some(reason) = head.reason {
        if let Ok(r) = hyper::ext::ReasonPhrase::try_from(reason) {
            resp.extensions_mut().insert(r);
        }
    }
    let b = resp.body_mut();
    if matches!(b.state, Read::Done | Read::Full(_)) {
        // Nothing beyond this response may have come: it would be taken for the next.
        if let (Some(home), true) = (home, conn.0.rbuf.is_empty()) {
            home.give_back(conn);
        }
    } else {
        b.conn = Some(conn);
        b.home = home;
        if !finished {
            b.upload = Some(Box::new(up));
        }
    }
    Ok(resp)
}

/// Reads until a final response head is complete.
fn read_head(c: &mut Conn, cx: &mut Context<'_>, method: &Method) -> Poll<Result<h1_codec::Head, (ErrorKind, String)>> {
    loop {
        if !c.rbuf.is_empty() {
            match h1_codec::parse_head(&mut c.rbuf, method) {
                Ok(Some(head)) => return Poll::Ready(Ok(head)),
                Ok(None) => {}
                Err(HeadError::Malformed(m)) => return Poll::Ready(Err((ErrorKind::UpstreamProtocol, m))),
                Err(HeadError::TooLarge) => {
                    return Poll::Ready(Err((ErrorKind::UpstreamProtocol, "message head is too large".into())))
                }
            }
        }
        match ready!(c.poll_fill(cx)) {
            Ok(0) => {
                return Poll::Ready(Err((
                    ErrorKind::UpstreamReset,
                    "connection closed before message completed".into(),
                )))
            }
            Ok(_) => {}
            Err(e) => return Poll::Ready(Err((ErrorKind::UpstreamReset, e.to_string()))),
        }
    }
}

impl H1Body {
    /// The body has been read to its end: the connection goes back to its pool when it
    /// may carry another request and nothing beyond this response was received.
    fn finish(&mut self) {
        self.state = Read::Done;
        // The response ended before the request: the rest of it is not sent (the
        // connection closes; Envoy resets the stream then).
        self.upload = None;
        if let (Some(conn), Some(home)) = (self.conn.take(), self.home.take()) {
            if conn.0.rbuf.is_empty() {
                home.give_back(conn);
            }
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                Read::Done => return Poll::Ready(None),
                Read::Full(_) => {
                    let Read::Full(data) = std::mem::replace(&mut this.state, Read::Done) else {
                        unreachable!("matched above")
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                _ => {}
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(Some(Err(io::Error::other("upstream connection gone"))));
            };
            let c = &mut *conn.0;
            match &mut this.state {
                Read::Length(left) if !c.rbuf.is_empty() => {
                    let take = usize::try_from(*left).unwrap_or(usize::MAX).min(c.rbuf.len());
                    let data = c.rbuf.split_to(take).freeze();
                    *left -= take as u64;
                    if *left == 0 {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Read::UntilClose if !c.rbuf.is_empty() => {
                    let data = c.rbuf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Read::Chunked(st) => match h1_codec::decode_chunked(st, &mut c.rbuf) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::End(trailers)) => {
                        this.finish();
                        return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                    }
                    Ok(Decoded::Need) => {}
                    Err(e) => {
                        this.state = Read::Done;
                        this.conn = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                _ => {}
            }
            if let Some(up) = this.upload.as_mut() {
                if up.poll(&mut c.io, cx, &mut false).is_ready() {
                    // Written, or failed: the response is read to its end either way.
                    this.upload = None;
                }
            }
            match ready!(c.poll_fill(cx)) {
                Ok(0) if matches!(this.state, Read::UntilClose) => {
                    this.state = Read::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.state = Read::Done;
                    this.conn = None;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream closed the connection before the end of the response body",
                    ))));
                }
                Ok(_) => {}
                Err(e) => {
                    this.state = Read::Done;
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, Read::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            Read::Done => SizeHint::with_exact(0),
            Read::Full(b) => SizeHint::with_exact(b.len() as u64),
            Read::Length(n) => SizeHint::with_exact(*n),
            Read::Chunked(_) | Read::UntilClose => SizeHint::default(),
        }
    }
}
