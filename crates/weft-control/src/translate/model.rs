//! What one proxy may see: services (Kubernetes `Service` and `ServiceEntry` hosts)
//! scoped by `exportTo` and its `Sidecar`, the VirtualServices and DestinationRules
//! that apply, and the endpoints behind each service port.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use weft_api::spec::{IstioEgressListener, OutboundMode, Resolution, ServicePort, TargetPort};
use weft_api::{host, DestinationRule, Gateway, ObjectMeta, Sidecar, Spec, VirtualService, WorkloadEntry};
use weft_xds::NodeInfo;

use super::locality::Locality;
use super::{MeshConfig, OutboundPolicy, ProxyMode};
use crate::registry::{RegistrySnapshot, Workload, WorkloadSource};

/// Annotation carrying a Kubernetes Service's `exportTo` (comma-separated).
pub const EXPORT_TO_ANNOTATION: &str = "networking.istio.io/exportTo";

/// The translator's view of the mesh for one proxy.
pub struct MeshView<'a> {
    /// The mesh config.
    pub mesh: &'a MeshConfig,
    /// The registry.
    pub registry: &'a RegistrySnapshot,
    /// The proxy.
    pub node: &'a NodeInfo,
    /// The proxy's own workload, when registered.
    pub workload: Option<&'a Workload>,
    /// Services visible to the proxy, sorted by host.
    pub services: Vec<Service>,
    /// VirtualServices that apply to sidecars and are visible, in resource order.
    pub virtual_services: Vec<(&'a ObjectMeta, &'a VirtualService)>,
    /// The Sidecar that applies to the proxy (never for gateways: Istio applies Sidecar
    /// resources to sidecars only).
    pub sidecar: Option<&'a Sidecar>,
    /// Gateway proxies: the Gateways whose `selector` matches the proxy's labels (any
    /// namespace, Istio's default), in resource order.
    pub gateways: Vec<(&'a ObjectMeta, &'a Gateway)>,
    /// Gateway proxies: the visible VirtualServices bound to some gateway (a `gateways`
    /// entry other than `mesh`), in resource order.
    pub gateway_virtual_services: Vec<(&'a ObjectMeta, &'a VirtualService)>,
    destination_rules: Vec<(&'a ObjectMeta, &'a DestinationRule)>,
    workload_entries: Vec<(&'a ObjectMeta, &'a WorkloadEntry)>,
}

/// One service host.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    /// Fully qualified host, `reviews.default.svc.cluster.local`.
    pub host: String,
    /// Short name (Kubernetes Services only).
    pub short: Option<String>,
    /// Namespace of the defining resource.
    pub namespace: String,
    /// Ports, sorted by number.
    pub ports: Vec<SvcPort>,
    /// Where the endpoints come from.
    pub backing: Backing,
}

/// A service port.
#[derive(Debug, Clone, PartialEq)]
pub struct SvcPort {
    /// Service port number.
    pub number: u32,
    /// Port name (used by WorkloadEntry `ports`).
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Target port.
    pub target: Target,
}

/// Where a service port sends traffic on the workload.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// The same number as the service port.
    Same,
    /// A number.
    Number(u32),
    /// A named workload port.
    Name(String),
}

/// The application protocol of a port, as Istio derives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 (also undeclared ports: weft's proxy serves HTTP/1 and h2c on one port).
    Http,
    /// HTTP/2 or gRPC: upstream connections speak h2c.
    Http2,
    /// Opaque TCP (tcp, tls, https, mongo, mysql, redis).
    Tcp,
}

/// Source of a service's endpoints.
#[derive(Debug, Clone, PartialEq)]
pub enum Backing {
    /// Kubernetes Service: registry workloads and WorkloadEntries selected by labels.
    Selector(BTreeMap<String, String>),
    /// ServiceEntry.
    Entry {
        /// Resolution (default NONE).
        resolution: Resolution,
        /// Inline endpoints.
        endpoints: Vec<WorkloadEntry>,
        /// Workload selector.
        selector: Option<BTreeMap<String, String>>,
        /// `location: MESH_EXTERNAL` (Istio's default): outside the mesh.
        external: bool,
    },
}

