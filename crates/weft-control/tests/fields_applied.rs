//! Nothing weft parses is accepted and silently ignored: every field of the maximal
//! resources in `crates/weft-api/tests/data/fields/` (one file per kind, every field set;
//! `weft-api --test fields` keeps them complete) is removed in turn, and the field must
//! either change the xDS of some test proxy (APPLIED) or be named by a `weft analyze`
//! finding (WARNED), or be in the short allowlist below with its reason. A field set in
//! several places of the maximal resources passes when one of them shows it applied.
//!
//! A field whose removal makes its resource invalid is changed instead (a number, a
//! boolean, a duration); when no valid change is known it takes the verdict of its
//! nearest probed parent (a required part of what that parent does), and a required
//! top-level field (a VirtualService's `hosts`) is listed as required.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::Value;
use weft_api::fields::{self, FieldPath, Segment};
use weft_api::{Kind, Resource};
use weft_control::registry::{Registry, Workload, WorkloadSource};
use weft_control::translate::{translate, MeshConfig, ProxyMode, ProxyXds};
use weft_xds::{NodeInfo, PortInfo};

/// Services and a gateway route the maximal resources refer to.
const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}, {name: grpc-api, port: 9090}, {name: tcp-db, port: 3306}]
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec:
  selector: {app: ratings}
  ports: [{name: http, port: 9080}, {name: http-alt, port: 9081}, {name: tls, port: 9443}, {name: tcp-db, port: 3306}]
---
apiVersion: v1
kind: Service
metadata: {name: productpage, namespace: default}
spec:
  selector: {app: productpage}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: sleep, namespace: other}
spec:
  selector: {app: sleep}
  ports: [{name: http, port: 80}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: front, namespace: default}
spec:
  hosts: [bookinfo.example.com, secure.example.com, multi.example.com]
  gateways: [istio-system/ingress]
  http:
  - route: [{destination: {host: productpage, port: {number: 9080}}}]
"#;

/// What the control plane's JWKS fetcher (`weft-control::jwks`) would have fetched for
/// the maximal RequestAuthentication's `jwksUri`.
fn fetched_jwks() -> BTreeMap<String, String> {
    BTreeMap::from([(
        "https://other.example/jwks.json".to_string(),
        r#"{"keys":[{"kty":"oct","kid":"fetched","k":"b3RoZXI"}]}"#.to_string(),
    )])
}

/// Tracing providers the maximal Telemetry names.
const MESH_CONFIG: &str = "
extensionProviders:
- {name: otel, opentelemetry: {service: 127.0.0.1, port: 4317}}
";

