//! Peer metadata exchange, Istio's way ([`weft_xds::peer`]): the outbound proxy adds
//! [`PEER_ID_HEADER`] and [`PEER_HEADER`] to requests and the inbound proxy adds them to
//! responses (when the request carried them, as Istio's sidecars do), so each side learns
//! which workload is on the other end and can fill the `source_*` / `destination_*`
//! metric labels. The receiving proxy strips both before the application sees them.
//!
//! The value is base64 of a serialized `google.protobuf.Struct` with Istio's keys
//! (`NAME`, `NAMESPACE`, `WORKLOAD_NAME`, `LABELS`, ...), so Istio's sidecars, an Envoy fed
//! by weft and weft's proxy read each other. Decoding is bounded and never panics:
//! anything oversized or malformed yields `None`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use weft_xds::peer::{PeerMetadata, CANONICAL_NAME_LABEL, CANONICAL_REVISION_LABEL};

use super::{WorkloadInfo, UNKNOWN};

/// Name of the header carrying peer metadata.
pub const PEER_HEADER: &str = weft_xds::peer::METADATA_HEADER;
/// Name of the header carrying the peer's node id.
pub const PEER_ID_HEADER: &str = weft_xds::peer::METADATA_ID_HEADER;

/// [`PEER_HEADER`] as a parsed name: header maps look it up on every request, and a
/// name given as `&str` is validated and parsed again on each call (~1k instructions).
pub const PEER_HEADER_NAME: HeaderName = HeaderName::from_static(PEER_HEADER);
/// [`PEER_ID_HEADER`] as a parsed name.
pub const PEER_ID_HEADER_NAME: HeaderName = HeaderName::from_static(PEER_ID_HEADER);

/// Longest header value [`decode`] accepts, in bytes.
pub const MAX_ENCODED_LEN: usize = weft_xds::peer::MAX_ENCODED_LEN;

/// Longest field value, in bytes. [`encode`] truncates longer fields (at a character
/// boundary); [`decode`] rejects them.
pub const MAX_FIELD_LEN: usize = weft_xds::peer::MAX_FIELD_LEN;

/// What this proxy announces: its node id and its metadata, encoded once.
#[derive(Debug, Clone)]
pub struct LocalPeer {
    /// [`PEER_ID_HEADER`] value.
    pub id: HeaderValue,
    /// [`PEER_HEADER`] value.
    pub metadata: HeaderValue,
    /// The TCP exchange's frame ([`super::mx`]).
    pub tcp_frame: bytes::Bytes,
}

impl LocalPeer {
    /// Adds both headers (replacing any the application sent).
    pub fn insert(&self, headers: &mut HeaderMap) {
        headers.insert(PEER_ID_HEADER_NAME, self.id.clone());
        headers.insert(PEER_HEADER_NAME, self.metadata.clone());
    }
}

/// Removes both exchange headers, returning the metadata value if there was one.
pub fn strip(headers: &mut HeaderMap) -> Option<HeaderValue> {
    // One pass over the names first: most maps have neither, and a hashed removal of a
    // custom name costs ~500 instructions. Compared as names: a standard name differs
    // from these custom ones by its kind alone (as a `&str`, each standard name was read
    // from http's table of names, a cache miss about every other request).
    let (mut id, mut metadata) = (false, false);
    for name in headers.keys() {
        id |= *name == PEER_ID_HEADER_NAME;
        metadata |= *name == PEER_HEADER_NAME;
    }
    if id {
        headers.remove(PEER_ID_HEADER_NAME);
    }
    if metadata {
        headers.remove(PEER_HEADER_NAME)
    } else {
        None
    }
}

/// Entries a [`DecodeCache`] holds by default.
pub const DEFAULT_CACHE_ENTRIES: usize = 1024;

/// Principals remembered per header value (a workload's replicas share one value and
/// usually one identity).
const PRINCIPALS_PER_VALUE: usize = 4;

