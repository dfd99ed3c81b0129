//! A real Envoy 1.40 started from `render()` joins an AdsServer as a registered workload.

mod common;

use std::net::SocketAddr;

use common::{labels, wait_registry, Server};
use weft_control::envoy_bootstrap::{parse_labels, parse_ports, render, EnvoyBootstrapOptions};
use weft_control::registry::Registry;
use weft_testkit::envoy::Envoy;
use weft_xds::type_url::{CLUSTER, LISTENER};
use weft_xds::{NodeInfo, XdsMode};

fn options(xds: SocketAddr, delta: bool) -> anyhow::Result<EnvoyBootstrapOptions> {
    Ok(EnvoyBootstrapOptions {
        join_token: None,
        name: "reviews-1".to_string(),
        namespace: "shop".to_string(),
        labels: parse_labels("app=reviews,version=v1").map_err(anyhow::Error::msg)?,
        service_account: "bookinfo-reviews".to_string(),
        ports: parse_ports("http:9080,grpc-api:9090/grpc").map_err(anyhow::Error::msg)?,
        instance_ip: "127.0.0.1".parse()?,
        xds,
        admin_port: 0,
        cluster_id: "Kubernetes".to_string(),
        delta,
        inbound: None,
        outbound: None,
    })
}

/// Starts Envoy on the rendered bootstrap and checks what the server and registry see.
async fn envoy_registers(delta: bool) -> anyhow::Result<()> {
    let server = Server::start().await?;
    let registry = Registry::new();
    let _follow = registry.follow(&server.server);
    let o = options(server.addr, delta)?;
    let envoy = Envoy::start(&render(&o)).await?;

    let id = o.node_id();
    let conn = match server.wait_connection("envoy connected", |c| c.node_id == id).await {
        Ok(c) => c,
        Err(e) => anyhow::bail!("{e:#}\n--- envoy.log ---\n{}", envoy.log_tail()),
    };
    assert_eq!(conn.node_error, None);
    assert_eq!(conn.mode, if delta { XdsMode::Delta } else { XdsMode::Sotw });
    let info = conn.node.ok_or_else(|| anyhow::anyhow!("node metadata did not parse"))?;
    assert_eq!(info, NodeInfo { cluster: "reviews.shop".to_string(), ..o.node_info() });
    assert_eq!(info.name, "reviews-1");
    assert_eq!(info.namespace, "shop");
    assert_eq!(info.labels, labels(&[("app", "reviews"), ("version", "v1")]));
    assert_eq!(info.service_account, "bookinfo-reviews");
    assert_eq!(
        info.ports.iter().map(|p| (p.name.as_str(), p.port)).collect::<Vec<_>>(),
        [("http", 9080), ("grpc-api", 9090)]
    );
    assert_eq!(info.ports[1].app_protocol.as_deref(), Some("grpc"));

    // The Envoy speaks ADS over the static xds-grpc cluster: it ACKs the (empty) CDS and LDS.
    let acked = |c: &weft_xds::ConnectionStatus, t: &str| {
        c.types.get(t).is_some_and(|s| s.sent_version.is_some() && s.acked_version == s.sent_version)
    };
    server
        .wait_connection("envoy ACKed CDS and LDS", |c| c.node_id == id && acked(c, CLUSTER) && acked(c, LISTENER))
        .await?;

    let snap = wait_registry(&registry, "envoy registered", |s| s.get(&id).is_some()).await?;
    let selected: Vec<&str> =
        snap.select("shop", &labels(&[("app", "reviews")])).iter().map(|w| w.id.as_str()).collect();
    assert_eq!(selected, vec![id.as_str()]);

    drop(envoy);
    wait_registry(&registry, "envoy removed after it died", |s| s.get(&id).is_none()).await?;
    Ok(())
}

#[tokio::test]
async fn rendered_bootstrap_registers_a_real_envoy_over_sotw_ads() -> anyhow::Result<()> {
    envoy_registers(false).await
}

#[tokio::test]
async fn rendered_bootstrap_registers_a_real_envoy_over_delta_ads() -> anyhow::Result<()> {
    envoy_registers(true).await
}
