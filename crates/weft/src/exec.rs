//! `weft exec` and `weft logs`: `kubectl exec deploy/sleep -- curl ...` and `kubectl logs
//! deploy/httpbin-v1` for the workloads of the running `weft up`, found through its state
//! file (docs/local.md).
//!
//! `weft exec WORKLOAD -- CMD ARGS...` runs CMD as the workload's app runs: with its
//! environment (`POD_NAME`, ..., and in explicit mode `HTTP_PROXY` pointing at its
//! sidecar, so `curl` and `weft load` go through the mesh), and in transparent mode inside
//! its network namespace (its traffic captured by the sidecar). `weft` as CMD is the
//! running weft binary.

use std::path::PathBuf;

use anyhow::{bail, Context as _};

use crate::local::{self, LocalMesh, RecordedWorkload};

/// Runs `argv` in `workload`; returns its exit code.
pub fn exec(workload: &str, namespace: Option<&str>, argv: &[String]) -> anyhow::Result<i32> {
    let mesh = running()?;
    let w = find(&mesh, workload, namespace)?;
    let Some(first) = argv.first() else { bail!("nothing to run: weft exec {workload} -- CMD [ARGS...]") };
    let program: std::ffi::OsString = if first == "weft" {
        std::env::current_exe().context("locating the weft binary")?.into()
    } else {
        first.into()
    };
    let mut cmd = match &w.netns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&program);
            c
        }
        None => std::process::Command::new(&program),
    };
    cmd.args(&argv[1..]);
    for k in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY"] {
        cmd.env_remove(k);
    }
    cmd.envs(&w.env);
    let status = cmd.status().with_context(|| format!("running {first}"))?;
    Ok(status.code().unwrap_or(1))
}

/// The log file of `workload`'s app, or of its sidecar.
pub fn log_file(workload: &str, namespace: Option<&str>, sidecar: bool) -> anyhow::Result<PathBuf> {
    let mesh = running()?;
    let w = find(&mesh, workload, namespace)?;
    let dir = mesh.logs.as_ref().context("this weft up did not record its log directory")?;
    let name = if sidecar { format!("{}.sidecar.log", w.name) } else { format!("{}.log", w.name) };
    Ok(dir.join(name))
}

/// `weft logs`: prints the log.
pub fn logs(workload: &str, namespace: Option<&str>, sidecar: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    let file = log_file(workload, namespace, sidecar)?;
    let text = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    let _ = std::io::stdout().write_all(&text);
    Ok(())
}

fn running() -> anyhow::Result<LocalMesh> {
    local::running()
        .context("no weft up is running (its state file names no live process); start one with `weft up -f DIR`")
}

/// The workload named `name` (`deploy/NAME` and `deployment/NAME` too, as kubectl takes
/// them), in `namespace` when given.
fn find<'a>(mesh: &'a LocalMesh, name: &str, namespace: Option<&str>) -> anyhow::Result<&'a RecordedWorkload> {
    let name = name.strip_prefix("deploy/").or_else(|| name.strip_prefix("deployment/")).unwrap_or(name);
    let matches: Vec<&RecordedWorkload> =
        mesh.workloads.iter().filter(|w| w.name == name && namespace.is_none_or(|ns| w.namespace == ns)).collect();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => {
            let names: Vec<String> = mesh.workloads.iter().map(|w| format!("{}.{}", w.name, w.namespace)).collect();
            bail!("no workload {name:?} in the running weft up; its workloads: {}", names.join(", "))
        }
        _ => bail!("workload {name:?} exists in several namespaces: give --namespace"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh() -> LocalMesh {
        let w = |name: &str, ns: &str| RecordedWorkload {
            name: name.into(),
            namespace: ns.into(),
            ip: "127.0.0.2".into(),
            netns: None,
            env: Default::default(),
        };
        LocalMesh {
            pid: 1,
            api: String::new(),
            xds: String::new(),
            ingress: String::new(),
            mode: "explicit".into(),
            logs: None,
            workloads: vec![w("sleep", "default"), w("httpbin", "default"), w("httpbin", "other")],
            admin_token_file: None,
        }
    }

    #[test]
    fn finds_workloads_like_kubectl_names_them() {
        let m = mesh();
        assert_eq!(find(&m, "deploy/sleep", None).unwrap().name, "sleep");
        assert_eq!(find(&m, "httpbin", Some("other")).unwrap().namespace, "other");
        let e = find(&m, "httpbin", None).unwrap_err().to_string();
        assert!(e.contains("several namespaces"), "{e}");
        let e = find(&m, "nope", None).unwrap_err().to_string();
        assert!(e.contains("sleep.default"), "{e}");
    }
}
