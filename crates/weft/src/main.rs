//! The `weft` command: one binary, one subcommand per role.

mod analyze;
mod apps;
mod bookinfo;
mod demo;
mod ephemeral;
mod exec;
mod grpc_bootstrap;
mod inject;
mod iptables;
mod kubernetes;
mod load;
mod local;
mod ops;
mod proxy_config;
mod rollout;
mod slo;
mod tap;
mod token;
mod up;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tracing::info;

#[derive(Parser)]
#[command(name = "weft", version, about = "weft service mesh")]
struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true, env = "WEFT_LOG_JSON")]
    log_json: bool,
    /// A file holding the control plane's admin token, sent as `Authorization: Bearer`
    /// by the commands that call its API (default: WEFT_TOKEN, else the token of the
    /// running `weft up`).
    #[arg(long, global = true, env = "WEFT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant (the control plane's flags)
// costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Start the whole mesh locally: control plane, one sidecar per LocalWorkload, the
    /// workloads and an ingress gateway (default: the Bookinfo demo). Ctrl-C stops it all.
    Up(up::UpArgs),
    /// Run the sidecar proxy, configured over xDS from the bootstrap's control plane.
    Proxy {
        /// Bootstrap file (YAML or JSON): node identity, xDS server, admin/metrics ports.
        #[arg(long, short = 'b', env = "WEFT_BOOTSTRAP", required_unless_present = "bootstrap_yaml")]
        bootstrap: Option<PathBuf>,
        /// The bootstrap's text instead of a file (what `weft inject` sets, with
        /// Kubernetes expanding `$(POD_NAME)`-style references in it).
        #[arg(long, env = "WEFT_BOOTSTRAP_YAML", hide_env_values = true, conflicts_with = "bootstrap")]
        bootstrap_yaml: Option<String>,
        /// Worker threads (Envoy's `--concurrency`); 1 runs the whole proxy on one
        /// thread with tokio's single-threaded scheduler. Default: one per CPU.
        #[arg(long, env = "WEFT_CONCURRENCY")]
        concurrency: Option<usize>,
        /// How long a connection whose filter chain changed in a way that cannot apply in
        /// place (TLS mode, TCP proxy, removed chain) may finish before it is closed, e.g.
        /// `45s`. Default: the bootstrap's `drain_duration` (45 s, Istio's drainDuration).
        #[arg(long, env = "WEFT_DRAIN_DURATION", value_parser = weft_proxy::run::parse_duration)]
        drain_duration: Option<std::time::Duration>,
    },
    /// Run the control plane: resources from a watched directory and the API, a workload
    /// registry fed by connecting proxies, xDS for every proxy.
    Control {
        /// Directory of Istio/Kubernetes resources (YAML/JSON), watched for changes.
        #[arg(long, short = 'd', env = "WEFT_CONFIG_DIR")]
        dir: Option<PathBuf>,
        /// xDS (gRPC) address.
        #[arg(long, default_value = "127.0.0.1:15010")]
        xds: std::net::SocketAddr,
        /// JSON API address (used by apply, get, proxy-status, ...).
        #[arg(long, default_value = "127.0.0.1:15014")]
        api: std::net::SocketAddr,
        /// Proxies run in transparent mode (iptables capture) instead of explicit mode.
        #[arg(long)]
        transparent: bool,
        /// Outbound traffic to unknown hosts: ALLOW_ANY or REGISTRY_ONLY.
        #[arg(long, default_value = "ALLOW_ANY", value_parser = ["ALLOW_ANY", "REGISTRY_ONLY"])]
        outbound_traffic_policy: String,
        /// With --data-dir: how long workloads registered before a restart stay endpoints
        /// while their proxies reconnect (0s: forget them at once).
        #[arg(long, env = "WEFT_RECONNECT_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
        reconnect_grace: std::time::Duration,
        /// Istio MeshConfig (YAML) for tracing: `extensionProviders` (opentelemetry,
        /// zipkin), `defaultProviders.tracing`, `defaultConfig.tracing.sampling`,
        /// `enableTracing`, `rootNamespace` (docs/observability.md).
        #[arg(long, env = "WEFT_MESH_CONFIG")]
        mesh_config: Option<PathBuf>,
        /// Read the dashboard's and SLOs' request statistics from this Prometheus
        /// (`http://HOST:PORT`, scraping the proxies' Istio metrics) instead of scraping
        /// the proxies (docs/dashboard.md).
        #[arg(long, env = "WEFT_PROMETHEUS", value_name = "URL")]
        prometheus: Option<String>,
        /// How often every connected proxy's metrics are scraped for the dashboard.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        stats_interval: std::time::Duration,
        /// Most request series kept for the dashboard (132 KiB each at most;
        /// docs/dashboard.md).
        #[arg(long, default_value_t = weft_control::meshstats::series::DEFAULT_MAX_SERIES)]
        stats_max_series: usize,
        #[command(flatten)]
        identity: IdentityArgs,
        #[command(flatten)]
        webhook: WebhookArgs,
        #[command(flatten)]
        slo: slo::SloArgs,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        kubernetes: kubernetes::KubernetesArgs,
    },
    /// Service level objectives: `weft slo rules` writes them as Prometheus rules.
    Slo {
        #[command(subcommand)]
        command: slo::SloCommand,
    },
    /// Join tokens: the bootstrap credential a proxy exchanges for its certificate.
    Token {
        #[command(subcommand)]
        command: token::TokenCommand,
    },
    /// Rotate the mesh CA's root without downtime: `begin` (new root trusted beside the
    /// old), then `complete` (the new root signs; leaves move at their next renewal),
    /// then, once every leaf has renewed, `retire` (the old root is dropped).
    CaRotate {
        /// begin, complete or retire.
        #[arg(value_parser = ["begin", "complete", "retire"])]
        step: String,
        /// The control plane's API (default: the running `weft up`, else 127.0.0.1:15014).
        #[arg(long, env = "WEFT_SERVER")]
        server: Option<String>,
    },
    /// Transparent mode's capture in this network namespace (Istio's istio-iptables init
    /// step): inbound TCP to 15006, outbound to 15001, the proxy's own traffic exempt.
    Iptables(iptables::IptablesArgs),
    /// Add the sidecar to Kubernetes workloads (Istio's `kube-inject`): reads manifests,
    /// writes them with `weft-init` and `weft-proxy` added to every pod template.
    Inject(inject::InjectArgs),
    /// Apply resources from files or directories to the running control plane.
    Apply {
        /// Files or directories (`-` reads standard input).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// The control plane's API (default: the running `weft up`, else 127.0.0.1:15014).
        #[arg(long, env = "WEFT_SERVER")]
        server: Option<String>,
        #[command(flatten)]
        staged: ops::StagedArgs,
    },
    /// Canary rollouts (`Rollout` resources) and staged changes: status, promote, pause,
    /// resume, abort.
    Rollout {
        #[command(subcommand)]
        command: rollout::RolloutCommand,
    },
    /// Delete the resources named in files from the running control plane.
    Delete {
        /// Files or directories (`-` reads standard input).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// The control plane's API (default: the running `weft up`, else 127.0.0.1:15014).
        #[arg(long, env = "WEFT_SERVER")]
        server: Option<String>,
    },
    /// List resources of a kind (`virtualservice`, `vs`, `dr`, `service`, ...).
    Get {
        /// Kind.
        kind: String,
        /// Name.
        name: Option<String>,
        /// Output format: table, json, or yaml (the resources as Kubernetes shows them, with
        /// the status the control plane computes for Gateway API kinds).
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json", "yaml"])]
        output: String,
        /// The control plane's API (default: the running `weft up`, else 127.0.0.1:15014).
        #[arg(long, env = "WEFT_SERVER")]
        server: Option<String>,
    },
    /// Print the URL of the control plane's dashboard (service graph, golden signals,
    /// SLOs, proxies; docs/dashboard.md); `--open` also opens it in a browser.
    Dashboard {
        /// Try to open it with `xdg-open` (or `$BROWSER`).
        #[arg(long)]
        open: bool,
        /// The control plane's API (default: the running `weft up`, else 127.0.0.1:15014).
        #[arg(long, env = "WEFT_SERVER")]
        server: Option<String>,
    },
    /// Every connected proxy with SYNCED / STALE / NACKED per xDS type and config age.
    ProxyStatus {
        /// Output format: table or json.
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
        /// The control plane's API (default: the running `weft up`, else 127.0.0.1:15014).
        #[arg(long, env = "WEFT_SERVER")]
        server: Option<String>,
    },
    /// Live requests of a workload or service, one line each (Linkerd's tap).
    Tap(tap::TapArgs),
    /// What the control plane serves one proxy (by node id or name).
    ProxyConfig {
        /// Proxy node id or workload name.
        proxy: String,
        /// listeners, routes, clusters, endpoints or secrets (all when omitted).
        #[arg(value_parser = ["listeners", "routes", "clusters", "endpoints", "secrets"])]
        what: Option<String>,
        /// Output format: table, json or yaml.
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json", "yaml"])]
        output: String,
        /// The control plane's API (default: the running `weft up`, else 127.0.0.1:15014).
        #[arg(long, env = "WEFT_SERVER")]
        server: Option<String>,
        /// The proxy's admin address (HOST:PORT), where `secrets` are read from; default:
        /// the address the proxy announced to the control plane.
        #[arg(long)]
        admin: Option<String>,
    },
    /// Validate resources and run cross-resource checks (Istio's `analyze`): parse errors
    /// with file, line and field, then IST-coded messages. Exit 79 when anything at or
    /// above the failure threshold is found, 0 otherwise.
    Analyze {
        /// Files or directories (YAML or JSON, searched recursively).
        #[arg(short = 'f', long = "filename", required_unless_present = "live")]
        files: Vec<PathBuf>,
        /// Analyze what the running control plane holds (resources and registered
        /// workloads), with the `-f` files applied on top (nothing is stored).
        #[arg(long)]
        live: bool,
        /// The control plane's API with `--live` (default: the running `weft up`, else 127.0.0.1:15014).
        #[arg(long, env = "WEFT_SERVER")]
        server: Option<String>,
        /// Lowest level that fails the command: info, warning or error.
        #[arg(long, default_value = "error", value_parser = ["info", "warning", "error"])]
        failure_threshold: String,
        /// Print only what reaches this level: info, warning or error.
        #[arg(long, default_value = "info", value_parser = ["info", "warning", "error"])]
        output_threshold: String,
    },
    /// Print an Envoy bootstrap that joins a stock Envoy to the control plane as a
    /// registered workload (sidecar or gateway).
    EnvoyBootstrap {
        /// Workload name.
        #[arg(long)]
        name: String,
        /// Namespace.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Labels, `k=v,k2=v2`.
        #[arg(long, default_value = "")]
        labels: String,
        /// Service account.
        #[arg(long, default_value = "default")]
        service_account: String,
        /// Ports, `name:port[/appProtocol],...` (for example `http:9080`).
        #[arg(long, default_value = "")]
        ports: String,
        /// The control plane's xDS address.
        #[arg(long, default_value = "127.0.0.1:15010")]
        xds: std::net::SocketAddr,
        /// Envoy's admin port (0 picks a free one).
        #[arg(long, default_value_t = 15000)]
        admin_port: u16,
        /// The workload's IP, used in the node id.
        #[arg(long, default_value = "127.0.0.1")]
        instance_ip: std::net::IpAddr,
        /// Use incremental (delta) xDS.
        #[arg(long)]
        delta: bool,
        /// Explicit mode: the address this Envoy accepts inbound traffic on.
        #[arg(long)]
        inbound: Option<std::net::SocketAddr>,
        /// Explicit mode: the address this Envoy serves as the app's HTTP proxy.
        #[arg(long)]
        outbound: Option<std::net::SocketAddr>,
        /// Join token (`weft token create`): the control plane serves this Envoy its
        /// workload certificate over SDS and it joins mesh mTLS.
        #[arg(long)]
        join_token: Option<String>,
        /// The mesh root (PEM file): connect to the control plane's TLS port (`--xds`
        /// then names 15012) and verify it as spiffe://<td>/ns/istio-system/sa/istiod.
        #[arg(long, requires = "join_token")]
        xds_root_cert: Option<PathBuf>,
        /// Trust domain of the control plane's identity (with --xds-root-cert).
        #[arg(long, default_value = weft_identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Join as a gateway (node type `router`): the Gateways selecting `--labels`
        /// configure it instead of the sidecar listeners.
        #[arg(long)]
        gateway: bool,
        /// Gateway: server port to the port its listener binds, `8080=18080,...`.
        #[arg(long, default_value = "", requires = "gateway")]
        gateway_ports: String,
        /// Gateway: the IP its listeners bind (default 0.0.0.0).
        #[arg(long, requires = "gateway")]
        gateway_address: Option<std::net::IpAddr>,
    },
    /// Print a gRPC xDS bootstrap (`GRPC_XDS_BOOTSTRAP`) for a proxyless gRPC client
    /// dialing `xds:///<service>:<port>` (docs/control.md, "Proxyless gRPC clients").
    GrpcBootstrap {
        /// Workload name.
        #[arg(long)]
        name: String,
        /// Namespace.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Service account.
        #[arg(long, default_value = "default")]
        service_account: String,
        /// The control plane's xDS address (plaintext port).
        #[arg(long, default_value = "127.0.0.1:15010")]
        xds: std::net::SocketAddr,
        /// Join token (`weft token create`): the stream's credential, in the node metadata.
        #[arg(long)]
        join_token: Option<String>,
        /// Directory of `cert-chain.pem`, `key.pem` and `root-cert.pem` (a workload
        /// certificate of the mesh CA): gRPC's `file_watcher` provider `default`, for
        /// DestinationRules with `ISTIO_MUTUAL`.
        #[arg(long)]
        cert_dir: Option<PathBuf>,
        /// Write a new key and a certificate of the mesh CA into --cert-dir first
        /// (a CSR to the control plane's certificate service with --join-token).
        #[arg(long, requires_all = ["cert_dir", "join_token"])]
        fetch_certs: bool,
        /// Trust domain of the workload identity (with --fetch-certs).
        #[arg(long, default_value = weft_identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Without an app: run a small local mesh (an in-process xDS server, two echo
    /// backends and a proxy, with a weighted split, a header route and a fault; prints what
    /// to curl). With one: run that application of Istio's samples: Bookinfo's
    /// (productpage, details, reviews, ratings; port 9080), httpbin (8000), sleep,
    /// tcp-echo (9000) or helloworld (5000).
    Demo {
        /// Application to run.
        #[arg(value_enum)]
        service: Option<DemoApp>,
        /// Port to listen on, as Istio's images take it (same as --port).
        #[arg(value_name = "PORT", requires = "service")]
        service_port: Option<u16>,
        /// Port: the proxy's outbound listener (mesh demo, default 15001) or the
        /// application's (default: its sample's port).
        #[arg(long)]
        port: Option<u16>,
        #[command(flatten)]
        bookinfo: bookinfo::BookinfoArgs,
        #[command(flatten)]
        app: apps::AppArgs,
    },
    /// Run a command in a workload of the running `weft up`, as `kubectl exec deploy/NAME
    /// -- CMD` does: with its environment (explicit mode: `HTTP_PROXY` = its sidecar) and,
    /// in transparent mode, in its network namespace. `weft` as CMD is this binary.
    Exec {
        /// The LocalWorkload's name (`deploy/NAME` accepted).
        workload: String,
        /// Its namespace, when the name is not unique.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print the log of a workload of the running `weft up` (`kubectl logs`).
    Logs {
        /// The LocalWorkload's name (`deploy/NAME` accepted).
        workload: String,
        /// Its namespace, when the name is not unique.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// The sidecar's log instead of the app's (`-c istio-proxy` works too).
        #[arg(long)]
        sidecar: bool,
        /// Container: `istio-proxy` for the sidecar, anything else for the app.
        #[arg(short = 'c', long)]
        container: Option<String>,
    },
    /// Fortio's `load`: `-c` connections, `-n` calls, `-qps` (0: max), printing Fortio's
    /// summary (codes, latency percentiles); through `HTTP_PROXY` when set (run it with
    /// `weft exec fortio -- weft load ...` to go through a workload's sidecar).
    Load(load::LoadArgs),
    /// Print the Kubernetes RBAC `weft control --kubernetes` needs (ClusterRole, Role for
    /// the leader-election Lease, their bindings), generated from the kinds it watches:
    /// the text of manifests/install/rbac.yaml.
    KubernetesRbac,
}

/// The applications `weft demo` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DemoApp {
    /// Bookinfo's front end.
    Productpage,
    /// Bookinfo's details.
    Details,
    /// Bookinfo's reviews (v1, v2, v3).
    Reviews,
    /// Bookinfo's ratings.
    Ratings,
    /// httpbin.
    Httpbin,
    /// sleep (an idle client).
    Sleep,
    /// tcp-echo.
    TcpEcho,
    /// helloworld.
    Helloworld,
}

