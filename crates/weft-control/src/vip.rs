//! Service addresses (VIPs), for transparent capture.
//!
//! A captured connection carries only its original destination, an address and a port.
//! Several TCP services may share a port (3306 for every database), so the outbound
//! listener of that port tells them apart by address, as Istio's `<VIP>_<port>`
//! listeners do: each Service's `clusterIP`/`clusterIPs`, or, for a Service without
//! one (local runs have no Kubernetes to allocate it), an address from
//! [`SERVICE_RANGE`], the range Istio's DNS proxying auto-allocates from.
//!
//! The allocation depends only on the set of Services, never on their order, and one
//! Service's address moves only when another takes its slot first (a hash collision), so
//! `weft up`, which writes the addresses into the namespaces' `/etc/hosts`, and the
//! control plane, which matches them, agree without talking to each other.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use weft_api::{Resource, Spec};

/// Where addresses for Services without a `clusterIP` come from.
pub const SERVICE_RANGE: &str = "240.240.0.0/16";

const RANGE_BASE: u32 = u32::from_be_bytes([240, 240, 0, 0]);
/// Host numbers 1..=65534 of the /16 (neither the network nor the broadcast address).
const RANGE_HOSTS: u32 = 65_534;

/// Every Service's addresses, keyed by (namespace, name): its valid `clusterIP` and
/// `clusterIPs` (in that order, without duplicates), else one allocated address.
/// Headless Services (`None`) get an allocated address too: locally it is how the
/// name resolves.
pub fn service_addresses(resources: &[Resource]) -> BTreeMap<(String, String), Vec<IpAddr>> {
    let mut out = BTreeMap::new();
    let mut wanting = BTreeSet::new();
    let mut taken = BTreeSet::new();
    for r in resources {
        let Spec::Service(s) = &r.spec else { continue };
        let key = (r.meta.namespace.clone(), r.meta.name.clone());
        let mut ips: Vec<IpAddr> = Vec::new();
        for ip in s.cluster_ip.iter().chain(&s.cluster_ips).filter_map(|ip| ip.parse::<IpAddr>().ok()) {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        if ips.is_empty() {
            wanting.insert(key);
        } else {
            for ip in &ips {
                if let IpAddr::V4(v4) = ip {
                    taken.insert(u32::from(*v4));
                }
            }
            out.insert(key, ips);
        }
    }
    // Sorted by (namespace, name): who wins a collided slot does not depend on file order.
    for key in wanting {
        let mut host = fnv1a(&format!("{}/{}", key.0, key.1)) % RANGE_HOSTS + 1;
        let mut tries = 0;
        while taken.contains(&(RANGE_BASE + host)) && tries < RANGE_HOSTS {
            host = host % RANGE_HOSTS + 1;
            tries += 1;
        }
        if tries == RANGE_HOSTS {
            continue; // 65,534 Services without an address: the rest get none
        }
        taken.insert(RANGE_BASE + host);
        out.insert(key, vec![IpAddr::V4(Ipv4Addr::from(RANGE_BASE + host))]);
    }
    out
}

/// 32-bit FNV-1a: stable across builds and platforms, unlike std's hasher.
fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services(yaml: &str) -> Vec<Resource> {
        let parsed = weft_api::parse_str(yaml, std::path::Path::new("t.yaml"));
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        parsed.resources
    }

    fn svc(name: &str, cluster_ip: Option<&str>) -> String {
        let ip = cluster_ip.map(|ip| format!("  clusterIP: {ip}\n")).unwrap_or_default();
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n{ip}  ports: [{{name: tcp, port: 9000}}]\n---\n")
    }

    #[test]
    fn cluster_ips_are_kept_and_the_rest_allocated_from_the_range_independent_of_order() {
        let a = svc("db-a", None) + &svc("db-b", Some("10.96.0.7")) + &svc("db-c", Some("None"));
        let b = svc("db-c", Some("None")) + &svc("db-a", None) + &svc("db-b", Some("10.96.0.7"));
        let (va, vb) = (service_addresses(&services(&a)), service_addresses(&services(&b)));
        assert_eq!(va, vb, "file order must not move addresses");
        let key = |n: &str| ("default".to_string(), n.to_string());
        assert_eq!(va[&key("db-b")], vec!["10.96.0.7".parse::<IpAddr>().unwrap()]);
        for n in ["db-a", "db-c"] {
            let [IpAddr::V4(ip)] = va[&key(n)][..] else { panic!("{n}: {:?}", va[&key(n)]) };
            assert_eq!(&ip.octets()[..2], &[240, 240], "{n}: {ip}");
        }
        assert_ne!(va[&key("db-a")], va[&key("db-c")]);

        // Adding a Service moves no other one (barring a collision on its slot).
        let more = a.clone() + &svc("db-d", None);
        let vm = service_addresses(&services(&more));
        for n in ["db-a", "db-b", "db-c"] {
            assert_eq!(vm[&key(n)], va[&key(n)], "{n}");
        }
    }

    #[test]
    fn an_allocated_slot_taken_by_a_cluster_ip_moves_to_the_next_free_one() {
        let free = service_addresses(&services(&svc("db-a", None)));
        let IpAddr::V4(slot) = free[&("default".to_string(), "db-a".to_string())][0] else { panic!() };
        let both = svc("db-a", None) + &svc("owner", Some(&slot.to_string()));
        let v = service_addresses(&services(&both));
        assert_eq!(v[&("default".to_string(), "owner".to_string())], vec![IpAddr::V4(slot)]);
        let IpAddr::V4(moved) = v[&("default".to_string(), "db-a".to_string())][0] else { panic!() };
        assert_eq!(u32::from(moved), RANGE_BASE + (u32::from(slot) - RANGE_BASE) % RANGE_HOSTS + 1);
    }
}
