//! Connected accounts: creation with the `transfers` capability, retrieval, deletion, capability changes.

use serde_json::{json, Value};

use super::{random_id, Model, SimError};
use crate::stripe::sim::form::Form;

#[derive(Debug, Clone)]
pub(super) struct Account {
    pub(super) id: String,
    pub(super) created: i64,
    pub(super) transfers: String,
    pub(super) deleted: bool,
    pub(super) country: String,
}

impl Model {
    pub(super) fn account_json(a: &Account) -> Value {
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
}
