//! The rollout controllers' state in etcd (`rollouts/state`), so a replica that becomes
//! leader resumes every rollout at the step the old leader reached, and every replica's
//! API shows the same status.
//!
//! [`EtcdRolloutState`] implements [`RolloutStateStore`] over a local copy: `save`
//! replaces the copy at once and hands the document to a writer task (the latest one
//! wins when writes pile up); a watch keeps the copy in line with what other replicas
//! write and counts those changes in [`RolloutStateStore::generation`], on which the
//! controller reloads. Each value carries the id of the replica that wrote it, so a
//! replica's own writes coming back through the watch are not taken for news (they may
//! be older than its copy). Two replicas writing at once: the last write wins (commands
//! given through a follower are rare; the leader's next pass reloads them).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Etcd;
use crate::rollout::RolloutStateStore;

/// Key prefix (under the store's prefix) and the one key.
const PREFIX: &str = "rollouts/";
const KEY: &str = "state";

/// The shared rollout state of one replica.
pub struct EtcdRolloutState {
    /// This replica's writer id.
    me: String,
    /// The latest document (this replica's or another's).
    copy: Mutex<Option<Vec<u8>>>,
    /// Changes made by other replicas, seen so far.
    generation: AtomicU64,
    /// Documents to write (the writer task takes the latest).
    pending: watch::Sender<Option<Vec<u8>>>,
}

impl EtcdRolloutState {
    /// Reads the current state and starts the watch and the writer; the tasks run until
    /// aborted.
    pub async fn start(etcd: Etcd) -> Result<(Arc<EtcdRolloutState>, Vec<JoinHandle<()>>), String> {
        EtcdRolloutState::start_at(etcd, PREFIX).await
    }

    /// The same for another document under `prefix` (e.g. `slo/`: what the SLO
    /// alerts' webhooks were told).
    pub async fn start_at(
        etcd: Etcd,
        prefix: &'static str,
    ) -> Result<(Arc<EtcdRolloutState>, Vec<JoinHandle<()>>), String> {
        let read = etcd.read_prefix(prefix).await.map_err(|e| format!("etcd: cannot read {prefix}{KEY}: {e}"))?;
        let me = format!("{:016x}", rand_id());
        let copy = read.values.get(KEY).and_then(|v| split(v)).map(|(_, doc)| doc.to_vec());
        let (pending, mut next) = watch::channel(None);
        let state = Arc::new(EtcdRolloutState { me, copy: Mutex::new(copy), generation: AtomicU64::new(0), pending });
        let watcher = state.clone();
        let mirror = tokio::spawn(etcd.clone().mirror(
            prefix,
            read.values,
            read.revision,
            move |values: &BTreeMap<String, Vec<u8>>, _| {
                let Some((writer, doc)) = values.get(KEY).and_then(|v| split(v)) else { return };
                if writer == watcher.me {
                    return;
                }
                let mut copy = watcher.copy.lock().unwrap_or_else(PoisonError::into_inner);
                if copy.as_deref() != Some(doc) {
                    *copy = Some(doc.to_vec());
                    watcher.generation.fetch_add(1, Ordering::SeqCst);
                }
            },
        ));
        let writer_id = state.me.clone();
        let key = etcd.key(&format!("{prefix}{KEY}"));
        let writer = tokio::spawn(async move {
            while next.changed().await.is_ok() {
                let Some(doc) = next.borrow_and_update().clone() else { continue };
                let mut value = format!("{writer_id}\n").into_bytes();
                value.extend_from_slice(&doc);
                let txn = etcd_client::Txn::new().and_then([etcd_client::TxnOp::put(key.as_bytes(), value, None)]);
                if let Err(e) = super::txn_retried(&etcd, txn).await {
                    tracing::warn!(error = %e, "{prefix}{KEY} not written to etcd");
                }
            }
        });
        Ok((state, vec![mirror, writer]))
    }
}

/// `<writer id>\n<document>`.
fn split(value: &[u8]) -> Option<(&str, &[u8])> {
    let nl = value.iter().position(|b| *b == b'\n')?;
    Some((std::str::from_utf8(&value[..nl]).ok()?, &value[nl + 1..]))
}

/// 64 random bits.
fn rand_id() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

impl RolloutStateStore for EtcdRolloutState {
    fn load(&self) -> Result<Option<Vec<u8>>, String> {
        Ok(self.copy.lock().unwrap_or_else(PoisonError::into_inner).clone())
    }

    fn save(&self, doc: &[u8]) -> Result<(), String> {
        *self.copy.lock().unwrap_or_else(PoisonError::into_inner) = Some(doc.to_vec());
        self.pending.send_replace(Some(doc.to_vec()));
        Ok(())
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_carry_their_writer() {
        assert_eq!(split(b"abc\n{\"x\":1}\n"), Some(("abc", &b"{\"x\":1}\n"[..])));
        assert_eq!(split(b"no newline"), None);
    }
}
