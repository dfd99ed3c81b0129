//! Write coalescing for HTTP/2 connections: one write to the transport (one TLS record,
//! one `writev`) per poll of the connection task, not one per frame.
//!
//! h2 0.4's `FramedWrite` writes and flushes whatever it holds before it buffers a DATA
//! payload of 256 bytes or more, so the frames of several streams answered in one poll
//! left as one write each: over TLS, a record and a `writev` per response at saturation
//! (one response alone was already one record: bench/notes.md, "HTTP/2 write coalescing").
//!
//! [`Coalesced`] sits between the HTTP/2 codec and the stream (TLS or plain TCP): while the
//! connection future is being polled, writes only append to a bounded buffer and
//! `poll_flush` does nothing; [`Flushing`], the connection future wrapped, writes the
//! buffer out and flushes the stream once the inner poll returns.
//!
//! Why no byte stays buffered with nobody to write it:
//! - bytes are buffered only while the wrapped future is being polled (`in_poll`; only
//!   HTTP/2 connections are wrapped: upstream ones, and downstream ones once
//!   `http::preface` found the client speaks HTTP/2; HTTP/1.1 connections, where hyper
//!   already writes once per poll, are served on the plain stream), and
//!   [`Flushing`] writes the buffer out after every such poll; when the stream is not
//!   ready it returns `Pending` with the stream's waker registered by this same task, so
//!   it is polled again and finishes the write, even after the connection future ended;
//! - an HTTP/2 connection (the h2 crate's server, `http::h2_server`, whose streams are
//!   polled inside the same wrapped poll; its client, `cluster::h2_client`) does all its
//!   I/O inside that poll: streams queue frames in h2's shared store and wake the
//!   connection task, they never write themselves;
//! - outside a wrapped poll (the h2 handshake of a client connection, made by the task
//!   that opens it) every write first writes out what is buffered, then goes straight to
//!   the stream, and
//!   `poll_flush` flushes: the wrapper is then a plain pass-through;
//! - `poll_shutdown` writes the buffer out and flushes before shutting the stream down;
//! - at most [`LIMIT`] bytes are buffered: a write that would pass it writes the buffer
//!   out first (and returns `Pending`, applying back-pressure, when the stream cannot take
//!   it), and a write of `LIMIT` bytes or more goes straight through, so large bodies
//!   stream;
//! - an error from the write after a poll is kept and returned by the next read, write or
//!   flush hyper makes (the task is woken to make it), so the connection fails as it would
//!   have without the wrapper.
//!
//! After a poll that wrote nothing (the requests read, their answers not there yet) the
//! stream is not flushed: there is nothing of the connection's to flush. (A TLS message
//! rustls queues while reading, a `KeyUpdate` reply, leaves before the next record, as
//! TLS 1.3 asks, with the next write.)
//!
//! The stream is shared by the I/O half and the future half behind a [`TryLock`]: both
//! are used by the connection's own task, one call at a time, and no call keeps the lock
//! past its return, so taking it never finds it taken: a swap and a store, where the
//! `std::sync::Mutex` it replaces (lock, poison checks, unlock; ~15 times per request)
//! cost ~0.5k instructions per request per HTTP/2 side (bench/notes.md, wip-conn). Were
//! it ever found taken, the call returns `Pending` and wakes its task to try again.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use try_lock::{Locked, TryLock};

/// Most bytes buffered before a write goes through: one full TLS record of plaintext.
pub const LIMIT: usize = 16 * 1024;

/// The I/O half: what hyper reads from and writes to.
#[derive(Debug)]
pub struct Coalesced<S> {
    shared: Arc<TryLock<Shared<S>>>,
}

/// The future half: the connection future, writing out what it buffered after each poll.
pub struct Flushing<F: Future, S> {
    inner: Pin<Box<F>>,
    shared: Arc<TryLock<Shared<S>>>,
    /// The inner future's output, held while the last bytes are written out.
    done: Option<<F as Future>::Output>,
}

/// A handle for wrapping the connection future once it is built over [`Coalesced`].
#[derive(Debug)]
pub struct Flusher<S> {
    shared: Arc<TryLock<Shared<S>>>,
}

#[derive(Debug)]
struct Shared<S> {
    io: S,
    buf: Vec<u8>,
    /// Bytes of `buf` already written to `io` (a partial write out).
    written: usize,
    /// The wrapped connection future is being polled.
    in_poll: bool,
    /// Bytes went to `buf` or `io` since the stream was last flushed.
    unflushed: bool,
    /// A failed write out after a poll, for the next call hyper makes.
    failed: Option<(io::ErrorKind, String)>,
    /// The wrapped future waiting to write out the buffer after its connection future
    /// ended, woken when another user of the stream writes it out first.
    waiter: Option<Waker>,
}

impl<S> Coalesced<S> {
    /// Wraps `io`, an HTTP/2 connection; the [`Flusher`] wraps the connection future
    /// built over the result.
    pub fn new(io: S) -> (Self, Flusher<S>) {
        let shared =
            Shared { io, buf: Vec::new(), written: 0, in_poll: false, unflushed: false, failed: None, waiter: None };
        let shared = Arc::new(TryLock::new(shared));
        (Coalesced { shared: shared.clone() }, Flusher { shared })
    }

