//! Boxes for request futures, reused while they are still in the cache.
//!
//! A request's state machine (filters, routing, forwarding: several KiB) lives in a box of
//! its own so that it stays put while hyper or the HTTP/2 server hands it around. Built on
//! the stack and moved into that box, it is copied whole; into a fresh block from the
//! allocator, every line of that copy misses the L1 cache (callgrind: ~75 write misses per
//! request, a sixth of the sidecar's), because the allocator hands out the blocks of a
//! size class in turn and none of them was touched recently. The box a request of the
//! same thread just gave back was: [`pin`] builds the next request's future in it.
//!
//! The spare boxes are per thread (a `thread_local!` per kind of future, [`Spares`]),
//! at most [`SPARES`] of them, the most recently freed used first.

use std::any::Any;
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::thread::LocalKey;

/// Spare boxes a thread keeps per kind of future: enough for the requests a busy worker
/// has in flight finishing in any order; the boxes of more are freed.
const SPARES: usize = 8;

/// One thread's spare boxes of one future type (type-erased: a `thread_local!` needs a
/// type it can name, and a future's is not). Declare one per kind of future:
/// `thread_local! { static BOXES: Spares = const { RefCell::new(None) }; }`.
pub type Spares = RefCell<Option<Box<dyn Any>>>;

/// The spare boxes of futures of type `F`, as stored in a [`Spares`].
type Stack<F> = Vec<Pin<Box<Option<F>>>>;

/// A future in a reused box: polls `F`; once `F` is done or dropped, its box goes back to
/// the thread's spares (empty).
pub struct Recycled<F: Future + 'static> {
    /// Empty once the future is done.
    state: Option<Pin<Box<Option<F>>>>,
    spares: &'static LocalKey<Spares>,
}

/// The future `make` builds, in the box the thread's last request of this kind gave back
/// (a fresh one when there is none).
pub fn pin<F: Future + 'static>(spares: &'static LocalKey<Spares>, make: impl FnOnce() -> F) -> Recycled<F> {
    let state = match take::<F>(spares) {
        Some(mut b) => {
            b.as_mut().set(Some(make()));
            b
        }
        // Allocated before the future is built, so that it can be built in place.
        None => Box::into_pin(Box::write(Box::new_uninit(), Some(make()))),
    };
    Recycled { state: Some(state), spares }
}

impl<F: Future + 'static> Future for Recycled<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let Some(fut) = this.state.as_mut().and_then(|s| s.as_mut().as_pin_mut()) else {
            panic!("Recycled future polled after completion");
        };
        let out = std::task::ready!(fut.poll(cx));
        this.recycle();
        Poll::Ready(out)
    }
}

impl<F: Future + 'static> Recycled<F> {
    /// Drops the future in place and gives its box back to the thread's spares.
    fn recycle(&mut self) {
        if let Some(mut state) = self.state.take() {
            state.as_mut().set(None);
            give_back(self.spares, state);
        }
    }
}

impl<F: Future + 'static> Drop for Recycled<F> {
    fn drop(&mut self) {
        self.recycle();
    }
}

/// [`Recycled`] as a future that cannot fail (what hyper's services return).
pub struct Infallible<F: Future + 'static>(pub Recycled<F>);

impl<F: Future + 'static> Future for Infallible<F> {
    type Output = Result<F::Output, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.get_mut().0).poll(cx).map(Ok)
    }
}

/// The most recently given back spare box for an `F`, if any.
fn take<F: 'static>(spares: &'static LocalKey<Spares>) -> Option<Pin<Box<Option<F>>>> {
    spares.try_with(|s| s.borrow_mut().as_mut()?.downcast_mut::<Stack<F>>()?.pop()).ok().flatten()
}

/// Keeps the (empty) box `b` for the thread's next future of its type, unless it has
/// [`SPARES`] already.
fn give_back<F: 'static>(spares: &'static LocalKey<Spares>, b: Pin<Box<Option<F>>>) {
    let _ = spares.try_with(|s| {
        let mut s = s.borrow_mut();
        match s.as_mut().and_then(|a| a.downcast_mut::<Stack<F>>()) {
            Some(stack) if stack.len() < SPARES => stack.push(b),
            Some(_) => {}
            None => *s = Some(Box::new(vec![b])),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static TEST_BOXES: Spares = const { RefCell::new(None) };
    }

    async fn answer(n: u64) -> u64 {
        tokio::task::yield_now().await;
        n
    }

    /// Where the future of `r` lives.
    fn address<F: Future>(r: &Recycled<F>) -> Option<usize> {
        r.state.as_ref().map(|b| &**b as *const Option<F> as usize)
    }

    /// How many spare boxes for futures made by `_make` the test thread keeps.
    fn kept<F: Future + 'static>(_make: fn(u64) -> F) -> usize {
        TEST_BOXES.with(|s| s.borrow().as_ref().and_then(|a| a.downcast_ref::<Stack<F>>()).map_or(0, Vec::len))
    }

    #[tokio::test]
    async fn the_next_future_is_built_in_the_box_the_last_one_gave_back() {
        let first = pin(&TEST_BOXES, || answer(1));
        let first_at = address(&first);
        assert_eq!(first.await, 1);
        assert_eq!(kept(answer), 1);
        let second = pin(&TEST_BOXES, || answer(2));
        assert_eq!(address(&second), first_at, "the second future reuses the first one's box");
        assert_eq!(kept(answer), 0);
        // A future dropped before it is done gives its box back too.
        drop(second);
        let third = pin(&TEST_BOXES, || answer(3));
        assert_eq!(address(&third), first_at);
        assert_eq!(third.await, 3);
    }

    #[tokio::test]
    async fn a_thread_keeps_a_bounded_number_of_spare_boxes() {
        let n = SPARES as u64 + 4;
        let futs: Vec<_> = (0..n).map(|i| pin(&TEST_BOXES, move || answer(i))).collect();
        assert_eq!(futures::future::join_all(futs).await, (0..n).collect::<Vec<_>>());
        assert_eq!(kept(answer), SPARES);
    }
}
