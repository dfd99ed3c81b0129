//! The proxy process's memory: handing what the allocator holds free back to the
//! operating system ([`release_freed_memory`], started by [`crate::run::run`]).
//!
//! glibc's malloc returns freed memory only from the top of a heap (and keeps a heap
//! per thread that allocated concurrently); what a burst of connections freed in the
//! middle stays resident for the life of the process. Measured with `weft-bench soak`
//! (docs/benchmarks.md, "Memory under 500 connections"): after 500 connections closed,
//! a sidecar kept ~240 MiB resident while glibc's `malloc_stats` counted ~3 MiB in use;
//! `malloc_trim(0)` took it back to ~18 MiB. So every [`RELEASE_INTERVAL`] the proxy calls
//! `malloc_trim(0)`, which gives every free page of every arena back (Envoy releases
//! tcmalloc's free memory periodically the same way, `memory_release_interval`).
//!
//! A binary with another global allocator (the `weft-proxy` binary uses mimalloc) names
//! that allocator's release with [`set_allocator_release`]. Such an allocator keeps the
//! pages a thread freed in that thread's heap until the thread itself collects them (an
//! idle sidecar held ~45 MiB after a burst of 500 connections with the release run from
//! the memory thread alone: bench/notes.md, "mimalloc"). So each round also starts a new
//! release epoch and wakes the runtime's workers; a worker runs the release on its own
//! heap when it next parks in a new epoch ([`on_worker_park`], the runtime's park hook).

// `malloc_trim` is FFI; the block says why it is sound.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// How often [`release_freed_memory`] runs in the proxy process.
pub const RELEASE_INTERVAL: Duration = Duration::from_secs(10);

/// The global allocator's own release, when the binary set one.
static ALLOCATOR_RELEASE: OnceLock<fn()> = OnceLock::new();

/// The release round the memory thread is in; a worker that parks in a round it has not
/// released in yet runs the allocator's release.
static EPOCH: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The last round this thread ran the allocator's release in.
    static RELEASED_IN: Cell<u64> = const { Cell::new(0) };
}

/// The runtime's park hook: runs the binary's allocator release on this worker's heap
/// once per release round (one atomic load otherwise; nothing when the binary set no
/// release).
pub fn on_worker_park() {
    let Some(release) = ALLOCATOR_RELEASE.get() else { return };
    let epoch = EPOCH.load(Ordering::Relaxed);
    if RELEASED_IN.with(|seen| seen.replace(epoch)) != epoch {
        release();
    }
}

/// Names the release of the binary's global allocator (what gives its free pages back to
/// the operating system), run by [`release_now`] after glibc's. Set once, before the proxy
/// starts; a second call is ignored.
pub fn set_allocator_release(release: fn()) {
    let _ = ALLOCATOR_RELEASE.set(release);
}

/// Whether the binary named its allocator's release (the runtime installs
/// [`on_worker_park`] only then).
pub fn has_allocator_release() -> bool {
    ALLOCATOR_RELEASE.get().is_some()
}

/// Starts a thread that hands the memory the allocator holds free back to the operating
/// system every `every` (glibc's `malloc_trim(0)`, and the binary's allocator's release
/// when one was set, on this thread and on each of `runtime`'s workers). It runs for the
/// life of the process.
pub fn release_freed_memory(every: Duration, runtime: tokio::runtime::Handle) {
    let workers = runtime.metrics().num_workers();
    let spawned = std::thread::Builder::new().name("weft-memory".into()).stack_size(64 * 1024).spawn(move || loop {
        std::thread::sleep(every);
        release_now();
        if ALLOCATOR_RELEASE.get().is_some() {
            EPOCH.fetch_add(1, Ordering::Relaxed);
            // A task each wakes parked workers; they run it and park again, which
            // runs the release on their heaps (`on_worker_park`).
            for _ in 0..workers {
                runtime.spawn(async {});
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the memory release thread");
    }
}

/// Gives the free pages the allocators hold back to the operating system now: glibc's
/// arenas (on glibc), then the binary's global allocator when it set a release. True when
/// glibc released some memory.
pub fn release_now() -> bool {
    let trimmed = glibc_trim();
    if let Some(release) = ALLOCATOR_RELEASE.get() {
        release();
    }
    trimmed
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn glibc_trim() -> bool {
    // SAFETY: `malloc_trim` has no preconditions: it takes each arena's lock itself and
    // only releases pages no allocation uses; any thread may call it at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn glibc_trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    static RELEASES: AtomicUsize = AtomicUsize::new(0);
    /// The tests share the release round: one at a time.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn counting_release() {
        RELEASES.fetch_add(1, Ordering::SeqCst);
    }

    #[test]
    fn a_worker_releases_once_per_round_when_it_parks() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        set_allocator_release(counting_release);
        std::thread::spawn(|| {
            // A new thread has released in no round yet: its first park in a round runs it.
            EPOCH.fetch_add(1, Ordering::SeqCst);
            let before = RELEASES.load(Ordering::SeqCst);
            on_worker_park();
            on_worker_park();
            assert_eq!(RELEASES.load(Ordering::SeqCst), before + 1, "one release per round, not per park");
            EPOCH.fetch_add(1, Ordering::SeqCst);
            on_worker_park();
            assert_eq!(RELEASES.load(Ordering::SeqCst), before + 2, "a new round releases again");
        })
        .join()
        .expect("the worker thread");
    }

    #[test]
    fn the_proxy_runtime_runs_the_release_on_its_worker_in_a_new_round() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        set_allocator_release(counting_release);
        let rt = crate::run::runtime(Some(1)).expect("runtime");
        let before = RELEASES.load(Ordering::SeqCst);
        // The round as the memory thread runs it, from outside the runtime, while the
        // runtime's thread is parked in `block_on`.
        let handle = rt.handle().clone();
        let round = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            EPOCH.fetch_add(1, Ordering::SeqCst);
            handle.spawn(async {});
        });
        rt.block_on(async {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while RELEASES.load(Ordering::SeqCst) == before && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        round.join().expect("the round");
        assert!(RELEASES.load(Ordering::SeqCst) > before, "the parked worker never ran the release");
    }
}
