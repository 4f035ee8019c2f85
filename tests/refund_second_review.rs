//! The three fixes of the second review of the orphan fixes (commit 03d8e37), each with the scenario that needs it:
//! (a) a reversal recorded made covers its share's waiting parts even when the row it sent was read before its
//! cancel was requested; (b) an `ops refund` Stripe refuses for good gives its made reversal to a part that had
//! booked it as the platform's loss; (c) a won dispute waits while a share's made reversal belongs to a refund still
//! pending at Stripe. Real PostgreSQL, the simulator over HTTP (with `pending_refunds_survive_disputes` for (c)),
//! the worker in the test process and `splitpay ops` as a child process. Money is checked at Stripe: what each
//! recipient holds and how many transfers each share got, and conservation through the money report.

mod common;

use common::flow::Flow;
use common::money::assert_conserved_at_stripe;
use common::refunds::{
    charge_refunded_cents, dashboard_refund, donation_of, fault_posts, held_per_share, nets, open_dispute, ops_refund,
    parked_json, recipient_balances, reversal_posts, scalar, settle_until_sql, three_shares_paid,
    transferred_with_refunds_pending_through_disputes, transfers_per_share,
};
use common::workers::wait_for;
use splitpay::domain::ids::SplitPaymentId;
use splitpay::domain::state::DonationStatus;
use splitpay::store::money_report::{money_report, MoneyReport};
use splitpay::store::payments::SplitPayment;
use splitpay::stripe::sim::FaultKind;
use splitpay::stripe::PaymentGateway;

/// Every Stripe event received is processed.
const EVENTS_PROCESSED: &str = "SELECT (count(*) = 0)::int::bigint FROM stripe_events WHERE processed_at IS NULL";

/// splitpay's own money report of the payment, asserted to add up.
async fn report(flow: &Flow, id: &SplitPaymentId) -> MoneyReport {
    let r = money_report(&mut flow.db.pool.acquire().await.unwrap(), id)
        .await
        .unwrap();
    assert!(r.is_conserved(), "{r:?}");
    r
}

/// `(amount, reversal, platform loss, covered)` of share `allocation`'s part of the refund `refund_sql` selects.
async fn part_of(flow: &Flow, allocation: &str, refund_sql: &str) -> (i64, i64, i64, bool) {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT amount_cents, reversal_cents, platform_loss_cents, covered_at IS NOT NULL FROM refund_parts
          WHERE split_allocation_id = $1 AND refund_id = ({refund_sql})"
    )))
    .bind(allocation)
    .fetch_one(&flow.db.pool)
    .await
    .unwrap()
}

const OPS_REFUND: &str = "SELECT id FROM refunds WHERE source = 'ops'";
const DISPUTE_REFUND: &str = "SELECT id FROM refunds WHERE source = 'dispute'";
const DASHBOARD_REFUND: &str = "SELECT id FROM refunds WHERE source = 'external'";

// --- (c) a won dispute waits for a refund pending at Stripe -----------------------------------------------------

/// Three shares transferred from a card payment; Stripe's refunds start pending and stay pending when the charge is
/// disputed (until the test settles them); the platform has funds of its own.
async fn paid_with_refunds_pending_through_disputes() -> (Flow, SplitPaymentId, SplitPayment) {
    transferred_with_refunds_pending_through_disputes(&[1_000, 2_000, 3_000]).await
}

