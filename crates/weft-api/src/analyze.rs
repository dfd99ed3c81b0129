//! Cross-resource checks in the style of `istioctl analyze`, with Istio's
//! message codes so operators can look them up in Istio's documentation.
//!
//! | code | level | check |
//! |---|---|---|
//! | IST0101 | Error | referenced host, subset or gateway not found; DestinationRule host with no service |
//! | IST0109 | Error | two VirtualServices bound to the mesh define the same host |
//! | IST0111 | Error | several Sidecars without workload selector in one namespace |
//! | IST0112 | Error | destination on a multi-port service without `port` |
//! | IST0113 | Error | DestinationRule TLS mode conflicts with the PeerAuthentication of the target |
//! | IST0118 | Info | Service port name does not declare a protocol |
//! | IST0127 | Warning | Gateway or policy selector matches no known workload |
//! | IST0130 | Warning | VirtualService rule unreachable after a catch-all rule |
//! | IST0132 | Warning | VirtualService host not served by its Gateway |
//! | IST0160 | Error | several Telemetries without workload selector in one namespace |
//! | WFT0001 | Warning | a valid Istio field weft does not apply yet |
//! | WFT0002 | Error | Telemetry `accessLogging`: not applied (the proxy's bootstrap decides) |
//! | WFT0003 | Error | Telemetry `metrics`: not applied (every standard metric is reported) |
//! | WFT0004 | Warning | a Telemetry tracing field weft does not apply |
//! | WFT0005 | Warning | a DestinationRule field translated for Envoy that weft's proxy does not enforce |
//! | WFT0010 | Error | an EnvoyFilter patch weft does not apply (only the local rate limit filter's are) |
//! | WFT0020 | Warning | a kind of Istio or the Gateway API weft does not apply at all (WasmPlugin, HTTPRoute, ...) |
//! | WFT0021 | Warning | a field weft parses but does not apply ([`UNAPPLIED_FIELDS`], and a VirtualService's `tls` routes on sidecars), with its path |
//! | WFT0022 | Warning | a whole resource weft does not apply: a policy attached by `targetRef(s)` |
//! | WFT0023 | Warning | a Gateway API Gateway whose class weft does not serve (not `istio`, nor a GatewayClass of Istio's controller) |
//! | WFT0030 | Error | a Rollout's host has a VirtualService the rollout does not own (the rollout waits) |
//! | WFT0031 | Error | a Rollout's stable or canary subset is not in the host's DestinationRule |

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::fields::{self, FieldPath, Segment};
use crate::host;
use crate::spec::{ClientTlsMode, ConnectionPoolSettings, Destination, LabelSelector, MtlsMode, TrafficPolicy};
use crate::{Kind, Resource, ResourceKey, Skipped, Source, Spec};

