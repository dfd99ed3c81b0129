//! EndpointSlices (`discovery.k8s.io/v1`) as endpoints of Services without a selector,
//! as istiod reads them: each ready endpoint address of a slice labelled
//! `kubernetes.io/service-name: <svc>` is a `WorkloadEntry` `eps.<slice>.<i>` in the
//! slice's namespace, labelled [`super::SLICE_SERVICE_LABEL`]`: <svc>` (the selector weft
//! gives such a Service) with the slice's named ports. Slices the EndpointSlice
//! controller keeps for Services with a selector (`endpointslice.kubernetes.io/managed-by:
//! endpointslice-controller.k8s.io`) are skipped: the Pods are the source there (with
//! their labels, service accounts and readiness). The entries carry no
//! `security.istio.io/tlsMode`, so clients reach them in plain text, as Istio does for
//! endpoints it knows no sidecar of.

use kube::api::DynamicObject;
use serde_json::{json, Value};

/// The label naming a slice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label naming who manages a slice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// The EndpointSlice controller (slices mirroring a selector's Pods).
pub const SLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// The `WorkloadEntry` documents (JSON) a slice stands for; none when it belongs to no
/// Service, is the controller's, or lists no ready IP address.
pub fn workload_entries(obj: &DynamicObject) -> Vec<String> {
    let labels = obj.metadata.labels.clone().unwrap_or_default();
    let (Some(service), Some(name)) = (labels.get(SERVICE_NAME_LABEL), obj.metadata.name.as_deref()) else {
        return Vec::new();
    };
    if labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(SLICE_CONTROLLER) {
        return Vec::new();
    }
    let address_type = obj.data.get("addressType").and_then(Value::as_str).unwrap_or("IPv4");
    if address_type != "IPv4" && address_type != "IPv6" {
        return Vec::new();
    }
    let ports: serde_json::Map<String, Value> = obj
        .data
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let port = p.get("port").and_then(Value::as_u64)?;
            // An unnamed port (a Service's only one) is reached on the Service's targetPort.
            let name = p.get("name").and_then(Value::as_str).filter(|n| !n.is_empty())?;
            Some((name.to_string(), json!(port)))
        })
        .collect();
    let endpoints = obj.data.get("endpoints").and_then(Value::as_array).into_iter().flatten();
    endpoints
        .filter(|e| ready(e))
        .flat_map(|e| e.get("addresses").and_then(Value::as_array).into_iter().flatten().take(1))
        .filter_map(Value::as_str)
        .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
        .enumerate()
        .filter_map(|(i, address)| {
            let doc = json!({
                "apiVersion": "networking.istio.io/v1",
                "kind": "WorkloadEntry",
                "metadata": { "name": format!("eps.{name}.{i}"), "namespace": obj.metadata.namespace },
                "spec": {
                    "address": address,
                    "labels": { super::SLICE_SERVICE_LABEL: service },
                    "ports": ports,
                },
            });
            serde_json::to_string_pretty(&doc).ok()
        })
        .collect()
}

/// Whether an endpoint takes traffic: `conditions.ready` true or unset (the API's
/// meaning of unknown), and not terminating.
fn ready(e: &Value) -> bool {
    let c = e.get("conditions");
    let ready = c.and_then(|c| c.get("ready")).and_then(Value::as_bool).unwrap_or(true);
    let terminating = c.and_then(|c| c.get("terminating")).and_then(Value::as_bool).unwrap_or(false);
    ready && !terminating
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(labels: Value, endpoints: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": { "name": "db-1", "namespace": "shop", "labels": labels },
            "addressType": "IPv4",
            "ports": [{ "name": "tcp", "port": 5432, "protocol": "TCP" }],
            "endpoints": endpoints,
        }))
        .expect("a slice")
    }

    #[test]
    fn ready_addresses_of_a_services_slice_are_entries_with_its_label_and_ports() {
        let s = slice(
            json!({ SERVICE_NAME_LABEL: "db" }),
            json!([
                { "addresses": ["10.1.0.5"], "conditions": { "ready": true } },
                { "addresses": ["10.1.0.6"] },
                { "addresses": ["10.1.0.7"], "conditions": { "ready": false } },
                { "addresses": ["10.1.0.8"], "conditions": { "ready": true, "terminating": true } },
            ]),
        );
        let docs = workload_entries(&s);
        assert_eq!(docs.len(), 2, "{docs:?}");
        let parsed = weft_api::parse_str(&docs[1], std::path::Path::new("slice"));
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let r = &parsed.resources[0];
        assert_eq!((r.meta.namespace.as_str(), r.meta.name.as_str()), ("shop", "eps.db-1.1"));
        let weft_api::Spec::WorkloadEntry(we) = &r.spec else { panic!("not a WorkloadEntry: {:?}", r.spec) };
        assert_eq!(we.address.as_deref(), Some("10.1.0.6"));
        assert_eq!(we.labels.get(crate::kubernetes::SLICE_SERVICE_LABEL).map(String::as_str), Some("db"));
        assert_eq!(we.ports.get("tcp"), Some(&5432));
    }

    #[test]
    fn the_controllers_slices_and_slices_of_no_service_give_nothing() {
        let eps = json!([{ "addresses": ["10.1.0.5"] }]);
        assert!(workload_entries(&slice(
            json!({ MANAGED_BY_LABEL: SLICE_CONTROLLER, SERVICE_NAME_LABEL: "db" }),
            eps.clone()
        ))
        .is_empty());
        assert!(workload_entries(&slice(json!({}), eps)).is_empty());
    }
}
