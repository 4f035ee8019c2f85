//! `POST /v1/split-payments` and `GET /v1/split-payments/{id}` (bearer service token).
//!
//! `Idempotency-Key`: the same key and body get the same response; another body gets 409 `idempotency_conflict`;
//! a retry after Stripe was unreachable resumes the payment the first attempt wrote, within
//! [`intake::RESUME_WINDOW_HOURS`] of its creation; later it gets 409 `conflict` (the contract has no code of its own
//! for it; `param` is `Idempotency-Key` and the message says what to do).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::error::{request_id, ApiError, ApiPath, Body};
use super::request::{parse_json_body, require_token, respond};
use super::HttpState;
use crate::domain::ids::SplitPaymentId;
use crate::events::seed_timestamp;
use crate::intake::{self, IntakeError, IntakeRequest, IntentOutcome};
use crate::store::payments::{get_split_payment, SplitPayment};
use crate::store::StoreError;

pub(super) fn render(p: &SplitPayment, outcome: Option<&IntentOutcome>) -> Value {
    let intent = outcome.and_then(|o| o.intent.as_ref());
    let failure = outcome.and_then(|o| o.failure.as_ref());
    json!({
        "id": p.payment.id,
        "object": "split_payment",
        "status": p.payment.status,
        "recommendation_set_id": p.payment.recommendation_set_id,
        "organisation_id": p.payment.organisation_id,
        "donor_id": p.payment.donor_id,
        "payment_method_type": p.payment.payment_method_type,
        "currency": p.payment.currency.iso_code(),
        "total_amount_cents": p.payment.total_amount_cents,
        "donor_covers_fees": p.payment.donor_covers_fees,
        "processing_fee_cents": p.payment.processing_fee_cents,
        "platform_fee_cents": p.payment.platform_fee_cents,
        "payment_intent_id": p.payment.payment_intent_id,
        "payment_intent_status": intent.map(|i| format!("{:?}", i.status)).map(snake),
        "client_secret": intent.and_then(|i| i.client_secret.clone()),
        "failure_code": failure.map(|f| f.0.clone()).or_else(|| p.payment.failure_code.clone()),
        "decline_code": failure.and_then(|f| f.1.clone()),
        "failure_message": failure.map(|f| f.2.clone()).or_else(|| p.payment.failure_message.clone()),
        "created_at": seed_timestamp(p.payment.created_at),
        "allocations": p.allocations.iter().map(|a| json!({
            "id": a.id,
            "allocation_id": a.recommendation_allocation_id,
            "recipient_org_account_link_id": a.recipient_org_account_link_id,
            "amount_cents": a.gross_amount_cents,
            "fee_share_cents": a.fee_share_cents,
            "net_amount_cents": a.net_amount_cents,
            "status": a.status,
            "stripe_transfer_id": a.stripe_transfer_id,
            "failure_code": a.failure_code,
            "failure_message": a.failure_message,
        })).collect::<Vec<_>>(),
    })
}

/// `RequiresPaymentMethod` → `requires_payment_method` (Stripe's spelling).
fn snake(name: String) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

fn intake_error(e: IntakeError, rid: &str) -> ApiError {
    match e {
        IntakeError::Invalid { param, message } => {
            ApiError::new(StatusCode::BAD_REQUEST, "validation_failed", message, rid).with_param(param)
        }
        IntakeError::Unprocessable { param, message } => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", message, rid).with_param(param)
        }
        IntakeError::ResumeExpired { .. } => {
            ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string(), rid).with_param("Idempotency-Key")
        }
        IntakeError::NotFound { param, message } => {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", message, rid).with_param(param)
        }
        IntakeError::InProgress => ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string(), rid),
        IntakeError::StripeUnavailable(reason) => {
            tracing::warn!(request_id = rid, %reason, "Stripe unavailable during intake");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "internal_error",
                format!(
                    "The payment provider is unavailable; retry with the same Idempotency-Key within {} hours",
                    intake::RESUME_WINDOW_HOURS
                ),
                rid,
            )
        }
        IntakeError::Store(err) => {
            tracing::error!(request_id = rid, error = %err, "intake failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "Internal error",
                rid,
            )
        }
    }
}

