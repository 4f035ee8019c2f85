//! Disputes of split payments' charges (issue 8, point 3), in the caller's transaction and through the state
//! machines.
//!
//! - [`record_dispute`]: one row per Stripe dispute, written by whichever of its events comes first (they arrive
//!   in any order, and more than once), locked for the caller.
//! - [`withdraw`]: `charge.dispute.funds_withdrawn` is taken like a refund of the disputed amount: a `refunds` row
//!   (source `dispute`, written once per dispute) attributed and covered as any refund is (less transferred,
//!   parked net, reversals under the policy, platform loss), with `donation.refunded` once per dispute.
//! - [`apply_reinstatement`]: `charge.dispute.funds_reinstated` gives the withdrawal back, per share. Once no
//!   transfer of the shares it touched is in flight, the refund row is marked reinstated (its parts take nothing
//!   any more), the withdrawal's reversals Stripe has not made are canceled (never made later), each share that is
//!   owed money again (its reversal was made, or it was refunded before its transfer) starts a new generation with
//!   a new key through the transfer path, and each donation gets its refunded amount back down, `deleted_at`
//!   cleared, and `donation.refund_reversed` once per dispute.
//! - [`send_again_or_mark`]: a reversal of the withdrawal found made after all (its cancel was in doubt) is owed
//!   back to its share: sent now if the share is settled, else the share is marked and [`resend_if_marked`] sends
//!   it once the share is TRANSFERRED again (the transfer's success path, the refunds sweep).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::allocations::SplitAllocationRow;
use super::announce;
use super::donations::{donation_for_allocation, transition_donation, DonationPatch, DonationRow};
use super::records::insert_outbox_events;
use super::refunds::{RefundPartRow, RefundRow};
use super::{corrupt, StoreError, Tx};
use crate::domain::ids::{DonationId, SplitAllocationId, SplitPaymentId};
use crate::domain::state::{AllocationEvent, AllocationStatus, DonationEvent, DonationStatus};

/// What a dispute event's object says (immutable facts, and Stripe's status at the time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisputeInfo {
    pub id: String,
    pub charge_id: String,
    pub amount_cents: i64,
    pub currency: String,
    pub reason: Option<String>,
    pub status: String,
    /// Stripe's dispute fee net of any returned, summed over the event's `balance_transactions`.
    pub fee_cents: i64,
    /// How many balance transactions `fee_cents` was summed from.
    pub fee_balance_txns: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct DisputeRow {
    pub id: i64,
    pub stripe_dispute_id: String,
    pub split_payment_id: String,
    pub charge_id: String,
    pub amount_cents: i64,
    pub currency: String,
    pub reason: Option<String>,
    pub status: String,
    pub refund_id: Option<i64>,
    pub withdrawn_at: Option<DateTime<Utc>>,
    pub reinstate_seen_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// What the dispute cost the platform beyond the amount (Stripe's fee, net of one returned when won).
    pub fee_cents: i64,
    pub fee_balance_txns: i32,
}

/// Records the dispute once and refreshes Stripe's status (a closed one stays closed); returns the row, locked until the caller commits (so
/// two processors of the same dispute's events take turns).
pub async fn record_dispute(
    tx: &mut Tx<'_>,
    payment: &SplitPaymentId,
    info: &DisputeInfo,
) -> Result<DisputeRow, StoreError> {
    if info.amount_cents <= 0 {
        return Err(StoreError::Invalid(format!(
            "dispute {}: amount {} is not positive",
            info.id, info.amount_cents
        )));
    }
    Ok(sqlx::query_as::<_, DisputeRow>(
        "INSERT INTO disputes (stripe_dispute_id, split_payment_id, charge_id, amount_cents, currency, reason, status,
                               fee_cents, fee_balance_txns)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT ON CONSTRAINT disputes_stripe_id_once
         -- A closed dispute's status is final: a late or redelivered earlier event does not move it back.
         DO UPDATE SET status = CASE WHEN disputes.status IN ('won', 'lost', 'warning_closed') THEN disputes.status
                                     ELSE EXCLUDED.status END,
                       -- The fee from the event that saw the most balance transactions (they only accrue).
                       fee_cents = CASE WHEN EXCLUDED.fee_balance_txns >= disputes.fee_balance_txns
                                        THEN EXCLUDED.fee_cents ELSE disputes.fee_cents END,
                       fee_balance_txns = greatest(disputes.fee_balance_txns, EXCLUDED.fee_balance_txns),
                       updated_at = now()
         RETURNING *",
    )
    .bind(&info.id)
    .bind(payment.as_str())
    .bind(&info.charge_id)
    .bind(info.amount_cents)
    .bind(&info.currency)
    .bind(&info.reason)
    .bind(&info.status)
    .bind(info.fee_cents)
    .bind(info.fee_balance_txns)
    .fetch_one(&mut **tx)
    .await?)
}