/// The DNS domain of the mesh.
pub const DOMAIN: &str = "cluster.local";
/// Istio's root namespace: selector-less policies there apply mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";
/// API groups of Istio and the Kubernetes Gateway API: a document of one of their kinds
/// that parsing skips (weft has no [`Kind`] for it) is configuration weft does not apply.
/// (The standard `gateway.networking.k8s.io` kinds are applied: [`Kind::HttpRoute`] and
/// the others; one of its kinds weft has no [`Kind`] for, such as `UDPRoute` or
/// `BackendTLSPolicy`, is an error of that group, not a skipped document.)
pub const UNAPPLIED_GROUPS: &[&str] = &["extensions.istio.io", "gateway.networking.x-k8s.io", "install.istio.io"];
/// Fields weft parses (they are valid Istio) but does not apply, as
/// `(kind, path with list indices written [], why)`: reported as WFT0021 with the
/// resource's own path whenever set (not null, empty or `false`). The field-coverage test
/// (`weft-control --test fields_applied`) fails for a field that is neither applied
/// nor listed here; a field weft starts applying leaves this table.
pub const UNAPPLIED_FIELDS: &[(Kind, &str, &str)] = &[
    (
        Kind::KubernetesGateway,
        "spec.listeners[].allowedRoutes.namespaces.selector",
        "weft knows no Namespace labels: a listener with `from: Selector` admits routes of no namespace (use `All` or `Same`)",
    ),
    (
        Kind::VirtualService,
        "spec.http[].delegate",
        "VirtualService delegation is not supported: the rule routes nothing (put the routes in the root VirtualService)",
    ),
    (Kind::VirtualService, "spec.http[].match[].statPrefix", "weft keeps no per-route statistics"),
    (
        Kind::VirtualService,
        "spec.http[].retries.retryRemoteLocalities",
        "retries are not steered to other localities (Envoy's previous_priorities is not implemented by weft's proxy)",
    ),
    (Kind::DestinationRule, "spec.trafficPolicy.tls.caCrl", "certificate revocation lists are not checked"),
    (
        Kind::DestinationRule,
        "spec.trafficPolicy.tls.insecureSkipVerify",
        "the server certificate is always verified when caCertificates or subjectAltNames are given",
    ),
    (Kind::DestinationRule, "spec.trafficPolicy.portLevelSettings[].tls.caCrl", "certificate revocation lists are not checked"),
    (
        Kind::DestinationRule,
        "spec.trafficPolicy.portLevelSettings[].tls.insecureSkipVerify",
        "the server certificate is always verified when caCertificates or subjectAltNames are given",
    ),
    (Kind::DestinationRule, "spec.subsets[].trafficPolicy.tls.caCrl", "certificate revocation lists are not checked"),
    (
        Kind::DestinationRule,
        "spec.subsets[].trafficPolicy.tls.insecureSkipVerify",
        "the server certificate is always verified when caCertificates or subjectAltNames are given",
    ),
    (Kind::DestinationRule, "spec.subsets[].trafficPolicy.portLevelSettings[].tls.caCrl", "certificate revocation lists are not checked"),
    (
        Kind::DestinationRule,
        "spec.subsets[].trafficPolicy.portLevelSettings[].tls.insecureSkipVerify",
        "the server certificate is always verified when caCertificates or subjectAltNames are given",
    ),
    (Kind::ServiceEntry, "spec.addresses", "traffic is matched by host and port; the virtual IPs are not matched"),
    (
        Kind::ServiceEntry,
        "spec.subjectAltNames",
        "mTLS verifies the endpoints' SPIFFE identities (or a DestinationRule's tls.subjectAltNames)",
    ),
    (Kind::ServiceEntry, "spec.endpoints[].network", "weft has one network: multi-network gateways are not supported"),
    (Kind::WorkloadEntry, "spec.network", "weft has one network: multi-network gateways are not supported"),
    (Kind::Gateway, "spec.servers[].defaultEndpoint", "Istio does not implement it for Gateways either"),
    (Kind::Gateway, "spec.servers[].name", "weft keeps no per-server statistics"),
    (Kind::Gateway, "spec.servers[].port.targetPort", "gateway listeners listen on port.number (targetPort is for ServiceEntries)"),
    (Kind::Gateway, "spec.servers[].tls.caCrl", "certificate revocation lists are not checked"),
    (Kind::Gateway, "spec.servers[].tls.verifyCertificateSpki", "client certificates are verified by CA and subjectAltNames only"),
    (Kind::Gateway, "spec.servers[].tls.verifyCertificateHash", "client certificates are verified by CA and subjectAltNames only"),
    (Kind::Gateway, "spec.servers[].tls.cipherSuites", "the proxy's TLS library chooses the cipher suites"),
    (Kind::Gateway, "spec.servers[].tls.minProtocolVersion", "TLS 1.2 and 1.3 are always offered"),
    (Kind::Gateway, "spec.servers[].tls.maxProtocolVersion", "TLS 1.2 and 1.3 are always offered"),
    (
        Kind::RequestAuthentication,
        "spec.jwtRules[].timeout",
        "the control plane fetches jwksUri with its own timeout and inlines the keys",
    ),
    (Kind::Service, "spec.internalTrafficPolicy", "endpoints are not filtered by node"),
    (Kind::Service, "spec.publishNotReadyAddresses", "endpoints that are not ready are never published"),
    (
        Kind::Service,
        "spec.sessionAffinity",
        "no client-IP stickiness: use a DestinationRule's consistentHash useSourceIp",
    ),
    (
        Kind::EnvoyFilter,
        "spec.configPatches[].patch.value.typed_config.value.stage",
        "the local rate limit filter has no rate_limits actions in weft, so no stage selects them",
    ),
    (
        Kind::EnvoyFilter,
        "spec.configPatches[].patch.value.typed_config.value.vh_rate_limits",
        "routes carry no rate_limits actions in weft, so there is nothing to merge with the virtual host's",
    ),
    (Kind::Sidecar, "spec.ingress", "inbound listeners come from the workload's ports; Sidecar ingress listeners are not built"),
    (Kind::Sidecar, "spec.inboundConnectionPool", "inbound connection pools are not limited"),
    (Kind::Sidecar, "spec.outboundTrafficPolicy.egressProxy", "ALLOW_ANY traffic goes to its original destination"),
    (Kind::Sidecar, "spec.egress[].captureMode", "capture is set up by `weft iptables` / `weft up`, not per listener"),
    (Kind::Sidecar, "spec.egress[].port.targetPort", "egress listeners listen on port.number"),
    (
        Kind::VirtualService,
        "spec.tcp[].match[].destinationSubnets",
        "TCP routes match on port, source labels, namespace and gateways only",
    ),
    (
        Kind::VirtualService,
        "spec.tls[].match[].destinationSubnets",
        "TLS routes match on SNI, port, source labels, namespace and gateways only",
    ),
];
/// Exit code `istioctl analyze` uses when it finds issues at or above the threshold.
pub const EXIT_ISSUES_FOUND: i32 = 79;

/// Severity of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Worth knowing.
    Info,
    /// Probably a mistake.
    Warning,
    /// Traffic will not work as written.
    Error,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Stable code, e.g. `IST0101`.
    pub code: &'static str,
    /// Severity.
    pub level: Level,
    /// Resource the message is about.
    pub resource: ResourceKey,
    /// Where that resource was read.
    pub source: Source,
    /// Human-readable text.
    pub text: String,
}

