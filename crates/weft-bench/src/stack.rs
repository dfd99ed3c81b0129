//! The four scenarios' process stacks: `baseline` (no proxy), `weft` and `envoy` (a client
//! and a server sidecar configured by one `weft control` over xDS/SDS, mesh mTLS between
//! them) and `haproxy` (two HAProxy processes, mTLS and HTTP/2 between them). Each stack
//! checks afterwards, from the proxies' own counters, that the load went through it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use serde::Serialize;
use tempfile::TempDir;

use crate::load::Target;
use crate::procs::{command, free_port, free_port_pair, get, wait_for, Pinning, Proc, ProcStats};

/// How long a stack may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The service both meshes route to: HTTP on 9080, gRPC on 9090, selecting the server
/// sidecar's workload (`app: echo`).
pub const MESH_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: default}\nspec:\n  selector: {app: echo}\n  ports:\n  - {name: http, port: 9080, targetPort: http}\n  - {name: grpc, port: 9090, targetPort: grpc}\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Baseline,
    Weft,
    Envoy,
    Haproxy,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Baseline, Kind::Weft, Kind::Envoy, Kind::Haproxy];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Baseline => "baseline",
            Kind::Weft => "weft",
            Kind::Envoy => "envoy",
            Kind::Haproxy => "haproxy",
        }
    }
}

/// Programs the stacks run.
#[derive(Clone, Debug)]
pub struct Tools {
    /// `weft`: the control plane (and its CLI).
    pub weft: PathBuf,
    /// `weft-proxy`: the proxy-only binary every weft sidecar runs.
    pub weft_proxy: PathBuf,
    pub envoy: PathBuf,
    pub haproxy: PathBuf,
    /// The control plane does not scrape the proxies' metrics for its dashboard (it does
    /// every 10 s by default, as Prometheus would): `weft-bench instr` counts every
    /// instruction in its window, and a scrape falling into it or not moved the count by
    /// 3–6k per request.
    pub quiet_control: bool,
}

/// The echo application's two ports.
#[derive(Clone, Copy, Debug)]
pub struct Apps {
    pub h1: SocketAddr,
    pub grpc: SocketAddr,
}

/// A proxy process of a stack and where to read its counters.
pub struct Proxy {
    /// `client` or `server`.
    pub role: &'static str,
    pub proc: Proc,
    /// weft: admin; Envoy: admin.
    pub admin: Option<SocketAddr>,
    /// weft: Prometheus metrics.
    pub metrics: Option<SocketAddr>,
    /// HAProxy: stats socket.
    pub stats_socket: Option<PathBuf>,
    /// Spawn to ready (config and certificate in), ms.
    pub ready_ms: Option<f64>,
}

/// A running scenario.
pub struct Stack {
    pub kind: Kind,
    pub h1: Target,
    pub grpc: Target,
    pub proxies: Vec<Proxy>,
    /// Kept alive for the stack's life.
    pub _control: Option<Control>,
    pub _dir: TempDir,
}

/// A `weft control` process with its identity (CA) and resource directory.
pub struct Control {
    /// Killed on drop.
    pub _proc: Proc,
    pub xds: SocketAddr,
    pub api: SocketAddr,
    pub weft: PathBuf,
    /// The control plane's data directory (its CA and `admin-token`).
    pub data: PathBuf,
}

