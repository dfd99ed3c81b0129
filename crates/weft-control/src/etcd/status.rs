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
//! [`PUBLISH_MAX_DELAY`] after the first), and only for keys that changed. A `t` value
//! is serialised straight from the streams' statuses, judged against the version each
//! stream recorded as current (`TypeStatus::current_version`: no translation look-up per
//! proxy), and only for buckets whose statuses moved since the last round. The lease is
//! kept alive by a task of its own, so a long settle or a slow write never lets it lapse
//! (which would drop every key and write them all again under a new lease). A replica
//! that dies takes its keys with its lease (the lease TTL later); a proxy that moved
//! meanwhile is listed once, from the replica it connected to last.
//!
//! [`ProxyBoard::merge`] adds to a replica's own list the proxies the others published
//! (in this form, or as earlier replicas wrote them: one key per proxy, or a bucket
//! holding a list of whole entries).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use etcd_client::{PutOptions, Txn, TxnOp};
use serde::Serialize;
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
        let mut written: BTreeMap<String, Bytes> = BTreeMap::new();
        let mut fixed = FixedCache::default();
        let mut synced = SyncedCache::default();
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
                let desired = entries(&board, &api, id, &mut fixed, &mut synced);
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
    values: BTreeMap<String, Bytes>,
}

/// The `t` value last built per bucket, with the fingerprint of the connection
/// statuses it was built from: a bucket none of whose proxies sent, ACKed or NACKed
/// anything since (and none came or went) is not serialised again.
#[derive(Default)]
struct SyncedCache {
    /// The lease they were built under.
    lease: Option<i64>,
    buckets: BTreeMap<u8, CachedBucket>,
}

/// One bucket's `t` value as last built.
struct CachedBucket {
    /// [`Fingerprint`] of its connections then.
    fingerprint: u64,
    /// False when a proxy's states came from its translation, which may move without
    /// its status moving: such a bucket is built every round.
    reusable: bool,
    value: Bytes,
}

/// One proxy's sync states, JSON, while a bucket is built: done under the server's
/// lock, or the statuses and node of a proxy whose states need its translation.
enum Pending {
    Done(Vec<u8>),
    Translate(BTreeMap<String, weft_xds::TypeStatus>, Arc<weft_xds::Node>),
}

/// This replica's proxies as published: key -> JSON value (per bucket, its `b` key with
/// what each proxy's connection fixes and its `t` key with their sync states).
fn entries(
    board: &ProxyBoard,
    api: &Api,
    lease: i64,
    fixed: &mut FixedCache,
    synced: &mut SyncedCache,
) -> BTreeMap<String, Bytes> {
    // The membership version before the copy: a proxy arriving in between makes the
    // next round build the `b` values again.
    let membership = *api.server.membership_changes().borrow();
    if fixed.at != Some((lease, membership)) {
        let entries: Vec<Value> = api.server.connections().iter().map(crate::api::proxy_entry).collect();
        fixed.values = fixed_values(&board.replica, lease, entries);
        fixed.at = Some((lease, membership));
    }
    if synced.lease != Some(lease) {
        *synced = SyncedCache { lease: Some(lease), buckets: BTreeMap::new() };
    }
    refresh_synced(api, synced);
    let mut out = fixed.values.clone();
    for (b, cached) in &synced.buckets {
        out.insert(format!("{lease:x}/t{b:02x}"), cached.value.clone());
    }
    out
}

/// Brings `synced` in line with the server's connections: buckets that lost every
/// proxy dropped, buckets whose statuses moved built again. Two passes under the
/// server's lock, the first only hashing ids and revisions, the second serialising the
/// moved buckets' states in place (no copy of the statuses); translations are asked
/// after it, for the proxies that need them.
fn refresh_synced(api: &Api, synced: &mut SyncedCache) {
    let mut fingerprints: BTreeMap<u8, Fingerprint> = BTreeMap::new();
    api.server.for_each_connection(|c| fingerprints.entry(bucket(&c.node_id)).or_default().add(c));
    synced.buckets.retain(|b, _| fingerprints.contains_key(b));
    let moved: BTreeSet<u8> = fingerprints
        .iter()
        .filter(|(b, f)| synced.buckets.get(b).is_none_or(|c| !c.reusable || c.fingerprint != f.0))
        .map(|(b, _)| *b)
        .collect();
    if moved.is_empty() {
        return;
    }
    let mut building: BTreeMap<u8, (Fingerprint, Vec<(String, Pending)>)> = BTreeMap::new();
    api.server.for_each_connection(|c| {
        let b = bucket(&c.node_id);
        if !moved.contains(&b) {
            return;
        }
        let (fingerprint, proxies) = building.entry(b).or_default();
        fingerprint.add(c);
        let pending = if recorded_every_type(c) {
            Pending::Done(states_json(&c.types, None))
        } else {
            Pending::Translate(c.types.clone(), c.raw_node.clone())
        };
        proxies.push((c.node_id.clone(), pending));
    });
    for (b, (fingerprint, proxies)) in building {
        let mut reusable = true;
        // Per node id the last connection's (as a map of them would keep).
        let mut states: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (id, pending) in proxies {
            let json = match pending {
                Pending::Done(json) => json,
                Pending::Translate(types, node) => {
                    reusable = false;
                    states_json(&types, Some(&api.source.proxy_resources(&node)))
                }
            };
            states.insert(id, json);
        }
        synced.buckets.insert(b, CachedBucket { fingerprint: fingerprint.0, reusable, value: assemble(states) });
    }
}

/// A bucket's connections as of one pass: their ids and status revisions, hashed in the
/// server's order (FNV-1a).
struct Fingerprint(u64);

