//! Refunds to donors: the record of each Stripe refund of a split payment's charge (once per refund id), its
//! attribution to allocations (`refund_parts`), and the covering of each part by the allocation's state, in the
//! caller's transaction and through the state machines. Reversals a part calls for are written here as intents
//! ([`super::reversals`]) and made by the reversal job.
//!
//! A part is covered when its allocation's money is where it will stay: PENDING (with its fee split written) takes
//! it from what will be transferred, PARKED from the parked net, TRANSFERRED by a reversal (policy), REFUNDED or
//! VOIDED as platform loss. While a transfer is in flight (TRANSFERRING, or PENDING before the fee split) the part
//! waits; [`cover_waiting_parts`] is called when the transfer settles, after the fee split, and by the refunds
//! reconciler, so a waiting part is always picked up.
//!
//! A transferred share's part first takes the reversals of its transfer made for a refund that no longer stands
//! (orphans: an `ops refund` intent a dispute closed, a refund Stripe failed), all of them, whatever their size: it
//! uses of their money what the policy has the recipient bear (its share of the part under `proportional`,
//! nothing under `none`, where the platform bears refunds), and only what they fall short of is reversed anew.
//! What the part does not use is the recipient's money that a failed refund took: the share's next waiting part
//! uses it first, and the rest goes back to the recipient as a new generation started in the same transaction
//! (`excess_reversal_returned`), sending exactly what the share is owed ([`outstanding_cents`]). The store knows no
//! job queue: [`Covered`] carries the reversals and transfers for the caller to enqueue in that transaction.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::allocations::{get_split_allocation, transition_allocation, AllocationPatch, SplitAllocationRow};
use super::announce;
use super::donations::{add_refunded_amount, donation_for_allocation, transition_donation, DonationPatch};
use super::records::insert_outbox_events;
use super::reversals::{
    adopt_reversals, cancel_in_doubt, held_for_unsettled_refund, insert_reversal, orphaned_reversals,
    reversed_by_refund,
};
use super::{corrupt, StoreError, Tx};
use crate::app::ReversePolicy;
use crate::domain::ids::{DonationId, SplitAllocationId, SplitPaymentId};
use crate::domain::refund_split::{spread, Cover, Share};
use crate::domain::state::{AllocationEvent, AllocationStatus, DonationEvent, Transition};
use crate::stripe::RefundInfo;

pub use super::refund_terms::{
    allocations_with_waiting_parts, outstanding_cents, parts_for_payment, refunds_for_payment, taken, Taken,
};

/// Metadata key naming our refund row on a refund splitpay makes, so its webhook finds the intent even when the
/// process crashed before it stored Stripe's id.
pub const REFUND_REF_KEY: &str = "splitpay_refund_ref";

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct RefundRow {
    pub id: i64,
    pub stripe_refund_id: Option<String>,
    pub split_payment_id: String,
    pub charge_id: Option<String>,
    pub amount_cents: i64,
    pub currency: String,
    /// REQUESTED (intent written, no answer yet), PENDING, SUCCEEDED, FAILED, CANCELED.
    pub status: String,
    pub reason: Option<String>,
    /// `ops`, `external` or `dispute`.
    pub source: String,
    pub split_allocation_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub fee_refunded_cents: i64,
    pub failure_message: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub attributed_at: Option<DateTime<Utc>>,
    /// A dispute's withdrawal given back (the dispute was won): its parts take nothing any more.
    pub reinstated_at: Option<DateTime<Utc>>,
    /// Which key an `ops refund` intent sends: `idempotency_key` at 1, `{key}:k{n}` after ([`RefundRow::key`]).
    pub key_attempt: i32,
}

