//! Intake: a donor's payment through a recommendation set becomes a split payment and one PaymentIntent.
//!
//! Everything is checked before anything is written: the set (exists, active, not archived, not expired), the
//! links the payment would go to (active, charges enabled), the currency (one the platform settles in), the payment
//! method, and the amounts (the domain's plan rules, with the platform's minimum allocation). A refused request
//! writes nothing and creates no PaymentIntent. Then, in one transaction, the split payment, its allocations and
//! each recipient's PENDING donation (`donation.created`) are written — before Stripe is called, as the contract
//! asks — and the PaymentIntent is created with a key derived from the split payment's id, so a retry can never make
//! a second one. From then on the payment moves only on Stripe's events.

use std::collections::BTreeMap;

use chrono::Utc;

use crate::app::AppContext;
use crate::domain::fees::gross_up;
use crate::domain::ids::{check_external_id, payment_intent_idempotency_key, SplitAllocationId, SplitPaymentId};
use crate::domain::money::Currency;
use crate::domain::plan::{PaymentMethodType, PlanError, SplitPlan, Submission, SubmittedAmount};
use crate::domain::state::PaymentEvent;
use crate::events::EventType;
use crate::store::announce;
use crate::store::catalog::get_recommendation_set;
use crate::store::donations::create_donation_for_allocation;
use crate::store::payments::{
    create_split_payment, get_split_payment, transition_payment, void_payment_parts, NewSplitPayment, PaymentPatch,
    SplitPayment,
};
use crate::store::{StoreError, Tx};
use crate::stripe::{CreatePaymentIntentParams, GatewayError, PaymentIntentInfo};

