//! The xDS a control plane serves: each proxy's view of the store and the registry, run
//! through the translator, cached per proxy and input version, with one version string
//! per resource type derived from its content (so a change re-pushes only the types it
//! touched, and delta clients get per-resource versions from the server).
//!
//! The cache holds one translation per proxy shape, at most [`DEFAULT_CACHE_BOUND`]
//! (least recently used evicted beyond it), and [`MeshXdsSource::evict_unused`] drops the
//! shapes no connected proxy has any more (the control plane runs it as proxies come and
//! go); [`MeshXdsSource::cache_stats`] counts both (`GET /api/v1/cache`).
//!
//! On-demand proxies (delta, `WEFT_ON_DEMAND`) subscribe by name; [`XdsSource::lookup`]
//! answers them from the cached translation by name (virtual hosts through a domain
//! index), so a proxy asking for one host never costs a copy of the whole mesh.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use tokio::sync::watch;
use weft_xds::vhds::VhostIndex;
use weft_xds::{content_version, type_url, Any, NodeInfo, NodeMemo, Resolved, XdsSnapshot, XdsSource};

use crate::jwks::JwksResolver;
use crate::registry::{Registry, RegistrySnapshot, Workload, WorkloadSource};
use crate::store::ResourceStore;
use crate::translate::{grpcgen, peer_exchange, translate, MeshConfig, ProxyMode};

/// At most one push per this: bursts of changes (a directory of files saved together,
/// many proxies connecting) coalesce into a push each period.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// How long a change after a quiet spell (at least [`DEBOUNCE`] since the last push)
/// waits before it is pushed, so what arrives with it (the other documents of an apply,
/// the other replicas' writes of one etcd revision) goes in the same push. A single
/// change thus reaches the proxies without waiting a whole [`DEBOUNCE`].
const SETTLE: Duration = Duration::from_millis(10);

/// Translations kept by default: one per proxy shape (namespace, labels, ports, listener
/// addresses...), so roughly one per deployment of the mesh.
pub const DEFAULT_CACHE_BOUND: usize = 1024;

/// Versions of the translator's inputs besides the registry: (store, fetched JWKS).
type MeshVersions = (u64, u64);

type TypeMap = BTreeMap<String, (String, BTreeMap<String, Any>)>;

struct Cached {
    inputs: (MeshVersions, u64),
    /// [`TranslationCache::tick`] when last served (least recently used goes first).
    last_used: u64,
    types: Arc<TypeMap>,
    /// VHDS resources by route configuration and domain (empty unless on demand).
    vhosts: Arc<VhostIndex>,
}

/// A [`XdsSource`] over the store and registry.
pub struct MeshXdsSource {
    store: Arc<ResourceStore>,
    registry: Registry,
    mode: ProxyMode,
    defaults: MeshConfig,
    /// The mesh by (store version, JWKS version).
    mesh: Mutex<Option<(MeshVersions, Arc<MeshConfig>)>>,
    /// JWKS documents of RequestAuthentications' `jwksUri`s, inlined by the translator.
    jwks: Arc<JwksResolver>,
    /// Translations by proxy shape (see [`MeshXdsSource::proxy_resources`]).
    cache: Mutex<TranslationCache>,
    /// The registry as the translations see it (see [`MeshXdsSource::registry_epoch`]).
    epoch: Mutex<RegistryEpoch>,
    changes: watch::Sender<u64>,
    /// Staged configuration changes served to canary proxies only ([`crate::rollout::staged`]).
    staging: std::sync::OnceLock<Arc<crate::rollout::staged::Staging>>,
}

/// The bounded translation cache.
struct TranslationCache {
    entries: HashMap<String, Cached>,
    /// Bumped on every use; orders entries by recency.
    tick: u64,
    stats: CacheStats,
}

