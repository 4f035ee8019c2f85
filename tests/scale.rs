//! Issue 7, point 10 — indexed at scale. On 200,000 finished split payments (600,000 allocations, their transfer
//! attempts, a history of done jobs and processed Stripe events) plus a little live work, every statement a
//! periodic tick runs is planned with `EXPLAIN` exactly as the product sends it (the `…_SQL` constants the code
//! uses), with the parameter types it binds and the values a cron tick binds, under both custom and generic plans:
//! none may read `split_payments` or `split_allocations` sequentially (nor may `ops parked`, an operator's listing). Then real ticks run against the simulator:
//! their durations are printed (never asserted), each takes at most its batch, and a second sweep adds no job for
//! work whose job is still waiting.

mod common;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use common::flow::Flow;
use serde_json::Value;
use splitpay::app::ReconcileSettings;
use splitpay::domain::plan::AmountMode;
use splitpay::jobs::queue::{JobRef, Queue, JOBS_MISSING_SQL};
use splitpay::jobs::reconcile::{
    reconcile_pending, reconcile_transfers, ReconcileOptions, AUDIT_BATCH_MAX, AUDIT_DUE_SQL, AUDIT_RESCHEDULE_SQL,
    OVERDUE_TRANSFERS_SQL, PENDING_CANDIDATES_SQL, SCHEDULE_RECONCILE_SQL, UNDISTRIBUTED_SQL, UNRESOLVED_COUNT_SQL,
};
use splitpay::jobs::sweeper::{
    sweep, SWEEP_ALLOCATIONS_SQL, SWEEP_BATCH_MAX, SWEEP_EVENTS_SQL, SWEEP_GRACE_SECS, SWEEP_PAYMENTS_SQL,
};
use splitpay::jobs::{start_batch, transfer_batch};
use splitpay::ops::parked::PARKED_SQL;
use splitpay::store::gauges;
use splitpay::store::payments::{ALLOCATIONS_OF_PAYMENT_SQL, PAYMENT_BY_ID_SQL};
use splitpay::store::records::CLAIM_CRON_TICK_SQL;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};

const FINISHED: i64 = 200_000;
/// Live work (see `SEED_SQL`).
const OVERDUE_PAYMENTS: i64 = 250; // × 3 TRANSFERRING allocations, overdue
const AUDIT_DUE: i64 = 60;
const UNRESOLVED: i64 = 3;
const UNDISTRIBUTED: i64 = 600;
const UNPAID_NEVER_CHECKED: i64 = 130;
const UNPAID_DUE_AGAIN: i64 = 130;
const STALE_EVENTS: i64 = 5;
/// Allocations of overdue payments 101..=133 already have a transfer job waiting (99 jobs).
const WAITING_FROM: i64 = 101;
const WAITING_TO: i64 = 133;
/// The test's reconcile batch (production: 200), so a tick's Stripe calls stay few while the bound still bites.
const TEST_BATCH_MAX: i64 = 50;

/// Builds the data set in one transaction (a few seconds): see the comments in the SQL.
const SEED_SQL: &str = include_str!("scale_seed.sql");

async fn seed(pool: &PgPool) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::raw_sql(SEED_SQL).execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
}

async fn scalar(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// The load skipped the FK triggers: prove every reference resolves.
async fn assert_referential_integrity(pool: &PgPool) {
    let dangling = scalar(
        pool,
        "SELECT (SELECT count(*) FROM split_allocations a
                  WHERE NOT EXISTS (SELECT 1 FROM split_payments p WHERE p.id = a.split_payment_id)
                     OR NOT EXISTS (SELECT 1 FROM recommendation_allocations r WHERE r.id = a.recommendation_allocation_id)
                     OR NOT EXISTS (SELECT 1 FROM recipient_account_links l WHERE l.id = a.recipient_org_account_link_id))
              + (SELECT count(*) FROM transfer_attempts t
                  WHERE NOT EXISTS (SELECT 1 FROM split_allocations a WHERE a.id = t.split_allocation_id))
              + (SELECT count(*) FROM donations d
                  WHERE NOT EXISTS (SELECT 1 FROM split_allocations a WHERE a.id = d.split_allocation_id)
                     OR NOT EXISTS (SELECT 1 FROM organisations o WHERE o.id = d.organisation_id))
              + (SELECT count(*) FROM split_payments p
                  WHERE NOT EXISTS (SELECT 1 FROM recommendation_sets s WHERE s.id = p.recommendation_set_id)
                     OR NOT EXISTS (SELECT 1 FROM organisations o WHERE o.id = p.organisation_id))",
    )
    .await;
    assert_eq!(dangling, 0, "every seeded row's references resolve");
}

