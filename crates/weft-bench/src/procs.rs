//! Child processes (pinned to a CPU with `taskset`), what `/proc` says about them, and a
//! small HTTP/1.1 client for admin and metrics endpoints.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

/// Linux's clock tick (`getconf CLK_TCK`), the unit of `/proc/PID/stat` CPU times.
pub const CLK_TCK: f64 = 100.0;

/// Where each role runs: the load generator, echo server and control plane on one CPU,
/// every proxy on the other, so the meshes compete with each other's sidecar only.
#[derive(Clone, Debug)]
pub struct Pinning {
    pub apps: Option<String>,
    pub proxies: Option<String>,
}

impl Pinning {
    /// CPU 0 for the applications, CPU 1 for the proxies; no pinning on a single CPU or
    /// without `taskset`.
    pub fn detect() -> Pinning {
        let cpus = online_cpus();
        if cpus >= 2 && which("taskset").is_some() {
            Pinning { apps: Some("0".into()), proxies: Some("1".into()) }
        } else {
            Pinning { apps: None, proxies: None }
        }
    }
}

/// CPUs of the machine (not of this process's affinity mask, which `bench/run.sh` narrows).
pub fn online_cpus() -> usize {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| s.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0)
        .max(1)
}

/// `program` run with `taskset -c cpu` when `cpu` is given (taskset execs it: same pid).
pub fn command(cpu: Option<&str>, program: &Path) -> Command {
    let mut c = match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpu]).arg(program);
            c
        }
        None => Command::new(program),
    };
    c.kill_on_drop(true).stdin(Stdio::null());
    c
}

/// A program on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// A running child process, killed when dropped; its stderr (and stdout unless taken)
/// goes to `log`.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    pub started: Instant,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr to `log` (stdout piped when `pipe_stdout`).
    pub fn spawn(name: &str, mut cmd: Command, log: &Path, pipe_stdout: bool) -> anyhow::Result<Proc> {
        let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stderr(file.try_clone()?);
        if pipe_stdout {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(file);
        }
        let started = Instant::now();
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc { name: name.to_string(), child, log: log.to_path_buf(), started })
    }

    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().ok_or_else(|| anyhow!("{} has exited", self.name))
    }

    /// The first line on stdout (then stdout is drained in the background).
    pub async fn first_line(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let stdout = self.child.stdout.take().ok_or_else(|| anyhow!("{}: stdout not piped", self.name))?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(timeout, lines.next_line())
            .await
            .map_err(|_| anyhow!("{} printed nothing within {timeout:?}; log: {}", self.name, self.log_tail()))??
            .ok_or_else(|| anyhow!("{} exited; log: {}", self.name, self.log_tail()))?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(line)
    }

    /// The end of the log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!("\n  {}", lines[lines.len().saturating_sub(15)..].join("\n  "))
    }

    /// Fails when the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}); log: {}", self.name, self.log_tail());
        }
        Ok(())
    }

    pub fn stats(&self) -> anyhow::Result<ProcStats> {
        ProcStats::read(self.pid()?)
    }
}

/// How long a dropped [`Proc`] gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

impl Drop for Proc {
    /// When this run records a profile (`WEFT_BENCH_STOP=term`: a BOLT-instrumented build,
    /// `scripts/bolt-proxy.sh`; or `LLVM_PROFILE_FILE` set), stops the process with SIGTERM
    /// first: an instrumented build writes its profile at exit, which a kill would lose. It
    /// is killed (`kill_on_drop`) when still running after [`STOP_GRACE`]. Other runs kill
    /// at once, as before: a proxy's drain would only lengthen them.
    fn drop(&mut self) {
        let term = std::env::var_os("WEFT_BENCH_STOP").is_some_and(|v| v == "term");
        if !term && std::env::var_os("LLVM_PROFILE_FILE").is_none() {
            return;
        }
        let Some(pid) = self.child.id() else { return };
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !sent {
            return;
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// CPU time and memory of a process, from `/proc`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcStats {
    /// User + system CPU seconds of all its threads so far.
    pub cpu_s: f64,
    /// Resident memory now (VmRSS), KiB.
    pub rss_kib: u64,
    /// Peak resident memory (VmHWM), KiB.
    pub hwm_kib: u64,
}

impl ProcStats {
    pub fn read(pid: u32) -> anyhow::Result<ProcStats> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may contain spaces) in parentheses.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let tick = |i: usize| -> anyhow::Result<f64> {
            Ok(fields.get(i).ok_or_else(|| anyhow!("short /proc/{pid}/stat"))?.parse::<f64>()? / CLK_TCK)
        };
        // utime and stime are fields 14 and 15; `rest` starts at field 3.
        let cpu_s = tick(11)? + tick(12)?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib = |key: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or(0)
        };
        Ok(ProcStats { cpu_s, rss_kib: kib("VmRSS:"), hwm_kib: kib("VmHWM:") })
    }
}

/// A free port on loopback (bound and released).
pub fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Two consecutive free ports; returns the first. Tried first next to a port the kernel
/// hands out, then below the ephemeral range (32768 and up on Linux), which outgoing
/// connections never take: a machine with tens of thousands of connections open (another
/// scale test) has few free neighbours in the ephemeral range.
pub fn free_port_pair() -> anyhow::Result<SocketAddr> {
    let pair_at = |port: u16| -> Option<SocketAddr> {
        let first = std::net::TcpListener::bind(("127.0.0.1", port)).ok()?;
        let _second = std::net::TcpListener::bind(("127.0.0.1", port.checked_add(1)?)).ok()?;
        first.local_addr().ok()
    };
    for _ in 0..20 {
        let a = free_port()?;
        if let Some(found) = a.port().checked_add(1).and_then(|_| pair_at(a.port())) {
            return Ok(found);
        }
    }
    // Spread the start over the range so concurrent runs rarely collide.
    let start = 20_000 + (std::process::id() as u16 % 6_000) * 2;
    for i in 0..6_000u16 {
        let port = 20_000 + (start - 20_000 + i * 2) % 12_000;
        if let Some(found) = pair_at(port) {
            return Ok(found);
        }
    }
    bail!("no two consecutive free ports on loopback")
}

/// One GET over a fresh HTTP/1.1 connection: status and body.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let fut = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = http::Request::get(path).header("host", "bench").body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).to_string()))
    };
    tokio::time::timeout(Duration::from_secs(10), fut).await.map_err(|_| anyhow!("GET {addr}{path} timed out"))?
}

/// Polls `f` every `every` until it yields `Some`, for at most `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, every: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Writes `path` back and drops its pages from the page cache, so that every build a run
/// compares starts from the same state. How many of a binary's pages a process maps per
/// fault depends on how the page cache holds the file: a binary just written (a fresh
/// build, BOLT's output) was mapped in large blocks, and peaked ~3 MiB higher than the same
/// file after `drop_caches` (bench/notes.md, "After the twelfth session's merge"). GNU dd's
/// `nocache` flag is `posix_fadvise(POSIX_FADV_DONTNEED)` (this crate has no `unsafe`).
pub fn evict_from_page_cache(path: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    file.sync_all().with_context(|| format!("fsync {}", path.display()))?;
    let out = std::process::Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .output()
        .context("dd")?;
    ensure!(out.status.success(), "dd iflag=nocache on {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    Ok(())
}
