//! Chaos test (issue 7, point 13). 300 card payments through a three-recipient set come in through the real intake
//! (`POST /v1/split-payments`, confirmed server-side, retried with the same Idempotency-Key on a 5xx as a client
//! would) while, at once:
//! - `splitpay worker` runs as its own process (short reconcile graces, and a fast cron schedule through
//!   `SPLITPAY_CRON_SCHEDULE`) and is SIGKILLed and restarted again and again;
//! - the simulator fails random requests to transfers and PaymentIntents: 500s, 429s, dropped connections and
//!   responses lost after the request was applied;
//! - every webhook is delivered twice, and bursts of them are dropped (reconcile-pending must find those payments);
//! - PostgreSQL cuts every connection to the test database once.
//!
//! Then the faults stop and the system settles (bounded waits that panic with what is stuck), and: every payment
//! SUCCEEDED, every allocation TRANSFERRED (none parked), exactly one transfer per allocation at the simulator, of
//! its net amount, with its id recorded, and money conserved per payment against the simulator. The one exception
//! is by design: an intake whose create could not reach Stripe for longer than the 2 s card grace is closed by
//! reconcile-pending while the client still retries; the retry is then answered with that payment, FAILED
//! `intake_abandoned`, and the test checks it was never charged and transferred nothing.
//!
//! "A day later": a 500 on a transfer create is saved by Stripe for its idempotency key and replayed for 24 h, so
//! by design (issue 7: the same key for the whole window; a key older than 23 h is resent only after a lookup that
//! found nothing) such an allocation cannot finish within minutes. When only such allocations remain, the test
//! stops the worker, moves the simulator's clock 24 h on (Stripe forgets the keys) and dates those generations 24 h
//! back in splitpay's table (their keys are now "old"), restarts the worker, and settles again. That exercises the
//! old-key path (lookup, then resend) under the same assertions; the number of allocations it concerned is printed.
//!
//! The seed is printed; rerun a failure with `CHAOS_SEED=…`.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::flow::{Flow, SERVICE_TOKEN};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use splitpay::domain::ids::SplitPaymentId;
use splitpay::domain::plan::AmountMode;
use splitpay::domain::state::{AllocationStatus, PaymentStatus};
use splitpay::store::payments::get_split_payment;
use splitpay::stripe::sim::{Fault, FaultKind};
use splitpay::stripe::{IntentStatus, PaymentGateway};

const PAYMENTS: usize = 300;
const AMOUNTS: [i64; 3] = [1_000, 2_345, 1_655];
/// Kills at least this many times, and keeps killing until every payment has been taken.
const KILLS_MIN: usize = 10;
/// Bounds each settle phase.
const SETTLE_MAX: Duration = Duration::from_secs(90);

/// Every periodic job every second or two (the shipped schedule ticks at most once a minute).
const FAST_SCHEDULE: &str = r#"
[jobs.reconcile-pending]
cron = "*/2 * * * * *"
description = "chaos test: every 2 s"

[jobs.reconcile-transfers]
cron = "1/2 * * * * *"
description = "chaos test: every 2 s"

[jobs.sweeper]
cron = "*/5 * * * * *"
description = "chaos test: every 5 s"
"#;

struct Paths {
    schedule: std::path::PathBuf,
    log: std::path::PathBuf,
}

