//! Protocol detection: peek at a connection's first bytes to tell TLS, HTTP/2
//! (prior knowledge), HTTP/1.x and opaque TCP apart, like Envoy's `tls_inspector` and
//! `http_inspector`. Only used when the listener's filter chains depend on it; declared
//! protocols skip it so server-first protocols (MySQL, SMTP) never wait.

use std::time::Duration;

use std::os::fd::AsRawFd;

use nix::sys::socket::{recv, MsgFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// What the first bytes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    /// `tls` or `raw_buffer`.
    pub transport: &'static str,
    /// `h2c`, `http/1.0`, `http/1.1`, or nothing.
    pub application: Vec<&'static str>,
    /// SNI from a TLS ClientHello.
    pub server_name: Option<String>,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&str] = &[
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "PATCH",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "PRI",
];

/// Outcome of classifying a prefix of the stream.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Done(Detected),
    NeedMore,
}

/// The most a sniff looks at: a whole ClientHello (post-quantum key shares make them
/// 1.5-2 KiB today; extensions may take them past one TLS record) or a long HTTP/1
/// request line. Envoy's `tls_inspector` reads up to 64 KiB for the same reason.
const MAX_SNIFF: usize = 64 * 1024;

/// Peeks until the protocol is known, the peer closes, or `timeout` passes (then the
/// connection is opaque TCP, as Envoy's `continue_on_listener_filters_timeout`). The
/// bytes stay in the socket for the next stage; between peeks it waits for new bytes
/// to arrive (readiness is cleared when a peek sees nothing new), never polling.
pub async fn sniff(stream: &TcpStream, timeout: Duration) -> Detected {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 1024];
    let mut seen = 0;
    loop {
        let peeked = tokio::time::timeout_at(deadline, peek_more(stream, &mut buf, seen)).await;
        let n = match peeked {
            Ok(Ok(n)) => n,
            _ => return opaque(),
        };
        if n == 0 {
            return opaque();
        }
        if let Verdict::Done(d) = classify(&buf[..n]) {
            return d;
        }
        if n == buf.len() {
            if buf.len() >= MAX_SNIFF {
                return opaque();
            }
            buf.resize((buf.len() * 4).min(MAX_SNIFF), 0);
        }
        seen = n;
    }
}

