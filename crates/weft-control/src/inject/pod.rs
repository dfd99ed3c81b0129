//! Injection into one pod (or pod template): the decision (opt-out, host network, already
//! injected) and the rewrite (`weft-init`, `weft-proxy`, token volume, annotations).

use std::collections::BTreeMap;

use super::yaml::{Map, Node, Resolved};
use super::{InjectConfig, INIT_CONTAINER, PROXY_CONTAINER, STATUS_ANNOTATION, TOKEN_DIR, TOKEN_FILE, TOKEN_VOLUME};

/// Istio's opt-in/opt-out label and annotation.
pub const INJECT_KEY: &str = "sidecar.istio.io/inject";
/// Istio's annotation for Kubernetes native sidecars.
pub const NATIVE_SIDECAR: &str = "sidecar.istio.io/nativeSidecar";
/// `kubectl logs/exec` default container.
pub const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";
/// Namespaces never injected (as Istio).
const IGNORED_NAMESPACES: [&str; 2] = ["kube-system", "kube-public"];
/// The proxy's metrics and health port (`/stats/prometheus`, `/healthz/ready`).
const METRICS_PORT: i64 = 15020;

/// What happened to one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The sidecar was added.
    Injected,
    /// Left unchanged, and why.
    Skipped(Skip),
}

/// Why a pod was left unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// `hostNetwork: true` (capture would rewrite the node's own traffic).
    HostNetwork,
    /// `sidecar.istio.io/inject` says no (on the label or annotation named).
    OptedOut(&'static str),
    /// It already has a `weft-proxy` container or the status annotation.
    AlreadyInjected,
    /// A namespace that is never injected.
    IgnoredNamespace(String),
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::HostNetwork => write!(f, "hostNetwork pods are not injected"),
            Skip::OptedOut(on) => write!(f, "opted out by the {INJECT_KEY} {on}"),
            Skip::AlreadyInjected => write!(f, "already injected"),
            Skip::IgnoredNamespace(ns) => write!(f, "namespace {ns} is never injected"),
        }
    }
}

/// Capture settings from Istio's `traffic.sidecar.istio.io/*` annotations:
/// (annotation, `weft iptables` flag, what the value holds).
const TRAFFIC_ANNOTATIONS: [(&str, &str, ValueKind); 5] = [
    ("traffic.sidecar.istio.io/includeInboundPorts", "--inbound-ports", ValueKind::PortsOrStar),
    ("traffic.sidecar.istio.io/excludeInboundPorts", "--exclude-inbound-ports", ValueKind::Ports),
    ("traffic.sidecar.istio.io/excludeOutboundPorts", "--exclude-outbound-ports", ValueKind::Ports),
    ("traffic.sidecar.istio.io/includeOutboundIPRanges", "--outbound-ip-ranges", ValueKind::CidrsOrStar),
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "--exclude-outbound-ip-ranges", ValueKind::Cidrs),
];

#[derive(Clone, Copy)]
enum ValueKind {
    Ports,
    PortsOrStar,
    Cidrs,
    CidrsOrStar,
}

