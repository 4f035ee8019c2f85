//! Disputes (chargebacks) as Stripe runs them: a dispute opens on a succeeded charge (`charge.dispute.created`),
//! its amount and the dispute fee leave the platform balance at once (`charge.dispute.funds_withdrawn`, an
//! `adjustment` balance transaction), and it closes `won` (the amount comes back, and the fee where Stripe returns
//! it: `charge.dispute.funds_reinstated`) or `lost`, then `charge.dispute.closed`. A disputed charge cannot be
//! refunded. The charge's `pending` refunds fail when it is disputed, unless
//! [`super::SimConfig::pending_refunds_survive_disputes`] keeps them pending.

use serde_json::{json, Value};

use super::balance::BalanceTxn;
use super::{page, random_id, Model, SimError};
use crate::stripe::sim::form::Form;

/// Stripe's dispute reasons.
pub(super) const REASONS: &[&str] = &[
    "bank_cannot_process",
    "check_returned",
    "credit_not_processed",
    "customer_initiated",
    "debit_not_authorized",
    "duplicate",
    "fraudulent",
    "general",
    "incorrect_account_details",
    "insufficient_funds",
    "noncompliant",
    "product_not_received",
    "product_unacceptable",
    "subscription_canceled",
    "unrecognized",
];
const LIST_PARAMS: &[&str] = &[
    "charge",
    "created",
    "ending_before",
    "limit",
    "payment_intent",
    "starting_after",
];
/// How long the platform has to answer, as Stripe sets `evidence_details.due_by` (about three weeks).
const EVIDENCE_DUE_AFTER_SECS: i64 = 21 * 86_400;

#[derive(Debug, Clone)]
pub(super) struct Dispute {
    pub(super) id: String,
    pub(super) charge: String,
    pub(super) payment_intent: String,
    pub(super) amount: i64,
    pub(super) currency: String,
    pub(super) reason: String,
    /// `needs_response` → `won` | `lost`.
    pub(super) status: &'static str,
    pub(super) created: i64,
    /// The withdrawal, then the reinstatement if won.
    pub(super) balance_transactions: Vec<String>,
    pub(super) method_type: &'static str,
}

impl Dispute {
    /// Stripe: true only while a dispute is an inquiry (`warning_…`); once funds are withdrawn the charge
    /// cannot be refunded any more.
    pub(super) fn is_charge_refundable(&self) -> bool {
        self.status.starts_with("warning_")
    }
}

impl Model {
    pub(super) fn charge_dispute(&self, charge_id: &str) -> Option<&Dispute> {
        self.disputes.iter().find(|d| d.charge == charge_id)
    }

    /// Opens a dispute on a succeeded charge for what is left unrefunded, and withdraws that amount plus the
    /// dispute fee from the platform balance. A charge is disputed at most once.
    pub fn open_dispute(&mut self, charge_id: &str, reason: &str, now: i64) -> Result<Value, SimError> {
        if !REASONS.contains(&reason) {
            return Err(SimError::invalid(
                "reason",
                format!("reason must be one of {}", REASONS.join(", ")),
            ));
        }
        let charge = self
            .charges
            .get(charge_id)
            .ok_or_else(|| SimError::missing("charge", charge_id, Some("charge")))?;
        if charge.status != "succeeded" {
            return Err(SimError::invalid(
                "charge",
                format!("Charge {charge_id} has not succeeded, so it cannot be disputed."),
            ));
        }
        if self.charge_dispute(charge_id).is_some() {
            return Err(SimError::invalid(
                "charge",
                format!("Charge {charge_id} is already disputed."),
            ));
        }
        // Stripe: "a charge with a pending refund [that] is disputed by the cardholder's bank, the refund will
        // fail and a dispute will be created" (said of refunds pending for a short balance). The failed refunds'
        // money is back before the dispute takes it. With `pending_refunds_survive_disputes` they stay pending
        // (UNCONFIRMED for other pending reasons): the dispute then takes only what they left unrefunded.
        let failing: Vec<String> = if self.config.pending_refunds_survive_disputes {
            Vec::new()
        } else {
            self.refunds
                .iter()
                .filter(|r| r.charge == charge_id && r.status == "pending")
                .map(|r| r.id.clone())
                .collect()
        };
        for refund in failing {
            self.settle_refund(&refund, Err(Some("charge_for_pending_refund_disputed")), now)?;
        }
        let charge = &self.charges[charge_id];
        let amount = charge.amount - charge.amount_refunded;
        if amount <= 0 {
            return Err(SimError::invalid(
                "charge",
                format!("Charge {charge_id} is fully refunded, so it cannot be disputed."),
            ));
        }
        let id = random_id("dp");
        let mut dispute = Dispute {
            id: id.clone(),
            charge: charge_id.to_owned(),
            payment_intent: charge.payment_intent.clone(),
            amount,
            currency: charge.currency.clone(),
            reason: reason.to_owned(),
            status: "needs_response",
            created: now,
            balance_transactions: Vec::new(),
            method_type: charge.method_type,
        };
        self.charges.get_mut(charge_id).expect("checked above").disputed = true;
        let created = self.dispute_json(&dispute, now);
        self.emit("charge.dispute.created", created, now);
        // One balance transaction for the amount and the fee, as Stripe books it.
        let mut withdrawn = BalanceTxn::platform("adjustment", -amount, &dispute.currency, &id, now);
        withdrawn.fee = self.config.dispute_fee_cents;
        withdrawn.reporting_category = "dispute";
        dispute.balance_transactions.push(withdrawn.id.clone());
        self.push_balance_txn(withdrawn);
        let json = self.dispute_json(&dispute, now);
        self.disputes.push(dispute);
        self.emit("charge.dispute.funds_withdrawn", json.clone(), now);
        Ok(json)
    }

