//! Proxy sync state across replicas (`weft proxy-status` through any replica).
//!
//! Each replica publishes, under a lease of its own, the proxies connected to it in (at
//! most) 256 keys: `proxies/<lease id>/b<bucket>` holds a JSON list of the entries of
//! the proxies whose node id hashes to that bucket (so a push to thousands of proxies is
//! a few hundred etcd writes per replica, not one per proxy), each entry as that replica's
//! `GET /api/v1/proxies` shows it (per type: SYNCED / STALE / NACKED / NOT SENT, the
//! versions ACKed and current), with the time of each ACK instead of its age and the
//! replica it is connected to (`replica`: xDS and API addresses). Writes follow the xDS
//! server's status changes once they settle (no change for [`PUBLISH_DELAY`], or
//! [`PUBLISH_MAX_DELAY`] after the first), and only for buckets that changed. A replica
//! that dies takes its keys with its lease (the lease TTL later); a proxy that moved
//! meanwhile is listed once, from the replica it connected to last.
//!
//! [`ProxyBoard::merge`] adds to a replica's own list the proxies the others published.

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
        for (key, value) in &values {
            if own.as_deref().is_some_and(|o| key.starts_with(o)) {
                continue;
            }
            let entries = match serde_json::from_slice::<Value>(value) {
                Ok(Value::Array(entries)) => entries,
                // One entry per key (as replicas before buckets wrote them).
                Ok(entry @ Value::Object(_)) => vec![entry],
                _ => {
                    tracing::warn!(key, "etcd: not a proxy state; ignored");
                    continue;
                }
            };
            for mut entry in entries {
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
        let mut lease = match KeptLease::grant(&board.etcd).await {
            Ok(l) => l,
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, "etcd: cannot take a lease for proxy states; retrying");
                continue;
            }
        };
        failures = 0;
        let id = lease.id();
        *board.lease.lock().unwrap_or_else(PoisonError::into_inner) = Some(id);
        let mut written: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut changes = api.server.status_changes();
        changes.mark_changed();
        let mut tick = tokio::time::interval(lease.period());
        let mut dirty = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if !lease.keep_alive().await {
                        tracing::warn!(lease = format!("{id:x}"), "etcd lease of proxy states lost; publishing under a new one");
                        break;
                    }
                }
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
                let desired = entries(&board, &api, id);
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

/// This replica's proxies as published: key -> JSON entry.
fn entries(board: &ProxyBoard, api: &Api, lease: i64) -> BTreeMap<String, Vec<u8>> {
    let acks: BTreeMap<String, BTreeMap<String, f64>> = api
        .server
        .connections()
        .into_iter()
        .map(|c| {
            let times = c
                .types
                .iter()
                .filter_map(|(t, s)| Some((weft_xds::type_url::short(t).to_string(), unix_seconds(s.acked_at?)?)))
                .collect();
            (c.node_id, times)
        })
        .collect();
    let listed = crate::api::proxies(api);
    let mut buckets: BTreeMap<u8, Vec<Value>> = BTreeMap::new();
    for mut p in listed["proxies"].as_array().cloned().unwrap_or_default() {
        let Some(id) = p["id"].as_str().map(str::to_string) else { continue };
        // The time of each ACK, not its age, so an unchanged proxy is not rewritten.
        if let Some(types) = p["types"].as_object_mut() {
            for (t, v) in types.iter_mut() {
                if let Some(o) = v.as_object_mut() {
                    o.remove("config_age_seconds");
                    o.insert("acked_at".into(), json!(acks.get(&id).and_then(|a| a.get(t))));
                }
            }
        }
        p["replica"] = board.replica.clone();
        buckets.entry(bucket(&id)).or_default().push(p);
    }
    buckets
        .into_iter()
        .filter_map(|(b, list)| Some((format!("{lease:x}/b{b:02x}"), serde_json::to_vec(&list).ok()?)))
        .collect()
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
