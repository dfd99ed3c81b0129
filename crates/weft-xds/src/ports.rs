//! Ports for a process that binds them itself: a proxy, a control-plane replica or an
//! etcd member started by `weft up`, or by a test.
//!
//! Binding port 0 and closing the socket to reuse its port races with every other socket
//! on the machine: the kernel may give the same port to the next port-0 bind or outgoing
//! connection before the child binds it (seen as an ingress gateway that exited at start
//! while tests ran in parallel). [`reserve`] closes that window: it leaves the port in
//! TIME_WAIT, which keeps the kernel from handing it out to port-0 binds and outgoing
//! connections for a minute (TIME_WAIT lasts 60 s on Linux), while a listener that binds
//! it explicitly with `SO_REUSEADDR` (std, tokio, Go, weft's proxy and Envoy all set it)
//! gets it at once.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};

/// A free port on `ip`, reserved for about a minute for a listener that binds it
/// explicitly (see the module docs). Until then, connections to it are refused.
///
/// Binds port 0, connects to it and closes the accepted side first: the side that closes
/// first ends in TIME_WAIT, and the accepted socket's local address is the port.
pub fn reserve(ip: IpAddr) -> std::io::Result<SocketAddr> {
    reserve_exact(SocketAddr::new(ip, 0))
}

/// [`reserve`] for one given address (port 0: any).
pub fn reserve_exact(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let addr = listener.local_addr()?;
    let client = TcpStream::connect(addr)?;
    let (server, _) = listener.accept()?;
    drop(server);
    drop(client);
    Ok(addr)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Whether `/proc/net/tcp` has a TIME_WAIT socket (state 06) whose local address is
    /// `addr`: what keeps the kernel from handing the port to port-0 binds.
    fn in_time_wait(addr: SocketAddr) -> bool {
        let IpAddr::V4(ip) = addr.ip() else { return false };
        let local = format!("{:08X}:{:04X}", u32::from_le_bytes(ip.octets()), addr.port());
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        table.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"06")
        })
    }

    #[test]
    fn a_reserved_port_is_held_in_time_wait_and_binds_explicitly() {
        let addr = reserve(IpAddr::from([127, 0, 0, 1])).unwrap();
        assert!(in_time_wait(addr), "{addr} is not held in TIME_WAIT");
        assert_eq!(TcpStream::connect(addr).unwrap_err().kind(), std::io::ErrorKind::ConnectionRefused);
        // std sets SO_REUSEADDR, as the children do.
        let listener = TcpListener::bind(addr).expect("the reserved port binds explicitly");
        let client = TcpStream::connect(addr).unwrap();
        assert_eq!(listener.accept().unwrap().1, client.local_addr().unwrap());
    }
}
