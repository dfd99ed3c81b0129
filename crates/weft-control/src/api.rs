//! The control plane's JSON API (what `weft apply/get/delete/proxy-status/proxy-config`
//! call): resources in and out, and every proxy's sync state; and its Prometheus
//! metrics (`GET /metrics`, [`crate::metrics`]).

use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use weft_xds::{type_url, AdsServer};

use crate::source::MeshXdsSource;
use crate::store::{ChangeResult, ResourceStore};

/// Largest request body accepted (an apply of many resources).
const MAX_BODY: usize = 8 << 20;

/// What the API serves from.
pub struct Api {
    /// The store.
    pub store: Arc<ResourceStore>,
    /// The xDS server.
    pub server: AdsServer,
    /// Per-proxy resources.
    pub source: Arc<MeshXdsSource>,
    /// Registered workloads (for `weft analyze --live`).
    pub registry: crate::registry::Registry,
    /// CA and token issuer (token endpoints), when identity is enabled.
    pub identity: Option<Arc<weft_identity::service::CertificateAuthority>>,
    /// SDS secrets (shown by proxy-config, key material never), when identity is enabled.
    pub secrets: Option<Arc<crate::secrets::SecretSource>>,
    /// What the `/inject` admission webhook injects.
    pub inject: crate::inject::InjectConfig,
    /// Prometheus metrics (`GET /metrics`).
    pub metrics: Arc<crate::metrics::ControlMetrics>,
    /// The SLO engine (`GET /api/v1/slos`, `weft_slo_*` on `/metrics`).
    pub slo: Arc<crate::slo::SloEngine>,
    /// Rollouts and staged changes (`/api/v1/rollouts`, `apply?staged=true`).
    pub rollouts: Arc<crate::rollout::RolloutController>,
    /// The mesh's request statistics (dashboard, graph and time series endpoints).
    pub stats: crate::meshstats::SharedStats,
    /// The admin credential requests must carry (`crate::api_auth`).
    pub auth: crate::api_auth::ApiAuth,
    /// Whether this replica leads (CA rotation steps run on the leader only).
    pub leader: crate::leader::Leadership,
    /// Tap streams of the proxies and taps in progress (`/api/v1/tap`).
    pub tap: Arc<crate::tap::TapRelay>,
    /// With `--store etcd://`: the proxies other replicas serve (`/api/v1/proxies`).
    pub replicas: Option<Arc<crate::etcd::status::ProxyBoard>>,
}

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoints {
    /// The whole API (the `--api` port).
    All,
    /// Only the admission webhook, `POST /inject` (the `--webhook` port, reachable by the
    /// Kubernetes API server, so it does not offer apply, tokens or CA rotation).
    Webhook,
}

/// Serves the API until `shutdown` resolves.
pub async fn serve(api: Arc<Api>, sock: TcpListener, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            r = sock.accept() => {
                let Ok((stream, _)) = r else { continue };
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(api.clone(), stream, Endpoints::All));
            }
        }
    }
}

