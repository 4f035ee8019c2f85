//! Talking to Stripe: the [`PaymentGateway`] port (the operations splitpay needs, in splitpay's own types), its
//! async-stripe implementation, and a local Stripe simulator for tests and the demo.
//!
//! - [`error`]: every failure classified by what the caller does next: retry, park, or reconcile (unknown).
//! - [`transport`]: the HTTP transport behind async-stripe's request builders (fills gaps of async-stripe's own).
//! - [`gateway`]: [`StripeGateway`], the port over async-stripe, with the rate limiter and bounded retries.
//! - [`limiter`], [`shared_limiter`], [`backoff`]: the token bucket (per process, or one budget for every replica
//!   through PostgreSQL) and the retry delay policy.
//! - [`keys`]: secret keys; live keys refused unless allowed.
//! - [`webhook`]: `Stripe-Signature` verification.
//! - [`sim`]: the simulator, served over HTTP like Stripe.
//!
//! Every mutation takes an explicit idempotency key from the caller, derived from splitpay's row ids: the port has
//! no way to send a random one.

pub mod backoff;
pub mod error;
pub mod gateway;
pub mod keys;
pub mod limiter;
pub mod shared_limiter;
pub mod sim;
pub mod transport;
pub mod webhook;

use std::collections::BTreeMap;

pub use error::GatewayError;
pub use gateway::{GatewayConfig, StripeGateway};

use crate::domain::plan::PaymentMethodType;

/// Our ids in every object we create, so any Stripe object can be matched back to its row.
pub type Metadata = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatePaymentIntentParams {
    pub amount_cents: i64,
    /// Stripe's lowercase code.
    pub currency: String,
    pub payment_method_type: PaymentMethodType,
    pub transfer_group: String,
    pub metadata: Metadata,
    /// Confirm at once with this PaymentMethod (server-side confirmation: tests, demo, saved methods).
    pub payment_method: Option<String>,
    pub idempotency_key: String,
}

/// Stripe's PaymentIntent statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntentStatus {
    RequiresPaymentMethod,
    RequiresConfirmation,
    RequiresAction,
    Processing,
    RequiresCapture,
    Canceled,
    Succeeded,
}

impl IntentStatus {
    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "requires_payment_method" => IntentStatus::RequiresPaymentMethod,
            "requires_confirmation" => IntentStatus::RequiresConfirmation,
            "requires_action" => IntentStatus::RequiresAction,
            "processing" => IntentStatus::Processing,
            "requires_capture" => IntentStatus::RequiresCapture,
            "canceled" => IntentStatus::Canceled,
            "succeeded" => IntentStatus::Succeeded,
            _ => return None,
        })
    }
}

/// Why a PaymentIntent is canceled (the values Stripe lets a caller give).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancellationReason {
    /// Nobody paid within the time allowed.
    Abandoned,
    Duplicate,
    Fraudulent,
    RequestedByCustomer,
}

impl CancellationReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CancellationReason::Abandoned => "abandoned",
            CancellationReason::Duplicate => "duplicate",
            CancellationReason::Fraudulent => "fraudulent",
            CancellationReason::RequestedByCustomer => "requested_by_customer",
        }
    }
}

/// Why a payment failed, as Stripe reports it (`last_payment_error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentFailure {
    pub code: Option<String>,
    pub decline_code: Option<String>,
    pub message: Option<String>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct PaymentIntentInfo {
    pub id: String,
    pub status: IntentStatus,
    pub amount_cents: i64,
    pub currency: String,
    pub latest_charge: Option<String>,
    /// Handed to the donor's browser; never logged (see the `Debug` impl).
    pub client_secret: Option<String>,
    pub last_payment_error: Option<PaymentFailure>,
    pub transfer_group: Option<String>,
    pub metadata: Metadata,
    /// The PaymentMethod attached; Stripe detaches a declined one (null), so a retry needs a new one.
    pub payment_method: Option<String>,
    /// Null until canceled (`abandoned`, `requested_by_customer`, … or one Stripe sets itself).
    pub cancellation_reason: Option<String>,
}

