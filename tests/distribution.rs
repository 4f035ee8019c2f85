//! From payment to distribution, driven by the simulator's webhooks through splitpay's ingress and the real job
//! runner on PostgreSQL: card and BECS payments, declines and dishonours, parking, duplicate and reordered
//! webhooks, and Stripe faults during transfers. Every test checks states, amounts, transfers and events.

mod common;

use common::flow::{Flow, WEBHOOK_SECRET};
use splitpay::domain::ids::SplitPaymentId;
use splitpay::domain::plan::{AmountMode, PaymentMethodType};
use splitpay::domain::state::{AllocationStatus, DonationStatus, PaymentStatus};
use splitpay::store::donations::donations_for_payment;
use splitpay::store::money_report::money_report;
use splitpay::store::payments::SplitPayment;
use splitpay::stripe::sim::{Fault, FaultKind};
use splitpay::stripe::PaymentGateway;

fn all_settled(p: &SplitPayment) -> bool {
    p.allocations
        .iter()
        .all(|a| matches!(a.status, AllocationStatus::Transferred | AllocationStatus::Parked))
}

async fn types_about(flow: &Flow, subject: &str) -> Vec<String> {
    flow.events(subject)
        .await
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect()
}

/// The transfers Stripe holds for a payment, as (allocation id, amount).
async fn stripe_transfers(flow: &Flow, id: &SplitPaymentId) -> Vec<(String, i64)> {
    let mut t: Vec<(String, i64)> = flow
        .gateway
        .list_transfers(id.as_str())
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.metadata["split_allocation_id"].clone(), t.amount_cents))
        .collect();
    t.sort();
    t
}

/// Conserved against Stripe: the simulator's transfers and charge, not our rows alone.
async fn assert_conserved(flow: &Flow, id: &SplitPaymentId) {
    common::money::assert_conserved_at_stripe(flow, id).await;
}

#[tokio::test]
async fn a_fixed_set_of_three_paid_by_card_becomes_three_transfers() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_500, 1_500], &[]).await;
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    let p = flow
        .wait_until(&id, "three transfers", |p| {
            p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
        })
        .await;

    assert_eq!(p.payment.status, PaymentStatus::Succeeded);
    // The simulator's card fee: 1.75% of 5,000 (87.5 → 88) + 30 = 118; no platform fee configured.
    assert_eq!(
        (p.payment.processing_fee_cents, p.payment.platform_fee_cents),
        (Some(118), Some(0))
    );
    let nets: Vec<i64> = p.allocations.iter().map(|a| a.net_amount_cents.unwrap()).collect();
    assert_eq!(
        nets.iter().sum::<i64>() + 118,
        5_000,
        "transfers and fees add up to the charge"
    );
    let mut expected: Vec<(String, i64)> = p
        .allocations
        .iter()
        .map(|a| (a.id.clone(), a.net_amount_cents.unwrap()))
        .collect();
    expected.sort();
    assert_eq!(
        stripe_transfers(&flow, &id).await,
        expected,
        "one transfer per allocation, of its net amount"
    );
    assert!(p
        .allocations
        .iter()
        .all(|a| a.generation == 1 && a.stripe_transfer_id.is_some()));
    assert_conserved(&flow, &id).await;

    assert_eq!(
        types_about(&flow, id.as_str())
            .await
            .iter()
            .filter(|t| *t == "recommendation_set.payment_succeeded")
            .count(),
        1
    );
    for a in &p.allocations {
        let types = types_about(&flow, &a.id).await;
        assert_eq!(types, vec!["recommendation_set.distribution_succeeded"], "{}", a.id);
        let event = &flow.events(&a.id).await[0];
        assert_eq!(event["data"]["amount_cents"], a.net_amount_cents.unwrap());
        assert_eq!(
            event["data"]["stripe_transfer_id"],
            a.stripe_transfer_id.clone().unwrap()
        );
    }
    let donations = donations_for_payment(&mut flow.db.pool.acquire().await.unwrap(), &id)
        .await
        .unwrap();
    assert!(donations
        .iter()
        .all(|d| d.status == DonationStatus::Confirmed && d.received_date.is_some()));
    for d in &donations {
        assert_eq!(
            types_about(&flow, &d.id).await,
            vec!["donation.created", "donation.succeeded"]
        );
    }
    flow.stop().await;
}

