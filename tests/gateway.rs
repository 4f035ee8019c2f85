//! The Stripe gateway (async-stripe + our transport) against the simulator over real HTTP: every operation and
//! every error class, idempotency as Stripe does it, injected faults, the rate limiter, and signed webhooks.

mod common;

use std::collections::BTreeMap;

use common::stripe::{gateway, gateway_with, simulator, Receiver, TEST_KEY};
use splitpay::config::Secret;
use splitpay::domain::plan::PaymentMethodType;
use splitpay::stripe::error::ErrorClass;
use splitpay::stripe::sim::model::SimConfig;
use splitpay::stripe::sim::{Fault, FaultKind, REDELIVERY_DELAYS_SECS};
use splitpay::stripe::webhook::verify_signature;
use splitpay::stripe::*;

fn intent(amount_cents: i64, method: PaymentMethodType, pm: Option<&str>, key: &str) -> CreatePaymentIntentParams {
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

fn transfer(destination: &str, amount_cents: i64, source: Option<&str>, key: &str) -> CreateTransferParams {
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
async fn paid_charge(gw: &StripeGateway, amount_cents: i64, key: &str) -> String {
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
async fn ready_to_transfer() -> (
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
fn transfer_fault(kind: FaultKind, count: u32) -> Fault {
    Fault {
        kind,
        count,
        path_contains: Some("/v1/transfers".into()),
        method: Some("POST".into()),
    }
}

fn terminal_code(err: &GatewayError) -> &str {
    assert_eq!(err.class(), ErrorClass::Terminal, "{err}");
    err.code().unwrap_or("")
}

#[tokio::test]
async fn card_payment_succeeds_with_its_fee_and_metadata() {
    let (sim, _) = simulator().await;
    let gw = gateway(&sim);
    let pi = gw
        .create_payment_intent(&intent(10_000, PaymentMethodType::Card, Some("pm_card_visa"), "k-pi-1"))
        .await
        .unwrap();
    assert_eq!(
        (pi.status, pi.amount_cents, pi.currency.as_str()),
        (IntentStatus::Succeeded, 10_000, "aud")
    );
    assert_eq!(pi.transfer_group.as_deref(), Some("spay_group1"));
    assert_eq!(pi.metadata["split_payment_id"], "spay_group1");
    assert!(pi.client_secret.as_deref().is_some_and(|s| s.starts_with(&pi.id)));
    assert!(
        !format!("{pi:?}").contains("secret_"),
        "client_secret is redacted in Debug"
    );

    let charge = gw.retrieve_charge(pi.latest_charge.as_deref().unwrap()).await.unwrap();
    assert_eq!((charge.status.as_str(), charge.amount_cents), ("succeeded", 10_000));
    assert_eq!(charge.payment_intent.as_deref(), Some(pi.id.as_str()));
    let bt = charge
        .balance_transaction
        .expect("fee is known at once without async capture");
    assert_eq!((bt.fee_cents, bt.net_cents), (205, 9_795), "1.75% + 30c");
    assert!(bt.available_on > sim.now(), "card funds are pending for a while");

    let again = gw.retrieve_payment_intent(&pi.id).await.unwrap();
    assert_eq!(again.status, IntentStatus::Succeeded);
}

#[tokio::test]
async fn card_declines_are_terminal_and_name_the_intent() {
    let (sim, _) = simulator().await;
    let gw = gateway(&sim);
    for (pm, decline) in [
        ("pm_card_chargeDeclined", "generic_decline"),
        ("pm_card_chargeDeclinedInsufficientFunds", "insufficient_funds"),
    ] {
        let err = gw
            .create_payment_intent(&intent(5_000, PaymentMethodType::Card, Some(pm), &format!("k-{pm}")))
            .await
            .unwrap_err();
        assert_eq!(terminal_code(&err), "card_declined");
        let GatewayError::Terminal {
            status,
            decline_code,
            payment_intent,
            ..
        } = &err
        else {
            unreachable!()
        };
        assert_eq!((*status, decline_code.as_deref()), (402, Some(decline)));
        let pi = gw
            .retrieve_payment_intent(payment_intent.as_deref().unwrap())
            .await
            .unwrap();
        assert_eq!(pi.status, IntentStatus::RequiresPaymentMethod);
        let failure = pi.last_payment_error.unwrap();
        assert_eq!(
            (failure.code.as_deref(), failure.decline_code.as_deref()),
            (Some("card_declined"), Some(decline))
        );
    }
}

#[tokio::test]
async fn becs_debits_stay_processing_then_settle_as_stripe_documents() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    let table = [
        ("000123456", None),
        ("111111113", Some("account_closed")),
        ("111111116", Some("no_account")),
        ("222222227", Some("refer_to_customer")),
        ("333333335", Some("debit_not_authorized")),
        ("343434343", Some("charge_exceeds_source_limit")),
        ("121212121", Some("charge_exceeds_transaction_limit")),
    ];
    let mut intents = Vec::new();
    for (account, _) in &table {
        let pm = format!("pm_becs_{account}");
        let pi = gw
            .create_payment_intent(&intent(
                2_000,
                PaymentMethodType::AuBecsDebit,
                Some(&pm),
                &format!("k-becs-{account}"),
            ))
            .await
            .unwrap();
        assert_eq!(pi.status, IntentStatus::Processing, "{account}");
        let charge = gw.retrieve_charge(pi.latest_charge.as_deref().unwrap()).await.unwrap();
        assert_eq!(charge.status, "pending");
        assert!(charge.balance_transaction.is_none(), "no fee before the debit clears");
        intents.push(pi.id);
    }
    // Nothing moves until the debit's time has come (5 s by default).
    control.advance_clock(6).await.unwrap();
    for ((account, failure), id) in table.iter().zip(&intents) {
        let pi = gw.retrieve_payment_intent(id).await.unwrap();
        match failure {
            None => {
                assert_eq!(pi.status, IntentStatus::Succeeded, "{account}");
                let bt = gw
                    .retrieve_charge(pi.latest_charge.as_deref().unwrap())
                    .await
                    .unwrap()
                    .balance_transaction
                    .unwrap();
                assert_eq!(bt.fee_cents, 50, "1% + 30c");
            }
            Some(code) => {
                assert_eq!(pi.status, IntentStatus::RequiresPaymentMethod, "{account}");
                assert_eq!(pi.last_payment_error.unwrap().code.as_deref(), Some(*code), "{account}");
            }
        }
    }
}

#[tokio::test]
async fn delayed_becs_outcomes_wait_three_minutes_and_control_can_settle_now() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    let slow = gw
        .create_payment_intent(&intent(
            2_000,
            PaymentMethodType::AuBecsDebit,
            Some("pm_becs_900123456"),
            "k-slow",
        ))
        .await
        .unwrap();
    let slow_fail = gw
        .create_payment_intent(&intent(
            2_000,
            PaymentMethodType::AuBecsDebit,
            Some("pm_becs_922222227"),
            "k-slowf",
        ))
        .await
        .unwrap();
    control.advance_clock(60).await.unwrap();
    assert_eq!(
        gw.retrieve_payment_intent(&slow.id).await.unwrap().status,
        IntentStatus::Processing
    );
    control.advance_clock(121).await.unwrap();
    assert_eq!(
        gw.retrieve_payment_intent(&slow.id).await.unwrap().status,
        IntentStatus::Succeeded
    );
    let failed = gw.retrieve_payment_intent(&slow_fail.id).await.unwrap();
    assert_eq!(
        failed.last_payment_error.unwrap().code.as_deref(),
        Some("refer_to_customer")
    );

    // A control call settles a pending debit at once, either way.
    let forced = gw
        .create_payment_intent(&intent(
            2_000,
            PaymentMethodType::AuBecsDebit,
            Some("pm_becs_000123456"),
            "k-f",
        ))
        .await
        .unwrap();
    control.settle(&forced.id, Some("fail")).await.unwrap();
    assert_eq!(
        gw.retrieve_payment_intent(&forced.id).await.unwrap().status,
        IntentStatus::RequiresPaymentMethod
    );
}

#[tokio::test]
async fn payto_success_and_failure() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    let ok = gw
        .create_payment_intent(&intent(
            3_000,
            PaymentMethodType::Payto,
            Some("pm_payto_success"),
            "k-payto-ok",
        ))
        .await
        .unwrap();
    let no = gw
        .create_payment_intent(&intent(
            3_000,
            PaymentMethodType::Payto,
            Some("pm_payto_declined"),
            "k-payto-no",
        ))
        .await
        .unwrap();
    assert_eq!(
        (ok.status, no.status),
        (IntentStatus::Processing, IntentStatus::Processing)
    );
    control.advance_clock(4).await.unwrap();
    assert_eq!(
        gw.retrieve_payment_intent(&ok.id).await.unwrap().status,
        IntentStatus::Succeeded
    );
    let declined = gw.retrieve_payment_intent(&no.id).await.unwrap();
    assert_eq!(declined.status, IntentStatus::RequiresPaymentMethod);
    assert_eq!(
        declined.last_payment_error.unwrap().code.as_deref(),
        Some("payment_method_provider_decline")
    );
    // PayTo and BECS are AUD only, as Stripe says.
    let mut nzd = intent(3_000, PaymentMethodType::Payto, None, "k-nzd");
    nzd.currency = "nzd".into();
    assert_eq!(
        gw.create_payment_intent(&nzd).await.unwrap_err().class(),
        ErrorClass::Terminal
    );
}

#[tokio::test]
async fn confirm_and_cancel() {
    let (sim, _) = simulator().await;
    let gw = gateway(&sim);
    let open = gw
        .create_payment_intent(&intent(1_000, PaymentMethodType::Card, None, "k-open"))
        .await
        .unwrap();
    assert_eq!(open.status, IntentStatus::RequiresPaymentMethod);
    let confirmed = gw
        .confirm_payment_intent(&open.id, "pm_card_visa", "k-open-confirm")
        .await
        .unwrap();
    assert_eq!(confirmed.status, IntentStatus::Succeeded);
    let err = gw
        .cancel_payment_intent(&open.id, None, "k-open-cancel")
        .await
        .unwrap_err();
    assert_eq!(terminal_code(&err), "payment_intent_unexpected_state");

    let other = gw
        .create_payment_intent(&intent(1_000, PaymentMethodType::Card, None, "k-other"))
        .await
        .unwrap();
    assert_eq!(other.cancellation_reason, None);
    let canceled = gw
        .cancel_payment_intent(&other.id, Some(CancellationReason::Abandoned), "k-other-cancel")
        .await
        .unwrap();
    assert_eq!(
        (canceled.status, canceled.cancellation_reason.as_deref()),
        (IntentStatus::Canceled, Some("abandoned"))
    );
    // Canceled is final: canceling again is refused too.
    let again = gw
        .cancel_payment_intent(&other.id, Some(CancellationReason::Abandoned), "k-other-cancel-2")
        .await
        .unwrap_err();
    assert_eq!(terminal_code(&again), "payment_intent_unexpected_state");
    let missing = gw.retrieve_payment_intent("pi_missing").await.unwrap_err();
    assert_eq!(terminal_code(&missing), "resource_missing");
}

#[tokio::test]
async fn asynchronous_capture_leaves_the_fee_unknown_for_a_while() {
    let (sim, control) = simulator().await;
    control
        .set_config(&SimConfig {
            balance_transaction_delay_secs: 60,
            ..SimConfig::default()
        })
        .await
        .unwrap();
    let gw = gateway(&sim);
    let charge_id = paid_charge(&gw, 4_000, "k-async").await;
    assert_eq!(
        gw.retrieve_charge(&charge_id).await.unwrap().balance_transaction,
        None,
        "fee not known yet: never guess"
    );
    control.advance_clock(61).await.unwrap();
    let bt = gw
        .retrieve_charge(&charge_id)
        .await
        .unwrap()
        .balance_transaction
        .unwrap();
    assert_eq!(bt.fee_cents + bt.net_cents, 4_000);
}

#[tokio::test]
async fn transfers_follow_stripe_rules() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    control.create_account("acct_ok", true).await.unwrap();
    control.create_account("acct_nocap", false).await.unwrap();
    control.create_account("acct_gone", true).await.unwrap();
    let charge = paid_charge(&gw, 10_000, "k-pay").await;

    let t = gw
        .create_transfer(&transfer("acct_ok", 6_000, Some(&charge), "k-t1"))
        .await
        .unwrap();
    assert_eq!(
        (
            t.amount_cents,
            t.destination.as_deref(),
            t.source_transaction.as_deref()
        ),
        (6_000, Some("acct_ok"), Some(charge.as_str()))
    );
    assert_eq!(t.metadata["split_allocation_id"], "k-t1");

    // The sum of transfers sharing a source_transaction cannot exceed the charge.
    let err = gw
        .create_transfer(&transfer("acct_ok", 4_001, Some(&charge), "k-t2"))
        .await
        .unwrap_err();
    assert_eq!(terminal_code(&err), "amount_too_large");
    gw.create_transfer(&transfer("acct_ok", 4_000, Some(&charge), "k-t3"))
        .await
        .unwrap();

    let cases = [
        (
            transfer("acct_missing", 100, Some(&charge), "k-e1"),
            "resource_missing",
            "No such destination",
        ),
        (
            transfer("acct_nocap", 100, Some(&charge), "k-e2"),
            "insufficient_capabilities_for_transfer",
            "transfers",
        ),
        (transfer("acct_ok", 100, Some("pi_123"), "k-e3"), "", "must be a charge"),
        (
            transfer("acct_ok", 100, Some("ch_missing"), "k-e4"),
            "resource_missing",
            "No such charge",
        ),
    ];
    for (params, code, words) in cases {
        let err = gw.create_transfer(&params).await.unwrap_err();
        assert_eq!(terminal_code(&err), code, "{err}");
        assert!(err.to_string().contains(words), "{err}");
    }
    // Stripe gives an invalid value no code: the type and the param say what is wrong.
    let mut usd = transfer("acct_ok", 100, Some(&charge), "k-e5");
    usd.currency = "usd".into();
    let err = gw.create_transfer(&usd).await.unwrap_err();
    assert_eq!(terminal_code(&err), "");
    let GatewayError::Terminal { param, .. } = &err else {
        unreachable!()
    };
    assert_eq!(
        (param.as_deref(), err.error_type()),
        (Some("currency"), Some("invalid_request_error"))
    );

    let gone = sim.base_url() + "v1/accounts/acct_gone";
    let deleted = reqwest::Client::new()
        .delete(gone)
        .bearer_auth(TEST_KEY)
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());
    let err = gw
        .create_transfer(&transfer("acct_gone", 100, None, "k-e6"))
        .await
        .unwrap_err();
    assert_eq!(terminal_code(&err), "account_invalid");

    // Without a source transaction the platform's *available* balance must cover it: retryable until it does.
    let short = gateway_with(&sim, |c| c.attempts_max = 2);
    let err = short
        .create_transfer(&transfer("acct_ok", 500, None, "k-nosrc"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.class(), err.code()),
        (ErrorClass::Retryable, Some("balance_insufficient"))
    );
    control.top_up("aud", 1_000).await.unwrap();
    gw.create_transfer(&transfer("acct_ok", 500, None, "k-nosrc-2"))
        .await
        .unwrap();

    let listed = gw.list_transfers("spay_group1").await.unwrap();
    let amounts: Vec<i64> = listed.iter().map(|t| t.amount_cents).collect();
    assert_eq!(
        amounts,
        vec![500, 4_000, 6_000],
        "newest first, only successful transfers"
    );
}

