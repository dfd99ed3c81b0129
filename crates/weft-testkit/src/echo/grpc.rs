//! gRPC echo over h2c with raw framing (1-byte compressed flag, 4-byte big-endian
//! length, message), so tests need neither protoc nor generated code.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use super::{bind_loopback, header_value, serve_http, Counters, SERVER_HEADER};

type FrameBody = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;
/// Server response body: `Left` ends with the headers (trailers-only), `Right` streams.
type ServerBody = Either<Empty<Bytes>, FrameBody>;

/// gRPC echo server (h2c) on `127.0.0.1:0`; stops when dropped.
///
/// - `/echo.Echo/Unary`: answers with the first request message;
/// - `/echo.Echo/Stream`: bidi, echoes each message as soon as it is complete;
/// - `/echo.Echo/Fail`: trailers-only response whose `grpc-status` is the request's
///   `x-grpc-status` header (2, UNKNOWN, when absent);
/// - any other path: trailers-only `grpc-status: 12` (UNIMPLEMENTED).
///
/// Successful calls end with trailers `grpc-status: 0` and `x-echo-trailer: <name>`;
/// response headers carry `x-echo-server: <name>`.
pub struct GrpcEchoServer {
    /// The bound address.
    pub addr: SocketAddr,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

/// What a gRPC call returned.
#[derive(Debug, Clone)]
pub struct GrpcReply {
    /// HTTP status of the response (200 for any gRPC answer).
    pub status: StatusCode,
    /// Response headers (for a trailers-only response they include `grpc-status`).
    pub headers: HeaderMap,
    /// Decoded response messages, in order.
    pub messages: Vec<Bytes>,
    /// Trailers (empty for a trailers-only response).
    pub trailers: HeaderMap,
}

/// An open bidirectional gRPC call: send messages and read replies one at a time.
pub struct GrpcStream {
    /// Response headers.
    pub headers: HeaderMap,
    tx: Option<mpsc::Sender<Result<Frame<Bytes>, Infallible>>>,
    body: Incoming,
    buf: BytesMut,
    trailers: Option<HeaderMap>,
    _conn: JoinHandle<()>,
}

impl GrpcEchoServer {
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
            async move { Ok::<_, Infallible>(handle(name, req)) }
        }));
        GrpcEchoServer { addr, counters, task }
    }

    /// Calls (streams) received so far.
    pub fn requests(&self) -> u64 {
        self.counters.requests.load(Ordering::SeqCst)
    }
}

impl Drop for GrpcEchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GrpcReply {
    /// `grpc-status` from the trailers, or from the headers of a trailers-only response.
    pub fn grpc_status(&self) -> Option<u32> {
        grpc_status(&self.trailers).or_else(|| grpc_status(&self.headers))
    }
}

