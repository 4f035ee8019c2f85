//! The sweeper: re-enqueues ready work whose job was lost — an inbox event never processed, a succeeded payment
//! whose distribution is not under way, an allocation whose transfer is due, a webhook delivery due. Jobs are nudges
//! and the handlers are idempotent, so a redundant nudge costs one no-op run; a missing one would leave money unmoved.
//! A webhook delivery whose claim expired is not re-enqueued but ended with its outcome unknown (see
//! `jobs::deliver`): it may have got a 2xx, so only an operator sends it again.

use std::time::Duration;

use sqlx::PgPool;

use super::queue::{enqueue_missing, Queue};
use crate::store::StoreError;

/// Work younger than this is left alone: its own job is most likely still on its way.
pub const SWEEP_GRACE_SECS: i64 = 60;
/// Rows re-enqueued per kind and sweep; the next sweep takes the rest.
pub const SWEEP_BATCH_MAX: i64 = 500;

// The sweep's statements, public so `tests/scale.rs` can `EXPLAIN` exactly what runs. Each is one index range scan
// (see migrations): `$1` is the grace in seconds (float8), `$2` the batch size.

/// Inbox events never processed, oldest first (`stripe_events_unprocessed`).
pub const SWEEP_EVENTS_SQL: &str = "SELECT id FROM stripe_events
          WHERE processed_at IS NULL AND received_at < now() - make_interval(secs => $1)
          ORDER BY received_at LIMIT $2";
/// Succeeded payments whose distribution has not started (`split_payments_undistributed`).
pub const SWEEP_PAYMENTS_SQL: &str = "SELECT id FROM split_payments
          WHERE status = 'SUCCEEDED' AND distributed_at IS NULL
            AND succeeded_at < now() - make_interval(secs => $1)
            AND coalesce(distribution_next_attempt_at, succeeded_at) < now() - make_interval(secs => $1)
          ORDER BY succeeded_at LIMIT $2";
/// TRANSFERRING allocations by due time (`split_allocations_transferring_due`).
pub const SWEEP_ALLOCATIONS_SQL: &str = "SELECT id FROM split_allocations
          WHERE status = 'TRANSFERRING' AND next_attempt_at < now() - make_interval(secs => $1)
          ORDER BY next_attempt_at LIMIT $2";

/// Webhook deliveries pending past their time on enabled endpoints, by due time (`webhook_deliveries_open`).
pub const SWEEP_DELIVERIES_SQL: &str = "SELECT d.id FROM webhook_deliveries d
           JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.disabled_at IS NULL
          WHERE d.status IN ('pending', 'delivering') AND d.next_attempt_at < now() - make_interval(secs => $1)
            AND d.status = 'pending'
          ORDER BY d.next_attempt_at LIMIT $2";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub stripe_events: usize,
    pub distributions: usize,
    pub transfers: usize,
    pub deliveries: usize,
    /// Webhook deliveries whose claim expired, ended `failed` with their outcome unknown (not re-enqueued).
    pub deliveries_ended: usize,
}

/// One sweep, in one transaction (the jobs exist if and only if it commits). `grace_secs` is
/// [`SWEEP_GRACE_SECS`] in production.
pub async fn sweep(pool: &PgPool, grace_secs: i64) -> Result<SweepReport, StoreError> {
    let mut tx = pool.begin().await?;
    let events: Vec<(String,)> = sqlx::query_as(SWEEP_EVENTS_SQL)
        .bind(grace_secs as f64)
        .bind(SWEEP_BATCH_MAX)
        .fetch_all(&mut *tx)
        .await?;
    let payments: Vec<(String,)> = sqlx::query_as(SWEEP_PAYMENTS_SQL)
        .bind(grace_secs as f64)
        .bind(SWEEP_BATCH_MAX)
        .fetch_all(&mut *tx)
        .await?;
    let allocations: Vec<(String,)> = sqlx::query_as(SWEEP_ALLOCATIONS_SQL)
        .bind(grace_secs as f64)
        .bind(SWEEP_BATCH_MAX)
        .fetch_all(&mut *tx)
        .await?;
    let deliveries: Vec<(String,)> = sqlx::query_as(SWEEP_DELIVERIES_SQL)
        .bind(grace_secs as f64)
        .bind(SWEEP_BATCH_MAX)
        .fetch_all(&mut *tx)
        .await?;
    let ended = crate::store::webhooks::end_expired_claims(&mut tx, None, grace_secs, SWEEP_BATCH_MAX).await?;
    let ids = |rows: Vec<(String,)>| rows.into_iter().map(|(id,)| id).collect::<Vec<_>>();
    // Only work with no job waiting gets one: a sweep never adds a second.
    let events = enqueue_missing(&mut tx, Queue::StripeEvent, &ids(events)).await?;
    let payments = enqueue_missing(&mut tx, Queue::Distribute, &ids(payments)).await?;
    let allocations = enqueue_missing(&mut tx, Queue::Transfer, &ids(allocations)).await?;
    let deliveries = enqueue_missing(&mut tx, Queue::Deliver, &ids(deliveries)).await?;
    tx.commit().await?;
    let report = SweepReport {
        stripe_events: events.len(),
        distributions: payments.len(),
        transfers: allocations.len(),
        deliveries: deliveries.len(),
        deliveries_ended: ended.len(),
    };
    if report != SweepReport::default() {
        tracing::warn!(?report, "sweeper re-enqueued work whose job was lost");
        metrics::counter!("splitpay_sweeper_requeued_total")
            .increment((events.len() + payments.len() + allocations.len() + deliveries.len()) as u64);
    }
    Ok(report)
}

/// How long a sweep may take before the next tick is considered (bounds a stuck database call).
pub const SWEEP_TIMEOUT: Duration = Duration::from_secs(30);
