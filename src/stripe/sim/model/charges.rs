//! Charges: the money movement behind a PaymentIntent, its fee, and its balance transaction (booked at once, or
//! later under asynchronous capture).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::balance::BalanceTxn;
use super::{with_nulls, Model, SimError};

#[derive(Debug, Clone)]
pub(super) struct Charge {
    pub(super) id: String,
    pub(super) amount: i64,
    pub(super) currency: String,
    pub(super) created: i64,
    pub(super) status: &'static str,
    pub(super) payment_intent: String,
    pub(super) transfer_group: Option<String>,
    pub(super) method_type: &'static str,
    pub(super) amount_refunded: i64,
    pub(super) balance_transaction: Option<String>,
    /// Asynchronous capture: when the balance transaction appears.
    pub(super) balance_transaction_due: Option<i64>,
    pub(super) fee: i64,
    pub(super) available_on: i64,
    pub(super) failure_code: Option<String>,
    pub(super) failure_message: Option<String>,
    pub(super) disputed: bool,
    /// When a dispute opens on its own (the BECS `666666660` test account), on the simulator's clock.
    pub(super) dispute_due: Option<i64>,
    pub(super) metadata: BTreeMap<String, String>,
    pub(super) payment_method: String,
}

impl Model {
    pub(super) fn charge_json(&self, c: &Charge, expand: &[String], now: i64) -> Value {
        let bt = match &c.balance_transaction {
            Some(id) if expand.iter().any(|e| e == "balance_transaction") => self
                .balance_txn(id)
                .map_or(Value::Null, |b| self.balance_txn_json(b, now)),
            Some(id) => json!(id),
            None => Value::Null,
        };
        let object = json!({
            "id": c.id,
            "object": "charge",
            "amount": c.amount,
            "amount_captured": if c.status == "succeeded" { c.amount } else { 0 },
            "amount_refunded": c.amount_refunded,
            "balance_transaction": bt,
            "billing_details": { "address": null, "email": null, "name": null, "phone": null },
            "captured": c.status == "succeeded",
            "created": c.created,
            "currency": c.currency,
            "disputed": c.disputed,
            "failure_code": c.failure_code,
            "failure_message": c.failure_message,
            "livemode": false,
            "metadata": c.metadata,
            "paid": c.status == "succeeded",
            "payment_intent": c.payment_intent,
            "payment_method_details": { "type": c.method_type },
            "refunded": c.amount_refunded == c.amount && c.amount > 0,
            "refunds": self.charge_refunds_json(&c.id),
            "status": c.status,
            "transfer_group": c.transfer_group,
            "payment_method": c.payment_method,
        });
        with_nulls(
            object,
            &[
                "application",
                "application_fee",
                "application_fee_amount",
                "calculated_statement_descriptor",
                "customer",
                "description",
                "failure_balance_transaction",
                "fraud_details",
                "on_behalf_of",
                "outcome",
                "receipt_email",
                "receipt_number",
                "receipt_url",
                "review",
                "shipping",
                "source",
                "source_transfer",
                "statement_descriptor",
                "statement_descriptor_suffix",
                "transfer_data",
            ],
        )
    }

    pub(super) fn succeed_charge(&mut self, charge_id: &str, available_after_secs: i64, now: i64) {
        let fee_rule = match self.charges[charge_id].method_type {
            "card" => self.config.card_fee,
            "au_becs_debit" => self.config.becs_fee,
            _ => self.config.payto_fee,
        };
        let delay = self.config.balance_transaction_delay_secs;
        let charge = self.charges.get_mut(charge_id).expect("caller holds a real charge");
        charge.status = "succeeded";
        charge.fee = fee_rule.fee_cents(charge.amount);
        charge.available_on = now + available_after_secs;
        if delay > 0 {
            charge.balance_transaction_due = Some(now + delay);
            Self::due_at(&mut self.next_due_at, now + delay);
        } else {
            self.book_charge_balance(charge_id, now);
        }
        let charge_json = self.charge_json(&self.charges[charge_id], &[], now);
        self.emit("charge.succeeded", charge_json, now);
    }

    pub(super) fn book_charge_balance(&mut self, charge_id: &str, now: i64) {
        let charge = self.charges.get_mut(charge_id).expect("caller holds a real charge");
        let mut bt = BalanceTxn::platform("charge", charge.amount, &charge.currency, &charge.id, now);
        bt.fee = charge.fee;
        bt.available_on = charge.available_on;
        charge.balance_transaction = Some(bt.id.clone());
        charge.balance_transaction_due = None;
        self.push_balance_txn(bt);
    }

    pub fn retrieve_charge(&self, id: &str, expand: &[String], now: i64) -> Result<Value, SimError> {
        let charge = self
            .charges
            .get(id)
            .ok_or_else(|| SimError::missing("charge", id, Some("charge")))?;
        Ok(self.charge_json(charge, expand, now))
    }
}
