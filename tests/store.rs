//! The store against a real PostgreSQL: a fresh, migrated database per test (`common::db::TestDb`): sets, payments and
//! their transitions with their events, fee splits, donations, the outbox, inbox and cron claims, the schema's rules
//! and migrations. Transfers, generations and conservation are in `store_transfers.rs`.

mod common;

use chrono::Utc;
use common::db::TestDb;
use common::{count, seed_set, DISTRIBUTOR};
use splitpay::domain::fees::split_fees;
use splitpay::domain::plan::AmountMode;
use splitpay::domain::state::{AllocationStatus, DonationEvent, PaymentEvent, PaymentStatus, Transition};
use splitpay::events::EventType;
use splitpay::store::catalog::{
    create_recommendation_set, get_recommendation_set, NewRecommendationSet, NewSetAllocation,
};
use splitpay::store::donations::*;
use splitpay::store::payments::*;
use splitpay::store::records::*;
use splitpay::store::StoreError;

use common::store_fixtures::*;

#[tokio::test]
async fn set_reads_back_in_order_with_its_links() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    let set = seed_set(&pool, AmountMode::Suggested, &[1000, 2500, 500]).await;
    let again = get_recommendation_set(&mut pool.acquire().await.unwrap(), "cm3rec1")
        .await
        .unwrap();
    assert_eq!(set, again);
    let amounts: Vec<i64> = again.allocations.iter().map(|a| a.amount_cents).collect();
    assert_eq!(amounts, vec![1000, 2500, 500]);
    assert_eq!(again.allocations[1].stripe_connect_account_id, "acct_rcp1");
    assert_eq!(again.allocations[2].recipient_org_name, "Recipient 2");
    assert_eq!(again.amount_mode, AmountMode::Suggested);
    assert_eq!(again.rules().allocations.len(), 3);
}

#[tokio::test]
async fn a_set_with_a_foreign_link_is_refused_and_writes_nothing() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    seed_set(&pool, AmountMode::Fixed, &[1000]).await;
    let sets_before = count(&pool, "recommendation_sets").await;
    let mut tx = pool.begin().await.unwrap();
    // Another organisation, trying to direct funds through the distributor's link.
    splitpay::store::catalog::create_organisation(
        &mut tx,
        &splitpay::store::catalog::NewOrganisation {
            id: "cm3orgother".into(),
            name: "Other".into(),
        },
    )
    .await
    .unwrap();
    let err = create_recommendation_set(
        &mut tx,
        &NewRecommendationSet {
            id: "cm3rec2".into(),
            organisation_id: "cm3orgother".into(),
            name: "Sneaky".into(),
            slug: "sneaky".into(),
            amount_mode: AmountMode::Fixed,
            currency: splitpay::domain::money::Currency::Aud,
            expires_at: None,
            donor_prefill: None,
            allocations: vec![NewSetAllocation {
                id: "cm3alcX".into(),
                recipient_org_account_link_id: "cm3lnk0".into(),
                amount_cents: 100,
            }],
        },
    )
    .await
    .unwrap_err();
    drop(tx);
    assert!(
        err.to_string().contains("allocations[0].recipient_org_account_link_id"),
        "{err}"
    );
    assert_eq!(count(&pool, "recommendation_sets").await, sets_before);
    assert_eq!(
        count(&pool, "organisations").await,
        2,
        "the rolled-back organisation is gone too"
    );
}

#[tokio::test]
async fn split_payment_is_written_with_one_allocation_per_line() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    let p = new_payment(&pool, &[1000, 2500, 500]).await;
    assert_eq!(p.payment.status, PaymentStatus::Created);
    assert_eq!(p.payment.total_amount_cents, 4000);
    assert_eq!(p.payment.transfer_group, p.payment.id);
    let gross: Vec<i64> = p.allocations.iter().map(|a| a.gross_amount_cents).collect();
    assert_eq!(gross, vec![1000, 2500, 500]);
    assert!(p
        .allocations
        .iter()
        .all(|a| a.status == AllocationStatus::Pending && a.generation == 0));
    assert!(p.allocations.iter().all(|a| a.id.starts_with("salc_")));
    assert_eq!(count(&pool, "split_allocations").await, 3);
}

