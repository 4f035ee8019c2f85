//! Reversals whose refund no longer stands (orphans: an ops refund a dispute closed, a refund Stripe failed), met by
//! a dispute (review of stop 20, two findings, each with its test): a won dispute applied while such a reversal was
//! still in doubt, and a refund failing after the dispute's parts were covered; and an orphan larger than the
//! dispute's part that takes it, whose rest goes back to the recipient (under each reverse policy), also when the
//! refund fails after that part booked loss (the rehome, review F2). Real
//! PostgreSQL, the simulator over HTTP, the worker in the test process; money checked at Stripe.
mod common;

use common::flow::Flow;
use common::money::assert_conserved_at_stripe;
use common::refunds::{
    available, dashboard_refund, donation_of, held_per_share, hold_webhooks, lose_reversal_answers, nets, open_dispute,
    ops_refund, parked_json, past_in_flight_margin, redeliver_twice_at_once, release_webhooks, reversal_posts, scalar,
    settle_until_sql, stripe_requests, three_shares_paid, three_shares_paid_with, transferred_with_pending_refunds,
};
use splitpay::app::ReversePolicy;
use splitpay::domain::ids::{SplitAllocationId, SplitPaymentId};
use splitpay::domain::state::DonationStatus;
use splitpay::store::money_report::money_report;
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

/// A reversal row as [`moves`] shows it: id, amount, status, cause, the refund it was adopted from.
type ReversalMove = (i64, i64, String, Option<i64>, Option<i64>);

/// What Stripe and splitpay hold that a repeated cover or sweep could change: Stripe's transfers, reversal and
/// refund requests; splitpay's generations, reversal rows with their causes, and each part's cover.
async fn moves(flow: &Flow, p: &splitpay::store::payments::SplitPayment) -> String {
    let transfers = flow.gateway.list_transfers(&p.payment.transfer_group).await.unwrap();
    let rows: Vec<(String, i32, String)> =
        sqlx::query_as("SELECT id, generation, status FROM split_allocations ORDER BY position")
            .fetch_all(&flow.db.pool)
            .await
            .unwrap();
    let reversals: Vec<ReversalMove> = sqlx::query_as(
        "SELECT id, amount_cents, status, cause_refund_id, adopted_from_refund_id FROM transfer_reversals ORDER BY id",
    )
    .fetch_all(&flow.db.pool)
    .await
    .unwrap();
    let parts: Vec<(i64, String, i64, i64)> = sqlx::query_as(
        "SELECT refund_id, split_allocation_id, reversal_cents, platform_loss_cents FROM refund_parts ORDER BY 1, 2",
    )
    .fetch_all(&flow.db.pool)
    .await
    .unwrap();
    format!(
        "transfers {:?}; reversal posts {}; refund posts {}; shares {rows:?}; reversals {reversals:?}; parts {parts:?}",
        transfers
            .iter()
            .map(|t| (&t.id, t.amount_cents, t.amount_reversed_cents))
            .collect::<Vec<_>>(),
        stripe_requests(flow, "POST", "/reversals").await,
        stripe_requests(flow, "POST", "/v1/refunds").await,
    )
}

