//! The HTTP side of splitpay (axum): intake (`/v1/split-payments`), the catalogue API the platform keeps current
//! (`/v1/organisations`, `/v1/recipient-account-links`, `/v1/recommendation-sets`), Stripe's webhook ingress, and
//! health.

pub mod catalog;
pub mod error;
pub mod intake;
mod request;
pub mod webhooks;

use std::sync::Arc;

use axum::routing::{get, post, put};
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
    /// Signing secrets of the Connect webhook endpoint (`/stripe/webhooks/connect`); empty refuses every request.
    pub connect_webhook_secrets: Arc<Vec<Secret>>,
    /// The bearer token intake callers present.
    pub service_token: Secret,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/v1/split-payments", post(intake::create).get(catalog::list_payments))
        .route("/v1/split-payments/{id}", get(intake::show))
        .route(
            "/v1/organisations/{id}",
            put(catalog::put_organisation).get(catalog::get_organisation_handler),
        )
        .route(
            "/v1/recipient-account-links/{id}",
            put(catalog::put_link).get(catalog::get_link_handler),
        )
        .route(
            "/v1/recipient-account-links/{id}/deactivate",
            post(catalog::deactivate_link),
        )
        .route("/v1/recipient-account-links/{id}/archive", post(catalog::archive_link))
        .route(
            "/v1/recommendation-sets/{id}",
            put(catalog::put_set).get(catalog::get_set),
        )
        .route("/v1/recommendation-sets/{id}/deactivate", post(catalog::deactivate_set))
        .route("/v1/recommendation-sets/{id}/archive", post(catalog::archive_set))
        .route("/stripe/webhooks", post(webhooks::receive))
        .route("/stripe/webhooks/connect", post(webhooks::receive_connect))
        .route("/healthz", get(|| async { "ok" }))
        // After the routes: it applies to the routes added so far.
        .method_not_allowed_fallback(error::method_not_allowed)
        .fallback(error::not_found)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(axum::middleware::map_response(error::envelope_plain_errors))
        .with_state(state)
}
