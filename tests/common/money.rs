//! Conservation checked against Stripe: the simulator's own transfers and charge, not splitpay's rows alone.
//! `charged = Σ (transfers − reversals) Stripe holds + Σ parked + Σ refunded + in flight + fees kept − platform loss
//! − unsettled`, and each TRANSFERRED allocation has exactly one transfer at Stripe, of its generation's amount,
//! with its id; the reversals Stripe holds are the ones splitpay recorded, and the charge's refunded amount is the
//! refunds splitpay recorded. A missing or doubled transfer, reversal or refund fails the check.

use splitpay::domain::ids::SplitPaymentId;
use splitpay::domain::state::{AllocationStatus, PaymentStatus};
use splitpay::store::money_report::money_report;
use splitpay::store::payments::get_split_payment;
use splitpay::stripe::PaymentGateway;

use super::flow::Flow;

/// What one payment's money looks like at Stripe, for reports and assertions.
#[derive(Debug)]
pub struct StripeMoney {
    pub charged_cents: i64,
    pub transferred_at_stripe_cents: i64,
    pub transfers_at_stripe: usize,
}

/// Panics (with the payment id and the numbers) unless the payment's money is conserved against Stripe.
pub async fn assert_conserved_at_stripe(flow: &Flow, id: &SplitPaymentId) -> StripeMoney {
    conserved_at_stripe(flow.gateway.as_ref(), &flow.db.pool, id)
        .await
        .unwrap_or_else(|e| panic!("{id}: {e}"))
}

pub async fn conserved_at_stripe(
    gateway: &dyn PaymentGateway,
    pool: &sqlx::PgPool,
    id: &SplitPaymentId,
) -> Result<StripeMoney, String> {
    let p = get_split_payment(&mut pool.acquire().await.unwrap(), id).await.unwrap();
    let transfers = gateway
        .list_transfers(&p.payment.transfer_group)
        .await
        .map_err(|e| format!("listing transfers: {e}"))?;
    let transferred: i64 = transfers.iter().map(|t| t.amount_cents - t.amount_reversed_cents).sum();
    for t in &transfers {
        let Some(a) = p
            .allocations
            .iter()
            .find(|a| t.metadata.get("split_allocation_id") == Some(&a.id))
        else {
            return Err(format!("transfer {} names none of the payment's allocations", t.id));
        };
        if a.status != AllocationStatus::Transferred || a.stripe_transfer_id.as_deref() != Some(t.id.as_str()) {
            return Err(format!(
                "transfer {} at Stripe for {} ({}, recorded {:?}): doubled or unrecorded",
                t.id, a.id, a.status, a.stripe_transfer_id
            ));
        }
        // The generation's frozen amount: the net, less what refunds took before the transfer started.
        let (frozen,): (i64,) = sqlx::query_as(
            "SELECT amount_cents FROM transfer_attempts WHERE split_allocation_id = $1 AND generation = $2",
        )
        .bind(&a.id)
        .bind(a.generation)
        .fetch_one(pool)
        .await
        .map_err(|e| e.to_string())?;
        if t.amount_cents != frozen {
            return Err(format!(
                "transfer {} is {} but {}'s generation {} froze {frozen} (net {:?})",
                t.id, t.amount_cents, a.id, a.generation, a.net_amount_cents
            ));
        }
    }
    for a in p
        .allocations
        .iter()
        .filter(|a| a.status == AllocationStatus::Transferred)
    {
        let n = transfers
            .iter()
            .filter(|t| Some(t.id.as_str()) == a.stripe_transfer_id.as_deref())
            .count();
        if n != 1 {
            return Err(format!("{} is TRANSFERRED but Stripe holds {n} transfers of it", a.id));
        }
    }
    let report = money_report(&mut pool.acquire().await.unwrap(), id).await.unwrap();
    if !report.is_conserved() {
        return Err(format!("splitpay's own report does not add up: {report:?}"));
    }
    if p.payment.status != PaymentStatus::Succeeded {
        if !transfers.is_empty() {
            return Err(format!(
                "{} transfers for a payment that is {}",
                transfers.len(),
                p.payment.status
            ));
        }
        return Ok(StripeMoney {
            charged_cents: 0,
            transferred_at_stripe_cents: 0,
            transfers_at_stripe: 0,
        });
    }
    // The charge itself, and its fee, as Stripe holds them.
    let charge_id = p
        .payment
        .charge_id
        .clone()
        .ok_or("a succeeded payment without its charge")?;
    let charge = gateway.retrieve_charge(&charge_id).await.map_err(|e| e.to_string())?;
    if charge.amount_cents != p.payment.total_amount_cents {
        return Err(format!(
            "Stripe charged {} but the payment is {}",
            charge.amount_cents, p.payment.total_amount_cents
        ));
    }
    if let (Some(bt), Some(fee)) = (&charge.balance_transaction, p.payment.processing_fee_cents) {
        if bt.fee_cents != fee {
            return Err(format!("Stripe's fee is {} but splitpay split {fee}", bt.fee_cents));
        }
    }
    let reversed_at_stripe: i64 = transfers.iter().map(|t| t.amount_reversed_cents).sum();
    if reversed_at_stripe != report.reversed_cents {
        return Err(format!(
            "Stripe holds {reversed_at_stripe} reversed but splitpay recorded {}",
            report.reversed_cents
        ));
    }
    let (open_refunds,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM refunds WHERE split_payment_id = $1 AND status IN ('REQUESTED', 'PENDING')",
    )
    .bind(id.as_str())
    .fetch_one(pool)
    .await
    .map_err(|e| e.to_string())?;
    if open_refunds == 0 && charge.amount_refunded_cents != report.refunded_cents {
        return Err(format!(
            "Stripe refunded {} of the charge but splitpay recorded {}",
            charge.amount_refunded_cents, report.refunded_cents
        ));
    }
    let sum =
        transferred + report.parked_cents + report.refunded_cents + report.in_flight_cents + report.fees_kept_cents
            - report.platform_loss_cents
            - report.unsettled_cents;
    if sum != charge.amount_cents {
        return Err(format!(
            "charged {} ≠ transferred − reversed at Stripe {transferred} + parked {} + refunded {} + in flight {} + \
             fees {} − platform loss {} − unsettled {} = {sum}",
            charge.amount_cents,
            report.parked_cents,
            report.refunded_cents,
            report.in_flight_cents,
            report.fees_kept_cents,
            report.platform_loss_cents,
            report.unsettled_cents
        ));
    }
    Ok(StripeMoney {
        charged_cents: charge.amount_cents,
        transferred_at_stripe_cents: transferred,
        transfers_at_stripe: transfers.len(),
    })
}