fn spawn_worker(flow: &Flow, paths: &Paths) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log)
        .expect("the worker log opens");
    Command::new(env!("CARGO_BIN_EXE_splitpay"))
        .arg("worker")
        .env("DATABASE_URL", &flow.db.url)
        .env("STRIPE_SECRET_KEY", common::stripe::TEST_KEY)
        .env("STRIPE_API_BASE", flow.sim.base_url())
        .env("STRIPE_RATE_PER_SEC", "500")
        .env("STRIPE_TIMEOUT_MS", "5000")
        .env("SPLITPAY_WORKER_CONCURRENCY", "4")
        // A killed worker's jobs come back after 1 s × 3 (production: 10 s × 6).
        .env("SPLITPAY_WORKER_HEARTBEAT_MS", "1000")
        .env("SPLITPAY_WORKER_MISSED_HEARTBEATS", "3")
        .env("SPLITPAY_CRON_SCHEDULE", &paths.schedule)
        .env("SPLITPAY_RECONCILE_CARD_GRACE", "2s")
        .env("SPLITPAY_RECONCILE_CARD_INTERVAL", "2s")
        .env("SPLITPAY_RECONCILE_TRANSFER_GRACE", "2s")
        .env("SPLITPAY_TRANSFER_BACKOFF_BASE", "200ms")
        .env("SPLITPAY_TRANSFER_BACKOFF_CAP", "2s")
        // The retry window stays at its 72 h default: a parked allocation is a failure here.
        .env_remove("SPLITPAY_TRANSFER_RETRY_WINDOW")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the worker starts")
}

fn kill(worker: &mut Child) {
    worker.kill().expect("SIGKILL"); // std's kill() is SIGKILL on Unix
    worker.wait().unwrap();
}

