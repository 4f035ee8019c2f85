//! The Stripe test-mode end-to-end suite, `splitpay e2e`.
//!
//! - Against Stripe's test mode only with `STRIPE_TEST_SECRET_KEY=sk_test_…` (or `rk_test_…`); without it that test
//!   skips with one line saying how to run it.
//! - The same scenario code runs here against the local simulator (Stripe's onboarding rule on) in polling mode,
//!   with real `serve` and `worker` processes: no webhook endpoint is registered with the simulator, so every event
//!   splitpay processes came through the suite's `GET /v1/events` polling.
//! - Refusals: live and malformed keys, and a Stripe that answers in live mode, stop the suite before it creates
//!   anything; a run that fails midway still deletes the accounts it created.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::db::TestDb;
use common::process::{free_addr, Proc};
use common::stripe::{raw_get, TEST_KEY};
use serde_json::Value;
use splitpay::domain::ids::SplitPaymentId;
use splitpay::stripe::sim::model::SimConfig;
use splitpay::stripe::sim::{self, Fault, FaultKind, SimServer};

const SERVICE_TOKEN: &str = "svc_e2e_tests_token_0123";
/// `serve` needs a webhook secret with a Stripe key; in polling mode nothing is ever signed with it.
const UNUSED_WEBHOOK_SECRET: &str = "whsec_e2e_polling_mode_unused";
const READY_MAX: Duration = Duration::from_secs(60);

fn scratch_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `splitpay COMMAND` with a clean environment for Stripe: only what each test gives it.
fn splitpay(command: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_splitpay"));
    cmd.arg(command)
        .env_remove("STRIPE_SECRET_KEY")
        .env_remove("STRIPE_TEST_SECRET_KEY")
        .env_remove("STRIPE_API_BASE")
        .env_remove("STRIPE_WEBHOOK_SECRET")
        .env_remove("SPLITPAY_E2E_WEBHOOKS")
        .env("RUST_LOG", "info,sqlx=warn");
    cmd
}

