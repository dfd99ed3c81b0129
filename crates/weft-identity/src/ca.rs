//! The mesh CA: a self-signed root kept in the control plane's data directory, or a
//! plug-in CA (Istio's `cacerts` layout) under an organisation's root; signs workload
//! CSRs for the identity a credential grants; publishes the trust bundle; rotates its
//! root with an overlap during which old and new roots are both trusted.
//!
//! Data directory of a self-signed CA (directory 0700, keys 0600):
//!
//! | file | what |
//! |---|---|
//! | `root-cert.pem`, `root-key.pem` | the root that signs now |
//! | `next-root-cert.pem`, `next-root-key.pem` | a root announced by [`Ca::begin_root_rotation`]: trusted, not yet signing |
//! | `previous-roots.pem` | roots replaced by a rotation, still trusted until they expire or [`Ca::retire_previous_roots`] |

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::RootCertStore;
use tokio::sync::watch;
use tracing::info;

use crate::cert::{cert_pem, certs_from_pem, fingerprint, CertInfo};
use crate::files::{private_dir, read_optional, read_secret, write_atomic};
use crate::{IdentityError, SpiffeId};

/// Validity of a generated root.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far back a leaf's `notBefore` is set, for clocks slightly behind the CA's.
pub const LEAF_BACKDATE: Duration = Duration::from_secs(60);

/// Where the CA's material comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaSource {
    /// Generated on first start, kept in this data directory.
    SelfSigned(PathBuf),
    /// Loaded from Istio's `cacerts` files in this directory (read only).
    PlugIn(PathBuf),
}

/// A signed workload certificate.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The leaf, PEM.
    pub leaf_pem: String,
    /// Intermediates (plug-in CA) then the root, PEM, in Istio's order.
    pub chain_pems: Vec<String>,
    /// End of validity of the leaf.
    pub not_after: SystemTime,
    /// Serial number (hex).
    pub serial: String,
}

impl Issued {
    /// `[leaf, intermediates..., root]`: what `CreateCertificate` answers.
    pub fn cert_chain(&self) -> Vec<String> {
        std::iter::once(self.leaf_pem.clone()).chain(self.chain_pems.iter().cloned()).collect()
    }
}

/// The CA. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Ca {
    trust_domain: String,
    source: CaSource,
    state: RwLock<Arc<CaState>>,
    changes: watch::Sender<u64>,
}

struct CaState {
    signer: Arc<Signer>,
    /// Announced by `begin_root_rotation`: trusted, not signing yet.
    next: Option<Arc<Signer>>,
    /// Replaced roots still trusted.
    previous: Vec<CertificateDer<'static>>,
}

/// A certificate that signs leaves, and what chains it to its root.
struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate (the root itself for a self-signed CA).
    cert: CertificateDer<'static>,
    /// Certificates between the signing certificate and the root (plug-in CA).
    intermediates: Vec<CertificateDer<'static>>,
    root: CertificateDer<'static>,
    not_after: SystemTime,
    /// PEM of the key, kept only for a self-signed root (to persist it).
    key_pem: Option<String>,
}

