//! `weft up`: the whole mesh in one process tree — the control plane (in this process),
//! one sidecar per `LocalWorkload`, the workloads themselves, an ingress gateway and an
//! egress gateway (`egress`) — torn down completely on Ctrl-C / SIGTERM.
//!
//! Order: network (transparent mode) → control plane → sidecars and gateway → (each
//! sidecar ready) → its app. An app that exits on its own stops its sidecar
//! (`/quitquitquit`). Everything `weft up` creates lives under one temporary directory
//! (bootstraps, CA, logs unless `--logs`), one bridge and its namespaces, and the state
//! file `weft apply` uses to find the control plane; teardown removes all of it.

mod egress;
mod etcd_tls;
mod netns;
mod plan;
mod procs;
mod replicas;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::sync::mpsc;
use weft_control::control::{ControlConfig, ControlPlane};
use weft_control::identity::IdentityConfig;
use weft_control::translate::{MeshConfig, ProxyMode};
use weft_identity::service::CertificateAuthority;

use crate::local::{self, LocalMesh};
use plan::{Mode, ProxySettings, Workload};
use procs::Proc;

/// `println!` that never panics: the terminal (or pipe) may be gone while `weft up`
/// still has to tear everything down.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that never panics.
macro_rules! warn_user {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Bookinfo, run when no `-f` is given.
const DEMO: [(&str, &str); 2] = [
    ("bookinfo.yaml", include_str!("../../demo/bookinfo.yaml")),
    ("bookinfo-gateway.yaml", include_str!("../../demo/bookinfo-gateway.yaml")),
];
/// The gateway's server port the ingress port stands for (Istio's ingress gateway
/// container port, the one `bookinfo-gateway.yaml` names).
const GATEWAY_SERVER_PORT: u16 = 8080;
/// The ingress gateway's labels (Istio's default ingress gateway's).
const INGRESS_LABELS: [(&str, &str); 2] = [("istio", "ingressgateway"), ("app", "istio-ingressgateway")];
/// How long a proxy may take to get its certificate and configuration.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a process may take to stop after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(8);

/// Flags of `weft up`.
#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    /// Directory (or file) of resources: Kubernetes Services, Istio resources and
    /// `LocalWorkload`s to run. Default: the bundled Bookinfo demo.
    #[arg(short = 'f', long = "filename")]
    pub dir: Option<PathBuf>,
    /// Host port of the ingress gateway's HTTP server (the Gateway's port 8080).
    #[arg(long, default_value_t = 8080)]
    pub ingress_port: u16,
    /// Address the ingress port is bound on.
    #[arg(long, default_value = "127.0.0.1")]
    pub ingress_address: IpAddr,
    /// Each workload in its own network namespace with iptables capture (Linux, root).
    #[arg(long)]
    pub transparent: bool,
    /// The control plane's JSON API (what `weft apply`, `get`, ... talk to).
    #[arg(long, default_value = "127.0.0.1:15014")]
    pub api: SocketAddr,
    /// The control plane's xDS and certificate port (transparent mode serves it on the
    /// bridge's address, same port).
    #[arg(long, default_value = "127.0.0.1:15010")]
    pub xds: SocketAddr,
    /// Keep the processes' logs in this directory instead of a temporary one.
    #[arg(long)]
    pub logs: Option<PathBuf>,
    /// Sidecar access logs: `off`, or `stdout` (into each sidecar's log file).
    #[arg(long, default_value = "stdout", value_parser = ["off", "stdout"])]
    pub access_log: String,
    /// Run this LocalWorkload's sidecar as a stock Envoy fed by the control plane (as
    /// `weft envoy-bootstrap` writes it) instead of weft's proxy; repeatable. Explicit
    /// mode only.
    #[arg(long = "envoy-sidecar", value_name = "WORKLOAD")]
    pub envoy_sidecars: Vec<String>,
    /// The Envoy binary for `--envoy-sidecar`.
    #[arg(long, env = "WEFT_ENVOY", default_value = "envoy")]
    pub envoy: PathBuf,
    /// Trace every proxy to this collector: `otlp://HOST:PORT` (OTLP/gRPC, e.g. Jaeger's
    /// 4317), `otlp+http://HOST:PORT[/PATH]` (OTLP/HTTP) or `zipkin://HOST:PORT[/PATH]`
    /// (Zipkin v2 JSON): the mesh's default tracing provider (docs/observability.md).
    #[arg(long, value_name = "URL")]
    pub tracing: Option<String>,
    /// Percent of new traces sampled with --tracing (Istio's default is 1; the demo
    /// traces every request).
    #[arg(long, value_name = "PERCENT", default_value_t = 100.0, requires = "tracing")]
    pub trace_sampling: f64,
    /// Istio MeshConfig (YAML) with tracing extension providers and defaults, as for
    /// `weft control --mesh-config`; --tracing replaces its tracing defaults.
    #[arg(long, value_name = "FILE")]
    pub mesh_config: Option<PathBuf>,
    /// How often the control plane scrapes every sidecar's metrics for the dashboard
    /// (docs/dashboard.md).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub stats_interval: Duration,
    /// Read the dashboard's request statistics from this Prometheus (`http://HOST:PORT`)
    /// instead of scraping the sidecars.
    #[arg(long, value_name = "URL")]
    pub prometheus: Option<String>,
    /// Outbound traffic to hosts the mesh does not know (Istio's
    /// `meshConfig.outboundTrafficPolicy.mode`): ALLOW_ANY passes it through,
    /// REGISTRY_ONLY answers HTTP with 502 and closes TCP/TLS connections.
    #[arg(long, default_value = "ALLOW_ANY", value_parser = ["ALLOW_ANY", "REGISTRY_ONLY"])]
    pub outbound_traffic_policy: String,
    /// Control-plane replicas: above 1, a 3-member etcd cluster is started (data in the
    /// state directory) and the replicas share it (`weft control --store etcd://`): the
    /// first in this process, the others as child processes; every proxy knows them all
    /// and fails over (docs/control.md, "Replicas on etcd").
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=5))]
    pub replicas: u16,
    /// The etcd binary for `--replicas`.
    #[arg(long, env = "WEFT_ETCD", default_value = "etcd")]
    pub etcd: PathBuf,
}

