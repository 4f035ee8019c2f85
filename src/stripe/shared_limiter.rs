//! [`SharedLimiter`]: one Stripe rate budget for every replica, held in PostgreSQL (`stripe_rate_limits`, one row
//! per key fingerprint).
//!
//! **Design: leased batches of GCRA slots.** The row holds GCRA's "theoretical arrival time" on the database's clock.
//! A process reserves a batch of consecutive slots with one `UPDATE … RETURNING` (`store::rate_limits::reserve`) for
//! the requests waiting in it — as many as wait, at most `lease_slots` reserved and not yet started at any time — and
//! starts each request at its slot. One round trip serves a whole batch, so a busy process pays one query per half
//! lease or better (it reserves again once half its lease is free), an idle one a query per request (which costs nothing next to Stripe's own latency).
//! Slots are spaced on the shared clock, so batches from different processes never overlap: reserving ahead wastes
//! nothing unless a waiter gives up.
//!
//! **Bound.** Slots are GCRA slots, so over any window `T` at most `burst + rate × T` slots fall due. A request never
//! starts before its slot (a slot's time is read on the local clock *after* the reply, so it is late by up to the
//! round trip, never early). A request can start later than its slot (a stalled process); those that start in a
//! window but were due before it were reserved and unstarted when it began: at most `lease_slots` per process. So
//! over any window `T`, across `N` processes: **at most `burst + rate × T + N × lease_slots` requests start** (plus
//! one for a closed window's two ends). That `N × lease_slots` is the worst-case overshoot; it needs every process to
//! stall with a full lease at once.
//!
//! **Fairness.** Within a process, waiters get slots in arrival order (FIFO); across processes, batches in the order
//! the database serialises their updates.
//!
//! **429s.** A `rate_limit` 429 halves the rate in force for every replica (in the row, not below 1/16) and pushes
//! the next free slot a pause away; the rate recovers linearly to the budget (see `store::rate_limits`).
//!
//! **Without PostgreSQL** the process fails safe: it falls back to a local limiter at a tenth of the budget (at
//! least 1/s), so up to ten replicas together still stay within it, and tries the database again a second later.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::Digest;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use super::limiter::{slot_starts_us, RateLimiter};

/// How long every replica stops after a 429 (Stripe counts requests per second).
pub const THROTTLE_PAUSE: Duration = Duration::from_millis(1_000);
/// Without PostgreSQL a process sends at most this fraction of the budget: safe for up to this many replicas.
pub const FALLBACK_DIVISOR: u32 = 10;
/// How long a process that could not reach PostgreSQL uses its fallback before it tries again.
const DEGRADED_RETRY: Duration = Duration::from_millis(1_000);
/// The limiter's own connection waits at most this long for PostgreSQL before the fallback takes over.
const DB_ACQUIRE_TIMEOUT: Duration = Duration::from_millis(1_000);
/// The most slots one process may hold (the default lease is 100 ms of budget, within 1..=this).
pub const LEASE_SLOTS_MAX: u32 = 1_000;

/// The default lease: 100 ms of the budget, at least 1 slot, at most 100. It bounds both the round trips (one per
/// lease when busy: 10 per second per busy process) and the worst-case overshoot (one lease per process).
pub fn default_lease_slots(rate_per_sec: u32) -> u32 {
    (rate_per_sec / 10).clamp(1, 100)
}

/// A short, stable name for a Stripe key that reveals nothing about it: the first 16 hex digits of its SHA-256.
/// The shared budget is keyed by it, so processes with the same key share one row and the key is never stored.
pub fn key_fingerprint(secret: &str) -> String {
    let digest = sha2::Sha256::digest(secret.as_bytes());
    format!("sha256:{}", &hex::encode(digest)[..16])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedLimiterConfig {
    pub rate_per_sec: u32,
    pub burst: u32,
    /// Slots one process may hold reserved and not yet started (see the bound in the module doc).
    pub lease_slots: u32,
}

/// What a process did, for tests and measurements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimiterStats {
    /// Batches the database granted (round trips, row creation excluded).
    pub reservations: u64,
    /// Slots in those batches.
    pub slots_reserved: u64,
    /// Slots the local fallback granted while PostgreSQL could not be reached.
    pub fallback_slots: u64,
    /// Slots nobody used (their waiter gave up).
    pub slots_wasted: u64,
}

#[derive(Clone)]
pub struct SharedLimiter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SharedLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimiter")
            .field("account_fingerprint", &self.inner.account_fingerprint)
            .field("config", &self.inner.config)
            .finish()
    }
}

