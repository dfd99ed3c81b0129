//! Counters of the local rate limit filters, `weft_http_local_rate_limit_*`: Envoy's
//! `<stat_prefix>.http_local_rate_limit.{enabled,enforced,rate_limited,ok}`, one series
//! per `stat_prefix` (the filter configuration's, per route where a route has its own).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Which counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitCount {
    /// Requests the filter was enabled for (`filter_enabled`).
    Enabled,
    /// Rate-limited requests that were refused (`filter_enforced`).
    Enforced,
    /// Requests that found no token (refused or, in shadow mode, passed).
    RateLimited,
    /// Requests that found a token.
    Ok,
}

/// The `weft_http_local_rate_limit_*` families.
#[derive(Debug)]
pub struct RateLimitMetrics {
    families: [Family<Vec<(String, String)>, Counter>; 4],
}

impl RateLimitMetrics {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let m = RateLimitMetrics { families: Default::default() };
        let help = [
            ("weft_http_local_rate_limit_enabled", "Requests the local rate limit filter was enabled for"),
            ("weft_http_local_rate_limit_enforced", "Rate-limited requests refused by the local rate limit filter"),
            (
                "weft_http_local_rate_limit_rate_limited",
                "Requests that found no token (refused, or passed in shadow mode)",
            ),
            ("weft_http_local_rate_limit_ok", "Requests that found a token in the local rate limit buckets"),
        ];
        for ((name, text), family) in help.iter().zip(m.families.iter()) {
            registry.register(*name, *text, family.clone());
        }
        m
    }

    /// The counter `which` of `stat_prefix` (a handle: keep it, increments are cheap).
    pub fn counter(&self, which: RateLimitCount, stat_prefix: &str) -> Counter {
        self.families[which as usize].get_or_create(&vec![("stat_prefix".to_string(), stat_prefix.to_string())]).clone()
    }
}
