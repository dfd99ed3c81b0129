//! Resource types users write (Istio and Kubernetes kinds), parsing and validation.
//! Filled in by the control-plane issue; see ARCHITECTURE.md.