#[tokio::test]
async fn payment_transition_writes_state_and_event_together() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    let p = new_payment(&pool, &[1000, 2000]).await;
    let id = pid(&p);
    let mut tx = pool.begin().await.unwrap();
    let patch = PaymentPatch {
        payment_intent_id: Some("pi_123".into()),
        ..Default::default()
    };
    let t = transition_payment(&mut tx, &id, PaymentEvent::IntentCreated, &patch, &[])
        .await
        .unwrap();
    assert_eq!(t, Transition::To(PaymentStatus::RequiresPayment));
    tx.commit().await.unwrap();
    assert_eq!(
        find_split_payment_by_intent(&mut pool.acquire().await.unwrap(), "pi_123")
            .await
            .unwrap(),
        Some(id.clone())
    );

    let p = succeed_with_fees(&pool, &p, 0, 0).await;
    assert_eq!(p.payment.status, PaymentStatus::Succeeded);
    assert!(p.payment.succeeded_at.is_some());
    let events = outbox_events_about(&mut pool.acquire().await.unwrap(), id.as_str())
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event_type, "recommendation_set.payment_succeeded");
    assert_eq!(events[0].payload["data"]["total_amount_cents"], 3000);
    assert_eq!(events[0].payload["organisation_id"], DISTRIBUTOR);

    // A late `processing` after success: nothing changes, nothing is emitted.
    let mut tx = pool.begin().await.unwrap();
    let late = transition_payment(
        &mut tx,
        &id,
        PaymentEvent::Processing,
        &PaymentPatch::default(),
        &[payment_event(EventType::PaymentSucceeded, &p.payment)],
    )
    .await
    .unwrap();
    assert_eq!(late, Transition::Unchanged);
    tx.commit().await.unwrap();
    assert_eq!(
        outbox_events_about(&mut pool.acquire().await.unwrap(), id.as_str())
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn forbidden_payment_transition_changes_nothing() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    let p = new_payment(&pool, &[1000, 2000]).await;
    let p = succeed_with_fees(&pool, &p, 30, 0).await;
    let id = pid(&p);
    let outbox_before = count(&pool, "outbox_events").await;
    let mut tx = pool.begin().await.unwrap();
    let failed = payment_event(EventType::PaymentFailed, &p.payment);
    let patch = PaymentPatch {
        failure_code: Some("card_declined".into()),
        ..Default::default()
    };
    let err = transition_payment(&mut tx, &id, PaymentEvent::Failed, &patch, &[failed])
        .await
        .unwrap_err();
    drop(tx);
    assert!(
        matches!(err, StoreError::Forbidden(ref f) if f.from == "SUCCEEDED" && f.event == "failed"),
        "{err}"
    );
    let after = get_split_payment(&mut pool.acquire().await.unwrap(), &id)
        .await
        .unwrap();
    assert_eq!(after.payment.status, PaymentStatus::Succeeded);
    assert_eq!(after.payment.failure_code, None);
    assert_eq!(count(&pool, "outbox_events").await, outbox_before);
}

#[tokio::test]
async fn fee_split_is_stored_exactly_and_only_once() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    let p = new_payment(&pool, &[1000, 1000, 1000]).await;
    let p = succeed_with_fees(&pool, &p, 70, 30).await;
    let fees: Vec<i64> = p.allocations.iter().map(|a| a.fee_share_cents.unwrap()).collect();
    let nets: Vec<i64> = p.allocations.iter().map(|a| a.net_amount_cents.unwrap()).collect();
    assert_eq!(fees, vec![34, 33, 33]);
    assert_eq!(nets, vec![966, 967, 967]);
    assert_eq!(p.payment.processing_fee_cents, Some(70));
    assert_eq!(p.payment.platform_fee_cents, Some(30));

    // The same split again is a no-op; a different one is refused and changes nothing.
    let split = split_fees(&[1000, 1000, 1000], 70, 30).unwrap();
    let mut tx = pool.begin().await.unwrap();
    write_fee_split(&mut tx, &pid(&p), None, 70, 30, &split, false)
        .await
        .unwrap();
    let other = split_fees(&[1000, 1000, 1000], 90, 30).unwrap();
    let err = write_fee_split(&mut tx, &pid(&p), None, 90, 30, &other, false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("different fee split"), "{err}");
    drop(tx);
    let again = get_split_payment(&mut pool.acquire().await.unwrap(), &pid(&p))
        .await
        .unwrap();
    assert_eq!(again, p);
    assert_eq!(p.payment.distributed_at, None, "written without mark_distributed");

    // Written by a distribution (`mark_distributed`): the same UPDATE marks the payment distributed and its audit
    // due an hour later; written again, neither moves.
    let mut tx = pool.begin().await.unwrap();
    write_fee_split(&mut tx, &pid(&p), None, 70, 30, &split, true)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let marked = get_split_payment(&mut pool.acquire().await.unwrap(), &pid(&p))
        .await
        .unwrap();
    let distributed_at = marked.payment.distributed_at.expect("marked distributed");
    let (audit_due_in_secs,): (f64,) = sqlx::query_as(
        "SELECT extract(epoch FROM audit_due_at - distributed_at)::float8 FROM split_payments WHERE id = $1",
    )
    .bind(&p.payment.id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(audit_due_in_secs, 3_600.0);
    let mut tx = pool.begin().await.unwrap();
    write_fee_split(&mut tx, &pid(&p), None, 70, 30, &split, true)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let again = get_split_payment(&mut pool.acquire().await.unwrap(), &pid(&p))
        .await
        .unwrap();
    assert_eq!(again.payment.distributed_at, Some(distributed_at));
}