/// Fields that change no xDS and need no warning, with the reason. Keep it short.
const ALLOWED: &[(Kind, &str, &str)] = &[
    // Kubernetes fields about how kube-proxy and the cloud expose a Service, not about
    // the mesh: Istio ignores them too.
    (Kind::Service, "spec.type", "Kubernetes exposure; Istio does not use it either"),
    (Kind::Service, "spec.externalIPs", "Kubernetes exposure; Istio does not use it either"),
    (Kind::Service, "spec.loadBalancerIP", "Kubernetes exposure; Istio does not use it either"),
    (Kind::Service, "spec.externalTrafficPolicy", "Kubernetes exposure; Istio does not use it either"),
    (Kind::Service, "spec.ipFamilies", "Kubernetes exposure; Istio does not use it either"),
    (Kind::Service, "spec.ipFamilyPolicy", "Kubernetes exposure; Istio does not use it either"),
    (Kind::Service, "spec.ports[].nodePort", "Kubernetes exposure; Istio does not use it either"),
    // A LocalWorkload's process settings are applied by `weft up` when it starts the
    // process, not by the translator.
    (Kind::LocalWorkload, "spec.command", "used by `weft up` to start the process"),
    (Kind::LocalWorkload, "spec.args", "used by `weft up` to start the process"),
    (Kind::LocalWorkload, "spec.env", "used by `weft up` to start the process"),
    // An SLO configures the control plane's SLO engine (`weft-control::slo`: its
    // evaluation, `/api/v1/slos`, alerts, `weft slo rules`), not the proxies.
    (Kind::ServiceLevelObjective, "spec", "evaluated by the control plane's SLO engine, not translated to xDS"),
    // A Rollout drives the control plane's rollout controller, which writes the
    // VirtualService of each step into the store (`weft --test rollout`).
    (Kind::Rollout, "spec", "driven by the rollout controller, which writes VirtualServices, not translated to xDS"),
    // An HTTP_FILTER patch's filter match names the connection manager, the only
    // network filter HTTP filters live in: any other name is reported (WFT0010).
    (
        Kind::EnvoyFilter,
        "spec.configPatches[].match.listener.filterChain.filter.name",
        "the HTTP connection manager's name; any other is WFT0010",
    ),
    // A LocalWorkload's identity and ports become the node metadata of the proxy `weft up`
    // starts for it (labels, service account, ports): the proxy's registration carries
    // them, not the resource.
    (Kind::LocalWorkload, "spec.labels", "the proxy `weft up` starts registers with them"),
    (Kind::LocalWorkload, "spec.ports", "the proxy `weft up` starts registers with them"),
    (Kind::LocalWorkload, "spec.serviceAccount", "the proxy `weft up` starts registers with it"),
    // Gateway API references written with their default group or kind: removing them
    // leaves the same reference (a foreign group or kind is refused by validation or
    // reported in the route's status).
    (Kind::HttpRoute, "spec.parentRefs[].group", "the default group, the same reference"),
    (Kind::HttpRoute, "spec.rules[].backendRefs[].group", "the default group, the same reference"),
    (Kind::HttpRoute, "spec.rules[].backendRefs[].kind", "the default kind, the same reference"),
    (Kind::HttpRoute, "spec.rules[].filters[].requestMirror.backendRef.group", "the default group, the same reference"),
    (Kind::HttpRoute, "spec.rules[].filters[].requestMirror.backendRef.kind", "the default kind, the same reference"),
    (
        Kind::HttpRoute,
        "spec.rules[].filters[].requestMirror.backendRef.namespace",
        "the route's namespace, the same reference",
    ),
    (Kind::KubernetesGateway, "spec.listeners[].allowedRoutes.kinds[].group", "the default group, the same kinds"),
    (Kind::GrpcRoute, "spec.parentRefs[].group", "the default group, the same reference"),
    (Kind::GrpcRoute, "spec.parentRefs[].kind", "the default kind, the same reference"),
    (Kind::GrpcRoute, "spec.rules[].backendRefs[].group", "the default group, the same reference"),
    (Kind::GrpcRoute, "spec.rules[].backendRefs[].kind", "the default kind, the same reference"),
    (Kind::TcpRoute, "spec.parentRefs[].group", "the default group, the same reference"),
    (Kind::TcpRoute, "spec.parentRefs[].kind", "the default kind, the same reference"),
    (Kind::TcpRoute, "spec.rules[].backendRefs[].group", "the default group, the same reference"),
    (Kind::TcpRoute, "spec.rules[].backendRefs[].kind", "the default kind, the same reference"),
    (Kind::TlsRoute, "spec.parentRefs[].group", "the default group, the same reference"),
    (Kind::TlsRoute, "spec.parentRefs[].kind", "the default kind, the same reference"),
    (Kind::TlsRoute, "spec.rules[].backendRefs[].group", "the default group, the same reference"),
    (Kind::TlsRoute, "spec.rules[].backendRefs[].kind", "the default kind, the same reference"),
    (Kind::HttpRoute, "spec.parentRefs[].kind", "the default kind, the same reference (Service is applied)"),
    (Kind::TcpRoute, "spec.parentRefs[].namespace", "the route's namespace, the same reference"),
    (Kind::TcpRoute, "spec.rules[].backendRefs[].weight", "one backend takes all traffic whatever its weight"),
    (Kind::GrpcRoute, "spec.rules[].backendRefs[].namespace", "the route's namespace, the same reference"),
    (Kind::GrpcRoute, "spec.rules[].filters[].requestMirror.backendRef.group", "the default group, the same reference"),
    (Kind::GrpcRoute, "spec.rules[].filters[].requestMirror.backendRef.kind", "the default kind, the same reference"),
    (
        Kind::GrpcRoute,
        "spec.rules[].filters[].requestMirror.backendRef.namespace",
        "the route's namespace, the same reference",
    ),
    (Kind::TlsRoute, "spec.rules[].backendRefs[].namespace", "the route's namespace, the same reference"),
    // The maximal Gateway has one listener a TCPRoute, a TLSRoute or a GRPCRoute can
    // attach to: `sectionName` and `port` select it either way (HTTPRoute shows them applied).
    (Kind::TcpRoute, "spec.parentRefs[].sectionName", "one listener takes this kind in the maximal Gateway"),
    (Kind::TcpRoute, "spec.parentRefs[].port", "one listener takes this kind in the maximal Gateway"),
    (Kind::TlsRoute, "spec.parentRefs[].sectionName", "one listener takes this kind in the maximal Gateway"),
    (Kind::TlsRoute, "spec.parentRefs[].port", "one listener takes this kind in the maximal Gateway"),
    (Kind::GrpcRoute, "spec.parentRefs[].port", "one listener takes this kind in the maximal Gateway"),
    // A listener's certificate is served over SDS under its `credentialName` (Kubernetes
    // Secrets: the egress/SDS branch); until then the gateway translator skips the server.
    (
        Kind::KubernetesGateway,
        "spec.listeners[].tls.certificateRefs",
        "becomes the server's credentialName (served by the SDS branch)",
    ),
    (Kind::GatewayClass, "spec.description", "free text"),
    // One Service in the granted namespace: a grant by name grants the same as one without.
    (Kind::ReferenceGrant, "spec.to[].name", "one Service in the maximal mesh's granted namespace"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Applied,
    Warned,
    Allowed,
    Ignored,
    Required,
}

struct Doc {
    kind: Kind,
    file: PathBuf,
    value: Value,
    resource: Resource,
}

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../weft-api/tests/data/fields")
}

