//! Applies what Stripe says about a split payment's PaymentIntent, through one code path whether it came from a
//! webhook or from reconcile-pending reading the PaymentIntent.
//!
//! The rules (issue 7):
//! - success → SUCCEEDED, `payment_succeeded` once, the distribution job in the same transaction;
//! - a failed attempt → back to REQUIRES_PAYMENT, the failure recorded, `payment_failed` once per failed charge;
//!   donations stay PENDING, and a later success distributes as usual (the donor may try another card on the same
//!   PaymentIntent);
//! - a failed attempt of a payment intake confirmed server-side (nobody is there to try again) is final: splitpay
//!   cancels the PaymentIntent first, then the payment ends FAILED with `donation.failed`;
//! - canceled → CANCELED, `donation.failed`;
//! - Stripe does not order webhooks: a `processing` or a failed attempt older than the last change applied is stale
//!   and changes nothing.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::queue::{enqueue, Queue};
use crate::app::AppContext;
use crate::domain::ids::{payment_intent_cancel_key, SplitPaymentId};
use crate::domain::state::{PaymentEvent, PaymentStatus, Transition};
use crate::events::EventType;
use crate::store::announce;
use crate::store::donations::donations_for_payment;
use crate::store::payments::{get_split_payment, transition_payment, void_payment_parts, PaymentPatch, SplitPayment};
use crate::store::records::{finish_stripe_event, insert_outbox_events};
use crate::store::StoreError;
use crate::stripe::{CancellationReason, GatewayError, IntentStatus, PaymentIntentInfo};

/// What Stripe said about a PaymentIntent at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntentView {
    pub intent_id: String,
    pub status: Option<IntentStatus>,
    pub latest_charge: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub cancellation_reason: Option<String>,
    /// When Stripe said it: the event's `created`, or when splitpay read the PaymentIntent.
    pub observed_at: DateTime<Utc>,
    /// A webhook (which may be stale: Stripe does not order them) rather than a read of the PaymentIntent as it is
    /// now. Only webhooks are checked for staleness and advance `stripe_event_at`: a read is current, and its time
    /// is splitpay's clock, not Stripe's.
    pub from_webhook: bool,
}

impl IntentView {
    /// From a webhook's `data.object` and the event's `created`.
    pub fn from_object(object: &Value, created: Option<DateTime<Utc>>) -> Self {
        let error = &object["last_payment_error"];
        let text = |v: &Value| v.as_str().map(str::to_owned);
        Self {
            intent_id: object["id"].as_str().unwrap_or_default().to_owned(),
            status: object["status"].as_str().and_then(IntentStatus::parse),
            latest_charge: text(&object["latest_charge"]).or_else(|| text(&object["latest_charge"]["id"])),
            error_code: text(&error["code"]),
            error_message: text(&error["message"]),
            cancellation_reason: text(&object["cancellation_reason"]),
            observed_at: created.unwrap_or_else(Utc::now),
            from_webhook: true,
        }
    }

    /// From a PaymentIntent splitpay read just now.
    pub fn from_info(pi: &PaymentIntentInfo, now: DateTime<Utc>) -> Self {
        let error = pi.last_payment_error.as_ref();
        Self {
            intent_id: pi.id.clone(),
            status: Some(pi.status),
            latest_charge: pi.latest_charge.clone(),
            error_code: error.and_then(|e| e.code.clone()),
            error_message: error.and_then(|e| e.message.clone()),
            cancellation_reason: pi.cancellation_reason.clone(),
            observed_at: now,
            from_webhook: false,
        }
    }

    /// The machine's event for the PaymentIntent's current status, if it says anything about the payment.
    pub fn event_of_status(&self) -> Option<PaymentEvent> {
        Some(match self.status? {
            IntentStatus::Succeeded => PaymentEvent::Succeeded,
            IntentStatus::Processing => PaymentEvent::Processing,
            IntentStatus::Canceled => PaymentEvent::Canceled,
            // Back to requires_payment_method after an attempt: a failed attempt. Without an error it has simply
            // not been paid yet.
            IntentStatus::RequiresPaymentMethod if self.error_code.is_some() || self.error_message.is_some() => {
                PaymentEvent::AttemptFailed
            }
            _ => return None,
        })
    }

