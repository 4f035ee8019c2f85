//! Allocation modes and the split plan: what a donor's submission through a recommendation set turns into.
//!
//! [`SplitPlan::from_submission`] is the only way to obtain a plan, so a plan that exists has passed every rule:
//! a settlement currency, FIXED amounts unchanged, every allocation known and named once, no negative amount,
//! every positive amount at least the platform's minimum allocation, at least one positive amount, the total within
//! Stripe's minimum and maximum for the currency. The plan keeps the set's order and drops the recipients a donor
//! set to zero.

use std::collections::HashSet;

use super::money::Currency;
use super::string_enum;

/// Largest amount for one allocation: the seed API's `amount_cents` is an int32.
pub const ALLOCATION_AMOUNT_MAX_CENTS: i64 = 2_147_483_647;

/// Most allocations a set may have: bounds the work one payment causes (one Stripe transfer each).
pub const ALLOCATIONS_PER_SET_MAX: usize = 50;

/// The platform's settlement currency unless configured otherwise (`SPLITPAY_SETTLEMENT_CURRENCIES`).
pub const SETTLEMENT_CURRENCIES_DEFAULT: [Currency; 1] = [Currency::Aud];

/// The smallest positive allocation unless configured otherwise (`SPLITPAY_MIN_ALLOCATION_CENTS`): one Stripe
/// transfer per allocation costs the same work whatever its amount, and a few cents left after the fee split are
/// not worth a transfer.
pub const MIN_ALLOCATION_CENTS_DEFAULT: i64 = 100;

/// The platform's limits on what a plan may be, beyond the set's own rules and Stripe's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanLimits {
    /// Currencies the platform's balance settles in. A transfer with `source_transaction` must be in the charge's
    /// balance-transaction currency, so a payment in any other currency could never be distributed.
    pub settlement_currencies: Vec<Currency>,
    /// The smallest positive amount one allocation may have, in the currency's minor units. Zero still means "skip
    /// this recipient" where the mode allows it.
    pub min_allocation_cents: i64,
}

impl Default for PlanLimits {
    fn default() -> Self {
        Self {
            settlement_currencies: SETTLEMENT_CURRENCIES_DEFAULT.to_vec(),
            min_allocation_cents: MIN_ALLOCATION_CENTS_DEFAULT,
        }
    }
}

string_enum!(
    /// How the donor form treats the set's per-recipient amounts (seed: `amount_mode`).
    AmountMode {
        /// The donor pays exactly the set's amounts.
        Fixed => "FIXED",
        /// The set's amounts are pre-filled; the donor may change each (0 skips that recipient).
        Suggested => "SUGGESTED",
        /// The set is a recipient list (amounts 0); the donor enters every amount.
        Open => "OPEN",
    }
);

string_enum!(
    /// How the donor pays (Stripe's PaymentMethod type).
    PaymentMethodType {
        /// Succeeds or fails at confirmation.
        Card => "card",
        /// BECS Direct Debit: `processing` for days, then succeeds or is dishonoured. AUD only.
        AuBecsDebit => "au_becs_debit",
        /// PayTo: the payer authorises a mandate; delayed notification. AUD only.
        Payto => "payto",
    }
);

impl PaymentMethodType {
    /// BECS and PayTo are Australian bank rails: AUD only.
    pub fn supports(self, currency: Currency) -> bool {
        match self {
            PaymentMethodType::Card => true,
            PaymentMethodType::AuBecsDebit | PaymentMethodType::Payto => currency == Currency::Aud,
        }
    }

    /// Whether the outcome arrives days later (`processing` first).
    pub fn is_delayed_notification(self) -> bool {
        !matches!(self, PaymentMethodType::Card)
    }
}

/// One allocation of a recommendation set, as the plan needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAllocation {
    pub id: String,
    pub recipient_org_account_link_id: String,
    pub amount_cents: i64,
}

/// The parts of a recommendation set that decide a plan. `allocations` are in the set's display order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetRules {
    pub id: String,
    pub amount_mode: AmountMode,
    pub currency: Currency,
    pub allocations: Vec<SetAllocation>,
}

/// The amount a donor chose for one allocation of the set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct SubmittedAmount {
    pub allocation_id: String,
    pub amount_cents: i64,
}

/// What the donor sent. `amounts` may be empty for FIXED (the set's amounts apply) and may name only some
/// allocations for SUGGESTED/OPEN (the others keep the set's amount: the pre-fill, or 0 for OPEN).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Submission {
    /// If given, must equal the set's currency.
    pub currency: Option<Currency>,
    pub amounts: Vec<SubmittedAmount>,
}

