//! The retry delay policy: exponential with full jitter, capped. One pure function; the randomness is passed in so
//! the policy is testable.

/// Delay before retry number `attempt` (1 = the first retry): a uniform pick in `[0, min(cap, base × 2^(attempt-1))]`
/// ("full jitter"), so replicas that failed together do not retry together. `unit_random` is in `[0, 1]` as a
/// fraction of `u32::MAX`.
pub fn backoff_ms(attempt: u32, base_ms: u64, cap_ms: u64, unit_random: u32) -> u64 {
    let exponent = attempt.saturating_sub(1).min(32);
    let ceiling_ms = base_ms.saturating_mul(1u64 << exponent).min(cap_ms);
    // Integer scaling: ceiling × r / u32::MAX, in u128 so it cannot overflow.
    (u128::from(ceiling_ms) * u128::from(unit_random) / u128::from(u32::MAX)) as u64
}

/// [`backoff_ms`] with a fresh random pick.
pub fn backoff_ms_random(attempt: u32, base_ms: u64, cap_ms: u64) -> u64 {
    backoff_ms(attempt, base_ms, cap_ms, rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grows_exponentially_to_the_cap() {
        let max = u32::MAX;
        assert_eq!(backoff_ms(1, 100, 10_000, max), 100);
        assert_eq!(backoff_ms(2, 100, 10_000, max), 200);
        assert_eq!(backoff_ms(5, 100, 10_000, max), 1_600);
        assert_eq!(backoff_ms(20, 100, 10_000, max), 10_000);
        assert_eq!(
            backoff_ms(1_000, 100, 10_000, max),
            10_000,
            "huge attempts do not overflow"
        );
        assert_eq!(backoff_ms(3, 100, 10_000, 0), 0, "full jitter reaches zero");
        assert_eq!(backoff_ms(3, 100, 10_000, max / 2), 199);
    }

    proptest! {
        #[test]
        fn never_above_the_cap_or_the_exponential(attempt in 0u32..100, base in 1u64..10_000, cap in 1u64..1_000_000, r in any::<u32>()) {
            let d = backoff_ms(attempt, base, cap, r);
            prop_assert!(d <= cap);
            let exp = base.saturating_mul(1u64 << attempt.saturating_sub(1).min(32));
            prop_assert!(d <= exp);
        }
    }
}
