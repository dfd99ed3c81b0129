//! TLS from Envoy's transport sockets: `DownstreamTlsContext` on filter chains (terminate)
//! and `UpstreamTlsContext` on clusters (originate), with certificates and CAs inline or
//! from files, ALPN, client-certificate requirement and CA verification; and the mesh's
//! own SDS secrets — `default` (this proxy's certificate, whose key never leaves the
//! process) and `ROOTCA` (the trust bundle) — resolved through [`Secrets`] to the
//! certificate manager, with SPIFFE identity checks of the peer
//! (`match_typed_subject_alt_names` URI SANs); and other SDS secrets by name (a
//! gateway's `credentialName`: `kubernetes://...`), looked up per handshake in
//! [`credentials::NamedSecrets`].

pub mod credentials;

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{data_source, transport_socket, DataSource, TransportSocket};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::ValidationContextType, CommonTlsContext, DownstreamTlsContext, UpstreamTlsContext,
};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use weft_identity::tls::{ServerCertCheck, Verifier};

use crate::proto::decode;

/// The provider every config uses (ring: no C toolchain needed beyond `cc`).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What SDS secret names resolve to in this proxy: `default` is its mesh certificate and
/// `ROOTCA` its trust bundle, both kept current by the certificate manager (rotation
/// needs no config change: the rustls configs read the manager's watch per handshake).
/// Without a manager (no `identity` in the bootstrap), SDS references are errors.
#[derive(Clone, Default)]
pub struct Secrets {
    manager: Option<Arc<weft_identity::CertManager>>,
    /// SDS secrets by name other than the mesh's (`kubernetes://...`).
    named: Arc<credentials::NamedSecrets>,
}

/// Istio's name of the workload certificate secret.
pub const DEFAULT_SECRET: &str = "default";
/// Istio's name of the trust bundle secret.
pub const ROOT_SECRET: &str = "ROOTCA";

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets").field("identity", &self.manager.as_ref().map(|m| m.current().id.to_string())).finish()
    }
}

impl Secrets {
    /// Secrets backed by a certificate manager.
    pub fn new(manager: Arc<weft_identity::CertManager>) -> Secrets {
        Secrets { manager: Some(manager), named: Arc::default() }
    }

    /// The named SDS secrets (`kubernetes://...`) this proxy holds and wants.
    pub fn named(&self) -> &Arc<credentials::NamedSecrets> {
        &self.named
    }

    /// The certificate manager, if this proxy has a mesh identity.
    pub fn manager(&self) -> Option<&Arc<weft_identity::CertManager>> {
        self.manager.as_ref()
    }

    fn identity(
        &self,
        field: &str,
        name: &str,
    ) -> Result<tokio::sync::watch::Receiver<Arc<weft_identity::Identity>>, String> {
        match &self.manager {
            Some(m) => Ok(m.identity()),
            None => Err(format!(
                "{field}: SDS secret {name:?} needs this proxy's mesh identity; add an `identity` section (join token) to the bootstrap"
            )),
        }
    }
}

/// The trust bundle of a `ROOTCA` Secret (a validation context with `trusted_ca`).
pub fn trust_bundle(any: &envoy_types::pb::google::protobuf::Any) -> Result<Vec<CertificateDer<'static>>, String> {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
    let s: Secret = decode(any)?;
    match s.r#type {
        Some(secret::Type::ValidationContext(v)) => certs(&data(v.trusted_ca.as_ref(), "trusted_ca")?, "trusted_ca"),
        _ => Err("expected a validation_context with trusted_ca".into()),
    }
}

/// Whether a context uses SDS secrets (then only the mesh's are understood).
fn uses_sds(common: &CommonTlsContext) -> bool {
    !common.tls_certificate_sds_secret_configs.is_empty()
        || matches!(
            common.validation_context_type,
            Some(ValidationContextType::ValidationContextSdsSecretConfig(_))
                | Some(ValidationContextType::CombinedValidationContext(_))
        )
}

/// Whether a context's SDS names are the mesh's own (`default`, `ROOTCA`) only.
fn mesh_names_only(common: &CommonTlsContext) -> bool {
    let validation = match &common.validation_context_type {
        Some(ValidationContextType::ValidationContextSdsSecretConfig(s)) => Some(s.name.as_str()),
        Some(ValidationContextType::CombinedValidationContext(c)) => {
            c.validation_context_sds_secret_config.as_ref().map(|s| s.name.as_str())
        }
        _ => None,
    };
    common.tls_certificate_sds_secret_configs.iter().all(|s| s.name == DEFAULT_SECRET)
        && validation.is_none_or(|n| n == ROOT_SECRET)
}

