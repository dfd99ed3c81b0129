//! The HTTP stage (Envoy's HTTP connection manager): serve HTTP/1.1 and HTTP/2 on a
//! connection, route each request, apply faults, and answer locally (direct response,
//! redirect, errors) or hand over to [`forward`].

pub mod body;
mod forward;
pub(crate) mod h2_server;
mod limits;
pub mod preface;
mod recycle;
mod tunnel;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::cluster::h2_client::H2Body;
use crate::cluster::BoxBody;
use crate::coalesce::Coalesced;
use crate::config::{ChainKind, HttpChain, ProxySnapshot};
use crate::conn::ChainEnd;
use crate::conn::ConnInfo;
use crate::context::Context;
use crate::error::{ErrorKind, ProxyError};
use crate::io::{Activity, Replay, StreamGuard, Tracked};
use crate::report::HttpReport;
use crate::route::{Abort, CorsDecision, Route, RouteAction};
use body::{full, DownstreamBody, ReportingBody};
use preface::{Alpn, Version};

/// `grpc-status`, parsed once (a `&str` key is parsed into a name at every lookup).
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// hyper's HTTP/1 limit on request headers when none is set (`DEFAULT_MAX_HEADERS`).
const HYPER_MAX_HEADERS: usize = 100;

thread_local! {
    /// The boxes of this thread's last finished requests, for the next ones
    /// ([`recycle`]): HTTP/1.x and HTTP/2 requests run the same future, [`handle`]'s.
    static REQUEST_BOXES: recycle::Spares = const { std::cell::RefCell::new(None) };
    /// The same for the futures of HTTP/2 streams around them ([`serve_h2_stream`]).
    static H2_STREAM_BOXES: recycle::Spares = const { std::cell::RefCell::new(None) };
}

/// Serves HTTP on one downstream connection until it closes, the proxy drains, or its
/// filter chain changes in a way that cannot apply in place (see [`crate::conn`]).
///
/// The version is decided first ([`preface`]: `alpn`, else the client's first bytes);
/// HTTP/1.x is then served by hyper's HTTP/1 server on the plain stream, HTTP/2 by
/// [`h2_server`] on the stream with write coalescing ([`Coalesced`]).
pub async fn serve<S>(ctx: Arc<Context>, conn: Arc<ConnInfo>, stream: S, alpn: Alpn)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let ChainKind::Http(chain) = &conn.origin.accepted.kind else { return };
    if !chain.network_rbac.is_empty() {
        let verdict = crate::rbac::check(&chain.network_rbac, &conn.rbac_input(), ctx.metrics.rbac());
        if verdict.denied.is_some() {
            debug!(peer = %conn.peer, details = ?verdict.details(), "connection denied by RBAC: closing");
            return;
        }
    }
    let activity = Activity::new();
    let heads = Arc::new(limits::HeadCheck::default());
    // Envoy's limits on what a client may send as request headers (see docs/proxy.md).
    let mut guarded =
        limits::Guarded::new(Tracked::new(stream, activity.clone()), heads.clone(), chain.request_headers_timeout);
    // Boxed once per connection: one type for both versions' servers.
    let mut watchers: Watchers<'_> = Box::pin(watch(&ctx, &conn, &activity, chain.idle_timeout));
    let (version, io) = match alpn {
        Alpn::H2 => (Version::Http2, Replay::plain(guarded)),
        Alpn::Http1 => (Version::Http1, Replay::plain(guarded)),
        Alpn::None => {
            let detected = tokio::select! {
                biased;
                v = preface::detect(&mut guarded) => v,
                // Nothing received yet: nothing to finish.
                _ = watchers.as_mut() => return,
            };
            match detected {
                Ok((version, read)) => (version, Replay::new(read, guarded)),
                Err(e) => {
                    debug!(error = %e, "downstream connection ended before its first request");
                    return;
                }
            }
        }
    };
    match version {
        Version::Http1 => serve_http1(&ctx, &conn, chain, io, heads, &activity, &mut watchers).await,
        Version::Http2 => serve_http2(&ctx, &conn, chain, io, heads, &activity, &mut watchers).await,
    }
}

/// A downstream connection's I/O below the HTTP server: limits, activity, first bytes.
type DownstreamIo<S> = Replay<limits::Guarded<Tracked<S>>>;

/// The connection's watchers ([`watch`]).
type Watchers<'a> = Pin<Box<dyn Future<Output = Stop> + Send + 'a>>;

