//! Forwarding to the upstream cluster: endpoint choice, per-try and route timeouts,
//! retries with Envoy's jittered backoff, request mirroring, and the hop-by-hop header
//! hygiene every proxy owes its peers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{Entry, HeaderName, HeaderValue, CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::uri::PathAndQuery;
use http::{HeaderMap, Request, Response, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;

use super::body::{boxed, downstream_body_error, full, CountingBody, DeadlineBody, DownstreamBody, Hold};
use super::RequestCtx;
use crate::cluster::pool::Upstream;
use crate::cluster::{BoxBody, Cluster, Discovery, Endpoint, Outcome, Slot, UpstreamProtocol};
use crate::config::ProxySnapshot;
use crate::conn::ConnInfo;
use crate::context::Context;
use crate::error::{ErrorKind, ProxyError};
use crate::hash::stable_hash;
use crate::io::BodyTally;
use crate::report::HttpReport;
use crate::route::{ForwardAction, HashPolicy, HashSource, RetryPolicy};

/// Header names the request path reads or writes on every request, parsed once.
pub(crate) use crate::route::X_FORWARDED_PROTO;
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const PROXY_AUTHORIZATION: HeaderName = HeaderName::from_static("proxy-authorization");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Request bodies up to this size are buffered so the request can be retried or
/// mirrored (Envoy buffers up to its connection buffer limit for the same reason).
const REPLAY_LIMIT: u64 = 64 * 1024;

/// A request body that can be sent more than once, or a stream that can be sent once.
enum ReqBody {
    Replay(Bytes),
    Stream(Option<BoxBody>),
}

/// Sends the request to `cluster_name` following the route's policy.
pub async fn forward(
    rq: &mut RequestCtx<'_>,
    action: &ForwardAction,
    cluster_name: &str,
    parts: &mut http::request::Parts,
    body: DownstreamBody,
) -> Result<Response<BoxBody>, ProxyError> {
    let (ctx, conn, stream_idle) = (rq.ctx, rq.conn, rq.chain.stream_idle_timeout);
    let (snap, report) = (&rq.snap, &mut rq.report);
    let cluster = snap
        .clusters
        .get(cluster_name)
        .cloned()
        .ok_or_else(|| ProxyError::new(ErrorKind::NoCluster, format!("unknown cluster {cluster_name}")))?;
    // Envoy's max_requests circuit breaker: active requests per cluster, across snapshots.
    let limits = cluster.config.limits;
    let Some(permit) = cluster.load().try_start(limits.max_requests) else {
        ctx.metrics.proxy().upstream_rq_pending_overflow(cluster_name);
        return Err(
            ProxyError::new(ErrorKind::Overflow, format!("cluster {cluster_name}: max_requests reached")).not_sent()
        );
    };
    let downstream_version = parts.version;
    // `x-forwarded-proto` was set before routing; only the filters and route edits that
    // can remove a header may have taken it away since.
    let xfp_may_be_gone =
        action.removes_x_forwarded_proto || !rq.chain.jwt.is_empty() || !rq.chain.local_ratelimit.is_empty();
    // No mesh metadata to clusters outside the mesh (Istio's `skip_external_clusters`).
    prepare_headers(&mut *parts, ctx, conn, report, cluster.config.in_mesh(), xfp_may_be_gone);

    // A request without a body (a GET, say) has nothing to count, read or fail: no tally
    // and no counting wrapper (two allocations fewer); its size is reported as 0 all the same.
    let tally = (!body.is_end_stream()).then(|| Arc::new(BodyTally::default()));
    report.request_body.clone_from(&tally);
    let policy = action.retry.as_ref().filter(|p| p.num_retries > 0 && p.request_is_retriable(&*parts));
    let wants_replay = policy.is_some() || !action.mirrors.is_empty();
    let mut body = match &tally {
        // Nothing to read: no collection, no buffer.
        None if wants_replay => ReqBody::Replay(Bytes::new()),
        None => ReqBody::Stream(Some(full(Bytes::new()))),
        Some(tally) if wants_replay && replayable(&body) => {
            // Boxed: most requests have no body to collect.
            let bytes = match Box::pin(body.collect()).await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    let kind = downstream_body_error(&*e);
                    tally.fail(kind);
                    return Err(ProxyError::new(kind, format!("reading request body: {e}")));
                }
            };
            tally.add(bytes.len() as u64);
            ReqBody::Replay(bytes)
        }
        // One box around both (the counting wrapper is generic over the body).
        Some(tally) => ReqBody::Stream(Some(boxed(CountingBody::new(body, tally.clone())))),
    };

    if let ReqBody::Replay(bytes) = &body {
        for m in &action.mirrors {
            if m.percent >= 100.0 || rand::random::<f64>() * 100.0 < m.percent {
                mirror(ctx, snap, &m.cluster, &*parts, bytes.clone());
            }
        }
    }

    let attempts = match (&body, policy) {
        (ReqBody::Replay(_), Some(p)) => 1 + p.num_retries,
        _ => 1,
    };
    // One clock reading starts the route deadline, the upstream service time and the
    // first attempt (its per-try deadline and latency); one more ends the attempt that
    // answers. Retries read the clock again for their own start.
    let upstream_start = Instant::now();
    let deadline = action.timeout.map(|t| upstream_start + t);
    let proto = match cluster.config.protocol {
        UpstreamProtocol::UseDownstream if downstream_version == Version::HTTP_2 => UpstreamProtocol::Http2,
        UpstreamProtocol::UseDownstream => UpstreamProtocol::Http1,
        p => p,
    };
    let (hash, set_cookies) = request_hash(&action.hash_policy, &*parts, conn);
    // The endpoints already tried, filled only when a retry is made (no allocation for
    // the first attempt).
    let mut tried = Vec::new();
    let mut attempt = 0;
    // The retry in progress, counted against the cluster's max_retries or retry budget
    // from its scheduling to the outcome of its attempt (as Envoy's resource manager).
    let mut retrying: Option<Slot> = None;
    let retry_slot = |retrying: &mut Option<Slot>| -> bool {
        *retrying = None;
        *retrying = cluster.load().try_retry(limits.max_retries, limits.retry_budget);
        if retrying.is_none() {
            ctx.metrics.proxy().upstream_rq_retry_overflow(cluster_name);
        }
        retrying.is_some()
    };
    loop {
        let last = attempt + 1 >= attempts;
        let ep = pick(&cluster, conn, &tried, hash)?;
        report.upstream_host = Some(ep.addr);
        let req_body = match &mut body {
            ReqBody::Replay(b) => full(b.clone()),
            ReqBody::Stream(s) => s.take().unwrap_or_else(|| full(Bytes::new())),
        };
        // The last attempt takes the headers; an attempt that may be retried sends a copy.
        let headers = if last { std::mem::take(&mut parts.headers) } else { parts.headers.clone() };
        let req = build_request(&*parts, headers, proto, req_body);
        let started = if attempt == 0 { upstream_start } else { Instant::now() };
        let per_try = policy.and_then(|p| p.per_try_timeout);
        let try_deadline = match (deadline, per_try) {
            (Some(d), Some(p)) => Some(d.min(started + p)),
            (Some(d), None) => Some(d),
            (None, Some(p)) => Some(started + p),
            (None, None) => None,
        };
        let inflight = ep.load.start_at(started);
        let upstream = Upstream {
            connect_timeout: cluster.config.connect_timeout,
            connector: cluster.config.connector_at(ep.socket_match),
            conn: cluster.config.conn,
            breaker: Some((cluster.load(), limits)),
            at: started,
        };
        let send = ctx.pools.send_to(&ep, proto, &upstream, req);
        let result = match try_deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), send).await {
                Ok(r) => r,
                Err(_) if deadline.map(|dl| Instant::now() >= dl).unwrap_or(false) => {
                    return Err(ProxyError::new(ErrorKind::Timeout, "upstream request timeout"));
                }
                Err(_) => Err(ProxyError::new(ErrorKind::PerTryTimeout, "per-try timeout")),
            },
            None => send.await,
        };
        // A send that failed because the downstream's body could not be read is the
        // client's failure: no outlier report, no retry, a 400 (DPE) or nothing (DC).
        let result = match (result, tally.as_ref().and_then(|t| t.failure())) {
            (Err(e), Some(kind)) => {
                drop(inflight);
                return Err(ProxyError::new(kind, format!("reading request body: {}", e.detail())));
            }
            (r, _) => r,
        };
        match &result {
            Ok((resp, _)) => cluster.report(&ep, Outcome::of_status(resp.status().as_u16())),
            Err(e) if e.kind() == ErrorKind::Overflow => {
                // The pool refused to queue it: the circuit breaker, not the endpoint.
                ctx.metrics.proxy().upstream_rq_pending_overflow(cluster_name);
                false
            }
            Err(e) => {
                if let Some(reason) = e.tls_reason() {
                    ctx.metrics.proxy().upstream_tls_failed(&cluster.config.name, reason);
                }
                Outcome::of_error(e.kind()).is_some_and(|o| cluster.report(&ep, o))
            }
        };
        match result {
            // The upstream's proven identity comes beside the response.
            Ok((resp, principal)) => {
                let answered = Instant::now();
                inflight.finish_at(answered);
                let wants_retry =
                    !last && policy.map(|p| p.retry_on_response(resp.status(), resp.headers())).unwrap_or(false);
                if wants_retry && !retry_slot(&mut retrying) {
                    // Envoy: no retry over the circuit breaker; the response goes back, flagged UO.
                    report.flag("UO");
                } else if wants_retry {
                    drop(resp);
                    tried.push(ep.addr);
                    report.retries += 1;
                    Box::pin(backoff(policy, attempt, deadline)).await?;
                    attempt += 1;
                    continue;
                }
                if attempt > 0
                    && attempts > 1
                    && last
                    && policy.map(|p| p.retry_on_response(resp.status(), resp.headers())).unwrap_or(false)
                {
                    report.flag("URX");
                }
                report.upstream_service_time = Some(answered.saturating_duration_since(upstream_start));
                report.upstream_principal = principal;
                let (mut rp, rb) = resp.into_parts();
                strip_hop_by_hop(&mut rp.headers);
                for c in set_cookies {
                    rp.headers.append(http::header::SET_COOKIE, c);
                }
                // One box around the response body and its wrappers (they are generic).
                let bounded = DeadlineBody::new(rb, action.idle_timeout.or(stream_idle), deadline);
                return Ok(Response::from_parts(rp, boxed(Hold::new(bounded, permit))));
            }
            Err(e) => {
                drop(inflight);
                let retry = !last && policy.map(|p| p.retry_on_error(&e)).unwrap_or(false);
                if retry && !retry_slot(&mut retrying) {
                    report.flag("UO");
                    if attempt > 0 {
                        report.flag("URX");
                    }
                    return Err(e);
                }
                if retry {
                    tried.push(ep.addr);
                    report.retries += 1;
                    report.flag(e.kind().response_flag());
                    Box::pin(backoff(policy, attempt, deadline)).await?;
                    attempt += 1;
                    continue;
                }
                if attempt > 0 {
                    report.flag("URX");
                }
                return Err(e);
            }
        }
    }
}