/// One statement a tick runs: its text (the product's constant), the types sqlx binds, and the values a cron tick
/// binds, as SQL expressions for `EXECUTE`.
struct TickQuery {
    name: &'static str,
    sql: &'static str,
    types: &'static str,
    args: String,
    /// The indexes its plan must use (custom and generic).
    indexes: &'static [&'static str],
}

/// Every plan node of an `EXPLAIN (FORMAT JSON)` result, depth first.
fn nodes(plan: &Value, out: &mut Vec<Value>) {
    out.push(plan.clone());
    for child in plan.get("Plans").and_then(Value::as_array).into_iter().flatten() {
        nodes(child, out);
    }
}

/// `jobs` is apalis's table, with a done job per finished payment; `transfer_attempts` and `donations` have one per
/// allocation, `stripe_events` one per payment.
const BIG_TABLES: [&str; 6] = [
    "split_payments",
    "split_allocations",
    "jobs",
    "transfer_attempts",
    "donations",
    "stripe_events",
];

/// The big tables that plan nodes `all` read sequentially.
fn seq_scanned(all: &[Value]) -> Vec<String> {
    all.iter()
        .filter(|n| n["Node Type"] == "Seq Scan")
        .filter_map(|n| n.get("Relation Name")?.as_str())
        .filter(|relation| BIG_TABLES.contains(relation))
        .map(str::to_owned)
        .collect()
}

/// `EXPLAIN` of `q` as a prepared statement, executed with its arguments, under the connection's settings.
async fn explain_prepared(conn: &mut PgConnection, q: &TickQuery) -> Value {
    let run = |sql: String| sqlx::query(AssertSqlSafe(sql)).persistent(false);
    run(format!("PREPARE tick_query{} AS {}", q.types, q.sql))
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", q.name));
    let explained: Value = sqlx::query_scalar(AssertSqlSafe(format!(
        "EXPLAIN (FORMAT JSON) EXECUTE tick_query{}",
        q.args
    )))
    .persistent(false)
    .fetch_one(&mut *conn)
    .await
    .unwrap_or_else(|e| panic!("{}: {e}", q.name));
    run("DEALLOCATE tick_query".into()).execute(&mut *conn).await.unwrap();
    explained
}

/// Plans `q` as a prepared statement under `mode` (`force_custom_plan` or `force_generic_plan`) and returns the
/// plan's nodes; panics, printing the plan, if one reads a big table sequentially.
async fn check_plan(conn: &mut PgConnection, q: &TickQuery, mode: &str) -> Vec<String> {
    sqlx::query(AssertSqlSafe(format!("SET plan_cache_mode = {mode}")))
        .persistent(false)
        .execute(&mut *conn)
        .await
        .unwrap();
    let explained = explain_prepared(conn, q).await;
    let mut all = Vec::new();
    nodes(&explained[0]["Plan"], &mut all);
    let pretty = serde_json::to_string_pretty(&explained).unwrap();
    let scanned = seq_scanned(&all);
    assert!(
        scanned.is_empty(),
        "{} ({mode}) scans {scanned:?} sequentially:\n{}\n{pretty}",
        q.name,
        q.sql
    );
    let used: Vec<&str> = all.iter().filter_map(|n| n.get("Index Name")?.as_str()).collect();
    for index in q.indexes {
        assert!(
            used.contains(index),
            "{} ({mode}) does not use {index}:\n{}\n{pretty}",
            q.name,
            q.sql
        );
    }
    all.iter()
        .filter_map(|n| {
            let node = n["Node Type"].as_str().unwrap_or("?");
            match (
                n.get("Relation Name").and_then(Value::as_str),
                n.get("Index Name").and_then(Value::as_str),
            ) {
                (Some(relation), Some(index)) => Some(format!("{node} on {relation} using {index}")),
                (Some(relation), None) => Some(format!("{node} on {relation}")),
                (None, Some(index)) => Some(format!("{node} using {index}")),
                (None, None) => None,
            }
        })
        .collect()
}

