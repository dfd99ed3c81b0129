//! What `weft up` runs, decided before anything starts: the workloads declared as
//! `LocalWorkload`s with their addresses and environment, and the proxies' bootstraps.
//! Pure functions, unit-tested; nothing here touches the system.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use weft_api::{Resource, Spec};
use weft_xds::node::PortInfo;
use weft_xds::NodeInfo;

/// Istio's port of the sidecar's outbound listener (explicit mode: the app's HTTP proxy).
pub const OUTBOUND_PORT: u16 = 15001;
/// Istio's port of the sidecar's inbound listener.
pub const INBOUND_PORT: u16 = 15006;
/// Istio's admin port.
pub const ADMIN_PORT: u16 = 15000;
/// Istio's metrics / health port.
pub const METRICS_PORT: u16 = 15020;

/// How workloads reach the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Each workload has its own loopback address; its app uses the sidecar as HTTP proxy.
    Explicit,
    /// Each workload has its own network namespace; iptables capture its traffic.
    Transparent,
}

/// One workload to run: a `LocalWorkload` with its place in the local mesh.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// `LocalWorkload` name (a Deployment's name in Kubernetes terms).
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Instance name (a pod's: `<name>-<suffix>`).
    pub pod_name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Service account (`default` when not given).
    pub service_account: String,
    /// The workload's address: a loopback address of its own (explicit) or its network
    /// namespace's address (transparent).
    pub ip: Ipv4Addr,
    /// Declared ports.
    pub ports: Vec<PortInfo>,
    /// argv, expanded; `weft` as the first word stays `weft` (the runner substitutes
    /// the running binary).
    pub argv: Vec<String>,
    /// Environment given to the app (on top of the inherited one).
    pub env: BTreeMap<String, String>,
}

impl Workload {
    /// The sidecar's outbound HTTP-proxy address (explicit mode).
    pub fn outbound(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), OUTBOUND_PORT)
    }

    /// Where the sidecar's health endpoint is reachable from the host.
    pub fn metrics(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), METRICS_PORT)
    }

    /// The sidecar's admin address as reachable from the host (explicit mode only: in
    /// transparent mode it is the namespace's loopback).
    pub fn admin(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), ADMIN_PORT)
    }

    /// SPIFFE identity.
    pub fn spiffe(&self, trust_domain: &str) -> String {
        format!("spiffe://{trust_domain}/ns/{}/sa/{}", self.namespace, self.service_account)
    }
}

/// The `LocalWorkload`s among `resources`, sorted by namespace and name, given
/// addresses from `ip_of(index)` and their environment for `mode`.
pub fn workloads(
    resources: &[Resource],
    mode: Mode,
    ip_of: impl Fn(usize) -> Ipv4Addr,
    suffix: impl Fn(&str) -> String,
) -> Vec<Workload> {
    let mut decls: Vec<(&Resource, &weft_api::LocalWorkload)> = resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::LocalWorkload(l) => Some((r, l)),
            _ => None,
        })
        .collect();
    decls.sort_by(|a, b| (&a.0.meta.namespace, &a.0.meta.name).cmp(&(&b.0.meta.namespace, &b.0.meta.name)));
    decls
        .into_iter()
        .enumerate()
        .map(|(i, (r, l))| {
            let ip = ip_of(i);
            let name = r.meta.name.clone();
            let namespace = r.meta.namespace.clone();
            let pod_name = format!("{name}-{}", suffix(&name));
            let service_account = l.service_account.clone().unwrap_or_else(|| "default".into());
            let app_address = match mode {
                Mode::Explicit => ip.to_string(),
                Mode::Transparent => Ipv4Addr::UNSPECIFIED.to_string(),
            };
            let mut env = BTreeMap::new();
            env.insert("POD_NAME".to_string(), pod_name.clone());
            env.insert("POD_NAMESPACE".to_string(), namespace.clone());
            env.insert("POD_IP".to_string(), ip.to_string());
            env.insert("INSTANCE_IP".to_string(), ip.to_string());
            env.insert("SERVICE_ACCOUNT".to_string(), service_account.clone());
            env.insert("WEFT_APP_ADDRESS".to_string(), app_address);
            if mode == Mode::Explicit {
                let proxy = format!("http://{ip}:{OUTBOUND_PORT}");
                let no_proxy = format!("localhost,127.0.0.1,{ip}");
                for (k, v) in
                    [("HTTP_PROXY", &proxy), ("http_proxy", &proxy), ("NO_PROXY", &no_proxy), ("no_proxy", &no_proxy)]
                {
                    env.insert(k.to_string(), v.clone());
                }
            }
            // Declared variables see the ones above and those declared before them.
            for (k, v) in &l.env {
                let value = expand(v, &env);
                env.insert(k.clone(), value);
            }
            let argv = l.command.iter().chain(&l.args).map(|a| expand(a, &env)).collect();
            let ports = l
                .ports
                .iter()
                .filter_map(|p| {
                    Some(PortInfo {
                        name: p.name.clone(),
                        port: u16::try_from(p.port).ok()?,
                        protocol: "TCP".into(),
                        app_protocol: p.protocol.as_ref().map(|s| s.to_ascii_lowercase()),
                    })
                })
                .collect();
            Workload { name, namespace, pod_name, labels: l.labels.clone(), service_account, ip, ports, argv, env }
        })
        .collect()
}