struct Inner {
    /// Its own connection: jobs holding every connection of the main pool must not starve the limiter.
    pool: PgPool,
    account_fingerprint: String,
    config: SharedLimiterConfig,
    interval_us: i64,
    tolerance_us: i64,
    fallback: RateLimiter,
    state: Mutex<State>,
    /// Held by the one waiter that reserves for everybody in this process.
    fetch: tokio::sync::Mutex<()>,
    /// A reserved slot started or was dropped: room for the next batch.
    freed: Notify,
    reservations: AtomicU64,
    slots_reserved: AtomicU64,
    fallback_slots: AtomicU64,
    slots_wasted: AtomicU64,
}

struct State {
    waiters: VecDeque<oneshot::Sender<Slot>>,
    /// Slots reserved and not yet started (or dropped): at most `lease_slots`.
    outstanding: u32,
    degraded_until: Option<Instant>,
}

/// A reserved slot. Dropping it (after its request started, or because its waiter gave up) frees its place in the
/// lease.
struct Slot {
    at: Instant,
    used: bool,
    inner: Arc<Inner>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.used {
            self.inner.slots_wasted.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.lock_state().outstanding -= 1;
        self.inner.freed.notify_waiters();
    }
}

impl Inner {
    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("limiter state lock is never poisoned: no panics inside")
    }
}

impl SharedLimiter {
    /// A limiter on the database `pool` points at (through its own single connection), for the key with
    /// `account_fingerprint` (see [`key_fingerprint`]). Needs a Tokio runtime only when used.
    pub fn new(pool: &PgPool, account_fingerprint: String, config: SharedLimiterConfig) -> Self {
        let rate_per_sec = config.rate_per_sec.max(1);
        let burst = config.burst.max(1);
        let config = SharedLimiterConfig {
            rate_per_sec,
            burst,
            lease_slots: config.lease_slots.clamp(1, LEASE_SLOTS_MAX),
        };
        let interval_us = (1_000_000 / i64::from(rate_per_sec)).max(1);
        let own_pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(DB_ACQUIRE_TIMEOUT)
            .connect_lazy_with((*pool.connect_options()).clone());
        Self {
            inner: Arc::new(Inner {
                pool: own_pool,
                account_fingerprint,
                config,
                interval_us,
                tolerance_us: interval_us * i64::from(burst - 1),
                fallback: RateLimiter::new((rate_per_sec / FALLBACK_DIVISOR).max(1), 1),
                state: Mutex::new(State {
                    waiters: VecDeque::new(),
                    outstanding: 0,
                    degraded_until: None,
                }),
                fetch: tokio::sync::Mutex::new(()),
                freed: Notify::new(),
                reservations: AtomicU64::new(0),
                slots_reserved: AtomicU64::new(0),
                fallback_slots: AtomicU64::new(0),
                slots_wasted: AtomicU64::new(0),
            }),
        }
    }

    pub fn config(&self) -> SharedLimiterConfig {
        self.inner.config
    }

    pub fn stats(&self) -> LimiterStats {
        let i = &self.inner;
        LimiterStats {
            reservations: i.reservations.load(Ordering::Relaxed),
            slots_reserved: i.slots_reserved.load(Ordering::Relaxed),
            fallback_slots: i.fallback_slots.load(Ordering::Relaxed),
            slots_wasted: i.slots_wasted.load(Ordering::Relaxed),
        }
    }

    /// Waits for this request's slot in the shared budget. Waiters in this process are served in arrival order.
    pub async fn acquire(&self) {
        let started = Instant::now();
        let (tx, mut rx) = oneshot::channel();
        self.inner.lock_state().waiters.push_back(tx);
        let mut slot = loop {
            tokio::select! {
                biased;
                slot = &mut rx => match slot {
                    Ok(slot) => break slot,
                    // Senders are only dropped after a send or once their receiver is gone: not reachable, but
                    // queueing again is the safe answer.
                    Err(_) => {
                        let (tx, again) = oneshot::channel();
                        self.inner.lock_state().waiters.push_back(tx);
                        rx = again;
                    }
                },
                _fetching = self.inner.fetch.lock() => serve_waiters(&self.inner).await,
            }
        };
        crate::observability::rate_limiter_waited(slot.at.saturating_duration_since(started));
        tokio::time::sleep_until(slot.at).await;
        slot.used = true;
    }

