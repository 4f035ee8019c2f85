//! Parked shares get out (issue 8, points 1 and 4): `splitpay ops retry` and the automatic retry when Stripe's
//! `account.updated` says a recipient's account can receive transfers, against a real database and the simulator
//! over HTTP. The recipient `acct_rcp1` starts without the `transfers` capability, so its share parks.

mod common;

use std::time::Duration;

use clap::Parser;
use common::accounts::{account_events, audit_rows, link_flags, post_event, transfers_of_share};
use common::flow::Flow;
use common::store_fixtures::pid;
use serde_json::Value;
use splitpay::domain::state::AllocationStatus;
use splitpay::store::payments::SplitPayment;
use splitpay::stripe::{CreateTransferParams, PaymentGateway};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    ops: splitpay::ops::OpsArgs,
}

/// Runs `ops ARGS` in-process on the flow's context (as `main` does): exit code, stdout, stderr.
async fn ops(flow: &Flow, args: &[&str]) -> (u8, String, String) {
    let cli = Cli::try_parse_from(std::iter::once("ops").chain(args.iter().copied())).expect("valid usage");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let outcome = splitpay::ops::run(&cli.ops, &flow.ctx, &mut out, &mut err)
        .await
        .unwrap();
    (
        outcome.code(),
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

/// As [`common::accounts::parked`], each payment's first share TRANSFERRED and its parked share on generation 1.
async fn parked(auto_retry: bool, batch: i64, payments: usize) -> (Flow, Vec<SplitPayment>) {
    let (flow, done) = common::accounts::parked(auto_retry, batch, payments).await;
    for p in &done {
        assert_eq!(p.allocations[0].status, AllocationStatus::Transferred);
        assert_eq!(p.allocations[1].generation, 1);
    }
    (flow, done)
}

/// Everything a retry could change: allocations, transfer generations, audit rows, outbox events, transfer jobs.
async fn snapshot(flow: &Flow) -> Value {
    let (v,): (Value,) = sqlx::query_as(
        "SELECT jsonb_build_object(
            'allocations', (SELECT jsonb_agg(to_jsonb(a) ORDER BY a.id) FROM split_allocations a),
            'attempts', (SELECT jsonb_agg(to_jsonb(t) ORDER BY t.split_allocation_id, t.generation)
                           FROM transfer_attempts t),
            'audit', (SELECT count(*) FROM ops_audit_log),
            'outbox', (SELECT count(*) FROM outbox_events),
            'transfer_jobs', (SELECT count(*) FROM apalis.jobs WHERE job_type = 'splitpay.transfer'))",
    )
    .fetch_one(&flow.db.pool)
    .await
    .unwrap();
    v
}

/// `POST /v1/transfers` requests the simulator received.
async fn transfer_posts(flow: &Flow) -> usize {
    let log = flow.control.get("requests").await.unwrap();
    log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["method"] == "POST" && e["path"] == "/v1/transfers")
        .count()
}