fn docs() -> Vec<Doc> {
    let mut out = Vec::new();
    for kind in Kind::ALL {
        let file = data_dir().join(format!("{}.yaml", kind.id().to_ascii_lowercase()));
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for d in weft_api::yaml::read_documents(&text) {
            let value = d.unwrap().value;
            let resource = parse(&value, &file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            out.push(Doc { kind, file: file.clone(), value, resource });
        }
    }
    out
}

/// The document as a resource, or its first error.
fn parse(v: &Value, file: &Path) -> Result<Resource, String> {
    let mut parsed = weft_api::parse_str(&v.to_string(), file);
    match (parsed.errors.first(), parsed.resources.len()) {
        (None, 1) => Ok(parsed.resources.remove(0)),
        (Some(e), _) => Err(e.to_string()),
        (None, n) => Err(format!("{n} resources")),
    }
}

fn node(id: &str, ns: &str, labels: &[(&str, &str)], ports: &[(&str, u16)]) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        cluster: format!("{id}.{ns}"),
        name: id.into(),
        namespace: ns.into(),
        // Every workload is in the mesh (mTLS), as injected pods are.
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .chain([("security.istio.io/tlsMode".to_string(), "istio".to_string())])
            .collect(),
        ports: ports
            .iter()
            .map(|(n, p)| PortInfo { name: (*n).into(), port: *p, protocol: "TCP".into(), app_protocol: None })
            .collect(),
        ..NodeInfo::default()
    }
}

/// Two reviews sidecars (selected by the maximal Sidecar, PeerAuthentication, ...), a
/// productpage client in the same namespace, a client in another namespace (exportTo),
/// the ratings backend and the ingress gateway.
fn proxies() -> Vec<NodeInfo> {
    let reviews = [("http", 9080), ("grpc-api", 9090), ("tcp-db", 3306)];
    let mut gateway = node(
        "router~127.0.0.1~ingress.istio-system~istio-system.svc.cluster.local",
        "istio-system",
        &[("istio", "ingressgateway")],
        &[],
    );
    gateway.gateway_ports = BTreeMap::from([(80, 0), (443, 0), (3306, 0), (3307, 0), (8443, 0), (9443, 0)]);
    // A second gateway: what a Gateway's selector tells apart.
    let mut egress = node(
        "router~127.0.0.2~egress.istio-system~istio-system.svc.cluster.local",
        "istio-system",
        &[("istio", "egressgateway")],
        &[],
    );
    egress.gateway_ports = gateway.gateway_ports.clone();
    vec![
        node("reviews-v1", "default", &[("app", "reviews"), ("version", "v1")], &reviews),
        node("reviews-v2", "default", &[("app", "reviews"), ("version", "v2")], &reviews),
        // Localities: the client in region1/zone1, ratings in region1/zone2 (what
        // `localityLbSetting` rules act on).
        node(
            "productpage-v1",
            "default",
            &[
                ("app", "productpage"),
                ("version", "v1"),
                ("topology.kubernetes.io/region", "region1"),
                ("topology.kubernetes.io/zone", "zone1"),
            ],
            &[("http", 9080)],
        ),
        // The same app in another namespace: what tells `sourceNamespace` from `sourceLabels`.
        node("productpage-other", "other", &[("app", "productpage"), ("version", "v1")], &[("http", 9080)]),
        node(
            "ratings-v1",
            "default",
            &[
                ("app", "ratings"),
                ("version", "v1"),
                ("topology.kubernetes.io/region", "region1"),
                ("topology.kubernetes.io/zone", "zone2"),
            ],
            &[("http", 9080), ("http-alt", 9081), ("tls", 9443)],
        ),
        // The maximal Service's workload: its targetPort differs from its port.
        node("details-v1", "default", &[("app", "details"), ("version", "v1")], &[("http", 19080)]),
        node("sleep", "other", &[("app", "sleep")], &[("http", 80)]),
        gateway,
        egress,
    ]
}

