//! Stripe's dispute events, taken through to splitpay's shares and donations (issue 8, point 3; the rules are in
//! [`crate::store::disputes`]).
//!
//! - `charge.dispute.funds_withdrawn`: the withdrawal is taken like a refund of the disputed amount (reversals
//!   under the policy, less transferred, `donation.refunded` once per dispute).
//! - `charge.dispute.funds_reinstated`: the withdrawal is given back: new transfer generations, then
//!   `donation.refund_reversed`. A reinstatement implies the withdrawal, so one that arrives first takes the
//!   withdrawal too (Stripe does not promise the order). It waits while a transfer or reversal is in flight; the
//!   refunds reconciler applies it later.
//! - Every other dispute event (`created`, `updated`, `closed`) refreshes the dispute's status only.
//!
//! Each event is applied in one transaction with marking it processed, and the dispute row is locked first, so
//! duplicates and concurrent deliveries change nothing twice.

use serde_json::Value;

use super::queue::{enqueue, Queue};
use super::refunds::enqueue_covered;
use super::runner::JobFailure;
use super::stripe_event::transient;
use crate::app::AppContext;
use crate::domain::ids::SplitPaymentId;
use crate::store::disputes::{
    apply_reinstatement, close_open_ops_refunds, lock_dispute, note_reinstated, record_dispute, waiting_reinstatements,
    withdraw, DisputeInfo, Reinstatement,
};
use crate::store::payments::find_split_payment_by_intent;
use crate::store::records::{finish_stripe_event, StripeEventRow};
use crate::store::refunds::{attribute_refund, Covered};
use crate::store::{StoreError, Tx};

pub fn is_dispute_event(event_type: &str) -> bool {
    event_type.starts_with("charge.dispute.")
}

/// The dispute in an event's object, or why it is not one.
fn dispute_info(object: &Value) -> Result<DisputeInfo, String> {
    let txns = object["balance_transactions"].as_array().cloned().unwrap_or_default();
    let text = |name: &str| object[name].as_str().map(str::to_owned);
    Ok(DisputeInfo {
        id: text("id").ok_or("a dispute event without the dispute's id")?,
        charge_id: text("charge").ok_or("a dispute without its charge")?,
        amount_cents: object["amount"].as_i64().ok_or("a dispute without its amount")?,
        currency: text("currency").ok_or("a dispute without its currency")?,
        reason: text("reason"),
        status: text("status").unwrap_or_else(|| "unknown".to_owned()),
        // Expanded in events (Stripe sends the dispute's balance transactions whole); an id alone adds no fee.
        fee_cents: txns.iter().filter_map(|b| b["fee"].as_i64()).sum(),
        fee_balance_txns: i32::try_from(txns.len()).unwrap_or(i32::MAX),
    })
}