/// What the translation cache holds and has done (`GET /api/v1/cache`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheStats {
    /// Translations held (one per proxy shape).
    pub entries: usize,
    /// Most translations held.
    pub bound: usize,
    /// Translations served from the cache.
    pub hits: u64,
    /// Translations computed (absent, or their inputs changed).
    pub misses: u64,
    /// Evicted as least recently used, beyond the bound.
    pub evicted_lru: u64,
    /// Evicted because no connected proxy has their shape any more.
    pub evicted_unused: u64,
}

/// The last registry snapshot looked at and the epoch it belongs to.
struct RegistryEpoch {
    seen: Arc<RegistrySnapshot>,
    /// The mesh (store, JWKS) versions `seen` was judged against.
    mesh: MeshVersions,
    epoch: u64,
}

impl MeshXdsSource {
    /// A source; `defaults` gives everything but the resources (domain, policies).
    /// Spawns the task that turns store and registry changes into pushes.
    pub fn new(store: Arc<ResourceStore>, registry: Registry, mode: ProxyMode, defaults: MeshConfig) -> Arc<Self> {
        let me = Arc::new(MeshXdsSource {
            store,
            registry,
            mode,
            defaults,
            mesh: Mutex::new(None),
            jwks: JwksResolver::start(crate::jwks::DEFAULT_REFRESH, crate::jwks::DEFAULT_TIMEOUT),
            cache: Mutex::new(TranslationCache {
                entries: HashMap::new(),
                tick: 0,
                stats: CacheStats { bound: DEFAULT_CACHE_BOUND, ..CacheStats::default() },
            }),
            epoch: Mutex::new(RegistryEpoch { seen: Arc::new(RegistrySnapshot::default()), mesh: (0, 0), epoch: 0 }),
            changes: watch::channel(0).0,
            staging: std::sync::OnceLock::new(),
        });
        let weak = Arc::downgrade(&me);
        let mut store_rx = me.store.subscribe();
        let mut reg_rx = me.registry.changes();
        let mut jwks_rx = me.jwks.changes();
        tokio::spawn(async move {
            let mut last_push: Option<tokio::time::Instant> = None;
            loop {
                tokio::select! {
                    r = store_rx.changed() => if r.is_err() { return },
                    r = reg_rx.changed() => if r.is_err() { return },
                    r = jwks_rx.changed() => if r.is_err() { return },
                }
                tokio::time::sleep_until(push_at(tokio::time::Instant::now(), last_push)).await;
                let _ = store_rx.borrow_and_update();
                let _ = reg_rx.borrow_and_update();
                let _ = jwks_rx.borrow_and_update();
                let Some(me) = weak.upgrade() else { return };
                me.changes.send_modify(|v| *v += 1);
                last_push = Some(tokio::time::Instant::now());
            }
        });
        me
    }

    /// The mesh and its input versions (store, fetched JWKS).
    fn mesh(&self) -> (MeshVersions, Arc<MeshConfig>) {
        let mut slot = self.mesh.lock().unwrap_or_else(|p| p.into_inner());
        let versions = (self.store.snapshot_version(), self.jwks.version());
        if let Some((v, m)) = slot.as_ref() {
            if *v == versions {
                return (*v, m.clone());
            }
        }
        let snap = self.store.snapshot();
        self.jwks.want(crate::translate::jwt::jwks_uris(&snap.resources));
        let versions = (snap.version, self.jwks.version());
        let mut jwks = self.defaults.jwks.clone();
        jwks.extend(self.jwks.snapshot().iter().map(|(k, v)| (k.clone(), v.clone())));
        let mesh = Arc::new(MeshConfig { resources: snap.resources, jwks, ..self.defaults.clone() });
        *slot = Some((versions, mesh.clone()));
        (versions, mesh)
    }