/// A started workload.
struct Running {
    workload: Workload,
    proxy: Proc,
    app: Option<Proc>,
}

/// Everything `weft up` holds, so that teardown can run from any point of the start.
struct Up {
    mode: Mode,
    args: UpArgs,
    exe: PathBuf,
    state: Option<tempfile::TempDir>,
    logs: PathBuf,
    network: Option<netns::Network>,
    namespaces: BTreeMap<String, netns::Namespace>,
    control: Option<ControlPlane>,
    /// The control plane's TLS port and the mesh root file its weft proxies verify it with.
    control_tls: Option<(SocketAddr, PathBuf)>,
    recorded: Option<local::Recorded>,
    running: Vec<Running>,
    gateway: Option<Proc>,
    /// The egress gateway (`istio: egressgateway`), its metrics address and its address.
    egress: Option<(Proc, SocketAddr, Ipv4Addr)>,
    exits_tx: mpsc::UnboundedSender<(String, ExitStatus)>,
    /// `--replicas`: the etcd cluster, the child replicas and their xDS addresses.
    etcd: Option<replicas::EtcdCluster>,
    replicas: Vec<Proc>,
    extra_xds: Vec<SocketAddr>,
}

/// Runs the local mesh until Ctrl-C / SIGTERM.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    if let Some(m) = local::running() {
        bail!("a local mesh is already running (pid {}, API {}); stop it first", m.pid, m.api);
    }
    let mode = if args.transparent { Mode::Transparent } else { Mode::Explicit };
    let state = tempfile::Builder::new().prefix("weft-up-").tempdir().context("creating the state directory")?;
    let logs = match &args.logs {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => state.path().join("logs"),
    };
    std::fs::create_dir_all(&logs)?;
    let (exits_tx, mut exits) = mpsc::unbounded_channel();
    let mut up = Up {
        mode,
        exe: std::env::current_exe().context("locating the weft binary")?,
        args,
        state: Some(state),
        logs,
        network: None,
        namespaces: BTreeMap::new(),
        control: None,
        control_tls: None,
        recorded: None,
        running: Vec::new(),
        gateway: None,
        egress: None,
        exits_tx,
        etcd: None,
        replicas: Vec::new(),
        extra_xds: Vec::new(),
    };
    // One listener for the whole run: a SIGTERM that arrives while an exit is handled
    // (between two rounds of the loop below) is kept, not swallowed.
    let mut shutdown = weft_proxy::run::Shutdown::listen();
    let started = tokio::select! {
        r = up.start() => r,
        _ = shutdown.wait() => Err(anyhow::anyhow!("interrupted while starting")),
    };
    if let Err(e) = started {
        warn_user!("weft up: {e:#}");
        warn_user!("stopping what was started...");
        up.teardown().await;
        return Err(e);
    }
    let domain = MeshConfig::default().domain;
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            Some((name, status)) = exits.recv() => up.exited(&name, status).await,
            _ = up.follow_services(&domain) => {}
        }
    }
    say!("stopping: apps, sidecars, gateway, control plane...");
    up.teardown().await;
    say!("weft up: stopped, nothing left behind");
    Ok(())
}

