//! Configuration resources in etcd: `resources/<kind>/<namespace>/<name>` holds the
//! YAML/JSON document a resource was applied as, with its source name and first line, so
//! every replica parses it with the same code (and the same file/line in errors) and
//! holds the same typed resource.
//!
//! An apply is validated by the replica that takes it, exactly as with the directory
//! store: a bad resource is rejected alone with its file, line and field, and only the
//! good ones are written. Every replica, the writer included, puts them in force through
//! its watch, in etcd's order; the writer answers once its watch has reached the write
//! (read-your-writes), so `weft apply` then `weft get` agree.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use etcd_client::{Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use weft_api::{ApiError, Resource, ResourceKey};

use super::Etcd;
use crate::store::{ChangeResult, ResourceStore};

/// Key prefix of the resources (under the store's prefix).
const PREFIX: &str = "resources/";
/// etcd refuses transactions of more than 128 operations by default.
const TXN_OPS: usize = 100;

/// Writes API changes to etcd. Held by the [`ResourceStore`] it serves.
#[derive(Clone)]
pub struct SharedResources {
    etcd: Etcd,
    /// The store revision this replica's resources reflect (its watch's progress).
    seen: tokio::sync::watch::Receiver<i64>,
}

impl std::fmt::Debug for SharedResources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedResources").finish_non_exhaustive()
    }
}

/// What one key holds.
#[derive(Serialize, Deserialize)]
struct Stored {
    /// Where the resource was read (`weft apply`'s file name, `api`, ...).
    source: PathBuf,
    /// Line of `text`'s first line in that source.
    line: usize,
    /// The YAML/JSON document that holds the resource.
    text: String,
}

impl SharedResources {
    /// Loads the resources in etcd into `store`, makes `store`'s API changes go through
    /// etcd, and starts following etcd (the returned task).
    pub async fn start(etcd: Etcd, store: &Arc<ResourceStore>) -> Result<JoinHandle<()>, String> {
        let read = etcd.read_prefix(PREFIX).await.map_err(|e| format!("etcd: cannot read resources: {e}"))?;
        let mut cache = Cache::default();
        store.set_applied(cache.resources(&read.values));
        let (seen_tx, seen) = tokio::sync::watch::channel(read.revision);
        store.share(SharedResources { etcd: etcd.clone(), seen });
        let weak = Arc::downgrade(store);
        Ok(tokio::spawn(etcd.mirror(PREFIX, read.values, read.revision, move |values, revision| {
            if let Some(store) = weak.upgrade() {
                store.set_applied(cache.resources(values));
            }
            seen_tx.send_replace(revision);
        })))
    }

    /// Validates `text`, writes the good resources to etcd and puts them in force in
    /// `store`. When etcd cannot be written nothing is accepted and the error says so.
    pub(crate) async fn apply(&self, store: &ResourceStore, text: &str, source: &Path) -> ChangeResult {
        let mut parsed = weft_api::parse_str(text, source);
        let docs = documents(text);
        let mut ops = Vec::new();
        for r in &parsed.resources {
            let (line, doc) = docs
                .iter()
                .rev()
                .find(|(first, _)| *first <= r.source.line.max(1))
                .map(|(first, doc)| (*first, doc.as_str()))
                .unwrap_or((1, text));
            let stored = Stored { source: source.to_path_buf(), line, text: doc.to_string() };
            match serde_json::to_vec(&stored) {
                Ok(value) => ops.push(TxnOp::put(self.etcd.key(&format!("{PREFIX}{}", key_of(&r.key()))), value, None)),
                Err(e) => return refused(store, parsed.errors, source, &format!("cannot encode: {e}")),
            }
        }
        let revision = match self.write(ops).await {
            Ok(r) => r,
            Err(e) => return refused(store, std::mem::take(&mut parsed.errors), source, &e),
        };
        let accepted: Vec<ResourceKey> = parsed.resources.iter().map(Resource::key).collect();
        if !self.caught_up(revision).await {
            // The watch is behind (etcd slow to deliver): in force here now anyway.
            store.apply_parsed(parsed.resources);
        }
        ChangeResult { accepted, errors: parsed.errors, version: store.snapshot_version() }
    }

    /// Deletes the resources `text` names from etcd and from `store`.
    pub(crate) async fn delete(&self, store: &ResourceStore, text: &str, source: &Path) -> ChangeResult {
        let parsed = weft_api::parse_str(text, source);
        let keys: Vec<ResourceKey> = parsed.resources.iter().map(Resource::key).collect();
        let ops: Vec<TxnOp> = keys
            .iter()
            .filter(|k| store.is_applied(k))
            .map(|k| TxnOp::delete(self.etcd.key(&format!("{PREFIX}{}", key_of(k))), None))
            .collect();
        let revision = match self.write(ops).await {
            Ok(r) => r,
            Err(e) => return refused(store, parsed.errors, source, &e),
        };
        self.caught_up(revision).await;
        // File copies are hidden here (files are this replica's own); API copies are gone
        // through the watch already (or now, if it lags).
        let accepted = store.delete_keys(&keys);
        ChangeResult { accepted, errors: parsed.errors, version: store.snapshot_version() }
    }

