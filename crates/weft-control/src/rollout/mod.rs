//! Progressive delivery: `Rollout` canaries and staged configuration changes, driven by
//! the control plane from the proxies' own metrics ([`crate::meshstats`]).
//!
//! - [`RolloutController::reconcile`] runs every [`TICK`] while this control plane is the
//!   leader. For each `Rollout` in the store it keeps a [`RolloutState`], judges the
//!   canary every `analysis.interval` ([`decide`]), and writes the step's routing as the
//!   VirtualService a person would have written ([`routing`]), labelled
//!   `weft.dev/rollout` and annotated `weft.dev/managed-by: rollout`, through the
//!   store's apply. A VirtualService of the same host that the rollout does not own is
//!   never overwritten: the rollout waits (phase `Waiting`) and says why.
//! - Staged changes ([`staged`]): `weft apply --staged` hands VirtualServices,
//!   DestinationRules and AuthorizationPolicies to the controller instead of the store;
//!   the xDS source serves them to a canary share of the proxies they change, and the
//!   controller applies them everywhere or drops them after an interval of comparison.
//! - The state ([`state::Persisted`]) is one JSON document behind
//!   [`RolloutStateStore`], saved after every change and loaded at start, so a
//!   restarted control plane resumes each rollout at its step.

pub mod api;
pub mod decide;
pub mod routing;
pub mod staged;
pub mod state;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use weft_api::{host, Kind, Resource, Rollout, Spec};

use crate::meshstats::{Reporter, Selector, SharedStats};
use crate::store::ResourceStore;
pub use state::{FileStateStore, MemoryStateStore, Persisted, Phase, RolloutState, RolloutStateStore};

/// How often rollouts are looked at (an analysis runs when its interval is due).
pub const TICK: Duration = Duration::from_millis(250);
/// How far back the callers of a staged routing change's hosts are looked for.
const CALLERS_WINDOW: Duration = Duration::from_secs(600);

/// A change asked for by hand (`weft rollout promote|pause|resume|abort`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Next step now (`full`: straight to all traffic on the canary).
    Promote {
        /// Skip the remaining steps.
        full: bool,
    },
    /// Hold at the current step.
    Pause,
    /// Continue a paused rollout; start a finished one again at step 1.
    Resume,
    /// All traffic back to stable, for good.
    Abort,
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// No such rollout.
    #[error("no rollout {0}")]
    NotFound(String),
    /// Not possible in its phase.
    #[error("{0}")]
    Refused(String),
}

