//! Outbound events: the typed payloads of the seed's webhook events that splitpay emits, and the envelope
//! (`type`, `occurred_at`, `organisation_id`, `data`) they travel in. Field names and nullability follow the seed's
//! webhook schemas exactly; a test checks each payload against the seed's required fields.
//!
//! Every event has a dedup key that makes "fires once per split payment / per allocation" a database rule
//! (`outbox_events.dedup_key` is unique). Each event is delivered to its organisation's webhook endpoints by
//! `jobs::deliver`, signed per Standard Webhooks ([`signing`]); the outbox is the record.

pub mod signing;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

/// The seed's event names that splitpay emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    PaymentSucceeded,
    PaymentFailed,
    DistributionSucceeded,
    DistributionFailed,
    DonationCreated,
    DonationProcessing,
    DonationSucceeded,
    DonationFailed,
    DonationRefunded,
    /// A dispute was won: the refund it stood for is given back (`charge.dispute.funds_reinstated`).
    DonationRefundReversed,
}

impl EventType {
    pub const ALL: [EventType; 10] = [
        EventType::PaymentSucceeded,
        EventType::PaymentFailed,
        EventType::DistributionSucceeded,
        EventType::DistributionFailed,
        EventType::DonationCreated,
        EventType::DonationProcessing,
        EventType::DonationSucceeded,
        EventType::DonationFailed,
        EventType::DonationRefunded,
        EventType::DonationRefundReversed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::PaymentSucceeded => "recommendation_set.payment_succeeded",
            EventType::PaymentFailed => "recommendation_set.payment_failed",
            EventType::DistributionSucceeded => "recommendation_set.distribution_succeeded",
            EventType::DistributionFailed => "recommendation_set.distribution_failed",
            EventType::DonationCreated => "donation.created",
            EventType::DonationProcessing => "donation.processing",
            EventType::DonationSucceeded => "donation.succeeded",
            EventType::DonationFailed => "donation.failed",
            EventType::DonationRefunded => "donation.refunded",
            EventType::DonationRefundReversed => "donation.refund_reversed",
        }
    }
}

/// The seed's timestamp format: RFC 3339, milliseconds, `Z` (`2026-03-14T10:00:00.000Z`).
pub fn seed_timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `data` of `recommendation_set.payment_succeeded` and `recommendation_set.payment_failed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PaymentData {
    pub split_payment_id: String,
    pub recommendation_set_id: Option<String>,
    pub donor_id: Option<String>,
    pub total_amount_cents: i64,
    /// Upper-case ISO code, as the seed's `Donation.currency` ("AUD").
    pub currency: String,
    pub payment_method_type: String,
    pub donation_date: String,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
}

/// `data` of `recommendation_set.distribution_succeeded` and `recommendation_set.distribution_failed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DistributionData {
    pub split_allocation_id: String,
    pub split_payment_id: String,
    pub recommendation_set_id: Option<String>,
    pub donor_id: Option<String>,
    pub recipient_organisation_id: String,
    pub recipient_organisation_name: String,
    /// The amount transferred (net of fees) for a success; the amount that could not be transferred for a failure.
    pub amount_cents: i64,
    pub currency: String,
    pub stripe_transfer_id: Option<String>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
}

/// `data` of the `donation.*` events (the seed's `Donation` as seen by the recipient organisation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DonationData {
    pub id: String,
    pub donor_id: String,
    pub amount_cents: i64,
    pub refunded_amount_cents: i64,
    pub currency: String,
    pub donation_date: String,
    pub source: String,
    pub status: String,
    pub external_id: Option<String>,
    pub payment_method: Option<String>,
    pub tracking_code: Option<String>,
    pub deleted_at: Option<String>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
}

/// One event to write to the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboundEvent {
    pub event_type: EventType,
    pub organisation_id: String,
    pub occurred_at: DateTime<Utc>,
    pub dedup_key: String,
    pub data: serde_json::Value,
}

