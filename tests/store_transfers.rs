//! The store against a real PostgreSQL: the transfer lifecycle (generations, keys, attempts and outcomes), one
//! generation when workers race, zero-net shares, and money conserved across every outcome.

mod common;

use common::count;
use common::db::TestDb;
use splitpay::domain::ids::{transfer_idempotency_key, SplitAllocationId};
use splitpay::domain::state::{AllocationEvent, AllocationStatus, Transition};
use splitpay::events::EventType;
use splitpay::store::allocations::*;
use splitpay::store::money_report::*;
use splitpay::store::payments::SplitPayment;
use splitpay::store::records::*;
use splitpay::store::{StoreError, Tx};
use sqlx::PgPool;

use common::store_fixtures::*;

/// `event` on the allocation `id` in `tx`, with nothing to patch and no event to emit.
async fn apply(
    tx: &mut Tx<'_>,
    id: &SplitAllocationId,
    event: AllocationEvent,
) -> Result<Transition<AllocationStatus>, StoreError> {
    transition_allocation(tx, id, event, &AllocationPatch::default(), &[]).await
}

#[tokio::test]
async fn transfer_lifecycle_records_generations_keys_and_outcomes() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    let p = new_payment(&pool, &[1000, 2000]).await;
    let p = succeed_with_fees(&pool, &p, 60, 0).await;
    let a = &p.allocations[0];
    let id = aid(a);

    let mut tx = pool.begin().await.unwrap();
    let t = apply(&mut tx, &id, AllocationEvent::TransferStarted).await.unwrap();
    assert_eq!(t, Transition::To(AllocationStatus::Transferring));
    tx.commit().await.unwrap();
    let row = get_split_allocation(&mut pool.acquire().await.unwrap(), &id)
        .await
        .unwrap();
    assert_eq!(row.generation, 1);
    assert_eq!(
        row.idempotency_key.as_deref(),
        Some(transfer_idempotency_key(&id, 1).as_str())
    );
    let attempt: (String, i64, String) = sqlx::query_as(
        "SELECT destination_account_id, amount_cents, currency FROM transfer_attempts WHERE split_allocation_id = $1 AND generation = 1",
    )
    .bind(&a.id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        attempt,
        ("acct_rcp0".into(), 980, "aud".into()),
        "net of the 20c fee share, to the link's account"
    );

    // A terminal failure parks it with Stripe's code, and emits distribution_failed once.
    let mut tx = pool.begin().await.unwrap();
    let patch = AllocationPatch {
        failure_code: Some("insufficient_capabilities_for_transfer".into()),
        failure_message: Some(
            "Your destination account needs to have at least one of the following capabilities enabled: transfers"
                .into(),
        ),
        ..Default::default()
    };
    let failed = distribution_event(EventType::DistributionFailed, &row, None);
    let t = transition_allocation(
        &mut tx,
        &id,
        AllocationEvent::TransferFailed,
        &patch,
        std::slice::from_ref(&failed),
    )
    .await
    .unwrap();
    assert_eq!(t, Transition::To(AllocationStatus::Parked));
    // The same failure reported again (a duplicate job): unchanged, no second event.
    let t = transition_allocation(&mut tx, &id, AllocationEvent::TransferFailed, &patch, &[failed])
        .await
        .unwrap();
    assert_eq!(t, Transition::Unchanged);
    tx.commit().await.unwrap();
    let parked = get_split_allocation(&mut pool.acquire().await.unwrap(), &id)
        .await
        .unwrap();
    assert_eq!(parked.status, AllocationStatus::Parked);
    assert!(parked.parked_at.is_some());
    assert_eq!(
        parked.failure_code.as_deref(),
        Some("insufficient_capabilities_for_transfer")
    );
    let events = outbox_events_about(&mut pool.acquire().await.unwrap(), &a.id)
        .await
        .unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.event_type == "recommendation_set.distribution_failed")
            .count(),
        1
    );

    // An operator retry: a new generation and a new key; then success.
    let mut tx = pool.begin().await.unwrap();
    apply(&mut tx, &id, AllocationEvent::OpsRetry).await.unwrap();
    let retried = get_split_allocation(&mut tx, &id).await.unwrap();
    assert_eq!((retried.generation, retried.parked_at), (2, None));
    assert_eq!(
        retried.idempotency_key.as_deref(),
        Some(transfer_idempotency_key(&id, 2).as_str())
    );
    let patch = AllocationPatch {
        stripe_transfer_id: Some("tr_abc".into()),
        ..Default::default()
    };
    let ok = distribution_event(EventType::DistributionSucceeded, &retried, Some("tr_abc"));
    let t = transition_allocation(&mut tx, &id, AllocationEvent::TransferSucceeded, &patch, &[ok])
        .await
        .unwrap();
    assert_eq!(t, Transition::To(AllocationStatus::Transferred));
    tx.commit().await.unwrap();
    let outcomes: Vec<(i32, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT generation, outcome, stripe_transfer_id FROM transfer_attempts WHERE split_allocation_id = $1 ORDER BY generation",
    )
    .bind(&a.id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        outcomes,
        vec![
            (1, Some("TERMINAL".into()), None),
            (2, Some("TRANSFERRED".into()), Some("tr_abc".into()))
        ]
    );

    // A transferred allocation can never be retried or parked.
    let mut tx = pool.begin().await.unwrap();
    let err = apply(&mut tx, &id, AllocationEvent::OpsRetry).await.unwrap_err();
    assert!(matches!(err, StoreError::Forbidden(_)));
}

