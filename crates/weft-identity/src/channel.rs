//! gRPC over TLS on the control channel without tonic's own TLS: the client side dials
//! TCP, runs a rustls handshake with a config of ours (SPIFFE verifiers, the proxy's
//! rotating certificate) and hands tonic the stream; the server side wraps each
//! handshaken stream so tonic puts its [`TlsPeer`] (remote address, verified client
//! identity) in every request's extensions, where the certificate service and the xDS
//! admission read it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::codegen::http::Uri;
use tonic::codegen::{BoxFuture, Service};
use tonic::transport::{Channel, Endpoint};

use crate::SpiffeId;

/// ALPN of gRPC over TLS.
pub const ALPN_H2: &[u8] = b"h2";

/// How long a TLS handshake on the control channel may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a TLS listener of the control plane learned about a connection; tonic copies it
/// into each request's extensions (`request.extensions().get::<TlsPeer>()`).
#[derive(Clone, Debug)]
pub struct TlsPeer {
    /// The peer's address.
    pub remote_addr: Option<SocketAddr>,
    /// The SPIFFE id of the client certificate, verified against the mesh's trust
    /// bundle during the handshake (None: the client sent no certificate).
    pub identity: Option<SpiffeId>,
}

/// A server-side TLS stream that tells tonic who the peer is.
pub struct TlsServerStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: TlsPeer,
}

impl TlsServerStream {
    /// Wraps a handshaken stream; the client's identity is read from its certificate.
    pub fn new(inner: tokio_rustls::server::TlsStream<TcpStream>) -> Self {
        let (tcp, conn) = inner.get_ref();
        let peer = TlsPeer {
            remote_addr: tcp.peer_addr().ok(),
            identity: crate::tls::peer_identity(conn.peer_certificates()),
        };
        TlsServerStream { inner, peer }
    }

    /// The connection's peer.
    pub fn peer(&self) -> &TlsPeer {
        &self.peer
    }
}

impl tonic::transport::server::Connected for TlsServerStream {
    type ConnectInfo = TlsPeer;

    fn connect_info(&self) -> TlsPeer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsServerStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsServerStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Dials `host:port` of the URI and runs the TLS handshake with its config; what tonic
/// calls for every new connection of a channel (see [`tls_channel`]).
#[derive(Clone)]
pub struct TlsConnector {
    config: Arc<rustls::ClientConfig>,
}

impl TlsConnector {
    /// A connector with `config` (ALPN `h2` is set here).
    pub fn new(mut config: rustls::ClientConfig) -> Self {
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        TlsConnector { config: Arc::new(config) }
    }
}

impl Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.config.clone();
        Box::pin(async move {
            let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
            let host = uri.host().ok_or_else(|| invalid(format!("{uri}: no host")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            // Names are not checked (SPIFFE verifiers look at the URI SAN), but rustls
            // needs one: the host as written, an IP or a DNS name.
            let name = ServerName::try_from(host.clone()).map_err(|e| invalid(format!("{host}: {e}")))?;
            let tls =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_rustls::TlsConnector::from(config).connect(name, tcp))
                    .await
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
            Ok(TokioIo::new(tls))
        })
    }
}

/// The URI tonic dials for `address` (`https://host:port` or `http://host:port`): always
/// `http://`, TLS being the connector's.
pub fn plain_uri(address: &str) -> String {
    match address.strip_prefix("https://") {
        Some(rest) => format!("http://{rest}"),
        None => address.to_string(),
    }
}

/// A channel to `endpoint` whose connections are TLS with `config`, connected on first
/// use (and again after failures).
pub fn tls_channel_lazy(endpoint: Endpoint, config: rustls::ClientConfig) -> Channel {
    endpoint.connect_with_connector_lazy(TlsConnector::new(config))
}

/// A channel to `endpoint` whose connections are TLS with `config`, connected now.
pub async fn tls_channel(endpoint: Endpoint, config: rustls::ClientConfig) -> Result<Channel, String> {
    endpoint.connect_with_connector(TlsConnector::new(config)).await.map_err(|e| {
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg = format!("{msg}: {s}");
            source = s.source();
        }
        msg
    })
}
