//! The simulator's state and Stripe's rules, without HTTP, one file per resource: PaymentIntents (card,
//! au_becs_debit, payto), their charges and balance transactions, connected accounts, the platform balance,
//! transfers and reversals, connected accounts' balances and payouts, refunds, disputes, and the events every
//! state change emits. Times are the simulator's clock
//! (unix seconds), which tests advance.

mod accounts;
mod balance;
mod charges;
mod config;
mod disputes;
mod error;
mod events;
mod payment_intents;
mod payment_methods;
mod refunds;
mod transfers;

use std::collections::HashMap;

use serde_json::{json, Value};

use super::form::Form;

pub use config::{FeeRule, SimConfig};
pub use error::SimError;
pub use events::Event;

use accounts::Account;
use balance::BalanceTxn;
use charges::Charge;
use disputes::Dispute;
use payment_intents::PaymentIntent;
use refunds::Refund;
use transfers::Transfer;

pub(super) fn random_id(prefix: &str) -> String {
    let raw = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &raw[..24])
}

#[derive(Debug, Default)]
pub struct Model {
    pub config: SimConfig,
    intents: HashMap<String, PaymentIntent>,
    charges: HashMap<String, Charge>,
    balance_txns: Vec<BalanceTxn>,
    /// Where each balance transaction is in `balance_txns` (appended only), so a lookup does not scan them all.
    balance_txn_index: HashMap<String, usize>,
    accounts: HashMap<String, Account>,
    transfers: Vec<Transfer>,
    transfer_index: HashMap<String, usize>,
    /// The amount transferred so far from each source_transaction (what a new transfer's cap is checked against).
    transferred_from: HashMap<String, i64>,
    /// The earliest time something may fall due (a debit settling, a balance transaction booked, a dispute opening,
    /// a capability activating); `None`: nothing waits. `tick` scans only once it has come: every request ticks, and
    /// a scan of every intent and charge per request made the simulator's cost grow with its history.
    next_due_at: Option<i64>,
    /// In creation order.
    refunds: Vec<Refund>,
    /// In creation order; at most one per charge.
    disputes: Vec<Dispute>,
    events: Vec<Event>,
    /// Events not yet handed to the webhook deliverer.
    undelivered: Vec<Event>,
}

impl Model {
    pub fn new(config: SimConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    fn emit(&mut self, type_: &str, object: Value, now: i64) {
        self.emit_for(None, type_, object, now);
    }

    /// Emits an event about `account` (a Connect event) or, with `None`, a platform event.
    fn emit_for(&mut self, account: Option<&str>, type_: &str, object: Value, now: i64) {
        let event = Event {
            id: random_id("evt"),
            type_: type_.to_owned(),
            created: now,
            object,
            account: account.map(str::to_owned),
        };
        self.events.push(event.clone());
        self.undelivered.push(event);
    }

    pub fn take_undelivered(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.undelivered)
    }

    /// Notes that something falls due at `at` (see `next_due_at`).
    fn due_at(next_due_at: &mut Option<i64>, at: i64) {
        *next_due_at = Some(next_due_at.map_or(at, |d| d.min(at)));
    }

    /// Moves time-driven state on: due debits settle, delayed balance transactions appear.
    pub fn tick(&mut self, now: i64) {
        if self.next_due_at.is_none_or(|at| at > now) {
            return;
        }
        self.next_due_at = None;
        self.tick_due(now);
        // What is still waiting (the earliest of it) once the due things moved on.
        let waiting = self
            .intents
            .values()
            .filter_map(|pi| pi.settle_at)
            .chain(
                self.charges
                    .values()
                    .flat_map(|c| [c.balance_transaction_due, c.dispute_due])
                    .flatten(),
            )
            .chain(self.accounts.values().filter_map(|a| a.transfers_activate_at));
        for at in waiting.collect::<Vec<_>>() {
            Self::due_at(&mut self.next_due_at, at);
        }
    }

    fn tick_due(&mut self, now: i64) {
        let mut due: Vec<String> = self
            .intents
            .values()
            .filter(|pi| pi.settle_at.is_some_and(|at| at <= now))
            .map(|pi| pi.id.clone())
            .collect();
        due.sort();
        for id in due {
            let _ = self.settle(&id, None, now);
        }
        let mut booked: Vec<String> = self
            .charges
            .values()
            .filter(|c| c.balance_transaction_due.is_some_and(|at| at <= now))
            .map(|c| c.id.clone())
            .collect();
        booked.sort();
        for id in booked {
            self.book_charge_balance(&id, now);
            let charge_json = self.charge_json(&self.charges[&id], &[], now);
            self.emit("charge.updated", charge_json, now);
        }
        let mut disputed: Vec<String> = self
            .charges
            .values()
            .filter(|c| c.dispute_due.is_some_and(|at| at <= now))
            .map(|c| c.id.clone())
            .collect();
        disputed.sort();
        for id in disputed {
            self.charges.get_mut(&id).expect("listed above").dispute_due = None;
            // A charge refunded in full meanwhile cannot be disputed any more.
            let _ = self.open_dispute(&id, "debit_not_authorized", now);
        }
        self.activate_due_capabilities(now);
    }
}

