//! The JSON API's admin credential: `Authorization: Bearer <admin token>`.
//!
//! With `--data-dir` the control plane keeps an admin token in `<data-dir>/admin-token`
//! (256 random bits, base64url, 0600; generated at first start) unless
//! `--api-token-file` names another file. Requests are classified by
//! [`classify`]:
//!
//! - [`Access::Open`]: Prometheus (`GET /metrics`, `/stats/prometheus`) and the
//!   admission webhook (`POST /inject`), which the API server calls without our token;
//! - [`Access::Admin`]: everything that changes state, mints tokens or taps traffic
//!   (any method but GET/HEAD, except the read-only `POST /api/v1/analyze`; anything
//!   under `/api/v1/tap`);
//! - [`Access::Read`]: the rest (GET), which needs the token too unless
//!   `--api-read-anonymous` opens it.
//!
//! A refused request gets 401 with a JSON error saying what to send. `weft control`
//! without `--data-dir` keeps the token in a temporary data directory (still checked);
//! only the development mode (`--insecure-dev`, no identity) leaves the API open, with a
//! warning at start.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use http::{HeaderMap, Method, StatusCode};
use serde_json::{json, Value};

/// File name of the generated admin token in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// What a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Nothing (metrics, webhook).
    Open,
    /// The admin token, unless reads are open.
    Read,
    /// The admin token.
    Admin,
}

/// The API's credential check.
#[derive(Clone, Debug, Default)]
pub struct ApiAuth {
    /// The admin token (None: no check, the API is open).
    token: Option<String>,
    /// Reads without the token (`--api-read-anonymous`).
    read_anonymous: bool,
}

/// Settings of the admin credential (with identity, `crate::identity::IdentityConfig`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiAuthConfig {
    /// A file holding the admin token (`--api-token-file`); None: `<data-dir>/admin-token`,
    /// generated at first start.
    pub token_file: Option<PathBuf>,
    /// Serve read-only endpoints without the token (`--api-read-anonymous`).
    pub read_anonymous: bool,
}

impl ApiAuth {
    /// An open API (no data directory).
    pub fn open() -> Self {
        ApiAuth::default()
    }

    /// The check with `cfg`'s token file, or the data directory's (created when missing).
    pub fn load(cfg: &ApiAuthConfig, data_dir: &Path) -> Result<(ApiAuth, PathBuf), String> {
        let path = cfg.token_file.clone().unwrap_or_else(|| data_dir.join(ADMIN_TOKEN_FILE));
        let token = match std::fs::read_to_string(&path) {
            Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
            Ok(_) => return Err(format!("{}: the admin token file is empty", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && cfg.token_file.is_none() => {
                let token = generate()?;
                write_private(&path, &token)?;
                tracing::info!(path = %path.display(), "admin token generated");
                token
            }
            Err(e) => return Err(format!("{}: cannot read the admin token: {e}", path.display())),
        };
        Ok((ApiAuth { token: Some(token), read_anonymous: cfg.read_anonymous }, path))
    }

    /// The admin token, if the API checks one.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Whether a request may proceed; the 401 answer otherwise.
    pub fn check(&self, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), (StatusCode, Value)> {
        let Some(expected) = &self.token else { return Ok(()) };
        let access = classify(method, path);
        match access {
            Access::Open => return Ok(()),
            Access::Read if self.read_anonymous => return Ok(()),
            Access::Read | Access::Admin => {}
        }
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        match presented {
            Some(t) if constant_time_eq(t.as_bytes(), expected.as_bytes()) => Ok(()),
            Some(_) => {
                tracing::warn!(%method, path, "API request with a wrong admin token refused");
                Err((StatusCode::UNAUTHORIZED, json!({"error": "the admin token is not valid"})))
            }
            None => Err((
                StatusCode::UNAUTHORIZED,
                json!({"error": format!(
                    "{method} {path} needs the admin credential: send `Authorization: Bearer <admin token>` (the \
                     token is in the control plane's data directory, file admin-token; the weft CLI reads \
                     WEFT_TOKEN, --token-file or `weft up`'s state file)"
                )}),
            )),
        }
    }
}

/// What `method path` needs.
pub fn classify(method: &Method, path: &str) -> Access {
    let tap = path == "/api/v1/tap" || path.starts_with("/api/v1/tap/") || path.starts_with("/api/v1/tap?");
    match (method, path) {
        _ if tap => Access::Admin,
        (&Method::GET | &Method::HEAD, "/metrics" | "/stats/prometheus") => Access::Open,
        (&Method::POST, "/inject") => Access::Open,
        (&Method::POST, "/api/v1/analyze") => Access::Read,
        (&Method::GET | &Method::HEAD, _) => Access::Read,
        _ => Access::Admin,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn generate() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom(&mut bytes)?;
    Ok(format!("weft-admin.{}", B64.encode(bytes)))
}

fn getrandom(buf: &mut [u8]) -> Result<(), String> {
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf)).map_err(|e| format!("no randomness: {e}"))
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_changes_tokens_and_tap_are_admin_reads_are_read_metrics_and_inject_open() {
        assert_eq!(classify(&Method::POST, "/api/v1/apply"), Access::Admin);
        assert_eq!(classify(&Method::POST, "/api/v1/tokens"), Access::Admin);
        assert_eq!(classify(&Method::POST, "/api/v1/ca/rotate"), Access::Admin);
        assert_eq!(classify(&Method::GET, "/api/v1/tap"), Access::Admin);
        assert_eq!(classify(&Method::GET, "/api/v1/tap/stream"), Access::Admin);
        assert_eq!(classify(&Method::DELETE, "/api/v1/anything"), Access::Admin);
        assert_eq!(classify(&Method::GET, "/api/v1/proxies"), Access::Read);
        assert_eq!(classify(&Method::POST, "/api/v1/analyze"), Access::Read);
        assert_eq!(classify(&Method::GET, "/metrics"), Access::Open);
        assert_eq!(classify(&Method::POST, "/inject"), Access::Open);
        assert_eq!(classify(&Method::POST, "/metrics"), Access::Admin);
    }

    #[test]
    fn token_is_generated_once_private_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (auth, path) = ApiAuth::load(&ApiAuthConfig::default(), dir.path()).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let (again, _) = ApiAuth::load(&ApiAuthConfig::default(), dir.path()).unwrap();
        assert_eq!(auth.token(), again.token(), "kept across restarts");
        let mut h = HeaderMap::new();
        assert!(auth.check(&Method::POST, "/api/v1/apply", &h).is_err());
        assert!(auth.check(&Method::GET, "/api/v1/proxies", &h).is_err());
        assert!(auth.check(&Method::GET, "/metrics", &h).is_ok());
        h.insert("authorization", "Bearer wrong".parse().unwrap());
        assert_eq!(auth.check(&Method::POST, "/api/v1/apply", &h).unwrap_err().0, StatusCode::UNAUTHORIZED);
        h.insert("authorization", format!("Bearer {}", auth.token().unwrap()).parse().unwrap());
        assert!(auth.check(&Method::POST, "/api/v1/apply", &h).is_ok());
        let open_reads = ApiAuth { read_anonymous: true, ..auth };
        assert!(open_reads.check(&Method::GET, "/api/v1/proxies", &HeaderMap::new()).is_ok());
        assert!(open_reads.check(&Method::POST, "/api/v1/tokens", &HeaderMap::new()).is_err());
    }
}
