//! Route warming: a route configuration update that newly sends traffic to an EDS cluster
//! whose endpoints have not arrived yet keeps serving its previous table until they do
//! (or for at most [`ROUTE_WARMING_LIMIT`]).
//!
//! Why: a DestinationRule that adds a subset and a VirtualService that moves traffic to
//! it, applied together, reach a proxy as a new cluster (CDS), then the route switch
//! (RDS), while the subset's endpoints come only after the proxy has asked for them (EDS
//! by name, one more round trip). Served at once, the switched route met a cluster with no
//! endpoints and requests failed with 503 until EDS caught up; Istio asks operators to
//! apply the two a few seconds apart. Envoy warms a new cluster before it takes traffic;
//! this is the route side of the same rule, so the two can be applied together.
//!
//! The update itself is accepted (ACKed, or NACKed for its own errors) and recorded as it
//! came; only which table serves is delayed. A held table is released when an endpoint or
//! cluster update leaves none of the clusters it newly names cold, when a later update of
//! the same route configuration needs no warming, or at the limit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{cla_name, State};
use crate::route::RouteTable;

/// Longest a route configuration waits for the endpoints of the clusters it newly names.
/// The gap it bridges is one xDS round trip; past this, the new table serves anyway (the
/// cluster's endpoints may never come, e.g. a control plane that does not serve them).
pub const ROUTE_WARMING_LIMIT: Duration = Duration::from_secs(5);

/// Route configurations serving their previous table while the new one warms.
#[derive(Default)]
pub(super) struct Warming {
    held: BTreeMap<String, Held>,
}

struct Held {
    /// The table that keeps serving.
    served: Arc<RouteTable>,
    /// When the route configuration started waiting.
    since: Instant,
}

impl Warming {
    /// True when nothing waits (the common case: `publish` serves `routes` as compiled).
    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The tables to serve: the compiled ones, with the held route configurations'
    /// previous tables in their place.
    pub(super) fn served(&self, routes: &BTreeMap<String, Arc<RouteTable>>) -> BTreeMap<String, Arc<RouteTable>> {
        let mut out = routes.clone();
        for (name, held) in &self.held {
            if out.contains_key(name) {
                out.insert(name.clone(), held.served.clone());
            }
        }
        out
    }
}

/// After a route update: holds each changed route configuration whose new table names a
/// cold cluster (see [`cold`]) that the table it replaces did not name. `before`: the
/// compiled tables before the update. Returns the names newly held (for the log and the
/// release timer).
pub(super) fn hold_after_routes(
    st: &mut State,
    before: &BTreeMap<String, Arc<RouteTable>>,
    now: Instant,
) -> Vec<(String, Vec<String>)> {
    let mut newly = Vec::new();
    let changed: Vec<(String, Arc<RouteTable>, Arc<RouteTable>)> = st
        .routes
        .iter()
        .filter_map(|(name, table)| {
            let prev = before.get(name)?;
            (!Arc::ptr_eq(prev, table)).then(|| (name.clone(), prev.clone(), table.clone()))
        })
        .collect();
    for (name, prev, table) in changed {
        let served = st.warming.held.get(&name).map_or(prev, |h| h.served.clone());
        let waiting = newly_cold(st, &served, &table);
        if waiting.is_empty() {
            st.warming.held.remove(&name);
            continue;
        }
        if !st.warming.held.contains_key(&name) {
            st.warming.held.insert(name.clone(), Held { served, since: now });
            newly.push((name, waiting));
        }
    }
    let routes = &st.routes;
    st.warming.held.retain(|name, _| routes.contains_key(name));
    newly
}

/// Releases the route configurations that need not wait any more: none of the clusters
/// their new table newly names is cold, or they have waited [`ROUTE_WARMING_LIMIT`]
/// (`now` past it: logged). True when any was released.
pub(super) fn release(st: &mut State, now: Instant) -> bool {
    if st.warming.is_empty() {
        return false;
    }
    let mut done = Vec::new();
    for (name, held) in &st.warming.held {
        let Some(table) = st.routes.get(name) else {
            done.push(name.clone());
            continue;
        };
        let waiting = newly_cold(st, &held.served, table);
        if waiting.is_empty() {
            done.push(name.clone());
        } else if now.saturating_duration_since(held.since) >= ROUTE_WARMING_LIMIT {
            tracing::warn!(
                route_configuration = %name,
                clusters = ?waiting,
                "endpoints did not arrive within {ROUTE_WARMING_LIMIT:?}: serving the new routes without them"
            );
            done.push(name.clone());
        }
    }
    for name in &done {
        st.warming.held.remove(name);
    }
    !done.is_empty()
}

/// The clusters `table` names that `served` does not and that are cold.
fn newly_cold(st: &State, served: &RouteTable, table: &RouteTable) -> Vec<String> {
    let before = served.cluster_names();
    table.cluster_names().into_iter().filter(|c| !before.contains(c) && cold(st, c)).collect()
}

/// An EDS cluster the proxy has but whose endpoints (its load assignment) have not
/// arrived. Clusters the proxy does not have at all are not waited for (they may never
/// come; requests to them fail as "no cluster", as in Envoy).
fn cold(st: &State, cluster: &str) -> bool {
    st.cluster_configs
        .get(cluster)
        .and_then(|c| cla_name(c))
        .is_some_and(|cla| !st.raw.endpoints.contains_key(&cla) && !st.on_demand.missing_endpoints.contains(&cla))
}