/// One endpoint: a host (IP, or DNS name for STRICT_DNS), port, weight.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ep {
    /// IP address or DNS name.
    pub host: String,
    /// Port.
    pub port: u32,
    /// Load-balancing weight (>= 1).
    pub weight: u32,
    /// The SPIFFE id of a workload whose proxy does mesh mTLS (auto mTLS targets it).
    pub identity: Option<String>,
    /// Where the workload runs (empty when unknown).
    pub locality: Locality,
    /// The workload's labels (`failoverPriority` compares them).
    pub labels: BTreeMap<String, String>,
}

impl Ep {
    /// An endpoint outside the registry: no identity, locality or labels.
    pub fn plain(host: String, port: u32) -> Ep {
        Ep { host, port, weight: 1, identity: None, locality: Locality::default(), labels: BTreeMap::new() }
    }
}

impl<'a> MeshView<'a> {
    /// Collects what `node` may see.
    pub fn new(mesh: &'a MeshConfig, registry: &'a RegistrySnapshot, node: &'a NodeInfo) -> MeshView<'a> {
        let ns = node.namespace.as_str();
        let mut view = MeshView {
            mesh,
            registry,
            node,
            workload: registry.get(&node.id),
            services: Vec::new(),
            virtual_services: Vec::new(),
            sidecar: None,
            gateways: Vec::new(),
            gateway_virtual_services: Vec::new(),
            destination_rules: Vec::new(),
            workload_entries: Vec::new(),
        };
        let gateway = node.is_gateway();
        if !gateway {
            view.sidecar = select_sidecar(mesh, node);
        }
        let mut services: BTreeMap<String, Service> = BTreeMap::new();
        for r in &mesh.resources {
            match &r.spec {
                Spec::Service(s) => {
                    let export: Vec<String> = r
                        .meta
                        .annotations
                        .get(EXPORT_TO_ANNOTATION)
                        .map(|v| v.split(',').map(|p| p.trim().to_string()).collect())
                        .unwrap_or_default();
                    if !exported(&export, &r.meta.namespace, ns) {
                        continue;
                    }
                    let host = format!("{}.{}.svc.{}", r.meta.name, r.meta.namespace, mesh.domain);
                    // Istio skips UDP and SCTP ports: the mesh carries TCP.
                    let ports = s
                        .ports
                        .iter()
                        .filter(|p| p.protocol.as_deref().is_none_or(|p| p.eq_ignore_ascii_case("TCP")))
                        .map(k8s_port)
                        .collect();
                    // An ExternalName Service is a DNS name outside the mesh, as Istio
                    // converts it: a DNS cluster to `externalName`.
                    let backing = match (s.service_type.as_deref(), &s.external_name) {
                        (Some("ExternalName"), Some(name)) => Backing::Entry {
                            resolution: Resolution::Dns,
                            endpoints: vec![WorkloadEntry { address: Some(name.clone()), ..WorkloadEntry::default() }],
                            selector: None,
                            external: true,
                        },
                        _ => Backing::Selector(s.selector.clone()),
                    };
                    services.entry(host.clone()).or_insert(Service {
                        host,
                        short: Some(r.meta.name.clone()),
                        namespace: r.meta.namespace.clone(),
                        ports: sorted_ports(ports),
                        backing,
                    });
                }
                Spec::ServiceEntry(se) => {
                    if !exported(&se.export_to, &r.meta.namespace, ns) {
                        continue;
                    }
                    let ports: Vec<SvcPort> = se
                        .ports
                        .iter()
                        .map(|p| SvcPort {
                            number: p.number,
                            name: p.name.clone().unwrap_or_default(),
                            protocol: protocol_from(p.protocol.as_deref(), p.name.as_deref()),
                            target: p.target_port.map_or(Target::Same, Target::Number),
                        })
                        .collect();
                    for h in &se.hosts {
                        let host = host::fqdn(h, &r.meta.namespace, &mesh.domain);
                        if host.starts_with('*') {
                            continue; // wildcard ServiceEntries need DNS capture; not supported
                        }
                        services.entry(host.clone()).or_insert(Service {
                            host,
                            short: None,
                            namespace: r.meta.namespace.clone(),
                            ports: sorted_ports(ports.clone()),
                            backing: Backing::Entry {
                                resolution: se.resolution.unwrap_or(Resolution::None),
                                endpoints: se.endpoints.clone(),
                                selector: se.workload_selector.as_ref().map(|s| s.labels.clone()),
                                external: se.location != Some(weft_api::spec::mesh::Location::MeshInternal),
                            },
                        });
                    }
                }
                Spec::VirtualService(vs) => {
                    let for_mesh = vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == "mesh");
                    let for_gateways = vs.gateways.iter().any(|g| g != "mesh");
                    if exported(&vs.export_to, &r.meta.namespace, ns) {
                        if for_mesh {
                            view.virtual_services.push((&r.meta, vs));
                        }
                        if for_gateways && gateway {
                            view.gateway_virtual_services.push((&r.meta, vs));
                        }
                    }
                }
                Spec::Gateway(g) if gateway && g.selector.iter().all(|(k, v)| node.labels.get(k) == Some(v)) => {
                    view.gateways.push((&r.meta, g));
                }
                Spec::DestinationRule(dr) if exported(&dr.export_to, &r.meta.namespace, ns) => {
                    view.destination_rules.push((&r.meta, dr));
                }
                Spec::WorkloadEntry(we) => view.workload_entries.push((&r.meta, we)),
                _ => {}
            }
        }
        view.services = services.into_values().filter(|s| view.sidecar_allows(s)).collect();
        view
    }

