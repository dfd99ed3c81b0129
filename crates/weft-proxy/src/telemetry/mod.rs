//! Telemetry at both ends of a request: Istio's standard metrics ([`metrics`]), one JSON
//! access-log line per request or connection ([`accesslog`]) and the peer metadata
//! exchange that tells each side which workload is on the other end ([`peer`]), and
//! distributed tracing spans ([`trace`]).
//!
//! The core fills plain structs ([`RequestLabels`], [`TcpLabels`],
//! [`accesslog::AccessRecord`]); nothing here touches the data path's sockets.

pub mod accesslog;
pub mod drain;
mod exposition;
pub mod health;
pub mod metrics;
pub mod mx;
pub mod peer;
pub mod ratelimit;
pub mod rbac;
pub mod services;
pub mod tap;
pub mod trace;

use serde::{Deserialize, Serialize};

pub use health::ProxyHealth;

/// The hasher of the telemetry caches looked up on every request (metric series, peer
/// metadata, service labels): foldhash, seeded per process so values chosen by a peer
/// cannot aim collisions at it, and several times cheaper than std's SipHash on the
/// long keys these maps have.
pub type FastState = foldhash::fast::RandomState;
pub use metrics::{Metrics, Reporter, RequestLabels, RequestProtocol, SecurityPolicy, ServiceInfo, TcpLabels};

/// Value Istio writes for a label it does not know.
pub const UNKNOWN: &str = "unknown";

/// Who a workload is, as far as metrics are concerned. Defaults follow Istio: every field
/// is `"unknown"` except `canonical_revision`, which is `"latest"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkloadInfo {
    /// Workload name (Deployment / WorkloadEntry name).
    #[serde(rename = "w")]
    pub workload: String,
    /// Namespace of the workload.
    #[serde(rename = "n")]
    pub namespace: String,
    /// `app` label.
    #[serde(rename = "a")]
    pub app: String,
    /// `version` label.
    #[serde(rename = "v")]
    pub version: String,
    /// SPIFFE identity (`spiffe://<td>/ns/<ns>/sa/<sa>`), `"unknown"` without mTLS.
    #[serde(rename = "p")]
    pub principal: String,
    /// Cluster (Istio's `cluster_id`) the workload runs in.
    #[serde(rename = "c")]
    pub cluster: String,
    /// Service account of the workload.
    #[serde(rename = "s")]
    pub service_account: String,
    /// `service.istio.io/canonical-name` (Istio falls back to the `app` label).
    #[serde(rename = "cs")]
    pub canonical_service: String,
    /// `service.istio.io/canonical-revision` (Istio falls back to `version`, then `latest`).
    #[serde(rename = "cr")]
    pub canonical_revision: String,
}

impl Default for WorkloadInfo {
    fn default() -> Self {
        Self {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            principal: UNKNOWN.into(),
            cluster: UNKNOWN.into(),
            service_account: UNKNOWN.into(),
            canonical_service: UNKNOWN.into(),
            canonical_revision: "latest".into(),
        }
    }
}
