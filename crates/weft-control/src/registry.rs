//! Workload registry: the workloads the mesh knows, as Services select them.
//!
//! Workloads register themselves by connecting: [`Registry::follow`] keeps the registry
//! in line with an [`AdsServer`]'s open streams (one workload per node id, identity from
//! the node metadata). Others are added by hand with [`Registry::upsert`] (WorkloadEntry).
//!
//! The proxies' registrations survive a control-plane restart: [`Registry::persist`]
//! keeps them in a file, [`Registry::restore`] reads it back at start as
//! [`WorkloadSource::Restored`] workloads (still endpoints), and [`Registry::follow_with`]
//! drops those whose proxy has not reconnected within [`FollowConfig::restored_grace`]
//! (see `persist.rs`).
//!
//! Readers take an immutable [`RegistrySnapshot`] without locking; every change
//! publishes a new snapshot and bumps the version on [`Registry::changes`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::value::Kind;
use tokio::sync::watch;
use weft_xds::{AdsServer, ConnectionStatus, NodeInfo, PortInfo};

/// Metadata key: the address the proxy accepts inbound mesh traffic on (`ip:port`).
pub const WEFT_INBOUND: &str = "WEFT_INBOUND";
/// Metadata key: readiness; the string `"false"` marks the workload not ready.
pub const READY: &str = "READY";

/// One workload instance (a pod, a VM, a local process) with its proxy.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// Node id of its proxy (unique key).
    pub id: String,
    /// Instance name (pod name).
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Labels Services select on.
    pub labels: BTreeMap<String, String>,
    /// Service account it runs as.
    pub service_account: String,
    /// Ports it declares.
    pub ports: Vec<PortInfo>,
    /// Its addresses: the announced instance IPs, else the peer IP of its xDS stream.
    pub addresses: Vec<IpAddr>,
    /// Where its proxy accepts inbound mesh traffic (metadata `WEFT_INBOUND`), if announced.
    pub inbound: Option<SocketAddr>,
    /// Whether it may receive traffic.
    pub ready: bool,
    /// When its proxy connected (or the entry was added).
    pub connected_since: SystemTime,
    /// How it got here.
    pub source: WorkloadSource,
}

/// Where a [`Workload`] came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkloadSource {
    /// Its proxy connected to the control plane.
    Proxy,
    /// A `WorkloadEntry` resource of this name.
    WorkloadEntry(String),
    /// Registered by its proxy before the control plane restarted, restored from the
    /// data directory and awaiting the proxy's reconnect (it stays an endpoint meanwhile).
    Restored,
    /// Registered by its proxy through another replica sharing the etcd store
    /// (`weft control --store etcd://`); it goes when that replica's lease does.
    Replica,
}

/// Settings of [`Registry::follow_with`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FollowConfig {
    /// How long a workload stays after its last stream closed (zero: removed at once).
    pub grace: std::time::Duration,
    /// How long a [`WorkloadSource::Restored`] workload (present when the task starts)
    /// waits for its proxy to reconnect before it is removed (zero: removed at once).
    pub restored_grace: std::time::Duration,
}

/// The workload registry. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

/// An immutable view of the registry at one version.
#[derive(Clone, Debug, Default)]
pub struct RegistrySnapshot {
    version: u64,
    workloads: BTreeMap<String, Workload>,
}

struct Inner {
    snapshot: ArcSwap<RegistrySnapshot>,
    /// Serialises writers (readers never take it).
    write: Mutex<()>,
    changes: watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// An empty registry at version 0.
    pub fn new() -> Self {
        Registry {
            inner: Arc::new(Inner {
                snapshot: ArcSwap::from_pointee(RegistrySnapshot::default()),
                write: Mutex::new(()),
                changes: watch::channel(0).0,
            }),
        }
    }

    /// Adds or replaces the workload with `w.id`.
    pub fn upsert(&self, w: Workload) {
        self.inner.modify(|map| {
            if map.get(&w.id) == Some(&w) {
                return false;
            }
            map.insert(w.id.clone(), w);
            true
        });
    }

    /// Removes the workload `id` (no change if absent).
    pub fn remove(&self, id: &str) {
        self.inner.modify(|map| map.remove(id).is_some());
    }

    /// Keeps the registry in line with `server`'s connections: a proxy that connects
    /// with parsable metadata is added; one whose stream closes is removed promptly
    /// (no grace period). Readiness comes from metadata `READY` when the server exposes
    /// it (`"false"` = not ready); see [`workload_from_connection`].
    ///
    /// The task runs until aborted or until every handle of this registry is dropped.
    pub fn follow(&self, server: &AdsServer) -> tokio::task::JoinHandle<()> {
        self.follow_with(server, FollowConfig::default())
    }

