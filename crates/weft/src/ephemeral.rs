//! `weft control` without `--data-dir` (and without `--insecure-dev`): the control plane
//! is still secure, its state is only short-lived. The CA root and key, the join-token
//! key and the admin token live in a fresh private temporary directory (0700, removed
//! when the process stops), so callers must authenticate exactly as with `--data-dir`;
//! what is lost at a restart is the mesh root (proxies re-join with new tokens) and the
//! registrations.
//!
//! The operator commands on the same machine find the admin token without flags: the
//! control plane records `{pid, api, admin_token_file}` in
//! `<state dir>/control-<api address>.json` (the state directory of [`crate::local`]),
//! removed when it stops; [`admin_token_for`] reads it for the API address a command
//! talks to when the recording process is alive.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// The temporary data directory (removed on drop).
pub struct EphemeralDir {
    dir: tempfile::TempDir,
}

impl EphemeralDir {
    /// A new private directory under the system's temporary directory (`TMPDIR`).
    pub fn create() -> anyhow::Result<EphemeralDir> {
        let dir = tempfile::Builder::new()
            .prefix("weft-control-")
            .tempdir()
            .context("no --data-dir: cannot create the temporary directory for the control plane's CA and tokens")?;
        Ok(EphemeralDir { dir })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// What a running `weft control` records for the operator commands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct ControlRecord {
    pid: u32,
    api: String,
    admin_token_file: PathBuf,
}

/// The record file of the control plane whose API is `api`.
fn record_path(api: &str) -> Option<PathBuf> {
    let dir = crate::local::state_path()?.parent()?.to_path_buf();
    let name: String = api.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' }).collect();
    Some(dir.join(format!("control-{name}.json")))
}

/// The record, removed on drop.
pub struct Recorded(PathBuf);

impl Drop for Recorded {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Records that this process serves the API on `api` with the admin token in
/// `token_file`. A failure is only logged: the token's path is logged too.
pub fn record(api: std::net::SocketAddr, token_file: &Path) -> Option<Recorded> {
    let path = record_path(&api.to_string())?;
    let rec = ControlRecord { pid: std::process::id(), api: api.to_string(), admin_token_file: token_file.into() };
    let write = || -> std::io::Result<()> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&rec).unwrap_or_default())?;
        std::fs::rename(&tmp, &path)
    };
    match write() {
        Ok(()) => Some(Recorded(path)),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "the admin token's location is not recorded for the CLI");
            None
        }
    }
}

/// The admin token of the live `weft control` that recorded its API as `addr` (the
/// address as the command names it; a control plane bound on 0.0.0.0 or [::] is found
/// through 127.0.0.1 / localhost too).
pub fn admin_token_for(addr: &str) -> Option<String> {
    let candidates = match addr.rsplit_once(':') {
        Some(("127.0.0.1" | "localhost", port)) => vec![addr.to_string(), format!("0.0.0.0:{port}")],
        Some(("[::1]", port)) => vec![addr.to_string(), format!("[::]:{port}")],
        _ => vec![addr.to_string()],
    };
    candidates.iter().find_map(|a| {
        let text = std::fs::read_to_string(record_path(a)?).ok()?;
        let rec: ControlRecord = serde_json::from_str(&text).ok()?;
        if !Path::new(&format!("/proc/{}", rec.pid)).exists() {
            return None;
        }
        std::fs::read_to_string(rec.admin_token_file).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_names_are_file_names() {
        let p = record_path("[::1]:15014").unwrap();
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, "control-___1__15014.json");
        let p = record_path("127.0.0.1:15014").unwrap();
        assert!(p.ends_with("control-127.0.0.1_15014.json"), "{}", p.display());
    }
}
