//! The simulator's state and Stripe's rules, without HTTP: PaymentIntents (card, au_becs_debit, payto) and their
//! charges and balance transactions, connected accounts, the platform balance, transfers and reversals, refunds,
//! and the events every state change emits. Times are the simulator's clock (unix seconds), which tests advance.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use super::form::{Form, ParamError};

/// Stripe's fee for a payment method: basis points of the amount (half-up) plus a fixed part, optionally capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct FeeRule {
    pub rate_bps: i64,
    pub fixed_cents: i64,
    pub cap_cents: Option<i64>,
}

impl FeeRule {
    pub fn fee_cents(&self, amount_cents: i64) -> i64 {
        let fee = (amount_cents * self.rate_bps + 5_000) / 10_000 + self.fixed_cents;
        self.cap_cents.map_or(fee, |cap| fee.min(cap)).min(amount_cents)
    }
}

/// How the simulator behaves; every field can be changed at run time through `/_sim/config`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct SimConfig {
    /// Domestic AU card pricing by default.
    pub card_fee: FeeRule,
    /// BECS: 1% + 30c, capped at A$3.50.
    pub becs_fee: FeeRule,
    pub payto_fee: FeeRule,
    /// How long an ordinary BECS debit stays `processing`.
    pub becs_settle_secs: i64,
    /// The "after 3 minutes" BECS test accounts.
    pub becs_delayed_settle_secs: i64,
    pub payto_settle_secs: i64,
    /// Asynchronous capture: a succeeded charge's `balance_transaction` stays null this long (0: at once).
    pub balance_transaction_delay_secs: i64,
    /// Pending period of charge funds before they are available.
    pub available_after_secs: i64,
    pub idempotency_ttl_secs: i64,
    /// New connected accounts that request `transfers` get it active at once.
    pub auto_activate_transfers: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            card_fee: FeeRule {
                rate_bps: 175,
                fixed_cents: 30,
                cap_cents: None,
            },
            becs_fee: FeeRule {
                rate_bps: 100,
                fixed_cents: 30,
                cap_cents: Some(350),
            },
            payto_fee: FeeRule {
                rate_bps: 100,
                fixed_cents: 30,
                cap_cents: Some(350),
            },
            becs_settle_secs: 5,
            becs_delayed_settle_secs: 180,
            payto_settle_secs: 3,
            balance_transaction_delay_secs: 0,
            available_after_secs: 2 * 86_400,
            idempotency_ttl_secs: 86_400,
            auto_activate_transfers: true,
        }
    }
}

/// A Stripe error response.
#[derive(Debug, Clone, PartialEq)]
pub struct SimError {
    pub status: u16,
    pub kind: &'static str,
    pub code: Option<String>,
    pub message: String,
    pub param: Option<String>,
    pub decline_code: Option<String>,
    pub should_retry: Option<bool>,
    /// Whether Stripe saves this response for the idempotency key (it does once the endpoint began executing;
    /// not for parameter validation).
    pub saved: bool,
    pub payment_intent: Option<Value>,
}

impl SimError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            kind: "invalid_request_error",
            code: Some("parameter_invalid".into()),
            message: message.into(),
            param: Some(param.to_owned()),
            decline_code: None,
            should_retry: Some(false),
            saved: false,
            payment_intent: None,
        }
    }

    pub fn missing(what: &str, id: &str, param: Option<&str>) -> Self {
        Self {
            status: 404,
            kind: "invalid_request_error",
            code: Some("resource_missing".into()),
            message: format!("No such {what}: '{id}'"),
            param: param.map(str::to_owned),
            decline_code: None,
            should_retry: Some(false),
            saved: true,
            payment_intent: None,
        }
    }

    /// A refusal made while executing (saved for the idempotency key).
    pub fn refused(status: u16, code: &str, message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status,
            kind: "invalid_request_error",
            code: Some(code.to_owned()),
            message: message.into(),
            param: param.map(str::to_owned),
            decline_code: None,
            should_retry: Some(false),
            saved: true,
            payment_intent: None,
        }
    }

    pub fn body(&self) -> Value {
        let mut error = json!({ "type": self.kind, "message": self.message });
        if let Some(code) = &self.code {
            error["code"] = json!(code);
            error["doc_url"] = json!(format!("https://stripe.com/docs/error-codes/{code}"));
        }
        if let Some(param) = &self.param {
            error["param"] = json!(param);
        }
        if let Some(decline) = &self.decline_code {
            error["decline_code"] = json!(decline);
        }
        if let Some(pi) = &self.payment_intent {
            error["payment_intent"] = pi.clone();
        }
        json!({ "error": error })
    }
}

impl From<ParamError> for SimError {
    fn from(e: ParamError) -> Self {
        SimError::invalid(&e.param, e.message)
    }
}

/// What a PaymentMethod does when a PaymentIntent is confirmed with it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Behaviour {
    Card {
        decline_code: Option<&'static str>,
        bypass_pending: bool,
    },
    /// A bank debit (BECS, PayTo): `processing` until `after_secs`, then success or failure.
    Debit {
        after_secs: i64,
        failure: Option<(&'static str, &'static str)>,
        dispute: bool,
    },
}

