//! For the crash tests of the refund, reversal and dispute paths: `splitpay worker` as a child process (fast cron
//! ticks, short heartbeats) that a test SIGKILLs and restarts, `splitpay ops …` as a child it can kill mid-command,
//! and what the simulator holds (every transfer with every reversal, every refund), read over HTTP, checked
//! against splitpay's rows.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::flow::Flow;
// The crash tests take their helpers from here.
pub use super::process::{kill, Proc};
pub use super::refunds::scalar;

/// Every periodic job every second or two (the shipped schedule ticks at most once a minute): the refunds sweep
/// (reversals due, parts waiting, reinstatements waiting) runs in reconcile-transfers.
const FAST_SCHEDULE: &str = r#"
[jobs.reconcile-pending]
cron = "*/2 * * * * *"
description = "crash test: every 2 s"

[jobs.reconcile-transfers]
cron = "1/2 * * * * *"
description = "crash test: every 2 s"

[jobs.sweeper]
cron = "*/3 * * * * *"
description = "crash test: every 3 s"
"#;

/// Where the worker processes of one test keep their schedule and their log.
pub struct Workers {
    schedule: PathBuf,
    pub log: PathBuf,
}

impl Workers {
    pub fn new(tag: &str, seed: u64) -> Self {
        let dir = std::env::temp_dir().join(format!("splitpay-{tag}-{seed}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let schedule = dir.join("schedule.toml");
        std::fs::write(&schedule, FAST_SCHEDULE).unwrap();
        let log = dir.join("worker.log");
        println!("worker logs: {}", log.display());
        Workers { schedule, log }
    }

    /// A `splitpay worker` on the flow's database and simulator. Its log (warnings and errors) is appended to
    /// [`Workers::log`]. Killed when dropped, so a failing test leaves no worker behind.
    pub fn spawn(&self, flow: &Flow) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("the worker log opens");
        Command::new(env!("CARGO_BIN_EXE_splitpay"))
            .arg("worker")
            .env("DATABASE_URL", &flow.db.url)
            .env("STRIPE_SECRET_KEY", super::stripe::TEST_KEY)
            .env("STRIPE_API_BASE", flow.sim.base_url())
            .env("STRIPE_RATE_PER_SEC", "500")
            .env("STRIPE_TIMEOUT_MS", "5000")
            .env("SPLITPAY_WORKER_CONCURRENCY", "4")
            // A killed worker's jobs come back after 1 s × 3 (production: 10 s × 6).
            .env("SPLITPAY_WORKER_HEARTBEAT_MS", "1000")
            .env("SPLITPAY_WORKER_MISSED_HEARTBEATS", "3")
            .env("SPLITPAY_CRON_SCHEDULE", &self.schedule)
            .env("SPLITPAY_RECONCILE_TRANSFER_GRACE", "2s")
            .env("SPLITPAY_TRANSFER_BACKOFF_BASE", "200ms")
            .env("SPLITPAY_TRANSFER_BACKOFF_CAP", "2s")
            .env("SPLITPAY_METRICS_ADDR", "127.0.0.1:0")
            .env_remove("SPLITPAY_REVERSE_ON_REFUND")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map(Proc)
            .expect("the worker starts")
    }

    /// One worker left to run (never killed) until `sql` holds, as [`wait_for`] bounded by a minute; then killed.
    pub async fn survivor_until(&self, flow: &Flow, what: &str, sql: &str) {
        let mut survivor = self.spawn(flow);
        wait_for(flow, what, sql, Duration::from_secs(60)).await;
        kill(&mut survivor);
    }
}

/// `splitpay ops ARGS` as a child process the test may kill (its output is dropped).
pub fn spawn_ops(flow: &Flow, args: &[&str]) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_splitpay"))
            .arg("ops")
            .args(args)
            .env("DATABASE_URL", &flow.db.url)
            .env("STRIPE_SECRET_KEY", super::stripe::TEST_KEY)
            .env("STRIPE_API_BASE", flow.sim.base_url())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the binary runs"),
    )
}

