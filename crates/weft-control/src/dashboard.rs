//! The dashboard: a web UI served on the API port under `/dashboard` (HTML, CSS and
//! JavaScript compiled into the binary, no outside requests), and the JSON it reads,
//! computed from the gathered [`crate::meshstats`], the store and the xDS connections:
//!
//! - `GET /api/v1/graph?window=5m`: the service graph (workloads, services, the ingress
//!   gateway and unknown callers as nodes; caller → service and service → workload edges
//!   with rate, success rate, p50/p99 and mTLS).
//! - `GET /api/v1/services`, `GET /api/v1/services/<fqdn>?window=1h&step=1m`: services with
//!   their golden signals over time, the VirtualServices, DestinationRules and
//!   AuthorizationPolicies that apply to them, and recent denials.
//! - `GET /api/v1/workloads`, `GET /api/v1/workloads/<namespace>/<name>?window=..`: the same
//!   per workload (inbound and outbound), with its proxies.
//! - `GET /api/v1/denials?window=1h`: recent authorization denials.
//!
//! The proxies' sync status is `/api/v1/proxies` (what `weft proxy-status` shows).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use crate::api::Api;
use crate::meshstats::series::{add_stats, Point};
use crate::meshstats::{Edge, Reporter, Selector, WindowStats};

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// The longest window asked for (the coarsest resolution's span).
const MAX_WINDOW: Duration = Duration::from_secs(28 * 86400);
/// Most points in one chart.
const MAX_POINTS: u64 = 360;
/// Istio's cluster domain (service FQDNs end in `.svc.<domain>`).
const DOMAIN: &str = "cluster.local";

/// Whether this module serves `path` (a GET). `/dashboard/tap` is another page's.
pub fn serves(path: &str) -> bool {
    matches!(path, "/dashboard" | "/dashboard/" | "/dashboard/app.js" | "/dashboard/style.css")
        || path == "/api/v1/graph"
        || path == "/api/v1/services"
        || path.starts_with("/api/v1/services/")
        || path == "/api/v1/workloads"
        || path.starts_with("/api/v1/workloads/")
        || path == "/api/v1/denials"
}

/// Serves a GET of `path` (one [`serves`] accepts) with `query`.
pub fn handle(api: &Api, path: &str, query: &str) -> Response<Full<Bytes>> {
    let param = |k: &str| {
        query.split('&').filter_map(|kv| kv.split_once('=')).find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    };
    let window = match param("window").map(|w| parse_window(&w)).unwrap_or(Ok(Duration::from_secs(300))) {
        Ok(w) => w,
        Err(e) => return json_reply(StatusCode::BAD_REQUEST, json!({"error": e})),
    };
    let step = match param("step").map(|w| parse_window(&w)) {
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => return json_reply(StatusCode::BAD_REQUEST, json!({"error": e})),
        None => None,
    };
    match path {
        "/dashboard" | "/dashboard/" => asset(INDEX_HTML, "text/html; charset=utf-8"),
        "/dashboard/app.js" => asset(APP_JS, "text/javascript; charset=utf-8"),
        "/dashboard/style.css" => asset(STYLE_CSS, "text/css; charset=utf-8"),
        "/api/v1/graph" => json_reply(StatusCode::OK, graph(api, window)),
        "/api/v1/services" => json_reply(StatusCode::OK, services(api, window)),
        "/api/v1/workloads" => json_reply(StatusCode::OK, workloads(api, window)),
        "/api/v1/denials" => {
            json_reply(StatusCode::OK, json!({"window": secs(window), "denials": denials(api, window, |_| true)}))
        }
        p if p.starts_with("/api/v1/services/") => {
            let name = percent_decode(p.trim_start_matches("/api/v1/services/"));
            json_reply(StatusCode::OK, service(api, &name, window, step))
        }
        p => {
            let rest = p.trim_start_matches("/api/v1/workloads/");
            match rest.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    json_reply(StatusCode::OK, workload(api, &percent_decode(ns), &percent_decode(name), window, step))
                }
                _ => {
                    json_reply(StatusCode::NOT_FOUND, json!({"error": "expected /api/v1/workloads/<namespace>/<name>"}))
                }
            }
        }
    }
}

fn asset(text: &'static str, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    r.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
    r
}

