//! What a rollout has done so far, kept across control-plane restarts behind
//! [`RolloutStateStore`]: a file in the data directory ([`FileStateStore`]), or etcd with
//! `--store etcd://` (`crate::etcd::rollouts`), shared by the replicas.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Events kept per rollout (oldest dropped first).
const MAX_EVENTS: usize = 100;

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Stepping through `steps` under analysis.
    Progressing,
    /// Held at its step by `weft rollout pause` (no analysis, no advance).
    Paused,
    /// A VirtualService the rollout does not own routes the host: nothing is written.
    Waiting,
    /// Every step passed: all traffic to the canary subset.
    Succeeded,
    /// The analysis failed `failureThreshold` intervals in a row: all traffic to stable.
    RolledBack,
    /// `weft rollout abort`: all traffic to stable.
    Aborted,
}

impl Phase {
    /// Whether the rollout is over (a new spec, or `resume`, starts it again).
    pub fn is_done(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::RolledBack | Phase::Aborted)
    }
}

/// One interval's measurement of the canary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// Requests in the interval.
    pub requests: f64,
    /// Non-5xx share, percent.
    pub success_rate: Option<f64>,
    /// 99th percentile latency, ms.
    pub p99_ms: Option<f64>,
    /// `pass`, `fail` or `inconclusive`.
    pub verdict: String,
    /// The values in words.
    pub summary: String,
    /// The step (1-based) measured.
    #[serde(default)]
    pub step: Option<usize>,
}

/// Something a person reads: why the rollout moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `Started`, `Advanced`, `AnalysisFailed`, `Inconclusive`, `RolledBack`,
    /// `Promoted`, `Paused`, `Resumed`, `Aborted`, `Conflict`, ...
    pub reason: String,
    /// What happened, with the measured values.
    pub message: String,
}

/// The state of one rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutState {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The spec this state belongs to (a changed spec starts over).
    pub spec_digest: String,
    /// Phase.
    pub phase: Phase,
    /// Current step, 0-based.
    pub step: usize,
    /// When the current step started (ms since the epoch).
    pub step_started_ms: u64,
    /// When the last interval was judged (ms since the epoch).
    pub last_analysis_ms: u64,
    /// Passing intervals in this step.
    pub passes: u32,
    /// Consecutive failed intervals.
    pub failures: u32,
    /// Failed (5xx) canary requests measured since the rollout started.
    #[serde(default)]
    pub failed_requests: f64,
    /// The last interval's measurement.
    pub last: Option<Measurement>,
    /// What blocks the rollout (phase Waiting).
    pub conflict: Option<String>,
    /// Events, oldest first.
    pub events: Vec<Event>,
}

impl RolloutState {
    /// A rollout starting at its first step at `now_ms`.
    pub fn new(namespace: &str, name: &str, spec_digest: String, now_ms: u64) -> RolloutState {
        RolloutState {
            namespace: namespace.into(),
            name: name.into(),
            spec_digest,
            phase: Phase::Progressing,
            step: 0,
            step_started_ms: now_ms,
            last_analysis_ms: now_ms,
            passes: 0,
            failures: 0,
            failed_requests: 0.0,
            last: None,
            conflict: None,
            events: Vec::new(),
        }
    }

    /// Starts over at step 1 (a new spec, or resume after the end), keeping the events.
    pub fn restart(&mut self, spec_digest: String, now_ms: u64) {
        let events = std::mem::take(&mut self.events);
        *self = RolloutState { events, ..RolloutState::new(&self.namespace, &self.name, spec_digest, now_ms) };
    }

    /// Records an event.
    pub fn event(&mut self, at_ms: u64, reason: &str, message: String) {
        tracing::info!(rollout = %format!("{}/{}", self.namespace, self.name), reason, "{message}");
        self.events.push(Event { at_ms, reason: reason.into(), message });
        if self.events.len() > MAX_EVENTS {
            let extra = self.events.len() - MAX_EVENTS;
            self.events.drain(..extra);
        }
    }
}

/// Everything the rollout controllers keep.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    /// Canary rollouts by `namespace/name`.
    #[serde(default)]
    pub rollouts: BTreeMap<String, RolloutState>,
    /// Staged configuration rollouts by `kind/namespace/name`.
    #[serde(default)]
    pub staged: BTreeMap<String, super::staged::StagedState>,
}

/// Where the rollout state lives: one document, read at start and written after every
/// change.
pub trait RolloutStateStore: Send + Sync {
    /// The saved document, None when there is none yet.
    fn load(&self) -> Result<Option<Vec<u8>>, String>;
    /// Replaces the saved document.
    fn save(&self, doc: &[u8]) -> Result<(), String>;
    /// Counts changes made by someone else (another replica) since this store was
    /// opened: when it moves, the controller reloads the document. Stores only this
    /// process writes keep 0.
    fn generation(&self) -> u64 {
        0
    }
}

/// In memory (a control plane without a data directory): lost on restart.
#[derive(Debug, Default)]
pub struct MemoryStateStore(Mutex<Option<Vec<u8>>>);

impl RolloutStateStore for MemoryStateStore {
    fn load(&self) -> Result<Option<Vec<u8>>, String> {
        Ok(self.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    fn save(&self, doc: &[u8]) -> Result<(), String> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(doc.to_vec());
        Ok(())
    }
}

/// A file (`rollouts.json` in the data directory), replaced atomically.
#[derive(Debug)]
pub struct FileStateStore {
    path: PathBuf,
}

impl FileStateStore {
    /// A store writing `path`.
    pub fn new(path: PathBuf) -> FileStateStore {
        FileStateStore { path }
    }
}

impl RolloutStateStore for FileStateStore {
    fn load(&self) -> Result<Option<Vec<u8>>, String> {
        match std::fs::read(&self.path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", self.path.display())),
        }
    }

    fn save(&self, doc: &[u8]) -> Result<(), String> {
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, doc)
            .and_then(|_| std::fs::rename(&tmp, &self.path))
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }
}
