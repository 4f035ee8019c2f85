//! Review findings on refunds (issue 8, stop 15), each with its test: real PostgreSQL, the simulator over HTTP, the
//! worker in the test process.

mod common;

use common::flow::Flow;
use common::money::assert_conserved_at_stripe;
use common::refunds::{
    charge_refunded_cents, dashboard_refund, donation_of, fault_posts, hold_webhooks, lose_reversal_answers,
    open_dispute, ops_refund, parked_json, parts_taken, past_in_flight_margin, pay_by_card, release_webhooks, scalar,
    settle_until_sql, stripe_requests, three_shares_paid,
};
use splitpay::domain::ids::SplitAllocationId;
use splitpay::domain::plan::AmountMode;
use splitpay::domain::state::AllocationStatus;
use splitpay::store::refunds::record_stripe_refund;
use splitpay::stripe::sim::FaultKind;
use splitpay::stripe::PaymentGateway;

/// Covers one allocation's waiting parts in its own transaction, as the transfer job and the reconciler each do.
async fn cover(flow: &Flow, id: &SplitAllocationId) {
    let mut tx = flow.db.pool.begin().await.unwrap();
    splitpay::jobs::refunds::settle_waiting_parts(&flow.ctx, &mut tx, id)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// Finding a: two covers of the same waiting part at once (the transfer job settling and the refunds reconciler)
/// used to read the part before locking, and both refunded the donation. Now the second finds it covered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_covers_of_a_waiting_part_at_once_refund_the_donation_once() {
    let (flow, id, p) = three_shares_paid(&[]).await;
    // Stripe's webhook for the refund is held back: the test records the refund with parts waiting, as they are
    // while a share's transfer is in flight.
    hold_webhooks(&flow).await;
    let info = flow
        .gateway
        .create_refund(&dashboard_refund(&p, 600, "dashboard-refund-race"))
        .await
        .unwrap();
    let parts = [100_i64, 200, 300];
    let mut tx = flow.db.pool.begin().await.unwrap();
    let row = record_stripe_refund(&mut tx, &id, &info, "external").await.unwrap();
    for (a, part) in p.allocations.iter().zip(parts) {
        sqlx::query("INSERT INTO refund_parts (refund_id, split_allocation_id, amount_cents) VALUES ($1, $2, $3)")
            .bind(row.id)
            .bind(&a.id)
            .bind(part)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    sqlx::query("UPDATE refunds SET attributed_at = now() WHERE id = $1")
        .bind(row.id)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    for a in &p.allocations {
        let aid = SplitAllocationId::parse(&a.id).unwrap();
        tokio::join!(cover(&flow, &aid), cover(&flow, &aid));
    }
    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM refund_parts WHERE covered_at IS NULL").await,
        0
    );
    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM transfer_reversals").await,
        3,
        "one reversal per part"
    );
    for (a, part) in p.allocations.iter().zip(parts) {
        let (_, refunded, _, events) = donation_of(&flow, a, "donation.refunded").await;
        assert_eq!(refunded, part, "refunded once: {}", a.id);
        assert_eq!(events.len(), 1);
    }

    // Stripe's webhook arrives: the refund is recorded already, nothing is added; the reversals are made once.
    release_webhooks(&flow).await;
    settle_until_sql(
        &flow,
        "the refund's webhook processed and the reversals made",
        600,
        "SELECT (count(*) FILTER (WHERE event_type = 'charge.refunded' AND processed_at IS NOT NULL) = 1
                 AND (SELECT count(*) FROM transfer_reversals WHERE status = 'PENDING') = 0)::int::bigint
           FROM stripe_events",
    )
    .await;
    assert_eq!(scalar(&flow, "SELECT count(*) FROM refunds").await, 1);
    assert_eq!(flow.count_events("donation.refunded").await, 3);
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// Finding d: an `ops refund` intent whose answer was lost, re-sent more than a day later when Stripe may have
/// pruned its key, first lists the charge's refunds and adopts the one Stripe made: never a second refund.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ops_refund_resent_after_its_key_may_be_pruned_adopts_the_refund_stripe_made() {
    let (flow, id, p) = three_shares_paid(&[1]).await;
    let a1 = p.allocations[1].clone();
    let net1 = a1.net_amount_cents.unwrap();
    // The refund's own webhook is held back (it would record the refund), and Stripe's answer is lost.
    hold_webhooks(&flow).await;
    fault_posts(&flow, FaultKind::LoseResponse, 20, "/v1/refunds").await;
    let flags = ["--yes", "--actor", "alice"];
    let out = ops_refund(&flow, &a1.id, &flags);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(charge_refunded_cents(&flow, &p).await, net1, "Stripe made it once");
    flow.control.clear_faults().await.unwrap();

    // A day passes: Stripe's key has expired (the simulator's clock), and the intent is a day old.
    flow.control.advance_clock(25 * 3_600).await.unwrap();
    sqlx::query("UPDATE refunds SET created_at = created_at - interval '25 hours'")
        .execute(&flow.db.pool)
        .await
        .unwrap();
    let out = ops_refund(&flow, &a1.id, &flags);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("already made refund"), "{stderr}");
    assert_eq!(charge_refunded_cents(&flow, &p).await, net1, "never a second refund");
    assert_eq!(stripe_requests(&flow, "POST", "/v1/refunds").await, 1);
    assert_eq!(
        flow.payment(&id).await.allocations[1].status,
        AllocationStatus::Refunded
    );
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM refunds WHERE status = 'SUCCEEDED' AND source = 'ops'"
        )
        .await,
        1
    );

    // The held webhook arrives: the refund is recorded already.
    release_webhooks(&flow).await;
    settle_until_sql(
        &flow,
        "the refund's webhook processed",
        600,
        "SELECT (count(*) FILTER (WHERE event_type = 'charge.refunded' AND processed_at IS NOT NULL) = 1)::int::bigint
           FROM stripe_events",
    )
    .await;
    assert_eq!(scalar(&flow, "SELECT count(*) FROM refunds").await, 1);
    assert_eq!(flow.count_events("donation.refunded").await, 1);
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// Finding b (its listing): a reversal made for `ops refund --reverse-transfer` whose refund Stripe then refuses
/// (here: the charge was disputed meanwhile, and splitpay has not heard yet) leaves the money on the platform's
/// balance; `ops parked` lists it for an operator instead of losing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_whose_refund_stripe_refused_is_listed_by_ops_parked() {
    let (flow, id, p) = three_shares_paid(&[]).await;
    hold_webhooks(&flow).await;
    open_dispute(&flow, &p).await;
    let a0 = p.allocations[0].clone();
    let out = ops_refund(&flow, &a0.id, &["--reverse-transfer", "--yes", "--actor", "alice"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Stripe refused the refund"), "{stderr}");
    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM refunds WHERE status = 'FAILED'").await,
        1
    );

    let parked = parked_json(&flow);
    let stranded = parked["reversed_without_refund"].as_array().unwrap();
    assert_eq!(stranded.len(), 1, "{parked}");
    assert_eq!(stranded[0]["split_allocation_id"], a0.id.as_str());
    assert_eq!(stranded[0]["amount_cents"], a0.net_amount_cents.unwrap());
    let table = String::from_utf8_lossy(&flow.ops(&["parked"]).stdout).into_owned();
    assert!(
        table.contains("reversed for a refund Stripe refused (on the platform's balance): 1"),
        "{table}"
    );

    // The dispute's webhooks arrive: its part of the first share takes that reversal (review M1), instead of
    // booking the share as the platform's loss while its money sits on the platform.
    release_webhooks(&flow).await;
    settle_until_sql(
        &flow,
        "the dispute's parts covered",
        600,
        "SELECT (count(*) = 3 AND count(*) FILTER (WHERE covered_at IS NULL) = 0)::int::bigint FROM refund_parts",
    )
    .await;
    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM transfer_reversals WHERE split_allocation_id = (SELECT id FROM split_allocations ORDER BY position LIMIT 1)").await,
        1,
        "the first share is reversed once"
    );
    let nets: i64 = p.allocations.iter().map(|a| a.net_amount_cents.unwrap()).sum();
    let (reversed, lost) = parts_taken(&flow).await;
    assert_eq!(reversed, nets);
    assert_eq!(
        lost,
        p.payment.total_amount_cents - nets,
        "the platform bears the fees only"
    );
    let parked = parked_json(&flow);
    assert_eq!(parked["reversed_without_refund"], serde_json::json!([]), "{parked}");
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// Finding 5 and review F3 (stop 18): an `ops refund --reverse-transfer` intent left open (its reversal was
/// refused for now) when the charge is disputed would make the reversal, then have its refund refused by Stripe
/// (`charge_disputed`): the recipient's money stranded on the platform; and its pending reversal held the transfer
/// against the dispute's own part, so the platform bore that share. Now the withdrawal closes the intent (FAILED,
/// audited as `system`), its reversal is canceled after a lookup, and the dispute reverses the share itself; the
/// command run again is refused and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispute_closes_an_open_ops_refund_and_reverses_the_share_itself() {
    let (flow, id, p) = three_shares_paid(&[]).await;
    let a0 = p.allocations[0].clone();
    // Stripe refuses the reversal for now (429, not applied): the intent stays open with its reversal PENDING.
    fault_posts(&flow, FaultKind::RateLimit, 1_000, "/reversals").await;
    let flags = ["--reverse-transfer", "--yes", "--actor", "alice"];
    let out = ops_refund(&flow, &a0.id, &flags);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM refunds WHERE source = 'ops' AND status NOT IN ('SUCCEEDED', 'FAILED')"
        )
        .await,
        1,
        "the intent is open"
    );
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM transfer_reversals WHERE status = 'PENDING'"
        )
        .await,
        1
    );
    // Stripe keeps refusing reversals (429) until the lookup below.

    // The charge is disputed: the withdrawal closes the open intent.
    let audit_before = scalar(&flow, "SELECT count(*) FROM ops_audit_log").await;
    open_dispute(&flow, &p).await;
    settle_until_sql(
        &flow,
        "the withdrawal processed",
        600,
        "SELECT (count(*) = 1)::int::bigint FROM disputes WHERE withdrawn_at IS NOT NULL",
    )
    .await;
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM refunds WHERE source = 'ops' AND status = 'FAILED'"
        )
        .await,
        1,
        "the intent is closed"
    );
    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM ops_audit_log").await,
        audit_before + 1,
        "the closing is audited"
    );
    let (actor, result): (String, String) = sqlx::query_as(
        "SELECT actor, details->>'result' FROM ops_audit_log WHERE command = 'refund' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&flow.db.pool)
    .await
    .unwrap();
    assert_eq!(actor, "system");
    assert!(result.starts_with("intent failed"), "{result}");
    // Its reversal was in doubt (a 429 answers nothing for the key): never sent again, waiting for a lookup.
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM transfer_reversals r JOIN refunds f ON f.id = r.cause_refund_id
              WHERE f.source = 'ops' AND r.status = 'PENDING' AND r.cancel_requested_at IS NOT NULL"
        )
        .await,
        1,
        "its reversal waits for a lookup"
    );
    // The dispute's part of that share waits for the lookup (review H1: the intent's reversal may have been made,
    // and reversing the share again could take the same money twice); the other two are reversed.
    for _ in 0..3 {
        splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
    }
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM transfer_reversals r JOIN refunds f ON f.id = r.cause_refund_id
              WHERE f.source = 'dispute'"
        )
        .await,
        2
    );
    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM refund_parts WHERE covered_at IS NULL").await,
        1,
        "the first share's part waits"
    );

    // Run again: nothing open, and the dispute refuses a new intent without writing anything.
    let out = ops_refund(&flow, &a0.id, &flags);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("disputed"), "{stderr}");
    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM ops_audit_log").await,
        audit_before + 1
    );
    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM refunds WHERE source = 'ops'").await,
        1
    );

    // Stripe answers again; ten minutes on, the lookup cancels the intent's reversal, and the dispute's are made.
    flow.control.clear_faults().await.unwrap();
    past_in_flight_margin(&flow, "status = 'PENDING'").await;
    settle_until_sql(
        &flow,
        "the reversals settled",
        600,
        "SELECT ((SELECT count(*) FROM transfer_reversals r JOIN refunds f ON f.id = r.cause_refund_id
                   WHERE f.source = 'ops' AND r.status = 'CANCELED') = 1
                 AND (SELECT count(*) FROM transfer_reversals WHERE status = 'SUCCEEDED') = 3)::int::bigint",
    )
    .await;
    // Not made: the dispute's part of the first share is then a reversal of its own, not a platform loss. The
    // platform bears only the fees (Stripe keeps them): every net is reversed.
    let nets: i64 = p.allocations.iter().map(|a| a.net_amount_cents.unwrap()).sum();
    assert_eq!(parts_taken(&flow).await.0, nets);
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM transfer_reversals r JOIN refunds f ON f.id = r.cause_refund_id
              WHERE f.source = 'dispute' AND r.status = 'SUCCEEDED'"
        )
        .await,
        3
    );
    assert_eq!(stripe_requests(&flow, "POST", "/v1/refunds").await, 0);
    assert_eq!(charge_refunded_cents(&flow, &p).await, 0);
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// Review H1 and M1 (stop 19): the same, but Stripe made the intent's reversal and only its answer was lost. The
/// dispute's part of that share used to be reversed a second time while the first was in doubt (the same money
/// booked twice, and sent twice after a won dispute), and a reversal made for a closed intent stayed on the
/// platform while the dispute booked the share as lost. Now the part waits for the lookup, which finds the reversal
/// made; the part takes it as its own: no second reversal, no loss beyond the fees, nothing listed as stranded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_in_doubt_for_a_closed_ops_refund_is_the_disputes_own_once_found_made() {
    let (flow, id, p) = three_shares_paid(&[]).await;
    let a0 = p.allocations[0].clone();
    let tr0 = a0.stripe_transfer_id.clone().unwrap();
    // Stripe makes the reversal; its answer is lost, every time.
    lose_reversal_answers(&flow, &tr0).await;
    let out = ops_refund(&flow, &a0.id, &["--reverse-transfer", "--yes"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let held0 = |t: splitpay::stripe::TransferInfo| t.amount_cents - t.amount_reversed_cents;
    let transfer0 = || async {
        let all = flow.gateway.list_transfers(&p.payment.transfer_group).await.unwrap();
        all.into_iter().find(|t| t.id == tr0).unwrap()
    };
    assert_eq!(held0(transfer0().await), 0, "Stripe made the reversal");
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM transfer_reversals WHERE status = 'PENDING' AND in_doubt_since IS NOT NULL"
        )
        .await,
        1
    );

    open_dispute(&flow, &p).await;
    settle_until_sql(
        &flow,
        "the withdrawal processed",
        600,
        "SELECT (count(*) = 1)::int::bigint FROM disputes WHERE withdrawn_at IS NOT NULL",
    )
    .await;
    settle_until_sql(
        &flow,
        "the two other shares reversed",
        600,
        "SELECT (count(*) = 2)::int::bigint FROM transfer_reversals r JOIN refunds f ON f.id = r.cause_refund_id
          WHERE f.source = 'dispute' AND r.status = 'SUCCEEDED'",
    )
    .await;
    for _ in 0..3 {
        splitpay::jobs::refunds::reconcile_refunds(&flow.ctx).await.unwrap();
    }
    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM refund_parts WHERE covered_at IS NULL").await,
        1,
        "the first share's part waits for the lookup"
    );
    assert_eq!(
        scalar(&flow, "SELECT count(*) FROM transfer_reversals").await,
        3,
        "no second reversal of the first share"
    );

    // Ten minutes on, no request can be in flight: the lookup finds the reversal made.
    flow.control.clear_faults().await.unwrap();
    let posts_before = stripe_requests(&flow, "POST", &format!("/v1/transfers/{tr0}/reversals")).await;
    past_in_flight_margin(&flow, "status = 'PENDING'").await;
    settle_until_sql(
        &flow,
        "the lookup settled and the part covered",
        600,
        "SELECT ((SELECT count(*) FROM transfer_reversals WHERE status = 'SUCCEEDED') = 3
                 AND (SELECT count(*) FROM refund_parts WHERE covered_at IS NULL) = 0)::int::bigint",
    )
    .await;
    assert_eq!(
        stripe_requests(&flow, "POST", &format!("/v1/transfers/{tr0}/reversals")).await,
        posts_before,
        "never sent again"
    );
    assert_eq!(scalar(&flow, "SELECT count(*) FROM transfer_reversals").await, 3);
    assert_eq!(
        scalar(
            &flow,
            "SELECT count(*) FROM transfer_reversals r JOIN refunds f ON f.id = r.cause_refund_id
              WHERE f.source = 'dispute' AND r.adopted_from_refund_id IS NOT NULL"
        )
        .await,
        1,
        "the dispute took the intent's reversal"
    );
    let nets: i64 = p.allocations.iter().map(|a| a.net_amount_cents.unwrap()).sum();
    let disputed = p.payment.total_amount_cents;
    let (reversed, lost) = parts_taken(&flow).await;
    assert_eq!(reversed, nets);
    assert_eq!(lost, disputed - nets, "the platform bears the fees only");
    assert_eq!(held0(transfer0().await), 0);
    let parked = parked_json(&flow);
    assert_eq!(parked["reversed_without_refund"], serde_json::json!([]), "{parked}");
    // One donation.refunded for the first share, naming the dispute.
    let (_, _, _, refunded) = donation_of(&flow, &a0, "donation.refunded").await;
    assert_eq!(refunded.len(), 1, "{refunded:?}");
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// Review F6 (stop 18): an `ops refund --reverse-transfer` whose reversal Stripe refused for now returns with the
/// intent open; the reversal job makes the reversal later, but only the command sends the refund. Until it is run
/// again, `ops parked` lists the money as on the platform's balance, with the command to run; run again, it sends
/// the refund once and the listing is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_made_in_the_background_for_an_ops_refund_is_listed_until_the_refund_is_sent() {
    let (flow, id, p) = three_shares_paid(&[]).await;
    let a0 = p.allocations[0].clone();
    let net0 = a0.net_amount_cents.unwrap();
    fault_posts(&flow, FaultKind::RateLimit, 1_000, "/reversals").await;
    let flags = ["--reverse-transfer", "--yes", "--actor", "alice"];
    assert_eq!(ops_refund(&flow, &a0.id, &flags).status.code(), Some(1));
    flow.control.clear_faults().await.unwrap();
    // The reversal job makes it later; the intent stays open, and is old enough not to be a running command.
    sqlx::query("UPDATE transfer_reversals SET next_attempt_at = now()")
        .execute(&flow.db.pool)
        .await
        .unwrap();
    settle_until_sql(
        &flow,
        "the reversal made in the background",
        600,
        "SELECT count(*) FROM transfer_reversals WHERE status = 'SUCCEEDED'",
    )
    .await;
    sqlx::query("UPDATE refunds SET created_at = created_at - interval '11 minutes'")
        .execute(&flow.db.pool)
        .await
        .unwrap();
    let listed = |flow: &Flow| {
        parked_json(flow)["reversed_refund_not_sent"]
            .as_array()
            .unwrap()
            .clone()
    };
    let unfinished = listed(&flow);
    assert_eq!(unfinished.len(), 1);
    assert_eq!(unfinished[0]["split_allocation_id"], a0.id.as_str());
    assert_eq!(unfinished[0]["amount_cents"], net0);
    let table = String::from_utf8_lossy(&flow.ops(&["parked"]).stdout).into_owned();
    assert!(
        table.contains("reversed for an ops refund not sent yet (on the platform's balance): 1"),
        "{table}"
    );
    assert_eq!(charge_refunded_cents(&flow, &p).await, 0);

    // Run again: the refund is sent once, the reversal is not made again, and nothing is listed.
    let out = ops_refund(&flow, &a0.id, &flags);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(charge_refunded_cents(&flow, &p).await, net0);
    assert_eq!(scalar(&flow, "SELECT count(*) FROM transfer_reversals").await, 1);
    assert!(listed(&flow).is_empty());
    assert_conserved_at_stripe(&flow, &id).await;
    flow.stop().await;
}

