//! Endpoints of a cluster, decoded from a `ClusterLoadAssignment`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{HealthStatus, Metadata};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, LbEndpoint};

use crate::cluster::ewma::EndpointLoad;
use crate::error::ConfigError;

/// One upstream host of a cluster.
#[derive(Debug)]
pub struct Endpoint {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Load-balancing weight (>= 1).
    pub weight: u32,
    /// Health as reported by EDS.
    pub health: Health,
    /// The endpoint's metadata (subsets, TLS mode, ...).
    pub metadata: Option<Metadata>,
    /// The `transport_socket_matches` entry of its cluster the metadata selects
    /// ([`ClusterConfig::socket_match`](super::ClusterConfig::socket_match)), decided when
    /// the cluster is built: the forwarding path takes its connector without looking at
    /// the metadata again.
    pub socket_match: Option<usize>,
    /// Outstanding requests and latency, shared across snapshots.
    pub load: Arc<EndpointLoad>,
}

/// Health of an endpoint as reported by the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// HEALTHY or UNKNOWN: takes traffic.
    Healthy,
    /// DEGRADED: takes traffic only when no healthy endpoint is left.
    Degraded,
    /// UNHEALTHY, DRAINING or TIMEOUT: never picked.
    Unhealthy,
}

/// The address of an `LbEndpoint` before DNS resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostAddr {
    /// An IP literal.
    Ip(SocketAddr),
    /// A hostname to resolve.
    Name(String, u16),
}

/// An endpoint decoded from the assignment, before it gets its shared load.
#[derive(Debug, Clone)]
pub(crate) struct RawEndpoint {
    pub(crate) priority: u32,
    /// Index of its `LocalityLbEndpoints` in the assignment.
    pub(crate) locality: usize,
    /// The locality's `load_balancing_weight` (0 when unset).
    pub(crate) locality_weight: u32,
    pub(crate) addr: HostAddr,
    pub(crate) weight: u32,
    pub(crate) health: Health,
    pub(crate) metadata: Option<Metadata>,
}

impl Health {
    /// Maps EDS `health_status` (Envoy's rules: UNKNOWN counts as healthy).
    pub fn from_eds(status: i32) -> Health {
        match HealthStatus::try_from(status) {
            Ok(HealthStatus::Healthy) | Ok(HealthStatus::Unknown) => Health::Healthy,
            Ok(HealthStatus::Degraded) => Health::Degraded,
            Ok(HealthStatus::Unhealthy) | Ok(HealthStatus::Draining) | Ok(HealthStatus::Timeout) => Health::Unhealthy,
            Err(_) => Health::Unhealthy,
        }
    }
}

/// Decodes every endpoint of `cla`, in order, with its priority. `hostnames` allows
/// non-IP addresses (DNS clusters); errors name the field under `field`.
pub(crate) fn decode_assignment(
    cluster: &str,
    field: &str,
    cla: &ClusterLoadAssignment,
    hostnames: bool,
) -> Result<Vec<RawEndpoint>, ConfigError> {
    let mut out = Vec::new();
    for (i, locality) in cla.endpoints.iter().enumerate() {
        for (j, lb) in locality.lb_endpoints.iter().enumerate() {
            let path = format!("{field}.endpoints[{i}].lb_endpoints[{j}]");
            let mut ep = decode_endpoint(cluster, &path, locality.priority, lb, hostnames)?;
            ep.locality = i;
            ep.locality_weight = locality.load_balancing_weight.as_ref().map_or(0, |w| w.value);
            out.push(ep);
        }
    }
    Ok(out)
}

fn decode_endpoint(
    cluster: &str,
    path: &str,
    priority: u32,
    lb: &LbEndpoint,
    hostnames: bool,
) -> Result<RawEndpoint, ConfigError> {
    let err = |f: &str, m: String| ConfigError::new(cluster, format!("{path}.{f}"), m);
    let endpoint = match &lb.host_identifier {
        Some(HostIdentifier::Endpoint(e)) => e,
        Some(HostIdentifier::EndpointName(n)) => {
            return Err(err("endpoint_name", format!("named endpoints are not supported ({n:?})")))
        }
        None => return Err(err("endpoint", "missing endpoint".into())),
    };
    let sa = match endpoint.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(AddressKind::SocketAddress(sa)) => sa,
        Some(_) => {
            return Err(err(
                "endpoint.address",
                "only socket addresses are supported (no pipes or internal addresses)".into(),
            ))
        }
        None => return Err(err("endpoint.address", "missing address".into())),
    };
    let port = match &sa.port_specifier {
        Some(PortSpecifier::PortValue(p)) => u16::try_from(*p)
            .map_err(|_| err("endpoint.address.socket_address.port_value", format!("port {p} is out of range")))?,
        Some(PortSpecifier::NamedPort(n)) => {
            return Err(err(
                "endpoint.address.socket_address.named_port",
                format!("named ports are not supported ({n:?})"),
            ))
        }
        None => return Err(err("endpoint.address.socket_address.port_value", "missing port".into())),
    };
    let addr = match sa.address.parse::<IpAddr>() {
        Ok(ip) => HostAddr::Ip(SocketAddr::new(ip, port)),
        Err(_) if hostnames && is_hostname(&sa.address) => HostAddr::Name(sa.address.clone(), port),
        Err(_) if !hostnames => {
            return Err(err(
                "endpoint.address.socket_address.address",
                format!("expected an IP address, got {:?} (hostnames need STRICT_DNS or LOGICAL_DNS)", sa.address),
            ))
        }
        Err(_) => {
            return Err(err(
                "endpoint.address.socket_address.address",
                format!("{:?} is neither an IP address nor a hostname", sa.address),
            ))
        }
    };
    let weight = lb.load_balancing_weight.as_ref().map_or(1, |w| w.value);
    if weight == 0 {
        return Err(err("load_balancing_weight", "weight must be at least 1".into()));
    }
    Ok(RawEndpoint {
        priority,
        locality: 0,
        locality_weight: 0,
        addr,
        weight,
        health: Health::from_eds(lb.health_status),
        metadata: lb.metadata.clone(),
    })
}

fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
        })
}
