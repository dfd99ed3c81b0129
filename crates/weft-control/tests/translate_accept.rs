//! Every feature the translator emits, in both proxy modes, is accepted (ACKed, never
//! NACKed) by a real Envoy 1.40 and by weft's proxy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::util::pack_any;
use tokio::sync::watch;
use weft_control::registry::{Registry, Workload, WorkloadSource};
use weft_control::translate::{translate, MeshConfig, ProxyMode, ProxyXds};
use weft_proxy::bootstrap::Bootstrap;
use weft_proxy::proxy::ProxyHandle;
use weft_xds::{type_url, AdsServer, NodeInfo, PortInfo, StaticSource};

const WAIT: Duration = Duration::from_secs(30);

const RESOURCES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}, {name: grpc-api, port: 9090}, {name: tcp-db, port: 3306}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default, annotations: {weft.dev/retry-budget: "20%,3"}}
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 2s, maxConnectionDuration: 1h, idleTimeout: 90s, tcpKeepalive: {probes: 3, time: 60s, interval: 10s}}
      http: {http2MaxRequests: 50, http1MaxPendingRequests: 10, maxRetries: 3, maxRequestsPerConnection: 100, idleTimeout: 30s, useClientProtocol: true}
    portLevelSettings:
    - port: {number: 9090}
      connectionPool: {http: {maxConcurrentStreams: 100, maxRequestsPerConnection: 1000}}
    outlierDetection: {consecutive5xxErrors: 5, consecutiveGatewayErrors: 3, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50}
    loadBalancer: {consistentHash: {httpCookie: {name: session, ttl: 60s}}}
  subsets:
  - {name: v1, labels: {version: v1}, trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}}
  - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers: {end-user: {exact: jason}, x-canary: {regex: "on|yes"}}
      withoutHeaders: {x-skip: {prefix: ""}}
      queryParams: {debug: {exact: "1"}}
      method: {exact: GET}
      authority: {prefix: reviews}
      uri: {regex: "/api/v[0-9]+/.*"}
      ignoreUriCase: true
    route: [{destination: {host: reviews, subset: v2}, headers: {request: {set: {x-v: "2"}}}}]
    headers: {request: {set: {x-a: "1"}, add: {x-b: "2"}, remove: [x-c]}, response: {add: {x-d: "4"}, remove: [x-e]}}
  - match: [{uri: {prefix: /fault}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 0.5}}, delay: {fixedDelay: 1s, percentage: {value: 10}}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /grpc-fault}}]
    fault: {abort: {grpcStatus: UNAVAILABLE}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new, authority: elsewhere.example, redirectCode: 302, scheme: https, port: 8443}
  - match: [{uri: {exact: /gone}}]
    directResponse: {status: 410, body: {string: gone}}
  - match: [{uri: {prefix: /v1}}]
    rewrite: {uri: /v2, authority: reviews-internal}
    timeout: 3s
    retries: {attempts: 3, perTryTimeout: 1s, retryOn: "gateway-error,connect-failure,503"}
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 25}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {regex: "/whole/.*"}}]
    rewrite: {uri: /replaced}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {regex: "/r/(.*)"}}]
    rewrite: {uriRegexRewrite: {match: "/r/(.*)", rewrite: "/\\1"}}
    route: [{destination: {host: reviews, subset: v1}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews, subset: v2}, weight: 20}
  tcp:
  - match: [{port: 3306}]
    route:
    - {destination: {host: reviews, subset: v1, port: {number: 3306}}, weight: 50}
    - {destination: {host: reviews, subset: v2, port: {number: 3306}}, weight: 50}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: default}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}, {number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: static, namespace: default}