#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    event_type: &'static str,
    occurred_at: String,
    organisation_id: &'a str,
    data: &'a serde_json::Value,
}

impl OutboundEvent {
    fn new(
        event_type: EventType,
        organisation_id: &str,
        occurred_at: DateTime<Utc>,
        dedup_key: String,
        data: impl Serialize,
    ) -> Self {
        Self {
            event_type,
            organisation_id: organisation_id.to_owned(),
            occurred_at,
            dedup_key,
            data: serde_json::to_value(data).expect("event payloads are plain data"),
        }
    }

    /// `recommendation_set.payment_succeeded|payment_failed` to the distributing organisation: success once per
    /// payment; a failure once per failed attempt (`attempt_ref`: the failed charge, or what ended the payment),
    /// since a donor may fail and try again on the same PaymentIntent.
    pub fn payment(
        event_type: EventType,
        organisation_id: &str,
        at: DateTime<Utc>,
        data: PaymentData,
        attempt_ref: Option<&str>,
    ) -> Self {
        assert!(matches!(
            event_type,
            EventType::PaymentSucceeded | EventType::PaymentFailed
        ));
        let key = match attempt_ref {
            Some(r) => format!("{}:{}:{r}", event_type.as_str(), data.split_payment_id),
            None => format!("{}:{}", event_type.as_str(), data.split_payment_id),
        };
        Self::new(event_type, organisation_id, at, key, data)
    }

    /// `recommendation_set.distribution_succeeded|distribution_failed`, once per split allocation.
    pub fn distribution(
        event_type: EventType,
        organisation_id: &str,
        at: DateTime<Utc>,
        data: DistributionData,
    ) -> Self {
        assert!(matches!(
            event_type,
            EventType::DistributionSucceeded | EventType::DistributionFailed
        ));
        let key = format!("{}:{}", event_type.as_str(), data.split_allocation_id);
        Self::new(event_type, organisation_id, at, key, data)
    }

    /// `donation.*` on the recipient organisation, once per donation and type (refunds: once per `refund_ref`).
    pub fn donation(
        event_type: EventType,
        organisation_id: &str,
        at: DateTime<Utc>,
        data: DonationData,
        refund_ref: Option<&str>,
    ) -> Self {
        assert!(event_type.as_str().starts_with("donation."));
        let key = match refund_ref {
            Some(r) => format!("{}:{}:{r}", event_type.as_str(), data.id),
            None => format!("{}:{}", event_type.as_str(), data.id),
        };
        Self::new(event_type, organisation_id, at, key, data)
    }