#[derive(Debug, Clone)]
struct PaymentIntent {
    id: String,
    amount: i64,
    currency: String,
    created: i64,
    status: &'static str,
    allowed_types: Vec<String>,
    transfer_group: Option<String>,
    metadata: BTreeMap<String, String>,
    payment_method: Option<String>,
    behaviour: Option<Behaviour>,
    latest_charge: Option<String>,
    last_error: Option<Value>,
    client_secret: String,
    settle_at: Option<i64>,
}

#[derive(Debug, Clone)]
struct Charge {
    id: String,
    amount: i64,
    currency: String,
    created: i64,
    status: &'static str,
    payment_intent: String,
    transfer_group: Option<String>,
    method_type: &'static str,
    amount_refunded: i64,
    balance_transaction: Option<String>,
    /// Asynchronous capture: when the balance transaction appears.
    balance_transaction_due: Option<i64>,
    fee: i64,
    available_on: i64,
    failure_code: Option<String>,
    failure_message: Option<String>,
    disputed: bool,
    metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
struct BalanceTxn {
    id: String,
    amount: i64,
    fee: i64,
    currency: String,
    created: i64,
    available_on: i64,
    type_: &'static str,
    source: String,
}

#[derive(Debug, Clone)]
struct Account {
    id: String,
    created: i64,
    transfers: String,
    deleted: bool,
    country: String,
}

#[derive(Debug, Clone)]
struct Reversal {
    id: String,
    amount: i64,
    created: i64,
    metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
struct Transfer {
    id: String,
    amount: i64,
    currency: String,
    destination: String,
    source_transaction: Option<String>,
    transfer_group: Option<String>,
    metadata: BTreeMap<String, String>,
    created: i64,
    reversals: Vec<Reversal>,
    balance_transaction: String,
}

#[derive(Debug, Clone)]
struct Refund {
    id: String,
    amount: i64,
    currency: String,
    charge: String,
    payment_intent: String,
    created: i64,
    metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub id: String,
    pub type_: String,
    pub created: i64,
    pub object: Value,
}

impl Event {
    pub fn json(&self) -> Value {
        json!({
            "id": self.id,
            "object": "event",
            "api_version": stripe_shared::version::VERSION.as_str(),
            "created": self.created,
            "data": { "object": self.object },
            "livemode": false,
            "pending_webhooks": 1,
            "request": { "id": null, "idempotency_key": null },
            "type": self.type_,
        })
    }
}

fn random_id(prefix: &str) -> String {
    let raw = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &raw[..24])
}

/// The test BECS account numbers of Stripe's docs (BSB 000-000) and what each does.
fn becs_behaviour(account_number: &str) -> Option<Behaviour> {
    let debit = |after_secs, failure, dispute| Behaviour::Debit {
        after_secs,
        failure,
        dispute,
    };
    Some(match account_number {
        "000123456" => debit(-1, None, false),
        "900123456" => debit(-2, None, false),
        "111111113" => debit(
            -1,
            Some(("account_closed", "The customer's bank account has been closed.")),
            false,
        ),
        "111111116" => debit(
            -1,
            Some(("no_account", "The customer's bank account could not be located.")),
            false,
        ),
        "222222227" => debit(
            -1,
            Some(("refer_to_customer", "The customer's bank refused the debit.")),
            false,
        ),
        "922222227" => debit(
            -2,
            Some(("refer_to_customer", "The customer's bank refused the debit.")),
            false,
        ),
        "333333335" => debit(
            -1,
            Some((
                "debit_not_authorized",
                "The customer notified their bank that the debit was unauthorized.",
            )),
            false,
        ),
        "666666660" => debit(-1, None, true),
        "343434343" => debit(
            -1,
            Some(("charge_exceeds_source_limit", "The debit exceeds the account's limit.")),
            false,
        ),
        "121212121" => debit(
            -1,
            Some((
                "charge_exceeds_transaction_limit",
                "The debit exceeds the transaction limit.",
            )),
            false,
        ),
        _ => return None,
    })
}

/// PaymentMethod ids the simulator knows. Cards use Stripe's test ids; BECS uses `pm_becs_{account number}` (or
/// `payment_method_data` with the account number); PayTo uses `pm_payto_success` / `pm_payto_declined`.
fn payment_method_behaviour(pm: &str) -> Option<(&'static str, Behaviour)> {
    let card = |decline_code, bypass_pending| {
        (
            "card",
            Behaviour::Card {
                decline_code,
                bypass_pending,
            },
        )
    };
    Some(match pm {
        "pm_card_visa" | "pm_card_mastercard" | "pm_card_au" => card(None, false),
        "pm_card_bypassPending" => card(None, true),
        "pm_card_chargeDeclined" => card(Some("generic_decline"), false),
        "pm_card_chargeDeclinedInsufficientFunds" => card(Some("insufficient_funds"), false),
        "pm_payto_success" => (
            "payto",
            Behaviour::Debit {
                after_secs: -3,
                failure: None,
                dispute: false,
            },
        ),
        "pm_payto_declined" => (
            "payto",
            Behaviour::Debit {
                after_secs: -3,
                failure: Some((
                    "payment_method_provider_decline",
                    "The payer declined the PayTo mandate.",
                )),
                dispute: false,
            },
        ),
        _ => {
            let account = pm.strip_prefix("pm_becs_")?;
            ("au_becs_debit", becs_behaviour(account)?)
        }
    })
}

#[derive(Debug, Default)]
pub struct Model {
    pub config: SimConfig,
    intents: HashMap<String, PaymentIntent>,
    charges: HashMap<String, Charge>,
    balance_txns: Vec<BalanceTxn>,
    accounts: HashMap<String, Account>,
    transfers: Vec<Transfer>,
    transfer_index: HashMap<String, usize>,
    refunds: HashMap<String, Refund>,
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
        let event = Event {
            id: random_id("evt"),
            type_: type_.to_owned(),
            created: now,
            object,
        };
        self.events.push(event.clone());
        self.undelivered.push(event);
    }

