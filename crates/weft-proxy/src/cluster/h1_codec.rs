//! HTTP/1.1 wire format for the upstream client ([`super::h1_client`]): the request's
//! framing and head as hyper's client wrote them (`hyper::proto::h1::role::Client`), the
//! response head read with `httparse` under hyper's limits, and the chunked decoder
//! (RFC 9112 section 7.1).

use std::io;
use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, Method, StatusCode, Version};

/// At most this many header fields in a response head or trailer section (hyper's
/// `DEFAULT_MAX_HEADERS`).
pub(crate) const MAX_HEADERS: usize = 100;
/// A response head that has not ended within this many bytes is refused (hyper's
/// default read buffer limit, `8192 + 4096 * 100`).
pub(crate) const MAX_HEAD: usize = 8192 + 4096 * 100;
/// Header fields a response map has room for beyond those it was parsed with.
const RESPONSE_HEADROOM: usize = 6;

/// A chunk's size line (with its extensions) and the trailer section are bounded by this
/// (hyper's `TRAILER_LIMIT`).
const MAX_CHUNK_LINE: usize = 16 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;

/// How a request body goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Exactly this many bytes follow the head (0: nothing is written, and the body is
    /// not read).
    Length(u64),
    /// Chunked; the trailer fields the `Trailer` header announced (hyper sends only those).
    Chunked(Vec<HeaderName>),
}

/// How a response body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResponseFraming {
    /// No body (HEAD, 1xx, 204, 304, or a CONNECT's 2xx).
    Empty,
    /// A content-length.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Everything until the upstream closes the connection.
    UntilClose,
}

/// A response head, parsed.
#[derive(Debug)]
pub(crate) struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    /// A reason phrase that is not the status's canonical one.
    pub reason: Option<Bytes>,
    /// The connection may carry another request after this response (HTTP/1.1 without
    /// `connection: close`, HTTP/1.0 with `keep-alive`, not a 101 or CONNECT's 2xx).
    pub keep_alive: bool,
    pub framing: ResponseFraming,
}

/// What went wrong reading a response head.
#[derive(Debug)]
pub(crate) enum HeadError {
    /// Malformed: the detail says where.
    Malformed(String),
    /// Not ended within [`MAX_HEAD`] bytes.
    TooLarge,
}

/// The chunked decoder's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data: this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: the trailer section (maybe empty) and the final CRLF.
    Trailers,
}

/// One step of the chunked decoder over what is buffered.
#[derive(Debug)]
pub(crate) enum Decoded {
    /// More bytes are needed.
    Need,
    /// Body data.
    Data(Bytes),
    /// The body ended, with these trailers (None: no trailer field).
    End(Option<HeaderMap>),
}

/// hyper's client framing (`Client::set_length`) for a request whose body is
/// `end_stream` already or has `exact` length (None: unknown), edited into `headers`:
/// an ended body is sent without one (any transfer-encoding removed, a content-length
/// kept as given); to an HTTP/1.0 peer, a content-length or nothing; a transfer-encoding
/// given is kept, made to end in chunked, and wins over a content-length; a valid
/// content-length given is kept; else an unknown length is chunked, except for GET, HEAD
/// and CONNECT, which are sent without a body; a known one gets its content-length.
pub(crate) fn frame_request(
    method: &Method,
    headers: &mut HeaderMap,
    end_stream: bool,
    exact: Option<u64>,
    http10: bool,
) -> Framing {
    if end_stream {
        headers.remove(TRANSFER_ENCODING);
        return Framing::Length(0);
    }
    let existing = content_length(headers);
    if http10 {
        headers.remove(TRANSFER_ENCODING);
        return match (existing, exact) {
            (Some(Ok(len)), _) => Framing::Length(len),
            (_, Some(len)) => {
                headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
                Framing::Length(len)
            }
            _ => Framing::Length(0),
        };
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        if !is_chunked(headers) {
            add_chunked(headers);
        }
        headers.remove(CONTENT_LENGTH);
        return Framing::Chunked(allowed_trailers(headers));
    }
    if let Some(Ok(len)) = existing {
        return Framing::Length(len);
    }
    match exact {
        Some(len) => {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
            Framing::Length(len)
        }
        None if matches!(*method, Method::GET | Method::HEAD | Method::CONNECT) => Framing::Length(0),
        None => {
            headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            headers.remove(CONTENT_LENGTH);
            Framing::Chunked(allowed_trailers(headers))
        }
    }
}