fn registry() -> Registry {
    let r = Registry::new();
    for (i, n) in proxies().into_iter().enumerate() {
        r.upsert(Workload {
            id: n.id.clone(),
            name: n.name.clone(),
            namespace: n.namespace.clone(),
            labels: n.labels.clone(),
            service_account: n.labels.get("app").cloned().unwrap_or_else(|| "ingress".into()),
            ports: n.ports.clone(),
            addresses: vec![format!("10.0.0.{}", i + 1).parse().unwrap()],
            inbound: Some(format!("127.0.0.1:{}", 17000 + i).parse().unwrap()),
            ready: true,
            connected_since: SystemTime::UNIX_EPOCH,
            source: WorkloadSource::Proxy,
        });
    }
    r
}

struct Mesh {
    base: Vec<Resource>,
    registry: Registry,
    proxies: Vec<NodeInfo>,
    tracing: weft_control::meshconfig::MeshTracing,
}

impl Mesh {
    fn new() -> Mesh {
        let parsed = weft_api::parse_str(MESH, Path::new("mesh.yaml"));
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        Mesh {
            base: parsed.resources,
            registry: registry(),
            proxies: proxies(),
            tracing: weft_control::meshconfig::MeshConfigFile::parse(MESH_CONFIG).unwrap().tracing,
        }
    }

    /// Every proxy's xDS in both modes, in a form that compares equal when the
    /// configuration is ([`canonical`]).
    fn xds(&self, resources: Vec<Resource>) -> Vec<String> {
        self.translate(resources).iter().map(canonical).collect()
    }

    /// Whether some proxy's xDS with `resources` differs from `base` (raw) / `canon`
    /// ([`canonical`]): proxies are translated one by one and the first real
    /// difference ends the walk.
    fn differs(&self, resources: Vec<Resource>, base: &[ProxyXds], canon: &[String]) -> bool {
        let mut all = self.base.clone();
        all.extend(resources);
        let mesh =
            MeshConfig { resources: all, tracing: self.tracing.clone(), jwks: fetched_jwks(), ..MeshConfig::default() };
        let snapshot = self.registry.snapshot();
        let mut i = 0;
        for mode in [ProxyMode::Explicit, ProxyMode::Transparent] {
            for n in &self.proxies {
                let x = translate(&mesh, &snapshot, n, mode);
                if x != base[i] && canonical(&x) != canon[i] {
                    return true;
                }
                i += 1;
            }
        }
        false
    }

    fn translate(&self, resources: Vec<Resource>) -> Vec<ProxyXds> {
        let mut all = self.base.clone();
        all.extend(resources);
        let mesh =
            MeshConfig { resources: all, tracing: self.tracing.clone(), jwks: fetched_jwks(), ..MeshConfig::default() };
        let snapshot = self.registry.snapshot();
        let mut out = Vec::new();
        for mode in [ProxyMode::Explicit, ProxyMode::Transparent] {
            for n in &self.proxies {
                out.push(translate(&mesh, &snapshot, n, mode));
            }
        }
        out
    }
}