/// The withdrawal, taken once like a refund of the disputed amount. Returns the refund row (to attribute) when this
/// call wrote it, `None` when the withdrawal was already taken.
pub async fn withdraw(tx: &mut Tx<'_>, dispute: &mut DisputeRow) -> Result<Option<RefundRow>, StoreError> {
    if dispute.refund_id.is_some() {
        return Ok(None);
    }
    let refund = sqlx::query_as::<_, RefundRow>(
        "INSERT INTO refunds (split_payment_id, charge_id, amount_cents, currency, status, reason, source)
         VALUES ($1, $2, $3, $4, 'SUCCEEDED', $5, 'dispute') RETURNING *",
    )
    .bind(&dispute.split_payment_id)
    .bind(&dispute.charge_id)
    .bind(dispute.amount_cents)
    .bind(&dispute.currency)
    .bind(dispute.reason.as_deref().map(|r| format!("dispute: {r}")))
    .fetch_one(&mut **tx)
    .await?;
    sqlx::query("UPDATE disputes SET refund_id = $2, withdrawn_at = now(), updated_at = now() WHERE id = $1")
        .bind(dispute.id)
        .bind(refund.id)
        .execute(&mut **tx)
        .await?;
    dispute.refund_id = Some(refund.id);
    Ok(Some(refund))
}

/// Notes that Stripe gave the funds back (once).
pub async fn note_reinstated(tx: &mut Tx<'_>, dispute: &DisputeRow) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE disputes SET reinstate_seen_at = coalesce(reinstate_seen_at, now()), updated_at = now() WHERE id = $1",
    )
    .bind(dispute.id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// What applying a reinstatement did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reinstatement {
    /// Applied now: these shares started a new generation (enqueue their transfers).
    Applied { transfers: Vec<SplitAllocationId> },
    /// Applied before (a duplicate or reordered event).
    AlreadyApplied,
    /// Not yet: a transfer of a share it touched is in flight; the refunds reconciler tries again.
    Waiting(String),
}

