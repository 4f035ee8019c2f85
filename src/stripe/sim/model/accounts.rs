//! Connected accounts: creation with the `transfers` capability, retrieval, deletion, capability changes.

use serde_json::{json, Value};

use super::{random_id, with_nulls, Model, SimError};
use crate::stripe::sim::form::Form;

#[derive(Debug, Clone)]
pub(super) struct Account {
    pub(super) id: String,
    pub(super) created: i64,
    pub(super) transfers: String,
    pub(super) deleted: bool,
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

impl Model {
    pub(super) fn account_json(a: &Account) -> Value {
        let object = json!({
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
            metadata,
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
}
