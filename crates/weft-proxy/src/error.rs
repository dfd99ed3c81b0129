//! Errors of the data path. Every error knows who is to blame and whether a retry is
//! safe, and maps to the Envoy response flag written in metrics and access logs.

use std::fmt;

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The client (downstream) misbehaved or went away.
    Downstream,
    /// The upstream endpoint failed.
    Upstream,
    /// Configuration or the proxy itself.
    Internal,
}

/// What went wrong, in Envoy's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No route matched the request (`NR`).
    NoRoute,
    /// The route names a cluster the proxy does not know (`NC`).
    NoCluster,
    /// The cluster has no healthy endpoint (`UH`).
    NoHealthyUpstream,
    /// Connecting to the upstream failed (`UF`).
    ConnectFailure,
    /// Circuit breaker / pool overflow (`UO`).
    Overflow,
    /// The upstream reset the stream or closed the connection (`UR`).
    UpstreamReset,
    /// The upstream HTTP/2 server refused the stream (REFUSED_STREAM); always safe to retry (`UR`).
    RefusedStream,
    /// The upstream connection was terminated mid-response (`UC`).
    UpstreamTerminated,
    /// The route timeout fired (`UT`).
    Timeout,
    /// The per-try timeout fired on the last attempt (`UT`).
    PerTryTimeout,
    /// Upstream retry limit exceeded (`URX`).
    RetriesExhausted,
    /// The downstream connection went away (`DC`).
    DownstreamClosed,
    /// A fault-injection abort (`FI`).
    FaultAbort,
    /// The downstream request was malformed (`DPE`).
    DownstreamProtocol,
    /// The upstream response was malformed (`UPE`).
    UpstreamProtocol,
    /// Stream idle timeout (`SI`).
    StreamIdleTimeout,
    /// An RBAC (authorization) filter denied the request or connection (no flag: `-`).
    RbacDenied,
}

/// A data-path error.
#[derive(Debug)]
pub struct ProxyError {
    kind: ErrorKind,
    /// True when the request was certainly not seen by the upstream (safe to retry
    /// even for non-idempotent requests).
    not_sent: bool,
    detail: String,
    /// Why an upstream TLS handshake was refused (`wrong_identity`, `unknown_ca`, ...).
    tls_reason: Option<&'static str>,
}

impl ErrorKind {
    /// The Envoy response flag for this kind.
    pub fn response_flag(self) -> &'static str {
        match self {
            ErrorKind::NoRoute => "NR",
            ErrorKind::NoCluster => "NC",
            ErrorKind::NoHealthyUpstream => "UH",
            ErrorKind::ConnectFailure => "UF",
            ErrorKind::Overflow => "UO",
            ErrorKind::UpstreamReset | ErrorKind::RefusedStream => "UR",
            ErrorKind::UpstreamTerminated => "UC",
            ErrorKind::Timeout | ErrorKind::PerTryTimeout => "UT",
            ErrorKind::RetriesExhausted => "URX",
            ErrorKind::DownstreamClosed => "DC",
            ErrorKind::FaultAbort => "FI",
            ErrorKind::DownstreamProtocol => "DPE",
            ErrorKind::UpstreamProtocol => "UPE",
            ErrorKind::StreamIdleTimeout => "SI",
            // Envoy's RBAC filters set no response flag (the reason is in
            // `response_code_details`): `-`, as Envoy 1.40 logs a denial.
            ErrorKind::RbacDenied => "-",
        }
    }

    /// Who is to blame.
    pub fn blame(self) -> Blame {
        match self {
            ErrorKind::NoRoute | ErrorKind::NoCluster | ErrorKind::FaultAbort => Blame::Internal,
            ErrorKind::DownstreamClosed | ErrorKind::DownstreamProtocol | ErrorKind::RbacDenied => Blame::Downstream,
            _ => Blame::Upstream,
        }
    }

    /// The HTTP status the proxy answers with for this kind (Envoy's choices).
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::NoRoute => 404,
            ErrorKind::Timeout | ErrorKind::PerTryTimeout | ErrorKind::StreamIdleTimeout => 504,
            ErrorKind::DownstreamProtocol => 400,
            ErrorKind::RbacDenied => 403,
            _ => 503,
        }
    }
}

impl ProxyError {
    /// A new error of `kind` with a human-readable detail.
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        ProxyError { kind, not_sent: false, detail: detail.into(), tls_reason: None }
    }

    /// Records why the upstream TLS handshake was refused.
    pub fn with_tls_reason(mut self, reason: &'static str) -> Self {
        self.tls_reason = Some(reason);
        self
    }

    /// Why the upstream TLS handshake was refused, when that is what failed.
    pub fn tls_reason(&self) -> Option<&'static str> {
        self.tls_reason
    }

    /// Marks that the request never reached the upstream application.
    pub fn not_sent(mut self) -> Self {
        self.not_sent = true;
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// True when the request certainly did not reach the upstream.
    pub fn was_not_sent(&self) -> bool {
        self.not_sent
    }

    /// The detail message.
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.kind.response_flag(), self.kind.http_status(), self.detail)
    }
}

impl std::error::Error for ProxyError {}

/// A configuration resource that could not be compiled. The message names the
/// resource and the field, so it can be sent back as a NACK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {field}: {message}")]
pub struct ConfigError {
    /// The resource name (listener, route configuration, cluster, ...).
    pub resource: String,
    /// The path of the offending field, e.g. `virtual_hosts[0].routes[2].match.safe_regex`.
    pub field: String,
    /// What was wrong and what was expected.
    pub message: String,
}

impl ConfigError {
    /// A new configuration error.
    pub fn new(resource: impl Into<String>, field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { resource: resource.into(), field: field.into(), message: message.into() }
    }
}
