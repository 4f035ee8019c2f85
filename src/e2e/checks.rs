//! Each result checked through Stripe's API against splitpay's records: the PaymentIntent and charge, the charge's
//! balance transaction (fee), every transfer of the payment's transfer group (amount, destination, source, our
//! metadata; none extra), each transfer's balance transaction, reversals and refunds with theirs, and conservation
//! to the cent on both sides.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::stripe_api::StripeApi;
use super::summary::{AllocationLine, MoneyBackLine, PaymentLine};
use super::Failure;
use crate::domain::ids::SplitPaymentId;
use crate::store::money_report::money_report;
use crate::store::payments::get_split_payment;
use crate::stripe::{IntentStatus, PaymentGateway};

/// Counts the comparisons that held; the first that does not ends the check with what differed.
#[derive(Debug, Default)]
pub struct Checker {
    pub passed: u64,
}

impl Checker {
    fn that(&mut self, holds: bool, what: impl FnOnce() -> String) -> Result<(), Failure> {
        if !holds {
            return Err(format!("check failed: {}", what()).into());
        }
        self.passed += 1;
        Ok(())
    }

    fn equal<T: PartialEq + std::fmt::Debug>(&mut self, stripe: T, ours: T, what: &str) -> Result<(), Failure> {
        let holds = stripe == ours;
        self.that(holds, || {
            format!("{what}: Stripe says {stripe:?}, splitpay says {ours:?}")
        })
    }
}

/// The balance transaction `object[field]` names, fetched.
async fn balance_transaction_of(stripe: &StripeApi, object: &Value, what: &str) -> Result<Value, Failure> {
    let id = object["balance_transaction"]
        .as_str()
        .ok_or_else(|| format!("{what} has no balance_transaction: {object}"))?;
    stripe
        .get("e2e_balance_transaction", &format!("/balance_transactions/{id}"))
        .await
}

