//! Kubernetes Gateway API (`gateway.networking.k8s.io`): Gateway, GatewayClass, HTTPRoute,
//! GRPCRoute, TCPRoute, TLSRoute and ReferenceGrant, field names as the upstream CRDs
//! spell them. The control plane converts them into Istio Gateways and VirtualServices
//! the way Istio does (`weft-control::gwapi`); fields weft does not support are refused
//! as unknown fields rather than accepted and ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::common::Duration;

/// The API group.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// Istio's Gateway API controller, the one weft implements.
pub const CONTROLLER: &str = "istio.io/gateway-controller";
/// The GatewayClass Istio installs (`gatewayClassName: istio`), known without a resource.
pub const ISTIO_CLASS: &str = "istio";

/// `GatewayClass`: which controller serves the Gateways of a class.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayClass {
    /// `istio.io/gateway-controller` for weft (Istio's); any other is not served.
    pub controller_name: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
}

/// Gateway API `Gateway` (Istio's `KubernetesGateway`): listeners on a gateway proxy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesGateway {
    /// The GatewayClass (`istio`, or a GatewayClass whose controller is Istio's).
    pub gateway_class_name: String,
    /// Listeners.
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Addresses: a `Hostname` naming a gateway Service (Istio's manual deployment).
    #[serde(default)]
    pub addresses: Vec<GatewayAddress>,
}

/// `spec.addresses[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayAddress {
    /// `IPAddress` (default) or `Hostname`.
    #[serde(default, rename = "type")]
    pub address_type: Option<String>,
    /// The address.
    pub value: String,
}

/// One listener.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    /// Name, unique in the Gateway (`sectionName` of routes).
    pub name: String,
    /// Hostname (may start with `*.`); unset: any.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Port.
    pub port: u32,
    /// `HTTP`, `HTTPS`, `TLS` or `TCP`.
    pub protocol: String,
    /// TLS settings (HTTPS and TLS).
    #[serde(default)]
    pub tls: Option<GatewayTlsConfig>,
    /// Which routes may attach.
    #[serde(default)]
    pub allowed_routes: Option<AllowedRoutes>,
}

/// `listeners[].tls`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayTlsConfig {
    /// `Terminate` (default) or `Passthrough`.
    #[serde(default)]
    pub mode: Option<TlsModeType>,
    /// Secrets holding the certificate (the first is used, as Istio does).
    #[serde(default)]
    pub certificate_refs: Vec<SecretObjectReference>,
}

/// TLS mode of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsModeType {
    /// TLS terminated at the gateway.
    Terminate,
    /// TLS passed through, routed by SNI.
    Passthrough,
}

/// A reference to a Secret (`certificateRefs[]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretObjectReference {
    /// `""` (core).
    #[serde(default)]
    pub group: Option<String>,
    /// `Secret`.
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace (default: the Gateway's; another needs a ReferenceGrant).
    #[serde(default)]
    pub namespace: Option<String>,
}

/// `allowedRoutes`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllowedRoutes {
    /// Namespaces routes may come from (default `Same`).
    #[serde(default)]
    pub namespaces: Option<RouteNamespaces>,
    /// Route kinds (default: those the protocol supports).
    #[serde(default)]
    pub kinds: Vec<RouteGroupKind>,
}

/// `allowedRoutes.namespaces`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteNamespaces {
    /// `All`, `Same` (default) or `Selector`.
    #[serde(default)]
    pub from: Option<FromNamespaces>,
    /// Namespace labels, for `Selector`.
    #[serde(default)]
    pub selector: Option<NamespaceSelector>,
}

/// Where routes may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromNamespaces {
    /// Any namespace.
    All,
    /// The Gateway's namespace.
    Same,
    /// Namespaces whose labels match `selector`.
    Selector,
}

/// A Kubernetes label selector over namespaces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSelector {
    /// Labels the namespace must carry.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// `{group, kind}` of a route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteGroupKind {
    /// Group (default `gateway.networking.k8s.io`).
    #[serde(default)]
    pub group: Option<String>,
    /// Kind: `HTTPRoute`, `GRPCRoute`, `TCPRoute`, `TLSRoute`.
    pub kind: String,
}

