//! etcd as the control plane's store (`weft control --store etcd://host:port[,host:port...]`),
//! so any number of replicas serve one mesh.
//!
//! Everything lives under one prefix (`/weft/` by default):
//!
//! | keys | what | written by |
//! |---|---|---|
//! | `resources/<kind>/<namespace>/<name>` | a resource applied through the API: its YAML/JSON document, source name and line | the replica that took the apply, after validating it |
//! | `registry/<node id>` | a proxy's registration (the workload its node metadata announces) | the replica the proxy is connected to, under that replica's lease |
//! | `state/<file>` | the CA root and key, the join-token key, revoked tokens (the files of `--data-dir`) | the first replica (created once), the leader (rotation), any replica (revocations) |
//! | `leader` | the replica that runs singleton work (CA rotation steps, controllers) | the leader, under its lease |
//! | `rollouts/state` | the rollout controllers' state (steps, analysis, events; `etcd::rollouts`) | the leader's controller, any replica taking a `weft rollout` command |
//!
//! Every replica mirrors the prefixes it needs with an etcd watch that resumes from the
//! last revision it saw (a full re-read only when etcd compacted past it), so a change
//! made through any replica reaches all of them. See docs/control.md, "Replicas".

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, WatchOptions};

pub mod leader;
pub mod registry;
pub mod resources;
pub mod rollouts;
pub mod state;
pub mod status;
pub mod tls;

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/weft/";
/// Default TTL of a replica's lease (its registrations and its leadership).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// Where the shared store is and how long a replica's lease lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members (`http://host:port`, `https://` with TLS).
    pub endpoints: Vec<String>,
    /// Key prefix, ending with `/`.
    pub prefix: String,
    /// TTL of this replica's lease: how long its proxies' registrations and its
    /// leadership outlive it when it dies without a goodbye.
    pub lease_ttl: Duration,
    /// TLS to the members (`etcds://`, `--etcd-ca`, `--etcd-cert`, `--etcd-key`); None:
    /// plaintext.
    pub tls: Option<tls::EtcdTls>,
}

/// A connected etcd client with the prefix. Cheap to clone.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    prefix: String,
    lease_ttl: Duration,
}

/// One prefix read at one revision.
pub(crate) struct PrefixRead {
    /// Values by key, the prefix removed.
    pub values: BTreeMap<String, Vec<u8>>,
    /// The store revision of the read.
    pub revision: i64,
}

impl EtcdConfig {
    /// Parses `etcd://host:port[,host:port...][/prefix]` (the `--store` flag), or
    /// `etcds://...` for TLS (its files set with [`EtcdConfig::with_tls`]).
    pub fn parse(url: &str) -> Result<EtcdConfig, String> {
        let (rest, scheme, tls) = match (url.strip_prefix("etcd://"), url.strip_prefix("etcds://")) {
            (Some(rest), _) => (rest, "http", None),
            (None, Some(rest)) => (rest, "https", Some(tls::EtcdTls::default())),
            (None, None) => {
                return Err(format!(
                    "--store {url:?}: expected etcd://host:port[,host:port...][/prefix] (etcds:// for TLS)"
                ))
            }
        };
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) if !p.trim_matches('/').is_empty() => (h, format!("/{}/", p.trim_matches('/'))),
            Some((h, _)) => (h, DEFAULT_PREFIX.to_string()),
            None => (rest, DEFAULT_PREFIX.to_string()),
        };
        let mut endpoints = Vec::new();
        for h in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
            let (host, port) = h
                .rsplit_once(':')
                .ok_or_else(|| format!("--store {url:?}: {h:?} has no port (etcd's client port is usually 2379)"))?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(format!("--store {url:?}: {h:?} is not host:port"));
            }
            endpoints.push(format!("{scheme}://{h}"));
        }
        if endpoints.is_empty() {
            return Err(format!("--store {url:?}: no etcd member given"));
        }
        Ok(EtcdConfig { endpoints, prefix, lease_ttl: DEFAULT_LEASE_TTL, tls })
    }

    /// TLS with these files (`--etcd-ca`, `--etcd-cert`, `--etcd-key`): any of them turns
    /// an `etcd://` store into `etcds://`.
    pub fn with_tls(mut self, files: tls::EtcdTls) -> EtcdConfig {
        if files == tls::EtcdTls::default() {
            return self;
        }
        for e in &mut self.endpoints {
            if let Some(rest) = e.strip_prefix("http://") {
                *e = format!("https://{rest}");
            }
        }
        self.tls = Some(files);
        self
    }

    /// The `--store` URL of these endpoints and prefix (what child replicas are given).
    pub fn store_url(&self) -> String {
        let hosts: Vec<&str> =
            self.endpoints.iter().map(|e| e.trim_start_matches("http://").trim_start_matches("https://")).collect();
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://{}{}", hosts.join(","), self.prefix.trim_end_matches('/'))
    }
}

