//! Stripe failures, grouped by what the caller does next:
//! - **retryable**: try again later with the *same* idempotency key (throttled, key in use, lock timeout, platform
//!   balance short, or the connection was refused so the request never left);
//! - **terminal**: Stripe refused and will refuse again; keep its code and message (park, or fail the payment);
//! - **unknown**: the request may have been applied (timeout, connection lost after sending, 5xx, a 2xx body we
//!   could not read). Retry with the same key, or look the object up: never send a new key;
//! - **config**: our side is wrong (bad or refused key, malformed idempotency key). Alert a human.
//!
//! [`classify`] is the one place these rules live.

/// What a caller does about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Retryable,
    Terminal,
    Unknown,
    Config,
}

/// Stripe error codes that mean "try again later" even on a 4xx.
const RETRYABLE_CODES: [&str; 4] = [
    "rate_limit",
    "lock_timeout",
    "idempotency_key_in_use",
    "balance_insufficient",
];

/// Classifies an HTTP failure from Stripe. `should_retry` is the `Stripe-Should-Retry` header, which Stripe sends
/// only on some responses (a key in use, a lock timeout); it decides a 4xx when present, with two exceptions:
/// - a 5xx stays *unknown* (Stripe may have applied the request and saved the 500 for the key; "do not retry" then
///   means "look it up", not "it failed");
/// - a 429 (throttled, lock timeout) or 409 (key in use) is always retryable: throttling must never park a transfer.
///
/// Without the header — most answers — the status and the code decide.
pub fn classify(status: u16, should_retry: Option<bool>, code: Option<&str>) -> ErrorClass {
    if status >= 500 {
        return ErrorClass::Unknown;
    }
    if matches!(status, 401 | 403) {
        return ErrorClass::Config;
    }
    if matches!(status, 409 | 429) {
        return ErrorClass::Retryable;
    }
    match should_retry {
        Some(true) => return ErrorClass::Retryable,
        Some(false) => return ErrorClass::Terminal,
        None => {}
    }
    if code.is_some_and(|c| RETRYABLE_CODES.contains(&c)) {
        return ErrorClass::Retryable;
    }
    ErrorClass::Terminal
}

/// Stripe's `error.type` for a key reused with other parameters (Stripe sends no `code` with it).
pub const IDEMPOTENCY_ERROR_TYPE: &str = "idempotency_error";

/// Stripe's `error.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripeErrorType {
    InvalidRequest,
    Card,
    /// The idempotency key was reused with other parameters.
    Idempotency,
    Api,
    /// A type this version of splitpay does not know.
    Other,
}

impl StripeErrorType {
    pub fn parse(raw: &str) -> Self {
        match raw {
            "invalid_request_error" => StripeErrorType::InvalidRequest,
            "card_error" => StripeErrorType::Card,
            IDEMPOTENCY_ERROR_TYPE => StripeErrorType::Idempotency,
            "api_error" => StripeErrorType::Api,
            _ => StripeErrorType::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StripeErrorType::InvalidRequest => "invalid_request_error",
            StripeErrorType::Card => "card_error",
            StripeErrorType::Idempotency => IDEMPOTENCY_ERROR_TYPE,
            StripeErrorType::Api => "api_error",
            StripeErrorType::Other => "other",
        }
    }
}

/// What Stripe said about one failed request, as its error envelope and headers carry it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StripeErrorBody {
    /// `error.type`: `invalid_request_error`, `card_error`, `idempotency_error`, `api_error`.
    pub error_type: Option<String>,
    pub code: Option<String>,
    pub decline_code: Option<String>,
    pub message: Option<String>,
    pub param: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("Stripe asked us to retry later ({}): {message}", code.as_deref().unwrap_or("no code"))]
    Retryable {
        status: Option<u16>,
        code: Option<String>,
        message: String,
    },
    #[error("Stripe refused ({status} {}): {message}", code.as_deref().unwrap_or("no code"))]
    Terminal {
        status: u16,
        code: Option<String>,
        decline_code: Option<String>,
        message: String,
        param: Option<String>,
        /// Stripe's `error.type` (`invalid_request_error`, `card_error`, `idempotency_error`, …).
        error_type: Option<StripeErrorType>,
        /// A declined confirmation names the PaymentIntent it left behind.
        payment_intent: Option<String>,
    },
    #[error("outcome unknown: {reason}")]
    Unknown { reason: String },
    #[error("Stripe configuration error: {0}")]
    Config(String),
}