    /// The outbound traffic policy: the proxy's Sidecar `outboundTrafficPolicy.mode`,
    /// else the mesh's.
    pub fn outbound_policy(&self) -> OutboundPolicy {
        match self.sidecar.and_then(|s| s.outbound_traffic_policy.as_ref()).and_then(|p| p.mode) {
            Some(OutboundMode::RegistryOnly) => OutboundPolicy::RegistryOnly,
            Some(OutboundMode::AllowAny) => OutboundPolicy::AllowAny,
            None => self.mesh.outbound_policy,
        }
    }

    /// The services the proxy's own workload serves on its port `port` (Istio's inbound
    /// cluster services): Kubernetes Services in its namespace whose selector matches its
    /// labels and with a port targeting `port` (by number, or by the workload port's
    /// name), and ServiceEntries there whose `workloadSelector` matches and with a port
    /// targeting it. Not scoped by `exportTo` or the Sidecar: they are about who the
    /// workload is, not what it may reach. Sorted by host; `(fqdn, name, namespace)`.
    pub fn inbound_services(&self, port: &weft_xds::PortInfo) -> Vec<(String, String, String)> {
        let node = self.node;
        let selects =
            |sel: &BTreeMap<String, String>| !sel.is_empty() && sel.iter().all(|(k, v)| node.labels.get(k) == Some(v));
        let targets = |p: &SvcPort| match &p.target {
            Target::Same => p.number == u32::from(port.port),
            Target::Number(n) => *n == u32::from(port.port),
            Target::Name(n) => *n == port.name,
        };
        let mut out = Vec::new();
        for r in self.mesh.resources.iter().filter(|r| r.meta.namespace == node.namespace) {
            match &r.spec {
                Spec::Service(s) if selects(&s.selector) && s.ports.iter().map(k8s_port).any(|p| targets(&p)) => {
                    let host = format!("{}.{}.svc.{}", r.meta.name, r.meta.namespace, self.mesh.domain);
                    out.push((host, r.meta.name.clone(), r.meta.namespace.clone()));
                }
                Spec::ServiceEntry(se) => {
                    let selected = se.workload_selector.as_ref().is_some_and(|w| selects(&w.labels));
                    let port_matches =
                        se.ports.iter().any(|p| p.target_port.unwrap_or(p.number) == u32::from(port.port));
                    if selected && port_matches {
                        for h in se.hosts.iter().filter(|h| !h.starts_with('*')) {
                            let host = host::fqdn(h, &r.meta.namespace, &self.mesh.domain);
                            out.push((host.clone(), host, r.meta.namespace.clone()));
                        }
                    }
                }
                _ => {}
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// The namespace of the proxy.
    pub fn namespace(&self) -> &str {
        &self.node.namespace
    }

    /// The service with this FQDN.
    pub fn service(&self, host: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.host == host)
    }

    /// Whether the Sidecar (if any) lets the proxy see `svc`.
    fn sidecar_allows(&self, svc: &Service) -> bool {
        match self.sidecar {
            None => true,
            Some(sc) if sc.egress.is_empty() => true,
            Some(sc) => sc.egress.iter().any(|e| self.egress_allows(e, svc)),
        }
    }

    /// Whether an egress listener's `hosts` (`ns/dnsName`) include `svc`.
    pub fn egress_allows(&self, egress: &IstioEgressListener, svc: &Service) -> bool {
        egress.hosts.iter().any(|h| {
            let (ns, name) = h.split_once('/').unwrap_or(("*", h.as_str()));
            let ns_ok = match ns {
                "*" => true,
                "~" => false,
                "." => svc.namespace == self.node.namespace,
                other => svc.namespace == other,
            };
            ns_ok && (name == "*" || host::matches(name, &svc.host))
        })
    }

    /// The DestinationRule for `host`: a visible rule in the proxy's namespace first,
    /// then the service's, then the root namespace, then any other; exact host before
    /// wildcard. Rules with a `workloadSelector` apply only to matching proxies of
    /// their own namespace.
    pub fn destination_rule(&self, svc: &Service) -> Option<&'a DestinationRule> {
        self.destination_rule_meta(svc).map(|(_, dr)| dr)
    }

    /// [`MeshView::destination_rule`] with the rule's metadata (its annotations carry
    /// weft's extensions).
    pub fn destination_rule_meta(&self, svc: &Service) -> Option<(&'a ObjectMeta, &'a DestinationRule)> {
        let rank_ns = |ns: &str| {
            if ns == self.node.namespace {
                0
            } else if ns == svc.namespace {
                1
            } else if ns == self.mesh.root_namespace {
                2
            } else {
                3
            }
        };
        self.destination_rules
            .iter()
            .filter(|(m, dr)| match &dr.workload_selector {
                Some(sel) => {
                    m.namespace == self.node.namespace
                        && sel.labels.iter().all(|(k, v)| self.node.labels.get(k) == Some(v))
                }
                None => true,
            })
            .filter_map(|(m, dr)| {
                let h = host::fqdn(&dr.host, &m.namespace, &self.mesh.domain);
                if h == svc.host {
                    Some(((rank_ns(&m.namespace), 0), (*m, *dr)))
                } else if host::matches(&h, &svc.host) {
                    Some(((rank_ns(&m.namespace), 1), (*m, *dr)))
                } else {
                    None
                }
            })
            .min_by_key(|(rank, _)| *rank)
            .map(|(_, found)| found)
    }

    /// Endpoints of `svc` port `port`, restricted to `subset` labels, sorted.
    pub fn endpoints(
        &self,
        svc: &Service,
        port: &SvcPort,
        subset: Option<&BTreeMap<String, String>>,
        mode: ProxyMode,
    ) -> Vec<Ep> {
        let in_subset =
            |labels: &BTreeMap<String, String>| subset.is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)));
        let mut out = Vec::new();
        let selected = |selector: &BTreeMap<String, String>, out: &mut Vec<Ep>| {
            for w in self.registry.select(&svc.namespace, selector) {
                if in_subset(&w.labels) {
                    out.extend(workload_endpoint(w, port, mode, &self.mesh.trust_domain));
                }
            }
            if selector.is_empty() {
                return;
            }
            for (m, we) in &self.workload_entries {
                // A WorkloadEntry already in the registry (registered by hand) counts once.
                let registered = self
                    .registry
                    .workloads()
                    .any(|w| w.namespace == m.namespace && w.source == WorkloadSource::WorkloadEntry(m.name.clone()));
                let matches = !registered
                    && m.namespace == svc.namespace
                    && selector.iter().all(|(k, v)| we.labels.get(k) == Some(v))
                    && in_subset(&we.labels);
                if matches {
                    out.extend(entry_endpoint(we, port, true, &m.namespace, &self.mesh.trust_domain));
                }
            }
        };
        match &svc.backing {
            Backing::Selector(sel) => selected(sel, &mut out),
            Backing::Entry { resolution, endpoints, selector, .. } => {
                for we in endpoints.iter().filter(|we| in_subset(&we.labels)) {
                    out.extend(entry_endpoint(
                        we,
                        port,
                        *resolution != Resolution::Dns,
                        &svc.namespace,
                        &self.mesh.trust_domain,
                    ));
                }
                if let Some(sel) = selector {
                    selected(sel, &mut out);
                }
                if out.is_empty() && endpoints.is_empty() && *resolution == Resolution::Dns && subset.is_none() {
                    out.push(Ep::plain(svc.host.clone(), target_number(port)));
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

impl Service {
    /// The port `number`.
    pub fn port(&self, number: u32) -> Option<&SvcPort> {
        self.ports.iter().find(|p| p.number == number)
    }

    /// The names a client may use for this service, as Istio's virtual host domains:
    /// the FQDN, and for Kubernetes Services `name.ns.svc`, `name.ns`, and the short name
    /// when the proxy is in the service's namespace.
    pub fn names(&self, proxy_ns: &str) -> Vec<String> {
        let mut out = vec![self.host.clone()];
        if let Some(short) = &self.short {
            out.push(format!("{short}.{}.svc", self.namespace));
            out.push(format!("{short}.{}", self.namespace));
            if self.namespace == proxy_ns {
                out.push(short.clone());
            }
        }
        out
    }
}

impl Protocol {
    /// Whether the port carries HTTP (routes apply).
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2)
    }
}

/// Whether a resource of `res_ns` with `export_to` is visible in `proxy_ns`.
pub fn exported(export_to: &[String], res_ns: &str, proxy_ns: &str) -> bool {
    export_to.is_empty() || export_to.iter().any(|e| e == "*" || e == proxy_ns || (e == "." && res_ns == proxy_ns))
}

/// The Sidecar of the proxy: one in its namespace whose selector matches, else one in its
/// namespace without selector, else one in the root namespace without selector.
fn select_sidecar<'a>(mesh: &'a MeshConfig, node: &NodeInfo) -> Option<&'a Sidecar> {
    let sidecars: Vec<(&ObjectMeta, &Sidecar)> = mesh
        .resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::Sidecar(s) => Some((&r.meta, s)),
            _ => None,
        })
        .collect();
    let selected = sidecars.iter().find(|(m, s)| {
        m.namespace == node.namespace
            && s.workload_selector
                .as_ref()
                .is_some_and(|sel| sel.labels.iter().all(|(k, v)| node.labels.get(k) == Some(v)))
    });
    let plain = |ns: &str| sidecars.iter().find(|(m, s)| m.namespace == ns && s.workload_selector.is_none());
    selected.or_else(|| plain(&node.namespace)).or_else(|| plain(&mesh.root_namespace)).map(|(_, s)| *s)
}

