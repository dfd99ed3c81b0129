//! Listeners: explicit mode (`weft-outbound` HTTP proxy, `inbound|PORT`, Sidecar egress
//! `bind`) or transparent mode (`virtualOutbound`, `0.0.0.0_PORT`, `virtualInbound`), and
//! the inbound / passthrough clusters they name.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{CidrRange, TrafficDirection};
use envoy_types::pb::envoy::config::listener::v3::{
    filter, listener_filter, Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter,
};
use envoy_types::pb::envoy::config::route::v3::{
    route, route_action, Route, RouteAction, RouteConfiguration, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::google::protobuf::{BoolValue, Duration as PbDuration, UInt32Value};
use envoy_types::util::pack_any;
use weft_api::host;
use weft_xds::build::{self, Routes};

use super::authz::InboundAuthz;
use super::clusters::{add_istio_services, cla, default_circuit_breakers, outbound_name};
use super::jwt::InboundJwt;
use super::model::{offset, protocol_from, Ep, MeshView, Protocol, Service};
use super::mtls;
use super::{ProxyMode, ProxyXds, BLACKHOLE, INBOUND_PASSTHROUGH, OUTBOUND, PASSTHROUGH};

/// Port of the transparent outbound capture listener.
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
/// Port of the transparent inbound capture listener.
pub const INBOUND_CAPTURE_PORT: u16 = 15006;

/// Adds the listeners of `mode` and the clusters only they use.
pub fn build(view: &MeshView<'_>, mode: ProxyMode, out: &mut ProxyXds) {
    match mode {
        ProxyMode::Explicit => explicit(view, out),
        ProxyMode::Transparent => transparent(view, out),
    }
}

fn explicit(view: &MeshView<'_>, out: &mut ProxyXds) {
    let hcm = build::http_connection_manager(OUTBOUND, Routes::Rds(OUTBOUND.into()), None, &["websocket", "CONNECT"]);
    // Each local sidecar may announce its own outbound address (several share a host).
    let outbound = view.node.outbound.unwrap_or(view.mesh.explicit_outbound);
    out.listeners.push(build::http_listener(OUTBOUND, outbound, hcm));
    if let Some(inbound) = view.workload.and_then(|w| w.inbound).or(view.node.inbound) {
        for (i, p) in view.node.ports.iter().enumerate() {
            let Some(addr) = offset(inbound, i) else { continue };
            // The listener has its own port: the workload port is decided statically.
            let authz = InboundAuthz::new(view, Some(u32::from(p.port)));
            let jwt = InboundJwt::new(view);
            let protocol = protocol_from(p.app_protocol.as_deref(), Some(&p.name));
            let port = u32::from(p.port);
            let name = format!("inbound|{port}");
            let mut l = if protocol.is_http() {
                let mut hcm = build::http_connection_manager(
                    &name,
                    Routes::Inline(Box::new(inbound_routes(port))),
                    None,
                    &["websocket"],
                );
                authz.apply_http(&mut hcm);
                jwt.apply_http(&mut hcm);
                build::http_listener(&name, addr, hcm)
            } else {
                let mut l = build::tcp_listener(&name, addr, &inbound_cluster(port));
                l.filter_chains.iter_mut().for_each(|c| authz.apply_tcp(&mut c.filters));
                l
            };
            l.traffic_direction = TrafficDirection::Inbound as i32;
            if mtls::in_mesh(&view.node.labels) {
                let mode = mtls::peer_mode(view, &view.node.namespace, &view.node.labels, port);
                let plain = l.filter_chains.pop().unwrap_or_default();
                l.filter_chains = mtls::inbound_chains(plain, mode, protocol.is_http());
                l.listener_filters.push(mtls::tls_inspector());
            }
            out.listeners.push(l);
            out.clusters.push(local_app_cluster(explicit_app_host(view), port, protocol, view, p));
        }
    }
    // Sidecar egress listeners with a port become listeners bound on the loopback (or
    // `bind`); applications connect to them as if they were the service.
    let Some(sc) = view.sidecar else { return };
    for e in &sc.egress {
        let Some(p) = &e.port else { continue };
        let Ok(port) = u16::try_from(p.number) else { continue };
        let ip = e.bind.as_deref().and_then(|b| b.parse::<IpAddr>().ok()).unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let addr = SocketAddr::new(ip, port);
        let name = format!("{ip}_{port}");
        let svcs: Vec<&Service> =
            view.services.iter().filter(|s| s.port(p.number).is_some() && view.egress_allows(e, s)).collect();
        let protocol = match p.protocol.as_deref() {
            Some(_) => protocol_from(p.protocol.as_deref(), p.name.as_deref()),
            None => svcs.first().and_then(|s| s.port(p.number)).map_or(Protocol::Http, |sp| sp.protocol),
        };
        if protocol.is_http() {
            ensure_route(out, p.number);
            let hcm = build::http_connection_manager(
                &name,
                Routes::Rds(p.number.to_string()),
                None,
                &["websocket", "CONNECT"],
            );
            out.listeners.push(build::http_listener(&name, addr, hcm));
        } else if let Some(svc) = svcs.first() {
            out.listeners.push(tcp_listener(&name, Some(addr), tcp_target(view, svc, p.number)));
        }
    }
}

fn transparent(view: &MeshView<'_>, out: &mut ProxyXds) {
    let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
    let fallback = match view.outbound_policy() {
        super::OutboundPolicy::AllowAny => PASSTHROUGH,
        super::OutboundPolicy::RegistryOnly => BLACKHOLE,
    };
    let mut vo = tcp_listener(
        "virtualOutbound",
        Some(SocketAddr::new(any.ip(), OUTBOUND_CAPTURE_PORT)),
        tcp_proxy::ClusterSpecifier::Cluster(fallback.into()),
    );
    vo.use_original_dst = Some(BoolValue { value: true });
    vo.traffic_direction = TrafficDirection::Outbound as i32;
    out.listeners.push(vo);
    out.clusters.push(original_dst_cluster(PASSTHROUGH));
    out.clusters.push(Cluster {
        name: BLACKHOLE.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Static as i32)),
        connect_timeout: Some(PbDuration { seconds: 10, nanos: 0 }),
        load_assignment: Some(cla(BLACKHOLE, &[])),
        ..Default::default()
    });
    // One bind_to_port=false listener per service port; the capture listener hands
    // connections over by original destination. TCP services sharing a port are told
    // apart by their addresses (`crate::vip`), as Istio's `<VIP>_<port>` listeners are;
    // any other destination on the port is routed by Host when a service speaks HTTP
    // there, else goes to a TCP service without an address (a ServiceEntry's, as Istio's
    // `0.0.0.0_<port>`), else to the fallback (passthrough, or blackhole in REGISTRY_ONLY).
    let vips = crate::vip::service_addresses(&view.mesh.resources);
    let mut by_port: BTreeMap<u32, Vec<(Protocol, &Service)>> = BTreeMap::new();
    for s in &view.services {
        for p in &s.ports {
            by_port.entry(p.number).or_default().push((p.protocol, s));
        }
    }
    for (number, services) in by_port {
        let Ok(port) = u16::try_from(number) else { continue };
        let name = format!("0.0.0.0_{port}");
        let addr = SocketAddr::new(any.ip(), port);
        let address_of = |svc: &Service| -> Option<&Vec<IpAddr>> {
            svc.short.as_ref().and_then(|short| vips.get(&(svc.namespace.clone(), short.clone())))
        };
        let mut chains = Vec::new();
        let mut matched: HashSet<IpAddr> = HashSet::new();
        for (protocol, svc) in &services {
            let Some(ips) = address_of(svc) else { continue };
            // Two services claiming one address: the first (by host) keeps it, as a
            // listener cannot hold two chains with the same match.
            let ips: Vec<IpAddr> = ips.iter().copied().filter(|ip| matched.insert(*ip)).collect();
            if protocol.is_http() || ips.is_empty() {
                continue;
            }
            chains.push(FilterChain {
                name: format!("{}_{port}", ips[0]),
                filter_chain_match: Some(FilterChainMatch {
                    prefix_ranges: ips.iter().map(|ip| host_range(*ip)).collect(),
                    ..Default::default()
                }),
                filters: vec![tcp_filter(&name, tcp_target(view, svc, number))],
                ..Default::default()
            });
        }
        let default = if services.iter().any(|(p, _)| p.is_http()) {
            let hcm =
                build::http_connection_manager(&name, Routes::Rds(number.to_string()), None, &["websocket", "CONNECT"]);
            Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
            }
        } else if let Some((_, svc)) = services.iter().find(|(_, s)| address_of(s).is_none()) {
            tcp_filter(&name, tcp_target(view, svc, number))
        } else {
            tcp_filter(&name, tcp_proxy::ClusterSpecifier::Cluster(fallback.into()))
        };
        chains.push(FilterChain { filters: vec![default], ..Default::default() });
        out.listeners.push(Listener {
            name,
            address: Some(build::address(addr)),
            filter_chains: chains,
            bind_to_port: Some(BoolValue { value: false }),
            traffic_direction: TrafficDirection::Outbound as i32,
            ..Default::default()
        });
    }
    // virtualInbound: one chain per declared workload port, others pass through.
    let authz = InboundAuthz::new(view, None);
    let jwt = InboundJwt::new(view);
    let mut chains = Vec::new();
    for p in &view.node.ports {
        let port = u32::from(p.port);
        let protocol = protocol_from(p.app_protocol.as_deref(), Some(&p.name));
        let name = format!("inbound|{port}");
        let mut filters = vec![if protocol.is_http() {
            let mut hcm = build::http_connection_manager(
                &name,
                Routes::Inline(Box::new(inbound_routes(port))),
                None,
                &["websocket"],
            );
            authz.apply_http(&mut hcm);
            jwt.apply_http(&mut hcm);
            Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
            }
        } else {
            tcp_filter(&name, tcp_proxy::ClusterSpecifier::Cluster(inbound_cluster(port)))
        }];
        if !protocol.is_http() {
            authz.apply_tcp(&mut filters);
        }
        let plain = FilterChain {
            name: name.clone(),
            filter_chain_match: Some(FilterChainMatch {
                destination_port: Some(UInt32Value { value: port }),
                ..Default::default()
            }),
            filters,
            ..Default::default()
        };
        if mtls::in_mesh(&view.node.labels) {
            let mode = mtls::peer_mode(view, &view.node.namespace, &view.node.labels, port);
            for mut c in mtls::inbound_chains(plain, mode, protocol.is_http()) {
                // Keep the port match on each chain; the mTLS/plaintext split adds to it.
                let m = c.filter_chain_match.get_or_insert_with(Default::default);
                m.destination_port = Some(UInt32Value { value: port });
                c.name = format!("{name}|{}", if c.transport_socket.is_some() { "mtls" } else { "plaintext" });
                chains.push(c);
            }
        } else {
            chains.push(plain);
        }
        out.clusters.push(local_app_cluster("127.0.0.1".into(), port, protocol, view, p));
    }
    let mut vi = tcp_listener(
        "virtualInbound",
        Some(SocketAddr::new(any.ip(), INBOUND_CAPTURE_PORT)),
        tcp_proxy::ClusterSpecifier::Cluster(INBOUND_PASSTHROUGH.into()),
    );
    let mut passthrough = vi.filter_chains.pop().unwrap_or_default();
    authz.apply_tcp(&mut passthrough.filters);
    if mtls::in_mesh(&view.node.labels) {
        // Ports no Service declares pass through under the workload-level mode (port 0
        // matches no portLevelMtls): STRICT accepts only mTLS there too. These chains
        // match no port, so a plaintext connection to a declared STRICT port finds no
        // chain (the port criterion is decided first) and is closed, as in Envoy.
        let mode = mtls::peer_mode(view, &view.node.namespace, &view.node.labels, 0);
        for mut c in mtls::inbound_chains(passthrough, mode, false) {
            c.name =
                format!("{INBOUND_PASSTHROUGH}|{}", if c.transport_socket.is_some() { "mtls" } else { "plaintext" });
            chains.push(c);
        }
    } else {
        vi.default_filter_chain = Some(passthrough);
    }
    vi.filter_chains = chains;
    vi.traffic_direction = TrafficDirection::Inbound as i32;
    vi.listener_filters = vec![ListenerFilter {
        name: "envoy.filters.listener.original_dst".into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(OriginalDst::default()))),
        ..Default::default()
    }];
    if mtls::in_mesh(&view.node.labels) {
        vi.listener_filters.push(mtls::tls_inspector());
    }
    out.listeners.push(vi);
    out.clusters.push(original_dst_cluster(INBOUND_PASSTHROUGH));
}

