//! The translator: Istio resources + workload registry -> the xDS one proxy needs.
//!
//! [`translate`] is pure and deterministic: the same inputs give byte-identical
//! output, every list sorted by resource name, so a push can be diffed against the
//! previous one. The stages, in the order a request meets them:
//!
//! - [`model`]: the services the proxy may see (Kubernetes `Service`s and
//!   `ServiceEntry` hosts, scoped by `exportTo` and the proxy's `Sidecar`) and the
//!   endpoints behind each port;
//! - [`listeners`]: explicit (`weft-outbound` HTTP proxy, `inbound|PORT`, Sidecar
//!   egress `bind`) or transparent (`virtualOutbound`, `0.0.0.0_PORT`, `virtualInbound`);
//! - [`routes`]: one RouteConfiguration per outbound port plus `weft-outbound`,
//!   VirtualService rules compiled to Envoy routes;
//! - [`clusters`]: `outbound|PORT|SUBSET|FQDN` clusters with DestinationRule policy and
//!   their ClusterLoadAssignments;
//! - [`on_demand`]: for proxies announcing `WEFT_ON_DEMAND`, virtual hosts moved out of
//!   the route configurations into VHDS resources (`<route configuration>/<vhost>`).
//! - [`authz`]: AuthorizationPolicies selecting the proxy as RBAC filters on its inbound
//!   listeners.
//! - [`jwt`]: RequestAuthentications selecting the proxy as the JWT filter before them.
//! - [`ratelimit`]: the local rate limit filter and its per-route configurations, from
//!   Istio's EnvoyFilter form and weft's `RateLimit`, over what the stages above built.
//! - [`tracing`]: last, over what the others built: the effective Telemetry tracing
//!   as `HttpConnectionManager.tracing`, route decorators and the collector's cluster.
//! - [`gateway`]: for gateway proxies (node id `router~...`) instead of [`routes`] and
//!   [`listeners`]: the servers of the Gateways selecting the proxy as `0.0.0.0_PORT`
//!   listeners and the VirtualServices bound to them as `http.PORT` routes.
//! - [`grpcgen`]: for proxyless gRPC clients (applied by the xDS source, which sees the
//!   node), the same translation reshaped as gRPC's xDS client reads it: `api_listener`
//!   Listeners per service name and port, one RouteConfiguration per service port.
//! - [`peer_exchange`]: for stock Envoy sidecars (applied by the xDS source, which sees
//!   the node's `user_agent_name`), Istio's peer metadata headers as route header edits.
//!
//! Endpoint addresses: in [`ProxyMode::Transparent`] an endpoint is the workload's
//! address and the service's target port (the peer's iptables capture it). In
//! [`ProxyMode::Explicit`] nothing captures traffic, so an endpoint is the peer
//! sidecar's inbound listener: the workload's `WEFT_INBOUND` address serves the
//! workload's first declared port, and its `i`-th declared port is served at
//! `WEFT_INBOUND` port + `i` (the same rule builds the `inbound|PORT` listeners of
//! the proxy itself). A workload without `WEFT_INBOUND` is reached directly at its
//! address and target port.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;
use weft_xds::{type_url, NodeInfo};

use crate::registry::RegistrySnapshot;

pub mod authz;
pub mod clusters;
pub mod credentials;
pub mod gateway;
pub mod grpcgen;
pub mod jwt;
pub mod listeners;
pub mod locality;
pub mod model;
pub mod mtls;
pub mod on_demand;
pub mod peer_exchange;
pub mod ratelimit;
pub mod routes;
pub mod tracing;

#[cfg(test)]
mod tests;

/// Name of the explicit HTTP-proxy listener and of its RouteConfiguration.
pub const OUTBOUND: &str = "weft-outbound";
/// Cluster that forwards to the original destination (transparent, ALLOW_ANY).
pub const PASSTHROUGH: &str = "PassthroughCluster";
/// Cluster without endpoints (transparent, REGISTRY_ONLY).
pub const BLACKHOLE: &str = "BlackHoleCluster";
/// Cluster that forwards inbound traffic on ports no Service declares.
pub const INBOUND_PASSTHROUGH: &str = "InboundPassthroughCluster";

/// Everything the translator reads besides the registry.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// The mesh's resources (any kinds; those the translator does not use are ignored).
    pub resources: Vec<weft_api::Resource>,
    /// DNS domain of the mesh, `cluster.local`.
    pub domain: String,
    /// SPIFFE trust domain of workload identities, `cluster.local`.
    pub trust_domain: String,
    /// Namespace whose Sidecar and DestinationRules apply mesh-wide, `istio-system`.
    pub root_namespace: String,
    /// What happens to traffic for hosts the registry does not know.
    pub outbound_policy: OutboundPolicy,
    /// Where the explicit HTTP-proxy listener binds (Istio's port: `127.0.0.1:15001`;
    /// tests use port 0).
    pub explicit_outbound: SocketAddr,
    /// JWKS documents fetched by the control plane, by `jwksUri` (RequestAuthentication
    /// keys are inlined from here; a missing URI gets keys no token matches).
    pub jwks: BTreeMap<String, String>,
    /// Tracing providers and defaults from Istio's MeshConfig (`--mesh-config`,
    /// `weft up --tracing`); the default: no provider, tracing off.
    pub tracing: crate::meshconfig::MeshTracing,
}

