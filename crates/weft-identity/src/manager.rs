//! The proxy's certificate manager: generates its ECDSA P-256 key in process (the key
//! never leaves it), sends a CSR with the bootstrap credential, and keeps the current
//! [`Identity`] on a watch. It renews at half of the remaining lifetime with ±10 %
//! jitter, retries failures with capped exponential backoff, and never replaces a valid
//! certificate with nothing. Trust bundle updates (from an SDS `ROOTCA` secret) come in
//! through [`CertManager::set_trust_bundle`] and need no restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng as _;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::ca::verify_chain;
use crate::cert::{certs_from_pem, CertInfo};
use crate::service::CertificateClient;
use crate::{Credential, IdentityError, SpiffeId};

/// Where the proxy's bootstrap credential comes from.
#[derive(Clone, Debug)]
pub enum CredentialSource {
    /// A join token given in configuration.
    JoinToken(String),
    /// A file holding a join token (re-read before every request).
    JoinTokenFile(PathBuf),
    /// A Kubernetes projected service account token file (re-read before every request).
    KubernetesTokenFile(PathBuf),
}

impl CredentialSource {
    /// The credential now (files are read at each call).
    pub fn load(&self) -> Result<Credential, IdentityError> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .map_err(|e| IdentityError::io("cannot read credential", p, e))
        };
        Ok(match self {
            CredentialSource::JoinToken(t) => Credential::JoinToken(t.trim().to_string()),
            CredentialSource::JoinTokenFile(p) => Credential::JoinToken(read(p)?),
            CredentialSource::KubernetesTokenFile(p) => Credential::KubernetesServiceAccountToken(read(p)?),
        })
    }
}

/// Settings of a [`CertManager`].
#[derive(Clone, Debug)]
pub struct CertManagerConfig {
    /// Certificate service, `http://host:port` (the control plane's xDS port).
    pub endpoint: String,
    /// Bootstrap credential.
    pub credential: CredentialSource,
    /// The identity asked for (the CSR's URI SAN); the credential must grant it.
    pub identity: SpiffeId,
    /// Requested validity (`None`: the CA's default, 24 h unless configured).
    pub ttl: Option<Duration>,
    /// First retry delay after a failed request.
    pub backoff_initial: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// How long [`CertManager::start`] keeps retrying the first certificate when the
    /// service is unreachable (refusals fail at once).
    pub initial_timeout: Duration,
    /// For an `https://` endpoint (the control plane's TLS port, 15012): the roots that
    /// verify the control plane on the first request, before the proxy holds a
    /// certificate (the mesh root from its bootstrap). Renewals then go over mTLS with
    /// the current certificate and no bearer credential, the server verified against
    /// the current trust bundle.
    pub root_certs: Vec<CertificateDer<'static>>,
    /// The SPIFFE id the control plane must present over TLS; None:
    /// `spiffe://<td>/ns/istio-system/sa/istiod` ([`crate::control_plane_id`]).
    pub control_plane: Option<SpiffeId>,
}

impl CertManagerConfig {
    fn tls(&self) -> bool {
        self.endpoint.starts_with("https://")
    }

    fn control_plane_id(&self) -> Result<SpiffeId, IdentityError> {
        match &self.control_plane {
            Some(id) => Ok(id.clone()),
            None => crate::control_plane_id(self.identity.trust_domain()),
        }
    }
}

impl CertManagerConfig {
    /// Defaults: CA's TTL, backoff 1 s to 30 s, 60 s for the first certificate.
    pub fn new(endpoint: impl Into<String>, credential: CredentialSource, identity: SpiffeId) -> Self {
        CertManagerConfig {
            endpoint: endpoint.into(),
            credential,
            identity,
            ttl: None,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            initial_timeout: Duration::from_secs(60),
            root_certs: Vec::new(),
            control_plane: None,
        }
    }
}

