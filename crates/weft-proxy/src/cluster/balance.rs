//! Choosing an endpoint: priority and health selection, then the cluster's policy.
//!
//! Endpoints are grouped per priority into healthy and degraded groups once, when the
//! cluster is built; `pick` only reads atomics (the round-robin cursor and the
//! endpoints' loads), so it never locks.

use crate::hash::stable_hash;
use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rand::Rng;

use crate::cluster::config::LbPolicy;
use crate::cluster::endpoints::{Endpoint, Health};

/// Places each member on the ring proportionally to its weight, at least
/// [`MIN_RING_SIZE`] points in all (Envoy's ring hash).
fn build_ring(members: &[usize], weights: &[u64], endpoints: &[Arc<Endpoint>]) -> Vec<(u64, usize)> {
    let total: u64 = weights.iter().sum();
    if total == 0 {
        return Vec::new();
    }
    let scale = MIN_RING_SIZE.div_ceil(total).max(1);
    let mut ring = Vec::with_capacity((total * scale) as usize);
    for (m, (&i, &w)) in members.iter().zip(weights).enumerate() {
        let key = endpoints[i].addr.to_string();
        for r in 0..w * scale {
            ring.push((stable_hash(format!("{key}_{r}").as_bytes()), m));
        }
    }
    ring.sort_unstable();
    ring
}

/// The longest precomputed round-robin sequence; bigger weight sums are scaled down.
const MAX_RR_SEQUENCE: u64 = 1 << 14;

/// Endpoint selection state of one cluster snapshot.
#[derive(Debug)]
pub(crate) struct Balancer {
    policy: LbPolicy,
    /// Ascending by priority.
    levels: Vec<Level>,
}

#[derive(Debug)]
struct Level {
    healthy: Group,
    degraded: Group,
}

/// Endpoints of one priority and health, with what each policy needs precomputed.
#[derive(Debug, Default)]
struct Group {
    /// Indices into the cluster's endpoints.
    members: Vec<usize>,
    /// Running sums of the members' weights (weighted random sampling).
    cumulative: Vec<u64>,
    /// Smooth weighted round-robin order, as indices into `members`.
    rr_sequence: Vec<usize>,
    rr_next: AtomicUsize,
    /// Consistent-hash ring: (point, index into `members`), sorted by point; built only
    /// for ring-hash clusters.
    ring: Vec<(u64, usize)>,
}

/// Envoy's `minimum_ring_size` default.
const MIN_RING_SIZE: u64 = 1024;

impl Balancer {
    /// Groups `endpoints` by priority (the parallel `priorities`) and health.
    pub(crate) fn new(policy: LbPolicy, endpoints: &[Arc<Endpoint>], priorities: &[u32]) -> Self {
        let mut by_priority: BTreeMap<u32, (Vec<usize>, Vec<usize>)> = BTreeMap::new();
        for (i, (ep, prio)) in endpoints.iter().zip(priorities).enumerate() {
            let entry = by_priority.entry(*prio).or_default();
            match ep.health {
                Health::Healthy => entry.0.push(i),
                Health::Degraded => entry.1.push(i),
                Health::Unhealthy => {}
            }
        }
        let levels = by_priority
            .into_values()
            .map(|(healthy, degraded)| Level {
                healthy: Group::new(healthy, endpoints, policy),
                degraded: Group::new(degraded, endpoints, policy),
            })
            .collect();
        Balancer { policy, levels }
    }

    /// Picks an endpoint index; see [`crate::cluster::Cluster::pick`].
    /// `out` marks endpoints that must not be picked at all (ejected); `exclude` only
    /// those to avoid when possible (tried already).
    pub(crate) fn pick(
        &self,
        endpoints: &[Arc<Endpoint>],
        exclude: &[SocketAddr],
        out: &dyn Fn(usize) -> bool,
        hash: Option<u64>,
    ) -> Option<usize> {
        let excluded = |i: usize| out(i) || exclude.contains(&endpoints[i].addr);
        if !exclude.is_empty() {
            if let Some(group) = self.group(|g| g.members.iter().any(|&i| !excluded(i))) {
                return group.pick(self.policy, endpoints, &excluded, hash);
            }
        }
        // Nothing left outside `exclude`: reusing a host beats failing.
        let group = self.group(|g| g.members.iter().any(|&i| !out(i)))?;
        group.pick(self.policy, endpoints, out, hash)
    }