/// Settles Stripe's pending `refund` (`succeeded` or failed) and waits (`what`) until `sql` answers 1; then nothing
/// more comes, however often the reconciler runs, and every event is processed.
async fn settle_the_pending_refund(flow: &Flow, refund: &str, succeeded: bool, what: &str, sql: &str) {
    flow.control.settle_refund(refund, succeeded).await.unwrap();
    settle_until_sql(flow, what, 600, sql).await;
    for _ in 0..5 {
        splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    settle_until_sql(flow, "events processed", 600, EVENTS_PROCESSED).await;
}

/// `ops refund --reverse-transfer` of the first share: its reversal is made and its refund left pending at Stripe.
/// Then the whole charge is disputed (the refund stays pending) and the dispute is won. Returns Stripe's refund id
/// and what each recipient held after the withdrawal, once the reinstatement was seen and the reconciler ran over it.
async fn ops_refund_pending_then_dispute_won(flow: &Flow, p: &SplitPayment) -> (String, Vec<i64>) {
    let a0 = &p.allocations[0];
    let net0 = a0.net_amount_cents.unwrap();
    let out = ops_refund(flow, &a0.id, &["--reverse-transfer", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    settle_until_sql(
        flow,
        "the ops refund pending at Stripe, its reversal made",
        600,
        "SELECT ((SELECT count(*) FROM refunds WHERE source = 'ops' AND status = 'PENDING') = 1
                 AND (SELECT count(*) FROM transfer_reversals WHERE status = 'SUCCEEDED') = 1)::int::bigint",
    )
    .await;
    settle_until_sql(flow, "refund events processed", 600, EVENTS_PROCESSED).await;
    let refund: String = sqlx::query_scalar("SELECT stripe_refund_id FROM refunds WHERE source = 'ops'")
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    assert_eq!(held_per_share(flow, p).await[0], 0, "the first share was reversed");

    let charge = open_dispute(flow, p).await;
    let at_stripe = flow.gateway.list_refunds(&charge).await.unwrap();
    assert_eq!(
        at_stripe.iter().map(|r| r.status.as_deref()).collect::<Vec<_>>(),
        [Some("pending")],
        "the dispute left the refund pending"
    );
    settle_until_sql(
        flow,
        "the withdrawal taken, its parts covered, two dispute reversals made",
        600,
        "SELECT ((SELECT count(*) FROM disputes WHERE withdrawn_at IS NOT NULL) = 1
                 AND (SELECT count(*) FROM refund_parts WHERE covered_at IS NULL) = 0
                 AND (SELECT count(*) FROM transfer_reversals r JOIN refunds f ON f.id = r.cause_refund_id
                       WHERE f.source = 'dispute' AND r.status = 'SUCCEEDED') = 2)::int::bigint",
    )
    .await;
    let dispute_amount = scalar(flow, "SELECT amount_cents FROM disputes").await;
    assert_eq!(
        dispute_amount,
        p.payment.total_amount_cents - net0,
        "the pending refund still counts as refunded"
    );
    // The first share's part of the withdrawal found its transfer already reversed (by the pending refund's
    // reversal): the platform bears it.
    let (amount, reversal, loss, covered) = part_of(flow, &a0.id, DISPUTE_REFUND).await;
    assert_eq!((reversal, loss, covered), (0, amount, true));
    // The others' parts reversed their recipients' share of them (the part less its fees).
    let mut held = vec![0];
    for a in &p.allocations[1..] {
        let (_, reversal, _, _) = part_of(flow, &a.id, DISPUTE_REFUND).await;
        assert!(reversal > 0);
        held.push(a.net_amount_cents.unwrap() - reversal);
    }
    assert_eq!(held_per_share(flow, p).await, held);

    flow.control.close_dispute(&charge, true).await.unwrap();
    settle_until_sql(
        flow,
        "the reinstatement seen",
        600,
        "SELECT (count(*) = 1)::int::bigint FROM disputes WHERE reinstate_seen_at IS NOT NULL",
    )
    .await;
    settle_until_sql(flow, "dispute events processed", 600, EVENTS_PROCESSED).await;
    for _ in 0..3 {
        splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
    }
    (refund, held)
}

/// The reinstatement waited while the refund was pending: nothing was sent again, each recipient holds what it
/// held after the withdrawal (`held`).
async fn assert_reinstatement_waited(flow: &Flow, id: &SplitPaymentId, held: &[i64]) {
    assert_eq!(
        scalar(flow, "SELECT count(*) FROM refunds WHERE reinstated_at IS NOT NULL").await,
        0,
        "the reinstatement waits while the first share's reversal belongs to a refund pending at Stripe"
    );
    let p = flow.payment(id).await;
    assert_eq!(transfers_per_share(flow, &p).await, [1, 1, 1], "nothing sent again yet");
    assert_eq!(held_per_share(flow, &p).await, held);
}

/// Fix (c): the pending refund then succeeds. Its reversal is its own, so the first share is owed nothing when the
/// reinstatement applies: never sent again (it used to be sent again at once, and the refund's success then took the
/// same reversal: the recipient and the donor both had the share). The others get what the withdrawal took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_won_dispute_waits_for_a_pending_refund_that_then_succeeds_and_never_pays_its_share_twice() {
    let (flow, id, p) = paid_with_refunds_pending_through_disputes().await;
    let nets = nets(&p);
    let a0 = p.allocations[0].clone();
    let (refund, held) = ops_refund_pending_then_dispute_won(&flow, &p).await;
    assert_reinstatement_waited(&flow, &id, &held).await;

    settle_the_pending_refund(
        &flow,
        &refund,
        true,
        "the refund succeeded, the reinstatement applied, the other shares sent again",
        "SELECT ((SELECT count(*) FROM refunds WHERE source = 'ops' AND status = 'SUCCEEDED') = 1
                 AND (SELECT count(*) FROM refunds WHERE reinstated_at IS NOT NULL) = 1
                 AND (SELECT count(*) FROM split_allocations WHERE status <> 'TRANSFERRED') = 0
                 AND (SELECT count(*) FROM split_allocations WHERE generation = 2) = 2)::int::bigint",
    )
    .await;

    let p = flow.payment(&id).await;
    let generations: Vec<i32> = p.allocations.iter().map(|a| a.generation).collect();
    assert_eq!(generations, [1, 2, 2], "the first share is not sent again");
    assert_eq!(transfers_per_share(&flow, &p).await, [1, 2, 2]);
    let held = [0, nets[1], nets[2]];
    assert_eq!(held_per_share(&flow, &p).await, held);
    assert_eq!(recipient_balances(&flow, &p).await, held, "at the recipients' accounts");
    // The refund's part of the first share is its reversal, whole; the donor has the share's net back.
    assert_eq!(part_of(&flow, &a0.id, OPS_REFUND).await, (nets[0], nets[0], 0, true));
    assert_eq!(charge_refunded_cents(&flow, &p).await, nets[0]);
    let (status, refunded, deleted, _) = donation_of(&flow, &a0, "donation.refunded").await;
    assert_eq!((status, refunded, deleted), (DonationStatus::Refunded, nets[0], true));
    assert_eq!(parked_json(&flow)["reversed_without_refund"], serde_json::json!([]));
    let r = report(&flow, &id).await;
    assert_eq!(
        (
            r.refunded_cents,
            r.disputed_cents,
            r.platform_loss_cents,
            r.unsettled_cents
        ),
        (nets[0], 0, 0, 0),
        "{r:?}"
    );
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// Fix (c), the other outcome: the pending refund fails. Its reversal then stands for no refund, so the first share
/// is owed its net again: the reinstatement applies and sends it exactly once, with the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_won_dispute_waits_for_a_pending_refund_that_then_fails_and_sends_its_share_back_once() {
    let (flow, id, p) = paid_with_refunds_pending_through_disputes().await;
    let nets = nets(&p);
    let (refund, held) = ops_refund_pending_then_dispute_won(&flow, &p).await;
    assert_reinstatement_waited(&flow, &id, &held).await;

    settle_the_pending_refund(
        &flow,
        &refund,
        false,
        "the refund failed, the reinstatement applied, every share sent again",
        "SELECT ((SELECT count(*) FROM refunds WHERE source = 'ops' AND status = 'FAILED') = 1
                 AND (SELECT count(*) FROM refunds WHERE reinstated_at IS NOT NULL) = 1
                 AND (SELECT count(*) FROM split_allocations WHERE status <> 'TRANSFERRED') = 0
                 AND (SELECT count(*) FROM split_allocations WHERE generation = 2) = 3)::int::bigint",
    )
    .await;

    let p = flow.payment(&id).await;
    assert_eq!(
        transfers_per_share(&flow, &p).await,
        [2, 2, 2],
        "each share sent again once"
    );
    let second: i64 = sqlx::query_scalar(
        "SELECT amount_cents FROM transfer_attempts WHERE split_allocation_id = $1 AND generation = 2
            AND outcome = 'TRANSFERRED'",
    )
    .bind(&p.allocations[0].id)
    .fetch_one(&flow.db.pool)
    .await
    .unwrap();
    assert_eq!(second, nets[0], "the first share gets its net back, once");
    assert_eq!(held_per_share(&flow, &p).await, nets);
    assert_eq!(recipient_balances(&flow, &p).await, nets, "at the recipients' accounts");
    assert_eq!(
        charge_refunded_cents(&flow, &p).await,
        0,
        "the donor was refunded nothing"
    );
    // The failed refund's reversal went back to the recipient with the share's second generation: not listed as
    // stranded on the platform (an operator told to refund the donor "with it" would take the share back again).
    assert_eq!(parked_json(&flow)["reversed_without_refund"], serde_json::json!([]));
    for a in &p.allocations {
        let (status, refunded, deleted, _) = donation_of(&flow, a, "donation.refunded").await;
        assert_eq!(
            (status, refunded, deleted),
            (DonationStatus::Confirmed, 0, false),
            "{}",
            a.id
        );
    }
    let r = report(&flow, &id).await;
    assert_eq!(
        (
            r.refunded_cents,
            r.disputed_cents,
            r.platform_loss_cents,
            r.unsettled_cents
        ),
        (0, 0, 0, 0),
        "{r:?}"
    );
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