/// Istio's `outboundTrafficPolicy.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutboundPolicy {
    /// Unknown destinations are forwarded as they are (Istio's default).
    #[default]
    AllowAny,
    /// Only services in the registry are reachable.
    RegistryOnly,
}

/// How the proxy receives traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Applications use the proxy as an HTTP proxy or bound ports; no capture.
    Explicit,
    /// iptables redirects traffic to 15001 (outbound) and 15006 (inbound).
    Transparent,
}

/// The xDS resources for one proxy, each list sorted by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProxyXds {
    /// LDS.
    pub listeners: Vec<Listener>,
    /// RDS.
    pub routes: Vec<RouteConfiguration>,
    /// CDS.
    pub clusters: Vec<Cluster>,
    /// EDS.
    pub endpoints: Vec<ClusterLoadAssignment>,
    /// VHDS (on-demand proxies only): virtual hosts named `<route configuration>/<vhost>`.
    pub virtual_hosts: Vec<VirtualHost>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            resources: Vec::new(),
            domain: "cluster.local".into(),
            trust_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            outbound_policy: OutboundPolicy::AllowAny,
            explicit_outbound: SocketAddr::from(([127, 0, 0, 1], 15001)),
            jwks: BTreeMap::new(),
            tracing: Default::default(),
        }
    }
}

impl ProxyXds {
    /// The resources packed as `Any`, keyed by type URL (LDS, RDS, CDS and EDS always
    /// present; VHDS when there are virtual hosts to serve on demand).
    pub fn into_resources(self) -> BTreeMap<&'static str, Vec<Any>> {
        let mut out = BTreeMap::new();
        if !self.virtual_hosts.is_empty() {
            out.insert(type_url::VIRTUAL_HOST, self.virtual_hosts.into_iter().map(pack_any).collect());
        }
        out.insert(type_url::LISTENER, self.listeners.into_iter().map(pack_any).collect());
        out.insert(type_url::ROUTE, self.routes.into_iter().map(pack_any).collect());
        out.insert(type_url::CLUSTER, self.clusters.into_iter().map(pack_any).collect());
        out.insert(type_url::ENDPOINT, self.endpoints.into_iter().map(pack_any).collect());
        out
    }

    /// The cluster named `name`.
    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.name == name)
    }

    /// The RouteConfiguration named `name`.
    pub fn route(&self, name: &str) -> Option<&RouteConfiguration> {
        self.routes.iter().find(|r| r.name == name)
    }

    /// The listener named `name`.
    pub fn listener(&self, name: &str) -> Option<&Listener> {
        self.listeners.iter().find(|l| l.name == name)
    }

    /// The ClusterLoadAssignment of cluster `name`.
    pub fn endpoints_of(&self, name: &str) -> Option<&ClusterLoadAssignment> {
        self.endpoints.iter().find(|c| c.cluster_name == name)
    }
}

/// Compiles the mesh for the proxy `node` (looked up in `registry` by its id for its
/// own inbound address); a node announcing `on_demand` gets VHDS output; a gateway
/// (`router~` node id) gets gateway listeners and the clusters, no sidecar listeners. Never fails: resources that cannot be honoured are skipped
/// (validation already rejected malformed ones), so one bad rule never blocks a push.
pub fn translate(mesh: &MeshConfig, registry: &RegistrySnapshot, node: &NodeInfo, mode: ProxyMode) -> ProxyXds {
    // Gateway API objects become Istio Gateways and VirtualServices first (`gwapi`).
    let expanded = crate::gwapi::present(&mesh.resources).then(|| {
        let mut resources = mesh.resources.clone();
        resources.extend(crate::gwapi::convert(&mesh.resources, &mesh.domain).resources);
        MeshConfig { resources, ..mesh.clone() }
    });
    let mesh = expanded.as_ref().unwrap_or(mesh);
    let view = model::MeshView::new(mesh, registry, node);
    let mut out = ProxyXds::default();
    clusters::build(&view, mode, &mut out);
    if node.is_gateway() {
        gateway::build(&view, &mut out);
    } else {
        routes::build(&view, mode, &mut out);
        listeners::build(&view, mode, &mut out);
    }
    ratelimit::apply(&view, &mut out);
    tracing::apply(&view, mode, &mut out);
    out.listeners.sort_by(|a, b| a.name.cmp(&b.name));
    out.routes.sort_by(|a, b| a.name.cmp(&b.name));
    out.clusters.sort_by(|a, b| a.name.cmp(&b.name));
    out.clusters.dedup_by(|a, b| a.name == b.name);
    out.endpoints.sort_by(|a, b| a.cluster_name.cmp(&b.cluster_name));
    out.endpoints.dedup_by(|a, b| a.cluster_name == b.cluster_name);
    if node.on_demand {
        on_demand::split(&mut out);
    }
    out
}