/// Checks one succeeded split payment and returns its summary line. `accounts` maps link ids to their connected
/// accounts.
pub async fn payment(
    check: &mut Checker,
    stripe: &StripeApi,
    pool: &sqlx::PgPool,
    label: &str,
    id: &SplitPaymentId,
    accounts: &BTreeMap<String, String>,
) -> Result<PaymentLine, Failure> {
    let mut conn = pool.acquire().await?;
    let p = get_split_payment(&mut conn, id).await?;
    let report = money_report(&mut conn, id).await?;
    let refunds = crate::store::refunds::refunds_for_payment(&mut conn, id.as_str()).await?;
    let reversals = crate::store::reversals::reversals_for_payment(&mut conn, id.as_str()).await?;
    let processed = crate::store::records::processed_stripe_events(
        &mut conn,
        "payment_intent.succeeded",
        p.payment.payment_intent_id.as_deref().unwrap_or_default(),
    )
    .await?;
    drop(conn);
    let gw = &stripe.gateway;
    let pi_id = p
        .payment
        .payment_intent_id
        .clone()
        .ok_or("the payment has no PaymentIntent")?;
    let charge_id = p.payment.charge_id.clone().ok_or("the payment has no charge")?;
    check.that(processed >= 1, || {
        format!("splitpay never processed payment_intent.succeeded for {pi_id}")
    })?;

    // The PaymentIntent, the charge and its balance transaction: what was charged and Stripe's fee.
    let pi = gw.retrieve_payment_intent(&pi_id).await?;
    check.equal(pi.status, IntentStatus::Succeeded, "PaymentIntent status")?;
    check.equal(pi.amount_cents, p.payment.total_amount_cents, "PaymentIntent amount")?;
    check.equal(
        pi.transfer_group.as_deref(),
        Some(id.as_str()),
        "PaymentIntent transfer_group",
    )?;
    check.equal(pi.latest_charge.as_deref(), Some(charge_id.as_str()), "latest charge")?;
    let charge = gw.retrieve_charge(&charge_id).await?;
    let bt = charge
        .balance_transaction
        .clone()
        .ok_or_else(|| format!("{charge_id} has no balance transaction yet"))?;
    check.equal(charge.amount_cents, p.payment.total_amount_cents, "charge amount")?;
    check.equal(
        bt.amount_cents,
        charge.amount_cents,
        "charge balance transaction amount",
    )?;
    check.equal(Some(bt.fee_cents), p.payment.processing_fee_cents, "Stripe's fee")?;
    check.equal(bt.net_cents, bt.amount_cents - bt.fee_cents, "charge net")?;

    // Transfers: exactly one per allocation that has one, never a second.
    let transfers = gw.list_transfers(id.as_str()).await?;
    let ours: BTreeSet<&str> = p
        .allocations
        .iter()
        .filter_map(|a| a.stripe_transfer_id.as_deref())
        .collect();
    let theirs: BTreeSet<&str> = transfers.iter().map(|t| t.id.as_str()).collect();
    check.equal(theirs, ours, "transfers of the transfer group")?;
    let mut allocations = Vec::new();
    let mut net_transferred_cents = 0;
    for a in &p.allocations {
        let destination = accounts
            .get(&a.recipient_org_account_link_id)
            .cloned()
            .unwrap_or_default();
        let mut line = AllocationLine {
            split_allocation_id: a.id.clone(),
            destination: destination.clone(),
            status: a.status.to_string(),
            net_amount_cents: a.net_amount_cents.unwrap_or(0),
            generation: a.generation,
            transfer: a.stripe_transfer_id.clone(),
            transfer_balance_transaction: None,
        };
        if let Some(tr) = &a.stripe_transfer_id {
            let t = transfers.iter().find(|t| &t.id == tr).expect("compared above");
            check.equal(
                t.amount_cents,
                line.net_amount_cents,
                "transfer amount (the share's net)",
            )?;
            check.equal(
                t.destination.as_deref(),
                Some(destination.as_str()),
                "transfer destination",
            )?;
            check.equal(
                t.source_transaction.as_deref(),
                Some(charge_id.as_str()),
                "source_transaction",
            )?;
            check.equal(
                t.metadata.get("split_allocation_id").map(String::as_str),
                Some(a.id.as_str()),
                "transfer metadata split_allocation_id",
            )?;
            let reversed_ours: i64 = reversals
                .iter()
                .filter(|r| r.stripe_transfer_id == *tr && r.status == "SUCCEEDED")
                .map(|r| r.amount_cents)
                .sum();
            check.equal(t.amount_reversed_cents, reversed_ours, "amount reversed")?;
            net_transferred_cents += t.amount_cents - t.amount_reversed_cents;
            let raw = stripe.get("e2e_retrieve_transfer", &format!("/transfers/{tr}")).await?;
            let tbt = balance_transaction_of(stripe, &raw, tr).await?;
            check.equal(
                tbt["amount"].as_i64(),
                Some(-t.amount_cents),
                "transfer balance transaction amount",
            )?;
            line.transfer_balance_transaction = tbt["id"].as_str().map(str::to_owned);
        }
        allocations.push(line);
    }

    // Reversals: each one splitpay recorded is on its transfer at Stripe, with its balance transaction.
    let mut reversal_lines = Vec::new();
    for r in &reversals {
        check.equal(r.status.as_str(), "SUCCEEDED", "reversal status")?;
        let rid = r
            .stripe_reversal_id
            .clone()
            .ok_or("a succeeded reversal without its trr_ id")?;
        let raw = stripe
            .get("e2e_retrieve_transfer", &format!("/transfers/{}", r.stripe_transfer_id))
            .await?;
        let found = raw["reversals"]["data"]
            .as_array()
            .and_then(|list| list.iter().find(|x| x["id"] == rid.as_str()).cloned())
            .ok_or_else(|| format!("{rid} is not among {}'s reversals", r.stripe_transfer_id))?;
        check.equal(found["amount"].as_i64(), Some(r.amount_cents), "reversal amount")?;
        let rbt = balance_transaction_of(stripe, &found, &rid).await?;
        check.equal(
            rbt["amount"].as_i64(),
            Some(r.amount_cents),
            "reversal balance transaction amount",
        )?;
        reversal_lines.push(MoneyBackLine {
            id: rid,
            amount_cents: r.amount_cents,
            balance_transaction: rbt["id"].as_str().unwrap_or_default().to_owned(),
        });
    }

    // Refunds: Stripe's list for the charge is exactly splitpay's, amounts and all.
    let stripe_refunds = gw.list_refunds(&charge_id).await?;
    let ours: BTreeMap<String, i64> = refunds
        .iter()
        .filter_map(|r| Some((r.stripe_refund_id.clone()?, r.amount_cents)))
        .collect();
    let theirs: BTreeMap<String, i64> = stripe_refunds.iter().map(|r| (r.id.clone(), r.amount_cents)).collect();
    check.equal(&theirs, &ours, "refunds of the charge")?;
    let refunded_cents: i64 = theirs.values().sum();
    check.equal(charge.amount_refunded_cents, refunded_cents, "charge amount_refunded")?;
    let mut refund_lines = Vec::new();
    for r in &refunds {
        check.equal(r.status.as_str(), "SUCCEEDED", "refund status")?;
        let rid = r.stripe_refund_id.clone().unwrap_or_default();
        let info = stripe_refunds.iter().find(|x| x.id == rid).expect("compared above");
        check.equal(info.status.as_deref(), Some("succeeded"), "Stripe's refund status")?;
        let raw = stripe.get("e2e_retrieve_refund", &format!("/refunds/{rid}")).await?;
        let rbt = balance_transaction_of(stripe, &raw, &rid).await?;
        check.equal(
            rbt["amount"].as_i64(),
            Some(-r.amount_cents),
            "refund balance transaction amount",
        )?;
        refund_lines.push(MoneyBackLine {
            id: rid,
            amount_cents: r.amount_cents,
            balance_transaction: rbt["id"].as_str().unwrap_or_default().to_owned(),
        });
    }

    // Conservation, on splitpay's records and across to Stripe's: what stays on the platform's balance by Stripe's
    // objects is what splitpay says it keeps (parked money and its own fee, less what refunds cost it).
    check.that(report.is_conserved(), || format!("{id} is not conserved: {report:?}"))?;
    check.equal(report.in_flight_cents, 0, "money still in flight")?;
    check.equal(report.unsettled_cents, 0, "refunded money not settled")?;
    check.equal(report.charged_cents, charge.amount_cents, "charged")?;
    let retained_cents = charge.amount_cents - bt.fee_cents - net_transferred_cents - charge.amount_refunded_cents;
    let kept_cents = report.parked_cents + report.fees_kept_cents
        - p.payment.processing_fee_cents.unwrap_or(0)
        - report.platform_loss_cents;
    check.equal(retained_cents, kept_cents, "left on the platform's balance")?;

    Ok(PaymentLine {
        label: label.to_owned(),
        split_payment_id: id.to_string(),
        payment_intent: pi_id,
        charge: charge_id,
        charge_balance_transaction: bt.id,
        charged_cents: charge.amount_cents,
        stripe_fee_cents: bt.fee_cents,
        allocations,
        refunds: refund_lines,
        reversals: reversal_lines,
        platform_retained_cents: retained_cents,
        conserved: true,
    })
}
