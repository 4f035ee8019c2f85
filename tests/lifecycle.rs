//! The lifecycle rules of issue 7, each against a real PostgreSQL and the simulator over HTTP: transient failures
//! never park, failed lookups are "unknown", generations keep their parameters, Stripe's word wins, declined
//! payments can still be paid, transient errors are never contradictions, and reconcile-pending and
//! reconcile-transfers resolve what the webhooks and the jobs missed.

mod common;

use common::flow::Flow;
use splitpay::domain::ids::SplitAllocationId;
use splitpay::domain::plan::{AmountMode, PaymentMethodType};
use splitpay::domain::state::{AllocationEvent, AllocationStatus, DonationStatus, PaymentStatus};
use splitpay::jobs::reconcile::{reconcile_pending, reconcile_transfers, ReconcileOptions};
use splitpay::store::allocations::*;
use splitpay::store::donations::*;
use splitpay::store::money_report::*;
use splitpay::stripe::sim::{Fault, FaultKind};
use splitpay::stripe::{CreatePaymentIntentParams, CreateTransferParams, IntentStatus, PaymentGateway};
use std::collections::BTreeMap;

fn fault(kind: FaultKind, method: &str, path: &str) -> Fault {
    Fault {
        kind,
        count: 100_000,
        path_contains: Some(path.into()),
        method: Some(method.into()),
    }
}

async fn count_transfers(flow: &Flow, group: &str) -> usize {
    flow.gateway.list_transfers(group).await.unwrap().len()
}

async fn types_about(flow: &Flow, subject: &str) -> Vec<String> {
    flow.events(subject)
        .await
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect()
}

fn short_window(s: &mut splitpay::app::DistributionSettings) {
    s.transfer_retry_window_ms = 1_500;
}

/// Point 1: an unknown outcome (a 500 Stripe saved for the key, replayed on every retry) is retried with the same
/// key for the window, then parked only because a lookup succeeded and found no transfer.
#[tokio::test]
async fn an_unknown_outcome_parks_only_after_its_window_and_a_lookup_that_found_nothing() {
    let flow = Flow::start_full(AmountMode::Fixed, &[2_000], &[], true, short_window).await;
    flow.control
        .fault(fault(FaultKind::ServerError, "POST", "/v1/transfers"))
        .await
        .unwrap();
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    let p = flow
        .wait_until(&id, "parked after the window", |p| {
            p.allocations[0].status == AllocationStatus::Parked
        })
        .await;
    let a = &p.allocations[0];
    assert_eq!(a.failure_code.as_deref(), Some(RETRY_WINDOW_ELAPSED));
    assert_eq!(a.generation, 1, "every attempt used the same key");
    assert!(a.attempts >= 1, "retried before parking: {}", a.attempts);
    let (outcome,): (String,) = sqlx::query_as("SELECT outcome FROM transfer_attempts WHERE split_allocation_id = $1")
        .bind(&a.id)
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    assert_eq!(outcome, "WINDOW_ELAPSED");
    assert_eq!(count_transfers(&flow, id.as_str()).await, 0);
    assert_eq!(
        types_about(&flow, &a.id).await,
        vec!["recommendation_set.distribution_failed"]
    );
    common::money::assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// Points 1, 2 and 4: the transfer is applied but every response is lost, and every lookup fails. Past the window
/// the allocation is not parked: it stays TRANSFERRING, marked unresolved, and is retried. When Stripe answers
/// lookups again, the transfer it holds makes the allocation TRANSFERRED, once.
#[tokio::test]
async fn a_failed_lookup_never_parks_and_the_transfer_is_found_when_stripe_answers() {
    let flow = Flow::start_full(AmountMode::Fixed, &[2_000], &[], true, short_window).await;
    // The first create is applied and its response lost; every later attempt loses its connection.
    flow.control
        .fault(Fault {
            count: 1,
            ..fault(FaultKind::LoseResponse, "POST", "/v1/transfers")
        })
        .await
        .unwrap();
    flow.control
        .fault(fault(FaultKind::DropConnection, "POST", "/v1/transfers"))
        .await
        .unwrap();
    flow.control
        .fault(fault(FaultKind::ServerError, "GET", "/v1/transfers"))
        .await
        .unwrap();
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    let p = flow
        .wait_until(&id, "unresolved", |p| p.allocations[0].unresolved_at.is_some())
        .await;
    assert_eq!(p.allocations[0].status, AllocationStatus::Transferring, "never parked");
    // Still retried while unresolved: a few more rounds, and it is still TRANSFERRING, never PARKED.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let p = flow.payment(&id).await;
    assert_eq!(p.allocations[0].status, AllocationStatus::Transferring);
    let report = reconcile_transfers(&flow.ctx, &ReconcileOptions::default())
        .await
        .unwrap();
    assert_eq!(report.unresolved, 1, "counted for operators");

    flow.control.clear_faults().await.unwrap();
    let p = flow
        .wait_until(&id, "transferred", |p| {
            p.allocations[0].status == AllocationStatus::Transferred
        })
        .await;
    assert!(p.allocations[0].unresolved_at.is_none());
    let at_stripe = flow.gateway.list_transfers(id.as_str()).await.unwrap();
    assert_eq!(at_stripe.len(), 1, "exactly one transfer");
    assert_eq!(Some(&at_stripe[0].id), p.allocations[0].stripe_transfer_id.as_ref());
    common::money::assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// A payment whose first transfer generation was started, on a charge that exists at the simulator.
async fn started(flow: &Flow) -> (splitpay::domain::ids::SplitPaymentId, SplitAllocationId, String) {
    let pi = flow
        .gateway
        .create_payment_intent(&CreatePaymentIntentParams {
            amount_cents: flow.set.allocations.iter().map(|a| a.amount_cents).sum(),
            currency: "aud".into(),
            payment_method_type: PaymentMethodType::Card,
            transfer_group: "unused".into(),
            metadata: BTreeMap::new(),
            payment_method: Some("pm_card_visa".into()),
            idempotency_key: format!("k-{}", uuid::Uuid::new_v4()),
        })
        .await
        .unwrap();
    let charge = pi.latest_charge.clone().unwrap();
    let (id, first) =
        common::succeeded_with_first_transfer_started(&flow.db.pool, &flow.set, &pi.id, &charge, 118).await;
    (id, first, charge)
}

/// Point 2: a key older than 23 h is resent only after a lookup that succeeded and found nothing.
#[tokio::test]
async fn an_old_key_is_resent_only_after_a_lookup_that_found_nothing() {
    let flow = Flow::start_with(AmountMode::Fixed, &[2_000, 3_000], &[], false).await;
    let (id, first, _) = started(&flow).await;
    sqlx::query("UPDATE transfer_attempts SET started_at = now() - interval '24 hours'")
        .execute(&flow.db.pool)
        .await
        .unwrap();
    flow.control
        .fault(fault(FaultKind::ServerError, "GET", "/v1/transfers"))
        .await
        .unwrap();
    splitpay::jobs::transfer::transfer(&flow.ctx, first.as_str())
        .await
        .unwrap();
    let a = get_split_allocation(&mut flow.db.pool.acquire().await.unwrap(), &first)
        .await
        .unwrap();
    assert_eq!(a.status, AllocationStatus::Transferring);
    assert_eq!(
        a.attempts, 1,
        "the failed lookup counts as an attempt with an unknown outcome"
    );
    flow.control.clear_faults().await.unwrap();
    assert_eq!(
        count_transfers(&flow, id.as_str()).await,
        0,
        "nothing was sent on a failed lookup"
    );

    // Stripe answers: no transfer of this generation, so the old key is safe to resend.
    sqlx::query("UPDATE split_allocations SET next_attempt_at = now()")
        .execute(&flow.db.pool)
        .await
        .unwrap();
    splitpay::jobs::transfer::transfer(&flow.ctx, first.as_str())
        .await
        .unwrap();
    let a = get_split_allocation(&mut flow.db.pool.acquire().await.unwrap(), &first)
        .await
        .unwrap();
    assert_eq!(a.status, AllocationStatus::Transferred);
    assert_eq!(count_transfers(&flow, id.as_str()).await, 1);
    flow.stop().await;
}

/// Point 3: a generation's destination, amount, currency, source transaction and metadata are those frozen when it
/// started; a link changed afterwards only affects a new generation.
#[tokio::test]
async fn a_generation_keeps_its_parameters_when_the_link_changes() {
    let flow = Flow::start_with(AmountMode::Fixed, &[2_000, 3_000], &[], false).await;
    let (id, first, charge) = started(&flow).await;
    let before = allocation_context(&mut flow.db.pool.acquire().await.unwrap(), &first)
        .await
        .unwrap();
    assert_eq!(before.destination_account_id, "acct_rcp0");
    // The platform re-points recipient 0's link at another connected account, and the fee split is tampered with.
    sqlx::query("UPDATE recipient_account_links SET stripe_connect_account_id = 'acct_rcp1' WHERE id = 'cm3lnk0'")
        .execute(&flow.db.pool)
        .await
        .unwrap();
    splitpay::jobs::transfer::transfer(&flow.ctx, first.as_str())
        .await
        .unwrap();
    let t = flow.gateway.list_transfers(id.as_str()).await.unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].destination.as_deref(), Some("acct_rcp0"), "the frozen destination");
    assert_eq!(t[0].amount_cents, before.allocation.net_amount_cents.unwrap());
    assert_eq!(t[0].source_transaction.as_deref(), Some(charge.as_str()));
    assert_eq!(t[0].metadata["generation"], "1");
    assert_eq!(t[0].metadata["split_allocation_id"], first.as_str());
    flow.stop().await;
}

