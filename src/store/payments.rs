//! Split payments, their allocations, transfer attempts and per-recipient donations, and the transitions that
//! move them. Each transition function runs inside the caller's transaction: it locks the row, asks the domain's
//! state machine, writes the new state with a compare-and-set on the old one, and writes the outbox events the
//! change causes — all or nothing. A forbidden transition is logged, counted and returned as an error; the
//! caller's transaction must then be dropped, so it changes nothing.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::records::insert_outbox_events;
use super::{catalog::RecommendationSetRow, StoreError, Tx};
use crate::domain::fees::FeeSplit;
use crate::domain::ids::{transfer_idempotency_key, DonationId, SplitAllocationId, SplitPaymentId};
use crate::domain::money::Currency;
use crate::domain::plan::{PaymentMethodType, SplitPlan};
use crate::domain::state::{
    AllocationEvent, AllocationStatus, DonationEvent, DonationStatus, ForbiddenTransition, PaymentEvent, PaymentStatus,
    Transition,
};
use crate::events::OutboundEvent;

/// `failure_code` of an allocation parked because its retry window ended and a lookup that succeeded proved that
/// Stripe holds no transfer of its generation.
pub const RETRY_WINDOW_ELAPSED: &str = "retry_window_elapsed";
/// `failure_code` of an allocation parked because the fees left nothing to transfer (an operator refunds it).
pub const NET_AMOUNT_ZERO: &str = "net_amount_zero";

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SplitPaymentRow {
    pub id: String,
    pub recommendation_set_id: String,
    pub organisation_id: String,
    pub donor_id: Option<String>,
    #[sqlx(try_from = "String")]
    pub payment_method_type: PaymentMethodType,
    #[sqlx(try_from = "String")]
    pub currency: Currency,
    pub total_amount_cents: i64,
    pub donor_covers_fees: bool,
    pub processing_fee_cents: Option<i64>,
    pub platform_fee_cents: Option<i64>,
    pub fee_uncollected_cents: Option<i64>,
    #[sqlx(try_from = "String")]
    pub status: PaymentStatus,
    pub payment_intent_id: Option<String>,
    pub charge_id: Option<String>,
    pub transfer_group: String,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub succeeded_at: Option<DateTime<Utc>>,
    pub distribution_attempts: i32,
    pub distribution_next_attempt_at: Option<DateTime<Utc>>,
    pub confirm_payment_method: Option<String>,
    pub next_reconcile_at: Option<DateTime<Utc>>,
    pub distributed_at: Option<DateTime<Utc>>,
    /// When the transfer audit next compares this payment with Stripe (NULL once outside the audit window).
    pub audit_due_at: Option<DateTime<Utc>>,
    pub stripe_event_at: Option<DateTime<Utc>>,
    pub failed_attempts: i32,
    /// The charge of the last failed attempt recorded (each attempt is recorded and announced once).
    pub last_failed_charge_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SplitAllocationRow {
    pub id: String,
    pub split_payment_id: String,
    pub recommendation_allocation_id: String,
    pub recipient_org_account_link_id: String,
    pub position: i32,
    pub gross_amount_cents: i64,
    pub fee_share_cents: Option<i64>,
    pub net_amount_cents: Option<i64>,
    #[sqlx(try_from = "String")]
    pub status: AllocationStatus,
    pub generation: i32,
    pub idempotency_key: Option<String>,
    pub stripe_transfer_id: Option<String>,
    pub attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub parked_at: Option<DateTime<Utc>>,
    pub transferred_at: Option<DateTime<Utc>>,
    pub refunded_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Set while TRANSFERRING when the retry window ended without proof either way: shown to operators, retried.
    pub unresolved_at: Option<DateTime<Utc>>,
}

/// A split payment with its allocations in the set's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitPayment {
    pub payment: SplitPaymentRow,
    pub allocations: Vec<SplitAllocationRow>,
}

pub struct NewSplitPayment<'a> {
    pub id: SplitPaymentId,
    pub set: &'a RecommendationSetRow,
    pub plan: &'a SplitPlan,
    pub donor_id: Option<String>,
    pub payment_method_type: PaymentMethodType,
    pub donor_covers_fees: bool,
}

