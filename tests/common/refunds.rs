//! Helpers of the refund, reversal and dispute tests that run a [`Flow`]: a card payment through three shares, paid
//! and distributed; dashboard refunds; waits that run the refunds reconciler as the cron would; what Stripe holds
//! (each share's transfers less reversals, the charge's refunds, balances) and what the simulator was sent; each
//! share's donation with its events; `ops refund` and `ops parked` as an operator runs them; Stripe's faults, held
//! webhooks and redelivered events.

use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use splitpay::app::DistributionSettings;
use splitpay::domain::ids::{SplitAllocationId, SplitPaymentId};
use splitpay::domain::plan::{AmountMode, PaymentMethodType};
use splitpay::domain::state::{AllocationStatus, DonationStatus};
use splitpay::store::allocations::SplitAllocationRow;
use splitpay::store::donations::donation_for_allocation;
use splitpay::store::payments::SplitPayment;
use splitpay::stripe::sim::model::SimConfig;
use splitpay::stripe::sim::{Fault, FaultKind};
use splitpay::stripe::{CreateRefundParams, PaymentGateway, RefundTarget, TransferInfo};

use super::contract::validate_against_contract;
use super::flow::Flow;

/// The one number `sql` answers.
pub async fn scalar(flow: &Flow, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&flow.db.pool)
        .await
        .unwrap()
}

/// Pays the flow's set by card (`pm_card_visa`, donor `cm3donor1`) and waits until each share is TRANSFERRED, or
/// PARKED for the recipients in `parked` (those the flow opened without transfers).
pub async fn pay_by_card(flow: &Flow, parked: &[usize]) -> (SplitPaymentId, SplitPayment) {
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    let p = flow
        .wait_until(&id, "each share transferred or parked", |p| {
            p.allocations.iter().enumerate().all(|(i, a)| {
                let settled = if parked.contains(&i) {
                    AllocationStatus::Parked
                } else {
                    AllocationStatus::Transferred
                };
                a.status == settled
            })
        })
        .await;
    (id, p)
}

/// A FIXED set of three shares (1,000, 2,000 and 3,000 cents; the recipients in `parked` cannot receive transfers),
/// the platform with funds of its own available (refunds and transfers sent again draw on them: the charge's own
/// funds are still pending), and a card payment through it, paid as [`pay_by_card`].
pub async fn three_shares_paid(parked: &[usize]) -> (Flow, SplitPaymentId, SplitPayment) {
    three_shares_paid_with(parked, true, |_| {}).await
}

/// As [`three_shares_paid`], with the distribution settings adjusted by `tweak`, and the platform's own funds only
/// when `top_up`.
pub async fn three_shares_paid_with(
    parked: &[usize],
    top_up: bool,
    tweak: impl FnOnce(&mut DistributionSettings),
) -> (Flow, SplitPaymentId, SplitPayment) {
    let flow = Flow::start_full(AmountMode::Fixed, &[1_000, 2_000, 3_000], parked, true, tweak).await;
    if top_up {
        flow.control.top_up("aud", 1_000_000).await.unwrap();
    }
    let (id, p) = pay_by_card(&flow, parked).await;
    (flow, id, p)
}

/// Each share's net, in the set's order.
pub fn nets(p: &SplitPayment) -> Vec<i64> {
    p.allocations.iter().map(|a| a.net_amount_cents.unwrap()).collect()
}

/// The cardholder disputes the payment's charge, all of it; returns the charge's id.
pub async fn open_dispute(flow: &Flow, p: &SplitPayment) -> String {
    let charge = p.payment.charge_id.clone().unwrap();
    flow.control.open_dispute(&charge).await.unwrap();
    charge
}

/// A card payment through a FIXED set of `amounts`, every share transferred, the platform with funds of its own,
/// and Stripe's refunds starting `pending` (until settled).
pub async fn transferred_with_pending_refunds(amounts: &[i64]) -> (Flow, SplitPaymentId, SplitPayment) {
    transferred_under(
        amounts,
        &SimConfig {
            refunds_start_pending: true,
            ..SimConfig::default()
        },
    )
    .await
}