/// Why a connection stops being served as usual.
enum Stop {
    /// Finish what is in flight (HTTP/1.1: close once idle; HTTP/2: GOAWAY) for at most this long.
    Drain(Duration),
    /// Close now.
    Close,
}

/// Resolves when the connection must stop: the proxy drains, the connection idled out,
/// or its filter chain changed (see [`crate::conn`]).
async fn watch(ctx: &Context, conn: &ConnInfo, activity: &Activity, idle_timeout: Option<Duration>) -> Stop {
    let mut draining = ctx.draining.clone();
    tokio::select! {
        _ = crate::context::flipped(&mut draining) => Stop::Drain(ctx.drain_timeout),
        _ = activity.idle(idle_timeout) => { debug!("downstream connection idle timeout"); Stop::Drain(ctx.drain_timeout) }
        end = conn.ended(ctx) => {
            ctx.metrics.drain().closed(&conn.listener.name, end.reason());
            if end == ChainEnd::Denied {
                debug!(peer = %conn.peer, "connection denied by the new network RBAC policy: closing");
                return Stop::Close;
            }
            debug!(peer = %conn.peer, "filter chain changed: draining the connection");
            Stop::Drain(ctx.drain_duration)
        }
    }
}

/// Runs `conn_fut` until it ends (None) or `watchers` say stop: then the time the
/// connection has to finish gracefully, if any.
async fn until_stop<F, E>(conn_fut: Pin<&mut F>, watchers: &mut Watchers<'_>) -> Option<Duration>
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::select! {
        biased;
        r = conn_fut => {
            if let Err(e) = r {
                debug!(error = %e, "downstream connection ended with error");
            }
            None
        }
        stop = watchers.as_mut() => match stop {
            Stop::Drain(d) => Some(d),
            Stop::Close => None,
        },
    }
}

/// HTTP/1.x with hyper's server (keep-alive, upgrades), on the plain stream: hyper
/// writes once per poll of the connection already.
async fn serve_http1<S>(
    ctx: &Arc<Context>,
    conn: &Arc<ConnInfo>,
    chain: &HttpChain,
    io: DownstreamIo<S>,
    heads: Arc<limits::HeadCheck>,
    activity: &Arc<Activity>,
    watchers: &mut Watchers<'_>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(true)
        // hyper arms its header-read timer for every request head: with a timer of our
        // own, one tokio timer per connection serves them all (`limits::HeadTimer`).
        .timer(limits::HeadTimer::default())
        .header_read_timeout(chain.request_headers_timeout)
        .max_buf_size(chain.max_request_headers_bytes.max(8192));
    // hyper's own limit is the same 100 as Envoy's default, checked on the stack; a limit
    // set explicitly makes hyper allocate and fill two 100-entry arrays per request
    // (~1.5k instructions and ~4 KiB of copies per request), so it is set only when the
    // configuration asks for another value.
    if chain.max_headers_count != HYPER_MAX_HEADERS {
        builder.max_headers(chain.max_headers_count);
    }
    let (svc_ctx, svc_conn, svc_activity) = (ctx.clone(), conn.clone(), activity.clone());
    let svc = service_fn(move |mut req: Request<Incoming>| {
        let (ctx, conn) = (svc_ctx.clone(), svc_conn.clone());
        let stream = svc_activity.open_stream();
        if !heads.admit() {
            req.extensions_mut().insert(limits::MalformedHead);
        }
        // Boxed: the request's state machine (filters, routing, forwarding, several KiB)
        // is allocated once and stays put. Unboxed, hyper's HTTP/1 dispatcher held it
        // inline and copied it whole at every hand-over (`memmove` was the largest single
        // item of a profile: bench/notes.md). Boxed as the future of one `async fn` call:
        // an `async` block around `handle(..)` was built on the stack and copied twice
        // more on its way into the box. The box is one a finished request of this thread
        // gave back, still in the cache ([`recycle`]).
        let req = req.map(DownstreamBody::Http1);
        recycle::Infallible(recycle::pin(&REQUEST_BOXES, || handle(ctx, conn, req, stream)))
    });
    let conn_fut = builder.serve_connection(TokioIo::new(io), svc).with_upgrades();
    tokio::pin!(conn_fut);
    if let Some(deadline) = until_stop(conn_fut.as_mut(), watchers).await {
        // HTTP/1.1: close once idle (or after the response in flight).
        conn_fut.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(deadline, conn_fut).await;
    }
}

