//! Who runs the singleton work (CA rotation steps, rollout controllers, SLO alerts,
//! status written back to Kubernetes) when several replicas serve one mesh: the replica
//! elected through etcd ([`crate::etcd::leader`]) or on a Kubernetes Lease
//! ([`crate::kubernetes::lease`]); with the directory store the only replica, always.

use tokio::sync::watch;

/// Whether this replica is the leader, as it changes. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
}

impl Leadership {
    /// Always the leader (a single control plane on the directory store).
    pub fn always() -> Leadership {
        let (tx, rx) = watch::channel(true);
        // A receiver keeps the last value after its sender is dropped.
        drop(tx);
        Leadership { rx }
    }

    /// Leadership as published on `rx` (the etcd campaign's channel).
    pub fn following(rx: watch::Receiver<bool>) -> Leadership {
        Leadership { rx }
    }

    /// Whether this replica leads, now and as it changes: singleton work runs only
    /// while the value is true (`wait_for(|l| *l)` before each step).
    pub fn is_leader(&self) -> watch::Receiver<bool> {
        self.rx.clone()
    }

    /// Whether this replica leads right now.
    pub fn leads(&self) -> bool {
        *self.rx.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_store_is_always_the_leader() {
        let l = Leadership::always();
        assert!(l.leads());
        assert!(*l.is_leader().borrow());
    }
}
