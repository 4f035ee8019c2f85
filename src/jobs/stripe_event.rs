//! Applies one stored Stripe event to splitpay's state: the PaymentIntent events move the split payment through
//! its state machine, with the events and jobs each change calls for, in one transaction with marking the event
//! processed. Idempotent (a processed event is skipped; a repeated outcome is `Unchanged`) and tolerant of order
//! (a late `processing` after `succeeded` changes nothing).

use chrono::Utc;
use serde_json::Value;

use super::queue::{enqueue, Queue};
use super::runner::JobFailure;
use crate::app::AppContext;
use crate::domain::ids::SplitPaymentId;
use crate::domain::state::{PaymentEvent, Transition};
use crate::events::{build, EventType};
use crate::store::payments::{
    donations_for_payment, find_split_payment_by_intent, get_split_payment, transition_payment, void_payment_parts,
    PaymentPatch,
};
use crate::store::records::{finish_stripe_event, get_stripe_event};
use crate::store::{StoreError, Tx};

/// The Stripe events that move a split payment, and the machine's event for each.
fn payment_event(stripe_type: &str) -> Option<PaymentEvent> {
    Some(match stripe_type {
        "payment_intent.processing" => PaymentEvent::Processing,
        "payment_intent.succeeded" => PaymentEvent::Succeeded,
        "payment_intent.payment_failed" => PaymentEvent::Failed,
        "payment_intent.canceled" => PaymentEvent::Canceled,
        _ => return None,
    })
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
    let Some(machine_event) = payment_event(&event.event_type) else {
        // Not an event that moves a split payment (yet): recorded, nothing to do.
        return mark(ctx, event_id, None).await;
    };
    let intent = &event.payload["data"]["object"];
    let Some(split_payment_id) = split_payment_of(ctx, intent).await.map_err(transient)? else {
        return mark(ctx, event_id, None).await; // a PaymentIntent that is not splitpay's
    };

    let mut tx = ctx.pool.begin().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
    match apply(&mut tx, &split_payment_id, machine_event, intent).await {
        Ok(_) => {
            finish_stripe_event(&mut tx, event_id, None).await.map_err(transient)?;
            tx.commit().await.map_err(|e| JobFailure::Retry(e.to_string()))?;
            Ok(())
        }
        // A contradiction (e.g. `failed` after `succeeded`): logged and counted by the store; recorded on the event
        // for an operator, and not retried (it would contradict again).
        Err(e @ (StoreError::Forbidden(_) | StoreError::Invalid(_))) => {
            drop(tx);
            mark(ctx, event_id, Some(&e.to_string())).await
        }
        Err(e) => Err(transient(e)),
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

async fn apply(
    tx: &mut Tx<'_>,
    id: &SplitPaymentId,
    event: PaymentEvent,
    intent: &Value,
) -> Result<Transition<crate::domain::state::PaymentStatus>, StoreError> {
    let payment = match get_split_payment(tx, id).await {
        Ok(p) => p,
        Err(StoreError::NotFound { .. }) => {
            return Err(StoreError::Invalid(format!(
                "metadata names an unknown split payment {id}"
            )))
        }
        Err(e) => return Err(e),
    };
    let intent_id = intent["id"].as_str().unwrap_or_default();
    if payment
        .payment
        .payment_intent_id
        .as_deref()
        .is_some_and(|known| known != intent_id)
    {
        return Err(StoreError::Invalid(format!(
            "split payment {id} belongs to {:?}, not {intent_id}",
            payment.payment.payment_intent_id
        )));
    }
    let failure = (event == PaymentEvent::Failed || event == PaymentEvent::Canceled).then(|| {
        let error = &intent["last_payment_error"];
        let code = error["code"]
            .as_str()
            .or(intent["cancellation_reason"].as_str())
            .unwrap_or(if event == PaymentEvent::Canceled {
                "canceled"
            } else {
                "payment_failed"
            });
        let message = error["message"].as_str().unwrap_or("The payment did not complete.");
        (code.to_owned(), message.to_owned())
    });
    let patch = PaymentPatch {
        payment_intent_id: Some(intent_id.to_owned()).filter(|s| !s.is_empty()),
        charge_id: intent["latest_charge"]
            .as_str()
            .map(str::to_owned)
            .filter(|_| event == PaymentEvent::Succeeded),
        failure_code: failure.as_ref().map(|f| f.0.clone()),
        failure_message: failure.as_ref().map(|f| f.1.clone()),
    };
    let now = Utc::now();
    let outbound = match event {
        PaymentEvent::Succeeded => vec![build::payment(EventType::PaymentSucceeded, &payment.payment, None, now)],
        PaymentEvent::Failed | PaymentEvent::Canceled => {
            let f = failure.as_ref().expect("set for failures");
            vec![build::payment(
                EventType::PaymentFailed,
                &payment.payment,
                Some((&f.0, &f.1)),
                now,
            )]
        }
        _ => vec![],
    };
    let transition = transition_payment(tx, id, event, &patch, &outbound).await?;
    if matches!(transition, Transition::Unchanged) {
        return Ok(transition);
    }
    match event {
        PaymentEvent::Processing => {
            for donation in donations_for_payment(tx, id).await? {
                if let Some(e) = build::donation(EventType::DonationProcessing, &donation, now) {
                    crate::store::records::insert_outbox_events(tx, &[e]).await?;
                }
            }
        }
        PaymentEvent::Succeeded => enqueue(tx, Queue::Distribute, id.as_str(), None).await?,
        PaymentEvent::Failed | PaymentEvent::Canceled => {
            let (code, message) = failure.expect("set for failures");
            void_payment_parts(tx, &payment, &code, &message, now).await?;
        }
        PaymentEvent::IntentCreated => {}
    }
    Ok(transition)
}