#[tokio::test]
async fn donations_are_created_once_and_move_with_their_events() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    let p = new_payment(&pool, &[1000, 2000]).await;
    let id = aid(&p.allocations[1]);
    let created = |d: &DonationRow| {
        vec![
            splitpay::store::announce::donation(EventType::DonationCreated, d, Utc::now())
                .expect("the donation has a donor"),
        ]
    };
    let mut tx = pool.begin().await.unwrap();
    let d1 = create_donation_for_allocation(&mut tx, &id, Utc::now(), created)
        .await
        .unwrap();
    let d2 = create_donation_for_allocation(&mut tx, &id, Utc::now(), created)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(d1, d2, "the second call returns the same row");
    assert_eq!(
        d1.organisation_id, "cm3orgrcp1",
        "the donation belongs to the recipient"
    );
    assert_eq!((d1.amount_cents, d1.source.as_str()), (2000, "SPLIT_GATEWAY"));
    assert_eq!(count(&pool, "donations").await, 1);
    assert_eq!(
        outbox_events_about(&mut pool.acquire().await.unwrap(), &d1.id)
            .await
            .unwrap()
            .len(),
        1
    );

    let donation_id = splitpay::domain::ids::DonationId::parse(&d1.id).unwrap();
    let mut tx = pool.begin().await.unwrap();
    let t = transition_donation(
        &mut tx,
        &donation_id,
        DonationEvent::Confirmed,
        &DonationPatch {
            received_date: Some(Utc::now()),
            ..Default::default()
        },
        |d| {
            vec![
                splitpay::store::announce::donation(EventType::DonationSucceeded, d, Utc::now())
                    .expect("the donation has a donor"),
            ]
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(t, Transition::To(splitpay::domain::state::DonationStatus::Confirmed));
    let events = outbox_events_about(&mut pool.acquire().await.unwrap(), &d1.id)
        .await
        .unwrap();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, vec!["donation.created", "donation.succeeded"]);
    assert_eq!(
        events[1].payload["data"]["status"], "CONFIRMED",
        "payload shows the new state"
    );

    let mut tx = pool.begin().await.unwrap();
    let err = transition_donation(
        &mut tx,
        &donation_id,
        DonationEvent::Failed,
        &DonationPatch::default(),
        |_| vec![],
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::Forbidden(_)));
}

#[tokio::test]
async fn outbox_inbox_and_cron_claims_deduplicate() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    let p = new_payment(&pool, &[1000]).await;
    let event = payment_event(EventType::PaymentSucceeded, &p.payment);
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(
        insert_outbox_events(&mut conn, &[event.clone(), event.clone()])
            .await
            .unwrap(),
        1
    );
    assert_eq!(insert_outbox_events(&mut conn, &[event]).await.unwrap(), 0);

    let stripe_event = NewStripeEvent {
        id: "evt_1".into(),
        event_type: "payment_intent.succeeded".into(),
        object_id: Some("pi_1".into()),
        livemode: false,
        payload: serde_json::json!({"id": "evt_1"}),
        stripe_created: Some(Utc::now()),
    };
    assert!(insert_stripe_event(&mut conn, &stripe_event).await.unwrap());
    assert!(
        !insert_stripe_event(&mut conn, &stripe_event).await.unwrap(),
        "a redelivery is recognised"
    );
    mark_stripe_event(&mut conn, "evt_1", Some("charge not found yet"))
        .await
        .unwrap();
    let stored = get_stripe_event(&mut conn, "evt_1").await.unwrap();
    assert_eq!(
        (stored.event_type.as_str(), stored.object_id.as_deref()),
        ("payment_intent.succeeded", Some("pi_1"))
    );
    assert_eq!(
        (stored.processed_at, stored.process_error.as_deref()),
        (None, Some("charge not found yet"))
    );
    mark_stripe_event(&mut conn, "evt_1", None).await.unwrap();
    let stored = get_stripe_event(&mut conn, "evt_1").await.unwrap();
    assert!(stored.processed_at.is_some() && stored.process_error.is_none());
    let org = splitpay::store::catalog::get_organisation(&mut conn, DISTRIBUTOR)
        .await
        .unwrap();
    assert_eq!(org.name, "Climate Fund");
    assert!(matches!(
        splitpay::store::catalog::get_organisation(&mut conn, "cm3nobody").await,
        Err(StoreError::NotFound { .. })
    ));

    let tick = chrono::DateTime::parse_from_rfc3339("2026-11-22T10:05:00Z")
        .unwrap()
        .with_timezone(&Utc);
    assert!(claim_cron_tick(&mut conn, "sweeper", tick, "worker-a").await.unwrap());
    assert!(!claim_cron_tick(&mut conn, "sweeper", tick, "worker-b").await.unwrap());
    assert!(claim_cron_tick(&mut conn, "reconcile-pending", tick, "worker-b")
        .await
        .unwrap());

    let entry = AuditEntry {
        actor: "ops@example.org".into(),
        command: "retry".into(),
        target_type: "split_allocation".into(),
        target_id: "salc_x".into(),
        reason: Some("account fixed".into()),
        details: serde_json::json!({"generation": 2}),
    };
    insert_audit(&mut conn, &entry).await.unwrap();
    let rows = audit_for(&mut conn, "salc_x").await.unwrap();
    assert_eq!(
        (
            rows.len(),
            rows[0].command.as_str(),
            rows[0].details["generation"].as_i64()
        ),
        (1, "retry", Some(2))
    );
}