/// Writes a split payment (status CREATED, `transfer_group` = its id) and one allocation per plan line.
pub async fn create_split_payment(tx: &mut Tx<'_>, new: &NewSplitPayment<'_>) -> Result<SplitPayment, StoreError> {
    if new.plan.set_id() != new.set.id || new.plan.currency() != new.set.currency {
        return Err(StoreError::Invalid(
            "the plan was not made from this recommendation set".into(),
        ));
    }
    if !new.payment_method_type.supports(new.set.currency) {
        return Err(StoreError::Invalid(format!(
            "payment_method_type: {} does not support {}",
            new.payment_method_type, new.set.currency
        )));
    }
    sqlx::query(
        "INSERT INTO split_payments
            (id, recommendation_set_id, organisation_id, donor_id, payment_method_type, currency,
             total_amount_cents, donor_covers_fees, transfer_group)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $1)",
    )
    .bind(new.id.as_str())
    .bind(&new.set.id)
    .bind(&new.set.organisation_id)
    .bind(&new.donor_id)
    .bind(new.payment_method_type.as_str())
    .bind(new.set.currency.stripe_code())
    .bind(new.plan.total_cents())
    .bind(new.donor_covers_fees)
    .execute(&mut **tx)
    .await?;
    for line in new.plan.lines() {
        sqlx::query(
            "INSERT INTO split_allocations
                (id, split_payment_id, recommendation_allocation_id, recipient_org_account_link_id, position,
                 gross_amount_cents)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(SplitAllocationId::generate().as_str())
        .bind(new.id.as_str())
        .bind(&line.set_allocation_id)
        .bind(&line.recipient_org_account_link_id)
        .bind(line.position as i32)
        .bind(line.gross_cents)
        .execute(&mut **tx)
        .await?;
    }
    let created = get_split_payment(tx, &new.id).await?;
    let gross_sum: i64 = created.allocations.iter().map(|a| a.gross_amount_cents).sum();
    assert_eq!(
        gross_sum, created.payment.total_amount_cents,
        "allocations must add up to the charge"
    );
    Ok(created)
}

/// One payment by id (a primary-key probe), as [`get_split_payment`] and [`allocation_context`] read it.
pub const PAYMENT_BY_ID_SQL: &str = "SELECT * FROM split_payments WHERE id = $1";
/// A payment's allocations in order (`split_allocations_payment`); the reconcilers read each payment they work on
/// through [`get_split_payment`].
pub const ALLOCATIONS_OF_PAYMENT_SQL: &str =
    "SELECT * FROM split_allocations WHERE split_payment_id = $1 ORDER BY position";

pub async fn get_split_payment(conn: &mut PgConnection, id: &SplitPaymentId) -> Result<SplitPayment, StoreError> {
    let payment = sqlx::query_as::<_, SplitPaymentRow>(PAYMENT_BY_ID_SQL)
        .bind(id.as_str())
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "split payment",
            id: id.to_string(),
        })?;
    let allocations = sqlx::query_as::<_, SplitAllocationRow>(ALLOCATIONS_OF_PAYMENT_SQL)
        .bind(id.as_str())
        .fetch_all(&mut *conn)
        .await?;
    Ok(SplitPayment { payment, allocations })
}

/// One page of split payments, newest first (ids are time-ordered), optionally of one set and in one status:
/// at most `limit` ids after the cursor `starting_after` (exclusive).
pub async fn list_split_payment_ids(
    conn: &mut PgConnection,
    recommendation_set_id: Option<&str>,
    status: Option<PaymentStatus>,
    starting_after: Option<&SplitPaymentId>,
    limit: i64,
) -> Result<Vec<SplitPaymentId>, StoreError> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT id FROM split_payments
          WHERE ($1::text IS NULL OR recommendation_set_id = $1)
            AND ($2::text IS NULL OR status = $2)
            AND ($3::text IS NULL OR id < $3)
          ORDER BY id DESC
          LIMIT $4",
    )
    .bind(recommendation_set_id)
    .bind(status.map(|s| s.as_str()))
    .bind(starting_after.map(|id| id.as_str()))
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|(raw,)| SplitPaymentId::parse(&raw).map_err(|e| corrupt("split payment", &raw, e)))
        .collect()
}

/// The split payment a PaymentIntent belongs to, if any.
pub async fn find_split_payment_by_intent(
    conn: &mut PgConnection,
    payment_intent_id: &str,
) -> Result<Option<SplitPaymentId>, StoreError> {
    let id: Option<(String,)> = sqlx::query_as("SELECT id FROM split_payments WHERE payment_intent_id = $1")
        .bind(payment_intent_id)
        .fetch_optional(conn)
        .await?;
    id.map(|(raw,)| SplitPaymentId::parse(&raw).map_err(|e| corrupt("split payment", &raw, e)))
        .transpose()
}

pub async fn get_split_allocation(
    conn: &mut PgConnection,
    id: &SplitAllocationId,
) -> Result<SplitAllocationRow, StoreError> {
    sqlx::query_as::<_, SplitAllocationRow>("SELECT * FROM split_allocations WHERE id = $1")
        .bind(id.as_str())
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "split allocation",
            id: id.to_string(),
        })
}

fn corrupt(what: &'static str, id: &str, reason: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what,
        id: id.to_owned(),
        reason: reason.to_string(),
    }
}

fn forbidden(err: ForbiddenTransition, id: &str) -> StoreError {
    tracing::error!(
        machine = err.machine,
        from = err.from,
        event = err.event,
        id,
        "forbidden transition refused"
    );
    metrics::counter!("splitpay_forbidden_transitions_total", "machine" => err.machine, "event" => err.event)
        .increment(1);
    StoreError::Forbidden(err)
}

