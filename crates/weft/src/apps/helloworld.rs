//! helloworld: Istio's `samples/helloworld` app. `GET /hello` answers
//! `Hello version: v1, instance: helloworld-v1-...` (the version from `--version` /
//! `SERVICE_VERSION`, the instance from `POD_NAME` / `HOSTNAME`); `GET /health` answers
//! `Helloworld is healthy`.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};

use super::response;

/// What `/hello` reports.
pub struct Helloworld {
    answer: String,
}

impl Helloworld {
    /// The app for `version` running as `instance`.
    pub fn new(version: &str, instance: &str) -> Helloworld {
        Helloworld { answer: format!("Hello version: {version}, instance: {instance}\n") }
    }
}

/// Answers one request.
pub async fn handle(hello: Arc<Helloworld>, req: Request<Incoming>, _peer: SocketAddr) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/hello" => response(StatusCode::OK, "text/html; charset=utf-8", hello.answer.clone()),
        "/health" => response(StatusCode::OK, "text/html; charset=utf-8", "Helloworld is healthy"),
        _ => response(StatusCode::NOT_FOUND, "text/html; charset=utf-8", "<h1>Not Found</h1>\n"),
    }
}