    /// Serves the staged changes of `staging` to their canary proxies (the store's
    /// resources overlaid with the change; every other proxy gets the store), pushing
    /// whenever the staged view changes. Set once.
    pub fn set_staging(self: &Arc<Self>, staging: Arc<crate::rollout::staged::Staging>) {
        let mut rx = staging.changes();
        if self.staging.set(staging).is_err() {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(me) = weak.upgrade() else { return };
                me.changes.send_modify(|v| *v += 1);
            }
        });
    }

    /// The staged view when `info`'s workload is one of its canaries.
    fn staged_for(&self, info: &NodeInfo) -> Option<Arc<crate::rollout::staged::StageView>> {
        let view = self.staging.get()?.view()?;
        view.canary.contains(&(info.namespace.clone(), info.workload_name.clone())).then_some(view)
    }

    /// The mesh's DNS domain.
    pub fn domain(&self) -> String {
        self.defaults.domain.clone()
    }

    /// The store translated from.
    pub fn store(&self) -> &Arc<ResourceStore> {
        &self.store
    }

    /// Everything one proxy gets now, by type URL.
    pub fn proxy_resources(&self, node: &Node) -> Arc<TypeMap> {
        self.translation(node).0
    }

    /// Sets the most translations the cache holds (at least 1), evicting the least
    /// recently used beyond it.
    pub fn set_cache_bound(&self, bound: usize) {
        let mut cache = self.lock_cache();
        cache.stats.bound = bound.max(1);
        cache.evict_beyond_bound();
    }

    /// The cache's size, bound and counters.
    pub fn cache_stats(&self) -> CacheStats {
        let cache = self.lock_cache();
        CacheStats { entries: cache.entries.len(), ..cache.stats.clone() }
    }

    /// Drops the translations of shapes none of `connected` (the nodes of the open
    /// streams) has; how many.
    pub fn evict_unused<'a>(&self, connected: impl IntoIterator<Item = &'a Node>) -> usize {
        let registry = self.registry.snapshot();
        let live: HashSet<String> = connected
            .into_iter()
            .map(|n| {
                let info = node_info(n);
                let mut s = shape(&info, n, &registry);
                if let Some(v) = self.staged_for(&info) {
                    s.push_str(&format!("|staged:{}", v.generation));
                }
                s
            })
            .collect();
        let mut cache = self.lock_cache();
        let before = cache.entries.len();
        cache.entries.retain(|k, _| live.contains(k));
        let evicted = before - cache.entries.len();
        cache.stats.evicted_unused += evicted as u64;
        evicted
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, TranslationCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The proxy's translation and its virtual-host index (cached per proxy shape).
    fn translation(&self, node: &Node) -> (Arc<TypeMap>, Arc<VhostIndex>) {
        self.translation_of(node, &ParsedNode::of(node))
    }

    /// [`MeshXdsSource::translation`] of a node whose metadata was parsed already.
    fn translation_of(&self, node: &Node, parsed: &ParsedNode) -> (Arc<TypeMap>, Arc<VhostIndex>) {
        let info = &parsed.info;
        let (store_version, mesh) = self.mesh();
        let registry = self.registry.snapshot();
        let inputs = (store_version, self.registry_epoch(store_version, &mesh, &registry));
        let staged = self.staged_for(info);
        let mut shape = parsed.shape(node, &registry);
        if let Some(v) = &staged {
            shape.push_str(&format!("|staged:{}", v.generation));
        }
        {
            let mut cache = self.lock_cache();
            cache.tick += 1;
            let tick = cache.tick;
            if let Some(c) = cache.entries.get_mut(&shape) {
                if c.inputs == inputs {
                    c.last_used = tick;
                    let found = (c.types.clone(), c.vhosts.clone());
                    cache.stats.hits += 1;
                    return found;
                }
            }
            cache.stats.misses += 1;
        }
        let mesh = match &staged {
            Some(v) => Arc::new(overlay(&mesh, v)),
            None => mesh,
        };
        let mut xds = if parsed.grpc {
            grpcgen::translate(&mesh, &registry, info, self.mode)
        } else {
            translate(&mesh, &registry, info, self.mode)
        };
        if !parsed.grpc && peer_exchange::needs_header_edits(&node.user_agent_name, info) {
            peer_exchange::add_header_edits(&mut xds, info);
        }
        if peer_exchange::is_envoy(&node.user_agent_name) {
            peer_exchange::strip_tcp_exchange(&mut xds);
        }
        let vhosts = Arc::new(VhostIndex::build(xds.virtual_hosts.iter().map(|vh| (vh.name.as_str(), vh))));
        let mut types: TypeMap = BTreeMap::new();
        for (type_url, anys) in xds.into_resources() {
            let mut by_name = BTreeMap::new();
            for any in anys {
                if let Ok(name) = weft_xds::resource_name(type_url, &any) {
                    // Map entries sorted: the same translation gives the same bytes and
                    // version in every replica and every time (nothing re-pushed).
                    by_name.insert(name, weft_xds::canon::canonical(&any));
                }
            }
            let digest: String = by_name.iter().map(|(n, a)| format!("{n}={};", content_version(a))).collect();
            let version = content_version(&Any { type_url: type_url.to_string(), value: digest.into_bytes() });
            types.insert(type_url.to_string(), (version, by_name));
        }
        let types = Arc::new(types);
        let mut cache = self.lock_cache();
        cache.tick += 1;
        let cached = Cached { inputs, last_used: cache.tick, types: types.clone(), vhosts: vhosts.clone() };
        cache.entries.insert(shape, cached);
        cache.evict_beyond_bound();
        (types, vhosts)
    }

    /// A registry version that moves only when a change can alter a translation: a
    /// workload some Service or ServiceEntry of its namespace selects (or one from a
    /// WorkloadEntry) came, went or changed. A proxy that connects and that no Service
    /// selects (a client, a job) then does not invalidate every cached translation,
    /// which in a large mesh costs a full translation per proxy shape.
    fn registry_epoch(&self, mesh_versions: MeshVersions, mesh: &MeshConfig, registry: &Arc<RegistrySnapshot>) -> u64 {
        let mut e = self.epoch.lock().unwrap_or_else(|p| p.into_inner());
        if e.seen.version() == registry.version() && e.mesh == mesh_versions {
            return e.epoch;
        }
        // Whether a change matters depends on the mesh (which Services select what): a
        // judgement made against another mesh than the last one bumps the epoch too, so
        // a change found harmless under one mesh never reuses a translation of another.
        let relevant =
            e.mesh != mesh_versions || changed_workloads(&e.seen, registry).any(|w| translations_read(mesh, w));
        if relevant {
            e.epoch += 1;
        }
        e.seen = registry.clone();
        e.mesh = mesh_versions;
        e.epoch
    }
}

