//! Review findings on won disputes (issue 8 review of refunds and disputes), each with its test: real PostgreSQL,
//! the simulator over HTTP (its connected balances, payouts, disputes, faults and clock), the worker in the test
//! process. Money is checked at Stripe: what each recipient holds, and conservation.

mod common;

use common::flow::Flow;
use common::money::assert_conserved_at_stripe;
use serde_json::Value;
use splitpay::domain::ids::{SplitAllocationId, SplitPaymentId};
use splitpay::domain::plan::{AmountMode, PaymentMethodType};
use splitpay::domain::state::{AllocationStatus, DonationStatus};
use splitpay::store::donations::donation_for_allocation;
use splitpay::store::payments::SplitPayment;
use splitpay::stripe::sim::{Fault, FaultKind};
use splitpay::stripe::PaymentGateway;

async fn scalar(flow: &Flow, sql: &'static str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(&flow.db.pool)
        .await
        .unwrap()
}

/// Waits (bounded) until `sql` answers 1, running the refunds reconciler each turn as the cron would.
async fn settle_until(flow: &Flow, what: &str, sql: &'static str) {
    for _ in 0..300 {
        if scalar(flow, sql).await == 1 {
            return;
        }
        splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let rows: Vec<(String, String, i32)> =
        sqlx::query_as("SELECT id, status, generation FROM split_allocations ORDER BY position")
            .fetch_all(&flow.db.pool)
            .await
            .unwrap();
    let reversals: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT split_allocation_id, status, failure_code FROM transfer_reversals ORDER BY id")
            .fetch_all(&flow.db.pool)
            .await
            .unwrap();
    panic!("timed out waiting for {what}: {rows:?} {reversals:?}");
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

/// Reversal requests the simulator received for `transfer`.
async fn reversal_posts(flow: &Flow, transfer: &str) -> usize {
    let log = flow.control.get("requests").await.unwrap();
    let path = format!("/v1/transfers/{transfer}/reversals");
    log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["method"] == "POST" && r["path"].as_str() == Some(path.as_str()))
        .count()
}

/// The donation of share `i`: status, refunded amount, deleted, and its events of `event_type` (validated against
/// the contract).
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
        common::contract::validate_against_contract(e).unwrap_or_else(|err| panic!("{err}: {e}"));
    }
    (d.status, d.refunded_amount_cents, d.deleted_at.is_some(), events)
}

/// Three shares transferred from a card payment, their funds available at the recipients, and the platform with
/// funds of its own (a share sent again after a won dispute draws on them).
async fn transferred_and_available() -> (Flow, SplitPaymentId, SplitPayment) {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000, 3_000], &[]).await;
    flow.control.top_up("aud", 1_000_000).await.unwrap();
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    let p = flow
        .wait_until(&id, "transferred", |p| {
            p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
        })
        .await;
    flow.control.advance_clock(2 * 86_400 + 60).await.unwrap();
    (flow, id, p)
}

