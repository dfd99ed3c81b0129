//! Shared helpers: an ADS server on loopback, a minimal ADS client, waiting on watches.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use weft_control::registry::{Registry, RegistrySnapshot};
use weft_xds::type_url::{CLUSTER, LISTENER};
use weft_xds::{
    AdsClient, AdsServer, Backoff, ClientConfig, ConnectionStatus, NodeInfo, PortInfo, ResourceHandler, ResourceUpdate,
    StaticSource, XdsMode,
};

/// Upper bound of every wait.
pub const WAIT: Duration = Duration::from_secs(30);

/// An [`AdsServer`] over an empty [`StaticSource`] on `127.0.0.1:0`; stops on drop.
pub struct Server {
    pub server: AdsServer,
    pub addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl Server {
    pub async fn start() -> anyhow::Result<Server> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = AdsServer::new(Arc::new(StaticSource::new()));
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server.clone().serve(listener, async {
            let _ = stopped.await;
        }));
        Ok(Server { server, addr, _stop: stop })
    }

    /// Waits until some open connection satisfies `cond`, and returns it.
    pub async fn wait_connection(
        &self,
        what: &str,
        cond: impl Fn(&ConnectionStatus) -> bool,
    ) -> anyhow::Result<ConnectionStatus> {
        let mut changes = self.server.status_changes();
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(c) = self.server.connections().into_iter().find(|c| cond(c)) {
                    return Ok(c);
                }
                changes.changed().await.map_err(|_| anyhow!("server dropped"))?;
            }
        })
        .await;
        found.map_err(|_| anyhow!("timed out waiting for connection: {what}; have {:?}", self.server.connections()))?
    }

    /// Waits until no open connection has node id `id`.
    pub async fn wait_gone(&self, id: &str) -> anyhow::Result<()> {
        let mut changes = self.server.status_changes();
        tokio::time::timeout(WAIT, async {
            while self.server.connections().iter().any(|c| c.node_id == id) {
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .map_err(|_| anyhow!("connection {id} still open"))
    }
}

/// Subscribes to LDS and CDS and accepts whatever comes.
struct AcceptAll;

impl ResourceHandler for AcceptAll {
    fn type_urls(&self) -> Vec<&'static str> {
        vec![CLUSTER, LISTENER]
    }
    fn apply(&self, _type_url: &str, _update: ResourceUpdate) -> Result<(), String> {
        Ok(())
    }
    fn interest(&self, _type_url: &str) -> Option<BTreeSet<String>> {
        None
    }
}

/// A running [`AdsClient`]; [`Client::stop`] ends it and waits for the task.
pub struct Client {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Client {
    pub fn start(addr: SocketAddr, node: NodeInfo) -> Client {
        let client = AdsClient::new(
            ClientConfig {
                address: format!("http://{addr}"),
                node,
                mode: XdsMode::Sotw,
                backoff: Backoff { initial: Duration::from_millis(20), max: Duration::from_millis(200) },
            },
            Arc::new(AcceptAll),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(client.run(async {
            let _ = stopped.await;
        }));
        Client { stop: Some(stop), task }
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task).await.context("client did not stop")?.context("client panicked")
    }
}

/// Waits until the registry's snapshot satisfies `cond`, and returns it.
pub async fn wait_registry(
    registry: &Registry,
    what: &str,
    cond: impl Fn(&RegistrySnapshot) -> bool,
) -> anyhow::Result<Arc<RegistrySnapshot>> {
    let mut changes = registry.changes();
    let found = tokio::time::timeout(WAIT, async {
        loop {
            changes.borrow_and_update();
            let snap = registry.snapshot();
            if cond(&snap) {
                return Ok(snap);
            }
            changes.changed().await.map_err(|_| anyhow!("registry dropped"))?;
        }
    })
    .await;
    found.map_err(|_| {
        let have: Vec<String> = registry.snapshot().workloads().map(|w| w.id.clone()).collect();
        anyhow!("timed out waiting for registry: {what}; have {have:?}")
    })?
}

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// A weft proxy's identity: `<name>.<namespace>` with the given labels, port http:9080.
pub fn node(name: &str, namespace: &str, pairs: &[(&str, &str)], instance_ips: &[&str]) -> NodeInfo {
    NodeInfo {
        id: format!("sidecar~127.0.0.1~{name}.{namespace}~{namespace}.svc.cluster.local"),
        cluster: "Kubernetes".to_string(),
        name: name.to_string(),
        namespace: namespace.to_string(),
        labels: labels(pairs),
        service_account: format!("sa-{name}"),
        ports: vec![PortInfo {
            name: "http".to_string(),
            port: 9080,
            protocol: "TCP".to_string(),
            app_protocol: Some("http".to_string()),
        }],
        instance_ips: instance_ips.iter().map(|s| s.to_string()).collect(),
        inbound: None,
        outbound: None,
        admin: None,
        metrics: None,
        on_demand: false,
        gateway_ports: Default::default(),
        gateway_address: None,
        ..NodeInfo::default()
    }
}
