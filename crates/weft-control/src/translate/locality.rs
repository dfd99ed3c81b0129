//! Locality-aware load balancing: where workloads are, and Istio's `localityLbSetting`.
//!
//! A workload's locality comes from its labels as Istio reads them: `istio-locality`
//! (`region.zone.subzone`), else `topology.kubernetes.io/region` / `zone` and
//! `topology.istio.io/subzone` (a proxy's `node.locality` becomes those labels, see
//! `weft_xds::node`); a WorkloadEntry's `locality` field (`region/zone/subzone`) wins
//! for it. Endpoints are grouped into one `LocalityLbEndpoints` per locality.
//!
//! Locality load balancing is on when the DestinationRule's policy has outlier detection
//! and its `localityLbSetting` is not `enabled: false` (Istio's default mesh setting is
//! enabled). The assignment then depends on the client proxy's locality:
//! - `distribute`: the first rule whose `from` matches the proxy gives each locality
//!   matching a `to` key its share of the weight (split among the localities a wildcard
//!   matches by their endpoint weights); localities no key matches get no traffic;
//! - otherwise failover priorities: same region/zone/subzone 0, same region/zone 1,
//!   same region 2, other regions 3, and with a `failover` rule whose `from` is the
//!   proxy's region, regions other than its `to` drop to 4; with `failoverPriority`,
//!   endpoints matching the proxy on all N labels are priority 0, on the first N-1
//!   priority 1, ..., on none N (Istio's order of preference; a `key=value` entry
//!   compares with `value` instead of the proxy's label). Priorities are then
//!   renumbered without gaps.
//!
//! The cluster gets `locality_weighted_lb_config` so the proxy honours the locality
//! weights (each locality weighs the sum of its endpoints' weights unless distributed).

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::Locality as EnvoyLocality;
use weft_api::spec::{LocalityDistribute as Distribute, LocalityLbSetting};
use weft_xds::node::{LOCALITY_LABEL, REGION_LABEL, SUBZONE_LABEL, ZONE_LABEL};

/// Where a workload runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Locality {
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// Subzone.
    pub subzone: String,
}

/// How the endpoints of one cluster are laid out for one client.
#[derive(Debug, Clone, PartialEq)]
pub enum Layout {
    /// Priority per endpoint (index-parallel with the endpoints).
    Priorities(Vec<u32>),
    /// Weight per locality (localities missing take no traffic).
    Weights(BTreeMap<Locality, u32>),
}

impl Locality {
    /// Parses `region<sep>zone<sep>subzone` (missing parts are empty).
    pub fn parse(s: &str, sep: char) -> Locality {
        let mut parts = s.splitn(3, sep).map(str::to_string);
        Locality {
            region: parts.next().unwrap_or_default(),
            zone: parts.next().unwrap_or_default(),
            subzone: parts.next().unwrap_or_default(),
        }
    }

    /// The locality a workload's labels say, as Istio reads them.
    pub fn of_labels(labels: &BTreeMap<String, String>) -> Locality {
        if let Some(l) = labels.get(LOCALITY_LABEL).filter(|l| !l.is_empty()) {
            return Locality::parse(l, '.');
        }
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        Locality { region: get(REGION_LABEL), zone: get(ZONE_LABEL), subzone: get(SUBZONE_LABEL) }
    }

    /// Whether nothing is known.
    pub fn is_empty(&self) -> bool {
        self.region.is_empty() && self.zone.is_empty() && self.subzone.is_empty()
    }

    /// Envoy's `Locality`.
    pub fn to_envoy(&self) -> EnvoyLocality {
        EnvoyLocality { region: self.region.clone(), zone: self.zone.clone(), sub_zone: self.subzone.clone() }
    }

    /// Istio's `LocalityMatch`: `pattern` is `region/zone/subzone` where a part may be `*`
    /// (matching anything from there on) and missing parts match anything.
    pub fn matches(&self, pattern: &str) -> bool {
        for (part, value) in pattern.split('/').zip([&self.region, &self.zone, &self.subzone]) {
            if part == "*" {
                return true;
            }
            if part != value {
                return false;
            }
        }
        true
    }

    /// Istio's `LbPriority`: 0 all equal, 1 region and zone, 2 region, 3 none.
    fn priority(&self, other: &Locality) -> u32 {
        if self.region != other.region {
            3
        } else if self.zone != other.zone {
            2
        } else if self.subzone != other.subzone {
            1
        } else {
            0
        }
    }
}