fn sql_array<T>(items: &[T], each: impl Fn(&T) -> String, ty: &str) -> String {
    let parts: Vec<String> = items.iter().map(each).collect();
    format!("ARRAY[{}]::{ty}", parts.join(", "))
}

/// The statements of the three periodic jobs, with a cron tick's values (production settings).
async fn tick_queries(pool: &PgPool) -> Vec<TickQuery> {
    let settings = ReconcileSettings::default();
    let ms = |v: u64| format!("now() - interval '{v} milliseconds'");
    let min_grace = settings.card_grace_ms.min(settings.debit_grace_ms);
    // enqueue_missing's input as the sweeper hands it over: the overdue allocations' ids and their job payloads.
    let ids: Vec<String> = sqlx::query_scalar(AssertSqlSafe(SWEEP_ALLOCATIONS_SQL))
        .bind(SWEEP_GRACE_SECS as f64)
        .bind(SWEEP_BATCH_MAX)
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(ids.len() as i64, SWEEP_BATCH_MAX);
    let payloads: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| serde_json::to_vec(&JobRef { id: id.clone() }).unwrap())
        .collect();
    let hex = |bytes: &Vec<u8>| {
        let mut s = String::from("'\\x");
        for b in bytes {
            write!(s, "{b:02x}").unwrap();
        }
        s + "'"
    };
    let some_payment = "'spay_t0000001'";
    let mut queries = vec![
        TickQuery {
            name: "sweeper: unprocessed events",
            sql: SWEEP_EVENTS_SQL,
            types: "(float8, int8)",
            args: format!("({}, {SWEEP_BATCH_MAX})", SWEEP_GRACE_SECS as f64),
            indexes: &["stripe_events_unprocessed"],
        },
        TickQuery {
            name: "sweeper: undistributed payments",
            sql: SWEEP_PAYMENTS_SQL,
            types: "(float8, int8)",
            args: format!("({}, {SWEEP_BATCH_MAX})", SWEEP_GRACE_SECS as f64),
            indexes: &["split_payments_undistributed"],
        },
        TickQuery {
            name: "sweeper: due transfers",
            sql: SWEEP_ALLOCATIONS_SQL,
            types: "(float8, int8)",
            args: format!("({}, {SWEEP_BATCH_MAX})", SWEEP_GRACE_SECS as f64),
            indexes: &["split_allocations_transferring_due"],
        },
        TickQuery {
            name: "enqueue_missing: jobs waiting",
            sql: JOBS_MISSING_SQL,
            types: "(text, text[], bytea[])",
            args: format!(
                "('{}', {}, {})",
                Queue::Transfer.name(),
                sql_array(&ids, |id| format!("'{id}'"), "text[]"),
                sql_array(&payloads, hex, "bytea[]")
            ),
            indexes: &["splitpay_jobs_waiting_payload"],
        },
        TickQuery {
            name: "reconcile-pending: candidates",
            sql: PENDING_CANDIDATES_SQL,
            types: "(timestamptz, timestamptz, int8)",
            args: format!("({}, now(), {})", ms(min_grace), settings.batch_max),
            indexes: &["split_payments_unreconciled", "split_payments_reconcile_due"],
        },
        TickQuery {
            name: "reconcile-pending: payment by id",
            sql: PAYMENT_BY_ID_SQL,
            types: "(text)",
            args: format!("({some_payment})"),
            indexes: &["split_payments_pkey"],
        },
        TickQuery {
            name: "reconcile-pending/-transfers: a payment's allocations",
            sql: ALLOCATIONS_OF_PAYMENT_SQL,
            types: "(text)",
            args: format!("({some_payment})"),
            indexes: &["split_allocations_one_per_set_allocation"],
        },
        TickQuery {
            name: "reconcile-pending: schedule",
            sql: SCHEDULE_RECONCILE_SQL,
            types: "(text, timestamptz)",
            args: format!("({some_payment}, now())"),
            indexes: &["split_payments_pkey"],
        },
        TickQuery {
            name: "reconcile-transfers: overdue transfers",
            sql: OVERDUE_TRANSFERS_SQL,
            types: "(timestamptz, int8)",
            args: format!("({}, {})", ms(settings.transfer_grace_ms), settings.batch_max),
            indexes: &["split_allocations_transferring_due"],
        },
        TickQuery {
            name: "reconcile-transfers: undistributed payments",
            sql: UNDISTRIBUTED_SQL,
            types: "(timestamptz, int8)",
            args: format!("({}, {})", ms(settings.transfer_grace_ms), settings.batch_max),
            indexes: &["split_payments_undistributed"],
        },
        TickQuery {
            name: "reconcile-transfers: audits due",
            sql: AUDIT_DUE_SQL,
            types: "(timestamptz, int8)",
            args: format!("(now(), {})", settings.batch_max.min(AUDIT_BATCH_MAX)),
            indexes: &["split_payments_audit_due"],
        },
        TickQuery {
            name: "reconcile-transfers: audit rescheduled",
            sql: AUDIT_RESCHEDULE_SQL,
            types: "(text, timestamptz)",
            args: format!("({some_payment}, now() + interval '7 days')"),
            indexes: &["split_payments_pkey"],
        },
        TickQuery {
            name: "reconcile-transfers: unresolved count",
            sql: UNRESOLVED_COUNT_SQL,
            types: "",
            args: String::new(),
            indexes: &["split_allocations_unresolved"],
        },
        // Not a tick, but an operator's listing that must stay cheap as payments pile up: from the partial index.
        TickQuery {
            name: "ops parked: all",
            sql: PARKED_SQL,
            types: "(text, int8, int8)",
            args: "(NULL, NULL, 501)".into(),
            indexes: &["split_allocations_parked"],
        },
        TickQuery {
            name: "ops parked: one organisation, older than 72h",
            sql: PARKED_SQL,
            types: "(text, int8, int8)",
            args: format!("('cm3orgrcp1', {}, 501)", 72 * 3_600_000),
            indexes: &["split_allocations_parked"],
        },
        TickQuery {
            name: "cron: tick claim",
            sql: CLAIM_CRON_TICK_SQL,
            types: "(text, timestamptz, text)",
            args: "('sweeper', date_trunc('minute', now()), 'replica-1')".into(),
            indexes: &[],
        },
        // Not a tick either: what every `/metrics` scrape reads (src/store/gauges.rs).
        TickQuery {
            name: "metrics: open payments",
            sql: gauges::OPEN_PAYMENTS_SQL,
            types: "",
            args: String::new(),
            indexes: &["split_payments_unreconciled", "split_payments_reconcile_due"],
        },
        TickQuery {
            name: "metrics: undistributed payments",
            sql: gauges::UNDISTRIBUTED_PAYMENTS_SQL,
            types: "",
            args: String::new(),
            indexes: &["split_payments_undistributed"],
        },
        TickQuery {
            name: "metrics: open allocations",
            sql: gauges::OPEN_ALLOCATIONS_SQL,
            types: "",
            args: String::new(),
            indexes: &[
                "split_allocations_transferring_due",
                "split_allocations_one_per_set_allocation",
                "split_payments_unreconciled",
                "split_payments_reconcile_due",
                "split_payments_undistributed",
            ],
        },
        TickQuery {
            name: "metrics: parked allocations",
            sql: gauges::PARKED_SQL,
            types: "",
            args: String::new(),
            indexes: &["split_allocations_parked"],
        },
        TickQuery {
            name: "metrics: job queues",
            sql: gauges::JOB_QUEUES_SQL,
            types: "(text[])",
            args: format!("({})", sql_array(&Queue::ALL, |q| format!("'{}'", q.name()), "text[]")),
            indexes: &["splitpay_jobs_waiting_payload"],
        },
        TickQuery {
            name: "metrics: open webhook deliveries",
            sql: gauges::OPEN_DELIVERIES_SQL,
            types: "",
            args: String::new(),
            indexes: &[],
        },
        TickQuery {
            name: "metrics: failed webhook deliveries",
            sql: gauges::FAILED_DELIVERIES_SQL,
            types: "",
            args: String::new(),
            indexes: &[],
        },
    ];
    queries.extend(hot_path_queries());
    queries
}