impl Etcd {
    /// Connects to the members and checks that the cluster answers (within 10 s).
    pub async fn connect(cfg: &EtcdConfig) -> Result<Etcd, String> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        let material = match &cfg.tls {
            Some(files) => {
                let m = files.load()?;
                options = options.with_tls(m.tonic());
                Some(m)
            }
            None => None,
        };
        let members = cfg.endpoints.join(",");
        let why = |e: String| explain_failure(cfg, material.as_ref(), e);
        let client =
            match tokio::time::timeout(Duration::from_secs(10), Client::connect(&cfg.endpoints, Some(options))).await {
                Err(_) => return Err(why(format!("etcd {members}: no member answered within 10 s")).await),
                Ok(Err(e)) => return Err(why(format!("etcd {members}: {}", chain(&e))).await),
                Ok(Ok(c)) => c,
            };
        let etcd = Etcd { client, prefix: cfg.prefix.clone(), lease_ttl: cfg.lease_ttl };
        let mut probe = etcd.client();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match probe.get(etcd.key("leader"), None).await {
                Ok(_) => return Ok(etcd),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(why(format!("etcd {members}: the cluster does not answer: {}", chain(&e))).await)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// A client handle (clones share the connections).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The full key of `rest` under the prefix.
    pub fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// The lease TTL replicas use.
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// The lease TTL in whole seconds, at least 2 (etcd's unit).
    pub(crate) fn lease_ttl_secs(&self) -> i64 {
        i64::try_from(self.lease_ttl.as_secs()).unwrap_or(i64::MAX).max(2)
    }

    /// Reads every key under `prefix` (relative to the store's prefix), each request
    /// retried for a few seconds (a request can meet a dead member before the client
    /// learns it is). Read in pages of [`READ_PAGE`] keys, all at the first page's
    /// revision, so one snapshot of any size is read (a single answer over gRPC's 4 MiB
    /// message limit, as the proxy states of 10,000 proxies are, failed every time).
    pub(crate) async fn read_prefix(&self, prefix: &str) -> Result<PrefixRead, etcd_client::Error> {
        let full = self.key(prefix);
        let end = prefix_end(full.as_bytes());
        let mut client = self.client.kv_client().max_decoding_message_size(MAX_READ_MESSAGE);
        let mut from = full.as_bytes().to_vec();
        let mut revision = 0;
        let mut values = BTreeMap::new();
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(READ_PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let mut attempt = 0;
            let resp = loop {
                match client.get(from.clone(), Some(options.clone())).await {
                    Ok(r) => break r,
                    Err(e) if attempt >= RETRIES => return Err(e),
                    Err(_) => {
                        attempt += 1;
                        tokio::time::sleep(retry_delay(attempt)).await;
                    }
                }
            };
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            for kv in resp.kvs() {
                if let Some(rest) = kv.key().strip_prefix(full.as_bytes()) {
                    values.insert(String::from_utf8_lossy(rest).into_owned(), kv.value().to_vec());
                }
            }
            match resp.kvs().last() {
                // The next page starts just after the last key read.
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(PrefixRead { values, revision })
    }

    /// Keeps `values` (as read at `revision`) in line with the keys under `prefix`,
    /// calling `apply` with them and the store revision they reflect after every batch of
    /// changes (one transaction is one batch); resumes from the last revision seen
    /// when the watch breaks (a member died), re-reads everything when etcd compacted
    /// past it. Runs until the task is aborted.
    pub(crate) async fn mirror(
        self,
        prefix: &str,
        mut values: BTreeMap<String, Vec<u8>>,
        revision: i64,
        mut apply: impl FnMut(&BTreeMap<String, Vec<u8>>, i64) + Send,
    ) {
        let full = self.key(prefix);
        let mut next = Some(revision + 1);
        let mut failures: u32 = 0;
        loop {
            if failures > 0 {
                tokio::time::sleep(retry_delay(failures)).await;
            }
            let start = match next {
                Some(r) => r,
                None => match self.read_prefix(prefix).await {
                    Ok(read) => {
                        values = read.values;
                        apply(&values, read.revision);
                        read.revision + 1
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        tracing::warn!(prefix = %full, error = %e, "etcd re-read failed; retrying");
                        continue;
                    }
                },
            };
            next = Some(start);
            let options = WatchOptions::new().with_prefix().with_start_revision(start);
            // A batch of events (one transaction of large values) may be over gRPC's 4 MiB too.
            let mut watcher = self.client.watch_client().max_decoding_message_size(MAX_READ_MESSAGE);
            let mut stream = match watcher.watch(full.as_bytes(), Some(options)).await {
                Ok(s) => s,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(prefix = %full, error = %e, "etcd watch failed; retrying");
                    continue;
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        failures = 0;
                        if resp.compact_revision() > 0 {
                            tracing::warn!(prefix = %full, compacted = resp.compact_revision(), "etcd compacted past the watch; re-reading");
                            next = None;
                            break;
                        }
                        if resp.canceled() {
                            tracing::warn!(prefix = %full, reason = resp.cancel_reason(), "etcd watch canceled; resuming");
                            failures = 1;
                            break;
                        }
                        let mut changed = None;
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let Some(rest) = kv.key().strip_prefix(full.as_bytes()) else { continue };
                            let rest = String::from_utf8_lossy(rest).into_owned();
                            match ev.event_type() {
                                EventType::Put => values.insert(rest, kv.value().to_vec()),
                                EventType::Delete => values.remove(&rest),
                            };
                            next = Some(kv.mod_revision() + 1);
                            changed = Some(kv.mod_revision());
                        }
                        if let Some(revision) = changed {
                            apply(&values, revision);
                        }
                    }
                    Ok(None) => {
                        failures = 1;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(prefix = %full, error = %e, "etcd watch broke; resuming");
                        failures = 1;
                        break;
                    }
                }
            }
        }
    }
}