    /// [`Registry::follow`] with settings (a grace period before removal).
    pub fn follow_with(&self, server: &AdsServer, config: FollowConfig) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        let server = server.clone();
        // Subscribe before the task starts so no change between now and then is missed.
        // Arrivals and departures only: a workload is made from what a stream's first
        // request says, so its sends and ACKs change nothing here.
        let changes = server.membership_changes();
        tokio::spawn(follow_task(weak, server, changes, config))
    }

    /// The current snapshot (lock-free).
    pub fn snapshot(&self) -> Arc<RegistrySnapshot> {
        self.inner.snapshot.load_full()
    }

    /// The snapshot version, bumped on every change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Makes the [`WorkloadSource::Replica`] workloads those of `remote` (the
    /// registrations other replicas keep in etcd), except ids registered here in another
    /// way (a proxy connected to this replica, a WorkloadEntry): those win.
    pub fn reconcile_replicated(&self, remote: &BTreeMap<String, Workload>) {
        self.inner.modify(|map| {
            let stale: Vec<String> = map
                .iter()
                .filter(|(id, w)| w.source == WorkloadSource::Replica && !remote.contains_key(*id))
                .map(|(id, _)| id.clone())
                .collect();
            let mut changed = !stale.is_empty();
            for id in stale {
                map.remove(&id);
            }
            for (id, w) in remote {
                match map.get(id) {
                    Some(cur) if cur.source != WorkloadSource::Replica || cur == w => {}
                    _ => {
                        let mut w = w.clone();
                        w.source = WorkloadSource::Replica;
                        map.insert(id.clone(), w);
                        changed = true;
                    }
                }
            }
            changed
        });
    }
}

impl Inner {
    /// Applies `change` to a copy of the workloads; publishes it when `change` says
    /// something changed.
    fn modify(&self, change: impl FnOnce(&mut BTreeMap<String, Workload>) -> bool) {
        let _guard = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.snapshot.load();
        let mut workloads = current.workloads.clone();
        if !change(&mut workloads) {
            return;
        }
        let version = current.version.wrapping_add(1);
        self.snapshot.store(Arc::new(RegistrySnapshot { version, workloads }));
        self.changes.send_replace(version);
    }
}

impl RegistrySnapshot {
    /// Version of this snapshot (as sent on [`Registry::changes`]).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Every workload, ordered by id.
    pub fn workloads(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.values()
    }

