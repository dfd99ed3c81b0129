//! `weft control --kubeconfig ...` as a process for the tests against a real API server
//! (`weft_testkit::kube`): its JSON log lines (`WEFT_LOG_JSON`) collected as they come,
//! so a test waits on what the process says it did (listed a kind, wrote a status, won
//! the Lease) and checks what it never said (forbidden). Killed (SIGKILL) on drop.
//! Include with `#[path = "support/kube_control.rs"] mod kube_control;`.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// The `weft` binary under test.
pub const WEFT: &str = env!("CARGO_BIN_EXE_weft");

/// How long a log line may take to appear (a loaded machine, an API server relisting).
pub const WAIT: Duration = Duration::from_secs(90);

/// A running `weft control`.
pub struct ControlProc {
    /// A name for messages (`replica-a`).
    pub name: String,
    child: Child,
    /// The JSON API's address, from the line it prints.
    pub api: String,
    logs: Arc<Mutex<Vec<Value>>>,
    grew: watch::Receiver<usize>,
}

impl ControlProc {
    /// Runs `weft ARGS` (`control ...`) with `envs` set (and no `POD_NAME`/`POD_NAMESPACE`
    /// of the test's own) and waits for its "xDS on ..., API on ..." line.
    pub async fn start(name: &str, args: &[String], envs: &[(&str, &str)]) -> ControlProc {
        let mut child = Command::new(WEFT)
            .args(args)
            .env("WEFT_LOG_JSON", "true")
            .env("WEFT_LOG", "info,weft_control::kubernetes=debug")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .envs(envs.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("weft control starts");
        let logs: Arc<Mutex<Vec<Value>>> = Arc::default();
        let (tx, grew) = watch::channel(0usize);
        let stderr = child.stderr.take().expect("stderr piped");
        let sink = logs.clone();
        let who = name.to_string();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let v = serde_json::from_str(&line).unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                if std::env::var_os("WEFT_TEST_ECHO").is_some() {
                    eprintln!("[{who}] {line}");
                }
                let n = {
                    let mut l = sink.lock().unwrap_or_else(|e| e.into_inner());
                    l.push(v);
                    l.len()
                };
                tx.send_replace(n);
            }
        });
        let mut out = BufReader::new(child.stdout.take().expect("stdout piped")).lines();
        let line = match tokio::time::timeout(WAIT, out.next_line()).await {
            Ok(Ok(Some(line))) => line,
            other => {
                let status = child.try_wait();
                let logs = logs.lock().unwrap_or_else(|e| e.into_inner()).clone();
                panic!("{name}: no start line ({other:?}, exit {status:?}); log:\n{}", render(&logs));
            }
        };
        let api = line.split("API on ").nth(1).and_then(|s| s.split(',').next()).unwrap_or_default().trim().to_string();
        assert!(!api.is_empty(), "{name}: unexpected start line {line:?}");
        // Keep reading stdout so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
        ControlProc { name: name.to_string(), child, api, logs, grew }
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<Value> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Log lines whose message starts with `message` (and that pass `pred`).
    pub fn lines(&self, message: &str, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.logs().into_iter().filter(|l| msg(l).starts_with(message) && pred(l)).collect()
    }

    /// Waits until a line whose message starts with `message` passes `pred`; returns it.
    pub async fn wait_line(&self, message: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let mut grew = self.grew.clone();
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(l) = self.lines(message, &pred).into_iter().next() {
                    return Some(l);
                }
                if grew.changed().await.is_err() {
                    return self.lines(message, &pred).into_iter().next();
                }
            }
        })
        .await;
        match found {
            Ok(Some(l)) => l,
            _ => panic!("{}: no log line {message:?} within {WAIT:?}; log:\n{}", self.name, render(&self.logs())),
        }
    }

    /// The whole log, one line per entry, for failure messages.
    pub fn render(&self) -> String {
        render(&self.logs())
    }

    /// SIGTERM, as the kubelet stops a pod; waits for the exit (at most [`WAIT`]).
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().and_then(|p| i32::try_from(p).ok()).expect("running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        tokio::time::timeout(WAIT, self.child.wait()).await.expect("exits after SIGTERM").expect("wait")
    }

    /// kill -9.
    pub async fn kill9(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// A log line's message.
pub fn msg(line: &Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or_default()
}

/// A field of a log line, as text.
pub fn field(line: &Value, name: &str) -> String {
    match &line["fields"][name] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        v => v.to_string(),
    }
}

fn render(logs: &[Value]) -> String {
    logs.iter().map(|l| l.to_string()).collect::<Vec<_>>().join("\n")
}

/// Probes until `check` holds, for at most [`WAIT`]; panics with the last value.
pub async fn eventually<T: std::fmt::Debug, F: std::future::Future<Output = T>>(
    what: &str,
    mut probe: impl FnMut() -> F,
    check: impl Fn(&T) -> bool,
) -> T {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let v = probe().await;
        if check(&v) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: still {v:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
