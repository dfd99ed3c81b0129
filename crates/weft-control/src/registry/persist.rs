//! The proxies' registrations on disk, so a restarted control plane does not forget the
//! workloads whose proxies have not reconnected yet.
//!
//! Without it a restarted control plane knows only the proxies that are back: the first
//! one to reconnect is pushed endpoint lists without the peers still in their reconnect
//! backoff, and its requests to them fail until they return. With it the control plane
//! writes every proxy-registered workload to `registry.json` in its data directory (on
//! each change, debounced, written atomically) and reads the file back at start: those
//! workloads are [`WorkloadSource::Restored`], still endpoints, until their proxy
//! reconnects (the entry becomes an ordinary proxy registration) or the reconnect grace
//! ([`DEFAULT_RECONNECT_GRACE`], `weft control --reconnect-grace`) runs out (the entry is
//! removed, as a proxy that went away is).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use weft_xds::PortInfo;

use super::{Registry, RegistrySnapshot, Workload, WorkloadSource};

/// The file in the control plane's data directory.
pub const REGISTRY_FILE: &str = "registry.json";

/// How long restored workloads wait for their proxy by default: far beyond the proxies'
/// longest reconnect delay (500 ms, `weft_xds::DEFAULT_MAX_BACKOFF`), and as long as the
/// longest delay of a stock Envoy (its xDS retry backoff is capped at 30 s). A workload
/// that died while the control plane was down stays an endpoint that long (callers'
/// retries and outlier detection route around it), the price of never dropping one that
/// is only slow to come back.
pub const DEFAULT_RECONNECT_GRACE: Duration = Duration::from_secs(30);

/// Coalesces bursts of registrations (a fleet reconnecting) into one write.
const WRITE_DEBOUNCE: Duration = Duration::from_millis(200);

/// Version of the file format.
const FORMAT: u32 = 1;

/// Where a control plane keeps its registrations and how long restored ones wait.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersistConfig {
    /// The file (`<data dir>/registry.json`).
    pub path: PathBuf,
    /// How long a restored workload waits for its proxy to reconnect.
    pub reconnect_grace: Duration,
}

