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

/// `failure_code` recorded when an allocation is parked because its retries ran out.
pub const RETRIES_EXHAUSTED: &str = "retries_exhausted";

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

pub async fn get_split_payment(conn: &mut PgConnection, id: &SplitPaymentId) -> Result<SplitPayment, StoreError> {
    let payment = sqlx::query_as::<_, SplitPaymentRow>("SELECT * FROM split_payments WHERE id = $1")
        .bind(id.as_str())
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "split payment",
            id: id.to_string(),
        })?;
    let allocations = sqlx::query_as::<_, SplitAllocationRow>(
        "SELECT * FROM split_allocations WHERE split_payment_id = $1 ORDER BY position",
    )
    .bind(id.as_str())
    .fetch_all(&mut *conn)
    .await?;
    Ok(SplitPayment { payment, allocations })
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
    let payment = sqlx::query_as::<_, SplitPaymentRow>("SELECT * FROM split_payments WHERE id = $1")
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

/// Records a failed attempt at an allocation's transfer that will be retried with the same key: not a state
/// change (the allocation stays TRANSFERRING), so it does not go through the state machine.
pub async fn record_transfer_retry(
    conn: &mut PgConnection,
    id: &SplitAllocationId,
    next_attempt_at: DateTime<Utc>,
    failure_code: Option<&str>,
    failure_message: &str,
) -> Result<i32, StoreError> {
    let (attempts,): (i32,) = sqlx::query_as(
        "UPDATE split_allocations
            SET attempts = attempts + 1, next_attempt_at = $2, failure_code = $3, failure_message = $4, updated_at = now()
          WHERE id = $1 AND status = 'TRANSFERRING'
         RETURNING attempts",
    )
    .bind(id.as_str())
    .bind(next_attempt_at)
    .bind(failure_code)
    .bind(failure_message)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| StoreError::LostRace { what: "split allocation", id: id.to_string(), expected: "TRANSFERRING".into() })?;
    Ok(attempts)
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
    Ok(Transition::To(next))
}

/// Data recorded with an allocation transition (`None` keeps what is stored).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllocationPatch {
    pub stripe_transfer_id: Option<String>,
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
            sqlx::query(
                "INSERT INTO transfer_attempts
                    (split_allocation_id, generation, idempotency_key, destination_account_id, amount_cents, currency)
                 SELECT a.id, $2, $3, l.stripe_connect_account_id, $4, p.currency
                   FROM split_allocations a
                   JOIN recipient_account_links l ON l.id = a.recipient_org_account_link_id
                   JOIN split_payments p ON p.id = a.split_payment_id
                  WHERE a.id = $1",
            )
            .bind(id.as_str())
            .bind(generation)
            .bind(&key)
            .bind(net_cents)
            .execute(&mut **tx)
            .await?;
            idempotency_key = Some(key);
        }
        AllocationStatus::Transferred | AllocationStatus::Parked => {
            let outcome = match (next, patch.failure_code.as_deref()) {
                (AllocationStatus::Transferred, _) => "TRANSFERRED",
                (_, Some(RETRIES_EXHAUSTED)) => "RETRIES_EXHAUSTED",
                _ => "TERMINAL",
            };
            if next == AllocationStatus::Transferred && patch.stripe_transfer_id.is_none() {
                return Err(StoreError::Invalid(format!(
                    "split allocation '{id}': a transfer needs its transfer id"
                )));
            }
            sqlx::query(
                "UPDATE transfer_attempts
                    SET finished_at = now(), outcome = $3, stripe_transfer_id = $4,
                        failure_code = $5, failure_message = $6
                  WHERE split_allocation_id = $1 AND generation = $2",
            )
            .bind(id.as_str())
            .bind(generation)
            .bind(outcome)
            .bind(&patch.stripe_transfer_id)
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
                next_attempt_at = $9,
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

/// Where a split payment's money is, by allocation status, in minor units. For a succeeded payment:
/// `charged = transferred + parked + refunded + in_flight + fees_kept` (zero-net shares are all fee).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MoneyReport {
    pub charged_cents: i64,
    pub transferred_cents: i64,
    pub parked_cents: i64,
    pub refunded_cents: i64,
    /// PENDING or TRANSFERRING: not yet settled either way.
    pub in_flight_cents: i64,
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
    let mut report = MoneyReport {
        charged_cents: if charged { payment.payment.total_amount_cents } else { 0 },
        ..MoneyReport::default()
    };
    for a in &payment.allocations {
        if a.status == AllocationStatus::Voided {
            report.voided_cents += a.gross_amount_cents;
        }
        if !charged {
            continue;
        }
        let fee = a.fee_share_cents.unwrap_or(0);
        let net = a.gross_amount_cents - fee;
        match a.status {
            AllocationStatus::Transferred => report.transferred_cents += net,
            AllocationStatus::Parked => report.parked_cents += net,
            AllocationStatus::Refunded => report.refunded_cents += net,
            AllocationStatus::Pending | AllocationStatus::Transferring => report.in_flight_cents += net,
            AllocationStatus::ZeroNet | AllocationStatus::Voided => {}
        }
        report.fees_kept_cents += fee;
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
