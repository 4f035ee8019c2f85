//! The test PaymentMethods of Stripe's docs the simulator knows (cards, the BECS test accounts, PayTo), what each
//! does when a PaymentIntent is confirmed with it, and the check that a PaymentIntent allows its type.

use super::SimError;

/// What a PaymentMethod does when a PaymentIntent is confirmed with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Behaviour {
    Card {
        decline_code: Option<&'static str>,
        bypass_pending: bool,
        /// `pm_card_createDispute`: the payment succeeds, then a dispute opens at once.
        dispute: bool,
    },
    /// A bank debit (BECS, PayTo): `processing` until `after_secs`, then success or failure.
    Debit {
        after_secs: i64,
        failure: Option<(&'static str, &'static str)>,
        dispute: bool,
    },
}

/// The test BECS account numbers of Stripe's docs (BSB 000-000) and what each does.
pub(super) fn becs_behaviour(account_number: &str) -> Option<Behaviour> {
    let debit = |after_secs, failure, dispute| Behaviour::Debit {
        after_secs,
        failure,
        dispute,
    };
    Some(match account_number {
        "000123456" => debit(-1, None, false),
        "900123456" => debit(-2, None, false),
        "111111113" => debit(
            -1,
            Some(("account_closed", "The customer's bank account has been closed.")),
            false,
        ),
        "111111116" => debit(
            -1,
            Some(("no_account", "The customer's bank account could not be located.")),
            false,
        ),
        "222222227" => debit(
            -1,
            Some(("refer_to_customer", "The customer's bank refused the debit.")),
            false,
        ),
        "922222227" => debit(
            -2,
            Some(("refer_to_customer", "The customer's bank refused the debit.")),
            false,
        ),
        "333333335" => debit(
            -1,
            Some((
                "debit_not_authorized",
                "The customer notified their bank that the debit was unauthorized.",
            )),
            false,
        ),
        "666666660" => debit(-1, None, true),
        "343434343" => debit(
            -1,
            Some(("charge_exceeds_source_limit", "The debit exceeds the account's limit.")),
            false,
        ),
        "121212121" => debit(
            -1,
            Some((
                "charge_exceeds_transaction_limit",
                "The debit exceeds the transaction limit.",
            )),
            false,
        ),
        _ => return None,
    })
}

/// PaymentMethod ids the simulator knows. Cards use Stripe's test ids; BECS uses `pm_becs_{account number}` (or
/// `payment_method_data` with the account number); PayTo uses `pm_payto_success` / `pm_payto_declined`.
pub(super) fn payment_method_behaviour(pm: &str) -> Option<(&'static str, Behaviour)> {
    let card = |decline_code, bypass_pending, dispute| {
        (
            "card",
            Behaviour::Card {
                decline_code,
                bypass_pending,
                dispute,
            },
        )
    };
    Some(match pm {
        "pm_card_visa" | "pm_card_mastercard" | "pm_card_au" => card(None, false, false),
        "pm_card_bypassPending" => card(None, true, false),
        "pm_card_createDispute" => card(None, false, true),
        "pm_card_chargeDeclined" => card(Some("generic_decline"), false, false),
        "pm_card_chargeDeclinedInsufficientFunds" => card(Some("insufficient_funds"), false, false),
        "pm_payto_success" => (
            "payto",
            Behaviour::Debit {
                after_secs: -3,
                failure: None,
                dispute: false,
            },
        ),
        "pm_payto_declined" => (
            "payto",
            Behaviour::Debit {
                after_secs: -3,
                failure: Some((
                    "payment_method_provider_decline",
                    "The payer declined the PayTo mandate.",
                )),
                dispute: false,
            },
        ),
        _ => {
            let account = pm.strip_prefix("pm_becs_")?;
            ("au_becs_debit", becs_behaviour(account)?)
        }
    })
}

/// The PaymentMethod's type and behaviour, if the simulator knows it and the PaymentIntent allows its type.
pub(super) fn check_payment_method(pm: &str, allowed: &[String]) -> Result<(&'static str, Behaviour), SimError> {
    let Some((pm_type, behaviour)) = payment_method_behaviour(pm) else {
        return Err(SimError {
            status: 400,
            ..SimError::missing("PaymentMethod", pm, Some("payment_method"))
        });
    };
    if !allowed.iter().any(|t| t == pm_type) {
        return Err(SimError::refused(
            400,
            "payment_intent_incompatible_payment_method",
            format!("The PaymentMethod type {pm_type} is not allowed for this PaymentIntent."),
            Some("payment_method"),
        ));
    }
    Ok((pm_type, behaviour))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stripe_becs_test_account_is_known() {
        for account in [
            "000123456",
            "900123456",
            "111111113",
            "111111116",
            "222222227",
            "922222227",
            "333333335",
            "666666660",
            "343434343",
            "121212121",
        ] {
            assert!(becs_behaviour(account).is_some(), "{account}");
        }
        assert!(payment_method_behaviour("pm_becs_999").is_none());
    }
}