/// A context naming other SDS secrets: the certificate names, and the CA secret's name
/// with the SANs it checks (exact DNS names or URIs).
struct NamedContext {
    certs: Vec<String>,
    ca: Option<(String, Vec<String>)>,
}

fn named_context(common: &CommonTlsContext, secrets: &Secrets) -> Result<NamedContext, String> {
    use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
    let mut certs = Vec::new();
    for (i, s) in common.tls_certificate_sds_secret_configs.iter().enumerate() {
        if s.name == DEFAULT_SECRET || s.name == ROOT_SECRET {
            return Err(format!(
                "common_tls_context.tls_certificate_sds_secret_configs[{i}].name: the mesh's {:?} cannot be mixed with other SDS secrets",
                s.name
            ));
        }
        certs.push(s.name.clone());
    }
    let (name, matchers) = match &common.validation_context_type {
        Some(ValidationContextType::ValidationContextSdsSecretConfig(s)) => (Some(s.name.clone()), Vec::new()),
        Some(ValidationContextType::CombinedValidationContext(c)) => (
            c.validation_context_sds_secret_config.as_ref().map(|s| s.name.clone()),
            c.default_validation_context.as_ref().map(|v| v.match_typed_subject_alt_names.clone()).unwrap_or_default(),
        ),
        Some(ValidationContextType::ValidationContext(_)) => {
            return Err("common_tls_context.validation_context: inline CAs cannot be mixed with SDS certificates; name the CA's SDS secret".into())
        }
        _ => (None, Vec::new()),
    };
    let mut sans = Vec::new();
    for (i, m) in matchers.iter().enumerate() {
        match m.matcher.as_ref().and_then(|m| m.match_pattern.as_ref()) {
            Some(MatchPattern::Exact(v)) => sans.push(v.clone()),
            _ => {
                return Err(format!(
                    "combined_validation_context.default_validation_context.match_typed_subject_alt_names[{i}].matcher: only exact names are supported"
                ))
            }
        }
    }
    if name.as_deref() == Some(ROOT_SECRET) {
        return Err("common_tls_context: the mesh's ROOTCA cannot verify peers of a credential's certificate; name the credential's CA secret".into());
    }
    let ca = match name {
        Some(n) => Some((n, sans)),
        None if sans.is_empty() => None,
        None => {
            return Err("combined_validation_context: subject alt names need a CA secret to verify the chain".into())
        }
    };
    for n in certs.iter().chain(ca.iter().map(|(n, _)| n)) {
        secrets.named.want(n);
    }
    Ok(NamedContext { certs, ca })
}

/// Checks the SDS names of a mesh context and returns the expected peer identities
/// (URI SAN matchers of the validation context; any identity the bundle vouches for when
/// there are none).
fn mesh_context(common: &CommonTlsContext) -> Result<weft_identity::tls::PeerIdentities, String> {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::subject_alt_name_matcher::SanType;
    use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
    for (i, s) in common.tls_certificate_sds_secret_configs.iter().enumerate() {
        if s.name != DEFAULT_SECRET {
            return Err(format!(
                "common_tls_context.tls_certificate_sds_secret_configs[{i}].name: {:?} is not served to weft proxies; use {DEFAULT_SECRET:?}",
                s.name
            ));
        }
    }
    let (sds, sans) = match &common.validation_context_type {
        Some(ValidationContextType::ValidationContextSdsSecretConfig(s)) => (Some(s.name.clone()), Vec::new()),
        Some(ValidationContextType::CombinedValidationContext(c)) => (
            c.validation_context_sds_secret_config.as_ref().map(|s| s.name.clone()),
            c.default_validation_context.as_ref().map(|v| v.match_typed_subject_alt_names.clone()).unwrap_or_default(),
        ),
        Some(ValidationContextType::ValidationContext(_)) => {
            return Err("common_tls_context.validation_context: inline CAs cannot be mixed with the mesh's SDS certificate; validate with the ROOTCA secret".into())
        }
        _ => (None, Vec::new()),
    };
    match sds.as_deref() {
        None | Some(ROOT_SECRET) => {}
        Some(other) => {
            return Err(format!(
                "common_tls_context: validation secret {other:?} is not served to weft proxies; use {ROOT_SECRET:?}"
            ))
        }
    }
    if sans.is_empty() {
        return Ok(weft_identity::tls::PeerIdentities::Any);
    }
    let mut ids = Vec::new();
    for (i, m) in sans.iter().enumerate() {
        let field =
            format!("combined_validation_context.default_validation_context.match_typed_subject_alt_names[{i}]");
        if m.san_type != SanType::Uri as i32 {
            return Err(format!("{field}: only URI (SPIFFE) SANs can be checked against the mesh identity"));
        }
        let Some(MatchPattern::Exact(uri)) = m.matcher.as_ref().and_then(|m| m.match_pattern.as_ref()) else {
            return Err(format!("{field}.matcher: only exact SPIFFE ids are supported"));
        };
        ids.push(uri.parse::<weft_identity::SpiffeId>().map_err(|e| format!("{field}: {e}"))?);
    }
    Ok(weft_identity::tls::PeerIdentities::OneOf(ids))
}