impl RefundRow {
    /// The idempotency key the next request for this intent sends (refunds splitpay makes only).
    pub fn key(&self) -> Option<String> {
        self.idempotency_key
            .as_deref()
            .map(|k| crate::domain::ids::attempt_key(k, self.key_attempt))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct RefundPartRow {
    pub refund_id: i64,
    pub split_allocation_id: String,
    pub amount_cents: i64,
    pub from_parked_cents: i64,
    pub from_pending_cents: i64,
    pub reversal_cents: i64,
    pub platform_loss_cents: i64,
    pub created_at: DateTime<Utc>,
    pub covered_at: Option<DateTime<Utc>>,
}

/// Our status for Stripe's refund status. `requires_action` waits like `pending`.
pub fn status_of(stripe_status: Option<&str>) -> &'static str {
    match stripe_status {
        Some("succeeded") => "SUCCEEDED",
        Some("failed") => "FAILED",
        Some("canceled") => "CANCELED",
        _ => "PENDING",
    }
}

/// What `ops refund` writes before it calls Stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundIntent<'a> {
    pub split_payment_id: &'a str,
    pub split_allocation_id: &'a SplitAllocationId,
    pub amount_cents: i64,
    pub fee_refunded_cents: i64,
    pub currency: &'a str,
    pub reason: &'a str,
}

/// Writes an `ops refund` intent (REQUESTED) with its key `splitpay:refund:{salc}:{seq}`, the sequence being one
/// more than the allocation's earlier ops refunds. Commit it before calling Stripe.
pub async fn insert_refund_intent(tx: &mut Tx<'_>, intent: &RefundIntent<'_>) -> Result<RefundRow, StoreError> {
    let (seq,): (i64,) =
        sqlx::query_as("SELECT count(*) + 1 FROM refunds WHERE split_allocation_id = $1 AND source = 'ops'")
            .bind(intent.split_allocation_id.as_str())
            .fetch_one(&mut **tx)
            .await?;
    let key = crate::domain::ids::refund_idempotency_key(intent.split_allocation_id, seq);
    Ok(sqlx::query_as::<_, RefundRow>(
        "INSERT INTO refunds (split_payment_id, amount_cents, currency, status, reason, source, split_allocation_id,
                              idempotency_key, fee_refunded_cents)
         VALUES ($1, $2, $3, 'REQUESTED', $4, 'ops', $5, $6, $7) RETURNING *",
    )
    .bind(intent.split_payment_id)
    .bind(intent.amount_cents)
    .bind(intent.currency)
    .bind(intent.reason)
    .bind(intent.split_allocation_id.as_str())
    .bind(&key)
    .bind(intent.fee_refunded_cents)
    .fetch_one(&mut **tx)
    .await?)
}

/// The allocation's `ops refund` still waiting for Stripe's answer (a crash or an unknown outcome): re-run, it
/// re-sends the same key.
pub async fn open_refund_intent(
    conn: &mut PgConnection,
    allocation: &SplitAllocationId,
) -> Result<Option<RefundRow>, StoreError> {
    Ok(sqlx::query_as::<_, RefundRow>(
        "SELECT * FROM refunds WHERE split_allocation_id = $1 AND source = 'ops' AND status = 'REQUESTED'
          ORDER BY id LIMIT 1",
    )
    .bind(allocation.as_str())
    .fetch_optional(conn)
    .await?)
}

/// Stripe answered key attempt `refused_attempt` of a REQUESTED intent with a saved, coded 4xx refusal it will
/// replay for that key (e.g. the platform's balance was short): the intent moves to its next key attempt, once.
/// Returns whether it moved.
pub async fn next_refund_key_attempt(
    conn: &mut PgConnection,
    id: i64,
    refused_attempt: i32,
) -> Result<bool, StoreError> {
    let moved = sqlx::query(
        "UPDATE refunds SET key_attempt = key_attempt + 1, updated_at = now()
          WHERE id = $1 AND status = 'REQUESTED' AND key_attempt = $2",
    )
    .bind(id)
    .bind(refused_attempt)
    .execute(conn)
    .await?;
    Ok(moved.rows_affected() == 1)
}

/// Marks an `ops refund` intent that Stripe refused for good: FAILED, nothing moved.
pub async fn fail_refund_intent(conn: &mut PgConnection, id: i64, message: &str) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE refunds SET status = 'FAILED', failure_message = $2, updated_at = now()
          WHERE id = $1 AND status = 'REQUESTED'",
    )
    .bind(id)
    .bind(message)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records what Stripe shows of one refund of `payment`'s charge, once: an intent of ours named in its metadata
