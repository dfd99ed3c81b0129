//! Clients that keep one connection open across configuration changes, so a test can
//! send the next request on the same connection: an HTTP/1.1 keep-alive connection, an
//! HTTP/2 connection (over any stream: plain TCP or TLS), unary gRPC calls and a long
//! bidirectional gRPC stream on it (the gRPC echo server's `/echo.Echo/*` methods), and a
//! ping over an open TCP connection. Every call returns `None` (or an empty echo) when
//! the peer ended the connection or the stream instead of answering.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::echo::{decode_message, encode_message};

/// The request body of a streaming gRPC call: frames sent as the test goes.
pub type FrameBody = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

/// A keep-alive HTTP/1.1 connection (plaintext) on which requests are sent one by one.
pub struct KeepAlive {
    reader: BufReader<tokio::net::TcpStream>,
}

/// One HTTP/1.1 response: status, whether it said `connection: close`, and the body.
#[derive(Debug)]
pub struct H1Reply {
    /// Status code.
    pub status: u16,
    /// The response carried `connection: close`.
    pub close: bool,
    /// The body (by `content-length`).
    pub body: String,
}

impl KeepAlive {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> std::io::Result<KeepAlive> {
        Ok(KeepAlive { reader: BufReader::new(tokio::net::TcpStream::connect(addr).await?) })
    }

    /// Sends `GET target` (an absolute URL through an explicit proxy, or a path) and reads
    /// the response; `None` when the connection was closed instead.
    pub async fn get(&mut self, target: &str, host: &str) -> Option<H1Reply> {
        let req = format!("GET {target} HTTP/1.1\r\nhost: {host}\r\n\r\n");
        self.reader.get_mut().write_all(req.as_bytes()).await.ok()?;
        let mut line = String::new();
        if self.reader.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let status = line.split(' ').nth(1)?.parse().ok()?;
        let (mut length, mut close) = (0usize, false);
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h).await.ok()?;
            let h = h.trim_end().to_ascii_lowercase();
            if h.is_empty() {
                break;
            }
            if let Some(v) = h.strip_prefix("content-length:") {
                length = v.trim().parse().ok()?;
            }
            if h.starts_with("connection:") && h.contains("close") {
                close = true;
            }
        }
        let mut body = vec![0u8; length];
        self.reader.read_exact(&mut body).await.ok()?;
        Some(H1Reply { status, close, body: String::from_utf8_lossy(&body).into_owned() })
    }

    /// True once the peer closed the connection (EOF or reset) within `within`.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(tokio::time::timeout(within, self.reader.read(&mut buf)).await, Ok(Ok(0)) | Ok(Err(_)))
    }
}

/// An HTTP/2 connection (prior knowledge) over `io`, driven in the background.
pub async fn h2<B, S>(io: S) -> anyhow::Result<SendRequest<B>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A GET of `url` on an open HTTP/2 connection: the status, or `None` when the stream or
/// the connection failed.
pub async fn h2_get(sender: &mut SendRequest<Full<Bytes>>, url: &str) -> Option<u16> {
    sender.ready().await.ok()?;
    let req = Request::get(url).body(Full::new(Bytes::new())).ok()?;
    let resp = sender.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Some(status)
}

/// A unary gRPC call (`/echo.Echo/Unary` at `authority`) on an open HTTP/2 connection
/// whose request bodies are [`Full`]: its `grpc-status` (headers or trailers).
pub async fn grpc_unary(sender: &mut SendRequest<Full<Bytes>>, authority: &str) -> Option<u32> {
    sender.ready().await.ok()?;
    let req = grpc_request(authority, "/echo.Echo/Unary", Full::new(encode_message(b"hi")))?;
    grpc_status(sender.send_request(req).await.ok()?).await
}

/// A unary gRPC call on a connection whose request bodies stream ([`FrameBody`], the
/// connection of a [`GrpcBidi`]): a new stream beside the long one.
pub async fn grpc_unary_streamed(sender: &mut SendRequest<FrameBody>, authority: &str) -> Option<u32> {
    sender.ready().await.ok()?;
    let (tx, rx) = mpsc::channel(1);
    tx.send(Ok(Frame::data(encode_message(b"hi")))).await.ok()?;
    drop(tx);
    let req = grpc_request(authority, "/echo.Echo/Unary", StreamBody::new(ReceiverStream::new(rx)))?;
    grpc_status(sender.send_request(req).await.ok()?).await
}

/// A long bidirectional gRPC call (`/echo.Echo/Stream`): send a message, read its echo.
pub struct GrpcBidi {
    tx: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
    body: Incoming,
    buf: BytesMut,
}

impl GrpcBidi {
    /// Opens an HTTP/2 connection over `io` and the stream on it; returns the stream and
    /// the connection (for more calls beside it).
    pub async fn open<S>(io: S, authority: &str) -> anyhow::Result<(GrpcBidi, SendRequest<FrameBody>)>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut sender = h2::<FrameBody, S>(io).await?;
        let (tx, rx) = mpsc::channel(4);
        let req = grpc_request(authority, "/echo.Echo/Stream", StreamBody::new(ReceiverStream::new(rx)))
            .ok_or_else(|| anyhow::anyhow!("bad authority {authority:?}"))?;
        let resp = sender.send_request(req).await?;
        anyhow::ensure!(resp.status() == 200, "gRPC stream answered {}", resp.status());
        Ok((GrpcBidi { tx, body: resp.into_body(), buf: BytesMut::new() }, sender))
    }

    /// Sends `msg` and waits for its echo; `None` once the stream ended.
    pub async fn echo(&mut self, msg: &'static [u8]) -> Option<Bytes> {
        self.tx.send(Ok(Frame::data(encode_message(msg)))).await.ok()?;
        loop {
            if let Some(m) = decode_message(&mut self.buf).ok()? {
                return Some(m);
            }
            let frame = self.body.frame().await?.ok()?;
            self.buf.extend_from_slice(&frame.into_data().ok()?);
        }
    }
}

/// Sends `ping` on an open TCP connection to an echo server; the echoed bytes, empty
/// once the connection is closed (or nothing came back within `within`).
pub async fn tcp_ping<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, within: Duration) -> Vec<u8> {
    if s.write_all(b"ping").await.is_err() {
        return Vec::new();
    }
    let mut buf = [0u8; 4];
    match tokio::time::timeout(within, s.read_exact(&mut buf)).await {
        Ok(Ok(_)) => buf.to_vec(),
        _ => Vec::new(),
    }
}

fn grpc_request<B>(authority: &str, path: &str, body: B) -> Option<Request<B>> {
    Request::post(format!("https://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .ok()
}

async fn grpc_status(resp: http::Response<Incoming>) -> Option<u32> {
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.ok()?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let status = trailers.get("grpc-status").or_else(|| parts.headers.get("grpc-status"))?;
    status.to_str().ok()?.parse().ok()
}
