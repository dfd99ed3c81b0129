//! Choosing an endpoint: priority and health selection, then the cluster's policy.
//!
//! Endpoints are grouped per priority (and per locality when the cluster is
//! locality-weighted) into healthy and degraded groups once, when the cluster is built.
//! A pick first draws a priority from Envoy's priority loads (overprovisioning factor),
//! then, for locality-weighted clusters, a locality by weight x availability, then an
//! endpoint by the cluster's policy. `pick` only reads atomics (the round-robin cursor
//! and the endpoints' loads), so it never locks; while endpoints are ejected the
//! loads are recomputed per pick from who is ejected.

use crate::hash::stable_hash;
use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rand::Rng;

use crate::cluster::config::{ClusterConfig, HashConfig, LbPolicy};
use crate::cluster::endpoints::{Endpoint, Health};

/// Envoy's default `overprovisioning_factor` (140 = 1.4).
pub(crate) const DEFAULT_OVERPROVISIONING: u32 = 140;

/// Where an endpoint sits in its assignment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Place {
    pub(crate) priority: u32,
    /// Index of its locality in the assignment.
    pub(crate) locality: usize,
    /// The locality's `load_balancing_weight` (0: unset).
    pub(crate) locality_weight: u32,
}

/// Places each member on the ring proportionally to its weight, at least
/// `min_ring_size` and at most `max_ring_size` points in all (Envoy's ring hash).
fn build_ring(members: &[usize], weights: &[u64], endpoints: &[Arc<Endpoint>], sizes: HashConfig) -> Vec<(u64, usize)> {
    let total: u64 = weights.iter().sum();
    if total == 0 {
        return Vec::new();
    }
    let target = sizes.min_ring_size.max(total).min(sizes.max_ring_size.max(members.len() as u64));
    let mut ring = Vec::with_capacity(target as usize + members.len());
    for (m, (&i, &w)) in members.iter().zip(weights).enumerate() {
        let key = endpoints[i].addr.to_string();
        let points = ((w as f64 / total as f64) * target as f64).ceil().max(1.0) as u64;
        for r in 0..points {
            ring.push((stable_hash(format!("{key}_{r}").as_bytes()), m));
        }
    }
    ring.sort_unstable();
    ring
}

/// Maglev's lookup table (Envoy's weighted variant): every member walks its own
/// permutation of the `size` slots and takes the next free one, members of weight w
/// taking turns w/max_weight as often as the heaviest. Slots hold indices into `members`.
fn build_maglev(members: &[usize], weights: &[u64], endpoints: &[Arc<Endpoint>], size: u64) -> Vec<u32> {
    let max = weights.iter().copied().max().unwrap_or(0);
    if members.is_empty() || max == 0 || size < 2 {
        return Vec::new();
    }
    struct Entry {
        offset: u64,
        skip: u64,
        next: u64,
        normalized: f64,
        target: f64,
    }
    let mut entries: Vec<Entry> = members
        .iter()
        .zip(weights)
        .map(|(&i, &w)| {
            let key = endpoints[i].addr.to_string();
            Entry {
                offset: stable_hash(key.as_bytes()) % size,
                skip: stable_hash(format!("{key}#skip").as_bytes()) % (size - 1) + 1,
                next: 0,
                normalized: w as f64 / max as f64,
                target: 0.0,
            }
        })
        .collect();
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    let mut iteration = 1u64;
    while filled < size {
        for (m, e) in entries.iter_mut().enumerate() {
            if filled == size {
                break;
            }
            if (iteration as f64) * e.normalized < e.target {
                continue;
            }
            e.target += 1.0;
            loop {
                let slot = ((e.offset + e.skip.wrapping_mul(e.next) % size) % size) as usize;
                e.next += 1;
                if table[slot] == u32::MAX {
                    table[slot] = m as u32;
                    filled += 1;
                    break;
                }
            }
        }
        iteration += 1;
    }
    table
}

/// The longest precomputed round-robin sequence; bigger weight sums are scaled down.
const MAX_RR_SEQUENCE: u64 = 1 << 14;