    /// Writes `ops` (in transactions of at most [`TXN_OPS`]); the revision of the last.
    async fn write(&self, ops: Vec<TxnOp>) -> Result<i64, String> {
        let mut revision = 0;
        let mut ops = ops.into_iter().peekable();
        while ops.peek().is_some() {
            let chunk: Vec<TxnOp> = ops.by_ref().take(TXN_OPS).collect();
            let r = super::txn_retried(&self.etcd, Txn::new().and_then(chunk))
                .await
                .map_err(|e| format!("etcd: not stored: {e}"))?;
            revision = r.header().map_or(revision, |h| h.revision());
        }
        Ok(revision)
    }

    /// Waits (at most 5 s) until this replica's watch reflects `revision`; whether it did.
    async fn caught_up(&self, revision: i64) -> bool {
        let mut seen = self.seen.clone();
        let reached = tokio::time::timeout(std::time::Duration::from_secs(5), seen.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok());
        reached
    }
}

/// Parsed documents by etcd key, re-parsed only when a value changes.
#[derive(Default)]
struct Cache {
    entries: BTreeMap<String, (Vec<u8>, Option<Resource>)>,
}

impl Cache {
    /// The resources `values` (etcd keys under [`PREFIX`] -> [`Stored`]) hold.
    fn resources(&mut self, values: &BTreeMap<String, Vec<u8>>) -> BTreeMap<ResourceKey, Resource> {
        self.entries.retain(|k, _| values.contains_key(k));
        let mut out = BTreeMap::new();
        for (key, value) in values {
            let fresh = self.entries.get(key).is_some_and(|(v, _)| v == value);
            if !fresh {
                let resource = decode(key, value);
                self.entries.insert(key.clone(), (value.clone(), resource));
            }
            if let Some((_, Some(r))) = self.entries.get(key) {
                out.insert(r.key(), r.clone());
            }
        }
        out
    }
}

/// The resource stored under `key`; None (logged) when the value is not one.
fn decode(key: &str, value: &[u8]) -> Option<Resource> {
    let stored: Stored = match serde_json::from_slice(value) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(key, error = %e, "etcd: not a stored resource; ignored");
            return None;
        }
    };
    // Lines before the document keep the resource's line numbers as they were applied.
    let text = format!("{}{}", "\n".repeat(stored.line.saturating_sub(1)), stored.text);
    let parsed = weft_api::parse_str(&text, &stored.source);
    let found = parsed.resources.into_iter().find(|r| key_of(&r.key()) == key);
    if found.is_none() {
        tracing::warn!(key, errors = ?parsed.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
                       "etcd: stored document does not hold this resource; ignored");
    }
    found
}

/// The key of a resource, relative to [`PREFIX`] (by [`weft_api::Kind::id`]: Istio's and
/// the Gateway API's Gateways of one name do not share a key).
fn key_of(k: &ResourceKey) -> String {
    format!("{}/{}/{}", k.kind.id(), k.namespace, k.name)
}

/// The YAML documents of `text` as (first line, text): split at `---` lines (JSON and a
/// single document give one).
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = vec![(1, String::new())];
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("---") {
            docs.push((i + 2, String::new()));
            continue;
        }
        if let Some((_, doc)) = docs.last_mut() {
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs
}

/// The outcome when the shared store refused a write: nothing accepted, the reason as
/// one more error.
fn refused(store: &ResourceStore, mut errors: Vec<ApiError>, source: &Path, why: &str) -> ChangeResult {
    errors.push(ApiError {
        file: source.to_path_buf(),
        line: 0,
        column: 0,
        resource: None,
        field: String::new(),
        message: format!("{why}; nothing was applied"),
        hint: Some("check that the etcd cluster has a quorum, then apply again".into()),
    });
    ChangeResult { accepted: Vec::new(), errors, version: store.snapshot_version() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_keep_their_first_line_and_round_trip_to_the_same_resource() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  selector: {app: a}\n  ports: [{name: http, port: 80}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec:\n  selector: {app: b}\n  ports: [{name: http, port: 80}]\n";
        let docs = documents(text);
        assert_eq!(docs.iter().map(|d| d.0).collect::<Vec<_>>(), [1, 8]);
        let parsed = weft_api::parse_str(text, Path::new("f.yaml"));
        let b = parsed.resources.iter().find(|r| r.meta.name == "b").unwrap();
        let stored = Stored { source: "f.yaml".into(), line: 8, text: docs[1].1.clone() };
        let key = key_of(&b.key());
        let back = decode(&key, &serde_json::to_vec(&stored).unwrap()).unwrap();
        assert_eq!(&back, b);
        assert_eq!(back.source.line, b.source.line);
    }
}
