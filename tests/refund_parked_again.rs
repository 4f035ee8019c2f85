//! A share parked again after an earlier generation was transferred and partly reversed (review of stop 21,
//! finding 1): an `ops refund --reverse-transfer` whose refund Stripe failed leaves its reversal on the platform; a
//! dashboard refund's part takes what it needs of it and the rest goes back to the recipient as generation 2; that
//! transfer is refused (the account lost its capability) and the share parks. The share then holds only what it is
//! owed, not its whole net: refunding it must give the donor that, never more than the share's gross. Real
//! PostgreSQL, the simulator over HTTP, the worker in the test process; money checked at Stripe.
mod common;

use common::money::assert_conserved_at_stripe;
use common::refunds::{dashboard_refund, ops_refund, settle_until_sql, transferred_with_pending_refunds};
use splitpay::domain::state::AllocationStatus;
use splitpay::store::money_report::money_report;
use splitpay::store::refunds::outstanding_cents;
use splitpay::stripe::PaymentGateway;

const EVENTS_PROCESSED: &str = "SELECT (count(*) = 0)::int::bigint FROM stripe_events WHERE processed_at IS NULL";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_parked_on_a_later_generation_is_refunded_what_it_holds_not_its_net() {
    let (flow, id, p) = transferred_with_pending_refunds(&[1_000, 2_000, 3_000]).await;
    let a0 = p.allocations[0].clone();
    let net0 = a0.net_amount_cents.unwrap();
    // The orphan: share 0 reversed whole for an ops refund that Stripe then fails.
    let out = ops_refund(&flow, &a0.id, &["--reverse-transfer", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    settle_until_sql(
        &flow,
        "ops refund pending, reversal made",
        600,
        "SELECT ((SELECT count(*) FROM refunds WHERE source = 'ops' AND status = 'PENDING') = 1
                 AND (SELECT count(*) FROM transfer_reversals WHERE status = 'SUCCEEDED') = 1)::int::bigint",
    )
    .await;
    let failing: String = sqlx::query_scalar("SELECT stripe_refund_id FROM refunds WHERE source = 'ops'")
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    flow.control.settle_refund(&failing, false).await.unwrap();
    settle_until_sql(
        &flow,
        "ops refund failed",
        600,
        "SELECT (count(*) = 1)::int::bigint FROM refunds WHERE source = 'ops' AND status = 'FAILED'",
    )
    .await;
    settle_until_sql(&flow, "events", 600, EVENTS_PROCESSED).await;

    // The recipient loses its transfers capability; a dashboard refund's part takes what it needs of the orphan and
    // the rest goes back as generation 2, which parks.
    flow.control
        .set_transfers_capability("acct_rcp0", "inactive")
        .await
        .unwrap();
    let r = flow
        .gateway
        .create_refund(&dashboard_refund(&p, 600, "dash-600"))
        .await
        .unwrap();
    flow.control.settle_refund(&r.id, true).await.unwrap();
    settle_until_sql(
        &flow,
        "share 0 parked on generation 2",
        600,
        &format!(
            "SELECT (count(*) = 1)::int::bigint FROM split_allocations
              WHERE id = '{}' AND status = 'PARKED' AND generation = 2",
            a0.id
        ),
    )
    .await;
    settle_until_sql(&flow, "events", 600, EVENTS_PROCESSED).await;
    let (part_cents, part_reversal_cents): (i64, i64) = sqlx::query_as(
        "SELECT p.amount_cents, p.reversal_cents FROM refund_parts p JOIN refunds r ON r.id = p.refund_id
          WHERE r.source = 'external' AND p.split_allocation_id = $1",
    )
    .bind(&a0.id)
    .fetch_one(&flow.db.pool)
    .await
    .unwrap();
    assert_eq!(
        part_cents, 100,
        "share 0's part of the 600 spread over 1,000/2,000/3,000"
    );
    let owed = outstanding_cents(&mut flow.db.pool.acquire().await.unwrap(), &a0.id, net0)
        .await
        .unwrap();
    assert_eq!(
        owed,
        net0 - part_reversal_cents,
        "generation 2 holds what the part did not use"
    );
    let gen2_cents: i64 = sqlx::query_scalar(
        "SELECT amount_cents FROM transfer_attempts WHERE split_allocation_id = $1 AND generation = 2",
    )
    .bind(&a0.id)
    .fetch_one(&flow.db.pool)
    .await
    .unwrap();
    assert_eq!(gen2_cents, owed);

    // The dry run says what the donor gets: what the share holds.
    let dry = ops_refund(&flow, &a0.id, &["--dry-run", "--json"]);
    assert_eq!(dry.status.code(), Some(0), "{}", String::from_utf8_lossy(&dry.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(plan["dry_run"]["refund_cents"], owed, "{plan}");
    let out = ops_refund(&flow, &a0.id, &["--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let second: (String, i64) = sqlx::query_as(
        "SELECT stripe_refund_id, amount_cents FROM refunds WHERE source = 'ops' AND status = 'PENDING'",
    )
    .fetch_one(&flow.db.pool)
    .await
    .unwrap();
    assert_eq!(second.1, owed, "Stripe was asked for what the share holds");
    flow.control.settle_refund(&second.0, true).await.unwrap();
    settle_until_sql(
        &flow,
        "second ops refund attributed",
        600,
        "SELECT (count(*) = 1)::int::bigint FROM refunds
          WHERE source = 'ops' AND status = 'SUCCEEDED' AND attributed_at IS NOT NULL",
    )
    .await;
    settle_until_sql(&flow, "events", 600, EVENTS_PROCESSED).await;

    let share_parts: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(amount_cents), 0)::bigint FROM refund_parts WHERE split_allocation_id = $1",
    )
    .bind(&a0.id)
    .fetch_one(&flow.db.pool)
    .await
    .unwrap();
    assert_eq!(share_parts, part_cents + owed);
    assert!(
        share_parts <= a0.gross_amount_cents,
        "the donor got back more than the share"
    );
    let after = flow.payment(&id).await;
    assert_eq!(after.allocations[0].status, AllocationStatus::Refunded);
    let left = outstanding_cents(&mut flow.db.pool.acquire().await.unwrap(), &a0.id, net0)
        .await
        .unwrap();
    assert_eq!(left, 0, "nothing owed to the recipient, nothing over-refunded");
    let report = money_report(&mut flow.db.pool.acquire().await.unwrap(), &id)
        .await
        .unwrap();
    assert!(report.is_conserved(), "{report:?}");
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}