/// `serve` and `worker` on `db`, talking to `api_base` with `key`; polling mode, so no webhook endpoint is
/// registered anywhere. Returns the API's base URL and the running processes.
async fn stack(db: &TestDb, key: &str, api_base: &str, logs: &Path) -> (String, Proc, Proc) {
    let api = free_addr();
    let base_url = format!("http://{api}");
    let process = |command: &str, log: &str| {
        let mut cmd = splitpay(command);
        cmd.env("DATABASE_URL", &db.url)
            .env("STRIPE_SECRET_KEY", key)
            .env("STRIPE_API_BASE", api_base)
            .env("STRIPE_WEBHOOK_SECRET", UNUSED_WEBHOOK_SECRET)
            // Stripe's 25/s test-mode budget, shared with the suite's own 8/s.
            .env("STRIPE_RATE_PER_SEC", "8")
            .env("SPLITPAY_SERVICE_TOKEN", SERVICE_TOKEN)
            .env("SPLITPAY_HTTP_ADDR", api.to_string())
            .env("SPLITPAY_METRICS_ADDR", free_addr().to_string())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(logs.join(log)).unwrap());
        cmd
    };
    let serve = Proc(process("serve", "serve.log").spawn().expect("serve starts"));
    let http = reqwest::Client::new();
    let deadline = Instant::now() + READY_MAX;
    while !http
        .get(format!("{base_url}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            Instant::now() < deadline,
            "serve never answered; log:\n{}",
            std::fs::read_to_string(logs.join("serve.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let worker = Proc(process("worker", "worker.log").spawn().expect("worker starts"));
    (base_url, serve, worker)
}

/// `splitpay e2e ARGS` with `env`; returns (success, stdout, stderr).
async fn e2e(env: &[(&str, &str)], args: &[&str]) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::from(splitpay("e2e"));
    cmd.args(args).env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = cmd.output().await.expect("the binary runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `splitpay e2e ARGS` against the simulator `sim` with the test key, on `db`.
async fn e2e_on_simulator(sim: &SimServer, db: &TestDb, args: &[&str]) -> (bool, String, String) {
    e2e(
        &[
            ("STRIPE_TEST_SECRET_KEY", TEST_KEY),
            ("STRIPE_API_BASE", &sim.base_url()),
            ("DATABASE_URL", &db.url),
            ("SPLITPAY_SERVICE_TOKEN", SERVICE_TOKEN),
        ],
        args,
    )
    .await
}

async fn onboarding_simulator() -> SimServer {
    let config = SimConfig {
        onboarding_required: true,
        ..SimConfig::default()
    };
    sim::start(config, 0).await.expect("simulator starts")
}

/// The simulator's request log: (method, path).
async fn requests(sim: &SimServer) -> Vec<(String, String)> {
    let log = sim.control().get("requests").await.unwrap();
    log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap().to_owned(),
                r["path"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Whether the simulator still has `account` (a deleted one answers 403 like Stripe).
async fn account_exists(sim: &SimServer, account: &str) -> bool {
    let status = reqwest::Client::new()
        .get(format!("{}v1/accounts/{account}", sim.base_url()))
        .bearer_auth(TEST_KEY)
        .send()
        .await
        .unwrap()
        .status();
    status.is_success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_stripe_test_mode_when_a_test_key_is_given() {
    let Ok(raw) = std::env::var("STRIPE_TEST_SECRET_KEY") else {
        println!(
            "skipped: the Stripe test-mode suite runs only with STRIPE_TEST_SECRET_KEY=sk_test_… set \
             (e.g. `STRIPE_TEST_SECRET_KEY=sk_test_… cargo test --test stripe_test_mode -- --nocapture`; see README.md, \
             \"Stripe test-mode end-to-end\")"
        );
        return;
    };
    // A key that is not a test key fails here, before any process starts or any request is sent.
    if let Err(e) = splitpay::e2e::guard::test_mode_key(Some(&raw)) {
        panic!("{e}");
    }
    let db = TestDb::new().await;
    let logs = scratch_dir("e2e-stripe");
    let (base_url, _serve, _worker) = stack(&db, &raw, "https://api.stripe.com/", &logs).await;
    let summary = logs.join("summary.json");
    let (ok, stdout, stderr) = e2e(
        &[
            ("STRIPE_TEST_SECRET_KEY", raw.as_str()),
            ("DATABASE_URL", &db.url),
            ("SPLITPAY_SERVICE_TOKEN", SERVICE_TOKEN),
        ],
        &[
            "--api-url",
            &base_url,
            "--webhooks",
            "poll",
            "--summary-json",
            summary.to_str().unwrap(),
        ],
    )
    .await;
    println!("{stdout}");
    assert!(
        ok,
        "the suite failed against Stripe test mode:\n{stderr}\nlogs in {}",
        logs.display()
    );
}

/// The whole scenario against the simulator, through real `serve` and `worker` processes, in polling mode; then
/// its results checked again here, independently of the suite's own checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scenario_passes_against_the_simulator_in_polling_mode() {
    let db = TestDb::new().await;
    let sim = onboarding_simulator().await;
    let logs = scratch_dir("e2e-sim");
    let (base_url, _serve, _worker) = stack(&db, TEST_KEY, &sim.base_url(), &logs).await;
    let summary_path = logs.join("summary.json");
    let (ok, stdout, stderr) = e2e_on_simulator(
        &sim,
        &db,
        &[
            "--api-url",
            &base_url,
            "--wait-secs",
            "120",
            "--summary-json",
            summary_path.to_str().unwrap(),
        ],
    )
    .await;
    println!("{stdout}");
    assert!(ok, "the suite failed:\n{stdout}\n{stderr}\nlogs in {}", logs.display());
    assert!(stdout.contains("webhooks      POLLING"), "the mode is said: {stdout}");
    assert!(
        !stdout.contains(TEST_KEY) && !stderr.contains(TEST_KEY),
        "the key is never printed"
    );

    let summary: Value = serde_json::from_slice(&std::fs::read(&summary_path).unwrap()).unwrap();
    assert_eq!(summary["outcome"], "passed");
    assert_eq!(summary["webhooks"], "poll");

    // Both accounts were created, and deleted at the end.
    let accounts = summary["accounts"].as_array().unwrap();
    assert_eq!(accounts.len(), 2);
    for a in accounts {
        assert_eq!(a["deleted"], true, "{a}");
        assert!(!account_exists(&sim, a["id"].as_str().unwrap()).await);
    }
    let ready = accounts.iter().find(|a| a["role"] == "ready").unwrap()["id"]
        .as_str()
        .unwrap();
    let unready = accounts.iter().find(|a| a["role"] == "not_onboarded").unwrap()["id"]
        .as_str()
        .unwrap();
    let log = requests(&sim).await;
    let posted = |path: &str| log.iter().filter(|(m, p)| m == "POST" && p == path).count();
    assert_eq!(posted("/v1/accounts"), 2);
    assert_eq!(posted(&format!("/v1/accounts/{unready}")), 1, "onboarded later, once");
    let deletes = log.iter().filter(|(m, _)| m == "DELETE").count();
    assert_eq!(deletes, 2);

    // Three payments; their shares, transfers, reversals and refunds as the scenario intends.
    let payments = summary["payments"].as_array().unwrap();
    let labels: Vec<&str> = payments.iter().map(|p| p["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["card", "card_available", "becs"]);
    for p in payments {
        assert_eq!(p["charged_cents"], 5_000);
        assert_eq!(p["conserved"], true);
        let shares = p["allocations"].as_array().unwrap();
        assert_eq!(shares.len(), 2);
        let id = SplitPaymentId::parse(p["split_payment_id"].as_str().unwrap()).unwrap();
        let mut conn = db.pool.acquire().await.unwrap();
        let report = splitpay::store::money_report::money_report(&mut conn, &id)
            .await
            .unwrap();
        assert!(report.is_conserved(), "{report:?}");
        assert_eq!(report.charged_cents, 5_000);
        let row = splitpay::store::payments::get_split_payment(&mut conn, &id)
            .await
            .unwrap();
        let fee = row.payment.processing_fee_cents.unwrap();
        assert_eq!(p["stripe_fee_cents"], fee);
        // Stripe's transfers for this payment, listed here and not through the suite.
        let listed = raw_get(&sim, &format!("transfers?transfer_group={id}&limit=100")).await;
        let transfers = listed["data"].as_array().unwrap();
        // One transfer per share that was sent, never two; the refunded parked share was never sent.
        let sent = if p["label"] == "card_available" { 1 } else { 2 };
        assert_eq!(transfers.len(), sent, "{listed}");
        let to = |account: &str| transfers.iter().find(|t| t["destination"] == account).unwrap();
        let net = |destination: &str| {
            shares.iter().find(|s| s["destination"] == destination).unwrap()["net_amount_cents"]
                .as_i64()
                .unwrap()
        };
        assert_eq!(to(ready)["amount"].as_i64(), Some(net(ready)));
        assert_eq!(net(ready) + net(unready) + fee, 5_000, "the fee split adds up");
        let statuses: Vec<&str> = shares.iter().map(|s| s["status"].as_str().unwrap()).collect();
        let generations: Vec<i64> = shares.iter().map(|s| s["generation"].as_i64().unwrap()).collect();
        if p["label"] == "card_available" {
            // The transferred share was reversed in full and refunded (its transfer stays made: TRANSFERRED); the
            // parked share was refunded from the platform's balance.
            assert_eq!(statuses, ["TRANSFERRED", "REFUNDED"]);
            assert_eq!(to(ready)["amount_reversed"].as_i64(), Some(net(ready)));
            let reversals = p["reversals"].as_array().unwrap();
            assert_eq!(reversals.len(), 1);
            assert_eq!(reversals[0]["amount_cents"].as_i64(), Some(net(ready)));
            let mut refunded: Vec<i64> = p["refunds"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["amount_cents"].as_i64().unwrap())
                .collect();
            refunded.sort();
            let mut expected = vec![net(ready), net(unready)];
            expected.sort();
            assert_eq!(refunded, expected, "each share's net back to the donor");
            assert_eq!(
                p["platform_retained_cents"], 0,
                "no platform fee configured: nothing kept"
            );
        } else {
            // The parked share went out on a second generation once the account was onboarded.
            assert_eq!(statuses, ["TRANSFERRED", "TRANSFERRED"]);
            assert_eq!(generations, [1, 2]);
            assert_eq!(to(unready)["amount"].as_i64(), Some(net(unready)));
            assert_eq!(to(unready)["amount_reversed"], 0);
            assert!(p["refunds"].as_array().unwrap().is_empty());
        }
    }
    let retried: Vec<&str> = summary["retried"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["by"].as_str().unwrap())
        .collect();
    assert_eq!(retried, ["ops retry", "ops retry"]);

    // Every event splitpay processed came through polling: nothing was ever delivered by the simulator. Two pollers
    // feed the inbox through the same ingress: the suite's, and the worker's own events sweep (refund and dispute
    // types, on its cron tick). An event the sweep stored first is a duplicate to the suite, so the inbox holds what
    // the suite stored plus at most the swept-type events (CI once saw 21 stored by the suite and 22 in the inbox).
    let inbox = common::count(&db.pool, "stripe_events").await;
    let (swept_in_inbox,): (i64,) = sqlx::query_as("SELECT count(*) FROM stripe_events WHERE event_type = ANY($1)")
        .bind(splitpay::jobs::event_sweep::SWEPT_EVENT_TYPES.to_vec())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let events = &summary["events"];
    let ingested = events["ingested"].as_i64().unwrap();
    assert!(ingested > 0);
    assert!(
        ingested <= inbox && inbox - ingested <= swept_in_inbox,
        "the suite stored {ingested}, the inbox holds {inbox}, of which {swept_in_inbox} of the swept types"
    );
    assert!(
        events["skipped_connect"].as_i64().unwrap() > 0,
        "account events are left out"
    );
    let stats = sim.control().webhook_stats().await.unwrap();
    println!("simulator webhook stats: {stats}");
    assert_eq!(stats["delivered"], 0, "no webhook endpoint: nothing delivered");
    assert_eq!(stats["failed_attempts"], 0, "no webhook endpoint: nothing attempted");
    assert!(
        summary["checks_passed"].as_i64().unwrap() > 60,
        "{}",
        summary["checks_passed"]
    );
}

#[tokio::test]
async fn live_malformed_and_missing_keys_are_refused_before_any_request() {
    let sim = onboarding_simulator().await;
    let base = sim.base_url();
    for (key, says) in [
        (Some("sk_live_0123456789abcdef"), "holds a live key"),
        (Some("rk_live_0123456789abcdef"), "holds a live key"),
        (Some("pk_test_0123456789abcdef"), "is not a Stripe test-mode secret key"),
        (Some("0123456789abcdef"), "is not a Stripe test-mode secret key"),
        (None, "STRIPE_TEST_SECRET_KEY is not set"),
    ] {
        let mut env = vec![
            ("STRIPE_API_BASE", base.as_str()),
            ("SPLITPAY_SERVICE_TOKEN", SERVICE_TOKEN),
            // splitpay's own key variable is not a fallback, and neither is permission for live keys.
            ("STRIPE_SECRET_KEY", TEST_KEY),
            ("SPLITPAY_ALLOW_LIVE", "1"),
        ];
        if let Some(key) = key {
            env.push(("STRIPE_TEST_SECRET_KEY", key));
        }
        let (ok, stdout, stderr) = e2e(&env, &[]).await;
        assert!(!ok, "{key:?} must be refused: {stdout}");
        assert!(stderr.contains(says), "{key:?}: {stderr}");
        assert!(
            !stderr.contains("0123456789abcdef") && !stdout.contains("0123456789abcdef"),
            "never echoed"
        );
    }
    assert!(requests(&sim).await.is_empty(), "nothing was sent to Stripe");
}

/// A test key that Stripe answers in live mode (the only word that counts) stops the run after one read.
#[tokio::test]
async fn a_stripe_that_answers_in_live_mode_stops_the_run_before_anything_is_created() {
    use axum::{routing::any, Router};
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    let app = Router::new().fallback(any(move |uri: axum::http::Uri| {
        let log = log.clone();
        async move {
            log.lock().unwrap().push(uri.path().to_owned());
            axum::Json(serde_json::json!({ "object": "balance", "livemode": true, "available": [], "pending": [] }))
        }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let (ok, _, stderr) = e2e(
        &[
            ("STRIPE_TEST_SECRET_KEY", TEST_KEY),
            ("STRIPE_API_BASE", &base),
            ("SPLITPAY_SERVICE_TOKEN", SERVICE_TOKEN),
        ],
        &[],
    )
    .await;
    assert!(!ok);
    assert!(stderr.contains("live mode"), "{stderr}");
    assert_eq!(*seen.lock().unwrap(), ["/v1/balance"], "one read, nothing created");
}

/// A run that fails after creating its accounts still deletes them: here the simulator lets an account receive
/// transfers without onboarding (its default), so nothing could be parked and the scenario stops at step 1; and
/// with splitpay's API unreachable it stops at step 2.
#[tokio::test]
async fn a_run_that_fails_midway_deletes_the_accounts_it_created() {
    let db = TestDb::new().await;
    let lenient = sim::start(SimConfig::default(), 0).await.unwrap();
    let strict = onboarding_simulator().await;
    let logs = scratch_dir("e2e-fail");
    let nobody = format!("http://{}", free_addr());
    // The first account's creation and the first deletion are applied at Stripe but their answers are lost: the
    // suite asks again with the same idempotency key (Stripe replays the account it made, no second one) and takes
    // "no such account" after a lost deletion as done.
    for (kind, method, path) in [
        (FaultKind::LoseResponse, "POST", "/v1/accounts"),
        (FaultKind::LoseResponse, "DELETE", "/v1/accounts/"),
    ] {
        lenient
            .control()
            .fault(Fault {
                kind,
                count: 1,
                path_contains: Some(path.into()),
                method: Some(method.into()),
            })
            .await
            .unwrap();
    }
    for (sim, says) in [
        (&lenient, "can receive transfers without onboarding"),
        (&strict, "splitpay's API could not be reached"),
    ] {
        let summary_path = logs.join(format!("{}.json", uuid::Uuid::new_v4().simple()));
        let (ok, stdout, stderr) = e2e_on_simulator(
            sim,
            &db,
            &[
                "--api-url",
                &nobody,
                "--rate-per-sec",
                "5",
                "--summary-json",
                summary_path.to_str().unwrap(),
            ],
        )
        .await;
        // The suite's requests only: taken before this test sends its own.
        let at_ms = sim.control().request_times_ms("/v1/").await.unwrap();
        assert!(!ok, "{stdout}");
        assert!(stderr.contains(says), "{stderr}");
        assert!(stdout.contains("FAILED"), "{stdout}");
        let summary: Value = serde_json::from_slice(&std::fs::read(&summary_path).unwrap()).unwrap();
        assert!(
            summary["outcome"].as_str().unwrap().starts_with("failed: "),
            "{summary}"
        );
        let accounts = summary["accounts"].as_array().unwrap();
        assert_eq!(accounts.len(), 2, "{summary}");
        for a in accounts {
            assert_eq!(a["deleted"], true);
            assert!(!account_exists(sim, a["id"].as_str().unwrap()).await);
        }
        // Exactly two accounts ever existed at Stripe (each emitted its account.updated on creation).
        let events = raw_get(sim, "events?limit=100&type=account.updated").await;
        let made: std::collections::BTreeSet<&str> = events["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["account"].as_str().unwrap())
            .collect();
        assert_eq!(made.len(), 2, "{events}");
        let log = requests(sim).await;
        let lost = usize::from(std::ptr::eq(sim, &lenient));
        assert_eq!(log.iter().filter(|(m, _)| m == "POST").count(), 2 + lost);
        assert_eq!(log.iter().filter(|(m, _)| m == "DELETE").count(), 2 + lost);

        // Every request went through the rate limiter (5/s, burst 1: starts at least 200 ms apart), retries and
        // cleanup included. A lower bound only: a slow machine spaces them further, never closer.
        assert!(at_ms.len() >= 7, "balance, accounts, reads, deletions: {at_ms:?}");
        for (i, first) in at_ms.iter().enumerate() {
            for (k, later) in at_ms[i + 1..].iter().enumerate() {
                let gaps = k as u64 + 1;
                assert!(
                    later - first + 50 >= gaps * 200,
                    "{gaps} gaps in {} ms: {at_ms:?}",
                    later - first
                );
            }
        }

        assert!(
            !log.iter()
                .any(|(_, p)| p.contains("payment_intents") || p.contains("transfers")),
            "no money moved"
        );
    }
}

/// The simulator's events created at or after `since`: (platform event ids, sorted; Connect event count).
async fn events_since(sim: &SimServer, since: i64) -> (Vec<String>, usize) {
    let listed = raw_get(sim, &format!("events?limit=100&created[gte]={since}")).await;
    assert_eq!(listed["has_more"], false, "the test keeps to one page of 100");
    let data = listed["data"].as_array().unwrap();
    let mut platform: Vec<String> = data
        .iter()
        .filter(|e| e.get("account").is_none())
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    platform.sort();
    (platform, data.iter().filter(|e| e.get("account").is_some()).count())
}

async fn stripe_event_jobs(db: &TestDb) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM apalis.jobs WHERE job_type = 'splitpay.stripe_event'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    n
}

/// Polling reads every page (three events a page here), feeds each platform event since the run began into the
/// webhook ingress exactly once (one inbox row; a processing job for each event splitpay acts on), leaves older events and Connect events out,
/// picks up events made while it runs, and a second poller (or a forwarder) finds them all already in the inbox.
#[tokio::test]
async fn polling_feeds_every_page_of_events_into_the_webhook_ingress_once() {
    use splitpay::e2e::events::Poller;
    use splitpay::stripe::PaymentGateway;
    let db = TestDb::new().await;
    splitpay::jobs::queue::setup(&db.pool).await.unwrap();
    let (sim, control) = common::stripe::simulator().await;
    let gateway = std::sync::Arc::new(common::stripe::gateway(&sim));
    let pay = |key: &str| {
        let params = splitpay::stripe::CreatePaymentIntentParams {
            amount_cents: 2_000,
            currency: "aud".into(),
            payment_method_type: splitpay::domain::plan::PaymentMethodType::Card,
            transfer_group: "spay_poll".into(),
            metadata: Default::default(),
            payment_method: Some("pm_card_visa".into()),
            idempotency_key: key.to_owned(),
        };
        let gateway = gateway.clone();
        async move { gateway.create_payment_intent(&params).await.unwrap() }
    };
    // Before the run began: never polled.
    pay("poll-old").await;
    let since = control.advance_clock(600).await.unwrap();
    for key in ["poll-0", "poll-1", "poll-2"] {
        pay(key).await;
    }
    control.create_account("acct_poll", true).await.unwrap();
    let (first, _) = events_since(&sim, since).await;
    assert!(first.len() > 6, "more than two pages: {}", first.len());

    // Two passes fail (Stripe's 500s, which the gateway does not retry): polling tries again, it does not give up.
    control
        .fault(Fault {
            kind: FaultKind::ServerError,
            count: 2,
            path_contains: Some("/v1/events".into()),
            method: Some("GET".into()),
        })
        .await
        .unwrap();
    let poller = Poller::start(gateway.clone(), db.pool.clone(), since, 3);
    let deadline = Instant::now() + READY_MAX;
    while (poller.stats().ingested as usize) < first.len() {
        assert!(Instant::now() < deadline, "{:?}", poller.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Events made while the poller runs come in on a later pass (or the last one, at finish).
    pay("poll-late").await;
    let stats = poller.finish().await;
    let (expected, connect) = events_since(&sim, since).await;
    assert!(expected.len() > first.len(), "the late payment made events");
    let inbox: Vec<(String,)> = sqlx::query_as("SELECT id FROM stripe_events ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let inbox: Vec<String> = inbox.into_iter().map(|(id,)| id).collect();
    assert_eq!(
        inbox, expected,
        "every platform event since the run began, and nothing older"
    );
    assert_eq!(stats.ingested as usize, expected.len());
    assert_eq!(stats.duplicates, 0);
    assert!(connect > 0);
    assert_eq!(stats.skipped_connect as usize, connect, "account events are left out");
    assert_eq!(stats.failure, None);
    assert_eq!(stats.failed_passes, 2);
    // One processing job per event splitpay acts on; any other event is stored already processed, with none.
    let types: Vec<(String, bool)> =
        sqlx::query_as("SELECT event_type, processed_at IS NOT NULL FROM stripe_events ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let acted_on = types
        .iter()
        .filter(|(t, _)| splitpay::jobs::stripe_event::needs_processing(t))
        .count() as i64;
    assert!(
        acted_on > 0 && acted_on < expected.len() as i64,
        "both kinds polled: {types:?}"
    );
    for (t, processed) in &types {
        assert_eq!(*processed, !splitpay::jobs::stripe_event::needs_processing(t), "{t}");
    }
    assert_eq!(
        stripe_event_jobs(&db).await,
        acted_on,
        "one processing job per event acted on"
    );

    // A second poller over the same window: every event is already in the inbox; nothing is queued again.
    let again = Poller::start(gateway.clone(), db.pool.clone(), since, 100)
        .finish()
        .await;
    assert_eq!((again.ingested, again.duplicates as usize), (0, expected.len()));
    assert_eq!(common::count(&db.pool, "stripe_events").await, expected.len() as i64);
    assert_eq!(stripe_event_jobs(&db).await, acted_on);

    // An event without an evt_ id is refused by the ingress and writes nothing.
    let refused =
        splitpay::http::webhooks::ingest_event(&db.pool, serde_json::json!({ "type": "charge.succeeded" })).await;
    assert!(matches!(refused, Err(splitpay::http::webhooks::IngestError::NoEventId)));
    assert_eq!(common::count(&db.pool, "stripe_events").await, expected.len() as i64);
}