#[tokio::test]
async fn a_recipient_without_the_transfers_capability_is_parked_and_the_others_transfer() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000, 3_000], &[1]).await;
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    let p = flow.wait_until(&id, "settled allocations", all_settled).await;
    let statuses: Vec<AllocationStatus> = p.allocations.iter().map(|a| a.status).collect();
    assert_eq!(
        statuses,
        vec![
            AllocationStatus::Transferred,
            AllocationStatus::Parked,
            AllocationStatus::Transferred
        ]
    );
    let parked = &p.allocations[1];
    assert_eq!(
        parked.failure_code.as_deref(),
        Some("insufficient_capabilities_for_transfer")
    );
    assert!(parked.parked_at.is_some());
    assert_eq!(stripe_transfers(&flow, &id).await.len(), 2);
    assert_eq!(
        types_about(&flow, &parked.id).await,
        vec!["recommendation_set.distribution_failed"]
    );
    let failed = &flow.events(&parked.id).await[0];
    assert_eq!(failed["data"]["failure_code"], "insufficient_capabilities_for_transfer");
    assert_eq!(failed["data"]["stripe_transfer_id"], serde_json::Value::Null);
    let donations = donations_for_payment(&mut flow.db.pool.acquire().await.unwrap(), &id)
        .await
        .unwrap();
    assert_eq!(
        donations[1].status,
        DonationStatus::Pending,
        "the gift did not fail; the distribution did"
    );
    assert_eq!(
        flow.count_events("donation.failed").await,
        0,
        "no donation.failed on the recipient"
    );
    let report = money_report(&mut flow.db.pool.acquire().await.unwrap(), &id)
        .await
        .unwrap();
    assert_eq!(report.parked_cents, parked.net_amount_cents.unwrap());
    assert!(report.is_conserved(), "{report:?}");
    flow.stop().await;
}

#[tokio::test]
async fn becs_stays_processing_then_succeeds_and_distributes() {
    let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[]).await;
    let (id, _) = flow
        .pay(PaymentMethodType::AuBecsDebit, "pm_becs_000123456", Some("cm3donor1"))
        .await;
    let p = flow
        .wait_until(&id, "PROCESSING", |p| p.payment.status == PaymentStatus::Processing)
        .await;
    assert!(
        p.allocations.iter().all(|a| a.status == AllocationStatus::Pending),
        "nothing moves while the debit is pending"
    );
    let donations = donations_for_payment(&mut flow.db.pool.acquire().await.unwrap(), &id)
        .await
        .unwrap();
    for d in &donations {
        let types = loop {
            let t = types_about(&flow, &d.id).await;
            if t.len() >= 2 {
                break t;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        assert_eq!(types, vec!["donation.created", "donation.processing"]);
    }
    // Days pass (5 s of simulator time): the debit clears.
    flow.control.advance_clock(6).await.unwrap();
    let p = flow
        .wait_until(&id, "transfers", |p| {
            p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
        })
        .await;
    // BECS fee: 1% of 5,000 + 30 = 80.
    assert_eq!(p.payment.processing_fee_cents, Some(80));
    assert_eq!(
        stripe_transfers(&flow, &id).await.iter().map(|t| t.1).sum::<i64>(),
        4_920
    );
    assert_conserved(&flow, &id).await;
    flow.stop().await;
}

#[tokio::test]
async fn a_becs_dishonour_fails_the_payment_and_its_donations_without_transfers() {
    let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[]).await;
    let (id, _) = flow
        .pay(PaymentMethodType::AuBecsDebit, "pm_becs_111111113", Some("cm3donor1"))
        .await;
    flow.wait_until(&id, "PROCESSING", |p| p.payment.status == PaymentStatus::Processing)
        .await;
    flow.control.advance_clock(6).await.unwrap();
    let p = flow
        .wait_until(&id, "FAILED", |p| p.payment.status == PaymentStatus::Failed)
        .await;
    assert_eq!(p.payment.failure_code.as_deref(), Some("account_closed"));
    assert!(p.allocations.iter().all(|a| a.status == AllocationStatus::Voided));
    let events = flow.events(id.as_str()).await;
    let failed: Vec<_> = events
        .iter()
        .filter(|e| e["type"] == "recommendation_set.payment_failed")
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["data"]["failure_code"], "account_closed");
    assert_eq!(failed[0]["data"]["total_amount_cents"], 5_000);
    let donations = donations_for_payment(&mut flow.db.pool.acquire().await.unwrap(), &id)
        .await
        .unwrap();
    assert!(donations
        .iter()
        .all(|d| d.status == DonationStatus::Failed && d.failure_code.as_deref() == Some("account_closed")));
    assert_eq!(flow.count_events("donation.failed").await, 2);
    assert!(stripe_transfers(&flow, &id).await.is_empty());
    assert_eq!(flow.count_events("recommendation_set.payment_succeeded").await, 0);
    let report = money_report(&mut flow.db.pool.acquire().await.unwrap(), &id)
        .await
        .unwrap();
    assert_eq!((report.charged_cents, report.voided_cents), (0, 5_000));
    flow.stop().await;
}

