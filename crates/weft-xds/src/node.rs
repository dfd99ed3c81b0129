//! Workload identity announced in the `Node` of every xDS request, with Istio's keys.

use std::collections::{BTreeMap, HashMap};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Struct, Value};
use serde::{Deserialize, Serialize};

/// Metadata key: workload (pod) name.
pub const NAME: &str = "NAME";
/// Metadata key: namespace.
pub const NAMESPACE: &str = "NAMESPACE";
/// Metadata key: labels, a Struct of strings.
pub const LABELS: &str = "LABELS";
/// Metadata key: service account.
pub const SERVICE_ACCOUNT: &str = "SERVICE_ACCOUNT";
/// Metadata key: workload name.
pub const WORKLOAD_NAME: &str = "WORKLOAD_NAME";
/// Metadata key: instance IPs, comma separated.
pub const INSTANCE_IPS: &str = "INSTANCE_IPS";
/// weft: where the workload's sidecar accepts inbound traffic (explicit mode).
pub const WEFT_INBOUND: &str = "WEFT_INBOUND";
/// weft: where the workload's sidecar accepts outbound traffic in explicit mode.
pub const WEFT_OUTBOUND: &str = "WEFT_OUTBOUND";
/// weft: the proxy's admin address (for operators' tools).
pub const WEFT_ADMIN: &str = "WEFT_ADMIN";
/// weft: the proxy's metrics address (for scrapers and operators' tools).
pub const WEFT_METRICS: &str = "WEFT_METRICS";
/// weft: `"true"` when the proxy fetches virtual hosts, clusters and endpoints on demand
/// (delta xDS with VHDS) rather than receiving the whole mesh.
pub const WEFT_ON_DEMAND: &str = "WEFT_ON_DEMAND";
/// weft, gateways: server port to listener port, `"8080=18080,443=18443"` (a server
/// port not listed binds as itself; `0` binds any free port).
pub const WEFT_GATEWAY_PORTS: &str = "WEFT_GATEWAY_PORTS";
/// weft, gateways: the IP the gateway listeners bind, default `0.0.0.0`.
pub const WEFT_GATEWAY_ADDRESS: &str = "WEFT_GATEWAY_ADDRESS";
/// Node id prefix of gateways (Istio's node type `router`); sidecars use `sidecar~`.
pub const ROUTER_PREFIX: &str = "router~";
/// Metadata key: declared ports, a JSON array string as Istio writes it.
pub const POD_PORTS: &str = "POD_PORTS";
/// Metadata key: cluster id.
pub const CLUSTER_ID: &str = "CLUSTER_ID";
/// Istio's default `CLUSTER_ID`.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// Workload identity the proxy announces (Istio node metadata keys).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeInfo {
    /// Node id (Envoy `node.id`), unique per proxy.
    pub id: String,
    /// Cluster (Envoy `node.cluster`, also sent as `CLUSTER_ID`).
    pub cluster: String,
    /// Workload instance name (pod name).
    pub name: String,
    /// The workload the instance belongs to (a Deployment's name, a `LocalWorkload`'s
    /// name), announced as `WORKLOAD_NAME`; empty: the instance name (`name`).
    pub workload_name: String,
    /// Istio's `CLUSTER_ID` (the Kubernetes cluster the workload runs in, Istio's default
    /// `Kubernetes`); empty: `cluster` is announced there, as before.
    pub cluster_id: String,
    /// Namespace.
    pub namespace: String,
    /// Workload labels.
    pub labels: BTreeMap<String, String>,
    /// Service account the workload runs as.
    pub service_account: String,
    /// Ports the workload listens on.
    pub ports: Vec<PortInfo>,
    /// IPs of the workload instance.
    pub instance_ips: Vec<String>,
    /// Where this workload's sidecar accepts inbound traffic in explicit mode (its
    /// `inbound|PORT` listeners start here); announced as `WEFT_INBOUND`.
    pub inbound: Option<std::net::SocketAddr>,
    /// Where this workload's sidecar accepts outbound traffic in explicit mode (the
    /// `weft-outbound` HTTP proxy listener); announced as `WEFT_OUTBOUND`.
    pub outbound: Option<std::net::SocketAddr>,
    /// The proxy's admin address, announced as `WEFT_ADMIN` (filled in by the proxy).
    pub admin: Option<std::net::SocketAddr>,
    /// The proxy's metrics address, announced as `WEFT_METRICS` (filled in by the proxy).
    pub metrics: Option<std::net::SocketAddr>,
    /// The proxy subscribes on demand (delta xDS: virtual hosts by host, clusters and
    /// endpoints by name), announced as `WEFT_ON_DEMAND: "true"`; the control plane then
    /// sends route configurations with `vhds` instead of every virtual host.
    pub on_demand: bool,
    /// Gateways only: the port each server port's listener binds (`WEFT_GATEWAY_PORTS`,
    /// `"8080=18080"`); a server port not listed binds as itself, `0` any free port.
    pub gateway_ports: BTreeMap<u16, u16>,
    /// Gateways only: the IP gateway listeners bind (`WEFT_GATEWAY_ADDRESS`), default
    /// `0.0.0.0`.
    pub gateway_address: Option<std::net::IpAddr>,
}

