//! Delivers one outbound event to one endpoint (a `webhook_deliveries` row, `whdl_…`), signed per Standard Webhooks.
//!
//! Claim, send, record:
//! 1. a conditional UPDATE claims the row (`delivering`, `claimed_until` = now + timeout + margin, attempt + 1);
//!    a row another worker holds, one not yet due, or one already succeeded or failed is left alone;
//! 2. one POST: the stored envelope as the body, `webhook-id` = the outbox id (the same on every attempt),
//!    `webhook-timestamp` = now, `webhook-signature` = one `v1,…` per active secret. Redirects are not followed; any
//!    2xx is success; anything else, a timeout or a refused connection is a failure;
//! 3. the outcome is committed at once, before anything else: the attempt row, then the delivery's new state
//!    (`succeeded`; or `pending` with `next_attempt_at` from the row's schedule and a delayed job; or `failed` after
//!    the last attempt), in one transaction.
//!
//! What is guaranteed: a delivery is sent at most once per claim, and a claim is only ever taken on a `pending` row.
//! So an event that got a 2xx is never sent to that endpoint again by any worker, replica, job rerun or sweep:
//! - once the 2xx is recorded, the row is `succeeded` and nothing claims it;
//! - if the worker dies after the receiver answered but before the record commits, the row stays `delivering`
//!   until its claim expires; it is then never re-claimed: the sweeper (or the next run of its job) ends it
//!   `failed` with its outcome unknown (last error and an attempt row say so, and the log warns).
//!
//! This is at-most-once after the claim: a delivery whose worker stopped mid-flight may not have reached the
//! receiver and is not retried automatically. Only an operator's `splitpay ops redeliver` sends it again, with the
//! same `webhook-id`; the operator accepts that the receiver may get it twice (the command says so).

use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::queue::{enqueue, Queue};
use super::runner::JobFailure;
use crate::events::signing::signature_header;
use crate::store::webhooks::{self, AfterFailure, AttemptOutcome, ClaimedDelivery};

/// The contract's delivery timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Added to the timeout for a claim's lease. After the send (at most the timeout), a failed record is retried for the
/// first three quarters of the margin (45 s: a pool acquire is bounded by 5 s, the record is three short
/// statements); the last quarter (15 s) is left so a record under way commits before the claim expires.
pub const CLAIM_MARGIN: Duration = Duration::from_secs(60);
/// The first pause between record retries; it doubles up to [`RECORD_PAUSE_MAX`].
const RECORD_PAUSE_MIN: Duration = Duration::from_millis(50);
const RECORD_PAUSE_MAX: Duration = Duration::from_secs(2);
/// An endpoint whose deliveries have all failed for this long is disabled.
pub const DISABLE_AFTER_SECS: i64 = 5 * 86_400;
/// Response bodies are kept up to this many bytes.
pub const RESPONSE_BODY_MAX: usize = 1024;
/// Overrides [`DEFAULT_TIMEOUT`] (milliseconds).
pub const TIMEOUT_ENV: &str = "SPLITPAY_WEBHOOK_TIMEOUT_MS";

/// Test hooks that stop a delivery at a point, as a crash there would (the job returns an error; what was
/// committed stays committed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// After the receiver answered, before the outcome is recorded.
    AfterResponse,
    /// After the outcome is committed, before the job is acknowledged.
    AfterRecord,
}

#[derive(Debug, Clone)]
pub struct DeliverySettings {
    pub timeout: Duration,
    pub claim_margin: Duration,
    /// Who claims rows: unique per process.
    pub worker: String,
    pub disable_after_secs: i64,
    pub failpoint: Option<Failpoint>,
    client: reqwest::Client,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self::with_timeout(DEFAULT_TIMEOUT)
    }
}

impl DeliverySettings {
    pub fn with_timeout(timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("splitpay-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a reqwest client builds");
        Self {
            timeout,
            claim_margin: CLAIM_MARGIN,
            worker: format!("deliver-{}", uuid::Uuid::new_v4().simple()),
            disable_after_secs: DISABLE_AFTER_SECS,
            failpoint: None,
            client,
        }
    }

    /// `SPLITPAY_WEBHOOK_TIMEOUT_MS` through `get` (the environment in production), else 10 s.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, crate::config::ConfigError> {
        let timeout = match get(TIMEOUT_ENV).filter(|v| !v.trim().is_empty()) {
            None => DEFAULT_TIMEOUT,
            Some(raw) => Duration::from_millis(raw.trim().parse::<u64>().ok().filter(|&ms| ms > 0).ok_or(
                crate::config::ConfigError::Invalid {
                    name: TIMEOUT_ENV,
                    reason: format!("expected a positive number of milliseconds, got '{raw}'"),
                },
            )?),
        };
        Ok(Self::with_timeout(timeout))
    }
}

