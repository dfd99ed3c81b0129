//! `weft envoy-bootstrap`: a bootstrap that makes a stock Envoy join the mesh like a
//! weft proxy.
//!
//! The node is written the way Istio writes it (id `sidecar~<ip>~<name>.<ns>~<ns>.svc.cluster.local`,
//! cluster `<app or name>.<ns>`) and its metadata is exactly what
//! [`weft_xds::NodeInfo::to_node`] produces, so the control plane registers the Envoy
//! like any weft proxy. Configuration then arrives over ADS from a static `xds-grpc`
//! cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Struct, Value};
use serde_json::{json, Map};
use weft_xds::{NodeInfo, PortInfo};

/// Name of the static cluster that points at the control plane.
pub const XDS_CLUSTER: &str = "xds-grpc";

/// Longest label name (the part after an optional prefix) and label value.
const LABEL_MAX: usize = 63;
/// Longest label prefix (a DNS subdomain).
const LABEL_PREFIX_MAX: usize = 253;
/// Longest port name (Kubernetes `IANA_SVC_NAME`).
const PORT_NAME_MAX: usize = 15;

/// What the bootstrap announces and where it connects.
#[derive(Clone, Debug, PartialEq)]
pub struct EnvoyBootstrapOptions {
    /// Workload instance name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Workload labels.
    pub labels: BTreeMap<String, String>,
    /// Service account.
    pub service_account: String,
    /// Declared ports.
    pub ports: Vec<PortInfo>,
    /// The instance IP, written in the node id and in `INSTANCE_IPS`.
    pub instance_ip: IpAddr,
    /// Control-plane xDS address.
    pub xds: SocketAddr,
    /// Admin port on 127.0.0.1 (15000 by convention; 0 picks a free one).
    pub admin_port: u16,
    /// Cluster id sent as `CLUSTER_ID` (`Kubernetes` by convention).
    pub cluster_id: String,
    /// Delta ADS (`DELTA_GRPC`) instead of state of the world (`GRPC`).
    pub delta: bool,
    /// Explicit mode: where this Envoy accepts inbound traffic (`WEFT_INBOUND`).
    pub inbound: Option<SocketAddr>,
    /// Explicit mode: where this Envoy serves as the app's HTTP proxy (`WEFT_OUTBOUND`).
    pub outbound: Option<SocketAddr>,
    /// A join token (`weft token create`): the control plane then serves this Envoy its
    /// workload certificate over SDS (`default`) and it joins mesh mTLS
    /// (`security.istio.io/tlsMode: istio`).
    pub join_token: Option<String>,
}

impl EnvoyBootstrapOptions {
    /// The node id in Istio's form: `sidecar~<ip>~<name>.<namespace>~<namespace>.svc.cluster.local`.
    pub fn node_id(&self) -> String {
        format!("sidecar~{}~{}.{}~{}.svc.cluster.local", self.instance_ip, self.name, self.namespace, self.namespace)
    }

    /// The node cluster: `<app label, else name>.<namespace>`.
    pub fn node_cluster(&self) -> String {
        let app = self.labels.get("app").filter(|a| !a.is_empty()).unwrap_or(&self.name);
        format!("{app}.{}", self.namespace)
    }

    /// The identity the Envoy announces, as the control plane will parse it back.
    pub fn node_info(&self) -> NodeInfo {
        NodeInfo {
            id: self.node_id(),
            cluster: self.cluster_id.clone(),
            name: self.name.clone(),
            workload_name: String::new(),
            cluster_id: self.cluster_id.clone(),
            namespace: self.namespace.clone(),
            labels: {
                let mut l = self.labels.clone();
                if self.join_token.is_some() {
                    l.insert(crate::translate::mtls::TLS_MODE_LABEL.into(), "istio".into());
                }
                l
            },
            service_account: self.service_account.clone(),
            ports: self.ports.clone(),
            instance_ips: vec![self.instance_ip.to_string()],
            inbound: self.inbound,
            outbound: self.outbound,
            // Announced so `weft proxy-config ... secrets` can read its config dump.
            admin: (self.admin_port != 0).then(|| std::net::SocketAddr::from(([127, 0, 0, 1], self.admin_port))),
            metrics: None,
            on_demand: false,
            gateway_ports: Default::default(),
            gateway_address: None,
        }
    }
}

impl EnvoyBootstrapOptions {
    /// The identity of this Envoy as an ingress gateway: Istio's gateway node id
    /// `router~<ip>~<name>.<namespace>~<namespace>.svc.cluster.local`, listeners bound at
    /// `address` (`WEFT_GATEWAY_ADDRESS`) with server ports mapped by `ports`
    /// (`WEFT_GATEWAY_PORTS`). Render it with [`render_node`].
    pub fn gateway_node_info(&self, ports: BTreeMap<u16, u16>, address: Option<IpAddr>) -> NodeInfo {
        NodeInfo {
            id: format!(
                "{}{}~{}.{}~{}.svc.cluster.local",
                weft_xds::node::ROUTER_PREFIX,
                self.instance_ip,
                self.name,
                self.namespace,
                self.namespace
            ),
            gateway_ports: ports,
            gateway_address: address,
            ..self.node_info()
        }
    }
}

