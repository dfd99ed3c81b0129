//! Certificate plumbing shared by the CA, the certificate manager and the verifiers:
//! PEM in and out, and the few fields weft reads from a certificate.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

use crate::{IdentityError, SpiffeId};

/// What weft reads from a certificate.
#[derive(Clone, Debug)]
pub struct CertInfo {
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// URI subject alternative names.
    pub uris: Vec<String>,
    /// Whether basicConstraints says CA.
    pub is_ca: bool,
    /// The subject public key bits (for matching a key pair).
    pub public_key: Vec<u8>,
    /// Serial number, hex.
    pub serial: String,
}

impl CertInfo {
    /// Parses a DER certificate.
    pub fn parse(der: &[u8]) -> Result<CertInfo, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::Certificate(format!("cannot parse certificate: {e}")))?;
        let uris = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_string()),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(IdentityError::Certificate(format!("unreadable subjectAltName: {e}"))),
        };
        Ok(CertInfo {
            not_before: unix(cert.validity().not_before.timestamp()),
            not_after: unix(cert.validity().not_after.timestamp()),
            uris,
            is_ca: cert.is_ca(),
            public_key: cert.public_key().subject_public_key.data.to_vec(),
            serial: cert.raw_serial_as_string().replace(':', ""),
        })
    }

    /// The one SPIFFE id a workload certificate carries (SPIFFE: exactly one URI SAN).
    pub fn spiffe_id(&self) -> Result<SpiffeId, IdentityError> {
        match self.uris.as_slice() {
            [one] => SpiffeId::parse(one),
            [] => Err(IdentityError::Certificate("no URI subjectAltName (not a SPIFFE certificate)".into())),
            many => Err(IdentityError::Certificate(format!(
                "{} URI subjectAltNames ({}); a SPIFFE certificate has exactly one",
                many.len(),
                many.join(", ")
            ))),
        }
    }
}

/// The SPIFFE id of a DER certificate (a peer's leaf).
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, IdentityError> {
    CertInfo::parse(der)?.spiffe_id()
}

/// Certificates in a PEM text, in order; an error names `what` when there is none.
pub fn certs_from_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| IdentityError::Certificate(format!("{what}: not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(IdentityError::Certificate(format!("{what}: no certificate in the PEM data")));
    }
    Ok(certs)
}

/// PEM text of one DER certificate.
pub fn cert_pem(der: &[u8]) -> String {
    pem_block("CERTIFICATE", der)
}

/// A PEM block with 64-character lines.
pub(crate) fn pem_block(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Short SHA-256 fingerprint (hex, 16 characters) for logs.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn unix(secs: i64) -> SystemTime {
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}
