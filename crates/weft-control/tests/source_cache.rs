//! The control plane's per-proxy translation cache against registry changes: a workload
//! no Service selects (a client, a job) coming and going keeps every cached translation;
//! a workload a Service selects invalidates them, and its endpoint shows up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use weft_control::registry::{Registry, Workload, WorkloadSource};
use weft_control::source::MeshXdsSource;
use weft_control::store::ResourceStore;
use weft_control::translate::{MeshConfig, ProxyMode};
use weft_xds::{type_url, NodeInfo, PortInfo};

const MESH: &str = "apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
";

fn workload(id: &str, app: &str, addr: SocketAddr) -> Workload {
    Workload {
        id: id.into(),
        name: id.into(),
        namespace: "default".into(),
        labels: BTreeMap::from([("app".into(), app.into())]),
        service_account: app.into(),
        ports: vec![PortInfo { name: "http".into(), port: 9080, protocol: "TCP".into(), app_protocol: None }],
        addresses: vec![addr.ip()],
        inbound: Some(addr),
        ready: true,
        connected_since: SystemTime::now(),
        source: WorkloadSource::Proxy,
    }
}

fn endpoint_count(source: &MeshXdsSource, node: &envoy_types::pb::envoy::config::core::v3::Node) -> usize {
    let types = source.proxy_resources(node);
    let (_, by_name) = types.get(type_url::ENDPOINT).expect("endpoints");
    let any = by_name.get("outbound|9080||reviews.default.svc.cluster.local").expect("reviews endpoints");
    let cla: envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment =
        prost::Message::decode(any.value.as_slice()).expect("a ClusterLoadAssignment");
    cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum()
}

#[tokio::test]
async fn unselected_workloads_keep_cached_translations_and_selected_ones_refresh_them() {
    let store = ResourceStore::in_memory();
    let applied = store.apply(MESH, Path::new("mesh.yaml"));
    assert!(applied.errors.is_empty(), "{:?}", applied.errors);
    let registry = Registry::new();
    registry.upsert(workload("reviews-1", "reviews", "10.0.0.1:9080".parse().unwrap()));
    let source = MeshXdsSource::new(store, registry.clone(), ProxyMode::Explicit, MeshConfig::default());
    let node =
        NodeInfo { id: "client-1".into(), name: "client-1".into(), namespace: "default".into(), ..Default::default() }
            .to_node();

    let first = source.proxy_resources(&node);
    assert_eq!(endpoint_count(&source, &node), 1);

    // The client itself, which no Service selects, registers (as a connecting proxy
    // does: no inbound address announced), then leaves: the translation is reused.
    let mut client = workload("client-1", "client", "10.0.0.9:9080".parse().unwrap());
    client.inbound = None;
    registry.upsert(client);
    assert!(Arc::ptr_eq(&first, &source.proxy_resources(&node)), "an unselected workload re-translated the mesh");
    registry.remove("client-1");
    assert!(Arc::ptr_eq(&first, &source.proxy_resources(&node)), "an unselected workload re-translated the mesh");

    // A second reviews instance is an endpoint: the translation is redone and has it.
    registry.upsert(workload("reviews-2", "reviews", "10.0.0.2:9080".parse().unwrap()));
    let second = source.proxy_resources(&node);
    assert!(!Arc::ptr_eq(&first, &second), "a selected workload must refresh the translation");
    assert_eq!(endpoint_count(&source, &node), 2);

    // Its readiness flipping is a change too.
    let mut not_ready = workload("reviews-2", "reviews", "10.0.0.2:9080".parse().unwrap());
    not_ready.ready = false;
    registry.upsert(not_ready);
    assert_eq!(endpoint_count(&source, &node), 1);
}

fn client_node(name: &str, app: &str) -> envoy_types::pb::envoy::config::core::v3::Node {
    NodeInfo {
        id: format!("{name}.default"),
        name: name.into(),
        namespace: "default".into(),
        labels: BTreeMap::from([("app".into(), app.into())]),
        ..Default::default()
    }
    .to_node()
}

/// The translation cache never holds more shapes than its bound: beyond it the least
/// recently used goes; shapes no connected proxy has are dropped; the counters say so.
#[tokio::test]
async fn translation_cache_is_bounded_lru_and_drops_shapes_of_departed_proxies() {
    let store = ResourceStore::in_memory();
    assert!(store.apply(MESH, Path::new("mesh.yaml")).errors.is_empty());
    let source = MeshXdsSource::new(store, Registry::new(), ProxyMode::Explicit, MeshConfig::default());
    assert_eq!(source.cache_stats().bound, weft_control::source::DEFAULT_CACHE_BOUND);
    source.set_cache_bound(3);

    // Five shapes (one label apart), one after the other: never more than three held.
    let nodes: Vec<_> = (0..5).map(|i| client_node(&format!("c{i}"), &format!("app-{i}"))).collect();
    let first = source.proxy_resources(&nodes[0]);
    for node in &nodes[1..3] {
        source.proxy_resources(node);
    }
    // c0 is used again, so c1 is now the least recently used.
    assert!(Arc::ptr_eq(&first, &source.proxy_resources(&nodes[0])));
    for node in &nodes[3..] {
        source.proxy_resources(node);
        assert!(source.cache_stats().entries <= 3, "{:?}", source.cache_stats());
    }
    let stats = source.cache_stats();
    assert_eq!((stats.entries, stats.evicted_lru, stats.misses, stats.hits), (3, 2, 5, 1), "{stats:?}");
    assert!(Arc::ptr_eq(&first, &source.proxy_resources(&nodes[0])), "the recently used shape was evicted");
    assert_eq!(source.cache_stats().hits, 2);

    // A second proxy of c0's shape shares its entry; when only it is connected, every
    // other shape goes.
    let twin = client_node("c0-twin", "app-0");
    assert!(Arc::ptr_eq(&first, &source.proxy_resources(&twin)));
    assert_eq!(source.evict_unused([&twin]), 2);
    let stats = source.cache_stats();
    assert_eq!((stats.entries, stats.evicted_unused), (1, 2), "{stats:?}");
    assert!(Arc::ptr_eq(&first, &source.proxy_resources(&nodes[0])));
    assert_eq!(source.evict_unused([]), 1);
    assert_eq!(source.cache_stats().entries, 0);
}
