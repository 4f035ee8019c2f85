//! Applies one stored Stripe event to splitpay's state: the PaymentIntent events move the split payment through
//! its state machine (by [`super::payment_state`], the path reconcile-pending shares), with the events and jobs
//! each change calls for, in one transaction with marking the event processed; a payment that succeeded is then
//! distributed and its transfers made in this same job (the plain success both at once, in a batch with other
//! payments': [`super::start_batch`]). Idempotent (a processed event is
//! skipped; a repeated outcome is `Unchanged`) and tolerant of order (a late `processing` changes nothing). Only a
//! transition the state machine forbids is recorded as a contradiction; a database, enqueue or Stripe error leaves
//! the event unprocessed, to be retried. `account.updated` (Connect) is handled by [`super::accounts`].

use serde_json::Value;

use super::payment_state::{apply, event_of_webhook, IntentView};
use super::queue::{enqueue, Queue};
use super::runner::JobFailure;
use crate::app::AppContext;
use crate::domain::ids::SplitPaymentId;
use crate::domain::state::{PaymentEvent, PaymentStatus, Transition};
use crate::store::payments::find_split_payment_by_intent;
use crate::store::records::{finish_stripe_event, get_stripe_event};
use crate::store::StoreError;

/// The PaymentIntent event types that move a split payment ([`event_of_webhook`]).
pub const PAYMENT_INTENT_EVENT_TYPES: [&str; 4] = [
    "payment_intent.processing",
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "payment_intent.canceled",
];

/// The platform event types splitpay acts on: the types to enable on its webhook endpoint at Stripe
/// (`/stripe/webhooks`): the PaymentIntent ones, then the refund and dispute ones (the events sweep's list). Any other
/// type is accepted and stored, and changes nothing: sending it costs Stripe, the endpoint and the database a
/// delivery each (three `transfer.created` per payment).
pub const PLATFORM_EVENT_TYPES: [&str; 14] = {
    use super::event_sweep::SWEPT_EVENT_TYPES;
    let mut all = [""; 14];
    let mut i = 0;
    while i < PAYMENT_INTENT_EVENT_TYPES.len() {
        all[i] = PAYMENT_INTENT_EVENT_TYPES[i];
        i += 1;
    }
    let mut j = 0;
    while j < SWEPT_EVENT_TYPES.len() {
        all[i + j] = SWEPT_EVENT_TYPES[j];
        j += 1;
    }
    all
};

/// The Connect event types splitpay acts on: the types to enable on its Connect endpoint
/// (`/stripe/webhooks/connect`).
pub const CONNECT_EVENT_TYPES: [&str; 1] = ["account.updated"];

/// Whether an event of this type can change anything in splitpay (what [`process`] acts on). Ingress stores every
/// other event already processed and enqueues no job for it: [`process`] would only mark it processed.
pub fn needs_processing(event_type: &str) -> bool {
    event_type == "account.updated"
        || super::disputes::is_dispute_event(event_type)
        || super::refunds::is_refund_event(event_type)
        || event_of_webhook(event_type).is_some()
}

pub(crate) fn transient(e: StoreError) -> JobFailure {
    JobFailure::Retry(e.to_string())
}

pub async fn process(ctx: &AppContext, event_id: &str) -> Result<(), JobFailure> {
    let mut conn = ctx.pool.acquire().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    let event = match get_stripe_event(&mut conn, event_id).await {
        Ok(event) => event,
        Err(StoreError::NotFound { .. }) => return Err(JobFailure::Abandon(format!("no stored event {event_id}"))),
        Err(e) => return Err(transient(e)),
    };
    drop(conn);
    if event.processed_at.is_some() {
        return Ok(());
    }
    // A Connect event about a recipient's account: its links' flags, then retries of its parked shares.
    if event.event_type == "account.updated" {
        return super::accounts::account_updated(ctx, &event).await;
    }
    if super::disputes::is_dispute_event(&event.event_type) {
        return super::disputes::process_dispute_event(ctx, &event).await;
    }
    if super::refunds::is_refund_event(&event.event_type) {
        return super::refunds::process_charge_event(ctx, &event).await;
    }
    let Some(machine_event) = event_of_webhook(&event.event_type) else {
        // Not an event that moves a split payment (yet): recorded, nothing to do.
        return mark(ctx, event_id, None).await;
    };
    let intent = &event.payload["data"]["object"];
    let Some(split_payment_id) = split_payment_of(ctx, intent).await.map_err(transient)? else {
        return mark(ctx, event_id, None).await; // a PaymentIntent that is not splitpay's
    };
    crate::observability::logging::record_payment(split_payment_id.as_str());
    let view = IntentView::from_object(intent, event.stripe_created);
    if machine_event == PaymentEvent::Succeeded {
        // The plain success: the transition and the distribution's start together, in a batch with other payments'
        // (`start_batch`); anything else goes the lone way below.
        if let Some(started) = super::start_batch::start(ctx, event_id, &split_payment_id, &view).await {
            started.drive().await;
            return Ok(());
        }
    }
    match apply(ctx, &split_payment_id, machine_event, &view, Some(event_id)).await {
        Ok(Transition::To(PaymentStatus::Succeeded)) => {
            distribute_now(ctx, &split_payment_id).await;
            Ok(())
        }
        Ok(_) => Ok(()),
        // A contradiction (e.g. `failed` after `succeeded`): logged and counted by the store; recorded on the event
        // for an operator, and not retried (it would contradict again).
        Err(e) if e.is_contradiction() => mark(ctx, event_id, Some(&e.to_string())).await,
        // Anything else (the database, an enqueue, Stripe) is transient: the event stays unprocessed and is tried
        // again (by apalis, then by the sweeper).
        Err(e) => Err(JobFailure::Retry(e.to_string())),
    }
}

