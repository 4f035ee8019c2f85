//! Review findings on later transfer generations (issue 8 review of refunds and disputes): a won dispute's new
//! generation and an operator's retry of it draw on the platform's available balance, never on the charge, and are
//! retried on their next key after a saved `balance_insufficient`; their events are not swallowed by generation 1's
//! dedup keys. Real PostgreSQL, the simulator over HTTP, the worker in the test process, `splitpay ops` as the
//! binary.

mod common;

use common::flow::Flow;
use common::money::assert_conserved_at_stripe;
use common::refunds::{held_per_share, logged_requests, nets, open_dispute, settle_until_sql, three_shares_paid_with};
use splitpay::domain::ids::SplitPaymentId;
use splitpay::domain::state::AllocationStatus;

/// The idempotency keys of the transfer requests the simulator received, in order.
async fn transfer_keys(flow: &Flow) -> Vec<String> {
    logged_requests(flow)
        .await
        .iter()
        .filter(|r| r["method"] == "POST" && r["path"] == "/v1/transfers")
        .map(|r| r["idempotency_key"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// A card payment whose three shares were transferred, disputed (each transfer reversed while its funds were still
/// pending) and won, with no funds of the platform's own: each share's new generation is refused
/// `balance_insufficient` (the charge's funds are still pending).
async fn won_dispute_on_a_short_balance(window_ms: Option<u64>) -> (Flow, SplitPaymentId, Vec<i64>) {
    let (flow, id, p) = three_shares_paid_with(&[], false, |d| {
        if let Some(ms) = window_ms {
            d.transfer_retry_window_ms = ms;
        }
    })
    .await;
    let nets = nets(&p);
    let charge = open_dispute(&flow, &p).await;
    settle_until_sql(
        &flow,
        "the withdrawal reversed",
        300,
        "SELECT (count(*) FILTER (WHERE status = 'SUCCEEDED') = 3)::int::bigint FROM transfer_reversals",
    )
    .await;
    flow.control.close_dispute(&charge, true).await.unwrap();
    settle_until_sql(
        &flow,
        "each new generation refused for the platform's balance",
        300,
        "SELECT (count(*) FILTER (WHERE generation = 2 AND failure_code = 'balance_insufficient') = 3)::int::bigint
           FROM split_allocations",
    )
    .await;
    (flow, id, nets)
}

/// Finding 3: a won dispute's new generation refused `balance_insufficient` was retried under the same key, and
/// Stripe replays a saved refusal for as long as it keeps the key: the transfer could not be made for a day even
/// with the balance back. Now the generation takes its next key after the saved refusal, and succeeds once the
/// platform has funds: one transfer per share and generation, from the balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_generation_refused_for_the_balance_succeeds_on_its_next_key_once_funds_are_back() {
    let (flow, id, nets) = won_dispute_on_a_short_balance(None).await;
    let before = transfer_keys(&flow).await;
    assert!(
        before.iter().any(|k| k.ends_with(":transfer:2")),
        "the generation's own key was sent first: {before:?}"
    );
    flow.control.top_up("aud", 1_000_000).await.unwrap();
    settle_until_sql(
        &flow,
        "every share transferred again",
        300,
        "SELECT (count(*) FILTER (WHERE status = 'TRANSFERRED' AND generation = 2) = 3)::int::bigint
           FROM split_allocations",
    )
    .await;
    let p = flow.payment(&id).await;
    assert_eq!(held_per_share(&flow, &p).await, nets);
    let made: Vec<(i32, Option<String>, i32)> = sqlx::query_as(
        "SELECT generation, source_transaction, key_attempt FROM transfer_attempts WHERE generation = 2",
    )
    .fetch_all(&flow.db.pool)
    .await
    .unwrap();
    assert_eq!(made.len(), 3);
    for (_, source, key_attempt) in &made {
        assert_eq!(*source, None, "from the platform's balance");
        assert!(*key_attempt >= 2, "made on a later key attempt: {made:?}");
    }
    let keys = transfer_keys(&flow).await;
    assert!(keys.iter().any(|k| k.contains(":transfer:2:k")), "{keys:?}");
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// Finding 3, bounded: the balance stays short for the whole retry window: the share is parked with that reason
/// (`balance_insufficient`), announced, and `ops retry` then sends it from the balance (never from the charge,
/// whose room the first transfer used), on a new key, once the platform has funds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_generation_short_of_balance_for_its_window_is_parked_then_retried_from_the_balance() {
    let (flow, id, nets) = won_dispute_on_a_short_balance(Some(3_000)).await;
    settle_until_sql(
        &flow,
        "the shares parked for the balance",
        300,
        "SELECT (count(*) FILTER (WHERE status = 'PARKED' AND failure_code = 'balance_insufficient') = 3)::int::bigint
           FROM split_allocations",
    )
    .await;
    let p = flow.payment(&id).await;
    assert_eq!(held_per_share(&flow, &p).await, [0, 0, 0]);
    flow.control.top_up("aud", 1_000_000).await.unwrap();
    let a1 = p.allocations[1].clone();
    let out = flow.ops(&["retry", &a1.id, "--yes", "--wait", "--actor", "alice"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let p = flow.payment(&id).await;
    assert_eq!(p.allocations[1].status, AllocationStatus::Transferred, "{stdout}");
    assert_eq!(p.allocations[1].generation, 3);
    let source: Option<String> = sqlx::query_scalar(
        "SELECT source_transaction FROM transfer_attempts WHERE split_allocation_id = $1 AND generation = 3",
    )
    .bind(&a1.id)
    .fetch_one(&flow.db.pool)
    .await
    .unwrap();
    assert_eq!(source, None, "the charge's room was used by the first transfer");
    assert_eq!(held_per_share(&flow, &p).await, [0, nets[1], 0]);
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}
