//! The reconcilers: what webhooks and jobs missed, found by asking Stripe and by reading our own rows.
//!
//! - **reconcile-pending** ([`reconcile_pending`]): each non-final payment is read at Stripe at most once per
//!   per-method interval, after a per-method grace, and the PaymentIntent's state is applied through the same code
//!   path as its webhook ([`super::payment_state`]). A payment still unpaid after `abandon_after` has its
//!   PaymentIntent canceled (CANCELED, `donation.failed`). A CREATED payment (intake stopped after a 503) replays
//!   the create under the stored intake key to learn its PaymentIntent, cancels it, and fails
//!   (`intake_abandoned`).
//! - **reconcile-transfers** ([`reconcile_transfers`]): TRANSFERRING allocations past a grace are driven again (the
//!   transfer job: same key, or a lookup first when the key is old); succeeded payments whose distribution has not
//!   started are distributed; and a daily audit compares Stripe's transfers per transfer group with ours, adopting
//!   a transfer whose metadata names our allocation's generation and reporting anything else.
//!
//! Both run on the cron (once per tick across replicas; work per tick bounded by `batch_max`, jobs enqueued only
//! where none is waiting) and in the foreground from `splitpay ops reconcile`.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::payment_state::{apply, cancel_or_learn, IntentView};
use super::queue::{enqueue_missing, Queue};
use super::transfer::{drive, succeed};
use crate::app::AppContext;
use crate::domain::ids::{SplitAllocationId, SplitPaymentId};
use crate::domain::state::{AllocationStatus, PaymentEvent, PaymentStatus, Transition};
use crate::intake::{record_create, send_create, Confirmation, IntakeError, SendError};
use crate::store::allocations::allocation_context;
use crate::store::payments::{get_split_payment, SplitPayment};
use crate::store::transfer_attempts::record_discrepancy;
use crate::store::StoreError;

/// A CREATED payment older than this is failed without replaying its create: Stripe may have forgotten the intake
/// key, and a replay could then create (and confirm) a new PaymentIntent. Intake refuses to resume it too.
pub const INTAKE_KEY_SAFE_AGE_HOURS: i64 = 23;
/// The failure code of a payment whose intake stopped (Stripe unreachable) and was never resumed.
pub const INTAKE_ABANDONED: &str = "intake_abandoned";
/// Its message, when its PaymentIntent was learned and canceled.
pub const INTAKE_ABANDONED_MESSAGE: &str =
    "Intake could not reach Stripe and the payment was never resumed; its PaymentIntent was canceled.";

// The statements a reconcile tick runs over many rows, public so `tests/scale.rs` can `EXPLAIN` exactly what runs.
// Each is an index range scan on a partial index (see migrations), bounded by `batch_max`.

/// reconcile-pending's candidates: never-checked non-final payments by age (`split_payments_unreconciled`), and
/// those due again (`split_payments_reconcile_due`), at most `$3` of each. `$1`: created before; `$2`: due by.
pub const PENDING_CANDIDATES_SQL: &str = "(SELECT id FROM split_payments
               WHERE status IN ('CREATED', 'REQUIRES_PAYMENT', 'PROCESSING') AND next_reconcile_at IS NULL
                 AND created_at < $1
               ORDER BY created_at LIMIT $3)
             UNION ALL
             (SELECT id FROM split_payments
               WHERE status IN ('CREATED', 'REQUIRES_PAYMENT', 'PROCESSING') AND next_reconcile_at IS NOT NULL
                 AND next_reconcile_at <= $2
               ORDER BY next_reconcile_at LIMIT $3)";
/// Paces the next look at one non-final payment (`$1` its id, `$2` when).
pub const SCHEDULE_RECONCILE_SQL: &str = "UPDATE split_payments SET next_reconcile_at = $2
          WHERE id = $1 AND status IN ('CREATED', 'REQUIRES_PAYMENT', 'PROCESSING')";
/// reconcile-transfers: TRANSFERRING allocations due before `$1`, at most `$2` (`split_allocations_transferring_due`).
pub const OVERDUE_TRANSFERS_SQL: &str =
    "SELECT id FROM split_allocations WHERE status = 'TRANSFERRING' AND next_attempt_at < $1
                  ORDER BY next_attempt_at LIMIT $2";
