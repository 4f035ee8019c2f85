//! A won dispute's reversal found made at Stripe while its share's new generation is still in flight (review of
//! the reinstatement): the share is owed that reversal's amount too, and gets it once its transfer settles, exactly
//! once, whichever process picks it up. Real PostgreSQL, the simulator over HTTP (its faults, its lookups), the
//! worker in the test process and the jobs called directly through `flow.ctx`. Money is checked at Stripe: what
//! each recipient holds, how many transfers each share got, and conservation.
//!
//! How the state is reached: share 0 holds a reversal made for an `ops refund` intent still waiting for its refund
//! (written through the store, reversing only part of the share, as a partial refund would: `ops refund` itself
//! reverses all the share has left, so it would leave the dispute nothing more to reverse). The charge is disputed:
//! the intent is closed, its reversal adopted by the withdrawal's part, and the rest of the share reversed anew,
//! its answer lost (in doubt). The dispute is won: the share is owed the adopted reversal's amount and starts a new
//! generation, held (Stripe rate-limits every transfer, or the recipient cannot receive one: parked); the in-doubt
//! reversal is left to a lookup. The lookup then finds it made, while that generation has not settled.

mod common;

use chrono::{DateTime, Utc};
use common::flow::Flow;
use common::money::assert_conserved_at_stripe;
use common::refunds::{
    donations_confirmed_again, fault_posts, held_per_share, lose_reversal_answers, nets, open_dispute,
    past_in_flight_margin, recipient_balances, reversal_posts, scalar, settle_until_sql, three_shares_paid,
    transfers_per_share,
};
use splitpay::domain::ids::{SplitAllocationId, SplitPaymentId};
use splitpay::domain::state::AllocationStatus;
use splitpay::store::payments::SplitPayment;
use splitpay::store::refunds::{insert_refund_intent, RefundIntent};
use splitpay::store::reversals::insert_reversal;
use splitpay::stripe::sim::FaultKind;

/// What the `ops refund` intent's reversal takes from share 0 (part of its net).
const PARTIAL: i64 = 400;

/// The amount of share `allocation`'s successful generation `generation`.
async fn generation_amount(flow: &Flow, allocation: &str, generation: i32) -> i64 {
    sqlx::query_scalar("SELECT amount_cents FROM transfer_attempts WHERE split_allocation_id = $1 AND generation = $2")
        .bind(allocation)
        .bind(generation)
        .fetch_one(&flow.db.pool)
        .await
        .unwrap()
}

async fn share_state(flow: &Flow, allocation: &str) -> (AllocationStatus, i32) {
    let id = SplitAllocationId::parse(allocation).unwrap();
    let a = splitpay::store::allocations::get_split_allocation(&mut flow.db.pool.acquire().await.unwrap(), &id)
        .await
        .unwrap();
    (a.status, a.generation)
}

/// Until each recipient holds its net at Stripe and every share is TRANSFERRED (bounded, 30 s), running the refunds
/// sweep each turn only when `sweep`; then what each holds.
async fn until_each_holds_its_net(flow: &Flow, id: &SplitPaymentId, sweep: bool) -> Vec<i64> {
    let mut held = Vec::new();
    for _ in 0..300 {
        if sweep {
            splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
        }
        let p = flow.payment(id).await;
        held = held_per_share(flow, &p).await;
        if held == nets(&p) && p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    held
}

/// What keeps share 0's new generation from settling when its reversal is found made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// Stripe rate-limits every transfer: each share's new generation stays TRANSFERRING.
    InFlight,
    /// Share 0's recipient cannot receive transfers: its new generation is refused and parked.
    Parked,
}

