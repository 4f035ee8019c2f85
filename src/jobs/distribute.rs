//! Starts a succeeded payment's distribution: reads Stripe's processing fee from the charge's balance transaction
//! (waiting, with backoff stored on the payment, while it is still null — never guessing), splits it with the
//! platform fee across the allocations, and in the same transaction starts each share's first transfer generation
//! or parks a share the fees took whole (`net_amount_zero`), and marks the payment distributed. The transfers are
//! then made at once, here ([`transfer_now`]); a transfer job is only their fallback.

use chrono::Utc;

use super::queue::{enqueue, Queue};
use super::runner::JobFailure;
use super::stripe_event::transient;
use crate::app::AppContext;
use crate::domain::fees::split_fees;
use crate::domain::ids::{SplitAllocationId, SplitPaymentId};
use crate::domain::state::{AllocationEvent, AllocationStatus, PaymentStatus};
use crate::events::EventType;
use crate::store::allocations::{
    allocation_context, lock_payment_shares, start_first_generations, transition_allocation, AllocationContext,
    AllocationPatch, NET_AMOUNT_ZERO,
};
use crate::store::announce;
use crate::store::payments::{get_split_payment, get_split_payment_row, write_fee_split, SplitPaymentRow};
use crate::store::transfer_attempts::TransferAttemptRow;
use crate::store::StoreError;
use crate::stripe::backoff::backoff_ms_random;

