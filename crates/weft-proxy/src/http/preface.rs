//! Which HTTP version a downstream connection speaks, decided before it is served: the
//! ALPN protocol its TLS handshake negotiated, or else its first bytes (HTTP/2's
//! connection preface, RFC 9113 §3.4; anything else is HTTP/1.x), read into a small
//! buffer that [`crate::io::Replay`] hands back to the server first. hyper-util's `auto` builder
//! did the same inside its connection future; deciding here lets each version get its
//! own I/O stack (write coalescing for HTTP/2 only) and its own server.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// HTTP/2's client connection preface.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The HTTP version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0 or HTTP/1.1.
    Http1,
    /// HTTP/2 (negotiated with ALPN `h2`, or prior knowledge).
    Http2,
}

/// What the transport said about the version before any byte was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// TLS negotiated `h2`.
    H2,
    /// TLS negotiated `http/1.1` (or `http/1.0`).
    Http1,
    /// Plain TCP, TLS without ALPN, or another protocol: the first bytes decide.
    None,
}

impl Alpn {
    /// The version ALPN `protocol` names, if any.
    pub fn from_protocol(protocol: Option<&[u8]>) -> Alpn {
        match protocol {
            Some(b"h2") => Alpn::H2,
            Some(b"http/1.1" | b"http/1.0") => Alpn::Http1,
            _ => Alpn::None,
        }
    }
}

/// Reads the client's first bytes from `io` until they tell the version: the whole
/// preface (HTTP/2), a byte that differs from it, or the end of the stream (HTTP/1.x:
/// hyper then reads what was sent, or sees the connection close). Returns the version
/// and the bytes read, which the server must read again first ([`crate::io::Replay`]).
pub async fn detect<S: AsyncRead + Unpin>(io: &mut S) -> io::Result<(Version, Vec<u8>)> {
    let mut read = [0u8; PREFACE.len()];
    let mut len = 0;
    while len < PREFACE.len() {
        let n = io.read(&mut read[len..]).await?;
        if n == 0 {
            return Ok((Version::Http1, read[..len].to_vec()));
        }
        let differs = read[len..len + n] != PREFACE[len..len + n];
        len += n;
        if differs {
            return Ok((Version::Http1, read[..len].to_vec()));
        }
    }
    Ok((Version::Http2, read.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn detect(sent: &[&[u8]]) -> (Version, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(1024);
        for s in sent {
            client.write_all(s).await.unwrap();
        }
        drop(client);
        let mut server = server;
        let (v, prefix) = super::detect(&mut server).await.unwrap();
        let mut io = crate::io::Replay::new(prefix, server);
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        (v, all)
    }

    #[tokio::test]
    async fn the_preface_is_http2_and_is_read_again_whole() {
        let mut sent = PREFACE.to_vec();
        sent.extend_from_slice(b"\0\0\0\x04");
        let (v, all) = detect(&[&sent[..5], &sent[5..]]).await;
        assert_eq!(v, Version::Http2);
        assert_eq!(all, sent);
    }

    #[tokio::test]
    async fn anything_else_is_http1_and_nothing_is_lost() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(detect(&[head]).await, (Version::Http1, head.to_vec()));
        // Starts like the preface, then differs.
        assert_eq!(detect(&[b"PRI ", b"/x HTTP/1.1\r\n"]).await, (Version::Http1, b"PRI /x HTTP/1.1\r\n".to_vec()));
        assert_eq!(detect(&[b"PR"]).await, (Version::Http1, b"PR".to_vec()));
    }

    #[test]
    fn alpn_names_the_version() {
        assert_eq!(Alpn::from_protocol(Some(b"h2")), Alpn::H2);
        assert_eq!(Alpn::from_protocol(Some(b"http/1.1")), Alpn::Http1);
        assert_eq!(Alpn::from_protocol(Some(b"istio-peer-exchange")), Alpn::None);
        assert_eq!(Alpn::from_protocol(None), Alpn::None);
    }
}
