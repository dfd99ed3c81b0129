//! The HTTP/1.1 upstream client against raw loopback servers: each test scripts the bytes
//! the upstream answers, so odd framings can be served, and counts the connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;

use super::endpoint;
use crate::cluster::{BoxBody, PoolConfig, Pools, UpstreamBody, UpstreamProtocol};
use crate::error::ErrorKind;

const TIMEOUT: Duration = Duration::from_secs(5);

/// What the scripted upstream does with one request.
struct Reply {
    bytes: Vec<u8>,
    /// Close the connection after writing.
    close: bool,
}

fn reply(bytes: &[u8]) -> Reply {
    Reply { bytes: bytes.to_vec(), close: false }
}

fn reply_close(bytes: &[u8]) -> Reply {
    Reply { bytes: bytes.to_vec(), close: true }
}

/// A loopback upstream answering request `n` (counted over all connections) with
/// `script(n)`; it keeps the bytes of every request it read and counts connections.
struct Raw {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Notified each time the server closed a connection.
    closed: Arc<Notify>,
}

impl Raw {
    async fn start(script: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Raw {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(Notify::new());
        let script = Arc::new(script);
        let (count, seen, done) = (Arc::clone(&accepted), Arc::clone(&requests), Arc::clone(&closed));
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                count.fetch_add(1, Ordering::SeqCst);
                let (script, seen, done) = (Arc::clone(&script), Arc::clone(&seen), Arc::clone(&done));
                tokio::spawn(async move {
                    while let Some(req) = read_request(&mut stream).await {
                        let n = {
                            let mut all = seen.lock().unwrap();
                            all.push(req);
                            all.len() - 1
                        };
                        let r = script(n);
                        if stream.write_all(&r.bytes).await.is_err() || r.close {
                            break;
                        }
                    }
                    drop(stream);
                    done.notify_one();
                });
            }
        });
        Raw { addr, accepted, requests, closed }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn request(&self, n: usize) -> String {
        String::from_utf8_lossy(&self.requests.lock().unwrap()[n]).into_owned()
    }
}

