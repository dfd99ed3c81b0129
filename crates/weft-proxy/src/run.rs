//! The proxy process: what `weft proxy` and the proxy-only `weft-proxy` binary both run
//! (bootstrap from a file or `WEFT_BOOTSTRAP_YAML`, worker threads, SIGTERM/Ctrl-C and
//! `/quitquitquit` drain). `weft-proxy` parses its few flags by hand ([`ProxyArgs::parse`])
//! so it links neither clap nor the control plane: its text stays small, which is most of
//! a sidecar's resident memory.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use tracing::info;

use crate::bootstrap::Bootstrap;

/// What the proxy process needs from its command line and environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyArgs {
    /// Bootstrap file (YAML or JSON).
    pub bootstrap: Option<PathBuf>,
    /// The bootstrap's text instead of a file.
    pub bootstrap_yaml: Option<String>,
    /// Worker threads; 1 = tokio's single-threaded scheduler; `None` = one per CPU.
    pub concurrency: Option<usize>,
    /// Log as JSON lines.
    pub log_json: bool,
    /// Overrides the bootstrap's `drain_duration` (how long a connection whose filter
    /// chain changed may finish before it is closed).
    pub drain_duration: Option<std::time::Duration>,
}

/// What `weft-proxy --help` prints.
pub const USAGE: &str = "\
weft-proxy: the weft sidecar proxy, configured over xDS from its bootstrap's control plane
(the same as `weft proxy`).

Usage: weft-proxy [--bootstrap FILE | --bootstrap-yaml TEXT] [--concurrency N] [--drain-duration D] [--log-json]

Options:
  -b, --bootstrap FILE       bootstrap file (YAML or JSON) [env: WEFT_BOOTSTRAP]
      --bootstrap-yaml TEXT  the bootstrap's text instead of a file [env: WEFT_BOOTSTRAP_YAML]
      --concurrency N        worker threads; 1 runs the proxy on one thread [env: WEFT_CONCURRENCY]
      --drain-duration D     how long a connection whose filter chain changed (TLS mode, TCP
                             proxy, removed chain) may finish before it is closed, e.g. 45s;
                             default: the bootstrap's drain_duration (45s) [env: WEFT_DRAIN_DURATION]
      --log-json             log as JSON lines [env: WEFT_LOG_JSON]
  -h, --help                 print this help
  -V, --version              print the version

Logging: WEFT_LOG (tracing filter, default info).
";

/// The outcome of parsing `weft-proxy`'s command line.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Run the proxy.
    Run(ProxyArgs),
    /// Print this text and exit successfully (`--help`, `--version`).
    Print(String),
}

