//! The control plane: store, registry, translator, xDS server. Filled in by the control-plane issue.
