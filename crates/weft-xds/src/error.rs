//! The crate's error type.

use std::time::Duration;

/// Errors of the xDS transport.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    /// The gRPC transport failed (bind, connect, serve).
    #[error("xDS transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The peer ended the stream with a gRPC status.
    #[error("xDS stream failed: {0}")]
    Status(#[from] tonic::Status),
    /// A resource could not be decoded or named.
    #[error("invalid xDS resource: {0}")]
    InvalidResource(String),
    /// The stream ended or a channel closed.
    #[error("xDS stream closed: {0}")]
    Closed(String),
    /// A wait for an ACK did not complete in time.
    #[error("timed out after {timeout:?} waiting for node {node_id} to ACK {type_url} version {version}")]
    Timeout {
        /// Node id waited on.
        node_id: String,
        /// Type waited on.
        type_url: String,
        /// Version waited for.
        version: String,
        /// How long the wait lasted.
        timeout: Duration,
    },
}
