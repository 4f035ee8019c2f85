//! The fee split: how the Stripe processing fee and the platform fee are shared across a plan's allocations,
//! and the gross-up used when the donor covers the fees.
//!
//! Rates are `rust_decimal` with explicit rounding; amounts are integers. The split is proportional to each
//! allocation's gross amount by the largest-remainder method: every allocation first gets the floor of its exact
//! share, then the cents left over go one each to the largest fractional remainders, ties to the earlier
//! allocation in the set's order. So Σ fee shares is exactly the fee and Σ net + Σ fee shares is exactly the total.
//!
//! When the fees exceed the whole charge (a tiny payment with a large fixed fee), nothing can be transferred:
//! every allocation's fee share is capped at its gross (net 0, so no transfer is made) and the part of the fee
//! that could not be taken from the donation is reported as `fee_uncollected_cents` — a loss the platform bears,
//! never a negative transfer. With fees at or below the total, no share can exceed its gross (see `split_fees`).

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::{Decimal, RoundingStrategy};

use super::money::STRIPE_MAX_CHARGE_MINOR;

/// Rounding for fees computed from a rate: half away from zero, the usual commercial rounding.
const FEE_ROUNDING: RoundingStrategy = RoundingStrategy::MidpointAwayFromZero;

/// The platform's own fee on a split payment: basis points of the total plus a fixed amount (configurable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlatformFee {
    pub rate_bps: u32,
    pub fixed_cents: i64,
}

impl PlatformFee {
    /// Basis points are 1/100 of a percent; 10,000 bps would take the whole payment.
    pub const RATE_BPS_MAX: u32 = 10_000;

    pub fn new(rate_bps: u32, fixed_cents: i64) -> Result<Self, FeeError> {
        if rate_bps >= Self::RATE_BPS_MAX {
            return Err(FeeError::RateTooHigh);
        }
        if fixed_cents < 0 {
            return Err(FeeError::NegativeFee { fee_cents: fixed_cents });
        }
        Ok(Self { rate_bps, fixed_cents })
    }

    pub fn rate(&self) -> Decimal {
        Decimal::new(i64::from(self.rate_bps), 4)
    }

    pub fn fee_cents(&self, total_cents: i64) -> i64 {
        rate_fee_cents(self.rate(), total_cents) + self.fixed_cents
    }
}

/// An estimate of Stripe's processing fee for a payment method (e.g. 1.75% + 30c), used only to gross up a
/// donor-covers-fees payment. The real fee always comes from the charge's balance transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessingFeeEstimate {
    /// A fraction: 0.0175 for 1.75%.
    pub rate: Decimal,
    pub fixed_cents: i64,
}

impl ProcessingFeeEstimate {
    pub fn fee_cents(&self, total_cents: i64) -> i64 {
        rate_fee_cents(self.rate, total_cents) + self.fixed_cents
    }
}

/// `rate × amount`, rounded to whole minor units with [`FEE_ROUNDING`].
fn rate_fee_cents(rate: Decimal, amount_cents: i64) -> i64 {
    (rate * Decimal::from(amount_cents))
        .round_dp_with_strategy(0, FEE_ROUNDING)
        .to_i64()
        .expect("a rate below 1 times an i64 amount fits an i64")
}

/// Every fee a payment carries, for the gross-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeeSchedule {
    pub processing: ProcessingFeeEstimate,
    pub platform: PlatformFee,
}

