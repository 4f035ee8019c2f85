//! Makes one allocation's Stripe Transfer, exactly once per generation.
//!
//! The intent (TRANSFERRING, generation, idempotency key, and the generation's frozen parameters on its
//! `transfer_attempts` row) is committed before Stripe is called, so a crash anywhere leaves a row that says what
//! was being attempted with which key. Every attempt of a generation sends exactly the frozen parameters. Then:
//! - a transfer (created, replayed, or found by a lookup) → TRANSFERRED, `distribution_succeeded`, and the
//!   recipient's donation CONFIRMED (`donation.succeeded`), from TRANSFERRING or from PARKED: Stripe's word wins;
//! - a terminal refusal → PARKED with Stripe's code and message, `distribution_failed` (no `donation.failed`);
//! - a retryable error or an unknown outcome → the *same* key later, with capped full-jitter backoff stored on the
//!   row, for the retry window (`transfer_retry_window`, 72 h). Throttling (429, 409 in flight) consumes nothing.
//!   An unknown outcome is looked up at once (the transfer may exist). A key older than 23 h (Stripe may have
//!   forgotten it) is resent only after a lookup that succeeded and found nothing. When the window has ended, only
//!   a lookup that succeeded and found nothing parks (`retry_window_elapsed`, or `balance_insufficient` when the
//!   platform's balance stayed short); a failed lookup leaves the allocation TRANSFERRING, marked unresolved for
//!   operators, and retried.
//! - a coded 4xx refusal that Stripe saves under the key (`balance_insufficient`, for a generation without
//!   `source_transaction`) moves the generation to its next key attempt (`{key}:k{n}`): the same key would be
//!   answered with the saved refusal for as long as Stripe keeps it.

use chrono::Utc;

use super::queue::{enqueue, Queue};
use super::runner::JobFailure;
use super::stripe_event::transient;
use crate::app::AppContext;
use crate::domain::ids::SplitAllocationId;
use crate::domain::state::{AllocationEvent, AllocationStatus, DonationEvent, DonationStatus, PaymentStatus};
use crate::events::EventType;
use crate::store::allocations::{
    allocation_context, context_of, get_split_allocation_for_update, transition_allocation,
    transition_locked_allocation, AllocationContext, AllocationPatch, BALANCE_INSUFFICIENT, RETRY_WINDOW_ELAPSED,
};
use crate::store::announce;
use crate::store::donations::{donation_for_allocation_for_update, transition_locked_donation, DonationPatch};
use crate::store::transfer_attempts::{
    get_transfer_attempt, next_transfer_key_attempt, record_discrepancy, record_transfer_retry, RetryKind,
    TransferAttemptRow, TransferRetry,
};
use crate::store::StoreError;
use crate::stripe::backoff::backoff_ms_random;
use crate::stripe::error::ErrorClass;
use crate::stripe::{CreateTransferParams, GatewayError, PaymentGateway, TransferInfo};

/// Stripe may forget an idempotency key after 24 h; a generation older than this is looked up before it is resent.
pub const KEY_SAFE_AGE_HOURS: i64 = 23;

/// What a lookup of an allocation's generation at Stripe proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Stripe holds this transfer of the generation.
    Found(TransferInfo),
    /// The lookup succeeded (every page read) and no transfer names this allocation and generation.
    NotFound,
    /// The lookup failed (any gateway error, or more transfers than the page bound): nothing is proven.
    Unknown(String),
}

/// Looks for the transfer of `allocation_id`'s `generation` in its transfer group, matched by our metadata.
pub async fn look_up(
    gateway: &dyn PaymentGateway,
    transfer_group: &str,
    allocation_id: &str,
    generation: i32,
) -> Lookup {
    match gateway.list_transfers(transfer_group).await {
        Ok(transfers) => transfers
            .into_iter()
            .find(|t| {
                t.metadata.get("split_allocation_id").map(String::as_str) == Some(allocation_id)
                    && t.metadata.get("generation").map(String::as_str) == Some(generation.to_string().as_str())
            })
            .map_or(Lookup::NotFound, Lookup::Found),
        Err(e) => {
            tracing::warn!(split_allocation_id = allocation_id, error = %e, "transfer lookup failed: outcome still unknown");
            Lookup::Unknown(e.to_string())
        }
    }
}

