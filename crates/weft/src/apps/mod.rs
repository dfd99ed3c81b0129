//! `weft demo httpbin|sleep|tcp-echo|helloworld`: the workloads Istio's tasks use besides
//! Bookinfo, written in Rust with the same APIs, so the tasks run as their pages describe
//! (circuit breaking, mirroring, timeouts, TCP traffic shifting, egress, rate limiting,
//! locality failover; see `samples/README.md` and docs/local.md).
//!
//! - `httpbin`: kennethreitz/httpbin's endpoints the tasks call (`httpbin`), with
//!   gunicorn's access log on stdout (the mirroring task reads it);
//! - `sleep`: idles until stopped; commands run "in" it with `weft exec sleep -- ...`;
//! - `tcp-echo`: Istio's tcp-echo-server, every line echoed back after a prefix;
//! - `helloworld`: Istio's helloworld, `GET /hello` names the version and instance.

pub mod helloworld;
pub mod httpbin;
pub mod tcp_echo;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use anyhow::Context as _;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

/// The demo workloads of Istio's tasks other than Bookinfo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum App {
    /// httpbin: `/status/{code}`, `/delay/{s}`, `/headers`, `/ip`, `/get`, `/anything`, ...
    Httpbin,
    /// An idle client workload; run commands in it with `weft exec sleep -- ...`.
    Sleep,
    /// TCP echo: each line comes back after the `--prefix` (`one`, `two`).
    TcpEcho,
    /// helloworld: `GET /hello` answers `Hello version: <v>, instance: <pod>`.
    Helloworld,
}

impl App {
    /// The port each listens on unless told otherwise (the port of Istio's sample Service).
    pub fn default_port(self) -> u16 {
        match self {
            App::Httpbin => 8000,
            App::Sleep => 0,
            App::TcpEcho => 9000,
            App::Helloworld => 5000,
        }
    }

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            App::Httpbin => "httpbin",
            App::Sleep => "sleep",
            App::TcpEcho => "tcp-echo",
            App::Helloworld => "helloworld",
        }
    }
}

/// Flags of the non-Bookinfo demo apps (besides `--address`, `--version` and the port,
/// shared with Bookinfo).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AppArgs {
    /// tcp-echo: what every echoed line starts with (Istio's sample: `one` for v1, `two`
    /// for v2). Default: `hello`.
    #[arg(long)]
    pub prefix: Option<String>,
}

/// Everything a demo app needs.
#[derive(Clone, Debug)]
pub struct AppConfig {
    /// Which app.
    pub app: App,
    /// Where to listen (unused by `sleep`).
    pub listen: SocketAddr,
    /// Version label (`v1` when not given), printed at start and by helloworld.
    pub version: String,
    /// Instance name (helloworld's `instance`): `POD_NAME`, else `HOSTNAME`, else the host name.
    pub instance: String,
    /// tcp-echo's prefix.
    pub prefix: String,
}

impl AppConfig {
    /// Resolves flags; `env` looks up `HOSTNAME` when no pod name is given.
    pub fn new(
        app: App,
        address: Option<IpAddr>,
        port: Option<u16>,
        version: Option<String>,
        pod_name: Option<String>,
        args: AppArgs,
        env: impl Fn(&str) -> Option<String>,
    ) -> AppConfig {
        let non_empty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        let instance = non_empty(pod_name)
            .or_else(|| non_empty(env("HOSTNAME")))
            .unwrap_or_else(|| format!("{}-{}", app.name(), non_empty(version.clone()).unwrap_or_else(|| "v1".into())));
        AppConfig {
            app,
            listen: SocketAddr::new(address.unwrap_or(IpAddr::from([0, 0, 0, 0])), port.unwrap_or(app.default_port())),
            version: non_empty(version).unwrap_or_else(|| "v1".into()),
            instance,
            prefix: non_empty(args.prefix).unwrap_or_else(|| "hello".into()),
        }
    }
}

