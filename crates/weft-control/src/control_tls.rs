//! The control plane's TLS port (Istio's 15012): xDS and the certificate service over
//! TLS with the control plane's own certificate, issued by the mesh CA for
//! `spiffe://<td>/ns/istio-system/sa/istiod` (re-issued at half life and when the CA's
//! roots change), and client certificates verified against the mesh's current trust
//! bundle when presented. A client certificate is optional at the TLS layer: a proxy's
//! first certificate request comes with its join token and no certificate (it verified
//! the server against the root in its bootstrap); the xDS admission
//! ([`crate::xds_auth`]) then requires a credential for every stream.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use weft_identity::channel::{TlsServerStream, ALPN_H2, HANDSHAKE_TIMEOUT};
use weft_identity::tls::{ClientCertCheck, Verifier};
use weft_identity::{Ca, SpiffeId};

/// Lifetime of the control plane's serving certificate.
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Presents the control plane's certificate, issued by its own CA.
pub struct ServingCert {
    ca: Arc<Ca>,
    id: SpiffeId,
    ttl: Duration,
    ca_changes: watch::Receiver<u64>,
    current: Mutex<Option<Current>>,
}

struct Current {
    key: Arc<CertifiedKey>,
    renew_at: SystemTime,
    ca_version: u64,
}

/// Verifies client certificates against the CA's current trust bundle (optional).
pub struct BundleClientCheck {
    ca: Arc<Ca>,
    ca_changes: watch::Receiver<u64>,
    cached: ArcSwapOption<(u64, Arc<dyn ClientCertVerifier>)>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert").field("id", &self.id).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for BundleClientCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleClientCheck").finish_non_exhaustive()
    }
}

impl ServingCert {
    /// Issues the first certificate for `id` now (a failure stops the start).
    pub fn new(ca: Arc<Ca>, id: SpiffeId, ttl: Duration) -> Result<Arc<Self>, String> {
        let ca_changes = ca.changes();
        let cert = Arc::new(ServingCert { ca, id, ttl, ca_changes, current: Mutex::new(None) });
        cert.key()?;
        Ok(cert)
    }

    /// The SPIFFE id presented.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The current key, re-issued when half its life passed or the CA's roots changed.
    fn key(&self) -> Result<Arc<CertifiedKey>, String> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let version = *self.ca_changes.borrow();
        let now = SystemTime::now();
        if let Some(c) = current.as_ref() {
            if now < c.renew_at && c.ca_version == version {
                return Ok(c.key.clone());
            }
        }
        let (key_pem, issued) = self.ca.issue_with_key(&self.id, self.ttl).map_err(|e| e.to_string())?;
        // Leaf and intermediates; clients hold the root.
        let pems: Vec<&String> = std::iter::once(&issued.leaf_pem)
            .chain(issued.chain_pems.iter().take(issued.chain_pems.len().saturating_sub(1)))
            .collect();
        let chain: Vec<CertificateDer<'static>> = pems
            .iter()
            .map(|p| weft_identity::cert::certs_from_pem(p, "serving certificate"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?
            .into_iter()
            .flatten()
            .collect();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("serving key: {e}"))?;
        let provider = rustls::crypto::ring::default_provider();
        let key = Arc::new(CertifiedKey::from_der(chain, key, &provider).map_err(|e| e.to_string())?);
        let life = issued.not_after.duration_since(now).unwrap_or_default();
        tracing::info!(identity = %self.id, serial = %issued.serial, "control plane serving certificate issued");
        *current = Some(Current { key: key.clone(), renew_at: now + life / 2, ca_version: version });
        Ok(key)
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match self.key() {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::error!(error = %e, "cannot issue the control plane's serving certificate");
                None
            }
        }
    }
}

impl BundleClientCheck {
    /// A check against `ca`'s trust bundle.
    pub fn new(ca: Arc<Ca>) -> Self {
        let ca_changes = ca.changes();
        BundleClientCheck { ca, ca_changes, cached: ArcSwapOption::empty() }
    }

    fn webpki(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let version = *self.ca_changes.borrow();
        if let Some(c) = self.cached.load().as_ref() {
            if c.0 == version {
                return Ok(c.1.clone());
            }
        }
        let v = WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.ca.root_store()),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| rustls::Error::General(format!("trust bundle unusable for client verification: {e}")))?;
        self.cached.store(Some(Arc::new((version, v.clone()))));
        Ok(v)
    }
}

impl ClientCertCheck for BundleClientCheck {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.webpki()?.verify_client_cert(end_entity, intermediates, now)
    }
}

/// The rustls config of the TLS port.
pub fn server_config(ca: &Arc<Ca>) -> Result<(rustls::ServerConfig, Arc<ServingCert>), String> {
    let id = weft_identity::control_plane_id(ca.trust_domain()).map_err(|e| e.to_string())?;
    let cert = ServingCert::new(ca.clone(), id, SERVING_CERT_TTL)?;
    let provider = rustls::crypto::ring::default_provider();
    let verifier = Verifier::checking(BundleClientCheck::new(ca.clone()), &provider);
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(cert.clone());
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok((config, cert))
}

/// Accepts TCP connections on `listener`, runs each TLS handshake in its own task
/// (bounded by [`HANDSHAKE_TIMEOUT`]) and yields the handshaken streams to tonic.
/// Failed handshakes are logged and dropped.
pub fn tls_incoming(
    listener: TcpListener,
    config: rustls::ServerConfig,
) -> ReceiverStream<Result<TlsServerStream, std::io::Error>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            // The server gone (stopped), the port is released at once.
            let accepted = tokio::select! {
                r = listener.accept() => r,
                () = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "TLS xDS port: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(TlsServerStream::new(tls))).await;
                    }
                    Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS xDS port: handshake refused"),
                    Err(_) => tracing::warn!(%peer, "TLS xDS port: handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
