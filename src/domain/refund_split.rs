//! How a refund is attributed to a payment's allocations, and how each allocation's part is covered: pure integer
//! arithmetic in minor units, property-tested below.
//!
//! - [`spread`]: a refund that names no allocation is spread over the allocations in proportion to their gross
//!   amounts by largest remainder, never above what each has left to refund; ties go to the earlier position.
//! - [`net_of`]: the recipient's share of a refunded amount, `round(part × net / gross)`, half up.
//! - [`Cover`]: where a part's money comes from: the parked net, the transfer not yet made, a reversal of the
//!   transfer, or the platform (a loss). The four always add up to the part.
//! - [`Adopting`]: a part of a transferred share that takes reversals made for a refund that no longer stands uses
//!   of them only what the policy has the recipient bear; the rest of that money is the recipient's, given back.

/// A refund larger than what the allocations have left to refund: the charge and our records disagree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refund of {refund_cents} exceeds the {refundable_cents} the allocations have left to refund")]
pub struct Unattributable {
    pub refund_cents: i64,
    pub refundable_cents: i64,
}

/// One allocation as the spread sees it, in position order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// The weight: the allocation's gross amount.
    pub gross_cents: i64,
    /// The cap: gross less what earlier refunds already attributed to it (0 for a share that takes no refund).
    pub refundable_cents: i64,
}

/// Spreads `refund_cents` over `shares` in proportion to their gross amounts (largest remainder, ties to the
/// earlier position), never giving a share more than it has left to refund. The parts add up to the refund exactly.
pub fn spread(refund_cents: i64, shares: &[Share]) -> Result<Vec<i64>, Unattributable> {
    assert!(refund_cents >= 0, "a refund is never negative");
    let refundable_cents: i64 = shares.iter().map(|s| s.refundable_cents.max(0)).sum();
    if refund_cents > refundable_cents {
        return Err(Unattributable {
            refund_cents,
            refundable_cents,
        });
    }
    let mut parts = vec![0i64; shares.len()];
    let mut left = refund_cents;
    // Each round either places everything left or fills at least one share to its cap: at most one round per share.
    for _ in 0..=shares.len() {
        if left == 0 {
            break;
        }
        let open: Vec<usize> = (0..shares.len())
            .filter(|&i| parts[i] < shares[i].refundable_cents && shares[i].gross_cents > 0)
            .collect();
        let weight: i128 = open.iter().map(|&i| i128::from(shares[i].gross_cents)).sum();
        if weight == 0 {
            break;
        }
        let mut placed = 0i64;
        let mut remainders: Vec<(i128, usize)> = Vec::with_capacity(open.len());
        for &i in &open {
            let exact = i128::from(left) * i128::from(shares[i].gross_cents);
            let room = shares[i].refundable_cents - parts[i];
            let quota = i64::try_from(exact / weight).expect("a quota is at most the refund");
            let take = quota.min(room);
            parts[i] += take;
            placed += take;
            if take == quota {
                remainders.push((exact % weight, i));
            }
        }
        let mut rest = left - placed;
        // Largest remainder first; equal remainders to the earlier position.
        remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, i) in &remainders {
            if rest == 0 {
                break;
            }
            if parts[i] < shares[i].refundable_cents {
                parts[i] += 1;
                rest -= 1;
            }
        }
        left = rest;
    }
    // Whatever the caps left over goes to the first shares with room, in position order.
    for i in 0..shares.len() {
        let take = left.min(shares[i].refundable_cents - parts[i]).max(0);
        parts[i] += take;
        left -= take;
    }
    debug_assert_eq!(left, 0);
    debug_assert_eq!(parts.iter().sum::<i64>(), refund_cents);
    Ok(parts)
}