#[tokio::test]
async fn the_schema_refuses_what_the_rules_forbid() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    let p = new_payment(&pool, &[1000]).await;
    let cases: Vec<(&str, String)> = vec![
        ("payments_transfer_group_is_id", format!("UPDATE split_payments SET transfer_group = 'x' WHERE id = '{}'", p.payment.id)),
        ("payments_status_valid", format!("UPDATE split_payments SET status = 'succeeded' WHERE id = '{}'", p.payment.id)),
        ("payments_total_within_stripe_limits", format!("UPDATE split_payments SET total_amount_cents = 100000000 WHERE id = '{}'", p.payment.id)),
        ("payments_becs_is_aud", format!("UPDATE split_payments SET payment_method_type = 'au_becs_debit', currency = 'usd' WHERE id = '{}'", p.payment.id)),
        ("split_allocations_fee_split_exact", format!("UPDATE split_allocations SET fee_share_cents = 10, net_amount_cents = 10 WHERE split_payment_id = '{}'", p.payment.id)),
        ("split_allocations_transferring_has_intent", format!("UPDATE split_allocations SET status = 'TRANSFERRING' WHERE split_payment_id = '{}'", p.payment.id)),
        ("split_allocations_transferred_has_transfer", format!("UPDATE split_allocations SET status = 'TRANSFERRED', generation = 1, idempotency_key = 'k', fee_share_cents = 0, net_amount_cents = 1000 WHERE split_payment_id = '{}'", p.payment.id)),
        ("allocations_amount_int32_non_negative", "UPDATE recommendation_allocations SET amount_cents = -1".into()),
        ("split_allocations_one_per_set_allocation", format!("INSERT INTO split_allocations (id, split_payment_id, recommendation_allocation_id, recipient_org_account_link_id, position, gross_amount_cents) VALUES ('salc_dup', '{}', 'cm3alc0', 'cm3lnk0', 1, 5)", p.payment.id)),
        ("links_stripe_account_is_acct", "UPDATE recipient_account_links SET stripe_connect_account_id = 'pi_123'".into()),
    ];
    for (constraint, sql) in cases {
        let err = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
            .execute(&pool)
            .await
            .unwrap_err();
        assert_eq!(StoreError::from(err).constraint(), Some(constraint), "{sql}");
    }
    let again = get_split_payment(&mut pool.acquire().await.unwrap(), &pid(&p))
        .await
        .unwrap();
    assert_eq!(again, p, "every refused write left the payment as it was");
}

#[tokio::test]
async fn a_set_takes_payments_only_while_it_and_its_links_can() {
    use splitpay::store::catalog::SetUnavailable;
    let db = TestDb::new().await;
    let set = seed_set(&db.pool, AmountMode::Suggested, &[1000, 2000]).await;
    let now = Utc::now();
    let both = ["cm3lnk0", "cm3lnk1"];
    assert_eq!(set.check_available(now, &both), Ok(()));

    let mut s = set.clone();
    s.is_active = false;
    assert_eq!(s.check_available(now, &both), Err(SetUnavailable::Inactive));
    let mut s = set.clone();
    s.archived_at = Some(now);
    assert_eq!(s.check_available(now, &both), Err(SetUnavailable::Archived));
    let mut s = set.clone();
    let past = now - chrono::Duration::seconds(1);
    s.expires_at = Some(past);
    assert_eq!(s.check_available(now, &both), Err(SetUnavailable::Expired(past)));
    s.expires_at = Some(now + chrono::Duration::hours(1));
    assert_eq!(s.check_available(now, &both), Ok(()), "not expired yet");

    // `charges_enabled` false (Stripe's word for a transfers-only account, or an account still onboarding) does not
    // refuse the donor: the share parks and is retried when the account can receive transfers.
    let mut s = set.clone();
    s.allocations[1].charges_enabled = false;
    assert_eq!(s.check_available(now, &both), Ok(()));
    let mut s = set.clone();
    s.allocations[0].link_is_active = false;
    assert_eq!(
        s.check_available(now, &both),
        Err(SetUnavailable::LinkInactive {
            link_id: "cm3lnk0".into()
        })
    );
    assert_eq!(
        s.check_available(now, &["cm3lnk1"]),
        Ok(()),
        "a recipient the donor zeroed out is not checked"
    );
}

