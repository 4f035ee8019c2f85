//! Balances: the platform's and each connected account's, as balance transactions (charges, transfers,
//! reversals, refunds, disputes, top-ups, payouts), and what is available or pending at the simulator's clock.

use serde_json::{json, Value};

use super::{random_id, with_nulls, Model, SimError};

#[derive(Debug, Clone)]
pub(super) struct BalanceTxn {
    pub(super) id: String,
    /// `None`: the platform's balance; `Some(acct_…)`: a connected account's.
    pub(super) account: Option<String>,
    pub(super) amount: i64,
    /// Stripe's fee, positive when charged, negative when returned (a won dispute's fee).
    pub(super) fee: i64,
    pub(super) currency: String,
    pub(super) created: i64,
    pub(super) available_on: i64,
    pub(super) type_: &'static str,
    pub(super) reporting_category: &'static str,
    pub(super) source: String,
}

impl BalanceTxn {
    /// A platform balance transaction available at once, with no fee; callers adjust the rest.
    pub(super) fn platform(type_: &'static str, amount: i64, currency: &str, source: &str, now: i64) -> Self {
        Self {
            id: random_id("txn"),
            account: None,
            amount,
            fee: 0,
            currency: currency.to_owned(),
            created: now,
            available_on: now,
            type_,
            reporting_category: type_,
            source: source.to_owned(),
        }
    }
}

impl Model {
    pub(super) fn balance_txn_json(&self, b: &BalanceTxn, now: i64) -> Value {
        let description = match b.type_ {
            "adjustment" => "Dispute fee",
            _ => "Stripe processing fees",
        };
        let fee_details = if b.fee != 0 {
            json!([{ "amount": b.fee, "currency": b.currency, "type": "stripe_fee", "description": description, "application": null }])
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
            "reporting_category": b.reporting_category,
            "source": b.source,
            "status": if b.available_on <= now { "available" } else { "pending" },
            "type": b.type_,
        })
    }

    /// Appends a balance transaction (and indexes it by id).
    pub(super) fn push_balance_txn(&mut self, bt: BalanceTxn) {
        self.balance_txn_index.insert(bt.id.clone(), self.balance_txns.len());
        self.balance_txns.push(bt);
    }

    pub(super) fn balance_txn(&self, id: &str) -> Option<&BalanceTxn> {
        self.balance_txn_index.get(id).map(|&i| &self.balance_txns[i])
    }

    /// `GET /v1/balance_transactions/{id}` (the platform's and connected accounts' alike: the simulator has one key).
    pub fn retrieve_balance_txn(&self, id: &str, now: i64) -> Result<Value, SimError> {
        self.balance_txn(id)
            .map(|b| self.balance_txn_json(b, now))
            .ok_or_else(|| SimError::missing("balance transaction", id, Some("id")))
    }

    /// `(available, pending)` of the platform (`account: None`) or a connected account, in `currency`.
    pub fn balance_of_account(&self, account: Option<&str>, currency: &str, now: i64) -> (i64, i64) {
        self.balance_txns
            .iter()
            .filter(|b| b.currency == currency && b.account.as_deref() == account)
            .fold((0, 0), |(available, pending), b| {
                let net = b.amount - b.fee;
                if b.available_on <= now {
                    (available + net, pending)
                } else {
                    (available, pending + net)
                }
            })
    }

    /// The platform's `(available, pending)` in `currency`.
    pub fn balance_of(&self, currency: &str, now: i64) -> (i64, i64) {
        self.balance_of_account(None, currency, now)
    }

    /// Stripe's balance object for the platform (`None`) or a connected account.
    pub fn balance_json_of(&self, account: Option<&str>, now: i64) -> Value {
        let mut currencies: Vec<&str> = self
            .balance_txns
            .iter()
            .filter(|b| b.account.as_deref() == account)
            .map(|b| b.currency.as_str())
            .collect();
        currencies.sort();
        currencies.dedup();
        let (mut available, mut pending) = (Vec::new(), Vec::new());
        for c in currencies {
            let (a, p) = self.balance_of_account(account, c, now);
            available.push(json!({ "amount": a, "currency": c }));
            pending.push(json!({ "amount": p, "currency": c }));
        }
        json!({ "object": "balance", "available": available, "connect_reserved": [], "pending": pending, "livemode": false })
    }

    pub fn balance_json(&self, now: i64) -> Value {
        self.balance_json_of(None, now)
    }

    /// `GET /v1/balance` with a `Stripe-Account` header: that connected account's balance.
    pub fn connected_balance_json(&self, account: &str, now: i64) -> Result<Value, SimError> {
        if !self.accounts.contains_key(account) {
            return Err(SimError::refused(
                403,
                "account_invalid",
                format!(
                    "The provided key does not have access to account '{account}' (or that account does not exist)."
                ),
                None,
            ));
        }
        Ok(self.balance_json_of(Some(account), now))
    }

    /// Adds available funds to the platform balance (a top-up), for transfers without a source transaction.
    pub fn top_up(&mut self, currency: &str, amount: i64, now: i64) {
        let source = random_id("tu");
        self.push_balance_txn(BalanceTxn::platform("topup", amount, currency, &source, now));
    }

    /// Pays `amount` of a connected account's available balance out to its bank (the control call; Stripe's
    /// automatic payouts do the same). Refused like Stripe refuses a payout above the available balance:
    /// `balance_insufficient`. Emits `payout.created` and `payout.paid` on the connected account's behalf.
    pub fn payout(&mut self, account: &str, currency: &str, amount: i64, now: i64) -> Result<Value, SimError> {
        if amount <= 0 {
            return Err(SimError::invalid("amount", "Amount must be a positive integer."));
        }
        if !self.accounts.contains_key(account) {
            return Err(SimError::missing("account", account, None));
        }
        let (available, _) = self.balance_of_account(Some(account), currency, now);
        if available < amount {
            return Err(SimError::refused(
                400,
                "balance_insufficient",
                "You have insufficient funds in your Stripe account for this transfer. Your card balance is too low.  You can use the /v1/balance endpoint to view your Stripe balance (for more details, see stripe.com/docs/api#balance).",
                Some("amount"),
            ));
        }
        let id = random_id("po");
        let mut bt = BalanceTxn::platform("payout", -amount, currency, &id, now);
        bt.account = Some(account.to_owned());
        let payout = json!({
            "id": id, "object": "payout", "amount": amount, "arrival_date": now, "automatic": false,
            "balance_transaction": bt.id, "created": now, "currency": currency, "description": null,
            "destination": null, "failure_balance_transaction": null, "failure_code": null, "failure_message": null,
            "livemode": false, "metadata": {}, "method": "standard", "source_type": "card",
            "statement_descriptor": null, "status": "paid", "type": "bank_account",
            // Stripe reconciles only automatic payouts.
            "reconciliation_status": "not_applicable",
        });
        let payout = with_nulls(
            payout,
            &[
                "application_fee",
                "application_fee_amount",
                "original_payout",
                "payout_method",
                "reversed_by",
                "trace_id",
            ],
        );
        self.push_balance_txn(bt);
        self.emit_for(Some(account), "payout.created", payout.clone(), now);
        self.emit_for(Some(account), "payout.paid", payout.clone(), now);
        Ok(payout)
    }
}
