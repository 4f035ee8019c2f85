//! What the API and the workers share: the database, the Stripe gateway, and the distribution settings.

use std::sync::Arc;

use sqlx::PgPool;

use crate::domain::fees::PlatformFee;
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
}

impl Default for DistributionSettings {
    fn default() -> Self {
        Self {
            platform_fee: PlatformFee::default(),
            transfer_attempts_max: 8,
            fee_wait_attempts_max: 30,
            backoff_base_ms: 2_000,
            backoff_cap_ms: 300_000,
        }
    }
}

#[derive(Clone)]
pub struct AppContext {
    pub pool: PgPool,
    pub gateway: Arc<dyn PaymentGateway>,
    pub distribution: DistributionSettings,
}
