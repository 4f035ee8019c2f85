//! Transfer reversals: money taken back from a recipient's connected account. Each is written as an intent (key
//! `splitpay:alloc:{salc}:reversal:{generation}:{seq}`) before Stripe is called, then retried with the same key on
//! a stored schedule (`next_attempt_at`) until Stripe makes it. A PENDING reversal is never dropped: the reversal
//! job, the refunds reconciler (overdue rows), `ops show` and `ops parked` all read this table.
//!
//! The only way out other than SUCCEEDED is CANCELED, when the refund that asked for it no longer stands (a won
//! dispute): at once when no request of the row can have been applied ([`ReversalRow::in_doubt_since`] is NULL),
//! otherwise after a lookup at Stripe proved it was not made ([`request_cancel`], settled by the reversal job).
//!
//! A reversal made for a refund that then no longer stands (an "orphan": Stripe failed the refund, a dispute closed
//! the `ops refund` intent) holds the recipient's money on the platform. It is taken by the share's next refund
//! ([`adopt_reversals`]: a part that booked it as loss, a new part, or `ops refund` run again); a part uses of it
//! only what the policy has the recipient bear, and the rest goes back to the recipient in the same transaction.

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
    /// Set (to the time of the latest send) before each request is sent, cleared when Stripe answers with a saved
    /// refusal: NULL means no request of this row can have been applied at Stripe; otherwise no request can still
    /// be in flight [`REVERSAL_IN_FLIGHT_MARGIN_SECS`] after it.
    pub in_doubt_since: Option<DateTime<Utc>>,
    /// The refund that asked for it no longer stands, and a request may have been applied: never sent again;
    /// settled by a lookup at Stripe.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub canceled_at: Option<DateTime<Utc>>,
    /// The request carries [`crate::stripe::REVERSAL_REF_KEY`] in its metadata (rows written since that was so).
    pub sends_metadata: bool,
    /// Made for this refund, which then no longer stood; `cause_refund_id` names the later refund that took it
    /// ([`adopt_reversals`]).
    pub adopted_from_refund_id: Option<i64>,
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