#[tokio::test]
async fn one_transfer_attempt_per_generation_and_one_allocation_per_transfer() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    let p = new_payment(&pool, &[1000, 2000]).await;
    let p = succeed_with_fees(&pool, &p, 0, 0).await;
    let (a0, a1) = (aid(&p.allocations[0]), aid(&p.allocations[1]));
    let mut tx = pool.begin().await.unwrap();
    apply(&mut tx, &a0, AllocationEvent::TransferStarted).await.unwrap();
    apply(&mut tx, &a1, AllocationEvent::TransferStarted).await.unwrap();
    tx.commit().await.unwrap();

    // A second attempt row for the same generation is refused by the schema.
    let dup = sqlx::query(
        "INSERT INTO transfer_attempts (split_allocation_id, generation, idempotency_key, destination_account_id, amount_cents, currency, transfer_group)
         VALUES ($1, 1, 'other-key', 'acct_x', 5, 'aud', 'spay_x')",
    )
    .bind(a0.as_str())
    .execute(&pool)
    .await
    .unwrap_err();
    assert_eq!(StoreError::from(dup).constraint(), Some("transfer_attempts_pk"));

    // One Stripe transfer can belong to one allocation only.
    let patch = AllocationPatch {
        stripe_transfer_id: Some("tr_same".into()),
        ..Default::default()
    };
    let mut tx = pool.begin().await.unwrap();
    transition_allocation(&mut tx, &a0, AllocationEvent::TransferSucceeded, &patch, &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let err = transition_allocation(&mut tx, &a1, AllocationEvent::TransferSucceeded, &patch, &[])
        .await
        .unwrap_err();
    assert_eq!(err.constraint(), Some("split_allocations_transfer_unique"));
}

#[tokio::test]
async fn racing_workers_start_one_generation() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    let p = new_payment(&pool, &[1000, 2000]).await;
    let p = succeed_with_fees(&pool, &p, 0, 0).await;
    let id = aid(&p.allocations[1]);
    let race = |pool: PgPool, id: SplitAllocationId| async move {
        let mut tx = pool.begin().await.unwrap();
        let t = apply(&mut tx, &id, AllocationEvent::TransferStarted).await.unwrap();
        tx.commit().await.unwrap();
        t
    };
    let (a, b) = tokio::join!(race(pool.clone(), id.clone()), race(pool.clone(), id.clone()));
    let mut outcomes = vec![a, b];
    outcomes.sort_by_key(|t| matches!(t, Transition::Unchanged));
    assert_eq!(
        outcomes,
        vec![Transition::To(AllocationStatus::Transferring), Transition::Unchanged]
    );
    let (attempts,): (i64,) = sqlx::query_as("SELECT count(*) FROM transfer_attempts WHERE split_allocation_id = $1")
        .bind(id.as_str())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(attempts, 1);
}

#[tokio::test]
async fn money_is_conserved_across_outcomes() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    // 4 recipients; fees of 4,000 take the whole of the 30c share and some of the others.
    let p = new_payment(&pool, &[30, 10_000, 20_000, 15_000]).await;
    let p = succeed_with_fees(&pool, &p, 1_500, 2_500).await;
    let ids: Vec<SplitAllocationId> = p.allocations.iter().map(aid).collect();
    let nets: Vec<i64> = p.allocations.iter().map(|a| a.net_amount_cents.unwrap()).collect();
    assert_eq!(nets.iter().sum::<i64>() + 4_000, 45_030);

    let mut tx = pool.begin().await.unwrap();
    // Net of the 30c share: 30 - floor/largest-remainder share of 4,000 × 30/45,030 = 30 - 3 = 27.
    assert_eq!(nets[0], 27);
    apply(&mut tx, &ids[0], AllocationEvent::TransferStarted).await.unwrap();
    let ok = AllocationPatch {
        stripe_transfer_id: Some("tr_0".into()),
        ..Default::default()
    };
    transition_allocation(&mut tx, &ids[0], AllocationEvent::TransferSucceeded, &ok, &[])
        .await
        .unwrap();
    apply(&mut tx, &ids[1], AllocationEvent::TransferStarted).await.unwrap();
    let parked = AllocationPatch {
        failure_code: Some(RETRY_WINDOW_ELAPSED.into()),
        ..Default::default()
    };
    transition_allocation(&mut tx, &ids[1], AllocationEvent::TransferFailed, &parked, &[])
        .await
        .unwrap();
    apply(&mut tx, &ids[2], AllocationEvent::TransferStarted).await.unwrap();
    apply(&mut tx, &ids[2], AllocationEvent::TransferFailed).await.unwrap();
    apply(&mut tx, &ids[2], AllocationEvent::Refunded).await.unwrap();
    tx.commit().await.unwrap();

    let report_now = async || {
        money_report(&mut pool.acquire().await.unwrap(), &pid(&p))
            .await
            .unwrap()
    };
    let report = report_now().await;
    assert_eq!(report.charged_cents, 45_030);
    assert_eq!(report.transferred_cents, nets[0]);
    assert_eq!(report.parked_cents, nets[1]);
    assert_eq!(report.refunded_cents, nets[2]);
    assert_eq!(report.in_flight_cents, nets[3]);
    assert_eq!(report.fees_kept_cents, 4_000);
    assert!(report.is_conserved(), "{report:?}");
    let (outcome,): (String,) = sqlx::query_as("SELECT outcome FROM transfer_attempts WHERE split_allocation_id = $1")
        .bind(ids[1].as_str())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(outcome, "WINDOW_ELAPSED");

    // The report reads each term from its own record, so it can fail: a transfer recorded for another amount than
    // the share's net breaks it, and so do fees on the payment that do not match the split.
    let change = async |sql: &'static str, id: &str| {
        sqlx::query(sql).bind(id).execute(&pool).await.unwrap();
    };
    change(
        "UPDATE transfer_attempts SET amount_cents = amount_cents + 1 WHERE split_allocation_id = $1",
        ids[0].as_str(),
    )
    .await;
    let report = report_now().await;
    assert!(
        !report.is_conserved(),
        "a cent too many transferred must show: {report:?}"
    );
    change(
        "UPDATE transfer_attempts SET amount_cents = amount_cents - 1 WHERE split_allocation_id = $1",
        ids[0].as_str(),
    )
    .await;
    change(
        "UPDATE split_payments SET processing_fee_cents = processing_fee_cents - 1 WHERE id = $1",
        pid(&p).as_str(),
    )
    .await;
    let report = report_now().await;
    assert!(
        !report.is_conserved(),
        "a cent of fee unaccounted for must show: {report:?}"
    );
}

