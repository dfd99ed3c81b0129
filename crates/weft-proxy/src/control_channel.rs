//! How the proxy talks to its control plane once it has a mesh identity
//! ([`weft_xds::XdsTransport`]): to an `https://` xDS address (the control plane's TLS
//! port, 15012) over mTLS with its current certificate (a renewal applies to the next
//! connection), the control plane verified against the current trust bundle as
//! `spiffe://<td>/ns/istio-system/sa/istiod`; to an `http://` address (15010) in
//! plaintext with its bootstrap credential as `authorization: Bearer` metadata, which
//! the control plane binds to the node's namespace and service account.

use std::sync::Arc;

use weft_identity::channel::tls_channel;
use weft_identity::tls::PeerIdentities;
use weft_identity::{CertManager, CredentialSource};
use weft_xds::XdsTransport;

/// The proxy's control channel.
pub enum ControlChannel {
    /// mTLS with the proxy's certificate.
    Tls(Arc<rustls::ClientConfig>),
    /// Plaintext, the bootstrap credential in the metadata of each stream.
    Bearer(CredentialSource),
}

impl ControlChannel {
    /// The channel for `address` with `manager`'s identity and `credential`.
    pub fn new(
        address: &str,
        manager: &Arc<CertManager>,
        credential: CredentialSource,
    ) -> Result<ControlChannel, String> {
        if !address.starts_with("https://") {
            return Ok(ControlChannel::Bearer(credential));
        }
        let td = manager.current().id.trust_domain().to_string();
        let expected = weft_identity::control_plane_id(&td).map_err(|e| e.to_string())?;
        let config = weft_identity::tls::client_config(manager.identity(), PeerIdentities::OneOf(vec![expected]))
            .map_err(|e| e.to_string())?;
        Ok(ControlChannel::Tls(Arc::new(config)))
    }
}

impl XdsTransport for ControlChannel {
    fn connect(
        &self,
        endpoint: tonic::transport::Endpoint,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<tonic::transport::Channel, String>> + Send>> {
        match self {
            ControlChannel::Tls(config) => {
                let config = (**config).clone();
                Box::pin(async move { tls_channel(endpoint, config).await })
            }
            ControlChannel::Bearer(_) => Box::pin(async move { endpoint.connect().await.map_err(|e| e.to_string()) }),
        }
    }

    fn authorization(&self) -> Option<String> {
        match self {
            ControlChannel::Tls(_) => None,
            ControlChannel::Bearer(source) => match source.load() {
                Ok(c) => Some(format!("Bearer {}", c.token())),
                Err(e) => {
                    tracing::warn!(error = %e, "xDS credential unreadable; connecting without it");
                    None
                }
            },
        }
    }
}
