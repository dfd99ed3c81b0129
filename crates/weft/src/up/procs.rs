//! The processes `weft up` runs: each in its own process group (so whatever it forks is
//! stopped with it), output to a log file, stopped with SIGTERM then SIGKILL.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::{mpsc, watch};

/// A running child.
pub struct Proc {
    /// What it is (`productpage-v1`, `productpage-v1 sidecar`, ...).
    pub name: String,
    pgid: Pid,
    exited: watch::Receiver<Option<ExitStatus>>,
}

/// Starts `cmd` in a new process group, stdout and stderr appended to `log`. Its exit is
/// reported on `exits` with `name`.
pub fn spawn(
    name: &str,
    mut cmd: tokio::process::Command,
    log: &Path,
    exits: mpsc::UnboundedSender<(String, ExitStatus)>,
) -> anyhow::Result<Proc> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(Stdio::from(out)).stderr(Stdio::from(err)).process_group(0).kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let pid = child.id().context("the child exited before it could be tracked")?;
    let pgid = Pid::from_raw(i32::try_from(pid).context("pid out of range")?);
    let (tx, rx) = watch::channel(None);
    let label = name.to_string();
    tokio::spawn(async move {
        if let Ok(status) = child.wait().await {
            let _ = tx.send(Some(status));
            let _ = exits.send((label, status));
        }
    });
    Ok(Proc { name: name.to_string(), pgid, exited: rx })
}

impl Proc {
    /// The exit status, once exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exited.borrow()
    }

    /// SIGTERM to the group, SIGKILL after `grace`; returns once the process exited.
    /// Members of the group that outlive the leader get SIGKILL too.
    pub async fn stop(&mut self, grace: Duration) {
        if self.exit_status().is_none() {
            let _ = killpg(self.pgid, Signal::SIGTERM);
            let waited = tokio::time::timeout(grace, self.exited.wait_for(Option::is_some)).await.is_ok();
            if !waited {
                tracing::warn!(process = %self.name, "did not stop within {grace:?}: killing");
                let _ = killpg(self.pgid, Signal::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(5), self.exited.wait_for(Option::is_some)).await;
            }
        }
        // Leftover children of the group (the leader is gone, the group id stays valid
        // while any member lives).
        let _ = killpg(self.pgid, Signal::SIGKILL);
    }
}