/// Points 4 and 8: a parked allocation whose transfer Stripe holds (made by a request whose answer was lost) is
/// adopted by the audit and ends TRANSFERRED, with its donation confirmed; a transfer in the group that names none
/// of our allocations is reported, never ignored.
#[tokio::test]
async fn the_audit_adopts_a_transfer_stripe_made_for_a_parked_allocation_and_reports_strangers() {
    let flow = Flow::start_with(AmountMode::Fixed, &[2_000, 3_000], &[], false).await;
    let (id, first, charge) = started(&flow).await;
    let c = allocation_context(&mut flow.db.pool.acquire().await.unwrap(), &first)
        .await
        .unwrap();
    let key = c.allocation.idempotency_key.clone().unwrap();
    let make = |metadata: BTreeMap<String, String>, key: String| CreateTransferParams {
        destination: "acct_rcp0".into(),
        amount_cents: c.allocation.net_amount_cents.unwrap(),
        currency: "aud".into(),
        source_transaction: Some(charge.clone()),
        transfer_group: id.to_string(),
        metadata,
        idempotency_key: key,
    };
    let ours = flow
        .gateway
        .create_transfer(&make(
            BTreeMap::from([
                ("split_payment_id".to_owned(), id.to_string()),
                ("split_allocation_id".to_owned(), first.to_string()),
                ("generation".to_owned(), "1".to_owned()),
            ]),
            key,
        ))
        .await
        .unwrap();
    let stranger = flow
        .gateway
        .create_transfer(&CreateTransferParams {
            amount_cents: 100,
            ..make(BTreeMap::new(), "someone-else".into())
        })
        .await
        .unwrap();
    // The allocation was parked meanwhile (as a wrongly-read refusal would have).
    let mut tx = flow.db.pool.begin().await.unwrap();
    let patch = AllocationPatch {
        failure_code: Some("account_invalid".into()),
        failure_message: Some("test".into()),
        ..Default::default()
    };
    transition_allocation(&mut tx, &first, AllocationEvent::TransferFailed, &patch, &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let opts = ReconcileOptions {
        ignore_graces: true,
        payment: Some(id.clone()),
        inline: true,
    };
    let report = reconcile_transfers(&flow.ctx, &opts).await.unwrap();
    assert_eq!(
        (report.audited, report.adopted, report.discrepancies),
        (1, 1, 1),
        "{report:?}"
    );
    let a = get_split_allocation(&mut flow.db.pool.acquire().await.unwrap(), &first)
        .await
        .unwrap();
    assert_eq!(
        a.status,
        AllocationStatus::Transferred,
        "Stripe's word wins over PARKED"
    );
    assert_eq!(a.stripe_transfer_id.as_deref(), Some(ours.id.as_str()));
    let d = donation_for_allocation(&mut flow.db.pool.acquire().await.unwrap(), &first)
        .await
        .unwrap();
    assert!(d.is_none() || d.unwrap().status == DonationStatus::Confirmed);
    let (kind, tid): (String, String) = sqlx::query_as("SELECT kind, stripe_transfer_id FROM transfer_discrepancies")
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    assert_eq!(
        (kind.as_str(), tid.as_str()),
        ("unknown_transfer", stranger.id.as_str())
    );
    // Run again: nothing new adopted or reported (the discrepancy is kept once).
    let again = reconcile_transfers(&flow.ctx, &opts).await.unwrap();
    assert_eq!((again.adopted, again.discrepancies), (0, 0), "{again:?}");
    flow.stop().await;
}

/// Point 5: a donor confirming in the browser is declined, then pays with another card on the same PaymentIntent:
/// the failed attempt is recorded and announced once, donations stay PENDING, and the success distributes once.
#[tokio::test]
async fn a_declined_browser_payment_can_still_be_paid_on_the_same_payment_intent() {
    let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[]).await;
    let (id, pi) = flow.pay_in_browser(PaymentMethodType::Card, Some("cm3donor1")).await;
    let _ = flow.confirm(&pi, "pm_card_chargeDeclined", 1).await; // declined: an error, as Stripe answers
    let p = flow
        .wait_until(&id, "a failed attempt", |p| p.payment.failed_attempts == 1)
        .await;
    assert_eq!(p.payment.status, PaymentStatus::RequiresPayment);
    assert_eq!(p.payment.failure_code.as_deref(), Some("card_declined"));
    assert!(p.allocations.iter().all(|a| a.status == AllocationStatus::Pending));
    let donations = donations_for_payment(&mut flow.db.pool.acquire().await.unwrap(), &id)
        .await
        .unwrap();
    assert!(donations.iter().all(|d| d.status == DonationStatus::Pending));
    assert_eq!(flow.count_events("recommendation_set.payment_failed").await, 1);
    assert_eq!(flow.count_events("donation.failed").await, 0);
    let intent = flow.gateway.retrieve_payment_intent(&pi).await.unwrap();
    assert_eq!(
        intent.status,
        IntentStatus::RequiresPaymentMethod,
        "not canceled: the donor may retry"
    );

    flow.confirm(&pi, "pm_card_visa", 2).await.unwrap();
    let p = flow
        .wait_until(&id, "distributed", |p| {
            p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
        })
        .await;
    assert_eq!(p.payment.status, PaymentStatus::Succeeded);
    assert_eq!(count_transfers(&flow, id.as_str()).await, 2);
    assert_eq!(flow.count_events("recommendation_set.payment_succeeded").await, 1);
    assert_eq!(flow.count_events("recommendation_set.payment_failed").await, 1);
    common::money::assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// Runs reconcile-pending while Stripe's webhooks are held, then delivers them and waits for the cancel's
/// `payment_intent.canceled` to be applied. Held, because the webhook of the reconciler's own cancel otherwise races
/// the reconciler to the same outcome, and the report's count with it (CI once saw the webhook win: the payment
/// FAILED by it, the report counting nothing). Applied after, it must change nothing: the callers check the outcome.
async fn reconcile_before_the_cancels_webhook(flow: &Flow) -> splitpay::jobs::reconcile::PendingReport {
    common::refunds::hold_webhooks(flow).await;
    let report = reconcile_pending(&flow.ctx, &ReconcileOptions::default())
        .await
        .unwrap();
    common::refunds::release_webhooks(flow).await;
    common::refunds::settle_until_sql(
        flow,
        "the cancel's webhook applied",
        100,
        "SELECT count(*) FROM stripe_events WHERE event_type = 'payment_intent.canceled' AND processed_at IS NOT NULL",
    )
    .await;
    report
}

/// Point 5: a PaymentIntent still unpaid after `abandon_after` is canceled by reconcile-pending; the payment ends
/// CANCELED with `donation.failed` for each donation.
#[tokio::test]
async fn an_abandoned_payment_intent_is_canceled_by_reconcile_pending() {
    let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[]).await;
    let (id, pi) = flow.pay_in_browser(PaymentMethodType::Card, Some("cm3donor1")).await;
    // Not yet abandoned: checked, left alone.
    sqlx::query("UPDATE split_payments SET created_at = now() - interval '11 minutes'")
        .execute(&flow.db.pool)
        .await
        .unwrap();
    let report = reconcile_pending(&flow.ctx, &ReconcileOptions::default())
        .await
        .unwrap();
    assert_eq!((report.checked, report.canceled), (1, 0), "{report:?}");
    assert_eq!(flow.payment(&id).await.payment.status, PaymentStatus::RequiresPayment);
    // A day later, and past its next check.
    sqlx::query("UPDATE split_payments SET created_at = now() - interval '25 hours', next_reconcile_at = now()")
        .execute(&flow.db.pool)
        .await
        .unwrap();
    let report = reconcile_before_the_cancels_webhook(&flow).await;
    assert_eq!((report.canceled, report.abandoned), (1, 1), "{report:?}");
    let p = flow.payment(&id).await;
    assert_eq!(p.payment.status, PaymentStatus::Canceled);
    assert_eq!(
        flow.gateway.retrieve_payment_intent(&pi).await.unwrap().status,
        IntentStatus::Canceled
    );
    assert!(p.allocations.iter().all(|a| a.status == AllocationStatus::Voided));
    assert_eq!(flow.count_events("donation.failed").await, 2);
    flow.stop().await;
}

