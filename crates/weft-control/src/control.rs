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
    /// CA, join tokens, certificate service, SDS and the credentials every xDS and API
    /// caller must present. None is the development mode (`weft control --insecure-dev`):
    /// no identities are issued and nothing is authenticated (a warning says so at start).
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
    /// SLO evaluation interval and the global alert webhook (docs/slo.md).
    pub slo: crate::slo::SloConfig,
    /// How the proxies' request metrics are gathered for the dashboard and SLOs.
    pub stats: crate::meshstats::gather::GatherConfig,
}

/// A running control plane.
pub struct ControlPlane {
    /// Bound xDS address.
    pub xds_addr: SocketAddr,
    /// Bound TLS xDS and certificate address (Istio's 15012), with identity.
    pub xds_tls_addr: Option<SocketAddr>,
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
    /// The SLO engine (`/api/v1/slos`, `weft_slo_*` metrics, alerts).
    pub slo: Arc<crate::slo::SloEngine>,
    /// Rollouts and staged changes (state in `--data-dir`'s `rollouts.json`, or in etcd).
    pub rollouts: Arc<crate::rollout::RolloutController>,
    /// The mesh's request statistics (what the dashboard, SLOs and rollouts read).
    pub stats: crate::meshstats::SharedStats,
    /// The gatherer behind `stats` (scrape rounds, for tests and tools); idle when the
    /// statistics come from Prometheus.
    pub gatherer: Arc<crate::meshstats::gather::Gatherer>,
    /// The JSON API's admin token and its file, when identity is enabled (else the API
    /// is open).
    pub admin_token: Option<(String, PathBuf)>,
    /// Whether this replica leads (always with the directory store; elected through
    /// etcd with `--store etcd://`, or on a Kubernetes Lease with
    /// [`ControlPlane::start_led`]): singleton work runs only on the leader.
    pub leader: crate::leader::Leadership,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Writes the registry file (stopped first on shutdown).
    persist: Option<JoinHandle<()>>,
}

impl ControlPlane {
    /// Binds both servers and starts everything, on the directory store.
    pub async fn start(cfg: ControlConfig) -> Result<ControlPlane, String> {
        Self::start_with(cfg, None, None).await
    }

    /// [`ControlPlane::start`] as one of several replicas sharing `etcd` (`--store
    /// etcd://`): resources applied through the API, proxies' registrations, the CA and
    /// token state live there; every replica serves every proxy; one leads.
    pub async fn start_replica(cfg: ControlConfig, etcd: crate::etcd::EtcdConfig) -> Result<ControlPlane, String> {
        Self::start_with(cfg, Some(etcd), None).await
    }

    /// [`ControlPlane::start`] (on etcd when `etcd` is given) with leadership decided
    /// outside: the Kubernetes Lease election of `weft control --kubernetes`
    /// ([`crate::kubernetes::lease`]), which then replaces etcd's election.
    pub async fn start_led(
        cfg: ControlConfig,
        etcd: Option<crate::etcd::EtcdConfig>,
        leader: crate::leader::Leadership,
    ) -> Result<ControlPlane, String> {
        Self::start_with(cfg, etcd, Some(leader)).await
    }