#[tokio::test]
async fn a_server_side_card_decline_is_final_and_cancels_the_payment_intent() {
    let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[]).await;
    let (id, pi) = flow
        .pay(PaymentMethodType::Card, "pm_card_chargeDeclined", Some("cm3donor1"))
        .await;
    let p = flow
        .wait_until(&id, "FAILED", |p| p.payment.status == PaymentStatus::Failed)
        .await;
    assert_eq!(p.payment.failure_code.as_deref(), Some("card_declined"));
    assert_eq!(p.payment.payment_intent_id.as_deref(), Some(pi.as_str()));
    // Nobody is there to try another card: splitpay canceled the PaymentIntent at Stripe.
    let intent = flow.gateway.retrieve_payment_intent(&pi).await.unwrap();
    assert_eq!(intent.status, splitpay::stripe::IntentStatus::Canceled);
    assert!(p.allocations.iter().all(|a| a.status == AllocationStatus::Voided));
    let donations = donations_for_payment(&mut flow.db.pool.acquire().await.unwrap(), &id)
        .await
        .unwrap();
    assert!(donations.iter().all(|d| d.status == DonationStatus::Failed));
    assert_eq!(flow.count_events("donation.failed").await, 2);
    assert!(stripe_transfers(&flow, &id).await.is_empty());
    assert_eq!(flow.count_events("recommendation_set.payment_failed").await, 1);
    flow.stop().await;
}

