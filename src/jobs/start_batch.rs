//! Takes many succeeded payments from their `payment_intent.succeeded` event to their started transfers in one
//! transaction: group commit (through [`super::group_commit`]) for the hot path's first half (issue 11).
//!
//! Alone, a payment's success costs two transactions and about twenty statements: the event job applies the event
//! ([`super::payment_state::apply`]: a read, then the transition with `payment_succeeded` and the event marked
//! processed), then [`super::distribute::distribute`] reads the payment again, splits the charge's fee across the
//! shares and starts each share's first transfer generation. Here the event job first reads the charge's fee from
//! Stripe (the read `distribute` would make), then hands the payment to its context's [`Starter`], and a writer does
//! both halves for every payment it holds, set-based, in about ten statements whatever the batch's size.
//!
//! Only the plain case is taken, decided on the rows read locked: the event still unprocessed; the payment one the
//! state machine moves to SUCCEEDED, of this PaymentIntent and this charge, with no fee split and not distributed;
//! the charge's balance transaction of the payment's amount and currency; every share PENDING at generation 0,
//! without a split, with no refund part, held by this transaction, and left money by the fee split. Its writes are
//! the ones the two transactions make alone: the payment's transition and fees (`transition_payment`,
//! `write_fee_split`), `payment_succeeded`, the event processed, the shares' split and first generations
//! (`start_first_generations`, the same frozen attempt rows), and the conservation check on what was stored.
//! Anything else, a failed batch and a dropped writer are answered `None`: the event job then goes the lone way
//! (`apply`, then `distribute`), which decides every unusual case as before. Nothing is waited for: rows another
//! transaction holds are skipped (`SKIP LOCKED`), and their payment goes the lone way.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::group_commit::{BatchWrite, GroupCommit};
use super::payment_state::IntentView;
use crate::app::AppContext;
use crate::domain::fees::split_fees;
use crate::domain::ids::SplitPaymentId;
use crate::domain::state::{AllocationEvent, AllocationStatus, PaymentEvent, PaymentStatus, Transition};
use crate::events::EventType;
use crate::store::allocations::{insert_first_attempts, transfer_keys, AllocationContext, Caller, SplitAllocationRow};
use crate::store::announce;
use crate::store::payments::SplitPaymentRow;
use crate::store::records::insert_outbox_events;
use crate::store::transfer_attempts::TransferAttemptRow;
use crate::store::StoreError;
use crate::stripe::BalanceTransactionInfo;

/// Payments started by one transaction at most.
pub const BATCH_MAX: usize = 32;

/// One context's queue of succeeded payments to start.
pub type Starter = GroupCommit<StartPayments>;

/// The batched start of succeeded payments (see the module's comment).
pub struct StartPayments;

/// A succeeded payment's event, with what Stripe said of its charge's fee.
#[derive(Debug, Clone)]
pub struct Item {
    pub event_id: String,
    pub payment_id: SplitPaymentId,
    pub intent_id: String,
    pub charge_id: String,
    /// The event's `created`: the payment's `stripe_event_at` moves up to it.
    pub observed_at: DateTime<Utc>,
    pub balance_transaction: BalanceTransactionInfo,
}

/// A payment the batch started: its shares' first generations, to drive until `deadline` (the lease's end on this
/// process's clock, as [`super::distribute::transfer_now`] takes it). Committed before it exists, so it must be
/// driven: [`Started::drive`] does it, and a `Started` dropped undriven (its event job timed out or was dropped, while
/// the batch wrote or before it read the answer) drives its steps from a task of its own, under the same lease, rather
/// than leaving them to the sweeper after it.
pub struct Started {
    steps: Vec<(AllocationContext, TransferAttemptRow)>,
    deadline: tokio::time::Instant,
    ctx: Option<AppContext>,
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started")
            .field("steps", &self.steps.len())
            .finish_non_exhaustive()
    }
}

impl Started {
    /// Drives the payment's transfers (see [`super::distribute::transfer_now`]).
    pub async fn drive(mut self) {
        let steps = std::mem::take(&mut self.steps);
        if let Some(ctx) = self.ctx.take() {
            super::distribute::transfer_now(&ctx, steps, self.deadline).await;
        }
    }

