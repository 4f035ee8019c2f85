//! `POST /stripe/webhooks` (the platform's events, `STRIPE_WEBHOOK_SECRET`) and `POST /stripe/webhooks/connect` (the
//! Connect endpoint's events about connected accounts, such as `account.updated`, `STRIPE_CONNECT_WEBHOOK_SECRET`):
//! verify the signature with that endpoint's secrets, store the event in the one inbox (deduplicated by event id,
//! whichever endpoint it came through) and enqueue its processing in one transaction (an event splitpay does not
//! act on is stored already processed, with no job), answer 2xx at once. A bad signature writes nothing (400). A
//! redelivered event id is acknowledged
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
use crate::store::records::{insert_processed_stripe_event, insert_stripe_event, NewStripeEvent};
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
    match ingest_event(&state.app.pool, payload).await {
        Ok(Ingested::Stored) => (StatusCode::OK, axum::Json(json!({ "received": true }))).into_response(),
        Ok(Ingested::Duplicate) => (
            StatusCode::OK,
            axum::Json(json!({ "received": true, "duplicate": true })),
        )
            .into_response(),
        Err(IngestError::NoEventId) => reject(StatusCode::BAD_REQUEST, "the event has no evt_ id"),
        Err(IngestError::Store { event_id, error }) => {
            // 5xx: Stripe delivers it again later.
            tracing::error!(%event_id, %error, "could not store a webhook");
            reject(StatusCode::SERVICE_UNAVAILABLE, "try again")
        }
    }
}

/// What [`ingest_event`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// New: in the inbox, its processing job queued.
    Stored,
    /// Its id was already in the inbox: nothing written.
    Duplicate,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the event has no evt_ id")]
    NoEventId,
    #[error("could not store event {event_id}: {error}")]
    Store {
        event_id: String,
        error: crate::store::StoreError,
    },
}

/// The ingress behind both webhook routes, for an event already known to be Stripe's (its signature verified, or
/// read from Stripe's own `GET /v1/events` over an authenticated connection, as the end-to-end suite's polling
/// mode does): the inbox row, deduplicated by event id, and its processing job, in one transaction.
pub async fn ingest_event(pool: &sqlx::PgPool, payload: Value) -> Result<Ingested, IngestError> {
    let Some(id) = payload["id"].as_str().filter(|id| id.starts_with("evt_")) else {
        return Err(IngestError::NoEventId);
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
    match store(pool, &event).await {
        Ok(true) => Ok(Ingested::Stored),
        Ok(false) => Ok(Ingested::Duplicate),
        Err(error) => Err(IngestError::Store {
            event_id: event.id,
            error,
        }),
    }
}

/// Inbox row and processing job, together. Returns false for a redelivery. An event splitpay does not act on
/// (`charge.succeeded`, `transfer.created`, …) is stored already processed, with no job: one statement.
async fn store(pool: &sqlx::PgPool, event: &NewStripeEvent) -> Result<bool, crate::store::StoreError> {
    if !crate::jobs::stripe_event::needs_processing(&event.event_type) {
        return insert_processed_stripe_event(&mut *pool.acquire().await?, event).await;
    }
    let mut tx = pool.begin().await?;
    if !insert_stripe_event(&mut tx, event).await? {
        return Ok(false);
    }
    enqueue(&mut tx, Queue::StripeEvent, &event.id, None).await?;
    tx.commit().await?;
    Ok(true)
}
