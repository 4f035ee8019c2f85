//! Refunds of a charge (named directly or through its PaymentIntent), never above what is left to refund.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::balance::BalanceTxn;
use super::{random_id, with_nulls, Model, SimError};
use crate::stripe::sim::form::Form;

const CREATE_PARAMS: &[&str] = &[
    "amount",
    "charge",
    "currency",
    "customer",
    "instructions_email",
    "metadata",
    "origin",
    "payment_intent",
    "reason",
    "refund_application_fee",
    "reverse_transfer",
];
/// The reasons a caller may give (Stripe sets `expired_uncaptured_charge` itself).
const REASONS: &[&str] = &["duplicate", "fraudulent", "requested_by_customer"];

#[derive(Debug, Clone)]
pub(super) struct Refund {
    pub(super) id: String,
    pub(super) amount: i64,
    pub(super) currency: String,
    pub(super) charge: String,
    pub(super) payment_intent: String,
    pub(super) created: i64,
    pub(super) metadata: BTreeMap<String, String>,
    pub(super) reason: Option<String>,
    pub(super) balance_transaction: String,
}

impl Model {
    pub fn create_refund(&mut self, form: &Form, now: i64) -> Result<Value, SimError> {
        form.only(CREATE_PARAMS)?;
        let metadata = form.metadata()?;
        let reason = form.one_of("reason", REASONS)?.map(str::to_owned);
        let charge_id = match (form.optional("charge")?, form.optional("payment_intent")?) {
            (Some(ch), _) => ch.to_owned(),
            (None, Some(pi)) => {
                let intent = self
                    .intents
                    .get(pi)
                    .ok_or_else(|| SimError::missing("payment_intent", pi, Some("payment_intent")))?;
                intent
                    .latest_charge
                    .clone()
                    .filter(|_| intent.status == "succeeded")
                    .ok_or_else(|| {
                        SimError::refused(
                            400,
                            "charge_not_refundable",
                            format!("PaymentIntent {pi} has no successful charge."),
                            Some("payment_intent"),
                        )
                    })?
            }
            (None, None) => {
                return Err(SimError::invalid(
                    "charge",
                    "One of charge or payment_intent is required.",
                ))
            }
        };
        let charge = self
            .charges
            .get(&charge_id)
            .ok_or_else(|| SimError::missing("charge", &charge_id, Some("charge")))?;
        if charge.status != "succeeded" {
            return Err(SimError::refused(
                400,
                "charge_not_refundable",
                format!("Charge {charge_id} has not succeeded."),
                Some("charge"),
            ));
        }
        let left = charge.amount - charge.amount_refunded;
        if left == 0 {
            return Err(SimError::refused(
                400,
                "charge_already_refunded",
                format!("Charge {charge_id} has already been refunded."),
                Some("charge"),
            ));
        }
        let amount = form.int("amount")?.unwrap_or(left);
        if amount <= 0 || amount > left {
            return Err(SimError::refused(
                400,
                "amount_too_large",
                format!("Refund amount ({amount}) is greater than unrefunded amount on charge ({left})"),
                Some("amount"),
            ));
        }
        let refund = Refund {
            id: random_id("re"),
            amount,
            currency: charge.currency.clone(),
            charge: charge_id.clone(),
            payment_intent: charge.payment_intent.clone(),
            created: now,
            metadata,
            reason,
            balance_transaction: random_id("txn"),
        };
        self.charges.get_mut(&charge_id).expect("exists").amount_refunded += amount;
        self.balance_txns.push(BalanceTxn {
            id: refund.balance_transaction.clone(),
            amount: -amount,
            fee: 0,
            currency: refund.currency.clone(),
            created: now,
            available_on: now,
            type_: "refund",
            source: refund.id.clone(),
        });
        let json = refund_json(&refund);
        self.refunds.insert(refund.id.clone(), refund);
        let charge_json = self.charge_json(&self.charges[&charge_id], &[], now);
        self.emit("charge.refunded", charge_json, now);
        self.emit("refund.created", json.clone(), now);
        Ok(json)
    }
}

pub(super) fn refund_json(r: &Refund) -> Value {
    let object = json!({
        "id": r.id, "object": "refund", "amount": r.amount, "balance_transaction": r.balance_transaction,
        "charge": r.charge, "created": r.created, "currency": r.currency, "metadata": r.metadata,
        "payment_intent": r.payment_intent, "reason": r.reason, "status": "succeeded",
    });
    with_nulls(
        object,
        &[
            "customer",
            "customer_account",
            "destination_details",
            "payment_method",
            "receipt_number",
            "source_transfer_reversal",
            "transfer_reversal",
        ],
    )
}
