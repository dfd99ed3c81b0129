//! Istio's HTTP peer metadata exchange, shared by the proxy (which sends and reads it)
//! and the control plane (which makes a stock Envoy send it through route header edits).
//!
//! The outbound side adds [`METADATA_ID_HEADER`] (its node id) and [`METADATA_HEADER`]
//! to requests, the inbound side adds them to responses; the receiving proxy reads and
//! strips them. [`METADATA_HEADER`] is standard base64 of a serialized
//! `google.protobuf.Struct` with Istio's node-metadata keys ([`PeerMetadata::to_struct`]),
//! as istio/proxy's `peer_metadata` filter writes it (and the older `metadata_exchange`
//! filter before it), so Istio's sidecars, weft's proxy and an Envoy fed by weft read
//! each other's workload, namespace, app and version.

use std::collections::BTreeMap;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Struct, Value};
use prost::Message as _;

use crate::node::{self, NodeInfo};

/// Header carrying the sender's metadata (base64 of a serialized `Struct`).
pub const METADATA_HEADER: &str = "x-envoy-peer-metadata";
/// Header carrying the sender's node id.
pub const METADATA_ID_HEADER: &str = "x-envoy-peer-metadata-id";

/// Longest [`METADATA_HEADER`] value [`PeerMetadata::decode`] accepts, in bytes (Istio's
/// older exchange sends the whole node metadata: a few KiB).
pub const MAX_ENCODED_LEN: usize = 8192;
/// Longest field value [`PeerMetadata::decode`] keeps, in bytes; a longer one rejects
/// the header (a metric label is never that long).
pub const MAX_FIELD_LEN: usize = 256;

/// Metadata key: `kubernetes://apis/apps/v1/namespaces/<ns>/deployments/<workload>`.
pub const OWNER: &str = "OWNER";
/// Label: the canonical service.
pub const CANONICAL_NAME_LABEL: &str = "service.istio.io/canonical-name";
/// Label: the canonical revision.
pub const CANONICAL_REVISION_LABEL: &str = "service.istio.io/canonical-revision";
/// Label weft's local workloads may set to name their workload (default: the instance name).
pub const WORKLOAD_LABEL: &str = "weft.dev/workload";

/// The labels the exchange carries (the four Istio's metrics read, and the Kubernetes
/// recommended names it falls back to).
const EXCHANGED_LABELS: [&str; 6] = [
    "app",
    "version",
    CANONICAL_NAME_LABEL,
    CANONICAL_REVISION_LABEL,
    "app.kubernetes.io/name",
    "app.kubernetes.io/version",
];

/// Standard alphabet; padding optional on decode (Envoy encodes with padding and
/// decodes either).
const DECODER: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// What one workload tells its peers about itself; empty fields are not sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerMetadata {
    /// Node id (sent in [`METADATA_ID_HEADER`], not in the `Struct`).
    pub id: String,
    /// `NAME`: the instance (pod) name.
    pub name: String,
    /// `NAMESPACE`.
    pub namespace: String,
    /// `WORKLOAD_NAME`: the Deployment (or WorkloadEntry) name.
    pub workload_name: String,
    /// `CLUSTER_ID`.
    pub cluster_id: String,
    /// `SERVICE_ACCOUNT`.
    pub service_account: String,
    /// `OWNER`.
    pub owner: String,
    /// `LABELS`: `app`, `version`, `service.istio.io/canonical-name`,
    /// `service.istio.io/canonical-revision` (and their `app.kubernetes.io` forms).
    pub labels: BTreeMap<String, String>,
}

