//! The suite's own calls to Stripe, beside splitpay's: connected accounts (created, onboarded later, deleted), the
//! donor's confirmation of a BECS debit as the browser makes it, and the reads the checks need. All go through
//! [`StripeGateway::request_json`]: the gateway's rate limiter, bounded retries and transport, like splitpay's own.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::Failure;
use crate::stripe::gateway::RawMethod;
use crate::stripe::{GatewayError, PaymentGateway, StripeGateway};

/// Stripe's test bank account for AU payouts (stripe-facts.md): BSB 110000, account 000123456.
const PAYOUT_BSB: &str = "110000";
const PAYOUT_ACCOUNT_NUMBER: &str = "000123456";
/// Stripe's BECS test debit that succeeds (BSB 000-000).
pub const BECS_BSB: &str = "000000";
pub const BECS_ACCOUNT_SUCCEEDS: &str = "000123456";
/// How often an account is asked whether its `transfers` capability is active (Stripe activates it asynchronously).
const CAPABILITY_POLL_MS: u64 = 2_000;
/// Attempts for a call whose outcome was unknown (timeout, connection lost after sending): the gateway leaves those
/// to its caller, and a created account whose answer was lost would escape the cleanup.
const UNKNOWN_ATTEMPTS_MAX: u32 = 3;
const UNKNOWN_RETRY_MS: u64 = 1_000;

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// What onboards an AU individual recipient in test mode: accepted terms, a payout bank account, and the details
/// Stripe's verification needs, with Stripe's test values (date of birth 1901-01-01 and `address_full_match` pass
/// verification at once; 0491 570 156 is a number reserved for fiction).
fn onboarding(now_unix: i64) -> Vec<(String, String)> {
    let mut p = pairs(&[
        ("business_type", "individual"),
        ("business_profile[mcc]", "8398"),
        ("business_profile[url]", "https://example.com"),
        ("individual[first_name]", "Jenny"),
        ("individual[last_name]", "Rosen"),
        ("individual[email]", "jenny.rosen@example.com"),
        ("individual[phone]", "+61491570156"),
        ("individual[dob][day]", "1"),
        ("individual[dob][month]", "1"),
        ("individual[dob][year]", "1901"),
        ("individual[address][line1]", "address_full_match"),
        ("individual[address][city]", "Sydney"),
        ("individual[address][state]", "NSW"),
        ("individual[address][postal_code]", "2000"),
        ("individual[address][country]", "AU"),
        ("tos_acceptance[ip]", "127.0.0.1"),
        ("external_account[object]", "bank_account"),
        ("external_account[country]", "AU"),
        ("external_account[currency]", "aud"),
        ("external_account[routing_number]", PAYOUT_BSB),
        ("external_account[account_number]", PAYOUT_ACCOUNT_NUMBER),
    ]);
    p.push(("tos_acceptance[date]".into(), now_unix.to_string()));
    p
}

/// The suite's Stripe calls, with the run id in every key and in every object's metadata.
#[derive(Clone)]
pub struct StripeApi {
    pub gateway: Arc<StripeGateway>,
    pub run_id: String,
}

impl StripeApi {
    pub async fn get(&self, op: &'static str, path: &str) -> Result<Value, Failure> {
        Ok(self
            .gateway
            .request_json(op, RawMethod::Get, path, &[], None, None)
            .await?)
    }

    /// A POST with its idempotency key derived from the run; an unknown outcome is sent again with the same key, so
    /// Stripe answers with what the first request did (the account it created) instead of doing it twice.
    async fn post(
        &self,
        op: &'static str,
        path: &str,
        params: &[(String, String)],
        key: &str,
    ) -> Result<Value, Failure> {
        let key = format!("splitpay-e2e:{}:{key}", self.run_id);
        let mut attempt = 1;
        loop {
            match self
                .gateway
                .request_json(op, RawMethod::Post, path, params, Some(&key), None)
                .await
            {
                Err(GatewayError::Unknown { .. }) if attempt < UNKNOWN_ATTEMPTS_MAX => {
                    tokio::time::sleep(Duration::from_millis(UNKNOWN_RETRY_MS)).await;
                    attempt += 1;
                }
                result => return Ok(result?),
            }
        }
    }

