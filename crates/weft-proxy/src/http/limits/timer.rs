//! hyper's HTTP/1 header-read timer (`request_headers_timeout`) without a timer per request.
//!
//! hyper's server asks its [`Timer`] for a sleep each time it starts waiting for a request
//! head (on a keep-alive connection: as soon as the previous exchange is done), polls it
//! while the head is incomplete, and drops it once the head is parsed. With hyper-util's
//! `TokioTimer` that was one allocation, one timer-wheel insertion and one removal per
//! request (~1k instructions, bench/notes.md), for a deadline that almost never fires.
//!
//! [`HeadTimer`] keeps one tokio timer per connection, the *alarm*, and hands hyper sleeps
//! that only remember their deadline. A sleep polled while the alarm is set at or before
//! its deadline just registers its waker; when the alarm goes off for a head that has
//! since completed, the next sleep polled moves it to its own (later) deadline. The alarm
//! is thus re-armed about once per timeout period, not once per request, and it never
//! goes off later than the deadline of the head being waited for: hyper times out the
//! same heads at the same instants as with a timer per sleep (it closes the connection,
//! whether the head is partial or the keep-alive connection idle).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use hyper::rt::{Sleep, Timer};

/// A connection's header-read timer, given to hyper's HTTP/1 server builder (one per
/// connection: its sleeps share the connection's alarm).
#[derive(Clone, Default)]
pub struct HeadTimer {
    alarm: Arc<Alarm>,
}

/// The connection's one tokio timer, set lazily by the first sleep polled. Locked only by
/// the connection's own task (never contended, never held across an await); a lock
/// because hyper wants its sleeps `Send + Sync`.
#[derive(Default)]
struct Alarm(Mutex<Option<Pin<Box<tokio::time::Sleep>>>>);

/// What [`HeadTimer`] hands hyper: a deadline over the connection's alarm.
struct HeadSleep {
    deadline: tokio::time::Instant,
    alarm: Arc<Alarm>,
}

impl Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        Box::pin(HeadSleep { deadline: deadline.into(), alarm: self.alarm.clone() })
    }

    /// Tokio's clock (as hyper-util's timer reads it), so paused time in tests applies.
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let deadline = self.deadline;
        let mut alarm = self.alarm.0.lock().unwrap_or_else(|e| e.into_inner());
        let sleep = alarm.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        // Set for a later head's deadline (hyper never asks for an earlier one after a
        // later one, but an alarm past the deadline would time the head out late).
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if sleep.deadline() >= deadline {
                return Poll::Ready(());
            }
            // The alarm went off for an earlier head: move it to this one's deadline.
            sleep.as_mut().reset(deadline);
        }
    }
}

impl Sleep for HeadSleep {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    /// Polls `sleep` once: true when it has gone off.
    async fn fired(sleep: &mut Pin<Box<dyn Sleep>>) -> bool {
        poll_fn(|cx| Poll::Ready(sleep.as_mut().poll(cx).is_ready())).await
    }

    #[tokio::test(start_paused = true)]
    async fn each_head_times_out_at_its_own_deadline_with_one_alarm() {
        let timer = HeadTimer::default();
        let timeout = Duration::from_secs(30);
        // First head: waited for, then parsed after 10 s (hyper drops its sleep).
        let mut first = timer.sleep(timeout);
        assert!(!fired(&mut first).await);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!fired(&mut first).await);
        drop(first);
        // Second head: its deadline is 40 s from the start, after the alarm's 30 s.
        let mut second = timer.sleep(timeout);
        assert!(!fired(&mut second).await);
        tokio::time::advance(Duration::from_secs(25)).await;
        // 35 s: the alarm went off for the first head; the second is not due yet.
        assert!(!fired(&mut second).await, "timed out at the earlier head's deadline");
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(!fired(&mut second).await);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(fired(&mut second).await, "not timed out at its own deadline");
        // Both sleeps shared the connection's one alarm.
        assert_eq!(Arc::strong_count(&timer.alarm), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_head_is_woken_at_its_deadline() {
        let timer = HeadTimer::default();
        let start = tokio::time::Instant::now();
        // A first head sets the alarm at 1 s, then completes.
        let mut first = timer.sleep(Duration::from_secs(1));
        assert!(!fired(&mut first).await);
        drop(first);
        // Awaited (the task is woken, not polled by the test): the alarm goes off at
        // 1 s, moves to 5 s, and wakes the task then.
        let mut second = timer.sleep(Duration::from_secs(5));
        poll_fn(|cx| second.as_mut().poll(cx)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }
}