/// A running workload known to the analyzer (from the registry in `--live` mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Namespace.
    pub namespace: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Info => "Info",
            Level::Warning => "Warning",
            Level::Error => "Error",
        })
    }
}

impl fmt::Display for Message {
    /// `Error [IST0101] (VirtualService default/reviews vs.yaml:3) Referenced host not found: "x"`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} [{}] ({} {}:{}) {}",
            self.level,
            self.code,
            self.resource,
            self.source.file.display(),
            self.source.line,
            self.text
        )
    }
}

/// A finding about a document parsing skipped (no [`Kind`], so no [`Message`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedMessage {
    /// Stable code, `WFT0020`.
    pub code: &'static str,
    /// Severity.
    pub level: Level,
    /// The document.
    pub skipped: Skipped,
    /// Human-readable text.
    pub text: String,
}

impl fmt::Display for SkippedMessage {
    /// `Warning [WFT0020] (WasmPlugin default/auth wasm.yaml:1) kind WasmPlugin ...`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.skipped;
        write!(
            f,
            "{} [{}] ({} {}/{} {}:{}) {}",
            self.level,
            self.code,
            s.kind,
            s.namespace,
            s.name,
            s.file.display(),
            s.line,
            self.text
        )
    }
}

/// WFT0020: documents of Istio and Gateway API kinds weft does not translate
/// ([`UNAPPLIED_GROUPS`]: WasmPlugin, Gateway, HTTPRoute, ...), which parsing skips as it
/// skips a Deployment; so that `weft apply` warns and `weft analyze` reports them instead
/// of counting "0 resources".
pub fn unapplied_kinds(skipped: &[Skipped]) -> Vec<SkippedMessage> {
    skipped
        .iter()
        .filter_map(|s| {
            let group = s.api_version.split_once('/').map(|(g, _)| g)?;
            UNAPPLIED_GROUPS.contains(&group).then(|| SkippedMessage {
                code: "WFT0020",
                level: Level::Warning,
                skipped: s.clone(),
                text: format!(
                    "kind {} ({}) is not applied by weft: the whole resource is ignored (docs/resources.md lists the kinds weft applies)",
                    s.kind, s.api_version
                ),
            })
        })
        .collect()
}

/// `istioctl analyze` style exit code: [`EXIT_ISSUES_FOUND`] when any message is
/// at or above `threshold`, else 0.
pub fn exit_code(messages: &[Message], threshold: Level) -> i32 {
    if messages.iter().any(|m| m.level >= threshold) {
        EXIT_ISSUES_FOUND
    } else {
        0
    }
}

/// Runs every check. Workloads are taken from `LocalWorkload` and
/// `WorkloadEntry` resources (and ServiceEntry endpoints); use
/// [`analyze_with_workloads`] to add live ones.
pub fn analyze(resources: &[Resource]) -> Vec<Message> {
    analyze_with_workloads(resources, &[])
}

/// Like [`analyze`], with extra running workloads. Selector checks (IST0127)
/// only run when at least one workload is known, since without any the
/// analyzer cannot tell "matches nothing" from "not told about pods".
pub fn analyze_with_workloads(resources: &[Resource], live: &[Workload]) -> Vec<Message> {
    let mut a = Analyzer { resources, workloads: live.to_vec(), out: Vec::new() };
    a.collect_workloads();
    a.destinations();
    a.slo_references();
    a.destination_rule_hosts();
    a.mesh_host_conflicts();
    a.gateways_of_virtual_services();
    a.unreachable_rules();
    a.service_port_names();
    a.selectors();
    a.singletons();
    a.mtls_conflicts();
    a.unapplied_fields();
    a.unapplied_telemetry();
    a.unapplied_envoy_filters();
    a.unapplied_table();
    a.rollouts();
    a.gateway_classes();
    a.out.sort_by(|x, y| (&x.source, x.code, &x.text).cmp(&(&y.source, y.code, &y.text)));
    a.out
}

struct Analyzer<'a> {
    resources: &'a [Resource],
    workloads: Vec<Workload>,
    out: Vec<Message>,
}

impl<'a> Analyzer<'a> {
    fn report(&mut self, r: &Resource, code: &'static str, level: Level, text: String) {
        self.out.push(Message { code, level, resource: r.key(), source: r.source.clone(), text });
    }

    fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &'a Resource> + 'a {
        self.resources.iter().filter(move |r| r.kind == kind)
    }

    fn collect_workloads(&mut self) {
        for r in self.resources {
            match &r.spec {
                Spec::LocalWorkload(l) => {
                    self.workloads.push(Workload { namespace: r.meta.namespace.clone(), labels: l.labels.clone() })
                }
                Spec::WorkloadEntry(w) => {
                    self.workloads.push(Workload { namespace: r.meta.namespace.clone(), labels: w.labels.clone() })
                }
                Spec::ServiceEntry(se) => {
                    for e in &se.endpoints {
                        self.workloads.push(Workload { namespace: r.meta.namespace.clone(), labels: e.labels.clone() });
                    }
                }
                _ => {}
            }
        }
    }

