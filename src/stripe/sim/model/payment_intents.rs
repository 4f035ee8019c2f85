//! PaymentIntents: create, confirm (cards decide at once; BECS and PayTo debits stay `processing` until the clock
//! settles them), cancel, retrieve, and the test PaymentMethods of Stripe's docs with what each one does.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::charges::Charge;
use super::payment_methods::{check_payment_method, Behaviour};
use super::{random_id, with_nulls, Model, SimError};
use crate::stripe::sim::form::{Form, ParamError};

/// The parameters Stripe's create accepts (others are `parameter_unknown`).
const CREATE_PARAMS: &[&str] = &[
    "amount",
    "currency",
    "allowed_payment_method_types",
    "automatic_payment_methods",
    "capture_method",
    "confirm",
    "confirmation_method",
    "customer",
    "description",
    "mandate_data",
    "metadata",
    "off_session",
    "on_behalf_of",
    "payment_method",
    "payment_method_data",
    "payment_method_options",
    "payment_method_types",
    "receipt_email",
    "return_url",
    "setup_future_usage",
    "statement_descriptor",
    "statement_descriptor_suffix",
    "transfer_group",
];
const CONFIRM_PARAMS: &[&str] = &[
    "capture_method",
    "mandate_data",
    "off_session",
    "payment_method",
    "payment_method_data",
    "payment_method_options",
    "receipt_email",
    "return_url",
    "setup_future_usage",
];
/// `cancellation_reason` values a caller may give (Stripe sets `automatic`, `expired`, … itself).
const CANCELLATION_REASONS: &[&str] = &["abandoned", "duplicate", "fraudulent", "requested_by_customer"];

#[derive(Debug, Clone)]
pub(super) struct PaymentIntent {
    pub(super) id: String,
    pub(super) amount: i64,
    pub(super) currency: String,
    pub(super) created: i64,
    pub(super) status: &'static str,
    pub(super) allowed_types: Vec<String>,
    pub(super) transfer_group: Option<String>,
    pub(super) metadata: BTreeMap<String, String>,
    pub(super) payment_method: Option<String>,
    pub(super) behaviour: Option<Behaviour>,
    pub(super) latest_charge: Option<String>,
    pub(super) last_error: Option<Value>,
    pub(super) client_secret: String,
    pub(super) settle_at: Option<i64>,
    /// Null until canceled.
    pub(super) cancellation_reason: Option<String>,
    pub(super) canceled_at: Option<i64>,
}

impl Model {
    pub(super) fn intent_json(&self, pi: &PaymentIntent, expand: &[String], now: i64) -> Value {
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
        // Every top-level field of Stripe's object; nested objects splitpay has no use for are null (async-stripe
        // needs a non-null nested object to be complete).
        let object = json!({
            "id": pi.id,
            "object": "payment_intent",
            "amount": pi.amount,
            "amount_capturable": 0,
            "amount_received": if pi.status == "succeeded" { pi.amount } else { 0 },
            "canceled_at": pi.canceled_at,
            "cancellation_reason": pi.cancellation_reason,
            "capture_method": "automatic_async",
            "client_secret": pi.client_secret,
            "confirmation_method": "automatic",
            "created": pi.created,
            "currency": pi.currency,
            "last_payment_error": pi.last_error,
            "latest_charge": latest_charge,
            "livemode": false,
            "metadata": pi.metadata,
            "payment_method": pi.payment_method,
            "payment_method_types": pi.allowed_types,
            "status": pi.status,
            "transfer_group": pi.transfer_group,
        });
        with_nulls(
            object,
            &[
                "amount_details",
                "application",
                "application_fee_amount",
                "automatic_payment_methods",
                "customer",
                "customer_account",
                "description",
                "excluded_payment_method_types",
                "managed_payments",
                "next_action",
                "on_behalf_of",
                "payment_method_configuration_details",
                "payment_method_options",
                "processing",
                "receipt_email",
                "review",
                "setup_future_usage",
                "shipping",
                "source",
                "statement_descriptor",
                "statement_descriptor_suffix",
                "transfer_data",
            ],
        )
    }

