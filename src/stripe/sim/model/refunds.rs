//! Refunds of a charge (named directly or through its PaymentIntent): never above what is left to refund, never of
//! a disputed charge, paid out of the platform's available balance, and possibly `pending` until settled (then
//! `charge.refund.updated`). Retrieval and listing by charge or PaymentIntent.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::balance::BalanceTxn;
use super::{page, random_id, with_nulls, Model, SimError};
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
const LIST_PARAMS: &[&str] = &[
    "charge",
    "created",
    "ending_before",
    "limit",
    "payment_intent",
    "starting_after",
];
/// The reasons a caller may give (Stripe sets `expired_uncaptured_charge` itself).
const REASONS: &[&str] = &["duplicate", "fraudulent", "requested_by_customer"];
/// Stripe's `failure_reason` values for a refund that fails after it was created.
const FAILURE_REASONS: &[&str] = &[
    "charge_for_pending_refund_disputed",
    "declined",
    "expired_or_canceled_card",
    "insufficient_funds",
    "lost_or_stolen_card",
    "merchant_request",
    "unknown",
];

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
    /// `pending`, `succeeded` or `failed`.
    pub(super) status: &'static str,
    pub(super) failure_reason: Option<String>,
    /// The balance transaction that gave the money back to the platform when the refund failed.
    pub(super) failure_balance_transaction: Option<String>,
}

impl Model {
    pub fn create_refund(&mut self, form: &Form, now: i64) -> Result<Value, SimError> {
        form.only(CREATE_PARAMS)?;
        let metadata = form.metadata()?;
        let reason = form.one_of("reason", REASONS)?.map(str::to_owned);
        let reverse_transfer = form.bool("reverse_transfer")?;
        let refund_application_fee = form.bool("refund_application_fee")?;
        let charge_id = self.refund_target(form)?;
        let charge = self
            .charges
            .get(&charge_id)
            .ok_or_else(|| SimError::missing("charge", &charge_id, Some("charge")))?;
        // Both only apply to destination charges (`transfer_data[destination]`); the simulator has none, and
        // splitpay's separate charges and transfers never are. The wording of Stripe's message is UNCONFIRMED.
        if reverse_transfer {
            return Err(SimError::invalid(
                "reverse_transfer",
                format!("You cannot reverse the transfer of charge {charge_id}: it is not a destination charge (it has no transfer_data[destination]). Reverse its transfers with /v1/transfers/{{id}}/reversals."),
            ));
        }
        if refund_application_fee {
            return Err(SimError::invalid(
                "refund_application_fee",
                format!("Charge {charge_id} has no application fee to refund: it is not a destination charge."),
            ));
        }
        if charge.status != "succeeded" {
            return Err(SimError::refused(
                400,
                "charge_not_refundable",
                format!("Charge {charge_id} has not succeeded."),
                Some("charge"),
            ));
        }
        if self
            .charge_dispute(&charge_id)
            .is_some_and(|d| !d.is_charge_refundable())
        {
            return Err(SimError::refused(
                400,
                "charge_disputed",
                format!("Charge {charge_id} has been charged back; cannot issue a refund."),
                None,
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
        // Stripe pays refunds out of the platform's *available* balance (pending funds do not count). When that
        // is short, Stripe either debits the bank account, holds the refund `pending` (pending_reason
        // insufficient_funds) until the balance is topped up, or refuses the request with "Insufficient funds in
        // your Stripe balance to refund this amount." (as seen through the API). The simulator does the strictest
        // of these: it refuses, so a test cannot pass on money the platform does not have. The code
        // `balance_insufficient` is Stripe's for balance shortfalls; for refunds it is UNCONFIRMED.
        let currency = charge.currency.clone();
        let (available, _) = self.balance_of(&currency, now);
        if available < amount {
            return Err(SimError::refused(
                400,
                "balance_insufficient",
                "Insufficient funds in your Stripe balance to refund this amount.",
                Some("amount"),
            ));
        }
        let id = random_id("re");
        let bt = BalanceTxn::platform("refund", -amount, &currency, &id, now);
        let refund = Refund {
            id: id.clone(),
            amount,
            currency,
            charge: charge_id.clone(),
            payment_intent: charge.payment_intent.clone(),
            created: now,
            metadata,
            reason,
            balance_transaction: bt.id.clone(),
            status: if self.config.refunds_start_pending {
                "pending"
            } else {
                "succeeded"
            },
            failure_reason: None,
            failure_balance_transaction: None,
        };
        self.push_balance_txn(bt);
        self.charges.get_mut(&charge_id).expect("exists").amount_refunded += amount;
        let json = refund_json(&refund);
        self.refunds.push(refund);
        let charge_json = self.charge_json(&self.charges[&charge_id], &[], now);
        self.emit("charge.refunded", charge_json, now);
        self.emit("refund.created", json.clone(), now);
        Ok(json)
    }

    /// The charge a refund request names, directly or through its PaymentIntent.
    fn refund_target(&self, form: &Form) -> Result<String, SimError> {
        match (form.optional("charge")?, form.optional("payment_intent")?) {
            (Some(ch), _) => Ok(ch.to_owned()),
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
                    })
            }
            (None, None) => Err(SimError::invalid(
                "charge",
                "One of charge or payment_intent is required.",
            )),
        }
    }

