//! Crash tests of the refund paths (issue 8, point 6): processes die between the Stripe call and the commit.
//!
//! - Dashboard refunds (full and partial) of distributed payments are taken through to reversals while a real
//!   `splitpay worker` process is SIGKILLed again and again, then restarted.
//! - `splitpay ops refund --reverse-transfer --yes` is SIGKILLed at random points (before Stripe is called, while
//!   the reversal or the refund is at Stripe) and run again.
//!
//! Afterwards Stripe holds exactly one reversal per reversal row and one refund per refund, no transfer is reversed
//! beyond its amount, each donation has one `donation.refunded` per refund, and money is conserved to the cent per
//! payment against the simulator. The seed is printed; rerun a failure with `CRASH_SEED=…`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::flow::Flow;
use common::workers::{
    assert_donation_refund_events, assert_reversals_match_stripe, kill, kill_repeatedly, refunds_at_stripe,
    reversals_of, scalar, spawn_ops, transfers_at_stripe, wait_for, Workers,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use splitpay::domain::ids::SplitAllocationId;
use splitpay::domain::plan::{AmountMode, PaymentMethodType};
use splitpay::domain::state::{AllocationStatus, DonationStatus};
use splitpay::store::donations::donation_for_allocation;
use splitpay::stripe::{CreateRefundParams, PaymentGateway, RefundTarget};

const AMOUNTS: [i64; 3] = [1_000, 2_345, 1_655];
const TOTAL: i64 = 5_000;

fn seed(test: &str) -> u64 {
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("{test} seed: {seed} (rerun with CRASH_SEED={seed})");
    seed
}

/// Payments through the set, each share transferred (or parked), by a worker process when `workers` is given.
async fn distributed(
    flow: &Flow,
    workers: Option<&Workers>,
    payments: usize,
) -> Vec<splitpay::store::payments::SplitPayment> {
    let mut ids = Vec::new();
    for i in 0..payments {
        let (id, _) = flow
            .pay(PaymentMethodType::Card, "pm_card_visa", Some(&format!("cm3donor{i}")))
            .await;
        ids.push(id);
    }
    let mut worker = workers.map(|w| w.spawn(flow));
    let sql = format!(
        "SELECT count(*) = {} FROM split_allocations WHERE status IN ('TRANSFERRED', 'PARKED')",
        payments * AMOUNTS.len()
    );
    wait_for(flow, "every share settled", &sql, Duration::from_secs(60)).await;
    if let Some(worker) = worker.as_mut() {
        kill(worker);
    }
    let mut out = Vec::new();
    for id in &ids {
        out.push(flow.payment(id).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_refunds_while_workers_are_sigkilled_reverse_each_part_once() {
    const PAYMENTS: usize = 16;
    const KILLS: usize = 8;
    let seed = seed("refund crash test");
    let mut rng = StdRng::seed_from_u64(seed);
    let flow = Arc::new(Flow::start_with(AmountMode::Fixed, &AMOUNTS, &[], false).await);
    // Stripe pays refunds out of the platform's available balance (the charges' own funds are still pending).
    flow.control.top_up("aud", 10_000_000).await.unwrap();
    let workers = Workers::new("refund-crash", seed);
    let payments = distributed(&flow, Some(&workers), PAYMENTS).await;

    // Per payment: no refund, one full, one partial, or two partials, made at Stripe as in the dashboard (no
    // metadata), in a random order, while workers are killed.
    let mut plan: Vec<(usize, i64)> = Vec::new();
    for i in 0..PAYMENTS {
        match rng.random_range(0..4) {
            0 => {}
            1 => plan.push((i, TOTAL)),
            2 => plan.push((i, rng.random_range(1..TOTAL))),
            _ => {
                plan.push((i, rng.random_range(1..TOTAL / 2)));
                plan.push((i, rng.random_range(1..TOTAL / 2)));
            }
        }
    }
    plan.shuffle(&mut rng);
    let fully_refunded: Vec<usize> = plan.iter().filter(|(_, a)| *a == TOTAL).map(|(i, _)| *i).collect();
    // Stripe takes 10-60 ms per call, so kills land while reversal requests are in flight.
    flow.control.set_latency(10, 60, 0).await.unwrap();
    let refunder = {
        let flow = flow.clone();
        let calls: Vec<(String, i64, u64)> = plan
            .iter()
            .map(|(i, amount)| {
                let pi = payments[*i].payment.payment_intent_id.clone().unwrap();
                (pi, *amount, rng.random_range(0..250))
            })
            .collect();
        tokio::spawn(async move {
            for (n, (pi, amount, pause)) in calls.into_iter().enumerate() {
                tokio::time::sleep(Duration::from_millis(pause)).await;
                let params = CreateRefundParams {
                    target: RefundTarget::PaymentIntent(pi),
                    amount_cents: Some(amount),
                    reason: None,
                    metadata: Default::default(),
                    idempotency_key: format!("dashboard-{seed}-{n}"),
                };
                flow.gateway.create_refund(&params).await.unwrap();
            }
        })
    };
    let (kills, in_flight) = kill_repeatedly(
        &flow,
        &workers,
        &mut rng,
        KILLS,
        &refunder,
        "SELECT count(*) FROM transfer_reversals WHERE status = 'PENDING'",
    )
    .await;
    refunder.await.unwrap();
    let made_before_restart = scalar(
        &flow,
        "SELECT count(*) FROM transfer_reversals WHERE status = 'SUCCEEDED'",
    )
    .await;

    let settled = format!(
        "SELECT (SELECT count(*) FROM refunds) >= {}
            AND NOT EXISTS (SELECT 1 FROM refunds WHERE attributed_at IS NULL)
            AND NOT EXISTS (SELECT 1 FROM refund_parts WHERE covered_at IS NULL)
            AND NOT EXISTS (SELECT 1 FROM transfer_reversals WHERE status = 'PENDING')
            AND NOT EXISTS (SELECT 1 FROM stripe_events WHERE processed_at IS NULL)",
        plan.len()
    );
    workers
        .survivor_until(&flow, "refunds attributed and reversals made", &settled)
        .await;

    // Each refund Stripe holds is recorded once, with its amount, and nothing else.
    for p in &payments {
        let charge = p.payment.charge_id.clone().unwrap();
        let mut at_stripe: Vec<(String, i64)> = refunds_at_stripe(&flow, &charge)
            .await
            .iter()
            .map(|r| (r["id"].as_str().unwrap().to_owned(), r["amount"].as_i64().unwrap()))
            .collect();
        at_stripe.sort();
        let recorded: Vec<(String, i64)> = sqlx::query_as(
            "SELECT stripe_refund_id, amount_cents FROM refunds WHERE split_payment_id = $1 ORDER BY stripe_refund_id",
        )
        .bind(&p.payment.id)
        .fetch_all(&flow.db.pool)
        .await
        .unwrap();
        assert_eq!(at_stripe, recorded, "{}: Stripe's refunds and splitpay's", p.payment.id);
    }
    let groups: Vec<String> = payments.iter().map(|p| p.payment.transfer_group.clone()).collect();
    let reversals = assert_reversals_match_stripe(&flow, &groups).await;
    // A fully refunded payment's recipients gave their whole transfers back, each in one reversal.
    for &i in &fully_refunded {
        for t in transfers_at_stripe(&flow, &groups[i]).await {
            assert_eq!(t["amount_reversed"], t["amount"], "{t}");
            assert_eq!(reversals_of(&t).len(), 1, "{t}");
        }
    }
    let (refunded_events, _) = assert_donation_refund_events(&flow).await;
    assert_eq!(refunded_events, common::count(&flow.db.pool, "refund_parts").await);
    for p in &payments {
        let id = splitpay::domain::ids::SplitPaymentId::parse(&p.payment.id).unwrap();
        let money = common::money::conserved_at_stripe(flow.gateway.as_ref(), &flow.db.pool, &id)
            .await
            .unwrap_or_else(|e| panic!("{id}: {e} (seed {seed})"));
        assert_eq!(money.charged_cents, TOTAL);
    }
    println!(
        "refund crash test: {} refunds, {reversals} reversals at Stripe, {refunded_events} donation.refunded; \
         {kills} kills, {in_flight} with reversals pending; {made_before_restart} reversals made before the last \
         restart",
        plan.len()
    );
    assert!(
        made_before_restart > 0,
        "no reversal was made between the kills: they proved nothing"
    );
}

/// Where `ops refund` is killed.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// A random moment after it starts (before, between or after its Stripe calls).
    Random,
    /// While its reversal request is at Stripe (in flight, or done with the answer not recorded yet).
    Reversal,
    /// While its refund request is at Stripe.
    Refund,
}

/// POST requests the simulator received whose path contains `path`.
async fn posts(flow: &Flow, path: &str) -> usize {
    let log = flow.control.get("requests").await.unwrap();
    log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["method"] == "POST" && r["path"].as_str().unwrap_or("").contains(path))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_refund_reverse_transfer_killed_anywhere_then_run_again_moves_money_once() {
    let seed = seed("ops refund crash test");
    let mut rng = StdRng::seed_from_u64(seed);
    // The worker runs in the test process: it takes Stripe's webhooks (`charge.refunded` may record the refund
    // before a killed command's next run does). The third recipient cannot receive transfers: its shares are
    // PARKED, and refunded without a reversal.
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000, 3_000], &[2]).await;
    flow.control.top_up("aud", 1_000_000).await.unwrap();
    let payments = distributed(&flow, None, 2).await;
    // Each Stripe call waits 50-250 ms before Stripe takes it, then holds its key 300 ms while Stripe executes it:
    // a kill in the first window loses the request, in the second only its answer.
    flow.control.set_latency(50, 250, 300).await.unwrap();

    let shares: Vec<_> = payments.iter().flat_map(|p| p.allocations.clone()).collect();
    let mut summary = Vec::new();
    for (round, a) in shares.iter().enumerate() {
        let kills: &[KillAt] = match round % 4 {
            0 => &[KillAt::Random],
            1 => &[KillAt::Reversal],
            2 => &[KillAt::Refund],
            _ => &[KillAt::Reversal, KillAt::Refund],
        };
        let args = [
            "refund",
            a.id.as_str(),
            "--reason",
            "crash test",
            "--reverse-transfer",
            "--yes",
            "--actor",
            "alice",
        ];
        for &at in kills {
            let (reversal_posts, refund_posts) = (posts(&flow, "/reversals").await, posts(&flow, "/v1/refunds").await);
            let mut child = spawn_ops(&flow, &args);
            let seen = |path: &'static str, before: usize| {
                let flow = &flow;
                async move { posts(flow, path).await > before }
            };
            match at {
                KillAt::Random => tokio::time::sleep(Duration::from_millis(rng.random_range(0..2_500))).await,
                KillAt::Reversal | KillAt::Refund => {
                    let (path, before) = match at {
                        KillAt::Reversal => ("/reversals", reversal_posts),
                        _ => ("/v1/refunds", refund_posts),
                    };
                    for _ in 0..500 {
                        if seen(path, before).await || child.0.try_wait().unwrap().is_some() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..550))).await;
                }
            }
            kill(&mut child);
        }
        // Run again until it finishes. A run may find the key still in flight (the killed run's request is still
        // at Stripe: 409, "run again"), or find the refund already recorded from its webhook and refuse: nothing
        // is left to refund.
        let mut codes = Vec::new();
        for _ in 0..20 {
            let out = flow.ops(&args);
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            codes.push(out.status.code());
            if out.status.code() == Some(0)
                || err.contains("already refunded")
                || err.contains("nothing left to refund")
            {
                break;
            }
            assert_eq!(out.status.code(), Some(1), "{}: {err}", a.id);
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        summary.push(format!("{kills:?} then {codes:?}"));

        // A transferred share: one reversal and one refund at Stripe, each of its net, each recorded once. A parked
        // one: one refund, no reversal.
        let p = payments.iter().find(|p| p.payment.id == a.split_payment_id).unwrap();
        let net = a.net_amount_cents.unwrap();
        let parked = a.status == AllocationStatus::Parked;
        let reversed: Vec<serde_json::Value> = if parked {
            Vec::new()
        } else {
            let transfers = transfers_at_stripe(&flow, &p.payment.transfer_group).await;
            let t = transfers
                .iter()
                .find(|t| t["id"].as_str() == a.stripe_transfer_id.as_deref())
                .unwrap();
            let at_stripe = reversals_of(t);
            assert_eq!(at_stripe.len(), 1, "{}: {kills:?} then {codes:?}: {t}", a.id);
            assert_eq!(at_stripe[0]["amount"], net);
            at_stripe
        };
        let refunds: Vec<_> = refunds_at_stripe(&flow, p.payment.charge_id.as_deref().unwrap())
            .await
            .into_iter()
            .filter(|r| r["metadata"]["split_allocation_id"] == a.id.as_str())
            .collect();
        assert_eq!(refunds.len(), 1, "{}: {kills:?} then {codes:?}: {refunds:?}", a.id);
        assert_eq!(
            (&refunds[0]["amount"], &refunds[0]["status"]),
            (&net.into(), &"succeeded".into())
        );
        let rows: Vec<(String, Option<String>, i64)> =
            sqlx::query_as("SELECT status, stripe_refund_id, amount_cents FROM refunds WHERE split_allocation_id = $1")
                .bind(&a.id)
                .fetch_all(&flow.db.pool)
                .await
                .unwrap();
        assert_eq!(
            rows,
            [(
                "SUCCEEDED".to_owned(),
                refunds[0]["id"].as_str().map(str::to_owned),
                net
            )],
            "{}",
            a.id
        );
        let rows: Vec<(String, Option<String>)> =
            sqlx::query_as("SELECT status, stripe_reversal_id FROM transfer_reversals WHERE split_allocation_id = $1")
                .bind(&a.id)
                .fetch_all(&flow.db.pool)
                .await
                .unwrap();
        let want: Vec<(String, Option<String>)> = reversed
            .iter()
            .map(|r| ("SUCCEEDED".to_owned(), r["id"].as_str().map(str::to_owned)))
            .collect();
        assert_eq!(rows, want, "{}", a.id);
        // One audit row for the effect, however many runs it took.
        let audit: i64 =
            sqlx::query_scalar("SELECT count(*) FROM ops_audit_log WHERE command = 'refund' AND target_id = $1")
                .bind(&a.id)
                .fetch_one(&flow.db.pool)
                .await
                .unwrap();
        assert_eq!(audit, 1, "{}", a.id);
        // A parked share ends REFUNDED. A transferred one stays TRANSFERRED: its transfer stands, reversed. Either
        // way its donation is refunded, once.
        let now = flow
            .payment(&splitpay::domain::ids::SplitPaymentId::parse(&p.payment.id).unwrap())
            .await;
        let share = now.allocations.iter().find(|x| x.id == a.id).unwrap();
        let want = if parked {
            AllocationStatus::Refunded
        } else {
            AllocationStatus::Transferred
        };
        assert_eq!(share.status, want, "{}", a.id);
        let d = donation_for_allocation(
            &mut flow.db.pool.acquire().await.unwrap(),
            &SplitAllocationId::parse(&a.id).unwrap(),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            (d.status, d.refunded_amount_cents, d.deleted_at.is_some()),
            (DonationStatus::Refunded, net, true),
            "{}",
            a.id
        );
    }
    let groups: Vec<String> = payments.iter().map(|p| p.payment.transfer_group.clone()).collect();
    assert_reversals_match_stripe(&flow, &groups).await;
    let (refunded_events, _) = assert_donation_refund_events(&flow).await;
    assert_eq!(refunded_events, shares.len() as i64);
    for p in &payments {
        let id = splitpay::domain::ids::SplitPaymentId::parse(&p.payment.id).unwrap();
        let money = common::money::assert_conserved_at_stripe(&flow, &id).await;
        assert_eq!(
            money.transferred_at_stripe_cents, 0,
            "every transferred share given back"
        );
    }
    println!("ops refund crash test: {summary:?}");
    flow.stop().await;
}

