//! Ingress gateways: Istio `Gateway` servers and the VirtualServices bound to them, for
//! proxies whose node id starts with `router~`.
//!
//! - The Gateways whose `selector` matches the proxy's labels (any namespace) are merged
//!   by server port. Per port one listener named `0.0.0.0_<port>` (`<bind>_<port>` for
//!   a server `bind`), bound at the node's `WEFT_GATEWAY_ADDRESS` (default `0.0.0.0`) and
//!   the port `WEFT_GATEWAY_PORTS` maps the server port to (default: the same).
//! - HTTP/HTTP2/GRPC servers share one HCM with RDS `http.<port>`; each HTTPS server
//!   that terminates TLS gets a filter chain (SNI = its hosts) with RDS
//!   `https.<port>.<port name>.<gateway>.<namespace>` (Istio's names).
//! - Virtual hosts come from VirtualServices whose `gateways` name a Gateway serving the
//!   port, restricted to the hosts its server allows (`ns/host`, `./host`, `*`), one per
//!   host (`<host>:<port>`, routes of several VirtualServices concatenated in resource
//!   order), compiled by [`super::routes::http_routes`]. `httpsRedirect` sets
//!   `require_tls: ALL`. Ports are ignored in host matching (the gateway may listen on a
//!   mapped port). No match: 404.
//! - TCP servers: `tcp_proxy` to the first applicable `tcp` route; TLS `PASSTHROUGH`:
//!   one chain per `tls` route match (SNI) with `tcp_proxy`; TLS servers terminating
//!   TLS: `tcp` routes behind the TLS chain.
//! - TLS termination: `serverCertificate`/`privateKey` (and `caCertificates` for
//!   MUTUAL) as files, `ISTIO_MUTUAL` with the mesh certificate (SDS `default`/
//!   `ROOTCA`), or `credentialName(s)`: Kubernetes Secrets fetched over SDS by name
//!   ([`super::credentials`]); a credential wins over files, as in Istio.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use envoy_types::pb::envoy::config::core::v3::{
    data_source, transport_socket, DataSource, TrafficDirection, TransportSocket,
};
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, FilterChainMatch, Listener};
use envoy_types::pb::envoy::config::route::v3::{virtual_host, Route, RouteConfiguration, VirtualHost};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context, CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, TlsCertificate,
};
use envoy_types::pb::google::protobuf::BoolValue;
use envoy_types::util::pack_any;
use weft_api::spec::{RouteDestination, Server, ServerTlsMode, ServerTlsSettings};
use weft_api::{host, ObjectMeta, VirtualService};
use weft_xds::build::{self, Routes};

use super::listeners::{tcp_destinations, tcp_filter, tcp_listener};
use super::model::MeshView;
use super::routes::{gateway_key, http_routes, RouteScope};
use super::{mtls, ProxyXds};

/// What a server does with a connection (Istio's server classes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerKind {
    /// Plaintext HTTP, HTTP/2 or gRPC.
    Http,
    /// HTTPS terminated here, then HTTP routing.
    HttpsTerminate,
    /// TLS passed through, routed by SNI with `tls` routes.
    TlsPassthrough,
    /// TLS terminated here, then `tcp` routes.
    TlsTerminate,
    /// Opaque TCP with `tcp` routes.
    Tcp,
}

/// Servers that can share a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Http,
    Tls,
    Tcp,
}

/// One server of a Gateway that selects the proxy.
struct BoundServer<'a> {
    /// `ns/name` of its Gateway.
    gateway: String,
    meta: &'a ObjectMeta,
    server: &'a Server,
    kind: ServerKind,
}

/// One virtual host being assembled.
#[derive(Default)]
struct Vhost {
    routes: Vec<Route>,
    /// VirtualServices (by index) whose routes are in already.
    from: BTreeSet<usize>,
    require_tls: bool,
}