impl Ca {
    /// Loads the self-signed CA from `dir`, or creates it there (directory 0700, key 0600)
    /// on first start.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Ca, IdentityError> {
        SpiffeId::new(trust_domain, "x", "x")?;
        private_dir(dir)?;
        let signer = match read_optional(&dir.join("root-cert.pem"), "cannot read CA root")? {
            Some(cert) => {
                let key = read_secret(&dir.join("root-key.pem"), "cannot read CA root key")?;
                let s = load_root(&cert, &key, "root-cert.pem")?;
                info!(dir = %dir.display(), root = %fingerprint(&s.root), "CA root loaded");
                s
            }
            None => {
                let s = new_root(trust_domain)?;
                write_root(dir, "root", &s)?;
                info!(dir = %dir.display(), root = %fingerprint(&s.root), "CA root created");
                s
            }
        };
        let next = match read_optional(&dir.join("next-root-cert.pem"), "cannot read next CA root")? {
            Some(cert) => {
                let key = read_secret(&dir.join("next-root-key.pem"), "cannot read next CA root key")?;
                Some(Arc::new(load_root(&cert, &key, "next-root-cert.pem")?))
            }
            None => None,
        };
        let previous = match read_optional(&dir.join("previous-roots.pem"), "cannot read previous CA roots")? {
            Some(pem) if !pem.trim().is_empty() => certs_from_pem(&pem, "previous-roots.pem")?,
            _ => Vec::new(),
        };
        let ca = Ca::from_parts(trust_domain, CaSource::SelfSigned(dir.to_path_buf()), signer, next, previous);
        ca.self_test()?;
        Ok(ca)
    }

    /// A plug-in CA from Istio's `cacerts` layout in `dir`: `ca-cert.pem` (the signing CA,
    /// usually an intermediate), `ca-key.pem`, `root-cert.pem` (the organisation's root)
    /// and `cert-chain.pem` (from `ca-cert` up to the root; optional when `ca-cert` is
    /// signed by the root directly). Checks that the key matches and that a leaf signed
    /// with it chains to the root.
    pub fn plug_in(dir: &Path, trust_domain: &str) -> Result<Ca, IdentityError> {
        SpiffeId::new(trust_domain, "x", "x")?;
        let read = |name: &str| -> Result<String, IdentityError> {
            std::fs::read_to_string(dir.join(name))
                .map_err(|e| IdentityError::io("cannot read plug-in CA file", dir.join(name), e))
        };
        let ca_cert = first_cert(&read("ca-cert.pem")?, "ca-cert.pem")?;
        let key_pem = read_secret(&dir.join("ca-key.pem"), "cannot read plug-in CA key")?;
        let root = first_cert(&read("root-cert.pem")?, "root-cert.pem")?;
        let chain = match read_optional(&dir.join("cert-chain.pem"), "cannot read plug-in CA file")? {
            Some(pem) => certs_from_pem(&pem, "cert-chain.pem").map_err(|e| IdentityError::InvalidCa(e.to_string()))?,
            None => Vec::new(),
        };
        let info = CertInfo::parse(&ca_cert).map_err(|e| IdentityError::InvalidCa(format!("ca-cert.pem: {e}")))?;
        if !info.is_ca {
            return Err(IdentityError::InvalidCa(
                "ca-cert.pem is not a CA certificate (basicConstraints CA:TRUE is missing)".into(),
            ));
        }
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| IdentityError::InvalidCa(format!("ca-key.pem: not a usable private key: {e}")))?;
        if key.public_key_raw() != info.public_key.as_slice() {
            return Err(IdentityError::InvalidCa("ca-key.pem is not the key of ca-cert.pem".into()));
        }
        let issuer = Issuer::from_ca_cert_der(&ca_cert, key)
            .map_err(|e| IdentityError::InvalidCa(format!("ca-cert.pem: {e}")))?;
        // cert-chain.pem holds ca-cert, intermediates and usually the root: keep what lies
        // strictly between the two.
        let intermediates: Vec<_> = chain.into_iter().filter(|c| *c != ca_cert && *c != root).collect();
        let signer = Signer { issuer, cert: ca_cert, intermediates, root, not_after: info.not_after, key_pem: None };
        let ca = Ca::from_parts(trust_domain, CaSource::PlugIn(dir.to_path_buf()), signer, None, Vec::new());
        ca.self_test().map_err(|e| {
            IdentityError::InvalidCa(format!(
                "a certificate signed with ca-cert.pem does not verify against root-cert.pem \
                 (check cert-chain.pem holds every intermediate): {e}"
            ))
        })?;
        info!(dir = %dir.display(), signer = %fingerprint(&ca.state().signer.cert),
              root = %fingerprint(&ca.state().signer.root), "plug-in CA loaded");
        Ok(ca)
    }

    /// A self-signed CA that lives only in memory (tests, throwaway meshes).
    pub fn ephemeral(trust_domain: &str) -> Result<Ca, IdentityError> {
        SpiffeId::new(trust_domain, "x", "x")?;
        Ok(Ca::from_parts(
            trust_domain,
            CaSource::SelfSigned(PathBuf::new()),
            new_root(trust_domain)?,
            None,
            Vec::new(),
        ))
    }

    fn from_parts(
        trust_domain: &str,
        source: CaSource,
        signer: Signer,
        next: Option<Arc<Signer>>,
        previous: Vec<CertificateDer<'static>>,
    ) -> Ca {
        Ca {
            trust_domain: trust_domain.to_string(),
            source,
            state: RwLock::new(Arc::new(CaState { signer: Arc::new(signer), next, previous })),
            changes: watch::channel(0).0,
        }
    }

    /// Re-reads a self-signed CA's files (another replica sharing the store rotated the
    /// root and its files were written here): the state is replaced and the trust bundle
    /// change announced when the roots differ. Nothing to do for plug-in and ephemeral
    /// CAs; an error (the state kept) when the files do not load.
    pub fn reload(&self) -> Result<bool, IdentityError> {
        let dir = match &self.source {
            CaSource::SelfSigned(d) if !d.as_os_str().is_empty() => d.clone(),
            _ => return Ok(false),
        };
        if read_optional(&dir.join("root-cert.pem"), "cannot read CA root")?.is_none() {
            return Ok(false);
        }
        let loaded = Ca::load_or_create(&dir, &self.trust_domain)?;
        let fresh = loaded.state();
        let current = self.state();
        let same = current.signer.root == fresh.signer.root
            && current.next.as_ref().map(|n| &n.root) == fresh.next.as_ref().map(|n| &n.root)
            && current.previous == fresh.previous;
        if same {
            return Ok(false);
        }
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        self.changes.send_modify(|v| *v += 1);
        info!(root = %fingerprint(&self.state().signer.root), "CA reloaded from its files");
        Ok(true)
    }

    /// The trust domain this CA issues identities in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Where the CA's material comes from.
    pub fn source(&self) -> &CaSource {
        &self.source
    }

    /// Bumps whenever the trust bundle changes (root rotation steps).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Roots a workload must trust now: the signing root, an announced next root, and
    /// replaced roots that have not expired. No duplicates.
    pub fn trust_bundle(&self) -> Vec<CertificateDer<'static>> {
        let st = self.state();
        let now = SystemTime::now();
        let mut out: Vec<CertificateDer<'static>> = vec![st.signer.root.clone()];
        let candidates = st.next.iter().map(|n| n.root.clone()).chain(st.previous.iter().cloned());
        for c in candidates {
            let live = CertInfo::parse(&c).map(|i| i.not_after > now).unwrap_or(false);
            if live && !out.contains(&c) {
                out.push(c);
            }
        }
        out
    }

    /// [`Ca::trust_bundle`] as concatenated PEM.
    pub fn trust_bundle_pem(&self) -> String {
        self.trust_bundle().iter().map(|c| cert_pem(c)).collect()
    }

    /// The trust bundle as a rustls root store.
    pub fn root_store(&self) -> RootCertStore {
        let mut store = RootCertStore::empty();
        let (_added, _ignored) = store.add_parsable_certificates(self.trust_bundle());
        store
    }

    /// Signs `csr_pem` for `identity` (what the caller's credential grants) for `ttl`.
    ///
    /// The CSR's signature must verify (proof the caller holds the key); every subject
    /// alternative name it asks for must be `identity`'s URI; it may not ask to be a CA.
    /// The leaf gets the URI SAN, keyUsage digitalSignature + keyEncipherment, extended
    /// key usage serverAuth + clientAuth, an empty subject, `notBefore` backdated by
    /// [`LEAF_BACKDATE`] and `notAfter` = now + `ttl` (never past the signing CA's own).
    pub fn sign_csr(&self, csr_pem: &str, identity: &SpiffeId, ttl: Duration) -> Result<Issued, IdentityError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| match e {
            rcgen::Error::InvalidCertificationRequestSignature => {
                IdentityError::CsrRefused("the CSR's signature does not verify".into())
            }
            other => IdentityError::CsrRefused(format!("not a usable PKCS#10 CSR: {other}")),
        })?;
        if !matches!(csr.params.is_ca, IsCa::NoCa) {
            return Err(IdentityError::CsrRefused("the CSR asks for a CA certificate".into()));
        }
        let granted = identity.uri();
        for san in &csr.params.subject_alt_names {
            let asked = match san {
                SanType::URI(u) => u.as_str().to_string(),
                SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
                SanType::IpAddress(ip) => format!("IP:{ip}"),
                SanType::Rfc822Name(m) => format!("email:{}", m.as_str()),
                other => format!("{other:?}"),
            };
            if asked != granted {
                return Err(IdentityError::IdentityNotGranted { asked, granted });
            }
        }
        self.sign(&csr.public_key, identity, ttl)
    }

    /// A key pair generated here and a certificate for it: only for data planes that
    /// cannot send a CSR (Envoy over SDS). Returns the key as PKCS#8 PEM.
    pub fn issue_with_key(&self, identity: &SpiffeId, ttl: Duration) -> Result<(String, Issued), IdentityError> {
        let key = KeyPair::generate().map_err(IdentityError::crypto)?;
        let issued = self.sign(&key, identity, ttl)?;
        Ok((key.serialize_pem(), issued))
    }

    fn sign(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<Issued, IdentityError> {
        if identity.trust_domain() != self.trust_domain {
            return Err(IdentityError::CsrRefused(format!(
                "{identity} is outside this CA's trust domain {}",
                self.trust_domain
            )));
        }
        let signer = self.state().signer.clone();
        let now = SystemTime::now();
        // A TTL past what SystemTime holds ends with the signing CA, like any long one.
        let not_after = now.checked_add(ttl).map_or(signer.not_after, |t| t.min(signer.not_after));
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = identity.uri().try_into().map_err(IdentityError::crypto)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = to_offset(now - LEAF_BACKDATE)?;
        params.not_after = to_offset(not_after)?;
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &signer.issuer).map_err(IdentityError::crypto)?;
        let info = CertInfo::parse(cert.der())?;
        let mut chain_pems = Vec::new();
        if signer.cert != signer.root {
            chain_pems.push(cert_pem(&signer.cert));
        }
        chain_pems.extend(signer.intermediates.iter().map(|c| cert_pem(c)));
        chain_pems.push(cert_pem(&signer.root));
        Ok(Issued { leaf_pem: cert.pem(), chain_pems, not_after: info.not_after, serial: info.serial })
    }

    /// Generates a new root and trusts it without signing with it yet, so the new bundle
    /// reaches every workload before any leaf chains to the new root. Self-signed CAs
    /// only (a plug-in CA is rotated by replacing its files).
    pub fn begin_root_rotation(&self) -> Result<(), IdentityError> {
        let dir = self.self_signed_dir("begin a root rotation")?;
        let mut guard = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if guard.next.is_some() {
            return Ok(());
        }
        let next = new_root(&self.trust_domain)?;
        if let Some(dir) = &dir {
            write_root(dir, "next-root", &next)?;
        }
        info!(next_root = %fingerprint(&next.root), "CA root rotation begun: new root trusted, not signing yet");
        *guard = Arc::new(CaState {
            signer: guard.signer.clone(),
            next: Some(Arc::new(next)),
            previous: guard.previous.clone(),
        });
        drop(guard);
        self.changes.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Signs with the root announced by [`Ca::begin_root_rotation`] (beginning it first
    /// if needed); the replaced root stays in the trust bundle until it expires or
    /// [`Ca::retire_previous_roots`].
    pub fn complete_root_rotation(&self) -> Result<(), IdentityError> {
        let dir = self.self_signed_dir("complete a root rotation")?;
        if self.state().next.is_none() {
            self.begin_root_rotation()?;
        }
        let mut guard = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let Some(next) = guard.next.clone() else {
            return Err(IdentityError::InvalidCa("no next root to rotate to".into()));
        };
        let old = guard.signer.root.clone();
        let mut previous = guard.previous.clone();
        if !previous.contains(&old) {
            previous.push(old.clone());
        }
        if let Some(dir) = &dir {
            write_previous(dir, &previous)?;
            write_root(dir, "root", &next)?;
            for f in ["next-root-cert.pem", "next-root-key.pem"] {
                let _ = std::fs::remove_file(dir.join(f));
            }
        }
        info!(old_root = %fingerprint(&old), new_root = %fingerprint(&next.root),
              "CA root rotated: signing with the new root, old root still trusted");
        *guard = Arc::new(CaState { signer: next, next: None, previous });
        drop(guard);
        self.changes.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Both rotation steps at once: [`Ca::begin_root_rotation`] then
    /// [`Ca::complete_root_rotation`]. Workloads that renew before they receive the new
    /// bundle present a leaf their peers cannot verify yet; prefer the two steps with a
    /// pause of at least one xDS push between them when traffic must not fail.
    pub fn rotate_root(&self) -> Result<(), IdentityError> {
        self.begin_root_rotation()?;
        self.complete_root_rotation()
    }

    /// Ends the overlap: roots replaced by a rotation leave the trust bundle (do this once
    /// every workload holds a leaf from the new root: one certificate TTL after the
    /// rotation).
    pub fn retire_previous_roots(&self) -> Result<usize, IdentityError> {
        let dir = self.self_signed_dir("retire previous roots")?;
        let mut guard = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let n = guard.previous.len();
        if n == 0 {
            return Ok(0);
        }
        if let Some(dir) = &dir {
            write_previous(dir, &[])?;
        }
        *guard = Arc::new(CaState { signer: guard.signer.clone(), next: guard.next.clone(), previous: Vec::new() });
        drop(guard);
        info!(retired = n, "previous CA roots retired from the trust bundle");
        self.changes.send_modify(|v| *v += 1);
        Ok(n)
    }

    fn state(&self) -> Arc<CaState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The data directory of a self-signed CA (`None` for an ephemeral one); an error
    /// for a plug-in CA.
    fn self_signed_dir(&self, what: &str) -> Result<Option<PathBuf>, IdentityError> {
        match &self.source {
            CaSource::SelfSigned(d) if d.as_os_str().is_empty() => Ok(None),
            CaSource::SelfSigned(d) => Ok(Some(d.clone())),
            CaSource::PlugIn(d) => Err(IdentityError::InvalidCa(format!(
                "cannot {what} of a plug-in CA: replace the files in {} with the new chain instead",
                d.display()
            ))),
        }
    }

    /// Signs a throwaway leaf and verifies it against the trust bundle: proves the
    /// signing key, the chain and the root fit together (and are not expired).
    fn self_test(&self) -> Result<(), IdentityError> {
        let probe = SpiffeId::new(&self.trust_domain, "weft-system", "ca-self-test")?;
        let (_key, issued) = self.issue_with_key(&probe, Duration::from_secs(60))?;
        let chain = certs_from_pem(&issued.cert_chain().concat(), "self-test chain")?;
        verify_chain(&chain, &self.trust_bundle())
    }
}

/// Verifies `chain` (leaf first, then intermediates; a trailing root is ignored as an
/// intermediate) against `roots` with webpki, for both server and client use.
pub fn verify_chain(chain: &[CertificateDer<'static>], roots: &[CertificateDer<'static>]) -> Result<(), IdentityError> {
    let Some((leaf, rest)) = chain.split_first() else {
        return Err(IdentityError::Certificate("empty certificate chain".into()));
    };
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).map_err(|e| IdentityError::Certificate(format!("unusable root: {e}")))?;
    }
    let parsed = rustls::server::ParsedCertificate::try_from(leaf)
        .map_err(|e| IdentityError::Certificate(format!("cannot parse leaf: {e}")))?;
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    rustls::client::verify_server_cert_signed_by_trust_anchor(&parsed, &store, rest, UnixTime::now(), algs.all)
        .map_err(|e| IdentityError::Certificate(format!("chain does not verify: {e}")))
}

