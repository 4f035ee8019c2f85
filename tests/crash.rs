//! Crash test: `splitpay worker` runs as its own process and is SIGKILLed at random moments while 50 card payments
//! through a three-recipient set are distributed; then it is restarted. Afterwards every allocation is TRANSFERRED
//! (or PARKED), Stripe holds exactly one transfer per transferred allocation and none for any other, and money is
//! conserved to the cent for every payment.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::flow::Flow;
use rand::{Rng, SeedableRng};
use splitpay::domain::ids::SplitPaymentId;
use splitpay::domain::plan::{AmountMode, PaymentMethodType};
use splitpay::domain::state::AllocationStatus;
use splitpay::store::payments::get_split_payment;
use splitpay::stripe::PaymentGateway;

const PAYMENTS: usize = 50;
const KILLS: usize = 6;

fn spawn_worker(flow: &Flow) -> Child {
    Command::new(env!("CARGO_BIN_EXE_splitpay"))
        .arg("worker")
        .env("DATABASE_URL", &flow.db.url)
        .env("STRIPE_SECRET_KEY", common::stripe::TEST_KEY)
        .env("STRIPE_API_BASE", flow.sim.base_url())
        .env("STRIPE_RATE_PER_SEC", "500")
        .env("SPLITPAY_WORKER_CONCURRENCY", "4")
        // A killed worker's jobs come back after 1 s × 3 (production: 10 s × 6).
        .env("SPLITPAY_WORKER_HEARTBEAT_MS", "1000")
        .env("SPLITPAY_WORKER_MISSED_HEARTBEATS", "3")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the worker starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_workers_never_move_money_twice() {
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("crash test seed: {seed} (rerun with CRASH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let flow = std::sync::Arc::new(Flow::start_with(AmountMode::Fixed, &[1_000, 2_345, 1_655], &[], false).await);
    // Stripe takes 10-60 ms per call, so many kills land while a transfer request is in flight.
    flow.control.set_latency(10, 60, 0).await.unwrap();

    // Payments arrive while the worker is being killed.
    let payer = {
        let flow = flow.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..PAYMENTS {
                let (id, _) = flow
                    .pay(PaymentMethodType::Card, "pm_card_visa", Some(&format!("cm3donor{i}")))
                    .await;
                ids.push(id);
            }
            ids
        })
    };
    let transferred_so_far = || async {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM split_allocations WHERE status = 'TRANSFERRED'")
            .fetch_one(&flow.db.pool)
            .await
            .unwrap();
        n
    };
    // On a loaded machine a worker may need longer than a kill interval to start: the kills go on (bounded) until
    // some transfers were made between them, or the test would prove nothing.
    let mut kills = 0;
    while kills < KILLS || (transferred_so_far().await == 0 && kills < KILLS * 10) {
        let mut worker = spawn_worker(&flow);
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1_500))).await;
        worker.kill().expect("SIGKILL"); // std's kill() is SIGKILL on Unix
        worker.wait().unwrap();
        kills += 1;
    }
    let ids: Vec<SplitPaymentId> = payer.await.unwrap();
    let before_restart = transferred_so_far().await;
    let mut survivor = spawn_worker(&flow);

    // Wait (bounded) until every allocation of every payment is final. A share whose inline step a kill cut is due
    // when its lease ends (10 s) and re-enqueued by the sweeper a minute after that (`SWEEP_GRACE_SECS`).
    let mut settled = false;
    for _ in 0..900 {
        let (open,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM split_allocations WHERE status NOT IN ('TRANSFERRED', 'PARKED')")
                .fetch_one(&flow.db.pool)
                .await
                .unwrap();
        let (payments,): (i64,) = sqlx::query_as("SELECT count(*) FROM split_payments WHERE status = 'SUCCEEDED'")
            .fetch_one(&flow.db.pool)
            .await
            .unwrap();
        if open == 0 && payments == PAYMENTS as i64 {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = survivor.kill();
    let _ = survivor.wait();
    assert!(settled, "allocations still open after the restart (seed {seed})");

    let mut transferred = 0;
    for id in &ids {
        let p = get_split_payment(&mut flow.db.pool.acquire().await.unwrap(), id)
            .await
            .unwrap();
        // Exactly one transfer at Stripe per TRANSFERRED allocation (of its net, its id recorded) and none for any
        // other: `common::money` checks each, against the simulator.
        transferred += p
            .allocations
            .iter()
            .filter(|a| a.status == AllocationStatus::Transferred)
            .count();
        let money = common::money::conserved_at_stripe(flow.gateway.as_ref(), &flow.db.pool, id)
            .await
            .unwrap_or_else(|e| panic!("{id}: {e} (seed {seed})"));
        assert_eq!(money.charged_cents, 5_000);
    }
    let (rerun,): (i64,) = sqlx::query_as("SELECT count(*) FROM apalis.jobs WHERE attempts > 1")
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    println!(
        "crash test: {kills} kills; {before_restart} of {} transfers made before the last restart; {rerun} jobs ran more than once; all conserved",
        PAYMENTS * 3
    );
    // The kills must have landed while work was under way, or this test would prove nothing.
    assert!(
        before_restart > 0,
        "no transfer was made before the last restart: the kills came too early"
    );
    assert_eq!(
        transferred,
        PAYMENTS * 3,
        "no recipient lacks the transfers capability here, so all transfer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_in_flight_transfer_finish_and_record_its_outcome() {
    let flow = Flow::start_with(AmountMode::Fixed, &[2_000], &[], false).await;
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    // Every Stripe call now takes 1.5 s, so the transfer request is surely in flight when SIGTERM comes.
    flow.control.set_latency(0, 0, 1_500).await.unwrap();
    let mut worker = spawn_worker(&flow);
    let mut in_flight = false;
    for _ in 0..300 {
        // The transfer request has reached Stripe (it now takes 1.5 s to answer).
        if !flow.control.request_times_ms("/v1/transfers").await.unwrap().is_empty() {
            in_flight = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(in_flight, "the transfer never started");
    let term = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let mut exit = None;
    for _ in 0..200 {
        if let Some(status) = worker.try_wait().unwrap() {
            exit = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(exit) = exit else {
        let _ = worker.kill();
        panic!("the worker did not stop within 20 s of SIGTERM");
    };
    assert!(exit.success(), "the worker exits cleanly: {exit:?}");
    let p = get_split_payment(&mut flow.db.pool.acquire().await.unwrap(), &id)
        .await
        .unwrap();
    assert_eq!(
        p.allocations[0].status,
        AllocationStatus::Transferred,
        "the in-flight outcome was recorded before exit"
    );
    let at_stripe = flow.gateway.list_transfers(id.as_str()).await.unwrap();
    assert_eq!(at_stripe.len(), 1);
    assert_eq!(Some(&at_stripe[0].id), p.allocations[0].stripe_transfer_id.as_ref());
}