pub async fn process_dispute_event(ctx: &AppContext, event: &StripeEventRow) -> Result<(), JobFailure> {
    let object = &event.payload["data"]["object"];
    let payment = match object["payment_intent"].as_str() {
        Some(pi) => {
            let mut conn = ctx.pool.acquire().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
            find_split_payment_by_intent(&mut conn, pi).await.map_err(transient)?
        }
        None => None,
    };
    let Some(payment) = payment else {
        return mark(ctx, &event.id, None).await; // not a charge of splitpay's
    };
    let info = match dispute_info(object) {
        Ok(info) => info,
        Err(why) => return mark(ctx, &event.id, Some(&why)).await,
    };
    let mut tx = ctx.pool.begin().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    let mut dispute = match record_dispute(&mut tx, &payment, &info).await {
        Ok(d) => d,
        Err(StoreError::Invalid(why)) => {
            drop(tx);
            return mark(ctx, &event.id, Some(&why)).await;
        }
        Err(e) => return Err(transient(e)),
    };
    let withdrawn = event.event_type == "charge.dispute.funds_withdrawn";
    let reinstated = event.event_type == "charge.dispute.funds_reinstated";
    // What covering the withdrawal's parts calls for: its reversals, and the shares sent back what an orphaned
    // reversal held beyond what their part used.
    let mut covered = Covered::default();
    if withdrawn || reinstated {
        if let Some(refund) = withdraw(&mut tx, &mut dispute).await.map_err(transient)? {
            close_open_ops_refunds(&mut tx, &payment, &dispute.stripe_dispute_id)
                .await
                .map_err(transient)?;
            match attribute_refund(&mut tx, &refund, ctx.distribution.reverse_on_refund).await {
                Ok(c) => covered = c,
                Err(StoreError::Invalid(why)) => {
                    tracing::error!(split_payment_id = %payment, dispute = %info.id, why, "dispute left unattributed");
                    metrics::counter!("splitpay_refunds_unattributed_total").increment(1);
                }
                Err(e) => return Err(transient(e)),
            }
        }
    }
    let mut transfers = Vec::new();
    if reinstated {
        note_reinstated(&mut tx, &dispute).await.map_err(transient)?;
        // Reversals just written, or transfers just started, are in flight: the reinstatement waits for them (the
        // reconciler applies it).
        if covered.is_empty() {
            transfers = reinstate(&mut tx, &payment, &dispute.stripe_dispute_id).await?;
        }
    }
    let reversals = covered.reversals.len();
    let transfers_started = covered.transfers.len() + transfers.len();
    enqueue_covered(&mut tx, covered).await.map_err(transient)?;
    for id in &transfers {
        enqueue(&mut tx, Queue::Transfer, id, None).await.map_err(transient)?;
    }
    finish_stripe_event(&mut tx, &event.id, None).await.map_err(transient)?;
    tx.commit().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    tracing::info!(split_payment_id = %payment, dispute = %info.id, event_type = %event.event_type,
                   reversals, transfers = transfers_started, "dispute event applied");
    Ok(())
}

/// Applies a noted reinstatement if it can be now; returns the shares whose new generation to enqueue.
async fn reinstate(tx: &mut Tx<'_>, payment: &SplitPaymentId, dispute: &str) -> Result<Vec<String>, JobFailure> {
    let row = lock_dispute(tx, dispute).await.map_err(transient)?;
    match apply_reinstatement(tx, &row).await {
        Ok(Reinstatement::Applied { transfers }) => {
            tracing::info!(split_payment_id = %payment, dispute, shares = transfers.len(), "dispute reinstated");
            metrics::counter!("splitpay_disputes_reinstated_total").increment(1);
            Ok(transfers.into_iter().map(|id| id.to_string()).collect())
        }
        Ok(Reinstatement::AlreadyApplied) => Ok(Vec::new()),
        Ok(Reinstatement::Waiting(why)) => {
            tracing::info!(split_payment_id = %payment, dispute, why, "dispute reinstatement waits");
            Ok(Vec::new())
        }
        Err(e) => Err(transient(e)),
    }
}

/// The refunds reconciler's share: reinstatements that waited for a transfer or reversal, applied once they can
/// be. Returns the disputes applied (or found applied) this tick.
pub async fn reconcile_reinstatements(ctx: &AppContext, limit: i64) -> Result<Vec<String>, StoreError> {
    let waiting = waiting_reinstatements(&mut *ctx.pool.acquire().await?, limit).await?;
    let mut done = Vec::new();
    for dispute in waiting {
        // One dispute's error (a deadlock aborted by PostgreSQL, a corrupt row) must not hold back the others:
        // logged, and tried again on the next tick.
        let one = async {
            let mut tx = ctx.pool.begin().await?;
            let row = lock_dispute(&mut tx, &dispute).await?;
            let applied = apply_reinstatement(&mut tx, &row).await?;
            if let Reinstatement::Applied { transfers } = &applied {
                for id in transfers {
                    enqueue(&mut tx, Queue::Transfer, id.as_str(), None).await?;
                }
            }
            tx.commit().await?;
            Ok::<_, StoreError>(!matches!(applied, Reinstatement::Waiting(_)))
        };
        match one.await {
            Ok(true) => done.push(dispute),
            Ok(false) => {}
            Err(e) => tracing::warn!(dispute = %dispute, error = %e, "reinstatement sweep: this dispute failed"),
        }
    }
    Ok(done)
}

async fn mark(ctx: &AppContext, event_id: &str, note: Option<&str>) -> Result<(), JobFailure> {
    let mut conn = ctx.pool.acquire().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    finish_stripe_event(&mut conn, event_id, note).await.map_err(transient)
}