/// The request's hash key for consistent hashing (Envoy's `hash_policy`): the policies in
/// order, combined; a terminal policy that produced a value stops the walk. A cookie
/// policy with a `ttl` whose cookie is absent generates it as Envoy does (the hex
/// xxHash-style digest of the connection's remote and local addresses, so the requests
/// of one connection agree) and returns the `Set-Cookie` the response carries.
fn request_hash(
    policies: &[HashPolicy],
    parts: &http::request::Parts,
    conn: &ConnInfo,
) -> (Option<u64>, Vec<http::HeaderValue>) {
    let mut acc: Option<u64> = None;
    let mut set_cookies = Vec::new();
    for p in policies {
        let value: Option<Vec<u8>> = match &p.source {
            HashSource::Header(name) => {
                let vals: Vec<&[u8]> = parts.headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
                (!vals.is_empty()).then(|| vals.join(&b","[..]))
            }
            HashSource::Cookie { name, ttl, path } => match cookie_value(&parts.headers, name) {
                Some(v) => Some(v.as_bytes().to_vec()),
                None => ttl.map(|ttl| {
                    let value =
                        format!("{:016x}", stable_hash(format!("{}{}", conn.peer, conn.destination).as_bytes()));
                    if let Some(h) = set_cookie(name, &value, path, ttl) {
                        set_cookies.push(h);
                    }
                    value.into_bytes()
                }),
            },
            HashSource::SourceIp => Some(conn.peer.ip().to_string().into_bytes()),
            HashSource::QueryParameter(q) => parts
                .uri
                .query()
                .and_then(|qs| qs.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| k == q))
                .map(|(_, v)| v.as_bytes().to_vec()),
        };
        if let Some(v) = value {
            let h = stable_hash(&v);
            acc = Some(acc.map(|a| a.rotate_left(1) ^ h).unwrap_or(h));
            if p.terminal {
                break;
            }
        }
    }
    (acc, set_cookies)
}

