//! Resource types users write (Istio and Kubernetes kinds), parsing and validation.
//!
//! Input is multi-document YAML or JSON. Every document becomes either a
//! [`Resource`], a [`Skipped`] entry (valid Kubernetes kinds weft does not use,
//! such as `Deployment`), or one or more [`ApiError`]s that name the file, line,
//! column, field path and what was expected. A bad document never blocks the
//! others.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub mod analyze;
pub mod fields;
pub mod host;
mod parse;
pub mod spec;
mod validate;
pub mod yaml;

pub use spec::gateway_api::{
    GatewayClass, GrpcRouteSpec, HttpRouteSpec, KubernetesGateway, ReferenceGrant, TcpRouteSpec, TlsRouteSpec,
};
pub use spec::{
    AuthorizationPolicy, DestinationRule, Gateway, LocalWorkload, PeerAuthentication, RequestAuthentication,
    ServiceEntry, ServiceSpec, Sidecar, Telemetry, VirtualService, WorkloadEntry,
};
pub use spec::{EnvoyFilter, RateLimit, Rollout, SecretSpec, ServiceLevelObjective};

/// Where a resource came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Source {
    /// File the resource was read from.
    pub file: PathBuf,
    /// 1-based line of the document's first key.
    pub line: usize,
}

/// Kubernetes-style object metadata.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObjectMeta {
    /// Name.
    pub name: String,
    /// Namespace, defaulted to `default`.
    pub namespace: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
}

/// The kinds weft understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Kubernetes `Service` (`v1`).
    Service,
    /// `networking.istio.io` VirtualService.
    VirtualService,
    /// `networking.istio.io` DestinationRule.
    DestinationRule,
    /// `networking.istio.io` ServiceEntry.
    ServiceEntry,
    /// `networking.istio.io` WorkloadEntry.
    WorkloadEntry,
    /// `networking.istio.io` Sidecar.
    Sidecar,
    /// `networking.istio.io` Gateway.
    Gateway,
    /// `security.istio.io` PeerAuthentication.
    PeerAuthentication,
    /// `security.istio.io` AuthorizationPolicy.
    AuthorizationPolicy,
    /// `security.istio.io` RequestAuthentication.
    RequestAuthentication,
    /// `telemetry.istio.io` Telemetry.
    Telemetry,
    /// `weft.dev` LocalWorkload.
    LocalWorkload,
    /// `networking.istio.io` EnvoyFilter (the local rate limit patches are applied).
    EnvoyFilter,
    /// `weft.dev` RateLimit.
    RateLimit,
    /// `weft.dev` ServiceLevelObjective.
    ServiceLevelObjective,
    /// `weft.dev` Rollout (a canary driven by the control plane).
    Rollout,
    /// `gateway.networking.k8s.io` GatewayClass.
    GatewayClass,
    /// `gateway.networking.k8s.io` Gateway (Istio calls it `KubernetesGateway`; written
    /// `kind: Gateway`, told from Istio's by its API group).
    KubernetesGateway,
    /// `gateway.networking.k8s.io` HTTPRoute.
    HttpRoute,
    /// `gateway.networking.k8s.io` GRPCRoute.
    GrpcRoute,
    /// `gateway.networking.k8s.io` TCPRoute.
    TcpRoute,
    /// `gateway.networking.k8s.io` TLSRoute.
    TlsRoute,
    /// `gateway.networking.k8s.io` ReferenceGrant.
    ReferenceGrant,
    /// Kubernetes `Secret` (`v1`): TLS material for `credentialName`.
    Secret,
}

