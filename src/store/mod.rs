//! PostgreSQL access through sqlx. Every state change and the events it causes are written in one transaction
//! (a transactional outbox); transitions are compare-and-set on the expected status and go through the domain's
//! state machines, so an impossible transition changes nothing.
//!
//! - [`catalog`]: organisations, recipient account links, recommendation sets (the platform's data we read).
//! - [`payments`], [`allocations`], [`donations`]: the three aggregates a payment is made of, and their transitions.
//! - [`transfer_attempts`]: transfer generations, retries and discrepancies; [`money_report`]: conservation terms.
//! - [`readiness`]: connected accounts' flags from `account.updated`, and the shares parked for account reasons.
//! - [`refunds`], [`reversals`]: refunds to donors, their parts per allocation, and the transfer reversals they cause.
//! - [`records`]: the Stripe event inbox, the outbound event outbox, the ops audit log, cron tick claims.

pub mod allocations;
pub mod announce;
pub mod catalog;
pub mod disputes;
pub mod donations;
pub mod gauges;
pub mod money_report;
pub mod payments;
pub mod rate_limits;
pub mod readiness;
pub mod records;
pub mod refund_terms;
pub mod refunds;
pub mod reversals;
pub mod transfer_attempts;
pub mod webhooks;

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{PgPool, Postgres};

use crate::config::{redact_url, DatabaseConfig};
use crate::domain::state::ForbiddenTransition;

/// The schema, embedded at build time from `migrations/`.
/// Without sqlx's own lock: [`migrate_then`] takes one that cannot deadlock with `CREATE INDEX CONCURRENTLY`.
pub static MIGRATOR: std::sync::LazyLock<sqlx::migrate::Migrator> = std::sync::LazyLock::new(|| {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_locking(false);
    migrator
});

/// The advisory lock one process at a time applies migrations under (any constant; splitpay's own).
const MIGRATION_LOCK_ID: i64 = 0x5350_4c49_5450_4159; // "SPLITPAY"
/// Indexes a migration builds `CONCURRENTLY` under a name of their own (see `migrate_locked`).
const INDEXES_BUILT_CONCURRENTLY: &[&str] = &["split_allocations_transferred_unique"];
/// How often the session holding the migration lock speaks while the job queue's setup runs on other connections,
/// well within its `idle_session_timeout` (60 s).
const MIGRATION_KEEPALIVE_MS: u64 = 20_000;
/// How often a process waiting for another's migrations asks for the lock again.
const MIGRATION_LOCK_POLL_MS: u64 = 200;

/// How long to wait for a pooled connection before failing the operation (and letting its job retry).
const DB_ACQUIRE_TIMEOUT_MS: u64 = 5_000;

