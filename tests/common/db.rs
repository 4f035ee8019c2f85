//! A fresh, migrated PostgreSQL database per test, dropped when the test ends (pass or fail).
//!
//! The server comes from `DATABASE_URL` (default: the local PostgreSQL splitpay uses). We do not use
//! `#[sqlx::test]`: it needs `DATABASE_URL` to name an existing database to use as its master, which would make
//! the tests depend on setup steps (or point `cargo run` at the maintenance database); this fixture connects to the
//! server's `postgres` database to create and drop its own.

use std::str::FromStr;

pub use splitpay::config::url_with_database;
use splitpay::config::DATABASE_URL_DEFAULT;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

/// Connections per test database: enough for the concurrency tests, small enough for many tests in parallel.
const TEST_POOL_MAX: u32 = 8;

pub struct TestDb {
    pub pool: PgPool,
    /// A URL to this database, for child processes.
    pub url: String,
    _guard: DropDatabase,
}

/// Drops the named database (terminating its connections) when it goes out of scope.
pub struct DropDatabase(pub String);

impl Drop for DropDatabase {
    fn drop(&mut self) {
        // Drop may run inside the test's runtime, which cannot be blocked on: use a thread with its own.
        let name = self.0.clone();
        let dropped = std::thread::spawn(move || {
            let admin = PgConnectOptions::from_str(&server_url())?.database("postgres");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let mut conn = PgConnection::connect_with(&admin).await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
                Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("note: test database {} was not dropped", self.0);
        }
    }
}

pub fn server_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DATABASE_URL_DEFAULT.to_owned())
}

impl TestDb {
    /// Creates an empty database (no schema); for tests of `splitpay migrate` itself.
    pub async fn empty() -> Self {
        let base = server_url();
        let options = PgConnectOptions::from_str(&base).expect("DATABASE_URL is a postgres URL");
        let admin = options.clone().database("postgres");
        let name = format!("splitpay_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect_with(&admin)
            .await
            .expect("PostgreSQL is reachable (see README)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.ok();
        let pool = PgPoolOptions::new()
            .max_connections(TEST_POOL_MAX)
            .connect_with(options.database(&name))
            .await
            .unwrap();
        TestDb {
            pool,
            url: url_with_database(&base, &name),
            _guard: DropDatabase(name),
        }
    }

    /// Creates a database with splitpay's schema.
    pub async fn new() -> Self {
        let db = Self::empty().await;
        splitpay::store::migrate(&db.pool).await.expect("migrations apply");
        db
    }
}

/// Waits until `n` backends of this database wait on a lock.
pub async fn until_waiting_on_locks(pool: &sqlx::PgPool, n: i64) {
    for _ in 0..500 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("{n} transactions never waited on a lock");
}