/// The value of cookie `name` in the request's `Cookie` headers, without the double
/// quotes a quoted value carries (Envoy's `parseCookieValue`); None when absent or empty.
fn cookie_value<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v))
        .filter(|v| !v.is_empty())
}

/// Envoy's `makeSetCookieValue`: `name="value"`, `Max-Age` unless the ttl is zero (a
/// session cookie), `Path` when set, `HttpOnly`.
fn set_cookie(name: &str, value: &str, path: &str, ttl: Duration) -> Option<http::HeaderValue> {
    let mut s = format!("{name}=\"{value}\"");
    if !ttl.is_zero() {
        s.push_str(&format!("; Max-Age={}", ttl.as_secs()));
    }
    if !path.is_empty() {
        s.push_str(&format!("; Path={path}"));
    }
    s.push_str("; HttpOnly");
    http::HeaderValue::from_str(&s).ok()
}

fn pick(
    cluster: &Cluster,
    conn: &ConnInfo,
    tried: &[std::net::SocketAddr],
    hash: Option<u64>,
) -> Result<Arc<Endpoint>, ProxyError> {
    if matches!(cluster.config.discovery, Discovery::OriginalDst) {
        let dst = conn.original_dst.ok_or_else(|| {
            ProxyError::new(ErrorKind::NoHealthyUpstream, "ORIGINAL_DST cluster without an original destination")
        })?;
        return Ok(Arc::new(Endpoint {
            addr: dst,
            weight: 1,
            health: crate::cluster::Health::Healthy,
            metadata: None,
            socket_match: cluster.config.socket_match(None),
            load: Arc::new(crate::cluster::EndpointLoad::new()),
        }));
    }
    cluster.pick_hashed(tried, hash).ok_or_else(|| {
        ProxyError::new(ErrorKind::NoHealthyUpstream, format!("no healthy endpoint in {}", cluster.config.name))
    })
}

