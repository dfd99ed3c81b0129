//! NodeInfo <-> Envoy Node metadata (Istio keys).
#![allow(clippy::unwrap_used)] // test crate: a failed unwrap is a failed test

mod common;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Struct, Value};
use weft_xds::NodeInfo;

fn string(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.to_string())) }
}

fn meta_str<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    match node.metadata.as_ref()?.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s),
        _ => None,
    }
}

/// A node built with only the given metadata fields.
fn node_with(fields: &[(&str, Value)]) -> Node {
    Node {
        id: "n1".to_string(),
        metadata: Some(Struct { fields: fields.iter().map(|(k, v)| (k.to_string(), v.clone())).collect() }),
        ..Default::default()
    }
}

#[test]
fn node_info_round_trips_through_node_metadata() {
    let info = common::node_info();
    let node = info.to_node();
    assert_eq!(NodeInfo::from_node(&node), Ok(info));
}

#[test]
fn workload_name_and_cluster_id_are_their_own_keys_and_round_trip() {
    let info = NodeInfo {
        cluster: "reviews.default".into(),
        workload_name: "reviews-v2".into(),
        cluster_id: "east".into(),
        ..common::node_info()
    };
    let node = info.to_node();
    assert_eq!(meta_str(&node, "NAME"), Some("pod-1"));
    assert_eq!(meta_str(&node, "WORKLOAD_NAME"), Some("reviews-v2"));
    assert_eq!(meta_str(&node, "CLUSTER_ID"), Some("east"));
    assert_eq!(node.cluster, "reviews.default");
    assert_eq!(NodeInfo::from_node(&node), Ok(info));
    // Without a workload name the instance name is announced (as Istio's agent does for
    // a bare pod) and reads back as "not set".
    let bare = common::node_info();
    let node = bare.to_node();
    assert_eq!(meta_str(&node, "WORKLOAD_NAME"), Some("pod-1"));
    assert_eq!(NodeInfo::from_node(&node).map(|n| n.workload_name), Ok(String::new()));
}

#[test]
fn to_node_writes_istio_keys() {
    let node = common::node_info().to_node();
    assert_eq!(node.id, common::NODE_ID);
    assert_eq!(meta_str(&node, "NAME"), Some("pod-1"));
    assert_eq!(meta_str(&node, "NAMESPACE"), Some("default"));
    assert_eq!(meta_str(&node, "SERVICE_ACCOUNT"), Some("bookinfo-reviews"));
    assert_eq!(meta_str(&node, "INSTANCE_IPS"), Some("10.0.0.1,fd00::1"));
    assert_eq!(meta_str(&node, "CLUSTER_ID"), Some("Kubernetes"));
    let ports: serde_json::Value = serde_json::from_str(meta_str(&node, "POD_PORTS").unwrap_or("")).unwrap();
    assert_eq!(
        ports,
        serde_json::json!([
            {"name": "http", "containerPort": 9080, "protocol": "TCP", "appProtocol": "http"},
            {"name": "metrics", "containerPort": 15020, "protocol": "TCP"}
        ])
    );
    let labels = match node.metadata.as_ref().and_then(|m| m.fields.get("LABELS")) {
        Some(Value { kind: Some(Kind::StructValue(s)) }) => s.clone(),
        other => panic!("LABELS is not a struct: {other:?}"),
    };
    assert_eq!(labels.fields.get("app"), Some(&string("reviews")));
}

