//! On-demand virtual hosts (Envoy's VHDS): a route configuration with `vhds` gets the
//! virtual hosts it lacks from the control plane, one host at a time. This module says
//! when a table must ask (no virtual host of its own for the authority), which clusters
//! a table needs, and builds the route configuration a table is compiled from: the
//! route configuration's own virtual hosts followed by those received over VHDS, as
//! Envoy rebuilds it.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, Vhds, VirtualHost};

use super::{ClusterChoice, RouteAction, RouteTable};

impl RouteTable {
    /// True when the route configuration fetches virtual hosts on demand (`vhds`).
    pub fn on_demand(&self) -> bool {
        self.on_demand
    }

    /// True when a virtual host other than the catch-all `*` serves `authority`: only
    /// then is an on-demand table sure it needs nothing more for this host.
    pub fn has_specific_vhost(&self, authority: &str) -> bool {
        self.find_vhost(authority).is_some_and(|i| Some(&i) != self.domains.any())
    }

    /// Every cluster the table's routes can send to: route clusters, weighted clusters
    /// and mirror clusters.
    pub fn cluster_names(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for route in self.vhosts.iter().flat_map(|v| v.routes.iter()) {
            if let RouteAction::Forward(f) = &route.action {
                match &f.clusters {
                    ClusterChoice::Single(c) => {
                        out.insert(c.to_string());
                    }
                    ClusterChoice::Weighted(list, _) => out.extend(list.iter().map(|(c, _)| c.to_string())),
                }
                out.extend(f.mirrors.iter().map(|m| m.cluster.clone()));
            }
        }
        out
    }
}

/// Checks a `vhds` block: weft fetches virtual hosts over its ADS stream only.
pub(super) fn check(v: &Vhds) -> Result<(), (String, String)> {
    match v.config_source.as_ref().and_then(|c| c.config_source_specifier.as_ref()) {
        Some(ConfigSourceSpecifier::Ads(_)) => Ok(()),
        _ => Err((
            "vhds.config_source".to_string(),
            "weft fetches virtual hosts over its ADS stream: set config_source to {ads: {}}".to_string(),
        )),
    }
}

/// The route configuration as served, with `extra` virtual hosts (received over VHDS)
/// appended after its own.
pub fn merged<'a>(rc: &RouteConfiguration, extra: impl IntoIterator<Item = &'a VirtualHost>) -> RouteConfiguration {
    let mut out = rc.clone();
    out.virtual_hosts.extend(extra.into_iter().cloned());
    out
}
