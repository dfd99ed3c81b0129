//! Who may register and receive configuration: every xDS stream is bound to the
//! identity its caller proves ([`XdsAdmission`], the xDS server's
//! [`StreamAdmission`]).
//!
//! The credential is, in order: the client certificate a TLS listener (15012) verified
//! against the mesh's trust bundle; the `authorization: Bearer <token>` metadata of the
//! stream (a join token or a Kubernetes service-account token); for stock Envoy, the
//! join token in its node metadata (`WEFT_JOIN_TOKEN`, what `weft envoy-bootstrap`
//! writes). The node's metadata must then claim exactly the namespace and service
//! account the credential proves (`SERVICE_ACCOUNT` empty means `default`, as in
//! Kubernetes), and its node id must not be registered under another identity. A stream
//! without any credential is refused unless the control plane was started with
//! `--xds-allow-anonymous`; a control plane without identity (the development mode,
//! `weft control --insecure-dev`) has no way to verify anything and lets every stream in
//! (a warning says so at start).
//!
//! Refusals end the stream before the node registers, with `UNAUTHENTICATED` (no or a
//! bad credential), `UNAVAILABLE` (the credential's verifier cannot answer, e.g. the
//! Kubernetes API server's TokenReview) or `PERMISSION_DENIED` (a claim the credential
//! does not prove), a log line naming node, peer and reason, and
//! `weft_xds_refused_streams_total{reason}`.

use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::value::Kind;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tonic::Status;
use weft_identity::channel::TlsPeer;
use weft_identity::service::{CallerCredentials, CertificateAuthority};
use weft_identity::IdentityError;
use weft_xds::{AdmitFuture, Caller, NodeInfo, StreamAdmission};

use crate::registry::{Registry, WorkloadSource};

/// Labels of `weft_xds_refused_streams_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `no_credential`, `bad_credential`, `verifier_unavailable`, `identity_mismatch`,
    /// `node_id_taken`, `bad_metadata`.
    pub reason: &'static str,
}

/// Refused xDS streams, by reason.
pub type RefusedStreams = Family<RefusedLabels, Counter>;

/// The xDS server's admission: binds node metadata to the caller's credential.
pub struct XdsAdmission {
    /// The CA and token issuer (None: identity disabled, every stream admitted).
    authority: Option<Arc<CertificateAuthority>>,
    /// Where node ids are bound to the identity that registered them.
    registry: Registry,
    /// Let streams without any credential in (`--xds-allow-anonymous`).
    allow_anonymous: bool,
    refused: RefusedStreams,
}

impl XdsAdmission {
    /// An admission checking against `authority`'s credentials and `registry`'s node ids.
    pub fn new(
        authority: Option<Arc<CertificateAuthority>>,
        registry: Registry,
        allow_anonymous: bool,
        refused: RefusedStreams,
    ) -> Self {
        XdsAdmission { authority, registry, allow_anonymous, refused }
    }

    fn refuse(&self, node: &Node, peer: Option<SocketAddr>, reason: &'static str, status: Status) -> Status {
        tracing::warn!(node = %node.id, ?peer, reason, error = %status.message(), "xDS stream refused");
        self.refused.get_or_create(&RefusedLabels { reason }).inc();
        status
    }
}

impl StreamAdmission for XdsAdmission {
    fn admit<'a>(&'a self, node: &'a Node, caller: &'a Caller) -> AdmitFuture<'a> {
        Box::pin(self.admit_stream(node, caller))
    }
}

impl XdsAdmission {
    async fn admit_stream(&self, node: &Node, caller: &Caller) -> Result<Option<SocketAddr>, Status> {
        let tls = caller.extensions.get::<TlsPeer>();
        let peer = caller.remote_addr.or(tls.and_then(|t| t.remote_addr));
        let Some(authority) = &self.authority else { return Ok(peer) };
        let authorization = caller
            .metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| node_join_token(node).map(|t| format!("Bearer {t}")));
        let credentials = CallerCredentials { authorization, client_identity: tls.and_then(|t| t.identity.clone()) };
        if credentials.authorization.is_none() && credentials.client_identity.is_none() {
            if self.allow_anonymous {
                return Ok(peer);
            }
            let status = Status::unauthenticated(format!(
                "node {}: no credential: connect to the TLS port (15012) with a client certificate, or send \
                 `authorization: Bearer <join token>` (`weft token create`)",
                node.id
            ));
            return Err(self.refuse(node, peer, "no_credential", status));
        }
        let proven = match authority.authenticate(&credentials).await {
            Ok(a) => a,
            // The verifier could not answer (the Kubernetes API server unreachable): the
            // proxy is told to retry, not that its credential is bad.
            Err(IdentityError::Service { code: tonic::Code::Unavailable, message }) => {
                let status = Status::unavailable(format!("node {}: {message}", node.id));
                return Err(self.refuse(node, peer, "verifier_unavailable", status));
            }
            Err(e) => {
                // Refusals already say "credential refused: ..."; other errors do not.
                let e = e.to_string();
                let e = if e.starts_with("credential refused") { e } else { format!("credential refused: {e}") };
                let status = Status::unauthenticated(format!("node {}: {e}", node.id));
                return Err(self.refuse(node, peer, "bad_credential", status));
            }
        };
        let claimed = match NodeInfo::from_node(node) {
            Ok(info) => info,
            Err(e) => {
                let status = Status::invalid_argument(format!("node {}: {e}", node.id));
                return Err(self.refuse(node, peer, "bad_metadata", status));
            }
        };
        let grant = &proven.grant;
        let claimed_sa = if claimed.service_account.is_empty() { "default" } else { &claimed.service_account };
        if claimed.namespace != grant.namespace || claimed_sa != grant.service_account {
            let status = Status::permission_denied(format!(
                "node {}: its metadata claims namespace {:?}, service account {:?}, but its credential ({}) proves \
                 namespace {:?}, service account {:?}",
                node.id, claimed.namespace, claimed_sa, proven.kind, grant.namespace, grant.service_account
            ));
            return Err(self.refuse(node, peer, "identity_mismatch", status));
        }
        let registered = self.registry.snapshot().get(&node.id).cloned();
        if let Some(w) = registered {
            let proxy = matches!(w.source, WorkloadSource::Proxy | WorkloadSource::Restored);
            let same_sa = if w.service_account.is_empty() { "default" } else { &w.service_account };
            if proxy && (w.namespace != grant.namespace || same_sa != grant.service_account) {
                let status = Status::permission_denied(format!(
                    "node {}: this node id is registered to namespace {:?}, service account {:?}; the credential \
                     proves namespace {:?}, service account {:?}",
                    node.id, w.namespace, same_sa, grant.namespace, grant.service_account
                ));
                return Err(self.refuse(node, peer, "node_id_taken", status));
            }
        }
        tracing::debug!(node = %node.id, credential = proven.kind, namespace = %grant.namespace,
                        service_account = %grant.service_account, "xDS stream admitted");
        Ok(peer)
    }
}

/// The join token a stock Envoy carries in its node metadata (`WEFT_JOIN_TOKEN`).
fn node_join_token(node: &Node) -> Option<&str> {
    match &node.metadata.as_ref()?.fields.get(crate::secrets::JOIN_TOKEN_KEY)?.kind {
        Some(Kind::StringValue(s)) if !s.is_empty() => Some(s),
        _ => None,
    }
}
