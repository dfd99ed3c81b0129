//! Typed specs of every supported kind, field names as Istio and Kubernetes spell them.

pub mod common;
pub mod gateway_api;
pub mod k8s;
pub mod mesh;
pub mod networking;
pub mod ratelimit;
pub mod rollout;
pub mod secret;
pub mod security;
pub mod slo;
pub mod telemetry;

pub use common::*;
pub use k8s::*;
pub use mesh::*;
pub use networking::*;
pub use ratelimit::{EnvoyFilter, RateLimit};
pub use rollout::Rollout;
pub use secret::{SecretSpec, TlsMaterial, TLS_SECRET_TYPE};
pub use security::*;
pub use slo::ServiceLevelObjective;