/// Remembers decoded header values, with the principal the hop proved applied
/// ([`with_principal`]), so a proxy decodes each peer's metadata once and shares one
/// `Arc<WorkloadInfo>` across the label sets of all its requests: no copy per request.
/// Bounded: once full, new values are decoded on every call but not stored.
#[derive(Debug)]
pub struct DecodeCache {
    entries: RwLock<HashMap<Bytes, Vec<Proven>, super::FastState>>,
    max: usize,
}

/// One decoded value as seen with one proven principal.
type Proven = (Option<Arc<str>>, Arc<WorkloadInfo>);

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

    /// Like [`decode`] then [`with_principal`] (`principal`: what the hop's certificate
    /// proved), returning a shared value for a header value and principal seen before.
    /// Invalid values are never cached.
    pub fn decode(&self, value: &HeaderValue, principal: Option<&Arc<str>>) -> Option<Arc<WorkloadInfo>> {
        let same = |p: &Option<Arc<str>>| p.as_deref() == principal.map(|p| &**p);
        {
            let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
            if let Some((_, info)) = entries.get(value.as_bytes()).and_then(|v| v.iter().find(|(p, _)| same(p))) {
                return Some(info.clone());
            }
        }
        let info = with_principal(Arc::new(decode(value)?), principal);
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if let Some(seen) = entries.get_mut(value.as_bytes()) {
            if let Some((_, known)) = seen.iter().find(|(p, _)| same(p)) {
                return Some(known.clone());
            }
            if seen.len() < PRINCIPALS_PER_VALUE {
                seen.push((principal.cloned(), info.clone()));
            }
        } else if entries.len() < self.max {
            entries.insert(Bytes::copy_from_slice(value.as_bytes()), vec![(principal.cloned(), info.clone())]);
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

/// This proxy's headers: `info` (the local workload as its own metrics name it) with
/// the node's id and instance name. A proxy's own metadata does not change: encode it
/// once and clone the (cheap, shared) values per request.
pub fn encode(info: &WorkloadInfo, node_id: &str, instance: &str) -> LocalPeer {
    let known = |s: &str| if s == UNKNOWN { String::new() } else { truncate(s) };
    let mut labels = std::collections::BTreeMap::new();
    for (key, value) in [
        ("app", &info.app),
        ("version", &info.version),
        (CANONICAL_NAME_LABEL, &info.canonical_service),
        (CANONICAL_REVISION_LABEL, &info.canonical_revision),
    ] {
        let v = known(value);
        if !v.is_empty() {
            labels.insert(key.to_string(), v);
        }
    }
    let namespace = known(&info.namespace);
    let workload = known(&info.workload);
    let meta = PeerMetadata {
        id: String::new(),
        name: truncate(instance),
        owner: if namespace.is_empty() || workload.is_empty() {
            String::new()
        } else {
            truncate(&format!("kubernetes://apis/apps/v1/namespaces/{namespace}/deployments/{workload}"))
        },
        namespace,
        workload_name: workload,
        cluster_id: known(&info.cluster),
        service_account: known(&info.service_account),
        labels,
    };
    // Base64 is always a valid header value; a node id with bytes a header cannot carry
    // is sent empty (it is only a cache hint).
    let tcp_frame = weft_xds::peer::tcp_frame(&PeerMetadata { id: truncate(node_id), ..meta.clone() }).into();
    LocalPeer {
        id: HeaderValue::from_str(node_id).unwrap_or_else(|_| HeaderValue::from_static("")),
        metadata: HeaderValue::from_str(&meta.encode()).unwrap_or_else(|_| HeaderValue::from_static("")),
        tcp_frame,
    }
}

/// The peer as telemetry names it: its principal is the one its certificate proved on
/// this hop, `unknown` without mTLS, whatever its metadata claims, and its namespace the
/// one in that SPIFFE id when there is one (Istio prefers the SAN's namespace to the
/// metadata's). Allocates only when they differ: [`DecodeCache`] keeps the result, so a
/// decoded header costs one copy per peer identity, not one per request.
pub fn with_principal(peer: Arc<WorkloadInfo>, principal: Option<&Arc<str>>) -> Arc<WorkloadInfo> {
    let proven = principal.map_or(UNKNOWN, |p| &**p);
    let namespace = principal.and_then(|p| san_namespace(p));
    if peer.principal == proven && namespace.is_none_or(|ns| peer.namespace == ns) {
        return peer;
    }
    Arc::new(WorkloadInfo {
        principal: proven.to_string(),
        namespace: namespace.map_or_else(|| peer.namespace.clone(), str::to_string),
        ..(*peer).clone()
    })
}

/// The namespace in a SPIFFE id `spiffe://<td>/ns/<ns>/sa/<sa>`.
pub fn san_namespace(principal: &str) -> Option<&str> {
    let (_, rest) = principal.split_once("/ns/")?;
    let ns = rest.split('/').next()?;
    (!ns.is_empty()).then_some(ns)
}

/// Decodes a [`PEER_HEADER`] value; `None` if it is oversized, not base64, not a
/// serialized `Struct`, or has a field longer than [`MAX_FIELD_LEN`]. Missing fields take
/// Istio's defaults (`"unknown"`; canonical service falls back to `app`, canonical
/// revision to `version`, then `"latest"`). The principal stays unknown: only the peer's
/// certificate proves it.
pub fn decode(value: &HeaderValue) -> Option<WorkloadInfo> {
    Some(workload_of(&PeerMetadata::decode(value.as_bytes())?))
}

/// The peer as metrics name it, from its exchanged metadata (header or TCP frame).
pub fn workload_of(m: &PeerMetadata) -> WorkloadInfo {
    let or_unknown = |s: Option<&str>| s.filter(|s| !s.is_empty()).unwrap_or(UNKNOWN).to_string();
    let app = m.label("app").or_else(|| m.label("app.kubernetes.io/name"));
    let version = m.label("version").or_else(|| m.label("app.kubernetes.io/version"));
    WorkloadInfo {
        workload: or_unknown(Some(&m.workload_name)),
        namespace: or_unknown(Some(&m.namespace)),
        app: or_unknown(app),
        version: or_unknown(version),
        cluster: or_unknown(Some(&m.cluster_id)),
        service_account: or_unknown(Some(&m.service_account)),
        canonical_service: or_unknown(m.label(CANONICAL_NAME_LABEL).or(app)),
        canonical_revision: m.label(CANONICAL_REVISION_LABEL).or(version).unwrap_or("latest").to_string(),
        ..WorkloadInfo::default()
    }
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
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;

    const ID: &str = "sidecar~10.0.0.7~reviews-v2-x.bookinfo~bookinfo.svc.cluster.local";

    fn sample() -> WorkloadInfo {
        WorkloadInfo {
            workload: "reviews-v2".into(),
            namespace: "bookinfo".into(),
            app: "reviews".into(),
            version: "v2".into(),
            principal: UNKNOWN.into(),
            cluster: "east".into(),
            service_account: "reviews".into(),
            canonical_service: "reviews".into(),
            canonical_revision: "v2".into(),
        }
    }

    fn header(info: &WorkloadInfo) -> HeaderValue {
        encode(info, ID, "reviews-v2-x").metadata
    }

    #[test]
    fn decode_cache_shares_values_and_stays_bounded() {
        let cache = DecodeCache::new(2);
        let a = header(&sample());
        let first = cache.decode(&a, None).unwrap();
        let again = cache.decode(&a, None).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "second decode served from cache");
        assert_eq!(*first, sample());
        // With the principal the hop proved: applied once, then shared (no copy per request).
        let proven: Arc<str> = Arc::from("spiffe://cluster.local/ns/bookinfo/sa/reviews");
        let mtls = cache.decode(&a, Some(&proven)).unwrap();
        assert_eq!(mtls.principal, *proven);
        assert!(Arc::ptr_eq(&mtls, &cache.decode(&a, Some(&proven)).unwrap()), "proven value cached");
        assert!(Arc::ptr_eq(&mtls, &with_principal(mtls.clone(), Some(&proven))), "nothing left to apply");
        assert_eq!(cache.decode(&a, None).unwrap().principal, UNKNOWN, "each principal its own entry");
        assert_eq!(cache.decode(&HeaderValue::from_static("!!"), None), None);
        assert_eq!(cache.len(), 1, "invalid values are not cached");
        for name in ["b", "c", "d"] {
            let info = WorkloadInfo { workload: name.into(), ..sample() };
            assert_eq!(cache.decode(&header(&info), None).unwrap().workload, name);
        }
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn strip_removes_both_headers_and_leaves_the_rest() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        assert_eq!(strip(&mut h), None);
        assert_eq!(h.len(), 1);
        let local = encode(&sample(), ID, "reviews-v2-x");
        local.insert(&mut h);
        assert_eq!(h.len(), 3);
        assert_eq!(strip(&mut h), Some(local.metadata.clone()));
        assert_eq!(h.len(), 1, "{h:?}");
        // The id alone (a caller that sent no metadata) goes too.
        h.insert(PEER_ID_HEADER, local.id.clone());
        assert_eq!(strip(&mut h), None);
        assert!(!h.contains_key(PEER_ID_HEADER));
    }

    #[test]
    fn round_trip_preserves_every_field_but_the_principal() {
        let info = WorkloadInfo { principal: "spiffe://cluster.local/ns/bookinfo/sa/reviews".into(), ..sample() };
        let local = encode(&info, ID, "reviews-v2-x");
        assert_eq!(local.id, ID);
        assert!(local.metadata.len() < 1024, "header is compact: {} bytes", local.metadata.len());
        assert_eq!(decode(&local.metadata), Some(sample()), "the principal comes from the certificate only");
    }

    #[test]
    fn the_header_is_istios_struct() {
        let v = header(&sample());
        let m = PeerMetadata::decode(v.as_bytes()).unwrap();
        assert_eq!(m.workload_name, "reviews-v2");
        assert_eq!(m.name, "reviews-v2-x");
        assert_eq!(m.namespace, "bookinfo");
        assert_eq!(m.owner, "kubernetes://apis/apps/v1/namespaces/bookinfo/deployments/reviews-v2");
        assert_eq!(m.label("app"), Some("reviews"));
        assert_eq!(m.label(CANONICAL_REVISION_LABEL), Some("v2"));
        assert!(STANDARD.decode(v.as_bytes()).is_ok(), "standard, padded base64");
    }

    #[test]
    fn missing_fields_default_like_istio() {
        let only_labels = PeerMetadata {
            workload_name: "a".into(),
            labels: [("app".to_string(), "shop".to_string())].into(),
            ..PeerMetadata::default()
        };
        let v = HeaderValue::from_str(&only_labels.encode()).unwrap();
        let info = decode(&v).unwrap();
        assert_eq!(info.workload, "a");
        assert_eq!(info.namespace, "unknown");
        assert_eq!(info.canonical_service, "shop", "canonical service falls back to app");
        assert_eq!(info.canonical_revision, "latest");
        let unknown = encode(&WorkloadInfo::default(), "", "");
        assert_eq!(decode(&unknown.metadata), Some(WorkloadInfo::default()), "unknown is not sent as a value");
    }

    #[test]
    fn garbage_is_rejected() {
        for raw in ["", "!!!not base64!!!", "e30", &"A".repeat(MAX_ENCODED_LEN + 4)] {
            let v = HeaderValue::from_str(raw).unwrap();
            assert_eq!(decode(&v), None, "accepted {raw:.40}");
        }
    }

    #[test]
    fn encode_truncates_long_fields_so_the_peer_can_decode() {
        let mut info = sample();
        info.workload = "é".repeat(MAX_FIELD_LEN); // 2 bytes per char
        let decoded = decode(&header(&info)).unwrap();
        assert!(decoded.workload.len() <= MAX_FIELD_LEN);
        assert!(decoded.workload.len() >= MAX_FIELD_LEN - 1);
        assert!(info.workload.starts_with(&decoded.workload));
        assert_eq!(decoded.app, "reviews");
    }
}
