//! Peer metadata exchange: the outbound proxy adds [`PEER_HEADER`] to requests and the
//! inbound proxy adds it to responses, so each side learns which workload is on the other
//! end and can fill the `source_*` / `destination_*` metric labels. The core strips the
//! header before the application sees it.
//!
//! The value is URL-safe base64 (no padding) of a compact JSON object. Decoding is
//! bounded and never panics: anything oversized or malformed yields `None`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::HeaderValue;

use super::WorkloadInfo;

/// Name of the header carrying peer metadata.
pub const PEER_HEADER: &str = "x-weft-peer-metadata";

/// Longest header value [`decode`] accepts, in bytes.
pub const MAX_ENCODED_LEN: usize = 4096;

/// Longest field value, in bytes. [`encode`] truncates longer fields (at a character
/// boundary); [`decode`] rejects them.
pub const MAX_FIELD_LEN: usize = 256;

/// Entries a [`DecodeCache`] holds by default.
pub const DEFAULT_CACHE_ENTRIES: usize = 1024;

/// Remembers decoded header values so a proxy decodes each peer's metadata once and
/// shares one `Arc<WorkloadInfo>` across the label sets of all its requests. Bounded:
/// once full, new values are decoded on every call but not stored.
#[derive(Debug)]
pub struct DecodeCache {
    entries: RwLock<HashMap<Bytes, Arc<WorkloadInfo>, super::FastState>>,
    max: usize,
}

impl Default for DecodeCache {
    fn default() -> Self {
        Self::new(DEFAULT_CACHE_ENTRIES)
    }
}

impl DecodeCache {
    /// A cache holding at most `max` distinct header values.
    pub fn new(max: usize) -> Self {
        Self { entries: RwLock::new(HashMap::with_hasher(super::FastState::default())), max }
    }

    /// Like [`decode`], returning a shared value for header values seen before.
    /// Invalid values are never cached.
    pub fn decode(&self, value: &HeaderValue) -> Option<Arc<WorkloadInfo>> {
        {
            let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
            if let Some(info) = entries.get(value.as_bytes()) {
                return Some(info.clone());
            }
        }
        let info = Arc::new(decode(value)?);
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if entries.len() < self.max {
            let key = Bytes::copy_from_slice(value.as_bytes());
            return Some(entries.entry(key).or_insert(info).clone());
        }
        Some(info)
    }

