use super::*;

fn inject(text: &str) -> Injected {
    inject_with(text, &InjectConfig::default())
}

fn inject_with(text: &str, cfg: &InjectConfig) -> Injected {
    match inject_manifests(text, Path::new("m.yaml"), cfg) {
        Ok(i) => i,
        Err(e) => panic!("{e}"),
    }
}

fn doc(text: &str) -> serde_json::Value {
    yaml::parse_document(text).unwrap().unwrap().to_json().unwrap()
}

const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  labels:\n    app: web\n    version: v2\nspec:\n  containers:\n  - name: web\n    image: nginx\n    ports:\n    - name: http\n      containerPort: 8080\n    - containerPort: 9090\n      protocol: UDP\n  - name: helper\n    image: busybox\n";

fn names(list: &serde_json::Value) -> Vec<&str> {
    list.as_array().map(|l| l.iter().filter_map(|c| c["name"].as_str()).collect()).unwrap_or_default()
}

#[test]
fn a_pod_gets_the_init_step_the_proxy_first_the_token_volume_and_annotations() {
    let out = doc(&inject(POD).text);
    let spec = &out["spec"];
    assert_eq!(names(&spec["initContainers"]), ["weft-init"]);
    assert_eq!(names(&spec["containers"]), ["weft-proxy", "web", "helper"]);
    assert_eq!(names(&spec["volumes"]), ["istio-token"]);
    let init = &spec["initContainers"][0];
    assert_eq!(init["args"], serde_json::json!(["iptables", "--proxy-uid=1337", "--inbound-ports=*"]));
    assert_eq!(init["securityContext"]["capabilities"]["add"], serde_json::json!(["NET_ADMIN", "NET_RAW"]));
    assert_eq!(init["securityContext"]["runAsUser"], 0);
    assert_eq!(init["securityContext"]["runAsNonRoot"], false);
    let proxy = &spec["containers"][0];
    assert_eq!(proxy["args"], serde_json::json!(["proxy"]));
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    assert_eq!(proxy["readinessProbe"]["httpGet"], serde_json::json!({"path": "/healthz/ready", "port": 15020}));
    assert_eq!(proxy["resources"]["requests"], serde_json::json!({"cpu": "100m", "memory": "128Mi"}));
    assert_eq!(proxy["volumeMounts"][0]["mountPath"], "/var/run/secrets/tokens");
    assert!(proxy.get("restartPolicy").is_none());
    assert_eq!(
        spec["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"],
        serde_json::json!({"audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"})
    );
    let notes = &out["metadata"]["annotations"];
    assert_eq!(notes["kubectl.kubernetes.io/default-container"], "web");
    let status: serde_json::Value = serde_json::from_str(notes[STATUS_ANNOTATION].as_str().unwrap()).unwrap();
    assert_eq!(status["containers"], serde_json::json!(["weft-proxy"]));
    let image = format!("ghcr.io/weft-mesh/weft:{}", env!("CARGO_PKG_VERSION"));
    assert_eq!((&proxy["image"], &init["image"]), (&serde_json::json!(image), &serde_json::json!(image)));
}

/// What Kubernetes does with `$(VAR)` in an env value, given the earlier entries (each
/// variable used must be one of them).
fn expand(value: &str, vars: &[(&str, &str)]) -> String {
    let lookup = |name: &str| {
        let found = vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
        assert!(found.is_some(), "$({name}) is not defined before its use");
        found
    };
    weft_api::spec::expand_vars(value, lookup)
}

