//! The proxy's static bootstrap file: where the control plane is, who this workload
//! is, and where the admin and metrics servers listen. Everything else arrives over xDS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use weft_xds::{NodeInfo, XdsMode};

/// The bootstrap file's contents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    /// Workload identity announced to the control plane.
    pub node: NodeInfo,
    /// The xDS server.
    pub xds: XdsSettings,
    /// Admin server address (loopback only), default `127.0.0.1:15000`.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Metrics server address, default `0.0.0.0:15020`.
    #[serde(default = "default_metrics")]
    pub metrics: SocketAddr,
    /// Access log destination: `stdout`, `off`, or a file path. Default `stdout`.
    #[serde(default = "default_access_log")]
    pub access_log: String,
    /// How long a drain waits for in-flight work, e.g. `5s`. Default 5 s.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long an open connection whose filter chain changed in a way that cannot apply
    /// in place (TLS mode, TCP proxy, removed chain or listener) may finish its work before
    /// it is closed, e.g. `45s` (Istio's `drainDuration`, its default).
    #[serde(default = "default_drain_duration", with = "humantime_serde")]
    pub drain_duration: Duration,
    /// The proxy's mesh identity (mTLS). Without it the proxy speaks plaintext only.
    #[serde(default)]
    pub identity: Option<IdentitySettings>,
}

/// How the proxy gets its SPIFFE certificate: a CSR with a join token to the control
/// plane's certificate service. The key is generated here and never leaves the process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySettings {
    /// The join token (`weft token create`).
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding the join token (re-read at every renewal).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// A Kubernetes projected service-account token file as the credential (accepted for
    /// Kubernetes support; a control plane outside Kubernetes refuses it).
    #[serde(default)]
    pub kubernetes_token_file: Option<PathBuf>,
    /// The certificate service, `http://host:port` or `https://host:port` (the control
    /// plane's TLS port, 15012, which needs the mesh root below); default: `xds.address`.
    #[serde(default)]
    pub ca_address: Option<String>,
    /// A PEM file with the mesh root(s): how a fresh proxy verifies the control plane's
    /// TLS port before it holds a certificate (Istio's `istio-ca-root-cert`). Required
    /// when the certificate service is `https://`.
    #[serde(default)]
    pub root_cert_file: Option<PathBuf>,
    /// The same roots inline (PEM), e.g. in a bootstrap given as an environment variable.
    #[serde(default)]
    pub root_cert: Option<String>,
    /// SPIFFE trust domain, default `cluster.local`.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Requested certificate lifetime (e.g. `1h`); default: the CA's (24 h).
    #[serde(default, with = "humantime_serde")]
    pub cert_ttl: Option<Duration>,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

/// Control-plane connection settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XdsSettings {
    /// `http://host:port` of the ADS server.
    pub address: String,
    /// `sotw` (default) or `delta`.
    #[serde(default)]
    pub mode: ModeSetting,
    /// Delta only: fetch virtual hosts (VHDS), clusters and endpoints on demand, by the
    /// names requests and listeners need, instead of receiving the whole mesh. Default
    /// true in delta mode (announced to the control plane as `WEFT_ON_DEMAND`).
    #[serde(default)]
    pub on_demand: Option<bool>,
}

impl XdsSettings {
    /// Whether the proxy fetches on demand (delta mode, unless `on_demand: false`).
    pub fn on_demand(&self) -> bool {
        self.mode == ModeSetting::Delta && self.on_demand.unwrap_or(true)
    }
}

/// xDS variant as written in the file.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModeSetting {
    /// State of the world.
    #[default]
    Sotw,
    /// Incremental.
    Delta,
}

impl From<ModeSetting> for XdsMode {
    fn from(m: ModeSetting) -> Self {
        match m {
            ModeSetting::Sotw => XdsMode::Sotw,
            ModeSetting::Delta => XdsMode::Delta,
        }
    }
}

