//! [`StripeGateway`]: the [`PaymentGateway`] port over async-stripe's request builders and our [`HttpTransport`].
//!
//! Every call waits for the rate limiter; a *retryable* failure is retried a bounded number of times with backoff
//! and the same idempotency key; anything else is returned to the caller, classified. Outcome-unknown failures are
//! not retried here: the caller records them and retries with the same key later (or looks the object up).

use std::collections::HashMap;
use std::time::Duration;

use stripe::{IdempotencyKey, RequestStrategy, StripeRequest};
use stripe_client_core::CustomizableStripeRequest;
use stripe_connect::account::RetrieveAccount;
use stripe_connect::transfer::{CreateTransfer, ListTransfer};
use stripe_connect::transfer_reversal::{CreateIdTransferReversal, ListIdTransferReversal};
use stripe_core::charge::RetrieveCharge;
use stripe_core::payment_intent::{
    CancelPaymentIntent, ConfirmPaymentIntent, CreatePaymentIntent, RetrievePaymentIntent,
};
use stripe_core::refund::{CreateRefund, CreateRefundReason, ListRefund};
use stripe_types::Expandable;

use super::backoff::backoff_ms_random;
use super::error::{ErrorClass, GatewayError};
use super::keys::{KeyMode, StripeKey};
use super::limiter::{Limiter, RateLimiter, LIVE_MODE_RATE_PER_SEC, TEST_MODE_RATE_PER_SEC};
use super::shared_limiter::{default_lease_slots, key_fingerprint, SharedLimiter, SharedLimiterConfig};
use super::transport::{HttpTransport, TransportError};
use super::*;

/// Pages read at most when listing a transfer group: a group holds at most 50 allocations × a few generations.
const LIST_PAGES_MAX: usize = 20;
const LIST_PAGE_SIZE: i64 = 100;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub api_base: String,
    /// Per request.
    pub timeout_ms: u64,
    /// `None`: 25/s for test keys, 100/s for live keys.
    pub rate_per_sec: Option<u32>,
    pub burst: u32,
    /// Slots one process may hold from the shared budget (`None`: 100 ms of the rate); see
    /// [`StripeGateway::share_budget`].
    pub lease_slots: Option<u32>,
    /// Attempts for one call when Stripe says "retry" (the first included).
    pub attempts_max: u32,
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            api_base: super::transport::STRIPE_API_BASE.to_owned(),
            timeout_ms: 20_000,
            rate_per_sec: None,
            burst: 1,
            lease_slots: None,
            attempts_max: 4,
            backoff_base_ms: 250,
            backoff_cap_ms: 4_000,
        }
    }
}

#[derive(Debug)]
pub struct StripeGateway {
    transport: HttpTransport,
    limiter: Limiter,
    /// The key's fingerprint (never the key): names the shared budget.
    account_fingerprint: String,
    /// The rate in force, per second: the configured one, or the key mode's default.
    rate_per_sec: u32,
    config: GatewayConfig,
}

impl StripeGateway {
    pub fn new(key: &StripeKey, config: GatewayConfig) -> Result<Self, GatewayError> {
        let transport = HttpTransport::new(key, &config.api_base, Duration::from_millis(config.timeout_ms))
            .map_err(GatewayError::from)?;
        let default_rate = match key.mode() {
            KeyMode::Test => TEST_MODE_RATE_PER_SEC,
            KeyMode::Live => LIVE_MODE_RATE_PER_SEC,
        };
        let rate_per_sec = config.rate_per_sec.unwrap_or(default_rate).max(1);
        Ok(Self {
            transport,
            limiter: Limiter::Local(RateLimiter::new(rate_per_sec, config.burst.max(1))),
            account_fingerprint: key_fingerprint(key.secret().expose()),
            rate_per_sec,
            config,
        })
    }

