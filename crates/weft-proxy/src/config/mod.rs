//! The proxy's configuration state: xDS resources compiled into immutable snapshots.
//!
//! [`ProxyStore`] is the xDS consumer ([`ResourceHandler`]). Each resource is compiled on
//! its own; a resource that fails to compile is reported in the NACK and its previous
//! version stays in force. After every update a new [`ProxySnapshot`] is built and swapped in
//! atomically; the data path loads it once per request or connection, so a change never
//! disturbs work in flight.

pub mod listener;
pub mod on_demand;
pub mod sockets;
mod warming;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use tokio::sync::watch;
use tracing::warn;
use weft_xds::{type_url, ResourceHandler, ResourceUpdate};

use crate::cluster::{resolve_dns, Cluster, ClusterConfig, Discovery, LoadRegistry};
use crate::route::RouteTable;
pub use listener::{
    ChainKind, ConnFacts, Direction, FilterChainConfig, HttpChain, ListenerConfig, RouteSource, TcpChain,
};
use on_demand::{OnDemand, OnDemandView};

/// One immutable view of everything the proxy runs.
#[derive(Default)]
pub struct ProxySnapshot {
    /// Listeners by name.
    pub listeners: BTreeMap<String, Arc<ListenerConfig>>,
    /// Route configurations by name.
    pub routes: BTreeMap<String, Arc<RouteTable>>,
    /// Clusters (with their endpoints) by name.
    pub clusters: BTreeMap<String, Arc<Cluster>>,
    /// Accepted version per type URL.
    pub versions: BTreeMap<String, String>,
    /// When this snapshot was built.
    pub built_at: Option<SystemTime>,
    /// Raw resources, for `/config_dump` (route configurations with the virtual hosts
    /// received on demand).
    pub raw: RawResources,
    /// What on-demand fetching has answered (see [`on_demand`]).
    pub on_demand: Arc<OnDemandView>,
    /// Counts published snapshots (0 before the first): open connections re-resolve their
    /// filter chain when it moves (see `conn.rs`).
    pub generation: u64,
}

/// The last accepted resources as received, for `/config_dump`.
#[derive(Default, Clone)]
pub struct RawResources {
    /// Listeners.
    pub listeners: BTreeMap<String, Listener>,
    /// Route configurations.
    pub routes: BTreeMap<String, RouteConfiguration>,
    /// Clusters.
    pub clusters: BTreeMap<String, PbCluster>,
    /// Endpoints, by CLA name.
    pub endpoints: BTreeMap<String, ClusterLoadAssignment>,
}

impl ProxySnapshot {
    /// The route table an HTTP chain uses.
    pub fn route_table(&self, chain: &HttpChain) -> Option<Arc<RouteTable>> {
        match &chain.routes {
            RouteSource::Inline(t) => Some(t.clone()),
            RouteSource::Rds(name) => self.routes.get(name).cloned(),
        }
    }

    /// A bound listener's config, and for `use_original_dst` listeners the listener
    /// claiming the original destination (exact address first, then wildcard address
    /// with the same port), as Envoy does.
    pub fn listener_for(&self, bound: &str, original_dst: Option<std::net::SocketAddr>) -> Option<Arc<ListenerConfig>> {
        let l = self.listeners.get(bound)?;
        if let (true, Some(dst)) = (l.use_original_dst, original_dst) {
            let virt = self.listeners.values().filter(|v| !v.bind && v.address.port() == dst.port());
            let mut wildcard = None;
            for v in virt {
                if v.address.ip() == dst.ip() {
                    return Some(v.clone());
                }
                if v.address.ip().is_unspecified() {
                    wildcard = Some(v.clone());
                }
            }
            if wildcard.is_some() {
                return wildcard;
            }
        }
        Some(l.clone())
    }
}

#[derive(Default)]
struct State {
    raw: RawResources,
    listeners: BTreeMap<String, Arc<ListenerConfig>>,
    routes: BTreeMap<String, Arc<RouteTable>>,
    cluster_configs: BTreeMap<String, Arc<ClusterConfig>>,
    clusters: BTreeMap<String, Arc<Cluster>>,
    versions: BTreeMap<String, String>,
    on_demand: OnDemand,
    /// Route configurations serving their previous table until the clusters their new one
    /// sends to have endpoints ([`warming`]).
    warming: warming::Warming,
}