fn json_reply(status: StatusCode, v: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

/// `30s`, `5m`, `1h`, `3d`: 10 seconds to 28 days.
pub fn parse_window(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("window {text:?}: expected a number and s, m, h or d, like 5m"))?;
    let mult = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("window {text:?}: unit {unit:?} is not s, m, h or d")),
    };
    let d = Duration::from_secs(n.saturating_mul(mult));
    if d < Duration::from_secs(10) || d > MAX_WINDOW {
        return Err(format!("window {text:?}: must be between 10s and 28d"));
    }
    Ok(d)
}

/// `%XX` escapes of a path segment decoded (invalid ones and non-UTF-8 kept as written).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

fn secs(d: Duration) -> u64 {
    d.as_secs()
}

/// Rate, success rate and latency percentiles of a window, as the UI shows them.
fn signals(w: &WindowStats) -> Value {
    let covered = w.covered.as_secs_f64().max(1.0);
    json!({
        "requests": w.requests,
        "errors": w.errors,
        "covered_seconds": w.covered.as_secs(),
        "rps": w.requests / covered,
        "success_rate": w.success_rate(),
        "p50_ms": w.quantile_ms(0.5),
        "p99_ms": w.quantile_ms(0.99),
    })
}

fn point_json(p: &Point) -> Value {
    let span = p.step.max(1) as f64;
    json!({
        "t": p.start,
        "rps": p.stats.requests / span,
        "error_rps": p.stats.errors / span,
        "success_rate": p.stats.success_rate(),
        "p50_ms": p.stats.quantile_ms(0.5),
        "p99_ms": p.stats.quantile_ms(0.99),
        "denied": p.denied,
    })
}

/// Node id and kind of a workload as a caller.
fn workload_node(name: &str, ns: &str) -> (String, &'static str) {
    if name.is_empty() || name == "unknown" {
        ("unknown".into(), "unknown")
    } else if name.contains("ingressgateway") {
        (format!("wl:{ns}/{name}"), "ingress")
    } else if name.contains("egressgateway") {
        (format!("wl:{ns}/{name}"), "egress")
    } else {
        (format!("wl:{ns}/{name}"), "workload")
    }
}

fn service_short(fqdn: &str) -> String {
    match fqdn.strip_suffix(&format!(".svc.{DOMAIN}")) {
        Some(short) => short.to_string(),
        None => fqdn.to_string(),
    }
}

fn service_kind(fqdn: &str) -> &'static str {
    if fqdn.ends_with(&format!(".svc.{DOMAIN}")) {
        "service"
    } else {
        "external"
    }
}

/// The service graph over `window`.
fn graph(api: &Api, window: Duration) -> Value {
    let proxies: Vec<(String, String, bool)> = api
        .server
        .connections()
        .iter()
        .filter_map(|c| {
            let n = c.node.as_ref()?;
            let name = if n.workload_name.is_empty() { &n.name } else { &n.workload_name };
            Some((name.clone(), n.namespace.clone(), c.node_id.starts_with("router~")))
        })
        .collect();
    graph_of(window, &proxies, &api.stats.edges(window))
}

