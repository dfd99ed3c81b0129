//! A real etcd cluster on loopback for tests of the control plane's etcd store: N members
//! (`etcd` from `scripts/setup.sh`), client and peer ports from [`crate::net::reserve_addr`]
//! (etcd binds with `SO_REUSEADDR`), data in a temporary directory, killed on drop.
//! [`EtcdCluster::start_tls`] runs it as etcd's transport security guide does: clients
//! and peers over TLS, `--client-cert-auth` with a test CA ([`EtcdTlsFiles`]).

use std::net::SocketAddr;
use std::path::PathBuf;
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
    /// With TLS: the files clients use.
    pub tls: Option<EtcdTlsFiles>,
}

/// The PEM files of a TLS cluster (in a temporary directory that lives as long as it).
pub struct EtcdTlsFiles {
    /// The CA that signed the members' and the client's certificates (the members'
    /// `--trusted-ca-file`).
    pub ca: PathBuf,
    /// A client certificate the members accept, and its key.
    pub client_cert: PathBuf,
    /// The client certificate's key.
    pub client_key: PathBuf,
    /// The members' serving certificate (127.0.0.1) and key.
    pub server_cert: PathBuf,
    /// The serving certificate's key.
    pub server_key: PathBuf,
    /// A client certificate and key from another CA (the members refuse it).
    pub foreign_cert: PathBuf,
    /// Its key.
    pub foreign_key: PathBuf,
    /// Another CA's certificate (the members' certificates are not signed by it).
    pub foreign_ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl EtcdTlsFiles {
    /// A CA, a serving certificate for 127.0.0.1 and a client certificate, and a foreign CA
    /// with a client certificate of its own.
    pub fn generate() -> EtcdTlsFiles {
        let dir = tempfile::tempdir().expect("temporary directory");
        let ca = crate::pki::TestCa::new("weft test etcd CA");
        let foreign = crate::pki::TestCa::new("some other CA");
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write a PEM file");
            p
        };
        let (server_cert, server_key) = ca.leaf(&["127.0.0.1", "localhost"], 2);
        let (client_cert, client_key) = ca.leaf(&["weft-control"], 3);
        let (foreign_cert, foreign_key) = foreign.leaf(&["weft-control"], 4);
        EtcdTlsFiles {
            ca: write("ca.pem", &ca.pem()),
            client_cert: write("client.crt", &client_cert),
            client_key: write("client.key", &client_key),
            server_cert: write("server.crt", &server_cert),
            server_key: write("server.key", &server_key),
            foreign_cert: write("foreign.crt", &foreign_cert),
            foreign_key: write("foreign.key", &foreign_key),
            foreign_ca: write("foreign-ca.pem", &foreign.pem()),
            _dir: dir,
        }
    }
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers `endpoint health` (30 s).
    ///
    /// # Panics
    /// When etcd is not installed or the cluster does not become healthy.
    pub async fn start(n: usize) -> EtcdCluster {
        Self::start_with(n, None).await
    }

    /// [`EtcdCluster::start`] over TLS: clients (`--client-cert-auth`, the client
    /// certificate of [`EtcdTlsFiles`] required) and peers (`--peer-client-cert-auth`).
    ///
    /// # Panics
    /// As [`EtcdCluster::start`].
    pub async fn start_tls(n: usize) -> EtcdCluster {
        Self::start_with(n, Some(EtcdTlsFiles::generate())).await
    }

    async fn start_with(n: usize, tls: Option<EtcdTlsFiles>) -> EtcdCluster {
        let etcd = crate::tools::require("etcd");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let addrs: Vec<(SocketAddr, SocketAddr)> = (0..n).map(|_| (reserve_addr(), reserve_addr())).collect();
        let initial: Vec<String> =
            addrs.iter().enumerate().map(|(i, (_, peer))| format!("m{i}={scheme}://{peer}")).collect();
        let mut members = Vec::new();
        for (i, (client, peer)) in addrs.iter().enumerate() {
            let data = tempfile::tempdir().expect("temporary directory");
            let log = std::fs::File::create(data.path().join("etcd.log")).expect("etcd log file");
            let mut cmd = Command::new(&etcd);
            if let Some(t) = &tls {
                cmd.args(["--client-cert-auth", "--peer-client-cert-auth"])
                    .arg("--trusted-ca-file")
                    .arg(&t.ca)
                    .arg("--cert-file")
                    .arg(&t.server_cert)
                    .arg("--key-file")
                    .arg(&t.server_key)
                    .arg("--peer-trusted-ca-file")
                    .arg(&t.ca)
                    .arg("--peer-cert-file")
                    .arg(&t.server_cert)
                    .arg("--peer-key-file")
                    .arg(&t.server_key);
            }
            let child = cmd
                .arg("--name")
                .arg(format!("m{i}"))
                .arg("--data-dir")
                .arg(data.path().join("data"))
                .arg("--listen-client-urls")
                .arg(format!("{scheme}://{client}"))
                .arg("--advertise-client-urls")
                .arg(format!("{scheme}://{client}"))
                .arg("--listen-peer-urls")
                .arg(format!("{scheme}://{peer}"))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("{scheme}://{peer}"))
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
        let cluster = EtcdCluster { members, tls };
        let etcdctl = crate::tools::require("etcdctl");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut cmd = Command::new(&etcdctl);
            if let Some(t) = &cluster.tls {
                cmd.arg("--cacert").arg(&t.ca).arg("--cert").arg(&t.client_cert).arg("--key").arg(&t.client_key);
            }
            let out = cmd
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

    /// `http://a,http://b,...` (etcdctl's `--endpoints`; `https://` with TLS).
    pub fn endpoints(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.members.iter().map(|m| format!("{scheme}://{}", m.client)).collect::<Vec<_>>().join(",")
    }

    /// `etcd://a,b,...` (`weft control --store`; `etcds://` with TLS).
    pub fn store_url(&self) -> String {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://{}", self.members.iter().map(|m| m.client.to_string()).collect::<Vec<_>>().join(","))
    }

    /// Kills member `i` (SIGKILL) and waits for it.
    pub async fn kill(&mut self, i: usize) {
        let m = &mut self.members[i];
        let _ = m.child.start_kill();
        let _ = m.child.wait().await;
    }
}