impl PersistConfig {
    /// `registry.json` in `data_dir`, with the default grace.
    pub fn in_dir(data_dir: &Path) -> Self {
        PersistConfig { path: data_dir.join(REGISTRY_FILE), reconnect_grace: DEFAULT_RECONNECT_GRACE }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedRegistry {
    format: u32,
    workloads: Vec<SavedWorkload>,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedWorkload {
    id: String,
    name: String,
    namespace: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    service_account: String,
    #[serde(default)]
    ports: Vec<PortInfo>,
    addresses: Vec<IpAddr>,
    #[serde(default)]
    inbound: Option<SocketAddr>,
    ready: bool,
    /// Unix seconds.
    #[serde(default)]
    connected_since: u64,
}

impl Registry {
    /// Adds the workloads saved in `path` as [`WorkloadSource::Restored`] (a missing file
    /// restores nothing); how many. Call it before [`Registry::follow_with`], which
    /// starts their reconnect grace. An unreadable file is an error naming it; the
    /// registry is then left as it was.
    pub fn restore(&self, path: &Path) -> Result<usize, String> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(format!("{}: cannot read: {e}", path.display())),
        };
        let saved: SavedRegistry =
            serde_json::from_slice(&text).map_err(|e| format!("{}: not a saved registry: {e}", path.display()))?;
        if saved.format != FORMAT {
            return Err(format!(
                "{}: format {} is not one this control plane reads (it reads {FORMAT})",
                path.display(),
                saved.format
            ));
        }
        let mut restored = Vec::with_capacity(saved.workloads.len());
        for w in saved.workloads {
            if w.id.is_empty() || w.addresses.is_empty() {
                tracing::warn!(file = %path.display(), id = %w.id, "saved workload without id or address skipped");
                continue;
            }
            restored.push(from_saved(w, WorkloadSource::Restored));
        }
        Ok(self.restore_workloads(restored))
    }

    /// Adds `workloads` as [`WorkloadSource::Restored`] ones, except ids already known (a
    /// WorkloadEntry, a proxy already back); how many were given.
    pub(crate) fn restore_workloads(&self, workloads: Vec<Workload>) -> usize {
        let count = workloads.len();
        self.inner.modify(|map| {
            let mut changed = false;
            for mut w in workloads {
                if !map.contains_key(&w.id) {
                    w.source = WorkloadSource::Restored;
                    map.insert(w.id.clone(), w);
                    changed = true;
                }
            }
            changed
        });
        count
    }

    /// Writes the proxies' registrations (registered and restored ones, not
    /// WorkloadEntries, which live in the store) to `path` after every change, at most
    /// every 200 ms, atomically (a temporary file renamed over it). Runs until aborted
    /// or every handle of this registry is dropped; abort it before stopping the xDS
    /// server, so closing streams do not overwrite the file with an empty registry.
    pub fn persist(&self, path: PathBuf) -> JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        let mut changes = self.changes();
        tokio::spawn(async move {
            let mut written: Option<Vec<SavedWorkload>> = None;
            loop {
                if changes.changed().await.is_err() {
                    return;
                }
                tokio::time::sleep(WRITE_DEBOUNCE).await;
                changes.borrow_and_update();
                let Some(inner) = weak.upgrade() else { return };
                let saved = saved_workloads(&inner.snapshot.load());
                drop(inner);
                if written.as_ref() == Some(&saved) {
                    continue;
                }
                let body = SavedRegistry { format: FORMAT, workloads: saved.clone() };
                let target = path.clone();
                let result = match serde_json::to_vec_pretty(&body) {
                    Ok(bytes) => tokio::task::spawn_blocking(move || write_atomic(&target, &bytes))
                        .await
                        .unwrap_or_else(|e| Err(format!("writer task failed: {e}"))),
                    Err(e) => Err(format!("cannot encode: {e}")),
                };
                match result {
                    Ok(()) => written = Some(saved),
                    Err(e) => tracing::warn!(file = %path.display(), error = %e, "registry not saved"),
                }
            }
        })
    }
}

fn saved_workloads(snapshot: &RegistrySnapshot) -> Vec<SavedWorkload> {
    snapshot
        .workloads()
        .filter(|w| matches!(w.source, WorkloadSource::Proxy | WorkloadSource::Restored))
        .map(saved)
        .collect()
}

fn saved(w: &Workload) -> SavedWorkload {
    SavedWorkload {
        id: w.id.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        labels: w.labels.clone(),
        service_account: w.service_account.clone(),
        ports: w.ports.clone(),
        addresses: w.addresses.clone(),
        inbound: w.inbound,
        ready: w.ready,
        connected_since: w.connected_since.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    }
}

/// A workload as the shared store (etcd) keeps it: the JSON of `registry.json`'s entries.
pub(crate) fn encode_workload(w: &Workload) -> Result<Vec<u8>, String> {
    serde_json::to_vec(&saved(w)).map_err(|e| format!("cannot encode workload {}: {e}", w.id))
}

/// A workload from [`encode_workload`]'s bytes, as a [`WorkloadSource::Replica`] one.
pub(crate) fn decode_workload(bytes: &[u8]) -> Result<Workload, String> {
    let w: SavedWorkload = serde_json::from_slice(bytes).map_err(|e| format!("not a workload: {e}"))?;
    if w.id.is_empty() || w.addresses.is_empty() {
        return Err(format!("workload {:?} without id or address", w.id));
    }
    Ok(from_saved(w, WorkloadSource::Replica))
}

fn from_saved(w: SavedWorkload, source: WorkloadSource) -> Workload {
    Workload {
        id: w.id,
        name: w.name,
        namespace: w.namespace,
        labels: w.labels,
        service_account: w.service_account,
        ports: w.ports,
        addresses: w.addresses,
        inbound: w.inbound,
        ready: w.ready,
        connected_since: SystemTime::UNIX_EPOCH + Duration::from_secs(w.connected_since),
        source,
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory (created
/// 0700 if missing), synced, then renamed over `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.exists() {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), path.display()))
}
