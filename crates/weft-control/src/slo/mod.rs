//! The SLO engine: every `ServiceLevelObjective` in the store is evaluated on an
//! interval against the mesh's request statistics (read only through
//! [`crate::meshstats::MeshStats`]): its SLI over the SLO window, the error budget left,
//! the burn rates over 5m/30m/1h/6h/3d, and the workbook's multi-window burn-rate
//! alerts ([`calc`]), whose firing and resolved transitions are POSTed to webhooks
//! ([`notify`]). The result is served as `GET /api/v1/slos` ([`SloEngine::to_json`])
//! and as `weft_slo_*` metrics on `/metrics` ([`SloEngine::render_metrics`]).
//! [`rules`] writes the same SLOs as Prometheus rules. See docs/slo.md.
//!
//! With several replicas every replica evaluates (each one's API and metrics answer),
//! but only the leader notifies, against a record of what the webhooks were last told
//! that the replicas share (etcd, or a file in the data directory): a new leader or a
//! restarted control plane sends exactly the transitions not sent yet.

pub mod calc;
pub mod notify;
pub mod rules;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use weft_api::spec::slo::Sli;
use weft_api::{Resource, ServiceLevelObjective, Spec};

use crate::leader::Leadership;
use crate::meshstats::{Reporter, Selector, SharedStats};
use crate::rollout::{MemoryStateStore, RolloutStateStore};
use crate::store::ResourceStore;
use calc::{AlertRule, ALERT_RULES, BURN_WINDOWS};
use notify::{Notification, Notifier};

/// How often SLOs are evaluated by default (a Prometheus rule group's usual interval).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

/// Settings of the SLO engine (`weft control --slo-interval --alert-webhook`).
#[derive(Clone)]
pub struct SloConfig {
    /// Time between evaluations.
    pub interval: Duration,
    /// Webhook every SLO's alerts go to (beside an SLO's own `alert.webhook`).
    pub webhook: Option<String>,
    /// Statistics to read instead of the control plane's own (tests).
    pub stats: Option<SharedStats>,
}

/// One SLO as last evaluated.
#[derive(Debug, Clone, PartialEq)]
pub struct SloStatus {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// The service's FQDN.
    pub service: String,
    /// The subset's `version`, when the SLO names a subset.
    pub version: Option<String>,
    /// The SLI.
    pub sli: Sli,
    /// Target as a ratio (0.999).
    pub target: f64,
    /// The window as written (`28d`).
    pub window: String,
    /// SLI over the window; None without requests.
    pub sli_value: Option<f64>,
    /// Share of the error budget left over the window (negative once overspent).
    pub budget_remaining: f64,
    /// Burn rate per [`BURN_WINDOWS`] name.
    pub burn_rates: BTreeMap<&'static str, f64>,
    /// The [`ALERT_RULES`], in order, with their state.
    pub alerts: Vec<AlertStatus>,
    /// Why the SLO cannot be evaluated (an unknown subset), if so.
    pub error: Option<String>,
    /// Where the alerts of this SLO go.
    pub webhook: Option<String>,
}

/// An alert's state.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertStatus {
    /// The rule.
    pub rule: AlertRule,
    /// Whether it fires.
    pub firing: bool,
    /// When it last started or stopped firing; None if it never fired.
    pub since: Option<SystemTime>,
}

/// An alert of an SLO: (namespace, name, index in [`ALERT_RULES`]).
type AlertKey = (String, String, usize);

/// The engine. Cheap to share behind an `Arc`.
pub struct SloEngine {
    stats: SharedStats,
    domain: String,
    cfg: SloConfig,
    /// Alert states by (namespace, name, rule index), kept across evaluations.
    alerts: Mutex<BTreeMap<AlertKey, (bool, Option<SystemTime>)>>,
    status: ArcSwap<Vec<SloStatus>>,
    notifier: Notifier,
    /// What the webhooks were last told per alert (`ns/name/index` → firing), shared by
    /// the replicas ([`SloEngine::replicated`]); the leader notifies what differs.
    notified: Arc<dyn RolloutStateStore>,
    /// Only the leader notifies; every replica evaluates (its API and metrics answer).
    leader: Leadership,
}

impl std::fmt::Debug for SloConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SloConfig")
            .field("interval", &self.interval)
            .field("webhook", &self.webhook)
            .field("stats", &self.stats.as_ref().map(|_| "custom"))
            .finish()
    }
}