    /// Replaces the per-process limiter with one budget shared through the database `pool` points at, by every
    /// process that uses the same key (see [`SharedLimiter`]). `serve`, `worker` and `ops` run with it.
    pub fn share_budget(mut self, pool: &sqlx::PgPool) -> Self {
        let config = SharedLimiterConfig {
            rate_per_sec: self.rate_per_sec,
            burst: self.config.burst.max(1),
            lease_slots: self
                .config
                .lease_slots
                .unwrap_or_else(|| default_lease_slots(self.rate_per_sec)),
        };
        self.limiter = Limiter::Shared(SharedLimiter::new(pool, self.account_fingerprint.clone(), config));
        self
    }

    /// The shared limiter, when [`Self::share_budget`] installed one.
    pub fn shared_limiter(&self) -> Option<&SharedLimiter> {
        match &self.limiter {
            Limiter::Shared(limiter) => Some(limiter),
            Limiter::Local(_) => None,
        }
    }

    /// Sends one request (limited, retried while retryable), with `key` as its idempotency key if given.
    async fn send<T: miniserde::Deserialize>(
        &self,
        op: &'static str,
        make: impl Fn() -> CustomizableStripeRequest<T> + Send + Sync,
        key: Option<&str>,
    ) -> Result<T, GatewayError> {
        let strategy = match key {
            Some(k) => RequestStrategy::Idempotent(
                IdempotencyKey::new(k).map_err(|e| GatewayError::Config(format!("idempotency key: {e}")))?,
            ),
            None => RequestStrategy::Once,
        };
        let mut attempt = 1;
        loop {
            self.limiter.acquire().await;
            // A request is consumed by `send`: build the same one again for each attempt (same key, same body).
            let result: Result<T, TransportError> =
                make().request_strategy(strategy.clone()).send(&self.transport).await;
            let err = match result {
                Ok(value) => return Ok(value),
                Err(e) => GatewayError::from(e),
            };
            if err.code() == Some("rate_limit") {
                // Stripe's budget is the account's: every replica slows down, not only this request.
                self.limiter.throttled().await;
            }
            // A coded refusal Stripe saved under the key (e.g. `balance_insufficient`) would only be replayed: the
            // caller decides whether to try again under its next key attempt.
            let replayed_if_resent = key.is_some() && err.is_saved_refusal();
            if err.class() != ErrorClass::Retryable || replayed_if_resent || attempt >= self.config.attempts_max {
                tracing::warn!(op, attempt, class = ?err.class(), code = err.code(), error = %err, "Stripe call failed");
                return Err(err);
            }
            let delay_ms = backoff_ms_random(attempt, self.config.backoff_base_ms, self.config.backoff_cap_ms);
            tracing::info!(
                op,
                attempt,
                delay_ms,
                code = err.code(),
                "Stripe asked to retry; backing off"
            );
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            attempt += 1;
        }
    }
}

/// What [`StripeGateway::request_json`] sends: a method, a path under `/v1` and form parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawMethod {
    Get,
    Post,
    Delete,
}