impl DemoApp {
    fn split(self) -> Result<bookinfo::Service, apps::App> {
        match self {
            DemoApp::Productpage => Ok(bookinfo::Service::Productpage),
            DemoApp::Details => Ok(bookinfo::Service::Details),
            DemoApp::Reviews => Ok(bookinfo::Service::Reviews),
            DemoApp::Ratings => Ok(bookinfo::Service::Ratings),
            DemoApp::Httpbin => Err(apps::App::Httpbin),
            DemoApp::Sleep => Err(apps::App::Sleep),
            DemoApp::TcpEcho => Err(apps::App::TcpEcho),
            DemoApp::Helloworld => Err(apps::App::Helloworld),
        }
    }
}

/// Identity flags of `weft control`.
#[derive(clap::Args)]
struct IdentityArgs {
    /// Data directory: CA root and key (generated on first start), join-token key,
    /// revoked tokens, the admin token, the registered proxies (`registry.json`, restored
    /// after a restart). Without it the same state lives in a private temporary directory
    /// removed at exit (a new CA and admin token every start; callers still authenticate).
    #[arg(long, env = "WEFT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Development mode: no CA, no identities, and no credentials asked of anyone: any
    /// caller that reaches the xDS port registers as whatever it claims, any caller that
    /// reaches the API changes the mesh. Never on a network others share.
    #[arg(long, env = "WEFT_INSECURE_DEV", conflicts_with_all = ["data_dir", "plugin_ca", "k8s_issuer", "api_token_file", "xds_allow_anonymous", "api_read_anonymous"])]
    insecure_dev: bool,
    /// Plug-in CA: a directory in Istio's cacerts layout (ca-cert.pem, ca-key.pem,
    /// root-cert.pem, cert-chain.pem).
    #[arg(long, env = "WEFT_PLUGIN_CA")]
    plugin_ca: Option<PathBuf>,
    /// Trust domain of workload identities.
    #[arg(long, default_value = weft_identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Workload certificate TTL when the workload asks for none.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    cert_ttl: std::time::Duration,
    /// Longest workload certificate TTL granted (Istio's MAX_WORKLOAD_CERT_TTL): a
    /// request for more is refused with INVALID_ARGUMENT, as Istio's CA does.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    max_cert_ttl: std::time::Duration,
    /// Longest join-token TTL granted: `weft token create --ttl` (API `ttlSeconds`)
    /// over it is refused with 400.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    max_token_ttl: std::time::Duration,
    /// xDS and certificates over TLS (Istio's 15012), the control
    /// plane's certificate issued by its CA for spiffe://<td>/ns/istio-system/sa/istiod,
    /// client certificates verified against the mesh root. Default: the --xds host on
    /// port 15012 when --xds is on 15010, else any free port (printed); `off` disables it.
    #[arg(long, env = "WEFT_XDS_TLS")]
    xds_tls: Option<String>,
    /// Let xDS streams without any credential register as whatever their node metadata
    /// claims (development only). Default: a stream needs a client certificate (TLS
    /// port) or `authorization: Bearer <join token or Kubernetes token>`.
    #[arg(long, env = "WEFT_XDS_ALLOW_ANONYMOUS")]
    xds_allow_anonymous: bool,
    /// Accept Kubernetes service-account tokens from this issuer (`iss`; see
    /// `kubectl get --raw /.well-known/openid-configuration`), verified against
    /// --k8s-jwks-file or --k8s-jwks-url (default: the issuer's OIDC discovery, http only).
    #[arg(long, env = "WEFT_K8S_ISSUER")]
    k8s_issuer: Option<String>,
    /// The issuer's keys as a JWKS file (`kubectl get --raw /openid/v1/jwks`), re-read
    /// every 5 minutes.
    #[arg(long, env = "WEFT_K8S_JWKS_FILE", requires = "k8s_issuer", conflicts_with = "k8s_jwks_url")]
    k8s_jwks_file: Option<PathBuf>,
    /// The issuer's keys at an http:// URL: a JWKS, or an OIDC discovery document
    /// (`.../.well-known/openid-configuration`) whose `jwks_uri` is fetched.
    #[arg(long, env = "WEFT_K8S_JWKS_URL", requires = "k8s_issuer")]
    k8s_jwks_url: Option<String>,
    /// Audience a Kubernetes token must carry.
    #[arg(long, default_value = weft_control::k8s_tokens::DEFAULT_AUDIENCE)]
    k8s_audience: Vec<String>,
    /// The JSON API's admin token from this file (default: <data-dir>/admin-token,
    /// generated at first start).
    #[arg(long, env = "WEFT_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// Serve the API's read-only endpoints (GET) without the admin token.
    #[arg(long, env = "WEFT_API_READ_ANONYMOUS")]
    api_read_anonymous: bool,
}

