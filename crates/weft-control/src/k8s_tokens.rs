//! Kubernetes service-account tokens as credentials, verified the way istiod can
//! without calling the API server's TokenReview: the JWT's signature against the
//! cluster issuer's published keys (a JWKS file, a JWKS URL, or the issuer's OIDC
//! discovery document and its `jwks_uri`), its issuer (`iss`), audience (`istio-ca`
//! by default, what Istio's injected pods request), and expiry (`exp`, `nbf`). The
//! identity is the subject `system:serviceaccount:<ns>:<sa>`, granting
//! `spiffe://<td>/ns/<ns>/sa/<sa>`; the certificate service then refuses a CSR asking
//! for anything else.
//!
//! Keys are loaded at start (files synchronously) and refreshed every
//! [`REFRESH`] and whenever a token names a key id not in the set (at most once per
//! [`MIN_REFETCH`]); a failed fetch keeps the last good keys. URLs are `http://` (for
//! example through `kubectl proxy`); for an `https://` issuer, save the keys to a file
//! (`kubectl get --raw /openid/v1/jwks`), see docs/kubernetes.md.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::Notify;
use weft_identity::service::{CredentialVerifier, VerifyFuture};
use weft_identity::{Credential, Grant, IdentityError};

/// The audience Istio's injected pods ask their projected token for.
pub const DEFAULT_AUDIENCE: &str = "istio-ca";
/// How often the keys are re-read.
pub const REFRESH: Duration = Duration::from_secs(5 * 60);
/// Shortest time between two fetches triggered by unknown key ids.
pub const MIN_REFETCH: Duration = Duration::from_secs(5);
/// Largest document accepted.
const MAX_BYTES: usize = 1 << 20;

/// Where the cluster's keys come from and what a token must say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesTokenConfig {
    /// The issuer tokens must carry in `iss` (`kubectl get --raw
    /// /.well-known/openid-configuration` shows it; the API server's
    /// `--service-account-issuer`).
    pub issuer: String,
    /// Where the keys are.
    pub keys: KeySource,
    /// Accepted audiences (one must be in the token's `aud`).
    pub audiences: Vec<String>,
}

/// The source of the issuer's keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// A JWKS file (re-read on refresh).
    File(PathBuf),
    /// A JWKS URL (`http://`).
    Url(String),
    /// An OIDC discovery document URL (`http://.../.well-known/openid-configuration`)
    /// whose `jwks_uri` is fetched.
    Discovery(String),
}

/// Verifies Kubernetes service-account tokens (the certificate service's and the xDS
/// admission's [`CredentialVerifier`]).
pub struct KubernetesTokens {
    cfg: KubernetesTokenConfig,
    keys: Arc<ArcSwap<JwkSet>>,
    refetch: Arc<Notify>,
    last_refetch: Mutex<Option<Instant>>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

#[derive(Deserialize)]
struct Discovery {
    jwks_uri: String,
}

impl KubernetesTokens {
    /// Loads a key file now (an unreadable file stops the start) or starts fetching
    /// URLs; refreshes in the background while it lives.
    pub fn new(cfg: KubernetesTokenConfig) -> Result<Arc<Self>, String> {
        if cfg.issuer.is_empty() {
            return Err("--k8s-issuer is required to verify Kubernetes service-account tokens".into());
        }
        let initial = match &cfg.keys {
            KeySource::File(path) => read_file(path)?,
            _ => JwkSet { keys: Vec::new() },
        };
        let me = Arc::new(KubernetesTokens {
            cfg,
            keys: Arc::new(ArcSwap::from_pointee(initial)),
            refetch: Arc::new(Notify::new()),
            last_refetch: Mutex::new(None),
        });
        let weak = Arc::downgrade(&me);
        tokio::spawn(async move {
            loop {
                let Some(me) = weak.upgrade() else { return };
                match load(&me.cfg.keys).await {
                    Ok(set) => {
                        tracing::debug!(keys = set.keys.len(), "Kubernetes issuer keys loaded");
                        me.keys.store(Arc::new(set));
                    }
                    Err(e) => tracing::warn!(error = %e, "Kubernetes issuer keys not refreshed; keeping the last ones"),
                }
                let wake = me.refetch.clone();
                drop(me);
                let _ = tokio::time::timeout(REFRESH, wake.notified()).await;
            }
        });
        Ok(me)
    }

    fn ask_refetch(&self) {
        let mut last = self.last_refetch.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|t| t.elapsed() >= MIN_REFETCH) {
            *last = Some(Instant::now());
            self.refetch.notify_one();
        }
    }

