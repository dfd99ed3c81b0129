//! Proxy sync state across replicas (`weft proxy-status` through any replica).
//!
//! Each replica publishes, under a lease of its own, the proxies connected to it in (at
//! most) 256 buckets: a proxy's entry goes to the bucket its node id hashes to, so a push
//! to thousands of proxies is a few hundred etcd writes per replica, not one per proxy.
//! A bucket is two keys: `proxies/<lease id>/b<bucket>` holds what a proxy's connection
//! fixes (identity, peer, mode, ...) and the replica it is connected to (`replica`: xDS
//! and API addresses), rewritten only when a proxy comes or goes;
//! `proxies/<lease id>/t<bucket>` holds per proxy and type the sync state (SYNCED / STALE
//! / NACKED / NOT SENT, the version ACKed and the current one when it differs, the time
//! of the ACK instead of its age), the only part a config push changes. Together they
//! are the entry that replica's `GET /api/v1/proxies` shows. Writes follow the xDS
//! server's status changes once they settle (no change for [`PUBLISH_DELAY`], or
//! [`PUBLISH_MAX_DELAY`] after the first), and only for keys that changed. The lease is
//! kept alive by a task of its own, so a long settle or a slow write never lets it lapse
//! (which would drop every key and write them all again under a new lease). A replica
//! that dies takes its keys with its lease (the lease TTL later); a proxy that moved
//! meanwhile is listed once, from the replica it connected to last.
//!
//! [`ProxyBoard::merge`] adds to a replica's own list the proxies the others published
//! (in this form, or as earlier replicas wrote them: one key per proxy, or a bucket
//! holding a list of whole entries).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use etcd_client::{PutOptions, Txn, TxnOp};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::{retry_delay, Etcd, KeptLease};
use crate::api::Api;

/// Key prefix of the published proxy states (under the store's prefix).
const PREFIX: &str = "proxies/";
/// How long the status must stay unchanged before it is written: a push to every proxy
/// (and their ACKs) becomes one round of writes, after the push rather than during it
/// (a push to thousands of proxies on a busy machine takes longer than this, and a round
/// of writes in its middle takes CPU from it and costs a second round after it).
pub const PUBLISH_DELAY: Duration = Duration::from_millis(500);
/// The longest status changes wait to be written while they keep coming.
pub const PUBLISH_MAX_DELAY: Duration = Duration::from_secs(5);
/// Operations per etcd transaction (etcd's default limit is 128).
const TXN_OPS: usize = 100;
/// How long a listing waits for etcd before answering with this replica's proxies only.
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// This replica's view of the published proxy states.
pub struct ProxyBoard {
    etcd: Etcd,
    /// This replica, as entries name it.
    replica: Value,
    /// The lease this replica publishes under (its key segment), once granted.
    lease: Mutex<Option<i64>>,
}

impl ProxyBoard {
    /// A board for the replica serving xDS on `xds` and its API on `api`.
    pub fn new(etcd: Etcd, xds: SocketAddr, api: SocketAddr) -> Arc<ProxyBoard> {
        Arc::new(ProxyBoard {
            etcd,
            replica: json!({"xds": xds.to_string(), "api": api.to_string(), "pid": std::process::id()}),
            lease: Mutex::new(None),
        })
    }

    /// Starts publishing `api`'s connected proxies; runs until aborted.
    pub fn spawn(self: &Arc<Self>, api: Arc<Api>) -> JoinHandle<()> {
        tokio::spawn(publish(self.clone(), api))
    }