/// reconcile-transfers: succeeded payments whose distribution has not started and is due before `$1`, at most `$2`
/// (`split_payments_undistributed`).
pub const UNDISTRIBUTED_SQL: &str =
    "SELECT id FROM split_payments WHERE status = 'SUCCEEDED' AND distributed_at IS NULL
                   AND coalesce(distribution_next_attempt_at, succeeded_at) < $1
                 ORDER BY succeeded_at LIMIT $2";
/// The transfer audit: payments due by `$1`, at most `$2` (`split_payments_audit_due`).
pub const AUDIT_DUE_SQL: &str = "SELECT id FROM split_payments WHERE audit_due_at IS NOT NULL AND audit_due_at <= $1
                  ORDER BY audit_due_at LIMIT $2";
/// After auditing payment `$1`: due again in a day, or never once past `$2` (the end of its audit window).
pub const AUDIT_RESCHEDULE_SQL: &str = "UPDATE split_payments
            SET audit_due_at = CASE WHEN now() + interval '1 day' <= $2 THEN now() + interval '1 day' END
          WHERE id = $1";
/// Allocations left TRANSFERRING with an unknown outcome past the retry window (`split_allocations_unresolved`).
pub const UNRESOLVED_COUNT_SQL: &str = "SELECT count(*) FROM split_allocations WHERE unresolved_at IS NOT NULL";