// --- (b) an ops refund Stripe refuses for good ---------------------------------------------------------------------

/// Fix (b): `ops refund --reverse-transfer` of the first share makes its reversal, but its refund request never
/// reaches Stripe (the connection drops; the command says the outcome is unknown). Meanwhile the whole charge is
/// refunded from the dashboard: that refund's part of the first share finds its transfer already reversed (by the
/// intent's reversal) and books it all as the platform's loss. Run again, the command's refund is refused for good
/// (the charge is fully refunded): its reversal now covers that part, so the loss becomes a reversal. It used to be
/// left to a FAILED intent, listed as stranded, with the money report short by the share's net.
///
/// (A dispute's part cannot be that part: a withdrawal closes every `ops refund` intent not yet answered in the
/// same transaction, and `ops refund` refuses, or closes, an intent once a dispute is recorded.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ops_refund_refused_for_good_gives_its_reversal_to_a_part_that_booked_it_as_loss() {
    let (flow, id, p) = three_shares_paid(&[]).await;
    let nets = nets(&p);
    let a0 = p.allocations[0].clone();
    let gross0 = a0.gross_amount_cents;
    let total = p.payment.total_amount_cents;

    fault_posts(&flow, FaultKind::DropConnection, 1_000, "/v1/refunds").await;
    let out = ops_refund(&flow, &a0.id, &["--reverse-transfer", "--yes"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("outcome is unknown"), "{stderr}");
    flow.control.clear_faults().await.unwrap();
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM refunds r JOIN transfer_reversals t ON t.cause_refund_id = r.id
              WHERE r.source = 'ops' AND r.status = 'REQUESTED' AND t.status = 'SUCCEEDED'"
        )
        .await,
        1,
        "the intent's reversal made, its refund not"
    );
    assert_eq!(charge_refunded_cents(&flow, &p).await, 0);

    flow.gateway
        .create_refund(&dashboard_refund(&p, total, "dashboard-whole-charge"))
        .await
        .unwrap();
    settle_until_sql(
        &flow,
        "the dashboard refund attributed and covered, its reversals made",
        600,
        "SELECT ((SELECT count(*) FROM refunds WHERE source = 'external' AND attributed_at IS NOT NULL) = 1
                 AND (SELECT count(*) FROM refund_parts WHERE covered_at IS NULL) = 0
                 AND (SELECT count(*) FROM transfer_reversals WHERE status = 'SUCCEEDED') = 3)::int::bigint",
    )
    .await;
    assert_eq!(
        part_of(&flow, &a0.id, DASHBOARD_REFUND).await,
        (gross0, 0, gross0, true),
        "the first share's part booked as loss: the intent's reversal held the transfer"
    );

    let out = ops_refund(&flow, &a0.id, &["--reverse-transfer", "--yes"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Stripe refused the refund"), "{stderr}");
    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM refunds WHERE status = 'FAILED'").await,
        1
    );
    settle_until_sql(&flow, "events processed", 600, EVENTS_PROCESSED).await;

    assert_eq!(
        part_of(&flow, &a0.id, DASHBOARD_REFUND).await,
        (gross0, nets[0], gross0 - nets[0], true),
        "the loss became the refused refund's reversal"
    );
    let (cause, adopted_from): (i64, i64) = sqlx::query_as(
        "SELECT cause_refund_id, adopted_from_refund_id FROM transfer_reversals WHERE adopted_from_refund_id IS NOT NULL",
    )
    .fetch_one(&flow.db.pool)
    .await
    .unwrap();
    assert_eq!(
        (cause, adopted_from),
        (scalar(&flow, DASHBOARD_REFUND).await, scalar(&flow, OPS_REFUND).await)
    );
    assert_eq!(parked_json(&flow)["reversed_without_refund"], serde_json::json!([]));
    let p = flow.payment(&id).await;
    assert_eq!(transfers_per_share(&flow, &p).await, [1, 1, 1], "nothing sent again");
    assert_eq!(held_per_share(&flow, &p).await, [0, 0, 0]);
    assert_eq!(
        recipient_balances(&flow, &p).await,
        [0, 0, 0],
        "at the recipients' accounts"
    );
    assert_eq!(
        charge_refunded_cents(&flow, &p).await,
        total,
        "one refund, the dashboard's"
    );
    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM transfer_reversals").await,
        3,
        "one reversal per share"
    );
    let r = report(&flow, &id).await;
    assert_eq!(
        (r.refunded_cents, r.platform_loss_cents, r.unsettled_cents),
        (total, total - nets.iter().sum::<i64>(), 0),
        "the platform bears the fees only: {r:?}"
    );
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

