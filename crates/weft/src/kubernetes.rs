//! `weft control --kubernetes`: the flags that make the control plane read its
//! configuration and workloads from a Kubernetes API server (docs/kubernetes.md).

use std::path::PathBuf;
use std::time::Duration;

use weft_control::kubernetes::lease;

/// Kubernetes flags of `weft control`.
#[derive(clap::Args)]
pub struct KubernetesArgs {
    /// Watch Services, EndpointSlices, Pods, Namespaces, Istio's resources and the Gateway API in the Kubernetes API (in-cluster
    /// service account unless --kubeconfig), next to --dir and `weft apply`.
    #[arg(long, env = "WEFT_KUBERNETES")]
    pub kubernetes: bool,
    /// The kubeconfig file to reach the API server with (its current context); implies
    /// --kubernetes.
    #[arg(long, env = "WEFT_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// With --kubernetes and --webhook: the URL the API server calls the injection webhook
    /// at (`clientConfig.url`; default with --kubeconfig: https://<--webhook address>/inject).
    #[arg(long, env = "WEFT_WEBHOOK_URL", conflicts_with = "webhook_service")]
    pub webhook_url: Option<String>,
    /// With --kubernetes and --webhook: the Service in front of the webhook,
    /// NAMESPACE/NAME[:PORT] (`clientConfig.service`; the default in a cluster:
    /// weft-system/weft-control:443).
    #[arg(long, env = "WEFT_WEBHOOK_SERVICE")]
    pub webhook_service: Option<String>,
    /// PEM CA bundle registered as the webhook's caBundle (e.g. a cert-manager Secret's
    /// ca.crt; re-read on change); default: the last certificate of --webhook-cert.
    #[arg(long, env = "WEFT_WEBHOOK_CA_BUNDLE")]
    pub webhook_ca_bundle: Option<PathBuf>,
    /// The registered webhook's failurePolicy: Fail (Istio's default) or Ignore.
    #[arg(long, default_value = "Fail", value_parser = ["Fail", "Ignore"])]
    pub webhook_failure_policy: String,
    /// With --kubernetes: elect a leader among the replicas on a coordination.k8s.io
    /// Lease; only the leader runs singleton work (status write-back, rollouts, SLO
    /// alerts, CA rotation steps). `--leader-elect=false`: this replica always leads
    /// (one replica only).
    #[arg(long, env = "WEFT_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Namespace of the Lease (default: $POD_NAMESPACE, else weft-system).
    #[arg(long, env = "WEFT_LEADER_ELECT_RESOURCE_NAMESPACE")]
    pub leader_elect_resource_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(long, env = "WEFT_LEADER_ELECT_RESOURCE_NAME", default_value = lease::DEFAULT_LEASE_NAME)]
    pub leader_elect_resource_name: String,
    /// How long a leader's Lease lasts unrenewed before another replica takes over
    /// (Istio's 30s; the leader renews every quarter of it and steps down after half of
    /// it without a renewal).
    #[arg(long, env = "WEFT_LEADER_ELECT_LEASE_DURATION", default_value = "30s", value_parser = parse_lease_duration)]
    pub leader_elect_lease_duration: Duration,
    /// This replica's identity in the Lease (default: $POD_NAME, else <hostname>_<pid>).
    #[arg(long, env = "WEFT_LEADER_ELECT_IDENTITY")]
    pub leader_elect_identity: Option<String>,
}

impl KubernetesArgs {
    /// The source's settings, when Kubernetes is on.
    pub fn config(&self) -> Option<weft_control::kubernetes::KubernetesConfig> {
        (self.kubernetes || self.kubeconfig.is_some())
            .then(|| weft_control::kubernetes::KubernetesConfig { kubeconfig: self.kubeconfig.clone() })
    }

    /// What `weft-sidecar-injector` registers, for a webhook served on `webhook` (its
    /// bound address): the URL or Service flags, else a URL from the address out of a
    /// cluster (--kubeconfig), the default Service in one.
    pub fn webhook_registration(
        &self,
        webhook: std::net::SocketAddr,
    ) -> anyhow::Result<weft_control::kubernetes::webhook::WebhookRegistration> {
        use weft_control::kubernetes::webhook::{WebhookClient, WebhookRegistration};
        let client = match (&self.webhook_url, &self.webhook_service) {
            (Some(url), _) => {
                if !url.starts_with("https://") {
                    anyhow::bail!("--webhook-url {url:?}: the API server calls webhooks over https:// only");
                }
                WebhookClient::Url(url.clone())
            }
            (None, Some(svc)) => parse_service(svc)?,
            (None, None) if self.kubeconfig.is_some() => {
                if webhook.ip().is_unspecified() {
                    anyhow::bail!(
                        "--webhook {webhook} listens on every address: give --webhook-url https://HOST:PORT/inject \
                         (how the API server reaches it) to register the webhook"
                    );
                }
                WebhookClient::Url(format!("https://{webhook}/inject"))
            }
            (None, None) => parse_service("weft-system/weft-control:443")?,
        };
        let mut reg = WebhookRegistration::new(client);
        reg.ca_bundle = self.webhook_ca_bundle.clone();
        reg.failure_policy = self.webhook_failure_policy.clone();
        Ok(reg)
    }

    /// The Lease election's settings, when Kubernetes and leader election are on.
    pub fn lease(&self) -> Option<lease::LeaseConfig> {
        if self.config().is_none() || !self.leader_elect {
            return None;
        }
        let namespace = self
            .leader_elect_resource_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok().filter(|n| !n.is_empty()))
            .unwrap_or_else(|| lease::DEFAULT_LEASE_NAMESPACE.to_string());
        let identity = self
            .leader_elect_identity
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok().filter(|n| !n.is_empty()))
            .unwrap_or_else(|| format!("{}_{}", hostname(), std::process::id()));
        Some(lease::LeaseConfig::new(
            &namespace,
            &self.leader_elect_resource_name,
            &identity,
            self.leader_elect_lease_duration,
        ))
    }
}

/// NAMESPACE/NAME[:PORT] (port 443 when absent).
fn parse_service(text: &str) -> anyhow::Result<weft_control::kubernetes::webhook::WebhookClient> {
    let bad = || {
        anyhow::anyhow!("--webhook-service {text:?}: expected NAMESPACE/NAME[:PORT], e.g. weft-system/weft-control:443")
    };
    let (namespace, rest) = text.split_once('/').ok_or_else(bad)?;
    let (name, port) = match rest.split_once(':') {
        Some((name, port)) => (name, port.parse::<u16>().map_err(|_| bad())?),
        None => (rest, 443),
    };
    if namespace.is_empty() || name.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok(weft_control::kubernetes::webhook::WebhookClient::Service {
        namespace: namespace.into(),
        name: name.into(),
        port,
    })
}

fn parse_lease_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s} is shorter than the 1s resolution of a Lease's leaseDurationSeconds"));
    }
    Ok(d)
}

/// The machine's host name (a pod's name in Kubernetes), for the default identity.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "weft-control".into())
}