/// Applies a won dispute's reinstatement (see the module doc). The dispute's withdrawal must have been taken.
pub async fn apply_reinstatement(tx: &mut Tx<'_>, dispute: &DisputeRow) -> Result<Reinstatement, StoreError> {
    let refund_id = dispute.refund_id.ok_or_else(|| {
        StoreError::Invalid(format!(
            "dispute {}: reinstated before its withdrawal was taken",
            dispute.stripe_dispute_id
        ))
    })?;
    // The payment's shares before the withdrawal's refund row (review): a cover holding a share takes a key-share
    // lock on that row when it writes a reversal or adopts one for it, so the other order deadlocked.
    super::allocations::lock_payment_shares(tx, &dispute.split_payment_id).await?;
    let reinstated: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT reinstated_at FROM refunds WHERE id = $1 FOR UPDATE")
            .bind(refund_id)
            .fetch_one(&mut **tx)
            .await?;
    if reinstated.is_some() {
        return Ok(Reinstatement::AlreadyApplied);
    }
    // The payment's shares (locked above, in the order every refund path locks them).
    let allocations = sqlx::query_as::<_, SplitAllocationRow>(
        "SELECT * FROM split_allocations WHERE split_payment_id = $1 ORDER BY position FOR UPDATE",
    )
    .bind(&dispute.split_payment_id)
    .fetch_all(&mut **tx)
    .await?;
    let parts = sqlx::query_as::<_, RefundPartRow>(
        "SELECT * FROM refund_parts WHERE refund_id = $1 ORDER BY split_allocation_id",
    )
    .bind(refund_id)
    .fetch_all(&mut **tx)
    .await?;
    // Only a transfer in flight makes it wait (what it sends decides what the share is owed). A reversal of the
    // withdrawal that Stripe has not made is canceled below, never waited for: it may be refused for as long as
    // the recipient's balance is short.
    for part in &parts {
        let a = allocation_of(&allocations, &part.split_allocation_id)?;
        if a.status == AllocationStatus::Transferring {
            return Ok(Reinstatement::Waiting(format!("the transfer of {} is in flight", a.id)));
        }
        // Review (stop 20): a reversal of the share whose cancel is in doubt (an ops refund's, closed by this
        // dispute) decides what the share is owed; its settling covers the share's waiting part first.
        // Nor while a reversal made for a refund Stripe has not settled (an ops refund still pending) holds the
        // share (second review): if that refund succeeds, the reversal is its, and sending it back now would pay
        // the share twice.
        let unsettled = super::reversals::held_for_unsettled_refund(tx, &a.id).await?;
        if unsettled {
            return Ok(Reinstatement::Waiting(format!(
                "a reversal of {} waits for its refund to settle at Stripe",
                a.id
            )));
        }
        if a.status == AllocationStatus::Transferred && super::reversals::cancel_in_doubt(tx, a).await? {
            return Ok(Reinstatement::Waiting(format!(
                "a reversal of {} is being looked up at Stripe",
                a.id
            )));
        }
    }
    sqlx::query("UPDATE refunds SET reinstated_at = now(), updated_at = now() WHERE id = $1")
        .bind(refund_id)
        .execute(&mut **tx)
        .await?;
    // A part still waiting took nothing and announced nothing: it is dropped with the withdrawal.
    sqlx::query("DELETE FROM refund_parts WHERE refund_id = $1 AND covered_at IS NULL")
        .bind(refund_id)
        .execute(&mut **tx)
        .await?;
    // The withdrawal's reversals not made yet are never made: canceled now, or (a request may have reached Stripe)
    // after a lookup proves they were not made. One made after all is Stripe's word: the share is then sent what
    // it took ([`send_again_if_owed`]).
    let (canceled, to_look_up) = super::reversals::request_cancel(tx, refund_id).await?;
    if canceled + to_look_up > 0 {
        tracing::info!(dispute = %dispute.stripe_dispute_id, canceled, to_look_up, "withdrawal's reversals canceled");
    }
    let now = Utc::now();
    let mut transfers = Vec::new();
    for part in parts.iter().filter(|p| p.covered_at.is_some()) {
        let a = allocation_of(&allocations, &part.split_allocation_id)?;
        let id = SplitAllocationId::parse(&a.id).map_err(|e| corrupt("split allocation", &a.id, e))?;
        let resent = send_again_if_owed(tx, &id).await?;
        if resent {
            transfers.push(id.clone());
        }
        give_back_to_donation(tx, &id, &dispute.stripe_dispute_id, resent, now).await?;
    }
    Ok(Reinstatement::Applied { transfers })
}

/// A settled share (TRANSFERRED, or REFUNDED before its transfer) that is owed money again after a won dispute
/// starts a new generation (a new key) for what it is owed; the caller enqueues its transfer. Returns whether it
/// did. A share in flight does nothing here: a reversal of a withdrawal already given back that turns out to have
/// been made at Stripe goes through [`send_again_or_mark`], which marks such a share for later.
pub async fn send_again_if_owed(tx: &mut Tx<'_>, id: &SplitAllocationId) -> Result<bool, StoreError> {
    Ok(super::refunds::send_owed_again(tx, id, AllocationEvent::DisputeReinstated).await? > 0)
}

/// A reversal of a withdrawal given back was found made: its share is owed what it took. Sent now when the share is
/// settled ([`send_again_if_owed`]); otherwise (a won dispute's new generation in flight, or parked) nothing can be
/// sent yet, and the share is marked, in the caller's transaction, to be sent what it is owed once it is TRANSFERRED
/// again ([`resend_if_marked`]: the transfer's success path, or the refunds sweep). Returns whether a new generation
/// started now (the caller enqueues its transfer).
pub async fn send_again_or_mark(tx: &mut Tx<'_>, id: &SplitAllocationId) -> Result<bool, StoreError> {
    let resent = send_again_if_owed(tx, id).await?;
    // Under the share's lock (taken above): its status is current. A new generation sends all the share is owed,
    // so an older mark is spent; a share in flight is marked.
    sqlx::query(
        "UPDATE split_allocations
            SET resend_owed_at = CASE WHEN $2 THEN NULL ELSE coalesce(resend_owed_at, now()) END
          WHERE id = $1 AND ($2 OR status NOT IN ('TRANSFERRED', 'REFUNDED'))",
    )
    .bind(id.as_str())
    .bind(resent)
    .execute(&mut **tx)
    .await?;
    Ok(resent)
}

