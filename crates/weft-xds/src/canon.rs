//! Canonical bytes for xDS resources that hold protobuf maps.
//!
//! The generated Envoy types keep `map<..>` fields in `std::collections::HashMap`s, whose
//! iteration (and so encoding) order is random per map: the same resource translated twice,
//! by one control plane or by two replicas, encodes to different bytes, gets a different
//! content version, and is pushed again for nothing. [`canonical`] rewrites the encoding
//! with every map's entries sorted by key, at the wire level, following the fields that
//! lead to a map in the resources weft's translator emits (metadata `Struct`s, per-filter
//! configurations, RBAC policies, JWT providers, protocol options), into the `Any`s
//! nested inside them by their type URL. Everything else is copied byte for byte; input
//! that does not parse is returned unchanged.

use crate::Any;

/// How to walk one message type: which fields lead to maps, as (field number, kind).
struct Schema {
    fields: &'static [(u32, Kind)],
    /// A `google.protobuf.Any`: `value` (2) is canonicalised by the type in `type_url` (1).
    any: bool,
}

#[derive(Clone, Copy)]
enum Kind {
    /// A (possibly repeated) message field.
    Msg(&'static Schema),
    /// A `map<string, V>` field; V walked with the schema.
    Map(&'static Schema),
}

const fn msg(fields: &'static [(u32, Kind)]) -> Schema {
    Schema { fields, any: false }
}

static OPAQUE: Schema = msg(&[]);
static ANY: Schema = Schema { fields: &[], any: true };
// google.protobuf.Struct / Value / ListValue.
static STRUCT: Schema = msg(&[(1, Kind::Map(&VALUE))]);
static VALUE: Schema = msg(&[(5, Kind::Msg(&STRUCT)), (6, Kind::Msg(&LIST_VALUE))]);
static LIST_VALUE: Schema = msg(&[(1, Kind::Msg(&VALUE))]);
// envoy.config.core.v3.
static METADATA: Schema = msg(&[(1, Kind::Map(&STRUCT)), (2, Kind::Map(&ANY))]);
static TRANSPORT_SOCKET: Schema = msg(&[(3, Kind::Msg(&ANY))]);
// envoy.config.cluster.v3 / endpoint.v3.
static CLUSTER: Schema = msg(&[
    (24, Kind::Msg(&TRANSPORT_SOCKET)),
    (25, Kind::Msg(&METADATA)),
    (33, Kind::Msg(&CLA)),
    (36, Kind::Map(&ANY)),
    (43, Kind::Msg(&TRANSPORT_SOCKET_MATCH)),
]);
static TRANSPORT_SOCKET_MATCH: Schema = msg(&[(2, Kind::Msg(&STRUCT)), (3, Kind::Msg(&TRANSPORT_SOCKET))]);
static CLA: Schema = msg(&[(2, Kind::Msg(&LOCALITY_LB_ENDPOINTS))]);
static LOCALITY_LB_ENDPOINTS: Schema = msg(&[(2, Kind::Msg(&LB_ENDPOINT))]);
static LB_ENDPOINT: Schema = msg(&[(3, Kind::Msg(&METADATA))]);
// envoy.config.listener.v3 and the filters in it.
static LISTENER: Schema =
    msg(&[(3, Kind::Msg(&FILTER_CHAIN)), (6, Kind::Msg(&METADATA)), (25, Kind::Msg(&FILTER_CHAIN))]);
static FILTER_CHAIN: Schema =
    msg(&[(3, Kind::Msg(&FILTER)), (5, Kind::Msg(&METADATA)), (6, Kind::Msg(&TRANSPORT_SOCKET))]);
/// A listener filter or an HTTP filter: `typed_config` is field 4 in both.
static FILTER: Schema = msg(&[(4, Kind::Msg(&ANY))]);
static HCM: Schema = msg(&[(4, Kind::Msg(&ROUTE_CONFIGURATION)), (5, Kind::Msg(&FILTER))]);
static RBAC_FILTER: Schema = msg(&[(1, Kind::Msg(&RBAC)), (2, Kind::Msg(&RBAC))]);
static RBAC_PER_ROUTE: Schema = msg(&[(2, Kind::Msg(&RBAC_FILTER))]);
static RBAC: Schema = msg(&[(2, Kind::Map(&OPAQUE))]);
static JWT_AUTHN: Schema = msg(&[(1, Kind::Map(&OPAQUE)), (5, Kind::Map(&OPAQUE))]);
// envoy.config.route.v3.
static ROUTE_CONFIGURATION: Schema = msg(&[(2, Kind::Msg(&VIRTUAL_HOST))]);
static VIRTUAL_HOST: Schema = msg(&[(3, Kind::Msg(&ROUTE)), (15, Kind::Map(&ANY)), (24, Kind::Msg(&METADATA))]);
static ROUTE: Schema = msg(&[(2, Kind::Msg(&ROUTE_ACTION)), (4, Kind::Msg(&METADATA)), (13, Kind::Map(&ANY))]);
static ROUTE_ACTION: Schema = msg(&[(3, Kind::Msg(&WEIGHTED_CLUSTER))]);
static WEIGHTED_CLUSTER: Schema = msg(&[(1, Kind::Msg(&CLUSTER_WEIGHT))]);
static CLUSTER_WEIGHT: Schema = msg(&[(10, Kind::Map(&ANY))]);

/// The schema of a message by its type URL (`type.googleapis.com/<full name>`).
fn schema_for(type_url: &str) -> Option<&'static Schema> {
    let name = type_url.rsplit('/').next().unwrap_or(type_url);
    Some(match name {
        "envoy.config.cluster.v3.Cluster" => &CLUSTER,
        "envoy.config.endpoint.v3.ClusterLoadAssignment" => &CLA,
        "envoy.config.listener.v3.Listener" => &LISTENER,
        "envoy.config.route.v3.RouteConfiguration" => &ROUTE_CONFIGURATION,
        "envoy.config.route.v3.VirtualHost" => &VIRTUAL_HOST,
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager" => &HCM,
        "envoy.extensions.filters.http.rbac.v3.RBAC" | "envoy.extensions.filters.network.rbac.v3.RBAC" => &RBAC_FILTER,
        "envoy.extensions.filters.http.rbac.v3.RBACPerRoute" => &RBAC_PER_ROUTE,
        "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication" => &JWT_AUTHN,
        _ => return None,
    })
}

/// `any` with its value in canonical form (maps sorted by key); unchanged when its type
/// holds no map weft emits, or when the bytes do not parse.
pub fn canonical(any: &Any) -> Any {
    match schema_for(&any.type_url).and_then(|s| walk(&any.value, s)) {
        Some(value) => Any { type_url: any.type_url.clone(), value },
        None => any.clone(),
    }
}

/// One field as read from the wire.
struct Field<'a> {
    number: u32,
    /// The whole field, key included.
    raw: &'a [u8],
    /// The payload of a length-delimited field.
    payload: Option<&'a [u8]>,
}