/// Why a submission cannot become a plan. Each variant names the offending field through [`PlanError::param`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("the recommendation set has no allocations")]
    EmptySet,
    #[error("the recommendation set has {count} allocations; at most {ALLOCATIONS_PER_SET_MAX} are allowed")]
    TooManyAllocations { count: usize },
    #[error("currency {submitted} does not match the recommendation set's currency {expected}")]
    CurrencyMismatch { expected: Currency, submitted: Currency },
    /// The payment's currency is not one the platform settles in. `submitted`: the request named the currency (else
    /// it comes from the set alone).
    #[error("{currency} is not a settlement currency of this platform (accepted: {accepted}); a payment in {currency} could not be distributed")]
    CurrencyNotSettled {
        currency: Currency,
        accepted: String,
        submitted: bool,
    },
    #[error("allocation '{allocation_id}' is not part of this recommendation set")]
    UnknownAllocation { index: usize, allocation_id: String },
    #[error("allocation '{allocation_id}' appears more than once")]
    DuplicateAllocation { index: usize, allocation_id: String },
    #[error("amount_cents for allocation '{allocation_id}' is negative ({amount_cents})")]
    NegativeAmount {
        index: usize,
        allocation_id: String,
        amount_cents: i64,
    },
    #[error("amount_cents for allocation '{allocation_id}' is {amount_cents}; the most allowed is {ALLOCATION_AMOUNT_MAX_CENTS}")]
    AmountTooLarge {
        index: usize,
        allocation_id: String,
        amount_cents: i64,
    },
    #[error(
        "the recommendation set is FIXED: allocation '{allocation_id}' must be {expected_cents}, not {submitted_cents}"
    )]
    FixedAmountChanged {
        index: usize,
        allocation_id: String,
        expected_cents: i64,
        submitted_cents: i64,
    },
    /// A donor's positive amount below the minimum (`index` is its place in the submission's `amounts`).
    #[error("amount_cents for allocation '{allocation_id}' is {amount_cents}; the minimum allocation is {minimum_cents} (or 0 to skip this recipient where the set allows it)")]
    AllocationBelowMinimum {
        index: usize,
        allocation_id: String,
        amount_cents: i64,
        minimum_cents: i64,
    },
    /// A positive amount below the minimum that comes from the set itself: a FIXED set's amount, or a SUGGESTED
    /// pre-fill the donor left as it is.
    #[error("allocation '{allocation_id}' of the recommendation set is {amount_cents}, below the minimum allocation of {minimum_cents}{}", set_minimum_hint(.fixed))]
    SetAllocationBelowMinimum {
        allocation_id: String,
        amount_cents: i64,
        minimum_cents: i64,
        fixed: bool,
    },
    #[error("every amount is zero: at least one allocation must be positive")]
    AllZero,
    #[error("total {total_cents} is below Stripe's minimum charge of {minimum_cents} for {currency}")]
    BelowMinimum {
        total_cents: i64,
        minimum_cents: i64,
        currency: Currency,
    },
    #[error("total {total_cents} is above Stripe's maximum charge of {maximum_cents}")]
    AboveMaximum { total_cents: i64, maximum_cents: i64 },
}

/// What a donor can do about a set's amount below the minimum.
fn set_minimum_hint(fixed: &bool) -> &'static str {
    if *fixed {
        "; this FIXED set cannot be paid until its amounts change"
    } else {
        "; submit 0 to skip it or an amount of at least the minimum"
    }
}

impl PlanError {
    /// The request field this error points at (the seed's `ErrorEnvelope.param`).
    pub fn param(&self) -> String {
        match self {
            PlanError::EmptySet | PlanError::TooManyAllocations { .. } => "recommendation_set_id".into(),
            PlanError::CurrencyMismatch { .. } => "currency".into(),
            // The field that carried the currency: the request's, or else the set's (no `currency` the donor could
            // send would make that set payable).
            PlanError::CurrencyNotSettled { submitted: true, .. } => "currency".into(),
            PlanError::CurrencyNotSettled { submitted: false, .. } => "recommendation_set_id".into(),
            PlanError::SetAllocationBelowMinimum { .. } => "recommendation_set_id".into(),
            PlanError::UnknownAllocation { index, .. } | PlanError::DuplicateAllocation { index, .. } => {
                format!("amounts[{index}].allocation_id")
            }
            PlanError::NegativeAmount { index, .. }
            | PlanError::AmountTooLarge { index, .. }
            | PlanError::FixedAmountChanged { index, .. }
            | PlanError::AllocationBelowMinimum { index, .. } => format!("amounts[{index}].amount_cents"),
            PlanError::AllZero | PlanError::BelowMinimum { .. } | PlanError::AboveMaximum { .. } => "amounts".into(),
        }
    }
}