/// The controller of every rollout of one control plane.
pub struct RolloutController {
    store: Arc<ResourceStore>,
    stats: SharedStats,
    persist: Arc<dyn RolloutStateStore>,
    state: Mutex<Persisted>,
    /// `persist.generation()` the state was last loaded at.
    loaded_at: std::sync::atomic::AtomicU64,
    domain: String,
    wake: Notify,
    /// Store version at the last pass with nothing in flight (skip idle passes).
    idle_at: Mutex<Option<u64>>,
    /// Staged changes: what the xDS source serves the canary proxies.
    pub staging: Arc<staged::Staging>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl RolloutController {
    /// A controller over `store`, reading `stats`, keeping its state in `persist` (loaded
    /// now: a restarted control plane resumes where it was).
    pub fn new(
        store: Arc<ResourceStore>,
        stats: SharedStats,
        persist: Arc<dyn RolloutStateStore>,
        domain: &str,
    ) -> Arc<RolloutController> {
        let loaded_at = persist.generation();
        let loaded = load(persist.as_ref());
        if !loaded.rollouts.is_empty() || !loaded.staged.is_empty() {
            tracing::info!(rollouts = loaded.rollouts.len(), staged = loaded.staged.len(), "rollout state restored");
        }
        let staging = Arc::new(staged::Staging::default());
        staging.set(&loaded.staged);
        Arc::new(RolloutController {
            store,
            stats,
            persist,
            state: Mutex::new(loaded),
            loaded_at: std::sync::atomic::AtomicU64::new(loaded_at),
            domain: domain.to_string(),
            wake: Notify::new(),
            idle_at: Mutex::new(None),
            staging,
        })
    }

    /// Runs [`RolloutController::reconcile`] every [`TICK`] while `leader` is true.
    pub fn spawn(self: &Arc<Self>, mut leader: watch::Receiver<bool>) -> JoinHandle<()> {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut leader_open = true;
            loop {
                if !*leader.borrow_and_update() {
                    if !leader_open {
                        return;
                    }
                    // A follower keeps the leader's state (its staged changes are served
                    // by this replica's xDS too) until it leads.
                    tokio::select! {
                        r = leader.changed() => leader_open = r.is_ok(),
                        _ = tokio::time::sleep(TICK) => {
                            let Some(c) = me.upgrade() else { return };
                            drop(c.lock());
                        }
                    }
                    continue;
                }
                let Some(c) = me.upgrade() else { return };
                // A pass reads the store and may write the state file: off the async workers.
                let pass = c.clone();
                let _ = tokio::task::spawn_blocking(move || pass.reconcile(now_ms())).await;
                let woken = c.clone();
                drop(c);
                tokio::select! {
                    _ = tokio::time::sleep(TICK) => {}
                    _ = woken.wake.notified() => {}
                    r = leader.changed(), if leader_open => leader_open = r.is_ok(),
                }
            }
        })
    }

    /// Asks the loop to look again now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The state, reloaded first when another replica changed it (a new leader resumes
    /// where the old one was; a follower's API shows the leader's progress).
    fn lock(&self) -> std::sync::MutexGuard<'_, Persisted> {
        use std::sync::atomic::Ordering;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self.persist.generation();
        if self.loaded_at.swap(generation, Ordering::SeqCst) != generation {
            *st = load(self.persist.as_ref());
            self.staging.set(&st.staged);
            *self.idle_at.lock().unwrap_or_else(|p| p.into_inner()) = None;
            tracing::debug!(rollouts = st.rollouts.len(), "rollout state changed by another replica; reloaded");
        }
        st
    }

    fn save(&self, st: &Persisted) {
        let doc = serde_json::to_vec_pretty(st).unwrap_or_default();
        if let Err(e) = self.persist.save(&doc) {
            tracing::warn!(error = %e, "rollout state not saved");
        }
    }

    /// One pass at `now_ms`: every rollout judged when due, its routing written when it
    /// differs from the store's; staged changes moved on.
    pub fn reconcile(&self, now_ms: u64) {
        let version = self.store.snapshot_version();
        {
            let st = self.lock();
            let idle = st.rollouts.values().all(|r| r.phase.is_done())
                && st.staged.values().all(|s| s.phase != staged::StagedPhase::Canary);
            let mut idle_at = self.idle_at.lock().unwrap_or_else(|p| p.into_inner());
            if idle && *idle_at == Some(version) {
                return;
            }
            *idle_at = if idle { Some(version) } else { None };
        }
        let snap = self.store.snapshot();
        let mut writes = Vec::new();
        let mut st = self.lock();
        let mut changed = false;
        let mut present = BTreeSet::new();
        for r in snap.resources.iter().filter(|r| r.kind == Kind::Rollout) {
            let Spec::Rollout(spec) = &r.spec else { continue };
            let key = format!("{}/{}", r.meta.namespace, r.meta.name);
            present.insert(key.clone());
            let digest = digest(spec);
            let entry = st.rollouts.entry(key).or_insert_with(|| {
                changed = true;
                let mut s = RolloutState::new(&r.meta.namespace, &r.meta.name, digest.clone(), now_ms);
                let first = spec.steps.first().map(|s| decide::describe(&s.traffic(), &spec.canary.subset));
                s.event(now_ms, "Started", format!("step 1/{}: {}", spec.steps.len(), first.unwrap_or_default()));
                s
            });
            if entry.spec_digest != digest {
                entry.restart(digest, now_ms);
                let first = spec.steps.first().map(|s| decide::describe(&s.traffic(), &spec.canary.subset));
                let msg = format!(
                    "the Rollout changed: starting again at step 1/{}: {}",
                    spec.steps.len(),
                    first.unwrap_or_default()
                );
                entry.event(now_ms, "Restarted", msg);
                changed = true;
            }
            let conflict = routing::conflicting(&snap.resources, r, spec, &self.domain);
            match conflict {
                Some(vs) if !entry.phase.is_done() => {
                    let msg = format!(
                        "VirtualService {}/{} routes {} and is not the rollout's: it is not overwritten; delete it to let the rollout write the routing",
                        vs.meta.namespace, vs.meta.name, spec.host
                    );
                    if entry.phase != Phase::Waiting || entry.conflict.as_deref() != Some(msg.as_str()) {
                        entry.phase = Phase::Waiting;
                        entry.conflict = Some(msg.clone());
                        entry.event(now_ms, "Conflict", msg);
                        changed = true;
                    }
                    continue;
                }
                Some(_) => continue,
                None if entry.phase == Phase::Waiting => {
                    entry.phase = Phase::Progressing;
                    entry.conflict = None;
                    entry.step_started_ms = now_ms;
                    entry.last_analysis_ms = now_ms;
                    let msg = format!("no other VirtualService routes {}: the rollout writes the routing", spec.host);
                    entry.event(now_ms, "Resumed", msg);
                    changed = true;
                }
                None => {}
            }
            let sels = self.canary_selectors(&snap.resources, r, spec);
            changed |= decide::progress(spec, entry, now_ms, |window| {
                let sum = |sels: &[Selector]| {
                    let mut sum = crate::meshstats::WindowStats::default();
                    for sel in sels {
                        let w = self.stats.window(sel, window);
                        sum.requests += w.requests;
                        sum.errors += w.errors;
                        sum.covered = sum.covered.max(w.covered);
                        staged::merge_hist(&mut sum.latency_ms, &w.latency_ms);
                    }
                    sum
                };
                let served = sum(&sels);
                if served.requests > 0.0 {
                    return served;
                }
                // Canary sidecars without Istio metrics (a stock Envoy): the callers' view.
                let callers: Vec<Selector> =
                    sels.iter().map(|s| Selector { reporter: Reporter::Source, ..s.clone() }).collect();
                sum(&callers[..1])
            });
            if let Some(text) = self.routing_change(&snap.resources, r, spec, entry) {
                writes.push(text);
            }
        }
        let before = st.rollouts.len();
        st.rollouts.retain(|k, _| present.contains(k));
        changed |= st.rollouts.len() != before;
        changed |= staged::progress(&mut st.staged, &self.staging, &self.store, &self.stats, now_ms);
        if changed {
            self.save(&st);
        }
        drop(st);
        for text in writes {
            let r = self.store.apply(&text, Path::new("rollout"));
            for e in &r.errors {
                tracing::warn!(error = %e, "rollout routing refused");
            }
        }
    }

    /// The VirtualService text to write when the store's copy differs from the state's.
    fn routing_change(
        &self,
        resources: &[Resource],
        r: &Resource,
        spec: &Rollout,
        st: &RolloutState,
    ) -> Option<String> {
        let routing = routing::routing_of(spec, st);
        let note = match st.phase {
            Phase::Progressing | Phase::Paused => format!("{}/{}", st.step + 1, spec.steps.len()),
            p => format!("{p:?}"),
        };
        let text = routing::virtual_service(r, spec, &routing, &note);
        let want = weft_api::parse_str(&text, Path::new("rollout")).resources.into_iter().next()?;
        let have = resources.iter().find(|x| x.key() == want.key());
        let same = have.is_some_and(|h| h.spec == want.spec && h.meta.labels == want.meta.labels);
        (!same).then_some(text)
    }

    /// The canary's requests as the server side reports them: under the host's FQDN,
    /// and, for the requests its sidecar answered itself before routing (a local reply:
    /// a rate limit, a fault, a denial), under its canonical service name, as Istio's
    /// stats do.
    fn canary_selectors(&self, resources: &[Resource], r: &Resource, spec: &Rollout) -> Vec<Selector> {
        let by_fqdn = self.canary_selector(resources, r, spec);
        let short = spec.host.split('.').next().unwrap_or_default().to_string();
        let by_name = Selector {
            destination_service: Some(short),
            destination_namespace: Some(r.meta.namespace.clone()),
            ..by_fqdn.clone()
        };
        vec![by_fqdn, by_name]
    }

    /// The canary's requests under the host's FQDN.
    fn canary_selector(&self, resources: &[Resource], r: &Resource, spec: &Rollout) -> Selector {
        let fqdn = host::fqdn(&spec.host, &r.meta.namespace, &self.domain);
        let version = spec.canary.version.clone().or_else(|| {
            resources.iter().find_map(|d| match &d.spec {
                Spec::DestinationRule(dr) if host::fqdn(&dr.host, &d.meta.namespace, &self.domain) == fqdn => dr
                    .subsets
                    .iter()
                    .find(|s| s.name == spec.canary.subset)
                    .and_then(|s| s.labels.get("version").cloned()),
                _ => None,
            })
        });
        Selector {
            reporter: Reporter::Destination,
            destination_service: Some(fqdn),
            destination_version: Some(version.unwrap_or_else(|| spec.canary.subset.clone())),
            ..Selector::default()
        }
    }

    /// Stages the resources of `text` (one staged change at a time): they go to a
    /// canary share of the workloads they affect first ([`staged`]).
    pub fn stage(
        &self,
        text: &str,
        source: &Path,
        workloads: &[staged::ProxyWorkload],
        canary_percent: u32,
        interval: Duration,
        now_ms: u64,
    ) -> Result<staged::StagedState, staged::StageError> {
        let parsed = weft_api::parse_str(text, source);
        if !parsed.errors.is_empty() {
            let errs: Vec<String> = parsed.errors.iter().map(|e| e.to_string()).collect();
            return Err(staged::StageError(errs.join("; ")));
        }
        let mut st = self.lock();
        if let Some(s) = st.staged.values().find(|s| s.phase == staged::StagedPhase::Canary) {
            return Err(staged::StageError(format!("{} is still being compared: one staged change at a time", s.name)));
        }
        let callers = self.callers_of(&parsed.resources);
        let s = staged::begin(text, &parsed.resources, workloads, &callers, canary_percent, interval, now_ms)?;
        st.staged.insert(s.name.clone(), s.clone());
        self.staging.set(&st.staged);
        self.save(&st);
        drop(st);
        *self.idle_at.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.wake();
        Ok(s)
    }

    /// The workloads seen calling the hosts of routing resources in the last ten minutes.
    fn callers_of(&self, resources: &[Resource]) -> BTreeSet<staged::WorkloadKey> {
        let hosts: BTreeSet<String> = resources
            .iter()
            .flat_map(|r| {
                let hosts: Vec<&String> = match &r.spec {
                    Spec::VirtualService(vs) => vs.hosts.iter().collect(),
                    Spec::DestinationRule(dr) => vec![&dr.host],
                    _ => Vec::new(),
                };
                hosts.into_iter().map(|h| host::fqdn(h, &r.meta.namespace, &self.domain).to_ascii_lowercase())
            })
            .collect();
        if hosts.is_empty() {
            return BTreeSet::new();
        }
        self.stats
            .edges(CALLERS_WINDOW)
            .into_iter()
            .filter(|e| hosts.contains(&e.destination_service.to_ascii_lowercase()))
            .map(|e| (e.source_namespace, e.source_workload))
            .collect()
    }

    /// The state of every rollout.
    pub fn states(&self) -> Persisted {
        self.lock().clone()
    }

    /// Applies a command to `namespace/name` at `now_ms`; the routing follows at once.
    pub fn command(
        &self,
        namespace: &str,
        name: &str,
        cmd: Command,
        now_ms: u64,
    ) -> Result<RolloutState, CommandError> {
        let key = format!("{namespace}/{name}");
        let snap = self.store.snapshot();
        let spec = snap
            .resources
            .iter()
            .find(|r| r.kind == Kind::Rollout && r.meta.namespace == namespace && r.meta.name == name)
            .and_then(|r| match &r.spec {
                Spec::Rollout(s) => Some(s.clone()),
                _ => None,
            })
            .ok_or_else(|| CommandError::NotFound(key.clone()))?;
        let mut st = self.lock();
        let s = st.rollouts.get_mut(&key).ok_or_else(|| CommandError::NotFound(key.clone()))?;
        let steps = spec.steps.len();
        let at = format!("step {}/{steps}", s.step + 1);
        let refuse =
            |what: &str, p: Phase| Err(CommandError::Refused(format!("cannot {what} rollout {key}: it is {p:?}")));
        match cmd {
            Command::Pause => match s.phase {
                Phase::Progressing => {
                    s.phase = Phase::Paused;
                    s.event(now_ms, "Paused", format!("paused by hand at {at}: the routing stays, no analysis"));
                }
                p => return refuse("pause", p),
            },
            Command::Resume => match s.phase {
                Phase::Paused => {
                    s.phase = Phase::Progressing;
                    s.step_started_ms = now_ms;
                    s.last_analysis_ms = now_ms;
                    s.event(now_ms, "Resumed", format!("resumed by hand at {at}"));
                }
                p if p.is_done() => {
                    s.restart(digest(&spec), now_ms);
                    let first = spec.steps.first().map(|x| decide::describe(&x.traffic(), &spec.canary.subset));
                    let msg =
                        format!("started again by hand after {p:?}: step 1/{steps}: {}", first.unwrap_or_default());
                    s.event(now_ms, "Restarted", msg);
                }
                p => return refuse("resume", p),
            },
            Command::Abort => match s.phase {
                p if p.is_done() => return refuse("abort", p),
                _ => {
                    s.phase = Phase::Aborted;
                    let msg = format!("aborted by hand at {at}: all traffic back to {}", spec.stable.subset);
                    s.event(now_ms, "Aborted", msg);
                }
            },
            Command::Promote { full } => match s.phase {
                Phase::Progressing | Phase::Paused if full => {
                    s.phase = Phase::Succeeded;
                    let msg = format!("promoted by hand at {at}: all traffic to {}", spec.canary.subset);
                    s.event(now_ms, "Promoted", msg);
                }
                Phase::Progressing | Phase::Paused => {
                    decide::advance(&spec, s, now_ms, &format!("promoted by hand at {at}"))
                }
                p => return refuse("promote", p),
            },
        }
        let out = s.clone();
        self.save(&st);
        drop(st);
        *self.idle_at.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.reconcile(now_ms);
        self.wake();
        Ok(out)
    }
}

/// The state saved in `persist`, empty when there is none or it does not load.
fn load(persist: &dyn RolloutStateStore) -> Persisted {
    match persist.load() {
        Ok(Some(doc)) => serde_json::from_slice::<Persisted>(&doc).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "rollout state unreadable; starting without it");
            Persisted::default()
        }),
        Ok(None) => Persisted::default(),
        Err(e) => {
            tracing::warn!(error = %e, "rollout state not loaded; starting without it");
            Persisted::default()
        }
    }
}

/// A stable digest of a spec (FNV-1a over its debug form): the same spec gives the
/// same digest in every process of one build.
fn digest(spec: &Rollout) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in format!("{spec:?}").bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}
