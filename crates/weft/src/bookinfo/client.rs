//! Outbound calls of productpage and reviews: GETs over kept-alive HTTP/1.1 connections
//! pooled per address connected to (as the HTTP clients of Istio's Bookinfo apps keep
//! theirs), with an overall timeout, the headers each Istio application propagates, and
//! the HTTP proxy option (`HTTP_PROXY`): the request goes to the proxy in absolute form
//! (`GET http://details:9080/details/0`), which is how an explicit-mode sidecar carries it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Largest upstream body read (the Bookinfo answers are a few hundred bytes).
const MAX_BODY: usize = 1 << 20;

/// Idle connections kept per address; one more is closed when it is handed back.
const MAX_IDLE_PER_ADDRESS: usize = 128;

/// Headers productpage copies from its request to details, reviews and ratings (the list
/// of Istio's `productpage.py` `getForwardHeaders`, plus the B3 headers its tracer
/// injects and the single `b3` header).
pub const PRODUCTPAGE_FORWARD: &[&str] = &[
    "x-request-id",
    "x-ot-span-context",
    "x-datadog-trace-id",
    "x-datadog-parent-id",
    "x-datadog-sampling-priority",
    "traceparent",
    "tracestate",
    "x-cloud-trace-context",
    "grpc-trace-bin",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
    "sw8",
    "user-agent",
    "cookie",
    "authorization",
    "jwt",
];

/// Headers reviews copies from its request to ratings (Istio's `LibertyRestEndpoint`
/// `headers_to_propagate`, plus the single `b3` header).
pub const REVIEWS_FORWARD: &[&str] = &[
    "x-request-id",
    "x-ot-span-context",
    "x-datadog-trace-id",
    "x-datadog-parent-id",
    "x-datadog-sampling-priority",
    "traceparent",
    "tracestate",
    "x-cloud-trace-context",
    "grpc-trace-bin",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
    "end-user",
    "user-agent",
];

/// A service to call: `host:port` as written in the Host header and resolved normally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// `host:port`.
    pub authority: String,
    /// The host alone (for `NO_PROXY`).
    pub host: String,
}

/// The outbound HTTP proxy and the hosts that bypass it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// `host:port` of the proxy.
    pub address: String,
    /// `NO_PROXY` entries, lower-cased.
    pub no_proxy: Vec<String>,
}

/// Sends GETs to upstreams, directly or through the proxy, reusing idle connections.
/// Clones share the pool.
#[derive(Clone, Debug)]
pub struct HttpClient {
    proxy: Option<ProxyConfig>,
    idle: Arc<Mutex<HashMap<String, Vec<Sender>>>>,
}

/// The sending half of one HTTP/1.1 connection (its driver runs in its own task and ends
/// when the peer closes or the sender is dropped).
type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// A complete upstream answer.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: StatusCode,
    /// Whole body.
    pub body: Bytes,
}

impl Upstream {
    /// `host`, `host:port` or `[v6]:port`; `.domain` is appended to a host without a port
    /// (as Istio's `SERVICES_DOMAIN`); the port defaults to 9080.
    pub fn parse(text: &str, domain: Option<&str>) -> anyhow::Result<Self> {
        let text = text.trim();
        let authority: hyper::http::uri::Authority =
            text.parse().map_err(|e| anyhow!("not a host or host:port: {e}"))?;
        if text.contains('@') {
            bail!("not a host or host:port: user info is not allowed");
        }
        let host = authority.host().to_owned();
        let (host, port) = match authority.port_u16() {
            Some(port) => (host, port),
            None => {
                let host = match domain {
                    Some(d) => format!("{host}.{}", d.trim_start_matches('.')),
                    None => host,
                };
                (host, super::DEFAULT_PORT)
            }
        };
        Ok(Upstream { authority: format!("{host}:{port}"), host: host.trim_matches(['[', ']']).to_ascii_lowercase() })
    }
}