/// Point 7: a `payment_intent.succeeded` that never arrived is found by reconcile-pending after the card grace,
/// and the payment is distributed as its webhook would have done.
#[tokio::test]
async fn a_dropped_succeeded_webhook_is_found_by_reconcile_pending() {
    let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[]).await;
    flow.control
        .webhook_mode(serde_json::json!({ "drop_next": 1000 }))
        .await
        .unwrap();
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(flow.payment(&id).await.payment.status, PaymentStatus::RequiresPayment);
    // Within the grace nothing is asked; after it, Stripe is.
    let report = reconcile_pending(&flow.ctx, &ReconcileOptions::default())
        .await
        .unwrap();
    assert_eq!(report.checked, 0);
    sqlx::query("UPDATE split_payments SET created_at = now() - interval '11 minutes'")
        .execute(&flow.db.pool)
        .await
        .unwrap();
    let report = reconcile_pending(&flow.ctx, &ReconcileOptions::default())
        .await
        .unwrap();
    assert_eq!((report.checked, report.succeeded), (1, 1), "{report:?}");
    flow.wait_until(&id, "distributed", |p| {
        p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
    })
    .await;
    assert_eq!(flow.count_events("recommendation_set.payment_succeeded").await, 1);
    // Checked once per interval: an immediate second run asks Stripe nothing.
    let report = reconcile_pending(&flow.ctx, &ReconcileOptions::default())
        .await
        .unwrap();
    assert_eq!(report.checked, 0);
    common::money::assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// Point 7: a BECS dishonour whose webhook never arrived: reconcile-pending reads the PaymentIntent back in