/// gets Stripe's id; any other refund is inserted (`external`, or `source`), a repeat changes nothing but a status
/// that moved on (PENDING → SUCCEEDED/FAILED). Returns the row, locked for the caller's transaction.
pub async fn record_stripe_refund(
    tx: &mut Tx<'_>,
    payment: &SplitPaymentId,
    info: &RefundInfo,
    source: &str,
) -> Result<RefundRow, StoreError> {
    let status = status_of(info.status.as_deref());
    if let Some(our_id) = info.metadata.get(REFUND_REF_KEY).and_then(|r| r.parse::<i64>().ok()) {
        sqlx::query(
            "UPDATE refunds SET stripe_refund_id = $3, charge_id = $4, status = $5, updated_at = now()
              WHERE id = $1 AND split_payment_id = $2 AND stripe_refund_id IS NULL",
        )
        .bind(our_id)
        .bind(payment.as_str())
        .bind(&info.id)
        .bind(&info.charge)
        .bind(status)
        .execute(&mut **tx)
        .await?;
    }
    let named = info
        .metadata
        .get("split_allocation_id")
        .and_then(|raw| SplitAllocationId::parse(raw).ok());
    // A named allocation must be one of this payment's; otherwise the refund is spread like any other.
    let named = match named {
        Some(a) => {
            sqlx::query_scalar::<_, String>("SELECT id FROM split_allocations WHERE id = $1 AND split_payment_id = $2")
                .bind(a.as_str())
                .bind(payment.as_str())
                .fetch_optional(&mut **tx)
                .await?
        }
        None => None,
    };
    sqlx::query(
        "INSERT INTO refunds (stripe_refund_id, split_payment_id, charge_id, amount_cents, currency, status, reason,
                              source, split_allocation_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT ON CONSTRAINT refunds_stripe_id_once DO NOTHING",
    )
    .bind(&info.id)
    .bind(payment.as_str())
    .bind(&info.charge)
    .bind(info.amount_cents)
    .bind(&info.currency)
    .bind(status)
    .bind(&info.reason)
    .bind(source)
    .bind(&named)
    .execute(&mut **tx)
    .await?;
    // A status moves on only from a waiting one: a SUCCEEDED refund's money has moved and stays accounted.
    Ok(sqlx::query_as::<_, RefundRow>(
        "UPDATE refunds SET status = CASE WHEN status IN ('REQUESTED', 'PENDING') THEN $2 ELSE status END,
                updated_at = now()
          WHERE stripe_refund_id = $1 RETURNING *",
    )
    .bind(&info.id)
    .bind(status)
    .fetch_one(&mut **tx)
    .await?)
}

/// What covering refund parts calls for at Stripe, for the caller to enqueue in its transaction (the store does not
/// know the job queues): reversal intents to make, and shares that started a new generation to transfer. Dropping
/// either leaves money owed with nothing to move it, hence `must_use`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use = "the reversals and transfers must be enqueued in the same transaction"]
pub struct Covered {
    /// `transfer_reversals` ids written PENDING, due now.
    pub reversals: Vec<i64>,
    /// Shares moved to TRANSFERRING with a new generation (what a reversal took beyond what a refund used of it).
    pub transfers: Vec<SplitAllocationId>,
}

impl Covered {
    pub fn is_empty(&self) -> bool {
        self.reversals.is_empty() && self.transfers.is_empty()
    }

    pub fn extend(&mut self, other: Covered) {
        self.reversals.extend(other.reversals);
        self.transfers.extend(other.transfers);
    }
}

