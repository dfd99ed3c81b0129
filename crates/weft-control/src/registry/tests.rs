use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::Value;
use weft_xds::{NodeInfo, PortInfo};

use super::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn workload(id: &str, namespace: &str, pairs: &[(&str, &str)], ready: bool) -> Workload {
    Workload {
        id: id.to_string(),
        name: id.to_string(),
        namespace: namespace.to_string(),
        labels: labels(pairs),
        service_account: "default".to_string(),
        ports: vec![PortInfo { name: "http".into(), port: 8080, protocol: "TCP".into(), app_protocol: None }],
        addresses: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        inbound: None,
        ready,
        connected_since: SystemTime::UNIX_EPOCH,
        source: WorkloadSource::WorkloadEntry(id.to_string()),
    }
}

fn node_with(extra: &[(&str, &str)], instance_ips: &[&str]) -> Node {
    let info = NodeInfo {
        id: "sidecar~10.0.0.7~a.default~default.svc.cluster.local".into(),
        cluster: "a.default".into(),
        name: "a".into(),
        namespace: "default".into(),
        labels: labels(&[("app", "a")]),
        service_account: "sa-a".into(),
        ports: Vec::new(),
        instance_ips: instance_ips.iter().map(|s| s.to_string()).collect(),
        inbound: None,
        outbound: None,
        admin: None,
        metrics: None,
        on_demand: false,
        gateway_ports: Default::default(),
        gateway_address: None,
        ..NodeInfo::default()
    };
    let mut node = info.to_node();
    if let Some(meta) = node.metadata.as_mut() {
        for (k, v) in extra {
            meta.fields.insert(k.to_string(), Value { kind: Some(Kind::StringValue(v.to_string())) });
        }
    }
    node
}

#[test]
fn select_requires_every_label_same_namespace_and_readiness() {
    let registry = Registry::new();
    registry.upsert(workload("a1", "shop", &[("app", "a"), ("version", "v1")], true));
    registry.upsert(workload("a2", "shop", &[("app", "a"), ("version", "v2")], true));
    registry.upsert(workload("a3", "shop", &[("app", "a"), ("version", "v1")], false));
    registry.upsert(workload("a4", "other", &[("app", "a"), ("version", "v1")], true));
    let snap = registry.snapshot();
    let ids = |sel: &[(&str, &str)]| -> Vec<String> {
        snap.select("shop", &labels(sel)).iter().map(|w| w.id.clone()).collect()
    };
    assert_eq!(ids(&[("app", "a")]), vec!["a1", "a2"]);
    assert_eq!(ids(&[("app", "a"), ("version", "v1")]), vec!["a1"]);
    assert_eq!(ids(&[("app", "b")]), Vec::<String>::new());
    assert_eq!(ids(&[("app", "a"), ("missing", "x")]), Vec::<String>::new());
    assert!(snap.select("shop", &BTreeMap::new()).is_empty(), "empty selector selects nothing");
    assert_eq!(snap.workloads().count(), 4);
}

#[test]
fn upsert_and_remove_publish_versions_only_on_change() {
    let registry = Registry::new();
    let rx = registry.changes();
    assert_eq!(*rx.borrow(), 0);
    let w = workload("a1", "shop", &[("app", "a")], true);
    registry.upsert(w.clone());
    assert_eq!(*rx.borrow(), 1);
    registry.upsert(w.clone());
    assert_eq!(*rx.borrow(), 1, "identical upsert is not a change");
    let old = registry.snapshot();
    registry.remove("a1");
    assert_eq!(*rx.borrow(), 2);
    registry.remove("a1");
    assert_eq!(*rx.borrow(), 2, "removing an absent id is not a change");
    assert_eq!(old.get("a1"), Some(&w), "an old snapshot is immutable");
    assert!(registry.snapshot().get("a1").is_none());
    assert_eq!(registry.snapshot().version(), 2);
}

#[test]
fn node_metadata_ready_and_inbound_are_read() {
    let since = SystemTime::UNIX_EPOCH;
    let w = workload_from_node(&node_with(&[], &["10.0.0.7"]), None, since).unwrap();
    assert!(w.ready);
    assert_eq!(w.inbound, None);
    assert_eq!(w.addresses, vec!["10.0.0.7".parse::<IpAddr>().unwrap()]);
    assert_eq!(w.service_account, "sa-a");

    let node = node_with(&[(READY, "false"), (WEFT_INBOUND, "127.0.0.1:15006")], &[]);
    let peer: SocketAddr = "127.0.0.2:40000".parse().unwrap();
    let w = workload_from_node(&node, Some(peer), since).unwrap();
    assert!(!w.ready);
    assert_eq!(w.inbound, Some("127.0.0.1:15006".parse().unwrap()));
    assert_eq!(w.addresses, vec![peer.ip()], "peer IP when no instance IPs");
}

#[test]
fn bad_node_metadata_is_a_precise_error() {
    let since = SystemTime::UNIX_EPOCH;
    let err = workload_from_node(&node_with(&[(READY, "maybe")], &[]), None, since).unwrap_err();
    assert!(err.contains("READY") && err.contains("maybe"), "{err}");
    let err = workload_from_node(&node_with(&[(WEFT_INBOUND, "nope")], &[]), None, since).unwrap_err();
    assert!(err.contains("WEFT_INBOUND") && err.contains("nope"), "{err}");
    let err = workload_from_node(&node_with(&[], &["10.0.0.999"]), None, since).unwrap_err();
    assert!(err.contains("INSTANCE_IPS") && err.contains("10.0.0.999"), "{err}");
    let err = workload_from_node(&node_with(&[], &[]), None, since).unwrap_err();
    assert!(err.contains("peer address is unknown"), "{err}");
    let garbage = Node {
        id: "x".into(),
        metadata: Some(envoy_types::pb::google::protobuf::Struct {
            fields: HashMap::from([("NAME".to_string(), Value { kind: Some(Kind::NumberValue(1.0)) })]),
        }),
        ..Default::default()
    };
    let err = workload_from_node(&garbage, None, since).unwrap_err();
    assert!(err.contains("NAME"), "{err}");
}