impl Up {
    async fn start(&mut self) -> anyhow::Result<()> {
        let t0 = Instant::now();
        let state = self.state.as_ref().context("state directory gone")?.path().to_path_buf();
        let resources = match &self.args.dir {
            Some(d) => d.clone(),
            None => {
                let d = state.join("resources");
                std::fs::create_dir_all(&d)?;
                for (name, text) in DEMO {
                    std::fs::write(d.join(name), text)?;
                }
                d
            }
        };
        let resources_dir = if resources.is_file() {
            // The store watches directories: a single file is copied into one.
            let d = state.join("resources");
            std::fs::create_dir_all(&d)?;
            let name = resources.file_name().context("resource file without a name")?;
            std::fs::copy(&resources, d.join(name)).with_context(|| format!("reading {}", resources.display()))?;
            d
        } else {
            resources
        };

        let mut xds = self.args.xds;
        if self.mode == Mode::Transparent {
            let net = netns::Network::create()?;
            xds = SocketAddr::new(IpAddr::V4(net.host_address()), xds.port());
            self.network = Some(net);
        }
        let mut mesh = MeshConfig::default();
        if self.args.outbound_traffic_policy == "REGISTRY_ONLY" {
            mesh.outbound_policy = weft_control::translate::OutboundPolicy::RegistryOnly;
        }
        if let Some(f) = &self.args.mesh_config {
            let file =
                weft_control::meshconfig::MeshConfigFile::load(f).map_err(|e| anyhow::anyhow!("--mesh-config {e}"))?;
            mesh.tracing = file.tracing;
            if let Some(ns) = file.root_namespace {
                mesh.root_namespace = ns;
            }
        }
        if let Some(url) = &self.args.tracing {
            mesh.tracing = weft_control::meshconfig::MeshTracing::from_url(url, self.args.trace_sampling)
                .map_err(|e| anyhow::anyhow!("--tracing {e}"))?;
        }
        let domain = mesh.domain.clone();
        let trust_domain = mesh.trust_domain.clone();
        let shared = self.args.replicas > 1;
        if shared {
            if self.args.tracing.is_some() {
                bail!("--replicas with --tracing: give the tracing provider in --mesh-config instead (every replica reads it)");
            }
            let logs = self.logs.clone();
            self.etcd = Some(replicas::start_etcd(&self.args.etcd, &state, &logs, &self.exits_tx)?);
        }
        let cfg = ControlConfig {
            dir: Some(resources_dir.clone()),
            xds,
            api: self.args.api,
            mode: match self.mode {
                Mode::Explicit => ProxyMode::Explicit,
                Mode::Transparent => ProxyMode::Transparent,
            },
            mesh,
            // Local and loopback: reads are open (dashboards, curl); changes need the
            // admin token, which the operator commands find through the state file.
            // weft sidecars reach the TLS port (any free port beside --xds); Envoy
            // sidecars stay on --xds with their join token.
            identity: Some(IdentityConfig {
                api: weft_control::api_auth::ApiAuthConfig { token_file: None, read_anonymous: true },
                xds_tls: Some(SocketAddr::new(xds.ip(), 0)),
                ..IdentityConfig::new(state.join("ca"))
            }),
            inject: Default::default(),
            webhook: None,
            // Its proxies are children of this process and stop with it (and explicit mode
            // picks new addresses each run): nothing to wait for after a restart.
            registry: None,
            slo: Default::default(),
            stats: weft_control::meshstats::gather::GatherConfig {
                interval: self.args.stats_interval,
                prometheus: self.args.prometheus.clone(),
                ..Default::default()
            },
        };
        let cp = match &self.etcd {
            Some(etcd) => start_first_replica(cfg, &etcd.config).await,
            None => ControlPlane::start(cfg).await,
        }
        .map_err(|e| anyhow::anyhow!("control plane: {e} (another control plane on these ports? see --api / --xds)"))?;
        let (xds, api) = (cp.xds_addr, cp.api_addr);
        let authority = cp.identity.clone().context("the control plane has no CA")?;
        if let Some(tls) = cp.xds_tls_addr {
            let root = state.join("mesh-root.pem");
            std::fs::write(&root, authority.ca().trust_bundle_pem())
                .with_context(|| format!("cannot write {}", root.display()))?;
            self.control_tls = Some((tls, root));
        }
        // The Service of the egress gateway, as Istio installs it.
        let r = cp.store.apply(egress::SERVICE, Path::new("weft-up/istio-egressgateway.yaml"));
        if let Some(e) = r.errors.first() {
            bail!("the egress gateway's Service: {e}");
        }
        let snapshot = cp.store.snapshot();
        for e in &snapshot.errors {
            warn_user!("weft up: {e}");
        }
        self.control = Some(cp);
        let api_token_file = self.control.as_ref().and_then(|c| c.admin_token.as_ref()).map(|(_, f)| f.clone());
        if let Some(etcd) = &self.etcd {
            for i in 1..usize::from(self.args.replicas) {
                let data = state.join(format!("replica-{i}"));
                let flags = replicas::ReplicaFlags {
                    exe: &self.exe,
                    store: &etcd.config,
                    dir: &resources_dir,
                    data: &data,
                    ip: xds.ip(),
                    transparent: self.mode == Mode::Transparent,
                    mesh_config: self.args.mesh_config.as_deref(),
                    api_token_file: api_token_file.as_deref(),
                };
                let (p, addr) = replicas::start_replica(i, &flags, &self.logs, &self.exits_tx)?;
                replicas::wait_listening(&p, addr, &p.name).await?;
                self.replicas.push(p);
                self.extra_xds.push(addr);
            }
        }
        let ingress = SocketAddr::new(self.args.ingress_address, self.args.ingress_port);

        // Explicit mode: every workload on a loopback /24 of its own choosing.
        let lo: [u8; 2] = [rand::random::<u8>().max(1), rand::random::<u8>()];
        let net_subnet = self.network.as_ref().map(|n| n.subnet);
        let ip_of = |i: usize| match net_subnet {
            Some(r) => Ipv4Addr::new(10, 250, r, (i + 2) as u8),
            None => Ipv4Addr::new(127, lo[0], lo[1], (i + 2) as u8),
        };
        let suffix = |_: &str| {
            const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
            (0..5).map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char).collect::<String>()
        };
        let workloads = plan::workloads(&snapshot.resources, self.mode, ip_of, suffix);
        if workloads.len() > 250 {
            bail!("{} LocalWorkloads: at most 250 run on one machine", workloads.len());
        }
        self.recorded = local::record(&LocalMesh {
            pid: std::process::id(),
            api: api.to_string(),
            xds: xds.to_string(),
            ingress: format!("http://{ingress}"),
            mode: if self.mode == Mode::Explicit { "explicit" } else { "transparent" }.into(),
            logs: Some(self.logs.clone()),
            admin_token_file: self.control.as_ref().and_then(|c| c.admin_token.as_ref()).map(|(_, f)| f.clone()),
            workloads: workloads
                .iter()
                .map(|w| local::RecordedWorkload {
                    name: w.name.clone(),
                    namespace: w.namespace.clone(),
                    ip: w.ip.to_string(),
                    netns: self.network.as_ref().map(|n| n.namespace_name(&w.name)),
                    env: w.env.clone(),
                })
                .collect(),
        })?;
        let hosts = netns::hosts_file(&netns::service_addresses(&snapshot.resources), &domain);
        for name in &self.args.envoy_sidecars {
            if self.mode == Mode::Transparent {
                bail!("--envoy-sidecar {name}: Envoy sidecars run in explicit mode only (drop --transparent)");
            }
            if !workloads.iter().any(|w| &w.name == name) {
                let known: Vec<&str> = workloads.iter().map(|w| w.name.as_str()).collect();
                bail!("--envoy-sidecar {name}: no LocalWorkload of that name (there are: {})", known.join(", "));
            }
        }