fn k8s_port(p: &ServicePort) -> SvcPort {
    let protocol = match p.declared_protocol() {
        Some("HTTP2" | "GRPC") => Protocol::Http2,
        Some("HTTP" | "GRPC-WEB") | None => Protocol::Http,
        Some(_) => Protocol::Tcp,
    };
    SvcPort {
        number: p.port,
        name: p.name.clone().unwrap_or_default(),
        protocol,
        target: match &p.target_port {
            None => Target::Same,
            Some(TargetPort::Number(n)) => Target::Number(*n),
            Some(TargetPort::Name(n)) => Target::Name(n.clone()),
        },
    }
}

/// Protocol of a ServiceEntry/Sidecar `Port`: its `protocol`, else the name prefix.
pub fn protocol_from(protocol: Option<&str>, name: Option<&str>) -> Protocol {
    let sp = ServicePort {
        name: protocol.map(|p| p.to_ascii_lowercase()).or_else(|| name.map(String::from)),
        ..ServicePort::default()
    };
    k8s_port(&sp).protocol
}

fn sorted_ports(mut ports: Vec<SvcPort>) -> Vec<SvcPort> {
    ports.sort_by_key(|p| p.number);
    ports.dedup_by_key(|p| p.number);
    ports
}

fn target_number(port: &SvcPort) -> u32 {
    match port.target {
        Target::Number(n) => n,
        Target::Same | Target::Name(_) => port.number,
    }
}

