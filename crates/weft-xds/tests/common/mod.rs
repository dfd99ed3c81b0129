//! Shared test kit: an in-memory handler, resource builders, server/client starters.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
use envoy_types::util::pack_any;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use weft_xds::type_url::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use weft_xds::{
    AdsClient, AdsServer, Any, Backoff, ClientConfig, ClientStatus, NodeInfo, PortInfo, ResourceHandler,
    ResourceUpdate, StaticSource, XdsMode,
};

pub const NODE_ID: &str = "sidecar~10.0.0.1~pod-1.default~default.svc.cluster.local";
pub const WAIT: Duration = Duration::from_secs(30);

/// A proxy-like state store: LDS/CDS wildcard, RDS names = listener names,
/// EDS names = cluster names. Rejects updates containing a name in `rejected`.
#[derive(Default)]
pub struct MemHandler {
    pub state: Mutex<HandlerState>,
    pub changed: watch::Sender<u64>,
}

#[derive(Default, Clone, Debug)]
pub struct HandlerState {
    pub resources: BTreeMap<String, BTreeMap<String, Any>>,
    /// (type, name) of every removal applied.
    pub removals: Vec<(String, String)>,
    /// (type, names upserted) of every accepted update.
    pub applied: Vec<(String, Vec<String>)>,
    pub rejected: BTreeSet<String>,
    /// (type, full_state) of every update received.
    pub full_state: Vec<(String, bool)>,
}

impl HandlerState {
    pub fn names(&self, type_url: &str) -> BTreeSet<String> {
        self.resources.get(type_url).map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }
}

impl MemHandler {
    pub fn new() -> Arc<Self> {
        Arc::new(MemHandler { state: Mutex::default(), changed: watch::channel(0).0 })
    }

    pub fn snapshot(&self) -> HandlerState {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn reject(&self, name: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.rejected.insert(name.to_string());
        }
    }

    /// Waits until `cond` holds on the handler state.
    pub async fn wait(&self, what: &str, cond: impl Fn(&HandlerState) -> bool) -> HandlerState {
        let mut rx = self.changed.subscribe();
        let result = tokio::time::timeout(WAIT, async {
            loop {
                let snap = self.snapshot();
                if cond(&snap) {
                    return snap;
                }
                if rx.changed().await.is_err() {
                    return snap;
                }
            }
        })
        .await;
        match result {
            Ok(s) => s,
            Err(_) => panic!("timed out waiting for {what}; state: {:?}", self.snapshot()),
        }
    }
}

impl ResourceHandler for MemHandler {
    fn type_urls(&self) -> Vec<&'static str> {
        vec![CLUSTER, ENDPOINT, LISTENER, ROUTE]
    }

    fn apply(&self, type_url: &str, update: ResourceUpdate) -> Result<(), String> {
        let mut s = self.state.lock().map_err(|e| e.to_string())?;
        s.full_state.push((type_url.to_string(), update.full_state));
        if let Some((name, _)) = update.upserts.iter().find(|(n, _)| s.rejected.contains(n)) {
            return Err(format!("{name} is not acceptable"));
        }
        let map = s.resources.entry(type_url.to_string()).or_default();
        let mut removed = Vec::new();
        if update.full_state {
            let new: BTreeMap<String, Any> = update.upserts.iter().cloned().collect();
            removed = map.keys().filter(|k| !new.contains_key(*k)).cloned().collect();
            *map = new;
        } else {
            for (name, any) in &update.upserts {
                map.insert(name.clone(), any.clone());
            }
            for name in &update.removals {
                if map.remove(name).is_some() {
                    removed.push(name.clone());
                }
            }
        }
        let upserted = update.upserts.iter().map(|(n, _)| n.clone()).collect();
        s.removals.extend(removed.into_iter().map(|n| (type_url.to_string(), n)));
        s.applied.push((type_url.to_string(), upserted));
        drop(s);
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    fn interest(&self, type_url: &str) -> Option<BTreeSet<String>> {
        let s = self.state.lock().ok()?;
        match type_url {
            ROUTE => Some(s.names(LISTENER)),
            ENDPOINT => Some(s.names(CLUSTER)),
            _ => None,
        }
    }
}