spec:
  hosts: [db.internal.example]
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 10.1.0.1}, {address: 10.1.0.2, weight: 3}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: passthrough, namespace: default}
spec:
  hosts: [any.example.org]
  ports: [{number: 8081, name: http, protocol: HTTP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: front, namespace: default}
spec:
  hosts: [bookinfo.example.com]
  http:
  - route: [{destination: {host: reviews, port: {number: 9080}}}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: default}
spec:
  egress:
  - hosts: ["*/*"]
  - port: {number: 9080, protocol: HTTP, name: http}
    bind: 127.0.0.1
    hosts: ["./*"]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - match: {mode: CLIENT}
    providers: [{name: otel}]
    randomSamplingPercentage: 12.5
    customTags:
      team: {literal: {value: books}}
      host: {environment: {name: HOSTNAME, defaultValue: unknown}}
      user: {header: {name: end-user}}
  - match: {mode: SERVER}
    providers: [{name: zipkin}]
"#;

/// Tracing providers for the Telemetry above: OTLP/gRPC to a STATIC collector,
/// Zipkin to a STRICT_DNS one, OTLP/HTTP as the (unused) default.
const MESH_CONFIG: &str = "
defaultProviders: {tracing: [otel-http]}
extensionProviders:
- {name: otel, opentelemetry: {service: 127.0.0.1, port: 4317}}
- {name: otel-http, opentelemetry: {service: 127.0.0.1, port: 4318, http: {path: /v1/traces, timeout: 2s}}}
- {name: zipkin, zipkin: {service: zipkin.example.com, port: 9411, maxTagLength: 128}}
";

struct ControlPlane {
    source: Arc<StaticSource>,
    server: AdsServer,
    xds: SocketAddr,
    _stop: watch::Sender<bool>,
}

async fn control_plane(x: ProxyXds) -> ControlPlane {
    let source = Arc::new(StaticSource::new());
    for (t, resources) in x.into_resources() {
        source.set(t, resources).unwrap();
    }
    let server = AdsServer::new(source.clone());
    let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let xds = sock.local_addr().unwrap();
    let (stop, mut rx) = watch::channel(false);
    tokio::spawn(server.clone().serve(sock, async move {
        let _ = rx.wait_for(|s| *s).await;
    }));
    ControlPlane { source, server, xds, _stop: stop }
}

fn node() -> NodeInfo {
    NodeInfo {
        id: "reviews-v1".into(),
        cluster: "reviews.default".into(),
        name: "reviews-v1".into(),
        namespace: "default".into(),
        labels: BTreeMap::from([("app".into(), "reviews".into()), ("version".into(), "v1".into())]),
        ports: vec![
            PortInfo { name: "http".into(), port: 9080, protocol: "TCP".into(), app_protocol: None },
            PortInfo { name: "grpc".into(), port: 9090, protocol: "TCP".into(), app_protocol: Some("grpc".into()) },
            PortInfo { name: "tcp-db".into(), port: 3306, protocol: "TCP".into(), app_protocol: None },
        ],
        ..NodeInfo::default()
    }
}

fn registry() -> Registry {
    let r = Registry::new();
    for (i, v) in ["v1", "v2"].iter().enumerate() {
        r.upsert(Workload {
            id: format!("reviews-{v}"),
            name: format!("reviews-{v}"),
            namespace: "default".into(),
            labels: BTreeMap::from([("app".into(), "reviews".into()), ("version".into(), (*v).into())]),
            service_account: "reviews".into(),
            ports: node().ports,
            addresses: vec![format!("10.0.0.{}", i + 1).parse().unwrap()],
            // Listeners are moved to port 0 before serving (see `port_zero`).
            inbound: Some("127.0.0.1:17000".parse().unwrap()),
            ready: true,
            connected_since: SystemTime::UNIX_EPOCH,
            source: WorkloadSource::Proxy,
        });
    }
    r
}

/// Tests bind port 0: moves every listener the translator binds on a fixed port
/// (15001, 15006, Sidecar egress ports) to 127.0.0.1:0, keeping everything else.
fn port_zero(mut x: ProxyXds) -> ProxyXds {
    for l in &mut x.listeners {
        let unbound = l.bind_to_port.is_some_and(|b| !b.value);
        if !unbound {
            l.address = Some(weft_xds::build::address("127.0.0.1:0".parse().unwrap()));
        }
    }
    x
}

fn xds(mode: ProxyMode) -> ProxyXds {
    let parsed = weft_api::parse_str(RESOURCES, Path::new("all.yaml"));
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let tracing = weft_control::meshconfig::MeshConfigFile::parse(MESH_CONFIG).unwrap().tracing;
    let mesh = MeshConfig { resources: parsed.resources, tracing, ..MeshConfig::default() };
    port_zero(translate(&mesh, &registry().snapshot(), &node(), mode))
}

/// Waits until the connection of `node_id` has ACKed the current version of every
/// type it subscribed to, failing on any NACK.
async fn all_acked(cp: &ControlPlane, node_id: &str, min_types: usize) -> Result<(), String> {
    let mut changes = cp.server.status_changes();
    let r = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(c) = cp.server.connections().into_iter().find(|c| c.node_id == node_id) {
                if let Some((t, s)) = c.types.iter().find(|(_, s)| s.last_nack.is_some()) {
                    return Err(format!("{node_id} NACKed {t}: {:?}", s.last_nack));
                }
                let done = c.types.len() >= min_types
                    && c.types.iter().all(|(t, s)| s.acked_version.as_deref() == Some(cp.source.version(t).as_str()));
                if done {
                    return Ok(());
                }
            }
            let _ = changes.changed().await;
        }
    })
    .await;
    r.unwrap_or_else(|_| Err(format!("{node_id} did not ACK everything: {:?}", cp.server.connections())))
}

