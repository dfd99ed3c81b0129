//! Control-plane scale benchmark (not a test): N simulated proxies (ADS clients, in this
//! process) against one `weft control` process serving Bookinfo. Measures the time from a
//! config change (`weft apply` of a VirtualService) until every proxy has received and
//! ACKed the new routes, and the control plane's resident memory.
//!
//! `cargo run --release -p weft --example xds_scale -- 1000` (builds `weft` first:
//! `cargo build --release -p weft`). Prints one JSON line per run.
//!
//! `-- 10000 --replicas 3`: a 3-member etcd cluster on loopback (`etcd` from `PATH` or
//! `.tools/bin`) and 3 `weft control --store etcd://` replicas; every simulated proxy
//! knows all three and starts at a random one, the change is applied through the first;
//! RSS is reported per replica with the proxies each one serves. `WEFT_BIN` overrides the
//! `weft` binary (a debug build for a trial run). `--full-check`: every simulated proxy
//! decodes its own copy of each route configuration (see `RouteCheck`; by default equal
//! bytes are decoded once).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weft_xds::{type_url, AdsClient, Backoff, ClientConfig, NodeInfo, ResourceHandler, ResourceUpdate, XdsMode};

/// Accepts everything (the client names every resource); checks each route
/// configuration it gets and notes when the routes send `reviews` to the subset cluster
/// the current change asked for. The check reads the bytes each proxy received; a
/// decode is shared by all proxies that received the very same bytes ([`RouteCheck`]),
/// unless `--full-check` asks every proxy to decode its own copy.
struct Sim {
    check: Arc<RouteCheck>,
    changed_at: Arc<Mutex<Option<Instant>>>,
    /// The cluster the current change routes `reviews` to, and the change's number.
    want: Arc<Mutex<(u64, String)>>,
    latencies: Arc<Mutex<Vec<Duration>>>,
    synced: Arc<AtomicUsize>,
    seen_initial: Mutex<bool>,
    /// The last change this proxy has (counted once).
    have: Mutex<u64>,
}

/// Whether a route configuration sends to a cluster, decoded once per distinct content.
///
/// Every simulated proxy receives the same route configurations (same names, same
/// bytes). Decoding each copy again would measure prost 10,000 times over rather than
/// the xDS path (on a fleet each proxy decodes on its own CPU, not on the control
/// plane's cores): the last decoded bytes and verdict of each name are kept, and a
/// proxy whose bytes are equal (compared in full) reuses the verdict. Other bytes are
/// decoded. With `full` every copy is decoded (the behaviour before this cache).
struct RouteCheck {
    full: bool,
    /// Per route configuration name, the last decode.
    last: Mutex<std::collections::HashMap<String, Checked>>,
}

/// One decoded route configuration: its bytes, the cluster asked for and the verdict.
struct Checked {
    bytes: Vec<u8>,
    cluster: String,
    verdict: bool,
}

impl RouteCheck {
    /// Whether any route of `routes` (route configurations as received) sends to `cluster`.
    fn routes_to(&self, routes: &[(String, weft_xds::Any)], cluster: &str) -> bool {
        routes.iter().any(|(name, any)| self.one_routes_to(name, &any.value, cluster))
    }

    fn one_routes_to(&self, name: &str, bytes: &[u8], cluster: &str) -> bool {
        if self.full {
            return decoded_routes_to(bytes, cluster);
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(checked) = last.get(name) {
            if checked.bytes.as_slice() == bytes && checked.cluster == cluster {
                return checked.verdict;
            }
        }
        let verdict = decoded_routes_to(bytes, cluster);
        last.insert(name.to_string(), Checked { bytes: bytes.to_vec(), cluster: cluster.to_string(), verdict });
        verdict
    }
}

/// Decodes one RouteConfiguration and says whether any route sends to `cluster`.
fn decoded_routes_to(bytes: &[u8], cluster: &str) -> bool {
    use envoy_types::pb::envoy::config::route::v3::{route, route_action, RouteConfiguration};
    use prost::Message;
    let Ok(rc) = RouteConfiguration::decode(bytes) else { return false };
    rc.virtual_hosts.iter().flat_map(|vh| &vh.routes).any(|r| match &r.action {
        Some(route::Action::Route(a)) => match &a.cluster_specifier {
            Some(route_action::ClusterSpecifier::Cluster(c)) => c == cluster,
            Some(route_action::ClusterSpecifier::WeightedClusters(w)) => w.clusters.iter().any(|c| c.name == cluster),
            _ => false,
        },
        _ => false,
    })
}

/// CPU time (user + system) of a process, in seconds (`/proc/PID/stat`, 100 ticks/s).
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15; after ')' the state is field 3, index 0.
    (ticks(11) + ticks(12)) / 100.0
}