/// What reversals caused by `refund_id` take back from the allocation (made or still to be made; not canceled).
pub async fn reversed_by_refund(conn: &mut PgConnection, refund_id: i64, allocation: &str) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar::<_, i64>(
        "SELECT coalesce(sum(amount_cents), 0)::bigint FROM transfer_reversals
          WHERE cause_refund_id = $1 AND split_allocation_id = $2 AND status <> 'CANCELED'",
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

/// Marks a request under key attempt `key_attempt` about to be sent: the row is in doubt until Stripe answers with
/// a saved refusal. Returns false (send nothing) when the row is no longer PENDING, its cancel was requested
/// meanwhile, or it moved to another key attempt (the caller read it before: the scheduled attempt will come).
pub async fn claim_reversal(conn: &mut PgConnection, id: i64, key_attempt: i32) -> Result<bool, StoreError> {
    // The latest claim's time, not the first's: a cancel waits out the margin after the last request sent (review
    // F1: a retry an hour after the first send could still be in flight when the cancel was settled).
    let claimed = sqlx::query(
        "UPDATE transfer_reversals SET in_doubt_since = now(), updated_at = now()
          WHERE id = $1 AND status = 'PENDING' AND cancel_requested_at IS NULL AND key_attempt = $2",
    )
    .bind(id)
    .bind(key_attempt)
    .execute(conn)
    .await?;
    Ok(claimed.rows_affected() == 1)
}

/// A request of a reversal may be in flight this long after it was claimed (the gateway's attempts and backoff
/// included): a lookup that settles a cancel waits until then, so it cannot miss a request still on its way.
pub const REVERSAL_IN_FLIGHT_MARGIN_SECS: i64 = 600;

/// The refund that asked for these reversals no longer stands (a won dispute): each PENDING one is canceled at once
/// if no request of it can have been applied, or else marked for a lookup at Stripe (due when no request can still
/// be in flight). Returns the number canceled at once and the number left to a lookup.
pub async fn request_cancel(tx: &mut super::Tx<'_>, refund_id: i64) -> Result<(u64, u64), StoreError> {
    let canceled = sqlx::query(
        "UPDATE transfer_reversals
            SET status = 'CANCELED', canceled_at = now(), next_attempt_at = NULL, updated_at = now()
          WHERE cause_refund_id = $1 AND status = 'PENDING' AND in_doubt_since IS NULL",
    )
    .bind(refund_id)
    .execute(&mut **tx)
    .await?;
    let requested = sqlx::query(
        "UPDATE transfer_reversals
            SET cancel_requested_at = coalesce(cancel_requested_at, now()),
                next_attempt_at = in_doubt_since + make_interval(secs => $2), updated_at = now()
          WHERE cause_refund_id = $1 AND status = 'PENDING'",
    )
    .bind(refund_id)
    .bind(REVERSAL_IN_FLIGHT_MARGIN_SECS as f64)
    .execute(&mut **tx)
    .await?;
    Ok((canceled.rows_affected(), requested.rows_affected()))
}

/// A lookup at Stripe proved the reversal was not made (or nothing was ever sent): CANCELED, never sent again.
pub async fn record_reversal_canceled(conn: &mut PgConnection, id: i64) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE transfer_reversals
            SET status = 'CANCELED', canceled_at = now(), next_attempt_at = NULL, updated_at = now()
          WHERE id = $1 AND status = 'PENDING' AND cancel_requested_at IS NOT NULL",
    )
    .bind(id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A cancel waits for its lookup: tried again at `next_attempt_at` (the lookup failed, or a request may still be
/// in flight).
pub async fn postpone_cancel(
    conn: &mut PgConnection,
    id: i64,
    next_attempt_at: DateTime<Utc>,
    message: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE transfer_reversals SET next_attempt_at = $2, failure_message = $3, updated_at = now()
          WHERE id = $1 AND status = 'PENDING'",
    )
    .bind(id)
    .bind(next_attempt_at)
    .bind(message)
    .execute(conn)
    .await?;
    Ok(())
}

/// Stripe made the reversal (or said the transfer is already fully reversed). A repeat changes nothing. Stripe's
/// word wins: a reversal canceled meanwhile is recorded too (its caller then sends the share what it is owed).
pub async fn record_reversal_success(
    conn: &mut PgConnection,
    id: i64,
    stripe_reversal_id: Option<&str>,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE transfer_reversals
            SET status = 'SUCCEEDED', succeeded_at = now(), next_attempt_at = NULL, stripe_reversal_id = $2,
                attempts = attempts + 1, failure_code = NULL, failure_message = NULL, in_doubt_since = NULL,
                canceled_at = NULL, updated_at = now()
          WHERE id = $1 AND status IN ('PENDING', 'CANCELED')",
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
            SET attempts = attempts + 1, failure_code = $3, failure_message = $4,
                -- A row whose cancel waits for its lookup, now proven not made (a saved refusal of its current key,
                -- which no request can follow): CANCELED at once.
                status = CASE WHEN key_attempt = $5 AND cancel_requested_at IS NOT NULL THEN 'CANCELED' ELSE status END,
                canceled_at = CASE WHEN key_attempt = $5 AND cancel_requested_at IS NOT NULL THEN now() END,
                next_attempt_at = CASE WHEN key_attempt = $5 AND cancel_requested_at IS NOT NULL THEN NULL ELSE $2 END,
                key_attempt = CASE WHEN key_attempt = $5 THEN key_attempt + 1 ELSE key_attempt END,
                -- A saved refusal of the current key: nothing was applied under it (nor under any earlier key,
                -- each of which moved on the same way), so the row is no longer in doubt.
                in_doubt_since = CASE WHEN key_attempt = $5 THEN NULL ELSE in_doubt_since END,
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
/// back on the platform's balance, but neither the recipient nor the donor has it. For `ops parked`, until `ops
/// refund` is run again (it reuses the reversal) or the share's next refund or dispute takes it
/// ([`orphaned_reversals`]; what that part does not use goes back to the recipient). Only reversals of the share's
/// current generation: a later generation (a won dispute's) was sent what the share was owed counting every
/// reversal made before it, so an earlier generation's reversal went back to the recipient (and `ops refund` would
/// not reuse it: it reverses the current transfer anew).
pub async fn reversed_without_refund(conn: &mut PgConnection) -> Result<Vec<ReversalRow>, StoreError> {
    Ok(sqlx::query_as::<_, ReversalRow>(
        "SELECT t.* FROM transfer_reversals t JOIN refunds r ON r.id = t.cause_refund_id
           JOIN split_allocations a ON a.id = t.split_allocation_id AND a.generation = t.generation
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

/// `ops refund` intents whose reversal was made (by the command or, later, by the reversal job) but whose refund was
/// never sent (review F6: the command stopped, or its reversal was made in the background after it returned). The
/// money is on the platform's balance until an operator runs the command again; for `ops parked`. Intents
/// younger than `grace_secs` are skipped: their command may still be running.
pub async fn reversed_refund_not_sent(
    conn: &mut PgConnection,
    grace_secs: i64,
) -> Result<Vec<ReversalRow>, StoreError> {
    Ok(sqlx::query_as::<_, ReversalRow>(
        "SELECT t.* FROM transfer_reversals t JOIN refunds r ON r.id = t.cause_refund_id
          WHERE t.status = 'SUCCEEDED' AND r.source = 'ops' AND r.status = 'REQUESTED'
            AND r.created_at <= now() - make_interval(secs => $1)
          ORDER BY t.succeeded_at LIMIT 1000",
    )
    .bind(grace_secs as f64)
    .fetch_all(conn)
    .await?)
}

/// Whether a reversal of the allocation's current transfer has its cancel requested while a request of it may
/// have been applied at Stripe (review H1). Until its lookup settles it, nobody can tell whether that money is
/// still the recipient's, so a new refund's part of this share waits: reversing it again could take the same money
/// twice, and booking it as lost could be wrong the other way.
pub async fn cancel_in_doubt(conn: &mut PgConnection, a: &SplitAllocationRow) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM transfer_reversals
                         WHERE split_allocation_id = $1 AND stripe_transfer_id = $2 AND status = 'PENDING'
                           AND cancel_requested_at IS NOT NULL AND in_doubt_since IS NOT NULL)",
    )
    .bind(&a.id)
    .bind(a.stripe_transfer_id.as_deref().unwrap_or(""))
    .fetch_one(conn)
    .await?)
}

/// Reversals of the allocation's current transfer that were made for a refund that no longer stands (FAILED or
/// CANCELED: an `ops refund` intent a dispute closed, a refund Stripe failed): `(id, amount_cents)`, oldest first,
/// locked. Their money is on the platform's balance and is the recipient's; a later refund of the share takes them
/// ([`adopt_reversals`]), using what the policy has the recipient bear and giving the rest back to the recipient
/// (a new generation), whatever their size against that refund's part.
pub async fn orphaned_reversals(
    conn: &mut PgConnection,
    a: &SplitAllocationRow,
) -> Result<Vec<(i64, i64)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT t.id, t.amount_cents FROM transfer_reversals t JOIN refunds r ON r.id = t.cause_refund_id
          WHERE t.split_allocation_id = $1 AND t.stripe_transfer_id = $2 AND t.status = 'SUCCEEDED'
            AND r.status IN ('FAILED', 'CANCELED')
          ORDER BY t.id FOR UPDATE OF t",
    )
    .bind(&a.id)
    .bind(a.stripe_transfer_id.as_deref().unwrap_or(""))
    .fetch_all(conn)
    .await?)
}