/// As [`transferred_with_pending_refunds`], the refunds also staying pending when the charge is disputed
/// (`pending_refunds_survive_disputes`).
pub async fn transferred_with_refunds_pending_through_disputes(
    amounts: &[i64],
) -> (Flow, SplitPaymentId, SplitPayment) {
    transferred_under(
        amounts,
        &SimConfig {
            refunds_start_pending: true,
            pending_refunds_survive_disputes: true,
            ..SimConfig::default()
        },
    )
    .await
}

/// A card payment through a FIXED set of `amounts`, every share transferred, the platform with funds of its own,
/// the simulator configured as `config`.
async fn transferred_under(amounts: &[i64], config: &SimConfig) -> (Flow, SplitPaymentId, SplitPayment) {
    let flow = Flow::start(AmountMode::Fixed, amounts, &[]).await;
    flow.control.top_up("aud", 1_000_000).await.unwrap();
    flow.control.set_config(config).await.unwrap();
    let (id, p) = pay_by_card(&flow, &[]).await;
    (flow, id, p)
}

/// A refund of `amount_cents` of the payment made at Stripe without our metadata, as in the dashboard, under `key`.
pub fn dashboard_refund(p: &SplitPayment, amount_cents: i64, key: &str) -> CreateRefundParams {
    CreateRefundParams {
        target: RefundTarget::PaymentIntent(p.payment.payment_intent_id.clone().unwrap()),
        amount_cents: Some(amount_cents),
        reason: None,
        metadata: Default::default(),
        idempotency_key: key.into(),
    }
}

/// Waits (bounded: `turns` turns of 100 ms) until `done`, running the refunds reconciler each turn as the cron would;
/// on time out, panics with the rows that tell why.
pub async fn settle_until(flow: &Flow, what: &str, turns: u32, done: impl AsyncFn(&Flow) -> bool) {
    for _ in 0..turns {
        if done(flow).await {
            return;
        }
        splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}: {}", open_rows(flow).await);
}

/// As [`settle_until`], until `sql` answers 1.
pub async fn settle_until_sql(flow: &Flow, what: &str, turns: u32, sql: &str) {
    settle_until(flow, what, turns, async |f| scalar(f, sql).await == 1).await
}

/// A share as a panic message shows it: id, status, generation, failure code, net.
type ShareRow = (String, String, i32, Option<String>, Option<i64>);

