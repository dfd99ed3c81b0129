//! Addresses for things a test cannot hand a bound socket to: a proxy or a child process
//! that binds the address itself, or an endpoint that must refuse connections. The
//! reservation is [`weft_xds::ports`]'s (the port left in TIME_WAIT, so no other port-0
//! bind or outgoing connection takes it before the child binds it with `SO_REUSEADDR`).
//! Where the test itself is the server, bind `127.0.0.1:0` and keep the listener instead.

use std::net::SocketAddr;

/// Bind attempts before [`reserve_consecutive`] gives up.
const CONSECUTIVE_TRIES: usize = 100;

/// A loopback address with nothing listening on it, reserved for about a minute for a
/// listener that binds it explicitly (see the module docs). Until then, connections to it
/// are refused, so it also serves as a dead endpoint.
///
/// # Panics
/// When loopback sockets cannot be created (a broken test machine).
pub fn reserve_addr() -> SocketAddr {
    reserve("127.0.0.1:0".parse().expect("a socket address")).expect("reserve a port on 127.0.0.1")
}

/// The first of `n` consecutive reserved loopback addresses (for a proxy that binds
/// `inbound|PORT` listeners on consecutive ports from one address).
///
/// # Panics
/// When no run of `n` free ports turns up after many tries.
pub fn reserve_consecutive(n: u16) -> SocketAddr {
    for _ in 0..CONSECUTIVE_TRIES {
        let first = reserve_addr();
        if u32::from(first.port()) + u32::from(n) > u32::from(u16::MAX) {
            continue;
        }
        let rest = (1..n).map(|i| SocketAddr::new(first.ip(), first.port() + i));
        if rest.map(reserve).all(|r| r.is_ok()) {
            return first;
        }
    }
    panic!("no {n} consecutive free loopback ports in {CONSECUTIVE_TRIES} tries")
}

/// [`weft_xds::ports::reserve_exact`]: the port left in TIME_WAIT (see the module docs).
fn reserve(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    weft_xds::ports::reserve_exact(addr)
}

/// The port of [`reserve_addr`], for command lines that take a port number.
pub fn reserve_port() -> u16 {
    reserve_addr().port()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_reserved_address_refuses_connections_and_can_be_bound_explicitly() {
        let addr = reserve_addr();
        assert_eq!(TcpStream::connect(addr).unwrap_err().kind(), std::io::ErrorKind::ConnectionRefused);
        let listener = TcpListener::bind(addr).expect("the reserved port binds with SO_REUSEADDR");
        let client = TcpStream::connect(addr).unwrap();
        assert_eq!(listener.accept().unwrap().1, client.local_addr().unwrap());
    }

    #[test]
    fn consecutive_reservations_are_consecutive_and_bindable() {
        let first = reserve_consecutive(3);
        for i in 0..3 {
            let addr = SocketAddr::new(first.ip(), first.port() + i);
            assert_eq!(TcpStream::connect(addr).unwrap_err().kind(), std::io::ErrorKind::ConnectionRefused);
            TcpListener::bind(addr).expect("a reserved port binds with SO_REUSEADDR");
        }
    }

    #[test]
    fn port_zero_binds_never_get_a_reserved_port() {
        let reserved: Vec<u16> = (0..50).map(|_| reserve_port()).collect();
        let bound: Vec<TcpListener> = (0..900).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        for l in &bound {
            let port = l.local_addr().unwrap().port();
            assert!(!reserved.contains(&port), "port {port} was reserved but handed to a port-0 bind");
        }
    }
}
