//! Helpers of the store tests (`store*.rs`): a stored payment through a FIXED set, the events a transition writes,
//! typed ids, and a payment succeeded with its fee split.

use super::{plan_for, seed_set, DISTRIBUTOR};
use chrono::Utc;
use splitpay::domain::fees::split_fees;
use splitpay::domain::ids::{SplitAllocationId, SplitPaymentId};
use splitpay::domain::plan::{AmountMode, PaymentMethodType};
use splitpay::domain::state::{PaymentEvent, PaymentStatus, Transition};
use splitpay::events::{DistributionData, EventType, OutboundEvent};
use splitpay::store::allocations::*;
use splitpay::store::payments::*;
use sqlx::PgPool;

pub async fn new_payment(pool: &PgPool, amounts: &[i64]) -> SplitPayment {
    new_payments(pool, amounts, 1).await.remove(0)
}

/// `n` stored payments through one FIXED set of `amounts`.
pub async fn new_payments(pool: &PgPool, amounts: &[i64], n: usize) -> Vec<SplitPayment> {
    let set = seed_set(pool, AmountMode::Fixed, amounts).await;
    let plan = plan_for(&set);
    let mut tx = pool.begin().await.unwrap();
    let mut payments = Vec::with_capacity(n);
    for _ in 0..n {
        let payment = create_split_payment(
            &mut tx,
            &NewSplitPayment {
                id: SplitPaymentId::generate(),
                set: &set,
                plan: &plan,
                donor_id: Some("cm3donor1".into()),
                payment_method_type: PaymentMethodType::Card,
                donor_covers_fees: false,
            },
        )
        .await
        .unwrap();
        payments.push(payment);
    }
    tx.commit().await.unwrap();
    payments
}

pub fn payment_event(event_type: EventType, p: &SplitPaymentRow) -> OutboundEvent {
    let failure = p.failure_code.as_deref().zip(p.failure_message.as_deref());
    splitpay::store::announce::payment(event_type, p, failure, failure.map(|_| "ch_test"), Utc::now())
}

pub fn distribution_event(event_type: EventType, a: &SplitAllocationRow, transfer: Option<&str>) -> OutboundEvent {
    OutboundEvent::distribution(
        event_type,
        DISTRIBUTOR,
        Utc::now(),
        DistributionData {
            split_allocation_id: a.id.clone(),
            split_payment_id: a.split_payment_id.clone(),
            recommendation_set_id: Some("cm3rec1".into()),
            donor_id: None,
            recipient_organisation_id: "cm3orgrcp0".into(),
            recipient_organisation_name: "Recipient 0".into(),
            amount_cents: a.net_amount_cents.unwrap_or(0),
            currency: "AUD".into(),
            stripe_transfer_id: transfer.map(str::to_owned),
            failure_code: None,
            failure_message: None,
        },
    )
}

pub fn pid(p: &SplitPayment) -> SplitPaymentId {
    SplitPaymentId::parse(&p.payment.id).unwrap()
}

pub fn aid(a: &SplitAllocationRow) -> SplitAllocationId {
    SplitAllocationId::parse(&a.id).unwrap()
}

/// Marks a payment succeeded with its charge and writes a fee split; returns the refreshed payment.
pub async fn succeed_with_fees(pool: &PgPool, p: &SplitPayment, processing: i64, platform: i64) -> SplitPayment {
    let mut tx = pool.begin().await.unwrap();
    let patch = PaymentPatch {
        payment_intent_id: Some(format!("pi_{}", &p.payment.id[5..])),
        charge_id: Some(format!("ch_{}", &p.payment.id[5..])),
        ..PaymentPatch::default()
    };
    let t = transition_payment(
        &mut tx,
        &pid(p),
        PaymentEvent::Succeeded,
        &patch,
        &[payment_event(EventType::PaymentSucceeded, &p.payment)],
    )
    .await
    .unwrap();
    assert_eq!(t, Transition::To(PaymentStatus::Succeeded));
    let gross: Vec<i64> = p.allocations.iter().map(|a| a.gross_amount_cents).collect();
    let split = split_fees(&gross, processing, platform).unwrap();
    write_fee_split(&mut tx, &pid(p), None, processing, platform, &split, false)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    get_split_payment(&mut pool.acquire().await.unwrap(), &pid(p))
        .await
        .unwrap()
}