/// Read and write system calls of a process so far (`/proc/PID/io` `syscr` + `syscw`:
/// `read`/`write` and their vectored forms, which is how tokio and Go move socket bytes).
fn io_calls(pid: &str) -> (u64, u64) {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let field = |name: &str| {
        io.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0)
    };
    (field("syscr:"), field("syscw:"))
}

/// Context switches (voluntary + involuntary) of a process's live threads so far.
fn context_switches(pid: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Kernel-visible work of one process: reads, writes, context switches.
#[derive(Clone, Copy, Default)]
struct Calls {
    reads: u64,
    writes: u64,
    switches: u64,
}

impl Calls {
    fn take(pid: &str) -> Calls {
        let (reads, writes) = io_calls(pid);
        Calls { reads, writes, switches: context_switches(pid) }
    }

    /// What happened between `self` and `later`, per proxy served (`proxies`), as JSON.
    fn per_proxy(&self, later: &Calls, proxies: usize) -> serde_json::Value {
        let per = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / proxies.max(1) as f64;
        serde_json::json!({
            "reads": per(self.reads, later.reads),
            "writes": per(self.writes, later.writes),
            "context_switches": per(self.switches, later.switches),
        })
    }
}

/// Busy and total CPU seconds of the whole machine (`/proc/stat`, all cores).
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .map(|l| l.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect())
        .unwrap_or_default();
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    ((total - idle) / 100.0, total / 100.0)
}

/// CPU seconds of each party over a window: the simulated clients (this process), the
/// replicas, etcd, and everything else on the machine (other users' work).
struct CpuSample {
    clients: f64,
    client_calls: Calls,
    replica_calls: Vec<Calls>,
    etcd_calls: Calls,
    replicas: Vec<f64>,
    etcd: f64,
    machine_busy: f64,
    machine_total: f64,
}

impl CpuSample {
    fn take(replicas: &[u32], etcd: &[u32]) -> CpuSample {
        let (machine_busy, machine_total) = machine_cpu();
        CpuSample {
            clients: cpu_seconds("self"),
            client_calls: Calls::take("self"),
            replica_calls: replicas.iter().map(|p| Calls::take(&p.to_string())).collect(),
            etcd_calls: etcd.iter().map(|p| Calls::take(&p.to_string())).fold(Calls::default(), |a, b| Calls {
                reads: a.reads + b.reads,
                writes: a.writes + b.writes,
                switches: a.switches + b.switches,
            }),
            replicas: replicas.iter().map(|p| cpu_seconds(&p.to_string())).collect(),
            etcd: etcd.iter().map(|p| cpu_seconds(&p.to_string())).sum(),
            machine_busy,
            machine_total,
        }
    }

    /// What each party used between `self` and `later`, as JSON; system calls and
    /// context switches per proxy (`served`: how many proxies each replica serves, `n`:
    /// all proxies, which the clients and etcd are divided by).
    fn since(&self, later: &CpuSample, served: &[usize], n: usize) -> serde_json::Value {
        let replicas: Vec<f64> = later.replicas.iter().zip(&self.replicas).map(|(b, a)| b - a).collect();
        let ours = (later.clients - self.clients) + replicas.iter().sum::<f64>() + (later.etcd - self.etcd);
        let busy = later.machine_busy - self.machine_busy;
        serde_json::json!({
            "clients_s": later.clients - self.clients,
            "replicas_s": replicas,
            "etcd_s": later.etcd - self.etcd,
            "others_s": (busy - ours).max(0.0),
            "wall_cores_s": later.machine_total - self.machine_total,
            "per_proxy": {
                "clients": self.client_calls.per_proxy(&later.client_calls, n),
                "replicas": self.replica_calls.iter().zip(&later.replica_calls).zip(served)
                    .map(|((a, b), s)| a.per_proxy(b, *s)).collect::<Vec<_>>(),
                "etcd": self.etcd_calls.per_proxy(&later.etcd_calls, n),
            },
        })
    }
}

