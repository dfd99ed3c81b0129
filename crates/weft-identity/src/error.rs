//! The one error type of weft-identity: every refusal says what was wrong and with what.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// What went wrong with an identity, a certificate, a token or the CA.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A string that is not a weft workload SPIFFE id.
    #[error("invalid SPIFFE id {input:?}: {reason}")]
    InvalidSpiffeId {
        /// The input.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A file or directory of the CA or token store could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What the file is for.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// CA material (root, plug-in files) that cannot be used, with the file and reason.
    #[error("CA: {0}")]
    InvalidCa(String),
    /// A key or certificate operation failed (rcgen, ring).
    #[error("crypto: {0}")]
    Crypto(String),
    /// A certificate signing request that the CA will not sign.
    #[error("CSR refused: {0}")]
    CsrRefused(String),
    /// A CSR asking for an identity other than the one its credential grants.
    #[error("CSR refused: the CSR asks for {asked}, but the credential grants only {granted}")]
    IdentityNotGranted {
        /// What the CSR asks for.
        asked: String,
        /// What the credential grants.
        granted: String,
    },
    /// A credential that is not a token weft understands.
    #[error("credential refused: malformed token: {0}")]
    TokenMalformed(String),
    /// A token whose signature does not match (tampered, or from another control plane).
    #[error("credential refused: token signature does not verify (tampered, or issued by another control plane)")]
    TokenSignature,
    /// A token past its expiry.
    #[error("credential refused: token {id} expired at {}", humanize(*expired_at))]
    TokenExpired {
        /// Token id.
        id: String,
        /// When it expired.
        expired_at: SystemTime,
    },
    /// A revoked token.
    #[error("credential refused: token {id} is revoked")]
    TokenRevoked {
        /// Token id.
        id: String,
    },
    /// A credential kind this control plane cannot check.
    #[error("credential refused: {0}")]
    CredentialUnsupported(String),
    /// A token its verifier refuses, with the verifier's reason (e.g. the Kubernetes API
    /// server's TokenReview: expired, another audience, unknown key).
    #[error("credential refused: {0}")]
    TokenRefused(String),
    /// The certificate service answered with an error or could not be reached.
    #[error("certificate service: {code:?}: {message}")]
    Service {
        /// gRPC status code.
        code: tonic::Code,
        /// The service's message.
        message: String,
    },
    /// A peer whose certificate verifies but names an identity it was not expected to have.
    #[error("peer identity {got} is not the expected {expected}")]
    PeerNotExpected {
        /// The SPIFFE id in the peer's certificate.
        got: String,
        /// The identities that were acceptable.
        expected: String,
    },
    /// A certificate (issued to us, or a peer's) that is unusable.
    #[error("certificate: {0}")]
    Certificate(String),
    /// A certificate or token lifetime over the control plane's maximum (Istio's CA
    /// refuses such certificate requests the same way, `TTL_ERROR`).
    #[error("requested {what} TTL {}s is greater than the max allowed TTL {}s ({flag})", requested.as_secs(), max.as_secs())]
    TtlTooLong {
        /// `certificate` or `token`.
        what: &'static str,
        /// The lifetime asked for.
        requested: Duration,
        /// The longest granted.
        max: Duration,
        /// The control-plane flag that sets `max`.
        flag: &'static str,
    },
}

impl IdentityError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        IdentityError::Io { what, path: path.into(), source }
    }

    pub(crate) fn crypto(e: impl std::fmt::Display) -> Self {
        IdentityError::Crypto(e.to_string())
    }

    /// The gRPC status the certificate service answers for this error.
    pub fn to_status(&self) -> tonic::Status {
        let msg = self.to_string();
        match self {
            e if e.is_credential_refusal() => tonic::Status::unauthenticated(msg),
            IdentityError::IdentityNotGranted { .. } => tonic::Status::permission_denied(msg),
            // A dependency's answer (e.g. the API server unreachable: UNAVAILABLE, retried).
            IdentityError::Service { code, message } => tonic::Status::new(*code, message.clone()),
            IdentityError::CsrRefused(_) | IdentityError::InvalidSpiffeId { .. } | IdentityError::TtlTooLong { .. } => {
                tonic::Status::invalid_argument(msg)
            }
            _ => tonic::Status::internal(msg),
        }
    }

    /// Whether retrying the same request cannot help (refused credential or CSR), as
    /// opposed to a service that is unreachable or failing.
    pub fn is_permanent(&self) -> bool {
        match self {
            IdentityError::Service { code, .. } => matches!(
                code,
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied | tonic::Code::InvalidArgument
            ),
            e => {
                e.is_credential_refusal()
                    || matches!(e, IdentityError::IdentityNotGranted { .. } | IdentityError::TtlTooLong { .. })
            }
        }
    }

    /// Whether this error is the credential's fault (the caller should not retry with the
    /// same credential).
    pub fn is_credential_refusal(&self) -> bool {
        matches!(
            self,
            IdentityError::TokenMalformed(_)
                | IdentityError::TokenSignature
                | IdentityError::TokenExpired { .. }
                | IdentityError::TokenRevoked { .. }
                | IdentityError::CredentialUnsupported(_)
                | IdentityError::TokenRefused(_)
        )
    }
}

/// Seconds since the Unix epoch with an RFC 3339 rendering, for messages.
pub(crate) fn humanize(t: SystemTime) -> String {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => match time::OffsetDateTime::from_unix_timestamp(d.as_secs() as i64) {
            Ok(dt) => dt
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|_| format!("{}s after the epoch", d.as_secs())),
            Err(_) => format!("{}s after the epoch", d.as_secs()),
        },
        Err(_) => "before 1970".to_string(),
    }
}
