//! `weft-proxy`: the sidecar proxy alone, the same as `weft proxy` (see
//! `weft_proxy::run`), without the control plane, the CLI and the demos, so a sidecar
//! maps only the proxy's code.

// `mi_collect` is FFI; the block says why it is sound.
#![allow(unsafe_code)]

use std::process::ExitCode;

use weft_proxy::run::{Parsed, ProxyArgs};

/// mimalloc instead of glibc's malloc: 2.5–7% fewer instructions per proxied request
/// (a request allocates and frees a few dozen blocks, several above glibc's 1 KiB thread
/// cache), peak RSS level (bench/notes.md, "mimalloc"). Built with `no_thp`: with
/// transparent huge pages in `madvise` mode, mimalloc's huge-page advice took a sidecar's
/// peak RSS from ~13 to ~25 MiB.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's release for [`weft_proxy::memory`]: pages freed by the proxy's threads go
/// back to mimalloc's process-wide arenas, and a forced collect purges the arenas' free
/// pages now instead of when a busy thread next allocates (an idle sidecar after a burst
/// kept ~55 MiB without it: bench/notes.md, "mimalloc").
fn mimalloc_release() {
    // SAFETY: `mi_collect` has no preconditions: it may be called from any thread at any
    // time; it collects the calling thread's own heap and purges the shared arenas under
    // their own synchronisation, touching no block that is still allocated.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

fn main() -> ExitCode {
    weft_proxy::memory::set_allocator_release(mimalloc_release);
    match ProxyArgs::parse(std::env::args().skip(1), |name| std::env::var(name).ok()) {
        Ok(Parsed::Run(args)) => weft_proxy::run::run_main(args),
        Ok(Parsed::Print(text)) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weft-proxy: {e}");
            ExitCode::from(2)
        }
    }
}
