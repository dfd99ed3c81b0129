//! The workload registry in etcd: `registry/<node id>` holds the workload a proxy
//! announced, written by the replica it is connected to under that replica's lease.
//!
//! - [`publish`]: this replica's own registrations ([`WorkloadSource::Proxy`]) go to etcd
//!   under a lease it keeps alive; a proxy that leaves is deleted only while the key is
//!   still under this replica's lease (it may have reconnected elsewhere meanwhile). When
//!   the replica dies the lease expires and its registrations vanish, except those of
//!   proxies that reconnected to another replica, which rewrote them under its own lease.
//! - [`follow`]: every replica mirrors the whole prefix into its registry as
//!   [`WorkloadSource::Replica`] workloads, so all see every workload and translate the
//!   same configuration.
//! - [`save`]: the leader also keeps every registration under `saved/<node id>` without
//!   a lease. When every replica was down longer than the lease TTL, the live
//!   registrations are gone; a replica starting then restores the saved ones as
//!   [`WorkloadSource::Restored`] workloads that stay endpoints for the reconnect grace
//!   while their proxies come back, as a restarted single control plane does from its
//!   `registry.json`, so the first proxy back is never pushed endpoint lists without
//!   its peers.

use std::collections::BTreeMap;
use std::sync::Arc;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{retry_delay, Etcd, KeptLease};
use crate::registry::{decode_workload, encode_workload, Registry, Workload, WorkloadSource};

/// Key prefix of the registrations (under the store's prefix).
const PREFIX: &str = "registry/";
/// Key prefix of the leader's lease-less copy of every registration.
const SAVED: &str = "saved/";
/// Registrations written per etcd transaction (etcd's default limit is 128 operations).
const PUTS_PER_TXN: usize = 100;
/// Coalesces bursts of registrations (a fleet reconnecting) into one pass.
const DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(200);

/// Restores saved registrations whose live ones are gone, then starts the tasks:
/// publishing this replica's registrations, following everyone's, and (while `leader`)
/// saving them all. Call it before the registry follows the xDS server, so the restored
/// workloads get their reconnect grace.
pub async fn start(
    etcd: Etcd,
    registry: &Registry,
    leader: watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<()>>, String> {
    let read = etcd.read_prefix(PREFIX).await.map_err(|e| format!("etcd: cannot read the registry: {e}"))?;
    let saved = etcd.read_prefix(SAVED).await.map_err(|e| format!("etcd: cannot read the registry: {e}"))?;
    let live = decode_all(&read.values);
    let restored: Vec<Workload> =
        decode_all(&saved.values).iter().filter(|(id, _)| !live.contains_key(*id)).map(|(_, w)| w.clone()).collect();
    if !restored.is_empty() {
        tracing::info!(workloads = restored.len(), "registrations restored from etcd; awaiting their proxies");
        registry.restore_workloads(restored);
    }
    let remote = Arc::new(watch::channel(live).0);
    registry.reconcile_replicated(&remote.borrow());
    let sender = remote.clone();
    let mirror = tokio::spawn(etcd.clone().mirror(PREFIX, read.values, read.revision, move |values, _| {
        sender.send_replace(decode_all(values));
    }));
    let follow = tokio::spawn(follow(registry.clone(), remote.subscribe()));
    let publish = tokio::spawn(publish(etcd.clone(), registry.clone()));
    let save = tokio::spawn(save(etcd, registry.clone(), leader));
    Ok(vec![mirror, follow, publish, save])
}

/// While this replica leads: every registration (live here, through another replica, or
/// restored) under `saved/`, without a lease.
async fn save(etcd: Etcd, registry: Registry, mut leader: watch::Receiver<bool>) {
    loop {
        if leader.wait_for(|l| *l).await.is_err() {
            return;
        }
        let mut written = BTreeMap::new();
        let mut changes = registry.changes();
        changes.mark_changed();
        let mut retry = tokio::time::interval(std::time::Duration::from_secs(1));
        let mut dirty = false;
        loop {
            tokio::select! {
                r = leader.changed() => {
                    if r.is_err() || !*leader.borrow() {
                        break;
                    }
                }
                r = changes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    tokio::time::sleep(DEBOUNCE).await;
                    dirty = true;
                }
                _ = retry.tick() => {}
            }
            if dirty {
                changes.borrow_and_update();
                let desired = encoded(&registry, |s| {
                    matches!(s, WorkloadSource::Proxy | WorkloadSource::Replica | WorkloadSource::Restored)
                });
                dirty = !sync(&etcd, SAVED, desired, None, &mut written).await;
            }
        }
    }
}

/// The registry's workloads whose source `keep` accepts, encoded, by id.
fn encoded(registry: &Registry, keep: impl Fn(&WorkloadSource) -> bool) -> BTreeMap<String, Vec<u8>> {
    let snap = registry.snapshot();
    let mut desired = BTreeMap::new();
    for w in snap.workloads().filter(|w| keep(&w.source)) {
        match encode_workload(w) {
            Ok(v) => {
                desired.insert(w.id.clone(), v);
            }
            Err(e) => tracing::warn!(error = %e, "registration not shared"),
        }
    }
    desired
}