/// Writes the request line and headers: `path` is the origin form, header names as
/// given, in the map's order (as hyper's `write_headers`).
pub(crate) fn encode_head(method: &Method, path: &str, http10: bool, headers: &HeaderMap, dst: &mut Vec<u8>) {
    dst.reserve(32 + path.len() + headers.len() * 32);
    dst.extend_from_slice(method.as_str().as_bytes());
    dst.push(b' ');
    dst.extend_from_slice(path.as_bytes());
    dst.extend_from_slice(if http10 { b" HTTP/1.0\r\n" } else { b" HTTP/1.1\r\n" });
    write_fields(headers, dst);
    dst.extend_from_slice(b"\r\n");
}

/// `name: value\r\n` for each field.
fn write_fields(headers: &HeaderMap, dst: &mut Vec<u8>) {
    for (name, value) in headers {
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
}

/// The last chunk and the trailer fields `allowed` names (hyper drops the others, and
/// those a trailer must not carry).
pub(crate) fn encode_last_chunk(trailers: Option<&HeaderMap>, allowed: &[HeaderName], dst: &mut Vec<u8>) {
    dst.extend_from_slice(b"0\r\n");
    if let Some(t) = trailers {
        for (name, value) in t {
            if allowed.contains(name) && valid_trailer(name) {
                dst.extend_from_slice(name.as_str().as_bytes());
                dst.extend_from_slice(b": ");
                dst.extend_from_slice(value.as_bytes());
                dst.extend_from_slice(b"\r\n");
            }
        }
    }
    dst.extend_from_slice(b"\r\n");
}

/// A chunk's size line.
pub(crate) fn encode_chunk_size(len: usize, dst: &mut Vec<u8>) {
    let mut digits = [0u8; 16];
    let mut n = len;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    dst.extend_from_slice(&digits[i..]);
    dst.extend_from_slice(b"\r\n");
}

/// Parses a response head at the start of `buf`, skipping 1xx interim responses other
/// than 101 (hyper's client does the same); the head's bytes are taken out of `buf`.
/// None: the head is not complete yet. `method` is the request's (HEAD and CONNECT
/// change the framing).
pub(crate) fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, HeadError> {
    loop {
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        // (name start, name end, value start, value end) of each field in `buf`.
        let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let base = buf.as_ptr() as usize;
        let (len, code, version, count, reason) = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut fields)
        {
            Ok(httparse::Status::Complete(len)) => {
                let (Some(code), Some(version)) = (resp.code, resp.version) else {
                    return Err(HeadError::Malformed("response head without status".into()));
                };
                for (span, f) in spans.iter_mut().zip(resp.headers.iter()) {
                    let name = f.name.as_ptr() as usize - base;
                    let value = f.value.as_ptr() as usize - base;
                    // Offsets within a head of at most MAX_HEAD bytes fit in u32.
                    *span = (name as u32, (name + f.name.len()) as u32, value as u32, (value + f.value.len()) as u32);
                }
                let reason = resp.reason.map(|r| (r.as_ptr() as usize - base, r.len()));
                (len, code, version, resp.headers.len(), reason)
            }
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(HeadError::Malformed(format!("invalid response head: {e}"))),
        };
        if len > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        let status =
            StatusCode::from_u16(code).map_err(|_| HeadError::Malformed(format!("invalid status code {code}")))?;
        if status.is_informational() && code != 101 {
            buf.advance(len);
            if buf.is_empty() {
                return Ok(None);
            }
            continue;
        }
        let head = buf.split_to(len).freeze();
        let version = if version == 1 { Version::HTTP_11 } else { Version::HTTP_10 };
        // Room for the fields the forwarding path adds to a response (the upstream service
        // time, peer metadata, ...): a map sized to the head alone grew (reallocated and
        // rehashed) once per response on the server sidecar.
        let mut headers = HeaderMap::with_capacity(count + RESPONSE_HEADROOM);
        let mut keep_alive = version == Version::HTTP_11;
        let mut close = false;
        for &(n0, n1, v0, v1) in &spans[..count] {
            let name = HeaderName::from_bytes(&head[n0 as usize..n1 as usize])
                .map_err(|_| HeadError::Malformed("invalid header name".into()))?;
            let value = HeaderValue::from_maybe_shared(head.slice(v0 as usize..v1 as usize))
                .map_err(|_| HeadError::Malformed(format!("invalid value of header {name}")))?;
            if name == header::CONNECTION {
                // Once a `close` is seen, a later `keep-alive` does not undo it.
                if close || has_token(&value, b"close") {
                    close = true;
                    keep_alive = false;
                } else if !keep_alive {
                    keep_alive = has_token(&value, b"keep-alive");
                }
            }
            headers.append(name, value);
        }
        let reason = reason
            .map(|(at, n)| head.slice(at..at + n))
            .filter(|r| status.canonical_reason().map(str::as_bytes) != Some(&r[..]));
        let (framing, upgrade) = response_framing(status, version, &headers, method)?;
        return Ok(Some(Head { status, version, headers, reason, keep_alive: keep_alive && !upgrade, framing }));
    }
}