/// `requires_payment_method` with the bank's error; the payment was confirmed server-side, so it fails for good and
/// the PaymentIntent is canceled.
#[tokio::test]
async fn a_dropped_becs_dishonour_is_found_by_reconcile_pending() {
    let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[]).await;
    let (id, pi) = flow
        .pay(PaymentMethodType::AuBecsDebit, "pm_becs_111111113", Some("cm3donor1"))
        .await;
    flow.wait_until(&id, "PROCESSING", |p| p.payment.status == PaymentStatus::Processing)
        .await;
    flow.control
        .webhook_mode(serde_json::json!({ "drop_next": 1000 }))
        .await
        .unwrap();
    flow.control.advance_clock(6).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(flow.payment(&id).await.payment.status, PaymentStatus::Processing);
    // Within the debit grace (1 h) nothing happens; after it, the dishonour is found.
    sqlx::query("UPDATE split_payments SET created_at = now() - interval '30 minutes'")
        .execute(&flow.db.pool)
        .await
        .unwrap();
    assert_eq!(
        reconcile_pending(&flow.ctx, &ReconcileOptions::default())
            .await
            .unwrap()
            .checked,
        0
    );
    sqlx::query("UPDATE split_payments SET created_at = now() - interval '61 minutes', next_reconcile_at = NULL")
        .execute(&flow.db.pool)
        .await
        .unwrap();
    let report = reconcile_pending(&flow.ctx, &ReconcileOptions::default())
        .await
        .unwrap();
    assert_eq!((report.checked, report.failed), (1, 1), "{report:?}");
    let p = flow.payment(&id).await;
    assert_eq!(p.payment.status, PaymentStatus::Failed);
    assert_eq!(p.payment.failure_code.as_deref(), Some("account_closed"));
    assert_eq!(
        flow.gateway.retrieve_payment_intent(&pi).await.unwrap().status,
        IntentStatus::Canceled
    );
    assert_eq!(flow.count_events("donation.failed").await, 2);
    assert_eq!(count_transfers(&flow, id.as_str()).await, 0);
    flow.stop().await;
}

/// Intake writes a payment (server-confirmed with `payment_method`, or for the browser), then cannot reach Stripe
/// (a 503 to the caller), and the caller never comes back: the payment stays CREATED, now past the card grace.
async fn abandoned_intake(flow: &Flow, payment_method: Option<&str>) -> splitpay::domain::ids::SplitPaymentId {
    flow.control
        .fault(fault(FaultKind::DropConnection, "POST", "/v1/payment_intents"))
        .await
        .unwrap();
    let mut body = serde_json::json!({
        "recommendation_set_id": flow.set.id,
        "donor_id": "cm3donor1",
        "payment_method_type": "card",
    });
    if let Some(pm) = payment_method {
        body["payment_method"] = pm.into();
    }
    let req: splitpay::intake::IntakeRequest = serde_json::from_value(body).unwrap();
    let payment = splitpay::intake::create(&flow.ctx, &req, None).await.unwrap();
    let id = splitpay::domain::ids::SplitPaymentId::parse(&payment.payment.id).unwrap();
    let err = splitpay::intake::create_intent(&flow.ctx, &id).await.unwrap_err();
    assert!(
        matches!(err, splitpay::intake::IntakeError::StripeUnavailable(_)),
        "{err}"
    );
    flow.control.clear_faults().await.unwrap();
    assert_eq!(flow.payment(&id).await.payment.status, PaymentStatus::Created);
    sqlx::query("UPDATE split_payments SET created_at = now() - interval '11 minutes' WHERE id = $1")
        .bind(id.as_str())
        .execute(&flow.db.pool)
        .await
        .unwrap();
    id
}

/// Point 7: intake wrote the payment, then could not reach Stripe (a 503 to the caller), and the caller never came
/// back. After the grace, reconcile-pending replays the create under the stored key, cancels the PaymentIntent it
/// learns, and fails the payment `intake_abandoned`.
#[tokio::test]
async fn an_abandoned_intake_is_replayed_canceled_and_failed() {
    let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[]).await;
    let id = abandoned_intake(&flow, None).await;
    let report = reconcile_before_the_cancels_webhook(&flow).await;
    assert_eq!((report.checked, report.intake_abandoned), (1, 1), "{report:?}");
    let p = flow.payment(&id).await;
    assert_eq!(p.payment.status, PaymentStatus::Failed);
    assert_eq!(p.payment.failure_code.as_deref(), Some("intake_abandoned"));
    let pi = p
        .payment
        .payment_intent_id
        .clone()
        .expect("the replay learned the PaymentIntent");
    assert_eq!(
        flow.gateway.retrieve_payment_intent(&pi).await.unwrap().status,
        IntentStatus::Canceled
    );
    assert_announced_intake_abandoned(&flow, &id).await;
    flow.stop().await;
}

/// One `recommendation_set.payment_failed` (`intake_abandoned`) for the payment, and a `donation.failed` per share.
async fn assert_announced_intake_abandoned(flow: &Flow, id: &splitpay::domain::ids::SplitPaymentId) {
    let failed: Vec<serde_json::Value> = flow
        .events(id.as_str())
        .await
        .into_iter()
        .filter(|e| e["type"] == "recommendation_set.payment_failed")
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["data"]["failure_code"], "intake_abandoned");
    assert_eq!(flow.count_events("donation.failed").await, 2);
}

/// Point 7 with a server-side confirmation: the replay of an abandoned intake must not charge the donor, who was
/// told it failed. It creates the PaymentIntent unconfirmed (the original create never reached Stripe), cancels it
/// and fails the payment: nothing is charged, nothing transferred.
#[tokio::test]
async fn an_abandoned_server_confirmed_intake_is_never_charged_by_the_replay() {
    let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[]).await;
    let id = abandoned_intake(&flow, Some("pm_card_visa")).await;
    let report = reconcile_before_the_cancels_webhook(&flow).await;
    assert_eq!((report.intake_abandoned, report.succeeded), (1, 0), "{report:?}");
    let p = flow.payment(&id).await;
    assert_eq!(
        (p.payment.status, p.payment.failure_code.as_deref()),
        (PaymentStatus::Failed, Some("intake_abandoned"))
    );
    let pi = p.payment.payment_intent_id.clone().unwrap();
    let intent = flow.gateway.retrieve_payment_intent(&pi).await.unwrap();
    assert_eq!(intent.status, IntentStatus::Canceled, "canceled, never confirmed");
    assert!(intent.latest_charge.is_none(), "no charge was ever made");
    assert_eq!(count_transfers(&flow, id.as_str()).await, 0);
    flow.stop().await;
}