/// What a stream's node says, parsed once per stream (kept in its [`NodeMemo`]).
struct ParsedNode {
    info: NodeInfo,
    grpc: bool,
    /// The node's [`shape`] and the registry version it was made at: a push to
    /// thousands of streams of an unchanged registry formats no shape and looks up no
    /// workload (among thousands) per stream.
    shape: Mutex<Option<(u64, String)>>,
}

impl ParsedNode {
    fn of(node: &Node) -> ParsedNode {
        ParsedNode { info: node_info(node), grpc: grpcgen::is_grpc(node), shape: Mutex::new(None) }
    }

    /// [`shape`] of `node` (whose metadata this is) in `registry`.
    fn shape(&self, node: &Node, registry: &RegistrySnapshot) -> String {
        let mut memo = self.shape.lock().unwrap_or_else(|p| p.into_inner());
        match memo.as_ref() {
            Some((version, shape)) if *version == registry.version() => shape.clone(),
            _ => {
                let made = shape(&self.info, node, registry);
                *memo = Some((registry.version(), made.clone()));
                made
            }
        }
    }
}

/// One proxy's translation at one moment: what every stream of that shape answers from.
struct TranslationSnapshot {
    types: Arc<TypeMap>,
    vhosts: Arc<VhostIndex>,
}

impl XdsSnapshot for TranslationSnapshot {
    fn version(&self, type_url: &str) -> Option<String> {
        Some(self.types.get(type_url).map_or_else(|| "empty".into(), |(v, _)| v.clone()))
    }