pub fn listener(name: &str) -> Any {
    pack_any(Listener { name: name.to_string(), ..Default::default() })
}

/// A route configuration; `tag` names its only virtual host so contents can change.
pub fn route(name: &str, tag: &str) -> Any {
    pack_any(RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: tag.to_string(),
            domains: vec!["*".to_string()],
            ..Default::default()
        }],
        ..Default::default()
    })
}

pub fn cluster(name: &str) -> Any {
    pack_any(Cluster { name: name.to_string(), ..Default::default() })
}

pub fn cla(name: &str) -> Any {
    pack_any(ClusterLoadAssignment { cluster_name: name.to_string(), ..Default::default() })
}

/// Source with listener l1, routes l1 and l2, cluster c1 and its endpoints.
pub fn basic_source() -> StaticSource {
    let source = StaticSource::new();
    source.set(LISTENER, vec![listener("l1")]).unwrap();
    source.set(ROUTE, vec![route("l1", "v1"), route("l2", "v1")]).unwrap();
    source.set(CLUSTER, vec![cluster("c1")]).unwrap();
    source.set(ENDPOINT, vec![cla("c1")]).unwrap();
    source
}

pub fn node_info() -> NodeInfo {
    NodeInfo {
        id: NODE_ID.to_string(),
        cluster: "Kubernetes".to_string(),
        name: "pod-1".to_string(),
        namespace: "default".to_string(),
        labels: [("app", "reviews"), ("version", "v1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        service_account: "bookinfo-reviews".to_string(),
        ports: vec![
            PortInfo {
                name: "http".to_string(),
                port: 9080,
                protocol: "TCP".to_string(),
                app_protocol: Some("http".to_string()),
            },
            PortInfo { name: "metrics".to_string(), port: 15020, protocol: "TCP".to_string(), app_protocol: None },
        ],
        instance_ips: vec!["10.0.0.1".to_string(), "fd00::1".to_string()],
        inbound: Some("127.0.0.1:15006".parse().unwrap()),
        outbound: Some("127.0.0.1:15001".parse().unwrap()),
        admin: None,
        metrics: None,
        on_demand: false,
        gateway_ports: Default::default(),
        gateway_address: None,
        ..NodeInfo::default()
    }
}

pub struct RunningServer {
    pub server: AdsServer,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), weft_xds::XdsError>>,
}

impl RunningServer {
    pub async fn start(source: StaticSource, addr: SocketAddr) -> RunningServer {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = AdsServer::new(Arc::new(source));
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server.clone().serve(listener, async {
            let _ = stopped.await;
        }));
        RunningServer { server, addr, stop: Some(stop), task }
    }

    /// Stops serving and waits until the listener is closed.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("server did not stop")
            .expect("server task panicked")
            .expect("server failed");
    }

    pub async fn wait_acked(&self, type_url: &str, version: &str) {
        self.server.wait_acked(NODE_ID, type_url, version, WAIT).await.unwrap();
    }
}

pub struct RunningClient {
    pub status: watch::Receiver<ClientStatus>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl RunningClient {
    pub fn start(addr: SocketAddr, mode: XdsMode, handler: Arc<MemHandler>) -> RunningClient {
        let backoff = Backoff { initial: Duration::from_millis(20), max: Duration::from_millis(200) };
        RunningClient::start_with(addr, mode, handler, backoff)
    }

    pub fn start_with(addr: SocketAddr, mode: XdsMode, handler: Arc<MemHandler>, backoff: Backoff) -> RunningClient {
        let client = AdsClient::new(
            ClientConfig { address: format!("http://{addr}"), node: node_info(), mode, backoff },
            handler,
        );
        let status = client.status();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(client.run(async {
            let _ = stopped.await;
        }));
        RunningClient { status, stop: Some(stop), task }
    }

    pub async fn wait_status(&mut self, what: &str, cond: impl Fn(&ClientStatus) -> bool) -> ClientStatus {
        let result = tokio::time::timeout(WAIT, self.status.wait_for(|s| cond(s))).await.map(|r| r.map(|s| s.clone()));
        match result {
            Ok(Ok(s)) => s,
            _ => panic!("timed out waiting for client status: {what}; {:?}", *self.status.borrow()),
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task).await.expect("client did not stop").expect("client task panicked");
    }
}

pub fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