pub async fn transfer(ctx: &AppContext, raw_id: &str) -> Result<(), JobFailure> {
    let id = SplitAllocationId::parse(raw_id).map_err(|e| JobFailure::Abandon(e.to_string()))?;
    let (mut c, mut attempt) = load(ctx, &id).await?;
    crate::observability::logging::record_payment(&c.payment.id);
    match c.allocation.status {
        AllocationStatus::Pending => {
            // Distribution starts the first generation; this is the fallback for a row it has not reached.
            if c.payment.status != PaymentStatus::Succeeded || c.allocation.net_amount_cents.is_none_or(|n| n <= 0) {
                return Ok(()); // not ready: distribution starts and makes it when it is
            }
            let mut tx = ctx.pool.begin().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
            transition_allocation(
                &mut tx,
                &id,
                AllocationEvent::TransferStarted,
                &AllocationPatch::default(),
                &[],
            )
            .await
            .map_err(transient)?;
            tx.commit().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
            (c, attempt) = load(ctx, &id).await?;
        }
        AllocationStatus::Transferring => {
            if c.allocation
                .next_attempt_at
                .is_some_and(|at| at > Utc::now() + chrono::Duration::seconds(1))
            {
                return Ok(()); // an early duplicate: the scheduled job will come
            }
        }
        // Final, or parked for an operator: nothing to do.
        _ => return Ok(()),
    }
    drive_with(ctx, &c, attempt, None).await
}

/// The first step of a generation distribution has just started and committed, with the context and attempt row it
/// read in that transaction (so nothing is read again here).
///
/// Stripe is asked only until `deadline` (the end of the step's lease, see `distribute::transfer_now`): a wait for
/// the rate limiter or an answer past it ends the step with a `Retry`, and the share goes to its job. Recording
/// what Stripe answered is never cut short, so a transfer made is recorded here, not thrown away and replayed.
pub async fn drive_started(
    ctx: &AppContext,
    c: &AllocationContext,
    attempt: TransferAttemptRow,
    deadline: tokio::time::Instant,
) -> Result<(), JobFailure> {
    drive_with(ctx, c, Some(attempt), Some(deadline)).await
}

/// A Stripe call of a step, bounded by the step's deadline when it has one.
async fn before<T>(
    deadline: Option<tokio::time::Instant>,
    call: impl std::future::Future<Output = T>,
) -> Result<T, JobFailure> {
    match deadline {
        None => Ok(call.await),
        Some(at) => tokio::time::timeout_at(at, call)
            .await
            .map_err(|_| JobFailure::Retry("the step's lease ended before Stripe answered".to_owned())),
    }
}

/// One step of a TRANSFERRING allocation's generation: send (or look up), then record what Stripe said. Also used
/// in the foreground by `ops reconcile`.
pub async fn drive(ctx: &AppContext, c: &AllocationContext) -> Result<(), JobFailure> {
    drive_with(ctx, c, None, None).await
}

