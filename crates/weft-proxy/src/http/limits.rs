//! Limits on what a downstream connection may send before it is a request: the time to
//! its first request headers (Envoy's `request_headers_timeout`, which hyper's own
//! header timer does not cover for HTTP/2 or before the protocol is known), and HTTP/1
//! request heads whose lines end in a bare LF, which hyper's parser accepts but Envoy
//! (and RFC 9112 for a server that wants no smuggling) refuses.
//!
//! [`Guarded`] wraps the connection's byte stream. It follows HTTP/1 message framing
//! (`Content-Length`, chunked) just far enough to know where each request head starts,
//! scans only heads, and records the index of the first bad one in the connection's
//! [`HeadCheck`]; the request handler asks that with [`HeadCheck::admit`] and answers
//! 400 (`DPE`). Anything it cannot follow (an upgrade, CONNECT, HTTP/2, a framing
//! hyper itself will refuse) turns the scan off for the connection: it never rejects
//! what it does not understand.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

mod timer;
pub use timer::HeadTimer;

/// Marks a request (in its extensions) whose head [`Guarded`] found malformed; set only
/// on such requests, so well-formed ones carry nothing extra.
#[derive(Debug, Clone, Copy)]
pub struct MalformedHead;

/// Per-connection bookkeeping shared by [`Guarded`] and the request handler.
#[derive(Debug)]
pub struct HeadCheck {
    /// Requests handed to the handler so far.
    requests: AtomicU32,
    /// Index of the first request whose head had a bare LF (`u32::MAX`: none).
    bad_from: AtomicU32,
}

impl Default for HeadCheck {
    fn default() -> Self {
        HeadCheck { requests: AtomicU32::new(0), bad_from: AtomicU32::new(u32::MAX) }
    }
}

impl HeadCheck {
    /// Counts a request the connection delivered; false when its head was malformed
    /// (it, and everything after it on the connection, must be refused).
    pub fn admit(&self) -> bool {
        let index = self.requests.fetch_add(1, Ordering::AcqRel);
        index < self.bad_from.load(Ordering::Acquire)
    }

    fn started(&self) -> bool {
        self.requests.load(Ordering::Acquire) > 0
    }
}

/// A downstream byte stream under the limits above.
pub struct Guarded<S> {
    inner: S,
    check: Arc<HeadCheck>,
    /// Until the first request arrives: when the connection must have sent it.
    first_request: Option<Pin<Box<Sleep>>>,
    scan: Scan,
}

