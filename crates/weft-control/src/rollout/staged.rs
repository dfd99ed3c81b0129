//! Staged configuration rollout: a VirtualService, DestinationRule or
//! AuthorizationPolicy change (`weft apply --staged`, or the annotation
//! `weft.dev/staged: "true"`) goes first to a canary share of the workloads it affects.
//! The xDS source ([`crate::source::MeshXdsSource`]) serves those workloads' proxies the
//! store overlaid with the change ([`Staging::view`]); every other proxy keeps the
//! store. After one interval the canary workloads' requests are compared with the
//! others' ([`compare`]): the change is then applied to the store (every proxy) or
//! dropped (every proxy back to the store), with the measured values as the reason.
//!
//! Affected workloads: an AuthorizationPolicy's are the workloads it selects (they
//! enforce it; measured as the server side, `reporter=destination`); a VirtualService's
//! or DestinationRule's are the workloads seen calling its hosts in the last ten minutes,
//! else every workload of the mesh (they route with it; measured as the client side,
//! `reporter=source`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use weft_api::{Kind, Resource, Spec};

use super::state::Event;
use crate::meshstats::{MeshStats, Reporter, Selector, WindowStats};
use crate::store::ResourceStore;

/// Default share of the affected workloads that get a staged change first, percent.
pub const DEFAULT_CANARY_PERCENT: u32 = 25;
/// Default comparison interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// Percentage points of success rate the canary may lose against the others.
pub const SUCCESS_TOLERANCE: f64 = 1.0;
/// Finished staged changes kept for `weft rollout status`.
const KEEP_DONE: usize = 20;

/// A workload: (namespace, workload name).
pub type WorkloadKey = (String, String);

/// Where a staged change stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StagedPhase {
    /// Served to the canary workloads only, being compared.
    Canary,
    /// Applied to the store: every proxy has it.
    Promoted,
    /// Dropped: every proxy back to the store's version.
    Reverted,
}

/// One staged change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagedState {
    /// `staged/<kind>/<namespace>/<name>` of its first resource.
    pub name: String,
    /// The resources as sent (YAML or JSON), applied as is on promotion.
    pub text: String,
    /// Their keys (`Kind ns/name`).
    pub resources: Vec<String>,
    /// Whether the canaries are measured as servers (policies) or clients (routing).
    pub reporter_destination: bool,
    /// Workloads served the change first.
    pub canary: Vec<WorkloadKey>,
    /// The other affected workloads, the baseline.
    pub rest: Vec<WorkloadKey>,
    /// Phase.
    pub phase: StagedPhase,
    /// When it was staged (ms since the epoch).
    pub started_ms: u64,
    /// How long the canaries run before the comparison.
    pub interval_ms: u64,
    /// The last comparison, in words.
    pub last: Option<String>,
    /// Events.
    pub events: Vec<Event>,
}

/// What the xDS source serves the canary proxies.
#[derive(Debug)]
pub struct StageView {
    /// Resources overriding the store's of the same key.
    pub overlay: Vec<Resource>,
    /// Workloads whose proxies get the overlay.
    pub canary: BTreeSet<WorkloadKey>,
    /// Changes whenever the overlay or canary set does (part of the proxies' shape).
    pub generation: u64,
}

/// The staged view shared with the xDS source.
#[derive(Debug)]
pub struct Staging {
    view: Mutex<Option<Arc<StageView>>>,
    changes: watch::Sender<u64>,
}

impl Default for Staging {
    fn default() -> Self {
        Staging { view: Mutex::new(None), changes: watch::channel(0).0 }
    }
}

