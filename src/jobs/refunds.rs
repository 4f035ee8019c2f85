//! Refunds made at Stripe, taken through to allocations and donations, and the transfer reversals they cause.
//!
//! - [`process_charge_event`]: `charge.refunded`, `charge.refund.updated` and `refund.*`. The webhook's own
//!   `refunds` list may be truncated, so the charge's refunds are read from Stripe (`GET /v1/refunds?charge=`) and
//!   each one not yet recorded is recorded once (unique Stripe id), attributed and covered in one transaction with
//!   marking the event processed. Only a SUCCEEDED refund moves money; a pending one waits for its update; a
//!   failed one reverses nothing and emits nothing.
//! - [`reverse`]: one reversal, with the key written when its intent was; a refusal (the recipient's balance is
//!   too low) or an unknown outcome is retried on a stored, growing schedule: with the same key, except after a
//!   coded 4xx refusal, which Stripe saves under the key, when the row moves to its next key attempt. Never
//!   dropped.
//!   A reversal whose refund no longer stands (a won dispute) is canceled, never sent again ([`settle_cancel`]).
//!   A row older than 23 h is looked up on Stripe's transfer first (its key may be forgotten): [`adopt_if_made`].
//! - [`reconcile_refunds`]: the cron sweep: covers parts whose transfer has settled, drives overdue reversals, and
//!   sends back a reversal made after its dispute was won whose share's transfer was in flight ([`resend_owed`]).

use chrono::Utc;

use super::queue::{enqueue, Queue};
use super::runner::JobFailure;
use super::stripe_event::transient;
use crate::app::AppContext;
use crate::domain::ids::{SplitAllocationId, SplitPaymentId};
use crate::store::disputes::{resend_if_marked, send_again_or_mark, settled_shares_owed_a_resend};
use crate::store::payments::find_split_payment_by_intent;
use crate::store::records::{finish_stripe_event, StripeEventRow};
use crate::store::refunds::{
    allocations_with_waiting_parts, attribute_refund, cover_waiting_parts, record_stripe_refund, Covered, RefundRow,
};
use crate::store::reversals::{
    claim_reversal, due_reversals, get_reversal, postpone_cancel, record_reversal_canceled, record_reversal_retry,
    record_reversal_success, ReversalRow, REVERSAL_IN_FLIGHT_MARGIN_SECS,
};
use crate::store::{StoreError, Tx};
use crate::stripe::backoff::backoff_ms_random;
use crate::stripe::{Metadata, RefundInfo, ReversalOutcome, REVERSAL_REF_KEY};

/// The Stripe events that say something about a charge's refunds.
pub fn is_refund_event(event_type: &str) -> bool {
    matches!(
        event_type,
        "charge.refunded" | "charge.refund.updated" | "refund.created" | "refund.updated" | "refund.failed"
    )
}

/// A reversal refused for a low balance waits for the recipient's next payments: retried at most this far apart.
pub const REVERSAL_BACKOFF_CAP_MS: u64 = 3_600_000;
/// Rows one reconcile tick takes per kind; the next tick takes the rest.
pub const RECONCILE_BATCH_MAX: i64 = 200;

pub async fn process_charge_event(ctx: &AppContext, event: &StripeEventRow) -> Result<(), JobFailure> {
    let object = &event.payload["data"]["object"];
    let charge_id = match object["object"].as_str() {
        Some("charge") => object["id"].as_str(),
        _ => object["charge"].as_str(),
    };
    let intent_id = object["payment_intent"].as_str();
    let payment = match intent_id {
        Some(pi) => find_split_payment_by_intent(&mut *acquire(ctx).await?, pi)
            .await
            .map_err(transient)?,
        None => None,
    };
    let (Some(charge_id), Some(payment)) = (charge_id, payment) else {
        return mark(ctx, &event.id, None).await; // not a charge of splitpay's
    };
    let refunds = ctx
        .gateway
        .list_refunds(charge_id)
        .await
        .map_err(|e| JobFailure::Retry(format!("listing the refunds of {charge_id}: {e}")))?;
    let mut tx = ctx.pool.begin().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    let mut covered = Covered::default();
    for refund in &refunds {
        covered.extend(apply_refund(ctx, &mut tx, &payment, refund, "external").await?);
    }
    let (reversals, transfers) = (covered.reversals.len(), covered.transfers.len());
    enqueue_covered(&mut tx, covered).await.map_err(transient)?;
    finish_stripe_event(&mut tx, &event.id, None).await.map_err(transient)?;
    tx.commit().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    tracing::info!(split_payment_id = %payment, charge_id, refunds = refunds.len(), reversals, transfers, "refunds applied");
    Ok(())
}