/// TLS a cluster originates.
#[derive(Debug)]
pub struct UpstreamTls {
    /// Client configuration.
    pub config: Arc<ClientConfig>,
    /// Server name sent (SNI) and verified; the endpoint IP when `sni` is empty.
    pub sni: Option<ServerName<'static>>,
    /// Identifies this TLS setup in connection-pool keys.
    pub key: u64,
}

/// Bytes of a `DataSource` (inline bytes or string, or a file).
fn data(ds: Option<&DataSource>, field: &str) -> Result<Vec<u8>, String> {
    match ds.and_then(|d| d.specifier.as_ref()) {
        Some(data_source::Specifier::InlineBytes(b)) => Ok(b.clone()),
        Some(data_source::Specifier::InlineString(s)) => Ok(s.clone().into_bytes()),
        Some(data_source::Specifier::Filename(f)) => {
            std::fs::read(f).map_err(|e| format!("{field}: cannot read {f}: {e}"))
        }
        Some(_) => Err(format!("{field}: environment-variable data sources are not supported")),
        None => Err(format!("{field}: is required")),
    }
}

fn certs(pem: &[u8], field: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{field}: not a PEM certificate chain: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{field}: no certificate in PEM data"));
    }
    Ok(certs)
}

fn roots(pem: &[u8], field: &str) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for c in certs(pem, field)? {
        store.add(c).map_err(|e| format!("{field}: unusable CA certificate: {e}"))?;
    }
    Ok(store)
}

/// The certificate and key of a context (the first `tls_certificates` entry).
fn identity(
    common: &CommonTlsContext,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, String> {
    if !common.tls_certificate_sds_secret_configs.is_empty() {
        return Err("common_tls_context.tls_certificate_sds_secret_configs: SDS secrets are not supported yet; \
                    give tls_certificates inline or as files"
            .into());
    }
    let Some(tc) = common.tls_certificates.first() else { return Ok(None) };
    let chain =
        certs(&data(tc.certificate_chain.as_ref(), "certificate_chain")?, "tls_certificates[0].certificate_chain")?;
    let key_pem = data(tc.private_key.as_ref(), "private_key")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("tls_certificates[0].private_key: not a PEM private key: {e}"))?;
    Ok(Some((chain, key)))
}

fn trusted_ca(common: &CommonTlsContext) -> Result<Option<RootCertStore>, String> {
    match &common.validation_context_type {
        None => Ok(None),
        Some(ValidationContextType::ValidationContext(v)) => match &v.trusted_ca {
            Some(ca) => Ok(Some(roots(&data(Some(ca), "trusted_ca")?, "validation_context.trusted_ca")?)),
            None => Ok(None),
        },
        Some(_) => {
            Err("common_tls_context.validation_context_type: only an inline validation_context is supported yet".into())
        }
    }
}

fn alpn(common: &CommonTlsContext) -> Vec<Vec<u8>> {
    common.alpn_protocols.iter().map(|p| p.as_bytes().to_vec()).collect()
}

