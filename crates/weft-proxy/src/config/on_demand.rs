//! On-demand configuration (delta xDS): virtual hosts fetched per host over VHDS,
//! clusters and endpoints subscribed by the names the proxy's listeners and routes use,
//! so the proxy's memory follows the services it talks to, not the size of the mesh.
//!
//! - Route configurations are kept as received; the compiled [`RouteTable`] is built
//!   from the route configuration followed by the virtual hosts received for it over
//!   VHDS (Envoy's rebuild), and swapped in with the rest of the [`ProxySnapshot`].
//! - A request whose authority has no virtual host of its own in a `vhds` table
//!   subscribes `<route configuration>/<authority>` ([`ProxyStore::await_vhost`]) and
//!   waits until the control plane answers (the virtual host, or "none") or
//!   [`ON_DEMAND_TIMEOUT`]. Requests for the same host share the subscription.
//! - A request routed to a cluster that is not warm yet (not received, or an EDS cluster
//!   without its endpoints) waits for it the same way ([`ProxyStore::await_cluster`]).
//! - Known hosts and warm clusters take no lock: the checks read the snapshot.
//! - Authorities are chosen by clients, so the hosts remembered are bounded
//!   ([`MAX_HOSTS`] by default): past the bound, a new host makes the proxy forget (and
//!   unsubscribe) one, first among hosts the control plane said do not exist, then among
//!   hosts it resolved, then among those still unanswered, the least recently used first;
//!   each is counted in `weft_on_demand_host_evictions_total`. A forgotten host that
//!   comes back is simply asked for again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
use weft_xds::{vhds as names, ResourceUpdate};

use super::{cla_name, ProxySnapshot, ProxyStore, State};
use crate::route::vhds::merged;
use crate::route::RouteTable;

/// How long a request waits for a virtual host or a cluster fetched on demand.
pub const ON_DEMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// How many hosts (aliases `<route configuration>/<authority>`) on-demand discovery
/// remembers by default before it forgets the least useful one.
pub const MAX_HOSTS: usize = 4096;

/// On-demand bookkeeping of the config store.
pub(super) struct OnDemand {
    /// Subscriptions by name (delta xDS with VHDS) rather than wildcard CDS.
    pub(super) enabled: bool,
    /// Route configurations as received, by name.
    rds: BTreeMap<String, RouteConfiguration>,
    /// Virtual hosts received over VHDS: route configuration -> resource name -> vhost.
    vhosts: BTreeMap<String, BTreeMap<String, VirtualHost>>,
    /// Aliases (`<route configuration>/<host>`) requests asked for, at most `max_hosts`.
    aliases: BTreeMap<String, Alias>,
    /// The bound on `aliases`.
    max_hosts: usize,
    /// Aliases forgotten to stay within the bound.
    evictions: Counter,
    /// Clusters requests asked for beyond those listeners and routes name.
    wanted_clusters: BTreeSet<String>,
    /// Cluster names the control plane reported absent.
    missing_clusters: BTreeSet<String>,
    /// Endpoint (CLA) names the control plane reported absent.
    pub(super) missing_endpoints: BTreeSet<String>,
}

impl Default for OnDemand {
    fn default() -> Self {
        OnDemand {
            enabled: false,
            rds: BTreeMap::new(),
            vhosts: BTreeMap::new(),
            aliases: BTreeMap::new(),
            max_hosts: MAX_HOSTS,
            evictions: Counter::default(),
            wanted_clusters: BTreeSet::new(),
            missing_clusters: BTreeSet::new(),
            missing_endpoints: BTreeSet::new(),
        }
    }
}

/// One host alias a request asked for.
struct Alias {
    /// What the control plane answered: `None` while waiting, `Some(None)` for "no such
    /// host", else the virtual host it resolved to.
    answer: Option<Option<String>>,
    /// When it was last used ([`tick`]); shared with the published views so the data
    /// path can mark a use without the lock.
    used: Arc<AtomicU64>,
}

/// Answered aliases as the data path sees them, each with its last use.
#[derive(Debug, Default)]
pub struct AnsweredHosts(BTreeMap<String, Arc<AtomicU64>>);

impl AnsweredHosts {
    /// True when the control plane has answered `alias` (found or not).
    pub fn contains(&self, alias: &str) -> bool {
        self.0.contains_key(alias)
    }