/// A typed spec, one variant per [`Kind`].
// Specs are built once per config change and not moved on any hot path, so the
// size difference between variants does not matter; unboxed variants keep
// `match` ergonomic for the translator.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    /// Kubernetes Service.
    Service(ServiceSpec),
    /// VirtualService.
    VirtualService(VirtualService),
    /// DestinationRule.
    DestinationRule(DestinationRule),
    /// ServiceEntry.
    ServiceEntry(ServiceEntry),
    /// WorkloadEntry.
    WorkloadEntry(WorkloadEntry),
    /// Sidecar.
    Sidecar(Sidecar),
    /// Gateway.
    Gateway(Gateway),
    /// PeerAuthentication.
    PeerAuthentication(PeerAuthentication),
    /// AuthorizationPolicy.
    AuthorizationPolicy(AuthorizationPolicy),
    /// RequestAuthentication.
    RequestAuthentication(RequestAuthentication),
    /// Telemetry.
    Telemetry(Telemetry),
    /// LocalWorkload.
    LocalWorkload(LocalWorkload),
    /// EnvoyFilter.
    EnvoyFilter(EnvoyFilter),
    /// RateLimit.
    RateLimit(RateLimit),
    /// ServiceLevelObjective.
    ServiceLevelObjective(ServiceLevelObjective),
    /// Rollout.
    Rollout(Rollout),
    /// Gateway API GatewayClass.
    GatewayClass(GatewayClass),
    /// Gateway API Gateway.
    KubernetesGateway(KubernetesGateway),
    /// Gateway API HTTPRoute.
    HttpRoute(HttpRouteSpec),
    /// Gateway API GRPCRoute.
    GrpcRoute(GrpcRouteSpec),
    /// Gateway API TCPRoute.
    TcpRoute(TcpRouteSpec),
    /// Gateway API TLSRoute.
    TlsRoute(TlsRouteSpec),
    /// Gateway API ReferenceGrant.
    ReferenceGrant(ReferenceGrant),
    /// Secret (its top-level `type`, `data`, `stringData`).
    Secret(SecretSpec),
}

/// One parsed, validated resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// `apiVersion` as written.
    pub api_version: String,
    /// Kind.
    pub kind: Kind,
    /// Metadata.
    pub meta: ObjectMeta,
    /// Typed spec.
    pub spec: Spec,
    /// Where it was read.
    pub source: Source,
}

/// Identity of a resource: kind, namespace, name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceKey {
    /// Kind.
    pub kind: Kind,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// A precise, user-facing error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// File.
    pub file: PathBuf,
    /// 1-based line (0 when the file could not be read).
    pub line: usize,
    /// 1-based column (0 when unknown).
    pub column: usize,
    /// `"VirtualService default/reviews"` when known.
    pub resource: Option<String>,
    /// Field path, e.g. `spec.http[0].route[1].weight` (empty for the whole document).
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// What was expected or what to do, e.g. ``did you mean `weight`?``.
    pub hint: Option<String>,
}

/// A document of a kind weft does not use (Deployment, ConfigMap, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// `apiVersion`.
    pub api_version: String,
    /// `kind`.
    pub kind: String,
    /// `metadata.name` (may be empty).
    pub name: String,
    /// `metadata.namespace`, or the default namespace.
    pub namespace: String,
    /// File the document was read from.
    pub file: PathBuf,
    /// 1-based line of the document.
    pub line: usize,
}

