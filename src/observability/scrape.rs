//! `GET /metrics` in Prometheus text format: reads the open work from the database ([`crate::store::gauges`]) into
//! the gauges, then renders the registry. Mounted on `serve`'s router, and served alone by `worker` on
//! `SPLITPAY_METRICS_ADDR`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

use crate::domain::state::{AllocationStatus, PaymentStatus};
use crate::jobs::queue::Queue;

/// Scrapes closer together than this reuse the last reading: a scrape storm cannot become a query storm.
const REFRESH_INTERVAL_MIN: Duration = Duration::from_secs(1);
/// A slow database makes a scrape serve the previous values rather than hang past Prometheus's own timeout.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(3);

/// The open statuses the gauges report (a status with none is reported as 0, never left stale).
const OPEN_PAYMENT_STATUSES: [PaymentStatus; 3] = [
    PaymentStatus::Created,
    PaymentStatus::RequiresPayment,
    PaymentStatus::Processing,
];
const OPEN_ALLOCATION_STATUSES: [AllocationStatus; 2] = [AllocationStatus::Pending, AllocationStatus::Transferring];

#[derive(Clone)]
pub struct MetricsState {
    handle: PrometheusHandle,
    pool: PgPool,
    refresh: Arc<tokio::sync::Mutex<Refresh>>,
}

#[derive(Default)]
struct Refresh {
    last: Option<Instant>,
    /// Currencies parked money was reported in, so a currency whose last parked allocation is resolved drops to 0.
    currencies: BTreeSet<String>,
}

impl MetricsState {
    pub fn new(handle: PrometheusHandle, pool: PgPool) -> Self {
        Self {
            handle,
            pool,
            refresh: Arc::default(),
        }
    }

    /// Reads the database gauges (unless read less than a second ago) and renders every metric.
    pub async fn render(&self) -> String {
        {
            let mut refresh = self.refresh.lock().await;
            if refresh.last.is_none_or(|at| at.elapsed() >= REFRESH_INTERVAL_MIN) {
                match tokio::time::timeout(REFRESH_TIMEOUT, read_gauges(&self.pool, &mut refresh.currencies)).await {
                    Ok(Ok(())) => refresh.last = Some(Instant::now()),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "metrics: the database gauges could not be read");
                        metrics::counter!("splitpay_metrics_refresh_errors_total").increment(1);
                    }
                    Err(_) => {
                        tracing::warn!("metrics: reading the database gauges timed out");
                        metrics::counter!("splitpay_metrics_refresh_errors_total").increment(1);
                    }
                }
            }
        }
        // Histograms are drained into their buckets here, so no upkeep task is needed.
        self.handle.run_upkeep();
        self.handle.render()
    }
}

async fn read_gauges(pool: &PgPool, currencies: &mut BTreeSet<String>) -> Result<(), crate::store::StoreError> {
    let names: Vec<&str> = Queue::ALL.iter().map(|q| q.name()).collect();
    let open = crate::store::gauges::open_work(&mut *pool.acquire().await?, &names).await?;
    let count_of = |rows: &[(String, i64)], status: &str| rows.iter().find(|(s, _)| s == status).map_or(0, |(_, n)| *n);
    for status in OPEN_PAYMENT_STATUSES {
        metrics::gauge!("splitpay_split_payments", "status" => status.as_str())
            .set(count_of(&open.payments, status.as_str()) as f64);
    }
    metrics::gauge!("splitpay_split_payments_undistributed").set(open.payments_undistributed as f64);
    for status in OPEN_ALLOCATION_STATUSES {
        metrics::gauge!("splitpay_split_allocations", "status" => status.as_str())
            .set(count_of(&open.allocations, status.as_str()) as f64);
    }
    let parked_total: i64 = open.parked.iter().map(|(_, n, _)| n).sum();
    metrics::gauge!("splitpay_split_allocations", "status" => AllocationStatus::Parked.as_str())
        .set(parked_total as f64);
    currencies.extend(open.parked.iter().map(|(c, _, _)| c.clone()));
    for currency in currencies.iter() {
        let (count, amount_cents) = open
            .parked
            .iter()
            .find(|(c, _, _)| c == currency)
            .map_or((0, 0), |(_, n, cents)| (*n, *cents));
        metrics::gauge!("splitpay_parked_allocations", "currency" => currency.clone()).set(count as f64);
        metrics::gauge!("splitpay_parked_amount_cents", "currency" => currency.clone()).set(amount_cents as f64);
    }
    metrics::gauge!("splitpay_transfers_unresolved").set(open.unresolved as f64);
    for queue in Queue::ALL {
        let (depth, oldest_due_seconds) = open
            .queues
            .iter()
            .find(|(name, _, _)| name == queue.name())
            .map_or((0, 0.0), |(_, n, age)| (*n, *age));
        metrics::gauge!("splitpay_job_queue_depth", "queue" => queue.name()).set(depth as f64);
        metrics::gauge!("splitpay_job_queue_oldest_due_seconds", "queue" => queue.name()).set(oldest_due_seconds);
    }
    for (status, n) in [
        ("pending", open.deliveries_pending),
        ("delivering", open.deliveries_delivering),
        ("failed", open.deliveries_failed),
    ] {
        metrics::gauge!("splitpay_webhook_deliveries", "status" => status).set(n as f64);
    }
    metrics::gauge!("splitpay_webhook_delivery_oldest_undelivered_seconds").set(open.delivery_oldest_age_seconds);
    Ok(())
}

async fn metrics_handler(State(state): State<MetricsState>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.render().await,
    )
}

/// A router with `GET /metrics` only, to merge into `serve`'s or to serve alone.
pub fn router(state: MetricsState) -> Router {
    Router::new().route("/metrics", get(metrics_handler)).with_state(state)
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves (the worker's endpoint).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: MetricsState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
