//! `splitpay ops refund <salc_…> --reason TEXT [--amount net|gross] [--reverse-transfer]`: refund one share to the
//! donor on the payment's PaymentIntent.
//!
//! - PARKED: the share is refunded from the parked net; the allocation ends REFUNDED.
//! - TRANSFERRED: only with `--reverse-transfer`: the transfer is reversed first, then the share is refunded.
//! - Anything else is refused (exit 1) with what to do next; a refused command writes nothing and calls nobody.
//!
//! Crash safety: the intent (a REQUESTED refund row with its key `splitpay:refund:{salc}:{seq}`, the reversal
//! intent with its own key, and the audit row) is committed before Stripe is called. Re-run after a crash or an
//! unknown outcome, the command finds the intent and re-sends the *same* key, so Stripe answers with the same refund.
//! Only a coded refusal Stripe saved under the key (the platform's balance was short) moves the intent to its next
//! key attempt (`{key}:k{n}`), since the same key would be refused again forever.
//! Stripe's `charge.refunded` for it later finds the refund recorded and changes nothing.

use std::io::Write;

use super::{Change, OpsError, Outcome};
use crate::app::AppContext;
use crate::domain::ids::SplitAllocationId;
use crate::domain::state::AllocationStatus;
use crate::jobs::refunds::{apply_refund, reverse};
use crate::store::allocations::{allocation_context, AllocationContext};
use crate::store::records::insert_audit;
use crate::store::refunds::{
    fail_refund_intent, insert_refund_intent, next_refund_key_attempt, open_refund_intent, taken, RefundIntent,
    RefundRow, REFUND_REF_KEY,
};
use crate::store::reversals::{adopt_reversals, cancel_in_doubt, get_reversal, insert_reversal, orphaned_reversals};
use crate::store::StoreError;
use crate::stripe::error::ErrorClass;
use crate::stripe::{CreateRefundParams, RefundReason, RefundTarget};

/// An intent first sent longer ago than this is looked up at Stripe before it is sent again: Stripe may prune an
/// idempotency key after 24 hours, and a re-send under a pruned key would make a second refund.
pub const KEY_PRUNE_SAFE_HOURS: i64 = 23;

/// What is refunded to the donor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RefundAmount {
    /// What the recipient would have received (the share's net): the platform keeps the share's fees.
    #[default]
    Net,
    /// The donor's whole gross share, fees included: the platform bears the fees (recorded as platform loss).
    Gross,
}

/// The plan for one share, before anything is written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    refund_cents: i64,
    fee_refunded_cents: i64,
    reversal_cents: i64,
    /// Reversals of the transfer made for a refund that no longer stands (a refund Stripe refused, an intent a
    /// dispute closed): their money is on the platform's balance, so this refund takes them instead of reversing
    /// that much again.
    adopted_reversals: Vec<i64>,
    adopted_cents: i64,
}

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefundRequest<'a> {
    /// The share (`salc_…`), as typed.
    pub allocation: &'a str,
    pub amount: RefundAmount,
    pub reverse_transfer: bool,
}