        // Sidecars first (all at once), the gateway beside them.
        for w in &workloads {
            let proxy = self.start_sidecar(w, xds, &authority, &hosts, &state, &domain).await?;
            self.running.push(Running { workload: w.clone(), proxy, app: None });
        }
        let gateway_metrics = self.start_gateway(xds, &authority, &state, &domain).await?;
        // The egress gateway on an address of its own: the loopback address after the
        // workloads' (explicit), the bridge's host address (transparent).
        let egress_ip = match &self.network {
            Some(n) => n.host_address(),
            None => ip_of(250),
        };
        self.start_egress(egress_ip, xds, &authority, &state, &domain).await?;
        for r in &self.running {
            let what = format!("{} sidecar", r.workload.name);
            if self.is_envoy(&r.workload) {
                wait_ready_at(&r.proxy, r.workload.admin(), "/ready", &what).await?;
            } else {
                wait_ready(&r.proxy, r.workload.metrics(), &what).await?;
            }
        }
        // Then each app, once its sidecar is ready.
        for i in 0..self.running.len() {
            let w = self.running[i].workload.clone();
            let app = self.start_app(&w)?;
            self.running[i].app = Some(app);
        }
        if let Some(g) = &self.gateway {
            wait_ready(g, gateway_metrics, "ingress gateway").await?;
        }
        if let Some((g, metrics, _)) = &self.egress {
            wait_ready(g, *metrics, "egress gateway").await?;
        }
        for r in &self.running {
            let Some(app) = &r.app else { continue };
            for p in &r.workload.ports {
                let addr = SocketAddr::new(IpAddr::V4(r.workload.ip), p.port);
                if !wait_connect(addr, Duration::from_secs(20), || app.exit_status().is_some()).await
                    && app.exit_status().is_none()
                {
                    warn_user!("weft up: {} does not accept connections on {addr} yet", r.workload.name);
                }
            }
        }
        if serves_ingress(&snapshot.resources) {
            if !wait_connect(ingress, Duration::from_secs(20), || false).await {
                warn_user!("weft up: the ingress gateway does not accept connections on {ingress} yet");
            }
        } else {
            warn_user!(
                "weft up: no Gateway selecting `istio: ingressgateway` serves port {GATEWAY_SERVER_PORT}: the ingress answers once one is applied"
            );
        }
        self.print_summary(ingress, api, xds, &trust_domain, t0.elapsed());
        Ok(())
    }

    /// Transparent mode: Services applied later resolve in every namespace too.
    async fn follow_services(&mut self, domain: &str) {
        let (Some(cp), Some(net)) = (&self.control, &self.network) else {
            return std::future::pending().await;
        };
        let mut changes = cp.store.subscribe();
        while changes.changed().await.is_ok() {
            let snapshot = cp.store.snapshot();
            net.update_hosts(&netns::hosts_file(&netns::service_addresses(&snapshot.resources), domain));
        }
        std::future::pending().await
    }

    async fn start_sidecar(
        &mut self,
        w: &Workload,
        xds: SocketAddr,
        authority: &Arc<CertificateAuthority>,
        hosts: &str,
        state: &Path,
        domain: &str,
    ) -> anyhow::Result<Proc> {
        let token = authority
            .tokens()
            .create(&w.namespace, &w.service_account, Duration::from_secs(24 * 3600))
            .map_err(|e| anyhow::anyhow!("join token for {}: {e}", w.name))?;
        let node = plan::sidecar_node(w, self.mode, domain);
        if self.is_envoy(w) {
            return self.start_envoy_sidecar(w, node, xds, token.token, state);
        }
        let (admin, metrics) = match self.mode {
            Mode::Explicit => (w.admin(), w.metrics()),
            Mode::Transparent => (
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), plan::ADMIN_PORT),
                SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), plan::METRICS_PORT),
            ),
        };
        let settings = ProxySettings {
            xds,
            replicas: self.extra_xds.clone(),
            token: token.token,
            admin,
            metrics,
            access_log: self.args.access_log.clone(),
            tls: self.control_tls.clone(),
        };
        let file = state.join(format!("{}.{}.bootstrap.yaml", w.name, w.namespace));
        std::fs::write(&file, plan::bootstrap(&node, &settings)?)?;
        let log = self.logs.join(format!("{}.sidecar.log", w.name));
        let cmd = match self.mode {
            Mode::Explicit => {
                let mut c = tokio::process::Command::new(&self.exe);
                c.arg("proxy").arg("--bootstrap").arg(&file);
                c
            }
            Mode::Transparent => {
                let net = self.network.as_mut().context("no network")?;
                let index = self.namespaces.len();
                let ns = net.add(index, &w.name, hosts)?;
                if ns.ip != w.ip {
                    bail!("internal: {} planned at {} but its namespace has {}", w.name, w.ip, ns.ip);
                }
                // The init step: capture everything but the proxy's own traffic (GID 1337).
                let status = ns
                    .command(self.exe.as_os_str())
                    .args(["iptables", "--proxy-uid", "1337", "--proxy-gid", "1337"])
                    .output()
                    .await
                    .context("running weft iptables")?;
                if !status.status.success() {
                    bail!("weft iptables in {}: {}", ns.name, String::from_utf8_lossy(&status.stderr).trim());
                }
                let mut c = ns.command(self.exe.as_os_str());
                c.arg("proxy").arg("--bootstrap").arg(&file);
                // The proxy runs with the GID the capture exempts.
                c.gid(1337);
                self.namespaces.insert(w.name.clone(), ns);
                c
            }
        };
        procs::spawn(&format!("{} sidecar", w.name), cmd, &log, self.exits_tx.clone())
    }

    /// Whether `w`'s sidecar is a stock Envoy (`--envoy-sidecar`).
    fn is_envoy(&self, w: &Workload) -> bool {
        self.args.envoy_sidecars.contains(&w.name)
    }

    /// `--envoy-sidecar`: a stock Envoy with the bootstrap `weft envoy-bootstrap` writes,
    /// announcing the same node as a weft sidecar would (plus mesh mTLS through SDS from
    /// the join token), its admin API on the workload's address, port 15000. It serves
    /// no `/stats/prometheus` with Istio's metrics: its weft peers report its traffic.
    fn start_envoy_sidecar(
        &mut self,
        w: &Workload,
        mut node: weft_xds::NodeInfo,
        xds: SocketAddr,
        token: String,
        state: &Path,
    ) -> anyhow::Result<Proc> {
        use weft_control::envoy_bootstrap::{render_node, with_xds_tls, EnvoyBootstrapOptions};
        // The TLS port, verified with the mesh root; the join token stays its credential.
        let (xds, root) = match &self.control_tls {
            Some((tls, root)) => (*tls, Some(root.clone())),
            None => (xds, None),
        };
        node.labels.insert(weft_control::translate::mtls::TLS_MODE_LABEL.into(), "istio".into());
        node.admin = Some(w.admin());
        let options = EnvoyBootstrapOptions {
            name: node.name.clone(),
            namespace: node.namespace.clone(),
            labels: node.labels.clone(),
            service_account: node.service_account.clone(),
            ports: node.ports.clone(),
            instance_ip: IpAddr::V4(w.ip),
            xds,
            admin_port: plan::ADMIN_PORT,
            cluster_id: node.cluster.clone(),
            delta: false,
            inbound: node.inbound,
            outbound: node.outbound,
            join_token: Some(token),
        };
        // The bootstrap puts the admin API on 127.0.0.1; each workload has its own address.
        let mut text = render_node(&options, &node);
        if let Some(root) = root {
            text = with_xds_tls(&text, &root, weft_identity::DEFAULT_TRUST_DOMAIN).map_err(|e| anyhow::anyhow!(e))?;
        }
        let mut bootstrap: serde_json::Value = serde_yaml_ng::from_str(&text)?;
        bootstrap["admin"]["address"]["socket_address"]["address"] = serde_json::json!(w.ip.to_string());
        let file = state.join(format!("{}.{}.envoy.yaml", w.name, w.namespace));
        std::fs::write(&file, serde_json::to_string_pretty(&bootstrap)?)?;
        let log = self.logs.join(format!("{}.sidecar.log", w.name));
        let mut cmd = tokio::process::Command::new(&self.args.envoy);
        cmd.arg("-c").arg(&file).args(["--concurrency", "1", "--use-dynamic-base-id", "-l", "warning"]);
        procs::spawn(&format!("{} sidecar", w.name), cmd, &log, self.exits_tx.clone())
            .with_context(|| format!("starting Envoy {} (--envoy / WEFT_ENVOY)", self.args.envoy.display()))
    }

    fn start_app(&mut self, w: &Workload) -> anyhow::Result<Proc> {
        let Some(first) = w.argv.first() else {
            bail!("LocalWorkload {}/{}: spec.command is empty", w.namespace, w.name);
        };
        let program: std::ffi::OsString = if first == "weft" { self.exe.clone().into() } else { first.into() };
        let mut cmd = match self.mode {
            Mode::Explicit => tokio::process::Command::new(&program),
            Mode::Transparent => {
                let ns = self.namespaces.get(&w.name).context("no namespace")?;
                ns.command(&program)
            }
        };
        cmd.args(&w.argv[1..]);
        for k in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY"] {
            cmd.env_remove(k);
        }
        cmd.envs(&w.env);
        let log = self.logs.join(format!("{}.log", w.name));
        procs::spawn(&w.name, cmd, &log, self.exits_tx.clone())
    }

    async fn start_gateway(
        &mut self,
        xds: SocketAddr,
        authority: &Arc<CertificateAuthority>,
        state: &Path,
        domain: &str,
    ) -> anyhow::Result<SocketAddr> {
        let (ns, sa) = ("istio-system", "istio-ingressgateway-service-account");
        let token = authority
            .tokens()
            .create(ns, sa, Duration::from_secs(24 * 3600))
            .map_err(|e| anyhow::anyhow!("join token for the gateway: {e}"))?;
        let admin = free_port(Ipv4Addr::LOCALHOST).await?;
        let metrics = free_port(Ipv4Addr::LOCALHOST).await?;
        let pod = "istio-ingressgateway-local";
        let labels: BTreeMap<String, String> =
            INGRESS_LABELS.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let node = weft_xds::NodeInfo {
            id: format!("router~127.0.0.1~{pod}.{ns}~{ns}.svc.{domain}"),
            cluster: format!("istio-ingressgateway.{ns}"),
            name: pod.into(),
            // Istio's ingress gateway Deployment.
            workload_name: "istio-ingressgateway".into(),
            cluster_id: weft_xds::node::DEFAULT_CLUSTER_ID.into(),
            namespace: ns.into(),
            labels,
            service_account: sa.into(),
            instance_ips: vec!["127.0.0.1".into()],
            gateway_ports: [(GATEWAY_SERVER_PORT, self.args.ingress_port)].into_iter().collect(),
            gateway_address: Some(self.args.ingress_address),
            ..Default::default()
        };
        let settings = ProxySettings {
            xds,
            replicas: self.extra_xds.clone(),
            token: token.token,
            admin,
            metrics,
            access_log: self.args.access_log.clone(),
            tls: self.control_tls.clone(),
        };
        let file = state.join("istio-ingressgateway.bootstrap.yaml");
        std::fs::write(&file, plan::bootstrap(&node, &settings)?)?;
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("proxy").arg("--bootstrap").arg(&file);
        let log = self.logs.join("istio-ingressgateway.log");
        self.gateway = Some(procs::spawn("ingress gateway", cmd, &log, self.exits_tx.clone())?);
        Ok(metrics)
    }

    /// Starts the egress gateway (`egress`) with its servers bound on `ip`.
    async fn start_egress(
        &mut self,
        ip: Ipv4Addr,
        xds: SocketAddr,
        authority: &Arc<CertificateAuthority>,
        state: &Path,
        domain: &str,
    ) -> anyhow::Result<()> {
        let token = authority
            .tokens()
            .create(egress::NAMESPACE, egress::SERVICE_ACCOUNT, Duration::from_secs(24 * 3600))
            .map_err(|e| anyhow::anyhow!("join token for the egress gateway: {e}"))?;
        let metrics = free_port(Ipv4Addr::LOCALHOST).await?;
        let settings = ProxySettings {
            xds,
            replicas: self.extra_xds.clone(),
            token: token.token,
            admin: free_port(Ipv4Addr::LOCALHOST).await?,
            metrics,
            access_log: self.args.access_log.clone(),
            tls: self.control_tls.clone(),
        };
        let file = state.join("istio-egressgateway.bootstrap.yaml");
        std::fs::write(&file, plan::bootstrap(&egress::node(ip, domain), &settings)?)?;
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("proxy").arg("--bootstrap").arg(&file);
        let log = self.logs.join("istio-egressgateway.log");
        self.egress = Some((procs::spawn("egress gateway", cmd, &log, self.exits_tx.clone())?, metrics, ip));
        Ok(())
    }

    fn print_summary(&self, ingress: SocketAddr, api: SocketAddr, xds: SocketAddr, trust_domain: &str, took: Duration) {
        let mode = match self.mode {
            Mode::Explicit => "explicit (apps use their sidecar as HTTP proxy)",
            Mode::Transparent => "transparent (network namespaces, iptables capture)",
        };
        say!("weft up: mesh ready in {:.1}s — {mode}", took.as_secs_f64());
        let page = if self.args.dir.is_none() { "productpage" } else { "" };
        say!("  ingress        http://{ingress}/{page}");
        if let Some((_, _, ip)) = &self.egress {
            say!("  egress         istio-egressgateway.istio-system (istio: egressgateway), servers 80/443 on {ip}:8080/8443");
        }
        say!("  control plane  API http://{api}   xDS {xds}   (weft get vs, weft apply -f ..., weft proxy-status)");
        say!("  dashboard      http://{api}/dashboard   (weft dashboard --open)");
        if let Some(etcd) = &self.etcd {
            let more: Vec<String> = self.extra_xds.iter().map(ToString::to_string).collect();
            say!(
                "  replicas       {} more on xDS {} (child processes; logs control-replica-N.log)",
                more.len(),
                more.join(", ")
            );
            say!(
                "  etcd           {} (3 members, TLS with client certificates; data in the state directory)",
                etcd.config.endpoints.join(",")
            );
        }
        say!("  logs           {}", self.logs.display());
        if let Some(url) = &self.args.tracing {
            say!("  tracing        {url}, {}% of new traces sampled (docs/observability.md)", self.args.trace_sampling);
        }
        if let Some(net) = &self.network {
            say!(
                "  network        bridge {} {}/24, service addresses {}",
                net.bridge,
                net.address(0),
                netns::SERVICE_RANGE
            );
        }
        say!("  workloads:");
        for r in &self.running {
            let w = &r.workload;
            let ports: Vec<String> = w.ports.iter().map(|p| format!("{}:{}", p.name, p.port)).collect();
            let envoy = if self.is_envoy(w) { "  (Envoy sidecar)" } else { "" };
            say!("    {:<16} {:<16} {}  ports {}{envoy}", w.name, w.ip, w.spiffe(trust_domain), ports.join(","));
        }
        say!("Ctrl-C stops everything.");
    }

    /// A process exited on its own: an app (a job) takes its sidecar with it.
    async fn exited(&mut self, name: &str, status: ExitStatus) {
        if let Some(r) = self.running.iter_mut().find(|r| r.app.as_ref().is_some_and(|a| a.name == name)) {
            say!("weft up: {name} exited ({status}); stopping its sidecar");
            match self.mode {
                Mode::Explicit => {
                    if http_status(r.workload.admin(), "POST", "/quitquitquit").await.is_none() {
                        r.proxy.stop(STOP_GRACE).await;
                    }
                }
                // The admin port is the namespace's loopback: SIGTERM drains the same way.
                Mode::Transparent => r.proxy.stop(STOP_GRACE).await,
            }
        } else if self.running.iter().any(|r| r.proxy.name == name)
            || name == "ingress gateway"
            || name == "egress gateway"
            || self.replicas.iter().any(|p| p.name == name)
            || self.etcd.as_ref().is_some_and(|e| e.members.iter().any(|p| p.name == name))
        {
            warn_user!("weft up: {name} exited ({status})");
        }
    }

    async fn teardown(&mut self) {
        let apps = self.running.iter_mut().filter_map(|r| r.app.as_mut()).map(|p| p.stop(STOP_GRACE));
        futures::future::join_all(apps).await;
        let proxies = self.running.iter_mut().map(|r| r.proxy.stop(STOP_GRACE));
        futures::future::join_all(proxies).await;
        if let Some(g) = self.gateway.as_mut() {
            g.stop(STOP_GRACE).await;
        }
        if let Some((g, _, _)) = self.egress.as_mut() {
            g.stop(STOP_GRACE).await;
        }
        let replicas = self.replicas.iter_mut().map(|p| p.stop(STOP_GRACE));
        futures::future::join_all(replicas).await;
        if let Some(cp) = self.control.take() {
            cp.shutdown().await;
        }
        if let Some(mut etcd) = self.etcd.take() {
            let members = etcd.members.iter_mut().map(|p| p.stop(STOP_GRACE));
            futures::future::join_all(members).await;
        }
        self.namespaces.clear();
        if let Some(mut net) = self.network.take() {
            for e in net.teardown() {
                warn_user!("weft up: teardown: {e}");
            }
        }
        self.recorded.take();
        if let Some(state) = self.state.take() {
            let path = state.path().to_path_buf();
            if let Err(e) = state.close() {
                warn_user!("weft up: removing {}: {e}", path.display());
            }
        }
    }
}