/// Writes a SUCCEEDED refund's parts, once (a refund already attributed writes nothing), then covers each
/// allocation's waiting parts. Returns what the caller enqueues in the same transaction.
pub async fn attribute_refund(
    tx: &mut Tx<'_>,
    refund: &RefundRow,
    policy: ReversePolicy,
) -> Result<Covered, StoreError> {
    if refund.status != "SUCCEEDED" || refund.attributed_at.is_some() {
        return Ok(Covered::default());
    }
    // Locks the refund row: two processors of the same refund attribute it once.
    let attributed: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT attributed_at FROM refunds WHERE id = $1 FOR UPDATE")
            .bind(refund.id)
            .fetch_one(&mut **tx)
            .await?;
    if attributed.is_some() {
        return Ok(Covered::default());
    }
    let allocations = sqlx::query_as::<_, SplitAllocationRow>(
        "SELECT * FROM split_allocations WHERE split_payment_id = $1 ORDER BY position FOR UPDATE",
    )
    .bind(&refund.split_payment_id)
    .fetch_all(&mut **tx)
    .await?;
    let already: Vec<(String, i64)> = sqlx::query_as(
        "SELECT split_allocation_id, sum(amount_cents)::bigint FROM refund_parts
          WHERE split_allocation_id IN (SELECT id FROM split_allocations WHERE split_payment_id = $1)
          GROUP BY split_allocation_id",
    )
    .bind(&refund.split_payment_id)
    .fetch_all(&mut **tx)
    .await?;
    let attributed_to = |id: &str| already.iter().find(|(a, _)| a == id).map_or(0, |(_, c)| *c);
    let parts: Vec<i64> = match refund.split_allocation_id.as_deref() {
        Some(named) => allocations
            .iter()
            .map(|a| if a.id == named { refund.amount_cents } else { 0 })
            .collect(),
        None => {
            let shares: Vec<Share> = allocations
                .iter()
                .map(|a| Share {
                    gross_cents: a.gross_amount_cents,
                    refundable_cents: if a.status == AllocationStatus::Voided {
                        0
                    } else {
                        a.gross_amount_cents - attributed_to(&a.id)
                    },
                })
                .collect();
            spread(refund.amount_cents, &shares)
                .map_err(|e| StoreError::Invalid(format!("refund {:?}: {e}", refund.stripe_refund_id)))?
        }
    };
    for (a, &part) in allocations.iter().zip(&parts).filter(|(_, &p)| p > 0) {
        sqlx::query("INSERT INTO refund_parts (refund_id, split_allocation_id, amount_cents) VALUES ($1, $2, $3)")
            .bind(refund.id)
            .bind(&a.id)
            .bind(part)
            .execute(&mut **tx)
            .await?;
    }
    sqlx::query("UPDATE refunds SET attributed_at = now(), updated_at = now() WHERE id = $1")
        .bind(refund.id)
        .execute(&mut **tx)
        .await?;
    let mut covered = Covered::default();
    for (a, _) in allocations.iter().zip(&parts).filter(|(_, &p)| p > 0) {
        let id = SplitAllocationId::parse(&a.id).map_err(|e| corrupt("split allocation", &a.id, e))?;
        covered.extend(cover_waiting_parts(tx, &id, policy).await?);
    }
    Ok(covered)
}