/// The reversals `ids` now belong to `refund_id` (review M1): their money, already off the recipient, is what that
/// refund takes back, so the transfer is not reversed for it a second time and no loss is booked for it; what its
/// part does not use of them is given back to the recipient by the caller. Only rows still made for a refund that
/// no longer stands move: a row another refund took meanwhile stays its. Returns how many moved, for the caller to
/// compare with what it read (under the share's lock they are the same; otherwise the caller's plan is stale).
pub async fn adopt_reversals(tx: &mut Tx<'_>, ids: &[i64], refund_id: i64) -> Result<u64, StoreError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let moved = sqlx::query(
        "UPDATE transfer_reversals t
            SET adopted_from_refund_id = t.cause_refund_id, cause_refund_id = $2, updated_at = now()
           FROM refunds r
          WHERE t.id = ANY($1) AND t.status = 'SUCCEEDED' AND r.id = t.cause_refund_id
            AND r.status IN ('FAILED', 'CANCELED')",
    )
    .bind(ids)
    .bind(refund_id)
    .execute(&mut **tx)
    .await?;
    Ok(moved.rows_affected())
}

/// Whether a reversal of the allocation was made for a refund Stripe has not settled (an `ops refund` intent not
/// answered yet, a refund still pending). Its money is on the platform's balance, and what the share is owed
/// ([`super::refunds::outstanding_cents`]) counts it, but it is neither the recipient's nor the donor's yet: if that
/// refund succeeds the reversal is its, and if it fails the reversal is left over. Nothing may send the share what
/// it is owed meanwhile (it would be paid twice if that refund succeeds).
pub async fn held_for_unsettled_refund(conn: &mut PgConnection, allocation: &str) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM transfer_reversals t JOIN refunds r ON r.id = t.cause_refund_id
                         WHERE t.split_allocation_id = $1 AND t.status = 'SUCCEEDED'
                           AND r.status IN ('REQUESTED', 'PENDING'))",
    )
    .bind(allocation)
    .fetch_one(conn)
    .await?)
}