/// [`drive`], with the generation's attempt row when the caller read it already (with `c`, in one transaction).
async fn drive_with(
    ctx: &AppContext,
    c: &AllocationContext,
    attempt: Option<TransferAttemptRow>,
    deadline: Option<tokio::time::Instant>,
) -> Result<(), JobFailure> {
    let id = SplitAllocationId::parse(&c.allocation.id).map_err(|e| JobFailure::Abandon(e.to_string()))?;
    let generation = c.allocation.generation;
    let attempt = match attempt.filter(|a| a.generation == generation) {
        Some(a) => a,
        None => {
            let mut conn = ctx.pool.acquire().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
            get_transfer_attempt(&mut conn, &id, generation)
                .await
                .map_err(|e| match e {
                    StoreError::NotFound { .. } => JobFailure::Abandon(e.to_string()),
                    e => transient(e),
                })?
        }
    };
    let group = attempt.transfer_group.clone();
    let age = Utc::now() - attempt.started_at;
    let window_over = age > chrono::Duration::milliseconds(ctx.distribution.transfer_retry_window_ms as i64);
    let key_old = age > chrono::Duration::hours(KEY_SAFE_AGE_HOURS);

    if window_over || key_old {
        match before(
            deadline,
            look_up(ctx.gateway.as_ref(), &group, &c.allocation.id, generation),
        )
        .await?
        {
            Lookup::Found(t) => return record_success(ctx, c, &t).await,
            // Throttling consumes nothing: an allocation Stripe only ever throttled is not parked by the window; nor
            // is one that was never sent (a backlog longer than the window): it is sent now.
            Lookup::NotFound if window_over && c.allocation.attempts > 0 && !last_was_throttle(c) => {
                let hours = ctx.distribution.transfer_retry_window_ms / 3_600_000;
                // A generation that draws on the platform's balance (no source_transaction) and found it short
                // until the end: parked with that reason, for an operator (top up, then `ops retry`).
                if c.allocation.failure_code.as_deref() == Some(BALANCE_INSUFFICIENT) {
                    let message = format!(
                        "the platform's available balance did not cover generation {generation} within the {hours} h                          retry window (it has no source_transaction); a lookup at Stripe found no transfer of it"
                    );
                    return park(ctx, c, BALANCE_INSUFFICIENT, &message).await;
                }
                let message = format!(
                    "no transfer after the {hours} h retry window; a lookup at Stripe found none of generation {generation}"
                );
                return park(ctx, c, RETRY_WINDOW_ELAPSED, &message).await;
            }
            Lookup::NotFound => {} // an old key, proven unused: resending it is safe
            Lookup::Unknown(reason) => {
                let e = GatewayError::Unknown {
                    reason: format!("lookup failed: {reason}"),
                };
                return retry_later(ctx, c, RetryKind::Failed, window_over, &e).await;
            }
        }
    }

    match before(deadline, ctx.gateway.create_transfer(&params_of(&attempt))).await? {
        Ok(t) => record_success(ctx, c, &t).await,
        Err(e) if e.class() == ErrorClass::Terminal && !e.is_idempotency_misuse() => {
            park(ctx, c, e.code().unwrap_or("unknown"), &message_of(&e)).await
        }
        Err(e) => {
            // A coded 4xx refusal (the platform's balance was short) is saved by Stripe under the key and would be
            // replayed for as long as the key lives: the next attempt takes the next key. Nothing was transferred
            // under this one, and the frozen metadata lets a lookup find the generation's transfer whichever key made
            // it. Anything else keeps the key.
            if e.is_saved_refusal() {
                let mut conn = ctx.pool.acquire().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
                next_transfer_key_attempt(&mut conn, &id, generation, attempt.key_attempt)
                    .await
                    .map_err(transient)?;
            }
            // An unknown outcome may have made the transfer: look before trying again. A misused key cannot happen
            // with frozen parameters; if it does, it is a bug and the outcome is unknown, never a refusal.
            if e.class() == ErrorClass::Unknown || e.is_idempotency_misuse() {
                if e.is_idempotency_misuse() {
                    tracing::error!(split_allocation_id = %id, error = %e, "idempotency key misuse on a frozen generation");
                }
                let found = before(
                    deadline,
                    look_up(ctx.gateway.as_ref(), &group, &c.allocation.id, generation),
                )
                .await?;
                if let Lookup::Found(t) = found {
                    return record_success(ctx, c, &t).await;
                }
            }
            let kind = if is_throttle(&e) {
                RetryKind::Throttled
            } else {
                RetryKind::Failed
            };
            retry_later(ctx, c, kind, false, &e).await
        }
    }
}

/// The create request of a generation, from its frozen row only.
fn params_of(a: &TransferAttemptRow) -> CreateTransferParams {
    CreateTransferParams {
        destination: a.destination_account_id.clone(),
        amount_cents: a.amount_cents,
        currency: a.currency.clone(),
        source_transaction: a.source_transaction.clone(),
        transfer_group: a.transfer_group.clone(),
        metadata: a.metadata.0.clone(),
        idempotency_key: a.key(),
    }
}

fn last_was_throttle(c: &AllocationContext) -> bool {
    matches!(
        c.allocation.failure_code.as_deref(),
        Some("rate_limit" | "lock_timeout" | "idempotency_key_in_use")
    )
}

/// Stripe throttled us: 429 (rate limit, lock timeout) or 409 (the same key is in flight).
fn is_throttle(e: &GatewayError) -> bool {
    matches!(
        e,
        GatewayError::Retryable {
            status: Some(429 | 409),
            ..
        }
    ) || matches!(e.code(), Some("rate_limit" | "lock_timeout" | "idempotency_key_in_use"))
}

