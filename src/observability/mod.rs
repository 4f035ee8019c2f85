//! What an operator sees of a running splitpay without reading tables: Prometheus metrics and structured logs.
//!
//! - Metrics go through the `metrics` crate's macros wherever something happens (a Stripe request, a transfer
//!   recorded, a reconcile run, a state transition); [`install`] puts the Prometheus recorder
//!   (`metrics-exporter-prometheus`) behind them once per process, and [`scrape`] serves it as `/metrics`: on
//!   `serve`'s own router, and on `SPLITPAY_METRICS_ADDR` for `worker`. Without [`install`] (tests, `ops`) every
//!   macro is a no-op.
//! - Gauges that come from the database (open payments and allocations, parked money, queues, undelivered webhooks)
//!   are read at scrape time from partial indexes ([`crate::store::gauges`]): no background task, and a scrape
//!   always shows the current state.
//! - [`logging`]: `SPLITPAY_LOG_FORMAT=json` for JSON lines; job handlers run inside a `job` span that carries
//!   `split_payment_id` / `split_allocation_id`, so every line they log does too.
//!
//! Every metric is listed in README.md ("Metrics"), with its labels.

pub mod logging;
pub mod scrape;

use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Where `worker` serves `/metrics` unless `SPLITPAY_METRICS_ADDR` says otherwise.
pub const METRICS_ADDR_DEFAULT: &str = "127.0.0.1:9464";

/// Seconds; from a fast card transfer (well under a second) to a bank debit's transfers days after intake.
const TRANSFER_LATENCY_BUCKETS_SECONDS: [f64; 12] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3_600.0, 86_400.0,
];
/// Seconds; a Stripe call or a wait for the rate limiter (25 requests/s in test mode: a queue of 100 waits 4 s).
const REQUEST_BUCKETS_SECONDS: [f64; 12] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 20.0];

/// Installs the Prometheus recorder for this process and describes every metric. Call once, early in `serve` or
/// `worker`; a second call fails (the recorder is global).
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("splitpay_transfer_latency_seconds".into()),
            &TRANSFER_LATENCY_BUCKETS_SECONDS,
        )?
        .set_buckets_for_metric(Matcher::Prefix("splitpay_stripe_".into()), &REQUEST_BUCKETS_SECONDS)?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_gauge!(
        "splitpay_split_payments",
        "Split payments not final yet (CREATED, REQUIRES_PAYMENT, PROCESSING), by status; read from the database"
    );
    describe_gauge!(
        "splitpay_split_payments_undistributed",
        "SUCCEEDED split payments whose distribution has not started; read from the database"
    );
    describe_gauge!(
        "splitpay_split_allocations",
        "Split allocations PENDING or TRANSFERRING, by status; read from the database"
    );
    describe_gauge!(
        "splitpay_parked_allocations",
        "PARKED allocations waiting for an operator, by currency; read from the database"
    );
    describe_gauge!(
        "splitpay_parked_amount_cents",
        "Net amount held by PARKED allocations in minor units, by currency; read from the database"
    );
    describe_gauge!(
        "splitpay_transfers_unresolved",
        "TRANSFERRING allocations whose outcome is still unknown after the retry window; read from the database"
    );
    describe_gauge!(
        "splitpay_job_queue_depth",
        "Jobs waiting per queue (pending, fetched but not started, or failed with attempts left)"
    );
    describe_gauge!(
        "splitpay_job_queue_oldest_due_seconds",
        Unit::Seconds,
        "How long the oldest due job of the queue has waited (0 when none is due)"
    );
    describe_gauge!(
        "splitpay_webhook_deliveries",
        "Outbound webhook deliveries by status: pending, delivering (open) and failed (attempts used up)"
    );
    describe_gauge!(
        "splitpay_webhook_delivery_oldest_undelivered_seconds",
        Unit::Seconds,
        "Age of the oldest open outbound webhook delivery (0 when none is open)"
    );
    describe_counter!(
        "splitpay_split_payment_transitions_total",
        "Split payment state changes written by this process, by the status reached"
    );
    describe_counter!(
        "splitpay_split_allocation_transitions_total",
        "Split allocation state changes written by this process, by the status reached"
    );
    describe_histogram!(
        "splitpay_transfer_latency_seconds",
        Unit::Seconds,
        "From a payment's success to one of its transfers recorded (TRANSFERRED committed)"
    );
    describe_counter!(
        "splitpay_stripe_requests_total",
        "Requests sent to Stripe by method, endpoint (ids replaced by :id) and outcome class"
    );
    describe_histogram!(
        "splitpay_stripe_request_duration_seconds",
        Unit::Seconds,
        "Duration of a Stripe request, by method and endpoint"
    );
    describe_histogram!(
        "splitpay_cron_tick_duration_seconds",
        Unit::Seconds,
        "Duration of one tick of a periodic job this process ran, by job"
    );
    describe_histogram!(
        "splitpay_stripe_rate_limiter_wait_seconds",
        Unit::Seconds,
        "Time a Stripe request waited for the client-side rate limiter"
    );
    describe_counter!(
        "splitpay_reconcile_runs_total",
        "Reconcile runs, by reconciler (pending, transfers, events, accounts)"
    );
    describe_counter!(
        "splitpay_reconcile_resolved_total",
        "What the reconcilers resolved, by reconciler and outcome"
    );
    describe_counter!(
        "splitpay_account_checks_total",
        "Connected accounts the accounts sweep asked Stripe about, by outcome (ready, not_ready, error)"
    );
    describe_counter!(
        "splitpay_account_activations_found_total",
        "Accounts able to receive transfers that the accounts sweep fed through the webhook's path (their account.updated was lost)"
    );
    describe_counter!(
        "splitpay_metrics_refresh_errors_total",
        "Scrapes whose database gauges could not be read (the previous values were served)"
    );
    describe_counter!(
        "splitpay_group_commit_items_total",
        "Items of the hot path's group-commit batches, by kind (start: succeeded payments started; record: transfers \
         recorded) and whether a batch wrote them (false: done alone, the slower way)"
    );
}

