//! Stripe secret keys. A key is a [`Secret`]: it never appears in logs, `Debug` output or errors. A live key is
//! refused unless `SPLITPAY_ALLOW_LIVE=1` says otherwise, so a test run can never move real money by accident.

use crate::config::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMode {
    Test,
    Live,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeKey {
    secret: Secret,
    mode: KeyMode,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("STRIPE_SECRET_KEY is not a Stripe secret key (expected sk_test_…, rk_test_…, sk_live_… or rk_live_…)")]
    Malformed,
    #[error("STRIPE_SECRET_KEY is a live key; refusing to start without SPLITPAY_ALLOW_LIVE=1")]
    LiveNotAllowed,
}

impl StripeKey {
    pub fn parse(raw: &str, allow_live: bool) -> Result<Self, KeyError> {
        let raw = raw.trim();
        let mode = if ["sk_test_", "rk_test_"].iter().any(|p| raw.starts_with(p)) {
            KeyMode::Test
        } else if ["sk_live_", "rk_live_"].iter().any(|p| raw.starts_with(p)) {
            KeyMode::Live
        } else {
            return Err(KeyError::Malformed);
        };
        let well_formed = raw.len() > "sk_test_".len() && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !well_formed {
            return Err(KeyError::Malformed);
        }
        if mode == KeyMode::Live && !allow_live {
            return Err(KeyError::LiveNotAllowed);
        }
        Ok(Self {
            secret: Secret::new(raw),
            mode,
        })
    }

    pub fn mode(&self) -> KeyMode {
        self.mode
    }

    pub fn secret(&self) -> &Secret {
        &self.secret
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_keys_pass_live_keys_need_permission() {
        assert_eq!(StripeKey::parse("sk_test_abc123", false).unwrap().mode(), KeyMode::Test);
        assert_eq!(StripeKey::parse("rk_test_abc123", false).unwrap().mode(), KeyMode::Test);
        assert_eq!(StripeKey::parse("sk_live_abc123", false), Err(KeyError::LiveNotAllowed));
        assert_eq!(StripeKey::parse("sk_live_abc123", true).unwrap().mode(), KeyMode::Live);
        assert_eq!(StripeKey::parse("pk_test_abc123", false), Err(KeyError::Malformed));
        assert_eq!(StripeKey::parse("sk_test_", false), Err(KeyError::Malformed));
        assert_eq!(StripeKey::parse("sk_test_a b", false), Err(KeyError::Malformed));
    }

    #[test]
    fn keys_never_print() {
        let key = StripeKey::parse("sk_test_supersecret", false).unwrap();
        let shown = format!("{key:?}");
        assert!(!shown.contains("supersecret"), "{shown}");
        for err in [
            StripeKey::parse("sk_live_supersecret", false).unwrap_err(),
            StripeKey::parse("xx_supersecret", false).unwrap_err(),
        ] {
            assert!(!err.to_string().contains("supersecret"));
        }
    }
}
