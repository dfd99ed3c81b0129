//! A throwaway certificate authority for TLS tests: a self-signed CA and leaf
//! certificates it signs, as PEM.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SerialNumber};

/// A self-signed CA.
pub struct TestCa {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// A CA whose subject is `common_name` (keep it unlike the leaves' names: OpenSSL takes
    /// a leaf whose issuer equals its subject for self-signed).
    pub fn new(common_name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        let key = KeyPair::generate().expect("CA key");
        TestCa { ca: CertifiedIssuer::self_signed(params, key).expect("self-signed CA") }
    }

    /// The CA certificate, PEM (what clients trust).
    pub fn pem(&self) -> String {
        self.ca.pem()
    }

    /// A leaf for `names` (DNS names or IP addresses; the first is also the subject's
    /// common name) with serial number `serial`: (certificate PEM, key PEM).
    pub fn leaf(&self, names: &[&str], serial: u8) -> (String, String) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("leaf names");
        if let Some(first) = names.first() {
            params.distinguished_name.push(rcgen::DnType::CommonName, *first);
        }
        params.serial_number = Some(SerialNumber::from_slice(&[serial]));
        let cert = params.signed_by(&key, &self.ca).expect("signed leaf");
        (cert.pem(), key.serialize_pem())
    }

    /// Writes `ca.pem`, and `tls.crt` / `tls.key` for `names`, to `dir`.
    pub fn write(&self, dir: &Path, names: &[&str]) {
        let (cert, key) = self.leaf(names, 1);
        std::fs::write(dir.join("ca.pem"), self.pem()).expect("write ca.pem");
        std::fs::write(dir.join("tls.crt"), cert).expect("write tls.crt");
        std::fs::write(dir.join("tls.key"), key).expect("write tls.key");
    }
}
