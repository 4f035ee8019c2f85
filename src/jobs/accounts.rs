//! Retrying parked shares, for `ops retry` and for recipients who finish onboarding.
//!
//! One path for both ([`readiness`], [`plan_retry`], [`apply_retry`]):
//! 1. ask Stripe whether the recipient's account can receive transfers now (the `transfers` capability `active`,
//!    the account not deleted); if not, nothing changes;
//! 2. look up the parked generation at Stripe: a transfer found is recorded (Stripe's word wins) instead of making
//!    a second one; a lookup that fails proves nothing, so nothing changes;
//! 3. only when the lookup proved there is none: a new generation (`ops_retry`, PARKED → TRANSFERRING, a new key),
//!    its audit row and its transfer job, in one transaction, compare-and-set on the status and the generation.
//!
//! `account.updated` ([`account_updated`]) refreshes `transfers_active` and `charges_enabled` on every link of the
//! account, in Stripe's order (see [`crate::store::readiness`]). The event that turns `transfers_active` on retries the account's shares
//! parked for account reasons ([`crate::store::readiness::ACCOUNT_PARK_CODES`]), with actor `system`, in batches
//! of `auto_retry_batch`, each share in its own transaction: the event stays unprocessed and its job is enqueued
//! again until none is left, so a lost job is swept up and a second processing finds them no longer PARKED. A lost
//! `account.updated` is made up for by the accounts sweep ([`super::account_sweep`]), whose own `account.updated`
//! events come through here too.

use chrono::{TimeZone, Utc};
use serde_json::json;

use super::queue::{enqueue, Queue};
use super::runner::JobFailure;
use super::stripe_event::transient;
use super::transfer::{look_up, succeed_audited, Lookup};
use crate::app::AppContext;
use crate::domain::ids::SplitAllocationId;
use crate::domain::state::{AllocationEvent, AllocationStatus};
use crate::store::allocations::{allocation_context, transition_allocation, AllocationContext, AllocationPatch};
use crate::store::readiness::{
    activated_account, apply_account_flags, parked_for_account, AccountFlags, Applied, SWEEP_EVENT_PREFIX,
};
use crate::store::records::{finish_stripe_event, insert_audit, AuditEntry, StripeEventRow};
use crate::store::StoreError;
use crate::stripe::{AccountInfo, GatewayError, PaymentGateway, TransferInfo};

/// The audit actor of automatic retries.
pub const SYSTEM_ACTOR: &str = "system";

/// Whether a connected account can receive transfers now, as Stripe answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready(AccountInfo),
    /// Stripe answered, and the account cannot: why, in words for an operator.
    NotReady(String),
    /// Stripe could not be asked (a timeout, a 5xx): try again later.
    Unknown(String),
}

impl Readiness {
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Readiness::Ready(a) => json!({
                "ready": true, "account": a.id, "transfers_capability": a.transfers_capability,
                "charges_enabled": a.charges_enabled,
            }),
            Readiness::NotReady(why) => json!({ "ready": false, "why": why }),
            Readiness::Unknown(why) => json!({ "ready": null, "why": why }),
        }
    }
}

/// Asks Stripe for `account_id` (one read).
pub async fn readiness(gateway: &dyn PaymentGateway, account_id: &str) -> Readiness {
    match gateway.retrieve_account(account_id).await {
        Ok(a) if a.can_receive_transfers() => Readiness::Ready(a),
        Ok(a) => {
            let mut why = format!(
                "{account_id} cannot receive transfers: its transfers capability is {}",
                a.transfers_capability.as_deref().unwrap_or("not requested")
            );
            if let Some(reason) = &a.disabled_reason {
                why.push_str(&format!("; disabled: {reason}"));
            }
            if !a.requirements_due.is_empty() {
                why.push_str(&format!("; requirements due: {}", a.requirements_due.join(", ")));
            }
            Readiness::NotReady(why)
        }
        // Stripe refuses the account itself (deleted, or not connected to this platform).
        Err(e @ (GatewayError::Terminal { .. } | GatewayError::Config(_))) => Readiness::NotReady(format!(
            "{account_id} cannot receive transfers: Stripe refuses the account (deleted, or not connected to this platform): {e}"
        )),
        Err(e) => Readiness::Unknown(format!("could not ask Stripe about {account_id}: {e}")),
    }
}