/// A port a workload declares.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PortInfo {
    /// Port name (Istio derives the protocol from a `http-`/`grpc-` prefix).
    pub name: String,
    /// Port number.
    pub port: u16,
    /// Transport protocol, `TCP` in practice.
    pub protocol: String,
    /// Declared application protocol (`http`, `grpc`, ...).
    pub app_protocol: Option<String>,
}

/// One entry of `POD_PORTS` as Istio writes it (Kubernetes ContainerPort).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodPort {
    #[serde(default)]
    name: String,
    container_port: u32,
    #[serde(default = "tcp")]
    protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    app_protocol: Option<String>,
}

impl NodeInfo {
    /// Whether the proxy is a gateway: its node id starts with `router~` (Istio's node
    /// type for gateways, `router~<ip>~<name>.<ns>~<ns>.svc.cluster.local`).
    pub fn is_gateway(&self) -> bool {
        self.id.starts_with(ROUTER_PREFIX)
    }

    /// The port a gateway listener for server port `port` binds.
    pub fn gateway_port(&self, port: u16) -> u16 {
        self.gateway_ports.get(&port).copied().unwrap_or(port)
    }

    /// The workload name: `workload_name`, else the instance name.
    pub fn workload(&self) -> &str {
        if self.workload_name.is_empty() {
            &self.name
        } else {
            &self.workload_name
        }
    }

    /// The Envoy `Node` carrying this identity in Istio's metadata keys.
    pub fn to_node(&self) -> Node {
        let ports: Vec<PodPort> = self
            .ports
            .iter()
            .map(|p| PodPort {
                name: p.name.clone(),
                container_port: u32::from(p.port),
                protocol: p.protocol.clone(),
                app_protocol: p.app_protocol.clone(),
            })
            .collect();
        // Serialising plain strings and numbers cannot fail; fall back to "[]" anyway.
        let ports_json = serde_json::to_string(&ports).unwrap_or_else(|_| "[]".to_string());
        let labels = Struct { fields: self.labels.iter().map(|(k, v)| (k.clone(), string_value(v))).collect() };
        let mut fields = HashMap::new();
        fields.insert(NAME.to_string(), string_value(&self.name));
        fields.insert(NAMESPACE.to_string(), string_value(&self.namespace));
        fields.insert(LABELS.to_string(), Value { kind: Some(Kind::StructValue(labels)) });
        fields.insert(SERVICE_ACCOUNT.to_string(), string_value(&self.service_account));
        fields.insert(WORKLOAD_NAME.to_string(), string_value(self.workload()));
        fields.insert(INSTANCE_IPS.to_string(), string_value(&self.instance_ips.join(",")));
        if let Some(a) = self.inbound {
            fields.insert(WEFT_INBOUND.to_string(), string_value(&a.to_string()));
        }
        for (key, addr) in [(WEFT_OUTBOUND, self.outbound), (WEFT_ADMIN, self.admin), (WEFT_METRICS, self.metrics)] {
            if let Some(a) = addr {
                fields.insert(key.to_string(), string_value(&a.to_string()));
            }
        }
        if self.on_demand {
            fields.insert(WEFT_ON_DEMAND.to_string(), string_value("true"));
        }
        if !self.gateway_ports.is_empty() {
            let ports: Vec<String> = self.gateway_ports.iter().map(|(s, l)| format!("{s}={l}")).collect();
            fields.insert(WEFT_GATEWAY_PORTS.to_string(), string_value(&ports.join(",")));
        }
        if let Some(ip) = self.gateway_address {
            fields.insert(WEFT_GATEWAY_ADDRESS.to_string(), string_value(&ip.to_string()));
        }
        fields.insert(POD_PORTS.to_string(), string_value(&ports_json));
        let cluster_id = if self.cluster_id.is_empty() { &self.cluster } else { &self.cluster_id };
        fields.insert(CLUSTER_ID.to_string(), string_value(cluster_id));
        Node {
            id: self.id.clone(),
            cluster: self.cluster.clone(),
            metadata: Some(Struct { fields }),
            user_agent_name: "weft".to_string(),
            ..Default::default()
        }
    }