impl Default for Fingerprint {
    fn default() -> Self {
        Fingerprint(0xcbf2_9ce4_8422_2325)
    }
}

impl Fingerprint {
    fn add(&mut self, c: &weft_xds::ConnectionStatus) {
        for word in [c.id, c.revision] {
            for byte in word.to_le_bytes() {
                self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
}

/// Whether `c`'s stream recorded what it should run of every listed type (else its
/// sync states are judged against its translation, as the API does).
fn recorded_every_type(c: &weft_xds::ConnectionStatus) -> bool {
    crate::api::LISTED_TYPES.iter().all(|t| c.types.get(*t).is_some_and(|s| s.current_version.is_some()))
}

/// One proxy's sync states as published (short type name -> state), JSON: per listed
/// type against what its stream recorded it should run, or what `translation` holds.
fn states_json(types: &BTreeMap<String, weft_xds::TypeStatus>, translation: Option<&TypeMap>) -> Vec<u8> {
    let mut proxy: BTreeMap<&str, PublishedState<'_>> = BTreeMap::new();
    for t in crate::api::LISTED_TYPES {
        let st = types.get(t);
        let want = match translation {
            Some(tr) => tr.get(t).map(|(v, _)| v.as_str()),
            None => st.and_then(|s| s.current_version.as_deref()),
        };
        proxy.insert(weft_xds::type_url::short(t), PublishedState::of(st, want));
    }
    serde_json::to_vec(&proxy).unwrap_or_default()
}

/// A `t` value from its proxies' states (node id -> [`states_json`]), in node id order:
/// the bytes serde_json writes for `{"states": {id: states, ...}}`.
fn assemble(states: BTreeMap<String, Vec<u8>>) -> Bytes {
    let mut out = Vec::with_capacity(16 + states.iter().map(|(id, s)| id.len() + s.len() + 4).sum::<usize>());
    out.extend_from_slice(br#"{"states":{"#);
    for (i, (id, json)) in states.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // A string always serialises.
        let _ = serde_json::to_writer(&mut out, id);
        out.push(b':');
        out.extend_from_slice(json);
    }
    out.extend_from_slice(b"}}");
    Bytes::from(out)
}

/// One bucket's `t` value from its proxies (tests; the publisher builds the same in
/// [`refresh_synced`]).
#[cfg(test)]
fn synced_value(connections: &[SyncInput]) -> Bytes {
    assemble(connections.iter().map(|c| (c.node_id.clone(), states_json(&c.types, c.translation.as_deref()))).collect())
}

/// One proxy as its `t` entry is built (tests): its node id, per-type statuses and,
/// when its stream did not record what it should run of every listed type, its
/// translation.
#[cfg(test)]
struct SyncInput {
    node_id: String,
    types: BTreeMap<String, weft_xds::TypeStatus>,
    translation: Option<Arc<TypeMap>>,
}

/// The translation of one proxy, by type URL: (version, resources by name).
type TypeMap = BTreeMap<String, (String, BTreeMap<String, weft_xds::Any>)>;

/// One proxy's state of one type as published: the time of its ACK instead of its age
/// (so an unchanged proxy is not rewritten), `current` only where it differs from
/// `acked`, no `nack` unless there is one. Fields in the order serde_json sorts an
/// object's keys, so the bytes are those of the `Value` form earlier replicas wrote.
#[derive(Serialize)]
struct PublishedState<'a> {
    acked: Option<&'a str>,
    acked_at: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    current: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nack: Option<&'a str>,
    status: &'static str,
}

impl<'a> PublishedState<'a> {
    fn of(st: Option<&'a weft_xds::TypeStatus>, want: Option<&'a str>) -> Self {
        let (status, nack) = crate::api::sync_status(st, want);
        let acked = st.and_then(|s| s.acked_version.as_deref());
        PublishedState {
            acked,
            acked_at: st.and_then(|s| s.acked_at).and_then(unix_seconds),
            current: (want != acked).then_some(want),
            nack: nack.map(|n| n.error.as_str()),
            status,
        }
    }
}

/// `listed` (entries as `GET /api/v1/proxies` lists them, without their types) as this
/// replica's `b` keys under `lease`.
fn fixed_values(replica: &Value, lease: i64, listed: Vec<Value>) -> BTreeMap<String, Bytes> {
    let mut buckets: BTreeMap<u8, Vec<Value>> = BTreeMap::new();
    for p in listed {
        let Some(id) = p["id"].as_str() else { continue };
        buckets.entry(bucket(id)).or_default().push(p);
    }
    let mut out = BTreeMap::new();
    for (b, fixed) in buckets {
        if let Ok(p) = serde_json::to_vec(&json!({"replica": replica, "proxies": fixed})) {
            out.insert(format!("{lease:x}/b{b:02x}"), Bytes::from(p));
        }
    }
    out
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
    desired: BTreeMap<String, Bytes>,
    lease: i64,
    written: &mut BTreeMap<String, Bytes>,
) -> bool {
    let gone: Vec<(String, Option<Bytes>)> =
        written.keys().filter(|k| !desired.contains_key(*k)).map(|k| (k.clone(), None)).collect();
    let mut ops: Vec<(String, Option<Bytes>)> =
        desired.into_iter().filter(|(k, v)| written.get(k) != Some(v)).map(|(k, v)| (k, Some(v))).collect();
    ops.extend(gone);
    let mut client = etcd.client();
    let mut ok = true;
    for batch in ops.chunks(TXN_OPS) {
        let txn_ops: Vec<TxnOp> = batch
            .iter()
            .map(|(k, v)| {
                let key = etcd.key(&format!("{PREFIX}{k}"));
                match v {
                    Some(v) => TxnOp::put(key, v.to_vec(), Some(PutOptions::new().with_lease(lease))),
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
mod tests;
