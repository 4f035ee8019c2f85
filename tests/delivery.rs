//! Outbound webhook delivery (issue 9, points 2–3): from the outbox to a real local HTTP receiver, signed per Standard
//! Webhooks, on the stored retry schedule with Retry-After and 410, failing periods and auto-disable, and
//! index-backed listing. At most once per 2xx across crashes, claims and disabling are in `delivery_claims.rs`.

mod common;

use common::db::TestDb;
use common::hooks::{delivery, drop_jobs, emit, jobs_waiting, ops, setup, Hook};

use std::time::Duration;

use splitpay::events::signing::verify;
use splitpay::jobs::deliver::{deliver_once, Delivered, DeliverySettings};
use splitpay::store::webhooks::{self as wh, DEFAULT_SCHEDULE_SECS};

/// Points the endpoint `id` at `url`.
async fn point_endpoint(db: &TestDb, id: &str, url: &str) {
    sqlx::query("UPDATE webhook_endpoints SET url = $2 WHERE id = $1")
        .bind(id)
        .bind(url)
        .execute(&db.pool)
        .await
        .unwrap();
}

/// Emits event `n` and delivers it once: it must fail, to be retried. Returns that first attempt.
async fn failed_delivery(db: &TestDb, settings: &DeliverySettings, n: u32) -> wh::AttemptRow {
    let (_, deliveries) = emit(db, n).await;
    let result = deliver_once(&db.pool, settings, &deliveries[0]).await.unwrap();
    assert!(matches!(result, Delivered::Retry { .. }), "{result:?}");
    let attempts = wh::attempts_of(&mut db.pool.acquire().await.unwrap(), &deliveries[0])
        .await
        .unwrap();
    attempts.into_iter().next().unwrap()
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
    common::contract::validate_against_contract(&body).unwrap();

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
    // The stored schedule is the default with jitter, over the same total.
    let schedule = delivery(&db, id).await.schedule_secs;
    assert_eq!(schedule.len(), 5);
    assert_eq!(schedule.iter().sum::<i32>(), DEFAULT_SCHEDULE_SECS.iter().sum::<i32>());
    for (stored, default) in schedule.iter().zip(DEFAULT_SCHEDULE_SECS) {
        assert!(
            (f64::from(*stored) / f64::from(default) - 1.0).abs() <= 0.2,
            "{schedule:?}"
        );
    }
    let others: Vec<Vec<i32>> = (0..8).map(|_| wh::jittered_schedule()).collect();
    assert!(others.iter().any(|o| *o != schedule), "jittered: {others:?}");
    for attempt in 1..=6usize {
        let result = deliver_once(&db.pool, &settings, id).await.unwrap();
        if attempt < 6 {
            let delay = schedule[attempt - 1];
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
    let row = delivery(&db, id).await;
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
    let (_, waiting) = emit(&db, 2).await;
    let (_, deliveries) = emit(&db, 3).await;
    drop_jobs(&db).await;
    assert_eq!(
        deliver_once(&db.pool, &settings, &deliveries[0]).await.unwrap(),
        Delivered::Failed,
        "the failure that disables the endpoint ends its delivery"
    );
    assert_eq!(jobs_waiting(&db, &deliveries[0]).await, 0);
    let endpoint = wh::get_endpoint(&mut db.pool.acquire().await.unwrap(), &endpoint.id)
        .await
        .unwrap();
    assert!(endpoint.disabled_at.is_some());
    assert!(endpoint.disabled_reason.unwrap().contains("5 days"));
    let row = delivery(&db, &waiting[0]).await;
    assert_eq!(
        (row.status.as_str(), row.last_error.as_deref()),
        ("failed", Some(wh::ENDPOINT_DISABLED)),
        "its pending deliveries are not stranded"
    );
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
    let attempt = failed_delivery(&db, &settings, 1).await;
    assert_eq!(attempt.status_code, None);
    assert!(attempt.error.as_deref().unwrap().contains("timed out"), "{attempt:?}");

    // Redirects are not followed.
    point_endpoint(&db, &endpoint.id, &hook.url("/redirect")).await;
    let attempt = failed_delivery(&db, &settings, 2).await;
    assert_eq!(attempt.status_code, Some(307));
    assert!(
        hook.got().iter().all(|r| r.path != "/ok"),
        "the redirect was not followed"
    );

    // A refused connection.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    point_endpoint(&db, &endpoint.id, &format!("http://{closed}/hook")).await;
    let attempt = failed_delivery(&db, &settings, 3).await;
    assert_eq!(
        (attempt.status_code, attempt.error.as_deref()),
        (None, Some("could not connect"))
    );
}

/// A failed attempt's retry is claimed by its own delayed job when that job runs (apalis schedules it in whole
/// seconds, so up to a second before `next_attempt_at`), not left for the sweeper. The clock is moved to the job's
/// `run_at` by moving the row's time back by the same amount.
#[tokio::test]
async fn a_retry_is_claimed_by_its_own_job_at_its_run_time() {
    let hook = Hook::start().await;
    let (db, _) = setup(&hook.url("/fail")).await;
    let settings = DeliverySettings::default();
    let (_, deliveries) = emit(&db, 1).await;
    let id = &deliveries[0];
    drop_jobs(&db).await;
    assert!(matches!(
        deliver_once(&db.pool, &settings, id).await.unwrap(),
        Delivered::Retry { .. }
    ));
    assert_eq!(jobs_waiting(&db, id).await, 1);
    let (early,): (f64,) = sqlx::query_as(
        "WITH job AS (SELECT run_at FROM apalis.jobs WHERE job_type = 'splitpay.deliver' AND status = 'Pending'
                        AND convert_from(job, 'UTF8')::jsonb->>'id' = $1)
         UPDATE webhook_deliveries d SET next_attempt_at = now() + (d.next_attempt_at - job.run_at) FROM job
          WHERE d.id = $1 RETURNING extract(epoch FROM d.next_attempt_at - now())::float8",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(early < 1.0, "the job runs at most a second early: {early}");
    assert!(
        matches!(
            deliver_once(&db.pool, &settings, id).await.unwrap(),
            Delivered::Retry { .. }
        ),
        "the job's own run sends the retry"
    );
    assert_eq!(hook.got().len(), 2);
}

/// The 5-day disable counts a continuous failing period: a failure after a quiet longer than the schedule's span
/// (~28 h) starts a new one, so an old failure, a quiet week and one failure do not disable the endpoint at once.
/// The clock is simulated by moving the endpoint's timestamps back.
#[tokio::test]
async fn a_failure_after_a_quiet_spell_starts_a_new_failing_period() {
    let hook = Hook::start().await;
    let (db, endpoint) = setup(&hook.url("/fail")).await;
    let settings = DeliverySettings::default();
    let set_clock = |failing: &'static str, last: &'static str| {
        let db = &db;
        let id = endpoint.id.clone();
        async move {
            sqlx::query(
                "UPDATE webhook_endpoints SET failing_since = now() - $2::interval, last_failure_at = now() - $3::interval
                  WHERE id = $1",
            )
            .bind(id)
            .bind(failing)
            .bind(last)
            .execute(&db.pool)
            .await
            .unwrap();
        }
    };
    // A failure 8 days ago (the period started then), then a quiet week, then one failure.
    set_clock("8 days", "7 days").await;
    let (_, deliveries) = emit(&db, 1).await;
    assert!(matches!(
        deliver_once(&db.pool, &settings, &deliveries[0]).await.unwrap(),
        Delivered::Retry { .. }
    ));
    let after = wh::get_endpoint(&mut db.pool.acquire().await.unwrap(), &endpoint.id)
        .await
        .unwrap();
    assert!(after.disabled_at.is_none(), "not disabled at once");
    let (restarted,): (bool,) =
        sqlx::query_as("SELECT failing_since > now() - interval '1 hour' AND last_failure_at = failing_since FROM webhook_endpoints WHERE id = $1")
            .bind(&endpoint.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(restarted, "the failing period starts again: {after:?}");
    // Failing continuously for 5 days (the last failure within the span): the next failure disables it.
    set_clock("5 days 1 minute", "20 hours").await;
    let (_, deliveries) = emit(&db, 2).await;
    assert_eq!(
        deliver_once(&db.pool, &settings, &deliveries[0]).await.unwrap(),
        Delivered::Failed
    );
    let after = wh::get_endpoint(&mut db.pool.acquire().await.unwrap(), &endpoint.id)
        .await
        .unwrap();
    assert!(after.disabled_at.is_some());
}

/// A success on a healthy endpoint does not update (or lock) the endpoint row; one on a failing endpoint clears it.
#[tokio::test]
async fn a_success_touches_the_endpoint_row_only_when_it_was_failing() {
    let hook = Hook::start().await;
    let (db, endpoint) = setup(&hook.url("/ok")).await;
    // Whether recording a success rewrote the endpoint row (an UPDATE writes a new row version: a new xmin).
    let rewrites_endpoint = |failing: bool| {
        let db = &db;
        let endpoint_id = endpoint.id.clone();
        async move {
            sqlx::query(
                "UPDATE webhook_endpoints SET failing_since = CASE WHEN $2 THEN now() END,
                        last_failure_at = CASE WHEN $2 THEN now() END WHERE id = $1",
            )
            .bind(&endpoint_id)
            .bind(failing)
            .execute(&db.pool)
            .await
            .unwrap();
            let version = || async {
                let (xmin,): (String,) = sqlx::query_as("SELECT xmin::text FROM webhook_endpoints WHERE id = $1")
                    .bind(&endpoint_id)
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
                xmin
            };
            let before = version().await;
            let (_, deliveries) = emit(db, u32::from(failing)).await;
            let mut conn = db.pool.acquire().await.unwrap();
            let claimed = wh::claim_delivery(&mut conn, &deliveries[0], "deliver-test", 60.0)
                .await
                .unwrap()
                .unwrap();
            wh::record_success(&mut conn, &claimed).await.unwrap();
            before != version().await
        }
    };
    assert!(
        !rewrites_endpoint(false).await,
        "a healthy endpoint's row is left alone"
    );
    assert!(rewrites_endpoint(true).await, "a failing endpoint is healthy again");
    let healthy = wh::get_endpoint(&mut db.pool.acquire().await.unwrap(), &endpoint.id)
        .await
        .unwrap();
    assert_eq!((healthy.failing_since, healthy.last_failure_at), (None, None));
}

/// `ops events` (all, or only failed) and `ops redeliver --since` read their indexes, not the whole table. The
/// statements are planned exactly as the code sends them, with sequential scans priced out (the table is small
/// here; tests/scale.rs shows the same plans hold at size for the tick queries).
#[tokio::test]
async fn listing_and_redelivering_deliveries_are_index_backed() {
    let (db, _) = setup("https://example.org/hook").await;
    for n in 0..3 {
        emit(&db, n).await;
    }
    sqlx::query("UPDATE webhook_deliveries SET status = 'failed', failed_at = now() WHERE id IN (SELECT min(id) FROM webhook_deliveries)")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    for sql in ["ANALYZE webhook_deliveries", "SET enable_seqscan = off"] {
        sqlx::query(sql).execute(&mut *conn).await.unwrap();
    }
    let since = chrono::Utc::now() - chrono::Duration::hours(1);
    let checks: [(String, &str); 3] = [
        (wh::list_deliveries_sql(false), "webhook_deliveries_created"),
        (wh::list_deliveries_sql(true), "webhook_deliveries_failed_created"),
        (
            splitpay::ops::deliveries::REDELIVER_SINCE_SQL.to_owned(),
            "webhook_deliveries_failed_created",
        ),
    ];
    for (i, (sql, index)) in checks.iter().enumerate() {
        let explain =
            sqlx::query_scalar::<_, serde_json::Value>(sqlx::AssertSqlSafe(format!("EXPLAIN (FORMAT JSON) {sql}")));
        let plan = if i < 2 {
            explain.bind(Option::<String>::None).bind(100_i64)
        } else {
            explain.bind(since).bind(10_000_i64)
        }
        .fetch_one(&mut *conn)
        .await
        .unwrap()
        .to_string();
        assert!(
            plan.contains(&format!("\"Index Name\":\"{index}\"")),
            "{index} not used: {plan}"
        );
        assert!(!plan.contains("\"Seq Scan\""), "{plan}");
    }
}

/// A 429 (or 503) with `Retry-After` waits that long, but at least the scheduled delay and at most twice it; a 410
/// Gone disables the endpoint (its reason says so) and ends its pending deliveries.
#[tokio::test]
async fn retry_after_is_honoured_within_bounds_and_410_disables_the_endpoint() {
    let hook = Hook::start().await;
    let (db, endpoint) = setup(&hook.url("/busy/1")).await;
    let settings = DeliverySettings::default();
    let set_url = |path: &'static str| {
        let (db, id, url) = (&db, endpoint.id.clone(), hook.url(path));
        async move { point_endpoint(db, &id, &url).await }
    };
    let mut n = 0;
    // Asked: 1 s (below the schedule: the schedule wins), 400 s (within), 100000 s (capped at twice the delay).
    for (path, asked) in [("/busy/1", 1), ("/busy/400", 400), ("/busy/100000", 100_000)] {
        set_url(path).await;
        n += 1;
        let (_, deliveries) = emit(&db, n).await;
        let base = delivery(&db, &deliveries[0]).await.schedule_secs[0];
        assert_eq!(
            deliver_once(&db.pool, &settings, &deliveries[0]).await.unwrap(),
            Delivered::Retry {
                after_secs: asked.clamp(base, 2 * base)
            },
            "{path}"
        );
    }

    set_url("/gone").await;
    let (_, waiting) = emit(&db, 10).await;
    let (_, deliveries) = emit(&db, 11).await;
    assert_eq!(
        deliver_once(&db.pool, &settings, &deliveries[0]).await.unwrap(),
        Delivered::Failed
    );
    let gone = wh::get_endpoint(&mut db.pool.acquire().await.unwrap(), &endpoint.id)
        .await
        .unwrap();
    assert!(gone.disabled_at.is_some());
    assert!(gone.disabled_reason.unwrap().contains("410 Gone"));
    let row = delivery(&db, &waiting[0]).await;
    assert_eq!(row.status, "failed");

    // `ops endpoints add` refuses a URL carrying credentials, without echoing them.
    let out = ops(
        &db,
        &[
            "endpoints",
            "add",
            "--organisation",
            common::DISTRIBUTOR,
            "--url",
            "https://u:s3cret@example.org/h",
            "--yes",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("--url") && !message.contains("s3cret"), "{message}");
}
