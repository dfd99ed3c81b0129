//! The control plane: config store, workload registry, translator (Istio resources +
//! registry -> per-proxy xDS), Envoy bootstrap rendering. The control-plane process
//! (xDS server wiring, API, CLI) is next.
pub mod envoy_bootstrap;
pub mod registry;
pub mod store;
pub mod translate;