    /// Number of cached values.
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Encodes `info` as a value for [`PEER_HEADER`]. A proxy's own metadata does not
/// change: encode it once and clone the (cheap, shared) `HeaderValue` per request.
pub fn encode(info: &WorkloadInfo) -> HeaderValue {
    let bounded = WorkloadInfo {
        workload: truncate(&info.workload),
        namespace: truncate(&info.namespace),
        app: truncate(&info.app),
        version: truncate(&info.version),
        principal: truncate(&info.principal),
        cluster: truncate(&info.cluster),
        service_account: truncate(&info.service_account),
        canonical_service: truncate(&info.canonical_service),
        canonical_revision: truncate(&info.canonical_revision),
    };
    // Serializing a struct of strings cannot fail; fall back to an empty object anyway.
    let json = serde_json::to_vec(&bounded).unwrap_or_else(|_| b"{}".to_vec());
    let b64 = URL_SAFE_NO_PAD.encode(json);
    // URL-safe base64 is always a valid header value.
    HeaderValue::from_str(&b64).unwrap_or_else(|_| HeaderValue::from_static("e30"))
}

/// Decodes a [`PEER_HEADER`] value; `None` if it is oversized, not base64, not the
/// expected JSON, or has a field longer than [`MAX_FIELD_LEN`]. Missing fields take
/// Istio's defaults (`"unknown"`).
pub fn decode(value: &HeaderValue) -> Option<WorkloadInfo> {
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_ENCODED_LEN {
        return None;
    }
    let json = URL_SAFE_NO_PAD.decode(bytes).ok()?;
    // Only an object: serde would also accept a struct written as a JSON array.
    if json.first() != Some(&b'{') {
        return None;
    }
    let info: WorkloadInfo = serde_json::from_slice(&json).ok()?;
    let fields = [
        &info.workload,
        &info.namespace,
        &info.app,
        &info.version,
        &info.principal,
        &info.cluster,
        &info.service_account,
        &info.canonical_service,
        &info.canonical_revision,
    ];
    if fields.iter().any(|f| f.len() > MAX_FIELD_LEN || f.chars().any(char::is_control)) {
        return None;
    }
    Some(info)
}

fn truncate(s: &str) -> String {
    if s.len() <= MAX_FIELD_LEN {
        return s.to_owned();
    }
    let mut end = MAX_FIELD_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WorkloadInfo {
        WorkloadInfo {
            workload: "reviews-v2".into(),
            namespace: "bookinfo".into(),
            app: "reviews".into(),
            version: "v2".into(),
            principal: "spiffe://cluster.local/ns/bookinfo/sa/reviews".into(),
            cluster: "east".into(),
            service_account: "reviews".into(),
            canonical_service: "reviews".into(),
            canonical_revision: "v2".into(),
        }
    }

    #[test]
    fn decode_cache_shares_values_and_stays_bounded() {
        let cache = DecodeCache::new(2);
        let a = encode(&sample());
        let first = cache.decode(&a).unwrap();
        let again = cache.decode(&a).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "second decode served from cache");
        assert_eq!(*first, sample());
        assert_eq!(cache.decode(&HeaderValue::from_static("!!")), None);
        assert_eq!(cache.len(), 1, "invalid values are not cached");
        for name in ["b", "c", "d"] {
            let info = WorkloadInfo { workload: name.into(), ..sample() };
            assert_eq!(cache.decode(&encode(&info)).unwrap().workload, name);
        }
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn round_trip_preserves_every_field() {
        let info = sample();
        let v = encode(&info);
        assert!(v.len() < 512, "header is compact: {} bytes", v.len());
        assert_eq!(decode(&v), Some(info));
    }

    #[test]
    fn missing_fields_default_to_unknown() {
        let v = HeaderValue::from_str(&URL_SAFE_NO_PAD.encode(br#"{"w":"a"}"#)).unwrap();
        let info = decode(&v).unwrap();
        assert_eq!(info.workload, "a");
        assert_eq!(info.namespace, "unknown");
        assert_eq!(info.canonical_revision, "latest");
    }

    #[test]
    fn garbage_is_rejected() {
        for raw in [
            "",
            "!!!not base64!!!",
            "e30=", // padded: not our encoding
            &URL_SAFE_NO_PAD.encode("not json"),
            &URL_SAFE_NO_PAD.encode(r#"{"w": 5}"#), // wrong type
            &URL_SAFE_NO_PAD.encode(r#"["w"]"#),
            &URL_SAFE_NO_PAD.encode(r#"{"w":"a\nb"}"#), // control character
            &URL_SAFE_NO_PAD.encode([0xff, 0xfe, 0x00]),
        ] {
            let v = HeaderValue::from_str(raw).unwrap();
            assert_eq!(decode(&v), None, "accepted {raw:?}");
        }
    }

    #[test]
    fn oversized_value_and_fields_are_rejected() {
        let huge = HeaderValue::from_str(&"A".repeat(MAX_ENCODED_LEN + 1)).unwrap();
        assert_eq!(decode(&huge), None);
        let long_field = format!(r#"{{"w":"{}"}}"#, "x".repeat(MAX_FIELD_LEN + 1));
        let v = HeaderValue::from_str(&URL_SAFE_NO_PAD.encode(long_field)).unwrap();
        assert!(v.len() <= MAX_ENCODED_LEN);
        assert_eq!(decode(&v), None);
    }

    #[test]
    fn encode_truncates_long_fields_so_the_peer_can_decode() {
        let mut info = sample();
        info.workload = "é".repeat(MAX_FIELD_LEN); // 2 bytes per char
        let decoded = decode(&encode(&info)).unwrap();
        assert!(decoded.workload.len() <= MAX_FIELD_LEN);
        assert!(decoded.workload.len() >= MAX_FIELD_LEN - 1);
        assert!(info.workload.starts_with(&decoded.workload));
        assert_eq!(decoded.app, "reviews");
    }
}