impl ServerKind {
    /// The class of a server by protocol and TLS mode (Istio: an unset mode is
    /// PASSTHROUGH); `None` for what a gateway does not serve (UDP, AUTO_PASSTHROUGH).
    fn of(s: &Server) -> Option<ServerKind> {
        let proto = s.port.protocol.as_deref().unwrap_or("").to_ascii_uppercase();
        let mode = s.tls.as_ref().and_then(|t| t.mode).unwrap_or(ServerTlsMode::Passthrough);
        let terminates = matches!(
            mode,
            ServerTlsMode::Simple | ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual | ServerTlsMode::IstioMutual
        );
        match proto.as_str() {
            "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB" => Some(ServerKind::Http),
            "HTTPS" if terminates => Some(ServerKind::HttpsTerminate),
            "HTTPS" | "TLS" if mode == ServerTlsMode::Passthrough => Some(ServerKind::TlsPassthrough),
            "TLS" if terminates => Some(ServerKind::TlsTerminate),
            "TCP" | "MONGO" | "MYSQL" | "REDIS" => Some(ServerKind::Tcp),
            _ => None,
        }
    }

    fn family(self) -> Family {
        match self {
            ServerKind::Http => Family::Http,
            ServerKind::Tcp => Family::Tcp,
            ServerKind::HttpsTerminate | ServerKind::TlsPassthrough | ServerKind::TlsTerminate => Family::Tls,
        }
    }
}

impl BoundServer<'_> {
    fn https_redirect(&self) -> bool {
        self.server.tls.as_ref().and_then(|t| t.https_redirect).unwrap_or(false)
    }

    /// The server's hosts a VirtualService of namespace `vs_ns` may bind to (`ns/host`:
    /// `*` any namespace, `.` the Gateway's), without the namespace part.
    fn hosts_for(&self, vs_ns: &str) -> Vec<&str> {
        self.server
            .hosts
            .iter()
            .filter_map(|h| {
                let (ns, name) = h.split_once('/').unwrap_or(("*", h.as_str()));
                let ok = ns == "*" || (ns == "." && vs_ns == self.meta.namespace) || ns == vs_ns;
                ok.then_some(name)
            })
            .collect()
    }

    /// SNI names of the server's filter chain: its hosts, none (any) when one is `*`.
    fn server_names(&self) -> Vec<String> {
        let names: Vec<String> = self
            .server
            .hosts
            .iter()
            .map(|h| h.split_once('/').map_or(h.as_str(), |(_, n)| n).to_ascii_lowercase())
            .collect();
        if names.iter().any(|n| n == "*") {
            Vec::new()
        } else {
            names
        }
    }

    /// Istio's route name of an HTTPS server: `https.<port>.<port name>.<gateway>.<ns>`.
    fn https_route_name(&self) -> String {
        let port_name = self.server.port.name.as_deref().unwrap_or("");
        format!("https.{}.{port_name}.{}.{}", self.server.port.number, self.meta.name, self.meta.namespace)
    }
}

/// Adds the gateway listeners and their route configurations.
pub fn build(view: &MeshView<'_>, out: &mut ProxyXds) {
    let mut ports: BTreeMap<(Option<IpAddr>, u16), Vec<BoundServer<'_>>> = BTreeMap::new();
    for (meta, gw) in &view.gateways {
        for server in &gw.servers {
            let Some(port) = u16::try_from(server.port.number).ok().filter(|p| *p != 0) else { continue };
            let Some(kind) = ServerKind::of(server) else { continue };
            if matches!(kind, ServerKind::HttpsTerminate | ServerKind::TlsTerminate) && downstream_tls(server).is_none()
            {
                continue; // a terminating server without a certificate
            }
            let bind = server.bind.as_deref().and_then(|b| b.parse::<IpAddr>().ok());
            let gateway = format!("{}/{}", meta.namespace, meta.name);
            ports.entry((bind, port)).or_default().push(BoundServer { gateway, meta, server, kind });
        }
    }
    for ((bind, port), servers) in ports {
        // Servers that cannot share the first one's listener conflict; Istio keeps the first.
        let family = servers[0].kind.family();
        let servers: Vec<BoundServer<'_>> = servers.into_iter().filter(|s| s.kind.family() == family).collect();
        let ip = bind.or(view.node.gateway_address).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let addr = SocketAddr::new(ip, view.node.gateway_port(port));
        let name = format!("{}_{port}", bind.map_or_else(|| "0.0.0.0".to_string(), |b| b.to_string()));
        let listener = match family {
            Family::Http => {
                let refs: Vec<&BoundServer<'_>> = servers.iter().collect();
                let rc = route_config(view, &format!("http.{port}"), port, &refs);
                let hcm = build::http_connection_manager(&name, Routes::Rds(rc.name.clone()), None, &["websocket"]);
                out.routes.push(rc);
                Some(build::http_listener(&name, addr, hcm))
            }
            Family::Tcp => tcp_target(view, port, &servers).map(|spec| tcp_listener(&name, Some(addr), spec)),
            Family::Tls => tls_listener(view, &name, addr, port, &servers, out),
        };
        if let Some(mut l) = listener {
            l.traffic_direction = TrafficDirection::Outbound as i32;
            out.listeners.push(l);
        }
    }
}

