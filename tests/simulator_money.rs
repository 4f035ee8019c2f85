//! The simulator moves money like Stripe, not kinder: disputes withdraw the amount and fee and give them back only
//! when won; refunds need available platform balance, refuse disputed charges and destination-only options, and
//! can settle later; transfers credit connected balances that payouts and reversals draw on; Connect events go
//! only to Connect endpoints. Balances are checked before and after every movement.

mod common;

use std::collections::BTreeMap;

use common::stripe::{gateway, simulator, Receiver, TEST_KEY};
use serde_json::{json, Value};
use splitpay::domain::plan::PaymentMethodType;
use splitpay::stripe::sim::control::SimControl;
use splitpay::stripe::sim::model::SimConfig;
use splitpay::stripe::sim::SimServer;
use splitpay::stripe::*;

const ACCOUNT: &str = "acct_money";

fn intent(amount_cents: i64, method: PaymentMethodType, pm: &str, key: &str) -> CreatePaymentIntentParams {
    CreatePaymentIntentParams {
        amount_cents,
        currency: "aud".into(),
        payment_method_type: method,
        transfer_group: "spay_money".into(),
        metadata: BTreeMap::from([("split_payment_id".to_owned(), "spay_money".to_owned())]),
        payment_method: Some(pm.to_owned()),
        idempotency_key: key.into(),
    }
}

fn transfer(amount_cents: i64, source: Option<&str>, key: &str) -> CreateTransferParams {
    CreateTransferParams {
        destination: ACCOUNT.into(),
        amount_cents,
        currency: "aud".into(),
        source_transaction: source.map(str::to_owned),
        transfer_group: "spay_money".into(),
        metadata: BTreeMap::from([("split_allocation_id".to_owned(), key.to_owned())]),
        idempotency_key: key.into(),
    }
}

/// A succeeded card payment; returns (PaymentIntent id, charge id).
async fn card_payment(gw: &StripeGateway, amount_cents: i64, pm: &str, key: &str) -> (String, String) {
    let pi = gw
        .create_payment_intent(&intent(amount_cents, PaymentMethodType::Card, pm, key))
        .await
        .unwrap();
    assert_eq!(pi.status, IntentStatus::Succeeded);
    (pi.id, pi.latest_charge.unwrap())
}

/// A Stripe API request as any client sends it; returns the status and the body.
async fn api(sim: &SimServer, method: reqwest::Method, path: &str, form: &str, account: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .request(method.clone(), format!("{}v1/{path}", sim.base_url()))
        .bearer_auth(TEST_KEY);
    if method == reqwest::Method::POST {
        request = request
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_owned());
    }
    if let Some(account) = account {
        request = request.header("stripe-account", account);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn get(sim: &SimServer, path: &str) -> Value {
    let (status, body) = api(sim, reqwest::Method::GET, path, "", None).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

async fn post(sim: &SimServer, path: &str, form: &str) -> (u16, Value) {
    api(sim, reqwest::Method::POST, path, form, None).await
}

/// `(available, pending)` in AUD of a balance object.
fn aud(balance: &Value) -> (i64, i64) {
    let amount = |side: &str| {
        balance[side]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["currency"] == "aud")
            .map_or(0, |b| b["amount"].as_i64().unwrap())
    };
    (amount("available"), amount("pending"))
}

async fn platform(sim: &SimServer) -> (i64, i64) {
    aud(&get(sim, "balance").await)
}

async fn connected(control: &SimControl) -> (i64, i64) {
    aud(&control.connected_balance(ACCOUNT).await.unwrap())
}

/// Event types in the order the simulator emitted them (oldest first), optionally only about one object.
async fn event_types(sim: &SimServer, about: Option<&str>) -> Vec<String> {
    let events = get(sim, "events?limit=100").await;
    let mut types: Vec<String> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            about.is_none_or(|id| {
                let object = &e["data"]["object"];
                object["id"] == id || object["charge"] == id
            })
        })
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    types.reverse();
    types
}

/// Stripe's error envelope: (type, code, param).
fn error_of(body: &Value) -> (&str, &str, &str) {
    let e = &body["error"];
    (
        e["type"].as_str().unwrap_or(""),
        e["code"].as_str().unwrap_or(""),
        e["param"].as_str().unwrap_or(""),
    )
}