    /// The started shares and the lease's end, without driving them (for tests that look at what was started).
    pub fn into_steps(mut self) -> (Vec<(AllocationContext, TransferAttemptRow)>, tokio::time::Instant) {
        (std::mem::take(&mut self.steps), self.deadline)
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if self.steps.is_empty() {
            return;
        }
        let steps = std::mem::take(&mut self.steps);
        let deadline = self.deadline;
        // Outside a runtime nothing can run, and a runtime shutting down cancels the task at once: either way the
        // shares stay due at the lease's end, for the sweeper, as after a crash. The task is bounded by the lease (its
        // turn and its Stripe calls stop at `deadline`; recording what Stripe answered is bounded by the statement
        // timeout).
        if let (Some(ctx), Ok(runtime)) = (self.ctx.take(), tokio::runtime::Handle::try_current()) {
            tracing::info!(
                steps = steps.len(),
                "a started payment's event job is gone: its transfers are driven here"
            );
            runtime.spawn(async move { super::distribute::transfer_now(&ctx, steps, deadline).await });
        }
    }
}

/// Starts the payment `id` that the stored event `event_id` (seen as `view`) says succeeded, in a batch with
/// whatever else is waiting: `Some` when the batch took it (the event processed, the payment SUCCEEDED and
/// distributed, its shares TRANSFERRING, committed), for the caller to drive; `None` when it is not the plain case,
/// or Stripe could not say the fee, or the batch failed: the caller goes the lone way, which decides it.
pub async fn start(ctx: &AppContext, event_id: &str, id: &SplitPaymentId, view: &IntentView) -> Option<Started> {
    let charge_id = view.latest_charge.clone()?;
    if view.intent_id.is_empty() || !view.from_webhook {
        return None;
    }
    // The read `distribute` would make after the transition, made before it: a payment that is not the plain case
    // (a repeat, say) costs one read more, the lone way reading it again.
    let balance_transaction = match ctx.gateway.retrieve_charge(&charge_id).await {
        Ok(charge) => charge.balance_transaction?,
        Err(e) => {
            tracing::info!(split_payment_id = %id, error = %e, "the charge's fee could not be read: the lone way");
            return None;
        }
    };
    let item = Item {
        event_id: event_id.to_owned(),
        payment_id: id.clone(),
        intent_id: view.intent_id.clone(),
        charge_id,
        observed_at: view.observed_at,
        balance_transaction,
    };
    GroupCommit::<StartPayments>::submit(ctx, item).await
}

impl BatchWrite for StartPayments {
    type Item = Item;
    type Answer = Started;
    const KIND: &'static str = "start";
    const BATCH_MAX: usize = BATCH_MAX;

    fn of(ctx: &AppContext) -> &Arc<GroupCommit<Self>> {
        &ctx.starter
    }

    fn describe(batch: &[Item]) -> String {
        let payments: Vec<&str> = batch.iter().map(|i| i.payment_id.as_str()).collect();
        format!("payments {payments:?}")
    }

    async fn write(ctx: &AppContext, batch: &[Item]) -> Result<Vec<Option<Started>>, StoreError> {
        write(ctx, batch).await
    }
}

/// A share as the batch reads it: the row, its recipient's link, and what tells a plain share.
struct Share {
    row: SplitAllocationRow,
    recipient_organisation_id: String,
    recipient_org_name: String,
    destination_account_id: String,
    /// The payment's shares, locked or not.
    siblings: i64,
    /// Any refund part names the share.
    refund_parted: bool,
}

// The batch's statements, in the order it runs them (`tests/scale.rs` plans each over a large table, custom and
// generic plans).

/// The batch's events, locked, each with whether it is still unprocessed; one another transaction holds is skipped.
///
/// "Unprocessed" is answered in the select list, not the `WHERE`: `processed_at IS NULL` there matches the predicate
/// of the partial index of unprocessed events (`stripe_events_unprocessed`), and the batch's plan, made once
/// (generic) while the backlog was young, read that whole index to find a batch's few events: ~2,000 index entries
/// per batch in burn-down (`pg_stat_user_indexes`). Without it, only the key can find them (`tests/scale.rs`).
pub const LOCK_EVENTS_SQL: &str =
    "SELECT id, processed_at IS NULL FROM stripe_events WHERE id = ANY($1) ORDER BY id FOR UPDATE SKIP LOCKED";
