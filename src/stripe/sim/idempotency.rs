//! Idempotency as Stripe keeps it: per (API key, Idempotency-Key), the request's fingerprint and either "in
//! flight" (a second request gets 409 `idempotency_key_in_use`) or the saved status, body and headers of the first
//! response, replayed for the same parameters and refused (`idempotency_error`) for others, until the key expires.

use std::collections::HashMap;

use serde_json::Value;

#[derive(Debug, Clone)]
pub(super) enum Idem {
    InFlight {
        fingerprint: Vec<(String, String)>,
        created: i64,
    },
    Done {
        fingerprint: Vec<(String, String)>,
        created: i64,
        status: u16,
        body: Value,
        /// The headers of the first response (`Stripe-Should-Retry` where it was sent, `Request-Id`): a replay
        /// keeps them, as Stripe's does.
        headers: Vec<(&'static str, String)>,
    },
}

impl Idem {
    pub(super) fn created(&self) -> i64 {
        match self {
            Idem::InFlight { created, .. } | Idem::Done { created, .. } => *created,
        }
    }

    pub(super) fn fingerprint(&self) -> &[(String, String)] {
        match self {
            Idem::InFlight { fingerprint, .. } | Idem::Done { fingerprint, .. } => fingerprint,
        }
    }
}

pub(super) type IdempotencyTable = HashMap<String, Idem>;