impl Default for SloConfig {
    fn default() -> Self {
        SloConfig { interval: DEFAULT_INTERVAL, webhook: None, stats: None }
    }
}

impl SloEngine {
    /// An engine reading `stats` (unless the config brings its own), resolving short
    /// service names in `domain`; starts its notifier task.
    pub fn new(stats: SharedStats, domain: &str, cfg: SloConfig) -> Arc<SloEngine> {
        SloEngine::replicated(stats, domain, cfg, Arc::new(MemoryStateStore::default()), Leadership::always())
    }

    /// An engine of one replica among several: every replica evaluates, only the one
    /// `leader` names notifies, and what was notified lives in `notified` (etcd with
    /// `--store etcd://`, a file in the data directory otherwise), so a new leader, or
    /// a restarted control plane, neither repeats a notification nor misses one.
    pub fn replicated(
        stats: SharedStats,
        domain: &str,
        cfg: SloConfig,
        notified: Arc<dyn RolloutStateStore>,
        leader: Leadership,
    ) -> Arc<SloEngine> {
        Arc::new(SloEngine {
            stats: cfg.stats.clone().unwrap_or(stats),
            domain: domain.to_string(),
            cfg,
            alerts: Mutex::new(BTreeMap::new()),
            status: ArcSwap::from_pointee(Vec::new()),
            notifier: Notifier::start(),
            notified,
            leader,
        })
    }