/// The state the review is about (see the module doc): the dispute won, share 0's new generation held (`hold`), and
/// its withdrawal reversal, in doubt, just found made by its lookup. Returns the flow, the payment as paid, and how
/// many reversal requests of share 0's first transfer Stripe had received.
async fn reversal_found_made_while_the_new_generation_is_held(
    hold: Hold,
) -> (Flow, SplitPaymentId, SplitPayment, usize) {
    let (flow, id, p) = three_shares_paid(&[]).await;
    let nets = nets(&p);
    let a0 = p.allocations[0].clone();
    let tr0 = a0.stripe_transfer_id.clone().unwrap();
    assert!(PARTIAL < nets[0]);

    // An `ops refund` intent of share 0 whose reversal is made, its refund not sent yet.
    let aid = SplitAllocationId::parse(&a0.id).unwrap();
    let mut tx = flow.db.pool.begin().await.unwrap();
    let intent = insert_refund_intent(
        &mut tx,
        &RefundIntent {
            split_payment_id: &p.payment.id,
            split_allocation_id: &aid,
            amount_cents: PARTIAL,
            fee_refunded_cents: 0,
            currency: "aud",
            reason: "donor asked",
        },
    )
    .await
    .unwrap();
    let intent_reversal = insert_reversal(&mut tx, &a0, PARTIAL, Some(intent.id)).await.unwrap();
    tx.commit().await.unwrap();
    splitpay::jobs::refunds::reverse(&flow.ctx, &intent_reversal.to_string())
        .await
        .unwrap();
    assert_eq!(held_per_share(&flow, &p).await[0], nets[0] - PARTIAL);

    // Disputed: the intent is closed, its reversal adopted; the rest of share 0 is reversed, the answer lost.
    lose_reversal_answers(&flow, &tr0).await;
    let charge = open_dispute(&flow, &p).await;
    settle_until_sql(
        &flow,
        "the withdrawal covered: share 0's new reversal in doubt, the others' made",
        600,
        "SELECT ((SELECT count(*) FROM refund_parts WHERE covered_at IS NOT NULL) = 3
                 AND (SELECT count(*) FROM refunds WHERE source = 'ops' AND status = 'FAILED') = 1
                 AND (SELECT count(*) FROM transfer_reversals WHERE status = 'SUCCEEDED') = 3
                 AND (SELECT count(*) FROM transfer_reversals
                       WHERE status = 'PENDING' AND in_doubt_since IS NOT NULL) = 1)::int::bigint",
    )
    .await;
    assert_eq!(held_per_share(&flow, &p).await, [0, 0, 0], "Stripe made every reversal");
    let adopted = scalar(
        &flow,
        &format!("SELECT count(*) FROM transfer_reversals WHERE id = {intent_reversal} AND adopted_from_refund_id IS NOT NULL"),
    )
    .await;
    assert_eq!(
        adopted, 1,
        "the withdrawal's part of share 0 took the closed intent's reversal"
    );

    let held = match hold {
        Hold::InFlight => {
            fault_posts(&flow, FaultKind::RateLimit, 1_000_000, "/v1/transfers").await;
            "(SELECT count(*) FROM split_allocations WHERE status = 'TRANSFERRING' AND generation = 2) = 3"
        }
        Hold::Parked => {
            flow.control
                .set_transfers_capability("acct_rcp0", "inactive")
                .await
                .unwrap();
            "(SELECT count(*) FROM split_allocations WHERE position = 0 AND status = 'PARKED' AND generation = 2) = 1"
        }
    };
    flow.control.close_dispute(&charge, true).await.unwrap();
    settle_until_sql(
        &flow,
        "the reinstatement applied, share 0's new generation held, the reversal in doubt left to a lookup",
        600,
        &format!(
            "SELECT ((SELECT count(*) FROM refunds WHERE reinstated_at IS NOT NULL) = 1 AND {held}
                     AND (SELECT count(*) FROM transfer_reversals
                           WHERE status = 'PENDING' AND cancel_requested_at IS NOT NULL) = 1)::int::bigint"
        ),
    )
    .await;
    assert_eq!(
        generation_amount(&flow, &a0.id, 2).await,
        PARTIAL,
        "share 0 is sent again what the adopted reversal took; the one in doubt took nothing yet"
    );

    // No request can be in flight any more: the lookup finds the reversal made, the new generation still held.
    let posts = reversal_posts(&flow, &tr0).await;
    past_in_flight_margin(&flow, "cancel_requested_at IS NOT NULL").await;
    let in_doubt = scalar(
        &flow,
        "SELECT id FROM transfer_reversals WHERE cancel_requested_at IS NOT NULL",
    )
    .await;
    splitpay::jobs::refunds::reverse(&flow.ctx, &in_doubt.to_string())
        .await
        .unwrap();
    assert_eq!(
        scalar(
            &flow,
            &format!("SELECT count(*) FROM transfer_reversals WHERE id = {in_doubt} AND status = 'SUCCEEDED'"),
        )
        .await,
        1,
        "the lookup found it made"
    );
    let status = match hold {
        Hold::InFlight => AllocationStatus::Transferring,
        Hold::Parked => AllocationStatus::Parked,
    };
    assert_eq!(
        share_state(&flow, &a0.id).await,
        (status, 2),
        "share 0's new generation has not settled"
    );
    (flow, id, p, posts)
}

