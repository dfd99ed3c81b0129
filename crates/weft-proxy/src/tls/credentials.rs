//! SDS secrets by name other than the mesh's own (`default`, `ROOTCA`): the
//! `kubernetes://<name>` certificates and `kubernetes://<name>-cacert` CAs a gateway's
//! `credentialName` refers to, as the control plane serves them over ADS.
//!
//! [`NamedSecrets`] holds the latest of each by name; the rustls pieces here
//! ([`SdsCertResolver`], [`SdsClientCheck`], [`SdsServerCheck`], [`SdsClientCert`]) look
//! the name up on every handshake, so a rotated secret takes effect for new handshakes
//! without recompiling listeners or clusters, and a handshake before the secret arrived
//! fails (Envoy would keep the listener warming).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use rustls::client::danger::ServerCertVerified;
use rustls::client::{verify_server_name, ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, SignatureScheme};
use weft_identity::tls::{ClientCertCheck, ServerCertCheck};

use super::{certs, data, provider};
use crate::proto::decode;

/// One secret as received.
pub enum NamedSecret {
    /// A certificate chain and key.
    Cert(Arc<CertifiedKey>),
    /// A CA: verifiers built once per version.
    Ca {
        /// Verifies a client certificate (certificate required).
        client: Arc<dyn ClientCertVerifier>,
        /// Verifies a server certificate.
        server: Arc<WebPkiServerVerifier>,
    },
}

/// The named secrets of a proxy, and the names its configuration asks for.
#[derive(Default)]
pub struct NamedSecrets {
    current: ArcSwap<BTreeMap<String, Arc<NamedSecret>>>,
    /// Names listeners and clusters referred to (what the proxy subscribes to).
    wanted: Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for NamedSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamedSecrets").field("names", &self.current.load().keys().collect::<Vec<_>>()).finish()
    }
}

impl NamedSecrets {
    /// Records that configuration refers to `name`; true when it is new.
    pub fn want(&self, name: &str) -> bool {
        self.wanted.lock().unwrap_or_else(PoisonError::into_inner).insert(name.to_string())
    }

    /// The names configuration referred to.
    pub fn wanted(&self) -> BTreeSet<String> {
        self.wanted.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The secret `name`, if received.
    pub fn get(&self, name: &str) -> Option<Arc<NamedSecret>> {
        self.current.load().get(name).cloned()
    }

    /// Takes an update: `upserts` replace their names, `removed` go. Returns an error per
    /// secret that cannot be used (the previous version of it is kept).
    pub fn apply(
        &self,
        upserts: &[(String, envoy_types::pb::google::protobuf::Any)],
        removed: &[String],
    ) -> Vec<String> {
        let mut next = (**self.current.load()).clone();
        let mut errors = Vec::new();
        for name in removed {
            next.remove(name);
        }
        for (name, any) in upserts {
            match compile(any) {
                Ok(s) => {
                    next.insert(name.clone(), Arc::new(s));
                }
                Err(e) => errors.push(format!("secret {name:?}: {e}")),
            }
        }
        self.current.store(Arc::new(next));
        errors
    }
}

/// A secret's rustls form.
fn compile(any: &envoy_types::pb::google::protobuf::Any) -> Result<NamedSecret, String> {
    let s: Secret = decode(any)?;
    match s.r#type {
        Some(secret::Type::TlsCertificate(tc)) => {
            let chain = certs(&data(tc.certificate_chain.as_ref(), "certificate_chain")?, "certificate_chain")?;
            let key_pem = data(tc.private_key.as_ref(), "private_key")?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| format!("private_key: not a PEM private key: {e}"))?;
            let ck = CertifiedKey::from_der(chain, key, &provider())
                .map_err(|e| format!("tls_certificate: unusable certificate and key: {e}"))?;
            Ok(NamedSecret::Cert(Arc::new(ck)))
        }
        Some(secret::Type::ValidationContext(v)) => {
            let pem = data(v.trusted_ca.as_ref(), "validation_context.trusted_ca")?;
            let mut roots = RootCertStore::empty();
            for c in certs(&pem, "validation_context.trusted_ca")? {
                roots.add(c).map_err(|e| format!("validation_context.trusted_ca: unusable CA certificate: {e}"))?;
            }
            let roots = Arc::new(roots);
            let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| format!("validation_context: {e}"))?;
            let server = WebPkiServerVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| format!("validation_context: {e}"))?;
            Ok(NamedSecret::Ca { client, server })
        }
        _ => Err("expected a tls_certificate or a validation_context".into()),
    }
}

fn missing(name: &str) -> rustls::Error {
    rustls::Error::General(format!("SDS secret {name:?} has not been received"))
}

/// Server certificates from named secrets: the first whose key can sign with a scheme
/// the client offers (an RSA and an ECDSA credential side by side).
#[derive(Debug)]
pub struct SdsCertResolver {
    /// Secret names, in preference order.
    pub names: Vec<String>,
    /// Where they are.
    pub secrets: Arc<NamedSecrets>,
}