impl PeerMetadata {
    /// The metadata a workload announcing `node` sends, as weft's proxy names itself in
    /// its own metrics (`weft_proxy::report::local_workload`; keep the two in step):
    /// workload `WORKLOAD_NAME` (else the `weft.dev/workload` label, else the instance
    /// name), cluster `CLUSTER_ID` (default `Kubernetes`), canonical name and revision
    /// as Istio derives them (`service.istio.io/canonical-*`, else `app.kubernetes.io/*`,
    /// else `app` / `version`, else the workload name / `latest`).
    pub fn from_node(node: &NodeInfo) -> PeerMetadata {
        let label = |k: &str| node.labels.get(k).filter(|v| !v.is_empty()).cloned();
        let workload_name = match label(WORKLOAD_LABEL) {
            Some(w) if node.workload_name.is_empty() => w,
            _ => node.workload().to_string(),
        };
        let mut labels: BTreeMap<String, String> =
            EXCHANGED_LABELS.iter().filter_map(|k| label(k).map(|v| (k.to_string(), v))).collect();
        let first = |keys: &[&str]| keys.iter().find_map(|k| label(k));
        let canonical_name =
            first(&[CANONICAL_NAME_LABEL, "app.kubernetes.io/name", "app"]).unwrap_or_else(|| workload_name.clone());
        let canonical_revision = first(&[CANONICAL_REVISION_LABEL, "app.kubernetes.io/version", "version"])
            .unwrap_or_else(|| "latest".to_string());
        labels.insert(CANONICAL_NAME_LABEL.into(), canonical_name);
        labels.insert(CANONICAL_REVISION_LABEL.into(), canonical_revision);
        let cluster_id = if node.cluster_id.is_empty() { node::DEFAULT_CLUSTER_ID } else { &node.cluster_id };
        PeerMetadata {
            id: node.id.clone(),
            name: node.name.clone(),
            owner: owner(&node.namespace, &workload_name),
            namespace: node.namespace.clone(),
            workload_name,
            cluster_id: cluster_id.to_string(),
            service_account: node.service_account.clone(),
            labels,
        }
    }

    /// A label's value, if sent and not empty.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str).filter(|v| !v.is_empty())
    }

    /// The `Struct` Istio's proxies exchange, empty fields left out.
    pub fn to_struct(&self) -> Struct {
        let mut fields = std::collections::HashMap::new();
        for (key, value) in [
            (node::NAME, &self.name),
            (node::NAMESPACE, &self.namespace),
            (node::WORKLOAD_NAME, &self.workload_name),
            (node::CLUSTER_ID, &self.cluster_id),
            (node::SERVICE_ACCOUNT, &self.service_account),
            (OWNER, &self.owner),
        ] {
            if !value.is_empty() {
                fields.insert(key.to_string(), string_value(value));
            }
        }
        let labels = Struct { fields: self.labels.iter().map(|(k, v)| (k.clone(), string_value(v))).collect() };
        fields.insert(node::LABELS.to_string(), Value { kind: Some(Kind::StructValue(labels)) });
        Struct { fields }
    }

    /// The [`METADATA_HEADER`] value: standard base64 (padded) of the serialized
    /// [`PeerMetadata::to_struct`], with map entries in key order so equal metadata
    /// encodes to equal bytes (the control plane's and the proxy's copies compare equal).
    pub fn encode(&self) -> String {
        STANDARD.encode(encode_struct_sorted(&self.to_struct()))
    }

    /// Reads a [`METADATA_HEADER`] value. `None` when it is empty or longer than
    /// [`MAX_ENCODED_LEN`], not base64, not a serialized `Struct`, or when a field this
    /// type keeps is longer than [`MAX_FIELD_LEN`] or holds a control character.
    /// Unknown keys and non-string values are ignored, as Istio does. Never panics
    /// (prost bounds the nesting depth it decodes).
    pub fn decode(value: &[u8]) -> Option<PeerMetadata> {
        if value.is_empty() || value.len() > MAX_ENCODED_LEN {
            return None;
        }
        let bytes = DECODER.decode(value).ok()?;
        let s = Struct::decode(bytes.as_slice()).ok()?;
        Self::from_struct(&s)
    }

    /// Reads the `Struct` itself (what [`PeerMetadata::decode`] finds inside the header,
    /// and the TCP exchange inside its frame), with the same checks.
    pub fn from_struct(s: &Struct) -> Option<PeerMetadata> {
        let text = |f: &Struct, key: &str| -> Option<Option<String>> {
            match f.fields.get(key).and_then(|v| v.kind.as_ref()) {
                Some(Kind::StringValue(v)) if v.len() > MAX_FIELD_LEN || v.chars().any(char::is_control) => None,
                Some(Kind::StringValue(v)) => Some(Some(v.clone())),
                _ => Some(None),
            }
        };
        let field = |key: &str| text(s, key).map(Option::unwrap_or_default);
        let mut labels = BTreeMap::new();
        if let Some(Kind::StructValue(l)) = s.fields.get(node::LABELS).and_then(|v| v.kind.as_ref()) {
            for key in EXCHANGED_LABELS {
                if let Some(v) = text(l, key)? {
                    labels.insert(key.to_string(), v);
                }
            }
        }
        Some(PeerMetadata {
            id: String::new(),
            name: field(node::NAME)?,
            namespace: field(node::NAMESPACE)?,
            workload_name: field(node::WORKLOAD_NAME)?,
            cluster_id: field(node::CLUSTER_ID)?,
            service_account: field(node::SERVICE_ACCOUNT)?,
            owner: field(OWNER)?,
            labels,
        })
    }
}