/// Which outcome class a Stripe request had: bounded label values for `splitpay_stripe_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripeOutcome {
    /// Any 2xx.
    Success,
    /// 429: rate limited or a lock timeout.
    RateLimited,
    /// Another 4xx: a refusal (terminal or not, see `stripe::error`).
    ClientError,
    /// 5xx.
    ServerError,
    /// The connection could not be made: nothing was sent.
    NotSent,
    /// Sent, but no answer within the timeout.
    Timeout,
    /// Sent, but the connection broke before a complete answer.
    ConnectionLost,
}

impl StripeOutcome {
    pub fn of_status(status: u16) -> Self {
        match status {
            200..=299 => StripeOutcome::Success,
            429 => StripeOutcome::RateLimited,
            500..=599 => StripeOutcome::ServerError,
            _ => StripeOutcome::ClientError,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StripeOutcome::Success => "success",
            StripeOutcome::RateLimited => "rate_limited",
            StripeOutcome::ClientError => "client_error",
            StripeOutcome::ServerError => "server_error",
            StripeOutcome::NotSent => "not_sent",
            StripeOutcome::Timeout => "timeout",
            StripeOutcome::ConnectionLost => "connection_lost",
        }
    }
}

/// A bounded endpoint label for a Stripe API path (with or without its `/v1` prefix): the ids are replaced by
/// `:id`, e.g. `/payment_intents/pi_3Q…/confirm` → `/v1/payment_intents/:id/confirm`. Stripe's paths alternate a
/// resource name and an id (`/transfers/:id/reversals/:id`), so every second segment is an id; a name that is not
/// plain lowercase (never the case for the paths async-stripe builds) becomes `:other`, so the label set stays
/// bounded whatever the path.
pub fn stripe_endpoint(path: &str) -> String {
    let path = path.split('?').next().unwrap_or("");
    let path = path.strip_prefix("/v1").unwrap_or(path);
    let mut label = String::from("/v1");
    for (i, segment) in path.split('/').filter(|s| !s.is_empty()).enumerate() {
        label.push('/');
        if i % 2 == 1 {
            label.push_str(":id");
        } else if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            label.push_str(segment);
        } else {
            label.push_str(":other");
        }
    }
    label
}

/// Counts one Stripe request and its duration (called by the transport, once per HTTP request).
pub fn stripe_request(method: &'static str, path: &str, outcome: StripeOutcome, duration: Duration) {
    let endpoint = stripe_endpoint(path);
    metrics::histogram!("splitpay_stripe_request_duration_seconds", "method" => method, "endpoint" => endpoint.clone())
        .record(duration.as_secs_f64());
    metrics::counter!("splitpay_stripe_requests_total", "method" => method, "endpoint" => endpoint, "outcome" => outcome.as_str())
        .increment(1);
}

/// Records how long a Stripe request waited for the rate limiter.
pub fn rate_limiter_waited(wait: Duration) {
    metrics::histogram!("splitpay_stripe_rate_limiter_wait_seconds").record(wait.as_secs_f64());
}

