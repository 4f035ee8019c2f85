//! Conservation checked against Stripe: the simulator's own transfers and charge, not splitpay's rows alone.
//! `charged = Σ (transfers − reversals) Stripe holds + Σ parked + Σ refunded + Σ disputed + in flight + fees kept
//! − platform loss − unsettled`, and each successful generation has exactly one transfer at Stripe, of its frozen
//! amount, with its id (a won dispute adds a generation), and a TRANSFERRED allocation's current one is among them; the reversals Stripe holds are the ones splitpay recorded, and the charge's refunded amount is the
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
        // The successful generation that recorded this transfer, and its frozen amount: the net, less what refunds
        // took before the transfer started (or, after a won dispute, what its withdrawal took back).
        let frozen: Option<(i32, i64)> = sqlx::query_as(
            "SELECT generation, amount_cents FROM transfer_attempts
              WHERE split_allocation_id = $1 AND stripe_transfer_id = $2 AND outcome = 'TRANSFERRED'",
        )
        .bind(&a.id)
        .bind(&t.id)
        .fetch_optional(pool)
        .await
        .map_err(|e| e.to_string())?;
        let Some((generation, frozen)) = frozen else {
            return Err(format!(
                "transfer {} at Stripe for {} ({}, recorded {:?}): doubled or unrecorded",
                t.id, a.id, a.status, a.stripe_transfer_id
            ));
        };
        if t.amount_cents != frozen {
            return Err(format!(
                "transfer {} is {} but {}'s generation {generation} froze {frozen} (net {:?})",
                t.id, t.amount_cents, a.id, a.net_amount_cents
            ));
        }
    }
    let recorded: Vec<(String, String)> = sqlx::query_as(
        "SELECT t.split_allocation_id, t.stripe_transfer_id FROM transfer_attempts t
           JOIN split_allocations a ON a.id = t.split_allocation_id
          WHERE a.split_payment_id = $1 AND t.outcome = 'TRANSFERRED'",
    )
    .bind(id.as_str())
    .fetch_all(pool)
    .await
    .map_err(|e| e.to_string())?;
    for (allocation, transfer) in &recorded {
        let n = transfers.iter().filter(|t| &t.id == transfer).count();
        if n != 1 {
            return Err(format!(
                "{allocation} recorded {transfer} but Stripe holds {n} transfers with that id"
            ));
        }
    }
    for a in p
        .allocations
        .iter()
        .filter(|a| a.status == AllocationStatus::Transferred)
    {
        if !recorded
            .iter()
            .any(|(aid, t)| *aid == a.id && Some(t.as_str()) == a.stripe_transfer_id.as_deref())
        {
            return Err(format!(
                "{} is TRANSFERRED but its transfer is not a recorded generation's",
                a.id
            ));
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
    let sum = transferred
        + report.parked_cents
        + report.refunded_cents
        + report.disputed_cents
        + report.in_flight_cents
        + report.fees_kept_cents
        - report.platform_loss_cents
        - report.unsettled_cents;
    if sum != charge.amount_cents {
        return Err(format!(
            "charged {} ≠ transferred − reversed at Stripe {transferred} + parked {} + refunded {} + disputed {} + \
             in flight {} + fees {} − platform loss {} − unsettled {} = {sum}",
            charge.amount_cents,
            report.parked_cents,
            report.refunded_cents,
            report.disputed_cents,
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