/// The address a workload serves `port` on, in `mode` (see the module docs of
/// [`super`] for the explicit-mode rule).
fn workload_endpoint(w: &Workload, port: &SvcPort, mode: ProxyMode, trust_domain: &str) -> Option<Ep> {
    // A gateway's endpoints carry no `tlsMode: istio` (Istio labels injected sidecars,
    // not gateways): auto mTLS sends them what their Gateway servers expect, plaintext to
    // an HTTP server; a DestinationRule's ISTIO_MUTUAL still gives mTLS.
    let gateway = w.id.starts_with(weft_xds::node::ROUTER_PREFIX);
    let identity = (super::mtls::in_mesh(&w.labels) && !gateway)
        .then(|| super::mtls::spiffe_id(trust_domain, &w.namespace, &w.service_account));
    let target = match &port.target {
        Target::Same => port.number,
        Target::Number(n) => *n,
        Target::Name(name) => u32::from(w.ports.iter().find(|p| &p.name == name)?.port),
    };
    if let (ProxyMode::Explicit, Some(inbound)) = (mode, w.inbound) {
        let index = w.ports.iter().position(|p| u32::from(p.port) == target).unwrap_or(0);
        let port = u32::from(inbound.port()).checked_add(u32::try_from(index).ok()?)?;
        return Some(Ep {
            host: inbound.ip().to_string(),
            port,
            weight: 1,
            identity,
            locality: Locality::of_labels(&w.labels),
            labels: w.labels.clone(),
        });
    }
    let ip = w.addresses.first()?;
    Some(Ep {
        host: ip.to_string(),
        port: target,
        weight: 1,
        identity,
        locality: Locality::of_labels(&w.labels),
        labels: w.labels.clone(),
    })
}