    /// `local` (this replica's `GET /api/v1/proxies` answer) with every entry naming
    /// this replica, plus the proxies other replicas published. When etcd cannot be
    /// read, the local list with `replicasError` saying why.
    pub async fn merge(&self, mut local: Value) -> Value {
        let mut seen = std::collections::BTreeSet::new();
        if let Some(list) = local["proxies"].as_array_mut() {
            for p in list.iter_mut() {
                p["replica"] = self.replica.clone();
                if let Some(id) = p["id"].as_str() {
                    seen.insert(id.to_string());
                }
            }
        }
        let read = tokio::time::timeout(READ_TIMEOUT, self.etcd.read_prefix(PREFIX)).await;
        let values = match read {
            Ok(Ok(r)) => r.values,
            Ok(Err(e)) => {
                local["replicasError"] = json!(format!("etcd: {e}"));
                return local;
            }
            Err(_) => {
                local["replicasError"] = json!("etcd did not answer within 3 s");
                return local;
            }
        };
        let own = self.lease.lock().unwrap_or_else(PoisonError::into_inner).map(|l| format!("{l:x}/"));
        let now = SystemTime::now();
        // Per node id the entry of the replica it connected to last.
        let mut remote: BTreeMap<String, Value> = BTreeMap::new();
        for mut entry in published_entries(&values, own.as_deref()) {
            let Some(id) = entry["id"].as_str().map(str::to_string) else { continue };
            if seen.contains(&id) {
                continue;
            }
            ages_from_ack_times(&mut entry, now);
            let newer = remote.get(&id).is_none_or(|e| since(&entry) >= since(e));
            if newer {
                remote.insert(id, entry);
            }
        }
        if let Some(list) = local["proxies"].as_array_mut() {
            list.extend(remote.into_values());
            list.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        }
        local
    }
}

/// Writes this replica's proxies' states under its lease for as long as it runs.
async fn publish(board: Arc<ProxyBoard>, api: Arc<Api>) {
    let mut failures = 0u32;
    loop {
        if failures > 0 {
            tokio::time::sleep(retry_delay(failures)).await;
        }
        let lease = match KeptLease::grant(&board.etcd).await {
            Ok(l) => l,
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, "etcd: cannot take a lease for proxy states; retrying");
                continue;
            }
        };
        failures = 0;
        let id = lease.id();
        let period = lease.period();
        *board.lease.lock().unwrap_or_else(PoisonError::into_inner) = Some(id);
        let mut held = lease.keep_in_background();
        let mut written: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut fixed = FixedCache::default();
        let mut changes = api.server.status_changes();
        changes.mark_changed();
        // A failed write is retried at this period (or at the next change).
        let mut retry = tokio::time::interval(period);
        let mut dirty = false;
        loop {
            tokio::select! {
                () = held.lost() => {
                    tracing::warn!(lease = format!("{id:x}"), "etcd lease of proxy states lost; publishing under a new one");
                    break;
                }
                _ = retry.tick(), if dirty => {}
                r = changes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    settle(&mut changes).await;
                    dirty = true;
                }
            }
            if dirty {
                changes.borrow_and_update();
                let desired = entries(&board, &api, id, &mut fixed);
                dirty = !sync(&board.etcd, desired, id, &mut written).await;
            }
        }
    }
}

/// Returns once `changes` stayed still for [`PUBLISH_DELAY`] (checked at that period, so
/// a push's thousands of ACKs do not each wake this task), or after [`PUBLISH_MAX_DELAY`].
async fn settle(changes: &mut tokio::sync::watch::Receiver<u64>) {
    let deadline = tokio::time::Instant::now() + PUBLISH_MAX_DELAY;
    loop {
        changes.borrow_and_update();
        tokio::time::sleep(PUBLISH_DELAY).await;
        if !changes.has_changed().unwrap_or(false) || tokio::time::Instant::now() >= deadline {
            return;
        }
    }
}

/// The `b` values last built (what a connection fixes), reused while no proxy came or
/// went: a push changes only the `t` values, so only they are built again.
#[derive(Default)]
struct FixedCache {
    /// The lease and the server's membership version they were built at.
    at: Option<(i64, u64)>,
    values: BTreeMap<String, Vec<u8>>,
}

