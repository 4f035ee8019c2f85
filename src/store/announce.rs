//! Outbound events built from stored rows, so every emitter fills the seed's fields the same way. It lives in the
//! store (which depends on `events`, never the reverse): the event types know nothing of rows.

use chrono::{DateTime, Utc};

use super::allocations::AllocationContext;
use super::donations::DonationRow;
use super::payments::SplitPaymentRow;
use crate::events::{seed_timestamp, DistributionData, DonationData, EventType, OutboundEvent, PaymentData};

/// `recommendation_set.payment_succeeded|payment_failed` for the distributing organisation. A failure names its
/// attempt (`attempt_ref`), so each failed attempt is announced once.
pub fn payment(
    event_type: EventType,
    p: &SplitPaymentRow,
    failure: Option<(&str, &str)>,
    attempt_ref: Option<&str>,
    at: DateTime<Utc>,
) -> OutboundEvent {
    OutboundEvent::payment(
        event_type,
        &p.organisation_id,
        at,
        PaymentData {
            split_payment_id: p.id.clone(),
            recommendation_set_id: Some(p.recommendation_set_id.clone()),
            donor_id: p.donor_id.clone(),
            total_amount_cents: p.total_amount_cents,
            currency: p.currency.iso_code(),
            payment_method_type: p.payment_method_type.to_string(),
            donation_date: seed_timestamp(p.created_at),
            failure_code: failure.map(|(code, _)| code.to_owned()),
            failure_message: failure.map(|(_, message)| message.to_owned()),
        },
        attempt_ref,
    )
}

/// Later transfer generations (an operator's retry, a won dispute's re-send) announce their own outcome: the
/// dedup key of an event about generation 2 or later names it, so it is not taken for generation 1's event and
/// silently dropped. Generation 1 keeps the plain key ("once per allocation"), as every event before it did.
pub fn of_generation(mut event: OutboundEvent, generation: i32) -> OutboundEvent {
    if generation >= 2 {
        event.dedup_key = format!("{}:g{generation}", event.dedup_key);
    }
    event
}

/// `recommendation_set.distribution_succeeded|distribution_failed` for the distributing organisation, once per
/// allocation and transfer generation ([`of_generation`]). `amount_cents` is the net amount transferred (or that
/// could not be transferred).
pub fn distribution(
    event_type: EventType,
    c: &AllocationContext,
    transfer_id: Option<&str>,
    failure: Option<(&str, &str)>,
    at: DateTime<Utc>,
) -> OutboundEvent {
    let event = OutboundEvent::distribution(
        event_type,
        &c.payment.organisation_id,
        at,
        DistributionData {
            split_allocation_id: c.allocation.id.clone(),
            split_payment_id: c.payment.id.clone(),
            recommendation_set_id: Some(c.payment.recommendation_set_id.clone()),
            donor_id: c.payment.donor_id.clone(),
            recipient_organisation_id: c.recipient_organisation_id.clone(),
            recipient_organisation_name: c.recipient_org_name.clone(),
            amount_cents: c.allocation.net_amount_cents.unwrap_or(0),
            currency: c.payment.currency.iso_code(),
            stripe_transfer_id: transfer_id.map(str::to_owned),
            failure_code: failure.map(|(code, _)| code.to_owned()),
            failure_message: failure.map(|(_, message)| message.to_owned()),
        },
    );
    of_generation(event, c.allocation.generation)
}

/// `donation.refunded` for one refund of a donation (once per refund id and donation), with the donation as it is
/// after the refund. `None` when the donation has no donor (see [`donation`]).
pub fn donation_refunded(d: &DonationRow, refund_ref: &str, at: DateTime<Utc>) -> Option<OutboundEvent> {
    let mut event = donation(EventType::DonationRefunded, d, at)?;
    event.dedup_key = format!("{}:{}:{refund_ref}", EventType::DonationRefunded.as_str(), d.id);
    Some(event)
}

/// `donation.refund_reversed` when a won dispute gives back what its withdrawal refunded (once per dispute and
/// donation), with the donation as it is after: `refunded_amount_cents` lowered, `deleted_at` cleared.
pub fn donation_refund_reversed(d: &DonationRow, dispute_ref: &str, at: DateTime<Utc>) -> Option<OutboundEvent> {
    let mut event = donation(EventType::DonationRefundReversed, d, at)?;
    event.dedup_key = format!("{}:{}:{dispute_ref}", EventType::DonationRefundReversed.as_str(), d.id);
    Some(event)
}

/// A `donation.*` event on the recipient organisation. `None` when the donation has no donor: the seed's
/// `Donation.donor_id` is required, so such a donation cannot be announced faithfully.
pub fn donation(event_type: EventType, d: &DonationRow, at: DateTime<Utc>) -> Option<OutboundEvent> {
    let donor_id = d.donor_id.clone()?;
    Some(OutboundEvent::donation(
        event_type,
        &d.organisation_id,
        at,
        DonationData {
            id: d.id.clone(),
            donor_id,
            amount_cents: d.amount_cents,
            refunded_amount_cents: d.refunded_amount_cents,
            currency: d.currency.iso_code(),
            donation_date: seed_timestamp(d.donation_date),
            source: d.source.clone(),
            status: d.status.to_string(),
            external_id: d.external_id.clone(),
            payment_method: d.payment_method.clone(),
            tracking_code: d.tracking_code.clone(),
            deleted_at: d.deleted_at.map(seed_timestamp),
            failure_code: d.failure_code.clone(),
            failure_message: d.failure_message.clone(),
        },
        None,
    ))
}