/// The body of `POST /v1/split-payments`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntakeRequest {
    pub recommendation_set_id: String,
    #[serde(default)]
    pub donor_id: Option<String>,
    pub payment_method_type: PaymentMethodType,
    /// If given, must be the set's currency (either case).
    #[serde(default)]
    pub currency: Option<String>,
    /// Per-allocation amounts for SUGGESTED and OPEN sets (for FIXED: omit, or repeat the set's amounts).
    #[serde(default)]
    pub amounts: Vec<SubmittedAmount>,
    #[serde(default)]
    pub donor_covers_fees: bool,
    /// Confirm server-side with this PaymentMethod (tests, the demo, saved methods).
    #[serde(default)]
    pub payment_method: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// 400 `validation_failed`: `param` names the field.
    #[error("{message}")]
    Invalid { param: String, message: String },
    /// 422 `validation_failed`: well-formed, but the platform cannot take it (a currency it does not settle in);
    /// `param` names the field.
    #[error("{message}")]
    Unprocessable { param: String, message: String },
    /// 404 `not_found`.
    #[error("{message}")]
    NotFound { param: String, message: String },
    /// Another request with the same Idempotency-Key is being written right now.
    #[error("a request with this Idempotency-Key is in progress")]
    InProgress,
    /// Stripe could not be reached or answered with an unknown outcome: the payment is written; retry with the same
    /// Idempotency-Key to resume it.
    #[error("Stripe is unavailable: {0}")]
    StripeUnavailable(String),
    /// A resume came more than [`RESUME_WINDOW_HOURS`] after the payment was written: Stripe may have forgotten the
    /// PaymentIntent's idempotency key, so replaying the create could make a second PaymentIntent.
    #[error(
        "this Idempotency-Key's payment {payment_id} was created more than {RESUME_WINDOW_HOURS} hours ago and can no \
         longer be resumed safely; create a new payment with a new Idempotency-Key"
    )]
    ResumeExpired { payment_id: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How long after a payment was written a retry may still resume it. Stripe keeps idempotency keys for at least
/// 24 hours; an hour's margin covers the retry's own Stripe call (with its retries) and clock differences.
pub const RESUME_WINDOW_HOURS: i32 = 23;

/// A plan refusal as intake reports it: a currency the platform cannot settle is 422, every other rule 400.
fn plan_refused(e: PlanError) -> IntakeError {
    match e {
        PlanError::CurrencyNotSettled { .. } => IntakeError::Unprocessable {
            param: e.param(),
            message: e.to_string(),
        },
        _ => invalid(&e.param(), e.to_string()),
    }
}

fn invalid(param: &str, message: impl Into<String>) -> IntakeError {
    IntakeError::Invalid {
        param: param.to_owned(),
        message: message.into(),
    }
}

/// What happened at Stripe, for the response.
#[derive(Debug, Clone)]
pub struct IntentOutcome {
    pub intent: Option<PaymentIntentInfo>,
    /// `(code, decline_code, message)` when Stripe declined or refused.
    pub failure: Option<(String, Option<String>, String)>,
}

/// Checks the request and writes the split payment, its allocations and donations (and, with an Idempotency-Key,
/// its record) in one transaction.
pub async fn create(
    ctx: &AppContext,
    req: &IntakeRequest,
    idempotency: Option<(&str, &str)>,
) -> Result<SplitPayment, IntakeError> {
    check_external_id("recommendation_set_id", &req.recommendation_set_id)
        .map_err(|e| invalid("recommendation_set_id", e.to_string()))?;
    if let Some(donor) = &req.donor_id {
        check_external_id("donor_id", donor).map_err(|e| invalid("donor_id", e.to_string()))?;
    }
    if let Some(pm) = &req.payment_method {
        check_external_id("payment_method", pm).map_err(|e| invalid("payment_method", e.to_string()))?;
    }
    let mut conn = ctx.pool.acquire().await.map_err(StoreError::from)?;
    let set = match get_recommendation_set(&mut conn, &req.recommendation_set_id).await {
        Ok(set) => set,
        Err(StoreError::NotFound { .. }) => {
            return Err(IntakeError::NotFound {
                param: "recommendation_set_id".into(),
                message: format!("Recommendation set '{}' not found", req.recommendation_set_id),
            })
        }
        Err(e) => return Err(e.into()),
    };
    drop(conn);
    let currency = match &req.currency {
        Some(c) => Some(Currency::parse(c).map_err(|e| invalid("currency", e.to_string()))?),
        None => None,
    };
    let submission = Submission {
        currency,
        amounts: req.amounts.clone(),
    };
    // The minimum applies to what the donor asked; a gross-up below only raises amounts.
    let mut plan =
        SplitPlan::from_submission(&set.rules(), &submission, &ctx.distribution.plan_limits).map_err(plan_refused)?;
    // After the plan, so a currency the platform does not settle in is reported as that, not as a method problem.
    if !req.payment_method_type.supports(set.currency) {
        return Err(invalid(
            "payment_method_type",
            format!("{} does not support {}", req.payment_method_type, set.currency),
        ));
    }
    let links: Vec<&str> = plan
        .lines()
        .iter()
        .map(|l| l.recipient_org_account_link_id.as_str())
        .collect();
    set.check_available(Utc::now(), &links)
        .map_err(|e| invalid("recommendation_set_id", e.to_string()))?;
    if req.donor_covers_fees {
        let schedule = ctx.distribution.fee_schedule(req.payment_method_type);
        let up = gross_up(&plan.gross_amounts_cents(), &schedule)
            .map_err(|e| invalid("donor_covers_fees", e.to_string()))?;
        plan = plan
            .with_gross_amounts(&up.gross_cents)
            .map_err(|e| invalid("donor_covers_fees", e.to_string()))?;
    }

    let id = SplitPaymentId::generate();
    let mut tx = ctx.pool.begin().await.map_err(StoreError::from)?;
    let payment = create_split_payment(
        &mut tx,
        &NewSplitPayment {
            id: id.clone(),
            set: &set,
            plan: &plan,
            donor_id: req.donor_id.clone(),
            payment_method_type: req.payment_method_type,
            donor_covers_fees: req.donor_covers_fees,
        },
    )
    .await?;
    if let Some(pm) = &req.payment_method {
        // Kept so a resumed retry sends the same parameters under the same PaymentIntent key (a PaymentMethod id is
        // useless without our Stripe key).
        sqlx::query("UPDATE split_payments SET confirm_payment_method = $2 WHERE id = $1")
            .bind(id.as_str())
            .bind(pm)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
    }
    let now = Utc::now();
    for allocation in &payment.allocations {
        let aid = SplitAllocationId::parse(&allocation.id).map_err(|e| StoreError::Invalid(e.to_string()))?;
        create_donation_for_allocation(&mut tx, &aid, payment.payment.created_at, |d| {
            announce::donation(EventType::DonationCreated, d, now)
                .into_iter()
                .collect()
        })
        .await?;
    }
    if let Some((key, hash)) = idempotency {
        let claimed = sqlx::query(
            "INSERT INTO intake_requests (idempotency_key, request_sha256, split_payment_id) VALUES ($1, $2, $3)
             ON CONFLICT (idempotency_key) DO NOTHING",
        )
        .bind(key)
        .bind(hash)
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        if claimed.rows_affected() == 0 {
            return Err(IntakeError::InProgress); // the transaction rolls back: nothing of ours is written
        }
    }
    tx.commit().await.map_err(StoreError::from)?;
    Ok(payment)
}

/// Resumes a payment an earlier request wrote but could not take to Stripe: the PaymentIntent create is replayed
/// under the same key, so Stripe returns the intent it may already have made. Only within [`RESUME_WINDOW_HOURS`]
/// of the payment's creation (measured on the database's clock, which stamped it): after that Stripe may have
/// pruned the key and the replay would make a second PaymentIntent, so the retry is refused, nothing is written and
/// Stripe is not called (the reconciler fails such payments).
pub async fn resume(ctx: &AppContext, id: &SplitPaymentId) -> Result<(SplitPayment, IntentOutcome), IntakeError> {
    let (expired,): (bool,) =
        sqlx::query_as("SELECT now() - created_at >= make_interval(hours => $2) FROM split_payments WHERE id = $1")
            .bind(id.as_str())
            .bind(RESUME_WINDOW_HOURS)
            .fetch_one(&ctx.pool)
            .await
            .map_err(StoreError::from)?;
    if expired {
        return Err(IntakeError::ResumeExpired {
            payment_id: id.to_string(),
        });
    }
    create_intent(ctx, id).await
}

/// Creates (or, on a retry, finds again through the same key) the PaymentIntent of a written split payment and
/// records its id. A decline is an outcome, not an error: Stripe's events will fail the payment.
pub async fn create_intent(
    ctx: &AppContext,
    id: &SplitPaymentId,
) -> Result<(SplitPayment, IntentOutcome), IntakeError> {
    create_intent_as(ctx, id, Confirmation::AsAsked).await
}

/// Whether a (re)played create confirms the PaymentIntent server-side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmation {
    /// With the stored `payment_method`, if intake was given one (intake and its resume).
    AsAsked,
    /// Never: the reconciler's replay of an abandoned intake learns (or makes) the PaymentIntent only to cancel it,
    /// and must never charge a donor who was told the payment failed. If the original create did reach Stripe,
    /// these other parameters meet `idempotency_error`: the PaymentIntent exists, and its webhooks will tell.
    Never,
}