/// The payments, locked; skipped when held.
pub const LOCK_PAYMENTS_SQL: &str =
    "SELECT * FROM split_payments WHERE id = ANY($1) ORDER BY id FOR UPDATE SKIP LOCKED";
/// The held payments' shares, locked in position order; skipped when held.
pub const LOCK_SHARES_SQL: &str = "SELECT a.* FROM split_allocations a WHERE a.split_payment_id = ANY($1)
          ORDER BY a.split_payment_id, a.position FOR UPDATE SKIP LOCKED";
/// What else decides each share: its link, how many shares its payment has, whether a refund part names it.
pub const SHARE_FACTS_SQL: &str =
    "SELECT a.id, l.recipient_organisation_id, l.recipient_org_name, l.stripe_connect_account_id,
                (SELECT count(*) FROM split_allocations b WHERE b.split_payment_id = a.split_payment_id),
                EXISTS (SELECT 1 FROM refund_parts r WHERE r.split_allocation_id = a.id)
           FROM split_allocations a JOIN recipient_account_links l ON l.id = a.recipient_org_account_link_id
          WHERE a.id = ANY($1)";
/// The payments move to SUCCEEDED with their fees.
pub const PAYMENTS_SUCCEEDED_SQL: &str = "UPDATE split_payments p
            SET status = 'SUCCEEDED', payment_intent_id = u.intent_id, charge_id = u.charge_id, succeeded_at = now(),
                stripe_event_at = greatest(p.stripe_event_at, u.observed_at), processing_fee_cents = u.processing_fee,
                platform_fee_cents = u.platform_fee, fee_uncollected_cents = u.uncollected,
                distribution_next_attempt_at = NULL, distributed_at = now(),
                audit_due_at = coalesce(p.audit_due_at, now() + interval '1 hour'), updated_at = now()
           FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::int8[], $7::int8[],
                       $8::int8[])
                AS u (id, prior, intent_id, charge_id, observed_at, processing_fee, platform_fee, uncollected)
          WHERE p.id = u.id AND p.status = u.prior AND p.processing_fee_cents IS NULL
         RETURNING p.*";
/// The shares are split and their first generation started: (ids, fee shares, nets, keys, due).
pub const SHARES_STARTED_SQL: &str = "UPDATE split_allocations a
            SET fee_share_cents = u.fee_share, net_amount_cents = u.net, status = 'TRANSFERRING', generation = 1,
                idempotency_key = u.key, next_attempt_at = $5, unresolved_at = NULL, attempts = 0, parked_at = NULL,
                updated_at = now()
           FROM unnest($1::text[], $2::int8[], $3::int8[], $4::text[]) AS u (id, fee_share, net, key)
          WHERE a.id = u.id AND a.status = 'PENDING' AND a.generation = 0 AND a.fee_share_cents IS NULL
         RETURNING a.*";
/// The events are processed.
pub const EVENTS_PROCESSED_SQL: &str =
    "UPDATE stripe_events SET processed_at = now(), process_error = NULL, process_attempts = process_attempts + 1
          WHERE id = ANY($1)";

/// A plain payment's writes, decided before anything is written.
struct Plan<'a> {
    n: usize,
    item: &'a Item,
    payment: &'a SplitPaymentRow,
    platform_fee_cents: i64,
    fee_uncollected_cents: i64,
    /// Share id, fee share, net, in position order.
    shares: Vec<(&'a Share, i64, i64)>,
}

