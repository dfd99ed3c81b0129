//! The control plane's config store: a directory of YAML/JSON files watched for changes
//! (the embedded default) plus resources applied through the API. Every accepted change
//! gets a new version.
//!
//! Rules that keep proxies safe from a bad edit:
//! - a resource that fails validation is rejected alone, with its file, line and field;
//! - when a file has errors, resources it held before and no longer yields keep their
//!   last good version (a half-written or broken file never removes config);
//! - when a file parses cleanly, it is the truth: what it no longer holds is removed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use weft_api::{ApiError, Resource, ResourceKey};

/// How often the directory is scanned for changed files.
const SCAN_INTERVAL: Duration = Duration::from_millis(250);

/// How long a file that just lost resources is given to settle. An editor or a script
/// that rewrites a file in place (truncate, then write) exposes it empty or cut at a
/// document boundary for a moment; such a read is not trusted until the file has not
/// changed for this long, so its resources do not vanish from the mesh for a scan.
const SHRINK_SETTLE: Duration = Duration::from_secs(1);

/// What one file contributed.
#[derive(Debug, Clone, Default)]
struct FileState {
    modified: Option<SystemTime>,
    len: u64,
    resources: BTreeMap<ResourceKey, Resource>,
    errors: Vec<ApiError>,
}

#[derive(Debug, Default)]
struct State {
    version: u64,
    files: BTreeMap<PathBuf, FileState>,
    applied: BTreeMap<ResourceKey, Resource>,
    /// Keys deleted through the API; they hide a file's copy until the file changes.
    deleted: BTreeSet<ResourceKey>,
}

/// A consistent view of the store.
#[derive(Debug, Clone)]
pub struct ResourceSnapshot {
    /// Version of this view (bumps on every accepted change).
    pub version: u64,
    /// The resources in force, one per key (API-applied ones win over files).
    pub resources: Vec<Resource>,
    /// Current validation errors, by file.
    pub errors: Vec<ApiError>,
}

/// The outcome of an apply or delete through the API.
#[derive(Debug, Clone, Default)]
pub struct ChangeResult {
    /// Keys accepted (applied or deleted).
    pub accepted: Vec<ResourceKey>,
    /// Errors for the rejected parts.
    pub errors: Vec<ApiError>,
    /// ResourceStore version after the change.
    pub version: u64,
}

/// The store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct ResourceStore {
    dir: Option<PathBuf>,
    state: RwLock<State>,
    changes: watch::Sender<u64>,
    /// The shared store API changes go through when replicas share etcd (`--store`).
    shared: std::sync::OnceLock<crate::etcd::resources::SharedResources>,
}

impl ResourceStore {
    /// An empty store without a directory (API only).
    pub fn in_memory() -> Arc<ResourceStore> {
        Arc::new(ResourceStore {
            dir: None,
            state: RwLock::new(State::default()),
            changes: watch::channel(0).0,
            shared: std::sync::OnceLock::new(),
        })
    }

