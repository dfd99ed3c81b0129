//! Echo servers that tell a test what reached them.
//!
//! - [`EchoServer`]: HTTP/1.1 and h2c on one port; answers with a JSON description of
//!   the request, `/status/NNN`, `/delay/MS`, `POST /echo`, and WebSocket-style upgrades.
//! - [`GrpcEchoServer`] and [`grpc_call`]: gRPC over h2c with raw framing (no protoc).
//! - [`TcpEchoServer`] and [`BannerServer`]: opaque TCP, client-first and server-first.

mod grpc;
mod tcp;
mod ws;

pub use grpc::{
    decode_message, encode_message, grpc_call, grpc_call_with_headers, GrpcEchoServer, GrpcReply, GrpcStream,
};
pub use tcp::{BannerServer, TcpEchoServer};

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// Header naming the echo server that answered.
pub const SERVER_HEADER: &str = "x-echo-server";
/// A request header asking the echo server to wait that many milliseconds first.
pub const DELAY_HEADER: &str = "x-echo-delay-ms";

/// HTTP/1.1 + h2c echo server on `127.0.0.1:0`; stops when dropped.
///
/// Every response carries `x-echo-server: <name>`. Routes:
/// - `GET /status/NNN`: answers with status NNN;
/// - `/delay/MS`: sleeps MS milliseconds first (any path with `x-echo-delay-ms: MS` too);
/// - `POST /echo`: the body is the request body;
/// - a request with an `Upgrade` header: `101 Switching Protocols` (with
///   `Sec-WebSocket-Accept` when the request has a `Sec-WebSocket-Key`), then raw bytes
///   are echoed;
/// - anything else: JSON `{"server","method","path","uri","headers":{..},"body_len"}`
///   where `path` includes the query, `uri` is the request target as received
///   (absolute-form through a proxy, `http://authority/path` over h2), and repeated
///   headers are joined with `,`.
pub struct EchoServer {
    /// The bound address.
    pub addr: SocketAddr,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) connections: AtomicU64,
}

impl EchoServer {
    /// Binds `127.0.0.1:0` and serves until dropped.
    ///
    /// # Panics
    /// If the loopback listener cannot be bound.
    pub async fn start(name: &str) -> Self {
        let listener = bind_loopback().await;
        let addr = listener.local_addr().expect("local_addr of a bound listener");
        let counters = Arc::new(Counters::default());
        let name: Arc<str> = Arc::from(name);
        let task = tokio::spawn(serve_http(listener, counters.clone(), move |req| {
            let name = name.clone();
            async move { Ok::<_, Infallible>(echo(&name, req).await) }
        }));
        EchoServer { addr, counters, task }
    }

    /// Requests received so far (all protocols; a request counts when it arrives, before
    /// `/delay/MS` holds it).
    pub fn requests(&self) -> u64 {
        self.counters.requests.load(Ordering::SeqCst)
    }

    /// Waits until [`requests`](Self::requests) reaches `n`: how a test knows a request
    /// is in flight at the app (rather than sleeping and hoping it got there).
    ///
    /// # Panics
    /// When 30 s pass first.
    pub async fn wait_for_requests(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.requests() < n {
            assert!(tokio::time::Instant::now() < deadline, "echo server saw {} requests, never {n}", self.requests());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.counters.connections.load(Ordering::SeqCst)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) async fn bind_loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0")
}

/// Accept loop shared by the HTTP and gRPC echo servers. Connection tasks live in a
/// `JoinSet` owned by this future, so aborting it closes every connection too.
pub(crate) async fn serve_http<F, Fut, B>(listener: TcpListener, counters: Arc<Counters>, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors or similar: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        counters.connections.fetch_add(1, Ordering::SeqCst);
        let handler = handler.clone();
        let counters = counters.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                counters.requests.fetch_add(1, Ordering::SeqCst);
                handler(req)
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            // Errors here are the client's doing (reset, bad bytes); the server goes on.
            let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).await;
        });
    }
}

async fn echo(name: &str, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    if req.headers().contains_key(http::header::UPGRADE) {
        return upgrade(name, &mut req);
    }
    if let Some(ms) = path.strip_prefix("/delay/").and_then(|s| s.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    // `x-echo-delay-ms: MS` delays any path (a route matched on the path can be slow).
    if let Some(ms) = req.headers().get(DELAY_HEADER).and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = path
        .strip_prefix("/status/")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or(StatusCode::OK);
    let method = req.method().clone();
    let target = req.uri().to_string();
    let path_and_query = req.uri().path_and_query().map(|pq| pq.as_str().to_owned()).unwrap_or_else(|| path.clone());
    let mut headers = serde_json::Map::new();
    for key in req.headers().keys() {
        let joined = req
            .headers()
            .get_all(key)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(",");
        headers.insert(key.as_str().to_owned(), joined.into());
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let (content_type, out) = if method == http::Method::POST && path == "/echo" {
        ("application/octet-stream", body)
    } else {
        let json = serde_json::json!({
            "server": name,
            "method": method.as_str(),
            "path": path_and_query,
            "uri": target,
            "headers": headers,
            "body_len": body.len(),
        });
        ("application/json", Bytes::from(json.to_string()))
    };
    let mut resp = Response::new(Full::new(out));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut().insert(SERVER_HEADER, header_value(name));
    resp
}

/// Answers 101 and echoes raw bytes on the upgraded connection.
fn upgrade(name: &str, req: &mut Request<Incoming>) -> Response<Full<Bytes>> {
    let protocol =
        req.headers().get(http::header::UPGRADE).cloned().unwrap_or_else(|| HeaderValue::from_static("websocket"));
    let key = req.headers().get("sec-websocket-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut io = TokioIo::new(upgraded);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if io.write_all(&buf[..n]).await.is_err() || io.flush().await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(http::header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(http::header::UPGRADE, protocol);
    h.insert(SERVER_HEADER, header_value(name));
    if let Some(key) = key {
        h.insert("sec-websocket-accept", header_value(&ws::accept_key(&key)));
    }
    resp
}

pub(crate) fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}
