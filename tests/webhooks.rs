//! Outbound webhooks (issue 9, points 1–3): endpoints through `splitpay ops endpoints`, and delivery from the outbox
//! to a real local HTTP receiver, signed per Standard Webhooks.

mod common;

use std::process::{Command, Output};

use common::contract::validate_against_contract;
use common::db::TestDb;
use splitpay::domain::plan::AmountMode;

fn ops(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_splitpay"));
    cmd.arg("ops")
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env_remove("STRIPE_SECRET_KEY")
        .env_remove("SPLITPAY_ALLOW_HTTP_WEBHOOKS")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

fn json(out: &Output) -> serde_json::Value {
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON document on stdout")
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    n
}

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

    let out = ops(
        &db,
        &["endpoints", "disable", &id, "--yes", "--reason", "receiver retired"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let out = ops(&db, &["endpoints", "disable", &id, "--yes"], &[]);
    assert_eq!(out.status.code(), Some(1), "disabling twice is refused");
    assert_eq!(count(&db, "SELECT count(*) FROM ops_audit_log").await, 4);
    let out = ops(&db, &["endpoints", "disable", "whep_nope", "--yes"], &[]);
    assert_eq!(out.status.code(), Some(1));
}

// ---------------------------------------------------------------------------------------------------------------
// Delivery against a real local receiver.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use splitpay::events::signing::verify;
use splitpay::events::{seed_timestamp, DonationData, EventType, OutboundEvent};
use splitpay::jobs::deliver::{deliver_once, Delivered, DeliverySettings, Failpoint};
use splitpay::store::webhooks::{self as wh, DEFAULT_SCHEDULE_SECS};

#[derive(Debug, Clone)]
struct Received {
    path: String,
    id: String,
    timestamp: i64,
    signature: String,
    body: Vec<u8>,
}

/// An HTTP receiver on 127.0.0.1:0: `/ok` answers 200, `/fail` 500 with a 2 KiB body, `/slow` 200 after 30 s,
/// `/redirect` 307 to `/ok`. Every request is recorded.
struct Hook {
    base: String,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Hook {
    async fn start() -> Self {
        use axum::{
            body::Bytes, extract::State, http::HeaderMap, http::StatusCode, http::Uri, response::IntoResponse, Router,
        };
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let app = Router::new()
            .fallback(
                |State(log): State<Arc<Mutex<Vec<Received>>>>, uri: Uri, headers: HeaderMap, body: Bytes| async move {
                    let h = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    log.lock().unwrap().push(Received {
                        path: uri.path().to_owned(),
                        id: h("webhook-id"),
                        timestamp: h("webhook-timestamp").parse().unwrap_or(-1),
                        signature: h("webhook-signature"),
                        body: body.to_vec(),
                    });
                    match uri.path() {
                        "/fail" => (StatusCode::INTERNAL_SERVER_ERROR, "x".repeat(2048)).into_response(),
                        "/slow" => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            StatusCode::OK.into_response()
                        }
                        "/redirect" => (StatusCode::TEMPORARY_REDIRECT, [("location", "/ok")]).into_response(),
                        _ => StatusCode::OK.into_response(),
                    }
                },
            )
            .with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Hook { base, received }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn got(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

/// A migrated database with the job schema, the distributor organisation, and an endpoint at `url`.
async fn setup(url: &str) -> (TestDb, wh::EndpointRow) {
    let db = TestDb::new().await;
    splitpay::jobs::queue::setup(&db.pool).await.unwrap();
    common::seed_set(&db.pool, AmountMode::Fixed, &[1_000]).await;
    let secret = splitpay::events::signing::generate_secret();
    let endpoint = wh::insert_endpoint(
        &mut db.pool.acquire().await.unwrap(),
        common::DISTRIBUTOR,
        url,
        None,
        &secret,
    )
    .await
    .unwrap();
    (db, endpoint)
}

/// Writes one `donation.created` outbox event for the distributor (as any state change does) and returns the
/// outbox id and the ids of the deliveries created with it.
async fn emit(db: &TestDb, n: u32) -> (String, Vec<String>) {
    let at = chrono::Utc::now();
    let event = OutboundEvent::donation(
        EventType::DonationCreated,
        common::DISTRIBUTOR,
        at,
        DonationData {
            id: format!("don_test{n}"),
            donor_id: "cm3donor1".into(),
            amount_cents: 2500,
            refunded_amount_cents: 0,
            currency: "AUD".into(),
            donation_date: seed_timestamp(at),
            source: "SPLIT_GATEWAY".into(),
            status: "PENDING".into(),
            external_id: Some("pi_1".into()),
            payment_method: Some("card".into()),
            tracking_code: None,
            deleted_at: None,
            failure_code: None,
            failure_message: None,
        },
        None,
    );
    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(
        splitpay::store::records::insert_outbox_events(&mut tx, &[event])
            .await
            .unwrap(),
        1
    );
    tx.commit().await.unwrap();
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT o.id, d.id FROM outbox_events o JOIN webhook_deliveries d ON d.outbox_event_id = o.id
          WHERE o.dedup_key = $1 ORDER BY d.id",
    )
    .bind(format!("donation.created:don_test{n}"))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(!rows.is_empty(), "a delivery is created with the outbox event");
    (rows[0].0.clone(), rows.into_iter().map(|(_, d)| d).collect())
}

/// Drops every waiting delivery job (as if lost), so a test counts only the jobs that come after.
async fn drop_jobs(db: &TestDb) {
    sqlx::query("DELETE FROM apalis.jobs WHERE job_type = 'splitpay.deliver'")
        .execute(&db.pool)
        .await
        .unwrap();
}

async fn jobs_waiting(db: &TestDb, delivery: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM apalis.jobs WHERE job_type = 'splitpay.deliver' AND status IN ('Pending', 'Queued')
            AND convert_from(job, 'UTF8')::jsonb->>'id' = $1",
    )
    .bind(delivery)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    n
}

#[tokio::test]
async fn deliveries_are_signed_and_a_rolled_secret_still_verifies_during_the_overlap() {
    let hook = Hook::start().await;
    let (db, endpoint) = setup(&hook.url("/ok")).await;
    let settings = DeliverySettings::default();

    let (event_id, deliveries) = emit(&db, 1).await;
    assert_eq!(
        jobs_waiting(&db, &deliveries[0]).await,
        1,
        "the job is enqueued with the outbox event"
    );
    assert_eq!(
        deliver_once(&db.pool, &settings, &deliveries[0]).await.unwrap(),
        Delivered::Succeeded
    );
    let got = hook.got();
    assert_eq!(got.len(), 1);
    let first = &got[0];
    assert_eq!(first.id, event_id, "webhook-id is the outbox id");
    assert!(verify(
        &endpoint.secret,
        &first.id,
        first.timestamp,
        &first.body,
        &first.signature
    ));
    assert!(!verify(
        &endpoint.secret,
        &first.id,
        first.timestamp + 1,
        &first.body,
        &first.signature
    ));
    let body: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
    let (stored,): (serde_json::Value,) = sqlx::query_as("SELECT payload FROM outbox_events WHERE id = $1")
        .bind(&event_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(body, stored, "the body is the stored envelope");
    validate_against_contract(&body).unwrap();

    // Rotate: both the old and the new secret sign for 24 h.
    let new_secret = splitpay::events::signing::generate_secret();
    wh::rotate_secret(&mut db.pool.acquire().await.unwrap(), &endpoint.id, &new_secret, 86_400)
        .await
        .unwrap();
    let (_, deliveries) = emit(&db, 2).await;
    assert_eq!(
        deliver_once(&db.pool, &settings, &deliveries[0]).await.unwrap(),
        Delivered::Succeeded
    );
    let second = hook.got()[1].clone();
    assert_eq!(second.signature.split(' ').count(), 2, "{}", second.signature);
    assert!(verify(
        &endpoint.secret,
        &second.id,
        second.timestamp,
        &second.body,
        &second.signature
    ));
    assert!(verify(
        &new_secret,
        &second.id,
        second.timestamp,
        &second.body,
        &second.signature
    ));

    // After the overlap (the clock moved past the expiry) only the new secret signs.
    sqlx::query("UPDATE webhook_endpoints SET previous_secret_expires_at = now() - interval '1 second'")
        .execute(&db.pool)
        .await
        .unwrap();
    let (_, deliveries) = emit(&db, 3).await;
    assert_eq!(
        deliver_once(&db.pool, &settings, &deliveries[0]).await.unwrap(),
        Delivered::Succeeded
    );
    let third = hook.got()[2].clone();
    assert_eq!(third.signature.split(' ').count(), 1);
    assert!(verify(
        &new_secret,
        &third.id,
        third.timestamp,
        &third.body,
        &third.signature
    ));
    assert!(!verify(
        &endpoint.secret,
        &third.id,
        third.timestamp,
        &third.body,
        &third.signature
    ));
}

/// The stored schedule, attempt by attempt, with the clock advanced by moving `next_attempt_at` to now.
#[tokio::test]
async fn failures_follow_the_stored_schedule_then_fail_and_a_failing_endpoint_is_disabled() {
    let hook = Hook::start().await;
    let (db, endpoint) = setup(&hook.url("/fail")).await;
    let settings = DeliverySettings::default();
    let (_, deliveries) = emit(&db, 1).await;
    let id = &deliveries[0];
    drop_jobs(&db).await;
    assert_eq!(
        DEFAULT_SCHEDULE_SECS.iter().sum::<i32>(),
        27 * 3600 + 35 * 60,
        "6 attempts over ~28 h"
    );
    for attempt in 1..=6usize {
        let result = deliver_once(&db.pool, &settings, id).await.unwrap();
        if attempt < 6 {
            let delay = DEFAULT_SCHEDULE_SECS[attempt - 1];
            assert_eq!(result, Delivered::Retry { after_secs: delay }, "attempt {attempt}");
            let (gap,): (f64,) = sqlx::query_as(
                "SELECT extract(epoch FROM d.next_attempt_at - a.at)::float8 FROM webhook_deliveries d
                   JOIN webhook_delivery_attempts a ON a.delivery_id = d.id AND a.attempt_number = d.attempts
                  WHERE d.id = $1",
            )
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
            assert_eq!(
                gap,
                f64::from(delay),
                "attempt {attempt}: next attempt from the stored schedule"
            );
            assert_eq!(jobs_waiting(&db, id).await, 1, "a delayed job for the next attempt");
            // Not due yet: nothing is sent.
            assert_eq!(
                deliver_once(&db.pool, &settings, id).await.unwrap(),
                Delivered::NotClaimed
            );
            sqlx::query("UPDATE webhook_deliveries SET next_attempt_at = now() WHERE id = $1")
                .bind(id)
                .execute(&db.pool)
                .await
                .unwrap();
            drop_jobs(&db).await;
        } else {
            assert_eq!(result, Delivered::Failed);
        }
    }
    assert_eq!(hook.got().len(), 6);
    assert_eq!(
        deliver_once(&db.pool, &settings, id).await.unwrap(),
        Delivered::NotClaimed
    );
    let row = wh::get_delivery(&mut db.pool.acquire().await.unwrap(), id)
        .await
        .unwrap();
    assert_eq!((row.status.as_str(), row.attempts), ("failed", 6));
    let attempts = wh::attempts_of(&mut db.pool.acquire().await.unwrap(), id)
        .await
        .unwrap();
    assert_eq!(attempts.len(), 6);
    for a in &attempts {
        assert_eq!(a.status_code, Some(500));
        assert_eq!(a.error.as_deref(), Some("HTTP 500"));
        assert_eq!(
            a.response_body.as_ref().map(String::len),
            Some(1024),
            "bodies capped at 1 KiB"
        );
    }

    // An endpoint failing for 5 days is disabled at its next failure.
    sqlx::query("UPDATE webhook_endpoints SET failing_since = now() - interval '5 days 1 minute' WHERE id = $1")
        .bind(&endpoint.id)
        .execute(&db.pool)
        .await
        .unwrap();
    let (_, deliveries) = emit(&db, 2).await;
    deliver_once(&db.pool, &settings, &deliveries[0]).await.unwrap();
    let endpoint = wh::get_endpoint(&mut db.pool.acquire().await.unwrap(), &endpoint.id)
        .await
        .unwrap();
    assert!(endpoint.disabled_at.is_some());
    assert!(endpoint.disabled_reason.unwrap().contains("5 days"));
    // A disabled endpoint gets no new deliveries.
    let mut tx = db.pool.begin().await.unwrap();
    let none = wh::create_deliveries(&mut tx, "oevt_x", common::DISTRIBUTOR, "donation.created")
        .await
        .unwrap();
    assert!(none.is_empty());
}

#[tokio::test]
async fn a_slow_answer_a_redirect_and_a_refused_connection_are_failures() {
    let hook = Hook::start().await;
    let (db, endpoint) = setup(&hook.url("/slow")).await;
    let settings = DeliverySettings::with_timeout(Duration::from_millis(300));
    let (_, deliveries) = emit(&db, 1).await;
    let result = deliver_once(&db.pool, &settings, &deliveries[0]).await.unwrap();
    assert_eq!(
        result,
        Delivered::Retry {
            after_secs: DEFAULT_SCHEDULE_SECS[0]
        }
    );
    let attempts = wh::attempts_of(&mut db.pool.acquire().await.unwrap(), &deliveries[0])
        .await
        .unwrap();
    assert_eq!(attempts[0].status_code, None);
    assert!(
        attempts[0].error.as_deref().unwrap().contains("timed out"),
        "{:?}",
        attempts[0]
    );

    // Redirects are not followed.
    sqlx::query("UPDATE webhook_endpoints SET url = $2 WHERE id = $1")
        .bind(&endpoint.id)
        .bind(hook.url("/redirect"))
        .execute(&db.pool)
        .await
        .unwrap();
    let (_, deliveries) = emit(&db, 2).await;
    assert!(matches!(
        deliver_once(&db.pool, &settings, &deliveries[0]).await.unwrap(),
        Delivered::Retry { .. }
    ));
    let attempts = wh::attempts_of(&mut db.pool.acquire().await.unwrap(), &deliveries[0])
        .await
        .unwrap();
    assert_eq!(attempts[0].status_code, Some(307));
    assert!(
        hook.got().iter().all(|r| r.path != "/ok"),
        "the redirect was not followed"
    );

    // A refused connection.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    sqlx::query("UPDATE webhook_endpoints SET url = $2 WHERE id = $1")
        .bind(&endpoint.id)
        .bind(format!("http://{closed}/hook"))
        .execute(&db.pool)
        .await
        .unwrap();
    let (_, deliveries) = emit(&db, 3).await;
    assert!(matches!(
        deliver_once(&db.pool, &settings, &deliveries[0]).await.unwrap(),
        Delivered::Retry { .. }
    ));
    let attempts = wh::attempts_of(&mut db.pool.acquire().await.unwrap(), &deliveries[0])
        .await
        .unwrap();
    assert_eq!(
        (attempts[0].status_code, attempts[0].error.as_deref()),
        (None, Some("could not connect"))
    );
}

/// The guarantee, exactly: once a 2xx is recorded (the step right after the response), nothing sends that delivery
/// again: not a rerun of the job, not the sweeper, not an expired claim, not `ops redeliver`. The window left: a
/// crash between the response and that record; the claim then expires and the event is sent again with the same
/// `webhook-id` (receivers deduplicate on it). Both are shown here.
#[tokio::test]
async fn a_2xx_is_not_repeated_after_a_worker_crash_just_after_the_response() {
    let hook = Hook::start().await;
    let (db, _) = setup(&hook.url("/ok")).await;

    let mut crashing = DeliverySettings::default();
    crashing.failpoint = Some(Failpoint::AfterRecord);
    let (event_id, deliveries) = emit(&db, 1).await;
    let id = &deliveries[0];
    assert!(
        deliver_once(&db.pool, &crashing, id).await.is_err(),
        "the worker 'crashed'"
    );
    assert_eq!(hook.got().len(), 1);
    // The job runs again (apalis at-least-once), on another worker, after any claim would have expired.
    sqlx::query("UPDATE webhook_deliveries SET claimed_until = NULL, next_attempt_at = now() - interval '1 day'")
        .execute(&db.pool)
        .await
        .unwrap();
    let other = DeliverySettings::default();
    assert_eq!(deliver_once(&db.pool, &other, id).await.unwrap(), Delivered::NotClaimed);
    let swept = splitpay::jobs::sweeper::sweep(&db.pool, 0).await.unwrap();
    assert_eq!(swept.deliveries, 0);
    let out = ops(&db, &["redeliver", &event_id, "--yes"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(deliver_once(&db.pool, &other, id).await.unwrap(), Delivered::NotClaimed);
    assert_eq!(hook.got().len(), 1, "the 2xx was not repeated");
    assert_eq!(
        wh::get_delivery(&mut db.pool.acquire().await.unwrap(), id)
            .await
            .unwrap()
            .status,
        "succeeded"
    );

    // The window: a crash after the response but before the record. The claim holds off every other worker
    // while it lasts; once it expires, the event is sent again, with the same webhook-id.
    let mut crashing = DeliverySettings::default();
    crashing.failpoint = Some(Failpoint::AfterResponse);
    let (_, deliveries) = emit(&db, 2).await;
    let id = &deliveries[0];
    assert!(deliver_once(&db.pool, &crashing, id).await.is_err());
    assert_eq!(hook.got().len(), 2);
    assert_eq!(
        deliver_once(&db.pool, &other, id).await.unwrap(),
        Delivered::NotClaimed,
        "the claim holds"
    );
    sqlx::query("UPDATE webhook_deliveries SET claimed_until = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    drop_jobs(&db).await; // the crashed worker's job is gone
    assert_eq!(
        splitpay::jobs::sweeper::sweep(&db.pool, 0).await.unwrap().deliveries,
        1,
        "the sweeper sees it"
    );
    assert_eq!(deliver_once(&db.pool, &other, id).await.unwrap(), Delivered::Succeeded);
    let got = hook.got();
    assert_eq!(got.len(), 3);
    assert_eq!(got[1].id, got[2].id, "a resend carries the same webhook-id");
    let row = wh::get_delivery(&mut db.pool.acquire().await.unwrap(), id)
        .await
        .unwrap();
    assert_eq!((row.status.as_str(), row.attempts), ("succeeded", 2));
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
    assert_eq!(done["redelivered"]["requeue"][0], id.as_str());
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
        validate_against_contract(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
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
