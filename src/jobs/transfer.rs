//! Makes one allocation's Stripe Transfer, exactly once per generation.
//!
//! The intent (TRANSFERRING, generation, idempotency key, attempt row) is committed before Stripe is called, so a
//! crash anywhere leaves a row that says what was being attempted with which key. Then:
//! - success → TRANSFERRED, `distribution_succeeded`, and the recipient's donation CONFIRMED (`donation.succeeded`);
//! - terminal refusal → PARKED with Stripe's code and message, `distribution_failed` (no `donation.failed`);
//! - retryable, or unknown outcome → first, for an unknown outcome, look the transfer up by transfer group and our
//!   metadata (it may exist); otherwise retry later with the *same* key, the delay stored on the row; after
//!   `transfer_attempts_max` attempts → PARKED `retries_exhausted`.

use std::collections::BTreeMap;

use chrono::Utc;

use super::queue::{enqueue, Queue};
use super::runner::JobFailure;
use super::stripe_event::transient;
use crate::app::AppContext;
use crate::domain::ids::{DonationId, SplitAllocationId};
use crate::domain::state::{AllocationEvent, AllocationStatus, DonationEvent, PaymentStatus};
use crate::events::{build, EventType};
use crate::store::payments::{
    allocation_context, donation_for_allocation, record_transfer_retry, transition_allocation, transition_donation,
    AllocationContext, AllocationPatch, DonationPatch, RETRIES_EXHAUSTED,
};
use crate::store::StoreError;
use crate::stripe::backoff::backoff_ms_random;
use crate::stripe::error::ErrorClass;
use crate::stripe::{CreateTransferParams, GatewayError};

/// Stripe may forget an idempotency key after 24 h; an attempt older than this is looked up before it is resent.
const KEY_SAFE_AGE_HOURS: i64 = 23;

