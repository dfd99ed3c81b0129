//! Istio's TCP metadata exchange: on a mutual-TLS connection whose ALPN settled on
//! `istio-peer-exchange`, each side first writes one frame with its own metadata
//! ([`weft_xds::peer::tcp_frame`]) and reads the peer's, then the stream is the
//! application's. It tells the TCP metrics of both reporters which workload is on the
//! other end, as the HTTP headers do for requests ([`super::peer`]).
//!
//! Both sides write at once, so neither waits on the other's application (a
//! server-first protocol works). Reading is bounded in size and time; bytes read that
//! turn out not to be a frame (a peer without the exchange) are handed on untouched.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use weft_xds::peer::{decode_tcp_payload, TCP_FRAME_MAGIC};

use super::WorkloadInfo;
use crate::io::Replay;

/// How long the exchange may take before the connection is given up.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest frame payload kept; a longer one is skipped (read and dropped).
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Whether a TLS session's negotiated ALPN asks for the exchange.
pub fn negotiated(alpn: Option<&[u8]>) -> bool {
    alpn == Some(weft_xds::peer::TCP_EXCHANGE_ALPN.as_bytes())
}

/// Writes `frame` (this proxy's, [`super::peer::LocalPeer::tcp_frame`]) and reads the
/// peer's. Returns the stream, replaying whatever was read that was not a frame, and the
/// peer's workload when its frame decoded. An I/O error or [`EXCHANGE_TIMEOUT`] fails it.
pub async fn exchange<S>(mut stream: S, frame: &[u8]) -> io::Result<(Replay<S>, Option<Arc<WorkloadInfo>>)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let work = async {
        stream.write_all(frame).await?;
        stream.flush().await?;
        let mut head = [0u8; 8];
        let mut got = 0;
        while got < head.len() {
            let n = stream.read(&mut head[got..]).await?;
            if n == 0 {
                break;
            }
            got += n;
            // A peer without the exchange: stop at the first byte that is not the magic.
            let m = got.min(4);
            if head[..m] != TCP_FRAME_MAGIC.to_be_bytes()[..m] {
                return Ok((head[..got].to_vec(), None));
            }
        }
        if got < head.len() {
            return Ok((head[..got].to_vec(), None));
        }
        let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
        if len > MAX_PAYLOAD {
            let skipped = tokio::io::copy(&mut (&mut stream).take(len as u64), &mut tokio::io::sink()).await?;
            if skipped < len as u64 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer metadata frame cut short"));
            }
            return Ok((Vec::new(), None));
        }
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await?;
        let peer = decode_tcp_payload(&payload).map(|m| Arc::new(super::peer::workload_of(&m)));
        Ok((Vec::new(), peer))
    };
    let (prefix, peer) = tokio::time::timeout(EXCHANGE_TIMEOUT, work)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "peer metadata exchange timed out"))??;
    Ok((Replay::new(prefix, stream), peer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_xds::peer::{tcp_frame, PeerMetadata};

    fn meta(workload: &str) -> PeerMetadata {
        PeerMetadata {
            id: format!("sidecar~10.0.0.1~{workload}-1.default~default.svc.cluster.local"),
            namespace: "default".into(),
            workload_name: workload.into(),
            ..PeerMetadata::default()
        }
    }

    #[tokio::test]
    async fn both_sides_learn_the_other_and_application_bytes_follow_intact() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let client = tokio::spawn(async move {
            let (mut s, peer) = exchange(a, &tcp_frame(&meta("client"))).await.unwrap();
            s.write_all(b"ping").await.unwrap();
            let mut reply = [0u8; 4];
            s.read_exact(&mut reply).await.unwrap();
            (peer.unwrap().workload.clone(), reply)
        });
        let (mut s, peer) = exchange(b, &tcp_frame(&meta("server"))).await.unwrap();
        assert_eq!(peer.unwrap().workload, "client");
        let mut got = [0u8; 4];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        s.write_all(b"pong").await.unwrap();
        let (server, reply) = client.await.unwrap();
        assert_eq!(server, "server");
        assert_eq!(&reply, b"pong");
    }

    #[tokio::test]
    async fn a_peer_without_the_exchange_keeps_its_bytes() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        b.write_all(b"SSH-2.0-banner\r\n").await.unwrap();
        let (mut s, peer) = exchange(a, &tcp_frame(&meta("client"))).await.unwrap();
        assert!(peer.is_none());
        let mut got = vec![0u8; 16];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"SSH-2.0-banner\r\n");
        // The frame it was sent arrived first.
        let mut head = [0u8; 4];
        b.read_exact(&mut head).await.unwrap();
        assert_eq!(head, TCP_FRAME_MAGIC.to_be_bytes());
    }

    #[tokio::test]
    async fn garbage_payloads_and_silent_peers_never_hang_or_panic() {
        // A frame whose payload is not metadata: no peer, nothing replayed.
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut bad = TCP_FRAME_MAGIC.to_be_bytes().to_vec();
        bad.extend_from_slice(&3u32.to_be_bytes());
        bad.extend_from_slice(b"xyz");
        b.write_all(&bad).await.unwrap();
        let (_, peer) = exchange(a, b"frame").await.unwrap();
        assert!(peer.is_none());
        // An oversized frame is skipped.
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut big = TCP_FRAME_MAGIC.to_be_bytes().to_vec();
        big.extend_from_slice(&((MAX_PAYLOAD as u32) + 1).to_be_bytes());
        big.extend(std::iter::repeat_n(0u8, MAX_PAYLOAD + 1));
        big.extend_from_slice(b"app");
        b.write_all(&big).await.unwrap();
        let (mut s, peer) = exchange(a, b"frame").await.unwrap();
        assert!(peer.is_none());
        let mut app = [0u8; 3];
        s.read_exact(&mut app).await.unwrap();
        assert_eq!(&app, b"app");
        // A peer that sends nothing: the exchange gives up after its timeout.
        tokio::time::pause();
        let (a, _b) = tokio::io::duplex(1 << 16);
        let err = exchange(a, b"frame").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
