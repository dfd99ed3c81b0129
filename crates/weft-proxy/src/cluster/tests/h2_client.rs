//! The upstream HTTP/2 client against a bare h2 server: streams that flow both ways,
//! request trailers, and resets when the proxy gives up on a stream.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, StreamBody};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use super::endpoint;
use crate::cluster::{BoxBody, PoolConfig, Pools, UpstreamProtocol};

const TIMEOUT: Duration = Duration::from_secs(5);

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Chunks = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

/// An h2 server on loopback running `handle` for each stream it accepts.
async fn serve<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(Request<h2::RecvStream>, h2::server::SendResponse<Bytes>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let Ok(mut conn) = h2::server::handshake(stream).await else { continue };
            while let Some(Ok((req, respond))) = conn.accept().await {
                tokio::spawn(handle(req, respond));
            }
        }
    });
    addr
}

/// A request whose body is whatever is sent into the returned channel, until it is dropped.
fn streaming(method: Method) -> (Request<BoxBody>, Chunks) {
    let (tx, rx) = mpsc::channel(4);
    let body = StreamBody::new(ReceiverStream::new(rx)).boxed_unsync();
    let req = Request::builder().method(method).uri("/s").header(http::header::HOST, "a").body(body).unwrap();
    (req, tx)
}

async fn next_frame(body: &mut (impl Body<Data = Bytes, Error = BoxError> + Unpin)) -> Option<Frame<Bytes>> {
    tokio::time::timeout(TIMEOUT, body.frame()).await.expect("a frame in time").map(|f| f.expect("a good frame"))
}

async fn reset_seen(rx: oneshot::Receiver<h2::Reason>) -> h2::Reason {
    tokio::time::timeout(TIMEOUT, rx).await.expect("the upstream saw a reset in time").unwrap()
}

#[tokio::test]
async fn a_stream_flows_both_ways_after_the_response_head_and_request_trailers_reach_the_upstream() {
    // Echoes each request data frame as it comes, then the request's trailer as its own.
    let addr = serve(|req, mut respond| async move {
        let mut body = req.into_body();
        let mut send = respond.send_response(Response::new(()), false).unwrap();
        while let Some(Ok(chunk)) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.len());
            send.send_data(chunk, false).unwrap();
        }
        let trailers = body.trailers().await.ok().flatten().unwrap_or_default();
        let mut echo = HeaderMap::new();
        let seen = trailers.get("x-req-trailer").cloned().unwrap_or(HeaderValue::from_static("missing"));
        echo.insert("x-echo-trailer", seen);
        send.send_trailers(echo).unwrap();
    })
    .await;
    let pools = Pools::new(PoolConfig::default());
    let (req, chunks) = streaming(Method::POST);
    // The head comes back while the request body has not even started.
    let resp = tokio::time::timeout(TIMEOUT, pools.send(&endpoint(addr), UpstreamProtocol::Http2, TIMEOUT, req))
        .await
        .expect("the response head before the request body ends")
        .unwrap();
    let mut body = resp.into_body();
    for word in ["one", "two"] {
        chunks.send(Ok(Frame::data(Bytes::from(word)))).await.unwrap();
        let frame = next_frame(&mut body).await.expect("an echoed chunk");
        assert_eq!(frame.into_data().unwrap(), word);
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("x-req-trailer", HeaderValue::from_static("yes"));
    chunks.send(Ok(Frame::trailers(trailers))).await.unwrap();
    drop(chunks);
    let frame = next_frame(&mut body).await.expect("the response trailers");
    assert_eq!(frame.into_trailers().unwrap().get("x-echo-trailer").unwrap(), "yes");
    assert!(next_frame(&mut body).await.is_none());
}

#[tokio::test]
async fn a_response_body_dropped_early_resets_the_upstream_stream() {
    let (seen_tx, seen_rx) = oneshot::channel();
    let seen_tx = Arc::new(std::sync::Mutex::new(Some(seen_tx)));
    let addr = serve(move |_req, mut respond| {
        let seen_tx = Arc::clone(&seen_tx);
        async move {
            let head = Response::builder().header("content-length", "100").body(()).unwrap();
            let mut send = respond.send_response(head, false).unwrap();
            send.send_data(Bytes::from_static(b"partial"), false).unwrap();
            let reason = poll_fn(|cx| send.poll_reset(cx)).await.unwrap();
            if let Some(tx) = seen_tx.lock().unwrap().take() {
                let _ = tx.send(reason);
            }
        }
    })
    .await;
    let pools = Pools::new(PoolConfig::default());
    let get = Request::builder().uri("/big").header(http::header::HOST, "a").body(crate::http::body::full("")).unwrap();
    let resp = pools.send(&endpoint(addr), UpstreamProtocol::Http2, TIMEOUT, get).await.unwrap();
    let mut body = resp.into_body();
    assert_eq!(body.size_hint().exact(), Some(100), "the length the upstream announced");
    let frame = next_frame(&mut body).await.expect("the first chunk");
    assert_eq!(frame.into_data().unwrap(), "partial");
    drop(body);
    assert_eq!(reset_seen(seen_rx).await, h2::Reason::CANCEL);
}

