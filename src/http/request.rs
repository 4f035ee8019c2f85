//! What every service-token route does with a request before its own work, and with its answer after: the bearer
//! token (constant-time), a JSON-only body whose type errors name the field, and a JSON response carrying the
//! `request-id` header. Intake and the catalogue API share these.

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;
use super::HttpState;

/// Constant-time comparison of the bearer token with the configured one.
fn authorised(state: &HttpState, headers: &HeaderMap) -> bool {
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let expected = state.service_token.expose().as_bytes();
    given.is_some_and(|g| {
        let g = g.as_bytes();
        g.len() == expected.len() && g.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    })
}

/// The bearer token, or 401 `unauthorized`.
pub(super) fn require_token(state: &HttpState, headers: &HeaderMap, rid: &str) -> Result<(), ApiError> {
    if authorised(state, headers) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Missing or invalid bearer token",
            rid,
        ))
    }
}

/// JSON only, unknown fields refused (by the target type), a type error names its field.
pub(super) fn parse_json_body<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8], rid: &str) -> Result<T, ApiError> {
    let json_body = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json_body {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Content-Type must be application/json",
            rid,
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let err = ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.inner().to_string(), rid);
        if path == "." {
            err
        } else {
            err.with_param(path)
        }
    })
}

/// The JSON answer with its `request-id` header, or the error's envelope.
pub(super) fn respond(rid: &str, result: Result<(StatusCode, Value), ApiError>) -> Response {
    match result {
        Ok((status, body)) => {
            let mut response = (status, axum::Json(body)).into_response();
            if let Ok(v) = rid.parse() {
                response.headers_mut().insert("request-id", v);
            }
            response
        }
        Err(e) => e.into_response(),
    }
}