/// Injects the sidecar into `pod` (a Pod object or a pod template: `metadata` + `spec`).
/// `at` prefixes field paths in errors (`spec.template.`); `namespace` is the pod's when
/// known; `workload` is the workload it belongs to (`WORKLOAD_NAME`, see
/// [`super::workload`]; empty: the pod's name). Errors say which field is wrong and what
/// was expected.
pub fn inject(
    pod: &mut Map,
    cfg: &InjectConfig,
    namespace: Option<&str>,
    workload: &str,
    at: &str,
) -> Result<Outcome, String> {
    let (labels, annotations) = metadata(pod, at)?;
    if let Some(ns) = namespace.filter(|ns| IGNORED_NAMESPACES.contains(ns)) {
        return Ok(Outcome::Skipped(Skip::IgnoredNamespace(ns.to_string())));
    }
    let Some(spec) = pod.get("spec").and_then(Node::as_map) else {
        return Err(format!("{at}spec is missing or not a mapping: expected the pod spec"));
    };
    if matches!(spec.get("hostNetwork").and_then(Node::as_scalar).map(|s| s.resolve()), Some(Resolved::Bool(true))) {
        return Ok(Outcome::Skipped(Skip::HostNetwork));
    }
    let decision = match labels.get(INJECT_KEY).and_then(|v| wants(v)) {
        Some(d) => Some((d, "label")),
        None => annotations.get(INJECT_KEY).and_then(|v| wants(v)).map(|d| (d, "annotation")),
    };
    if let Some((false, on)) = decision {
        return Ok(Outcome::Skipped(Skip::OptedOut(on)));
    }
    let names = |key: &str| -> Vec<String> {
        spec.get(key)
            .and_then(Node::as_seq)
            .map(|s| s.iter().filter_map(|c| c.as_map()?.get("name")?.text().map(str::to_string)).collect())
            .unwrap_or_default()
    };
    if annotations.contains_key(STATUS_ANNOTATION)
        || names("containers").iter().chain(&names("initContainers")).any(|n| n == PROXY_CONTAINER)
    {
        return Ok(Outcome::Skipped(Skip::AlreadyInjected));
    }
    let containers = app_containers(spec, at)?;
    let native = match annotations.get(NATIVE_SIDECAR).map(|v| v.to_ascii_lowercase()) {
        Some(v) if v == "true" => true,
        Some(v) if v == "false" => false,
        Some(v) => return Err(format!("annotation {NATIVE_SIDECAR}: {v:?} is not \"true\" or \"false\"")),
        None => cfg.native_sidecar,
    };
    let image = annotations.get("sidecar.istio.io/proxyImage").cloned().unwrap_or_else(|| cfg.image.clone());
    let init = init_container(cfg, &image, &annotations)?;
    let proxy = proxy_container(cfg, &image, &labels, &annotations, &containers.ports, workload, native);

    let spec = pod.get_mut("spec").and_then(Node::as_map_mut).ok_or_else(|| format!("{at}spec: expected a mapping"))?;
    let inits = spec
        .seq_entry("initContainers", Some("containers"))
        .ok_or_else(|| format!("{at}spec.initContainers: expected a list of containers"))?;
    inits.insert(0, Node::Map(init));
    if native {
        inits.insert(1, Node::Map(proxy));
    } else {
        let list = spec
            .get_mut("containers")
            .and_then(Node::as_seq_mut)
            .ok_or_else(|| format!("{at}spec.containers: expected a list of containers"))?;
        list.insert(0, Node::Map(proxy));
    }
    let volumes =
        spec.seq_entry("volumes", None).ok_or_else(|| format!("{at}spec.volumes: expected a list of volumes"))?;
    let has_token_volume =
        volumes.iter().any(|v| v.as_map().and_then(|m| m.get("name")).and_then(Node::text) == Some(TOKEN_VOLUME));
    if !has_token_volume {
        volumes.push(Node::Map(token_volume()));
    }

    let status = serde_json::json!({
        "initContainers": if native { vec![INIT_CONTAINER, PROXY_CONTAINER] } else { vec![INIT_CONTAINER] },
        "containers": if native { Vec::new() } else { vec![PROXY_CONTAINER] },
        "volumes": [TOKEN_VOLUME],
        "image": image,
    });
    let meta = pod.map_entry("metadata", Some("spec")).ok_or_else(|| format!("{at}metadata: expected a mapping"))?;
    let notes =
        meta.map_entry("annotations", None).ok_or_else(|| format!("{at}metadata.annotations: expected a mapping"))?;
    if notes.get(DEFAULT_CONTAINER).is_none() {
        notes.insert(DEFAULT_CONTAINER, Node::str(containers.first_name));
    }
    notes.insert(STATUS_ANNOTATION, Node::str(status.to_string()));
    Ok(Outcome::Injected)
}

/// Istio's reading of `sidecar.istio.io/inject`: y/yes/true/on inject, empty means "no
/// opinion", anything else opts out.
fn wants(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "y" | "yes" | "true" | "on" => Some(true),
        "" => None,
        _ => Some(false),
    }
}