/// A share marked by [`send_again_or_mark`] that is settled again (TRANSFERRED, or REFUNDED) is sent what it is
/// still owed, and its mark cleared, in the caller's transaction. Both are read under the share's lock (taken first,
/// as every refund path does), so a second run (another replica's sweep, the transfer's success path) finds the mark
/// gone and sends nothing, and what is owed is what standing refunds and made reversals leave now. A share still in
/// flight keeps its mark. Returns whether a new generation started (the caller enqueues its transfer).
pub async fn resend_if_marked(tx: &mut Tx<'_>, id: &SplitAllocationId) -> Result<bool, StoreError> {
    let marked: Option<(String, Option<DateTime<Utc>>)> =
        sqlx::query_as("SELECT status, resend_owed_at FROM split_allocations WHERE id = $1 FOR UPDATE")
            .bind(id.as_str())
            .fetch_optional(&mut **tx)
            .await?;
    let Some((status, Some(_))) = marked else {
        return Ok(false);
    };
    if status != AllocationStatus::Transferred.as_str() && status != AllocationStatus::Refunded.as_str() {
        return Ok(false);
    }
    let resent = send_again_if_owed(tx, id).await?;
    sqlx::query("UPDATE split_allocations SET resend_owed_at = NULL WHERE id = $1")
        .bind(id.as_str())
        .execute(&mut **tx)
        .await?;
    Ok(resent)
}

/// Shares marked by [`send_again_or_mark`] and settled again (oldest mark first, bounded): the refunds sweep sends
/// them what they are owed. Served by a partial index: almost no share is ever marked.
pub async fn settled_shares_owed_a_resend(conn: &mut PgConnection, limit: i64) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar::<_, String>(
        "SELECT id FROM split_allocations
          WHERE resend_owed_at IS NOT NULL AND status IN ('TRANSFERRED', 'REFUNDED')
          ORDER BY resend_owed_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

fn allocation_of<'a>(allocations: &'a [SplitAllocationRow], id: &str) -> Result<&'a SplitAllocationRow, StoreError> {
    allocations
        .iter()
        .find(|a| a.id == id)
        .ok_or_else(|| StoreError::Invalid(format!("refund part names {id}, not one of the payment's shares")))
}

/// The donation after a won dispute, as the contract says: `refunded_amount_cents` back down to what the refunds
/// still standing took (never below 0), `deleted_at` cleared once it is no longer fully refunded, and
/// `donation.refund_reversed` once per dispute. Its status follows the share, not the event: still fully refunded
/// (another refund took the share), it stays REFUNDED; otherwise a REFUNDED donation is PENDING again when its
/// share is being sent anew (`resent`) or has not settled, and CONFIRMED when the recipient still holds the share
/// (its reversal was never made, or the platform bore the refund).
async fn give_back_to_donation(
    tx: &mut Tx<'_>,
    allocation: &SplitAllocationId,
    dispute_ref: &str,
    resent: bool,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let Some(donation) = donation_for_allocation(tx, allocation).await? else {
        return Ok(());
    };
    if donation.status == DonationStatus::Failed {
        return Ok(()); // a voided share's donation was never refunded
    }
    let did = DonationId::parse(&donation.id).map_err(|e| corrupt("donation", &donation.id, e))?;
    let a = super::allocations::get_split_allocation(tx, allocation).await?;
    let standing = super::refunds::taken(tx, allocation.as_str()).await?.parts_cents;
    let refunded = standing.clamp(0, donation.amount_cents);
    let still_fully =
        !resent && (a.status == AllocationStatus::Refunded || standing >= a.net_amount_cents.unwrap_or(i64::MAX));
    if donation.status == DonationStatus::Refunded && !still_fully {
        let event = if !resent && a.status == AllocationStatus::Transferred {
            DonationEvent::RefundReversedHeld
        } else {
            DonationEvent::RefundReversed
        };
        let patch = DonationPatch {
            refunded_amount_cents: Some(refunded),
            ..Default::default()
        };
        transition_donation(tx, &did, event, &patch, |d| {
            announce::donation_refund_reversed(d, dispute_ref, now)
                .into_iter()
                .collect()
        })
        .await?;
        return Ok(());
    }
    let row = sqlx::query_as::<_, DonationRow>(
        "UPDATE donations SET refunded_amount_cents = $2, updated_at = now() WHERE id = $1 RETURNING *",
    )
    .bind(did.as_str())
    .bind(refunded)
    .fetch_one(&mut **tx)
    .await?;
    insert_outbox_events(
        tx,
        &announce::donation_refund_reversed(&row, dispute_ref, now)
            .into_iter()
            .collect::<Vec<_>>(),
    )
    .await?;
    Ok(())
}

