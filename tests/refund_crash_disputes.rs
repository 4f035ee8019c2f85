//! Crash and concurrency tests of the dispute paths (issue 8, point 6), with real `splitpay worker` processes:
//!
//! - disputes withdrawn while the worker is SIGKILLed again and again, then won (reinstated) while it is killed
//!   again: every share is reversed at most once and sent again at most once;
//! - refunds and disputes whose webhooks are duplicated and reordered (a dispute's withdrawal before the refunds
//!   made before it), processed by two worker processes at once, then processed again.
//!
//! Afterwards Stripe's reversals, refunds, disputes and transfers are exactly splitpay's, each donation has one
//! `donation.refunded` per refund part and one `donation.refund_reversed` per part given back, and money is
//! conserved to the cent per payment against the simulator. The seed is printed; rerun with `CRASH_SEED=…`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::flow::Flow;
use common::workers::{
    assert_donation_refund_events, assert_reversals_match_stripe, kill, kill_repeatedly, refunds_at_stripe,
    reversals_of, scalar, stripe_get, transfers_at_stripe, wait_for, Workers,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use splitpay::domain::ids::SplitPaymentId;
use splitpay::domain::plan::{AmountMode, PaymentMethodType};
use splitpay::store::payments::SplitPayment;
use splitpay::stripe::{CreateRefundParams, PaymentGateway, RefundTarget};

const AMOUNTS: [i64; 3] = [1_000, 2_345, 1_655];

fn seed(test: &str) -> u64 {
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("{test} seed: {seed} (rerun with CRASH_SEED={seed})");
    seed
}

/// A flow whose jobs wait for worker processes, with platform funds for refunds, dispute fees and the transfers a
/// won dispute sends again (the charges' own funds are still pending).
async fn flow() -> Arc<Flow> {
    let flow = Arc::new(Flow::start_with(AmountMode::Fixed, &AMOUNTS, &[], false).await);
    flow.control.top_up("aud", 10_000_000).await.unwrap();
    flow
}

/// `payments` card payments, every share transferred by the workers already running.
async fn distributed(flow: &Flow, payments: usize) -> Vec<SplitPayment> {
    let mut ids = Vec::new();
    for i in 0..payments {
        let (id, _) = flow
            .pay(PaymentMethodType::Card, "pm_card_visa", Some(&format!("cm3donor{i}")))
            .await;
        ids.push(id);
    }
    let sql = format!(
        "SELECT count(*) = {} FROM split_allocations WHERE status = 'TRANSFERRED'",
        payments * AMOUNTS.len()
    );
    wait_for(flow, "every share transferred", &sql, Duration::from_secs(60)).await;
    let mut out = Vec::new();
    for id in &ids {
        out.push(flow.payment(id).await);
    }
    out
}

fn pid(p: &SplitPayment) -> SplitPaymentId {
    SplitPaymentId::parse(&p.payment.id).unwrap()
}

fn charge(p: &SplitPayment) -> String {
    p.payment.charge_id.clone().unwrap()
}

/// Nothing open: no event unprocessed, no part waiting, no reversal pending, no transfer in flight.
const QUIET: &str = "NOT EXISTS (SELECT 1 FROM stripe_events WHERE processed_at IS NULL)
     AND NOT EXISTS (SELECT 1 FROM refund_parts WHERE covered_at IS NULL)
     AND NOT EXISTS (SELECT 1 FROM transfer_reversals WHERE status = 'PENDING')
     AND NOT EXISTS (SELECT 1 FROM split_allocations WHERE status IN ('PENDING', 'TRANSFERRING'))";

async fn assert_conserved(flow: &Flow, payments: &[SplitPayment], seed: u64) {
    for p in payments {
        let money = common::money::conserved_at_stripe(flow.gateway.as_ref(), &flow.db.pool, &pid(p))
            .await
            .unwrap_or_else(|e| panic!("{}: {e} (seed {seed})", p.payment.id));
        assert_eq!(money.charged_cents, p.payment.total_amount_cents);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disputes_withdrawn_and_won_while_workers_die_reverse_and_resend_each_share_once() {
    const PAYMENTS: usize = 6;
    const KILLS: usize = 6;
    let seed = seed("dispute crash test");
    let mut rng = StdRng::seed_from_u64(seed);
    let flow = flow().await;
    let workers = Workers::new("dispute-crash", seed);
    let mut worker = workers.spawn(&flow);
    let payments = distributed(&flow, PAYMENTS).await;
    kill(&mut worker);
    flow.control.set_latency(10, 60, 0).await.unwrap();

    // Each charge is disputed (its funds withdrawn at once) while workers are killed.
    let charges: Vec<String> = payments.iter().map(charge).collect();
    let pauses: Vec<u64> = charges.iter().map(|_| rng.random_range(0..400)).collect();
    let disputer = {
        let (flow, charges, pauses) = (flow.clone(), charges.clone(), pauses.clone());
        tokio::spawn(async move {
            for (charge, pause) in charges.iter().zip(pauses) {
                tokio::time::sleep(Duration::from_millis(pause)).await;
                flow.control.open_dispute(charge).await.unwrap();
            }
        })
    };
    let pending = "SELECT count(*) FROM transfer_reversals WHERE status = 'PENDING'";
    let (kills1, in_flight1) = kill_repeatedly(&flow, &workers, &mut rng, KILLS, &disputer, pending).await;
    disputer.await.unwrap();
    let withdrawn =
        format!("SELECT (SELECT count(*) FROM disputes WHERE refund_id IS NOT NULL) = {PAYMENTS} AND {QUIET}");
    workers.survivor_until(&flow, "the withdrawals taken", &withdrawn).await;
    // Every transfer given back whole, in one reversal.
    let groups: Vec<String> = payments.iter().map(|p| p.payment.transfer_group.clone()).collect();
    for group in &groups {
        for t in transfers_at_stripe(&flow, group).await {
            assert_eq!(t["amount_reversed"], t["amount"], "{t}");
            assert_eq!(reversals_of(&t).len(), 1, "{t}");
        }
    }
    assert_conserved(&flow, &payments, seed).await;

    // Each dispute is won: the withdrawal comes back, and each share is sent again (a new generation from the
    // platform's balance) while workers are killed.
    let closer = {
        let (flow, charges) = (flow.clone(), charges.clone());
        tokio::spawn(async move {
            for (charge, pause) in charges.iter().zip(pauses) {
                tokio::time::sleep(Duration::from_millis(pause)).await;
                flow.control.close_dispute(charge, true).await.unwrap();
            }
        })
    };
    let (kills2, in_flight2) = kill_repeatedly(
        &flow,
        &workers,
        &mut rng,
        KILLS,
        &closer,
        "SELECT count(*) FROM split_allocations WHERE status IN ('PENDING', 'TRANSFERRING')",
    )
    .await;
    closer.await.unwrap();
    let reinstated = format!(
        "SELECT (SELECT count(*) FROM refunds WHERE source = 'dispute' AND reinstated_at IS NOT NULL) = {PAYMENTS}
            AND (SELECT count(*) FROM disputes WHERE status = 'won') = {PAYMENTS}
            AND NOT EXISTS (SELECT 1 FROM split_allocations WHERE status <> 'TRANSFERRED') AND {QUIET}"
    );
    workers
        .survivor_until(&flow, "the reinstatements applied", &reinstated)
        .await;

    // Per share at Stripe: its first transfer reversed once, whole, and one more transfer of the same net, not
    // reversed: the recipient holds its net again.
    for p in &payments {
        let transfers = transfers_at_stripe(&flow, &p.payment.transfer_group).await;
        for a in &p.allocations {
            let mut mine: Vec<_> = transfers
                .iter()
                .filter(|t| t["metadata"]["split_allocation_id"] == a.id.as_str())
                .collect();
            mine.sort_by_key(|t| t["created"].as_i64());
            let net = a.net_amount_cents.unwrap();
            let shape: Vec<(i64, i64, usize)> = mine
                .iter()
                .map(|t| {
                    (
                        t["amount"].as_i64().unwrap(),
                        t["amount_reversed"].as_i64().unwrap(),
                        reversals_of(t).len(),
                    )
                })
                .collect();
            let mut sorted = shape.clone();
            sorted.sort_by_key(|s| s.1);
            assert_eq!(sorted, [(net, 0, 0), (net, net, 1)], "{} (seed {seed})", a.id);
        }
    }
    assert_reversals_match_stripe(&flow, &groups).await;
    let (refunded, reversed) = assert_donation_refund_events(&flow).await;
    let shares = (PAYMENTS * AMOUNTS.len()) as i64;
    assert_eq!((refunded, reversed), (shares, shares));
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM donations WHERE status = 'CONFIRMED' AND refunded_amount_cents = 0
                AND deleted_at IS NULL"
        )
        .await,
        shares
    );
    assert_conserved(&flow, &payments, seed).await;
    println!(
        "dispute crash test: withdrawals {kills1} kills ({in_flight1} with reversals pending), reinstatements \
         {kills2} kills ({in_flight2} with transfers open)"
    );
}

/// Every stored event of these types marked unprocessed and handed to the workers again, twice (two jobs each, so
/// both workers may take the same event at once). Returns how many events.
async fn reprocess(flow: &Flow, like: &[&str]) -> usize {
    use splitpay::jobs::queue::{enqueue, Queue};
    let mut tx = flow.db.pool.begin().await.unwrap();
    let mut ids: Vec<String> = Vec::new();
    for pattern in like {
        ids.extend(
            sqlx::query_scalar::<_, String>(
                "UPDATE stripe_events SET processed_at = NULL WHERE event_type LIKE $1 RETURNING id",
            )
            .bind(pattern)
            .fetch_all(&mut *tx)
            .await
            .unwrap(),
        );
    }
    for id in &ids {
        for _ in 0..2 {
            enqueue(&mut tx, Queue::StripeEvent, id, None).await.unwrap();
        }
    }
    tx.commit().await.unwrap();
    ids.len()
}

/// The stored events whose type is `like` any of these, processed again by the running workers: once all is quiet,
/// nothing has changed.
async fn assert_reprocessing_changes_nothing(flow: &Flow, like: &[&str]) {
    let before = footprint(flow).await;
    let again = reprocess(flow, like).await;
    wait_for(
        flow,
        "the events processed again",
        &format!("SELECT {QUIET}"),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        footprint(flow).await,
        before,
        "processing {again} events again changed something"
    );
}

/// Rows that processing an event again must leave as they are.
async fn footprint(flow: &Flow) -> Vec<i64> {
    let mut counts = Vec::new();
    for table in [
        "refunds",
        "refund_parts",
        "transfer_reversals",
        "transfer_attempts",
        "outbox_events",
        "disputes",
    ] {
        counts.push(common::count(&flow.db.pool, table).await);
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_and_reordered_refund_and_dispute_webhooks_with_two_workers_move_money_once() {
    const PAYMENTS: usize = 6;
    let seed = seed("reordered webhooks test");
    let flow = flow().await;
    let workers = Workers::new("reordered-webhooks", seed);
    let mut both = [workers.spawn(&flow), workers.spawn(&flow)];
    let payments = distributed(&flow, PAYMENTS).await;

    // Every event delivered twice, and held back to be released newest first: a dispute's withdrawal before the
    // refunds made before it, `refund.created` before `charge.refunded`, a second refund before the first.
    flow.control
        .webhook_mode(json!({ "duplicate": true, "hold": true }))
        .await
        .unwrap();
    let (mut refunds, mut disputed) = (0, Vec::new());
    for (i, p) in payments.iter().enumerate() {
        let pi = p.payment.payment_intent_id.clone().unwrap();
        for (k, amount) in [1_200, 800]
            .into_iter()
            .enumerate()
            .take(if i % 2 == 0 { 2 } else { 1 })
        {
            let params = CreateRefundParams {
                target: RefundTarget::PaymentIntent(pi.clone()),
                amount_cents: Some(amount),
                reason: None,
                metadata: Default::default(),
                idempotency_key: format!("dashboard-{seed}-{i}-{k}"),
            };
            flow.gateway.create_refund(&params).await.unwrap();
            refunds += 1;
        }
        if i % 3 != 2 {
            flow.control.open_dispute(&charge(p)).await.unwrap();
            disputed.push(i);
        }
    }
    let released = flow.control.flush_webhooks().await.unwrap();
    flow.control.webhook_mode(json!({ "hold": false })).await.unwrap();
    let settled = format!(
        "SELECT (SELECT count(*) FROM refunds WHERE source = 'external') >= {refunds}
            AND (SELECT count(*) FROM disputes WHERE refund_id IS NOT NULL) >= {}
            AND NOT EXISTS (SELECT 1 FROM refunds WHERE status = 'SUCCEEDED' AND attributed_at IS NULL) AND {QUIET}",
        disputed.len()
    );
    wait_for(
        &flow,
        "refunds and withdrawals applied",
        &settled,
        Duration::from_secs(60),
    )
    .await;
    assert_conserved(&flow, &payments, seed).await;

    // The same events processed again, by both workers at once: nothing changes.
    assert_reprocessing_changes_nothing(&flow, &["charge.refund%", "refund.%", "charge.dispute.%"]).await;

    // Half the disputes won (the withdrawal comes back, the shares are sent again), half lost; their events
    // duplicated and reordered too (`closed` before `funds_reinstated`).
    flow.control.webhook_mode(json!({ "hold": true })).await.unwrap();
    let mut won = 0;
    for (n, &i) in disputed.iter().enumerate() {
        let closed = flow
            .control
            .close_dispute(&charge(&payments[i]), n % 2 == 0)
            .await
            .unwrap();
        won += usize::from(closed["status"] == "won");
    }
    flow.control.flush_webhooks().await.unwrap();
    flow.control.webhook_mode(json!({ "hold": false })).await.unwrap();
    let closed = format!(
        "SELECT (SELECT count(*) FROM disputes WHERE status IN ('won', 'lost')) = {}
            AND (SELECT count(*) FROM refunds WHERE source = 'dispute' AND reinstated_at IS NOT NULL) >= {won}
            AND {QUIET}",
        disputed.len()
    );
    wait_for(&flow, "the disputes closed", &closed, Duration::from_secs(60)).await;
    assert_reprocessing_changes_nothing(&flow, &["charge.dispute.%"]).await;
    for worker in &mut both {
        kill(worker);
    }

    // Stripe's refunds and disputes are splitpay's, one row each.
    for p in &payments {
        let mut at_stripe: Vec<(String, i64)> = refunds_at_stripe(&flow, &charge(p))
            .await
            .iter()
            .map(|r| (r["id"].as_str().unwrap().to_owned(), r["amount"].as_i64().unwrap()))
            .collect();
        at_stripe.sort();
        let recorded: Vec<(String, i64)> = sqlx::query_as(
            "SELECT stripe_refund_id, amount_cents FROM refunds WHERE split_payment_id = $1 AND source = 'external'
              ORDER BY stripe_refund_id",
        )
        .bind(&p.payment.id)
        .fetch_all(&flow.db.pool)
        .await
        .unwrap();
        assert_eq!(at_stripe, recorded, "{}", p.payment.id);
        let disputes: Vec<(String, String, i64)> = stripe_get(&flow, &format!("disputes?charge={}", charge(p))).await
            ["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["id"].as_str().unwrap().to_owned(),
                    d["status"].as_str().unwrap().to_owned(),
                    d["amount"].as_i64().unwrap(),
                )
            })
            .collect();
        let recorded: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT d.stripe_dispute_id, d.status, r.amount_cents FROM disputes d JOIN refunds r ON r.id = d.refund_id
              WHERE d.split_payment_id = $1 AND r.source = 'dispute'",
        )
        .bind(&p.payment.id)
        .fetch_all(&flow.db.pool)
        .await
        .unwrap();
        assert_eq!(disputes, recorded, "{}", p.payment.id);
    }
    let groups: Vec<String> = payments.iter().map(|p| p.payment.transfer_group.clone()).collect();
    let reversals = assert_reversals_match_stripe(&flow, &groups).await;
    let (refunded, given_back) = assert_donation_refund_events(&flow).await;
    let errors: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT event_type, process_error FROM stripe_events WHERE process_error IS NOT NULL")
            .fetch_all(&flow.db.pool)
            .await
            .unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    assert_conserved(&flow, &payments, seed).await;
    println!(
        "reordered webhooks test: {released} deliveries released reordered, {refunds} refunds, {} disputes ({won} \
         won), {reversals} reversals, {refunded} donation.refunded, {given_back} donation.refund_reversed",
        disputed.len()
    );
}