/// What one run of the job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// Nothing to do now: not due, held by another worker, already final, or its endpoint disabled.
    NotClaimed,
    Succeeded,
    /// Failed; the next attempt is due after this many seconds.
    Retry {
        after_secs: i32,
    },
    /// Failed for the last time.
    Failed,
    /// Failed, but the claim was no longer this one's (ended or requeued meanwhile): only the attempt was recorded.
    ClaimLost,
    /// This claim's outcome had already been recorded (an earlier record committed though it reported an error).
    AlreadyRecorded,
}

/// The job handler.
pub async fn deliver(pool: &PgPool, settings: &DeliverySettings, id: &str) -> Result<(), JobFailure> {
    deliver_once(pool, settings, id).await.map(|_| ())
}

fn retry(e: impl std::fmt::Display) -> JobFailure {
    JobFailure::Retry(e.to_string())
}

/// Claims delivery `id`, sends it once, and records the outcome.
pub async fn deliver_once(pool: &PgPool, settings: &DeliverySettings, id: &str) -> Result<Delivered, JobFailure> {
    let lease = (settings.timeout + settings.claim_margin).as_secs_f64();
    // Measured before the claim, so the record deadline is earlier than the claim's expiry in the database.
    let record_deadline = Instant::now() + settings.timeout + settings.claim_margin * 3 / 4;
    let claimed = {
        let mut conn = pool.acquire().await.map_err(retry)?;
        let claimed = webhooks::claim_delivery(&mut conn, id, &settings.worker, lease)
            .await
            .map_err(retry)?;
        if claimed.is_none() {
            // A row of ours whose worker stopped mid-flight: end it now rather than wait for the sweeper.
            webhooks::end_expired_claims(&mut conn, Some(id), 0, 1)
                .await
                .map_err(retry)?;
        }
        claimed
    };
    let Some(delivery) = claimed else {
        return Ok(Delivered::NotClaimed);
    };
    let outcome = send(settings, &delivery).await?;
    if settings.failpoint == Some(Failpoint::AfterResponse) {
        return Err(JobFailure::Retry(
            "failpoint: stopped after the response, before recording".into(),
        ));
    }
    let result = record_until(pool, settings, &delivery, &outcome, record_deadline).await?;
    if settings.failpoint == Some(Failpoint::AfterRecord) {
        return Err(JobFailure::Retry("failpoint: stopped after recording".into()));
    }
    Ok(result)
}

async fn send(settings: &DeliverySettings, delivery: &ClaimedDelivery) -> Result<AttemptOutcome, JobFailure> {
    let body = serde_json::to_vec(&delivery.payload).expect("a stored JSON payload serialises");
    let timestamp = delivery.now.timestamp();
    let signature = signature_header(&delivery.signing_secrets(), &delivery.outbox_event_id, timestamp, &body)
        .map_err(|e| JobFailure::Abandon(format!("endpoint {}: {e}", delivery.endpoint_id)))?;
    let started = Instant::now();
    let sent = settings
        .client
        .post(&delivery.url)
        .timeout(settings.timeout)
        .header("content-type", "application/json")
        .header("webhook-id", &delivery.outbox_event_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await;
    let outcome = match sent {
        Ok(mut response) => {
            let status = response.status();
            let retry_after = match status.as_u16() {
                429 | 503 => response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| retry_after_secs(v, delivery.now)),
                _ => None,
            };
            let mut kept: Vec<u8> = Vec::new();
            // Read at most 1 KiB; a body still arriving when the timeout ends does not undo the status.
            while kept.len() < RESPONSE_BODY_MAX {
                match response.chunk().await {
                    Ok(Some(chunk)) => {
                        kept.extend_from_slice(&chunk[..chunk.len().min(RESPONSE_BODY_MAX - kept.len())])
                    }
                    _ => break,
                }
            }
            let mut text = String::from_utf8_lossy(&kept).into_owned();
            while text.len() > RESPONSE_BODY_MAX {
                text.pop();
            }
            AttemptOutcome {
                retry_after_secs: retry_after,
                status_code: Some(i32::from(status.as_u16())),
                duration_ms: started.elapsed().as_millis() as i64,
                error: (!status.is_success()).then(|| format!("HTTP {}", status.as_u16())),
                response_body: (!text.is_empty()).then_some(text),
            }
        }
        Err(e) => {
            let error = if e.is_timeout() {
                format!("timed out after {} ms", settings.timeout.as_millis())
            } else if e.is_connect() {
                "could not connect".to_owned()
            } else {
                format!("request failed: {}", e.without_url())
            };
            AttemptOutcome {
                status_code: None,
                duration_ms: started.elapsed().as_millis() as i64,
                error: Some(error),
                response_body: None,
                retry_after_secs: None,
            }
        }
    };
    Ok(outcome)
}