/// The graph of `edges`, with a node for every connected proxy's workload (name,
/// namespace, whether it is a gateway) even without traffic.
fn graph_of(window: Duration, proxies: &[(String, String, bool)], edges: &[Edge]) -> Value {
    let mut nodes: BTreeMap<String, Value> = BTreeMap::new();
    let mut add_node = |id: &str, kind: &str, name: &str, ns: &str| {
        nodes.entry(id.to_string()).or_insert_with(|| json!({"id": id, "kind": kind, "name": name, "namespace": ns}));
    };
    for (name, ns, gateway) in proxies {
        let (id, kind) = workload_node(name, ns);
        // A gateway is the mesh's way in, unless it is an egress gateway (its way out).
        let kind = match (*gateway, kind) {
            (true, "egress") => "egress",
            (true, _) => "ingress",
            (false, kind) => kind,
        };
        add_node(&id, kind, name, ns);
    }
    // caller -> service: (stats, every known destination mTLS, any known destination)
    let mut to_service: BTreeMap<(String, String), (WindowStats, bool, bool)> = BTreeMap::new();
    let mut to_workload: BTreeMap<(String, String), (WindowStats, bool)> = BTreeMap::new();
    for e in edges {
        let (src, src_kind) = workload_node(&e.source_workload, &e.source_namespace);
        add_node(&src, src_kind, &e.source_workload, &e.source_namespace);
        let svc = format!("svc:{}", e.destination_service);
        add_node(
            &svc,
            service_kind(&e.destination_service),
            &service_short(&e.destination_service),
            &e.destination_namespace,
        );
        let known = e.destination_workload != "unknown" && !e.destination_workload.is_empty();
        let s = to_service.entry((src, svc.clone())).or_insert_with(|| (WindowStats::default(), true, false));
        add_stats(&mut s.0, &e.stats);
        if known {
            s.1 &= e.mtls;
            s.2 = true;
            let (dst, _) = workload_node(&e.destination_workload, &e.destination_namespace);
            add_node(&dst, "workload", &e.destination_workload, &e.destination_namespace);
            let w = to_workload.entry((svc, dst)).or_insert_with(|| (WindowStats::default(), true));
            add_stats(&mut w.0, &e.stats);
            w.1 &= e.mtls;
        }
    }
    let mut out_edges: Vec<Value> = Vec::new();
    for ((src, dst), (stats, mtls, known)) in &to_service {
        let mut v = signals(stats);
        v["source"] = json!(src);
        v["target"] = json!(dst);
        v["mtls"] = json!(*mtls && *known);
        out_edges.push(v);
    }
    for ((src, dst), (stats, mtls)) in &to_workload {
        let mut v = signals(stats);
        v["source"] = json!(src);
        v["target"] = json!(dst);
        v["mtls"] = json!(mtls);
        out_edges.push(v);
    }
    json!({
        "window": secs(window),
        "nodes": nodes.into_values().collect::<Vec<_>>(),
        "edges": out_edges,
    })
}

/// Services: those defined (Kubernetes Services, ServiceEntry hosts) and those seen.
fn services(api: &Api, window: Duration) -> Value {
    let mut names: BTreeSet<String> = BTreeSet::new();
    let snap = api.store.snapshot();
    for r in &snap.resources {
        match &r.spec {
            weft_api::Spec::Service(_) => {
                names.insert(weft_api::host::fqdn(&r.meta.name, &r.meta.namespace, DOMAIN));
            }
            weft_api::Spec::ServiceEntry(se) => {
                names.extend(se.hosts.iter().map(|h| weft_api::host::fqdn(h, &r.meta.namespace, DOMAIN)));
            }
            _ => {}
        }
    }
    names.extend(api.stats.edges(window).into_iter().map(|e| e.destination_service));
    let list: Vec<Value> = names
        .iter()
        .map(|fqdn| {
            let sel = Selector { destination_service: Some(fqdn.clone()), ..Default::default() };
            let mut v = signals(&api.stats.window(&sel, window));
            v["name"] = json!(fqdn);
            v["short"] = json!(service_short(fqdn));
            v
        })
        .collect();
    json!({"window": secs(window), "services": list})
}

/// Points for a chart of `window`: `step` if given (at least the kept resolution),
/// else about 60 points.
fn chart(api: &Api, sel: &Selector, window: Duration, step: Option<Duration>) -> Vec<Value> {
    let min_step = Duration::from_secs(window.as_secs().div_ceil(MAX_POINTS).max(1));
    let step = step.unwrap_or(Duration::from_secs(window.as_secs() / 60)).max(min_step);
    api.stats.series(sel, window, step).iter().map(point_json).collect()
}

/// One service: golden signals over time (as its servers saw it, and as its callers
/// did), its callers and backends, the configuration that applies to it, its denials.
fn service(api: &Api, fqdn: &str, window: Duration, step: Option<Duration>) -> Value {
    let dest = Selector { destination_service: Some(fqdn.into()), ..Default::default() };
    let src = Selector { reporter: Reporter::Source, ..dest.clone() };
    let edges: Vec<Value> =
        api.stats.edges(window).iter().filter(|e| e.destination_service == fqdn).map(edge_json).collect();
    json!({
        "name": fqdn,
        "short": service_short(fqdn),
        "window": secs(window),
        "totals": signals(&api.stats.window(&dest, window)),
        "callers_totals": signals(&api.stats.window(&src, window)),
        "series": chart(api, &dest, window, step),
        "callers_series": chart(api, &src, window, step),
        "edges": edges,
        "config": config_for(api, fqdn),
        "denials": denials(api, window, |k| k.destination_service == fqdn),
    })
}

