use super::*;

fn options() -> EnvoyBootstrapOptions {
    EnvoyBootstrapOptions {
        join_token: None,
        name: "reviews-1".into(),
        namespace: "shop".into(),
        labels: parse_labels("app=reviews,version=v1").unwrap(),
        service_account: "reviews".into(),
        ports: parse_ports("http:9080,grpc-x:9090/grpc").unwrap(),
        instance_ip: "10.1.2.3".parse().unwrap(),
        xds: "127.0.0.1:15010".parse().unwrap(),
        admin_port: 15000,
        cluster_id: "Kubernetes".into(),
        delta: false,
        inbound: None,
        outbound: None,
    }
}

#[test]
fn labels_parse_and_errors_name_the_item() {
    let got = parse_labels(" app=x , version=v1,example.com/tier=,a.b_c-d=E.f").unwrap();
    let want: BTreeMap<String, String> =
        [("app", "x"), ("version", "v1"), ("example.com/tier", ""), ("a.b_c-d", "E.f")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    assert_eq!(got, want);
    assert!(parse_labels("").unwrap().is_empty());
    let cases = [
        ("app", "label 1 \"app\": expected key=value"),
        ("app=x,=y", "label 2 \"=y\": key \"\" has an empty name"),
        ("app=x,app=y", "label 2 \"app=y\": key \"app\" is given twice"),
        ("app=x y", "label 1 \"app=x y\": value \"x y\" contains ' '"),
        ("-app=x", "key \"-app\" must start and end with a letter or digit"),
        ("Bad_Prefix/app=x", "key \"Bad_Prefix/app\" has prefix \"Bad_Prefix\" that is not a DNS subdomain"),
        ("app=x,", "label 2 \"\": expected key=value"),
    ];
    for (input, want) in cases {
        let err = parse_labels(input).unwrap_err();
        assert!(err.contains(want), "{input:?}: got {err:?}, want it to contain {want:?}");
    }
    let long = format!("app={}", "v".repeat(64));
    assert!(parse_labels(&long).unwrap_err().contains("64 characters long, at most 63"));
}

#[test]
fn ports_parse_and_errors_name_the_item() {
    let got = parse_ports("http:9080, grpc-x:9090/grpc,tcp:1/kubernetes.io/h2c").unwrap();
    assert_eq!(
        got,
        vec![
            PortInfo { name: "http".into(), port: 9080, protocol: "TCP".into(), app_protocol: None },
            PortInfo { name: "grpc-x".into(), port: 9090, protocol: "TCP".into(), app_protocol: Some("grpc".into()) },
            PortInfo {
                name: "tcp".into(),
                port: 1,
                protocol: "TCP".into(),
                app_protocol: Some("kubernetes.io/h2c".into())
            },
        ]
    );
    assert!(parse_ports(" ").unwrap().is_empty());
    let cases = [
        ("9080", "port 1 \"9080\": expected name:port[/appProtocol]"),
        ("http:80,web:x80", "port 2 \"web:x80\": \"x80\" is not a port number (1..=65535)"),
        ("http:0", "port 0 is not in 1..=65535"),
        ("http:70000", "port 70000 is not in 1..=65535"),
        ("HTTP:80", "name \"HTTP\" contains 'H'"),
        (":80", "name \"\" is empty"),
        ("123:80", "name \"123\" must contain a letter"),
        ("a--b:80", "must not start or end with '-' or contain \"--\""),
        ("http-very-long-name:80", "is 19 characters long, at most 15"),
        ("http:80,http:81", "port 2 \"http:81\": name \"http\" is given twice"),
        ("http:80,web:80", "port 2 \"web:80\": port 80 is given twice"),
        ("http:80/", "appProtocol \"\" must be non-empty"),
    ];
    for (input, want) in cases {
        let err = parse_ports(input).unwrap_err();
        assert!(err.contains(want), "{input:?}: got {err:?}, want it to contain {want:?}");
    }
}

#[test]
fn render_writes_istio_node_and_weft_metadata() {
    let o = options();
    let yaml: serde_json::Value = serde_yaml_ng::from_str(&render(&o)).unwrap();
    assert_eq!(yaml["node"]["id"], "sidecar~10.1.2.3~reviews-1.shop~shop.svc.cluster.local");
    assert_eq!(yaml["node"]["cluster"], "reviews.shop");
    assert_eq!(yaml["node"]["metadata"]["CLUSTER_ID"], "Kubernetes");
    assert_eq!(yaml["node"]["metadata"]["LABELS"]["version"], "v1");
    assert_eq!(yaml["node"]["metadata"]["INSTANCE_IPS"], "10.1.2.3");
    assert_eq!(yaml["admin"]["address"]["socket_address"]["port_value"], 15000);
    assert_eq!(yaml["dynamic_resources"]["ads_config"]["api_type"], "GRPC");
    let ep = &yaml["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0];
    assert_eq!(ep["endpoint"]["address"]["socket_address"]["port_value"], 15010);

    // The metadata, read back as a Node, parses into exactly the announced identity.
    let metadata = &yaml["node"]["metadata"];
    let fields = metadata
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), json_to_value(v)))
        .collect::<std::collections::HashMap<_, _>>();
    let node = envoy_types::pb::envoy::config::core::v3::Node {
        id: o.node_id(),
        cluster: o.node_cluster(),
        metadata: Some(Struct { fields }),
        ..Default::default()
    };
    let info = NodeInfo::from_node(&node).unwrap();
    assert_eq!(info, NodeInfo { cluster: "reviews.shop".into(), ..o.node_info() });

    let delta = EnvoyBootstrapOptions { delta: true, labels: BTreeMap::new(), ..options() };
    let yaml: serde_json::Value = serde_yaml_ng::from_str(&render(&delta)).unwrap();
    assert_eq!(yaml["dynamic_resources"]["ads_config"]["api_type"], "DELTA_GRPC");
    assert_eq!(yaml["node"]["cluster"], "reviews-1.shop", "no app label: the name");
}

fn json_to_value(v: &serde_json::Value) -> Value {
    let kind = match v {
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Object(m) => {
            Kind::StructValue(Struct { fields: m.iter().map(|(k, v)| (k.clone(), json_to_value(v))).collect() })
        }
        other => panic!("unexpected metadata value {other}"),
    };
    Value { kind: Some(kind) }
}