/// Records one refund Stripe shows and, once it succeeded, attributes and covers it. Returns the reversals and
/// transfers the caller enqueues in the same transaction ([`enqueue_covered`]). A refund larger than what the
/// allocations have left to refund is kept unattributed for an operator (the money report shows it unsettled),
/// never guessed.
pub async fn apply_refund(
    ctx: &AppContext,
    tx: &mut Tx<'_>,
    payment: &SplitPaymentId,
    refund: &RefundInfo,
    source: &str,
) -> Result<Covered, JobFailure> {
    // The payment's shares before the refund row (`record_stripe_refund` locks it), the order the withdrawal and
    // `ops refund` take them in.
    crate::store::allocations::lock_payment_shares(tx, payment.as_str())
        .await
        .map_err(transient)?;
    let row: RefundRow = record_stripe_refund(tx, payment, refund, source)
        .await
        .map_err(transient)?;
    // A failed refund's made reversals go to the share's parts that booked loss, the rest back to the recipient:
    // what that calls for is enqueued by the caller with the rest, in this transaction.
    let mut covered = Covered::default();
    if matches!(row.status.as_str(), "FAILED" | "CANCELED") {
        covered = crate::store::reversals::rehome_reversals_of(tx, row.id, ctx.distribution.reverse_on_refund)
            .await
            .map_err(transient)?;
    }
    match attribute_refund(tx, &row, ctx.distribution.reverse_on_refund).await {
        Ok(attributed) => {
            covered.extend(attributed);
            Ok(covered)
        }
        Err(StoreError::Invalid(why)) => {
            tracing::error!(split_payment_id = %payment, refund_id = %refund.id, why, "refund left unattributed");
            metrics::counter!("splitpay_refunds_unattributed_total").increment(1);
            Ok(covered)
        }
        Err(e) => Err(transient(e)),
    }
}