/// Each share, reversal, dispute and Stripe event, for a panic message (read as far as the database answers).
async fn open_rows(flow: &Flow) -> String {
    let pool = &flow.db.pool;
    let shares: Vec<ShareRow> = sqlx::query_as(
        "SELECT id, status, generation, failure_code, net_amount_cents FROM split_allocations ORDER BY position",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    let reversals: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT split_allocation_id, status, failure_code FROM transfer_reversals ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    let disputes: Vec<(String, String, Option<i64>)> =
        sqlx::query_as("SELECT stripe_dispute_id, status, refund_id FROM disputes")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    let events: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT event_type, process_error FROM stripe_events ORDER BY received_at")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    format!("shares {shares:?}; reversals {reversals:?}; disputes {disputes:?}; Stripe events {events:?}")
}

/// What the refund parts took back in all: (by reversals, as the platform's loss).
pub async fn parts_taken(flow: &Flow) -> (i64, i64) {
    let reversed = scalar(
        flow,
        "SELECT coalesce(sum(reversal_cents), 0)::bigint FROM refund_parts",
    )
    .await;
    let lost = scalar(
        flow,
        "SELECT coalesce(sum(platform_loss_cents), 0)::bigint FROM refund_parts",
    )
    .await;
    (reversed, lost)
}

/// What Stripe has refunded of the payment's charge.
pub async fn charge_refunded_cents(flow: &Flow, p: &SplitPayment) -> i64 {
    let charge = p.payment.charge_id.clone().unwrap();
    flow.gateway
        .retrieve_charge(&charge)
        .await
        .unwrap()
        .amount_refunded_cents
}

/// Stripe's transfers of the payment, share by share in the set's order.
pub async fn transfers_by_share(flow: &Flow, p: &SplitPayment) -> Vec<Vec<TransferInfo>> {
    let transfers = flow.gateway.list_transfers(&p.payment.transfer_group).await.unwrap();
    p.allocations
        .iter()
        .map(|a| {
            transfers
                .iter()
                .filter(|t| t.metadata.get("split_allocation_id") == Some(&a.id))
                .cloned()
                .collect()
        })
        .collect()
}

/// What each share's recipient holds at Stripe for it: its transfers less their reversals, in the set's order.
pub async fn held_per_share(flow: &Flow, p: &SplitPayment) -> Vec<i64> {
    transfers_by_share(flow, p)
        .await
        .iter()
        .map(|ts| ts.iter().map(|t| t.amount_cents - t.amount_reversed_cents).sum())
        .collect()
}

/// How many transfers Stripe holds for each share, in the set's order.
pub async fn transfers_per_share(flow: &Flow, p: &SplitPayment) -> Vec<usize> {
    transfers_by_share(flow, p).await.iter().map(Vec::len).collect()
}

/// The AUD amounts of one side (`available`, `pending`) of a connected balance at the simulator, summed.
fn aud_sum(balance: &Value, side: &str) -> i64 {
    balance[side]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["currency"] == "aud")
        .map(|x| x["amount"].as_i64().unwrap())
        .sum()
}

/// What `account` has available at Stripe, in AUD.
pub async fn available(flow: &Flow, account: &str) -> i64 {
    aud_sum(&flow.control.connected_balance(account).await.unwrap(), "available")
}

/// Each recipient's whole balance at the simulator (available and pending, AUD), in the set's order.
pub async fn recipient_balances(flow: &Flow, p: &SplitPayment) -> Vec<i64> {
    let mut balances = Vec::new();
    for i in 0..p.allocations.len() {
        let b = flow.control.connected_balance(&format!("acct_rcp{i}")).await.unwrap();
        balances.push(aud_sum(&b, "available") + aud_sum(&b, "pending"));
    }
    balances
}

/// Every request the simulator logged (`method`, `path`, `idempotency_key`, …), oldest first.
pub async fn logged_requests(flow: &Flow) -> Vec<Value> {
    let log = flow.control.get("requests").await.unwrap();
    log["requests"].as_array().unwrap().clone()
}

/// How many requests of `method` whose path contains `path` the simulator received.
pub async fn stripe_requests(flow: &Flow, method: &str, path: &str) -> usize {
    logged_requests(flow)
        .await
        .iter()
        .filter(|r| r["method"] == method && r["path"].as_str().unwrap_or("").contains(path))
        .count()
}

/// Reversal requests the simulator received for `transfer` (its path exactly).
pub async fn reversal_posts(flow: &Flow, transfer: &str) -> usize {
    let path = format!("/v1/transfers/{transfer}/reversals");
    logged_requests(flow)
        .await
        .iter()
        .filter(|r| r["method"] == "POST" && r["path"].as_str() == Some(path.as_str()))
        .count()
}

/// The simulator answers the next `count` POSTs whose path contains `path` with `kind`.
pub async fn fault_posts(flow: &Flow, kind: FaultKind, count: u32, path: &str) {
    flow.control
        .fault(Fault {
            kind,
            count,
            path_contains: Some(path.to_owned()),
            method: Some("POST".into()),
        })
        .await
        .unwrap();
}

/// Stripe makes every reversal of `transfer` asked for from now on, and loses every answer.
pub async fn lose_reversal_answers(flow: &Flow, transfer: &str) {
    let path = format!("/v1/transfers/{transfer}/reversals");
    fault_posts(flow, FaultKind::LoseResponse, 10_000, &path).await;
}

