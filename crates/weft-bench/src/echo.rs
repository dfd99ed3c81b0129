//! The benchmark's application: an HTTP/1.1 and h2c server answering every request with a
//! 1 KiB body (`text/plain`), and every gRPC call (`content-type: application/grpc*`) with
//! one 1 KiB message and `grpc-status: 0` in the trailers. Counts what it served.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Size of every response body (and of every gRPC response message).
pub const BODY_LEN: usize = 1024;

type EchoBody = BoxBody<Bytes, Infallible>;

/// Serves `listener` until the process ends; `served` counts answered requests.
pub async fn serve(listener: TcpListener, served: Arc<AtomicU64>) {
    let body = Bytes::from(vec![b'x'; BODY_LEN]);
    let mut frame = BytesMut::with_capacity(5 + BODY_LEN);
    frame.put_u8(0);
    frame.put_u32(BODY_LEN as u32);
    frame.put_slice(&body);
    let grpc_frame = frame.freeze();
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let (body, grpc_frame, served) = (body.clone(), grpc_frame.clone(), served.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, body.clone(), grpc_frame.clone(), served.clone()));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    body: Bytes,
    grpc_frame: Bytes,
    served: Arc<AtomicU64>,
) -> Result<Response<EchoBody>, Infallible> {
    let grpc =
        req.headers().get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // Read the whole request first, as an application would.
    let _ = req.into_body().collect().await;
    served.fetch_add(1, Ordering::Relaxed);
    let response = if grpc {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frames = futures::stream::iter([Ok(Frame::data(grpc_frame)), Ok(Frame::trailers(trailers))]);
        Response::builder().header("content-type", "application/grpc").body(StreamBody::new(frames).boxed())
    } else {
        Response::builder().header("content-type", "text/plain").body(Full::new(body).boxed())
    };
    Ok(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed())))
}

/// `weft-bench echo`: binds two ports on loopback (one for HTTP/1.1, one for gRPC; both
/// serve either protocol), prints `echo h1=ADDR grpc=ADDR` and serves until killed.
pub async fn run() -> anyhow::Result<()> {
    let h1 = TcpListener::bind("127.0.0.1:0").await?;
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let (a, b): (SocketAddr, SocketAddr) = (h1.local_addr()?, grpc.local_addr()?);
    println!("echo h1={a} grpc={b}");
    let served = Arc::new(AtomicU64::new(0));
    tokio::spawn(serve(grpc, served.clone()));
    serve(h1, served).await;
    Ok(())
}