/// Statements that run longer are cut off by PostgreSQL: no query of ours should, and a stuck one must not hold
/// row locks that the workers need.
const DB_STATEMENT_TIMEOUT_MS: u64 = 30_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{what} '{id}' not found")]
    NotFound { what: &'static str, id: String },
    #[error(transparent)]
    Forbidden(#[from] ForbiddenTransition),
    /// The row changed between our read and our compare-and-set update: another worker won the race.
    #[error("{what} '{id}' changed concurrently; expected status {expected}")]
    LostRace {
        what: &'static str,
        id: String,
        expected: String,
    },
    /// A row in the database breaks a rule the code relies on (a bug or a manual edit).
    #[error("corrupt {what} '{id}': {reason}")]
    Corrupt {
        what: &'static str,
        id: String,
        reason: String,
    },
    /// The caller asked for something the data does not allow.
    #[error("{0}")]
    Invalid(String),
    /// A job could not be enqueued (the job tables refused the insert): transient, never a contradiction; the
    /// caller's transaction is rolled back and the work is tried again.
    #[error("enqueue failed: {0}")]
    Enqueue(String),
}

impl StoreError {
    /// The name of the violated constraint, when PostgreSQL refused a write (our constraints are named for
    /// exactly this).
    pub fn constraint(&self) -> Option<&str> {
        match self {
            StoreError::Db(sqlx::Error::Database(e)) => e.constraint(),
            _ => None,
        }
    }
}

pub type Tx<'a> = sqlx::Transaction<'a, Postgres>;

/// Creates the database named in the URL if it is missing (the default local setup needs no manual step).
pub async fn ensure_database(config: &DatabaseConfig) -> Result<(), StoreError> {
    let url = config.url.expose();
    if !Postgres::database_exists(url).await? {
        tracing::info!(database = %redact_url(url), "creating database");
        match Postgres::create_database(url).await {
            Ok(()) => {}
            // Two processes starting at once: the other one created it.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A pool with explicit limits (see the constants above) rather than sqlx's defaults.
pub async fn connect(config: &DatabaseConfig) -> Result<PgPool, StoreError> {
    let url = config.url.expose();
    let mut options = PgConnectOptions::from_str(url)?
        .options([("statement_timeout", DB_STATEMENT_TIMEOUT_MS.to_string())])
        .application_name("splitpay");
    if plain_text_for_loopback(url, std::env::var("PGSSLMODE").ok().as_deref(), options.get_host()) {
        options = options.ssl_mode(PgSslMode::Disable);
    }
    let pool = PgPoolOptions::new()
        .max_connections(config.pool_max)
        .acquire_timeout(Duration::from_millis(DB_ACQUIRE_TIMEOUT_MS))
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Gap in sqlx: its default `sslmode=prefer` negotiates TLS with any server that offers it, a local one too
/// (Debian's PostgreSQL does, with its snakeoil certificate). Over loopback that encrypts every statement for no
/// protection, at a CPU cost the benchmark measured (notes in README's Benchmark section). So unless the URL or
/// `PGSSLMODE` names a mode, a connection to a loopback address or a Unix socket is made in plain text; any other
/// host keeps sqlx's default.
fn plain_text_for_loopback(url: &str, pgsslmode: Option<&str>, host: &str) -> bool {
    let url_names_mode = url
        .split_once('?')
        .is_some_and(|(_, query)| query.split('&').any(|kv| kv.starts_with("sslmode=")));
    let loopback = host.starts_with('/')
        || host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    loopback && !url_names_mode && pgsslmode.is_none_or(str::is_empty)
}

/// Applies every pending migration; running it again is a no-op. See [`migrate_then`].
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    migrate_then(pool, || async { Ok(()) }).await
}

/// Applies every pending migration, then runs `then` (the job queue's own setup) under the same lock: processes
/// starting together (`serve` and workers on a fresh database) prepare the database one at a time.
///
/// On one connection without the pool's statement and lock timeouts (a role's or database's setting included): an
/// index built on a large table may take longer than a request may, and its wait for older snapshots counts as a
/// lock wait; each migration that needs a bound sets its own. A session that goes quiet (its process frozen, the
/// network gone without a word) is ended by the server instead of holding the lock, or a table's lock inside a
/// migration's transaction, until TCP notices. The connection is closed afterwards rather than handed back to the
/// pool with these settings.
///
/// Gap in sqlx: its migrator waits for its advisory lock inside a statement (`SELECT pg_advisory_lock`), holding a
/// snapshot, and `CREATE INDEX CONCURRENTLY` waits for every older snapshot to end, so a second process starting
/// while the first builds an index deadlocks with it and PostgreSQL aborts the second (tried here). The lock is taken
/// here instead, by asking with `pg_try_advisory_lock` until it is free, holding no snapshot in between.
pub async fn migrate_then<F, Fut>(pool: &PgPool, then: F) -> Result<(), StoreError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), StoreError>>,
{
    let mut conn = pool.acquire().await?.detach();
    let applied = match migrate_locked(&mut conn).await {
        Ok(()) => locked_while(&mut conn, then()).await,
        Err(e) => Err(e),
    };
    // Closing the connection also ends its session's advisory lock, whatever happened above.
    sqlx::Connection::close(conn).await.ok();
    applied
}

/// Runs `work` (on other connections) while the lock's session stays busy: that session ends itself after
/// `idle_session_timeout` quiet, and with it the lock, which a second process would then take while `work` still runs.
/// A session that can no longer answer fails the start: the lock may be gone.
async fn locked_while<Fut>(conn: &mut sqlx::PgConnection, work: Fut) -> Result<(), StoreError>
where
    Fut: std::future::Future<Output = Result<(), StoreError>>,
{
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return done,
            () = tokio::time::sleep(Duration::from_millis(MIGRATION_KEEPALIVE_MS)) => {
                sqlx::query("SELECT 1").execute(&mut *conn).await?;
            }
        }
    }
}

async fn migrate_locked(conn: &mut sqlx::PgConnection) -> Result<(), StoreError> {
    sqlx::raw_sql(
        "SET statement_timeout = 0; SET lock_timeout = 0;
         SET idle_in_transaction_session_timeout = '10s'; SET idle_session_timeout = '60s'",
    )
    .execute(&mut *conn)
    .await?;
    let mut waited = false;
    while !sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
        .bind(MIGRATION_LOCK_ID)
        .fetch_one(&mut *conn)
        .await?
    {
        if !waited {
            tracing::info!("waiting for another process to finish applying migrations");
            waited = true;
        }
        tokio::time::sleep(Duration::from_millis(MIGRATION_LOCK_POLL_MS)).await;
    }
    // A build CONCURRENTLY that was interrupted (its process killed, the server restarted) leaves its index invalid,
    // and the migration's IF NOT EXISTS would then keep it: drop it, so the migration builds it again. No process is
    // building it now: a build runs under this lock, and a session holds the lock until its statement has ended. The
    // name is resolved as the DROP resolves it (the search path).
    for name in INDEXES_BUILT_CONCURRENTLY {
        if index_valid(conn, name).await? == Some(false) {
            tracing::warn!(
                index = name,
                "dropping an index an interrupted build left invalid; it is built again"
            );
            drop_index_concurrently(conn, name).await?;
        }
    }
    MIGRATOR.run(&mut *conn).await?;
    Ok(())
}

/// Whether the index `name` (resolved as a DROP resolves it: the search path, or the schema it names) is valid;
/// `None` when there is none. An interrupted build `CONCURRENTLY` leaves its index invalid.
pub(crate) async fn index_valid(conn: &mut sqlx::PgConnection, name: &str) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)")
        .bind(name)
        .fetch_optional(conn)
        .await
}

