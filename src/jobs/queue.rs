//! splitpay's job queues on apalis-postgres, and enqueueing inside the caller's transaction.
//!
//! Jobs are nudges; the tables are the truth. A job carries one id and the handler re-reads the row, so running it
//! twice is harmless. Each queue is named explicitly (apalis would name it after a Rust type, and renaming the type
//! would orphan the queue). Jobs are pushed with `apalis_postgres::queries::push_tasks` on the caller's connection,
//! so a job exists if and only if the state change that calls for it committed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apalis::prelude::TaskBuilder;
use sqlx::PgConnection;

use crate::store::StoreError;

/// apalis retries a failed job immediately, up to this many times; splitpay's handlers do their own delayed
/// retries (a follow-up job with `run_after`), so a handler error is rare and a few immediate retries suffice.
pub const JOB_ATTEMPTS_MAX: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Queue {
    /// Apply one stored Stripe event (an `evt_…` id from the inbox).
    StripeEvent,
    /// Start the distribution of a succeeded split payment (a `spay_…` id) when the event job could not: fee split,
    /// then each allocation's first transfer, made at once (a transfer job only for a step that did not finish).
    Distribute,
    /// Make (or resolve) one allocation's transfer (a `salc_…` id).
    Transfer,
    /// Deliver one outbound event to one webhook endpoint (a `whdl_…` id).
    Deliver,
    /// Make (or retry) one transfer reversal (a `transfer_reversals` id).
    Reversal,
}

impl Queue {
    pub const ALL: [Queue; 5] = [
        Queue::StripeEvent,
        Queue::Distribute,
        Queue::Transfer,
        Queue::Deliver,
        Queue::Reversal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Queue::StripeEvent => "splitpay.stripe_event",
            Queue::Distribute => "splitpay.distribute",
            Queue::Transfer => "splitpay.transfer",
            Queue::Deliver => "splitpay.deliver",
            Queue::Reversal => "splitpay.reversal",
        }
    }
}

/// The payload of every job: the id of the row to work on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRef {
    pub id: String,
}

/// Enqueues a job on `conn` (use the transaction of the state change that calls for it).
pub async fn enqueue(
    conn: &mut PgConnection,
    queue: Queue,
    id: &str,
    run_after: Option<Duration>,
) -> Result<(), StoreError> {
    let payload = serde_json::to_vec(&JobRef { id: id.to_owned() }).expect("a JobRef serialises");
    let mut task = TaskBuilder::new(payload).max_attempts(JOB_ATTEMPTS_MAX);
    match run_after {
        Some(delay) => task = task.run_at_time(whole_second_after(SystemTime::now() + delay)),
        None => task = due_now(task),
    }
    apalis_postgres::queries::push_tasks(conn, queue.name(), vec![task.build()])
        .await
        .map_err(|e| StoreError::Enqueue(format!("on {}: {e}", queue.name())))?;
    Ok(())
}

/// `at` rounded up to a whole second. apalis stores `run_at` in whole seconds and truncates: rounding only the delay
/// up (as `run_after` does) still let a job run up to a second before the time its row was scheduled for, and a
/// handler that checks that time took itself for an early duplicate and left the work to the sweeper.
fn whole_second_after(at: SystemTime) -> SystemTime {
    let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs() + u64::from(since_epoch.subsec_nanos() > 0);
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// A job due at once, stamped a second in the past. apalis's insert trigger notifies only when `run_at <= now()`,
/// and `now()` is when the inserting transaction *began*, while apalis would stamp the current second: a
/// transaction that began in the previous second would insert its job silently (no NOTIFY, so no prompt pickup).
fn due_now<T>(task: TaskBuilder<T>) -> TaskBuilder<T> {
    task.run_at_time(SystemTime::now() - Duration::from_secs(1))
}

/// `enqueue_missing`'s check: which of the ids `$2` (with their payloads `$3`) have no job waiting on queue `$1`
/// (one probe of `splitpay_jobs_waiting_payload` per id). Public so `tests/scale.rs` can `EXPLAIN` it.
pub const JOBS_MISSING_SQL: &str = "SELECT p.id FROM unnest($2::text[], $3::bytea[]) AS p(id, job)
          WHERE NOT EXISTS (
                SELECT 1 FROM apalis.jobs j
                 WHERE j.job_type = $1 AND j.job = p.job
                   AND j.status IN ('Pending', 'Queued', 'Failed')
                   AND (j.status <> 'Failed' OR j.attempts < j.max_attempts))";

/// Enqueues a job for each id of `ids` that has no job waiting on `queue` yet (pending, queued, or failed with
/// attempts left), in one statement pair on `conn`. Returns the ids enqueued. The sweeper and the reconcilers use
/// it, so a sweep never adds a second job for work that already has one waiting.
pub async fn enqueue_missing(conn: &mut PgConnection, queue: Queue, ids: &[String]) -> Result<Vec<String>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let payloads: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| serde_json::to_vec(&JobRef { id: id.clone() }).expect("a JobRef serialises"))
        .collect();
    let missing: Vec<(String,)> = sqlx::query_as(JOBS_MISSING_SQL)
        .bind(queue.name())
        .bind(ids)
        .bind(&payloads)
        .fetch_all(&mut *conn)
        .await?;
    let missing: Vec<String> = missing.into_iter().map(|(id,)| id).collect();
    if !missing.is_empty() {
        let tasks = missing
            .iter()
            .map(|id| {
                let payload = serde_json::to_vec(&JobRef { id: id.clone() }).expect("a JobRef serialises");
                due_now(TaskBuilder::new(payload).max_attempts(JOB_ATTEMPTS_MAX)).build()
            })
            .collect();
        apalis_postgres::queries::push_tasks(conn, queue.name(), tasks)
            .await
            .map_err(|e| StoreError::Enqueue(format!("on {}: {e}", queue.name())))?;
    }
    Ok(missing)
}

