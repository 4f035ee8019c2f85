//! What the API and the workers share: the database, the Stripe gateway, and the distribution settings.

use std::sync::Arc;

use sqlx::PgPool;

use crate::domain::fees::{FeeSchedule, PlatformFee, ProcessingFeeEstimate};
use crate::domain::plan::{PaymentMethodType, PlanLimits};
use crate::stripe::PaymentGateway;

/// How distribution behaves; every number is a named, bounded setting.
#[derive(Debug, Clone)]
pub struct DistributionSettings {
    /// The platform's own fee, shared across allocations with Stripe's.
    pub platform_fee: PlatformFee,
    /// How long one transfer generation is retried with the same key (retryable errors and unknown outcomes)
    /// before a lookup may park it (`transfer_retry_window`, default 72 h). Only a lookup that succeeded and found
    /// nothing parks; otherwise the allocation stays TRANSFERRING, marked unresolved, and is retried.
    pub transfer_retry_window_ms: u64,
    /// Delay after Stripe throttled us (429, 409 in flight): a full-jitter pick up to this, not counted.
    pub throttle_delay_ms: u64,
    /// Times the fee split waits for a charge's balance transaction before giving up and alerting.
    pub fee_wait_attempts_max: i32,
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    /// Stripe's fees as estimated for a donor who covers them (the real fee always comes from the charge).
    pub processing_estimates: ProcessingEstimates,
    /// What intake accepts so that a payment can be distributed at all: settlement currencies only, and no
    /// allocation below the minimum (`SPLITPAY_SETTLEMENT_CURRENCIES`, `SPLITPAY_MIN_ALLOCATION_CENTS`).
    pub plan_limits: PlanLimits,
    /// The reconcilers' graces and intervals.
    pub reconcile: ReconcileSettings,
    /// When a connected account becomes able to receive transfers (`account.updated`), retry its shares parked for
    /// account reasons (`SPLITPAY_AUTO_RETRY_PARKED`, default on). The link's flags are refreshed either way.
    pub auto_retry_parked: bool,
    /// Shares one pass of that retry takes; the event's job continues with the rest in a next pass.
    pub auto_retry_batch: i64,
    /// What a refund of a transferred share takes back from the recipient (`SPLITPAY_REVERSE_ON_REFUND`).
    pub reverse_on_refund: ReversePolicy,
    /// How long distribution's own process has a share it just started (its first transfer, made at once): the
    /// share is committed due at the end of this lease, and the step is dropped when it ends, so the sweeper (which
    /// re-enqueues due shares) never adds a second driver to a step still running. Default 10 s: a crash leaves the
    /// share to the sweeper that much later.
    pub inline_transfer_lease_ms: u64,
}

/// What a refund of a transferred share takes back from its recipient.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReversePolicy {
    /// Reverse the recipient's share of the refunded part, `round(part × net / gross)`; the rest is platform loss.
    #[default]
    Proportional,
    /// Reverse nothing: the platform bears the whole refund (recorded as platform loss).
    None,
}

/// The cap on any retry delay of a transfer: never more than 5 minutes between attempts.
pub const TRANSFER_BACKOFF_CAP_MS_MAX: u64 = 300_000;

/// How the reconcilers pace themselves. Every duration is configurable (see `config::LifecycleSettings`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileSettings {
    /// A card payment is first asked about at Stripe this long after it was created, then every `card_interval`.
    pub card_grace_ms: u64,
    pub card_interval_ms: u64,
    /// The same for bank debits (BECS, PayTo), which stay `processing` for days.
    pub debit_grace_ms: u64,
    pub debit_interval_ms: u64,
    /// A PaymentIntent still unpaid this long after the payment was created is canceled (`abandon_after`).
    pub abandon_after_ms: u64,
    /// A TRANSFERRING allocation due this long ago without a job having moved it is driven again.
    pub transfer_grace_ms: u64,
    /// The transfer audit looks at payments that succeeded in this many last days, each at most once a day.
    pub audit_days: u32,
    /// Rows one reconcile tick takes per kind; the next tick takes the rest.
    pub batch_max: i64,
    /// The accounts sweep asks Stripe about a connected account with shares parked for account reasons at most once
    /// per this (`SPLITPAY_ACCOUNT_CHECK_INTERVAL`, default 10 min).
    pub account_check_interval_ms: u64,
}

impl Default for ReconcileSettings {
    fn default() -> Self {
        const MIN: u64 = 60_000;
        Self {
            card_grace_ms: 10 * MIN,
            card_interval_ms: 10 * MIN,
            debit_grace_ms: 60 * MIN,
            debit_interval_ms: 6 * 60 * MIN,
            abandon_after_ms: 24 * 60 * MIN,
            transfer_grace_ms: 2 * MIN,
            audit_days: 7,
            batch_max: 200,
            account_check_interval_ms: 10 * MIN,
        }
    }
}