/// One donor payment through intake, retried with the same Idempotency-Key until it is taken (201). A 503 (Stripe
/// unreachable or its outcome unknown), a 500 (the database cut) or a broken connection is retried; anything else
/// is a failure of the test. Returns the payment and whether the 201 said FAILED: an intake whose create did not
/// reach Stripe for longer than the (2 s) card grace is closed by reconcile-pending while the client retries, and
/// the retry then gets the payment as it ended (`intake_abandoned`).
async fn pay(http: &reqwest::Client, flow: &Flow, key: &str, i: usize) -> (SplitPaymentId, bool) {
    let body = json!({
        "recommendation_set_id": flow.set.id,
        "donor_id": format!("cm3donor{i}"),
        "payment_method_type": "card",
        "payment_method": "pm_card_visa",
    });
    let mut last = String::new();
    for _ in 0..400 {
        let sent = http
            .post(format!("{}/v1/split-payments", flow.base_url))
            .bearer_auth(SERVICE_TOKEN)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().as_u16() == 201 => {
                let v: serde_json::Value = r.json().await.unwrap();
                let failed = v["status"] == "FAILED";
                assert!(!failed || v["failure_code"] == "intake_abandoned", "payment {i}: {v}");
                return (SplitPaymentId::parse(v["id"].as_str().unwrap()).unwrap(), failed);
            }
            Ok(r) if r.status().is_server_error() || r.status().as_u16() == 409 => {
                last = format!("{}: {}", r.status(), r.text().await.unwrap_or_default());
                // 409 is the same key in progress; never the 23 h expiry (the payments here are fresh).
                assert!(!last.contains("hours ago"), "payment {i}: {last}");
            }
            Ok(r) => panic!(
                "payment {i}: intake refused: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            ),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("payment {i} was never taken by intake; last answer: {last}");
}

/// A random fault on transfers or PaymentIntents. 500s on a PaymentIntent *create* are left out: Stripe saves a 500
/// for the key, so intake's retries (same key) would be refused for 24 h and the payment never taken, by design.
fn random_fault(rng: &mut StdRng) -> Fault {
    use FaultKind::*;
    let kinds = [ServerError, RateLimit, DropConnection, LoseResponse];
    let (method, path, kind) = match rng.random_range(0..10) {
        0..=4 => ("POST", "/v1/transfers", kinds[rng.random_range(0..4)]),
        5..=6 => ("GET", "/v1/transfers", kinds[rng.random_range(0..4)]),
        7 => ("POST", "/v1/payment_intents", kinds[rng.random_range(1..4)]),
        _ => ("GET", "/v1/payment_intents", kinds[rng.random_range(0..4)]),
    };
    Fault {
        kind,
        count: rng.random_range(1..=3),
        path_contains: Some(path.into()),
        method: Some(method.into()),
    }
}

/// A query that rides out the one moment every connection is cut.
async fn count(flow: &Flow, sql: &'static str) -> i64 {
    for _ in 0..50 {
        match sqlx::query_as::<_, (i64,)>(sql).fetch_one(&flow.db.pool).await {
            Ok((n,)) => return n,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("the test database does not answer: {sql}");
}

/// Allocation id, its status, its payment's status, generation, attempts, failure code and message.
type StuckRow = (String, String, String, i32, i32, Option<String>, Option<String>);

/// What is not TRANSFERRED yet, for the panic message: one line per allocation.
async fn stuck(flow: &Flow) -> Vec<String> {
    let rows: Vec<StuckRow> = sqlx::query_as(
        "SELECT a.id, a.status::text, p.status::text, a.generation, a.attempts, a.failure_code, a.failure_message
           FROM split_allocations a JOIN split_payments p ON p.id = a.split_payment_id
          WHERE a.status <> 'TRANSFERRED' ORDER BY a.id LIMIT 40",
    )
    .fetch_all(&flow.db.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, status, payment, generation, attempts, code, message)| {
            format!("{id}: {status} (payment {payment}), generation {generation}, {attempts} attempts, {code:?}: {message:?}")
        })
        .collect()
}

/// Allocations still to transfer (an abandoned intake's are voided with their payment and never transfer).
const OPEN: &str = "SELECT count(*) FROM split_allocations a JOIN split_payments p ON p.id = a.split_payment_id
    WHERE a.status <> 'TRANSFERRED' AND p.status <> 'FAILED'";
const PAID: &str = "SELECT count(*) FROM split_payments WHERE status = 'SUCCEEDED'";
/// Allocations that can only finish once Stripe forgets their key: a saved 500 replayed to every retry.
const SAVED_500: &str = "SELECT count(*) FROM split_allocations
    WHERE status = 'TRANSFERRING' AND failure_message LIKE '%HTTP 500%'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kills_faults_lost_webhooks_and_a_database_cut_never_strand_or_double_money() {
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("chaos test seed: {seed} (rerun with CHAOS_SEED={seed})");
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let flow = Arc::new(Flow::start_with(AmountMode::Fixed, &AMOUNTS, &[], false).await);
    let dir = std::env::temp_dir().join(format!("splitpay-chaos-{seed}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let paths = Paths {
        schedule: dir.join("schedule.toml"),
        log: dir.join("worker.log"),
    };
    std::fs::write(&paths.schedule, FAST_SCHEDULE).unwrap();
    println!("worker logs: {}", paths.log.display());
    // Stripe takes 5-40 ms per call, so many kills land while a request is in flight.
    flow.control.set_latency(5, 40, 0).await.unwrap();
    flow.control.webhook_mode(json!({ "duplicate": true })).await.unwrap();

    // Payments arrive while the worker is being killed.
    let taken = Arc::new(AtomicU64::new(0));
    let payer = {
        let (flow, taken) = (flow.clone(), taken.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap();
            let mut ids = Vec::new();
            for i in 0..PAYMENTS {
                ids.push(pay(&http, &flow, &format!("chaos-{seed}-{i}"), i).await);
                taken.fetch_add(1, Ordering::SeqCst);
            }
            ids
        })
    };

    let mut kills = 0;
    let mut faults: BTreeMap<String, u32> = BTreeMap::new();
    let mut cut = false;
    // The cut comes once, in the middle of the payments.
    let cut_at = rng.random_range(PAYMENTS as u64 / 4..PAYMENTS as u64 * 3 / 4);
    while kills < KILLS_MIN || !payer.is_finished() {
        let mut worker = spawn_worker(&flow, &paths);
        for _ in 0..rng.random_range(1..=3) {
            let fault = random_fault(&mut rng);
            *faults
                .entry(format!(
                    "{:?} {} {}",
                    fault.kind,
                    fault.method.as_deref().unwrap(),
                    fault.path_contains.as_deref().unwrap()
                ))
                .or_default() += fault.count;
            flow.control.fault(fault).await.unwrap();
        }
        if rng.random_bool(0.5) {
            // A burst of dropped events; what was left of the previous burst (not yet dropped) is replaced.
            flow.control
                .webhook_mode(json!({ "drop_next": rng.random_range(3..=10) }))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1_500))).await;
        if !cut && taken.load(Ordering::SeqCst) >= cut_at {
            let (n,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                  WHERE datname = current_database() AND pid <> pg_backend_pid()) t",
            )
            .fetch_one(&flow.db.pool)
            .await
            .unwrap();
            println!(
                "cut {n} PostgreSQL connections after {} payments",
                taken.load(Ordering::SeqCst)
            );
            cut = true;
        }
        kill(&mut worker);
        kills += 1;
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "intake took only {} of {PAYMENTS} payments in 4 minutes (seed {seed})",
            taken.load(Ordering::SeqCst)
        );
    }
    let taken: Vec<(SplitPaymentId, bool)> = payer.await.unwrap();
    let abandoned: Vec<SplitPaymentId> = taken.iter().filter(|t| t.1).map(|t| t.0.clone()).collect();
    let ids: Vec<SplitPaymentId> = taken.iter().filter(|t| !t.1).map(|t| t.0.clone()).collect();
    assert!(cut, "the database cut never came (seed {seed})");
    let chaos_took = started.elapsed();

    // The faults stop; duplicates stay (harmless by design), drops stop.
    flow.control.clear_faults().await.unwrap();
    let mode = flow
        .control
        .post("webhooks/mode", json!({ "drop_next": 0 }))
        .await
        .unwrap();
    let dropped_webhooks = mode["dropped"].as_u64().unwrap();
    let before_restart = count(
        &flow,
        "SELECT count(*) FROM split_allocations WHERE status = 'TRANSFERRED'",
    )
    .await;
    let mut survivor = spawn_worker(&flow, &paths);

    // Settle: every payment succeeded and every allocation transferred, except those waiting on a saved 500.
    let expected_paid = ids.len() as i64;
    let settle = |what: &'static str| {
        let flow = flow.clone();
        async move {
            let deadline = Instant::now() + SETTLE_MAX;
            loop {
                let (open, paid, saved) = (
                    count(&flow, OPEN).await,
                    count(&flow, PAID).await,
                    count(&flow, SAVED_500).await,
                );
                let done = paid == expected_paid && (open == 0 || (what == "first" && open == saved));
                if done {
                    return saved;
                }
                if Instant::now() > deadline {
                    let (parked,): (i64,) =
                        sqlx::query_as("SELECT count(*) FROM split_allocations WHERE status = 'PARKED'")
                            .fetch_one(&flow.db.pool)
                            .await
                            .unwrap();
                    panic!(
                        "not settled {SETTLE_MAX:?} after the faults stopped ({what} settle, seed {seed}): \
                         {paid}/{} payments SUCCEEDED, {open} allocations not TRANSFERRED ({parked} PARKED, \
                         {saved} waiting on a saved 500):\n{}",
                        expected_paid,
                        stuck(&flow).await.join("\n")
                    );
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    let saved_500 = settle("first").await;
    if saved_500 > 0 {
        // A day later: Stripe has forgotten the keys, and splitpay sees them as old (lookup, then resend).
        kill(&mut survivor);
        kills += 1;
        flow.control.advance_clock(24 * 3_600 + 60).await.unwrap();
        sqlx::query(
            "UPDATE transfer_attempts t SET started_at = t.started_at - interval '24 hours'
               FROM split_allocations a
              WHERE a.id = t.split_allocation_id AND a.generation = t.generation AND a.status = 'TRANSFERRING'",
        )
        .execute(&flow.db.pool)
        .await
        .unwrap();
        survivor = spawn_worker(&flow, &paths);
        settle("second (a day later)").await;
    }
    kill(&mut survivor);

    // Exactly one transfer per allocation at Stripe, of its net amount, its id recorded; money conserved.
    let mut transfers = 0;
    for id in &ids {
        let p = get_split_payment(&mut flow.db.pool.acquire().await.unwrap(), id)
            .await
            .unwrap();
        // One transfer per allocation at Stripe, of its net, its id recorded: `common::money` checks each.
        assert_eq!(p.allocations.len(), AMOUNTS.len());
        for a in &p.allocations {
            assert_eq!(a.status, AllocationStatus::Transferred, "{} (seed {seed})", a.id);
            transfers += 1;
        }
        let money = common::money::conserved_at_stripe(flow.gateway.as_ref(), &flow.db.pool, id)
            .await
            .unwrap_or_else(|e| panic!("{id}: {e} (seed {seed})"));
        assert_eq!(money.charged_cents, AMOUNTS.iter().sum::<i64>());
        assert_eq!(money.transfers_at_stripe, AMOUNTS.len());
    }
    assert_eq!(transfers, ids.len() * AMOUNTS.len());
    // An intake closed by reconcile-pending: FAILED `intake_abandoned`, its PaymentIntent canceled and never
    // charged, nothing transferred.
    for id in &abandoned {
        let p = get_split_payment(&mut flow.db.pool.acquire().await.unwrap(), id)
            .await
            .unwrap();
        assert_eq!(
            (p.payment.status, p.payment.failure_code.as_deref()),
            (PaymentStatus::Failed, Some("intake_abandoned")),
            "{id} (seed {seed})"
        );
        let pi = p
            .payment
            .payment_intent_id
            .clone()
            .expect("the canceled PaymentIntent is named");
        let intent = flow.gateway.retrieve_payment_intent(&pi).await.unwrap();
        assert_eq!(intent.status, IntentStatus::Canceled, "{id} (seed {seed})");
        assert!(intent.latest_charge.is_none(), "{id} was charged (seed {seed})");
        assert!(
            flow.gateway
                .list_transfers(&p.payment.transfer_group)
                .await
                .unwrap()
                .is_empty(),
            "{id} (seed {seed})"
        );
        assert!(p.allocations.iter().all(|a| a.status != AllocationStatus::Transferred));
    }
    let parked = count(&flow, "SELECT count(*) FROM split_allocations WHERE status = 'PARKED'").await;
    assert_eq!(parked, 0, "seed {seed}");

    // The dropped webhooks did hide some payments' success: reconcile-pending found those.
    let unannounced = count(
        &flow,
        "SELECT count(*) FROM split_payments p WHERE p.status = 'SUCCEEDED' AND NOT EXISTS (
            SELECT 1 FROM stripe_events e
             WHERE e.event_type = 'payment_intent.succeeded' AND e.object_id = p.payment_intent_id)",
    )
    .await;
    let rerun = count(&flow, "SELECT count(*) FROM apalis.jobs WHERE attempts > 1").await;
    println!(
        "chaos test (seed {seed}): {PAYMENTS} payments × {} recipients in {:.1?} ({:.1?} of chaos); {kills} kills; \
         faults armed {faults:?}; {dropped_webhooks} webhooks dropped (every one delivered twice); \
         {unannounced} payments found by reconcile-pending without their payment_intent.succeeded; \
         {rerun} jobs ran more than once; {before_restart} transfers made before the faults stopped; \
         {saved_500} allocations waited a day on a saved 500; {} intakes closed by reconcile-pending while the \
         client retried (FAILED, never charged); the rest all TRANSFERRED once, none parked, all conserved",
        AMOUNTS.len(),
        started.elapsed(),
        chaos_took,
        abandoned.len(),
    );
    assert!(
        unannounced > 0,
        "no payment lost its payment_intent.succeeded webhook: the drops proved nothing (seed {seed})"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
