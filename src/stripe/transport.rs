//! The HTTP transport under async-stripe's request builders.
//!
//! async-stripe's own `Client` (1.0.0-rc.10) has gaps that matter for money (see ../shared/crates.md): it reads
//! `Stripe-Should-Retry` but drops it from the error it returns; an error body that is not JSON loses its HTTP
//! status; "connection refused" (never sent: safe) and "connection lost" (maybe applied) are one `ClientError`
//! string; it never reuses connections. So we implement async-stripe's `StripeClient` trait ourselves over reqwest:
//! the request builders, wire encoding, API version and response types stay async-stripe's, and the transport
//! reports what the classification in [`super::error`] needs. Retries are not done here (one request per call):
//! [`super::gateway`] decides them.

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use stripe_client_core::{CustomizedStripeRequest, RequestStrategy, StripeClient, StripeClientErr, StripeMethod};

use super::error::{GatewayError, StripeErrorBody};
use super::keys::StripeKey;
use crate::observability::StripeOutcome;

/// Stripe's production API base; tests and the demo use the simulator's.
pub const STRIPE_API_BASE: &str = "https://api.stripe.com/";

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Stripe answered with its error envelope.
    #[error("Stripe error {status}: {}", error.message.as_deref().unwrap_or(""))]
    Api {
        status: u16,
        should_retry: Option<bool>,
        error: Box<stripe_shared::ApiErrors>,
    },
    /// A non-2xx answer whose body is not Stripe's error envelope (a proxy, a load balancer).
    #[error("HTTP {status} without a Stripe error body")]
    NonJsonError { status: u16, should_retry: Option<bool> },
    /// The connection could not be made: the request never left, so nothing was applied.
    #[error("request not sent: {0}")]
    NotSent(String),
    #[error("timed out waiting for Stripe")]
    Timeout,
    /// The request may have reached Stripe, but no (complete) response came back.
    #[error("connection lost: {0}")]
    Lost(String),
    /// A 2xx body async-stripe could not parse: the operation *succeeded*, but we cannot read its result.
    #[error("unreadable success response: {0}")]
    BadResponse(String),
    #[error("{0}")]
    Config(String),
}

impl StripeClientErr for TransportError {
    fn deserialize_err(msg: impl std::fmt::Display) -> Self {
        TransportError::BadResponse(msg.to_string())
    }
}

impl From<TransportError> for GatewayError {
    fn from(err: TransportError) -> Self {
        match err {
            TransportError::Api {
                status,
                should_retry,
                error,
            } => {
                let code = error.code.as_ref().map(|c| c.as_str().to_owned());
                let intent = error.payment_intent.as_ref().map(|pi| pi.id.as_str().to_owned());
                let mut err = GatewayError::from_response(
                    status,
                    should_retry,
                    StripeErrorBody {
                        error_type: Some(error.type_.as_str().to_owned()),
                        code,
                        decline_code: error.decline_code,
                        message: error.message,
                        param: error.param,
                    },
                );
                if let GatewayError::Terminal { payment_intent, .. } = &mut err {
                    *payment_intent = intent;
                }
                err
            }
            TransportError::NonJsonError { status, should_retry } => {
                GatewayError::from_response(status, should_retry, StripeErrorBody::default())
            }
            TransportError::NotSent(reason) => GatewayError::Retryable {
                status: None,
                code: None,
                message: reason,
            },
            TransportError::Timeout => GatewayError::Unknown {
                reason: "timed out waiting for Stripe".into(),
            },
            TransportError::Lost(reason) => GatewayError::Unknown {
                reason: format!("connection lost: {reason}"),
            },
            TransportError::BadResponse(reason) => GatewayError::Unknown {
                reason: format!("success response could not be read: {reason}"),
            },
            TransportError::Config(reason) => GatewayError::Config(reason),
        }
    }
}

/// One HTTP client per process; connections are pooled and reused.
#[derive(Clone)]
pub struct HttpTransport {
    http: reqwest::Client,
    api_base: String,
    headers: HeaderMap,
    timeout: Duration,
}

