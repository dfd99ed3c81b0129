//! The control plane's identity side: CA and token issuer from the data directory (or a
//! plug-in CA), the certificate service mounted on the xDS port, and the JSON API's
//! token endpoints (`weft token create|revoke`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::StatusCode;
use serde_json::{json, Value};
use weft_identity::service::CertificateAuthority;
use weft_identity::{Ca, TokenIssuer, DEFAULT_TRUST_DOMAIN};

/// Default workload certificate TTL (Istio's).
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest TTL a workload may ask for (Istio's `MAX_WORKLOAD_CERT_TTL`).
pub const DEFAULT_MAX_CERT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// Identity settings of a control plane.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// Data directory: the self-signed root and its key, the token key, revoked tokens.
    pub data_dir: PathBuf,
    /// Istio `cacerts` directory of a plug-in CA (its root then replaces the self-signed one).
    pub plugin_ca: Option<PathBuf>,
    /// Trust domain of issued identities.
    pub trust_domain: String,
    /// Workload certificate TTL when a request does not ask for one.
    pub cert_ttl: Duration,
    /// Longest certificate TTL granted; a request for more is refused (Istio's CA).
    pub max_cert_ttl: Duration,
    /// Longest join-token TTL granted; a request for more is refused with 400.
    pub max_token_ttl: Duration,
    /// The TLS port for xDS and certificates (Istio's 15012; `crate::control_tls`);
    /// None: plaintext port only.
    pub xds_tls: Option<std::net::SocketAddr>,
    /// Let xDS streams without any credential register (`--xds-allow-anonymous`; for
    /// development only: anyone who reaches the port can then claim any workload).
    pub allow_anonymous_xds: bool,
    /// Kubernetes service-account tokens accepted as credentials, verified against the
    /// cluster issuer's keys (`crate::k8s_tokens`); None: they are refused.
    pub kubernetes: Option<crate::k8s_tokens::KubernetesTokenConfig>,
    /// `--kubernetes` mode: Kubernetes tokens are verified by the API server's TokenReview
    /// (`crate::kubernetes::tokenreview`), for these audiences; it takes the place of
    /// [`IdentityConfig::kubernetes`].
    pub token_review: Option<(crate::kubernetes::KubernetesConfig, Vec<String>)>,
    /// The JSON API's admin credential (`crate::api_auth`).
    pub api: crate::api_auth::ApiAuthConfig,
}

impl IdentityConfig {
    /// Defaults (`cluster.local`, 24 h, at most 90 days) with `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        IdentityConfig {
            data_dir: data_dir.into(),
            plugin_ca: None,
            trust_domain: DEFAULT_TRUST_DOMAIN.to_string(),
            cert_ttl: DEFAULT_CERT_TTL,
            max_cert_ttl: DEFAULT_MAX_CERT_TTL,
            max_token_ttl: weft_identity::token::DEFAULT_MAX_TOKEN_TTL,
            xds_tls: None,
            allow_anonymous_xds: false,
            kubernetes: None,
            token_review: None,
            api: Default::default(),
        }
    }

    /// Loads or creates the CA and the token issuer. A default certificate TTL over the
    /// maximum is a configuration error.
    pub fn start(&self) -> Result<Arc<CertificateAuthority>, String> {
        if self.cert_ttl > self.max_cert_ttl {
            return Err(format!(
                "--cert-ttl ({}s) is longer than --max-cert-ttl ({}s): lower the first or raise the second",
                self.cert_ttl.as_secs(),
                self.max_cert_ttl.as_secs()
            ));
        }
        if self.cert_ttl.is_zero() || self.max_token_ttl.is_zero() {
            return Err("--cert-ttl and --max-token-ttl must be longer than zero".to_string());
        }
        let ca = match &self.plugin_ca {
            Some(dir) => Ca::plug_in(dir, &self.trust_domain),
            None => Ca::load_or_create(&self.data_dir, &self.trust_domain),
        }
        .map_err(|e| e.to_string())?;
        let tokens =
            TokenIssuer::load_or_create(&self.data_dir).map_err(|e| e.to_string())?.with_max_ttl(self.max_token_ttl);
        let mut authority = CertificateAuthority::new(Arc::new(ca), Arc::new(tokens), self.cert_ttl, self.max_cert_ttl);
        match (&self.token_review, &self.kubernetes) {
            (Some((kube, audiences)), _) => {
                let reviewer = crate::kubernetes::tokenreview::TokenReviewer::new(kube.clone(), audiences.clone());
                authority = authority.with_kubernetes(std::sync::Arc::new(reviewer));
            }
            (None, Some(k8s)) => {
                authority = authority.with_kubernetes(crate::k8s_tokens::KubernetesTokens::new(k8s.clone())?);
            }
            (None, None) => {}
        }
        Ok(Arc::new(authority))
    }
}

