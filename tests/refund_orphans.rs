//! Reversals whose refund no longer stands (an ops refund a dispute closed, a refund Stripe failed), met by a
//! dispute (review of stop 20, two findings, each with its test): a won dispute applied while such a reversal was
//! still in doubt, and a refund failing after the dispute's parts were covered. Real PostgreSQL, the simulator over
//! HTTP, the worker in the test process; money checked at Stripe.
mod common;

use common::flow::Flow;
use common::money::assert_conserved_at_stripe;
use splitpay::domain::plan::{AmountMode, PaymentMethodType};
use splitpay::domain::state::AllocationStatus;
use splitpay::stripe::sim::{Fault, FaultKind};
use splitpay::stripe::PaymentGateway;

async fn scalar(flow: &Flow, sql: &'static str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(&flow.db.pool)
        .await
        .unwrap()
}

async fn wait_for(flow: &Flow, what: &str, sql: &'static str) {
    for _ in 0..600 {
        if scalar(flow, sql).await == 1 {
            return;
        }
        splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_won_dispute_waits_for_a_closed_intents_reversal_in_doubt_and_sends_back_what_it_took() {
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
    let a0 = p.allocations[0].clone();
    let tr0 = a0.stripe_transfer_id.clone().unwrap();
    // Stripe makes the ops refund's reversal; its answer is lost.
    flow.control
        .fault(Fault {
            kind: FaultKind::LoseResponse,
            count: 10_000,
            path_contains: Some(format!("/v1/transfers/{tr0}/reversals")),
            method: Some("POST".into()),
        })
        .await
        .unwrap();
    let out = flow.ops(&[
        "refund",
        a0.id.as_str(),
        "--reason",
        "donor asked",
        "--reverse-transfer",
        "--yes",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));

    let charge = p.payment.charge_id.clone().unwrap();
    flow.control.open_dispute(&charge).await.unwrap();
    wait_for(
        &flow,
        "withdrawal",
        "SELECT (count(*) = 1)::int::bigint FROM disputes WHERE withdrawn_at IS NOT NULL",
    )
    .await;
    wait_for(
        &flow,
        "two dispute reversals",
        "SELECT (count(*) = 2)::int::bigint FROM transfer_reversals r JOIN refunds f ON f.id = r.cause_refund_id
          WHERE f.source = 'dispute' AND r.status = 'SUCCEEDED'",
    )
    .await;
    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM refund_parts WHERE covered_at IS NULL").await,
        1
    );

    // The dispute is won before the in-doubt reversal's lookup settles: the reinstatement waits for it.
    flow.control.close_dispute(&charge, true).await.unwrap();
    wait_for(
        &flow,
        "reinstatement seen",
        "SELECT (count(*) = 1)::int::bigint FROM disputes WHERE reinstate_seen_at IS NOT NULL",
    )
    .await;
    for _ in 0..3 {
        splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
    }
    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM refunds WHERE reinstated_at IS NOT NULL").await,
        0,
        "the reinstatement waits for the lookup"
    );
    // Now the lookup finds the intent's reversal made.
    flow.control.clear_faults().await.unwrap();
    sqlx::query(
        "UPDATE transfer_reversals SET in_doubt_since = in_doubt_since - interval '11 minutes',
                next_attempt_at = now() WHERE status = 'PENDING'",
    )
    .execute(&flow.db.pool)
    .await
    .unwrap();
    wait_for(
        &flow,
        "the in-doubt reversal settled, reinstated, all transferred",
        "SELECT ((SELECT count(*) FROM transfer_reversals WHERE status = 'PENDING') = 0
                 AND (SELECT count(*) FROM refunds WHERE reinstated_at IS NOT NULL) = 1
                 AND (SELECT count(*) FROM split_allocations WHERE status <> 'TRANSFERRED') = 0)::int::bigint",
    )
    .await;
    for _ in 0..5 {
        splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let made: (String, String) = sqlx::query_as(
        "SELECT r.status, f.status FROM transfer_reversals r JOIN refunds f ON f.id = r.adopted_from_refund_id
          WHERE f.source = 'ops'",
    )
    .fetch_one(&flow.db.pool)
    .await
    .unwrap();
    assert_eq!(
        made,
        ("SUCCEEDED".to_owned(), "FAILED".to_owned()),
        "Stripe made it; the intent is closed, and the dispute took its reversal"
    );
    let p2 = flow.payment(&id).await;
    let transfers = flow.gateway.list_transfers(&p.payment.transfer_group).await.unwrap();
    let held: Vec<i64> = p2
        .allocations
        .iter()
        .map(|a| {
            transfers
                .iter()
                .filter(|t| t.metadata.get("split_allocation_id") == Some(&a.id))
                .map(|t| t.amount_cents - t.amount_reversed_cents)
                .sum()
        })
        .collect();
    let nets: Vec<i64> = p.allocations.iter().map(|a| a.net_amount_cents.unwrap()).collect();
    let parked: serde_json::Value = serde_json::from_slice(&flow.ops(&["parked", "--json"]).stdout).unwrap();
    assert_eq!(parked["reversed_without_refund"], serde_json::json!([]), "{parked}");
    assert_eq!(
        held, nets,
        "after a won dispute every recipient holds its net, the first share sent again"
    );
    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM split_allocations WHERE generation = 2").await,
        3,
        "each share sent again once"
    );
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// An ops refund whose Stripe refund is still pending when the charge is disputed (not closed by the withdrawal:
/// only a REQUESTED intent is), then fails. The dispute's part of that share was covered as the platform's loss
/// (the pending refund's reversal held the transfer); when the refund fails, its reversal covers that part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_ops_refund_failing_after_a_dispute_gives_its_reversal_to_the_disputes_part() {
    use splitpay::stripe::sim::model::SimConfig;
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000], &[]).await;
    flow.control.top_up("aud", 1_000_000).await.unwrap();
    flow.control
        .set_config(&SimConfig {
            refunds_start_pending: true,
            ..SimConfig::default()
        })
        .await
        .unwrap();
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    let p = flow
        .wait_until(&id, "transferred", |p| {
            p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
        })
        .await;
    let a0 = p.allocations[0].clone();
    let out = flow.ops(&[
        "refund",
        a0.id.as_str(),
        "--reason",
        "donor asked",
        "--reverse-transfer",
        "--yes",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(
        &flow,
        "refund pending",
        "SELECT (count(*) = 1)::int::bigint FROM refunds WHERE status = 'PENDING'",
    )
    .await;
    wait_for(
        &flow,
        "refund events processed",
        "SELECT (count(*) = 0)::int::bigint FROM stripe_events WHERE processed_at IS NULL",
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    wait_for(
        &flow,
        "refund events processed",
        "SELECT (count(*) = 0)::int::bigint FROM stripe_events WHERE processed_at IS NULL",
    )
    .await;
    let pending_refund: String = sqlx::query_scalar("SELECT stripe_refund_id FROM refunds WHERE status = 'PENDING'")
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    let charge = p.payment.charge_id.clone().unwrap();
    flow.control
        .webhook_mode(serde_json::json!({ "duplicate": false, "hold": true }))
        .await
        .unwrap();
    let d = flow.control.open_dispute(&charge).await.unwrap();
    // Deliver the dispute's events first, the refund's failure after (Stripe does not promise an order).
    let page = flow
        .gateway
        .list_events(
            &["charge.dispute.created", "charge.dispute.funds_withdrawn"],
            0,
            None,
            None,
        )
        .await
        .unwrap();
    for e in page.events.iter().rev() {
        flow.control.redeliver(e["id"].as_str().unwrap()).await.unwrap();
    }
    wait_for(
        &flow,
        "withdrawal first",
        "SELECT (count(*) = 1)::int::bigint FROM disputes WHERE withdrawn_at IS NOT NULL",
    )
    .await;
    wait_for(
        &flow,
        "parts covered first",
        "SELECT (count(*) = 0)::int::bigint FROM refund_parts WHERE covered_at IS NULL",
    )
    .await;
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM refunds WHERE source = 'ops' AND status = 'PENDING'"
        )
        .await,
        1
    );
    flow.control
        .webhook_mode(serde_json::json!({ "duplicate": false, "hold": false }))
        .await
        .unwrap();
    flow.control.flush_webhooks().await.unwrap();
    assert_eq!(
        d["amount"], p.payment.total_amount_cents,
        "the whole charge is disputed"
    );
    wait_for(
        &flow,
        "withdrawal",
        "SELECT (count(*) = 1)::int::bigint FROM disputes WHERE withdrawn_at IS NOT NULL",
    )
    .await;
    wait_for(
        &flow,
        "parts covered",
        "SELECT (count(*) = 0)::int::bigint FROM refund_parts WHERE covered_at IS NULL",
    )
    .await;
    wait_for(
        &flow,
        "refund failed",
        "SELECT (count(*) = 1)::int::bigint FROM refunds WHERE source = 'ops' AND status = 'FAILED'",
    )
    .await;
    let failed: String = sqlx::query_scalar("SELECT stripe_refund_id FROM refunds WHERE status = 'FAILED'")
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    assert_eq!(failed, pending_refund);
    flow.control.close_dispute(&charge, false).await.unwrap();
    for _ in 0..10 {
        splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let parts: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT split_allocation_id, amount_cents, reversal_cents, platform_loss_cents FROM refund_parts ORDER BY 1",
    )
    .fetch_all(&flow.db.pool)
    .await
    .unwrap();
    let net0 = a0.net_amount_cents.unwrap();
    let first = parts.iter().find(|(a, ..)| *a == a0.id).unwrap();
    assert_eq!(
        first.2, net0,
        "the failed refund's reversal covers the dispute's part: {parts:?}"
    );
    assert_eq!(first.3, first.1 - net0, "the platform bears the fees only: {parts:?}");
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM transfer_reversals WHERE adopted_from_refund_id IS NOT NULL"
        )
        .await,
        1
    );
    let parked: serde_json::Value = serde_json::from_slice(&flow.ops(&["parked", "--json"]).stdout).unwrap();
    assert_eq!(
        parked["reversed_without_refund"],
        serde_json::json!([]),
        "stranded: {parked}"
    );
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}