/// What every test checks once the money has settled: each recipient holds its net (share 0's third generation
/// sends `third` cents, once: what the late reversal took, or all it is owed after a parked generation), each
/// donation CONFIRMED again, one transfer per generation made (`transfers`), the reversal never requested again, and
/// the money conserved.
async fn assert_settled_once(
    flow: &Flow,
    id: &SplitPaymentId,
    p: &SplitPayment,
    held: &[i64],
    posts: usize,
    (transfers, third): ([usize; 3], i64),
) {
    let nets = nets(p);
    assert_eq!(
        held, nets,
        "each recipient holds its net: share 0 gets back the reversal found made while its transfer was in flight"
    );
    // Nothing more comes, however often the sweep runs.
    for _ in 0..3 {
        splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let p = flow.payment(id).await;
    let generations: Vec<i32> = p.allocations.iter().map(|a| a.generation).collect();
    assert_eq!(generations, [3, 2, 2]);
    assert_eq!(
        transfers_per_share(flow, &p).await,
        transfers,
        "one transfer per generation made: no share paid twice"
    );
    assert_eq!(generation_amount(flow, &p.allocations[0].id, 3).await, third);
    assert_eq!(
        scalar(
            flow,
            "SELECT count(*) FROM split_allocations WHERE resend_owed_at IS NOT NULL"
        )
        .await,
        0,
        "no share is left marked"
    );
    assert_eq!(held_per_share(flow, &p).await, nets);
    assert_eq!(recipient_balances(flow, &p).await, nets, "at the recipients' accounts");
    assert_eq!(
        reversal_posts(flow, p.allocations[0].stripe_transfer_id.as_deref().unwrap()).await,
        0,
        "share 0's current transfer was never reversed"
    );
    let tr0 = {
        let first: String = sqlx::query_scalar(
            "SELECT stripe_transfer_id FROM transfer_attempts WHERE split_allocation_id = $1 AND generation = 1",
        )
        .bind(&p.allocations[0].id)
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
        first
    };
    assert_eq!(
        reversal_posts(flow, &tr0).await,
        posts,
        "the reversal in doubt was looked up, never requested again"
    );
    assert_eq!(
        scalar(
            flow,
            "SELECT count(*) FROM transfer_reversals WHERE status <> 'SUCCEEDED'"
        )
        .await,
        0
    );
    donations_confirmed_again(flow, &p).await;
    assert_conserved_at_stripe(flow, id).await;
}

/// The new generation's transfer is then made: recording it sends share 0 what the late reversal took, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_found_made_while_the_share_is_sent_again_is_sent_back_once_the_transfer_settles() {
    let (flow, id, p, posts) = reversal_found_made_while_the_new_generation_is_held(Hold::InFlight).await;
    flow.control.clear_faults().await.unwrap();
    // Only the worker runs: the transfer's success path picks the resend up, no sweep needed.
    let held = until_each_holds_its_net(&flow, &id, false).await;
    assert_settled_once(&flow, &id, &p, &held, posts, ([3, 2, 2], nets(&p)[0] - PARTIAL)).await;
    flow.stop().await;
}

