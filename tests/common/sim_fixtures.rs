//! Helpers of the gateway tests (`gateway*.rs`): request parameters, a paid charge, a simulator ready to transfer,
//! faults, and raw HTTP for what the gateway does not expose.

use splitpay::domain::plan::PaymentMethodType;
use splitpay::stripe::error::ErrorClass;
use splitpay::stripe::sim::{Fault, FaultKind};
use splitpay::stripe::*;
use std::collections::BTreeMap;

use super::stripe::{gateway, simulator, TEST_KEY};

pub fn intent(amount_cents: i64, method: PaymentMethodType, pm: Option<&str>, key: &str) -> CreatePaymentIntentParams {
    CreatePaymentIntentParams {
        amount_cents,
        currency: "aud".into(),
        payment_method_type: method,
        transfer_group: "spay_group1".into(),
        metadata: BTreeMap::from([("split_payment_id".to_owned(), "spay_group1".to_owned())]),
        payment_method: pm.map(str::to_owned),
        idempotency_key: key.into(),
    }
}

pub fn transfer(destination: &str, amount_cents: i64, source: Option<&str>, key: &str) -> CreateTransferParams {
    CreateTransferParams {
        destination: destination.into(),
        amount_cents,
        currency: "aud".into(),
        source_transaction: source.map(str::to_owned),
        transfer_group: "spay_group1".into(),
        metadata: BTreeMap::from([("split_allocation_id".to_owned(), key.to_owned())]),
        idempotency_key: key.into(),
    }
}

/// A succeeded card payment of `amount_cents`; returns its charge id.
pub async fn paid_charge(gw: &StripeGateway, amount_cents: i64, key: &str) -> String {
    let pi = gw
        .create_payment_intent(&intent(
            amount_cents,
            PaymentMethodType::Card,
            Some("pm_card_visa"),
            key,
        ))
        .await
        .unwrap();
    assert_eq!(pi.status, IntentStatus::Succeeded);
    pi.latest_charge.unwrap()
}

/// A simulator with an account `acct_ok` that can receive transfers and a succeeded A$100 card charge.
pub async fn ready_to_transfer() -> (
    splitpay::stripe::sim::SimServer,
    splitpay::stripe::sim::control::SimControl,
    StripeGateway,
    String,
) {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    control.create_account("acct_ok", true).await.unwrap();
    let charge = paid_charge(&gw, 10_000, "k-pay").await;
    (sim, control, gw, charge)
}

/// The next `count` transfer creations hit `kind`.
pub fn transfer_fault(kind: FaultKind, count: u32) -> Fault {
    Fault {
        kind,
        count,
        path_contains: Some("/v1/transfers".into()),
        method: Some("POST".into()),
    }
}

pub fn terminal_code(err: &GatewayError) -> &str {
    assert_eq!(err.class(), ErrorClass::Terminal, "{err}");
    err.code().unwrap_or("")
}

/// Raw HTTP against the simulator, for what the gateway does not expose (headers, endpoints splitpay never calls).
pub async fn raw_post(
    sim: &splitpay::stripe::sim::SimServer,
    path: &str,
    body: &str,
    key: Option<&str>,
) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .post(format!("{}v1/{path}", sim.base_url()))
        .bearer_auth(TEST_KEY)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_owned());
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    req.send().await.unwrap()
}

pub use super::stripe::raw_get;

/// Events of the simulator, newest first.
pub async fn event_count(sim: &splitpay::stripe::sim::SimServer) -> usize {
    raw_get(sim, "events?limit=100").await["data"].as_array().unwrap().len()
}

/// Waits (bounded) until the simulator's webhook counters satisfy `predicate`.
pub async fn wait_for_stats(
    control: &splitpay::stripe::sim::control::SimControl,
    what: &str,
    predicate: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    for _ in 0..200 {
        let stats = control.webhook_stats().await.unwrap();
        if predicate(&stats) {
            return stats;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!(
        "timed out waiting for {what}: {}",
        control.webhook_stats().await.unwrap()
    );
}
