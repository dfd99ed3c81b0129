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

// `malloc_trim` is FFI; the block says why it is sound.
#![allow(unsafe_code)]

use std::time::Duration;

/// How often [`release_freed_memory`] runs in the proxy process.
pub const RELEASE_INTERVAL: Duration = Duration::from_secs(10);

/// Starts a thread that hands the memory the allocator holds free back to the operating
/// system every `every` (glibc's `malloc_trim(0)`; nothing with other C libraries). It
/// runs for the life of the process.
pub fn release_freed_memory(every: Duration) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let spawned =
            std::thread::Builder::new().name("weft-memory".into()).stack_size(64 * 1024).spawn(move || loop {
                std::thread::sleep(every);
                release_now();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the memory release thread");
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = every;
}

/// Gives every free page of glibc's arenas back to the operating system now; true when
/// some memory was released.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_now() -> bool {
    // SAFETY: `malloc_trim` has no preconditions: it takes each arena's lock itself and
    // only releases pages no allocation uses; any thread may call it at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}