#[tokio::test]
async fn zero_net_allocations_cannot_start_a_transfer_and_are_parked() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    // Fees larger than the whole payment: every share is all fee, the excess is recorded as uncollected.
    let p = new_payment(&pool, &[30, 30]).await;
    let p = succeed_with_fees(&pool, &p, 45, 30).await;
    assert_eq!(p.payment.fee_uncollected_cents, Some(15));
    assert!(p.allocations.iter().all(|a| a.net_amount_cents == Some(0)));
    let id = aid(&p.allocations[0]);
    let mut tx = pool.begin().await.unwrap();
    let err = apply(&mut tx, &id, AllocationEvent::TransferStarted).await.unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    drop(tx);
    let mut tx = pool.begin().await.unwrap();
    let t = apply(&mut tx, &id, AllocationEvent::NothingToTransfer).await.unwrap();
    assert_eq!(t, Transition::To(AllocationStatus::Parked));
    tx.commit().await.unwrap();
    assert_eq!(count(&pool, "transfer_attempts").await, 0);
}

/// A transition applied to a row read earlier (`transition_locked_allocation`, the hot paths' one-read form) is
/// refused when the row has moved on since, even to the same status at another generation: nothing is written.
#[tokio::test]
async fn a_locked_transition_of_a_stale_row_is_refused_and_writes_nothing() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    let p = new_payment(&pool, &[1000, 2000]).await;
    let p = succeed_with_fees(&pool, &p, 60, 0).await;
    let id = aid(&p.allocations[0]);
    let mut tx = pool.begin().await.unwrap();
    apply(&mut tx, &id, AllocationEvent::TransferStarted).await.unwrap();
    tx.commit().await.unwrap();
    let stale = get_split_allocation(&mut pool.acquire().await.unwrap(), &id)
        .await
        .unwrap();
    assert_eq!((stale.status, stale.generation), (AllocationStatus::Transferring, 1));

    // Meanwhile: parked, then an operator's retry, TRANSFERRING again at generation 2.
    let mut tx = pool.begin().await.unwrap();
    let parked = AllocationPatch {
        failure_code: Some("account_invalid".into()),
        failure_message: Some("No such destination".into()),
        ..Default::default()
    };
    transition_allocation(&mut tx, &id, AllocationEvent::TransferFailed, &parked, &[])
        .await
        .unwrap();
    apply(&mut tx, &id, AllocationEvent::OpsRetry).await.unwrap();
    tx.commit().await.unwrap();
    let current = get_split_allocation(&mut pool.acquire().await.unwrap(), &id)
        .await
        .unwrap();
    assert_eq!(
        (current.status, current.generation),
        (AllocationStatus::Transferring, 2)
    );

    let mut tx = pool.begin().await.unwrap();
    let done = AllocationPatch {
        stripe_transfer_id: Some("tr_stale".into()),
        transfer_generation: Some(1),
        ..Default::default()
    };
    let err = transition_locked_allocation(&mut tx, &stale, AllocationEvent::TransferSucceeded, &done, &[])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::LostRace { .. }), "{err}");
    drop(tx);
    let after = get_split_allocation(&mut pool.acquire().await.unwrap(), &id)
        .await
        .unwrap();
    assert_eq!(after, current, "nothing written");
}

/// A context over `pool` for calling the recorder directly (its gateway, at a simulator, is never called).
async fn recorder_ctx(pool: &PgPool) -> (splitpay::app::AppContext, splitpay::stripe::sim::SimServer) {
    let (sim, _) = common::stripe::simulator().await;
    let ctx = splitpay::app::AppContext {
        pool: pool.clone(),
        gateway: std::sync::Arc::new(common::stripe::gateway(&sim)),
        distribution: Default::default(),
        webhooks: Default::default(),
        recorder: Default::default(),
        starter: Default::default(),
    };
    (ctx, sim)
}

/// A payment of `shares` shares of 1000 with their PENDING donations and every share's first generation started, and
/// the shares' contexts.
async fn started_shares(pool: &PgPool, shares: usize) -> (SplitPayment, Vec<AllocationContext>) {
    let p = new_payment(pool, &vec![1000; shares]).await;
    let p = succeed_with_fees(pool, &p, 60, 0).await;
    let mut contexts = Vec::new();
    for a in &p.allocations {
        let mut tx = pool.begin().await.unwrap();
        splitpay::store::donations::create_donation_for_allocation(&mut tx, &aid(a), chrono::Utc::now(), |_| vec![])
            .await
            .unwrap();
        apply(&mut tx, &aid(a), AllocationEvent::TransferStarted).await.unwrap();
        tx.commit().await.unwrap();
        contexts.push(
            allocation_context(&mut pool.acquire().await.unwrap(), &aid(a))
                .await
                .unwrap(),
        );
    }
    (p, contexts)
}