    /// The lowest-priority healthy group that is usable, else the lowest degraded one.
    fn group(&self, usable: impl Fn(&Group) -> bool) -> Option<&Group> {
        self.levels
            .iter()
            .map(|l| &l.healthy)
            .find(|g| usable(g))
            .or_else(|| self.levels.iter().map(|l| &l.degraded).find(|g| usable(g)))
    }
}

impl Group {
    fn new(members: Vec<usize>, endpoints: &[Arc<Endpoint>], policy: LbPolicy) -> Self {
        let weights: Vec<u64> = members.iter().map(|&i| u64::from(endpoints[i].weight.max(1))).collect();
        let mut sum = 0;
        let cumulative = weights
            .iter()
            .map(|w| {
                sum += w;
                sum
            })
            .collect();
        let start = if members.is_empty() { 0 } else { rand::rng().random_range(0..members.len().max(1) * 64) };
        let ring = if policy == LbPolicy::RingHash { build_ring(&members, &weights, endpoints) } else { Vec::new() };
        Group { rr_sequence: smooth_sequence(&weights), members, cumulative, rr_next: AtomicUsize::new(start), ring }
    }

    /// The first ring point at or after `hash` (wrapping) whose endpoint is not excluded.
    fn ring_pick(&self, hash: u64, excluded: &dyn Fn(usize) -> bool) -> Option<usize> {
        if self.ring.is_empty() {
            return None;
        }
        let start = self.ring.partition_point(|(p, _)| *p < hash);
        (0..self.ring.len())
            .map(|k| self.members[self.ring[(start + k) % self.ring.len()].1])
            .find(|&member| !excluded(member))
    }

    fn pick(
        &self,
        policy: LbPolicy,
        endpoints: &[Arc<Endpoint>],
        excluded: &dyn Fn(usize) -> bool,
        hash: Option<u64>,
    ) -> Option<usize> {
        match policy {
            LbPolicy::RingHash => match hash {
                Some(h) => self.ring_pick(h, excluded),
                None => self.p2c(endpoints, excluded, |ep| ep.load.cost()),
            },
            LbPolicy::RoundRobin => self.round_robin(excluded),
            LbPolicy::Random => self.weighted_random(endpoints, excluded, None),
            LbPolicy::LeastRequest => self.p2c(endpoints, excluded, |ep| ep.load.in_flight() as f64),
            LbPolicy::PeakEwma => self.p2c(endpoints, excluded, |ep| ep.load.cost()),
        }
    }

    fn round_robin(&self, excluded: &dyn Fn(usize) -> bool) -> Option<usize> {
        let len = self.rr_sequence.len();
        for _ in 0..len {
            let n = self.rr_next.fetch_add(1, Ordering::Relaxed);
            let member = self.members[self.rr_sequence[n % len]];
            if !excluded(member) {
                return Some(member);
            }
        }
        None
    }