impl GatewayError {
    pub fn class(&self) -> ErrorClass {
        match self {
            GatewayError::Retryable { .. } => ErrorClass::Retryable,
            GatewayError::Terminal { .. } => ErrorClass::Terminal,
            GatewayError::Unknown { .. } => ErrorClass::Unknown,
            GatewayError::Config(_) => ErrorClass::Config,
        }
    }

    /// Stripe's error code, when Stripe answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            GatewayError::Retryable { code, .. } | GatewayError::Terminal { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// Stripe's `error.type`, when Stripe refused with one.
    pub fn error_type(&self) -> Option<&'static str> {
        match self {
            GatewayError::Terminal { error_type, .. } => error_type.map(StripeErrorType::as_str),
            _ => None,
        }
    }

    /// The same key was sent with other parameters (Stripe's `error.type` is `idempotency_error`): keys are derived
    /// from immutable rows, so this is a bug.
    pub fn is_idempotency_misuse(&self) -> bool {
        self.error_type() == Some(IDEMPOTENCY_ERROR_TYPE)
    }

    /// Stripe answered with a coded 4xx refusal that it saves under the idempotency key (e.g. `balance_insufficient`,
    /// `amount_too_large`): the request was not applied, and the same key is answered with the same refusal until
    /// it expires. Only then may a refund or reversal move to its next key attempt. Not one: a 409 (the key's other
    /// request may still succeed), a 429 (not saved), 401/403, a misused key, an answer without a code, and every
    /// unknown outcome.
    pub fn is_saved_refusal(&self) -> bool {
        let (status, code) = match self {
            GatewayError::Retryable {
                status: Some(status),
                code,
                ..
            } => (*status, code),
            GatewayError::Terminal { status, code, .. } if !self.is_idempotency_misuse() => (*status, code),
            _ => return false,
        };
        (400..500).contains(&status)
            && !matches!(status, 401 | 403 | 409 | 429)
            && code.as_deref().is_some_and(|c| !c.is_empty())
    }

    /// Builds the error for a Stripe error response.
    pub fn from_response(status: u16, should_retry: Option<bool>, body: StripeErrorBody) -> Self {
        let StripeErrorBody {
            error_type,
            code,
            decline_code,
            message,
            param,
        } = body;
        let message = message.unwrap_or_else(|| format!("HTTP {status}"));
        match classify(status, should_retry, code.as_deref()) {
            ErrorClass::Retryable => GatewayError::Retryable {
                status: Some(status),
                code,
                message,
            },
            ErrorClass::Terminal => GatewayError::Terminal {
                status,
                code,
                decline_code,
                message,
                param,
                error_type: error_type.as_deref().map(StripeErrorType::parse),
                payment_intent: None,
            },
            ErrorClass::Unknown => GatewayError::Unknown {
                reason: format!("HTTP {status} {}: {message}", code.as_deref().unwrap_or("")),
            },
            ErrorClass::Config => GatewayError::Config(format!("HTTP {status}: {message}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ErrorClass::*;

    #[test]
    fn classification_table() {
        let table: [(u16, Option<bool>, Option<&str>, ErrorClass); 26] = [
            (429, None, Some("rate_limit"), Retryable),
            (429, None, Some("lock_timeout"), Retryable),
            (409, None, Some("idempotency_key_in_use"), Retryable),
            (400, None, Some("balance_insufficient"), Retryable),
            (400, None, Some("lock_timeout"), Retryable),
            (400, None, Some("account_invalid"), Terminal),
            (400, None, Some("insufficient_capabilities_for_transfer"), Terminal),
            (400, None, Some("transfers_not_allowed"), Terminal),
            (400, None, Some("amount_too_small"), Terminal),
            (404, None, Some("resource_missing"), Terminal),
            (402, None, Some("card_declined"), Terminal),
            (400, None, None, Terminal),
            (400, None, Some("parameter_missing"), Terminal),
            (400, None, Some("parameter_unknown"), Terminal),
            (400, None, Some("payment_intent_unexpected_state"), Terminal),
            (409, None, None, Retryable),
            (429, None, None, Retryable),
            (500, None, None, Unknown),
            (503, Some(true), None, Unknown),
            (500, Some(false), Some("api_error"), Unknown),
            (401, None, None, Config),
            // The header decides on an ordinary 4xx…
            (400, Some(true), Some("account_invalid"), Retryable),
            (400, Some(false), Some("balance_insufficient"), Terminal),
            // …but throttling and a key in use retry whatever it says.
            (429, Some(false), Some("rate_limit"), Retryable),
            (429, Some(false), Some("lock_timeout"), Retryable),
            (409, Some(false), Some("idempotency_key_in_use"), Retryable),
        ];
        for (status, header, code, want) in table {
            assert_eq!(classify(status, header, code), want, "{status} {header:?} {code:?}");
        }
    }

    #[test]
    fn only_coded_4xx_refusals_are_saved_refusals() {
        let answer = |status: u16, code: Option<&str>, error_type: Option<&str>| {
            GatewayError::from_response(
                status,
                None,
                StripeErrorBody {
                    error_type: error_type.map(str::to_owned),
                    code: code.map(str::to_owned),
                    ..Default::default()
                },
            )
        };
        assert!(answer(400, Some("balance_insufficient"), None).is_saved_refusal());
        assert!(answer(400, Some("amount_too_large"), None).is_saved_refusal());
        assert!(answer(404, Some("resource_missing"), None).is_saved_refusal());
        assert!(!answer(409, Some("idempotency_key_in_use"), None).is_saved_refusal());
        assert!(!answer(429, Some("rate_limit"), None).is_saved_refusal());
        assert!(!answer(401, Some("api_key_expired"), None).is_saved_refusal());
        assert!(!answer(400, None, None).is_saved_refusal());
        assert!(!answer(400, None, Some(IDEMPOTENCY_ERROR_TYPE)).is_saved_refusal());
        assert!(!answer(500, Some("api_error"), None).is_saved_refusal());
        let unsent = GatewayError::Retryable {
            status: None,
            code: None,
            message: "connection refused".into(),
        };
        assert!(!unsent.is_saved_refusal());
        assert!(!GatewayError::Unknown {
            reason: "timeout".into()
        }
        .is_saved_refusal());
    }

    #[test]
    fn terminal_errors_keep_stripe_code_and_message() {
        let e = GatewayError::from_response(
            400,
            None,
            StripeErrorBody {
                error_type: Some("invalid_request_error".into()),
                code: Some("account_invalid".into()),
                message: Some("No such destination: 'acct_x'".into()),
                param: Some("destination".into()),
                ..Default::default()
            },
        );
        assert_eq!(e.class(), Terminal);
        assert_eq!(e.code(), Some("account_invalid"));
        assert_eq!(e.error_type(), Some("invalid_request_error"));
        assert!(!e.is_idempotency_misuse());
        assert!(e.to_string().contains("No such destination"));
    }

    #[test]
    fn a_misused_key_is_recognised_by_the_error_type_stripe_sends() {
        // Stripe's envelope: `type: idempotency_error`, no code, no Stripe-Should-Retry header.
        let misuse = GatewayError::from_response(
            400,
            None,
            StripeErrorBody {
                error_type: Some(IDEMPOTENCY_ERROR_TYPE.into()),
                message: Some("Keys for idempotent requests can only be used with the same parameters".into()),
                ..Default::default()
            },
        );
        assert_eq!((misuse.class(), misuse.code()), (Terminal, None));
        assert!(misuse.is_idempotency_misuse());
        // A code of that name is not what Stripe sends, and does not make a misuse.
        let by_code = GatewayError::from_response(
            400,
            None,
            StripeErrorBody {
                error_type: Some("invalid_request_error".into()),
                code: Some("idempotency_error".into()),
                ..Default::default()
            },
        );
        assert!(!by_code.is_idempotency_misuse());
    }
}