    /// The Service whose FQDN is `fqdn`.
    fn service(&self, fqdn: &str) -> Option<&'a Resource> {
        self.of_kind(Kind::Service)
            .find(|s| host::fqdn(&s.meta.name, &s.meta.namespace, DOMAIN).eq_ignore_ascii_case(fqdn))
    }

    /// Whether a Service or ServiceEntry provides `fqdn`.
    fn host_known(&self, fqdn: &str) -> bool {
        self.service(fqdn).is_some()
            || self.of_kind(Kind::ServiceEntry).any(|r| match &r.spec {
                Spec::ServiceEntry(se) => {
                    se.hosts.iter().any(|h| host::matches(&host::fqdn(h, &r.meta.namespace, DOMAIN), fqdn))
                }
                _ => false,
            })
    }

    /// Subset names defined by DestinationRules for `fqdn`.
    fn subsets(&self, fqdn: &str) -> BTreeSet<&'a str> {
        self.of_kind(Kind::DestinationRule)
            .filter_map(|r| match &r.spec {
                Spec::DestinationRule(dr) if host::matches(&host::fqdn(&dr.host, &r.meta.namespace, DOMAIN), fqdn) => {
                    Some(dr.subsets.iter().map(|s| s.name.as_str()))
                }
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// IST0101 for a ServiceLevelObjective's service or subset that nothing defines (the
    /// SLO would measure nothing, or, for a subset, could not be evaluated).
    fn slo_references(&mut self) {
        for r in self.of_kind(Kind::ServiceLevelObjective) {
            let Spec::ServiceLevelObjective(o) = &r.spec else { continue };
            let fqdn = host::fqdn(&o.service, &r.meta.namespace, DOMAIN);
            if !self.host_known(&fqdn) {
                self.report(r, "IST0101", Level::Error, format!("Referenced host not found: {:?}", o.service));
                continue;
            }
            if let Some(subset) = &o.subset {
                if !self.subsets(&fqdn).contains(subset.as_str()) {
                    let t =
                        format!("Referenced host+subset in destinationrule not found: \"{}+{}\"", o.service, subset);
                    self.report(r, "IST0101", Level::Error, t);
                }
            }
        }
    }

    /// IST0101 (host, subset) and IST0112 for every destination of every VirtualService.
    fn destinations(&mut self) {
        for r in self.of_kind(Kind::VirtualService) {
            let Spec::VirtualService(vs) = &r.spec else { continue };
            let mut dests: Vec<&Destination> = Vec::new();
            for h in &vs.http {
                dests.extend(h.route.iter().map(|d| &d.destination));
                dests.extend(h.mirror.iter());
                dests.extend(h.mirrors.iter().map(|m| &m.destination));
            }
            for t in &vs.tcp {
                dests.extend(t.route.iter().map(|d| &d.destination));
            }
            for t in &vs.tls {
                dests.extend(t.route.iter().map(|d| &d.destination));
            }
            let mut seen = BTreeSet::new();
            for d in dests {
                if !seen.insert((d.host.clone(), d.subset.clone(), d.port.map(|p| p.number))) {
                    continue;
                }
                let fqdn = host::fqdn(&d.host, &r.meta.namespace, DOMAIN);
                if !self.host_known(&fqdn) {
                    let t = format!("Referenced host not found: {:?}", d.host);
                    self.report(r, "IST0101", Level::Error, t);
                    continue;
                }
                if let Some(subset) = &d.subset {
                    if !self.subsets(&fqdn).contains(subset.as_str()) {
                        let t =
                            format!("Referenced host+subset in destinationrule not found: \"{}+{}\"", d.host, subset);
                        self.report(r, "IST0101", Level::Error, t);
                    }
                }
                if d.port.is_none() {
                    if let Some(Spec::Service(svc)) = self.service(&fqdn).map(|s| &s.spec) {
                        if svc.ports.len() > 1 {
                            let ports: Vec<u32> = svc.ports.iter().map(|p| p.port).collect();
                            let t = format!(
                                "This VirtualService routes to a service {fqdn:?} that exposes multiple ports {ports:?}. Specifying a port in the destination is required to disambiguate."
                            );
                            self.report(r, "IST0112", Level::Error, t);
                        }
                    }
                }
            }
        }
    }

    /// IST0101: a DestinationRule whose host has no Service or ServiceEntry.
    fn destination_rule_hosts(&mut self) {
        for r in self.of_kind(Kind::DestinationRule) {
            let Spec::DestinationRule(dr) = &r.spec else { continue };
            if dr.host.starts_with('*') {
                continue;
            }
            let fqdn = host::fqdn(&dr.host, &r.meta.namespace, DOMAIN);
            if !self.host_known(&fqdn) {
                let t = format!("Referenced host not found: {:?} (no Service or ServiceEntry)", dr.host);
                self.report(r, "IST0101", Level::Error, t);
            }
        }
    }

    /// IST0109: two VirtualServices on the mesh gateway with the same host.
    fn mesh_host_conflicts(&mut self) {
        let mut by_host: BTreeMap<String, Vec<&'a Resource>> = BTreeMap::new();
        for r in self.of_kind(Kind::VirtualService) {
            let Spec::VirtualService(vs) = &r.spec else { continue };
            let on_mesh = vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == "mesh");
            if !on_mesh {
                continue;
            }
            for h in &vs.hosts {
                by_host.entry(host::fqdn(h, &r.meta.namespace, DOMAIN)).or_default().push(r);
            }
        }
        for (h, rs) in by_host {
            // The same resource read twice (two versions of one file) is not a conflict.
            let distinct: BTreeSet<ResourceKey> = rs.iter().map(|r| r.key()).collect();
            if distinct.len() < 2 {
                continue;
            }
            let names: Vec<String> = distinct.iter().map(|k| format!("{}/{}", k.namespace, k.name)).collect();
            for r in rs {
                let t = format!(
                    "The VirtualServices {} associated with mesh gateway define the same host {h} which can lead to undefined behavior. This can be fixed by merging the conflicting VirtualServices into a single resource.",
                    names.join(",")
                );
                self.report(r, "IST0109", Level::Error, t);
            }
        }
    }

    /// IST0101 (gateway) and IST0132.
    fn gateways_of_virtual_services(&mut self) {
        for r in self.of_kind(Kind::VirtualService) {
            let Spec::VirtualService(vs) = &r.spec else { continue };
            for g in &vs.gateways {
                if g == "mesh" {
                    continue;
                }
                let (ns, name) = g.split_once('/').unwrap_or((&r.meta.namespace, g));
                let gw = self.of_kind(Kind::Gateway).find(|x| x.meta.namespace == ns && x.meta.name == name);
                let Some(gw) = gw else {
                    let t = format!("Referenced gateway not found: {g:?}");
                    self.report(r, "IST0101", Level::Error, t);
                    continue;
                };
                let Spec::Gateway(spec) = &gw.spec else { continue };
                let served: Vec<String> = spec
                    .servers
                    .iter()
                    .flat_map(|s| s.hosts.iter())
                    .map(|h| h.split_once('/').map(|(_, h)| h).unwrap_or(h).to_string())
                    .collect();
                let missing: Vec<&String> = vs
                    .hosts
                    .iter()
                    .filter(|h| !served.iter().any(|s| host::matches(s, h) || host::matches(h, s)))
                    .collect();
                if !missing.is_empty() {
                    let t = format!(
                        "one or more host {missing:?} defined in VirtualService {}/{} not found in Gateway {}/{}.",
                        r.meta.namespace, r.meta.name, gw.meta.namespace, gw.meta.name
                    );
                    self.report(r, "IST0132", Level::Warning, t);
                }
            }
        }
    }

    /// IST0130: rules after a catch-all HTTP rule are never used.
    fn unreachable_rules(&mut self) {
        for r in self.of_kind(Kind::VirtualService) {
            let Spec::VirtualService(vs) = &r.spec else { continue };
            if let Some(i) = vs.http.iter().position(|h| h.matches.is_empty()) {
                for j in i + 1..vs.http.len() {
                    let t = format!(
                        "VirtualService rule #{j} not used (only the last rule can have no matches; rule #{i} matches every request)."
                    );
                    self.report(r, "IST0130", Level::Warning, t);
                }
            }
        }
    }

    /// IST0118: Service port names should declare the protocol.
    fn service_port_names(&mut self) {
        for r in self.of_kind(Kind::Service) {
            let Spec::Service(s) = &r.spec else { continue };
            for p in &s.ports {
                if p.declared_protocol().is_some() {
                    continue;
                }
                let name = p.name.as_deref().unwrap_or("");
                let target = match &p.target_port {
                    Some(crate::spec::TargetPort::Number(n)) => n.to_string(),
                    Some(crate::spec::TargetPort::Name(n)) => n.clone(),
                    None => p.port.to_string(),
                };
                let t = format!(
                    "Port name {name} (port: {}, targetPort: {target}) doesn't follow the naming convention of Istio port.",
                    p.port
                );
                self.report(r, "IST0118", Level::Info, t);
            }
        }
    }

    fn any_workload_matches(&self, ns: Option<&str>, labels: &BTreeMap<String, String>) -> bool {
        self.workloads.iter().any(|w| {
            ns.is_none_or(|n| n == w.namespace || n == ROOT_NAMESPACE)
                && labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))
        })
    }

    /// IST0127: selectors that match no known workload.
    fn selectors(&mut self) {
        if self.workloads.is_empty() {
            return;
        }
        for r in self.resources {
            let (ns, labels): (Option<&str>, Option<&BTreeMap<String, String>>) = match &r.spec {
                Spec::Gateway(g) => (None, Some(&g.selector)),
                Spec::Sidecar(s) => (Some(r.meta.namespace.as_str()), s.workload_selector.as_ref().map(|w| &w.labels)),
                Spec::PeerAuthentication(p) => (Some(r.meta.namespace.as_str()), sel(&p.selector)),
                Spec::AuthorizationPolicy(p) => (Some(r.meta.namespace.as_str()), sel(&p.selector)),
                Spec::RequestAuthentication(p) => (Some(r.meta.namespace.as_str()), sel(&p.selector)),
                Spec::Telemetry(p) => (Some(r.meta.namespace.as_str()), sel(&p.selector)),
                _ => continue,
            };
            let Some(labels) = labels else { continue };
            if labels.is_empty() || self.any_workload_matches(ns, labels) {
                continue;
            }
            let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let t = format!("No matching workloads for this resource with the following labels: {}", shown.join(","));
            self.report(r, "IST0127", Level::Warning, t);
        }
    }

    /// IST0111 and IST0160: several selector-less Sidecars / Telemetries per namespace.
    fn singletons(&mut self) {
        for (kind, code, plural) in
            [(Kind::Sidecar, "IST0111", "Sidecars"), (Kind::Telemetry, "IST0160", "Telemetries")]
        {
            let mut by_ns: BTreeMap<&str, Vec<&'a Resource>> = BTreeMap::new();
            for r in self.of_kind(kind) {
                let no_selector = match &r.spec {
                    Spec::Sidecar(s) => s.workload_selector.is_none(),
                    Spec::Telemetry(t) => t.selector.is_none() && t.target_ref.is_none() && t.target_refs.is_empty(),
                    _ => false,
                };
                if no_selector {
                    by_ns.entry(r.meta.namespace.as_str()).or_default().push(r);
                }
            }
            for (ns, rs) in by_ns {
                if rs.len() < 2 {
                    continue;
                }
                let names: Vec<&str> = rs.iter().map(|r| r.meta.name.as_str()).collect();
                for r in rs {
                    let t = format!(
                        "The {plural} {names:?} in namespace {ns:?} have no workload selector, which can lead to undefined behavior."
                    );
                    self.report(r, code, Level::Error, t);
                }
            }
        }
    }

    /// WFT0001: a field weft accepts (it is valid Istio) but does not apply yet, so the
    /// traffic would not behave as the resource says. WFT0005: a field translated into
    /// Envoy's configuration that weft's own proxy does not enforce.
    fn unapplied_fields(&mut self) {
        for r in self.of_kind(Kind::VirtualService) {
            let Spec::VirtualService(vs) = &r.spec else { continue };
            let mesh = |g: &[String]| g.iter().any(|g| g == "mesh");
            let bound_to_mesh = vs.gateways.is_empty() || mesh(&vs.gateways);
            for (i, t) in vs.tls.iter().enumerate() {
                let on_mesh =
                    t.matches.iter().any(|m| if m.gateways.is_empty() { bound_to_mesh } else { mesh(&m.gateways) });
                if on_mesh {
                    let t = format!(
                        "spec.tls[{i}] is applied by weft's sidecars (the mesh gateway) only to CONNECT tunnels in explicit mode (to a TLS or TCP port of a MESH_EXTERNAL ServiceEntry); in transparent mode, and for services in the mesh, sidecars send TLS for a service to the service itself (Gateways' PASSTHROUGH servers apply it fully)"
                    );
                    self.report(r, "WFT0021", Level::Warning, t);
                }
            }
        }
        for r in self.resources {
            let refs = match &r.spec {
                Spec::AuthorizationPolicy(p) => p.target_ref.is_some() || !p.target_refs.is_empty(),
                Spec::RequestAuthentication(p) => p.target_ref.is_some() || !p.target_refs.is_empty(),
                Spec::Telemetry(p) => p.target_ref.is_some() || !p.target_refs.is_empty(),
                _ => false,
            };
            if refs {
                let t = format!(
                    "the whole {} is not applied by weft: it attaches by spec.targetRef(s), which Istio applies to waypoints and Gateway API gateways only; weft has neither (use spec.selector for sidecars)",
                    r.kind
                );
                self.report(r, "WFT0022", Level::Warning, t);
            }
        }
        for r in self.of_kind(Kind::DestinationRule) {
            let Spec::DestinationRule(dr) = &r.spec else { continue };
            let mut pools: Vec<(String, &ConnectionPoolSettings)> = Vec::new();
            let mut policy = |at: String, tp: &'a TrafficPolicy| {
                pools.extend(tp.connection_pool.as_ref().map(|p| (format!("{at}.connectionPool"), p)));
                for (i, pl) in tp.port_level_settings.iter().enumerate() {
                    let at = format!("{at}.portLevelSettings[{i}].connectionPool");
                    pools.extend(pl.connection_pool.as_ref().map(|p| (at, p)));
                }
            };
            if let Some(tp) = &dr.traffic_policy {
                policy("spec.trafficPolicy".into(), tp);
            }
            for (i, subset) in dr.subsets.iter().enumerate() {
                if let Some(tp) = &subset.traffic_policy {
                    policy(format!("spec.subsets[{i}].trafficPolicy"), tp);
                }
            }
            for (at, pool) in pools {
                if pool.tcp.as_ref().is_some_and(|t| t.idle_timeout.is_some()) {
                    let t = format!(
                        "{at}.tcp.idleTimeout is applied by weft to HTTP connections only (as the HTTP idle timeout when http.idleTimeout is unset): TCP connections through the sidecar keep the listener's idle timeout (1h)"
                    );
                    self.report(r, "WFT0001", Level::Warning, t);
                }
                if pool.http.as_ref().is_some_and(|h| h.max_concurrent_streams.is_some()) {
                    let t = format!(
                        "{at}.http.maxConcurrentStreams is translated for Envoy but not enforced by weft's proxy: its HTTP/2 upstream connections take as many streams as the server allows (bound requests with http2MaxRequests)"
                    );
                    self.report(r, "WFT0005", Level::Warning, t);
                }
            }
        }
    }

    /// WFT0002, WFT0003, WFT0004: Telemetry settings weft does not apply, so that nothing
    /// is accepted and silently ignored (docs/observability.md).
    fn unapplied_telemetry(&mut self) {
        for r in self.of_kind(Kind::Telemetry) {
            let Spec::Telemetry(t) = &r.spec else { continue };
            for (i, _) in t.access_logging.iter().enumerate() {
                let text = format!(
                    "spec.accessLogging[{i}] is not applied by weft: a proxy's access log is set by its bootstrap (`access_log`, `weft up --access-log`); remove it or expect every request to be logged as before"
                );
                self.report(r, "WFT0002", Level::Error, text);
            }
            for (i, _) in t.metrics.iter().enumerate() {
                let text = format!(
                    "spec.metrics[{i}] is not applied by weft: every proxy reports all of Istio's standard metrics with their standard labels; providers, overrides (disabled, tagOverrides) and reportingInterval are ignored"
                );
                self.report(r, "WFT0003", Level::Error, text);
            }
            let mut unapplied = Vec::new();
            for (i, tr) in t.tracing.iter().enumerate() {
                if tr.use_request_id_for_trace_sampling == Some(false) {
                    unapplied.push(format!(
                        "spec.tracing[{i}].useRequestIdForTraceSampling: false: the sampling decision is always taken from x-request-id, as Envoy's default"
                    ));
                }
                if tr.enable_istio_tags == Some(false) {
                    unapplied.push(format!(
                        "spec.tracing[{i}].enableIstioTags: false: spans always carry Istio's attributes"
                    ));
                }
            }
            for u in unapplied {
                self.report(r, "WFT0004", Level::Warning, format!("{u} (not applied by weft)"));
            }
        }
    }

    /// WFT0010: EnvoyFilter patches weft does not apply (it applies the local rate limit
    /// filter's `HTTP_FILTER` insertion and `HTTP_ROUTE` / `VIRTUAL_HOST` merges only).
    fn unapplied_envoy_filters(&mut self) {
        for r in self.of_kind(Kind::EnvoyFilter) {
            let Spec::EnvoyFilter(ef) = &r.spec else { continue };
            for u in ef.unapplied() {
                let text = format!("{} is not applied by weft: {}", u.path, u.reason);
                self.report(r, "WFT0010", Level::Error, text);
            }
        }
    }

    /// WFT0021: every set field listed in [`UNAPPLIED_FIELDS`].
    fn unapplied_table(&mut self) {
        for r in self.resources {
            let entries: Vec<&(Kind, &str, &str)> = UNAPPLIED_FIELDS.iter().filter(|e| e.0 == r.kind).collect();
            if entries.is_empty() {
                continue;
            }
            let spec = r.spec.to_json();
            let root = FieldPath(vec![Segment::Key("spec".into())]);
            for path in fields::paths(&spec, &root) {
                let normalized = path.normalized();
                let Some((_, _, why)) = entries.iter().find(|e| e.1 == normalized) else { continue };
                let set = match fields::get(&spec, &FieldPath(path.0[1..].to_vec())) {
                    None | Some(serde_json::Value::Null | serde_json::Value::Bool(false)) => false,
                    Some(serde_json::Value::Array(a)) => !a.is_empty(),
                    Some(serde_json::Value::Object(o)) => !o.is_empty(),
                    Some(_) => true,
                };
                if set {
                    self.report(r, "WFT0021", Level::Warning, format!("{path} is not applied by weft: {why}"));
                }
            }
        }
    }

    /// Effective PeerAuthentication mode for workloads selected by `svc_selector`
    /// in `ns`: workload policy, then namespace policy, then mesh policy.
    fn peer_mode(&self, ns: &str, svc_selector: &BTreeMap<String, String>) -> Option<(MtlsMode, &'a Resource)> {
        let mut workload = None;
        let mut namespace = None;
        let mut mesh = None;
        for r in self.of_kind(Kind::PeerAuthentication) {
            let Spec::PeerAuthentication(pa) = &r.spec else { continue };
            let Some(mode) = pa.mtls.and_then(|m| m.mode).filter(|m| *m != MtlsMode::Unset) else {
                continue;
            };
            match &pa.selector {
                Some(s) if r.meta.namespace == ns => {
                    let sub = s.match_labels.iter().all(|(k, v)| svc_selector.get(k) == Some(v));
                    if sub && !s.match_labels.is_empty() {
                        workload = Some((mode, r));
                    }
                }
                None if r.meta.namespace == ns => namespace = Some((mode, r)),
                None if r.meta.namespace == ROOT_NAMESPACE => mesh = Some((mode, r)),
                _ => {}
            }
        }
        workload.or(namespace).or(mesh)
    }

    /// IST0113: client TLS (DestinationRule) contradicts server mTLS (PeerAuthentication).
    fn mtls_conflicts(&mut self) {
        for r in self.of_kind(Kind::DestinationRule) {
            let Spec::DestinationRule(dr) = &r.spec else { continue };
            let Some(tls) = dr.traffic_policy.as_ref().and_then(|t| t.tls.as_ref()) else {
                continue;
            };
            let fqdn = host::fqdn(&dr.host, &r.meta.namespace, DOMAIN);
            let Some(svc) = self.service(&fqdn) else { continue };
            let Spec::Service(spec) = &svc.spec else { continue };
            let Some((mode, pa)) = self.peer_mode(&svc.meta.namespace, &spec.selector) else {
                continue;
            };
            let client_mtls = tls.mode == ClientTlsMode::IstioMutual;
            let conflict = (tls.mode == ClientTlsMode::Disable && mode == MtlsMode::Strict)
                || (client_mtls && mode == MtlsMode::Disable);
            if conflict {
                let t = format!(
                    "A DestinationRule and Policy are in conflict with regards to mTLS for host {fqdn}. The DestinationRule \"{}/{}\" specifies that mTLS must be {client_mtls} but the Policy object \"{}/{}\" specifies {}.",
                    r.meta.namespace,
                    r.meta.name,
                    pa.meta.namespace,
                    pa.meta.name,
                    match mode {
                        MtlsMode::Strict => "Strict",
                        MtlsMode::Disable => "Disable",
                        MtlsMode::Permissive => "Permissive",
                        MtlsMode::Unset => "Unset",
                    }
                );
                self.report(r, "IST0113", Level::Error, t);
            }
        }
    }
}

