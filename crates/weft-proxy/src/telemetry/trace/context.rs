//! Trace context on the wire: reading W3C `traceparent`/`tracestate` and B3 (single
//! `b3` header and the `x-b3-*` headers) from a request, and writing the context of the
//! proxy's span onto the request it sends upstream.
//!
//! Anything malformed counts as absent (a new trace starts); nothing here panics on
//! what a client sends.

use http::{HeaderMap, HeaderName, HeaderValue};

/// `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// `tracestate`.
pub const TRACESTATE: &str = "tracestate";
/// B3 single header.
pub const B3: &str = "b3";
/// B3 multi headers.
pub const X_B3_TRACEID: &str = "x-b3-traceid";
/// See [`X_B3_TRACEID`].
pub const X_B3_SPANID: &str = "x-b3-spanid";
/// See [`X_B3_TRACEID`].
pub const X_B3_PARENTSPANID: &str = "x-b3-parentspanid";
/// See [`X_B3_TRACEID`].
pub const X_B3_SAMPLED: &str = "x-b3-sampled";
/// See [`X_B3_TRACEID`].
pub const X_B3_FLAGS: &str = "x-b3-flags";

/// What a request says about the trace it belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Incoming {
    /// The caller's trace id and span id, when it sent a well-formed context.
    pub ids: Option<Ids>,
    /// The caller's sampling decision (`x-b3-flags: 1`, debug, counts as sampled).
    pub sampled: Option<bool>,
    /// B3 debug flag.
    pub debug: bool,
    /// `tracestate` to pass on (W3C only).
    pub tracestate: Option<HeaderValue>,
    /// The caller used the single `b3` header (answered in kind upstream).
    pub b3_single: bool,
}

/// A caller's ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    /// Trace id (a 64-bit B3 id has its upper half zero).
    pub trace_id: u128,
    /// The caller's span.
    pub span_id: u64,
    /// The caller's parent span (B3 only).
    pub parent_id: Option<u64>,
}

/// The context of the proxy's span, as written upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Trace id.
    pub trace_id: u128,
    /// The proxy's span (the upstream's parent).
    pub span_id: u64,
    /// The proxy span's own parent.
    pub parent_id: Option<u64>,
    /// Sampling decision.
    pub sampled: bool,
    /// B3 debug flag, passed on.
    pub debug: bool,
    /// `tracestate` passed on.
    pub tracestate: Option<HeaderValue>,
    /// Also write the single `b3` header.
    pub b3_single: bool,
}

impl Incoming {
    /// Reads the trace context of a request: `traceparent` first, then `b3`, then the
    /// `x-b3-*` headers (the first well-formed one wins).
    pub fn read(h: &HeaderMap) -> Incoming {
        if let Some((ids, sampled)) = one(h, TRACEPARENT).and_then(parse_traceparent) {
            // tracestate only means something alongside a valid traceparent.
            let tracestate = h.get(TRACESTATE).filter(|v| !v.is_empty() && v.len() <= 512).cloned();
            return Incoming { ids: Some(ids), sampled: Some(sampled), debug: false, tracestate, b3_single: false };
        }
        if let Some(single) = one(h, B3).and_then(parse_b3_single) {
            return single;
        }
        read_b3_multi(h)
    }
}

impl Outgoing {
    /// Writes the context on a request going upstream: W3C `traceparent` (plus the
    /// caller's `tracestate`), the `x-b3-*` headers, and `b3` when the caller used it.
    /// Headers the caller sent that this context replaces are removed.
    pub fn write(&self, h: &mut HeaderMap) {
        let flags = if self.sampled { "01" } else { "00" };
        put_unique(h, TRACEPARENT, format!("00-{:032x}-{:016x}-{flags}", self.trace_id, self.span_id));
        match &self.tracestate {
            Some(ts) => {
                h.insert(HeaderName::from_static(TRACESTATE), ts.clone());
            }
            None => {
                h.remove(TRACESTATE);
            }
        }
        let trace = b3_trace_id(self.trace_id);
        put_unique(h, X_B3_TRACEID, trace.clone());
        put_unique(h, X_B3_SPANID, format!("{:016x}", self.span_id));
        match self.parent_id {
            Some(p) => put_unique(h, X_B3_PARENTSPANID, format!("{p:016x}")),
            None => {
                h.remove(X_B3_PARENTSPANID);
            }
        }
        put(h, X_B3_SAMPLED, if self.sampled { "1".into() } else { "0".into() });
        if self.debug {
            put(h, X_B3_FLAGS, "1".into());
        } else {
            h.remove(X_B3_FLAGS);
        }
        if self.b3_single {
            let s = if self.debug {
                "d"
            } else if self.sampled {
                "1"
            } else {
                "0"
            };
            let mut v = format!("{trace}-{:016x}-{s}", self.span_id);
            if let Some(p) = self.parent_id {
                v.push_str(&format!("-{p:016x}"));
            }
            put_unique(h, B3, v);
        } else {
            h.remove(B3);
        }
    }
}

