//! `weft-proxy`: the sidecar proxy alone, the same as `weft proxy` (see
//! `weft_proxy::run`), without the control plane, the CLI and the demos, so a sidecar
//! maps only the proxy's code.

use std::process::ExitCode;

use weft_proxy::run::{Parsed, ProxyArgs};

/// mimalloc instead of glibc's malloc: 2.5–7% fewer instructions per proxied request
/// (a request allocates and frees a few dozen blocks, several above glibc's 1 KiB thread
/// cache), peak RSS level (bench/notes.md, "mimalloc"). Built with `no_thp`: with
/// transparent huge pages in `madvise` mode, mimalloc's huge-page advice took a sidecar's
/// peak RSS from ~13 to ~25 MiB.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
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
