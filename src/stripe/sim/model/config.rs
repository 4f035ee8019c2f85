//! How the simulator behaves: Stripe's fees per payment method and for disputes, settlement delays, the
//! idempotency TTL. Every
//! field can be changed at run time through `/_sim/config`.

/// Stripe's fee for a payment method: basis points of the amount (half-up) plus a fixed part, optionally capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct FeeRule {
    pub rate_bps: i64,
    pub fixed_cents: i64,
    pub cap_cents: Option<i64>,
}

impl FeeRule {
    pub fn fee_cents(&self, amount_cents: i64) -> i64 {
        let fee = (amount_cents * self.rate_bps + 5_000) / 10_000 + self.fixed_cents;
        self.cap_cents.map_or(fee, |cap| fee.min(cap)).min(amount_cents)
    }
}

/// How the simulator behaves; every field can be changed at run time through `/_sim/config`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct SimConfig {
    /// Domestic AU card pricing by default.
    pub card_fee: FeeRule,
    /// BECS: 1% + 30c, capped at A$3.50.
    pub becs_fee: FeeRule,
    pub payto_fee: FeeRule,
    /// How long an ordinary BECS debit stays `processing`.
    pub becs_settle_secs: i64,
    /// The "after 3 minutes" BECS test accounts.
    pub becs_delayed_settle_secs: i64,
    pub payto_settle_secs: i64,
    /// Asynchronous capture: a succeeded charge's `balance_transaction` stays null this long (0: at once).
    pub balance_transaction_delay_secs: i64,
    /// Pending period of charge funds before they are available.
    pub available_after_secs: i64,
    pub idempotency_ttl_secs: i64,
    /// New connected accounts that request `transfers` get it active at once.
    pub auto_activate_transfers: bool,
    /// Stripe's rule for accounts created through the API (`POST /v1/accounts`): `transfers` turns active only once
    /// the account is onboarded, with its terms accepted (`tos_acceptance[date]`) and a bank account
    /// (`external_account`), at creation or by a later `POST /v1/accounts/{id}`. Off by default: most tests create
    /// ready recipients in one call; the end-to-end suite turns it on.
    pub onboarding_required: bool,
    /// The dispute fee withdrawn with a dispute's amount: A$25.00 in Australia (Stripe's AU pricing).
    pub dispute_fee_cents: i64,
    /// Stripe's dispute-fee FAQ: "if you win the dispute, Stripe will refund this dispute fee to you".
    pub dispute_fee_returned_if_won: bool,
    /// The `666666660` BECS test account: how long after the debit succeeds its dispute opens.
    pub becs_dispute_after_secs: i64,
    /// New refunds start `pending` and wait for `/_sim/refunds/{id}/settle` (off: they succeed at once).
    pub refunds_start_pending: bool,
    /// A dispute opened on a charge leaves its `pending` refunds pending, to be settled later by
    /// `/_sim/refunds/{id}/settle` (`charge.refund.updated`) like any other. Off (the default): they fail at once
    /// with `charge_for_pending_refund_disputed`, as Stripe says of a refund pending because the balance was short
    /// ("the refund will fail and a dispute will be created", support article "Pending refunds due to insufficient
    /// funds or Stripe balance"). Stripe says nothing of a refund pending for another reason (`pending_reason`
    /// `processing` or `charge_pending`, the simulator's being `processing`), so whether it fails too is
    /// UNCONFIRMED: tests that need the other answer turn this on.
    pub pending_refunds_survive_disputes: bool,
    /// Stripe's per-key rate limiter: requests per second per API key, over every `/v1/` endpoint (`None`, the
    /// default: off). Above it a request gets 429 `rate_limit` with `Stripe-Rate-Limited-Reason: global-rate` and is
    /// not applied.
    pub rate_limit_per_sec: Option<u32>,
    /// How many requests the per-key bucket lets through at once (a token bucket of this size, refilled at
    /// `rate_limit_per_sec`). How much burst Stripe tolerates is UNCONFIRMED; 0 means one second's worth.
    pub rate_limit_burst: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            card_fee: FeeRule {
                rate_bps: 175,
                fixed_cents: 30,
                cap_cents: None,
            },
            becs_fee: FeeRule {
                rate_bps: 100,
                fixed_cents: 30,
                cap_cents: Some(350),
            },
            payto_fee: FeeRule {
                rate_bps: 100,
                fixed_cents: 30,
                cap_cents: Some(350),
            },
            becs_settle_secs: 5,
            becs_delayed_settle_secs: 180,
            payto_settle_secs: 3,
            balance_transaction_delay_secs: 0,
            available_after_secs: 2 * 86_400,
            idempotency_ttl_secs: 86_400,
            auto_activate_transfers: true,
            onboarding_required: false,
            dispute_fee_cents: 2_500,
            dispute_fee_returned_if_won: true,
            becs_dispute_after_secs: 60,
            refunds_start_pending: false,
            pending_refunds_survive_disputes: false,
            rate_limit_per_sec: None,
            rate_limit_burst: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fee_rules_round_half_up_and_cap() {
        let card = SimConfig::default().card_fee;
        assert_eq!(card.fee_cents(10_000), 205); // 1.75% + 30c
        assert_eq!(card.fee_cents(1_000), 48); // 17.5 → 18, + 30
        let becs = SimConfig::default().becs_fee;
        assert_eq!(becs.fee_cents(100_000), 350, "capped at A$3.50");
        assert_eq!(becs.fee_cents(10), 10, "never more than the amount");
    }
}