    /// What `token` grants: namespace and service account of its subject.
    pub fn verify_token(&self, token: &str) -> Result<Grant, IdentityError> {
        let refused = |m: String| IdentityError::TokenMalformed(format!("Kubernetes service-account token: {m}"));
        let header = jsonwebtoken::decode_header(token).map_err(|e| refused(format!("not a JWT: {e}")))?;
        // The issuer signs with a private key: a symmetric algorithm would make its
        // public key a shared secret.
        if matches!(header.alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err(refused(format!(
                "algorithm {:?} is not accepted (the issuer signs asymmetrically)",
                header.alg
            )));
        }
        let keys = self.keys.load_full();
        if keys.keys.is_empty() {
            self.ask_refetch();
            return Err(IdentityError::Service {
                code: tonic::Code::Unavailable,
                message: "the Kubernetes issuer's keys are not loaded yet".into(),
            });
        }
        let candidates: Vec<_> = match &header.kid {
            Some(kid) => keys.keys.iter().filter(|k| k.common.key_id.as_deref() == Some(kid)).collect(),
            None => keys.keys.iter().collect(),
        };
        if candidates.is_empty() {
            self.ask_refetch();
            return Err(refused(format!("signed with key {:?}, which the issuer does not publish", header.kid)));
        }
        let mut last = None;
        for jwk in candidates {
            let key = match DecodingKey::from_jwk(jwk) {
                Ok(k) => k,
                Err(e) => {
                    last = Some(format!("unusable key: {e}"));
                    continue;
                }
            };
            let mut v = Validation::new(header.alg);
            v.set_issuer(&[&self.cfg.issuer]);
            v.set_audience(&self.cfg.audiences);
            v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            v.leeway = 0;
            match jsonwebtoken::decode::<Claims>(token, &key, &v) {
                Ok(data) => return grant_of(&data.claims.sub),
                Err(e) => last = Some(describe(&e, &self.cfg)),
            }
        }
        Err(refused(last.unwrap_or_else(|| "no key verifies it".into())))
    }
}

impl CredentialVerifier for KubernetesTokens {
    fn verify<'a>(&'a self, credential: &'a Credential) -> VerifyFuture<'a> {
        Box::pin(std::future::ready(self.verify_token(credential.token())))
    }
}

/// `system:serviceaccount:<ns>:<sa>` to a grant.
fn grant_of(sub: &str) -> Result<Grant, IdentityError> {
    let mut parts = sub.split(':');
    match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("system"), Some("serviceaccount"), Some(ns), Some(sa), None) if !ns.is_empty() && !sa.is_empty() => {
            Ok(Grant { namespace: ns.into(), service_account: sa.into(), token_id: format!("k8s:{sub}") })
        }
        _ => Err(IdentityError::TokenMalformed(format!(
            "Kubernetes token subject {sub:?} is not system:serviceaccount:<namespace>:<name>"
        ))),
    }
}

fn describe(e: &jsonwebtoken::errors::Error, cfg: &KubernetesTokenConfig) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => "expired".into(),
        ErrorKind::ImmatureSignature => "not valid yet (nbf)".into(),
        ErrorKind::InvalidAudience => format!("audience is not {}", cfg.audiences.join(" or ")),
        ErrorKind::InvalidIssuer => format!("issuer is not {:?}", cfg.issuer),
        ErrorKind::InvalidSignature => "signature does not verify".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("claim {c:?} missing"),
        other => format!("{other:?}"),
    }
}

fn parse_set(text: &str, what: &str) -> Result<JwkSet, String> {
    serde_json::from_str(text).map_err(|e| format!("{what}: not a JWKS ({{\"keys\": [...]}}): {e}"))
}

fn read_file(path: &PathBuf) -> Result<JwkSet, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_set(&text, &path.display().to_string())
}

async fn load(source: &KeySource) -> Result<JwkSet, String> {
    match source {
        KeySource::File(path) => read_file(path),
        KeySource::Url(url) => parse_set(&get(url).await?, url),
        KeySource::Discovery(url) => {
            let doc: Discovery = serde_json::from_str(&get(url).await?)
                .map_err(|e| format!("{url}: not an OIDC discovery document with jwks_uri: {e}"))?;
            parse_set(&get(&doc.jwks_uri).await?, &doc.jwks_uri)
        }
    }
}

/// GETs an `http://` URL (bounded size and time).
async fn get(url: &str) -> Result<String, String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("invalid URL {url:?}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{url}: only http:// URLs are fetched (e.g. through `kubectl proxy`); save an https issuer's keys \
             with `kubectl get --raw /openid/v1/jwks > jwks.json` and use --k8s-jwks-file"
        ));
    }
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let fetch = async {
        let resp = client.get(uri).await.map_err(|e| format!("{url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{url}: status {}", resp.status()));
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_BYTES);
        let bytes = body.collect().await.map_err(|e| format!("{url}: {e}"))?.to_bytes();
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{url}: not UTF-8"))
    };
    tokio::time::timeout(crate::jwks::DEFAULT_TIMEOUT, fetch).await.map_err(|_| format!("{url}: timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_map_to_namespace_and_service_account() {
        let g = grant_of("system:serviceaccount:bookinfo:reviews").expect("grant");
        assert_eq!((g.namespace.as_str(), g.service_account.as_str()), ("bookinfo", "reviews"));
        for bad in ["system:node:n1", "system:serviceaccount:ns", "system:serviceaccount::sa", "x:y:z:w"] {
            assert!(grant_of(bad).is_err(), "{bad}");
        }
    }
}