#[tokio::test]
async fn listing_a_transfer_group_pages_through_everything() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    control.create_account("acct_ok", true).await.unwrap();
    let charge = paid_charge(&gw, 50_000, "k-pay").await;
    for i in 0..230 {
        gw.create_transfer(&transfer("acct_ok", 100, Some(&charge), &format!("k-many-{i}")))
            .await
            .unwrap();
    }
    let mut other = transfer("acct_ok", 100, Some(&charge), "k-other-group");
    other.transfer_group = "spay_other".into();
    gw.create_transfer(&other).await.unwrap();
    let listed = gw.list_transfers("spay_group1").await.unwrap();
    assert_eq!(listed.len(), 230, "three pages of 100");
    let mut ids: Vec<&str> = listed.iter().map(|t| t.id.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 230, "no transfer listed twice across pages");
}

#[tokio::test]
async fn the_same_key_makes_one_transfer_and_other_parameters_are_refused() {
    let (_sim, _control, gw, charge) = ready_to_transfer().await;
    let first = gw
        .create_transfer(&transfer("acct_ok", 1_000, Some(&charge), "k-same"))
        .await
        .unwrap();
    let second = gw
        .create_transfer(&transfer("acct_ok", 1_000, Some(&charge), "k-same"))
        .await
        .unwrap();
    assert_eq!(first, second, "Stripe replays the saved response");
    assert_eq!(gw.list_transfers("spay_group1").await.unwrap().len(), 1);

    let err = gw
        .create_transfer(&transfer("acct_ok", 1_001, Some(&charge), "k-same"))
        .await
        .unwrap_err();
    assert!(err.is_idempotency_misuse(), "{err}");
    // Stripe says so by the error's type; it sends no code with it.
    assert_eq!(
        (err.class(), err.error_type(), err.code()),
        (ErrorClass::Terminal, Some("idempotency_error"), None)
    );
    assert_eq!(gw.list_transfers("spay_group1").await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_saved_error_is_replayed_until_a_new_generation_key() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    control.create_account("acct_fixme", false).await.unwrap();
    let charge = paid_charge(&gw, 10_000, "k-pay").await;
    let gen1 = transfer("acct_fixme", 1_000, Some(&charge), "splitpay:alloc:salc_1:transfer:1");
    assert_eq!(
        terminal_code(&gw.create_transfer(&gen1).await.unwrap_err()),
        "insufficient_capabilities_for_transfer"
    );
    control.set_transfers_capability("acct_fixme", "active").await.unwrap();
    // The account is fixed, but the same key replays the saved error (for 24 h) …
    assert_eq!(
        terminal_code(&gw.create_transfer(&gen1).await.unwrap_err()),
        "insufficient_capabilities_for_transfer"
    );
    // … so an operator's retry uses the next generation's key.
    let gen2 = transfer("acct_fixme", 1_000, Some(&charge), "splitpay:alloc:salc_1:transfer:2");
    gw.create_transfer(&gen2).await.unwrap();
    assert_eq!(gw.list_transfers("spay_group1").await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_lost_response_then_a_retry_with_the_same_key_returns_the_original_transfer() {
    let (_sim, control, gw, charge) = ready_to_transfer().await;
    control.fault(transfer_fault(FaultKind::LoseResponse, 1)).await.unwrap();
    let params = transfer("acct_ok", 2_500, Some(&charge), "k-lost");
    let err = gw.create_transfer(&params).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Unknown, "{err}");
    let listed = gw.list_transfers("spay_group1").await.unwrap();
    assert_eq!(
        listed.len(),
        1,
        "the request was applied although its response was lost"
    );
    let retried = gw.create_transfer(&params).await.unwrap();
    assert_eq!(retried.id, listed[0].id);
    assert_eq!(gw.list_transfers("spay_group1").await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_dropped_connection_is_unknown_and_the_retry_applies_once() {
    let (_sim, control, gw, charge) = ready_to_transfer().await;
    control
        .fault(Fault {
            kind: FaultKind::DropConnection,
            count: 1,
            path_contains: Some("/v1/transfers".into()),
            method: None,
        })
        .await
        .unwrap();
    let params = transfer("acct_ok", 2_500, Some(&charge), "k-drop");
    assert_eq!(
        gw.create_transfer(&params).await.unwrap_err().class(),
        ErrorClass::Unknown
    );
    assert!(
        gw.list_transfers("spay_group1").await.unwrap().is_empty(),
        "dropped before it was applied"
    );
    gw.create_transfer(&params).await.unwrap();
    gw.create_transfer(&params).await.unwrap();
    assert_eq!(gw.list_transfers("spay_group1").await.unwrap().len(), 1);
}

#[tokio::test]
async fn rate_limited_then_success_with_the_same_key() {
    let (sim, control, gw, charge) = ready_to_transfer().await;
    control.fault(transfer_fault(FaultKind::RateLimit, 2)).await.unwrap();
    let t = gw
        .create_transfer(&transfer("acct_ok", 700, Some(&charge), "k-429"))
        .await
        .unwrap();
    assert_eq!(t.amount_cents, 700);
    let posts = control.request_times_ms("/v1/transfers").await.unwrap();
    assert_eq!(posts.len(), 3, "two 429s, then the success");
    assert_eq!(gw.list_transfers("spay_group1").await.unwrap().len(), 1);

    // When Stripe keeps throttling, the gateway gives up after its bounded attempts, still retryable.
    let few = gateway_with(&sim, |c| c.attempts_max = 3);
    control
        .fault(Fault {
            kind: FaultKind::RateLimit,
            count: 10,
            path_contains: None,
            method: None,
        })
        .await
        .unwrap();
    let err = few.retrieve_account("acct_ok").await.unwrap_err();
    assert_eq!((err.class(), err.code()), (ErrorClass::Retryable, Some("rate_limit")));
}

#[tokio::test]
async fn a_500_is_unknown_and_replayed_for_its_key() {
    let (_sim, control, gw, charge) = ready_to_transfer().await;
    control.fault(transfer_fault(FaultKind::ServerError, 1)).await.unwrap();
    let params = transfer("acct_ok", 900, Some(&charge), "k-500");
    assert_eq!(
        gw.create_transfer(&params).await.unwrap_err().class(),
        ErrorClass::Unknown
    );
    // Stripe saved the 500 for this key: the same key replays it; the caller must look the transfer up.
    assert_eq!(
        gw.create_transfer(&params).await.unwrap_err().class(),
        ErrorClass::Unknown
    );
    assert!(gw.list_transfers("spay_group1").await.unwrap().is_empty());
}

#[tokio::test]
async fn a_key_in_flight_gets_409_and_is_retried() {
    let (sim, control) = simulator().await;
    control.create_account("acct_ok", true).await.unwrap();
    let charge = paid_charge(&gateway(&sim), 10_000, "k-pay").await;
    control.set_latency(0, 0, 400).await.unwrap();
    let once = gateway_with(&sim, |c| c.attempts_max = 1);
    let params = transfer("acct_ok", 300, Some(&charge), "k-race");
    let (a, b) = tokio::join!(once.create_transfer(&params), async {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        once.create_transfer(&params).await
    });
    let first = a.unwrap();
    let err = b.unwrap_err();
    assert_eq!(
        (err.class(), err.code()),
        (ErrorClass::Retryable, Some("idempotency_key_in_use"))
    );
    // With retries the second caller waits its turn and gets the same transfer.
    let patient = gateway_with(&sim, |c| {
        c.backoff_base_ms = 200;
        c.backoff_cap_ms = 400;
        c.attempts_max = 8;
    });
    let params = transfer("acct_ok", 301, Some(&charge), "k-race-2");
    let (a, b) = tokio::join!(patient.create_transfer(&params), async {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        patient.create_transfer(&params).await
    });
    assert_eq!(a.unwrap().id, b.unwrap().id);
    assert_eq!(first.amount_cents, 300);
    assert_eq!(gateway(&sim).list_transfers("spay_group1").await.unwrap().len(), 2);
}

#[tokio::test]
async fn idempotency_keys_expire_after_their_ttl() {
    let (sim, control) = simulator().await;
    control
        .set_config(&SimConfig {
            idempotency_ttl_secs: 60,
            ..SimConfig::default()
        })
        .await
        .unwrap();
    let gw = gateway(&sim);
    control.create_account("acct_ok", true).await.unwrap();
    let charge = paid_charge(&gw, 10_000, "k-pay").await;
    let params = transfer("acct_ok", 100, Some(&charge), "k-ttl");
    gw.create_transfer(&params).await.unwrap();
    control.advance_clock(61).await.unwrap();
    gw.create_transfer(&params).await.unwrap();
    assert_eq!(
        gw.list_transfers("spay_group1").await.unwrap().len(),
        2,
        "after expiry the same key runs as a new request: why an old unknown outcome is looked up first"
    );
}

#[tokio::test]
async fn reversals_partial_full_and_already_reversed() {
    let (_sim, _control, gw, charge) = ready_to_transfer().await;
    let t = gw
        .create_transfer(&transfer("acct_ok", 1_000, Some(&charge), "k-t"))
        .await
        .unwrap();
    assert_eq!(
        gw.reverse_transfer(&t.id, Some(300), "k-r1").await.unwrap(),
        match gw.reverse_transfer(&t.id, Some(300), "k-r1").await.unwrap() {
            r @ ReversalOutcome::Reversed { amount_cents: 300, .. } => r,
            other => panic!("{other:?}"),
        },
        "the same key replays the same reversal"
    );
    let err = gw.reverse_transfer(&t.id, Some(701), "k-r2").await.unwrap_err();
    assert_eq!(terminal_code(&err), "amount_too_large");
    assert!(matches!(
        gw.reverse_transfer(&t.id, None, "k-r3").await.unwrap(),
        ReversalOutcome::Reversed { amount_cents: 700, .. }
    ));
    assert_eq!(
        gw.reverse_transfer(&t.id, None, "k-r4").await.unwrap(),
        ReversalOutcome::AlreadyFullyReversed
    );
    let listed = gw.list_transfers("spay_group1").await.unwrap();
    assert_eq!((listed[0].amount_reversed_cents, listed[0].reversed), (1_000, true));
}

#[tokio::test]
async fn refunds_partial_and_never_above_what_is_refundable() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    // Refunds are paid from the platform's available balance; the card payment's own funds are still pending.
    control.top_up("aud", 5_000).await.unwrap();
    let pi = gw
        .create_payment_intent(&intent(5_000, PaymentMethodType::Card, Some("pm_card_visa"), "k-pay"))
        .await
        .unwrap();
    let charge = pi.latest_charge.clone().unwrap();
    let refund = |target, amount, key: &str| CreateRefundParams {
        target,
        amount_cents: amount,
        reason: None,
        metadata: BTreeMap::new(),
        idempotency_key: key.into(),
    };
    let r1 = gw
        .create_refund(&refund(
            RefundTarget::PaymentIntent(pi.id.clone()),
            Some(1_200),
            "k-re1",
        ))
        .await
        .unwrap();
    assert_eq!(
        (r1.amount_cents, r1.charge.as_deref(), r1.payment_intent.as_deref()),
        (1_200, Some(charge.as_str()), Some(pi.id.as_str()))
    );
    let too_much = gw
        .create_refund(&refund(RefundTarget::Charge(charge.clone()), Some(3_801), "k-re2"))
        .await
        .unwrap_err();
    assert_eq!(terminal_code(&too_much), "amount_too_large");
    let rest = gw
        .create_refund(&refund(RefundTarget::Charge(charge.clone()), None, "k-re3"))
        .await
        .unwrap();
    assert_eq!(rest.amount_cents, 3_800);
    let again = gw
        .create_refund(&refund(RefundTarget::Charge(charge.clone()), None, "k-re4"))
        .await
        .unwrap_err();
    assert_eq!(terminal_code(&again), "charge_already_refunded");
    assert_eq!(gw.retrieve_charge(&charge).await.unwrap().amount_refunded_cents, 5_000);
}

#[tokio::test]
async fn accounts_report_their_transfers_capability() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    control.create_account("acct_a", true).await.unwrap();
    control.create_account("acct_b", false).await.unwrap();
    assert!(gw.retrieve_account("acct_a").await.unwrap().can_receive_transfers());
    let b = gw.retrieve_account("acct_b").await.unwrap();
    assert_eq!(
        (b.transfers_capability.as_deref(), b.can_receive_transfers()),
        (Some("inactive"), false)
    );
    assert_eq!(
        gw.retrieve_account("acct_none").await.unwrap_err().class(),
        ErrorClass::Config,
        "403: no access"
    );
}

/// The limiter's guarantee is `burst + rate × T` requests over any window `T`. Measured at the simulator (arrival
/// times, so network jitter on loopback is included): over any 1 s window at most burst + rate + 1 arrivals (the
/// +1 absorbs scheduling jitter at the window's edge), and the whole burst takes at least (n - burst) / rate.
#[tokio::test]
async fn the_rate_limiter_holds_its_budget_over_a_burst() {
    let (sim, control) = simulator().await;
    control.create_account("acct_ok", true).await.unwrap();
    let (rate, burst, n) = (20u64, 2u64, 50u64);
    let gw = std::sync::Arc::new(gateway_with(&sim, |c| {
        c.rate_per_sec = Some(rate as u32);
        c.burst = burst as u32;
    }));
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let gw = gw.clone();
            tokio::spawn(async move { gw.retrieve_account("acct_ok").await.unwrap() })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
    let mut times = control.request_times_ms("/v1/accounts/acct_ok").await.unwrap();
    times.sort();
    assert_eq!(times.len() as u64, n);
    let span_ms = times.last().unwrap() - times.first().unwrap();
    let min_span_ms = (n - burst) * 1_000 / rate;
    assert!(
        span_ms + 50 >= min_span_ms,
        "{n} requests took {span_ms} ms; the budget needs at least {min_span_ms} ms"
    );
    let busiest = times
        .iter()
        .map(|&start| times.iter().filter(|&&t| t >= start && t < start + 1_000).count())
        .max()
        .unwrap();
    println!(
        "rate limiter: {n} requests in {span_ms} ms, busiest 1 s window {busiest} (budget {})",
        burst + rate
    );
    assert!(
        busiest as u64 <= burst + rate + 1,
        "busiest 1 s window had {busiest} requests"
    );
}

#[tokio::test]
async fn events_are_signed_listed_and_delivered_with_modes() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    let receiver = Receiver::start().await;
    control.add_webhook(&receiver.url, "whsec_sim_test").await.unwrap();

    gw.create_payment_intent(&intent(1_000, PaymentMethodType::Card, Some("pm_card_visa"), "k-e1"))
        .await
        .unwrap();
    let mut types = receiver.wait_for("three events", |t| t.len() >= 3).await;
    // Each event is delivered on its own, as Stripe does: their order is not guaranteed.
    types.sort();
    assert_eq!(
        types,
        vec!["charge.succeeded", "payment_intent.created", "payment_intent.succeeded"]
    );
    let secret = [Secret::new("whsec_sim_test")];
    for (signature, body) in receiver.received.lock().unwrap().iter() {
        verify_signature(
            body.as_bytes(),
            signature.as_deref(),
            &secret,
            chrono::Utc::now().timestamp(),
        )
        .unwrap();
        // async-stripe's webhook parser accepts the simulator's events.
        let event = stripe_webhook::Webhook::construct_event(body, signature.as_deref().unwrap(), "whsec_sim_test");
        assert!(event.is_ok(), "async-stripe could not parse: {body}");
    }

    // Duplicates: every event twice.
    receiver.received.lock().unwrap().clear();
    control
        .webhook_mode(serde_json::json!({ "duplicate": true }))
        .await
        .unwrap();
    let pi = gw
        .create_payment_intent(&intent(1_000, PaymentMethodType::Card, None, "k-e2"))
        .await
        .unwrap();
    let types = receiver.wait_for("a duplicated event", |t| t.len() >= 2).await;
    assert_eq!(types, vec!["payment_intent.created", "payment_intent.created"]);

    // Drops: the next event never arrives.
    receiver.received.lock().unwrap().clear();
    control
        .webhook_mode(serde_json::json!({ "duplicate": false, "drop_next": 1 }))
        .await
        .unwrap();
    gw.cancel_payment_intent(&pi.id, None, "k-e3").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert!(receiver.types().is_empty(), "dropped: {:?}", receiver.types());

    // Reordering: held events are released newest first.
    control.webhook_mode(serde_json::json!({ "hold": true })).await.unwrap();
    let becs = gw
        .create_payment_intent(&intent(
            2_000,
            PaymentMethodType::AuBecsDebit,
            Some("pm_becs_000123456"),
            "k-e4",
        ))
        .await
        .unwrap();
    control.settle(&becs.id, None).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    control
        .webhook_mode(serde_json::json!({ "hold": false }))
        .await
        .unwrap();
    assert_eq!(control.flush_webhooks().await.unwrap(), 5);
    let types = receiver.wait_for("the held events", |t| t.len() >= 5).await;
    assert_eq!(
        types,
        vec![
            "payment_intent.succeeded",
            "charge.succeeded",
            "payment_intent.processing",
            "charge.pending",
            "payment_intent.created"
        ]
    );

    // Every event is listable, newest first.
    let listed: serde_json::Value = reqwest::Client::new()
        .get(format!("{}v1/events?limit=100", sim.base_url()))
        .bearer_auth(TEST_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let all: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(all.len(), 10);
    assert_eq!(all[0], "payment_intent.succeeded");
    assert!(all.iter().all(|t| !t.is_empty()));
}

#[tokio::test]
async fn requests_without_a_test_key_are_refused() {
    let (sim, _) = simulator().await;
    let client = reqwest::Client::new();
    let url = format!("{}v1/balance", sim.base_url());
    for auth in [None, Some("Bearer sk_live_nope"), Some("Basic abc")] {
        let mut req = client.get(&url);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let response = req.send().await.unwrap();
        assert_eq!(response.status(), 401, "{auth:?}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
}

/// Raw HTTP against the simulator, for what the gateway does not expose (headers, endpoints splitpay never calls).
async fn raw_post(
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

async fn raw_get(sim: &splitpay::stripe::sim::SimServer, path: &str) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("{}v1/{path}", sim.base_url()))
        .bearer_auth(TEST_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn replays_say_so_and_validation_failures_are_not_saved() {
    let (sim, control) = simulator().await;
    control.create_account("acct_ok", true).await.unwrap();
    let charge = paid_charge(&gateway(&sim), 10_000, "k-pay").await;
    let body = format!("amount=100&currency=aud&destination=acct_ok&source_transaction={charge}");
    let first = raw_post(&sim, "transfers", &body, Some("k-raw")).await;
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: serde_json::Value = first.json().await.unwrap();
    let second = raw_post(&sim, "transfers", &body, Some("k-raw")).await;
    assert_eq!(second.headers().get("idempotent-replayed").unwrap(), "true");
    assert_eq!(second.json::<serde_json::Value>().await.unwrap()["id"], first["id"]);

    // A request that fails validation is not saved: the key can then carry a valid request.
    let invalid = raw_post(&sim, "transfers", "currency=aud&destination=acct_ok", Some("k-fixed")).await;
    assert_eq!(invalid.status(), 400);
    assert!(
        invalid.headers().get("stripe-should-retry").is_none(),
        "Stripe sends no Stripe-Should-Retry on an ordinary 400"
    );
    let body: serde_json::Value = invalid.json().await.unwrap();
    assert_eq!(body["error"]["param"], "amount");
    let valid = raw_post(
        &sim,
        "transfers",
        &format!("amount=100&currency=aud&destination=acct_ok&source_transaction={charge}"),
        Some("k-fixed"),
    )
    .await;
    assert_eq!(valid.status(), 200);
    let transfer: serde_json::Value = raw_get(&sim, &format!("transfers/{}", first["id"].as_str().unwrap())).await;
    assert_eq!(
        (transfer["amount"].as_i64(), transfer["destination"].as_str()),
        (Some(100), Some("acct_ok"))
    );
}

#[tokio::test]
async fn a_becs_success_can_be_disputed_later() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    let pi = gw
        .create_payment_intent(&intent(
            2_000,
            PaymentMethodType::AuBecsDebit,
            Some("pm_becs_666666660"),
            "k-d",
        ))
        .await
        .unwrap();
    control.settle(&pi.id, None).await.unwrap();
    assert_eq!(
        gw.retrieve_payment_intent(&pi.id).await.unwrap().status,
        IntentStatus::Succeeded
    );
    // As with real BECS, the dispute comes after the debit succeeded: a minute later on the simulator's clock.
    let none_yet = raw_get(&sim, "events?type=charge.dispute.created").await;
    assert_eq!(none_yet["data"].as_array().unwrap().len(), 0, "{none_yet}");
    control
        .advance_clock(SimConfig::default().becs_dispute_after_secs)
        .await
        .unwrap();
    let disputes = raw_get(&sim, "events?type=charge.dispute.created").await;
    let dispute = &disputes["data"][0]["data"]["object"];
    assert_eq!(
        (dispute["payment_intent"].as_str(), dispute["amount"].as_i64()),
        (Some(pi.id.as_str()), Some(2_000))
    );
}

#[tokio::test]
async fn the_platform_balance_is_pending_until_funds_are_available() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    paid_charge(&gw, 10_000, "k-pending").await;
    let fast = gw
        .create_payment_intent(&intent(
            1_000,
            PaymentMethodType::Card,
            Some("pm_card_bypassPending"),
            "k-fast",
        ))
        .await
        .unwrap();
    assert_eq!(fast.status, IntentStatus::Succeeded);
    let balance = raw_get(&sim, "balance").await;
    assert_eq!(
        balance["pending"][0]["amount"], 9_795,
        "10,000 less 205 in fees, not yet available"
    );
    assert_eq!(
        balance["available"][0]["amount"], 952,
        "1,000 less 48, available at once"
    );
    control.advance_clock(2 * 86_400).await.unwrap();
    let balance = raw_get(&sim, "balance").await;
    assert_eq!(
        (
            balance["available"][0]["amount"].as_i64(),
            balance["pending"][0]["amount"].as_i64()
        ),
        (Some(10_747), Some(0))
    );
}

#[tokio::test]
async fn a_slow_stripe_is_a_timeout_with_an_unknown_outcome() {
    let (sim, control) = simulator().await;
    control.create_account("acct_ok", true).await.unwrap();
    let charge = paid_charge(&gateway(&sim), 10_000, "k-pay").await;
    control.set_latency(400, 400, 0).await.unwrap();
    let impatient = gateway_with(&sim, |c| c.timeout_ms = 100);
    let err = impatient
        .create_transfer(&transfer("acct_ok", 100, Some(&charge), "k-slow"))
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Unknown, "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
}

#[tokio::test]
async fn accounts_are_created_with_the_transfers_capability_and_deleted() {
    let (sim, _) = simulator().await;
    let gw = gateway(&sim);
    let created = raw_post(
        &sim,
        "accounts",
        "type=custom&country=AU&capabilities[transfers][requested]=true",
        None,
    )
    .await;
    let account: serde_json::Value = created.json().await.unwrap();
    let id = account["id"].as_str().unwrap();
    assert!(gw.retrieve_account(id).await.unwrap().can_receive_transfers());
    let deleted = reqwest::Client::new()
        .delete(format!("{}v1/accounts/{id}", sim.base_url()))
        .bearer_auth(TEST_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.json::<serde_json::Value>().await.unwrap()["deleted"], true);
    assert!(gw.retrieve_account(id).await.is_err());
}

#[tokio::test]
async fn the_key_never_shows_in_debug_output_or_errors() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    assert!(!format!("{gw:?}").contains(TEST_KEY), "{gw:?}");
    control
        .fault(Fault {
            kind: FaultKind::ServerError,
            count: 1,
            path_contains: None,
            method: None,
        })
        .await
        .unwrap();
    let err = gw.retrieve_account("acct_x").await.unwrap_err();
    assert!(!format!("{err:?} {err}").contains(TEST_KEY));
}

#[tokio::test]
async fn stripe_should_retry_is_sent_only_where_stripe_sends_it_and_a_replay_keeps_the_first_headers() {
    let (sim, control) = simulator().await;
    control.create_account("acct_ok", true).await.unwrap();
    // A decline (402) and a missing object (404): no header; the classifier decides on status and code.
    let declined = raw_post(
        &sim,
        "payment_intents",
        "amount=1000&currency=aud&payment_method=pm_card_chargeDeclined&confirm=true",
        Some("k-402"),
    )
    .await;
    assert_eq!(declined.status(), 402);
    assert!(declined.headers().get("stripe-should-retry").is_none());
    let first_request = declined.headers()["request-id"].to_str().unwrap().to_owned();
    assert_eq!(declined.headers()["original-request"].to_str().unwrap(), first_request);
    let first_body: serde_json::Value = declined.json().await.unwrap();
    let replay = raw_post(
        &sim,
        "payment_intents",
        "amount=1000&currency=aud&payment_method=pm_card_chargeDeclined&confirm=true",
        Some("k-402"),
    )
    .await;
    assert_eq!(replay.status(), 402);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert!(replay.headers().get("stripe-should-retry").is_none());
    assert_eq!(replay.headers()["original-request"].to_str().unwrap(), first_request);
    assert_ne!(replay.headers()["request-id"].to_str().unwrap(), first_request);
    assert_eq!(replay.json::<serde_json::Value>().await.unwrap(), first_body);
    let missing = raw_post(&sim, "transfers/tr_missing/reversals", "", Some("k-404")).await;
    assert_eq!(missing.status(), 404);
    assert!(missing.headers().get("stripe-should-retry").is_none());

    // A key in flight: 409 with Stripe-Should-Retry: true.
    let charge = paid_charge(&gateway(&sim), 10_000, "k-pay").await;
    control.set_latency(0, 0, 400).await.unwrap();
    let body = format!("amount=100&currency=aud&destination=acct_ok&source_transaction={charge}");
    let (first, second) = tokio::join!(raw_post(&sim, "transfers", &body, Some("k-409")), async {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        raw_post(&sim, "transfers", &body, Some("k-409")).await
    });
    assert_eq!(first.status(), 200);
    assert_eq!(second.status(), 409);
    assert_eq!(second.headers()["stripe-should-retry"], "true");
    control.set_latency(0, 0, 0).await.unwrap();

    // Throttled: a 429 with no header is still retried (and a header saying false would not park it either).
    control
        .fault(Fault {
            kind: FaultKind::RateLimit,
            count: 1,
            path_contains: Some("/v1/balance".into()),
            method: None,
        })
        .await
        .unwrap();
    let throttled = reqwest::Client::new()
        .get(format!("{}v1/balance", sim.base_url()))
        .bearer_auth(TEST_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(throttled.status(), 429);
    assert!(throttled.headers().get("stripe-should-retry").is_none());
    assert_eq!(
        splitpay::stripe::error::classify(429, None, Some("rate_limit")),
        ErrorClass::Retryable
    );

    // A key reused with other parameters: type idempotency_error, no code, no header.
    let misuse = raw_post(
        &sim,
        "transfers",
        &format!("amount=101&currency=aud&destination=acct_ok&source_transaction={charge}"),
        Some("k-409"),
    )
    .await;
    assert_eq!(misuse.status(), 400);
    assert!(misuse.headers().get("stripe-should-retry").is_none());
    let misuse: serde_json::Value = misuse.json().await.unwrap();
    assert_eq!(misuse["error"]["type"], "idempotency_error");
    assert!(misuse["error"].get("code").is_none(), "{misuse}");
}

#[tokio::test]
async fn a_declined_intent_loses_its_payment_method_and_a_new_card_pays_it() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    let receiver = Receiver::start().await;
    control.add_webhook(&receiver.url, "whsec_sim_test").await.unwrap();
    let err = gw
        .create_payment_intent(&intent(
            2_500,
            PaymentMethodType::Card,
            Some("pm_card_chargeDeclined"),
            "k-donor",
        ))
        .await
        .unwrap_err();
    let GatewayError::Terminal {
        payment_intent: Some(pi_id),
        ..
    } = &err
    else {
        panic!("a decline names its PaymentIntent: {err}");
    };
    let declined = gw.retrieve_payment_intent(pi_id).await.unwrap();
    assert_eq!(
        (declined.status, declined.payment_method.as_deref()),
        (IntentStatus::RequiresPaymentMethod, None),
        "Stripe detaches a declined PaymentMethod"
    );
    assert_eq!(
        declined.last_payment_error.unwrap().code.as_deref(),
        Some("card_declined")
    );

    // Confirming again without a new PaymentMethod is refused, not a replay of the decline.
    let bare = raw_post(&sim, &format!("payment_intents/{pi_id}/confirm"), "", Some("k-bare")).await;
    assert_eq!(bare.status(), 400);
    let bare: serde_json::Value = bare.json().await.unwrap();
    assert_eq!(bare["error"]["code"], "payment_intent_unexpected_state");
    assert_eq!(bare["error"]["type"], "invalid_request_error");

    // The donor tries another card on the same PaymentIntent: it succeeds.
    let paid = gw
        .confirm_payment_intent(pi_id, "pm_card_visa", "k-donor-retry")
        .await
        .unwrap();
    assert_eq!(
        (paid.status, paid.payment_method.as_deref()),
        (IntentStatus::Succeeded, Some("pm_card_visa"))
    );
    assert!(paid.latest_charge.is_some());
    let types = receiver
        .wait_for("the decline then the success", |t| {
            t.contains(&"payment_intent.payment_failed".to_owned())
                && t.contains(&"payment_intent.succeeded".to_owned())
        })
        .await;
    assert_eq!(
        types.iter().filter(|t| t.as_str() == "payment_intent.created").count(),
        1,
        "one PaymentIntent: {types:?}"
    );
}

#[tokio::test]
async fn succeeded_and_processing_intents_cannot_be_canceled_and_reasons_are_stripes() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    let paid = gw
        .create_payment_intent(&intent(1_000, PaymentMethodType::Card, Some("pm_card_visa"), "k-paid"))
        .await
        .unwrap();
    let becs = gw
        .create_payment_intent(&intent(
            1_000,
            PaymentMethodType::AuBecsDebit,
            Some("pm_becs_000123456"),
            "k-becs",
        ))
        .await
        .unwrap();
    assert_eq!(becs.status, IntentStatus::Processing);
    for (id, key) in [(&paid.id, "k-c1"), (&becs.id, "k-c2")] {
        let err = gw
            .cancel_payment_intent(id, Some(CancellationReason::RequestedByCustomer), key)
            .await
            .unwrap_err();
        assert_eq!(terminal_code(&err), "payment_intent_unexpected_state");
        assert_eq!(gw.retrieve_payment_intent(id).await.unwrap().cancellation_reason, None);
    }
    // A reason Stripe does not know is refused, naming the parameter; the intent stays open.
    let open = gw
        .create_payment_intent(&intent(1_000, PaymentMethodType::Card, None, "k-open"))
        .await
        .unwrap();
    let bogus = raw_post(
        &sim,
        &format!("payment_intents/{}/cancel", open.id),
        "cancellation_reason=bored",
        Some("k-bogus"),
    )
    .await;
    assert_eq!(bogus.status(), 400);
    let bogus: serde_json::Value = bogus.json().await.unwrap();
    assert_eq!(
        (bogus["error"]["type"].as_str(), bogus["error"]["param"].as_str()),
        (Some("invalid_request_error"), Some("cancellation_reason"))
    );
    let still = gw.retrieve_payment_intent(&open.id).await.unwrap();
    assert_eq!(still.status, IntentStatus::RequiresPaymentMethod);
    let canceled = gw
        .cancel_payment_intent(&open.id, Some(CancellationReason::RequestedByCustomer), "k-c3")
        .await
        .unwrap();
    assert_eq!(canceled.cancellation_reason.as_deref(), Some("requested_by_customer"));
    let raw = raw_get(&sim, &format!("payment_intents/{}", open.id)).await;
    assert!(raw["canceled_at"].as_i64().is_some());
    drop(control);
}

/// Events of the simulator, newest first.
async fn event_count(sim: &splitpay::stripe::sim::SimServer) -> usize {
    raw_get(sim, "events?limit=100").await["data"].as_array().unwrap().len()
}

#[tokio::test]
async fn validation_errors_carry_stripes_codes_and_leave_nothing_behind() {
    let (sim, control) = simulator().await;
    control.create_account("acct_ok", true).await.unwrap();
    let charge = paid_charge(&gateway(&sim), 10_000, "k-pay").await;
    let events_before = event_count(&sim).await;
    let transfers_before = raw_get(&sim, "transfers?limit=100").await["data"]
        .as_array()
        .unwrap()
        .len();
    let long_key = "k".repeat(41);
    let long_value = "v".repeat(501);
    let fifty_one: String = (0..51).map(|i| format!("&metadata[k{i}]=v")).collect();
    let cases: Vec<(&str, String, Option<&str>, &str)> = vec![
        (
            "payment_intents",
            "currency=aud".into(),
            Some("parameter_missing"),
            "amount",
        ),
        (
            "payment_intents",
            "amount=12.5&currency=aud".into(),
            Some("parameter_invalid_integer"),
            "amount",
        ),
        (
            "payment_intents",
            "amount=1000&currency=".into(),
            Some("parameter_invalid_empty"),
            "currency",
        ),
        (
            "payment_intents",
            "amount=1000&currency=aud&colour=red".into(),
            Some("parameter_unknown"),
            "colour",
        ),
        (
            "payment_intents",
            "amount=1000&currency=aud&confirm=true".into(),
            Some("parameter_missing"),
            "payment_method",
        ),
        (
            "payment_intents",
            "amount=1000&currency=aud&confirm=true&payment_method=pm_nobody_knows".into(),
            Some("resource_missing"),
            "payment_method",
        ),
        (
            "payment_intents",
            "amount=1000&currency=aud&allowed_payment_method_types[0]=au_becs_debit&confirm=true\
             &payment_method_data[type]=au_becs_debit&payment_method_data[au_becs_debit][account_number]=000123456"
                .into(),
            Some("parameter_missing"),
            "payment_method_data[au_becs_debit][bsb_number]",
        ),
        (
            "payment_intents",
            "amount=1000&currency=aud&allowed_payment_method_types[0]=au_becs_debit&confirm=true\
             &payment_method_data[type]=au_becs_debit&payment_method_data[au_becs_debit][bsb_number]=000000"
                .into(),
            Some("parameter_missing"),
            "payment_method_data[au_becs_debit][account_number]",
        ),
        (
            "payment_intents",
            format!("amount=1000&currency=aud&metadata[{long_key}]=v"),
            None,
            "metadata",
        ),
        (
            "transfers",
            format!("amount=100&currency=aud&destination=acct_ok&source_transaction={charge}&metadata[k]={long_value}"),
            None,
            "metadata[k]",
        ),
        (
            "transfers",
            format!("amount=100&currency=aud&destination=acct_ok&source_transaction={charge}{fifty_one}"),
            None,
            "metadata",
        ),
        (
            "transfers",
            "amount=100&currency=aud&destination=acct_ok&reverse=true".into(),
            Some("parameter_unknown"),
            "reverse",
        ),
        (
            "refunds",
            format!("charge={charge}&reason=changed_mind"),
            None,
            "reason",
        ),
    ];
    for (path, body, code, param) in &cases {
        let response = raw_post(&sim, path, body, Some(&format!("k-{path}-{param}-{}", body.len()))).await;
        assert_eq!(response.status(), 400, "{path} {body}");
        let error = response.json::<serde_json::Value>().await.unwrap()["error"].clone();
        assert_eq!(error["type"], "invalid_request_error", "{body}: {error}");
        assert_eq!(error["code"].as_str(), *code, "{body}: {error}");
        assert!(
            error["param"].as_str().is_some_and(|p| p.starts_with(param)),
            "{body}: {error}"
        );
    }
    assert_eq!(event_count(&sim).await, events_before, "a refused create emits nothing");
    assert_eq!(
        raw_get(&sim, "transfers?limit=100").await["data"]
            .as_array()
            .unwrap()
            .len(),
        transfers_before
    );
    // The metadata limits are inclusive.
    let at_limits = format!(
        "amount=1000&currency=aud&metadata[{}]={}",
        "k".repeat(40),
        "v".repeat(500)
    );
    assert_eq!(raw_post(&sim, "payment_intents", &at_limits, None).await.status(), 200);
    // A BECS debit given as payment_method_data with its BSB and account number is accepted.
    let becs = raw_post(
        &sim,
        "payment_intents",
        "amount=1000&currency=aud&allowed_payment_method_types[0]=au_becs_debit&confirm=true\
         &payment_method_data[type]=au_becs_debit&payment_method_data[au_becs_debit][bsb_number]=000000\
         &payment_method_data[au_becs_debit][account_number]=000123456",
        None,
    )
    .await;
    assert_eq!(becs.json::<serde_json::Value>().await.unwrap()["status"], "processing");
}

#[tokio::test]
async fn transfers_name_their_destination_payment() {
    let (sim, _control, gw, charge) = ready_to_transfer().await;
    let t = gw
        .create_transfer(&transfer("acct_ok", 1_000, Some(&charge), "k-py"))
        .await
        .unwrap();
    let raw = raw_get(&sim, &format!("transfers/{}", t.id)).await;
    assert!(
        raw["destination_payment"]
            .as_str()
            .is_some_and(|p| p.starts_with("py_")),
        "{raw}"
    );
}

#[tokio::test]
async fn ending_before_pages_backwards() {
    let (sim, _control, gw, charge) = ready_to_transfer().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let t = gw
            .create_transfer(&transfer("acct_ok", 100 + i, Some(&charge), &format!("k-page-{i}")))
            .await
            .unwrap();
        ids.push(t.id);
    }
    ids.reverse(); // newest first, as Stripe lists
    let page = |v: serde_json::Value| -> (Vec<String>, bool) {
        (
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["id"].as_str().unwrap().to_owned())
                .collect(),
            v["has_more"].as_bool().unwrap(),
        )
    };
    // Forwards from the newest: two pages of two.
    assert_eq!(
        page(raw_get(&sim, "transfers?limit=2").await),
        (ids[0..2].to_vec(), true)
    );
    assert_eq!(
        page(raw_get(&sim, &format!("transfers?limit=2&starting_after={}", ids[1])).await),
        (ids[2..4].to_vec(), true)
    );
    // Backwards from the oldest: the two just newer than it, still newest first, more before them.
    assert_eq!(
        page(raw_get(&sim, &format!("transfers?limit=2&ending_before={}", ids[4])).await),
        (ids[2..4].to_vec(), true)
    );
    assert_eq!(
        page(raw_get(&sim, &format!("transfers?limit=2&ending_before={}", ids[2])).await),
        (ids[0..2].to_vec(), false)
    );
    assert_eq!(
        page(raw_get(&sim, &format!("transfers?limit=10&ending_before={}", ids[1])).await),
        (ids[0..1].to_vec(), false)
    );
    let events = raw_get(&sim, "events?limit=1").await;
    let newest = events["data"][0]["id"].as_str().unwrap().to_owned();
    let before_newest = raw_get(&sim, &format!("events?limit=3&ending_before={newest}")).await;
    assert_eq!(page(before_newest), (vec![], false));
}