#[tokio::test]
async fn duplicated_and_reordered_webhooks_change_nothing() {
    let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[]).await;
    // Every event twice.
    flow.control
        .webhook_mode(serde_json::json!({ "duplicate": true }))
        .await
        .unwrap();
    let (card, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    flow.wait_until(&card, "transfers", |p| {
        p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
    })
    .await;
    assert_eq!(stripe_transfers(&flow, &card).await.len(), 2);

    // Held back and released newest first: `succeeded` arrives before `processing`.
    flow.control
        .webhook_mode(serde_json::json!({ "duplicate": false, "hold": true }))
        .await
        .unwrap();
    let (becs, pi) = flow
        .pay(PaymentMethodType::AuBecsDebit, "pm_becs_000123456", Some("cm3donor1"))
        .await;
    flow.control.settle(&pi, None).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    flow.control
        .webhook_mode(serde_json::json!({ "hold": false }))
        .await
        .unwrap();
    flow.control.flush_webhooks().await.unwrap();
    let p = flow
        .wait_until(&becs, "transfers", |p| {
            p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
        })
        .await;
    assert_eq!(
        p.payment.status,
        PaymentStatus::Succeeded,
        "the late `processing` did not move it back"
    );
    assert_eq!(stripe_transfers(&flow, &becs).await.len(), 2);

    // Once all has settled, the totals are exactly one of everything.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(flow.count_events("recommendation_set.payment_succeeded").await, 2);
    assert_eq!(flow.count_events("recommendation_set.distribution_succeeded").await, 4);
    assert_eq!(flow.count_events("donation.succeeded").await, 4);
    let (inbox,): (i64,) = sqlx::query_as("SELECT count(*) FROM stripe_events")
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    let (distinct_types,): (i64,) = sqlx::query_as("SELECT count(*) FROM stripe_events WHERE processed_at IS NULL")
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    assert!(inbox > 0);
    assert_eq!(distinct_types, 0, "every stored event was processed");
    flow.stop().await;
}

#[tokio::test]
async fn lost_responses_and_throttling_during_transfers_end_in_one_transfer_each() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000, 3_000], &[]).await;
    let transfers = |kind, count| Fault {
        kind,
        count,
        path_contains: Some("/v1/transfers".into()),
        method: Some("POST".into()),
    };
    flow.control.fault(transfers(FaultKind::LoseResponse, 2)).await.unwrap();
    flow.control.fault(transfers(FaultKind::RateLimit, 2)).await.unwrap();
    flow.control
        .fault(transfers(FaultKind::DropConnection, 1))
        .await
        .unwrap();
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    let p = flow
        .wait_until(&id, "transfers", |p| {
            p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
        })
        .await;
    let made = stripe_transfers(&flow, &id).await;
    let mut expected: Vec<(String, i64)> = p
        .allocations
        .iter()
        .map(|a| (a.id.clone(), a.net_amount_cents.unwrap()))
        .collect();
    expected.sort();
    assert_eq!(made, expected, "exactly one transfer per allocation despite the faults");
    assert!(
        p.allocations.iter().all(|a| a.generation == 1),
        "no new generation was needed"
    );
    let log = flow.control.get("requests").await.unwrap();
    let count = |method: &str| {
        log["requests"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["method"] == method && r["path"] == "/v1/transfers")
            .count()
    };
    // Three transfers applied (two of them with lost responses, found again by looking them up rather than by a
    // second create), two throttled creates and one dropped: every fault was met, and no create was wasted.
    assert_eq!(count("POST"), 3 + 2 + 1);
    assert!(
        count("GET") >= 3,
        "the two lost responses and the dropped connection were looked up"
    );
    assert_conserved(&flow, &id).await;
    flow.stop().await;
}

#[tokio::test]
async fn the_webhook_ingress_refuses_bad_signatures_and_acknowledges_redeliveries() {
    let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[]).await;
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    flow.wait_until(&id, "transfers", |p| {
        p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
    })
    .await;
    let (stored,): (serde_json::Value,) =
        sqlx::query_as("SELECT payload FROM stripe_events WHERE event_type = 'payment_intent.succeeded'")
            .fetch_one(&flow.db.pool)
            .await
            .unwrap();
    let body = stored.to_string();
    let client = reqwest::Client::new();
    let now = chrono::Utc::now().timestamp();
    let post = |signature: Option<String>, body: String| {
        let mut req = client
            .post(&flow.webhook_url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(s) = signature {
            req = req.header("stripe-signature", s);
        }
        req.send()
    };
    let before: (i64,) = sqlx::query_as("SELECT count(*) FROM stripe_events")
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();

    let replay = post(
        Some(splitpay::stripe::webhook::sign(
            body.as_bytes(),
            &splitpay::config::Secret::new(WEBHOOK_SECRET),
            now,
        )),
        body.clone(),
    )
    .await
    .unwrap();
    assert_eq!(replay.status(), 200);
    assert_eq!(replay.json::<serde_json::Value>().await.unwrap()["duplicate"], true);

    let forged = body
        .replace("\"succeeded\"", "\"canceled\"")
        .replace("evt_", "evt_forged");
    let wrong = splitpay::stripe::webhook::sign(forged.as_bytes(), &splitpay::config::Secret::new("whsec_wrong"), now);
    assert_eq!(post(Some(wrong), forged.clone()).await.unwrap().status(), 400);
    assert_eq!(post(None, forged.clone()).await.unwrap().status(), 400);
    let stale = splitpay::stripe::webhook::sign(
        forged.as_bytes(),
        &splitpay::config::Secret::new(WEBHOOK_SECRET),
        now - 600,
    );
    assert_eq!(post(Some(stale), forged).await.unwrap().status(), 400);

    let after: (i64,) = sqlx::query_as("SELECT count(*) FROM stripe_events")
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    assert_eq!(before, after, "refused and replayed webhooks wrote nothing");
    assert_eq!(flow.count_events("recommendation_set.payment_succeeded").await, 1);
    flow.stop().await;
}