/// HTTP/2 with [`h2_server`]: the streams are served in the connection's own task, and
/// its writes are coalesced (one write, one TLS record, per poll: [`crate::coalesce`]).
async fn serve_http2<S>(
    ctx: &Arc<Context>,
    conn: &Arc<ConnInfo>,
    chain: &HttpChain,
    io: DownstreamIo<S>,
    heads: Arc<limits::HeadCheck>,
    activity: &Arc<Activity>,
    watchers: &mut Watchers<'_>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (io, flusher) = Coalesced::new(io);
    let max_header_list = u32::try_from(chain.max_request_headers_bytes).unwrap_or(u32::MAX);
    let streams = H2Streams { ctx: ctx.clone(), conn: conn.clone(), activity: activity.clone(), heads };
    let server = h2_server::Server::new(io, max_header_list, streams);
    let mut conn_fut = flusher.wrap(server);
    if let Some(deadline) = until_stop(Pin::new(&mut conn_fut), watchers).await {
        // HTTP/2: GOAWAY, then the open streams finish.
        conn_fut.inner_mut().get_mut().graceful_shutdown();
        let _ = tokio::time::timeout(deadline, conn_fut).await;
    }
}

/// What each stream of a downstream HTTP/2 connection is served with.
struct H2Streams {
    ctx: Arc<Context>,
    conn: Arc<ConnInfo>,
    activity: Arc<Activity>,
    heads: Arc<limits::HeadCheck>,
}

impl h2_server::NewStream for H2Streams {
    fn open(
        &mut self,
        req: Request<h2::RecvStream>,
        respond: h2::server::SendResponse<Bytes>,
    ) -> h2_server::StreamFuture {
        let stream = self.activity.open_stream();
        let admitted = self.heads.admit();
        // Small: the request's own future is boxed inside (hyper's server boxed the
        // request's future too, and spawned a task around it). Its state (~1 KiB) is
        // built in a recycled box ([`recycle`]); the stream's own box holds a pointer.
        let (ctx, conn) = (self.ctx.clone(), self.conn.clone());
        Box::pin(recycle::pin(&H2_STREAM_BOXES, || serve_h2_stream(ctx, conn, req, respond, stream, admitted)))
    }
}

/// One HTTP/2 stream, from its request head to the end of its response.
async fn serve_h2_stream(
    ctx: Arc<Context>,
    conn: Arc<ConnInfo>,
    req: Request<h2::RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
    stream: StreamGuard,
    admitted: bool,
) {
    let (mut parts, recv) = req.into_parts();
    if !admitted {
        parts.extensions.insert(limits::MalformedHead);
    }
    let len = crate::cluster::h2_client::content_length(&parts.headers);
    if parts.method == Method::CONNECT {
        // The stream becomes the tunnel once answered; its request has no body.
        if len.is_some_and(|n| n != 0) {
            debug!("HTTP/2 CONNECT with a request body: refused");
            let mut respond = respond;
            respond.send_reset(h2::Reason::INTERNAL_ERROR);
            return;
        }
        let (pending, connect) = h2_server::PendingTunnel::new(recv);
        parts.extensions.insert(pending);
        let req = Request::from_parts(parts, DownstreamBody::Empty);
        let handle = recycle::pin(&REQUEST_BOXES, || handle(ctx, conn, req, stream));
        return h2_server::serve_stream(respond, handle, Some(connect)).await;
    }
    let req = Request::from_parts(parts, DownstreamBody::Http2(H2Body::new(recv, len, true)));
    // Boxed on its own (one allocation, as with hyper): the request's state machine is
    // several KiB; inline, this stream's future would be as large, and it is moved (copied
    // whole) into its box and then into `serve_stream`'s state. The box is a recycled one
    // ([`recycle`]).
    let handle = recycle::pin(&REQUEST_BOXES, || handle(ctx, conn, req, stream));
    h2_server::serve_stream(respond, handle, None).await;
}

/// What the stages of one request share: the proxy, the connection, the filter chain and
/// snapshot it is served with (the snapshot moves on when something is fetched on
/// demand), and the report it fills. Per-request functions take this instead of a bag of
/// arguments.
pub struct RequestCtx<'a> {
    /// The proxy.
    pub ctx: &'a Arc<Context>,
    /// The downstream connection.
    pub conn: &'a Arc<ConnInfo>,
    /// The HTTP connection manager serving the request.
    pub chain: &'a HttpChain,
    /// The configuration the request is routed with.
    pub snap: Arc<ProxySnapshot>,
    /// Telemetry for the request, filled as it goes.
    pub report: Box<HttpReport>,
}