/// How `endpoints` (locality, labels, weight) are laid out under `setting` for a
/// client at `proxy` with `proxy_labels`; None when the setting changes nothing (the
/// client's locality is unknown and no `failoverPriority` is given).
pub fn layout(
    setting: &LocalityLbSetting,
    proxy: &Locality,
    proxy_labels: &BTreeMap<String, String>,
    endpoints: &[(&Locality, &BTreeMap<String, String>, u32)],
) -> Option<Layout> {
    if !setting.distribute.is_empty() {
        let rule = setting.distribute.iter().find(|d| proxy.matches(&d.from))?;
        return Some(Layout::Weights(distribute(rule, endpoints)));
    }
    if !setting.failover_priority.is_empty() {
        let n = setting.failover_priority.len() as u32;
        let raw = endpoints
            .iter()
            .map(|(locality, labels, _)| {
                let matched = setting
                    .failover_priority
                    .iter()
                    .take_while(|entry| {
                        // `key=value` compares endpoints with the given value instead of
                        // the client's own.
                        let (key, forced) = match entry.split_once('=') {
                            Some((k, v)) => (k, Some(v)),
                            None => (entry.as_str(), None),
                        };
                        let want = forced.or_else(|| label_value(key, proxy, proxy_labels));
                        want == label_value(key, locality, labels)
                    })
                    .count() as u32;
                n - matched
            })
            .collect();
        return Some(Layout::Priorities(compact(raw)));
    }
    if proxy.is_empty() {
        return None;
    }
    let raw = endpoints
        .iter()
        .map(|(locality, _, _)| {
            let p = proxy.priority(locality);
            match setting.failover.iter().find(|f| f.from == proxy.region) {
                Some(f) if p == 3 && locality.region != f.to => 4,
                _ => p,
            }
        })
        .collect();
    Some(Layout::Priorities(compact(raw)))
}

/// A label of `failoverPriority`: the locality labels read the locality (so a
/// `node.locality` or `istio-locality` counts), others the workload's labels.
fn label_value<'a>(key: &str, locality: &'a Locality, labels: &'a BTreeMap<String, String>) -> Option<&'a str> {
    match key {
        REGION_LABEL => Some(locality.region.as_str()),
        ZONE_LABEL => Some(locality.zone.as_str()),
        SUBZONE_LABEL => Some(locality.subzone.as_str()),
        _ => labels.get(key).map(String::as_str),
    }
}

/// Istio's `applyLocalityWeight` for one rule: locality -> weight.
fn distribute(rule: &Distribute, endpoints: &[(&Locality, &BTreeMap<String, String>, u32)]) -> BTreeMap<Locality, u32> {
    let mut own: BTreeMap<Locality, u32> = BTreeMap::new();
    for (locality, _, weight) in endpoints {
        *own.entry((*locality).clone()).or_default() += weight;
    }
    // Istio walks `to` in map order (random); weft takes the most specific patterns
    // first, so a wildcard gets what the exact keys leave.
    let mut to: Vec<(&String, u32)> = rule.to.iter().map(|(k, w)| (k, *w)).collect();
    to.sort_by_key(|(k, _)| (std::cmp::Reverse(k.split('/').take_while(|p| *p != "*").count()), k.to_string()));
    let mut out = BTreeMap::new();
    for (pattern, weight) in to {
        let matched: Vec<(&Locality, u32)> = own
            .iter()
            .filter(|(l, _)| !out.contains_key(*l) && l.matches(pattern))
            .map(|(l, w)| (l, (*w).max(1)))
            .collect();
        let total: u64 = matched.iter().map(|(_, w)| u64::from(*w)).sum();
        for (l, w) in matched {
            let share = (u64::from(w) * u64::from(weight)).div_ceil(total.max(1));
            out.insert(l.clone(), u32::try_from(share).unwrap_or(u32::MAX));
        }
    }
    out.retain(|_, w| *w > 0);
    out
}

