//! Issue 10, point 2: `/metrics` of real `serve` and `worker` processes after a demo-sized run, read as Prometheus
//! reads it and checked against the database and the simulator's request log; and the worker's JSON log lines
//! carry the ids of the payment and the allocation their job works on.
//!
//! The run: a three-recipient set (the third recipient's account cannot receive transfers, so its shares park),
//! catalogue and payments through the real API (`serve`, pointed at the simulator on a free port), four card
//! payments and one declined card, and `worker` with a fast cron schedule. When everything has settled, both
//! endpoints are scraped.

mod common;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::db::TestDb;
use common::flow::{SERVICE_TOKEN, WEBHOOK_SECRET};
use common::process::{free_addr, Proc};
use prometheus_parse::{Sample, Scrape, Value};
use serde_json::json;
use splitpay::domain::plan::AmountMode;
use splitpay::observability::stripe_endpoint;
use sqlx::PgPool;

const AMOUNTS: [i64; 3] = [2_000, 3_000, 1_500];
const CARD_PAYMENTS: usize = 4;
/// Bounds the wait for the run to settle (it takes a second or two).
const SETTLE_MAX: Duration = Duration::from_secs(60);

/// Every periodic job every second or two, so reconcile runs happen during the test.
const FAST_SCHEDULE: &str = r#"
[jobs.reconcile-pending]
cron = "*/2 * * * * *"
description = "metrics test: every 2 s"

[jobs.reconcile-transfers]
cron = "1/2 * * * * *"
description = "metrics test: every 2 s"

[jobs.sweeper]
cron = "*/5 * * * * *"
description = "metrics test: every 5 s"
"#;

fn splitpay(command: &str, db: &TestDb, sim_base: &str, log: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_splitpay"));
    cmd.arg(command)
        .env("DATABASE_URL", &db.url)
        .env("STRIPE_SECRET_KEY", common::stripe::TEST_KEY)
        .env("STRIPE_API_BASE", sim_base)
        .env("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
        .env("STRIPE_RATE_PER_SEC", "500")
        .env("SPLITPAY_SERVICE_TOKEN", SERVICE_TOKEN)
        .env("SPLITPAY_LOG_FORMAT", "json")
        .env("RUST_LOG", "info,sqlx=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("the log file opens"));
    cmd
}

async fn scrape(http: &reqwest::Client, url: &str) -> Vec<Sample> {
    let response = http.get(url).send().await.expect("/metrics answers");
    assert_eq!(response.status().as_u16(), 200, "{url}");
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = response.text().await.unwrap();
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text format")
        .samples
}

fn number(sample: &Sample) -> f64 {
    match sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
        ref other => panic!("{} is not a number: {other:?}", sample.metric),
    }
}

/// The value of `metric` with exactly these labels (0 if absent, as Prometheus would treat a counter never set).
fn value(samples: &[Sample], metric: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.metric == metric && s.labels.len() == labels.len())
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .map_or(0.0, number)
}

/// The sum of `metric` over all its label sets.
fn total(samples: &[Sample], metric: &str) -> f64 {
    samples.iter().filter(|s| s.metric == metric).map(number).sum()
}

async fn counts(pool: &PgPool, sql: &str) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