/// Where TCP traffic for `svc:port` goes: its VirtualService's first applicable `tcp`
/// route (weighted clusters), else `outbound|PORT||FQDN`.
fn tcp_target(view: &MeshView<'_>, svc: &Service, port: u32) -> tcp_proxy::ClusterSpecifier {
    let domain = &view.mesh.domain;
    let route = view
        .virtual_services
        .iter()
        .find(|(m, vs)| vs.hosts.iter().any(|h| host::fqdn(h, &m.namespace, domain) == svc.host))
        .and_then(|(m, vs)| {
            // Sidecars are the `mesh` gateway: a VirtualService bound elsewhere only does
            // not route them, and a match's own `gateways` replaces the resource's.
            let mesh = |gws: &[String]| gws.is_empty() || gws.iter().any(|g| g == "mesh");
            let bound = mesh(&vs.gateways);
            vs.tcp
                .iter()
                .find(|r| {
                    (r.matches.is_empty() && bound)
                        || r.matches.iter().any(|mm| {
                            mm.port.is_none_or(|p| p == port)
                                && mm.source_labels.iter().all(|(k, v)| view.node.labels.get(k) == Some(v))
                                && mm.source_namespace.as_deref().is_none_or(|ns| ns == view.node.namespace)
                                && if mm.gateways.is_empty() { bound } else { mesh(&mm.gateways) }
                        })
                })
                .map(|r| (m.namespace.as_str(), r))
        });
    let default = outbound_name(port, "", &svc.host);
    match route {
        Some((ns, r)) => {
            tcp_destinations(view, ns, &r.route, port).unwrap_or(tcp_proxy::ClusterSpecifier::Cluster(default))
        }
        None => tcp_proxy::ClusterSpecifier::Cluster(default),
    }
}