/// One recipient's share of the plan, gross (what the donor intends for them, before fees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanLine {
    pub set_allocation_id: String,
    pub recipient_org_account_link_id: String,
    /// Position in the set (0-based); lines keep the set's order.
    pub position: usize,
    pub gross_cents: i64,
}

/// A validated split of one payment: positive lines in the set's order, and their exact total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitPlan {
    set_id: String,
    currency: Currency,
    lines: Vec<PlanLine>,
    total_cents: i64,
}

impl SplitPlan {
    pub fn from_submission(
        set: &SetRules,
        submission: &Submission,
        limits: &PlanLimits,
    ) -> Result<SplitPlan, PlanError> {
        assert!(limits.min_allocation_cents > 0, "a positive minimum allocation");
        if set.allocations.is_empty() {
            return Err(PlanError::EmptySet);
        }
        if set.allocations.len() > ALLOCATIONS_PER_SET_MAX {
            return Err(PlanError::TooManyAllocations {
                count: set.allocations.len(),
            });
        }
        if let Some(submitted) = submission.currency {
            if submitted != set.currency {
                return Err(PlanError::CurrencyMismatch {
                    expected: set.currency,
                    submitted,
                });
            }
        }
        // After the mismatch check: a request whose currency is not its set's is refused for that first.
        if !limits.settlement_currencies.contains(&set.currency) {
            return Err(PlanError::CurrencyNotSettled {
                currency: set.currency,
                accepted: limits
                    .settlement_currencies
                    .iter()
                    .map(|c| c.iso_code())
                    .collect::<Vec<_>>()
                    .join(", "),
                submitted: submission.currency.is_some(),
            });
        }

        // The set's amounts are the starting point; the submission overrides them where the mode allows.
        let mut amounts: Vec<i64> = set.allocations.iter().map(|a| a.amount_cents).collect();
        // Where each position's amount came from in the submission (None: the set's own amount).
        let mut submitted_at: Vec<Option<usize>> = vec![None; set.allocations.len()];
        let mut seen: HashSet<&str> = HashSet::new();
        for (index, submitted) in submission.amounts.iter().enumerate() {
            let id = submitted.allocation_id.as_str();
            let Some(position) = set.allocations.iter().position(|a| a.id == id) else {
                return Err(PlanError::UnknownAllocation {
                    index,
                    allocation_id: id.to_owned(),
                });
            };
            if !seen.insert(id) {
                return Err(PlanError::DuplicateAllocation {
                    index,
                    allocation_id: id.to_owned(),
                });
            }
            let amount_cents = submitted.amount_cents;
            if amount_cents < 0 {
                return Err(PlanError::NegativeAmount {
                    index,
                    allocation_id: id.to_owned(),
                    amount_cents,
                });
            }
            if amount_cents > ALLOCATION_AMOUNT_MAX_CENTS {
                return Err(PlanError::AmountTooLarge {
                    index,
                    allocation_id: id.to_owned(),
                    amount_cents,
                });
            }
            if set.amount_mode == AmountMode::Fixed && amount_cents != amounts[position] {
                return Err(PlanError::FixedAmountChanged {
                    index,
                    allocation_id: id.to_owned(),
                    expected_cents: amounts[position],
                    submitted_cents: amount_cents,
                });
            }
            amounts[position] = amount_cents;
            submitted_at[position] = Some(index);
        }

        let mut lines = Vec::with_capacity(set.allocations.len());
        for (position, (allocation, &gross_cents)) in set.allocations.iter().zip(&amounts).enumerate() {
            // A set's own amounts are checked too: a corrupt set must not produce a plan.
            if gross_cents < 0 {
                return Err(PlanError::NegativeAmount {
                    index: position,
                    allocation_id: allocation.id.clone(),
                    amount_cents: gross_cents,
                });
            }
            if gross_cents > ALLOCATION_AMOUNT_MAX_CENTS {
                return Err(PlanError::AmountTooLarge {
                    index: position,
                    allocation_id: allocation.id.clone(),
                    amount_cents: gross_cents,
                });
            }
            if gross_cents > 0 && gross_cents < limits.min_allocation_cents {
                // A FIXED amount is the set's even when the donor echoed it: only the set can change it.
                return Err(match submitted_at[position] {
                    Some(index) if set.amount_mode != AmountMode::Fixed => PlanError::AllocationBelowMinimum {
                        index,
                        allocation_id: allocation.id.clone(),
                        amount_cents: gross_cents,
                        minimum_cents: limits.min_allocation_cents,
                    },
                    _ => PlanError::SetAllocationBelowMinimum {
                        allocation_id: allocation.id.clone(),
                        amount_cents: gross_cents,
                        minimum_cents: limits.min_allocation_cents,
                        fixed: set.amount_mode == AmountMode::Fixed,
                    },
                });
            }
            if gross_cents > 0 {
                lines.push(PlanLine {
                    set_allocation_id: allocation.id.clone(),
                    recipient_org_account_link_id: allocation.recipient_org_account_link_id.clone(),
                    position,
                    gross_cents,
                });
            }
        }
        if lines.is_empty() {
            return Err(PlanError::AllZero);
        }
        // At most 50 lines of at most 2^31-1 each: the sum fits an i64 with room to spare.
        let total_cents: i64 = lines.iter().map(|l| l.gross_cents).sum();
        let minimum_cents = set.currency.min_charge_minor();
        if total_cents < minimum_cents {
            return Err(PlanError::BelowMinimum {
                total_cents,
                minimum_cents,
                currency: set.currency,
            });
        }
        let maximum_cents = set.currency.max_charge_minor();
        if total_cents > maximum_cents {
            return Err(PlanError::AboveMaximum {
                total_cents,
                maximum_cents,
            });
        }
        Ok(SplitPlan {
            set_id: set.id.clone(),
            currency: set.currency,
            lines,
            total_cents,
        })
    }