/// An allocation with what its events and its transfer need: the payment and the recipient's link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationContext {
    pub allocation: SplitAllocationRow,
    pub payment: SplitPaymentRow,
    pub recipient_organisation_id: String,
    pub recipient_org_name: String,
    pub destination_account_id: String,
}

pub async fn allocation_context(
    conn: &mut PgConnection,
    id: &SplitAllocationId,
) -> Result<AllocationContext, StoreError> {
    let allocation = get_split_allocation(conn, id).await?;
    let payment_id =
        SplitPaymentId::parse(&allocation.split_payment_id).map_err(|e| corrupt("split allocation", id.as_str(), e))?;
    let payment = sqlx::query_as::<_, SplitPaymentRow>(PAYMENT_BY_ID_SQL)
        .bind(payment_id.as_str())
        .fetch_one(&mut *conn)
        .await?;
    let (recipient_organisation_id, recipient_org_name, destination_account_id): (String, String, String) =
        sqlx::query_as(
            "SELECT recipient_organisation_id, recipient_org_name, stripe_connect_account_id
               FROM recipient_account_links WHERE id = $1",
        )
        .bind(&allocation.recipient_org_account_link_id)
        .fetch_one(&mut *conn)
        .await?;
    Ok(AllocationContext {
        allocation,
        payment,
        recipient_organisation_id,
        recipient_org_name,
        destination_account_id,
    })
}

/// Every donation row of a split payment, in allocation order.
pub async fn donations_for_payment(
    conn: &mut PgConnection,
    id: &SplitPaymentId,
) -> Result<Vec<DonationRow>, StoreError> {
    Ok(sqlx::query_as::<_, DonationRow>(
        "SELECT d.* FROM donations d JOIN split_allocations a ON a.id = d.split_allocation_id
          WHERE a.split_payment_id = $1 ORDER BY a.position",
    )
    .bind(id.as_str())
    .fetch_all(conn)
    .await?)
}

/// How a transfer attempt that will be retried with the same key failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryKind {
    /// Stripe throttled us (429, 409 key in flight): consumes nothing, the backoff does not grow.
    Throttled,
    /// A retryable failure or an unknown outcome: counted, the backoff grows.
    Failed,
}

/// A failed attempt at an allocation's transfer that will be retried with the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRetry<'a> {
    /// The generation the attempt was of: a row that moved on meanwhile is left alone (`LostRace`).
    pub generation: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub kind: RetryKind,
    /// The retry window ended without a proof either way: shown to operators, still retried.
    pub unresolved: bool,
    pub failure_code: Option<&'a str>,
    pub failure_message: &'a str,
}

/// Records a failed attempt at an allocation's transfer that will be retried with the same key: not a state
/// change (the allocation stays TRANSFERRING), so it does not go through the state machine.
pub async fn record_transfer_retry(
    conn: &mut PgConnection,
    id: &SplitAllocationId,
    retry: &TransferRetry<'_>,
) -> Result<i32, StoreError> {
    let (attempts,): (i32,) = sqlx::query_as(
        "UPDATE split_allocations
            SET attempts = attempts + CASE WHEN $3 THEN 1 ELSE 0 END,
                next_attempt_at = $4, failure_code = $5, failure_message = $6,
                unresolved_at = CASE WHEN $7 THEN coalesce(unresolved_at, now()) ELSE unresolved_at END,
                updated_at = now()
          WHERE id = $1 AND status = 'TRANSFERRING' AND generation = $2
         RETURNING attempts",
    )
    .bind(id.as_str())
    .bind(retry.generation)
    .bind(retry.kind == RetryKind::Failed)
    .bind(retry.next_attempt_at)
    .bind(retry.failure_code)
    .bind(retry.failure_message)
    .bind(retry.unresolved)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| StoreError::LostRace {
        what: "split allocation",
        id: id.to_string(),
        expected: format!("TRANSFERRING at generation {}", retry.generation),
    })?;
    Ok(attempts)
}

/// One transfer generation as it was frozen when it started: every attempt of the generation sends exactly this.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TransferAttemptRow {
    pub split_allocation_id: String,
    pub generation: i32,
    pub idempotency_key: String,
    pub destination_account_id: String,
    pub amount_cents: i64,
    pub currency: String,
    pub source_transaction: Option<String>,
    pub transfer_group: String,
    pub metadata: sqlx::types::Json<std::collections::BTreeMap<String, String>>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: Option<String>,
    pub stripe_transfer_id: Option<String>,
}

