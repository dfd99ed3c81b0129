//! `weft up --replicas N`: the HA topology on one machine. A 3-member etcd cluster on
//! loopback (data in the state directory; clients and peers over TLS with client
//! certificates made at start, `super::etcd_tls`), the first control-plane replica in this
//! process (what `weft up` uses for tokens and the store) and the others as
//! `weft control --store etcds://...` processes, each with its own data directory; every
//! sidecar and the gateway get all replicas' xDS addresses and fail over between them.
//! Kill one of the child replicas (`kill -9`, its pid in `ps`) to watch its proxies move.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::mpsc;
use weft_control::etcd::EtcdConfig;

use super::procs::{self, Proc};

/// Members of the local etcd cluster.
const MEMBERS: usize = 3;

/// The local etcd cluster.
pub struct EtcdCluster {
    /// The members' processes.
    pub members: Vec<Proc>,
    /// How replicas reach it.
    pub config: EtcdConfig,
}

/// A free loopback port for a child to bind, reserved against other port-0 binds
/// ([`weft_xds::ports`]: tests start many meshes at once).
fn free_port() -> anyhow::Result<u16> {
    Ok(weft_xds::ports::reserve(Ipv4Addr::LOCALHOST.into()).context("finding a free port")?.port())
}

/// Starts the 3 members with data under `state/etcd`, logs in `logs`.
pub fn start_etcd(
    etcd: &Path,
    state: &Path,
    logs: &Path,
    exits: &mpsc::UnboundedSender<(String, ExitStatus)>,
) -> anyhow::Result<EtcdCluster> {
    let mut addrs = Vec::new();
    for _ in 0..MEMBERS {
        let client = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), free_port()?);
        let peer = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), free_port()?);
        addrs.push((client, peer));
    }
    let tls = super::etcd_tls::LocalEtcdTls::generate(&state.join("etcd-tls"))?;
    let initial: Vec<String> = addrs.iter().enumerate().map(|(i, (_, p))| format!("m{i}=https://{p}")).collect();
    let mut members = Vec::new();
    for (i, (client, peer)) in addrs.iter().enumerate() {
        let data = state.join("etcd").join(format!("m{i}"));
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let mut cmd = tokio::process::Command::new(etcd);
        cmd.args(tls.member_args())
            .arg("--name")
            .arg(format!("m{i}"))
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(format!("https://{client}"))
            .arg("--advertise-client-urls")
            .arg(format!("https://{client}"))
            .arg("--listen-peer-urls")
            .arg(format!("https://{peer}"))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("https://{peer}"))
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .args(["--initial-cluster-state", "new", "--initial-cluster-token", "weft-up"]);
        let log = logs.join(format!("etcd-m{i}.log"));
        let name = format!("etcd member m{i}");
        members.push(procs::spawn(&name, cmd, &log, exits.clone()).with_context(|| {
            format!("starting {} (install etcd: scripts/setup.sh, or --etcd PATH)", etcd.display())
        })?);
    }
    let store = format!("etcds://{}", addrs.iter().map(|(c, _)| c.to_string()).collect::<Vec<_>>().join(","));
    let config = EtcdConfig::parse(&store).map_err(|e| anyhow::anyhow!(e))?.with_tls(tls.client());
    Ok(EtcdCluster { members, config })
}

/// What a child replica runs with.
pub struct ReplicaFlags<'a> {
    /// The `weft` binary.
    pub exe: &'a Path,
    /// The shared store.
    pub store: &'a EtcdConfig,
    /// Resources directory (the same files for every replica).
    pub dir: &'a Path,
    /// Its data directory.
    pub data: &'a Path,
    /// The address its xDS port binds on (port chosen here).
    pub ip: IpAddr,
    /// Transparent mode.
    pub transparent: bool,
    /// `--mesh-config`, passed through.
    pub mesh_config: Option<&'a Path>,
    /// The first replica's admin token file: one token for every replica (as one Secret
    /// mounted in each pod), so `weft --token-file` reaches any of them.
    pub api_token_file: Option<&'a Path>,
}

/// Starts a child replica; its process and xDS address.
pub fn start_replica(
    index: usize,
    f: &ReplicaFlags<'_>,
    logs: &Path,
    exits: &mpsc::UnboundedSender<(String, ExitStatus)>,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let xds = SocketAddr::new(f.ip, free_port()?);
    let api = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), free_port()?);
    let store = f.store.store_url();
    let mut cmd = tokio::process::Command::new(f.exe);
    cmd.arg("control");
    if let Some(tls) = &f.store.tls {
        for (flag, path) in [("--etcd-ca", &tls.ca), ("--etcd-cert", &tls.cert), ("--etcd-key", &tls.key)] {
            if let Some(p) = path {
                cmd.arg(flag).arg(p);
            }
        }
    }
    cmd.args(["--store", &store]).arg("--dir").arg(f.dir).arg("--data-dir").arg(f.data).args([
        "--xds",
        &xds.to_string(),
        "--api",
        &api.to_string(),
    ]);
    if f.transparent {
        cmd.arg("--transparent");
    }
    if let Some(m) = f.mesh_config {
        cmd.arg("--mesh-config").arg(m);
    }
    if let Some(t) = f.api_token_file {
        cmd.arg("--api-token-file").arg(t);
    }
    let log = logs.join(format!("control-replica-{index}.log"));
    let p = procs::spawn(&format!("control-plane replica {index}"), cmd, &log, exits.clone())?;
    Ok((p, xds))
}

/// Waits until `addr` accepts, failing early when `p` exits.
pub async fn wait_listening(p: &Proc, addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = p.exit_status() {
            anyhow::bail!("{what} exited before it listened ({status}); see its log");
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("{what} does not listen on {addr} after 60 s; see its log");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
