//! The admission webhook's HTTPS listener. The Kubernetes API server calls webhooks over
//! TLS only, so, as istiod serves its injector on 15017, the control plane serves
//! `POST /inject` (only: the rest of the API stays on the `--api` port) behind rustls,
//! HTTP/1.1 or HTTP/2 by ALPN, with a serving certificate and key read from PEM files —
//! a cert-manager Certificate or a Kubernetes Secret mounted in the pod.
//!
//! The files are re-read every [`WebhookTlsConfig::reload_interval`]: when their bytes
//! change and the new pair is valid, new connections get the new certificate (open ones
//! keep theirs). A pair caught half-rotated (new certificate, old key) or unreadable is
//! reported and the previous certificate stays in force until the next good read.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};
use weft_identity::cert::CertInfo;

use crate::api::Endpoints;

/// Istio's port for the sidecar injection webhook (istiod serves it there).
pub const WEBHOOK_PORT: u16 = 15017;
/// How often the certificate files are checked by default.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of the webhook's TLS listener.
#[derive(Debug, Clone)]
pub struct WebhookTlsConfig {
    /// Address to listen on (port 15017 by Istio's convention).
    pub addr: SocketAddr,
    /// PEM certificate chain: the serving certificate first, then intermediates.
    pub cert: PathBuf,
    /// PEM private key of the serving certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// How often the files are checked for a rotation.
    pub reload_interval: Duration,
}

/// Why the webhook's TLS listener cannot start (or a rotated pair was not taken).
#[derive(Debug, thiserror::Error)]
pub enum WebhookTlsError {
    /// A file cannot be read.
    #[error("{}: cannot read the webhook {what}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// `certificate` or `private key`.
        what: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The certificate file holds no certificate.
    #[error("{}: no PEM CERTIFICATE block: the webhook certificate file must hold the serving certificate, then its intermediates", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A certificate cannot be decoded or used.
    #[error("{}: invalid webhook certificate: {reason}", path.display())]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key file holds no private key.
    #[error("{}: no PEM private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block)", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The private key cannot be decoded or used.
    #[error("{}: invalid webhook private key: {reason}", path.display())]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key is not the certificate's.
    #[error("{}: the private key does not match the certificate in {} (the wrong pair, or a rotation caught half-way)", key.display(), cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The listener cannot be bound.
    #[error("cannot bind the webhook listener on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// rustls refused the configuration.
    #[error("webhook TLS configuration: {0}")]
    Tls(rustls::Error),
}

/// The serving certificate, re-read from its files: rustls asks it for the certificate
/// on every handshake, so a reload applies to the next connection.
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<Loaded>,
}

/// One successfully loaded pair, with the bytes it came from (to notice changes).
struct Loaded {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    certified: Arc<CertifiedKey>,
    serial: String,
}

/// The webhook listener, bound and with its certificate loaded, not yet serving.
pub struct WebhookServer {
    sock: TcpListener,
    certs: Arc<ReloadingCert>,
    config: Arc<ServerConfig>,
    reload_interval: Duration,
}

impl WebhookTlsConfig {
    /// A listener on `addr` with the certificate and key in these files, checked every
    /// [`DEFAULT_RELOAD_INTERVAL`].
    pub fn new(addr: SocketAddr, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        WebhookTlsConfig { addr, cert: cert.into(), key: key.into(), reload_interval: DEFAULT_RELOAD_INTERVAL }
    }
}

impl ReloadingCert {
    /// Reads and checks the pair (an error names the file and what is wrong).
    pub async fn load(cert: &Path, key: &Path) -> Result<ReloadingCert, WebhookTlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (cert_pem, key_pem) = read_pair(cert, key).await?;
        let loaded = parse_pair(cert, &cert_pem, key, &key_pem, &provider)?;
        Ok(ReloadingCert {
            cert_path: cert.to_path_buf(),
            key_path: key.to_path_buf(),
            provider,
            current: ArcSwap::from_pointee(loaded),
        })
    }

    /// Re-reads the files: `Ok(true)` when a new valid pair is now served, `Ok(false)`
    /// when they did not change; on error the previous pair stays in force.
    pub async fn reload(&self) -> Result<bool, WebhookTlsError> {
        let (cert_pem, key_pem) = read_pair(&self.cert_path, &self.key_path).await?;
        let current = self.current.load();
        if current.cert_pem == cert_pem && current.key_pem == key_pem {
            return Ok(false);
        }
        let loaded = parse_pair(&self.cert_path, &cert_pem, &self.key_path, &key_pem, &self.provider)?;
        self.current.store(Arc::new(loaded));
        Ok(true)
    }

    /// Serial number (hex) of the serving certificate in force.
    pub fn serial(&self) -> String {
        self.current.load().serial.clone()
    }

    /// The certificate chain in force (DER, serving certificate first).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.load().certified.cert.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().certified.clone())
    }
}