/// A route's parent: a Gateway (ingress) or a Service (GAMMA mesh routing).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentReference {
    /// `gateway.networking.k8s.io` (default) or `""` for a Service.
    #[serde(default)]
    pub group: Option<String>,
    /// `Gateway` (default) or `Service`.
    #[serde(default)]
    pub kind: Option<String>,
    /// Namespace (default: the route's).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// A listener's name.
    #[serde(default)]
    pub section_name: Option<String>,
    /// A listener's port (Gateway) or the Service port.
    #[serde(default)]
    pub port: Option<u32>,
}

/// A backend: a Service (core) port, with a weight.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    /// `""` (core).
    #[serde(default)]
    pub group: Option<String>,
    /// `Service` (default).
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace (default: the route's; another needs a ReferenceGrant).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Service port (required for Services).
    #[serde(default)]
    pub port: Option<u32>,
    /// Share of the rule's traffic (default 1).
    #[serde(default)]
    pub weight: Option<u32>,
}

/// A backend without a weight (`requestMirror.backendRef`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendObjectReference {
    /// `""` (core).
    #[serde(default)]
    pub group: Option<String>,
    /// `Service` (default).
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace (default: the route's).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Service port.
    #[serde(default)]
    pub port: Option<u32>,
}

/// Gateway API `HTTPRoute`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    /// Gateways or Services the route attaches to.
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// Host names (may start with `*.`); empty: the listeners'.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules (default: one rule matching `/` with no backends).
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

/// One HTTPRoute rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    /// Rule name.
    #[serde(default)]
    pub name: Option<String>,
    /// Matches, ORed (default: prefix `/`).
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    /// Filters, in order.
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Option<HttpRouteTimeouts>,
}

/// `matches[]` (all conditions must hold).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteMatch {
    /// Path (default `PathPrefix /`).
    #[serde(default)]
    pub path: Option<HttpPathMatch>,
    /// Header matches.
    #[serde(default)]
    pub headers: Vec<HttpHeaderMatch>,
    /// Query parameter matches.
    #[serde(default)]
    pub query_params: Vec<HttpHeaderMatch>,
    /// Method, e.g. `GET`.
    #[serde(default)]
    pub method: Option<String>,
}

/// `matches[].path`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPathMatch {
    /// `Exact`, `PathPrefix` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub match_type: Option<PathMatchType>,
    /// The path (default `/`).
    #[serde(default)]
    pub value: Option<String>,
}

/// Path match types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathMatchType {
    /// The whole path.
    Exact,
    /// Path segments prefix (`/foo` matches `/foo` and `/foo/bar`, not `/foobar`).
    PathPrefix,
    /// RE2 over the whole path.
    RegularExpression,
}

/// A header or query parameter match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeaderMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub match_type: Option<ValueMatchType>,
    /// Name (headers: case-insensitive).
    pub name: String,
    /// Value.
    pub value: String,
}

/// Header and query parameter match types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueMatchType {
    /// Equal.
    Exact,
    /// RE2 over the whole value.
    RegularExpression,
}

/// A filter of a rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteFilter {
    /// Which filter; its field must be set.
    #[serde(rename = "type")]
    pub filter_type: String,
    /// `RequestHeaderModifier`.
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    /// `ResponseHeaderModifier`.
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
    /// `RequestRedirect`.
    #[serde(default)]
    pub request_redirect: Option<RequestRedirect>,
    /// `URLRewrite`.
    #[serde(default)]
    pub url_rewrite: Option<UrlRewrite>,
    /// `RequestMirror`.
    #[serde(default)]
    pub request_mirror: Option<RequestMirror>,
}

/// A filter of a GRPCRoute rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteFilter {
    /// Which filter; its field must be set.
    #[serde(rename = "type")]
    pub filter_type: String,
    /// `RequestHeaderModifier`.
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    /// `ResponseHeaderModifier`.
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
    /// `RequestMirror`.
    #[serde(default)]
    pub request_mirror: Option<RequestMirror>,
}

impl From<&GrpcRouteFilter> for HttpRouteFilter {
    fn from(f: &GrpcRouteFilter) -> HttpRouteFilter {
        HttpRouteFilter {
            filter_type: f.filter_type.clone(),
            request_header_modifier: f.request_header_modifier.clone(),
            response_header_modifier: f.response_header_modifier.clone(),
            request_mirror: f.request_mirror.clone(),
            ..HttpRouteFilter::default()
        }
    }
}

