//! Type URLs, resource names, content versions, backoff and the static source.
#![allow(clippy::unwrap_used)] // test crate: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{cla, cluster, listener, route};
use envoy_types::pb::envoy::config::core::v3::Node;
use weft_xds::type_url::{CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET};
use weft_xds::{content_version, resource_name, Any, Backoff, StaticSource, XdsSource};

#[test]
fn type_urls_match_envoy_names() {
    use envoy_types::pb::envoy::config;
    use prost::Name;
    assert_eq!(LISTENER, config::listener::v3::Listener::type_url());
    assert_eq!(ROUTE, config::route::v3::RouteConfiguration::type_url());
    assert_eq!(CLUSTER, config::cluster::v3::Cluster::type_url());
    assert_eq!(ENDPOINT, config::endpoint::v3::ClusterLoadAssignment::type_url());
    assert_eq!(SECRET, envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret::type_url());
}

#[test]
fn resource_name_reads_each_type_and_cla_cluster_name() {
    assert_eq!(resource_name(LISTENER, &listener("l")), Ok("l".to_string()));
    assert_eq!(resource_name(ROUTE, &route("r", "v")), Ok("r".to_string()));
    assert_eq!(resource_name(CLUSTER, &cluster("c")), Ok("c".to_string()));
    assert_eq!(resource_name(ENDPOINT, &cla("c")), Ok("c".to_string()));
}

#[test]
fn resource_name_errors_are_precise() {
    let wrong = resource_name(CLUSTER, &listener("l")).unwrap_err();
    assert!(wrong.contains("Listener") && wrong.contains("Cluster"), "{wrong}");
    let garbage = Any { type_url: LISTENER.to_string(), value: vec![0xff, 0xff, 0xff] };
    assert!(resource_name(LISTENER, &garbage).unwrap_err().contains("cannot decode Listener"));
    let unknown = Any { type_url: "type.googleapis.com/foo.Bar".to_string(), value: vec![] };
    assert!(resource_name(&unknown.type_url, &unknown).unwrap_err().contains("unknown resource type"));
    assert!(resource_name(LISTENER, &listener("")).unwrap_err().contains("without a name"));
}

#[test]
fn content_version_changes_with_content_only() {
    assert_eq!(content_version(&route("r", "v1")), content_version(&route("r", "v1")));
    assert_ne!(content_version(&route("r", "v1")), content_version(&route("r", "v2")));
    assert_eq!(content_version(&route("r", "v1")).len(), 16);
}

#[test]
fn backoff_is_capped_exponential_with_jitter() {
    let backoff = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(1) };
    for attempt in 0..40 {
        let cap = Duration::from_millis(100 * 2u64.pow(attempt.min(10))).min(Duration::from_secs(1));
        for _ in 0..20 {
            assert!(backoff.delay(attempt) <= cap, "attempt {attempt}");
        }
    }
    let samples: Vec<Duration> = (0..50).map(|_| backoff.delay(10)).collect();
    assert!(samples.iter().any(|d| *d != samples[0]), "no jitter");
    assert_eq!(Backoff::default().initial, Duration::from_millis(250));
    assert_eq!(Backoff::default().max, Duration::from_millis(500));
    // A proxy never waits longer than the cap, however long the control plane was away:
    // one replica back is reached within it (the 1 s resync of issue 15).
    let default = Backoff::default();
    for attempt in [0, 5, 10, 40, u32::MAX] {
        assert!(default.delay(attempt) <= Duration::from_millis(500), "attempt {attempt}");
    }
}

#[test]
fn static_source_versions_per_type_and_notifies() {
    let source = StaticSource::new();
    let changes = source.changes();
    let node = Node::default();
    assert_eq!(source.resources(&node, LISTENER).0, "0");
    source.set(LISTENER, vec![listener("a"), listener("b")]).unwrap();
    assert!(changes.has_changed().unwrap());
    let (version, resources) = source.resources(&node, LISTENER);
    assert_eq!(version, "1");
    assert_eq!(resources.keys().collect::<Vec<_>>(), ["a", "b"]);
    source.set_one(LISTENER, listener("c")).unwrap();
    assert_eq!(source.version(LISTENER), "2");
    assert!(source.remove(LISTENER, "a"));
    assert!(!source.remove(LISTENER, "a"), "removing a missing name is a no-op");
    assert_eq!(source.version(LISTENER), "3");
    assert_eq!(source.version(CLUSTER), "0", "other types keep their version");
    let err = source.set(CLUSTER, vec![listener("x")]).unwrap_err();
    assert!(err.to_string().contains("Listener"));
    assert_eq!(source.version(CLUSTER), "0", "a failed set changes nothing");
}

#[test]
fn resource_name_reads_the_top_level_only() {
    use envoy_types::pb::envoy::config;
    use prost::Message;
    // A Listener named "l" whose address (field 2) holds bytes that are no Address: the
    // name is read without building the address; applying the listener decodes it all.
    let mut value = config::listener::v3::Listener { name: "l".into(), ..Default::default() }.encode_to_vec();
    value.extend_from_slice(&[0x12, 0x03, 0xff, 0xff, 0xff]);
    let any = Any { type_url: LISTENER.to_string(), value };
    assert_eq!(resource_name(LISTENER, &any), Ok("l".to_string()));
    assert!(config::listener::v3::Listener::decode(any.value.as_slice()).is_err());
    // A top-level field cut short is still an error.
    let mut cut = config::listener::v3::Listener { name: "l".into(), ..Default::default() }.encode_to_vec();
    cut.extend_from_slice(&[0x12, 0x09, 0x01]);
    let err = resource_name(LISTENER, &Any { type_url: LISTENER.to_string(), value: cut }).unwrap_err();
    assert!(err.contains("cannot decode Listener"), "{err}");
}
