//! [`Coalesced`] and [`Flushing`] against a stream that records every call.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Coalesced, LIMIT};

/// What the stream under test was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Write(Vec<u8>),
    Flush,
    Shutdown,
}

#[derive(Debug, Default)]
struct MockState {
    calls: Vec<Call>,
    /// Writes return `Pending` (and keep the waker) while set.
    blocked: bool,
    /// Writes fail while set.
    broken: bool,
    waker: Option<Waker>,
    /// What reads return, once; then reads never complete.
    incoming: Vec<u8>,
}

/// A stream recording its calls; reads return `incoming` once, then never complete.
#[derive(Debug)]
struct Mock(Arc<Mutex<MockState>>);

impl Mock {
    fn new() -> (Self, Arc<Mutex<MockState>>) {
        let state = Arc::new(Mutex::new(MockState::default()));
        (Mock(state.clone()), state)
    }
}

impl AsyncRead for Mock {
    fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut s = self.0.lock().expect("mock lock");
        if s.incoming.is_empty() {
            return Poll::Pending;
        }
        buf.put_slice(&std::mem::take(&mut s.incoming));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Mock {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut s = self.0.lock().expect("mock lock");
        if s.broken {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if s.blocked {
            s.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        s.calls.push(Call::Write(data.to_vec()));
        Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.lock().expect("mock lock").calls.push(Call::Flush);
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.lock().expect("mock lock").calls.push(Call::Shutdown);
        Poll::Ready(Ok(()))
    }
}

/// Counts its wake-ups.
#[derive(Default)]
struct Counter(AtomicUsize);

impl Wake for Counter {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn poll_once<F: Future + Unpin>(fut: &mut F, waker: &Waker) -> Poll<F::Output> {
    Pin::new(fut).poll(&mut Context::from_waker(waker))
}

fn writes(state: &Mutex<MockState>) -> Vec<Vec<u8>> {
    let s = state.lock().expect("mock lock");
    s.calls.iter().filter_map(|c| if let Call::Write(w) = c { Some(w.clone()) } else { None }).collect()
}

fn write_all(io: &mut Coalesced<Mock>, cx: &mut Context<'_>, data: &[u8]) {
    let n = Pin::new(io).poll_write(cx, data);
    assert!(matches!(n, Poll::Ready(Ok(n)) if n == data.len()), "write accepted whole: {n:?}");
}

/// A connection whose first poll writes `data` (and whose every poll is `Pending`) over a
/// stream that is not ready to take writes yet, and the stream's state.
fn first_poll_writes_to_a_stream_not_ready(
    data: &'static [u8],
) -> (impl Future<Output = ()> + Unpin, Arc<Mutex<MockState>>) {
    let (mock, state) = Mock::new();
    state.lock().expect("mock lock").blocked = true;
    let (mut io, flusher) = Coalesced::new(mock);
    let mut first = true;
    let conn = flusher.wrap(poll_fn(move |cx| {
        if std::mem::take(&mut first) {
            write_all(&mut io, cx, data);
        }
        Poll::<()>::Pending
    }));
    (Box::pin(conn), state)
}

#[test]
fn the_writes_and_flushes_of_one_poll_reach_the_stream_as_one_write() {
    let (mock, state) = Mock::new();
    let (mut io, flusher) = Coalesced::new(mock);
    let mut conn = flusher.wrap(poll_fn(move |cx| {
        // What h2 does for a response: HEADERS, flush, DATA, flush.
        write_all(&mut io, cx, b"HEADERS");
        assert!(Pin::new(&mut io).poll_flush(cx).is_ready());
        write_all(&mut io, cx, b"DATA");
        assert!(Pin::new(&mut io).poll_flush(cx).is_ready());
        Poll::<()>::Pending
    }));
    let waker = Waker::from(Arc::new(Counter::default()));
    assert!(poll_once(&mut conn, &waker).is_pending());
    assert_eq!(writes(&state), vec![b"HEADERSDATA".to_vec()]);
    assert_eq!(state.lock().expect("mock lock").calls.last(), Some(&Call::Flush), "flushed after the write");
}

#[test]
fn nothing_stays_buffered_after_a_poll_even_when_the_stream_was_not_ready() {
    let (mut conn, state) = first_poll_writes_to_a_stream_not_ready(b"response");
    let counter = Arc::new(Counter::default());
    let waker = Waker::from(counter.clone());
    assert!(poll_once(&mut conn, &waker).is_pending());
    assert!(writes(&state).is_empty());
    // The stream becomes writable: it wakes the connection task, which writes out.
    let stream_waker = {
        let mut s = state.lock().expect("mock lock");
        s.blocked = false;
        s.waker.take().expect("the write out waits on the stream")
    };
    stream_waker.wake();
    assert_eq!(counter.0.load(Ordering::SeqCst), 1, "the connection task is the one woken");
    assert!(poll_once(&mut conn, &waker).is_pending());
    assert_eq!(writes(&state), vec![b"response".to_vec()]);
}

#[test]
fn a_finished_connection_returns_only_once_its_last_bytes_are_written() {
    let (mock, state) = Mock::new();
    state.lock().expect("mock lock").blocked = true;
    let (mut io, flusher) = Coalesced::new(mock);
    let mut conn = flusher.wrap(poll_fn(move |cx| {
        write_all(&mut io, cx, b"GOAWAY");
        Poll::Ready(7)
    }));
    let waker = Waker::from(Arc::new(Counter::default()));
    assert!(poll_once(&mut conn, &waker).is_pending());
    state.lock().expect("mock lock").blocked = false;
    assert_eq!(poll_once(&mut conn, &waker), Poll::Ready(7));
    assert_eq!(writes(&state), vec![b"GOAWAY".to_vec()]);
}

#[test]
fn a_large_body_streams_through_with_at_most_limit_bytes_buffered() {
    let (mock, state) = Mock::new();
    let (mut io, flusher) = Coalesced::new(mock);
    let chunk = vec![7u8; 4096];
    let body = 1 << 20;
    let mut conn = flusher.wrap(poll_fn(move |cx| {
        for _ in 0..body / chunk.len() {
            write_all(&mut io, cx, &chunk);
            assert!(io.buffered() <= LIMIT, "{} bytes buffered", io.buffered());
        }
        Poll::<()>::Pending
    }));
    let waker = Waker::from(Arc::new(Counter::default()));
    assert!(poll_once(&mut conn, &waker).is_pending());
    let written = writes(&state);
    assert_eq!(written.iter().map(Vec::len).sum::<usize>(), body);
    assert!(written.len() >= body / LIMIT, "written out in pieces: {}", written.len());
}

#[test]
fn a_stream_that_is_not_ready_stops_the_writes_at_limit() {
    let (mock, state) = Mock::new();
    state.lock().expect("mock lock").blocked = true;
    let (mut io, flusher) = Coalesced::new(mock);
    let accepted = Arc::new(AtomicUsize::new(0));
    let seen = accepted.clone();
    let mut conn = flusher.wrap(poll_fn(move |cx| {
        for _ in 0..256 {
            match Pin::new(&mut io).poll_write(cx, &[1u8; 1024]) {
                Poll::Ready(Ok(n)) => seen.fetch_add(n, Ordering::SeqCst),
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => break,
            };
        }
        Poll::<()>::Pending
    }));
    let waker = Waker::from(Arc::new(Counter::default()));
    assert!(poll_once(&mut conn, &waker).is_pending());
    assert_eq!(accepted.load(Ordering::SeqCst), LIMIT, "back-pressure once the buffer is full");
}

#[test]
fn shutdown_writes_out_and_flushes_what_is_buffered_first() {
    let (mock, state) = Mock::new();
    let (mut io, flusher) = Coalesced::new(mock);
    let mut conn = flusher.wrap(poll_fn(move |cx| {
        write_all(&mut io, cx, b"GOAWAY");
        assert!(Pin::new(&mut io).poll_shutdown(cx).is_ready());
        Poll::Ready(())
    }));
    let waker = Waker::from(Arc::new(Counter::default()));
    assert!(poll_once(&mut conn, &waker).is_ready());
    let calls = state.lock().expect("mock lock").calls.clone();
    assert_eq!(calls[..3], [Call::Write(b"GOAWAY".to_vec()), Call::Flush, Call::Shutdown]);
}

#[test]
fn outside_the_connection_poll_writes_go_straight_to_the_stream() {
    // An upgraded connection (a tunnel) or a client handshake.
    let (mock, state) = Mock::new();
    let (mut io, _flusher) = Coalesced::new(mock);
    let waker = Waker::from(Arc::new(Counter::default()));
    write_all(&mut io, &mut Context::from_waker(&waker), b"tunnel");
    assert_eq!(writes(&state), vec![b"tunnel".to_vec()]);
    assert!(Pin::new(&mut io).poll_flush(&mut Context::from_waker(&waker)).is_ready());
    assert_eq!(state.lock().expect("mock lock").calls.last(), Some(&Call::Flush));
}

#[test]
fn a_failed_write_out_fails_the_next_call_of_the_connection() {
    let (mock, state) = Mock::new();
    state.lock().expect("mock lock").broken = true;
    let (mut io, flusher) = Coalesced::new(mock);
    let mut polls = 0;
    let read = Arc::new(Mutex::new(None));
    let seen = read.clone();
    let mut conn = flusher.wrap(poll_fn(move |cx| {
        polls += 1;
        if polls == 1 {
            write_all(&mut io, cx, b"DATA");
        } else {
            let mut buf = [0u8; 16];
            let r = Pin::new(&mut io).poll_read(cx, &mut ReadBuf::new(&mut buf));
            *seen.lock().expect("lock") = Some(r.map_err(|e| e.kind()));
        }
        Poll::<()>::Pending
    }));
    let counter = Arc::new(Counter::default());
    let waker = Waker::from(counter.clone());
    assert!(poll_once(&mut conn, &waker).is_pending());
    assert_eq!(counter.0.load(Ordering::SeqCst), 1, "woken to learn of the failure");
    assert!(poll_once(&mut conn, &waker).is_pending());
    assert_eq!(*read.lock().expect("lock"), Some(Poll::Ready(Err(io::ErrorKind::BrokenPipe))));
}

#[test]
fn a_poll_that_wrote_nothing_does_not_flush_the_stream() {
    let (mock, state) = Mock::new();
    let (mut io, flusher) = Coalesced::new(mock);
    let mut polls = 0;
    let mut conn = flusher.wrap(poll_fn(move |cx| {
        polls += 1;
        // The first poll reads (a request) and answers nothing yet; the second answers.
        let mut buf = [0u8; 16];
        assert!(Pin::new(&mut io).poll_read(cx, &mut ReadBuf::new(&mut buf)).is_pending());
        if polls == 2 {
            write_all(&mut io, cx, b"answer");
        }
        Poll::<()>::Pending
    }));
    let waker = Waker::from(Arc::new(Counter::default()));
    assert!(poll_once(&mut conn, &waker).is_pending());
    assert_eq!(state.lock().expect("mock lock").calls, vec![], "nothing written, nothing flushed");
    assert!(poll_once(&mut conn, &waker).is_pending());
    assert_eq!(state.lock().expect("mock lock").calls, vec![Call::Write(b"answer".to_vec()), Call::Flush]);
    assert!(poll_once(&mut conn, &waker).is_pending());
    assert_eq!(state.lock().expect("mock lock").calls.len(), 2, "flushed once, not again after the next poll");
}

#[test]
fn a_flush_that_was_not_ready_is_finished_by_the_next_poll() {
    let (mut conn, state) = first_poll_writes_to_a_stream_not_ready(b"answer");
    let waker = Waker::from(Arc::new(Counter::default()));
    assert!(poll_once(&mut conn, &waker).is_pending());
    state.lock().expect("mock lock").blocked = false;
    // This poll writes nothing new, but the last one's bytes are still to go.
    assert!(poll_once(&mut conn, &waker).is_pending());
    assert_eq!(state.lock().expect("mock lock").calls, vec![Call::Write(b"answer".to_vec()), Call::Flush]);
}

#[test]
fn a_call_that_finds_the_state_taken_waits_and_is_woken() {
    let (mock, _state) = Mock::new();
    let (mut io, _flusher) = Coalesced::new(mock);
    let shared = io.shared.clone();
    let held = shared.try_lock().expect("free");
    let counter = Arc::new(Counter::default());
    let waker = Waker::from(counter.clone());
    let mut cx = Context::from_waker(&waker);
    assert!(Pin::new(&mut io).poll_write(&mut cx, b"x").is_pending());
    assert_eq!(counter.0.load(Ordering::SeqCst), 1, "woken to call again");
    drop(held);
    assert!(matches!(Pin::new(&mut io).poll_write(&mut cx, b"x"), Poll::Ready(Ok(1))));
}
