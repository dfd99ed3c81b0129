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

/// A per-route config: default bucket of `default_tokens`, descriptor `user=alice` with
/// 5 tokens, `always_consume_default_token_bucket` as given.
fn config(default_tokens: u32, always_consume: Option<bool>) -> std::sync::Arc<super::LocalRateLimitConfig> {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{rate_limit_descriptor, LocalRateLimitDescriptor};
    use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
    use envoy_types::pb::envoy::r#type::v3::TokenBucket;
    use envoy_types::pb::google::protobuf::{BoolValue, Duration as PbDuration};
    let tb = |n| {
        Some(TokenBucket {
            max_tokens: n,
            tokens_per_fill: None,
            fill_interval: Some(PbDuration { seconds: 60, nanos: 0 }),
        })
    };
    let l = LocalRateLimit {
        stat_prefix: "t".into(),
        token_bucket: tb(default_tokens),
        descriptors: vec![LocalRateLimitDescriptor {
            entries: vec![rate_limit_descriptor::Entry { key: "user".into(), value: "alice".into() }],
            token_bucket: tb(5),
            shadow_mode: false,
        }],
        always_consume_default_token_bucket: always_consume.map(|value| BoolValue { value }),
        ..Default::default()
    };
    super::compile_per_route(&envoy_types::util::pack_any(l), "test").unwrap()
}

#[tokio::test]
async fn always_consume_default_token_bucket_decides_whether_descriptor_matches_spend_the_default_bucket() {
    let alice = vec![vec![("user".to_string(), "alice".to_string())]];
    let bob = vec![vec![("user".to_string(), "bob".to_string())]];
    // Envoy's default (true): alice spends her bucket and the default one (1 token).
    let c = config(1, None);
    let b = c.make_buckets(|k| std::sync::Arc::new(TokenBucket::new(k.params)));
    assert!(c.allowed(&b, &alice).0);
    assert!(!c.allowed(&b, &alice).0, "the default bucket is empty");
    // false: a descriptor match leaves the default bucket alone.
    let c = config(1, Some(false));
    let b = c.make_buckets(|k| std::sync::Arc::new(TokenBucket::new(k.params)));
    assert!((0..5).all(|_| c.allowed(&b, &alice).0), "alice has 5 tokens of her own");
    assert!(!c.allowed(&b, &alice).0, "and then none");
    assert!(c.allowed(&b, &bob).0, "bob matches no descriptor: the untouched default bucket");
    assert!(!c.allowed(&b, &bob).0);
}