async fn scalar(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Stripe requests per (method, endpoint label) as the simulator received them.
async fn simulator_requests(http: &reqwest::Client, sim_base: &str) -> BTreeMap<(String, String), f64> {
    let log: serde_json::Value = http
        .get(format!("{sim_base}_sim/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut by_endpoint = BTreeMap::new();
    for r in log["requests"].as_array().unwrap() {
        let key = (
            r["method"].as_str().unwrap().to_owned(),
            stripe_endpoint(r["path"].as_str().unwrap()),
        );
        *by_endpoint.entry(key).or_insert(0.0) += 1.0;
    }
    by_endpoint
}

/// Stripe requests per (method, endpoint label) as splitpay's processes counted them, over every outcome.
fn counted_requests(scrapes: &[&[Sample]]) -> BTreeMap<(String, String), f64> {
    let mut by_endpoint = BTreeMap::new();
    for samples in scrapes {
        for s in samples.iter().filter(|s| s.metric == "splitpay_stripe_requests_total") {
            let endpoint = s.labels.get("endpoint").unwrap().to_owned();
            assert!(
                !endpoint.contains("pi_") && !endpoint.contains("tr_") && !endpoint.contains("ch_"),
                "an id in a label: {endpoint}"
            );
            let key = (s.labels.get("method").unwrap().to_owned(), endpoint);
            *by_endpoint.entry(key).or_insert(0.0) += number(s);
        }
    }
    by_endpoint
}

async fn wait_until_ready(http: &reqwest::Client, url: &str, log: &Path) {
    let deadline = Instant::now() + SETTLE_MAX;
    while Instant::now() < deadline {
        if http.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{url} never answered; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_metrics_endpoints_match_the_database_and_the_simulator() {
    let db = TestDb::new().await;
    let (sim, control) = common::stripe::simulator().await;
    let sim_base = sim.base_url();
    for (i, can_receive) in [true, true, false].into_iter().enumerate() {
        control
            .create_account(&format!("acct_rcp{i}"), can_receive)
            .await
            .unwrap();
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("metrics-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let (serve_log, worker_log, schedule) = (dir.join("serve.log"), dir.join("worker.log"), dir.join("schedule.toml"));
    std::fs::write(&schedule, FAST_SCHEDULE).unwrap();
    println!("logs in {}", dir.display());

    let (api, worker_metrics) = (free_addr(), free_addr());
    let base_url = format!("http://{api}");
    let _serve = Proc(
        splitpay("serve", &db, &sim_base, &serve_log)
            .env("SPLITPAY_HTTP_ADDR", api.to_string())
            .spawn()
            .expect("serve starts"),
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    wait_until_ready(&http, &format!("{base_url}/healthz"), &serve_log).await;
    control
        .add_webhook(&format!("{base_url}/stripe/webhooks"), WEBHOOK_SECRET)
        .await
        .unwrap();
    common::seed_set_via_api(&base_url, SERVICE_TOKEN, AmountMode::Fixed, &AMOUNTS).await;
    let _worker = Proc(
        splitpay("worker", &db, &sim_base, &worker_log)
            .env("SPLITPAY_METRICS_ADDR", worker_metrics.to_string())
            .env("SPLITPAY_CRON_SCHEDULE", &schedule)
            .spawn()
            .expect("worker starts"),
    );
    let worker_url = format!("http://{worker_metrics}/metrics");
    wait_until_ready(&http, &worker_url, &worker_log).await;

    let cards = std::iter::repeat_n("pm_card_visa", CARD_PAYMENTS).chain(["pm_card_chargeDeclined"]);
    for (i, card) in cards.enumerate() {
        let response = http
            .post(format!("{base_url}/v1/split-payments"))
            .bearer_auth(SERVICE_TOKEN)
            .header("Idempotency-Key", format!("metrics-{i}"))
            .json(&json!({
                "recommendation_set_id": "cm3rec1",
                "donor_id": format!("cm3donor{i}"),
                "payment_method_type": "card",
                "payment_method": card,
            }))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.text().await.unwrap();
        assert!(status < 500, "payment {i} with {card}: {status} {body}");
    }

    // Settled: every payment final, every share of the paid ones transferred or parked, no job waiting.
    let deadline = Instant::now() + SETTLE_MAX;
    loop {
        let open = scalar(
            &db.pool,
            "SELECT (SELECT count(*) FROM split_payments WHERE status NOT IN ('SUCCEEDED', 'FAILED', 'CANCELED'))
                  + (SELECT count(*) FROM split_allocations WHERE status IN ('PENDING', 'TRANSFERRING'))
                  + (SELECT count(*) FROM apalis.jobs WHERE status IN ('Pending', 'Queued', 'Running'))",
        )
        .await;
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} payments, allocations or jobs still open; worker log:\n{}",
            std::fs::read_to_string(&worker_log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The simulator's log is read before and after the scrapes: equal, no request slipped in between.
    // The database gauges are a reading at most REFRESH_INTERVAL_MIN (1 s) old: a scrape that does not yet show
    // PARKED as the table does is taken again after that interval (bounded), then asserted in full below.
    let mut rescrapes = 0;
    let (serve_samples, worker_samples, requests) = loop {
        let before = simulator_requests(&http, &sim_base).await;
        let serve_samples = scrape(&http, &format!("{base_url}/metrics")).await;
        let worker_samples = scrape(&http, &worker_url).await;
        if simulator_requests(&http, &sim_base).await != before {
            continue;
        }
        let parked = counts(
            &db.pool,
            "SELECT status, count(*) FROM split_allocations GROUP BY status",
        )
        .await;
        let parked = parked.get("PARKED").copied().unwrap_or(0) as f64;
        let current = [&serve_samples, &worker_samples]
            .iter()
            .all(|s| value(s, "splitpay_split_allocations", &[("status", "PARKED")]) == parked);
        if current || rescrapes == 5 {
            break (serve_samples, worker_samples, before);
        }
        rescrapes += 1;
        tokio::time::sleep(Duration::from_millis(1_100)).await;
    };
    let both = [serve_samples.as_slice(), worker_samples.as_slice()];

    // Open work: each endpoint reads the same gauges from the database.
    let allocations = counts(
        &db.pool,
        "SELECT status, count(*) FROM split_allocations GROUP BY status",
    )
    .await;
    let payments = counts(&db.pool, "SELECT status, count(*) FROM split_payments GROUP BY status").await;
    let of = |map: &BTreeMap<String, i64>, status: &str| map.get(status).copied().unwrap_or(0) as f64;
    assert_eq!(of(&payments, "SUCCEEDED"), CARD_PAYMENTS as f64, "{payments:?}");
    assert_eq!(of(&allocations, "PARKED"), CARD_PAYMENTS as f64, "{allocations:?}");
    let parked_cents = scalar(
        &db.pool,
        "SELECT sum(net_amount_cents)::bigint FROM split_allocations WHERE status = 'PARKED'",
    )
    .await;
    assert!(parked_cents > 0);
    for samples in both {
        for status in ["PENDING", "TRANSFERRING", "PARKED"] {
            assert_eq!(
                value(samples, "splitpay_split_allocations", &[("status", status)]),
                of(&allocations, status),
                "{status}"
            );
        }
        for status in ["CREATED", "REQUIRES_PAYMENT", "PROCESSING"] {
            assert_eq!(
                value(samples, "splitpay_split_payments", &[("status", status)]),
                of(&payments, status),
                "{status}"
            );
        }
        assert_eq!(
            value(samples, "splitpay_parked_allocations", &[("currency", "aud")]),
            of(&allocations, "PARKED")
        );
        assert_eq!(
            value(samples, "splitpay_parked_amount_cents", &[("currency", "aud")]),
            parked_cents as f64
        );
        let unresolved = scalar(
            &db.pool,
            "SELECT count(*) FROM split_allocations WHERE unresolved_at IS NOT NULL",
        )
        .await;
        assert_eq!(value(samples, "splitpay_transfers_unresolved", &[]), unresolved as f64);
        for queue in splitpay::jobs::queue::Queue::ALL {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM apalis.jobs WHERE job_type = $1 AND status IN ('Pending', 'Queued', 'Failed')
                    AND (status <> 'Failed' OR attempts < max_attempts)",
            )
            .bind(queue.name())
            .fetch_one(&db.pool)
            .await
            .unwrap();
            assert_eq!(
                value(samples, "splitpay_job_queue_depth", &[("queue", queue.name())]),
                waiting as f64,
                "{}",
                queue.name()
            );
        }
        let deliveries = counts(
            &db.pool,
            "SELECT status, count(*) FROM webhook_deliveries GROUP BY status",
        )
        .await;
        for status in ["pending", "delivering", "failed"] {
            assert_eq!(
                value(samples, "splitpay_webhook_deliveries", &[("status", status)]),
                of(&deliveries, status),
                "{status}"
            );
        }
    }

    // Final states are counted as the transitions each process wrote: together, the table's counts.
    for status in ["TRANSFERRED", "PARKED", "VOIDED"] {
        let written: f64 = both
            .iter()
            .map(|s| value(s, "splitpay_split_allocation_transitions_total", &[("to", status)]))
            .sum();
        assert_eq!(written, of(&allocations, status), "allocations {status}");
    }
    for status in ["SUCCEEDED", "FAILED"] {
        let written: f64 = both
            .iter()
            .map(|s| value(s, "splitpay_split_payment_transitions_total", &[("to", status)]))
            .sum();
        assert_eq!(written, of(&payments, status), "payments {status}");
    }
    assert_eq!(of(&payments, "FAILED"), 1.0, "the declined card: {payments:?}");
    // The hot path's batches (the worker's): what they wrote is at most what the tables hold, and they wrote
    // something (each count also includes whatever a batch handed back, done alone).
    let batched = |kind: &str, written: &str| {
        value(
            &worker_samples,
            "splitpay_group_commit_items_total",
            &[("kind", kind), ("written", written)],
        )
    };
    for (kind, most) in [
        ("start", of(&payments, "SUCCEEDED")),
        ("record", of(&allocations, "TRANSFERRED")),
    ] {
        let written = batched(kind, "true");
        assert!(
            written >= 1.0 && written <= most,
            "{kind}: {written} written, at most {most}"
        );
    }

    // One latency observation per transfer recorded, all by the worker.
    assert_eq!(
        value(&worker_samples, "splitpay_transfer_latency_seconds_count", &[]),
        of(&allocations, "TRANSFERRED")
    );
    assert_eq!(
        value(&serve_samples, "splitpay_transfer_latency_seconds_count", &[]),
        0.0
    );

    // Stripe requests: what serve and the worker counted is what the simulator received, endpoint by endpoint.
    assert_eq!(counted_requests(&both), requests);
    assert!(
        requests.contains_key(&("POST".to_owned(), "/v1/payment_intents".to_owned())),
        "{requests:?}"
    );
    // Each parked share is one refused transfer create.
    assert_eq!(
        value(
            &worker_samples,
            "splitpay_stripe_requests_total",
            &[
                ("method", "POST"),
                ("endpoint", "/v1/transfers"),
                ("outcome", "client_error")
            ]
        ),
        of(&allocations, "PARKED")
    );
    // Every request waited for the limiter once (possibly for 0 s).
    for samples in both {
        assert_eq!(
            value(samples, "splitpay_stripe_rate_limiter_wait_seconds_count", &[]),
            total(samples, "splitpay_stripe_requests_total")
        );
    }

    // Reconcile runs: each tick the worker claimed ran once (the last one may still be running).
    for (reconciler, job) in [("pending", "reconcile-pending"), ("transfers", "reconcile-transfers")] {
        let runs = value(
            &worker_samples,
            "splitpay_reconcile_runs_total",
            &[("reconciler", reconciler)],
        );
        let claimed: i64 = sqlx::query_scalar("SELECT count(*) FROM cron_claims WHERE name = $1")
            .bind(job)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert!(
            runs <= claimed as f64 && runs + 1.0 >= claimed as f64,
            "{reconciler}: {runs} runs, {claimed} ticks claimed"
        );
    }

    // Every log line of a transfer job names its allocation and its payment.
    let owner: BTreeMap<String, String> =
        sqlx::query_as::<_, (String, String)>("SELECT id, split_payment_id FROM split_allocations")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let mut transfer_lines = 0;
    for line in std::io::BufReader::new(std::fs::File::open(&worker_log).unwrap()).lines() {
        let line = line.unwrap();
        let entry: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        let span = &entry["span"];
        // A transfer job's lines, or a transfer made by its distribution in its own `transfer` span.
        let transfer_job = span["name"] == "job" && span["queue"] == "splitpay.transfer";
        if !transfer_job && span["name"] != "transfer" {
            continue;
        }
        transfer_lines += 1;
        let allocation = span["split_allocation_id"].as_str().unwrap_or_else(|| panic!("{line}"));
        assert_eq!(
            span["split_payment_id"].as_str(),
            owner.get(allocation).map(String::as_str),
            "{line}"
        );
    }
    let logged = of(&allocations, "TRANSFERRED") + of(&allocations, "PARKED");
    assert!(
        transfer_lines as f64 >= logged,
        "a line per transfer and per parked share: {transfer_lines} < {logged}"
    );
}