async fn backoff(policy: Option<&RetryPolicy>, attempt: u32, deadline: Option<Instant>) -> Result<(), ProxyError> {
    let wait = policy.map(|p| p.backoff(attempt, rand::random())).unwrap_or(Duration::ZERO);
    if let Some(d) = deadline {
        if Instant::now() + wait >= d {
            tokio::time::sleep_until(d.into()).await;
            return Err(ProxyError::new(ErrorKind::Timeout, "upstream request timeout"));
        }
    }
    tokio::time::sleep(wait).await;
    Ok(())
}

/// True when the body is small enough (known length) to buffer for retries.
fn replayable(body: &DownstreamBody) -> bool {
    body.is_end_stream() || body.size_hint().upper().map(|u| u <= REPLAY_LIMIT).unwrap_or(false)
}

/// Hop-by-hop headers and proxy bookkeeping (RFC 9110 §7.6.1, Envoy's defaults).
fn prepare_headers(
    parts: &mut http::request::Parts,
    ctx: &Context,
    conn: &ConnInfo,
    report: &HttpReport,
    in_mesh: bool,
    xfp_may_be_gone: bool,
) {
    // Absolute-form (explicit proxy) and HTTP/2 requests carry the authority in the URI
    // (already rewritten by the route); upstream HTTP/1.1 wants origin-form plus Host.
    if let Some(a) = parts.uri.authority() {
        if let Ok(v) = HeaderValue::from_str(a.as_str()) {
            parts.headers.insert(HOST, v);
        }
    }
    // Origin-form from the request's own path and query (shared bytes: no copy, no
    // second parse).
    if parts.uri.authority().is_some() || parts.uri.scheme().is_some() {
        let pq = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::from(pq);
    }
    strip_hop_by_hop(&mut parts.headers);
    if parts.headers.keys().any(|n| n == PROXY_CONNECTION || n == PROXY_AUTHORIZATION) {
        parts.headers.remove(PROXY_CONNECTION);
        parts.headers.remove(PROXY_AUTHORIZATION);
    }
    // Set before routing (`route_request`): looked up again (a hashed lookup of a custom
    // name) only when something since may have removed it.
    if xfp_may_be_gone {
        parts.headers.entry(X_FORWARDED_PROTO).or_insert_with(|| HeaderValue::from_static("http"));
    }
    // One hashed lookup whether the request carries an id or gets the generated one.
    match parts.headers.entry(X_REQUEST_ID) {
        // Unique per request: an HTTP/2 upstream's HPACK encoder sends it as a
        // never-indexed literal instead of inserting every value into its dynamic
        // table (each insertion walked the chain of earlier ids and evicted the entries
        // worth keeping, such as the peer metadata). Only the encoding changes.
        Entry::Occupied(mut e) => e.get_mut().set_sensitive(true),
        Entry::Vacant(e) => {
            if let Some(mut v) = report.request_id_value() {
                v.set_sensitive(true);
                e.insert(v);
            }
        }
    }
    crate::report::on_upstream_request(ctx, conn, &mut parts.headers, in_mesh);
    crate::telemetry::trace::inject(report.trace.as_deref(), &mut parts.headers);
}