/// What a retry of a parked allocation would do, from the reads (the lookup of the parked generation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryPlan {
    /// Stripe holds the parked generation's transfer: record it, make none.
    RecordFound(TransferInfo),
    /// Stripe holds none: start generation `from + 1` with a new key.
    NewGeneration { from: i32 },
}

/// Why a retry changed nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotRetried {
    /// The allocation is not PARKED (any more).
    NotParked {
        status: AllocationStatus,
        transfer_id: Option<String>,
    },
    /// Parked because the fees left nothing to transfer: only a refund resolves it.
    NothingToTransfer,
    /// Another retry moved the allocation to another generation meanwhile.
    GenerationMoved { expected: i32, found: i32 },
    /// The lookup of the parked generation failed: whether Stripe holds its transfer is unknown.
    LookupUnknown(String),
    /// A refund of this share is still open at Stripe: it settles first.
    RefundOpen,
}

impl std::fmt::Display for NotRetried {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotRetried::NotParked {
                status: AllocationStatus::Transferred,
                transfer_id,
            } => write!(
                f,
                "already transferred as {}, nothing to retry",
                transfer_id.as_deref().unwrap_or("(unknown transfer)")
            ),
            NotRetried::NotParked {
                status: AllocationStatus::Transferring,
                ..
            } => write!(f, "a transfer is in progress; see ops show"),
            NotRetried::NotParked { status, .. } => {
                write!(f, "the allocation is {status}, not PARKED: nothing to retry; see ops show")
            }
            NotRetried::RefundOpen => write!(
                f,
                "a refund of this share is still open at Stripe; once it settles, see ops show (a refunded share is not retried)"
            ),
            NotRetried::NothingToTransfer => write!(
                f,
                "the fees left nothing to transfer (net amount 0): refund the share to the donor instead"
            ),
            NotRetried::GenerationMoved { expected, found } => write!(
                f,
                "the allocation moved from generation {expected} to {found} meanwhile (another retry?); see ops show"
            ),
            NotRetried::LookupUnknown(why) => write!(
                f,
                "could not prove that Stripe holds no transfer of the parked generation ({why}); nothing changed, try again later"
            ),
        }
    }
}

/// What a retry did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retried {
    /// A new generation is written and its transfer job enqueued.
    Started { generation: i32, idempotency_key: String },
    /// Stripe already held the parked generation's transfer: it is recorded.
    FoundAtStripe { transfer_id: String, generation: i32 },
}

/// The state checks and the lookup (reads only).
pub async fn plan_retry(ctx: &AppContext, c: &AllocationContext) -> Result<RetryPlan, NotRetried> {
    let a = &c.allocation;
    if a.status != AllocationStatus::Parked {
        return Err(NotRetried::NotParked {
            status: a.status,
            transfer_id: a.stripe_transfer_id.clone(),
        });
    }
    if a.net_amount_cents.is_none_or(|n| n <= 0) {
        return Err(NotRetried::NothingToTransfer);
    }
    if a.generation == 0 {
        return Ok(RetryPlan::NewGeneration { from: 0 }); // never sent: nothing to look up
    }
    match look_up(ctx.gateway.as_ref(), &c.payment.transfer_group, &a.id, a.generation).await {
        Lookup::Found(t) => Ok(RetryPlan::RecordFound(t)),
        Lookup::NotFound => Ok(RetryPlan::NewGeneration { from: a.generation }),
        Lookup::Unknown(why) => Err(NotRetried::LookupUnknown(why)),
    }
}

