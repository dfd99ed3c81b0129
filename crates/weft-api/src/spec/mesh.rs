//! `networking.istio.io` ServiceEntry, WorkloadEntry, Sidecar and Gateway.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::common::{Port, WorkloadSelector};
use super::networking::ConnectionPoolSettings;

/// Where a ServiceEntry's service lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    /// Outside the mesh (no mTLS).
    MeshExternal,
    /// Part of the mesh.
    MeshInternal,
}

/// How endpoints of a ServiceEntry are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// Use the original destination address.
    None,
    /// Use the listed endpoints.
    Static,
    /// Resolve the host (or endpoint addresses) with DNS.
    Dns,
    /// DNS, first address only, round robin.
    DnsRoundRobin,
}

/// Istio `ServiceEntry`: adds a service to the registry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntry {
    /// Hosts.
    pub hosts: Vec<String>,
    /// Virtual IPs.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<Port>,
    /// Location (default MESH_EXTERNAL).
    #[serde(default)]
    pub location: Option<Location>,
    /// Resolution (default NONE).
    #[serde(default)]
    pub resolution: Option<Resolution>,
    /// Static endpoints.
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntry>,
    /// Select WorkloadEntries / pods instead of endpoints.
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
    /// Visibility.
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Accepted SANs.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

/// Istio `WorkloadEntry`: a non-Kubernetes workload (VM, bare metal).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntry {
    /// IP address or DNS name (or unix socket).
    #[serde(default)]
    pub address: Option<String>,
    /// Port name -> port number.
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Network.
    #[serde(default)]
    pub network: Option<String>,
    /// Locality `region/zone/subzone`.
    #[serde(default)]
    pub locality: Option<String>,
    /// Load-balancing weight.
    #[serde(default)]
    pub weight: Option<u32>,
    /// Service account.
    #[serde(default)]
    pub service_account: Option<String>,
}

/// Istio `Sidecar`: scopes what a proxy sees and how it listens.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Sidecar {
    /// Workloads (empty: all in the namespace).
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
    /// Inbound listeners.
    #[serde(default)]
    pub ingress: Vec<IstioIngressListener>,
    /// Outbound scope.
    #[serde(default)]
    pub egress: Vec<IstioEgressListener>,
    /// Policy for unknown destinations.
    #[serde(default)]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    /// Inbound pool settings.
    #[serde(default)]
    pub inbound_connection_pool: Option<ConnectionPoolSettings>,
}

/// Inbound listener.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioIngressListener {
    /// Port.
    pub port: Option<Port>,
    /// Bind address.
    #[serde(default)]
    pub bind: Option<String>,
    /// `DEFAULT`, `IPTABLES` or `NONE`.
    #[serde(default)]
    pub capture_mode: Option<String>,
    /// Where to forward (`127.0.0.1:PORT`, `0.0.0.0:PORT`, `unix://...`).
    #[serde(default)]
    pub default_endpoint: Option<String>,
    /// Server TLS (raw).
    #[serde(default)]
    pub tls: Option<serde_json::Value>,
    /// Pool settings.
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSettings>,
}

/// Outbound listener / scope.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioEgressListener {
    /// Port (absent: all ports).
    #[serde(default)]
    pub port: Option<Port>,
    /// Bind address.
    #[serde(default)]
    pub bind: Option<String>,
    /// `DEFAULT`, `IPTABLES` or `NONE`.
    #[serde(default)]
    pub capture_mode: Option<String>,
    /// `namespace/dnsName` entries.
    pub hosts: Vec<String>,
}

/// Outbound traffic policy mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundMode {
    /// Only registered services.
    RegistryOnly,
    /// Pass unknown destinations through.
    AllowAny,
}

/// Outbound traffic policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundTrafficPolicy {
    /// Mode.
    #[serde(default)]
    pub mode: Option<OutboundMode>,
    /// Egress proxy (raw Destination).
    #[serde(default)]
    pub egress_proxy: Option<serde_json::Value>,
}

/// Istio `Gateway`: a load balancer at the mesh edge.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Gateway {
    /// Servers.
    pub servers: Vec<Server>,
    /// Pods implementing the gateway (by labels, any namespace).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

/// A gateway server (port + hosts + TLS).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Server {
    /// Port.
    pub port: Port,
    /// Bind address.
    #[serde(default)]
    pub bind: Option<String>,
    /// Hosts (`ns/host` allowed).
    pub hosts: Vec<String>,
    /// TLS.
    #[serde(default)]
    pub tls: Option<ServerTlsSettings>,
    /// Default endpoint.
    #[serde(default)]
    pub default_endpoint: Option<String>,
    /// Server name.
    #[serde(default)]
    pub name: Option<String>,
}

/// Server TLS modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServerTlsMode {
    /// SNI passthrough.
    Passthrough,
    /// Terminate TLS.
    Simple,
    /// Terminate mTLS.
    Mutual,
    /// SNI passthrough for mesh services.
    AutoPassthrough,
    /// Istio mTLS.
    IstioMutual,
    /// Optional client cert.
    OptionalMutual,
}

/// Server TLS settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerTlsSettings {
    /// Redirect HTTP to HTTPS.
    #[serde(default)]
    pub https_redirect: Option<bool>,
    /// Mode.
    #[serde(default)]
    pub mode: Option<ServerTlsMode>,
    /// Cert path.
    #[serde(default)]
    pub server_certificate: Option<String>,
    /// Key path.
    #[serde(default)]
    pub private_key: Option<String>,
    /// CA path.
    #[serde(default)]
    pub ca_certificates: Option<String>,
    /// CRL path.
    #[serde(default)]
    pub ca_crl: Option<String>,
    /// Secret name.
    #[serde(default)]
    pub credential_name: Option<String>,
    /// Several secrets.
    #[serde(default)]
    pub credential_names: Vec<String>,
    /// Accepted client SANs.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// SPKI pins.
    #[serde(default)]
    pub verify_certificate_spki: Vec<String>,
    /// Cert hash pins.
    #[serde(default)]
    pub verify_certificate_hash: Vec<String>,
    /// Min TLS version.
    #[serde(default)]
    pub min_protocol_version: Option<String>,
    /// Max TLS version.
    #[serde(default)]
    pub max_protocol_version: Option<String>,
    /// Cipher suites.
    #[serde(default)]
    pub cipher_suites: Vec<String>,
}
