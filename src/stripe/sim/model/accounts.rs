//! Connected accounts: creation with the `transfers` capability, onboarding (terms and bank account, at creation or
//! by an update), retrieval, deletion, capability changes (at once or later on the simulator's clock). Their events are Connect events (top-level `account`): `account.updated`
//! and `capability.updated` whenever a capability changes.

use serde_json::{json, Value};

use super::{random_id, with_nulls, Model, SimError};
use crate::stripe::sim::form::Form;

#[derive(Debug, Clone)]
pub(super) struct Account {
    pub(super) id: String,
    pub(super) created: i64,
    pub(super) transfers: String,
    /// When a pending `transfers` capability turns active on its own (simulator clock).
    pub(super) transfers_activate_at: Option<i64>,
    pub(super) deleted: bool,
    /// `capabilities[transfers][requested]=true` was asked, at creation or since.
    pub(super) transfers_requested: bool,
    /// Terms accepted (`tos_acceptance[date]`), at creation or since (see `SimConfig::onboarding_required`).
    pub(super) tos_accepted: bool,
    /// A bank account given (`external_account`), at creation or since.
    pub(super) bank_account: bool,
    pub(super) country: String,
    pub(super) metadata: std::collections::BTreeMap<String, String>,
}

const ACCOUNT_CREATE_PARAMS: &[&str] = &[
    "business_profile",
    "business_type",
    "capabilities",
    "company",
    "controller",
    "country",
    "default_currency",
    "email",
    "external_account",
    "individual",
    "metadata",
    "settings",
    "tos_acceptance",
    "type",
];

/// `POST /v1/accounts/{id}`: what an update may change (not `type` or `country`).
const ACCOUNT_UPDATE_PARAMS: &[&str] = &[
    "business_profile",
    "business_type",
    "capabilities",
    "company",
    "email",
    "external_account",
    "individual",
    "metadata",
    "settings",
    "tos_acceptance",
];

/// Whether `form` accepts the terms, and whether it gives a bank account (a token or Stripe's inline
/// `external_account[…]`).
fn onboarding(form: &Form) -> (bool, bool) {
    let tos = form.get("tos_acceptance[date]").is_some_and(|d| !d.is_empty());
    let bank = form.get("external_account").is_some_and(|t| !t.is_empty())
        || form
            .get("external_account[account_number]")
            .is_some_and(|n| !n.is_empty());
    (tos, bank)
}

impl Model {
    pub(super) fn account_json(a: &Account) -> Value {
        let object = json!({
            "id": a.id,
            "object": "account",
            "type": "custom",
            "country": a.country,
            "created": a.created,
            "default_currency": "aud",
            // Only the `transfers` capability is ever requested here (a recipient of transfers, as splitpay's
            // accounts are): Stripe reports such an account unable to take charges itself, whatever its onboarding.
            "charges_enabled": false,
            "payouts_enabled": a.transfers == "active",
            "details_submitted": true,
            "capabilities": { "transfers": a.transfers },
            "metadata": a.metadata,
        });
        with_nulls(
            object,
            &[
                "business_profile",
                "business_type",
                "controller",
                "email",
                "external_accounts",
                "future_requirements",
                "requirements",
                "settings",
                "tos_acceptance",
            ],
        )
    }

    /// `POST /v1/accounts`: Stripe's parameters only.
    pub fn create_account(&mut self, form: &Form, now: i64) -> Result<Value, SimError> {
        form.only(ACCOUNT_CREATE_PARAMS)?;
        form.one_of("type", &["custom", "express", "standard"])?;
        self.insert_account(form, now)
    }

    /// Creates an account; the control API may also choose its `id` and `transfers` capability status.
    pub(crate) fn insert_account(&mut self, form: &Form, now: i64) -> Result<Value, SimError> {
        let metadata = form.metadata()?;
        let requested = form.get("capabilities[transfers][requested]") == Some("true");
        let id = form.get("id").map(str::to_owned).unwrap_or_else(|| random_id("acct"));
        if self.accounts.contains_key(&id) {
            return Err(SimError::invalid("id", format!("Account {id} already exists")));
        }
        let (tos_accepted, bank_account) = onboarding(form);
        let transfers = if requested && self.transfers_may_activate(tos_accepted && bank_account) {
            "active"
        } else {
            "inactive"
        };
        let account = Account {
            id: id.clone(),
            created: now,
            transfers: form.get("transfers").unwrap_or(transfers).to_owned(),
            transfers_activate_at: None,
            deleted: false,
            transfers_requested: requested,
            tos_accepted,
            bank_account,
            country: form.get("country").unwrap_or("AU").to_owned(),
            metadata,
        };
        let json = Self::account_json(&account);
        self.accounts.insert(id.clone(), account);
        self.emit_for(Some(&id), "account.updated", json.clone(), now);
        Ok(json)
    }