fn edge_json(e: &Edge) -> Value {
    let mut v = signals(&e.stats);
    v["source_workload"] = json!(e.source_workload);
    v["source_namespace"] = json!(e.source_namespace);
    v["destination_service"] = json!(e.destination_service);
    v["destination_workload"] = json!(e.destination_workload);
    v["destination_namespace"] = json!(e.destination_namespace);
    v["destination_version"] = json!(e.destination_version);
    v["mtls"] = json!(e.mtls);
    v
}

/// Workloads: the connected proxies' workloads, with their instances.
fn workloads(api: &Api, window: Duration) -> Value {
    let mut by: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for c in api.server.connections() {
        let Some(n) = c.node.as_ref() else { continue };
        let name = if n.workload_name.is_empty() { n.name.clone() } else { n.workload_name.clone() };
        by.entry((n.namespace.clone(), name)).or_default().push(n.name.clone());
    }
    let list: Vec<Value> = by
        .into_iter()
        .map(|((ns, name), instances)| {
            let sel = Selector {
                destination_workload: Some(name.clone()),
                destination_namespace: None,
                ..Default::default()
            };
            let mut v = signals(&api.stats.window(&sel, window));
            v["name"] = json!(name);
            v["namespace"] = json!(ns);
            v["instances"] = json!(instances);
            v
        })
        .collect();
    json!({"window": secs(window), "workloads": list})
}

/// One workload: inbound (as its proxies served) and outbound (as its proxies called)
/// signals over time, its edges, its proxies.
fn workload(api: &Api, ns: &str, name: &str, window: Duration, step: Option<Duration>) -> Value {
    let inbound = Selector { destination_workload: Some(name.into()), ..Default::default() };
    let outbound = Selector {
        reporter: Reporter::Source,
        source_workload: Some(name.into()),
        source_namespace: Some(ns.into()),
        ..Default::default()
    };
    let edges: Vec<Value> = api
        .stats
        .edges(window)
        .iter()
        .filter(|e| {
            (e.source_workload == name && e.source_namespace == ns)
                || (e.destination_workload == name && e.destination_namespace == ns)
        })
        .map(edge_json)
        .collect();
    let proxies: Vec<Value> = api
        .server
        .connections()
        .iter()
        .filter_map(|c| {
            let n = c.node.as_ref()?;
            let wl = if n.workload_name.is_empty() { &n.name } else { &n.workload_name };
            (wl == name && n.namespace == ns).then(|| json!({"id": c.node_id, "name": n.name}))
        })
        .collect();
    json!({
        "name": name,
        "namespace": ns,
        "window": secs(window),
        "inbound_totals": signals(&api.stats.window(&inbound, window)),
        "outbound_totals": signals(&api.stats.window(&outbound, window)),
        "inbound_series": chart(api, &inbound, window, step),
        "outbound_series": chart(api, &outbound, window, step),
        "edges": edges,
        "proxies": proxies,
        "denials": denials(api, window, |k| k.destination_workload == name),
    })
}

/// Recent denials (403 answered by the destination's proxy without a response flag) of
/// the series `keep` picks.
fn denials(api: &Api, window: Duration, keep: impl Fn(&crate::meshstats::series::SeriesKey) -> bool) -> Vec<Value> {
    api.stats
        .denials(window)
        .into_iter()
        .filter(|(k, _)| keep(k))
        .map(|(k, n)| {
            json!({
                "source_workload": k.source_workload, "source_namespace": k.source_namespace,
                "destination_service": k.destination_service, "destination_workload": k.destination_workload,
                "count": n,
            })
        })
        .collect()
}