impl StripeGateway {
    /// A request the port has no operation for (the end-to-end suite's fixtures: connected accounts, payment
    /// confirmation as the donor's browser does it, the event list, balance transactions), through the same limiter,
    /// bounded retries and transport as every other call. `path` starts with `/` (`/accounts`); `params` are Stripe's
    /// form fields (`external_account[country]`); `stripe_account` sets `Stripe-Account`.
    ///
    /// Answers Stripe's raw JSON. Gap in async-stripe (1.0.0-rc.10): its typed `Event` keeps only the fields of its
    /// own types (`EventObject::Unknown` drops the object of a type it does not know), and the inbox stores events as
    /// Stripe sent them, so the event list is read raw; the request builders and transport are still async-stripe's.
    pub async fn request_json(
        &self,
        op: &'static str,
        method: RawMethod,
        path: &str,
        params: &[(String, String)],
        idempotency_key: Option<&str>,
        stripe_account: Option<&str>,
    ) -> Result<serde_json::Value, GatewayError> {
        use stripe_client_core::{RequestBuilder, StripeMethod};
        let encoded = (!params.is_empty()).then(|| {
            form_urlencoded::Serializer::new(String::new())
                .extend_pairs(params)
                .finish()
        });
        let account = stripe_account
            .map(|a| {
                a.parse::<stripe_shared::AccountId>()
                    .map_err(|_| GatewayError::Config(format!("'{a}' is not an account id")))
            })
            .transpose()?;
        let make = || {
            let mut builder = RequestBuilder::new(
                match method {
                    RawMethod::Get => StripeMethod::Get,
                    RawMethod::Post => StripeMethod::Post,
                    RawMethod::Delete => StripeMethod::Delete,
                },
                path,
            );
            match method {
                RawMethod::Post => builder.body = encoded.clone(),
                RawMethod::Get | RawMethod::Delete => builder.query = encoded.clone(),
            }
            let request = builder.customize::<miniserde::json::Value>();
            match &account {
                Some(id) => request.account_id(id.clone()),
                None => request,
            }
        };
        let value = self.send(op, make, idempotency_key).await?;
        serde_json::from_str(&miniserde::json::to_string(&value)).map_err(|e| GatewayError::Unknown {
            reason: format!("{op}: Stripe's answer could not be read as JSON: {e}"),
        })
    }
}

