//! The events sweep (jobs/event_sweep.rs): refund and dispute events whose webhook never arrived are read from
//! Stripe's event list and taken through like the webhook, once, even when the webhook turns up afterwards or
//! Stripe's list fails mid-way. Real PostgreSQL, the simulator over HTTP, the worker in the test process.

mod common;

use common::flow::Flow;
use common::money::assert_conserved_at_stripe;
use common::refunds::{
    charge_refunded_cents, dashboard_refund, hold_webhooks, open_dispute, pay_by_card, release_webhooks, scalar,
    settle_until_sql, three_shares_paid,
};
use splitpay::domain::plan::{AmountMode, PaymentMethodType};
use splitpay::domain::state::AllocationStatus;
use splitpay::jobs::event_sweep::sweep_events;
use splitpay::store::payments::SplitPayment;
use splitpay::stripe::sim::{Fault, FaultKind};
use splitpay::stripe::PaymentGateway;

/// A dashboard refund and a dispute whose webhooks are all lost: the sweep finds both (after a failed pass that
/// moves nothing), the reversals are made once, each donation is told once; the late webhooks change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_refund_and_dispute_webhooks_are_recovered_from_the_event_list_once() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000, 3_000], &[]).await;
    flow.control.top_up("aud", 1_000_000).await.unwrap();
    let transferred = |p: &splitpay::store::payments::SplitPayment| {
        p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
    };
    let (refunded_id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    let refunded = flow.wait_until(&refunded_id, "transferred", transferred).await;
    let (disputed_id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor2"))
        .await;
    let disputed = flow.wait_until(&disputed_id, "transferred", transferred).await;
    // A first pass with nothing lost: it reads the list and ingests nothing.
    let first = sweep_events(&flow.ctx).await.unwrap();
    assert!(first.complete);
    assert!(first.ingested.is_empty(), "{first:?}");

    // From here every webhook is held back and never delivered (until the end).
    hold_webhooks(&flow).await;
    flow.gateway
        .create_refund(&dashboard_refund(&refunded, 3_000, "dashboard-refund-sweep"))
        .await
        .unwrap();
    open_dispute(&flow, &disputed).await;
    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM refunds").await,
        0,
        "nothing heard yet"
    );
    assert_eq!(scalar(&flow, "SELECT count(*) FROM disputes").await, 0);

    // Stripe's list fails: the pass fails, ingests nothing, and the cursor stays.
    let cursor_before: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT swept_until FROM stripe_event_sweeps")
            .fetch_one(&flow.db.pool)
            .await
            .unwrap();
    fail_event_lists(&flow).await;
    assert!(sweep_events(&flow.ctx).await.is_err());
    let cursor_after: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT swept_until FROM stripe_event_sweeps")
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    assert_eq!(cursor_after, cursor_before);
    flow.control.clear_faults().await.unwrap();

    // The next pass finds them.
    let found = sweep_events(&flow.ctx).await.unwrap();
    assert!(found.complete);
    let types: Vec<String> = sqlx::query_scalar("SELECT event_type FROM stripe_events WHERE id = ANY($1) ORDER BY 1")
        .bind(&found.ingested)
        .fetch_all(&flow.db.pool)
        .await
        .unwrap();
    assert!(types.iter().any(|t| t == "charge.refunded"), "{types:?}");
    assert!(types.iter().any(|t| t == "charge.dispute.funds_withdrawn"), "{types:?}");
    assert!(
        types
            .iter()
            .all(|t| t.starts_with("charge.") || t.starts_with("refund.")),
        "{types:?}"
    );
    settle_until_sql(
        &flow,
        "the refund and the dispute processed",
        600,
        "SELECT ((SELECT count(*) FROM stripe_events WHERE processed_at IS NULL) = 0
                 AND (SELECT count(*) FROM refunds WHERE source <> 'ops') >= 2
                 AND (SELECT count(*) FROM transfer_reversals WHERE status <> 'SUCCEEDED') = 0
                 AND (SELECT count(*) FROM transfer_reversals) > 0)::int::bigint",
    )
    .await;
    // The refund of 3,000 of 6,000 (spread over the three shares) and the whole dispute of the other payment: each
    // of the six donations told once.
    assert_eq!(flow.count_events("donation.refunded").await, 6);
    assert_eq!(scalar(&flow, "SELECT count(*) FROM disputes").await, 1);
    assert_eq!(charge_refunded_cents(&flow, &refunded).await, 3_000);
    let reversals_before = scalar(&flow, "SELECT count(*) FROM transfer_reversals").await;
    let reversed_cents = scalar(
        &flow,
        "SELECT coalesce(sum(amount_cents), 0)::bigint FROM transfer_reversals",
    )
    .await;

    // A pass again, and then the held webhooks arrive: nothing is taken twice.
    let again = sweep_events(&flow.ctx).await.unwrap();
    assert!(again.ingested.is_empty(), "{again:?}");
    release_webhooks(&flow).await;
    settle_until_sql(
        &flow,
        "the late webhooks stored",
        600,
        "SELECT (count(*) FILTER (WHERE processed_at IS NULL) = 0)::int::bigint FROM stripe_events",
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM transfer_reversals").await,
        reversals_before
    );
    assert_eq!(
        scalar(
            &flow,
            "SELECT coalesce(sum(amount_cents), 0)::bigint FROM transfer_reversals"
        )
        .await,
        reversed_cents
    );
    assert_eq!(flow.count_events("donation.refunded").await, 6);
    assert_conserved_at_stripe(&flow, &refunded_id).await;
    assert_conserved_at_stripe(&flow, &disputed_id).await;
    flow.stop().await;
}