pub async fn run(
    ctx: &AppContext,
    request: RefundRequest<'_>,
    change: &Change,
    json: bool,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Outcome, OpsError> {
    let RefundRequest {
        allocation: raw_id,
        amount,
        reverse_transfer,
    } = request;
    let Ok(id) = SplitAllocationId::parse(raw_id) else {
        return super::usage(err, &format!("'{raw_id}' is not a split allocation id (salc_…)"));
    };
    let Some(reason) = change.reason.clone().filter(|r| !r.trim().is_empty()) else {
        return super::usage(
            err,
            "--reason is required: say why the donor is refunded (it goes to the audit log)",
        );
    };
    let mut conn = ctx.pool.acquire().await?;
    let c = match allocation_context(&mut conn, &id).await {
        Ok(c) => c,
        Err(StoreError::NotFound { .. }) => {
            writeln!(
                err,
                "no split allocation {id}; find it with `splitpay ops show <pi_…|spay_…>`"
            )?;
            return Ok(Outcome::Refused);
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(open) = open_refund_intent(&mut conn, &id).await? {
        drop(conn);
        writeln!(
            err,
            "resuming refund {} of {id} ({} cents) with its key: Stripe answers a resent key with the same refund",
            open.id, open.amount_cents
        )?;
        if change.dry_run {
            let plan = serde_json::json!({ "action": "resend refund", "target": id.as_str(), "refund": open.id,
                                            "amount_cents": open.amount_cents });
            return super::print_dry_run(out, json, &plan);
        }
        return send(ctx, &c, &open, change, json, out, err).await;
    }
    // Stripe refuses any refund of a charge that was disputed (`charge_disputed`), won or lost: a reversal made
    // first would leave the recipient's money stranded on the platform. Refused before anything is written.
    if let Some(dispute) = dispute_of(&mut conn, &c.payment.id).await? {
        writeln!(
            err,
            "refused: the payment's charge was disputed ({dispute}), and Stripe refuses refunds of a disputed charge; \
             see `splitpay ops show {}`",
            c.payment.id
        )?;
        return Ok(Outcome::Refused);
    }
    let plan = match plan_for(&mut conn, &c, amount, reverse_transfer).await? {
        Ok(plan) => plan,
        Err(refusal) => {
            writeln!(err, "refused: {refusal}")?;
            return Ok(Outcome::Refused);
        }
    };
    drop(conn);
    let document = serde_json::json!({
        "action": "refund", "target": id.as_str(), "status": c.allocation.status.as_str(),
        "amount": amount, "refund_cents": plan.refund_cents, "fee_refunded_cents": plan.fee_refunded_cents,
        "reversal_cents": plan.reversal_cents, "reversal_reused_cents": plan.adopted_cents,
        "currency": c.payment.currency.iso_code(),
        "payment_intent": c.payment.payment_intent_id,
    });
    if change.dry_run {
        return super::print_dry_run(out, json, &document);
    }
    if !super::confirm(
        change,
        &format!(
            "refund {} to the donor of {id}{}",
            super::money(Some(plan.refund_cents), &c.payment.currency.iso_code()),
            if plan.reversal_cents > 0 {
                " after reversing the transfer"
            } else {
                ""
            }
        ),
        err,
    )? {
        return Ok(Outcome::Refused);
    }

    // The intent, the reversal intent and the audit row, committed before Stripe is called.
    let mut tx = ctx.pool.begin().await?;
    let locked: Option<String> = sqlx::query_scalar("SELECT status FROM split_allocations WHERE id = $1 FOR UPDATE")
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
    if locked.as_deref() != Some(c.allocation.status.as_str()) {
        writeln!(
            err,
            "refused: {id} changed meanwhile (now {locked:?}); run the command again"
        )?;
        return Ok(Outcome::Refused);
    }
    // Two operators (or a script run twice) must not both write a refund: any refund of this share still open at
    // Stripe is found here, under the row lock, and the second command is refused.
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM refunds WHERE split_allocation_id = $1 AND status IN ('REQUESTED', 'PENDING')",
    )
    .bind(id.as_str())
    .fetch_one(&mut *tx)
    .await?;
    if open > 0 {
        writeln!(
            err,
            "refused: a refund of {id} is already open at Stripe; see splitpay ops show {id}, or run the command again to resend it"
        )?;
        return Ok(Outcome::Refused);
    }
    // Checked again under the lock: a dispute recorded since the first look would make Stripe refuse the refund
    // after the reversal was made.
    if let Some(dispute) = dispute_of(&mut tx, &c.payment.id).await? {
        writeln!(
            err,
            "refused: the payment's charge was disputed ({dispute}) meanwhile, and Stripe refuses refunds of a \
             disputed charge; see `splitpay ops show {}`",
            c.payment.id
        )?;
        return Ok(Outcome::Refused);
    }
    // The amounts too: a refund covered or a reversal settled since the plan was shown changes what is left.
    if plan_for(&mut tx, &c, amount, reverse_transfer).await?.as_ref() != Ok(&plan) {
        writeln!(
            err,
            "refused: what is left of {id} changed since the plan was made; run the command again"
        )?;
        return Ok(Outcome::Refused);
    }
    let currency = c.payment.currency.iso_code().to_lowercase();
    let refund = insert_refund_intent(
        &mut tx,
        &RefundIntent {
            split_payment_id: &c.payment.id,
            split_allocation_id: &id,
            amount_cents: plan.refund_cents,
            fee_refunded_cents: plan.fee_refunded_cents,
            currency: &currency,
            reason: &reason,
        },
    )
    .await?;
    if plan.reversal_cents > 0 {
        insert_reversal(&mut tx, &c.allocation, plan.reversal_cents, Some(refund.id)).await?;
    }
    // The plan, made again under the share's lock, read the same orphaned reversals (locked since): each moves to
    // this refund. A cover that took one meanwhile (a dispute's or a refund's part, giving the rest back to the
    // recipient) changed the plan above; a count that differs all the same writes nothing.
    if adopt_reversals(&mut tx, &plan.adopted_reversals, refund.id).await? != plan.adopted_reversals.len() as u64 {
        writeln!(
            err,
            "refused: a reversal of {id} that this refund would reuse was taken by another refund meanwhile; run the \
             command again"
        )?;
        return Ok(Outcome::Refused);
    }
    let mut details = document.clone();
    details["refund"] = refund.id.into();
    details["idempotency_key"] = refund.idempotency_key.clone().into();
    insert_audit(
        &mut tx,
        &change.audit("refund", "split_allocation", id.as_str(), details),
    )
    .await?;
    tx.commit().await?;
    send(ctx, &c, &refund, change, json, out, err).await
}

/// The first dispute of the payment's charge, if any. Stripe refuses any refund of a disputed charge
/// (`charge_disputed`), won or lost, so a reversal made for such a refund would strand the recipient's money on the
/// platform. Read under the share's row lock where it decides: a dispute's withdrawal locks the shares it covers, so
/// it either committed before (and is seen here) or waits for this command.
async fn dispute_of(conn: &mut sqlx::PgConnection, payment: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT stripe_dispute_id FROM disputes WHERE split_payment_id = $1 ORDER BY id LIMIT 1")
        .bind(payment)
        .fetch_optional(conn)
        .await
}

/// What refunding this share means, or why it is refused (and what to do instead).
async fn plan_for(
    conn: &mut sqlx::PgConnection,
    c: &AllocationContext,
    amount: RefundAmount,
    reverse_transfer: bool,
) -> Result<Result<Plan, String>, OpsError> {
    let a = &c.allocation;
    let so_far = taken(conn, &a.id).await?;
    let net = a.net_amount_cents.unwrap_or(0);
    let gross_left = a.gross_amount_cents - so_far.parts_cents;
    let mut adopted_reversals = Vec::new();
    let mut adopted_cents = 0;
    let (net_left, reversal_cents) = match a.status {
        // What the parked share holds: what it is owed and does not hold (the same as its net less what refunds
        // took, unless an earlier generation was transferred and partly reversed).
        AllocationStatus::Parked => (crate::store::refunds::outstanding_cents(conn, &a.id, net).await?, 0),
        AllocationStatus::Transferred if !reverse_transfer => {
            return Ok(Err(format!(
                "{} is TRANSFERRED: the recipient has the money. Add --reverse-transfer to take it back from the \
                 recipient first, then refund the donor",
                a.id
            )))
        }
        AllocationStatus::Transferred if cancel_in_doubt(conn, a).await? => {
            return Ok(Err(format!(
                "a reversal of {}'s transfer had its cancel requested while Stripe may have made it; until its \
                 look-up at Stripe settles it (within about 10 minutes, `splitpay ops show {}`) nobody can tell \
                 how much the recipient still holds. Run the command again after that",
                a.id, a.id
            )))
        }
        AllocationStatus::Transferred => {
            for (reversal, amount_cents) in orphaned_reversals(conn, a).await? {
                adopted_reversals.push(reversal);
                adopted_cents += amount_cents;
            }
            let (transferred, reversed): (i64, i64) = sqlx::query_as(
                "SELECT coalesce((SELECT amount_cents FROM transfer_attempts
                                   WHERE split_allocation_id = $1 AND generation = $2 AND outcome = 'TRANSFERRED'), 0),
                        coalesce((SELECT sum(amount_cents) FROM transfer_reversals
                                   WHERE split_allocation_id = $1 AND stripe_transfer_id = $3
                                     AND status <> 'CANCELED' AND NOT id = ANY($4)), 0)::bigint",
            )
            .bind(&a.id)
            .bind(a.generation)
            // Only this transfer's reversals: an earlier generation's (before a won dispute) are not this one's.
            .bind(a.stripe_transfer_id.as_deref().unwrap_or(""))
            .bind(&adopted_reversals)
            .fetch_one(&mut *conn)
            .await?;
            // What the recipient was sent less what other refunds took back: the donor's; only what the adopted
            // reversals did not already take back is reversed anew.
            let left = transferred - reversed;
            (left, left - adopted_cents)
        }
        AllocationStatus::Pending | AllocationStatus::Transferring => {
            return Ok(Err(format!(
                "{} is {}: its transfer has not settled. Wait until it is TRANSFERRED or PARKED (`splitpay ops show \
                 {}`), or refund the donor at Stripe and let splitpay attribute it",
                a.id, a.status, a.id
            )))
        }
        AllocationStatus::Refunded | AllocationStatus::Voided => {
            return Ok(Err(format!(
                "{} is {}: there is nothing left to refund (see `splitpay ops show {}`)",
                a.id, a.status, a.id
            )))
        }
    };
    let refund_cents = match amount {
        RefundAmount::Net => net_left,
        RefundAmount::Gross => gross_left.max(net_left),
    };
    if refund_cents <= 0 {
        // The hint to refund the fees only when some of the gross share is still not back with the donor: after a
        // gross refund there is nothing left to suggest.
        return Ok(Err(match amount {
            RefundAmount::Net if gross_left > 0 => format!(
                "{}: its net share is already refunded or was 0 (the fees took it); --amount gross refunds the \
                 {gross_left} cents of fees still with the platform",
                a.id
            ),
            _ => format!(
                "{}: the donor already has all of this share back (see `splitpay ops show {}`)",
                a.id, a.id
            ),
        }));
    }
    Ok(Ok(Plan {
        refund_cents,
        fee_refunded_cents: refund_cents - net_left.max(0),
        reversal_cents: reversal_cents.max(0),
        adopted_reversals,
        adopted_cents,
    }))
}