/// The bootstrap YAML (Envoy 1.40): node, ADS over gRPC (V3) to [`XDS_CLUSTER`], CDS and
/// LDS from ADS, admin on `127.0.0.1:admin_port`.
pub fn render(o: &EnvoyBootstrapOptions) -> String {
    render_node(o, &o.node_info())
}

/// [`render`] announcing `node` (its id and metadata) instead of the options' sidecar
/// identity, e.g. [`EnvoyBootstrapOptions::gateway_node_info`].
pub fn render_node(o: &EnvoyBootstrapOptions, node: &NodeInfo) -> String {
    let mut metadata = node.to_node().metadata.map(|s| struct_to_json(&s)).unwrap_or_else(|| json!({}));
    if let (Some(t), Some(m)) = (&o.join_token, metadata.as_object_mut()) {
        m.insert(crate::secrets::JOIN_TOKEN_KEY.into(), json!(t));
    }
    let api_type = if o.delta { "DELTA_GRPC" } else { "GRPC" };
    let ads_source = json!({ "ads": {}, "resource_api_version": "V3" });
    let bootstrap = json!({
        "node": {
            "id": node.id,
            "cluster": o.node_cluster(),
            "metadata": metadata,
        },
        "admin": {
            "address": { "socket_address": { "address": "127.0.0.1", "port_value": o.admin_port } },
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [{ "envoy_grpc": { "cluster_name": XDS_CLUSTER } }],
            },
            "cds_config": ads_source,
            "lds_config": ads_source,
        },
        "static_resources": {
            "clusters": [{
                "name": XDS_CLUSTER,
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": { "http2_protocol_options": {} },
                    },
                },
                "load_assignment": {
                    "cluster_name": XDS_CLUSTER,
                    "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": { "socket_address": {
                        "address": o.xds.ip().to_string(),
                        "port_value": o.xds.port(),
                    } } } }] }],
                },
            }],
        },
    });
    // A JSON value of strings, numbers, bools and maps always serialises; JSON is YAML
    // too, so fall back to it rather than fail.
    serde_yaml_ng::to_string(&bootstrap).unwrap_or_else(|_| bootstrap.to_string())
}

/// `bootstrap` (from [`render`] or [`render_node`]) with its xDS cluster over TLS to the
/// control plane's TLS port (15012): the server verified against the mesh root in
/// `root_cert_file` and its SPIFFE id (`spiffe://<trust_domain>/ns/istio-system/sa/istiod`),
/// ALPN `h2`. Envoy has no client certificate before the control plane serves it one:
/// its join token (node metadata) is its credential, now sent encrypted, and so is the
/// key the control plane generates for it.
pub fn with_xds_tls(bootstrap: &str, root_cert_file: &std::path::Path, trust_domain: &str) -> Result<String, String> {
    let mut v: serde_json::Value = serde_yaml_ng::from_str(bootstrap).map_err(|e| format!("not a bootstrap: {e}"))?;
    let id = weft_identity::control_plane_id(trust_domain).map_err(|e| e.to_string())?;
    let socket = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": format!("{}.{}.svc", weft_identity::CONTROL_PLANE_SERVICE_ACCOUNT, weft_identity::CONTROL_PLANE_NAMESPACE),
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "validation_context": {
                    "trusted_ca": { "filename": root_cert_file.display().to_string() },
                    "match_typed_subject_alt_names": [{ "san_type": "URI", "matcher": { "exact": id.to_string() } }],
                },
            },
        },
    });
    let clusters = v["static_resources"]["clusters"].as_array_mut().ok_or("the bootstrap has no static clusters")?;
    let xds = clusters.iter_mut().find(|c| c["name"] == XDS_CLUSTER).ok_or("the bootstrap has no xDS cluster")?;
    xds["transport_socket"] = socket;
    Ok(serde_yaml_ng::to_string(&v).unwrap_or_else(|_| v.to_string()))
}

/// Parses `app=x,version=v1` into labels with Kubernetes' syntax rules (name: up to 63
/// of `[A-Za-z0-9._-]`, starting and ending alphanumeric, optionally after a DNS
/// prefix and `/`; value: empty or the same rules). An empty string is no labels.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    if s.trim().is_empty() {
        return Ok(labels);
    }
    for (i, item) in s.split(',').enumerate() {
        let n = i + 1;
        let item = item.trim();
        let Some((key, value)) = item.split_once('=') else {
            return Err(format!("label {n} {item:?}: expected key=value"));
        };
        let (key, value) = (key.trim(), value.trim());
        check_label_key(key).map_err(|e| format!("label {n} {item:?}: key {key:?} {e}"))?;
        check_label_value(value).map_err(|e| format!("label {n} {item:?}: value {value:?} {e}"))?;
        if labels.insert(key.to_string(), value.to_string()).is_some() {
            return Err(format!("label {n} {item:?}: key {key:?} is given twice"));
        }
    }
    Ok(labels)
}