    /// Samples a member proportionally to weight, skipping `excluded` and `also_skip`.
    fn weighted_random(
        &self,
        endpoints: &[Arc<Endpoint>],
        excluded: &dyn Fn(usize) -> bool,
        also_skip: Option<usize>,
    ) -> Option<usize> {
        let mut rng = rand::rng();
        let skip = |i: usize| excluded(i) || also_skip == Some(i);
        let total: u64 =
            self.members.iter().filter(|&&i| !skip(i)).map(|&i| u64::from(endpoints[i].weight.max(1))).sum();
        if total == 0 {
            return None;
        }
        let mut r = rng.random_range(0..total);
        if also_skip.is_none() && self.cumulative.last() == Some(&total) {
            // Nothing skipped: binary search the running sums.
            let pos = self.cumulative.partition_point(|&c| c <= r);
            return self.members.get(pos).copied();
        }
        for &i in &self.members {
            if skip(i) {
                continue;
            }
            let w = u64::from(endpoints[i].weight.max(1));
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        None
    }

    /// Power of two choices: two distinct members sampled by weight, the cheaper wins.
    fn p2c(
        &self,
        endpoints: &[Arc<Endpoint>],
        excluded: &dyn Fn(usize) -> bool,
        cost: impl Fn(&Endpoint) -> f64,
    ) -> Option<usize> {
        let a = self.weighted_random(endpoints, excluded, None)?;
        let Some(b) = self.weighted_random(endpoints, excluded, Some(a)) else {
            return Some(a);
        };
        if cost(&endpoints[b]) < cost(&endpoints[a]) {
            Some(b)
        } else {
            Some(a)
        }
    }
}

/// Work budget (members x sequence length) for nginx's exact algorithm; bigger groups
/// use the earliest-deadline-first approximation.
const MAX_SWRR_WORK: u64 = 1 << 22;

/// One cycle of smooth weighted round robin over `weights` (after dividing by their
/// gcd and scaling down to [`MAX_RR_SEQUENCE`]): member `i` appears `weights[i]` times
/// per cycle, spread out as nginx does.
fn smooth_sequence(weights: &[u64]) -> Vec<usize> {
    if weights.is_empty() {
        return Vec::new();
    }
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut w: Vec<u64> = weights.iter().map(|x| x / g).collect();
    let total: u64 = w.iter().sum();
    if total > MAX_RR_SEQUENCE {
        for x in &mut w {
            *x = (*x * MAX_RR_SEQUENCE / total).max(1);
        }
    }
    let total: u64 = w.iter().sum();
    if total.saturating_mul(w.len() as u64) <= MAX_SWRR_WORK {
        nginx_sequence(&w, total)
    } else {
        edf_sequence(&w, total)
    }
}

/// nginx: every step each member gains its weight, the richest is picked and pays the total.
fn nginx_sequence(w: &[u64], total: u64) -> Vec<usize> {
    let signed_total = i64::try_from(total).unwrap_or(i64::MAX);
    let weights: Vec<i64> = w.iter().map(|&x| i64::try_from(x).unwrap_or(i64::MAX)).collect();
    let mut current = vec![0i64; w.len()];
    let mut seq = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..current.len() {
            current[i] += weights[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= signed_total;
        seq.push(best);
    }
    seq
}

/// Earliest deadline first: member `i`'s k-th turn is due at `(k - 0.5) / w[i]`.
fn edf_sequence(w: &[u64], total: u64) -> Vec<usize> {
    #[derive(PartialEq)]
    struct Slot {
        deadline: f64,
        index: usize,
    }
    impl Eq for Slot {}
    impl PartialOrd for Slot {
        fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for Slot {
        // Min-heap on (deadline, index).
        fn cmp(&self, other: &Self) -> CmpOrdering {
            other.deadline.total_cmp(&self.deadline).then(other.index.cmp(&self.index))
        }
    }
    let mut heap: BinaryHeap<Slot> =
        w.iter().enumerate().map(|(index, &x)| Slot { deadline: 0.5 / x as f64, index }).collect();
    let mut seq = Vec::with_capacity(total as usize);
    while (seq.len() as u64) < total {
        let Some(slot) = heap.pop() else { break };
        seq.push(slot.index);
        heap.push(Slot { deadline: slot.deadline + 1.0 / w[slot.index] as f64, index: slot.index });
    }
    seq
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(seq: &[usize], n: usize) -> Vec<u64> {
        let mut c = vec![0u64; n];
        for &i in seq {
            c[i] += 1;
        }
        c
    }

    #[test]
    fn nginx_sequence_matches_nginx_for_5_1_1() {
        assert_eq!(smooth_sequence(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn sequences_reduce_by_gcd() {
        assert_eq!(smooth_sequence(&[200, 100]).len(), 3);
    }

    #[test]
    fn big_groups_use_edf_with_exact_counts() {
        let weights: Vec<u64> = (0..2100).map(|i| 1 + (i % 3)).collect();
        let total: u64 = weights.iter().sum();
        assert!(total * weights.len() as u64 > MAX_SWRR_WORK, "exercises EDF");
        let seq = smooth_sequence(&weights);
        assert_eq!(counts(&seq, weights.len()), weights);
    }

    #[test]
    fn huge_weights_are_scaled_but_every_member_stays() {
        let seq = smooth_sequence(&[1_000_000, 1, 3]);
        assert!(seq.len() as u64 <= MAX_RR_SEQUENCE + 2);
        let c = counts(&seq, 3);
        assert!(c[1] >= 1 && c[2] >= 1 && c[0] > 1000, "{c:?}");
    }
}