/// The tcp_proxy target of a `tcp`/`tls` route's destinations (resolved in the
/// VirtualService's namespace `ns`; a destination without port uses `port`); `None`
/// without destinations.
pub(super) fn tcp_destinations(
    view: &MeshView<'_>,
    ns: &str,
    route: &[weft_api::spec::RouteDestination],
    port: u32,
) -> Option<tcp_proxy::ClusterSpecifier> {
    let domain = &view.mesh.domain;
    let name = |d: &weft_api::spec::Destination| {
        outbound_name(
            d.port.map_or(port, |p| p.number),
            d.subset.as_deref().unwrap_or(""),
            &host::fqdn(&d.host, ns, domain),
        )
    };
    Some(match route {
        [] => return None,
        [one] => tcp_proxy::ClusterSpecifier::Cluster(name(&one.destination)),
        many => tcp_proxy::ClusterSpecifier::WeightedClusters(tcp_proxy::WeightedCluster {
            clusters: many
                .iter()
                .filter(|d| d.weight.unwrap_or(0) > 0)
                .map(|d| tcp_proxy::weighted_cluster::ClusterWeight {
                    name: name(&d.destination),
                    weight: u32::try_from(d.weight.unwrap_or(0)).unwrap_or(0),
                    ..Default::default()
                })
                .collect(),
        }),
    })
}