    async fn start_with(
        cfg: ControlConfig,
        etcd: Option<crate::etcd::EtcdConfig>,
        elected: Option<crate::leader::Leadership>,
    ) -> Result<ControlPlane, String> {
        let etcd = match &etcd {
            Some(e) => Some(crate::etcd::Etcd::connect(e).await?),
            None => None,
        };
        // Tasks started so far: aborted if the start fails half-way.
        let mut shared_tasks = AbortOnError(Vec::new());
        let prometheus: Option<crate::meshstats::SharedStats> = match &cfg.stats.prometheus {
            Some(url) => Some(Arc::new(crate::meshstats::prom::PromStats::new(url, cfg.stats.timeout)?)),
            None => None,
        };
        let store = match &cfg.dir {
            Some(d) => ResourceStore::open_dir(d).map_err(|e| format!("resources directory: {e}"))?,
            None => ResourceStore::in_memory(),
        };
        if let Some(etcd) = &etcd {
            shared_tasks.0.push(crate::etcd::resources::SharedResources::start(etcd.clone(), &store).await?);
        }
        let snap = store.snapshot();
        for e in &snap.errors {
            tracing::warn!("{e}");
        }
        info!(resources = snap.resources.len(), errors = snap.errors.len(), "store loaded");
        let registry = Registry::new();
        let mut follow = FollowConfig::default();
        // With etcd the registrations live there (under the replicas' leases), not in a file.
        let persisted = cfg.registry.as_ref().filter(|_| etcd.is_none());
        if let Some(p) = persisted {
            match registry.restore(&p.path) {
                Ok(n) => {
                    info!(workloads = n, grace = ?p.reconnect_grace, "registry restored; awaiting reconnects")
                }
                Err(e) => tracing::warn!(error = %e, "registry not restored; starting empty"),
            }
            follow.restored_grace = p.reconnect_grace;
        }
        if etcd.is_some() {
            // Registrations restored from etcd after a full outage wait this long.
            follow.restored_grace =
                cfg.registry.as_ref().map_or(crate::registry::DEFAULT_RECONNECT_GRACE, |p| p.reconnect_grace);
        }
        let source = MeshXdsSource::new(store.clone(), registry.clone(), cfg.mode, cfg.mesh.clone());
        let identity = match (&cfg.identity, &etcd) {
            (Some(ic), Some(etcd)) => {
                let (authority, task) =
                    crate::etcd::state::start(etcd.clone(), ic).await.map_err(|e| format!("identity: {e}"))?;
                shared_tasks.0.push(task);
                Some(authority)
            }
            (Some(ic), None) => Some(ic.start().map_err(|e| format!("identity: {e}"))?),
            (None, _) => None,
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
        let allow_anonymous = cfg.identity.as_ref().is_some_and(|i| i.allow_anonymous_xds);
        let admission = crate::xds_auth::XdsAdmission::new(
            identity.clone(),
            registry.clone(),
            allow_anonymous,
            metrics.xds_refused(),
        );
        let admission: Arc<dyn weft_xds::StreamAdmission> = Arc::new(admission);
        let server = AdsServer::admitting(served, metrics.xds(), Some(admission.clone()));
        if identity.is_none() {
            tracing::warn!(
                "development mode (no identity): xDS streams are not authenticated, so any caller that reaches the \
                 xDS port can register as any workload"
            );
        } else if allow_anonymous {
            tracing::warn!("--xds-allow-anonymous: xDS streams without a credential may register as any workload");
        }
        let xds_sock = TcpListener::bind(cfg.xds).await.map_err(|e| format!("cannot bind xDS on {}: {e}", cfg.xds))?;
        let xds_tls = match (&identity, cfg.identity.as_ref().and_then(|i| i.xds_tls)) {
            (Some(authority), Some(addr)) => {
                let sock = TcpListener::bind(addr).await.map_err(|e| format!("cannot bind TLS xDS on {addr}: {e}"))?;
                let (config, _cert) = crate::control_tls::server_config(authority.ca())?;
                Some((sock, config))
            }
            _ => None,
        };
        let xds_tls_addr = xds_tls.as_ref().and_then(|(s, _)| s.local_addr().ok());
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
        let mut started = shared_tasks;
        let tasks = &mut started.0;
        if cfg.dir.is_some() {
            tasks.push(store.watch());
        }
        let leader = match (&etcd, elected) {
            (Some(etcd), Some(leader)) => {
                tasks.extend(crate::etcd::registry::start(etcd.clone(), &registry, leader.is_leader()).await?);
                leader
            }
            (None, Some(leader)) => leader,
            (Some(etcd), None) => {
                let (tx, rx) = watch::channel(false);
                let name = format!("pid {} api {api_addr} xds {xds_addr}", std::process::id());
                tasks.push(crate::etcd::leader::start(etcd.clone(), name, tx));
                // Before following the xDS server: restored registrations get their grace.
                tasks.extend(crate::etcd::registry::start(etcd.clone(), &registry, rx.clone()).await?);
                crate::leader::Leadership::following(rx)
            }
            (None, None) => crate::leader::Leadership::always(),
        };
        tasks.push(registry.follow_with(&server, follow));
        let persist = persisted.map(|p| registry.persist(p.path.clone()));
        tasks.push(tokio::spawn(evict_unused_translations(server.clone(), Arc::downgrade(&source))));
        let srv = server.clone();
        let xds_stop = stopped(&stop_rx);
        let routes = match &identity {
            Some(authority) => tonic::service::Routes::new(authority.service()),
            None => tonic::service::Routes::default(),
        };
        // Proxies dial in for `weft tap` on the xDS port too.
        let tap = Arc::new(crate::tap::TapRelay::new(server.clone(), admission));
        let routes = routes.add_service(crate::tap::service(&tap));
        tasks.push(tokio::spawn(async move {
            if let Err(e) = srv.serve_with(xds_sock, xds_stop, routes).await {
                tracing::error!(error = %e, "xDS server stopped");
            }
        }));
        let gatherer = crate::meshstats::gather::Gatherer::new(cfg.stats.clone());
        let stats: crate::meshstats::SharedStats = match prometheus {
            Some(p) => p,
            None => {
                tasks.push(gatherer.spawn(server.clone()));
                gatherer.clone()
            }
        };
        let slo_notified: Arc<dyn crate::rollout::RolloutStateStore> = match (&etcd, &cfg.registry) {
            (Some(etcd), _) => {
                let (state, started) = crate::etcd::rollouts::EtcdRolloutState::start_at(etcd.clone(), "slo/").await?;
                tasks.extend(started);
                state
            }
            (None, Some(p)) => Arc::new(crate::rollout::FileStateStore::new(p.path.with_file_name("slo-alerts.json"))),
            (None, None) => Arc::new(crate::rollout::MemoryStateStore::default()),
        };
        let slo = crate::slo::SloEngine::replicated(
            stats.clone(),
            &cfg.mesh.domain,
            cfg.slo.clone(),
            slo_notified,
            leader.clone(),
        );
        tasks.push(slo.spawn(store.clone()));
        let rollout_state: Arc<dyn crate::rollout::RolloutStateStore> = match (&etcd, &cfg.registry) {
            (Some(etcd), _) => {
                let (state, started) = crate::etcd::rollouts::EtcdRolloutState::start(etcd.clone()).await?;
                tasks.extend(started);
                state
            }
            (None, Some(p)) => Arc::new(crate::rollout::FileStateStore::new(p.path.with_file_name("rollouts.json"))),
            (None, None) => Arc::new(crate::rollout::MemoryStateStore::default()),
        };
        let rollouts =
            crate::rollout::RolloutController::new(store.clone(), stats.clone(), rollout_state, &cfg.mesh.domain);
        source.set_staging(rollouts.staging.clone());
        tasks.push(rollouts.spawn(leader.is_leader()));
        if let (Some((sock, config)), Some(authority)) = (xds_tls, &identity) {
            let srv = server.clone();
            let routes = tonic::service::Routes::new(authority.service()).add_service(crate::tap::service(&tap));
            let tls_stop = stopped(&stop_rx);
            let incoming = crate::control_tls::tls_incoming(sock, config);
            tasks.push(tokio::spawn(async move {
                if let Err(e) = srv.serve_incoming(incoming, tls_stop, routes).await {
                    tracing::error!(error = %e, "TLS xDS server stopped");
                }
            }));
        }
        let (auth, admin_token) = match &cfg.identity {
            Some(ic) => {
                let (auth, path) = crate::api_auth::ApiAuth::load(&ic.api, &ic.data_dir)?;
                let token = auth.token().map(|t| (t.to_string(), path));
                (auth, token)
            }
            None => {
                tracing::warn!("development mode (no identity): the JSON API has no admin credential");
                (crate::api_auth::ApiAuth::open(), None)
            }
        };
        let board = etcd.as_ref().map(|e| crate::etcd::status::ProxyBoard::new(e.clone(), xds_addr, api_addr));
        let api = Arc::new(crate::api::Api {
            auth,
            store: store.clone(),
            server: server.clone(),
            source: source.clone(),
            registry: registry.clone(),
            identity: identity.clone(),
            secrets,
            inject: {
                // Injected pods verify the control plane with the mesh root of the moment.
                let mut inject = cfg.inject.clone();
                if inject.control_plane == crate::inject::BOUND_CONTROL_PLANE {
                    inject.control_plane = format!("http://{xds_addr}");
                }
                if let (None, Some(authority)) = (&inject.root_cert, &identity) {
                    inject.root_cert = Some(authority.ca().trust_bundle_pem());
                }
                inject
            },
            metrics,
            slo: slo.clone(),
            rollouts: rollouts.clone(),
            stats: stats.clone(),
            leader: leader.clone(),
            tap,
            replicas: board.clone(),
        });
        if let Some(board) = &board {
            tasks.push(board.spawn(api.clone()));
        }
        if let Some(w) = webhook {
            tasks.extend(w.spawn(api.clone(), stopped(&stop_rx)));
        }
        tasks.push(tokio::spawn(crate::api::serve(api, api_sock, stopped(&stop_rx))));
        info!(%xds_addr, xds_tls = ?xds_tls_addr, %api_addr, webhook = ?webhook_addr, identity = identity.is_some(),
              "control plane started");
        Ok(ControlPlane {
            xds_addr,
            xds_tls_addr,
            api_addr,
            webhook_addr,
            webhook_cert,
            store,
            registry,
            server,
            source,
            identity,
            slo,
            rollouts,
            leader,
            stats,
            gatherer,
            admin_token,
            stop,
            tasks: std::mem::take(tasks),
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

/// Tasks aborted when dropped unless taken (a start that fails half-way leaves none).
struct AbortOnError(Vec<JoinHandle<()>>);

impl Drop for AbortOnError {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Drops the cached translations of proxy shapes no connected proxy has any more, after
/// connections come and go (at most once per [`SWEEP_INTERVAL`]).
async fn evict_unused_translations(server: AdsServer, source: std::sync::Weak<MeshXdsSource>) {
    let mut changes = server.membership_changes();
    loop {
        if changes.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(SWEEP_INTERVAL).await;
        changes.borrow_and_update();
        let Some(source) = source.upgrade() else { return };
        let connections = server.connections();
        let evicted = source.evict_unused(connections.iter().map(|c| &*c.raw_node));
        if evicted > 0 {
            tracing::debug!(evicted, "translations of departed proxy shapes evicted");
        }
    }
}

/// How often, at most, unused translations are looked for.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