/// hyper's `Client::decoder`: the body's framing, and whether the connection is taken
/// over (101, a CONNECT's 2xx) so it cannot carry another request.
fn response_framing(
    status: StatusCode,
    version: Version,
    headers: &HeaderMap,
    method: &Method,
) -> Result<(ResponseFraming, bool), HeadError> {
    match status.as_u16() {
        101 => return Ok((ResponseFraming::Empty, true)),
        204 | 304 => return Ok((ResponseFraming::Empty, false)),
        _ => {}
    }
    if *method == Method::HEAD {
        return Ok((ResponseFraming::Empty, false));
    }
    if *method == Method::CONNECT && status.is_success() {
        return Ok((ResponseFraming::Empty, true));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            return Err(HeadError::Malformed("HTTP/1.0 response with transfer-encoding".into()));
        }
        return Ok((if is_chunked(headers) { ResponseFraming::Chunked } else { ResponseFraming::UntilClose }, false));
    }
    match content_length(headers) {
        Some(Ok(len)) => Ok((ResponseFraming::Length(len), false)),
        Some(Err(())) => Err(HeadError::Malformed("invalid or conflicting content-length".into())),
        None => Ok((ResponseFraming::UntilClose, false)),
    }
}

/// Decodes what `buf` holds of a chunked body from state `st`.
pub(crate) fn decode_chunked(st: &mut Chunk, buf: &mut BytesMut) -> io::Result<Decoded> {
    loop {
        match *st {
            Chunk::Size => {
                let Some(nl) = memchr::memchr(b'\n', buf) else {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err(bad("chunk size line too long"));
                    }
                    return Ok(Decoded::Need);
                };
                let size = chunk_size(&buf[..nl])?;
                buf.advance(nl + 1);
                *st = if size == 0 { Chunk::Trailers } else { Chunk::Data(size) };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::Need);
                }
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let data = buf.split_to(take).freeze();
                let left = left - take as u64;
                *st = if left == 0 { Chunk::DataEnd } else { Chunk::Data(left) };
                return Ok(Decoded::Data(data));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    if buf.first().is_some_and(|&b| b != b'\r') {
                        return Err(bad("chunk data not followed by CRLF"));
                    }
                    return Ok(Decoded::Need);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(bad("chunk data not followed by CRLF"));
                }
                buf.advance(2);
                *st = Chunk::Size;
            }
            Chunk::Trailers => {
                let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                return match httparse::parse_headers(buf, &mut fields) {
                    Ok(httparse::Status::Complete((len, fields))) => {
                        let trailers = if fields.is_empty() {
                            None
                        } else {
                            let mut map = HeaderMap::with_capacity(fields.len());
                            for f in fields.iter() {
                                let name = HeaderName::from_bytes(f.name.as_bytes())
                                    .map_err(|_| bad("invalid trailer field name"))?;
                                let value =
                                    HeaderValue::from_bytes(f.value).map_err(|_| bad("invalid trailer field value"))?;
                                map.append(name, value);
                            }
                            Some(map)
                        };
                        buf.advance(len);
                        Ok(Decoded::End(trailers))
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILERS => Err(bad("chunk trailers too large")),
                    Ok(httparse::Status::Partial) => Ok(Decoded::Need),
                    Err(e) => Err(bad(&format!("invalid chunk trailers: {e}"))),
                };
            }
        }
    }
}

