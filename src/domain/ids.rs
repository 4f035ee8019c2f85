//! Identifiers: a short prefix that says what the id names, an underscore, and a random part.
//!
//! The seed API uses cuid-style ids (`cm3rec…`); splitpay's own rows use `{prefix}_{26 chars}` where the 26
//! characters are the Crockford base32 (lowercase) of a UUIDv7: 74 random bits make collisions negligible, the
//! leading timestamp keeps B-tree inserts local, and the prefix makes a pasted id self-describing in logs and ops
//! commands (`spay_…` is a split payment, `salc_…` one of its allocations). Ids that come from the platform
//! (organisations, links, sets) are accepted in any non-empty printable form up to [`ID_LEN_MAX`] characters, since
//! the platform mints them, not us.

use std::fmt;

/// Longest id accepted from outside; the platform's cuids are ~25 characters, Stripe's ids under 255.
pub const ID_LEN_MAX: usize = 64;

const CROCKFORD: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// Encodes 128 bits as 26 Crockford base32 characters (the first carries 3 bits).
fn base32_u128(mut value: u128) -> String {
    let mut out = [0u8; 26];
    for slot in out.iter_mut().rev() {
        *slot = CROCKFORD[(value & 31) as usize];
        value >>= 5;
    }
    String::from_utf8(out.to_vec()).expect("alphabet is ASCII")
}

