//! `weft demo <service>`: Istio's Bookinfo sample (productpage, details, reviews v1/v2/v3,
//! ratings) written in Rust, with the same HTTP API, JSON shapes, HTML markers, status
//! codes, timeouts, retries and forwarded headers as Istio's images, so that the tasks
//! written against Bookinfo (traffic shifting, fault injection, timeouts, authorization by
//! `end-user`, tracing) behave the same with weft. See docs/bookinfo.md.
//!
//! Each service is one module with a `handle` function; `serve` runs any of them as an
//! HTTP/1.1 server and logs one line per request; `client` is the outbound side shared by
//! productpage and reviews (header propagation, timeouts, the HTTP proxy option).

mod client;
mod details;
mod productpage;
mod productpage_html;
mod ratings;
mod reviews;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

pub use client::{HttpClient, ProxyConfig, Upstream};

/// The port every Bookinfo service listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 9080;

/// The four Bookinfo applications.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Service {
    /// The front end: HTML page and JSON API, calls details and reviews.
    Productpage,
    /// Book details (author, ISBN, ...).
    Details,
    /// Book reviews; v2 and v3 add star ratings from the ratings service.
    Reviews,
    /// Star ratings per reviewer.
    Ratings,
}

/// Flags (and the environment variables Istio's Bookinfo images read) of `weft demo <service>`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct BookinfoArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0", env = "WEFT_DEMO_ADDRESS")]
    pub address: Option<IpAddr>,
    /// Service version. reviews: v1 (no stars), v2 (black stars), v3 (red stars);
    /// ratings: v1, v2, v-faulty, v-delayed, v-unavailable, v-unhealthy; httpbin,
    /// tcp-echo, helloworld: the version they report (default v1).
    #[arg(long = "version", env = "SERVICE_VERSION")]
    pub service_version: Option<String>,
    /// Bookinfo: host of the details service (`host` or `host:port`; port 9080 when absent).
    #[arg(long, env = "DETAILS_HOSTNAME")]
    pub details_hostname: Option<String>,
    /// Bookinfo: host of the reviews service (`host` or `host:port`).
    #[arg(long, env = "REVIEWS_HOSTNAME")]
    pub reviews_hostname: Option<String>,
    /// Bookinfo: host of the ratings service (`host` or `host:port`).
    #[arg(long, env = "RATINGS_HOSTNAME")]
    pub ratings_hostname: Option<String>,
    /// Bookinfo: domain appended to the service hosts (`details.<domain>`).
    #[arg(long, env = "SERVICES_DOMAIN")]
    pub services_domain: Option<String>,
    /// Bookinfo reviews: star color (v2: black, v3: red).
    #[arg(long, env = "STAR_COLOR")]
    pub star_color: Option<String>,
    /// Bookinfo reviews: call ratings (`true` for v2 and v3).
    #[arg(long, env = "ENABLE_RATINGS")]
    pub enable_ratings: Option<String>,
    /// The pod name: Bookinfo reviews' `podname` (default `reviews-<version>-<random>`),
    /// helloworld's instance (default `$HOSTNAME`).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Bookinfo reviews: the cluster name reported in `clustername`.
    #[arg(long, env = "CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// Bookinfo: send outbound calls through this HTTP proxy (absolute-form requests);
    /// `http_proxy` is read too.
    #[arg(long, env = "HTTP_PROXY")]
    pub http_proxy: Option<String>,
    /// Bookinfo: hosts reached directly despite the proxy (comma list; `no_proxy` is read too).
    #[arg(long, env = "NO_PROXY")]
    pub no_proxy: Option<String>,
}

/// Everything a Bookinfo service needs, resolved from flags and environment.
#[derive(Clone, Debug)]
pub struct BookinfoConfig {
    /// Which application.
    pub service: Service,
    /// Where to listen.
    pub listen: SocketAddr,
    /// The service version (`v1` when not given).
    pub version: String,
    /// Upstream details service.
    pub details: Upstream,
    /// Upstream reviews service.
    pub reviews: Upstream,
    /// Upstream ratings service.
    pub ratings: Upstream,
    /// reviews: star color.
    pub star_color: String,
    /// reviews: whether ratings are fetched.
    pub ratings_enabled: bool,
    /// reviews: reported pod name.
    pub pod_name: String,
    /// reviews: reported cluster name.
    pub cluster_name: String,
    /// Outbound HTTP proxy, if any.
    pub proxy: Option<ProxyConfig>,
}