/// Waits (bounded) until the simulator's webhook counters satisfy `predicate`.
async fn wait_for_stats(
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

#[tokio::test]
async fn a_failed_delivery_is_retried_over_days_of_simulator_time_then_given_up() {
    use std::sync::atomic::Ordering;
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    let receiver = Receiver::start().await;
    control.add_webhook(&receiver.url, "whsec_sim_test").await.unwrap();

    // One refusal: the event waits for its first retry, a minute of simulator time later.
    receiver.fail_next.store(1, Ordering::SeqCst);
    gw.create_payment_intent(&intent(1_000, PaymentMethodType::Card, None, "k-r1"))
        .await
        .unwrap();
    let stats = wait_for_stats(&control, "the retry to be scheduled", |s| {
        s["pending_redeliveries"] == 1
    })
    .await;
    let due = stats["next_redelivery_at"].as_i64().unwrap();
    let now = sim.now();
    assert!(
        (now + REDELIVERY_DELAYS_SECS[0] - 5..=now + REDELIVERY_DELAYS_SECS[0]).contains(&due),
        "due {due}, now {now}"
    );
    // Advance to just before it is due (measured from the attempt, not from now).
    let before_due = due - now - 1;
    control.advance_clock(before_due).await.unwrap();
    let stats = control.webhook_stats().await.unwrap();
    assert_eq!(
        (stats["pending_redeliveries"].as_u64(), stats["delivered"].as_u64()),
        (Some(1), Some(0))
    );
    control.advance_clock(2).await.unwrap();
    assert_eq!(
        receiver.wait_for("the retried event", |t| !t.is_empty()).await,
        vec!["payment_intent.created"]
    );
    assert_eq!(receiver.refused.load(Ordering::SeqCst), 1);

    // An endpoint that keeps failing: retried on Stripe's backoff for days, then given up.
    receiver.received.lock().unwrap().clear();
    receiver.fail_next.store(u32::MAX, Ordering::SeqCst);
    gw.create_payment_intent(&intent(1_000, PaymentMethodType::Card, None, "k-r2"))
        .await
        .unwrap();
    let mut total = 0;
    for (retry, delay) in REDELIVERY_DELAYS_SECS.iter().enumerate() {
        let failed = retry as u64 + 2; // the first refusal above, then this event's attempts
        wait_for_stats(&control, "a failed attempt", |s| {
            s["failed_attempts"].as_u64() == Some(failed) && s["pending_redeliveries"] == 1
        })
        .await;
        control.advance_clock(*delay).await.unwrap();
        total += delay;
    }
    let stats = wait_for_stats(&control, "the delivery to be given up", |s| s["given_up"] == 1).await;
    assert_eq!(stats["pending_redeliveries"], 0);
    assert_eq!(
        receiver.refused.load(Ordering::SeqCst),
        1 + 1 + REDELIVERY_DELAYS_SECS.len() as u32
    );
    assert!((2 * 86_400..=3 * 86_400).contains(&total), "retried for {total} s");
    assert!(receiver.types().is_empty());
}

#[tokio::test]
async fn a_past_event_can_be_redelivered_after_newer_ones() {
    let (sim, control) = simulator().await;
    let gw = gateway(&sim);
    let receiver = Receiver::start().await;
    control.add_webhook(&receiver.url, "whsec_sim_test").await.unwrap();
    let becs = gw
        .create_payment_intent(&intent(
            2_000,
            PaymentMethodType::AuBecsDebit,
            Some("pm_becs_000123456"),
            "k-redeliver",
        ))
        .await
        .unwrap();
    control.settle(&becs.id, None).await.unwrap();
    receiver
        .wait_for("the succeeded event", |t| {
            t.contains(&"payment_intent.succeeded".to_owned())
        })
        .await;
    let processing = raw_get(&sim, "events?type=payment_intent.processing").await["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = receiver.types().len();
    control.redeliver(&processing).await.unwrap();
    let types = receiver.wait_for("the redelivery", |t| t.len() > before).await;
    assert_eq!(types.last().map(String::as_str), Some("payment_intent.processing"));
    let bodies = receiver.received.lock().unwrap().clone();
    let ids: Vec<String> = bodies
        .iter()
        .map(|(_, b)| {
            serde_json::from_str::<serde_json::Value>(b).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        ids.iter().filter(|id| **id == processing).count(),
        2,
        "the same event id, twice"
    );
}