impl Staging {
    /// The view now (None: nothing staged).
    pub fn view(&self) -> Option<Arc<StageView>> {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Ticks whenever the view changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Rebuilds the view from the staged changes in their canary phase.
    pub fn set(&self, staged: &BTreeMap<String, StagedState>) {
        let mut overlay = Vec::new();
        let mut canary = BTreeSet::new();
        let mut ids = String::new();
        for s in staged.values().filter(|s| s.phase == StagedPhase::Canary) {
            overlay.extend(weft_api::parse_str(&s.text, Path::new(&s.name)).resources);
            canary.extend(s.canary.iter().cloned());
            ids.push_str(&format!("{}@{};", s.name, s.started_ms));
        }
        let mut slot = self.view.lock().unwrap_or_else(|p| p.into_inner());
        let old_ids = slot.as_ref().map(|v| v.generation);
        let next = if overlay.is_empty() {
            None
        } else {
            let generation = fnv(&ids);
            Some(Arc::new(StageView { overlay, canary, generation }))
        };
        let new_ids = next.as_ref().map(|v| v.generation);
        *slot = next;
        drop(slot);
        if old_ids != new_ids {
            self.changes.send_modify(|v| *v += 1);
        }
    }
}

fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Why a change cannot be staged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StageError(pub String);

/// A connected proxy's workload: namespace, workload name (`WORKLOAD_NAME`), labels.
pub type ProxyWorkload = (String, String, BTreeMap<String, String>);

/// Starts staging `text` (already parsed into `resources`) at `now_ms`: picks the
/// canary workloads among the affected ones of the connected proxies' `workloads`. For
/// routing changes, `callers` (the workloads seen calling the changed hosts lately) are
/// the affected ones when there are any.
pub fn begin(
    text: &str,
    resources: &[Resource],
    workloads: &[ProxyWorkload],
    callers: &BTreeSet<WorkloadKey>,
    canary_percent: u32,
    interval: Duration,
    now_ms: u64,
) -> Result<StagedState, StageError> {
    let Some(first) = resources.first() else { return Err(StageError("nothing to stage".into())) };
    if let Some(r) = resources
        .iter()
        .find(|r| !matches!(r.kind, Kind::VirtualService | Kind::DestinationRule | Kind::AuthorizationPolicy))
    {
        return Err(StageError(format!(
            "{} cannot be staged: only VirtualService, DestinationRule and AuthorizationPolicy changes can",
            r.key()
        )));
    }
    let policies = resources.iter().all(|r| r.kind == Kind::AuthorizationPolicy);
    let routing = resources.iter().all(|r| r.kind != Kind::AuthorizationPolicy);
    if !policies && !routing {
        return Err(StageError(
            "stage AuthorizationPolicies apart from VirtualServices and DestinationRules (they are measured on different sides)"
                .into(),
        ));
    }
    let mut affected: BTreeSet<WorkloadKey> = BTreeSet::new();
    for (ns, name, labels) in workloads {
        if name.is_empty() {
            continue;
        }
        let hit = if policies {
            resources.iter().any(|r| selects(r, ns, labels))
        } else {
            callers.is_empty() || callers.contains(&(ns.clone(), name.clone()))
        };
        if hit {
            affected.insert((ns.clone(), name.clone()));
        }
    }
    if affected.is_empty() {
        return Err(StageError("no running workload is affected by the change: apply it without --staged".into()));
    }
    let affected: Vec<WorkloadKey> = affected.into_iter().collect();
    let n = ((affected.len() as u64 * canary_percent.clamp(1, 100) as u64).div_ceil(100)).max(1) as usize;
    // Canaries: the first `n` in a stable order that does not always favour the same names.
    let mut order = affected.clone();
    order.sort_by_key(|(ns, w)| fnv(&format!("{ns}/{w}/{}", first.meta.name)));
    let canary: Vec<WorkloadKey> = order[..n].to_vec();
    let rest: Vec<WorkloadKey> = order[n..].to_vec();
    let name = format!("staged/{}/{}/{}", first.kind.id(), first.meta.namespace, first.meta.name);
    let mut s = StagedState {
        name,
        text: text.to_string(),
        resources: resources.iter().map(|r| r.key().to_string()).collect(),
        reporter_destination: policies,
        canary,
        rest,
        phase: StagedPhase::Canary,
        started_ms: now_ms,
        interval_ms: interval.as_millis() as u64,
        last: None,
        events: Vec::new(),
    };
    let msg = format!(
        "{} served to {} of {} affected workloads first ({}); compared with the others after {:?}",
        s.resources.join(", "),
        s.canary.len(),
        affected.len(),
        names(&s.canary),
        interval
    );
    s.events.push(Event { at_ms: now_ms, reason: "Staged".into(), message: msg });
    Ok(s)
}

fn names(ws: &[WorkloadKey]) -> String {
    ws.iter().map(|(ns, w)| format!("{w}.{ns}")).collect::<Vec<_>>().join(", ")
}

/// Whether an AuthorizationPolicy applies to a workload of `namespace` with `labels`.
fn selects(r: &Resource, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
    let Spec::AuthorizationPolicy(ap) = &r.spec else { return false };
    let root = r.meta.namespace == weft_api::analyze::ROOT_NAMESPACE;
    if !root && r.meta.namespace != namespace {
        return false;
    }
    match &ap.selector {
        None => true,
        Some(sel) => sel.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)),
    }
}