/// The xDS consumer: owns compiled state and publishes snapshots.
pub struct ProxyStore {
    me: Weak<ProxyStore>,
    state: Mutex<State>,
    current: ArcSwap<ProxySnapshot>,
    loads: LoadRegistry,
    changed: watch::Sender<u64>,
    /// The mesh's SDS secrets (`default`, `ROOTCA`) as this proxy resolves them.
    secrets: crate::tls::Secrets,
    /// Ticks when a request asked for something on demand.
    interest: watch::Sender<u64>,
    /// Fetches on demand (fixed at creation; also in `State` for the xDS side).
    on_demand: bool,
    /// The listeners' bound sockets.
    sockets: sockets::ListenSockets,
    /// The local rate limit filters' token buckets, kept across configuration updates.
    pub rate_limit_buckets: crate::ratelimit::bucket::BucketRegistry,
}

/// How often STRICT_DNS / LOGICAL_DNS clusters are re-resolved (Envoy's default
/// `dns_refresh_rate`).
const DNS_REFRESH: Duration = Duration::from_secs(5);

impl ProxyStore {
    /// An empty store that subscribes to CDS and LDS as wildcards.
    pub fn new() -> Arc<Self> {
        Self::with_options(false, crate::tls::Secrets::default())
    }

    /// An empty store; with `on_demand` it fetches virtual hosts (VHDS), clusters and
    /// endpoints by the names its listeners, routes and requests need (delta xDS only).
    pub fn with_on_demand(on_demand: bool) -> Arc<Self> {
        Self::with_options(on_demand, crate::tls::Secrets::default())
    }

    /// An empty store resolving SDS secrets through `secrets` (a proxy with a mesh
    /// identity; it then also subscribes to the `ROOTCA` trust bundle), fetching on
    /// demand when `on_demand` (see [`ProxyStore::with_on_demand`]).
    pub fn with_options(on_demand: bool, secrets: crate::tls::Secrets) -> Arc<Self> {
        let mut state = State::default();
        state.on_demand.enabled = on_demand;
        Arc::new_cyclic(|me| ProxyStore {
            me: me.clone(),
            state: Mutex::new(state),
            current: ArcSwap::from_pointee(ProxySnapshot::default()),
            loads: LoadRegistry::new(),
            changed: watch::channel(0).0,
            secrets,
            interest: watch::channel(0).0,
            on_demand,
            sockets: sockets::ListenSockets::default(),
            rate_limit_buckets: Default::default(),
        })
    }

    /// Feeds the `ROOTCA` secret's trust bundle to the certificate manager; other names
    /// (a gateway's `credentialName`s) go to the named secrets, read per handshake.
    fn apply_secrets(&self, update: ResourceUpdate) -> Vec<String> {
        let Some(manager) = self.secrets.manager() else {
            return vec!["this proxy has no mesh identity and takes no secrets".into()];
        };
        let mut errors = Vec::new();
        let mut named = Vec::new();
        for (name, any) in &update.upserts {
            if name == crate::tls::DEFAULT_SECRET {
                continue;
            }
            if name != crate::tls::ROOT_SECRET {
                named.push((name.clone(), any.clone()));
                continue;
            }
            match crate::tls::trust_bundle(any) {
                Ok(roots) => manager.set_trust_bundle(roots),
                Err(e) => errors.push(format!("secret {name:?}: {e}")),
            }
        }
        errors.extend(self.secrets.named().apply(&named, &update.removals));
        errors
    }