/// Covers the allocation's waiting parts by its state now (see the module doc), moving the allocation and its
/// donation on and emitting `donation.refunded` once per part. Parts of a transfer in flight keep waiting. Returns
/// the reversal intents written and the share if it started a new generation (an orphan's money it did not use),
/// for the caller to enqueue in the same transaction.
pub async fn cover_waiting_parts(
    tx: &mut Tx<'_>,
    id: &SplitAllocationId,
    policy: ReversePolicy,
) -> Result<Covered, StoreError> {
    // The allocation is locked before its waiting parts and its reversal rows are read: two covers at once (the
    // transfer job and the reconciler), a rehome and `ops refund` take turns, and the second reads what the first
    // left (an orphan is taken once).
    sqlx::query("SELECT 1 FROM split_allocations WHERE id = $1 FOR UPDATE")
        .bind(id.as_str())
        .execute(&mut **tx)
        .await?;
    let waiting = sqlx::query_as::<_, RefundPartRow>(
        "SELECT * FROM refund_parts WHERE split_allocation_id = $1 AND covered_at IS NULL ORDER BY refund_id",
    )
    .bind(id.as_str())
    .fetch_all(&mut **tx)
    .await?;
    let mut covered = Covered::default();
    if waiting.is_empty() {
        return Ok(covered);
    }
    // Orphans' money taken by an earlier part of this call that it did not use: the recipient's. The next part
    // here uses it first; what is left after the last goes back to the recipient.
    let mut unused_cents = 0;
    for part in waiting {
        let a = get_split_allocation(tx, id).await?;
        let so_far = taken(tx, id.as_str()).await?;
        // A PARKED share holds what it is owed and does not hold (review: a share parked again after an earlier
        // generation was transferred and partly reversed, e.g. an orphan's excess sent back and refused, holds less
        // than its net less what parts took from the parked net: refunding that much gave the donor more than the
        // share). For a share never transferred the two are the same.
        let net_left = match (a.status, a.net_amount_cents) {
            (AllocationStatus::Parked, Some(net)) => Some(outstanding_cents(tx, id.as_str(), net).await?),
            (_, net) => net.map(|n| n - so_far.taken_net_cents),
        };
        // What is reversed anew for this part, the made reversals it takes over, and what of their money (with
        // what earlier parts left) it does not use.
        let mut send_cents = 0;
        let mut adopt = Vec::new();
        let mut left_unused = unused_cents;
        let cover = match (a.status, a.net_amount_cents) {
            (AllocationStatus::Transferring, _) | (AllocationStatus::Pending, None) => break,
            (AllocationStatus::Pending, Some(net)) => {
                Cover::pending(part.amount_cents, net, a.gross_amount_cents, net_left.unwrap_or(0))
            }
            (AllocationStatus::Parked, _) => Cover::parked(part.amount_cents, net_left.unwrap_or(0)),
            // A reversal of this transfer whose cancel is in doubt: wait for its lookup (the sweep comes back).
            (AllocationStatus::Transferred, _) if cancel_in_doubt(tx, &a).await? => break,
            (AllocationStatus::Transferred, net) => {
                let premade = reversed_by_refund(tx, part.refund_id, id.as_str()).await?;
                if premade > 0 {
                    // `ops refund --reverse-transfer` reversed before it refunded: that reversal is this part's.
                    let reversal_cents = premade.min(part.amount_cents);
                    Cover {
                        reversal_cents,
                        platform_loss_cents: part.amount_cents - reversal_cents,
                        ..Cover::default()
                    }
                } else {
                    // Reversals made for a refund that no longer stands are this part's, all of them (their money
                    // is on the platform already): it uses what the policy has the recipient bear, only the rest
                    // of that is reversed anew, and what it does not use goes back to the recipient.
                    let orphans = orphaned_reversals(tx, &a).await?;
                    let orphaned_cents: i64 = orphans.iter().map(|(_, cents)| cents).sum();
                    let transferred = transferred_cents(tx, &a).await?;
                    let adopting = Cover::transferred_adopting(
                        part.amount_cents,
                        net.unwrap_or(0),
                        a.gross_amount_cents,
                        transferred - reversals_of_transfer(tx, &a).await?,
                        policy == ReversePolicy::Proportional,
                        unused_cents + orphaned_cents,
                    );
                    // Giving back sends what the share is owed, and a reversal made for a refund Stripe has not
                    // settled counts in that: sent now, it would be paid twice if that refund succeeds. Wait for
                    // it (its webhook, or the operator's `ops refund` run again, covers this part after).
                    if orphaned_cents > 0 && adopting.unused_cents > 0 && held_for_unsettled_refund(tx, &a.id).await? {
                        tracing::info!(split_allocation_id = %id, refund_id = part.refund_id,
                                       "a part that takes an orphaned reversal waits: a reversal of the share belongs to a refund not settled");
                        break;
                    }
                    adopt = orphans.into_iter().map(|(reversal, _)| reversal).collect();
                    send_cents = adopting.send_cents;
                    left_unused = adopting.unused_cents;
                    adopting.cover
                }
            }
            (AllocationStatus::Refunded | AllocationStatus::Voided, _) => Cover::loss(part.amount_cents),
        };
        assert_eq!(cover.total(), part.amount_cents, "a part is covered exactly");
        let covered_now = sqlx::query(
            "UPDATE refund_parts SET from_parked_cents = $3, from_pending_cents = $4, reversal_cents = $5,
                    platform_loss_cents = $6, covered_at = now()
              WHERE refund_id = $1 AND split_allocation_id = $2 AND covered_at IS NULL",
        )
        .bind(part.refund_id)
        .bind(id.as_str())
        .bind(cover.from_parked_cents)
        .bind(cover.from_pending_cents)
        .bind(cover.reversal_cents)
        .bind(cover.platform_loss_cents)
        .execute(&mut **tx)
        .await?;
        if covered_now.rows_affected() == 0 {
            continue; // covered by someone else meanwhile: its reversal, amounts and event are theirs
        }
        // Read and locked above under the share's lock: every row still moves.
        if adopt_reversals(tx, &adopt, part.refund_id).await? != adopt.len() as u64 {
            return Err(StoreError::LostRace {
                what: "split allocation",
                id: id.to_string(),
                expected: "its orphaned reversals unchanged under its lock".to_owned(),
            });
        }
        unused_cents = left_unused;
        if send_cents > 0 {
            covered
                .reversals
                .push(insert_reversal(tx, &a, send_cents, Some(part.refund_id)).await?);
        }
        let left = net_left.unwrap_or(0) - cover.from_parked_cents - cover.from_pending_cents;
        let event = match a.status {
            AllocationStatus::Pending if left <= 0 => Some(AllocationEvent::RefundedBeforeTransfer),
            AllocationStatus::Parked if left <= 0 => Some(AllocationEvent::Refunded),
            _ => None,
        };
        if let Some(event) = event {
            transition_allocation(tx, id, event, &AllocationPatch::default(), &[]).await?;
        }
        let fully = event.is_some() || so_far.parts_cents + part.amount_cents >= a.net_amount_cents.unwrap_or(i64::MAX);
        refund_donation(tx, id, part.refund_id, part.amount_cents, fully).await?;
    }
    // The orphans' money no part used is the recipient's.
    return_unused(tx, id, unused_cents, &mut covered).await?;
    Ok(covered)
}