/// A bootstrap that could not be read, with file, line and field.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The contents are invalid.
    #[error("{path}:{line}: field `{field}`: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// 1-based line (0 when unknown).
        line: usize,
        /// Field path, e.g. `xds.mode`.
        field: String,
        /// What was wrong and what was expected.
        message: String,
    },
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15000))
}
fn default_metrics() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15020))
}
fn default_access_log() -> String {
    "stdout".into()
}
fn default_drain() -> Duration {
    Duration::from_secs(5)
}
fn default_drain_duration() -> Duration {
    Duration::from_secs(45)
}

impl Bootstrap {
    /// Reads and validates a bootstrap file (YAML or JSON).
    pub fn load(path: &Path) -> Result<Bootstrap, BootstrapError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| BootstrapError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Parses bootstrap text; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Bootstrap, BootstrapError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let b: Bootstrap = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let line = inner.location().map(|l| l.line()).unwrap_or(0);
            BootstrapError::Invalid { path: path.into(), line, field, message: strip_location(&inner.to_string()) }
        })?;
        b.validate(path)?;
        Ok(b)
    }

    fn validate(&self, path: &Path) -> Result<(), BootstrapError> {
        let bad = |field: &str, message: String| BootstrapError::Invalid {
            path: path.into(),
            line: 0,
            field: field.into(),
            message,
        };
        if !(self.xds.address.starts_with("http://") || self.xds.address.starts_with("https://")) {
            return Err(bad("xds.address", format!("expected http://host:port, got {:?}", self.xds.address)));
        }
        if self.xds.address.starts_with("https://") && self.identity.is_none() {
            return Err(bad(
                "xds.address",
                "an https:// control plane (its TLS port, 15012) is reached with the proxy's certificate: add an \
                 `identity` section, or use the plaintext port"
                    .into(),
            ));
        }
        if self.node.id.is_empty() {
            return Err(bad("node.id", "must not be empty".into()));
        }
        if !self.admin.ip().is_loopback() {
            return Err(bad("admin", format!("the admin server must listen on loopback, got {}", self.admin)));
        }
        if let Some(id) = &self.identity {
            let sources = [id.token.is_some(), id.token_file.is_some(), id.kubernetes_token_file.is_some()];
            if sources.iter().filter(|s| **s).count() != 1 {
                return Err(bad(
                    "identity",
                    "give exactly one of `token`, `token_file` (a join token) and `kubernetes_token_file`".into(),
                ));
            }
            if id.root_cert.is_some() && id.root_cert_file.is_some() {
                return Err(bad("identity", "give at most one of `root_cert` and `root_cert_file`".into()));
            }
            if let Some(a) = &id.ca_address {
                if !(a.starts_with("http://") || a.starts_with("https://")) {
                    return Err(bad("identity.ca_address", format!("expected http://host:port, got {a:?}")));
                }
            }
            weft_identity::SpiffeId::new(&id.trust_domain, &self.node.namespace, self.service_account())
                .map_err(|e| bad("identity", e.to_string()))?;
        }
        Ok(())
    }

    /// The service account the identity is for (`default` when the node names none).
    pub fn service_account(&self) -> &str {
        if self.node.service_account.is_empty() {
            "default"
        } else {
            &self.node.service_account
        }
    }
}

fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "node:\n  id: sidecar~127.0.0.1~a.default~default.svc.cluster.local\n  name: a\n  namespace: default\nxds:\n  address: http://127.0.0.1:15010\n  mode: delta\ndrain_timeout: 2s\n";

    #[test]
    fn parses_a_good_bootstrap_with_defaults() {
        let b = Bootstrap::parse(GOOD, Path::new("b.yaml")).unwrap();
        assert_eq!(b.xds.mode, ModeSetting::Delta);
        assert_eq!(b.drain_timeout, Duration::from_secs(2));
        assert_eq!(b.admin, default_admin());
        assert_eq!(b.node.namespace, "default");
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let text = GOOD.replace("  mode: delta\n", "  mode: delta\n  modes: x\n");
        let e = Bootstrap::parse(&text, Path::new("b.yaml")).unwrap_err().to_string();
        assert!(e.starts_with("b.yaml:8: field `xds"), "{e}");
        assert!(e.contains("modes"), "{e}");
    }

    #[test]
    fn bad_enum_value_says_what_was_expected() {
        let text = GOOD.replace("mode: delta", "mode: fast");
        let e = Bootstrap::parse(&text, Path::new("b.yaml")).unwrap_err().to_string();
        assert!(e.contains("xds.mode") && e.contains("sotw") && e.contains("delta"), "{e}");
    }

    #[test]
    fn non_loopback_admin_is_rejected() {
        let text = format!("{GOOD}admin: 0.0.0.0:15000\n");
        let e = Bootstrap::parse(&text, Path::new("b.yaml")).unwrap_err().to_string();
        assert!(e.contains("field `admin`") && e.contains("loopback"), "{e}");
    }

    #[test]
    fn identity_section_needs_exactly_one_token_source_and_a_valid_identity() {
        let ok = format!("{GOOD}identity:\n  token: abc\n  cert_ttl: 1h\n");
        let b = Bootstrap::parse(&ok, Path::new("b.yaml")).unwrap();
        let id = b.identity.unwrap();
        assert_eq!(id.trust_domain, "cluster.local");
        assert_eq!(id.cert_ttl, Some(Duration::from_secs(3600)));
        assert_eq!(b.node.service_account, "", "defaults to `default` when used");
        let both = format!("{GOOD}identity:\n  token: abc\n  token_file: /t\n");
        let e = Bootstrap::parse(&both, Path::new("b.yaml")).unwrap_err().to_string();
        assert!(e.contains("field `identity`") && e.contains("exactly one"), "{e}");
        let none = format!("{GOOD}identity:\n  trust_domain: cluster.local\n");
        assert!(Bootstrap::parse(&none, Path::new("b.yaml")).unwrap_err().to_string().contains("join token"));
        let bad_td = format!("{GOOD}identity:\n  token: abc\n  trust_domain: \"bad domain\"\n");
        let e = Bootstrap::parse(&bad_td, Path::new("b.yaml")).unwrap_err().to_string();
        assert!(e.contains("field `identity`"), "{e}");
        let k8s = format!("{GOOD}identity:\n  kubernetes_token_file: /var/run/secrets/tokens/istio-token\n");
        assert!(Bootstrap::parse(&k8s, Path::new("b.yaml")).unwrap().identity.unwrap().kubernetes_token_file.is_some());
        let two = format!("{k8s}  token: abc\n");
        assert!(Bootstrap::parse(&two, Path::new("b.yaml")).unwrap_err().to_string().contains("exactly one"));
        let typo = format!("{GOOD}identity:\n  tokn: abc\n");
        let e = Bootstrap::parse(&typo, Path::new("b.yaml")).unwrap_err().to_string();
        assert!(e.contains("identity") && e.contains("tokn"), "{e}");
    }

    #[test]
    fn gateway_node_announces_its_port_map_and_address() {
        let text = "node:\n  id: router~127.0.0.1~ingress.istio-system~istio-system.svc.cluster.local\n  name: ingress\n  namespace: istio-system\n  labels: {istio: ingressgateway}\n  gateway_ports: {8080: 18080, 443: 0}\n  gateway_address: 127.0.0.1\nxds:\n  address: http://127.0.0.1:15010\n";
        let b = Bootstrap::parse(text, Path::new("gw.yaml")).unwrap();
        assert!(b.node.is_gateway());
        assert_eq!(b.node.gateway_port(8080), 18080);
        assert_eq!(b.node.gateway_port(443), 0);
        assert_eq!(b.node.gateway_address, Some("127.0.0.1".parse().unwrap()));
        let bad = text.replace("18080", "70000");
        let e = Bootstrap::parse(&bad, Path::new("gw.yaml")).unwrap_err().to_string();
        assert!(e.contains("node.gateway_ports"), "{e}");
    }
}
