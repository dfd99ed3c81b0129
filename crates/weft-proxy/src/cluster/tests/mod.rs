//! Tests of the cluster stage: compile, balancing, pools.

mod balance;
mod breaker;
mod compile;
mod h1_client;
mod h2_client;
mod locality;
mod pool;

use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{Address, HealthStatus, SocketAddress};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as XdsEndpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::google::protobuf::UInt32Value;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::cluster::{Endpoint, EndpointLoad, Health};

/// A healthy endpoint of weight 1 at `addr`, no metadata.
pub(super) fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint {
        addr,
        weight: 1,
        health: Health::Healthy,
        metadata: None,
        socket_match: None,
        load: Arc::new(EndpointLoad::new()),
    }
}

/// An `LbEndpoint` at `host:port` with `weight` and `health`.
pub(super) fn lb_endpoint(host: &str, port: u32, weight: u32, health: HealthStatus) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(HostIdentifier::Endpoint(XdsEndpoint {
            address: Some(Address {
                address: Some(AddressKind::SocketAddress(SocketAddress {
                    address: host.to_string(),
                    port_specifier: Some(PortSpecifier::PortValue(port)),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        health_status: health as i32,
        load_balancing_weight: Some(UInt32Value { value: weight }),
        ..Default::default()
    }
}

/// An assignment with one locality per priority.
pub(super) fn cla(name: &str, levels: Vec<(u32, Vec<LbEndpoint>)>) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: levels
            .into_iter()
            .map(|(priority, lb_endpoints)| LocalityLbEndpoints { priority, lb_endpoints, ..Default::default() })
            .collect(),
        ..Default::default()
    }
}