pub async fn get_transfer_attempt(
    conn: &mut PgConnection,
    id: &SplitAllocationId,
    generation: i32,
) -> Result<TransferAttemptRow, StoreError> {
    sqlx::query_as::<_, TransferAttemptRow>(
        "SELECT split_allocation_id, generation, idempotency_key, destination_account_id, amount_cents, currency,
                source_transaction, transfer_group, metadata, started_at, finished_at, outcome, stripe_transfer_id
           FROM transfer_attempts WHERE split_allocation_id = $1 AND generation = $2",
    )
    .bind(id.as_str())
    .bind(generation)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| StoreError::NotFound {
        what: "transfer attempt",
        id: format!("{id} generation {generation}"),
    })
}

/// Records what the transfer audit (or a transfer job) found at Stripe and could not match to an allocation's
/// current generation: logged, counted, kept for operators. Once per Stripe transfer.
pub async fn record_discrepancy(
    conn: &mut PgConnection,
    split_payment_id: &str,
    split_allocation_id: Option<&str>,
    stripe_transfer_id: &str,
    amount_cents: i64,
    kind: &str,
    detail: &str,
) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO transfer_discrepancies
            (split_payment_id, split_allocation_id, stripe_transfer_id, amount_cents, kind, detail)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT ON CONSTRAINT transfer_discrepancies_once DO NOTHING",
    )
    .bind(split_payment_id)
    .bind(split_allocation_id)
    .bind(stripe_transfer_id)
    .bind(amount_cents)
    .bind(kind)
    .bind(detail)
    .execute(conn)
    .await?;
    let new = inserted.rows_affected() == 1;
    if new {
        tracing::error!(
            split_payment_id,
            stripe_transfer_id,
            amount_cents,
            kind,
            detail,
            "transfer discrepancy found at Stripe"
        );
        metrics::counter!("splitpay_transfer_discrepancies_total", "kind" => kind.to_owned()).increment(1);
    }
    Ok(new)
}

/// What a failed or canceled payment does to its parts, in the caller's transaction: every allocation VOIDED, every
/// donation FAILED with Stripe's reason (`donation.failed`). Nothing was charged, so nothing is transferred.
pub async fn void_payment_parts(
    tx: &mut Tx<'_>,
    payment: &SplitPayment,
    failure_code: &str,
    failure_message: &str,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let id =
        SplitPaymentId::parse(&payment.payment.id).map_err(|e| corrupt("split payment", &payment.payment.id, e))?;
    for allocation in &payment.allocations {
        let aid =
            SplitAllocationId::parse(&allocation.id).map_err(|e| corrupt("split allocation", &allocation.id, e))?;
        transition_allocation(
            tx,
            &aid,
            AllocationEvent::PaymentVoided,
            &AllocationPatch::default(),
            &[],
        )
        .await?;
    }
    for donation in donations_for_payment(tx, &id).await? {
        let did = DonationId::parse(&donation.id).map_err(|e| corrupt("donation", &donation.id, e))?;
        let patch = DonationPatch {
            failure_code: Some(failure_code.to_owned()),
            failure_message: Some(failure_message.to_owned()),
            ..Default::default()
        };
        transition_donation(tx, &did, DonationEvent::Failed, &patch, |d| {
            crate::events::build::donation(crate::events::EventType::DonationFailed, d, at)
                .into_iter()
                .collect()
        })
        .await?;
    }
    Ok(())
}

/// Data that arrives with a payment event and is recorded with the transition (`None` keeps what is stored).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PaymentPatch {
    pub payment_intent_id: Option<String>,
    pub charge_id: Option<String>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    /// When Stripe created the event (or when splitpay read the PaymentIntent) that caused this change: a webhook
    /// older than the last one applied is stale (Stripe does not order them).
    pub stripe_event_at: Option<DateTime<Utc>>,
    /// With a failed attempt: its charge.
    pub failed_charge_id: Option<String>,
}