    fn failure(&self, event: PaymentEvent) -> (String, String) {
        let code = self
            .error_code
            .clone()
            .or_else(|| self.cancellation_reason.clone())
            .unwrap_or_else(|| {
                if event == PaymentEvent::Canceled {
                    "canceled".into()
                } else {
                    "payment_failed".into()
                }
            });
        let message = self.error_message.clone().unwrap_or_else(|| {
            if event == PaymentEvent::Canceled {
                "The payment was canceled before it was paid.".into()
            } else {
                "The payment did not complete.".into()
            }
        });
        (code, message)
    }
}

/// The machine's event for a Stripe webhook type, if it moves a split payment.
pub fn event_of_webhook(stripe_type: &str) -> Option<PaymentEvent> {
    Some(match stripe_type {
        "payment_intent.processing" => PaymentEvent::Processing,
        "payment_intent.succeeded" => PaymentEvent::Succeeded,
        "payment_intent.payment_failed" => PaymentEvent::AttemptFailed,
        "payment_intent.canceled" => PaymentEvent::Canceled,
        _ => return None,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A database or enqueue error, or a refused transition (`StoreError::Forbidden`: a contradiction).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Stripe could not be asked (cancel before a final failure): transient, try again.
    #[error("Stripe: {0}")]
    Gateway(#[from] GatewayError),
}

impl ApplyError {
    /// Only a transition the state machine forbids, or an event that names a payment splitpay cannot match, is a
    /// contradiction to record; everything else is transient and the event stays unprocessed.
    pub fn is_contradiction(&self) -> bool {
        matches!(
            self,
            ApplyError::Store(StoreError::Forbidden(_) | StoreError::Invalid(_))
        )
    }
}

/// Applies `event` as seen in `view` to split payment `id`; with `inbox_event`, marks that stored Stripe event
/// processed in the same transaction and leaves a payment it makes succeed for the caller to distribute (without
/// it, a distribution job is enqueued with the change). Returns the transition (Unchanged for a repeat, a late or a
/// stale event).
pub async fn apply(
    ctx: &AppContext,
    id: &SplitPaymentId,
    event: PaymentEvent,
    view: &IntentView,
    inbox_event: Option<&str>,
) -> Result<Transition<PaymentStatus>, ApplyError> {
    let payment = load(ctx, id).await?;
    if let Some(known) = payment.payment.payment_intent_id.as_deref() {
        if !view.intent_id.is_empty() && known != view.intent_id {
            return Err(
                StoreError::Invalid(format!("split payment {id} belongs to {known}, not {}", view.intent_id)).into(),
            );
        }
    }
    let mut event = event;
    let mut view = view.clone();
    if event == PaymentEvent::Canceled && payment.payment.status == PaymentStatus::Created {
        // A PaymentIntent canceled while its payment never left intake: reconcile-pending's replay of an abandoned
        // intake, which cancels before it records anything. Seen first (the webhook before the reconciler's own
        // transition, or a crash after the cancel), it is that abandonment, with the same code and message either
        // way, and FAILED whether or not intake had a payment method.
        event = PaymentEvent::Failed;
        view.error_code = Some(super::reconcile::INTAKE_ABANDONED.to_owned());
        view.error_message = Some(super::reconcile::INTAKE_ABANDONED_MESSAGE.to_owned());
    }
    if event == PaymentEvent::Canceled
        && payment.payment.confirm_payment_method.is_some()
        && !payment.payment.status.is_final()
    {
        // Stripe never cancels a payment by itself once it is confirmed (and cannot cancel a debit in flight):
        // a server-confirmed payment's PaymentIntent is canceled only by splitpay, after its final failure. Seen
        // before that failure was recorded (a crash between the cancel and the transition, or the webhook first),
        // it is that failure.
        event = PaymentEvent::Failed;
    }
    if event == PaymentEvent::AttemptFailed
        && payment.payment.confirm_payment_method.is_some()
        && !payment.payment.status.is_final()
    {
        // Confirmed server-side: nobody is there to try another card, so the failure is final. Cancel the
        // PaymentIntent first (a crash before the transaction below retries the cancel under the same key).
        match cancel_or_learn(ctx, id, &view.intent_id).await? {
            None => event = PaymentEvent::Failed,
            // It is not failed after all (it succeeded or is processing): apply what Stripe holds now.
            Some(current) => {
                let Some(e) = current.event_of_status() else {
                    return Ok(Transition::Unchanged);
                };
                event = e;
                view = current;
            }
        }
    }
    apply_in_tx(ctx, id, &payment, event, &view, inbox_event).await
}

/// Cancels a payment's PaymentIntent under splitpay's cancel key. `None`: it is canceled (now or before). `Some`:
/// Stripe refused because the PaymentIntent is in another state (succeeded, processing), which is returned.
pub async fn cancel_or_learn(
    ctx: &AppContext,
    id: &SplitPaymentId,
    intent_id: &str,
) -> Result<Option<IntentView>, ApplyError> {
    match ctx
        .gateway
        // One reason for every cancellation splitpay makes (the key's parameters must never differ): nobody will
        // pay this PaymentIntent any more.
        .cancel_payment_intent(
            intent_id,
            Some(CancellationReason::Abandoned),
            &payment_intent_cancel_key(id),
        )
        .await
    {
        Ok(_) => Ok(None),
        Err(GatewayError::Terminal { code, .. }) if code.as_deref() == Some("payment_intent_unexpected_state") => {
            let pi = ctx.gateway.retrieve_payment_intent(intent_id).await?;
            if pi.status == IntentStatus::Canceled {
                return Ok(None);
            }
            Ok(Some(IntentView::from_info(&pi, Utc::now())))
        }
        Err(e) => Err(e.into()),
    }
}

async fn load(ctx: &AppContext, id: &SplitPaymentId) -> Result<SplitPayment, StoreError> {
    // The payment and its allocations in one transaction (one snapshot; one transaction, not one per statement).
    let mut tx = ctx.pool.begin().await?;
    let payment = match get_split_payment(&mut tx, id).await {
        Err(StoreError::NotFound { .. }) => Err(StoreError::Invalid(format!(
            "metadata names an unknown split payment {id}"
        ))),
        other => other,
    }?;
    tx.commit().await?;
    Ok(payment)
}

async fn apply_in_tx(
    ctx: &AppContext,
    id: &SplitPaymentId,
    payment: &SplitPayment,
    event: PaymentEvent,
    view: &IntentView,
    inbox_event: Option<&str>,
) -> Result<Transition<PaymentStatus>, ApplyError> {
    let mut tx = ctx.pool.begin().await.map_err(StoreError::from)?;
    // Re-read under the row lock the transition takes, for the stale check below.
    let (stripe_event_at,): (Option<DateTime<Utc>>,) =
        sqlx::query_as("SELECT stripe_event_at FROM split_payments WHERE id = $1 FOR UPDATE")
            .bind(id.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::from)?;
    let stale = view.from_webhook
        && matches!(event, PaymentEvent::Processing | PaymentEvent::AttemptFailed)
        && stripe_event_at.is_some_and(|last| view.observed_at < last);
    let transition = if stale {
        tracing::info!(split_payment_id = %id, event = %event, "stale Stripe event: a newer one was applied");
        Transition::Unchanged
    } else {
        // From an inbox event, the event job distributes a succeeded payment itself, at once, after this commits
        // (`stripe_event::process`); any other caller gets a distribution job in this transaction.
        let distribution_job = inbox_event.is_none();
        transition(&mut tx, id, payment, event, view, distribution_job).await?
    };
    if let Some(evt) = inbox_event {
        finish_stripe_event(&mut tx, evt, None).await?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    Ok(transition)
}

async fn transition(
    tx: &mut crate::store::Tx<'_>,
    id: &SplitPaymentId,
    payment: &SplitPayment,
    event: PaymentEvent,
    view: &IntentView,
    distribution_job: bool,
) -> Result<Transition<PaymentStatus>, StoreError> {
    let failed = matches!(
        event,
        PaymentEvent::AttemptFailed | PaymentEvent::Failed | PaymentEvent::Canceled
    );
    let failure = failed.then(|| view.failure(event));
    let patch = PaymentPatch {
        payment_intent_id: Some(view.intent_id.clone()).filter(|s| !s.is_empty()),
        charge_id: view.latest_charge.clone().filter(|_| event == PaymentEvent::Succeeded),
        failure_code: failure.as_ref().map(|f| f.0.clone()),
        failure_message: failure.as_ref().map(|f| f.1.clone()),
        stripe_event_at: Some(view.observed_at).filter(|_| view.from_webhook),
        failed_charge_id: view
            .latest_charge
            .clone()
            .filter(|_| event == PaymentEvent::AttemptFailed),
    };
    // The same failed attempt seen again (a reconcile read, a redelivery under a new event id): nothing new. An
    // attempt without a charge (an authentication failure) is recognised by its code and message.
    if event == PaymentEvent::AttemptFailed
        && payment.payment.status == crate::domain::state::PaymentStatus::RequiresPayment
    {
        let same = match &view.latest_charge {
            Some(charge) => payment.payment.last_failed_charge_id.as_ref() == Some(charge),
            None => failure.as_ref().is_some_and(|(code, message)| {
                payment.payment.failure_code.as_ref() == Some(code)
                    && payment.payment.failure_message.as_ref() == Some(message)
            }),
        };
        if same {
            return Ok(Transition::Unchanged);
        }
    }
    let now = Utc::now();
    // Each failed attempt is announced once: keyed by its charge (or, without one, by what ended the payment).
    let attempt_ref = match event {
        PaymentEvent::AttemptFailed | PaymentEvent::Failed => Some(view.latest_charge.clone().unwrap_or_else(|| {
            let (code, message) = failure.clone().unwrap_or_default();
            format!("{code}-{:016x}", fnv1a(message.as_bytes()))
        })),
        PaymentEvent::Canceled => Some("canceled".to_owned()),
        _ => None,
    };
    let outbound = match (event, &failure) {
        (PaymentEvent::Succeeded, _) => vec![announce::payment(
            EventType::PaymentSucceeded,
            &payment.payment,
            None,
            None,
            now,
        )],
        (_, Some((code, message))) => vec![announce::payment(
            EventType::PaymentFailed,
            &payment.payment,
            Some((code, message)),
            attempt_ref.as_deref(),
            now,
        )],
        _ => vec![],
    };
    let transition = transition_payment(tx, id, event, &patch, &outbound).await?;
    if matches!(transition, Transition::Unchanged) {
        return Ok(transition);
    }
    match event {
        PaymentEvent::Processing => {
            for donation in donations_for_payment(tx, id).await? {
                if let Some(e) = announce::donation(EventType::DonationProcessing, &donation, now) {
                    insert_outbox_events(tx, &[e]).await?;
                }
            }
        }
        // Without the job, a crash before the caller's distribution leaves a succeeded, undistributed payment: the
        // sweeper and reconcile-transfers look for exactly that (`split_payments_undistributed`).
        PaymentEvent::Succeeded if distribution_job => enqueue(tx, Queue::Distribute, id.as_str(), None).await?,
        PaymentEvent::Succeeded => {}
        PaymentEvent::Failed | PaymentEvent::Canceled => {
            let (code, message) = failure.expect("set for failures");
            void_payment_parts(tx, payment, &code, &message, now).await?;
        }
        // The donor may try again: donations stay PENDING.
        PaymentEvent::AttemptFailed | PaymentEvent::IntentCreated => {}
    }
    Ok(transition)
}

/// A stable short fingerprint (FNV-1a, 64 bits) for dedup keys: the same text gives the same key in every process.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
