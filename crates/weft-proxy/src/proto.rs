//! Helpers for the xDS protos every stage compiles: typed `Any` decoding, durations,
//! socket addresses.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{address, socket_address, Address};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};
use prost::{Message, Name};

/// Decodes an `Any` after checking its type.
pub fn decode<M: Message + Name + Default>(any: &Any) -> Result<M, String> {
    if any.type_url != M::type_url() {
        return Err(format!("expected {}, got {}", M::type_url(), any.type_url));
    }
    M::decode(any.value.as_slice()).map_err(|e| format!("cannot decode {}: {e}", M::full_name()))
}

/// A protobuf duration as a std one (negative -> zero).
pub fn opt_duration(d: Option<&PbDuration>) -> Option<Duration> {
    d.map(
        |d| {
            if d.seconds < 0 || d.nanos < 0 {
                Duration::ZERO
            } else {
                Duration::new(d.seconds as u64, d.nanos as u32)
            }
        },
    )
}

/// A socket address from an Envoy `Address`.
pub fn socket_addr(a: Option<&Address>) -> Result<SocketAddr, String> {
    let sa = match a.and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(sa)) => sa,
        Some(_) => return Err("only socket_address is supported".into()),
        None => return Err("socket_address is required".into()),
    };
    let ip: IpAddr = sa.address.parse().map_err(|_| format!("{:?} is not an IP address", sa.address))?;
    let port = match sa.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) => {
            u16::try_from(p).map_err(|_| format!("port {p} is out of range"))?
        }
        Some(socket_address::PortSpecifier::NamedPort(_)) => return Err("named ports are not supported".into()),
        None => 0,
    };
    Ok(SocketAddr::new(ip, port))
}
