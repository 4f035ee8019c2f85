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
    allocation_context, started_contexts, transition_allocation, AllocationContext, AllocationPatch, NET_AMOUNT_ZERO,
};
use crate::store::announce;
use crate::store::payments::{get_split_payment, write_fee_split, SplitPayment};
use crate::store::transfer_attempts::TransferAttemptRow;
use crate::store::StoreError;
use crate::stripe::backoff::backoff_ms_random;

pub async fn distribute(ctx: &AppContext, raw_id: &str) -> Result<(), JobFailure> {
    let id = SplitPaymentId::parse(raw_id).map_err(|e| JobFailure::Abandon(e.to_string()))?;
    // Its two reads in one transaction (one snapshot, and one transaction rather than one per statement).
    let mut read = ctx.pool.begin().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    let payment = match get_split_payment(&mut read, &id).await {
        Ok(p) => p,
        Err(StoreError::NotFound { .. }) => return Err(JobFailure::Abandon(format!("no split payment {id}"))),
        Err(e) => return Err(transient(e)),
    };
    read.commit().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    if payment.payment.status != PaymentStatus::Succeeded {
        return Ok(()); // a stray job: only a succeeded payment is distributed
    }
    if payment.payment.distributed_at.is_some() {
        return Ok(()); // a duplicate nudge: every share has already left PENDING
    }
    if payment
        .payment
        .distribution_next_attempt_at
        .is_some_and(|at| at > Utc::now())
    {
        return Ok(()); // early duplicate: the scheduled job will come
    }
    let split_written = payment.allocations.iter().all(|a| a.fee_share_cents.is_some());
    let fees = if split_written {
        None
    } else {
        match fees_of(ctx, &payment).await {
            Ok(fees) => Some(fees),
            Err(wait) => return schedule_retry(ctx, &id, payment.payment.distribution_attempts, &wait).await,
        }
    };

    let mut tx = ctx.pool.begin().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    if let Some((charge_id, processing_fee_cents)) = fees {
        let platform_fee_cents = ctx
            .distribution
            .platform_fee
            .fee_cents(payment.payment.total_amount_cents);
        let gross: Vec<i64> = payment.allocations.iter().map(|a| a.gross_amount_cents).collect();
        let split = split_fees(&gross, processing_fee_cents, platform_fee_cents)
            .map_err(|e| JobFailure::Abandon(format!("fee split of {id}: {e}")))?;
        write_fee_split(&mut tx, &id, processing_fee_cents, platform_fee_cents, &split)
            .await
            .map_err(transient)?;
        sqlx::query("UPDATE split_payments SET charge_id = coalesce(charge_id, $2), distribution_next_attempt_at = NULL WHERE id = $1")
            .bind(id.as_str())
            .bind(&charge_id)
            .execute(&mut *tx)
            .await
            .map_err(|e| JobFailure::Retry(e.to_string()))?;
    }
    // Refunds that arrived before the fee split are covered now, so they reduce what is transferred (a share they
    // took whole ends REFUNDED and is not transferred).
    for allocation in &payment.allocations {
        let aid = SplitAllocationId::parse(&allocation.id).map_err(|e| JobFailure::Abandon(e.to_string()))?;
        super::refunds::settle_waiting_parts(ctx, &mut tx, &aid)
            .await
            .map_err(transient)?;
    }
    let payment = get_split_payment(&mut tx, &id).await.map_err(transient)?;
    if payment.payment.charge_id.is_none() {
        return Err(JobFailure::Retry(format!("{id}: no charge recorded yet")));
    }
    // Every share leaves PENDING here, in one transaction with the fee split: a share with money starts its first
    // transfer generation (parameters frozen) and gets its job; a share the fees took whole is parked
    // `net_amount_zero` for an operator to refund. Then the payment is marked distributed, so "succeeded but not
    // distributed" is one indexed flag for the sweeper and the reconciler.
    let now = Utc::now();
    let mut started = Vec::new();
    for allocation in payment
        .allocations
        .iter()
        .filter(|a| a.status == AllocationStatus::Pending)
    {
        let aid = SplitAllocationId::parse(&allocation.id).map_err(|e| JobFailure::Abandon(e.to_string()))?;
        if allocation.net_amount_cents == Some(0) {
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
            transition_allocation(
                &mut tx,
                &aid,
                AllocationEvent::TransferStarted,
                &AllocationPatch::default(),
                &[],
            )
            .await
            .map_err(transient)?;
            started.push(aid);
        }
    }
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
    // What the transfers made below need, read here in this transaction rather than by each of them in its own.
    let started = started_contexts(&mut tx, &payment.payment, &started)
        .await
        .map_err(transient)?;
    tx.commit().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    transfer_now(ctx, started).await;
    Ok(())
}

/// Drives the first generation of each started share here, all at once, instead of through one transfer job each:
/// a job costs the queue an insert, a fetch and an acknowledgement, a third of PostgreSQL's work per transfer
/// (issue 11). The generation was committed TRANSFERRING and due before this is called, so nothing is lost if it
/// is not finished: a share whose step failed gets a transfer job here, and one this process did not reach (a
/// crash) is due work the sweeper re-enqueues (`split_allocations_transferring_due`). A duplicate run is harmless:
/// the generation's frozen parameters and idempotency key make Stripe answer it with the same transfer.
pub async fn transfer_now(ctx: &AppContext, started: Vec<(AllocationContext, TransferAttemptRow)>) {
    use tracing::Instrument;
    let steps = started.into_iter().map(|(c, attempt)| {
        let id = c.allocation.id.clone();
        // Its own span, so every line of this share's step names the share (as a transfer job's span does).
        let span = tracing::info_span!(
            "transfer",
            split_allocation_id = id.as_str(),
            split_payment_id = c.payment.id.as_str()
        );
        async move {
        match super::transfer::drive_started(ctx, &c, attempt).await {
            Ok(()) => {}
            Err(JobFailure::Retry(why)) => {
                tracing::warn!(split_allocation_id = %id, why, "transfer step failed: its job takes it on");
                let enqueued = async {
                    let mut conn = ctx.pool.acquire().await?;
                    enqueue(&mut conn, Queue::Transfer, &id, None).await
                };
                if let Err(e) = enqueued.await {
                    tracing::warn!(split_allocation_id = %id, error = %e, "no transfer job either: the sweeper will take it");
                }
            }
            Err(JobFailure::Abandon(why)) => {
                tracing::error!(split_allocation_id = %id, why, "transfer step abandoned");
            }
        }
        }
        .instrument(span)
    });
    futures_util::future::join_all(steps).await;
}

/// The charge id and Stripe's processing fee, or why we must wait.
async fn fees_of(ctx: &AppContext, payment: &SplitPayment) -> Result<(String, i64), String> {
    let charge_id = match &payment.payment.charge_id {
        Some(c) => c.clone(),
        None => {
            let pi = payment
                .payment
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
    if bt.amount_cents != payment.payment.total_amount_cents || bt.currency != payment.payment.currency.stripe_code() {
        // Never split a fee that belongs to another amount: an operator must look.
        tracing::error!(split_payment_id = %payment.payment.id, charge_id, "balance transaction does not match the payment");
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
