//! Kubernetes `Service` and weft's own `LocalWorkload`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Kubernetes `Service` spec (the parts a mesh uses, plus common fields accepted as-is).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// Pods selected by labels.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// ClusterIP, NodePort, LoadBalancer or ExternalName.
    #[serde(default, rename = "type")]
    pub service_type: Option<String>,
    /// Cluster IP (`None` for headless).
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// Cluster IPs.
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    /// External name.
    #[serde(default)]
    pub external_name: Option<String>,
    /// External IPs.
    #[serde(default, rename = "externalIPs")]
    pub external_ips: Vec<String>,
    /// Session affinity.
    #[serde(default)]
    pub session_affinity: Option<String>,
    /// Load balancer IP.
    #[serde(default, rename = "loadBalancerIP")]
    pub load_balancer_ip: Option<String>,
    /// External traffic policy.
    #[serde(default)]
    pub external_traffic_policy: Option<String>,
    /// Internal traffic policy.
    #[serde(default)]
    pub internal_traffic_policy: Option<String>,
    /// IP families.
    #[serde(default)]
    pub ip_families: Vec<String>,
    /// IP family policy.
    #[serde(default)]
    pub ip_family_policy: Option<String>,
    /// Publish not-ready addresses.
    #[serde(default)]
    pub publish_not_ready_addresses: Option<bool>,
}

/// A Service port.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// Port name (Istio derives the protocol from a `http-`, `grpc-`, `tcp-` ... prefix).
    #[serde(default)]
    pub name: Option<String>,
    /// Service port.
    pub port: u32,
    /// Target port on the pod: a number or a named container port.
    #[serde(default)]
    pub target_port: Option<TargetPort>,
    /// TCP, UDP or SCTP (default TCP).
    #[serde(default)]
    pub protocol: Option<String>,
    /// Application protocol (`http`, `http2`, `grpc`, `tcp`, `tls`, ...).
    #[serde(default)]
    pub app_protocol: Option<String>,
    /// Node port.
    #[serde(default)]
    pub node_port: Option<u32>,
}

/// A target port: number or name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetPort {
    /// By number.
    Number(u32),
    /// By container port name.
    Name(String),
}

/// weft `LocalWorkload` (`weft.dev/v1alpha1`): a process run beside a local proxy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalWorkload {
    /// Workload labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Service account (identity).
    #[serde(default)]
    pub service_account: Option<String>,
    /// Command line (`$(VAR)` expands as in Kubernetes).
    #[serde(default)]
    pub command: Vec<String>,
    /// Arguments appended to `command` (Kubernetes' `args`).
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Ports the workload listens on.
    #[serde(default)]
    pub ports: Vec<WorkloadPort>,
}

/// A LocalWorkload port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadPort {
    /// Name.
    pub name: String,
    /// Port number.
    pub port: u32,
    /// Protocol (HTTP, HTTP2, GRPC, TCP, ...).
    #[serde(default)]
    pub protocol: Option<String>,
}

impl ServicePort {
    /// The protocol Istio derives for this port: `appProtocol` first, then the
    /// port name (`http`, `http-web`, `grpc-api`, ...). `None` means undeclared:
    /// the proxy sniffs the protocol.
    pub fn declared_protocol(&self) -> Option<&'static str> {
        if let Some(p) = self.app_protocol.as_deref().and_then(protocol_of) {
            return Some(p);
        }
        let name = self.name.as_deref()?.to_ascii_lowercase();
        if let Some(p) = protocol_of(&name) {
            return Some(p);
        }
        // `grpc-web-x` must win over `grpc-x`.
        if name.starts_with("grpc-web-") {
            return Some("GRPC-WEB");
        }
        name.split_once('-').and_then(|(prefix, _)| protocol_of(prefix))
    }
}

fn protocol_of(s: &str) -> Option<&'static str> {
    Some(match s.to_ascii_lowercase().as_str() {
        "http" | "kubernetes.io/ws" | "kubernetes.io/wss" => "HTTP",
        "http2" | "kubernetes.io/h2c" => "HTTP2",
        "https" => "HTTPS",
        "grpc" => "GRPC",
        "grpc-web" => "GRPC-WEB",
        "tcp" => "TCP",
        "tls" => "TLS",
        "mongo" => "MONGO",
        "mysql" => "MYSQL",
        "redis" => "REDIS",
        "udp" => "UDP",
        _ => return None,
    })
}

/// Kubernetes' `$(VAR)` expansion (container `command`, `args`, `env` values): a defined variable is replaced, an undefined one is
/// left as written, `$$` is a literal `$`.
pub fn expand_vars(s: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match lookup(name) {
                        Some(v) => out.push_str(&v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str(&rest[i..]);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: Option<&str>, app: Option<&str>) -> ServicePort {
        ServicePort {
            name: name.map(String::from),
            port: 80,
            app_protocol: app.map(String::from),
            ..ServicePort::default()
        }
    }

    #[test]
    fn protocol_comes_from_app_protocol_then_name_prefix() {
        assert_eq!(port(Some("http"), None).declared_protocol(), Some("HTTP"));
        assert_eq!(port(Some("http2-api"), None).declared_protocol(), Some("HTTP2"));
        assert_eq!(port(Some("grpc-web-ui"), None).declared_protocol(), Some("GRPC-WEB"));
        assert_eq!(port(Some("grpc-api"), None).declared_protocol(), Some("GRPC"));
        assert_eq!(port(Some("tcp-other"), None).declared_protocol(), Some("TCP"));
        assert_eq!(port(Some("web"), Some("http")).declared_protocol(), Some("HTTP"));
        assert_eq!(port(Some("http"), Some("kubernetes.io/h2c")).declared_protocol(), Some("HTTP2"));
        assert_eq!(port(Some("web"), None).declared_protocol(), None);
        assert_eq!(port(Some("httpx"), None).declared_protocol(), None);
        assert_eq!(port(None, None).declared_protocol(), None);
    }
}
