use std::time::Duration;

use super::bucket::{BucketParams, TokenBucket};
use super::descriptor_matches;

fn params(max: u64, per_fill: u64, ms: u64) -> BucketParams {
    BucketParams { max, per_fill, interval: Duration::from_millis(ms) }
}

#[tokio::test(start_paused = true)]
async fn bucket_starts_full_refills_per_interval_and_caps_at_max() {
    let b = TokenBucket::new(params(3, 2, 1000));
    assert!((0..3).all(|_| b.try_take()));
    assert!(!b.try_take(), "empty after max_tokens");
    tokio::time::advance(Duration::from_millis(999)).await;
    assert!(!b.try_take(), "no fill before the interval");
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(b.remaining(), 2, "one fill adds tokens_per_fill");
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(b.remaining(), 3, "fills stop at max_tokens");
    assert!(b.until_fill() <= Duration::from_secs(1));
}

#[test]
fn descriptor_entries_match_in_order_and_empty_values_match_any() {
    let e = |k: &str, v: &str| (k.to_string(), v.to_string());
    assert!(descriptor_matches(&[e("path", "/a")], &[e("path", "/a")]));
    assert!(!descriptor_matches(&[e("path", "/a")], &[e("path", "/b")]));
    assert!(descriptor_matches(&[e("path", "")], &[e("path", "/b")]));
    assert!(!descriptor_matches(&[e("path", "/a")], &[e("path", "/a"), e("x", "y")]));
}

#[test]
fn the_registry_keeps_a_bucket_between_configurations_and_drops_unused_ones_after_two_sweeps() {
    use super::bucket::{BucketKey, BucketRegistry};
    let r = BucketRegistry::default();
    let key =
        |i: usize| BucketKey { scope: format!("s{i}").into(), descriptor: Vec::new(), params: params(1, 1, 1000) };
    let b = r.get(&key(0));
    assert!(b.try_take());
    drop(b);
    // The configuration holding it is gone; the next one finds the same (empty) bucket.
    assert!(!r.get(&key(0)).try_take());
    // Many other buckets, unused: sweeps bound the map.
    for i in 1..1000 {
        drop(r.get(&key(i)));
    }
    assert!(r.len() < 200, "unused buckets are swept: {}", r.len());
}
