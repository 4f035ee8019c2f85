//! Refunds (issue 8, points 1, 2 and 5): `splitpay ops refund` run as the real binary against a test database and
//! the simulator over HTTP, with the worker running in the test process. Amounts are checked at Stripe (the charge's
//! refunded amount, the transfer's reversed amount, the request log) and in splitpay's rows (refunds, parts,
//! reversals, allocation and donation states, audit rows, emitted events), and money is conserved against Stripe.

mod common;

use std::process::Output;

use common::flow::Flow;
use common::money::assert_conserved_at_stripe;
use common::refunds::{
    charge_refunded_cents, dashboard_refund, donation_of, fault_posts, redeliver_twice_at_once, stripe_requests,
    three_shares_paid, three_shares_paid_with,
};
use serde_json::Value;
use splitpay::domain::ids::SplitPaymentId;
use splitpay::domain::plan::{AmountMode, PaymentMethodType};
use splitpay::domain::state::{AllocationStatus, DonationStatus};
use splitpay::store::allocations::SplitAllocationRow;
use splitpay::store::money_report::money_report;
use splitpay::store::payments::SplitPayment;
use splitpay::store::refunds::{parts_for_payment, refunds_for_payment};
use splitpay::store::reversals::reversals_for_payment;
use splitpay::stripe::sim::FaultKind;
use splitpay::stripe::PaymentGateway;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `ops refund SALC --reason … --yes --actor alice` plus `extra`.
fn refund(flow: &Flow, allocation: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "refund",
        allocation,
        "--reason",
        "the donor asked",
        "--yes",
        "--actor",
        "alice",
    ];
    args.extend_from_slice(extra);
    flow.ops(&args)
}

/// Everything a refused or dry-run command must leave as it was.
#[derive(Debug, PartialEq, Eq)]
struct Untouched {
    refunds: i64,
    reversals: i64,
    audit: i64,
    refund_posts: usize,
    reversal_posts: usize,
}

async fn untouched(flow: &Flow) -> Untouched {
    Untouched {
        refunds: common::count(&flow.db.pool, "refunds").await,
        reversals: common::count(&flow.db.pool, "transfer_reversals").await,
        audit: common::count(&flow.db.pool, "ops_audit_log").await,
        refund_posts: stripe_requests(flow, "POST", "/v1/refunds").await,
        reversal_posts: stripe_requests(flow, "POST", "/reversals").await,
    }
}

fn pid(p: &SplitPayment) -> SplitPaymentId {
    SplitPaymentId::parse(&p.payment.id).unwrap()
}