/// A listener-side TLS config from a filter chain's transport socket.
pub fn server_config(ts: &TransportSocket, secrets: &Secrets) -> Result<Arc<ServerConfig>, String> {
    let any = match &ts.config_type {
        Some(transport_socket::ConfigType::TypedConfig(a)) => a,
        None => return Err("typed_config is required".into()),
    };
    let ctx: DownstreamTlsContext = decode(any)?;
    let common = ctx.common_tls_context.unwrap_or_default();
    if uses_sds(&common) && !mesh_names_only(&common) {
        let named = named_context(&common, secrets)?;
        if named.certs.is_empty() {
            return Err(
                "common_tls_context.tls_certificate_sds_secret_configs: a server certificate is required".into()
            );
        }
        let mandatory = ctx.require_client_certificate.map(|b| b.value).unwrap_or(false);
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match named.ca {
            Some((name, sans)) => {
                let check = credentials::SdsClientCheck { name, sans, mandatory, secrets: secrets.named.clone() };
                builder.with_client_cert_verifier(Arc::new(Verifier::checking(check, &provider())))
            }
            None if mandatory => {
                return Err("require_client_certificate needs a validation context (the credential's CA secret)".into())
            }
            None => builder.with_no_client_auth(),
        };
        let resolver = credentials::SdsCertResolver { names: named.certs, secrets: secrets.named.clone() };
        let mut cfg = builder.with_cert_resolver(Arc::new(resolver));
        cfg.alpn_protocols = alpn(&common);
        return Ok(Arc::new(cfg));
    }
    if uses_sds(&common) {
        let allowed = mesh_context(&common)?;
        let identity = secrets.identity("common_tls_context", DEFAULT_SECRET)?;
        let mandatory = ctx.require_client_certificate.map(|b| b.value).unwrap_or(false);
        let mut cfg = weft_identity::tls::server_config(identity, allowed, mandatory).map_err(|e| e.to_string())?;
        cfg.alpn_protocols = alpn(&common);
        return Ok(Arc::new(cfg));
    }
    let (chain, key) =
        identity(&common)?.ok_or("common_tls_context.tls_certificates: a server certificate is required")?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let require_client = ctx.require_client_certificate.map(|b| b.value).unwrap_or(false);
    let builder = match trusted_ca(&common)? {
        Some(roots) => {
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let v = if require_client { v } else { v.allow_unauthenticated() };
            builder.with_client_cert_verifier(v.build().map_err(|e| format!("validation_context: {e}"))?)
        }
        None if require_client => {
            return Err("require_client_certificate needs validation_context.trusted_ca".into());
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(chain, key).map_err(|e| format!("tls_certificates[0]: {e}"))?;
    cfg.alpn_protocols = alpn(&common);
    Ok(Arc::new(cfg))
}

/// A cluster-side TLS config from its transport socket. `default_alpn` is used when the
/// context names none (`h2` for HTTP/2 clusters).
pub fn client_config(ts: &TransportSocket, default_alpn: &[&str], secrets: &Secrets) -> Result<UpstreamTls, String> {
    let any = match &ts.config_type {
        Some(transport_socket::ConfigType::TypedConfig(a)) => a,
        None => return Err("typed_config is required".into()),
    };
    let ctx: UpstreamTlsContext = decode(any)?;
    let common = ctx.common_tls_context.clone().unwrap_or_default();
    if uses_sds(&common) && !mesh_names_only(&common) {
        let named = named_context(&common, secrets)?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous();
        let builder = match named.ca {
            Some((name, sans)) => {
                let sans = sans
                    .into_iter()
                    .map(|n| {
                        ServerName::try_from(n.clone()).map_err(|_| format!("subject alt name {n:?} is not a DNS name"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let check = credentials::SdsServerCheck { name, sans, secrets: secrets.named.clone() };
                builder.with_custom_certificate_verifier(Arc::new(Verifier::checking(check, &provider())))
            }
            None => builder.with_custom_certificate_verifier(Arc::new(Verifier::checking(AcceptAnyCert, &provider()))),
        };
        let mut cfg = match named.certs.first() {
            Some(name) => builder.with_client_cert_resolver(Arc::new(credentials::SdsClientCert {
                name: name.clone(),
                secrets: secrets.named.clone(),
            })),
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = alpn(&common);
        if cfg.alpn_protocols.is_empty() {
            cfg.alpn_protocols = default_alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        }
        let key = crate::hash::stable_hash(&prost::Message::encode_to_vec(&ctx));
        return Ok(UpstreamTls { config: Arc::new(cfg), sni: sni_of(&ctx)?, key });
    }
    if uses_sds(&common) {
        let expected = mesh_context(&common)?;
        let identity = secrets.identity("common_tls_context", DEFAULT_SECRET)?;
        let mut cfg = weft_identity::tls::client_config(identity, expected).map_err(|e| e.to_string())?;
        cfg.alpn_protocols = alpn(&common);
        if cfg.alpn_protocols.is_empty() {
            cfg.alpn_protocols = default_alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        }
        return Ok(UpstreamTls {
            config: Arc::new(cfg),
            sni: sni_of(&ctx)?,
            key: crate::hash::stable_hash(&prost::Message::encode_to_vec(&ctx)),
        });
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let sans = dns_sans(&common)?;
    let builder = match (trusted_ca(&common)?, sans.is_empty()) {
        (Some(roots), true) => builder.with_root_certificates(roots),
        (Some(roots), false) => {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("validation_context: {e}"))?;
            let verifier = Verifier::checking(SanCheck { inner, sans }, &provider());
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier))
        }
        (None, false) => {
            return Err("validation_context.match_typed_subject_alt_names: needs trusted_ca to verify the chain".into())
        }
        // Envoy without a validation context does not verify the server certificate.
        (None, true) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier::checking(AcceptAnyCert, &provider()))),
    };
    let mut cfg = match identity(&common)? {
        Some((chain, key)) => {
            builder.with_client_auth_cert(chain, key).map_err(|e| format!("tls_certificates[0]: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn(&common);
    if cfg.alpn_protocols.is_empty() {
        cfg.alpn_protocols = default_alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    }
    let key = crate::hash::stable_hash(&prost::Message::encode_to_vec(&ctx));
    Ok(UpstreamTls { config: Arc::new(cfg), sni: sni_of(&ctx)?, key })
}

fn sni_of(ctx: &UpstreamTlsContext) -> Result<Option<ServerName<'static>>, String> {
    if ctx.sni.is_empty() {
        return Ok(None);
    }
    ServerName::try_from(ctx.sni.clone())
        .map(Some)
        .map_err(|_| format!("sni: {:?} is not a valid server name", ctx.sni))
}

/// The principal of a peer certificate chain (rustls only exposes chains it verified).
pub fn peer_principal(chain: Option<&[CertificateDer<'_>]>) -> Option<Arc<str>> {
    if let Some(id) = weft_identity::tls::peer_identity(chain) {
        return Some(Arc::from(id.uri()));
    }
    let leaf = chain?.first()?;
    weft_identity::cert::CertInfo::parse(leaf).ok()?.uris.into_iter().next().map(Arc::from)
}

/// The DNS SAN matchers of an inline validation context (exact names; URI SANs are the
/// mesh's and need the SDS `ROOTCA` context).
fn dns_sans(common: &CommonTlsContext) -> Result<Vec<ServerName<'static>>, String> {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::subject_alt_name_matcher::SanType;
    use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
    let Some(ValidationContextType::ValidationContext(v)) = &common.validation_context_type else {
        return Ok(Vec::new());
    };
    v.match_typed_subject_alt_names
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let field = format!("validation_context.match_typed_subject_alt_names[{i}]");
            if m.san_type != SanType::Dns as i32 {
                return Err(format!("{field}: only DNS SANs are checked here (SPIFFE ids need the mesh's ROOTCA)"));
            }
            match m.matcher.as_ref().and_then(|m| m.match_pattern.as_ref()) {
                Some(MatchPattern::Exact(name)) => {
                    ServerName::try_from(name.clone()).map_err(|_| format!("{field}: {name:?} is not a DNS name"))
                }
                _ => Err(format!("{field}.matcher: only exact names are supported")),
            }
        })
        .collect()
}

/// Envoy's SAN matching for upstream TLS: the chain must verify against the CA and the
/// certificate must be valid for one of the expected DNS names (whatever the SNI).
#[derive(Debug)]
struct SanCheck {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    sans: Vec<ServerName<'static>>,
}

impl ServerCertCheck for SanCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut last = rustls::Error::General("no subject alt name to verify".into());
        for san in &self.sans {
            match self.inner.verify_server_cert(end_entity, intermediates, san, ocsp_response, now) {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// Envoy's behaviour without a validation context: encrypt, but trust any certificate.
#[derive(Debug)]
struct AcceptAnyCert;

impl ServerCertCheck for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
}
