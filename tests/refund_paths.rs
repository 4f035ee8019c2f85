//! Refund paths the issue names that had no test yet (issue 8, point 6): a partial dashboard refund that lands
//! before distribution (less is transferred), and a refund that is pending and then fails (`charge.refund.updated`:
//! nothing reversed, nothing emitted). Real PostgreSQL, the simulator over HTTP, the worker in the test process;
//! amounts checked at Stripe.

mod common;

use common::flow::Flow;
use common::money::assert_conserved_at_stripe;
use common::refunds::{
    charge_refunded_cents, dashboard_refund, held_per_share, hold_webhooks, ops_refund, parked_json, parts_taken,
    release_webhooks, scalar, settle_until_sql, transferred_with_pending_refunds,
};
use splitpay::domain::plan::{AmountMode, PaymentMethodType};
use splitpay::domain::refund_split::net_of;
use splitpay::domain::state::{AllocationStatus, PaymentStatus};
use splitpay::stripe::PaymentGateway;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_dashboard_refund_before_distribution_reduces_what_is_transferred() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000, 3_000], &[]).await;
    flow.control.top_up("aud", 1_000_000).await.unwrap();
    // Stripe's events are held: the refund is made before splitpay hears that the payment succeeded, and the
    // events are then delivered newest first (the refund before the success).
    hold_webhooks(&flow).await;
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    let p = flow.payment(&id).await;
    flow.gateway
        .create_refund(&dashboard_refund(&p, 600, "dashboard-before"))
        .await
        .unwrap();
    release_webhooks(&flow).await;
    let p = flow
        .wait_until(&id, "transferred", |p| {
            p.payment.status == PaymentStatus::Succeeded
                && p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
        })
        .await;
    settle_until_sql(
        &flow,
        "the refund's parts covered",
        300,
        "SELECT (count(*) = 3)::int::bigint FROM refund_parts WHERE covered_at IS NOT NULL",
    )
    .await;
    // 600 by gross: 100/200/300, each taking its net share from what is transferred, nothing reversed.
    let parts = [100_i64, 200, 300];
    let want: Vec<i64> = p
        .allocations
        .iter()
        .zip(parts)
        .map(|(a, part)| {
            let net = a.net_amount_cents.unwrap();
            net - net_of(part, net, a.gross_amount_cents)
        })
        .collect();
    assert_eq!(held_per_share(&flow, &p).await, want, "less is transferred");
    assert_eq!(scalar(&flow, "SELECT count(*) FROM transfer_reversals").await, 0);
    assert_eq!(
        scalar(
            &flow,
            "SELECT coalesce(sum(from_pending_cents), 0)::bigint FROM refund_parts"
        )
        .await,
        p.allocations
            .iter()
            .zip(parts)
            .map(|(a, part)| net_of(part, a.net_amount_cents.unwrap(), a.gross_amount_cents))
            .sum::<i64>()
    );
    assert_eq!(flow.count_events("donation.refunded").await, 3);
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_pending_then_failed_reverses_nothing_and_emits_nothing() {
    let (flow, id, p) = transferred_with_pending_refunds(&[1_000, 2_000, 3_000]).await;
    let before = held_per_share(&flow, &p).await;
    let refund = flow
        .gateway
        .create_refund(&dashboard_refund(&p, 600, "dashboard-pending"))
        .await
        .unwrap();
    assert_eq!(refund.status.as_deref(), Some("pending"));
    let wait_status = |want: &'static str| {
        let pool = flow.db.pool.clone();
        async move {
            for _ in 0..300 {
                let status: Option<String> = sqlx::query_scalar("SELECT status FROM refunds")
                    .fetch_optional(&pool)
                    .await
                    .unwrap();
                if status.as_deref() == Some(want) {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            panic!("the refund never became {want}");
        }
    };
    wait_status("PENDING").await;
    flow.control.settle_refund(&refund.id, false).await.unwrap();
    wait_status("FAILED").await;
    splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();

    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM refund_parts").await,
        0,
        "a failed refund is not attributed"
    );
    assert_eq!(scalar(&flow, "SELECT count(*) FROM transfer_reversals").await, 0);
    assert_eq!(flow.count_events("donation.refunded").await, 0);
    assert_eq!(
        scalar(
            &flow,
            "SELECT coalesce(sum(refunded_amount_cents), 0)::bigint FROM donations"
        )
        .await,
        0
    );
    assert_eq!(held_per_share(&flow, &p).await, before, "nothing taken back");
    assert_eq!(
        charge_refunded_cents(&flow, &p).await,
        0,
        "Stripe gave the failed refund back to the charge"
    );
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// An `ops refund --reverse-transfer` whose refund Stripe failed later leaves its reversal's money on the platform
/// (listed by `ops parked`). Run again, the command takes that reversal as its own: it refunds the donor without
/// reversing the transfer a second time (review M1's twin on the operator's side; before, the command said the donor
/// had everything back and refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ops_refund_run_again_after_its_refund_failed_reuses_the_reversal_made() {
    let (flow, id, p) = transferred_with_pending_refunds(&[1_000, 2_000]).await;
    let a0 = p.allocations[0].clone();
    let net0 = a0.net_amount_cents.unwrap();
    let flags = ["--reverse-transfer", "--yes"];
    let out = ops_refund(&flow, &a0.id, &flags);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let refund_id = |status: &'static str| {
        let pool = flow.db.pool.clone();
        async move {
            for _ in 0..300 {
                let id: Option<String> = sqlx::query_scalar(
                    "SELECT stripe_refund_id FROM refunds WHERE status = $1 ORDER BY id DESC LIMIT 1",
                )
                .bind(status)
                .fetch_optional(&pool)
                .await
                .unwrap();
                if let Some(id) = id {
                    return id;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            panic!("no refund became {status}");
        }
    };
    let first = refund_id("PENDING").await;
    flow.control.settle_refund(&first, false).await.unwrap();
    refund_id("FAILED").await;
    assert_eq!(
        held_per_share(&flow, &p).await,
        [0, p.allocations[1].net_amount_cents.unwrap()]
    );
    let parked = parked_json(&flow);
    assert_eq!(
        parked["reversed_without_refund"].as_array().unwrap().len(),
        1,
        "{parked}"
    );

    // Run again: the same net, no new reversal.
    let dry = ops_refund(&flow, &a0.id, &["--reverse-transfer", "--dry-run", "--json"]);
    let plan: serde_json::Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(plan["dry_run"]["refund_cents"], net0, "{plan}");
    assert_eq!(plan["dry_run"]["reversal_cents"], 0, "{plan}");
    assert_eq!(plan["dry_run"]["reversal_reused_cents"], net0, "{plan}");
    let out = ops_refund(&flow, &a0.id, &flags);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let second = refund_id("PENDING").await;
    assert_ne!(first, second);
    flow.control.settle_refund(&second, true).await.unwrap();
    refund_id("SUCCEEDED").await;
    settle_until_sql(
        &flow,
        "the refund's part covered",
        300,
        "SELECT (count(*) = 1)::int::bigint FROM refund_parts WHERE covered_at IS NOT NULL",
    )
    .await;
    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM transfer_reversals").await,
        1,
        "one reversal, ever"
    );
    let (reversed, lost) = parts_taken(&flow).await;
    assert_eq!(reversed, net0);
    assert_eq!(lost, 0);
    assert_eq!(
        charge_refunded_cents(&flow, &p).await,
        net0,
        "the donor has the share back, once"
    );
    let parked = parked_json(&flow);
    assert_eq!(parked["reversed_without_refund"], serde_json::json!([]), "{parked}");
    assert_eq!(parked["reversed_refund_not_sent"], serde_json::json!([]), "{parked}");
    assert_eq!(flow.count_events("donation.refunded").await, 1);
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}
