//! `POST /stripe/webhooks` (the platform's events, `STRIPE_WEBHOOK_SECRET`) and `POST /stripe/webhooks/connect` (the
//! Connect endpoint's events about connected accounts, such as `account.updated`, `STRIPE_CONNECT_WEBHOOK_SECRET`):
//! verify the signature with that endpoint's secrets, store the event in the one inbox (deduplicated by event id,
//! whichever endpoint it came through) and enqueue its processing in one transaction, answer 2xx at once. A bad signature writes nothing (400). A redelivered event id is acknowledged
//! and ignored. Processing happens in the worker ([`crate::jobs::stripe_event`]). Refusals are the API's error
//! envelope (Stripe only reads the status).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{TimeZone, Utc};
use serde_json::{json, Value};

use super::error::{code_for, request_id, ApiError, Body};
use super::HttpState;
use crate::config::Secret;
use crate::jobs::queue::{enqueue, Queue};
use crate::store::records::{insert_stripe_event, NewStripeEvent};
use crate::stripe::webhook::verify_signature;

fn reject(status: StatusCode, message: &str) -> Response {
    ApiError::new(status, code_for(status), message, &request_id()).into_response()
}

pub async fn receive(State(state): State<HttpState>, headers: HeaderMap, Body(body): Body) -> Response {
    let secrets = state.webhook_secrets.clone();
    ingest(&state, &headers, &body, &secrets, "platform").await
}

/// The Connect endpoint: the same inbox and processing, its own signing secrets.
pub async fn receive_connect(State(state): State<HttpState>, headers: HeaderMap, Body(body): Body) -> Response {
    let secrets = state.connect_webhook_secrets.clone();
    if secrets.is_empty() {
        tracing::warn!("refused a Connect webhook: STRIPE_CONNECT_WEBHOOK_SECRET is not set");
        metrics::counter!("splitpay_webhooks_refused_total").increment(1);
        return reject(
            StatusCode::BAD_REQUEST,
            "this endpoint has no signing secret configured (STRIPE_CONNECT_WEBHOOK_SECRET)",
        );
    }
    ingest(&state, &headers, &body, &secrets, "connect").await
}

async fn ingest(state: &HttpState, headers: &HeaderMap, body: &[u8], secrets: &[Secret], endpoint: &str) -> Response {
    let signature = headers.get("stripe-signature").and_then(|v| v.to_str().ok());
    if let Err(e) = verify_signature(body, signature, secrets, Utc::now().timestamp()) {
        tracing::warn!(error = %e, endpoint, "refused a webhook");
        metrics::counter!("splitpay_webhooks_refused_total").increment(1);
        return reject(StatusCode::BAD_REQUEST, &e.to_string());
    }
    // Genuine from here on: store it whatever it says, so nothing Stripe sent is lost.
    let Ok(payload) = serde_json::from_slice::<Value>(body) else {
        return reject(StatusCode::BAD_REQUEST, "the body is not JSON");
    };
    let Some(id) = payload["id"].as_str().filter(|id| id.starts_with("evt_")) else {
        return reject(StatusCode::BAD_REQUEST, "the event has no evt_ id");
    };
    let event = NewStripeEvent {
        id: id.to_owned(),
        event_type: payload["type"].as_str().unwrap_or_default().to_owned(),
        object_id: payload["data"]["object"]["id"].as_str().map(str::to_owned),
        livemode: payload["livemode"].as_bool().unwrap_or(false),
        stripe_created: payload["created"]
            .as_i64()
            .and_then(|t| Utc.timestamp_opt(t, 0).single()),
        payload: payload.clone(),
    };
    match store(state, &event).await {
        Ok(true) => (StatusCode::OK, axum::Json(json!({ "received": true }))).into_response(),
        Ok(false) => (
            StatusCode::OK,
            axum::Json(json!({ "received": true, "duplicate": true })),
        )
            .into_response(),
        Err(e) => {
            // 5xx: Stripe delivers it again later.
            tracing::error!(event_id = %event.id, error = %e, "could not store a webhook");
            reject(StatusCode::SERVICE_UNAVAILABLE, "try again")
        }
    }
}

/// Inbox row and processing job, together. Returns false for a redelivery.
async fn store(state: &HttpState, event: &NewStripeEvent) -> Result<bool, crate::store::StoreError> {
    let mut tx = state.app.pool.begin().await?;
    if !insert_stripe_event(&mut tx, event).await? {
        return Ok(false);
    }
    enqueue(&mut tx, Queue::StripeEvent, &event.id, None).await?;
    tx.commit().await?;
    Ok(true)
}