impl FeeSchedule {
    pub fn total_fee_cents(&self, total_cents: i64) -> i64 {
        self.processing.fee_cents(total_cents) + self.platform.fee_cents(total_cents)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeeError {
    #[error("a fee split needs at least one allocation")]
    NoAllocations,
    #[error("allocation {index} has a gross amount of {gross_cents}; it must be positive")]
    NonPositiveGross { index: usize, gross_cents: i64 },
    #[error("fee {fee_cents} is negative")]
    NegativeFee { fee_cents: i64 },
    #[error("the fee rate must be below 100%")]
    RateTooHigh,
    #[error("covering the fees needs a charge of {total_cents}, above Stripe's maximum of {STRIPE_MAX_CHARGE_MINOR}")]
    AboveMaximum { total_cents: i64 },
}

/// One allocation's part of a [`FeeSplit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeeShare {
    pub gross_cents: i64,
    pub fee_share_cents: i64,
    /// What the recipient is transferred: `gross_cents - fee_share_cents`, never negative.
    pub net_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeeSplit {
    /// In the order of the gross amounts given.
    pub shares: Vec<FeeShare>,
    pub gross_cents_total: i64,
    /// The fee actually taken from the donation: Σ fee shares.
    pub fee_cents_total: i64,
    /// The part of the fee above the whole donation, which nobody's share can carry (0 unless fee > total).
    pub fee_uncollected_cents: i64,
}

impl FeeSplit {
    pub fn net_cents_total(&self) -> i64 {
        self.shares.iter().map(|s| s.net_cents).sum()
    }
}

/// Shares `processing_fee_cents + platform_fee_cents` across allocations in proportion to `gross_cents`.
pub fn split_fees(
    gross_cents: &[i64],
    processing_fee_cents: i64,
    platform_fee_cents: i64,
) -> Result<FeeSplit, FeeError> {
    if gross_cents.is_empty() {
        return Err(FeeError::NoAllocations);
    }
    if let Some((index, &g)) = gross_cents.iter().enumerate().find(|(_, &g)| g <= 0) {
        return Err(FeeError::NonPositiveGross { index, gross_cents: g });
    }
    for fee_cents in [processing_fee_cents, platform_fee_cents] {
        if fee_cents < 0 {
            return Err(FeeError::NegativeFee { fee_cents });
        }
    }
    let gross_cents_total: i64 = gross_cents.iter().sum();
    let fee_cents_asked = processing_fee_cents + platform_fee_cents;
    let fee_cents_total = fee_cents_asked.min(gross_cents_total);
    let fee_uncollected_cents = fee_cents_asked - fee_cents_total;

    let parts = largest_remainder(fee_cents_total, gross_cents);
    // fee ≤ total, so floor(fee·g/T) ≤ g, and a leftover cent only goes to a line with a non-zero remainder,
    // whose floor is strictly below fee·g/T ≤ g: no share exceeds its gross.
    let shares: Vec<FeeShare> = gross_cents
        .iter()
        .zip(parts)
        .map(|(&gross, fee_share_cents)| {
            assert!(fee_share_cents <= gross, "fee share above gross");
            FeeShare {
                gross_cents: gross,
                fee_share_cents,
                net_cents: gross - fee_share_cents,
            }
        })
        .collect();

    let split = FeeSplit {
        shares,
        gross_cents_total,
        fee_cents_total,
        fee_uncollected_cents,
    };
    assert_eq!(
        split.net_cents_total() + split.fee_cents_total,
        split.gross_cents_total,
        "fee split must conserve money"
    );
    Ok(split)
}

/// Splits `amount` across `weights` (all positive) in proportion, exactly, by the largest-remainder method;
/// ties go to the lower index.
fn largest_remainder(amount: i64, weights: &[i64]) -> Vec<i64> {
    debug_assert!(amount >= 0 && weights.iter().all(|&w| w > 0));
    let total = i128::from(weights.iter().sum::<i64>());
    let mut parts = Vec::with_capacity(weights.len());
    let mut remainders = Vec::with_capacity(weights.len());
    for (index, &weight) in weights.iter().enumerate() {
        let exact = i128::from(amount) * i128::from(weight);
        parts.push((exact / total) as i64);
        remainders.push((exact % total, index));
    }
    let leftover = amount - parts.iter().sum::<i64>();
    debug_assert!(leftover >= 0 && (leftover as usize) < weights.len().max(1));
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, index) in remainders.iter().take(leftover as usize) {
        parts[index] += 1;
    }
    parts
}

/// The result of grossing up: the donor pays `gross_cents` (per recipient, in order), and under the fee schedule
/// the split gives every recipient at least what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrossUp {
    pub gross_cents: Vec<i64>,
    pub total_cents: i64,
    /// The split the schedule predicts for that total.
    pub expected: FeeSplit,
}

/// Bounds the correction loop below; in practice it converges in one or two rounds.
const GROSS_UP_ROUNDS_MAX: usize = 64;

