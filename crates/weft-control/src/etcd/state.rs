//! The control plane's own state in etcd, so every replica signs with the same CA and
//! honours the same revocations: the files of `--data-dir` (self-signed root and key, a
//! root rotation's next and previous roots, the join-token key, revoked tokens) under
//! `state/<file>`.
//!
//! The first replica to start creates the CA and token key as a single replica does,
//! then publishes them with a transaction that succeeds only if no other replica did so
//! first (otherwise it takes theirs). From then on each replica keeps its files and etcd
//! in line both ways: a file changed here (a revocation, a rotation step on the leader)
//! is written to etcd, a change in etcd is written here and the CA reloaded. Revocation
//! lists are merged, so revocations through two replicas at once are both kept. A
//! plug-in CA (`--plugin-ca`) is read from its files on every replica (mount the same
//! `cacerts` everywhere); only the token key and revocations are shared then.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use tokio::task::JoinHandle;
use weft_identity::service::CertificateAuthority;

use super::Etcd;
use crate::identity::IdentityConfig;

/// Key prefix of the state (under the store's prefix).
const PREFIX: &str = "state/";
/// The shared files of the data directory.
const FILES: &[&str] = &[
    "root-cert.pem",
    "root-key.pem",
    "next-root-cert.pem",
    "next-root-key.pem",
    "previous-roots.pem",
    "token-key",
    REVOKED,
];
/// The revocation list (merged rather than replaced).
const REVOKED: &str = "revoked-tokens.json";
/// How often the files are checked for changes made here.
const POLL: Duration = Duration::from_millis(500);

/// Starts identity from the shared state (creating and publishing it on first start) and
/// keeps both in line until the returned task is aborted.
pub async fn start(etcd: Etcd, ic: &IdentityConfig) -> Result<(Arc<CertificateAuthority>, JoinHandle<()>), String> {
    let dir = ic.data_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: cannot create: {e}", dir.display()))?;
    let read = etcd.read_prefix(PREFIX).await.map_err(|e| format!("etcd: cannot read the CA state: {e}"))?;
    let (authority, values, revision) = if !read.values.is_empty() {
        write_local(&dir, &read.values)?;
        (ic.start()?, read.values, read.revision)
    } else {
        let authority = ic.start()?;
        let local = read_local(&dir);
        let first = etcd.key(&format!("{PREFIX}token-key"));
        let puts: Vec<TxnOp> =
            local.iter().map(|(f, v)| TxnOp::put(etcd.key(&format!("{PREFIX}{f}")), v.clone(), None)).collect();
        let txn = Txn::new().when([Compare::create_revision(first.as_bytes(), CompareOp::Equal, 0)]).and_then(puts);
        let won =
            super::txn_retried(&etcd, txn).await.map_err(|e| format!("etcd: cannot publish the CA state: {e}"))?;
        let read = etcd.read_prefix(PREFIX).await.map_err(|e| format!("etcd: cannot read the CA state: {e}"))?;
        if won.succeeded() {
            tracing::info!(files = local.len(), "CA and token key published to etcd for the other replicas");
            (authority, read.values, read.revision)
        } else {
            // Another replica published first: sign with its CA.
            write_local(&dir, &read.values)?;
            (ic.start()?, read.values, read.revision)
        }
    };
    let synced = Arc::new(Mutex::new(read_local(&dir)));
    let task = tokio::spawn(keep_in_line(etcd, dir, authority.clone(), synced, values, revision));
    Ok((authority, task))
}