/// The VirtualServices (hosts or route destinations naming the service), DestinationRules
/// (host) and AuthorizationPolicies (namespace or root namespace, selector within the
/// service's selector; `targetRef`s are not matched) that apply to `fqdn`.
fn config_for(api: &Api, fqdn: &str) -> Value {
    let snap = api.store.snapshot();
    let svc_ns =
        fqdn.strip_suffix(&format!(".svc.{DOMAIN}")).and_then(|s| s.split_once('.')).map(|(_, ns)| ns.to_string());
    let selector: Option<BTreeMap<String, String>> = snap.resources.iter().find_map(|r| match &r.spec {
        weft_api::Spec::Service(s) if weft_api::host::fqdn(&r.meta.name, &r.meta.namespace, DOMAIN) == fqdn => {
            Some(s.selector.clone())
        }
        _ => None,
    });
    let summary = |r: &weft_api::Resource| {
        json!({
            "kind": r.kind.as_str(), "name": r.meta.name, "namespace": r.meta.namespace,
            "source": format!("{}:{}", r.source.file.display(), r.source.line),
            "spec": spec_json(&r.spec),
        })
    };
    let mut vs = Vec::new();
    let mut dr = Vec::new();
    let mut ap = Vec::new();
    for r in &snap.resources {
        let ns = &r.meta.namespace;
        match &r.spec {
            weft_api::Spec::VirtualService(v) => {
                let mesh_bound = v.gateways.is_empty() || v.gateways.iter().any(|g| g == "mesh");
                let by_host = mesh_bound
                    && v.hosts
                        .iter()
                        .any(|h| h != "*" && weft_api::host::matches(&weft_api::host::fqdn(h, ns, DOMAIN), fqdn));
                let mut hosts = Vec::new();
                destination_hosts(&spec_json(&r.spec), &mut hosts);
                let by_route = hosts.iter().any(|h| weft_api::host::fqdn(h, ns, DOMAIN) == fqdn);
                if by_host || by_route {
                    vs.push(summary(r));
                }
            }
            weft_api::Spec::DestinationRule(d)
                if weft_api::host::matches(&weft_api::host::fqdn(&d.host, ns, DOMAIN), fqdn) =>
            {
                dr.push(summary(r));
            }
            weft_api::Spec::AuthorizationPolicy(p) => {
                let in_ns = svc_ns.as_deref() == Some(ns.as_str()) || ns == "istio-system";
                let labels = p.selector.as_ref().map(|s| &s.match_labels);
                let selects = match (labels, &selector) {
                    (None, _) => true,
                    (Some(l), _) if l.is_empty() => true,
                    (Some(l), Some(svc)) => l.iter().all(|(k, v)| svc.get(k) == Some(v)),
                    (Some(_), None) => false,
                };
                if in_ns && selects {
                    ap.push(summary(r));
                }
            }
            _ => {}
        }
    }
    json!({"virtual_services": vs, "destination_rules": dr, "authorization_policies": ap})
}

fn spec_json(spec: &weft_api::Spec) -> Value {
    let v = match spec {
        weft_api::Spec::VirtualService(s) => serde_json::to_value(s),
        weft_api::Spec::DestinationRule(s) => serde_json::to_value(s),
        weft_api::Spec::AuthorizationPolicy(s) => serde_json::to_value(s),
        _ => Ok(Value::Null),
    };
    v.unwrap_or(Value::Null)
}

