//! Runs the periodic jobs of `jobs/schedule.toml`, once per tick across all replicas.
//!
//! Gap filled here: apalis-cron runs every tick in every replica (apalis issue #281) and a worker whose handler
//! outlasts the period dies ("Tick out of range"). So each replica computes the ticks itself from the `cron`
//! expressions, sleeps until the next one, and claims `(job, tick)` in `cron_claims`: the one replica whose insert
//! wins runs it. Missed ticks are not caught up (the next tick does the same work).

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

use chrono::Utc;
use sqlx::PgPool;

use super::schedule::Schedule;
use crate::app::AppContext;
use crate::store::records::claim_cron_tick;

pub type CronFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
pub type CronJob = Arc<dyn Fn() -> CronFuture + Send + Sync>;

/// Runs every job of `schedule` that has an entry in `jobs` until `shutdown` resolves. Scheduled names without an
/// implementation are reported once at start, not run.
pub async fn run(
    pool: PgPool,
    schedule: Schedule,
    jobs: Vec<(&'static str, CronJob)>,
    replica: String,
    shutdown: impl Future<Output = ()> + Send,
) {
    let mut loops = Vec::new();
    for (name, entry) in schedule.jobs {
        let Some((_, job)) = jobs.iter().find(|(n, _)| *n == name) else {
            tracing::warn!(job = %name, "scheduled but not built yet; not run");
            continue;
        };
        let expression = cron::Schedule::from_str(&entry.cron).expect("checked when the schedule was parsed");
        let (pool, job, replica) = (pool.clone(), job.clone(), replica.clone());
        loops.push(tokio::spawn(async move {
            loop {
                let Some(tick) = expression.upcoming(Utc).next() else {
                    return;
                };
                let wait = (tick - Utc::now()).to_std().unwrap_or_default();
                tokio::time::sleep(wait).await;
                let claimed = match pool.acquire().await {
                    Ok(mut conn) => claim_cron_tick(&mut conn, &name, tick, &replica).await,
                    Err(e) => Err(e.into()),
                };
                match claimed {
                    Ok(true) => {
                        let started = std::time::Instant::now();
                        job().await;
                        metrics::histogram!("splitpay_cron_tick_duration_seconds", "job" => name.clone())
                            .record(started.elapsed().as_secs_f64());
                    }
                    Ok(false) => {} // another replica has this tick
                    Err(e) => tracing::warn!(job = %name, error = %e, "could not claim a cron tick"),
                }
            }
        }));
    }
    shutdown.await;
    for handle in loops {
        handle.abort();
    }
}

/// Runs one tick of a periodic job under `limit`, logging (never propagating) a failure or a timeout: the next
/// tick does the same work.
async fn bounded<T, E: std::fmt::Display>(
    name: &'static str,
    limit: std::time::Duration,
    tick: impl Future<Output = Result<T, E>>,
) {
    match tokio::time::timeout(limit, tick).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(job = name, error = %e, "periodic job failed"),
        Err(_) => tracing::warn!(job = name, "periodic job timed out"),
    }
}

/// The periodic jobs of the schedule, over the worker's context.
pub fn jobs(ctx: AppContext) -> Vec<(&'static str, CronJob)> {
    use super::reconcile::{reconcile_pending, reconcile_transfers, ReconcileOptions, RECONCILE_TIMEOUT};
    use super::sweeper::{sweep, SWEEP_GRACE_SECS, SWEEP_TIMEOUT};
    let ctx = Arc::new(ctx);
    let sweep_ctx = ctx.clone();
    let sweeper: CronJob = Arc::new(move || {
        let ctx = sweep_ctx.clone();
        Box::pin(async move { bounded("sweeper", SWEEP_TIMEOUT, sweep(&ctx.pool, SWEEP_GRACE_SECS)).await })
    });
    let pending_ctx = ctx.clone();
    let pending: CronJob = Arc::new(move || {
        let ctx = pending_ctx.clone();
        Box::pin(async move {
            let opts = ReconcileOptions::default();
            bounded("reconcile-pending", RECONCILE_TIMEOUT, reconcile_pending(&ctx, &opts)).await;
            // The events sweep rides on the pending tick: refund and dispute events whose webhook was lost.
            bounded(
                "events-sweep",
                RECONCILE_TIMEOUT,
                super::event_sweep::sweep_events(&ctx),
            )
            .await;
            // So does the accounts sweep: connected accounts fixed while their `account.updated` was lost.
            bounded(
                "accounts-sweep",
                RECONCILE_TIMEOUT,
                super::account_sweep::sweep_accounts(&ctx),
            )
            .await
        })
    });
    let transfers: CronJob = Arc::new(move || {
        let ctx = ctx.clone();
        Box::pin(async move {
            let opts = ReconcileOptions::default();
            bounded(
                "reconcile-transfers",
                RECONCILE_TIMEOUT,
                reconcile_transfers(&ctx, &opts),
            )
            .await;
            // The refunds sweep rides on the transfers tick: parts whose transfer settled, overdue reversals.
            bounded(
                "reconcile-refunds",
                RECONCILE_TIMEOUT,
                super::refunds::reconcile_refunds(&ctx),
            )
            .await
        })
    });
    vec![
        ("sweeper", sweeper),
        ("reconcile-pending", pending),
        ("reconcile-transfers", transfers),
    ]
}