pub async fn transfer(ctx: &AppContext, raw_id: &str) -> Result<(), JobFailure> {
    let id = SplitAllocationId::parse(raw_id).map_err(|e| JobFailure::Abandon(e.to_string()))?;
    let mut c = load(ctx, &id).await?;
    match c.allocation.status {
        AllocationStatus::Pending => {
            if c.payment.status != PaymentStatus::Succeeded || c.allocation.net_amount_cents.is_none() {
                return Ok(()); // not ready: distribution enqueues it again when it is
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
            c = load(ctx, &id).await?;
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
    let generation = c.allocation.generation;
    let key = c
        .allocation
        .idempotency_key
        .clone()
        .ok_or_else(|| JobFailure::Abandon(format!("{id} has no key")))?;

    if attempt_is_old(ctx, &id, generation).await? {
        if let Some(found) = look_up(ctx, &c, generation).await {
            return succeed(ctx, &id, &found).await;
        }
    }
    let params = CreateTransferParams {
        destination: c.destination_account_id.clone(),
        amount_cents: c.allocation.net_amount_cents.unwrap_or(0),
        currency: c.payment.currency.stripe_code().to_owned(),
        source_transaction: c.payment.charge_id.clone(),
        transfer_group: c.payment.transfer_group.clone(),
        metadata: BTreeMap::from([
            ("split_payment_id".to_owned(), c.payment.id.clone()),
            ("split_allocation_id".to_owned(), c.allocation.id.clone()),
            ("generation".to_owned(), generation.to_string()),
        ]),
        idempotency_key: key,
    };
    match ctx.gateway.create_transfer(&params).await {
        Ok(t) => succeed(ctx, &id, &t.id).await,
        Err(e) if e.class() == ErrorClass::Terminal => {
            park(ctx, &c, e.code().unwrap_or("unknown"), &message_of(&e)).await
        }
        Err(e) => {
            if e.class() == ErrorClass::Unknown {
                if let Some(found) = look_up(ctx, &c, generation).await {
                    return succeed(ctx, &id, &found).await;
                }
            }
            retry_later(ctx, &c, &e).await
        }
    }
}

async fn load(ctx: &AppContext, id: &SplitAllocationId) -> Result<AllocationContext, JobFailure> {
    let mut conn = ctx.pool.acquire().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    match allocation_context(&mut conn, id).await {
        Ok(c) => Ok(c),
        Err(StoreError::NotFound { .. }) => Err(JobFailure::Abandon(format!("no split allocation {id}"))),
        Err(e) => Err(transient(e)),
    }
}

fn message_of(e: &GatewayError) -> String {
    match e {
        GatewayError::Terminal { message, .. } | GatewayError::Retryable { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

async fn attempt_is_old(ctx: &AppContext, id: &SplitAllocationId, generation: i32) -> Result<bool, JobFailure> {
    let (old,): (bool,) = sqlx::query_as(
        "SELECT started_at < now() - make_interval(hours => $3) FROM transfer_attempts
          WHERE split_allocation_id = $1 AND generation = $2",
    )
    .bind(id.as_str())
    .bind(generation)
    .bind(KEY_SAFE_AGE_HOURS as i32)
    .fetch_one(&ctx.pool)
    .await
    .map_err(|e| JobFailure::Retry(e.to_string()))?;
    Ok(old)
}

/// The transfer this allocation's generation made, if Stripe has one (matched by our metadata).
async fn look_up(ctx: &AppContext, c: &AllocationContext, generation: i32) -> Option<String> {
    let transfers = match ctx.gateway.list_transfers(&c.payment.transfer_group).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(split_allocation_id = %c.allocation.id, error = %e, "could not look the transfer up");
            return None;
        }
    };
    transfers
        .into_iter()
        .find(|t| {
            t.metadata.get("split_allocation_id") == Some(&c.allocation.id)
                && t.metadata.get("generation").map(String::as_str) == Some(generation.to_string().as_str())
        })
        .map(|t| t.id)
}

async fn succeed(ctx: &AppContext, id: &SplitAllocationId, transfer_id: &str) -> Result<(), JobFailure> {
    let mut tx = ctx.pool.begin().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    let c = allocation_context(&mut tx, id).await.map_err(transient)?;
    let now = Utc::now();
    let event = build::distribution(EventType::DistributionSucceeded, &c, Some(transfer_id), None, now);
    let patch = AllocationPatch {
        stripe_transfer_id: Some(transfer_id.to_owned()),
        ..Default::default()
    };
    transition_allocation(&mut tx, id, AllocationEvent::TransferSucceeded, &patch, &[event])
        .await
        .map_err(transient)?;
    if let Some(donation) = donation_for_allocation(&mut tx, id).await.map_err(transient)? {
        let did = DonationId::parse(&donation.id).map_err(|e| JobFailure::Abandon(e.to_string()))?;
        let patch = DonationPatch {
            received_date: Some(now),
            ..Default::default()
        };
        transition_donation(&mut tx, &did, DonationEvent::Confirmed, &patch, |d| {
            build::donation(EventType::DonationSucceeded, d, now)
                .into_iter()
                .collect()
        })
        .await
        .map_err(transient)?;
    }
    tx.commit().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    tracing::info!(split_allocation_id = %id, transfer_id, "transferred");
    Ok(())
}

async fn park(ctx: &AppContext, c: &AllocationContext, code: &str, message: &str) -> Result<(), JobFailure> {
    let id = SplitAllocationId::parse(&c.allocation.id).map_err(|e| JobFailure::Abandon(e.to_string()))?;
    let event = build::distribution(
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
    transition_allocation(&mut tx, &id, AllocationEvent::TransferFailed, &patch, &[event])
        .await
        .map_err(transient)?;
    tx.commit().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    tracing::warn!(split_allocation_id = %id, code, message, "parked for an operator");
    metrics::counter!("splitpay_allocations_parked_total", "code" => code.to_owned()).increment(1);
    Ok(())
}

async fn retry_later(ctx: &AppContext, c: &AllocationContext, e: &GatewayError) -> Result<(), JobFailure> {
    let attempt = c.allocation.attempts + 1;
    if attempt >= ctx.distribution.transfer_attempts_max {
        return park(
            ctx,
            c,
            RETRIES_EXHAUSTED,
            &format!("gave up after {attempt} attempts; last: {e}"),
        )
        .await;
    }
    let id = SplitAllocationId::parse(&c.allocation.id).map_err(|err| JobFailure::Abandon(err.to_string()))?;
    let delay_ms = backoff_ms_random(
        attempt as u32,
        ctx.distribution.backoff_base_ms,
        ctx.distribution.backoff_cap_ms,
    )
    .max(ctx.distribution.backoff_base_ms / 2);
    let next = Utc::now() + chrono::Duration::milliseconds(delay_ms as i64);
    let mut tx = ctx
        .pool
        .begin()
        .await
        .map_err(|err| JobFailure::Retry(err.to_string()))?;
    record_transfer_retry(&mut tx, &id, next, e.code(), &e.to_string())
        .await
        .map_err(transient)?;
    enqueue(
        &mut tx,
        Queue::Transfer,
        id.as_str(),
        Some(std::time::Duration::from_millis(delay_ms)),
    )
    .await
    .map_err(transient)?;
    tx.commit().await.map_err(|err| JobFailure::Retry(err.to_string()))?;
    tracing::info!(split_allocation_id = %id, attempt, delay_ms, class = ?e.class(), "transfer retried later with the same key");
    Ok(())
}