/// Moves a split payment by `event` and writes `events` to the outbox, in the caller's transaction. Returns
/// `Unchanged` (and writes nothing) for a repeat or a late event.
pub async fn transition_payment(
    tx: &mut Tx<'_>,
    id: &SplitPaymentId,
    event: PaymentEvent,
    patch: &PaymentPatch,
    events: &[OutboundEvent],
) -> Result<Transition<PaymentStatus>, StoreError> {
    let (raw,): (String,) = sqlx::query_as("SELECT status FROM split_payments WHERE id = $1 FOR UPDATE")
        .bind(id.as_str())
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "split payment",
            id: id.to_string(),
        })?;
    let from = PaymentStatus::try_from(raw).map_err(|e| corrupt("split payment", id.as_str(), e))?;
    let next = match from.apply(event).map_err(|e| forbidden(e, id.as_str()))? {
        Transition::Unchanged => return Ok(Transition::Unchanged),
        Transition::To(next) => next,
    };
    let updated = sqlx::query(
        "UPDATE split_payments
            SET status = $3,
                payment_intent_id = coalesce($4, payment_intent_id),
                charge_id = coalesce($5, charge_id),
                failure_code = coalesce($6, failure_code),
                failure_message = coalesce($7, failure_message),
                succeeded_at = CASE WHEN $3 = 'SUCCEEDED' THEN now() ELSE succeeded_at END,
                stripe_event_at = greatest(stripe_event_at, $8),
                failed_attempts = failed_attempts + CASE WHEN $9 THEN 1 ELSE 0 END,
                last_failed_charge_id = coalesce($10, last_failed_charge_id),
                updated_at = now()
          WHERE id = $1 AND status = $2",
    )
    .bind(id.as_str())
    .bind(from.as_str())
    .bind(next.as_str())
    .bind(&patch.payment_intent_id)
    .bind(&patch.charge_id)
    .bind(&patch.failure_code)
    .bind(&patch.failure_message)
    .bind(patch.stripe_event_at)
    .bind(event == PaymentEvent::AttemptFailed)
    .bind(&patch.failed_charge_id)
    .execute(&mut **tx)
    .await?;
    if updated.rows_affected() != 1 {
        return Err(StoreError::LostRace {
            what: "split payment",
            id: id.to_string(),
            expected: from.to_string(),
        });
    }
    insert_outbox_events(tx, events).await?;
    metrics::counter!("splitpay_split_payment_transitions_total", "to" => next.as_str()).increment(1);
    Ok(Transition::To(next))
}

/// Data recorded with an allocation transition (`None` keeps what is stored).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllocationPatch {
    pub stripe_transfer_id: Option<String>,
    /// With `TransferSucceeded`: the generation Stripe's transfer names in its metadata. A transfer of another
    /// generation than the allocation's current one is refused (`Invalid`): it is a discrepancy for an operator.
    pub transfer_generation: Option<i32>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// Moves a split allocation by `event` and writes `events` to the outbox, in the caller's transaction.
