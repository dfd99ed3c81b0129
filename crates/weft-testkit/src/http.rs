//! Small HTTP clients for tests: HTTP/1.1 direct, HTTP/1.1 through an HTTP proxy
//! (absolute-form request target), and h2c with prior knowledge. Each call opens a
//! fresh connection and returns status, headers and the whole body.

use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// A complete HTTP response.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Response status.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// The whole response body.
    pub body: Bytes,
}

impl Reply {
    /// The body parsed as JSON (e.g. an [`crate::echo::EchoServer`] answer).
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("response body is not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    /// A header as a string, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }

    /// The body as (lossy) UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `req` over a new HTTP/1.1 connection to `addr`. The request target is written
/// exactly as `req.uri()` holds it (origin-form `/p` or absolute-form `http://h/p`).
pub async fn send_h1(addr: SocketAddr, req: Request<Full<Bytes>>) -> anyhow::Result<Reply> {
    let stream = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("HTTP/1.1 handshake with {addr}"))?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.with_context(|| format!("HTTP/1.1 request to {addr}"))?;
    let reply = collect(resp).await;
    conn.abort();
    reply
}

/// Sends `req` over a new h2c (prior knowledge) connection to `addr`. `req.uri()` must
/// be absolute (`http://authority/path`); its authority becomes `:authority`.
pub async fn send_h2c(addr: SocketAddr, req: Request<Full<Bytes>>) -> anyhow::Result<Reply> {
    let stream = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .with_context(|| format!("h2c handshake with {addr}"))?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.with_context(|| format!("h2c request to {addr}"))?;
    let reply = collect(resp).await;
    conn.abort();
    reply
}

/// `GET path` over HTTP/1.1 directly to `addr` with `Host: host`.
pub async fn get_h1(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<Reply> {
    send_h1(addr, request(Method::GET, host, path, Bytes::new())?).await
}

/// `GET url` through the HTTP proxy at `proxy`: absolute-form target, `Host` from `url`.
pub async fn get_via_proxy(proxy: SocketAddr, url: &str) -> anyhow::Result<Reply> {
    let uri: http::Uri = url.parse().with_context(|| format!("bad url {url}"))?;
    let host = uri.authority().with_context(|| format!("url {url} has no authority"))?.to_string();
    let req =
        Request::get(uri).header(http::header::HOST, host).body(Full::new(Bytes::new())).context("building request")?;
    send_h1(proxy, req).await
}

/// `GET path` over h2c (prior knowledge) to `addr` with `:authority` `authority`.
pub async fn get_h2c(addr: SocketAddr, authority: &str, path: &str) -> anyhow::Result<Reply> {
    let req =
        Request::get(format!("http://{authority}{path}")).body(Full::new(Bytes::new())).context("building request")?;
    send_h2c(addr, req).await
}

/// An origin-form HTTP/1.1 request with a `Host` header.
pub fn request(method: Method, host: &str, path: &str, body: Bytes) -> anyhow::Result<Request<Full<Bytes>>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, host)
        .body(Full::new(body))
        .context("building request")
}

async fn collect(resp: http::Response<hyper::body::Incoming>) -> anyhow::Result<Reply> {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.context("reading response body")?.to_bytes();
    Ok(Reply { status: parts.status, headers: parts.headers, body })
}