/// Makes one reversal (a `transfer_reversals` id) with its stored key; see the module doc.
pub async fn reverse(ctx: &AppContext, raw_id: &str) -> Result<(), JobFailure> {
    let id: i64 = raw_id
        .parse()
        .map_err(|_| JobFailure::Abandon(format!("'{raw_id}' is not a reversal id")))?;
    let r = match get_reversal(&mut *acquire(ctx).await?, id).await {
        Ok(r) => r,
        Err(StoreError::NotFound { .. }) => return Err(JobFailure::Abandon(format!("no reversal {id}"))),
        Err(e) => return Err(transient(e)),
    };
    if r.status != "PENDING"
        || r.next_attempt_at
            .is_some_and(|at| at > Utc::now() + chrono::Duration::seconds(1))
    {
        return Ok(()); // done, or an early duplicate: the scheduled attempt will come
    }
    if r.cancel_requested_at.is_some() {
        return settle_cancel(ctx, &r).await;
    }
    // Stripe may forget a key after 24 h: a reversal written longer ago may have been made under its key by a
    // process that died before recording the answer, and the same key would now make a second one. Stripe's
    // transfer is read first.
    if Utc::now() - r.created_at > chrono::Duration::hours(REVERSAL_KEY_SAFE_HOURS) {
        match adopt_if_made(ctx, &r).await {
            Ok(Lookup::AdoptedNow) => return Ok(()), // recorded with its consequences
            Ok(Lookup::AlreadyRecorded) => return Ok(()),
            Ok(Lookup::NotMade) => {}
            Err(why) => return retry_later(ctx, &r, raw_id, None, None, &why).await,
        }
    }
    // In doubt from here until Stripe answers with a saved refusal; a cancel that came meanwhile sends nothing.
    if !claim_reversal(&mut *acquire(ctx).await?, id, r.key_attempt)
        .await
        .map_err(transient)?
    {
        return Ok(());
    }
    let metadata: Metadata = if r.sends_metadata {
        [
            (REVERSAL_REF_KEY.to_owned(), id.to_string()),
            ("split_allocation_id".to_owned(), r.split_allocation_id.clone()),
        ]
        .into()
    } else {
        Metadata::new()
    };
    // Bounded well inside the in-flight margin that a cancel waits out after the claim: the limiter's wait has no
    // bound of its own, and a request sent later than the margin could be applied after its cancel was settled.
    let budget = std::time::Duration::from_secs(REVERSAL_SEND_BUDGET_SECS);
    let outcome = match tokio::time::timeout(
        budget,
        ctx.gateway
            .create_reversal(&r.stripe_transfer_id, Some(r.amount_cents), &metadata, &r.key()),
    )
    .await
    {
        Ok(outcome) => outcome,
        Err(_) => Err(crate::stripe::GatewayError::Unknown {
            reason: format!("no answer within {REVERSAL_SEND_BUDGET_SECS} s (rate limiter and retries included)"),
        }),
    };
    match outcome {
        Ok(ReversalOutcome::Reversed { reversal_id, .. }) => {
            record_made(ctx, &r, Some(&reversal_id)).await?;
            tracing::info!(reversal = id, transfer_id = %r.stripe_transfer_id, amount_cents = r.amount_cents, "reversed");
        }
        Ok(ReversalOutcome::AlreadyFullyReversed) => match record_if_fully_reversed_by(ctx, &r).await {
            Ok(Some(made)) => {
                tracing::warn!(reversal = id, transfer_id = %r.stripe_transfer_id, stripe_reversal = ?made,
                               "transfer already fully reversed: this row's share of it recorded");
            }
            Ok(None) => {
                let why = format!(
                    "Stripe says transfer {} is fully reversed, but no reversal of it that splitpay has not recorded \
                     covers this row's {} cents: check the transfer at Stripe",
                    r.stripe_transfer_id, r.amount_cents
                );
                return retry_later(ctx, &r, raw_id, Some("transfer_already_reversed"), None, &why).await;
            }
            Err(why) => return retry_later(ctx, &r, raw_id, None, None, &why).await,
        },
        Err(e) => {
            // Low balance, throttling, a timeout: retried on the schedule. A coded 4xx refusal (low balance) is
            // saved by Stripe under the key, so the next attempt takes the next key; anything else may have been
            // (or may yet be) applied, and keeps the key.
            let saved_refusal_of = e.is_saved_refusal().then_some(r.key_attempt);
            return retry_later(ctx, &r, raw_id, e.code(), saved_refusal_of, &e.to_string()).await;
        }
    }
    Ok(())
}