/// Carries out `plan` with `audit` in the same transaction. The status and the generation are compared again under
/// the row lock, so of two concurrent retries exactly one starts a generation.
pub async fn apply_retry(
    ctx: &AppContext,
    c: &AllocationContext,
    plan: &RetryPlan,
    audit: &AuditEntry,
) -> Result<Result<Retried, NotRetried>, JobFailure> {
    let id = SplitAllocationId::parse(&c.allocation.id).map_err(|e| JobFailure::Abandon(e.to_string()))?;
    match plan {
        RetryPlan::RecordFound(t) => {
            let generation = c.allocation.generation;
            succeed_audited(ctx, &id, t, generation, Some(audit)).await?;
            Ok(Ok(Retried::FoundAtStripe {
                transfer_id: t.id.clone(),
                generation,
            }))
        }
        RetryPlan::NewGeneration { from } => {
            let mut tx = ctx.pool.begin().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
            let (status, generation, transfer_id): (String, i32, Option<String>) = sqlx::query_as(
                "SELECT status, generation, stripe_transfer_id FROM split_allocations WHERE id = $1 FOR UPDATE",
            )
            .bind(id.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| JobFailure::Retry(e.to_string()))?;
            let status = AllocationStatus::try_from(status).map_err(|e| JobFailure::Abandon(e.to_string()))?;
            if status != AllocationStatus::Parked {
                return Ok(Err(NotRetried::NotParked { status, transfer_id }));
            }
            if generation != *from {
                return Ok(Err(NotRetried::GenerationMoved {
                    expected: *from,
                    found: generation,
                }));
            }
            // A refund of this share still open at Stripe (REQUESTED or PENDING) must settle first, or the donor
            // and the recipient could both be paid the same money. Checked under the row lock the refund's own
            // attribution takes too.
            let (open_refunds,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM refunds WHERE split_allocation_id = $1 AND status IN ('REQUESTED', 'PENDING')",
            )
            .bind(id.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| JobFailure::Retry(e.to_string()))?;
            if open_refunds > 0 {
                return Ok(Err(NotRetried::RefundOpen));
            }
            match transition_allocation(
                &mut tx,
                &id,
                AllocationEvent::OpsRetry,
                &AllocationPatch::default(),
                &[],
            )
            .await
            {
                Ok(_) => {}
                Err(StoreError::LostRace { .. } | StoreError::Forbidden(_)) => {
                    return Ok(Err(NotRetried::GenerationMoved {
                        expected: *from,
                        found: generation,
                    }))
                }
                Err(e) => return Err(transient(e)),
            }
            insert_audit(&mut tx, audit).await.map_err(transient)?;
            enqueue(&mut tx, Queue::Transfer, id.as_str(), None)
                .await
                .map_err(transient)?;
            let (generation, key): (i32, Option<String>) =
                sqlx::query_as("SELECT generation, idempotency_key FROM split_allocations WHERE id = $1")
                    .bind(id.as_str())
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(|e| JobFailure::Retry(e.to_string()))?;
            tx.commit().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
            tracing::info!(split_allocation_id = %id, generation, actor = %audit.actor, "parked share retried on a new generation");
            metrics::counter!("splitpay_allocations_retried_total").increment(1);
            Ok(Ok(Retried::Started {
                generation,
                idempotency_key: key.unwrap_or_default(),
            }))
        }
    }
}

/// The audit row of a retry (`ops retry` or automatic).
pub fn retry_audit(
    actor: &str,
    reason: Option<String>,
    c: &AllocationContext,
    plan: &RetryPlan,
    ready: &Readiness,
) -> AuditEntry {
    let (result, details) = match plan {
        RetryPlan::RecordFound(t) => (
            "found_at_stripe",
            json!({ "generation": c.allocation.generation, "stripe_transfer_id": t.id }),
        ),
        RetryPlan::NewGeneration { from } => (
            "new_generation",
            json!({ "from_generation": from, "to_generation": from + 1 }),
        ),
    };
    AuditEntry {
        actor: actor.to_owned(),
        command: "retry".to_owned(),
        target_type: "split_allocation".to_owned(),
        target_id: c.allocation.id.clone(),
        reason,
        details: json!({
            "parameters": {
                "split_allocation_id": c.allocation.id,
                "destination_account_id": c.destination_account_id,
                "parked_failure_code": c.allocation.failure_code,
                "plan": details,
                "readiness": ready.to_json(),
            },
            "result": result,
        }),
    }
}