    /// Evaluates the store's SLOs every interval, and at once after a change of the
    /// store; ends when the engine or the store is dropped.
    pub fn spawn(self: &Arc<Self>, store: Arc<ResourceStore>) -> JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let interval = self.cfg.interval;
        let mut changes = store.subscribe();
        tokio::spawn(async move {
            loop {
                let Some(me) = weak.upgrade() else { return };
                me.evaluate(&store.snapshot().resources, SystemTime::now());
                drop(me);
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    r = changes.changed() => if r.is_err() { return },
                }
            }
        })
    }

    /// The mesh DNS domain short service names resolve in.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The SLOs as last evaluated.
    pub fn status(&self) -> Arc<Vec<SloStatus>> {
        self.status.load_full()
    }

    /// Notifications sent, failed and dropped so far.
    pub fn notifications(&self) -> notify::Counts {
        self.notifier.counts()
    }

    /// Evaluates every SLO among `resources` at `now`: statistics read, alert states
    /// updated, transitions queued for the webhooks, the status published.
    pub fn evaluate(&self, resources: &[Resource], now: SystemTime) {
        let mut out = Vec::new();
        let mut alerts = self.alerts.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = std::collections::BTreeSet::new();
        for r in resources {
            let Spec::ServiceLevelObjective(o) = &r.spec else { continue };
            let mut st = self.evaluate_one(r, o, resources);
            for i in 0..st.alerts.len() {
                let key = (r.meta.namespace.clone(), r.meta.name.clone(), i);
                seen.insert(key.clone());
                let firing = st.alerts[i].firing;
                let prev = alerts.get(&key).copied().unwrap_or((false, None));
                let since = if prev.0 != firing { Some(now) } else { prev.1 };
                st.alerts[i].since = since;
                alerts.insert(key, (firing, since));
            }
            out.push(st);
        }
        alerts.retain(|k, _| seen.contains(k));
        drop(alerts);
        if self.leader.leads() {
            self.notify_changes(&out);
        }
        self.status.store(Arc::new(out));
    }

    /// Queues a notification for every alert whose state differs from what the
    /// webhooks were last told, and records the new states. An alert never notified
    /// counts as resolved, so a first evaluation that does not fire sends nothing.
    fn notify_changes(&self, slos: &[SloStatus]) {
        let doc = match self.notified.load() {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "SLO alert notifications: cannot read what was notified");
                return;
            }
        };
        let before: BTreeMap<String, bool> =
            doc.as_deref().and_then(|d| serde_json::from_slice(d).ok()).unwrap_or_default();
        let mut after = BTreeMap::new();
        for st in slos {
            for (i, a) in st.alerts.iter().enumerate() {
                let key = format!("{}/{}/{i}", st.namespace, st.name);
                if before.get(&key).copied().unwrap_or(false) != a.firing {
                    self.queue(st, a);
                }
                if a.firing {
                    after.insert(key, true);
                }
            }
        }
        if after != before {
            let saved = serde_json::to_vec(&after).map_err(|e| e.to_string()).and_then(|d| self.notified.save(&d));
            if let Err(e) = saved {
                tracing::warn!(error = %e, "SLO alert notifications: cannot record what was notified");
            }
        }
    }

    fn evaluate_one(&self, r: &Resource, o: &ServiceLevelObjective, all: &[Resource]) -> SloStatus {
        let service = weft_api::host::fqdn(&o.service, &r.meta.namespace, &self.domain);
        let (version, error) = match &o.subset {
            None => (None, None),
            Some(subset) => match subset_version(all, &service, subset, &self.domain) {
                Ok(v) => (Some(v), None),
                Err(e) => (None, Some(e)),
            },
        };
        let target = o.target_ratio();
        let sli = o.sli();
        let sel = Selector {
            reporter: match o.reporter {
                weft_api::spec::slo::SloReporter::Destination => Reporter::Destination,
                weft_api::spec::slo::SloReporter::Source => Reporter::Source,
            },
            destination_service: Some(service.clone()),
            destination_version: version.clone(),
            ..Selector::default()
        };
        let webhook = o.alert.as_ref().and_then(|a| a.webhook.clone());
        let mut st = SloStatus {
            name: r.meta.name.clone(),
            namespace: r.meta.namespace.clone(),
            service,
            version,
            sli,
            target,
            window: o.window.clone(),
            sli_value: None,
            budget_remaining: 1.0,
            burn_rates: BURN_WINDOWS.iter().map(|(n, _)| (*n, 0.0)).collect(),
            alerts: ALERT_RULES.iter().map(|&rule| AlertStatus { rule, firing: false, since: None }).collect(),
            error,
            webhook,
        };
        if st.error.is_some() {
            return st;
        }
        let whole = calc::error_ratio(&self.stats.window(&sel, o.window_duration()), sli);
        st.sli_value = whole.map(|e| 1.0 - e);
        st.budget_remaining = calc::budget_remaining(whole, target);
        for (name, d) in BURN_WINDOWS {
            let e = calc::error_ratio(&self.stats.window(&sel, d), sli);
            st.burn_rates.insert(name, calc::burn_rate(e, target));
        }
        for a in &mut st.alerts {
            a.firing = a.rule.holds(|w| st.burn_rates.get(w).copied());
        }
        st
    }

    fn queue(&self, st: &SloStatus, a: &AlertStatus) {
        let mut urls: Vec<String> = st.webhook.iter().chain(self.cfg.webhook.iter()).cloned().collect();
        urls.dedup();
        if urls.is_empty() {
            return;
        }
        let body = json!({
            "status": if a.firing { "firing" } else { "resolved" },
            "slo": {"name": st.name, "namespace": st.namespace, "service": st.service},
            "severity": a.rule.severity.as_str(),
            "long": a.rule.long,
            "short": a.rule.short,
            "factor": a.rule.factor,
            "burn_rates": {a.rule.long: st.burn_rates.get(a.rule.long), a.rule.short: st.burn_rates.get(a.rule.short)},
            "budget_remaining": finite(st.budget_remaining),
            "since": a.since.map(rfc3339),
            "summary": format!(
                "SLO {}/{} ({}): error budget burning {} over {} and {} (threshold {}x)",
                st.namespace, st.name, st.service,
                if a.firing { "fast" } else { "no longer fast" }, a.rule.long, a.rule.short, a.rule.factor
            ),
        });
        self.notifier.send(Notification { urls, body });
    }

    /// `GET /api/v1/slos` (the shape docs/slo.md gives).
    pub fn to_json(&self) -> Value {
        let slos: Vec<Value> = self.status().iter().map(status_json).collect();
        json!({ "slos": slos })
    }

    /// The `weft_slo_*` gauges in Prometheus' text format.
    pub fn render_metrics(&self) -> String {
        let status = self.status();
        let mut out = String::new();
        let families: [(&str, &str); 5] = [
            ("weft_slo_sli", "The SLI over the SLO window (absent without requests)."),
            ("weft_slo_target", "The SLO's target as a ratio."),
            ("weft_slo_error_budget_remaining", "Share of the error budget left over the SLO window."),
            ("weft_slo_burn_rate", "Error ratio over the window divided by the error budget (1 - target)."),
            ("weft_slo_alert_firing", "1 while the multi-window burn-rate alert fires."),
        ];
        for (name, help) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for s in status.iter() {
                let labels = format!(
                    "slo=\"{}\",namespace=\"{}\",service=\"{}\"",
                    escape(&s.name),
                    escape(&s.namespace),
                    escape(&s.service)
                );
                match name {
                    "weft_slo_sli" => {
                        if let Some(v) = s.sli_value {
                            let _ = writeln!(out, "{name}{{{labels}}} {v}");
                        }
                    }
                    "weft_slo_target" => {
                        let _ = writeln!(out, "{name}{{{labels}}} {}", s.target);
                    }
                    "weft_slo_error_budget_remaining" => {
                        let _ = writeln!(out, "{name}{{{labels}}} {}", s.budget_remaining);
                    }
                    "weft_slo_burn_rate" => {
                        for (w, _) in BURN_WINDOWS {
                            let v = s.burn_rates.get(w).copied().unwrap_or(0.0);
                            let _ = writeln!(out, "{name}{{{labels},window=\"{w}\"}} {v}");
                        }
                    }
                    _ => {
                        for a in &s.alerts {
                            let _ = writeln!(
                                out,
                                "{name}{{{labels},severity=\"{}\",long=\"{}\",short=\"{}\"}} {}",
                                a.rule.severity.as_str(),
                                a.rule.long,
                                a.rule.short,
                                u8::from(a.firing)
                            );
                        }
                    }
                }
            }
        }
        let n = self.notifier.counts();
        let _ = writeln!(
            out,
            "# HELP weft_slo_notifications_total Alert notifications by outcome.\n# TYPE weft_slo_notifications_total counter"
        );
        for (result, v) in [("sent", n.sent), ("failed", n.failed), ("dropped", n.dropped)] {
            let _ = writeln!(out, "weft_slo_notifications_total{{result=\"{result}\"}} {v}");
        }
        out
    }
}