fn first_cert(pem: &str, file: &str) -> Result<CertificateDer<'static>, IdentityError> {
    let mut certs = certs_from_pem(pem, file).map_err(|e| IdentityError::InvalidCa(e.to_string()))?;
    Ok(certs.swap_remove(0))
}

fn new_root(trust_domain: &str) -> Result<Signer, IdentityError> {
    let key = KeyPair::generate().map_err(IdentityError::crypto)?;
    let now = SystemTime::now();
    let serial = random_serial()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    let tag: String = serial.to_bytes().iter().take(4).map(|b| format!("{b:02x}")).collect();
    dn.push(DnType::CommonName, format!("weft root CA {tag}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = to_offset(now - Duration::from_secs(3600))?;
    params.not_after = to_offset(now + ROOT_VALIDITY)?;
    params.serial_number = Some(serial);
    let cert = params.self_signed(&key).map_err(IdentityError::crypto)?;
    let key_pem = key.serialize_pem();
    let info = CertInfo::parse(cert.der())?;
    Ok(Signer {
        issuer: Issuer::new(params, key),
        cert: cert.der().clone(),
        intermediates: Vec::new(),
        root: cert.der().clone(),
        not_after: info.not_after,
        key_pem: Some(key_pem),
    })
}

fn load_root(cert_pem_text: &str, key_pem: &str, file: &str) -> Result<Signer, IdentityError> {
    let cert = first_cert(cert_pem_text, file)?;
    let key = KeyPair::from_pem(key_pem)
        .map_err(|e| IdentityError::InvalidCa(format!("the key of {file} is not usable: {e}")))?;
    let info = CertInfo::parse(&cert).map_err(|e| IdentityError::InvalidCa(format!("{file}: {e}")))?;
    if key.public_key_raw() != info.public_key.as_slice() {
        return Err(IdentityError::InvalidCa(format!("the key file does not belong to {file}")));
    }
    let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|e| IdentityError::InvalidCa(format!("{file}: {e}")))?;
    Ok(Signer {
        issuer,
        cert: cert.clone(),
        intermediates: Vec::new(),
        root: cert,
        not_after: info.not_after,
        key_pem: Some(key_pem.to_string()),
    })
}

/// Writes `<prefix>-key.pem` (0600) then `<prefix>-cert.pem` (0644).
fn write_root(dir: &Path, prefix: &str, s: &Signer) -> Result<(), IdentityError> {
    let Some(key) = &s.key_pem else {
        return Err(IdentityError::InvalidCa("only a self-signed root can be written".into()));
    };
    write_atomic(&dir.join(format!("{prefix}-key.pem")), key.as_bytes(), 0o600, "cannot write CA key")?;
    write_atomic(&dir.join(format!("{prefix}-cert.pem")), cert_pem(&s.root).as_bytes(), 0o644, "cannot write CA root")
}

fn write_previous(dir: &Path, roots: &[CertificateDer<'static>]) -> Result<(), IdentityError> {
    let pem: String = roots.iter().map(|c| cert_pem(c)).collect();
    write_atomic(&dir.join("previous-roots.pem"), pem.as_bytes(), 0o644, "cannot write previous CA roots")
}

/// A positive random 128-bit serial.
fn random_serial() -> Result<SerialNumber, IdentityError> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| IdentityError::Crypto("no randomness for a serial number".into()))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn to_offset(t: SystemTime) -> Result<time::OffsetDateTime, IdentityError> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| IdentityError::Crypto("time before 1970".into()))?
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64).map_err(IdentityError::crypto)
}

#[cfg(test)]
mod tests;