/// Stripe answered that the transfer has nothing left to reverse. That is this row's reversal only if Stripe shows
/// it (carrying our row id), or if reversals nobody recorded (no id of ours, not recorded by id, less rows recorded
/// without an id) cover its amount, as an old row's look-up does; then it is recorded, with its consequences, and
/// `Some(stripe id if known)` is returned. Otherwise the money was taken by reversals that are another row's, still
/// in doubt (review H1: booking this one too would count the same money twice): `None`, kept for an operator. The
/// recorded rows are read under the share's lock, so two rows of one transfer never both take the same reversal.
async fn record_if_fully_reversed_by(ctx: &AppContext, r: &ReversalRow) -> Result<Option<Option<String>>, String> {
    let listed = ctx
        .gateway
        .list_reversals(&r.stripe_transfer_id)
        .await
        .map_err(|e| format!("listing the reversals of {}: {e}", r.stripe_transfer_id))?;
    let ours = listed
        .iter()
        .find(|x| x.metadata.get(REVERSAL_REF_KEY) == Some(&r.id.to_string()))
        .map(|x| x.id.clone());
    let mut tx = ctx.pool.begin().await.map_err(|e| e.to_string())?;
    if !lock_share_while_pending(&mut tx, r).await? {
        return Ok(Some(None)); // recorded by another run meanwhile
    }
    if ours.is_none() {
        let recorded: Vec<(Option<String>, i64)> = sqlx::query_as(
            "SELECT stripe_reversal_id, amount_cents FROM transfer_reversals
              WHERE stripe_transfer_id = $1 AND status = 'SUCCEEDED' AND id <> $2",
        )
        .bind(&r.stripe_transfer_id)
        .bind(r.id)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| e.to_string())?;
        let unrecorded_cents: i64 = listed
            .iter()
            .filter(|x| !x.metadata.contains_key(REVERSAL_REF_KEY))
            .filter(|x| !recorded.iter().any(|(id, _)| id.as_deref() == Some(x.id.as_str())))
            .map(|x| x.amount_cents)
            .sum();
        let recorded_without_id_cents: i64 = recorded.iter().filter(|(id, _)| id.is_none()).map(|(_, a)| a).sum();
        if unrecorded_cents - recorded_without_id_cents < r.amount_cents {
            return Ok(None);
        }
    }
    record_reversal_success(&mut tx, r.id, ours.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    send_again_if_reinstated(&mut tx, r).await.map_err(|e| e.to_string())?;
    let id = allocation_id(r).map_err(|e| format!("{e:?}"))?;
    settle_waiting_parts(ctx, &mut tx, &id)
        .await
        .map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    Ok(Some(ours))
}

/// A reversal's request (limiter wait, attempts and backoff) is abandoned after this; well inside
/// [`REVERSAL_IN_FLIGHT_MARGIN_SECS`], so a cancel that waits out the margin after the latest claim cannot be
/// overtaken by a request still on its way.
pub const REVERSAL_SEND_BUDGET_SECS: u64 = 300;

/// A reversal written longer ago than this is looked up at Stripe before its key is sent again (Stripe may forget
/// a key after 24 hours).
pub const REVERSAL_KEY_SAFE_HOURS: i64 = 23;

/// What the look-up of an old reversal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookup {
    /// Stripe shows no such reversal: its key may be sent.
    NotMade,
    /// Stripe made it: recorded now, not sent again.
    AdoptedNow,
    /// Another run recorded it meanwhile: nothing to do.
    AlreadyRecorded,
}

/// What Stripe shows of one reversal row: `Some(Some(id))` made with this id, `Some(None)` made (the transfer's
/// reversed total says so, the list being truncated), `None` not made. Rows that send our id in the metadata are
/// matched by it, exactly; older rows (no metadata) by an amount no row of ours records, or by the reversed total.
async fn made_at_stripe(
    ctx: &AppContext,
    r: &crate::store::reversals::ReversalRow,
    recorded: &[(Option<String>, i64)],
) -> Result<Option<Option<String>>, String> {
    let looking = |e: crate::stripe::GatewayError| {
        format!(
            "looking up transfer {} before resending an old key: {e}",
            r.stripe_transfer_id
        )
    };
    if r.sends_metadata {
        let reversals = ctx
            .gateway
            .list_reversals(&r.stripe_transfer_id)
            .await
            .map_err(looking)?;
        return Ok(reversals
            .into_iter()
            .find(|x| x.metadata.get(REVERSAL_REF_KEY) == Some(&r.id.to_string()))
            .map(|x| Some(x.id)));
    }
    let group: String = sqlx::query_scalar(
        "SELECT p.transfer_group FROM split_allocations a JOIN split_payments p ON p.id = a.split_payment_id
          WHERE a.id = $1",
    )
    .bind(&r.split_allocation_id)
    .fetch_one(&ctx.pool)
    .await
    .map_err(|e| e.to_string())?;
    let transfers = ctx.gateway.list_transfers(&group).await.map_err(looking)?;
    let Some(t) = transfers.into_iter().find(|t| t.id == r.stripe_transfer_id) else {
        return Err(format!(
            "transfer {} is not in its group at Stripe",
            r.stripe_transfer_id
        ));
    };
    let unrecorded = t
        .reversals
        .iter()
        .find(|x| x.amount_cents == r.amount_cents && !recorded.iter().any(|(id, _)| id.as_deref() == Some(&x.id)));
    Ok(match unrecorded {
        Some(x) => Some(Some(x.id.clone())),
        None if !t.reversals_listed_all => {
            let accounted: i64 = recorded.iter().map(|(_, amount)| amount).sum();
            (t.amount_reversed_cents - accounted >= r.amount_cents).then_some(None)
        }
        None => None,
    })
}

