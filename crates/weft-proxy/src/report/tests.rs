use std::collections::BTreeMap;

use super::*;

fn node(labels: &[(&str, &str)]) -> NodeInfo {
    NodeInfo {
        name: "reviews-v2-7d9c8f6b5-zxgzm".into(),
        workload_name: "reviews-v2".into(),
        namespace: "shop".into(),
        service_account: "bookinfo-reviews".into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..NodeInfo::default()
    }
}

#[test]
fn the_local_workload_is_the_deployment_with_istios_canonical_labels() {
    let w =
        local_workload(&node(&[("app", "reviews"), ("version", "v2")]), Some("spiffe://cluster.local/ns/shop/sa/r"));
    assert_eq!(w.workload, "reviews-v2", "WORKLOAD_NAME, not the pod name");
    assert_eq!((w.namespace.as_str(), w.service_account.as_str()), ("shop", "bookinfo-reviews"));
    assert_eq!((w.app.as_str(), w.version.as_str()), ("reviews", "v2"));
    assert_eq!((w.canonical_service.as_str(), w.canonical_revision.as_str()), ("reviews", "v2"));
    assert_eq!(w.principal, "spiffe://cluster.local/ns/shop/sa/r");
    assert_eq!(w.cluster, "Kubernetes", "Istio's default CLUSTER_ID");
    let plain = local_workload(&NodeInfo { cluster_id: "east".into(), ..node(&[]) }, None);
    assert_eq!((plain.principal.as_str(), plain.cluster.as_str()), ("unknown", "east"));
    let bare = local_workload(&NodeInfo { workload_name: String::new(), ..node(&[]) }, None);
    assert_eq!(bare.workload, "reviews-v2-7d9c8f6b5-zxgzm", "no WORKLOAD_NAME: the instance");
}

#[test]
fn canonical_service_follows_istios_label_order() {
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    let all = labels(&[
        ("service.istio.io/canonical-name", "cn"),
        ("app.kubernetes.io/name", "k8s-name"),
        ("app", "app"),
        ("service.istio.io/canonical-revision", "cr"),
        ("app.kubernetes.io/version", "k8s-version"),
        ("version", "v"),
    ]);
    assert_eq!(canonical_service(&all, "w"), ("cn".into(), "cr".into()));
    let k8s =
        labels(&[("app.kubernetes.io/name", "k"), ("app", "a"), ("app.kubernetes.io/version", "9"), ("version", "v")]);
    assert_eq!(canonical_service(&k8s, "w"), ("k".into(), "9".into()));
    assert_eq!(canonical_service(&labels(&[("app", "a"), ("version", "v")]), "w"), ("a".into(), "v".into()));
    assert_eq!(canonical_service(&labels(&[]), "reviews-v2"), ("reviews-v2".into(), "latest".into()));
    assert_eq!(canonical_service(&labels(&[("app", "")]), "w"), ("w".into(), "latest".into()), "empty labels skipped");
}

#[test]
fn the_security_policy_is_istios_per_reporter() {
    let p: Option<Arc<str>> = Some(Arc::from("spiffe://cluster.local/ns/a/sa/b"));
    assert_eq!(security_policy(Direction::Inbound, &p), SecurityPolicy::MutualTls);
    assert_eq!(security_policy(Direction::Inbound, &None), SecurityPolicy::None);
    assert_eq!(security_policy(Direction::Outbound, &p), SecurityPolicy::Unknown);
    assert_eq!(security_policy(Direction::Outbound, &None), SecurityPolicy::Unknown);
}

#[test]
fn principals_are_the_proven_ones_never_the_claimed_ones() {
    let claimed =
        Arc::new(WorkloadInfo { principal: "spiffe://cluster.local/ns/x/sa/claimed".into(), ..Default::default() });
    assert_eq!(with_principal(claimed.clone(), None).principal, "unknown", "no mTLS: unknown");
    let proven: Option<Arc<str>> = Some(Arc::from("spiffe://cluster.local/ns/x/sa/real"));
    assert_eq!(with_principal(claimed, proven.as_ref()).principal, "spiffe://cluster.local/ns/x/sa/real");
    let same = Arc::new(WorkloadInfo {
        principal: "spiffe://cluster.local/ns/x/sa/real".into(),
        namespace: "x".into(),
        ..Default::default()
    });
    assert!(Arc::ptr_eq(&with_principal(same.clone(), proven.as_ref()), &same), "no copy when they agree");
}

#[test]
fn a_peer_known_by_its_certificate_only_has_the_sans_namespace() {
    let p = peer_from_principal("spiffe://cluster.local/ns/shop/sa/cart");
    assert_eq!((p.principal.as_str(), p.namespace.as_str()), ("spiffe://cluster.local/ns/shop/sa/cart", "shop"));
    assert_eq!((p.workload.as_str(), p.canonical_revision.as_str()), ("unknown", "latest"));
    assert_eq!(peer_from_principal("spiffe://td/weird").namespace, "unknown");
    assert_eq!(san_namespace("spiffe://td/ns//sa/x"), None);
    // The SAN's namespace wins over what metadata claims (Istio's order).
    let claimed = Arc::new(WorkloadInfo { namespace: "claimed".into(), ..Default::default() });
    let proven: Option<Arc<str>> = Some(Arc::from("spiffe://cluster.local/ns/real/sa/a"));
    assert_eq!(with_principal(claimed.clone(), proven.as_ref()).namespace, "real");
    assert_eq!(with_principal(claimed, None).namespace, "claimed", "without a certificate: the metadata's");
}

#[test]
fn generated_request_ids_are_what_format_gives() {
    for v in [0u128, 1, 0xabc, u128::MAX, 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210, rand::random()] {
        assert_eq!(hex_id(v), format!("{v:032x}").as_str());
    }
}

#[test]
fn request_ids_taken_from_requests_are_kept_in_place_when_they_fit() {
    let uuid = "8f2c7a3e-5b1d-4c9e-a0f4-2d6b8e1c3a57";
    let id = RequestId::taken(uuid);
    assert!(matches!(id, RequestId::Inline(_)), "a UUID needs no allocation");
    assert_eq!(id.as_str(), uuid);
    assert_eq!(RequestId::taken("").as_str(), "");
    let long = "x".repeat(InlineId::CAPACITY + 1);
    let id = RequestId::taken(&long);
    assert!(matches!(id, RequestId::Taken(_)), "longer ids are copied to the heap");
    assert_eq!(id.as_str(), long);
    let full = "y".repeat(InlineId::CAPACITY);
    assert_eq!(RequestId::taken(&full).as_str(), full);
}