/// The lines of the Debug form of `x`, sorted: protobuf maps (a route's
/// `typed_per_filter_config`, the JWT filter's `providers`) are `HashMap`s, printed and
/// encoded in an order that differs from one translation to the next. Removing a field
/// changes some line's text. Sorting hides order, so the order that matters (network
/// filters per chain, HTTP filters and inline routes of each connection manager, routes
/// of each route configuration) is appended as it is.
fn canonical(x: &ProxyXds) -> String {
    use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        http_connection_manager::RouteSpecifier, HttpConnectionManager,
    };
    use prost::Message;
    let text = format!("{x:#?}");
    let mut lines: Vec<&str> = text.lines().map(str::trim).collect();
    lines.sort_unstable();
    let mut out = lines.join("\n");
    for l in &x.listeners {
        for c in &l.filter_chains {
            let names: Vec<&str> = c.filters.iter().map(|f| f.name.as_str()).collect();
            out.push_str(&format!("\norder {} {}: {names:?}", l.name, c.name));
            for f in &c.filters {
                let Some(ConfigType::TypedConfig(a)) = &f.config_type else { continue };
                if !a.type_url.ends_with(".HttpConnectionManager") {
                    continue;
                }
                let Ok(h) = HttpConnectionManager::decode(a.value.as_slice()) else { continue };
                let filters: Vec<&str> = h.http_filters.iter().map(|f| f.name.as_str()).collect();
                out.push_str(&format!("\norder {} {} http: {filters:?}", l.name, c.name));
                if let Some(RouteSpecifier::RouteConfig(rc)) = &h.route_specifier {
                    for v in &rc.virtual_hosts {
                        let routes: Vec<&str> = v.routes.iter().map(|r| r.name.as_str()).collect();
                        out.push_str(&format!("\norder {} {} {}: {routes:?}", l.name, c.name, v.name));
                    }
                }
            }
        }
    }
    for rc in &x.routes {
        for v in &rc.virtual_hosts {
            let routes: Vec<&str> = v.routes.iter().map(|r| r.name.as_str()).collect();
            out.push_str(&format!("\norder {} {}: {routes:?}", rc.name, v.name));
        }
    }
    out
}

/// `text` names `path` as a field: followed by neither a name character nor `[`.
fn names(text: &str, path: &str) -> bool {
    text.match_indices(path).any(|(i, _)| {
        let next = text[i + path.len()..].chars().next();
        !next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '[')
    })
}

/// A different value of the same type, for a field that cannot be removed.
fn changed(v: &Value) -> Option<Value> {
    match v {
        Value::Bool(b) => Some(Value::Bool(!b)),
        Value::Number(n) => match n.as_u64() {
            Some(u) => Some(Value::from(u + 1)),
            None => n.as_f64().map(|f| Value::from(f / 2.0)),
        },
        Value::String(s) => {
            let secs = s.strip_suffix('s')?.parse::<u64>().ok()?;
            Some(Value::String(format!("{}s", secs + 1)))
        }
        _ => None,
    }
}

fn allowed(kind: Kind, normalized: &str) -> Option<&'static str> {
    ALLOWED
        .iter()
        .find(|(k, p, _)| {
            *k == kind && normalized.strip_prefix(p).is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        })
        .map(|a| a.2)
}