/// Distributes a payment this event made succeed, here rather than through a distribution job (a job per payment
/// less: issue 11). The event is processed already, so a failure is not this job's: the payment gets its
/// distribution job instead, and if even that cannot be written, the sweeper finds the payment succeeded and not
/// distributed (`split_payments_undistributed`).
async fn distribute_now(ctx: &AppContext, id: &SplitPaymentId) {
    let why = match super::distribute::distribute(ctx, id.as_str()).await {
        Ok(()) => return,
        Err(JobFailure::Retry(why) | JobFailure::Abandon(why)) => why,
    };
    tracing::warn!(split_payment_id = %id, why, "distribution failed: its job takes it on");
    let enqueued = async {
        let mut conn = ctx.pool.acquire().await?;
        enqueue(&mut conn, Queue::Distribute, id.as_str(), None).await
    };
    if let Err(e) = enqueued.await {
        tracing::warn!(split_payment_id = %id, error = %e, "no distribution job either: the sweeper will take it");
    }
}

async fn mark(ctx: &AppContext, event_id: &str, note: Option<&str>) -> Result<(), JobFailure> {
    let mut conn = ctx.pool.acquire().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    finish_stripe_event(&mut conn, event_id, note).await.map_err(transient)
}

/// Our metadata names the split payment (the webhook can beat intake to recording the PaymentIntent id); the
/// PaymentIntent id is the fallback.
async fn split_payment_of(ctx: &AppContext, intent: &Value) -> Result<Option<SplitPaymentId>, StoreError> {
    if let Some(id) = intent["metadata"]["split_payment_id"]
        .as_str()
        .and_then(|raw| SplitPaymentId::parse(raw).ok())
    {
        return Ok(Some(id));
    }
    match intent["id"].as_str() {
        Some(pi) => find_split_payment_by_intent(&mut *ctx.pool.acquire().await?, pi).await,
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The types to enable at Stripe are exactly the types splitpay acts on, among every type Stripe (and the
    /// simulator) sends about payments, charges, refunds, disputes, transfers, payouts and accounts.
    #[test]
    fn the_types_to_enable_are_exactly_those_processed() {
        let known = [
            "payment_intent.created",
            "payment_intent.processing",
            "payment_intent.succeeded",
            "payment_intent.payment_failed",
            "payment_intent.canceled",
            "payment_intent.requires_action",
            "charge.succeeded",
            "charge.pending",
            "charge.failed",
            "charge.updated",
            "charge.captured",
            "charge.refunded",
            "charge.refund.updated",
            "refund.created",
            "refund.updated",
            "refund.failed",
            "charge.dispute.created",
            "charge.dispute.updated",
            "charge.dispute.closed",
            "charge.dispute.funds_withdrawn",
            "charge.dispute.funds_reinstated",
            "transfer.created",
            "transfer.updated",
            "transfer.reversed",
            "payout.created",
            "payout.paid",
            "account.updated",
            "account.application.deauthorized",
            "capability.updated",
            "balance.available",
        ];
        for t in known {
            let enabled = PLATFORM_EVENT_TYPES.contains(&t) || CONNECT_EVENT_TYPES.contains(&t);
            assert_eq!(needs_processing(t), enabled, "{t}");
        }
        for t in PLATFORM_EVENT_TYPES.iter().chain(&CONNECT_EVENT_TYPES) {
            assert!(known.contains(t), "{t}");
        }
        // The events sweep reads a subset of them (those nothing else would notice lost).
        for t in crate::jobs::event_sweep::SWEPT_EVENT_TYPES {
            assert!(PLATFORM_EVENT_TYPES.contains(&t), "{t}");
        }
    }
}
