//! The proxy's admin server (port 15000, loopback only) and its metrics/health server
//! (port 15020), both plain HTTP/1.1 on hyper.
//!
//! Admin: `GET /config_dump`, `GET /clusters`, `GET /ready`, `POST /drain` (alias
//! `/drain_listeners`), `POST /quitquitquit`. Metrics: `GET /stats/prometheus`,
//! `GET /healthz/ready`. A known path with the wrong method answers 405 with `Allow`;
//! anything else 404.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::telemetry::metrics::TEXT_CONTENT_TYPE;
use crate::telemetry::Metrics;

/// How long in-flight admin requests may take to finish after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What the admin server needs from the running proxy.
pub trait AdminState: Send + Sync + 'static {
    /// The configuration in force, as JSON (Envoy's `/config_dump` shape where possible).
    fn config_dump(&self) -> serde_json::Value;
    /// Clusters and their endpoints, one per line.
    fn clusters(&self) -> String;
    /// True once the first configuration and certificate are in and not draining.
    fn is_ready(&self) -> bool;
    /// Starts draining listeners.
    fn drain(&self);
    /// Asks the process to exit.
    fn quit(&self);
}

/// Readiness probe of the metrics server.
pub type ReadyFn = Arc<dyn Fn() -> bool + Send + Sync>;

type Reply = Response<Full<Bytes>>;

/// Serves the admin endpoints on `listener` until `shutdown` completes.
pub async fn serve_admin(listener: TcpListener, state: Arc<dyn AdminState>, shutdown: impl Future<Output = ()>) {
    serve(listener, move |req| admin_reply(&*state, req), shutdown).await;
}

/// Serves `/stats/prometheus` and `/healthz/ready` on `listener` until `shutdown`
/// completes.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: ReadyFn,
    shutdown: impl Future<Output = ()>,
) {
    serve(listener, move |req| metrics_reply(&metrics, &*ready, req), shutdown).await;
}

fn admin_reply(state: &dyn AdminState, req: &Request<Incoming>) -> Reply {
    match (req.uri().path(), req.method()) {
        ("/config_dump", &Method::GET) => match serde_json::to_vec_pretty(&state.config_dump()) {
            Ok(body) => reply(StatusCode::OK, "application/json", body),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        ("/clusters", &Method::GET) => text(StatusCode::OK, state.clusters()),
        ("/ready", &Method::GET) => {
            if state.is_ready() {
                text(StatusCode::OK, "LIVE\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "NOT READY\n")
            }
        }
        ("/drain" | "/drain_listeners", &Method::POST) => {
            state.drain();
            text(StatusCode::OK, "OK\n")
        }
        ("/quitquitquit", &Method::POST) => {
            state.quit();
            text(StatusCode::OK, "OK\n")
        }
        ("/config_dump" | "/clusters" | "/ready", _) => method_not_allowed("GET"),
        ("/drain" | "/drain_listeners" | "/quitquitquit", _) => method_not_allowed("POST"),
        _ => not_found(),
    }
}

fn metrics_reply(metrics: &Metrics, ready: &(dyn Fn() -> bool + Send + Sync), req: &Request<Incoming>) -> Reply {
    match (req.uri().path(), req.method()) {
        ("/stats/prometheus", &Method::GET) => reply(StatusCode::OK, TEXT_CONTENT_TYPE, metrics.encode()),
        ("/healthz/ready", &Method::GET) => {
            if ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        ("/stats/prometheus" | "/healthz/ready", _) => method_not_allowed("GET"),
        _ => not_found(),
    }
}

/// Accepts connections until `shutdown`, answering each request with `handler`; then
/// lets in-flight connections finish for up to [`SHUTDOWN_GRACE`].
async fn serve<H>(listener: TcpListener, handler: H, shutdown: impl Future<Output = ()>)
where
    H: Fn(&Request<Incoming>) -> Reply + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Accept errors (e.g. EMFILE) are transient; back off briefly.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let resp = handler(&req);
            async move { Ok::<_, Infallible>(resp) }
        });
        let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::debug!("admin connections still open after grace period");
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    resp
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    reply(status, "text/plain; charset=utf-8", body)
}

fn method_not_allowed(allow: &'static str) -> Reply {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    resp.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static(allow));
    resp
}

fn not_found() -> Reply {
    text(StatusCode::NOT_FOUND, "not found\n")
}

#[cfg(test)]
mod tests;