pub async fn distribute(ctx: &AppContext, raw_id: &str) -> Result<(), JobFailure> {
    let id = SplitPaymentId::parse(raw_id).map_err(|e| JobFailure::Abandon(e.to_string()))?;
    // The payment alone decides whether there is work, and what to ask Stripe: one statement, no transaction. The
    // allocations are read in the transaction below.
    let mut conn = ctx.pool.acquire().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    let payment = match get_split_payment_row(&mut conn, &id).await {
        Ok(p) => p,
        Err(StoreError::NotFound { .. }) => return Err(JobFailure::Abandon(format!("no split payment {id}"))),
        Err(e) => return Err(transient(e)),
    };
    drop(conn);
    if payment.status != PaymentStatus::Succeeded {
        return Ok(()); // a stray job: only a succeeded payment is distributed
    }
    if payment.distributed_at.is_some() {
        return Ok(()); // a duplicate nudge: every share has already left PENDING
    }
    // A scheduled job may run up to a second early (apalis keeps `run_at` in whole seconds): the same tolerance as
    // the transfer job's, or it would take itself for an early duplicate and leave the payment to the sweeper.
    if payment
        .distribution_next_attempt_at
        .is_some_and(|at| at > Utc::now() + chrono::Duration::seconds(1))
    {
        return Ok(()); // early duplicate: the scheduled job will come
    }
    // The payment's fees and its allocations' split are written together (`write_fee_split`).
    let split_written = payment.processing_fee_cents.is_some();
    let fees = if split_written {
        None
    } else {
        match fees_of(ctx, &payment).await {
            Ok(fees) => Some(fees),
            Err(wait) => return schedule_retry(ctx, &id, payment.distribution_attempts, &wait).await,
        }
    };

    let mut tx = ctx.pool.begin().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    // Every share of the payment is locked first, in position order (the order every path that locks several
    // shares takes), so a refund or a dispute waits for this distribution rather than moving a share under it.
    let gross = lock_payment_shares(&mut tx, id.as_str()).await.map_err(transient)?;
    if let Some((charge_id, processing_fee_cents)) = fees {
        let platform_fee_cents = ctx.distribution.platform_fee.fee_cents(payment.total_amount_cents);
        let split = split_fees(&gross, processing_fee_cents, platform_fee_cents)
            .map_err(|e| JobFailure::Abandon(format!("fee split of {id}: {e}")))?;
        write_fee_split(
            &mut tx,
            &id,
            Some(&charge_id),
            processing_fee_cents,
            platform_fee_cents,
            &split,
            true, // every share leaves PENDING below, in this transaction
        )
        .await
        .map_err(transient)?;
    }
    // Refunds that arrived before the fee split are covered now, so they reduce what is transferred (a share they
    // took whole ends REFUNDED and is not transferred). One look for the payment's waiting parts first, under the
    // shares' locks (no refund attributes parts meanwhile): most payments have none.
    for raw in shares_with_waiting_parts(&mut tx, &id).await.map_err(transient)? {
        let aid = SplitAllocationId::parse(&raw).map_err(|e| JobFailure::Abandon(e.to_string()))?;
        super::refunds::settle_waiting_parts(ctx, &mut tx, &aid)
            .await
            .map_err(transient)?;
    }
    let payment = get_split_payment(&mut tx, &id).await.map_err(transient)?;
    if payment.payment.charge_id.is_none() {
        return Err(JobFailure::Retry(format!("{id}: no charge recorded yet")));
    }
    // Every share leaves PENDING here, in one transaction with the fee split: a share with money starts its first
    // transfer generation (parameters frozen), made below at once; a share the fees took whole is parked
    // `net_amount_zero` for an operator to refund. Then the payment is marked distributed, so "succeeded but not
    // distributed" is one indexed flag for the sweeper and the reconciler.
    let now = Utc::now();
    let (lease_ends, deadline) = first_step_lease(ctx);
    let mut to_start = Vec::new();
    for allocation in payment
        .allocations
        .iter()
        .filter(|a| a.status == AllocationStatus::Pending)
    {
        if allocation.net_amount_cents == Some(0) {
            let aid = SplitAllocationId::parse(&allocation.id).map_err(|e| JobFailure::Abandon(e.to_string()))?;
            let c = allocation_context(&mut tx, &aid).await.map_err(transient)?;
            let message = "the fees took the whole share: nothing to transfer; refund it to the donor";
            let event = announce::distribution(
                EventType::DistributionFailed,
                &c,
                None,
                Some((NET_AMOUNT_ZERO, message)),
                now,
            );
            let patch = AllocationPatch {
                failure_code: Some(NET_AMOUNT_ZERO.to_owned()),
                failure_message: Some(message.to_owned()),
                ..Default::default()
            };
            transition_allocation(&mut tx, &aid, AllocationEvent::NothingToTransfer, &patch, &[event])
                .await
                .map_err(transient)?;
        } else {
            to_start.push(allocation);
        }
    }
    // The shares with money start their first generation together, due at the end of the lease this process has on
    // their first step (see [`transfer_now`]). The rows were read after `lock_payment_shares` locked them, in this
    // transaction: no second lock-and-read; and what the steps need comes back with the moves.
    let started = start_first_generations(&mut tx, &payment.payment, &to_start, lease_ends)
        .await
        .map_err(transient)?;
    if split_written {
        // Marked with the fee split when it is written here (`write_fee_split`); this is a distribution of a split
        // written before.
        sqlx::query(
            "UPDATE split_payments
                SET distributed_at = coalesce(distributed_at, now()),
                    audit_due_at = coalesce(audit_due_at, now() + interval '1 hour')
              WHERE id = $1",
        )
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(|e| JobFailure::Retry(e.to_string()))?;
    }
    tx.commit().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    transfer_now(ctx, started, deadline).await;
    Ok(())
}

/// The lease a process takes on the first steps it starts: when it ends as stored (the shares' `next_attempt_at`), and
/// the same moment on this process's clock, taken together, so the step stops asking Stripe before the stored lease
/// ends.
pub fn first_step_lease(ctx: &AppContext) -> (chrono::DateTime<Utc>, tokio::time::Instant) {
    let lease_ms = ctx.distribution.inline_transfer_lease_ms;
    (
        Utc::now() + chrono::Duration::milliseconds(lease_ms as i64),
        tokio::time::Instant::now() + std::time::Duration::from_millis(lease_ms),
    )
}

