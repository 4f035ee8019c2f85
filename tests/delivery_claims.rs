//! Outbound webhook delivery across crashes: a 2xx is never repeated (a crash just after the response, a database
//! error while recording it), a stale claim never records over a later one, and disabling an endpoint ends its
//! pending deliveries while the one in flight still records.

mod common;

use common::db::TestDb;
use common::hooks::{count, delivery, drop_jobs, emit, expire_claim, jobs_waiting, json, ops, setup, Hook};

use std::time::Duration;

use splitpay::jobs::deliver::{deliver_once, Delivered, DeliverySettings, Failpoint};
use splitpay::store::webhooks::{self as wh};

/// The guarantee: an event that got a 2xx is never sent to that endpoint again. Once the 2xx is recorded nothing
/// sends it again: not a rerun of the job, not the sweeper, not `ops redeliver`. If the worker crashes between the
/// response and the record, the expired claim is never re-sent automatically: the row ends `failed` with its outcome
/// unknown, and only an operator's `ops redeliver` (which warns of the duplicate) sends it again.
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
    // The job runs again (apalis at-least-once), on another worker, long after.
    sqlx::query("UPDATE webhook_deliveries SET next_attempt_at = now() - interval '1 day'")
        .execute(&db.pool)
        .await
        .unwrap();
    let other = DeliverySettings::default();
    assert_eq!(deliver_once(&db.pool, &other, id).await.unwrap(), Delivered::NotClaimed);
    let swept = splitpay::jobs::sweeper::sweep(&db.pool, 0).await.unwrap();
    assert_eq!((swept.deliveries, swept.deliveries_ended), (0, 0));
    let out = ops(&db, &["redeliver", &event_id, "--yes"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(deliver_once(&db.pool, &other, id).await.unwrap(), Delivered::NotClaimed);
    assert_eq!(hook.got().len(), 1, "the 2xx was not repeated");
    let row = delivery(&db, id).await;
    assert_eq!(row.status, "succeeded");

    // A crash after the response, before the record: the claim holds off every other worker while it lasts.
    let mut crashing = DeliverySettings::default();
    crashing.failpoint = Some(Failpoint::AfterResponse);
    let (event_id, deliveries) = emit(&db, 2).await;
    let id = &deliveries[0];
    assert!(deliver_once(&db.pool, &crashing, id).await.is_err());
    assert_eq!(hook.got().len(), 2);
    assert_eq!(
        deliver_once(&db.pool, &other, id).await.unwrap(),
        Delivered::NotClaimed,
        "the claim holds"
    );
    // Once it expired, neither the sweeper nor a rerun of the job sends it again: the sweeper ends it.
    expire_claim(&db, id).await;
    drop_jobs(&db).await; // the crashed worker's job is gone
    let swept = splitpay::jobs::sweeper::sweep(&db.pool, 0).await.unwrap();
    assert_eq!(
        (swept.deliveries, swept.deliveries_ended),
        (0, 1),
        "ended, not re-enqueued"
    );
    assert_eq!(jobs_waiting(&db, id).await, 0);
    assert_eq!(deliver_once(&db.pool, &other, id).await.unwrap(), Delivered::NotClaimed);
    assert_eq!(hook.got().len(), 2, "exactly one request for the crashed delivery");
    let row = delivery(&db, id).await;
    let error = row.last_error.clone().unwrap();
    assert_eq!((row.status.as_str(), row.attempts), ("failed", 1));
    assert!(error.starts_with(wh::OUTCOME_UNKNOWN), "{error}");
    assert!(
        error.contains(&format!("`splitpay ops redeliver {event_id}`")),
        "{error}"
    );
    let attempts = wh::attempts_of(&mut db.pool.acquire().await.unwrap(), id)
        .await
        .unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        (
            attempts[0].status_code,
            attempts[0].duration_ms,
            attempts[0].error.as_deref()
        ),
        (None, None, Some(error.as_str()))
    );
    let listed = json(&ops(&db, &["events", "--failed", "--json"], &[]));
    assert_eq!(listed["deliveries"][0]["last_error"], error.as_str(), "{listed}");

    // The operator sends it again, warned of the duplicate; the receiver gets it once more, same webhook-id.
    let out = ops(&db, &["redeliver", &event_id, "--yes"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(
        warning.contains("outcome unknown") && warning.contains("twice"),
        "{warning}"
    );
    assert_eq!(jobs_waiting(&db, id).await, 1);
    assert_eq!(deliver_once(&db.pool, &other, id).await.unwrap(), Delivered::Succeeded);
    let got = hook.got();
    assert_eq!(got.len(), 3);
    assert_eq!(
        (got[1].id.as_str(), got[2].id.as_str()),
        (event_id.as_str(), event_id.as_str())
    );
    let row = delivery(&db, id).await;
    assert_eq!((row.status.as_str(), row.trigger.as_str()), ("succeeded", "manual"));

    // The job's own rerun ends an expired claim too (no sweeper needed), and sends nothing.
    let (_, deliveries) = emit(&db, 3).await;
    let id = &deliveries[0];
    assert!(deliver_once(&db.pool, &crashing, id).await.is_err());
    expire_claim(&db, id).await;
    assert_eq!(deliver_once(&db.pool, &other, id).await.unwrap(), Delivered::NotClaimed);
    assert_eq!(hook.got().len(), 4);
    let row = delivery(&db, id).await;
    assert!(row.status == "failed" && row.last_error.unwrap().starts_with(wh::OUTCOME_UNKNOWN));
}

/// A stale task never records over a later claim of the same row, even in the same process (same worker name): each
/// claim has its own token.
#[tokio::test]
async fn a_stale_claim_never_records_over_a_later_claim() {
    let hook = Hook::start().await;
    let (db, _) = setup(&hook.url("/ok")).await;
    let (_, deliveries) = emit(&db, 1).await;
    let id = &deliveries[0];
    let worker = "deliver-same-process";
    let mut conn = db.pool.acquire().await.unwrap();
    let stale = wh::claim_delivery(&mut conn, id, worker, 60.0).await.unwrap().unwrap();
    // Its claim expires and ends; an operator queues it again; the same process claims it again.
    sqlx::query("UPDATE webhook_deliveries SET claimed_until = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await
        .unwrap();
    assert_eq!(
        wh::end_expired_claims(&mut conn, Some(id), 0, 1).await.unwrap(),
        [id.as_str()]
    );
    assert!(wh::requeue_delivery(&mut conn, id).await.unwrap());
    let live = wh::claim_delivery(&mut conn, id, worker, 60.0).await.unwrap().unwrap();
    assert_ne!(stale.claim_token, live.claim_token);
    // The stale task's failure and success both leave the live claim alone.
    let outcome = wh::AttemptOutcome {
        status_code: Some(500),
        duration_ms: 1,
        error: Some("HTTP 500".into()),
        response_body: None,
        retry_after_secs: None,
    };
    let (after, _) = wh::record_failure(&mut conn, &stale, &outcome).await.unwrap();
    assert_eq!(after, wh::AfterFailure::ClaimLost);
    wh::record_success(&mut conn, &stale).await.unwrap();
    let row = wh::get_delivery(&mut conn, id).await.unwrap();
    assert_eq!((row.status.as_str(), row.attempts), ("delivering", 1));
    // The live claim records; a second record of the same claim adds nothing.
    let (after, _) = wh::record_failure(&mut conn, &live, &outcome).await.unwrap();
    assert_eq!(
        after,
        wh::AfterFailure::Retry {
            after_secs: live.schedule_secs[0]
        }
    );
    assert!(wh::insert_attempt(&mut conn, &live, &outcome).await.unwrap());
    assert!(!wh::insert_attempt(&mut conn, &live, &outcome).await.unwrap());
}

/// Installs a trigger that makes the next `failures` inserts of an attempt row fail, as a database error would
/// (a real PostgreSQL error; the counter is a sequence, so a rolled-back record still counts).
async fn fail_next_records(db: &TestDb, failures: i64) {
    for sql in [
        "CREATE SEQUENCE IF NOT EXISTS record_faults".to_owned(),
        "CREATE TABLE IF NOT EXISTS record_fault_limit (n BIGINT NOT NULL)".to_owned(),
        "DELETE FROM record_fault_limit".to_owned(),
        format!("INSERT INTO record_fault_limit SELECT last_value + {failures} - CASE WHEN is_called THEN 0 ELSE 1 END FROM record_faults"),
        "CREATE OR REPLACE FUNCTION record_fault() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF nextval('record_faults') <= (SELECT n FROM record_fault_limit) THEN
             RAISE EXCEPTION 'injected fault: the database refused the record';
           END IF;
           RETURN NEW;
         END $$"
            .to_owned(),
        "CREATE OR REPLACE TRIGGER record_fault BEFORE INSERT ON webhook_delivery_attempts
         FOR EACH ROW EXECUTE FUNCTION record_fault()"
            .to_owned(),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&db.pool).await.unwrap();
    }
}

/// A database error while recording a 2xx is retried in-process; a record that never succeeds ends the delivery
/// with its outcome unknown once the claim expires, and it is not sent again.
#[tokio::test]
async fn a_database_error_while_recording_a_2xx_is_retried_and_never_turns_into_a_resend() {
    let hook = Hook::start().await;
    let (db, _) = setup(&hook.url("/ok")).await;
    let settings = DeliverySettings::default();
    fail_next_records(&db, 2).await;
    let (_, deliveries) = emit(&db, 1).await;
    let id = &deliveries[0];
    assert_eq!(
        deliver_once(&db.pool, &settings, id).await.unwrap(),
        Delivered::Succeeded
    );
    assert_eq!(hook.got().len(), 1);
    assert_eq!(
        count(&db, "SELECT last_value FROM record_faults").await,
        3,
        "two refused, the third recorded"
    );
    let attempts = wh::attempts_of(&mut db.pool.acquire().await.unwrap(), id)
        .await
        .unwrap();
    assert_eq!((attempts.len(), attempts[0].status_code), (1, Some(200)));

    // The database refuses every record until the (short) claim's deadline: the job gives up, nothing re-sends.
    let mut short = DeliverySettings::with_timeout(Duration::from_secs(2));
    short.claim_margin = Duration::from_secs(1);
    fail_next_records(&db, 1_000_000).await;
    let (_, deliveries) = emit(&db, 2).await;
    let id = &deliveries[0];
    assert!(deliver_once(&db.pool, &short, id).await.is_err());
    assert_eq!(hook.got().len(), 2);
    assert!(count(&db, "SELECT last_value FROM record_faults").await > 4, "retried");
    sqlx::query("DROP TRIGGER record_fault ON webhook_delivery_attempts")
        .execute(&db.pool)
        .await
        .unwrap();
    expire_claim(&db, id).await;
    drop_jobs(&db).await;
    let swept = splitpay::jobs::sweeper::sweep(&db.pool, 0).await.unwrap();
    assert_eq!((swept.deliveries, swept.deliveries_ended), (0, 1));
    assert_eq!(
        deliver_once(&db.pool, &settings, id).await.unwrap(),
        Delivered::NotClaimed
    );
    assert_eq!(hook.got().len(), 2, "the unrecorded 2xx was not repeated");
    let row = delivery(&db, id).await;
    assert!(row.status == "failed" && row.last_error.unwrap().starts_with(wh::OUTCOME_UNKNOWN));
}

/// Disabling an endpoint (by an operator here; automatically in the schedule test) ends its pending deliveries; one
/// in flight finishes its attempt and its record still works. `ops endpoints enable` brings the endpoint back
/// without resending anything by itself.
#[tokio::test]
async fn disabling_an_endpoint_ends_its_pending_deliveries_and_enable_brings_it_back() {
    let hook = Hook::start().await;
    let (db, endpoint) = setup(&hook.url("/fail")).await;
    let (_, pending) = emit(&db, 1).await;
    let (_, in_flight) = emit(&db, 2).await;
    drop_jobs(&db).await;
    let mut conn = db.pool.acquire().await.unwrap();
    let claimed = wh::claim_delivery(&mut conn, &in_flight[0], "deliver-test", 60.0)
        .await
        .unwrap()
        .unwrap();

    let out = ops(&db, &["endpoints", "disable", &endpoint.id, "--yes"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let row = wh::get_delivery(&mut conn, &pending[0]).await.unwrap();
    assert_eq!(
        (row.status.as_str(), row.last_error.as_deref()),
        ("failed", Some(wh::ENDPOINT_DISABLED))
    );
    assert_eq!(
        wh::get_delivery(&mut conn, &in_flight[0]).await.unwrap().status,
        "delivering"
    );
    // The attempt in flight finishes: its record works and ends the delivery (it would never be claimed again).
    let outcome = wh::AttemptOutcome {
        status_code: Some(500),
        duration_ms: 3,
        error: Some("HTTP 500".into()),
        response_body: None,
        retry_after_secs: None,
    };
    assert!(wh::insert_attempt(&mut conn, &claimed, &outcome).await.unwrap());
    let (after, _) = wh::record_failure(&mut conn, &claimed, &outcome).await.unwrap();
    assert_eq!(after, wh::AfterFailure::Failed);
    let row = wh::get_delivery(&mut conn, &in_flight[0]).await.unwrap();
    assert_eq!(
        (row.status.as_str(), row.last_error.as_deref()),
        ("failed", Some("HTTP 500; endpoint disabled"))
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'").await,
        0
    );
    assert_eq!(splitpay::jobs::sweeper::sweep(&db.pool, 0).await.unwrap().deliveries, 0);

    // Enable: a dry run changes nothing; then the endpoint is back, with an audit row, and nothing is resent.
    let dry = json(&ops(
        &db,
        &["endpoints", "enable", &endpoint.id, "--dry-run", "--json"],
        &[],
    ));
    assert_eq!(dry["dry_run"]["action"], "endpoints enable", "{dry}");
    assert!(wh::get_endpoint(&mut conn, &endpoint.id)
        .await
        .unwrap()
        .disabled_at
        .is_some());
    let out = ops(
        &db,
        &[
            "endpoints",
            "enable",
            &endpoint.id,
            "--yes",
            "--actor",
            "carol",
            "--reason",
            "receiver fixed",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("splitpay ops redeliver --since"));
    let enabled = wh::get_endpoint(&mut conn, &endpoint.id).await.unwrap();
    assert_eq!((enabled.disabled_at, enabled.failing_since), (None, None));
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM ops_audit_log WHERE command = 'endpoints enable' AND actor = 'carol'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM webhook_deliveries WHERE status = 'failed'").await,
        2
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM apalis.jobs WHERE job_type = 'splitpay.deliver'"
        )
        .await,
        0
    );
    let out = ops(&db, &["endpoints", "enable", &endpoint.id, "--yes"], &[]);
    assert_eq!(out.status.code(), Some(1), "enabling twice is refused");
    // New events are delivered to it again; `redeliver --since` sends the old failures.
    let (_, fresh) = emit(&db, 3).await;
    assert_eq!(jobs_waiting(&db, &fresh[0]).await, 1);
    let out = ops(&db, &["redeliver", "--since", "2000-01-01T00:00:00Z", "--yes"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        jobs_waiting(&db, &pending[0]).await + jobs_waiting(&db, &in_flight[0]).await,
        2
    );
}