#[tokio::test]
async fn a_card_dispute_withdraws_amount_and_fee_and_a_won_dispute_gives_both_back() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    let fee = SimConfig::default().dispute_fee_cents;
    assert_eq!(fee, 2_500, "Stripe's AU dispute fee");
    let (pi, charge) = card_payment(&gw, 10_000, "pm_card_createDispute", "k-dispute").await;

    let disputes = get(&sim, &format!("disputes?charge={charge}")).await;
    assert_eq!(disputes["data"].as_array().unwrap().len(), 1);
    let dispute = &disputes["data"][0];
    assert!(dispute["id"].as_str().unwrap().starts_with("dp_"), "{dispute}");
    assert_eq!(
        (
            dispute["status"].as_str(),
            dispute["amount"].as_i64(),
            dispute["currency"].as_str(),
            dispute["reason"].as_str(),
            dispute["payment_intent"].as_str(),
            dispute["is_charge_refundable"].as_bool(),
        ),
        (
            Some("needs_response"),
            Some(10_000),
            Some("aud"),
            Some("fraudulent"),
            Some(pi.as_str()),
            Some(false)
        )
    );
    let withdrawn = &dispute["balance_transactions"][0];
    assert_eq!(
        (
            withdrawn["type"].as_str(),
            withdrawn["reporting_category"].as_str(),
            withdrawn["amount"].as_i64(),
            withdrawn["fee"].as_i64(),
            withdrawn["net"].as_i64(),
        ),
        (
            Some("adjustment"),
            Some("dispute"),
            Some(-10_000),
            Some(fee),
            Some(-12_500)
        )
    );
    assert_eq!(
        get(&sim, &format!("disputes/{}", dispute["id"].as_str().unwrap())).await,
        *dispute
    );
    assert_eq!(get(&sim, &format!("charges/{charge}")).await["disputed"], true);
    // The card's funds are still pending; the dispute took the amount and the fee out of the available balance.
    assert_eq!(platform(&sim).await, (-12_500, 10_000 - 205));
    assert_eq!(
        event_types(&sim, Some(&charge)).await,
        [
            "charge.succeeded",
            "charge.dispute.created",
            "charge.dispute.funds_withdrawn"
        ]
    );

    // A disputed charge cannot be refunded, whatever the balance.
    control.top_up("aud", 20_000).await.unwrap();
    let (status, refused) = post(&sim, "refunds", &format!("charge={charge}&amount=100")).await;
    assert_eq!(
        (status, error_of(&refused)),
        (400, ("invalid_request_error", "charge_disputed", ""))
    );
    assert!(
        refused["error"]["message"].as_str().unwrap().contains("charged back"),
        "{refused}"
    );
    assert_eq!(platform(&sim).await.0, 7_500, "the refused refund moved nothing");

    let won = control.close_dispute(&charge, true).await.unwrap();
    assert_eq!(won["status"], "won");
    let reinstated = &won["balance_transactions"][1];
    assert_eq!(
        (
            reinstated["type"].as_str(),
            reinstated["reporting_category"].as_str(),
            reinstated["amount"].as_i64(),
            reinstated["fee"].as_i64(),
            reinstated["net"].as_i64(),
        ),
        (
            Some("adjustment"),
            Some("dispute_reversal"),
            Some(10_000),
            Some(-fee),
            Some(12_500)
        )
    );
    assert_eq!(platform(&sim).await.0, 20_000, "amount and fee are back");
    assert_eq!(
        event_types(&sim, Some(&charge)).await[3..],
        ["charge.dispute.funds_reinstated", "charge.dispute.closed"]
    );
    let again = control.close_dispute(&charge, false).await.unwrap_err();
    assert!(again.to_string().contains("already closed"), "{again}");
}

#[tokio::test]
async fn a_dispute_long_after_distribution_that_is_lost_keeps_the_money_withdrawn() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    let (_, charge) = card_payment(&gw, 5_000, "pm_card_visa", "k-pay").await;
    // Months later, after the funds became available and were spent on transfers elsewhere.
    control.advance_clock(90 * 86_400).await.unwrap();
    let before = platform(&sim).await;
    assert_eq!(before, (5_000 - 118, 0));

    let opened = control
        .post(
            &format!("charges/{charge}/dispute"),
            json!({ "reason": "product_not_received" }),
        )
        .await
        .unwrap();
    assert_eq!(
        (opened["reason"].as_str(), opened["amount"].as_i64()),
        (Some("product_not_received"), Some(5_000))
    );
    assert_eq!(platform(&sim).await.0, before.0 - 5_000 - 2_500);
    let twice = control.open_dispute(&charge).await.unwrap_err();
    assert!(twice.to_string().contains("already disputed"), "{twice}");

    let lost = control.close_dispute(&charge, false).await.unwrap();
    assert_eq!(
        (
            lost["status"].as_str(),
            lost["balance_transactions"].as_array().unwrap().len()
        ),
        (Some("lost"), 1)
    );
    assert_eq!(
        platform(&sim).await.0,
        before.0 - 5_000 - 2_500,
        "a lost dispute gives nothing back"
    );
    assert_eq!(
        event_types(&sim, Some(&charge)).await,
        [
            "charge.succeeded",
            "charge.dispute.created",
            "charge.dispute.funds_withdrawn",
            "charge.dispute.closed"
        ]
    );
}

