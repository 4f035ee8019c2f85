//! The Stripe gateway against the simulator over real HTTP: transfers and their listing, idempotency as Stripe does
//! it (saved errors, replays, keys in flight, expiry), injected faults and timeouts, and validation errors.

mod common;

use common::sim_fixtures::*;
use common::stripe::{gateway, gateway_with, simulator, TEST_KEY};
use splitpay::stripe::error::ErrorClass;
use splitpay::stripe::sim::model::SimConfig;
use splitpay::stripe::sim::{Fault, FaultKind};
use splitpay::stripe::*;

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
