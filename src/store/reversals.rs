//! Transfer reversals: money taken back from a recipient's connected account. Each is written as an intent (key
//! `splitpay:alloc:{salc}:reversal:{generation}:{seq}`) before Stripe is called, then retried with the same key on
//! a stored schedule (`next_attempt_at`) until Stripe makes it. A PENDING reversal is never dropped: the reversal
//! job, the refunds reconciler (overdue rows), `ops show` and `ops parked` all read this table.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::allocations::SplitAllocationRow;
use super::{corrupt, StoreError, Tx};
use crate::domain::ids::{reversal_idempotency_key, SplitAllocationId};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct ReversalRow {
    pub id: i64,
    pub split_allocation_id: String,
    pub generation: i32,
    pub seq: i32,
    pub stripe_transfer_id: String,
    pub amount_cents: i64,
    pub idempotency_key: String,
    /// PENDING (to be made or retried) or SUCCEEDED.
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub stripe_reversal_id: Option<String>,
    pub cause_refund_id: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub succeeded_at: Option<DateTime<Utc>>,
    /// Which key is sent: `idempotency_key` at 1, `{key}:k{n}` after (see [`ReversalRow::key`]).
    pub key_attempt: i32,
}

impl ReversalRow {
    /// The idempotency key the next request sends.
    pub fn key(&self) -> String {
        crate::domain::ids::attempt_key(&self.idempotency_key, self.key_attempt)
    }
}

/// Writes a reversal intent of `amount_cents` of the allocation's transfer, due now. Returns its id.
pub async fn insert_reversal(
    tx: &mut Tx<'_>,
    a: &SplitAllocationRow,
    amount_cents: i64,
    cause_refund_id: Option<i64>,
) -> Result<i64, StoreError> {
    let transfer = a
        .stripe_transfer_id
        .as_deref()
        .ok_or_else(|| StoreError::Invalid(format!("split allocation '{}' has no transfer to reverse", a.id)))?;
    let id = SplitAllocationId::parse(&a.id).map_err(|e| corrupt("split allocation", &a.id, e))?;
    let (seq,): (i32,) =
        sqlx::query_as("SELECT coalesce(max(seq), 0) + 1 FROM transfer_reversals WHERE split_allocation_id = $1")
            .bind(&a.id)
            .fetch_one(&mut **tx)
            .await?;
    let key = reversal_idempotency_key(&id, a.generation, seq);
    Ok(sqlx::query_scalar(
        "INSERT INTO transfer_reversals
            (split_allocation_id, generation, seq, stripe_transfer_id, amount_cents, idempotency_key, next_attempt_at,
             cause_refund_id)
         VALUES ($1, $2, $3, $4, $5, $6, now(), $7) RETURNING id",
    )
    .bind(&a.id)
    .bind(a.generation)
    .bind(seq)
    .bind(transfer)
    .bind(amount_cents)
    .bind(&key)
    .bind(cause_refund_id)
    .fetch_one(&mut **tx)
    .await?)
}

/// What reversals caused by `refund_id` take back from the allocation (made or still to be made).
pub async fn reversed_by_refund(conn: &mut PgConnection, refund_id: i64, allocation: &str) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar::<_, i64>(
        "SELECT coalesce(sum(amount_cents), 0)::bigint FROM transfer_reversals
          WHERE cause_refund_id = $1 AND split_allocation_id = $2",
    )
    .bind(refund_id)
    .bind(allocation)
    .fetch_one(conn)
    .await?)
}

pub async fn get_reversal(conn: &mut PgConnection, id: i64) -> Result<ReversalRow, StoreError> {
    sqlx::query_as::<_, ReversalRow>("SELECT * FROM transfer_reversals WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "transfer reversal",
            id: id.to_string(),
        })
}

/// Stripe made the reversal (or said the transfer is already fully reversed). A repeat changes nothing.
pub async fn record_reversal_success(
    conn: &mut PgConnection,
    id: i64,
    stripe_reversal_id: Option<&str>,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE transfer_reversals
            SET status = 'SUCCEEDED', succeeded_at = now(), next_attempt_at = NULL, stripe_reversal_id = $2,
                attempts = attempts + 1, failure_code = NULL, failure_message = NULL, updated_at = now()
          WHERE id = $1 AND status = 'PENDING'",
    )
    .bind(id)
    .bind(stripe_reversal_id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Stripe refused or did not answer: kept PENDING with what it said, tried again at `next_attempt_at`.
/// `saved_refusal_of`: the key attempt that Stripe answered with a saved, coded 4xx refusal; the row then moves to
/// the next key attempt, once (a late answer about an older attempt moves nothing). `None` (a timeout, a 5xx,
/// throttling) keeps the key.
pub async fn record_reversal_retry(
    conn: &mut PgConnection,
    id: i64,
    next_attempt_at: DateTime<Utc>,
    code: Option<&str>,
    message: &str,
    saved_refusal_of: Option<i32>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE transfer_reversals
            SET attempts = attempts + 1, next_attempt_at = $2, failure_code = $3, failure_message = $4,
                key_attempt = CASE WHEN key_attempt = $5 THEN key_attempt + 1 ELSE key_attempt END,
                updated_at = now()
          WHERE id = $1 AND status = 'PENDING'",
    )
    .bind(id)
    .bind(next_attempt_at)
    .bind(code)
    .bind(message)
    .bind(saved_refusal_of)
    .execute(conn)
    .await?;
    Ok(())
}

/// PENDING reversals due by now (oldest due first, bounded): the refunds reconciler drives them.
pub async fn due_reversals(conn: &mut PgConnection, limit: i64) -> Result<Vec<i64>, StoreError> {
    Ok(sqlx::query_scalar::<_, i64>(
        "SELECT id FROM transfer_reversals WHERE status = 'PENDING' AND next_attempt_at <= now()
          ORDER BY next_attempt_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

pub async fn reversals_for_payment(conn: &mut PgConnection, payment: &str) -> Result<Vec<ReversalRow>, StoreError> {
    Ok(sqlx::query_as::<_, ReversalRow>(
        "SELECT r.* FROM transfer_reversals r JOIN split_allocations a ON a.id = r.split_allocation_id
          WHERE a.split_payment_id = $1 ORDER BY r.id",
    )
    .bind(payment)
    .fetch_all(conn)
    .await?)
}

/// Reversals made for an `ops refund` whose refund Stripe then refused for good (review finding b): the money is
/// back on the platform's balance, but neither the recipient nor the donor has it. For `ops parked`, until an
/// operator decides (retry the share's transfer, or refund the donor another way).
pub async fn reversed_without_refund(conn: &mut PgConnection) -> Result<Vec<ReversalRow>, StoreError> {
    Ok(sqlx::query_as::<_, ReversalRow>(
        "SELECT t.* FROM transfer_reversals t JOIN refunds r ON r.id = t.cause_refund_id
          WHERE t.status = 'SUCCEEDED' AND r.status IN ('FAILED', 'CANCELED')
          ORDER BY t.succeeded_at LIMIT 1000",
    )
    .fetch_all(conn)
    .await?)
}

/// Every PENDING reversal (for `ops parked`): money still owed back by a recipient.
pub async fn pending_reversals(conn: &mut PgConnection) -> Result<Vec<ReversalRow>, StoreError> {
    Ok(sqlx::query_as::<_, ReversalRow>(
        "SELECT * FROM transfer_reversals WHERE status = 'PENDING' ORDER BY created_at LIMIT 1000",
    )
    .fetch_all(conn)
    .await?)
}