impl BookinfoConfig {
    /// Resolves the flags the way Istio's images read their environment. `lower_env` looks
    /// up the lower-case proxy variables (`http_proxy`, `no_proxy`) that clap cannot bind
    /// beside their upper-case twins.
    pub fn from_args(
        service: Service,
        port: u16,
        args: BookinfoArgs,
        lower_env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let non_empty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        let version = non_empty(args.service_version).unwrap_or_else(|| "v1".into());
        let domain = non_empty(args.services_domain);
        let upstream = |flag: &str, given: Option<String>, default: &str| {
            let host = non_empty(given).unwrap_or_else(|| default.into());
            Upstream::parse(&host, domain.as_deref()).with_context(|| format!("--{flag} {host:?}"))
        };
        let details = upstream("details-hostname", args.details_hostname, "details")?;
        let reviews = upstream("reviews-hostname", args.reviews_hostname, "reviews")?;
        let ratings = upstream("ratings-hostname", args.ratings_hostname, "ratings")?;
        // Istio's reviews images: v1 without ratings, v2 black stars, v3 red stars.
        let (default_enabled, default_color) = match version.as_str() {
            "v2" => (true, "black"),
            "v3" => (true, "red"),
            _ => (false, "black"),
        };
        let ratings_enabled = match non_empty(args.enable_ratings) {
            Some(v) => v.trim().eq_ignore_ascii_case("true"),
            None => default_enabled,
        };
        let star_color = non_empty(args.star_color).unwrap_or_else(|| default_color.into());
        let pod_name = non_empty(args.pod_name).unwrap_or_else(|| default_pod_name(service, &version));
        let cluster_name = non_empty(args.cluster_name).unwrap_or_else(|| "null".into());
        let proxy_url = non_empty(args.http_proxy).or_else(|| non_empty(lower_env("http_proxy")));
        let no_proxy = non_empty(args.no_proxy).or_else(|| non_empty(lower_env("no_proxy")));
        let proxy = match proxy_url {
            Some(url) => {
                Some(ProxyConfig::parse(&url, no_proxy.as_deref()).with_context(|| format!("HTTP_PROXY {url:?}"))?)
            }
            None => None,
        };
        let address = args.address.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        Ok(BookinfoConfig {
            service,
            listen: SocketAddr::new(address, port),
            version,
            details,
            reviews,
            ratings,
            star_color,
            ratings_enabled,
            pod_name,
            cluster_name,
            proxy,
        })
    }
}

/// Runs one Bookinfo service until SIGTERM / Ctrl-C. Prints `listening on <addr>` once bound.
pub async fn run(config: BookinfoConfig) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let name = service_name(config.service);
    println!("weft demo {name} {}: listening on {addr}", config.version);
    let client = HttpClient::new(config.proxy.clone());
    let serving = async {
        match config.service {
            Service::Productpage => {
                let state = Arc::new(productpage::Productpage::new(&config, client));
                serve(listener, name, move |req| productpage::handle(state.clone(), req)).await
            }
            Service::Details => serve(listener, name, details::handle).await,
            Service::Reviews => {
                let state = Arc::new(reviews::Reviews::new(&config, client));
                serve(listener, name, move |req| reviews::handle(state.clone(), req)).await
            }
            Service::Ratings => {
                let state = Arc::new(ratings::Ratings::new(&config.version));
                serve(listener, name, move |req| ratings::handle(state.clone(), req)).await
            }
        }
    };
    tokio::select! {
        r = serving => r,
        _ = crate::shutdown_signal() => {
            info!("signal received: stopping");
            Ok(())
        }
    }
}

/// Accepts HTTP/1.1 connections and answers each request with `handler`, logging one line
/// per request (service, method, path, status, duration) to stderr.
async fn serve<H, F>(listener: TcpListener, name: &'static str, handler: H) -> anyhow::Result<()>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors and the like: keep serving the open connections.
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
                    let started = Instant::now();
                    let method = req.method().clone();
                    let path = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
                    let resp = handler(req).await;
                    info!("{name} {method} {path} {} {}ms", resp.status().as_u16(), started.elapsed().as_millis());
                    Ok::<_, Infallible>(resp)
                }
            });
            if let Err(e) =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
            {
                debug!("{name}: connection from {peer}: {e}");
            }
        });
    }
}

fn service_name(service: Service) -> &'static str {
    match service {
        Service::Productpage => "productpage",
        Service::Details => "details",
        Service::Reviews => "reviews",
        Service::Ratings => "ratings",
    }
}

/// A pod-like name that says the version, as Kubernetes would name a Deployment's pod
/// (`reviews-v2-5f8c7d9b4-x7k2p`).
fn default_pod_name(service: Service, version: &str) -> String {
    let r = random_u64();
    format!("{}-{version}-{:09x}-{:05x}", service_name(service), r >> 28, r & 0xf_ffff)
}

/// 64 random bits from the standard library's randomly keyed hasher (no extra crate for
/// pod names and trace ids).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    h.write_u128(nanos);
    h.finish()
}

fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    response(status, "application/json", body)
}

fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn not_found() -> Response<Full<Bytes>> {
    response(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "Not Found\n")
}

fn method_not_allowed() -> Response<Full<Bytes>> {
    response(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "Method Not Allowed\n")
}