/// Roots the proxy trusts for its peers.
#[derive(Debug)]
pub struct TrustBundle {
    /// The roots, DER.
    pub roots: Vec<CertificateDer<'static>>,
    /// The same as a rustls store.
    pub store: Arc<RootCertStore>,
    /// Changes whenever the roots do (verifiers cache on it).
    pub version: u64,
    /// Whether the roots came from the control plane's bundle (SDS) rather than from the
    /// root at the end of the issued chain.
    pub from_control_plane: bool,
}

impl TrustBundle {
    /// A bundle of `roots`; unusable roots are skipped with a warning.
    pub fn new(roots: Vec<CertificateDer<'static>>, version: u64, from_control_plane: bool) -> TrustBundle {
        let mut store = RootCertStore::empty();
        let (_, ignored) = store.add_parsable_certificates(roots.iter().cloned());
        if ignored > 0 {
            warn!(ignored, "trust bundle: some roots are not usable certificates");
        }
        TrustBundle { roots, store: Arc::new(store), version, from_control_plane }
    }
}

/// The proxy's current identity: certificate chain and key, validity, trusted roots.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Who we are.
    pub id: SpiffeId,
    /// Leaf and intermediates with the private key, for rustls.
    pub certified_key: Arc<CertifiedKey>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Leaf serial (hex).
    pub serial: String,
    /// Roots peers must chain to.
    pub roots: Arc<TrustBundle>,
}

impl Identity {
    /// An identity from a chain (leaf first, then intermediates; no root) and the leaf's
    /// private key, trusting `roots` (tests, statically configured proxies).
    pub fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Identity, IdentityError> {
        let leaf = chain.first().ok_or_else(|| IdentityError::Certificate("empty certificate chain".into()))?;
        let info = CertInfo::parse(leaf)?;
        let id = info.spiffe_id()?;
        let provider = rustls::crypto::ring::default_provider();
        let certified_key = CertifiedKey::from_der(chain, key, &provider)
            .map_err(|e| IdentityError::Certificate(format!("certificate and key do not fit: {e}")))?;
        Ok(Identity {
            id,
            certified_key: Arc::new(certified_key),
            not_before: info.not_before,
            not_after: info.not_after,
            serial: info.serial,
            roots: Arc::new(TrustBundle::new(roots, 1, true)),
        })
    }

    /// Whether the certificate is still valid.
    pub fn is_valid(&self) -> bool {
        SystemTime::now() < self.not_after
    }
}

/// Keeps the proxy's certificate fresh. Dropping it stops renewals (the last identity
/// stays readable on the receivers).
pub struct CertManager {
    tx: Arc<watch::Sender<Arc<Identity>>>,
    task: JoinHandle<()>,
}

