//! The seed's `ErrorEnvelope`: `{ "error": { type, code, message, param?, request_id, doc_url } }`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

const ERROR_DOCS: &str = "https://alltogether.giving/developer/api/errors/";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// One of the seed's codes: invalid_request, validation_failed, unauthorized, not_found, conflict,
    /// idempotency_conflict, internal_error, …
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub request_id: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>, request_id: &str) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            param: None,
            request_id: request_id.to_owned(),
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({
            "type": format!("{ERROR_DOCS}{}", self.code),
            "code": self.code,
            "message": self.message,
            "request_id": self.request_id,
            "doc_url": format!("{ERROR_DOCS}{}", self.code),
        });
        if let Some(param) = self.param {
            error["param"] = json!(param);
        }
        let mut response = (self.status, axum::Json(json!({ "error": error }))).into_response();
        if let Ok(value) = self.request_id.parse() {
            response.headers_mut().insert("request-id", value);
        }
        response
    }
}
