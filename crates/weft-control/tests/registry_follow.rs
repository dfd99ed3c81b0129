//! The registry follows a real AdsServer on loopback: proxies register by connecting.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{labels, node, wait_registry, Client, Server};
use weft_control::registry::{FollowConfig, Registry, WorkloadSource};

#[tokio::test]
async fn connecting_proxy_appears_with_its_identity_and_disappears_when_it_stops() -> anyhow::Result<()> {
    let server = Server::start().await?;
    let registry = Registry::new();
    let follow = registry.follow(&server.server);
    let info = node("reviews-1", "shop", &[("app", "reviews"), ("version", "v1")], &["10.0.0.1", "fd00::1"]);
    let client = Client::start(server.addr, info.clone());

    let snap = wait_registry(&registry, "reviews-1 registered", |s| s.get(&info.id).is_some()).await?;
    let w = snap.get(&info.id).ok_or_else(|| anyhow::anyhow!("missing"))?;
    assert_eq!(w.name, "reviews-1");
    assert_eq!(w.namespace, "shop");
    assert_eq!(w.labels, info.labels);
    assert_eq!(w.service_account, "sa-reviews-1");
    assert_eq!(w.ports, info.ports);
    assert_eq!(w.addresses, vec!["10.0.0.1".parse::<IpAddr>()?, "fd00::1".parse::<IpAddr>()?]);
    assert!(w.ready);
    assert_eq!(w.source, WorkloadSource::Proxy);

    client.stop().await?;
    let snap = wait_registry(&registry, "reviews-1 removed", |s| s.get(&info.id).is_none()).await?;
    assert_eq!(snap.workloads().count(), 0);
    follow.abort();
    Ok(())
}

#[tokio::test]
async fn proxy_without_instance_ips_is_addressed_by_its_stream_peer() -> anyhow::Result<()> {
    let server = Server::start().await?;
    let registry = Registry::new();
    let _follow = registry.follow(&server.server);
    let info = node("local", "default", &[("app", "local")], &[]);
    let _client = Client::start(server.addr, info.clone());
    let snap = wait_registry(&registry, "local registered", |s| s.get(&info.id).is_some()).await?;
    let addresses = snap.get(&info.id).map(|w| w.addresses.clone()).unwrap_or_default();
    assert_eq!(addresses, vec!["127.0.0.1".parse::<IpAddr>()?]);
    Ok(())
}

#[tokio::test]
async fn select_matches_connected_workloads_by_namespace_and_every_label() -> anyhow::Result<()> {
    let server = Server::start().await?;
    let registry = Registry::new();
    let _follow = registry.follow(&server.server);
    let v1 = node("r-v1", "shop", &[("app", "reviews"), ("version", "v1")], &["10.0.0.1"]);
    let v2 = node("r-v2", "shop", &[("app", "reviews"), ("version", "v2")], &["10.0.0.2"]);
    let other = node("r-other", "other", &[("app", "reviews"), ("version", "v1")], &["10.0.0.3"]);
    let _clients: Vec<Client> = [&v1, &v2, &other].iter().map(|n| Client::start(server.addr, (*n).clone())).collect();
    let snap = wait_registry(&registry, "three workloads", |s| s.workloads().count() == 3).await?;

    let ids = |ns: &str, sel: &[(&str, &str)]| -> Vec<String> {
        snap.select(ns, &labels(sel)).iter().map(|w| w.name.clone()).collect()
    };
    assert_eq!(ids("shop", &[("app", "reviews")]), vec!["r-v1", "r-v2"]);
    assert_eq!(ids("shop", &[("app", "reviews"), ("version", "v2")]), vec!["r-v2"]);
    assert_eq!(ids("other", &[("app", "reviews")]), vec!["r-other"]);
    assert_eq!(ids("shop", &[("app", "ratings")]), Vec::<String>::new());
    assert_eq!(ids("shop", &[]), Vec::<String>::new(), "empty selector selects nothing");
    Ok(())
}

#[tokio::test]
async fn proxy_with_garbage_metadata_is_not_registered() -> anyhow::Result<()> {
    let server = Server::start().await?;
    let registry = Registry::new();
    let follow = registry.follow(&server.server);
    // No namespace, and an instance IP that is not one.
    let mut bad = node("bad", "", &[], &[]);
    let _bad_client = Client::start(server.addr, bad.clone());
    server.wait_connection("bad connected", |c| c.node_id == bad.id && c.node_error.is_some()).await?;
    bad = node("bad-ip", "shop", &[], &["not-an-ip"]);
    let _bad_ip_client = Client::start(server.addr, bad.clone());
    server.wait_connection("bad-ip connected", |c| c.node_id == bad.id).await?;

    // Both bad streams are open before the good one connects, so once the good one is
    // registered the follower has seen them.
    let good = node("good", "shop", &[("app", "good")], &["10.0.0.9"]);
    let _good_client = Client::start(server.addr, good.clone());
    let snap = wait_registry(&registry, "good registered", |s| s.get(&good.id).is_some()).await?;
    let ids: Vec<&str> = snap.workloads().map(|w| w.id.as_str()).collect();
    assert_eq!(ids, vec![good.id.as_str()]);
    assert!(!follow.is_finished(), "the follower survives bad metadata");
    Ok(())
}

