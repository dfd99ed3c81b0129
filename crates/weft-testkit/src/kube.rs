//! A real Kubernetes API server on loopback, as controller-runtime's envtest runs one: etcd
//! ([`crate::etcd::EtcdCluster`]) and `kube-apiserver` (built from the Kubernetes Go
//! modules by `scripts/setup.sh`, `tools/kube`), no kubelet, no controller manager.
//!
//! Everything is generated per server in a temporary directory: a CA and the serving
//! certificate for `127.0.0.1`/`localhost`, the service-account signing key (ECDSA P-256,
//! issuer [`SA_ISSUER`]), a static admin token (group `system:masters`) and a kubeconfig
//! file for `kubectl` (built by the same setup) and for the `kube` crate. Authorization is
//! RBAC, so a service account's token has exactly the rights its Roles give it. The
//! `ServiceAccount` admission plugin is off (no controller creates `default` service
//! accounts), so pods can be created in any namespace; tests create the ServiceAccounts
//! whose tokens they need.
//!
//! When the binaries are missing, [`KubeApiServer::start`] panics with the setup hint,
//! unless the setup script recorded that it could not build them ([`unavailable`]): then
//! tests skip with that reason.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

use crate::etcd::EtcdCluster;
use crate::net::reserve_addr;
use crate::pki::TestCa;

/// The Kubernetes release `scripts/setup.sh` builds (`KUBE_VERSION` there).
pub const KUBE_VERSION: &str = "v1.37.2";

/// The service-account token issuer of the test API server.
pub const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// How long the API server may take to become ready (a loaded machine, a cold etcd).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A running API server with its etcd; both killed on drop.
pub struct KubeApiServer {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// A kubeconfig file (cluster `weft-test`, user `admin` with [`KubeApiServer::token`]).
    pub kubeconfig: PathBuf,
    /// The admin bearer token (group `system:masters`).
    pub token: String,
    /// The CA that signed the serving certificate, PEM.
    pub ca_pem: String,
    /// The service-account signing key (PKCS#8 PEM), for tests that forge tokens.
    pub sa_key_pem: String,
    dir: tempfile::TempDir,
    child: Child,
    _etcd: EtcdCluster,
}

/// Why the API server cannot run here, when `scripts/setup.sh` tried to build it and
/// failed (it writes the reason to `.tools/kube/<version>/build-failed`); `None` when the
/// binaries are there or the setup never tried (then [`KubeApiServer::start`] panics
/// with the setup hint rather than letting tests skip).
pub fn unavailable() -> Option<String> {
    if binaries().is_some() {
        return None;
    }
    let marker = crate::workspace_root().join(".tools").join("kube").join(KUBE_VERSION).join("build-failed");
    std::fs::read_to_string(&marker).ok().map(|why| {
        format!("kube-apiserver {KUBE_VERSION} could not be built by scripts/setup.sh ({}): {why}", marker.display())
    })
}

/// `(kube-apiserver, kubectl)` when both are installed: the pinned ones that
/// `scripts/setup.sh` built first (a machine's own `kubectl` may be of another release),
/// else whatever `PATH` has.
pub fn binaries() -> Option<(PathBuf, PathBuf)> {
    let pinned = |name: &str| {
        let p = crate::tools::tools_bin().join(name);
        if p.is_file() {
            Some(p)
        } else {
            crate::tools::find(name)
        }
    };
    Some((pinned("kube-apiserver")?, pinned("kubectl")?))
}