/// One SLO as `/api/v1/slos` shows it.
fn status_json(s: &SloStatus) -> Value {
    let mut v = json!({
        "name": s.name,
        "namespace": s.namespace,
        "service": s.service,
        "sli": match s.sli { Sli::SuccessRate => "success-rate", Sli::Latency(_) => "latency" },
        "target": s.target,
        "window": s.window,
        "sli_value": s.sli_value.and_then(finite),
        "budget_remaining": finite(s.budget_remaining),
        "burn_rates": s.burn_rates.iter().map(|(k, v)| (k.to_string(), json!(finite(*v)))).collect::<serde_json::Map<_, _>>(),
        "alerts": s.alerts.iter().map(|a| json!({
            "severity": a.rule.severity.as_str(),
            "long": a.rule.long,
            "short": a.rule.short,
            "factor": a.rule.factor,
            "firing": a.firing,
            "since": a.since.map(rfc3339),
        })).collect::<Vec<_>>(),
    });
    if let Some(m) = v.as_object_mut() {
        if let Sli::Latency(t) = s.sli {
            m.insert("threshold_ms".into(), json!(t));
        }
        if let Some(version) = &s.version {
            m.insert("version".into(), json!(version));
        }
        if let Some(e) = &s.error {
            m.insert("error".into(), json!(e));
        }
    }
    v
}

/// The `version` label of `subset` in the DestinationRules for `service` (a rule in
/// the service's own namespace is looked at first).
fn subset_version(all: &[Resource], service: &str, subset: &str, domain: &str) -> Result<String, String> {
    let mut rules: Vec<&Resource> = all
        .iter()
        .filter(|r| match &r.spec {
            Spec::DestinationRule(dr) => weft_api::host::fqdn(&dr.host, &r.meta.namespace, domain) == service,
            _ => false,
        })
        .collect();
    rules.sort_by_key(|r| !service.contains(&format!(".{}.", r.meta.namespace)));
    for r in rules {
        let Spec::DestinationRule(dr) = &r.spec else { continue };
        if let Some(s) = dr.subsets.iter().find(|s| s.name == subset) {
            return s.labels.get("version").cloned().ok_or_else(|| {
                format!(
                    "subset {subset:?} of DestinationRule {}/{} has no `version` label, \
                     and Istio's metrics tell subsets apart only by destination_version",
                    r.meta.namespace, r.meta.name
                )
            });
        }
    }
    Err(format!("no DestinationRule for {service} has a subset {subset:?}"))
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests;