///
/// Entering TRANSFERRING (first attempt or an operator's retry) starts a new generation: the generation number,
/// its idempotency key and a `transfer_attempts` row (destination, amount, currency) are written here, so the
/// intent is committed before anyone calls Stripe. Leaving TRANSFERRING closes that attempt with its outcome.
pub async fn transition_allocation(
    tx: &mut Tx<'_>,
    id: &SplitAllocationId,
    event: AllocationEvent,
    patch: &AllocationPatch,
    events: &[OutboundEvent],
) -> Result<Transition<AllocationStatus>, StoreError> {
    let current = sqlx::query_as::<_, SplitAllocationRow>("SELECT * FROM split_allocations WHERE id = $1 FOR UPDATE")
        .bind(id.as_str())
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "split allocation",
            id: id.to_string(),
        })?;
    let from = current.status;
    let next = match from.apply(event).map_err(|e| forbidden(e, id.as_str()))? {
        Transition::Unchanged => return Ok(Transition::Unchanged),
        Transition::To(next) => next,
    };

    let mut generation = current.generation;
    let mut idempotency_key = current.idempotency_key.clone();
    match next {
        AllocationStatus::Transferring => {
            let net_cents = current.net_amount_cents.filter(|&n| n > 0).ok_or_else(|| {
                StoreError::Invalid(format!(
                    "split allocation '{id}' has no positive net amount to transfer"
                ))
            })?;
            generation += 1;
            let key = transfer_idempotency_key(id, generation);
            // The generation's parameters, frozen here: destination (the link's account now), amount, currency,
            // source transaction, transfer group and metadata. Every attempt of this generation sends exactly these;
            // a link changed later only affects a new generation.
            let inserted = sqlx::query(
                "INSERT INTO transfer_attempts
                    (split_allocation_id, generation, idempotency_key, destination_account_id, amount_cents, currency,
                     source_transaction, transfer_group, metadata)
                 SELECT a.id, $2, $3, l.stripe_connect_account_id, $4, p.currency, p.charge_id, p.transfer_group,
                        jsonb_build_object('split_payment_id', p.id, 'split_allocation_id', a.id,
                                           'generation', $2::text)
                   FROM split_allocations a
                   JOIN recipient_account_links l ON l.id = a.recipient_org_account_link_id
                   JOIN split_payments p ON p.id = a.split_payment_id
                  WHERE a.id = $1 AND p.charge_id IS NOT NULL",
            )
            .bind(id.as_str())
            .bind(generation)
            .bind(&key)
            .bind(net_cents)
            .execute(&mut **tx)
            .await?;
            if inserted.rows_affected() != 1 {
                return Err(StoreError::Invalid(format!(
                    "split allocation '{id}': its payment has no charge to transfer from"
                )));
            }
            idempotency_key = Some(key);
        }
        AllocationStatus::Transferred => {
            let transfer_id = patch.stripe_transfer_id.as_deref().ok_or_else(|| {
                StoreError::Invalid(format!("split allocation '{id}': a transfer needs its transfer id"))
            })?;
            if let Some(g) = patch.transfer_generation.filter(|&g| g != generation) {
                return Err(StoreError::Invalid(format!(
                    "split allocation '{id}' is at generation {generation}; transfer {transfer_id} is of generation {g}"
                )));
            }
            // From TRANSFERRING or from PARKED (Stripe's word wins): the generation's attempt ends TRANSFERRED.
            sqlx::query(
                "UPDATE transfer_attempts
                    SET finished_at = now(), outcome = 'TRANSFERRED', stripe_transfer_id = $3,
                        failure_code = NULL, failure_message = NULL
                  WHERE split_allocation_id = $1 AND generation = $2",
            )
            .bind(id.as_str())
            .bind(generation)
            .bind(transfer_id)
            .execute(&mut **tx)
            .await?;
        }
        AllocationStatus::Parked if from == AllocationStatus::Transferring => {
            let outcome = match patch.failure_code.as_deref() {
                Some(RETRY_WINDOW_ELAPSED) => "WINDOW_ELAPSED",
                _ => "TERMINAL",
            };
            sqlx::query(
                "UPDATE transfer_attempts
                    SET finished_at = now(), outcome = $3, failure_code = $4, failure_message = $5
                  WHERE split_allocation_id = $1 AND generation = $2",
            )
            .bind(id.as_str())
            .bind(generation)
            .bind(outcome)
            .bind(&patch.failure_code)
            .bind(&patch.failure_message)
            .execute(&mut **tx)
            .await?;
        }
        _ => {}
    }

    let updated = sqlx::query(
        "UPDATE split_allocations
            SET status = $3,
                generation = $4,
                idempotency_key = $5,
                stripe_transfer_id = coalesce($6, stripe_transfer_id),
                failure_code = coalesce($7, failure_code),
                failure_message = coalesce($8, failure_message),
                next_attempt_at = CASE WHEN $3 = 'TRANSFERRING' THEN coalesce($9, now()) ELSE NULL END,
                unresolved_at = NULL,
                attempts = CASE WHEN $3 = 'TRANSFERRING' AND status <> 'TRANSFERRING' THEN 0 ELSE attempts END,
                parked_at = CASE WHEN $3 = 'PARKED' THEN now() ELSE NULL END,
                transferred_at = CASE WHEN $3 = 'TRANSFERRED' THEN now() ELSE transferred_at END,
                refunded_at = CASE WHEN $3 = 'REFUNDED' THEN now() ELSE refunded_at END,
                updated_at = now()
          WHERE id = $1 AND status = $2",
    )
    .bind(id.as_str())
    .bind(from.as_str())
    .bind(next.as_str())
    .bind(generation)
    .bind(&idempotency_key)
    .bind(&patch.stripe_transfer_id)
    .bind(&patch.failure_code)
    .bind(&patch.failure_message)
    .bind(patch.next_attempt_at)
    .execute(&mut **tx)
    .await?;
    if updated.rows_affected() != 1 {
        return Err(StoreError::LostRace {
            what: "split allocation",
            id: id.to_string(),
            expected: from.to_string(),
        });
    }
    insert_outbox_events(tx, events).await?;
    metrics::counter!("splitpay_split_allocation_transitions_total", "to" => next.as_str()).increment(1);
    Ok(Transition::To(next))
}

/// Records the fee split of a succeeded payment on its allocations (fee share and net amount) and the fees on the
/// payment, in the caller's transaction. Writing the same split again is a no-op; a different one is refused.
pub async fn write_fee_split(
    tx: &mut Tx<'_>,
    id: &SplitPaymentId,
    processing_fee_cents: i64,
    platform_fee_cents: i64,
    split: &FeeSplit,
) -> Result<(), StoreError> {
    let payment = get_split_payment(tx, id).await?;
    if payment.allocations.len() != split.shares.len() {
        return Err(StoreError::Invalid(format!(
            "split payment '{id}' has {} allocations but the fee split has {}",
            payment.allocations.len(),
            split.shares.len()
        )));
    }
    if split.fee_cents_total + split.fee_uncollected_cents != processing_fee_cents + platform_fee_cents {
        return Err(StoreError::Invalid(
            "the fee split does not account for the fees given".into(),
        ));
    }
    for (allocation, share) in payment.allocations.iter().zip(&split.shares) {
        if allocation.gross_amount_cents != share.gross_cents {
            return Err(StoreError::Invalid(format!(
                "split allocation '{}' has gross {} but the fee split has {}",
                allocation.id, allocation.gross_amount_cents, share.gross_cents
            )));
        }
        match (allocation.fee_share_cents, allocation.net_amount_cents) {
            (None, None) => {}
            (Some(fee), Some(net)) if fee == share.fee_share_cents && net == share.net_cents => continue,
            _ => {
                return Err(StoreError::Invalid(format!(
                    "split allocation '{}' already has a different fee split",
                    allocation.id
                )))
            }
        }
        sqlx::query(
            "UPDATE split_allocations SET fee_share_cents = $2, net_amount_cents = $3, updated_at = now()
              WHERE id = $1 AND fee_share_cents IS NULL",
        )
        .bind(&allocation.id)
        .bind(share.fee_share_cents)
        .bind(share.net_cents)
        .execute(&mut **tx)
        .await?;
    }
    sqlx::query(
        "UPDATE split_payments
            SET processing_fee_cents = $2, platform_fee_cents = $3, fee_uncollected_cents = $4, updated_at = now()
          WHERE id = $1",
    )
    .bind(id.as_str())
    .bind(processing_fee_cents)
    .bind(platform_fee_cents)
    .bind(split.fee_uncollected_cents)
    .execute(&mut **tx)
    .await?;
    // The second half of the conservation pair (the first is in `split_fees`): what is stored adds up.
    let (net_sum, fee_sum, total): (i64, i64, i64) = sqlx::query_as(
        "SELECT sum(a.net_amount_cents)::bigint, sum(a.fee_share_cents)::bigint, p.total_amount_cents
           FROM split_allocations a JOIN split_payments p ON p.id = a.split_payment_id
          WHERE p.id = $1 GROUP BY p.total_amount_cents",
    )
    .bind(id.as_str())
    .fetch_one(&mut **tx)
    .await?;
    assert_eq!(
        net_sum + fee_sum,
        total,
        "stored fee split must conserve the charge of {id}"
    );
    Ok(())
}

