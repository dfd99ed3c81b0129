//! Proxy health metrics on `/stats/prometheus`: a config change of one xDS type moves
//! that type's update counter and config age only, and NACKs are counted under the type
//! that was refused.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;

use common::*;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, CustomClusterType};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::util::pack_any;
use weft_testkit::echo::EchoServer;
use weft_testkit::http::get_h1;
use weft_xds::{build, type_url};

/// The value of the series `name{labels}` (labels exactly as printed), if present.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn scrape(metrics: SocketAddr) -> String {
    get_h1(metrics, "metrics", "/stats/prometheus").await.unwrap().text()
}

/// Scrapes until `ready` holds for the page (the metric moved), at most [`WAIT`].
async fn scrape_until(metrics: SocketAddr, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
    loop {
        let page = scrape(metrics).await;
        if ready(&page) {
            return page;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what} never showed on /stats/prometheus:\n{page}");
        tick.tick().await;
    }
}

#[tokio::test]
async fn a_cluster_update_moves_only_the_cluster_series_and_nacks_carry_their_type() {
    let mesh = Mesh::start().await;
    let a = EchoServer::start("a").await;
    everything_to(&mesh, "a", a.addr);
    let proxy = mesh.proxy("health", false).await;
    mesh.synced_all(&proxy).await;
    let m = proxy.metrics_addr();
    const LDS: &str = "weft_xds_updates_total{type=\"Listener\"}";
    const CDS: &str = "weft_xds_updates_total{type=\"Cluster\"}";
    let before =
        scrape_until(m, "the first updates", |p| sample(p, LDS) == Some(1.0) && sample(p, CDS).is_some()).await;
    let cds_before = sample(&before, CDS).unwrap();

    // Only the clusters change.
    let b = EchoServer::start("b").await;
    clusters(&mesh, &[("a", vec![a.addr]), ("b", vec![b.addr])], false);
    mesh.synced(&proxy, type_url::CLUSTER).await;
    let after = scrape_until(m, "the cluster update", |p| sample(p, CDS) > Some(cds_before)).await;
    assert_eq!(sample(&after, LDS), Some(1.0), "the listener update counter must not move:\n{after}");
    let age = |t: &str| sample(&after, &format!("weft_config_age_seconds{{type=\"{t}\"}}")).unwrap();
    assert!(
        age("Listener") > age("Cluster"),
        "the listener's config age must keep counting from its own update, not restart with the cluster's:\n{after}"
    );

    // A cluster the proxy refuses: the NACK is counted as a Cluster NACK.
    let custom = CustomClusterType { name: "envoy.clusters.nope".into(), typed_config: None };
    let bad = Cluster {
        cluster_discovery_type: Some(ClusterDiscoveryType::ClusterType(custom)),
        ..build::eds_cluster("a", false)
    };
    mesh.set(type_url::CLUSTER, vec![pack_any(bad)]);
    const NACK: &str = "weft_xds_nacks_total{type=\"Cluster\"}";
    let nacked = scrape_until(m, "the cluster NACK", |p| sample(p, NACK) == Some(1.0)).await;
    assert!(!nacked.contains("type=\"any\""), "NACKs are labelled with their type:\n{nacked}");
    assert_eq!(sample(&nacked, LDS), Some(1.0), "a NACK is no update:\n{nacked}");
}