    /// The body receivers get: the seed's envelope.
    pub fn envelope(&self) -> serde_json::Value {
        serde_json::to_value(Envelope {
            event_type: self.event_type.as_str(),
            occurred_at: seed_timestamp(self.occurred_at),
            organisation_id: &self.organisation_id,
            data: &self.data,
        })
        .expect("envelope is plain data")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const SEED: &str = include_str!("../../contract/together-openapi.json");

    fn sample(event_type: EventType) -> OutboundEvent {
        let at = DateTime::parse_from_rfc3339("2026-03-14T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        match event_type {
            EventType::PaymentSucceeded | EventType::PaymentFailed => OutboundEvent::payment(
                event_type,
                "org_1",
                at,
                PaymentData {
                    split_payment_id: "spay_1".into(),
                    recommendation_set_id: Some("rec_1".into()),
                    donor_id: None,
                    total_amount_cents: 5000,
                    currency: "AUD".into(),
                    payment_method_type: "card".into(),
                    donation_date: seed_timestamp(at),
                    failure_code: None,
                    failure_message: None,
                },
                (event_type == EventType::PaymentFailed).then_some("ch_1"),
            ),
            EventType::DistributionSucceeded | EventType::DistributionFailed => OutboundEvent::distribution(
                event_type,
                "org_1",
                at,
                DistributionData {
                    split_allocation_id: "salc_1".into(),
                    split_payment_id: "spay_1".into(),
                    recommendation_set_id: Some("rec_1".into()),
                    donor_id: None,
                    recipient_organisation_id: "org_2".into(),
                    recipient_organisation_name: "ACF".into(),
                    amount_cents: 2400,
                    currency: "AUD".into(),
                    stripe_transfer_id: Some("tr_1".into()),
                    failure_code: None,
                    failure_message: None,
                },
            ),
            _ => OutboundEvent::donation(
                event_type,
                "org_2",
                at,
                DonationData {
                    id: "don_1".into(),
                    donor_id: "cm3abc".into(),
                    amount_cents: 2500,
                    refunded_amount_cents: 0,
                    currency: "AUD".into(),
                    donation_date: seed_timestamp(at),
                    source: "SPLIT_GATEWAY".into(),
                    status: "PENDING".into(),
                    external_id: Some("pi_1".into()),
                    payment_method: Some("card".into()),
                    tracking_code: None,
                    deleted_at: None,
                    failure_code: None,
                    failure_message: None,
                },
                None,
            ),
        }
    }

    /// Every emitted payload has exactly the seed schema's properties, each of an allowed JSON type.
    #[test]
    fn payloads_match_the_seed_schemas() {
        let seed: Value = serde_json::from_str(SEED).unwrap();
        for event_type in EventType::ALL {
            let schema =
                &seed["webhooks"][event_type.as_str()]["post"]["requestBody"]["content"]["application/json"]["schema"];
            assert!(schema.is_object(), "seed has no schema for {}", event_type.as_str());
            let body = sample(event_type).envelope();
            assert_eq!(body["type"], event_type.as_str());
            assert_eq!(body["occurred_at"], "2026-03-14T10:00:00.000Z");
            for required in schema["required"].as_array().unwrap() {
                assert!(body.get(required.as_str().unwrap()).is_some(), "{required} missing");
            }
            let data_schema = &schema["properties"]["data"];
            let props = data_schema["properties"].as_object().unwrap();
            let data = body["data"].as_object().unwrap();
            let mut ours: Vec<_> = data.keys().collect();
            let mut theirs: Vec<_> = props.keys().collect();
            ours.sort();
            theirs.sort();
            assert_eq!(
                ours,
                theirs,
                "{}: data fields differ from the seed",
                event_type.as_str()
            );
            for (name, prop) in props {
                let allowed: Vec<&str> = match &prop["type"] {
                    Value::String(t) => vec![t.as_str()],
                    Value::Array(ts) => ts.iter().map(|t| t.as_str().unwrap()).collect(),
                    other => panic!("unexpected type {other}"),
                };
                let got = match &data[name] {
                    Value::Null => "null",
                    Value::String(_) => "string",
                    Value::Number(_) => "integer",
                    Value::Bool(_) => "boolean",
                    _ => "object",
                };
                assert!(
                    allowed.contains(&got),
                    "{}.{name}: {got} not in {allowed:?}",
                    event_type.as_str()
                );
                if let Some(values) = prop["enum"].as_array() {
                    assert!(
                        values.contains(&data[name]),
                        "{}.{name}: value not in the seed's enum",
                        event_type.as_str()
                    );
                }
            }
        }
    }

    #[test]
    fn dedup_keys_are_once_per_subject() {
        assert_eq!(
            sample(EventType::PaymentFailed).dedup_key,
            "recommendation_set.payment_failed:spay_1:ch_1",
            "a failure is announced once per failed attempt (its charge)"
        );
        let a = sample(EventType::PaymentSucceeded);
        assert_eq!(a.dedup_key, "recommendation_set.payment_succeeded:spay_1");
        let d = sample(EventType::DistributionFailed);
        assert_eq!(d.dedup_key, "recommendation_set.distribution_failed:salc_1");
        assert_eq!(sample(EventType::DonationCreated).dedup_key, "donation.created:don_1");
    }
}
