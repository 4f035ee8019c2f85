//! Split payments: creation, reads, the payment's transitions (with the voiding of its parts when it fails), and
//! the fee split recorded when it succeeds. Each transition function runs inside the caller's transaction: it locks
//! the row, asks the domain's state machine, writes the new state with a compare-and-set on the old one, and writes
//! the outbox events the change causes — all or nothing. A forbidden transition is logged, counted and returned as
//! an error; the caller's transaction must then be dropped, so it changes nothing.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::allocations::{transition_allocation, AllocationPatch, SplitAllocationRow};
use super::donations::{donations_for_payment, transition_donation, DonationPatch};
use super::records::insert_outbox_events;
use super::{catalog::RecommendationSetRow, corrupt, forbidden, StoreError, Tx};
use crate::domain::fees::FeeSplit;
use crate::domain::ids::{DonationId, SplitAllocationId, SplitPaymentId};
use crate::domain::money::Currency;
use crate::domain::plan::{PaymentMethodType, SplitPlan};
use crate::domain::state::{AllocationEvent, DonationEvent, PaymentEvent, PaymentStatus, Transition};
use crate::events::OutboundEvent;

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
/// One payment's row alone, without its allocations.
pub async fn get_split_payment_row(
    conn: &mut PgConnection,
    id: &SplitPaymentId,
) -> Result<SplitPaymentRow, StoreError> {
    sqlx::query_as::<_, SplitPaymentRow>(PAYMENT_BY_ID_SQL)
        .bind(id.as_str())
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "split payment",
            id: id.to_string(),
        })
}

/// A payment's allocations in order (found by `split_allocations_one_per_set_allocation`, then sorted); the reconcilers read each payment they work on
/// through [`get_split_payment`].
pub const ALLOCATIONS_OF_PAYMENT_SQL: &str =
    "SELECT * FROM split_allocations WHERE split_payment_id = $1 ORDER BY position";

pub async fn get_split_payment(conn: &mut PgConnection, id: &SplitPaymentId) -> Result<SplitPayment, StoreError> {
    let payment = get_split_payment_row(conn, id).await?;
    let allocations = allocations_of_payment(conn, id).await?;
    Ok(SplitPayment { payment, allocations })
}

/// A payment's allocations, in position order (without the payment's row).
async fn allocations_of_payment(
    conn: &mut PgConnection,
    id: &SplitPaymentId,
) -> Result<Vec<SplitAllocationRow>, StoreError> {
    Ok(sqlx::query_as::<_, SplitAllocationRow>(ALLOCATIONS_OF_PAYMENT_SQL)
        .bind(id.as_str())
        .fetch_all(conn)
        .await?)
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
            super::announce::donation(crate::events::EventType::DonationFailed, d, at)
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

/// Records the fee split of a succeeded payment on its allocations (fee share and net amount) and the fees on the
/// payment, in the caller's transaction. Writing the same split again is a no-op; a different one is refused.
/// `mark_distributed`: the same `UPDATE` also marks the payment distributed (`distributed_at`, and its audit due in
/// an hour), for a distribution that starts every share in this transaction (one payment `UPDATE` less).
pub async fn write_fee_split(
    tx: &mut Tx<'_>,
    id: &SplitPaymentId,
    charge_id: Option<&str>,
    processing_fee_cents: i64,
    platform_fee_cents: i64,
    split: &FeeSplit,
    mark_distributed: bool,
) -> Result<(), StoreError> {
    // Only the allocations are compared with the split: the payment's row is not read.
    let allocations = allocations_of_payment(tx, id).await?;
    if allocations.len() != split.shares.len() {
        return Err(StoreError::Invalid(format!(
            "split payment '{id}' has {} allocations but the fee split has {}",
            allocations.len(),
            split.shares.len()
        )));
    }
    if split.fee_cents_total + split.fee_uncollected_cents != processing_fee_cents + platform_fee_cents {
        return Err(StoreError::Invalid(
            "the fee split does not account for the fees given".into(),
        ));
    }
    // The shares still without a split, written by one statement (ids, fee shares, nets as arrays).
    let mut ids = Vec::new();
    let mut fee_shares_cents = Vec::new();
    let mut nets_cents = Vec::new();
    for (allocation, share) in allocations.iter().zip(&split.shares) {
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
        ids.push(allocation.id.as_str());
        fee_shares_cents.push(share.fee_share_cents);
        nets_cents.push(share.net_cents);
    }
    sqlx::query(
        "UPDATE split_allocations a
            SET fee_share_cents = s.fee_share_cents, net_amount_cents = s.net_cents, updated_at = now()
           FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS s(id, fee_share_cents, net_cents)
          WHERE a.id = s.id AND a.fee_share_cents IS NULL",
    )
    .bind(&ids)
    .bind(&fee_shares_cents)
    .bind(&nets_cents)
    .execute(&mut **tx)
    .await?;
    // The charge the fee was read from (when given), with the fees: the first generation's transfers name it as
    // their source.
    sqlx::query(
        "UPDATE split_payments
            SET processing_fee_cents = $2, platform_fee_cents = $3, fee_uncollected_cents = $4,
                charge_id = coalesce(charge_id, $5), distribution_next_attempt_at = NULL, updated_at = now(),
                distributed_at = CASE WHEN $6 THEN coalesce(distributed_at, now()) ELSE distributed_at END,
                audit_due_at = CASE WHEN $6 THEN coalesce(audit_due_at, now() + interval '1 hour')
                                    ELSE audit_due_at END
          WHERE id = $1",
    )
    .bind(id.as_str())
    .bind(processing_fee_cents)
    .bind(platform_fee_cents)
    .bind(split.fee_uncollected_cents)
    .bind(charge_id)
    .bind(mark_distributed)
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