/// A `tcp_proxy` network filter.
pub(super) fn tcp_filter(stat_prefix: &str, spec: tcp_proxy::ClusterSpecifier) -> Filter {
    let tp = TcpProxy { stat_prefix: stat_prefix.into(), cluster_specifier: Some(spec), ..Default::default() };
    Filter {
        name: "envoy.filters.network.tcp_proxy".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(tp))),
    }
}

pub(super) fn tcp_listener(name: &str, addr: Option<SocketAddr>, spec: tcp_proxy::ClusterSpecifier) -> Listener {
    Listener {
        name: name.into(),
        address: addr.map(build::address),
        filter_chains: vec![FilterChain { filters: vec![tcp_filter(name, spec)], ..Default::default() }],
        ..Default::default()
    }
}

/// Adds an empty RouteConfiguration `port` when no service declared it, so a listener
/// naming it does not wait for it forever.
fn ensure_route(out: &mut ProxyXds, port: u32) {
    let name = port.to_string();
    if out.routes.iter().all(|r| r.name != name) {
        out.routes.push(RouteConfiguration { name, ..Default::default() });
    }
}

/// One address as a CIDR range (/32 or /128).
fn host_range(ip: IpAddr) -> CidrRange {
    let len = if ip.is_ipv4() { 32 } else { 128 };
    CidrRange { address_prefix: ip.to_string(), prefix_len: Some(UInt32Value { value: len }) }
}