/// The simulator's event list filters as Stripe's does: `types[]` (exact), `type` with a `*` wildcard, not both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_list_filters_by_types() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000], &[]).await;
    pay_by_card(&flow, &[]).await;
    let page = flow
        .gateway
        .list_events(&["transfer.created", "payment_intent.succeeded"], 0, None, None)
        .await
        .unwrap();
    let types: Vec<&str> = page.events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types.len(), 2, "{types:?}");
    assert!(types.contains(&"transfer.created") && types.contains(&"payment_intent.succeeded"));
    let all = flow.gateway.list_events(&[], 0, None, None).await.unwrap();
    assert!(all.events.len() > 2);
    flow.stop().await;
}

/// More lost events than a pass reads (here one page of 100): the first pass ingests the newest page and leaves the
/// older ones as a backlog, the next pass reads the backlog, and only then does the cursor move. Every lost event
/// ends in the inbox once, and the refunds are taken through with money conserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_larger_than_a_pass_is_read_over_the_next_passes() {
    let (flow, id, p) = three_shares_paid(&[]).await;
    assert!(sweep_events(&flow.ctx).await.unwrap().complete);
    unheard_refunds_of_a_cent(&flow, &p, 60, "dashboard-refund-backlog").await;
    // What Stripe holds of the swept types now, every page.
    let at_stripe = swept_types_at_stripe(&flow).await;
    assert!(
        at_stripe.len() > 100,
        "{} events: not more than a page",
        at_stripe.len()
    );

    let first = splitpay::jobs::event_sweep::sweep_events_with(&flow.ctx, 1)
        .await
        .unwrap();
    assert!(!first.complete);
    assert_eq!(first.listed, 100);
    let backlog: (Option<String>,) = sqlx::query_as("SELECT backlog_after FROM stripe_event_sweeps")
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    assert!(backlog.0.is_some(), "the older events are left as a backlog");
    let mut passes = 1;
    let mut ingested = first.ingested.clone();
    loop {
        let next = splitpay::jobs::event_sweep::sweep_events_with(&flow.ctx, 1)
            .await
            .unwrap();
        ingested.extend(next.ingested);
        passes += 1;
        if next.complete {
            break;
        }
        assert!(passes < 10, "the backlog does not shrink");
    }
    let mut unique = ingested.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ingested.len(), "each event ingested once");
    for id in &at_stripe {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM stripe_events WHERE id = $1")
            .bind(id)
            .fetch_one(&flow.db.pool)
            .await
            .unwrap();
        assert_eq!(n, 1, "{id} in the inbox");
    }
    let backlog: (Option<String>,) = sqlx::query_as("SELECT backlog_after FROM stripe_event_sweeps")
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    assert!(backlog.0.is_none(), "the backlog is done");
    refunds_taken_through(&flow, 60).await;
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// Stripe's webhooks are held back (never delivered: lost), and `n` dashboard refunds of a cent each are made
/// (keys `{key}-0`, `{key}-1`, …).
async fn unheard_refunds_of_a_cent(flow: &Flow, p: &SplitPayment, n: usize, key: &str) {
    hold_webhooks(flow).await;
    for i in 0..n {
        flow.gateway
            .create_refund(&dashboard_refund(p, 1, &format!("{key}-{i}")))
            .await
            .unwrap();
    }
}

/// The ids of every event of the swept types Stripe holds, every page, newest first.
async fn swept_types_at_stripe(flow: &Flow) -> Vec<String> {
    let mut at_stripe = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = flow
            .gateway
            .list_events(
                &splitpay::jobs::event_sweep::SWEPT_EVENT_TYPES,
                0,
                None,
                after.as_deref(),
            )
            .await
            .unwrap();
        after = page.events.last().and_then(|e| e["id"].as_str()).map(str::to_owned);
        at_stripe.extend(page.events.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
        if !page.has_more {
            break;
        }
    }
    at_stripe
}

/// Waits until the `n` refunds of a cent are taken through (every event processed, every reversal made); they
/// add up to `n` cents.
async fn refunds_taken_through(flow: &Flow, n: i64) {
    let sql = format!(
        "SELECT ((SELECT count(*) FROM stripe_events WHERE processed_at IS NULL) = 0
                 AND (SELECT count(*) FROM refunds) = {n}
                 AND (SELECT count(*) FROM transfer_reversals WHERE status <> 'SUCCEEDED') = 0)::int::bigint"
    );
    settle_until_sql(flow, "the refunds taken through", 600, &sql).await;
    assert_eq!(
        scalar(flow, "SELECT coalesce(sum(amount_cents), 0)::bigint FROM refunds").await,
        n
    );
}

