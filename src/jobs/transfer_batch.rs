//! Records the transfers Stripe made for many shares in one transaction: group commit for the hot path (issue 11),
//! through [`super::group_commit`].
//!
//! Every transfer step that got its transfer from Stripe hands it to its context's [`Recorder`] and waits for the
//! answer; a batch costs about ten statements whatever its size, where recording one transfer alone costs ten.
//!
//! The batch takes only the plain case, decided on the rows it read locked: the share still TRANSFERRING at the
//! generation that was driven, with no resend owed, and its donation confirmable or already confirmed. Its writes
//! are the ones a lone recording makes (`transfer::record`), with the state machines deciding each status. Anything
//! else (a share moved on, a second transfer, a refunded donation), a failed batch, and a batch whose writer was
//! dropped (the runtime shutting down, a panic), is answered "not recorded", and the step records that transfer
//! alone, as before: the batch never decides an unusual case, and nothing it could not write is lost. Its
//! transaction either writes all of its plain transfers or none.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::Utc;

use super::group_commit::{BatchWrite, GroupCommit};
use crate::app::AppContext;
use crate::domain::ids::SplitAllocationId;
use crate::domain::state::{AllocationEvent, AllocationStatus, DonationEvent, DonationStatus, Transition};
use crate::events::EventType;
use crate::store::allocations::{AllocationContext, SplitAllocationRow};
use crate::store::announce;
use crate::store::donations::DonationRow;
use crate::store::records::insert_outbox_events;
use crate::store::StoreError;
use crate::stripe::TransferInfo;

// The batch's statements, in the order it runs them (`tests/scale.rs` plans each over a large table, custom and
// generic plans).

/// The shares of a batch, locked in order; a share another transaction holds is skipped.
pub const LOCK_SHARES_SQL: &str =
    "SELECT * FROM split_allocations WHERE id = ANY($1) ORDER BY split_payment_id, position
            FOR UPDATE SKIP LOCKED";
/// The held shares' donations, locked.
pub const DONATIONS_SQL: &str =
    "SELECT * FROM donations WHERE split_allocation_id = ANY($1) ORDER BY split_allocation_id FOR UPDATE";
/// The generations' attempts end TRANSFERRED: (share ids, generations, transfer ids).
pub const ATTEMPTS_TRANSFERRED_SQL: &str = "UPDATE transfer_attempts t
            SET finished_at = now(), outcome = 'TRANSFERRED', stripe_transfer_id = u.transfer_id,
                failure_code = NULL, failure_message = NULL
           FROM unnest($1::text[], $2::int4[], $3::text[]) AS u (id, generation, transfer_id)
          WHERE t.split_allocation_id = u.id AND t.generation = u.generation";
/// The shares move TRANSFERRING → TRANSFERRED: (share ids, generations, transfer ids, the status to, the status
/// from).
///
/// The status guarded is a parameter, not a literal. With `a.status = 'TRANSFERRING'` the planner could answer the
/// statement from the partial index of the shares in flight (`split_allocations_transferring_due`), and the plan,
/// made once for the batch's transaction (generic), did so in burn-down: a bitmap scan of every share in flight to
/// find a batch's few, on statistics taken when the table was small (auto_explain). A parameter cannot prove that
/// index's predicate, so the shares are found by key; `tests/scale.rs` checks the generic plan.
pub const SHARES_TRANSFERRED_SQL: &str = "UPDATE split_allocations a
            SET status = $4, stripe_transfer_id = u.transfer_id, next_attempt_at = NULL, unresolved_at = NULL,
                parked_at = NULL, transferred_at = now(), updated_at = now()
           FROM unnest($1::text[], $2::int4[], $3::text[]) AS u (id, generation, transfer_id)
          WHERE a.id = u.id AND a.status = $5 AND a.generation = u.generation";
/// The donations move: (donation ids, statuses from, statuses to, received date).
pub const DONATIONS_CONFIRMED_SQL: &str = "UPDATE donations d
                SET status = u.next, received_date = $4,
                    deleted_at = CASE WHEN u.next = 'REFUNDED' THEN now() WHEN u.prior = 'REFUNDED' THEN NULL
                                      ELSE d.deleted_at END,
                    updated_at = now()
               FROM unnest($1::text[], $2::text[], $3::text[]) AS u (id, prior, next)
              WHERE d.id = u.id AND d.status = u.prior
             RETURNING d.*";