/// This replica's proxies as published: key -> JSON value (per bucket, its `b` key with
/// what each proxy's connection fixes and its `t` key with their sync states).
fn entries(board: &ProxyBoard, api: &Api, lease: i64, fixed: &mut FixedCache) -> BTreeMap<String, Vec<u8>> {
    // The membership version before the copy: a proxy arriving in between makes the
    // next round build the `b` values again.
    let membership = *api.server.membership_changes().borrow();
    // One copy of the connections for both the listing and the ACK times.
    let connections = api.server.connections();
    let ack_times = |c: &weft_xds::ConnectionStatus| -> BTreeMap<String, f64> {
        c.types
            .iter()
            .filter_map(|(t, s)| Some((weft_xds::type_url::short(t).to_string(), unix_seconds(s.acked_at?)?)))
            .collect()
    };
    if fixed.at == Some((lease, membership)) {
        let now = SystemTime::now();
        let mut synced: BTreeMap<u8, serde_json::Map<String, Value>> = BTreeMap::new();
        for c in &connections {
            let types = Value::Object(crate::api::type_states(api, c, now));
            let states = compact_states(types, Some(&ack_times(c)));
            synced.entry(bucket(&c.node_id)).or_default().insert(c.node_id.clone(), states);
        }
        let mut out = fixed.values.clone();
        for (b, synced) in synced {
            if let Ok(t) = serde_json::to_vec(&json!({ "states": synced })) {
                out.insert(format!("{lease:x}/t{b:02x}"), t);
            }
        }
        return out;
    }
    let acks: BTreeMap<String, BTreeMap<String, f64>> =
        connections.iter().map(|c| (c.node_id.clone(), ack_times(c))).collect();
    let out = bucket_values(&board.replica, lease, crate::api::proxies_of(api, &connections), &acks);
    fixed.values = out.iter().filter(|(k, _)| k.contains("/b")).map(|(k, v)| (k.clone(), v.clone())).collect();
    fixed.at = Some((lease, membership));
    out
}

/// `listed` (a `GET /api/v1/proxies` answer) as this replica's keys under `lease`.
fn bucket_values(
    replica: &Value,
    lease: i64,
    listed: Value,
    acks: &BTreeMap<String, BTreeMap<String, f64>>,
) -> BTreeMap<String, Vec<u8>> {
    let mut buckets: BTreeMap<u8, (Vec<Value>, serde_json::Map<String, Value>)> = BTreeMap::new();
    let Value::Object(mut listed) = listed else { return BTreeMap::new() };
    let Some(Value::Array(list)) = listed.remove("proxies") else { return BTreeMap::new() };
    for mut p in list {
        let Some(id) = p["id"].as_str().map(str::to_string) else { continue };
        let types = p.as_object_mut().and_then(|o| o.remove("types")).unwrap_or(Value::Null);
        let states = compact_states(types, acks.get(&id));
        let (fixed, synced) = buckets.entry(bucket(&id)).or_default();
        fixed.push(p);
        synced.insert(id, states);
    }
    let mut out = BTreeMap::new();
    for (b, (fixed, synced)) in buckets {
        let proxies = json!({"replica": replica, "proxies": fixed});
        if let (Ok(p), Ok(t)) = (serde_json::to_vec(&proxies), serde_json::to_vec(&json!({ "states": synced }))) {
            out.insert(format!("{lease:x}/b{b:02x}"), p);
            out.insert(format!("{lease:x}/t{b:02x}"), t);
        }
    }
    out
}