/// Stripe answers its event list with a 500 (the next 100 requests, until the faults are cleared).
async fn fail_event_lists(flow: &Flow) {
    flow.control
        .fault(Fault {
            kind: FaultKind::ServerError,
            count: 100,
            path_contains: Some("/v1/events".into()),
            method: Some("GET".into()),
        })
        .await
        .unwrap();
}

/// How many requests for Stripe's event list the simulator has received (counted on arrival, before their latency).
async fn event_list_requests(flow: &Flow) -> usize {
    flow.control.request_times_ms("/v1/events").await.unwrap().len()
}

async fn until_event_list_requests(flow: &Flow, n: usize) {
    for _ in 0..3_000 {
        if event_list_requests(flow).await >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the simulator never received event list request {n}");
}

/// How many of `ids` the inbox holds.
async fn in_inbox(flow: &Flow, ids: &[String]) -> usize {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM stripe_events WHERE id = ANY($1)")
        .bind(ids)
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    n as usize
}

async fn sweep_position(flow: &Flow) -> (chrono::DateTime<chrono::Utc>, Option<String>) {
    sqlx::query_as("SELECT swept_until, backlog_after FROM stripe_event_sweeps")
        .fetch_one(&flow.db.pool)
        .await
        .unwrap()
}

/// Passes cut mid-way keep the pages they read: 110 lost refunds (three pages of events); the first pass is cut by
/// Stripe failing its second page, the next (on from where the first stopped) is dropped while its second page is
/// in flight, as the tick's timeout drops it. Each keeps the page it read before the cut and the position after it;
/// the third pass reads the rest, and only then does the cursor move. Every lost event ends in the inbox once, and
/// the refunds are taken through once with money conserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_cut_mid_way_keep_the_pages_they_read_and_the_next_goes_on() {
    let (flow, id, p) = three_shares_paid(&[]).await;
    assert!(sweep_events(&flow.ctx).await.unwrap().complete);
    let (cursor, _) = sweep_position(&flow).await;
    unheard_refunds_of_a_cent(&flow, &p, 110, "dashboard-refund-cut").await;
    // What Stripe holds of the swept types now, newest first: the pages a pass reads.
    let at_stripe = swept_types_at_stripe(&flow).await;
    assert!(at_stripe.len() > 200, "{} events: not three pages", at_stripe.len());
    // Every Stripe request now takes 1.5 s: time to cut a pass while its second page is in flight.
    flow.control.set_latency(1_500, 1_500, 0).await.unwrap();

    // The first pass: Stripe fails its second page (the fault is armed once that request has arrived).
    let requests = event_list_requests(&flow).await;
    let (cut, ()) = tokio::join!(sweep_events(&flow.ctx), async {
        until_event_list_requests(&flow, requests + 2).await;
        fail_event_lists(&flow).await;
    });
    assert!(cut.is_err(), "{cut:?}");
    flow.control.clear_faults().await.unwrap();
    assert_eq!(
        in_inbox(&flow, &at_stripe[..100]).await,
        100,
        "the page read before the failed one is kept"
    );
    assert_eq!(in_inbox(&flow, &at_stripe[100..]).await, 0);
    assert_eq!(
        sweep_position(&flow).await,
        (cursor, Some(at_stripe[99].clone())),
        "the cursor stays; the next pass goes on after the page read"
    );

    // The second pass goes on from there and is dropped while its second page is in flight.
    let requests = event_list_requests(&flow).await;
    tokio::select! {
        done = sweep_events(&flow.ctx) => panic!("the pass was not cut: {done:?}"),
        () = until_event_list_requests(&flow, requests + 2) => {}
    }
    assert_eq!(
        in_inbox(&flow, &at_stripe[..200]).await,
        200,
        "the page read before the cut is kept"
    );
    assert_eq!(in_inbox(&flow, &at_stripe[200..]).await, 0);
    assert_eq!(sweep_position(&flow).await, (cursor, Some(at_stripe[199].clone())));

    // The third pass reads the rest, and the cursor moves.
    flow.control.set_latency(0, 0, 0).await.unwrap();
    let last = sweep_events(&flow.ctx).await.unwrap();
    assert!(last.complete, "{last:?}");
    assert_eq!(last.listed as usize, at_stripe.len() - 200);
    assert_eq!(
        last.ingested,
        at_stripe[200..].iter().rev().cloned().collect::<Vec<_>>()
    );
    let (moved, backlog) = sweep_position(&flow).await;
    assert!(moved > cursor && backlog.is_none(), "{moved} {backlog:?}");
    assert_eq!(in_inbox(&flow, &at_stripe).await, at_stripe.len());
    refunds_taken_through(&flow, 110).await;
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}