impl std::fmt::Debug for HttpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTransport")
            .field("api_base", &self.api_base)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl HttpTransport {
    /// `api_base` ends with `/` (requests go to `{api_base}v1{path}`).
    pub fn new(key: &StripeKey, api_base: &str, timeout: Duration) -> Result<Self, TransportError> {
        let api_base = if api_base.ends_with('/') {
            api_base.to_owned()
        } else {
            format!("{api_base}/")
        };
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", key.secret().expose()))
            .map_err(|_| TransportError::Config("the Stripe key is not a valid header value".into()))?;
        auth.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, auth);
        headers.insert(
            "stripe-version",
            HeaderValue::from_static(stripe_shared::version::VERSION.as_str()),
        );
        let http = reqwest::Client::builder()
            .user_agent(concat!("splitpay/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| TransportError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            api_base,
            headers,
            timeout,
        })
    }

    pub fn api_base(&self) -> &str {
        &self.api_base
    }
}

impl StripeClient for HttpTransport {
    type Err = TransportError;

    async fn execute(&self, req: CustomizedStripeRequest) -> Result<Bytes, TransportError> {
        let (req, config) = req.into_pieces();
        let key = match config.request_strategy {
            None | Some(RequestStrategy::Once) => None,
            Some(RequestStrategy::Idempotent(key)) => Some(key),
            Some(other) => {
                return Err(TransportError::Config(format!(
                    "request strategy {other:?} would resend without our idempotency key; retries belong to the gateway"
                )))
            }
        };
        let mut url = format!("{}v1{}", self.api_base, req.path);
        if let Some(query) = &req.query {
            url.push('?');
            url.push_str(query);
        }
        let (method, method_name) = match req.method {
            StripeMethod::Get => (reqwest::Method::GET, "GET"),
            StripeMethod::Post => (reqwest::Method::POST, "POST"),
            StripeMethod::Delete => (reqwest::Method::DELETE, "DELETE"),
        };
        let mut builder = self
            .http
            .request(method, url)
            .headers(self.headers.clone())
            .timeout(config.timeout.unwrap_or(self.timeout));
        if let Some(key) = &key {
            builder = builder.header("idempotency-key", key.as_str());
        }
        if let Some(account) = &config.account_id {
            builder = builder.header("stripe-account", account.as_str());
        }
        if let Some(body) = req.body {
            builder = builder
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(body);
        }

        let started = std::time::Instant::now();
        let counted =
            |outcome| crate::observability::stripe_request(method_name, &req.path, outcome, started.elapsed());
        let response = match builder.send().await.map_err(classify_send_error) {
            Ok(response) => response,
            Err(e) => {
                counted(outcome_of(&e));
                return Err(e);
            }
        };
        let status = response.status();
        let should_retry = header_bool(response.headers(), "stripe-should-retry");
        if header_bool(response.headers(), "idempotent-replayed") == Some(true) {
            tracing::debug!(path = %req.path, "Stripe replayed a saved response for this idempotency key");
        }
        let body = response.bytes().await.map_err(|e| {
            let e = if e.is_timeout() {
                TransportError::Timeout
            } else {
                TransportError::Lost(e.to_string())
            };
            counted(outcome_of(&e));
            e
        })?;
        counted(StripeOutcome::of_status(status.as_u16()));
        if status.is_success() {
            return Ok(body);
        }
        let parsed = std::str::from_utf8(&body)
            .ok()
            .and_then(|text| miniserde::json::from_str::<stripe_shared::Error>(text).ok());
        Err(match parsed {
            Some(envelope) => TransportError::Api {
                status: status.as_u16(),
                should_retry,
                error: envelope.error,
            },
            None => TransportError::NonJsonError {
                status: status.as_u16(),
                should_retry,
            },
        })
    }
}

/// The metrics' outcome class of a request that got no complete answer.
fn outcome_of(e: &TransportError) -> StripeOutcome {
    match e {
        TransportError::NotSent(_) | TransportError::Config(_) => StripeOutcome::NotSent,
        TransportError::Timeout => StripeOutcome::Timeout,
        _ => StripeOutcome::ConnectionLost,
    }
}

fn classify_send_error(e: reqwest::Error) -> TransportError {
    // A connect failure (refused, DNS, connect timeout) means the request never left: safe to resend.
    if e.is_connect() {
        TransportError::NotSent(e.to_string())
    } else if e.is_timeout() {
        TransportError::Timeout
    } else if e.is_builder() {
        TransportError::Config(e.to_string())
    } else {
        TransportError::Lost(e.to_string())
    }
}

fn header_bool(headers: &HeaderMap, name: &str) -> Option<bool> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}