impl ResourceHandler for Sim {
    fn type_urls(&self) -> Vec<&'static str> {
        vec![type_url::CLUSTER, type_url::ENDPOINT, type_url::LISTENER, type_url::ROUTE]
    }
    fn apply(&self, type_url: &str, u: ResourceUpdate) -> Result<(), String> {
        if type_url == type_url::ROUTE {
            let mut first = self.seen_initial.lock().unwrap_or_else(|p| p.into_inner());
            if !*first {
                *first = true;
                self.synced.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            let (change, cluster) = self.want.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut have = self.have.lock().unwrap_or_else(|p| p.into_inner());
            if *have < change && self.check.routes_to(&u.upserts, &cluster) {
                *have = change;
                if let Some(t0) = *self.changed_at.lock().unwrap_or_else(|p| p.into_inner()) {
                    self.latencies.lock().unwrap_or_else(|p| p.into_inner()).push(t0.elapsed());
                }
            }
        }
        Ok(())
    }
    fn interest(&self, type_url: &str) -> Option<BTreeSet<String>> {
        match type_url {
            // Ask for every route and endpoint name the explicit-mode translator emits.
            type_url::ROUTE => Some(["weft-outbound".to_string(), "9080".to_string()].into()),
            type_url::ENDPOINT => Some(
                ["details", "productpage", "ratings", "reviews"]
                    .iter()
                    .map(|s| format!("outbound|9080||{s}.default.svc.cluster.local"))
                    .collect(),
            ),
            _ => None,
        }
    }
}

/// Waits (at most 60 s) until the replicas and etcd together use under a third of a
/// core over a second (idle, 10,000 streams still cost their HTTP/2 keep-alive pings);
/// how long that took and the cores they used in the last second.
async fn quiet(replicas: &[u32], etcd: &[u32]) -> (Duration, f64) {
    let started = Instant::now();
    let busy = || -> f64 { replicas.iter().chain(etcd).map(|p| cpu_seconds(&p.to_string())).sum() };
    let mut last = busy();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = busy();
        let used = now - last;
        if used < 0.34 || started.elapsed() >= Duration::from_secs(60) {
            return (started.elapsed(), used);
        }
        last = now;
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts a 3-member etcd cluster; its `--store` URL and processes.
fn start_etcd(root: &Path, data: &Path) -> anyhow::Result<(String, Vec<tokio::process::Child>)> {
    let etcd = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("etcd")).find(|p| p.is_file()))
        .unwrap_or_else(|| root.join(".tools/bin/etcd"));
    let addrs: Vec<(u16, u16)> = (0..3).map(|_| Ok((free_port()?, free_port()?))).collect::<anyhow::Result<_>>()?;
    let initial: Vec<String> =
        addrs.iter().enumerate().map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}")).collect();
    let mut children = Vec::new();
    for (i, (c, p)) in addrs.iter().enumerate() {
        children.push(
            tokio::process::Command::new(&etcd)
                .args(["--name", &format!("m{i}"), "--data-dir"])
                .arg(data.join(format!("m{i}")))
                .args(["--listen-client-urls", &format!("http://127.0.0.1:{c}")])
                .args(["--advertise-client-urls", &format!("http://127.0.0.1:{c}")])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{p}")])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{p}")])
                .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()?,
        );
    }
    let store = format!("etcd://{}", addrs.iter().map(|(c, _)| format!("127.0.0.1:{c}")).collect::<Vec<_>>().join(","));
    Ok((store, children))
}