/// A fresh `{prefix}_{base32(uuidv7)}` id.
pub fn new_id(prefix: &str) -> String {
    debug_assert!(!prefix.is_empty() && prefix.bytes().all(|b| b.is_ascii_lowercase()));
    format!("{prefix}_{}", base32_u128(uuid::Uuid::now_v7().as_u128()))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be a non-empty id of at most {ID_LEN_MAX} letters, digits, '_' or '-'")]
pub struct IdError {
    pub what: &'static str,
}

/// Checks an id that arrives from outside (an API body, a CLI argument).
pub fn check_external_id(what: &'static str, raw: &str) -> Result<(), IdError> {
    let ok = !raw.is_empty()
        && raw.len() <= ID_LEN_MAX
        && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(IdError { what })
    }
}

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A new random id.
            pub fn generate() -> Self {
                Self(new_id($prefix))
            }

            /// Parses an id that must carry this type's prefix.
            pub fn parse(raw: &str) -> Result<Self, IdError> {
                check_external_id(stringify!($name), raw)?;
                if raw.strip_prefix($prefix).is_some_and(|rest| rest.starts_with('_') && rest.len() > 1) {
                    Ok(Self(raw.to_owned()))
                } else {
                    Err(IdError { what: stringify!($name) })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

prefixed_id!(
    /// One donor payment through a recommendation set (also its Stripe `transfer_group`).
    SplitPaymentId,
    "spay"
);
prefixed_id!(
    /// One recipient's share of a split payment.
    SplitAllocationId,
    "salc"
);
prefixed_id!(
    /// A per-recipient donation row (seed `Donation`, source `SPLIT_GATEWAY`).
    DonationId,
    "don"
);
prefixed_id!(
    /// An outbound event splitpay emits to organisations.
    OutboxEventId,
    "oevt"
);

/// The idempotency key of an allocation's transfer in one generation. Derived only from immutable row data, so a
/// retry of the same generation always sends the same key, and an operator's retry (generation + 1) a new one —
/// Stripe replays a saved error for the same key for 24 hours, so a retry after fixing an account needs a new key.
pub fn transfer_idempotency_key(allocation: &SplitAllocationId, generation: i32) -> String {
    assert!(generation > 0, "generation starts at 1");
    format!("splitpay:alloc:{allocation}:transfer:{generation}")
}

/// The idempotency key of the `seq`-th refund splitpay makes of an allocation's share (`ops refund`).
pub fn refund_idempotency_key(allocation: &SplitAllocationId, seq: i64) -> String {
    assert!(seq > 0, "sequences start at 1");
    format!("splitpay:refund:{allocation}:{seq}")
}

/// The idempotency key of the `seq`-th reversal of an allocation's transfer of `generation`.
pub fn reversal_idempotency_key(allocation: &SplitAllocationId, generation: i32, seq: i32) -> String {
    assert!(generation > 0 && seq > 0, "generations and sequences start at 1");
    format!("splitpay:alloc:{allocation}:reversal:{generation}:{seq}")
}

/// The key actually sent for attempt `key_attempt` of a stored refund or reversal key: the stored key itself at
/// attempt 1 (so rows written before attempts existed keep their key), `{key}:k{n}` after. Stripe saves a coded 4xx
/// refusal under a key and replays it, so only such a refusal moves a row to its next attempt.
pub fn attempt_key(key: &str, key_attempt: i32) -> String {
    assert!(key_attempt > 0, "key attempts start at 1");
    if key_attempt == 1 {
        key.to_owned()
    } else {
        format!("{key}:k{key_attempt}")
    }
}

/// The idempotency key of a split payment's PaymentIntent: one PaymentIntent per split payment, ever.
pub fn payment_intent_idempotency_key(payment: &SplitPaymentId) -> String {
    format!("splitpay:payment:{payment}:intent")
}

/// The key of splitpay's one cancellation of a payment's PaymentIntent (a final failure, an abandonment).
pub fn payment_intent_cancel_key(payment: &SplitPaymentId) -> String {
    format!("splitpay:payment:{payment}:cancel")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_carry_prefix_and_parse_back() {
        let id = SplitPaymentId::generate();
        assert!(id.as_str().starts_with("spay_"));
        assert_eq!(id.as_str().len(), "spay_".len() + 26);
        assert_eq!(SplitPaymentId::parse(id.as_str()).unwrap(), id);
    }

    #[test]
    fn ids_are_unique_and_time_ordered() {
        let a = SplitAllocationId::generate();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = SplitAllocationId::generate();
        assert_ne!(a, b);
        assert!(a < b, "UUIDv7 ids sort by creation time");
    }

    #[test]
    fn idempotency_keys_are_derived_and_fit_stripe() {
        let id = SplitAllocationId::parse("salc_01abc").unwrap();
        assert_eq!(transfer_idempotency_key(&id, 1), "splitpay:alloc:salc_01abc:transfer:1");
        assert_ne!(transfer_idempotency_key(&id, 1), transfer_idempotency_key(&id, 2));
        let long = SplitAllocationId::generate();
        assert!(
            transfer_idempotency_key(&long, i32::MAX).len() <= 255,
            "Stripe keys are at most 255 chars"
        );
    }

    #[test]
    fn attempt_keys_keep_the_first_key_and_differ_after() {
        let id = SplitAllocationId::parse("salc_01abc").unwrap();
        let base = reversal_idempotency_key(&id, 1, 1);
        assert_eq!(attempt_key(&base, 1), base);
        assert_eq!(attempt_key(&base, 2), format!("{base}:k2"));
        assert_ne!(attempt_key(&base, 2), attempt_key(&base, 3));
        let long = SplitAllocationId::generate();
        assert!(attempt_key(&reversal_idempotency_key(&long, i32::MAX, i32::MAX), i32::MAX).len() <= 255);
        assert!(attempt_key(&refund_idempotency_key(&long, i64::MAX), i32::MAX).len() <= 255);
    }

    #[test]
    fn wrong_prefix_or_junk_is_refused() {
        assert!(SplitPaymentId::parse("salc_01abc").is_err());
        assert!(SplitPaymentId::parse("spay_").is_err());
        assert!(SplitPaymentId::parse("spay").is_err());
        assert!(SplitPaymentId::parse("spay_a b").is_err());
        assert!(check_external_id("link id", "").is_err());
        assert!(check_external_id("link id", &"x".repeat(ID_LEN_MAX + 1)).is_err());
        assert!(check_external_id("link id", "cm3lnk00001abc123xyz456").is_ok());
    }
}