#[tokio::test]
async fn disputes_are_refused_on_charges_that_did_not_succeed_and_for_unknown_reasons() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    let declined = gw
        .create_payment_intent(&intent(
            1_000,
            PaymentMethodType::Card,
            "pm_card_chargeDeclined",
            "k-no",
        ))
        .await
        .unwrap_err();
    assert!(declined.to_string().contains("declined"), "{declined}");
    let failed_charge = get(&sim, "events?type=charge.failed").await["data"][0]["data"]["object"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let refused = control.open_dispute(&failed_charge).await.unwrap_err();
    assert!(refused.to_string().contains("has not succeeded"), "{refused}");
    let (_, charge) = card_payment(&gw, 1_000, "pm_card_visa", "k-ok").await;
    let unknown = control
        .post(&format!("charges/{charge}/dispute"), json!({ "reason": "bored" }))
        .await
        .unwrap_err();
    assert!(unknown.to_string().contains("\"param\":\"reason\""), "{unknown}");
    assert!(get(&sim, "disputes").await["data"].as_array().unwrap().is_empty());
    assert_eq!(get(&sim, &format!("charges/{charge}")).await["disputed"], false);
}

#[tokio::test]
async fn the_becs_dispute_account_succeeds_first_and_is_disputed_later_on_the_simulated_clock() {
    let (sim, control) = simulator().await;
    // Frozen: the test stands one second before a deadline, which the wall clock crossing a second must not pass.
    control.freeze_clock().await.unwrap();
    let gw = gateway(&sim);
    let after_secs = SimConfig::default().becs_dispute_after_secs;
    let pi = gw
        .create_payment_intent(&intent(
            3_000,
            PaymentMethodType::AuBecsDebit,
            "pm_becs_666666660",
            "k-becs",
        ))
        .await
        .unwrap();
    assert_eq!(pi.status, IntentStatus::Processing);
    control.settle(&pi.id, None).await.unwrap();
    let charge = pi.latest_charge.unwrap();
    assert_eq!(
        gw.retrieve_payment_intent(&pi.id).await.unwrap().status,
        IntentStatus::Succeeded
    );
    assert!(get(&sim, "disputes").await["data"].as_array().unwrap().is_empty());
    control.advance_clock(after_secs - 1).await.unwrap();
    assert!(get(&sim, "disputes").await["data"].as_array().unwrap().is_empty());
    let before = platform(&sim).await.0;

    control.advance_clock(1).await.unwrap();
    let disputes = get(&sim, &format!("disputes?payment_intent={}", pi.id)).await;
    let dispute = &disputes["data"][0];
    assert_eq!(
        (
            dispute["charge"].as_str(),
            dispute["amount"].as_i64(),
            dispute["reason"].as_str()
        ),
        (Some(charge.as_str()), Some(3_000), Some("debit_not_authorized"))
    );
    assert_eq!(platform(&sim).await.0, before - 3_000 - 2_500);
    let types = event_types(&sim, None).await;
    let succeeded = types.iter().position(|t| t == "payment_intent.succeeded").unwrap();
    let disputed = types.iter().position(|t| t == "charge.dispute.created").unwrap();
    assert!(succeeded < disputed, "{types:?}");
}

#[tokio::test]
async fn refund_reasons_and_destination_charge_options_are_refused_and_change_nothing() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    let (_, charge) = card_payment(&gw, 4_000, "pm_card_visa", "k-pay").await;
    control.top_up("aud", 4_000).await.unwrap();
    let before = platform(&sim).await;
    for (form, param) in [
        (format!("charge={charge}&reason=bored"), "reason"),
        (format!("charge={charge}&reverse_transfer=true"), "reverse_transfer"),
        (
            format!("charge={charge}&refund_application_fee=true"),
            "refund_application_fee",
        ),
    ] {
        let (status, body) = post(&sim, "refunds", &form).await;
        assert_eq!(
            (status, error_of(&body)),
            (400, ("invalid_request_error", "", param)),
            "{body}"
        );
        assert!(body["error"]["message"].as_str().unwrap().len() > 10, "{body}");
    }
    assert_eq!(platform(&sim).await, before);
    assert_eq!(get(&sim, &format!("charges/{charge}")).await["amount_refunded"], 0);
    assert!(get(&sim, "refunds").await["data"].as_array().unwrap().is_empty());
    assert!(!event_types(&sim, None).await.iter().any(|t| t.contains("refund")));
}

