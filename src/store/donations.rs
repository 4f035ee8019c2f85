//! Donations: the per-recipient record each split allocation stands for on the recipient organisation, and its
//! transitions (the contract's `donation.*` events are written with them).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::records::insert_outbox_events;
use super::{corrupt, forbidden, StoreError, Tx};
use crate::domain::ids::{DonationId, SplitAllocationId, SplitPaymentId};
use crate::domain::money::Currency;
use crate::domain::state::{DonationEvent, DonationStatus, Transition};
use crate::events::OutboundEvent;

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
    donation_of(
        conn,
        "SELECT * FROM donations WHERE split_allocation_id = $1",
        allocation_id,
    )
    .await
}

/// As [`donation_for_allocation`], locking the row for the caller's transaction (then
/// [`transition_locked_donation`]).
pub async fn donation_for_allocation_for_update(
    conn: &mut PgConnection,
    allocation_id: &SplitAllocationId,
) -> Result<Option<DonationRow>, StoreError> {
    donation_of(
        conn,
        "SELECT * FROM donations WHERE split_allocation_id = $1 FOR UPDATE",
        allocation_id,
    )
    .await
}

async fn donation_of(
    conn: &mut PgConnection,
    sql: &'static str,
    allocation_id: &SplitAllocationId,
) -> Result<Option<DonationRow>, StoreError> {
    Ok(sqlx::query_as::<_, DonationRow>(sql)
        .bind(allocation_id.as_str())
        .fetch_optional(conn)
        .await?)
}

/// Adds a refunded part to a donation that stays where it is (a partial refund changes the amount, not the status),
/// never beyond the donation's amount. Returns the updated row for its `donation.refunded` event.
pub async fn add_refunded_amount(
    conn: &mut PgConnection,
    id: &DonationId,
    part_cents: i64,
) -> Result<DonationRow, StoreError> {
    assert!(part_cents > 0, "a refunded part is positive");
    sqlx::query_as::<_, DonationRow>(
        "UPDATE donations SET refunded_amount_cents = least(amount_cents, refunded_amount_cents + $2), updated_at = now()
          WHERE id = $1 RETURNING *",
    )
    .bind(id.as_str())
    .bind(part_cents)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| StoreError::NotFound {
        what: "donation",
        id: id.to_string(),
    })
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
    transition_donation_from(tx, id, from, event, patch, events).await
}

/// [`transition_donation`] of a donation this transaction has already locked and read (`current`, read
/// `FOR UPDATE` in this same transaction): one statement less when a transfer is recorded. Should `current` be stale
/// all the same, the `UPDATE`'s status guard refuses it (`LostRace`).
pub async fn transition_locked_donation(
    tx: &mut Tx<'_>,
    current: &DonationRow,
    event: DonationEvent,
    patch: &DonationPatch,
    events: impl FnOnce(&DonationRow) -> Vec<OutboundEvent>,
) -> Result<Transition<DonationStatus>, StoreError> {
    let id = DonationId::parse(&current.id).map_err(|e| StoreError::Invalid(e.to_string()))?;
    transition_donation_from(tx, &id, current.status, event, patch, events).await
}

async fn transition_donation_from(
    tx: &mut Tx<'_>,
    id: &DonationId,
    from: DonationStatus,
    event: DonationEvent,
    patch: &DonationPatch,
    events: impl FnOnce(&DonationRow) -> Vec<OutboundEvent>,
) -> Result<Transition<DonationStatus>, StoreError> {
    let next = match from.apply(event).map_err(|e| forbidden(e, id.as_str()))? {
        Transition::Unchanged => return Ok(Transition::Unchanged),
        Transition::To(next) => next,
    };
    let row = sqlx::query_as::<_, DonationRow>(
        "UPDATE donations
            SET status = $3,
                received_date = coalesce($4, received_date),
                refunded_amount_cents = coalesce($5, CASE WHEN $3 = 'REFUNDED' THEN amount_cents
                                                          ELSE refunded_amount_cents END),
                deleted_at = CASE WHEN $3 = 'REFUNDED' THEN now() WHEN $2 = 'REFUNDED' THEN NULL ELSE deleted_at END,
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
