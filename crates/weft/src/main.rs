//! The `weft` command: one binary, one subcommand per role.

mod demo;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing::info;

#[derive(Parser)]
#[command(name = "weft", version, about = "weft service mesh")]
struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true, env = "WEFT_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar proxy, configured over xDS from the bootstrap's control plane.
    Proxy {
        /// Bootstrap file (YAML or JSON): node identity, xDS server, admin/metrics ports.
        #[arg(long, short = 'b', env = "WEFT_BOOTSTRAP")]
        bootstrap: PathBuf,
    },
    /// Run a small local mesh: an in-process xDS server, two echo backends and a proxy,
    /// with a weighted split, a header route and a fault; prints what to curl.
    Demo {
        /// Port of the proxy's outbound listener.
        #[arg(long, default_value_t = 15001)]
        port: u16,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_json);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Proxy { bootstrap } => run_proxy(bootstrap).await,
            Command::Demo { port } => demo::run(port).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run_proxy(path: PathBuf) -> anyhow::Result<()> {
    let b = weft_proxy::bootstrap::Bootstrap::load(&path)?;
    let proxy = weft_proxy::proxy::ProxyHandle::start(b).await.context("starting the proxy")?;
    tokio::select! {
        _ = shutdown_signal() => info!("signal received: draining"),
        _ = proxy.quit_requested() => info!("/quitquitquit: draining"),
    }
    proxy.shutdown().await;
    Ok(())
}

/// SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