    fn resources(&self, type_url: &str) -> Option<(String, BTreeMap<String, Any>)> {
        Some(match self.types.get(type_url) {
            Some((v, m)) => (v.clone(), m.clone()),
            None => ("empty".into(), BTreeMap::new()),
        })
    }

    fn lookup(&self, type_url: &str, names: &BTreeSet<String>) -> Option<(String, Resolved)> {
        Some(lookup_in(&self.types, &self.vhosts, type_url, names))
    }
}

impl TranslationCache {
    /// Evicts least recently used entries until at most `bound` remain.
    fn evict_beyond_bound(&mut self) {
        while self.entries.len() > self.stats.bound {
            let Some(oldest) = self.entries.iter().min_by_key(|(_, c)| c.last_used).map(|(k, _)| k.clone()) else {
                return;
            };
            self.entries.remove(&oldest);
            self.stats.evicted_lru += 1;
        }
    }
}

/// When a change seen at `now` is pushed: after [`SETTLE`], and no sooner than
/// [`DEBOUNCE`] after the last push (`last_push`), so a burst costs a push per period.
fn push_at(now: tokio::time::Instant, last_push: Option<tokio::time::Instant>) -> tokio::time::Instant {
    let settled = now + SETTLE;
    match last_push {
        Some(last) => settled.max(last + DEBOUNCE),
        None => settled,
    }
}

/// The node's weft metadata; a stock Envoy without it is a workload of the default
/// namespace, a gRPC client one of the namespace of its Istio-style node id.
fn node_info(node: &Node) -> NodeInfo {
    if grpcgen::is_grpc(node) {
        return grpcgen::node_info(node);
    }
    NodeInfo::from_node(node).unwrap_or_else(|_| NodeInfo {
        id: node.id.clone(),
        name: node.id.clone(),
        namespace: "default".into(),
        ..NodeInfo::default()
    })
}

/// What a translation depends on besides the mesh and registry. Proxies that differ only
/// in name or address get identical xDS: the translator reads the namespace, labels,
/// ports and listener addresses. They share one translation (the expensive part of a
/// push to many identical sidecars). A stock Envoy's translation carries its own peer
/// metadata and no TCP exchange ALPN (`peer_exchange`), so it is its own shape.
fn shape(info: &NodeInfo, node: &Node, registry: &RegistrySnapshot) -> String {
    let inbound = registry.get(&node.id).and_then(|w| w.inbound).or(info.inbound);
    let own = if peer_exchange::needs_header_edits(&node.user_agent_name, info) {
        format!("|envoy:{}|{:?}", node.id, weft_xds::peer::PeerMetadata::from_node(info))
    } else if peer_exchange::is_envoy(&node.user_agent_name) {
        // Its ALPN lists lack the TCP exchange.
        "|envoy".to_string()
    } else if grpcgen::is_grpc(node) {
        "|grpc".to_string()
    } else {
        String::new()
    };
    format!(
        "{}|{:?}|{:?}|{:?}|{:?}|{}|{}|{:?}|{:?}{own}",
        info.namespace,
        info.labels,
        info.ports,
        info.outbound,
        inbound,
        info.on_demand,
        info.is_gateway(),
        info.gateway_ports,
        info.gateway_address
    )
}

/// The mesh with a staged view's resources in place of the store's of the same key.
fn overlay(mesh: &MeshConfig, view: &crate::rollout::staged::StageView) -> MeshConfig {
    let keys: HashSet<weft_api::ResourceKey> = view.overlay.iter().map(|r| r.key()).collect();
    let mut resources: Vec<weft_api::Resource> =
        mesh.resources.iter().filter(|r| !keys.contains(&r.key())).cloned().collect();
    resources.extend(view.overlay.iter().cloned());
    MeshConfig { resources, ..mesh.clone() }
}