impl ProxyArgs {
    /// Parses `weft-proxy`'s arguments (without the program name), with the same flags,
    /// environment variables and conflicts as `weft proxy`. Flags win over the
    /// environment. `env` looks a variable up (`std::env::var(..).ok()` in the binary).
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Parsed, String> {
        let mut out = ProxyArgs::default();
        let mut concurrency: Option<String> = None;
        let mut drain: Option<String> = None;
        let mut log_json = false;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            let mut value = |name: &str| -> Result<String, String> {
                match inline.clone().or_else(|| args.next()) {
                    Some(v) => Ok(v),
                    None => Err(format!("{name} needs a value")),
                }
            };
            match flag.as_str() {
                "-h" | "--help" => return Ok(Parsed::Print(USAGE.to_string())),
                "-V" | "--version" => {
                    return Ok(Parsed::Print(format!("weft-proxy {}\n", env!("CARGO_PKG_VERSION"))));
                }
                "-b" | "--bootstrap" => out.bootstrap = Some(PathBuf::from(value("--bootstrap")?)),
                "--bootstrap-yaml" => out.bootstrap_yaml = Some(value("--bootstrap-yaml")?),
                "--concurrency" => concurrency = Some(value("--concurrency")?),
                "--drain-duration" => drain = Some(value("--drain-duration")?),
                "--log-json" if inline.is_none() => log_json = true,
                other => return Err(format!("unexpected argument '{other}' (see --help)")),
            }
        }
        if out.bootstrap.is_some() && out.bootstrap_yaml.is_some() {
            return Err("--bootstrap and --bootstrap-yaml cannot be used together".into());
        }
        if out.bootstrap.is_none() && out.bootstrap_yaml.is_none() {
            out.bootstrap = env("WEFT_BOOTSTRAP").filter(|v| !v.is_empty()).map(PathBuf::from);
            if out.bootstrap.is_none() {
                out.bootstrap_yaml = env("WEFT_BOOTSTRAP_YAML").filter(|v| !v.is_empty());
            }
        }
        if out.bootstrap.is_none() && out.bootstrap_yaml.is_none() {
            return Err("give a bootstrap: --bootstrap FILE, --bootstrap-yaml TEXT, WEFT_BOOTSTRAP or \
                        WEFT_BOOTSTRAP_YAML (see --help)"
                .into());
        }
        if let Some(n) = concurrency.or_else(|| env("WEFT_CONCURRENCY").filter(|v| !v.is_empty())) {
            match n.parse::<usize>() {
                Ok(n) => out.concurrency = Some(n),
                Err(_) => return Err(format!("--concurrency: '{n}' is not a number of threads")),
            }
        }
        if let Some(d) = drain.or_else(|| env("WEFT_DRAIN_DURATION").filter(|v| !v.is_empty())) {
            out.drain_duration = Some(parse_duration(&d).map_err(|e| format!("--drain-duration: {e}"))?);
        }
        out.log_json = log_json || env("WEFT_LOG_JSON").is_some_and(|v| matches!(v.as_str(), "true" | "1"));
        Ok(Parsed::Run(out))
    }
}

/// A duration as the bootstrap writes them (`45s`, `500ms`, `1m`).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime_serde::re::humantime::parse_duration(text)
        .map_err(|e| format!("'{text}' is not a duration like 45s or 500ms ({e})"))
}