/// The result of parsing one or more files.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parsed {
    /// Valid resources, in file order.
    pub resources: Vec<Resource>,
    /// Errors; a document with any error is not in `resources`.
    pub errors: Vec<ApiError>,
    /// Documents of kinds weft ignores.
    pub skipped: Vec<Skipped>,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 24] = [
        Kind::Service,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::ServiceEntry,
        Kind::WorkloadEntry,
        Kind::Sidecar,
        Kind::Gateway,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
        Kind::RequestAuthentication,
        Kind::Telemetry,
        Kind::LocalWorkload,
        Kind::EnvoyFilter,
        Kind::RateLimit,
        Kind::ServiceLevelObjective,
        Kind::Rollout,
        Kind::GatewayClass,
        Kind::KubernetesGateway,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::TcpRoute,
        Kind::TlsRoute,
        Kind::ReferenceGrant,
        Kind::Secret,
    ];

    /// The kind as written in `kind:`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::Sidecar => "Sidecar",
            Kind::Gateway => "Gateway",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::Telemetry => "Telemetry",
            Kind::LocalWorkload => "LocalWorkload",
            Kind::EnvoyFilter => "EnvoyFilter",
            Kind::RateLimit => "RateLimit",
            Kind::ServiceLevelObjective => "ServiceLevelObjective",
            Kind::Rollout => "Rollout",
            Kind::GatewayClass => "GatewayClass",
            Kind::KubernetesGateway => "Gateway",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::TcpRoute => "TCPRoute",
            Kind::TlsRoute => "TLSRoute",
            Kind::ReferenceGrant => "ReferenceGrant",
            Kind::Secret => "Secret",
        }
    }

    /// A name unique among the kinds: [`Kind::as_str`], except `KubernetesGateway` for the
    /// Gateway API's Gateway (Istio's name for it). Names the kind's maximal file in
    /// `tests/data/fields/` (lower case) and `WEFT_FIELDS_KIND`.
    pub fn id(&self) -> &'static str {
        match self {
            Kind::KubernetesGateway => "KubernetesGateway",
            k => k.as_str(),
        }
    }

    /// Parses a kind case-insensitively, accepting plurals and kubectl short
    /// names (`svc`, `vs`, `dr`, `se`, `we`, `gw`, `pa`, `ap`, `ra`, `lw`, `ef`, `rl`, `ro`).
    pub fn parse(s: &str) -> Option<Kind> {
        let l = s.trim().to_ascii_lowercase();
        let short = match l.as_str() {
            "svc" => Some(Kind::Service),
            "vs" => Some(Kind::VirtualService),
            "dr" => Some(Kind::DestinationRule),
            "se" => Some(Kind::ServiceEntry),
            "we" => Some(Kind::WorkloadEntry),
            "gw" => Some(Kind::Gateway),
            "pa" => Some(Kind::PeerAuthentication),
            "ap" => Some(Kind::AuthorizationPolicy),
            "ra" => Some(Kind::RequestAuthentication),
            "lw" => Some(Kind::LocalWorkload),
            "ef" => Some(Kind::EnvoyFilter),
            "rl" => Some(Kind::RateLimit),
            "slo" => Some(Kind::ServiceLevelObjective),
            "ro" => Some(Kind::Rollout),
            "gtw" | "kubernetesgateway" | "kubernetesgateways" | "gateways.gateway.networking.k8s.io" => {
                Some(Kind::KubernetesGateway)
            }
            "gc" => Some(Kind::GatewayClass),
            _ => None,
        };
        if short.is_some() {
            return short;
        }
        Kind::ALL.into_iter().find(|k| {
            let n = k.as_str().to_ascii_lowercase();
            l == n || l == format!("{n}s") || (n.ends_with('y') && l == format!("{}ies", &n[..n.len() - 1]))
        })
    }

    /// The API group (`""` for core `v1`).
    pub fn group(&self) -> &'static str {
        match self {
            Kind::Service | Kind::Secret => "",
            Kind::VirtualService
            | Kind::DestinationRule
            | Kind::ServiceEntry
            | Kind::WorkloadEntry
            | Kind::Sidecar
            | Kind::Gateway
            | Kind::EnvoyFilter => "networking.istio.io",
            Kind::PeerAuthentication | Kind::AuthorizationPolicy | Kind::RequestAuthentication => "security.istio.io",
            Kind::Telemetry => "telemetry.istio.io",
            Kind::LocalWorkload | Kind::RateLimit | Kind::ServiceLevelObjective | Kind::Rollout => "weft.dev",
            Kind::GatewayClass
            | Kind::KubernetesGateway
            | Kind::HttpRoute
            | Kind::GrpcRoute
            | Kind::TcpRoute
            | Kind::TlsRoute
            | Kind::ReferenceGrant => spec::gateway_api::GROUP,
        }
    }

    /// Versions accepted for this kind.
    pub fn versions(&self) -> &'static [&'static str] {
        // The versions the upstream CRDs serve (standard and experimental channels).
        match self {
            Kind::GatewayClass | Kind::KubernetesGateway | Kind::HttpRoute => return &["v1", "v1beta1", "v1alpha2"],
            Kind::GrpcRoute => return &["v1", "v1alpha2"],
            Kind::TcpRoute => return &["v1", "v1alpha2"],
            Kind::TlsRoute => return &["v1", "v1alpha3", "v1alpha2"],
            Kind::ReferenceGrant => return &["v1", "v1beta1", "v1alpha2"],
            _ => {}
        }
        match self.group() {
            "" => &["v1"],
            "networking.istio.io" => &["v1", "v1beta1", "v1alpha3"],
            "security.istio.io" => &["v1", "v1beta1"],
            "telemetry.istio.io" => &["v1", "v1alpha1"],
            _ => &["v1alpha1"],
        }
    }

    /// Accepted `apiVersion` strings, e.g. `networking.istio.io/v1`.
    pub fn api_versions(&self) -> Vec<String> {
        self.versions()
            .iter()
            .map(|v| if self.group().is_empty() { (*v).to_string() } else { format!("{}/{v}", self.group()) })
            .collect()
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Spec {
    /// The kind of this spec.
    pub fn kind(&self) -> Kind {
        match self {
            Spec::Service(_) => Kind::Service,
            Spec::VirtualService(_) => Kind::VirtualService,
            Spec::DestinationRule(_) => Kind::DestinationRule,
            Spec::ServiceEntry(_) => Kind::ServiceEntry,
            Spec::WorkloadEntry(_) => Kind::WorkloadEntry,
            Spec::Sidecar(_) => Kind::Sidecar,
            Spec::Gateway(_) => Kind::Gateway,
            Spec::PeerAuthentication(_) => Kind::PeerAuthentication,
            Spec::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Spec::RequestAuthentication(_) => Kind::RequestAuthentication,
            Spec::Telemetry(_) => Kind::Telemetry,
            Spec::LocalWorkload(_) => Kind::LocalWorkload,
            Spec::EnvoyFilter(_) => Kind::EnvoyFilter,
            Spec::RateLimit(_) => Kind::RateLimit,
            Spec::ServiceLevelObjective(_) => Kind::ServiceLevelObjective,
            Spec::Rollout(_) => Kind::Rollout,
            Spec::GatewayClass(_) => Kind::GatewayClass,
            Spec::KubernetesGateway(_) => Kind::KubernetesGateway,
            Spec::HttpRoute(_) => Kind::HttpRoute,
            Spec::GrpcRoute(_) => Kind::GrpcRoute,
            Spec::TcpRoute(_) => Kind::TcpRoute,
            Spec::TlsRoute(_) => Kind::TlsRoute,
            Spec::ReferenceGrant(_) => Kind::ReferenceGrant,
            Spec::Secret(_) => Kind::Secret,
        }
    }
}

impl Spec {
    /// The spec as JSON, every field written out (unset ones as `null` or empty): what
    /// the field-coverage test compares with the YAML it was read from.
    pub fn to_json(&self) -> serde_json::Value {
        let v = match self {
            Spec::Service(s) => serde_json::to_value(s),
            Spec::VirtualService(s) => serde_json::to_value(s),
            Spec::DestinationRule(s) => serde_json::to_value(s),
            Spec::ServiceEntry(s) => serde_json::to_value(s),
            Spec::WorkloadEntry(s) => serde_json::to_value(s),
            Spec::Sidecar(s) => serde_json::to_value(s),
            Spec::Gateway(s) => serde_json::to_value(s),
            Spec::PeerAuthentication(s) => serde_json::to_value(s),
            Spec::AuthorizationPolicy(s) => serde_json::to_value(s),
            Spec::RequestAuthentication(s) => serde_json::to_value(s),
            Spec::Telemetry(s) => serde_json::to_value(s),
            Spec::LocalWorkload(s) => serde_json::to_value(s),
            Spec::EnvoyFilter(s) => serde_json::to_value(s),
            Spec::RateLimit(s) => serde_json::to_value(s),
            Spec::ServiceLevelObjective(s) => serde_json::to_value(s),
            Spec::Rollout(s) => serde_json::to_value(s),
            Spec::GatewayClass(s) => serde_json::to_value(s),
            Spec::KubernetesGateway(s) => serde_json::to_value(s),
            Spec::HttpRoute(s) => serde_json::to_value(s),
            Spec::GrpcRoute(s) => serde_json::to_value(s),
            Spec::TcpRoute(s) => serde_json::to_value(s),
            Spec::TlsRoute(s) => serde_json::to_value(s),
            Spec::ReferenceGrant(s) => serde_json::to_value(s),
            Spec::Secret(s) => serde_json::to_value(s),
        };
        // Every spec type serializes to a JSON object (string keys, finite numbers).
        v.unwrap_or_default()
    }
}

impl Resource {
    /// `(kind, namespace, name)`.
    pub fn key(&self) -> ResourceKey {
        ResourceKey { kind: self.kind, namespace: self.meta.namespace.clone(), name: self.meta.name.clone() }
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if let Some(r) = &self.resource {
            write!(f, "{r}: ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " ({h})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

impl Parsed {
    /// Appends another result.
    pub fn extend(&mut self, other: Parsed) {
        self.resources.extend(other.resources);
        self.errors.extend(other.errors);
        self.skipped.extend(other.skipped);
    }
}

/// Parses YAML (multi-document, `---`) or JSON (an object, or a `List` with `items`).
pub fn parse_str(text: &str, file: &Path) -> Parsed {
    parse::parse_text(text, file, "default")
}

/// Like [`parse_str`], but documents without `metadata.namespace` land in
/// `namespace` instead of `default` (what `kubectl apply -n NS` does).
pub fn parse_str_in(text: &str, file: &Path, namespace: &str) -> Parsed {
    parse::parse_text(text, file, namespace)
}

/// Reads and parses one file; a read error becomes one [`ApiError`] with line 0.
pub fn parse_file(path: &Path) -> Parsed {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_str(&text, path),
        Err(e) => Parsed {
            errors: vec![ApiError {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                resource: None,
                field: String::new(),
                message: format!("cannot read file: {e}"),
                hint: None,
            }],
            ..Parsed::default()
        },
    }
}

/// Parses every `*.yaml`, `*.yml` and `*.json` under `dir`, recursively, in
/// sorted path order. Duplicates are only rejected within one file: the same
/// resource in two files (alternative versions, as in Istio's samples) is
/// returned twice, and the caller (the config store) decides which wins.
pub fn parse_dir(dir: &Path) -> Parsed {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    collect_files(dir, &mut files, &mut errors);
    files.sort();
    let mut all = Parsed { errors, ..Parsed::default() };
    for f in files {
        all.extend(parse_file(&f));
    }
    all
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>, errors: &mut Vec<ApiError>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push(ApiError {
                file: dir.to_path_buf(),
                line: 0,
                column: 0,
                resource: None,
                field: String::new(),
                message: format!("cannot read directory: {e}"),
                hint: None,
            });
            return;
        }
    };
    for entry in entries.flatten() {
        let p = entry.path();
        if p.is_dir() {
            collect_files(&p, out, errors);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
            out.push(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_parse_accepts_plural_short_and_any_case() {
        assert_eq!(Kind::parse("vs"), Some(Kind::VirtualService));
        assert_eq!(Kind::parse("DestinationRules"), Some(Kind::DestinationRule));
        assert_eq!(Kind::parse("authorizationpolicies"), Some(Kind::AuthorizationPolicy));
        assert_eq!(Kind::parse("SVC"), Some(Kind::Service));
        assert_eq!(Kind::parse("deployment"), None);
        for k in Kind::ALL.into_iter().filter(|k| *k != Kind::KubernetesGateway) {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Kind::parse("gateway"), Some(Kind::Gateway), "Istio's Gateway keeps its name");
        assert_eq!(Kind::parse("gtw"), Some(Kind::KubernetesGateway));
        assert_eq!(Kind::parse("httproutes"), Some(Kind::HttpRoute));
    }

    #[test]
    fn error_display_has_file_line_resource_field_and_hint() {
        let e = ApiError {
            file: "a.yaml".into(),
            line: 7,
            column: 9,
            resource: Some("VirtualService default/reviews".into()),
            field: "spec.http[0].route[0].wieght".into(),
            message: "unknown field `wieght`".into(),
            hint: Some("did you mean `weight`?".into()),
        };
        assert_eq!(
            e.to_string(),
            "a.yaml:7:9: VirtualService default/reviews: spec.http[0].route[0].wieght: unknown field `wieght` (did you mean `weight`?)"
        );
    }
}