/// The RouteConfiguration `name` of `servers` (all on `port`).
fn route_config(view: &MeshView<'_>, name: &str, port: u16, servers: &[&BoundServer<'_>]) -> RouteConfiguration {
    let domain = &view.mesh.domain;
    let mut hosts: BTreeMap<String, Vhost> = BTreeMap::new();
    for (i, (m, vs)) in view.gateway_virtual_services.iter().enumerate() {
        if vs.http.is_empty() {
            continue;
        }
        let bound = bound_gateways(m, vs);
        let vs_hosts = vs_hosts(vs, &m.namespace, domain);
        let mut matched: Vec<(String, bool)> = Vec::new();
        let mut serving = BTreeSet::new();
        for srv in servers.iter().filter(|s| bound.contains(&s.gateway)) {
            let found = intersect(&vs_hosts, &srv.hosts_for(&m.namespace));
            if !found.is_empty() {
                serving.insert(srv.gateway.clone());
            }
            matched.extend(found.into_iter().map(|h| (h, srv.https_redirect())));
        }
        if matched.is_empty() {
            continue;
        }
        let scope = RouteScope { port: u32::from(port), service: None, gateways: Some(&serving) };
        let routes = http_routes(view, &m.namespace, vs, &scope);
        for (h, redirect) in matched {
            let v = hosts.entry(h).or_default();
            if v.from.insert(i) {
                v.routes.extend(routes.iter().cloned());
            }
            v.require_tls |= redirect;
        }
    }
    // A redirecting server redirects its hosts even where no VirtualService routes them.
    for srv in servers.iter().filter(|s| s.https_redirect()) {
        for h in &srv.server.hosts {
            let h = h.split_once('/').map_or(h.as_str(), |(_, n)| n).to_ascii_lowercase();
            hosts.entry(h).or_default().require_tls = true;
        }
    }
    RouteConfiguration {
        name: name.into(),
        virtual_hosts: hosts
            .into_iter()
            .map(|(h, v)| VirtualHost {
                name: format!("{h}:{port}"),
                domains: vec![h],
                routes: v.routes,
                require_tls: if v.require_tls { virtual_host::TlsRequirementType::All as i32 } else { 0 },
                ..Default::default()
            })
            .collect(),
        validate_clusters: Some(BoolValue { value: false }),
        ignore_port_in_host_matching: true,
        ..Default::default()
    }
}

/// A VirtualService's hosts as a gateway matches them: a short name (no dot) is a
/// service of the VirtualService's namespace (Istio's rule); any other name is an
/// external host name taken as written (`bookinfo.example` is not namespace `example`).
fn vs_hosts(vs: &VirtualService, ns: &str, domain: &str) -> Vec<String> {
    vs.hosts
        .iter()
        .map(|h| if h.contains('.') || h.contains('*') { h.clone() } else { host::fqdn(h, ns, domain) })
        .collect()
}

/// The Gateways a VirtualService binds to, as `ns/name`.
fn bound_gateways(m: &ObjectMeta, vs: &VirtualService) -> BTreeSet<String> {
    vs.gateways.iter().filter(|g| *g != "mesh").map(|g| gateway_key(g, &m.namespace)).collect()
}

/// The hosts both a VirtualService and a server accept, lowercased: the narrower of each
/// matching pair (VirtualService `*` on server `*.example.com` is `*.example.com`).
fn intersect(vs_hosts: &[String], server_hosts: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for vh in vs_hosts {
        for sh in server_hosts {
            let h = if host::matches(sh, vh) {
                vh.as_str()
            } else if host::matches(vh, sh) {
                sh
            } else {
                continue;
            };
            let h = h.to_ascii_lowercase();
            if !out.contains(&h) {
                out.push(h);
            }
        }
    }
    out
}

