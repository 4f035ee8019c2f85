//! Key attempts for refunds and reversals (issue 8, review finding 1): Stripe saves a coded 4xx refusal such as
//! `balance_insufficient` under the idempotency key and replays it, so a reversal or refund refused for a low
//! balance must be retried under its next key attempt (`{key}:k{n}`) once the balance is back, and never twice made.
//! Real PostgreSQL, the simulator over HTTP, `splitpay ops` as the binary.

mod common;

use common::flow::Flow;
use common::money::assert_conserved_at_stripe;
use common::refunds::{
    available, charge_refunded_cents, dashboard_refund, logged_requests, ops_refund, three_shares_paid,
    three_shares_paid_with,
};
use serde_json::Value;
use splitpay::domain::ids::SplitAllocationId;
use splitpay::domain::state::{AllocationStatus, DonationStatus};
use splitpay::store::donations::donation_for_allocation;
use splitpay::store::payments::SplitPayment;
use splitpay::store::refunds::refunds_for_payment;
use splitpay::store::reversals::{reversals_for_payment, ReversalRow};
use splitpay::stripe::{CreateTransferParams, PaymentGateway, REVERSAL_REF_KEY};

/// The idempotency keys of the simulator's logged requests of `method` whose path contains `path`, in order.
async fn keys_sent(flow: &Flow, method: &str, path: &str) -> Vec<String> {
    logged_requests(flow)
        .await
        .iter()
        .filter(|r| r["method"] == method && r["path"].as_str().unwrap_or("").contains(path))
        .map(|r| r["idempotency_key"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// The transfer as Stripe holds it (raw JSON, with its `reversals` list).
async fn transfer_at_stripe(flow: &Flow, id: &str) -> Value {
    common::stripe::raw_get(&flow.sim, &format!("transfers/{id}")).await
}

async fn reversal_of(flow: &Flow, p: &SplitPayment, allocation: &str) -> ReversalRow {
    let mut conn = flow.db.pool.acquire().await.unwrap();
    let rows = reversals_for_payment(&mut conn, &p.payment.id).await.unwrap();
    let mine: Vec<_> = rows
        .into_iter()
        .filter(|r| r.split_allocation_id == allocation)
        .collect();
    assert_eq!(mine.len(), 1, "one reversal intent for {allocation}: {mine:?}");
    mine.into_iter().next().unwrap()
}

async fn wait_for(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    for _ in 0..900 {
        if ok().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_refused_for_a_low_connected_balance_succeeds_on_its_next_key_once_the_balance_is_back() {
    let (flow, id, p) = three_shares_paid(&[]).await;
    // The charge's funds become available at the recipients, and the first recipient pays everything out.
    flow.control.advance_clock(2 * 86_400 + 60).await.unwrap();
    let a0 = p.allocations[0].clone();
    let held = available(&flow, "acct_rcp0").await;
    assert_eq!(held, a0.net_amount_cents.unwrap(), "the recipient holds its transfer");
    flow.control.payout("acct_rcp0", "aud", held).await.unwrap();
    assert_eq!(available(&flow, "acct_rcp0").await, 0);

    // A dashboard refund of 600: 100/200/300 by gross, each reversed proportionally.
    flow.gateway
        .create_refund(&dashboard_refund(&p, 600, "dashboard-refund-keys"))
        .await
        .unwrap();
    let pool = flow.db.pool.clone();
    let a0_id = a0.id.clone();
    wait_for("the first recipient's reversal refused on a second key", async || {
        let row: Option<(String, Option<String>, i32)> = sqlx::query_as(
            "SELECT status, failure_code, key_attempt FROM transfer_reversals WHERE split_allocation_id = $1",
        )
        .bind(&a0_id)
        .fetch_optional(&pool)
        .await
        .unwrap();
        let others: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM transfer_reversals WHERE split_allocation_id <> $1 AND status = 'SUCCEEDED'",
        )
        .bind(&a0_id)
        .fetch_one(&pool)
        .await
        .unwrap();
        others == 2
            && row
                .is_some_and(|(s, code, k)| s == "PENDING" && code.as_deref() == Some("balance_insufficient") && k >= 2)
    })
    .await;
    let refused = reversal_of(&flow, &p, &a0.id).await;
    let transfer0 = a0.stripe_transfer_id.clone().unwrap();
    let path = format!("/v1/transfers/{transfer0}/reversals");
    let keys = keys_sent(&flow, "POST", &path).await;
    assert_eq!(
        keys.first(),
        Some(&refused.idempotency_key),
        "the first attempt sends the stored key"
    );
    assert_eq!(transfer_at_stripe(&flow, &transfer0).await["amount_reversed"], 0);

    // The recipient is paid again (another payment's transfer): the balance covers the reversal now.
    flow.gateway
        .create_transfer(&CreateTransferParams {
            destination: "acct_rcp0".into(),
            amount_cents: 5_000,
            currency: "aud".into(),
            source_transaction: None,
            transfer_group: "spay_another_payment".into(),
            metadata: Default::default(),
            idempotency_key: "another-payment-transfer".into(),
        })
        .await
        .unwrap();
    // The stored key itself is still answered with the refusal Stripe saved for it: retrying under it could never
    // succeed.
    // (The same parameters as splitpay's request: our row id in the reversal's metadata.)
    let metadata = [
        (REVERSAL_REF_KEY.to_owned(), refused.id.to_string()),
        ("split_allocation_id".to_owned(), a0.id.clone()),
    ]
    .into();
    let replayed = flow
        .gateway
        .create_reversal(
            &transfer0,
            Some(refused.amount_cents),
            &metadata,
            &refused.idempotency_key,
        )
        .await
        .unwrap_err();
    assert_eq!(replayed.code(), Some("balance_insufficient"));
    sqlx::query("UPDATE transfer_reversals SET next_attempt_at = now() WHERE id = $1")
        .bind(refused.id)
        .execute(&flow.db.pool)
        .await
        .unwrap();
    splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
    let made = reversal_of(&flow, &p, &a0.id).await;
    assert_eq!(made.status, "SUCCEEDED", "{made:?}");
    assert!(made.key_attempt >= refused.key_attempt, "{made:?}");
    assert_eq!(made.amount_cents, refused.amount_cents);
    // Each key was sent once (a saved refusal is not re-sent in-process): the stored key, then one per attempt,
    // the last one made the reversal.
    let base = &refused.idempotency_key;
    let want: Vec<String> = std::iter::once(base.clone())
        .chain((2..=made.key_attempt).map(|n| format!("{base}:k{n}")))
        .collect();
    let mut keys = keys_sent(&flow, "POST", &path).await;
    keys.retain(|k| k == base || k.starts_with(&format!("{base}:k")));
    keys.dedup();
    assert_eq!(keys.first(), Some(base));
    assert_eq!(
        keys.last(),
        want.last(),
        "the reversal was made on the row's current key"
    );
    assert!(made.key_attempt >= 2, "{made:?}");

    // Exactly one reversal at Stripe, of the recorded amount and id.
    let at_stripe = transfer_at_stripe(&flow, &transfer0).await;
    let reversals = at_stripe["reversals"]["data"].as_array().unwrap();
    assert_eq!(reversals.len(), 1, "{at_stripe}");
    assert_eq!(reversals[0]["amount"], made.amount_cents);
    assert_eq!(reversals[0]["id"].as_str(), made.stripe_reversal_id.as_deref());
    assert_eq!(available(&flow, "acct_rcp0").await, 5_000 - made.amount_cents);
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_refused_for_the_platform_balance_is_made_on_its_next_key_once_topped_up() {
    // No top-up: the charge's own funds are still pending, so the platform has nothing available to refund from.
    let (flow, id, p) = three_shares_paid_with(&[1], false, |_| {}).await;
    let a1 = p.allocations[1].clone();
    assert_eq!(a1.status, AllocationStatus::Parked);
    let net1 = a1.net_amount_cents.unwrap();
    let flags = ["--yes", "--actor", "alice"];

    let out = ops_refund(&flow, &a1.id, &flags);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("did not make the refund now"), "{stderr}");
    let mut conn = flow.db.pool.acquire().await.unwrap();
    let intent = refunds_for_payment(&mut conn, &p.payment.id).await.unwrap();
    assert_eq!(intent.len(), 1);
    let base = intent[0].idempotency_key.clone().unwrap();
    assert_eq!(
        (intent[0].status.as_str(), intent[0].key_attempt, intent[0].amount_cents),
        ("REQUESTED", 2, net1)
    );
    drop(conn);

    // Refused again while the balance is still short: one more key, still nothing refunded.
    let out = ops_refund(&flow, &a1.id, &flags);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    flow.control.top_up("aud", 100_000).await.unwrap();
    let out = ops_refund(&flow, &a1.id, &flags);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    let keys = keys_sent(&flow, "POST", "/v1/refunds").await;
    assert_eq!(keys, [base.clone(), format!("{base}:k2"), format!("{base}:k3")]);
    assert_eq!(
        charge_refunded_cents(&flow, &p).await,
        net1,
        "refunded once, the share's net"
    );
    let mut conn = flow.db.pool.acquire().await.unwrap();
    let refunds = refunds_for_payment(&mut conn, &p.payment.id).await.unwrap();
    assert_eq!(refunds.len(), 1);
    assert_eq!((refunds[0].status.as_str(), refunds[0].key_attempt), ("SUCCEEDED", 3));
    let aid = SplitAllocationId::parse(&a1.id).unwrap();
    let donation = donation_for_allocation(&mut conn, &aid).await.unwrap().unwrap();
    assert_eq!(
        (donation.status, donation.refunded_amount_cents),
        (DonationStatus::Refunded, net1)
    );
    drop(conn);
    assert_eq!(
        flow.payment(&id).await.allocations[1].status,
        AllocationStatus::Refunded
    );
    assert_eq!(flow.count_events("donation.refunded").await, 1);
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}