/// One proxy's per-type states as published: the time of each ACK instead of its age
/// (so an unchanged proxy is not rewritten), `current` only where it differs from
/// `acked`, no `nack` unless there is one.
fn compact_states(types: Value, acks: Option<&BTreeMap<String, f64>>) -> Value {
    let Value::Object(mut types) = types else { return Value::Null };
    for (t, v) in types.iter_mut() {
        if let Some(o) = v.as_object_mut() {
            o.remove("config_age_seconds");
            o.insert("acked_at".into(), json!(acks.and_then(|a| a.get(t))));
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

/// The entries other replicas published (all but keys under `own`, this replica's lease
/// prefix), whole again: as a replica lists its own, with `acked_at` times for ages.
fn published_entries(values: &BTreeMap<String, Vec<u8>>, own: Option<&str>) -> Vec<Value> {
    let mut entries = Vec::new();
    // Per lease prefix: the sync states of its `t` keys, by node id.
    let mut states: BTreeMap<&str, serde_json::Map<String, Value>> = BTreeMap::new();
    // Entries from `b` keys, with their lease prefix, awaiting their states.
    let mut fixed: Vec<(&str, Value)> = Vec::new();
    for (key, value) in values {
        if own.is_some_and(|o| key.starts_with(o)) {
            continue;
        }
        let lease = key.split_once('/').map_or("", |(l, _)| l);
        match serde_json::from_slice::<Value>(value) {
            // Whole entries, per bucket (replicas before the `b`/`t` split).
            Ok(Value::Array(list)) => entries.extend(list),
            Ok(Value::Object(mut o)) if o.contains_key("states") => {
                if let Some(Value::Object(s)) = o.remove("states") {
                    states.entry(lease).or_default().extend(s);
                }
            }
            Ok(Value::Object(mut o)) if o.contains_key("proxies") => {
                let replica = o.remove("replica").unwrap_or(Value::Null);
                if let Some(Value::Array(list)) = o.remove("proxies") {
                    for mut p in list {
                        p["replica"] = replica.clone();
                        fixed.push((lease, p));
                    }
                }
            }
            // One whole entry per key (replicas before buckets).
            Ok(entry @ Value::Object(_)) => entries.push(entry),
            _ => tracing::warn!(key, "etcd: not a proxy state; ignored"),
        }
    }
    for (lease, mut p) in fixed {
        let id = p["id"].as_str().unwrap_or_default().to_string();
        let mut types = states.get(lease).and_then(|s| s.get(&id)).cloned().unwrap_or(Value::Null);
        if let Some(types) = types.as_object_mut() {
            for v in types.values_mut() {
                if let Some(o) = v.as_object_mut() {
                    let acked = o.get("acked").cloned().unwrap_or(Value::Null);
                    o.entry("current").or_insert(acked);
                    o.entry("nack").or_insert(Value::Null);
                }
            }
        }
        p["types"] = types;
        entries.push(p);
    }
    entries
}

/// The bucket (key) a proxy's entry is published in: a stable hash of its node id
/// (FNV-1a), so a proxy stays in its bucket as others come and go.
fn bucket(id: &str) -> u8 {
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    hash.to_le_bytes().iter().fold(0, |a, b| a ^ b)
}

/// Brings this replica's keys in line with `desired`, in transactions of [`TXN_OPS`];
/// false when a write failed (retried at the next change or tick).
async fn sync(
    etcd: &Etcd,
    desired: BTreeMap<String, Vec<u8>>,
    lease: i64,
    written: &mut BTreeMap<String, Vec<u8>>,
) -> bool {
    let mut ops: Vec<(String, Option<Vec<u8>>)> = desired
        .iter()
        .filter(|(k, v)| written.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), Some(v.clone())))
        .collect();
    ops.extend(written.keys().filter(|k| !desired.contains_key(*k)).map(|k| (k.clone(), None)));
    let mut client = etcd.client();
    let mut ok = true;
    for batch in ops.chunks(TXN_OPS) {
        let txn_ops: Vec<TxnOp> = batch
            .iter()
            .map(|(k, v)| {
                let key = etcd.key(&format!("{PREFIX}{k}"));
                match v {
                    Some(v) => TxnOp::put(key, v.clone(), Some(PutOptions::new().with_lease(lease))),
                    None => TxnOp::delete(key, None),
                }
            })
            .collect();
        match client.txn(Txn::new().and_then(txn_ops)).await {
            Ok(_) => {
                for (k, v) in batch {
                    match v {
                        Some(v) => written.insert(k.clone(), v.clone()),
                        None => written.remove(k),
                    };
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "etcd: proxy states not written; retrying");
                ok = false;
            }
        }
    }
    ok
}

/// Turns the published ACK times of `entry` back into ages (`config_age_seconds`), as a
/// replica's own entries show them.
fn ages_from_ack_times(entry: &mut Value, now: SystemTime) {
    let now = unix_seconds(now).unwrap_or(0.0);
    if let Some(types) = entry["types"].as_object_mut() {
        for v in types.values_mut() {
            if let Some(o) = v.as_object_mut() {
                let age = o.remove("acked_at").and_then(|a| a.as_f64()).map(|t| (now - t).max(0.0));
                o.insert("config_age_seconds".into(), json!(age));
            }
        }
    }
}

fn since(entry: &Value) -> u64 {
    entry["connected_since"].as_u64().unwrap_or(0)
}

fn unix_seconds(t: SystemTime) -> Option<f64> {
    t.duration_since(SystemTime::UNIX_EPOCH).ok().map(|d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, route_acked: Option<&str>, route_current: Option<&str>) -> Value {
        json!({
            "id": id, "kind": "sidecar", "name": id, "namespace": "default", "labels": {"app": "a"},
            "identity": "spiffe://cluster.local/ns/default/sa/default", "inbound": null, "outbound": null,
            "admin": null, "metrics": null, "peer": "127.0.0.1:1", "mode": "Sotw", "connected_since": 7,
            "types": {
                "Cluster": {"status": "SYNCED", "acked": "c1", "current": "c1", "config_age_seconds": 1.0, "nack": null},
                "RouteConfiguration": {"status": "NACKED", "acked": route_acked, "current": route_current,
                                       "config_age_seconds": null, "nack": "bad route"},
            },
        })
    }

    #[test]
    fn published_buckets_read_back_as_the_entries_a_replica_lists() {
        let replica = json!({"xds": "127.0.0.1:2", "api": "127.0.0.1:3", "pid": 1});
        let listed =
            vec![entry("a", Some("r1"), Some("r2")), entry("b", None, None), entry("c", Some("r1"), Some("r1"))];
        let acks: BTreeMap<String, BTreeMap<String, f64>> =
            [("a".to_string(), [("Cluster".to_string(), 100.5)].into())].into();
        let values = bucket_values(&replica, 0x2a, json!({ "proxies": listed }), &acks);
        assert!(values.keys().all(|k| k.starts_with("2a/b") || k.starts_with("2a/t")), "{values:?}");
        let mut back = published_entries(&values, None);
        back.sort_by(|x, y| x["id"].as_str().cmp(&y["id"].as_str()));
        assert_eq!(back.len(), 3);
        for (got, want) in back.iter().zip(&listed) {
            // What a replica lists, with the replica and ACK times instead of ages.
            let mut want = want.clone();
            want["replica"] = replica.clone();
            let id = want["id"].as_str().unwrap_or_default().to_string();
            for (t, v) in want["types"].as_object_mut().into_iter().flatten() {
                if let Some(o) = v.as_object_mut() {
                    o.remove("config_age_seconds");
                    o.insert("acked_at".into(), json!(acks.get(&id).and_then(|a| a.get(t))));
                }
            }
            assert_eq!(got, &want);
        }
        // This replica's own keys are skipped.
        assert!(published_entries(&values, Some("2a/")).is_empty());
    }

    #[test]
    fn entries_of_earlier_replicas_are_still_read() {
        let mut whole = entry("old", Some("r1"), Some("r1"));
        whole["replica"] = json!({"xds": "x"});
        let values: BTreeMap<String, Vec<u8>> = [
            ("1/b00".to_string(), serde_json::to_vec(&json!([whole.clone()])).unwrap_or_default()),
            ("2/sim".to_string(), serde_json::to_vec(&whole).unwrap_or_default()),
        ]
        .into();
        assert_eq!(published_entries(&values, None), vec![whole.clone(), whole]);
    }
}
