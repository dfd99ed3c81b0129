//! The egress gateway of `weft up`: Istio's `istio-egressgateway` (labels
//! `istio: egressgateway`, namespace `istio-system`), a weft proxy with a gateway node id
//! on an address of its own, behind the Service Istio installs for it
//! (`istio-egressgateway.istio-system`, ports 80 → 8080 and 443 → 8443), so the egress
//! tasks' Gateways (servers on 80 and 443) and their VirtualServices (mesh routes to
//! `istio-egressgateway.istio-system.svc.cluster.local`) work as written.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

/// The egress gateway's labels (Istio's default egress gateway's).
pub const LABELS: [(&str, &str); 2] = [("istio", "egressgateway"), ("app", "istio-egressgateway")];
/// Namespace and service account (Istio's).
pub const NAMESPACE: &str = "istio-system";
/// The gateway Deployment's service account.
pub const SERVICE_ACCOUNT: &str = "istio-egressgateway-service-account";
/// Server port -> container port, as Istio's egress gateway Service maps them.
pub const PORTS: [(u16, u16); 2] = [(80, 8080), (443, 8443)];

/// The Service Istio installs for its egress gateway, applied by `weft up`.
pub const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: istio-egressgateway
  namespace: istio-system
  labels: {app: istio-egressgateway, istio: egressgateway}
spec:
  selector: {istio: egressgateway}
  ports:
  - {name: http2, port: 80, targetPort: 8080}
  - {name: https, port: 443, targetPort: 8443}
";

/// The gateway's node: gateway servers 80 and 443 bound on `ip` at 8080 and 8443.
pub fn node(ip: Ipv4Addr, domain: &str) -> weft_xds::NodeInfo {
    let pod = "istio-egressgateway-local";
    let labels: BTreeMap<String, String> = LABELS.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    weft_xds::NodeInfo {
        id: format!("router~{ip}~{pod}.{NAMESPACE}~{NAMESPACE}.svc.{domain}"),
        cluster: format!("istio-egressgateway.{NAMESPACE}"),
        name: pod.into(),
        workload_name: "istio-egressgateway".into(),
        cluster_id: weft_xds::node::DEFAULT_CLUSTER_ID.into(),
        namespace: NAMESPACE.into(),
        labels,
        service_account: SERVICE_ACCOUNT.into(),
        instance_ips: vec![ip.to_string()],
        gateway_ports: PORTS.into_iter().collect(),
        gateway_address: Some(IpAddr::V4(ip)),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_selects_the_gateway_and_maps_istios_ports() {
        let p = weft_api::parse_str(SERVICE, std::path::Path::new("egress.yaml"));
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let weft_api::Spec::Service(s) = &p.resources[0].spec else { panic!("not a Service") };
        let n = node(Ipv4Addr::new(127, 9, 9, 252), "cluster.local");
        assert!(s.selector.iter().all(|(k, v)| n.labels.get(k) == Some(v)));
        assert_eq!(n.gateway_ports.get(&80), Some(&8080));
        assert!(n.is_gateway());
    }
}