#[tokio::test]
async fn the_fee_split_waits_for_the_balance_transaction_and_never_guesses() {
    let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[]).await;
    let config = splitpay::stripe::sim::model::SimConfig {
        balance_transaction_delay_secs: 60,
        ..Default::default()
    };
    flow.control.set_config(&config).await.unwrap();
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    let waiting = flow
        .wait_until(&id, "a wait for the fee", |p| p.payment.distribution_attempts >= 2)
        .await;
    assert_eq!(waiting.payment.status, PaymentStatus::Succeeded);
    assert!(
        waiting
            .allocations
            .iter()
            .all(|a| a.fee_share_cents.is_none() && a.status == AllocationStatus::Pending),
        "no fee guessed"
    );
    assert_eq!(waiting.payment.processing_fee_cents, None);
    // Stripe settles the fee (asynchronous capture): distribution goes on.
    flow.control.advance_clock(61).await.unwrap();
    let p = flow
        .wait_until(&id, "transfers", |p| {
            p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
        })
        .await;
    assert_eq!(p.payment.processing_fee_cents, Some(118));
    assert_conserved(&flow, &id).await;
    flow.stop().await;
}

#[tokio::test]
async fn a_throttled_transfer_is_never_parked_and_consumes_nothing() {
    let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[]).await;
    // Twelve 429s in a row on transfers: several rounds of throttling for both allocations.
    flow.control
        .fault(Fault {
            kind: FaultKind::RateLimit,
            count: 12,
            path_contains: Some("/v1/transfers".into()),
            method: Some("POST".into()),
        })
        .await
        .unwrap();
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    let p = flow
        .wait_until(&id, "transfers", |p| {
            p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
        })
        .await;
    for a in &p.allocations {
        assert_eq!(a.attempts, 0, "throttling is not counted as a failed attempt");
        assert_eq!(a.generation, 1, "every attempt used the same key");
        assert_eq!(
            types_about(&flow, &a.id).await,
            vec!["recommendation_set.distribution_succeeded"],
            "never parked on the way"
        );
    }
    assert_eq!(stripe_transfers(&flow, &id).await.len(), 2, "one transfer each");
    assert_conserved(&flow, &id).await;
    flow.stop().await;
}