/// Waits (bounded, not a timing goal) until the parked recipient's link says `transfers_active`.
async fn wait_transfers_active(flow: &Flow) {
    for _ in 0..600 {
        if link_flags(flow).await.1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("account.updated never reached the link");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_retry_after_the_account_is_fixed_transfers_on_a_new_key_once() {
    let (flow, payments) = parked(false, 100, 1).await;
    let p = &payments[0];
    let share = &p.allocations[1];
    let first_key = share.idempotency_key.clone().unwrap();
    flow.control
        .set_transfers_capability("acct_rcp1", "active")
        .await
        .unwrap();
    // Auto-retry is off here: the event refreshes the flags and retries nothing.
    wait_transfers_active(&flow).await;
    assert_eq!(link_flags(&flow).await, (false, true));

    let (code, out, err) = ops(
        &flow,
        &[
            "retry",
            &share.id,
            "--wait",
            "--yes",
            "--actor",
            "alice",
            "--reason",
            "onboarding finished",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out} {err}");
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["result"], "new_generation");
    assert_eq!(report["generation"], 2);
    assert_eq!(report["outcome"]["status"], "TRANSFERRED", "{report}");

    let after = flow.payment(&pid(p)).await;
    let a = &after.allocations[1];
    assert_eq!(a.status, AllocationStatus::Transferred);
    assert_eq!(a.generation, 2);
    let key = a.idempotency_key.clone().unwrap();
    assert_ne!(key, first_key, "a new generation has a new key");
    assert_eq!(report["idempotency_key"], key.as_str());
    let at_stripe = transfers_of_share(&flow, p, &share.id).await;
    assert_eq!(at_stripe.len(), 1, "exactly one transfer for the share");
    assert_eq!(Some(at_stripe[0].id.as_str()), a.stripe_transfer_id.as_deref());
    assert_eq!(Some(at_stripe[0].amount_cents), a.net_amount_cents);
    assert_eq!(at_stripe[0].metadata.get("generation").map(String::as_str), Some("2"));
    assert_eq!(report["outcome"]["stripe_transfer_id"], at_stripe[0].id.as_str());
    common::money::assert_conserved_at_stripe(&flow, &pid(p)).await;

    let audit = audit_rows(&flow, &share.id).await;
    assert_eq!(audit.len(), 1);
    assert_eq!((audit[0].actor.as_str(), audit[0].command.as_str()), ("alice", "retry"));
    assert_eq!(audit[0].reason.as_deref(), Some("onboarding finished"));
    assert_eq!(audit[0].details["result"], "new_generation");
    assert_eq!(audit[0].details["parameters"]["plan"]["to_generation"], 2);

    // The share's donation is confirmed; every event about it matches the contract.
    let events = flow.events(&share.id).await;
    let types: Vec<_> = events.iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect();
    assert!(
        types.contains(&"recommendation_set.distribution_succeeded".to_owned()),
        "{types:?}"
    );
    for event in events.iter().chain(flow.events(&p.payment.id).await.iter()) {
        common::contract::validate_against_contract(event).unwrap_or_else(|e| panic!("{e}: {event}"));
    }
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_retry_refuses_what_it_cannot_retry_and_dry_run_changes_nothing() {
    let (flow, payments) = parked(false, 100, 1).await;
    let p = &payments[0];
    let (done, share) = (&p.allocations[0], &p.allocations[1]);
    let before = snapshot(&flow).await;
    let posts = transfer_posts(&flow).await;

    // TRANSFERRED: nothing to retry, says which transfer.
    let (code, _, err) = ops(&flow, &["retry", &done.id, "--yes"]).await;
    assert_eq!(code, 1, "{err}");
    let tr = done.stripe_transfer_id.as_deref().unwrap();
    assert!(
        err.contains(&format!("already transferred as {tr}, nothing to retry")),
        "{err}"
    );

    // The account still cannot receive transfers: Stripe says why; nothing changes.
    let (code, _, err) = ops(&flow, &["retry", &share.id, "--yes", "--wait"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("acct_rcp1 cannot receive transfers"), "{err}");
    assert!(err.contains("capability is inactive"), "{err}");
    assert!(err.contains("Nothing changed"), "{err}");

    // Bad usage: not an allocation id.
    let (code, _, err) = ops(&flow, &["retry", "spay_notanallocation", "--yes"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("salc_"), "{err}");
    let (code, _, err) = ops(&flow, &["retry", "salc_0000000000000000000000000", "--yes"]).await;
    assert!(code == 1 || code == 2, "{err}");

    assert_eq!(snapshot(&flow).await, before, "a refused retry writes nothing");
    assert_eq!(transfer_posts(&flow).await, posts, "and makes no transfer");

    // Fixed at Stripe (auto-retry off): --dry-run reads Stripe's answer and prints the plan, changes nothing.
    flow.control
        .set_transfers_capability("acct_rcp1", "active")
        .await
        .unwrap();
    wait_transfers_active(&flow).await;
    let before = snapshot(&flow).await;
    let (code, out, err) = ops(&flow, &["retry", &share.id, "--dry-run", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let plan: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(plan["dry_run"]["readiness"]["ready"], true, "{plan}");
    assert_eq!(plan["dry_run"]["plan"]["new_generation"], 2, "{plan}");
    assert_eq!(snapshot(&flow).await, before, "--dry-run writes nothing");
    assert_eq!(transfer_posts(&flow).await, posts, "--dry-run makes no transfer");
    assert_eq!(
        flow.payment(&pid(p)).await.allocations[1].status,
        AllocationStatus::Parked
    );
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_retry_records_a_parked_generation_that_reached_stripe_instead_of_sending_another() {
    let (flow, payments) = parked(false, 100, 1).await;
    let p = &payments[0];
    let share = &p.allocations[1];
    flow.control
        .set_transfers_capability("acct_rcp1", "active")
        .await
        .unwrap();
    wait_transfers_active(&flow).await;
    // Generation 1's transfer reaches Stripe after the share was parked (a request that outlived its answer): the
    // frozen parameters and metadata of generation 1, sent again on another key.
    let (destination, amount, source, group, metadata): (String, i64, String, String, sqlx::types::Json<_>) =
        sqlx::query_as(
            "SELECT destination_account_id, amount_cents, source_transaction, transfer_group, metadata
               FROM transfer_attempts WHERE split_allocation_id = $1 AND generation = 1",
        )
        .bind(&share.id)
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    let late = flow
        .gateway
        .create_transfer(&CreateTransferParams {
            destination,
            amount_cents: amount,
            currency: "aud".into(),
            source_transaction: Some(source),
            transfer_group: group,
            metadata: metadata.0,
            idempotency_key: format!("test:late:{}", share.id),
        })
        .await
        .unwrap();
    let posts = transfer_posts(&flow).await;

    let (code, out, err) = ops(&flow, &["retry", &share.id, "--yes", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["result"], "found_at_stripe", "{report}");
    assert_eq!(report["stripe_transfer_id"], late.id.as_str());
    assert_eq!(transfer_posts(&flow).await, posts, "nothing resent");

    let a = &flow.payment(&pid(p)).await.allocations[1];
    assert_eq!(a.status, AllocationStatus::Transferred);
    assert_eq!(a.generation, 1, "no new generation");
    assert_eq!(a.stripe_transfer_id.as_deref(), Some(late.id.as_str()));
    assert_eq!(transfers_of_share(&flow, p, &share.id).await.len(), 1);
    common::money::assert_conserved_at_stripe(&flow, &pid(p)).await;
    let audit = audit_rows(&flow, &share.id).await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].details["result"], "found_at_stripe");
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_start_exactly_one_generation() {
    let (flow, payments) = parked(false, 100, 1).await;
    let p = &payments[0];
    let share = &p.allocations[1];
    flow.control
        .set_transfers_capability("acct_rcp1", "active")
        .await
        .unwrap();
    wait_transfers_active(&flow).await;

    let runs = futures_util::future::join_all(["ann", "bob", "cat", "dan"].map(|actor| {
        let flow = &flow;
        let id = share.id.clone();
        async move { ops(flow, &["retry", &id, "--yes", "--actor", actor]).await }
    }))
    .await;
    let codes: Vec<u8> = runs.iter().map(|r| r.0).collect();
    assert_eq!(codes.iter().filter(|&&c| c == 0).count(), 1, "{runs:?}");
    assert_eq!(codes.iter().filter(|&&c| c == 1).count(), 3, "{runs:?}");
    for (code, _, err) in &runs {
        if *code == 1 {
            assert!(
                err.contains("in progress") || err.contains("already transferred") || err.contains("moved"),
                "a clear refusal: {err}"
            );
        }
    }
    let after = flow
        .wait_until(&pid(p), "the retried share", |p| {
            p.allocations[1].status == AllocationStatus::Transferred
        })
        .await;
    assert_eq!(after.allocations[1].generation, 2, "exactly one new generation");
    let (generations,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM transfer_attempts WHERE split_allocation_id = $1")
            .bind(&share.id)
            .fetch_one(&flow.db.pool)
            .await
            .unwrap();
    assert_eq!(generations, 2);
    assert_eq!(audit_rows(&flow, &share.id).await.len(), 1);
    assert_eq!(transfers_of_share(&flow, p, &share.id).await.len(), 1);
    common::money::assert_conserved_at_stripe(&flow, &pid(p)).await;
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_updated_retries_shares_parked_for_account_reasons_once_as_system() {
    // Batches of 1: three shares take three passes of the event.
    let (flow, payments) = parked(true, 1, 4).await;
    // One share parked for another reason stays parked.
    let other = &payments[3].allocations[1];
    sqlx::query("UPDATE split_allocations SET failure_code = 'retry_window_elapsed' WHERE id = $1")
        .bind(&other.id)
        .execute(&flow.db.pool)
        .await
        .unwrap();
    // Stripe delivers the event twice (the same id).
    flow.control
        .webhook_mode(serde_json::json!({ "duplicate": true }))
        .await
        .unwrap();
    flow.control
        .set_transfers_capability("acct_rcp1", "active")
        .await
        .unwrap();

    let mut done = Vec::new();
    for p in &payments[..3] {
        let after = flow
            .wait_until(&pid(p), "the automatic retry", |p| {
                p.allocations[1].status == AllocationStatus::Transferred
            })
            .await;
        assert_eq!(after.allocations[1].generation, 2);
        assert_eq!(transfers_of_share(&flow, p, &p.allocations[1].id).await.len(), 1);
        common::money::assert_conserved_at_stripe(&flow, &pid(p)).await;
        let audit = audit_rows(&flow, &p.allocations[1].id).await;
        assert_eq!(audit.len(), 1, "retried once");
        assert_eq!(audit[0].actor, "system");
        assert!(
            audit[0].reason.as_deref().unwrap().starts_with("account.updated evt_"),
            "{:?}",
            audit[0].reason
        );
        for event in flow.events(&p.allocations[1].id).await {
            common::contract::validate_against_contract(&event).unwrap_or_else(|e| panic!("{e}: {event}"));
        }
        done.push(after);
    }
    assert_eq!(link_flags(&flow).await, (false, true));
    let events = account_events(&flow).await;
    for _ in 0..600 {
        if account_events(&flow).await.iter().all(|(_, processed)| *processed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!events.is_empty());
    let left = flow.payment(&pid(&payments[3])).await.allocations[1].clone();
    assert_eq!(left.status, AllocationStatus::Parked, "not an account reason");
    assert_eq!(left.generation, 1);
    assert!(audit_rows(&flow, &left.id).await.is_empty());

    // The event processed again (a second replica, a replay): nothing more happens.
    let (last, _) = events.last().unwrap().clone();
    let before = snapshot(&flow).await;
    sqlx::query("UPDATE stripe_events SET processed_at = NULL WHERE id = $1")
        .bind(&last)
        .execute(&flow.db.pool)
        .await
        .unwrap();
    splitpay::jobs::stripe_event::process(&flow.ctx, &last).await.unwrap();
    flow.control.redeliver(&last).await.unwrap();
    let after = snapshot(&flow).await;
    assert_eq!(after["allocations"], before["allocations"]);
    assert_eq!(after["audit"], before["audit"]);
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auto_retry_off_account_updated_refreshes_the_flags_and_leaves_shares_parked() {
    let (flow, payments) = parked(false, 100, 1).await;
    assert_eq!(link_flags(&flow).await, (true, false));
    let posts = transfer_posts(&flow).await;
    flow.control
        .set_transfers_capability("acct_rcp1", "active")
        .await
        .unwrap();
    wait_transfers_active(&flow).await;
    assert_eq!(link_flags(&flow).await, (false, true));
    for _ in 0..600 {
        if account_events(&flow).await.iter().all(|(_, processed)| *processed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(account_events(&flow).await.iter().all(|(_, processed)| *processed));
    let share = &flow.payment(&pid(&payments[0])).await.allocations[1];
    assert_eq!(share.status, AllocationStatus::Parked);
    assert_eq!(share.generation, 1);
    assert!(audit_rows(&flow, &share.id).await.is_empty());
    assert_eq!(transfer_posts(&flow).await, posts);

    // Back to inactive: both flags follow Stripe's word (the simulator's account takes charges only while its
    // transfers capability is active), `charges_enabled` included, though the platform linked it as enabled.
    flow.control
        .set_transfers_capability("acct_rcp1", "inactive")
        .await
        .unwrap();
    for _ in 0..600 {
        if !link_flags(&flow).await.1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(link_flags(&flow).await, (false, false));
    flow.stop().await;
}

fn account_updated(id: &str, created: i64, active: bool) -> Value {
    serde_json::json!({
        "id": id, "object": "event", "type": "account.updated", "created": created, "livemode": false,
        "account": "acct_rcp1", "api_version": "2025-03-31.basil", "pending_webhooks": 1,
        "request": { "id": null, "idempotency_key": null },
        "data": { "object": {
            "id": "acct_rcp1", "object": "account", "charges_enabled": active, "payouts_enabled": active,
            "capabilities": { "transfers": if active { "active" } else { "inactive" } },
        } },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_endpoint_takes_its_own_secret_and_applies_account_events_in_stripe_order() {
    let (flow, _) = parked(false, 100, 1).await;
    const CONNECT: &str = "/stripe/webhooks/connect";
    let now = chrono::Utc::now().timestamp();
    let newer = account_updated("evt_test_newer", now + 100, true);
    let older = account_updated("evt_test_older", now - 100, false);

    // Each endpoint verifies with its own secret only; a refused event is not stored.
    assert_eq!(
        post_event(&flow, CONNECT, common::flow::WEBHOOK_SECRET, &newer).await,
        400
    );
    assert_eq!(
        post_event(&flow, "/stripe/webhooks", common::flow::CONNECT_WEBHOOK_SECRET, &newer).await,
        400
    );
    assert!(account_events(&flow).await.is_empty());

    // The newer event, then the older one: the older does not overwrite.
    assert_eq!(
        post_event(&flow, CONNECT, common::flow::CONNECT_WEBHOOK_SECRET, &newer).await,
        200
    );
    wait_transfers_active(&flow).await;
    assert_eq!(
        post_event(&flow, CONNECT, common::flow::CONNECT_WEBHOOK_SECRET, &older).await,
        200
    );
    assert_eq!(
        post_event(&flow, CONNECT, common::flow::CONNECT_WEBHOOK_SECRET, &older).await,
        200,
        "a duplicate"
    );
    for _ in 0..600 {
        let events = account_events(&flow).await;
        if events.len() == 2 && events.iter().all(|(_, processed)| *processed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(account_events(&flow).await.len(), 2, "deduplicated by event id");
    assert_eq!(link_flags(&flow).await, (true, true), "the older event changed nothing");

    // Two events of the same second that disagree: Stripe's current answer decides (the account is inactive).
    let (a, b) = (
        account_updated("evt_test_tie_a", now + 200, true),
        account_updated("evt_test_tie_b", now + 200, false),
    );
    assert_eq!(
        post_event(&flow, CONNECT, common::flow::CONNECT_WEBHOOK_SECRET, &a).await,
        200
    );
    assert_eq!(
        post_event(&flow, CONNECT, common::flow::CONNECT_WEBHOOK_SECRET, &b).await,
        200
    );
    for _ in 0..600 {
        if account_events(&flow).await.iter().all(|(_, processed)| *processed) && !link_flags(&flow).await.1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        link_flags(&flow).await,
        (false, false),
        "Stripe's answer: neither charges nor transfers"
    );
    flow.stop().await;
}
