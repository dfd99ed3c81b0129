//! TLS to etcd (`weft control --store etcds://...`): the members' CA (`--etcd-ca`) and
//! this replica's client certificate (`--etcd-cert`, `--etcd-key`) for members started
//! with `--client-cert-auth` (etcd's "Transport security model": `--trusted-ca-file`,
//! `--cert-file`, `--key-file`). rustls with ring, through tonic, as the rest of weft.
//!
//! When the cluster does not answer over TLS, [`diagnose`] repeats the handshake with one
//! member itself to say precisely why: the member's certificate is not signed by
//! `--etcd-ca` or does not name the address dialled, or the member refused (or asked for)
//! the client certificate.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Files of the TLS connection to etcd.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM CA bundle the members' serving certificates chain to (`--etcd-ca`).
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain (`--etcd-cert`), for `--client-cert-auth` members.
    pub cert: Option<PathBuf>,
    /// PEM private key of the client certificate (`--etcd-key`).
    pub key: Option<PathBuf>,
}

/// The PEM contents of the files, read and checked.
pub(crate) struct TlsMaterial {
    ca: String,
    identity: Option<(String, String)>,
}

/// A file's text, or an error naming the flag.
fn read(flag: &str, path: &PathBuf) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{flag} {}: cannot read: {e}", path.display()))
}

impl EtcdTls {
    /// Reads the files: the CA is required (the members' certificates are checked against
    /// it alone), the certificate and key go together, each must hold PEM of its kind.
    pub(crate) fn load(&self) -> Result<TlsMaterial, String> {
        let Some(ca_path) = &self.ca else {
            return Err("etcds:// needs --etcd-ca: the CA bundle that signed the etcd members' certificates \
                        (their --trusted-ca-file, or the CA of their --cert-file)"
                .to_string());
        };
        let ca = read("--etcd-ca", ca_path)?;
        if certs(&ca).is_empty() {
            return Err(format!("--etcd-ca {}: no PEM certificate in it", ca_path.display()));
        }
        let identity = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                let (cert, key) = (read("--etcd-cert", c)?, read("--etcd-key", k)?);
                if certs(&cert).is_empty() {
                    return Err(format!("--etcd-cert {}: no PEM certificate in it", c.display()));
                }
                if private_key(&key).is_none() {
                    return Err(format!("--etcd-key {}: no PEM private key in it", k.display()));
                }
                Some((cert, key))
            }
            (None, None) => None,
            (Some(_), None) => return Err("--etcd-cert needs --etcd-key (the client certificate's key)".into()),
            (None, Some(_)) => return Err("--etcd-key needs --etcd-cert (the client certificate)".into()),
        };
        Ok(TlsMaterial { ca, identity })
    }
}

impl TlsMaterial {
    /// tonic's TLS settings for the etcd client.
    pub(crate) fn tonic(&self) -> etcd_client::TlsOptions {
        let mut tls = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(&self.ca));
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
        }
        tls
    }
}

/// The certificates of a PEM text.
fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes()).filter_map(Result::ok).collect()
}

/// The first private key of a PEM text.
fn private_key(pem: &str) -> Option<PrivateKeyDer<'static>> {
    use rustls::pki_types::pem::PemObject as _;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).ok()
}

/// Why a TLS connection to `endpoint` (`https://host:port`) fails, in words naming the
/// flag to fix; None when the handshake and the first exchange succeed (the failure is
/// elsewhere) or the member cannot be reached at all.
pub(crate) async fn diagnose(endpoint: &str, files: &EtcdTls, material: &TlsMaterial) -> Option<String> {
    let hostport = endpoint.strip_prefix("https://")?;
    let (host, _) = hostport.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&material.ca) {
        roots.add(c).ok()?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots);
    let mut config = match &material.identity {
        Some((cert, key)) => builder.with_client_auth_cert(certs(cert), private_key(key)?).ok()?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = ServerName::try_from(host.to_string()).ok()?;
    let tcp =
        tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(hostport)).await.ok()?.ok()?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let ca = files.ca.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let mut stream = match tokio::time::timeout(Duration::from_secs(3), connector.connect(name, tcp)).await.ok()? {
        Ok(s) => s,
        Err(e) => return Some(explain(endpoint, &e, &ca, files)),
    };
    // TLS 1.3: the member judges the client certificate after the handshake; its alert
    // comes with the first read. A member that accepted waits for the HTTP/2 preface.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
        Ok(Err(e)) => Some(explain(endpoint, &e, &ca, files)),
        Ok(Ok(0)) if material.identity.is_none() => Some(format!(
            "etcd {endpoint} closed the TLS connection: it probably requires a client certificate \
             (--client-cert-auth): give --etcd-cert and --etcd-key"
        )),
        _ => None,
    }
}

/// Words for a TLS failure with `endpoint`.
fn explain(endpoint: &str, e: &std::io::Error, ca: &str, files: &EtcdTls) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as R};
    let cert = files.cert.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    match e.get_ref().and_then(|i| i.downcast_ref::<R>()) {
        Some(R::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => format!(
            "etcd {endpoint}: the member's certificate is not signed by the CA in --etcd-ca {ca} (give the CA \
             of the members' --cert-file)"
        ),
        Some(R::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. })) => format!(
            "etcd {endpoint}: the member's certificate does not name the address dialled (add it to the \
             certificate's subject alternative names, or dial a name it has)"
        ),
        Some(R::InvalidCertificate(C::Expired | C::ExpiredContext { .. })) => {
            format!("etcd {endpoint}: the member's certificate has expired")
        }
        Some(R::AlertReceived(A::CertificateRequired)) => format!(
            "etcd {endpoint} requires a client certificate (--client-cert-auth): give --etcd-cert and --etcd-key"
        ),
        Some(R::AlertReceived(A::BadCertificate | A::UnknownCA | A::CertificateUnknown)) if !cert.is_empty() => {
            format!(
                "etcd {endpoint} refused the client certificate --etcd-cert {cert}: it is not signed by the \
                 member's --trusted-ca-file"
            )
        }
        Some(R::AlertReceived(A::BadCertificate | A::UnknownCA | A::CertificateUnknown)) => format!(
            "etcd {endpoint} refused the connection without a client certificate: give --etcd-cert and --etcd-key"
        ),
        Some(other) => format!("etcd {endpoint}: TLS failed: {other}"),
        None => format!("etcd {endpoint}: TLS failed: {e}"),
    }
}