/// A B3 trace id: 16 hex digits when it fits in 64 bits, else 32.
pub fn b3_trace_id(id: u128) -> String {
    if id >> 64 == 0 {
        format!("{:016x}", id as u64)
    } else {
        format!("{id:032x}")
    }
}

fn put(h: &mut HeaderMap, name: &'static str, value: String) {
    // Hex digits and dashes only: always a valid header value.
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(HeaderName::from_static(name), v);
    }
}

/// [`put`] for a value new with every request (one holding a span id): an HTTP/2
/// upstream's HPACK encoder sends it as a never-indexed literal. Inserted into the
/// dynamic table, each such value would evict the entries worth keeping (the peer
/// metadata, ~400 bytes, then sent and Huffman-coded again) and lengthen the encoder's
/// walk over earlier values of the name. Only the encoding changes.
fn put_unique(h: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(mut v) = HeaderValue::from_str(&value) {
        v.set_sensitive(true);
        h.insert(HeaderName::from_static(name), v);
    }
}

/// The header's value when it appears exactly once and is text.
fn one<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let mut all = h.get_all(name).iter();
    let v = all.next()?;
    if all.next().is_some() {
        return None;
    }
    v.to_str().ok().map(str::trim)
}

/// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>` (W3C Trace Context level 1;
/// a later version may append fields after another `-`).
pub fn parse_traceparent(v: &str) -> Option<(Ids, bool)> {
    let mut parts = v.split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    let rest = parts.next();
    if version.len() != 2 || !is_lower_hex(version) || version == "ff" {
        return None;
    }
    if version == "00" && (rest.is_some() || v.len() != 55) {
        return None;
    }
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    if !is_lower_hex(trace) || !is_lower_hex(span) || !is_lower_hex(flags) {
        return None;
    }
    let trace_id = u128::from_str_radix(trace, 16).ok().filter(|t| *t != 0)?;
    let span_id = u64::from_str_radix(span, 16).ok().filter(|s| *s != 0)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((Ids { trace_id, span_id, parent_id: None }, flags & 1 == 1))
}

/// `b3: {TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]`, or only a sampling
/// state (`0`, `1`, `d`).
pub fn parse_b3_single(v: &str) -> Option<Incoming> {
    let parts: Vec<&str> = v.split('-').collect();
    if parts.len() == 1 {
        let (sampled, debug) = sampling_state(parts[0])?;
        return Some(Incoming { ids: None, sampled: Some(sampled), debug, tracestate: None, b3_single: true });
    }
    if parts.len() > 4 {
        return None;
    }
    let trace_id = b3_id128(parts[0])?;
    let span_id = b3_id64(parts[1])?;
    let (sampled, debug) = match parts.get(2) {
        Some(s) => {
            let (s, d) = sampling_state(s)?;
            (Some(s), d)
        }
        None => (None, false),
    };
    let parent_id = match parts.get(3) {
        Some(p) => Some(b3_id64(p)?),
        None => None,
    };
    Some(Incoming {
        ids: Some(Ids { trace_id, span_id, parent_id }),
        sampled,
        debug,
        tracestate: None,
        b3_single: true,
    })
}

fn read_b3_multi(h: &HeaderMap) -> Incoming {
    let debug = one(h, X_B3_FLAGS) == Some("1");
    let sampled = match one(h, X_B3_SAMPLED) {
        Some("1") | Some("true") => Some(true),
        Some("0") | Some("false") => Some(false),
        _ => None,
    };
    let sampled = if debug { Some(true) } else { sampled };
    let ids = (|| {
        let trace_id = b3_id128(one(h, X_B3_TRACEID)?)?;
        let span_id = b3_id64(one(h, X_B3_SPANID)?)?;
        let parent_id = match one(h, X_B3_PARENTSPANID) {
            Some(p) => Some(b3_id64(p)?),
            None => None,
        };
        Some(Ids { trace_id, span_id, parent_id })
    })();
    Incoming { ids, sampled, debug, tracestate: None, b3_single: false }
}

fn sampling_state(s: &str) -> Option<(bool, bool)> {
    match s {
        "0" => Some((false, false)),
        "1" => Some((true, false)),
        "d" => Some((true, true)),
        _ => None,
    }
}

/// A 16- or 32-digit hex B3 trace id, not zero.
fn b3_id128(s: &str) -> Option<u128> {
    if (s.len() != 16 && s.len() != 32) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(s, 16).ok().filter(|v| *v != 0)
}

/// A 16-digit hex B3 span id, not zero.
fn b3_id64(s: &str) -> Option<u64> {
    if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok().filter(|v| *v != 0)
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