/// A lease this replica keeps alive (its registrations, its leadership).
pub(crate) struct KeptLease {
    id: i64,
    keeper: LeaseKeeper,
    answers: LeaseKeepAliveStream,
    etcd: Etcd,
}

impl KeptLease {
    /// A new lease of the configured TTL, with its keep-alive stream.
    pub(crate) async fn grant(etcd: &Etcd) -> Result<KeptLease, etcd_client::Error> {
        let mut client = etcd.client();
        let id = client.lease_grant(etcd.lease_ttl_secs(), None).await?.id();
        let (keeper, answers) = client.lease_keep_alive(id).await?;
        Ok(KeptLease { id, keeper, answers, etcd: etcd.clone() })
    }

    /// The lease id.
    pub(crate) fn id(&self) -> i64 {
        self.id
    }

    /// How often [`KeptLease::keep_alive`] should run: a third of the TTL.
    pub(crate) fn period(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.etcd.lease_ttl_secs()).unwrap_or(10) * 1000 / 3)
    }

    /// Keeps the lease alive from a task of its own, every [`KeptLease::period`], so slow
    /// work of its user (a settle, thousands of writes to a busy etcd) never lets it
    /// lapse, which would drop every key under it and have them all written again. The
    /// task stops when the returned [`LeaseHeld`] is dropped.
    pub(crate) fn keep_in_background(mut self) -> LeaseHeld {
        let (lost_tx, lost) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.period());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if !self.keep_alive().await {
                    let _ = lost_tx.send(());
                    return;
                }
            }
        });
        LeaseHeld { task, lost }
    }

    /// Refreshes the lease; on a broken stream (its member died) reopens it, through
    /// another member, until the TTL runs out. False once the lease is gone.
    pub(crate) async fn keep_alive(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + self.etcd.lease_ttl;
        let mut failures = 0;
        loop {
            if self.keeper.keep_alive().await.is_ok() {
                if let Ok(Ok(Some(a))) = tokio::time::timeout(self.period(), self.answers.message()).await {
                    return a.ttl() > 0;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            failures += 1;
            tokio::time::sleep(retry_delay(failures)).await;
            if let Ok((keeper, answers)) = self.etcd.client().lease_keep_alive(self.id).await {
                self.keeper = keeper;
                self.answers = answers;
            }
        }
    }
}

/// A lease kept alive in the background ([`KeptLease::keep_in_background`]) until this
/// is dropped.
pub(crate) struct LeaseHeld {
    task: tokio::task::JoinHandle<()>,
    lost: tokio::sync::oneshot::Receiver<()>,
}

impl LeaseHeld {
    /// Resolves once the lease is lost (etcd no longer knows it).
    pub(crate) async fn lost(&mut self) {
        let _ = (&mut self.lost).await;
    }
}

impl Drop for LeaseHeld {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Over TLS, `e` explained by repeating the handshake with the first member (what is
/// wrong with the certificates), when that finds the cause.
async fn explain_failure(cfg: &EtcdConfig, material: Option<&tls::TlsMaterial>, e: String) -> String {
    match (&cfg.tls, material, cfg.endpoints.first()) {
        (Some(files), Some(m), Some(first)) => tls::diagnose(first, files, m).await.unwrap_or(e),
        _ => e,
    }
}

/// An error with its sources (tonic's transport errors say little at the top).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out = format!("{out}: {text}");
        }
        source = s.source();
    }
    out
}

