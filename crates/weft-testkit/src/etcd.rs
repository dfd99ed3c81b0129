//! A real etcd cluster on loopback for tests of the control plane's etcd store: N members
//! (`etcd` from `scripts/setup.sh`), client and peer ports from [`crate::net::reserve_addr`]
//! (etcd binds with `SO_REUSEADDR`), data in a temporary directory, killed on drop.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::net::reserve_addr;

/// One member: its client address and process.
pub struct Member {
    /// Where clients reach it.
    pub client: SocketAddr,
    /// The process (kill it to take the member down).
    pub child: Child,
    _data: tempfile::TempDir,
}

/// A running cluster.
pub struct EtcdCluster {
    /// The members, in start order.
    pub members: Vec<Member>,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers `endpoint health` (30 s).
    ///
    /// # Panics
    /// When etcd is not installed or the cluster does not become healthy.
    pub async fn start(n: usize) -> EtcdCluster {
        let etcd = crate::tools::require("etcd");
        let addrs: Vec<(SocketAddr, SocketAddr)> = (0..n).map(|_| (reserve_addr(), reserve_addr())).collect();
        let initial: Vec<String> =
            addrs.iter().enumerate().map(|(i, (_, peer))| format!("m{i}=http://{peer}")).collect();
        let mut members = Vec::new();
        for (i, (client, peer)) in addrs.iter().enumerate() {
            let data = tempfile::tempdir().expect("temporary directory");
            let log = std::fs::File::create(data.path().join("etcd.log")).expect("etcd log file");
            let child = Command::new(&etcd)
                .arg("--name")
                .arg(format!("m{i}"))
                .arg("--data-dir")
                .arg(data.path().join("data"))
                .arg("--listen-client-urls")
                .arg(format!("http://{client}"))
                .arg("--advertise-client-urls")
                .arg(format!("http://{client}"))
                .arg("--listen-peer-urls")
                .arg(format!("http://{peer}"))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://{peer}"))
                .arg("--initial-cluster")
                .arg(initial.join(","))
                .args(["--initial-cluster-state", "new", "--initial-cluster-token", "weft-test"])
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .expect("starting etcd");
            members.push(Member { client: *client, child, _data: data });
        }
        let cluster = EtcdCluster { members };
        let etcdctl = crate::tools::require("etcdctl");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new(&etcdctl)
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &cluster.endpoints(), "endpoint", "health"])
                .output()
                .await
                .expect("running etcdctl");
            if out.status.success() {
                return cluster;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "etcd never became healthy: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `http://a,http://b,...` (etcdctl's `--endpoints`).
    pub fn endpoints(&self) -> String {
        self.members.iter().map(|m| format!("http://{}", m.client)).collect::<Vec<_>>().join(",")
    }

    /// `etcd://a,b,...` (`weft control --store`).
    pub fn store_url(&self) -> String {
        format!("etcd://{}", self.members.iter().map(|m| m.client.to_string()).collect::<Vec<_>>().join(","))
    }

    /// Kills member `i` (SIGKILL) and waits for it.
    pub async fn kill(&mut self, i: usize) {
        let m = &mut self.members[i];
        let _ = m.child.start_kill();
        let _ = m.child.wait().await;
    }
}