/// Waits (bounded: a bound, not a timing goal) until `sql` (a boolean) holds; panics with `state` otherwise.
pub async fn wait_for(flow: &Flow, what: &str, sql: &str, max: Duration) {
    let started = std::time::Instant::now();
    while started.elapsed() < max {
        let done: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&flow.db.pool)
            .await
            .unwrap();
        if done {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting for {what}: {}", state(flow).await);
}

/// What is open, for a panic message.
pub async fn state(flow: &Flow) -> String {
    let allocations: Vec<(String, i64)> =
        sqlx::query_as("SELECT status::text, count(*) FROM split_allocations GROUP BY 1 ORDER BY 1")
            .fetch_all(&flow.db.pool)
            .await
            .unwrap();
    let reversals: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM transfer_reversals GROUP BY 1 ORDER BY 1")
            .fetch_all(&flow.db.pool)
            .await
            .unwrap();
    let refunds: Vec<(String, String, bool, bool, i64)> = sqlx::query_as(
        "SELECT source, status, attributed_at IS NOT NULL, reinstated_at IS NOT NULL, count(*) FROM refunds
          GROUP BY 1, 2, 3, 4 ORDER BY 1, 2",
    )
    .fetch_all(&flow.db.pool)
    .await
    .unwrap();
    let waiting_parts = scalar(flow, "SELECT count(*) FROM refund_parts WHERE covered_at IS NULL").await;
    let events: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT event_type, process_error FROM stripe_events WHERE processed_at IS NULL OR process_error IS NOT NULL
          ORDER BY received_at LIMIT 20",
    )
    .fetch_all(&flow.db.pool)
    .await
    .unwrap();
    let failing: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT failure_code, failure_message FROM transfer_reversals WHERE status = 'PENDING' LIMIT 5")
            .fetch_all(&flow.db.pool)
            .await
            .unwrap();
    format!(
        "allocations {allocations:?}; reversals {reversals:?} (pending: {failing:?}); refunds (source, status, \
         attributed, reinstated) {refunds:?}; waiting parts {waiting_parts}; open or failed Stripe events {events:?}"
    )
}

/// `GET /v1/{path}` at the simulator, as JSON.
pub async fn stripe_get(flow: &Flow, path: &str) -> Value {
    super::stripe::raw_get(&flow.sim, path).await
}

/// Every transfer of a transfer group at Stripe, each with every one of its reversals (`reversals.data`).
pub async fn transfers_at_stripe(flow: &Flow, transfer_group: &str) -> Vec<Value> {
    let page = stripe_get(flow, &format!("transfers?transfer_group={transfer_group}&limit=100")).await;
    assert_eq!(page["has_more"], false, "one page holds a payment's transfers");
    let transfers = page["data"].as_array().unwrap().clone();
    for t in &transfers {
        assert_eq!(t["reversals"]["has_more"], false);
    }
    transfers
}

pub fn reversals_of(transfer: &Value) -> Vec<Value> {
    transfer["reversals"]["data"].as_array().unwrap().clone()
}

/// Every refund of a charge at Stripe.
pub async fn refunds_at_stripe(flow: &Flow, charge: &str) -> Vec<Value> {
    let page = stripe_get(flow, &format!("refunds?charge={charge}&limit=100")).await;
    assert_eq!(page["has_more"], false, "one page holds a charge's refunds");
    page["data"].as_array().unwrap().clone()
}

/// Every reversal Stripe holds for the payments' transfers is exactly one SUCCEEDED `transfer_reversals` row (same
/// reversal id, transfer and amount), and the other way round; none is left PENDING; no transfer is reversed beyond
/// its amount. Returns how many reversals Stripe holds.
pub async fn assert_reversals_match_stripe(flow: &Flow, transfer_groups: &[String]) -> usize {
    let mut at_stripe: BTreeMap<String, (String, i64)> = BTreeMap::new();
    for group in transfer_groups {
        for t in transfers_at_stripe(flow, group).await {
            let id = t["id"].as_str().unwrap().to_owned();
            let amount = t["amount"].as_i64().unwrap();
            let reversals = reversals_of(&t);
            let reversed: i64 = reversals.iter().map(|r| r["amount"].as_i64().unwrap()).sum();
            assert_eq!(reversed, t["amount_reversed"].as_i64().unwrap(), "{id}");
            assert!(reversed <= amount, "{id} reversed {reversed} of {amount}");
            for r in reversals {
                let previous = at_stripe.insert(
                    r["id"].as_str().unwrap().to_owned(),
                    (id.clone(), r["amount"].as_i64().unwrap()),
                );
                assert!(previous.is_none(), "a reversal listed twice");
            }
        }
    }
    let rows: Vec<(i64, String, Option<String>, String, i64)> = sqlx::query_as(
        "SELECT id, status, stripe_reversal_id, stripe_transfer_id, amount_cents FROM transfer_reversals ORDER BY id",
    )
    .fetch_all(&flow.db.pool)
    .await
    .unwrap();
    let mut recorded: BTreeMap<String, (String, i64)> = BTreeMap::new();
    for (id, status, reversal, transfer, amount) in rows {
        assert_eq!(status, "SUCCEEDED", "reversal row {id} of {transfer}");
        let reversal = reversal.unwrap_or_else(|| panic!("reversal row {id} of {transfer} has no Stripe id"));
        assert!(
            recorded.insert(reversal.clone(), (transfer, amount)).is_none(),
            "{reversal} recorded twice"
        );
    }
    assert_eq!(
        at_stripe, recorded,
        "the reversals at Stripe (left) are the ones splitpay recorded (right), one each"
    );
    at_stripe.len()
}

