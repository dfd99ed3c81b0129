//! Process wiring for one proxy: xDS client -> config store -> listeners, plus the admin
//! and metrics servers, readiness, and graceful drain.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::info;
use weft_xds::{type_url, AdsClient, Backoff, ClientConfig, ClientStatus};

use crate::admin::{self, AdminState};
use crate::bootstrap::Bootstrap;
use crate::cluster::{PoolConfig, Pools};
use crate::config::ProxyStore;
use crate::context::Context;
use crate::listener::ListenerManager;
use crate::telemetry::accesslog::{AccessLog, Sink};
use crate::telemetry::metrics::Metrics;

/// A running proxy.
pub struct ProxyHandle {
    ctx: Arc<Context>,
    state: Arc<Admin>,
    listeners: watch::Receiver<BTreeMap<String, SocketAddr>>,
    xds: watch::Receiver<ClientStatus>,
    admin_addr: SocketAddr,
    metrics_addr: SocketAddr,
    drain_tx: watch::Sender<bool>,
    stop_tx: watch::Sender<bool>,
    quit: Arc<Notify>,
    tasks: Vec<JoinHandle<()>>,
}

/// Errors starting a proxy.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A server socket could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which server.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The access log could not be opened.
    #[error("access log: {0}")]
    AccessLog(String),
    /// The first certificate could not be obtained.
    #[error("identity: {0}")]
    Identity(String),
}

/// Starts the certificate manager when the bootstrap has an `identity` (the first
/// certificate is in before the proxy connects for config), and marks the node as doing
/// mesh mTLS with Istio's `security.istio.io/tlsMode: istio` label.
async fn start_identity(b: &Bootstrap) -> Result<(crate::tls::Secrets, weft_xds::NodeInfo), StartError> {
    let mut node = b.node.clone();
    let Some(id) = &b.identity else { return Ok((crate::tls::Secrets::default(), node)) };
    let spiffe = weft_identity::SpiffeId::new(&id.trust_domain, &node.namespace, b.service_account())
        .map_err(|e| StartError::Identity(e.to_string()))?;
    let Some(credential) = credential_source(id) else {
        return Err(StartError::Identity(
            "a credential (token, token_file or kubernetes_token_file) is required".into(),
        ));
    };
    let endpoint = id.ca_address.clone().unwrap_or_else(|| b.xds.address.clone());
    let mut cfg = weft_identity::CertManagerConfig::new(endpoint, credential, spiffe);
    cfg.ttl = id.cert_ttl;
    let roots_pem = match (&id.root_cert, &id.root_cert_file) {
        (Some(pem), _) => Some(pem.clone()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| StartError::Identity(format!("identity.root_cert_file {}: {e}", path.display())))?,
        ),
        (None, None) => None,
    };
    if let Some(pem) = roots_pem {
        cfg.root_certs = weft_identity::cert::certs_from_pem(&pem, "identity.root_cert")
            .map_err(|e| StartError::Identity(e.to_string()))?;
    }
    // Renewal retries back off no further than xDS reconnects: a certificate is renewed
    // within about a second of any control-plane replica being reachable again.
    cfg.backoff_max = weft_xds::DEFAULT_MAX_BACKOFF;
    cfg.backoff_initial = cfg.backoff_initial.min(cfg.backoff_max);
    let manager = weft_identity::CertManager::start(cfg).await.map_err(|e| StartError::Identity(e.to_string()))?;
    node.labels.insert("security.istio.io/tlsMode".into(), "istio".into());
    if node.service_account.is_empty() {
        node.service_account = b.service_account().to_string();
    }
    Ok((crate::tls::Secrets::new(Arc::new(manager)), node))
}