/// The lifecycle migration carries rows written before it: a ZERO_NET share becomes PARKED `net_amount_zero`, a
/// share parked `retries_exhausted` goes back to TRANSFERRING at the same generation and key (a lookup decides), a
/// TRANSFERRING row gets a due time, the attempts get their frozen parameters, and the payment its flags.
#[tokio::test]
async fn the_lifecycle_migration_carries_rows_written_before_it() {
    let db = TestDb::empty().await;
    let lifecycle = 20261204000001_i64;
    let migrations: Vec<_> = splitpay::store::MIGRATOR.iter().collect();
    for m in migrations.iter().filter(|m| m.version < lifecycle) {
        sqlx::raw_sql(m.sql.clone()).execute(&db.pool).await.unwrap();
    }
    sqlx::raw_sql(
        "INSERT INTO organisations (id, name) VALUES ('o_d', 'D'), ('o_r', 'R');
         INSERT INTO recipient_account_links (id, distributor_organisation_id, recipient_organisation_id,
             recipient_org_name, label, stripe_connect_account_id, charges_enabled)
           VALUES ('l_1', 'o_d', 'o_r', 'R', 'R', 'acct_1', true);
         INSERT INTO recommendation_sets (id, organisation_id, name, slug, amount_mode, currency)
           VALUES ('s_1', 'o_d', 'S', 's', 'FIXED', 'aud');
         INSERT INTO recommendation_allocations (id, recommendation_set_id, position, recipient_org_account_link_id,
             amount_cents) VALUES ('a_1', 's_1', 0, 'l_1', 30);
         INSERT INTO split_payments (id, recommendation_set_id, organisation_id, payment_method_type, currency,
             total_amount_cents, status, payment_intent_id, charge_id, transfer_group, succeeded_at,
             processing_fee_cents, platform_fee_cents, fee_uncollected_cents)
           VALUES ('spay_a', 's_1', 'o_d', 'card', 'aud', 30, 'SUCCEEDED', 'pi_a', 'ch_a', 'spay_a',
                   now() - interval '1 day', 30, 0, 0),
                  ('spay_b', 's_1', 'o_d', 'card', 'aud', 30, 'SUCCEEDED', 'pi_b', 'ch_b', 'spay_b',
                   now() - interval '1 day', 1, 0, 0),
                  ('spay_c', 's_1', 'o_d', 'card', 'aud', 30, 'SUCCEEDED', 'pi_c', 'ch_c', 'spay_c',
                   now() - interval '1 day', 1, 0, 0);
         INSERT INTO split_allocations (id, split_payment_id, recommendation_allocation_id,
             recipient_org_account_link_id, position, gross_amount_cents, fee_share_cents, net_amount_cents, status,
             generation, idempotency_key, failure_code, parked_at, attempts)
           VALUES
             ('salc_zero', 'spay_a', 'a_1', 'l_1', 0, 30, 30, 0, 'ZERO_NET', 0, NULL, NULL, NULL, 0),
             ('salc_exh', 'spay_b', 'a_1', 'l_1', 0, 30, 1, 29, 'PARKED', 1,
              'splitpay:alloc:salc_exh:transfer:1', 'retries_exhausted', now(), 8),
             ('salc_flight', 'spay_c', 'a_1', 'l_1', 0, 30, 1, 29, 'TRANSFERRING', 1,
              'splitpay:alloc:salc_flight:transfer:1', NULL, NULL, 2);
         INSERT INTO transfer_attempts (split_allocation_id, generation, idempotency_key, destination_account_id,
             amount_cents, currency, finished_at, outcome)
           VALUES ('salc_exh', 1, 'splitpay:alloc:salc_exh:transfer:1', 'acct_1', 29, 'aud', now(),
                   'RETRIES_EXHAUSTED'),
                  ('salc_flight', 1, 'splitpay:alloc:salc_flight:transfer:1', 'acct_1', 29, 'aud', NULL, NULL);",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    for m in migrations.iter().filter(|m| m.version >= lifecycle) {
        sqlx::raw_sql(m.sql.clone())
            .execute(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("migration {} on old rows: {e}", m.version));
    }
    let rows: Vec<(String, String, Option<String>, bool, i32)> = sqlx::query_as(
        "SELECT id, status, failure_code, next_attempt_at IS NOT NULL, generation FROM split_allocations ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (
                "salc_exh".into(),
                "TRANSFERRING".into(),
                Some("retries_exhausted".into()),
                true,
                1
            ),
            ("salc_flight".into(), "TRANSFERRING".into(), None, true, 1),
            (
                "salc_zero".into(),
                "PARKED".into(),
                Some("net_amount_zero".into()),
                false,
                0
            ),
        ]
    );
    type AttemptRow = (String, Option<String>, String, Option<String>, serde_json::Value);
    let attempts: Vec<AttemptRow> = sqlx::query_as(
        "SELECT split_allocation_id, outcome, transfer_group, source_transaction, metadata
           FROM transfer_attempts ORDER BY split_allocation_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        attempts[0].1, None,
        "the exhausted generation is open again: a lookup decides"
    );
    assert_eq!(
        (attempts[0].2.as_str(), attempts[0].3.as_deref()),
        ("spay_b", Some("ch_b"))
    );
    assert_eq!(
        attempts[1].4,
        serde_json::json!({"split_payment_id": "spay_c", "split_allocation_id": "salc_flight", "generation": "1"})
    );
    let (distributed, audit_due): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE distributed_at IS NOT NULL), count(*) FILTER (WHERE audit_due_at IS NOT NULL)
           FROM split_payments",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((distributed, audit_due), (3, 3));
}