pub async fn create(State(state): State<HttpState>, headers: HeaderMap, Body(body): Body) -> Response {
    let rid = request_id();
    respond(&rid, create_inner(&state, &headers, &body, &rid).await)
}

async fn create_inner(
    state: &HttpState,
    headers: &HeaderMap,
    body: &[u8],
    rid: &str,
) -> Result<(StatusCode, Value), ApiError> {
    require_token(state, headers, rid)?;
    let req: IntakeRequest = parse_json_body(headers, body, rid)?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str().ok().filter(|k| !k.is_empty() && k.len() <= 255) {
            Some(k) => Some(k.to_owned()),
            None => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Idempotency-Key must be 1 to 255 characters",
                    rid,
                )
                .with_param("Idempotency-Key"))
            }
        },
    };
    let hash = hex::encode(Sha256::digest(body));

    let existing = match &key {
        Some(k) => lookup(state, k).await.map_err(|e| intake_error(e.into(), rid))?,
        None => None,
    };
    let (payment, outcome) = match existing {
        Some((stored_hash, _, _)) if stored_hash != hash => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_conflict",
                "This Idempotency-Key was used with a different request body",
                rid,
            ))
        }
        Some((_, _, Some((status, body)))) => {
            return Ok((StatusCode::from_u16(status as u16).unwrap_or(StatusCode::OK), body));
        }
        // Written before, but Stripe was not reached: resume that payment (if it is not too old).
        Some((_, id, None)) => {
            let id =
                SplitPaymentId::parse(&id).map_err(|e| intake_error(StoreError::Invalid(e.to_string()).into(), rid))?;
            intake::resume(&state.app, &id)
                .await
                .map_err(|e| intake_error(e, rid))?
        }
        None => {
            let payment = intake::create(&state.app, &req, key.as_deref().map(|k| (k, hash.as_str())))
                .await
                .map_err(|e| intake_error(e, rid))?;
            let id = SplitPaymentId::parse(&payment.payment.id)
                .map_err(|e| intake_error(StoreError::Invalid(e.to_string()).into(), rid))?;
            intake::create_intent(&state.app, &id)
                .await
                .map_err(|e| intake_error(e, rid))?
        }
    };
    let body = render(&payment, Some(&outcome));
    if let Some(k) = &key {
        sqlx::query("UPDATE intake_requests SET response_status = 201, response_body = $2 WHERE idempotency_key = $1")
            .bind(k)
            .bind(&body)
            .execute(&state.app.pool)
            .await
            .map_err(|e| intake_error(StoreError::from(e).into(), rid))?;
    }
    Ok((StatusCode::CREATED, body))
}

type StoredRequest = (String, String, Option<(i32, Value)>);

async fn lookup(state: &HttpState, key: &str) -> Result<Option<StoredRequest>, StoreError> {
    let row: Option<(String, String, Option<i32>, Option<Value>)> = sqlx::query_as(
        "SELECT request_sha256, split_payment_id, response_status, response_body FROM intake_requests WHERE idempotency_key = $1",
    )
    .bind(key)
    .fetch_optional(&state.app.pool)
    .await?;
    Ok(row.map(|(hash, id, status, body)| (hash, id, status.zip(body))))
}

pub async fn show(State(state): State<HttpState>, headers: HeaderMap, ApiPath(raw): ApiPath<String>) -> Response {
    let rid = request_id();
    if let Err(e) = require_token(&state, &headers, &rid) {
        return e.into_response();
    }
    let not_found =
        || ApiError::new(StatusCode::NOT_FOUND, "not_found", "Split payment not found", &rid).with_param("id");
    let Ok(id) = SplitPaymentId::parse(&raw) else {
        return not_found().into_response();
    };
    let mut conn = match state.app.pool.acquire().await {
        Ok(c) => c,
        Err(e) => return intake_error(StoreError::from(e).into(), &rid).into_response(),
    };
    match get_split_payment(&mut conn, &id).await {
        Ok(p) => axum::Json(render(&p, None)).into_response(),
        Err(StoreError::NotFound { .. }) => not_found().into_response(),
        Err(e) => intake_error(e.into(), &rid).into_response(),
    }
}
