//! Transfers to connected accounts (with or without `source_transaction`), their listing, and reversals; each moves
//! money between the platform's balance and the connected account's.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::balance::BalanceTxn;
use super::{page, random_id, Model, SimError};
use crate::stripe::sim::form::{Form, ParamError};

const CREATE_PARAMS: &[&str] = &[
    "amount",
    "currency",
    "description",
    "destination",
    "metadata",
    "source_transaction",
    "source_type",
    "transfer_group",
];
const LIST_PARAMS: &[&str] = &[
    "created",
    "destination",
    "ending_before",
    "limit",
    "starting_after",
    "transfer_group",
];
const REVERSAL_PARAMS: &[&str] = &["amount", "description", "metadata", "refund_application_fee"];
const REVERSAL_LIST_PARAMS: &[&str] = &["ending_before", "expand", "limit", "starting_after"];

#[derive(Debug, Clone)]
pub(super) struct Reversal {
    pub(super) id: String,
    pub(super) amount: i64,
    /// The platform's balance transaction (the money coming back).
    pub(super) balance_transaction: String,
    /// The refund (`pyr_…`) of the destination payment on the connected account.
    pub(super) destination_payment_refund: String,
    pub(super) created: i64,
    pub(super) metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub(super) struct Transfer {
    pub(super) id: String,
    pub(super) amount: i64,
    pub(super) currency: String,
    pub(super) destination: String,
    pub(super) source_transaction: Option<String>,
    pub(super) transfer_group: Option<String>,
    pub(super) metadata: BTreeMap<String, String>,
    pub(super) created: i64,
    pub(super) reversals: Vec<Reversal>,
    pub(super) balance_transaction: String,
    /// The payment (`py_…`) the transfer made on the connected account.
    pub(super) destination_payment: String,
    /// When the transferred funds become available on both sides (later than `created` with a pending
    /// source_transaction).
    pub(super) available_on: i64,
}

impl Model {
    pub(super) fn transfer_json(&self, t: &Transfer) -> Value {
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
            "destination_payment": t.destination_payment,
            "livemode": false,
            "metadata": t.metadata,
            "reversals": { "object": "list", "data": reversals, "has_more": false, "url": format!("/v1/transfers/{}/reversals", t.id) },
            "reversed": amount_reversed >= t.amount,
            "source_transaction": t.source_transaction,
            "source_type": "card",
            "transfer_group": t.transfer_group,
        })
    }

    pub fn create_transfer(&mut self, form: &Form, now: i64) -> Result<Value, SimError> {
        form.only(CREATE_PARAMS)?;
        let amount = form.int("amount")?.ok_or_else(|| ParamError::missing("amount"))?;
        if amount <= 0 {
            let mut e = SimError::invalid("amount", "Amount must be a positive integer.");
            e.code = Some("amount_too_small".into());
            return Err(e);
        }
        let currency = form.required("currency")?.to_ascii_lowercase();
        let destination = form.required("destination")?.to_owned();
        let source_transaction = form.optional("source_transaction")?.map(str::to_owned);
        let transfer_group = form.optional("transfer_group")?.map(str::to_owned);
        let metadata = form.metadata()?;

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
                        "",
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
                        "",
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
                        "",
                        format!(
                            "The currency of source_transaction {source} ({}) does not match {currency}.",
                            charge.currency
                        ),
                        Some("currency"),
                    ));
                }
                let already = self.transferred_from.get(source).copied().unwrap_or(0);
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
        let destination_payment = random_id("py");
        let mut bt = BalanceTxn::platform("transfer", -amount, &currency, &id, now);
        bt.available_on = available_on;
        // The connected account receives a payment (`py_…`) of the same amount, available when the platform's
        // funds are: with a source_transaction, when the charge's funds become available.
        let mut received = BalanceTxn::platform("payment", amount, &currency, &destination_payment, now);
        received.account = Some(destination.clone());
        received.available_on = available_on;
        let transfer = Transfer {
            id: id.clone(),
            amount,
            currency,
            destination,
            source_transaction,
            transfer_group,
            metadata,
            created: now,
            reversals: Vec::new(),
            balance_transaction: bt.id.clone(),
            destination_payment,
            available_on,
        };
        self.push_balance_txn(bt);
        self.push_balance_txn(received);
        if let Some(source) = &transfer.source_transaction {
            *self.transferred_from.entry(source.clone()).or_insert(0) += transfer.amount;
        }
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
        query.only(LIST_PARAMS)?;
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

    /// `GET /v1/transfers/{id}/reversals`: the transfer's reversals, newest first, paginated like every list.
    pub fn list_reversals(&self, transfer_id: &str, query: &Form) -> Result<Value, SimError> {
        query.only(REVERSAL_LIST_PARAMS)?;
        let limit = query.int("limit")?.unwrap_or(10);
        if !(1..=100).contains(&limit) {
            return Err(SimError::invalid("limit", "limit must be between 1 and 100"));
        }
        let index = *self
            .transfer_index
            .get(transfer_id)
            .ok_or_else(|| SimError::missing("transfer", transfer_id, Some("id")))?;
        let transfer = &self.transfers[index];
        let newest_first: Vec<&Reversal> = transfer.reversals.iter().rev().collect();
        page(
            &newest_first,
            query,
            limit,
            &format!("/v1/transfers/{transfer_id}/reversals"),
            |r| r.id.as_str(),
            |r| reversal_json(transfer, r),
        )
    }

    pub fn create_reversal(&mut self, transfer_id: &str, form: &Form, now: i64) -> Result<Value, SimError> {
        form.only(REVERSAL_PARAMS)?;
        let metadata = form.metadata()?;
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
        let currency = transfer.currency.clone();
        let destination = transfer.destination.clone();
        // A reversal takes the money back out of the connected account's balance. While the transfer's own funds
        // are still pending there (a source_transaction not yet available), they cannot have been paid out: the
        // reversal cancels part of them, pending on both sides. Otherwise it needs the connected account's
        // available balance, and Stripe refuses one it cannot cover. Code `balance_insufficient` as for any
        // balance shortfall (the exact wording of Stripe's message for reversals is UNCONFIRMED).
        let still_pending = transfer.available_on > now;
        let available_on = if still_pending { transfer.available_on } else { now };
        let (connected_available, _) = self.balance_of_account(Some(&destination), &currency, now);
        if !still_pending && connected_available < amount {
            return Err(SimError::refused(
                400,
                "balance_insufficient",
                format!(
                    "Insufficient funds in the destination account {destination} to reverse {amount} {currency} (available: {connected_available})."
                ),
                Some("amount"),
            ));
        }
        let id = random_id("trr");
        let destination_payment_refund = random_id("pyr");
        let mut back = BalanceTxn::platform("transfer_refund", amount, &currency, &id, now);
        back.reporting_category = "transfer_reversal";
        back.available_on = available_on;
        let mut taken = BalanceTxn::platform("payment_refund", -amount, &currency, &destination_payment_refund, now);
        taken.account = Some(destination);
        taken.reporting_category = "transfer_reversal";
        taken.available_on = available_on;
        let reversal = Reversal {
            id,
            amount,
            balance_transaction: back.id.clone(),
            destination_payment_refund,
            created: now,
            metadata,
        };
        self.transfers[index].reversals.push(reversal.clone());
        self.push_balance_txn(back);
        self.push_balance_txn(taken);
        let json = reversal_json(&self.transfers[index], &reversal);
        let transfer_json = self.transfer_json(&self.transfers[index]);
        // Stripe's `transfer.updated` is for description and metadata changes; a reversal, partial or full, emits
        // `transfer.reversed` alone.
        self.emit("transfer.reversed", transfer_json, now);
        Ok(json)
    }
}

pub(super) fn reversal_json(t: &Transfer, r: &Reversal) -> Value {
    json!({
        "id": r.id, "object": "transfer_reversal", "amount": r.amount, "balance_transaction": r.balance_transaction,
        "created": r.created, "currency": t.currency, "destination_payment_refund": r.destination_payment_refund,
        "metadata": r.metadata,
        "source_refund": null, "transfer": t.id,
    })
}