/// Serves the API on one accepted connection (plain TCP, or TLS already terminated by
/// the webhook listener), HTTP/1.1 or HTTP/2 (prior knowledge or ALPN `h2`).
pub async fn serve_connection<S>(api: Arc<Api>, stream: S, endpoints: Endpoints)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| {
        let api = api.clone();
        async move {
            if endpoints == Endpoints::Webhook && req.uri().path() != "/inject" {
                let error = format!("only POST /inject is served on the webhook port, not {}", req.uri().path());
                return Ok::<_, Infallible>(reply(StatusCode::NOT_FOUND, json!({"error": error})).map(Either::Left));
            }
            if endpoints == Endpoints::All {
                if let Err((status, body)) = api.auth.check(req.method(), req.uri().path(), req.headers()) {
                    return Ok::<_, Infallible>(reply(status, body).map(Either::Left));
                }
            }
            // Tap (admin only: it shows live traffic) streams its answer.
            let (method, path, query) = (req.method(), req.uri().path(), req.uri().query().unwrap_or(""));
            if let Some(r) = crate::tap::http::route(&api, method, path, query) {
                return Ok(r);
            }
            Ok::<_, Infallible>(handle(&api, req).await.map(Either::Left))
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

fn reply(status: StatusCode, v: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

fn change_json(r: &ChangeResult) -> Value {
    json!({
        "version": r.version,
        "accepted": r.accepted.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
        "errors": r.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
    })
}

async fn handle(api: &Api, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let param = |k: &str| {
        query.split('&').filter_map(|kv| kv.split_once('=')).find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    };
    match (req.method().clone(), path.as_str()) {
        (Method::GET, p) if crate::dashboard::serves(p) => crate::dashboard::handle(api, p, &query),
        (Method::POST, "/api/v1/apply") | (Method::POST, "/api/v1/delete") => {
            let source = param("source").unwrap_or_else(|| "api".into());
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return reply(StatusCode::PAYLOAD_TOO_LARGE, json!({"error": e.to_string()})),
            };
            let Ok(text) = std::str::from_utf8(&body) else {
                return reply(StatusCode::BAD_REQUEST, json!({"error": "the body must be UTF-8 YAML or JSON"}));
            };
            if path.ends_with("apply") && (param("staged").as_deref() == Some("true") || asks_staged(text)) {
                let workloads: Vec<crate::rollout::staged::ProxyWorkload> = api
                    .server
                    .connections()
                    .iter()
                    .filter_map(|c| c.node.as_ref())
                    .map(|n| (n.namespace.clone(), n.workload_name.clone(), n.labels.clone()))
                    .collect();
                let percent = param("canaryPercent").and_then(|p| p.parse().ok());
                let interval = param("interval").and_then(|i| weft_api::spec::Duration::parse(&i).ok()).map(|d| d.0);
                let (status, v) =
                    crate::rollout::api::stage(&api.rollouts, text, &source, &workloads, percent, interval);
                return reply(status, v);
            }
            let r = if path.ends_with("apply") {
                api.store.apply_shared(text, Path::new(&source)).await
            } else {
                api.store.delete_shared(text, Path::new(&source)).await
            };
            let status =
                if r.accepted.is_empty() && !r.errors.is_empty() { StatusCode::BAD_REQUEST } else { StatusCode::OK };
            reply(status, change_json(&r))
        }
        (Method::GET, "/api/v1/resources") => {
            let kind = param("kind").map(|k| k.to_ascii_lowercase());
            let name = param("name");
            let snap = api.store.snapshot();
            let wanted_kind = kind.as_deref().and_then(weft_api::Kind::parse);
            if kind.is_some() && wanted_kind.is_none() {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"error": format!("unknown kind {:?}", kind.unwrap_or_default())}),
                );
            }
            let status = crate::gwapi::api_status(&snap.resources, &api.server.connections(), &api.source.domain());
            let items: Vec<Value> = snap
                .resources
                .iter()
                .filter(|r| wanted_kind.map(|k| r.kind == k).unwrap_or(true))
                .filter(|r| name.as_deref().map(|n| r.meta.name == n).unwrap_or(true))
                .map(|r| {
                    let mut item = json!({
                        "kind": r.kind.as_str(), "apiVersion": r.api_version,
                        "namespace": r.meta.namespace, "name": r.meta.name,
                        "source": format!("{}:{}", r.source.file.display(), r.source.line),
                        "labels": r.meta.labels, "spec": crate::gwapi::spec_json(r),
                    });
                    if let Some(s) = status.get(&r.key()) {
                        item["status"] = s.clone();
                    }
                    item
                })
                .collect();
            reply(
                StatusCode::OK,
                json!({"version": snap.version, "items": items, "errors": snap.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>()}),
            )
        }
        (Method::GET, "/metrics") | (Method::GET, "/stats/prometheus") => {
            let connections = api.server.connections();
            let snap = api.store.snapshot();
            let count = |kind| snap.resources.iter().filter(|r| r.kind == kind).count();
            let entry_hosts: usize = snap
                .resources
                .iter()
                .filter_map(|r| match &r.spec {
                    weft_api::Spec::ServiceEntry(se) => Some(se.hosts.len()),
                    _ => None,
                })
                .sum();
            let view = crate::metrics::MeshView {
                connections: &connections,
                certificates: api.identity.as_deref().map(|a| a.stats()),
                services: count(weft_api::Kind::Service) + entry_hosts,
                virtual_services: count(weft_api::Kind::VirtualService),
            };
            let mut text = api.metrics.render(&view);
            text.push_str(&api.slo.render_metrics());
            text.push_str(&api.stats.self_metrics());
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (m, p) if p == "/api/v1/rollouts" || p.starts_with("/api/v1/rollouts/") => {
            let rest = &p["/api/v1/rollouts".len()..];
            let (status, v) = crate::rollout::api::handle(&api.rollouts, &api.store, m == Method::POST, rest, &query);
            reply(status, v)
        }
        (Method::GET, "/api/v1/proxies") => match &api.replicas {
            Some(board) => reply(StatusCode::OK, board.merge(proxies(api)).await),
            None => reply(StatusCode::OK, proxies(api)),
        },
        (Method::GET, "/api/v1/slos") => reply(StatusCode::OK, api.slo.to_json()),
        (Method::GET, "/api/v1/slos/rules") => {
            match crate::slo::rules::rules_yaml(&api.store.snapshot().resources, api.slo.domain()) {
                Ok(rules) => reply(StatusCode::OK, json!({ "rules": rules })),
                Err(e) => reply(StatusCode::UNPROCESSABLE_ENTITY, json!({ "error": e })),
            }
        }
        (Method::GET, "/api/v1/registry") => reply(StatusCode::OK, registry(api)),
        (Method::GET, "/api/v1/cache") => reply(StatusCode::OK, json!(api.source.cache_stats())),
        (Method::POST, "/api/v1/analyze") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return reply(StatusCode::PAYLOAD_TOO_LARGE, json!({"error": e.to_string()})),
            };
            let files: Vec<(String, String)> = if body.is_empty() {
                Vec::new()
            } else {
                match serde_json::from_slice::<Vec<AnalyzeFile>>(&body) {
                    Ok(f) => f.into_iter().map(|f| (f.name, f.text)).collect(),
                    Err(e) => {
                        return reply(
                            StatusCode::BAD_REQUEST,
                            json!({"error": format!("expected a JSON list of {{\"name\", \"text\"}} files: {e}")}),
                        )
                    }
                }
            };
            reply(StatusCode::OK, analyze_live(api, &files))
        }
        (Method::POST, "/api/v1/tokens") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return reply(StatusCode::PAYLOAD_TOO_LARGE, json!({"error": e.to_string()})),
            };
            let (status, v) = crate::identity::create_token(api.identity.as_deref(), &body);
            reply(status, v)
        }
        (Method::POST, "/api/v1/ca/rotate") => {
            let step = param("step").unwrap_or_default();
            if !api.leader.leads() {
                // Replicas share one CA (etcd): only the leader changes it.
                return reply(
                    StatusCode::CONFLICT,
                    json!({"error": "this replica is not the leader: send CA rotation steps to the leader (`weft control` logs \"leader elected\")"}),
                );
            }
            let (status, v) = crate::identity::rotate_root(api.identity.as_deref(), &step);
            reply(status, v)
        }
        (Method::POST, p) if p.starts_with("/api/v1/tokens/") && p.ends_with("/revoke") => {
            let id = p.trim_start_matches("/api/v1/tokens/").trim_end_matches("/revoke");
            let (status, v) = crate::identity::revoke_token(api.identity.as_deref(), id);
            reply(status, v)
        }
        (Method::POST, "/inject") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return reply(StatusCode::PAYLOAD_TOO_LARGE, json!({"error": e.to_string()})),
            };
            match crate::inject::webhook::review(&body, &api.inject) {
                Ok(v) => reply(StatusCode::OK, v),
                Err(e) => reply(StatusCode::BAD_REQUEST, json!({"error": e.to_string()})),
            }
        }
        (Method::GET, p) if p.starts_with("/api/v1/proxies/") => {
            let id = p.trim_start_matches("/api/v1/proxies/").trim_end_matches("/config");
            match proxy_config(api, id) {
                Ok(v) => reply(StatusCode::OK, v),
                Err(e) => reply(StatusCode::NOT_FOUND, json!({"error": e})),
            }
        }
        _ => reply(StatusCode::NOT_FOUND, json!({"error": format!("no such endpoint {} {path}", req.method())})),
    }
}