impl GrpcStream {
    /// Opens a call on a new h2c connection to `target`.
    pub async fn open(target: SocketAddr, authority: &str, path: &str) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel(16);
        let body: FrameBody = StreamBody::new(ReceiverStream::new(rx));
        let (mut sender, conn) = h2c_handshake(target).await?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = grpc_request(authority, path, &[], body)?;
        let resp = sender.send_request(req).await.context("gRPC request")?;
        let (parts, body) = resp.into_parts();
        Ok(GrpcStream { headers: parts.headers, tx: Some(tx), body, buf: BytesMut::new(), trailers: None, _conn: conn })
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: Bytes) -> anyhow::Result<()> {
        let tx = self.tx.as_ref().context("send after close_send")?;
        tx.send(Ok(Frame::data(encode_message(&msg)))).await.map_err(|_| anyhow!("gRPC request stream closed"))
    }

    /// Half-closes the request stream (END_STREAM).
    pub fn close_send(&mut self) {
        self.tx = None;
    }

    /// Next response message, or `None` once the response ended (see [`Self::trailers`]).
    pub async fn recv(&mut self) -> anyhow::Result<Option<Bytes>> {
        loop {
            if let Some(msg) = decode_message(&mut self.buf)? {
                return Ok(Some(msg));
            }
            match self.body.frame().await {
                None => {
                    if !self.buf.is_empty() {
                        bail!("response ended inside a gRPC message");
                    }
                    return Ok(None);
                }
                Some(frame) => {
                    let frame = frame.context("reading gRPC response")?;
                    match frame.into_data() {
                        Ok(data) => self.buf.extend_from_slice(&data),
                        Err(frame) => {
                            if let Ok(t) = frame.into_trailers() {
                                self.trailers = Some(t);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Trailers, once [`Self::recv`] returned `None`.
    pub fn trailers(&self) -> Option<&HeaderMap> {
        self.trailers.as_ref()
    }
}

/// Calls `path` on `target` over h2c with `:authority` `authority`, sends `messages`,
/// half-closes, and collects the whole reply.
pub async fn grpc_call(
    target: SocketAddr,
    authority: &str,
    path: &str,
    messages: Vec<Bytes>,
) -> anyhow::Result<GrpcReply> {
    grpc_call_with_headers(target, authority, path, &[], messages).await
}

/// [`grpc_call`] with extra request headers (e.g. `x-grpc-status` for `/echo.Echo/Fail`).
pub async fn grpc_call_with_headers(
    target: SocketAddr,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
    messages: Vec<Bytes>,
) -> anyhow::Result<GrpcReply> {
    let mut payload = BytesMut::new();
    for m in &messages {
        payload.extend_from_slice(&encode_message(m));
    }
    let body = http_body_util::Full::new(payload.freeze());
    let (mut sender, conn) = h2c_handshake(target).await?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = grpc_request(authority, path, headers, body)?;
    let resp = sender.send_request(req).await.context("gRPC request")?;
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.context("reading gRPC response")?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let mut buf = BytesMut::from(&collected.to_bytes()[..]);
    let mut out = Vec::new();
    while let Some(m) = decode_message(&mut buf)? {
        out.push(m);
    }
    if !buf.is_empty() {
        bail!("{} trailing bytes after the last gRPC message", buf.len());
    }
    conn.abort();
    Ok(GrpcReply { status: parts.status, headers: parts.headers, messages: out, trailers })
}

/// Frames one message: flag 0 (uncompressed), big-endian length, bytes.
pub fn encode_message(msg: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + msg.len());
    out.put_u8(0);
    out.put_u32(msg.len() as u32);
    out.extend_from_slice(msg);
    out.freeze()
}

/// Takes one complete message off the front of `buf`, if there is one.
pub fn decode_message(buf: &mut BytesMut) -> anyhow::Result<Option<Bytes>> {
    if buf.len() < 5 {
        return Ok(None);
    }
    if buf[0] != 0 {
        bail!("compressed gRPC message (flag {}) is not supported", buf[0]);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return Ok(None);
    }
    buf.advance(5);
    Ok(Some(buf.split_to(len).freeze()))
}

fn grpc_status(h: &HeaderMap) -> Option<u32> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

async fn h2c_handshake<B>(
    target: SocketAddr,
) -> anyhow::Result<(
    hyper::client::conn::http2::SendRequest<B>,
    hyper::client::conn::http2::Connection<TokioIo<tokio::net::TcpStream>, B, TokioExecutor>,
)>
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(target).await.with_context(|| format!("connect {target}"))?;
    hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .with_context(|| format!("h2c handshake with {target}"))
}

fn grpc_request<B>(authority: &str, path: &str, headers: &[(&str, &str)], body: B) -> anyhow::Result<Request<B>> {
    let mut builder = Request::post(format!("http://{authority}{path}"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(body).context("building gRPC request")
}

fn handle(name: Arc<str>, req: Request<Incoming>) -> Response<ServerBody> {
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/echo.Echo/Unary" | "/echo.Echo/Stream" => {
            let (tx, rx) = mpsc::channel(16);
            let unary = path == "/echo.Echo/Unary";
            tokio::spawn(pump(name.clone(), req.into_body(), tx, unary));
            let mut resp = Response::new(Either::Right(StreamBody::new(ReceiverStream::new(rx))));
            let h = resp.headers_mut();
            h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert(SERVER_HEADER, header_value(&name));
            resp
        }
        "/echo.Echo/Fail" => {
            let code = req
                .headers()
                .get("x-grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse::<u32>().ok())
                .unwrap_or(2);
            trailers_only(&name, code, "failed on request")
        }
        _ => trailers_only(&name, 12, "unknown method"),
    }
}

/// Reads request messages and writes replies; ends with the OK trailers.
async fn pump(name: Arc<str>, mut body: Incoming, tx: mpsc::Sender<Result<Frame<Bytes>, Infallible>>, unary: bool) {
    let mut buf = BytesMut::new();
    let mut answered = false;
    'read: while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        loop {
            match decode_message(&mut buf) {
                Ok(Some(msg)) => {
                    if unary && answered {
                        continue;
                    }
                    answered = true;
                    if tx.send(Ok(Frame::data(encode_message(&msg)))).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(_) => break 'read,
            }
        }
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers.insert("x-echo-trailer", header_value(&name));
    let _ = tx.send(Ok(Frame::trailers(trailers))).await;
}

fn trailers_only(name: &str, code: u32, message: &'static str) -> Response<ServerBody> {
    let mut resp = Response::new(Either::Left(Empty::new()));
    let h = resp.headers_mut();
    h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code));
    h.insert("grpc-message", HeaderValue::from_static(message));
    h.insert(SERVER_HEADER, header_value(name));
    resp
}