/// Both directions: etcd -> files (and CA reload), files -> etcd.
async fn keep_in_line(
    etcd: Etcd,
    dir: std::path::PathBuf,
    authority: Arc<CertificateAuthority>,
    synced: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    values: BTreeMap<String, Vec<u8>>,
    revision: i64,
) {
    let remote_dir = dir.clone();
    let remote_synced = synced.clone();
    let remote_authority = authority.clone();
    let mirror = tokio::spawn(etcd.clone().mirror(PREFIX, values, revision, move |values, _| {
        let mut synced = remote_synced.lock().unwrap_or_else(PoisonError::into_inner);
        let local = read_local(&remote_dir);
        let mut next = values.clone();
        // Unpushed revocations made here survive a remote update of the list.
        if let (Some(mine), Some(theirs)) = (local.get(REVOKED), values.get(REVOKED)) {
            next.insert(REVOKED.to_string(), merge_revocations(mine, theirs));
        }
        if next != local {
            if let Err(e) = write_local(&remote_dir, &next) {
                tracing::warn!(error = %e, "shared CA state not written to the data directory");
                return;
            }
            // etcd's values: a merged list that differs from them is pushed by the poll.
            *synced = values.clone();
            match remote_authority.ca().reload() {
                Ok(true) => tracing::info!("CA state changed by another replica; reloaded"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "CA state from etcd does not load; keeping the current one"),
            }
        } else {
            *synced = values.clone();
        }
    }));
    let _guard = AbortOnDrop(mirror);
    let mut client = etcd.client();
    loop {
        tokio::time::sleep(POLL).await;
        let local = read_local(&dir);
        let changed: Vec<(String, Option<Vec<u8>>)> = {
            let synced = synced.lock().unwrap_or_else(PoisonError::into_inner);
            FILES
                .iter()
                .filter(|f| local.get(**f) != synced.get(**f))
                .map(|f| (f.to_string(), local.get(*f).cloned()))
                .collect()
        };
        if changed.is_empty() {
            continue;
        }
        let ops: Vec<TxnOp> = changed
            .iter()
            .map(|(f, v)| match v {
                Some(v) => TxnOp::put(etcd.key(&format!("{PREFIX}{f}")), v.clone(), None),
                None => TxnOp::delete(etcd.key(&format!("{PREFIX}{f}")), None),
            })
            .collect();
        match client.txn(Txn::new().and_then(ops)).await {
            Ok(_) => {
                tracing::info!(files = ?changed.iter().map(|c| &c.0).collect::<Vec<_>>(), "CA state shared through etcd");
                let mut synced = synced.lock().unwrap_or_else(PoisonError::into_inner);
                for (f, v) in changed {
                    match v {
                        Some(v) => synced.insert(f, v),
                        None => synced.remove(&f),
                    };
                }
            }
            Err(e) => tracing::warn!(error = %e, "etcd: CA state not shared yet; retrying"),
        }
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The shared files present in `dir`.
fn read_local(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    FILES.iter().filter_map(|f| std::fs::read(dir.join(f)).ok().map(|v| (f.to_string(), v))).collect()
}

/// Makes the shared files of `dir` those of `values` (0600, written atomically), removing
/// those etcd does not hold.
fn write_local(dir: &Path, values: &BTreeMap<String, Vec<u8>>) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    for f in FILES {
        let path = dir.join(f);
        match values.get(*f) {
            Some(v) => {
                if std::fs::read(&path).ok().as_ref() == Some(v) {
                    continue;
                }
                let tmp = dir.join(format!(".{f}.tmp"));
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|e| format!("{}: {e}", tmp.display()))?;
                file.write_all(v).and_then(|()| file.sync_all()).map_err(|e| format!("{}: {e}", tmp.display()))?;
                std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
            }
            None => match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{}: {e}", path.display())),
            },
        }
    }
    Ok(())
}

/// The union of two revocation lists (`{"<token id>": <keep until>}`); `theirs` when
/// `mine` does not parse.
fn merge_revocations(mine: &[u8], theirs: &[u8]) -> Vec<u8> {
    let parse = |b: &[u8]| serde_json::from_slice::<BTreeMap<String, u64>>(b).ok();
    match (parse(mine), parse(theirs)) {
        (Some(mut a), Some(b)) => {
            for (id, until) in b {
                let e = a.entry(id).or_insert(until);
                *e = (*e).max(until);
            }
            if parse(theirs).as_ref() == Some(&a) {
                return theirs.to_vec();
            }
            serde_json::to_vec_pretty(&a).unwrap_or_else(|_| theirs.to_vec())
        }
        _ => theirs.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_lists_merge_to_their_union() {
        let merged = merge_revocations(br#"{"aa": 10, "bb": 20}"#, br#"{"bb": 30, "cc": 5}"#);
        let m: BTreeMap<String, u64> = serde_json::from_slice(&merged).unwrap();
        assert_eq!(m, BTreeMap::from([("aa".into(), 10), ("bb".into(), 30), ("cc".into(), 5)]));
        assert_eq!(merge_revocations(b"junk", br#"{"x": 1}"#), br#"{"x": 1}"#);
    }
}