/// The statements of the hot path's batches (start and record), which run under forced generic plans
/// (`store::generic_plans`): each must find its rows by key on the big tables whatever the plan, with a batch of ten
/// shares of three payments as values.
fn hot_path_queries() -> Vec<TickQuery> {
    let payments: Vec<String> = (1..=4).map(|n| format!("spay_t{n:07}")).collect();
    let shares: Vec<String> = payments[..3]
        .iter()
        .flat_map(|p| (0..3).map(move |pos| format!("salc_{}{pos}", &p[5..])))
        .chain([format!("salc_{}0", &payments[3][5..])])
        .collect();
    let text = |items: &[String]| sql_array(items, |i| format!("'{i}'"), "text[]");
    let ints = |n: usize, v: &str| sql_array(&vec![v; n], |v| v.to_string(), "int4[]");
    let bigints = |n: usize, v: &str| sql_array(&vec![v; n], |v| v.to_string(), "int8[]");
    let times = |n: usize| sql_array(&vec!["now()"; n], |v| v.to_string(), "timestamptz[]");
    let events: Vec<String> = payments.iter().map(|p| format!("evt_{p}")).collect();
    let transfers: Vec<String> = shares.iter().map(|a| format!("tr_{a}")).collect();
    let keys: Vec<String> = shares
        .iter()
        .map(|a| format!("splitpay:alloc:{a}:transfer:1"))
        .collect();
    let n = shares.len();
    let m = payments.len();
    let statuses = |v: &str, k: usize| text(&vec![v.to_owned(); k]);
    vec![
        TickQuery {
            name: "start batch: lock events",
            sql: start_batch::LOCK_EVENTS_SQL,
            types: "(text[])",
            args: format!("({})", text(&events)),
            indexes: &["stripe_events_pkey"],
        },
        TickQuery {
            name: "start batch: lock payments",
            sql: start_batch::LOCK_PAYMENTS_SQL,
            types: "(text[])",
            args: format!("({})", text(&payments)),
            indexes: &["split_payments_pkey"],
        },
        TickQuery {
            name: "start batch: lock shares",
            sql: start_batch::LOCK_SHARES_SQL,
            types: "(text[])",
            args: format!("({})", text(&payments)),
            indexes: &["split_allocations_one_per_set_allocation"],
        },
        TickQuery {
            name: "start batch: share facts",
            sql: start_batch::SHARE_FACTS_SQL,
            types: "(text[])",
            args: format!("({})", text(&shares)),
            indexes: &["split_allocations_pkey"],
        },
        TickQuery {
            name: "start batch: payments succeeded",
            sql: start_batch::PAYMENTS_SUCCEEDED_SQL,
            types: "(text[], text[], text[], text[], timestamptz[], int8[], int8[], int8[])",
            args: format!(
                "({}, {}, {}, {}, {}, {}, {}, {})",
                text(&payments),
                statuses("PENDING", m),
                statuses("pi_x", m),
                statuses("ch_x", m),
                times(m),
                bigints(m, "150"),
                bigints(m, "0"),
                bigints(m, "0"),
            ),
            indexes: &["split_payments_pkey"],
        },
        TickQuery {
            name: "start batch: shares started",
            sql: start_batch::SHARES_STARTED_SQL,
            types: "(text[], int8[], int8[], text[], timestamptz)",
            args: format!(
                "({}, {}, {}, {}, now())",
                text(&shares),
                bigints(n, "25"),
                bigints(n, "975"),
                text(&keys)
            ),
            indexes: &["split_allocations_pkey"],
        },
        TickQuery {
            name: "start batch: events processed",
            sql: start_batch::EVENTS_PROCESSED_SQL,
            types: "(text[])",
            args: format!("({})", text(&events)),
            indexes: &["stripe_events_pkey"],
        },
        TickQuery {
            name: "record batch: lock shares",
            sql: transfer_batch::LOCK_SHARES_SQL,
            types: "(text[])",
            args: format!("({})", text(&shares)),
            indexes: &["split_allocations_pkey"],
        },
        TickQuery {
            name: "record batch: donations",
            sql: transfer_batch::DONATIONS_SQL,
            types: "(text[])",
            args: format!("({})", text(&shares)),
            indexes: &["donations_one_per_allocation"],
        },
        TickQuery {
            name: "record batch: attempts transferred",
            sql: transfer_batch::ATTEMPTS_TRANSFERRED_SQL,
            types: "(text[], int4[], text[])",
            args: format!("({}, {}, {})", text(&shares), ints(n, "1"), text(&transfers)),
            indexes: &["transfer_attempts_pk"],
        },
        TickQuery {
            name: "record batch: shares transferred",
            sql: transfer_batch::SHARES_TRANSFERRED_SQL,
            types: "(text[], int4[], text[], text, text)",
            args: format!(
                "({}, {}, {}, 'TRANSFERRED', 'TRANSFERRING')",
                text(&shares),
                ints(n, "1"),
                text(&transfers)
            ),
            // By key; a custom plan may take the partial index of the shares in flight instead (see below).
            indexes: &[],
        },
        TickQuery {
            name: "record batch: donations confirmed",
            sql: transfer_batch::DONATIONS_CONFIRMED_SQL,
            types: "(text[], text[], text[], timestamptz)",
            args: format!(
                "({}, {}, {}, now())",
                text(&shares),
                statuses("PENDING", n),
                statuses("CONFIRMED", n)
            ),
            indexes: &[],
        },
        TickQuery {
            name: "record batch: refund parts waiting",
            sql: transfer_batch::WAITING_PARTS_SQL,
            types: "(text[])",
            args: format!("({})", text(&shares)),
            // The seed has no refund part: a custom plan reads the empty table through. Under the batch's settings
            // the generic plan finds them by share (`the_batches_plans_find_rows_by_key_on_empty_tables`).
            indexes: &[],
        },
    ]
}