/// The totals of `workloads` over `window`, as servers or as clients; `errors` counts
/// the 5xx answers and the denials (403s the destination's proxy answered).
fn totals(stats: &dyn MeshStats, workloads: &[WorkloadKey], as_server: bool, window: Duration) -> WindowStats {
    let mut sum = WindowStats::default();
    for (ns, w) in workloads {
        let sel = if as_server {
            Selector {
                reporter: Reporter::Destination,
                destination_workload: Some(w.clone()),
                destination_namespace: Some(ns.clone()),
                ..Selector::default()
            }
        } else {
            Selector {
                reporter: Reporter::Source,
                source_workload: Some(w.clone()),
                source_namespace: Some(ns.clone()),
                ..Selector::default()
            }
        };
        let x = stats.window(&sel, window);
        // An AuthorizationPolicy's denials are 403s, not 5xx: counted as errors here.
        let denied: f64 = stats.denials(window).iter().filter(|(k, _)| k.matches(&sel)).map(|(_, n)| n).sum();
        sum.requests += x.requests;
        sum.errors += x.errors + denied.min(x.requests - x.errors);
        sum.covered = sum.covered.max(x.covered);
        merge_hist(&mut sum.latency_ms, &x.latency_ms);
    }
    sum
}

/// Adds cumulative histogram `b` into `a` (same bounds expected; unknown bounds kept).
pub(crate) fn merge_hist(a: &mut Vec<(f64, f64)>, b: &[(f64, f64)]) {
    for &(le, n) in b {
        match a.iter_mut().find(|(x, _)| *x == le) {
            Some(slot) => slot.1 += n,
            None => a.push((le, n)),
        }
    }
    a.sort_by(|x, y| x.0.total_cmp(&y.0));
}

/// The comparison's outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Comparison {
    /// The canaries did as well as the others (what was measured).
    Healthy(String),
    /// The canaries did worse (why).
    Worse(String),
    /// The canaries had no requests (why).
    NoTraffic(String),
}

