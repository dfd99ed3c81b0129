//! TLS from Envoy's transport sockets: `DownstreamTlsContext` on filter chains (terminate)
//! and `UpstreamTlsContext` on clusters (originate), with certificates and CAs inline or
//! from files, ALPN, client-certificate requirement and CA verification. SDS-delivered
//! secrets and SPIFFE identity checks come with the identity issue.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{data_source, transport_socket, DataSource, TransportSocket};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::ValidationContextType, CommonTlsContext, DownstreamTlsContext, UpstreamTlsContext,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::config::listener::decode;

/// The provider every config uses (ring: no C toolchain needed beyond `cc`).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
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
pub fn server_config(ts: &TransportSocket) -> Result<Arc<ServerConfig>, String> {
    let any = match &ts.config_type {
        Some(transport_socket::ConfigType::TypedConfig(a)) => a,
        None => return Err("typed_config is required".into()),
    };
    let ctx: DownstreamTlsContext = decode(any)?;
    let common = ctx.common_tls_context.unwrap_or_default();
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
pub fn client_config(ts: &TransportSocket, default_alpn: &[&str]) -> Result<UpstreamTls, String> {
    let any = match &ts.config_type {
        Some(transport_socket::ConfigType::TypedConfig(a)) => a,
        None => return Err("typed_config is required".into()),
    };
    let ctx: UpstreamTlsContext = decode(any)?;
    let common = ctx.common_tls_context.clone().unwrap_or_default();
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match trusted_ca(&common)? {
        Some(roots) => builder.with_root_certificates(roots),
        // Envoy without a validation context does not verify the server certificate.
        None => builder.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(provider()))),
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
    let sni = if ctx.sni.is_empty() {
        None
    } else {
        Some(
            ServerName::try_from(ctx.sni.clone())
                .map_err(|_| format!("sni: {:?} is not a valid server name", ctx.sni))?,
        )
    };
    let key = crate::cluster::stable_hash(&prost::Message::encode_to_vec(&ctx));
    Ok(UpstreamTls { config: Arc::new(cfg), sni, key })
}

/// Fills what a finished server-side handshake says about the peer: its principal (the
/// SPIFFE id of a verified client certificate, else the certificate's first URI SAN) and
/// the SNI it asked for.
pub fn learn_peer(conn: &mut crate::listener::ConnInfo, tls: &rustls::ServerConnection) {
    conn.peer_principal = peer_principal(tls.peer_certificates());
    if conn.server_name.is_none() {
        conn.server_name = tls.server_name().map(Arc::from);
    }
}

/// The principal of a peer certificate chain (rustls only exposes chains it verified).
pub fn peer_principal(chain: Option<&[CertificateDer<'_>]>) -> Option<Arc<str>> {
    if let Some(id) = weft_identity::tls::peer_identity(chain) {
        return Some(Arc::from(id.uri()));
    }
    let leaf = chain?.first()?;
    weft_identity::cert::CertInfo::parse(leaf).ok()?.uris.into_iter().next().map(Arc::from)
}

/// Envoy's behaviour without a validation context: encrypt, but trust any certificate.
#[derive(Debug)]
struct AcceptAnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServerCert {
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
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