/// Drops the index `name`, if there is one, without blocking writers (`CONCURRENTLY`: never inside a transaction).
pub(crate) async fn drop_index_concurrently(conn: &mut sqlx::PgConnection, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP INDEX CONCURRENTLY IF EXISTS {name}")))
        .execute(conn)
        .await?;
    Ok(())
}

pub(crate) fn corrupt(what: &'static str, id: &str, reason: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what,
        id: id.to_owned(),
        reason: reason.to_string(),
    }
}

pub(crate) fn forbidden(err: ForbiddenTransition, id: &str) -> StoreError {
    tracing::error!(
        machine = err.machine,
        from = err.from,
        event = err.event,
        id,
        "forbidden transition refused"
    );
    metrics::counter!("splitpay_forbidden_transitions_total", "machine" => err.machine, "event" => err.event)
        .increment(1);
    StoreError::Forbidden(err)
}

/// Plans this transaction's statements once per connection (PostgreSQL's generic plan), instead of planning each
/// execution for its parameters: for the hot path's batches, whose every statement reads and writes by id (`= ANY`,
/// `unnest`) and whose plans do not depend on the values, planning was a tenth of PostgreSQL's CPU (issue 11, `perf`).
/// Never for a statement whose plan should depend on a bound value (a status matched against a partial index's
/// predicate): `SET LOCAL` keeps the choice inside this transaction.
///
/// Sequential scans are ruled out too (`enable_seqscan = off`, where another path exists). A generic plan is made
/// once, on the statistics of that moment, and kept until an (auto)analyze of a table it reads: made while a table
/// was nearly empty (a fresh database, the first batch after a start) it read the table through, and went on
/// reading it through every batch as the table grew (auto_explain in burn-down: the record batch's attempts update
/// scanned `transfer_attempts` sequentially for the whole run). Every statement run this way finds its rows by key.
/// PostgreSQL does not plan again when a setting changes: a statement a batch shares with other paths must not be
/// kept by them (see `allocations::Caller`).
pub async fn generic_plans(tx: &mut sqlx::PgConnection) -> Result<(), StoreError> {
    // One statement (set_config's third argument: local to the transaction), not two SETs.
    sqlx::query(
        "SELECT set_config('plan_cache_mode', 'force_generic_plan', true), set_config('enable_seqscan', 'off', true)",
    )
    .execute(tx)
    .await?;
    Ok(())
}

/// Ends [`generic_plans`] for the rest of this transaction: plans chosen as the server, database or role is
/// configured again.
pub async fn custom_plans(tx: &mut sqlx::PgConnection) -> Result<(), StoreError> {
    sqlx::raw_sql("SET LOCAL plan_cache_mode TO DEFAULT; SET LOCAL enable_seqscan TO DEFAULT")
        .execute(tx)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::plain_text_for_loopback as plain;

    #[test]
    fn loopback_is_plain_text_unless_a_mode_is_named() {
        let local = "postgres://postgres@127.0.0.1:5432/splitpay";
        assert!(plain(local, None, "127.0.0.1"));
        assert!(plain("postgres://postgres@localhost/splitpay", None, "localhost"));
        assert!(plain("postgres://postgres@[::1]/splitpay", None, "[::1]"));
        assert!(plain("postgres:///splitpay", None, "/var/run/postgresql"));
        assert!(plain(local, Some(""), "127.0.0.1"));
        // A mode named in the URL or PGSSLMODE is the user's.
        assert!(!plain(&format!("{local}?sslmode=require"), None, "127.0.0.1"));
        assert!(!plain(
            &format!("{local}?application_name=x&sslmode=prefer"),
            None,
            "127.0.0.1"
        ));
        assert!(!plain(local, Some("require"), "127.0.0.1"));
        // Any other host keeps sqlx's default (prefer TLS).
        assert!(!plain("postgres://u@db.internal/splitpay", None, "db.internal"));
        assert!(!plain("postgres://u@10.0.0.5/splitpay", None, "10.0.0.5"));
    }
}