/// Runs one demo app until SIGTERM / Ctrl-C. Prints `listening on <addr>` once bound.
pub async fn run(config: AppConfig) -> anyhow::Result<()> {
    let name = config.app.name();
    let serving = async {
        if config.app == App::Sleep {
            println!("weft demo sleep {}: idle; run commands in it with `weft exec <workload> -- CMD`", config.version);
            return std::future::pending::<anyhow::Result<()>>().await;
        }
        let listener = TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        println!("weft demo {name} {}: listening on {addr}", config.version);
        match config.app {
            App::Httpbin => serve_http(listener, httpbin::handle).await,
            App::Helloworld => {
                let hello = std::sync::Arc::new(helloworld::Helloworld::new(&config.version, &config.instance));
                serve_http(listener, move |req, peer| helloworld::handle(hello.clone(), req, peer)).await
            }
            App::TcpEcho => tcp_echo::serve(listener, &config.prefix).await,
            App::Sleep => Ok(()),
        }
    };
    // Biased, signal first: its handlers are installed on the first poll, before the
    // app prints that it is up (a SIGTERM right after that line must stop it cleanly).
    tokio::select! {
        biased;
        _ = crate::shutdown_signal() => {
            info!("signal received: stopping");
            Ok(())
        }
        r = serving => r,
    }
}

/// Accepts HTTP/1.1 connections, answers each request with `handler` (given the peer's
/// address) and writes one gunicorn-style access log line per request to stdout:
/// `127.0.0.1 - - [06/Dec/2026:16:50:00 +0000] "GET /headers HTTP/1.1" 200 321 "-" "curl/8.5.0"`.
pub async fn serve_http<H, F>(listener: TcpListener, handler: H) -> anyhow::Result<()>
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                debug!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                async move {
                    let line = request_line(&req);
                    let header = |n: &str| {
                        req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("-").replace('"', "\\\"")
                    };
                    let (referer, agent) = (header("referer"), header("user-agent"));
                    let resp = handler(req, peer).await;
                    let len = hyper::body::Body::size_hint(resp.body()).exact().unwrap_or(0);
                    access_log(&format!(
                        "{} - - [{}] \"{line}\" {} {len} \"{referer}\" \"{agent}\"",
                        peer.ip(),
                        clf_time(SystemTime::now()),
                        resp.status().as_u16()
                    ));
                    Ok::<_, Infallible>(resp)
                }
            });
            if let Err(e) =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
            {
                debug!("connection from {peer}: {e}");
            }
        });
    }
}

/// `GET /path?query HTTP/1.1`.
fn request_line<B>(req: &Request<B>) -> String {
    let target = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    format!("{} {target} {:?}", req.method(), req.version())
}

/// One line on stdout; a closed stdout is not worth a panic.
fn access_log(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Common Log Format time in UTC: `06/Dec/2026:16:50:00 +0000`.
pub fn clf_time(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{day:02}/{}/{year}:{:02}:{:02}:{:02} +0000",
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clf_time_formats_utc_dates() {
        let t = |s: u64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s);
        assert_eq!(clf_time(t(0)), "01/Jan/1970:00:00:00 +0000");
        // 2018-03-07T19:02:43Z, the line of Istio's mirroring task.
        assert_eq!(clf_time(t(1_520_449_363)), "07/Mar/2018:19:02:43 +0000");
        // A leap day.
        assert_eq!(clf_time(t(1_709_208_000)), "29/Feb/2024:12:00:00 +0000");
    }

    #[test]
    fn config_defaults_follow_istio_samples() {
        let c = AppConfig::new(App::Httpbin, None, None, None, None, AppArgs::default(), |_| None);
        assert_eq!((c.listen.port(), c.version.as_str()), (8000, "v1"));
        let c = AppConfig::new(App::TcpEcho, None, None, Some("v2".into()), None, AppArgs::default(), |_| None);
        assert_eq!((c.listen.port(), c.prefix.as_str()), (9000, "hello"));
        let c = AppConfig::new(App::Helloworld, None, Some(1), None, None, AppArgs::default(), |k| {
            (k == "HOSTNAME").then(|| "box".to_string())
        });
        assert_eq!((c.listen.port(), c.instance.as_str()), (1, "box"));
    }
}