/// The shares with refund parts not yet covered. "Not covered" is asked of each share's parts (`HAVING`), not in the
/// `WHERE`, where it would match the predicate of the partial index of every waiting part (`refund_parts_waiting`)
/// and a plan made once (generic) on a young table could read that whole index for a batch's few shares, as the start
/// batch's event lookup did (see `start_batch::LOCK_EVENTS_SQL`).
pub const WAITING_PARTS_SQL: &str = "SELECT split_allocation_id FROM refund_parts WHERE split_allocation_id = ANY($1)
          GROUP BY split_allocation_id HAVING bool_or(covered_at IS NULL) ORDER BY split_allocation_id";

/// Transfers written by one transaction at most.
pub const BATCH_MAX: usize = 64;

/// One context's queue of transfers to record.
pub type Recorder = GroupCommit<RecordTransfers>;

/// The batched recording of transfers (see the module's comment).
pub struct RecordTransfers;

pub struct Item {
    c: AllocationContext,
    transfer: TransferInfo,
}

impl BatchWrite for RecordTransfers {
    type Item = Item;
    type Answer = ();
    const KIND: &'static str = "record";
    const BATCH_MAX: usize = BATCH_MAX;

    fn of(ctx: &AppContext) -> &Arc<GroupCommit<Self>> {
        &ctx.recorder
    }

    fn describe(batch: &[Item]) -> String {
        let shares: Vec<&str> = batch.iter().map(|i| i.c.allocation.id.as_str()).collect();
        format!("shares {shares:?}")
    }

    async fn write(ctx: &AppContext, batch: &[Item]) -> Result<Vec<Option<()>>, StoreError> {
        Ok(write(ctx, batch)
            .await?
            .into_iter()
            .map(|recorded| recorded.then_some(()))
            .collect())
    }
}

impl GroupCommit<RecordTransfers> {
    /// Records `transfer` as the one `c`'s generation made, in a batch with whatever else is waiting. `true`: it is
    /// recorded (TRANSFERRED, the donation CONFIRMED, the events written). `false`: the batch did not take it, and
    /// the caller must record it alone.
    pub async fn record(&self, ctx: &AppContext, c: &AllocationContext, transfer: &TransferInfo) -> bool {
        debug_assert!(
            std::ptr::eq(self, &*ctx.recorder),
            "a context's steps record through its own recorder"
        );
        let item = Item {
            c: c.clone(),
            transfer: transfer.clone(),
        };
        GroupCommit::<RecordTransfers>::submit(ctx, item).await.is_some()
    }
}