    pub fn take_undelivered(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.undelivered)
    }

    // ---- rendering ----

    fn intent_json(&self, pi: &PaymentIntent, expand: &[String], now: i64) -> Value {
        let latest_charge = match (&pi.latest_charge, expand.iter().any(|e| e.starts_with("latest_charge"))) {
            (Some(id), true) => {
                let nested: Vec<String> = expand
                    .iter()
                    .filter_map(|e| e.strip_prefix("latest_charge.").map(str::to_owned))
                    .collect();
                self.charges
                    .get(id)
                    .map_or(Value::Null, |c| self.charge_json(c, &nested, now))
            }
            (Some(id), false) => json!(id),
            (None, _) => Value::Null,
        };
        json!({
            "id": pi.id,
            "object": "payment_intent",
            "amount": pi.amount,
            "amount_capturable": 0,
            "amount_received": if pi.status == "succeeded" { pi.amount } else { 0 },
            "capture_method": "automatic_async",
            "client_secret": pi.client_secret,
            "confirmation_method": "automatic",
            "created": pi.created,
            "currency": pi.currency,
            "description": null,
            "last_payment_error": pi.last_error,
            "latest_charge": latest_charge,
            "livemode": false,
            "metadata": pi.metadata,
            "payment_method": pi.payment_method,
            "payment_method_types": pi.allowed_types,
            "status": pi.status,
            "transfer_group": pi.transfer_group,
        })
    }

    fn charge_json(&self, c: &Charge, expand: &[String], now: i64) -> Value {
        let bt = match &c.balance_transaction {
            Some(id) if expand.iter().any(|e| e == "balance_transaction") => self
                .balance_txns
                .iter()
                .find(|b| &b.id == id)
                .map_or(Value::Null, |b| self.balance_txn_json(b, now)),
            Some(id) => json!(id),
            None => Value::Null,
        };
        json!({
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
            "status": c.status,
            "transfer_group": c.transfer_group,
        })
    }

    fn balance_txn_json(&self, b: &BalanceTxn, now: i64) -> Value {
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
            "fee": b.fee,
            "fee_details": fee_details,
            "net": b.amount - b.fee,
            "reporting_category": b.type_,
            "source": b.source,
            "status": if b.available_on <= now { "available" } else { "pending" },
            "type": b.type_,
        })
    }

    fn transfer_json(&self, t: &Transfer) -> Value {
        let reversals: Vec<Value> = t.reversals.iter().rev().map(|r| reversal_json(t, r)).collect();
        let amount_reversed: i64 = t.reversals.iter().map(|r| r.amount).sum();
        json!({
            "id": t.id,
            "object": "transfer",
            "amount": t.amount,
            "amount_reversed": amount_reversed,
            "balance_transaction": t.balance_transaction,
            "created": t.created,
            "currency": t.currency,
            "description": null,
            "destination": t.destination,
            "destination_payment": null,
            "livemode": false,
            "metadata": t.metadata,
            "reversals": { "object": "list", "data": reversals, "has_more": false, "url": format!("/v1/transfers/{}/reversals", t.id) },
            "reversed": amount_reversed >= t.amount,
            "source_transaction": t.source_transaction,
            "source_type": "card",
            "transfer_group": t.transfer_group,
        })
    }

    fn account_json(a: &Account) -> Value {
        json!({
            "id": a.id,
            "object": "account",
            "type": "custom",
            "country": a.country,
            "created": a.created,
            "default_currency": "aud",
            "charges_enabled": a.transfers == "active",
            "payouts_enabled": a.transfers == "active",
            "details_submitted": true,
            "capabilities": { "transfers": a.transfers },
        })
    }

    // ---- PaymentIntents ----

    pub fn create_intent(&mut self, form: &Form, now: i64) -> Result<Value, SimError> {
        let amount = form
            .int("amount")?
            .ok_or_else(|| SimError::invalid("amount", "Missing required param: amount."))?;
        let currency = form.required("currency")?.to_ascii_lowercase();
        let minimum = if currency == "gbp" {
            30
        } else if currency == "hkd" {
            400
        } else {
            50
        };
        if amount < minimum {
            let mut e = SimError::invalid("amount", format!("Amount must be at least {minimum} {currency}"));
            e.code = Some("amount_too_small".into());
            return Err(e);
        }
        if amount > 99_999_999 {
            let mut e = SimError::invalid("amount", "Amount must be no more than 99999999");
            e.code = Some("amount_too_large".into());
            return Err(e);
        }
        let mut allowed = form.list("allowed_payment_method_types");
        if allowed.is_empty() {
            allowed = form.list("payment_method_types");
        }
        if allowed.is_empty() {
            allowed = vec!["card".into()];
        }
        for t in &allowed {
            if !["card", "au_becs_debit", "payto"].contains(&t.as_str()) {
                return Err(SimError::invalid(
                    "allowed_payment_method_types",
                    format!("Invalid payment method type: {t}"),
                ));
            }
            if t != "card" && currency != "aud" {
                return Err(SimError::invalid(
                    "allowed_payment_method_types",
                    format!("The payment method type {t} only supports aud"),
                ));
            }
        }
        let confirm = form.bool("confirm")?;
        let payment_method = self.payment_method_from(form)?;
        let id = random_id("pi");
        let pi = PaymentIntent {
            client_secret: format!("{id}_secret_{}", &random_id("s")[2..]),
            id: id.clone(),
            amount,
            currency,
            created: now,
            status: if payment_method.is_some() {
                "requires_confirmation"
            } else {
                "requires_payment_method"
            },
            allowed_types: allowed,
            transfer_group: form.get("transfer_group").map(str::to_owned),
            metadata: form.map("metadata"),
            payment_method: None,
            behaviour: None,
            latest_charge: None,
            last_error: None,
            settle_at: None,
        };
        self.intents.insert(id.clone(), pi);
        let created = self.intent_json(&self.intents[&id], &[], now);
        self.emit("payment_intent.created", created, now);
        match (confirm, payment_method) {
            (true, Some(pm)) => self.confirm(&id, &pm, now),
            (true, None) => Err(SimError::invalid(
                "payment_method",
                "You must provide a payment_method to confirm.",
            )),
            (false, Some(pm)) => {
                self.intents.get_mut(&id).expect("just inserted").payment_method = Some(pm);
                Ok(self.intent_json(&self.intents[&id], &form.list("expand"), now))
            }
            (false, None) => Ok(self.intent_json(&self.intents[&id], &form.list("expand"), now)),
        }
    }

    /// `payment_method`, or a BECS account given as `payment_method_data`.
    fn payment_method_from(&self, form: &Form) -> Result<Option<String>, SimError> {
        if let Some(pm) = form.get("payment_method") {
            return Ok(Some(pm.to_owned()));
        }
        match form.get("payment_method_data[type]") {
            None => Ok(None),
            Some("au_becs_debit") => {
                let account = form.required("payment_method_data[au_becs_debit][account_number]")?;
                Ok(Some(format!("pm_becs_{account}")))
            }
            Some(other) => Err(SimError::invalid(
                "payment_method_data[type]",
                format!("Unsupported type {other}"),
            )),
        }
    }

    pub fn confirm_intent(&mut self, id: &str, form: &Form, now: i64) -> Result<Value, SimError> {
        let pi = self
            .intents
            .get(id)
            .ok_or_else(|| SimError::missing("payment_intent", id, Some("intent")))?;
        let pm = match self.payment_method_from(form)? {
            Some(pm) => pm,
            None => pi
                .payment_method
                .clone()
                .ok_or_else(|| SimError::invalid("payment_method", "You must provide a payment_method to confirm."))?,
        };
        self.confirm(id, &pm, now)
    }

    fn confirm(&mut self, id: &str, pm: &str, now: i64) -> Result<Value, SimError> {
        let pi = &self.intents[id];
        if !["requires_payment_method", "requires_confirmation"].contains(&pi.status) {
            let mut e = SimError::refused(
                400,
                "payment_intent_unexpected_state",
                format!(
                    "This PaymentIntent's status is {}, so it cannot be confirmed.",
                    pi.status
                ),
                None,
            );
            e.payment_intent = Some(self.intent_json(pi, &[], now));
            return Err(e);
        }
        let Some((pm_type, behaviour)) = payment_method_behaviour(pm) else {
            return Err(SimError::missing("PaymentMethod", pm, Some("payment_method")));
        };
        if !pi.allowed_types.iter().any(|t| t == pm_type) {
            return Err(SimError::refused(
                400,
                "payment_intent_incompatible_payment_method",
                format!("The PaymentMethod type {pm_type} is not allowed for this PaymentIntent."),
                Some("payment_method"),
            ));
        }
        let charge_id = random_id("ch");
        let (amount, currency, transfer_group) = (pi.amount, pi.currency.clone(), pi.transfer_group.clone());
        let mut charge = Charge {
            id: charge_id.clone(),
            amount,
            currency,
            created: now,
            status: "pending",
            payment_intent: id.to_owned(),
            transfer_group,
            method_type: pm_type,
            amount_refunded: 0,
            balance_transaction: None,
            balance_transaction_due: None,
            fee: 0,
            available_on: now,
            failure_code: None,
            failure_message: None,
            disputed: false,
            metadata: BTreeMap::new(),
        };
        {
            let pi = self.intents.get_mut(id).expect("checked above");
            pi.payment_method = Some(pm.to_owned());
            pi.behaviour = Some(behaviour.clone());
            pi.latest_charge = Some(charge_id.clone());
            pi.last_error = None;
        }
        match behaviour {
            Behaviour::Card {
                decline_code: Some(decline),
                ..
            } => {
                charge.status = "failed";
                charge.failure_code = Some("card_declined".into());
                charge.failure_message = Some("Your card was declined.".into());
                self.charges.insert(charge_id.clone(), charge);
                let error = json!({
                    "type": "card_error", "code": "card_declined", "decline_code": decline,
                    "message": "Your card was declined.", "charge": charge_id,
                });
                {
                    let pi = self.intents.get_mut(id).expect("checked above");
                    pi.status = "requires_payment_method";
                    pi.last_error = Some(error);
                }
                let charge_json = self.charge_json(&self.charges[&charge_id], &[], now);
                self.emit("charge.failed", charge_json, now);
                let pi_json = self.intent_json(&self.intents[id], &[], now);
                self.emit("payment_intent.payment_failed", pi_json.clone(), now);
                Err(SimError {
                    status: 402,
                    kind: "card_error",
                    code: Some("card_declined".into()),
                    message: "Your card was declined.".into(),
                    param: None,
                    decline_code: Some(decline.to_owned()),
                    should_retry: Some(false),
                    saved: true,
                    payment_intent: Some(pi_json),
                })
            }
            Behaviour::Card {
                decline_code: None,
                bypass_pending,
            } => {
                self.charges.insert(charge_id.clone(), charge);
                self.succeed_charge(
                    &charge_id,
                    if bypass_pending {
                        0
                    } else {
                        self.config.available_after_secs
                    },
                    now,
                );
                self.intents.get_mut(id).expect("checked above").status = "succeeded";
                let pi_json = self.intent_json(&self.intents[id], &[], now);
                self.emit("payment_intent.succeeded", pi_json.clone(), now);
                Ok(pi_json)
            }
            Behaviour::Debit { after_secs, .. } => {
                let delay = match after_secs {
                    -1 => self.config.becs_settle_secs,
                    -2 => self.config.becs_delayed_settle_secs,
                    -3 => self.config.payto_settle_secs,
                    secs => secs,
                };
                self.charges.insert(charge_id.clone(), charge);
                {
                    let pi = self.intents.get_mut(id).expect("checked above");
                    pi.status = "processing";
                    pi.settle_at = Some(now + delay);
                }
                let charge_json = self.charge_json(&self.charges[&charge_id], &[], now);
                self.emit("charge.pending", charge_json, now);
                let pi_json = self.intent_json(&self.intents[id], &[], now);
                self.emit("payment_intent.processing", pi_json.clone(), now);
                Ok(pi_json)
            }
        }
    }

    /// Marks a charge succeeded and books its balance transaction (now, or later under asynchronous capture).
    fn succeed_charge(&mut self, charge_id: &str, available_after_secs: i64, now: i64) {
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
        } else {
            self.book_charge_balance(charge_id, now);
        }
        let charge_json = self.charge_json(&self.charges[charge_id], &[], now);
        self.emit("charge.succeeded", charge_json, now);
    }

    fn book_charge_balance(&mut self, charge_id: &str, now: i64) {
        let charge = self.charges.get_mut(charge_id).expect("caller holds a real charge");
        let bt = BalanceTxn {
            id: random_id("txn"),
            amount: charge.amount,
            fee: charge.fee,
            currency: charge.currency.clone(),
            created: now,
            available_on: charge.available_on,
            type_: "charge",
            source: charge.id.clone(),
        };
        charge.balance_transaction = Some(bt.id.clone());
        charge.balance_transaction_due = None;
        self.balance_txns.push(bt);
    }

    /// Settles a pending debit now: its planned outcome, or the one forced by a control call.
    pub fn settle(
        &mut self,
        id: &str,
        force: Option<Result<(), (String, String)>>,
        now: i64,
    ) -> Result<Value, SimError> {
        let pi = self
            .intents
            .get(id)
            .ok_or_else(|| SimError::missing("payment_intent", id, None))?;
        if pi.status != "processing" {
            return Err(SimError::refused(
                400,
                "payment_intent_unexpected_state",
                format!("{id} is {}, not processing", pi.status),
                None,
            ));
        }
        let Some(Behaviour::Debit { failure, dispute, .. }) = pi.behaviour.clone() else {
            return Err(SimError::refused(
                400,
                "payment_intent_unexpected_state",
                "not a bank debit",
                None,
            ));
        };
        let outcome = force.unwrap_or_else(|| match failure {
            Some((code, message)) => Err((code.to_owned(), message.to_owned())),
            None => Ok(()),
        });
        let charge_id = pi.latest_charge.clone().expect("a processing intent has a charge");
        match outcome {
            Ok(()) => {
                self.succeed_charge(&charge_id, self.config.available_after_secs, now);
                let pi = self.intents.get_mut(id).expect("checked");
                pi.status = "succeeded";
                pi.settle_at = None;
                let pi_json = self.intent_json(&self.intents[id], &[], now);
                self.emit("payment_intent.succeeded", pi_json, now);
                if dispute {
                    self.charges.get_mut(&charge_id).expect("exists").disputed = true;
                    let dispute = json!({
                        "id": random_id("du"), "object": "dispute", "amount": self.charges[&charge_id].amount,
                        "charge": charge_id, "currency": self.charges[&charge_id].currency, "payment_intent": id,
                        "reason": "debit_not_authorized", "status": "lost", "created": now,
                    });
                    self.emit("charge.dispute.created", dispute, now);
                }
            }
            Err((code, message)) => {
                let charge = self.charges.get_mut(&charge_id).expect("exists");
                charge.status = "failed";
                charge.failure_code = Some(code.clone());
                charge.failure_message = Some(message.clone());
                let charge_json = self.charge_json(&self.charges[&charge_id], &[], now);
                self.emit("charge.failed", charge_json, now);
                let pi = self.intents.get_mut(id).expect("checked");
                pi.status = "requires_payment_method";
                pi.settle_at = None;
                // Stripe also nests the PaymentMethod here; async-stripe needs it complete or absent, so absent.
                pi.last_error = Some(json!({ "type": "invalid_request_error", "code": code, "message": message }));
                let pi_json = self.intent_json(&self.intents[id], &[], now);
                self.emit("payment_intent.payment_failed", pi_json, now);
            }
        }
        Ok(self.intent_json(&self.intents[id], &[], now))
    }

    /// Moves time-driven state on: due debits settle, delayed balance transactions appear.
    pub fn tick(&mut self, now: i64) {
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
    }

    pub fn retrieve_intent(&self, id: &str, expand: &[String], now: i64) -> Result<Value, SimError> {
        let pi = self
            .intents
            .get(id)
            .ok_or_else(|| SimError::missing("payment_intent", id, Some("intent")))?;
        Ok(self.intent_json(pi, expand, now))
    }

    pub fn cancel_intent(&mut self, id: &str, now: i64) -> Result<Value, SimError> {
        let pi = self
            .intents
            .get_mut(id)
            .ok_or_else(|| SimError::missing("payment_intent", id, Some("intent")))?;
        if !["requires_payment_method", "requires_confirmation", "requires_action"].contains(&pi.status) {
            return Err(SimError::refused(
                400,
                "payment_intent_unexpected_state",
                format!(
                    "You cannot cancel this PaymentIntent because it has a status of {}.",
                    pi.status
                ),
                None,
            ));
        }
        pi.status = "canceled";
        let pi_json = self.intent_json(&self.intents[id], &[], now);
        self.emit("payment_intent.canceled", pi_json.clone(), now);
        Ok(pi_json)
    }

    pub fn retrieve_charge(&self, id: &str, expand: &[String], now: i64) -> Result<Value, SimError> {
        let charge = self
            .charges
            .get(id)
            .ok_or_else(|| SimError::missing("charge", id, Some("charge")))?;
        Ok(self.charge_json(charge, expand, now))
    }

    // ---- balance ----

    /// (available, pending) of the platform balance in `currency`.
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
        json!({ "object": "balance", "available": available, "pending": pending, "livemode": false })
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

    // ---- accounts ----

    pub fn create_account(&mut self, form: &Form, now: i64) -> Result<Value, SimError> {
        let requested = form.get("capabilities[transfers][requested]") == Some("true");
        let id = form.get("id").map(str::to_owned).unwrap_or_else(|| random_id("acct"));
        if self.accounts.contains_key(&id) {
            return Err(SimError::invalid("id", format!("Account {id} already exists")));
        }
        let transfers = if requested && self.config.auto_activate_transfers {
            "active"
        } else {
            "inactive"
        };
        let account = Account {
            id: id.clone(),
            created: now,
            transfers: form.get("transfers").unwrap_or(transfers).to_owned(),
            deleted: false,
            country: form.get("country").unwrap_or("AU").to_owned(),
        };
        let json = Self::account_json(&account);
        self.accounts.insert(id, account);
        self.emit("account.updated", json.clone(), now);
        Ok(json)
    }

    pub fn retrieve_account(&self, id: &str) -> Result<Value, SimError> {
        match self.accounts.get(id) {
            Some(a) if !a.deleted => Ok(Self::account_json(a)),
            _ => Err(SimError::refused(
                403,
                "account_invalid",
                format!("The provided key does not have access to account '{id}' (or that account does not exist)."),
                None,
            )),
        }
    }

    pub fn delete_account(&mut self, id: &str, now: i64) -> Result<Value, SimError> {
        let account = self
            .accounts
            .get_mut(id)
            .filter(|a| !a.deleted)
            .ok_or_else(|| SimError::missing("account", id, None))?;
        account.deleted = true;
        let json = json!({ "id": id, "object": "account", "deleted": true });
        self.emit("account.application.deauthorized", json.clone(), now);
        Ok(json)
    }

    pub fn set_transfers_capability(&mut self, id: &str, status: &str, now: i64) -> Result<Value, SimError> {
        if !["active", "inactive", "pending"].contains(&status) {
            return Err(SimError::invalid("transfers", "active, inactive or pending"));
        }
        let account = self
            .accounts
            .get_mut(id)
            .ok_or_else(|| SimError::missing("account", id, None))?;
        account.transfers = status.to_owned();
        let json = Self::account_json(account);
        self.emit("account.updated", json.clone(), now);
        Ok(json)
    }

    // ---- transfers ----

    pub fn create_transfer(&mut self, form: &Form, now: i64) -> Result<Value, SimError> {
        let amount = form
            .int("amount")?
            .ok_or_else(|| SimError::invalid("amount", "Missing required param: amount."))?;
        if amount <= 0 {
            let mut e = SimError::invalid("amount", "Amount must be a positive integer.");
            e.code = Some("amount_too_small".into());
            return Err(e);
        }
        let currency = form.required("currency")?.to_ascii_lowercase();
        let destination = form.required("destination")?.to_owned();
        let source_transaction = form.get("source_transaction").map(str::to_owned);

        match self.accounts.get(&destination) {
            None => {
                return Err(SimError::refused(
                    400,
                    "resource_missing",
                    format!("No such destination: '{destination}'"),
                    Some("destination"),
                ))
            }
            Some(a) if a.deleted => {
                return Err(SimError::refused(
                    400,
                    "account_invalid",
                    format!("The destination account '{destination}' has been deleted."),
                    Some("destination"),
                ))
            }
            Some(a) if a.transfers != "active" => {
                return Err(SimError::refused(
                    400,
                    "insufficient_capabilities_for_transfer",
                    "Your destination account needs to have at least one of the following capabilities enabled: transfers, crypto_transfers, legacy_payments",
                    Some("destination"),
                ))
            }
            Some(_) => {}
        }
        let available_on = match &source_transaction {
            Some(source) => {
                if !source.starts_with("ch_") && !source.starts_with("py_") {
                    return Err(SimError::refused(
                        400,
                        "parameter_invalid",
                        format!("Invalid source_transaction: '{source}' must be a charge id (ch_…)."),
                        Some("source_transaction"),
                    ));
                }
                let charge = self
                    .charges
                    .get(source)
                    .ok_or_else(|| SimError::missing("charge", source, Some("source_transaction")))?;
                if charge.status != "succeeded" {
                    return Err(SimError::refused(
                        400,
                        "parameter_invalid",
                        format!(
                            "The source_transaction {source} has not succeeded (status {}).",
                            charge.status
                        ),
                        Some("source_transaction"),
                    ));
                }
                if charge.currency != currency {
                    return Err(SimError::refused(
                        400,
                        "parameter_invalid",
                        format!(
                            "The currency of source_transaction {source} ({}) does not match {currency}.",
                            charge.currency
                        ),
                        Some("currency"),
                    ));
                }
                let already: i64 = self
                    .transfers
                    .iter()
                    .filter(|t| t.source_transaction.as_deref() == Some(source.as_str()))
                    .map(|t| t.amount)
                    .sum();
                if already + amount > charge.amount {
                    return Err(SimError::refused(
                        400,
                        "amount_too_large",
                        format!(
                            "The sum of transfers for source_transaction {source} ({}) would exceed the charge amount ({}).",
                            already + amount,
                            charge.amount
                        ),
                        Some("amount"),
                    ));
                }
                charge.available_on
            }
            None => {
                let (available, _) = self.balance_of(&currency, now);
                if available < amount {
                    // Not a final refusal: the same request succeeds once funds are available.
                    let mut e = SimError::refused(
                        400,
                        "balance_insufficient",
                        "You have insufficient available funds in your Stripe account.",
                        Some("amount"),
                    );
                    e.should_retry = None;
                    return Err(e);
                }
                now
            }
        };
        let id = random_id("tr");
        let bt = BalanceTxn {
            id: random_id("txn"),
            amount: -amount,
            fee: 0,
            currency: currency.clone(),
            created: now,
            available_on,
            type_: "transfer",
            source: id.clone(),
        };
        let transfer = Transfer {
            id: id.clone(),
            amount,
            currency,
            destination,
            source_transaction,
            transfer_group: form.get("transfer_group").map(str::to_owned),
            metadata: form.map("metadata"),
            created: now,
            reversals: Vec::new(),
            balance_transaction: bt.id.clone(),
        };
        self.balance_txns.push(bt);
        self.transfer_index.insert(id.clone(), self.transfers.len());
        self.transfers.push(transfer);
        let json = self.transfer_json(&self.transfers[self.transfer_index[&id]]);
        self.emit("transfer.created", json.clone(), now);
        Ok(json)
    }

    pub fn retrieve_transfer(&self, id: &str) -> Result<Value, SimError> {
        let index = self
            .transfer_index
            .get(id)
            .ok_or_else(|| SimError::missing("transfer", id, Some("id")))?;
        Ok(self.transfer_json(&self.transfers[*index]))
    }

    /// Newest first, filtered by `transfer_group` and `destination`, paginated by `limit` and `starting_after`.
    pub fn list_transfers(&self, query: &Form) -> Result<Value, SimError> {
        let limit = query.int("limit")?.unwrap_or(10);
        if !(1..=100).contains(&limit) {
            return Err(SimError::invalid("limit", "limit must be between 1 and 100"));
        }
        let group = query.get("transfer_group");
        let destination = query.get("destination");
        let matching: Vec<&Transfer> = self
            .transfers
            .iter()
            .rev()
            .filter(|t| group.is_none_or(|g| t.transfer_group.as_deref() == Some(g)))
            .filter(|t| destination.is_none_or(|d| t.destination == d))
            .collect();
        page(
            &matching,
            query,
            limit,
            "/v1/transfers",
            |t| t.id.as_str(),
            |t| self.transfer_json(t),
        )
    }

    pub fn create_reversal(&mut self, transfer_id: &str, form: &Form, now: i64) -> Result<Value, SimError> {
        let index = *self
            .transfer_index
            .get(transfer_id)
            .ok_or_else(|| SimError::missing("transfer", transfer_id, Some("id")))?;
        let transfer = &self.transfers[index];
        let reversed: i64 = transfer.reversals.iter().map(|r| r.amount).sum();
        let left = transfer.amount - reversed;
        if left == 0 {
            return Err(SimError {
                code: None,
                ..SimError::refused(
                    400,
                    "",
                    format!("The transfer {transfer_id} is already fully reversed."),
                    None,
                )
            });
        }
        let amount = form.int("amount")?.unwrap_or(left);
        if amount <= 0 || amount > left {
            return Err(SimError::refused(
                400,
                "amount_too_large",
                format!("Amount {amount} must be positive and at most the unreversed amount {left}."),
                Some("amount"),
            ));
        }
        let reversal = Reversal {
            id: random_id("trr"),
            amount,
            created: now,
            metadata: form.map("metadata"),
        };
        let currency = transfer.currency.clone();
        self.transfers[index].reversals.push(reversal.clone());
        self.balance_txns.push(BalanceTxn {
            id: random_id("txn"),
            amount,
            fee: 0,
            currency,
            created: now,
            available_on: now,
            type_: "transfer_cancel",
            source: reversal.id.clone(),
        });
        let json = reversal_json(&self.transfers[index], &reversal);
        let transfer_json = self.transfer_json(&self.transfers[index]);
        self.emit("transfer.reversed", transfer_json, now);
        Ok(json)
    }

    // ---- refunds ----

    pub fn create_refund(&mut self, form: &Form, now: i64) -> Result<Value, SimError> {
        let charge_id = match (form.get("charge"), form.get("payment_intent")) {
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
            metadata: form.map("metadata"),
        };
        self.charges.get_mut(&charge_id).expect("exists").amount_refunded += amount;
        self.balance_txns.push(BalanceTxn {
            id: random_id("txn"),
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

    // ---- events ----

    pub fn list_events(&self, query: &Form) -> Result<Value, SimError> {
        let limit = query.int("limit")?.unwrap_or(10);
        if !(1..=100).contains(&limit) {
            return Err(SimError::invalid("limit", "limit must be between 1 and 100"));
        }
        let type_ = query.get("type");
        let matching: Vec<&Event> = self
            .events
            .iter()
            .rev()
            .filter(|e| type_.is_none_or(|t| e.type_ == t))
            .collect();
        page(&matching, query, limit, "/v1/events", |e| e.id.as_str(), Event::json)
    }

    pub fn retrieve_event(&self, id: &str) -> Result<Value, SimError> {
        self.events
            .iter()
            .find(|e| e.id == id)
            .map(Event::json)
            .ok_or_else(|| SimError::missing("event", id, Some("id")))
    }
}

/// One page of a Stripe list, newest first: `starting_after` (an id in `items`) and `limit` as Stripe reads them.
fn page<T>(
    items: &[&T],
    query: &Form,
    limit: i64,
    url: &str,
    id_of: impl Fn(&T) -> &str,
    render: impl Fn(&T) -> Value,
) -> Result<Value, SimError> {
    let start = match query.get("starting_after") {
        Some(after) => items
            .iter()
            .position(|item| id_of(item) == after)
            .map(|i| i + 1)
            .ok_or_else(|| SimError::invalid("starting_after", format!("No such object: '{after}'")))?,
        None => 0,
    };
    let data: Vec<Value> = items
        .iter()
        .skip(start)
        .take(limit as usize)
        .map(|item| render(item))
        .collect();
    let has_more = items.len() > start + data.len();
    Ok(json!({ "object": "list", "data": data, "has_more": has_more, "url": url }))
}

fn reversal_json(t: &Transfer, r: &Reversal) -> Value {
    json!({
        "id": r.id, "object": "transfer_reversal", "amount": r.amount, "balance_transaction": null,
        "created": r.created, "currency": t.currency, "destination_payment_refund": null, "metadata": r.metadata,
        "source_refund": null, "transfer": t.id,
    })
}

fn refund_json(r: &Refund) -> Value {
    json!({
        "id": r.id, "object": "refund", "amount": r.amount, "balance_transaction": null, "charge": r.charge,
        "created": r.created, "currency": r.currency, "metadata": r.metadata, "payment_intent": r.payment_intent,
        "reason": null, "status": "succeeded",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fee_rules_round_half_up_and_cap() {
        let card = SimConfig::default().card_fee;
        assert_eq!(card.fee_cents(10_000), 205); // 1.75% + 30c
        assert_eq!(card.fee_cents(1_000), 48); // 17.5 → 18, + 30
        let becs = SimConfig::default().becs_fee;
        assert_eq!(becs.fee_cents(100_000), 350, "capped at A$3.50");
        assert_eq!(becs.fee_cents(10), 10, "never more than the amount");
    }

    #[test]
    fn every_stripe_becs_test_account_is_known() {
        for account in [
            "000123456",
            "900123456",
            "111111113",
            "111111116",
            "222222227",
            "922222227",
            "333333335",
            "666666660",
            "343434343",
            "121212121",
        ] {
            assert!(becs_behaviour(account).is_some(), "{account}");
        }
        assert!(payment_method_behaviour("pm_becs_999").is_none());
    }
}