/// Kubernetes' `$(VAR)` expansion against `env`.
pub fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    weft_api::spec::expand_vars(s, |name| env.get(name).cloned())
}

/// Everything a proxy's bootstrap needs besides its node.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// The control plane's xDS address.
    pub xds: SocketAddr,
    /// More control-plane replicas' xDS addresses (`weft up --replicas`).
    pub replicas: Vec<SocketAddr>,
    /// Join token for the certificate.
    pub token: String,
    /// Admin address.
    pub admin: SocketAddr,
    /// Metrics / health address.
    pub metrics: SocketAddr,
    /// Access log destination.
    pub access_log: String,
    /// The control plane's TLS port and the mesh root file: the proxy reaches it there
    /// (first certificate verified with the root, then xDS and renewals over mTLS).
    pub tls: Option<(SocketAddr, std::path::PathBuf)>,
}

/// The node a workload's sidecar announces.
pub fn sidecar_node(w: &Workload, mode: Mode, domain: &str) -> NodeInfo {
    let ns = &w.namespace;
    NodeInfo {
        id: format!("sidecar~{}~{}.{ns}~{ns}.svc.{domain}", w.ip, w.pod_name),
        cluster: format!("{}.{ns}", w.labels.get("app").unwrap_or(&w.name)),
        name: w.pod_name.clone(),
        // The LocalWorkload is the Deployment: its name is the workload's.
        workload_name: w.name.clone(),
        cluster_id: weft_xds::node::DEFAULT_CLUSTER_ID.into(),
        namespace: ns.clone(),
        labels: w.labels.clone(),
        service_account: w.service_account.clone(),
        ports: w.ports.clone(),
        instance_ips: vec![w.ip.to_string()],
        inbound: (mode == Mode::Explicit).then(|| SocketAddr::new(IpAddr::V4(w.ip), INBOUND_PORT)),
        outbound: (mode == Mode::Explicit).then(|| w.outbound()),
        ..NodeInfo::default()
    }
}

