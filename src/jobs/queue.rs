//! splitpay's job queues on apalis-postgres, and enqueueing inside the caller's transaction.
//!
//! Jobs are nudges; the tables are the truth. A job carries one id and the handler re-reads the row, so running it
//! twice is harmless. Each queue is named explicitly (apalis would name it after a Rust type, and renaming the type
//! would orphan the queue). Jobs are pushed with `apalis_postgres::queries::push_tasks` on the caller's connection,
//! so a job exists if and only if the state change that calls for it committed.

use std::time::Duration;

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
    /// Start the distribution of a succeeded split payment (a `spay_…` id): fee split, then one transfer job per
    /// allocation.
    Distribute,
    /// Make (or resolve) one allocation's transfer (a `salc_…` id).
    Transfer,
}

impl Queue {
    pub const ALL: [Queue; 3] = [Queue::StripeEvent, Queue::Distribute, Queue::Transfer];

    pub fn name(self) -> &'static str {
        match self {
            Queue::StripeEvent => "splitpay.stripe_event",
            Queue::Distribute => "splitpay.distribute",
            Queue::Transfer => "splitpay.transfer",
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
    if let Some(delay) = run_after {
        // apalis stores run_at in whole seconds: round up so a delay is never shortened.
        task = task.run_after(Duration::from_secs(
            delay.as_secs() + u64::from(delay.subsec_nanos() > 0),
        ));
    }
    apalis_postgres::queries::push_tasks(conn, queue.name(), vec![task.build()])
        .await
        .map_err(|e| StoreError::Invalid(format!("enqueue on {}: {e}", queue.name())))?;
    Ok(())
}

/// Creates apalis's own schema (`apalis.*`, with its migration history in `apalis._sqlx_migrations`, apart from
/// ours), so it can run beside splitpay's migrations.
pub async fn setup(pool: &sqlx::PgPool) -> Result<(), StoreError> {
    apalis_postgres::PostgresStorage::<()>::setup(pool)
        .await
        .map_err(|e| StoreError::Invalid(format!("apalis setup: {e}")))
}