/// The bootstrap credential of an identity section.
fn credential_source(id: &crate::bootstrap::IdentitySettings) -> Option<weft_identity::CredentialSource> {
    match (&id.token, &id.token_file, &id.kubernetes_token_file) {
        (Some(t), _, _) => Some(weft_identity::CredentialSource::JoinToken(t.clone())),
        (None, Some(f), _) => Some(weft_identity::CredentialSource::JoinTokenFile(f.clone())),
        (None, None, Some(f)) => Some(weft_identity::CredentialSource::KubernetesTokenFile(f.clone())),
        (None, None, None) => None,
    }
}

/// How long readiness waits for routes and endpoints named by the first listeners and
/// clusters (Envoy's `initial_fetch_timeout`).
const INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);

struct Admin {
    started: Instant,
    ctx: Arc<Context>,
    /// The mesh identity, shown (certificates only) in the config dump.
    secrets: crate::tls::Secrets,
    xds: watch::Receiver<ClientStatus>,
    drain_tx: watch::Sender<bool>,
    quit: Arc<Notify>,
}

impl AdminState for Admin {
    fn config_dump(&self) -> serde_json::Value {
        let identity = self.secrets.manager().map(|m| m.current());
        crate::dump::config_dump(&self.ctx.store.snapshot(), &self.xds.borrow(), identity.as_deref())
    }
    fn clusters(&self) -> String {
        crate::dump::clusters_text(&self.ctx.store.snapshot())
    }
    fn is_ready(&self) -> bool {
        let initial = is_ready(&self.xds.borrow(), self.ctx.store.cds_optional())
            && (self.ctx.store.ready_for_traffic() || self.started.elapsed() >= INITIAL_FETCH_TIMEOUT);
        initial && !*self.drain_tx.borrow()
    }
    fn drain(&self) {
        self.drain_tx.send_replace(true);
    }
    fn quit(&self) {
        self.quit.notify_one();
    }
}

/// Ready once the first listeners and clusters have been accepted (clusters only when
/// some are subscribed: an on-demand proxy whose listeners name none has no CDS yet).
fn is_ready(s: &ClientStatus, cds_optional: bool) -> bool {
    s.acked.contains_key(type_url::LISTENER) && (cds_optional || s.acked.contains_key(type_url::CLUSTER))
}