/// Finds per-recipient gross amounts such that, once the schedule's fees for the total are split across them,
/// every recipient nets at least `net_cents[i]` (rounding never leaves a recipient short).
pub fn gross_up(net_cents: &[i64], schedule: &FeeSchedule) -> Result<GrossUp, FeeError> {
    if net_cents.is_empty() {
        return Err(FeeError::NoAllocations);
    }
    if let Some((index, &n)) = net_cents.iter().enumerate().find(|(_, &n)| n <= 0) {
        return Err(FeeError::NonPositiveGross { index, gross_cents: n });
    }
    let rate = schedule.processing.rate + schedule.platform.rate();
    if rate >= Decimal::ONE || rate.is_sign_negative() {
        return Err(FeeError::RateTooHigh);
    }
    let net_total: i64 = net_cents.iter().sum();
    let fixed = schedule.processing.fixed_cents + schedule.platform.fixed_cents;

    // Closed form first: C* = (N + fixed) / (1 - rate). The rounded fee is within a cent of the exact one per
    // component, so no charge two cents below C* can net N: start there and walk up to the smallest that does.
    let exact_total = Decimal::from(net_total + fixed) / (Decimal::ONE - rate);
    let mut total_cents = (exact_total
        .floor()
        .to_i64()
        .ok_or(FeeError::AboveMaximum { total_cents: i64::MAX })?
        - 2)
    .max(net_total);
    while total_cents - schedule.total_fee_cents(total_cents) < net_total {
        total_cents += 1;
        if total_cents > STRIPE_MAX_CHARGE_MINOR {
            return Err(FeeError::AboveMaximum { total_cents });
        }
    }

    // Spread the extra in proportion to what each recipient is owed, then correct any line rounding left short.
    let extra = largest_remainder(total_cents - net_total, net_cents);
    let mut gross: Vec<i64> = net_cents.iter().zip(&extra).map(|(n, e)| n + e).collect();
    for _ in 0..GROSS_UP_ROUNDS_MAX {
        let total: i64 = gross.iter().sum();
        if total > STRIPE_MAX_CHARGE_MINOR {
            return Err(FeeError::AboveMaximum { total_cents: total });
        }
        let split = split_fees(
            &gross,
            schedule.processing.fee_cents(total),
            schedule.platform.fee_cents(total),
        )?;
        let mut short = false;
        for (i, share) in split.shares.iter().enumerate() {
            if share.net_cents < net_cents[i] {
                gross[i] += net_cents[i] - share.net_cents;
                short = true;
            }
        }
        if !short {
            return Ok(GrossUp {
                gross_cents: gross,
                total_cents: total,
                expected: split,
            });
        }
    }
    unreachable!("gross-up did not converge in {GROSS_UP_ROUNDS_MAX} rounds")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    #[test]
    fn split_is_proportional_and_exact() {
        // 3 × 1000, fee 100: 33.33 each, the leftover cent to the first (tie → earliest).
        let split = split_fees(&[1000, 1000, 1000], 70, 30).unwrap();
        let fees: Vec<i64> = split.shares.iter().map(|s| s.fee_share_cents).collect();
        assert_eq!(fees, vec![34, 33, 33]);
        assert_eq!(split.net_cents_total(), 2900);
        assert_eq!(split.fee_uncollected_cents, 0);
    }

    #[test]
    fn leftover_goes_to_largest_remainder_not_position() {
        // fee 10 over 1,2,7 (total 10): exact shares 1,2,7; over 3,3,4 of total 10 with fee 5: 1.5,1.5,2 → 2,1,2.
        let split = split_fees(&[300, 300, 400], 5, 0).unwrap();
        let fees: Vec<i64> = split.shares.iter().map(|s| s.fee_share_cents).collect();
        assert_eq!(fees, vec![2, 1, 2]);
        // 100, 250, 650 with fee 7: 0.7, 1.75, 4.55 → floors 0,1,4 (5), leftover 2 → .75 and .7 win over .55.
        let split = split_fees(&[100, 250, 650], 7, 0).unwrap();
        let fees: Vec<i64> = split.shares.iter().map(|s| s.fee_share_cents).collect();
        assert_eq!(fees, vec![1, 2, 4]);
    }

    #[test]
    fn fees_above_the_total_cap_every_share_at_its_gross() {
        let split = split_fees(&[20, 30], 45, 30).unwrap();
        assert!(split
            .shares
            .iter()
            .all(|s| s.net_cents == 0 && s.fee_share_cents == s.gross_cents));
        assert_eq!(split.fee_cents_total, 50);
        assert_eq!(split.fee_uncollected_cents, 25);
        let exact = split_fees(&[20, 30], 50, 0).unwrap();
        assert_eq!(exact.fee_uncollected_cents, 0);
        assert_eq!(exact.net_cents_total(), 0);
    }

    #[test]
    fn split_refuses_bad_input() {
        assert_eq!(split_fees(&[], 1, 1), Err(FeeError::NoAllocations));
        assert_eq!(
            split_fees(&[10, 0], 1, 1),
            Err(FeeError::NonPositiveGross {
                index: 1,
                gross_cents: 0
            })
        );
        assert_eq!(split_fees(&[10], -1, 0), Err(FeeError::NegativeFee { fee_cents: -1 }));
    }

    #[test]
    fn platform_fee_rounds_half_away_from_zero() {
        let fee = PlatformFee::new(250, 10).unwrap(); // 2.5% + 10c
        assert_eq!(fee.fee_cents(1000), 35);
        assert_eq!(fee.fee_cents(1020), 36); // 25.5 → 26
        assert_eq!(fee.fee_cents(1019), 35); // 25.475 → 25
        assert!(PlatformFee::new(10_000, 0).is_err());
        assert!(PlatformFee::new(0, -1).is_err());
    }

    fn au_card() -> FeeSchedule {
        FeeSchedule {
            processing: ProcessingFeeEstimate {
                rate: dec!(0.0175),
                fixed_cents: 30,
            },
            platform: PlatformFee::new(200, 0).unwrap(),
        }
    }

    #[test]
    fn gross_up_example() {
        let up = gross_up(&[1000, 2000], &au_card()).unwrap();
        assert_eq!(up.total_cents, up.gross_cents.iter().sum::<i64>());
        assert!(up.expected.shares[0].net_cents >= 1000);
        assert!(up.expected.shares[1].net_cents >= 2000);
        // 3000 + 30 over (1 - 0.0375) = 3148.05…, but at 3148 the rounded fees are 55 + 63 + 30 = 148: enough.
        assert_eq!(up.total_cents, 3148);
        assert_eq!(up.expected.fee_cents_total, 148);
        assert_eq!(up.expected.net_cents_total(), 3000);
    }

    #[test]
    fn gross_up_refuses_impossible_schedules() {
        let greedy = FeeSchedule {
            processing: ProcessingFeeEstimate {
                rate: dec!(0.5),
                fixed_cents: 0,
            },
            platform: PlatformFee::new(5_000, 0).unwrap(),
        };
        assert_eq!(gross_up(&[100], &greedy), Err(FeeError::RateTooHigh));
        assert!(matches!(
            gross_up(&[99_000_000], &au_card()),
            Err(FeeError::AboveMaximum { .. })
        ));
        assert_eq!(
            gross_up(&[100, 0], &au_card()),
            Err(FeeError::NonPositiveGross {
                index: 1,
                gross_cents: 0
            })
        );
    }

    proptest! {
        /// Conservation, to the cent, for arbitrary plans and fees; nothing negative; no share above its gross.
        #[test]
        fn split_conserves_money(
            gross in prop::collection::vec(1i64..=2_147_483_647, 1..20),
            processing in 0i64..5_000_000,
            platform in 0i64..5_000_000,
        ) {
            let split = split_fees(&gross, processing, platform).unwrap();
            let total: i64 = gross.iter().sum();
            prop_assert_eq!(split.gross_cents_total, total);
            prop_assert_eq!(split.net_cents_total() + split.fee_cents_total, total);
            prop_assert_eq!(split.fee_cents_total + split.fee_uncollected_cents, processing + platform);
            for (share, &g) in split.shares.iter().zip(&gross) {
                prop_assert_eq!(share.gross_cents, g);
                prop_assert!(share.fee_share_cents >= 0 && share.net_cents >= 0);
                prop_assert_eq!(share.fee_share_cents + share.net_cents, g);
            }
        }

        /// Each share is within one cent of its exact proportional value when the fee fits in the total.
        #[test]
        fn split_is_within_a_cent_of_proportional(
            gross in prop::collection::vec(1i64..1_000_000, 1..20),
            fee in 0i64..1_000_000,
        ) {
            let total: i64 = gross.iter().sum();
            prop_assume!(fee <= total);
            let split = split_fees(&gross, fee, 0).unwrap();
            for (share, &g) in split.shares.iter().zip(&gross) {
                let exact_floor = (i128::from(fee) * i128::from(g) / i128::from(total)) as i64;
                prop_assert!(share.fee_share_cents == exact_floor || share.fee_share_cents == exact_floor + 1);
            }
        }

        /// Donor-covers-fees: every recipient receives at least what was asked, and the donor pays at most one
        /// cent per recipient (plus one) more than the fees require.
        #[test]
        fn gross_up_never_shortchanges(
            net in prop::collection::vec(1i64..2_000_000, 1..15),
            rate_bp in 0u32..600,
            proc_fixed in 0i64..100,
            plat_bps in 0u32..1_000,
            plat_fixed in 0i64..100,
        ) {
            let schedule = FeeSchedule {
                processing: ProcessingFeeEstimate { rate: Decimal::new(i64::from(rate_bp), 4), fixed_cents: proc_fixed },
                platform: PlatformFee::new(plat_bps, plat_fixed).unwrap(),
            };
            let up = gross_up(&net, &schedule).unwrap();
            prop_assert_eq!(up.total_cents, up.gross_cents.iter().sum::<i64>());
            prop_assert_eq!(up.expected.fee_cents_total, schedule.total_fee_cents(up.total_cents));
            for (share, &n) in up.expected.shares.iter().zip(&net) {
                prop_assert!(share.net_cents >= n, "recipient short: {} < {}", share.net_cents, n);
            }
            let surplus = up.expected.net_cents_total() - net.iter().sum::<i64>();
            prop_assert!(surplus >= 0 && surplus <= net.len() as i64 + 1, "surplus {}", surplus);
        }
    }
}