/// [`create_intent`], choosing the confirmation.
pub async fn create_intent_as(
    ctx: &AppContext,
    id: &SplitPaymentId,
    confirmation: Confirmation,
) -> Result<(SplitPayment, IntentOutcome), IntakeError> {
    let payment = get_split_payment(&mut *ctx.pool.acquire().await.map_err(StoreError::from)?, id).await?;
    let answer = match send_create(ctx, &payment, confirmation).await {
        Ok(answer) => answer,
        // The key's PaymentIntent was made with other parameters: by the reconciler's unconfirmed replay of this
        // intake (`Confirmation::Never`), which then cancels it and fails the payment. Once that is done, a retry of
        // the intake is answered with the payment as it ended, not with a 503 for ever.
        Err(SendError::KeyUsedOtherwise(reason)) => {
            let now = get_split_payment(&mut *ctx.pool.acquire().await.map_err(StoreError::from)?, id).await?;
            if !now.payment.status.is_final() {
                return Err(IntakeError::StripeUnavailable(format!(
                    "the intake key was used with other parameters (a reconciliation replay that is closing the \
                     payment, or the original create); its PaymentIntent is left to them: {reason}"
                )));
            }
            // The payment's own failure (`intake_abandoned`, or Stripe's refusal of the replay) is in its row.
            return Ok((
                now,
                IntentOutcome {
                    intent: None,
                    failure: None,
                },
            ));
        }
        Err(SendError::Intake(e)) => return Err(e),
    };
    record_create(ctx, id, &payment, &answer).await?;
    let payment = get_split_payment(&mut *ctx.pool.acquire().await.map_err(StoreError::from)?, id).await?;
    Ok((payment, answer.outcome))
}

/// Stripe's answer to a payment's PaymentIntent create: the PaymentIntent, or Stripe's refusal (with the
/// PaymentIntent it made, if it made one).
#[derive(Debug, Clone)]
pub struct CreateAnswer {
    pub intent_id: Option<String>,
    pub outcome: IntentOutcome,
}

