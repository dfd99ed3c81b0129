//! The circuit-breaker gauges of `ClusterLoad`.

use std::sync::Arc;

use crate::cluster::{ClusterLoad, RetryBudget};

#[test]
fn max_retries_bounds_concurrent_retries_and_a_finished_retry_frees_its_slot() {
    let load = Arc::new(ClusterLoad::default());
    let a = load.try_retry(2, None).expect("first");
    let _b = load.try_retry(2, None).expect("second");
    assert!(load.try_retry(2, None).is_none(), "a third is over max_retries");
    drop(a);
    assert!(load.try_retry(2, None).is_some(), "the slot came back");
}

#[test]
fn a_retry_budget_is_a_share_of_active_and_pending_requests_with_a_floor() {
    let load = Arc::new(ClusterLoad::default());
    let budget = Some(RetryBudget { budget_percent: 20.0, min_retry_concurrency: 1 });
    // No load: the floor allows one, and max_retries is ignored.
    let one = load.try_retry(0, budget).expect("min_retry_concurrency");
    assert!(load.try_retry(100, budget).is_none());
    drop(one);
    // Ten requests active (and pending count too): 20% of them, 2.
    let active: Vec<_> = (0..8).map(|_| load.try_start(100).unwrap()).collect();
    let pending: Vec<_> = (0..2).map(|_| load.try_pending(100).unwrap()).collect();
    let retries: Vec<_> = (0..2).map(|_| load.try_retry(0, budget).expect("within the budget")).collect();
    assert!(load.try_retry(0, budget).is_none(), "over 20% of 10");
    assert_eq!((active.len(), pending.len(), retries.len()), (8, 2, 2));
}

#[test]
fn connections_are_bounded_unless_forced_and_pending_requests_too() {
    let load = Arc::new(ClusterLoad::default());
    let c = load.try_connection(1, false).expect("one");
    assert!(load.try_connection(1, false).is_none());
    let forced = load.try_connection(1, true).expect("a host's first connection is always allowed");
    assert_eq!(load.connections(), 2);
    drop((c, forced));
    assert_eq!(load.connections(), 0);
    let p = load.try_pending(1).expect("one pending");
    assert!(load.try_pending(1).is_none());
    drop(p);
    assert_eq!(load.pending(), 0);
}