fn made(id: &str, c: &AllocationContext) -> splitpay::stripe::TransferInfo {
    splitpay::stripe::TransferInfo {
        id: id.to_owned(),
        amount_cents: c.allocation.net_amount_cents.unwrap(),
        amount_reversed_cents: 0,
        currency: "aud".into(),
        destination: Some(c.destination_account_id.clone()),
        source_transaction: c.payment.charge_id.clone(),
        transfer_group: Some(c.payment.id.clone()),
        reversed: false,
        metadata: Default::default(),
        reversals: vec![],
        reversals_listed_all: true,
    }
}

/// Each share's (status, transfer id, its attempt's outcome, its donation's status, received?).
async fn recorded_state(
    pool: &PgPool,
    p: &SplitPayment,
) -> Vec<(String, Option<String>, Option<String>, String, bool)> {
    sqlx::query_as(
        "SELECT a.status, a.stripe_transfer_id, t.outcome, d.status, d.received_date IS NOT NULL
           FROM split_allocations a
           JOIN transfer_attempts t ON t.split_allocation_id = a.id AND t.generation = a.generation
           JOIN donations d ON d.split_allocation_id = a.id
          WHERE a.split_payment_id = $1 ORDER BY a.position",
    )
    .bind(&p.payment.id)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Outbox events of `event_type` with the transfer id they carry (null for donation events), oldest first.
async fn events_of(pool: &PgPool, event_type: &str) -> Vec<(String, Option<String>)> {
    sqlx::query_as(
        "SELECT coalesce(payload->'data'->>'split_allocation_id', payload->'data'->>'id'),
                payload->'data'->>'stripe_transfer_id'
           FROM outbox_events WHERE event_type = $1 ORDER BY created_at, id",
    )
    .bind(event_type)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_batch_records_its_plain_transfers_together_and_hands_back_every_other_case() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    let (ctx, _sim) = recorder_ctx(&pool).await;
    let (p, mut contexts) = started_shares(&pool, 6).await;
    // Share 3 was recorded meanwhile with another transfer; share 4 is owed a resend; share 5's step drove a
    // generation the share has left (its context is stale).
    let mut tx = pool.begin().await.unwrap();
    let patch = AllocationPatch {
        stripe_transfer_id: Some("tr_other".into()),
        transfer_generation: Some(1),
        ..Default::default()
    };
    transition_allocation(
        &mut tx,
        &aid(&p.allocations[3]),
        AllocationEvent::TransferSucceeded,
        &patch,
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    sqlx::query("UPDATE split_allocations SET resend_owed_at = now() WHERE id = $1")
        .bind(&p.allocations[4].id)
        .execute(&pool)
        .await
        .unwrap();
    contexts[5].allocation.generation = 2;
    // Share 2 drives its second generation (the first was parked, an operator retried): its donation, still
    // PENDING, is confirmed with that generation's event.
    let mut tx = pool.begin().await.unwrap();
    apply(&mut tx, &aid(&p.allocations[2]), AllocationEvent::TransferFailed)
        .await
        .unwrap();
    apply(&mut tx, &aid(&p.allocations[2]), AllocationEvent::OpsRetry)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    contexts[2] = allocation_context(&mut pool.acquire().await.unwrap(), &aid(&p.allocations[2]))
        .await
        .unwrap();
    assert_eq!(contexts[2].allocation.generation, 2);

    let transfers: Vec<_> = contexts
        .iter()
        .enumerate()
        .map(|(n, c)| made(&format!("tr_{n}"), c))
        .collect();
    let answers = futures_util::future::join_all(
        contexts
            .iter()
            .zip(&transfers)
            .map(|(c, t)| ctx.recorder.record(&ctx, c, t)),
    )
    .await;
    assert_eq!(
        answers,
        [true, true, true, false, false, false],
        "only the plain cases are recorded by the batch"
    );

    let state = recorded_state(&pool, &p).await;
    for (n, row) in state.iter().enumerate().take(3) {
        assert_eq!(
            row,
            &(
                "TRANSFERRED".to_owned(),
                Some(format!("tr_{n}")),
                Some("TRANSFERRED".to_owned()),
                "CONFIRMED".to_owned(),
                true
            ),
            "share {n}"
        );
    }
    assert_eq!(
        state[3].1.as_deref(),
        Some("tr_other"),
        "a share recorded with another transfer keeps it"
    );
    assert_eq!(state[3].3, "PENDING", "and the batch did not touch its donation");
    for n in [4, 5] {
        assert_eq!(
            (
                state[n].0.as_str(),
                state[n].1.as_deref(),
                state[n].2.as_deref(),
                state[n].3.as_str()
            ),
            ("TRANSFERRING", None, None, "PENDING"),
            "share {n} is left for its lone recording"
        );
    }
    // One distribution_succeeded per recorded share, with its transfer, and one donation.succeeded each.
    let succeeded = events_of(&pool, "recommendation_set.distribution_succeeded").await;
    let mut expected: Vec<(String, Option<String>)> = (0..3)
        .map(|n| (p.allocations[n].id.clone(), Some(format!("tr_{n}"))))
        .collect();
    let mut got = succeeded.clone();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    assert_eq!(events_of(&pool, "donation.succeeded").await.len(), 3);
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT o.dedup_key FROM outbox_events o JOIN donations d ON d.id = o.payload->'data'->>'id'
          WHERE o.event_type = 'donation.succeeded' AND d.split_allocation_id = $1",
    )
    .bind(&p.allocations[2].id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        keys.len() == 1 && keys[0].ends_with(":g2"),
        "the second generation's donation event is its own: {keys:?}"
    );
    // The amounts announced are the shares' nets, to the cent.
    let announced: i64 = sqlx::query_scalar(
        "SELECT sum((payload->'data'->>'amount_cents')::bigint)::bigint FROM outbox_events
          WHERE event_type = 'recommendation_set.distribution_succeeded'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        announced,
        (0..3).map(|n| p.allocations[n].net_amount_cents.unwrap()).sum::<i64>()
    );

    // The same transfer again (a duplicate step): not plain any more, nothing written twice.
    assert!(!ctx.recorder.record(&ctx, &contexts[0], &transfers[0]).await);
    assert_eq!(
        events_of(&pool, "recommendation_set.distribution_succeeded")
            .await
            .len(),
        3
    );
    assert_eq!(events_of(&pool, "donation.succeeded").await.len(), 3);
}

#[tokio::test]
async fn a_batch_skips_a_share_another_transaction_holds_and_outlives_a_step_that_stops_waiting() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    let (ctx, _sim) = recorder_ctx(&pool).await;
    let (p, contexts) = started_shares(&pool, 3).await;
    let transfers: Vec<_> = contexts
        .iter()
        .enumerate()
        .map(|(n, c)| made(&format!("tr_{n}"), c))
        .collect();

    // Another transaction (a refund, an operator) holds share 0: the batch does not wait for it; share 0 is handed
    // back to be recorded alone, and share 1 is recorded.
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM split_allocations WHERE id = $1 FOR UPDATE")
        .bind(&p.allocations[0].id)
        .execute(&mut *blocker)
        .await
        .unwrap();
    let answers = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        futures_util::future::join_all(
            contexts[..2]
                .iter()
                .zip(&transfers)
                .map(|(c, t)| ctx.recorder.record(&ctx, c, t)),
        ),
    )
    .await
    .expect("the batch did not wait for the held share");
    assert_eq!(answers, [false, true]);
    blocker.rollback().await.unwrap();
    let state = recorded_state(&pool, &p).await;
    assert_eq!((state[0].0.as_str(), state[0].1.as_deref()), ("TRANSFERRING", None));
    assert_eq!(
        (state[1].0.as_str(), state[1].1.as_deref()),
        ("TRANSFERRED", Some("tr_1"))
    );

    // A step that stops waiting (its job timed out) does not stop the batch writing its transfer: here the batch
    // waits for share 2's donation, the step is dropped meanwhile, and the transfer is recorded once the lock goes.
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM donations WHERE split_allocation_id = $1 FOR UPDATE")
        .bind(&p.allocations[2].id)
        .execute(&mut *blocker)
        .await
        .unwrap();
    let step = {
        let (ctx, c, t) = (ctx.clone(), contexts[2].clone(), transfers[2].clone());
        tokio::spawn(async move { ctx.recorder.record(&ctx, &c, &t).await })
    };
    common::db::until_waiting_on_locks(&pool, 1).await;
    step.abort();
    blocker.rollback().await.unwrap();
    // The recorder is not stuck either: share 0 is recorded now; share 2's batch ends once the lock goes.
    assert!(ctx.recorder.record(&ctx, &contexts[0], &transfers[0]).await);
    let mut state = recorded_state(&pool, &p).await;
    for _ in 0..500 {
        if state[2].0 == "TRANSFERRED" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        state = recorded_state(&pool, &p).await;
    }
    for (n, row) in state.iter().enumerate() {
        assert_eq!(
            (row.0.as_str(), row.1.clone(), row.3.as_str()),
            ("TRANSFERRED", Some(format!("tr_{n}")), "CONFIRMED"),
            "share {n}"
        );
    }
    let events = events_of(&pool, "recommendation_set.distribution_succeeded").await;
    assert_eq!(events.len(), 3, "one event per share: {events:?}");
}

