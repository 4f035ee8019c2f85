//! Reversals whose refund no longer stands (an ops refund a dispute closed, a refund Stripe failed), met by a
//! dispute (review of stop 20, two findings, each with its test): a won dispute applied while such a reversal was
//! still in doubt, and a refund failing after the dispute's parts were covered. Real PostgreSQL, the simulator over
//! HTTP, the worker in the test process; money checked at Stripe.
mod common;

use common::flow::Flow;
use common::money::assert_conserved_at_stripe;
use common::refunds::{
    held_per_share, hold_webhooks, lose_reversal_answers, nets, open_dispute, ops_refund, parked_json,
    past_in_flight_margin, release_webhooks, scalar, settle_until_sql, three_shares_paid,
    transferred_with_pending_refunds,
};
use splitpay::stripe::PaymentGateway;

/// Waits until the dispute's withdrawal is taken, then until every refund part is covered (`stage` names the wait).
async fn until_withdrawn_and_covered(flow: &Flow, stage: &str) {
    settle_until_sql(
        flow,
        &format!("withdrawal{stage}"),
        600,
        "SELECT (count(*) = 1)::int::bigint FROM disputes WHERE withdrawn_at IS NOT NULL",
    )
    .await;
    settle_until_sql(
        flow,
        &format!("parts covered{stage}"),
        600,
        "SELECT (count(*) = 0)::int::bigint FROM refund_parts WHERE covered_at IS NULL",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_won_dispute_waits_for_a_closed_intents_reversal_in_doubt_and_sends_back_what_it_took() {
    let (flow, id, p) = three_shares_paid(&[]).await;
    let a0 = p.allocations[0].clone();
    let tr0 = a0.stripe_transfer_id.clone().unwrap();
    // Stripe makes the ops refund's reversal; its answer is lost.
    lose_reversal_answers(&flow, &tr0).await;
    let out = ops_refund(&flow, &a0.id, &["--reverse-transfer", "--yes"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));

    let charge = open_dispute(&flow, &p).await;
    settle_until_sql(
        &flow,
        "withdrawal",
        600,
        "SELECT (count(*) = 1)::int::bigint FROM disputes WHERE withdrawn_at IS NOT NULL",
    )
    .await;
    settle_until_sql(
        &flow,
        "two dispute reversals",
        600,
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
    settle_until_sql(
        &flow,
        "reinstatement seen",
        600,
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
    past_in_flight_margin(&flow, "status = 'PENDING'").await;
    settle_until_sql(
        &flow,
        "the in-doubt reversal settled, reinstated, all transferred",
        600,
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
    let held = held_per_share(&flow, &flow.payment(&id).await).await;
    let nets = nets(&p);
    let parked = parked_json(&flow);
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
    let (flow, id, p) = transferred_with_pending_refunds(&[1_000, 2_000]).await;
    let a0 = p.allocations[0].clone();
    let out = ops_refund(&flow, &a0.id, &["--reverse-transfer", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    settle_until_sql(
        &flow,
        "refund pending",
        600,
        "SELECT (count(*) = 1)::int::bigint FROM refunds WHERE status = 'PENDING'",
    )
    .await;
    let processed = "SELECT (count(*) = 0)::int::bigint FROM stripe_events WHERE processed_at IS NULL";
    settle_until_sql(&flow, "refund events processed", 600, processed).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    settle_until_sql(&flow, "refund events processed", 600, processed).await;
    let pending_refund: String = sqlx::query_scalar("SELECT stripe_refund_id FROM refunds WHERE status = 'PENDING'")
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    let charge = p.payment.charge_id.clone().unwrap();
    hold_webhooks(&flow).await;
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
    until_withdrawn_and_covered(&flow, " first").await;
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM refunds WHERE source = 'ops' AND status = 'PENDING'"
        )
        .await,
        1
    );
    release_webhooks(&flow).await;
    assert_eq!(
        d["amount"], p.payment.total_amount_cents,
        "the whole charge is disputed"
    );
    until_withdrawn_and_covered(&flow, "").await;
    settle_until_sql(
        &flow,
        "refund failed",
        600,
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
    let parked = parked_json(&flow);
    assert_eq!(
        parked["reversed_without_refund"],
        serde_json::json!([]),
        "stranded: {parked}"
    );
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}