/// Point 7, the webhook first: reconcile-pending's cancel of an abandoned intake's replayed PaymentIntent is applied
/// at Stripe but its answer is lost, so the reconciler records nothing and the payment is still CREATED; Stripe's
/// `payment_intent.canceled` then reaches splitpay first. It is the same abandonment, with the same code and
/// message (before, it was FAILED `abandoned`, "The payment did not complete"; CANCELED without a payment method),
/// so a client retrying the intake and an organisation reading the event see one story.
#[tokio::test]
async fn an_abandoned_intakes_cancel_seen_first_by_webhook_is_the_same_abandonment() {
    for payment_method in [Some("pm_card_visa"), None] {
        let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[]).await;
        let id = abandoned_intake(&flow, payment_method).await;
        flow.control
            .fault(Fault {
                kind: FaultKind::LoseResponse,
                count: 1,
                path_contains: Some("/cancel".into()),
                method: Some("POST".into()),
            })
            .await
            .unwrap();
        let report = reconcile_pending(&flow.ctx, &ReconcileOptions::default())
            .await
            .unwrap();
        assert_eq!((report.errors, report.intake_abandoned), (1, 0), "{report:?}");
        let p = flow
            .wait_until(&id, "the canceled webhook", |p| p.payment.status.is_final())
            .await;
        assert_eq!(
            (
                p.payment.status,
                p.payment.failure_code.as_deref(),
                p.payment.failure_message.as_deref()
            ),
            (
                PaymentStatus::Failed,
                Some(splitpay::jobs::reconcile::INTAKE_ABANDONED),
                Some(splitpay::jobs::reconcile::INTAKE_ABANDONED_MESSAGE)
            ),
            "{payment_method:?}"
        );
        let pi = p
            .payment
            .payment_intent_id
            .clone()
            .expect("the webhook named the PaymentIntent");
        let intent = flow.gateway.retrieve_payment_intent(&pi).await.unwrap();
        assert_eq!(intent.status, IntentStatus::Canceled);
        assert!(intent.latest_charge.is_none());
        assert_announced_intake_abandoned(&flow, &id).await;
        // The reconciler's next look changes nothing.
        let report = reconcile_pending(
            &flow.ctx,
            &ReconcileOptions {
                ignore_graces: true,
                ..ReconcileOptions::default()
            },
        )
        .await
        .unwrap();
        assert_eq!((report.errors, report.intake_abandoned), (0, 0), "{report:?}");
        assert_eq!(flow.count_events("donation.failed").await, 2);
        flow.stop().await;
    }
}

/// Point 11 (reconciler side): a CREATED payment older than 23 h is failed without replaying its create (Stripe
/// may have forgotten the key, and a replay could make a new PaymentIntent).
#[tokio::test]
async fn an_intake_older_than_the_key_is_failed_without_calling_stripe() {
    let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[]).await;
    let req: splitpay::intake::IntakeRequest = serde_json::from_value(serde_json::json!({
        "recommendation_set_id": flow.set.id,
        "donor_id": "cm3donor1",
        "payment_method_type": "card",
    }))
    .unwrap();
    let payment = splitpay::intake::create(&flow.ctx, &req, None).await.unwrap();
    let id = splitpay::domain::ids::SplitPaymentId::parse(&payment.payment.id).unwrap();
    sqlx::query("UPDATE split_payments SET created_at = now() - interval '24 hours'")
        .execute(&flow.db.pool)
        .await
        .unwrap();
    let report = reconcile_pending(&flow.ctx, &ReconcileOptions::default())
        .await
        .unwrap();
    assert_eq!(report.intake_abandoned, 1, "{report:?}");
    let p = flow.payment(&id).await;
    assert_eq!(
        (p.payment.status, p.payment.failure_code.as_deref()),
        (PaymentStatus::Failed, Some("intake_abandoned"))
    );
    assert!(
        flow.control
            .request_times_ms("/v1/payment_intents")
            .await
            .unwrap()
            .is_empty(),
        "no PaymentIntent was created or asked for"
    );
    flow.stop().await;
}

/// Makes the first `times` inserts or updates of `table` whose `column` is `value` fail: a transient database error
/// at one chosen point. The count is a sequence, so a failed (rolled back) write still counts.
async fn refuse_writes(flow: &Flow, table: &str, column: &str, value: &str, times: i64) {
    refuse_writes_where(
        flow,
        table,
        &format!("NEW.{column}::text IS NOT DISTINCT FROM '{value}'"),
        times,
    )
    .await
}

/// As [`refuse_writes`], for the writes whose new row meets `condition` (SQL over `NEW`).
async fn refuse_writes_where(flow: &Flow, table: &str, condition: &str, times: i64) {
    // Test-only SQL built from the test's own constants.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SEQUENCE refused_writes;
         CREATE TABLE refused_writes_max (times BIGINT NOT NULL);
         INSERT INTO refused_writes_max VALUES ({times});
         CREATE FUNCTION refuse_write() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF {condition} THEN
             IF nextval('refused_writes') <= (SELECT times FROM refused_writes_max) THEN
               RAISE EXCEPTION 'injected: write refused';
             END IF;
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_write BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION refuse_write();"
    )))
    .execute(&flow.db.pool)
    .await
    .unwrap();
}

/// Ends [`refuse_writes`]'s refusals.
async fn allow_writes(flow: &Flow) {
    sqlx::raw_sql("UPDATE refused_writes_max SET times = 0")
        .execute(&flow.db.pool)
        .await
        .unwrap();
}

/// How many writes [`refuse_writes`] has seen so far (refused or not, while it refused).
async fn refused_so_far(flow: &Flow) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT last_value FROM refused_writes")
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    n
}

/// Point 6: a transient error (here the insert of the payment's `payment_succeeded` event fails) is never recorded
/// as a contradiction: the event stays unprocessed, is tried again, and the payment is distributed.
#[tokio::test]
async fn a_failed_insert_is_retried_not_recorded_as_a_contradiction() {
    let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[]).await;
    refuse_writes(
        &flow,
        "outbox_events",
        "event_type",
        "recommendation_set.payment_succeeded",
        i64::MAX,
    )
    .await;
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    // The succeeded event arrives and its processing fails on the insert: it stays unprocessed, with no note.
    let mut failed_once = false;
    for _ in 0..100 {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM stripe_events WHERE event_type = 'payment_intent.succeeded' AND processed_at IS NULL",
        )
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
        if n == 1 {
            failed_once = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(failed_once, "the event was received and not processed");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        flow.payment(&id).await.payment.status,
        PaymentStatus::RequiresPayment,
        "rolled back"
    );
    allow_writes(&flow).await;
    // The event is tried again (the sweeper's job, run here at once rather than after its minute).
    sqlx::query("UPDATE stripe_events SET received_at = now() - interval '2 minutes'")
        .execute(&flow.db.pool)
        .await
        .unwrap();
    splitpay::jobs::sweeper::sweep(&flow.db.pool, 60).await.unwrap();
    flow.wait_until(&id, "distributed", |p| {
        p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
    })
    .await;
    let (notes,): (i64,) = sqlx::query_as("SELECT count(*) FROM stripe_events WHERE process_error IS NOT NULL")
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    assert_eq!(notes, 0, "no contradiction was recorded");
    common::money::assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// A card payment by the seeded donor, through intake.