/// Whether a resource of `text` carries `weft.dev/staged: "true"`.
fn asks_staged(text: &str) -> bool {
    let staged = weft_api::spec::rollout::STAGED_ANNOTATION;
    text.contains(staged)
        && weft_api::parse_str(text, Path::new("api"))
            .resources
            .iter()
            .any(|r| r.meta.annotations.get(staged).is_some_and(|v| v == "true"))
}

/// Per proxy: identity, and per type SYNCED / STALE / NACKED against what the control
/// plane would send now.
pub(crate) fn proxies(api: &Api) -> Value {
    proxies_of(api, &api.server.connections())
}

/// [`proxies`] of `connections` (a copy of the server's, taken once by the caller).
pub(crate) fn proxies_of(api: &Api, connections: &[weft_xds::ConnectionStatus]) -> Value {
    let now = SystemTime::now();
    let list: Vec<Value> = connections
        .iter()
        .map(|c| {
            let mut entry = proxy_entry(c);
            entry["types"] = Value::Object(type_states(api, c, now));
            entry
        })
        .collect();
    json!({"proxies": list})
}

/// What one connection fixes, as `GET /api/v1/proxies` lists it (every field but
/// `types`): who the proxy is and how it is connected.
pub(crate) fn proxy_entry(c: &weft_xds::ConnectionStatus) -> Value {
    let kind = crate::translate::grpcgen::client_kind(&c.raw_node);
    // A gRPC client without weft's metadata: what its Istio-style node id says.
    let grpc_info = (kind == "grpc" && c.node.is_none()).then(|| crate::translate::grpcgen::node_info(&c.raw_node));
    let info = c.node.as_ref().or(grpc_info.as_ref());
    json!({
        "id": c.node_id,
        "kind": kind,
        "name": info.map(|i| i.name.clone()),
        "namespace": info.map(|i| i.namespace.clone()),
        "labels": info.map(|i| i.labels.clone()),
        "identity": info.map(|i| format!("spiffe://cluster.local/ns/{}/sa/{}", i.namespace, if i.service_account.is_empty() { "default" } else { &i.service_account })),
        "inbound": info.and_then(|i| i.inbound).map(|a| a.to_string()),
        "outbound": info.and_then(|i| i.outbound).map(|a| a.to_string()),
        "admin": info.and_then(|i| i.admin).map(|a| a.to_string()),
        "metrics": info.and_then(|i| i.metrics).map(|a| a.to_string()),
        "peer": c.peer.map(|a| a.to_string()),
        "mode": format!("{:?}", c.mode),
        "connected_since": c.connected_since.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    })
}

