//! Leader election over etcd: the replica that creates the `leader` key under its lease
//! leads until the lease is lost (it died, or could not reach etcd for a TTL); the others
//! try to create the key every second, so one of them takes over within about a lease
//! TTL after the leader dies.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{retry_delay, Etcd, KeptLease};

/// How often a follower tries to become the leader.
const CAMPAIGN_EVERY: Duration = Duration::from_secs(1);

/// Campaigns as `name` until aborted, publishing on `leader` whether this replica leads.
pub fn start(etcd: Etcd, name: String, leader: watch::Sender<bool>) -> JoinHandle<()> {
    tokio::spawn(campaign(etcd, name, leader))
}

async fn campaign(etcd: Etcd, name: String, leader: watch::Sender<bool>) {
    let key = etcd.key("leader");
    let mut failures = 0u32;
    loop {
        leader.send_if_modified(|l| std::mem::replace(l, false));
        if failures > 0 {
            tokio::time::sleep(retry_delay(failures)).await;
        }
        let mut lease = match KeptLease::grant(&etcd).await {
            Ok(l) => l,
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::debug!(error = %e, "leader election: no lease");
                continue;
            }
        };
        let period = lease.period();
        let mut tick = tokio::time::interval(CAMPAIGN_EVERY.min(period));
        let mut last_keep_alive = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            if last_keep_alive.elapsed() >= period {
                if !lease.keep_alive().await {
                    if *leader.borrow() {
                        tracing::warn!(%name, "leadership lost: the etcd lease expired");
                    }
                    failures = 1;
                    break;
                }
                last_keep_alive = tokio::time::Instant::now();
            }
            if *leader.borrow() {
                continue;
            }
            let put = TxnOp::put(key.as_bytes(), name.as_bytes(), Some(PutOptions::new().with_lease(lease.id())));
            let txn = Txn::new().when([Compare::create_revision(key.as_bytes(), CompareOp::Equal, 0)]).and_then([put]);
            match etcd.client().txn(txn).await {
                Ok(r) if r.succeeded() => {
                    tracing::info!(%name, "leader elected: this replica runs the singleton work");
                    leader.send_replace(true);
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "leader election: campaign failed"),
            }
        }
    }
}