/// The target of a TCP server port: the first `tcp` route (in resource order) of a
/// VirtualService bound to one of `servers` whose hosts match, that applies on `port`.
fn tcp_target(view: &MeshView<'_>, port: u16, servers: &[BoundServer<'_>]) -> Option<tcp_proxy::ClusterSpecifier> {
    let refs: Vec<&BoundServer<'_>> = servers.iter().collect();
    let domain = &view.mesh.domain;
    for (m, vs) in &view.gateway_virtual_services {
        let bound = bound_gateways(m, vs);
        let vs_hosts = vs_hosts(vs, &m.namespace, domain);
        let serving: BTreeSet<String> = refs
            .iter()
            .filter(|s| bound.contains(&s.gateway) && !intersect(&vs_hosts, &s.hosts_for(&m.namespace)).is_empty())
            .map(|s| s.gateway.clone())
            .collect();
        if serving.is_empty() {
            continue;
        }
        let scope = RouteScope { port: u32::from(port), service: None, gateways: Some(&serving) };
        for r in &vs.tcp {
            let applies = r.matches.is_empty()
                || r.matches.iter().any(|mm| {
                    mm.port.is_none_or(|p| p == u32::from(port))
                        && mm.source_labels.iter().all(|(k, v)| view.node.labels.get(k) == Some(v))
                        && mm.source_namespace.as_deref().is_none_or(|ns| ns == view.node.namespace)
                        && scope.serves(&mm.gateways, &m.namespace)
                });
            if applies {
                if let Some(spec) = tcp_destinations(view, &m.namespace, &r.route, u32::from(port)) {
                    return Some(spec);
                }
            }
        }
    }
    None
}

/// A listener of TLS servers: per terminating HTTPS server a TLS chain with HTTP routes,
/// per terminating TLS server a TLS chain with its `tcp` route, per `tls` route match of
/// a passthrough server an SNI chain with `tcp_proxy`. Chains with the same SNI names
/// keep the first. `None` when no chain results.
fn tls_listener(
    view: &MeshView<'_>,
    name: &str,
    addr: SocketAddr,
    port: u16,
    servers: &[BoundServer<'_>],
    out: &mut ProxyXds,
) -> Option<Listener> {
    let mut chains: Vec<FilterChain> = Vec::new();
    let mut seen: BTreeSet<Vec<String>> = BTreeSet::new();
    let mut push = |chains: &mut Vec<FilterChain>, mut sni: Vec<String>, chain: FilterChain| {
        sni.sort();
        if seen.insert(sni.clone()) {
            let m = FilterChainMatch { server_names: sni, ..Default::default() };
            chains.push(FilterChain { filter_chain_match: Some(m), ..chain });
        }
    };
    for srv in servers {
        match srv.kind {
            ServerKind::HttpsTerminate => {
                let rc = route_config(view, &srv.https_route_name(), port, &[srv]);
                let hcm = build::http_connection_manager(name, Routes::Rds(rc.name.clone()), None, &["websocket"]);
                out.routes.push(rc);
                let chain = FilterChain {
                    name: srv.https_route_name(),
                    filters: vec![Filter {
                        name: "envoy.filters.network.http_connection_manager".into(),
                        config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
                    }],
                    transport_socket: downstream_tls(srv.server),
                    ..Default::default()
                };
                push(&mut chains, srv.server_names(), chain);
            }
            ServerKind::TlsTerminate => {
                let Some(spec) = tcp_target(view, port, std::slice::from_ref(srv)) else { continue };
                let chain = FilterChain {
                    name: format!("tls.{port}.{}", srv.gateway),
                    filters: vec![tcp_filter(name, spec)],
                    transport_socket: downstream_tls(srv.server),
                    ..Default::default()
                };
                push(&mut chains, srv.server_names(), chain);
            }
            ServerKind::TlsPassthrough => {
                for (sni, dests, vs_ns) in passthrough_routes(view, port, srv) {
                    let Some(spec) = tcp_destinations(view, vs_ns, dests, u32::from(port)) else { continue };
                    let chain = FilterChain {
                        name: format!("passthrough.{port}.{}", sni.join(",")),
                        filters: vec![tcp_filter(name, spec)],
                        ..Default::default()
                    };
                    push(&mut chains, sni, chain);
                }
            }
            ServerKind::Http | ServerKind::Tcp => {}
        }
    }
    if chains.is_empty() {
        return None;
    }
    Some(Listener {
        name: name.into(),
        address: Some(build::address(addr)),
        filter_chains: chains,
        listener_filters: vec![mtls::tls_inspector()],
        ..Default::default()
    })
}

/// The `tls` routes of VirtualServices bound to a passthrough server: per applicable
/// match, the SNI names (its `sniHosts` within the server's hosts), the destinations and
/// the VirtualService's namespace.
fn passthrough_routes<'a>(
    view: &'a MeshView<'_>,
    port: u16,
    srv: &BoundServer<'_>,
) -> Vec<(Vec<String>, &'a [RouteDestination], &'a str)> {
    let mut out = Vec::new();
    let serving = BTreeSet::from([srv.gateway.clone()]);
    let scope = RouteScope { port: u32::from(port), service: None, gateways: Some(&serving) };
    for (m, vs) in &view.gateway_virtual_services {
        if !bound_gateways(m, vs).contains(&srv.gateway) {
            continue;
        }
        let server_hosts = srv.hosts_for(&m.namespace);
        for r in &vs.tls {
            for mm in &r.matches {
                let applies = mm.port.is_none_or(|p| p == u32::from(port))
                    && mm.source_labels.iter().all(|(k, v)| view.node.labels.get(k) == Some(v))
                    && mm.source_namespace.as_deref().is_none_or(|ns| ns == view.node.namespace)
                    && scope.serves(&mm.gateways, &m.namespace);
                let sni = intersect(&mm.sni_hosts, &server_hosts);
                if applies && !sni.is_empty() {
                    out.push((sni, r.route.as_slice(), m.namespace.as_str()));
                }
            }
        }
    }
    out
}