/// Renumbers priorities 0..N in order, without gaps (as Envoy expects).
fn compact(raw: Vec<u32>) -> Vec<u32> {
    let mut levels: Vec<u32> = raw.clone();
    levels.sort_unstable();
    levels.dedup();
    raw.iter().map(|p| levels.iter().position(|l| l == p).unwrap_or(0) as u32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(s: &str) -> Locality {
        Locality::parse(s, '/')
    }

    #[test]
    fn labels_give_the_locality_istio_locality_first() {
        let mut labels: BTreeMap<String, String> =
            [(REGION_LABEL.to_string(), "r1".to_string()), (ZONE_LABEL.to_string(), "z1".to_string())].into();
        assert_eq!(Locality::of_labels(&labels), loc("r1/z1"));
        labels.insert(LOCALITY_LABEL.into(), "r2.z2.s2".into());
        assert_eq!(Locality::of_labels(&labels), loc("r2/z2/s2"));
    }

    #[test]
    fn patterns_match_as_istio_does() {
        let l = loc("r1/z1/s1");
        assert!(l.matches("r1/z1/s1") && l.matches("r1/*") && l.matches("*") && l.matches("r1/z1"));
        assert!(!l.matches("r1/z2/*") && !l.matches("r2"));
    }

    #[test]
    fn failover_priorities_follow_region_zone_subzone_and_failover_rules() {
        let none = BTreeMap::new();
        let (a, b, c, d, e) = (loc("r1/z1/s1"), loc("r1/z1/s2"), loc("r1/z2"), loc("r2/z1"), loc("r3/z1"));
        let eps: Vec<_> = [&a, &b, &c, &d, &e].into_iter().map(|l| (l, &none, 1)).collect();
        let plain = LocalityLbSetting::default();
        assert_eq!(layout(&plain, &a, &none, &eps), Some(Layout::Priorities(vec![0, 1, 2, 3, 3])));
        let rule = LocalityLbSetting {
            failover: vec![weft_api::spec::LocalityFailover { from: "r1".into(), to: "r3".into() }],
            ..Default::default()
        };
        assert_eq!(layout(&rule, &a, &none, &eps), Some(Layout::Priorities(vec![0, 1, 2, 4, 3])));
        // Unknown client locality: nothing to prefer.
        assert_eq!(layout(&plain, &Locality::default(), &none, &eps), None);
    }

    #[test]
    fn failover_priority_counts_matching_labels_in_order() {
        let keys = ["network".to_string(), REGION_LABEL.to_string()];
        let setting = LocalityLbSetting { failover_priority: keys.to_vec(), ..Default::default() };
        let me: BTreeMap<String, String> = [("network".to_string(), "n1".to_string())].into();
        let other: BTreeMap<String, String> = [("network".to_string(), "n2".to_string())].into();
        let (r1, r2) = (loc("r1/z1"), loc("r2/z1"));
        let eps = [(&r1, &me, 1), (&r2, &me, 1), (&r1, &other, 1)];
        assert_eq!(layout(&setting, &r1, &me, &eps), Some(Layout::Priorities(vec![0, 1, 2])));
        // `key=value` prefers that value over the client's own.
        let forced = LocalityLbSetting { failover_priority: vec!["network=n2".into()], ..Default::default() };
        assert_eq!(layout(&forced, &r1, &me, &eps), Some(Layout::Priorities(vec![1, 1, 0])));
    }

    #[test]
    fn distribute_splits_a_wildcard_by_endpoint_weight_and_drops_the_rest() {
        let none = BTreeMap::new();
        let (a, b, c, d) = (loc("r1/z1"), loc("r1/z2"), loc("r1/z3"), loc("r2/z1"));
        let eps = [(&a, &none, 1), (&b, &none, 1), (&c, &none, 3), (&d, &none, 1)];
        let setting = LocalityLbSetting {
            distribute: vec![Distribute {
                from: "r1/z1/*".into(),
                to: [("r1/z1/*".to_string(), 60), ("r1/*".to_string(), 40)].into(),
            }],
            ..Default::default()
        };
        let Some(Layout::Weights(w)) = layout(&setting, &a, &none, &eps) else { panic!("weights") };
        // The wildcard "r1/*" takes what "r1/z1/*" leaves: b and c, 1:3 by endpoint weight.
        assert_eq!(w.get(&a), Some(&60));
        assert_eq!(w.get(&b), Some(&10));
        assert_eq!(w.get(&c), Some(&30));
        assert_eq!(w.get(&d), None);
        // A client no rule is from: no layout.
        assert_eq!(layout(&setting, &d, &none, &eps), None);
    }
}
