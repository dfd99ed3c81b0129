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
}

impl KubernetesArgs {
    /// The source's settings, when Kubernetes is on.
    pub fn config(&self) -> Option<weft_control::kubernetes::KubernetesConfig> {
        (self.kubernetes || self.kubeconfig.is_some())
            .then(|| weft_control::kubernetes::KubernetesConfig { kubeconfig: self.kubeconfig.clone() })
    }
}