/// Why [`send_create`] has no answer.
#[derive(Debug)]
pub enum SendError {
    /// Stripe answered `idempotency_error`: the key was first used with other parameters, and its PaymentIntent
    /// cannot be named by this request. Not a refusal of the payment (failing it would strand a charge the first
    /// request may make).
    KeyUsedOtherwise(String),
    Intake(IntakeError),
}

/// Sends (or replays, under the payment's key) the PaymentIntent create and returns Stripe's answer, writing
/// nothing: [`record_create`] records it. The reconciler cancels a replayed PaymentIntent before anything is
/// recorded, so a crash between the two replays the same create again rather than leaving a live PaymentIntent.
pub async fn send_create(
    ctx: &AppContext,
    payment: &SplitPayment,
    confirmation: Confirmation,
) -> Result<CreateAnswer, SendError> {
    let p = &payment.payment;
    let id = SplitPaymentId::parse(&p.id).map_err(|e| SendError::Intake(StoreError::Invalid(e.to_string()).into()))?;
    let params = CreatePaymentIntentParams {
        amount_cents: p.total_amount_cents,
        currency: p.currency.stripe_code().to_owned(),
        payment_method_type: p.payment_method_type,
        transfer_group: p.transfer_group.clone(),
        metadata: BTreeMap::from([
            ("split_payment_id".to_owned(), p.id.clone()),
            ("recommendation_set_id".to_owned(), p.recommendation_set_id.clone()),
            ("organisation_id".to_owned(), p.organisation_id.clone()),
        ]),
        payment_method: p
            .confirm_payment_method
            .clone()
            .filter(|_| confirmation == Confirmation::AsAsked),
        idempotency_key: payment_intent_idempotency_key(&id),
    };
    match ctx.gateway.create_payment_intent(&params).await {
        Ok(pi) => Ok(CreateAnswer {
            intent_id: Some(pi.id.clone()),
            outcome: IntentOutcome {
                intent: Some(pi),
                failure: None,
            },
        }),
        Err(e) if e.is_idempotency_misuse() => Err(SendError::KeyUsedOtherwise(e.to_string())),
        Err(GatewayError::Terminal {
            code,
            decline_code,
            message,
            payment_intent,
            ..
        }) => Ok(CreateAnswer {
            intent_id: payment_intent,
            outcome: IntentOutcome {
                intent: None,
                failure: Some((code.unwrap_or_else(|| "stripe_refused".into()), decline_code, message)),
            },
        }),
        Err(e) => Err(SendError::Intake(IntakeError::StripeUnavailable(e.to_string()))),
    }
}

/// Records Stripe's answer to the create: the PaymentIntent's id (a no-op if Stripe's webhook already moved the
/// payment on), or, when Stripe refused to create one at all, the payment's failure at submit.
pub async fn record_create(
    ctx: &AppContext,
    id: &SplitPaymentId,
    payment: &SplitPayment,
    answer: &CreateAnswer,
) -> Result<(), IntakeError> {
    let mut tx = ctx.pool.begin().await.map_err(StoreError::from)?;
    match (&answer.intent_id, &answer.outcome.failure) {
        (Some(pi), _) => {
            let patch = PaymentPatch {
                payment_intent_id: Some(pi.clone()),
                ..Default::default()
            };
            transition_payment(&mut tx, id, PaymentEvent::IntentCreated, &patch, &[]).await?;
        }
        // Stripe refused to create the PaymentIntent at all: the payment fails here ("Stripe error at submit").
        (None, Some((code, _, message))) => fail_at_submit(&mut tx, payment, code, message).await?,
        (None, None) => {
            return Err(StoreError::Invalid(format!(
                "payment {id}: Stripe's answer has neither an intent nor a failure"
            ))
            .into())
        }
    }
    tx.commit().await.map_err(StoreError::from)?;
    Ok(())
}

async fn fail_at_submit(tx: &mut Tx<'_>, payment: &SplitPayment, code: &str, message: &str) -> Result<(), StoreError> {
    let id = SplitPaymentId::parse(&payment.payment.id).map_err(|e| StoreError::Invalid(e.to_string()))?;
    let now = Utc::now();
    let event = announce::payment(
        EventType::PaymentFailed,
        &payment.payment,
        Some((code, message)),
        Some("submit"),
        now,
    );
    let patch = PaymentPatch {
        failure_code: Some(code.to_owned()),
        failure_message: Some(message.to_owned()),
        ..Default::default()
    };
    transition_payment(tx, &id, PaymentEvent::Failed, &patch, &[event]).await?;
    void_payment_parts(tx, payment, code, message, now).await
}
