//! The control plane: config store, workload registry, translator (Istio resources +
//! registry -> per-proxy xDS), the control-plane process ([`control`]: xDS server, API),
//! the [`dashboard`] over the gathered [`meshstats`], Envoy bootstrap rendering, the Istio [`meshconfig`] subset it reads, [`inspect`] for `weft proxy-config`, and Kubernetes sidecar
//! [`inject`]ion (`weft inject`, the `/inject` admission webhook, served over HTTPS by
//! [`webhook_tls`]), and progressive delivery ([`rollout`]: `Rollout` canaries and
//! staged configuration changes).
pub mod api;
pub mod api_auth;
pub mod control;
pub mod control_tls;
pub mod credentials;
pub mod dashboard;
pub mod envoy_bootstrap;
pub mod etcd;
pub mod gwapi;
pub mod identity;
pub mod inject;
pub mod inspect;
pub mod jwks;
pub mod k8s_tokens;
pub mod kubernetes;
pub mod leader;
pub mod meshconfig;
pub mod meshstats;
pub mod metrics;
pub mod registry;
pub mod rollout;
pub mod secrets;
pub mod slo;
pub mod source;
pub mod store;
pub mod tap;
pub mod translate;
pub mod vip;
pub mod webhook_tls;
pub mod xds_auth;