/// Won disputes whose reinstatement still waits (oldest first, bounded): the refunds reconciler applies them.
pub async fn waiting_reinstatements(conn: &mut PgConnection, limit: i64) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar::<_, String>(
        "SELECT d.stripe_dispute_id FROM disputes d JOIN refunds r ON r.id = d.refund_id
          WHERE d.reinstate_seen_at IS NOT NULL AND r.reinstated_at IS NULL
          ORDER BY d.reinstate_seen_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// The dispute row, locked for the caller's transaction.
pub async fn lock_dispute(tx: &mut Tx<'_>, stripe_dispute_id: &str) -> Result<DisputeRow, StoreError> {
    sqlx::query_as::<_, DisputeRow>("SELECT * FROM disputes WHERE stripe_dispute_id = $1 FOR UPDATE")
        .bind(stripe_dispute_id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "dispute",
            id: stripe_dispute_id.to_owned(),
        })
}

pub async fn disputes_for_payment(conn: &mut PgConnection, payment: &str) -> Result<Vec<DisputeRow>, StoreError> {
    Ok(
        sqlx::query_as::<_, DisputeRow>("SELECT * FROM disputes WHERE split_payment_id = $1 ORDER BY id")
            .bind(payment)
            .fetch_all(conn)
            .await?,
    )
}

/// A new withdrawal closes the payment's `ops refund` intents that Stripe has not answered (review F3): Stripe
/// refuses refunds of a disputed charge, so each such intent would only end FAILED after its reversal had moved
/// the recipient's money to the platform. Each intent ends FAILED now, its reversals not made are canceled (or, in
/// doubt, looked up first), and an audit row says why (actor `system`). Their reversals then no longer hold the
/// transfer against the withdrawal's own parts, which the caller attributes next. The payment's shares are locked
/// first, in the order `ops refund` takes them (one share, then its intent). Returns the intents closed.
pub async fn close_open_ops_refunds(
    tx: &mut Tx<'_>,
    payment: &SplitPaymentId,
    dispute: &str,
) -> Result<Vec<i64>, StoreError> {
    super::allocations::lock_payment_shares(tx, payment.as_str()).await?;
    let open: Vec<(i64, Option<String>)> = sqlx::query_as(
        "SELECT id, split_allocation_id FROM refunds
          WHERE split_payment_id = $1 AND source = 'ops' AND status = 'REQUESTED' ORDER BY id FOR UPDATE",
    )
    .bind(payment.as_str())
    .fetch_all(&mut **tx)
    .await?;
    let why = format!("the charge was disputed ({dispute}); Stripe refuses refunds of a disputed charge");
    for (refund_id, allocation) in &open {
        super::refunds::fail_refund_intent(tx, *refund_id, &why).await?;
        let (canceled, to_look_up) = super::reversals::request_cancel(tx, *refund_id).await?;
        super::records::insert_audit(
            tx,
            &super::records::AuditEntry {
                actor: crate::jobs::accounts::SYSTEM_ACTOR.to_owned(),
                command: "refund".to_owned(),
                target_type: "split_allocation".to_owned(),
                target_id: allocation.clone().unwrap_or_default(),
                reason: Some(why.clone()),
                details: serde_json::json!({
                    "parameters": { "refund": refund_id, "canceled_reversals": canceled,
                                    "reversals_to_look_up": to_look_up },
                    "result": format!("intent failed: {why}"),
                }),
            },
        )
        .await?;
        tracing::warn!(
            refund = refund_id,
            dispute,
            canceled,
            to_look_up,
            "ops refund intent closed by a dispute"
        );
    }
    Ok(open.into_iter().map(|(id, _)| id).collect())
}