fn metadata_map(metadata: &Metadata) -> HashMap<String, String> {
    metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn sorted(metadata: HashMap<String, String>) -> Metadata {
    metadata.into_iter().collect()
}

fn expandable_id<T: stripe_types::Object>(e: &Expandable<T>) -> String
where
    T::Id: AsRef<str>,
{
    e.id().as_ref().to_owned()
}

fn intent_info(pi: stripe_shared::PaymentIntent) -> Result<PaymentIntentInfo, GatewayError> {
    let status = IntentStatus::parse(pi.status.as_str()).ok_or_else(|| GatewayError::Unknown {
        reason: format!("unknown PaymentIntent status {}", pi.status.as_str()),
    })?;
    Ok(PaymentIntentInfo {
        id: pi.id.as_str().to_owned(),
        status,
        amount_cents: pi.amount,
        currency: pi.currency.to_string(),
        latest_charge: pi.latest_charge.as_ref().map(expandable_id),
        client_secret: pi.client_secret,
        last_payment_error: pi.last_payment_error.map(|e| PaymentFailure {
            code: e.code.map(|c| c.as_str().to_owned()),
            decline_code: e.decline_code,
            message: e.message,
        }),
        transfer_group: pi.transfer_group,
        metadata: sorted(pi.metadata),
        payment_method: pi.payment_method.as_ref().map(expandable_id),
        cancellation_reason: pi.cancellation_reason.map(|r| r.as_str().to_owned()),
    })
}

fn transfer_info(t: stripe_shared::Transfer) -> TransferInfo {
    TransferInfo {
        id: t.id.as_str().to_owned(),
        amount_cents: t.amount,
        amount_reversed_cents: t.amount_reversed,
        currency: t.currency.to_string(),
        destination: t.destination.as_ref().map(expandable_id),
        source_transaction: t.source_transaction.as_ref().map(expandable_id),
        transfer_group: t.transfer_group,
        reversed: t.reversed,
        reversals: t
            .reversals
            .data
            .iter()
            .map(|r| TransferReversalInfo {
                id: r.id.as_str().to_owned(),
                amount_cents: r.amount,
            })
            .collect(),
        reversals_listed_all: !t.reversals.has_more,
        metadata: sorted(t.metadata),
    }
}

fn refund_info(refund: stripe_shared::Refund) -> RefundInfo {
    RefundInfo {
        id: refund.id.as_str().to_owned(),
        amount_cents: refund.amount,
        currency: refund.currency.to_string(),
        status: refund.status,
        charge: refund.charge.as_ref().map(expandable_id),
        payment_intent: refund.payment_intent.as_ref().map(expandable_id),
        metadata: refund.metadata.map(sorted).unwrap_or_default(),
        reason: refund.reason.map(|r| r.as_str().to_owned()),
    }
}

fn currency(code: &str) -> Result<stripe_types::Currency, GatewayError> {
    code.parse()
        .map_err(|_| GatewayError::Config(format!("currency '{code}' is not one Stripe knows")))
}

#[async_trait::async_trait]
impl PaymentGateway for StripeGateway {
    async fn create_payment_intent(&self, p: &CreatePaymentIntentParams) -> Result<PaymentIntentInfo, GatewayError> {
        use stripe_shared::PaymentIntentAllowedPaymentMethodTypes as Allowed;
        let allowed = match p.payment_method_type {
            crate::domain::plan::PaymentMethodType::Card => Allowed::Card,
            crate::domain::plan::PaymentMethodType::AuBecsDebit => Allowed::AuBecsDebit,
            crate::domain::plan::PaymentMethodType::Payto => Allowed::Payto,
        };
        let mut builder = CreatePaymentIntent::new(p.amount_cents, currency(&p.currency)?)
            .allowed_payment_method_types(vec![allowed])
            .transfer_group(p.transfer_group.clone())
            .metadata(metadata_map(&p.metadata));
        if let Some(pm) = &p.payment_method {
            builder = builder.payment_method(pm.clone()).confirm(true);
        }
        let pi = self
            .send(
                "create_payment_intent",
                || builder.customize(),
                Some(&p.idempotency_key),
            )
            .await?;
        intent_info(pi)
    }

    async fn retrieve_payment_intent(&self, id: &str) -> Result<PaymentIntentInfo, GatewayError> {
        let pi = self
            .send(
                "retrieve_payment_intent",
                || RetrievePaymentIntent::new(id).customize(),
                None,
            )
            .await?;
        intent_info(pi)
    }

    async fn confirm_payment_intent(&self, id: &str, pm: &str, key: &str) -> Result<PaymentIntentInfo, GatewayError> {
        let builder = ConfirmPaymentIntent::new(id).payment_method(pm.to_owned());
        intent_info(
            self.send("confirm_payment_intent", || builder.customize(), Some(key))
                .await?,
        )
    }

    async fn cancel_payment_intent(
        &self,
        id: &str,
        reason: Option<CancellationReason>,
        key: &str,
    ) -> Result<PaymentIntentInfo, GatewayError> {
        use stripe_core::payment_intent::CancelPaymentIntentCancellationReason as Reason;
        let mut builder = CancelPaymentIntent::new(id);
        if let Some(reason) = reason {
            builder = builder.cancellation_reason(match reason {
                CancellationReason::Abandoned => Reason::Abandoned,
                CancellationReason::Duplicate => Reason::Duplicate,
                CancellationReason::Fraudulent => Reason::Fraudulent,
                CancellationReason::RequestedByCustomer => Reason::RequestedByCustomer,
            });
        }
        intent_info(
            self.send("cancel_payment_intent", || builder.customize(), Some(key))
                .await?,
        )
    }

    async fn retrieve_charge(&self, id: &str) -> Result<ChargeInfo, GatewayError> {
        let builder = RetrieveCharge::new(id).expand(vec!["balance_transaction".to_owned()]);
        let charge: stripe_shared::Charge = self.send("retrieve_charge", || builder.customize(), None).await?;
        let balance_transaction = match charge.balance_transaction {
            None => None,
            Some(Expandable::Object(bt)) => Some(BalanceTransactionInfo {
                id: bt.id.as_str().to_owned(),
                amount_cents: bt.amount,
                fee_cents: bt.fee,
                net_cents: bt.net,
                currency: bt.currency.to_string(),
                available_on: bt.available_on,
            }),
            Some(Expandable::Id(id)) => {
                return Err(GatewayError::Unknown {
                    reason: format!("balance transaction {} was not expanded", id.as_str()),
                })
            }
        };
        Ok(ChargeInfo {
            id: charge.id.as_str().to_owned(),
            amount_cents: charge.amount,
            amount_refunded_cents: charge.amount_refunded,
            currency: charge.currency.to_string(),
            status: charge.status.as_str().to_owned(),
            payment_intent: charge.payment_intent.as_ref().map(expandable_id),
            transfer_group: charge.transfer_group,
            balance_transaction,
        })
    }

    async fn create_transfer(&self, p: &CreateTransferParams) -> Result<TransferInfo, GatewayError> {
        let mut builder = CreateTransfer::new(currency(&p.currency)?, p.destination.clone())
            .amount(p.amount_cents)
            .transfer_group(p.transfer_group.clone())
            .metadata(metadata_map(&p.metadata));
        if let Some(source) = &p.source_transaction {
            builder = builder.source_transaction(source.clone());
        }
        Ok(transfer_info(
            self.send("create_transfer", || builder.customize(), Some(&p.idempotency_key))
                .await?,
        ))
    }

    async fn list_transfers(&self, transfer_group: &str) -> Result<Vec<TransferInfo>, GatewayError> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..LIST_PAGES_MAX {
            let mut builder = ListTransfer::new()
                .transfer_group(transfer_group.to_owned())
                .limit(LIST_PAGE_SIZE);
            if let Some(last) = &after {
                builder = builder.starting_after(last.clone());
            }
            let page: stripe_types::List<stripe_shared::Transfer> =
                self.send("list_transfers", || builder.customize(), None).await?;
            after = page.data.last().map(|t| t.id.as_str().to_owned());
            all.extend(page.data.into_iter().map(transfer_info));
            if !page.has_more || after.is_none() {
                return Ok(all);
            }
        }
        Err(GatewayError::Unknown {
            reason: format!("transfer group {transfer_group} has more than {} pages", LIST_PAGES_MAX),
        })
    }

    async fn create_reversal(
        &self,
        transfer_id: &str,
        amount_cents: Option<i64>,
        metadata: &Metadata,
        key: &str,
    ) -> Result<ReversalOutcome, GatewayError> {
        let mut builder = CreateIdTransferReversal::new(transfer_id);
        if let Some(amount) = amount_cents {
            builder = builder.amount(amount);
        }
        if !metadata.is_empty() {
            builder = builder.metadata(metadata_map(metadata));
        }
        match self
            .send::<stripe_shared::TransferReversal>("reverse_transfer", || builder.customize(), Some(key))
            .await
        {
            Ok(r) => Ok(ReversalOutcome::Reversed {
                reversal_id: r.id.as_str().to_owned(),
                amount_cents: r.amount,
            }),
            // Stripe's words for a transfer with nothing left to reverse: the money is already back.
            Err(GatewayError::Terminal { ref message, .. }) if message.contains("already fully reversed") => {
                Ok(ReversalOutcome::AlreadyFullyReversed)
            }
            Err(e) => Err(e),
        }
    }

    async fn list_reversals(&self, transfer_id: &str) -> Result<Vec<ReversalInfo>, GatewayError> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..LIST_PAGES_MAX {
            let mut builder = ListIdTransferReversal::new(transfer_id).limit(LIST_PAGE_SIZE);
            if let Some(last) = &after {
                builder = builder.starting_after(last.clone());
            }
            let page: stripe_types::List<stripe_shared::TransferReversal> =
                self.send("list_reversals", || builder.customize(), None).await?;
            after = page.data.last().map(|r| r.id.as_str().to_owned());
            all.extend(page.data.into_iter().map(|r| ReversalInfo {
                id: r.id.as_str().to_owned(),
                amount_cents: r.amount,
                metadata: r.metadata.map(sorted).unwrap_or_default(),
            }));
            if !page.has_more || after.is_none() {
                return Ok(all);
            }
        }
        Err(GatewayError::Unknown {
            reason: format!("transfer {transfer_id} has more than {LIST_PAGES_MAX} pages of reversals"),
        })
    }

    async fn create_refund(&self, p: &CreateRefundParams) -> Result<RefundInfo, GatewayError> {
        let mut builder = CreateRefund::new().metadata(metadata_map(&p.metadata));
        builder = match &p.target {
            RefundTarget::PaymentIntent(pi) => builder.payment_intent(pi.clone()),
            RefundTarget::Charge(ch) => builder.charge(ch.clone()),
        };
        if let Some(amount) = p.amount_cents {
            builder = builder.amount(amount);
        }
        if let Some(reason) = p.reason {
            builder = builder.reason(match reason {
                RefundReason::Duplicate => CreateRefundReason::Duplicate,
                RefundReason::Fraudulent => CreateRefundReason::Fraudulent,
                RefundReason::RequestedByCustomer => CreateRefundReason::RequestedByCustomer,
            });
        }
        let refund: stripe_shared::Refund = self
            .send("create_refund", || builder.customize(), Some(&p.idempotency_key))
            .await?;
        Ok(refund_info(refund))
    }

    async fn list_refunds(&self, charge_id: &str) -> Result<Vec<RefundInfo>, GatewayError> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..LIST_PAGES_MAX {
            let mut builder = ListRefund::new().charge(charge_id.to_owned()).limit(LIST_PAGE_SIZE);
            if let Some(last) = &after {
                builder = builder.starting_after(last.clone());
            }
            let page: stripe_types::List<stripe_shared::Refund> =
                self.send("list_refunds", || builder.customize(), None).await?;
            after = page.data.last().map(|r| r.id.as_str().to_owned());
            all.extend(page.data.into_iter().map(refund_info));
            if !page.has_more || after.is_none() {
                return Ok(all);
            }
        }
        Err(GatewayError::Unknown {
            reason: format!("charge {charge_id} has more than {LIST_PAGES_MAX} pages of refunds"),
        })
    }

    async fn list_events(
        &self,
        types: &[&str],
        created_gte_unix: i64,
        created_lte_unix: Option<i64>,
        starting_after: Option<&str>,
    ) -> Result<super::EventPage, GatewayError> {
        // Read raw (see `request_json`: async-stripe's typed `Event` drops objects of types it does not know).
        let mut params = vec![
            ("created[gte]".to_owned(), created_gte_unix.to_string()),
            ("limit".to_owned(), LIST_PAGE_SIZE.to_string()),
        ];
        if let Some(lte) = created_lte_unix {
            params.push(("created[lte]".to_owned(), lte.to_string()));
        }
        params.extend(types.iter().map(|t| ("types[]".to_owned(), (*t).to_owned())));
        if let Some(last) = starting_after {
            params.push(("starting_after".to_owned(), last.to_owned()));
        }
        let page = self
            .request_json("list_events", RawMethod::Get, "/events", &params, None, None)
            .await?;
        Ok(super::EventPage {
            events: page["data"].as_array().cloned().unwrap_or_default(),
            has_more: page["has_more"] == true,
        })
    }

    async fn retrieve_account(&self, id: &str) -> Result<AccountInfo, GatewayError> {
        let account: stripe_shared::Account = self
            .send("retrieve_account", || RetrieveAccount::new(id).customize(), None)
            .await?;
        let requirements = account.requirements.as_ref();
        let mut requirements_due: Vec<String> = requirements
            .into_iter()
            .flat_map(|r| r.past_due.iter().chain(r.currently_due.iter()).flatten().cloned())
            .collect();
        requirements_due.dedup();
        Ok(AccountInfo {
            id: account.id.as_str().to_owned(),
            charges_enabled: account.charges_enabled.unwrap_or(false),
            payouts_enabled: account.payouts_enabled.unwrap_or(false),
            transfers_capability: account
                .capabilities
                .and_then(|c| c.transfers)
                .map(|status| status.as_str().to_owned()),
            requirements_due,
            disabled_reason: requirements
                .and_then(|r| r.disabled_reason.as_ref())
                .map(|d| d.as_str().to_owned()),
        })
    }
}
