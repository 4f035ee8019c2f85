//! The job runtime on a real PostgreSQL with apalis-postgres: transactional enqueueing, a worker that survives bad
//! payloads, delayed jobs, retries, and graceful shutdown.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::db::TestDb;
use splitpay::jobs::queue::{enqueue, setup, JobRef, Queue};
use splitpay::jobs::runner::{run, Handler, JobFailure, RunnerSettings};
use tokio::sync::oneshot;

type Seen = Arc<Mutex<Vec<(String, std::time::Instant)>>>;

/// A handler that records each id; ids starting with `flaky` fail the first time.
fn recorder(seen: Seen) -> Handler {
    let failed_once: Arc<Mutex<Vec<String>>> = Arc::default();
    Arc::new(move |job: JobRef| {
        let (seen, failed_once) = (seen.clone(), failed_once.clone());
        Box::pin(async move {
            if job.id.starts_with("flaky") && !failed_once.lock().unwrap().contains(&job.id) {
                failed_once.lock().unwrap().push(job.id.clone());
                return Err(JobFailure::Retry("first attempt fails".into()));
            }
            seen.lock().unwrap().push((job.id, std::time::Instant::now()));
            Ok(())
        })
    })
}

fn fast() -> RunnerSettings {
    RunnerSettings {
        heartbeat_interval: Duration::from_secs(1),
        missed_heartbeats: 3,
        poll_interval: Duration::from_millis(200),
        shutdown_timeout: Duration::from_secs(5),
        ..RunnerSettings::default()
    }
}

async fn wait_for(seen: &Seen, n: usize) -> Vec<String> {
    for _ in 0..150 {
        if seen.lock().unwrap().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen.lock().unwrap().iter().map(|(id, _)| id.clone()).collect()
}

async fn statuses(db: &TestDb, queue: Queue) -> Vec<String> {
    let rows: Vec<(String,)> = sqlx::query_as("SELECT status FROM apalis.jobs WHERE job_type = $1 ORDER BY run_at, id")
        .bind(queue.name())
        .fetch_all(&db.pool)
        .await
        .unwrap();
    rows.into_iter().map(|(s,)| s).collect()
}

#[tokio::test]
async fn jobs_exist_only_if_their_transaction_commits_and_bad_payloads_do_not_stop_the_worker() {
    let db = TestDb::new().await;
    setup(&db.pool).await.unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    enqueue(&mut tx, Queue::Transfer, "salc_rolled_back", None)
        .await
        .unwrap();
    drop(tx); // rolled back
    let mut tx = db.pool.begin().await.unwrap();
    enqueue(&mut tx, Queue::Transfer, "salc_1", None).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        statuses(&db, Queue::Transfer).await.len(),
        1,
        "the rolled-back job does not exist"
    );

    // A payload no handler can read, pushed the way a buggy or older release might.
    let bad = apalis::prelude::TaskBuilder::new(br#"{"allocation":"salc_x"}"#.to_vec()).build();
    let mut conn = db.pool.acquire().await.unwrap();
    apalis_postgres::queries::push_tasks(&mut *conn, Queue::Transfer.name(), vec![bad])
        .await
        .unwrap();
    drop(conn);

    let seen: Seen = Arc::default();
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(run(
        db.pool.clone(),
        vec![(Queue::Transfer, recorder(seen.clone()))],
        fast(),
        async move {
            let _ = stopped.await;
        },
    ));
    assert_eq!(wait_for(&seen, 1).await, vec!["salc_1"]);

    // Still working after the bad payload: a job enqueued later is picked up (NOTIFY or the poll).
    let mut tx = db.pool.begin().await.unwrap();
    enqueue(&mut tx, Queue::Transfer, "salc_2", None).await.unwrap();
    enqueue(&mut tx, Queue::Transfer, "flaky_3", None).await.unwrap();
    tx.commit().await.unwrap();
    let mut ids = wait_for(&seen, 3).await;
    ids.sort();
    assert_eq!(
        ids,
        vec!["flaky_3", "salc_1", "salc_2"],
        "a failed attempt is run again"
    );

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), worker)
        .await
        .expect("shuts down")
        .unwrap()
        .unwrap();
    let mut states = statuses(&db, Queue::Transfer).await;
    states.sort();
    assert_eq!(
        states,
        vec!["Done", "Done", "Done", "Killed"],
        "the bad payload is killed, not retried"
    );
    let rejected: (i32,) = sqlx::query_as("SELECT attempts FROM apalis.jobs WHERE job_type = $1 AND status = 'Killed'")
        .bind(Queue::Transfer.name())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rejected.0, 1, "rejected on its first attempt");
}