/// Where a split payment's money is, in minor units, each term read from its own record (never derived from
/// another term, so the check can fail): for a succeeded payment,
/// `charged = transferred + parked + refunded + in_flight + fees_kept`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MoneyReport {
    pub charged_cents: i64,
    /// The amounts of the transfers recorded on TRANSFERRED allocations' successful generations.
    pub transferred_cents: i64,
    /// Net shares of PARKED allocations (still on the platform's balance).
    pub parked_cents: i64,
    /// Net shares of REFUNDED allocations.
    pub refunded_cents: i64,
    /// PENDING or TRANSFERRING: net once the fee split is written, gross before.
    pub in_flight_cents: i64,
    /// The fees on the payment row: Stripe's processing fee plus the platform fee, less what could not be
    /// collected.
    pub fees_kept_cents: i64,
    /// VOIDED allocations (payment failed): nothing was charged for them.
    pub voided_cents: i64,
}

impl MoneyReport {
    pub fn is_conserved(&self) -> bool {
        self.charged_cents
            == self.transferred_cents
                + self.parked_cents
                + self.refunded_cents
                + self.in_flight_cents
                + self.fees_kept_cents
    }
}

pub async fn money_report(conn: &mut PgConnection, id: &SplitPaymentId) -> Result<MoneyReport, StoreError> {
    let payment = get_split_payment(conn, id).await?;
    // Only a succeeded payment took the donor's money; before that (or after a failure) nothing is the platform's.
    let charged = payment.payment.status == PaymentStatus::Succeeded;
    let p = &payment.payment;
    let mut report = MoneyReport {
        charged_cents: if charged { p.total_amount_cents } else { 0 },
        fees_kept_cents: if charged {
            p.processing_fee_cents.unwrap_or(0) + p.platform_fee_cents.unwrap_or(0)
                - p.fee_uncollected_cents.unwrap_or(0)
        } else {
            0
        },
        ..MoneyReport::default()
    };
    let transferred: Vec<(String, i64)> = sqlx::query_as(
        "SELECT t.split_allocation_id, t.amount_cents FROM transfer_attempts t
           JOIN split_allocations a ON a.id = t.split_allocation_id
          WHERE a.split_payment_id = $1 AND t.outcome = 'TRANSFERRED'",
    )
    .bind(id.as_str())
    .fetch_all(&mut *conn)
    .await?;
    for a in &payment.allocations {
        if a.status == AllocationStatus::Voided {
            report.voided_cents += a.gross_amount_cents;
        }
        if !charged {
            continue;
        }
        let net = a.net_amount_cents;
        match a.status {
            AllocationStatus::Transferred => {
                report.transferred_cents += transferred
                    .iter()
                    .filter(|(aid, _)| *aid == a.id)
                    .map(|(_, cents)| cents)
                    .sum::<i64>()
            }
            AllocationStatus::Parked => report.parked_cents += net.unwrap_or(0),
            AllocationStatus::Refunded => report.refunded_cents += net.unwrap_or(0),
            AllocationStatus::Pending | AllocationStatus::Transferring => {
                report.in_flight_cents += net.unwrap_or(a.gross_amount_cents)
            }
            AllocationStatus::Voided => {}
        }
    }
    Ok(report)
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DonationRow {
    pub id: String,
    pub organisation_id: String,
    pub split_allocation_id: String,
    pub donor_id: Option<String>,
    pub source: String,
    #[sqlx(try_from = "String")]
    pub status: DonationStatus,
    pub amount_cents: i64,
    pub refunded_amount_cents: i64,
    #[sqlx(try_from = "String")]
    pub currency: Currency,
    pub donation_date: DateTime<Utc>,
    pub received_date: Option<DateTime<Utc>>,
    pub payment_method: Option<String>,
    pub external_id: Option<String>,
    pub tracking_code: Option<String>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
}

/// Writes the PENDING donation row a split allocation stands for, on the recipient organisation (source
/// SPLIT_GATEWAY, gross amount, the PaymentIntent as `external_id`), with `events` (e.g. `donation.created`).
/// A second call for the same allocation returns the existing row and writes nothing.
pub async fn create_donation_for_allocation(
    tx: &mut Tx<'_>,
    allocation_id: &SplitAllocationId,
    donation_date: DateTime<Utc>,
    events: impl FnOnce(&DonationRow) -> Vec<OutboundEvent>,
) -> Result<DonationRow, StoreError> {
    let inserted = sqlx::query_as::<_, DonationRow>(
        "INSERT INTO donations
            (id, organisation_id, split_allocation_id, donor_id, amount_cents, currency, donation_date,
             payment_method, external_id)
         SELECT $1, l.recipient_organisation_id, a.id, p.donor_id, a.gross_amount_cents, p.currency, $3,
                p.payment_method_type, p.payment_intent_id
           FROM split_allocations a
           JOIN split_payments p ON p.id = a.split_payment_id
           JOIN recipient_account_links l ON l.id = a.recipient_org_account_link_id
          WHERE a.id = $2
         ON CONFLICT ON CONSTRAINT donations_one_per_allocation DO NOTHING
         RETURNING *",
    )
    .bind(DonationId::generate().as_str())
    .bind(allocation_id.as_str())
    .bind(donation_date)
    .fetch_optional(&mut **tx)
    .await?;
    match inserted {
        Some(row) => {
            insert_outbox_events(tx, &events(&row)).await?;
            Ok(row)
        }
        None => donation_for_allocation(tx, allocation_id)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                what: "split allocation",
                id: allocation_id.to_string(),
            }),
    }
}