/// Removes hop-by-hop headers, including those named by `Connection`. `te: trailers`
/// is kept (gRPC needs it).
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most requests carry none of these: one pass over the names instead of a hashed
    // removal per name.
    if !h.keys().any(|n| n == CONNECTION || n == TRANSFER_ENCODING || n == UPGRADE || n == TE || n == KEEP_ALIVE) {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if n != TE {
            h.remove(n);
        }
    }
    for n in [CONNECTION, TRANSFER_ENCODING, UPGRADE] {
        h.remove(n);
    }
    h.remove(KEEP_ALIVE);
    let te_trailers = h.get(TE).map(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers")).unwrap_or(true);
    if !te_trailers {
        h.remove(TE);
    }
}

fn build_request(
    parts: &http::request::Parts,
    headers: HeaderMap,
    proto: UpstreamProtocol,
    body: BoxBody,
) -> Request<BoxBody> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.headers_mut() = headers;
    *req.version_mut() = match proto {
        UpstreamProtocol::Http2 => Version::HTTP_2,
        _ => Version::HTTP_11,
    };
    req
}

/// Fire-and-forget copy of the request to a mirror cluster; Envoy appends `-shadow` to
/// the host. The response is discarded and failures never affect the original request.
fn mirror(ctx: &Arc<Context>, snap: &Arc<ProxySnapshot>, cluster: &str, parts: &http::request::Parts, body: Bytes) {
    let Some(cluster) = snap.clusters.get(cluster).cloned() else {
        return;
    };
    let Some(ep) = cluster.pick(&[]) else { return };
    let mut req = build_request(
        parts,
        parts.headers.clone(),
        match cluster.config.protocol {
            UpstreamProtocol::Http2 => UpstreamProtocol::Http2,
            _ => UpstreamProtocol::Http1,
        },
        full(body),
    );
    if let Some(h) = req.headers().get(HOST).and_then(|h| h.to_str().ok()) {
        let shadow = match h.rsplit_once(':') {
            Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => {
                format!("{host}-shadow:{port}")
            }
            _ => format!("{h}-shadow"),
        };
        if let Ok(v) = HeaderValue::from_str(&shadow) {
            req.headers_mut().insert(HOST, v);
        }
    }
    let ctx = ctx.clone();
    let proto = if req.version() == Version::HTTP_2 { UpstreamProtocol::Http2 } else { UpstreamProtocol::Http1 };
    tokio::spawn(async move {
        if let Ok(resp) = ctx
            .pools
            .send_with(
                &ep,
                proto,
                cluster.config.connect_timeout,
                cluster.config.connector_for(ep.metadata.as_ref()),
                req,
            )
            .await
        {
            let _ = resp.into_body().collect().await;
        }
    });
}
