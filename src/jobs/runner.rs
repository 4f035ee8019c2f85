//! The worker process's machinery: one apalis worker per queue, each handing decoded [`JobRef`]s to a handler.
//!
//! apalis-postgres behaviours this works around (see ../shared/crates.md):
//! - a payload that cannot be decoded stops a typed worker: workers here take raw JSON and decode it themselves;
//!   a bad payload is logged and the job killed (`AbortError`, never re-fetched), and the worker goes on;
//! - a restarted process reusing its worker name leaves its crashed jobs `Running` forever: every worker name
//!   carries a random id per process start and the restart count;
//! - a plain storage has no poll timer, NOTIFY fires only for jobs due now, and `with_pubsub()` loses a wakeup that
//!   arrives while a fetch is under way: [`super::wake`] wakes each queue from one LISTEN connection per process,
//!   fetches again after any wakeup a fetch may have missed, and polls (1 s) only as the fallback;
//! - the defaults return a dead worker's jobs after 300 s: heartbeats are set explicitly (10 s × 6);
//! - a database outage kills a worker and `Monitor` restarts nothing by default: `should_restart` says yes;
//! - errors are retried at once with no backoff: handlers do their own delayed retries, so an `Err` is rare.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::*;
use apalis_postgres::Config;
use sqlx::PgPool;

use super::queue::{JobRef, Queue};
use super::wake::{Signals, Woken};
use tracing::Instrument;

pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), JobFailure>> + Send>>;

/// Works on one job. Handlers are idempotent: a job may run more than once.
pub type Handler = Arc<dyn Fn(JobRef) -> HandlerFuture + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum JobFailure {
    /// Something passing (a lost database connection): apalis runs the job again.
    #[error("retry: {0}")]
    Retry(String),
    /// Nothing to gain from running it again (the row is gone, the payload is wrong): the job is killed. The
    /// sweeper re-enqueues work whose row still says it is due.
    #[error("abandon: {0}")]
    Abandon(String),
}

#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// Jobs run at once per queue; also apalis's fetch batch, so no fetched job waits locked behind others.
    pub concurrency: usize,
    pub heartbeat_interval: Duration,
    /// A worker silent for `heartbeat_interval × missed_heartbeats` is dead and its jobs are picked up again.
    pub missed_heartbeats: usize,
    pub poll_interval: Duration,
    /// Bounds one job (a Stripe call has its own, shorter timeout).
    pub job_timeout: Duration,
    /// On shutdown, in-flight jobs get this long to finish and record their outcome.
    pub shutdown_timeout: Duration,
}

impl Default for RunnerSettings {
    fn default() -> Self {
        Self {
            concurrency: crate::config::WORKER_CONCURRENCY_DEFAULT,
            heartbeat_interval: Duration::from_secs(10),
            missed_heartbeats: 6,
            poll_interval: Duration::from_secs(1),
            job_timeout: Duration::from_secs(120),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("worker monitor failed: {0}")]
pub struct RunnerError(String);

/// Decodes a payload and runs the handler, turning outcomes into what apalis understands.
async fn dispatch(queue: Queue, handler: Handler, payload: serde_json::Value) -> Result<(), BoxDynError> {
    let job: JobRef = match serde_json::from_value(payload.clone()) {
        Ok(job) => job,
        Err(e) => {
            tracing::error!(queue = queue.name(), %payload, error = %e, "rejecting a job with an undecodable payload");
            metrics::counter!("splitpay_jobs_rejected_total", "queue" => queue.name()).increment(1);
            return Err(AbortError::new(format!("undecodable payload: {e}")).into());
        }
    };
    // Every line the job logs, here too, carries its ids (see `observability::logging::job_span`).
    let span = crate::observability::logging::job_span(queue, &job.id);
    let outcome = handler(job.clone()).instrument(span.clone()).await;
    let _in_span = span.enter(); // no await below
    match outcome {
        Ok(()) => Ok(()),
        Err(JobFailure::Retry(reason)) => {
            tracing::warn!(queue = queue.name(), id = %job.id, %reason, "job failed; apalis will run it again");
            Err(reason.into())
        }
        Err(JobFailure::Abandon(reason)) => {
            tracing::error!(queue = queue.name(), id = %job.id, %reason, "job abandoned");
            Err(AbortError::new(reason).into())
        }
    }
}

/// Runs one worker per `(queue, handler)` until `shutdown` resolves, then lets in-flight jobs finish.
pub async fn run(
    pool: PgPool,
    handlers: Vec<(Queue, Handler)>,
    settings: RunnerSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunnerError> {
    let process = uuid::Uuid::new_v4().simple().to_string();
    let signals = Signals::default();
    let listener = tokio::spawn(super::wake::listen(pool.clone(), signals.clone()));
    let mut monitor = Monitor::new();
    for (queue, handler) in handlers {
        let (pool, settings, process) = (pool.clone(), settings.clone(), process.clone());
        let signal = signals.of(queue);
        monitor = monitor.register(move |restarts| {
            let config = Config::default()
                .queue(queue.name())
                .batch_size(settings.concurrency)
                // No separate `Running` mark per job (a transaction of its own when it is not batched with an
                // ack): a fetched job stays `Queued`, locked to this worker, until its ack, and a dead worker's
                // `Queued` jobs are recovered exactly like `Running` ones (apalis's orphan query takes both).
                .lock_tasks(false)
                .heartbeat_interval(settings.heartbeat_interval)
                .missed_heartbeats(settings.missed_heartbeats);
            let backend = Woken::new(&pool, config, signal.clone(), settings.poll_interval);
            let handler = handler.clone();
            WorkerBuilder::new(format!("splitpay-{}-{process}-{restarts}", queue.name()))
                .backend(backend)
                .concurrency(settings.concurrency)
                .timeout(settings.job_timeout)
                .build(move |payload: serde_json::Value| dispatch(queue, handler.clone(), payload))
        });
    }
    let outcome = monitor
        .shutdown_timeout(settings.shutdown_timeout)
        .should_restart(|ctx, err| {
            tracing::warn!(worker = %ctx.name(), error = %err, "worker stopped with an error; restarting");
            true
        })
        .run_with_signal(async move {
            shutdown.await;
            Ok(())
        })
        .await
        .map_err(|e| RunnerError(e.to_string()));
    listener.abort();
    outcome
}