fn sel(s: &Option<LabelSelector>) -> Option<&BTreeMap<String, String>> {
    s.as_ref().map(|s| &s.match_labels)
}

impl<'a> Analyzer<'a> {
    /// WFT0023: a Gateway API Gateway no controller of weft serves (its status stays
    /// `Accepted: Unknown`, as Kubernetes leaves a Gateway no controller picks up).
    fn gateway_classes(&mut self) {
        use crate::spec::gateway_api::{CONTROLLER, ISTIO_CLASS};
        let served: BTreeSet<&str> = self
            .of_kind(Kind::GatewayClass)
            .filter(|r| matches!(&r.spec, Spec::GatewayClass(c) if c.controller_name == CONTROLLER))
            .map(|r| r.meta.name.as_str())
            .chain([ISTIO_CLASS])
            .collect();
        for r in self.of_kind(Kind::KubernetesGateway) {
            let Spec::KubernetesGateway(g) = &r.spec else { continue };
            if !served.contains(g.gateway_class_name.as_str()) {
                let text = format!(
                    "Gateway class {:?} is not served by weft: the Gateway configures no proxy (use `istio`, or a GatewayClass whose controllerName is {CONTROLLER})",
                    g.gateway_class_name
                );
                self.report(r, "WFT0023", Level::Warning, text);
            }
        }
    }

