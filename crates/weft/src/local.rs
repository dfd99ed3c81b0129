//! How the operator commands find a running `weft up` without flags: `weft up` records
//! its addresses in a state file and removes it when it stops. `--server` / `WEFT_SERVER`
//! win over the file; without either the default `127.0.0.1:15014` is used.
//!
//! The file is `$WEFT_STATE_DIR/up.json`, else `$XDG_RUNTIME_DIR/weft/up.json`, else
//! `$HOME/.weft/up.json`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

/// The control plane's API when nothing else says where it is.
pub const DEFAULT_SERVER: &str = "127.0.0.1:15014";

/// What a running `weft up` records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LocalMesh {
    /// The `weft up` process.
    pub pid: u32,
    /// The control plane's JSON API.
    pub api: String,
    /// The control plane's xDS address.
    pub xds: String,
    /// The ingress gateway's URL.
    pub ingress: String,
    /// `explicit` or `transparent`.
    pub mode: String,
    /// The directory of the processes' logs (`<workload>.log`, `<workload>.sidecar.log`).
    #[serde(default)]
    pub logs: Option<PathBuf>,
    /// The workloads, for `weft exec` and `weft logs`.
    #[serde(default)]
    pub workloads: Vec<RecordedWorkload>,
    /// The file holding the control plane's admin token (0600), which the operator
    /// commands send to this mesh's API.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
}

/// A workload as `weft exec` needs it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecordedWorkload {
    /// `LocalWorkload` name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Its address.
    pub ip: String,
    /// Transparent mode: its network namespace.
    #[serde(default)]
    pub netns: Option<String>,
    /// The environment its app was given (`POD_NAME`, `HTTP_PROXY`, ...).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
}

/// The state file's path, if a directory for it can be named.
pub fn state_path() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var("WEFT_STATE_DIR") {
        return Some(d.join("up.json"));
    }
    if let Some(d) = var("XDG_RUNTIME_DIR") {
        return Some(d.join("weft").join("up.json"));
    }
    var("HOME").map(|h| h.join(".weft").join("up.json"))
}

/// The running local mesh, if the state file names a live process.
pub fn running() -> Option<LocalMesh> {
    let text = std::fs::read_to_string(state_path()?).ok()?;
    let mesh: LocalMesh = serde_json::from_str(&text).ok()?;
    Path::new(&format!("/proc/{}", mesh.pid)).exists().then_some(mesh)
}

/// The API address an operator command talks to.
pub fn server(flag: Option<String>) -> String {
    flag.filter(|s| !s.trim().is_empty())
        .or_else(|| running().map(|m| m.api))
        .unwrap_or_else(|| DEFAULT_SERVER.to_string())
}

/// Removes the state file (and the directory when `record` created it) on drop.
pub struct Recorded {
    file: PathBuf,
    created_dir: Option<PathBuf>,
}

/// Records `mesh`; refuses when another live `weft up` is recorded.
pub fn record(mesh: &LocalMesh) -> anyhow::Result<Option<Recorded>> {
    let Some(file) = state_path() else { return Ok(None) };
    if let Some(other) = running() {
        if other.pid != mesh.pid {
            bail!(
                "a local mesh is already running (pid {}, API {}); stop it first, or set WEFT_STATE_DIR for a second one",
                other.pid,
                other.api
            );
        }
    }
    let dir = file.parent().context("state file without a directory")?;
    let created_dir = if dir.exists() {
        None
    } else {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Some(dir.to_path_buf())
    };
    let text = serde_json::to_string_pretty(mesh)?;
    std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
    Ok(Some(Recorded { file, created_dir }))
}

impl Drop for Recorded {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
        if let Some(d) = &self.created_dir {
            let _ = std::fs::remove_dir(d);
        }
    }
}