/// Handles one request end to end with the connection's current filter chain; never
/// fails (errors become local replies).
async fn handle(
    ctx: Arc<Context>,
    conn: Arc<ConnInfo>,
    req: Request<DownstreamBody>,
    stream: StreamGuard,
) -> Response<BoxBody> {
    let snap = ctx.store.snapshot();
    let view = conn.chain(&snap);
    // HTTP/1.x answers carry `Connection: close` once the connection drains (HTTP/2
    // connections get a GOAWAY from `serve`).
    let close = (view.drain || view.denied) && req.version() < http::Version::HTTP_2;
    let mut resp = match &view.chain.kind {
        ChainKind::Http(chain) if !view.denied => handle_with(&ctx, &conn, chain, snap, req, stream).await,
        // Denied by the network RBAC policy now in force: `serve` closes the connection.
        _ => local_reply(&ProxyError::new(ErrorKind::RbacDenied, crate::rbac::DENIED_BODY), StatusCode::FORBIDDEN),
    };
    if close {
        resp.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

async fn handle_with(
    ctx: &Arc<Context>,
    conn: &Arc<ConnInfo>,
    chain: &HttpChain,
    snap: Arc<ProxySnapshot>,
    req: Request<DownstreamBody>,
    stream: StreamGuard,
) -> Response<BoxBody> {
    // The head is kept here and borrowed by the stages below (see `route_request`).
    let (mut parts, body) = req.into_parts();
    // Boxed: the report (~540 bytes) goes from here to the response body; as a pointer it
    // is not copied at each move, nor kept inline in the request's future.
    let report = Box::new(HttpReport::start(ctx, conn, &parts));
    let downstream_h2 = parts.version == http::Version::HTTP_2;
    let mut rq = RequestCtx { ctx, conn, chain, snap, report };
    let routed = route_request(&mut rq, &mut parts, body).await;
    let mut report = rq.report;
    let resp = match routed {
        Ok(r) => r,
        Err(e) => {
            report.flag(e.kind().response_flag());
            let status = report.local_status.unwrap_or_else(|| {
                StatusCode::from_u16(e.kind().http_status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            });
            let mut r = if report.is_grpc() {
                // gRPC clients expect a trailers-only answer, as Envoy sends.
                grpc_trailers_only(grpc_status_for_http(status.as_u16()), e.detail())
            } else {
                local_reply(&e, status)
            };
            if e.kind() == ErrorKind::Overflow {
                // Envoy's router marks requests dropped by upstream circuit breaking.
                r.headers_mut().insert(HeaderName::from_static("x-envoy-overloaded"), HeaderValue::from_static("true"));
            }
            r
        }
    };
    let (mut parts, body) = resp.into_parts();
    if downstream_h2 {
        own_header_values(&mut parts.headers);
    }
    report.response_code = parts.status.as_u16();
    if let Some(s) = parts.headers.get(GRPC_STATUS) {
        report.grpc_status = s.to_str().ok().map(str::to_string);
    }
    report.on_response_headers(ctx, &mut parts.headers);
    Response::from_parts(parts, crate::http::body::boxed(ReportingBody::new(body, ctx.clone(), report, stream)))
}

/// Checks the head (malformed, a second Host), sets `x-forwarded-proto`, finds the
/// authority, then [`route_for`]. The head is borrowed: a `Parts` (224 bytes) taken by
/// value is kept twice in an `async fn`'s state, and copied with it at each hand-over.
async fn route_request(
    rq: &mut RequestCtx<'_>,
    parts: &mut http::request::Parts,
    body: DownstreamBody,
) -> Result<Response<BoxBody>, ProxyError> {
    let conn = rq.conn;
    // Envoy refuses these before routing: a head with bare-LF line ends (hyper accepts
    // them) and a second Host, either of which lets two parsers disagree on the request.
    if parts.extensions.get::<limits::MalformedHead>().is_some() {
        return Err(ProxyError::new(ErrorKind::DownstreamProtocol, "request head with bare LF line endings"));
    }
    // One lookup of Host: a second value is refused, the first is the authority when
    // the URI has none.
    let mut hosts = parts.headers.get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::new(ErrorKind::DownstreamProtocol, "more than one Host header"));
    }
    let authority = authority_of(&parts.uri, host).unwrap_or_default();
    // Envoy's HCM (without use_remote_address) keeps a client's x-forwarded-proto and
    // otherwise sets it from the connection, before routing (require_tls reads it). One
    // hashed lookup either way.
    parts
        .headers
        .entry(forward::X_FORWARDED_PROTO)
        .or_insert_with(|| http::HeaderValue::from_static(if conn.tls { "https" } else { "http" }));
    // The head stays here; the stages below borrow it (a `Parts` is 224 bytes, and each
    // `async fn` taking it by value kept it twice in its state, copied with it).
    let routed = route_for(rq, parts, body, &authority).await;
    // The report keeps the authority the request was routed with (moved, not copied:
    // nothing reads it from the report before the response).
    rq.report.authority = authority;
    routed
}

/// [`route_request`] once the request's authority is known: authentication,
/// authorization, route selection, rate limits and CORS, then [`dispatch`].
async fn route_for(
    rq: &mut RequestCtx<'_>,
    parts: &mut http::request::Parts,
    body: DownstreamBody,
    authority: &str,
) -> Result<Response<BoxBody>, ProxyError> {
    let (ctx, conn, chain) = (rq.ctx, rq.conn, rq.chain);
    // The request's span starts before any filter can answer locally, so local replies
    // (RBAC, JWT, faults, no route) are traced too.
    if let Some(t) = &chain.tracing {
        let span = crate::telemetry::trace::ActiveSpan::start(conn, t, &*parts, authority, rq.report.request_id());
        rq.report.trace = Some(Box::new(span));
    }
    // Request authentication (JWT) before authorization: RBAC reads what it establishes.
    for f in &chain.jwt {
        // Boxed, as every path most requests never take below: inline, its state would
        // enlarge the request's future, which is copied whole at each hand-over.
        if let Err(denial) = Box::pin(f.authenticate(&mut *parts, authority)).await {
            return Ok(jwt_denied(&denial, &mut rq.report));
        }
    }
    // Authorization first (Istio's order: authn, authz, then CORS, faults, router).
    if !chain.rbac.is_empty() {
        let verdict = crate::rbac::check(&chain.rbac, &conn.rbac_http_input(&*parts, authority), ctx.metrics.rbac());
        let denied = verdict.denied.is_some();
        rq.report.rbac(verdict);
        if denied {
            // Envoy resolves the route before its filters run: the denial reports the
            // cluster (and so the service) the request was for.
            if let Some(RouteAction::Forward(action)) =
                rq.snap.route_table(chain).and_then(|t| t.select(authority, &*parts)).as_deref().map(|r| &r.action)
            {
                rq.report.cluster = Some(action.clusters.pick(rand::random()).clone());
            }
            return Err(ProxyError::new(ErrorKind::RbacDenied, crate::rbac::DENIED_BODY));
        }
    }
    let mut table = rq
        .snap
        .route_table(chain)
        .ok_or_else(|| ProxyError::new(ErrorKind::NoRoute, "route configuration not (yet) received"))?;
    // On-demand route configurations (VHDS) fetch the virtual host of a new authority
    // first (boxed: only on-demand tables ever wait).
    if table.on_demand() {
        let fetched = Box::pin(ctx.store.await_vhost(&rq.snap, &table, authority)).await;
        if let Some((s, t)) = fetched.map_err(|e| ProxyError::new(ErrorKind::NoRoute, e.to_string()))? {
            (rq.snap, table) = (s, t);
        }
    }
    if parts.method == Method::CONNECT {
        if !chain.upgrades.iter().any(|u| u == "connect") {
            return Err(ProxyError::new(ErrorKind::DownstreamProtocol, "CONNECT is not enabled on this listener"));
        }
        let route = tunnel::select_connect_route(&table, authority, &*parts)
            .ok_or_else(|| ProxyError::new(ErrorKind::NoRoute, format!("no route for CONNECT {authority}")))?;
        rq.report.route_name = Some(route.name.clone());
        // A direct response (REGISTRY_ONLY's block_all) answers the CONNECT: no tunnel.
        if let Some(r) = route.direct_response(&*parts) {
            let (p, b) = r.into_parts();
            return Ok(Response::from_parts(p, full(b)));
        }
        return Box::pin(tunnel::connect(rq, &route, authority, take_parts(parts))).await;
    }
    let route = table
        .select(authority, &*parts)
        .ok_or_else(|| ProxyError::new(ErrorKind::NoRoute, format!("no route for {authority}{}", parts.uri.path())))?;
    rq.report.route_name = Some(route.name.clone());
    if let Some(span) = rq.report.trace.as_mut() {
        span.set_operation(route.decorator.as_deref());
    }
    // Local rate limiting: after authentication, authorization and route selection (its
    // per-route configuration and descriptors need the route), before CORS and faults.
    let mut x_ratelimit = None;
    if !chain.local_ratelimit.is_empty() {
        let input = crate::ratelimit::CheckInput {
            parts: &*parts,
            peer: conn.peer.ip(),
            route: &route.rate_limits,
            per_route: &route.local_ratelimit,
            random: (rand::random(), rand::random()),
        };
        let store = &ctx.store.rate_limit_buckets;
        match crate::ratelimit::check(&chain.local_ratelimit, &input, conn, store, ctx.metrics.ratelimit()) {
            Ok(passed) => {
                passed.edit_request(&mut parts.headers);
                x_ratelimit = passed.x;
            }
            Err(denial) => return Ok(rate_limited(&denial, &mut rq.report)),
        }
    }
    // The CORS filter runs before fault injection and the router (Istio's order).
    let cors = route.cors.as_deref().filter(|_| chain.cors);
    let mut allowed_origin = None;
    if let Some(policy) = cors {
        match policy.decide(&parts.method, &parts.headers, rand::random()) {
            CorsDecision::Pass => {}
            CorsDecision::Decorate(origin) => allowed_origin = Some(origin),
            CorsDecision::Respond(resp) => {
                let (p, b) = resp.into_parts();
                return Ok(Response::from_parts(p, full(b)));
            }
        }
    }
    let mut result = dispatch(rq, &route, parts, body, authority).await;
    if let (Some(policy), Some(origin), Ok(resp)) = (cors, allowed_origin, result.as_mut()) {
        policy.decorate(resp.headers_mut(), origin);
    }
    if let (Some(x), Ok(resp)) = (x_ratelimit, result.as_mut()) {
        x.apply(resp.headers_mut());
    }
    result
}

/// Fault injection, then the route's action: a local reply or forwarding upstream.
async fn dispatch(
    rq: &mut RequestCtx<'_>,
    route: &Arc<Route>,
    parts: &mut http::request::Parts,
    body: DownstreamBody,
    authority: &str,
) -> Result<Response<BoxBody>, ProxyError> {
    let (ctx, chain) = (rq.ctx, rq.chain);
    match &route.action {
        RouteAction::Direct { .. } | RouteAction::Redirect(..) => {
            // Both carry the route's response-header edits already, as Envoy's local replies do.
            let r = match &route.action {
                RouteAction::Direct { .. } => route.direct_response(&*parts),
                _ => route.redirect_response(&*parts),
            }
            .ok_or_else(|| ProxyError::new(ErrorKind::NoRoute, "local reply could not be built"))?;
            let (p, b) = r.into_parts();
            Ok(Response::from_parts(p, full(b)))
        }
        RouteAction::Forward(action) => {
            // The cluster is chosen with the route, before the filters run (as Envoy's
            // connection manager does), so a fault abort reports the service it was for.
            let cluster_name = action.clusters.pick(rand::random()).clone();
            rq.report.cluster = Some(cluster_name.clone());
            if let Some(fault) = route.fault.as_ref().or(chain.fault.as_ref()) {
                let d = fault.decide(rand::random(), rand::random());
                if let Some(delay) = d.delay {
                    rq.report.flag("DI");
                    Box::pin(tokio::time::sleep(delay)).await;
                }
                if let Some(abort) = d.abort {
                    rq.report.flag("FI");
                    let mut resp = fault_abort(&abort);
                    route.edit_response_headers(resp.headers_mut());
                    return Ok(resp);
                }
            }
            if !rq.snap.cluster_warm(&cluster_name) {
                // On demand, a cluster not received yet (or without endpoints) is awaited.
                let fetched = Box::pin(ctx.store.await_cluster(&rq.snap, &cluster_name)).await;
                if let Some(s) = fetched.map_err(|e| ProxyError::new(ErrorKind::NoCluster, e.to_string()))? {
                    rq.snap = s;
                }
            }
            if !rq.snap.clusters.contains_key(&*cluster_name) {
                // Envoy's `cluster_not_found_response_code` (503 unless configured).
                rq.report.local_status = Some(action.cluster_not_found_status);
                return Err(ProxyError::new(ErrorKind::NoCluster, format!("unknown cluster {cluster_name}")));
            }
            route.rewrite_request(&mut *parts);
            if let Some(kind) = tunnel::upgrade_type(&parts.headers) {
                if !chain.upgrades.contains(&kind) {
                    return Err(ProxyError::new(
                        ErrorKind::DownstreamProtocol,
                        format!("upgrade {kind:?} is not enabled on this listener"),
                    ));
                }
                return Box::pin(tunnel::upgrade(rq, &cluster_name, take_parts(parts), authority)).await;
            }
            let mut resp = forward::forward(rq, action, &cluster_name, parts, body).await?;
            // The peer's metadata is read before the route's edits, which may remove it.
            rq.report.on_upstream_response(ctx, resp.headers_mut());
            route.edit_response_headers(resp.headers_mut());
            Ok(resp)
        }
    }
}

/// Gives the header values of a response going to an HTTP/2 downstream allocations of
/// their own. hyper and h2 hand them out as slices of the buffer they read the upstream
/// response into (8 KiB or more, shared with the body), and the downstream connection's
/// HPACK encoder keeps the values it indexes for as long as that connection lives: each
/// kept value would pin a whole upstream read buffer. Measured (`weft-bench soak`,
/// heaptrack): 500 downstream HTTP/2 connections pinned ~1.5 KiB per request, 250 MiB
/// after a minute. An HTTP/1.x downstream writes the head and drops it, so its responses
/// skip the copy (a few allocations per response). Values HPACK never keeps are not
/// copied either: sensitive ones (never indexed) and those of the names h2's encoder
/// never indexes by value ([`hpack_never_indexed`]: `content-length` on every response).
fn own_header_values(headers: &mut http::HeaderMap) {
    for (name, v) in headers.iter_mut() {
        if v.is_sensitive() || hpack_never_indexed(name) {
            continue;
        }
        // The date goes out as a never-indexed literal (see `h2_server::serve_stream`):
        // marked here, it needs no copy either.
        if name == http::header::DATE {
            v.set_sensitive(true);
            continue;
        }
        if let Ok(own) = HeaderValue::from_bytes(v.as_bytes()) {
            *v = own;
        }
    }
}

/// The names whose values h2's HPACK encoder never inserts into its dynamic table
/// (h2 0.4 `hpack::Header::skip_value_index`, after nghttp2): it sends them as literals
/// and keeps no reference to them.
fn hpack_never_indexed(name: &HeaderName) -> bool {
    use http::header::{
        AGE, AUTHORIZATION, CONTENT_LENGTH, COOKIE, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LOCATION, SET_COOKIE,
    };
    // A match on the standard names (as h2 writes it), not a comparison with an array
    // of names built and dropped per header.
    matches!(
        *name,
        CONTENT_LENGTH
            | AGE
            | AUTHORIZATION
            | ETAG
            | IF_MODIFIED_SINCE
            | IF_NONE_MATCH
            | LOCATION
            | COOKIE
            | SET_COOKIE
    )
}

/// Takes the request head out of `parts` (for the paths that own it: tunnels), leaving an
/// empty one.
fn take_parts(parts: &mut http::request::Parts) -> http::request::Parts {
    std::mem::replace(parts, Request::new(()).into_parts().0)
}

/// The authority a request is for: the absolute URI's (explicit proxy, HTTP/2), else Host.
pub fn request_authority(parts: &http::request::Parts) -> Option<String> {
    authority_of(&parts.uri, parts.headers.get(HOST))
}

/// [`request_authority`] from the URI and the (first) Host header already looked up.
fn authority_of(uri: &http::Uri, host: Option<&HeaderValue>) -> Option<String> {
    if let Some(a) = uri.authority() {
        return Some(a.as_str().to_ascii_lowercase());
    }
    host.and_then(|h| h.to_str().ok()).map(|h| h.to_ascii_lowercase())
}

fn fault_abort(abort: &Abort) -> Response<BoxBody> {
    match abort {
        Abort::Http(status) => {
            let mut r = Response::new(full(Bytes::from_static(b"fault filter abort")));
            *r.status_mut() = *status;
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            r
        }
        Abort::Grpc(code) => grpc_trailers_only(*code, "fault filter abort"),
    }
}

/// Envoy's HTTP -> gRPC status mapping for local replies.
fn grpc_status_for_http(status: u16) -> u32 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

fn grpc_trailers_only(code: u32, message: &str) -> Response<BoxBody> {
    let mut r = Response::new(full(Bytes::new()));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert(GRPC_STATUS, HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(message) {
        h.insert(HeaderName::from_static("grpc-message"), v);
    }
    r
}

/// Envoy's local reply when the JWT filter refuses a request (401, or 403 for
/// audiences; gRPC callers get UNAUTHENTICATED / PERMISSION_DENIED).
fn jwt_denied(denial: &crate::jwt::Denial, report: &mut HttpReport) -> Response<BoxBody> {
    let status = StatusCode::from_u16(denial.status.http_status()).unwrap_or(StatusCode::UNAUTHORIZED);
    report.details = Some(denial.status.details());
    let mut r = if report.is_grpc() {
        grpc_trailers_only(grpc_status_for_http(status.as_u16()), denial.status.text())
    } else {
        let mut r = Response::new(full(Bytes::from_static(denial.status.text().as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    };
    if let Ok(v) = HeaderValue::from_str(&denial.www_authenticate) {
        r.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
    }
    r
}

/// Envoy's local reply for a request the local rate limit filter refuses: `status`
/// (429), body `local_rate_limited`, the filter's response headers; response flag `RL`.
fn rate_limited(denial: &crate::ratelimit::Denial, report: &mut HttpReport) -> Response<BoxBody> {
    report.flag("RL");
    report.details = Some(crate::ratelimit::RATE_LIMITED_BODY.to_string());
    let mut r = if report.is_grpc() {
        grpc_trailers_only(denial.grpc_status, crate::ratelimit::RATE_LIMITED_BODY)
    } else {
        let mut r = Response::new(full(Bytes::from_static(crate::ratelimit::RATE_LIMITED_BODY.as_bytes())));
        *r.status_mut() = denial.status;
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    };
    denial.decorate(r.headers_mut());
    r
}

/// Envoy's local reply for a data-path error.
fn local_reply(e: &ProxyError, status: StatusCode) -> Response<BoxBody> {
    let text = match e.kind() {
        ErrorKind::NoHealthyUpstream => "no healthy upstream".to_string(),
        ErrorKind::Timeout | ErrorKind::PerTryTimeout => "upstream request timeout".to_string(),
        ErrorKind::NoRoute => String::new(),
        ErrorKind::NoCluster => "cluster not found".to_string(),
        ErrorKind::Overflow => {
            "upstream connect error or disconnect/reset before headers. reset reason: overflow".into()
        }
        ErrorKind::ConnectFailure => {
            "upstream connect error or disconnect/reset before headers. reset reason: connection failure".into()
        }
        ErrorKind::UpstreamReset | ErrorKind::RefusedStream | ErrorKind::UpstreamTerminated => {
            "upstream connect error or disconnect/reset before headers. reset reason: connection termination".into()
        }
        _ => e.detail().to_string(),
    };
    let mut r = Response::new(full(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::header::{CONTENT_LENGTH, CONTENT_TYPE, DATE, SET_COOKIE};
    use http::{HeaderMap, HeaderValue};

    /// True when `v`'s bytes lie inside `buf` (the value still shares that buffer).
    fn inside(v: &HeaderValue, buf: &Bytes) -> bool {
        let (start, end) = (buf.as_ptr() as usize, buf.as_ptr() as usize + buf.len());
        let p = v.as_bytes().as_ptr() as usize;
        (start..end).contains(&p)
    }

    #[test]
    fn own_header_values_copies_what_hpack_may_keep_and_leaves_the_rest_shared() {
        // A response head as a client connection hands it out: values slicing its read buffer.
        let buf = Bytes::copy_from_slice(b"text/plain1024Mon, 07 Dec 2026 06:00:00 GMTa=b");
        let value = |r: std::ops::Range<usize>| HeaderValue::from_maybe_shared(buf.slice(r)).unwrap();
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, value(0..10));
        h.insert(CONTENT_LENGTH, value(10..14));
        h.insert(DATE, value(14..43));
        h.insert(SET_COOKIE, value(43..46));
        let mut secret = value(0..4);
        secret.set_sensitive(true);
        h.insert("x-secret", secret);
        assert!(h.values().all(|v| inside(v, &buf)));

        super::own_header_values(&mut h);

        // Values HPACK may index get their own allocations, with the same bytes.
        assert!(!inside(&h[CONTENT_TYPE], &buf));
        assert_eq!(h[CONTENT_TYPE], "text/plain");
        // Values it never keeps stay as they were: no copy. The date is made one of them.
        assert!(inside(&h[DATE], &buf) && h[DATE].is_sensitive());
        assert_eq!(h[DATE], "Mon, 07 Dec 2026 06:00:00 GMT");
        assert!(inside(&h[CONTENT_LENGTH], &buf) && inside(&h[SET_COOKIE], &buf));
        assert!(inside(&h["x-secret"], &buf) && h["x-secret"].is_sensitive());
        assert_eq!(h[CONTENT_LENGTH], "1024");
    }
}
