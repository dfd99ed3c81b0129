//! Join tokens: the bootstrap credential of a proxy outside Kubernetes.
//!
//! A token is `weft-jt1.<payload>.<mac>`: the payload is base64url JSON
//! `{"id","ns","sa","iat","exp"}`, the MAC is HMAC-SHA256 over `weft-jt1.<payload>` with
//! a 256-bit key kept in the data directory (`token-key`, 0600). A token grants one
//! namespace and service account until it expires or is revoked; it can be used by
//! several proxies of that service account, like an Istio VM token. Revoked ids are kept
//! in `revoked-tokens.json` (until they would have expired anyway); the file is re-read
//! when it changes, so `weft token revoke --data-dir` takes effect on a running control
//! plane.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::files::{private_dir, read_optional, read_secret, write_atomic};
use crate::{IdentityError, SpiffeId};

/// Prefix (and version) of weft join tokens.
pub const TOKEN_PREFIX: &str = "weft-jt1";
/// Default validity of a join token.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest validity of a join token by default (90 days, the same bound as Istio's
/// `MAX_WORKLOAD_CERT_TTL` for what the token is exchanged for); see
/// [`TokenIssuer::with_max_ttl`].
pub const DEFAULT_MAX_TOKEN_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

const KEY_FILE: &str = "token-key";
const REVOKED_FILE: &str = "revoked-tokens.json";

/// What a verified credential allows: certificates for this namespace and service account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Id of the token that granted it (for logs).
    pub token_id: String,
}

impl Grant {
    /// The SPIFFE id this grant allows in `trust_domain`.
    pub fn spiffe_id(&self, trust_domain: &str) -> Result<SpiffeId, IdentityError> {
        SpiffeId::new(trust_domain, &self.namespace, &self.service_account)
    }
}

/// A freshly issued token.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    /// Token id (what `weft token revoke` takes).
    pub id: String,
    /// The token itself (secret).
    pub token: String,
    /// Namespace granted.
    pub namespace: String,
    /// Service account granted.
    pub service_account: String,
    /// Expiry.
    pub expires: SystemTime,
}

/// A bootstrap credential as a proxy presents it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// A weft join token (`join-token`).
    JoinToken(String),
    /// A Kubernetes service account token (`k8s-sa-token`), a JWT.
    KubernetesServiceAccountToken(String),
}

impl Credential {
    /// Classifies a bearer value: weft tokens by their prefix, JWTs by their shape.
    pub fn from_bearer(token: &str) -> Result<Credential, IdentityError> {
        let token = token.trim();
        if token.starts_with(&format!("{TOKEN_PREFIX}.")) {
            Ok(Credential::JoinToken(token.to_string()))
        } else if token.starts_with("eyJ") && token.split('.').count() == 3 {
            Ok(Credential::KubernetesServiceAccountToken(token.to_string()))
        } else if token.is_empty() {
            Err(IdentityError::TokenMalformed("empty credential".into()))
        } else {
            Err(IdentityError::TokenMalformed(format!(
                "neither a weft join token ({TOKEN_PREFIX}.…) nor a Kubernetes service account token (JWT)"
            )))
        }
    }