impl ResolvesServerCert for SdsCertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offered = hello.signature_schemes();
        let mut first = None;
        for name in &self.names {
            if let Some(s) = self.secrets.get(name) {
                if let NamedSecret::Cert(ck) = &*s {
                    if ck.key.choose_scheme(offered).is_some() {
                        return Some(ck.clone());
                    }
                    first.get_or_insert_with(|| ck.clone());
                }
            }
        }
        if first.is_none() {
            tracing::warn!(names = ?self.names, "TLS handshake refused: no SDS certificate received yet");
        }
        first
    }
}

/// Verifies clients against the CA of a named secret, and their DNS/URI SANs.
#[derive(Debug)]
pub struct SdsClientCheck {
    /// The CA secret's name.
    pub name: String,
    /// Accepted SANs (any when empty).
    pub sans: Vec<String>,
    /// Whether a client certificate is required.
    pub mandatory: bool,
    /// Where it is.
    pub secrets: Arc<NamedSecrets>,
}

impl ClientCertCheck for SdsClientCheck {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let s = self.secrets.get(&self.name).ok_or_else(|| missing(&self.name))?;
        let NamedSecret::Ca { client, .. } = &*s else {
            return Err(rustls::Error::General(format!("SDS secret {:?} is not a CA", self.name)));
        };
        let ok = client.verify_client_cert(end_entity, intermediates, now)?;
        check_sans(end_entity, &self.sans)?;
        Ok(ok)
    }
}

impl std::fmt::Debug for NamedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NamedSecret::Cert(_) => "Cert",
            NamedSecret::Ca { .. } => "Ca",
        })
    }
}

/// A certificate valid for one of `sans` (DNS names or `spiffe://` URIs); any when empty.
fn check_sans(end_entity: &CertificateDer<'_>, sans: &[String]) -> Result<(), rustls::Error> {
    if sans.is_empty() {
        return Ok(());
    }
    let parsed = ParsedCertificate::try_from(end_entity)?;
    let uris = weft_identity::cert::CertInfo::parse(end_entity).map(|i| i.uris).unwrap_or_default();
    let ok = sans.iter().any(|san| {
        if san.contains("://") {
            uris.iter().any(|u| u == san)
        } else {
            ServerName::try_from(san.as_str()).is_ok_and(|n| verify_server_name(&parsed, &n).is_ok())
        }
    });
    if ok {
        Ok(())
    } else {
        Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
    }
}

/// Verifies a server against the CA of a named secret: valid for one of `sans` when
/// given (whatever the SNI, as Envoy's SAN matchers), else for the server name.
#[derive(Debug)]
pub struct SdsServerCheck {
    /// The CA secret's name.
    pub name: String,
    /// Expected DNS SANs.
    pub sans: Vec<ServerName<'static>>,
    /// Where it is.
    pub secrets: Arc<NamedSecrets>,
}

impl ServerCertCheck for SdsServerCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::client::danger::ServerCertVerifier as _;
        let s = self.secrets.get(&self.name).ok_or_else(|| missing(&self.name))?;
        let NamedSecret::Ca { server, .. } = &*s else {
            return Err(rustls::Error::General(format!("SDS secret {:?} is not a CA", self.name)));
        };
        if self.sans.is_empty() {
            return server.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now);
        }
        let mut last = rustls::Error::General("no subject alt name to verify".into());
        for san in &self.sans {
            match server.verify_server_cert(end_entity, intermediates, san, ocsp_response, now) {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// A client certificate from a named secret.
#[derive(Debug)]
pub struct SdsClientCert {
    /// The secret's name.
    pub name: String,
    /// Where it is.
    pub secrets: Arc<NamedSecrets>,
}

impl ResolvesClientCert for SdsClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        match self.secrets.get(&self.name).as_deref() {
            Some(NamedSecret::Cert(ck)) => Some(ck.clone()),
            _ => {
                tracing::warn!(name = %self.name, "no client certificate: SDS secret not received yet");
                None
            }
        }
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{data_source, DataSource};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        CertificateValidationContext, TlsCertificate,
    };
    use envoy_types::util::pack_any;

    fn inline(s: &str) -> Option<DataSource> {
        Some(DataSource { specifier: Some(data_source::Specifier::InlineString(s.into())), ..Default::default() })
    }

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn named_secrets_are_kept_replaced_removed_and_bad_ones_named() {
        let secrets = NamedSecrets::default();
        let ca = Secret {
            name: "kubernetes://gw-cacert".into(),
            r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
                trusted_ca: inline(&ca_pem()),
                ..Default::default()
            })),
        };
        let bad = Secret {
            name: "kubernetes://gw".into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline("not a certificate"),
                private_key: inline("not a key"),
                ..Default::default()
            })),
        };
        let errors = secrets
            .apply(&[("kubernetes://gw-cacert".into(), pack_any(ca)), ("kubernetes://gw".into(), pack_any(bad))], &[]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("secret \"kubernetes://gw\": certificate_chain"), "{errors:?}");
        assert!(matches!(secrets.get("kubernetes://gw-cacert").as_deref(), Some(NamedSecret::Ca { .. })));
        assert!(secrets.get("kubernetes://gw").is_none());
        assert!(secrets.apply(&[], &["kubernetes://gw-cacert".into()]).is_empty());
        assert!(secrets.get("kubernetes://gw-cacert").is_none());
        assert!(secrets.want("kubernetes://gw") && !secrets.want("kubernetes://gw"));
    }
}