#[tokio::test]
async fn a_refund_is_paid_from_available_platform_balance_and_keeps_its_metadata() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    let (pi, charge) = card_payment(&gw, 10_000, "pm_card_visa", "k-pay").await;
    let refund = |amount: i64, key: &str| CreateRefundParams {
        target: RefundTarget::PaymentIntent(pi.clone()),
        amount_cents: Some(amount),
        reason: None,
        metadata: BTreeMap::from([("split_allocation_id".to_owned(), "alloc_7".to_owned())]),
        idempotency_key: key.into(),
    };
    // The charge's own funds are pending: nothing available to refund from.
    assert_eq!(platform(&sim).await, (0, 9_795));
    let short = gw.create_refund(&refund(1_000, "k-re1")).await.unwrap_err();
    assert_eq!(short.code(), Some("balance_insufficient"), "{short}");
    assert_eq!(platform(&sim).await, (0, 9_795));
    assert_eq!(get(&sim, &format!("charges/{charge}")).await["amount_refunded"], 0);

    control.top_up("aud", 1_500).await.unwrap();
    let made = gw.create_refund(&refund(1_000, "k-re2")).await.unwrap();
    assert_eq!(
        (made.amount_cents, made.status.as_deref(), made.charge.as_deref()),
        (1_000, Some("succeeded"), Some(charge.as_str()))
    );
    assert_eq!(platform(&sim).await, (500, 9_795));
    let stored = get(&sim, &format!("refunds/{}", made.id)).await;
    assert_eq!(stored["metadata"]["split_allocation_id"], "alloc_7");
    let bt = get(
        &sim,
        &format!(
            "balance_transactions/{}",
            stored["balance_transaction"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(
        (bt["type"].as_str(), bt["amount"].as_i64(), bt["source"].as_str()),
        (Some("refund"), Some(-1_000), Some(made.id.as_str()))
    );
    for filter in [format!("charge={charge}"), format!("payment_intent={pi}")] {
        let listed = get(&sim, &format!("refunds?{filter}")).await;
        assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{filter}");
        assert_eq!(listed["data"][0], stored);
    }
    assert!(get(&sim, "refunds?charge=ch_other").await["data"]
        .as_array()
        .unwrap()
        .is_empty());
    // charge.refunded carries the charge with what was refunded and the refund itself.
    let events = get(&sim, "events?type=charge.refunded").await;
    let refunded = &events["data"][0]["data"]["object"];
    assert_eq!(refunded["amount_refunded"], 1_000);
    assert_eq!(refunded["refunds"]["data"][0], stored);
    let (status, missing) = api(&sim, reqwest::Method::GET, "refunds/re_nope", "", None).await;
    assert_eq!(
        (status, error_of(&missing)),
        (404, ("invalid_request_error", "resource_missing", "refund"))
    );
}

#[tokio::test]
async fn pending_refunds_succeed_or_fail_later_with_charge_refund_updated() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    control
        .set_config(&SimConfig {
            refunds_start_pending: true,
            ..SimConfig::default()
        })
        .await
        .unwrap();
    let (_, charge) = card_payment(&gw, 6_000, "pm_card_visa", "k-pay").await;
    control.top_up("aud", 3_000).await.unwrap();
    let (_, first) = post(&sim, "refunds", &format!("charge={charge}&amount=1000")).await;
    let (_, second) = post(&sim, "refunds", &format!("charge={charge}&amount=2000")).await;
    assert_eq!(
        (first["status"].as_str(), second["status"].as_str()),
        (Some("pending"), Some("pending"))
    );
    assert_eq!(platform(&sim).await.0, 0, "a pending refund already left the balance");

    let ok = control
        .settle_refund(first["id"].as_str().unwrap(), true)
        .await
        .unwrap();
    assert_eq!(ok["status"], "succeeded");
    let failed = control
        .post(
            &format!("refunds/{}/settle", second["id"].as_str().unwrap()),
            json!({ "outcome": "failed", "failure_reason": "expired_or_canceled_card" }),
        )
        .await
        .unwrap();
    assert_eq!(
        (failed["status"].as_str(), failed["failure_reason"].as_str()),
        (Some("failed"), Some("expired_or_canceled_card"))
    );
    let back = get(
        &sim,
        &format!(
            "balance_transactions/{}",
            failed["failure_balance_transaction"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(
        (back["type"].as_str(), back["amount"].as_i64()),
        (Some("refund_failure"), Some(2_000))
    );
    assert_eq!(platform(&sim).await.0, 2_000, "the failed refund's money is back");
    assert_eq!(get(&sim, &format!("charges/{charge}")).await["amount_refunded"], 1_000);
    let updates = get(&sim, "events?type=charge.refund.updated").await;
    let statuses: Vec<&str> = updates["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"]["object"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["failed", "succeeded"], "newest first");
    let twice = control
        .settle_refund(first["id"].as_str().unwrap(), false)
        .await
        .unwrap_err();
    assert!(twice.to_string().contains("not pending"), "{twice}");
    assert_eq!(platform(&sim).await.0, 2_000);
}

#[tokio::test]
async fn transfers_credit_the_connected_balance_that_payouts_and_reversals_draw_on() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    control.create_account(ACCOUNT, true).await.unwrap();
    control.top_up("aud", 10_000).await.unwrap();
    let t = gw.create_transfer(&transfer(6_000, None, "k-t")).await.unwrap();
    assert_eq!(platform(&sim).await, (4_000, 0));
    assert_eq!(connected(&control).await, (6_000, 0));
    let (status, as_account) = api(&sim, reqwest::Method::GET, "balance", "", Some(ACCOUNT)).await;
    assert_eq!(
        (status, aud(&as_account)),
        (200, (6_000, 0)),
        "Stripe-Account reads the connected balance"
    );

    let payout = control.payout(ACCOUNT, "aud", 5_000).await.unwrap();
    assert!(payout["id"].as_str().unwrap().starts_with("po_"), "{payout}");
    assert_eq!(connected(&control).await, (1_000, 0));
    let too_much = control.payout(ACCOUNT, "aud", 1_001).await.unwrap_err();
    assert!(too_much.to_string().contains("balance_insufficient"), "{too_much}");
    assert_eq!(connected(&control).await, (1_000, 0));

    // Reversing more than the connected account still holds fails, and moves nothing.
    let (status, refused) = post(&sim, &format!("transfers/{}/reversals", t.id), "amount=2000").await;
    assert_eq!(
        (status, error_of(&refused)),
        (400, ("invalid_request_error", "balance_insufficient", "amount"))
    );
    assert_eq!(
        (platform(&sim).await, connected(&control).await),
        ((4_000, 0), (1_000, 0))
    );
    let err = gw.reverse_transfer(&t.id, Some(2_000), "k-r1").await.unwrap_err();
    assert_eq!(err.code(), Some("balance_insufficient"));

    let reversed = gw.reverse_transfer(&t.id, Some(1_000), "k-r2").await.unwrap();
    assert!(matches!(
        reversed,
        ReversalOutcome::Reversed {
            amount_cents: 1_000,
            ..
        }
    ));
    assert_eq!((platform(&sim).await, connected(&control).await), ((5_000, 0), (0, 0)));
    let listed = get(&sim, &format!("transfers/{}", t.id)).await;
    let reversal = &listed["reversals"]["data"][0];
    assert!(reversal["destination_payment_refund"]
        .as_str()
        .unwrap()
        .starts_with("pyr_"));
    let bt = get(
        &sim,
        &format!(
            "balance_transactions/{}",
            reversal["balance_transaction"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(
        (bt["type"].as_str(), bt["amount"].as_i64()),
        (Some("transfer_refund"), Some(1_000))
    );
    let types = event_types(&sim, Some(&t.id)).await;
    assert_eq!(types, ["transfer.created", "transfer.reversed"]);
}

#[tokio::test]
async fn a_transfer_still_pending_is_reversed_out_of_its_own_pending_funds() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    control.create_account(ACCOUNT, true).await.unwrap();
    let (_, charge) = card_payment(&gw, 10_000, "pm_card_visa", "k-pay").await;
    let t = gw
        .create_transfer(&transfer(5_000, Some(&charge), "k-t"))
        .await
        .unwrap();
    assert_eq!(connected(&control).await, (0, 5_000));
    assert_eq!(platform(&sim).await, (0, 9_795 - 5_000));
    gw.reverse_transfer(&t.id, Some(2_000), "k-r").await.unwrap();
    assert_eq!(connected(&control).await, (0, 3_000));
    assert_eq!(platform(&sim).await, (0, 9_795 - 3_000));
    control.advance_clock(2 * 86_400).await.unwrap();
    assert_eq!(connected(&control).await, (3_000, 0));
    assert_eq!(platform(&sim).await, (9_795 - 3_000, 0));
}

#[tokio::test]
async fn connect_events_go_only_to_connect_endpoints_and_capabilities_activate_later() {
    let (sim, control) = simulator().await;
    // Frozen: the test stands one second before a deadline, which the wall clock crossing a second must not pass.
    control.freeze_clock().await.unwrap();
    let gw = gateway(&sim);
    let platform_hook = Receiver::start().await;
    let connect_hook = Receiver::start().await;
    control.add_webhook(&platform_hook.url, "whsec_platform").await.unwrap();
    control
        .add_connect_webhook(&connect_hook.url, "whsec_connect")
        .await
        .unwrap();
    control.create_account(ACCOUNT, false).await.unwrap();
    control.activate_transfers_later(ACCOUNT, "pending", 100).await.unwrap();
    control.top_up("aud", 1_000).await.unwrap();
    let refused = gw.create_transfer(&transfer(500, None, "k-t1")).await.unwrap_err();
    assert_eq!(refused.code(), Some("insufficient_capabilities_for_transfer"));

    control.advance_clock(99).await.unwrap();
    assert_eq!(
        gw.retrieve_account(ACCOUNT)
            .await
            .unwrap()
            .transfers_capability
            .as_deref(),
        Some("pending")
    );
    control.advance_clock(1).await.unwrap();
    assert_eq!(
        gw.retrieve_account(ACCOUNT)
            .await
            .unwrap()
            .transfers_capability
            .as_deref(),
        Some("active")
    );
    gw.create_transfer(&transfer(500, None, "k-t2")).await.unwrap();
    control.advance_clock(2 * 86_400).await.unwrap();
    control.payout(ACCOUNT, "aud", 500).await.unwrap();

    // Creation, pending, active: one account.updated each, a capability.updated for each capability change.
    let expected_connect = [
        "account.updated",
        "capability.updated",
        "account.updated",
        "capability.updated",
        "account.updated",
        "payout.created",
        "payout.paid",
    ];
    let connect_types = connect_hook
        .wait_for("the connect events", |t| t.len() >= expected_connect.len())
        .await;
    let mut sorted = connect_types.clone();
    sorted.sort();
    let mut expected = expected_connect.map(str::to_owned).to_vec();
    expected.sort();
    assert_eq!(sorted, expected);
    platform_hook
        .wait_for("transfer.created", |t| t.iter().any(|t| t == "transfer.created"))
        .await;
    for (_, body) in connect_hook.received.lock().unwrap().iter() {
        let event: Value = serde_json::from_str(body).unwrap();
        assert_eq!(event["account"], ACCOUNT, "{event}");
    }
    let capability_updates: Vec<Value> = connect_hook
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|(_, body)| serde_json::from_str::<Value>(body).unwrap())
        .filter(|e| e["type"] == "capability.updated")
        .map(|e| e["data"]["object"].clone())
        .collect();
    let mut statuses: Vec<&str> = capability_updates
        .iter()
        .map(|c| c["status"].as_str().unwrap())
        .collect();
    statuses.sort();
    assert_eq!(statuses, ["active", "pending"]);
    assert!(capability_updates
        .iter()
        .all(|c| c["id"] == "transfers" && c["account"] == ACCOUNT));
    for (_, body) in platform_hook.received.lock().unwrap().iter() {
        let event: Value = serde_json::from_str(body).unwrap();
        assert!(
            event.get("account").is_none(),
            "a Connect event reached the platform endpoint: {event}"
        );
    }
}

#[tokio::test]
async fn concurrent_and_repeated_refunds_never_spend_the_balance_twice() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    let (pi, _) = card_payment(&gw, 10_000, "pm_card_visa", "k-pay").await;
    control.top_up("aud", 3_000).await.unwrap();
    let refund = |amount: i64, key: &str| CreateRefundParams {
        target: RefundTarget::PaymentIntent(pi.clone()),
        amount_cents: Some(amount),
        reason: None,
        metadata: BTreeMap::new(),
        idempotency_key: key.into(),
    };
    // Two different refunds racing for A$30 that covers only one of them.
    let (first, second) = (refund(2_000, "k-a"), refund(2_000, "k-b"));
    let (a, b) = tokio::join!(gw.create_refund(&first), gw.create_refund(&second));
    let made: Vec<RefundInfo> = [a, b].into_iter().filter_map(Result::ok).collect();
    assert_eq!(made.len(), 1, "exactly one refund fits the available balance");
    assert_eq!(platform(&sim).await.0, 1_000);

    // The response of a further refund is lost; the retry with the same key replays it instead of refunding again.
    control
        .fault(splitpay::stripe::sim::Fault {
            kind: splitpay::stripe::sim::FaultKind::LoseResponse,
            count: 1,
            path_contains: Some("/v1/refunds".into()),
            method: Some("POST".into()),
        })
        .await
        .unwrap();
    let lost = gw.create_refund(&refund(1_000, "k-c")).await;
    let again = gw.create_refund(&refund(1_000, "k-c")).await.unwrap();
    if let Ok(first) = lost {
        assert_eq!(first.id, again.id);
    }
    assert_eq!(platform(&sim).await.0, 0);
    let refunds = get(&sim, &format!("refunds?payment_intent={pi}")).await;
    assert_eq!(refunds["data"].as_array().unwrap().len(), 2, "{refunds}");
    let refunded = get(&sim, &format!("payment_intents/{pi}?expand[]=latest_charge")).await;
    assert_eq!(refunded["latest_charge"]["amount_refunded"], 3_000);
}

#[tokio::test]
async fn a_dispute_fails_the_charges_pending_refunds_and_takes_the_whole_amount() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    control
        .set_config(&SimConfig {
            refunds_start_pending: true,
            ..SimConfig::default()
        })
        .await
        .unwrap();
    let (_, charge) = card_payment(&gw, 4_000, "pm_card_visa", "k-pay").await;
    control.top_up("aud", 1_000).await.unwrap();
    let (_, pending) = post(&sim, "refunds", &format!("charge={charge}&amount=1000")).await;
    assert_eq!(platform(&sim).await.0, 0);

    let dispute = control.open_dispute(&charge).await.unwrap();
    let refund = get(&sim, &format!("refunds/{}", pending["id"].as_str().unwrap())).await;
    assert_eq!(
        (refund["status"].as_str(), refund["failure_reason"].as_str()),
        (Some("failed"), Some("charge_for_pending_refund_disputed"))
    );
    assert_eq!(
        dispute["amount"], 4_000,
        "the failed refund no longer reduces what is disputed"
    );
    assert_eq!(platform(&sim).await.0, 1_000 - 4_000 - 2_500);
    assert_eq!(get(&sim, &format!("charges/{charge}")).await["amount_refunded"], 0);
}

/// `pending_refunds_survive_disputes`: a dispute leaves the charge's pending refund pending and takes only what it
/// left unrefunded; the refund is settled later like any other (here it fails, and its money comes back).
#[tokio::test]
async fn a_pending_refund_kept_through_a_dispute_settles_later() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    control
        .set_config(&SimConfig {
            refunds_start_pending: true,
            pending_refunds_survive_disputes: true,
            ..SimConfig::default()
        })
        .await
        .unwrap();
    let (_, charge) = card_payment(&gw, 4_000, "pm_card_visa", "k-pay").await;
    control.top_up("aud", 1_000).await.unwrap();
    let (_, pending) = post(&sim, "refunds", &format!("charge={charge}&amount=1000")).await;
    let refund_id = pending["id"].as_str().unwrap().to_owned();

    let dispute = control.open_dispute(&charge).await.unwrap();
    let refund = get(&sim, &format!("refunds/{refund_id}")).await;
    assert_eq!(
        (refund["status"].as_str(), refund["failure_reason"].as_str()),
        (Some("pending"), None)
    );
    assert_eq!(dispute["amount"], 3_000, "the pending refund still counts as refunded");
    assert_eq!(platform(&sim).await.0, 1_000 - 1_000 - 3_000 - 2_500);

    let failed = control
        .post(
            &format!("refunds/{refund_id}/settle"),
            json!({ "outcome": "failed", "failure_reason": "expired_or_canceled_card" }),
        )
        .await
        .unwrap();
    assert_eq!(failed["status"], "failed");
    assert_eq!(
        platform(&sim).await.0,
        1_000 - 3_000 - 2_500,
        "the failed refund's money is back"
    );
    assert_eq!(get(&sim, &format!("charges/{charge}")).await["amount_refunded"], 0);
    let updated = event_types(&sim, Some(&refund_id)).await;
    assert!(updated.iter().any(|t| t == "charge.refund.updated"), "{updated:?}");
}

/// With `onboarding_required` (Stripe's rule, which the end-to-end suite runs under), an account created through the
/// API receives transfers only once its terms are accepted and it has a bank account; both may come later, by
/// `POST /v1/accounts/{id}`, which then activates `transfers` with `capability.updated` and `account.updated`.
#[tokio::test]
async fn under_the_onboarding_rule_transfers_activate_only_once_terms_and_bank_account_are_given() {
    let config = SimConfig {
        onboarding_required: true,
        ..SimConfig::default()
    };
    let sim = splitpay::stripe::sim::start(config, 0).await.unwrap();
    let gw = gateway(&sim);
    let bare = "type=custom&country=AU&capabilities[transfers][requested]=true";
    let (status, account) = post(&sim, "accounts", bare).await;
    assert_eq!(status, 200, "{account}");
    let id = account["id"].as_str().unwrap().to_owned();
    assert_eq!(account["capabilities"]["transfers"], "inactive");

    // Terms alone are not enough: the account cannot receive a transfer, and the refusal is Stripe's.
    let (status, _) = post(&sim, &format!("accounts/{id}"), "tos_acceptance[date]=1700000000").await;
    assert_eq!(status, 200);
    let (_, charge) = card_payment(&gw, 5_000, "pm_card_bypassPending", "onb-pay").await;
    let mut t = transfer(1_000, Some(&charge), "onb-t1");
    t.destination = id.clone();
    match gw.create_transfer(&t).await {
        Err(GatewayError::Terminal { code, .. }) => {
            assert_eq!(code.as_deref(), Some("insufficient_capabilities_for_transfer"))
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // The bank account (Stripe's inline form: BSB 110000, account 000123456) completes onboarding.
    let bank = "external_account[object]=bank_account&external_account[country]=AU&external_account[currency]=aud\
                &external_account[routing_number]=110000&external_account[account_number]=000123456";
    let (status, updated) = post(&sim, &format!("accounts/{id}"), bank).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["capabilities"]["transfers"], "active");
    let events = get(&sim, "events?limit=100").await;
    let mut types: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["account"] == id.as_str())
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    types.reverse();
    assert_eq!(
        types,
        [
            "account.updated",
            "account.updated",
            "capability.updated",
            "account.updated"
        ],
        "created, terms, then the capability change"
    );
    let mut t = transfer(1_000, Some(&charge), "onb-t2");
    t.destination = id.clone();
    assert_eq!(gw.create_transfer(&t).await.unwrap().amount_cents, 1_000);

    // Onboarded in one call: active at once. A country or type cannot be changed by an update.
    let full = format!(
        "type=custom&country=AU&capabilities[transfers][requested]=true&tos_acceptance[date]=1700000000&{bank}"
    );
    let (_, ready) = post(&sim, "accounts", &full).await;
    assert_eq!(ready["capabilities"]["transfers"], "active");
    let (status, refused) = post(&sim, &format!("accounts/{id}"), "country=NZ").await;
    assert_eq!((status, error_of(&refused).2), (400, "country"), "{refused}");
    let (status, _) = post(&sim, "accounts/acct_nosuch", "tos_acceptance[date]=1").await;
    assert_eq!(status, 404);
}

/// Without the rule (the default every other test relies on), requesting `transfers` activates it at once.
#[tokio::test]
async fn by_default_a_requested_transfers_capability_is_active_at_once() {
    let (sim, _) = simulator().await;
    let (_, account) = post(
        &sim,
        "accounts",
        "type=custom&country=AU&capabilities[transfers][requested]=true",
    )
    .await;
    assert_eq!(account["capabilities"]["transfers"], "active");
    let (_, account) = post(&sim, "accounts", "type=custom&country=AU").await;
    assert_eq!(account["capabilities"]["transfers"], "inactive");
}

/// `GET /v1/events` filters on `created` as Stripe does (`created[gte]`, `[gt]`, `[lt]`, `[lte]`, or exact).
#[tokio::test]
async fn events_are_listed_by_creation_time() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    card_payment(&gw, 1_000, "pm_card_visa", "ev-1").await;
    let before = get(&sim, "events?limit=100").await["data"].as_array().unwrap().len();
    assert!(before > 0);
    let now = control.advance_clock(3_600).await.unwrap();
    card_payment(&gw, 2_000, "pm_card_visa", "ev-2").await;
    let all = get(&sim, "events?limit=100").await["data"].as_array().unwrap().len();
    let later = get(&sim, &format!("events?limit=100&created[gte]={now}")).await;
    let later = later["data"].as_array().unwrap();
    assert_eq!(later.len(), all - before, "only the second payment's events");
    assert!(later.iter().all(|e| e["created"].as_i64().unwrap() >= now));
    let earlier = get(&sim, &format!("events?limit=100&created[lt]={now}")).await;
    assert_eq!(earlier["data"].as_array().unwrap().len(), before);
    let (status, body) = api(&sim, reqwest::Method::GET, "events?created[gte]=soon", "", None).await;
    assert_eq!((status, error_of(&body).2), (400, "created[gte]"), "{body}");
}