async fn allocation(flow: &Flow, p: &SplitPayment, i: usize) -> SplitAllocationRow {
    flow.payment(&pid(p)).await.allocations[i].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_refund_of_parked_shares_net_and_gross() {
    let (flow, _, p) = three_shares_paid(&[0, 1]).await;
    let (a0, a1) = (allocation(&flow, &p, 0).await, allocation(&flow, &p, 1).await);
    assert_eq!(
        (a0.status, a1.status),
        (AllocationStatus::Parked, AllocationStatus::Parked)
    );
    let (net0, net1) = (a0.net_amount_cents.unwrap(), a1.net_amount_cents.unwrap());
    let fee1 = a1.fee_share_cents.unwrap();
    assert!(fee1 > 0, "the card's fee is shared");

    // --dry-run prints the plan and changes nothing, at Stripe or here.
    let before = untouched(&flow).await;
    let out = refund(&flow, &a0.id, &["--dry-run", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["dry_run"]["refund_cents"], net0);
    assert_eq!(untouched(&flow).await, before);

    // net (the default): what the recipient would have received.
    let out = refund(&flow, &a0.id, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(charge_refunded_cents(&flow, &p).await, net0);
    assert_eq!(allocation(&flow, &p, 0).await.status, AllocationStatus::Refunded);
    // gross: the fee share too, borne by the platform.
    let out = refund(&flow, &a1.id, &["--amount", "gross"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(charge_refunded_cents(&flow, &p).await, net0 + net1 + fee1);
    assert_eq!(allocation(&flow, &p, 1).await.status, AllocationStatus::Refunded);

    let mut conn = flow.db.pool.acquire().await.unwrap();
    let refunds = refunds_for_payment(&mut conn, &p.payment.id).await.unwrap();
    let summary: Vec<_> = refunds
        .iter()
        .map(|r| {
            (
                r.amount_cents,
                r.fee_refunded_cents,
                r.status.as_str(),
                r.source.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [(net0, 0, "SUCCEEDED", "ops"), (net1 + fee1, fee1, "SUCCEEDED", "ops")]
    );
    assert_eq!(
        refunds[0].idempotency_key.as_deref(),
        Some(format!("splitpay:refund:{}:1", a0.id).as_str())
    );
    assert!(refunds
        .iter()
        .all(|r| r.stripe_refund_id.as_deref().is_some_and(|s| s.starts_with("re_"))));
    let parts: Vec<_> = parts_for_payment(&mut conn, &p.payment.id)
        .await
        .unwrap()
        .into_iter()
        .map(|x| {
            (
                x.split_allocation_id,
                x.amount_cents,
                x.from_parked_cents,
                x.platform_loss_cents,
            )
        })
        .collect();
    assert_eq!(
        parts,
        [(a0.id.clone(), net0, net0, 0), (a1.id.clone(), net1 + fee1, net1, fee1)]
    );

    // Audit rows, one per refund, in the effect's transaction.
    for (a, amount) in [(&a0, "net"), (&a1, "gross")] {
        let audit = splitpay::store::records::audit_for(&mut conn, &a.id).await.unwrap();
        assert_eq!(audit.len(), 1, "{audit:?}");
        assert_eq!(
            (audit[0].actor.as_str(), audit[0].command.as_str()),
            ("alice", "refund")
        );
        assert_eq!(audit[0].reason.as_deref(), Some("the donor asked"));
        assert_eq!(audit[0].details["parameters"]["amount"], amount);
    }
    // Each donation is refunded once, with one contract-valid event.
    let (status, refunded, deleted, events) = donation_of(&flow, &a0, "donation.refunded").await;
    assert_eq!(
        (status, refunded, deleted, events.len()),
        (DonationStatus::Refunded, net0, true, 1)
    );
    let (status, refunded, deleted, events) = donation_of(&flow, &a1, "donation.refunded").await;
    assert_eq!(
        (status, refunded, deleted, events.len()),
        (DonationStatus::Refunded, net1 + fee1, true, 1)
    );
    assert_eq!(events[0]["data"]["refunded_amount_cents"], net1 + fee1);

    // The platform loss is on the payment and conservation counts it.
    let report = money_report(&mut conn, &pid(&p)).await.unwrap();
    assert_eq!((report.platform_loss_cents, report.parked_cents), (fee1, 0));
    drop(conn);
    assert_conserved_at_stripe(&flow, &pid(&p)).await;

    // A refunded share is refused, and nothing changes.
    let before = untouched(&flow).await;
    let out = refund(&flow, &a0.id, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("REFUNDED"), "{}", stderr(&out));
    assert_eq!(untouched(&flow).await, before);
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_refund_of_a_transferred_share_needs_reverse_transfer_and_reverses_first() {
    let (flow, _, p) = three_shares_paid(&[]).await;
    let a0 = allocation(&flow, &p, 0).await;
    assert_eq!(a0.status, AllocationStatus::Transferred);
    let net0 = a0.net_amount_cents.unwrap();

    // Without --reverse-transfer: refused, exit 1, nothing written, Stripe not called.
    let before = untouched(&flow).await;
    let out = refund(&flow, &a0.id, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--reverse-transfer"), "{}", stderr(&out));
    assert_eq!(untouched(&flow).await, before);

    let out = refund(&flow, &a0.id, &["--reverse-transfer"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // At Stripe: the transfer reversed by the net, then the charge refunded by it, in that order.
    let transfers = flow.gateway.list_transfers(&p.payment.transfer_group).await.unwrap();
    let t0 = transfers
        .iter()
        .find(|t| Some(&t.id) == a0.stripe_transfer_id.as_ref())
        .unwrap();
    assert_eq!(t0.amount_reversed_cents, net0);
    assert_eq!(charge_refunded_cents(&flow, &p).await, net0);
    let log = flow.control.get("requests").await.unwrap();
    let order: Vec<&str> = log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["method"] == "POST")
        .filter_map(|r| r["path"].as_str())
        .filter(|path| path.contains("/reversals") || path.contains("/v1/refunds"))
        .collect();
    assert_eq!(order.len(), 2, "{order:?}");
    assert!(
        order[0].contains("/reversals") && order[1].contains("/v1/refunds"),
        "{order:?}"
    );

    let mut conn = flow.db.pool.acquire().await.unwrap();
    let reversals = reversals_for_payment(&mut conn, &p.payment.id).await.unwrap();
    assert_eq!(reversals.len(), 1);
    assert_eq!(
        (reversals[0].amount_cents, reversals[0].status.as_str()),
        (net0, "SUCCEEDED")
    );
    assert_eq!(
        reversals[0].idempotency_key,
        format!("splitpay:alloc:{}:reversal:1:1", a0.id)
    );
    let parts = parts_for_payment(&mut conn, &p.payment.id).await.unwrap();
    assert_eq!(parts.len(), 1);
    assert_eq!((parts[0].reversal_cents, parts[0].platform_loss_cents), (net0, 0));
    drop(conn);
    // The transfer exists, so the allocation stays TRANSFERRED; the donation is refunded.
    assert_eq!(allocation(&flow, &p, 0).await.status, AllocationStatus::Transferred);
    let (status, refunded, deleted, events) = donation_of(&flow, &a0, "donation.refunded").await;
    assert_eq!(
        (status, refunded, deleted, events.len()),
        (DonationStatus::Refunded, net0, true, 1)
    );
    assert_conserved_at_stripe(&flow, &pid(&p)).await;

    // Run again: the net is back with the donor, so it is refused (nothing written, Stripe not called), and the
    // error offers only the fees still with the platform.
    let fee0 = a0.fee_share_cents.unwrap();
    assert!(fee0 > 0);
    let before = untouched(&flow).await;
    let out = refund(&flow, &a0.id, &["--reverse-transfer"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("--amount gross refunds the {fee0} cents of fees")),
        "{}",
        stderr(&out)
    );
    assert_eq!(untouched(&flow).await, before);
    // gross: the fees, once, and no second reversal.
    let out = refund(&flow, &a0.id, &["--reverse-transfer", "--amount", "gross"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(charge_refunded_cents(&flow, &p).await, net0 + fee0);
    let mut conn = flow.db.pool.acquire().await.unwrap();
    assert_eq!(reversals_for_payment(&mut conn, &p.payment.id).await.unwrap().len(), 1);
    drop(conn);
    // And again: the donor has the whole share back; nothing more is offered or sent.
    let before = untouched(&flow).await;
    let out = refund(&flow, &a0.id, &["--reverse-transfer", "--amount", "gross"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("already has all of this share back"),
        "{}",
        stderr(&out)
    );
    assert_eq!(untouched(&flow).await, before);
    assert_eq!(charge_refunded_cents(&flow, &p).await, net0 + fee0);
    assert_conserved_at_stripe(&flow, &pid(&p)).await;
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_refund_refuses_bad_usage_and_unsettled_shares_and_changes_nothing() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000], &[]).await;
    // An unpaid payment: its shares are PENDING.
    let (id, _) = flow.pay_in_browser(PaymentMethodType::Card, Some("cm3donor1")).await;
    let p = flow.payment(&id).await;
    let pending = &p.allocations[0].id;
    let before = untouched(&flow).await;
    let out = refund(&flow, pending, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("PENDING") && stderr(&out).contains("Wait"),
        "{}",
        stderr(&out)
    );
    // Bad usage: exit 2, naming what is wrong.
    let out = flow.ops(&["refund", "spay_nope", "--reason", "x", "--yes"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("salc_"), "{}", stderr(&out));
    let out = flow.ops(&["refund", pending, "--yes"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--reason"), "{}", stderr(&out));
    let out = flow.ops(&["refund", pending, "--reason", "x", "--amount", "all", "--yes"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(untouched(&flow).await, before);
    // The rule is stated in --help.
    let help = flow.ops(&["refund", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--amount gross refunds the donor's whole share"),
        "{help}"
    );
    assert!(help.contains("platform loss"), "{help}");
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_refund_response_is_recognised_from_its_webhook_and_refunds_once() {
    let (flow, _, p) = three_shares_paid(&[1]).await;
    let a1 = allocation(&flow, &p, 1).await;
    let net1 = a1.net_amount_cents.unwrap();
    // Stripe makes the refund but every answer is lost: the outcome is unknown.
    fault_posts(&flow, FaultKind::LoseResponse, 20, "/v1/refunds").await;
    let out = refund(&flow, &a1.id, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("same key"), "{}", stderr(&out));
    assert_eq!(charge_refunded_cents(&flow, &p).await, net1, "Stripe made it once");
    let mut conn = flow.db.pool.acquire().await.unwrap();
    let refunds = refunds_for_payment(&mut conn, &p.payment.id).await.unwrap();
    assert_eq!(refunds.len(), 1);
    assert_eq!(
        refunds[0].status, "REQUESTED",
        "the intent was committed before the call"
    );
    drop(conn);

    // The refund's own `charge.refunded` names our intent in its metadata: the worker records Stripe's refund on
    // that row (once), and the share ends REFUNDED. A re-run then finds nothing left and sends nothing.
    flow.control.clear_faults().await.unwrap();
    flow.wait_until(&pid(&p), "the webhook recorded the refund", |q| {
        q.allocations[1].status == AllocationStatus::Refunded
    })
    .await;
    let posts = stripe_requests(&flow, "POST", "/v1/refunds").await;
    let out = refund(&flow, &a1.id, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stripe_requests(&flow, "POST", "/v1/refunds").await, posts);
    assert_eq!(charge_refunded_cents(&flow, &p).await, net1, "never a second refund");
    let mut conn = flow.db.pool.acquire().await.unwrap();
    let refunds = refunds_for_payment(&mut conn, &p.payment.id).await.unwrap();
    assert_eq!(refunds.len(), 1);
    assert_eq!(
        (refunds[0].status.as_str(), refunds[0].source.as_str()),
        ("SUCCEEDED", "ops")
    );
    let audit = splitpay::store::records::audit_for(&mut conn, &a1.id).await.unwrap();
    assert_eq!(audit.len(), 1, "one change, one audit row");
    drop(conn);
    let (_, refunded, _, events) = donation_of(&flow, &a1, "donation.refunded").await;
    assert_eq!((refunded, events.len()), (net1, 1));
    assert_conserved_at_stripe(&flow, &pid(&p)).await;
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_stripe_does_not_make_is_kept_shown_and_retried_with_its_key() {
    let (flow, _, p) = three_shares_paid(&[]).await;
    let a0 = allocation(&flow, &p, 0).await;
    let net0 = a0.net_amount_cents.unwrap();
    // Every reversal request breaks before Stripe applies it.
    fault_posts(&flow, FaultKind::DropConnection, 10_000, "/reversals").await;
    let out = refund(&flow, &a0.id, &["--reverse-transfer"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("retried automatically"), "{}", stderr(&out));
    assert_eq!(
        charge_refunded_cents(&flow, &p).await,
        0,
        "no refund before the reversal"
    );
    let mut conn = flow.db.pool.acquire().await.unwrap();
    let reversals = reversals_for_payment(&mut conn, &p.payment.id).await.unwrap();
    assert_eq!(reversals.len(), 1);
    assert_eq!(reversals[0].status, "PENDING");
    assert!(
        reversals[0].attempts >= 1 && reversals[0].failure_message.is_some(),
        "{:?}",
        reversals[0]
    );
    let refunds = refunds_for_payment(&mut conn, &p.payment.id).await.unwrap();
    assert_eq!(refunds.len(), 1);
    assert_eq!(refunds[0].status, "REQUESTED");
    drop(conn);

    // Shown to operators, never dropped.
    let show = flow.ops(&["show", &a0.id, "--json"]);
    let show: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(show["reversals"][0]["status"], "PENDING", "{show}");
    assert_eq!(show["refunds"][0]["status"], "REQUESTED", "{show}");
    let parked = flow.ops(&["parked", "--json"]);
    let parked: Value = serde_json::from_slice(&parked.stdout).unwrap();
    assert_eq!(parked["reversals_pending"].as_array().unwrap().len(), 1, "{parked}");
    let table = String::from_utf8_lossy(&flow.ops(&["parked"]).stdout).into_owned();
    assert!(table.contains("reversals not made yet: 1"), "{table}");

    // Stripe answers again; the sweep takes the overdue reversal (made due here instead of waiting its backoff)
    // and sends it with the same key.
    flow.control.clear_faults().await.unwrap();
    sqlx::query("UPDATE transfer_reversals SET next_attempt_at = now()")
        .execute(&flow.db.pool)
        .await
        .unwrap();
    splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
    let mut conn = flow.db.pool.acquire().await.unwrap();
    let reversals = reversals_for_payment(&mut conn, &p.payment.id).await.unwrap();
    assert_eq!(reversals[0].status, "SUCCEEDED", "{:?}", reversals[0]);
    drop(conn);
    let transfers = flow.gateway.list_transfers(&p.payment.transfer_group).await.unwrap();
    let reversed: i64 = transfers.iter().map(|t| t.amount_reversed_cents).sum();
    assert_eq!(reversed, net0, "reversed exactly once");

    // The operator runs the command again: the refund follows, with the intent's key.
    let out = refund(&flow, &a0.id, &["--reverse-transfer"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(charge_refunded_cents(&flow, &p).await, net0);
    assert_eq!(stripe_requests(&flow, "POST", "/v1/refunds").await, 1);
    let (status, refunded, _, events) = donation_of(&flow, &a0, "donation.refunded").await;
    assert_eq!((status, refunded, events.len()), (DonationStatus::Refunded, net0, 1));
    assert_conserved_at_stripe(&flow, &pid(&p)).await;
    flow.stop().await;
}

/// A partial refund made at Stripe without our metadata (as in the dashboard), after every share was transferred:
/// spread over the shares by gross, and each part reversed proportionally (`proportional`) or borne by the platform
/// (`none`). Its `charge.refunded` is then delivered again: recorded once.
async fn dashboard_refund_after_distribution(policy: splitpay::app::ReversePolicy) {
    let (flow, _, p) = three_shares_paid_with(&[], true, |s| s.reverse_on_refund = policy).await;
    flow.gateway
        .create_refund(&dashboard_refund(&p, 3_000, "dashboard-refund-1"))
        .await
        .unwrap();
    let proportional = policy == splitpay::app::ReversePolicy::Proportional;
    let settled = |flow: &Flow| {
        let pool = flow.db.pool.clone();
        async move {
            let (attributed, open): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM refunds WHERE attributed_at IS NOT NULL),
                        (SELECT count(*) FROM transfer_reversals WHERE status = 'PENDING')",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            attributed == 1 && open == 0
        }
    };
    for _ in 0..900 {
        if settled(&flow).await {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(settled(&flow).await, "the refund was attributed and its reversals made");
    let mut conn = flow.db.pool.acquire().await.unwrap();
    let parts = parts_for_payment(&mut conn, &p.payment.id).await.unwrap();
    let gross: Vec<i64> = p.allocations.iter().map(|a| a.gross_amount_cents).collect();
    let by_allocation: Vec<i64> = p
        .allocations
        .iter()
        .map(|a| {
            parts
                .iter()
                .find(|x| x.split_allocation_id == a.id)
                .unwrap()
                .amount_cents
        })
        .collect();
    assert_eq!(by_allocation, [500, 1_000, 1_500], "in proportion to {gross:?}");
    for (a, part) in p.allocations.iter().zip(&by_allocation) {
        let x = parts.iter().find(|x| x.split_allocation_id == a.id).unwrap();
        let (net, g) = (a.net_amount_cents.unwrap(), a.gross_amount_cents);
        let want = if proportional {
            (part * net * 2 + g) / (2 * g)
        } else {
            0
        };
        assert_eq!(
            (x.reversal_cents, x.platform_loss_cents),
            (want, part - want),
            "{}",
            a.id
        );
    }
    let reversals = reversals_for_payment(&mut conn, &p.payment.id).await.unwrap();
    assert_eq!(reversals.len(), if proportional { 3 } else { 0 });
    drop(conn);
    for (i, part) in by_allocation.iter().enumerate() {
        let (status, refunded, deleted, events) = donation_of(&flow, &p.allocations[i], "donation.refunded").await;
        assert_eq!(
            (status, refunded, deleted, events.len()),
            (DonationStatus::Confirmed, *part, false, 1)
        );
    }
    assert_conserved_at_stripe(&flow, &pid(&p)).await;

    // The same webhook again (Stripe redelivers): processed, and nothing recorded twice.
    redeliver_twice_at_once(&flow, "charge.refunded").await;
    assert_eq!(common::count(&flow.db.pool, "refunds").await, 1);
    assert_eq!(common::count(&flow.db.pool, "refund_parts").await, 3);
    assert_eq!(flow.count_events("donation.refunded").await, 3);
    assert_conserved_at_stripe(&flow, &pid(&p)).await;
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_refund_after_distribution_is_reversed_proportionally() {
    dashboard_refund_after_distribution(splitpay::app::ReversePolicy::Proportional).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_refund_after_distribution_under_policy_none_is_platform_loss() {
    dashboard_refund_after_distribution(splitpay::app::ReversePolicy::None).await;
}
