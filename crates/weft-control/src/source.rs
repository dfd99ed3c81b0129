//! The xDS a control plane serves: each proxy's view of the store and the registry, run
//! through the translator, cached per proxy and input version, with one version string
//! per resource type derived from its content (so a change re-pushes only the types it
//! touched, and delta clients get per-resource versions from the server).
//!
//! On-demand proxies (delta, `WEFT_ON_DEMAND`) subscribe by name; [`ConfigSource::lookup`]
//! answers them from the cached translation by name (virtual hosts through a domain
//! index), so a proxy asking for one host never costs a copy of the whole mesh.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use tokio::sync::watch;
use weft_xds::vhds::VhostIndex;
use weft_xds::{content_version, type_url, Any, ConfigSource, NodeInfo, Resolved};

use crate::jwks::JwksResolver;
use crate::registry::Registry;
use crate::store::Store;
use crate::translate::{translate, MeshConfig, ProxyMode};

/// Coalesces bursts of changes (a directory of files saved together, many proxies
/// connecting) into one push.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Versions of the translator's inputs besides the registry: (store, fetched JWKS).
type MeshVersions = (u64, u64);

type TypeMap = BTreeMap<String, (String, BTreeMap<String, Any>)>;

struct Cached {
    inputs: (MeshVersions, u64),
    types: Arc<TypeMap>,
    /// VHDS resources by route configuration and domain (empty unless on demand).
    vhosts: Arc<VhostIndex>,
}

/// A [`ConfigSource`] over the store and registry.
pub struct MeshSource {
    store: Arc<Store>,
    registry: Registry,
    mode: ProxyMode,
    defaults: MeshConfig,
    /// The mesh by (store version, JWKS version).
    mesh: Mutex<Option<(MeshVersions, Arc<MeshConfig>)>>,
    /// JWKS documents of RequestAuthentications' `jwksUri`s, inlined by the translator.
    jwks: Arc<JwksResolver>,
    /// Translations by proxy shape (see [`MeshSource::proxy_resources`]).
    cache: Mutex<HashMap<String, Cached>>,
    changes: watch::Sender<u64>,
}

impl MeshSource {
    /// A source; `defaults` gives everything but the resources (domain, policies).
    /// Spawns the task that turns store and registry changes into pushes.
    pub fn new(store: Arc<Store>, registry: Registry, mode: ProxyMode, defaults: MeshConfig) -> Arc<Self> {
        let me = Arc::new(MeshSource {
            store,
            registry,
            mode,
            defaults,
            mesh: Mutex::new(None),
            jwks: JwksResolver::start(crate::jwks::DEFAULT_REFRESH, crate::jwks::DEFAULT_TIMEOUT),
            cache: Mutex::new(HashMap::new()),
            changes: watch::channel(0).0,
        });
        let weak = Arc::downgrade(&me);
        let mut store_rx = me.store.subscribe();
        let mut reg_rx = me.registry.changes();
        let mut jwks_rx = me.jwks.changes();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = store_rx.changed() => if r.is_err() { return },
                    r = reg_rx.changed() => if r.is_err() { return },
                    r = jwks_rx.changed() => if r.is_err() { return },
                }
                tokio::time::sleep(DEBOUNCE).await;
                let _ = store_rx.borrow_and_update();
                let _ = reg_rx.borrow_and_update();
                let _ = jwks_rx.borrow_and_update();
                let Some(me) = weak.upgrade() else { return };
                me.changes.send_modify(|v| *v += 1);
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

    /// Everything one proxy gets now, by type URL.
    pub fn proxy_resources(&self, node: &Node) -> Arc<TypeMap> {
        self.translation(node).0
    }

    /// The proxy's translation and its virtual-host index (cached per proxy shape).
    fn translation(&self, node: &Node) -> (Arc<TypeMap>, Arc<VhostIndex>) {
        let info = NodeInfo::from_node(node).unwrap_or_else(|_| NodeInfo {
            // A stock Envoy without weft metadata: a workload of the default namespace.
            id: node.id.clone(),
            name: node.id.clone(),
            namespace: "default".into(),
            ..NodeInfo::default()
        });
        let (store_version, mesh) = self.mesh();
        let registry = self.registry.snapshot();
        let inputs = (store_version, registry.version());
        // Proxies that differ only in name or address get identical xDS: the translator
        // reads the namespace, labels, ports and listener addresses. They share one
        // translation (the expensive part of a push to many identical sidecars).
        let inbound = registry.get(&node.id).and_then(|w| w.inbound).or(info.inbound);
        let shape = format!(
            "{}|{:?}|{:?}|{:?}|{:?}|{}|{}|{:?}|{:?}",
            info.namespace,
            info.labels,
            info.ports,
            info.outbound,
            inbound,
            info.on_demand,
            info.is_gateway(),
            info.gateway_ports,
            info.gateway_address
        );
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cache.get(&shape) {
                if c.inputs == inputs {
                    return (c.types.clone(), c.vhosts.clone());
                }
            }
        }
        let xds = translate(&mesh, &registry, &info, self.mode);
        let vhosts = Arc::new(VhostIndex::build(xds.virtual_hosts.iter().map(|vh| (vh.name.as_str(), vh))));
        let mut types: TypeMap = BTreeMap::new();
        for (type_url, anys) in xds.into_resources() {
            let mut by_name = BTreeMap::new();
            for any in anys {
                if let Ok(name) = weft_xds::resource_name(type_url, &any) {
                    by_name.insert(name, any);
                }
            }
            let digest: String = by_name.iter().map(|(n, a)| format!("{n}={};", content_version(a))).collect();
            let version = content_version(&Any { type_url: type_url.to_string(), value: digest.into_bytes() });
            types.insert(type_url.to_string(), (version, by_name));
        }
        let types = Arc::new(types);
        let cached = Cached { inputs, types: types.clone(), vhosts: vhosts.clone() };
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(shape, cached);
        (types, vhosts)
    }
}

impl ConfigSource for MeshSource {
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

    fn lookup(&self, node: &Node, type_url: &str, names: &BTreeSet<String>) -> (String, Resolved) {
        let (types, vhosts) = self.translation(node);
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
}
