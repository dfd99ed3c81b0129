//! The control-plane process (`weft control`): store (watched directory + API), workload
//! registry following the xDS server, translator-backed xDS server, the JSON API the
//! operator CLI talks to, and optionally the `/inject` admission webhook over HTTPS
//! ([`crate::webhook_tls`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;
use weft_identity::service::CertificateAuthority;
use weft_xds::{AdsServer, XdsSource};

use crate::identity::IdentityConfig;
use crate::registry::{FollowConfig, Registry};
use crate::secrets::SecretSource;
use crate::source::MeshXdsSource;
use crate::store::ResourceStore;
use crate::translate::{MeshConfig, ProxyMode};

/// Settings of one control plane.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Directory of resources to watch (None: API only).
    pub dir: Option<PathBuf>,
    /// xDS (gRPC) address, 15010 by convention.
    pub xds: SocketAddr,
    /// JSON API address, 15014 by convention.
    pub api: SocketAddr,
    /// How proxies are reached (explicit local mode or transparent capture).
    pub mode: ProxyMode,
    /// Translator defaults (domain, outbound policy, explicit listener address).
    pub mesh: MeshConfig,
    /// CA, join tokens, certificate service and SDS (None: no identities are issued).
    pub identity: Option<IdentityConfig>,
    /// What the `/inject` admission webhook injects.
    pub inject: crate::inject::InjectConfig,
    /// `POST /inject` over HTTPS for the Kubernetes API server, which calls webhooks
    /// over TLS only (Istio's port 15017); None: `/inject` on the plain-HTTP API only.
    pub webhook: Option<crate::webhook_tls::WebhookTlsConfig>,
    /// Keep the proxies' registrations in a file and restore them at start, awaiting
    /// their proxies' reconnect (`weft control --data-dir`: `registry.json` there); None:
    /// a restarted control plane starts with an empty registry.
    pub registry: Option<crate::registry::PersistConfig>,
}

/// A running control plane.
pub struct ControlPlane {
    /// Bound xDS address.
    pub xds_addr: SocketAddr,
    /// Bound API address.
    pub api_addr: SocketAddr,
    /// Bound webhook (HTTPS) address, when enabled.
    pub webhook_addr: Option<SocketAddr>,
    /// The webhook's serving certificate (re-read from its files), when enabled.
    pub webhook_cert: Option<Arc<crate::webhook_tls::ReloadingCert>>,
    /// The store.
    pub store: Arc<ResourceStore>,
    /// The registry.
    pub registry: Registry,
    /// The xDS server (connections, ACK state).
    pub server: AdsServer,
    /// The xDS source (per-proxy resources).
    pub source: Arc<MeshXdsSource>,
    /// The CA and token issuer, when identity is enabled.
    pub identity: Option<Arc<CertificateAuthority>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Writes the registry file (stopped first on shutdown).
    persist: Option<JoinHandle<()>>,
}

