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
    /// Attempts at one transfer generation (retryable or unknown outcomes) before the allocation is parked.
    pub transfer_attempts_max: i32,
    /// Times the fee split waits for a charge's balance transaction before giving up and alerting.
    pub fee_wait_attempts_max: i32,
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    /// Stripe's fees as estimated for a donor who covers them (the real fee always comes from the charge).
    pub processing_estimates: ProcessingEstimates,
    /// What intake accepts so that a payment can be distributed at all: settlement currencies only, and no
    /// allocation below the minimum (`SPLITPAY_SETTLEMENT_CURRENCIES`, `SPLITPAY_MIN_ALLOCATION_CENTS`).
    pub plan_limits: PlanLimits,
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
            transfer_attempts_max: 8,
            fee_wait_attempts_max: 30,
            backoff_base_ms: 2_000,
            backoff_cap_ms: 300_000,
            plan_limits: PlanLimits::default(),
        }
    }
}

#[derive(Clone)]
pub struct AppContext {
    pub pool: PgPool,
    pub gateway: Arc<dyn PaymentGateway>,
    pub distribution: DistributionSettings,
}

/// Builds the gateway the settings ask for: Stripe (or another base URL) with the configured key, or the local
/// simulator at `127.0.0.1:LOCAL_SIMULATOR_PORT` when no key is configured.
pub fn gateway_from(
    settings: &crate::config::StripeSettings,
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
        ..crate::stripe::GatewayConfig::default()
    };
    crate::stripe::StripeGateway::new(&key, config)
}