/// What orphaned reversals held beyond the parts that took them (`unused_cents`) is the recipient's: a new
/// generation (`excess_reversal_returned`) sends what the share is owed, which is exactly that (its net, less what
/// standing refunds took, less what Stripe holds for it); its transfer is added to `covered` for the caller to
/// enqueue. Shared by the cover and the rehome of a failed refund's reversals.
pub(crate) async fn return_unused(
    tx: &mut Tx<'_>,
    id: &SplitAllocationId,
    unused_cents: i64,
    covered: &mut Covered,
) -> Result<(), StoreError> {
    if unused_cents <= 0 {
        return Ok(());
    }
    let owed = send_owed_again(tx, id, AllocationEvent::ExcessReversalReturned).await?;
    if owed != unused_cents {
        tracing::error!(split_allocation_id = %id, owed, unused_cents,
                        "an orphaned reversal's excess differs from what the share is owed: sent what it is owed");
        metrics::counter!("splitpay_orphan_excess_mismatch_total").increment(1);
    }
    if owed > 0 {
        tracing::warn!(split_allocation_id = %id, amount_cents = owed,
                       "a reversal made for a refund that no longer stands held more than the parts it covers use: the rest is sent back");
        covered.transfers.push(id.clone());
    }
    Ok(())
}

/// Starts a new generation of a settled share for what it is owed ([`outstanding_cents`]), by `event` (a won
/// dispute, an excess reversal given back), if it is owed anything and the state machine lets `event` move it;
/// the caller enqueues its transfer. Returns the amount the generation sends (0: nothing started). Locks the share.
pub(super) async fn send_owed_again(
    tx: &mut Tx<'_>,
    id: &SplitAllocationId,
    event: AllocationEvent,
) -> Result<i64, StoreError> {
    let a = sqlx::query_as::<_, SplitAllocationRow>("SELECT * FROM split_allocations WHERE id = $1 FOR UPDATE")
        .bind(id.as_str())
        .fetch_one(&mut **tx)
        .await?;
    let owed = match a.net_amount_cents {
        Some(net) => outstanding_cents(tx, &a.id, net).await?,
        None => 0,
    };
    if owed <= 0 || !matches!(a.status.apply(event), Ok(Transition::To(_))) {
        return Ok(0);
    }
    transition_allocation(tx, id, event, &AllocationPatch::default(), &[]).await?;
    Ok(owed)
}