#[tokio::test]
async fn follow_with_grace_keeps_a_disconnected_workload_for_the_grace_period() -> anyhow::Result<()> {
    let grace = Duration::from_secs(2);
    let server = Server::start().await?;
    let registry = Registry::new();
    let _follow = registry.follow_with(&server.server, FollowConfig { grace, ..Default::default() });
    let info = node("flaky", "shop", &[("app", "flaky")], &["10.0.0.4"]);
    let client = Client::start(server.addr, info.clone());
    wait_registry(&registry, "flaky registered", |s| s.get(&info.id).is_some()).await?;

    client.stop().await?;
    server.wait_gone(&info.id).await?;
    let disconnected = Instant::now();
    assert!(registry.snapshot().get(&info.id).is_some(), "still registered right after the stream closed");
    wait_registry(&registry, "flaky removed after grace", |s| s.get(&info.id).is_none()).await?;
    let waited = disconnected.elapsed();
    assert!(waited >= grace / 2, "removed after {waited:?}, grace is {grace:?}");
    Ok(())
}

#[tokio::test]
async fn hand_added_workload_entries_are_left_alone_by_the_follower() -> anyhow::Result<()> {
    let server = Server::start().await?;
    let registry = Registry::new();
    let _follow = registry.follow(&server.server);
    let vm = weft_control::registry::Workload {
        id: "vm-1".to_string(),
        name: "vm-1".to_string(),
        namespace: "shop".to_string(),
        labels: labels(&[("app", "reviews")]),
        service_account: "vm".to_string(),
        ports: Vec::new(),
        addresses: vec!["192.168.1.5".parse()?],
        inbound: None,
        ready: true,
        connected_since: std::time::SystemTime::now(),
        source: WorkloadSource::WorkloadEntry("vm-1".to_string()),
    };
    registry.upsert(vm.clone());
    let info = node("pod", "shop", &[("app", "reviews")], &["10.0.0.5"]);
    let client = Client::start(server.addr, info.clone());
    let snap = wait_registry(&registry, "pod registered", |s| s.get(&info.id).is_some()).await?;
    assert_eq!(snap.select("shop", &labels(&[("app", "reviews")])).len(), 2);
    client.stop().await?;
    let snap = wait_registry(&registry, "pod removed", |s| s.get(&info.id).is_none()).await?;
    assert_eq!(snap.get("vm-1"), Some(&vm));
    Ok(())
}

/// The registrations survive a restart: a registry that persists to a file is restored by
/// the next one as `Restored` workloads (still selected as endpoints); the proxy that
/// reconnects turns its entry back into a proxy registration, the one that does not is
/// removed once the reconnect grace is over.
#[tokio::test]
async fn persisted_registrations_are_restored_until_reconnected_or_the_grace_ends() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let file = data.path().join("state").join(weft_control::registry::REGISTRY_FILE);
    let back = node("back", "shop", &[("app", "reviews")], &["10.0.0.1"]);
    let gone = node("gone", "shop", &[("app", "reviews")], &["10.0.0.2"]);
    {
        let server = Server::start().await?;
        let registry = Registry::new();
        let _follow = registry.follow(&server.server);
        let _persist = registry.persist(file.clone());
        let _clients = [Client::start(server.addr, back.clone()), Client::start(server.addr, gone.clone())];
        wait_registry(&registry, "both registered", |s| s.workloads().count() == 2).await?;
        for _ in 0..200 {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            if text.contains(&back.id) && text.contains(&gone.id) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    // The next control plane: both restored before any proxy is back.
    let registry = Registry::new();
    assert_eq!(registry.restore(&file).map_err(anyhow::Error::msg)?, 2);
    let snap = registry.snapshot();
    assert_eq!(snap.get(&gone.id).map(|w| &w.source), Some(&WorkloadSource::Restored));
    assert_eq!(snap.get(&back.id).map(|w| w.addresses.clone()), Some(vec!["10.0.0.1".parse::<IpAddr>()?]));
    assert_eq!(snap.select("shop", &labels(&[("app", "reviews")])).len(), 2, "restored workloads are endpoints");

    let grace = Duration::from_secs(2);
    let server = Server::start().await?;
    let started = Instant::now();
    let _follow = registry.follow_with(&server.server, FollowConfig { restored_grace: grace, ..Default::default() });
    let _client = Client::start(server.addr, back.clone());
    let snap = wait_registry(&registry, "back reconnected", |s| {
        s.get(&back.id).is_some_and(|w| w.source == WorkloadSource::Proxy)
    })
    .await?;
    if started.elapsed() < grace {
        assert!(snap.get(&gone.id).is_some(), "removed before its grace ended");
    }
    let snap = wait_registry(&registry, "gone removed", |s| s.get(&gone.id).is_none()).await?;
    assert!(started.elapsed() >= grace, "removed after {:?}, grace is {grace:?}", started.elapsed());
    assert_eq!(snap.workloads().map(|w| w.id.as_str()).collect::<Vec<_>>(), vec![back.id.as_str()]);
    Ok(())
}

#[tokio::test]
async fn unreadable_registry_files_are_refused_with_the_file_named() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let registry = Registry::new();
    assert_eq!(registry.restore(&data.path().join("missing.json")).map_err(anyhow::Error::msg)?, 0);
    for (name, text) in [("garbage.json", "{not json"), ("future.json", r#"{"format": 9, "workloads": []}"#)] {
        let path = data.path().join(name);
        std::fs::write(&path, text)?;
        let err = registry.restore(&path).expect_err("an unreadable file is an error");
        assert!(err.contains(name), "{err}");
    }
    assert_eq!(registry.snapshot().workloads().count(), 0);
    Ok(())
}
