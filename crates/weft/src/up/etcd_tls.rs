//! `weft up --replicas`: the local etcd cluster runs as etcd's transport security guide
//! has it (clients and peers over TLS, `--client-cert-auth`), with certificates made
//! here at every start: a throwaway CA, one serving certificate for 127.0.0.1 (members
//! and peers) and one client certificate for the control-plane replicas, PEM files
//! (keys 0600) in `<state>/etcd-tls`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use weft_control::etcd::tls::EtcdTls;

/// The files of the local cluster's TLS.
pub struct LocalEtcdTls {
    /// The CA (members' `--trusted-ca-file`, replicas' `--etcd-ca`).
    pub ca: PathBuf,
    /// Members' serving (and peer) certificate and key.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// The replicas' client certificate and key.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

impl LocalEtcdTls {
    /// The CA and both certificates, written to `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<LocalEtcdTls> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "weft up etcd CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let leaf = |names: &[&str], cn: &str| -> anyhow::Result<(String, String)> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
            params.distinguished_name.push(DnType::CommonName, cn);
            Ok((params.signed_by(&key, &ca)?.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf(&["127.0.0.1", "localhost"], "etcd")?;
        let (client_cert, client_key) = leaf(&[], "weft-control")?;
        let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let path = dir.join(name);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("writing {}", path.display()))?;
            f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        Ok(LocalEtcdTls {
            ca: write("ca.pem", &ca.pem())?,
            server_cert: write("server.crt", &server_cert)?,
            server_key: write("server.key", &server_key)?,
            client_cert: write("client.crt", &client_cert)?,
            client_key: write("client.key", &client_key)?,
        })
    }

    /// What the replicas connect with.
    pub fn client(&self) -> EtcdTls {
        EtcdTls { ca: Some(self.ca.clone()), cert: Some(self.client_cert.clone()), key: Some(self.client_key.clone()) }
    }

    /// The member flags: TLS and client certificates for clients and peers.
    pub fn member_args(&self) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec!["--client-cert-auth".into(), "--peer-client-cert-auth".into()];
        for (flag, path) in [
            ("--trusted-ca-file", &self.ca),
            ("--cert-file", &self.server_cert),
            ("--key-file", &self.server_key),
            ("--peer-trusted-ca-file", &self.ca),
            ("--peer-cert-file", &self.server_cert),
            ("--peer-key-file", &self.server_key),
        ] {
            args.push(flag.into());
            args.push(path.into());
        }
        args
    }
}
