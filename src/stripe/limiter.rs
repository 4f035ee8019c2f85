//! A client-side rate limiter for Stripe requests: a token bucket written as GCRA (one "theoretical arrival
//! time"), fair in arrival order, with integer durations.
//!
//! Guarantee: over any window of `T`, at most `burst + rate × T` requests start. Stripe allows 25 requests/s in test
//! mode and 100 in live mode; the defaults are those rates with a burst of 1. This limiter holds within one process;
//! replicas share Stripe's budget, so with N replicas give each `rate / N` until a limiter shared through
//! PostgreSQL exists (see the issue notes), and 429s are retried with backoff either way.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub const TEST_MODE_RATE_PER_SEC: u32 = 25;
pub const LIVE_MODE_RATE_PER_SEC: u32 = 100;

#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    /// How far ahead of its slot a request may start: `(burst - 1) × interval`.
    tolerance: Duration,
    /// When the next request would start if requests came evenly spaced.
    tat: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// `rate_per_sec` ≥ 1, `burst` ≥ 1.
    pub fn new(rate_per_sec: u32, burst: u32) -> Self {
        assert!(rate_per_sec >= 1 && burst >= 1, "rate and burst must be positive");
        let interval = Duration::from_nanos(1_000_000_000 / u64::from(rate_per_sec));
        Self {
            interval,
            tolerance: interval * (burst - 1),
            tat: Mutex::new(None),
        }
    }

    /// Waits for this request's slot. Slots are handed out in call order, so waiters are served fairly.
    pub async fn acquire(&self) {
        let ready_at = {
            let now = Instant::now();
            let mut tat = self
                .tat
                .lock()
                .expect("limiter lock is never poisoned: no panics inside");
            let slot = tat.map_or(now, |t| t.max(now));
            *tat = Some(slot + self.interval);
            slot.checked_sub(self.tolerance).map_or(now, |start| start.max(now))
        };
        crate::observability::rate_limiter_waited(ready_at.saturating_duration_since(Instant::now()));
        tokio::time::sleep_until(ready_at).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With tokio's paused clock the timing is exact: the first `burst` go at once, then one per interval.
    #[tokio::test(start_paused = true)]
    async fn spaces_requests_after_the_burst() {
        let limiter = RateLimiter::new(10, 3);
        let start = Instant::now();
        let mut starts = Vec::new();
        for _ in 0..6 {
            limiter.acquire().await;
            starts.push(start.elapsed().as_millis());
        }
        assert_eq!(starts, vec![0, 0, 0, 100, 200, 300]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_limiter_does_not_bank_more_than_its_burst() {
        let limiter = RateLimiter::new(10, 2);
        limiter.acquire().await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let start = Instant::now();
        for _ in 0..4 {
            limiter.acquire().await;
        }
        assert_eq!(
            start.elapsed().as_millis(),
            200,
            "2 at once, then 2 spaced: no credit for the idle 10 s"
        );
    }
}