/// Two `account.updated` of the same second that disagree, processed at once: the second's tie check ran before the
/// first committed, and its update (blocked on the row, then re-checked) skips the row. It must still be told a tie
/// (so Stripe's current answer decides), not stale (which left the first event's flags standing: seen in CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_event_of_the_same_second_racing_another_is_a_tie() {
    use splitpay::store::readiness::{apply_account_flags, AccountFlags, Applied};
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    seed_set(&pool, AmountMode::Suggested, &[1000]).await;
    let account: String = sqlx::query_scalar("SELECT stripe_connect_account_id FROM recipient_account_links LIMIT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    let second = Utc::now() + chrono::Duration::seconds(200);
    let second = chrono::DateTime::from_timestamp(second.timestamp(), 0).unwrap();
    // The first event (active) holds the row, uncommitted.
    let mut first = pool.begin().await.unwrap();
    let flags = |active| AccountFlags {
        charges_enabled: true,
        transfers_active: active,
    };
    let applied = apply_account_flags(&mut first, &account, flags(true), second, "evt_first", false, false)
        .await
        .unwrap();
    assert!(matches!(applied, Applied::Applied { .. }), "{applied:?}");
    // The second (inactive, same second) checks for a tie now, then waits on the row.
    let racer = {
        let pool = pool.clone();
        let account = account.clone();
        tokio::spawn(async move {
            let mut conn = pool.acquire().await.unwrap();
            apply_account_flags(&mut conn, &account, flags(false), second, "evt_second", false, false)
                .await
                .unwrap()
        })
    };
    let mut waiting = false;
    for _ in 0..200 {
        waiting = sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                             WHERE datname = current_database() AND wait_event_type = 'Lock')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(waiting, "the second event's update never waited on the first's row");
    first.commit().await.unwrap();
    assert_eq!(racer.await.unwrap(), Applied::Tie);
    // Stripe's answer, applied as authoritative, decides.
    let mut conn = pool.acquire().await.unwrap();
    let applied = apply_account_flags(&mut conn, &account, flags(false), second, "evt_second", true, false)
        .await
        .unwrap();
    assert!(matches!(applied, Applied::Applied { .. }), "{applied:?}");
    let active: bool = sqlx::query_scalar("SELECT bool_or(transfers_active) FROM recipient_account_links")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!active);
}