type Strings = BTreeMap<String, String>;

/// The pod's labels and annotations (scalar values as text).
fn metadata(pod: &Map, at: &str) -> Result<(Strings, Strings), String> {
    let Some(meta) = pod.get("metadata") else { return Ok(Default::default()) };
    if meta.is_null() {
        return Ok(Default::default());
    }
    let meta = meta.as_map().ok_or_else(|| format!("{at}metadata: expected a mapping"))?;
    let read = |key: &str| -> Result<Strings, String> {
        match meta.get(key) {
            None => Ok(Strings::new()),
            Some(n) if n.is_null() => Ok(Strings::new()),
            Some(Node::Map(m)) => {
                Ok(m.iter().filter_map(|(k, v)| Some((k.text.clone(), v.text()?.to_string()))).collect())
            }
            Some(_) => Err(format!("{at}metadata.{key}: expected a mapping of strings")),
        }
    };
    Ok((read("labels")?, read("annotations")?))
}

struct AppContainers {
    first_name: String,
    /// `POD_PORTS` entries: name, port, protocol.
    ports: Vec<serde_json::Value>,
}

fn app_containers(spec: &Map, at: &str) -> Result<AppContainers, String> {
    let list = spec
        .get("containers")
        .and_then(Node::as_seq)
        .filter(|l| !l.is_empty())
        .ok_or_else(|| format!("{at}spec.containers is missing or empty: a pod needs at least one container"))?;
    let mut first_name = None;
    let mut ports = Vec::new();
    for (i, c) in list.iter().enumerate() {
        let c = c.as_map().ok_or_else(|| format!("{at}spec.containers[{i}]: expected a container mapping"))?;
        let name = c
            .get("name")
            .and_then(Node::text)
            .ok_or_else(|| format!("{at}spec.containers[{i}].name is missing: every container needs a name"))?;
        first_name.get_or_insert_with(|| name.to_string());
        let Some(list) = c.get("ports").filter(|p| !p.is_null()) else { continue };
        let list = list.as_seq().ok_or_else(|| format!("{at}spec.containers[{i}].ports: expected a list"))?;
        for (j, p) in list.iter().enumerate() {
            let field = format!("{at}spec.containers[{i}].ports[{j}]");
            let p = p.as_map().ok_or_else(|| format!("{field}: expected a port mapping"))?;
            let port = match p.get("containerPort").and_then(Node::as_scalar).map(|s| s.resolve()) {
                Some(Resolved::Int(n)) if (1..=65535).contains(&n) => n,
                _ => return Err(format!("{field}.containerPort: expected a port number (1-65535)")),
            };
            let mut entry = serde_json::Map::new();
            if let Some(n) = p.get("name").and_then(Node::text) {
                entry.insert("name".into(), n.into());
            }
            entry.insert("port".into(), (port as i64).into());
            entry.insert("protocol".into(), p.get("protocol").and_then(Node::text).unwrap_or("TCP").into());
            ports.push(serde_json::Value::Object(entry));
        }
    }
    Ok(AppContainers { first_name: first_name.unwrap_or_default(), ports })
}

fn init_container(cfg: &InjectConfig, image: &str, annotations: &Strings) -> Result<Map, String> {
    let mut args = vec!["iptables".to_string(), format!("--proxy-uid={}", cfg.proxy_uid)];
    let include_inbound = TRAFFIC_ANNOTATIONS[0].0;
    if !annotations.contains_key(include_inbound) {
        args.push("--inbound-ports=*".into());
    }
    for (annotation, flag, kind) in TRAFFIC_ANNOTATIONS {
        if let Some(v) = annotations.get(annotation) {
            let v = validate(annotation, v.trim(), kind)?;
            args.push(format!("{flag}={v}"));
        }
    }
    Ok(Map::of([
        ("name", Node::str(INIT_CONTAINER)),
        ("image", Node::str(image)),
        ("args", Node::strs(args)),
        (
            "resources",
            Node::Map(Map::of([(
                "requests",
                Node::Map(Map::of([("cpu", Node::str("10m")), ("memory", Node::str("10Mi"))])),
            )])),
        ),
        (
            "securityContext",
            Node::Map(Map::of([
                ("allowPrivilegeEscalation", Node::bool(false)),
                (
                    "capabilities",
                    Node::Map(Map::of([("add", Node::strs(["NET_ADMIN", "NET_RAW"])), ("drop", Node::strs(["ALL"]))])),
                ),
                ("privileged", Node::bool(false)),
                ("readOnlyRootFilesystem", Node::bool(false)),
                ("runAsGroup", Node::int(0)),
                ("runAsNonRoot", Node::bool(false)),
                ("runAsUser", Node::int(0)),
            ])),
        ),
    ]))
}