/// Parses `http:9080,grpc-x:9090/grpc` (`name:port[/appProtocol]`) into ports (TCP).
/// Names follow Kubernetes (up to 15 of `[a-z0-9-]`, a letter among them, no leading,
/// trailing or double `-`); ports are 1..=65535; names and ports are unique.
pub fn parse_ports(s: &str) -> Result<Vec<PortInfo>, String> {
    let mut ports = Vec::new();
    if s.trim().is_empty() {
        return Ok(ports);
    }
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, item) in s.split(',').enumerate() {
        let n = i + 1;
        let item = item.trim();
        let Some((name, rest)) = item.split_once(':') else {
            return Err(format!("port {n} {item:?}: expected name:port[/appProtocol], e.g. http:8080"));
        };
        let (number, app_protocol) = match rest.split_once('/') {
            Some((number, proto)) => (number, Some(proto)),
            None => (rest, None),
        };
        check_port_name(name).map_err(|e| format!("port {n} {item:?}: name {name:?} {e}"))?;
        let number = number
            .parse::<u32>()
            .map_err(|_| format!("port {n} {item:?}: {number:?} is not a port number (1..=65535)"))?;
        let port = u16::try_from(number)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {n} {item:?}: port {number} is not in 1..=65535"))?;
        let app_protocol = match app_protocol {
            None => None,
            Some(p) if is_app_protocol(p) => Some(p.to_string()),
            Some(p) => {
                return Err(format!(
                    "port {n} {item:?}: appProtocol {p:?} must be non-empty letters, digits, '.', '-', '_' or '/'"
                ))
            }
        };
        if !names.insert(name.to_string()) {
            return Err(format!("port {n} {item:?}: name {name:?} is given twice"));
        }
        if !numbers.insert(port) {
            return Err(format!("port {n} {item:?}: port {port} is given twice"));
        }
        ports.push(PortInfo { name: name.to_string(), port, protocol: "TCP".to_string(), app_protocol });
    }
    Ok(ports)
}

/// A protobuf `Struct` as JSON (numbers stay numbers, nested structs and lists recurse).
fn struct_to_json(s: &Struct) -> serde_json::Value {
    // Sorted keys keep the rendering stable.
    let sorted: BTreeMap<&String, &Value> = s.fields.iter().collect();
    serde_json::Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect::<Map<_, _>>())
}

fn value_to_json(v: &Value) -> serde_json::Value {
    match v.kind.as_ref() {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => json!(n),
        Some(Kind::StringValue(s)) => json!(s),
        Some(Kind::BoolValue(b)) => json!(b),
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(l)) => serde_json::Value::Array(l.values.iter().map(value_to_json).collect()),
    }
}

fn check_label_key(key: &str) -> Result<(), String> {
    let name = match key.rsplit_once('/') {
        Some((prefix, name)) => {
            check_dns_subdomain(prefix).map_err(|e| format!("has prefix {prefix:?} that {e}"))?;
            name
        }
        None => key,
    };
    if name.is_empty() {
        return Err("has an empty name".to_string());
    }
    check_label_chars(name)
}

fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    check_label_chars(value)
}

fn check_label_chars(s: &str) -> Result<(), String> {
    if s.len() > LABEL_MAX {
        return Err(format!("is {} characters long, at most {LABEL_MAX} allowed", s.len()));
    }
    if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!("contains {c:?}; allowed are letters, digits, '-', '_' and '.'"));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alnum(s.chars().next()) || !alnum(s.chars().last()) {
        return Err("must start and end with a letter or digit".to_string());
    }
    Ok(())
}

fn check_dns_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > LABEL_PREFIX_MAX {
        return Err(format!("is not 1..={LABEL_PREFIX_MAX} characters"));
    }
    for part in s.split('.') {
        let ok = !part.is_empty()
            && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !part.starts_with('-')
            && !part.ends_with('-');
        if !ok {
            return Err("is not a DNS subdomain (lowercase letters, digits, '-' and '.')".to_string());
        }
    }
    Ok(())
}

fn check_port_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".to_string());
    }
    if name.len() > PORT_NAME_MAX {
        return Err(format!("is {} characters long, at most {PORT_NAME_MAX} allowed", name.len()));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')) {
        return Err(format!("contains {c:?}; allowed are lowercase letters, digits and '-'"));
    }
    if !name.chars().any(|c| c.is_ascii_lowercase()) {
        return Err("must contain a letter".to_string());
    }
    if name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return Err("must not start or end with '-' or contain \"--\"".to_string());
    }
    Ok(())
}

fn is_app_protocol(p: &str) -> bool {
    !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'))
}

#[cfg(test)]
mod tests;