    /// Ticks the interest watch when listeners or clusters started naming new SDS secrets.
    fn note_secret_interest(&self, before: usize) {
        if self.secrets.named().wanted().len() != before {
            self.interest.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// True when the store fetches on demand.
    pub fn is_on_demand(&self) -> bool {
        self.on_demand
    }

    /// True once CDS has nothing to wait for: on demand, no listener or route names a
    /// cluster yet (so no CDS subscription exists).
    pub fn cds_optional(&self) -> bool {
        let st = self.lock();
        st.on_demand.enabled && Self::cluster_interest(&st).is_empty()
    }

    /// Resolves a DNS cluster now and every [`DNS_REFRESH`] while its config is the
    /// current one, swapping in the resolved endpoints.
    fn watch_dns(&self, name: String, cfg: Arc<ClusterConfig>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            warn!(cluster = %name, "no runtime to resolve DNS cluster");
            return;
        };
        let me = self.me.clone();
        rt.spawn(async move {
            loop {
                let resolved = resolve_dns(&cfg).await;
                let Some(store) = me.upgrade() else { return };
                {
                    let mut st = store.lock();
                    let current = st.cluster_configs.get(&name).map(|c| Arc::ptr_eq(c, &cfg)).unwrap_or(false);
                    if !current {
                        return;
                    }
                    match resolved {
                        Ok(Some(cla)) => match Cluster::new(cfg.clone(), Some(&cla), &store.loads) {
                            Ok(c) => {
                                st.clusters.insert(name.clone(), Arc::new(c));
                                store.publish(&st);
                            }
                            Err(e) => warn!(cluster = %name, error = %e, "resolved endpoints rejected"),
                        },
                        Ok(None) => return,
                        Err(e) => {
                            warn!(cluster = %name, error = %e, "DNS resolution failed; keeping previous endpoints")
                        }
                    }
                }
                drop(store);
                tokio::time::sleep(DNS_REFRESH).await;
            }
        });
    }

    /// The current snapshot (lock-free).
    pub fn snapshot(&self) -> Arc<ProxySnapshot> {
        self.current.load_full()
    }

    /// True once every route configuration a listener names and every EDS cluster's
    /// endpoints have arrived (Envoy's warming), so traffic will not meet gaps. Not named
    /// after warming: BOLT (`scripts/bolt-proxy.sh`) takes a symbol with `.warm` or `.cold`
    /// in it for a piece of a split function, and refuses the binary.
    pub fn ready_for_traffic(&self) -> bool {
        let st = self.lock();
        let routes_ok = st.listeners.values().flat_map(|l| l.rds_names()).all(|n| st.routes.contains_key(n));
        let endpoints_ok = st
            .cluster_configs
            .values()
            .filter_map(|c| cla_name(c))
            .all(|n| st.raw.endpoints.contains_key(&n) || st.on_demand.missing_endpoints.contains(&n));
        // On demand, the clusters listeners name are fetched by name: wait for them too.
        let clusters_ok = !st.on_demand.enabled
            || st.listeners.values().flat_map(|l| l.cluster_names()).all(|n| st.cluster_configs.contains_key(&n));
        routes_ok && endpoints_ok && clusters_ok
    }

    /// A receiver that ticks whenever a new snapshot is published.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves State consistent (every mutation below is
        // a single map insert/remove), so a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, st: &State) {
        let generation = *self.changed.borrow() + 1;
        let routes = if st.warming.is_empty() { st.routes.clone() } else { st.warming.served(&st.routes) };
        let snap = ProxySnapshot {
            listeners: st.listeners.clone(),
            routes,
            clusters: st.clusters.clone(),
            versions: st.versions.clone(),
            built_at: Some(SystemTime::now()),
            raw: st.raw.clone(),
            on_demand: Arc::new(st.on_demand.view(st)),
            generation,
        };
        self.current.store(Arc::new(snap));
        self.changed.send_replace(generation);
    }