/// Records an old reversal as made if Stripe shows it ([`made_at_stripe`]). The look-up is made first, then
/// checked under the allocation's lock, so two rows of one transfer never adopt the same reversal and a run that
/// recorded it meanwhile wins.
async fn adopt_if_made(ctx: &AppContext, r: &crate::store::reversals::ReversalRow) -> Result<Lookup, String> {
    let recorded_sql = "SELECT stripe_reversal_id, amount_cents FROM transfer_reversals
                         WHERE stripe_transfer_id = $1 AND status = 'SUCCEEDED'";
    let recorded: Vec<(Option<String>, i64)> = sqlx::query_as(recorded_sql)
        .bind(&r.stripe_transfer_id)
        .fetch_all(&ctx.pool)
        .await
        .map_err(|e| e.to_string())?;
    let made = made_at_stripe(ctx, r, &recorded).await?;
    let mut tx = ctx.pool.begin().await.map_err(|e| e.to_string())?;
    if !lock_share_while_pending(&mut tx, r).await? {
        return Ok(Lookup::AlreadyRecorded);
    }
    let Some(reversal_id) = made else {
        return Ok(Lookup::NotMade);
    };
    // The same Stripe reversal adopted by another row meanwhile (amount match of old rows): look again later.
    let now_recorded: Vec<(Option<String>, i64)> = sqlx::query_as(recorded_sql)
        .bind(&r.stripe_transfer_id)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| e.to_string())?;
    if reversal_id
        .as_deref()
        .is_some_and(|id| now_recorded.iter().any(|(x, _)| x.as_deref() == Some(id)))
    {
        return Err(format!(
            "the reversal found for row {} was just recorded by another row",
            r.id
        ));
    }
    record_reversal_success(&mut tx, r.id, reversal_id.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    send_again_if_reinstated(&mut tx, r).await.map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    tracing::warn!(reversal = r.id, transfer_id = %r.stripe_transfer_id, stripe_reversal_id = ?reversal_id,
                   "an old reversal was found made at Stripe: recorded, not sent again");
    Ok(Lookup::AdoptedNow)
}

/// Keeps the reversal PENDING with what went wrong, due again after a growing delay (see [`reverse`]).
async fn retry_later(
    ctx: &AppContext,
    r: &crate::store::reversals::ReversalRow,
    raw_id: &str,
    code: Option<&str>,
    saved_refusal_of: Option<i32>,
    message: &str,
) -> Result<(), JobFailure> {
    let delay_ms = backoff_ms_random(
        (r.attempts + 1) as u32,
        ctx.distribution.backoff_base_ms,
        REVERSAL_BACKOFF_CAP_MS,
    )
    .max(ctx.distribution.backoff_base_ms / 2);
    let next = Utc::now() + chrono::Duration::milliseconds(delay_ms as i64);
    let mut tx = ctx.pool.begin().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    record_reversal_retry(&mut tx, r.id, next, code, message, saved_refusal_of)
        .await
        .map_err(transient)?;
    enqueue(
        &mut tx,
        Queue::Reversal,
        raw_id,
        Some(std::time::Duration::from_millis(delay_ms)),
    )
    .await
    .map_err(transient)?;
    tx.commit().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    tracing::warn!(reversal = r.id, error = %message, delay_ms, "reversal refused or unanswered: retried later with the same key");
    metrics::counter!("splitpay_reversals_retried_total").increment(1);
    Ok(())
}

