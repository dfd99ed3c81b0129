//! Clusters: compiled config, endpoints, load balancing and upstream connection pools.
//!
//! A request reaches this stage with a cluster name. [`Cluster::pick`] chooses an
//! endpoint (priority, health, then the cluster's [`LbPolicy`]); [`Pools::send`] sends
//! the request over a pooled connection to it. Per-endpoint load ([`EndpointLoad`])
//! lives in a [`LoadRegistry`] so it survives config swaps; connections live in
//! [`Pools`], shared by all snapshots.

mod balance;
pub mod config;
pub mod endpoints;
pub mod ewma;
pub mod h1_client;
mod h1_codec;
mod h1_pool;
pub mod h2_client;
pub mod outlier;
pub mod pool;

use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, LocalityLbEndpoints};

pub use config::{ClusterConfig, Discovery, LbPolicy, Limits, UpstreamProtocol};
pub use endpoints::{Endpoint, Health};
pub use ewma::{ClusterLoad, EndpointLoad, InFlight, LoadRegistry, RequestPermit, RetryBudget, Slot};
pub use outlier::{Outcome, OutlierConfig};
pub use pool::{
    BoxBody, Connector, EndpointPoolStats, PoolConfig, PoolStats, Pools, UpstreamBody, UpstreamPrincipal,
    UpstreamStream,
};

use crate::cluster::balance::{Balancer, Place, DEFAULT_OVERPROVISIONING};
use crate::cluster::endpoints::{decode_assignment, HostAddr};
use crate::error::ConfigError;

/// A cluster snapshot: its config, current endpoints and balancer. Immutable; a new
/// EDS assignment builds a new `Cluster` (loads carry over through the registry).
#[derive(Debug)]
pub struct Cluster {
    /// The compiled configuration.
    pub config: Arc<ClusterConfig>,
    endpoints: Vec<Arc<Endpoint>>,
    balancer: Balancer,
    load: Arc<ClusterLoad>,
}

impl Cluster {
    /// Builds a cluster from its config and endpoints: `cla` for EDS clusters (None
    /// means no endpoints yet), `cla` or else `config.static_endpoints` for STATIC and
    /// DNS clusters. DNS hostnames must have been resolved already with
    /// [`resolve_dns`]; an unresolved hostname is a [`ConfigError`].
    pub fn new(
        config: Arc<ClusterConfig>,
        cla: Option<&ClusterLoadAssignment>,
        loads: &LoadRegistry,
    ) -> Result<Cluster, ConfigError> {
        let assignment = match config.discovery {
            Discovery::OriginalDst => None,
            Discovery::Eds { .. } => cla,
            _ => cla.or(config.static_endpoints.as_ref()),
        };
        let dns = matches!(config.discovery, Discovery::StrictDns | Discovery::LogicalDns);
        let raw = match assignment {
            Some(cla) => decode_assignment(&config.name, "load_assignment", cla, dns)?,
            None => Vec::new(),
        };
        let mut endpoints = Vec::with_capacity(raw.len());
        let mut places = Vec::with_capacity(raw.len());
        for r in raw {
            let addr = match r.addr {
                HostAddr::Ip(addr) => addr,
                HostAddr::Name(host, _) => {
                    return Err(ConfigError::new(
                        &config.name,
                        "load_assignment",
                        format!("hostname {host:?} is not resolved; pass the assignment from resolve_dns"),
                    ))
                }
            };
            places.push(Place { priority: r.priority, locality: r.locality, locality_weight: r.locality_weight });
            endpoints.push(Arc::new(Endpoint {
                addr,
                weight: r.weight,
                health: r.health,
                socket_match: config.socket_match(r.metadata.as_ref()),
                metadata: r.metadata,
                load: loads.get(&config.name, addr),
            }));
        }
        let overprovisioning = assignment
            .and_then(|cla| cla.policy.as_ref())
            .and_then(|p| p.overprovisioning_factor.as_ref())
            .map_or(DEFAULT_OVERPROVISIONING, |f| f.value);
        Ok(Cluster {
            balancer: Balancer::new(&config, overprovisioning, &endpoints, &places),
            load: loads.cluster(&config.name),
            endpoints,
            config,
        })
    }

    /// Pick an endpoint, skipping `exclude` when possible (retries prefer other hosts).
    /// Priorities as in Envoy: a priority takes min(100%, its healthy share x the
    /// overprovisioning factor, 1.4 by default) of the traffic and the rest spills to
    /// the next; endpoints ejected by outlier detection count as unhealthy; Degraded
    /// endpoints take what healthy ones leave. With `locality_weighted`, a locality of
    /// the chosen priority is drawn by weight x availability first.
    /// PeakEwma: P2C by cost = ewma_rtt * (in_flight + 1), weights honoured (the two
    /// candidates are sampled by weight, so equally loaded endpoints share by weight);
    /// LeastRequest: P2C on in-flight (Envoy's choice_count 2, weighted variant);
    /// RoundRobin: smooth weighted RR; Random: weighted random.
    /// ORIGINAL_DST clusters have no endpoints: the caller connects to the original
    /// destination itself.
    pub fn pick(&self, exclude: &[SocketAddr]) -> Option<Arc<Endpoint>> {
        self.pick_hashed(exclude, None)
    }

