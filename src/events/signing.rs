//! Standard Webhooks signing (<https://www.standardwebhooks.com/>, v1): `webhook-signature` carries one
//! `v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">` per active secret, space-separated. The
//! key is the base64-decoded part of the secret after `whsec_`. Secrets are never logged; [`generate_secret`] is the
//! only place one is made.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

pub const SECRET_PREFIX: &str = "whsec_";
/// Random bytes in a new secret (the spec asks for 24 to 64).
pub const SECRET_BYTES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a webhook secret must be 'whsec_' followed by base64")]
pub struct BadSecret;

/// A fresh endpoint secret: `whsec_` + base64 of 32 random bytes.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    format!("{SECRET_PREFIX}{}", STANDARD.encode(bytes))
}

fn key(secret: &str) -> Result<Vec<u8>, BadSecret> {
    let encoded = secret.strip_prefix(SECRET_PREFIX).ok_or(BadSecret)?;
    STANDARD.decode(encoded).map_err(|_| BadSecret)
}

/// One `v1,<base64>` signature of `body` under `secret`.
pub fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &[u8]) -> Result<String, BadSecret> {
    let mut mac = Hmac::<Sha256>::new_from_slice(&key(secret)?).expect("HMAC takes any key length");
    mac.update(format!("{msg_id}.{timestamp}.").as_bytes());
    mac.update(body);
    Ok(format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes())))
}

/// The `webhook-signature` header value: one signature per secret, space-separated.
pub fn signature_header(secrets: &[&str], msg_id: &str, timestamp: i64, body: &[u8]) -> Result<String, BadSecret> {
    let signatures = secrets
        .iter()
        .map(|s| sign(s, msg_id, timestamp, body))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(signatures.join(" "))
}

/// A receiver's check: does any `v1` entry of `header` match `secret`? (Constant-time comparison through the MAC.)
/// Timestamp tolerance is the receiver's business and not checked here.
pub fn verify(secret: &str, msg_id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
    let Ok(key) = key(secret) else {
        return false;
    };
    header.split(' ').any(|entry| {
        let Some(encoded) = entry.strip_prefix("v1,") else {
            return false;
        };
        let Ok(expected) = STANDARD.decode(encoded) else {
            return false;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
        mac.update(format!("{msg_id}.{timestamp}.").as_bytes());
        mac.update(body);
        mac.verify_slice(&expected).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks reference vector (libraries/rust, crate `standardwebhooks`).
    #[test]
    fn matches_the_standard_webhooks_test_vector() {
        let secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        let sig = sign(secret, "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", 1649367553, body).unwrap();
        assert_eq!(sig, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
        assert!(verify(
            secret,
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            body,
            &sig
        ));
        assert!(!verify(
            secret,
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367554,
            body,
            &sig
        ));
    }

    #[test]
    fn secrets_are_fresh_and_every_secret_signs() {
        let (a, b) = (generate_secret(), generate_secret());
        assert_ne!(a, b);
        assert!(a.starts_with("whsec_") && key(&a).unwrap().len() == SECRET_BYTES);
        let header = signature_header(&[&a, &b], "oevt_1", 1, b"{}").unwrap();
        assert_eq!(header.split(' ').count(), 2);
        assert!(verify(&a, "oevt_1", 1, b"{}", &header) && verify(&b, "oevt_1", 1, b"{}", &header));
        assert!(!verify(&generate_secret(), "oevt_1", 1, b"{}", &header));
        assert_eq!(sign("nope", "x", 1, b""), Err(BadSecret));
    }
}
