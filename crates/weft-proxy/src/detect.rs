//! Protocol detection: peek at a connection's first bytes to tell TLS, HTTP/2
//! (prior knowledge), HTTP/1.x and opaque TCP apart, like Envoy's `tls_inspector` and
//! `http_inspector`. Only used when the listener's filter chains depend on it; declared
//! protocols skip it so server-first protocols (MySQL, SMTP) never wait.

use std::time::Duration;

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

/// Peeks until the protocol is known, the peer closes, or `timeout` passes (then the
/// connection is opaque TCP, as Envoy's `continue_on_listener_filters_timeout`).
pub async fn sniff(stream: &TcpStream, timeout: Duration) -> Detected {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 1024];
    let mut last_len = usize::MAX;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
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
            return opaque();
        }
        if n == last_len {
            // No new bytes yet: wait for readability again without spinning.
            if tokio::time::timeout_at(deadline, stream.readable()).await.is_err() {
                return opaque();
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        last_len = n;
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

/// Parses the SNI out of a TLS ClientHello. `None` = need more bytes; `Some(None)` =
/// complete hello without SNI (or not parseable: treated as TLS without SNI).
fn tls_server_name(b: &[u8]) -> Option<Option<String>> {
    if b.len() < 5 {
        return None;
    }
    let rec_len = usize::from(u16::from_be_bytes([b[3], b[4]]));
    if b.len() < 5 + rec_len {
        return None;
    }
    Some(parse_sni(&b[5..5 + rec_len]))
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

    #[test]
    fn tls_client_hello_yields_sni() {
        // Minimal ClientHello with SNI "svc.example".
        let name = b"svc.example";
        let mut sni_ext = vec![];
        let list_len = (name.len() + 3) as u16;
        sni_ext.extend_from_slice(&list_len.to_be_bytes());
        sni_ext.push(0);
        sni_ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni_ext.extend_from_slice(name);
        let mut exts = vec![0, 0];
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
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        match classify(&rec) {
            Verdict::Done(d) => {
                assert_eq!(d.transport, "tls");
                assert_eq!(d.server_name.as_deref(), Some("svc.example"));
            }
            v => panic!("{v:?}"),
        }
        assert_eq!(classify(&rec[..20]), Verdict::NeedMore);
    }
}
