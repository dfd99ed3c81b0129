//! `security.istio.io` PeerAuthentication, AuthorizationPolicy, RequestAuthentication
//! (and, re-exported from [`super::telemetry`], `telemetry.istio.io` Telemetry).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::common::{LabelSelector, TargetRef};
pub use super::telemetry::*;

/// mTLS modes of PeerAuthentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the parent (namespace, then mesh).
    Unset,
    /// Plaintext only.
    Disable,
    /// Accept both plaintext and mTLS (the default).
    Permissive,
    /// mTLS only.
    Strict,
}

/// `{mode: ...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MutualTls {
    /// Mode (default UNSET).
    #[serde(default)]
    pub mode: Option<MtlsMode>,
}

/// Istio `PeerAuthentication`: which mTLS mode a workload accepts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    /// Workloads (absent: whole namespace; in the root namespace: whole mesh).
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    /// Mode.
    #[serde(default)]
    pub mtls: Option<MutualTls>,
    /// Per-port modes (port number keys; needs a selector).
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, MutualTls>,
}

/// Authorization action.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthzAction {
    /// Allow matching requests (default).
    #[default]
    Allow,
    /// Deny matching requests.
    Deny,
    /// Audit matching requests.
    Audit,
    /// Delegate to an extension provider.
    Custom,
}

/// Istio `AuthorizationPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    /// Workloads (absent: whole namespace).
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    /// Target reference (instead of selector).
    #[serde(default)]
    pub target_ref: Option<TargetRef>,
    /// Several target references.
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    /// Rules, ORed. For ALLOW: none means allow nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Action (default ALLOW).
    #[serde(default)]
    pub action: AuthzAction,
    /// Extension provider for CUSTOM.
    #[serde(default)]
    pub provider: Option<ExtensionProvider>,
}

/// CUSTOM action provider.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtensionProvider {
    /// Provider name from mesh config.
    pub name: String,
}

/// An authorization rule: from AND to AND when.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Sources (ORed).
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    /// Operations (ORed).
    #[serde(default)]
    pub to: Vec<RuleTo>,
    /// Conditions (ANDed).
    #[serde(default)]
    pub when: Vec<Condition>,
}

/// `from` entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    /// Source.
    pub source: RequestSource,
}

/// Request source attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestSource {
    /// Peer identities (`cluster.local/ns/NS/sa/SA`).
    #[serde(default)]
    pub principals: Vec<String>,
    /// Negated principals.
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// JWT `iss/sub`.
    #[serde(default)]
    pub request_principals: Vec<String>,
    /// Negated request principals.
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    /// Peer namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Negated namespaces.
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// Peer IP blocks.
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    /// Negated IP blocks.
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    /// Client IP blocks (X-Forwarded-For).
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    /// Negated remote IP blocks.
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

/// `to` entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    /// Operation.
    pub operation: Operation,
}

/// Request operation attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// Hosts.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Negated hosts.
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Ports (strings, as Istio spells them).
    #[serde(default)]
    pub ports: Vec<String>,
    /// Negated ports.
    #[serde(default)]
    pub not_ports: Vec<String>,
    /// Methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Negated methods.
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// Paths (exact, `prefix*`, `*suffix`, `*`).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Negated paths.
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// `when` condition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// Attribute, e.g. `request.headers[x-token]`.
    pub key: String,
    /// Accepted values.
    #[serde(default)]
    pub values: Vec<String>,
    /// Rejected values.
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// Istio `RequestAuthentication`: JWT validation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthentication {
    /// Workloads.
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    /// Target reference.
    #[serde(default)]
    pub target_ref: Option<TargetRef>,
    /// Several target references.
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    /// JWT rules.
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
}

/// A JWT issuer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    /// Issuer (`iss`).
    pub issuer: String,
    /// Audiences.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// JWKS URL.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Inline JWKS.
    #[serde(default)]
    pub jwks: Option<String>,
    /// Header locations.
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters.
    #[serde(default)]
    pub from_params: Vec<String>,
    /// Cookies.
    #[serde(default)]
    pub from_cookies: Vec<String>,
    /// Header receiving the payload.
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    /// Keep the token in the request.
    #[serde(default)]
    pub forward_original_token: Option<bool>,
    /// Claims copied to headers.
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// JWKS fetch timeout.
    #[serde(default)]
    pub timeout: Option<super::common::Duration>,
}

/// JWT header location.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtHeader {
    /// Header name.
    pub name: String,
    /// Prefix before the token (e.g. `Bearer `).
    #[serde(default)]
    pub prefix: Option<String>,
}

/// Claim to header.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimToHeader {
    /// Header.
    pub header: String,
    /// Claim.
    pub claim: String,
}