/// Moves the reversals `filter` (an SQL condition) selects 11 minutes further from their latest send, past the
/// in-flight margin (no request of theirs can still be applied at Stripe), and makes them due now.
pub async fn past_in_flight_margin(flow: &Flow, filter: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE transfer_reversals SET in_doubt_since = in_doubt_since - interval '11 minutes',
                next_attempt_at = now() WHERE {filter}"
    )))
    .execute(&flow.db.pool)
    .await
    .unwrap();
}

/// Stripe's webhooks are held back (not delivered, not duplicated) until [`release_webhooks`].
pub async fn hold_webhooks(flow: &Flow) {
    flow.control
        .webhook_mode(serde_json::json!({ "duplicate": false, "hold": true }))
        .await
        .unwrap();
}

/// Stripe's held webhooks are delivered, and the ones after them as they come.
pub async fn release_webhooks(flow: &Flow) {
    flow.control
        .webhook_mode(serde_json::json!({ "hold": false }))
        .await
        .unwrap();
    flow.control.flush_webhooks().await.unwrap();
}

/// The donation of share `a`: status, refunded amount, deleted, and its events of `event_type` (each validated
/// against the contract).
pub async fn donation_of(
    flow: &Flow,
    a: &SplitAllocationRow,
    event_type: &str,
) -> (DonationStatus, i64, bool, Vec<Value>) {
    let aid = SplitAllocationId::parse(&a.id).unwrap();
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
        validate_against_contract(e).unwrap_or_else(|err| panic!("{err}: {e}"));
    }
    (d.status, d.refunded_amount_cents, d.deleted_at.is_some(), events)
}

/// Each share's donation CONFIRMED again after a won dispute: nothing refunded, not deleted, with one
/// `donation.refund_reversed` each. Returns that event of each share, in the set's order.
pub async fn donations_confirmed_again(flow: &Flow, p: &SplitPayment) -> Vec<Value> {
    let mut reversed = Vec::new();
    for (i, a) in p.allocations.iter().enumerate() {
        let (status, refunded, deleted, events) = donation_of(flow, a, "donation.refund_reversed").await;
        assert_eq!(
            (status, refunded, deleted, events.len()),
            (DonationStatus::Confirmed, 0, false, 1),
            "share {i}"
        );
        reversed.extend(events);
    }
    reversed
}

/// Stripe delivers the stored `event_type` again, twice at once: each is processed (and must change nothing).
pub async fn redeliver_twice_at_once(flow: &Flow, event_type: &str) {
    let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM stripe_events WHERE event_type = $1")
        .bind(event_type)
        .fetch_all(&flow.db.pool)
        .await
        .unwrap();
    assert!(!ids.is_empty(), "{event_type} was received");
    for id in ids {
        sqlx::query("UPDATE stripe_events SET processed_at = NULL WHERE id = $1")
            .bind(&id)
            .execute(&flow.db.pool)
            .await
            .unwrap();
        let (a, b) = tokio::join!(
            splitpay::jobs::stripe_event::process(&flow.ctx, &id),
            splitpay::jobs::stripe_event::process(&flow.ctx, &id)
        );
        a.unwrap();
        b.unwrap();
    }
}

/// `splitpay ops refund ALLOCATION --reason "donor asked"` and then `flags` (`--reverse-transfer`, `--yes`, …).
pub fn ops_refund(flow: &Flow, allocation: &str, flags: &[&str]) -> Output {
    let mut args = vec!["refund", allocation, "--reason", "donor asked"];
    args.extend_from_slice(flags);
    flow.ops(&args)
}

/// What `splitpay ops parked --json` lists.
pub fn parked_json(flow: &Flow) -> Value {
    serde_json::from_slice(&flow.ops(&["parked", "--json"]).stdout).unwrap()
}