/// Endpoint selection state of one cluster snapshot.
#[derive(Debug)]
pub(crate) struct Balancer {
    policy: LbPolicy,
    /// Overprovisioning factor in percent (140 = 1.4).
    overprovisioning: u32,
    /// Ascending by priority.
    levels: Vec<Level>,
    /// Priority loads while nothing is ejected: (healthy, degraded) percent per level.
    loads: Vec<(f64, f64)>,
}

#[derive(Debug)]
struct Level {
    /// Endpoints of the priority, whatever their health.
    total: usize,
    healthy: Group,
    degraded: Group,
    /// Per locality, when the cluster is locality-weighted (else empty).
    localities: Vec<LocalityGroup>,
    /// The localities' effective weights while nothing is ejected.
    locality_weights: Vec<f64>,
}

#[derive(Debug)]
struct LocalityGroup {
    weight: u32,
    total: usize,
    healthy: Group,
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
    /// Maglev lookup table (indices into `members`); built only for Maglev clusters.
    maglev: Vec<u32>,
}

impl Balancer {
    /// Groups `endpoints` by priority (the parallel `places`), locality and health.
    pub(crate) fn new(
        config: &ClusterConfig,
        overprovisioning: u32,
        endpoints: &[Arc<Endpoint>],
        places: &[Place],
    ) -> Self {
        #[derive(Default)]
        struct Sorting {
            total: usize,
            healthy: Vec<usize>,
            degraded: Vec<usize>,
            /// locality index -> (weight, total, healthy)
            localities: BTreeMap<usize, (u32, usize, Vec<usize>)>,
        }
        let mut by_priority: BTreeMap<u32, Sorting> = BTreeMap::new();
        for (i, (ep, place)) in endpoints.iter().zip(places).enumerate() {
            let entry = by_priority.entry(place.priority).or_default();
            entry.total += 1;
            let locality = entry.localities.entry(place.locality).or_insert((place.locality_weight, 0, Vec::new()));
            locality.1 += 1;
            match ep.health {
                Health::Healthy => {
                    entry.healthy.push(i);
                    locality.2.push(i);
                }
                Health::Degraded => entry.degraded.push(i),
                Health::Unhealthy => {}
            }
        }
        let (policy, sizes) = (config.lb, config.hash);
        let levels: Vec<Level> = by_priority
            .into_values()
            .map(|s| {
                let localities: Vec<LocalityGroup> = if config.locality_weighted && !policy.is_hashing() {
                    s.localities
                        .into_values()
                        // Envoy: a locality without a weight takes no traffic.
                        .filter(|(weight, _, _)| *weight > 0)
                        .map(|(weight, total, healthy)| LocalityGroup {
                            weight,
                            total,
                            healthy: Group::new(healthy, endpoints, policy, sizes),
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                let locality_weights = localities
                    .iter()
                    .map(|l| effective_weight(l.weight, l.healthy.members.len(), l.total, overprovisioning))
                    .collect();
                Level {
                    total: s.total,
                    healthy: Group::new(s.healthy, endpoints, policy, sizes),
                    degraded: Group::new(s.degraded, endpoints, policy, sizes),
                    localities,
                    locality_weights,
                }
            })
            .collect();
        let counts: Vec<(usize, usize, usize)> =
            levels.iter().map(|l| (l.healthy.members.len(), l.degraded.members.len(), l.total)).collect();
        let loads = priority_loads(&counts, overprovisioning);
        Balancer { policy, overprovisioning, levels, loads }
    }

    /// Picks an endpoint index; see [`crate::cluster::Cluster::pick`].
    /// `out` marks endpoints that must not be picked at all (ejected; None: none is);
    /// `exclude` only those to avoid when possible (tried already).
    pub(crate) fn pick(
        &self,
        endpoints: &[Arc<Endpoint>],
        exclude: &[SocketAddr],
        out: Option<&dyn Fn(usize) -> bool>,
        hash: Option<u64>,
    ) -> Option<usize> {
        let is_out = |i: usize| out.is_some_and(|f| f(i));
        let excluded = |i: usize| is_out(i) || exclude.contains(&endpoints[i].addr);
        let dynamic;
        let loads = match out {
            None => &self.loads,
            Some(f) => {
                dynamic = priority_loads(&self.counts(f), self.overprovisioning);
                &dynamic
            }
        };
        // Envoy draws the priority from the hash for hashing policies.
        let roll = match hash {
            Some(h) => (h % 10_000) as f64 / 100.0,
            None => rand::rng().random_range(0.0..100.0),
        };
        if let Some((level, degraded)) = choose_level(loads, roll) {
            let level = &self.levels[level];
            let group = if degraded {
                Some(&level.degraded)
            } else if level.localities.is_empty() {
                Some(&level.healthy)
            } else {
                self.choose_locality(level, out)
            };
            if let Some(i) = group.and_then(|g| g.pick(self.policy, endpoints, &excluded, hash)) {
                return Some(i);
            }
        }
        // The drawn group is all excluded (a retry): the first group with another host.
        if !exclude.is_empty() {
            if let Some(group) = self.group(|g| g.members.iter().any(|&i| !excluded(i))) {
                return group.pick(self.policy, endpoints, &excluded, hash);
            }
        }
        // Nothing left outside `exclude`: reusing a host beats failing.
        let group = self.group(|g| g.members.iter().any(|&i| !is_out(i)))?;
        group.pick(self.policy, endpoints, &is_out, hash)
    }

    /// (healthy, degraded, total) per level, leaving `out` out.
    fn counts(&self, out: &dyn Fn(usize) -> bool) -> Vec<(usize, usize, usize)> {
        let up = |g: &Group| g.members.iter().filter(|&&i| !out(i)).count();
        self.levels.iter().map(|l| (up(&l.healthy), up(&l.degraded), l.total)).collect()
    }

    /// Whether the priorities together can take all the traffic without the endpoints
    /// `out` (Envoy's normalized total availability of 100%: panic thresholds are then
    /// disregarded).
    pub(crate) fn fully_available(&self, out: &dyn Fn(usize) -> bool) -> bool {
        let factor = f64::from(self.overprovisioning) / 100.0;
        let total: f64 = self
            .counts(out)
            .iter()
            .map(|&(h, d, t)| (100.0 * factor * (h + d) as f64 / t.max(1) as f64).min(100.0))
            .sum();
        total >= 100.0
    }

    /// Envoy's locality-weighted choice: weight x min(1, overprovisioning x healthy
    /// share), counted afresh only while endpoints are `out` (ejected).
    fn choose_locality<'a>(&self, level: &'a Level, out: Option<&dyn Fn(usize) -> bool>) -> Option<&'a Group> {
        let dynamic: Vec<f64>;
        let effective: &[f64] = match out {
            None => &level.locality_weights,
            Some(f) => {
                dynamic = level
                    .localities
                    .iter()
                    .map(|l| {
                        let up = l.healthy.members.iter().filter(|&&i| !f(i)).count();
                        effective_weight(l.weight, up, l.total, self.overprovisioning)
                    })
                    .collect();
                &dynamic
            }
        };
        let total: f64 = effective.iter().sum();
        if total <= 0.0 {
            return None;
        }
        let mut r = rand::rng().random_range(0.0..total);
        for (l, w) in level.localities.iter().zip(effective) {
            if r < *w {
                return Some(&l.healthy);
            }
            r -= w;
        }
        level.localities.iter().zip(effective).rev().find(|(_, w)| **w > 0.0).map(|(l, _)| &l.healthy)
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

impl LbPolicy {
    /// Whether the policy hashes requests (locality weights do not apply, as in Envoy).
    fn is_hashing(self) -> bool {
        matches!(self, LbPolicy::RingHash | LbPolicy::Maglev)
    }
}

/// A locality's weight x its availability, min(1, overprovisioning x up / total).
fn effective_weight(weight: u32, up: usize, total: usize, overprovisioning: u32) -> f64 {
    let availability = (f64::from(overprovisioning) / 100.0 * up as f64 / total.max(1) as f64).min(1.0);
    f64::from(weight) * availability
}

/// Envoy's priority loads: level p is `min(100, overprovisioning x available / total)`
/// healthy (then degraded), normalised by the total availability (capped at 100) and
/// handed out from priority 0 down until 100% is spent. `counts` holds (healthy,
/// degraded, total) per level. All zeros when nothing is available.
fn priority_loads(counts: &[(usize, usize, usize)], overprovisioning: u32) -> Vec<(f64, f64)> {
    let factor = f64::from(overprovisioning) / 100.0;
    let share = |n: usize, total: usize| (100.0 * factor * n as f64 / total.max(1) as f64).min(100.0);
    let healthy: Vec<f64> = counts.iter().map(|&(h, _, t)| share(h, t)).collect();
    let degraded: Vec<f64> = counts.iter().map(|&(_, d, t)| share(d, t)).collect();
    let availability = (healthy.iter().sum::<f64>() + degraded.iter().sum::<f64>()).min(100.0);
    let mut loads = vec![(0.0, 0.0); counts.len()];
    if availability <= 0.0 {
        return loads;
    }
    let mut left = 100.0;
    for (load, h) in loads.iter_mut().zip(&healthy) {
        load.0 = (h * 100.0 / availability).min(left);
        left -= load.0;
    }
    for (load, d) in loads.iter_mut().zip(&degraded) {
        load.1 = (d * 100.0 / availability).min(left);
        left -= load.1;
    }
    loads
}

/// The (level, degraded) whose slice of the cumulative loads holds `roll` (0..100).
fn choose_level(loads: &[(f64, f64)], roll: f64) -> Option<(usize, bool)> {
    let mut acc = 0.0;
    for (i, load) in loads.iter().enumerate() {
        acc += load.0;
        if roll < acc {
            return Some((i, false));
        }
    }
    for (i, load) in loads.iter().enumerate() {
        acc += load.1;
        if roll < acc {
            return Some((i, true));
        }
    }
    // Rounding: the last level with any load.
    loads
        .iter()
        .rposition(|l| l.0 > 0.0)
        .map(|i| (i, false))
        .or_else(|| loads.iter().rposition(|l| l.1 > 0.0).map(|i| (i, true)))
}

impl Group {
    fn new(members: Vec<usize>, endpoints: &[Arc<Endpoint>], policy: LbPolicy, sizes: HashConfig) -> Self {
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
        let ring =
            if policy == LbPolicy::RingHash { build_ring(&members, &weights, endpoints, sizes) } else { Vec::new() };
        let maglev = if policy == LbPolicy::Maglev {
            build_maglev(&members, &weights, endpoints, sizes.maglev_table_size)
        } else {
            Vec::new()
        };
        Group {
            rr_sequence: smooth_sequence(&weights),
            members,
            cumulative,
            rr_next: AtomicUsize::new(start),
            ring,
            maglev,
        }
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

    /// The Maglev slot of `hash`, or the next slot whose endpoint is not excluded.
    fn maglev_pick(&self, hash: u64, excluded: &dyn Fn(usize) -> bool) -> Option<usize> {
        let len = self.maglev.len();
        if len == 0 {
            return None;
        }
        let start = (hash % len as u64) as usize;
        let member = self.members[self.maglev[start] as usize];
        if !excluded(member) {
            return Some(member);
        }
        (1..len).map(|k| self.members[self.maglev[(start + k) % len] as usize]).find(|&m| !excluded(m))
    }

    fn pick(
        &self,
        policy: LbPolicy,
        endpoints: &[Arc<Endpoint>],
        excluded: &dyn Fn(usize) -> bool,
        hash: Option<u64>,
    ) -> Option<usize> {
        match (policy, hash) {
            (LbPolicy::RingHash, Some(h)) => self.ring_pick(h, excluded),
            (LbPolicy::Maglev, Some(h)) => self.maglev_pick(h, excluded),
            (LbPolicy::RingHash | LbPolicy::Maglev, None) => self.p2c(endpoints, excluded, |ep| ep.load.cost()),
            (LbPolicy::RoundRobin, _) => self.round_robin(excluded),
            (LbPolicy::Random, _) => self.weighted_random(endpoints, excluded, None),
            (LbPolicy::LeastRequest, _) => self.p2c(endpoints, excluded, |ep| ep.load.in_flight() as f64),
            (LbPolicy::PeakEwma, _) => self.p2c(endpoints, excluded, |ep| ep.load.cost()),
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