/// Drives the first generation of each started share here, all at once, instead of through one transfer job each:
/// a job costs the queue an insert, a fetch and an acknowledgement, a third of PostgreSQL's work per transfer
/// (issue 11). The generation was committed TRANSFERRING before this is called, due at the end of this process's
/// lease on it (`inline_transfer_lease_ms`, ending at `deadline` on this process's clock), so nothing is lost if it
/// is not finished and nobody else drives it meanwhile:
/// - the step asks Stripe (its turn, the rate limiter, the call, a lookup) only until the deadline, so the sweeper's
///   re-enqueue of due shares (`split_allocations_transferring_due`, 60 s after they are due) never adds a second
///   driver to a step still talking to Stripe; recording what Stripe answered is not cut short (it is bounded by
///   the statement timeout, well inside that minute);
/// - a step that failed gets its transfer job with the share due now; one whose lease ended, a lease later (a
///   request the deadline cut short has then most likely ended at Stripe, so the same key gets its answer rather
///   than a 409);
/// - a crash leaves the share due at the end of the lease, for the sweeper.
///
/// A second run is harmless anyway: the generation's frozen parameters and idempotency key make Stripe answer it
/// with the same transfer. At most [`INLINE_STEPS_MAX`] steps run at once in a process; a step waits its turn
/// inside its lease.
pub async fn transfer_now(
    ctx: &AppContext,
    started: Vec<(AllocationContext, TransferAttemptRow)>,
    deadline: tokio::time::Instant,
) {
    use tracing::Instrument;
    let steps = started.into_iter().map(|(c, attempt)| {
        let id = c.allocation.id.clone();
        let generation = c.allocation.generation;
        let leased_until = c.allocation.next_attempt_at;
        // Its own span, so every line of this share's step names the share (as a transfer job's span does).
        let span = tracing::info_span!(
            "transfer",
            split_allocation_id = id.as_str(),
            split_payment_id = c.payment.id.as_str()
        );
        async move {
            let outcome = match tokio::time::timeout_at(deadline, inline_steps().acquire()).await {
                Ok(Ok(_turn)) => super::transfer::drive_started(ctx, &c, attempt, deadline).await,
                Ok(Err(closed)) => Err(JobFailure::Retry(closed.to_string())),
                Err(_) => Err(JobFailure::Retry("the step's lease ended before its turn".to_owned())),
            };
            let why = match outcome {
                Ok(()) => return,
                Err(JobFailure::Abandon(why)) => {
                    tracing::error!(split_allocation_id = %id, why, "transfer step abandoned");
                    return;
                }
                Err(JobFailure::Retry(why)) => why,
            };
            let after = if tokio::time::Instant::now() >= deadline {
                std::time::Duration::from_millis(ctx.distribution.inline_transfer_lease_ms)
            } else {
                std::time::Duration::ZERO
            };
            match hand_to_job(ctx, &id, generation, leased_until, after).await {
                Ok(true) => {
                    tracing::warn!(split_allocation_id = %id, why, after_ms = after.as_millis() as u64, "transfer step not finished: its job takes it on")
                }
                Ok(false) => {
                    tracing::info!(split_allocation_id = %id, why, "transfer step not finished, and the share has moved on: no job")
                }
                Err(e) => {
                    tracing::warn!(split_allocation_id = %id, why, error = %e, "no transfer job either: the sweeper will take it when its lease ends")
                }
            }
        }
        .instrument(span)
    });
    futures_util::future::join_all(steps).await;
}

/// Inline transfer steps one process runs at once.
pub const INLINE_STEPS_MAX: usize = 32;

/// The process's turns for inline transfer steps: a bound on the Stripe calls and recordings this process has in
/// flight from distributions, whichever context started them (so process-wide rather than in `AppContext`). It is
/// above the default pool of 10 connections: a burst of recordings can still wait out the pool's acquire timeout,
/// and such a share goes to its job (or to the sweeper).
fn inline_steps() -> &'static tokio::sync::Semaphore {
    static STEPS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    STEPS.get_or_init(|| tokio::sync::Semaphore::new(INLINE_STEPS_MAX))
}