#[test]
fn every_field_of_every_kind_is_applied_or_warned() {
    let mesh = Mesh::new();
    let docs = docs();
    let resources: Vec<Resource> = docs.iter().map(|d| d.resource.clone()).collect();
    let baseline = mesh.xds(resources.clone());
    let baseline_raw = mesh.translate(resources.clone());
    for (a, b) in baseline.iter().zip(mesh.xds(resources.clone())) {
        let diff: Vec<(&str, &str)> = a.lines().zip(b.lines()).filter(|(x, y)| x != y).take(5).collect();
        assert!(diff.is_empty(), "translation is deterministic: {diff:#?}");
    }
    let messages = weft_api::analyze::analyze(&resources);

    let mut report: BTreeMap<(Kind, String), Vec<String>> = BTreeMap::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    // `WEFT_FIELDS_KIND=VirtualService` probes one kind only (while triaging).
    let only = std::env::var("WEFT_FIELDS_KIND").ok();
    let probed_kind = |k: Kind| only.as_deref().is_none_or(|o| o == k.id());
    // Every probe (a resource without one of its fields, or with it changed) is
    // translated on its own thread share; verdicts are then given in path order, since a
    // field that cannot be removed takes its parent's verdict.
    let jobs: Vec<(usize, FieldPath)> = docs
        .iter()
        .enumerate()
        .filter(|(_, doc)| probed_kind(doc.kind))
        .flat_map(|(d, doc)| {
            let spec = FieldPath(vec![Segment::Key("spec".into())]);
            doc.value.get("spec").map(|v| fields::paths(v, &spec)).unwrap_or_default().into_iter().map(move |p| (d, p))
        })
        .collect();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8);
    let outcomes: Vec<Option<bool>> = std::thread::scope(|scope| {
        let chunks: Vec<_> = jobs
            .chunks(jobs.len().div_ceil(threads).max(1))
            .map(|chunk| {
                let (docs, resources, mesh, base, canon) = (&docs, &resources, &mesh, &baseline_raw, &baseline);
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|(d, path)| {
                            let doc = &docs[*d];
                            let mut variant = doc.value.clone();
                            fields::remove(&mut variant, path);
                            let mut probed = parse(&variant, &doc.file);
                            if probed.is_err() {
                                let mut v = doc.value.clone();
                                let slot = fields::get_mut(&mut v, path).unwrap();
                                if let Some(c) = changed(slot) {
                                    *slot = c;
                                    probed = parse(&v, &doc.file);
                                }
                            }
                            probed.ok().map(|r| {
                                let mut rs = resources.clone();
                                rs[*d] = r;
                                mesh.differs(rs, base, canon)
                            })
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        chunks.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let mut verdicts: BTreeMap<(usize, FieldPath), Verdict> = BTreeMap::new();
    // Per field (kind, path with `[]`): whether some instance is applied, warned or
    // allowed, and the instances found ignored.
    let mut instances: BTreeMap<(Kind, String), (bool, Vec<String>)> = BTreeMap::new();
    for ((d, path), outcome) in jobs.iter().zip(outcomes) {
        let doc = &docs[*d];
        {
            let own = doc.resource.key();
            let warned = || {
                messages.iter().any(|m| {
                    let at = path.to_string();
                    let below = m.text.contains(&format!("{at}.")) || m.text.contains(&format!("{at}["));
                    // WFT0022: the whole resource is reported as not applied.
                    m.resource == own
                        && (m.code == "WFT0022"
                            || below
                            || path.ancestors().filter(|a| a.0.len() > 1).any(|a| names(&m.text, &a.to_string())))
                })
            };
            let verdict = match outcome {
                Some(applied) => {
                    if applied {
                        Verdict::Applied
                    } else if warned() {
                        Verdict::Warned
                    } else if allowed(doc.kind, &path.normalized()).is_some() {
                        Verdict::Allowed
                    } else {
                        Verdict::Ignored
                    }
                }
                None => path.ancestors().skip(1).find_map(|a| verdicts.get(&(*d, a)).copied()).unwrap_or(if warned() {
                    Verdict::Warned
                } else {
                    Verdict::Required
                }),
            };
            verdicts.insert((*d, path.clone()), verdict);
            *counts.entry(format!("{verdict:?}")).or_default() += 1;
            let seen = instances.entry((doc.kind, path.normalized())).or_default();
            seen.0 |= matches!(verdict, Verdict::Applied | Verdict::Warned | Verdict::Allowed);
            if verdict == Verdict::Ignored {
                seen.1.push(format!("{} {path}", own));
            }
        }
    }
    // A field is applied when removing it changes some proxy's xDS in at least one of
    // the maximal resources: an instance can be a no-op where its value equals what
    // would be inherited (a subset's policy equal to the rule's), and the same field
    // elsewhere shows it is translated. Fields at different places (`spec.trafficPolicy`
    // and `spec.subsets[].trafficPolicy`) are different fields.
    for (key, (covered, ignored)) in instances {
        if !covered && !ignored.is_empty() {
            report.insert(key, ignored);
        }
    }
    eprintln!("field paths probed: {counts:?}");
    let ignored: Vec<String> = report.iter().map(|((k, p), at)| format!("{k} {p}  (e.g. {})", at[0])).collect();
    assert!(
        ignored.is_empty(),
        "{} fields are neither applied (no proxy's xDS changes without them) nor warned by `weft analyze`:\n{}",
        ignored.len(),
        ignored.join("\n")
    );
}
