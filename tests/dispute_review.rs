//! Review findings on won disputes (issue 8 review of refunds and disputes), each with its test: real PostgreSQL,
//! the simulator over HTTP (its connected balances, payouts, disputes, faults and clock), the worker in the test
//! process. Money is checked at Stripe: what each recipient holds, and conservation.

mod common;

use common::flow::Flow;
use common::money::assert_conserved_at_stripe;
use common::refunds::{
    available, donation_of, donations_confirmed_again, held_per_share, lose_reversal_answers, nets, open_dispute,
    past_in_flight_margin, reversal_posts, scalar, settle_until_sql, three_shares_paid, three_shares_paid_with,
};
use serde_json::Value;
use splitpay::domain::ids::SplitPaymentId;
use splitpay::domain::state::{AllocationStatus, DonationStatus};
use splitpay::store::payments::SplitPayment;

/// Three shares transferred from a card payment, their funds available at the recipients, and the platform with
/// funds of its own (a share sent again after a won dispute draws on them).
async fn transferred_and_available() -> (Flow, SplitPaymentId, SplitPayment) {
    let (flow, id, p) = three_shares_paid(&[]).await;
    flow.control.advance_clock(2 * 86_400 + 60).await.unwrap();
    (flow, id, p)
}

/// The first recipient pays out everything it has available.
async fn first_recipient_pays_out(flow: &Flow) {
    let held0 = available(flow, "acct_rcp0").await;
    flow.control.payout("acct_rcp0", "aud", held0).await.unwrap();
}

/// The platform wins the dispute of `charge`: waits until the reinstatement is applied.
async fn win_dispute(flow: &Flow, charge: &str) {
    flow.control.close_dispute(charge, true).await.unwrap();
    settle_until_sql(
        flow,
        "the reinstatement applied",
        300,
        "SELECT count(*) FROM refunds WHERE reinstated_at IS NOT NULL",
    )
    .await;
}

/// Waits until `made` reversals are made and `in_doubt` others wait with a request in doubt.
async fn until_made_and_in_doubt(flow: &Flow, what: &str, made: i64, in_doubt: i64) {
    let sql = format!(
        "SELECT (count(*) FILTER (WHERE status = 'SUCCEEDED') = {made}
                 AND count(*) FILTER (WHERE status = 'PENDING' AND in_doubt_since IS NOT NULL) = {in_doubt})::int::bigint
           FROM transfer_reversals"
    );
    settle_until_sql(flow, what, 300, &sql).await;
}

/// Finding 1: the first recipient paid everything out, so Stripe refuses the reversal of its share; the dispute is
/// then won. The reinstatement used to wait for that reversal forever (and kept trying to claw the money back). Now
/// it applies per share: the refused reversal is canceled and never made, that share is not sent anything (its
/// recipient kept the money), and the two shares whose reversal was made get a new generation each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_won_dispute_cancels_a_refused_reversal_and_sends_again_only_what_was_taken_back() {
    let (flow, id, p) = transferred_and_available().await;
    let nets = nets(&p);
    first_recipient_pays_out(&flow).await;
    let charge = open_dispute(&flow, &p).await;
    settle_until_sql(
        &flow,
        "two reversals made, the first refused",
        300,
        "SELECT (count(*) FILTER (WHERE status = 'SUCCEEDED') = 2
                 AND count(*) FILTER (WHERE status = 'PENDING' AND failure_code = 'balance_insufficient') = 1)::int::bigint
           FROM transfer_reversals",
    )
    .await;
    assert_eq!(held_per_share(&flow, &p).await, [nets[0], 0, 0]);
    let tr0 = p.allocations[0].stripe_transfer_id.clone().unwrap();

    flow.control.close_dispute(&charge, true).await.unwrap();
    settle_until_sql(
        &flow,
        "the reinstatement applied and the new generations transferred",
        300,
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
    let reversed = donations_confirmed_again(&flow, &p).await;
    for event in &reversed {
        assert_eq!(event["data"]["deleted_at"], Value::Null);
    }
    assert_eq!(
        reversed[0]["data"]["status"], "CONFIRMED",
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
    let (flow, id, p) = three_shares_paid_with(&[], true, |d| {
        d.reverse_on_refund = splitpay::app::ReversePolicy::None;
    })
    .await;
    let nets = nets(&p);
    let charge = open_dispute(&flow, &p).await;
    settle_until_sql(
        &flow,
        "the withdrawal taken",
        300,
        "SELECT (count(*) FILTER (WHERE covered_at IS NOT NULL) = 3)::int::bigint FROM refund_parts",
    )
    .await;
    for i in 0..3 {
        let (status, _, deleted, _) = donation_of(&flow, &p.allocations[i], "donation.refunded").await;
        assert_eq!((status, deleted), (DonationStatus::Refunded, true), "share {i}");
    }
    win_dispute(&flow, &charge).await;
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
    for event in donations_confirmed_again(&flow, &p).await {
        assert_eq!(event["data"]["status"], "CONFIRMED");
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
    let nets = nets(&p);
    first_recipient_pays_out(&flow).await;
    for a in &p.allocations[..2] {
        lose_reversal_answers(&flow, a.stripe_transfer_id.as_deref().unwrap()).await;
    }
    let charge = open_dispute(&flow, &p).await;
    until_made_and_in_doubt(&flow, "the third reversal made, two in doubt", 1, 2).await;
    assert_eq!(
        held_per_share(&flow, &p).await,
        [nets[0], 0, 0],
        "Stripe made the second one"
    );

    win_dispute(&flow, &charge).await;
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
    past_in_flight_margin(&flow, "cancel_requested_at IS NOT NULL").await;
    settle_until_sql(
        &flow,
        "the lookups settled and the second share sent again",
        300,
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
    lose_reversal_answers(&flow, &tr0).await;
    let charge = open_dispute(&flow, &p).await;
    until_made_and_in_doubt(&flow, "two reversals made, the first in doubt", 2, 1).await;
    // The first send was an hour ago; its retry is due now and is sent (its answer lost again).
    sqlx::query(
        "UPDATE transfer_reversals SET in_doubt_since = now() - interval '1 hour', next_attempt_at = now()
          WHERE status = 'PENDING'",
    )
    .execute(&flow.db.pool)
    .await
    .unwrap();
    settle_until_sql(
        &flow,
        "the retry sent",
        300,
        "SELECT count(*) FROM transfer_reversals
          WHERE status = 'PENDING' AND in_doubt_since > now() - interval '1 minute'",
    )
    .await;

    win_dispute(&flow, &charge).await;
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