#[tokio::test]
async fn fees_that_take_everything_park_the_shares_net_amount_zero_with_no_transfer() {
    // A platform fee of A$60 on a A$50 payment: nothing is left to transfer.
    let flow = Flow::start_full(AmountMode::Fixed, &[2_000, 3_000], &[], true, |s| {
        s.platform_fee = splitpay::domain::fees::PlatformFee::new(0, 6_000).unwrap();
    })
    .await;
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    let p = flow.wait_until(&id, "zero-net allocations", all_settled).await;
    for a in &p.allocations {
        assert_eq!(
            (a.status, a.failure_code.as_deref(), a.net_amount_cents),
            (AllocationStatus::Parked, Some("net_amount_zero"), Some(0)),
            "parked for an operator to refund, never left PENDING"
        );
        assert_eq!(a.generation, 0, "no transfer was ever attempted");
        assert_eq!(
            types_about(&flow, &a.id).await,
            vec!["recommendation_set.distribution_failed"]
        );
    }
    assert_eq!(
        p.payment.fee_uncollected_cents,
        Some(118 + 6_000 - 5_000),
        "the excess is recorded, not hidden"
    );
    assert!(stripe_transfers(&flow, &id).await.is_empty());
    assert_conserved(&flow, &id).await;
    flow.stop().await;
}

/// Stripe forgets idempotency keys after 24 h. An allocation whose transfer was applied but never recorded, found
/// again a day later, must be looked up rather than resent (the old key would now make a second transfer).
#[tokio::test]
async fn a_day_old_unrecorded_transfer_is_found_not_resent() {
    use splitpay::app::{AppContext, DistributionSettings};
    use splitpay::store::allocations::*;
    use splitpay::stripe::{CreatePaymentIntentParams, CreateTransferParams};
    use std::collections::BTreeMap;

    let flow = Flow::start_with(AmountMode::Fixed, &[2_000, 3_000], &[], false).await;
    let pi = flow
        .gateway
        .create_payment_intent(&CreatePaymentIntentParams {
            amount_cents: 5_000,
            currency: "aud".into(),
            payment_method_type: PaymentMethodType::Card,
            transfer_group: "unused".into(),
            metadata: BTreeMap::new(),
            payment_method: Some("pm_card_visa".into()),
            idempotency_key: "k-day-old".into(),
        })
        .await
        .unwrap();
    let charge = pi.latest_charge.clone().unwrap();
    let (id, first) =
        common::succeeded_with_first_transfer_started(&flow.db.pool, &flow.set, &pi.id, &charge, 118).await;
    let c = allocation_context(&mut flow.db.pool.acquire().await.unwrap(), &first)
        .await
        .unwrap();

    // The transfer Stripe applied (the worker died before recording it), with the allocation's key and metadata.
    let applied = flow
        .gateway
        .create_transfer(&CreateTransferParams {
            destination: c.destination_account_id.clone(),
            amount_cents: c.allocation.net_amount_cents.unwrap(),
            currency: "aud".into(),
            source_transaction: Some(charge),
            transfer_group: id.to_string(),
            metadata: BTreeMap::from([
                ("split_payment_id".to_owned(), id.to_string()),
                ("split_allocation_id".to_owned(), first.to_string()),
                ("generation".to_owned(), "1".to_owned()),
            ]),
            idempotency_key: c.allocation.idempotency_key.clone().unwrap(),
        })
        .await
        .unwrap();
    // A day passes: the attempt is old, and Stripe has forgotten the key.
    sqlx::query("UPDATE transfer_attempts SET started_at = now() - interval '24 hours'")
        .execute(&flow.db.pool)
        .await
        .unwrap();
    flow.control.advance_clock(25 * 3_600).await.unwrap();

    let ctx = AppContext {
        pool: flow.db.pool.clone(),
        gateway: flow.gateway.clone(),
        webhooks: Default::default(),
        recorder: Default::default(),
        starter: Default::default(),
        distribution: DistributionSettings::default(),
    };
    splitpay::jobs::transfer::transfer(&ctx, first.as_str()).await.unwrap();
    let after = get_split_allocation(&mut flow.db.pool.acquire().await.unwrap(), &first)
        .await
        .unwrap();
    assert_eq!(after.status, AllocationStatus::Transferred);
    assert_eq!(
        after.stripe_transfer_id.as_deref(),
        Some(applied.id.as_str()),
        "the applied transfer was found"
    );
    assert_eq!(
        stripe_transfers(&flow, &id).await.len(),
        1,
        "and not made a second time"
    );
    flow.stop().await;
}