    /// Bytes buffered and not yet written to the stream (what the tests bound).
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.shared.try_lock().map_or(0, |s| s.buf.len() - s.written)
    }
}

impl<S> Flusher<S> {
    /// Wraps the connection future, which must be built over this flusher's [`Coalesced`].
    pub fn wrap<F: Future>(self, inner: F) -> Flushing<F, S> {
        Flushing { inner: Box::pin(inner), shared: self.shared, done: None }
    }
}

impl<F: Future, S> Flushing<F, S> {
    /// The connection future (for its `graceful_shutdown`).
    pub fn inner_mut(&mut self) -> Pin<&mut F> {
        self.inner.as_mut()
    }
}

impl<S> Shared<S> {
    /// Writes are buffered now.
    fn buffering(&self) -> bool {
        self.in_poll
    }

    /// The error a failed write out left, once.
    fn take_failure(&mut self) -> io::Result<()> {
        match self.failed.take() {
            Some((kind, msg)) => Err(io::Error::new(kind, msg)),
            None => Ok(()),
        }
    }
}

impl<S: AsyncWrite + Unpin> Shared<S> {
    /// Writes the whole buffer to the stream.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        if let Some(waiter) = self.waiter.take() {
            waiter.wake();
        }
        Poll::Ready(Ok(()))
    }

    /// Writes the buffer out and flushes the stream (for TLS: seals and sends the record).
    fn poll_write_out_and_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_out(cx))?;
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        self.unflushed = false;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes: `Ready(true)` when they are to be buffered,
    /// `Ready(false)` when they go straight to the stream.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        self.take_failure()?;
        self.unflushed = true;
        if self.buffering() && self.buf.len() + len <= LIMIT {
            return Poll::Ready(Ok(true));
        }
        ready!(self.poll_write_out(cx))?;
        Poll::Ready(Ok(self.buffering() && len < LIMIT))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesced<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut s = ready!(lock(&self.shared, cx));
        if let Err(e) = s.take_failure() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut s.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesced<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut s = ready!(lock(&self.shared, cx));
        if ready!(s.poll_room(cx, data.len()))? {
            s.buf.extend_from_slice(data);
            return Poll::Ready(Ok(data.len()));
        }
        Pin::new(&mut s.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        let mut s = ready!(lock(&self.shared, cx));
        if ready!(s.poll_room(cx, len))? {
            for b in bufs {
                s.buf.extend_from_slice(b);
            }
            return Poll::Ready(Ok(len));
        }
        Pin::new(&mut s.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Inside the connection's poll, nothing: [`Flushing`] writes out after the poll.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = ready!(lock(&self.shared, cx));
        s.take_failure()?;
        if s.buffering() {
            return Poll::Ready(Ok(()));
        }
        s.poll_write_out_and_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = ready!(lock(&self.shared, cx));
        s.take_failure()?;
        ready!(s.poll_write_out_and_flush(cx))?;
        Pin::new(&mut s.io).poll_shutdown(cx)
    }
}

impl<F: Future, S> std::fmt::Debug for Flushing<F, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flushing").field("done", &self.done.is_some()).finish_non_exhaustive()
    }
}

/// The inner future is boxed and the output is only ever moved out: nothing is pinned in
/// place.
impl<F: Future, S> Unpin for Flushing<F, S> {}

impl<F: Future, S: AsyncWrite + Unpin> Future for Flushing<F, S> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        if this.done.is_none() {
            ready!(lock(&this.shared, cx)).in_poll = true;
            if let Poll::Ready(out) = this.inner.as_mut().poll(cx) {
                this.done = Some(out);
            }
        }
        let mut s = ready!(lock(&this.shared, cx));
        s.in_poll = false;
        // Nothing written since the last flush: nothing to write out or flush.
        if s.unflushed {
            match s.poll_write_out_and_flush(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) if this.done.is_none() => {
                    // hyper learns of it from its next call, which this wake-up brings.
                    // The bytes cannot be sent: dropped, not retried.
                    s.failed = Some((e.kind(), e.to_string()));
                    s.buf.clear();
                    s.written = 0;
                    s.unflushed = false;
                    cx.waker().wake_by_ref();
                }
                Poll::Ready(Err(e)) => tracing::debug!(error = %e, "writing out a finished connection's last bytes"),
                Poll::Pending => {
                    if this.done.is_some() {
                        s.waiter = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
            }
        }
        drop(s);
        match this.done.take() {
            Some(out) => Poll::Ready(out),
            None => Poll::Pending,
        }
    }
}

/// The shared state. Never found taken (see the module's last paragraph); if it were,
/// `Pending` with the task woken, so that the call is made again.
fn lock<'a, S>(shared: &'a TryLock<Shared<S>>, cx: &Context<'_>) -> Poll<Locked<'a, Shared<S>>> {
    match shared.try_lock() {
        Some(s) => Poll::Ready(s),
        None => {
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests;
