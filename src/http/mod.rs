//! The HTTP side of splitpay (axum): intake (`/v1/split-payments`), Stripe's webhook ingress, and health.

pub mod error;
pub mod intake;
pub mod webhooks;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;

use crate::app::AppContext;
use crate::config::Secret;

/// Stripe events and intake bodies are a few kilobytes; anything far larger is refused.
pub const BODY_BYTES_MAX: usize = 1024 * 1024;

#[derive(Clone)]
pub struct HttpState {
    pub app: AppContext,
    /// Signing secrets of the webhook endpoint (several while one rolls).
    pub webhook_secrets: Arc<Vec<Secret>>,
    /// The bearer token intake callers present.
    pub service_token: Secret,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/v1/split-payments", post(intake::create))
        .route("/v1/split-payments/{id}", get(intake::show))
        .route("/stripe/webhooks", post(webhooks::receive))
        .route("/healthz", get(|| async { "ok" }))
        // After the routes: it applies to the routes added so far.
        .method_not_allowed_fallback(error::method_not_allowed)
        .fallback(error::not_found)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(axum::middleware::map_response(error::envelope_plain_errors))
        .with_state(state)
}