/// splitpay's pool talks to a loopback server in plain text (the server here offers TLS, and sqlx would take it:
/// CPU for no protection), unless the URL names an sslmode.
#[tokio::test]
async fn the_pool_uses_no_tls_over_loopback_unless_asked() {
    let db = TestDb::new().await;
    let ssl_of = |url: String| async move {
        let config = splitpay::config::DatabaseConfig {
            url: splitpay::config::Secret::new(url),
            pool_max: 1,
        };
        let pool = splitpay::store::connect(&config).await.unwrap();
        sqlx::query_scalar::<_, bool>("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert!(!ssl_of(db.url.clone()).await);
    let server_offers_tls: String = sqlx::query_scalar("SHOW ssl").fetch_one(&db.pool).await.unwrap();
    if server_offers_tls == "on" {
        assert!(
            ssl_of(format!("{}?sslmode=require", db.url)).await,
            "a named mode is kept"
        );
    }
}

/// `serve` and workers starting together on a fresh database all apply the migrations and the job queue's setup, one
/// at a time, and all start:
/// none is aborted by PostgreSQL's deadlock detector while another builds an index CONCURRENTLY (which waits for
/// every older snapshot, and sqlx's own lock waits inside a statement, holding one). Four sessions of their own, as
/// four processes would have; then the schema is whole, each migration applied once, and the swapped-in unique index
/// valid.
#[tokio::test]
async fn processes_starting_together_apply_the_migrations_one_at_a_time() {
    let db = TestDb::empty().await;
    let mut pools = Vec::new();
    for _ in 0..4 {
        pools.push(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(&db.url)
                .await
                .unwrap(),
        );
    }
    // Polled together on this task: each waits on its own session, so they run at once on the server.
    let started = futures_util::future::join_all(
        pools
            .iter()
            .map(|pool| splitpay::store::migrate_then(pool, || splitpay::jobs::queue::setup(pool))),
    )
    .await;
    for applied in started {
        applied.expect("every process starts");
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(applied, splitpay::store::MIGRATOR.iter().count() as i64);
    let valid: bool = sqlx::query_scalar(
        "SELECT i.indisvalid AND i.indisunique FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
          WHERE c.relname = 'split_allocations_transfer_unique'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(valid, "the swapped-in index is valid and unique");
    let leftover: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class WHERE relname IN ('split_allocations_transferred_unique', 'split_allocations_payment')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        leftover, 0,
        "the built index took its place and the redundant one is gone"
    );
}

/// After a start (migrations, then the job queue's setup), no table of splitpay's or apalis's has two indexes over the
/// same columns with the same predicate: each would be written at every insert and non-HOT update for nothing.
/// apalis's own migrations leave two such pairs on its jobs table (`unique_job_id` beside the primary key, `lidx`
/// beside `idx_apalis_jobs_lock_by`) and three on its workers table, which the setup drops but for the one a foreign
/// key depends on; and the outbox's index of its pre-webhook_deliveries
/// schedule is gone. A second start changes nothing.
#[tokio::test]
async fn a_started_database_has_no_duplicate_or_dead_index() {
    let db = TestDb::empty().await;
    for _ in 0..2 {
        splitpay::store::migrate_then(&db.pool, || splitpay::jobs::queue::setup(&db.pool))
            .await
            .expect("a start applies the migrations and the queue's setup");
    }
    let duplicates: Vec<(String, Vec<String>)> = sqlx::query_as(
        "SELECT n.nspname || '.' || t.relname, array_agg(c.relname::text ORDER BY c.relname)
           FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid
           JOIN pg_namespace n ON n.oid = t.relnamespace
          WHERE n.nspname IN ('public', 'apalis')
          GROUP BY n.nspname, t.relname, i.indkey::text, i.indclass::text, coalesce(pg_get_expr(i.indpred, i.indrelid), ''),
                   coalesce(pg_get_expr(i.indexprs, i.indrelid), '')
         HAVING count(*) > 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    // The one pair that stays: apalis's foreign key `jobs.lock_by → workers.id` was made on `unique_worker_id`, so it
    // cannot go, and the workers table is a row per worker, written at each heartbeat.
    let fk_backed = (
        "apalis.workers".to_owned(),
        vec!["unique_worker_id".to_owned(), "workers_pkey".to_owned()],
    );
    let duplicates: Vec<_> = duplicates.into_iter().filter(|d| *d != fk_backed).collect();
    assert!(duplicates.is_empty(), "indexes duplicated: {duplicates:?}");
    let jobs_indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'apalis' AND tablename = 'jobs' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for gone in ["unique_job_id", "lidx"] {
        assert!(
            !jobs_indexes.contains(&gone.to_owned()),
            "{gone} is dropped: {jobs_indexes:?}"
        );
    }
    for kept in [
        "jobs_pkey",
        "idx_apalis_jobs_lock_by",
        "idx_apalis_jobs_fetch_partial",
        "splitpay_jobs_waiting_payload",
    ] {
        assert!(
            jobs_indexes.contains(&kept.to_owned()),
            "{kept} stays: {jobs_indexes:?}"
        );
    }
    let outbox_schedule: Option<String> = sqlx::query_scalar("SELECT to_regclass('outbox_events_undelivered')::text")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(outbox_schedule, None, "nothing reads the outbox's old schedule");
}

/// A duplicate index's drop waits for every transaction on its table. Behind a long one it gives up after its lock
/// timeout and the start goes on: the queue's setup returns, and job inserts are not held up meanwhile (the setup's
/// `CREATE INDEX IF NOT EXISTS` of an index already there, run at every start, queued behind that transaction and
/// blocked every insert behind it: helper 63, reproduced here). The next start, the long transaction over, drops what
/// was left. (The 60 s bound only turns a hang into a failure.)
#[tokio::test]
async fn a_duplicate_index_drop_behind_a_long_transaction_waits_for_the_next_start() {
    let db = TestDb::empty().await;
    splitpay::store::migrate(&db.pool).await.unwrap();
    // The database as the previous release's start left it: apalis's schema with its duplicates, and splitpay's
    // index of waiting jobs.
    apalis_postgres::PostgresStorage::<()>::setup(&db.pool).await.unwrap();
    sqlx::query(
        "CREATE INDEX splitpay_jobs_waiting_payload ON apalis.jobs (job_type, job)
          WHERE status IN ('Pending', 'Queued', 'Failed')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // A long transaction that enqueued a job and has not committed.
    let mut report = db.pool.begin().await.unwrap();
    splitpay::jobs::queue::enqueue(&mut report, splitpay::jobs::queue::Queue::Transfer, "salc_long", None)
        .await
        .unwrap();
    let insert_meanwhile = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let mut conn = db.pool.acquire().await.unwrap();
        splitpay::jobs::queue::enqueue(
            &mut conn,
            splitpay::jobs::queue::Queue::Transfer,
            "salc_meanwhile",
            None,
        )
        .await
        .expect("a job insert is not held up by the setup");
    };
    let (started, ()) = tokio::join!(
        tokio::time::timeout(
            std::time::Duration::from_secs(60),
            splitpay::jobs::queue::setup(&db.pool)
        ),
        async {
            tokio::time::timeout(std::time::Duration::from_secs(60), insert_meanwhile)
                .await
                .expect("the insert finished")
        }
    );
    started
        .expect("the setup does not wait for the long transaction")
        .expect("the start goes on");
    let jobs_duplicates = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_class WHERE relname IN ('unique_job_id', 'lidx')
                AND relnamespace = 'apalis'::regnamespace",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert_eq!(
        jobs_duplicates(db.pool.clone()).await,
        2,
        "left while the transaction held the jobs table"
    );
    let workers_duplicates: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class WHERE relname IN ('wtidx', 'lsidx') AND relnamespace = 'apalis'::regnamespace",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(workers_duplicates, 0, "nothing held the workers table");
    report.commit().await.unwrap();
    splitpay::jobs::queue::setup(&db.pool).await.unwrap();
    assert_eq!(jobs_duplicates(db.pool.clone()).await, 0, "the next start dropped them");
    let job: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE job_type = 'splitpay.transfer'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(job, 2, "the jobs inserted before and meanwhile are there");
}

/// Dropping the outbox's foreign key locks organisations exclusively: behind a long transaction that reads them (a
/// report), the migration gives up after its 5 s lock timeout and the start fails, rather than waiting with every
/// payment's insert queued behind it (helper 64); the next start, the report over, applies it. (The 60 s bound only
/// turns a hang into a failure.)
#[tokio::test]
async fn the_outbox_foreign_key_drop_gives_up_behind_a_long_transaction() {
    let db = TestDb::empty().await;
    splitpay::store::MIGRATOR
        .run_to(20261214000001, &db.pool)
        .await
        .unwrap();
    let mut report = db.pool.begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM organisations")
        .execute(&mut *report)
        .await
        .unwrap();
    let blocked = tokio::time::timeout(std::time::Duration::from_secs(60), splitpay::store::migrate(&db.pool))
        .await
        .expect("the migration does not wait for the report");
    let error = blocked.expect_err("the start fails while the report holds organisations");
    assert!(error.to_string().contains("lock timeout"), "{error}");
    report.commit().await.unwrap();
    splitpay::store::migrate(&db.pool)
        .await
        .expect("the next start applies it");
    let fk: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_constraint WHERE conname = 'outbox_events_organisation_id_fkey'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(fk, 0);
}

/// A process killed while it built the unique index CONCURRENTLY leaves it invalid (it neither enforces nor serves
/// anything). The next start drops it and builds it again, instead of swapping an invalid index in for the
/// constraint or refusing to start until an operator steps in. Simulated: the schema of the round before, the index
/// built by hand and marked invalid (what an interrupted build leaves), then a start; the swapped-in index is valid,
/// unique and over the shares that have a transfer.
#[tokio::test]
async fn an_index_build_left_invalid_by_a_crash_is_built_again_at_the_next_start() {
    let db = TestDb::empty().await;
    let before_the_swap = 20261212000001_i64;
    splitpay::store::MIGRATOR
        .run_to(before_the_swap, &db.pool)
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE UNIQUE INDEX split_allocations_transferred_unique ON split_allocations (stripe_transfer_id)
             WHERE stripe_transfer_id IS NOT NULL;
         UPDATE pg_index SET indisvalid = false
          WHERE indexrelid = 'split_allocations_transferred_unique'::regclass",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    splitpay::store::migrate(&db.pool)
        .await
        .expect("the next start applies the migrations");
    let (valid, predicate): (bool, Option<String>) = sqlx::query_as(
        "SELECT i.indisvalid AND i.indisunique, pg_get_expr(i.indpred, i.indrelid) FROM pg_index i
           JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'split_allocations_transfer_unique'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(valid, "built again, valid and unique");
    assert_eq!(predicate.as_deref(), Some("(stripe_transfer_id IS NOT NULL)"));
}

/// An index of the swap's name that is not the one migration 1 builds (here valid but not unique, made by hand) is
/// never swapped in for the constraint: the start fails naming it, and the constraint still holds.
#[tokio::test]
async fn an_index_of_the_swaps_name_that_is_not_unique_is_refused() {
    let db = TestDb::empty().await;
    splitpay::store::MIGRATOR
        .run_to(20261212000001, &db.pool)
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE INDEX split_allocations_transferred_unique ON split_allocations (stripe_transfer_id)
             WHERE stripe_transfer_id IS NOT NULL",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let err = splitpay::store::migrate(&db.pool).await.expect_err("refused");
    assert!(
        err.to_string().contains("split_allocations_transferred_unique"),
        "{err}"
    );
    let constraint: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_constraint WHERE conname = 'split_allocations_transfer_unique' AND contype = 'u'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(constraint, 1, "the unique constraint is still in force");
}
