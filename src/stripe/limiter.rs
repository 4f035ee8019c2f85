//! Client-side rate limiting of Stripe requests.
//!
//! - [`RateLimiter`]: a token bucket written as GCRA (one "theoretical arrival time"), fair in arrival order, with
//!   integer durations, within one process. Over any window of `T`, at most `burst + rate × T` requests start.
//! - [`Limiter`]: what the gateway waits on: that local limiter (tests, the demo), or the
//!   [`SharedLimiter`](super::shared_limiter::SharedLimiter) that holds one budget for every replica through
//!   PostgreSQL (`serve`, `worker`, `ops`).
//! - [`slot_starts_us`], [`gcra_reserve_us`]: the GCRA arithmetic the shared limiter applies to a batch of slots the
//!   database granted, pure so it can be property-tested.
//!
//! Stripe allows 25 requests/s in test mode and 100 in live mode, per account; the defaults are those rates with a
//! burst of 1.

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
        let ready_at = self.reserve(1)[0];
        crate::observability::rate_limiter_waited(ready_at.saturating_duration_since(Instant::now()));
        tokio::time::sleep_until(ready_at).await;
    }

    /// Takes the next `n` slots and says when each may start (in order); the caller waits for them.
    pub fn reserve(&self, n: u32) -> Vec<Instant> {
        let now = Instant::now();
        let mut tat = self
            .tat
            .lock()
            .expect("limiter lock is never poisoned: no panics inside");
        (0..n)
            .map(|_| {
                let slot = tat.map_or(now, |t| t.max(now));
                *tat = Some(slot + self.interval);
                slot.checked_sub(self.tolerance).map_or(now, |start| start.max(now))
            })
            .collect()
    }

    /// Starts nothing for `pause` (after a 429): the next slot is at least that far away.
    pub fn pause(&self, pause: Duration) {
        let until = Instant::now() + pause + self.tolerance;
        let mut tat = self
            .tat
            .lock()
            .expect("limiter lock is never poisoned: no panics inside");
        *tat = Some(tat.map_or(until, |t| t.max(until)));
    }
}

/// GCRA over a shared "theoretical arrival time", in microseconds of one clock: reserving `n` slots at `now_us`
/// moves `tat_us` to the returned value. The database applies the same rule in one UPDATE
/// (`store::rate_limits::reserve`); this copy exists for the property tests.
pub fn gcra_reserve_us(tat_us: i64, now_us: i64, n: u32, interval_us: i64) -> i64 {
    tat_us.max(now_us) + i64::from(n) * interval_us
}

/// When each of the `n` slots of a batch may start, in microseconds after `now_us` (the clock when the batch was
/// granted), given the arrival time after the batch and the burst tolerance `(burst - 1) × interval`. Slot `i` is due
/// at `tat_after_us - (n - i) × interval_us`; it may start `tolerance_us` early, never before the grant.
pub fn slot_starts_us(tat_after_us: i64, now_us: i64, n: u32, interval_us: i64, tolerance_us: i64) -> Vec<i64> {
    (0..i64::from(n))
        .map(|i| {
            let due_us = tat_after_us - (i64::from(n) - i) * interval_us;
            (due_us - tolerance_us - now_us).max(0)
        })
        .collect()
}

/// What the gateway waits on before each Stripe request.
#[derive(Debug)]
pub enum Limiter {
    /// This process only: tests and the demo, which own their simulator.
    Local(RateLimiter),
    /// One budget for every replica, through PostgreSQL.
    Shared(super::shared_limiter::SharedLimiter),
}

impl Limiter {
    pub async fn acquire(&self) {
        match self {
            Limiter::Local(limiter) => limiter.acquire().await,
            Limiter::Shared(limiter) => limiter.acquire().await,
        }
    }

    /// Stripe answered 429 `rate_limit`: slow down (every replica, when shared).
    pub async fn throttled(&self) {
        match self {
            Limiter::Local(limiter) => limiter.pause(super::shared_limiter::THROTTLE_PAUSE),
            Limiter::Shared(limiter) => limiter.throttled().await,
        }
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

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_next_request() {
        let limiter = RateLimiter::new(10, 3);
        let start = Instant::now();
        limiter.pause(Duration::from_secs(1));
        limiter.acquire().await;
        assert_eq!(start.elapsed().as_millis(), 1_000);
    }

    #[test]
    fn a_batch_starts_its_burst_at_once_then_one_per_interval() {
        // Idle row (tat in the past): 5 slots of 100 µs with a burst of 3.
        let tat_after = gcra_reserve_us(0, 1_000, 5, 100);
        assert_eq!(tat_after, 1_500);
        assert_eq!(slot_starts_us(tat_after, 1_000, 5, 100, 200), vec![0, 0, 0, 100, 200]);
        // Busy row (tat 300 µs ahead): the batch queues behind it.
        let tat_after = gcra_reserve_us(1_300, 1_000, 2, 100);
        assert_eq!(slot_starts_us(tat_after, 1_000, 2, 100, 0), vec![300, 400]);
    }

    use proptest::prelude::*;

    proptest! {
        /// Whatever batches replicas take, and whenever they ask, the slots they start in any window of `T` number
        /// at most `burst + T / interval + 1` (the `+ 1`: a closed window holds both of its ends).
        #[test]
        fn batches_from_any_replicas_hold_the_gcra_bound(
            interval_us in 1i64..5_000,
            burst in 1i64..6,
            asks in prop::collection::vec((0i64..20_000, 1u32..12), 1..60),
            window_us in 1i64..100_000,
        ) {
            let tolerance_us = (burst - 1) * interval_us;
            let mut tat_us = 0;
            let mut now_us = 0;
            let mut starts = Vec::new();
            for (gap_us, n) in asks {
                now_us += gap_us;
                tat_us = gcra_reserve_us(tat_us, now_us, n, interval_us);
                starts.extend(slot_starts_us(tat_us, now_us, n, interval_us, tolerance_us).into_iter().map(|s| {
                    prop_assert!(s >= 0, "never before the grant");
                    Ok(now_us + s)
                }).collect::<Result<Vec<_>, _>>()?);
            }
            starts.sort_unstable();
            for (i, &from) in starts.iter().enumerate() {
                let in_window = starts[i..].iter().take_while(|&&s| s <= from + window_us).count() as i64;
                prop_assert!(in_window <= burst + window_us / interval_us + 1,
                    "{in_window} starts in {window_us} µs at {interval_us} µs, burst {burst}");
            }
        }
    }
}