async fn write(ctx: &AppContext, batch: &[Item]) -> Result<Vec<Option<Started>>, StoreError> {
    let event_ids: Vec<&str> = batch.iter().map(|i| i.event_id.as_str()).collect();
    let payment_ids: Vec<&str> = batch.iter().map(|i| i.payment_id.as_str()).collect();
    let mut tx = ctx.pool.begin().await?;
    crate::store::generic_plans(&mut tx).await?;
    // Nothing is waited for: a row another transaction holds is skipped, and its payment goes the lone way.
    let events: HashSet<String> = sqlx::query_as(LOCK_EVENTS_SQL)
        .bind(&event_ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .filter_map(|(id, unprocessed): (String, bool)| unprocessed.then_some(id))
        .collect();
    let payments: Vec<SplitPaymentRow> = sqlx::query_as(LOCK_PAYMENTS_SQL)
        .bind(&payment_ids)
        .fetch_all(&mut *tx)
        .await?;
    let payments: HashMap<&str, &SplitPaymentRow> = payments.iter().map(|p| (p.id.as_str(), p)).collect();
    // The shares of the payments held, locked in position order (as every path that locks several), with how many
    // shares each payment has (shares are made with their payment and never deleted).
    let held: Vec<&str> = payments.keys().copied().collect();
    let locked: Vec<SplitAllocationRow> = sqlx::query_as(LOCK_SHARES_SQL).bind(&held).fetch_all(&mut *tx).await?;
    // Then, in a statement of its own, what else decides a share: its link, how many shares its payment has, and
    // whether a refund part names it. Its own snapshot is taken after the locks. Read in the locking statement, it
    // would come from that statement's snapshot (READ COMMITTED: one per statement, taken when it starts): a refund
    // (or a dispute's withdrawal) that held the shares when that statement started and committed its parts before
    // the lock reached them would be missed, and the share sent its whole net. Once the shares are held, no refund
    // can attribute parts to them until this transaction ends.
    let share_ids: Vec<&str> = locked.iter().map(|a| a.id.as_str()).collect();
    let facts: HashMap<String, (String, String, String, i64, bool)> = sqlx::query_as(SHARE_FACTS_SQL)
        .bind(&share_ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|(id, org, name, account, siblings, parted)| (id, (org, name, account, siblings, parted)))
        .collect();
    let mut shares_of: HashMap<String, Vec<Share>> = HashMap::new();
    for row in locked {
        let Some((org, name, account, siblings, parted)) = facts.get(&row.id).cloned() else {
            return Err(StoreError::NotFound {
                what: "recipient account link",
                id: row.id,
            });
        };
        let share = Share {
            row,
            recipient_organisation_id: org,
            recipient_org_name: name,
            destination_account_id: account,
            siblings,
            refund_parted: parted,
        };
        shares_of
            .entry(share.row.split_payment_id.clone())
            .or_default()
            .push(share);
    }

    // Which items are plain, and what each writes.
    let mut plans: Vec<Plan> = Vec::new();
    let mut seen = HashSet::new();
    for (n, item) in batch.iter().enumerate() {
        let (Some(payment), Some(shares)) = (
            payments.get(item.payment_id.as_str()).copied(),
            shares_of.get(item.payment_id.as_str()),
        ) else {
            continue;
        };
        if !events.contains(&item.event_id) || !seen.insert(payment.id.as_str()) || !seen.insert(&item.event_id) {
            continue;
        }
        if let Some(plan) = plan_of(ctx, n, item, payment, shares) {
            plans.push(plan);
        }
    }
    let mut answers: Vec<Option<Started>> = batch.iter().map(|_| None).collect();
    if plans.is_empty() {
        return Ok(answers);
    }

    // The payments: SUCCEEDED with the event's PaymentIntent, charge and time (as `transition_payment` writes the
    // move), and their fees, distributed (as `write_fee_split` writes them for a distribution that starts every
    // share).
    let ids: Vec<&str> = plans.iter().map(|p| p.payment.id.as_str()).collect();
    let prior: Vec<&str> = plans.iter().map(|p| p.payment.status.as_str()).collect();
    let intents: Vec<&str> = plans.iter().map(|p| p.item.intent_id.as_str()).collect();
    let charges: Vec<&str> = plans.iter().map(|p| p.item.charge_id.as_str()).collect();
    let observed: Vec<DateTime<Utc>> = plans.iter().map(|p| p.item.observed_at).collect();
    let processing_fees: Vec<i64> = plans.iter().map(|p| p.item.balance_transaction.fee_cents).collect();
    let platform_fees: Vec<i64> = plans.iter().map(|p| p.platform_fee_cents).collect();
    let uncollected: Vec<i64> = plans.iter().map(|p| p.fee_uncollected_cents).collect();
    let moved: Vec<SplitPaymentRow> = sqlx::query_as(PAYMENTS_SUCCEEDED_SQL)
        .bind(&ids)
        .bind(&prior)
        .bind(&intents)
        .bind(&charges)
        .bind(&observed)
        .bind(&processing_fees)
        .bind(&platform_fees)
        .bind(&uncollected)
        .fetch_all(&mut *tx)
        .await?;
    if moved.len() != plans.len() {
        // Cannot happen under the locks; if it does, nothing is written and each goes the lone way.
        return Err(StoreError::LostRace {
            what: "split payment",
            id: ids.join(","),
            expected: prior.join(","),
        });
    }
    let moved: HashMap<String, SplitPaymentRow> = moved.into_iter().map(|p| (p.id.clone(), p)).collect();

    // The shares: split, and their first generation started (as `write_fee_split` and `start_first_generations`
    // write them), due at the end of this process's lease on their first step.
    let now = Utc::now();
    let (lease_ends, deadline) = super::distribute::first_step_lease(ctx);
    let all: Vec<&(&Share, i64, i64)> = plans.iter().flat_map(|p| &p.shares).collect();
    let share_ids: Vec<&str> = all.iter().map(|(s, _, _)| s.row.id.as_str()).collect();
    let fee_shares: Vec<i64> = all.iter().map(|(_, fee, _)| *fee).collect();
    let nets: Vec<i64> = all.iter().map(|(_, _, net)| *net).collect();
    let generations: Vec<i32> = all.iter().map(|_| 1).collect();
    let keys = transfer_keys(&share_ids, &generations)?;
    let started: Vec<SplitAllocationRow> = sqlx::query_as(SHARES_STARTED_SQL)
        .bind(&share_ids)
        .bind(&fee_shares)
        .bind(&nets)
        .bind(&keys)
        .bind(lease_ends)
        .fetch_all(&mut *tx)
        .await?;
    if started.len() != share_ids.len() {
        return Err(StoreError::LostRace {
            what: "split allocation",
            id: share_ids.join(","),
            expected: AllocationStatus::Pending.to_string(),
        });
    }
    // The second half of the conservation pair (the first is in `split_fees`), on what was stored: each payment's
    // shares' nets and fee shares add up to its total.
    let mut stored: HashMap<&str, i64> = HashMap::new();
    for a in &started {
        *stored.entry(a.split_payment_id.as_str()).or_default() +=
            a.net_amount_cents.unwrap_or_default() + a.fee_share_cents.unwrap_or_default();
    }
    for p in &plans {
        let sum = stored.get(p.payment.id.as_str()).copied().unwrap_or_default();
        if sum != p.payment.total_amount_cents {
            return Err(StoreError::Invalid(format!(
                "stored fee split of {} adds up to {sum}, not {}",
                p.payment.id, p.payment.total_amount_cents
            )));
        }
    }
    // With no refund part, what is outstanding of each share is its net: the generation sends it.
    let mut attempts = insert_first_attempts(&mut tx, Caller::Batch, &share_ids, &generations, &keys, &nets).await?;
    if attempts.len() != share_ids.len() {
        return Err(StoreError::Invalid(format!(
            "payments {ids:?}: a share's attempt was not written"
        )));
    }

    let events: Vec<_> = plans
        .iter()
        .map(|p| announce::payment(EventType::PaymentSucceeded, p.payment, None, None, now))
        .collect();
    insert_outbox_events(&mut tx, &events).await?;
    let processed: Vec<&str> = plans.iter().map(|p| p.item.event_id.as_str()).collect();
    sqlx::query(EVENTS_PROCESSED_SQL)
        .bind(&processed)
        .execute(&mut *tx)
        .await?;

    // What each payment's steps need, from the writes.
    let mut started: HashMap<String, SplitAllocationRow> = started.into_iter().map(|a| (a.id.clone(), a)).collect();
    for p in &plans {
        let payment = moved
            .get(p.payment.id.as_str())
            .ok_or_else(|| StoreError::Invalid(format!("payment {} was not moved", p.payment.id)))?;
        let mut steps = Vec::with_capacity(p.shares.len());
        for (share, _, _) in &p.shares {
            let (Some(allocation), Some(attempt)) = (started.remove(&share.row.id), attempts.remove(&share.row.id))
            else {
                return Err(StoreError::Invalid(format!("share {} was not started", share.row.id)));
            };
            steps.push((
                AllocationContext {
                    allocation,
                    payment: payment.clone(),
                    recipient_organisation_id: share.recipient_organisation_id.clone(),
                    recipient_org_name: share.recipient_org_name.clone(),
                    destination_account_id: share.destination_account_id.clone(),
                },
                attempt,
            ));
        }
        // Not armed yet (no context): a `Started` dropped before the commit (an error below, a failed commit) must
        // not drive anything, since nothing of it may have been written.
        answers[p.n] = Some(Started {
            steps,
            deadline,
            ctx: None,
        });
    }
    tx.commit().await?;
    // Committed: each started payment is now driven, by its caller or, dropped undriven, by itself.
    for started in answers.iter_mut().flatten() {
        started.ctx = Some(ctx.clone());
    }
    metrics::counter!("splitpay_split_payment_transitions_total", "to" => PaymentStatus::Succeeded.as_str())
        .increment(plans.len() as u64);
    metrics::counter!("splitpay_split_allocation_transitions_total", "to" => AllocationStatus::Transferring.as_str())
        .increment(share_ids.len() as u64);
    Ok(answers)
}

/// The plan of a payment the batch takes, or `None` when it is not the plain case (see the module's comment).
fn plan_of<'a>(
    ctx: &AppContext,
    n: usize,
    item: &'a Item,
    payment: &'a SplitPaymentRow,
    shares: &'a [Share],
) -> Option<Plan<'a>> {
    let moves = matches!(
        payment.status.apply(PaymentEvent::Succeeded),
        Ok(Transition::To(PaymentStatus::Succeeded))
    );
    let same_intent = payment
        .payment_intent_id
        .as_deref()
        .is_none_or(|pi| pi == item.intent_id);
    let same_charge = payment.charge_id.as_deref().is_none_or(|c| c == item.charge_id);
    let undistributed = payment.processing_fee_cents.is_none()
        && payment.platform_fee_cents.is_none()
        && payment.fee_uncollected_cents.is_none()
        && payment.distributed_at.is_none();
    let bt = &item.balance_transaction;
    // Never split a fee that belongs to another amount: the lone way logs it for an operator.
    let fee_of_this_payment =
        bt.amount_cents == payment.total_amount_cents && bt.currency == payment.currency.stripe_code();
    if !(moves && same_intent && same_charge && undistributed && fee_of_this_payment) {
        return None;
    }
    let whole = !shares.is_empty() && shares.iter().all(|s| s.siblings == shares.len() as i64);
    let fresh = shares.iter().all(|s| {
        s.row.status == AllocationStatus::Pending
            && s.row.generation == 0
            && s.row.fee_share_cents.is_none()
            && s.row.net_amount_cents.is_none()
            && !s.refund_parted
            && matches!(
                s.row.status.apply(AllocationEvent::TransferStarted),
                Ok(Transition::To(AllocationStatus::Transferring))
            )
    });
    if !(whole && fresh) {
        return None;
    }
    let gross: Vec<i64> = shares.iter().map(|s| s.row.gross_amount_cents).collect();
    let platform_fee_cents = ctx.distribution.platform_fee.fee_cents(payment.total_amount_cents);
    let split = split_fees(&gross, bt.fee_cents, platform_fee_cents).ok()?;
    if split.shares.iter().any(|s| s.net_cents <= 0) {
        return None; // a share the fees took whole is parked by the lone way
    }
    Some(Plan {
        n,
        item,
        payment,
        platform_fee_cents,
        fee_uncollected_cents: split.fee_uncollected_cents,
        shares: shares
            .iter()
            .zip(&split.shares)
            .map(|(s, f)| (s, f.fee_share_cents, f.net_cents))
            .collect(),
    })
}