async fn envoy_accepts(mode: ProxyMode) {
    let x = xds(mode);
    let listeners: Vec<String> = x.listeners.iter().map(|l: &Listener| l.name.clone()).collect();
    let cp = control_plane(x).await;
    let envoy =
        weft_testkit::envoy::Envoy::start(&weft_testkit::envoy::ads_bootstrap(cp.xds, "envoy", false)).await.unwrap();
    if let Err(e) = all_acked(&cp, "envoy", 4).await {
        panic!("{e}\n{}", envoy.log_tail());
    }
    // Envoy really runs every listener (none rejected at bind time).
    let dump = envoy.admin_get("/listeners").await.unwrap();
    for name in listeners {
        assert!(dump.contains(&name), "Envoy lacks listener {name}: {dump}");
    }
}

async fn weft_accepts(mode: ProxyMode) {
    let cp = control_plane(xds(mode)).await;
    let text = format!(
        "node:\n  id: weft\n  cluster: reviews.default\n  name: reviews-v1\n  namespace: default\nxds:\n  address: http://{}\n  mode: sotw\nadmin: 127.0.0.1:0\nmetrics: 127.0.0.1:0\naccess_log: \"off\"\ndrain_timeout: 1s\n",
        cp.xds
    );
    let p = ProxyHandle::start(Bootstrap::parse(&text, Path::new("weft.yaml")).unwrap()).await.unwrap();
    assert!(p.wait_ready(WAIT).await);
    all_acked(&cp, "weft", 4).await.unwrap();
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_acks_explicit_mode_xds_with_every_feature() {
    envoy_accepts(ProxyMode::Explicit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_acks_transparent_mode_xds_with_every_feature() {
    envoy_accepts(ProxyMode::Transparent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_proxy_acks_explicit_mode_xds_with_every_feature() {
    weft_accepts(ProxyMode::Explicit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_proxy_acks_transparent_mode_xds_with_every_feature() {
    weft_accepts(ProxyMode::Transparent).await;
}

#[test]
fn every_resource_packs_to_its_type_url() {
    let res = xds(ProxyMode::Transparent).into_resources();
    for (t, list) in &res {
        assert!(!list.is_empty(), "no {t}");
        assert!(list.iter().all(|a| &a.type_url == t));
    }
    let _ = pack_any(envoy_types::pb::envoy::config::listener::v3::Listener::default());
    assert!(res.contains_key(type_url::ENDPOINT));
}

/// What Envoy and weft ACK above includes tracing: OTLP/gRPC on the outbound connection
/// managers, Zipkin on the inbound ones, and both collector clusters.
#[test]
fn the_accepted_xds_carries_tracing_in_both_directions() {
    use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
    use envoy_types::pb::envoy::config::listener::v3::filter;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
    use prost::Message;
    for mode in [ProxyMode::Explicit, ProxyMode::Transparent] {
        let x = xds(mode);
        let mut providers = std::collections::BTreeSet::new();
        for l in &x.listeners {
            for f in l.filter_chains.iter().flat_map(|c| &c.filters) {
                let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else { continue };
                let Ok(hcm) = HttpConnectionManager::decode(any.value.as_slice()) else { continue };
                if f.name != "envoy.filters.network.http_connection_manager" {
                    continue;
                }
                let inbound = l.traffic_direction == TrafficDirection::Inbound as i32;
                let p = hcm.tracing.and_then(|t| t.provider).map(|p| p.name).unwrap_or_default();
                providers.insert((inbound, p));
            }
        }
        assert_eq!(
            providers,
            [(false, "envoy.tracers.opentelemetry".to_string()), (true, "envoy.tracers.zipkin".to_string())].into(),
            "{mode:?}"
        );
        assert!(x.cluster("outbound|4317||127.0.0.1").is_some());
        assert!(x.cluster("outbound|9411||zipkin.example.com").is_some());
    }
}
