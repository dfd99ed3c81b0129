//! Destination-service labels (`destination_service`, `_name`, `_namespace`) from an
//! Istio cluster name or the request authority, cached per key.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::metrics::ServiceInfo;
use super::FastState;

/// Service labels from an Istio-style cluster name (`outbound|9080|v1|reviews.ns.svc.cluster.local`)
/// or, failing that, the request authority.
pub fn service_info(cluster: &str, authority: &str) -> ServiceInfo {
    let host = match istio_host(cluster) {
        Some(host) => host.to_string(),
        None => authority
            .rsplit_once(':')
            .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
            .map(|(h, _)| h)
            .unwrap_or(authority)
            .to_string(),
    };
    if host.is_empty() {
        return ServiceInfo::default();
    }
    let mut labels = host.split('.');
    let name = labels.next().unwrap_or_default().to_string();
    let namespace = labels.next().map(str::to_string).unwrap_or_else(|| crate::telemetry::UNKNOWN.into());
    ServiceInfo { host, name, namespace }
}

/// Entries a [`ServiceCache`] holds per kind of key.
pub const SERVICE_CACHE_ENTRIES: usize = 10_000;

/// The destination-service labels of requests and connections, built once per Istio
/// cluster name (or, for other clusters, per authority) and shared by every label set
/// that names them, so reporting a request neither allocates them nor re-parses the
/// cluster name. Bounded: once full, new keys are built on every call but not stored.
#[derive(Debug)]
pub struct ServiceCache {
    by_cluster: RwLock<HashMap<Box<str>, Arc<ServiceInfo>, FastState>>,
    by_authority: RwLock<HashMap<Box<str>, Arc<ServiceInfo>, FastState>>,
    max: usize,
}

impl Default for ServiceCache {
    fn default() -> Self {
        Self::new(SERVICE_CACHE_ENTRIES)
    }
}

impl ServiceCache {
    /// A cache holding at most `max` entries per kind of key.
    pub fn new(max: usize) -> Self {
        Self {
            by_cluster: RwLock::new(HashMap::with_hasher(FastState::default())),
            by_authority: RwLock::new(HashMap::with_hasher(FastState::default())),
            max,
        }
    }

    /// The labels of a request to `cluster` for `authority` (see [`service_info`]).
    pub fn get(&self, cluster: &str, authority: &str) -> Arc<ServiceInfo> {
        // An Istio cluster name decides alone; otherwise only the authority matters.
        let (map, key) = match istio_host(cluster) {
            Some(_) => (&self.by_cluster, cluster),
            None => (&self.by_authority, authority),
        };
        if let Some(s) = map.read().unwrap_or_else(|e| e.into_inner()).get(key) {
            return s.clone();
        }
        let info = Arc::new(service_info(cluster, authority));
        let mut map = map.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= self.max {
            return info;
        }
        map.entry(key.into()).or_insert(info).clone()
    }

    /// Entries held (both kinds).
    pub fn len(&self) -> usize {
        let n = |m: &RwLock<HashMap<Box<str>, Arc<ServiceInfo>, FastState>>| {
            m.read().unwrap_or_else(|e| e.into_inner()).len()
        };
        n(&self.by_cluster) + n(&self.by_authority)
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The host of an Istio-style cluster name (`outbound|9080|v1|reviews.ns.svc.cluster.local`).
fn istio_host(cluster: &str) -> Option<&str> {
    cluster.splitn(4, '|').nth(3).filter(|h| !h.is_empty() && !h.contains('|'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_labels_come_from_istio_cluster_names() {
        let s = service_info("outbound|9080|v1|reviews.bookinfo.svc.cluster.local", "ignored:1");
        assert_eq!(
            (s.host.as_str(), s.name.as_str(), s.namespace.as_str()),
            ("reviews.bookinfo.svc.cluster.local", "reviews", "bookinfo")
        );
        let s = service_info("plain", "ratings.default:9080");
        assert_eq!((s.host.as_str(), s.name.as_str(), s.namespace.as_str()), ("ratings.default", "ratings", "default"));
    }

    #[test]
    fn service_cache_shares_labels_per_cluster_or_authority_and_stays_bounded() {
        let cache = ServiceCache::new(2);
        let reviews = "outbound|9080|v1|reviews.bookinfo.svc.cluster.local";
        let a = cache.get(reviews, "a:1");
        let b = cache.get(reviews, "b:2");
        assert!(Arc::ptr_eq(&a, &b), "an Istio cluster name decides alone: one entry");
        assert_eq!(*a, service_info(reviews, "a:1"));
        let r = cache.get("plain", "ratings.default:9080");
        let d = cache.get("plain", "details.other:9080");
        assert_eq!((r.name.as_str(), d.name.as_str()), ("ratings", "details"), "other clusters go by authority");
        assert!(Arc::ptr_eq(&r, &cache.get("another", "ratings.default:9080")));
        assert_eq!(cache.len(), 3);
        for i in 0..5 {
            assert_eq!(cache.get("plain", &format!("s{i}.ns")).name, format!("s{i}"));
        }
        assert_eq!(cache.len(), 3, "the authority side was full (2): new authorities are built, not stored");
        let again = cache.get("plain", "s0.ns");
        assert!(!Arc::ptr_eq(&again, &cache.get("plain", "s0.ns")), "not cached");
    }
}