    /// Everything is checked before anything is created: a refused create leaves no PaymentIntent and no event.
    /// Only a decline at confirmation leaves one behind (`requires_payment_method`), as Stripe does.
    pub fn create_intent(&mut self, form: &Form, now: i64) -> Result<Value, SimError> {
        form.only(CREATE_PARAMS)?;
        let amount = form.int("amount")?.ok_or_else(|| ParamError::missing("amount"))?;
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
        let metadata = form.metadata()?;
        let transfer_group = form.optional("transfer_group")?.map(str::to_owned);
        let confirm = form.bool("confirm")?;
        let payment_method = self.payment_method_from(form)?;
        if let Some(pm) = &payment_method {
            check_payment_method(pm, &allowed)?;
        }
        if confirm && payment_method.is_none() {
            return Err(ParamError::missing("payment_method").into());
        }
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
            transfer_group,
            metadata,
            payment_method: None,
            behaviour: None,
            latest_charge: None,
            last_error: None,
            settle_at: None,
            cancellation_reason: None,
            canceled_at: None,
        };
        self.intents.insert(id.clone(), pi);
        let created = self.intent_json(&self.intents[&id], &[], now);
        self.emit("payment_intent.created", created, now);
        match (confirm, payment_method) {
            (true, Some(pm)) => self.confirm(&id, &pm, now),
            (false, Some(pm)) => {
                self.intents.get_mut(&id).expect("just inserted").payment_method = Some(pm);
                Ok(self.intent_json(&self.intents[&id], &form.list("expand"), now))
            }
            (_, None) => Ok(self.intent_json(&self.intents[&id], &form.list("expand"), now)),
        }
    }

    /// `payment_method`, or a BECS account given as `payment_method_data` (BSB and account number both required).
    pub(super) fn payment_method_from(&self, form: &Form) -> Result<Option<String>, SimError> {
        if let Some(pm) = form.optional("payment_method")? {
            return Ok(Some(pm.to_owned()));
        }
        match form.one_of("payment_method_data[type]", &["au_becs_debit", "card", "payto"])? {
            None => Ok(None),
            Some("au_becs_debit") => {
                form.required("payment_method_data[au_becs_debit][bsb_number]")?;
                let account = form.required("payment_method_data[au_becs_debit][account_number]")?;
                Ok(Some(format!("pm_becs_{account}")))
            }
            Some(other) => Err(SimError::invalid(
                "payment_method_data[type]",
                format!(
                    "The simulator takes {other} PaymentMethods by id (payment_method), not as payment_method_data."
                ),
            )),
        }
    }

    pub fn confirm_intent(&mut self, id: &str, form: &Form, now: i64) -> Result<Value, SimError> {
        form.only(CONFIRM_PARAMS)?;
        let pi = self
            .intents
            .get(id)
            .ok_or_else(|| SimError::missing("payment_intent", id, Some("intent")))?;
        let given = self.payment_method_from(form)?;
        self.check_confirmable(pi, now)?;
        // After a decline Stripe detaches the PaymentMethod: confirming again needs a new one.
        let Some(pm) = given.or_else(|| pi.payment_method.clone()) else {
            let mut e = SimError::refused(
                400,
                "payment_intent_unexpected_state",
                "You cannot confirm this PaymentIntent because it's missing a payment method. Update the PaymentIntent with a payment method and then confirm it again.",
                None,
            );
            e.payment_intent = Some(self.intent_json(pi, &[], now));
            return Err(e);
        };
        self.confirm(id, &pm, now)
    }

    fn check_confirmable(&self, pi: &PaymentIntent, now: i64) -> Result<(), SimError> {
        if ["requires_payment_method", "requires_confirmation"].contains(&pi.status) {
            return Ok(());
        }
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
        Err(e)
    }

    pub(super) fn confirm(&mut self, id: &str, pm: &str, now: i64) -> Result<Value, SimError> {
        let pi = &self.intents[id];
        self.check_confirmable(pi, now)?;
        let (pm_type, behaviour) = check_payment_method(pm, &pi.allowed_types)?;
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
            dispute_due: None,
            metadata: BTreeMap::new(),
            payment_method: pm.to_owned(),
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
                    // Stripe detaches a declined PaymentMethod: the donor retries with another one.
                    pi.payment_method = None;
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
                    should_retry: None,
                    saved: true,
                    payment_intent: Some(pi_json),
                })
            }
            Behaviour::Card {
                decline_code: None,
                bypass_pending,
                dispute,
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
                if dispute {
                    self.open_dispute(&charge_id, "fraudulent", now)?;
                }
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
                Self::due_at(&mut self.next_due_at, now + delay);
                let charge_json = self.charge_json(&self.charges[&charge_id], &[], now);
                self.emit("charge.pending", charge_json, now);
                let pi_json = self.intent_json(&self.intents[id], &[], now);
                self.emit("payment_intent.processing", pi_json.clone(), now);
                Ok(pi_json)
            }
        }
    }

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
                    // As with real BECS: the debit succeeds, the dispute comes later.
                    let after_secs = self.config.becs_dispute_after_secs;
                    if after_secs > 0 {
                        self.charges.get_mut(&charge_id).expect("exists").dispute_due = Some(now + after_secs);
                        Self::due_at(&mut self.next_due_at, now + after_secs);
                    } else {
                        self.open_dispute(&charge_id, "debit_not_authorized", now)?;
                    }
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
                pi.payment_method = None;
                // Stripe also nests the PaymentMethod here; async-stripe needs it complete or absent, so absent.
                pi.last_error = Some(json!({ "type": "invalid_request_error", "code": code, "message": message }));
                let pi_json = self.intent_json(&self.intents[id], &[], now);
                self.emit("payment_intent.payment_failed", pi_json, now);
            }
        }
        Ok(self.intent_json(&self.intents[id], &[], now))
    }

    pub fn retrieve_intent(&self, id: &str, expand: &[String], now: i64) -> Result<Value, SimError> {
        let pi = self
            .intents
            .get(id)
            .ok_or_else(|| SimError::missing("payment_intent", id, Some("intent")))?;
        Ok(self.intent_json(pi, expand, now))
    }

    /// Cancels a PaymentIntent nobody can pay any more; a succeeded, processing or canceled one is refused.
    pub fn cancel_intent(&mut self, id: &str, form: &Form, now: i64) -> Result<Value, SimError> {
        form.only(&["cancellation_reason"])?;
        let reason = form
            .one_of("cancellation_reason", CANCELLATION_REASONS)?
            .map(str::to_owned);
        let pi = self
            .intents
            .get(id)
            .ok_or_else(|| SimError::missing("payment_intent", id, Some("intent")))?;
        if !["requires_payment_method", "requires_confirmation", "requires_action"].contains(&pi.status) {
            let mut e = SimError::refused(
                400,
                "payment_intent_unexpected_state",
                format!(
                    "You cannot cancel this PaymentIntent because it has a status of {}. Only a PaymentIntent with one of the following statuses may be canceled: requires_payment_method, requires_capture, requires_confirmation, requires_action.",
                    pi.status
                ),
                None,
            );
            e.payment_intent = Some(self.intent_json(pi, &[], now));
            return Err(e);
        }
        let pi = self.intents.get_mut(id).expect("checked above");
        pi.status = "canceled";
        pi.cancellation_reason = reason;
        pi.canceled_at = Some(now);
        let pi_json = self.intent_json(&self.intents[id], &[], now);
        self.emit("payment_intent.canceled", pi_json.clone(), now);
        Ok(pi_json)
    }
}