#[test]
fn the_proxy_bootstrap_expands_to_the_pods_identity_labels_and_ports() {
    let out = doc(&inject(POD).text);
    let env = out["spec"]["containers"][0]["env"].as_array().unwrap().clone();
    let env_names: Vec<&str> = env.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(env_names, ["POD_NAME", "POD_NAMESPACE", "INSTANCE_IP", "SERVICE_ACCOUNT", "WEFT_BOOTSTRAP_YAML"]);
    assert_eq!(env[2]["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    let text = expand(
        env[4]["value"].as_str().unwrap(),
        &[
            ("POD_NAME", "web-7d9f"),
            ("POD_NAMESPACE", "shop"),
            ("INSTANCE_IP", "10.1.2.3"),
            ("SERVICE_ACCOUNT", "web-sa"),
        ],
    );
    let b = weft_proxy::bootstrap::Bootstrap::parse(&text, Path::new("env")).unwrap();
    assert_eq!(b.node.id, "sidecar~10.1.2.3~web-7d9f.shop~shop.svc.cluster.local");
    assert_eq!((b.node.name.as_str(), b.node.namespace.as_str()), ("web-7d9f", "shop"));
    assert_eq!(b.node.service_account, "web-sa");
    assert_eq!(b.node.labels.get("version").map(String::as_str), Some("v2"));
    assert_eq!(b.node.instance_ips, ["10.1.2.3"]);
    let ports: Vec<(String, u16, String)> =
        b.node.ports.iter().map(|p| (p.name.clone(), p.port, p.protocol.clone())).collect();
    assert_eq!(ports, [("http".into(), 8080, "TCP".into()), ("".into(), 9090, "UDP".into())]);
    assert_eq!(b.xds.address, "http://weft-control.weft-system.svc:15010");
    let id = b.identity.unwrap();
    assert_eq!(id.kubernetes_token_file.unwrap(), Path::new("/var/run/secrets/tokens/istio-token"));
    // A bare pod is its own workload; the cluster id is Istio's default.
    assert_eq!((b.node.workload_name.as_str(), b.node.cluster_id.as_str()), ("web", "Kubernetes"));
}

#[test]
fn the_proxy_bootstrap_names_the_deployment_as_the_workload() {
    let deployment = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: reviews-v2, namespace: shop}}\nspec:\n  template:\n{}",
        POD.lines().skip(2).map(|l| format!("    {l}\n")).collect::<String>()
    );
    let out = doc(&inject(&deployment).text);
    let value = out["spec"]["template"]["spec"]["containers"][0]["env"][4]["value"].as_str().unwrap().to_string();
    let vars = [
        ("POD_NAME", "reviews-v2-7d9c8f6b5-zxgzm"),
        ("POD_NAMESPACE", "shop"),
        ("INSTANCE_IP", "c"),
        ("SERVICE_ACCOUNT", "d"),
    ];
    let b = weft_proxy::bootstrap::Bootstrap::parse(&expand(&value, &vars), Path::new("env")).unwrap();
    assert_eq!((b.node.name.as_str(), b.node.workload()), ("reviews-v2-7d9c8f6b5-zxgzm", "reviews-v2"));
}

