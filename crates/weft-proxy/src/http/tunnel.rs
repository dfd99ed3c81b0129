//! Tunnels over HTTP: `CONNECT host:port` (explicit proxy) and HTTP/1.1 upgrades such as
//! WebSocket. Both end as an opaque byte copy between the two sides.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, UPGRADE};
use http::{HeaderMap, Request, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::body::full;
use super::h2_server::PendingTunnel;
use super::RequestCtx;
use crate::cluster::{BoxBody, Discovery, UpstreamStream};
use crate::error::{ErrorKind, ProxyError};
use crate::route::{Route, RouteAction, RouteTable};

/// The upgrade a request asks for (lower case), when it is an HTTP/1.1 upgrade.
pub fn upgrade_type(h: &HeaderMap) -> Option<String> {
    let conn_upgrade = h
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")));
    if !conn_upgrade {
        return None;
    }
    h.get(UPGRADE).and_then(|v| v.to_str().ok()).map(|v| v.trim().to_ascii_lowercase())
}

/// CONNECT carries no path; routes are matched as if the path were `/`.
pub fn select_connect_route(table: &RouteTable, authority: &str, parts: &http::request::Parts) -> Option<Arc<Route>> {
    let mut probe = Request::new(());
    *probe.method_mut() = parts.method.clone();
    *probe.uri_mut() = http::Uri::from_static("/");
    *probe.headers_mut() = parts.headers.clone();
    let (probe, _) = probe.into_parts();
    table.select(authority, &probe)
}

/// `CONNECT host:port`: connects to an endpoint of the route's cluster, answers 200 and
/// copies bytes both ways.
pub async fn connect(
    rq: &mut RequestCtx<'_>,
    route: &Route,
    authority: &str,
    mut parts: http::request::Parts,
) -> Result<Response<BoxBody>, ProxyError> {
    let RouteAction::Forward(action) = &route.action else {
        return Err(ProxyError::new(ErrorKind::NoRoute, "CONNECT route must forward to a cluster"));
    };
    let cluster_name = action.clusters.pick(rand::random()).clone();
    rq.report.cluster = Some(cluster_name.clone());
    let upstream = dial(rq, &cluster_name, Some(authority)).await?;
    // HTTP/1.1: the connection, once the 200 is written (hyper's upgrade); HTTP/2: the
    // CONNECT stream (`h2_server`).
    if let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() {
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(up) => pipe(TokioIo::new(up), upstream).await,
                Err(e) => debug!(error = %e, "CONNECT upgrade failed"),
            }
        });
    } else {
        let tunnel = parts
            .extensions
            .remove::<PendingTunnel>()
            .and_then(|p| p.take())
            .ok_or_else(|| ProxyError::new(ErrorKind::DownstreamProtocol, "connection cannot be upgraded"))?;
        tokio::spawn(async move {
            match tunnel.await {
                Ok(down) => pipe(down, upstream).await,
                Err(_) => debug!("CONNECT stream ended before its tunnel opened"),
            }
        });
    }
    Ok(Response::new(full(Bytes::new())))
}

/// Copies bytes both ways until either side ends.
async fn pipe<D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut down: D, mut upstream: UpstreamStream) {
    let _ = tokio::io::copy_bidirectional(&mut down, &mut upstream).await;
}

/// HTTP/1.1 upgrade (WebSocket and friends): a dedicated upstream connection, the
/// request sent as is (its Host set from `authority`, the one it was routed with), and
/// on `101` both connections become a byte pipe.
pub async fn upgrade(
    rq: &mut RequestCtx<'_>,
    cluster_name: &str,
    mut parts: http::request::Parts,
    authority: &str,
) -> Result<Response<BoxBody>, ProxyError> {
    let stream = dial(rq, cluster_name, None).await?;
    let (ctx, conn) = (rq.ctx, rq.conn);
    let on_down = parts
        .extensions
        .remove::<OnUpgrade>()
        .ok_or_else(|| ProxyError::new(ErrorKind::DownstreamProtocol, "connection cannot be upgraded"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ProxyError::new(ErrorKind::ConnectFailure, format!("upstream handshake: {e}")).not_sent())?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    let kind = upgrade_type(&parts.headers).unwrap_or_default();
    let mut req = Request::new(full(Bytes::new()));
    *req.method_mut() = parts.method.clone();
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    *req.uri_mut() = pq.parse().unwrap_or_else(|_| http::Uri::from_static("/"));
    *req.headers_mut() = parts.headers.clone();
    if let Some(host) = (!authority.is_empty()).then(|| HeaderValue::from_str(authority).ok()).flatten() {
        req.headers_mut().insert(http::header::HOST, host);
    }
    let in_mesh = rq.snap.clusters.get(cluster_name).is_some_and(|c| c.config.in_mesh());
    crate::report::on_upstream_request(ctx, conn, req.headers_mut(), in_mesh);
    req.headers_mut().insert(CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(v) = HeaderValue::from_str(&kind) {
        req.headers_mut().insert(UPGRADE, v);
    }
    let mut resp = sender
        .send_request(req)
        .await
        .map_err(|e| ProxyError::new(ErrorKind::UpstreamReset, format!("upgrade request: {e}")))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (p, b) = resp.into_parts();
        return Ok(Response::from_parts(p, super::body::boxed(b)));
    }
    let on_up = resp.extensions_mut().remove::<OnUpgrade>();
    let (p, _) = resp.into_parts();
    tokio::spawn(async move {
        let Some(on_up) = on_up else { return };
        match tokio::try_join!(on_down, on_up) {
            Ok((d, u)) => {
                let mut d = TokioIo::new(d);
                let mut u = TokioIo::new(u);
                let _ = tokio::io::copy_bidirectional(&mut d, &mut u).await;
            }
            Err(e) => debug!(error = %e, "upgrade failed"),
        }
    });
    Ok(Response::from_parts(p, full(Bytes::new())))
}

/// Opens a TCP connection to an endpoint of the cluster (or the original destination /
/// the CONNECT authority for ORIGINAL_DST clusters).
async fn dial(
    rq: &mut RequestCtx<'_>,
    cluster_name: &str,
    authority: Option<&str>,
) -> Result<UpstreamStream, ProxyError> {
    let (ctx, conn) = (rq.ctx, rq.conn);
    let cluster = rq
        .snap
        .clusters
        .get(cluster_name)
        .ok_or_else(|| ProxyError::new(ErrorKind::NoCluster, format!("unknown cluster {cluster_name}")))?;
    let timeout = cluster.config.connect_timeout;
    let (addr, connector) = if matches!(cluster.config.discovery, Discovery::OriginalDst) {
        let addr = match (conn.original_dst, authority.and_then(|a| a.parse().ok())) {
            (_, Some(a)) => a,
            (Some(d), None) => d,
            _ => return Err(ProxyError::new(ErrorKind::NoHealthyUpstream, "no destination for ORIGINAL_DST cluster")),
        };
        (addr, &cluster.config.transport)
    } else {
        let ep = cluster.pick(&[]).ok_or_else(|| {
            ProxyError::new(ErrorKind::NoHealthyUpstream, format!("no healthy endpoint in {cluster_name}"))
        })?;
        (ep.addr, cluster.config.connector_for(ep.metadata.as_ref()))
    };
    rq.report.upstream_host = Some(addr);
    ctx.pools.connect_stream(addr, timeout, connector).await
}
