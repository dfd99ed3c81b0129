//! Virtual host discovery (VHDS) naming and host resolution, shared by servers (which
//! resolve a requested host to a virtual host) and clients (which name their requests).
//!
//! Envoy's convention: a VirtualHost resource is named `<route configuration>/<vhost
//! name>` and requested as `<route configuration>/<host>`, where host is the request's
//! Host / `:authority` as the proxy sees it. Names split from the right: a host cannot
//! contain `/`, a route configuration name can.

use std::collections::{BTreeMap, HashMap};

use envoy_types::pb::envoy::config::route::v3::VirtualHost;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use crate::domains::Domains;

/// Splits `<route configuration>/<host or vhost>` at its last `/`.
pub fn split_name(name: &str) -> Option<(&str, &str)> {
    name.rsplit_once('/')
}

/// The name a proxy subscribes to for `host` in route configuration `route_config`.
pub fn alias(route_config: &str, host: &str) -> String {
    format!("{route_config}/{host}")
}

/// Virtual hosts indexed by route configuration and domain, resolving
/// `<route configuration>/<host>` with Envoy's domain matching ([`Domains`]): exact, then the longest
/// `*suffix`, then the longest `prefix*`, then (for a host with a port and no match) the
/// same without the port, then `*`. Domains compare case-insensitively.
#[derive(Debug, Default)]
pub struct VhostIndex {
    by_config: HashMap<String, ConfigHosts>,
}

#[derive(Debug, Default)]
struct ConfigHosts {
    /// Resource names, to answer a subscription by the resource's own name.
    names: HashMap<String, String>,
    /// Domains -> resource name.
    domains: Domains<String>,
}

impl VhostIndex {
    /// Indexes `(resource name, virtual host)` pairs; a resource name without `/`
    /// belongs to no route configuration and is skipped. When two virtual hosts of one
    /// route configuration claim a domain, the first (in iteration order) keeps it.
    pub fn build<'a>(vhosts: impl IntoIterator<Item = (&'a str, &'a VirtualHost)>) -> Self {
        let mut names: HashMap<&str, HashMap<String, String>> = HashMap::new();
        let mut domains: HashMap<&str, Vec<(String, String)>> = HashMap::new();
        for (name, vh) in vhosts {
            let Some((config, local)) = split_name(name) else { continue };
            names.entry(config).or_default().insert(local.to_string(), name.to_string());
            domains.entry(config).or_default().extend(vh.domains.iter().map(|d| (d.clone(), name.to_string())));
        }
        let by_config = names
            .into_iter()
            .map(|(config, names)| {
                let domains = Domains::new(domains.remove(config).unwrap_or_default());
                (config.to_string(), ConfigHosts { names, domains })
            })
            .collect();
        VhostIndex { by_config }
    }

    /// Indexes packed VirtualHost resources by name (undecodable ones are skipped).
    pub fn from_resources(resources: &BTreeMap<String, Any>) -> Self {
        let decoded: Vec<(&str, VirtualHost)> = resources
            .iter()
            .filter_map(|(n, any)| VirtualHost::decode(any.value.as_slice()).ok().map(|vh| (n.as_str(), vh)))
            .collect();
        Self::build(decoded.iter().map(|(n, vh)| (*n, vh)))
    }

    /// The resource name `requested` (`<route configuration>/<host>`, or a resource's own
    /// name) resolves to, if any.
    pub fn resolve(&self, requested: &str) -> Option<&str> {
        let (config, host) = split_name(requested)?;
        let hosts = self.by_config.get(config)?;
        if let Some(name) = hosts.names.get(host) {
            return Some(name);
        }
        hosts.domains.lookup(host, false).map(String::as_str)
    }

    /// Number of indexed virtual hosts.
    pub fn len(&self) -> usize {
        self.by_config.values().map(|h| h.names.len()).sum()
    }

    /// True when nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.by_config.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vh(name: &str, domains: &[&str]) -> (String, VirtualHost) {
        (
            name.to_string(),
            VirtualHost {
                name: name.into(),
                domains: domains.iter().map(|d| d.to_string()).collect(),
                ..Default::default()
            },
        )
    }

    #[test]
    fn aliases_resolve_with_envoy_domain_order_per_route_configuration() {
        let list = [
            vh("9080/reviews:9080", &["reviews", "reviews:9080", "Reviews.default.svc.cluster.local:9080"]),
            vh("9080/wild", &["*.example.com"]),
            vh("9080/prefix", &["api.*"]),
            vh("weft-outbound/reviews:9080", &["reviews:9080"]),
            vh("a/b/c", &["c.local"]),
        ];
        let index = VhostIndex::build(list.iter().map(|(n, v)| (n.as_str(), v)));
        assert_eq!(index.resolve("9080/reviews:9080"), Some("9080/reviews:9080"));
        assert_eq!(index.resolve("9080/reviews.default.svc.cluster.local:9080"), Some("9080/reviews:9080"));
        assert_eq!(index.resolve("9080/x.example.com"), Some("9080/wild"));
        assert_eq!(index.resolve("9080/x.example.com:9080"), Some("9080/wild"), "port stripped when nothing matched");
        assert_eq!(index.resolve("9080/api.internal"), Some("9080/prefix"));
        assert_eq!(index.resolve("9080/ratings:9080"), None);
        assert_eq!(index.resolve("weft-outbound/reviews"), None, "other route configuration, other domains");
        assert_eq!(index.resolve("a/b/c.local"), Some("a/b/c"), "names split from the right");
        assert_eq!(index.resolve("9080"), None);
        assert_eq!(index.len(), 5);
    }

    #[test]
    fn star_domain_is_the_last_resort() {
        let list = [vh("80/any", &["*"]), vh("80/one", &["one"])];
        let index = VhostIndex::build(list.iter().map(|(n, v)| (n.as_str(), v)));
        assert_eq!(index.resolve("80/one"), Some("80/one"));
        assert_eq!(index.resolve("80/two"), Some("80/any"));
    }
}