#[tokio::test]
async fn delayed_jobs_wait_and_queues_are_separate() {
    let db = TestDb::new().await;
    setup(&db.pool).await.unwrap();
    let seen: Seen = Arc::default();
    let other: Seen = Arc::default();
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(run(
        db.pool.clone(),
        vec![
            (Queue::Distribute, recorder(seen.clone())),
            (Queue::StripeEvent, recorder(other.clone())),
        ],
        fast(),
        async move {
            let _ = stopped.await;
        },
    ));
    let enqueued_at = std::time::Instant::now();
    let mut tx = db.pool.begin().await.unwrap();
    enqueue(&mut tx, Queue::Distribute, "spay_later", Some(Duration::from_secs(2)))
        .await
        .unwrap();
    enqueue(&mut tx, Queue::StripeEvent, "evt_now", None).await.unwrap();
    tx.commit().await.unwrap();

    assert_eq!(wait_for(&other, 1).await, vec!["evt_now"]);
    assert_eq!(wait_for(&seen, 1).await, vec!["spay_later"]);
    let waited = seen.lock().unwrap()[0].1.duration_since(enqueued_at);
    // run_at has whole-second resolution and the delay is rounded up: at least 1 s of a 2 s delay must have passed.
    assert!(waited >= Duration::from_secs(1), "ran after {waited:?}");
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), worker)
        .await
        .expect("shuts down")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn workers_come_back_after_the_database_drops_every_connection() {
    let db = TestDb::new().await;
    setup(&db.pool).await.unwrap();
    let seen: Seen = Arc::default();
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(run(
        db.pool.clone(),
        vec![(Queue::Transfer, recorder(seen.clone()))],
        fast(),
        async move {
            let _ = stopped.await;
        },
    ));
    let mut tx = db.pool.begin().await.unwrap();
    enqueue(&mut tx, Queue::Transfer, "salc_before", None).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(wait_for(&seen, 1).await, vec!["salc_before"]);

    // An outage as the worker sees it: every connection to its database is cut (LISTEN, fetch, heartbeat, pool).
    let admin_url = common::db::url_with_database(&common::db::server_url(), "postgres");
    let admin = sqlx::PgPool::connect(&admin_url).await.unwrap();
    let name = db.url.rsplit('/').next().unwrap().split('?').next().unwrap().to_owned();
    let (cut,): (i64,) = sqlx::query_as(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&name)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert!(cut > 0, "the worker's connections were cut");

    // Work enqueued after the outage is still done.
    let mut enqueued = false;
    for _ in 0..50 {
        if let Ok(mut tx) = db.pool.begin().await {
            if enqueue(&mut tx, Queue::Transfer, "salc_after", None).await.is_ok() && tx.commit().await.is_ok() {
                enqueued = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(enqueued);
    let ids = wait_for(&seen, 2).await;
    assert_eq!(
        ids,
        vec!["salc_before", "salc_after"],
        "the worker restarted and picked up new work"
    );
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), worker)
        .await
        .expect("shuts down")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn the_sweeper_requeues_only_work_whose_job_was_lost() {
    use splitpay::store::records::{finish_stripe_event, insert_stripe_event, NewStripeEvent};
    let db = TestDb::new().await;
    setup(&db.pool).await.unwrap();
    let event = |id: &str| NewStripeEvent {
        id: id.into(),
        event_type: "payment_intent.succeeded".into(),
        object_id: None,
        livemode: false,
        payload: serde_json::json!({ "id": id }),
        stripe_created: None,
    };
    let mut conn = db.pool.acquire().await.unwrap();
    for id in ["evt_lost", "evt_fresh", "evt_done"] {
        insert_stripe_event(&mut conn, &event(id)).await.unwrap();
    }
    sqlx::query(
        "UPDATE stripe_events SET received_at = now() - interval '2 minutes' WHERE id IN ('evt_lost', 'evt_done')",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    finish_stripe_event(&mut conn, "evt_done", None).await.unwrap();
    drop(conn);

    let report = splitpay::jobs::sweeper::sweep(&db.pool, 60).await.unwrap();
    assert_eq!(
        (report.stripe_events, report.distributions, report.transfers),
        (1, 0, 0)
    );
    // The job column holds the JSON payload as bytes.
    let ids: Vec<(String,)> =
        sqlx::query_as("SELECT convert_from(job, 'UTF8')::jsonb ->> 'id' FROM apalis.jobs WHERE job_type = $1")
            .bind(Queue::StripeEvent.name())
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        ids,
        vec![("evt_lost".to_owned(),)],
        "one job, for the stale unprocessed event only"
    );
}

#[tokio::test]
async fn two_replicas_run_each_cron_tick_once_between_them() {
    use splitpay::jobs::cron::{run as run_cron, CronJob};
    use splitpay::jobs::schedule::Schedule;
    let db = TestDb::new().await;
    let every_second = "[jobs.sweeper]\ncron = \"* * * * * *\"\ndescription = \"test\"\n\
                        [jobs.reconcile-pending]\ncron = \"0 0 0 1 1 *\"\ndescription = \"test\"\n\
                        [jobs.reconcile-transfers]\ncron = \"0 0 0 1 1 *\"\ndescription = \"test\"\n";
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut replicas = Vec::new();
    for replica in ["replica-a", "replica-b"] {
        let runs = runs.clone();
        let job: CronJob = Arc::new(move || {
            let runs = runs.clone();
            Box::pin(async move {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        });
        let pool = db.pool.clone();
        let schedule = Schedule::parse(every_second).unwrap();
        replicas.push(tokio::spawn(run_cron(
            pool,
            schedule,
            vec![("sweeper", job)],
            replica.into(),
            tokio::time::sleep(Duration::from_millis(3_500)),
        )));
    }
    for r in replicas {
        r.await.unwrap();
    }
    let (ticks,): (i64,) = sqlx::query_as("SELECT count(*) FROM cron_claims WHERE name = 'sweeper'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let runs = runs.load(std::sync::atomic::Ordering::SeqCst);
    assert!(ticks >= 2, "ticks claimed: {ticks}");
    assert_eq!(
        runs as i64, ticks,
        "each claimed tick ran exactly once across both replicas"
    );
}

#[tokio::test]
async fn the_sweeper_requeues_stale_distributions_and_transfers() {
    let db = TestDb::new().await;
    setup(&db.pool).await.unwrap();
    let set = common::seed_set(&db.pool, splitpay::domain::plan::AmountMode::Fixed, &[1_000, 2_000]).await;
    let (id, first) = common::succeeded_with_first_transfer_started(&db.pool, &set, "pi_x", "ch_x", 30).await;

    // Fresh work is left to its own jobs.
    assert_eq!(
        splitpay::jobs::sweeper::sweep(&db.pool, 60).await.unwrap(),
        Default::default()
    );
    // Two minutes later nothing has moved: the jobs were lost.
    sqlx::query("UPDATE split_payments SET succeeded_at = now() - interval '2 minutes'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE split_allocations SET next_attempt_at = now() - interval '2 minutes' WHERE status = 'TRANSFERRING'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let report = splitpay::jobs::sweeper::sweep(&db.pool, 60).await.unwrap();
    assert_eq!((report.distributions, report.transfers), (1, 1), "{report:?}");
    let queued: Vec<(String, String)> =
        sqlx::query_as("SELECT job_type, convert_from(job, 'UTF8')::jsonb ->> 'id' FROM apalis.jobs ORDER BY job_type")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        queued,
        vec![
            (Queue::Distribute.name().into(), id.to_string()),
            (Queue::Transfer.name().into(), first.to_string())
        ]
    );
    // The work now has jobs waiting: another sweep adds none.
    assert_eq!(
        splitpay::jobs::sweeper::sweep(&db.pool, 60).await.unwrap(),
        Default::default(),
        "a sweep never adds a second job for work that already has one waiting"
    );
    let (jobs,): (i64,) = sqlx::query_as("SELECT count(*) FROM apalis.jobs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 2);
}