#[tokio::test]
async fn first_generations_start_together_with_each_shares_amount_or_not_at_all() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    let p = new_payment(&pool, &[1000, 2000, 3000]).await;
    let p = succeed_with_fees(&pool, &p, 60, 0).await;
    let lease_ends = chrono::Utc::now() + chrono::Duration::seconds(10);

    // A share read before another transaction moved it: the whole call is refused and nothing is written.
    let mut tx = pool.begin().await.unwrap();
    let rows = p.allocations.clone();
    sqlx::query("UPDATE split_allocations SET generation = generation + 1 WHERE id = $1")
        .bind(&rows[2].id)
        .execute(&mut *tx)
        .await
        .unwrap();
    let shares: Vec<&SplitAllocationRow> = rows.iter().collect();
    let refused = start_first_generations(&mut tx, &p.payment, &shares, lease_ends).await;
    assert!(matches!(refused, Err(StoreError::LostRace { .. })), "{refused:?}");
    drop(tx);
    assert_eq!(count(&pool, "transfer_attempts").await, 0);

    // A share that is not PENDING is refused too.
    let mut tx = pool.begin().await.unwrap();
    apply(&mut tx, &aid(&rows[0]), AllocationEvent::TransferStarted)
        .await
        .unwrap();
    let moved = get_split_allocation(&mut tx, &aid(&rows[0])).await.unwrap();
    let refused = start_first_generations(&mut tx, &p.payment, &[&moved], lease_ends).await;
    assert!(matches!(refused, Err(StoreError::Invalid(_))), "{refused:?}");
    drop(tx);

    // All three at once: each its own generation 1, key, net amount and the lease, frozen on its attempt row.
    let mut tx = pool.begin().await.unwrap();
    let started = start_first_generations(&mut tx, &p.payment, &shares, lease_ends)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(started.len(), 3);
    for ((c, attempt), row) in started.iter().zip(&rows) {
        assert_eq!(c.allocation.id, row.id, "in the order given");
        assert_eq!(c.allocation.status, AllocationStatus::Transferring);
        assert_eq!(c.allocation.generation, 1);
        assert_eq!(
            c.allocation.idempotency_key.as_deref(),
            Some(transfer_idempotency_key(&aid(row), 1).as_str())
        );
        assert_eq!(
            c.allocation.next_attempt_at.map(|t| t.timestamp_micros()),
            Some(lease_ends.timestamp_micros())
        );
        assert_eq!(
            (attempt.generation, attempt.amount_cents),
            (1, row.net_amount_cents.unwrap())
        );
        assert_eq!(
            attempt.source_transaction, p.payment.charge_id,
            "a first generation is funded by the charge"
        );
        assert_eq!(attempt.destination_account_id, c.destination_account_id);
        assert_eq!(attempt.metadata.0.get("generation").map(String::as_str), Some("1"));
    }
    let nets: i64 = rows.iter().map(|a| a.net_amount_cents.unwrap()).sum();
    let frozen: i64 = sqlx::query_scalar("SELECT sum(amount_cents)::bigint FROM transfer_attempts")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(frozen, nets, "the nets, to the cent");
}

