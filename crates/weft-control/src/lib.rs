//! The control plane: config store, workload registry, translator (Istio resources +
//! registry -> per-proxy xDS), the control-plane process ([`control`]: xDS server, API),
//! Envoy bootstrap rendering, and [`inspect`] for `weft proxy-config`.
pub mod api;
pub mod control;
pub mod envoy_bootstrap;
pub mod identity;
pub mod inspect;
pub mod jwks;
pub mod registry;
pub mod secrets;
pub mod source;
pub mod store;
pub mod translate;