/// Finding 1: the first recipient paid everything out, so Stripe refuses the reversal of its share; the dispute is
/// then won. The reinstatement used to wait for that reversal forever (and kept trying to claw the money back). Now
/// it applies per share: the refused reversal is canceled and never made, that share is not sent anything (its
/// recipient kept the money), and the two shares whose reversal was made get a new generation each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_won_dispute_cancels_a_refused_reversal_and_sends_again_only_what_was_taken_back() {
    let (flow, id, p) = transferred_and_available().await;
    let nets: Vec<i64> = p.allocations.iter().map(|a| a.net_amount_cents.unwrap()).collect();
    let held0 = flow.control.connected_balance("acct_rcp0").await.unwrap()["available"][0]["amount"]
        .as_i64()
        .unwrap();
    flow.control.payout("acct_rcp0", "aud", held0).await.unwrap();
    let charge = p.payment.charge_id.clone().unwrap();
    flow.control.open_dispute(&charge).await.unwrap();
    settle_until(
        &flow,
        "two reversals made, the first refused",
        "SELECT (count(*) FILTER (WHERE status = 'SUCCEEDED') = 2
                 AND count(*) FILTER (WHERE status = 'PENDING' AND failure_code = 'balance_insufficient') = 1)::int::bigint
           FROM transfer_reversals",
    )
    .await;
    assert_eq!(held_per_share(&flow, &p).await, [nets[0], 0, 0]);
    let tr0 = p.allocations[0].stripe_transfer_id.clone().unwrap();

    flow.control.close_dispute(&charge, true).await.unwrap();
    settle_until(
        &flow,
        "the reinstatement applied and the new generations transferred",
        "SELECT ((SELECT count(*) FROM refunds WHERE reinstated_at IS NOT NULL) = 1
                 AND (SELECT count(*) FROM split_allocations WHERE status <> 'TRANSFERRED') = 0)::int::bigint",
    )
    .await;
    let p = flow.payment(&id).await;
    assert_eq!(held_per_share(&flow, &p).await, nets, "each recipient holds its net");
    let generations: Vec<i32> = p.allocations.iter().map(|a| a.generation).collect();
    assert_eq!(
        generations,
        [1, 2, 2],
        "only the shares whose reversal was made are sent again"
    );
    let rows: Vec<(String, i32, Option<String>, bool, bool)> = sqlx::query_as(
        "SELECT status, attempts, failure_code, in_doubt_since IS NOT NULL, cancel_requested_at IS NOT NULL
           FROM transfer_reversals ORDER BY id",
    )
    .fetch_all(&flow.db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows.iter().filter(|r| r.0 == "CANCELED").count(),
        1,
        "the refused reversal canceled: {rows:?}"
    );

    // The canceled reversal is never tried again, whatever the schedule or the reconciler does.
    let posts = reversal_posts(&flow, &tr0).await;
    sqlx::query("UPDATE transfer_reversals SET next_attempt_at = now() WHERE status = 'CANCELED'")
        .execute(&flow.db.pool)
        .await
        .unwrap();
    let canceled: i64 = scalar(&flow, "SELECT id FROM transfer_reversals WHERE status = 'CANCELED'").await;
    splitpay::jobs::refunds::reverse(&flow.ctx, &canceled.to_string())
        .await
        .unwrap();
    for _ in 0..3 {
        splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
    }
    assert_eq!(
        reversal_posts(&flow, &tr0).await,
        posts,
        "no reversal request after the cancel"
    );
    assert_eq!(held_per_share(&flow, &p).await, nets);

    // Finding 2: every donation is CONFIRMED again, nothing refunded, not deleted, with one refund_reversed each.
    // The first share's donation is not left PENDING: its share is not sent again (its recipient kept it).
    for i in 0..3 {
        let (status, refunded, deleted, events) = donation_of(&flow, &p, i, "donation.refund_reversed").await;
        assert_eq!(
            (status, refunded, deleted, events.len()),
            (DonationStatus::Confirmed, 0, false, 1),
            "share {i}"
        );
        assert_eq!(events[0]["data"]["deleted_at"], Value::Null);
    }
    let (_, _, _, reversed0) = donation_of(&flow, &p, 0, "donation.refund_reversed").await;
    assert_eq!(
        reversed0[0]["data"]["status"], "CONFIRMED",
        "the recipient holds the share"
    );
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// Finding 2: under `SPLITPAY_REVERSE_ON_REFUND=none` the platform bears the withdrawal (nothing is reversed), so
/// a won dispute sends nothing again. Each donation is CONFIRMED again (its recipient holds the share), with its
/// refunded amount back to 0 and `deleted_at` cleared; it used to be left PENDING for a transfer that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_won_dispute_under_policy_none_confirms_the_donations_again_without_sending_anything() {
    let flow = Flow::start_full(AmountMode::Fixed, &[1_000, 2_000, 3_000], &[], true, |d| {
        d.reverse_on_refund = splitpay::app::ReversePolicy::None;
    })
    .await;
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
    settle_until(
        &flow,
        "the withdrawal taken",
        "SELECT (count(*) FILTER (WHERE covered_at IS NOT NULL) = 3)::int::bigint FROM refund_parts",
    )
    .await;
    for i in 0..3 {
        let (status, _, deleted, _) = donation_of(&flow, &p, i, "donation.refunded").await;
        assert_eq!((status, deleted), (DonationStatus::Refunded, true), "share {i}");
    }
    flow.control.close_dispute(&charge, true).await.unwrap();
    settle_until(
        &flow,
        "the reinstatement applied",
        "SELECT count(*) FROM refunds WHERE reinstated_at IS NOT NULL",
    )
    .await;
    let p = flow.payment(&id).await;
    assert!(p
        .allocations
        .iter()
        .all(|a| a.status == AllocationStatus::Transferred && a.generation == 1));
    assert_eq!(
        held_per_share(&flow, &p).await,
        nets,
        "nothing reversed, nothing sent again"
    );
    assert_eq!(scalar(&flow, "SELECT count(*) FROM transfer_reversals").await, 0);
    for i in 0..3 {
        let (status, refunded, deleted, events) = donation_of(&flow, &p, i, "donation.refund_reversed").await;
        assert_eq!(
            (status, refunded, deleted, events.len()),
            (DonationStatus::Confirmed, 0, false, 1),
            "share {i}"
        );
        assert_eq!(events[0]["data"]["status"], "CONFIRMED");
    }
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// Finding 1, a request in doubt: the responses to two reversal requests are lost. Stripe refused the first (the
/// recipient paid out) and made the second. The dispute is won: neither reversal is sent again; once no request
/// can be in flight, a lookup at Stripe (our row id is in each reversal's metadata) cancels the first and records
/// the second, whose share is then sent what it took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_won_dispute_settles_reversals_in_doubt_by_a_lookup_at_stripe() {
    let (flow, id, p) = transferred_and_available().await;
    let nets: Vec<i64> = p.allocations.iter().map(|a| a.net_amount_cents.unwrap()).collect();
    let held0 = flow.control.connected_balance("acct_rcp0").await.unwrap()["available"][0]["amount"]
        .as_i64()
        .unwrap();
    flow.control.payout("acct_rcp0", "aud", held0).await.unwrap();
    for a in &p.allocations[..2] {
        flow.control
            .fault(Fault {
                kind: FaultKind::LoseResponse,
                count: 10_000,
                path_contains: Some(format!(
                    "/v1/transfers/{}/reversals",
                    a.stripe_transfer_id.as_deref().unwrap()
                )),
                method: Some("POST".into()),
            })
            .await
            .unwrap();
    }
    let charge = p.payment.charge_id.clone().unwrap();
    flow.control.open_dispute(&charge).await.unwrap();
    settle_until(
        &flow,
        "the third reversal made, two in doubt",
        "SELECT (count(*) FILTER (WHERE status = 'SUCCEEDED') = 1
                 AND count(*) FILTER (WHERE status = 'PENDING' AND in_doubt_since IS NOT NULL) = 2)::int::bigint
           FROM transfer_reversals",
    )
    .await;
    assert_eq!(
        held_per_share(&flow, &p).await,
        [nets[0], 0, 0],
        "Stripe made the second one"
    );

    flow.control.close_dispute(&charge, true).await.unwrap();
    settle_until(
        &flow,
        "the reinstatement applied",
        "SELECT count(*) FROM refunds WHERE reinstated_at IS NOT NULL",
    )
    .await;
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM transfer_reversals WHERE status = 'PENDING' AND cancel_requested_at IS NOT NULL"
        )
        .await,
        2,
        "both in doubt: never sent again, left to a lookup"
    );
    let tr0 = p.allocations[0].stripe_transfer_id.clone().unwrap();
    let posts = reversal_posts(&flow, &tr0).await;
    flow.control.clear_faults().await.unwrap();
    // Ten minutes on, no request can still be in flight.
    sqlx::query(
        "UPDATE transfer_reversals SET in_doubt_since = in_doubt_since - interval '11 minutes',
                next_attempt_at = now() WHERE cancel_requested_at IS NOT NULL",
    )
    .execute(&flow.db.pool)
    .await
    .unwrap();
    settle_until(
        &flow,
        "the lookups settled and the second share sent again",
        "SELECT ((SELECT count(*) FROM transfer_reversals WHERE status = 'CANCELED') = 1
                 AND (SELECT count(*) FROM transfer_reversals WHERE status = 'SUCCEEDED') = 2
                 AND (SELECT count(*) FROM split_allocations WHERE status <> 'TRANSFERRED') = 0)::int::bigint",
    )
    .await;
    let p = flow.payment(&id).await;
    assert_eq!(held_per_share(&flow, &p).await, nets, "each recipient holds its net");
    let generations: Vec<i32> = p.allocations.iter().map(|a| a.generation).collect();
    assert_eq!(generations, [1, 2, 2]);
    assert_eq!(
        reversal_posts(&flow, &tr0).await,
        posts,
        "the canceled one was never sent again"
    );
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// Review F1 (stop 18): a reversal whose first request was sent an hour ago and whose retry was sent just now is in
/// doubt from the retry, not from the first send. A won dispute then waits the in-flight margin from the retry
/// before a lookup may cancel it; waiting from the first send would cancel it while the retry could still be
/// applied at Stripe (the recipient short, the money on the platform).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_waits_out_the_margin_after_the_latest_send_not_the_first() {
    let (flow, _id, p) = transferred_and_available().await;
    let tr0 = p.allocations[0].stripe_transfer_id.clone().unwrap();
    flow.control
        .fault(Fault {
            kind: FaultKind::LoseResponse,
            count: 10_000,
            path_contains: Some(format!("/v1/transfers/{tr0}/reversals")),
            method: Some("POST".into()),
        })
        .await
        .unwrap();
    let charge = p.payment.charge_id.clone().unwrap();
    flow.control.open_dispute(&charge).await.unwrap();
    settle_until(
        &flow,
        "two reversals made, the first in doubt",
        "SELECT (count(*) FILTER (WHERE status = 'SUCCEEDED') = 2
                 AND count(*) FILTER (WHERE status = 'PENDING' AND in_doubt_since IS NOT NULL) = 1)::int::bigint
           FROM transfer_reversals",
    )
    .await;
    // The first send was an hour ago; its retry is due now and is sent (its answer lost again).
    sqlx::query(
        "UPDATE transfer_reversals SET in_doubt_since = now() - interval '1 hour', next_attempt_at = now()
          WHERE status = 'PENDING'",
    )
    .execute(&flow.db.pool)
    .await
    .unwrap();
    settle_until(
        &flow,
        "the retry sent",
        "SELECT count(*) FROM transfer_reversals
          WHERE status = 'PENDING' AND in_doubt_since > now() - interval '1 minute'",
    )
    .await;

    flow.control.close_dispute(&charge, true).await.unwrap();
    settle_until(
        &flow,
        "the reinstatement applied",
        "SELECT count(*) FROM refunds WHERE reinstated_at IS NOT NULL",
    )
    .await;
    for _ in 0..3 {
        splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
    }
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM transfer_reversals
              WHERE status = 'PENDING' AND cancel_requested_at IS NOT NULL
                AND next_attempt_at > now() + interval '8 minutes'"
        )
        .await,
        1,
        "the lookup waits for the margin after the retry"
    );
    flow.stop().await;
}