/// The in-process replica, once the new etcd cluster answers (its members take a few
/// seconds to elect a leader).
async fn start_first_replica(
    cfg: ControlConfig,
    etcd: &weft_control::etcd::EtcdConfig,
) -> Result<ControlPlane, String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match ControlPlane::start_replica(cfg.clone(), etcd.clone()).await {
            Ok(cp) => return Ok(cp),
            Err(e) if e.starts_with("etcd") && Instant::now() < deadline => {
                tracing::debug!(error = %e, "etcd not ready yet");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Waits until `metrics` answers `/healthz/ready` with 200, failing early when the
/// process exits.
async fn wait_ready(p: &Proc, metrics: SocketAddr, what: &str) -> anyhow::Result<()> {
    wait_ready_at(p, metrics, "/healthz/ready", what).await
}

/// Waits until `addr` answers `path` with 200 (Envoy: admin `/ready`), failing early when
/// the process exits.
async fn wait_ready_at(p: &Proc, addr: SocketAddr, path: &str, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = p.exit_status() {
            bail!("{what} exited before it was ready ({status}); see its log");
        }
        if http_status(addr, "GET", path).await == Some(200) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} not ready after {READY_TIMEOUT:?} (health at http://{addr}{path})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a Gateway selecting the local ingress gateway serves the port the ingress
/// port stands for.
fn serves_ingress(resources: &[weft_api::Resource]) -> bool {
    // Gateway API Gateways count as the Istio Gateways they become.
    let converted = weft_control::gwapi::convert(resources, weft_api::analyze::DOMAIN).resources;
    resources.iter().chain(&converted).any(|r| match &r.spec {
        weft_api::Spec::Gateway(g) => {
            g.selector.iter().all(|(k, v)| INGRESS_LABELS.iter().any(|(lk, lv)| lk == k && lv == v))
                && g.servers.iter().any(|s| s.port.number == u32::from(GATEWAY_SERVER_PORT))
        }
        _ => false,
    })
}

/// Waits until `addr` accepts a connection, at most `within`, or until `give_up`.
async fn wait_connect(addr: SocketAddr, within: Duration, give_up: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline && !give_up() {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// One plain HTTP/1.1 request; the status, or None when nothing answered.
async fn http_status(addr: SocketAddr, method: &str, path: &str) -> Option<u16> {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    let fut = async {
        let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.ok()?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string())
            .body(Empty::<Bytes>::new())
            .ok()?;
        let resp = tx.send_request(req).await.ok()?;
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        Some(status)
    };
    tokio::time::timeout(Duration::from_secs(2), fut).await.ok().flatten()
}

/// A free port on `ip` for a child to bind, reserved against other port-0 binds
/// ([`weft_xds::ports`]: tests start many meshes at once).
async fn free_port(ip: Ipv4Addr) -> anyhow::Result<SocketAddr> {
    weft_xds::ports::reserve(ip.into()).context("finding a free port")
}