    fn transfers_may_activate(&self, onboarded: bool) -> bool {
        self.config.auto_activate_transfers && (onboarded || !self.config.onboarding_required)
    }

    /// `POST /v1/accounts/{id}`: onboarding given later (terms, bank account) or the capability requested now turns
    /// `transfers` active when the rules allow, with `capability.updated` and `account.updated`; any other update
    /// emits `account.updated`.
    pub fn update_account(&mut self, id: &str, form: &Form, now: i64) -> Result<Value, SimError> {
        form.only(ACCOUNT_UPDATE_PARAMS)?;
        let metadata = form.metadata()?;
        let (tos_now, bank_now) = onboarding(form);
        let requested_now = form.get("capabilities[transfers][requested]") == Some("true");
        let account = self
            .accounts
            .get_mut(id)
            .filter(|a| !a.deleted)
            .ok_or_else(|| SimError::missing("account", id, None))?;
        account.tos_accepted |= tos_now;
        account.bank_account |= bank_now;
        account.transfers_requested |= requested_now;
        account.metadata.extend(metadata);
        let (requested, onboarded, active) = (
            account.transfers_requested,
            account.tos_accepted && account.bank_account,
            account.transfers == "active",
        );
        if !active && requested && self.transfers_may_activate(onboarded) {
            let account = self.accounts.get_mut(id).expect("found above");
            account.transfers = "active".to_owned();
            account.transfers_activate_at = None;
            return Ok(self.capability_changed(id, now));
        }
        let json = Self::account_json(&self.accounts[id]);
        self.emit_for(Some(id), "account.updated", json.clone(), now);
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
        self.emit_for(Some(id), "account.application.deauthorized", json.clone(), now);
        Ok(json)
    }

    /// Sets the `transfers` capability now; with `activate_after_secs`, it also turns `active` on its own once
    /// the simulator's clock has moved that far (as Stripe activates capabilities asynchronously).
    pub fn set_transfers_capability(
        &mut self,
        id: &str,
        status: &str,
        activate_after_secs: Option<i64>,
        now: i64,
    ) -> Result<Value, SimError> {
        if !["active", "inactive", "pending"].contains(&status) {
            return Err(SimError::invalid("transfers", "active, inactive or pending"));
        }
        if activate_after_secs.is_some_and(|secs| secs < 0) {
            return Err(SimError::invalid(
                "activate_after_secs",
                "activate_after_secs must not be negative",
            ));
        }
        let account = self
            .accounts
            .get_mut(id)
            .ok_or_else(|| SimError::missing("account", id, None))?;
        account.transfers = status.to_owned();
        account.transfers_activate_at = activate_after_secs.map(|secs| now + secs);
        if let Some(at) = account.transfers_activate_at {
            Self::due_at(&mut self.next_due_at, at);
        }
        Ok(self.capability_changed(id, now))
    }

    /// Pending capabilities whose time has come turn active.
    pub(super) fn activate_due_capabilities(&mut self, now: i64) {
        let mut due: Vec<String> = self
            .accounts
            .values()
            .filter(|a| a.transfers_activate_at.is_some_and(|at| at <= now))
            .map(|a| a.id.clone())
            .collect();
        due.sort();
        for id in due {
            let account = self.accounts.get_mut(&id).expect("listed above");
            account.transfers = "active".to_owned();
            account.transfers_activate_at = None;
            self.capability_changed(&id, now);
        }
    }

    /// Emits `capability.updated` and `account.updated` (Connect events) and returns the account.
    fn capability_changed(&mut self, id: &str, now: i64) -> Value {
        let account = &self.accounts[id];
        let json = Self::account_json(account);
        let requirements = json!({
            "alternatives": [], "current_deadline": null, "currently_due": [], "disabled_reason": null,
            "errors": [], "eventually_due": [], "past_due": [], "pending_verification": [],
        });
        let capability = json!({
            "id": "transfers", "object": "capability", "account": id, "future_requirements": requirements,
            "requested": true, "requested_at": account.created, "requirements": requirements,
            "status": account.transfers,
        });
        self.emit_for(Some(id), "capability.updated", capability, now);
        self.emit_for(Some(id), "account.updated", json.clone(), now);
        json
    }
}