    /// A store over `dir`, loaded once now.
    pub fn open_dir(dir: &Path) -> std::io::Result<Arc<ResourceStore>> {
        if !dir.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{}: not a directory", dir.display()),
            ));
        }
        let store = Arc::new(ResourceStore {
            dir: Some(dir.to_path_buf()),
            state: RwLock::new(State::default()),
            changes: watch::channel(0).0,
            shared: std::sync::OnceLock::new(),
        });
        store.rescan();
        Ok(store)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // Every write below is a whole-value replacement; a poisoned lock holds a consistent state.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver that ticks with the version on every accepted change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The current version, without building a snapshot.
    pub fn snapshot_version(&self) -> u64 {
        self.read().version
    }

    /// The resources in force now.
    pub fn snapshot(&self) -> ResourceSnapshot {
        let st = self.read();
        let mut merged: BTreeMap<ResourceKey, Resource> = BTreeMap::new();
        for f in st.files.values() {
            for (k, r) in &f.resources {
                if !st.deleted.contains(k) {
                    merged.insert(k.clone(), r.clone());
                }
            }
        }
        for (k, r) in &st.applied {
            merged.insert(k.clone(), r.clone());
        }
        ResourceSnapshot {
            version: st.version,
            resources: merged.into_values().collect(),
            errors: st.files.values().flat_map(|f| f.errors.iter().cloned()).collect(),
        }
    }

    fn bump(&self, st: &mut State) {
        st.version += 1;
        self.changes.send_replace(st.version);
    }

    /// Re-reads files whose size or mtime changed, and forgets removed files. Returns
    /// true when the resources in force changed.
    pub fn rescan(&self) -> bool {
        let Some(dir) = &self.dir else { return false };
        let mut found = Vec::new();
        collect_files(dir, &mut found);
        let mut st = self.write();
        let mut changed = false;
        let present: BTreeSet<PathBuf> = found.iter().cloned().collect();
        let gone: Vec<PathBuf> = st.files.keys().filter(|p| !present.contains(*p)).cloned().collect();
        for p in gone {
            if let Some(f) = st.files.remove(&p) {
                changed |= !f.resources.is_empty();
            }
        }
        for path in found {
            let meta = std::fs::metadata(&path).ok();
            let modified = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.as_ref().map(|m| m.len()).unwrap_or(0);
            let known = st.files.get(&path);
            if known.map(|f| f.modified == modified && f.len == len).unwrap_or(false) {
                continue;
            }
            let parsed = weft_api::parse_file(&path);
            let previous = st.files.get(&path).cloned().unwrap_or_default();
            let mut next = FileState { modified, len, resources: BTreeMap::new(), errors: parsed.errors.clone() };
            for r in parsed.resources {
                // weft-api already reports a second copy within one file; keep the first.
                next.resources.entry(r.key()).or_insert(r);
            }
            if !next.errors.is_empty() {
                // Broken file: keep the last good version of what it no longer yields.
                for (k, r) in &previous.resources {
                    next.resources.entry(k.clone()).or_insert_with(|| r.clone());
                }
            }
            let lost = previous.resources.keys().any(|k| !next.resources.contains_key(k));
            if lost && just_modified(modified) {
                // Not recorded: the next scan reads the file again, settled or not.
                continue;
            }
            if next.resources.keys().ne(previous.resources.keys())
                || next.resources.iter().any(|(k, r)| previous.resources.get(k).map(|p| !same(p, r)).unwrap_or(true))
            {
                changed = true;
                // A file edit brings back what the API deleted from it.
                for k in next.resources.keys() {
                    st.deleted.remove(k);
                }
            }
            st.files.insert(path, next);
        }
        if changed {
            self.bump(&mut st);
        }
        changed
    }

    /// Watches the directory until the returned task is aborted.
    pub fn watch(self: &Arc<Self>) -> JoinHandle<()> {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SCAN_INTERVAL).await;
                let Some(store) = me.upgrade() else { return };
                // Directory reads are blocking; keep them off the async workers.
                let _ = tokio::task::spawn_blocking(move || store.rescan()).await;
            }
        })
    }

    /// Applies the resources in `text` (YAML or JSON). Good resources are accepted even
    /// when others in the text are rejected.
    pub fn apply(&self, text: &str, source: &Path) -> ChangeResult {
        let parsed = weft_api::parse_str(text, source);
        let accepted = self.apply_parsed(parsed.resources);
        ChangeResult { accepted, errors: parsed.errors, version: self.snapshot_version() }
    }

    /// Deletes the resources named in `text` (only kind, namespace and name are read).
    pub fn delete(&self, text: &str, source: &Path) -> ChangeResult {
        let parsed = weft_api::parse_str(text, source);
        let keys: Vec<ResourceKey> = parsed.resources.iter().map(Resource::key).collect();
        let accepted = self.delete_keys(&keys);
        ChangeResult { accepted, errors: parsed.errors, version: self.snapshot_version() }
    }

    /// [`ResourceStore::apply`], through the shared store (etcd) when replicas share one:
    /// validated here, written there, and in force here at once (the others follow
    /// through their watch).
    pub async fn apply_shared(&self, text: &str, source: &Path) -> ChangeResult {
        match self.shared.get() {
            Some(shared) => shared.apply(self, text, source).await,
            None => self.apply(text, source),
        }
    }

    /// [`ResourceStore::delete`], through the shared store when there is one.
    pub async fn delete_shared(&self, text: &str, source: &Path) -> ChangeResult {
        match self.shared.get() {
            Some(shared) => shared.delete(self, text, source).await,
            None => self.delete(text, source),
        }
    }

    /// Makes API changes go through `shared` from now on (once; false if already set).
    pub(crate) fn share(&self, shared: crate::etcd::resources::SharedResources) -> bool {
        self.shared.set(shared).is_ok()
    }

    /// Puts validated resources in force as API-applied ones; their keys.
    pub(crate) fn apply_parsed(&self, resources: Vec<Resource>) -> Vec<ResourceKey> {
        let mut st = self.write();
        let mut accepted = Vec::new();
        for r in resources {
            let key = r.key();
            st.deleted.remove(&key);
            st.applied.insert(key.clone(), r);
            accepted.push(key);
        }
        if !accepted.is_empty() {
            self.bump(&mut st);
        }
        accepted
    }

    /// Removes API-applied resources and hides file copies of `keys`; the keys that
    /// existed.
    pub(crate) fn delete_keys(&self, keys: &[ResourceKey]) -> Vec<ResourceKey> {
        let mut st = self.write();
        let mut accepted = Vec::new();
        for key in keys {
            let in_files = st.files.values().any(|f| f.resources.contains_key(key));
            let was_applied = st.applied.remove(key).is_some();
            if in_files {
                st.deleted.insert(key.clone());
            }
            if in_files || was_applied {
                accepted.push(key.clone());
            }
        }
        if !accepted.is_empty() {
            self.bump(&mut st);
        }
        accepted
    }

    /// Whether `key` is applied through the API (or the shared store).
    pub(crate) fn is_applied(&self, key: &ResourceKey) -> bool {
        self.read().applied.contains_key(key)
    }

    /// Replaces the API-applied resources with `next` (the shared store's content, as
    /// its watch sees it); bumps the version only when something changed.
    pub(crate) fn set_applied(&self, next: BTreeMap<ResourceKey, Resource>) -> bool {
        let mut st = self.write();
        let unchanged = st.applied.len() == next.len()
            && st.applied.iter().zip(next.iter()).all(|((ka, a), (kb, b))| ka == kb && same(a, b));
        if unchanged {
            return false;
        }
        st.applied = next;
        self.bump(&mut st);
        true
    }
}