/// Makes the intent's reversal (if any) and then its refund, with their stored keys, and records what Stripe said.
async fn send(
    ctx: &AppContext,
    c: &AllocationContext,
    refund: &RefundRow,
    change: &Change,
    json: bool,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<Outcome, OpsError> {
    // An intent resumed (or sent) after the charge was disputed: Stripe would refuse the refund, so nothing more is
    // sent. Under the share's lock, the intent ends FAILED and its reversals not yet made are canceled (one that
    // may have reached Stripe is looked up by the reversal job first); a reversal already made is listed by
    // `ops parked` as reversed without a refund. Audited: this run changed the intent.
    let mut tx = ctx.pool.begin().await?;
    sqlx::query("SELECT 1 FROM split_allocations WHERE id = $1 FOR UPDATE")
        .bind(&c.allocation.id)
        .execute(&mut *tx)
        .await?;
    if let Some(dispute) = dispute_of(&mut tx, &c.payment.id).await? {
        let why = format!("the charge was disputed ({dispute}); Stripe refuses refunds of a disputed charge");
        fail_refund_intent(&mut tx, refund.id, &why).await?;
        let (canceled, looked_up) = crate::store::reversals::request_cancel(&mut tx, refund.id).await?;
        let mut entry = change.audit(
            "refund",
            "split_allocation",
            &c.allocation.id,
            serde_json::json!({ "refund": refund.id, "canceled_reversals": canceled,
                                "reversals_to_look_up": looked_up }),
        );
        entry.details["result"] = format!("intent failed: {why}").into();
        insert_audit(&mut tx, &entry).await?;
        tx.commit().await?;
        writeln!(
            err,
            "not refunded: {why}. Refund {} is closed as FAILED and its reversals not yet made are canceled; see \
             `splitpay ops show {}` (a reversal already made is listed by `splitpay ops parked`)",
            refund.id, c.payment.id
        )?;
        return Ok(Outcome::Refused);
    }
    drop(tx);
    let pending: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM transfer_reversals WHERE cause_refund_id = $1 AND status = 'PENDING' ORDER BY id",
    )
    .bind(refund.id)
    .fetch_all(&ctx.pool)
    .await?;
    for reversal in pending {
        // Due now for the operator, whatever the schedule said: the same key, so never a second reversal.
        sqlx::query("UPDATE transfer_reversals SET next_attempt_at = now() WHERE id = $1 AND status = 'PENDING'")
            .bind(reversal)
            .execute(&ctx.pool)
            .await?;
        reverse(ctx, &reversal.to_string())
            .await
            .map_err(|e| format!("reversal {reversal}: {e}"))?;
        let r = get_reversal(&mut *ctx.pool.acquire().await?, reversal).await?;
        if r.status != "SUCCEEDED" {
            writeln!(
                err,
                "the reversal of {} was not made: {}. It is retried automatically with the same key; the donor is \
                 refunded when you run this command again after it succeeds (`splitpay ops show {}`)",
                r.stripe_transfer_id,
                r.failure_message.as_deref().unwrap_or("no answer"),
                c.allocation.id
            )?;
            return Ok(Outcome::Refused);
        }
    }
    let Some(intent) = c.payment.payment_intent_id.clone() else {
        writeln!(err, "refused: payment {} has no PaymentIntent", c.payment.id)?;
        return Ok(Outcome::Refused);
    };
    let key = refund.key().ok_or("an ops refund always has its key")?;
    let metadata = [
        ("split_allocation_id", c.allocation.id.clone()),
        ("split_payment_id", c.payment.id.clone()),
        (REFUND_REF_KEY, refund.id.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let params = CreateRefundParams {
        target: RefundTarget::PaymentIntent(intent),
        amount_cents: Some(refund.amount_cents),
        reason: Some(RefundReason::RequestedByCustomer),
        metadata,
        idempotency_key: key,
    };
    // Stripe may prune a key after 24 hours: an intent first sent longer ago than that is looked up among the
    // charge's refunds (our row id is in their metadata) and adopted if Stripe made it, never made a second time.
    let adopted = if chrono::Utc::now() - refund.created_at > chrono::Duration::hours(KEY_PRUNE_SAFE_HOURS) {
        let Some(charge) = c.payment.charge_id.as_deref() else {
            writeln!(err, "refused: payment {} has no charge recorded", c.payment.id)?;
            return Ok(Outcome::Refused);
        };
        match ctx.gateway.list_refunds(charge).await {
            Ok(refunds) => refunds
                .into_iter()
                .find(|r| r.metadata.get(REFUND_REF_KEY) == Some(&refund.id.to_string())),
            Err(e) => {
                writeln!(
                    err,
                    "refund {} was first sent over {KEY_PRUNE_SAFE_HOURS} h ago, so Stripe may have forgotten its \
                     key, and its refunds could not be listed ({e}); nothing was sent. Run the command again later",
                    refund.id
                )?;
                return Ok(Outcome::Refused);
            }
        }
    } else {
        None
    };
    if let Some(found) = &adopted {
        writeln!(
            err,
            "Stripe already made refund {} for this intent: recorded, not sent again",
            found.id
        )?;
    }
    let answer = match adopted {
        Some(info) => Ok(info),
        None => ctx.gateway.create_refund(&params).await,
    };
    match answer {
        Ok(info) => {
            let payment = crate::domain::ids::SplitPaymentId::parse(&c.payment.id)?;
            let mut tx = ctx.pool.begin().await?;
            let covered = apply_refund(ctx, &mut tx, &payment, &info, "ops")
                .await
                .map_err(|e| e.to_string())?;
            crate::jobs::refunds::enqueue_covered(&mut tx, covered).await?;
            tx.commit().await?;
            let status = info.status.clone().unwrap_or_default();
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({ "refunded": { "target": c.allocation.id, "refund": info.id,
                        "amount_cents": info.amount_cents, "status": status } })
                )?;
            } else {
                writeln!(
                    out,
                    "refund {} of {} for {}: {status}{}",
                    info.id,
                    super::money(Some(info.amount_cents), &c.payment.currency.iso_code()),
                    c.allocation.id,
                    if status == "succeeded" {
                        ""
                    } else {
                        " (Stripe finishes it; its webhook records the outcome)"
                    }
                )?;
            }
            Ok(Outcome::Done)
        }
        Err(e) if e.class() == ErrorClass::Terminal && !e.is_idempotency_misuse() => {
            // Its reversal, if made, may cover a part that booked it as the platform's loss meanwhile (second
            // review): given to that part in the same transaction, the rest sent back to the recipient.
            let mut tx = ctx.pool.begin().await?;
            // Shares first, then the intent: the order a withdrawal takes them in.
            crate::store::allocations::lock_payment_shares(&mut tx, &c.payment.id).await?;
            fail_refund_intent(&mut tx, refund.id, &e.to_string()).await?;
            let covered =
                crate::store::reversals::rehome_reversals_of(&mut tx, refund.id, ctx.distribution.reverse_on_refund)
                    .await?;
            crate::jobs::refunds::enqueue_covered(&mut tx, covered).await?;
            tx.commit().await?;
            writeln!(err, "Stripe refused the refund: {e}. Nothing was refunded.")?;
            Ok(Outcome::Refused)
        }
        Err(e) if e.class() == ErrorClass::Retryable => {
            // Stripe saved a coded refusal (the platform's balance was short) under this key and would replay it:
            // the intent's next send takes the next key attempt. Nothing was refunded under this one.
            if e.is_saved_refusal() {
                next_refund_key_attempt(&mut *ctx.pool.acquire().await?, refund.id, refund.key_attempt).await?;
            }
            writeln!(
                err,
                "Stripe did not make the refund now ({e}); nothing was refunded. The intent is kept: run the same \
                 command again later (e.g. once the platform's available balance covers it); it re-sends the same key"
            )?;
            Ok(Outcome::Refused)
        }
        Err(e) => {
            writeln!(
                err,
                "the refund's outcome is unknown ({e}). Run the same command again: it re-sends the same key, so \
                 Stripe answers with the same refund and never makes a second one"
            )?;
            Ok(Outcome::Refused)
        }
    }
}
