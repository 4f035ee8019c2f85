//! The accounts sweep (jobs/account_sweep.rs): a recipient's account fixed at Stripe while its `account.updated`
//! webhook was lost is found, and its parked shares are retried through the webhook's own path, against a real
//! database and the simulator over HTTP. The recipient `acct_rcp1` (link `cm3lnk1`) starts without the `transfers`
//! capability, so its shares park.

mod common;

use std::time::Duration;

use common::accounts::{account_events, audit_rows, link_flags, parked, post_event, transfers_of_share};
use common::flow::Flow;
use common::store_fixtures::pid;
use serde_json::{json, Value};
use splitpay::domain::state::AllocationStatus;
use splitpay::jobs::account_sweep::{account_updated_event, sweep_accounts, sweep_accounts_with, AccountSweepOptions};
use splitpay::store::payments::SplitPayment;
use splitpay::stripe::PaymentGateway;

const ACCOUNT: &str = "acct_rcp1";

/// splitpay's Connect webhook endpoint.
const CONNECT: &str = "/stripe/webhooks/connect";

/// The recipient finishes onboarding at Stripe and both events that say so (`capability.updated`,
/// `account.updated`) are dropped: never delivered, not even retried.
async fn activate_losing_the_webhook(flow: &Flow) {
    flow.control
        .webhook_mode(json!({ "duplicate": false, "drop_next": 2 }))
        .await
        .unwrap();
    flow.control.set_transfers_capability(ACCOUNT, "active").await.unwrap();
    // The simulator hands events to delivery on its own tick: wait (bounded) until both were taken and dropped.
    for _ in 0..100 {
        let mode = flow.control.post("webhooks/mode", json!({})).await.unwrap();
        if mode["drop_next"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mode = flow.control.post("webhooks/mode", json!({})).await.unwrap();
    assert_eq!(mode["drop_next"], 0, "both events were dropped");
    // A dropped event is gone for good; give a delivery that was not dropped time to show up anyway.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        account_events(flow).await.is_empty(),
        "no account.updated reached splitpay"
    );
}

/// Waits (bounded, not a timing goal) until every account.updated in the inbox is processed.
async fn wait_events_processed(flow: &Flow) {
    for _ in 0..600 {
        if account_events(flow).await.iter().all(|(_, processed)| *processed) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "account.updated events left unprocessed: {:?}",
        account_events(flow).await
    );
}

/// `GET /v1/accounts/…` requests the simulator received.
async fn account_reads(flow: &Flow) -> usize {
    common::refunds::stripe_requests(flow, "GET", "/v1/accounts/").await
}

/// Each payment's parked share ends TRANSFERRED on generation 2, with exactly one transfer at Stripe, one audit row
/// by `system` naming a sweep event, and every cent accounted for.
async fn assert_retried_once_by_the_sweep(flow: &Flow, payments: &[SplitPayment]) {
    for p in payments {
        let share = &p.allocations[1];
        let after = flow
            .wait_until(&pid(p), "the sweep's retry", |p| {
                p.allocations[1].status == AllocationStatus::Transferred
            })
            .await;
        assert_eq!(after.allocations[1].generation, 2);
        assert_eq!(
            transfers_of_share(flow, p, &share.id).await.len(),
            1,
            "one transfer per share"
        );
        let audit = audit_rows(flow, &share.id).await;
        assert_eq!(audit.len(), 1, "retried once");
        assert_eq!(audit[0].actor, "system");
        let reason = audit[0].reason.as_deref().unwrap_or_default();
        assert!(
            reason.starts_with("account.updated evt_sweep_acct_acct_rcp1_"),
            "{reason}"
        );
        common::money::assert_conserved_at_stripe(flow, &pid(p)).await;
    }
}

/// Everything the sweep could change besides the checked time: allocations, attempts, audit, outbox, transfer
/// jobs, the inbox's account events, the links.
async fn snapshot(flow: &Flow) -> Value {
    let (v,): (Value,) = sqlx::query_as(
        "SELECT jsonb_build_object(
            'allocations', (SELECT jsonb_agg(to_jsonb(a) ORDER BY a.id) FROM split_allocations a),
            'attempts', (SELECT count(*) FROM transfer_attempts),
            'audit', (SELECT count(*) FROM ops_audit_log),
            'outbox', (SELECT count(*) FROM outbox_events),
            'account_events', (SELECT count(*) FROM stripe_events WHERE event_type = 'account.updated'),
            'transfer_jobs', (SELECT count(*) FROM apalis.jobs WHERE job_type = 'splitpay.transfer'),
            'links', (SELECT jsonb_agg(to_jsonb(l) - 'account_checked_at' ORDER BY l.id)
                        FROM recipient_account_links l))",
    )
    .fetch_one(&flow.db.pool)
    .await
    .unwrap();
    v
}