/// True while a file's modification time is within [`SHRINK_SETTLE`] of now (or ahead
/// of the clock by less than that: a clock step must not freeze a file for long).
fn just_modified(modified: Option<SystemTime>) -> bool {
    let Some(modified) = modified else { return false };
    match SystemTime::now().duration_since(modified) {
        Ok(age) => age < SHRINK_SETTLE,
        Err(ahead) => ahead.duration() < SHRINK_SETTLE,
    }
}

fn same(a: &Resource, b: &Resource) -> bool {
    format!("{:?}", a.spec) == format!("{:?}", b.spec) && a.meta == b.meta && a.api_version == b.api_version
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect_files(&p, out);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
            out.push(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination:\n        host: reviews\n        subset: SUBSET\n";
    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: reviews\nspec:\n  selector: {app: reviews}\n  ports:\n  - name: http\n    port: 9080\n";

    fn subset_of(s: &ResourceSnapshot) -> String {
        let r = s.resources.iter().find(|r| r.kind == weft_api::Kind::VirtualService).expect("vs");
        let dbg = format!("{:?}", r.spec);
        ["v1", "v2", "v3"].iter().find(|v| dbg.contains(&format!("\"{v}\""))).unwrap_or(&"?").to_string()
    }

    #[test]
    fn edits_replace_broken_files_keep_last_good_and_removal_removes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("vs.yaml");
        std::fs::write(&f, VS.replace("SUBSET", "v1")).unwrap();
        std::fs::write(dir.path().join("svc.yaml"), SVC).unwrap();
        let store = ResourceStore::open_dir(dir.path()).unwrap();
        let s1 = store.snapshot();
        assert_eq!(s1.resources.len(), 2);
        assert_eq!(subset_of(&s1), "v1");

        std::fs::write(&f, VS.replace("SUBSET", "v2") + "\n").unwrap();
        assert!(store.rescan());
        let s2 = store.snapshot();
        assert!(s2.version > s1.version);
        assert_eq!(subset_of(&s2), "v2");

        // Broken: YAML syntax error. The error is reported, the last good VS stays.
        std::fs::write(&f, "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: [\n").unwrap();
        store.rescan();
        let s3 = store.snapshot();
        assert_eq!(subset_of(&s3), "v2");
        assert!(s3.errors.iter().any(|e| e.file == f), "{:?}", s3.errors);

        std::fs::remove_file(&f).unwrap();
        assert!(store.rescan());
        assert!(store.snapshot().resources.iter().all(|r| r.kind != weft_api::Kind::VirtualService));
    }

    #[test]
    fn a_file_rewritten_in_place_keeps_its_resources_until_it_settles() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("all.yaml");
        std::fs::write(&f, format!("{SVC}---\n{}", VS.replace("SUBSET", "v1"))).unwrap();
        let store = ResourceStore::open_dir(dir.path()).unwrap();
        assert_eq!(store.snapshot().resources.len(), 2);

        // Truncated mid-rewrite: empty, and then cut after the first document.
        std::fs::write(&f, "").unwrap();
        assert!(!store.rescan(), "an empty file that just changed is not trusted yet");
        std::fs::write(&f, SVC).unwrap();
        assert!(!store.rescan());
        assert_eq!(store.snapshot().resources.len(), 2);

        // The same content once it has settled: the VirtualService really was removed.
        let settled = SystemTime::now() - SHRINK_SETTLE - Duration::from_millis(100);
        std::fs::File::options().write(true).open(&f).unwrap().set_modified(settled).unwrap();
        assert!(store.rescan());
        let s = store.snapshot();
        assert_eq!(s.resources.len(), 1);
        assert!(s.resources.iter().all(|r| r.kind == weft_api::Kind::Service));

        // Growing is never held back.
        std::fs::write(&f, format!("{SVC}---\n{}", VS.replace("SUBSET", "v2"))).unwrap();
        assert!(store.rescan());
        assert_eq!(subset_of(&store.snapshot()), "v2");
    }

    #[test]
    fn apply_accepts_good_resources_and_reports_bad_ones_and_delete_hides_file_copies() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("svc.yaml"), SVC).unwrap();
        let store = ResourceStore::open_dir(dir.path()).unwrap();
        let bad = VS.replace("SUBSET", "v1").replace("host: reviews\n        subset", "hots: reviews\n        subset");
        let r = store.apply(
            &format!("{}---\n{}", VS.replace("SUBSET", "v3"), bad.replace("name: reviews", "name: other")),
            Path::new("cli"),
        );
        assert_eq!(r.accepted.len(), 1);
        assert_eq!(r.errors.len(), 1);
        assert!(r.errors[0].to_string().contains("hots"), "{}", r.errors[0]);
        assert_eq!(subset_of(&store.snapshot()), "v3");

        let d = store.delete(SVC, Path::new("cli"));
        assert_eq!(d.accepted.len(), 1);
        assert!(store.snapshot().resources.iter().all(|r| r.kind != weft_api::Kind::Service));
    }
}
