//! `weft grpc-bootstrap`: the gRPC xDS bootstrap of a proxyless gRPC client and, with
//! `--fetch-certs`, its workload certificate files from the mesh CA.

use std::path::Path;

use anyhow::Context as _;
use weft_identity::service::CertificateClient;
use weft_identity::token::Credential;
use weft_identity::SpiffeId;

/// What `weft grpc-bootstrap` was asked for.
pub struct Args<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
    pub xds: std::net::SocketAddr,
    pub join_token: Option<&'a str>,
    pub cert_dir: Option<&'a Path>,
    pub fetch_certs: bool,
    pub trust_domain: &'a str,
}

/// Prints the bootstrap; with `fetch_certs`, first writes `cert-chain.pem`, `key.pem`
/// (0600) and `root-cert.pem` into the certificate directory: a new key and a
/// certificate for `spiffe://<td>/ns/<ns>/sa/<sa>` signed by the control plane's CA
/// over its certificate service, with the join token as the credential.
pub async fn run(a: &Args<'_>) -> anyhow::Result<()> {
    if a.fetch_certs {
        let dir = a.cert_dir.context("--fetch-certs writes into --cert-dir: give one")?;
        let token = a.join_token.context("--fetch-certs needs --join-token (`weft token create`)")?;
        fetch_certs(a, dir, token).await?;
    }
    let mut metadata = vec![("SERVICE_ACCOUNT", a.service_account)];
    if let Some(t) = a.join_token {
        metadata.push(("WEFT_JOIN_TOKEN", t));
    }
    let b = weft_control::translate::grpcgen::bootstrap(&a.xds.to_string(), a.name, a.namespace, a.cert_dir, &metadata);
    println!("{}", serde_json::to_string_pretty(&b)?);
    Ok(())
}

async fn fetch_certs(a: &Args<'_>, dir: &Path, token: &str) -> anyhow::Result<()> {
    let id = SpiffeId::new(a.trust_domain, a.namespace, a.service_account)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.uri().try_into()?)];
    let csr = params.serialize_request(&key)?.pem()?;
    let mut client = CertificateClient::connect_lazy(&format!("http://{}", a.xds))?;
    let chain = client
        .create_certificate(&Credential::from_bearer(token)?, csr, None)
        .await
        .with_context(|| format!("asking {} for a certificate for {id}", a.xds))?;
    let Some((root, certs)) = chain.split_last().filter(|(_, c)| !c.is_empty()) else {
        anyhow::bail!("the control plane answered a chain without leaf and root");
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write(&dir.join("key.pem"), &key.serialize_pem(), 0o600)?;
    write(&dir.join("cert-chain.pem"), &certs.concat(), 0o644)?;
    write(&dir.join("root-cert.pem"), root, 0o644)?;
    Ok(())
}

/// Writes `text` whole (a temporary file renamed into place, so a file watcher never
/// reads half a file) with `mode`.
fn write(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}
