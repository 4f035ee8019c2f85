//! Disputes (issue 8, point 3): `charge.dispute.funds_withdrawn` taken like a refund of the disputed amount, and
//! `charge.dispute.funds_reinstated` sending what it took back as new transfer generations, with
//! `donation.refunded` and `donation.refund_reversed` once per dispute and donation. Real PostgreSQL, the simulator
//! over HTTP (its disputes, balances and clock), the worker in the test process. Money is checked at Stripe: what
//! each recipient holds, the dispute's status and amount, and conservation with the `disputed` term.

mod common;

use common::contract::validate_against_contract;
use common::flow::Flow;
use common::money::assert_conserved_at_stripe;
use common::refunds::{
    donation_of, donations_confirmed_again, held_per_share, hold_webhooks, nets, open_dispute, ops_refund,
    redeliver_twice_at_once, release_webhooks, scalar, settle_until, settle_until_sql, three_shares_paid,
};
use common::stripe::raw_get;
use serde_json::Value;
use splitpay::domain::ids::SplitPaymentId;
use splitpay::domain::plan::{AmountMode, PaymentMethodType};
use splitpay::domain::state::{AllocationStatus, DonationStatus, PaymentStatus};
use splitpay::store::money_report::{money_report, MoneyReport};
use splitpay::store::payments::SplitPayment;
use splitpay::stripe::sim::model::SimConfig;

/// The charge's disputes as Stripe holds them.
async fn disputes_at_stripe(flow: &Flow, charge: &str) -> Vec<Value> {
    raw_get(&flow.sim, &format!("disputes?charge={charge}")).await["data"]
        .as_array()
        .unwrap()
        .clone()
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

/// Waits until the withdrawal is taken and settled: parts covered, reversals made, no share in flight.
async fn settle_withdrawal(flow: &Flow, id: &SplitPaymentId) {
    settle_until(flow, "the withdrawal taken", 600, async |f| {
        let p = f.payment(id).await;
        p.payment.status == PaymentStatus::Succeeded
            && p.allocations
                .iter()
                .all(|a| matches!(a.status, AllocationStatus::Transferred | AllocationStatus::Refunded))
            && scalar(f, "SELECT count(*) FROM disputes WHERE withdrawn_at IS NOT NULL").await == 1
            && scalar(f, "SELECT count(*) FROM refund_parts WHERE covered_at IS NULL").await == 0
            && scalar(f, "SELECT count(*) FROM transfer_reversals WHERE status = 'PENDING'").await == 0
    })
    .await;
}

/// Waits until the reinstatement is applied and every share holds its transfer again; returns the payment then.
async fn settle_reinstatement(flow: &Flow, id: &SplitPaymentId) -> SplitPayment {
    // One statement, so one snapshot: read one at a time, the shares could be seen still TRANSFERRED at their first
    // generation and then, the reinstatement committing in between, the refund reinstated (it moves both at once).
    let settled = format!(
        "SELECT (bool_and(a.status = 'TRANSFERRED')
                 AND (SELECT count(*) FROM refunds WHERE source = 'dispute' AND reinstated_at IS NOT NULL) = 1
                 -- A reversal whose answer comes after the reinstatement is recorded then, and its share sent again
                 -- then: until none is PENDING, the shares can still be TRANSFERRED at their first generation.
                 AND NOT EXISTS (SELECT 1 FROM transfer_reversals WHERE status = 'PENDING'))::int::bigint
           FROM split_allocations a WHERE a.split_payment_id = '{id}'"
    );
    settle_until_sql(flow, "the reinstatement", 600, &settled).await;
    flow.payment(id).await
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

/// A card payment whose charge is disputed at once (`pm_card_createDispute`), with its withdrawal settled.
async fn disputed_card_payment() -> (Flow, SplitPaymentId, SplitPayment) {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000, 3_000], &[]).await;
    // The platform has funds of its own available: a share whose transfer was reversed is sent again from there
    // (the charge's own funds are still pending).
    flow.control.top_up("aud", 1_000_000).await.unwrap();
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_createDispute", Some("cm3donor1"))
        .await;
    settle_withdrawal(&flow, &id).await;
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
        let (status, refunded, deleted, events) = donation_of(flow, &p.allocations[i], "donation.refunded").await;
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
    let nets = nets(&p);

    // The withdrawal delivered again, twice at once: nothing moves twice.
    let before = footprint(&flow).await;
    redeliver_twice_at_once(&flow, "charge.dispute.funds_withdrawn").await;
    assert_eq!(footprint(&flow).await, before);

    let charge = p.payment.charge_id.clone().unwrap();
    let closed = flow.control.close_dispute(&charge, true).await.unwrap();
    assert_eq!(closed["status"], "won");
    let p = settle_reinstatement(&flow, &id).await;
    assert_eq!(
        held_per_share(&flow, &p).await,
        nets,
        "each recipient holds its net again"
    );
    let reversed = donations_confirmed_again(&flow, &p).await;
    for (a, event) in p.allocations.iter().zip(&reversed) {
        assert_eq!(event["data"]["refunded_amount_cents"], 0);
        assert_eq!(event["data"]["deleted_at"], Value::Null);
        let (_, _, _, refunded_events) = donation_of(&flow, a, "donation.refunded").await;
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
    settle_until(&flow, "the dispute closed", 600, async |f| {
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
    let nets = nets(&p);
    assert_eq!(held_per_share(&flow, &p).await, nets);
    let charge = p.payment.charge_id.clone().unwrap();
    assert!(disputes_at_stripe(&flow, &charge).await.is_empty(), "no dispute yet");

    // Four months on, the bank disputes the debit and the platform wins it; Stripe's events are held, then
    // delivered newest first: `funds_reinstated` before `funds_withdrawn`.
    hold_webhooks(&flow).await;
    flow.control.advance_clock(LATER_SECS + 60).await.unwrap();
    let disputes = disputes_at_stripe(&flow, &charge).await;
    assert_eq!(disputes.len(), 1, "the dispute opened on the simulated clock");
    assert_eq!(disputes[0]["amount"], p.payment.total_amount_cents);
    flow.control.close_dispute(&charge, true).await.unwrap();
    release_webhooks(&flow).await;
    let p = settle_reinstatement(&flow, &id).await;

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
    donations_confirmed_again(&flow, &p).await;
    for (i, a) in p.allocations.iter().enumerate() {
        let (_, _, _, refunded) = donation_of(&flow, a, "donation.refunded").await;
        assert_eq!(refunded.len(), 1, "share {i}");
    }
    assert_money(&flow, &id).await;

    // An operator then tries to refund the first share: Stripe refuses refunds of a disputed charge, so the
    // command refuses before reversing anything (a reversal first would strand the recipient's money).
    let a0 = p.allocations[0].clone();
    let before = footprint(&flow).await;
    let out = ops_refund(&flow, &a0.id, &["--reverse-transfer", "--yes", "--actor", "alice"]);
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
    // The platform's own available funds carry the new transfers (the charge's are still pending, and the
    // earlier transfers used the shares' room on it).
    let (flow, id, p) = three_shares_paid(&[]).await;
    let nets = nets(&p);
    let charge = open_dispute(&flow, &p).await;
    settle_withdrawal(&flow, &id).await;
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
    let p = settle_reinstatement(&flow, &id).await;
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
    donations_confirmed_again(&flow, &p).await;
    for i in 0..3 {
        // The second generation announces its own success: to the recipient (the donation is confirmed again)
        // and to the distributor with the new transfer. Dedup keys of generation 1 used to swallow both.
        let (_, _, _, succeeded) = donation_of(&flow, &p.allocations[i], "donation.succeeded").await;
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
