//! `weft control --kubernetes`: the flags that make the control plane read its
//! configuration and workloads from a Kubernetes API server (docs/kubernetes.md).

use std::path::PathBuf;

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