async fn pay_by_card(flow: &Flow) -> splitpay::domain::ids::SplitPaymentId {
    flow.pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await
        .0
}

/// Waits (bounded) until every share of `id` is TRANSFERRED.
async fn all_transferred(
    flow: &Flow,
    id: &splitpay::domain::ids::SplitPaymentId,
) -> splitpay::store::payments::SplitPayment {
    flow.wait_until(id, "every share transferred", |p| {
        p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
    })
    .await
}

/// Issue 11: the event job distributes a succeeded payment itself. When that distribution fails (here its
/// transaction cannot write the first generation's attempt rows, twice: once in the batch that starts succeeded
/// payments together, which then hands the payment to the lone way, and once in the lone distribution), the event
/// stays processed and the payment gets a distribution job, which distributes it: no sweep needed, one transfer per
/// share.
#[tokio::test]
async fn a_failed_distribution_in_the_event_job_is_taken_on_by_a_distribution_job() {
    let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[]).await;
    refuse_writes(&flow, "transfer_attempts", "generation", "1", 2).await;
    let id = pay_by_card(&flow).await;
    let p = all_transferred(&flow, &id).await;
    assert!(
        refused_so_far(&flow).await >= 2,
        "the batch's and the lone distribution were refused"
    );
    assert_eq!(
        jobs(&flow, "splitpay.distribute", id.as_str()).await,
        1,
        "the refused distribution was taken on by one job"
    );
    let (unprocessed, noted): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE processed_at IS NULL), count(*) FILTER (WHERE process_error IS NOT NULL)
           FROM stripe_events",
    )
    .fetch_one(&flow.db.pool)
    .await
    .unwrap();
    assert_eq!(
        (unprocessed, noted),
        (0, 0),
        "the event was processed, with no contradiction"
    );
    assert_eq!(count_transfers(&flow, id.as_str()).await, 2, "one transfer per share");
    assert!(p.allocations.iter().all(|a| a.generation == 1));
    common::money::assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// Issue 11: distribution makes the shares' transfers itself. When recording one fails after Stripe made it (here
/// the first share's attempt outcome cannot be written, twice: once in the batch that records transfers together,
/// which then hands each back to be recorded alone, and once alone), that share gets a transfer job, whose create
/// under the same key gets Stripe's same transfer: one transfer per share, and only that share has a job.
#[tokio::test]
async fn a_transfer_whose_recording_failed_inline_is_taken_on_by_its_job_without_a_second_transfer() {
    let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[]).await;
    // The first share's net is under 2,000; the second's over 2,500.
    refuse_writes_where(
        &flow,
        "transfer_attempts",
        "NEW.outcome IS NOT DISTINCT FROM 'TRANSFERRED' AND NEW.amount_cents < 2500",
        2,
    )
    .await;
    let id = pay_by_card(&flow).await;
    let p = all_transferred(&flow, &id).await;
    assert!(
        refused_so_far(&flow).await >= 2,
        "the batch's and the lone recording were refused"
    );
    let mut with_jobs = 0;
    for a in &p.allocations {
        with_jobs += jobs(&flow, "splitpay.transfer", &a.id).await;
    }
    assert_eq!(with_jobs, 1, "only the share whose recording failed got a job");
    assert_eq!(count_transfers(&flow, id.as_str()).await, 2, "no second transfer");
    assert!(p.allocations.iter().all(|a| a.generation == 1));
    let creates = transfer_create_keys(&flow).await;
    let keys: std::collections::BTreeSet<&String> = creates.iter().collect();
    assert_eq!(
        (creates.len(), keys.len()),
        (3, 2),
        "two shares, one key each; the failed one was sent again under its key: {creates:?}"
    );
    common::money::assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// The idempotency keys of the transfer creates Stripe received, in arrival order.
async fn transfer_create_keys(flow: &Flow) -> Vec<String> {
    common::stripe::transfer_create_keys(&flow.control).await
}

