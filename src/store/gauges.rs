//! The database side of splitpay's Prometheus gauges: what is open right now (payments and allocations not yet
//! final, parked money, unresolved transfers, waiting jobs, undelivered webhooks), read when `/metrics` is scraped.
//!
//! Each statement reads one partial index whose rows are the open work, never the history: final payments and
//! allocations, done jobs and delivered events pile up for ever and are not counted here (their flow is counted by
//! the transition counters instead). `tests/scale.rs` plans every statement with `EXPLAIN` on 200,000 payments.

use sqlx::PgConnection;

use super::StoreError;

/// Open payments by status: the two partial indexes that hold them, one for those reconcile-pending has not looked
/// at yet (`split_payments_unreconciled`) and one for those it paces (`split_payments_reconcile_due`).
pub const OPEN_PAYMENTS_SQL: &str = "SELECT status, sum(n)::bigint FROM (
            SELECT status, count(*) AS n FROM split_payments
             WHERE status IN ('CREATED', 'REQUIRES_PAYMENT', 'PROCESSING') AND next_reconcile_at IS NULL
             GROUP BY status
            UNION ALL
            SELECT status, count(*) FROM split_payments
             WHERE status IN ('CREATED', 'REQUIRES_PAYMENT', 'PROCESSING') AND next_reconcile_at IS NOT NULL
             GROUP BY status) open
          GROUP BY status";
/// Succeeded payments whose distribution has not started yet (`split_payments_undistributed`).
pub const UNDISTRIBUTED_PAYMENTS_SQL: &str =
    "SELECT count(*) FROM split_payments WHERE status = 'SUCCEEDED' AND distributed_at IS NULL";
/// Allocations waiting for or in a transfer, by status. TRANSFERRING from `split_allocations_transferring_due`.
/// PENDING has no index of its own: a share is PENDING only while its payment is open or succeeded but not yet
/// distributed (distribution moves every share on in one transaction; a failed or canceled payment voids them), so
/// the PENDING shares are found through those payments' partial indexes and `split_allocations_one_per_set_allocation`.
pub const OPEN_ALLOCATIONS_SQL: &str = "SELECT 'TRANSFERRING'::text, count(*) FROM split_allocations
          WHERE status = 'TRANSFERRING'
         UNION ALL
         SELECT 'PENDING'::text, count(*) FROM split_allocations a
          WHERE a.status = 'PENDING' AND a.split_payment_id IN (
                SELECT id FROM split_payments
                 WHERE status IN ('CREATED', 'REQUIRES_PAYMENT', 'PROCESSING') AND next_reconcile_at IS NULL
                UNION ALL
                SELECT id FROM split_payments
                 WHERE status IN ('CREATED', 'REQUIRES_PAYMENT', 'PROCESSING') AND next_reconcile_at IS NOT NULL
                UNION ALL
                SELECT id FROM split_payments WHERE status = 'SUCCEEDED' AND distributed_at IS NULL)";
/// Parked allocations and the net amount they hold, by currency (`split_allocations_parked`, then each parked row's
/// payment by primary key: a correlated lookup, so a long parked list never turns into a hash join over every
/// payment).
pub const PARKED_SQL: &str = "SELECT currency, count(*), coalesce(sum(net_amount_cents), 0)::bigint FROM (
            SELECT (SELECT p.currency FROM split_payments p WHERE p.id = a.split_payment_id) AS currency,
                   a.net_amount_cents
              FROM split_allocations a WHERE a.status = 'PARKED') parked
          GROUP BY currency";
/// TRANSFERRING allocations whose outcome is still unknown after the retry window (`split_allocations_unresolved`).
pub const UNRESOLVED_SQL: &str = crate::jobs::reconcile::UNRESOLVED_COUNT_SQL;
/// Waiting jobs per queue (`$1`: the queue names), and how long the oldest due one has waited, in seconds
/// (`splitpay_jobs_waiting_payload`). Waiting: pending, fetched by a worker but not started (`Queued`), or failed
/// with attempts left. A job scheduled for later is waiting but not due.
pub const JOB_QUEUES_SQL: &str = "SELECT job_type, count(*),
            coalesce(extract(epoch FROM now() - min(run_at) FILTER (WHERE run_at <= now())), 0)::float8
           FROM apalis.jobs
          WHERE status IN ('Pending', 'Queued', 'Failed') AND (status <> 'Failed' OR attempts < max_attempts)
            AND job_type = ANY($1)
          GROUP BY job_type";
/// Webhook deliveries not finished (pending or being delivered), and the age in seconds of the oldest
/// (`webhook_deliveries_open`).
pub const OPEN_DELIVERIES_SQL: &str = "SELECT count(*) FILTER (WHERE status = 'pending'),
            count(*) FILTER (WHERE status = 'delivering'),
            coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
           FROM webhook_deliveries WHERE status IN ('pending', 'delivering')";
/// Webhook deliveries that used up their attempts (`webhook_deliveries_failed`): each waits for an operator's
/// `ops redeliver`.
pub const FAILED_DELIVERIES_SQL: &str = "SELECT count(*) FROM webhook_deliveries WHERE status = 'failed'";

/// One reading of the open work.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OpenWork {
    /// (status, count) for CREATED, REQUIRES_PAYMENT and PROCESSING; statuses with none are absent.
    pub payments: Vec<(String, i64)>,
    pub payments_undistributed: i64,
    /// (status, count) for PENDING and TRANSFERRING.
    pub allocations: Vec<(String, i64)>,
    /// (currency, count, net amount in minor units).
    pub parked: Vec<(String, i64, i64)>,
    pub unresolved: i64,
    /// (queue, waiting jobs, seconds the oldest due job has waited).
    pub queues: Vec<(String, i64, f64)>,
    pub deliveries_pending: i64,
    pub deliveries_delivering: i64,
    pub delivery_oldest_age_seconds: f64,
    pub deliveries_failed: i64,
}

/// Reads the open work: eight small statements on one connection.
pub async fn open_work(conn: &mut PgConnection, queues: &[&str]) -> Result<OpenWork, StoreError> {
    let payments = sqlx::query_as(OPEN_PAYMENTS_SQL).fetch_all(&mut *conn).await?;
    let (payments_undistributed,) = sqlx::query_as(UNDISTRIBUTED_PAYMENTS_SQL).fetch_one(&mut *conn).await?;
    let allocations = sqlx::query_as(OPEN_ALLOCATIONS_SQL).fetch_all(&mut *conn).await?;
    let parked = sqlx::query_as(PARKED_SQL).fetch_all(&mut *conn).await?;
    let (unresolved,) = sqlx::query_as(UNRESOLVED_SQL).fetch_one(&mut *conn).await?;
    let queues = sqlx::query_as(JOB_QUEUES_SQL)
        .bind(queues)
        .fetch_all(&mut *conn)
        .await?;
    let (deliveries_pending, deliveries_delivering, delivery_oldest_age_seconds) =
        sqlx::query_as(OPEN_DELIVERIES_SQL).fetch_one(&mut *conn).await?;
    let (deliveries_failed,) = sqlx::query_as(FAILED_DELIVERIES_SQL).fetch_one(&mut *conn).await?;
    Ok(OpenWork {
        payments,
        payments_undistributed,
        allocations,
        parked,
        unresolved,
        queues,
        deliveries_pending,
        deliveries_delivering,
        delivery_oldest_age_seconds,
        deliveries_failed,
    })
}