/// A `payment_intent.succeeded` for each payment, stored unprocessed, and the start-batch item for it (charge
/// `ch_…`, a balance transaction of the payment's total with `fee_cents`).
async fn success_items(
    pool: &PgPool,
    payments: &[SplitPayment],
    fee_cents: i64,
) -> Vec<splitpay::jobs::start_batch::Item> {
    let mut items = Vec::new();
    for p in payments {
        let suffix = &p.payment.id[5..];
        let (event_id, intent_id, charge_id) =
            (format!("evt_{suffix}"), format!("pi_{suffix}"), format!("ch_{suffix}"));
        let created = chrono::Utc::now() - chrono::Duration::seconds(5);
        insert_stripe_event(
            &mut pool.acquire().await.unwrap(),
            &NewStripeEvent {
                id: event_id.clone(),
                event_type: "payment_intent.succeeded".into(),
                object_id: Some(intent_id.clone()),
                livemode: false,
                payload: serde_json::json!({"data": {"object": {"id": intent_id, "latest_charge": charge_id}}}),
                stripe_created: Some(created),
            },
        )
        .await
        .unwrap();
        items.push(splitpay::jobs::start_batch::Item {
            event_id,
            payment_id: pid(p),
            intent_id,
            charge_id,
            observed_at: created,
            balance_transaction: splitpay::stripe::BalanceTransactionInfo {
                id: format!("txn_{suffix}"),
                amount_cents: p.payment.total_amount_cents,
                fee_cents,
                net_cents: p.payment.total_amount_cents - fee_cents,
                currency: "aud".into(),
                available_on: 0,
            },
        });
    }
    items
}