/// A chunk-size line without its LF: hex digits (at most 16), optional whitespace, then
/// extensions (ignored), ended by CR.
fn chunk_size(line: &[u8]) -> io::Result<u64> {
    let Some((b'\r', line)) = line.split_last() else {
        return Err(bad("chunk size line not ended by CRLF"));
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(bad("invalid chunk size"));
    }
    if digits > 16 {
        return Err(bad("chunk size overflows"));
    }
    let mut size = 0u64;
    for &b in &line[..digits] {
        // Checked above: a hex digit.
        size = (size << 4) | u64::from((b as char).to_digit(16).unwrap_or(0));
    }
    let rest = &line[digits..];
    let rest = &rest[rest.iter().take_while(|&&b| b == b' ' || b == b'\t').count()..];
    if !rest.is_empty() && rest[0] != b';' {
        return Err(bad("invalid chunk size"));
    }
    if rest.contains(&b'\n') {
        return Err(bad("invalid chunk extension"));
    }
    Ok(size)
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// All content-length values (comma-separated and repeated fields included): None when
/// there is none, Err when one is invalid or they differ (hyper's
/// `content_length_parse_all`).
pub(crate) fn content_length(headers: &HeaderMap) -> Option<Result<u64, ()>> {
    let mut found = None;
    for v in headers.get_all(CONTENT_LENGTH) {
        for part in v.as_bytes().split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Some(Err(()));
            }
            let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
            if found.is_some_and(|f| f != n) {
                return Some(Err(()));
            }
            found = Some(n);
        }
    }
    found.map(Ok)
}

/// Whether the last transfer coding is `chunked`.
fn is_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.as_bytes().rsplit(|&b| b == b',').next())
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// hyper's `add_chunked`: `, chunked` after the last transfer-encoding value.
fn add_chunked(headers: &mut HeaderMap) {
    if let header::Entry::Occupied(mut te) = headers.entry(TRANSFER_ENCODING) {
        if let Some(last) = te.iter_mut().next_back() {
            let mut v = Vec::with_capacity(last.len() + 9);
            v.extend_from_slice(last.as_bytes());
            v.extend_from_slice(b", chunked");
            if let Ok(value) = HeaderValue::from_bytes(&v) {
                *last = value;
            }
        }
    }
}

/// The field names the `Trailer` header announces.
fn allowed_trailers(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::TRAILER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|s| HeaderName::from_bytes(s.trim().as_bytes()).ok())
        .collect()
}

/// hyper's `is_valid_trailer_field`: fields a trailer must not carry.
fn valid_trailer(name: &HeaderName) -> bool {
    use http::header::*;
    !matches!(
        *name,
        AUTHORIZATION
            | CACHE_CONTROL
            | CONTENT_ENCODING
            | CONTENT_LENGTH
            | CONTENT_RANGE
            | CONTENT_TYPE
            | HOST
            | MAX_FORWARDS
            | SET_COOKIE
            | TRAILER
            | TRANSFER_ENCODING
            | TE
    )
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
pub(crate) fn has_token(value: &HeaderValue, token: &[u8]) -> bool {
    value.as_bytes().split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether any `connection` field lists `close` (hyper's `connection_any_close`).
pub(crate) fn wants_close(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| has_token(v, b"close"))
}
