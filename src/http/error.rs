//! The seed's `ErrorEnvelope`: `{ "error": { type, code, message, param?, request_id, doc_url } }`.
//!
//! Every error splitpay's API answers is one, including the ones axum would otherwise write as plain text: an
//! unknown route ([`not_found`]), a wrong method ([`method_not_allowed`]), a body over the limit or one that could
//! not be read ([`Body`]), a path parameter that does not decode ([`ApiPath`]), and, as a last net, any other
//! non-JSON error response a layer or extractor may produce ([`envelope_plain_errors`]).

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
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

/// A fresh request id, `req_…`, as every envelope carries.
pub fn request_id() -> String {
    format!("req_{}", uuid::Uuid::new_v4().simple())
}

/// The contract's code for an error status. The contract's `code` is a closed enum, so statuses it has no code for
/// take the nearest one rather than a new name a client generated from the contract could not decode: 413 (body
/// over the limit) and 415 are `invalid_request` — malformed input — and keep their own status.
pub fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::CONFLICT => "conflict",
        StatusCode::UNPROCESSABLE_ENTITY => "validation_failed",
        StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        s if s.is_server_error() => "internal_error",
        _ => "invalid_request",
    }
}

/// The router's fallback: a path no route has.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("No route for {}", uri.path()),
        &request_id(),
    )
}

/// A known path asked with a method it does not take (axum adds the `Allow` header).
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", method, uri.path()),
        &request_id(),
    )
}

/// The request body as bytes, refused in the envelope: 413 over [`super::BODY_BYTES_MAX`] (axum's
/// `DefaultBodyLimit`), 400 when it could not be read.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state).await.map(Body).map_err(|rejection| {
            let status = rejection.status();
            let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!("The request body is larger than {} bytes", super::BODY_BYTES_MAX)
            } else {
                rejection.body_text()
            };
            ApiError::new(status, code_for(status), message, &request_id())
        })
    }
}

/// axum's `Path`, refused in the envelope (400 `invalid_request`, e.g. a parameter that is not UTF-8 once
/// percent-decoded).
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(t)| ApiPath(t))
            .map_err(|rejection| {
                let status = rejection.status();
                ApiError::new(status, code_for(status), rejection.body_text(), &request_id())
            })
    }
}

/// The most of a plain-text error body kept as the envelope's message.
const PLAIN_MESSAGE_BYTES_MAX: usize = 1024;

/// The last net (a `map_response` layer on the whole router): an error response that is not JSON — one a layer or
/// an extractor of axum's wrote — is rewritten as the envelope with the same status and headers, its text as the
/// message. JSON responses (ours) pass untouched.
pub async fn envelope_plain_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, PLAIN_MESSAGE_BYTES_MAX)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("Error").to_owned()
    } else {
        text
    };
    let envelope = ApiError::new(status, code_for(status), message, &request_id()).into_response();
    let (envelope_parts, envelope_body) = envelope.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    for (name, value) in &envelope_parts.headers {
        parts.headers.insert(name, value.clone());
    }
    Response::from_parts(parts, envelope_body)
}