pub async fn donation_for_allocation(
    conn: &mut PgConnection,
    allocation_id: &SplitAllocationId,
) -> Result<Option<DonationRow>, StoreError> {
    Ok(
        sqlx::query_as::<_, DonationRow>("SELECT * FROM donations WHERE split_allocation_id = $1")
            .bind(allocation_id.as_str())
            .fetch_optional(conn)
            .await?,
    )
}

/// Data recorded with a donation transition (`None` keeps what is stored).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DonationPatch {
    pub received_date: Option<DateTime<Utc>>,
    pub refunded_amount_cents: Option<i64>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
}

/// Moves a donation by `event`; `events` is called with the updated row to build the outbox events, so their
/// payloads show the new state.
pub async fn transition_donation(
    tx: &mut Tx<'_>,
    id: &DonationId,
    event: DonationEvent,
    patch: &DonationPatch,
    events: impl FnOnce(&DonationRow) -> Vec<OutboundEvent>,
) -> Result<Transition<DonationStatus>, StoreError> {
    let (raw,): (String,) = sqlx::query_as("SELECT status FROM donations WHERE id = $1 FOR UPDATE")
        .bind(id.as_str())
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "donation",
            id: id.to_string(),
        })?;
    let from = DonationStatus::try_from(raw).map_err(|e| corrupt("donation", id.as_str(), e))?;
    let next = match from.apply(event).map_err(|e| forbidden(e, id.as_str()))? {
        Transition::Unchanged => return Ok(Transition::Unchanged),
        Transition::To(next) => next,
    };
    let row = sqlx::query_as::<_, DonationRow>(
        "UPDATE donations
            SET status = $3,
                received_date = coalesce($4, received_date),
                refunded_amount_cents = CASE WHEN $3 = 'REFUNDED' THEN amount_cents
                                             ELSE coalesce($5, refunded_amount_cents) END,
                deleted_at = CASE WHEN $3 = 'REFUNDED' THEN now() ELSE deleted_at END,
                failure_code = coalesce($6, failure_code),
                failure_message = coalesce($7, failure_message),
                updated_at = now()
          WHERE id = $1 AND status = $2
         RETURNING *",
    )
    .bind(id.as_str())
    .bind(from.as_str())
    .bind(next.as_str())
    .bind(patch.received_date)
    .bind(patch.refunded_amount_cents)
    .bind(&patch.failure_code)
    .bind(&patch.failure_message)
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| StoreError::LostRace {
        what: "donation",
        id: id.to_string(),
        expected: from.to_string(),
    })?;
    insert_outbox_events(tx, &events(&row)).await?;
    Ok(Transition::To(next))
}