    /// A Custom AU account that requests `transfers`; `onboarded` gives it everything it needs to receive them.
    pub async fn create_account(&self, label: &str, onboarded: bool) -> Result<String, Failure> {
        let mut params = pairs(&[
            ("type", "custom"),
            ("country", "AU"),
            ("email", "jenny.rosen@example.com"),
            ("capabilities[transfers][requested]", "true"),
            ("metadata[splitpay_e2e_run]", &self.run_id),
            ("metadata[splitpay_e2e_role]", label),
        ]);
        if onboarded {
            params.extend(onboarding(chrono::Utc::now().timestamp()));
        }
        let account = self
            .post("e2e_create_account", "/accounts", &params, &format!("account:{label}"))
            .await?;
        let id = account["id"]
            .as_str()
            .filter(|id| id.starts_with("acct_"))
            .ok_or_else(|| format!("Stripe created an account without an acct_ id: {account}"))?;
        Ok(id.to_owned())
    }

    /// Finishes an account's onboarding (terms, bank account, details) after the fact.
    pub async fn onboard(&self, account: &str) -> Result<(), Failure> {
        let params = onboarding(chrono::Utc::now().timestamp());
        self.post(
            "e2e_update_account",
            &format!("/accounts/{account}"),
            &params,
            &format!("onboard:{account}"),
        )
        .await?;
        Ok(())
    }

    /// Waits (bounded) until Stripe says `account` can receive transfers.
    pub async fn wait_transfers_active(&self, account: &str, wait_ms_max: u64) -> Result<(), Failure> {
        let mut waited_ms = 0;
        loop {
            let info = self.gateway.retrieve_account(account).await?;
            if info.can_receive_transfers() {
                return Ok(());
            }
            if waited_ms >= wait_ms_max {
                return Err(format!(
                    "{account}'s transfers capability is still {:?} after {} s (requirements due: {:?})",
                    info.transfers_capability,
                    wait_ms_max / 1_000,
                    info.requirements_due
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(CAPABILITY_POLL_MS)).await;
            waited_ms += CAPABILITY_POLL_MS;
        }
    }

    /// `DELETE /v1/accounts/{id}` (test-mode accounts can always be deleted).
    /// An unknown outcome is asked again: "no such account" after a lost answer means the first one deleted it.
    pub async fn delete_account(&self, account: &str) -> Result<(), Failure> {
        let mut attempt = 1;
        loop {
            let result = self
                .gateway
                .request_json(
                    "e2e_delete_account",
                    RawMethod::Delete,
                    &format!("/accounts/{account}"),
                    &[],
                    None,
                    None,
                )
                .await;
            match result {
                Ok(deleted) if deleted["deleted"] == true => return Ok(()),
                Ok(other) => return Err(format!("Stripe did not delete {account}: {other}").into()),
                Err(GatewayError::Unknown { .. }) if attempt < UNKNOWN_ATTEMPTS_MAX => {
                    tokio::time::sleep(Duration::from_millis(UNKNOWN_RETRY_MS)).await;
                    attempt += 1;
                }
                Err(e) if attempt > 1 && e.code() == Some("resource_missing") => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The donor's browser confirms a BECS PaymentIntent: the bank account and the mandate the donor accepted.
    pub async fn confirm_becs(&self, payment_intent: &str, account_number: &str) -> Result<Value, Failure> {
        let params = pairs(&[
            ("payment_method_data[type]", "au_becs_debit"),
            ("payment_method_data[au_becs_debit][bsb_number]", BECS_BSB),
            ("payment_method_data[au_becs_debit][account_number]", account_number),
            ("payment_method_data[billing_details][name]", "Jenny Rosen"),
            ("payment_method_data[billing_details][email]", "jenny.rosen@example.com"),
            ("mandate_data[customer_acceptance][type]", "online"),
            ("mandate_data[customer_acceptance][online][ip_address]", "127.0.0.1"),
            ("mandate_data[customer_acceptance][online][user_agent]", "splitpay-e2e"),
        ]);
        self.post(
            "e2e_confirm_becs",
            &format!("/payment_intents/{payment_intent}/confirm"),
            &params,
            &format!("confirm:{payment_intent}"),
        )
        .await
    }
}