/// A reversal whose refund no longer stands (a won dispute) and whose request may have reached Stripe: never sent
/// again. Once no request can still be in flight, the transfer's reversals are listed: one carrying our row id was
/// made (recorded, and the share is sent what it took); none: CANCELED. A failed lookup proves nothing: later.
async fn settle_cancel(ctx: &AppContext, r: &ReversalRow) -> Result<(), JobFailure> {
    let mut conn = acquire(ctx).await?;
    let later = |secs: i64| Utc::now() + chrono::Duration::seconds(secs);
    let Some(since) = r.in_doubt_since else {
        record_reversal_canceled(&mut conn, r.id).await.map_err(transient)?;
        return Ok(());
    };
    let settled_at = since + chrono::Duration::seconds(REVERSAL_IN_FLIGHT_MARGIN_SECS);
    // Compared on the database's clock, which stamped `in_doubt_since` (review L3: a worker whose clock runs ahead
    // would look up, and cancel, while a request could still be in flight).
    let db_now: chrono::DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| JobFailure::Retry(e.to_string()))?;
    if settled_at > db_now {
        postpone_cancel(
            &mut conn,
            r.id,
            settled_at,
            "canceled: waiting until no request can be in flight",
        )
        .await
        .map_err(transient)?;
        return Ok(());
    }
    if !r.sends_metadata {
        // Sent before reversals carried our id: a lookup cannot tell it apart. Kept for an operator.
        tracing::error!(
            reversal = r.id,
            "a canceled reversal in doubt cannot be looked up (no metadata)"
        );
        postpone_cancel(
            &mut conn,
            r.id,
            later(REVERSAL_BACKOFF_CAP_MS as i64 / 1000),
            "canceled, in doubt: sent without our id, so Stripe's reversals cannot be matched; check at Stripe",
        )
        .await
        .map_err(transient)?;
        return Ok(());
    }
    match ctx.gateway.list_reversals(&r.stripe_transfer_id).await {
        Ok(list) => match list
            .into_iter()
            .find(|x| x.metadata.get(REVERSAL_REF_KEY) == Some(&r.id.to_string()))
        {
            Some(found) => {
                drop(conn);
                record_made(ctx, r, Some(&found.id)).await?;
                tracing::warn!(reversal = r.id, stripe_reversal = %found.id, "a canceled reversal was made at Stripe");
                Ok(())
            }
            None => {
                drop(conn);
                let mut tx = ctx.pool.begin().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
                lock_share(&mut tx, r).await?;
                record_reversal_canceled(&mut tx, r.id).await.map_err(transient)?;
                settle_waiting_parts(ctx, &mut tx, &allocation_id(r)?)
                    .await
                    .map_err(transient)?;
                tx.commit().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
                tracing::info!(reversal = r.id, "canceled: Stripe shows no such reversal");
                Ok(())
            }
        },
        Err(e) => {
            postpone_cancel(&mut conn, r.id, later(60), &format!("canceled; lookup failed: {e}"))
                .await
                .map_err(transient)?;
            Ok(())
        }
    }
}

/// Records a reversal as made, and its consequences, in one transaction (review F2: a crash between the two left a
/// share owed its money with nothing to send it).
async fn record_made(ctx: &AppContext, r: &ReversalRow, stripe_reversal_id: Option<&str>) -> Result<(), JobFailure> {
    let mut tx = ctx.pool.begin().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    lock_share(&mut tx, r).await?;
    record_reversal_success(&mut tx, r.id, stripe_reversal_id)
        .await
        .map_err(transient)?;
    send_again_if_reinstated(&mut tx, r).await.map_err(transient)?;
    // Parts of the share that waited for this reversal's cancel to settle are covered now, in the same
    // transaction: a won dispute applied between the two would drop them with the reversal's money unaccounted.
    // Always (second review: `r` may have been read before a cancel was requested); nothing when none waits.
    settle_waiting_parts(ctx, &mut tx, &allocation_id(r)?)
        .await
        .map_err(transient)?;
    tx.commit().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    Ok(())
}

