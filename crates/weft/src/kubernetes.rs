//! `weft control --kubernetes`: the flags that make the control plane read its
//! configuration and workloads from a Kubernetes API server (docs/kubernetes.md).

use std::path::PathBuf;
use std::time::Duration;

use weft_control::kubernetes::lease;

/// Kubernetes flags of `weft control`.
#[derive(clap::Args)]
pub struct KubernetesArgs {
    /// Watch Services, Pods and Istio's resources in the Kubernetes API (in-cluster
    /// service account unless --kubeconfig), next to --dir and `weft apply`.
    #[arg(long, env = "WEFT_KUBERNETES")]
    pub kubernetes: bool,
    /// The kubeconfig file to reach the API server with (its current context); implies
    /// --kubernetes.
    #[arg(long, env = "WEFT_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
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
