//! `GET /api/v1/tap?target=deploy/NAME|svc/NAME&namespace=..&path=..&method=..&authority=..&status=..&direction=..&max_rps=..`:
//! newline-delimited JSON, one object per request (`{"event":{..}}`), a
//! `{"dropped":N,"total_dropped":M}` line each second something was dropped (over
//! `max_rps`, or queues full), first a `{"tap":{"proxies":[..]}}` line naming the
//! proxies tapped. And `GET /dashboard/tap`, the page that shows it.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{Either, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_api::Spec;
use weft_xds::tap::{TapEvent, TapFilter};

use super::TapSession;

/// Default and largest `max_rps`.
pub const DEFAULT_MAX_RPS: u32 = 100;
/// Largest `max_rps` accepted.
pub const MAX_MAX_RPS: u32 = 10_000;

/// The streamed body of a tap.
pub type TapBody = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;
/// What the API answers: a whole JSON body, or a tap stream.
pub type ApiBody = Either<Full<Bytes>, TapBody>;

/// The dashboard's tap page (no external resources).
const PAGE: &str = include_str!("dashboard.html");

/// A parsed tap request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapQuery {
    /// `deploy` or `svc`.
    pub kind: TargetKind,
    /// Workload or service name.
    pub name: String,
    /// Namespace (default `default`).
    pub namespace: String,
    /// What the proxies match.
    pub filter: TapFilter,
    /// Events per second relayed; more are dropped and counted.
    pub max_rps: u32,
}

/// What a tap targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// The proxies of a workload (a Deployment's pods).
    Deploy,
    /// The proxies of the workloads a Service selects.
    Service,
}

/// Answers the tap routes (`None`: not a tap route).
pub fn route(api: &crate::api::Api, method: &http::Method, path: &str, query: &str) -> Option<Response<ApiBody>> {
    match (method, path) {
        (&http::Method::GET, "/api/v1/tap") => Some(match parse(query) {
            Ok(q) => stream(api, q),
            Err(e) => error(StatusCode::BAD_REQUEST, &e),
        }),
        (&http::Method::GET, "/dashboard/tap") => {
            let mut r = Response::new(Either::Left(Full::new(Bytes::from_static(PAGE.as_bytes()))));
            r.headers_mut()
                .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/html; charset=utf-8"));
            Some(r)
        }
        _ => None,
    }
}

fn error(status: StatusCode, message: &str) -> Response<ApiBody> {
    let mut r = Response::new(Either::Left(Full::new(Bytes::from(json!({ "error": message }).to_string()))));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

/// Parses the query string of `GET /api/v1/tap`.
pub fn parse(query: &str) -> Result<TapQuery, String> {
    let mut target = None;
    let mut namespace = "default".to_string();
    let mut filter = TapFilter::default();
    let mut max_rps = DEFAULT_MAX_RPS;
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v = decode(v).ok_or_else(|| format!("parameter {k}: not valid percent-encoded UTF-8"))?;
        match k {
            "target" => target = Some(v),
            "namespace" if !v.is_empty() => namespace = v,
            "namespace" => {}
            "path" => filter.path_prefix = v,
            "method" => filter.method = v.to_ascii_uppercase(),
            "authority" => filter.authority = v,
            "status" if v.is_empty() => {}
            "status" => {
                filter.status = match v.parse::<u16>() {
                    Ok(s) if (100..=599).contains(&s) => u32::from(s),
                    _ => return Err(format!("status {v:?}: expected an HTTP status code (100-599)")),
                }
            }
            "direction" => {
                filter.direction = match v.as_str() {
                    "" => String::new(),
                    "in" | "inbound" => "inbound".into(),
                    "out" | "outbound" => "outbound".into(),
                    _ => return Err(format!("direction {v:?}: expected in or out")),
                }
            }
            "max_rps" => {
                max_rps = match v.parse::<u32>() {
                    Ok(n) if (1..=MAX_MAX_RPS).contains(&n) => n,
                    _ => return Err(format!("max_rps {v:?}: expected a number from 1 to {MAX_MAX_RPS}")),
                }
            }
            other => {
                return Err(format!(
                    "unknown parameter {other:?} (expected target, namespace, path, method, authority, status, direction, max_rps)"
                ))
            }
        }
    }
    let target = target.ok_or("target is required: deploy/NAME or svc/NAME")?;
    let (kind, name) = match target.split_once('/') {
        Some(("deploy" | "deployment" | "deployments" | "workload", n)) if !n.is_empty() => (TargetKind::Deploy, n),
        Some(("svc" | "service" | "services", n)) if !n.is_empty() => (TargetKind::Service, n),
        _ => return Err(format!("target {target:?}: expected deploy/NAME or svc/NAME")),
    };
    Ok(TapQuery { kind, name: name.to_string(), namespace, filter, max_rps })
}

