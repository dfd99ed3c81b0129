//! The control plane: store, registry, translator, xDS server. Filled in by the control-plane issue.
pub mod envoy_bootstrap;
pub mod registry;
pub mod translate;
