//! The simulator's per-key rate limiter, as Stripe's: a token bucket per API key (written as GCRA, one
//! "theoretical arrival time" per key) over every `/v1/` request. Off unless `SimConfig::rate_limit_per_sec` is set.
//! A refused request consumes nothing, as a token bucket refuses.

use std::collections::HashMap;

/// Per-key state: when the bucket will be full again, in nanoseconds since the simulator started.
#[derive(Debug, Default)]
pub(super) struct RateBuckets {
    tat_ns: HashMap<String, u64>,
    /// Requests refused with 429 `rate_limit` since the start.
    pub(super) refused_total: u64,
}

impl RateBuckets {
    /// Takes a token for `api_key` at `now_ns`, or says no. `burst` 0 means one second's worth (`rate_per_sec`).
    pub(super) fn admit(&mut self, api_key: &str, now_ns: u64, rate_per_sec: u32, burst: u32) -> bool {
        let rate_per_sec = u64::from(rate_per_sec.max(1));
        let burst = if burst == 0 { rate_per_sec } else { u64::from(burst) };
        let interval_ns = 1_000_000_000 / rate_per_sec;
        let tolerance_ns = interval_ns * (burst - 1);
        let tat_ns = self.tat_ns.get(api_key).copied().unwrap_or(0).max(now_ns);
        if tat_ns - now_ns > tolerance_ns {
            self.refused_total += 1;
            return false;
        }
        self.tat_ns.insert(api_key.to_owned(), tat_ns + interval_ns);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_burst_then_the_rate_per_key() {
        let mut buckets = RateBuckets::default();
        // 10/s, burst 3: three at once, the fourth refused, one more after each 100 ms.
        let admitted: Vec<bool> = (0..4).map(|_| buckets.admit("sk_test_a", 0, 10, 3)).collect();
        assert_eq!(admitted, vec![true, true, true, false]);
        assert!(buckets.admit("sk_test_b", 0, 10, 3), "another key has its own bucket");
        assert!(!buckets.admit("sk_test_a", 99 * MS, 10, 3));
        assert!(buckets.admit("sk_test_a", 100 * MS, 10, 3));
        assert!(!buckets.admit("sk_test_a", 150 * MS, 10, 3));
        assert_eq!(buckets.refused_total, 3);
    }

    #[test]
    fn an_idle_bucket_holds_no_more_than_its_burst() {
        let mut buckets = RateBuckets::default();
        assert!(buckets.admit("k", 0, 100, 2));
        let later = 60_000 * MS;
        assert!(buckets.admit("k", later, 100, 2));
        assert!(buckets.admit("k", later, 100, 2));
        assert!(!buckets.admit("k", later, 100, 2), "two at once, not a minute's worth");
    }

    #[test]
    fn burst_zero_means_one_second() {
        let mut buckets = RateBuckets::default();
        let admitted = (0..30).filter(|_| buckets.admit("k", 0, 25, 0)).count();
        assert_eq!(admitted, 25);
    }
}