/// A payment's rows and events as JSON, to show a payment the batch did not take is untouched.
async fn payment_rows(pool: &PgPool, id: &str) -> serde_json::Value {
    sqlx::query_scalar(
        "SELECT jsonb_build_object(
                  'payment', (SELECT to_jsonb(p) FROM split_payments p WHERE p.id = $1),
                  'shares', (SELECT jsonb_agg(to_jsonb(a) ORDER BY a.position) FROM split_allocations a
                              WHERE a.split_payment_id = $1),
                  'attempts', (SELECT count(*) FROM transfer_attempts t JOIN split_allocations a
                                   ON a.id = t.split_allocation_id WHERE a.split_payment_id = $1),
                  'events', (SELECT jsonb_agg(to_jsonb(e) ORDER BY e.id) FROM stripe_events e
                              WHERE e.id = 'evt_' || substr($1, 6)),
                  'outbox', (SELECT count(*) FROM outbox_events o WHERE o.payload::text LIKE '%' || $1 || '%'))",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Issue 11: the batch that starts succeeded payments together (`jobs::start_batch`) takes only the plain case, in
/// one transaction, and answers `None` for every other, writing nothing of it (the event job then goes the lone way,
/// which decides it). Plain: two payments (one with its PaymentIntent recorded, REQUIRES_PAYMENT). Not: an event
/// already processed, a payment already SUCCEEDED, a balance transaction of another amount, fees that take every
/// share whole, a share another transaction holds (skipped, not waited for), another PaymentIntent than the
/// payment's, a refund (attributed before the success) waiting on a share, the same payment twice in one batch.
#[tokio::test]
async fn a_start_batch_takes_the_plain_successes_together_and_hands_back_every_other_case() {
    use splitpay::domain::state::{PaymentEvent, PaymentStatus};
    use splitpay::jobs::group_commit::BatchWrite;
    use splitpay::jobs::start_batch::StartPayments;
    use splitpay::store::payments::{get_split_payment, transition_payment, PaymentPatch};

    let db = TestDb::new().await;
    let pool = db.pool.clone();
    let (ctx, _sim) = recorder_ctx(&pool).await;
    let payments = new_payments(&pool, &[1000, 2000, 3001], 9).await;
    let mut items = success_items(&pool, &payments, 183).await;
    // 1: its PaymentIntent recorded by intake (REQUIRES_PAYMENT).
    let mut tx = pool.begin().await.unwrap();
    let patch = PaymentPatch {
        payment_intent_id: Some(items[1].intent_id.clone()),
        ..Default::default()
    };
    transition_payment(&mut tx, &pid(&payments[1]), PaymentEvent::IntentCreated, &patch, &[])
        .await
        .unwrap();
    // 2: its event already processed.
    finish_stripe_event(&mut tx, &items[2].event_id, None).await.unwrap();
    // 3: already SUCCEEDED (another event applied it).
    transition_payment(
        &mut tx,
        &pid(&payments[3]),
        PaymentEvent::Succeeded,
        &PaymentPatch::default(),
        &[],
    )
    .await
    .unwrap();
    // 7: its PaymentIntent is another.
    let other = PaymentPatch {
        payment_intent_id: Some("pi_someone_else".into()),
        ..Default::default()
    };
    transition_payment(&mut tx, &pid(&payments[7]), PaymentEvent::IntentCreated, &other, &[])
        .await
        .unwrap();
    // 8: a refund that arrived before the success, its part waiting on share 2 (the lone way covers it from what is
    // pending, and sends less).
    sqlx::query(
        "WITH r AS (INSERT INTO refunds (stripe_refund_id, split_payment_id, amount_cents, currency, status, source)
                    VALUES ('re_early', $1, 500, 'aud', 'SUCCEEDED', 'external') RETURNING id)
         INSERT INTO refund_parts (refund_id, split_allocation_id, amount_cents) SELECT id, $2, 500 FROM r",
    )
    .bind(&payments[8].payment.id)
    .bind(&payments[8].allocations[2].id)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    // 4: a balance transaction of another amount; 5: fees that take everything.
    items[4].balance_transaction.amount_cents += 1;
    items[5].balance_transaction.fee_cents = payments[5].payment.total_amount_cents;
    // 6: one share held by another transaction.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM split_allocations WHERE id = $1 FOR UPDATE")
        .bind(&payments[6].allocations[1].id)
        .execute(&mut *holder)
        .await
        .unwrap();
    // The same payment twice: the second is not taken.
    items.push(items[0].clone());
    let not_taken = [2, 3, 4, 5, 6, 7, 8];
    let mut before = Vec::new();
    for &n in &not_taken {
        before.push(payment_rows(&pool, &payments[n].payment.id).await);
    }

    // The answers' steps are taken out undriven (`into_steps`): a `Started` dropped undriven drives its transfers.
    let answers: Vec<_> = StartPayments::write(&ctx, &items)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.map(splitpay::jobs::start_batch::Started::into_steps))
        .collect();
    let taken: Vec<bool> = answers.iter().map(Option::is_some).collect();
    assert_eq!(
        taken,
        [true, true, false, false, false, false, false, false, false, false]
    );
    holder.rollback().await.unwrap();
    for (&n, before) in not_taken.iter().zip(&before) {
        assert_eq!(
            &payment_rows(&pool, &payments[n].payment.id).await,
            before,
            "payment {n} untouched"
        );
    }

    let platform_fee = |total: i64| ctx.distribution.platform_fee.fee_cents(total);
    for (n, answer) in answers.iter().enumerate().take(2) {
        let (steps, _) = answer.as_ref().unwrap();
        let item = &items[n];
        let p = get_split_payment(&mut pool.acquire().await.unwrap(), &item.payment_id)
            .await
            .unwrap();
        let row = &p.payment;
        assert_eq!(row.status, PaymentStatus::Succeeded);
        assert_eq!(row.payment_intent_id.as_deref(), Some(item.intent_id.as_str()));
        assert_eq!(row.charge_id.as_deref(), Some(item.charge_id.as_str()));
        assert_eq!(row.processing_fee_cents, Some(183));
        assert_eq!(row.platform_fee_cents, Some(platform_fee(row.total_amount_cents)));
        assert_eq!(row.fee_uncollected_cents, Some(0));
        assert!(row.succeeded_at.is_some() && row.distributed_at == row.succeeded_at && row.audit_due_at.is_some());
        assert_eq!(
            row.stripe_event_at.map(|t| t.timestamp_micros()),
            Some(item.observed_at.timestamp_micros())
        );
        // Every share split (conserved to the cent) and its first generation started, as the steps were told.
        let fees: i64 = p.allocations.iter().map(|a| a.fee_share_cents.unwrap()).sum();
        let nets: i64 = p.allocations.iter().map(|a| a.net_amount_cents.unwrap()).sum();
        assert_eq!(fees, 183 + platform_fee(row.total_amount_cents));
        assert_eq!(nets + fees, row.total_amount_cents);
        assert_eq!(steps.len(), 3);
        for (a, (c, attempt)) in p.allocations.iter().zip(steps) {
            assert_eq!((a.status, a.generation), (AllocationStatus::Transferring, 1));
            assert_eq!(
                a.idempotency_key.as_deref(),
                Some(transfer_idempotency_key(&aid(a), 1).as_str())
            );
            assert_eq!(&c.allocation, a, "the step's share is the stored row");
            assert_eq!(&c.payment, row, "the step's payment is the stored row");
            assert_eq!(attempt.amount_cents, a.net_amount_cents.unwrap());
            assert_eq!(attempt.source_transaction.as_deref(), Some(item.charge_id.as_str()));
            assert_eq!(attempt.destination_account_id, c.destination_account_id);
            assert_eq!(attempt.idempotency_key, a.idempotency_key.clone().unwrap());
        }
        let (processed, attempts): (bool, i32) =
            sqlx::query_as("SELECT processed_at IS NOT NULL, process_attempts FROM stripe_events WHERE id = $1")
                .bind(&item.event_id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!((processed, attempts), (true, 1));
        let announced: Vec<(String, String)> =
            sqlx::query_as("SELECT event_type, dedup_key FROM outbox_events WHERE payload::text LIKE '%' || $1 || '%'")
                .bind(&row.id)
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(announced.len(), 1, "{announced:?}");
        assert_eq!(announced[0].0, "recommendation_set.payment_succeeded");
    }

    // Again: the payment whose share was held is plain now that it is not, and is taken; nothing more is written
    // for the others.
    let snapshot = payment_rows(&pool, &payments[0].payment.id).await;
    let again: Vec<_> = StartPayments::write(&ctx, &items)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.map(splitpay::jobs::start_batch::Started::into_steps))
        .collect();
    let taken: Vec<bool> = again.iter().map(Option::is_some).collect();
    assert_eq!(
        taken,
        [false, false, false, false, false, false, true, false, false, false]
    );
    assert_eq!(payment_rows(&pool, &payments[0].payment.id).await, snapshot);
}