#[tokio::test]
async fn a_request_given_up_before_its_response_resets_the_stream_its_body_still_flows_on() {
    // Never answers; reports how the stream ended.
    let (seen_tx, seen_rx) = oneshot::channel();
    let seen_tx = Arc::new(std::sync::Mutex::new(Some(seen_tx)));
    let addr = serve(move |_req, mut respond| {
        let seen_tx = Arc::clone(&seen_tx);
        async move {
            let reason = poll_fn(|cx| respond.poll_reset(cx)).await.unwrap();
            if let Some(tx) = seen_tx.lock().unwrap().take() {
                let _ = tx.send(reason);
            }
        }
    })
    .await;
    let pools = Pools::new(PoolConfig::default());
    let (req, chunks) = streaming(Method::POST);
    chunks.send(Ok(Frame::data(Bytes::from_static(b"first")))).await.unwrap();
    let ep = endpoint(addr);
    let send = pools.send(&ep, UpstreamProtocol::Http2, TIMEOUT, req);
    // The proxy's per-try timeout, say.
    assert!(tokio::time::timeout(Duration::from_millis(200), send).await.is_err());
    assert_eq!(reset_seen(seen_rx).await, h2::Reason::CANCEL);
    drop(chunks);
}

#[tokio::test]
async fn a_request_body_that_fails_resets_the_upstream_stream() {
    // Answers at once, then reports how the request body ended.
    let (seen_tx, seen_rx) = oneshot::channel();
    let seen_tx = Arc::new(std::sync::Mutex::new(Some(seen_tx)));
    let addr = serve(move |req, mut respond| {
        let seen_tx = Arc::clone(&seen_tx);
        async move {
            let _send = respond.send_response(Response::new(()), false).unwrap();
            let mut body = req.into_body();
            let mut ended = None;
            while let Some(chunk) = body.data().await {
                if let Err(e) = chunk {
                    ended = e.reason();
                    break;
                }
            }
            if let Some(tx) = seen_tx.lock().unwrap().take() {
                let _ = tx.send(ended.unwrap_or(h2::Reason::NO_ERROR));
            }
        }
    })
    .await;
    let pools = Pools::new(PoolConfig::default());
    let (req, chunks) = streaming(Method::POST);
    let resp = pools.send(&endpoint(addr), UpstreamProtocol::Http2, TIMEOUT, req).await.unwrap();
    chunks.send(Ok(Frame::data(Bytes::from_static(b"part")))).await.unwrap();
    chunks.send(Err("the downstream went away".into())).await.unwrap();
    // Not a clean end: the upstream must not take the truncated body as complete.
    assert_eq!(reset_seen(seen_rx).await, h2::Reason::INTERNAL_ERROR);
    drop(resp);
}

#[tokio::test]
async fn an_idle_connection_is_closed_once_the_pool_lets_go_of_it() {
    let addr = serve(|_req, mut respond| async move {
        let _ = respond.send_response(Response::new(()), true);
    })
    .await;
    let cfg = PoolConfig {
        idle_timeout: Duration::from_millis(100),
        reap_interval: Duration::from_millis(20),
        ..PoolConfig::default()
    };
    let pools = Pools::new(cfg);
    let get = Request::builder().uri("/").header(http::header::HOST, "a").body(crate::http::body::full("")).unwrap();
    let resp = pools.send(&endpoint(addr), UpstreamProtocol::Http2, TIMEOUT, get).await.unwrap();
    assert!(resp.into_body().collect().await.is_ok());
    assert_eq!(pools.stats().endpoints[0].http2_open, 1);
    // The reaper drops the pool's handle; the connection's task must then end (h2 wakes
    // it when the last handle goes), and with it the open count.
    let closed = async {
        while pools.stats().endpoints.first().is_some_and(|e| e.http2_open > 0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(TIMEOUT, closed).await.expect("the idle connection closed");
}

/// The response body knows when it ended without asking h2 more than needed, and never
/// claims an end it has not seen: a body owed by its content-length is not at its end
/// until the last data arrived with the end of the stream; a response to HEAD, whose
/// content-length promises nothing, is at its end as soon as its headers ended the stream.
#[tokio::test]
async fn the_response_body_reports_its_end_as_the_stream_ends() {
    let addr = serve(|req, mut respond| async move {
        let head = req.method() == Method::HEAD;
        let resp = Response::builder().header(http::header::CONTENT_LENGTH, "5").body(()).unwrap();
        let mut send = respond.send_response(resp, head).unwrap();
        if !head {
            send.send_data(Bytes::from_static(b"hello"), true).unwrap();
        }
    })
    .await;
    let pools = Pools::new(PoolConfig::default());
    let request = |method: Method| {
        let body = http_body_util::Empty::<Bytes>::new().map_err(|never| match never {}).boxed_unsync();
        Request::builder().method(method).uri("/").header(http::header::HOST, "a").body(body).unwrap()
    };
    let head = pools.send(&endpoint(addr), UpstreamProtocol::Http2, TIMEOUT, request(Method::HEAD)).await.unwrap();
    let mut body = head.into_body();
    // The headers carried the end of the stream; h2 may take a moment to have it read.
    tokio::time::timeout(TIMEOUT, async {
        while !body.is_end_stream() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("a response to HEAD ends with its headers");
    assert!(next_frame(&mut body).await.is_none());

    let get = pools.send(&endpoint(addr), UpstreamProtocol::Http2, TIMEOUT, request(Method::GET)).await.unwrap();
    let mut body = get.into_body();
    let data = next_frame(&mut body).await.expect("the data").into_data().unwrap();
    assert_eq!(&data[..], b"hello");
    // The data came with the end of the stream: over once all of it was passed on.
    assert!(body.is_end_stream());
    assert!(next_frame(&mut body).await.is_none());
    assert!(body.is_end_stream());
}