/// Locks the reversal's share first, as every cover does (share, then its reversal rows): a cover running at once
/// then waits instead of deadlocking on the row this transaction changes.
async fn lock_share(tx: &mut Tx<'_>, r: &ReversalRow) -> Result<(), JobFailure> {
    sqlx::query("SELECT 1 FROM split_allocations WHERE id = $1 FOR UPDATE")
        .bind(&r.split_allocation_id)
        .execute(&mut **tx)
        .await
        .map_err(|e| JobFailure::Retry(e.to_string()))?;
    Ok(())
}

/// Locks the reversal's share, then says whether the reversal is still PENDING: another run of it (the job and the
/// sweep) may have recorded it meanwhile, and then it is done and must not be recorded or sent again.
async fn lock_share_while_pending(tx: &mut Tx<'_>, r: &ReversalRow) -> Result<bool, String> {
    lock_share(tx, r).await.map_err(|e| format!("{e:?}"))?;
    let status: String = sqlx::query_scalar("SELECT status FROM transfer_reversals WHERE id = $1")
        .bind(r.id)
        .fetch_one(&mut **tx)
        .await
        .map_err(|e| e.to_string())?;
    Ok(status == "PENDING")
}

fn allocation_id(r: &ReversalRow) -> Result<SplitAllocationId, JobFailure> {
    SplitAllocationId::parse(&r.split_allocation_id).map_err(|e| JobFailure::Abandon(format!("reversal {}: {e}", r.id)))
}

/// A reversal was made. If the refund that asked for it was given back meanwhile (a won dispute), the share is
/// owed what it took: a new generation, as the reinstatement gives the others; its transfer job is enqueued in the
/// caller's transaction. A share whose transfer is in flight (the reinstatement's own new generation, sent before
/// this reversal was known to be made) is marked instead, in the same transaction, and sent what it is owed once
/// TRANSFERRED again ([`resend_owed`]): it used to get nothing back, the reversal's money stranded on the platform.
async fn send_again_if_reinstated(tx: &mut Tx<'_>, r: &ReversalRow) -> Result<(), StoreError> {
    let Some(cause) = r.cause_refund_id else {
        return Ok(());
    };
    let reinstated: Option<chrono::DateTime<Utc>> =
        sqlx::query_scalar("SELECT reinstated_at FROM refunds WHERE id = $1")
            .bind(cause)
            .fetch_one(&mut **tx)
            .await?;
    if reinstated.is_none() {
        return Ok(());
    }
    let id = SplitAllocationId::parse(&r.split_allocation_id)
        .map_err(|e| StoreError::Invalid(format!("reversal {}: {e}", r.id)))?;
    if send_again_or_mark(tx, &id).await? {
        enqueue(tx, Queue::Transfer, id.as_str(), None).await?;
        tracing::warn!(split_allocation_id = %id, reversal = r.id, "reversal made after its dispute was won: sent again");
    } else {
        tracing::warn!(split_allocation_id = %id, reversal = r.id,
                       "reversal made after its dispute was won: sent again once the share's transfer settles");
    }
    Ok(())
}

/// A share marked as owed a resend ([`send_again_or_mark`]) that is settled again is sent what it is owed, its
/// transfer job enqueued, in the caller's transaction (which should hold nothing locked but the share, taken first).
/// Called by the transfer's success path and the refunds sweep; a second call sends nothing. Returns whether it did.
pub async fn resend_owed(tx: &mut Tx<'_>, id: &SplitAllocationId) -> Result<bool, StoreError> {
    let resent = resend_if_marked(tx, id).await?;
    if resent {
        enqueue(tx, Queue::Transfer, id.as_str(), None).await?;
        tracing::warn!(split_allocation_id = %id, "a reversal made after its dispute was won: sent back now that the share's transfer settled");
    }
    Ok(resent)
}

/// Covers an allocation's waiting parts now (its transfer settled) and enqueues the reversals and the new
/// generation's transfer that calls for, in the caller's transaction.
pub async fn settle_waiting_parts(ctx: &AppContext, tx: &mut Tx<'_>, id: &SplitAllocationId) -> Result<(), StoreError> {
    let covered = cover_waiting_parts(tx, id, ctx.distribution.reverse_on_refund).await?;
    enqueue_covered(tx, covered).await
}