/// A refund that failed (or was canceled) after its reversals were made leaves their money on the platform. A
/// refund of the same share covered meanwhile may have booked that share as the platform's loss, because the
/// failed refund's reversal still held the transfer (review, stop 20: a dispute covered while an ops refund was
/// pending, the refund failing after). For each share the failed refund reversed (its current transfer, settled),
/// its orphans (this refund's and any earlier one's still orphaned) are taken as [`super::refunds`] takes them at
/// cover time, whatever their size against the parts: the first standing covered parts of the share that booked
/// loss turn their loss into reversal up to what the policy has the recipient bear (its share of the part under
/// `proportional`, nothing under `none`), the first of them (the first with loss if none used any) adopts the
/// orphans ([`adopt_reversals`]), and the money no part uses goes back to the recipient as a new generation
/// (`excess_reversal_returned`, sending what the share is owed, [`super::refunds::outstanding_cents`]). Nothing
/// is reversed anew. A share with no such part, or whose excess would be sent while a reversal of it belongs to a
/// refund Stripe has not settled (it would be paid twice if that refund succeeds), keeps its orphans: `ops parked`
/// lists them until the share's next refund part takes them or a later rehome of the share does. Returns what the
/// caller enqueues in the same transaction. The caller locks the payment's shares first; each share is locked
/// (again) before its parts and reversals.
pub async fn rehome_reversals_of(
    tx: &mut Tx<'_>,
    refund_id: i64,
    policy: crate::app::ReversePolicy,
) -> Result<super::refunds::Covered, StoreError> {
    use crate::domain::refund_split::net_of;
    use crate::domain::state::AllocationStatus;

    let shares: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT t.split_allocation_id
           FROM transfer_reversals t JOIN refunds r ON r.id = t.cause_refund_id
          WHERE t.cause_refund_id = $1 AND t.status = 'SUCCEEDED' AND r.status IN ('FAILED', 'CANCELED')
          ORDER BY 1",
    )
    .bind(refund_id)
    .fetch_all(&mut **tx)
    .await?;
    let mut covered = super::refunds::Covered::default();
    for allocation in shares {
        let a = sqlx::query_as::<_, SplitAllocationRow>("SELECT * FROM split_allocations WHERE id = $1 FOR UPDATE")
            .bind(&allocation)
            .fetch_one(&mut **tx)
            .await?;
        // Only a settled transfer's orphans: a share in flight or ended otherwise is left to its next refund part.
        if a.status != AllocationStatus::Transferred || cancel_in_doubt(tx, &a).await? {
            continue;
        }
        let (Some(net), gross) = (a.net_amount_cents, a.gross_amount_cents) else {
            continue;
        };
        // Read (and locked) under the share's lock (second review, L1): an `ops refund` run again may have taken one
        // meanwhile, and it is then that refund's. Only the current transfer's.
        let orphans = orphaned_reversals(tx, &a).await?;
        let orphaned_cents: i64 = orphans.iter().map(|(_, cents)| cents).sum();
        if orphaned_cents == 0 {
            continue;
        }
        let parts: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT p.refund_id, p.amount_cents, p.reversal_cents, p.platform_loss_cents
               FROM refund_parts p JOIN refunds f ON f.id = p.refund_id
              WHERE p.split_allocation_id = $1 AND p.covered_at IS NOT NULL AND p.platform_loss_cents > 0
                AND f.status = 'SUCCEEDED' AND f.reinstated_at IS NULL
                -- A won dispute whose reinstatement waits (for this very refund to settle) no longer stands: it
                -- sends the share what it is owed, the orphan included, once applied.
                AND NOT EXISTS (SELECT 1 FROM disputes d
                                 WHERE d.refund_id = f.id AND (d.status = 'won' OR d.reinstate_seen_at IS NOT NULL))
              ORDER BY p.refund_id FOR UPDATE OF p",
        )
        .bind(&a.id)
        .fetch_all(&mut **tx)
        .await?;
        let Some(&(first_part, ..)) = parts.first() else {
            continue; // no part booked loss: the share's next refund part takes the orphans
        };
        // Each part uses of the orphans' money what the policy has the recipient bear and it booked as loss.
        let mut left = orphaned_cents;
        let mut uses = Vec::new();
        for &(part, amount_cents, reversal_cents, loss_cents) in &parts {
            let bears = match policy {
                crate::app::ReversePolicy::Proportional => net_of(amount_cents, net, gross),
                crate::app::ReversePolicy::None => 0,
            };
            let used = left.min((bears - reversal_cents).max(0)).min(loss_cents);
            if used > 0 {
                uses.push((part, used));
                left -= used;
            }
        }
        let unused_cents = left;
        if unused_cents > 0 && held_for_unsettled_refund(tx, &a.id).await? {
            tracing::info!(split_allocation_id = %a.id, refund_id,
                           "a failed refund's reversal is not rehomed yet: a reversal of the share belongs to a refund not settled");
            continue;
        }
        for &(part, used) in &uses {
            sqlx::query(
                "UPDATE refund_parts SET reversal_cents = reversal_cents + $3, platform_loss_cents = platform_loss_cents - $3
                  WHERE refund_id = $1 AND split_allocation_id = $2",
            )
            .bind(part)
            .bind(&a.id)
            .bind(used)
            .execute(&mut **tx)
            .await?;
        }
        let adopter = uses.first().map_or(first_part, |&(part, _)| part);
        let ids: Vec<i64> = orphans.iter().map(|&(id, _)| id).collect();
        if adopt_reversals(tx, &ids, adopter).await? != ids.len() as u64 {
            // Read and locked under the share's lock just above: a row that no longer moves is a bug, never
            // half-applied.
            return Err(StoreError::LostRace {
                what: "split allocation",
                id: a.id.clone(),
                expected: "its orphaned reversals unchanged under its lock".to_owned(),
            });
        }
        tracing::warn!(split_allocation_id = %a.id, refund_id, part_of_refund = adopter, orphaned_cents, unused_cents,
                       "a failed refund's reversal now covers a part that had booked it as the platform's loss");
        let id = SplitAllocationId::parse(&a.id).map_err(|e| corrupt("split allocation", &a.id, e))?;
        super::refunds::return_unused(tx, &id, unused_cents, &mut covered).await?;
    }
    Ok(covered)
}
