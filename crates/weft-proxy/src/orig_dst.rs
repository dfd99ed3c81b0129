//! The original destination of a connection redirected by iptables (`SO_ORIGINAL_DST`).

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// The address the client originally dialled, when the connection was redirected by an
/// iptables REDIRECT/TPROXY rule; `None` when it was not redirected or the platform has
/// no such option.
#[cfg(target_os = "linux")]
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    let local = stream.local_addr().ok()?;
    let dst = if local.is_ipv4() {
        let sin = getsockopt(stream, sockopt::OriginalDst).ok()?;
        SocketAddr::from((std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)), u16::from_be(sin.sin_port)))
    } else {
        let sin6 = getsockopt(stream, sockopt::Ip6tOriginalDst).ok()?;
        SocketAddr::from((std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr), u16::from_be(sin6.sin6_port)))
    };
    // Without a redirect the kernel reports the local address itself.
    (dst != local).then_some(dst)
}

/// Non-Linux platforms have no transparent interception.
#[cfg(not(target_os = "linux"))]
pub fn original_dst(_stream: &TcpStream) -> Option<SocketAddr> {
    None
}