/// The same, when the process that records the new generation's transfer read the share before the late reversal
/// was recorded (it reads the mark from the row it loaded, unlocked, to keep the hot path free of any lookup): the
/// mark then outlives the transfer's success, and the refunds sweep sends the share what it is owed. Two replicas'
/// sweeps at once send it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refunds_sweep_sends_a_late_reversal_back_once_even_from_two_replicas() {
    let (flow, id, p, posts) = reversal_found_made_while_the_new_generation_is_held(Hold::InFlight).await;
    let a0 = p.allocations[0].id.clone();
    // The mark as that process saw it: not there yet.
    let mark: Option<DateTime<Utc>> = sqlx::query_scalar(
        "UPDATE split_allocations n SET resend_owed_at = NULL FROM split_allocations o
          WHERE n.id = $1 AND o.id = n.id RETURNING o.resend_owed_at",
    )
    .bind(&a0)
    .fetch_one(&flow.db.pool)
    .await
    .unwrap();
    assert!(mark.is_some(), "the late reversal left share 0 marked as owed a resend");
    flow.control.clear_faults().await.unwrap();
    settle_until_sql(
        &flow,
        "every second generation transferred",
        600,
        "SELECT (count(*) = 3)::int::bigint FROM split_allocations WHERE status = 'TRANSFERRED' AND generation = 2",
    )
    .await;
    let held = held_per_share(&flow, &flow.payment(&id).await).await;
    assert_eq!(held[0], PARTIAL, "short by the late reversal until the sweep");
    // …and committed after it read the share.
    sqlx::query("UPDATE split_allocations SET resend_owed_at = $2 WHERE id = $1")
        .bind(&a0)
        .bind(mark)
        .execute(&flow.db.pool)
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        splitpay::jobs::refunds::reconcile_refunds(&flow.ctx),
        splitpay::jobs::refunds::reconcile_refunds(&flow.ctx)
    );
    a.unwrap();
    b.unwrap();
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM split_allocations WHERE resend_owed_at IS NOT NULL"
        )
        .await,
        0,
        "the sweep cleared the mark"
    );
    let held = until_each_holds_its_net(&flow, &id, false).await;
    assert_settled_once(&flow, &id, &p, &held, posts, ([3, 2, 2], nets(&p)[0] - PARTIAL)).await;
    flow.stop().await;
}

/// Share 0's new generation is parked instead (its recipient cannot receive transfers) when the reversal is found
/// made. Once the recipient can again, the parked share is retried: its next generation sends all it is owed then,
/// the late reversal's amount included, and the mark is cleared without sending that amount a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reversal_of_a_parked_share_is_sent_once_with_its_retry() {
    let (flow, id, p, posts) = reversal_found_made_while_the_new_generation_is_held(Hold::Parked).await;
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM split_allocations WHERE position = 0 AND resend_owed_at IS NOT NULL"
        )
        .await,
        1,
        "share 0 is marked as owed a resend"
    );
    // The sweep leaves a parked share to its retry.
    splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
    assert_eq!(
        share_state(&flow, &p.allocations[0].id).await,
        (AllocationStatus::Parked, 2)
    );
    flow.control
        .set_transfers_capability("acct_rcp0", "active")
        .await
        .unwrap();
    let held = until_each_holds_its_net(&flow, &id, true).await;
    assert_settled_once(&flow, &id, &p, &held, posts, ([2, 2, 2], nets(&p)[0])).await;
    flow.stop().await;
}