// Never prints key material.
impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .field("serial", &self.current.load().serial)
            .finish()
    }
}

impl WebhookServer {
    /// Loads the certificate and binds the listener (HTTP/1.1 and HTTP/2 by ALPN).
    pub async fn bind(cfg: &WebhookTlsConfig) -> Result<WebhookServer, WebhookTlsError> {
        let certs = Arc::new(ReloadingCert::load(&cfg.cert, &cfg.key).await?);
        let mut config = ServerConfig::builder_with_provider(certs.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(WebhookTlsError::Tls)?
            .with_no_client_auth()
            .with_cert_resolver(certs.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let sock =
            TcpListener::bind(cfg.addr).await.map_err(|source| WebhookTlsError::Bind { addr: cfg.addr, source })?;
        Ok(WebhookServer { sock, certs, config: Arc::new(config), reload_interval: cfg.reload_interval })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.sock.local_addr().ok()
    }

    /// The serving certificate (to read its serial, or reload it now).
    pub fn certs(&self) -> Arc<ReloadingCert> {
        self.certs.clone()
    }

    /// Starts the file watcher and serves `POST /inject` of `api` until `shutdown`
    /// resolves; returns both tasks.
    pub fn spawn(
        self,
        api: Arc<crate::api::Api>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> [JoinHandle<()>; 2] {
        let watcher = tokio::spawn(watch_files(self.certs.clone(), self.reload_interval));
        let acceptor = TlsAcceptor::from(self.config);
        let server = tokio::spawn(serve(api, self.sock, acceptor, shutdown));
        [watcher, server]
    }
}

async fn serve(
    api: Arc<crate::api::Api>,
    sock: TcpListener,
    acceptor: TlsAcceptor,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            r = sock.accept() => {
                let Ok((stream, peer)) = r else { continue };
                let (api, acceptor) = (api.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => crate::api::serve_connection(api, tls, Endpoints::Webhook).await,
                        Ok(Err(e)) => debug!(%peer, error = %e, "webhook TLS handshake failed"),
                        Err(_) => debug!(%peer, "webhook TLS handshake timed out"),
                    }
                });
            }
        }
    }
}

/// Checks the files every `every`; a failed read is logged once per distinct error.
async fn watch_files(certs: Arc<ReloadingCert>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last_error = String::new();
    loop {
        tick.tick().await;
        match certs.reload().await {
            Ok(true) => {
                last_error.clear();
                info!(cert = %certs.cert_path.display(), serial = %certs.serial(), "webhook certificate reloaded");
            }
            Ok(false) => last_error.clear(),
            Err(e) => {
                let text = e.to_string();
                if text != last_error {
                    warn!(error = %text, serial = %certs.serial(), "webhook certificate not reloaded; the previous one stays in force");
                    last_error = text;
                }
            }
        }
    }
}

async fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), WebhookTlsError> {
    let read = |path: &Path, what: &'static str| {
        let path = path.to_path_buf();
        async move { tokio::fs::read(&path).await.map_err(|source| WebhookTlsError::Read { path, what, source }) }
    };
    Ok((read(cert, "certificate").await?, read(key, "private key").await?))
}

fn parse_pair(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<Loaded, WebhookTlsError> {
    let bad_cert = |reason: String| WebhookTlsError::BadCertificate { path: cert_path.to_path_buf(), reason };
    let bad_key = |reason: String| WebhookTlsError::BadKey { path: key_path.to_path_buf(), reason };
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_cert(format!("cannot decode PEM: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(WebhookTlsError::NoCertificate { path: cert_path.to_path_buf() });
    };
    let info = CertInfo::parse(leaf).map_err(|e| bad_cert(e.to_string()))?;
    if info.is_ca {
        return Err(bad_cert(
            "the first certificate is a CA (basicConstraints CA:TRUE): put the serving certificate first".into(),
        ));
    }
    let now = SystemTime::now();
    if info.not_after < now {
        warn!(cert = %cert_path.display(), serial = %info.serial, "the webhook certificate has expired: the API server will refuse it");
    } else if info.not_before > now {
        warn!(cert = %cert_path.display(), serial = %info.serial, "the webhook certificate is not valid yet");
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => WebhookTlsError::NoKey { path: key_path.to_path_buf() },
        e => bad_key(format!("cannot decode PEM: {e}")),
    })?;
    let signing = provider.key_provider.load_private_key(key).map_err(|e| bad_key(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(WebhookTlsError::Mismatch { cert: cert_path.to_path_buf(), key: key_path.to_path_buf() })
        }
        Err(e) => return Err(bad_cert(e.to_string())),
    }
    Ok(Loaded {
        cert_pem: cert_pem.to_vec(),
        key_pem: key_pem.to_vec(),
        certified: Arc::new(certified),
        serial: info.serial,
    })
}

#[cfg(test)]
mod tests;