impl<S> Guarded<S> {
    /// Wraps `inner`; `headers_timeout` bounds the time to the first request's headers.
    pub fn new(inner: S, check: Arc<HeadCheck>, headers_timeout: Option<Duration>) -> Self {
        Guarded {
            inner,
            check,
            first_request: headers_timeout.map(|t| Box::pin(tokio::time::sleep(t))),
            scan: Scan::new_head(0),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.first_request.is_some() && this.check.started() {
            this.first_request = None;
        }
        if let Some(deadline) = this.first_request.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request headers within request_headers_timeout",
                )));
            }
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if !matches!(this.scan, Scan::Off) {
            if let Some(bad) = this.scan.feed(&buf.filled()[before..]) {
                this.check.bad_from.fetch_min(bad, Ordering::AcqRel);
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The first bytes of a line kept to recognise the request line and framing headers.
const LINE_KEEP: usize = 48;

/// Where the scan is in the HTTP/1 byte stream.
#[derive(Debug)]
enum Scan {
    /// Inside request head number `index`.
    Head(HeadScan),
    /// Inside a body of known length: bytes left, then head `next`.
    Body { left: u64, next: u32 },
    /// Inside a chunked body, then head `next`.
    Chunked { state: Chunk, next: u32 },
    /// Not following this connection (HTTP/2, an upgrade, a framing it cannot follow,
    /// or a bad head already recorded).
    Off,
}

#[derive(Debug)]
struct HeadScan {
    index: u32,
    /// The previous byte was CR.
    cr: bool,
    /// Bytes of the current line (without CR/LF).
    len: usize,
    line: [u8; LINE_KEEP],
    /// The request line has been seen.
    started: bool,
    content_length: Option<u64>,
    chunked: bool,
    /// After this head the stream is no longer HTTP/1 requests (upgrade, CONNECT, h2).
    opaque: bool,
    /// A framing the scan cannot follow (hyper decides what it means).
    lost: bool,
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Reading the chunk-size line (size so far; extensions started).
    Size { size: u64, ext: bool, digits: bool },
    /// Chunk data left, then CRLF.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines after the last chunk (bytes in the current line).
    Trailers(usize),
}

impl Scan {
    fn new_head(index: u32) -> Scan {
        Scan::Head(HeadScan {
            index,
            cr: false,
            len: 0,
            line: [0; LINE_KEEP],
            started: false,
            content_length: None,
            chunked: false,
            opaque: false,
            lost: false,
        })
    }

    /// Follows `bytes`; returns the index of a head with a bare LF when one is found.
    fn feed(&mut self, mut bytes: &[u8]) -> Option<u32> {
        while !bytes.is_empty() {
            match self {
                Scan::Off => return None,
                Scan::Body { left, next } => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    bytes = &bytes[n as usize..];
                    if *left == 0 {
                        *self = Scan::new_head(*next);
                    }
                }
                Scan::Chunked { state, next } => {
                    let (used, done) = state.feed(bytes);
                    bytes = &bytes[used..];
                    match done {
                        Some(true) => *self = Scan::new_head(*next),
                        Some(false) => *self = Scan::Off,
                        None => {}
                    }
                }
                Scan::Head(h) => {
                    let (used, end) = h.feed(bytes);
                    bytes = &bytes[used..];
                    match end {
                        HeadEnd::More => {}
                        HeadEnd::BareLf => {
                            let bad = h.index;
                            *self = Scan::Off;
                            return Some(bad);
                        }
                        HeadEnd::Done => {
                            let next = h.index.saturating_add(1);
                            *self = if h.opaque || h.lost {
                                Scan::Off
                            } else if h.chunked {
                                Scan::Chunked { state: Chunk::Size { size: 0, ext: false, digits: false }, next }
                            } else {
                                match h.content_length {
                                    Some(n) if n > 0 => Scan::Body { left: n, next },
                                    _ => Scan::new_head(next),
                                }
                            };
                        }
                    }
                }
            }
        }
        None
    }
}

/// How many bytes from the start of `bytes` are neither CR nor LF (`memchr2`: SIMD on
/// x86_64, 16 or 32 bytes a step).
fn line_run(bytes: &[u8]) -> usize {
    memchr::memchr2(b'\r', b'\n', bytes).unwrap_or(bytes.len())
}

enum HeadEnd {
    More,
    Done,
    BareLf,
}

impl HeadScan {
    /// Consumes head bytes; returns how many it used and whether the head ended.
    fn feed(&mut self, bytes: &[u8]) -> (usize, HeadEnd) {
        let mut i = 0;
        while i < bytes.len() {
            let rest = &bytes[i..];
            // Ordinary bytes (most of a head: a peer-metadata value alone is ~500) are
            // taken a run at a time; only CR and LF need a decision.
            let run = line_run(rest);
            // The usual case: a whole line, from its start to its CRLF, in this read. It
            // is read in place; nothing is copied.
            if self.len == 0 && !self.cr && rest.get(run) == Some(&b'\r') && rest.get(run + 1) == Some(&b'\n') {
                i += run + 2;
                if self.line_ended(run, &rest[..run]) {
                    return (i, HeadEnd::Done);
                }
                continue;
            }
            if run > 0 {
                // A line split across reads (or with a CR inside): its first LINE_KEEP
                // bytes are kept for `end_line`.
                self.cr = false;
                if self.len < LINE_KEEP {
                    let keep = (LINE_KEEP - self.len).min(run);
                    self.line[self.len..self.len + keep].copy_from_slice(&rest[..keep]);
                }
                self.len += run;
                i += run;
                continue;
            }
            i += 1;
            match rest[0] {
                b'\n' => {
                    if !self.cr {
                        return (i, HeadEnd::BareLf);
                    }
                    self.cr = false;
                    if self.end_line() {
                        return (i, HeadEnd::Done);
                    }
                }
                // A CR inside a line is hyper's to refuse; the line goes on (the next
                // ordinary byte clears the flag).
                _ => self.cr = true,
            }
        }
        (bytes.len(), HeadEnd::More)
    }

    /// A CRLF-terminated line whose first bytes were kept in `self.line` ended; true at
    /// the empty line closing the head.
    fn end_line(&mut self) -> bool {
        let len = std::mem::take(&mut self.len);
        let line = self.line;
        self.line_ended(len, &line[..len.min(LINE_KEEP)])
    }

    /// A CRLF-terminated line of `len` bytes (CRs inside it not counted) ended; `line`
    /// holds at least its first `min(len, LINE_KEEP)` bytes. True at the empty line
    /// closing the head.
    fn line_ended(&mut self, len: usize, line: &[u8]) -> bool {
        if !self.started {
            // Empty lines before the request line are skipped (RFC 9112 §2.2).
            if len > 0 {
                self.started = true;
                if line.starts_with(b"CONNECT ") || line.starts_with(b"PRI ") {
                    self.opaque = true;
                }
            }
            return false;
        }
        let Some(&first) = line.first() else { return true };
        // Only Content-Length, Transfer-Encoding and Upgrade change how the scan goes
        // on; any other header (most of them) is told by its first byte.
        if !matches!(first | 0x20, b'c' | b't' | b'u') {
            return false;
        }
        if len > LINE_KEEP {
            // Too long to be a framing header this scan can read; if it is one, stop.
            if starts_with_ignore_case(line, b"content-length") || starts_with_ignore_case(line, b"transfer-encoding") {
                self.lost = true;
            }
            return false;
        }
        let Some(colon) = line.iter().position(|&c| c == b':') else { return false };
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.eq_ignore_ascii_case(b"content-length") {
            let parsed = std::str::from_utf8(value).ok().and_then(|v| v.parse::<u64>().ok());
            match (parsed, self.content_length) {
                (Some(n), None) => self.content_length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => self.lost = true,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if ends_with_ignore_case(value, b"chunked") {
                self.chunked = true;
            } else {
                self.lost = true;
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            self.opaque = true;
        }
        if self.chunked && self.content_length.is_some() {
            self.lost = true;
        }
        false
    }
}

impl Chunk {
    /// Consumes chunked-body bytes; returns how many it used and, when the body ended,
    /// `Some(true)`, or `Some(false)` when the framing cannot be followed.
    fn feed(&mut self, bytes: &[u8]) -> (usize, Option<bool>) {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            i += 1;
            match self {
                Chunk::Size { size, ext, digits } => match b {
                    b'\n' => {
                        if !*digits {
                            return (i, Some(false));
                        }
                        *self = if *size == 0 { Chunk::Trailers(0) } else { Chunk::Data(*size) };
                    }
                    b'\r' => {}
                    _ if *ext => {}
                    b';' | b' ' | b'\t' => *ext = true,
                    _ => {
                        let Some(d) = (b as char).to_digit(16) else { return (i, Some(false)) };
                        match size.checked_mul(16) {
                            Some(s) if s < (1 << 60) => *size = s + u64::from(d),
                            _ => return (i, Some(false)),
                        }
                        *digits = true;
                    }
                },
                Chunk::Data(left) => {
                    let n = (*left).min((bytes.len() - i + 1) as u64);
                    *left -= n;
                    i += n as usize - 1;
                    if *left == 0 {
                        *self = Chunk::DataEnd;
                    }
                }
                Chunk::DataEnd => match b {
                    b'\r' => {}
                    b'\n' => *self = Chunk::Size { size: 0, ext: false, digits: false },
                    _ => return (i, Some(false)),
                },
                Chunk::Trailers(len) => match b {
                    b'\r' => {}
                    b'\n' if *len == 0 => return (i, Some(true)),
                    b'\n' => *len = 0,
                    _ => *len += 1,
                },
            }
        }
        (i, None)
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(v.len());
    let end = v.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &v[start..end]
}

fn starts_with_ignore_case(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

fn ends_with_ignore_case(s: &[u8], suffix: &[u8]) -> bool {
    s.len() >= suffix.len() && s[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

#[cfg(test)]
mod tests;