/// Each donation's `donation.refunded` events are one per covered refund part of its share (one per refund id, and
/// its payload valid against the contract), its `donation.refund_reversed` events one per part of a given-back
/// withdrawal, and its `refunded_amount_cents` the parts that still stand. Returns (refunded, refund_reversed)
/// event counts.
pub async fn assert_donation_refund_events(flow: &Flow) -> (i64, i64) {
    let rows: Vec<(String, i64, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT d.id, d.refunded_amount_cents,
                (SELECT count(*) FROM outbox_events o
                  WHERE o.event_type = 'donation.refunded' AND o.payload->'data'->>'id' = d.id),
                (SELECT count(*) FROM outbox_events o
                  WHERE o.event_type = 'donation.refund_reversed' AND o.payload->'data'->>'id' = d.id),
                (SELECT count(*) FROM refund_parts p WHERE p.split_allocation_id = d.split_allocation_id
                    AND p.covered_at IS NOT NULL),
                (SELECT count(*) FROM refund_parts p JOIN refunds r ON r.id = p.refund_id
                  WHERE p.split_allocation_id = d.split_allocation_id AND p.covered_at IS NOT NULL
                    AND r.reinstated_at IS NOT NULL),
                (SELECT coalesce(sum(p.amount_cents), 0)::bigint FROM refund_parts p JOIN refunds r ON r.id = p.refund_id
                  WHERE p.split_allocation_id = d.split_allocation_id AND p.covered_at IS NOT NULL
                    AND r.reinstated_at IS NULL)
           FROM donations d ORDER BY d.id",
    )
    .fetch_all(&flow.db.pool)
    .await
    .unwrap();
    let (mut refunded_events, mut reversed_events) = (0, 0);
    for (donation, refunded, refunded_n, reversed_n, parts, given_back, standing) in rows {
        assert_eq!(
            refunded_n, parts,
            "{donation}: one donation.refunded per covered refund part"
        );
        assert_eq!(
            reversed_n, given_back,
            "{donation}: one donation.refund_reversed per part given back"
        );
        assert_eq!(
            refunded, standing,
            "{donation}: refunded_amount_cents is the standing parts"
        );
        refunded_events += refunded_n;
        reversed_events += reversed_n;
    }
    let payloads: Vec<Value> = sqlx::query_scalar(
        "SELECT payload FROM outbox_events WHERE event_type IN ('donation.refunded', 'donation.refund_reversed')",
    )
    .fetch_all(&flow.db.pool)
    .await
    .unwrap();
    for p in &payloads {
        super::contract::validate_against_contract(p).unwrap_or_else(|e| panic!("{e}: {p}"));
    }
    (refunded_events, reversed_events)
}

/// Starts and SIGKILLs worker processes until at least `kills_min` kills are done and `busy` (the task making
/// changes at Stripe) has finished. Every other worker is killed once `in_flight_sql` (a count of work in flight,
/// e.g. PENDING reversals) is positive, after a random 0-300 ms (a bounded wait: if nothing comes it is killed
/// anyway); the others at a random moment 300-1500 ms after they start. Returns (kills, kills that landed while
/// work was in flight).
pub async fn kill_repeatedly<T>(
    flow: &Flow,
    workers: &Workers,
    rng: &mut rand::rngs::StdRng,
    kills_min: usize,
    busy: &tokio::task::JoinHandle<T>,
    in_flight_sql: &str,
) -> (usize, usize) {
    use rand::Rng;
    let (mut kills, mut in_flight) = (0, 0);
    while kills < kills_min || !busy.is_finished() {
        let mut worker = workers.spawn(flow);
        if kills % 2 == 0 {
            for _ in 0..150 {
                if scalar(flow, in_flight_sql).await > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        } else {
            tokio::time::sleep(Duration::from_millis(rng.random_range(300..1_500))).await;
        }
        let open = scalar(flow, in_flight_sql).await;
        kill(&mut worker);
        kills += 1;
        if open > 0 {
            in_flight += 1;
        }
    }
    (kills, in_flight)
}
