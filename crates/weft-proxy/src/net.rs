//! Address arithmetic shared by filter-chain matching and RBAC.

use std::net::IpAddr;

/// True when `ip` lies in `net/len`.
pub fn in_range(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let len = u32::from(len.min(32));
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            (u32::from(a) & mask) == (u32::from(b) & mask)
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let len = u32::from(len.min(128));
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            (u128::from(a) & mask) == (u128::from(b) & mask)
        }
        (IpAddr::V4(a), IpAddr::V6(_)) => in_range(IpAddr::V6(a.to_ipv6_mapped()), net, len),
        (IpAddr::V6(a), IpAddr::V4(_)) => match a.to_ipv4_mapped() {
            Some(v4) => in_range(IpAddr::V4(v4), net, len),
            None => false,
        },
    }
}