impl IdentityArgs {
    /// The TLS xDS address: --xds-tls, or the --xds host on 15012 (when --xds is on 15010;
    /// else any free port).
    fn xds_tls(&self, xds: std::net::SocketAddr) -> anyhow::Result<Option<std::net::SocketAddr>> {
        match self.xds_tls.as_deref() {
            Some("off") => Ok(None),
            Some(a) => Ok(Some(a.parse().map_err(|e| anyhow::anyhow!("--xds-tls {a:?}: {e}"))?)),
            None => Ok(Some(std::net::SocketAddr::new(xds.ip(), if xds.port() == 15010 { 15012 } else { 0 }))),
        }
    }

    /// Kubernetes token verification settings, when --k8s-issuer is given.
    fn kubernetes(&self) -> Option<weft_control::k8s_tokens::KubernetesTokenConfig> {
        use weft_control::k8s_tokens::{KeySource, KubernetesTokenConfig};
        let issuer = self.k8s_issuer.clone()?;
        let keys = match (&self.k8s_jwks_file, &self.k8s_jwks_url) {
            (Some(f), _) => KeySource::File(f.clone()),
            (None, Some(u)) if u.ends_with("/.well-known/openid-configuration") => KeySource::Discovery(u.clone()),
            (None, Some(u)) => KeySource::Url(u.clone()),
            (None, None) => {
                KeySource::Discovery(format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/')))
            }
        };
        Some(KubernetesTokenConfig { issuer, keys, audiences: self.k8s_audience.clone() })
    }
}

/// Shared-store flags of `weft control`: replicas on etcd (docs/control.md, "Replicas").
#[derive(clap::Args)]
struct StoreArgs {
    /// Where resources, registrations and the CA state live: the directory store
    /// (default: `--dir` and `--data-dir` of this process alone) or
    /// `etcd://host:port[,host:port...][/prefix]`, shared by any number of replicas
    /// (`etcds://...` over TLS: --etcd-ca, and --etcd-cert/--etcd-key for members started
    /// with --client-cert-auth).
    #[arg(long, env = "WEFT_STORE")]
    store: Option<String>,
    /// With --store: the PEM CA bundle the etcd members' certificates are checked against
    /// (implies TLS, as etcds://).
    #[arg(long, env = "WEFT_ETCD_CA", requires = "store")]
    etcd_ca: Option<PathBuf>,
    /// With --store: this replica's PEM client certificate for etcd (its
    /// --client-cert-auth); needs --etcd-key.
    #[arg(long, env = "WEFT_ETCD_CERT", requires_all = ["store", "etcd_key"])]
    etcd_cert: Option<PathBuf>,
    /// The PEM private key of --etcd-cert.
    #[arg(long, env = "WEFT_ETCD_KEY", requires_all = ["store", "etcd_cert"])]
    etcd_key: Option<PathBuf>,
    /// With --store etcd://: how long this replica's registrations and leadership outlive
    /// it when it dies without a goodbye (its etcd lease; whole seconds, at least 2).
    #[arg(long, env = "WEFT_LEASE_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    lease_ttl: std::time::Duration,
}

/// Admission webhook flags of `weft control`: `/inject` over HTTPS for the Kubernetes API
/// server, and what it injects.
#[derive(clap::Args)]
struct WebhookArgs {
    /// Serve the `/inject` admission webhook over HTTPS on this address (Istio's port:
    /// 0.0.0.0:15017); the rest of the API stays on --api. Needs --webhook-cert and
    /// --webhook-key.
    #[arg(long, env = "WEFT_WEBHOOK", requires_all = ["webhook_cert", "webhook_key"])]
    webhook: Option<std::net::SocketAddr>,
    /// PEM certificate chain of the webhook (serving certificate first), e.g. a mounted
    /// cert-manager Secret's tls.crt; re-read when it changes.
    #[arg(long, env = "WEFT_WEBHOOK_CERT", requires = "webhook")]
    webhook_cert: Option<PathBuf>,
    /// PEM private key of the webhook certificate (tls.key); re-read when it changes.
    #[arg(long, env = "WEFT_WEBHOOK_KEY", requires = "webhook")]
    webhook_key: Option<PathBuf>,
    /// Image of the containers the webhook injects (entrypoint `weft`).
    #[arg(long, default_value_t = weft_control::inject::InjectConfig::default().image)]
    inject_image: String,
    /// The control plane's xDS address as injected pods reach it; `bound`: the address
    /// this control plane's xDS listener is bound to (a control plane outside the
    /// cluster that pods reach directly).
    #[arg(long, default_value_t = weft_control::inject::InjectConfig::default().control_plane)]
    inject_control_plane: String,
    /// Inject the proxy as a Kubernetes native sidecar (init container with
    /// `restartPolicy: Always`); a pod's `sidecar.istio.io/nativeSidecar` annotation wins.
    #[arg(long)]
    inject_native_sidecar: bool,
}

/// Commands that print a report and exit (or stream one, like `weft tap`): a reader that
/// closes the pipe early (`weft proxy-status | head`) ends them quietly, as with any Unix tool.
/// Servers and commands that run children keep Rust's default (SIGPIPE ignored, EPIPE as an
/// error), so a closed pipe to a child never kills them.
fn prints_a_report(command: &Command) -> bool {
    !matches!(
        command,
        Command::Up(_)
            | Command::Proxy { .. }
            | Command::Control { .. }
            | Command::Dashboard { .. }
            | Command::Demo { .. }
            | Command::Exec { .. }
            | Command::Load(_)
    )
}

/// Restores the default SIGPIPE disposition: writing to a closed stdout ends the process
/// (exit by signal) instead of `println!` panicking with "Broken pipe".
#[allow(unsafe_code)]
fn quiet_on_closed_stdout() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: `signal` is unsafe because a handler may run arbitrary code in signal context;
    // `SigDfl` installs no handler (the kernel's default action), and this runs in `main`
    // before any other thread exists, so no thread observes a half-changed disposition.
    // Sockets are unaffected: Rust's and tokio's sends on Linux pass MSG_NOSIGNAL.
    if let Err(e) = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) } {
        eprintln!("weft: cannot reset SIGPIPE: {e}");
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse_from(load::fortio_flags(std::env::args_os()));
    if prints_a_report(&cli.command) {
        quiet_on_closed_stdout();
    }
    // `weft up` is interactive: its in-process control plane only logs warnings.
    let default_level = if matches!(cli.command, Command::Up(_)) { "warn" } else { "info" };
    weft_proxy::run::init_tracing(cli.log_json, default_level);
    if let Some(path) = &cli.token_file {
        match std::fs::read_to_string(path) {
            Ok(t) => ops::set_admin_token(t.trim().to_string()),
            Err(e) => {
                eprintln!("error: --token-file {}: {e}", path.display());
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let concurrency = match cli.command {
        Command::Proxy { concurrency, .. } => concurrency,
        _ => None,
    };
    let rt = match weft_proxy::run::runtime(concurrency) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Proxy { bootstrap, bootstrap_yaml, concurrency, drain_duration } => {
                let args = weft_proxy::run::ProxyArgs {
                    bootstrap,
                    bootstrap_yaml,
                    concurrency,
                    log_json: cli.log_json,
                    drain_duration,
                };
                weft_proxy::run::run(args).await
            }
            Command::Up(args) => up::run(args).await,
            Command::Demo { service: None, port, .. } => demo::run(port.unwrap_or(15001)).await,
            Command::Demo { service: Some(service), service_port, port, bookinfo, app } => match service.split() {
                Ok(service) => {
                    let port = service_port.or(port).unwrap_or(bookinfo::DEFAULT_PORT);
                    let config =
                        bookinfo::BookinfoConfig::from_args(service, port, bookinfo, |name| std::env::var(name).ok())?;
                    bookinfo::run(config).await
                }
                Err(which) => {
                    let config = apps::AppConfig::new(
                        which,
                        bookinfo.address,
                        service_port.or(port),
                        bookinfo.service_version,
                        bookinfo.pod_name,
                        app,
                        |name| std::env::var(name).ok(),
                    );
                    apps::run(config).await
                }
            },
            Command::Exec { workload, namespace, command } => {
                std::process::exit(exec::exec(&workload, namespace.as_deref(), &command)?)
            }
            Command::Logs { workload, namespace, sidecar, container } => {
                let sidecar = sidecar || container.as_deref() == Some("istio-proxy");
                exec::logs(&workload, namespace.as_deref(), sidecar)
            }
            Command::Load(args) => load::run(args, |name| std::env::var(name).ok()).await,
            Command::KubernetesRbac => {
                print!("{}", weft_control::kubernetes::rbac::manifest());
                Ok(())
            }
            Command::Control {
                dir,
                xds,
                api,
                transparent,
                outbound_traffic_policy,
                reconnect_grace,
                mesh_config,
                prometheus,
                stats_interval,
                stats_max_series,
                identity,
                webhook,
                slo,
                store,
                kubernetes,
            } => {
                let addrs = (xds, api);
                let store = match store.store.as_deref() {
                    None | Some("") | Some("dir") | Some("directory")
                        if store.etcd_ca.is_some() || store.etcd_cert.is_some() =>
                    {
                        anyhow::bail!("--etcd-ca, --etcd-cert and --etcd-key go with --store etcd:// or etcds://")
                    }
                    None | Some("") | Some("dir") | Some("directory") => None,
                    Some(url) => Some(
                        weft_control::etcd::EtcdConfig {
                            lease_ttl: store.lease_ttl,
                            ..weft_control::etcd::EtcdConfig::parse(url).map_err(|e| anyhow::anyhow!(e))?
                        }
                        .with_tls(weft_control::etcd::tls::EtcdTls {
                            ca: store.etcd_ca,
                            cert: store.etcd_cert,
                            key: store.etcd_key,
                        }),
                    ),
                };
                let dir = (dir, store);
                let mesh_file = match mesh_config {
                    Some(p) => Some(
                        weft_control::meshconfig::MeshConfigFile::load(&p)
                            .map_err(|e| anyhow::anyhow!("--mesh-config {e}"))?,
                    ),
                    None => None,
                };
                let stats = weft_control::meshstats::gather::GatherConfig {
                    interval: stats_interval,
                    max_series: stats_max_series,
                    prometheus,
                    ..Default::default()
                };
                let policy = (outbound_traffic_policy.as_str(), mesh_file, stats);
                run_control(dir, addrs, transparent, policy, reconnect_grace, identity, (webhook, slo, kubernetes))
                    .await
            }
            Command::Token { command } => token::run(command).await,
            Command::Slo { command } => slo::run(command).await,
            Command::CaRotate { step, server } => ops::ca_rotate(&local::server(server), &step).await,
            Command::Iptables(args) => iptables::run(&args),
            Command::Inject(args) => inject::run(&args),
            Command::Apply { files, server, staged } if staged.staged => {
                ops::apply_staged(&local::server(server), &files, &staged).await
            }
            Command::Apply { files, server, .. } => ops::change(&local::server(server), &files, false).await,
            Command::Rollout { command } => rollout::run(command).await,
            Command::Delete { files, server } => ops::change(&local::server(server), &files, true).await,
            Command::Get { kind, name, output, server } => {
                ops::get(&local::server(server), &kind, name.as_deref(), &output).await
            }
            Command::Dashboard { open, server } => dashboard(&local::server(server), open),
            Command::ProxyStatus { output, server } => {
                ops::proxy_status(&local::server(server), output == "json").await
            }
            Command::Tap(args) => tap::run(&local::server(args.server.clone()), &args).await,
            Command::ProxyConfig { proxy, what, output, server, admin } => {
                proxy_config::run(&local::server(server), &proxy, what.as_deref(), &output, admin.as_deref()).await
            }
            Command::Analyze { files, live, server, failure_threshold, output_threshold } => {
                let code = if live {
                    analyze::live(&local::server(server), &files, &failure_threshold, &output_threshold).await?
                } else {
                    analyze::offline(&files, &failure_threshold, &output_threshold)
                };
                std::process::exit(code);
            }
            Command::GrpcBootstrap {
                name,
                namespace,
                service_account,
                xds,
                join_token,
                cert_dir,
                fetch_certs,
                trust_domain,
            } => {
                grpc_bootstrap::run(&grpc_bootstrap::Args {
                    name: &name,
                    namespace: &namespace,
                    service_account: &service_account,
                    xds,
                    join_token: join_token.as_deref(),
                    cert_dir: cert_dir.as_deref(),
                    fetch_certs,
                    trust_domain: &trust_domain,
                })
                .await
            }
            Command::EnvoyBootstrap {
                name,
                namespace,
                labels,
                service_account,
                ports,
                xds,
                admin_port,
                instance_ip,
                delta,
                inbound,
                outbound,
                join_token,
                xds_root_cert,
                trust_domain,
                gateway,
                gateway_ports,
                gateway_address,
            } => {
                use weft_control::envoy_bootstrap::{
                    parse_labels, parse_ports, render, render_node, EnvoyBootstrapOptions,
                };
                let labels = parse_labels(&labels).map_err(|e| anyhow::anyhow!("--labels: {e}"))?;
                let ports = parse_ports(&ports).map_err(|e| anyhow::anyhow!("--ports: {e}"))?;
                let opts = EnvoyBootstrapOptions {
                    name,
                    namespace,
                    labels,
                    service_account,
                    ports,
                    instance_ip,
                    xds,
                    admin_port,
                    cluster_id: "Kubernetes".into(),
                    delta,
                    inbound,
                    outbound,
                    join_token,
                };
                let mut text = if gateway {
                    let mut map = std::collections::BTreeMap::new();
                    for pair in gateway_ports.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        let parsed = pair
                            .split_once('=')
                            .and_then(|(s, l)| Some((s.trim().parse::<u16>().ok()?, l.trim().parse::<u16>().ok()?)));
                        let Some((server, listener)) = parsed else {
                            anyhow::bail!(
                                "--gateway-ports: {pair:?} is not SERVER_PORT=LISTENER_PORT, e.g. 8080=18080"
                            );
                        };
                        map.insert(server, listener);
                    }
                    render_node(&opts, &opts.gateway_node_info(map, gateway_address))
                } else {
                    render(&opts)
                };
                if let Some(root) = &xds_root_cert {
                    text = weft_control::envoy_bootstrap::with_xds_tls(&text, root, &trust_domain)
                        .map_err(|e| anyhow::anyhow!(e))?;
                }
                print!("{text}");
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run_control(
    (dir, store): (Option<PathBuf>, Option<weft_control::etcd::EtcdConfig>),
    (xds, api): (std::net::SocketAddr, std::net::SocketAddr),
    transparent: bool,
    (policy, mesh_file, stats): (
        &str,
        Option<weft_control::meshconfig::MeshConfigFile>,
        weft_control::meshstats::gather::GatherConfig,
    ),
    reconnect_grace: std::time::Duration,
    identity: IdentityArgs,
    (webhook, slo, kubernetes): (WebhookArgs, slo::SloArgs, kubernetes::KubernetesArgs),
) -> anyhow::Result<()> {
    use weft_control::translate::{MeshConfig, OutboundPolicy, ProxyMode};
    let mut mesh = MeshConfig {
        outbound_policy: if policy == "REGISTRY_ONLY" {
            OutboundPolicy::RegistryOnly
        } else {
            OutboundPolicy::AllowAny
        },
        ..MeshConfig::default()
    };
    if let Some(f) = mesh_file {
        mesh.tracing = f.tracing;
        if let Some(ns) = f.root_namespace {
            mesh.root_namespace = ns;
        }
    }
    let inject = weft_control::inject::InjectConfig {
        image: webhook.inject_image,
        control_plane: webhook.inject_control_plane,
        native_sidecar: webhook.inject_native_sidecar,
        trust_domain: identity.trust_domain.clone(),
        ..Default::default()
    };
    let registers = kubernetes.webhook_url.is_some()
        || kubernetes.webhook_service.is_some()
        || kubernetes.webhook_ca_bundle.is_some();
    if registers && (kubernetes.config().is_none() || webhook.webhook.is_none()) {
        anyhow::bail!(
            "--webhook-url, --webhook-service and --webhook-ca-bundle describe the webhook registered with \
             Kubernetes: they need --kubernetes (or --kubeconfig) and --webhook"
        );
    }
    if let (Some(_), Some(addr)) = (kubernetes.config(), webhook.webhook) {
        // Checked before anything starts (the bound address is used once known).
        kubernetes.webhook_registration(addr)?;
    }
    let webhook_tls = match (webhook.webhook, webhook.webhook_cert, webhook.webhook_key) {
        (Some(addr), Some(cert), Some(key)) => Some(weft_control::webhook_tls::WebhookTlsConfig::new(addr, cert, key)),
        (None, None, None) => None,
        _ => anyhow::bail!("--webhook, --webhook-cert and --webhook-key go together"),
    };
    // Secure by default: without --data-dir the CA and tokens live in a temporary
    // directory; only --insecure-dev runs without them.
    let ephemeral = match (&identity.data_dir, identity.insecure_dev) {
        (None, false) => Some(ephemeral::EphemeralDir::create()?),
        _ => None,
    };
    if identity.insecure_dev {
        tracing::warn!(
            "--insecure-dev: DEVELOPMENT MODE, NOTHING IS AUTHENTICATED. Any caller that reaches the xDS port \
             registers as any workload it claims and gets its configuration; any caller that reaches the API \
             changes the mesh and mints tokens; no certificates are issued. Never use it where others can reach \
             these ports"
        );
    }
    if kubernetes.config().is_some() && identity.k8s_issuer.is_some() {
        tracing::warn!("--k8s-issuer is not used with --kubernetes: the API server's TokenReview verifies tokens");
    }
    let cfg = weft_control::control::ControlConfig {
        dir,
        xds,
        api,
        mode: if transparent { ProxyMode::Transparent } else { ProxyMode::Explicit },
        mesh,
        registry: identity.data_dir.as_ref().map(|d| weft_control::registry::PersistConfig {
            reconnect_grace,
            ..weft_control::registry::PersistConfig::in_dir(d)
        }),
        identity: match identity.data_dir.clone().or_else(|| ephemeral.as_ref().map(|e| e.path().to_path_buf())) {
            Some(data_dir) => Some(weft_control::identity::IdentityConfig {
                data_dir,
                xds_tls: identity.xds_tls(xds)?,
                allow_anonymous_xds: identity.xds_allow_anonymous,
                kubernetes: identity.kubernetes(),
                // --kubernetes: the API server's TokenReview verifies service-account tokens.
                token_review: kubernetes.config().map(|k| (k, identity.k8s_audience.clone())),
                api: weft_control::api_auth::ApiAuthConfig {
                    token_file: identity.api_token_file.clone(),
                    read_anonymous: identity.api_read_anonymous,
                },
                plugin_ca: identity.plugin_ca,
                trust_domain: identity.trust_domain,
                cert_ttl: identity.cert_ttl,
                max_cert_ttl: identity.max_cert_ttl,
                max_token_ttl: identity.max_token_ttl,
            }),
            None => None,
        },
        inject,
        webhook: webhook_tls,
        slo: slo.config()?,
        stats,
    };
    // With --kubernetes: one client; the Lease election starts before the control plane,
    // whose singleton work follows it, and the watches after (status is the leader's).
    let kube = match kubernetes.config() {
        Some(k) => Some(
            weft_control::kubernetes::client(k.kubeconfig.as_deref())
                .await
                .map_err(|e| anyhow::anyhow!("--kubernetes: {e}"))?,
        ),
        None => None,
    };
    let election = match (&kube, kubernetes.lease()) {
        (Some(client), Some(lease)) => {
            info!(namespace = %lease.namespace, name = %lease.name, identity = %lease.identity,
                  duration = ?lease.lease_duration, "leader election on a Lease");
            Some(weft_control::kubernetes::lease::LeaseElection::start(client.clone(), lease))
        }
        _ => None,
    };
    let elected = election.as_ref().map(|e| weft_control::leader::Leadership::following(e.is_leader()));
    let cp = match (store, elected) {
        (etcd, Some(leader)) => weft_control::control::ControlPlane::start_led(cfg, etcd, leader).await,
        (Some(etcd), None) => weft_control::control::ControlPlane::start_replica(cfg, etcd).await,
        (None, None) => weft_control::control::ControlPlane::start(cfg).await,
    }
    .map_err(|e| anyhow::anyhow!(e))?;
    let _kubernetes = kube.clone().map(|client| {
        let mut source =
            weft_control::kubernetes::KubernetesSource::start_led(client, cp.store.clone(), cp.leader.clone());
        let server = cp.server.clone();
        source.write_gateway_status(move || server.connections(), cp.source.domain());
        source
    });
    // --kubernetes with --webhook: the API server learns where to call it.
    let _registration = match (&kube, cp.webhook_addr, &cp.webhook_cert) {
        (Some(client), Some(addr), Some(certs)) => {
            let registration = kubernetes.webhook_registration(addr)?;
            Some(AbortOnDrop(weft_control::kubernetes::webhook::spawn(client.clone(), registration, certs.clone())))
        }
        _ => None,
    };
    // The operator commands on this machine find an ephemeral admin token by the API address;
    // recorded before the line below, so a script that reads it can call the API at once.
    let _recorded = match (&ephemeral, &cp.admin_token) {
        (Some(e), Some((_, file))) => {
            info!(dir = %e.path().display(), "no --data-dir: CA, join-token key and admin token are temporary \
                  (removed at exit; a restart means a new mesh root and new tokens)");
            ephemeral::record(cp.api_addr, file)
        }
        _ => None,
    };
    // Listening before the line below: a script that reads it and stops the process at
    // once gets a clean shutdown, not the default action of an unhandled SIGTERM.
    let mut shutdown = weft_proxy::run::Shutdown::listen();
    match cp.webhook_addr {
        Some(w) => println!("weft control: xDS on {}, API on {}, webhook (HTTPS) on {w}", cp.xds_addr, cp.api_addr),
        None => println!("weft control: xDS on {}, API on {}", cp.xds_addr, cp.api_addr),
    }
    // Logged, not printed: scripts read the one line above and may close stdout.
    if let Some(tls) = cp.xds_tls_addr {
        info!(%tls, "xDS and certificates over TLS");
    }
    if let Some((_, file)) = &cp.admin_token {
        info!(file = %file.display(), "API admin token (weft --token-file, WEFT_TOKEN)");
    }
    shutdown.wait().await;
    info!("signal received: stopping");
    cp.shutdown().await;
    if let Some(election) = election {
        // Released, so another replica takes over at its next try (a rolling upgrade).
        election.stop().await;
    }
    Ok(())
}

/// `weft dashboard`: prints the dashboard's URL; with `open`, hands it to `$BROWSER` or
/// `xdg-open` (a failure to open is reported, the URL still printed).
fn dashboard(server: &str, open: bool) -> anyhow::Result<()> {
    let base = server.trim_end_matches('/');
    let url = if base.starts_with("http://") || base.starts_with("https://") {
        format!("{base}/dashboard")
    } else {
        format!("http://{base}/dashboard")
    };
    println!("{url}");
    if open {
        let opener =
            std::env::var("BROWSER").ok().filter(|b| !b.trim().is_empty()).unwrap_or_else(|| "xdg-open".into());
        match std::process::Command::new(&opener).arg(&url).stdout(std::process::Stdio::null()).spawn() {
            Ok(_) => {}
            Err(e) => eprintln!("weft dashboard: cannot run {opener} ({e}); open the URL above in a browser"),
        }
    }
    Ok(())
}

/// A task aborted when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    weft_proxy::run::shutdown_signal().await
}
