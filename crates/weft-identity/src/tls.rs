//! rustls pieces for mTLS between workloads, backed by a [`CertManager`] watch so a
//! renewed certificate or a new trust bundle applies to the next handshake without
//! rebuilding any config:
//!
//! - [`IdentityResolver`]: presents the current certificate (server and client side).
//! - [`SpiffeServerVerifier`] (client side): the server's chain must verify against the
//!   current bundle and its SPIFFE id must be one of the expected identities (Istio's
//!   `subjectAltNames` of the destination). Server names are not checked: workload
//!   certificates carry only a URI SAN.
//! - [`SpiffeClientVerifier`] (server side): the client's chain must verify against the
//!   bundle; optionally its id must be in an allowed set. [`peer_identity`] reads the
//!   id from the connection afterwards (for authorization, telemetry).
//! - [`rejection_reason`]: a short label for why a peer was refused (metrics, logs).
//! - [`Verifier`]: what every rustls verifier shares (handshake signatures checked with
//!   the provider's algorithms) around a [`ServerCertCheck`] or [`ClientCertCheck`],
//!   the part that differs; the proxy's non-mesh verifiers are built on it too.
//!
//! [`CertManager`]: crate::CertManager

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError, ServerConfig, SignatureScheme,
};
use tokio::sync::watch;

use crate::cert::spiffe_id_of;
use crate::{Identity, IdentityError, SpiffeId};

/// Which peer identities a verifier accepts once the chain verifies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerIdentities {
    /// Any SPIFFE id the trust bundle vouches for.
    Any,
    /// Only these.
    OneOf(Vec<SpiffeId>),
}

impl PeerIdentities {
    fn check(&self, got: &SpiffeId) -> Result<(), IdentityError> {
        match self {
            PeerIdentities::Any => Ok(()),
            PeerIdentities::OneOf(ids) if ids.contains(got) => Ok(()),
            PeerIdentities::OneOf(ids) => Err(IdentityError::PeerNotExpected {
                got: got.to_string(),
                expected: ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" or "),
            }),
        }
    }
}

/// Presents the current certificate of a [`crate::CertManager`].
#[derive(Debug)]
pub struct IdentityResolver {
    identity: watch::Receiver<Arc<Identity>>,
}

impl IdentityResolver {
    /// A resolver over `identity`.
    pub fn new(identity: watch::Receiver<Arc<Identity>>) -> Self {
        IdentityResolver { identity }
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.identity.borrow().certified_key.clone()
    }
}

impl ResolvesServerCert for IdentityResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for IdentityResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A rustls verifier: a certificate check `C` (what tells verifiers apart) plus the
/// handshake-signature checks every verifier makes the same way, with a provider's
/// algorithms. It is a [`ServerCertVerifier`] over a [`ServerCertCheck`] and a
/// [`ClientCertVerifier`] over a [`ClientCertCheck`].
#[derive(Debug)]
pub struct Verifier<C> {
    check: C,
    algorithms: WebPkiSupportedAlgorithms,
}

/// What a [`ServerCertVerifier`] decides about the server's certificate.
pub trait ServerCertCheck: fmt::Debug + Send + Sync {
    /// As [`ServerCertVerifier::verify_server_cert`].
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error>;
}

/// What a [`ClientCertVerifier`] decides about the client's certificate.
pub trait ClientCertCheck: fmt::Debug + Send + Sync {
    /// As [`ClientCertVerifier::client_auth_mandatory`].
    fn client_auth_mandatory(&self) -> bool;

    /// As [`ClientCertVerifier::verify_client_cert`].
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error>;
}

/// Client side: verifies a server against the current bundle and expected identities.
pub type SpiffeServerVerifier = Verifier<SpiffeServerCheck>;

/// The certificate check of a [`SpiffeServerVerifier`].
#[derive(Debug)]
pub struct SpiffeServerCheck {
    identity: watch::Receiver<Arc<Identity>>,
    expected: PeerIdentities,
    provider: Arc<CryptoProvider>,
}

/// Server side: verifies a client against the current bundle (and an allowed set).
pub type SpiffeClientVerifier = Verifier<SpiffeClientCheck>;