/// Adds `fields` as nulls: the top-level fields of Stripe's object that splitpay has no use for. Stripe's clients
/// expect every field to be present; null is always safe (async-stripe needs a non-null nested object complete).
pub(super) fn with_nulls(mut object: Value, fields: &[&str]) -> Value {
    if let Some(map) = object.as_object_mut() {
        for field in fields {
            map.entry(*field).or_insert(Value::Null);
        }
    }
    object
}

/// One page of a Stripe list, newest first, as Stripe reads `limit`, `starting_after` (the page after an object:
/// older ones) and `ending_before` (the page before it: newer ones, still newest first).
pub(super) fn page<T>(
    items: &[&T],
    query: &Form,
    limit: i64,
    url: &str,
    id_of: impl Fn(&T) -> &str,
    render: impl Fn(&T) -> Value,
) -> Result<Value, SimError> {
    let limit = limit as usize;
    let position = |cursor: &str, param: &str| {
        items
            .iter()
            .position(|item| id_of(item) == cursor)
            .ok_or_else(|| SimError::invalid(param, format!("No such object: '{cursor}'")))
    };
    let (start, end) = match (query.optional("starting_after")?, query.optional("ending_before")?) {
        (Some(_), Some(_)) => {
            return Err(SimError {
                code: Some("parameters_exclusive".into()),
                ..SimError::invalid(
                    "ending_before",
                    "You may only specify one of these parameters: ending_before, starting_after.",
                )
            })
        }
        (Some(after), None) => {
            let start = position(after, "starting_after")? + 1;
            (start, (start + limit).min(items.len()))
        }
        (None, Some(before)) => {
            let end = position(before, "ending_before")?;
            (end.saturating_sub(limit), end)
        }
        (None, None) => (0, limit.min(items.len())),
    };
    let data: Vec<Value> = items[start..end].iter().map(|item| render(item)).collect();
    // Stripe's has_more: more objects lie in the direction of travel.
    let has_more = if query.get("ending_before").is_some() {
        start > 0
    } else {
        end < items.len()
    };
    Ok(json!({ "object": "list", "data": data, "has_more": has_more, "url": url }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stripe::sim::form::Form;

    fn becs_debit(model: &mut Model, account: &str, now: i64) -> String {
        let form = Form::parse(
            format!(
                "amount=1000&currency=aud&payment_method_types[]=au_becs_debit&confirm=true\
                 &payment_method=pm_becs_{account}"
            )
            .as_bytes(),
        );
        let pi = model.create_intent(&form, now).unwrap();
        assert_eq!(pi["status"], "processing");
        pi["id"].as_str().unwrap().to_owned()
    }

    /// `tick` scans only once something is due, and what it leaves waiting still falls due: the earliest pending
    /// time is kept through settling, booking and a dispute that comes after the debit.
    #[test]
    fn tick_scans_only_when_something_is_due_and_loses_nothing_waiting() {
        let config = SimConfig::default();
        let (settle, booked, disputed) = (
            config.becs_settle_secs,
            config.balance_transaction_delay_secs,
            config.becs_dispute_after_secs,
        );
        let mut model = Model::new(config);
        let now = 1_000_000;
        assert_eq!(model.next_due_at, None, "nothing waits on an empty simulator");
        let slow = becs_debit(&mut model, "000123456", now);
        let disputed_debit = becs_debit(&mut model, "666666660", now + 1);
        assert_eq!(model.next_due_at, Some(now + settle));
        model.tick(now + settle - 1);
        assert_eq!(model.intents[&slow].status, "processing", "not due yet");
        model.tick(now + settle);
        assert_eq!(model.intents[&slow].status, "succeeded");
        assert_eq!(model.intents[&disputed_debit].status, "processing");
        assert_eq!(model.next_due_at, Some(now + 1 + settle), "the other debit is next");
        model.tick(now + 1 + settle);
        assert_eq!(model.intents[&disputed_debit].status, "succeeded");
        let charge = model.intents[&disputed_debit].latest_charge.clone().unwrap();
        let expected_next = [booked, disputed]
            .into_iter()
            .filter(|&s| s > 0)
            .map(|s| now + 1 + settle + s)
            .min();
        assert_eq!(model.next_due_at, expected_next);
        assert!(model.disputes.is_empty());
        model.tick(now + 1 + settle + disputed);
        assert_eq!(model.disputes.iter().filter(|d| d.charge == charge).count(), 1);
        // A debit's balance transaction is booked by then too, and nothing waits any more.
        model.tick(now + 1 + settle + disputed.max(booked));
        assert_eq!(model.next_due_at, None);
    }
}
