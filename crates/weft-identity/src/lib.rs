//! Workload identity for weft: SPIFFE ids, the mesh CA, join tokens, the certificate
//! service (Istio's `IstioCertificateService`), the proxy-side certificate manager and
//! the rustls pieces that present and verify SPIFFE certificates.
//!
//! - [`SpiffeId`] — `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//! - [`Ca`] — self-signed root in a data directory, or a plug-in CA (Istio `cacerts`);
//!   signs CSRs for the identity a credential grants; root rotation with overlap.
//! - [`TokenIssuer`] — signed, expiring, revocable join tokens; [`Credential`] kinds.
//! - [`service`] — the gRPC certificate service and its client.
//! - [`CertManager`] — the proxy's key (generated in process, never sent), CSR, renewal
//!   at half life with jitter, trust bundle updates; publishes an [`Identity`] on a watch.
//! - [`tls`] — certificate resolvers and SPIFFE-aware verifiers for rustls.
#![forbid(unsafe_code)]

pub mod ca;
pub mod cert;
pub mod channel;
mod error;
mod files;
pub mod manager;
pub mod service;
mod spiffe;
pub mod tls;
pub mod token;

pub use ca::{Ca, CaSource, Issued};
pub use error::IdentityError;
pub use manager::{CertManager, CertManagerConfig, CredentialSource, Identity, TrustBundle};
pub use spiffe::{SpiffeId, DEFAULT_TRUST_DOMAIN};
pub use token::{Credential, Grant, IssuedToken, TokenIssuer};

/// Namespace of the control plane's own identity (Istio's: istiod runs there).
pub const CONTROL_PLANE_NAMESPACE: &str = "istio-system";
/// Service account of the control plane's own identity (Istio's).
pub const CONTROL_PLANE_SERVICE_ACCOUNT: &str = "istiod";

/// The SPIFFE id the control plane's TLS port (15012) presents in `trust_domain`,
/// `spiffe://<td>/ns/istio-system/sa/istiod`, which proxies expect.
pub fn control_plane_id(trust_domain: &str) -> Result<SpiffeId, IdentityError> {
    SpiffeId::new(trust_domain, CONTROL_PLANE_NAMESPACE, CONTROL_PLANE_SERVICE_ACCOUNT)
}