impl KubeApiServer {
    /// Starts etcd and the API server and waits until `/readyz` answers ok.
    ///
    /// # Panics
    /// When the binaries are missing ("run scripts/setup.sh").
    pub async fn start() -> anyhow::Result<KubeApiServer> {
        let (apiserver, _) = binaries().unwrap_or_else(|| {
            panic!("kube-apiserver and kubectl {KUBE_VERSION} not found: run scripts/setup.sh (it builds them once)")
        });
        let etcd = EtcdCluster::start(1).await;
        let dir = tempfile::tempdir().context("temporary directory")?;
        let d = dir.path();

        let ca = TestCa::new("weft-test-kube-ca");
        let (cert, key) = ca.leaf(&["localhost", "127.0.0.1", "kubernetes", "kubernetes.default.svc"], 2);
        std::fs::write(d.join("ca.crt"), ca.pem())?;
        std::fs::write(d.join("apiserver.crt"), cert)?;
        std::fs::write(d.join("apiserver.key"), key)?;
        let sa = rcgen::KeyPair::generate().context("service-account key")?;
        let sa_key = sa.serialize_pem();
        std::fs::write(d.join("sa.key"), &sa_key)?;
        // The verifying side reads public keys (or SEC1/PKCS#1 private keys, not PKCS#8).
        std::fs::write(d.join("sa.pub"), sa.public_key_pem())?;
        let token = random_token();
        std::fs::write(d.join("tokens.csv"), format!("{token},admin,admin-uid,\"system:masters\"\n"))?;

        let addr = reserve_addr();
        let url = format!("https://{addr}");
        let path = |name: &str| d.join(name).display().to_string();
        let log = std::fs::File::create(d.join("kube-apiserver.log"))?;
        let child = Command::new(&apiserver)
            .arg(format!("--etcd-servers={}", etcd.endpoints()))
            .arg(format!("--bind-address={}", addr.ip()))
            .arg(format!("--advertise-address={}", addr.ip()))
            .arg(format!("--secure-port={}", addr.port()))
            .arg(format!("--tls-cert-file={}", path("apiserver.crt")))
            .arg(format!("--tls-private-key-file={}", path("apiserver.key")))
            .arg(format!("--client-ca-file={}", path("ca.crt")))
            .arg(format!("--token-auth-file={}", path("tokens.csv")))
            .arg(format!("--service-account-key-file={}", path("sa.pub")))
            .arg(format!("--service-account-signing-key-file={}", path("sa.key")))
            .arg(format!("--service-account-issuer={SA_ISSUER}"))
            .arg(format!("--cert-dir={}", path("certs")))
            .args([
                "--authorization-mode=RBAC",
                // As envtest: no kubernetes Service endpoints for a loopback address.
                "--endpoint-reconciler-type=none",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                "--disable-admission-plugins=ServiceAccount",
                "--profiling=false",
                "--v=1",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", apiserver.display()))?;

        let kubeconfig = d.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_text(&url, &ca.pem(), &token))?;
        let mut server =
            KubeApiServer { url, kubeconfig, token, ca_pem: ca.pem(), sa_key_pem: sa_key, dir, child, _etcd: etcd };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(exit)) = self.child.try_wait() {
                bail!("kube-apiserver exited ({exit}) before it was ready{}", self.log_tail());
            }
            match self.kubectl(&["get", "--raw", "/readyz"]).await {
                Ok(out) if out.trim() == "ok" => return Ok(()),
                Ok(_) | Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await
                }
                Ok(out) => bail!("kube-apiserver not ready after {READY_TIMEOUT:?}: {out}{}", self.log_tail()),
                Err(e) => bail!("kube-apiserver not ready after {READY_TIMEOUT:?}: {e:#}{}", self.log_tail()),
            }
        }
    }

    /// The directory holding the generated files and the server's log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of the API server's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("kube-apiserver.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!("\n--- kube-apiserver log (tail) ---\n{}", lines[lines.len().saturating_sub(30)..].join("\n"))
    }

    /// Runs `kubectl --kubeconfig <ours> ARGS`; its stdout, or an error with its stderr.
    pub async fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.kubectl_stdin(args, None).await
    }

    /// [`KubeApiServer::kubectl`] with `stdin` fed to it (`kubectl apply -f -`).
    pub async fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        self.kubectl_as(&self.kubeconfig, args, stdin).await
    }

    /// [`KubeApiServer::kubectl_stdin`] with another kubeconfig (one from
    /// [`KubeApiServer::kubeconfig_with_token`]: a service account's rights).
    pub async fn kubectl_as(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let (_, kubectl) = binaries().context("kubectl not found: run scripts/setup.sh")?;
        let mut child = Command::new(kubectl)
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--cache-dir={}", self.dir.path().join("kubectl-cache").display()))
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawning kubectl")?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).await.context("writing to kubectl")?;
        }
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .context("kubectl did not finish in 60 s")?
            .context("running kubectl")?;
        if !out.status.success() {
            bail!("kubectl {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply -f -` of `yaml`.
    pub async fn apply(&self, yaml: &str) -> anyhow::Result<String> {
        self.kubectl_stdin(&["apply", "-f", "-"], Some(yaml)).await
    }

    /// A kubeconfig for the same server that authenticates with `token` instead of the
    /// admin's (a service account's, to run a component with its rights only).
    pub fn kubeconfig_with_token(&self, name: &str, token: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(format!("kubeconfig-{name}"));
        std::fs::write(&path, kubeconfig_text(&self.url, &self.ca_pem, token))?;
        Ok(path)
    }

    /// A service-account token from the TokenRequest API (`kubectl create token`), for
    /// `audience`, valid `seconds` (the API server's minimum is 600).
    pub async fn create_token(
        &self,
        namespace: &str,
        service_account: &str,
        audience: &str,
        seconds: u32,
    ) -> anyhow::Result<String> {
        let out = self
            .kubectl(&[
                "create",
                "token",
                service_account,
                "-n",
                namespace,
                &format!("--audience={audience}"),
                &format!("--duration={seconds}s"),
            ])
            .await?;
        Ok(out.trim().to_string())
    }
}

fn kubeconfig_text(url: &str, ca_pem: &str, token: &str) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: weft-test\n  cluster:\n    server: {url}\n    certificate-authority-data: {ca}\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: weft-test\n  context:\n    cluster: weft-test\n    user: admin\n    namespace: default\ncurrent-context: weft-test\n"
    )
}

/// The static admin token: the last 32 bytes of a fresh key's DER (its public point,
/// drawn from the system's random source), hex.
fn random_token() -> String {
    let der = rcgen::KeyPair::generate().map(|k| k.serialize_der()).unwrap_or_default();
    der.iter().rev().take(32).map(|b| format!("{b:02x}")).collect()
}
