//! The control plane: config store, workload registry, translator (Istio resources +
//! registry -> per-proxy xDS), Envoy bootstrap rendering. The control-plane process
//! (xDS server wiring, API, CLI) is next.
pub mod api;
pub mod control;
pub mod envoy_bootstrap;
pub mod identity;
pub mod registry;
pub mod secrets;
pub mod source;
pub mod store;
pub mod translate;