/// Keys per page of [`Etcd::read_prefix`].
const READ_PAGE: i64 = 256;
/// The largest answer (a page of [`Etcd::read_prefix`], a batch of watch events) taken:
/// etcd takes values up to 1.5 MiB by default and transactions of 128 operations, so
/// either may be well over gRPC's default 4 MiB.
const MAX_READ_MESSAGE: usize = 512 * 1024 * 1024;

/// The end of the key range holding every key that starts with `prefix` (etcd's
/// `--prefix`): `prefix` with its last byte below 0xff incremented and what follows dropped.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    match prefix.iter().rposition(|b| *b < 0xff) {
        Some(i) => {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            end
        }
        // Every byte is 0xff: no end, to the last key (etcd's "\0").
        None => vec![0],
    }
}

/// How often a one-shot request is retried ([`retry_delay`] apart: about 10 s in all).
pub(crate) const RETRIES: u32 = 8;

/// `txn`, retried as [`Etcd::read_prefix`] is.
pub(crate) async fn txn_retried(
    etcd: &Etcd,
    txn: etcd_client::Txn,
) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
    let mut attempt = 0;
    loop {
        match etcd.client().txn(txn.clone()).await {
            Ok(r) => return Ok(r),
            Err(e) if attempt >= RETRIES => return Err(e),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(retry_delay(attempt)).await;
            }
        }
    }
}

