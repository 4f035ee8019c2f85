//! The shared Stripe rate budget (`stripe_rate_limits`): one row per Stripe key fingerprint, a GCRA "theoretical
//! arrival time" that every replica advances when it reserves a batch of request slots, and the 429 slow-down that
//! every replica reads. Times are the database's clock, in microseconds, so replicas on different hosts agree.

use sqlx::PgPool;

use super::StoreError;

/// The database's clock in microseconds since the Unix epoch (`clock_timestamp()`: the time of the statement, not of
/// its transaction).
const NOW_US: &str = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint";

/// The rate in force recovers this many permille of the configured rate per second after a 429 (from half to
/// full in 5 s).
pub const RECOVERY_PERMILLE_PER_SEC: i64 = 100;
/// A 429 never slows the budget below this share (1/16 of the configured rate).
pub const SCALE_PERMILLE_MIN: i64 = 62;
/// 429s closer together than this halve the rate once: the requests already in flight when Stripe started refusing
/// all come back 429 together, and they are one signal, not several.
pub const THROTTLE_DEBOUNCE_US: i64 = 1_000_000;

/// A batch of slots, as the database granted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// The row's arrival time after this batch: the last slot is `tat_after_us - interval_us`.
    pub tat_after_us: i64,
    /// The database's clock when it granted the batch.
    pub now_us: i64,
    /// The spacing of the slots: the configured interval stretched by a 429 slow-down still in force.
    pub interval_us: i64,
}

/// The interval in force, as SQL over the row `r` and the clock `c`: the configured interval (`$3`, µs) divided by
/// the recovered scale (`$4` = recovery permille per second).
const INTERVAL_IN_FORCE: &str = "($3::bigint * 1000 / LEAST(1000::bigint, r.scale_permille \
     + (c.now_us - r.throttled_at_us) * $4::bigint / 1000000))";

/// Reserves `slots` consecutive slots `interval_us` apart (stretched while a 429 slow-down is in force) for the key
/// `account_fingerprint`, creating its row on first use. One UPDATE … RETURNING on one row: concurrent reservations
/// queue on the row lock and never share a slot.
pub async fn reserve(
    pool: &PgPool,
    account_fingerprint: &str,
    slots: u32,
    interval_us: i64,
) -> Result<Reservation, StoreError> {
    assert!(
        slots >= 1 && interval_us >= 1,
        "a reservation takes at least one slot of positive length"
    );
    let update = format!(
        "WITH c AS (SELECT {NOW_US} AS now_us)
         UPDATE stripe_rate_limits r
            SET tat_us = GREATEST(r.tat_us, c.now_us) + $2::bigint * {INTERVAL_IN_FORCE}
           FROM c
          WHERE r.account_fingerprint = $1
         RETURNING r.tat_us, c.now_us, {INTERVAL_IN_FORCE} AS interval_us"
    );
    for _ in 0..2 {
        let row: Option<(i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(update.clone()))
            .bind(account_fingerprint)
            .bind(i64::from(slots))
            .bind(interval_us)
            .bind(RECOVERY_PERMILLE_PER_SEC)
            .fetch_optional(pool)
            .await?;
        if let Some((tat_after_us, now_us, interval_us)) = row {
            return Ok(Reservation {
                tat_after_us,
                now_us,
                interval_us,
            });
        }
        // First use of this key: start its row (idle, full budget), then reserve.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO stripe_rate_limits (account_fingerprint, tat_us) VALUES ($1, {NOW_US})
             ON CONFLICT (account_fingerprint) DO NOTHING"
        )))
        .bind(account_fingerprint)
        .execute(pool)
        .await?;
    }
    Err(super::corrupt(
        "stripe_rate_limits",
        account_fingerprint,
        "the row vanished between its insert and the reservation",
    ))
}

/// Records a 429 from Stripe for every replica: halves the rate in force (not below [`SCALE_PERMILLE_MIN`]) and
/// pushes the next free slot at least `pause_us` past now. Returns the new scale in permille, or `None` when a 429
/// within [`THROTTLE_DEBOUNCE_US`] already did (or the key has no row yet).
pub async fn record_throttle(
    pool: &PgPool,
    account_fingerprint: &str,
    pause_us: i64,
) -> Result<Option<i64>, StoreError> {
    let scale: Option<(i32,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH c AS (SELECT {NOW_US} AS now_us)
         UPDATE stripe_rate_limits r
            SET scale_permille = GREATEST($3::bigint, LEAST(1000::bigint, r.scale_permille
                                   + (c.now_us - r.throttled_at_us) * $4::bigint / 1000000) / 2),
                throttled_at_us = c.now_us,
                tat_us = GREATEST(r.tat_us, c.now_us + $2::bigint),
                throttles_total = r.throttles_total + 1
           FROM c
          WHERE r.account_fingerprint = $1 AND c.now_us - r.throttled_at_us >= $5::bigint
         RETURNING r.scale_permille"
    )))
    .bind(account_fingerprint)
    .bind(pause_us.max(0))
    .bind(SCALE_PERMILLE_MIN)
    .bind(RECOVERY_PERMILLE_PER_SEC)
    .bind(THROTTLE_DEBOUNCE_US)
    .fetch_optional(pool)
    .await?;
    Ok(scale.map(|(s,)| i64::from(s)))
}

/// The row of a key, for tests and operators: (tat_us, scale_permille, throttles_total).
pub async fn row(pool: &PgPool, account_fingerprint: &str) -> Result<Option<(i64, i32, i64)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT tat_us, scale_permille, throttles_total FROM stripe_rate_limits WHERE account_fingerprint = $1",
    )
    .bind(account_fingerprint)
    .fetch_optional(pool)
    .await?)
}
