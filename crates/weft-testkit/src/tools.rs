//! Locating the external tools (curl, h2load, promtool, envoy, ...) that
//! `scripts/setup.sh` installs.

use std::path::{Path, PathBuf};

/// Path of the executable `name`: first on `PATH`, then in `<workspace>/.tools/bin`.
///
/// # Panics
/// With "`name` not found: run scripts/setup.sh" when it is in neither place.
pub fn require(name: &str) -> PathBuf {
    find(name).unwrap_or_else(|| panic!("{name} not found: run scripts/setup.sh"))
}

/// Like [`require`] but returns `None` instead of panicking.
pub fn find(name: &str) -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join(name)).find(|p| is_executable(p)));
    from_path.or_else(|| {
        let local = tools_bin().join(name);
        is_executable(&local).then_some(local)
    })
}

/// `<workspace>/.tools/bin`, where `scripts/setup.sh` links the tools it installs.
pub fn tools_bin() -> PathBuf {
    crate::workspace_root().join(".tools").join("bin")
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Runs `promtool check metrics` on `text` (Prometheus text exposition format).
/// `Ok` when promtool accepts it; otherwise an error carrying promtool's complaints
/// (it also rejects lint problems such as a missing `# HELP`).
pub async fn promtool_check_metrics(text: &str) -> anyhow::Result<()> {
    // The one lint tolerated is the base-unit lint on the name Istio mandates for its
    // duration histogram (`istio_request_duration_milliseconds`).
    promtool_check_metrics_allowing(
        text,
        &["istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\""],
    )
    .await
}

/// Like [`promtool_check_metrics`], tolerating the lint lines in `allowed` (exactly as
/// promtool prints them): lints on names Istio mandates.
pub async fn promtool_check_metrics_allowing(text: &str, allowed: &[&str]) -> anyhow::Result<()> {
    use anyhow::Context;
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(require("promtool"))
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawning promtool")?;
    let mut stdin = child.stdin.take().context("promtool stdin")?;
    stdin.write_all(text.as_bytes()).await.context("writing to promtool")?;
    drop(stdin);
    let out = child.wait_with_output().await.context("running promtool")?;
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Exit 3 lists lint problems, one a line.
    let other_problems = report.lines().map(str::trim).any(|l| !l.is_empty() && !allowed.contains(&l));
    if out.status.success() || (out.status.code() == Some(3) && !other_problems) {
        return Ok(());
    }
    anyhow::bail!(
        "promtool check metrics failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