/// Percent-decodes a query value (`+` is a space).
fn decode(v: &str) -> Option<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Node ids of the connected proxies `q` targets.
fn targets(api: &crate::api::Api, q: &TapQuery) -> Result<Vec<String>, String> {
    let selector = match q.kind {
        TargetKind::Deploy => None,
        TargetKind::Service => {
            let snap = api.store.snapshot();
            let svc = snap.resources.iter().find_map(|r| match &r.spec {
                Spec::Service(s) if r.meta.name == q.name && r.meta.namespace == q.namespace => {
                    Some(s.selector.clone())
                }
                _ => None,
            });
            match svc {
                Some(s) if !s.is_empty() => Some(s),
                Some(_) => return Err(format!("service {}/{} has no selector", q.namespace, q.name)),
                None => return Err(format!("no service {} in namespace {}", q.name, q.namespace)),
            }
        }
    };
    let mut ids = Vec::new();
    for c in api.server.connections() {
        let Some(node) = &c.node else { continue };
        if node.namespace != q.namespace {
            continue;
        }
        let hit = match &selector {
            None => node.workload() == q.name || node.labels.get("weft.dev/workload") == Some(&q.name),
            Some(sel) => sel.iter().all(|(k, v)| node.labels.get(k) == Some(v)),
        };
        if hit && !ids.contains(&c.node_id) {
            ids.push(c.node_id.clone());
        }
    }
    ids.sort();
    Ok(ids)
}

fn stream(api: &crate::api::Api, q: TapQuery) -> Response<ApiBody> {
    let nodes = match targets(api, &q) {
        Ok(n) => n,
        Err(e) => return error(StatusCode::NOT_FOUND, &e),
    };
    let target = format!("{}/{}", if q.kind == TargetKind::Deploy { "deploy" } else { "svc" }, q.name);
    let session = api.tap.start(&nodes, q.filter.clone());
    if session.proxies.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            &format!("no connected proxy of {target} in namespace {} has a tap stream open", q.namespace),
        );
    }
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(relay(session, tx, q.max_rps));
    let mut r = Response::new(Either::Right(StreamBody::new(ReceiverStream::new(rx))));
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-ndjson"));
    r.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    r
}

/// Copies the session's events to the response, at most `max_rps` a second; ends (and
/// so stops the tap on the proxies) when the client goes away.
async fn relay(mut session: TapSession, tx: mpsc::Sender<Result<Frame<Bytes>, Infallible>>, max_rps: u32) {
    let line = |v: Value| Ok(Frame::data(Bytes::from(format!("{v}\n"))));
    if tx.send(line(json!({"tap": {"proxies": session.proxies, "max_rps": max_rps}}))).await.is_err() {
        return;
    }
    let mut window = Instant::now();
    let mut sent_in_window = 0u32;
    let mut reported = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            ev = session.events.recv() => {
                let Some(ev) = ev else { return };
                if window.elapsed() >= Duration::from_secs(1) {
                    window = Instant::now();
                    sent_in_window = 0;
                }
                if sent_in_window >= max_rps {
                    session.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                sent_in_window += 1;
                if tx.send(line(json!({"event": event_json(&ev)}))).await.is_err() {
                    return;
                }
            }
            _ = tick.tick() => {
                let total = session.dropped.load(Ordering::Relaxed);
                if total > reported {
                    let v = json!({"dropped": total - reported, "total_dropped": total});
                    reported = total;
                    if tx.send(line(v)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// The JSON of one event.
pub fn event_json(ev: &TapEvent) -> Value {
    let peer = |p: &Option<weft_xds::tap::TapPeer>| match p {
        Some(p) => json!({"workload": p.workload, "namespace": p.namespace, "principal": p.principal}),
        None => Value::Null,
    };
    json!({
        "direction": ev.direction,
        "source": peer(&ev.source),
        "destination": peer(&ev.destination),
        "service": ev.service,
        "method": ev.method,
        "authority": ev.authority,
        "path": ev.path,
        "status": ev.status,
        "latency_ms": ev.latency_us as f64 / 1000.0,
        "flags": ev.flags,
        "tls": ev.mtls,
        "request_id": ev.request_id,
        "start_unix_ms": ev.start_unix_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_filters_and_defaults() {
        let q = parse("target=svc/reviews&path=%2Freviews&method=get&status=503&direction=in&max_rps=5").unwrap();
        assert_eq!(q.kind, TargetKind::Service);
        assert_eq!(q.name, "reviews");
        assert_eq!(q.namespace, "default");
        assert_eq!(q.filter.path_prefix, "/reviews");
        assert_eq!(q.filter.method, "GET");
        assert_eq!(q.filter.status, 503);
        assert_eq!(q.filter.direction, "inbound");
        assert_eq!(q.max_rps, 5);
        assert_eq!(parse("target=deploy/a").unwrap().max_rps, DEFAULT_MAX_RPS);
    }

    #[test]
    fn refuses_bad_input_precisely() {
        assert!(parse("").unwrap_err().contains("target is required"));
        assert!(parse("target=pod/x").unwrap_err().contains("deploy/NAME or svc/NAME"));
        assert!(parse("target=deploy/x&status=abc").unwrap_err().contains("status"));
        assert!(parse("target=deploy/x&direction=up").unwrap_err().contains("direction"));
        assert!(parse("target=deploy/x&max_rps=0").unwrap_err().contains("max_rps"));
        assert!(parse("target=deploy/x&headers=1").unwrap_err().contains("unknown parameter"));
        assert!(parse("target=deploy/x&path=%ZZ").unwrap_err().contains("percent"));
    }
}