impl CertManager {
    /// Obtains the first certificate (retrying while the service is unreachable, for at
    /// most `initial_timeout`; failing at once when the credential or CSR is refused),
    /// then renews in the background.
    pub async fn start(cfg: CertManagerConfig) -> Result<CertManager, IdentityError> {
        let mut client = if cfg.tls() {
            if cfg.root_certs.is_empty() {
                return Err(IdentityError::Certificate(format!(
                    "{}: the control plane's TLS port needs the mesh root to verify it on the first request \
                     (bootstrap `identity.root_cert_file`)",
                    cfg.endpoint
                )));
            }
            let expected = crate::tls::PeerIdentities::OneOf(vec![cfg.control_plane_id()?]);
            let config = crate::tls::roots_client_config(&cfg.root_certs, expected)?;
            CertificateClient::connect_lazy_tls(&cfg.endpoint, config)?
        } else {
            CertificateClient::connect_lazy(&cfg.endpoint)?
        };
        let deadline = Instant::now() + cfg.initial_timeout;
        let mut backoff = cfg.backoff_initial;
        let first = loop {
            match fetch(&mut client, &cfg, true).await {
                Ok(f) => break f,
                Err(e) if e.is_permanent() => return Err(e),
                Err(e) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(e);
                    }
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "first certificate: retrying");
                    tokio::time::sleep(backoff.min(deadline - now)).await;
                    backoff = (backoff * 2).min(cfg.backoff_max);
                }
            }
        };
        let root = first.root.clone();
        if !cfg.root_certs.is_empty() && !cfg.root_certs.contains(&root) {
            // Plaintext endpoint with a known root: the answer must chain to it.
            return Err(IdentityError::Certificate(format!(
                "{}: the issued chain ends in a root that is not the mesh root of the bootstrap",
                cfg.endpoint
            )));
        }
        let identity = first.into_identity(Arc::new(TrustBundle::new(vec![root], 1, false)));
        info!(identity = %identity.id, serial = %identity.serial, "workload certificate obtained");
        let tx = Arc::new(watch::channel(Arc::new(identity)).0);
        if cfg.tls() {
            // Renewals: mTLS with the current certificate, the server checked against the
            // current bundle (ROOTCA once the proxy feeds it).
            let expected = crate::tls::PeerIdentities::OneOf(vec![cfg.control_plane_id()?]);
            let config = crate::tls::client_config(tx.subscribe(), expected)?;
            client = CertificateClient::connect_lazy_tls(&cfg.endpoint, config)?;
        }
        let task = tokio::spawn(renew_loop(client, cfg, tx.clone()));
        Ok(CertManager { tx, task })
    }

    /// The current identity; changes on every renewal and trust bundle update.
    pub fn identity(&self) -> watch::Receiver<Arc<Identity>> {
        self.tx.subscribe()
    }

    /// The current identity now.
    pub fn current(&self) -> Arc<Identity> {
        self.tx.borrow().clone()
    }

    /// Replaces the trusted roots (the proxy feeds the control plane's `ROOTCA` secret
    /// here). From then on the bundle is the control plane's, not the issued chain's root.
    pub fn set_trust_bundle(&self, roots: Vec<CertificateDer<'static>>) {
        self.tx.send_if_modified(|cur| {
            if cur.roots.from_control_plane && cur.roots.roots == roots {
                return false;
            }
            let bundle = Arc::new(TrustBundle::new(roots, cur.roots.version + 1, true));
            let own: Vec<CertificateDer<'static>> = cur.certified_key.cert.clone();
            if let Err(e) = verify_chain(&own, &bundle.roots) {
                warn!(error = %e, "new trust bundle does not cover this proxy's own certificate (yet)");
            }
            info!(roots = bundle.roots.len(), version = bundle.version, "trust bundle updated");
            let mut next = (**cur).clone();
            next.roots = bundle;
            *cur = Arc::new(next);
            true
        });
    }
}