/// Issue 11 review: a payment the start batch writes for an event job that is gone by the time it commits (the job
/// timed out, its task was dropped) is not left waiting out its lease for the sweeper: its answer, dropped undriven,
/// drives its shares' transfers itself. Here the batch's last write takes a second, the caller is aborted meanwhile, and the simulator
/// then sees each share's first-generation create, under its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_payment_whose_caller_is_gone_is_driven_by_its_writer() {
    use splitpay::jobs::group_commit::GroupCommit;
    use splitpay::jobs::start_batch::StartPayments;

    let db = TestDb::new().await;
    let pool = db.pool.clone();
    let (ctx, sim) = recorder_ctx(&pool).await;
    let payments = new_payments(&pool, &[1000, 2000], 1).await;
    let item = success_items(&pool, &payments, 60).await.remove(0);
    sqlx::raw_sql(
        "CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN PERFORM pg_sleep(1); RETURN NEW; END $$;
         CREATE TRIGGER slow_write BEFORE UPDATE ON stripe_events FOR EACH ROW EXECUTE FUNCTION slow_write();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let c = ctx.clone();
    let caller = tokio::spawn(async move { GroupCommit::<StartPayments>::submit(&c, item).await });
    let mut sleeping = false;
    for _ in 0..500 {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'")
            .fetch_one(&pool)
            .await
            .unwrap();
        if n > 0 {
            sleeping = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(sleeping, "the batch reached its slow write");
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());

    let keys: Vec<String> = payments[0]
        .allocations
        .iter()
        .map(|a| transfer_idempotency_key(&aid(a), 1))
        .collect();
    let mut sent = Vec::new();
    for _ in 0..100 {
        sent = common::stripe::transfer_create_keys(&sim.control()).await;
        if keys.iter().all(|k| sent.contains(k)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        keys.iter().all(|k| sent.contains(k)),
        "each share's transfer was asked for: {sent:?}"
    );
    let status: Vec<String> = sqlx::query_scalar("SELECT status FROM split_payments WHERE id = $1")
        .bind(&payments[0].payment.id)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(status, ["SUCCEEDED"], "the batch committed");
}

/// Issue 11 review: a batch that does not commit drives nothing. Its answers are built before the commit; were they
/// armed then, dropping them after a failed commit would send the rolled-back shares' transfers to Stripe. Here the
/// commit itself fails (a deferred trigger), and neither the simulator nor the tables see anything of the payment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_batch_whose_commit_fails_drives_nothing() {
    use splitpay::jobs::group_commit::BatchWrite;
    use splitpay::jobs::start_batch::StartPayments;

    let db = TestDb::new().await;
    let pool = db.pool.clone();
    let (ctx, sim) = recorder_ctx(&pool).await;
    let payments = new_payments(&pool, &[1000, 2000], 1).await;
    let items = success_items(&pool, &payments, 60).await;
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'refused at commit'; END $$;
         CREATE CONSTRAINT TRIGGER refuse_commit AFTER UPDATE ON stripe_events DEFERRABLE INITIALLY DEFERRED
           FOR EACH ROW EXECUTE FUNCTION refuse_commit();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let before = payment_rows(&pool, &payments[0].payment.id).await;
    let err = StartPayments::write(&ctx, &items).await.unwrap_err();
    assert!(err.to_string().contains("refused at commit"), "{err}");
    // Whatever the dropped answers would do, they would do it at once: a second is plenty to see it.
    tokio::time::sleep(std::time::Duration::from_millis(1_000)).await;
    let log = sim.control().get("requests").await.unwrap();
    let transfers = log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["path"] == "/v1/transfers")
        .count();
    assert_eq!(transfers, 0, "no transfer asked for a batch that rolled back");
    assert_eq!(
        payment_rows(&pool, &payments[0].payment.id).await,
        before,
        "nothing written"
    );
}