/// Waits until the socket holds more than `seen` bytes (or the peer closed, or the
/// buffer is full) and peeks them.
async fn peek_more(stream: &TcpStream, buf: &mut [u8], seen: usize) -> std::io::Result<usize> {
    let fd = stream.as_raw_fd();
    loop {
        stream.readable().await?;
        let r = stream.try_io(Interest::READABLE, || {
            let n = recv(fd, buf, MsgFlags::MSG_PEEK).map_err(std::io::Error::from)?;
            if n == 0 || n > seen || n == buf.len() {
                Ok(n)
            } else {
                // Nothing new: clear readiness so `readable` waits for the next bytes.
                Err(std::io::ErrorKind::WouldBlock.into())
            }
        });
        match r {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

fn opaque() -> Detected {
    Detected { transport: "raw_buffer", application: vec![], server_name: None }
}

fn classify(b: &[u8]) -> Verdict {
    let Some(&first) = b.first() else { return Verdict::NeedMore };
    if first == 0x16 {
        return match tls_server_name(b) {
            Some(sni) => Verdict::Done(Detected { transport: "tls", application: vec![], server_name: sni }),
            None => Verdict::NeedMore,
        };
    }
    let p = H2_PREFACE.len().min(b.len());
    if b[..p] == H2_PREFACE[..p] {
        return if b.len() >= H2_PREFACE.len() {
            Verdict::Done(Detected { transport: "raw_buffer", application: vec!["h2c"], server_name: None })
        } else {
            Verdict::NeedMore
        };
    }
    // HTTP/1.x: METHOD SP target SP HTTP/1.x CRLF
    let method_end = b.iter().position(|&c| c == b' ');
    match method_end {
        None => {
            let prefix_ok = b.len() < 10 && METHODS.iter().any(|m| m.as_bytes().starts_with(b));
            if prefix_ok {
                Verdict::NeedMore
            } else {
                Verdict::Done(opaque())
            }
        }
        Some(i) => {
            if !METHODS.iter().any(|m| m.as_bytes() == &b[..i]) {
                return Verdict::Done(opaque());
            }
            match b.iter().position(|&c| c == b'\n') {
                None => Verdict::NeedMore,
                Some(nl) => {
                    let line = &b[..nl];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    if line.ends_with(b"HTTP/1.1") {
                        Verdict::Done(Detected {
                            transport: "raw_buffer",
                            application: vec!["http/1.1"],
                            server_name: None,
                        })
                    } else if line.ends_with(b"HTTP/1.0") {
                        Verdict::Done(Detected {
                            transport: "raw_buffer",
                            application: vec!["http/1.0"],
                            server_name: None,
                        })
                    } else {
                        Verdict::Done(opaque())
                    }
                }
            }
        }
    }
}

/// Parses the SNI out of a TLS ClientHello, which may span several handshake records.
/// `None` = need more bytes; `Some(None)` = complete hello without SNI (or not
/// parseable, or larger than [`MAX_SNIFF`]: treated as TLS without SNI).
fn tls_server_name(b: &[u8]) -> Option<Option<String>> {
    // The first record usually holds the whole hello: parse it in place.
    let first = record(b)?;
    let Some(first) = first else { return Some(None) };
    let want = handshake_len(first).map(|l| l + 4);
    match want {
        Some(w) if w <= first.len() => return Some(parse_sni(&first[..w])),
        Some(w) if w > MAX_SNIFF => return Some(None),
        _ => {}
    }
    // Fragmented: join the records' payloads until the handshake message is whole.
    let mut hs = Vec::with_capacity(want.unwrap_or(first.len() * 2));
    let mut rest = b;
    loop {
        let Some(payload) = record(rest)? else { return Some(None) };
        hs.extend_from_slice(payload);
        rest = &rest[5 + payload.len()..];
        match handshake_len(&hs).map(|l| l + 4) {
            Some(w) if w > MAX_SNIFF => return Some(None),
            Some(w) if w <= hs.len() => return Some(parse_sni(&hs[..w])),
            _ => {}
        }
    }
}

/// The payload of the handshake record at the start of `b`: `None` = incomplete,
/// `Some(None)` = not a handshake record.
fn record(b: &[u8]) -> Option<Option<&[u8]>> {
    if b.len() < 5 {
        return None;
    }
    if b[0] != 0x16 {
        return Some(None);
    }
    let len = usize::from(u16::from_be_bytes([b[3], b[4]]));
    if len == 0 {
        return Some(None);
    }
    b.get(5..5 + len).map(Some)
}

/// The length of the handshake message `h` starts with, once its header is there.
fn handshake_len(h: &[u8]) -> Option<usize> {
    (h.len() >= 4).then(|| usize::from(h[1]) << 16 | usize::from(h[2]) << 8 | usize::from(h[3]))
}

fn parse_sni(h: &[u8]) -> Option<String> {
    // handshake: type(1)=1 len(3) version(2) random(32) session_id(1+n) ciphers(2+n) comp(1+n) exts(2+n)
    let mut r = Reader(h);
    if r.u8()? != 1 {
        return None;
    }
    r.skip(3 + 2 + 32)?;
    let sid = usize::from(r.u8()?);
    r.skip(sid)?;
    let cs = usize::from(r.u16()?);
    r.skip(cs)?;
    let comp = usize::from(r.u8()?);
    r.skip(comp)?;
    let ext_len = usize::from(r.u16()?);
    let mut exts = Reader(r.take(ext_len)?);
    while let (Some(ty), Some(len)) = (exts.u16(), exts.u16()) {
        let body = exts.take(usize::from(len))?;
        if ty == 0 {
            let mut s = Reader(body);
            s.u16()?;
            if s.u8()? != 0 {
                return None;
            }
            let n = usize::from(s.u16()?);
            return std::str::from_utf8(s.take(n)?).ok().map(str::to_string);
        }
    }
    None
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_request_line_is_detected_with_version() {
        let d = classify(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(
            d,
            Verdict::Done(Detected { transport: "raw_buffer", application: vec!["http/1.1"], server_name: None })
        );
        assert!(matches!(classify(b"POST /x HTTP/1.0\r\n"), Verdict::Done(d) if d.application == vec!["http/1.0"]));
    }

    #[test]
    fn partial_http1_waits_for_more_bytes() {
        assert_eq!(classify(b"GE"), Verdict::NeedMore);
        assert_eq!(classify(b"GET /very/long"), Verdict::NeedMore);
    }

    #[test]
    fn h2_preface_is_h2c() {
        assert!(matches!(classify(H2_PREFACE), Verdict::Done(d) if d.application == vec!["h2c"]));
        assert_eq!(classify(&H2_PREFACE[..8]), Verdict::NeedMore);
    }

    #[test]
    fn binary_garbage_is_opaque() {
        assert_eq!(classify(b"\x00\x01\x02hello"), Verdict::Done(opaque()));
        assert_eq!(classify(b"HELLO world\r\n"), Verdict::Done(opaque()));
        assert_eq!(classify(b"GET / SMTP\r\n"), Verdict::Done(opaque()));
    }

    /// A ClientHello with SNI `name`, padded with a `padding` extension to about
    /// `pad` more bytes (post-quantum key shares make real ones this large).
    fn client_hello(name: &[u8], pad: usize) -> Vec<u8> {
        let mut sni_ext = vec![];
        let list_len = (name.len() + 3) as u16;
        sni_ext.extend_from_slice(&list_len.to_be_bytes());
        sni_ext.push(0);
        sni_ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni_ext.extend_from_slice(name);
        let mut exts = vec![];
        if pad > 0 {
            exts.extend_from_slice(&[0, 21]);
            exts.extend_from_slice(&(pad as u16).to_be_bytes());
            exts.extend(std::iter::repeat_n(0u8, pad));
        }
        exts.extend_from_slice(&[0, 0]);
        exts.extend_from_slice(&(sni_ext.len() as u16).to_be_bytes());
        exts.extend_from_slice(&sni_ext);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // ciphers
        body.extend_from_slice(&[1, 0]); // compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        hs
    }

    /// `hs` in TLS records of at most `max` payload bytes.
    fn records(hs: &[u8], max: usize) -> Vec<u8> {
        let mut out = vec![];
        for part in hs.chunks(max) {
            out.extend_from_slice(&[0x16, 3, 1]);
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    fn sni_of(b: &[u8]) -> Option<String> {
        match classify(b) {
            Verdict::Done(d) => {
                assert_eq!(d.transport, "tls");
                d.server_name
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn tls_client_hello_yields_sni() {
        let rec = records(&client_hello(b"svc.example", 0), 16384);
        assert_eq!(sni_of(&rec).as_deref(), Some("svc.example"));
        assert_eq!(classify(&rec[..20]), Verdict::NeedMore);
    }

    #[test]
    fn large_and_fragmented_client_hellos_yield_sni() {
        let big = records(&client_hello(b"big.example", 1800), 16384);
        assert!(big.len() > 1800);
        assert_eq!(sni_of(&big).as_deref(), Some("big.example"));
        assert_eq!(classify(&big[..1500]), Verdict::NeedMore);
        // The same hello split over several records.
        let split = records(&client_hello(b"split.example", 1800), 512);
        assert_eq!(sni_of(&split).as_deref(), Some("split.example"));
        assert_eq!(classify(&split[..1000]), Verdict::NeedMore);
    }

    #[tokio::test]
    async fn sniff_reads_a_2k_client_hello_arriving_in_pieces() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hello = records(&client_hello(b"pq.example", 2000), 16384);
        let (to_send, mut go) = tokio::sync::mpsc::channel::<()>(1);
        let client = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.set_nodelay(true).unwrap();
            c.write_all(&hello[..700]).await.unwrap();
            // The rest only once the sniffer has seen the first piece and waits.
            go.recv().await;
            c.write_all(&hello[700..]).await.unwrap();
            c
        });
        let (server, _) = listener.accept().await.unwrap();
        let sniffing = sniff(&server, Duration::from_secs(10));
        tokio::pin!(sniffing);
        // The first piece alone is not enough: the sniff keeps waiting.
        assert!(tokio::time::timeout(Duration::from_millis(100), sniffing.as_mut()).await.is_err());
        to_send.send(()).await.unwrap();
        let d = sniffing.await;
        assert_eq!(d.transport, "tls");
        assert_eq!(d.server_name.as_deref(), Some("pq.example"));
        drop(client.await.unwrap());
    }
}