/// `inbound|PORT||`.
pub fn inbound_cluster(port: u32) -> String {
    format!("inbound|{port}||")
}

/// Inline routes of an inbound HTTP listener: everything to the local application, no
/// timeout (the caller's proxy enforces the route's timeout).
fn inbound_routes(port: u32) -> RouteConfiguration {
    RouteConfiguration {
        name: format!("inbound|{port}"),
        virtual_hosts: vec![VirtualHost {
            name: format!("inbound|http|{port}"),
            domains: vec!["*".into()],
            routes: vec![Route {
                name: "default".into(),
                r#match: Some(envoy_types::pb::envoy::config::route::v3::RouteMatch {
                    path_specifier: Some(
                        envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier::Prefix("/".into()),
                    ),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(inbound_cluster(port))),
                    timeout: Some(PbDuration::default()),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Where an explicit-mode sidecar finds its application: the workload's own loopback
/// address when it announces one (several workloads then share a host, each app on its
/// own 127.x address with its declared port), else 127.0.0.1.
fn explicit_app_host(view: &MeshView<'_>) -> String {
    view.node
        .instance_ips
        .iter()
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .find(IpAddr::is_loopback)
        .map_or_else(|| "127.0.0.1".into(), |ip| ip.to_string())
}

/// `inbound|PORT||`: STATIC `host`:PORT, the local application, with Istio's service
/// metadata naming the services the workload serves on `workload_port`.
fn local_app_cluster(
    host: String,
    port: u32,
    protocol: Protocol,
    view: &MeshView<'_>,
    workload_port: &weft_xds::PortInfo,
) -> Cluster {
    let name = inbound_cluster(port);
    let mut c = build::static_cluster(&name, &[], protocol == Protocol::Http2);
    c.load_assignment = Some(cla(&name, &[Ep::plain(host, port)]));
    c.circuit_breakers = Some(default_circuit_breakers());
    add_istio_services(&mut c, &view.inbound_services(workload_port));
    c
}

fn original_dst_cluster(name: &str) -> Cluster {
    Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::OriginalDst as i32)),
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        connect_timeout: Some(PbDuration { seconds: 10, nanos: 0 }),
        circuit_breakers: Some(default_circuit_breakers()),
        ..Default::default()
    }
}
