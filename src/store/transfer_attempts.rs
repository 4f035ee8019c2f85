//! Transfer generations and their attempts: the retries recorded while an allocation stays TRANSFERRING, the
//! frozen parameters of each generation, and the discrepancies found at Stripe that match no current generation.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::StoreError;
use crate::domain::ids::SplitAllocationId;

/// How a transfer attempt that will be retried with the same key failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryKind {
    /// Stripe throttled us (429, 409 key in flight): consumes nothing, the backoff does not grow.
    Throttled,
    /// A retryable failure or an unknown outcome: counted, the backoff grows.
    Failed,
}

/// A failed attempt at an allocation's transfer that will be retried with the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRetry<'a> {
    /// The generation the attempt was of: a row that moved on meanwhile is left alone (`LostRace`).
    pub generation: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub kind: RetryKind,
    /// The retry window ended without a proof either way: shown to operators, still retried.
    pub unresolved: bool,
    pub failure_code: Option<&'a str>,
    pub failure_message: &'a str,
}

/// Records a failed attempt at an allocation's transfer that will be retried with the same key: not a state
/// change (the allocation stays TRANSFERRING), so it does not go through the state machine.
pub async fn record_transfer_retry(
    conn: &mut PgConnection,
    id: &SplitAllocationId,
    retry: &TransferRetry<'_>,
) -> Result<i32, StoreError> {
    let (attempts,): (i32,) = sqlx::query_as(
        "UPDATE split_allocations
            SET attempts = attempts + CASE WHEN $3 THEN 1 ELSE 0 END,
                next_attempt_at = $4, failure_code = $5, failure_message = $6,
                unresolved_at = CASE WHEN $7 THEN coalesce(unresolved_at, now()) ELSE unresolved_at END,
                updated_at = now()
          WHERE id = $1 AND status = 'TRANSFERRING' AND generation = $2
         RETURNING attempts",
    )
    .bind(id.as_str())
    .bind(retry.generation)
    .bind(retry.kind == RetryKind::Failed)
    .bind(retry.next_attempt_at)
    .bind(retry.failure_code)
    .bind(retry.failure_message)
    .bind(retry.unresolved)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| StoreError::LostRace {
        what: "split allocation",
        id: id.to_string(),
        expected: format!("TRANSFERRING at generation {}", retry.generation),
    })?;
    Ok(attempts)
}

/// One transfer generation as it was frozen when it started: every attempt of the generation sends exactly this.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TransferAttemptRow {
    pub split_allocation_id: String,
    pub generation: i32,
    pub idempotency_key: String,
    pub destination_account_id: String,
    pub amount_cents: i64,
    pub currency: String,
    pub source_transaction: Option<String>,
    pub transfer_group: String,
    pub metadata: sqlx::types::Json<std::collections::BTreeMap<String, String>>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: Option<String>,
    pub stripe_transfer_id: Option<String>,
    /// Which key is sent: `idempotency_key` at 1, `{key}:k{n}` after a saved refusal ([`TransferAttemptRow::key`]).
    pub key_attempt: i32,
}

impl TransferAttemptRow {
    /// The idempotency key the next request of this generation sends.
    pub fn key(&self) -> String {
        crate::domain::ids::attempt_key(&self.idempotency_key, self.key_attempt)
    }
}

/// Stripe answered key attempt `refused` of the generation with a saved, coded 4xx refusal (e.g. the platform's
/// available balance was short) that it would replay for that key: the generation moves to its next key attempt,
/// once. Nothing was transferred under the refused key.
pub async fn next_transfer_key_attempt(
    conn: &mut PgConnection,
    id: &SplitAllocationId,
    generation: i32,
    refused: i32,
) -> Result<bool, StoreError> {
    let moved = sqlx::query(
        "UPDATE transfer_attempts SET key_attempt = key_attempt + 1
          WHERE split_allocation_id = $1 AND generation = $2 AND key_attempt = $3 AND outcome IS NULL",
    )
    .bind(id.as_str())
    .bind(generation)
    .bind(refused)
    .execute(conn)
    .await?;
    Ok(moved.rows_affected() == 1)
}

pub async fn get_transfer_attempt(
    conn: &mut PgConnection,
    id: &SplitAllocationId,
    generation: i32,
) -> Result<TransferAttemptRow, StoreError> {
    sqlx::query_as::<_, TransferAttemptRow>(
        "SELECT split_allocation_id, generation, idempotency_key, destination_account_id, amount_cents, currency,
                source_transaction, transfer_group, metadata, started_at, finished_at, outcome, stripe_transfer_id,
                key_attempt
           FROM transfer_attempts WHERE split_allocation_id = $1 AND generation = $2",
    )
    .bind(id.as_str())
    .bind(generation)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| StoreError::NotFound {
        what: "transfer attempt",
        id: format!("{id} generation {generation}"),
    })
}

/// Records what the transfer audit (or a transfer job) found at Stripe and could not match to an allocation's
/// current generation: logged, counted, kept for operators. Once per Stripe transfer.
pub async fn record_discrepancy(
    conn: &mut PgConnection,
    split_payment_id: &str,
    split_allocation_id: Option<&str>,
    stripe_transfer_id: &str,
    amount_cents: i64,
    kind: &str,
    detail: &str,
) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO transfer_discrepancies
            (split_payment_id, split_allocation_id, stripe_transfer_id, amount_cents, kind, detail)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT ON CONSTRAINT transfer_discrepancies_once DO NOTHING",
    )
    .bind(split_payment_id)
    .bind(split_allocation_id)
    .bind(stripe_transfer_id)
    .bind(amount_cents)
    .bind(kind)
    .bind(detail)
    .execute(conn)
    .await?;
    let new = inserted.rows_affected() == 1;
    if new {
        tracing::error!(
            split_payment_id,
            stripe_transfer_id,
            amount_cents,
            kind,
            detail,
            "transfer discrepancy found at Stripe"
        );
        metrics::counter!("splitpay_transfer_discrepancies_total", "kind" => kind.to_owned()).increment(1);
    }
    Ok(new)
}
