//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leaderelection
//! does it: the leader renews `spec.renewTime` every [`LeaseConfig::retry`]; a candidate
//! takes the Lease over when its record has not changed for `leaseDurationSeconds` as
//! measured by the candidate's own clock (so clocks need not agree), and every write
//! carries the `resourceVersion` it read, so two candidates never both win. A leader
//! that cannot renew within the renew deadline (half the lease duration, as Istio sets
//! it) steps down by itself, before any other candidate may take over; one that stops
//! releases the Lease (empty holder), so the next takes over at its next try.
//!
//! `weft control --kubernetes` runs one candidate per replica (`--leader-elect-*` flags;
//! Istio's timing by default: [`DEFAULT_LEASE_DURATION`], renew deadline and retry a half
//! and a quarter of it) and hands the outcome to every piece of singleton work as a
//! [`crate::leader::Leadership`].

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Istio's leader-election TTL (`pilot/pkg/leaderelection`: 30 s, renew deadline 15 s,
/// retry 7.5 s).
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(30);
/// The Lease's name unless `--leader-elect-resource-name` says otherwise.
pub const DEFAULT_LEASE_NAME: &str = "weft-control-leader";
/// The Lease's namespace when neither the flag nor `POD_NAMESPACE` gives one.
pub const DEFAULT_LEASE_NAMESPACE: &str = "weft-system";

/// Which Lease, who we are, and the timing.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This candidate's identity (the holder written into the Lease).
    pub identity: String,
    /// How long a record may go unrenewed before others take over (client-go: 15 s).
    pub lease_duration: Duration,
    /// How often the leader renews and candidates try (client-go: 2 s).
    pub retry: Duration,
}

impl LeaseConfig {
    /// Istio's timing for `lease_duration`: retry every quarter of it (the renew
    /// deadline is always half of it).
    pub fn new(namespace: &str, name: &str, identity: &str, lease_duration: Duration) -> LeaseConfig {
        LeaseConfig {
            namespace: namespace.to_string(),
            name: name.to_string(),
            identity: identity.to_string(),
            lease_duration,
            retry: lease_duration / 4,
        }
    }

    /// How long a leader keeps leading without a successful renewal: half the lease
    /// duration (never less than one retry), so it has stepped down before any other
    /// candidate's clock lets it take over.
    pub fn renew_deadline(&self) -> Duration {
        (self.lease_duration / 2).max(self.retry)
    }
}

/// A running candidate.
pub struct LeaseElection {
    leader: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

/// The last record seen and when (by our clock) it last changed.
struct Observed {
    record: (Option<String>, Option<String>),
    since: Instant,
}

impl LeaseElection {
    /// Starts competing for the Lease.
    pub fn start(client: Client, cfg: LeaseConfig) -> LeaseElection {
        let (tx, leader) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(Api::namespaced(client, &cfg.namespace), cfg, tx, stop_rx));
        LeaseElection { leader, stop, task: Some(task) }
    }

    /// True while this candidate leads.
    pub fn is_leader(&self) -> watch::Receiver<bool> {
        self.leader.clone()
    }

    /// Stops competing; a leader releases the Lease first.
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for LeaseElection {
    fn drop(&mut self) {
        // Dropped without `stop`: no release, the others wait out the lease.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn run(api: Api<Lease>, cfg: LeaseConfig, leader: watch::Sender<bool>, mut stop: watch::Receiver<bool>) {
    let mut observed: Option<Observed> = None;
    let mut renewed_at: Option<Instant> = None;
    let deadline = cfg.renew_deadline();
    loop {
        // A round that hangs (an API server that stopped answering) counts as failed.
        match tokio::time::timeout(deadline, try_acquire_or_renew(&api, &cfg, &mut observed)).await {
            Ok(Ok(true)) => renewed_at = Some(Instant::now()),
            Ok(Ok(false)) => renewed_at = None,
            Ok(Err(e)) => tracing::warn!(
                lease = %cfg.name, namespace = %cfg.namespace, error = %e,
                "lease: cannot read or write the Lease{}", super::rbac::hint(&e)
            ),
            Err(_) => tracing::warn!(lease = %cfg.name, "lease: no answer from the API server within {deadline:?}"),
        }
        // A leader that could not renew within the renew deadline is no longer one.
        let leads = renewed_at.is_some_and(|t| t.elapsed() < deadline);
        if *leader.borrow() != leads {
            tracing::info!(lease = %cfg.name, identity = %cfg.identity, leads, "lease: leadership changed");
            leader.send_replace(leads);
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.retry) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    if *leader.borrow() {
        leader.send_replace(false);
        if let Err(e) = release(&api, &cfg).await {
            tracing::warn!(lease = %cfg.name, error = %e, "lease: not released");
        }
    }
}

/// One round: whether we hold the Lease after it.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let seconds = i32::try_from(cfg.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta { name: Some(cfg.name.clone()), ..ObjectMeta::default() },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return created_or_lost(api.create(&PostParams::default(), &lease).await);
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let record = (holder.clone(), spec.renew_time.as_ref().map(|t| t.0.to_string()));
    let changed = observed.as_ref().is_none_or(|o| o.record != record);
    if changed {
        *observed = Some(Observed { record, since: Instant::now() });
    }
    let expired = observed.as_ref().is_some_and(|o| o.since.elapsed() >= cfg.lease_duration);
    let ours = holder.as_deref() == Some(cfg.identity.as_str());
    if !ours && holder.is_some() && !expired {
        return Ok(false);
    }
    if !ours {
        spec.holder_identity = Some(cfg.identity.clone());
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(now);
    spec.lease_duration_seconds = Some(seconds);
    // `replace` sends the resourceVersion read above: a concurrent writer makes it fail.
    created_or_lost(api.replace(&cfg.name, &PostParams::default(), &lease).await)
}

/// A write's outcome: ours on success, lost on a conflict, an error otherwise.
fn created_or_lost(result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

async fn release(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&cfg.name).await? else { return Ok(()) };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.acquire_time = None;
    spec.renew_time = None;
    api.replace(&cfg.name, &PostParams::default(), &lease).await.map(|_| ())
}
