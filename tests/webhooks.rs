//! Outbound webhook endpoints through `splitpay ops endpoints` and `ops events`/`redeliver` (issue 9, point 1), and
//! every delivered payload checked against the contract. Delivery itself is in tests/delivery.rs.

mod common;

use common::db::TestDb;
use common::hooks::{count, drop_jobs, emit, jobs_waiting, json, ops, setup, Hook};
use splitpay::domain::plan::AmountMode;
use std::time::Duration;

use splitpay::events::signing::verify;
use splitpay::jobs::deliver::{deliver_once, Delivered, DeliverySettings};
use splitpay::store::webhooks as wh;

#[tokio::test]
async fn ops_endpoints_add_list_rotate_and_disable_with_audit() {
    let db = TestDb::new().await;
    common::seed_set(&db.pool, AmountMode::Fixed, &[1_000]).await;
    let org = common::DISTRIBUTOR;

    // Refusals write nothing: a plain-http public host, an unknown event type, an unknown organisation.
    let out = ops(
        &db,
        &[
            "endpoints",
            "add",
            "--organisation",
            org,
            "--url",
            "http://example.org/h",
            "--yes",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("https://"));
    let out = ops(
        &db,
        &[
            "endpoints",
            "add",
            "--organisation",
            org,
            "--url",
            "https://example.org/h",
            "--events",
            "donation.created,donation.exploded",
            "--yes",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("'donation.exploded'"));
    let out = ops(
        &db,
        &[
            "endpoints",
            "add",
            "--organisation",
            "nobody",
            "--url",
            "https://example.org/h",
            "--yes",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    // A dry run prints the plan and writes nothing.
    let plan = json(&ops(
        &db,
        &[
            "endpoints",
            "add",
            "--organisation",
            org,
            "--url",
            "https://example.org/h",
            "--dry-run",
            "--json",
        ],
        &[],
    ));
    assert_eq!(plan["dry_run"]["url"], "https://example.org/h", "{plan}");
    assert_eq!(count(&db, "SELECT count(*) FROM webhook_endpoints").await, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM ops_audit_log").await, 0);
    // http on a public host only with SPLITPAY_ALLOW_HTTP_WEBHOOKS=1.
    let allowed = json(&ops(
        &db,
        &[
            "endpoints",
            "add",
            "--organisation",
            org,
            "--url",
            "http://example.org/h",
            "--yes",
            "--json",
        ],
        &[("SPLITPAY_ALLOW_HTTP_WEBHOOKS", "1")],
    ));
    assert!(allowed["id"].as_str().unwrap().starts_with("whep_"));

    let added = json(&ops(
        &db,
        &[
            "endpoints",
            "add",
            "--organisation",
            org,
            "--url",
            "https://example.org/hook",
            "--events",
            "donation.created",
            "--yes",
            "--json",
            "--actor",
            "alice",
        ],
        &[],
    ));
    let id = added["id"].as_str().unwrap().to_owned();
    let secret = added["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_") && secret.len() == 6 + 44, "{secret}");
    assert_eq!(added["events"], serde_json::json!(["donation.created"]));
    let (actor, command, details): (String, String, serde_json::Value) =
        sqlx::query_as("SELECT actor, command, details FROM ops_audit_log WHERE target_id = $1")
            .bind(&id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((actor.as_str(), command.as_str()), ("alice", "endpoints add"));
    assert!(
        !details.to_string().contains("whsec_"),
        "the audit never holds a secret"
    );

    let listed = ops(&db, &["endpoints", "list", "--json"], &[]);
    let listed_doc = json(&listed);
    assert_eq!(listed_doc["endpoints"].as_array().unwrap().len(), 2);
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains("whsec_"),
        "list never shows secrets"
    );

    let rotated = json(&ops(&db, &["endpoints", "rotate-secret", &id, "--yes", "--json"], &[]));
    let new_secret = rotated["secret"].as_str().unwrap();
    assert_ne!(new_secret, secret);
    let (current, previous, overlap_secs): (String, String, f64) = sqlx::query_as(
        "SELECT secret, previous_secret, extract(epoch FROM previous_secret_expires_at - now())::float8
           FROM webhook_endpoints WHERE id = $1",
    )
    .bind(&id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((current.as_str(), previous.as_str()), (new_secret, secret.as_str()));
    assert!(
        overlap_secs > 23.0 * 3600.0 && overlap_secs <= 24.0 * 3600.0,
        "{overlap_secs}"
    );
    // A second rotation while the previous secret still signs is refused (it would drop that secret early).
    let out = ops(&db, &["endpoints", "rotate-secret", &id, "--yes", "--json"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let refusal = String::from_utf8_lossy(&out.stderr);
    assert!(
        refusal.contains("still signs until") && refusal.contains("Rotate again after"),
        "{refusal}"
    );
    let (unchanged,): (String,) = sqlx::query_as("SELECT previous_secret FROM webhook_endpoints WHERE id = $1")
        .bind(&id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(unchanged, secret, "the first secret still signs");
    // Once the overlap is over (the clock moved past it), rotating again is allowed.
    sqlx::query("UPDATE webhook_endpoints SET previous_secret_expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(&id)
        .execute(&db.pool)
        .await
        .unwrap();
    let again = json(&ops(&db, &["endpoints", "rotate-secret", &id, "--yes", "--json"], &[]));
    assert_ne!(again["secret"], new_secret);

    let out = ops(
        &db,
        &["endpoints", "disable", &id, "--yes", "--reason", "receiver retired"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let out = ops(&db, &["endpoints", "disable", &id, "--yes"], &[]);
    assert_eq!(out.status.code(), Some(1), "disabling twice is refused");
    assert_eq!(count(&db, "SELECT count(*) FROM ops_audit_log").await, 5);
    let out = ops(&db, &["endpoints", "disable", "whep_nope", "--yes"], &[]);
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test]
async fn ops_events_and_redeliver() {
    let hook = Hook::start().await;
    let (db, endpoint) = setup(&hook.url("/fail")).await;
    let settings = DeliverySettings::default();
    let (event_id, deliveries) = emit(&db, 1).await;
    let id = &deliveries[0];
    sqlx::query("UPDATE webhook_deliveries SET schedule_secs = '{}' WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(deliver_once(&db.pool, &settings, id).await.unwrap(), Delivered::Failed);
    drop_jobs(&db).await;
    let listed = json(&ops(
        &db,
        &["events", "--failed", "--organisation", common::DISTRIBUTOR, "--json"],
        &[],
    ));
    assert_eq!(listed["deliveries"][0]["id"], id.as_str(), "{listed}");
    assert_eq!(listed["deliveries"][0]["status"], "failed");
    // The receiver is fixed; the operator queues the event again.
    sqlx::query("UPDATE webhook_endpoints SET url = $2 WHERE id = $1")
        .bind(&endpoint.id)
        .bind(hook.url("/ok"))
        .execute(&db.pool)
        .await
        .unwrap();
    let dry = json(&ops(&db, &["redeliver", &event_id, "--dry-run", "--json"], &[]));
    assert_eq!(dry["dry_run"]["requeue"][0], id.as_str(), "{dry}");
    assert_eq!(
        wh::get_delivery(&mut db.pool.acquire().await.unwrap(), id)
            .await
            .unwrap()
            .status,
        "failed"
    );
    let done = json(&ops(
        &db,
        &["redeliver", &event_id, "--yes", "--json", "--actor", "bob"],
        &[],
    ));
    assert_eq!(done["redelivered"]["requeued"][0], id.as_str(), "{done}");
    assert_eq!(done["redelivered"]["changed_meanwhile"], serde_json::json!([]));
    assert_eq!(jobs_waiting(&db, id).await, 1);
    assert_eq!(
        deliver_once(&db.pool, &settings, id).await.unwrap(),
        Delivered::Succeeded
    );
    let row = wh::get_delivery(&mut db.pool.acquire().await.unwrap(), id)
        .await
        .unwrap();
    assert_eq!((row.status.as_str(), row.trigger.as_str()), ("succeeded", "manual"));
    assert_eq!(
        count(&db, "SELECT count(*) FROM ops_audit_log WHERE actor = 'bob'").await,
        1
    );
    let out = ops(&db, &["redeliver", "--since", "yesterday", "--yes"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

/// The whole path: a card payment through the pipeline, with endpoints for every organisation; the in-process
/// worker delivers each outbox event, and every body the receiver got validates against the contract.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_delivered_payload_validates_against_the_contract() {
    use splitpay::domain::plan::PaymentMethodType;
    use splitpay::domain::state::PaymentStatus;
    let hook = Hook::start().await;
    let flow = common::flow::Flow::start(AmountMode::Fixed, &[2_000, 3_000], &[1]).await;
    let mut secrets = Vec::new();
    for org in [common::DISTRIBUTOR, "cm3orgrcp0", "cm3orgrcp1"] {
        let secret = splitpay::events::signing::generate_secret();
        wh::insert_endpoint(
            &mut flow.db.pool.acquire().await.unwrap(),
            org,
            &hook.url("/ok"),
            None,
            &secret,
        )
        .await
        .unwrap();
        secrets.push(secret);
    }
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    flow.wait_until(&id, "distribution", |p| {
        p.payment.status == PaymentStatus::Succeeded
            && p.allocations.iter().all(|a| {
                matches!(
                    a.status,
                    splitpay::domain::state::AllocationStatus::Transferred
                        | splitpay::domain::state::AllocationStatus::Parked
                )
            })
    })
    .await;
    let mut settled = false;
    for _ in 0..300 {
        let (open,): (i64,) = sqlx::query_as("SELECT count(*) FROM webhook_deliveries WHERE status <> 'succeeded'")
            .fetch_one(&flow.db.pool)
            .await
            .unwrap();
        let (events,): (i64,) = sqlx::query_as("SELECT count(*) FROM outbox_events")
            .fetch_one(&flow.db.pool)
            .await
            .unwrap();
        let (deliveries,): (i64,) = sqlx::query_as("SELECT count(*) FROM webhook_deliveries")
            .fetch_one(&flow.db.pool)
            .await
            .unwrap();
        if open == 0 && deliveries == events {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        settled,
        "every outbox event was delivered to its organisation's endpoint"
    );
    let got = hook.got();
    let (events,): (i64,) = sqlx::query_as("SELECT count(*) FROM outbox_events")
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
    assert_eq!(got.len() as i64, events, "each event once");
    let mut types = std::collections::BTreeSet::new();
    for r in &got {
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        common::contract::validate_against_contract(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert!(secrets
            .iter()
            .any(|s| verify(s, &r.id, r.timestamp, &r.body, &r.signature)));
        types.insert(body["type"].as_str().unwrap().to_owned());
    }
    for expected in [
        "recommendation_set.payment_succeeded",
        "recommendation_set.distribution_succeeded",
        "recommendation_set.distribution_failed",
        "donation.created",
        "donation.succeeded",
    ] {
        assert!(types.contains(expected), "{expected} not delivered: {types:?}");
    }
    flow.stop().await;
}