fn walk(bytes: &[u8], schema: &Schema) -> Option<Vec<u8>> {
    let fields = parse(bytes)?;
    if schema.any {
        let type_url = fields.iter().find(|f| f.number == 1).and_then(|f| f.payload);
        let inner = type_url.and_then(|t| std::str::from_utf8(t).ok()).and_then(schema_for);
        let mut out = Vec::with_capacity(bytes.len());
        for f in &fields {
            match (f.number, f.payload, inner) {
                (2, Some(value), Some(s)) => emit_len(&mut out, 2, &walk(value, s)?),
                _ => out.extend_from_slice(f.raw),
            }
        }
        return Some(out);
    }
    // Map entries by field number, canonicalised, then emitted sorted by key where the
    // field first appeared.
    let mut maps: Vec<(u32, Vec<Entry>)> = Vec::new();
    for f in &fields {
        if let (Some(Kind::Map(s)), Some(payload)) = (kind_of(schema, f.number), f.payload) {
            let entry = walk_entry(payload, s)?;
            match maps.iter_mut().find(|(n, _)| *n == f.number) {
                Some((_, entries)) => entries.push(entry),
                None => maps.push((f.number, vec![entry])),
            }
        }
    }
    let mut out = Vec::with_capacity(bytes.len());
    for f in &fields {
        match (kind_of(schema, f.number), f.payload) {
            (Some(Kind::Msg(s)), Some(payload)) => emit_len(&mut out, f.number, &walk(payload, s)?),
            (Some(Kind::Map(_)), Some(_)) => {
                if let Some(i) = maps.iter().position(|(n, _)| *n == f.number) {
                    let (_, mut entries) = maps.swap_remove(i);
                    entries.sort();
                    for (_, entry) in &entries {
                        emit_len(&mut out, f.number, entry);
                    }
                }
            }
            _ => out.extend_from_slice(f.raw),
        }
    }
    Some(out)
}