// --- (a) a reversal recorded made covers the parts that waited for it -----------------------------------------------

/// Fix (a): `ops refund --reverse-transfer` of the first share reads its reversal row and sends it; while Stripe
/// takes its time over the request (the simulator's latency), the charge is disputed. The withdrawal closes the
/// intent and asks for the reversal's cancel (a request of it may have been applied), and the first share's part of
/// the withdrawal waits for that. Stripe then makes the reversal: it is recorded from the row read before the
/// cancel was asked for, and covers the waiting part in the same transaction. It used to leave the part waiting
/// (the row it held had no cancel), and the won dispute applied next dropped it: the first share was never sent
/// its money back, the reversal listed as stranded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_made_after_its_cancel_was_asked_for_covers_the_part_that_waited_for_it() {
    let (flow, id, p) = three_shares_paid(&[]).await;
    let nets = nets(&p);
    let a0 = p.allocations[0].clone();
    let tr0 = a0.stripe_transfer_id.clone().unwrap();

    // Every Stripe request now takes 8 s: the window in which the withdrawal is taken (it calls Stripe for nothing).
    // The command waits that out (its timeout raised); the worker's own reversals time out and are retried with
    // their keys once the latency is gone.
    flow.control.set_latency(8_000, 8_000, 0).await.unwrap();
    let ops = {
        let args = [
            "refund",
            a0.id.as_str(),
            "--reason",
            "donor asked",
            "--reverse-transfer",
            "--yes",
        ]
        .map(str::to_owned);
        let db = flow.db.url.clone();
        let api = flow.sim.base_url();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_splitpay"))
                .arg("ops")
                .args(&args)
                .env("DATABASE_URL", db)
                .env("STRIPE_SECRET_KEY", common::stripe::TEST_KEY)
                .env("STRIPE_API_BASE", api)
                .env("STRIPE_TIMEOUT_MS", "30000")
                .env_remove("RUST_LOG")
                .output()
                .expect("the binary runs")
        })
    };
    // The command's reversal request has reached Stripe (logged on arrival, applied 8 s later).
    for _ in 0..1_500 {
        if reversal_posts(&flow, &tr0).await > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(reversal_posts(&flow, &tr0).await, 1);
    let charge = open_dispute(&flow, &p).await;
    // The withdrawal is taken while that request is in flight: the intent closed, the reversal's cancel asked for.
    let cancel_asked = "SELECT ((SELECT count(*) FROM refunds WHERE source = 'ops' AND status = 'FAILED') = 1
                                AND (SELECT count(*) FROM transfer_reversals t JOIN refunds r ON r.id = t.cause_refund_id
                                      WHERE r.source = 'ops' AND t.status = 'PENDING'
                                        AND t.cancel_requested_at IS NOT NULL) = 1)::int::bigint";
    for _ in 0..300 {
        if scalar(&flow, cancel_asked).await == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        scalar(&flow, cancel_asked).await,
        1,
        "the withdrawal was taken while the reversal request was in flight"
    );
    assert!(!ops.is_finished());
    assert!(
        !part_of(&flow, &a0.id, DISPUTE_REFUND).await.3,
        "the first share's part waits for the reversal in doubt"
    );

    let out = ops.await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("Stripe refused the refund"),
        "the charge is disputed: {stderr}"
    );
    flow.control.set_latency(0, 0, 0).await.unwrap();
    // Recorded made, and the part that waited for it covered in the same transaction: it took the reversal.
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM transfer_reversals t JOIN refunds r ON r.id = t.adopted_from_refund_id
              WHERE r.source = 'ops' AND t.status = 'SUCCEEDED'"
        )
        .await,
        1,
        "the reversal recorded made, and taken by the part that waited for it"
    );
    let (amount, reversal, loss, covered) = part_of(&flow, &a0.id, DISPUTE_REFUND).await;
    assert_eq!(
        (reversal, loss, covered),
        (nets[0], amount - nets[0], true),
        "the waiting part covered by the reversal"
    );

    // No refunds sweep runs from here until the reinstatement is applied: the sweep covers a part left waiting,
    // and the window between a reversal recorded and the next sweep (a minute in production) is what the fix
    // closes. The worker alone makes the other reversals and applies the reinstatement.
    let max = std::time::Duration::from_secs(60);
    wait_for(
        &flow,
        "the other shares' dispute reversals made, every event processed",
        "SELECT (SELECT count(*) FROM transfer_reversals WHERE status = 'SUCCEEDED') = 3
                AND (SELECT count(*) FROM stripe_events WHERE processed_at IS NULL) = 0",
        max,
    )
    .await;
    assert_eq!(held_per_share(&flow, &p).await, [0, 0, 0]);
    // Won: every share is sent what the withdrawal took, the first one too.
    flow.control.close_dispute(&charge, true).await.unwrap();
    wait_for(
        &flow,
        "the reinstatement applied",
        "SELECT count(*) = 1 FROM refunds WHERE reinstated_at IS NOT NULL",
        max,
    )
    .await;
    settle_until_sql(
        &flow,
        "every share sent again",
        600,
        "SELECT ((SELECT count(*) FROM split_allocations WHERE status <> 'TRANSFERRED') = 0
                 AND (SELECT count(*) FROM split_allocations WHERE generation = 2) = 3)::int::bigint",
    )
    .await;
    for _ in 0..5 {
        splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let p = flow.payment(&id).await;
    assert_eq!(
        transfers_per_share(&flow, &p).await,
        [2, 2, 2],
        "each share sent again once"
    );
    assert_eq!(held_per_share(&flow, &p).await, nets);
    assert_eq!(recipient_balances(&flow, &p).await, nets, "at the recipients' accounts");
    assert_eq!(charge_refunded_cents(&flow, &p).await, 0);
    assert_eq!(parked_json(&flow)["reversed_without_refund"], serde_json::json!([]));
    let r = report(&flow, &id).await;
    assert_eq!(
        (
            r.refunded_cents,
            r.disputed_cents,
            r.platform_loss_cents,
            r.unsettled_cents
        ),
        (0, 0, 0, 0),
        "{r:?}"
    );
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}