/// A started share whose inline step is over without an outcome: due `after` from now (its lease given back) and its
/// transfer job enqueued for then, in one transaction, only if the share is still as the step left it (TRANSFERRING,
/// same generation, still due at the lease's end). Otherwise the step recorded something meanwhile (a retry with its
/// own job, the transfer, a park) and nothing is added. Returns whether the job was enqueued. The step is no longer
/// running, so the job is its only driver.
async fn hand_to_job(
    ctx: &AppContext,
    id: &str,
    generation: i32,
    leased_until: Option<chrono::DateTime<Utc>>,
    after: std::time::Duration,
) -> Result<bool, StoreError> {
    let mut tx = ctx.pool.begin().await?;
    let reset = sqlx::query(
        "UPDATE split_allocations SET next_attempt_at = now() + make_interval(secs => $4)
          WHERE id = $1 AND status = 'TRANSFERRING' AND generation = $2 AND next_attempt_at = $3",
    )
    .bind(id)
    .bind(generation)
    .bind(leased_until)
    .bind(after.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    if reset.rows_affected() != 1 {
        return Ok(false);
    }
    enqueue(&mut tx, Queue::Transfer, id, (!after.is_zero()).then_some(after)).await?;
    tx.commit().await?;
    Ok(true)
}

/// The payment's shares that have refund parts waiting to be covered, in position order.
async fn shares_with_waiting_parts(
    tx: &mut crate::store::Tx<'_>,
    id: &SplitPaymentId,
) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT a.id FROM split_allocations a
          WHERE a.split_payment_id = $1
            AND EXISTS (SELECT 1 FROM refund_parts p WHERE p.split_allocation_id = a.id AND p.covered_at IS NULL)
          ORDER BY a.position",
    )
    .bind(id.as_str())
    .fetch_all(&mut **tx)
    .await?)
}

/// The charge id and Stripe's processing fee, or why we must wait.
async fn fees_of(ctx: &AppContext, payment: &SplitPaymentRow) -> Result<(String, i64), String> {
    let charge_id = match &payment.charge_id {
        Some(c) => c.clone(),
        None => {
            let pi = payment
                .payment_intent_id
                .as_deref()
                .ok_or("no PaymentIntent recorded")?;
            let intent = ctx
                .gateway
                .retrieve_payment_intent(pi)
                .await
                .map_err(|e| e.to_string())?;
            intent.latest_charge.ok_or("the PaymentIntent has no charge yet")?
        }
    };
    let charge = ctx
        .gateway
        .retrieve_charge(&charge_id)
        .await
        .map_err(|e| e.to_string())?;
    let bt = charge
        .balance_transaction
        .ok_or("the charge's balance transaction is not settled yet")?;
    if bt.amount_cents != payment.total_amount_cents || bt.currency != payment.currency.stripe_code() {
        // Never split a fee that belongs to another amount: an operator must look.
        tracing::error!(split_payment_id = %payment.id, charge_id, "balance transaction does not match the payment");
        return Err(format!(
            "balance transaction {} is {} {}, not the payment's",
            bt.id, bt.amount_cents, bt.currency
        ));
    }
    Ok((charge_id, bt.fee_cents))
}

async fn schedule_retry(ctx: &AppContext, id: &SplitPaymentId, attempts: i32, why: &str) -> Result<(), JobFailure> {
    let attempt = attempts + 1;
    if attempt >= ctx.distribution.fee_wait_attempts_max {
        // Keep waiting at the longest interval, loudly: the fee is never guessed.
        tracing::error!(split_payment_id = %id, attempt, why, "distribution still waiting for the charge's fee");
        metrics::counter!("splitpay_distribution_fee_waits_exhausted_total").increment(1);
    }
    let delay_ms = backoff_ms_random(
        attempt as u32,
        ctx.distribution.backoff_base_ms,
        ctx.distribution.backoff_cap_ms,
    )
    .max(ctx.distribution.backoff_base_ms / 2);
    let next = Utc::now() + chrono::Duration::milliseconds(delay_ms as i64);
    tracing::info!(split_payment_id = %id, attempt, delay_ms, why, "distribution waits");
    let mut tx = ctx.pool.begin().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    sqlx::query(
        "UPDATE split_payments SET distribution_attempts = $2, distribution_next_attempt_at = $3 WHERE id = $1",
    )
    .bind(id.as_str())
    .bind(attempt)
    .bind(next)
    .execute(&mut *tx)
    .await
    .map_err(|e| JobFailure::Retry(e.to_string()))?;
    enqueue(
        &mut tx,
        Queue::Distribute,
        id.as_str(),
        Some(std::time::Duration::from_millis(delay_ms)),
    )
    .await
    .map_err(transient)?;
    tx.commit().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    Ok(())
}
