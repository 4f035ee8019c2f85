//! The Stripe gateway (async-stripe + our transport) against the simulator over real HTTP: payments by card, BECS and
//! PayTo, refunds and reversals, disputes, balances and connected accounts. Transfers, idempotency and faults are in
//! `gateway_keys.rs`; events, webhooks, authentication and the rate limiter in `gateway_events.rs`.

mod common;

use common::sim_fixtures::*;
use common::stripe::{gateway, simulator, Receiver, TEST_KEY};
use splitpay::domain::plan::PaymentMethodType;
use splitpay::stripe::error::ErrorClass;
use splitpay::stripe::sim::model::SimConfig;
use splitpay::stripe::*;
use std::collections::BTreeMap;

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