/// The tokio runtime for `concurrency` worker threads: 1 = the single-threaded
/// scheduler (no work-stealing machinery to pay for), `None` = one worker per CPU.
pub fn runtime(concurrency: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match concurrency {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    // Each worker runs the allocator's release on its own heap when it next parks after a
    // release round (see crate::memory); without one (glibc) the hook is not installed.
    if crate::memory::has_allocator_release() {
        builder.on_thread_park(crate::memory::on_worker_park);
    }
    builder.enable_all().build()
}

/// Logs to stderr with the `WEFT_LOG` filter (default `default_level`), as JSON lines
/// when `json`.
pub fn init_tracing(json: bool, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
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

/// The whole `weft-proxy` process: logging, runtime, [`run`]; the exit code to return.
pub fn run_main(args: ProxyArgs) -> ExitCode {
    init_tracing(args.log_json, "info");
    let rt = match runtime(args.concurrency) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the bootstrap, starts the proxy and serves until SIGTERM/Ctrl-C or
/// `/quitquitquit`, then drains. Runs inside the caller's runtime.
pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    let mut b = match (args.bootstrap, args.bootstrap_yaml) {
        (Some(path), _) => Bootstrap::load(&path)?,
        (None, Some(text)) => Bootstrap::parse(&text, Path::new("$WEFT_BOOTSTRAP_YAML"))?,
        (None, None) => anyhow::bail!("give a bootstrap: --bootstrap FILE or --bootstrap-yaml TEXT"),
    };
    if let Some(d) = args.drain_duration {
        b.drain_duration = d;
    }
    // Memory a burst of connections freed goes back to the system once they are gone.
    crate::memory::release_freed_memory(crate::memory::RELEASE_INTERVAL, tokio::runtime::Handle::current());
    // Listening before the listeners open: a SIGTERM right after the proxy is ready
    // drains it (unhandled, it would kill the process at once).
    let mut shutdown = Shutdown::listen();
    let proxy = tokio::select! {
        p = crate::proxy::ProxyHandle::start(b) => p.context("starting the proxy")?,
        _ = shutdown.wait() => {
            info!("signal received while starting: stopping");
            return Ok(());
        }
    };
    tokio::select! {
        _ = shutdown.wait() => info!("signal received: draining"),
        _ = proxy.quit_requested() => info!("/quitquitquit: draining"),
    }
    proxy.shutdown().await;
    Ok(())
}

/// SIGTERM or Ctrl-C, once.
pub async fn shutdown_signal() {
    Shutdown::listen().wait().await
}

/// SIGTERM and Ctrl-C (SIGINT), listened for from [`Shutdown::listen`] on. A signal that
/// arrives while its owner is busy elsewhere (between two `select!` rounds, in a branch's
/// handler) is kept for the next [`Shutdown::wait`]. A listener created per round would
/// lose it: the runtime's handler stays installed, so the process neither stops nor
/// notices.
pub struct Shutdown {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Shutdown {
    /// Starts listening. Must be called within a Tokio runtime.
    pub fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Shutdown { term: signal(SignalKind::terminate()).ok(), int: signal(SignalKind::interrupt()).ok() }
        }
        #[cfg(not(unix))]
        Shutdown {}
    }

    /// Returns once a signal arrived since [`Shutdown::listen`] or the last `wait`.
    /// Cancel-safe: dropping the future loses no signal.
    pub async fn wait(&mut self) {
        #[cfg(unix)]
        {
            async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            if self.term.is_none() && self.int.is_none() {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
            tokio::select! {
                _ = recv(&mut self.term) => {},
                _ = recv(&mut self.int) => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CI hang of `weft up`: a SIGTERM that arrived while no round of its loop was
    /// waiting was swallowed. The listener keeps it.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_signal_that_arrives_before_the_wait_is_kept() {
        let mut shutdown = Shutdown::listen();
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).unwrap();
        // Busy elsewhere: a round that does not wait for the signal.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        tokio::time::timeout(std::time::Duration::from_secs(10), shutdown.wait())
            .await
            .expect("the SIGTERM sent before the wait was lost");
    }

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Parsed, String> {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        ProxyArgs::parse(args.iter().map(|s| s.to_string()), |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }

    fn run_args(args: &[&str], env: &[(&str, &str)]) -> ProxyArgs {
        match parse(args, env) {
            Ok(Parsed::Run(a)) => a,
            other => panic!("expected Run, got {other:?}"),
        }
    }

    #[test]
    fn flags_and_environment_like_weft_proxy() {
        let a = run_args(&["-b", "boot.yaml", "--concurrency", "1"], &[]);
        assert_eq!(a.bootstrap, Some(PathBuf::from("boot.yaml")));
        assert_eq!(a.concurrency, Some(1));
        let a = run_args(&["--bootstrap=b.yaml", "--log-json"], &[("WEFT_CONCURRENCY", "3")]);
        assert_eq!((a.bootstrap, a.concurrency, a.log_json), (Some(PathBuf::from("b.yaml")), Some(3), true));
        let a = run_args(&[], &[("WEFT_BOOTSTRAP_YAML", "node: {id: a}"), ("WEFT_LOG_JSON", "true")]);
        assert_eq!((a.bootstrap_yaml.as_deref(), a.log_json), (Some("node: {id: a}"), true));
        let a = run_args(&["--bootstrap-yaml", "x"], &[("WEFT_BOOTSTRAP", "env.yaml")]);
        assert_eq!((a.bootstrap, a.bootstrap_yaml.as_deref()), (None, Some("x")), "the flag wins over the env");
    }

    #[test]
    fn bad_command_lines_are_refused_with_the_reason() {
        assert!(parse(&[], &[]).unwrap_err().contains("give a bootstrap"));
        assert!(parse(&["-b", "a", "--bootstrap-yaml", "b"], &[]).unwrap_err().contains("cannot be used together"));
        assert!(parse(&["-b"], &[]).unwrap_err().contains("needs a value"));
        assert!(parse(&["-b", "a", "--concurrency", "many"], &[]).unwrap_err().contains("not a number"));
        assert!(parse(&["-b", "a", "--frobnicate"], &[]).unwrap_err().contains("'--frobnicate'"));
        assert!(matches!(parse(&["--help"], &[]), Ok(Parsed::Print(t)) if t.contains("WEFT_BOOTSTRAP_YAML")));
        assert!(matches!(parse(&["-V"], &[]), Ok(Parsed::Print(t)) if t.starts_with("weft-proxy ")));
    }
}