impl std::fmt::Debug for PaymentIntentInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaymentIntentInfo")
            .field("id", &self.id)
            .field("status", &self.status)
            .field("amount_cents", &self.amount_cents)
            .field("currency", &self.currency)
            .field("latest_charge", &self.latest_charge)
            .field("client_secret", &self.client_secret.as_ref().map(|_| "[redacted]"))
            .field("last_payment_error", &self.last_payment_error)
            .field("transfer_group", &self.transfer_group)
            .field("metadata", &self.metadata)
            .field("payment_method", &self.payment_method)
            .field("cancellation_reason", &self.cancellation_reason)
            .finish()
    }
}

/// The fee and net of a charge (its balance transaction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalanceTransactionInfo {
    pub id: String,
    pub amount_cents: i64,
    pub fee_cents: i64,
    pub net_cents: i64,
    pub currency: String,
    /// Unix seconds when the funds become available.
    pub available_on: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeInfo {
    pub id: String,
    pub amount_cents: i64,
    pub amount_refunded_cents: i64,
    pub currency: String,
    /// `succeeded`, `pending` or `failed`.
    pub status: String,
    pub payment_intent: Option<String>,
    pub transfer_group: Option<String>,
    /// `None` while Stripe has not settled the fee yet (asynchronous capture): try again later, never guess.
    pub balance_transaction: Option<BalanceTransactionInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateTransferParams {
    pub destination: String,
    pub amount_cents: i64,
    pub currency: String,
    /// The charge (`ch_…`) the money comes from; the transfer waits for its funds.
    pub source_transaction: Option<String>,
    pub transfer_group: String,
    pub metadata: Metadata,
    pub idempotency_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferInfo {
    pub id: String,
    pub amount_cents: i64,
    pub amount_reversed_cents: i64,
    pub currency: String,
    pub destination: Option<String>,
    pub source_transaction: Option<String>,
    pub transfer_group: Option<String>,
    pub reversed: bool,
    pub metadata: Metadata,
    /// The reversals the transfer object lists (Stripe embeds the first page: see `reversals_listed_all`).
    pub reversals: Vec<TransferReversalInfo>,
    /// Whether `reversals` is every reversal of the transfer (Stripe's embedded list had no more).
    pub reversals_listed_all: bool,
}

/// One reversal of a transfer, as the transfer object lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferReversalInfo {
    pub id: String,
    pub amount_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReversalOutcome {
    Reversed {
        reversal_id: String,
        amount_cents: i64,
    },
    /// Stripe said the transfer is already fully reversed: the money is back, which is what was asked.
    AlreadyFullyReversed,
}

/// One reversal of a transfer, as Stripe lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReversalInfo {
    pub id: String,
    pub amount_cents: i64,
    /// Ours when splitpay made it: [`REVERSAL_REF_KEY`] names our `transfer_reversals` row.
    pub metadata: Metadata,
}

/// Metadata key naming our `transfer_reversals` row on a reversal splitpay makes, so a lookup can find it.
pub const REVERSAL_REF_KEY: &str = "splitpay_reversal_ref";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundTarget {
    PaymentIntent(String),
    Charge(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateRefundParams {
    pub target: RefundTarget,
    /// `None` refunds everything still refundable.
    pub amount_cents: Option<i64>,
    /// Stripe's `reason`; `ops refund` sends `requested_by_customer`.
    pub reason: Option<RefundReason>,
    pub metadata: Metadata,
    pub idempotency_key: String,
}

/// The reasons a caller may give a refund (Stripe sets `expired_uncaptured_charge` itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundReason {
    Duplicate,
    Fraudulent,
    RequestedByCustomer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundInfo {
    pub id: String,
    pub amount_cents: i64,
    pub currency: String,
    /// `pending`, `requires_action`, `succeeded`, `failed` or `canceled`.
    pub status: Option<String>,
    pub charge: Option<String>,
    pub payment_intent: Option<String>,
    /// Ours when splitpay made the refund: `split_allocation_id`, `split_payment_id`, `refund_ref`.
    pub metadata: Metadata,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountInfo {
    pub id: String,
    pub charges_enabled: bool,
    pub payouts_enabled: bool,
    /// The `transfers` capability's status (`active`, `inactive`, `pending`), if requested.
    pub transfers_capability: Option<String>,
    /// `requirements.currently_due` and `past_due` (what the account still has to provide), when Stripe says.
    pub requirements_due: Vec<String>,
    /// `requirements.disabled_reason`, when Stripe gives one.
    pub disabled_reason: Option<String>,
}

impl AccountInfo {
    pub fn can_receive_transfers(&self) -> bool {
        self.transfers_capability.as_deref() == Some("active")
    }
}

/// The operations splitpay needs from Stripe. Implemented by [`StripeGateway`] over async-stripe; the tests and
/// the demo point it at the simulator.
#[async_trait::async_trait]
pub trait PaymentGateway: Send + Sync {
    async fn create_payment_intent(
        &self,
        params: &CreatePaymentIntentParams,
    ) -> Result<PaymentIntentInfo, GatewayError>;
    async fn retrieve_payment_intent(&self, id: &str) -> Result<PaymentIntentInfo, GatewayError>;
    async fn confirm_payment_intent(
        &self,
        id: &str,
        payment_method: &str,
        idempotency_key: &str,
    ) -> Result<PaymentIntentInfo, GatewayError>;
    async fn cancel_payment_intent(
        &self,
        id: &str,
        reason: Option<CancellationReason>,
        idempotency_key: &str,
    ) -> Result<PaymentIntentInfo, GatewayError>;
    /// The charge with its balance transaction expanded.
    async fn retrieve_charge(&self, id: &str) -> Result<ChargeInfo, GatewayError>;
    async fn create_transfer(&self, params: &CreateTransferParams) -> Result<TransferInfo, GatewayError>;
    /// Every transfer of a transfer group (all pages, bounded).
    async fn list_transfers(&self, transfer_group: &str) -> Result<Vec<TransferInfo>, GatewayError>;
    /// Reverses `amount_cents` of a transfer (`None`: all of what is left).
    async fn reverse_transfer(
        &self,
        transfer_id: &str,
        amount_cents: Option<i64>,
        idempotency_key: &str,
    ) -> Result<ReversalOutcome, GatewayError> {
        self.create_reversal(transfer_id, amount_cents, &Metadata::new(), idempotency_key)
            .await
    }
    /// As [`Self::reverse_transfer`], with `metadata` on the reversal (none is sent when it is empty).
    async fn create_reversal(
        &self,
        transfer_id: &str,
        amount_cents: Option<i64>,
        metadata: &Metadata,
        idempotency_key: &str,
    ) -> Result<ReversalOutcome, GatewayError>;
    /// Every reversal of a transfer (all pages, bounded).
    async fn list_reversals(&self, transfer_id: &str) -> Result<Vec<ReversalInfo>, GatewayError>;
    async fn create_refund(&self, params: &CreateRefundParams) -> Result<RefundInfo, GatewayError>;
    /// Every refund of a charge (all pages, bounded): the truth a `charge.refunded` webhook may truncate.
    async fn list_refunds(&self, charge_id: &str) -> Result<Vec<RefundInfo>, GatewayError>;
    async fn retrieve_account(&self, id: &str) -> Result<AccountInfo, GatewayError>;
    /// One page of the platform's events of `types` created at or after `created_gte_unix` (and at or before
    /// `created_lte_unix`, when given), newest first, after `starting_after` when given: each event raw, as Stripe
    /// sent it (what the webhook inbox stores).
    async fn list_events(
        &self,
        types: &[&str],
        created_gte_unix: i64,
        created_lte_unix: Option<i64>,
        starting_after: Option<&str>,
    ) -> Result<EventPage, GatewayError>;
}

/// A page of [`PaymentGateway::list_events`].
#[derive(Debug, Clone, Default)]
pub struct EventPage {
    pub events: Vec<serde_json::Value>,
    pub has_more: bool,
}
