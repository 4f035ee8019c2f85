//! Stripe's error envelope as the simulator sends it: type, code, message, param, and whether the response is
//! saved for the idempotency key.

use serde_json::{json, Value};

use super::super::form::ParamError;

/// A Stripe error response.
#[derive(Debug, Clone, PartialEq)]
pub struct SimError {
    pub status: u16,
    pub kind: &'static str,
    pub code: Option<String>,
    pub message: String,
    pub param: Option<String>,
    pub decline_code: Option<String>,
    /// `Stripe-Should-Retry`: Stripe sends it only on some answers (a key in use, a lock timeout), never on an
    /// ordinary 400/402/404.
    pub should_retry: Option<bool>,
    /// Whether Stripe saves this response for the idempotency key (it does once the endpoint began executing;
    /// not for parameter validation).
    pub saved: bool,
    pub payment_intent: Option<Value>,
}

impl SimError {
    /// A 400 `invalid_request_error` naming `param`, with no code (Stripe gives none to most invalid values).
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            kind: "invalid_request_error",
            code: None,
            message: message.into(),
            param: Some(param.to_owned()),
            decline_code: None,
            should_retry: None,
            saved: false,
            payment_intent: None,
        }
    }

    pub fn missing(what: &str, id: &str, param: Option<&str>) -> Self {
        Self {
            status: 404,
            kind: "invalid_request_error",
            code: Some("resource_missing".into()),
            message: format!("No such {what}: '{id}'"),
            param: param.map(str::to_owned),
            decline_code: None,
            should_retry: None,
            saved: true,
            payment_intent: None,
        }
    }

    /// A refusal made while executing (saved for the idempotency key). An empty `code`: Stripe sends none.
    pub fn refused(status: u16, code: &str, message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status,
            kind: "invalid_request_error",
            code: (!code.is_empty()).then(|| code.to_owned()),
            message: message.into(),
            param: param.map(str::to_owned),
            decline_code: None,
            should_retry: None,
            saved: true,
            payment_intent: None,
        }
    }

    pub fn body(&self) -> Value {
        let mut error = json!({ "type": self.kind, "message": self.message });
        if let Some(code) = &self.code {
            error["code"] = json!(code);
            error["doc_url"] = json!(format!("https://stripe.com/docs/error-codes/{code}"));
        }
        if let Some(param) = &self.param {
            error["param"] = json!(param);
        }
        if let Some(decline) = &self.decline_code {
            error["decline_code"] = json!(decline);
        }
        if let Some(pi) = &self.payment_intent {
            error["payment_intent"] = pi.clone();
        }
        json!({ "error": error })
    }
}

impl From<ParamError> for SimError {
    fn from(e: ParamError) -> Self {
        SimError {
            code: e.code.map(str::to_owned),
            ..SimError::invalid(&e.param, e.message)
        }
    }
}
