//! The platform balance: balance transactions (charges, transfers, refunds, top-ups) and what is available or
//! pending at the simulator's clock.

use serde_json::{json, Value};

use super::{random_id, Model};

#[derive(Debug, Clone)]
pub(super) struct BalanceTxn {
    pub(super) id: String,
    pub(super) amount: i64,
    pub(super) fee: i64,
    pub(super) currency: String,
    pub(super) created: i64,
    pub(super) available_on: i64,
    pub(super) type_: &'static str,
    pub(super) source: String,
}

impl Model {
    pub(super) fn balance_txn_json(&self, b: &BalanceTxn, now: i64) -> Value {
        let fee_details = if b.fee > 0 {
            json!([{ "amount": b.fee, "currency": b.currency, "type": "stripe_fee", "description": "Stripe processing fees", "application": null }])
        } else {
            json!([])
        };
        json!({
            "id": b.id,
            "object": "balance_transaction",
            "amount": b.amount,
            "available_on": b.available_on,
            "balance_type": "payments",
            "created": b.created,
            "currency": b.currency,
            "description": null,
            "exchange_rate": null,
            "fee": b.fee,
            "fee_details": fee_details,
            "net": b.amount - b.fee,
            "reporting_category": b.type_,
            "source": b.source,
            "status": if b.available_on <= now { "available" } else { "pending" },
            "type": b.type_,
        })
    }

    pub fn balance_of(&self, currency: &str, now: i64) -> (i64, i64) {
        self.balance_txns
            .iter()
            .filter(|b| b.currency == currency)
            .fold((0, 0), |(available, pending), b| {
                let net = b.amount - b.fee;
                if b.available_on <= now {
                    (available + net, pending)
                } else {
                    (available, pending + net)
                }
            })
    }

    pub fn balance_json(&self, now: i64) -> Value {
        let mut currencies: Vec<&str> = self.balance_txns.iter().map(|b| b.currency.as_str()).collect();
        currencies.sort();
        currencies.dedup();
        let (mut available, mut pending) = (Vec::new(), Vec::new());
        for c in currencies {
            let (a, p) = self.balance_of(c, now);
            available.push(json!({ "amount": a, "currency": c }));
            pending.push(json!({ "amount": p, "currency": c }));
        }
        json!({ "object": "balance", "available": available, "connect_reserved": [], "pending": pending, "livemode": false })
    }

    /// Adds available funds to the platform balance (a top-up), for transfers without a source transaction.
    pub fn top_up(&mut self, currency: &str, amount: i64, now: i64) {
        self.balance_txns.push(BalanceTxn {
            id: random_id("txn"),
            amount,
            fee: 0,
            currency: currency.to_owned(),
            created: now,
            available_on: now,
            type_: "topup",
            source: random_id("tu"),
        });
    }
}
