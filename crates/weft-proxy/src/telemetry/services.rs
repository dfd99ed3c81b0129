//! Destination-service labels (`destination_service`, `_name`, `_namespace`), as Istio's
//! stats filter finds them:
//!
//! - a cluster with Istio's service metadata (`filter_metadata["istio"]["services"]`, a
//!   list of `{host, name, namespace}`, which the control plane puts on inbound
//!   clusters): its one service, or among several the one the Host header names
//!   ([`pick`]);
//! - an outbound cluster `outbound|PORT|SUBSET|HOST`: the host in its name (name and
//!   namespace split from Kubernetes hosts `<name>.<ns>.svc.<domain>` only);
//! - `PassthroughCluster` / `BlackHoleCluster` (and `InboundPassthroughCluster`): the
//!   cluster name as `destination_service_name`, the Host header (TCP: `unknown`) as
//!   `destination_service`;
//! - otherwise, on the client side only, the Host header verbatim as service and name
//!   (Istio disables the Host fallback for inbound traffic; the server side reports its
//!   own canonical service, see `report.rs`).
//!
//! An IP address is never split into name and namespace. On the client side a namespace
//! left `unknown` here is the destination peer's (`report.rs`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::google::protobuf::value::Kind;

use super::metrics::ServiceInfo;
use super::{FastState, UNKNOWN};

/// The metadata namespace Istio keeps its cluster facts in.
pub const ISTIO_METADATA: &str = "istio";

/// Clusters whose name Istio reports as `destination_service_name`.
pub const VIRTUAL_CLUSTERS: [&str; 4] =
    ["PassthroughCluster", "BlackHoleCluster", "InboundPassthroughCluster", "InboundPassthroughClusterIpv4"];

/// The services in a cluster's `filter_metadata["istio"]["services"]` (entries without a
/// `host` are skipped; a missing `name` or `namespace` is `unknown`).
pub fn is_external(metadata: Option<&Metadata>) -> bool {
    metadata
        .and_then(|m| m.filter_metadata.get(ISTIO_METADATA))
        .and_then(|s| s.fields.get("external"))
        .is_some_and(|v| matches!(v.kind, Some(Kind::BoolValue(true))))
}

/// The `destination_service*` labels in Istio's `filter_metadata["istio"]["services"]`.
pub fn from_metadata(metadata: Option<&Metadata>) -> Vec<Arc<ServiceInfo>> {
    let Some(list) = metadata
        .and_then(|m| m.filter_metadata.get(ISTIO_METADATA))
        .and_then(|s| s.fields.get("services"))
        .and_then(|v| match v.kind.as_ref() {
            Some(Kind::ListValue(l)) => Some(l),
            _ => None,
        })
    else {
        return Vec::new();
    };
    list.values
        .iter()
        .filter_map(|v| match v.kind.as_ref() {
            Some(Kind::StructValue(s)) => Some(s),
            _ => None,
        })
        .filter_map(|s| {
            let text = |k: &str| match s.fields.get(k).and_then(|v| v.kind.as_ref()) {
                Some(Kind::StringValue(t)) if !t.is_empty() => Some(t.clone()),
                _ => None,
            };
            Some(Arc::new(ServiceInfo {
                host: text("host")?,
                name: text("name").unwrap_or_else(|| UNKNOWN.into()),
                namespace: text("namespace").unwrap_or_else(|| UNKNOWN.into()),
            }))
        })
        .collect()
}

/// The service of a request among a cluster's `services`: the only one, else the one
/// whose host (or, in its namespace's short forms, name) the authority names, else the
/// first. `None` when the list is empty.
pub fn pick<'a>(services: &'a [Arc<ServiceInfo>], authority: &str) -> Option<&'a Arc<ServiceInfo>> {
    if let [one] = services {
        return Some(one);
    }
    let host = strip_port(authority);
    services
        .iter()
        .find(|s| {
            s.host.eq_ignore_ascii_case(host)
                || s.name.eq_ignore_ascii_case(host)
                || host
                    .strip_prefix(s.name.as_str())
                    .and_then(|rest| rest.strip_prefix('.'))
                    .is_some_and(|rest| rest == s.namespace || rest == format!("{}.svc", s.namespace))
        })
        .or_else(|| services.first())
}

/// Labels of a virtual cluster (`PassthroughCluster`, ...): its name as
/// `destination_service_name`, the authority verbatim (or `unknown`) as the service.
pub fn virtual_cluster(cluster: &str, authority: Option<&str>) -> Option<ServiceInfo> {
    if !VIRTUAL_CLUSTERS.contains(&cluster) {
        return None;
    }
    let host = authority.filter(|h| !h.is_empty()).unwrap_or(UNKNOWN);
    Some(ServiceInfo { host: host.to_string(), name: cluster.to_string(), namespace: UNKNOWN.into() })
}

fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        // `[v6]:port` or `[v6]`.
        return authority.split_once(']').map_or(authority, |(h, _)| h.trim_start_matches('['));
    }
    authority
        .rsplit_once(':')
        .filter(|(h, p)| !h.contains(':') && p.chars().all(|c| c.is_ascii_digit()))
        .map(|(h, _)| h)
        .unwrap_or(authority)
}

/// Service labels from an Istio-style cluster name (`outbound|9080|v1|reviews.ns.svc.cluster.local`):
/// a Kubernetes service host (`<name>.<namespace>.svc.<domain>`) gives its name and
/// namespace, any other host (a ServiceEntry's, an address) is the name itself with the
/// namespace `unknown`. Failing a cluster name, the request authority as Istio's Host
/// fallback takes it: verbatim (port included) as both service and name.
pub fn service_info(cluster: &str, authority: &str) -> ServiceInfo {
    let Some(host) = istio_host(cluster) else {
        if authority.is_empty() {
            return ServiceInfo::default();
        }
        return ServiceInfo { host: authority.to_string(), name: authority.to_string(), namespace: UNKNOWN.into() };
    };
    let labels: Vec<&str> = host.splitn(4, '.').collect();
    match labels.as_slice() {
        [name, namespace, "svc", ..] if host.parse::<IpAddr>().is_err() => {
            ServiceInfo { host: host.to_string(), name: name.to_string(), namespace: namespace.to_string() }
        }
        // An address or a non-Kubernetes host: never split into name and namespace.
        _ => ServiceInfo { host: host.to_string(), name: host.to_string(), namespace: UNKNOWN.into() },
    }
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

    /// The labels of an Istio cluster name seen before (see [`ServiceCache::get`]):
    /// one hashed lookup, without parsing the name.
    pub fn known_cluster(&self, cluster: &str) -> Option<Arc<ServiceInfo>> {
        self.by_cluster.read().unwrap_or_else(|e| e.into_inner()).get(cluster).cloned()
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
pub fn istio_host(cluster: &str) -> Option<&str> {
    // What `splitn(4, '|').nth(3)` gives, by byte search: this runs per request.
    let mut rest = cluster;
    for _ in 0..3 {
        let bar = rest.bytes().position(|b| b == b'|')?;
        rest = &rest[bar + 1..];
    }
    (!rest.is_empty() && !rest.contains('|')).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_host_is_the_fourth_field_of_an_istio_cluster_name() {
        fn split(c: &str) -> Option<&str> {
            c.splitn(4, '|').nth(3).filter(|h| !h.is_empty() && !h.contains('|'))
        }
        for c in [
            "outbound|9080|v1|reviews.ns.svc.cluster.local",
            "outbound|443||api.example.com",
            "inbound|9080||",
            "inbound|9080|http|",
            "outbound|1|a|b|c",
            "PassthroughCluster",
            "a|b|c",
            "|||x",
            "",
            "outbound|80|é|hôte",
        ] {
            assert_eq!(istio_host(c), split(c), "{c}");
        }
    }

    #[test]
    fn service_labels_come_from_istio_cluster_names() {
        let s = service_info("outbound|9080|v1|reviews.bookinfo.svc.cluster.local", "ignored:1");
        assert_eq!(
            (s.host.as_str(), s.name.as_str(), s.namespace.as_str()),
            ("reviews.bookinfo.svc.cluster.local", "reviews", "bookinfo")
        );
        let s = service_info("outbound|443||api.example.com", "ignored");
        assert_eq!(
            (s.host.as_str(), s.name.as_str(), s.namespace.as_str()),
            ("api.example.com", "api.example.com", "unknown")
        );
        // Istio's Host fallback: the authority verbatim.
        let s = service_info("plain", "ratings.default:9080");
        assert_eq!(
            (s.host.as_str(), s.name.as_str(), s.namespace.as_str()),
            ("ratings.default:9080", "ratings.default:9080", "unknown")
        );
        assert_eq!(service_info("plain", ""), ServiceInfo::default());
    }

    fn svc(host: &str, name: &str, namespace: &str) -> Arc<ServiceInfo> {
        Arc::new(ServiceInfo { host: host.into(), name: name.into(), namespace: namespace.into() })
    }

    fn metadata(json: serde_json::Value) -> Metadata {
        use envoy_types::pb::google::protobuf::{ListValue, Struct, Value};
        fn value(v: &serde_json::Value) -> Value {
            let kind = match v {
                serde_json::Value::String(s) => Kind::StringValue(s.clone()),
                serde_json::Value::Array(a) => Kind::ListValue(ListValue { values: a.iter().map(value).collect() }),
                serde_json::Value::Object(o) => {
                    Kind::StructValue(Struct { fields: o.iter().map(|(k, v)| (k.clone(), value(v))).collect() })
                }
                serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
                _ => Kind::NullValue(0),
            };
            Value { kind: Some(kind) }
        }
        let Some(Kind::StructValue(istio)) = value(&json).kind else { panic!("an object") };
        Metadata { filter_metadata: [(ISTIO_METADATA.to_string(), istio)].into_iter().collect(), ..Default::default() }
    }

    #[test]
    fn istio_service_metadata_is_read_and_bad_entries_skipped() {
        let md = metadata(serde_json::json!({"services": [
            {"host": "reviews.default.svc.cluster.local", "name": "reviews", "namespace": "default"},
            {"name": "no-host"},
            "not a struct",
            {"host": "api.example.com", "namespace": 5},
        ]}));
        assert_eq!(
            from_metadata(Some(&md)),
            [
                svc("reviews.default.svc.cluster.local", "reviews", "default"),
                svc("api.example.com", "unknown", "unknown")
            ]
        );
        assert!(from_metadata(None).is_empty());
        assert!(from_metadata(Some(&metadata(serde_json::json!({"services": "x"})))).is_empty());
    }

    #[test]
    fn several_services_are_told_apart_by_the_host_header() {
        let reviews = svc("reviews.default.svc.cluster.local", "reviews", "default");
        let alias = svc("reviews-alias.default.svc.cluster.local", "reviews-alias", "default");
        let both = [alias.clone(), reviews.clone()];
        for authority in [
            "reviews",
            "reviews:9080",
            "reviews.default",
            "reviews.default.svc",
            "REVIEWS.default.svc.cluster.local:80",
        ] {
            assert_eq!(pick(&both, authority), Some(&reviews), "{authority}");
        }
        assert_eq!(pick(&both, "reviews-alias.default:80"), Some(&alias));
        assert_eq!(pick(&both, "localhost:9080"), Some(&alias), "no match: the first");
        assert_eq!(pick(std::slice::from_ref(&reviews), "localhost"), Some(&reviews), "one service: always it");
        assert_eq!(pick(&[], "reviews"), None);
    }

    #[test]
    fn ip_literals_are_never_split_into_name_and_namespace() {
        for authority in ["127.0.0.1:9080", "10.1.2.3", "[::1]:80"] {
            let s = service_info("plain", authority);
            assert_eq!((s.host.as_str(), s.name.as_str(), s.namespace.as_str()), (authority, authority, "unknown"));
        }
        let s = service_info("outbound|80||10.0.0.7", "");
        assert_eq!((s.host.as_str(), s.name.as_str(), s.namespace.as_str()), ("10.0.0.7", "10.0.0.7", "unknown"));
    }

    #[test]
    fn passthrough_and_blackhole_are_named_by_their_cluster() {
        let s = virtual_cluster("PassthroughCluster", Some("httpbin.org")).unwrap();
        assert_eq!(
            (s.host.as_str(), s.name.as_str(), s.namespace.as_str()),
            ("httpbin.org", "PassthroughCluster", "unknown")
        );
        let s = virtual_cluster("BlackHoleCluster", None).unwrap();
        assert_eq!(
            (s.host.as_str(), s.name.as_str(), s.namespace.as_str()),
            ("unknown", "BlackHoleCluster", "unknown")
        );
        assert_eq!(virtual_cluster("outbound|80||a.b.svc.cluster.local", Some("a")), None);
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
        assert_eq!(
            (r.name.as_str(), d.name.as_str()),
            ("ratings.default:9080", "details.other:9080"),
            "other clusters go by authority"
        );
        assert!(Arc::ptr_eq(&r, &cache.get("another", "ratings.default:9080")));
        assert_eq!(cache.len(), 3);
        for i in 0..5 {
            assert_eq!(cache.get("plain", &format!("s{i}.ns")).name, format!("s{i}.ns"));
        }
        assert_eq!(cache.len(), 3, "the authority side was full (2): new authorities are built, not stored");
        let again = cache.get("plain", "s0.ns");
        assert!(!Arc::ptr_eq(&again, &cache.get("plain", "s0.ns")), "not cached");
    }
}