/// The certificate check of a [`SpiffeClientVerifier`].
#[derive(Debug)]
pub struct SpiffeClientCheck {
    identity: watch::Receiver<Arc<Identity>>,
    allowed: PeerIdentities,
    mandatory: bool,
    provider: Arc<CryptoProvider>,
    /// webpki's client verifier for one bundle version.
    cached: ArcSwapOption<(u64, Arc<dyn ClientCertVerifier>)>,
}

impl<C> Verifier<C> {
    /// A verifier making `check` and verifying handshake signatures with `provider`'s
    /// algorithms.
    pub fn checking(check: C, provider: &CryptoProvider) -> Self {
        Verifier { check, algorithms: provider.signature_verification_algorithms }
    }
}

/// The handshake-signature methods of a [`Verifier`], the same in both rustls verifier
/// traits: checked with the provider's algorithms.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algorithms.supported_schemes()
        }
    };
}

impl<C: ServerCertCheck> ServerCertVerifier for Verifier<C> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    signature_checks!();
}

impl<C: ClientCertCheck> ClientCertVerifier for Verifier<C> {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.check.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: workloads have one certificate, hints would not change their choice.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check.verify_client_cert(end_entity, intermediates, now)
    }

    signature_checks!();
}

impl SpiffeServerVerifier {
    /// A verifier trusting `identity`'s bundle and accepting `expected`.
    pub fn new(identity: watch::Receiver<Arc<Identity>>, expected: PeerIdentities) -> Self {
        let provider = provider();
        Verifier::checking(SpiffeServerCheck { identity, expected, provider: provider.clone() }, &provider)
    }
}

impl ServerCertCheck for SpiffeServerCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = self.identity.borrow().roots.clone();
        verify_spiffe_server(end_entity, intermediates, now, &roots.store, &self.provider, &self.expected)
    }
}

impl SpiffeClientVerifier {
    /// A verifier trusting `identity`'s bundle and accepting `allowed`. When not
    /// `mandatory`, a client without a certificate is let through (PERMISSIVE-style
    /// listeners decide later); one that presents a certificate is always verified.
    pub fn new(identity: watch::Receiver<Arc<Identity>>, allowed: PeerIdentities, mandatory: bool) -> Self {
        let provider = provider();
        let check = SpiffeClientCheck {
            identity,
            allowed,
            mandatory,
            provider: provider.clone(),
            cached: ArcSwapOption::empty(),
        };
        Verifier::checking(check, &provider)
    }
}

impl SpiffeClientCheck {
    fn webpki(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let roots = self.identity.borrow().roots.clone();
        if let Some(c) = self.cached.load().as_ref() {
            if c.0 == roots.version {
                return Ok(c.1.clone());
            }
        }
        let v = WebPkiClientVerifier::builder_with_provider(roots.store.clone(), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(format!("trust bundle unusable for client verification: {e}")))?;
        self.cached.store(Some(Arc::new((roots.version, v.clone()))));
        Ok(v)
    }
}

impl ClientCertCheck for SpiffeClientCheck {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.webpki()?.verify_client_cert(end_entity, intermediates, now)?;
        check_identity(end_entity, &self.allowed)?;
        Ok(ClientCertVerified::assertion())
    }
}

/// A client config presenting `identity` and accepting servers in `expected`. Set ALPN
/// on the result as needed; any server name may be used to connect (it is not checked).
pub fn client_config(
    identity: watch::Receiver<Arc<Identity>>,
    expected: PeerIdentities,
) -> Result<ClientConfig, IdentityError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(IdentityError::crypto)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(identity.clone(), expected)))
        .with_client_cert_resolver(Arc::new(IdentityResolver::new(identity))))
}

/// A server config presenting `identity` and verifying clients (see
/// [`SpiffeClientVerifier::new`] for `mandatory`).
pub fn server_config(
    identity: watch::Receiver<Arc<Identity>>,
    allowed: PeerIdentities,
    mandatory: bool,
) -> Result<ServerConfig, IdentityError> {
    Ok(ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(IdentityError::crypto)?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(identity.clone(), allowed, mandatory)))
        .with_cert_resolver(Arc::new(IdentityResolver::new(identity))))
}