impl ControlPlane {
    /// Binds both servers and starts everything.
    pub async fn start(cfg: ControlConfig) -> Result<ControlPlane, String> {
        let store = match &cfg.dir {
            Some(d) => ResourceStore::open_dir(d).map_err(|e| format!("resources directory: {e}"))?,
            None => ResourceStore::in_memory(),
        };
        let snap = store.snapshot();
        for e in &snap.errors {
            tracing::warn!("{e}");
        }
        info!(resources = snap.resources.len(), errors = snap.errors.len(), "store loaded");
        let registry = Registry::new();
        let mut follow = FollowConfig::default();
        if let Some(p) = &cfg.registry {
            match registry.restore(&p.path) {
                Ok(n) => {
                    info!(workloads = n, grace = ?p.reconnect_grace, "registry restored; awaiting reconnects")
                }
                Err(e) => tracing::warn!(error = %e, "registry not restored; starting empty"),
            }
            follow.restored_grace = p.reconnect_grace;
        }
        let source = MeshXdsSource::new(store.clone(), registry.clone(), cfg.mode, cfg.mesh.clone());
        let identity = match &cfg.identity {
            Some(ic) => Some(ic.start().map_err(|e| format!("identity: {e}"))?),
            None => None,
        };
        let secrets = match (&identity, &cfg.identity) {
            (Some(authority), Some(ic)) => Some(SecretSource::new(source.clone(), authority.clone(), ic.cert_ttl)),
            _ => None,
        };
        let served: Arc<dyn XdsSource> = match &secrets {
            Some(s) => s.clone(),
            None => source.clone(),
        };
        let metrics = Arc::new(crate::metrics::ControlMetrics::new());
        let server = AdsServer::observed(served, metrics.xds());
        let xds_sock = TcpListener::bind(cfg.xds).await.map_err(|e| format!("cannot bind xDS on {}: {e}", cfg.xds))?;
        let api_sock = TcpListener::bind(cfg.api).await.map_err(|e| format!("cannot bind API on {}: {e}", cfg.api))?;
        let xds_addr = xds_sock.local_addr().unwrap_or(cfg.xds);
        let api_addr = api_sock.local_addr().unwrap_or(cfg.api);
        let webhook = match &cfg.webhook {
            Some(w) => Some(crate::webhook_tls::WebhookServer::bind(w).await.map_err(|e| e.to_string())?),
            None => None,
        };
        let webhook_addr = webhook.as_ref().and_then(|w| w.local_addr());
        let webhook_cert = webhook.as_ref().map(|w| w.certs());
        let (stop, stop_rx) = watch::channel(false);
        let stopped = |rx: &watch::Receiver<bool>| {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let mut tasks = Vec::new();
        if cfg.dir.is_some() {
            tasks.push(store.watch());
        }
        tasks.push(registry.follow_with(&server, follow));
        let persist = cfg.registry.as_ref().map(|p| registry.persist(p.path.clone()));
        tasks.push(tokio::spawn(evict_unused_translations(server.clone(), Arc::downgrade(&source))));
        let srv = server.clone();
        let xds_stop = stopped(&stop_rx);
        let routes = match &identity {
            Some(authority) => tonic::service::Routes::new(authority.service()),
            None => tonic::service::Routes::default(),
        };
        // Proxies dial in for `weft tap` on the xDS port too.
        let tap = Arc::new(crate::tap::TapRelay::default());
        let routes = routes.add_service(crate::tap::service(&tap));
        tasks.push(tokio::spawn(async move {
            if let Err(e) = srv.serve_with(xds_sock, xds_stop, routes).await {
                tracing::error!(error = %e, "xDS server stopped");
            }
        }));
        let api = Arc::new(crate::api::Api {
            store: store.clone(),
            server: server.clone(),
            source: source.clone(),
            registry: registry.clone(),
            identity: identity.clone(),
            secrets,
            inject: cfg.inject.clone(),
            metrics,
            tap,
        });
        if let Some(w) = webhook {
            tasks.extend(w.spawn(api.clone(), stopped(&stop_rx)));
        }
        tasks.push(tokio::spawn(crate::api::serve(api, api_sock, stopped(&stop_rx))));
        info!(%xds_addr, %api_addr, webhook = ?webhook_addr, identity = identity.is_some(), "control plane started");
        Ok(ControlPlane {
            xds_addr,
            api_addr,
            webhook_addr,
            webhook_cert,
            store,
            registry,
            server,
            source,
            identity,
            stop,
            tasks,
            persist,
        })
    }

    /// Stops both servers. The registry file keeps the registrations of the moment: it
    /// is no longer written once the streams start closing.
    pub async fn shutdown(self) {
        if let Some(p) = self.persist {
            p.abort();
        }
        self.stop.send_replace(true);
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Drops the cached translations of proxy shapes no connected proxy has any more, after
/// connections come and go (at most once per [`SWEEP_INTERVAL`]).
async fn evict_unused_translations(server: AdsServer, source: std::sync::Weak<MeshXdsSource>) {
    let mut changes = server.status_changes();
    loop {
        if changes.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(SWEEP_INTERVAL).await;
        changes.borrow_and_update();
        let Some(source) = source.upgrade() else { return };
        let connections = server.connections();
        let evicted = source.evict_unused(connections.iter().map(|c| &c.raw_node));
        if evicted > 0 {
            tracing::debug!(evicted, "translations of departed proxy shapes evicted");
        }
    }
}

/// How often, at most, unused translations are looked for.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
