//! `weft-proxy`: the sidecar proxy alone, the same as `weft proxy` (see
//! `weft_proxy::run`), without the control plane, the CLI and the demos, so a sidecar
//! maps only the proxy's code.

use std::process::ExitCode;

use weft_proxy::run::{Parsed, ProxyArgs};

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