/// `account.updated`: refreshes the account's links, then (when this event turned `transfers_active` on, and
/// auto-retry is on) retries one batch of its parked shares. The event is marked processed when nothing is left.
pub async fn account_updated(ctx: &AppContext, event: &StripeEventRow) -> Result<(), JobFailure> {
    let account = &event.payload["data"]["object"];
    let Some(account_id) = account["id"].as_str().filter(|id| id.starts_with("acct_")) else {
        return mark(ctx, &event.id, Some("account.updated without an acct_ id")).await;
    };
    let created = event
        .stripe_created
        .or_else(|| Utc.timestamp_opt(event.payload["created"].as_i64()?, 0).single())
        .unwrap_or(event.received_at);
    let flags = AccountFlags {
        charges_enabled: account["charges_enabled"].as_bool().unwrap_or(false),
        transfers_active: account["deleted"].as_bool() != Some(true)
            && account["capabilities"]["transfers"].as_str() == Some("active"),
    };
    // The accounts sweep's events exist because shares are parked that no event retried: they claim the retry even
    // when the link already says `transfers_active` (see `jobs::account_sweep`).
    let claim_retry = event.id.starts_with(SWEEP_EVENT_PREFIX);
    let mut conn = ctx.pool.acquire().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    let applied = apply_account_flags(&mut conn, account_id, flags, created, &event.id, false, claim_retry)
        .await
        .map_err(transient)?;
    let applied = if applied == Applied::Tie {
        // Two events of one second disagree: Stripe's current answer decides.
        let now = ctx
            .gateway
            .retrieve_account(account_id)
            .await
            .map_err(|e| JobFailure::Retry(format!("retrieving {account_id} to order its events: {e}")))?;
        let flags = AccountFlags {
            charges_enabled: now.charges_enabled,
            transfers_active: now.can_receive_transfers(),
        };
        apply_account_flags(&mut conn, account_id, flags, created, &event.id, true, claim_retry)
            .await
            .map_err(transient)?
    } else {
        applied
    };
    tracing::info!(event_id = %event.id, account_id, ?flags, ?applied, "account.updated applied");
    if !ctx.distribution.auto_retry_parked {
        return mark(ctx, &event.id, None).await;
    }
    let Some(account_id) = activated_account(&mut conn, &event.id).await.map_err(transient)? else {
        return mark(ctx, &event.id, None).await;
    };
    let batch = parked_for_account(
        &mut conn,
        &account_id,
        event.received_at,
        ctx.distribution.auto_retry_batch.max(1),
    )
    .await
    .map_err(transient)?;
    drop(conn);
    if batch.is_empty() {
        return mark(ctx, &event.id, None).await;
    }
    let ready = readiness(ctx.gateway.as_ref(), &account_id).await;
    match &ready {
        Readiness::Ready(_) => {}
        Readiness::NotReady(why) => {
            // Stripe says otherwise by now (a later event will say so too): leave them parked.
            tracing::warn!(event_id = %event.id, %account_id, why, "auto-retry skipped: the account is not ready");
            return mark(ctx, &event.id, Some(why)).await;
        }
        Readiness::Unknown(why) => return Err(JobFailure::Retry(why.clone())),
    }
    let reason = format!("{} {}: {account_id} can receive transfers", event.event_type, event.id);
    let full = batch.len() as i64 >= ctx.distribution.auto_retry_batch.max(1);
    for raw in &batch {
        let id = SplitAllocationId::parse(raw).map_err(|e| JobFailure::Abandon(e.to_string()))?;
        let c = allocation_context(
            &mut *ctx.pool.acquire().await.map_err(|e| JobFailure::Retry(e.to_string()))?,
            &id,
        )
        .await
        .map_err(transient)?;
        let plan = match plan_retry(ctx, &c).await {
            Ok(plan) => plan,
            Err(NotRetried::LookupUnknown(why)) => return Err(JobFailure::Retry(why)),
            Err(other) => {
                tracing::info!(split_allocation_id = %id, why = %other, "auto-retry: nothing to do");
                continue;
            }
        };
        let audit = retry_audit(SYSTEM_ACTOR, Some(reason.clone()), &c, &plan, &ready);
        match apply_retry(ctx, &c, &plan, &audit).await? {
            Ok(done) => tracing::info!(split_allocation_id = %id, ?done, "auto-retried"),
            Err(why) => tracing::info!(split_allocation_id = %id, %why, "auto-retry: nothing to do"),
        }
    }
    // Each pass must move some share out of PARKED (a transfer found that cannot be recorded leaves one parked, as
    // a discrepancy for an operator): otherwise the next pass would take the same batch again.
    let (still_parked,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM split_allocations WHERE id = ANY($1) AND status = 'PARKED'")
            .bind(&batch)
            .fetch_one(&ctx.pool)
            .await
            .map_err(|e| JobFailure::Retry(e.to_string()))?;
    if full && still_parked < batch.len() as i64 {
        // More may be parked: the next pass of this event takes them (the event stays unprocessed meanwhile).
        let mut conn = ctx.pool.acquire().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
        enqueue(&mut conn, Queue::StripeEvent, &event.id, None)
            .await
            .map_err(transient)?;
        return Ok(());
    }
    mark(ctx, &event.id, None).await
}

async fn mark(ctx: &AppContext, event_id: &str, note: Option<&str>) -> Result<(), JobFailure> {
    let mut conn = ctx.pool.acquire().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    finish_stripe_event(&mut conn, event_id, note).await.map_err(transient)
}
