//! `credentialName` as Istio translates it for gateways: TLS contexts whose certificates
//! and CAs are SDS secrets fetched over ADS by name (`kubernetes://<name>`,
//! `kubernetes://<name>-cacert`), served by [`crate::credentials`] to gateways of the
//! Secret's namespace.
//!
//! - Gateway servers (SIMPLE, MUTUAL, OPTIONAL_MUTUAL): `credentialName` (or each of
//!   `credentialNames`) is a `tls_certificate_sds_secret_configs` entry; MUTUAL and
//!   OPTIONAL_MUTUAL verify clients with the `-cacert` secret of the first credential and
//!   the server's `subjectAltNames`. A `credentialName` wins over certificate files.
//! - DestinationRule `tls.credentialName` (SIMPLE, MUTUAL), at gateways only (Istio:
//!   sidecars keep the file paths): the server is verified with the `-cacert` secret and
//!   `subjectAltNames`; MUTUAL presents the credential's certificate.

use envoy_types::pb::envoy::config::core::v3::{transport_socket, TransportSocket};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, UpstreamTlsContext,
};
use envoy_types::pb::google::protobuf::BoolValue;
use envoy_types::util::pack_any;
use weft_api::spec::{ClientTlsMode, ClientTlsSettings, ServerTlsMode, ServerTlsSettings};

use crate::credentials::{sds_ca_name, sds_name};

fn sds(name: String) -> SdsSecretConfig {
    SdsSecretConfig { name, sds_config: Some(weft_xds::build::ads()) }
}

/// The credentials a server names (`credentialName` first, then `credentialNames`).
pub fn server_credentials(tls: &ServerTlsSettings) -> Vec<&str> {
    tls.credential_name.iter().chain(&tls.credential_names).map(String::as_str).filter(|c| !c.is_empty()).collect()
}

fn validation(credential: &str, sans: &[String]) -> ValidationContextType {
    ValidationContextType::CombinedValidationContext(CombinedCertificateValidationContext {
        default_validation_context: Some(CertificateValidationContext {
            match_typed_subject_alt_names: super::clusters::san_matchers(sans),
            ..Default::default()
        }),
        validation_context_sds_secret_config: Some(sds(sds_ca_name(credential))),
        ..Default::default()
    })
}

fn socket(any: envoy_types::pb::google::protobuf::Any) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any)),
    }
}

/// The downstream TLS of a terminating gateway server with `credentialName(s)`; `None`
/// when it names none.
pub fn server_tls(tls: &ServerTlsSettings, alpn: &[&str]) -> Option<TransportSocket> {
    let creds = server_credentials(tls);
    let first = *creds.first()?;
    let mutual = matches!(tls.mode, Some(ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual));
    let ctx = DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: creds.iter().map(|c| sds(sds_name(c))).collect(),
            validation_context_type: mutual.then(|| validation(first, &tls.subject_alt_names)),
            alpn_protocols: alpn.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        }),
        require_client_certificate: Some(BoolValue { value: tls.mode == Some(ServerTlsMode::Mutual) }),
        ..Default::default()
    };
    Some(socket(pack_any(ctx)))
}

/// The upstream TLS of a DestinationRule's `tls` with a `credentialName` (for gateway
/// proxies); `None` without one or in another mode.
pub fn client_tls(tls: &ClientTlsSettings, host: &str) -> Option<TransportSocket> {
    let cred = tls.credential_name.as_deref().filter(|c| !c.is_empty())?;
    if !matches!(tls.mode, ClientTlsMode::Simple | ClientTlsMode::Mutual) {
        return None;
    }
    let certs = if tls.mode == ClientTlsMode::Mutual { vec![sds(sds_name(cred))] } else { Vec::new() };
    let ctx = UpstreamTlsContext {
        sni: tls.sni.clone().unwrap_or_else(|| host.trim_start_matches("*.").to_string()),
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: certs,
            validation_context_type: Some(validation(cred, &tls.subject_alt_names)),
            ..Default::default()
        }),
        ..Default::default()
    };
    Some(socket(pack_any(ctx)))
}