impl Control {
    /// Starts `weft control` with a CA (`--data-dir`) serving the YAML in `resources`.
    /// `quiet`: no metrics scrapes of the proxies after start-up ([`Tools::quiet_control`]).
    pub async fn start(
        weft: &Path,
        dir: &Path,
        resources: &str,
        pin: &Pinning,
        quiet: bool,
    ) -> anyhow::Result<Control> {
        let res_dir = dir.join("resources");
        let data = dir.join("data");
        std::fs::create_dir_all(&res_dir)?;
        std::fs::create_dir_all(&data)?;
        std::fs::write(res_dir.join("mesh.yaml"), resources)?;
        let mut cmd = command(pin.apps.as_deref(), weft);
        cmd.arg("control").arg("--dir").arg(&res_dir).arg("--data-dir").arg(&data);
        cmd.args(["--xds", "127.0.0.1:0", "--api", "127.0.0.1:0"]);
        cmd.env("WEFT_LOG", "warn");
        if quiet {
            // The first scrape round runs at start, before any proxy connects.
            cmd.args(["--stats-interval", "1000h"]);
        }
        let mut proc = Proc::spawn("weft control", cmd, &dir.join("control.log"), true)?;
        let line = proc.first_line(START_TIMEOUT).await?;
        // "weft control: xDS on ADDR, API on ADDR"
        let xds = line
            .split("xDS on ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .ok_or_else(|| anyhow!("unexpected first line of weft control: {line}"))?
            .parse()?;
        let api = line
            .split("API on ")
            .nth(1)
            .ok_or_else(|| anyhow!("unexpected first line of weft control: {line}"))?
            .trim()
            .parse()?;
        Ok(Control { _proc: proc, xds, api, weft: weft.to_path_buf(), data })
    }

    /// `weft token create` for `default/<sa>`, authorised with the control plane's admin
    /// credential (`<data>/admin-token`; the API is secure by default).
    pub async fn token(&self, sa: &str) -> anyhow::Result<String> {
        let admin = std::fs::read_to_string(self.data.join("admin-token"))
            .with_context(|| format!("{}/admin-token", self.data.display()))?;
        let out = tokio::process::Command::new(&self.weft)
            .env("WEFT_TOKEN", admin.trim())
            .args(["token", "create", "-n", "default", "--service-account", sa, "--server"])
            .arg(self.api.to_string())
            .output()
            .await?;
        ensure!(out.status.success(), "weft token create failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }
}

/// Options of the proxies in a stack.
#[derive(Clone, Copy, Debug)]
pub struct ProxyOptions {
    /// Worker threads per proxy (Envoy `--concurrency`, weft `--concurrency` via
    /// `WEFT_CONCURRENCY`, HAProxy `nbthread`).
    pub workers: u32,
}

impl Stack {
    pub async fn start(
        kind: Kind,
        tools: &Tools,
        apps: Apps,
        pin: &Pinning,
        opts: ProxyOptions,
    ) -> anyhow::Result<Stack> {
        let dir = tempfile::Builder::new().prefix(&format!("weft-bench-{}-", kind.name())).tempdir()?;
        let mut stack = match kind {
            Kind::Baseline => Stack {
                kind,
                h1: Target { addr: apps.h1, uri: "http://echo:9080/".parse()? },
                grpc: Target { addr: apps.grpc, uri: "http://echo:9090/echo.Echo/Unary".parse()? },
                proxies: Vec::new(),
                _control: None,
                _dir: dir,
            },
            Kind::Weft => weft_stack(dir, tools, apps, pin, opts, MESH_SERVICE).await?,
            Kind::Envoy => envoy_stack(dir, tools, apps, pin, opts, MESH_SERVICE).await?,
            Kind::Haproxy => haproxy_stack(dir, tools, apps, pin, opts).await?,
        };
        stack.wait_data_path().await?;
        Ok(stack)
    }

    /// Waits until one HTTP/1.1 request and one gRPC call go through.
    async fn wait_data_path(&mut self) -> anyhow::Result<()> {
        for (what, target, grpc) in [("HTTP/1.1", self.h1.clone(), false), ("gRPC", self.grpc.clone(), true)] {
            if let Err(e) = wait_through(&target, grpc, &mut self.proxies).await {
                bail!("{}: {what} through the stack never succeeded: {e}{}", self.kind.name(), self.logs());
            }
        }
        Ok(())
    }

    /// The tails of the proxies' logs.
    pub fn logs(&self) -> String {
        self.proxies.iter().map(|p| format!("\n{} log:{}", p.proc.name, p.proc.log_tail())).collect()
    }

    pub fn stats(&self) -> anyhow::Result<Vec<ProcStats>> {
        self.proxies.iter().map(|p| p.proc.stats()).collect()
    }

    /// Checks from the proxies' own counters that at least `requests` requests (HTTP/1.1
    /// and gRPC) went through both proxies and over mTLS between them. Returns the
    /// evidence; fails with a message naming what is missing.
    pub async fn verify(&self, requests: u64) -> anyhow::Result<serde_json::Value> {
        match self.kind {
            Kind::Baseline => Ok(serde_json::json!({"proxies": 0})),
            Kind::Weft => self.verify_weft(requests).await,
            Kind::Envoy => self.verify_envoy(requests).await,
            Kind::Haproxy => self.verify_haproxy(requests).await,
        }
    }

    async fn verify_weft(&self, requests: u64) -> anyhow::Result<serde_json::Value> {
        let mut evidence = serde_json::Map::new();
        for p in &self.proxies {
            let addr = p.metrics.ok_or_else(|| anyhow!("weft {} has no metrics address", p.role))?;
            let (_, text) = get(addr, "/stats/prometheus").await?;
            let reporter = if p.role == "server" { "destination" } else { "source" };
            let sum = |mtls_only: bool| -> u64 {
                text.lines()
                    .filter(|l| l.starts_with("istio_requests_total{"))
                    .filter(|l| l.contains(&format!("reporter=\"{reporter}\"")))
                    .filter(|l| !mtls_only || l.contains("connection_security_policy=\"mutual_tls\""))
                    .filter(|l| l.contains("response_code=\"200\""))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .map(|v| v as u64)
                    .sum()
            };
            let (all, mtls) = (sum(false), sum(true));
            ensure!(
                all >= requests,
                "weft {} proxy counted {all} requests (istio_requests_total, reporter={reporter}, 200) but the load generator got {requests} answers: the load did not go through it",
                p.role
            );
            if p.role == "server" {
                ensure!(
                    mtls >= requests,
                    "weft server proxy counted only {mtls} of {requests} requests with connection_security_policy=mutual_tls: the sidecars did not talk mTLS"
                );
            }
            evidence.insert(p.role.to_string(), serde_json::json!({"istio_requests_total": all, "mutual_tls": mtls}));
        }
        Ok(evidence.into())
    }

    async fn verify_envoy(&self, requests: u64) -> anyhow::Result<serde_json::Value> {
        let mut evidence = serde_json::Map::new();
        for p in &self.proxies {
            let addr = p.admin.ok_or_else(|| anyhow!("Envoy {} has no admin address", p.role))?;
            let (_, text) = get(addr, "/stats").await?;
            let stat = |pred: &dyn Fn(&str) -> bool| -> u64 {
                text.lines()
                    .filter_map(|l| l.split_once(": "))
                    .filter(|(k, _)| pred(k))
                    .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
                    .sum()
            };
            if p.role == "client" {
                // Requests the client sidecar sent to the echo service's clusters, and
                // TLS handshakes it made to them.
                let rq = stat(&|k| k.starts_with("cluster.outbound|") && k.ends_with(".upstream_rq_2xx"));
                let tls = stat(&|k| k.starts_with("cluster.outbound|") && k.ends_with(".ssl.handshake"));
                ensure!(
                    rq >= requests,
                    "Envoy client proxy sent {rq} requests upstream (cluster.outbound|*.upstream_rq_2xx) but the load generator got {requests} answers: the load did not go through it"
                );
                ensure!(tls > 0, "Envoy client proxy made no TLS handshake to the server sidecar: no mTLS");
                evidence.insert("client".into(), serde_json::json!({"upstream_rq_2xx": rq, "ssl.handshake": tls}));
            } else {
                let rq = stat(&|k| k.starts_with("cluster.inbound|") && k.ends_with(".upstream_rq_2xx"));
                let tls = stat(&|k| k.starts_with("listener.") && k.ends_with(".ssl.handshake"));
                let no_cert = stat(&|k| k.starts_with("listener.") && k.ends_with(".ssl.no_certificate"));
                let cx = stat(&|k| {
                    k.starts_with("listener.127.0.0.1_")
                        && k.ends_with(".downstream_cx_total")
                        && !k.contains(".worker_")
                        && !k.contains("admin")
                });
                ensure!(
                    rq >= requests,
                    "Envoy server proxy forwarded {rq} requests to the app (cluster.inbound|*.upstream_rq_2xx) but the load generator got {requests} answers: the load did not go through it"
                );
                ensure!(
                    tls > 0 && tls == cx && no_cert == 0,
                    "Envoy server proxy: {cx} inbound connections, {tls} TLS handshakes, {no_cert} without a client certificate: not all traffic was mTLS"
                );
                evidence.insert(
                    "server".into(),
                    serde_json::json!({"inbound_upstream_rq_2xx": rq, "ssl.handshake": tls, "downstream_cx_total": cx}),
                );
            }
        }
        Ok(evidence.into())
    }

    async fn verify_haproxy(&self, requests: u64) -> anyhow::Result<serde_json::Value> {
        let mut evidence = serde_json::Map::new();
        for p in &self.proxies {
            let sock = p.stats_socket.as_ref().ok_or_else(|| anyhow!("HAProxy {} has no stats socket", p.role))?;
            let csv = haproxy_command(sock, "show stat").await?;
            let info = haproxy_command(sock, "show info").await?;
            let header: Vec<&str> =
                csv.lines().next().unwrap_or_default().trim_start_matches("# ").split(',').collect();
            let col = |name: &str| header.iter().position(|h| *h == name);
            let (Some(svname), Some(req_tot), Some(hrsp_2xx)) = (col("svname"), col("req_tot"), col("hrsp_2xx")) else {
                bail!("HAProxy {} stats lack svname/req_tot/hrsp_2xx: {csv}", p.role);
            };
            let frontend_2xx: u64 = csv
                .lines()
                .skip(1)
                .map(|l| l.split(',').collect::<Vec<_>>())
                .filter(|f| f.get(svname) == Some(&"FRONTEND"))
                .filter_map(|f| f.get(hrsp_2xx)?.parse::<u64>().ok())
                .sum();
            let _ = req_tot;
            let ssl_conns: u64 = info
                .lines()
                .find_map(|l| l.strip_prefix("CumSslConns: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            ensure!(
                frontend_2xx >= requests,
                "HAProxy {} proxy answered {frontend_2xx} requests with 2xx but the load generator got {requests} answers: the load did not go through it",
                p.role
            );
            // The server's only binds are `ssl ... verify required`: every request it
            // counted came over a TLS connection with a verified client certificate.
            if p.role == "server" {
                ensure!(ssl_conns > 0, "HAProxy server proxy accepted no TLS connection: no mTLS");
            }
            evidence.insert(
                p.role.to_string(),
                serde_json::json!({"frontend_hrsp_2xx": frontend_2xx, "CumSslConns": ssl_conns}),
            );
        }
        Ok(evidence.into())
    }
}

/// Sends a few requests to `target` until they all succeed (at most [`START_TIMEOUT`]),
/// failing early when one of `proxies` exits.
pub async fn wait_through(target: &Target, grpc: bool, proxies: &mut [Proxy]) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        let r = if grpc {
            crate::load::grpc_fixed_rate(target, 100, 1, Duration::from_millis(50)).await
        } else {
            crate::load::h1_fixed_rate(target, 100, 1, Duration::from_millis(50)).await
        };
        let last = match r {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        for p in proxies.iter_mut() {
            p.proc.check_alive()?;
        }
        if t.elapsed() > START_TIMEOUT {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn haproxy_command(sock: &Path, cmd: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(sock).await.with_context(|| format!("{}", sock.display()))?;
    s.write_all(format!("{cmd}\n").as_bytes()).await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await??;
    Ok(out)
}

/// Waits until `GET admin/ready` answers 200 (polled every 2 ms); returns ms since spawn.
pub async fn wait_ready(p: &mut Proc, admin: SocketAddr) -> anyhow::Result<f64> {
    let started = p.started;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if get(admin, "/ready").await.is_ok_and(|(s, _)| s == 200) {
            return Ok(started.elapsed().as_secs_f64() * 1000.0);
        }
        p.check_alive()?;
        ensure!(Instant::now() < deadline, "{} not ready after {START_TIMEOUT:?}; log: {}", p.name, p.log_tail());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A weft sidecar's bootstrap.
#[allow(clippy::too_many_arguments)]
pub fn weft_bootstrap(
    name: &str,
    sa: &str,
    xds: SocketAddr,
    token: &str,
    ports: &[(&str, u16)],
    inbound: Option<SocketAddr>,
    outbound: SocketAddr,
    admin: SocketAddr,
    metrics: SocketAddr,
    mode: &str,
) -> String {
    let ports = if ports.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = ports.iter().map(|(n, p)| format!("{{name: {n}, port: {p}, protocol: TCP}}")).collect();
        format!("  ports: [{}]\n", list.join(", "))
    };
    let inbound = inbound.map(|a| format!("  inbound: \"{a}\"\n")).unwrap_or_default();
    format!(
        "node:\n  id: {name}\n  cluster: {name}.default\n  name: {name}\n  namespace: default\n  service_account: {sa}\n  labels: {{app: {name}}}\n  outbound: \"{outbound}\"\n{ports}{inbound}xds:\n  address: http://{xds}\n  mode: {mode}\nadmin: \"{admin}\"\nmetrics: \"{metrics}\"\naccess_log: \"off\"\ndrain_timeout: 1s\nidentity:\n  token: \"{token}\"\n"
    )
}

/// Starts a weft sidecar (`weft-proxy`, the proxy-only binary; the same as `weft proxy`)
/// with `bootstrap`, pinned to the proxies' CPU.
pub fn spawn_weft(
    tools: &Tools,
    dir: &Path,
    name: &str,
    bootstrap: &str,
    pin: &Pinning,
    workers: u32,
) -> anyhow::Result<Proc> {
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, bootstrap)?;
    let mut cmd = command(pin.proxies.as_deref(), &tools.weft_proxy);
    cmd.arg("-b").arg(&file);
    cmd.env("WEFT_CONCURRENCY", workers.to_string()).env("WEFT_LOG", "warn");
    Proc::spawn(&format!("weft-proxy ({name})"), cmd, &dir.join(format!("{name}.log")), false)
}

/// The weft pair: one `weft control` serving `resources`, a server and a client sidecar.
pub async fn weft_stack(
    dir: TempDir,
    tools: &Tools,
    apps: Apps,
    pin: &Pinning,
    opts: ProxyOptions,
    resources: &str,
) -> anyhow::Result<Stack> {
    let control = Control::start(&tools.weft, dir.path(), resources, pin, tools.quiet_control).await?;
    let mut proxies = Vec::new();
    // The server first, then the client: each startup measured alone.
    let inbound = free_port_pair()?;
    for (role, name, ports) in
        [("server", "echo", vec![("http", apps.h1.port()), ("grpc", apps.grpc.port())]), ("client", "client", vec![])]
    {
        let token = control.token(name).await?;
        let (admin, metrics, outbound) = (free_port()?, free_port()?, free_port()?);
        let inbound = (role == "server").then_some(inbound);
        let b = weft_bootstrap(name, name, control.xds, &token, &ports, inbound, outbound, admin, metrics, "sotw");
        let mut proc = spawn_weft(tools, dir.path(), name, &b, pin, opts.workers)?;
        let ready = wait_ready(&mut proc, admin).await?;
        proxies.push(Proxy {
            role,
            proc,
            admin: Some(admin),
            metrics: Some(metrics),
            stats_socket: None,
            ready_ms: Some(ready),
        });
        if role == "client" {
            return Ok(Stack {
                kind: Kind::Weft,
                h1: Target { addr: outbound, uri: "http://echo:9080/".parse()? },
                grpc: Target { addr: outbound, uri: "http://echo:9090/echo.Echo/Unary".parse()? },
                proxies,
                _control: Some(control),
                _dir: dir,
            });
        }
    }
    bail!("unreachable: no client proxy")
}

/// The Envoy pair fed by `weft control` over xDS/SDS with `resources`.
pub async fn envoy_stack(
    dir: TempDir,
    tools: &Tools,
    apps: Apps,
    pin: &Pinning,
    opts: ProxyOptions,
    resources: &str,
) -> anyhow::Result<Stack> {
    let control = Control::start(&tools.weft, dir.path(), resources, pin, tools.quiet_control).await?;
    let mut proxies = Vec::new();
    let inbound = free_port_pair()?;
    let outbound = free_port()?;
    for (role, name) in [("server", "echo"), ("client", "client")] {
        let token = control.token(name).await?;
        let mut args: Vec<String> = vec![
            "envoy-bootstrap".into(),
            "--name".into(),
            name.into(),
            "--labels".into(),
            format!("app={name}"),
            "--service-account".into(),
            name.into(),
            "--xds".into(),
            control.xds.to_string(),
            "--admin-port".into(),
            "0".into(),
            "--join-token".into(),
            token,
        ];
        if role == "server" {
            args.extend([
                "--ports".into(),
                format!("http:{},grpc:{}", apps.h1.port(), apps.grpc.port()),
                "--inbound".into(),
                inbound.to_string(),
            ]);
        } else {
            args.extend(["--outbound".into(), outbound.to_string()]);
        }
        let out = tokio::process::Command::new(&tools.weft).args(&args).output().await?;
        ensure!(out.status.success(), "weft envoy-bootstrap failed: {}", String::from_utf8_lossy(&out.stderr));
        let bootstrap = dir.path().join(format!("{name}-envoy.yaml"));
        std::fs::write(&bootstrap, &out.stdout)?;
        let admin_file = dir.path().join(format!("{name}-admin"));
        let mut cmd = command(pin.proxies.as_deref(), &tools.envoy);
        cmd.arg("-c").arg(&bootstrap).args(["--concurrency", &opts.workers.to_string(), "--use-dynamic-base-id"]);
        cmd.arg("--admin-address-path").arg(&admin_file).args(["-l", "warn"]);
        let mut proc =
            Proc::spawn(&format!("envoy ({name})"), cmd, &dir.path().join(format!("{name}-envoy.log")), false)?;
        let admin: SocketAddr = wait_for("Envoy's admin address", START_TIMEOUT, Duration::from_millis(2), || async {
            std::fs::read_to_string(&admin_file).ok().and_then(|s| s.trim().parse().ok())
        })
        .await
        .map_err(|e| anyhow!("{e}; log: {}", proc.log_tail()))?;
        let ready = wait_ready(&mut proc, admin).await?;
        proxies.push(Proxy {
            role,
            proc,
            admin: Some(admin),
            metrics: None,
            stats_socket: None,
            ready_ms: Some(ready),
        });
    }
    Ok(Stack {
        kind: Kind::Envoy,
        h1: Target { addr: outbound, uri: "http://echo:9080/".parse()? },
        grpc: Target { addr: outbound, uri: "http://echo:9090/echo.Echo/Unary".parse()? },
        proxies,
        _control: Some(control),
        _dir: dir,
    })
}

/// A CA and a server and a client certificate (PEM: certificate then key) for HAProxy.
fn haproxy_certs(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "weft-bench CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem())?;
    let mut files = Vec::new();
    for name in ["server", "client"] {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![format!("{name}.bench")])?;
        params.distinguished_name.push(DnType::CommonName, format!("{name}.bench"));
        let cert = params.signed_by(&key, &ca)?;
        let file = dir.join(format!("{name}.pem"));
        std::fs::write(&file, format!("{}{}", cert.pem(), key.serialize_pem()))?;
        files.push(file);
    }
    let client = files.pop().ok_or_else(|| anyhow!("no client certificate"))?;
    let server = files.pop().ok_or_else(|| anyhow!("no server certificate"))?;
    Ok((ca_file, server, client))
}

pub async fn haproxy_stack(
    dir: TempDir,
    tools: &Tools,
    apps: Apps,
    pin: &Pinning,
    opts: ProxyOptions,
) -> anyhow::Result<Stack> {
    let (ca, server_pem, client_pem) = haproxy_certs(dir.path())?;
    let (ca, server_pem, client_pem) = (ca.display(), server_pem.display(), client_pem.display());
    let (in_h1, in_grpc, out_h1, out_grpc) = (free_port()?, free_port()?, free_port()?, free_port()?);
    let global = |name: &str| {
        let sock = dir.path().join(format!("{name}.sock"));
        (
            format!(
                "global\n  nbthread {}\n  maxconn 4000\n  stats socket {} level admin\n  tune.ssl.default-dh-param 2048\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  timeout http-keep-alive 60s\n",
                opts.workers,
                sock.display()
            ),
            sock,
        )
    };
    // Server sidecar: TLS with a verified client certificate only, HTTP/2 or 1.1 in.
    let (g, server_sock) = global("server");
    let server_cfg = format!(
        "{g}frontend in_h1\n  bind {in_h1} ssl crt {server_pem} ca-file {ca} verify required alpn h2,http/1.1\n  http-request deny unless {{ ssl_c_used }}\n  default_backend app_h1\nfrontend in_grpc\n  bind {in_grpc} ssl crt {server_pem} ca-file {ca} verify required alpn h2\n  http-request deny unless {{ ssl_c_used }}\n  default_backend app_grpc\nbackend app_h1\n  http-reuse always\n  server app {}\nbackend app_grpc\n  http-reuse always\n  server app {} proto h2\n",
        apps.h1, apps.grpc
    );
    // Client sidecar: plain in (HTTP/1.1, or h2c for gRPC), mTLS + HTTP/2 to the server.
    let (g, client_sock) = global("client");
    let client_cfg = format!(
        "{g}frontend out_h1\n  bind {out_h1}\n  default_backend mesh_h1\nfrontend out_grpc\n  bind {out_grpc} proto h2\n  default_backend mesh_grpc\nbackend mesh_h1\n  http-reuse always\n  server s {in_h1} ssl crt {client_pem} ca-file {ca} verify required verifyhost server.bench sni str(server.bench) alpn h2\nbackend mesh_grpc\n  http-reuse always\n  server s {in_grpc} ssl crt {client_pem} ca-file {ca} verify required verifyhost server.bench sni str(server.bench) alpn h2\n"
    );
    let mut proxies = Vec::new();
    for (role, cfg, sock) in [("server", server_cfg, server_sock), ("client", client_cfg, client_sock)] {
        let file = dir.path().join(format!("{role}.cfg"));
        std::fs::write(&file, cfg)?;
        let check = tokio::process::Command::new(&tools.haproxy).arg("-c").arg("-f").arg(&file).output().await?;
        ensure!(
            check.status.success(),
            "haproxy -c {}: {}{}",
            file.display(),
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let mut cmd = command(pin.proxies.as_deref(), &tools.haproxy);
        cmd.arg("-f").arg(&file).arg("-db");
        let mut proc =
            Proc::spawn(&format!("haproxy ({role})"), cmd, &dir.path().join(format!("{role}-haproxy.log")), false)?;
        let started = proc.started;
        while tokio::net::UnixStream::connect(&sock).await.is_err() {
            proc.check_alive()?;
            ensure!(
                started.elapsed() < START_TIMEOUT,
                "HAProxy's stats socket never appeared; log: {}",
                proc.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let ready = started.elapsed().as_secs_f64() * 1000.0;
        proxies.push(Proxy { role, proc, admin: None, metrics: None, stats_socket: Some(sock), ready_ms: Some(ready) });
    }
    Ok(Stack {
        kind: Kind::Haproxy,
        h1: Target { addr: out_h1, uri: "http://echo:9080/".parse()? },
        grpc: Target { addr: out_grpc, uri: "http://echo:9090/echo.Echo/Unary".parse()? },
        proxies,
        _control: None,
        _dir: dir,
    })
}