/// A proxy bootstrap (YAML) for `node`.
pub fn bootstrap(node: &NodeInfo, s: &ProxySettings) -> anyhow::Result<String> {
    // Serialized as YAML directly (not through JSON), so integer map keys
    // (`gateway_ports`) stay integers.
    #[derive(serde::Serialize)]
    struct Identity<'a> {
        token: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        root_cert_file: Option<&'a std::path::Path>,
    }
    #[derive(serde::Serialize)]
    struct Xds {
        address: String,
    }
    #[derive(serde::Serialize)]
    struct Doc<'a> {
        node: &'a NodeInfo,
        xds: Xds,
        admin: String,
        metrics: String,
        access_log: &'a str,
        drain_timeout: &'a str,
        identity: Identity<'a>,
    }
    let doc = Doc {
        node,
        xds: Xds {
            // One control plane: its TLS port when it has one. Several replicas: every
            // replica's plaintext xDS address (the proxy fails over between them).
            address: if s.replicas.is_empty() {
                match &s.tls {
                    Some((tls, _)) => format!("https://{tls}"),
                    None => format!("http://{}", s.xds),
                }
            } else {
                std::iter::once(&s.xds).chain(&s.replicas).map(|a| format!("http://{a}")).collect::<Vec<_>>().join(",")
            },
        },
        admin: s.admin.to_string(),
        metrics: s.metrics.to_string(),
        access_log: &s.access_log,
        drain_timeout: "2s",
        identity: Identity { token: &s.token, root_cert_file: s.tls.as_ref().map(|(_, root)| root.as_path()) },
    };
    Ok(serde_yaml_ng::to_string(&doc)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn expansion_follows_kubernetes() {
        let e = env(&[("A", "1"), ("POD_IP", "127.9.0.2")]);
        assert_eq!(expand("--address=$(POD_IP)", &e), "--address=127.9.0.2");
        assert_eq!(expand("$(A)$(A)x", &e), "11x");
        assert_eq!(expand("$(MISSING) stays", &e), "$(MISSING) stays");
        assert_eq!(expand("$$(A) is escaped", &e), "$(A) is escaped");
        assert_eq!(expand("cost $5 and $(A", &e), "cost $5 and $(A");
        assert_eq!(expand("plain", &e), "plain");
    }

    const DEMO: &str = include_str!("../../demo/bookinfo.yaml");

    fn demo() -> Vec<Resource> {
        let parsed = weft_api::parse_str(DEMO, std::path::Path::new("bookinfo.yaml"));
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        parsed.resources
    }

    #[test]
    fn bundled_demo_has_istios_workloads() {
        let ws = workloads(&demo(), Mode::Explicit, |i| Ipv4Addr::new(127, 9, 0, 2 + i as u8), |_| "abcde".into());
        let names: Vec<_> = ws.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["details-v1", "productpage-v1", "ratings-v1", "reviews-v1", "reviews-v2", "reviews-v3"]);
        let r2 = &ws[4];
        assert_eq!(r2.service_account, "bookinfo-reviews");
        assert_eq!(r2.labels.get("version").map(String::as_str), Some("v2"));
        assert_eq!(r2.pod_name, "reviews-v2-abcde");
        assert_eq!(r2.ip, Ipv4Addr::new(127, 9, 0, 6));
        assert!(r2.argv.contains(&"--address=127.9.0.6".to_string()), "{:?}", r2.argv);
        assert_eq!(r2.env["HTTP_PROXY"], "http://127.9.0.6:15001");
        assert_eq!(
            r2.ports,
            vec![PortInfo { name: "http".into(), port: 9080, protocol: "TCP".into(), app_protocol: None }]
        );
    }

    #[test]
    fn transparent_apps_listen_everywhere_without_proxy_variables() {
        let ws = workloads(&demo(), Mode::Transparent, |i| Ipv4Addr::new(10, 250, 7, 2 + i as u8), |_| "x".into());
        assert!(ws[0].argv.contains(&"--address=0.0.0.0".to_string()));
        assert!(!ws[0].env.contains_key("HTTP_PROXY"));
        let node = sidecar_node(&ws[0], Mode::Transparent, "cluster.local");
        assert_eq!(node.inbound, None);
        assert_eq!(node.id, "sidecar~10.250.7.2~details-v1-x.default~default.svc.cluster.local");
    }

    #[test]
    fn bootstrap_is_accepted_by_the_proxy() {
        let ws = workloads(&demo(), Mode::Explicit, |i| Ipv4Addr::new(127, 9, 0, 2 + i as u8), |_| "q".into());
        let node = sidecar_node(&ws[0], Mode::Explicit, "cluster.local");
        let s = ProxySettings {
            xds: "127.0.0.1:15010".parse().unwrap(),
            replicas: vec!["127.0.0.1:15011".parse().unwrap()],
            token: "t".into(),
            admin: ws[0].admin(),
            metrics: ws[0].metrics(),
            access_log: "off".into(),
            tls: Some(("127.0.0.1:15012".parse().unwrap(), "/state/mesh-root.pem".into())),
        };
        let text = bootstrap(&node, &s).unwrap();
        let b = weft_proxy::bootstrap::Bootstrap::parse(&text, std::path::Path::new("b.yaml")).unwrap();
        assert_eq!(b.node.inbound, Some("127.9.0.2:15006".parse().unwrap()));
        // Several replicas: every replica's xDS address, the proxy fails over between them.
        assert_eq!(b.xds.address, "http://127.0.0.1:15010,http://127.0.0.1:15011");
        // One control plane: weft sidecars use its TLS port.
        let one = ProxySettings { replicas: Vec::new(), ..s.clone() };
        let single =
            weft_proxy::bootstrap::Bootstrap::parse(&bootstrap(&node, &one).unwrap(), std::path::Path::new("b.yaml"))
                .unwrap();
        assert_eq!(single.xds.address, "https://127.0.0.1:15012", "weft sidecars use the TLS port");
        assert_eq!(b.identity.unwrap().root_cert_file, Some("/state/mesh-root.pem".into()));
        assert_eq!(b.node.labels.get("app").map(String::as_str), Some("details"));
        assert_eq!((b.node.name.as_str(), b.node.workload_name.as_str()), ("details-v1-q", "details-v1"));
        assert_eq!(b.node.cluster_id, "Kubernetes");
        let gateway = NodeInfo {
            id: "router~127.0.0.1~gw.istio-system~istio-system.svc.cluster.local".into(),
            namespace: "istio-system".into(),
            service_account: "gw".into(),
            gateway_ports: [(8080, 18080)].into_iter().collect(),
            gateway_address: Some("127.0.0.1".parse().unwrap()),
            ..NodeInfo::default()
        };
        let b =
            weft_proxy::bootstrap::Bootstrap::parse(&bootstrap(&gateway, &s).unwrap(), std::path::Path::new("g.yaml"))
                .unwrap();
        assert_eq!(b.node.gateway_port(8080), 18080);
    }
}