/// A reversal request was at Stripe when the worker was killed, and it is retried only a day later (every worker was
/// down, or Stripe unreachable): Stripe forgets a key after 24 h, so the same key would now make a second reversal.
/// Exactly one reversal per part must remain at Stripe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_whose_answer_died_with_the_worker_is_not_made_again_a_day_later() {
    let seed = seed("day-later reversal test");
    let flow = Flow::start_with(AmountMode::Fixed, &AMOUNTS, &[], false).await;
    flow.control.top_up("aud", 1_000_000).await.unwrap();
    let workers = Workers::new("reversal-day-later", seed);
    let payments = distributed(&flow, Some(&workers), 1).await;
    let p = &payments[0];
    // Stripe holds each call 1.5 s while it executes it: the worker is killed inside that window.
    flow.control.set_latency(0, 0, 1_500).await.unwrap();
    let params = CreateRefundParams {
        target: RefundTarget::PaymentIntent(p.payment.payment_intent_id.clone().unwrap()),
        amount_cents: Some(1_000),
        reason: None,
        metadata: Default::default(),
        idempotency_key: format!("dashboard-day-later-{seed}"),
    };
    flow.gateway.create_refund(&params).await.unwrap();
    let mut worker = workers.spawn(&flow);
    for _ in 0..3_000 {
        if posts(&flow, "/reversals").await > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    kill(&mut worker);
    // Stripe finishes what it took; nobody records its answers.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    flow.control.set_latency(0, 0, 0).await.unwrap();
    let made: usize = transfers_at_stripe(&flow, &p.payment.transfer_group)
        .await
        .iter()
        .map(|t| reversals_of(t).len())
        .sum();
    let unrecorded = scalar(
        &flow,
        "SELECT count(*) FROM transfer_reversals WHERE status = 'PENDING'",
    )
    .await;
    assert!(
        made > 0 && unrecorded > 0,
        "made {made}, unrecorded {unrecorded}: the kill came too early or late"
    );

    // A day later: Stripe has forgotten the keys, and splitpay's rows are a day old.
    flow.control.advance_clock(25 * 3_600).await.unwrap();
    sqlx::query(
        "UPDATE transfer_reversals SET created_at = created_at - interval '25 hours',
                updated_at = updated_at - interval '25 hours'",
    )
    .execute(&flow.db.pool)
    .await
    .unwrap();
    let mut worker = workers.spawn(&flow);
    let settled = "SELECT NOT EXISTS (SELECT 1 FROM transfer_reversals WHERE status = 'PENDING')
                      AND NOT EXISTS (SELECT 1 FROM stripe_events WHERE processed_at IS NULL)";
    wait_for(&flow, "the reversals recorded", settled, Duration::from_secs(60)).await;
    kill(&mut worker);
    let reversals = assert_reversals_match_stripe(&flow, std::slice::from_ref(&p.payment.transfer_group)).await;
    assert_eq!(reversals, AMOUNTS.len(), "one reversal per share's part");
    let id = splitpay::domain::ids::SplitPaymentId::parse(&p.payment.id).unwrap();
    common::money::conserved_at_stripe(flow.gateway.as_ref(), &flow.db.pool, &id)
        .await
        .unwrap_or_else(|e| panic!("{id}: {e} (seed {seed})"));
    println!("day-later reversal test: {made} reversals made while the worker died, {unrecorded} unrecorded");
}