/// Reads one request: its head, then a content-length body or a chunked one (up to its
/// last chunk and trailers). None at end of stream.
async fn read_request(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let wanted = |buf: &[u8]| {
        if head.contains("transfer-encoding: chunked") {
            // Ends with the last chunk and an empty trailer section (or trailers).
            find(&buf[head_end..], b"0\r\n").is_some() && buf.ends_with(b"\r\n\r\n") && buf.len() > head_end + 4
        } else {
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            buf.len() >= head_end + len
        }
    };
    // A request whose head says "early" is answered before its body.
    while !head.contains("x-answer: early") && !wanted(&buf) {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(buf)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn boxed<B>(b: B) -> BoxBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    b.map_err(Into::into).boxed_unsync()
}

fn request(method: Method, path: &str, body: BoxBody) -> Request<BoxBody> {
    Request::builder().method(method).uri(path).header("host", "app").body(body).unwrap()
}

fn get(path: &str) -> Request<BoxBody> {
    request(Method::GET, path, boxed(Empty::<Bytes>::new()))
}

async fn send(pools: &Pools, raw: &Raw, req: Request<BoxBody>) -> http::Response<UpstreamBody> {
    tokio::time::timeout(TIMEOUT, pools.send(&endpoint(raw.addr), UpstreamProtocol::Http1, TIMEOUT, req))
        .await
        .expect("no response in time")
        .unwrap()
}

async fn send_err(pools: &Pools, raw: &Raw, req: Request<BoxBody>) -> crate::error::ProxyError {
    tokio::time::timeout(TIMEOUT, pools.send(&endpoint(raw.addr), UpstreamProtocol::Http1, TIMEOUT, req))
        .await
        .expect("no answer in time")
        .unwrap_err()
}

async fn text(resp: http::Response<UpstreamBody>) -> String {
    let bytes = tokio::time::timeout(TIMEOUT, resp.into_body().collect()).await.unwrap().unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn chunked_response_with_extensions_and_trailers_is_decoded_and_its_connection_reused() {
    let raw = Raw::start(|_| {
        reply(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\n\r\n")
    })
    .await;
    let pools = Pools::new(PoolConfig::default());
    for _ in 0..2 {
        let resp = send(&pools, &raw, get("/")).await;
        assert!(!resp.body().is_end_stream());
        let collected = resp.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().and_then(|t| t.get("x-sum")).unwrap(), "42");
        assert_eq!(collected.to_bytes(), "hello world");
    }
    assert_eq!(raw.accepted(), 1, "the connection is reused once the chunked body ended");
}

#[tokio::test]
async fn bad_chunk_syntax_fails_the_body_not_the_proxy() {
    let raw =
        Raw::start(|_| reply(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")).await;
    let pools = Pools::new(PoolConfig::default());
    let resp = send(&pools, &raw, get("/")).await;
    let err = resp.into_body().collect().await.unwrap_err();
    assert!(err.to_string().contains("chunk size"), "{err}");
}

#[tokio::test]
async fn content_length_body_has_an_exact_size_and_its_connection_is_reused() {
    let raw = Raw::start(|n| {
        if n == 0 {
            // The head first, the body later: the body is read from the connection.
            Reply { bytes: b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world".to_vec(), close: false }
        } else {
            reply(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nagain")
        }
    })
    .await;
    let pools = Pools::new(PoolConfig::default());
    let resp = send(&pools, &raw, get("/a")).await;
    assert_eq!(resp.body().size_hint().exact(), Some(11));
    assert_eq!(text(resp).await, "hello world");
    let resp = send(&pools, &raw, get("/b")).await;
    assert_eq!(text(resp).await, "again");
    assert_eq!(raw.accepted(), 1);
    assert_eq!(pools.stats().endpoints[0].http1_pooled, 1);
}

#[tokio::test]
async fn differing_content_lengths_are_an_upstream_protocol_error() {
    let raw = Raw::start(|_| reply(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello")).await;
    let pools = Pools::new(PoolConfig::default());
    let err = send_err(&pools, &raw, get("/")).await;
    assert_eq!(err.kind(), ErrorKind::UpstreamProtocol, "{err}");
}

#[tokio::test]
async fn a_body_without_length_is_read_until_close_and_its_connection_not_reused() {
    let raw = Raw::start(|_| reply_close(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")).await;
    let pools = Pools::new(PoolConfig::default());
    for _ in 0..2 {
        let resp = send(&pools, &raw, get("/")).await;
        assert!(resp.body().size_hint().exact().is_none());
        assert_eq!(text(resp).await, "until the end");
    }
    assert_eq!(raw.accepted(), 2);
}

#[tokio::test]
async fn a_response_to_head_has_no_body_whatever_its_content_length() {
    let raw = Raw::start(|_| reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n")).await;
    let pools = Pools::new(PoolConfig::default());
    for _ in 0..2 {
        let resp = send(&pools, &raw, request(Method::HEAD, "/", boxed(Empty::<Bytes>::new()))).await;
        assert_eq!(resp.headers()["content-length"], "1234");
        assert!(resp.body().is_end_stream());
        assert_eq!(text(resp).await, "");
    }
    assert_eq!(raw.accepted(), 1, "nothing was expected after the head: the connection is reused");
}

#[tokio::test]
async fn no_content_and_not_modified_have_no_body() {
    let raw = Raw::start(|n| {
        if n == 0 {
            reply(b"HTTP/1.1 204 No Content\r\n\r\n")
        } else {
            reply(b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n")
        }
    })
    .await;
    let pools = Pools::new(PoolConfig::default());
    let resp = send(&pools, &raw, get("/")).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(resp.body().is_end_stream());
    let resp = send(&pools, &raw, get("/")).await;
    assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);
    assert!(resp.body().is_end_stream());
    assert_eq!(raw.accepted(), 1);
}

#[tokio::test]
async fn interim_responses_are_skipped() {
    let raw = Raw::start(|_| {
        reply(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    })
    .await;
    let pools = Pools::new(PoolConfig::default());
    let resp = send(&pools, &raw, get("/")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("link").is_none());
    assert_eq!(text(resp).await, "ok");
}

#[tokio::test]
async fn a_malformed_head_is_an_upstream_protocol_error() {
    let raw = Raw::start(|_| reply(b"HTTP/1.1 2x0 OK\r\n\r\n")).await;
    let pools = Pools::new(PoolConfig::default());
    let err = send_err(&pools, &raw, get("/")).await;
    assert_eq!(err.kind(), ErrorKind::UpstreamProtocol, "{err}");
}

#[tokio::test]
async fn an_oversized_head_is_an_upstream_protocol_error() {
    let raw = Raw::start(|_| {
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..90 {
            head.extend_from_slice(format!("x-big-{i}: {}\r\n", "v".repeat(8000)).as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        reply(&head)
    })
    .await;
    let pools = Pools::new(PoolConfig::default());
    let err = send_err(&pools, &raw, get("/")).await;
    assert_eq!(err.kind(), ErrorKind::UpstreamProtocol, "{err}");
    assert!(err.detail().contains("too large"), "{err}");
}

#[tokio::test]
async fn connections_are_not_reused_after_close_or_http10_without_keep_alive() {
    let raw = Raw::start(|n| match n {
        0 => reply(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\na"),
        1 => reply(b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\nb"),
        2 => reply(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\nc"),
        _ => reply(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\nd"),
    })
    .await;
    let pools = Pools::new(PoolConfig::default());
    let mut got = String::new();
    for _ in 0..4 {
        got += &text(send(&pools, &raw, get("/")).await).await;
    }
    assert_eq!(got, "abcd");
    // close, then HTTP/1.0 without keep-alive: each a new connection; HTTP/1.0 with
    // keep-alive is reused, the next request going as HTTP/1.0 with keep-alive.
    assert_eq!(raw.accepted(), 3);
    assert!(raw.request(3).starts_with("GET / HTTP/1.0\r\n"), "{}", raw.request(3));
    assert!(raw.request(3).to_ascii_lowercase().contains("connection: keep-alive"), "{}", raw.request(3));
}

#[tokio::test]
async fn a_request_saying_connection_close_does_not_leave_its_connection_pooled() {
    let raw = Raw::start(|_| reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na")).await;
    let pools = Pools::new(PoolConfig::default());
    let mut req = get("/");
    req.headers_mut().insert("connection", "close".parse().unwrap());
    text(send(&pools, &raw, req).await).await;
    text(send(&pools, &raw, get("/")).await).await;
    assert_eq!(raw.accepted(), 2);
}

#[tokio::test]
async fn a_body_dropped_before_its_end_closes_the_connection() {
    let raw = Raw::start(|n| {
        if n == 0 {
            reply(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        } else {
            reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        }
    })
    .await;
    let pools = Pools::new(PoolConfig::default());
    let resp = send(&pools, &raw, get("/")).await;
    drop(resp);
    assert_eq!(pools.stats().endpoints[0].http1_open, 0, "closed when its body was dropped");
    assert_eq!(text(send(&pools, &raw, get("/")).await).await, "ok");
    assert_eq!(raw.accepted(), 2);
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_while_idle_is_replaced_without_error() {
    let raw = Raw::start(|n| {
        if n == 0 {
            // Keep-alive by its head, but closed right after.
            reply_close(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst")
        } else {
            reply(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond")
        }
    })
    .await;
    let pools = Pools::new(PoolConfig::default());
    let closed = raw.closed.notified();
    assert_eq!(text(send(&pools, &raw, get("/")).await).await, "first");
    closed.await;
    assert_eq!(pools.stats().endpoints[0].http1_pooled, 1, "pooled: its head asked for nothing else");
    assert_eq!(text(send(&pools, &raw, get("/")).await).await, "second");
    assert_eq!(raw.accepted(), 2);
}

#[tokio::test]
async fn a_request_body_at_hand_goes_with_its_head_and_a_streamed_one_chunked_with_its_trailers() {
    let raw = Raw::start(|_| reply(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")).await;
    let pools = Pools::new(PoolConfig::default());
    let resp = send(&pools, &raw, request(Method::POST, "/known?q=1", boxed(Full::new(Bytes::from("hello"))))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(raw.request(0), "POST /known?q=1 HTTP/1.1\r\nhost: app\r\ncontent-length: 5\r\n\r\nhello");

    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    let mut req = request(Method::POST, "/stream", boxed(StreamBody::new(ReceiverStream::new(rx))));
    req.headers_mut().insert("trailer", "x-sum".parse().unwrap());
    let sending = tokio::spawn({
        let pools = pools.clone();
        let ep = endpoint(raw.addr);
        async move { pools.send(&ep, UpstreamProtocol::Http1, TIMEOUT, req).await.map(|r| r.status()) }
    });
    tx.send(Ok(Frame::data(Bytes::from("ab")))).await.unwrap();
    tx.send(Ok(Frame::data(Bytes::from("cde")))).await.unwrap();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-sum", "5".parse().unwrap());
    trailers.insert("x-hidden", "not announced".parse().unwrap());
    tx.send(Ok(Frame::trailers(trailers))).await.unwrap();
    drop(tx);
    assert_eq!(tokio::time::timeout(TIMEOUT, sending).await.unwrap().unwrap().unwrap(), StatusCode::OK);
    assert_eq!(
        raw.request(1),
        "POST /stream HTTP/1.1\r\nhost: app\r\ntrailer: x-sum\r\ntransfer-encoding: chunked\r\n\r\n\
         2\r\nab\r\n3\r\ncde\r\n0\r\nx-sum: 5\r\n\r\n"
    );
    assert_eq!(raw.accepted(), 1);
}

#[tokio::test]
async fn an_early_final_response_stops_the_unfinished_request_body_and_closes_the_connection() {
    let raw = Raw::start(|n| {
        if n == 0 {
            reply(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig")
        } else {
            reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        }
    })
    .await;
    let pools = Pools::new(PoolConfig::default());
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    tx.send(Ok(Frame::data(Bytes::from("part of it")))).await.unwrap();
    let mut req = request(Method::PUT, "/upload", boxed(StreamBody::new(ReceiverStream::new(rx))));
    req.headers_mut().insert("x-answer", "early".parse().unwrap());
    // The body never ends while the response is awaited.
    let resp = send(&pools, &raw, req).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(text(resp).await, "big");
    drop(tx);
    assert_eq!(text(send(&pools, &raw, get("/")).await).await, "ok");
    assert_eq!(raw.accepted(), 2, "the connection with a request body cut short is not reused");
}

#[tokio::test]
async fn a_request_body_goes_on_being_written_while_an_early_response_streams() {
    // The upstream answers at once, then reads the whole request body and ends its
    // response with the length it read: it finishes only if the body keeps coming.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        while find(&buf, b"\r\n\r\n").is_none() {
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        stream.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nack\r\n").await.unwrap();
        while !buf.ends_with(b"0\r\n\r\n") {
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the request body stopped");
            buf.extend_from_slice(&chunk[..n]);
        }
        let read = String::from_utf8_lossy(&buf).into_owned();
        let tail = if read.contains("hello") && read.contains(" world") { "both" } else { "part" };
        stream.write_all(format!("4\r\n{tail}\r\n0\r\n\r\n").as_bytes()).await.unwrap();
    });
    let pools = Pools::new(PoolConfig::default());
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    tx.send(Ok(Frame::data(Bytes::from("hello")))).await.unwrap();
    let req = request(Method::POST, "/bidi", boxed(StreamBody::new(ReceiverStream::new(rx))));
    let resp = tokio::time::timeout(TIMEOUT, pools.send(&endpoint(addr), UpstreamProtocol::Http1, TIMEOUT, req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let reading = tokio::spawn(async move { resp.into_body().collect().await.map(|c| c.to_bytes()) });
    tx.send(Ok(Frame::data(Bytes::from(" world")))).await.unwrap();
    drop(tx);
    let got = tokio::time::timeout(TIMEOUT, reading).await.expect("the response never ended").unwrap().unwrap();
    assert_eq!(got, "ackboth");
}
