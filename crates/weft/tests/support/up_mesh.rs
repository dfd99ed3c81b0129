//! A running `weft up -f DIR` for the end-to-end tests, as a user runs it: the real
//! binary, ports from the system, its state file in a temporary `WEFT_STATE_DIR`, so the
//! CLI (`weft apply`, `weft exec`, `weft logs`, `weft proxy-config`) finds it without
//! flags. Stopped with SIGTERM on drop. Include with
//! `#[path = "support/up_mesh.rs"] mod up_mesh;`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `weft` binary under test.
pub const WEFT: &str = env!("CARGO_BIN_EXE_weft");

/// A running `weft up`.
pub struct UpMesh {
    child: Child,
    state: tempfile::TempDir,
    /// The ingress gateway's address (`127.0.0.1:<reserved port>`).
    pub ingress: String,
    /// Workload name -> address (from the summary `weft up` prints).
    pub workloads: BTreeMap<String, String>,
    /// The summary `weft up` printed.
    pub output: Vec<String>,
    /// The logs directory.
    pub logs: PathBuf,
}

impl UpMesh {
    /// Starts `weft up -f dir` (without `-f`: the bundled Bookinfo) with `extra` flags and
    /// waits (up to 180 s) for its summary; the summary must list `workloads` workloads.
    pub fn start(dir: Option<&Path>, extra: &[&str], workloads: usize) -> UpMesh {
        let state = tempfile::tempdir().unwrap();
        let port = weft_testkit::net::reserve_port();
        let mut child = Command::new(WEFT)
            .args(["up", "--api", "127.0.0.1:0", "--xds", "127.0.0.1:0", "--ingress-port", &port.to_string()])
            .args(dir.map(|d| [std::ffi::OsStr::new("-f"), d.as_os_str()]).into_iter().flatten())
            .args(extra)
            .env("WEFT_STATE_DIR", state.path())
            .env("WEFT_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("weft up | {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut output = Vec::new();
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    let done = line.starts_with("Ctrl-C stops everything");
                    output.push(line);
                    if done {
                        break;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("weft up did not report ready within 180 s: {output:#?}");
                }
            }
        }
        // Keep draining stdout so weft up never blocks on a full pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        let mut found = BTreeMap::new();
        let mut logs = PathBuf::new();
        let mut in_workloads = false;
        for l in &output {
            let words: Vec<&str> = l.split_whitespace().collect();
            if l.trim_start().starts_with("logs") && words.len() >= 2 {
                logs = PathBuf::from(words[1]);
            }
            if in_workloads && words.len() >= 2 && l.starts_with("    ") {
                found.insert(words[0].to_string(), words[1].to_string());
            }
            if l.trim_start().starts_with("workloads:") {
                in_workloads = true;
            }
        }
        assert_eq!(found.len(), workloads, "workloads announced: {output:#?}");
        UpMesh { child, state, ingress: format!("127.0.0.1:{port}"), workloads: found, output, logs }
    }

    /// Runs `weft ARGS` against this mesh: (success, stdout + stderr).
    pub fn weft(&self, args: &[&str]) -> (bool, String) {
        let o = self.weft_command(args).output().unwrap();
        (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
    }

    /// `weft ARGS` with this mesh's state directory (no `--server`: found by itself).
    pub fn weft_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(WEFT);
        c.args(args).env("WEFT_STATE_DIR", self.state.path()).env_remove("WEFT_SERVER");
        c
    }

    /// `weft apply -f FILE`.
    pub fn apply(&self, file: &Path) {
        let (ok, out) = self.weft(&["apply", "-f", file.to_str().unwrap()]);
        assert!(ok, "weft apply -f {}: {out}", file.display());
    }

    /// `weft apply -f -` with `yaml` on standard input.
    pub fn apply_yaml(&self, yaml: &str) {
        use std::io::Write as _;
        let mut child = self
            .weft_command(&["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "weft apply -f -: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// The pod name of a workload (its sidecar's proxy name), from the state file.
    pub fn pod_name(&self, workload: &str) -> String {
        let text = std::fs::read_to_string(self.state.path().join("up.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let w = v["workloads"].as_array().unwrap().iter().find(|w| w["name"] == workload);
        w.and_then(|w| w["env"]["POD_NAME"].as_str())
            .unwrap_or_else(|| panic!("no workload {workload}: {text}"))
            .to_string()
    }

    /// Polls (up to 30 s) until `weft proxy-config <workload's pod> WHAT -o json` (what
    /// the control plane serves the workload's sidecar) satisfies `check` and the sidecar
    /// has ACKed everything it is served (`weft proxy-status`: SYNCED); panics with the
    /// last configuration otherwise.
    pub fn wait_config(&self, workload: &str, what: &str, check: impl Fn(&str) -> bool) {
        let pod = self.pod_name(workload);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (ok, config) = self.weft(&["proxy-config", &pod, what, "-o", "json"]);
            if ok && check(&config) && self.synced(&pod) {
                return;
            }
            assert!(Instant::now() < deadline, "{workload}'s {what} not as expected after 30 s: {config}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether the proxy named `pod` has ACKed every type it is served.
    pub fn synced(&self, pod: &str) -> bool {
        let (_, status) = self.weft(&["proxy-status", "-o", "json"]);
        serde_json::from_str::<serde_json::Value>(&status).is_ok_and(|v| {
            v["proxies"].as_array().into_iter().flatten().any(|p| {
                p["name"] == pod && p["types"].as_object().is_some_and(|t| t.values().all(|s| s["status"] == "SYNCED"))
            })
        })
    }

    /// A workload's app log.
    pub fn log(&self, workload: &str) -> String {
        std::fs::read_to_string(self.logs.join(format!("{workload}.log"))).unwrap_or_default()
    }

    /// Polls (up to 30 s) until `check` holds; panics with `what` and the last value.
    pub fn wait_for<T: std::fmt::Debug>(what: &str, mut probe: impl FnMut() -> T, check: impl Fn(&T) -> bool) -> T {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = probe();
            if check(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{what}: not reached within 30 s; last: {v:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for UpMesh {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(60);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
        }
    }
}