/// The allocation's context and, when it is TRANSFERRING, its generation's attempt row: one read-only transaction
/// (one snapshot, one round of BEGIN/COMMIT instead of a transaction per statement).
async fn load(
    ctx: &AppContext,
    id: &SplitAllocationId,
) -> Result<(AllocationContext, Option<TransferAttemptRow>), JobFailure> {
    let mut tx = ctx.pool.begin().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    let c = match allocation_context(&mut tx, id).await {
        Ok(c) => c,
        Err(StoreError::NotFound { .. }) => return Err(JobFailure::Abandon(format!("no split allocation {id}"))),
        Err(e) => return Err(transient(e)),
    };
    let attempt = if c.allocation.status == AllocationStatus::Transferring {
        match get_transfer_attempt(&mut tx, id, c.allocation.generation).await {
            Ok(a) => Some(a),
            Err(StoreError::NotFound { .. }) => None, // drive_with reads it again and abandons the job
            Err(e) => return Err(transient(e)),
        }
    } else {
        None
    };
    tx.commit().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    Ok((c, attempt))
}

fn message_of(e: &GatewayError) -> String {
    match e {
        GatewayError::Terminal { message, .. } | GatewayError::Retryable { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// Records a transfer Stripe shows for `generation`: TRANSFERRED (from TRANSFERRING or PARKED), the donation
/// CONFIRMED. A transfer that cannot be applied (the allocation moved to another generation, or is refunded) is a
/// discrepancy for an operator, never dropped.
pub async fn succeed(
    ctx: &AppContext,
    id: &SplitAllocationId,
    transfer: &TransferInfo,
    generation: i32,
) -> Result<(), JobFailure> {
    succeed_audited(ctx, id, transfer, generation, None).await
}

/// [`succeed`] for the generation `c` was driving: the payment and the recipient's link are taken from `c` (what
/// the events name; they do not move), so only the share itself is read again before it is recorded.
async fn record_success(ctx: &AppContext, c: &AllocationContext, transfer: &TransferInfo) -> Result<(), JobFailure> {
    let id = SplitAllocationId::parse(&c.allocation.id).map_err(|e| JobFailure::Abandon(e.to_string()))?;
    // With the other steps' transfers, in one transaction, when it is the plain case; otherwise alone, below.
    if ctx.recorder.record(ctx, c, transfer).await {
        crate::observability::transfer_recorded(c.payment.succeeded_at);
        tracing::info!(split_allocation_id = %id, transfer_id = %transfer.id, generation = c.allocation.generation, "transferred");
        return Ok(());
    }
    record(ctx, &id, transfer, c.allocation.generation, None, Some(c)).await
}

/// As [`succeed`], with an ops audit row written in the same transaction when the transfer is recorded (`ops retry`
/// finding the parked generation's transfer at Stripe).
pub async fn succeed_audited(
    ctx: &AppContext,
    id: &SplitAllocationId,
    transfer: &TransferInfo,
    generation: i32,
    audit: Option<&crate::store::records::AuditEntry>,
) -> Result<(), JobFailure> {
    record(ctx, id, transfer, generation, audit, None).await
}

/// Records a transfer of `generation` (see [`succeed`]); `known`, when the caller has the share's context, spares
/// reading the payment and the link again.
async fn record(
    ctx: &AppContext,
    id: &SplitAllocationId,
    transfer: &TransferInfo,
    generation: i32,
    audit: Option<&crate::store::records::AuditEntry>,
    known: Option<&AllocationContext>,
) -> Result<(), JobFailure> {
    let mut tx = ctx.pool.begin().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    // The share is read locked (the transition below would lock it anyway): the transfer id and marks it is
    // compared with are the ones it is recorded over.
    let allocation = get_split_allocation_for_update(&mut tx, id).await.map_err(transient)?;
    let c = match known {
        Some(k) => AllocationContext {
            allocation,
            ..k.clone()
        },
        None => context_of(&mut tx, allocation).await.map_err(transient)?,
    };
    let now = Utc::now();
    let event = announce::distribution(EventType::DistributionSucceeded, &c, Some(&transfer.id), None, now);
    let patch = AllocationPatch {
        stripe_transfer_id: Some(transfer.id.clone()),
        transfer_generation: Some(generation),
        ..Default::default()
    };
    let transition = transition_locked_allocation(
        &mut tx,
        &c.allocation,
        AllocationEvent::TransferSucceeded,
        &patch,
        &[event],
    )
    .await;
    let recorded = matches!(transition, Ok(crate::domain::state::Transition::To(_)));
    match transition {
        // Already TRANSFERRED with another transfer: Stripe holds two. Never dropped: reported for an operator.
        Ok(crate::domain::state::Transition::Unchanged)
            if c.allocation
                .stripe_transfer_id
                .as_deref()
                .is_some_and(|known| known != transfer.id) =>
        {
            drop(tx);
            let detail = format!(
                "{id} is TRANSFERRED as {:?}; Stripe also holds {} of generation {generation}",
                c.allocation.stripe_transfer_id, transfer.id
            );
            return report_second_transfer(ctx, &c, transfer, &detail).await;
        }
        Ok(_) => {}
        Err(e @ (StoreError::Forbidden(_) | StoreError::Invalid(_))) => {
            drop(tx);
            let detail = format!("transfer of {id} generation {generation} could not be recorded: {e}");
            return report_second_transfer(ctx, &c, transfer, &detail).await;
        }
        Err(e) => return Err(transient(e)),
    }
    // Locked as it is read (after the share, the order every path takes): the transition needs no second read.
    if let Some(donation) = donation_for_allocation_for_update(&mut tx, id)
        .await
        .map_err(transient)?
    {
        let patch = DonationPatch {
            received_date: Some(now),
            ..Default::default()
        };
        let confirmed = transition_locked_donation(&mut tx, &donation, DonationEvent::Confirmed, &patch, |d| {
            announce::donation(EventType::DonationSucceeded, d, now)
                .map(|e| announce::of_generation(e, generation))
                .into_iter()
                .collect()
        })
        .await;
        match confirmed {
            Ok(_) => {}
            // A later generation that gives the recipient back money a reversal took beyond what the refunds used
            // (an orphaned reversal's excess) does not undo the donor's refund: a fully refunded donation stays
            // REFUNDED. Retrying could never confirm it, and would hold the transfer's record back for good.
            Err(StoreError::Forbidden(_)) if generation > 1 && donation.status == DonationStatus::Refunded => {
                tracing::info!(split_allocation_id = %id, generation, "transfer of a refunded donation's share: the donation stays REFUNDED");
            }
            Err(e) => return Err(transient(e)),
        }
    }
    if let Some(entry) = audit {
        crate::store::records::insert_audit(&mut tx, entry)
            .await
            .map_err(transient)?;
    }
    // Refunds that arrived while the transfer was in flight are covered now: by a reversal (policy).
    super::refunds::settle_waiting_parts(ctx, &mut tx, id)
        .await
        .map_err(transient)?;
    // A reversal of a won dispute's withdrawal found made while this transfer was in flight: the share is sent what
    // it is still owed, after those refunds took theirs. The mark is read from the row loaded above, so the hot path
    // makes no lookup for it; one written after that read is left to the refunds sweep.
    if c.allocation.resend_owed_at.is_some() {
        super::refunds::resend_owed(&mut tx, id).await.map_err(transient)?;
    }
    tx.commit().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    if recorded {
        crate::observability::transfer_recorded(c.payment.succeeded_at);
    }
    tracing::info!(split_allocation_id = %id, transfer_id = %transfer.id, generation, "transferred");
    Ok(())
}

/// A transfer at Stripe that this allocation cannot take: kept in `transfer_discrepancies` for an operator.
async fn report_second_transfer(
    ctx: &AppContext,
    c: &AllocationContext,
    transfer: &TransferInfo,
    detail: &str,
) -> Result<(), JobFailure> {
    let mut conn = ctx.pool.acquire().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    record_discrepancy(
        &mut conn,
        &c.payment.id,
        Some(c.allocation.id.as_str()),
        &transfer.id,
        transfer.amount_cents,
        "second_transfer",
        detail,
    )
    .await
    .map_err(transient)?;
    Ok(())
}

async fn park(ctx: &AppContext, c: &AllocationContext, code: &str, message: &str) -> Result<(), JobFailure> {
    let id = SplitAllocationId::parse(&c.allocation.id).map_err(|e| JobFailure::Abandon(e.to_string()))?;
    let event = announce::distribution(
        EventType::DistributionFailed,
        c,
        None,
        Some((code, message)),
        Utc::now(),
    );
    let patch = AllocationPatch {
        failure_code: Some(code.to_owned()),
        failure_message: Some(message.to_owned()),
        ..Default::default()
    };
    let mut tx = ctx.pool.begin().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    let (status, generation): (String, i32) =
        sqlx::query_as("SELECT status, generation FROM split_allocations WHERE id = $1 FOR UPDATE")
            .bind(id.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| JobFailure::Retry(e.to_string()))?;
    // Only the generation this refusal is about may be parked by it: another job recorded the transfer meanwhile
    // (Stripe's word stands), or an operator's retry started a newer generation that this stale refusal must not
    // close.
    if status != AllocationStatus::Transferring.as_str() || generation != c.allocation.generation {
        return Ok(());
    }
    transition_allocation(&mut tx, &id, AllocationEvent::TransferFailed, &patch, &[event])
        .await
        .map_err(transient)?;
    // The audit looks at a payment with a parked share soon, and for its audit window from now: a transfer
    // Stripe made after all is adopted, never left behind.
    sqlx::query(
        "UPDATE split_payments SET audit_due_at = least(coalesce(audit_due_at, 'infinity'), now() + interval '1 hour')
          WHERE id = $1",
    )
    .bind(&c.payment.id)
    .execute(&mut *tx)
    .await
    .map_err(|e| JobFailure::Retry(e.to_string()))?;
    // Refunds that arrived while the transfer was in flight are covered now: from the parked net.
    super::refunds::settle_waiting_parts(ctx, &mut tx, &id)
        .await
        .map_err(transient)?;
    tx.commit().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    tracing::warn!(split_allocation_id = %id, code, message, "parked for an operator");
    metrics::counter!("splitpay_allocations_parked_total", "code" => code.to_owned()).increment(1);
    Ok(())
}

async fn retry_later(
    ctx: &AppContext,
    c: &AllocationContext,
    kind: RetryKind,
    unresolved: bool,
    e: &GatewayError,
) -> Result<(), JobFailure> {
    let id = SplitAllocationId::parse(&c.allocation.id).map_err(|err| JobFailure::Abandon(err.to_string()))?;
    let cap_ms = ctx
        .distribution
        .backoff_cap_ms
        .min(crate::app::TRANSFER_BACKOFF_CAP_MS_MAX);
    let delay_ms = match kind {
        // Throttled: a short full-jitter wait that does not grow, at least a quarter of the throttle delay.
        RetryKind::Throttled => {
            backoff_ms_random(1, ctx.distribution.throttle_delay_ms, cap_ms).max(ctx.distribution.throttle_delay_ms / 4)
        }
        RetryKind::Failed => backoff_ms_random(
            (c.allocation.attempts + 1) as u32,
            ctx.distribution.backoff_base_ms,
            cap_ms,
        )
        .max(ctx.distribution.backoff_base_ms / 2),
    };
    let next = Utc::now() + chrono::Duration::milliseconds(delay_ms as i64);
    let mut tx = ctx
        .pool
        .begin()
        .await
        .map_err(|err| JobFailure::Retry(err.to_string()))?;
    let message = e.to_string();
    let retry = TransferRetry {
        generation: c.allocation.generation,
        next_attempt_at: next,
        kind,
        unresolved,
        failure_code: e.code(),
        failure_message: &message,
    };
    let recorded = record_transfer_retry(&mut tx, &id, &retry).await;
    match recorded {
        Ok(_) => {}
        // Another job moved the allocation on meanwhile (transferred, parked, a new generation): its word stands.
        Err(StoreError::LostRace { .. }) => return Ok(()),
        Err(err) => return Err(transient(err)),
    }
    enqueue(
        &mut tx,
        Queue::Transfer,
        id.as_str(),
        Some(std::time::Duration::from_millis(delay_ms)),
    )
    .await
    .map_err(transient)?;
    tx.commit().await.map_err(|err| JobFailure::Retry(err.to_string()))?;
    if unresolved {
        tracing::error!(split_allocation_id = %id, error = %e, "retry window ended and the outcome is still unknown: unresolved, retried");
        metrics::counter!("splitpay_transfers_unresolved_total").increment(1);
    } else {
        tracing::info!(split_allocation_id = %id, delay_ms, ?kind, class = ?e.class(), "transfer retried later with the same key");
    }
    Ok(())
}