#[test]
fn a_dollar_in_inlined_labels_is_escaped_from_kubernetes_expansion() {
    let pod = POD.replace("version: v2", "version: \"$(HOME)\"");
    let out = doc(&inject(&pod).text);
    let value = out["spec"]["containers"][0]["env"][4]["value"].as_str().unwrap().to_string();
    assert!(value.contains(r#""version":"$$(HOME)""#), "{value}");
    let b = weft_proxy::bootstrap::Bootstrap::parse(
        &expand(&value, &[("POD_NAME", "a"), ("POD_NAMESPACE", "b"), ("INSTANCE_IP", "c"), ("SERVICE_ACCOUNT", "d")]),
        Path::new("env"),
    )
    .unwrap();
    assert_eq!(b.node.labels.get("version").map(String::as_str), Some("$(HOME)"));
}

#[test]
fn native_sidecar_goes_after_weft_init_with_restart_policy_always() {
    let cfg = InjectConfig { native_sidecar: true, ..InjectConfig::default() };
    let out = doc(&inject_with(POD, &cfg).text);
    assert_eq!(names(&out["spec"]["initContainers"]), ["weft-init", "weft-proxy"]);
    assert_eq!(out["spec"]["initContainers"][1]["restartPolicy"], "Always");
    assert_eq!(names(&out["spec"]["containers"]), ["web", "helper"]);
    // The annotation decides per pod, both ways.
    let annotated =
        POD.replace("  name: web\n", "  name: web\n  annotations:\n    sidecar.istio.io/nativeSidecar: \"true\"\n");
    assert_eq!(names(&doc(&inject(&annotated).text)["spec"]["initContainers"]), ["weft-init", "weft-proxy"]);
    let off = annotated.replace("\"true\"", "\"false\"");
    assert_eq!(names(&doc(&inject_with(&off, &cfg).text)["spec"]["initContainers"]), ["weft-init"]);
}

#[test]
fn opted_out_host_network_ignored_namespace_and_injected_pods_are_left_byte_for_byte() {
    let cases = [
        POD.replace("    app: web\n", "    app: web\n    sidecar.istio.io/inject: \"false\"\n"),
        POD.replace("  name: web\n", "  name: web\n  annotations:\n    sidecar.istio.io/inject: \"false\"\n"),
        POD.replace("spec:\n", "spec:\n  hostNetwork: true\n"),
        POD.replace("  name: web\n", "  name: web\n  namespace: kube-system\n"),
        inject(POD).text,
    ];
    for (i, c) in cases.iter().enumerate() {
        let out = inject(c);
        assert_eq!(&out.text, c, "case {i}");
        assert_eq!(out.notes.len(), 1, "case {i}: {:?}", out.notes);
    }
    assert!(inject(&cases[0]).notes[0].contains("opted out by the sidecar.istio.io/inject label"));
    assert!(inject(&cases[2]).notes[0].contains("hostNetwork"));
    assert!(inject(&cases[4]).notes[0].contains("already injected"));
    // The label wins over the annotation (Istio's precedence).
    let both = POD
        .replace("    app: web\n", "    app: web\n    sidecar.istio.io/inject: \"true\"\n")
        .replace("  name: web\n", "  name: web\n  annotations:\n    sidecar.istio.io/inject: \"false\"\n");
    assert_ne!(inject(&both).text, both);
}

#[test]
fn traffic_annotations_become_capture_flags_and_bad_ones_name_the_annotation() {
    let annotated = POD.replace(
        "  name: web\n",
        "  name: web\n  annotations:\n    traffic.sidecar.istio.io/includeInboundPorts: \"8080\"\n    traffic.sidecar.istio.io/excludeOutboundPorts: \"5432, 6379\"\n    traffic.sidecar.istio.io/excludeOutboundIPRanges: 169.254.169.254/32\n",
    );
    let out = doc(&inject(&annotated).text);
    assert_eq!(
        out["spec"]["initContainers"][0]["args"],
        serde_json::json!([
            "iptables",
            "--proxy-uid=1337",
            "--inbound-ports=8080",
            "--exclude-outbound-ports=5432,6379",
            "--exclude-outbound-ip-ranges=169.254.169.254/32"
        ])
    );
    let bad = annotated.replace("\"5432, 6379\"", "\"5432,http\"");
    let e = inject_manifests(&bad, Path::new("m.yaml"), &InjectConfig::default()).unwrap_err().to_string();
    assert_eq!(
        e,
        "m.yaml:1: document 1 (Pod \"web\"): annotation traffic.sidecar.istio.io/excludeOutboundPorts: \"http\" is not a port number (1-65535)"
    );
}

#[test]
fn workloads_are_found_in_every_kind_and_list_and_other_documents_pass_untouched() {
    let text = "# leading comment\napiVersion: v1\nkind: ConfigMap   # keep me\ndata:\n  a: yes\n---\n# cron\napiVersion: batch/v1\nkind: CronJob\nmetadata:\n  name: c\nspec:\n  schedule: \"*/1 * * * *\"\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: OnFailure\n          containers:\n          - name: job\n            image: busybox\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: apps/v1\n  kind: DaemonSet\n  metadata: {name: d}\n  spec:\n    template:\n      spec:\n        containers: [{name: d, image: x}]\n- apiVersion: example.com/v1\n  kind: Deployment\n  metadata: {name: not-apps}\n  spec: {template: {spec: {containers: [{name: x}]}}}\n";
    let out = inject(text).text;
    let docs: Vec<&str> = out.split("---\n").collect();
    assert_eq!(docs[0], "# leading comment\napiVersion: v1\nkind: ConfigMap   # keep me\ndata:\n  a: yes\n");
    assert!(docs[1].starts_with("# cron\napiVersion: batch/v1\n"), "{}", docs[1]);
    let cron = doc(docs[1]);
    assert_eq!(cron["spec"]["schedule"], "*/1 * * * *");
    assert_eq!(names(&cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]), ["weft-proxy", "job"]);
    let list = doc(docs[2]);
    assert_eq!(names(&list["items"][0]["spec"]["template"]["spec"]["containers"]), ["weft-proxy", "d"]);
    assert_eq!(names(&list["items"][1]["spec"]["template"]["spec"]["containers"]), ["x"]);
}

#[test]
fn a_workload_without_a_pod_template_or_containers_is_a_precise_error() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: broken\nspec:\n  replicas: 1\n";
    let e = inject_manifests(text, Path::new("app.yaml"), &InjectConfig::default()).unwrap_err().to_string();
    assert_eq!(
        e,
        "app.yaml:5: document 2 (Deployment \"broken\"): spec.template is missing or not a mapping: a Deployment needs a pod template at spec.template"
    );
    let no_containers = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: []\n";
    let e = inject_manifests(no_containers, Path::new("p.yaml"), &InjectConfig::default()).unwrap_err().to_string();
    assert!(e.contains("document 1 (Pod \"p\"): spec.containers is missing or empty"), "{e}");
}

#[test]
fn bad_yaml_names_the_file_and_line() {
    let text = "apiVersion: v1\nkind: Service\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: [oops\n";
    let e = inject_manifests(text, Path::new("bad.yaml"), &InjectConfig::default()).unwrap_err();
    match &e {
        InjectError::Yaml { file, line, .. } => assert_eq!((file.as_str(), *line >= 7), ("bad.yaml", true), "{e}"),
        other => panic!("{other}"),
    }
    assert!(e.to_string().starts_with("bad.yaml:"), "{e}");
}

#[test]
fn separators_leading_markers_crlf_and_empty_documents_are_kept() {
    let svc = "apiVersion: v1\r\nkind: Service\r\nmetadata: {name: s}\r\n";
    let text = format!("---\n# only a comment\n--- # marker comment\n{svc}---\r\n\n---\n{}", POD.trim_end());
    let out = inject(&text).text;
    let expected_head = format!("---\n# only a comment\n--- # marker comment\n{svc}---\r\n\n---\n");
    assert!(out.starts_with(&expected_head), "{out:?}");
    let pod = doc(&out[expected_head.len()..]);
    assert_eq!(names(&pod["spec"]["containers"]), ["weft-proxy", "web", "helper"]);
    // Nothing to inject: the text comes back byte for byte.
    assert_eq!(inject(&expected_head).text, expected_head);
}
