//! The Stripe gateway against the simulator over real HTTP: signed events and their delivery (modes, retries over
//! days of simulator time, redelivery), authentication and the secret key's secrecy, and the rate limiter.

mod common;

use common::sim_fixtures::*;
use common::stripe::{gateway, gateway_with, simulator, Receiver, TEST_KEY};
use splitpay::config::Secret;
use splitpay::domain::plan::PaymentMethodType;
use splitpay::stripe::sim::{Fault, FaultKind, REDELIVERY_DELAYS_SECS};
use splitpay::stripe::webhook::verify_signature;
use splitpay::stripe::*;

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
    let listed = raw_get(&sim, "events?limit=100").await;
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
async fn a_failed_delivery_is_retried_over_days_of_simulator_time_then_given_up() {
    use std::sync::atomic::Ordering;
    let (sim, control) = simulator().await;
    // Frozen: the test stands one second before a deadline, which the wall clock crossing a second must not pass.
    control.freeze_clock().await.unwrap();
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