/// The recipient's share of `part_cents` of an allocation: `round(part × net / gross)`, half up, in 0..=part.
pub fn net_of(part_cents: i64, net_cents: i64, gross_cents: i64) -> i64 {
    assert!(gross_cents > 0 && (0..=gross_cents).contains(&net_cents) && part_cents >= 0);
    let exact = i128::from(part_cents) * i128::from(net_cents);
    let g = i128::from(gross_cents);
    i64::try_from((exact * 2 + g) / (2 * g)).expect("at most the part")
}

/// How one part is covered. `from_parked + from_pending + reversal + platform_loss = amount`, always.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cover {
    pub from_parked_cents: i64,
    pub from_pending_cents: i64,
    pub reversal_cents: i64,
    pub platform_loss_cents: i64,
}

/// How a part of a transferred share is covered when it adopts reversals made for a refund that no longer stands
/// ([`Cover::transferred_adopting`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Adopting {
    pub cover: Cover,
    /// What is reversed anew for the part (the adopted money fell short of what the recipient bears).
    pub send_cents: i64,
    /// What of the adopted money the part does not use: the recipient's, sent back to it (or used by the share's
    /// next part covered at once). Never both this and `send_cents`.
    pub unused_cents: i64,
}

impl Cover {
    pub fn total(&self) -> i64 {
        self.from_parked_cents + self.from_pending_cents + self.reversal_cents + self.platform_loss_cents
    }

    /// A share not transferred yet: the transfer shrinks by the recipient's share of the part (never below
    /// zero); the rest (the part's share of the fees) is the platform's loss.
    pub fn pending(part_cents: i64, net_cents: i64, gross_cents: i64, transferable_cents: i64) -> Cover {
        let from_pending_cents = net_of(part_cents, net_cents, gross_cents).min(transferable_cents.max(0));
        Cover {
            from_pending_cents,
            platform_loss_cents: part_cents - from_pending_cents,
            ..Cover::default()
        }
    }

    /// A parked share: from the parked net as far as it goes, the rest the platform's loss.
    pub fn parked(part_cents: i64, parked_cents: i64) -> Cover {
        let from_parked_cents = part_cents.min(parked_cents.max(0));
        Cover {
            from_parked_cents,
            platform_loss_cents: part_cents - from_parked_cents,
            ..Cover::default()
        }
    }

    /// A transferred share: reverse the recipient's share of the part (`proportional`), never more than is left
    /// of the transfer; under `none` (or beyond the transfer) the platform bears it.
    pub fn transferred(
        part_cents: i64,
        net_cents: i64,
        gross_cents: i64,
        reversible_cents: i64,
        reverse: bool,
    ) -> Cover {
        let reversal_cents = if reverse {
            net_of(part_cents, net_cents, gross_cents).min(reversible_cents.max(0))
        } else {
            0
        };
        Cover {
            reversal_cents,
            platform_loss_cents: part_cents - reversal_cents,
            ..Cover::default()
        }
    }

    /// A transferred share whose reversals already made for a refund that no longer stands (`adopted_cents`: an
    /// `ops refund` intent a dispute closed, a refund Stripe failed) are taken by this part: that money is on the
    /// platform's balance already, and it is the recipient's. The part uses of it what the policy has the recipient
    /// bear (the recipient's share of the part under `proportional`, nothing under `none`); only what the adopted
    /// money does not cover is reversed anew ([`Adopting::send_cents`], never more than `reversible_cents`), and
    /// what the part does not use ([`Adopting::unused_cents`]) is the recipient's money to give back. The adopted
    /// amount may exceed the part. With nothing adopted this is [`Cover::transferred`].
    pub fn transferred_adopting(
        part_cents: i64,
        net_cents: i64,
        gross_cents: i64,
        reversible_cents: i64,
        reverse: bool,
        adopted_cents: i64,
    ) -> Adopting {
        assert!(adopted_cents >= 0, "adopted reversals are never negative");
        let want = if reverse {
            net_of(part_cents, net_cents, gross_cents)
        } else {
            0
        };
        let used_cents = adopted_cents.min(want);
        let send_cents = (want - used_cents).clamp(0, reversible_cents.max(0));
        let reversal_cents = used_cents + send_cents;
        Adopting {
            cover: Cover {
                reversal_cents,
                platform_loss_cents: part_cents - reversal_cents,
                ..Cover::default()
            },
            send_cents,
            unused_cents: adopted_cents - used_cents,
        }
    }