/// An orphan larger than the part that takes it. A dashboard refund of 60 % of the charge that splitpay has not
/// heard of yet, then the cardholder disputes the rest (2,400: the first share's part is 400 of its gross 1,000);
/// meanwhile `ops refund --reverse-transfer` of the first share reverses its whole net before Stripe refuses the
/// refund (the charge is disputed). The dispute's part used to leave that reversal alone (it did not fit in the
/// part) and book the share as the platform's loss: the recipient's net stranded on the platform for good, since
/// `ops refund` refuses a disputed charge. Now the part takes the reversal and uses of it what the policy has the
/// recipient bear (its share of the part under `proportional`, nothing under `none`); nothing is reversed anew,
/// and the rest goes back to the recipient as one new transfer, in the same transaction. Covering and sweeping
/// again change nothing; the refund delivered after is covered from the new transfer; every cent is accounted.
async fn an_orphan_larger_than_a_partial_disputes_part(policy: ReversePolicy) {
    let (flow, id, p) = three_shares_paid_with(&[], true, |s| s.reverse_on_refund = policy).await;
    // The recipients' funds become available: what they hold is then their available balance.
    flow.control.advance_clock(2 * 86_400 + 60).await.unwrap();
    let a0 = p.allocations[0].clone();
    let tr0 = a0.stripe_transfer_id.clone().unwrap();
    let (net0, gross0) = (a0.net_amount_cents.unwrap(), a0.gross_amount_cents);
    assert_eq!(gross0, 1_000);
    hold_webhooks(&flow).await;
    flow.gateway
        .create_refund(&dashboard_refund(&p, 3_600, "dashboard-before-the-dispute"))
        .await
        .unwrap();
    let d = flow
        .control
        .open_dispute(p.payment.charge_id.as_deref().unwrap())
        .await
        .unwrap();
    assert_eq!(d["amount"], 2_400, "the dispute takes what the refund left");
    let out = ops_refund(&flow, &a0.id, &["--reverse-transfer", "--yes"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Stripe refused the refund"), "{stderr}");
    let parked = parked_json(&flow);
    let stranded = parked["reversed_without_refund"].as_array().unwrap();
    assert_eq!(stranded.len(), 1, "{parked}");
    assert_eq!(
        stranded[0]["amount_cents"], net0,
        "the orphan is the first share's whole net"
    );
    assert_eq!(available(&flow, "acct_rcp0").await, 0);

    // The dispute's events are delivered first (Stripe promises no order); the refund's stay held.
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
    settle_until_sql(
        &flow,
        "the dispute's parts covered and the first share's second generation transferred",
        600,
        "SELECT ((SELECT count(*) FROM refund_parts) = 3
                 AND (SELECT count(*) FROM refund_parts WHERE covered_at IS NULL) = 0
                 AND (SELECT count(*) FROM transfer_reversals WHERE status = 'PENDING') = 0
                 AND (SELECT count(*) FROM split_allocations WHERE generation = 2 AND status = 'TRANSFERRED') = 1
                 AND (SELECT count(*) FROM split_allocations WHERE status <> 'TRANSFERRED') = 0)::int::bigint",
    )
    .await;

    // The part is covered by the orphan: the recipient's share of the part (or nothing under `none`), the rest of
    // the part the platform's (the fees, or all of it under `none`). No reversal of the first transfer is asked for.
    let proportional = policy == ReversePolicy::Proportional;
    let want = if proportional {
        (400 * net0 * 2 + gross0) / (2 * gross0)
    } else {
        0
    };
    let excess = net0 - want;
    assert!(excess > 0 && want < 400);
    let (dispute_refund, ops_refund_id) = (
        scalar(&flow, "SELECT id FROM refunds WHERE source = 'dispute'").await,
        scalar(&flow, "SELECT id FROM refunds WHERE source = 'ops'").await,
    );
    let part: (i64, i64, i64) = sqlx::query_as(
        "SELECT amount_cents, reversal_cents, platform_loss_cents FROM refund_parts
          WHERE refund_id = $1 AND split_allocation_id = $2",
    )
    .bind(dispute_refund)
    .bind(&a0.id)
    .fetch_one(&flow.db.pool)
    .await
    .unwrap();
    assert_eq!(part, (400, want, 400 - want), "the dispute's part of the first share");
    let first_reversals: Vec<(i64, String, Option<i64>, Option<i64>)> = sqlx::query_as(
        "SELECT amount_cents, status, cause_refund_id, adopted_from_refund_id FROM transfer_reversals
          WHERE split_allocation_id = $1",
    )
    .bind(&a0.id)
    .fetch_all(&flow.db.pool)
    .await
    .unwrap();
    assert_eq!(
        first_reversals,
        [(net0, "SUCCEEDED".to_owned(), Some(dispute_refund), Some(ops_refund_id))],
        "the orphan is the dispute's now, and the only reversal of the share"
    );
    assert_eq!(
        reversal_posts(&flow, &tr0).await,
        1,
        "nothing reversed anew for the part"
    );
    // The rest goes back to the recipient: exactly one new transfer, of exactly the excess.
    let transfers = flow.gateway.list_transfers(&p.payment.transfer_group).await.unwrap();
    let again: Vec<i64> = transfers
        .iter()
        .filter(|t| t.metadata.get("split_allocation_id") == Some(&a0.id) && t.id != tr0)
        .map(|t| t.amount_cents)
        .collect();
    assert_eq!(again, [excess], "one new transfer of the orphan's excess");
    assert_eq!(
        scalar(
            &flow,
            &format!(
                "SELECT amount_cents FROM transfer_attempts WHERE split_allocation_id = '{}' AND generation = 2",
                a0.id
            )
        )
        .await,
        excess
    );
    assert_eq!(held_per_share(&flow, &p).await[0], excess);
    assert_eq!(
        available(&flow, "acct_rcp0").await,
        excess,
        "the recipient's balance at Stripe"
    );
    let parked = parked_json(&flow);
    assert_eq!(parked["reversed_without_refund"], serde_json::json!([]), "{parked}");
    // splitpay's own books balance (Stripe's refund is not heard of yet, so not checked against Stripe here).
    let report = money_report(
        &mut flow.db.pool.acquire().await.unwrap(),
        &SplitPaymentId::parse(&p.payment.id).unwrap(),
    )
    .await
    .unwrap();
    assert!(report.is_conserved(), "{report:?}");

    // Covering and sweeping again, and the withdrawal delivered twice more at once, change nothing.
    let before = moves(&flow, &p).await;
    for _ in 0..3 {
        splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
    }
    let mut tx = flow.db.pool.begin().await.unwrap();
    splitpay::jobs::refunds::settle_waiting_parts(&flow.ctx, &mut tx, &SplitAllocationId::parse(&a0.id).unwrap())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    redeliver_twice_at_once(&flow, "charge.dispute.funds_withdrawn").await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(moves(&flow, &p).await, before, "a second cover or sweep moves nothing");

    // The refund's webhooks arrive: its part of the first share is covered from the new transfer.
    release_webhooks(&flow).await;
    settle_until_sql(
        &flow,
        "the refund covered and its reversals made",
        600,
        "SELECT ((SELECT count(*) FROM refunds WHERE source = 'external' AND attributed_at IS NOT NULL) = 1
                 AND (SELECT count(*) FROM refund_parts WHERE covered_at IS NULL) = 0
                 AND (SELECT count(*) FROM transfer_reversals WHERE status = 'PENDING') = 0
                 AND (SELECT count(*) FROM split_allocations WHERE status <> 'TRANSFERRED') = 0)::int::bigint",
    )
    .await;
    let taken_back = scalar(
        &flow,
        &format!(
            "SELECT coalesce(sum(reversal_cents), 0)::bigint FROM refund_parts WHERE split_allocation_id = '{}'",
            a0.id
        ),
    )
    .await;
    assert_eq!(
        held_per_share(&flow, &p).await[0],
        net0 - taken_back,
        "the recipient holds its net less what the policy had it bear"
    );
    if !proportional {
        assert_eq!(taken_back, 0, "under none the platform bears every refund");
    }
    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM split_allocations WHERE generation > 2").await,
        0
    );
    let parked = parked_json(&flow);
    assert_eq!(parked["reversed_without_refund"], serde_json::json!([]), "{parked}");
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_larger_than_a_partial_disputes_part_covers_it_and_sends_the_rest_back() {
    an_orphan_larger_than_a_partial_disputes_part(ReversePolicy::Proportional).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_policy_none_an_orphan_goes_back_whole_to_the_recipient() {
    an_orphan_larger_than_a_partial_disputes_part(ReversePolicy::None).await;
}

/// Under `none`, the whole charge disputed after `ops refund --reverse-transfer` of the first share had its refund
/// refused (the charge was disputed): the platform bears the dispute's part, and the orphan, the recipient's whole
/// net, goes back to it. The part refunds the donor the share's whole gross, so the donation is REFUNDED, and stays
/// so when the new transfer is made: that transfer gives the recipient back its own money, it does not undo the
/// donor's refund (recording it used to fail for good on the donation's transition). The dispute's part used to take
/// the orphan whole instead, so the recipient bore a refund the policy has the platform bear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_policy_none_a_whole_dispute_gives_the_orphan_back_and_the_donation_stays_refunded() {
    let (flow, id, p) = three_shares_paid_with(&[], true, |s| s.reverse_on_refund = ReversePolicy::None).await;
    let a0 = p.allocations[0].clone();
    hold_webhooks(&flow).await;
    open_dispute(&flow, &p).await;
    let out = ops_refund(&flow, &a0.id, &["--reverse-transfer", "--yes"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    release_webhooks(&flow).await;
    settle_until_sql(
        &flow,
        "the dispute's parts covered and the first share sent back its net",
        600,
        "SELECT ((SELECT count(*) FROM refund_parts) = 3
                 AND (SELECT count(*) FROM refund_parts WHERE covered_at IS NULL) = 0
                 AND (SELECT count(*) FROM split_allocations WHERE generation = 2 AND status = 'TRANSFERRED') = 1
                 AND (SELECT count(*) FROM split_allocations WHERE status <> 'TRANSFERRED') = 0)::int::bigint",
    )
    .await;
    assert_eq!(
        scalar(
            &flow,
            "SELECT coalesce(sum(reversal_cents), 0)::bigint FROM refund_parts"
        )
        .await,
        0,
        "the platform bears the dispute"
    );
    assert_eq!(
        held_per_share(&flow, &p).await,
        nets(&p),
        "every recipient keeps its net"
    );
    let (status, refunded, deleted, events) = donation_of(&flow, &a0, "donation.refunded").await;
    assert_eq!(
        (status, refunded, deleted, events.len()),
        (DonationStatus::Refunded, a0.gross_amount_cents, true, 1)
    );
    let (_, _, _, succeeded) = donation_of(&flow, &a0, "donation.succeeded").await;
    assert_eq!(succeeded.len(), 1, "the first transfer's only");
    let parked = parked_json(&flow);
    assert_eq!(parked["reversed_without_refund"], serde_json::json!([]), "{parked}");
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// The failed refund's orphan larger than the part that booked loss (review finding F2): `ops refund
/// --reverse-transfer` of the first share reverses its whole net, the refund stays pending at Stripe; the charge
/// is then disputed, and the dispute's part of the first share (less than that net: the pending refund is left out
/// of the dispute) is covered entirely as the platform's loss, since the pending refund's reversal holds the
/// transfer. The refund then fails and the dispute is lost. The rehome used to give the orphan only to a part whose
/// loss was at least its whole amount: it moved nothing, and the recipient's net stayed on the platform for good
/// (`ops refund` is refused on a disputed charge). Now the part takes the orphan and uses of it what the policy has
/// the recipient bear (nothing under `none`), and the rest goes back to the recipient as one new transfer, in the
/// refund's transaction; a second run changes nothing, and every cent is accounted at Stripe.
async fn a_failed_refunds_orphan_larger_than_the_part_that_booked_loss(policy: ReversePolicy) {
    let (flow, id, p) = three_shares_paid_with(&[], true, |s| s.reverse_on_refund = policy).await;
    flow.control
        .set_config(&splitpay::stripe::sim::model::SimConfig {
            refunds_start_pending: true,
            pending_refunds_survive_disputes: true,
            ..Default::default()
        })
        .await
        .unwrap();
    // The recipients' funds become available: what they hold is then their available balance.
    flow.control.advance_clock(2 * 86_400 + 60).await.unwrap();
    let a0 = p.allocations[0].clone();
    let tr0 = a0.stripe_transfer_id.clone().unwrap();
    let (net0, gross0) = (a0.net_amount_cents.unwrap(), a0.gross_amount_cents);
    let out = ops_refund(&flow, &a0.id, &["--reverse-transfer", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let processed = "SELECT (count(*) = 0)::int::bigint FROM stripe_events WHERE processed_at IS NULL";
    settle_until_sql(
        &flow,
        "ops refund pending, its reversal made",
        600,
        "SELECT ((SELECT count(*) FROM refunds WHERE source = 'ops' AND status = 'PENDING') = 1
                 AND (SELECT count(*) FROM transfer_reversals WHERE status = 'SUCCEEDED') = 1)::int::bigint",
    )
    .await;
    settle_until_sql(&flow, "events", 600, processed).await;
    assert_eq!(available(&flow, "acct_rcp0").await, 0);
    let refund: String = sqlx::query_scalar("SELECT stripe_refund_id FROM refunds WHERE source = 'ops'")
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    let charge = open_dispute(&flow, &p).await;
    until_withdrawn_and_covered(&flow, "").await;
    let (dispute_refund, ops_refund_id) = (
        scalar(&flow, "SELECT id FROM refunds WHERE source = 'dispute'").await,
        scalar(&flow, "SELECT id FROM refunds WHERE source = 'ops'").await,
    );
    let part_of_first = async || -> (i64, i64, i64) {
        sqlx::query_as(
            "SELECT amount_cents, reversal_cents, platform_loss_cents FROM refund_parts
              WHERE refund_id = $1 AND split_allocation_id = $2",
        )
        .bind(dispute_refund)
        .bind(&a0.id)
        .fetch_one(&flow.db.pool)
        .await
        .unwrap()
    };
    let (part_cents, reversal_cents, loss_cents) = part_of_first().await;
    assert_eq!(
        (reversal_cents, loss_cents),
        (0, part_cents),
        "the dispute's part is booked as loss while the pending refund's reversal holds the transfer"
    );
    assert!(
        part_cents < net0,
        "the orphan ({net0}) is larger than the part ({part_cents})"
    );

    flow.control.settle_refund(&refund, false).await.unwrap();
    settle_until_sql(
        &flow,
        "ops refund failed",
        600,
        "SELECT (count(*) = 1)::int::bigint FROM refunds WHERE source = 'ops' AND status = 'FAILED'",
    )
    .await;
    flow.control.close_dispute(&charge, false).await.unwrap();
    settle_until_sql(&flow, "events", 600, processed).await;
    settle_until_sql(
        &flow,
        "the first share's second generation transferred",
        600,
        &format!(
            "SELECT ((SELECT count(*) FROM transfer_reversals WHERE status = 'PENDING') = 0
                     AND (SELECT count(*) FROM split_allocations
                           WHERE id = '{}' AND generation = 2 AND status = 'TRANSFERRED') = 1
                     AND (SELECT count(*) FROM split_allocations WHERE status <> 'TRANSFERRED') = 0)::int::bigint",
            a0.id
        ),
    )
    .await;

    // The part's loss became reversal up to what the policy has the recipient bear; the orphan is the part's.
    let want = if policy == ReversePolicy::Proportional {
        (part_cents * net0 * 2 + gross0) / (2 * gross0)
    } else {
        0
    };
    let excess = net0 - want;
    assert!(excess > 0);
    let part = part_of_first().await;
    assert_eq!(
        part,
        (part_cents, want, part_cents - want),
        "the dispute's part of the first share"
    );
    let first_reversals: Vec<(i64, String, Option<i64>, Option<i64>)> = sqlx::query_as(
        "SELECT amount_cents, status, cause_refund_id, adopted_from_refund_id FROM transfer_reversals
          WHERE split_allocation_id = $1",
    )
    .bind(&a0.id)
    .fetch_all(&flow.db.pool)
    .await
    .unwrap();
    assert_eq!(
        first_reversals,
        [(net0, "SUCCEEDED".to_owned(), Some(dispute_refund), Some(ops_refund_id))],
        "the orphan is the dispute's part's now, and the only reversal of the share"
    );
    assert_eq!(reversal_posts(&flow, &tr0).await, 1, "nothing reversed anew");
    // What the part does not use goes back to the recipient: exactly one new transfer, of exactly the excess.
    let transfers = flow.gateway.list_transfers(&p.payment.transfer_group).await.unwrap();
    let again: Vec<i64> = transfers
        .iter()
        .filter(|t| t.metadata.get("split_allocation_id") == Some(&a0.id) && t.id != tr0)
        .map(|t| t.amount_cents)
        .collect();
    assert_eq!(again, [excess], "one new transfer of the orphan's excess");
    assert_eq!(held_per_share(&flow, &p).await[0], excess);
    assert_eq!(
        available(&flow, "acct_rcp0").await,
        excess,
        "the recipient's balance at Stripe"
    );
    let parked = parked_json(&flow);
    assert_eq!(parked["reversed_without_refund"], serde_json::json!([]), "{parked}");
    let report = money_report(&mut flow.db.pool.acquire().await.unwrap(), &id)
        .await
        .unwrap();
    assert!(report.is_conserved(), "{report:?}");
    assert_conserved_at_stripe(&flow, &id).await;

    // A second run (the rehome itself, covering, the sweep) changes nothing.
    let before = moves(&flow, &p).await;
    let mut tx = flow.db.pool.begin().await.unwrap();
    splitpay::store::allocations::lock_payment_shares(&mut tx, &p.payment.id)
        .await
        .unwrap();
    let rehomed = splitpay::store::reversals::rehome_reversals_of(&mut tx, ops_refund_id, policy)
        .await
        .unwrap();
    assert!(rehomed.is_empty(), "{rehomed:?}");
    splitpay::jobs::refunds::settle_waiting_parts(&flow.ctx, &mut tx, &SplitAllocationId::parse(&a0.id).unwrap())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    for _ in 0..3 {
        splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(moves(&flow, &p).await, before, "a second run moves nothing");
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_refunds_orphan_larger_than_the_part_that_booked_loss_covers_it_and_sends_the_rest_back() {
    a_failed_refunds_orphan_larger_than_the_part_that_booked_loss(ReversePolicy::Proportional).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_policy_none_a_failed_refunds_orphan_goes_back_whole_after_its_part_booked_loss() {
    a_failed_refunds_orphan_larger_than_the_part_that_booked_loss(ReversePolicy::None).await;
}