/// Canary against the rest (success: neither 5xx nor denied): worse when its success
/// rate is more than
/// [`SUCCESS_TOLERANCE`] points below the others' (below 100 - tolerance when the others
/// had no requests), or its p99 latency above twice theirs plus 50 ms.
pub fn compare(canary: &WindowStats, rest: &WindowStats) -> Comparison {
    let pct = |w: &WindowStats| w.success_rate().map(|s| s * 100.0);
    let (Some(cs), cp) = (pct(canary), canary.quantile_ms(0.99)) else {
        return Comparison::NoTraffic("the canary workloads had no requests in the interval".into());
    };
    let (rs, rp) = (pct(rest), rest.quantile_ms(0.99));
    let fmt = |s: Option<f64>, p: Option<f64>, n: f64| {
        format!(
            "{} success, p99 {} over {} requests",
            s.map(|s| format!("{s:.1}%")).unwrap_or_else(|| "-".into()),
            p.map(|p| format!("{p:.0} ms")).unwrap_or_else(|| "-".into()),
            n.round()
        )
    };
    let measured = format!("canary {}; others {}", fmt(Some(cs), cp, canary.requests), fmt(rs, rp, rest.requests));
    let baseline = rs.unwrap_or(100.0);
    if cs < baseline - SUCCESS_TOLERANCE {
        return Comparison::Worse(format!("the canary's success rate is lower: {measured}"));
    }
    if let (Some(cp), Some(rp)) = (cp, rp) {
        if cp > rp * 2.0 + 50.0 {
            return Comparison::Worse(format!("the canary's p99 latency is higher: {measured}"));
        }
    }
    Comparison::Healthy(measured)
}

/// Moves every staged change on at `now_ms`; true when something changed.
pub fn progress(
    staged: &mut BTreeMap<String, StagedState>,
    staging: &Staging,
    store: &ResourceStore,
    stats: &crate::meshstats::SharedStats,
    now_ms: u64,
) -> bool {
    let mut changed = false;
    for s in staged.values_mut().filter(|s| s.phase == StagedPhase::Canary) {
        if now_ms < s.started_ms + s.interval_ms {
            continue;
        }
        let window = Duration::from_millis(s.interval_ms);
        let c = totals(stats.as_ref(), &s.canary, s.reporter_destination, window);
        let r = totals(stats.as_ref(), &s.rest, s.reporter_destination, window);
        match compare(&c, &r) {
            Comparison::NoTraffic(why) => {
                if s.last.as_deref() != Some(why.as_str()) {
                    s.events.push(Event {
                        at_ms: now_ms,
                        reason: "Inconclusive".into(),
                        message: format!("{why}: waiting"),
                    });
                    s.last = Some(why);
                    changed = true;
                }
                // Judge the next interval.
                s.started_ms = now_ms;
            }
            Comparison::Worse(why) => {
                s.phase = StagedPhase::Reverted;
                s.last = Some(why.clone());
                let msg = format!("{why}; reverted: every proxy keeps the previous configuration");
                s.events.push(Event { at_ms: now_ms, reason: "Reverted".into(), message: msg });
                changed = true;
            }
            Comparison::Healthy(measured) => {
                let applied = store.apply(&s.text, Path::new(&s.name));
                s.last = Some(measured.clone());
                if applied.errors.is_empty() {
                    s.phase = StagedPhase::Promoted;
                    let msg = format!("{measured}; applied to every proxy");
                    s.events.push(Event { at_ms: now_ms, reason: "Promoted".into(), message: msg });
                } else {
                    s.phase = StagedPhase::Reverted;
                    let errs: Vec<String> = applied.errors.iter().map(|e| e.to_string()).collect();
                    let msg = format!("the store refused the change: {}", errs.join("; "));
                    s.events.push(Event { at_ms: now_ms, reason: "Reverted".into(), message: msg });
                }
                changed = true;
            }
        }
    }
    if changed {
        forget_old(staged);
        staging.set(staged);
    }
    changed
}

/// Keeps the last [`KEEP_DONE`] finished staged changes.
fn forget_old(staged: &mut BTreeMap<String, StagedState>) {
    let mut done: Vec<(u64, String)> =
        staged.iter().filter(|(_, s)| s.phase != StagedPhase::Canary).map(|(k, s)| (s.started_ms, k.clone())).collect();
    if done.len() <= KEEP_DONE {
        return;
    }
    done.sort();
    for (_, k) in &done[..done.len() - KEEP_DONE] {
        staged.remove(k);
    }
}