/// The downstream TLS of a terminating server: `ISTIO_MUTUAL` with the mesh certificate,
/// else the certificate and key files (`caCertificates` and `subjectAltNames` verify
/// clients; MUTUAL requires a client certificate), or the `credentialName(s)` over SDS.
/// `None` when the server names no certificate.
fn downstream_tls(server: &Server) -> Option<TransportSocket> {
    let tls = server.tls.as_ref()?;
    let alpn: &[&str] =
        if ServerKind::of(server) == Some(ServerKind::HttpsTerminate) { &["h2", "http/1.1"] } else { &[] };
    if tls.mode == Some(ServerTlsMode::IstioMutual) {
        // Sidecars calling a service port that is not HTTP offer Istio's TCP ALPN
        // (`istio-peer-exchange`, `istio`): Envoy serves them without ALPN; a weft proxy
        // (rustls) refuses a handshake without a common protocol, so `istio` is offered
        // last (no metadata exchange follows it).
        let mut with_istio = alpn.to_vec();
        if !with_istio.is_empty() {
            with_istio.push("istio");
        }
        return Some(mtls::inbound_mtls(&with_istio));
    }
    if let Some(sds) = super::credentials::server_tls(tls, alpn) {
        return Some(sds);
    }
    let file = |path: &String| DataSource {
        specifier: Some(data_source::Specifier::Filename(path.clone())),
        ..Default::default()
    };
    let (Some(cert), Some(key)) = (&tls.server_certificate, &tls.private_key) else { return None };
    let ctx = DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificates: vec![TlsCertificate {
                certificate_chain: Some(file(cert)),
                private_key: Some(file(key)),
                ..Default::default()
            }],
            validation_context_type: client_validation(tls, &file)
                .map(common_tls_context::ValidationContextType::ValidationContext),
            alpn_protocols: alpn.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        }),
        require_client_certificate: Some(BoolValue { value: tls.mode == Some(ServerTlsMode::Mutual) }),
        ..Default::default()
    };
    Some(TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(ctx))),
    })
}

/// Client-certificate validation of MUTUAL / OPTIONAL_MUTUAL servers.
fn client_validation(
    tls: &ServerTlsSettings,
    file: &dyn Fn(&String) -> DataSource,
) -> Option<CertificateValidationContext> {
    if !matches!(tls.mode, Some(ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual)) {
        return None;
    }
    let ca = tls.ca_certificates.as_ref()?;
    Some(CertificateValidationContext {
        trusted_ca: Some(file(ca)),
        match_typed_subject_alt_names: super::clusters::san_matchers(&tls.subject_alt_names),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests;