    /// The kind's name: `join-token` or `k8s-sa-token`.
    pub fn kind(&self) -> &'static str {
        match self {
            Credential::JoinToken(_) => "join-token",
            Credential::KubernetesServiceAccountToken(_) => "k8s-sa-token",
        }
    }

    /// The raw token (for the `authorization` header).
    pub fn token(&self) -> &str {
        match self {
            Credential::JoinToken(t) | Credential::KubernetesServiceAccountToken(t) => t,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Payload {
    id: String,
    ns: String,
    sa: String,
    iat: u64,
    exp: u64,
}

/// Issues and verifies join tokens; keeps the revocation list.
pub struct TokenIssuer {
    key: hmac::Key,
    /// Longest TTL [`TokenIssuer::create`] grants.
    max_ttl: Duration,
    /// Data directory (`None`: in memory only).
    dir: Option<PathBuf>,
    revoked: Mutex<Revocations>,
}

#[derive(Default)]
struct Revocations {
    /// Token id -> its expiry (Unix seconds), so entries can be dropped once moot.
    ids: BTreeMap<String, u64>,
    /// Modification time of the file when last read.
    mtime: Option<SystemTime>,
}

impl TokenIssuer {
    /// Loads the signing key from `dir` or creates it (0600), and the revocation list.
    pub fn load_or_create(dir: &Path) -> Result<TokenIssuer, IdentityError> {
        private_dir(dir)?;
        let key_path = dir.join(KEY_FILE);
        let key_bytes = match read_optional(&key_path, "cannot read token key")? {
            Some(_) => {
                let text = read_secret(&key_path, "cannot read token key")?;
                B64.decode(text.trim()).map_err(|e| {
                    IdentityError::InvalidCa(format!("{}: not a base64url key: {e}", key_path.display()))
                })?
            }
            None => {
                let key = random_bytes::<32>()?;
                write_atomic(&key_path, B64.encode(key).as_bytes(), 0o600, "cannot write token key")?;
                key.to_vec()
            }
        };
        if key_bytes.len() < 32 {
            return Err(IdentityError::InvalidCa(format!("{}: key shorter than 256 bits", key_path.display())));
        }
        let issuer = TokenIssuer {
            key: hmac::Key::new(hmac::HMAC_SHA256, &key_bytes),
            max_ttl: DEFAULT_MAX_TOKEN_TTL,
            dir: Some(dir.to_path_buf()),
            revoked: Mutex::new(Revocations::default()),
        };
        issuer.reload_revocations()?;
        Ok(issuer)
    }

    /// An issuer with a random key, in memory only (tests).
    pub fn ephemeral() -> Result<TokenIssuer, IdentityError> {
        Ok(TokenIssuer {
            key: hmac::Key::new(hmac::HMAC_SHA256, &random_bytes::<32>()?),
            max_ttl: DEFAULT_MAX_TOKEN_TTL,
            dir: None,
            revoked: Mutex::new(Revocations::default()),
        })
    }

    /// The issuer with `max` as the longest TTL [`TokenIssuer::create`] grants (default
    /// [`DEFAULT_MAX_TOKEN_TTL`]; `weft control --max-token-ttl`).
    pub fn with_max_ttl(mut self, max: Duration) -> Self {
        self.max_ttl = max;
        self
    }

    /// The longest TTL [`TokenIssuer::create`] grants.
    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
    }

    /// A token granting `namespace`/`service_account` for `ttl`. A TTL over the
    /// issuer's maximum is refused ([`IdentityError::TtlTooLong`]), not shortened: the
    /// caller learns that the token would not live as long as asked.
    pub fn create(&self, namespace: &str, service_account: &str, ttl: Duration) -> Result<IssuedToken, IdentityError> {
        // Same character rules as the SPIFFE id the token will be exchanged for.
        SpiffeId::new("cluster.local", namespace, service_account)?;
        if ttl.is_zero() {
            return Err(IdentityError::TokenMalformed("a token needs a positive TTL".into()));
        }
        let too_long =
            || IdentityError::TtlTooLong { what: "token", requested: ttl, max: self.max_ttl, flag: "--max-token-ttl" };
        if ttl > self.max_ttl {
            return Err(too_long());
        }
        let id: String = random_bytes::<8>()?.iter().map(|b| format!("{b:02x}")).collect();
        let now = SystemTime::now();
        let expires = now.checked_add(ttl).ok_or_else(too_long)?;
        let payload = Payload {
            id: id.clone(),
            ns: namespace.to_string(),
            sa: service_account.to_string(),
            iat: unix(now),
            exp: unix(expires),
        };
        Ok(IssuedToken {
            token: self.sign(&payload)?,
            id,
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            expires,
        })
    }

    fn sign(&self, payload: &Payload) -> Result<String, IdentityError> {
        let json = serde_json::to_vec(payload).map_err(IdentityError::crypto)?;
        let signed = format!("{TOKEN_PREFIX}.{}", B64.encode(json));
        let mac = hmac::sign(&self.key, signed.as_bytes());
        Ok(format!("{signed}.{}", B64.encode(mac.as_ref())))
    }

    /// Checks a credential: signature, expiry, revocation; what it grants.
    pub fn verify_credential(&self, credential: &Credential) -> Result<Grant, IdentityError> {
        match credential {
            Credential::JoinToken(t) => self.verify(t),
            Credential::KubernetesServiceAccountToken(_) => Err(IdentityError::CredentialUnsupported(
                "Kubernetes service account tokens (k8s-sa-token) are not supported without Kubernetes; \
                 use a join token from `weft token create`"
                    .into(),
            )),
        }
    }

    /// Checks a join token: signature, expiry, revocation; what it grants.
    pub fn verify(&self, token: &str) -> Result<Grant, IdentityError> {
        let mut parts = token.trim().split('.');
        let (Some(prefix), Some(body), Some(mac), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(IdentityError::TokenMalformed(format!("expected {TOKEN_PREFIX}.<payload>.<signature>")));
        };
        if prefix != TOKEN_PREFIX {
            return Err(IdentityError::TokenMalformed(format!("unknown token version {prefix:?}")));
        }
        let mac = B64.decode(mac).map_err(|_| IdentityError::TokenMalformed("signature is not base64url".into()))?;
        hmac::verify(&self.key, format!("{prefix}.{body}").as_bytes(), &mac)
            .map_err(|_| IdentityError::TokenSignature)?;
        let json = B64.decode(body).map_err(|_| IdentityError::TokenMalformed("payload is not base64url".into()))?;
        let p: Payload = serde_json::from_slice(&json)
            .map_err(|e| IdentityError::TokenMalformed(format!("payload is not a token: {e}")))?;
        let expired_at = SystemTime::UNIX_EPOCH + Duration::from_secs(p.exp);
        if SystemTime::now() >= expired_at {
            return Err(IdentityError::TokenExpired { id: p.id, expired_at });
        }
        // A changed revocation file (another process revoked) is picked up here.
        if let Err(e) = self.reload_revocations() {
            tracing::warn!(error = %e, "cannot re-read revoked tokens; using the list in memory");
        }
        if self.lock().ids.contains_key(&p.id) {
            return Err(IdentityError::TokenRevoked { id: p.id });
        }
        Ok(Grant { namespace: p.ns, service_account: p.sa, token_id: p.id })
    }

    /// Revokes token `id` (persisted); `Ok(false)` if it already was. Ids are not checked
    /// against issued tokens (the issuer keeps no list of them): revoking an unknown id
    /// is harmless. The entry is kept for `keep` (the longest TTL a token may have had),
    /// when `None` the longer of the issuer's maximum TTL and [`DEFAULT_TOKEN_TTL`] × 365.
    pub fn revoke(&self, id: &str, keep: Option<Duration>) -> Result<bool, IdentityError> {
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(IdentityError::TokenMalformed(format!("{id:?} is not a token id (hex)")));
        }
        self.reload_revocations()?;
        let mut r = self.lock();
        if r.ids.contains_key(id) {
            return Ok(false);
        }
        let keep = keep.unwrap_or(self.max_ttl.max(DEFAULT_TOKEN_TTL * 365));
        let until = SystemTime::now().checked_add(keep).map_or(u64::MAX, unix);
        r.ids.insert(id.to_string(), until);
        let now = unix(SystemTime::now());
        r.ids.retain(|_, exp| *exp > now);
        if let Some(dir) = &self.dir {
            let path = dir.join(REVOKED_FILE);
            let json = serde_json::to_vec_pretty(&r.ids).map_err(IdentityError::crypto)?;
            write_atomic(&path, &json, 0o600, "cannot write revoked tokens")?;
            r.mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        }
        tracing::info!(token = id, "join token revoked");
        Ok(true)
    }

    /// Whether `id` is revoked.
    pub fn is_revoked(&self, id: &str) -> bool {
        let _ = self.reload_revocations();
        self.lock().ids.contains_key(id)
    }

    fn reload_revocations(&self) -> Result<(), IdentityError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let path = dir.join(REVOKED_FILE);
        let mtime = match std::fs::metadata(&path) {
            Ok(m) => m.modified().ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(IdentityError::io("cannot read revoked tokens", path, e)),
        };
        if mtime.is_some() && self.lock().mtime == mtime {
            return Ok(());
        }
        let Some(text) = read_optional(&path, "cannot read revoked tokens")? else { return Ok(()) };
        let ids: BTreeMap<String, u64> = serde_json::from_str(&text)
            .map_err(|e| IdentityError::InvalidCa(format!("{}: not a revocation list: {e}", path.display())))?;
        let mut r = self.lock();
        r.ids = ids;
        r.mtime = mtime;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Revocations> {
        self.revoked.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N], IdentityError> {
    let mut b = [0u8; N];
    SystemRandom::new().fill(&mut b).map_err(|_| IdentityError::Crypto("no randomness available".into()))?;
    Ok(b)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests;