/// Client side, before the proxy holds a certificate: verifies the server against fixed
/// roots (the mesh root from the proxy's bootstrap) and expected identities.
pub type RootsServerVerifier = Verifier<RootsServerCheck>;

/// The certificate check of a [`RootsServerVerifier`].
#[derive(Debug)]
pub struct RootsServerCheck {
    store: Arc<rustls::RootCertStore>,
    expected: PeerIdentities,
    provider: Arc<CryptoProvider>,
}

impl ServerCertCheck for RootsServerCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_spiffe_server(end_entity, intermediates, now, &self.store, &self.provider, &self.expected)
    }
}

/// A client config without a client certificate, accepting servers whose chain verifies
/// to `roots` and whose SPIFFE id is in `expected`: a proxy's first request to the
/// control plane (its certificate signing request with the join token), the roots
/// coming from its bootstrap.
pub fn roots_client_config(
    roots: &[CertificateDer<'static>],
    expected: PeerIdentities,
) -> Result<ClientConfig, IdentityError> {
    let mut store = rustls::RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(roots.iter().cloned());
    if added == 0 {
        return Err(IdentityError::Certificate("no usable root certificate to verify the control plane".into()));
    }
    let provider = provider();
    let check = RootsServerCheck { store: Arc::new(store), expected, provider: provider.clone() };
    Ok(ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(IdentityError::crypto)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier::checking(check, &provider)))
        .with_no_client_auth())
}

/// The SPIFFE id of a connection's peer, from `peer_certificates()` of a rustls
/// connection (`None` when the peer sent no certificate or it has no SPIFFE id).
pub fn peer_identity(peer_certificates: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    spiffe_id_of(peer_certificates?.first()?).ok()
}

/// Why a handshake refused a peer, as a short label for metrics and logs:
/// `expired`, `not_yet_valid`, `unknown_ca`, `wrong_identity`, `no_spiffe_id`,
/// `no_certificate`, `bad_certificate`, or `handshake` for anything else.
pub fn rejection_reason(err: &rustls::Error) -> &'static str {
    match err {
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => "not_yet_valid",
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown_ca",
            CertificateError::Other(OtherError(e)) => match e.downcast_ref::<IdentityError>() {
                Some(IdentityError::PeerNotExpected { .. }) => "wrong_identity",
                Some(_) => "no_spiffe_id",
                None => "bad_certificate",
            },
            _ => "bad_certificate",
        },
        _ => "handshake",
    }
}

/// A server certificate chained to `store` whose SPIFFE id is one of `expected`.
fn verify_spiffe_server(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    store: &rustls::RootCertStore,
    provider: &CryptoProvider,
    expected: &PeerIdentities,
) -> Result<ServerCertVerified, rustls::Error> {
    let parsed = ParsedCertificate::try_from(end_entity)?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        store,
        intermediates,
        now,
        provider.signature_verification_algorithms.all,
    )?;
    check_identity(end_entity, expected)?;
    Ok(ServerCertVerified::assertion())
}

fn check_identity(end_entity: &CertificateDer<'_>, allowed: &PeerIdentities) -> Result<(), rustls::Error> {
    let other = |e: IdentityError| rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))));
    let id = spiffe_id_of(end_entity).map_err(other)?;
    allowed.check(&id).map_err(other)
}

/// The mesh's TLS crypto: ring's, with TLS 1.3's AES-128-GCM first, as Envoy orders it
/// (BoringSSL prefers it on CPUs with AES instructions, so two Istio sidecars negotiate
/// `TLS_AES_128_GCM_SHA256`); ring lists AES-256-GCM first. Two weft sidecars then agree
/// on the suite two Envoys agree on, which also takes fewer AES rounds per record (issue
/// 20). The other suites keep ring's order; a peer that prefers another suite still gets
/// it (rustls follows the client's order).
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // A stable sort: only AES-128-GCM moves (to the front).
    provider.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

#[cfg(test)]
mod tests;
