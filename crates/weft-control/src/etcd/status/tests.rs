use std::time::Duration;

use weft_xds::{type_url, NackInfo, TypeStatus};

use super::*;

/// What a replica lists of a proxy (its `GET /api/v1/proxies` entry) without `types`.
fn fixed_entry(id: &str) -> Value {
    json!({
        "id": id, "kind": "sidecar", "name": id, "namespace": "default", "labels": {"app": "a"},
        "identity": "spiffe://cluster.local/ns/default/sa/default", "inbound": null, "outbound": null,
        "admin": null, "metrics": null, "peer": "127.0.0.1:1", "mode": "Sotw", "connected_since": 7,
    })
}

fn at(seconds: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(seconds * 1000 + 250)
}

/// Statuses covering each state: SYNCED (ACK time known), STALE (`current` differs),
/// NACKED (the NACK names another version than the ACKed one), NOT SENT (no status),
/// and an ACK whose NACK is about the ACKed version (SYNCED, no `nack`).
fn statuses() -> Vec<SyncInput> {
    let st = |acked: Option<&str>, current: &str, acked_at: Option<SystemTime>, nack: Option<&str>| TypeStatus {
        sent_version: Some(current.to_string()),
        sent_nonce: Some("1".into()),
        acked_version: acked.map(str::to_string),
        acked_at,
        last_nack: nack.map(|v| NackInfo { version: v.into(), nonce: "1".into(), error: format!("bad {v}") }),
        current_version: Some(current.to_string()),
    };
    let proxy = |id: &str, types: Vec<(&str, TypeStatus)>| SyncInput {
        node_id: id.to_string(),
        types: types.into_iter().map(|(t, s)| (t.to_string(), s)).collect(),
        translation: None,
    };
    vec![
        proxy(
            "a",
            vec![
                (type_url::CLUSTER, st(Some("c1"), "c1", Some(at(100)), None)),
                (type_url::ENDPOINT, st(Some("e1"), "e2", Some(at(101)), None)),
                (type_url::LISTENER, st(Some("l1"), "l2", None, Some("l2"))),
                (type_url::ROUTE, st(Some("r1"), "r1", Some(at(102)), Some("r1"))),
            ],
        ),
        proxy("b", vec![(type_url::ROUTE, st(None, "r1", None, Some("r1")))]),
    ]
}

/// The sync states a replica lists for `input` (as `api::type_states` builds them, the
/// translation's versions being what each stream recorded), with the ACK time in
/// place of the age: what a `t` key reads back as.
fn listed_states(input: &SyncInput) -> Value {
    let mut types = serde_json::Map::new();
    for t in crate::api::LISTED_TYPES {
        let st = input.types.get(t);
        let want = st.and_then(|s| s.current_version.as_deref());
        let (status, nack) = crate::api::sync_status(st, want);
        let acked = st.and_then(|s| s.acked_version.as_deref());
        let acked_at = st.and_then(|s| s.acked_at).and_then(unix_seconds);
        types.insert(
            type_url::short(t).to_string(),
            json!({"status": status, "acked": acked, "current": want, "acked_at": acked_at,
                   "nack": nack.map(|n| n.error.clone())}),
        );
    }
    Value::Object(types)
}

/// How replicas before typed states built a proxy's `t` entry from its listed states
/// (`types` with `acked_at` instead of `config_age_seconds`).
fn compacted_as_before(types: Value) -> Value {
    let Value::Object(mut types) = types else { return Value::Null };
    for v in types.values_mut() {
        if let Some(o) = v.as_object_mut() {
            if o.get("current") == o.get("acked") {
                o.remove("current");
            }
            if o.get("nack").is_some_and(Value::is_null) {
                o.remove("nack");
            }
        }
    }
    Value::Object(types)
}

#[test]
fn typed_sync_states_are_the_bytes_the_value_form_wrote() {
    let inputs = statuses();
    let by_id: serde_json::Map<String, Value> =
        inputs.iter().map(|i| (i.node_id.clone(), compacted_as_before(listed_states(i)))).collect();
    let before = serde_json::to_vec(&json!({ "states": by_id })).unwrap_or_default();
    let typed = synced_value(&inputs);
    assert_eq!(String::from_utf8_lossy(&typed), String::from_utf8_lossy(&before));
}

#[test]
fn a_translation_gives_the_current_versions_when_the_stream_recorded_none() {
    let translation: TypeMap = [
        (type_url::CLUSTER.to_string(), ("c1".to_string(), BTreeMap::new())),
        (type_url::ENDPOINT.to_string(), ("e2".to_string(), BTreeMap::new())),
        (type_url::LISTENER.to_string(), ("l2".to_string(), BTreeMap::new())),
        (type_url::ROUTE.to_string(), ("r1".to_string(), BTreeMap::new())),
    ]
    .into();
    let translation = Arc::new(translation);
    let mut inputs = statuses();
    for i in &mut inputs {
        for s in i.types.values_mut() {
            s.current_version = None;
        }
        i.translation = Some(translation.clone());
    }
    // A proxy subscribed to every type: the same states as from what its stream recorded.
    let recorded = statuses();
    assert_eq!(synced_value(&inputs[..1]), synced_value(&recorded[..1]));
    // One that was never sent a type: its current version, as the API lists it.
    let b: Value = serde_json::from_slice(&synced_value(&inputs[1..])).unwrap_or_default();
    assert_eq!(
        b["states"]["b"]["Cluster"],
        json!({"acked": null, "acked_at": null, "current": "c1", "status": "NOT SENT"})
    );
}

#[test]
fn published_buckets_read_back_as_the_entries_a_replica_lists() {
    let replica = json!({"xds": "127.0.0.1:2", "api": "127.0.0.1:3", "pid": 1});
    let inputs = statuses();
    let mut values: BTreeMap<String, Vec<u8>> = fixed_values(&replica, 0x2a, vec![fixed_entry("a"), fixed_entry("b")])
        .into_iter()
        .map(|(k, v)| (k, v.to_vec()))
        .collect();
    let mut buckets: BTreeMap<u8, Vec<SyncInput>> = BTreeMap::new();
    for input in statuses() {
        buckets.entry(bucket(&input.node_id)).or_default().push(input);
    }
    for (b, inputs) in buckets {
        values.insert(format!("2a/t{b:02x}"), synced_value(&inputs).to_vec());
    }
    assert!(values.keys().all(|k| k.starts_with("2a/b") || k.starts_with("2a/t")), "{values:?}");
    let mut back = published_entries(&values, None);
    back.sort_by(|x, y| x["id"].as_str().cmp(&y["id"].as_str()));
    assert_eq!(back.len(), 2);
    for (got, input) in back.iter().zip(&inputs) {
        let mut want = fixed_entry(&input.node_id);
        want["replica"] = replica.clone();
        want["types"] = listed_states(input);
        assert_eq!(got, &want);
    }
    // This replica's own keys are skipped.
    assert!(published_entries(&values, Some("2a/")).is_empty());
}

#[test]
fn entries_of_earlier_replicas_are_still_read() {
    let mut whole = fixed_entry("old");
    whole["types"] = json!({"Cluster": {"status": "SYNCED", "acked": "c1", "current": "c1", "nack": null}});
    whole["replica"] = json!({"xds": "x"});
    let values: BTreeMap<String, Vec<u8>> = [
        ("1/b00".to_string(), serde_json::to_vec(&json!([whole.clone()])).unwrap_or_default()),
        ("2/sim".to_string(), serde_json::to_vec(&whole).unwrap_or_default()),
    ]
    .into();
    assert_eq!(published_entries(&values, None), vec![whole.clone(), whole]);
}