    /// Ready workloads of `namespace` whose labels contain every `key=value` of
    /// `selector` (Kubernetes label-selector semantics), ordered by id. An empty selector
    /// selects nothing, as for a Kubernetes Service.
    pub fn select(&self, namespace: &str, selector: &BTreeMap<String, String>) -> Vec<&Workload> {
        if selector.is_empty() {
            return Vec::new();
        }
        self.workloads
            .values()
            .filter(|w| w.ready && w.namespace == namespace)
            .filter(|w| selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            .collect()
    }

    /// The workload `id`.
    pub fn get(&self, id: &str) -> Option<&Workload> {
        self.workloads.get(id)
    }
}

/// The workload a connection announces: identity from its parsed [`NodeInfo`],
/// addresses from `INSTANCE_IPS`, else the stream's peer IP.
///
/// The server's [`ConnectionStatus`] carries only the parsed [`NodeInfo`], not the raw
/// metadata, so `READY` and `WEFT_INBOUND` are not visible here: the workload is ready
/// and has no inbound address. [`workload_from_node`] reads them from a raw [`Node`].
pub fn workload_from_connection(conn: &ConnectionStatus) -> Result<Workload, String> {
    if conn.node.is_none() {
        let why = conn.node_error.as_deref().unwrap_or("metadata did not parse");
        return Err(format!("node {}: {why}", conn.node_id));
    }
    // The raw node carries READY and WEFT_INBOUND, which NodeInfo does not model.
    workload_from_node(&conn.raw_node, conn.peer, conn.connected_since)
}

/// The workload a raw [`Node`] announces (everything [`NodeInfo::from_node`] reads, plus
/// `READY` and `WEFT_INBOUND`), with `peer` as the address when it has no instance IPs.
pub fn workload_from_node(node: &Node, peer: Option<SocketAddr>, since: SystemTime) -> Result<Workload, String> {
    let info = NodeInfo::from_node(node)?;
    let fields = node.metadata.as_ref().map(|m| &m.fields);
    let string = |key: &str| -> Result<Option<&str>, String> {
        match fields.and_then(|f| f.get(key)).and_then(|v| v.kind.as_ref()) {
            None | Some(Kind::NullValue(_)) => Ok(None),
            Some(Kind::StringValue(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(format!("node {}: metadata {key} must be a string", node.id)),
        }
    };
    let ready = match string(READY)? {
        None | Some("true") | Some("") => true,
        Some("false") => false,
        Some(other) => {
            return Err(format!("node {}: metadata {READY} must be \"true\" or \"false\", found {other:?}", node.id))
        }
    };
    let inbound =
        match string(WEFT_INBOUND)? {
            None | Some("") => None,
            Some(s) => Some(s.parse::<SocketAddr>().map_err(|e| {
                format!("node {}: metadata {WEFT_INBOUND} {s:?} is not an ip:port address: {e}", node.id)
            })?),
        };
    workload_from_info(&info, peer, since, ready, inbound)
}

fn workload_from_info(
    info: &NodeInfo,
    peer: Option<SocketAddr>,
    since: SystemTime,
    ready: bool,
    inbound: Option<SocketAddr>,
) -> Result<Workload, String> {
    let mut addresses = Vec::with_capacity(info.instance_ips.len());
    for ip in &info.instance_ips {
        let parsed = ip.parse::<IpAddr>().map_err(|_| {
            format!(
                "node {}: metadata {} holds {ip:?}, which is not an IP address",
                info.id,
                weft_xds::node::INSTANCE_IPS
            )
        })?;
        addresses.push(parsed);
    }
    if addresses.is_empty() {
        match peer {
            Some(peer) => addresses.push(peer.ip()),
            None => {
                return Err(format!(
                    "node {}: no {} and the stream's peer address is unknown",
                    info.id,
                    weft_xds::node::INSTANCE_IPS
                ))
            }
        }
    }
    Ok(Workload {
        id: info.id.clone(),
        name: info.name.clone(),
        namespace: info.namespace.clone(),
        labels: info.labels.clone(),
        service_account: info.service_account.clone(),
        ports: info.ports.clone(),
        addresses,
        inbound,
        ready,
        connected_since: since,
        source: WorkloadSource::Proxy,
    })
}

/// The workloads `server`'s open connections announce, one per node id (the newest
/// stream wins while an old one lingers). Connections whose metadata does not parse are
/// skipped; each is logged once per stream id in `warned`.
fn connected_workloads(server: &AdsServer, warned: &mut BTreeSet<u64>) -> BTreeMap<String, Workload> {
    let mut connections = server.connections();
    connections.sort_by_key(|c| c.id);
    let open: BTreeSet<u64> = connections.iter().map(|c| c.id).collect();
    warned.retain(|id| open.contains(id));
    let mut workloads = BTreeMap::new();
    for conn in &connections {
        match workload_from_connection(conn) {
            Ok(w) => {
                workloads.insert(w.id.clone(), w);
            }
            Err(e) => {
                if warned.insert(conn.id) {
                    tracing::warn!(stream = conn.id, node = %conn.node_id, error = %e, "proxy not registered");
                }
            }
        }
    }
    workloads
}

async fn follow_task(
    registry: Weak<Inner>,
    server: AdsServer,
    mut changes: watch::Receiver<u64>,
    config: FollowConfig,
) {
    // Node ids this task registered (or found restored), with the deadline by which their
    // proxy must be back (None: connected).
    let mut owned: BTreeMap<String, Option<tokio::time::Instant>> = BTreeMap::new();
    if let Some(inner) = registry.upgrade() {
        let deadline = after(tokio::time::Instant::now(), config.restored_grace);
        for w in inner.snapshot.load().workloads() {
            if w.source == WorkloadSource::Restored {
                owned.insert(w.id.clone(), Some(deadline));
            }
        }
    }
    let mut warned = BTreeSet::new();
    loop {
        changes.borrow_and_update();
        let Some(inner) = registry.upgrade() else { return };
        let connected = connected_workloads(&server, &mut warned);
        let now = tokio::time::Instant::now();
        for id in owned.keys().cloned().collect::<Vec<_>>() {
            if !connected.contains_key(&id) {
                owned.entry(id).and_modify(|deadline| *deadline = Some(deadline.unwrap_or(after(now, config.grace))));
            }
        }
        let expired: Vec<String> =
            owned.iter().filter(|(_, deadline)| deadline.is_some_and(|t| now >= t)).map(|(id, _)| id.clone()).collect();
        for id in &expired {
            owned.remove(id);
        }
        for id in connected.keys() {
            owned.insert(id.clone(), None);
        }
        inner.modify(|map| {
            let mut changed = false;
            for id in &expired {
                // Leave entries someone else put there (a WorkloadEntry with this id).
                if map.get(id).is_some_and(|w| matches!(w.source, WorkloadSource::Proxy | WorkloadSource::Restored)) {
                    map.remove(id);
                    changed = true;
                }
            }
            for (id, w) in &connected {
                if map.get(id) != Some(w) {
                    map.insert(id.clone(), w.clone());
                    changed = true;
                }
            }
            changed
        });
        drop(inner);
        let next_expiry = owned.values().flatten().min().copied();
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = sleep_until(next_expiry) => {}
        }
    }
}

/// `now + d`, or a century from now when `d` does not fit (a huge grace flag).
fn after(now: tokio::time::Instant, d: std::time::Duration) -> tokio::time::Instant {
    now.checked_add(d).unwrap_or_else(|| now + std::time::Duration::from_secs(100 * 365 * 86_400))
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

mod persist;
pub(crate) use persist::{decode_workload, encode_workload};
pub use persist::{PersistConfig, DEFAULT_RECONNECT_GRACE, REGISTRY_FILE};

#[cfg(test)]
mod tests;