/// What to reconcile.
#[derive(Debug, Clone, Default)]
pub struct ReconcileOptions {
    /// Ignore the graces and intervals (`ops reconcile --now`).
    pub ignore_graces: bool,
    /// Only this payment.
    pub payment: Option<SplitPaymentId>,
    /// Do the work here rather than enqueue jobs (`ops reconcile`).
    pub inline: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PendingReport {
    /// Payments read at Stripe (or replayed, for CREATED).
    pub checked: usize,
    /// Payments whose state changed, by the state they reached.
    pub succeeded: usize,
    pub processing: usize,
    pub attempt_failed: usize,
    pub failed: usize,
    pub canceled: usize,
    /// Of those canceled or failed: abandoned PaymentIntents (`abandon_after`) and abandoned intakes.
    pub abandoned: usize,
    pub intake_abandoned: usize,
    /// Payments that could not be checked this time (Stripe or database errors); tried again next time.
    pub errors: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TransferReport {
    /// TRANSFERRING allocations driven again (jobs enqueued, or driven in the foreground).
    pub transfers_driven: usize,
    /// Of those driven in the foreground, how many ended TRANSFERRED.
    pub transfers_resolved: usize,
    /// Allocations still TRANSFERRING past the retry window with an unknown outcome (shown to operators).
    pub unresolved: i64,
    /// Succeeded payments whose distribution was (re)started.
    pub distributions: usize,
    /// Payments compared with Stripe by the audit.
    pub audited: usize,
    /// Transfers found at Stripe for our allocation's generation and recorded (TRANSFERRED from TRANSFERRING or
    /// PARKED).
    pub adopted: usize,
    /// New discrepancies reported (unknown, second or missing transfers).
    pub discrepancies: usize,
    pub errors: usize,
}

fn ms(d: u64) -> chrono::Duration {
    chrono::Duration::milliseconds(d as i64)
}

/// reconcile-pending: see the module documentation.
pub async fn reconcile_pending(ctx: &AppContext, opts: &ReconcileOptions) -> Result<PendingReport, StoreError> {
    let settings = &ctx.distribution.reconcile;
    let min_grace = settings.card_grace_ms.min(settings.debit_grace_ms);
    let ids: Vec<String> = if let Some(id) = &opts.payment {
        vec![id.to_string()]
    } else {
        let grace_cutoff = if opts.ignore_graces {
            Utc::now() + chrono::Duration::days(1)
        } else {
            Utc::now() - ms(min_grace)
        };
        let due_cutoff = if opts.ignore_graces {
            DateTime::<Utc>::MAX_UTC
        } else {
            Utc::now()
        };
        let rows: Vec<(String,)> = sqlx::query_as(PENDING_CANDIDATES_SQL)
            .bind(grace_cutoff)
            .bind(due_cutoff)
            .bind(settings.batch_max)
            .fetch_all(&ctx.pool)
            .await?;
        rows.into_iter().map(|(id,)| id).collect()
    };
    let mut report = PendingReport::default();
    for raw in ids {
        let Ok(id) = SplitPaymentId::parse(&raw) else {
            continue;
        };
        match reconcile_payment(ctx, &id, opts.ignore_graces, &mut report).await {
            Ok(()) => {}
            Err(e) => {
                report.errors += 1;
                tracing::warn!(split_payment_id = %id, error = %e, "reconcile-pending could not check a payment");
            }
        }
    }
    if report != PendingReport::default() {
        tracing::info!(?report, "reconcile-pending");
    }
    crate::observability::reconcile_pending_ran(&report);
    Ok(report)
}

async fn load(ctx: &AppContext, id: &SplitPaymentId) -> Result<SplitPayment, StoreError> {
    get_split_payment(&mut *ctx.pool.acquire().await?, id).await
}

/// Paces the next look at a non-final payment (a final one has left the partial indexes for good).
async fn schedule(ctx: &AppContext, id: &SplitPaymentId, at: DateTime<Utc>) -> Result<(), StoreError> {
    sqlx::query(SCHEDULE_RECONCILE_SQL)
        .bind(id.as_str())
        .bind(at)
        .execute(&ctx.pool)
        .await?;
    Ok(())
}

fn count(report: &mut PendingReport, to: Transition<PaymentStatus>, event: PaymentEvent) {
    if let Transition::To(status) = to {
        match (status, event) {
            (PaymentStatus::Succeeded, _) => report.succeeded += 1,
            (PaymentStatus::Processing, _) => report.processing += 1,
            (PaymentStatus::RequiresPayment, PaymentEvent::AttemptFailed) => report.attempt_failed += 1,
            (PaymentStatus::Failed, _) => report.failed += 1,
            (PaymentStatus::Canceled, _) => report.canceled += 1,
            _ => {}
        }
    }
}

async fn reconcile_payment(
    ctx: &AppContext,
    id: &SplitPaymentId,
    ignore_graces: bool,
    report: &mut PendingReport,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let settings = &ctx.distribution.reconcile;
    let payment = load(ctx, id).await?;
    let p = &payment.payment;
    if p.status.is_final() {
        return Ok(());
    }
    let now = Utc::now();
    let (grace_ms, interval_ms) = settings.pacing_ms(p.payment_method_type);
    if !ignore_graces && p.created_at + ms(grace_ms) > now {
        // Not yet: come back when this method's grace has passed.
        schedule(ctx, id, p.created_at + ms(grace_ms)).await?;
        return Ok(());
    }
    // Whatever happens below, the next look is an interval away (an error included: no hot loop on Stripe).
    schedule(ctx, id, now + ms(interval_ms)).await?;
    report.checked += 1;
    let age = now - p.created_at;

    if p.status == PaymentStatus::Created {
        return reconcile_created(ctx, &payment, age, report).await;
    }
    let Some(intent_id) = p.payment_intent_id.clone() else {
        return Ok(());
    };
    let intent = ctx.gateway.retrieve_payment_intent(&intent_id).await?;
    let view = IntentView::from_info(&intent, Utc::now());
    if let Some(event) = view.event_of_status() {
        let to = apply(ctx, id, event, &view, None).await?;
        count(report, to, event);
    }
    // Still unpaid after `abandon_after` (never while a debit is in flight): cancel the PaymentIntent.
    let payment = load(ctx, id).await?;
    if payment.payment.status == PaymentStatus::RequiresPayment && age > ms(settings.abandon_after_ms) {
        abandon(ctx, id, &intent_id, PaymentEvent::Canceled, "abandoned", report).await?;
    }
    Ok(())
}

/// Cancels an unpaid PaymentIntent and applies the outcome: `end` (CANCELED, or FAILED for an abandoned intake)
/// with `code`; or, if Stripe says the PaymentIntent moved on (it succeeded, or is processing), that.
async fn abandon(
    ctx: &AppContext,
    id: &SplitPaymentId,
    intent_id: &str,
    end: PaymentEvent,
    code: &str,
    report: &mut PendingReport,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (event, view) = match cancel_or_learn(ctx, id, intent_id).await? {
        None => (
            end,
            IntentView {
                intent_id: intent_id.to_owned(),
                status: None,
                latest_charge: None,
                error_code: Some(code.to_owned()),
                error_message: Some(match end {
                    PaymentEvent::Failed => INTAKE_ABANDONED_MESSAGE.to_owned(),
                    _ => "The payment was not completed in time; its PaymentIntent was canceled.".to_owned(),
                }),
                cancellation_reason: Some(code.to_owned()),
                observed_at: Utc::now(),
                from_webhook: false,
            },
        ),
        Some(current) => match current.event_of_status() {
            Some(e) => (e, current),
            None => return Ok(()),
        },
    };
    let to = apply(ctx, id, event, &view, None).await?;
    if matches!(to, Transition::To(_)) && event == end {
        if end == PaymentEvent::Failed {
            report.intake_abandoned += 1;
        } else {
            report.abandoned += 1;
        }
    }
    count(report, to, event);
    Ok(())
}

/// A CREATED payment: intake wrote it, then stopped (Stripe unreachable) and was never resumed.
async fn reconcile_created(
    ctx: &AppContext,
    payment: &SplitPayment,
    age: chrono::Duration,
    report: &mut PendingReport,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let id = SplitPaymentId::parse(&payment.payment.id)?;
    if age > chrono::Duration::hours(INTAKE_KEY_SAFE_AGE_HOURS) {
        // The intake key may be gone: a replay could create a new PaymentIntent. Fail without calling Stripe; a
        // PaymentIntent that did get created is still ours through its metadata, and its webhook (or a later
        // payment_intent event) is recorded against this FAILED payment as a contradiction for an operator.
        let view = IntentView {
            intent_id: String::new(),
            status: None,
            latest_charge: None,
            error_code: Some(INTAKE_ABANDONED.to_owned()),
            error_message: Some(
                "Intake could not reach Stripe and the payment was not resumed within 23 h.".to_owned(),
            ),
            cancellation_reason: None,
            observed_at: Utc::now(),
            from_webhook: false,
        };
        let to = apply(ctx, &id, PaymentEvent::Failed, &view, None).await?;
        if matches!(to, Transition::To(_)) {
            report.intake_abandoned += 1;
        }
        count(report, to, PaymentEvent::Failed);
        return Ok(());
    }
    // Replay the create under the stored key: Stripe answers with the PaymentIntent it made (or makes it now,
    // unconfirmed), which is canceled before anything is recorded: the payment stays CREATED until it is FAILED, so
    // a crash in between replays the same create on the next tick (never a live PaymentIntent left to wait out
    // `abandon_after`). A refusal fails the payment at submit, as intake would.
    // Never confirmed by this replay: a donor told the payment failed must not be charged now.
    let answer = match send_create(ctx, payment, Confirmation::Never).await {
        Ok(answer) => answer,
        Err(SendError::KeyUsedOtherwise(reason)) => {
            return Err(format!(
                "the original create reached Stripe with its payment method; its PaymentIntent is left to its \
                 webhooks: {reason}"
            )
            .into())
        }
        Err(SendError::Intake(IntakeError::StripeUnavailable(reason))) => return Err(reason.into()),
        Err(SendError::Intake(e)) => return Err(Box::new(e)),
    };
    match &answer.intent_id {
        Some(intent_id) => abandon(ctx, &id, intent_id, PaymentEvent::Failed, INTAKE_ABANDONED, report).await,
        None => {
            record_create(ctx, &id, payment, &answer).await?;
            let after = load(ctx, &id).await?;
            if after.payment.status.is_final() {
                count(report, Transition::To(after.payment.status), PaymentEvent::Failed);
            }
            Ok(())
        }
    }
}

/// reconcile-transfers: see the module documentation.
pub async fn reconcile_transfers(ctx: &AppContext, opts: &ReconcileOptions) -> Result<TransferReport, StoreError> {
    let settings = &ctx.distribution.reconcile;
    let mut report = TransferReport::default();
    let cutoff = if opts.ignore_graces {
        DateTime::<Utc>::MAX_UTC
    } else {
        Utc::now() - ms(settings.transfer_grace_ms)
    };

    // 1. TRANSFERRING allocations past their due time by more than the grace.
    let allocations: Vec<(String,)> = match &opts.payment {
        Some(p) => {
            sqlx::query_as(
                "SELECT id FROM split_allocations WHERE split_payment_id = $1 AND status = 'TRANSFERRING'
                  ORDER BY position",
            )
            .bind(p.as_str())
            .fetch_all(&ctx.pool)
            .await?
        }
        None => {
            sqlx::query_as(OVERDUE_TRANSFERS_SQL)
                .bind(cutoff)
                .bind(settings.batch_max)
                .fetch_all(&ctx.pool)
                .await?
        }
    };
    let allocation_ids: Vec<String> = allocations.into_iter().map(|(id,)| id).collect();
    if opts.inline {
        for raw in &allocation_ids {
            let Ok(aid) = SplitAllocationId::parse(raw) else {
                continue;
            };
            report.transfers_driven += 1;
            let c = allocation_context(&mut *ctx.pool.acquire().await?, &aid).await?;
            if let Err(e) = drive(ctx, &c).await {
                report.errors += 1;
                tracing::warn!(split_allocation_id = %aid, error = %e, "could not drive a transfer");
            }
            let after = allocation_context(&mut *ctx.pool.acquire().await?, &aid).await?;
            if after.allocation.status == AllocationStatus::Transferred {
                report.transfers_resolved += 1;
            }
        }
    } else {
        let mut conn = ctx.pool.acquire().await?;
        report.transfers_driven = enqueue_missing(&mut conn, Queue::Transfer, &allocation_ids)
            .await?
            .len();
    }

    // 2. Succeeded payments whose distribution has not started.
    let payments: Vec<(String,)> = match &opts.payment {
        Some(p) => {
            sqlx::query_as(
                "SELECT id FROM split_payments WHERE id = $1 AND status = 'SUCCEEDED' AND distributed_at IS NULL",
            )
            .bind(p.as_str())
            .fetch_all(&ctx.pool)
            .await?
        }
        None => {
            sqlx::query_as(UNDISTRIBUTED_SQL)
                .bind(cutoff)
                .bind(settings.batch_max)
                .fetch_all(&ctx.pool)
                .await?
        }
    };
    let payment_ids: Vec<String> = payments.into_iter().map(|(id,)| id).collect();
    if opts.inline {
        for raw in &payment_ids {
            report.distributions += 1;
            if let Err(e) = super::distribute::distribute(ctx, raw).await {
                report.errors += 1;
                tracing::warn!(split_payment_id = %raw, error = %e, "could not distribute");
            }
        }
    } else {
        let mut conn = ctx.pool.acquire().await?;
        report.distributions = enqueue_missing(&mut conn, Queue::Distribute, &payment_ids).await?.len();
    }

    // 3. The audit: each succeeded payment of the last `audit_days` days, about once a day.
    let audit: Vec<(String,)> = match &opts.payment {
        Some(p) => {
            sqlx::query_as("SELECT id FROM split_payments WHERE id = $1 AND status = 'SUCCEEDED'")
                .bind(p.as_str())
                .fetch_all(&ctx.pool)
                .await?
        }
        None => {
            sqlx::query_as(AUDIT_DUE_SQL)
                .bind(if opts.ignore_graces {
                    DateTime::<Utc>::MAX_UTC
                } else {
                    Utc::now()
                })
                .bind(settings.batch_max.min(AUDIT_BATCH_MAX))
                .fetch_all(&ctx.pool)
                .await?
        }
    };
    for (raw,) in audit {
        let Ok(id) = SplitPaymentId::parse(&raw) else {
            continue;
        };
        match audit_payment(ctx, &id, &mut report).await {
            Ok(()) => report.audited += 1,
            Err(e) => {
                report.errors += 1;
                tracing::warn!(split_payment_id = %id, error = %e, "transfer audit could not check a payment");
            }
        }
    }

    let (unresolved,): (i64,) = sqlx::query_as(UNRESOLVED_COUNT_SQL).fetch_one(&ctx.pool).await?;
    report.unresolved = unresolved;
    metrics::gauge!("splitpay_transfers_unresolved").set(unresolved as f64);
    crate::observability::reconcile_transfers_ran(&report);
    if report.transfers_driven + report.distributions + report.adopted + report.discrepancies + report.errors > 0 {
        tracing::info!(?report, "reconcile-transfers");
    }
    Ok(report)
}

/// Payments one audit tick compares with Stripe (one list call each, under the shared rate budget).
pub const AUDIT_BATCH_MAX: i64 = 50;

/// Compares Stripe's transfers in a payment's transfer group with our allocations.
async fn audit_payment(
    ctx: &AppContext,
    id: &SplitPaymentId,
    report: &mut TransferReport,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let payment = load(ctx, id).await?;
    // A failed list proves nothing: the payment stays due and is tried next tick.
    let transfers = ctx.gateway.list_transfers(&payment.payment.transfer_group).await?;
    for t in &transfers {
        let ours = payment
            .allocations
            .iter()
            .find(|a| t.metadata.get("split_allocation_id") == Some(&a.id));
        let generation: Option<i32> = t.metadata.get("generation").and_then(|g| g.parse().ok());
        let Some(a) = ours else {
            report.discrepancies += usize::from(
                record_discrepancy(
                    &mut *ctx.pool.acquire().await?,
                    &payment.payment.id,
                    None,
                    &t.id,
                    t.amount_cents,
                    "unknown_transfer",
                    "a transfer in this payment's transfer group names none of its allocations",
                )
                .await?,
            );
            continue;
        };
        if a.stripe_transfer_id.as_deref() == Some(t.id.as_str()) {
            continue; // ours, recorded
        }
        let adoptable = a.stripe_transfer_id.is_none()
            && matches!(a.status, AllocationStatus::Transferring | AllocationStatus::Parked)
            && generation == Some(a.generation);
        if adoptable {
            let aid = SplitAllocationId::parse(&a.id)?;
            succeed(ctx, &aid, t, a.generation).await.map_err(|e| e.to_string())?;
            let after = allocation_context(&mut *ctx.pool.acquire().await?, &aid).await?;
            if after.allocation.stripe_transfer_id.as_deref() == Some(t.id.as_str()) {
                report.adopted += 1;
                tracing::warn!(split_allocation_id = %aid, transfer_id = %t.id, "transfer found at Stripe and adopted");
                continue;
            }
        }
        let detail = format!(
            "allocation {} ({}, generation {}, transfer {:?}) has another transfer at Stripe of generation {:?}",
            a.id, a.status, a.generation, a.stripe_transfer_id, generation
        );
        report.discrepancies += usize::from(
            record_discrepancy(
                &mut *ctx.pool.acquire().await?,
                &payment.payment.id,
                Some(&a.id),
                &t.id,
                t.amount_cents,
                "second_transfer",
                &detail,
            )
            .await?,
        );
    }
    // And the other way: a transfer we recorded that Stripe does not show.
    for a in payment
        .allocations
        .iter()
        .filter(|a| a.status == AllocationStatus::Transferred)
    {
        let Some(tid) = a.stripe_transfer_id.as_deref() else {
            continue;
        };
        if !transfers.iter().any(|t| t.id == tid) {
            report.discrepancies += usize::from(
                record_discrepancy(
                    &mut *ctx.pool.acquire().await?,
                    &payment.payment.id,
                    Some(&a.id),
                    tid,
                    a.net_amount_cents.unwrap_or(0),
                    "missing_transfer",
                    "recorded as TRANSFERRED but Stripe does not list this transfer in the payment's group",
                )
                .await?,
            );
        }
    }
    // The window runs from success, or from the latest park, whichever is later.
    let last_parked = payment.allocations.iter().filter_map(|a| a.parked_at).max();
    let audit_until = payment
        .payment
        .succeeded_at
        .unwrap_or_else(Utc::now)
        .max(last_parked.unwrap_or(DateTime::<Utc>::MIN_UTC))
        + chrono::Duration::days(i64::from(ctx.distribution.reconcile.audit_days));
    sqlx::query(AUDIT_RESCHEDULE_SQL)
        .bind(id.as_str())
        .bind(audit_until)
        .execute(&ctx.pool)
        .await?;
    Ok(())
}

/// How long a reconcile tick may take before the next is considered.
pub const RECONCILE_TIMEOUT: Duration = Duration::from_secs(120);