/// One connection's sync state per type (`status`, `acked`, `current`,
/// `config_age_seconds`, `nack`), as `GET /api/v1/proxies` lists it.
pub(crate) fn type_states(
    api: &Api,
    c: &weft_xds::ConnectionStatus,
    now: SystemTime,
) -> serde_json::Map<String, Value> {
    let current = api.source.proxy_resources(&c.raw_node);
    let mut types = serde_json::Map::new();
    for t in LISTED_TYPES {
        let st = c.types.get(t);
        let want = current.get(t).map(|(v, _)| v.as_str());
        let (status, nack) = sync_status(st, want);
        let acked = st.and_then(|s| s.acked_version.as_deref());
        let age = st.and_then(|s| s.acked_at).and_then(|t| now.duration_since(t).ok()).map(|d| d.as_secs_f64());
        types.insert(
            weft_xds::type_url::short(t).to_string(),
            json!({"status": status, "acked": acked, "current": want, "config_age_seconds": age,
                   "nack": nack.map(|n| n.error.clone())}),
        );
    }
    types
}

/// The types whose sync state `GET /api/v1/proxies` lists.
pub(crate) const LISTED_TYPES: [&str; 4] = [type_url::CLUSTER, type_url::ENDPOINT, type_url::LISTENER, type_url::ROUTE];

/// A connection's sync state of one type (`st`, None when nothing was sent) against
/// `want`, the version the control plane serves now: SYNCED, STALE, NACKED or NOT SENT,
/// with the NACK when it is about another version than the ACKed one.
pub(crate) fn sync_status<'a>(
    st: Option<&'a weft_xds::TypeStatus>,
    want: Option<&str>,
) -> (&'static str, Option<&'a weft_xds::NackInfo>) {
    let acked = st.and_then(|s| s.acked_version.as_deref());
    let nacked = st.and_then(|s| s.last_nack.as_ref()).filter(|n| Some(n.version.as_str()) != acked);
    let status = match (st, nacked) {
        (None, _) => "NOT SENT",
        (_, Some(_)) => "NACKED",
        _ if acked.is_some() && (acked == want || want.is_none()) => "SYNCED",
        _ => "STALE",
    };
    (status, nacked)
}