/// Records the outcome, retrying with backoff on errors (a database restart, a full pool) until `deadline`, shortly
/// before the claim expires. A record that never succeeds leaves the row `delivering`; once the claim expires it
/// ends with its outcome unknown (never sent again automatically), so a 2xx that could not be recorded is not
/// repeated.
async fn record_until(
    pool: &PgPool,
    settings: &DeliverySettings,
    delivery: &ClaimedDelivery,
    outcome: &AttemptOutcome,
    deadline: Instant,
) -> Result<Delivered, JobFailure> {
    let mut pause = RECORD_PAUSE_MIN;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let tried = match tokio::time::timeout(left, record(pool, settings, delivery, outcome)).await {
            Ok(tried) => tried,
            Err(_) => Err(retry("recording did not finish before the claim's deadline")),
        };
        match tried {
            Ok(done) => return Ok(done),
            Err(e) if Instant::now() + pause < deadline => {
                tracing::warn!(delivery = %delivery.id, error = %e, "recording a webhook attempt failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RECORD_PAUSE_MAX);
            }
            Err(e) => {
                tracing::error!(delivery = %delivery.id, error = %e, succeeded = outcome.succeeded(),
                    "could not record a webhook attempt before its claim expires; it will end with its outcome unknown");
                return Err(e);
            }
        }
    }
}

/// `Retry-After`: seconds, or an HTTP date (seconds from `now`, at least 0).
fn retry_after_secs(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<i64> {
    let value = value.trim();
    value.parse::<i64>().ok().filter(|s| *s >= 0).or_else(|| {
        let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
        Some((at.with_timezone(&chrono::Utc) - now).num_seconds().max(0))
    })
}

/// One try at recording the outcome, in one transaction.
async fn record(
    pool: &PgPool,
    settings: &DeliverySettings,
    delivery: &ClaimedDelivery,
    outcome: &AttemptOutcome,
) -> Result<Delivered, JobFailure> {
    let mut tx = pool.begin().await.map_err(retry)?;
    if !webhooks::insert_attempt(&mut tx, delivery, outcome)
        .await
        .map_err(retry)?
    {
        return Ok(Delivered::AlreadyRecorded);
    }
    let result = if outcome.succeeded() {
        webhooks::record_success(&mut tx, delivery).await.map_err(retry)?;
        Delivered::Succeeded
    } else {
        let (after, failing_since) = webhooks::record_failure(&mut tx, delivery, outcome)
            .await
            .map_err(retry)?;
        let mut disabled = false;
        let disable_because = if outcome.status_code == Some(410) {
            // Standard Webhooks: 410 Gone means the receiver wants no more deliveries.
            Some("the receiver answered 410 Gone".to_owned())
        } else if (delivery.now - failing_since).num_seconds() >= settings.disable_after_secs {
            Some(format!(
                "every delivery failed for {} days (since {})",
                settings.disable_after_secs / 86_400,
                failing_since.to_rfc3339()
            ))
        } else {
            None
        };
        if let Some(reason) = disable_because {
            // Also ends the endpoint's pending deliveries, this one included.
            disabled = webhooks::disable_endpoint(&mut tx, &delivery.endpoint_id, &reason)
                .await
                .map_err(retry)?;
            if disabled {
                tracing::warn!(endpoint = %delivery.endpoint_id, %reason, "webhook endpoint disabled");
            }
        }
        match after {
            AfterFailure::Retry { .. } if disabled => Delivered::Failed,
            AfterFailure::Retry { after_secs } => {
                enqueue(
                    &mut tx,
                    Queue::Deliver,
                    &delivery.id,
                    Some(Duration::from_secs(after_secs.max(0) as u64)),
                )
                .await
                .map_err(retry)?;
                Delivered::Retry { after_secs }
            }
            AfterFailure::Failed => {
                tracing::warn!(delivery = %delivery.id, endpoint = %delivery.endpoint_id, attempts = delivery.attempts,
                    "webhook delivery failed after its last attempt");
                Delivered::Failed
            }
            AfterFailure::ClaimLost => Delivered::ClaimLost,
        }
    };
    tx.commit().await.map_err(retry)?;
    Ok(result)
}