    /// Keeps serving the previous table of each route configuration whose update newly
    /// sends traffic to a cluster without endpoints yet ([`warming`]), and schedules the
    /// release at [`warming::ROUTE_WARMING_LIMIT`]. Without a runtime to time it, nothing
    /// is held.
    fn hold_cold_routes(&self, st: &mut State, before: &BTreeMap<String, Arc<RouteTable>>) {
        let held = warming::hold_after_routes(st, before, tokio::time::Instant::now());
        if held.is_empty() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            st.warming = warming::Warming::default();
            return;
        };
        for (name, clusters) in &held {
            tracing::info!(route_configuration = %name, ?clusters, "new routes wait for the endpoints of the clusters they send to");
        }
        let me = self.me.clone();
        rt.spawn(async move {
            tokio::time::sleep(warming::ROUTE_WARMING_LIMIT).await;
            let Some(store) = me.upgrade() else { return };
            let st = &mut *store.lock();
            if warming::release(st, tokio::time::Instant::now()) {
                store.publish(st);
            }
        });
    }

    /// The socket bound for listener `name` (see [`sockets`]) and its configured address.
    pub fn listener_socket(&self, name: &str) -> Option<(std::net::SocketAddr, Arc<std::net::TcpListener>)> {
        self.sockets.get(name)
    }

    /// Closes the listeners' sockets once the proxy stops accepting (drain).
    pub fn close_listener_sockets(&self) {
        self.sockets.close();
    }

    fn apply_listeners(&self, st: &mut State, update: ResourceUpdate) -> Vec<String> {
        let errors = apply_each(&update, "listener", &mut st.raw.listeners, &mut st.listeners, |l: &Listener| {
            let compiled = ListenerConfig::compile_in(l, &self.secrets).map_err(|e| e.to_string())?;
            // Envoy refuses a tracing provider whose collector cluster it does not know
            // (on demand, clusters arrive later: a missing one only drops spans).
            if !st.on_demand.enabled {
                for (at, cluster) in compiled.tracing_clusters() {
                    if !st.cluster_configs.contains_key(&cluster) {
                        return Err(format!(
                            "listener {:?}: {at}.tracing.provider: unknown collector cluster {cluster:?}; the cluster must come with CDS before the listener",
                            compiled.name
                        ));
                    }
                }
            }
            if compiled.bind {
                // Bound before the ACK, so a listener that cannot listen is NACKed.
                self.sockets
                    .ensure(&compiled.name, compiled.address)
                    .map_err(|e| format!("listener {:?}: field address: {e}", compiled.name))?;
            }
            Ok(compiled)
        });
        self.sockets.retain(|name| st.listeners.get(name).filter(|l| l.bind).map(|l| l.address));
        errors
    }

    fn apply_clusters(&self, st: &mut State, update: ResourceUpdate) -> Vec<String> {
        let mut errors = Vec::new();
        let mut seen = BTreeSet::new();
        for (name, any) in &update.upserts {
            seen.insert(name.clone());
            let compiled =
                crate::proto::decode::<PbCluster>(any).map_err(|m| format!("cluster {name:?}: {m}")).and_then(|c| {
                    ClusterConfig::compile_in(&c, &self.secrets).map(|cc| (c, cc)).map_err(|e| e.to_string())
                });
            match compiled {
                Ok((raw, cfg)) => {
                    let cfg = Arc::new(cfg);
                    let dns = matches!(cfg.discovery, Discovery::StrictDns | Discovery::LogicalDns);
                    // DNS clusters start empty and fill in once resolved (in the background).
                    let empty = ClusterLoadAssignment { cluster_name: name.clone(), ..Default::default() };
                    let cla = if dns { Some(&empty) } else { cla_name(&cfg).and_then(|n| st.raw.endpoints.get(&n)) };
                    match Cluster::new(cfg.clone(), cla, &self.loads) {
                        Ok(cluster) => {
                            st.raw.clusters.insert(name.clone(), raw);
                            st.cluster_configs.insert(name.clone(), cfg.clone());
                            st.clusters.insert(name.clone(), Arc::new(cluster));
                            if dns {
                                self.watch_dns(name.clone(), cfg);
                            }
                        }
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        for name in removed(&update, &seen, st.cluster_configs.keys()) {
            st.cluster_configs.remove(&name);
            st.clusters.remove(&name);
            st.raw.clusters.remove(&name);
        }
        errors
    }

    fn apply_endpoints(&self, st: &mut State, update: ResourceUpdate) -> Vec<String> {
        let mut errors = Vec::new();
        let mut touched = BTreeSet::new();
        for (name, any) in &update.upserts {
            match crate::proto::decode::<ClusterLoadAssignment>(any) {
                Ok(cla) => {
                    // Validate against every cluster using it before accepting.
                    let users: Vec<(String, Arc<ClusterConfig>)> = st
                        .cluster_configs
                        .iter()
                        .filter(|(_, c)| cla_name(c).as_deref() == Some(name.as_str()))
                        .map(|(n, c)| (n.clone(), c.clone()))
                        .collect();
                    let mut built = Vec::new();
                    let mut failed = None;
                    for (cname, cfg) in users {
                        match Cluster::new(cfg, Some(&cla), &self.loads) {
                            Ok(c) => built.push((cname, c)),
                            Err(e) => {
                                failed = Some(format!("endpoints {name:?}: {e}"));
                                break;
                            }
                        }
                    }
                    match failed {
                        Some(e) => errors.push(e),
                        None => {
                            for (cname, c) in built {
                                st.clusters.insert(cname, Arc::new(c));
                            }
                            st.raw.endpoints.insert(name.clone(), cla);
                            touched.insert(name.clone());
                        }
                    }
                }
                Err(m) => errors.push(format!("endpoints {name:?}: {m}")),
            }
        }
        for name in &update.removals {
            if st.raw.endpoints.remove(name).is_some() {
                let users: Vec<(String, Arc<ClusterConfig>)> = st
                    .cluster_configs
                    .iter()
                    .filter(|(_, c)| cla_name(c).as_deref() == Some(name.as_str()))
                    .map(|(n, c)| (n.clone(), c.clone()))
                    .collect();
                for (cname, cfg) in users {
                    if let Ok(c) = Cluster::new(cfg, None, &self.loads) {
                        st.clusters.insert(cname, Arc::new(c));
                    }
                }
            }
        }
        errors
    }
}

/// The CLA name an EDS cluster subscribes to.
fn cla_name(c: &ClusterConfig) -> Option<String> {
    match &c.discovery {
        Discovery::Eds { service_name } => {
            Some(if service_name.is_empty() { c.name.clone() } else { service_name.clone() })
        }
        _ => None,
    }
}

/// Applies an update to a type whose resources compile on their own: each good
/// resource replaces its previous version, each bad one is reported and leaves its
/// previous version in force; removals (and, for full-state updates, absences) drop both
/// the raw and the compiled form.
fn apply_each<P, C>(
    update: &ResourceUpdate,
    kind: &str,
    raw: &mut BTreeMap<String, P>,
    compiled: &mut BTreeMap<String, Arc<C>>,
    compile: impl Fn(&P) -> Result<C, String>,
) -> Vec<String>
where
    P: prost::Message + prost::Name + Default,
{
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    for (name, any) in &update.upserts {
        seen.insert(name.clone());
        match crate::proto::decode::<P>(any)
            .map_err(|m| format!("{kind} {name:?}: {m}"))
            .and_then(|p| compile(&p).map(|c| (p, c)))
        {
            Ok((p, c)) => {
                raw.insert(name.clone(), p);
                compiled.insert(name.clone(), Arc::new(c));
            }
            Err(e) => errors.push(e),
        }
    }
    for name in removed(update, &seen, compiled.keys()) {
        compiled.remove(&name);
        raw.remove(&name);
    }
    errors
}

/// Names to remove after an update: explicit removals, plus (full state) everything not
/// in the update.
fn removed<'a>(
    update: &ResourceUpdate,
    seen: &BTreeSet<String>,
    existing: impl Iterator<Item = &'a String>,
) -> Vec<String> {
    let mut out: Vec<String> = update.removals.clone();
    if update.full_state {
        out.extend(existing.filter(|n| !seen.contains(*n)).cloned());
    }
    out
}

impl ResourceHandler for ProxyStore {
    fn type_urls(&self) -> Vec<&'static str> {
        let mut types = vec![type_url::CLUSTER, type_url::ENDPOINT, type_url::LISTENER, type_url::ROUTE];
        if self.secrets.manager().is_some() {
            types.push(type_url::SECRET);
        }
        if self.is_on_demand() {
            types.push(type_url::VIRTUAL_HOST);
        }
        types
    }

    fn apply(&self, type_url: &str, update: ResourceUpdate) -> Result<(), String> {
        let mut st = self.lock();
        let version = update.version.clone();
        let wanted_before = self.secrets.named().wanted().len();
        let errors = match type_url {
            type_url::LISTENER => self.apply_listeners(&mut st, update),
            type_url::ROUTE | type_url::VIRTUAL_HOST => {
                let before = st.routes.clone();
                let errors = if type_url == type_url::ROUTE {
                    on_demand::apply_routes(&mut st, &update)
                } else {
                    on_demand::apply_vhosts(&mut st, &update)
                };
                self.hold_cold_routes(&mut st, &before);
                errors
            }
            type_url::CLUSTER => {
                on_demand::note_absent(&mut st, true, &update);
                let errors = self.apply_clusters(&mut st, update);
                warming::release(&mut st, tokio::time::Instant::now());
                errors
            }
            type_url::ENDPOINT => {
                on_demand::note_absent(&mut st, false, &update);
                let errors = self.apply_endpoints(&mut st, update);
                warming::release(&mut st, tokio::time::Instant::now());
                errors
            }
            type_url::SECRET => self.apply_secrets(update),
            other => vec![format!("unsupported resource type {other}")],
        };
        if errors.is_empty() {
            st.versions.insert(type_url.to_string(), version);
        }
        self.note_secret_interest(wanted_before);
        self.publish(&st);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    fn interest(&self, type_url: &str) -> Option<BTreeSet<String>> {
        let st = self.lock();
        match type_url {
            type_url::ROUTE => Some(st.listeners.values().flat_map(|l| l.rds_names().map(str::to_string)).collect()),
            type_url::ENDPOINT => Some(st.cluster_configs.values().filter_map(|c| cla_name(c)).collect()),
            type_url::SECRET => {
                let mut names = self.secrets.named().wanted();
                names.insert(crate::tls::ROOT_SECRET.to_string());
                Some(names)
            }
            type_url::CLUSTER if st.on_demand.enabled => Some(Self::cluster_interest(&st)),
            type_url::VIRTUAL_HOST => Some(Self::vhost_interest(&st)),
            _ => None,
        }
    }

    fn interest_changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.interest.subscribe())
    }
}