/// Set, add and remove headers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    /// Overwrite.
    #[serde(default)]
    pub set: Vec<HttpHeader>,
    /// Append.
    #[serde(default)]
    pub add: Vec<HttpHeader>,
    /// Remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeader {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// `RequestRedirect`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRedirect {
    /// `http` or `https`.
    #[serde(default)]
    pub scheme: Option<String>,
    /// Host name.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Path replacement.
    #[serde(default)]
    pub path: Option<PathModifier>,
    /// Port.
    #[serde(default)]
    pub port: Option<u32>,
    /// 301 or 302 (default 302); 303, 307, 308 also accepted.
    #[serde(default)]
    pub status_code: Option<u32>,
}

/// `URLRewrite`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewrite {
    /// Host header replacement.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Path replacement.
    #[serde(default)]
    pub path: Option<PathModifier>,
}

/// A path replacement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub modifier_type: PathModifierType,
    /// For `ReplaceFullPath`.
    #[serde(default)]
    pub replace_full_path: Option<String>,
    /// For `ReplacePrefixMatch`.
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

/// Path modifier types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathModifierType {
    /// Replace the whole path.
    ReplaceFullPath,
    /// Replace the matched `PathPrefix`.
    ReplacePrefixMatch,
}

/// `RequestMirror`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMirror {
    /// Where copies go.
    pub backend_ref: BackendObjectReference,
    /// Percentage of requests mirrored (default 100).
    #[serde(default)]
    pub percent: Option<u32>,
}

/// `timeouts`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteTimeouts {
    /// Whole request (`0s`: none).
    #[serde(default)]
    pub request: Option<Duration>,
    /// One request to a backend (`0s`: none).
    #[serde(default)]
    pub backend_request: Option<Duration>,
}

/// Gateway API `GRPCRoute`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteSpec {
    /// Gateways or Services the route attaches to.
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// Host names.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules.
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

/// One GRPCRoute rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteRule {
    /// Matches, ORed (default: every method).
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    /// Filters (`RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestMirror`).
    #[serde(default)]
    pub filters: Vec<GrpcRouteFilter>,
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

/// `matches[]` of a GRPCRoute.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteMatch {
    /// Service and method.
    #[serde(default)]
    pub method: Option<GrpcMethodMatch>,
    /// Header (metadata) matches.
    #[serde(default)]
    pub headers: Vec<HttpHeaderMatch>,
}

/// `matches[].method`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMethodMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub match_type: Option<ValueMatchType>,
    /// Fully qualified service, e.g. `echo.Echo`.
    #[serde(default)]
    pub service: Option<String>,
    /// Method, e.g. `Unary`.
    #[serde(default)]
    pub method: Option<String>,
}

/// Gateway API `TCPRoute` (v1alpha2).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRouteSpec {
    /// Gateways the route attaches to.
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// Rules (Istio uses the first).
    #[serde(default)]
    pub rules: Vec<L4RouteRule>,
}

/// Gateway API `TLSRoute`: routed by SNI.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsRouteSpec {
    /// Gateways the route attaches to.
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// SNI host names.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules (Istio uses the first).
    #[serde(default)]
    pub rules: Vec<L4RouteRule>,
}

/// A TCPRoute or TLSRoute rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4RouteRule {
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

/// Gateway API `ReferenceGrant`: lets objects of other namespaces refer into this one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReferenceGrant {
    /// Who may refer.
    #[serde(default)]
    pub from: Vec<ReferenceGrantFrom>,
    /// To what.
    #[serde(default)]
    pub to: Vec<ReferenceGrantTo>,
}

/// `from[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReferenceGrantFrom {
    /// Group of the referring kind.
    pub group: String,
    /// Referring kind (`HTTPRoute`, `Gateway`, ...).
    pub kind: String,
    /// Its namespace.
    pub namespace: String,
}

/// `to[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReferenceGrantTo {
    /// Group of the referred kind (`""` for Service and Secret).
    pub group: String,
    /// Referred kind.
    pub kind: String,
    /// One object only, when set.
    #[serde(default)]
    pub name: Option<String>,
}

impl ParentReference {
    /// Whether the parent is a Service (GAMMA mesh routing).
    pub fn is_service(&self) -> bool {
        self.kind.as_deref() == Some("Service") && matches!(self.group.as_deref(), Some("") | Some("core") | None)
    }

    /// Whether the parent is a Gateway API Gateway.
    pub fn is_gateway(&self) -> bool {
        self.kind.as_deref().is_none_or(|k| k == "Gateway") && self.group.as_deref().is_none_or(|g| g == GROUP)
    }
}