impl Drop for CertManager {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A certificate fresh from the service.
struct Fetched {
    id: SpiffeId,
    certified_key: Arc<CertifiedKey>,
    info: CertInfo,
    root: CertificateDer<'static>,
}

impl Fetched {
    fn into_identity(self, roots: Arc<TrustBundle>) -> Identity {
        Identity {
            id: self.id,
            certified_key: self.certified_key,
            not_before: self.info.not_before,
            not_after: self.info.not_after,
            serial: self.info.serial,
            roots,
        }
    }
}

/// Renews forever: at the scheduled time, then with backoff until it succeeds.
async fn renew_loop(mut client: CertificateClient, cfg: CertManagerConfig, tx: Arc<watch::Sender<Arc<Identity>>>) {
    loop {
        let (not_after, delay) = {
            let cur = tx.borrow();
            (cur.not_after, renew_delay(SystemTime::now(), cur.not_after, jitter()))
        };
        tokio::time::sleep(delay).await;
        let mut backoff = cfg.backoff_initial;
        loop {
            // Over mTLS the certificate is the credential: the join token was for the first one.
            match fetch(&mut client, &cfg, !cfg.tls()).await {
                Ok(f) => {
                    tx.send_modify(|cur| {
                        let keep = cur.roots.from_control_plane || cur.roots.roots == [f.root.clone()];
                        let roots = if keep {
                            cur.roots.clone()
                        } else {
                            Arc::new(TrustBundle::new(vec![f.root.clone()], cur.roots.version + 1, false))
                        };
                        let next = f.into_identity(roots);
                        info!(identity = %next.id, serial = %next.serial, "workload certificate renewed");
                        *cur = Arc::new(next);
                    });
                    break;
                }
                Err(e) => {
                    let left = not_after.duration_since(SystemTime::now()).unwrap_or_default();
                    if left.is_zero() {
                        warn!(error = %e, "certificate renewal failed and the current certificate has EXPIRED; retrying");
                    } else {
                        warn!(error = %e, expires_in_s = left.as_secs(), retry_in_ms = backoff.as_millis() as u64,
                              "certificate renewal failed; keeping the current certificate and retrying");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(cfg.backoff_max);
                }
            }
        }
    }
}

/// When to renew: half of the lifetime left at `now`, scaled by `jitter` (0.9 to 1.1).
/// Computed from the time left rather than from `notBefore`, which the CA backdates.
pub fn renew_delay(now: SystemTime, not_after: SystemTime, jitter: f64) -> Duration {
    let left = not_after.duration_since(now).unwrap_or_default();
    left.mul_f64(0.5 * jitter.clamp(0.5, 1.5))
}

/// A factor in [0.9, 1.1].
fn jitter() -> f64 {
    rand::rng().random_range(0.9..=1.1)
}

/// One round trip: new key, CSR, request, checks on the answer.
async fn fetch(
    client: &mut CertificateClient,
    cfg: &CertManagerConfig,
    with_credential: bool,
) -> Result<Fetched, IdentityError> {
    let key = KeyPair::generate().map_err(IdentityError::crypto)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(cfg.identity.uri().try_into().map_err(IdentityError::crypto)?)];
    let csr = params.serialize_request(&key).map_err(IdentityError::crypto)?;
    let csr_pem = csr.pem().map_err(IdentityError::crypto)?;
    let credential = if with_credential { Some(cfg.credential.load()?) } else { None };
    let chain_pems = client.request_certificate(credential.as_ref(), csr_pem, cfg.ttl).await?;
    let mut chain = certs_from_pem(&chain_pems.concat(), "issued chain")?;
    let (Some(root), false) = (chain.pop(), chain.is_empty()) else {
        return Err(IdentityError::Certificate("the issued chain has no root after the leaf".into()));
    };
    verify_chain(&chain, std::slice::from_ref(&root))?;
    let info = CertInfo::parse(&chain[0])?;
    let got = info.spiffe_id()?;
    if got != cfg.identity {
        return Err(IdentityError::Certificate(format!("issued for {got}, asked for {}", cfg.identity)));
    }
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = rustls::crypto::ring::default_provider();
    let certified_key = CertifiedKey::from_der(chain, der, &provider)
        .map_err(|e| IdentityError::Certificate(format!("issued certificate does not fit our key: {e}")))?;
    Ok(Fetched { id: got, certified_key: Arc::new(certified_key), info, root })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_half_the_remaining_life_within_ten_percent() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let after = now + Duration::from_secs(100);
        assert_eq!(renew_delay(now, after, 1.0), Duration::from_secs(50));
        assert_eq!(renew_delay(now, after, 0.9), Duration::from_secs(45));
        assert_eq!(renew_delay(now, after, 1.1), Duration::from_secs(55));
        for _ in 0..1000 {
            let d = renew_delay(now, after, jitter());
            assert!(d >= Duration::from_secs(45) && d <= Duration::from_secs(55), "{d:?}");
        }
        // Already expired: renew now.
        assert_eq!(renew_delay(after, now, 1.0), Duration::ZERO);
    }
}