    /// Like [`Cluster::pick`], with the request's hash key for ring-hash clusters (other
    /// policies ignore it).
    ///
    /// Endpoints ejected by outlier detection are never picked, unless so few endpoints
    /// are healthy and not ejected that the cluster is in panic
    /// (`healthy_panic_threshold`), when ejections are ignored.
    pub fn pick_hashed(&self, exclude: &[SocketAddr], hash: Option<u64>) -> Option<Arc<Endpoint>> {
        // Without outlier detection no clock is read; with it, one read per pick.
        let now = self.config.outlier.as_ref().map(|_| outlier::now_ms());
        let ejecting = now.filter(|&now| self.load.any_ejected(now) && !self.in_panic(now));
        let i = if let Some(now) = ejecting {
            let ejected = |i: usize| self.endpoints[i].load.outlier.is_ejected(now);
            self.balancer.pick(&self.endpoints, exclude, Some(&ejected), hash)?
        } else {
            self.balancer.pick(&self.endpoints, exclude, None, hash)?
        };
        self.endpoints.get(i).cloned()
    }

    /// Reports what a request attempt to `ep` (an endpoint of this cluster) came to, for
    /// outlier detection; ejects it when a threshold is reached and the cluster's
    /// `max_ejection_percent` allows. Returns whether it was ejected.
    pub fn report(&self, ep: &Endpoint, outcome: Outcome) -> bool {
        let Some(cfg) = &self.config.outlier else { return false };
        if ep.load.outlier.record(cfg, outcome) != outlier::Verdict::Eject {
            return false;
        }
        let now = outlier::now_ms();
        let active = self.endpoints.iter().filter(|e| e.load.outlier.is_ejected(now)).count();
        if !cfg.may_eject(active, self.endpoints.len()) {
            return false;
        }
        ep.load.outlier.eject(cfg, now);
        self.load.note_ejection(ep.load.outlier.ejected_until());
        tracing::info!(cluster = %self.config.name, endpoint = %ep.addr, "outlier detection ejected the endpoint");
        true
    }

    /// Endpoints currently ejected by outlier detection.
    pub fn ejected(&self) -> Vec<SocketAddr> {
        let now = outlier::now_ms();
        self.endpoints.iter().filter(|e| e.load.outlier.is_ejected(now)).map(|e| e.addr).collect()
    }

    /// Envoy's panic: the share of endpoints healthy and not ejected is below
    /// `healthy_panic_threshold`.
    /// Envoy disregards the threshold while lower priorities can take what the ejected
    /// endpoints leave (normalized total availability of 100%).
    fn in_panic(&self, now: u64) -> bool {
        if self.balancer.fully_available(&|i| self.endpoints[i].load.outlier.is_ejected(now)) {
            return false;
        }
        let total = self.endpoints.len();
        let available =
            self.endpoints.iter().filter(|e| e.health == Health::Healthy && !e.load.outlier.is_ejected(now)).count();
        (available as f64) * 100.0 < self.config.panic_threshold * total as f64
    }

    /// All endpoints, in assignment order, whatever their health.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Outstanding requests of the cluster, shared across snapshots: the
    /// `limits.max_requests` hook (`load().try_start(limits.max_requests)`; None means
    /// the caller answers `Overflow`).
    pub fn load(&self) -> &Arc<ClusterLoad> {
        &self.load
    }
}

/// Resolves the hostnames of a STRICT_DNS or LOGICAL_DNS cluster's `load_assignment`
/// into an assignment of IP addresses, for [`Cluster::new`]. STRICT_DNS keeps every
/// address a name resolves to, LOGICAL_DNS the first. Resolution happens once per
/// call: weft does not re-resolve on `dns_refresh_rate` yet, the caller calls this
/// again when it rebuilds the cluster. Returns None for other discovery types.
pub async fn resolve_dns(config: &ClusterConfig) -> Result<Option<ClusterLoadAssignment>, ConfigError> {
    let strict = match config.discovery {
        Discovery::StrictDns => true,
        Discovery::LogicalDns => false,
        _ => return Ok(None),
    };
    let Some(cla) = &config.static_endpoints else {
        return Ok(None);
    };
    let mut out = cla.clone();
    for (i, locality) in out.endpoints.iter_mut().enumerate() {
        let mut resolved = Vec::new();
        for (j, lb) in locality.lb_endpoints.iter().enumerate() {
            let field = format!("load_assignment.endpoints[{i}].lb_endpoints[{j}]");
            let single = LocalityLbEndpoints { lb_endpoints: vec![lb.clone()], ..Default::default() };
            let probe = ClusterLoadAssignment { endpoints: vec![single], ..Default::default() };
            let raw = decode_assignment(&config.name, &field, &probe, true)?;
            let addrs: Vec<SocketAddr> = match raw.first().map(|r| &r.addr) {
                Some(HostAddr::Ip(a)) => vec![*a],
                Some(HostAddr::Name(host, port)) => {
                    let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), *port))
                        .await
                        .map_err(|e| {
                            ConfigError::new(
                                &config.name,
                                format!("{field}.endpoint.address.socket_address.address"),
                                format!("cannot resolve {host:?}: {e}"),
                            )
                        })?
                        .collect();
                    if strict {
                        found
                    } else {
                        found.into_iter().take(1).collect()
                    }
                }
                None => Vec::new(),
            };
            for addr in addrs {
                let mut copy = lb.clone();
                set_address(&mut copy, addr);
                resolved.push(copy);
            }
        }
        locality.lb_endpoints = resolved;
    }
    Ok(Some(out))
}

fn set_address(lb: &mut envoy_types::pb::envoy::config::endpoint::v3::LbEndpoint, addr: SocketAddr) {
    let address = Address {
        address: Some(AddressKind::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(addr.port()))),
            ..Default::default()
        })),
    };
    if let Some(HostIdentifier::Endpoint(e)) = &mut lb.host_identifier {
        e.address = Some(address);
    }
}

#[cfg(test)]
mod tests;