impl ProxyHandle {
    /// Starts a proxy from its bootstrap.
    pub async fn start(b: Bootstrap) -> Result<ProxyHandle, StartError> {
        let metrics = Arc::new(Metrics::new());
        let sink = match b.access_log.as_str() {
            "off" | "" => Sink::Off,
            "stdout" => Sink::Stdout,
            path => Sink::File(path.into()),
        };
        let access_log = AccessLog::new(sink)
            .map_err(|e| StartError::AccessLog(e.to_string()))?
            .count_drops_in(metrics.proxy().access_log_dropped());
        let (drain_tx, draining) = watch::channel(false);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (secrets, node) = start_identity(&b).await?;
        if let Some(manager) = secrets.manager() {
            // weft_cert_expiry_timestamp_seconds follows every renewal.
            let mut rx = manager.identity();
            let m = metrics.clone();
            tokio::spawn(async move {
                loop {
                    let not_after = rx.borrow_and_update().not_after;
                    m.proxy().set_cert_expiry(not_after);
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            });
        }
        // The proxy's own SPIFFE id (`destination_principal` of what it serves), with mesh mTLS.
        let principal = b
            .identity
            .as_ref()
            .and_then(|id| weft_identity::SpiffeId::new(&id.trust_domain, &node.namespace, b.service_account()).ok());
        let local = crate::report::local_workload(&node, principal.map(|p| p.to_string()).as_deref());
        let store = ProxyStore::with_options(b.xds.on_demand(), secrets.clone());
        let (tracer, span_exporter) = crate::telemetry::trace::Tracer::new(
            crate::telemetry::trace::LocalNode::from_node(&node),
            metrics.tracing().clone(),
            crate::telemetry::trace::QUEUE_CAPACITY,
        );
        store.count_host_evictions_in(metrics.proxy().on_demand_host_evictions());
        let ctx = Arc::new(Context {
            store: store.clone(),
            pools: Pools::new(PoolConfig::default()),
            metrics: metrics.clone(),
            access_log,
            local_peer: crate::telemetry::peer::encode(&local, &node.id, &node.name),
            local_plain: Arc::new(crate::telemetry::WorkloadInfo {
                principal: crate::telemetry::UNKNOWN.into(),
                ..local.clone()
            }),
            local_service: Arc::new(crate::telemetry::ServiceInfo {
                host: local.canonical_service.clone(),
                name: local.canonical_service.clone(),
                namespace: local.namespace.clone(),
            }),
            local: Arc::new(local),
            peers: crate::telemetry::peer::DecodeCache::default(),
            unknown_peer: Arc::new(crate::telemetry::WorkloadInfo::default()),
            unknown_service: Arc::new(crate::telemetry::ServiceInfo::default()),
            services: crate::telemetry::services::ServiceCache::default(),
            draining,
            drain_timeout: b.drain_timeout,
            drain_duration: b.drain_duration,
            active_connections: AtomicUsize::new(0),
            tracer,
            tap: Arc::new(crate::telemetry::tap::TapHub::new(
                crate::telemetry::tap::QUEUE_CAPACITY,
                metrics.proxy().tap(),
            )),
        });

        let admin_sock = TcpListener::bind(b.admin).await.map_err(|source| StartError::Bind {
            what: "admin",
            addr: b.admin,
            source,
        })?;
        let metrics_sock = TcpListener::bind(b.metrics).await.map_err(|source| StartError::Bind {
            what: "metrics",
            addr: b.metrics,
            source,
        })?;
        let admin_addr = admin_sock.local_addr().unwrap_or(b.admin);
        let metrics_addr = metrics_sock.local_addr().unwrap_or(b.metrics);

        // Operators' tools find the admin and metrics servers through the control plane.
        let node = weft_xds::NodeInfo {
            admin: Some(admin_addr),
            metrics: Some(metrics_addr),
            on_demand: b.xds.on_demand(),
            ..node
        };
        let tap_node = node.id.clone();
        let mut client = AdsClient::new(
            ClientConfig { address: b.xds.address.clone(), node, mode: b.xds.mode.into(), backoff: Backoff::default() },
            store.clone(),
        );
        let mut transport: Option<Arc<dyn weft_xds::XdsTransport>> = None;
        if let (Some(manager), Some(credential)) = (secrets.manager(), b.identity.as_ref().and_then(credential_source))
        {
            let channel = crate::control_channel::ControlChannel::new(&b.xds.address, manager, credential)
                .map_err(StartError::Identity)?;
            let channel = Arc::new(channel);
            transport = Some(channel.clone());
            client = client.with_transport(channel);
        }
        let xds = client.status();
        let mut tasks = Vec::new();
        let stop = |rx: &watch::Receiver<bool>| {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        tasks.push(tokio::spawn(client.run(stop(&stop_rx))));
        // Taps arrive on a stream this proxy dials to the control plane.
        let tap =
            crate::telemetry::tap::run(ctx.tap.clone(), b.xds.address.clone(), tap_node, transport, stop(&stop_rx));
        tasks.push(tokio::spawn(tap));
        tasks.push(tokio::spawn(watch_xds(xds.clone(), metrics.clone(), stop(&stop_rx))));
        // Spans leave in the background, never on a request's path.
        tasks.push(tokio::spawn(span_exporter.run(store.clone(), stop(&stop_rx))));

        let manager = ListenerManager::new(ctx.clone());
        let listeners = manager.addresses();
        // Listeners stop accepting as soon as a drain starts.
        tasks.push(tokio::spawn(manager.run(ctx.draining.clone())));

        let quit = Arc::new(Notify::new());
        let admin_state = Arc::new(Admin {
            started: Instant::now(),
            ctx: ctx.clone(),
            secrets,
            xds: xds.clone(),
            drain_tx: drain_tx.clone(),
            quit: quit.clone(),
        });
        tasks.push(tokio::spawn(admin::serve_admin(admin_sock, admin_state.clone(), stop(&stop_rx))));
        let ready_state = admin_state.clone();
        let ready: Arc<dyn Fn() -> bool + Send + Sync> = Arc::new(move || ready_state.is_ready());
        tasks.push(tokio::spawn(admin::serve_metrics(metrics_sock, metrics, ready, stop(&stop_rx))));
        info!(%admin_addr, %metrics_addr, xds = %b.xds.address, "proxy started");
        Ok(ProxyHandle {
            ctx,
            state: admin_state,
            listeners,
            xds,
            admin_addr,
            metrics_addr,
            drain_tx,
            stop_tx,
            quit,
            tasks,
        })
    }

    /// The shared context (for tests and diagnostics).
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Admin server address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Metrics server address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// xDS client status.
    pub fn xds_status(&self) -> watch::Receiver<ClientStatus> {
        self.xds.clone()
    }

    /// Bound addresses of the LDS listeners.
    pub fn listener_addrs(&self) -> BTreeMap<String, SocketAddr> {
        self.listeners.borrow().clone()
    }

    /// Waits until listener `name` is bound and returns its address.
    pub async fn listener_addr(&self, name: &str, timeout: Duration) -> Option<SocketAddr> {
        let mut rx = self.listeners.clone();
        let r = tokio::time::timeout(timeout, rx.wait_for(|m| m.contains_key(name))).await;
        match r {
            Ok(Ok(m)) => m.get(name).copied(),
            _ => None,
        }
    }

    /// Waits until the proxy is ready: first listeners and clusters accepted and the
    /// routes and endpoints they name received (or the initial fetch timeout passed).
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut xds = self.xds.clone();
        let mut config = self.ctx.store.subscribe();
        let r = tokio::time::timeout(timeout, async {
            while !self.state.is_ready() {
                tokio::select! {
                    _ = xds.changed() => {}
                    _ = config.changed() => {}
                    // The initial fetch timeout passes without any event.
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        })
        .await;
        r.is_ok()
    }

    /// Resolves when `/quitquitquit` is called.
    pub async fn quit_requested(&self) {
        self.quit.notified().await
    }

    /// Graceful drain: stop accepting, let in-flight requests finish (at most the drain
    /// timeout), then stop everything.
    pub async fn shutdown(self) {
        self.drain_tx.send_replace(true);
        let deadline = Instant::now() + self.ctx.drain_timeout;
        while self.ctx.active_connections.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop_tx.send_replace(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
    }
}

/// Mirrors the xDS client's status into the proxy health metrics: per type, only the
/// updates and NACKs that happened since the last look move that type's series.
async fn watch_xds(
    mut rx: watch::Receiver<ClientStatus>,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut seen = XdsSeen::default();
    loop {
        {
            let s = rx.borrow_and_update();
            seen.report(&s, &metrics);
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = &mut stop => return,
        }
    }
}

/// Per type URL, the update and NACK counts already reported to the metrics.
#[derive(Default)]
struct XdsSeen {
    updates: BTreeMap<String, u64>,
    nacks: BTreeMap<String, u64>,
}

impl XdsSeen {
    fn report(&mut self, s: &ClientStatus, metrics: &Metrics) {
        let health = metrics.proxy();
        health.set_xds_connected(s.connected);
        for (t, &n) in &s.updates {
            let before = self.updates.insert(t.clone(), n).unwrap_or(0);
            let version = s.acked.get(t).map(String::as_str).unwrap_or_default();
            for _ in before..n {
                health.config_applied(type_url::short(t), version);
            }
        }
        for (t, &n) in &s.nacks_by_type {
            let before = self.nacks.insert(t.clone(), n).unwrap_or(0);
            for _ in before..n {
                health.xds_nack(type_url::short(t));
            }
        }
    }
}