    /// Decides an open dispute. Won: the amount comes back (and the fee, if `dispute_fee_returned_if_won`),
    /// `charge.dispute.funds_reinstated`, then `charge.dispute.closed`. Lost: `charge.dispute.closed` only.
    pub fn close_dispute(&mut self, charge_id: &str, won: bool, now: i64) -> Result<Value, SimError> {
        let index = self
            .disputes
            .iter()
            .position(|d| d.charge == charge_id)
            .ok_or_else(|| SimError::missing("dispute for charge", charge_id, Some("charge")))?;
        if ["won", "lost"].contains(&self.disputes[index].status) {
            return Err(SimError::invalid(
                "outcome",
                format!(
                    "The dispute on {charge_id} is already closed ({}).",
                    self.disputes[index].status
                ),
            ));
        }
        if won {
            let fee_back = if self.config.dispute_fee_returned_if_won {
                self.config.dispute_fee_cents
            } else {
                0
            };
            let d = &self.disputes[index];
            let mut reinstated = BalanceTxn::platform("adjustment", d.amount, &d.currency, &d.id, now);
            // A returned fee is a negative fee: the net is the amount plus the fee.
            reinstated.fee = -fee_back;
            reinstated.reporting_category = "dispute_reversal";
            let d = &mut self.disputes[index];
            d.status = "won";
            d.balance_transactions.push(reinstated.id.clone());
            self.push_balance_txn(reinstated);
            let json = self.dispute_json(&self.disputes[index], now);
            self.emit("charge.dispute.funds_reinstated", json, now);
        } else {
            self.disputes[index].status = "lost";
        }
        let json = self.dispute_json(&self.disputes[index], now);
        self.emit("charge.dispute.closed", json.clone(), now);
        Ok(json)
    }

    pub(super) fn dispute_json(&self, d: &Dispute, now: i64) -> Value {
        let balance_transactions: Vec<Value> = d
            .balance_transactions
            .iter()
            .filter_map(|id| self.balance_txn(id))
            .map(|b| self.balance_txn_json(b, now))
            .collect();
        let evidence_fields = [
            "access_activity_log",
            "billing_address",
            "cancellation_policy",
            "cancellation_policy_disclosure",
            "cancellation_rebuttal",
            "customer_communication",
            "customer_email_address",
            "customer_name",
            "customer_purchase_ip",
            "customer_signature",
            "duplicate_charge_documentation",
            "duplicate_charge_explanation",
            "duplicate_charge_id",
            "product_description",
            "receipt",
            "refund_policy",
            "refund_policy_disclosure",
            "refund_refusal_explanation",
            "service_date",
            "service_documentation",
            "shipping_address",
            "shipping_carrier",
            "shipping_date",
            "shipping_documentation",
            "shipping_tracking_number",
            "uncategorized_file",
            "uncategorized_text",
        ];
        let mut evidence = serde_json::Map::new();
        for field in evidence_fields {
            evidence.insert(field.to_owned(), Value::Null);
        }
        evidence.insert("enhanced_evidence".to_owned(), json!({}));
        let payment_method_details = match d.method_type {
            "card" => {
                json!({ "type": "card", "card": { "brand": "visa", "case_type": "chargeback", "network": "visa", "network_reason_code": null } })
            }
            // async-stripe knows card, amazon_pay, klarna and paypal details; a bank debit's are left null.
            _ => Value::Null,
        };
        json!({
            "id": d.id,
            "object": "dispute",
            "amount": d.amount,
            "balance_transactions": balance_transactions,
            "charge": d.charge,
            "created": d.created,
            "currency": d.currency,
            "enhanced_eligibility_types": [],
            "evidence": evidence,
            "evidence_details": {
                "due_by": d.created + EVIDENCE_DUE_AFTER_SECS,
                "enhanced_eligibility": {},
                "has_evidence": false,
                "past_due": false,
                "submission_count": 0,
            },
            "is_charge_refundable": d.is_charge_refundable(),
            "livemode": false,
            "metadata": {},
            "network_reason_code": null,
            "payment_intent": d.payment_intent,
            "payment_method_details": payment_method_details,
            "reason": d.reason,
            "status": d.status,
        })
    }

    pub fn retrieve_dispute(&self, id: &str, now: i64) -> Result<Value, SimError> {
        self.disputes
            .iter()
            .find(|d| d.id == id)
            .map(|d| self.dispute_json(d, now))
            .ok_or_else(|| SimError::missing("dispute", id, Some("dispute")))
    }

    /// Newest first, filtered by `charge` or `payment_intent`.
    pub fn list_disputes(&self, query: &Form, now: i64) -> Result<Value, SimError> {
        query.only(LIST_PARAMS)?;
        let limit = query.int("limit")?.unwrap_or(10);
        if !(1..=100).contains(&limit) {
            return Err(SimError::invalid("limit", "limit must be between 1 and 100"));
        }
        let charge = query.get("charge");
        let intent = query.get("payment_intent");
        let matching: Vec<&Dispute> = self
            .disputes
            .iter()
            .rev()
            .filter(|d| charge.is_none_or(|c| d.charge == c))
            .filter(|d| intent.is_none_or(|pi| d.payment_intent == pi))
            .collect();
        page(
            &matching,
            query,
            limit,
            "/v1/disputes",
            |d| d.id.as_str(),
            |d| self.dispute_json(d, now),
        )
    }
}
