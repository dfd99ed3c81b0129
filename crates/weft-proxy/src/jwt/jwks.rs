//! JSON Web Key Sets: parsed once, inline (`local_jwks`) or fetched over HTTP
//! (`remote_jwks`, cached for `cache_duration`, refetched on the first request after
//! it expires; one fetch at a time).

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use tracing::{debug, warn};

use super::token::{Jwt, Status};

/// Largest JWKS document weft accepts from a remote server.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// The usable keys of a JWKS.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<Key>,
}

/// One key.
struct Key {
    kid: Option<String>,
    alg: Option<String>,
    kind: KeyKind,
    decoding: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("kid", &self.kid).field("alg", &self.alg).field("kind", &self.kind).finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
    Oct,
    Ed25519,
}

/// Where a provider's keys come from.
#[derive(Debug)]
pub(crate) enum JwksSource {
    /// Inline.
    Local(Arc<KeySet>),
    /// Fetched.
    Remote(RemoteJwks),
}

/// A remote JWKS and its cache.
#[derive(Debug)]
pub(crate) struct RemoteJwks {
    pub(crate) uri: http::Uri,
    pub(crate) timeout: Duration,
    pub(crate) cache_duration: Duration,
    cached: ArcSwapOption<(Instant, Arc<KeySet>)>,
    fetching: tokio::sync::Mutex<()>,
}

impl KeySet {
    /// Parses a JWKS document (`{"keys": [...]}`, or a single key). Keys weft cannot use
    /// (unknown types or curves, bad encodings) are skipped, as Envoy skips them.
    pub fn parse(text: &str) -> Result<KeySet, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("JWKS is not JSON: {e}"))?;
        let items = match v.get("keys") {
            Some(Value::Array(items)) => items.clone(),
            Some(_) => return Err("JWKS `keys` must be a list".into()),
            None if v.get("kty").is_some() => vec![v],
            None => return Err("JWKS needs a `keys` list".into()),
        };
        let mut keys = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            match Key::from_json(item) {
                Ok(k) => keys.push(k),
                Err(e) => warn!(key = i, error = %e, "JWKS key skipped"),
            }
        }
        Ok(KeySet { keys })
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is usable.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Verifies the token's signature with the keys fitting its `kid` and `alg`.
    pub(crate) fn verify(&self, jwt: &Jwt) -> Status {
        let mut tried = false;
        for k in &self.keys {
            if let (Some(want), Some(have)) = (&jwt.kid, &k.kid) {
                if want != have {
                    continue;
                }
            }
            if k.alg.as_deref().is_some_and(|a| a != alg_name(jwt.alg)) || !k.kind.fits(jwt.alg) {
                continue;
            }
            tried = true;
            if jsonwebtoken::crypto::verify(&jwt.signature_b64, jwt.signing_input(), &k.decoding, jwt.alg)
                .unwrap_or(false)
            {
                return Status::Ok;
            }
        }
        if tried {
            Status::JwtVerificationFail
        } else {
            Status::JwksKidAlgMismatch
        }
    }
}

impl Key {
    fn from_json(v: Value) -> Result<Key, String> {
        let jwk: Jwk = serde_json::from_value(v).map_err(|e| e.to_string())?;
        let kind = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => KeyKind::Rsa,
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => KeyKind::EcP256,
                EllipticCurve::P384 => KeyKind::EcP384,
                ref c => return Err(format!("unsupported curve {c:?}")),
            },
            AlgorithmParameters::OctetKey(_) => KeyKind::Oct,
            AlgorithmParameters::OctetKeyPair(p) => match p.curve {
                EllipticCurve::Ed25519 => KeyKind::Ed25519,
                ref c => return Err(format!("unsupported curve {c:?}")),
            },
        };
        let decoding = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
        let alg = jwk.common.key_algorithm.map(|a| format!("{a:?}"));
        Ok(Key { kid: jwk.common.key_id, alg, kind, decoding })
    }
}

impl KeyKind {
    fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyKind::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyKind::EcP256 => alg == ES256,
            KeyKind::EcP384 => alg == ES384,
            KeyKind::Oct => matches!(alg, HS256 | HS384 | HS512),
            KeyKind::Ed25519 => alg == EdDSA,
        }
    }
}

impl JwksSource {
    /// The keys to verify with now (fetching a remote set when its cache is cold).
    pub(crate) async fn keys(&self) -> Result<Arc<KeySet>, Status> {
        match self {
            JwksSource::Local(k) => Ok(k.clone()),
            JwksSource::Remote(r) => r.keys().await,
        }
    }
}

impl RemoteJwks {
    pub(crate) fn new(uri: http::Uri, timeout: Duration, cache_duration: Duration) -> RemoteJwks {
        RemoteJwks { uri, timeout, cache_duration, cached: ArcSwapOption::empty(), fetching: Default::default() }
    }

    fn fresh(&self) -> Option<Arc<KeySet>> {
        let c = self.cached.load();
        c.as_ref().filter(|c| c.0.elapsed() < self.cache_duration).map(|c| c.1.clone())
    }

    async fn keys(&self) -> Result<Arc<KeySet>, Status> {
        if let Some(k) = self.fresh() {
            return Ok(k);
        }
        let _one = self.fetching.lock().await;
        if let Some(k) = self.fresh() {
            return Ok(k);
        }
        match tokio::time::timeout(self.timeout, fetch(&self.uri)).await {
            Ok(Ok(set)) => {
                let set = Arc::new(set);
                self.cached.store(Some(Arc::new((Instant::now(), set.clone()))));
                debug!(uri = %self.uri, keys = set.len(), "remote JWKS fetched");
                Ok(set)
            }
            Ok(Err(e)) => {
                warn!(uri = %self.uri, error = %e, "remote JWKS fetch failed");
                Err(Status::JwksFetchFail)
            }
            Err(_) => {
                warn!(uri = %self.uri, "remote JWKS fetch timed out");
                Err(Status::JwksFetchFail)
            }
        }
    }
}

async fn fetch(uri: &http::Uri) -> Result<KeySet, String> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let resp = client.get(uri.clone()).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_JWKS_BYTES);
    let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    let text = std::str::from_utf8(&bytes).map_err(|e| e.to_string())?;
    let set = KeySet::parse(text)?;
    if set.is_empty() {
        return Err("the JWKS has no usable key".into());
    }
    Ok(set)
}

fn alg_name(a: Algorithm) -> String {
    format!("{a:?}")
}
