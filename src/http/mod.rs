//! The HTTP side of splitpay (axum): Stripe's webhook ingress and health. Intake (`/v1/split-payments`) joins it
//! in the next piece of work.

pub mod webhooks;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use sqlx::PgPool;

use crate::config::Secret;

/// Stripe events are a few kilobytes; anything far larger is not Stripe.
pub const WEBHOOK_BODY_BYTES_MAX: usize = 1024 * 1024;

#[derive(Clone)]
pub struct HttpState {
    pub pool: PgPool,
    /// Signing secrets of the webhook endpoint (several while one rolls).
    pub webhook_secrets: Arc<Vec<Secret>>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/stripe/webhooks", post(webhooks::receive))
        .route("/healthz", get(|| async { "ok" }))
        .layer(axum::extract::DefaultBodyLimit::max(WEBHOOK_BODY_BYTES_MAX))
        .with_state(state)
}
