//! Opaque TCP servers: a client-first echo and a server-first banner (like MySQL).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use super::bind_loopback;

/// TCP server on `127.0.0.1:0` that echoes every byte back; stops when dropped.
pub struct TcpEchoServer {
    /// The bound address.
    pub addr: SocketAddr,
    connections: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

/// Server-first TCP server on `127.0.0.1:0`: writes its greeting as soon as a connection
/// is accepted, then echoes whatever the client sends; stops when dropped.
pub struct BannerServer {
    /// The bound address.
    pub addr: SocketAddr,
    /// The greeting written on accept.
    pub greeting: Bytes,
    connections: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl TcpEchoServer {
    /// Binds `127.0.0.1:0` and serves until dropped.
    ///
    /// # Panics
    /// If the loopback listener cannot be bound.
    pub async fn start() -> Self {
        let listener = bind_loopback().await;
        let addr = listener.local_addr().expect("local_addr of a bound listener");
        let connections = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(serve(listener, connections.clone(), Bytes::new()));
        TcpEchoServer { addr, connections, task }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for TcpEchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BannerServer {
    /// Binds `127.0.0.1:0`; every accepted connection first receives `greeting`.
    ///
    /// # Panics
    /// If the loopback listener cannot be bound.
    pub async fn start(greeting: impl Into<Bytes>) -> Self {
        let greeting = greeting.into();
        let listener = bind_loopback().await;
        let addr = listener.local_addr().expect("local_addr of a bound listener");
        let connections = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(serve(listener, connections.clone(), greeting.clone()));
        BannerServer { addr, greeting, connections, task }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for BannerServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, connections: Arc<AtomicU64>, greeting: Bytes) {
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors or similar: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        connections.fetch_add(1, Ordering::SeqCst);
        conns.spawn(echo_conn(stream, greeting.clone()));
    }
}

async fn echo_conn(mut stream: TcpStream, greeting: Bytes) {
    if !greeting.is_empty() && stream.write_all(&greeting).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = stream.shutdown().await;
                return;
            }
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