/// Review H1 (stop 19), the second half: Stripe answers "already fully reversed" to a reversal row. That is the
/// row's reversal only if Stripe shows one nobody recorded that covers it. A reversal carrying another row's id (in
/// doubt, not recorded yet) is that row's: booking this one as made too would count the same money twice, so it
/// stays PENDING for an operator. A reversal made outside splitpay (the dashboard) covers it: recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn already_fully_reversed_is_a_rows_reversal_only_when_stripe_shows_one_nobody_recorded() {
    use splitpay::store::allocations::get_split_allocation;
    use splitpay::store::reversals::{get_reversal, insert_reversal};
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000], &[]).await;
    let (_, p) = pay_by_card(&flow, &[]).await;
    let mut rows = Vec::new();
    for (i, a) in p.allocations.iter().enumerate() {
        let tr = a.stripe_transfer_id.clone().unwrap();
        // Share 0: reversed at Stripe by another row of ours (its id in the metadata), not recorded here.
        // Share 1: reversed in the dashboard (no metadata).
        let metadata: splitpay::stripe::Metadata = if i == 0 {
            [(splitpay::stripe::REVERSAL_REF_KEY.to_owned(), "999999".to_owned())].into()
        } else {
            Default::default()
        };
        flow.gateway
            .create_reversal(&tr, None, &metadata, &format!("test-reversal-{i}"))
            .await
            .unwrap();
        let aid = SplitAllocationId::parse(&a.id).unwrap();
        let mut tx = flow.db.pool.begin().await.unwrap();
        let row = get_split_allocation(&mut tx, &aid).await.unwrap();
        let reversal = insert_reversal(&mut tx, &row, row.net_amount_cents.unwrap(), None)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        splitpay::jobs::refunds::reverse(&flow.ctx, &reversal.to_string())
            .await
            .unwrap();
        rows.push(
            get_reversal(&mut flow.db.pool.acquire().await.unwrap(), reversal)
                .await
                .unwrap(),
        );
    }
    assert_eq!(rows[0].status, "PENDING", "another row's reversal is not this one's");
    assert_eq!(rows[0].failure_code.as_deref(), Some("transfer_already_reversed"));
    assert!(rows[0]
        .failure_message
        .as_deref()
        .unwrap()
        .contains("check the transfer at Stripe"));
    assert_eq!(rows[1].status, "SUCCEEDED", "the dashboard's reversal covers it");
    flow.stop().await;
}