async fn checked_at(flow: &Flow, link: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar("SELECT account_checked_at FROM recipient_account_links WHERE id = $1")
        .bind(link)
        .fetch_one(&flow.db.pool)
        .await
        .unwrap()
}

const RIGHT_AWAY: AccountSweepOptions = AccountSweepOptions {
    interval_ms: 0,
    limit: 50,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_account_updated_is_made_up_for_and_the_parked_shares_transfer_once_as_system() {
    let (flow, payments) = parked(true, 100, 2).await;
    activate_losing_the_webhook(&flow).await;
    assert_eq!(link_flags(&flow).await, (true, false), "nothing told splitpay");

    let report = sweep_accounts(&flow.ctx).await.unwrap();
    assert_eq!(report.checked, vec![ACCOUNT.to_owned()]);
    assert_eq!(report.ingested.len(), 1, "{report:?}");
    assert!(report.ingested[0].starts_with("evt_sweep_acct_acct_rcp1_"));
    assert_retried_once_by_the_sweep(&flow, &payments).await;
    wait_events_processed(&flow).await;
    assert_eq!(link_flags(&flow).await, (false, true), "Stripe says: transfers only");

    // The real webhook arrives late, older than what the sweep read at Stripe (here: one from before the account was
    // fixed, saying it cannot receive transfers): the newer state stands, nothing is retried or sent again.
    let synthetic = account_events(&flow).await;
    let (synthetic_created,): (chrono::DateTime<chrono::Utc>,) =
        sqlx::query_as("SELECT stripe_created FROM stripe_events WHERE id = $1")
            .bind(&synthetic[0].0)
            .fetch_one(&flow.db.pool)
            .await
            .unwrap();
    let before = snapshot(&flow).await;
    let late = json!({
        "id": "evt_1LateAccountUpdated", "object": "event", "type": "account.updated",
        "created": synthetic_created.timestamp() - 1, "livemode": false, "account": ACCOUNT,
        "data": { "object": {
            "id": ACCOUNT, "object": "account", "charges_enabled": false,
            "capabilities": { "transfers": "inactive" },
        } },
    });
    assert_eq!(
        post_event(&flow, CONNECT, common::flow::CONNECT_WEBHOOK_SECRET, &late).await,
        200
    );
    wait_events_processed(&flow).await;
    assert_eq!(
        link_flags(&flow).await,
        (false, true),
        "the older event changed nothing"
    );
    let after = snapshot(&flow).await;
    assert_eq!(after["allocations"], before["allocations"]);
    assert_eq!(after["audit"], before["audit"]);
    assert_eq!(after["attempts"], before["attempts"]);
    for p in &payments {
        assert_eq!(transfers_of_share(&flow, p, &p.allocations[1].id).await.len(), 1);
    }

    // Nothing is left for the sweep: the account is not asked about again.
    let reads = account_reads(&flow).await;
    let report = sweep_accounts_with(&flow.ctx, RIGHT_AWAY).await.unwrap();
    assert!(report.checked.is_empty(), "{report:?}");
    assert_eq!(account_reads(&flow).await, reads);
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeps_at_once_and_events_of_two_replicas_still_transfer_each_share_once() {
    // Batches of 1: the three shares take three passes of whichever event retries them.
    let (flow, payments) = parked(true, 1, 3).await;
    activate_losing_the_webhook(&flow).await;

    // Two sweeps at once (no interval, so both may ask Stripe), and the event a replica a second later would have
    // made: two events of the account, processed at once by the worker.
    let (ctx_a, ctx_b) = (flow.ctx.clone(), flow.ctx.clone());
    let a = tokio::spawn(async move { sweep_accounts_with(&ctx_a, RIGHT_AWAY).await.unwrap() });
    let b = tokio::spawn(async move { sweep_accounts_with(&ctx_b, RIGHT_AWAY).await.unwrap() });
    let info = flow.gateway.retrieve_account(ACCOUNT).await.unwrap();
    let later = account_updated_event(&info, chrono::Utc::now().timestamp() + 1);
    let stored = splitpay::http::webhooks::ingest_event(&flow.db.pool, later)
        .await
        .unwrap();
    assert_eq!(stored, splitpay::http::webhooks::Ingested::Stored);
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert!(
        a.checked.len() + b.checked.len() >= 1,
        "at least one sweep asked: {a:?} {b:?}"
    );
    // Each event processed twice more at once, beside the worker (a job run again by the sweeper, a second
    // replica): every pass takes the same parked share, and only the compare-and-set decides.
    let mut passes = Vec::new();
    for (event_id, _) in account_events(&flow).await {
        for _ in 0..2 {
            let (ctx, event_id) = (flow.ctx.clone(), event_id.clone());
            passes.push(tokio::spawn(async move {
                // A pass may fail transiently (the worker's job takes the event again); the outcome is checked below.
                let _ = splitpay::jobs::stripe_event::process(&ctx, &event_id).await;
            }));
        }
    }
    for pass in passes {
        pass.await.unwrap();
    }

    assert_retried_once_by_the_sweep(&flow, &payments).await;
    wait_events_processed(&flow).await;
    for p in &payments {
        let share = &p.allocations[1];
        assert_eq!(transfers_of_share(&flow, p, &share.id).await.len(), 1);
        let generations: Vec<i32> = sqlx::query_scalar(
            "SELECT generation FROM transfer_attempts WHERE split_allocation_id = $1 ORDER BY generation",
        )
        .bind(&share.id)
        .fetch_all(&flow.db.pool)
        .await
        .unwrap();
        assert_eq!(generations, vec![1, 2], "one new generation, never a third");
    }
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_still_not_ready_changes_nothing_but_its_checked_time() {
    let (flow, _) = parked(true, 100, 1).await;
    assert_eq!(checked_at(&flow, "cm3lnk1").await, None);
    let before = snapshot(&flow).await;
    let reads = account_reads(&flow).await;

    let report = sweep_accounts(&flow.ctx).await.unwrap();
    assert_eq!(report.checked, vec![ACCOUNT.to_owned()]);
    assert_eq!((report.ready, report.not_ready, report.errors), (0, 1, 0));
    assert!(report.ingested.is_empty());
    assert_eq!(account_reads(&flow).await, reads + 1, "asked Stripe once");
    assert_eq!(snapshot(&flow).await, before, "nothing changed");
    let checked = checked_at(&flow, "cm3lnk1").await.expect("the checked time is set");
    assert!(chrono::Utc::now() - checked < chrono::Duration::seconds(60));
    assert_eq!(
        checked_at(&flow, "cm3lnk0").await,
        None,
        "a recipient with nothing parked is never asked about"
    );

    // Deleted at Stripe: Stripe refuses the account; still nothing changes (its shares wait for a refund).
    let status = reqwest::Client::new()
        .delete(format!("{}v1/accounts/{ACCOUNT}", flow.sim.base_url()))
        .bearer_auth(common::stripe::TEST_KEY)
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "{status}");
    let before = snapshot(&flow).await;
    let report = sweep_accounts_with(&flow.ctx, RIGHT_AWAY).await.unwrap();
    assert_eq!((report.checked.len(), report.not_ready), (1, 1), "{report:?}");
    let after = snapshot(&flow).await;
    assert_eq!(after["allocations"], before["allocations"]);
    assert_eq!(after["account_events"], before["account_events"]);
    assert_eq!(after["links"], before["links"]);

    // Stripe cannot be asked (a 500 on every attempt): nothing changes, and it is asked again next interval.
    flow.control
        .fault(splitpay::stripe::sim::Fault {
            kind: splitpay::stripe::sim::FaultKind::ServerError,
            count: 100,
            path_contains: Some("/v1/accounts/".into()),
            method: Some("GET".into()),
        })
        .await
        .unwrap();
    let report = sweep_accounts_with(&flow.ctx, RIGHT_AWAY).await.unwrap();
    assert_eq!((report.checked.len(), report.errors), (1, 1), "{report:?}");
    assert_eq!(snapshot(&flow).await["allocations"], after["allocations"]);
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_is_asked_about_at_most_once_per_interval() {
    let (flow, _) = parked(true, 100, 1).await;
    let reads = account_reads(&flow).await;
    assert_eq!(sweep_accounts(&flow.ctx).await.unwrap().checked.len(), 1);
    assert_eq!(account_reads(&flow).await, reads + 1);

    // Right after: nothing is due, Stripe is not asked.
    let report = sweep_accounts(&flow.ctx).await.unwrap();
    assert!(report.checked.is_empty(), "{report:?}");
    assert_eq!(account_reads(&flow).await, reads + 1);

    // Once the interval (10 minutes by default) has passed, it is asked again.
    sqlx::query(
        "UPDATE recipient_account_links SET account_checked_at = now() - interval '11 minutes' WHERE id = 'cm3lnk1'",
    )
    .execute(&flow.db.pool)
    .await
    .unwrap();
    assert_eq!(sweep_accounts(&flow.ctx).await.unwrap().checked.len(), 1);
    assert_eq!(account_reads(&flow).await, reads + 2);
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_already_saying_active_gets_its_parked_shares_retried_but_never_one_the_sweep_retried() {
    let (flow, payments) = parked(true, 100, 1).await;
    let share = &payments[0].allocations[1];
    activate_losing_the_webhook(&flow).await;
    // The link already says active (its deactivation event was lost, say): no event would ever turn it on again.
    sqlx::query("UPDATE recipient_account_links SET transfers_active = true WHERE id = 'cm3lnk1'")
        .execute(&flow.db.pool)
        .await
        .unwrap();

    // A share whose current generation a sweep event started, parked again: the sweep leaves it to an operator.
    sqlx::query(
        "INSERT INTO ops_audit_log (actor, command, target_type, target_id, reason, details)
         VALUES ('system', 'retry', 'split_allocation', $1,
                 'account.updated evt_sweep_acct_acct_rcp1_1: acct_rcp1 can receive transfers',
                 '{\"parameters\": {\"plan\": {\"from_generation\": 0, \"to_generation\": 1}}}')",
    )
    .bind(&share.id)
    .execute(&flow.db.pool)
    .await
    .unwrap();
    let reads = account_reads(&flow).await;
    let report = sweep_accounts_with(&flow.ctx, RIGHT_AWAY).await.unwrap();
    assert!(report.checked.is_empty(), "{report:?}");
    assert_eq!(account_reads(&flow).await, reads);

    // Without that: the sweep's event claims the retry though the link said active all along.
    sqlx::query("DELETE FROM ops_audit_log WHERE target_id = $1")
        .bind(&share.id)
        .execute(&flow.db.pool)
        .await
        .unwrap();
    let report = sweep_accounts_with(&flow.ctx, RIGHT_AWAY).await.unwrap();
    assert_eq!(report.ingested.len(), 1, "{report:?}");
    assert_retried_once_by_the_sweep(&flow, &payments).await;
    wait_events_processed(&flow).await;
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auto_retry_off_the_sweep_refreshes_the_flags_and_retries_nothing() {
    let (flow, payments) = parked(false, 100, 1).await;
    let share = &payments[0].allocations[1];
    activate_losing_the_webhook(&flow).await;
    let report = sweep_accounts(&flow.ctx).await.unwrap();
    assert_eq!(report.ingested.len(), 1, "{report:?}");
    wait_events_processed(&flow).await;
    assert_eq!(
        link_flags(&flow).await,
        (false, true),
        "the flags follow Stripe (a transfers-only account)"
    );
    let after = flow.payment(&pid(&payments[0])).await;
    assert_eq!(after.allocations[1].status, AllocationStatus::Parked);
    assert_eq!(after.allocations[1].generation, 1);
    assert!(audit_rows(&flow, &share.id).await.is_empty());
    assert_eq!(transfers_of_share(&flow, &payments[0], &share.id).await.len(), 0);

    // The link now says active: with auto-retry off, the account is not asked about again.
    let reads = account_reads(&flow).await;
    assert!(sweep_accounts_with(&flow.ctx, RIGHT_AWAY)
        .await
        .unwrap()
        .checked
        .is_empty());
    assert_eq!(account_reads(&flow).await, reads);
    flow.stop().await;
}