/// Workloads added, removed or changed between `old` and `new` (both versions of a
/// changed one).
fn changed_workloads<'a>(old: &'a RegistrySnapshot, new: &'a RegistrySnapshot) -> impl Iterator<Item = &'a Workload> {
    let added_or_changed = new.workloads().filter(move |w| old.get(&w.id) != Some(*w));
    let removed_or_changed = old.workloads().filter(move |w| new.get(&w.id) != Some(*w));
    added_or_changed.chain(removed_or_changed)
}

/// Whether a translation reads `w`: it is an endpoint candidate of some Service or
/// ServiceEntry (label selector in its namespace), or stands for a WorkloadEntry.
fn translations_read(mesh: &MeshConfig, w: &Workload) -> bool {
    if matches!(w.source, WorkloadSource::WorkloadEntry(_)) {
        return true;
    }
    let selects =
        |sel: &BTreeMap<String, String>| !sel.is_empty() && sel.iter().all(|(k, v)| w.labels.get(k) == Some(v));
    mesh.resources.iter().any(|r| {
        r.meta.namespace == w.namespace
            && match &r.spec {
                weft_api::Spec::Service(s) => selects(&s.selector),
                weft_api::Spec::ServiceEntry(se) => se.workload_selector.as_ref().is_some_and(|s| selects(&s.labels)),
                _ => false,
            }
    })
}

impl XdsSource for MeshXdsSource {
    fn resources(&self, node: &Node, type_url: &str) -> (String, BTreeMap<String, Any>) {
        let types = self.proxy_resources(node);
        match types.get(type_url) {
            Some((v, m)) => (v.clone(), m.clone()),
            None => ("empty".into(), BTreeMap::new()),
        }
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn version(&self, node: &Node, type_url: &str) -> String {
        self.proxy_resources(node).get(type_url).map_or_else(|| "empty".into(), |(v, _)| v.clone())
    }

    fn lookup(&self, node: &Node, type_url: &str, names: &BTreeSet<String>) -> (String, Resolved) {
        let (types, vhosts) = self.translation(node);
        lookup_in(&types, &vhosts, type_url, names)
    }

    fn snapshot(&self, node: &Node, memo: &mut NodeMemo) -> Option<Arc<dyn XdsSnapshot>> {
        let parsed = match memo.as_ref().and_then(|m| m.clone().downcast::<ParsedNode>().ok()) {
            Some(parsed) => parsed,
            None => {
                let parsed = Arc::new(ParsedNode::of(node));
                *memo = Some(parsed.clone());
                parsed
            }
        };
        let (types, vhosts) = self.translation_of(node, &parsed);
        Some(Arc::new(TranslationSnapshot { types, vhosts }))
    }
}

/// Subscribed names resolved in one translation (virtual hosts through its index).
fn lookup_in(types: &TypeMap, vhosts: &VhostIndex, type_url: &str, names: &BTreeSet<String>) -> (String, Resolved) {
    let Some((version, by_name)) = types.get(type_url) else {
        return ("empty".into(), names.iter().map(|n| (n.clone(), None)).collect());
    };
    let resolved = names
        .iter()
        .map(|n| {
            let name = if type_url::resolves_aliases(type_url) { vhosts.resolve(n) } else { Some(n.as_str()) };
            let found = name.and_then(|name| by_name.get(name).map(|any| (name.to_string(), any.clone())));
            (n.clone(), found)
        })
        .collect();
    (version.clone(), resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_after_a_quiet_spell_waits_only_the_settle_time_and_a_burst_once_per_debounce() {
        let now = tokio::time::Instant::now();
        // Never pushed, or quiet for longer than the debounce period: the settle time.
        assert_eq!(push_at(now, None), now + SETTLE);
        assert_eq!(push_at(now, Some(now - Duration::from_secs(1))), now + SETTLE);
        // Soon after a push: a whole period after that push, not after the change.
        let last = now - Duration::from_millis(30);
        assert_eq!(push_at(now, Some(last)), last + DEBOUNCE);
        assert!(SETTLE < DEBOUNCE);
    }
}