/// Records a transfer committed as TRANSFERRED, `succeeded_at` being its payment's success.
pub fn transfer_recorded(succeeded_at: Option<chrono::DateTime<chrono::Utc>>) {
    if let Some(at) = succeeded_at {
        let latency_ms = (chrono::Utc::now() - at).num_milliseconds().max(0);
        metrics::histogram!("splitpay_transfer_latency_seconds").record(latency_ms as f64 / 1_000.0);
    }
}

/// Counts a reconcile-pending run and what it resolved.
pub fn reconcile_pending_ran(report: &crate::jobs::reconcile::PendingReport) {
    metrics::counter!("splitpay_reconcile_runs_total", "reconciler" => "pending").increment(1);
    let resolved = [
        ("succeeded", report.succeeded),
        ("processing", report.processing),
        ("attempt_failed", report.attempt_failed),
        ("failed", report.failed),
        ("canceled", report.canceled),
        ("errors", report.errors),
    ];
    for (outcome, n) in resolved {
        metrics::counter!("splitpay_reconcile_resolved_total", "reconciler" => "pending", "outcome" => outcome)
            .increment(n as u64);
    }
}

/// Counts an events sweep pass and the lost webhooks it recovered.
pub fn events_sweep_ran(report: &crate::jobs::event_sweep::EventSweepReport) {
    metrics::counter!("splitpay_reconcile_runs_total", "reconciler" => "events").increment(1);
    metrics::counter!("splitpay_reconcile_resolved_total", "reconciler" => "events", "outcome" => "recovered")
        .increment(report.ingested.len() as u64);
}

/// Counts an accounts sweep pass and the activations it found: accounts able to receive transfers whose
/// `account.updated` was put in the inbox by the sweep.
pub fn accounts_sweep_ran(report: &crate::jobs::account_sweep::AccountSweepReport) {
    metrics::counter!("splitpay_reconcile_runs_total", "reconciler" => "accounts").increment(1);
    metrics::counter!("splitpay_account_activations_found_total").increment(report.ingested.len() as u64);
}

/// Counts one connected account the accounts sweep asked Stripe about, by what Stripe said: `ready`, `not_ready`,
/// `error` (Stripe could not be asked).
pub fn account_checked(outcome: &'static str) {
    metrics::counter!("splitpay_account_checks_total", "outcome" => outcome).increment(1);
}

/// Counts a reconcile-transfers run and what it resolved.
pub fn reconcile_transfers_ran(report: &crate::jobs::reconcile::TransferReport) {
    metrics::counter!("splitpay_reconcile_runs_total", "reconciler" => "transfers").increment(1);
    let resolved = [
        ("transfers_driven", report.transfers_driven),
        ("transfers_resolved", report.transfers_resolved),
        ("distributions", report.distributions),
        ("adopted", report.adopted),
        ("discrepancies", report.discrepancies),
        ("errors", report.errors),
    ];
    for (outcome, n) in resolved {
        metrics::counter!("splitpay_reconcile_resolved_total", "reconciler" => "transfers", "outcome" => outcome)
            .increment(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripe_endpoints_never_carry_ids() {
        assert_eq!(stripe_endpoint("/transfers"), "/v1/transfers");
        assert_eq!(stripe_endpoint("/v1/transfers"), "/v1/transfers");
        assert_eq!(
            stripe_endpoint("/payment_intents/pi_3QxYz/confirm"),
            "/v1/payment_intents/:id/confirm"
        );
        assert_eq!(stripe_endpoint("/charges/ch_1?expand[0]=x"), "/v1/charges/:id");
        assert_eq!(
            stripe_endpoint("/v1/transfers/tr_1/reversals/trr_2"),
            "/v1/transfers/:id/reversals/:id"
        );
        assert_eq!(stripe_endpoint("/accounts/acct_rcp0"), "/v1/accounts/:id");
        assert_eq!(stripe_endpoint("/Weird-1/x"), "/v1/:other/:id");
    }

    #[test]
    fn outcome_classes_follow_the_status() {
        assert_eq!(StripeOutcome::of_status(200), StripeOutcome::Success);
        assert_eq!(StripeOutcome::of_status(402), StripeOutcome::ClientError);
        assert_eq!(StripeOutcome::of_status(429), StripeOutcome::RateLimited);
        assert_eq!(StripeOutcome::of_status(503), StripeOutcome::ServerError);
    }
}