/// Every reversal of the allocation's current transfer, made or still to be made, whatever caused it (a refund's
/// part, `ops refund --reverse-transfer`): what is left of the transfer to reverse is its amount less these. An
/// earlier generation's reversals are not this transfer's (a won dispute sent a new one). A reversal whose cancel
/// was requested (its refund no longer stands) is never sent again and holds nothing: while a request of it may
/// have been applied, [`cover_waiting_parts`] does not come here (its parts wait for the lookup); found made, it is
/// SUCCEEDED and counts (and is adopted by the next part if its refund failed).
pub(crate) async fn reversals_of_transfer(conn: &mut PgConnection, a: &SplitAllocationRow) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar::<_, i64>(
        "SELECT coalesce(sum(amount_cents), 0)::bigint FROM transfer_reversals
          WHERE split_allocation_id = $1 AND stripe_transfer_id = $2 AND status <> 'CANCELED'
            AND NOT (status = 'PENDING' AND cancel_requested_at IS NOT NULL)",
    )
    .bind(&a.id)
    .bind(a.stripe_transfer_id.as_deref().unwrap_or(""))
    .fetch_one(conn)
    .await?)
}

/// The amount of the allocation's transfer (its current generation's, as frozen).
async fn transferred_cents(conn: &mut PgConnection, a: &SplitAllocationRow) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar::<_, i64>(
        "SELECT amount_cents FROM transfer_attempts
          WHERE split_allocation_id = $1 AND generation = $2 AND outcome = 'TRANSFERRED'",
    )
    .bind(&a.id)
    .bind(a.generation)
    .fetch_optional(conn)
    .await?
    .unwrap_or(0))
}

/// The donation grows by the part and gets its `donation.refunded` (once per refund id); fully refunded (the
/// recipient's whole net share went back, or the share ended REFUNDED), it ends REFUNDED with `deleted_at`.
async fn refund_donation(
    tx: &mut Tx<'_>,
    allocation: &SplitAllocationId,
    refund_id: i64,
    part_cents: i64,
    fully: bool,
) -> Result<(), StoreError> {
    let Some(donation) = donation_for_allocation(tx, allocation).await? else {
        return Ok(());
    };
    let did = DonationId::parse(&donation.id).map_err(|e| corrupt("donation", &donation.id, e))?;
    let refund_ref = refund_ref(tx, refund_id).await?;
    let now = Utc::now();
    let row = add_refunded_amount(tx, &did, part_cents).await?;
    let moved = if fully {
        let patch = DonationPatch {
            refunded_amount_cents: Some(row.refunded_amount_cents),
            ..Default::default()
        };
        // A FAILED donation (a voided share) is never refunded: its payment took nothing.
        match transition_donation(tx, &did, DonationEvent::Refunded, &patch, |d| {
            announce::donation_refunded(d, &refund_ref, now).into_iter().collect()
        })
        .await
        {
            Ok(crate::domain::state::Transition::To(_)) => true,
            Ok(_) | Err(StoreError::Forbidden(_)) => false,
            Err(e) => return Err(e),
        }
    } else {
        false
    };
    if !moved {
        insert_outbox_events(
            tx,
            &announce::donation_refunded(&row, &refund_ref, now)
                .into_iter()
                .collect::<Vec<_>>(),
        )
        .await?;
    }
    Ok(())
}

/// The refund's name in events: Stripe's id (the dispute's for a dispute's withdrawal; our row id while Stripe has
/// not answered).
async fn refund_ref(conn: &mut PgConnection, refund_id: i64) -> Result<String, StoreError> {
    let stripe: Option<String> = sqlx::query_scalar(
        "SELECT coalesce(r.stripe_refund_id, d.stripe_dispute_id)
           FROM refunds r LEFT JOIN disputes d ON d.refund_id = r.id WHERE r.id = $1",
    )
    .bind(refund_id)
    .fetch_one(conn)
    .await?;
    Ok(stripe.unwrap_or_else(|| format!("refund_{refund_id}")))
}