    /// Reads the identity back from a `Node` (control-plane side). `NAME` and
    /// `NAMESPACE` are required; other keys default to empty. Errors name the key.
    pub fn from_node(node: &Node) -> Result<NodeInfo, String> {
        if node.id.is_empty() {
            return Err("node has an empty id".to_string());
        }
        let Some(metadata) = node.metadata.as_ref() else {
            return Err(format!("node {} has no metadata", node.id));
        };
        let get = |key: &str| -> Result<Option<&str>, String> {
            match metadata.fields.get(key).and_then(|v| v.kind.as_ref()) {
                None | Some(Kind::NullValue(_)) => Ok(None),
                Some(Kind::StringValue(s)) => Ok(Some(s.as_str())),
                Some(other) => {
                    Err(format!("node {}: metadata {key} must be a string, found {}", node.id, kind_name(other)))
                }
            }
        };
        let required = |key: &str| -> Result<String, String> {
            match get(key)? {
                Some(s) if !s.is_empty() => Ok(s.to_string()),
                _ => Err(format!("node {}: metadata {key} is missing", node.id)),
            }
        };
        let name = required(NAME)?;
        // Envoy (and older weft) nodes send the instance name there: keep it empty then.
        let workload_name = get(WORKLOAD_NAME)?.filter(|w| *w != name).unwrap_or_default().to_string();
        let namespace = required(NAMESPACE)?;
        let mut labels = parse_labels(&node.id, metadata.fields.get(LABELS))?;
        if let Some(l) = &node.locality {
            augment_locality_labels(&mut labels, &l.region, &l.zone, &l.sub_zone);
        }
        let service_account = get(SERVICE_ACCOUNT)?.unwrap_or_default().to_string();
        let instance_ips = get(INSTANCE_IPS)?
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        let ports = match get(POD_PORTS)? {
            None | Some("") => Vec::new(),
            Some(json) => parse_ports(&node.id, json)?,
        };
        let cluster = if node.cluster.is_empty() {
            get(CLUSTER_ID)?.unwrap_or_default().to_string()
        } else {
            node.cluster.clone()
        };
        // Sent as `cluster` when no separate id was set: keep it empty then (round trip).
        let cluster_id = get(CLUSTER_ID)?.filter(|c| *c != cluster).unwrap_or_default().to_string();
        let addr = |key: &str| -> Result<Option<std::net::SocketAddr>, String> {
            match get(key)? {
                None | Some("") => Ok(None),
                Some(a) => {
                    a.parse().map(Some).map_err(|_| format!("node {}: metadata {key} {a:?} is not ip:port", node.id))
                }
            }
        };
        let (inbound, outbound) = (addr(WEFT_INBOUND)?, addr(WEFT_OUTBOUND)?);
        let (admin, metrics) = (addr(WEFT_ADMIN)?, addr(WEFT_METRICS)?);
        let on_demand = match get(WEFT_ON_DEMAND)? {
            None | Some("" | "false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(format!(
                    "node {}: metadata {WEFT_ON_DEMAND} must be \"true\" or \"false\", found {other:?}",
                    node.id
                ))
            }
        };
        let gateway_ports = match get(WEFT_GATEWAY_PORTS)? {
            None => BTreeMap::new(),
            Some(text) => parse_gateway_ports(&node.id, text)?,
        };
        let gateway_address = match get(WEFT_GATEWAY_ADDRESS)? {
            None | Some("") => None,
            Some(a) => Some(a.parse().map_err(|_| {
                format!("node {}: metadata {WEFT_GATEWAY_ADDRESS} {a:?} is not an IP address, e.g. 0.0.0.0", node.id)
            })?),
        };
        Ok(NodeInfo {
            id: node.id.clone(),
            cluster,
            name,
            workload_name,
            cluster_id,
            namespace,
            labels,
            service_account,
            ports,
            instance_ips,
            inbound,
            outbound,
            admin,
            metrics,
            on_demand,
            gateway_ports,
            gateway_address,
        })
    }
}