/// The ALPN protocol under which Istio's proxies exchange metadata on TCP connections
/// (mutual TLS only): each side writes one [`tcp_frame`] first, then the stream is the
/// application's.
pub const TCP_EXCHANGE_ALPN: &str = "istio-peer-exchange";

/// Magic number opening a TCP exchange frame (network byte order).
pub const TCP_FRAME_MAGIC: u32 = 0x3D23_0467;

/// `type_url` of the frame's `Any`.
const STRUCT_TYPE_URL: &str = "type.googleapis.com/google.protobuf.Struct";

/// One TCP exchange frame, as Istio's `metadata_exchange` network filter writes it: the
/// magic and the payload length (both u32, big-endian), then a `google.protobuf.Any`
/// holding a `Struct` with `x-envoy-peer-metadata` (the metadata [`PeerMetadata::to_struct`])
/// and `x-envoy-peer-metadata-id` (the node id).
pub fn tcp_frame(meta: &PeerMetadata) -> Vec<u8> {
    let mut fields = std::collections::HashMap::new();
    fields.insert(METADATA_HEADER.to_string(), Value { kind: Some(Kind::StructValue(meta.to_struct())) });
    if !meta.id.is_empty() {
        fields.insert(METADATA_ID_HEADER.to_string(), string_value(&meta.id));
    }
    let any = envoy_types::pb::google::protobuf::Any {
        type_url: STRUCT_TYPE_URL.into(),
        value: encode_struct_sorted(&Struct { fields }),
    };
    let payload = any.encode_to_vec();
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&TCP_FRAME_MAGIC.to_be_bytes());
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Reads a TCP exchange frame's payload (the bytes after its 8-byte head): the peer's
/// metadata, with the id the frame carries. `None` when it is not an `Any` holding a
/// `Struct`, or the metadata fails [`PeerMetadata::from_struct`]'s checks.
pub fn decode_tcp_payload(payload: &[u8]) -> Option<PeerMetadata> {
    let any = envoy_types::pb::google::protobuf::Any::decode(payload).ok()?;
    if any.type_url != STRUCT_TYPE_URL {
        return None;
    }
    let outer = Struct::decode(any.value.as_slice()).ok()?;
    let Some(Kind::StructValue(inner)) = outer.fields.get(METADATA_HEADER).and_then(|v| v.kind.as_ref()) else {
        return None;
    };
    let mut meta = PeerMetadata::from_struct(inner)?;
    if let Some(Kind::StringValue(id)) = outer.fields.get(METADATA_ID_HEADER).and_then(|v| v.kind.as_ref()) {
        if id.len() <= MAX_FIELD_LEN * 4 && !id.chars().any(char::is_control) {
            meta.id = id.clone();
        }
    }
    Some(meta)
}