    /// How many aliases are answered.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when none is.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Like [`AnsweredHosts::contains`], and marks `alias` as used now.
    fn touch(&self, alias: &str) -> bool {
        match self.0.get(alias) {
            Some(used) => {
                used.store(tick(), Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

/// A request gave up waiting for on-demand configuration.
#[derive(Debug, thiserror::Error)]
#[error("{what} did not arrive within {timeout:?} (on-demand discovery)")]
pub struct OnDemandTimeout {
    /// What was awaited, e.g. `virtual host "weft-outbound/reviews:9080"`.
    pub what: String,
    /// How long the request waited.
    pub timeout: Duration,
}

/// What the data path reads to decide whether it must wait, published with each snapshot.
#[derive(Debug, Default)]
pub struct OnDemandView {
    /// Aliases the control plane has answered (found or not).
    pub answered: AnsweredHosts,
    /// EDS clusters whose endpoints have not arrived.
    pub warming: BTreeSet<String>,
    /// Clusters the control plane reported absent.
    pub missing_clusters: BTreeSet<String>,
    /// Virtual hosts received over VHDS, over all route configurations.
    pub vhosts: usize,
}

impl ProxySnapshot {
    /// True when `cluster` is present and, if it uses EDS, has its endpoints.
    pub fn cluster_warm(&self, cluster: &str) -> bool {
        self.clusters.contains_key(cluster) && !self.on_demand.warming.contains(cluster)
    }
}

impl OnDemand {
    /// The published view.
    pub(super) fn view(&self, st: &State) -> OnDemandView {
        let warming = st
            .cluster_configs
            .iter()
            .filter_map(|(n, c)| cla_name(c).map(|cla| (n, cla)))
            .filter(|(_, cla)| !st.raw.endpoints.contains_key(cla) && !self.missing_endpoints.contains(cla))
            .map(|(n, _)| n.clone())
            .collect();
        OnDemandView {
            answered: AnsweredHosts(
                self.aliases
                    .iter()
                    .filter(|(_, a)| a.answer.is_some())
                    .map(|(n, a)| (n.clone(), a.used.clone()))
                    .collect(),
            ),
            warming,
            missing_clusters: self.missing_clusters.clone(),
            vhosts: self.vhosts.values().map(BTreeMap::len).sum(),
        }
    }

    /// Remembers `alias` (a new one is marked used now); when that goes past the bound,
    /// forgets the least useful other alias. True when `alias` is new.
    fn want_alias(&mut self, alias: &str) -> bool {
        if self.aliases.contains_key(alias) {
            return false;
        }
        while self.aliases.len() >= self.max_hosts.max(1) {
            let Some(victim) = self.eviction_victim() else { break };
            self.aliases.remove(&victim);
            self.evictions.inc();
        }
        self.aliases.insert(alias.to_string(), Alias { answer: None, used: Arc::new(AtomicU64::new(tick())) });
        true
    }

    /// The alias to forget first: hosts answered "no such host", then resolved hosts,
    /// then unanswered ones (a request may be waiting for those); least recently used
    /// first within each.
    fn eviction_victim(&self) -> Option<String> {
        let class = |a: &Alias| match &a.answer {
            Some(None) => 0,
            Some(Some(_)) => 1,
            None => 2,
        };
        self.aliases.iter().min_by_key(|(_, a)| (class(a), a.used.load(Ordering::Relaxed))).map(|(n, _)| n.clone())
    }
}

/// A logical clock for "last used" (only the order matters).
fn tick() -> u64 {
    static CLOCK: AtomicU64 = AtomicU64::new(0);
    CLOCK.fetch_add(1, Ordering::Relaxed)
}

impl ProxyStore {
    /// For an on-demand table without a virtual host of its own for `authority`: asks
    /// the control plane for `<table>/<authority>` (once, whoever asks) and waits for the
    /// answer. Returns the snapshot and table to route with when they changed, `None`
    /// when nothing had to be fetched.
    pub async fn await_vhost(
        &self,
        snap: &Arc<ProxySnapshot>,
        table: &Arc<RouteTable>,
        authority: &str,
    ) -> Result<Option<(Arc<ProxySnapshot>, Arc<RouteTable>)>, OnDemandTimeout> {
        if !table.on_demand() || table.has_specific_vhost(authority) {
            return Ok(None);
        }
        let alias = names::alias(table.name(), authority);
        if snap.on_demand.answered.touch(&alias) {
            return Ok(None);
        }
        let mut rx = self.subscribe();
        self.want(|st| st.on_demand.want_alias(&alias));
        let what = format!("virtual host {alias:?}");
        let s = self.wait_until(&mut rx, &what, |s| s.on_demand.answered.contains(&alias)).await?;
        let fresh = s.routes.get(table.name()).cloned().unwrap_or_else(|| table.clone());
        Ok(Some((s, fresh)))
    }

    /// For a cluster that is not warm: makes sure it is subscribed and waits until it is
    /// warm or reported absent. `None` when nothing is fetched on demand here.
    pub async fn await_cluster(
        &self,
        snap: &Arc<ProxySnapshot>,
        cluster: &str,
    ) -> Result<Option<Arc<ProxySnapshot>>, OnDemandTimeout> {
        if snap.cluster_warm(cluster) || snap.on_demand.missing_clusters.contains(cluster) {
            return Ok(None);
        }
        if !self.is_on_demand() {
            return Ok(None);
        }
        let mut rx = self.subscribe();
        // Usually a route names it and it is subscribed already; otherwise ask for it.
        self.want(|st| {
            !Self::cluster_interest(st).contains(cluster) && st.on_demand.wanted_clusters.insert(cluster.to_string())
        });
        let what = format!("cluster {cluster:?}");
        let ready = |s: &ProxySnapshot| s.cluster_warm(cluster) || s.on_demand.missing_clusters.contains(cluster);
        self.wait_until(&mut rx, &what, ready).await.map(Some)
    }

    /// Bounds the hosts on-demand discovery remembers (default [`MAX_HOSTS`]); forgets
    /// the least useful ones at once when there are more.
    pub fn set_max_on_demand_hosts(&self, max: usize) {
        let mut st = self.lock();
        st.on_demand.max_hosts = max.max(1);
        let mut evicted = false;
        while st.on_demand.aliases.len() > st.on_demand.max_hosts {
            let Some(victim) = st.on_demand.eviction_victim() else { break };
            st.on_demand.aliases.remove(&victim);
            st.on_demand.evictions.inc();
            evicted = true;
        }
        if evicted {
            self.publish(&st);
            self.interest.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Counts forgotten hosts in `counter` (the proxy's `weft_on_demand_host_evictions`).
    pub fn count_host_evictions_in(&self, counter: Counter) {
        self.lock().on_demand.evictions = counter;
    }

    /// How many hosts on-demand discovery remembers now (answered or waiting).
    pub fn on_demand_hosts(&self) -> usize {
        self.lock().on_demand.aliases.len()
    }

    /// Records a wish; when it is new, tells the xDS client to update the subscription.
    fn want(&self, add: impl FnOnce(&mut State) -> bool) {
        let added = add(&mut self.lock());
        if added {
            self.interest.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    async fn wait_until(
        &self,
        rx: &mut tokio::sync::watch::Receiver<u64>,
        what: &str,
        ready: impl Fn(&ProxySnapshot) -> bool,
    ) -> Result<Arc<ProxySnapshot>, OnDemandTimeout> {
        let deadline = tokio::time::Instant::now() + ON_DEMAND_TIMEOUT;
        loop {
            let s = self.snapshot();
            if ready(&s) {
                return Ok(s);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    return Err(OnDemandTimeout { what: what.to_string(), timeout: ON_DEMAND_TIMEOUT })
                }
            }
        }
    }

    /// Clusters to subscribe to on demand: those listeners and route tables name and
    /// those requests asked for.
    pub(super) fn cluster_interest(st: &State) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = st.listeners.values().flat_map(|l| l.cluster_names()).collect();
        for t in st.routes.values() {
            out.extend(t.cluster_names());
        }
        out.extend(st.on_demand.wanted_clusters.iter().cloned());
        out
    }

    /// Virtual hosts to subscribe to: the aliases requests asked for.
    pub(super) fn vhost_interest(st: &State) -> BTreeSet<String> {
        st.on_demand.aliases.keys().cloned().collect()
    }
}

/// Applies route configurations: each is compiled together with the virtual hosts
/// received for it over VHDS. Without on-demand fetching, `vhds` is refused (it needs
/// delta xDS).
pub(super) fn apply_routes(st: &mut State, update: &ResourceUpdate) -> Vec<String> {
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    for (name, any) in &update.upserts {
        seen.insert(name.clone());
        let rc = match crate::proto::decode::<RouteConfiguration>(any) {
            Ok(rc) => rc,
            Err(m) => {
                errors.push(format!("route configuration {name:?}: {m}"));
                continue;
            }
        };
        if rc.vhds.is_some() && !st.on_demand.enabled {
            errors.push(format!(
                "route configuration {name:?}: field `vhds`: virtual hosts on demand need delta xDS \
                 (bootstrap xds.mode: delta)"
            ));
            continue;
        }
        if let Err(e) = install(st, name, &rc) {
            errors.push(e);
            continue;
        }
        st.on_demand.rds.insert(name.clone(), rc);
    }
    for name in super::removed(update, &seen, st.routes.keys()) {
        st.routes.remove(&name);
        st.raw.routes.remove(&name);
        st.on_demand.rds.remove(&name);
    }
    errors
}

/// Applies virtual hosts received over VHDS (named `<route configuration>/<vhost>`):
/// each joins its route configuration, whose table is rebuilt; one that does not
/// compile with it is refused and the previous version stays. Records what each
/// requested alias resolved to.
pub(super) fn apply_vhosts(st: &mut State, update: &ResourceUpdate) -> Vec<String> {
    let mut errors = Vec::new();
    let mut touched = BTreeSet::new();
    for (name, any) in &update.upserts {
        let Some((rc, _)) = names::split_name(name) else {
            errors.push(format!("virtual host {name:?}: name must be <route configuration>/<virtual host>"));
            continue;
        };
        let vh = match crate::proto::decode::<VirtualHost>(any) {
            Ok(vh) => vh,
            Err(m) => {
                errors.push(format!("virtual host {name:?}: {m}"));
                continue;
            }
        };
        let previous = st.on_demand.vhosts.entry(rc.to_string()).or_default().insert(name.clone(), vh);
        if let Err(e) = rebuild(st, rc) {
            let list = st.on_demand.vhosts.entry(rc.to_string()).or_default();
            match previous {
                Some(p) => list.insert(name.clone(), p),
                None => list.remove(name),
            };
            errors.push(format!("virtual host {name:?}: {e}"));
            continue;
        }
        touched.insert(rc.to_string());
    }
    for name in &update.removals {
        let Some((rc, _)) = names::split_name(name) else { continue };
        if st.on_demand.vhosts.get_mut(rc).and_then(|l| l.remove(name)).is_some() {
            if let Err(e) = rebuild(st, rc) {
                errors.push(format!("virtual host {name:?} removal: {e}"));
            }
        }
    }
    let od = &mut st.on_demand;
    for (alias, target) in &update.resolved {
        if let Some(a) = od.aliases.get_mut(alias) {
            a.answer = Some(target.clone());
        }
    }
    errors
}

/// Records names the control plane reported absent for clusters and endpoints (so
/// requests waiting for them stop), and forgets those that arrived. Removals of names
/// no longer wanted (dropped after unsubscribing) are not absences.
pub(super) fn note_absent(st: &mut State, cluster: bool, update: &ResourceUpdate) {
    let wanted: BTreeSet<String> = if cluster {
        ProxyStore::cluster_interest(st)
    } else {
        st.cluster_configs.values().filter_map(|c| cla_name(c)).collect()
    };
    let set = if cluster { &mut st.on_demand.missing_clusters } else { &mut st.on_demand.missing_endpoints };
    for (name, _) in &update.upserts {
        set.remove(name);
    }
    set.extend(update.removals.iter().filter(|n| wanted.contains(*n)).cloned());
}

/// Recompiles route configuration `rc` (if received) with its on-demand virtual hosts.
fn rebuild(st: &mut State, rc: &str) -> Result<(), String> {
    let Some(base) = st.on_demand.rds.get(rc).cloned() else {
        // Not received yet: check the virtual hosts compile on their own.
        let alone = RouteConfiguration { name: rc.to_string(), ..Default::default() };
        let extra = st.on_demand.vhosts.get(rc).into_iter().flat_map(|l| l.values());
        return RouteTable::compile(&merged(&alone, extra)).map(|_| ()).map_err(|e| e.to_string());
    };
    install(st, rc, &base)
}

/// Compiles `rc` with its on-demand virtual hosts and installs table and merged form.
fn install(st: &mut State, name: &str, rc: &RouteConfiguration) -> Result<(), String> {
    let extra = st.on_demand.vhosts.get(name).into_iter().flat_map(|l| l.values());
    let full = merged(rc, extra);
    let table = RouteTable::compile(&full).map_err(|e| e.to_string())?;
    st.routes.insert(name.to_string(), Arc::new(table));
    st.raw.routes.insert(name.to_string(), full);
    Ok(())
}