    /// WFT0030: a VirtualService for a Rollout's host not written by that rollout (the
    /// rollout never overwrites it, and waits). WFT0031: a Rollout subset missing from
    /// the host's DestinationRules.
    fn rollouts(&mut self) {
        use crate::spec::rollout::{MANAGED_BY_ANNOTATION, ROLLOUT_LABEL};
        for r in self.of_kind(Kind::Rollout) {
            let Spec::Rollout(ro) = &r.spec else { continue };
            let fqdn = host::fqdn(&ro.host, &r.meta.namespace, DOMAIN);
            for vs in self.of_kind(Kind::VirtualService) {
                let Spec::VirtualService(spec) = &vs.spec else { continue };
                let owned = vs.meta.annotations.get(MANAGED_BY_ANNOTATION).is_some_and(|m| m == "rollout")
                    && vs.meta.labels.get(ROLLOUT_LABEL) == Some(&r.meta.name)
                    && vs.meta.namespace == r.meta.namespace;
                if owned
                    || !spec.hosts.iter().any(|h| host::fqdn(h, &vs.meta.namespace, DOMAIN).eq_ignore_ascii_case(&fqdn))
                {
                    continue;
                }
                let text = format!(
                    "Rollout host {fqdn} is routed by VirtualService {}/{}, which the rollout does not own: the rollout waits and never overwrites it (delete it, or let the rollout write the routing)",
                    vs.meta.namespace, vs.meta.name
                );
                self.report(r, "WFT0030", Level::Error, text);
            }
            let subsets = self.subsets(&fqdn);
            for (what, s) in [("stable", &ro.stable.subset), ("canary", &ro.canary.subset)] {
                if !subsets.contains(s.as_str()) {
                    let text = format!("Rollout {what} subset {s:?} is not a subset of a DestinationRule for {fqdn}");
                    self.report(r, "WFT0031", Level::Error, text);
                }
            }
        }
    }
}