/// Retry delay after `failures` failures in a row: 100 ms doubling to 2 s.
pub(crate) fn retry_delay(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(5))).min(Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_flag_parses_members_and_prefix() {
        let c = EtcdConfig::parse("etcd://10.0.0.1:2379,etcd-1:2379").unwrap();
        assert_eq!(c.endpoints, ["http://10.0.0.1:2379", "http://etcd-1:2379"]);
        assert_eq!(c.prefix, "/weft/");
        assert_eq!(EtcdConfig::parse("etcd://a:1/mesh-a").unwrap().prefix, "/mesh-a/");
        let t = EtcdConfig::parse("etcds://10.0.0.1:2379,etcd-1:2379/m").unwrap();
        assert_eq!(t.endpoints, ["https://10.0.0.1:2379", "https://etcd-1:2379"]);
        assert_eq!(t.tls, Some(tls::EtcdTls::default()));
        assert_eq!(t.store_url(), "etcds://10.0.0.1:2379,etcd-1:2379/m");
        let files = tls::EtcdTls { ca: Some("ca.pem".into()), ..Default::default() };
        let flagged = c.clone().with_tls(files.clone());
        assert_eq!(flagged.endpoints, ["https://10.0.0.1:2379", "https://etcd-1:2379"]);
        assert_eq!((flagged.tls, c.store_url()), (Some(files), "etcd://10.0.0.1:2379,etcd-1:2379/weft".into()));
        for bad in ["http://a:1", "etcd://", "etcd://a", "etcd://a:x", "etcds://a"] {
            let e = EtcdConfig::parse(bad).unwrap_err();
            assert!(e.contains("--store"), "{e}");
        }
    }

    /// A prefix holding more keys than a page and more bytes than one gRPC answer may
    /// carry (the proxy states of 10,000 proxies are ~7 MB) is read whole, and only it.
    #[tokio::test]
    async fn a_prefix_over_a_page_and_over_4_mib_is_read_whole() {
        let cluster = weft_testkit::etcd::EtcdCluster::start(1).await;
        let etcd = Etcd::connect(&EtcdConfig::parse(&cluster.store_url()).unwrap()).await.unwrap();
        let mut client = etcd.client();
        let big = vec![b'x'; 1024 * 1024];
        for i in 0..6 {
            client.put(etcd.key(&format!("big/{i}")), big.clone(), None).await.unwrap();
        }
        for i in 0..600 {
            client.put(etcd.key(&format!("big/small-{i:04}")), format!("v{i}"), None).await.unwrap();
        }
        // Neighbours of the prefix stay out.
        client.put(etcd.key("bif"), "no", None).await.unwrap();
        client.put(etcd.key("big0"), "no", None).await.unwrap();
        let read = etcd.read_prefix("big/").await.unwrap();
        assert_eq!(read.values.len(), 606);
        assert_eq!(read.values.get("3").map(Vec::len), Some(big.len()));
        assert_eq!(read.values.get("small-0599").map(Vec::as_slice), Some(&b"v599"[..]));
        assert!(read.revision > 0);
        assert_eq!(prefix_end(b"a/"), b"a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), [0]);
    }

    /// The publishers hold a lease while writing thousands of keys, which on a busy etcd
    /// takes longer than the TTL: renewed from its own task, the lease outlives a holder
    /// that does nothing for it for twice the TTL, and lapses once the holder drops it.
    #[tokio::test]
    async fn a_lease_kept_in_the_background_outlives_a_busy_holder_and_ends_with_it() {
        let cluster = weft_testkit::etcd::EtcdCluster::start(1).await;
        let mut cfg = EtcdConfig::parse(&cluster.store_url()).unwrap();
        cfg.lease_ttl = Duration::from_secs(2);
        let etcd = Etcd::connect(&cfg).await.unwrap();
        let lease = KeptLease::grant(&etcd).await.unwrap();
        let id = lease.id();
        let held = lease.keep_in_background();
        // The holder is busy elsewhere for twice the TTL.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let ttl = etcd.client().lease_time_to_live(id, None).await.unwrap().ttl();
        assert!(ttl > 0, "the lease lapsed while held (TTL left {ttl})");
        drop(held);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while etcd.client().lease_time_to_live(id, None).await.unwrap().ttl() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "the lease is still renewed after its holder dropped it");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