/// Creates apalis's own schema (`apalis.*`, with its migration history in `apalis._sqlx_migrations`, apart from
/// ours), so it can run beside splitpay's migrations.
pub async fn setup(pool: &sqlx::PgPool) -> Result<(), StoreError> {
    apalis_postgres::PostgresStorage::<()>::setup(pool)
        .await
        .map_err(|e| StoreError::Invalid(format!("apalis setup: {e}")))?;
    // Gap filled here: apalis indexes waiting jobs by type and run time only, so "is a job for this row already
    // waiting?" (`enqueue_missing`) would scan every waiting job of the queue. This index answers it directly.
    // Created only when missing: `CREATE INDEX IF NOT EXISTS` takes its table lock before it finds the index there,
    // and, queued behind any transaction on the jobs table, would hold up every job insert at each start.
    let missing: bool = sqlx::query_scalar("SELECT to_regclass('apalis.splitpay_jobs_waiting_payload') IS NULL")
        .fetch_one(pool)
        .await?;
    if missing {
        sqlx::query(
            "CREATE INDEX IF NOT EXISTS splitpay_jobs_waiting_payload ON apalis.jobs (job_type, job)
              WHERE status IN ('Pending', 'Queued', 'Failed')",
        )
        .execute(pool)
        .await?;
    }
    drop_duplicate_indexes(pool).await;
    Ok(())
}

/// How long a duplicate index's drop waits for the transactions on its table before it gives up until the next start.
pub const DUPLICATE_DROP_LOCK_TIMEOUT_MS: u64 = 5_000;

/// Gap filled here (issue 11): apalis's first migration indexed `id` and `lock_by` of its jobs (`unique_job_id`,
/// `lidx`), and later ones added the same again (the primary key `jobs_pkey`, `idx_apalis_jobs_lock_by`) without
/// dropping the first; its workers table has three such pairs (of which `unique_worker_id` stays: the foreign key
/// `jobs.lock_by → workers.id` was made on it). Nothing needs two: every job's insert and its two updates (locked,
/// done: never HOT) wrote both copies, four index entries per job that no plan reads.
///
/// Dropped `CONCURRENTLY` (no writer waits for it), on a session of its own without the pool's statement timeout (a
/// long history of jobs). A drop waits for every transaction on its table to end; one that is still waiting after
/// [`DUPLICATE_DROP_LOCK_TIMEOUT_MS`] (a long report, a dump) gives up, with a warning, and the next start tries
/// again: an optimisation never holds a start. A drop cut short leaves the index invalid, which the next drop
/// removes as well. At later starts there is nothing left to drop.
async fn drop_duplicate_indexes(pool: &sqlx::PgPool) {
    let mut conn = match pool.acquire().await {
        Ok(conn) => conn.detach(),
        Err(e) => {
            tracing::warn!(error = %e, "apalis's duplicate indexes are left for the next start");
            return;
        }
    };
    let settings = format!("SET statement_timeout = 0; SET lock_timeout = {DUPLICATE_DROP_LOCK_TIMEOUT_MS}");
    if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(settings)).execute(&mut conn).await {
        tracing::warn!(error = %e, "apalis's duplicate indexes are left for the next start");
    } else {
        // Each duplicate, with the index that stays: a duplicate goes only once its twin is there and valid. One
        // that cannot go now does not keep the others.
        for (duplicate, kept) in [
            ("apalis.unique_job_id", "apalis.jobs_pkey"),
            ("apalis.lidx", "apalis.idx_apalis_jobs_lock_by"),
            ("apalis.wtidx", "apalis.idx_apalis_workers_worker_type"),
            ("apalis.lsidx", "apalis.idx_apalis_workers_last_seen"),
        ] {
            if let Err(e) = drop_duplicate(&mut conn, duplicate, kept).await {
                tracing::warn!(index = duplicate, error = %e, "a duplicate index is left for the next start");
            }
        }
    }
    sqlx::Connection::close(conn).await.ok();
}

/// Drops `duplicate` if it is there and its twin `kept` is there and valid.
async fn drop_duplicate(conn: &mut PgConnection, duplicate: &str, kept: &str) -> Result<(), sqlx::Error> {
    let present = crate::store::index_valid(conn, duplicate).await?.is_some();
    if present && crate::store::index_valid(conn, kept).await? == Some(true) {
        tracing::info!(index = duplicate, "dropping an index apalis made twice");
        crate::store::drop_index_concurrently(conn, duplicate).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A scheduled job is never due before its time, and at most a second after it.
        #[test]
        fn a_run_time_is_rounded_up_to_a_whole_second(nanos in 0u64..4_000_000_000_000_000_000) {
            let at = UNIX_EPOCH + Duration::from_nanos(nanos);
            let rounded = whole_second_after(at);
            let since = rounded.duration_since(UNIX_EPOCH).unwrap();
            prop_assert_eq!(since.subsec_nanos(), 0);
            prop_assert!(rounded >= at);
            prop_assert!(rounded.duration_since(at).unwrap() < Duration::from_secs(1));
        }
    }

    #[test]
    fn a_whole_second_stays_as_it_is() {
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(whole_second_after(at), at);
        assert_eq!(
            whole_second_after(at + Duration::from_nanos(1)),
            at + Duration::from_secs(1)
        );
    }
}