/// Keeps the registry's [`WorkloadSource::Replica`] workloads those in etcd, on every
/// etcd change and every local one (a proxy that left here may be registered elsewhere).
async fn follow(registry: Registry, mut remote: watch::Receiver<Arc<BTreeMap<String, Workload>>>) {
    let mut local = registry.changes();
    loop {
        let current = remote.borrow_and_update().clone();
        registry.reconcile_replicated(&current);
        local.borrow_and_update();
        tokio::select! {
            r = remote.changed() => if r.is_err() { return },
            r = local.changed() => if r.is_err() { return },
        }
    }
}

/// Writes this replica's registrations to etcd under its lease, for as long as it runs.
async fn publish(etcd: Etcd, registry: Registry) {
    let mut failures = 0u32;
    loop {
        if failures > 0 {
            tokio::time::sleep(retry_delay(failures)).await;
        }
        let lease = match KeptLease::grant(&etcd).await {
            Ok(l) => l,
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, "etcd: cannot take a lease for registrations; retrying");
                continue;
            }
        };
        failures = 0;
        let id = lease.id();
        let period = lease.period();
        tracing::info!(lease = format!("{id:x}"), "registrations under a new etcd lease");
        // Kept alive apart from the writes: a fleet connecting is thousands of them, which
        // on a busy etcd take longer than the lease's TTL.
        let mut held = lease.keep_in_background();
        // What etcd holds from us under this lease, by node id.
        let mut written: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut changes = registry.changes();
        changes.mark_changed();
        // A failed write is retried at this period (or at the next change).
        let mut retry = tokio::time::interval(period);
        let mut dirty = false;
        loop {
            tokio::select! {
                () = held.lost() => {
                    tracing::warn!(lease = format!("{id:x}"), "etcd lease lost; registering again under a new one");
                    break;
                }
                _ = retry.tick(), if dirty => {}
                r = changes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    dirty = true;
                }
            }
            if dirty {
                changes.borrow_and_update();
                let desired = encoded(&registry, |s| *s == WorkloadSource::Proxy);
                dirty = !sync(&etcd, PREFIX, desired, Some(id), &mut written).await;
            }
        }
    }
}

/// Brings the keys under `prefix` in line with `desired`, under `lease` when given (and
/// then deleting only keys still under it); false when a write failed (retried later).
async fn sync(
    etcd: &Etcd,
    prefix: &str,
    desired: BTreeMap<String, Vec<u8>>,
    lease: Option<i64>,
    written: &mut BTreeMap<String, Vec<u8>>,
) -> bool {
    let mut client = etcd.client();
    let mut ok = true;
    let changed: Vec<(&String, &Vec<u8>)> = desired.iter().filter(|(id, v)| written.get(*id) != Some(*v)).collect();
    // Many registrations per transaction (a fleet connecting to a replica is thousands:
    // one raft round each took longer than the fleet took to connect).
    for batch in changed.chunks(PUTS_PER_TXN) {
        let puts: Vec<TxnOp> = batch
            .iter()
            .map(|(id, value)| {
                let options = lease.map(|l| PutOptions::new().with_lease(l));
                TxnOp::put(etcd.key(&format!("{prefix}{id}")), (*value).clone(), options)
            })
            .collect();
        match client.txn(Txn::new().and_then(puts)).await {
            Ok(_) => {
                for (id, value) in batch {
                    written.insert((*id).clone(), (*value).clone());
                }
            }
            Err(e) => {
                tracing::warn!(nodes = batch.len(), error = %e, "etcd: registrations not written; retrying");
                ok = false;
            }
        }
    }
    let gone: Vec<String> = written.keys().filter(|id| !desired.contains_key(*id)).cloned().collect();
    for id in gone {
        let key = etcd.key(&format!("{prefix}{id}"));
        let delete = TxnOp::delete(key.as_bytes(), None);
        // Under a lease, only while the key is still ours: the proxy may already be
        // registered through another replica.
        let txn = match lease {
            Some(l) => Txn::new().when([Compare::lease(key.as_bytes(), CompareOp::Equal, l)]).and_then([delete]),
            None => Txn::new().and_then([delete]),
        };
        match client.txn(txn).await {
            Ok(_) => {
                written.remove(&id);
            }
            Err(e) => {
                tracing::warn!(node = %id, error = %e, "etcd: registration not removed; retrying");
                ok = false;
            }
        }
    }
    ok
}

fn decode_all(values: &BTreeMap<String, Vec<u8>>) -> Arc<BTreeMap<String, Workload>> {
    let mut out = BTreeMap::new();
    for (id, value) in values {
        match decode_workload(value) {
            Ok(w) if &w.id == id => {
                out.insert(id.clone(), w);
            }
            Ok(w) => tracing::warn!(key = %id, id = %w.id, "etcd: registration under another node's key; ignored"),
            Err(e) => tracing::warn!(key = %id, error = %e, "etcd: not a registration; ignored"),
        }
    }
    Arc::new(out)
}
