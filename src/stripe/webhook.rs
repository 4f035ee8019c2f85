//! `Stripe-Signature` verification: `t=<unix>,v1=<hex>[,v1=<hex>…]`, HMAC-SHA256 of `"{t}.{raw body}"` with the
//! endpoint secret, compared in constant time, any `v1` matching any of our secrets (several while a secret rolls),
//! other schemes ignored, and the timestamp within [`TOLERANCE_SECS`] of now.
//!
//! Gap filled here: async-stripe-webhook verifies only as part of parsing into its typed `Event`, and refuses a
//! correctly signed event whose object it cannot parse (async-stripe issue #761). splitpay must store every genuine
//! event in its inbox first and parse later, so verification stands alone here; the tests check it against
//! async-stripe's own signer.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::Secret;

/// Stripe's default tolerance between the signature's timestamp and now.
pub const TOLERANCE_SECS: i64 = 300;

/// Bounds the work an attacker can ask for with one header.
const SIGNATURES_MAX: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing Stripe-Signature header")]
    Missing,
    #[error("malformed Stripe-Signature header")]
    Malformed,
    #[error("no v1 signature matches")]
    Mismatch,
    #[error("signature timestamp {timestamp} is more than {TOLERANCE_SECS} s from now")]
    Stale { timestamp: i64 },
}

struct Header {
    timestamp: i64,
    v1: Vec<Vec<u8>>,
}

fn parse_header(header: &str) -> Result<Header, SignatureError> {
    let mut timestamp = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        let (name, value) = part.trim().split_once('=').ok_or(SignatureError::Malformed)?;
        match name {
            "t" if timestamp.is_some() => return Err(SignatureError::Malformed),
            "t" => timestamp = Some(value.parse::<i64>().map_err(|_| SignatureError::Malformed)?),
            "v1" if v1.len() < SIGNATURES_MAX => {
                // A v1 that is not hex cannot match; skip it rather than refuse the others.
                if let Ok(bytes) = hex::decode(value) {
                    v1.push(bytes);
                }
            }
            _ => {} // v0 and future schemes
        }
    }
    match timestamp {
        Some(timestamp) if !v1.is_empty() => Ok(Header { timestamp, v1 }),
        _ => Err(SignatureError::Malformed),
    }
}

/// Checks a webhook's signature against each secret. `now_unix` is passed in so tests can pin time.
pub fn verify_signature(
    payload: &[u8],
    header: Option<&str>,
    secrets: &[Secret],
    now_unix: i64,
) -> Result<(), SignatureError> {
    let header = parse_header(header.ok_or(SignatureError::Missing)?)?;
    let matched = secrets.iter().any(|secret| {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()) else {
            return false;
        };
        mac.update(header.timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(payload);
        header
            .v1
            .iter()
            .any(|candidate| mac.clone().verify_slice(candidate).is_ok())
    });
    if !matched {
        return Err(SignatureError::Mismatch);
    }
    // Checked after the signature, so a stale error is only ever reported for a genuine (replayed) request.
    if (now_unix - header.timestamp).abs() > TOLERANCE_SECS {
        return Err(SignatureError::Stale {
            timestamp: header.timestamp,
        });
    }
    Ok(())
}

/// The `Stripe-Signature` header for `payload` at `timestamp` (the simulator signs its webhooks with it).
pub fn sign(payload: &[u8], secret: &Secret, timestamp: i64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    format!("t={timestamp},v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use stripe_webhook::Webhook;

    const NOW: i64 = 1_790_000_000;
    const BODY: &str = r#"{"id":"evt_1","object":"event","type":"payment_intent.succeeded"}"#;

    fn secret() -> Secret {
        Secret::new("whsec_test_current")
    }

    #[test]
    fn accepts_what_async_stripe_signs() {
        let header = Webhook::generate_test_header(BODY, secret().expose(), Some(NOW));
        assert_eq!(
            verify_signature(BODY.as_bytes(), Some(&header), &[secret()], NOW),
            Ok(())
        );
        assert_eq!(
            sign(BODY.as_bytes(), &secret(), NOW),
            header,
            "our signer matches async-stripe's"
        );
    }

    #[test]
    fn wrong_secret_tampered_body_missing_or_bad_header_are_refused() {
        let header = sign(BODY.as_bytes(), &secret(), NOW);
        let other = Secret::new("whsec_other");
        assert_eq!(
            verify_signature(BODY.as_bytes(), Some(&header), &[other], NOW),
            Err(SignatureError::Mismatch)
        );
        let tampered = BODY.replace("succeeded", "payment_failed");
        assert_eq!(
            verify_signature(tampered.as_bytes(), Some(&header), &[secret()], NOW),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(BODY.as_bytes(), None, &[secret()], NOW),
            Err(SignatureError::Missing)
        );
        for bad in ["", "t=abc,v1=00", "v1=00", "t=1", "t=1,t=2,v1=00", "garbage"] {
            assert_eq!(
                verify_signature(BODY.as_bytes(), Some(bad), &[secret()], NOW),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn stale_timestamps_are_refused_within_tolerance_accepted() {
        let at = NOW - TOLERANCE_SECS;
        let header = sign(BODY.as_bytes(), &secret(), at);
        assert_eq!(
            verify_signature(BODY.as_bytes(), Some(&header), &[secret()], NOW),
            Ok(())
        );
        let stale = sign(BODY.as_bytes(), &secret(), at - 1);
        assert_eq!(
            verify_signature(BODY.as_bytes(), Some(&stale), &[secret()], NOW),
            Err(SignatureError::Stale { timestamp: at - 1 })
        );
    }

    #[test]
    fn several_signatures_and_rolling_secrets() {
        let old = Secret::new("whsec_test_old");
        let good = sign(BODY.as_bytes(), &secret(), NOW);
        let v1_good = good.split_once("v1=").unwrap().1;
        // Stripe sends one v1 per active secret while a secret rolls; any match is enough, v0 is ignored.
        let header = format!("t={NOW},v0=deadbeef,v1={},v1={v1_good}", "ab".repeat(32));
        assert_eq!(
            verify_signature(BODY.as_bytes(), Some(&header), &[secret()], NOW),
            Ok(())
        );
        assert_eq!(
            verify_signature(BODY.as_bytes(), Some(&good), &[old.clone(), secret()], NOW),
            Ok(())
        );
        assert_eq!(
            verify_signature(BODY.as_bytes(), Some(&good), &[old], NOW),
            Err(SignatureError::Mismatch)
        );
    }
}