impl ProxyConfig {
    /// `http://host:port`, `http://host:port/` or `host:port` (port 80 when absent), and a
    /// comma-separated `NO_PROXY` list (`*`, `host`, `.domain`, `domain`).
    pub fn parse(url: &str, no_proxy: Option<&str>) -> anyhow::Result<Self> {
        let url = url.trim();
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => bail!("proxy scheme `{scheme}` is not supported: expected http://host:port"),
            None => url,
        };
        let authority = rest.trim_end_matches('/');
        if authority.contains('@') {
            bail!("proxy credentials are not supported: expected http://host:port");
        }
        if authority.contains('/') {
            bail!("expected http://host:port, without a path");
        }
        let parsed: hyper::http::uri::Authority =
            authority.parse().map_err(|e| anyhow!("expected http://host:port: {e}"))?;
        let port = parsed.port_u16().unwrap_or(80);
        let no_proxy = no_proxy
            .unwrap_or("")
            .split(',')
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        Ok(ProxyConfig { address: format!("{}:{port}", parsed.host()), no_proxy })
    }

    /// Whether `host` is reached through the proxy.
    pub fn applies_to(&self, host: &str) -> bool {
        !self.no_proxy.iter().any(|entry| {
            let entry = entry.split(':').next().unwrap_or(entry);
            entry == "*"
                || host == entry.trim_start_matches('.')
                || host.ends_with(&format!(".{}", entry.trim_start_matches('.')))
        })
    }
}

impl HttpClient {
    /// A client using `proxy` when set.
    pub fn new(proxy: Option<ProxyConfig>) -> Self {
        HttpClient { proxy, idle: Arc::default() }
    }

    /// GET `path` from `upstream` with `headers`; the whole exchange (connect, request,
    /// body) must finish within `timeout`.
    pub async fn get(
        &self,
        upstream: &Upstream,
        path: &str,
        headers: HeaderMap,
        timeout: Duration,
    ) -> anyhow::Result<Reply> {
        tokio::time::timeout(timeout, self.get_inner(upstream, path, headers))
            .await
            .map_err(|_| anyhow!("http://{}{path}: no answer within {timeout:?}", upstream.authority))?
            .with_context(|| format!("http://{}{path}", upstream.authority))
    }

    async fn get_inner(&self, upstream: &Upstream, path: &str, headers: HeaderMap) -> anyhow::Result<Reply> {
        let proxy = self.proxy.as_ref().filter(|p| p.applies_to(&upstream.host));
        let (connect_to, uri) = match proxy {
            Some(p) => (p.address.as_str(), format!("http://{}{path}", upstream.authority)),
            None => (upstream.authority.as_str(), path.to_owned()),
        };
        let uri: Uri = uri.parse().map_err(|e| anyhow!("bad request target: {e}"))?;
        let mut req = Request::get(uri).body(Empty::<Bytes>::new())?;
        *req.headers_mut() = headers;
        req.headers_mut().insert(HOST, HeaderValue::from_str(&upstream.authority)?);

        // An idle connection first; a request it did not take (the peer closed it while it
        // sat in the pool) goes again on a new connection, as nothing of it was sent.
        let (mut sender, mut reused) = match self.take_idle(connect_to) {
            Some(s) => (s, true),
            None => (connect(connect_to).await?, false),
        };
        let resp = loop {
            if reused && sender.ready().await.is_err() {
                (sender, reused) = (connect(connect_to).await?, false);
            }
            match sender.try_send_request(req).await {
                Ok(resp) => break resp,
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => {
                        req = unsent;
                        (sender, reused) = (connect(connect_to).await?, false);
                    }
                    _ => return Err(e.into_error().into()),
                },
            }
        };
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| anyhow!("reading the body: {e}"))?
            .to_bytes();
        self.put_idle(connect_to, sender);
        Ok(Reply { status, body })
    }
}

impl HttpClient {
    /// An idle connection to `address` that is still open.
    fn take_idle(&self, address: &str) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(address)?;
        while let Some(sender) = list.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    /// Keeps `sender` for the next request to `address` when its connection stays open
    /// (the answer was read whole, and neither side asked to close).
    fn put_idle(&self, address: &str, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry(address.to_owned()).or_default();
        if list.len() >= MAX_IDLE_PER_ADDRESS {
            list.retain(|s| !s.is_closed());
        }
        if list.len() < MAX_IDLE_PER_ADDRESS {
            list.push(sender);
        }
    }
}

/// A new HTTP/1.1 connection to `address`.
async fn connect(address: &str) -> anyhow::Result<Sender> {
    let stream = TcpStream::connect(address).await.with_context(|| format!("connecting to {address}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// The headers of `incoming` named in `names`, in that order.
pub fn copy_headers(incoming: &HeaderMap, names: &[&'static str]) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in names {
        let name = HeaderName::from_static(name);
        for value in incoming.get_all(&name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}