#[test]
fn istio_pod_ports_without_app_protocol_parse() {
    let node = node_with(&[
        ("NAME", string("p")),
        ("NAMESPACE", string("ns")),
        ("POD_PORTS", string(r#"[{"name":"grpc","containerPort":7070,"protocol":"TCP"},{"containerPort":80}]"#)),
    ]);
    let info = NodeInfo::from_node(&node).unwrap();
    assert_eq!(info.ports.len(), 2);
    assert_eq!(info.ports[0].port, 7070);
    assert_eq!(info.ports[0].app_protocol, None);
    assert_eq!(info.ports[1].protocol, "TCP");
}

fn err_of(node: &Node) -> String {
    match NodeInfo::from_node(node) {
        Ok(info) => panic!("accepted garbage: {info:?}"),
        Err(e) => e,
    }
}

#[test]
fn garbage_metadata_gives_precise_errors() {
    let base = [("NAME", string("p")), ("NAMESPACE", string("ns"))];
    let with = |key: &str, value: Value| {
        let mut fields = base.to_vec();
        fields.push((key, value));
        node_with(&fields)
    };
    let number = Value { kind: Some(Kind::NumberValue(3.0)) };

    let no_meta = Node { id: "n1".to_string(), ..Default::default() };
    assert!(err_of(&no_meta).contains("no metadata"));
    assert!(err_of(&Node::default()).contains("empty id"));
    assert!(err_of(&node_with(&[("NAMESPACE", string("ns"))])).contains("NAME is missing"));
    assert!(err_of(&with("SERVICE_ACCOUNT", number.clone())).contains("SERVICE_ACCOUNT must be a string"));
    assert!(err_of(&with("LABELS", string("app=x"))).contains("LABELS must be a struct"));
    let bad_label = Value {
        kind: Some(Kind::StructValue(Struct { fields: [("app".to_string(), number.clone())].into_iter().collect() })),
    };
    assert!(err_of(&with("LABELS", bad_label)).contains("label app must be a string"));
    assert!(err_of(&with("POD_PORTS", string("{not json"))).contains("POD_PORTS is not a JSON list"));
    assert!(err_of(&with("POD_PORTS", string(r#"[{"containerPort":70000}]"#))).contains("containerPort 70000"));
    assert!(err_of(&with("POD_PORTS", string(r#"[{"containerPort":-1}]"#))).contains("POD_PORTS"));
}

#[test]
fn node_info_serde_rejects_unknown_fields() {
    let json = r#"{"id":"a","cluster":"","name":"","namespace":"","labels":{},
        "service_account":"","ports":[],"instance_ips":[],"extra":1}"#;
    assert!(serde_json::from_str::<NodeInfo>(json).is_err());
}

#[test]
fn gateway_ports_and_address_round_trip_and_mark_router_nodes() {
    let mut info = common::node_info();
    info.id = "router~10.0.0.1~ingress-1.istio-system~istio-system.svc.cluster.local".to_string();
    info.gateway_ports = [(8080, 18080), (443, 0)].into_iter().collect();
    info.gateway_address = Some("127.0.0.1".parse().unwrap());
    let node = info.to_node();
    assert_eq!(meta_str(&node, "WEFT_GATEWAY_PORTS"), Some("443=0,8080=18080"));
    assert_eq!(meta_str(&node, "WEFT_GATEWAY_ADDRESS"), Some("127.0.0.1"));
    let back = NodeInfo::from_node(&node).unwrap();
    assert_eq!(back, info);
    assert!(back.is_gateway());
    assert_eq!(back.gateway_port(8080), 18080);
    assert_eq!(back.gateway_port(9090), 9090, "an unmapped server port binds as itself");
    assert!(!common::node_info().is_gateway(), "sidecar~ nodes are not gateways");
}

#[test]
fn bad_gateway_metadata_gives_precise_errors() {
    let with =
        |key: &str, value: &str| node_with(&[("NAME", string("p")), ("NAMESPACE", string("ns")), (key, string(value))]);
    let e = err_of(&with("WEFT_GATEWAY_PORTS", "8080"));
    assert!(e.contains("WEFT_GATEWAY_PORTS entry \"8080\"") && e.contains("SERVER_PORT=LISTEN_PORT"), "{e}");
    let e = err_of(&with("WEFT_GATEWAY_PORTS", "0=80"));
    assert!(e.contains("server port is not in 1..=65535"), "{e}");
    let e = err_of(&with("WEFT_GATEWAY_PORTS", "80=70000"));
    assert!(e.contains("listen port is not in 0..=65535"), "{e}");
    let e = err_of(&with("WEFT_GATEWAY_PORTS", "80=1,80=2"));
    assert!(e.contains("server port 80 is mapped twice"), "{e}");
    let e = err_of(&with("WEFT_GATEWAY_ADDRESS", "localhost"));
    assert!(e.contains("WEFT_GATEWAY_ADDRESS \"localhost\" is not an IP address"), "{e}");
    let ok = NodeInfo::from_node(&with("WEFT_GATEWAY_PORTS", " 80=8080 , 443=8443 ")).unwrap();
    assert_eq!(ok.gateway_ports.len(), 2);
}

#[test]
fn node_locality_becomes_istios_topology_labels_unless_labels_say_where() {
    use envoy_types::pb::envoy::config::core::v3::Locality;
    use weft_xds::node::{REGION_LABEL, SUBZONE_LABEL, ZONE_LABEL};
    let mut node = common::node_info().to_node();
    node.locality = Some(Locality { region: "r1".into(), zone: "z1".into(), sub_zone: "s1".into() });
    let info = NodeInfo::from_node(&node).unwrap();
    assert_eq!(info.labels.get(REGION_LABEL).map(String::as_str), Some("r1"));
    assert_eq!(info.labels.get(ZONE_LABEL).map(String::as_str), Some("z1"));
    assert_eq!(info.labels.get(SUBZONE_LABEL).map(String::as_str), Some("s1"));
    // Labels that already carry a locality win.
    let mut labelled = common::node_info();
    labelled.labels.insert("istio-locality".into(), "r2.z2".into());
    let mut node = labelled.to_node();
    node.locality = Some(Locality { region: "r1".into(), zone: "z1".into(), sub_zone: String::new() });
    assert_eq!(NodeInfo::from_node(&node).unwrap().labels, labelled.labels);
}