/// Istio's `OWNER` for a Deployment.
fn owner(namespace: &str, workload: &str) -> String {
    if namespace.is_empty() || workload.is_empty() {
        return String::new();
    }
    format!("kubernetes://apis/apps/v1/namespaces/{namespace}/deployments/{workload}")
}

fn string_value(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.to_string())) }
}

/// Serializes `s` with its map entries sorted by key (protobuf's deterministic mode):
/// prost writes a `HashMap` in iteration order, which differs between processes.
fn encode_struct_sorted(s: &Struct) -> Vec<u8> {
    let mut keys: Vec<&String> = s.fields.keys().collect();
    keys.sort();
    let mut out = Vec::new();
    for key in keys {
        let value = &s.fields[key];
        let value_bytes = match &value.kind {
            Some(Kind::StructValue(inner)) => {
                let inner = encode_struct_sorted(inner);
                let mut v = Vec::new();
                // Value.struct_value = 5 (length delimited).
                prost::encoding::encode_key(5, prost::encoding::WireType::LengthDelimited, &mut v);
                prost::encoding::encode_varint(inner.len() as u64, &mut v);
                v.extend_from_slice(&inner);
                v
            }
            _ => value.encode_to_vec(),
        };
        // Map entry: key = 1 (string), value = 2 (message).
        let mut entry = Vec::new();
        prost::encoding::string::encode(1, key, &mut entry);
        prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut entry);
        prost::encoding::encode_varint(value_bytes.len() as u64, &mut entry);
        entry.extend_from_slice(&value_bytes);
        // Struct.fields = 1 (repeated map entry).
        prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut out);
        prost::encoding::encode_varint(entry.len() as u64, &mut out);
        out.extend_from_slice(&entry);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_frame_round_trips_in_istios_layout() {
        let mut labels = BTreeMap::new();
        labels.insert("app".to_string(), "tcp-echo".to_string());
        let meta = PeerMetadata {
            id: "sidecar~10.0.0.1~tcp-echo-1.default~default.svc.cluster.local".into(),
            name: "tcp-echo-1".into(),
            namespace: "default".into(),
            workload_name: "tcp-echo".into(),
            labels,
            ..PeerMetadata::default()
        };
        let frame = tcp_frame(&meta);
        assert_eq!(&frame[..4], &[0x3D, 0x23, 0x04, 0x67], "magic, big-endian");
        let len = u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]) as usize;
        assert_eq!(len, frame.len() - 8, "the length counts the payload");
        assert_eq!(decode_tcp_payload(&frame[8..]), Some(meta));
        assert_eq!(decode_tcp_payload(b"garbage"), None);
        // An Any of another type is not metadata.
        let other = envoy_types::pb::google::protobuf::Any { type_url: "type.googleapis.com/x".into(), value: vec![] }
            .encode_to_vec();
        assert_eq!(decode_tcp_payload(&other), None);
    }

    fn reviews() -> NodeInfo {
        NodeInfo {
            id: "sidecar~10.0.0.7~reviews-v2-7f9c.default~default.svc.cluster.local".into(),
            cluster: "Kubernetes".into(),
            name: "reviews-v2-7f9c".into(),
            namespace: "default".into(),
            labels: [("app", "reviews"), ("version", "v2"), ("weft.dev/workload", "reviews-v2"), ("team", "books")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            service_account: "bookinfo-reviews".into(),
            ..NodeInfo::default()
        }
    }

    #[test]
    fn from_node_carries_istios_keys() {
        let m = PeerMetadata::from_node(&reviews());
        assert_eq!(m.workload_name, "reviews-v2");
        assert_eq!(m.name, "reviews-v2-7f9c");
        assert_eq!(m.owner, "kubernetes://apis/apps/v1/namespaces/default/deployments/reviews-v2");
        assert_eq!(m.label(CANONICAL_NAME_LABEL), Some("reviews"));
        assert_eq!(m.label(CANONICAL_REVISION_LABEL), Some("v2"));
        assert_eq!(m.label("team"), None, "only the labels metrics read are exchanged");
        let s = m.to_struct();
        for key in ["NAME", "NAMESPACE", "WORKLOAD_NAME", "CLUSTER_ID", "SERVICE_ACCOUNT", "OWNER", "LABELS"] {
            assert!(s.fields.contains_key(key), "{key} missing");
        }
    }

    #[test]
    fn round_trip_and_deterministic_bytes() {
        let m = PeerMetadata::from_node(&reviews());
        let a = m.encode();
        assert_eq!(a, m.clone().encode(), "same metadata, same bytes");
        assert!(a.len().is_multiple_of(4), "standard padded base64: {a}");
        // The sorted encoding is a valid Struct equal to what prost writes.
        let bytes = STANDARD.decode(&a).unwrap();
        assert_eq!(Struct::decode(bytes.as_slice()).unwrap(), m.to_struct());
        let back = PeerMetadata::decode(a.as_bytes()).unwrap();
        assert_eq!(PeerMetadata { id: m.id.clone(), ..back }, m);
        // Unpadded (Envoy's decoder accepts both) decodes too.
        assert!(PeerMetadata::decode(a.trim_end_matches('=').as_bytes()).is_some());
    }

    #[test]
    fn decodes_what_istio_sends() {
        // The Struct istio/proxy's peer_metadata filter builds (plus keys of the older
        // exchange that this side ignores), serialized by prost.
        let mut labels = std::collections::HashMap::new();
        labels.insert("app".to_string(), string_value("productpage"));
        labels.insert(CANONICAL_NAME_LABEL.to_string(), string_value("productpage"));
        labels.insert(CANONICAL_REVISION_LABEL.to_string(), string_value("v1"));
        labels.insert("version".to_string(), string_value("v1"));
        let mut fields = std::collections::HashMap::new();
        fields.insert("NAME".to_string(), string_value("productpage-v1-123"));
        fields.insert("NAMESPACE".to_string(), string_value("bookinfo"));
        fields.insert("WORKLOAD_NAME".to_string(), string_value("productpage-v1"));
        fields.insert("CLUSTER_ID".to_string(), string_value("Kubernetes"));
        fields.insert("MESH_ID".to_string(), string_value("cluster.local"));
        fields.insert("APP_CONTAINERS".to_string(), string_value("productpage"));
        fields.insert("ISTIO_VERSION".to_string(), Value { kind: Some(Kind::NumberValue(1.0)) });
        fields.insert("LABELS".to_string(), Value { kind: Some(Kind::StructValue(Struct { fields: labels })) });
        let header = STANDARD.encode(Struct { fields }.encode_to_vec());
        let m = PeerMetadata::decode(header.as_bytes()).unwrap();
        assert_eq!(m.workload_name, "productpage-v1");
        assert_eq!(m.namespace, "bookinfo");
        assert_eq!(m.label("version"), Some("v1"));
        assert_eq!(m.service_account, "", "absent key: empty");
    }

    #[test]
    fn garbage_is_rejected_without_panic() {
        let long = Struct { fields: [("NAME".to_string(), string_value(&"x".repeat(MAX_FIELD_LEN + 1)))].into() };
        let control = Struct { fields: [("NAMESPACE".to_string(), string_value("a\nb"))].into() };
        let mut deep = Value { kind: Some(Kind::StringValue("x".into())) };
        for _ in 0..200 {
            deep = Value { kind: Some(Kind::StructValue(Struct { fields: [("LABELS".to_string(), deep)].into() })) };
        }
        let deep = Struct { fields: [("LABELS".to_string(), deep)].into() };
        for raw in [
            String::new(),
            "!!! not base64".into(),
            STANDARD.encode([0xff, 0xfe, 0x07]),
            STANDARD.encode(long.encode_to_vec()),
            STANDARD.encode(control.encode_to_vec()),
            STANDARD.encode(deep.encode_to_vec()),
            "A".repeat(MAX_ENCODED_LEN + 4),
        ] {
            assert_eq!(PeerMetadata::decode(raw.as_bytes()), None, "accepted {raw:.40}");
        }
    }
}