/// Starts `weft control` on `dir` (and `store`); its process, xDS and API addresses.
async fn start_control(
    weft: &Path,
    dir: &Path,
    store: Option<&str>,
) -> anyhow::Result<(tokio::process::Child, String, String)> {
    let mut cmd = tokio::process::Command::new(weft);
    cmd.args(["control", "--insecure-dev", "--dir"]).arg(dir).args(["--xds", "127.0.0.1:0", "--api", "127.0.0.1:0"]);
    if let Some(s) = store {
        cmd.args(["--store", s]);
    }
    let mut control =
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null()).kill_on_drop(true).spawn()?;
    use tokio::io::AsyncBufReadExt;
    let mut lines =
        tokio::io::BufReader::new(control.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?).lines();
    let line = lines.next_line().await?.ok_or_else(|| anyhow::anyhow!("control plane exited"))?;
    let xds = line
        .split("xDS on ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .ok_or_else(|| anyhow::anyhow!("{line}"))?
        .to_string();
    let api = line.split("API on ").nth(1).ok_or_else(|| anyhow::anyhow!("{line}"))?.trim().to_string();
    Ok((control, xds, api))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let flag = |name: &str, default: usize| -> anyhow::Result<usize> {
        Ok(match args.iter().position(|a| a == name) {
            Some(i) => args.get(i + 1).map(|s| s.parse()).transpose()?.unwrap_or(default),
            None => default,
        })
    };
    let replicas = flag("--replicas", 1)?;
    // Changes measured one after the other (each waits until every proxy has the last).
    let changes = flag("--changes", 1)?.max(1);
    // Seconds between changes (what the parties do then is `cpu_after_change`).
    let quiet_secs = flag("--quiet-secs", 2)?;
    // Every proxy decodes its own copy of each route configuration (see `RouteCheck`).
    let full_check = args.iter().any(|a| a == "--full-check");
    let check = Arc::new(RouteCheck { full: full_check, last: Mutex::default() });
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let weft = std::env::var_os("WEFT_BIN").map(PathBuf::from).unwrap_or_else(|| root.join("target/release/weft"));
    anyhow::ensure!(weft.is_file(), "build it first: cargo build --release -p weft");
    let bookinfo = root.join("samples/bookinfo");
    let dir = tempfile::tempdir()?;
    for f in [
        "platform/kube/bookinfo.yaml",
        "networking/destination-rule-all.yaml",
        "networking/virtual-service-all-v1.yaml",
    ] {
        let src: PathBuf = bookinfo.join(f);
        std::fs::copy(&src, dir.path().join(src.file_name().unwrap_or_default()))?;
    }
    let etcd_dir = tempfile::tempdir()?;
    let (store, etcd_children) = if replicas > 1 {
        let (store, children) = start_etcd(&root, etcd_dir.path())?;
        (Some(store), children)
    } else {
        (None, Vec::new())
    };
    let mut controls = Vec::new();
    for _ in 0..replicas {
        // The first replica waits for the new etcd cluster (its connect retries 10 s).
        controls.push(start_control(&weft, dir.path(), store.as_deref()).await?);
    }
    let pids: Vec<u32> = controls.iter().map(|(c, _, _)| c.id().unwrap_or(0)).collect();
    let etcd_pids: Vec<u32> = etcd_children.iter().filter_map(|c| c.id()).collect();
    let pid = pids[0];
    let api = controls[0].2.clone();
    let xds = controls.iter().map(|(_, x, _)| format!("http://{x}")).collect::<Vec<_>>().join(",");
    let rss_idle_all: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    let rss_idle = rss_idle_all[0];

    let changed_at = Arc::new(Mutex::new(None));
    let want = Arc::new(Mutex::new((0u64, String::new())));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let synced = Arc::new(AtomicUsize::new(0));
    let mut statuses = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let node = NodeInfo {
            id: format!("sim-{i}"),
            name: format!("productpage-{i}"),
            namespace: "default".into(),
            labels: [("app".to_string(), "productpage".to_string())].into(),
            ..NodeInfo::default()
        };
        let handler = Arc::new(Sim {
            check: check.clone(),
            changed_at: changed_at.clone(),
            want: want.clone(),
            latencies: latencies.clone(),
            synced: synced.clone(),
            seen_initial: Mutex::new(false),
            have: Mutex::new(0),
        });
        let client = AdsClient::new(
            ClientConfig { address: xds.clone(), node, mode: XdsMode::Sotw, backoff: Backoff::default() },
            handler,
        );
        statuses.push(client.status());
        tokio::spawn(client.run(std::future::pending()));
        if i % 200 == 199 {
            tokio::task::yield_now().await;
        }
    }
    while synced.load(Ordering::Relaxed) < n {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "only {} of {n} synced",
            synced.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let initial_sync = started.elapsed();
    // The connect storm leaves work behind (each replica writes its new proxies'
    // registrations and states to etcd): changes are measured once the control plane is
    // quiet again, as a fleet's changes come long after it connected.
    eprintln!("xds_scale: {n} synced in {:.1} s", initial_sync.as_secs_f64());
    let (quiet_after, idle_cores) = quiet(&pids, &etcd_pids).await;
    eprintln!("xds_scale: control plane quiet {:.1} s later ({idle_cores:.2} cores)", quiet_after.as_secs_f64());
    let rss_connected = rss_kib(pid);
    let per_replica: Vec<serde_json::Value> = controls
        .iter()
        .zip(&pids)
        .zip(&rss_idle_all)
        .map(|(((_, x, _), p), idle)| {
            let address = format!("http://{x}");
            let proxies = statuses.iter().filter(|s| s.borrow().server == address).count();
            let connected = rss_kib(*p);
            let per_proxy_kib =
                if proxies > 0 { connected.saturating_sub(*idle) as f64 / proxies as f64 } else { f64::NAN };
            serde_json::json!({"xds": x, "proxies": proxies, "rss_idle_mib": *idle as f64 / 1024.0,
                               "rss_connected_mib": connected as f64 / 1024.0, "kib_per_proxy": per_proxy_kib})
        })
        .collect();

    let served: Vec<usize> = per_replica.iter().map(|r| r["proxies"].as_u64().unwrap_or(0) as usize).collect();
    // The changes: reviews to v2, v3, v2... through the API of the first replica.
    let mut runs = Vec::new();
    for k in 0..changes {
        let subset = if k % 2 == 0 { "v2" } else { "v3" };
        let vs = dir.path().join("change.yaml");
        std::fs::write(&vs, format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination:\n        host: reviews\n        subset: {subset}\n"))?;
        latencies.lock().unwrap_or_else(|p| p.into_inner()).clear();
        *want.lock().unwrap_or_else(|p| p.into_inner()) =
            (k as u64 + 1, format!("outbound|9080|{subset}|reviews.default.svc.cluster.local"));
        eprintln!("xds_scale: change {}: applying", k + 1);
        let cpu_before = CpuSample::take(&pids, &etcd_pids);
        *changed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let status = tokio::process::Command::new(&weft)
            .args(["apply", "-f"])
            .arg(&vs)
            .args(["--server", &api])
            .output()
            .await?;
        anyhow::ensure!(status.status.success(), "apply failed: {}", String::from_utf8_lossy(&status.stderr));
        let t0 = Instant::now();
        while latencies.lock().unwrap_or_else(|p| p.into_inner()).len() < n {
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(600), "change did not reach everyone");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let cpu_after = CpuSample::take(&pids, &etcd_pids);
        eprintln!("xds_scale: change {}: every proxy has it", k + 1);
        let cpu = cpu_before.since(&cpu_after, &served, n);
        let mut l = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
        l.sort();
        let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        // Quiet between changes, so each starts from a settled mesh; what the parties
        // do in it (mostly the proxy states each replica publishes to etcd once the
        // push settled) is reported as `cpu_after_change`.
        tokio::time::sleep(Duration::from_secs(quiet_secs as u64)).await;
        let cpu_settle = cpu_after.since(&CpuSample::take(&pids, &etcd_pids), &served, n);
        runs.push(serde_json::json!({
            "p50": pct(&l, 0.5), "p99": pct(&l, 0.99), "max": pct(&l, 1.0), "cpu_during_change": cpu,
            "cpu_after_change": cpu_settle,
            "loadavg_1m": loadavg.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()),
        }));
    }
    // What `weft proxy-status` shows through each replica: every proxy, SYNCED.
    let mut listings = Vec::new();
    for (_, _, replica_api) in &controls {
        listings.push(proxy_status_via(&weft, replica_api).await);
    }
    let first = runs.first().cloned().unwrap_or_default();
    println!(
        "{}",
        serde_json::json!({
            "clients": n,
            "full_check": full_check,
            "initial_sync_s": initial_sync.as_secs_f64(),
            "quiet_after_sync_s": quiet_after.as_secs_f64(),
            "idle_control_plane_cores": idle_cores,
            "change_to_all_acked_ms": { "p50": first["p50"], "p99": first["p99"], "max": first["max"] },
            "changes": runs,
            "control_plane_rss_mib": { "idle": rss_idle as f64 / 1024.0, "connected": rss_connected as f64 / 1024.0, "after_change": rss_kib(pid) as f64 / 1024.0 },
            "replicas": per_replica,
            "proxy_status_via_replica": listings,
        })
    );
    Ok(())
}

/// `weft proxy-status -o json` through the replica whose API is `api`: how many proxies
/// it lists, how many of them are SYNCED on every type, how long it took, and the
/// `replicasError` it gave when it could not read the other replicas' states.
async fn proxy_status_via(weft: &Path, api: &str) -> serde_json::Value {
    let t0 = Instant::now();
    let out = tokio::process::Command::new(weft).args(["proxy-status", "-o", "json", "--server", api]).output().await;
    let took = t0.elapsed().as_secs_f64();
    let listed: serde_json::Value = match &out {
        Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).unwrap_or_default(),
        Ok(o) => return serde_json::json!({"api": api, "error": String::from_utf8_lossy(&o.stderr).trim()}),
        Err(e) => return serde_json::json!({"api": api, "error": e.to_string()}),
    };
    let proxies = listed["proxies"].as_array().cloned().unwrap_or_default();
    let synced = proxies
        .iter()
        .filter(|p| {
            p["types"].as_object().is_some_and(|t| !t.is_empty() && t.values().all(|s| s["status"] == "SYNCED"))
        })
        .count();
    serde_json::json!({"api": api, "listed": proxies.len(), "synced": synced, "seconds": took,
        "replicas_error": listed["replicasError"]})
}