/// Enqueues what covering refund parts called for, in the caller's transaction (the same one that wrote it): each
/// reversal intent's job, and the transfer job of each share that started a new generation (an orphaned reversal's
/// money its part did not use, given back to the recipient). Every caller of the cover goes through here.
pub async fn enqueue_covered(tx: &mut Tx<'_>, covered: Covered) -> Result<(), StoreError> {
    for reversal in &covered.reversals {
        enqueue(tx, Queue::Reversal, &reversal.to_string(), None).await?;
    }
    for id in &covered.transfers {
        enqueue(tx, Queue::Transfer, id.as_str(), None).await?;
    }
    Ok(())
}

/// What one refunds reconcile tick did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RefundsReport {
    pub parts_covered_for: Vec<String>,
    pub reversals_driven: Vec<i64>,
    /// Won disputes whose reinstatement was applied this tick (it waited for a transfer or a reversal).
    pub disputes_reinstated: Vec<String>,
    /// Shares sent again this tick what a reversal made after their dispute was won took (it was found made while
    /// their transfer was in flight).
    pub resent_after_late_reversal: Vec<String>,
}

/// The cron sweep: parts whose allocation has settled are covered, overdue reversals are tried again (with their
/// own key), shares owed what a reversal made after their won dispute took are sent it once settled, and won
/// disputes' reinstatements that waited are applied. Bounded per tick.
pub async fn reconcile_refunds(ctx: &AppContext) -> Result<RefundsReport, StoreError> {
    let mut report = RefundsReport::default();
    let waiting = allocations_with_waiting_parts(&mut *ctx.pool.acquire().await?, RECONCILE_BATCH_MAX).await?;
    for raw in waiting {
        let Ok(id) = SplitAllocationId::parse(&raw) else {
            continue;
        };
        // One share's failure (a deadlock, a corrupt row) must not stop the tick for the others, nor the
        // reversals and reinstatements after them: logged, and tried again next tick.
        let covered = async {
            let mut tx = ctx.pool.begin().await?;
            settle_waiting_parts(ctx, &mut tx, &id).await?;
            tx.commit().await?;
            Ok::<_, StoreError>(())
        };
        match covered.await {
            Ok(()) => report.parts_covered_for.push(raw),
            Err(e) => {
                tracing::warn!(split_allocation_id = %id, error = %e, "refunds sweep: covering waiting parts failed")
            }
        }
    }
    for id in due_reversals(&mut *ctx.pool.acquire().await?, RECONCILE_BATCH_MAX).await? {
        if let Err(e) = reverse(ctx, &id.to_string()).await {
            tracing::warn!(reversal = id, error = ?e, "reversal sweep");
        }
        report.reversals_driven.push(id);
    }
    // After the reversals: one found made just now, its share settled, is sent again directly. The transfer's
    // success path resends a marked share too; this finds one marked after that path read it (or before a restart).
    for raw in settled_shares_owed_a_resend(&mut *ctx.pool.acquire().await?, RECONCILE_BATCH_MAX).await? {
        let Ok(id) = SplitAllocationId::parse(&raw) else {
            continue;
        };
        let resent = async {
            let mut tx = ctx.pool.begin().await?;
            let resent = resend_owed(&mut tx, &id).await?;
            tx.commit().await?;
            Ok::<_, StoreError>(resent)
        };
        match resent.await {
            Ok(true) => report.resent_after_late_reversal.push(raw),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(split_allocation_id = %id, error = %e, "refunds sweep: sending a late reversal back failed")
            }
        }
    }
    report.disputes_reinstated = super::disputes::reconcile_reinstatements(ctx, RECONCILE_BATCH_MAX).await?;
    Ok(report)
}

async fn acquire(ctx: &AppContext) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, JobFailure> {
    ctx.pool.acquire().await.map_err(|e| JobFailure::Retry(e.to_string()))
}

async fn mark(ctx: &AppContext, event_id: &str, note: Option<&str>) -> Result<(), JobFailure> {
    finish_stripe_event(&mut *acquire(ctx).await?, event_id, note)
        .await
        .map_err(transient)
}