/// Writes the batch's plain transfers in one transaction; returns, item by item, whether it recorded it.
async fn write(ctx: &AppContext, batch: &[Item]) -> Result<Vec<bool>, StoreError> {
    let ids: Vec<&str> = batch.iter().map(|i| i.c.allocation.id.as_str()).collect();
    let mut tx = ctx.pool.begin().await?;
    crate::store::generic_plans(&mut tx).await?;
    // The shares, locked in the order every path that locks several takes (a payment's in position order), then
    // their donations (a donation after its share, as everywhere). A share another transaction holds (a refund, an
    // operator) is skipped rather than waited for: it is recorded alone, and the rest of the batch goes on.
    let shares: Vec<SplitAllocationRow> = sqlx::query_as(LOCK_SHARES_SQL).bind(&ids).fetch_all(&mut *tx).await?;
    // Only the donations of shares this transaction holds: a skipped share's donation is its holder's to lock.
    let held: Vec<&str> = shares.iter().map(|a| a.id.as_str()).collect();
    let donations: Vec<DonationRow> = sqlx::query_as(DONATIONS_SQL).bind(&held).fetch_all(&mut *tx).await?;
    let shares: HashMap<&str, &SplitAllocationRow> = shares.iter().map(|a| (a.id.as_str(), a)).collect();
    let donations: HashMap<&str, &DonationRow> =
        donations.iter().map(|d| (d.split_allocation_id.as_str(), d)).collect();

    // What each plain item moves to, decided by the state machines on the locked rows.
    let mut seen = HashSet::new();
    let mut plain = vec![false; batch.len()];
    let mut confirm: Vec<(&DonationRow, DonationStatus)> = Vec::new();
    let mut events = Vec::new();
    let now = Utc::now();
    for (n, item) in batch.iter().enumerate() {
        let Some(share) = shares.get(item.c.allocation.id.as_str()) else {
            continue;
        };
        let moves = share.status == AllocationStatus::Transferring
            && share.generation == item.c.allocation.generation
            && share.resend_owed_at.is_none()
            && matches!(
                share.status.apply(AllocationEvent::TransferSucceeded),
                Ok(Transition::To(AllocationStatus::Transferred))
            );
        let donation = donations.get(share.id.as_str()).copied();
        let donation_move = match donation.map(|d| d.status.apply(DonationEvent::Confirmed)) {
            None | Some(Ok(Transition::Unchanged)) => Ok(None),
            Some(Ok(Transition::To(next))) => Ok(Some(next)),
            Some(Err(e)) => Err(e),
        };
        let Ok(donation_move) = donation_move else {
            continue; // a donation the transfer cannot confirm: recorded alone, which decides what to do
        };
        if !moves || !seen.insert(share.id.as_str()) {
            continue;
        }
        plain[n] = true;
        let c = AllocationContext {
            allocation: (*share).clone(),
            ..item.c.clone()
        };
        events.push(announce::distribution(
            EventType::DistributionSucceeded,
            &c,
            Some(&item.transfer.id),
            None,
            now,
        ));
        if let (Some(d), Some(next)) = (donation, donation_move) {
            confirm.push((d, next));
        }
    }
    let recorded: Vec<&Item> = batch.iter().zip(&plain).filter(|(_, p)| **p).map(|(i, _)| i).collect();
    if recorded.is_empty() {
        return Ok(plain);
    }
    let ids: Vec<&str> = recorded.iter().map(|i| i.c.allocation.id.as_str()).collect();
    let generations: Vec<i32> = recorded.iter().map(|i| i.c.allocation.generation).collect();
    let transfer_ids: Vec<&str> = recorded.iter().map(|i| i.transfer.id.as_str()).collect();

    // The generations' attempts end TRANSFERRED, then the shares move (as `transition_locked_allocation` writes a
    // TRANSFERRING → TRANSFERRED move, guarded by status and generation).
    sqlx::query(ATTEMPTS_TRANSFERRED_SQL)
        .bind(&ids)
        .bind(&generations)
        .bind(&transfer_ids)
        .execute(&mut *tx)
        .await?;
    let moved = sqlx::query(SHARES_TRANSFERRED_SQL)
        .bind(&ids)
        .bind(&generations)
        .bind(&transfer_ids)
        .bind(AllocationStatus::Transferred.as_str())
        .bind(AllocationStatus::Transferring.as_str())
        .execute(&mut *tx)
        .await?;
    if moved.rows_affected() != ids.len() as u64 {
        // Cannot happen under the locks; if it does, nothing is written and each is recorded alone.
        return Err(StoreError::LostRace {
            what: "split allocation",
            id: ids.join(","),
            expected: AllocationStatus::Transferring.to_string(),
        });
    }

    if !confirm.is_empty() {
        // As `transition_locked_donation` writes a move with `received_date` set.
        let donation_ids: Vec<&str> = confirm.iter().map(|(d, _)| d.id.as_str()).collect();
        let from: Vec<&str> = confirm.iter().map(|(d, _)| d.status.as_str()).collect();
        let to: Vec<&str> = confirm.iter().map(|(_, next)| next.as_str()).collect();
        let rows: Vec<DonationRow> = sqlx::query_as(DONATIONS_CONFIRMED_SQL)
            .bind(&donation_ids)
            .bind(&from)
            .bind(&to)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
        if rows.len() != confirm.len() {
            return Err(StoreError::LostRace {
                what: "donation",
                id: donation_ids.join(","),
                expected: from.join(","),
            });
        }
        let generation_of: HashMap<&str, i32> = recorded
            .iter()
            .map(|i| (i.c.allocation.id.as_str(), i.c.allocation.generation))
            .collect();
        for d in &rows {
            let generation = generation_of
                .get(d.split_allocation_id.as_str())
                .copied()
                .ok_or_else(|| StoreError::Invalid(format!("donation {} is of no share this batch records", d.id)))?;
            if let Some(e) = announce::donation(EventType::DonationSucceeded, d, now) {
                events.push(announce::of_generation(e, generation));
            }
        }
    }
    insert_outbox_events(&mut tx, &events).await?;

    // Refunds that arrived while the transfers were in flight are covered now (by a reversal: policy), as a lone
    // recording does. One look for all of them, under the shares' locks (no refund attributes parts meanwhile).
    let waiting: Vec<String> = sqlx::query_scalar(WAITING_PARTS_SQL)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
    if !waiting.is_empty() {
        // The refund path's statements choose their plans by their values again (see `generic_plans`).
        crate::store::custom_plans(&mut tx).await?;
    }
    for raw in waiting {
        let id = SplitAllocationId::parse(&raw).map_err(|e| StoreError::Invalid(e.to_string()))?;
        super::refunds::settle_waiting_parts(ctx, &mut tx, &id).await?;
    }
    tx.commit().await?;
    metrics::counter!("splitpay_split_allocation_transitions_total", "to" => AllocationStatus::Transferred.as_str())
        .increment(ids.len() as u64);
    Ok(plain)
}