/// `POST /api/v1/tokens` with `{"namespace", "serviceAccount", "ttlSeconds"}`. A TTL
/// over the issuer's maximum (`--max-token-ttl`) is refused with 400, naming both.
pub(crate) fn create_token(authority: Option<&CertificateAuthority>, body: &[u8]) -> (StatusCode, Value) {
    let Some(authority) = authority else { return disabled() };
    let req: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, json!({"error": format!("the body must be JSON: {e}")})),
    };
    let (Some(ns), Some(sa)) = (req["namespace"].as_str(), req["serviceAccount"].as_str()) else {
        return (StatusCode::BAD_REQUEST, json!({"error": "namespace and serviceAccount are required strings"}));
    };
    let ttl = match &req["ttlSeconds"] {
        Value::Null => weft_identity::token::DEFAULT_TOKEN_TTL,
        v => match v.as_u64() {
            Some(s) if s > 0 => Duration::from_secs(s),
            _ => {
                return (
                    StatusCode::BAD_REQUEST,
                    json!({"error": format!("ttlSeconds must be a positive integer of seconds, found {v}")}),
                )
            }
        },
    };
    match authority.tokens().create(ns, sa, ttl) {
        Ok(t) => {
            tracing::info!(token = %t.id, namespace = ns, service_account = sa, ttl_s = ttl.as_secs(), "join token issued");
            let identity = format!("spiffe://{}/ns/{ns}/sa/{sa}", authority.ca().trust_domain());
            let expires = t.expires.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            (
                StatusCode::OK,
                json!({"id": t.id, "token": t.token, "namespace": ns, "serviceAccount": sa,
                       "identity": identity, "expiresAt": expires}),
            )
        }
        Err(e) => {
            let max = authority.tokens().max_ttl().as_secs();
            (StatusCode::BAD_REQUEST, json!({"error": e.to_string(), "maxTtlSeconds": max}))
        }
    }
}

/// `POST /api/v1/tokens/{id}/revoke`.
pub(crate) fn revoke_token(authority: Option<&CertificateAuthority>, id: &str) -> (StatusCode, Value) {
    let Some(authority) = authority else { return disabled() };
    match authority.tokens().revoke(id, None) {
        Ok(newly) => (StatusCode::OK, json!({"id": id, "revoked": true, "alreadyRevoked": !newly})),
        Err(e) => (StatusCode::BAD_REQUEST, json!({"error": e.to_string()})),
    }
}

fn disabled() -> (StatusCode, Value) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": "identity is disabled on this control plane: start `weft control` with --data-dir"}),
    )
}

/// `POST /api/v1/ca/rotate?step=begin|complete|retire`: root rotation in three steps so
/// no workload loses trust. `begin` creates the new root and trusts it next to the old
/// (pushed to every proxy as `ROOTCA`), `complete` makes it sign (leaves move over at
/// their next renewal), `retire` drops the previous roots once every leaf has renewed.
pub(crate) fn rotate_root(authority: Option<&CertificateAuthority>, step: &str) -> (StatusCode, Value) {
    let Some(authority) = authority else { return disabled() };
    let ca = authority.ca();
    let result = match step {
        "begin" => ca.begin_root_rotation().map(|()| json!({"step": "begin"})),
        "complete" => ca.complete_root_rotation().map(|()| json!({"step": "complete"})),
        "retire" => ca.retire_previous_roots().map(|n| json!({"step": "retire", "retired": n})),
        other => {
            return (
                StatusCode::BAD_REQUEST,
                json!({"error": format!("unknown step {other:?}: expected begin, complete or retire")}),
            )
        }
    };
    match result {
        Ok(mut v) => {
            tracing::info!(step, roots = ca.trust_bundle().len(), "CA root rotation step");
            v["roots"] = json!(ca.trust_bundle().len());
            (StatusCode::OK, v)
        }
        Err(e) => (StatusCode::CONFLICT, json!({"error": e.to_string()})),
    }
}