async fn waiting_jobs(pool: &PgPool) -> i64 {
    scalar(
        pool,
        "SELECT count(*) FROM apalis.jobs WHERE status IN ('Pending', 'Queued', 'Failed')",
    )
    .await
}

/// Payloads with more than one job waiting on the same queue.
async fn doubled_jobs(pool: &PgPool) -> i64 {
    scalar(
        pool,
        "SELECT count(*) FROM (SELECT 1 FROM apalis.jobs WHERE status IN ('Pending', 'Queued', 'Failed')
                                GROUP BY job_type, job HAVING count(*) > 1) d",
    )
    .await
}

async fn timed<T>(what: &str, f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let start = Instant::now();
    let out = f.await;
    let took = start.elapsed();
    println!("tick {what}: {took:?}");
    (out, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tick_query_is_index_backed_at_scale_and_ticks_are_bounded() {
    let started = Instant::now();
    let flow = Flow::start_full(AmountMode::Fixed, &[1_000, 2_000, 3_000], &[], false, |s| {
        s.reconcile.batch_max = TEST_BATCH_MAX;
    })
    .await;
    let pool = flow.db.pool.clone();
    seed(&pool).await;
    sqlx::raw_sql("ANALYZE").execute(&pool).await.unwrap();
    println!("seeded and analysed in {:?}", started.elapsed());
    assert_referential_integrity(&pool).await;
    let finished = scalar(
        &pool,
        "SELECT count(*) FROM split_payments WHERE status IN ('SUCCEEDED', 'FAILED', 'CANCELED')
            AND (status <> 'SUCCEEDED' OR id NOT IN (SELECT split_payment_id FROM split_allocations
                                                      WHERE status IN ('PENDING', 'TRANSFERRING')))",
    )
    .await;
    assert_eq!(finished, FINISHED);
    let live = OVERDUE_PAYMENTS + UNDISTRIBUTED + UNPAID_NEVER_CHECKED + UNPAID_DUE_AGAIN;
    assert_eq!(common::count(&pool, "split_payments").await, FINISHED + live);
    assert_eq!(common::count(&pool, "split_allocations").await, 3 * (FINISHED + live));

    // 1. Every tick statement, custom and generic plans: no sequential scan of the big tables. First, the check
    //    itself sees one where there is one.
    let mut conn = pool.acquire().await.unwrap();
    let control: Value =
        sqlx::query_scalar("EXPLAIN (FORMAT JSON) SELECT count(*) FROM split_allocations WHERE attempts >= 0")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    let mut all = Vec::new();
    nodes(&control[0]["Plan"], &mut all);
    assert_eq!(seq_scanned(&all), ["split_allocations"], "{control:#}");
    for q in tick_queries(&pool).await {
        for mode in ["force_custom_plan", "force_generic_plan"] {
            let scans = check_plan(&mut conn, &q, mode).await;
            println!("plan {} ({mode}): {}", q.name, scans.join("; "));
        }
    }
    // The record batch's share update runs under a generic plan, made once: it must find a batch's shares by key,
    // never read every share in flight through the partial index (what a literal status made it do).
    let shares_transferred = hot_path_queries()
        .into_iter()
        .find(|q| q.sql == transfer_batch::SHARES_TRANSFERRED_SQL)
        .unwrap();
    let scans = check_plan(
        &mut conn,
        &TickQuery {
            indexes: &["split_allocations_pkey"],
            ..shares_transferred
        },
        "force_generic_plan",
    )
    .await;
    assert!(
        !scans.iter().any(|s| s.contains("split_allocations_transferring_due")),
        "{scans:?}"
    );
    // A scrape's reading of the open work, at scale: its duration printed, its queue depth the jobs waiting.
    let names: Vec<&str> = Queue::ALL.iter().map(|q| q.name()).collect();
    let (open, _) = timed("metrics: open work", gauges::open_work(&mut conn, &names)).await;
    let open = open.unwrap();
    let transfer_depth = open
        .queues
        .iter()
        .find(|(q, _, _)| q == Queue::Transfer.name())
        .map(|(_, n, _)| *n);
    assert_eq!(transfer_depth, Some(3 * (WAITING_TO - WAITING_FROM + 1)), "{open:?}");
    assert_eq!(open.unresolved, UNRESOLVED, "{open:?}");
    drop(conn);

    // 2. Real ticks against the simulator (jobs only enqueued: no worker runs), timed and bounded.
    let ctx = &flow.ctx;
    let waiting_before = waiting_jobs(&pool).await;
    assert_eq!(waiting_before, 3 * (WAITING_TO - WAITING_FROM + 1));

    // The unpaid payments' PaymentIntents are unknown to the simulator: each check is one Stripe read that fails
    // (counted in `errors`), the same cost as a real check, and the payment is paced to its next interval.
    let (pending, _) = timed(
        "reconcile-pending",
        reconcile_pending(ctx, &ReconcileOptions::default()),
    )
    .await;
    let pending = pending.unwrap();
    println!("  {pending:?}");
    // Two kinds (never checked, due again), at most `batch_max` of each.
    assert_eq!(pending.checked as i64, 2 * TEST_BATCH_MAX, "{pending:?}");

    let (transfers, _) = timed(
        "reconcile-transfers",
        reconcile_transfers(ctx, &ReconcileOptions::default()),
    )
    .await;
    let transfers = transfers.unwrap();
    println!("  {transfers:?}");
    assert_eq!(transfers.transfers_driven as i64, TEST_BATCH_MAX, "{transfers:?}");
    assert_eq!(transfers.distributions as i64, TEST_BATCH_MAX, "{transfers:?}");
    assert_eq!(
        transfers.audited as i64,
        TEST_BATCH_MAX.min(AUDIT_BATCH_MAX),
        "{transfers:?}"
    );
    const { assert!(AUDIT_DUE > TEST_BATCH_MAX && AUDIT_DUE > AUDIT_BATCH_MAX) };
    assert_eq!(transfers.unresolved, UNRESOLVED);
    assert_eq!((transfers.discrepancies, transfers.errors), (0, 0), "{transfers:?}");

    let (first, _) = timed("sweeper", sweep(&pool, SWEEP_GRACE_SECS)).await;
    let first = first.unwrap();
    println!("  {first:?}");
    // The 500 most overdue transfers: 50 already enqueued by reconcile-transfers, 99 with a job already waiting.
    let already = TEST_BATCH_MAX + 3 * (WAITING_TO - WAITING_FROM + 1);
    const { assert!(3 * OVERDUE_PAYMENTS > SWEEP_BATCH_MAX && UNDISTRIBUTED > SWEEP_BATCH_MAX) };
    assert_eq!(first.transfers as i64, SWEEP_BATCH_MAX - already, "{first:?}");
    assert_eq!(
        first.distributions as i64,
        SWEEP_BATCH_MAX - TEST_BATCH_MAX,
        "{first:?}"
    );
    assert_eq!(first.stripe_events as i64, STALE_EVENTS, "{first:?}");
    let waiting = waiting_jobs(&pool).await;
    assert_eq!(
        waiting,
        waiting_before + 2 * TEST_BATCH_MAX + (first.transfers + first.distributions + first.stripe_events) as i64
    );

    // A second sweep right after: every row it picks has its job waiting, so it adds none.
    let (second, _) = timed("sweeper (again)", sweep(&pool, SWEEP_GRACE_SECS)).await;
    let second = second.unwrap();
    println!("  {second:?}");
    assert_eq!(second, Default::default());
    assert_eq!(waiting_jobs(&pool).await, waiting, "the second sweep added no job");
    assert_eq!(doubled_jobs(&pool).await, 0, "no work has two jobs waiting");

    // The next reconcile ticks take the next batches, still bounded, and add no second job either.
    let (pending, _) = timed(
        "reconcile-pending (next)",
        reconcile_pending(ctx, &ReconcileOptions::default()),
    )
    .await;
    let pending = pending.unwrap();
    println!("  {pending:?}");
    assert!(pending.checked as i64 <= 2 * TEST_BATCH_MAX, "{pending:?}");
    let (transfers, _) = timed(
        "reconcile-transfers (next)",
        reconcile_transfers(ctx, &ReconcileOptions::default()),
    )
    .await;
    let transfers = transfers.unwrap();
    println!("  {transfers:?}");
    assert_eq!(
        (transfers.transfers_driven, transfers.distributions),
        (0, 0),
        "{transfers:?}"
    );
    assert_eq!(
        transfers.audited as i64,
        AUDIT_DUE - TEST_BATCH_MAX.min(AUDIT_BATCH_MAX)
    );
    assert_eq!(doubled_jobs(&pool).await, 0, "no work has two jobs waiting");

    println!("scale test took {:?}", started.elapsed());
    flow.stop().await;
}

/// The other end of the scale: a fresh database, its tables empty and never analysed, as at a first deploy or the
/// bench's start. The batches' generic plans are made once per connection on the statistics of that moment and
/// kept while the tables grow, so, under the batches' own settings (`store::generic_plans`), none may read a big
/// table through (auto_explain caught the record batch's attempts update doing so for a whole burn-down), and the
/// lookups whose filter a partial index's predicate could match (shares in flight, unprocessed events, waiting refund
/// parts) find their rows by key: in burn-down the start batch's event lookup read the whole partial index of the
/// backlog, ~2,000 entries per batch.
#[tokio::test]
async fn the_batches_plans_find_rows_by_key_on_empty_tables() {
    let db = common::db::TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    for q in hot_path_queries() {
        let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
        splitpay::store::generic_plans(&mut tx).await.unwrap();
        let explained = explain_prepared(&mut tx, &q).await;
        tx.rollback().await.unwrap();
        let mut all = Vec::new();
        nodes(&explained[0]["Plan"], &mut all);
        let scanned = seq_scanned(&all);
        assert!(
            scanned.is_empty(),
            "{} scans {scanned:?} sequentially:\n{explained:#}",
            q.name
        );
        // Found by key, not through the partial index their filter could match (every share in flight, every
        // unprocessed event, every waiting refund part), which a backlog makes long before the next analyze.
        let by_key = [
            (transfer_batch::SHARES_TRANSFERRED_SQL, "split_allocations_pkey"),
            (start_batch::LOCK_EVENTS_SQL, "stripe_events_pkey"),
            (transfer_batch::WAITING_PARTS_SQL, "refund_parts_allocation"),
        ];
        if let Some((_, index)) = by_key.iter().find(|(sql, _)| *sql == q.sql) {
            let used: Vec<&str> = all.iter().filter_map(|n| n.get("Index Name")?.as_str()).collect();
            assert_eq!(used, [*index], "{}: {explained:#}", q.name);
        }
    }
}

/// PostgreSQL does not plan a kept statement again when a setting changes, so a statement the start batch shares
/// with the lone start (`insert_first_attempts`) must be kept only by the batch: kept by the lone path, its generic
/// plan would be made there, under the defaults, and reused by a batch on the same connection. Run alone six times
/// (PostgreSQL makes the generic plan at the sixth), it leaves no kept statement; run by the batch, it does.
#[tokio::test]
async fn a_statement_the_start_batch_shares_is_kept_only_by_the_batch() {
    use splitpay::store::allocations::{insert_first_attempts, Caller, FIRST_ATTEMPTS_SQL};
    let db = common::db::TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    let kept = async |tx: &mut sqlx::PgConnection| -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM pg_prepared_statements WHERE statement = $1")
            .bind(FIRST_ATTEMPTS_SQL)
            .fetch_one(tx)
            .await
            .unwrap()
    };
    for _ in 0..6 {
        let none = insert_first_attempts(&mut tx, Caller::Alone, &[], &[], &[], &[])
            .await
            .unwrap();
        assert!(none.is_empty());
    }
    assert_eq!(kept(&mut tx).await, 0, "the lone start keeps nothing");
    insert_first_attempts(&mut tx, Caller::Batch, &[], &[], &[], &[])
        .await
        .unwrap();
    assert_eq!(kept(&mut tx).await, 1, "the batch keeps its statement");
    tx.rollback().await.unwrap();
}