    pub fn set_id(&self) -> &str {
        &self.set_id
    }

    pub fn currency(&self) -> Currency {
        self.currency
    }

    pub fn lines(&self) -> &[PlanLine] {
        &self.lines
    }

    pub fn total_cents(&self) -> i64 {
        self.total_cents
    }

    pub fn gross_amounts_cents(&self) -> Vec<i64> {
        self.lines.iter().map(|l| l.gross_cents).collect()
    }

    /// The plan with each line's amount replaced by `gross_cents` (same order), e.g. grossed up so the donor covers
    /// the fees; the limits are checked again on the new total.
    pub fn with_gross_amounts(&self, gross_cents: &[i64]) -> Result<SplitPlan, PlanError> {
        assert_eq!(gross_cents.len(), self.lines.len(), "one amount per line");
        let mut lines = self.lines.clone();
        for (index, (line, &gross)) in lines.iter_mut().zip(gross_cents).enumerate() {
            assert!(
                gross >= line.gross_cents,
                "a gross-up never lowers what a recipient was given"
            );
            if gross > ALLOCATION_AMOUNT_MAX_CENTS {
                return Err(PlanError::AmountTooLarge {
                    index,
                    allocation_id: line.set_allocation_id.clone(),
                    amount_cents: gross,
                });
            }
            line.gross_cents = gross;
        }
        let total_cents: i64 = lines.iter().map(|l| l.gross_cents).sum();
        let maximum_cents = self.currency.max_charge_minor();
        if total_cents > maximum_cents {
            return Err(PlanError::AboveMaximum {
                total_cents,
                maximum_cents,
            });
        }
        Ok(SplitPlan {
            set_id: self.set_id.clone(),
            currency: self.currency,
            lines,
            total_cents,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(mode: AmountMode, amounts: &[i64]) -> SetRules {
        SetRules {
            id: "rec_1".into(),
            amount_mode: mode,
            currency: Currency::Aud,
            allocations: amounts
                .iter()
                .enumerate()
                .map(|(i, &amount_cents)| SetAllocation {
                    id: format!("alc_{i}"),
                    recipient_org_account_link_id: format!("lnk_{i}"),
                    amount_cents,
                })
                .collect(),
        }
    }

    fn amount(i: usize, amount_cents: i64) -> SubmittedAmount {
        SubmittedAmount {
            allocation_id: format!("alc_{i}"),
            amount_cents,
        }
    }

    /// A plan under the default limits (AUD, allocations of at least 100).
    fn plan_of(s: &SetRules, submission: &Submission) -> Result<SplitPlan, PlanError> {
        SplitPlan::from_submission(s, submission, &PlanLimits::default())
    }

    /// Limits that let through any positive allocation, to test the other rules with small amounts.
    fn any_positive() -> PlanLimits {
        PlanLimits {
            min_allocation_cents: 1,
            ..PlanLimits::default()
        }
    }

    fn submit(amounts: Vec<SubmittedAmount>) -> Submission {
        Submission {
            currency: None,
            amounts,
        }
    }

    #[test]
    fn fixed_without_amounts_takes_the_set() {
        let plan = plan_of(&set(AmountMode::Fixed, &[1000, 2500, 500]), &submit(vec![])).unwrap();
        assert_eq!(plan.gross_amounts_cents(), vec![1000, 2500, 500]);
        assert_eq!(plan.total_cents(), 4000);
        assert_eq!(plan.lines()[1].recipient_org_account_link_id, "lnk_1");
    }

    #[test]
    fn fixed_with_the_same_amounts_is_accepted_and_changed_amounts_refused() {
        let s = set(AmountMode::Fixed, &[1000, 2500]);
        let same = submit(vec![amount(1, 2500), amount(0, 1000)]);
        assert_eq!(plan_of(&s, &same).unwrap().gross_amounts_cents(), vec![1000, 2500]);
        let tampered = submit(vec![amount(0, 1000), amount(1, 2400)]);
        let err = plan_of(&s, &tampered).unwrap_err();
        assert_eq!(
            err,
            PlanError::FixedAmountChanged {
                index: 1,
                allocation_id: "alc_1".into(),
                expected_cents: 2500,
                submitted_cents: 2400
            }
        );
        assert_eq!(err.param(), "amounts[1].amount_cents");
        let zeroed = submit(vec![amount(0, 0)]);
        assert!(matches!(
            plan_of(&s, &zeroed),
            Err(PlanError::FixedAmountChanged { .. })
        ));
    }

    #[test]
    fn suggested_donor_changes_and_zero_skips() {
        let s = set(AmountMode::Suggested, &[1000, 2000, 3000]);
        let plan = plan_of(&s, &submit(vec![amount(0, 1500), amount(1, 0)])).unwrap();
        let ids: Vec<_> = plan.lines().iter().map(|l| l.set_allocation_id.as_str()).collect();
        assert_eq!(
            ids,
            vec!["alc_0", "alc_2"],
            "zero skips; untouched keeps the pre-fill; set order kept"
        );
        assert_eq!(plan.gross_amounts_cents(), vec![1500, 3000]);
        assert_eq!(plan.lines()[1].position, 2);
    }

    #[test]
    fn open_takes_donor_amounts_in_set_order() {
        let s = set(AmountMode::Open, &[0, 0, 0]);
        let plan = plan_of(&s, &submit(vec![amount(2, 700), amount(0, 300)])).unwrap();
        assert_eq!(plan.gross_amounts_cents(), vec![300, 700]);
        assert_eq!(plan.lines()[0].set_allocation_id, "alc_0");
        assert_eq!(
            plan_of(&s, &submit(vec![])).unwrap_err(),
            PlanError::AllZero,
            "OPEN with nothing entered"
        );
    }

    #[test]
    fn precise_errors() {
        let s = set(AmountMode::Suggested, &[1000, 1000]);
        let cases: Vec<(Submission, PlanError, &str)> = vec![
            (
                submit(vec![SubmittedAmount {
                    allocation_id: "alc_9".into(),
                    amount_cents: 5,
                }]),
                PlanError::UnknownAllocation {
                    index: 0,
                    allocation_id: "alc_9".into(),
                },
                "amounts[0].allocation_id",
            ),
            (
                submit(vec![amount(0, 5), amount(0, 6)]),
                PlanError::DuplicateAllocation {
                    index: 1,
                    allocation_id: "alc_0".into(),
                },
                "amounts[1].allocation_id",
            ),
            (
                submit(vec![amount(1, -1)]),
                PlanError::NegativeAmount {
                    index: 0,
                    allocation_id: "alc_1".into(),
                    amount_cents: -1,
                },
                "amounts[0].amount_cents",
            ),
            (
                submit(vec![amount(1, ALLOCATION_AMOUNT_MAX_CENTS + 1)]),
                PlanError::AmountTooLarge {
                    index: 0,
                    allocation_id: "alc_1".into(),
                    amount_cents: ALLOCATION_AMOUNT_MAX_CENTS + 1,
                },
                "amounts[0].amount_cents",
            ),
            (submit(vec![amount(0, 0), amount(1, 0)]), PlanError::AllZero, "amounts"),
            (
                submit(vec![amount(0, 20), amount(1, 29)]),
                PlanError::BelowMinimum {
                    total_cents: 49,
                    minimum_cents: 50,
                    currency: Currency::Aud,
                },
                "amounts",
            ),
            (
                submit(vec![amount(0, 50_000_000), amount(1, 50_000_000)]),
                PlanError::AboveMaximum {
                    total_cents: 100_000_000,
                    maximum_cents: 99_999_999,
                },
                "amounts",
            ),
            (
                Submission {
                    currency: Some(Currency::Usd),
                    amounts: vec![],
                },
                PlanError::CurrencyMismatch {
                    expected: Currency::Aud,
                    submitted: Currency::Usd,
                },
                "currency",
            ),
        ];
        for (submission, expected, param) in cases {
            let err = SplitPlan::from_submission(&s, &submission, &any_positive()).unwrap_err();
            assert_eq!(err, expected);
            assert_eq!(err.param(), param);
        }
        assert_eq!(
            plan_of(&set(AmountMode::Open, &[]), &submit(vec![])),
            Err(PlanError::EmptySet)
        );
        let minimum_exact = submit(vec![amount(0, 25), amount(1, 25)]);
        assert_eq!(
            SplitPlan::from_submission(&s, &minimum_exact, &any_positive())
                .unwrap()
                .total_cents(),
            50
        );
        let maximum_exact = submit(vec![amount(0, 49_999_999), amount(1, 50_000_000)]);
        assert_eq!(plan_of(&s, &maximum_exact).unwrap().total_cents(), 99_999_999);
    }

    #[test]
    fn bank_debits_are_aud_only() {
        assert!(PaymentMethodType::AuBecsDebit.supports(Currency::Aud));
        assert!(!PaymentMethodType::AuBecsDebit.supports(Currency::Nzd));
        assert!(!PaymentMethodType::Payto.supports(Currency::Usd));
        assert!(PaymentMethodType::Card.supports(Currency::Jpy));
        assert_eq!(
            PaymentMethodType::parse("au_becs_debit"),
            Some(PaymentMethodType::AuBecsDebit)
        );
        assert_eq!(AmountMode::parse("OPEN"), Some(AmountMode::Open));
        assert_eq!(AmountMode::parse("open"), None);
    }

    #[test]
    fn grossed_up_plans_keep_lines_and_recheck_limits() {
        let s = set(AmountMode::Fixed, &[1000, 2000]);
        let plan = plan_of(&s, &submit(vec![])).unwrap();
        let up = plan.with_gross_amounts(&[1050, 2090]).unwrap();
        assert_eq!((up.gross_amounts_cents(), up.total_cents()), (vec![1050, 2090], 3140));
        assert_eq!(up.lines()[1].set_allocation_id, "alc_1");
        assert!(
            std::panic::catch_unwind(|| plan.with_gross_amounts(&[999, 2000])).is_err(),
            "never below what was asked"
        );
        let big = set(AmountMode::Fixed, &[50_000_000, 49_000_000]);
        let plan = plan_of(&big, &submit(vec![])).unwrap();
        assert!(matches!(
            plan.with_gross_amounts(&[51_000_000, 49_000_000]),
            Err(PlanError::AboveMaximum { .. })
        ));
    }

    #[test]
    fn corrupt_set_amounts_are_refused_too() {
        let s = set(AmountMode::Fixed, &[1000, -5]);
        assert!(matches!(
            plan_of(&s, &submit(vec![])),
            Err(PlanError::NegativeAmount { .. })
        ));
    }

    #[test]
    fn only_settlement_currencies_make_a_plan() {
        let usd = SetRules {
            currency: Currency::Usd,
            ..set(AmountMode::Fixed, &[1_000, 2_000])
        };
        let err = plan_of(&usd, &submit(vec![])).unwrap_err();
        assert_eq!(
            err,
            PlanError::CurrencyNotSettled {
                currency: Currency::Usd,
                accepted: "AUD".into(),
                submitted: false
            }
        );
        assert_eq!(err.param(), "recommendation_set_id", "the set carried the currency");
        assert!(
            err.to_string().contains("USD") && err.to_string().contains("AUD"),
            "{err}"
        );
        let named = Submission {
            currency: Some(Currency::Usd),
            amounts: vec![],
        };
        assert_eq!(
            plan_of(&usd, &named).unwrap_err().param(),
            "currency",
            "the request carried it"
        );
        // A request whose currency is not its set's is a mismatch first, whatever the settlement currencies.
        let nzd = Submission {
            currency: Some(Currency::Nzd),
            amounts: vec![],
        };
        assert!(matches!(plan_of(&usd, &nzd), Err(PlanError::CurrencyMismatch { .. })));
        let aud_and_usd = PlanLimits {
            settlement_currencies: vec![Currency::Aud, Currency::Usd],
            ..PlanLimits::default()
        };
        let plan = SplitPlan::from_submission(&usd, &named, &aud_and_usd).unwrap();
        assert_eq!((plan.currency(), plan.total_cents()), (Currency::Usd, 3_000));
    }

    #[test]
    fn donor_amounts_below_the_minimum_are_refused_but_zero_still_skips() {
        let s = set(AmountMode::Suggested, &[1_000, 1_000, 1_000]);
        let err = plan_of(&s, &submit(vec![amount(2, 0), amount(1, 99)])).unwrap_err();
        assert_eq!(
            err,
            PlanError::AllocationBelowMinimum {
                index: 1,
                allocation_id: "alc_1".into(),
                amount_cents: 99,
                minimum_cents: 100
            }
        );
        assert_eq!(err.param(), "amounts[1].amount_cents");
        assert!(err.to_string().contains("minimum allocation is 100"), "{err}");
        let plan = plan_of(&s, &submit(vec![amount(2, 0), amount(1, 100)])).unwrap();
        assert_eq!(
            plan.gross_amounts_cents(),
            vec![1_000, 100],
            "exactly the minimum; zero skips"
        );
        let open = set(AmountMode::Open, &[0, 0]);
        assert_eq!(
            plan_of(&open, &submit(vec![amount(0, 1)])).unwrap_err().param(),
            "amounts[0].amount_cents"
        );
        assert_eq!(
            plan_of(&open, &submit(vec![amount(1, 100)])).unwrap().total_cents(),
            100
        );
        // A configured minimum applies as given.
        let higher = PlanLimits {
            min_allocation_cents: 500,
            ..PlanLimits::default()
        };
        assert!(matches!(
            SplitPlan::from_submission(&open, &submit(vec![amount(1, 499)]), &higher),
            Err(PlanError::AllocationBelowMinimum { index: 0, .. })
        ));
    }

    #[test]
    fn set_amounts_below_the_minimum_are_refused_naming_the_allocation() {
        let fixed = set(AmountMode::Fixed, &[1_000, 50]);
        let expected = PlanError::SetAllocationBelowMinimum {
            allocation_id: "alc_1".into(),
            amount_cents: 50,
            minimum_cents: 100,
            fixed: true,
        };
        assert_eq!(plan_of(&fixed, &submit(vec![])).unwrap_err(), expected);
        let echoed = submit(vec![amount(0, 1_000), amount(1, 50)]);
        let err = plan_of(&fixed, &echoed).unwrap_err();
        assert_eq!(err, expected, "echoing a FIXED amount does not make it the donor's");
        assert_eq!(err.param(), "recommendation_set_id");
        assert!(
            err.to_string().contains("'alc_1'") && err.to_string().contains("FIXED"),
            "{err}"
        );
        // A zero in a FIXED set is no allocation at all: not below the minimum.
        assert_eq!(
            plan_of(&set(AmountMode::Fixed, &[1_000, 0]), &submit(vec![]))
                .unwrap()
                .gross_amounts_cents(),
            vec![1_000]
        );
        // A SUGGESTED pre-fill below the minimum: refused as it is, fine once the donor skips or raises it.
        let suggested = set(AmountMode::Suggested, &[1_000, 50]);
        let err = plan_of(&suggested, &submit(vec![])).unwrap_err();
        assert!(matches!(err, PlanError::SetAllocationBelowMinimum { fixed: false, .. }));
        assert!(err.to_string().contains("submit 0 to skip it"), "{err}");
        assert_eq!(
            plan_of(&suggested, &submit(vec![amount(1, 0)])).unwrap().total_cents(),
            1_000
        );
        assert_eq!(
            plan_of(&suggested, &submit(vec![amount(1, 100)]))
                .unwrap()
                .total_cents(),
            1_100
        );
    }

    proptest! {
        /// A FIXED set's plan is the set itself (minus zero lines), whatever order the donor echoes it in.
        #[test]
        fn fixed_plans_equal_the_set(
            amounts in prop::collection::vec(prop_oneof![0i64..300, 0i64..5_000_000], 1..12),
            echo in any::<bool>(),
        ) {
            let s = set(AmountMode::Fixed, &amounts);
            let submission = if echo {
                submit(amounts.iter().enumerate().rev().map(|(i, &a)| amount(i, a)).collect())
            } else {
                submit(vec![])
            };
            let total: i64 = amounts.iter().sum();
            match plan_of(&s, &submission) {
                Ok(plan) => {
                    prop_assert!(amounts.iter().all(|&a| a == 0 || a >= 100), "no line below the minimum");
                    let expected: Vec<i64> = amounts.iter().copied().filter(|&a| a > 0).collect();
                    prop_assert_eq!(plan.gross_amounts_cents(), expected);
                    prop_assert_eq!(plan.total_cents(), total);
                    prop_assert!(plan.lines().windows(2).all(|w| w[0].position < w[1].position));
                }
                Err(PlanError::SetAllocationBelowMinimum { allocation_id, amount_cents, fixed, .. }) => {
                    // Refused for the first small amount, whether or not the donor echoed it.
                    let first = amounts.iter().position(|&a| a > 0 && a < 100);
                    prop_assert_eq!(first.map(|i| format!("alc_{i}")), Some(allocation_id));
                    prop_assert_eq!(Some(amount_cents), first.map(|i| amounts[i]));
                    prop_assert!(fixed);
                }
                Err(PlanError::AllZero) => prop_assert_eq!(total, 0),
                Err(PlanError::BelowMinimum { .. }) => prop_assert!(total < 50),
                Err(PlanError::AboveMaximum { .. }) => prop_assert!(total > 99_999_999),
                Err(other) => prop_assert!(false, "unexpected {other:?}"),
            }
        }

        /// SUGGESTED/OPEN plans never hold a zero or negative line and their total is the sum of the lines.
        #[test]
        fn donor_plans_hold_positive_lines(
            amounts in prop::collection::vec(prop_oneof![-10i64..300, -10i64..100_000], 1..12),
        ) {
            let s = set(AmountMode::Open, &vec![0; amounts.len()]);
            let submission = submit(amounts.iter().enumerate().map(|(i, &a)| amount(i, a)).collect());
            if let Ok(plan) = plan_of(&s, &submission) {
                prop_assert!(amounts.iter().all(|&a| a >= 0));
                prop_assert!(plan.lines().iter().all(|l| l.gross_cents >= 100));
                prop_assert_eq!(plan.total_cents(), plan.lines().iter().map(|l| l.gross_cents).sum::<i64>());
                prop_assert_eq!(plan.total_cents(), amounts.iter().sum::<i64>());
            } else {
                prop_assert!(
                    amounts.iter().any(|&a| a < 0 || (a > 0 && a < 100)) || amounts.iter().sum::<i64>() < 50
                );
            }
        }

        /// Under any minimum, a donor's plan exists exactly when every amount is 0 or at least the minimum, one is
        /// positive and the total reaches Stripe's minimum; a refusal names the first small amount by its place in
        /// the submission.
        #[test]
        fn the_minimum_allocation_is_exact(
            min in 1i64..1_000,
            amounts in prop::collection::vec(prop_oneof![Just(0i64), 0i64..2_000], 1..10),
            reversed in any::<bool>(),
        ) {
            let s = set(AmountMode::Open, &vec![0; amounts.len()]);
            let mut entries: Vec<SubmittedAmount> = amounts.iter().enumerate().map(|(i, &a)| amount(i, a)).collect();
            if reversed {
                entries.reverse();
            }
            let limits = PlanLimits { min_allocation_cents: min, ..PlanLimits::default() };
            let result = SplitPlan::from_submission(&s, &submit(entries.clone()), &limits);
            let small = |a: i64| a > 0 && a < min;
            let total: i64 = amounts.iter().sum();
            let acceptable = amounts.iter().all(|&a| !small(a)) && total >= 50;
            match result {
                Ok(plan) => {
                    prop_assert!(acceptable);
                    prop_assert!(plan.lines().iter().all(|l| l.gross_cents >= min));
                    prop_assert_eq!(plan.total_cents(), total);
                }
                Err(PlanError::AllocationBelowMinimum { index, amount_cents, minimum_cents, .. }) => {
                    // Lines are checked in the set's order: the first small one by position.
                    let position = amounts.iter().position(|&a| small(a)).unwrap();
                    let expected_index = if reversed { amounts.len() - 1 - position } else { position };
                    prop_assert_eq!(index, expected_index);
                    prop_assert_eq!(entries[index].amount_cents, amount_cents);
                    prop_assert_eq!(minimum_cents, min);
                }
                Err(PlanError::AllZero) => prop_assert_eq!(total, 0),
                Err(PlanError::BelowMinimum { .. }) => prop_assert!(total < 50 && amounts.iter().all(|&a| !small(a))),
                Err(other) => prop_assert!(false, "unexpected {other:?}"),
            }
        }

        /// A plan exists only in a settlement currency; any other is refused before anything about the amounts.
        #[test]
        fn plans_are_only_in_settlement_currencies(
            currency_index in 0usize..Currency::ALL.len(),
            accepted_mask in 1u16..(1 << Currency::ALL.len()),
            name_it in any::<bool>(),
        ) {
            let currency = Currency::ALL[currency_index];
            let settlement_currencies: Vec<Currency> = Currency::ALL
                .into_iter()
                .enumerate()
                .filter(|(i, _)| accepted_mask & (1 << i) != 0)
                .map(|(_, c)| c)
                .collect();
            let limits = PlanLimits { settlement_currencies: settlement_currencies.clone(), ..PlanLimits::default() };
            let s = SetRules { currency, ..set(AmountMode::Fixed, &[1_000, 2_000]) };
            let submission = Submission { currency: name_it.then_some(currency), amounts: vec![] };
            match SplitPlan::from_submission(&s, &submission, &limits) {
                Ok(plan) => {
                    prop_assert!(settlement_currencies.contains(&currency));
                    prop_assert_eq!(plan.currency(), currency);
                }
                Err(e @ PlanError::CurrencyNotSettled { .. }) => {
                    prop_assert!(!settlement_currencies.contains(&currency));
                    prop_assert_eq!(e.param(), if name_it { "currency" } else { "recommendation_set_id" });
                }
                Err(other) => prop_assert!(false, "unexpected {other:?}"),
            }
        }
    }
}