/// Checks an annotation's list the way `weft iptables` will parse it, so a bad value
/// fails at injection with the annotation's name instead of in the pod's init step.
fn validate(annotation: &str, v: &str, kind: ValueKind) -> Result<String, String> {
    let star = matches!(kind, ValueKind::PortsOrStar | ValueKind::CidrsOrStar);
    if v == "*" && star {
        return Ok(v.to_string());
    }
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match kind {
            ValueKind::Ports | ValueKind::PortsOrStar => {
                if !item.parse::<u16>().is_ok_and(|p| p > 0) {
                    return Err(format!("annotation {annotation}: {item:?} is not a port number (1-65535)"));
                }
            }
            ValueKind::Cidrs | ValueKind::CidrsOrStar => {
                let (ip, len) = item.split_once('/').unwrap_or((item, "32"));
                if ip.parse::<std::net::Ipv4Addr>().is_err() {
                    return Err(format!("annotation {annotation}: {item:?} is not an IPv4 address or CIDR"));
                }
                if !len.parse::<u8>().is_ok_and(|l| l <= 32) {
                    return Err(format!("annotation {annotation}: {item:?} has a bad prefix length (0-32)"));
                }
            }
        }
    }
    Ok(v.split(',').map(str::trim).filter(|s| !s.is_empty()).collect::<Vec<_>>().join(","))
}

/// The bootstrap `weft proxy` reads from `WEFT_BOOTSTRAP_YAML`. Kubernetes expands the
/// `$(VAR)` references from the env entries before it; `$` in inlined data is doubled so
/// it stays literal.
fn bootstrap(cfg: &InjectConfig, labels: &Strings, ports: &[serde_json::Value], workload: &str) -> String {
    let json = |v: serde_json::Value| v.to_string().replace('$', "$$");
    let q = |s: &str| json(serde_json::Value::from(s));
    let workload = if workload.is_empty() { String::new() } else { format!("  workload_name: {}\n", q(workload)) };
    format!(
        "node:\n  id: \"sidecar~$(INSTANCE_IP)~$(POD_NAME).$(POD_NAMESPACE)~$(POD_NAMESPACE).svc.{domain}\"\n  cluster: Kubernetes\n  cluster_id: Kubernetes\n  name: \"$(POD_NAME)\"\n{workload}  namespace: \"$(POD_NAMESPACE)\"\n  service_account: \"$(SERVICE_ACCOUNT)\"\n  labels: {labels}\n  ports: {ports}\n  instance_ips: [\"$(INSTANCE_IP)\"]\nxds:\n  address: {xds}\nidentity:\n  kubernetes_token_file: {token}\n  trust_domain: {td}\n{root}",
        domain = cfg.cluster_domain.replace('$', "$$"),
        labels = json(serde_json::to_value(labels).unwrap_or_default()),
        ports = json(serde_json::Value::Array(ports.to_vec())),
        xds = q(&cfg.xds_url()),
        token = q(&format!("{TOKEN_DIR}/{TOKEN_FILE}")),
        td = q(&cfg.trust_domain),
        root = cfg.root_cert.as_deref().map(|r| format!("  root_cert: {}\n", q(r))).unwrap_or_default(),
    )
}