/// Issue 11 review: a share whose first transfer distribution is making itself is leased to that step, so a sweep
/// while Stripe is still answering (here every Stripe call holds its key 1.5 s) finds nothing due and adds no
/// transfer job: the step stays the only driver. Without the lease the share was due at once, and the sweep gave
/// each share a second driver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_adds_no_second_driver_to_a_transfer_distribution_is_making() {
    let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[]).await;
    let id = pay_by_card(&flow).await;
    flow.control.set_latency(0, 0, 1_500).await.unwrap();
    let mut in_flight = false;
    for _ in 0..600 {
        if !flow.control.request_times_ms("/v1/transfers").await.unwrap().is_empty() {
            in_flight = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(in_flight, "a transfer request reached Stripe");
    let p = flow.payment(&id).await;
    for a in &p.allocations {
        assert_eq!(a.status, AllocationStatus::Transferring, "still in flight");
        let due_in = a.next_attempt_at.unwrap() - chrono::Utc::now();
        assert!(
            due_in > chrono::Duration::seconds(5),
            "leased to the step: due in {due_in}"
        );
    }
    // Grace 0: anything due now would be re-enqueued.
    let report = splitpay::jobs::sweeper::sweep(&flow.db.pool, 0).await.unwrap();
    assert_eq!(report.transfers, 0, "{report:?}");
    flow.control.set_latency(0, 0, 0).await.unwrap();
    let p = all_transferred(&flow, &id).await;
    for a in &p.allocations {
        assert_eq!(
            jobs(&flow, "splitpay.transfer", &a.id).await,
            0,
            "no transfer job for {}",
            a.id
        );
        assert_eq!(a.next_attempt_at, None);
    }
    let keys = transfer_create_keys(&flow).await;
    let distinct: std::collections::BTreeSet<&String> = keys.iter().collect();
    assert_eq!((keys.len(), distinct.len()), (2, 2), "one create per share: {keys:?}");
    assert_eq!(count_transfers(&flow, id.as_str()).await, 2);
    common::money::assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// Two recipients, and inline transfer steps leased for 300 ms only.
async fn flow_with_short_lease() -> Flow {
    Flow::start_full(AmountMode::Fixed, &[2_000, 3_000], &[], true, |s| {
        s.inline_transfer_lease_ms = 300;
    })
    .await
}

/// Issue 11 review: a step that outlives its lease (300 ms here; Stripe holds each request 1 s) stops waiting for
/// Stripe's answer, and its share is handed to a transfer job, due a lease later. The job sends the same key: one
/// transfer per share, whichever request made it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_step_that_outlives_its_lease_is_dropped_and_its_job_makes_the_same_transfer() {
    let flow = flow_with_short_lease().await;
    let id = pay_by_card(&flow).await;
    flow.control.set_latency(0, 0, 1_000).await.unwrap();
    let p = all_transferred(&flow, &id).await;
    for a in &p.allocations {
        assert_eq!(a.generation, 1);
        // Its job, and the job's own retry when Stripe still held the dropped request's key (409, in flight).
        let n = jobs(&flow, "splitpay.transfer", &a.id).await;
        assert!(n >= 1, "{} was handed to its job ({n} jobs)", a.id);
    }
    let keys = transfer_create_keys(&flow).await;
    let distinct: std::collections::BTreeSet<&String> = keys.iter().collect();
    assert_eq!(distinct.len(), 2, "one key per share: {keys:?}");
    assert!(
        keys.len() >= 4,
        "each share was sent by its step and again by its job: {keys:?}"
    );
    assert_eq!(count_transfers(&flow, id.as_str()).await, 2, "one transfer per share");
    common::money::assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// Issue 11 review: the lease bounds only the step's talk with Stripe. Recording what Stripe answered is never cut
/// short: here each donation's confirmation takes 0.8 s (a trigger sleeps), past the 300 ms lease, and the steps
/// still record their transfers themselves: no transfer job, one create per share. Cut short, the transfers would
/// have been thrown away and each share handed to a job that sends its key again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_that_outlasts_the_lease_is_not_cut_short() {
    let flow = flow_with_short_lease().await;
    sqlx::raw_sql(
        "CREATE FUNCTION slow_confirm() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.status = 'CONFIRMED' THEN PERFORM pg_sleep(0.8); END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER slow_confirm BEFORE UPDATE ON donations FOR EACH ROW EXECUTE FUNCTION slow_confirm();",
    )
    .execute(&flow.db.pool)
    .await
    .unwrap();
    let id = pay_by_card(&flow).await;
    let p = all_transferred(&flow, &id).await;
    for a in &p.allocations {
        assert_eq!(
            jobs(&flow, "splitpay.transfer", &a.id).await,
            0,
            "{} recorded by its step",
            a.id
        );
    }
    let keys = transfer_create_keys(&flow).await;
    assert_eq!(keys.len(), 2, "one create per share: {keys:?}");
    assert_eq!(count_transfers(&flow, id.as_str()).await, 2);
    common::money::assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// How many jobs for `id` `queue` holds (waiting, running or done).
async fn jobs(flow: &Flow, queue: &str, id: &str) -> i64 {
    let payload = serde_json::to_vec(&serde_json::json!({ "id": id })).unwrap();
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM apalis.jobs WHERE job_type = $1 AND job = $2")
        .bind(queue)
        .bind(&payload)
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    n
}

/// Point 12: the conservation check reads Stripe, so it fails when a transfer is doubled at Stripe or missing
/// there, even though splitpay's own rows still add up.
#[tokio::test]
async fn conservation_against_stripe_fails_on_a_doubled_or_a_missing_transfer() {
    let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[]).await;
    let id = pay_by_card(&flow).await;
    let p = all_transferred(&flow, &id).await;
    let good = common::money::assert_conserved_at_stripe(&flow, &id).await;
    assert_eq!((good.charged_cents, good.transfers_at_stripe), (5_000, 2));
    let conserved = || common::money::conserved_at_stripe(flow.gateway.as_ref(), &flow.db.pool, &id);

    // Doubled: a second transfer of the first allocation at Stripe (another key, same metadata; from the platform's
    // balance, since Stripe refuses more transfers than the charge on one source transaction).
    flow.control.top_up("aud", 100_000).await.unwrap();
    let a = &p.allocations[0];
    let second = flow
        .gateway
        .create_transfer(&CreateTransferParams {
            destination: "acct_rcp0".into(),
            amount_cents: a.net_amount_cents.unwrap(),
            currency: "aud".into(),
            source_transaction: None,
            transfer_group: id.to_string(),
            metadata: BTreeMap::from([
                ("split_payment_id".to_owned(), id.to_string()),
                ("split_allocation_id".to_owned(), a.id.clone()),
                ("generation".to_owned(), "1".to_owned()),
            ]),
            idempotency_key: "a-second-key".into(),
        })
        .await
        .unwrap();
    let money = money_report(&mut flow.db.pool.acquire().await.unwrap(), &id)
        .await
        .unwrap();
    assert!(money.is_conserved(), "splitpay's rows alone cannot see it");
    let err = conserved().await.unwrap_err();
    assert!(err.contains(&second.id), "{err}");

    // Missing: in a fresh payment, an allocation recorded as TRANSFERRED whose transfer Stripe does not hold.
    let (id2, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    let p2 = flow
        .wait_until(&id2, "distributed", |p| {
            p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
        })
        .await;
    sqlx::query("UPDATE split_allocations SET stripe_transfer_id = 'tr_never_made' WHERE id = $1")
        .bind(&p2.allocations[1].id)
        .execute(&flow.db.pool)
        .await
        .unwrap();
    let err = common::money::conserved_at_stripe(flow.gateway.as_ref(), &flow.db.pool, &id2)
        .await
        .unwrap_err();
    assert!(err.contains(&p2.allocations[1].id) || err.contains("tr_"), "{err}");
    flow.stop().await;
}

/// Issue 11: a plain success is applied and distributed by the batch that starts succeeded payments together
/// (`jobs::start_batch`), in one transaction; any other goes the lone way (`apply`, then `distribute`, two
/// transactions). Both must leave exactly the same rows and events. Payment A goes the batch's way. Payment B's row
/// is held by another transaction when its success arrives: the batch skips it without waiting, and the lone way
/// waits for the lock (seen waiting), then applies it. Every row and event of the two payments is then compared,
/// ids and times aside.
#[tokio::test]
async fn a_batched_success_leaves_exactly_what_the_lone_way_leaves() {
    let flow = Flow::start(AmountMode::Fixed, &[2_000, 3_000, 1_234], &[]).await;
    let pool = flow.db.pool.clone();
    let (a, a_intent) = flow.pay_in_browser(PaymentMethodType::Card, Some("cm3donor1")).await;
    flow.confirm(&a_intent, "pm_card_visa", 1).await.unwrap();
    all_transferred(&flow, &a).await;

    let (b, b_intent) = flow.pay_in_browser(PaymentMethodType::Card, Some("cm3donor1")).await;
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM split_payments WHERE id = $1 FOR UPDATE")
        .bind(b.as_str())
        .execute(&mut *holder)
        .await
        .unwrap();
    flow.confirm(&b_intent, "pm_card_visa", 1).await.unwrap();
    common::db::until_waiting_on_locks(&pool, 1).await;
    holder.rollback().await.unwrap();
    all_transferred(&flow, &b).await;

    // Which way each went: the batch writes the transition and the distribution in one transaction (one `now()`),
    // the lone way in two.
    let one_transaction = |id: &splitpay::domain::ids::SplitPaymentId| {
        let pool = pool.clone();
        let id = id.to_string();
        async move {
            sqlx::query_scalar::<_, bool>("SELECT succeeded_at = distributed_at FROM split_payments WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert!(one_transaction(&a).await, "A went the batch's way");
    assert!(!one_transaction(&b).await, "B went the lone way");

    let (snap_a, snap_b) = (snapshot(&pool, &a).await, snapshot(&pool, &b).await);
    assert_eq!(
        snap_a["outbox"].as_array().map(Vec::len),
        Some(3 + 3 + 3 + 1),
        "donation.created, distribution_succeeded and donation.succeeded per share, and payment_succeeded: \
         {snap_a:#}"
    );
    assert_eq!(snap_a, snap_b, "the batch's rows and events are the lone way's");
    for id in [&a, &b] {
        assert_eq!(count_transfers(&flow, id.as_str()).await, 3, "one transfer per share");
        common::money::assert_conserved_at_stripe(&flow, id).await;
    }
    flow.stop().await;
}

/// Every row and event of payment `id`, as JSON with its ids replaced by their role (`P`, `A0`, `T1`, …) and each
/// time by whether it is set, so two payments made alike compare equal.
async fn snapshot(pool: &sqlx::PgPool, id: &splitpay::domain::ids::SplitPaymentId) -> serde_json::Value {
    let one = |sql: &'static str| {
        let pool = pool.clone();
        let id = id.to_string();
        async move {
            sqlx::query_scalar::<_, serde_json::Value>(sql)
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let raw = serde_json::json!({
        "payment": one("SELECT to_jsonb(p) FROM split_payments p WHERE id = $1").await,
        "allocations": one("SELECT jsonb_agg(to_jsonb(a) ORDER BY a.position) FROM split_allocations a
                             WHERE a.split_payment_id = $1").await,
        "attempts": one("SELECT jsonb_agg(to_jsonb(t) ORDER BY a.position, t.generation)
                           FROM transfer_attempts t JOIN split_allocations a ON a.id = t.split_allocation_id
                          WHERE a.split_payment_id = $1").await,
        "donations": one("SELECT jsonb_agg(to_jsonb(d) ORDER BY a.position)
                            FROM donations d JOIN split_allocations a ON a.id = d.split_allocation_id
                           WHERE a.split_payment_id = $1").await,
        "outbox": one("SELECT jsonb_agg(jsonb_build_object('type', o.event_type, 'dedup_key', o.dedup_key,
                                                           'organisation_id', o.organisation_id,
                                                           'payload', o.payload)
                                        ORDER BY o.event_type, o.dedup_key)
                         FROM outbox_events o
                        WHERE o.payload::text LIKE '%' || $1 || '%'
                           OR EXISTS (SELECT 1 FROM donations d JOIN split_allocations a ON a.id = d.split_allocation_id
                                       WHERE a.split_payment_id = $1 AND o.payload::text LIKE '%' || d.id || '%')").await,
        "stripe_events": one("SELECT jsonb_agg(jsonb_build_object('type', e.event_type, 'processed', e.processed_at IS NOT NULL,
                                                                  'error', e.process_error, 'attempts', e.process_attempts)
                                               ORDER BY e.event_type)
                                FROM stripe_events e
                               WHERE e.object_id = (SELECT payment_intent_id FROM split_payments WHERE id = $1)").await,
        "jobs": one("SELECT to_jsonb(count(*)) FROM apalis.jobs j
                      WHERE j.job::text LIKE '%' || $1 || '%'
                         OR EXISTS (SELECT 1 FROM split_allocations a
                                     WHERE a.split_payment_id = $1 AND j.job::text LIKE '%' || a.id || '%')").await,
    });
    // Every id of the payment's rows, longest first (a key holds an allocation id).
    let mut names: Vec<(String, String)> = vec![(id.to_string(), "P".into())];
    let text = |v: &serde_json::Value, k: &str| v[k].as_str().map(str::to_owned);
    for k in ["payment_intent_id", "charge_id", "transfer_group"] {
        if let Some(s) = text(&raw["payment"], k) {
            names.push((s, k.into()));
        }
    }
    for (n, a) in raw["allocations"].as_array().unwrap().iter().enumerate() {
        names.push((text(a, "id").unwrap(), format!("A{n}")));
        if let Some(t) = text(a, "stripe_transfer_id") {
            names.push((t, format!("T{n}")));
        }
    }
    for (n, d) in raw["donations"].as_array().unwrap().iter().enumerate() {
        names.push((text(d, "id").unwrap(), format!("D{n}")));
    }
    names.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
    let mut out = normalise(&raw, &names);
    // The outbox in a stable order after the ids are replaced.
    if let Some(events) = out["outbox"].as_array_mut() {
        events.sort_by_key(|e| e.to_string());
    }
    out
}

fn normalise(v: &serde_json::Value, names: &[(String, String)]) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let timeish = k.ends_with("_at") || k.ends_with("_date") || k == "created";
                    let v = if timeish && !v.is_object() {
                        Value::Bool(!v.is_null())
                    } else {
                        normalise(v, names)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(|v| normalise(v, names)).collect()),
        Value::String(s) => {
            let mut s = s.clone();
            for (id, name) in names {
                s = s.replace(id.as_str(), name);
            }
            Value::String(s)
        }
        other => other.clone(),
    }
}