    /// Settles a `pending` refund (the control call): it succeeds, or fails and gives the money back to the
    /// platform (a `refund_failure` balance transaction; the charge's `amount_refunded` drops again). Emits
    /// `charge.refund.updated` and `refund.updated` (and `refund.failed`), as Stripe does.
    pub fn settle_refund(&mut self, id: &str, outcome: Result<(), Option<&str>>, now: i64) -> Result<Value, SimError> {
        let index = self
            .refunds
            .iter()
            .position(|r| r.id == id)
            .ok_or_else(|| SimError::missing("refund", id, None))?;
        if self.refunds[index].status != "pending" {
            return Err(SimError::invalid(
                "outcome",
                format!("Refund {id} is {}, not pending.", self.refunds[index].status),
            ));
        }
        let failed = match outcome {
            Ok(()) => false,
            Err(reason) => {
                let reason = reason.unwrap_or("unknown");
                if !FAILURE_REASONS.contains(&reason) {
                    return Err(SimError::invalid(
                        "failure_reason",
                        format!("failure_reason must be one of {}", FAILURE_REASONS.join(", ")),
                    ));
                }
                let (amount, currency, charge) = {
                    let r = &self.refunds[index];
                    (r.amount, r.currency.clone(), r.charge.clone())
                };
                let mut back = BalanceTxn::platform("refund_failure", amount, &currency, id, now);
                back.reporting_category = "refund_failure";
                let refund = &mut self.refunds[index];
                refund.status = "failed";
                refund.failure_reason = Some(reason.to_owned());
                refund.failure_balance_transaction = Some(back.id.clone());
                self.push_balance_txn(back);
                self.charges
                    .get_mut(&charge)
                    .expect("refunds name real charges")
                    .amount_refunded -= amount;
                true
            }
        };
        if !failed {
            self.refunds[index].status = "succeeded";
        }
        let json = refund_json(&self.refunds[index]);
        self.emit("charge.refund.updated", json.clone(), now);
        self.emit("refund.updated", json.clone(), now);
        if failed {
            self.emit("refund.failed", json.clone(), now);
        }
        Ok(json)
    }

    pub fn retrieve_refund(&self, id: &str) -> Result<Value, SimError> {
        self.refunds
            .iter()
            .find(|r| r.id == id)
            .map(refund_json)
            .ok_or_else(|| SimError::missing("refund", id, Some("refund")))
    }

    /// Newest first, filtered by `charge` or `payment_intent`.
    pub fn list_refunds(&self, query: &Form) -> Result<Value, SimError> {
        query.only(LIST_PARAMS)?;
        let limit = query.int("limit")?.unwrap_or(10);
        if !(1..=100).contains(&limit) {
            return Err(SimError::invalid("limit", "limit must be between 1 and 100"));
        }
        let charge = query.get("charge");
        let intent = query.get("payment_intent");
        let matching: Vec<&Refund> = self
            .refunds
            .iter()
            .rev()
            .filter(|r| charge.is_none_or(|c| r.charge == c))
            .filter(|r| intent.is_none_or(|pi| r.payment_intent == pi))
            .collect();
        page(&matching, query, limit, "/v1/refunds", |r| r.id.as_str(), refund_json)
    }

    /// A charge's refunds as Stripe nests them in the charge (`refunds`), newest first.
    pub(super) fn charge_refunds_json(&self, charge_id: &str) -> Value {
        let data: Vec<Value> = self
            .refunds
            .iter()
            .rev()
            .filter(|r| r.charge == charge_id)
            .map(refund_json)
            .collect();
        json!({ "object": "list", "data": data, "has_more": false, "url": format!("/v1/charges/{charge_id}/refunds") })
    }
}

pub(super) fn refund_json(r: &Refund) -> Value {
    let object = json!({
        "id": r.id, "object": "refund", "amount": r.amount, "balance_transaction": r.balance_transaction,
        "charge": r.charge, "created": r.created, "currency": r.currency, "metadata": r.metadata,
        "payment_intent": r.payment_intent, "reason": r.reason, "status": r.status,
        "failure_reason": r.failure_reason, "failure_balance_transaction": r.failure_balance_transaction,
        "pending_reason": if r.status == "pending" { json!("processing") } else { Value::Null },
    });
    with_nulls(
        object,
        &[
            "customer",
            "customer_account",
            "description",
            "destination_details",
            "instructions_email",
            "next_action",
            "payment_method",
            "presentment_details",
            "receipt_number",
            "source_transfer_reversal",
            "transfer_reversal",
        ],
    )
}
