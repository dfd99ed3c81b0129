//! Listening sockets, bound when LDS is applied: a listener whose address cannot be bound
//! (in use, not local, no permission) is rejected in the NACK with the reason, as Envoy
//! rejects it, instead of being ACKed and left unreachable. The listener manager takes
//! the bound sockets from here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use socket2::{Domain, Socket, Type};

/// Sockets bound for the listeners in force, by listener name.
#[derive(Debug, Default)]
pub struct ListenSockets {
    by_name: Mutex<BTreeMap<String, Held>>,
    /// Set once the proxy drains: nothing is bound any more.
    closed: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone)]
struct Held {
    configured: SocketAddr,
    socket: Arc<std::net::TcpListener>,
}

impl ListenSockets {
    /// Makes sure listener `name` has a socket bound to `addr`: keeps the one it has,
    /// takes over the socket of another listener configured with the same address (a
    /// renamed listener), or binds a new one.
    pub fn ensure(&self, name: &str, addr: SocketAddr) -> Result<(), String> {
        if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("the proxy is draining and binds no listener".into());
        }
        let mut held = self.lock();
        if held.get(name).is_some_and(|h| h.configured == addr) {
            return Ok(());
        }
        let other = (addr.port() != 0)
            .then(|| held.iter().find(|(n, h)| n.as_str() != name && h.configured == addr).map(|(n, _)| n.clone()))
            .flatten();
        let socket = match other.and_then(|n| held.remove(&n)) {
            Some(h) => h.socket,
            None => Arc::new(bind(addr).map_err(|e| format!("cannot bind {addr}: {e}"))?),
        };
        held.insert(name.to_string(), Held { configured: addr, socket });
        Ok(())
    }

    /// Drops the sockets of listeners `keep` does not name with the same address.
    pub fn retain(&self, keep: impl Fn(&str) -> Option<SocketAddr>) {
        self.lock().retain(|name, h| keep(name) == Some(h.configured));
    }

    /// Closes every socket (the proxy drains): new connections are refused from now on.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::Relaxed);
        self.lock().clear();
    }

    /// The socket bound for listener `name` and the address it was configured with.
    pub fn get(&self, name: &str) -> Option<(SocketAddr, Arc<std::net::TcpListener>)> {
        self.lock().get(name).map(|h| (h.configured, h.socket.clone()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Held>> {
        // Every mutation is a single insert/remove: a poisoned map is still consistent.
        self.by_name.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}