/// A map entry: its key's bytes (what entries sort by), then the whole entry.
type Entry = (Vec<u8>, Vec<u8>);

fn kind_of(schema: &Schema, number: u32) -> Option<Kind> {
    schema.fields.iter().find(|(n, _)| *n == number).map(|(_, k)| *k)
}

/// A map entry (`key` = 1, `value` = 2) with its value canonicalised: (key, entry bytes).
fn walk_entry(entry: &[u8], value: &Schema) -> Option<Entry> {
    let fields = parse(entry)?;
    let mut key = Vec::new();
    let mut out = Vec::with_capacity(entry.len());
    for f in &fields {
        match (f.number, f.payload) {
            (1, Some(k)) => {
                key = k.to_vec();
                out.extend_from_slice(f.raw);
            }
            (2, Some(v)) => emit_len(&mut out, 2, &walk(v, value)?),
            _ => out.extend_from_slice(f.raw),
        }
    }
    Some((key, out))
}

fn parse(mut bytes: &[u8]) -> Option<Vec<Field<'_>>> {
    let mut fields = Vec::new();
    while !bytes.is_empty() {
        let start = bytes;
        let key = varint(&mut bytes)?;
        let number = u32::try_from(key >> 3).ok()?;
        let payload = match key & 7 {
            0 => {
                varint(&mut bytes)?;
                None
            }
            1 => {
                bytes = bytes.get(8..)?;
                None
            }
            2 => {
                let len = usize::try_from(varint(&mut bytes)?).ok()?;
                let payload = bytes.get(..len)?;
                bytes = bytes.get(len..)?;
                Some(payload)
            }
            5 => {
                bytes = bytes.get(4..)?;
                None
            }
            _ => return None,
        };
        let used = start.len() - bytes.len();
        fields.push(Field { number, raw: &start[..used], payload });
    }
    Some(fields)
}

fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let b = *bytes.first()?;
        *bytes = &bytes[1..];
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn emit_len(out: &mut Vec<u8>, number: u32, payload: &[u8]) {
    put_varint(out, (u64::from(number) << 3) | 2);
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::google::protobuf::{value, Struct, Value};
    use prost::{Message, Name};

    fn cluster(order: &[&str]) -> Cluster {
        let mut fields = std::collections::HashMap::new();
        for k in order {
            fields.insert((*k).to_string(), Value { kind: Some(value::Kind::StringValue(format!("v-{k}"))) });
        }
        let mut c = Cluster { name: "c".into(), ..Default::default() };
        let mut m = Metadata::default();
        m.filter_metadata.insert("istio".into(), Struct { fields: fields.clone() });
        m.filter_metadata.insert("weft".into(), Struct { fields });
        c.metadata = Some(m);
        c
    }

    #[test]
    fn equal_clusters_with_maps_get_the_same_bytes_whatever_the_map_order() {
        let keys = ["a", "b", "c", "d", "e", "f", "g", "h"];
        let reference = canonical(&Any { type_url: Cluster::type_url(), value: cluster(&keys).encode_to_vec() });
        let mut differed = false;
        for _ in 0..20 {
            let raw = Any { type_url: Cluster::type_url(), value: cluster(&keys).encode_to_vec() };
            differed |= raw.value != reference.value;
            let canon = canonical(&raw);
            assert_eq!(canon.value, reference.value);
            // Still the same message.
            assert_eq!(Cluster::decode(canon.value.as_slice()).unwrap(), cluster(&keys));
        }
        assert!(differed, "the plain encoding never varied: this test proves nothing");
    }

    #[test]
    fn bytes_that_do_not_parse_are_left_alone() {
        let any = Any { type_url: Cluster::type_url(), value: vec![0xff, 0xff, 0x07] };
        assert_eq!(canonical(&any), any);
    }
}