/// The workload registry: every workload with where it came from (`proxy`,
/// `workloadEntry`, `restored`: saved before a restart, awaiting its proxy, or `replica`:
/// connected to another replica sharing the etcd store).
fn registry(api: &Api) -> Value {
    use crate::registry::WorkloadSource;
    let snap = api.registry.snapshot();
    let list: Vec<Value> = snap
        .workloads()
        .map(|w| {
            let source = match &w.source {
                WorkloadSource::Proxy => "proxy",
                WorkloadSource::WorkloadEntry(_) => "workloadEntry",
                WorkloadSource::Restored => "restored",
                WorkloadSource::Replica => "replica",
            };
            json!({
                "id": w.id, "name": w.name, "namespace": w.namespace, "labels": w.labels,
                "addresses": w.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "inbound": w.inbound.map(|a| a.to_string()), "ready": w.ready, "source": source,
            })
        })
        .collect();
    let restored = snap.workloads().filter(|w| w.source == WorkloadSource::Restored).count();
    json!({"version": snap.version(), "restored": restored, "workloads": list})
}

/// A file sent with `weft analyze --live -f FILE`.
#[derive(serde::Deserialize)]
struct AnalyzeFile {
    name: String,
    text: String,
}

/// `weft analyze --live`: the store's resources, overlaid with those in `files` (files
/// given with `-f`, which win over stored ones of the same key, as if applied), checked
/// against each other and the registered workloads. Nothing is stored.
fn analyze_live(api: &Api, files: &[(String, String)]) -> Value {
    let snap = api.store.snapshot();
    let mut parsed = weft_api::Parsed::default();
    for (name, text) in files {
        parsed.extend(weft_api::parse_str(text, Path::new(name)));
    }
    let overridden: std::collections::BTreeSet<_> = parsed.resources.iter().map(|r| r.key()).collect();
    let mut resources: Vec<weft_api::Resource> =
        snap.resources.iter().filter(|r| !overridden.contains(&r.key())).cloned().collect();
    resources.extend(parsed.resources.iter().cloned());
    let registry = api.registry.snapshot();
    let workloads: Vec<weft_api::analyze::Workload> = registry
        .workloads()
        .map(|w| weft_api::analyze::Workload { namespace: w.namespace.clone(), labels: w.labels.clone() })
        .collect();
    let messages = weft_api::analyze::analyze_with_workloads(&resources, &workloads);
    json!({
        "version": snap.version,
        "resources": resources.len(),
        "workloads": workloads.len(),
        "errors": snap.errors.iter().chain(&parsed.errors).map(|e| e.to_string()).collect::<Vec<_>>(),
        "messages": messages.iter().map(|m| json!({
            "code": m.code,
            "level": m.level.to_string(),
            "text": m.to_string(),
        })).collect::<Vec<_>>(),
    })
}

/// What the control plane serves one proxy: per type, the version and each resource
/// decoded and summarised ([`crate::inspect::describe`]).
/// The proxy `id` names: a node id, an instance name (`reviews-v1-7x2kq`), `name.namespace`
/// as `proxy-status` shows it, or, when only one instance has it, a workload name
/// (`reviews-v1`, as a Deployment's pods are `reviews-v1-...`).
fn proxy_config(api: &Api, id: &str) -> Result<Value, String> {
    let conns = api.server.connections();
    let name_of = |c: &weft_xds::ConnectionStatus| c.node.as_ref().map(|n| (n.name.clone(), n.namespace.clone()));
    let exact = conns
        .iter()
        .find(|c| c.node_id == id || name_of(c).is_some_and(|(name, ns)| name == id || format!("{name}.{ns}") == id));
    let conn = match exact {
        Some(c) => c,
        None => {
            let prefix = format!("{id}-");
            let matches: Vec<_> =
                conns.iter().filter(|c| name_of(c).is_some_and(|(name, _)| name.starts_with(&prefix))).collect();
            match matches.as_slice() {
                [one] => *one,
                [] => return Err(format!("no connected proxy {id:?}")),
                many => {
                    let names: Vec<String> = many.iter().filter_map(|c| name_of(c).map(|(n, _)| n)).collect();
                    return Err(format!("{id:?} names several proxies: {}", names.join(", ")));
                }
            }
        }
    };
    let mut current = (*api.source.proxy_resources(&conn.raw_node)).clone();
    if let Some(secrets) = &api.secrets {
        use weft_xds::XdsSource as _;
        current.insert(type_url::SECRET.to_string(), secrets.resources(&conn.raw_node, type_url::SECRET));
    }
    let mut out = serde_json::Map::new();
    for (t, (version, by_name)) in current.iter() {
        out.insert(
            weft_xds::type_url::short(t).to_string(),
            json!({
                "version": version,
                "names": by_name.keys().collect::<Vec<_>>(),
                "resources": by_name.values().map(|any| crate::inspect::describe(t, any)).collect::<Vec<_>>(),
            }),
        );
    }
    Ok(json!({"id": conn.node_id, "resources": out}))
}