impl ReconcileSettings {
    /// (grace, interval) for a payment method.
    pub fn pacing_ms(&self, method: PaymentMethodType) -> (u64, u64) {
        match method {
            PaymentMethodType::Card => (self.card_grace_ms, self.card_interval_ms),
            PaymentMethodType::AuBecsDebit | PaymentMethodType::Payto => (self.debit_grace_ms, self.debit_interval_ms),
        }
    }
}

/// Stripe's published AU pricing, used only to gross up a donor-covers-fees payment. BECS and PayTo are capped at
/// A$3.50 by Stripe; the estimate ignores the cap, so above A$320 a covering donor pays a little more than the fee
/// and the recipients receive it (never less than asked).
#[derive(Debug, Clone, Copy)]
pub struct ProcessingEstimates {
    pub card: ProcessingFeeEstimate,
    pub au_becs_debit: ProcessingFeeEstimate,
    pub payto: ProcessingFeeEstimate,
}

impl Default for ProcessingEstimates {
    fn default() -> Self {
        let estimate = |bps: i64, fixed_cents| ProcessingFeeEstimate {
            rate: rust_decimal::Decimal::new(bps, 4),
            fixed_cents,
        };
        Self {
            card: estimate(175, 30),
            au_becs_debit: estimate(100, 30),
            payto: estimate(100, 30),
        }
    }
}

impl DistributionSettings {
    /// The fees a donor covers when paying with `method`.
    pub fn fee_schedule(&self, method: PaymentMethodType) -> FeeSchedule {
        let processing = match method {
            PaymentMethodType::Card => self.processing_estimates.card,
            PaymentMethodType::AuBecsDebit => self.processing_estimates.au_becs_debit,
            PaymentMethodType::Payto => self.processing_estimates.payto,
        };
        FeeSchedule {
            processing,
            platform: self.platform_fee,
        }
    }
}

impl Default for DistributionSettings {
    fn default() -> Self {
        Self {
            processing_estimates: ProcessingEstimates::default(),
            platform_fee: PlatformFee::default(),
            transfer_retry_window_ms: 72 * 3_600_000,
            throttle_delay_ms: 2_000,
            fee_wait_attempts_max: 30,
            backoff_base_ms: 2_000,
            backoff_cap_ms: TRANSFER_BACKOFF_CAP_MS_MAX,
            reconcile: ReconcileSettings::default(),
            plan_limits: PlanLimits::default(),
            auto_retry_parked: true,
            auto_retry_batch: 100,
            reverse_on_refund: ReversePolicy::default(),
            inline_transfer_lease_ms: 10_000,
        }
    }
}

#[derive(Clone)]
pub struct AppContext {
    pub pool: PgPool,
    pub gateway: Arc<dyn PaymentGateway>,
    pub distribution: DistributionSettings,
    /// Outbound webhook delivery (timeout, claims).
    pub webhooks: crate::jobs::deliver::DeliverySettings,
    /// Records the transfers this context's steps got from Stripe, many per transaction.
    pub recorder: std::sync::Arc<crate::jobs::transfer_batch::Recorder>,
    /// Starts the succeeded payments this context's event jobs hand it, many per transaction.
    pub starter: std::sync::Arc<crate::jobs::start_batch::Starter>,
}

/// Builds the gateway the settings ask for: Stripe (or another base URL) with the configured key, or the local
/// simulator at `127.0.0.1:LOCAL_SIMULATOR_PORT` when no key is configured. Its rate budget is shared through the
/// database `pool` points at by every process with the same key.
pub fn gateway_from(
    settings: &crate::config::StripeSettings,
    pool: &PgPool,
) -> Result<crate::stripe::StripeGateway, crate::stripe::GatewayError> {
    use crate::config::{StripeTarget, LOCAL_SIMULATOR_KEY, LOCAL_SIMULATOR_PORT};
    use crate::stripe::keys::StripeKey;
    let (key, api_base) = match &settings.target {
        StripeTarget::Api { key, api_base } => (key.clone(), api_base.clone()),
        StripeTarget::Simulator => (
            StripeKey::parse(LOCAL_SIMULATOR_KEY, false).expect("a test key"),
            format!("http://127.0.0.1:{LOCAL_SIMULATOR_PORT}/"),
        ),
    };
    let config = crate::stripe::GatewayConfig {
        api_base,
        timeout_ms: settings.timeout_ms,
        rate_per_sec: settings.rate_per_sec,
        burst: settings.burst,
        lease_slots: settings.lease_slots,
        ..crate::stripe::GatewayConfig::default()
    };
    Ok(crate::stripe::StripeGateway::new(&key, config)?.share_budget(pool))
}