    /// Stripe answered 429 `rate_limit`: slows every replica down (see `store::rate_limits::record_throttle`).
    pub async fn throttled(&self) {
        let pause_us = THROTTLE_PAUSE.as_micros() as i64 + self.inner.tolerance_us;
        match crate::store::rate_limits::record_throttle(&self.inner.pool, &self.inner.account_fingerprint, pause_us)
            .await
        {
            Ok(Some(scale_permille)) => {
                tracing::warn!(scale_permille, "Stripe rate limited us: every replica slows down")
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "Stripe rate limited us and PostgreSQL is unreachable: pausing this process");
                self.inner.fallback.pause(THROTTLE_PAUSE);
            }
        }
    }
}

/// Reserves one batch for the first waiters in line (the caller holds the fetch lock), waiting for room in the lease
/// first if it is full.
async fn serve_waiters(inner: &Arc<Inner>) {
    let n = loop {
        let freed = inner.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        {
            let mut state = inner.lock_state();
            state.waiters.retain(|w| !w.is_closed());
            if state.waiters.is_empty() {
                return;
            }
            let lease = inner.config.lease_slots;
            let room = lease.saturating_sub(state.outstanding);
            let wanted = lease.min(u32::try_from(state.waiters.len()).unwrap_or(u32::MAX));
            // Reserve when the whole demand fits, or at least half a lease does: a busy process then pays one round
            // trip per half lease, not one per slot as its lease frees up slot by slot.
            if room >= wanted || room >= lease.div_ceil(2) {
                break room.min(wanted);
            }
        }
        freed.await;
    };
    let starts = reserve(inner, n).await;
    let mut unused = Vec::new();
    {
        let mut state = inner.lock_state();
        for at in starts {
            state.outstanding += 1;
            let mut slot = Slot {
                at,
                used: false,
                inner: inner.clone(),
            };
            // First live waiter in line; a waiter that gave up passes its place on.
            loop {
                match state.waiters.pop_front() {
                    Some(waiter) => match waiter.send(slot) {
                        Ok(()) => break,
                        Err(back) => slot = back,
                    },
                    None => {
                        unused.push(slot);
                        break;
                    }
                }
            }
        }
    }
    // Dropped outside the lock: a slot's drop takes it.
    drop(unused);
}

/// `n` start times: from the database, or from the local fallback while it cannot be reached.
async fn reserve(inner: &Inner, n: u32) -> Vec<Instant> {
    let degraded = inner
        .lock_state()
        .degraded_until
        .is_some_and(|until| Instant::now() < until);
    if !degraded {
        match crate::store::rate_limits::reserve(&inner.pool, &inner.account_fingerprint, n, inner.interval_us).await {
            Ok(granted) => {
                // Read the local clock after the reply: a slot can only start late by the round trip, never early.
                let received = Instant::now();
                inner.reservations.fetch_add(1, Ordering::Relaxed);
                inner.slots_reserved.fetch_add(u64::from(n), Ordering::Relaxed);
                // While a 429 slow-down stretches the interval, the burst stretches with it.
                let tolerance_us = granted.interval_us * i64::from(inner.config.burst - 1);
                return slot_starts_us(
                    granted.tat_after_us,
                    granted.now_us,
                    n,
                    granted.interval_us,
                    tolerance_us,
                )
                .into_iter()
                .map(|after_us| received + Duration::from_micros(after_us as u64))
                .collect();
            }
            Err(e) => {
                tracing::warn!(error = %e, fallback_rate_per_sec = (inner.config.rate_per_sec / FALLBACK_DIVISOR).max(1),
                    "the shared Stripe rate budget is unreachable: this process falls back to a tenth of it");
                inner.lock_state().degraded_until = Some(Instant::now() + DEGRADED_RETRY);
            }
        }
    }
    inner.fallback_slots.fetch_add(u64::from(n), Ordering::Relaxed);
    inner.fallback.reserve(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_stable_short_and_reveal_nothing() {
        let a = key_fingerprint("sk_test_supersecret");
        assert_eq!(a, key_fingerprint("sk_test_supersecret"));
        assert_ne!(a, key_fingerprint("sk_test_supersecreu"));
        assert_eq!(a.len(), "sha256:".len() + 16);
        assert!(!a.contains("supersecret"));
    }

    #[test]
    fn the_default_lease_is_a_tenth_of_a_second_of_budget() {
        assert_eq!(default_lease_slots(25), 2);
        assert_eq!(default_lease_slots(100), 10);
        assert_eq!(default_lease_slots(5), 1);
        assert_eq!(default_lease_slots(100_000), 100);
    }
}