    /// Nothing of the share is left with splitpay or the recipient (refunded, voided): the platform bears it.
    pub fn loss(part_cents: i64) -> Cover {
        Cover {
            platform_loss_cents: part_cents,
            ..Cover::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shares(gross: &[i64]) -> Vec<Share> {
        gross
            .iter()
            .map(|&g| Share {
                gross_cents: g,
                refundable_cents: g,
            })
            .collect()
    }

    #[test]
    fn examples() {
        assert_eq!(spread(100, &shares(&[50, 50])), Ok(vec![50, 50]));
        // 1/3 each, one cent left over: the earlier position gets it.
        assert_eq!(spread(10, &shares(&[10, 10, 10])), Ok(vec![4, 3, 3]));
        assert_eq!(spread(10, &shares(&[700, 300])), Ok(vec![7, 3]));
        // A capped share's excess goes to the others.
        let capped = [
            Share {
                gross_cents: 500,
                refundable_cents: 10,
            },
            Share {
                gross_cents: 500,
                refundable_cents: 500,
            },
        ];
        assert_eq!(spread(100, &capped), Ok(vec![10, 90]));
        assert!(spread(1_001, &shares(&[500, 500])).is_err());
        assert_eq!(net_of(500, 970, 1_000), 485);
        assert_eq!(net_of(1, 1, 2), 1, "half rounds up");
        assert_eq!(Cover::transferred(1_000, 970, 1_000, 100, true).reversal_cents, 100);
        assert_eq!(
            Cover::transferred(1_000, 970, 1_000, 5_000, false).platform_loss_cents,
            1_000
        );
        // An orphan of 1,000 (a net-1,000 share's ops refund, closed by a dispute) met by a part of 400 of a
        // gross-1,030 share: the part takes the recipient's share of it, the rest goes back to the recipient.
        let a = Cover::transferred_adopting(400, 1_000, 1_030, 0, true, 1_000);
        assert_eq!(a.cover.reversal_cents, 388);
        assert_eq!(a.cover.platform_loss_cents, 12);
        assert_eq!((a.send_cents, a.unused_cents), (0, 612));
        // Under `none` the platform bears the part and the orphan goes back whole.
        let a = Cover::transferred_adopting(400, 1_000, 1_030, 0, false, 1_000);
        assert_eq!(
            (a.cover.platform_loss_cents, a.send_cents, a.unused_cents),
            (400, 0, 1_000)
        );
    }

    fn case() -> impl Strategy<Value = (Vec<Share>, i64)> {
        proptest::collection::vec((1i64..1_000_000, 0i64..=100), 1..8).prop_flat_map(|v| {
            let shares: Vec<Share> = v
                .iter()
                .map(|&(g, pct)| Share {
                    gross_cents: g,
                    refundable_cents: g * pct / 100,
                })
                .collect();
            let max: i64 = shares.iter().map(|s| s.refundable_cents).sum();
            (Just(shares), 0..=max)
        })
    }

    proptest! {
        #[test]
        fn parts_sum_exactly_and_respect_caps((shares, refund) in case()) {
            let parts = spread(refund, &shares).unwrap();
            prop_assert_eq!(parts.iter().sum::<i64>(), refund);
            for (p, s) in parts.iter().zip(&shares) {
                prop_assert!(*p >= 0 && *p <= s.refundable_cents);
            }
            prop_assert_eq!(spread(refund, &shares).unwrap(), parts, "deterministic");
        }

        /// Without caps, each part is within one cent of its exact proportional share.
        #[test]
        fn uncapped_parts_are_proportional(gross in proptest::collection::vec(1i64..1_000_000, 1..8), pct in 0i64..=100) {
            let s = shares(&gross);
            let total: i64 = gross.iter().sum();
            let refund = total * pct / 100;
            let parts = spread(refund, &s).unwrap();
            for (p, g) in parts.iter().zip(&gross) {
                // |p − refund × g / total| < 1, in integers.
                let diff = (i128::from(*p) * i128::from(total) - i128::from(refund) * i128::from(*g)).abs();
                prop_assert!(diff < i128::from(total), "{} of {} for gross {}", p, refund, g);
            }
        }

        #[test]
        fn too_much_is_refused((shares, _) in case(), extra in 1i64..1_000) {
            let max: i64 = shares.iter().map(|s| s.refundable_cents).sum();
            prop_assert!(spread(max + extra, &shares).is_err());
        }

        /// Adopting nothing is the plain cover. Adopting uses of the adopted money at most what the policy has the
        /// recipient bear, reverses anew only what it falls short of (never more than is left of the transfer),
        /// and gives back exactly the rest: adopted = used + unused, to the cent, whatever its size against the
        /// part (an orphan larger than the part included).
        #[test]
        fn adopting_covers_within_bounds(part in 0i64..1_000_000, gross in 1i64..1_000_000, net_pct in 0i64..=100,
                                         room in -10i64..1_000_000, reverse: bool, adopted_pct in 0i64..=300) {
            let net = gross * net_pct / 100;
            let plain = Cover::transferred(part, net, gross, room, reverse);
            let none_adopted = Cover::transferred_adopting(part, net, gross, room, reverse, 0);
            prop_assert_eq!(none_adopted.cover, plain);
            prop_assert_eq!(none_adopted.send_cents, plain.reversal_cents);
            prop_assert_eq!(none_adopted.unused_cents, 0);
            let adopted = part * adopted_pct / 100;
            let a = Cover::transferred_adopting(part, net, gross, room, reverse, adopted);
            let c = a.cover;
            prop_assert_eq!(c.total(), part);
            prop_assert!(c.reversal_cents >= 0 && c.platform_loss_cents >= 0);
            prop_assert!(a.send_cents >= 0 && a.send_cents <= room.max(0));
            prop_assert!(a.unused_cents >= 0);
            let used = c.reversal_cents - a.send_cents;
            prop_assert_eq!(used + a.unused_cents, adopted, "every adopted cent is used or given back");
            let want = if reverse { net_of(part, net, gross) } else { 0 };
            prop_assert!(c.reversal_cents <= want, "the recipient never bears more than the policy says");
            if a.unused_cents > 0 {
                prop_assert_eq!(a.send_cents, 0, "nothing is reversed anew while adopted money is left");
                prop_assert_eq!(c.reversal_cents, want);
            }
            if !reverse {
                prop_assert_eq!(c.reversal_cents, 0, "under none the platform bears the part");
                prop_assert_eq!(a.unused_cents, adopted, "and an orphan goes back whole");
            }
        }

        #[test]
        fn covers_add_up(part in 0i64..1_000_000, gross in 1i64..1_000_000, net_pct in 0i64..=100, room in -10i64..1_000_000, reverse: bool) {
            let net = gross * net_pct / 100;
            for c in [
                Cover::pending(part, net, gross, room),
                Cover::parked(part, room),
                Cover::transferred(part, net, gross, room, reverse),
                Cover::loss(part),
            ] {
                prop_assert_eq!(c.total(), part);
                prop_assert!(c.from_parked_cents >= 0 && c.from_pending_cents >= 0);
                prop_assert!(c.reversal_cents >= 0 && c.platform_loss_cents >= 0);
                prop_assert!(c.reversal_cents <= room.max(0) && c.from_parked_cents <= room.max(0));
                prop_assert!(c.from_pending_cents <= room.max(0));
            }
        }
    }
}