fn field_env(name: &str, path: &str) -> Node {
    Node::Map(Map::of([
        ("name", Node::str(name)),
        ("valueFrom", Node::Map(Map::of([("fieldRef", Node::Map(Map::of([("fieldPath", Node::str(path))])))]))),
    ]))
}

fn proxy_container(
    cfg: &InjectConfig,
    image: &str,
    labels: &Strings,
    annotations: &Strings,
    ports: &[serde_json::Value],
    workload: &str,
    native: bool,
) -> Map {
    let env = Node::Seq(vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("INSTANCE_IP", "status.podIP"),
        field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        Node::Map(Map::of([
            ("name", Node::str("WEFT_BOOTSTRAP_YAML")),
            ("value", Node::str(bootstrap(cfg, labels, ports, workload))),
        ])),
    ]);
    let quantity = |a: &str, default: Option<&str>| annotations.get(a).map(String::as_str).or(default).map(Node::str);
    let pick = |pairs: [(&str, &str, Option<&str>); 2]| {
        let mut m = Map::new();
        for (key, annotation, default) in pairs {
            if let Some(v) = quantity(annotation, default) {
                m.insert(key, v);
            }
        }
        m
    };
    let requests = pick([
        ("cpu", "sidecar.istio.io/proxyCPU", Some("100m")),
        ("memory", "sidecar.istio.io/proxyMemory", Some("128Mi")),
    ]);
    let limits =
        pick([("cpu", "sidecar.istio.io/proxyCPULimit", None), ("memory", "sidecar.istio.io/proxyMemoryLimit", None)]);
    let mut resources = Map::of([("requests", Node::Map(requests))]);
    if limits.iter().next().is_some() {
        resources.insert("limits", Node::Map(limits));
    }
    let mut c = Map::of([
        ("name", Node::str(PROXY_CONTAINER)),
        ("image", Node::str(image)),
        ("args", Node::strs(["proxy"])),
        (
            "ports",
            Node::Seq(vec![Node::Map(Map::of([
                ("containerPort", Node::int(METRICS_PORT)),
                ("name", Node::str("http-envoy-prom")),
                ("protocol", Node::str("TCP")),
            ]))]),
        ),
        ("env", env),
        (
            "readinessProbe",
            Node::Map(Map::of([
                (
                    "httpGet",
                    Node::Map(Map::of([("path", Node::str("/healthz/ready")), ("port", Node::int(METRICS_PORT))])),
                ),
                ("initialDelaySeconds", Node::int(1)),
                ("periodSeconds", Node::int(2)),
                ("failureThreshold", Node::int(30)),
            ])),
        ),
        ("resources", Node::Map(resources)),
        (
            "securityContext",
            Node::Map(Map::of([
                ("allowPrivilegeEscalation", Node::bool(false)),
                ("capabilities", Node::Map(Map::of([("drop", Node::strs(["ALL"]))]))),
                ("privileged", Node::bool(false)),
                ("readOnlyRootFilesystem", Node::bool(true)),
                ("runAsGroup", Node::int(i64::from(cfg.proxy_uid))),
                ("runAsNonRoot", Node::bool(true)),
                ("runAsUser", Node::int(i64::from(cfg.proxy_uid))),
            ])),
        ),
        (
            "volumeMounts",
            Node::Seq(vec![Node::Map(Map::of([
                ("name", Node::str(TOKEN_VOLUME)),
                ("mountPath", Node::str(TOKEN_DIR)),
            ]))]),
        ),
    ]);
    if native {
        c.insert("restartPolicy", Node::str("Always"));
    }
    c
}

/// Istio's projected service-account token (audience `istio-ca`).
fn token_volume() -> Map {
    Map::of([
        ("name", Node::str(TOKEN_VOLUME)),
        (
            "projected",
            Node::Map(Map::of([(
                "sources",
                Node::Seq(vec![Node::Map(Map::of([(
                    "serviceAccountToken",
                    Node::Map(Map::of([
                        ("audience", Node::str("istio-ca")),
                        ("expirationSeconds", Node::int(43200)),
                        ("path", Node::str(TOKEN_FILE)),
                    ])),
                )]))]),
            )])),
        ),
    ])
}