/// Parses `WEFT_GATEWAY_PORTS`: `SERVER=LISTEN` pairs separated by commas; server ports
/// are 1..=65535 and unique, listen ports 0..=65535 (0: any free port).
pub fn parse_gateway_ports(node_id: &str, text: &str) -> Result<BTreeMap<u16, u16>, String> {
    let mut out = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = |why: &str| {
            format!(
                "node {node_id}: metadata {WEFT_GATEWAY_PORTS} entry {item:?}: {why}; expected \
                 SERVER_PORT=LISTEN_PORT pairs, e.g. \"8080=18080,443=18443\""
            )
        };
        let Some((server, listen)) = item.split_once('=') else { return Err(bad("no `=`")) };
        let server: u16 =
            server.trim().parse().ok().filter(|p| *p != 0).ok_or_else(|| bad("the server port is not in 1..=65535"))?;
        let listen: u16 = listen.trim().parse().map_err(|_| bad("the listen port is not in 0..=65535"))?;
        if out.insert(server, listen).is_some() {
            return Err(bad(&format!("server port {server} is mapped twice")));
        }
    }
    Ok(out)
}

fn tcp() -> String {
    "TCP".to_string()
}

fn string_value(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.to_string())) }
}

fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::NullValue(_) => "null",
        Kind::NumberValue(_) => "a number",
        Kind::StringValue(_) => "a string",
        Kind::BoolValue(_) => "a bool",
        Kind::StructValue(_) => "a struct",
        Kind::ListValue(_) => "a list",
    }
}

/// Label keys Istio reads a workload's locality from (besides [`LOCALITY_LABEL`]).
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// The zone label.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The subzone label.
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";
/// Istio's `istio-locality` label: `region.zone.subzone`, preferred over the others.
pub const LOCALITY_LABEL: &str = "istio-locality";

/// Istio's `AugmentLabels`: the node's `locality` becomes the region, zone and subzone
/// labels, unless the labels already say where the workload is.
fn augment_locality_labels(labels: &mut BTreeMap<String, String>, region: &str, zone: &str, subzone: &str) {
    if labels.contains_key(LOCALITY_LABEL) || labels.contains_key(REGION_LABEL) {
        return;
    }
    for (key, value) in [(REGION_LABEL, region), (ZONE_LABEL, zone), (SUBZONE_LABEL, subzone)] {
        if !value.is_empty() {
            labels.entry(key.to_string()).or_insert_with(|| value.to_string());
        }
    }
}

fn parse_labels(node_id: &str, value: Option<&Value>) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    match value.and_then(|v| v.kind.as_ref()) {
        None | Some(Kind::NullValue(_)) => {}
        Some(Kind::StructValue(s)) => {
            for (key, v) in &s.fields {
                match v.kind.as_ref() {
                    Some(Kind::StringValue(s)) => {
                        labels.insert(key.clone(), s.clone());
                    }
                    other => {
                        return Err(format!(
                            "node {node_id}: label {key} must be a string, found {}",
                            other.map_or("nothing", kind_name)
                        ))
                    }
                }
            }
        }
        Some(other) => {
            return Err(format!("node {node_id}: metadata {LABELS} must be a struct, found {}", kind_name(other)))
        }
    }
    Ok(labels)
}

fn parse_ports(node_id: &str, json: &str) -> Result<Vec<PortInfo>, String> {
    let ports: Vec<PodPort> = serde_json::from_str(json).map_err(|e| {
        format!(
            "node {node_id}: metadata {POD_PORTS} is not a JSON list of \
             {{\"name\",\"containerPort\",\"protocol\"}}: {e}"
        )
    })?;
    ports
        .into_iter()
        .map(|p| {
            let port = u16::try_from(p.container_port).ok().filter(|port| *port != 0).ok_or_else(|| {
                format!(
                    "node {node_id}: metadata {POD_PORTS}: containerPort {} of port {:?} \
                         is not in 1..=65535",
                    p.container_port, p.name
                )
            })?;
            Ok(PortInfo { name: p.name, port, protocol: p.protocol, app_protocol: p.app_protocol })
        })
        .collect()
}