/// Every `destination.host` in a VirtualService's JSON.
fn destination_hosts(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(h) = m.get("destination").and_then(|d| d.get("host")).and_then(Value::as_str) {
                out.push(h.to_string());
            }
            for x in m.values() {
                destination_hosts(x, out);
            }
        }
        Value::Array(a) => {
            for x in a {
                destination_hosts(x, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_with_units_and_bounds() {
        assert_eq!(parse_window("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_window("28d"), Ok(Duration::from_secs(28 * 86400)));
        assert_eq!(parse_window("30s"), Ok(Duration::from_secs(30)));
        assert!(parse_window("29d").is_err());
        assert!(parse_window("1s").is_err());
        assert!(parse_window("5w").is_err());
        assert!(parse_window("m").is_err());
        assert!(parse_window("99999999999999999999d").is_err());
    }

    fn edge(src: &str, svc: &str, dst: &str, requests: f64, errors: f64, mtls: bool) -> Edge {
        Edge {
            source_workload: src.into(),
            source_namespace: if src == "unknown" { "unknown".into() } else { "default".into() },
            destination_service: svc.into(),
            destination_workload: dst.into(),
            destination_namespace: "default".into(),
            destination_version: "v1".into(),
            mtls,
            stats: WindowStats { requests, errors, latency_ms: Vec::new(), covered: Duration::from_secs(60) },
        }
    }

    #[test]
    fn the_graph_has_callers_services_and_workloads_with_unknown_and_external_nodes() {
        let reviews = "reviews.default.svc.cluster.local";
        let edges = [
            edge("istio-ingressgateway", "productpage.default.svc.cluster.local", "productpage-v1", 60.0, 0.0, true),
            edge("unknown", "productpage.default.svc.cluster.local", "productpage-v1", 6.0, 0.0, false),
            edge("productpage-v1", reviews, "reviews-v1", 30.0, 0.0, true),
            edge("productpage-v1", reviews, "reviews-v2", 30.0, 3.0, true),
            // Aborted by the caller's sidecar: no workload reached.
            edge("productpage-v1", reviews, "unknown", 6.0, 6.0, false),
            edge("productpage-v1", "www.example.com", "unknown", 12.0, 0.0, false),
        ];
        let proxies = [
            ("ratings-v1".to_string(), "default".to_string(), false),
            ("istio-egressgateway".to_string(), "istio-system".to_string(), true),
        ];
        let g = graph_of(Duration::from_secs(60), &proxies, &edges);
        let kind = |id: &str| g["nodes"].as_array().unwrap().iter().find(|n| n["id"] == id).map(|n| n["kind"].clone());
        assert_eq!(kind("wl:default/istio-ingressgateway"), Some(json!("ingress")));
        assert_eq!(kind("wl:istio-system/istio-egressgateway"), Some(json!("egress")), "the way out is no ingress");
        assert_eq!(kind("unknown"), Some(json!("unknown")));
        assert_eq!(kind("svc:www.example.com"), Some(json!("external")));
        assert_eq!(kind("wl:default/ratings-v1"), Some(json!("workload")), "idle proxies are nodes");
        assert_eq!(kind("wl:default/unknown"), None, "no node for an unreached workload");
        let e = |s: &str, t: &str| {
            g["edges"].as_array().unwrap().iter().find(|e| e["source"] == s && e["target"] == t).cloned()
        };
        let to_reviews = e("wl:default/productpage-v1", "svc:reviews.default.svc.cluster.local").unwrap();
        assert_eq!((to_reviews["requests"].as_f64(), to_reviews["errors"].as_f64()), (Some(66.0), Some(9.0)));
        assert_eq!(to_reviews["mtls"], json!(true), "every connection made was mTLS (aborts made none)");
        let external = e("wl:default/productpage-v1", "svc:www.example.com").unwrap();
        assert_eq!(external["mtls"], json!(false));
        assert_eq!(to_reviews["rps"].as_f64(), Some(1.1));
        let v2 = e("svc:reviews.default.svc.cluster.local", "wl:default/reviews-v2").unwrap();
        assert_eq!(
            (v2["requests"].as_f64(), v2["success_rate"].as_f64(), v2["mtls"].clone()),
            (Some(30.0), Some(0.9), json!(true))
        );
        assert!(e("unknown", "svc:productpage.default.svc.cluster.local").is_some());
    }

    #[test]
    fn path_segments_are_percent_decoded() {
        assert_eq!(percent_decode("reviews.default.svc.cluster.local"), "reviews.default.svc.cluster.local");
        assert_eq!(percent_decode("a%20b%2Fc"), "a b/c");
        assert_eq!(percent_decode("bad%zz%4"), "bad%zz%4");
        assert_eq!(percent_decode("%FF"), "%FF");
    }

    #[test]
    fn the_page_loads_nothing_from_outside() {
        for (name, text) in [("index.html", INDEX_HTML), ("app.js", APP_JS), ("style.css", STYLE_CSS)] {
            for needle in ["http://", "https://", "//cdn", "@import"] {
                assert!(!text.contains(needle), "{name} refers outside the control plane: {needle}");
            }
        }
        assert!(serves("/dashboard") && serves("/api/v1/graph") && !serves("/dashboard/tap"));
    }

    #[test]
    fn route_destinations_are_found_anywhere_in_a_virtual_service() {
        let v = json!({"http": [{"route": [{"destination": {"host": "reviews", "subset": "v1"}}, {"destination": {"host": "ratings"}}]}]});
        let mut hosts = Vec::new();
        destination_hosts(&v, &mut hosts);
        assert_eq!(hosts, ["reviews", "ratings"]);
    }
}
