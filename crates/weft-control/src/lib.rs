//! The control plane: config store, workload registry, translator (Istio resources +
//! registry -> per-proxy xDS), the control-plane process ([`control`]: xDS server, API),
//! Envoy bootstrap rendering, the Istio [`meshconfig`] subset it reads, [`inspect`] for `weft proxy-config`, and Kubernetes sidecar
//! [`inject`]ion (`weft inject`, the `/inject` admission webhook, served over HTTPS by
//! [`webhook_tls`]).
pub mod api;
pub mod control;
pub mod envoy_bootstrap;
pub mod identity;
pub mod inject;
pub mod inspect;
pub mod jwks;
pub mod meshconfig;
pub mod meshstats;
pub mod metrics;
pub mod registry;
pub mod secrets;
pub mod source;
pub mod store;
pub mod tap;
pub mod translate;
pub mod webhook_tls;