/// The endpoint of a WorkloadEntry (resource or ServiceEntry `endpoints`) for `port`;
/// `ip_only` skips entries whose address is not an IP (non-DNS clusters).
fn entry_endpoint(
    we: &WorkloadEntry,
    port: &SvcPort,
    ip_only: bool,
    namespace: &str,
    trust_domain: &str,
) -> Option<Ep> {
    let address = we.address.as_deref()?;
    if ip_only && address.parse::<IpAddr>().is_err() {
        return None;
    }
    let number = we.ports.get(&port.name).copied().unwrap_or_else(|| target_number(port));
    let identity = super::mtls::in_mesh(&we.labels)
        .then(|| super::mtls::spiffe_id(trust_domain, namespace, we.service_account.as_deref().unwrap_or("default")));
    let locality = match we.locality.as_deref().filter(|l| !l.is_empty()) {
        Some(l) => Locality::parse(l, '/'),
        None => Locality::of_labels(&we.labels),
    };
    Some(Ep {
        host: address.to_string(),
        port: number,
        weight: we.weight.unwrap_or(1).max(1),
        identity,
        locality,
        labels: we.labels.clone(),
    })
}

/// A socket address for a proxy-local listener port `base + index`.
pub fn offset(addr: SocketAddr, index: usize) -> Option<SocketAddr> {
    let port = u16::try_from(index).ok().and_then(|i| addr.port().checked_add(i))?;
    Some(SocketAddr::new(addr.ip(), port))
}