/// An endpoint registered with `enabled_events` (as at Stripe) is sent only those types; one without, every type.
/// Also the registration splitpay's own tools use: the types splitpay acts on. A malformed list is refused naming
/// the field.
#[tokio::test]
async fn an_endpoint_is_sent_only_its_enabled_events() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    let every = Receiver::start().await;
    let reversals = Receiver::start().await;
    control.add_webhook(&every.url, "whsec_every").await.unwrap();
    control
        .post(
            "webhooks",
            json!({ "url": reversals.url, "secret": "whsec_reversals", "enabled_events": ["transfer.reversed"] }),
        )
        .await
        .unwrap();
    let refused = control
        .post(
            "webhooks",
            json!({ "url": every.url, "secret": "whsec_x", "enabled_events": [] }),
        )
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("enabled_events"), "{refused}");

    control.create_account(ACCOUNT, true).await.unwrap();
    control.top_up("aud", 10_000).await.unwrap();
    let t = gw.create_transfer(&transfer(5_000, None, "k-t")).await.unwrap();
    gw.reverse_transfer(&t.id, Some(2_000), "k-r").await.unwrap();
    every
        .wait_for("both transfer events", |t| {
            t.contains(&"transfer.created".to_owned()) && t.contains(&"transfer.reversed".to_owned())
        })
        .await;
    reversals.wait_for("the reversal", |t| !t.is_empty()).await;
    // Every delivery is counted: two to the first endpoint, one to the second, and nothing more comes.
    let mut delivered = 0;
    for _ in 0..40 {
        delivered = control.webhook_stats().await.unwrap()["delivered"].as_u64().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(delivered, 3);
    assert_eq!(reversals.types(), ["transfer.reversed"]);
}
