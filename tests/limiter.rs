//! Issue 11, point 4: one Stripe budget across replicas. The simulator's per-key rate limit (Stripe's 429), the
//! limiter shared through PostgreSQL (its bound across separate processes, a 429 slowing every replica, failing safe
//! without PostgreSQL), over real HTTP and the real database.

mod common;

use common::stripe::{gateway_with, simulator, TEST_KEY};
use splitpay::stripe::error::ErrorClass;
use splitpay::stripe::PaymentGateway;

/// The simulator's per-key limit: off by default; when set, requests above the bucket get Stripe's 429
/// (`rate_limit`, `Stripe-Rate-Limited-Reason`), are not applied, and other keys keep their own budget.
#[tokio::test]
async fn the_simulator_enforces_a_per_key_rate_limit_like_stripe() {
    let (server, control) = simulator().await;
    let http = reqwest::Client::new();
    let get_balance = |key: &'static str| {
        http.get(format!("{}v1/balance", server.base_url()))
            .bearer_auth(key)
            .send()
    };
    // Off by default: 50 requests at once all pass.
    let statuses = futures_util::future::join_all((0..50).map(|_| get_balance(TEST_KEY))).await;
    assert!(statuses.iter().all(|r| r.as_ref().unwrap().status() == 200));
    assert_eq!(control.rate_limited_count().await.unwrap(), 0);

    // 2 requests/s with a burst of 3: of 10 sent at once, 3 pass (the test runs in well under the 500 ms a token
    // takes to come back, on any machine that runs it at all: 10 local requests).
    control.set_rate_limit(Some(2), 3).await.unwrap();
    let responses = futures_util::future::join_all((0..10).map(|_| get_balance(TEST_KEY))).await;
    let mut passed = 0;
    let mut limited = Vec::new();
    for response in responses {
        let response = response.unwrap();
        match response.status().as_u16() {
            200 => passed += 1,
            429 => limited.push(response),
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(
        passed <= 4,
        "{passed} passed: at most the burst, plus one token if 500 ms went by"
    );
    assert!(limited.len() >= 6);
    let response = limited.pop().unwrap();
    assert_eq!(
        response.headers()["stripe-rate-limited-reason"].to_str().unwrap(),
        "global-rate"
    );
    assert!(response.headers().get("stripe-should-retry").is_none());
    assert!(response.headers().get("request-id").is_some());
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "rate_limit");
    assert!(body["error"]["message"].as_str().unwrap().contains("rate limit"));
    assert_eq!(control.rate_limited_count().await.unwrap(), limited.len() as u64 + 1);

    // Another key has its own bucket.
    let other = get_balance("sk_test_another_account").await.unwrap();
    assert_eq!(other.status(), 200);

    // A refused create is not applied: through the production client (one attempt), the error is classified
    // retryable with code rate_limit, and no transfer exists at the simulator.
    let gateway = gateway_with(&server, |c| c.attempts_max = 1);
    control.set_rate_limit(Some(1), 1).await.unwrap();
    let _ = gateway.list_transfers("spay_warmup").await; // takes the one token (or finds none)
    let err = gateway
        .create_transfer(&splitpay::stripe::CreateTransferParams {
            amount_cents: 1_000,
            currency: "aud".into(),
            destination: "acct_nobody".into(),
            source_transaction: None,
            transfer_group: "spay_limited".into(),
            metadata: Default::default(),
            idempotency_key: "splitpay:test:limited".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Retryable, "{err}");
    assert_eq!(err.code(), Some("rate_limit"));

    // Off again: everything passes, and the refused create left nothing behind.
    control.set_rate_limit(None, 0).await.unwrap();
    assert!(gateway.list_transfers("spay_limited").await.unwrap().is_empty());
}
