//! Disputes (issue 8, point 3): `charge.dispute.funds_withdrawn` taken like a refund of the disputed amount, and
//! `charge.dispute.funds_reinstated` sending what it took back as new transfer generations, with
//! `donation.refunded` and `donation.refund_reversed` once per dispute and donation. Real PostgreSQL, the simulator
//! over HTTP (its disputes, balances and clock), the worker in the test process. Money is checked at Stripe: what
//! each recipient holds, the dispute's status and amount, and conservation with the `disputed` term.

mod common;

use common::contract::validate_against_contract;
use common::flow::Flow;
use common::money::assert_conserved_at_stripe;
use serde_json::Value;
use splitpay::domain::ids::{SplitAllocationId, SplitPaymentId};
use splitpay::domain::plan::{AmountMode, PaymentMethodType};
use splitpay::domain::state::{AllocationStatus, DonationStatus, PaymentStatus};
use splitpay::store::donations::donation_for_allocation;
use splitpay::store::money_report::{money_report, MoneyReport};
use splitpay::store::payments::SplitPayment;
use splitpay::stripe::sim::model::SimConfig;
use splitpay::stripe::PaymentGateway;

async fn stripe_get(flow: &Flow, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{}/v1/{path}", flow.sim.base_url().trim_end_matches('/')))
        .bearer_auth(common::stripe::TEST_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The charge's disputes as Stripe holds them.
async fn disputes_at_stripe(flow: &Flow, charge: &str) -> Vec<Value> {
    stripe_get(flow, &format!("disputes?charge={charge}")).await["data"]
        .as_array()
        .unwrap()
        .clone()
}

/// What each share's recipient holds at Stripe for it: its transfers less their reversals, in the set's order.
async fn held_per_share(flow: &Flow, p: &SplitPayment) -> Vec<i64> {
    let transfers = flow.gateway.list_transfers(&p.payment.transfer_group).await.unwrap();
    p.allocations
        .iter()
        .map(|a| {
            transfers
                .iter()
                .filter(|t| t.metadata.get("split_allocation_id") == Some(&a.id))
                .map(|t| t.amount_cents - t.amount_reversed_cents)
                .sum()
        })
        .collect()
}

async fn report(flow: &Flow, id: &SplitPaymentId) -> MoneyReport {
    money_report(&mut flow.db.pool.acquire().await.unwrap(), id)
        .await
        .unwrap()
}

/// Conservation against Stripe, and the `disputed` term against the disputes Stripe holds (a won dispute's funds
/// are back; any other's are withdrawn).
async fn assert_money(flow: &Flow, id: &SplitPaymentId) {
    assert_conserved_at_stripe(flow, id).await;
    let p = flow.payment(id).await;
    let withdrawn: i64 = disputes_at_stripe(flow, p.payment.charge_id.as_deref().unwrap())
        .await
        .iter()
        .filter(|d| d["status"] != "won")
        .map(|d| d["amount"].as_i64().unwrap())
        .sum();
    assert_eq!(
        report(flow, id).await.disputed_cents,
        withdrawn,
        "disputed as Stripe holds it"
    );
}

/// Waits (bounded) until `done`, running the refunds reconciler each turn as the cron would.
async fn settle_until(flow: &Flow, what: &str, done: impl AsyncFn(&Flow) -> bool) {
    for _ in 0..600 {
        if done(flow).await {
            return;
        }
        splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let rows: Vec<(String, String, i32, Option<i64>)> =
        sqlx::query_as("SELECT id, status, generation, net_amount_cents FROM split_allocations ORDER BY position")
            .fetch_all(&flow.db.pool)
            .await
            .unwrap();
    let disputes: Vec<(String, String, Option<i64>)> =
        sqlx::query_as("SELECT stripe_dispute_id, status, refund_id FROM disputes")
            .fetch_all(&flow.db.pool)
            .await
            .unwrap();
    let events: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT event_type, process_error FROM stripe_events ORDER BY received_at")
            .fetch_all(&flow.db.pool)
            .await
            .unwrap_or_default();
    panic!("timed out waiting for {what}: {rows:?} {disputes:?} {events:?}");
}

async fn scalar(flow: &Flow, sql: &'static str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(&flow.db.pool)
        .await
        .unwrap()
}

/// The withdrawal is taken and settled: parts covered, reversals made, no share in flight.
async fn withdrawal_settled(flow: &Flow, id: &SplitPaymentId) -> bool {
    let p = flow.payment(id).await;
    p.payment.status == PaymentStatus::Succeeded
        && p.allocations
            .iter()
            .all(|a| matches!(a.status, AllocationStatus::Transferred | AllocationStatus::Refunded))
        && scalar(flow, "SELECT count(*) FROM disputes WHERE withdrawn_at IS NOT NULL").await == 1
        && scalar(flow, "SELECT count(*) FROM refund_parts WHERE covered_at IS NULL").await == 0
        && scalar(flow, "SELECT count(*) FROM transfer_reversals WHERE status = 'PENDING'").await == 0
}

/// The reinstatement is applied and every share holds its transfer again.
async fn reinstatement_settled(flow: &Flow, id: &SplitPaymentId) -> bool {
    let p = flow.payment(id).await;
    p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
        && scalar(
            flow,
            "SELECT count(*) FROM refunds WHERE source = 'dispute' AND reinstated_at IS NOT NULL",
        )
        .await
            == 1
}

/// The donation of share `i`: status, refunded amount, deleted, and its `event_type` payloads (validated).
async fn donation_of(
    flow: &Flow,
    p: &SplitPayment,
    i: usize,
    event_type: &str,
) -> (DonationStatus, i64, bool, Vec<Value>) {
    let aid = SplitAllocationId::parse(&p.allocations[i].id).unwrap();
    let d = donation_for_allocation(&mut flow.db.pool.acquire().await.unwrap(), &aid)
        .await
        .unwrap()
        .unwrap();
    let events: Vec<Value> = flow
        .events(&d.id)
        .await
        .into_iter()
        .filter(|e| e["type"] == event_type)
        .collect();
    for e in &events {
        validate_against_contract(e).unwrap_or_else(|err| panic!("{err}: {e}"));
    }
    (d.status, d.refunded_amount_cents, d.deleted_at.is_some(), events)
}

/// Everything a duplicate must leave as it was.
async fn footprint(flow: &Flow) -> [i64; 6] {
    [
        scalar(flow, "SELECT count(*) FROM refunds").await,
        scalar(flow, "SELECT count(*) FROM refund_parts").await,
        scalar(flow, "SELECT count(*) FROM transfer_reversals").await,
        scalar(flow, "SELECT count(*) FROM transfer_attempts").await,
        scalar(flow, "SELECT count(*) FROM outbox_events").await,
        scalar(flow, "SELECT count(*) FROM disputes").await,
    ]
}

/// Stripe delivers the stored `event_type` again, twice at once: processed, and nothing changes.
async fn redeliver_twice_at_once(flow: &Flow, event_type: &str) {
    let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM stripe_events WHERE event_type = $1")
        .bind(event_type)
        .fetch_all(&flow.db.pool)
        .await
        .unwrap();
    assert!(!ids.is_empty(), "{event_type} was received");
    for id in ids {
        sqlx::query("UPDATE stripe_events SET processed_at = NULL WHERE id = $1")
            .bind(&id)
            .execute(&flow.db.pool)
            .await
            .unwrap();
        let (a, b) = tokio::join!(
            splitpay::jobs::stripe_event::process(&flow.ctx, &id),
            splitpay::jobs::stripe_event::process(&flow.ctx, &id)
        );
        a.unwrap();
        b.unwrap();
    }
}

/// A card payment whose charge is disputed at once (`pm_card_createDispute`), with its withdrawal settled.
async fn disputed_card_payment() -> (Flow, SplitPaymentId, SplitPayment) {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000, 3_000], &[]).await;
    // The platform has funds of its own available: a share whose transfer was reversed is sent again from there
    // (the charge's own funds are still pending).
    flow.control.top_up("aud", 1_000_000).await.unwrap();
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_createDispute", Some("cm3donor1"))
        .await;
    settle_until(&flow, "the withdrawal taken", async |f| {
        withdrawal_settled(f, &id).await
    })
    .await;
    let p = flow.payment(&id).await;
    (flow, id, p)
}

/// What every disputed share looks like once the withdrawal of the whole charge is settled.
async fn assert_withdrawn(flow: &Flow, id: &SplitPaymentId, p: &SplitPayment) {
    let charge = p.payment.charge_id.clone().unwrap();
    let disputes = disputes_at_stripe(flow, &charge).await;
    assert_eq!(disputes.len(), 1);
    assert_eq!(disputes[0]["amount"], p.payment.total_amount_cents);
    assert_eq!(held_per_share(flow, p).await, [0, 0, 0], "every share taken back");
    let r = report(flow, id).await;
    assert_eq!((r.disputed_cents, r.refunded_cents), (p.payment.total_amount_cents, 0));
    // Stripe's dispute fee (the simulator's 2,500), as the withdrawal's balance transaction books it.
    assert_eq!(scalar(flow, "SELECT fee_cents FROM disputes").await, 2_500);
    for i in 0..3 {
        let (status, refunded, deleted, events) = donation_of(flow, p, i, "donation.refunded").await;
        assert_eq!(
            (status, deleted, events.len()),
            (DonationStatus::Refunded, true, 1),
            "share {i}"
        );
        assert!(refunded > 0);
        assert_eq!(events[0]["data"]["status"], "REFUNDED");
    }
    assert_money(flow, id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_dispute_withdrawn_then_won_sends_each_share_again_once() {
    let (flow, id, p) = disputed_card_payment().await;
    assert_withdrawn(&flow, &id, &p).await;
    let nets: Vec<i64> = p.allocations.iter().map(|a| a.net_amount_cents.unwrap()).collect();

    // The withdrawal delivered again, twice at once: nothing moves twice.
    let before = footprint(&flow).await;
    redeliver_twice_at_once(&flow, "charge.dispute.funds_withdrawn").await;
    assert_eq!(footprint(&flow).await, before);

    let charge = p.payment.charge_id.clone().unwrap();
    let closed = flow.control.close_dispute(&charge, true).await.unwrap();
    assert_eq!(closed["status"], "won");
    settle_until(&flow, "the reinstatement", async |f| {
        reinstatement_settled(f, &id).await
    })
    .await;
    let p = flow.payment(&id).await;
    assert_eq!(
        held_per_share(&flow, &p).await,
        nets,
        "each recipient holds its net again"
    );
    for i in 0..p.allocations.len() {
        let (status, refunded, deleted, events) = donation_of(&flow, &p, i, "donation.refund_reversed").await;
        assert_eq!(
            (status, refunded, deleted, events.len()),
            (DonationStatus::Confirmed, 0, false, 1),
            "share {i}"
        );
        assert_eq!(events[0]["data"]["refunded_amount_cents"], 0);
        assert_eq!(events[0]["data"]["deleted_at"], Value::Null);
        let (_, _, _, refunded_events) = donation_of(&flow, &p, i, "donation.refunded").await;
        assert_eq!(refunded_events.len(), 1, "one donation.refunded per dispute");
    }
    assert_eq!(report(&flow, &id).await.disputed_cents, 0);
    assert_eq!(
        scalar(&flow, "SELECT fee_cents FROM disputes").await,
        0,
        "the fee returned with the won dispute"
    );
    assert_money(&flow, &id).await;

    // Both events again, twice at once: no transfer, reversal, event or row is added.
    let before = footprint(&flow).await;
    redeliver_twice_at_once(&flow, "charge.dispute.funds_reinstated").await;
    redeliver_twice_at_once(&flow, "charge.dispute.funds_withdrawn").await;
    assert_eq!(footprint(&flow).await, before);
    assert_eq!(held_per_share(&flow, &p).await, nets);
    assert_eq!(
        scalar(&flow, "SELECT fee_cents FROM disputes").await,
        0,
        "a late withdrawal event does not bring the fee back"
    );
    assert_money(&flow, &id).await;

    // `ops show` lists the dispute beside the refund row standing for its withdrawal.
    let show = flow.ops(&["show", &p.payment.id, "--json"]);
    let show: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(show["disputes"][0]["status"], "won", "{show}");
    assert_eq!(show["disputes"][0]["refund_id"], show["refunds"][0]["id"], "{show}");
    assert_eq!(show["refunds"][0]["source"], "dispute", "{show}");
    let table = String::from_utf8_lossy(&flow.ops(&["show", &p.payment.id]).stdout).into_owned();
    assert!(table.contains("funds withdrawn, then reinstated"), "{table}");
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_dispute_keeps_the_withdrawal_as_a_refund_to_the_donor() {
    let (flow, id, p) = disputed_card_payment().await;
    let charge = p.payment.charge_id.clone().unwrap();
    let closed = flow.control.close_dispute(&charge, false).await.unwrap();
    assert_eq!(closed["status"], "lost");
    settle_until(&flow, "the dispute closed", async |f| {
        scalar(f, "SELECT count(*) FROM disputes WHERE status = 'lost'").await == 1
    })
    .await;
    assert_withdrawn(&flow, &id, &p).await;
    assert_eq!(flow.count_events("donation.refund_reversed").await, 0);
    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM refunds WHERE reinstated_at IS NOT NULL").await,
        0
    );
    let p = flow.payment(&id).await;
    assert!(p.allocations.iter().all(|a| a.status != AllocationStatus::Transferring));
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_becs_dispute_months_later_won_with_its_events_reordered() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000, 3_000], &[]).await;
    const LATER_SECS: i64 = 120 * 86_400;
    flow.control
        .set_config(&SimConfig {
            becs_dispute_after_secs: LATER_SECS,
            ..SimConfig::default()
        })
        .await
        .unwrap();
    let (id, pi) = flow
        .pay(PaymentMethodType::AuBecsDebit, "pm_becs_666666660", Some("cm3donor1"))
        .await;
    flow.control.settle(&pi, None).await.unwrap();
    let p = flow
        .wait_until(&id, "transferred", |p| {
            p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
        })
        .await;
    let nets: Vec<i64> = p.allocations.iter().map(|a| a.net_amount_cents.unwrap()).collect();
    assert_eq!(held_per_share(&flow, &p).await, nets);
    let charge = p.payment.charge_id.clone().unwrap();
    assert!(disputes_at_stripe(&flow, &charge).await.is_empty(), "no dispute yet");

    // Four months on, the bank disputes the debit and the platform wins it; Stripe's events are held, then
    // delivered newest first: `funds_reinstated` before `funds_withdrawn`.
    flow.control
        .webhook_mode(serde_json::json!({ "duplicate": false, "hold": true }))
        .await
        .unwrap();
    flow.control.advance_clock(LATER_SECS + 60).await.unwrap();
    let disputes = disputes_at_stripe(&flow, &charge).await;
    assert_eq!(disputes.len(), 1, "the dispute opened on the simulated clock");
    assert_eq!(disputes[0]["amount"], p.payment.total_amount_cents);
    flow.control.close_dispute(&charge, true).await.unwrap();
    flow.control
        .webhook_mode(serde_json::json!({ "hold": false }))
        .await
        .unwrap();
    flow.control.flush_webhooks().await.unwrap();
    settle_until(&flow, "the reinstatement", async |f| {
        reinstatement_settled(f, &id).await
    })
    .await;

    let p = flow.payment(&id).await;
    assert_eq!(
        held_per_share(&flow, &p).await,
        nets,
        "each recipient holds its net again"
    );
    // The withdrawal was taken (a reversal of each share), then given back per share: a share whose reversal was
    // made gets one new generation; a reversal not made yet when the reinstatement applied (the events came
    // reordered, so both are taken together) is canceled and that share is not sent anything again.
    let reversed: i64 = scalar(
        &flow,
        "SELECT coalesce(sum(amount_cents), 0)::bigint FROM transfer_reversals WHERE status = 'SUCCEEDED'",
    )
    .await;
    let canceled: i64 = scalar(
        &flow,
        "SELECT coalesce(sum(amount_cents), 0)::bigint FROM transfer_reversals WHERE status = 'CANCELED'",
    )
    .await;
    assert_eq!(reversed + canceled, nets.iter().sum::<i64>());
    let made = scalar(
        &flow,
        "SELECT count(*) FROM transfer_reversals WHERE status = 'SUCCEEDED'",
    )
    .await;
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM transfer_attempts WHERE outcome = 'TRANSFERRED'"
        )
        .await,
        3 + made
    );
    for i in 0..3 {
        let (_, _, _, refunded) = donation_of(&flow, &p, i, "donation.refunded").await;
        let (status, amount, deleted, reversed) = donation_of(&flow, &p, i, "donation.refund_reversed").await;
        assert_eq!(
            (refunded.len(), reversed.len(), status, amount, deleted),
            (1, 1, DonationStatus::Confirmed, 0, false),
            "share {i}"
        );
    }
    assert_money(&flow, &id).await;

    // An operator then tries to refund the first share: Stripe refuses refunds of a disputed charge, so the
    // command refuses before reversing anything (a reversal first would strand the recipient's money).
    let a0 = p.allocations[0].clone();
    let before = footprint(&flow).await;
    let out = flow.ops(&[
        "refund",
        &a0.id,
        "--reason",
        "donor asked",
        "--reverse-transfer",
        "--yes",
        "--actor",
        "alice",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("disputed"), "{stderr}");
    assert_eq!(footprint(&flow).await, before, "nothing written");
    assert_eq!(scalar(&flow, "SELECT count(*) FROM ops_audit_log").await, 0);
    assert_eq!(held_per_share(&flow, &p).await, nets, "nothing reversed");
    assert_money(&flow, &id).await;
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_dispute_after_distribution_reverses_then_sends_each_share_again_from_the_balance() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000, 3_000], &[]).await;
    // The platform's own available funds carry the new transfers (the charge's are still pending, and the
    // earlier transfers used the shares' room on it).
    flow.control.top_up("aud", 1_000_000).await.unwrap();
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    let p = flow
        .wait_until(&id, "transferred", |p| {
            p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
        })
        .await;
    let nets: Vec<i64> = p.allocations.iter().map(|a| a.net_amount_cents.unwrap()).collect();
    let charge = p.payment.charge_id.clone().unwrap();
    flow.control.open_dispute(&charge).await.unwrap();
    settle_until(&flow, "the withdrawal taken", async |f| {
        withdrawal_settled(f, &id).await
    })
    .await;
    assert_withdrawn(&flow, &id, &p).await;
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM transfer_reversals WHERE status = 'SUCCEEDED'"
        )
        .await,
        3,
        "each transferred share reversed"
    );

    flow.control.close_dispute(&charge, true).await.unwrap();
    settle_until(&flow, "the reinstatement", async |f| {
        reinstatement_settled(f, &id).await
    })
    .await;
    let p = flow.payment(&id).await;
    assert_eq!(held_per_share(&flow, &p).await, nets);
    let new_generations: Vec<(i32, Option<String>, i64)> = sqlx::query_as(
        "SELECT generation, source_transaction, amount_cents FROM transfer_attempts
          WHERE generation = 2 ORDER BY amount_cents",
    )
    .fetch_all(&flow.db.pool)
    .await
    .unwrap();
    assert_eq!(
        new_generations,
        vec![(2, None, nets[0]), (2, None, nets[1]), (2, None, nets[2])],
        "one new generation per share, from the balance"
    );
    for i in 0..3 {
        let (status, refunded, deleted, events) = donation_of(&flow, &p, i, "donation.refund_reversed").await;
        assert_eq!(
            (status, refunded, deleted, events.len()),
            (DonationStatus::Confirmed, 0, false, 1)
        );
        // The second generation announces its own success: to the recipient (the donation is confirmed again)
        // and to the distributor with the new transfer. Dedup keys of generation 1 used to swallow both.
        let (_, _, _, succeeded) = donation_of(&flow, &p, i, "donation.succeeded").await;
        assert_eq!(succeeded.len(), 2, "share {i}: generation 1 and generation 2");
        let transfers: Vec<String> = flow
            .events(&p.allocations[i].id)
            .await
            .into_iter()
            .filter(|e| e["type"] == "recommendation_set.distribution_succeeded")
            .inspect(|e| validate_against_contract(e).unwrap_or_else(|err| panic!("{err}: {e}")))
            .map(|e| e["data"]["stripe_transfer_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(transfers.len(), 2, "share {i}: {transfers:?}");
        assert_ne!(
            transfers[0], transfers[1],
            "share {i}: each generation names its own transfer"
        );
        assert_eq!(
            Some(&transfers[1]),
            p.allocations[i].stripe_transfer_id.as_ref(),
            "share {i}: the second names the new transfer"
        );
    }
    assert_money(&flow, &id).await;
    flow.stop().await;
}
