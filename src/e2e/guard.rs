//! The end-to-end suite's safety catch: it talks to Stripe only with a test-mode key from `STRIPE_TEST_SECRET_KEY`,
//! and stops before creating anything if Stripe itself says the key is live. The key is a [`StripeKey`]: it never
//! appears in output, logs or errors.

use crate::stripe::keys::{KeyError, KeyMode, StripeKey};

/// The variable the suite reads its key from; never `STRIPE_SECRET_KEY`, so a shell set up for production cannot run
/// it by accident.
pub const KEY_VARIABLE: &str = "STRIPE_TEST_SECRET_KEY";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    #[error(
        "{KEY_VARIABLE} is not set: the end-to-end suite needs a Stripe test-mode secret key (sk_test_… or rk_test_…)"
    )]
    Missing,
    #[error("{KEY_VARIABLE} holds a live key: the end-to-end suite runs only in Stripe test mode (sk_test_… or rk_test_…); refusing to run")]
    Live,
    #[error("{KEY_VARIABLE} is not a Stripe test-mode secret key (expected sk_test_… or rk_test_…); refusing to run")]
    NotATestKey,
    #[error("Stripe answered in live mode (livemode: true) for this key; refusing to run")]
    StripeSaysLive,
}

/// Accepts only `sk_test_…`/`rk_test_…`: a live key is refused even where splitpay would allow it
/// (`SPLITPAY_ALLOW_LIVE`), and anything else is refused without being echoed.
pub fn test_mode_key(raw: Option<&str>) -> Result<StripeKey, GuardError> {
    let raw = raw
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .ok_or(GuardError::Missing)?;
    match StripeKey::parse(raw, true) {
        Ok(key) if key.mode() == KeyMode::Test => Ok(key),
        Ok(_) => Err(GuardError::Live),
        Err(KeyError::LiveNotAllowed) => Err(GuardError::Live),
        Err(KeyError::Malformed) => Err(GuardError::NotATestKey),
    }
}

/// Stripe's own word on the mode: any object it answers with carries `livemode`; a key that passed the prefix check
/// but reaches live mode (a proxy rewriting keys, a mislabelled restricted key) stops the run here.
pub fn check_test_mode(object: &serde_json::Value) -> Result<(), GuardError> {
    match object["livemode"].as_bool() {
        Some(false) => Ok(()),
        _ => Err(GuardError::StripeSaysLive),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_test_keys_pass_and_refusals_never_echo_the_key() {
        assert_eq!(test_mode_key(Some("sk_test_abc123")).unwrap().mode(), KeyMode::Test);
        assert_eq!(test_mode_key(Some(" rk_test_abc123 ")).unwrap().mode(), KeyMode::Test);
        assert_eq!(test_mode_key(None), Err(GuardError::Missing));
        assert_eq!(test_mode_key(Some("  ")), Err(GuardError::Missing));
        for live in ["sk_live_secret123", "rk_live_secret123"] {
            assert_eq!(test_mode_key(Some(live)), Err(GuardError::Live));
        }
        for garbage in [
            "pk_test_secret123",
            "whsec_secret123",
            "secret123",
            "sk_test_",
            "sk_test_a b",
        ] {
            let err = test_mode_key(Some(garbage)).unwrap_err();
            assert_eq!(err, GuardError::NotATestKey, "{garbage}");
            assert!(!err.to_string().contains("secret123"));
        }
    }

    #[test]
    fn an_answer_in_live_mode_or_without_a_mode_stops_the_run() {
        assert_eq!(check_test_mode(&serde_json::json!({ "livemode": false })), Ok(()));
        assert_eq!(
            check_test_mode(&serde_json::json!({ "livemode": true })),
            Err(GuardError::StripeSaysLive)
        );
        assert_eq!(
            check_test_mode(&serde_json::json!({ "object": "balance" })),
            Err(GuardError::StripeSaysLive)
        );
    }
}
