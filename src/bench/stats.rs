//! What the benchmark measures: percentiles of latencies, and PostgreSQL's own counters for the bench database
//! (transactions from `pg_stat_database`, statements from `pg_stat_statements` when it is loaded).

use sqlx::PgPool;

/// The `q` quantile (0 < q ≤ 1) of `values` by the nearest-rank method; None when empty.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// p50 / p99 / max of `values_ms`, formatted (or "n/a").
pub fn summary_ms(values_ms: &[f64]) -> String {
    match (
        percentile(values_ms, 0.5),
        percentile(values_ms, 0.99),
        percentile(values_ms, 1.0),
    ) {
        (Some(p50), Some(p99), Some(max)) => format!("p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms"),
        _ => "n/a".to_owned(),
    }
}

/// PostgreSQL's counters for one database at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct PgCounters {
    /// Committed + rolled-back transactions (`pg_stat_database`).
    pub transactions: i64,
    /// Statements executed (`pg_stat_statements`, BEGIN/COMMIT included when it tracks utility statements), or
    /// None when the extension is not loaded.
    pub statements: Option<i64>,
}

/// Reads the counters of database `name`. Each call is itself one transaction and statements in that database:
/// callers subtract their own queries ([`BENCH_QUERY_COST`]).
pub async fn pg_counters(pool: &PgPool, name: &str, with_statements: bool) -> Result<PgCounters, sqlx::Error> {
    // Stats are a snapshot per transaction: clear it so this reading is fresh.
    sqlx::query("SELECT pg_stat_clear_snapshot()").execute(pool).await?;
    let (transactions,): (i64,) =
        sqlx::query_as("SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = $1")
            .bind(name)
            .fetch_one(pool)
            .await?;
    let statements = if with_statements {
        let (calls,): (Option<i64>,) = sqlx::query_as(
            "SELECT sum(calls)::bigint FROM pg_stat_statements
              WHERE dbid = (SELECT oid FROM pg_database WHERE datname = $1)",
        )
        .bind(name)
        .fetch_one(pool)
        .await?;
        Some(calls.unwrap_or(0))
    } else {
        None
    };
    Ok(PgCounters {
        transactions,
        statements,
    })
}

/// Whether `pg_stat_statements` can be read in this database (creating the extension, which needs it in
/// `shared_preload_libraries`).
pub async fn enable_statements(pool: &PgPool) -> bool {
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(pool)
        .await
        .is_ok()
        && sqlx::query("SELECT count(*) FROM pg_stat_statements LIMIT 1")
            .execute(pool)
            .await
            .is_ok()
}

/// Per-transfer cost between two readings, net of `own` transactions/statements the bench itself ran there.
pub fn per_transfer(before: PgCounters, after: PgCounters, own: i64, transfers: i64) -> (f64, Option<f64>) {
    let n = transfers.max(1) as f64;
    let transactions = (after.transactions - before.transactions - own).max(0) as f64 / n;
    let statements = match (before.statements, after.statements) {
        (Some(b), Some(a)) => Some((a - b - own).max(0) as f64 / n),
        _ => None,
    };
    (transactions, statements)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn per_transfer_subtracts_the_bench_own_queries() {
        let before = PgCounters {
            transactions: 100,
            statements: Some(1_000),
        };
        let after = PgCounters {
            transactions: 1_310,
            statements: Some(5_010),
        };
        assert_eq!(per_transfer(before, after, 10, 100), (12.0, Some(40.0)));
    }

    proptest! {
        #[test]
        fn percentile_is_a_member_and_monotonic(mut v in proptest::collection::vec(0.0f64..1e6, 1..200), q in 0.01f64..1.0) {
            let p = percentile(&v, q).unwrap();
            prop_assert!(v.contains(&p));
            prop_assert!(percentile(&v, 1.0).unwrap() >= p);
            v.sort_by(|a, b| a.total_cmp(b));
            prop_assert!(p >= v[0]);
        }
    }
}
