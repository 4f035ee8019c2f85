//! The `splitpay` binary as a user runs it.

mod common;

use std::process::Command;

use common::db::{server_url, url_with_database, DropDatabase, TestDb};
use sqlx::postgres::PgPoolOptions;

fn splitpay(database_url: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_splitpay"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "info")
        .output()
        .expect("the binary runs")
}

#[tokio::test]
async fn migrate_creates_the_database_and_is_harmless_twice() {
    // A name no test fixture created: `migrate` must create it.
    let name = format!("splitpay_test_cli_{}", uuid::Uuid::new_v4().simple());
    let url = url_with_database(&server_url(), &name);
    let _drop_at_end = DropDatabase(name);
    for run in 1..=2 {
        let out = splitpay(&url, &["migrate"]);
        assert!(
            out.status.success(),
            "run {run}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let pool = PgPoolOptions::new().max_connections(1).connect(&url).await.unwrap();
    let (tables,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' AND table_name IN
            ('organisations', 'recipient_account_links', 'recommendation_sets', 'recommendation_allocations',
             'split_payments', 'split_allocations', 'transfer_attempts', 'donations', 'stripe_events',
             'outbox_events', 'ops_audit_log', 'cron_claims')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 12);
    let (applied,): (i64,) = sqlx::query_as("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        applied as usize,
        splitpay::store::MIGRATOR.iter().count(),
        "each migration applied once"
    );
    pool.close().await;
}

#[tokio::test]
async fn migrate_on_an_existing_schema_is_a_no_op() {
    let db = TestDb::new().await;
    let out = splitpay(&db.url, &["migrate"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_bad_database_url_is_a_clear_error_without_the_password() {
    let out = splitpay("mysql://admin:hunter2@127.0.0.1/x", &["migrate"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "the password leaked: {stderr}");
}

#[test]
fn help_lists_only_working_subcommands() {
    let out = Command::new(env!("CARGO_BIN_EXE_splitpay"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("migrate"), "{help}");
    for working in ["stripe-sim", "serve", "worker", "demo", "ops"] {
        assert!(help.contains(working), "{help}");
    }
    // `ops` lists only the commands that work so far.
    let out = Command::new(env!("CARGO_BIN_EXE_splitpay"))
        .args(["ops", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for working in ["reconcile", "parked", "show", "retry", "refund", "audit"] {
        assert!(help.contains(&format!("  {working} ")), "{working} is missing: {help}");
    }
}

/// Two demos started together on one server both finish (the second waits for the first instead of dropping its
/// database mid-run); the one that finished last left its database for the `ops` commands it prints.
#[test]
fn the_demo_runs_the_whole_money_path_and_conserves_every_cent() {
    let demo = || {
        std::thread::spawn(|| {
            let out = Command::new(env!("CARGO_BIN_EXE_splitpay"))
                .arg("demo")
                .env("DATABASE_URL", server_url())
                .env_remove("RUST_LOG")
                .output()
                .unwrap();
            (std::time::Instant::now(), out)
        })
    };
    let (first, second) = (demo(), demo());
    let mut runs = [first.join().unwrap(), second.join().unwrap()];
    runs.sort_by_key(|(finished, _)| *finished);
    for (_, out) in &runs {
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let earlier = String::from_utf8_lossy(&runs[0].1.stdout);
    assert_eq!(earlier.matches("conserved to the cent").count(), 2, "{earlier}");
    let stdout = String::from_utf8_lossy(&runs[1].1.stdout);
    assert_eq!(stdout.matches("conserved to the cent").count(), 2, "{stdout}");
    assert_eq!(stdout.matches("TRANSFERRED tr_").count(), 4, "{stdout}");
    assert_eq!(
        stdout.matches("PARKED insufficient_capabilities_for_transfer").count(),
        2,
        "{stdout}"
    );
    assert!(stdout.contains("PROCESSING — the bank debit is in flight"), "{stdout}");
    assert!(stdout.contains("2 × recommendation_set.payment_succeeded"), "{stdout}");
    assert!(!stdout.contains(" INFO "), "logs stay out of the report: {stdout}");

    // It ends with how to look further, with ids from this run; the commands it prints work as printed.
    let demo_url = url_with_database(&server_url(), "splitpay_demo");
    assert!(stdout.contains(&format!("export DATABASE_URL={demo_url}")), "{stdout}");
    assert!(stdout.contains(" ops parked "), "{stdout}");
    assert!(
        stdout.contains("/metrics (serve)") && stdout.contains("/metrics (worker)"),
        "{stdout}"
    );
    assert!(stdout.contains("nothing serves them now"), "{stdout}");
    let shown: Vec<&str> = stdout
        .split_whitespace()
        .skip_while(|w| *w != "show")
        .skip(1)
        .filter(|w| w.starts_with("salc_") || w.starts_with("spay_"))
        .collect();
    assert_eq!(shown.len(), 2, "a parked share and the card payment: {stdout}");
    let out = splitpay(&demo_url, &["ops", "show", shown[0]]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("PARKED"));
    let out = splitpay(&demo_url, &["ops", "parked", "--json"]);
    let parked: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert!(
        parked["parked"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["split_allocation_id"] == shown[0]),
        "{parked}"
    );
}

/// `splitpay ops reconcile` (issue 7, point 9): a payment whose webhooks never came is found at Stripe and, with
/// `--now`, distributed and transferred in the foreground; the report says what was resolved. Bad usage exits 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_reconcile_resolves_what_the_webhooks_missed_in_the_foreground() {
    use splitpay::domain::plan::{AmountMode, PaymentMethodType};
    use splitpay::domain::state::{AllocationStatus, PaymentStatus};
    let flow = common::flow::Flow::start_with(AmountMode::Fixed, &[2_000, 3_000], &[], false).await;
    flow.control
        .webhook_mode(serde_json::json!({ "drop_next": 1000 }))
        .await
        .unwrap();
    let (id, _) = flow
        .pay(PaymentMethodType::Card, "pm_card_visa", Some("cm3donor1"))
        .await;
    assert_eq!(flow.payment(&id).await.payment.status, PaymentStatus::RequiresPayment);
    let ops = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_splitpay"))
            .arg("ops")
            .args(args)
            .env("DATABASE_URL", &flow.db.url)
            .env("STRIPE_SECRET_KEY", common::stripe::TEST_KEY)
            .env("STRIPE_API_BASE", flow.sim.base_url())
            .env_remove("RUST_LOG")
            .output()
            .expect("the binary runs")
    };
    // Within the card grace nothing is asked of Stripe.
    let out = ops(&["reconcile", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document on stdout");
    assert_eq!(report["pending"]["checked"], 0, "{report}");

    // `--now` ignores the graces: the payment succeeded at Stripe, so it is distributed here.
    let out = ops(&["reconcile", "--now", "--json", "--payment", id.as_str()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["pending"]["succeeded"], 1, "{report}");
    assert_eq!(report["transfers"]["distributions"], 1, "{report}");
    // The distribution made its two transfers there and then, in the foreground, not left to a worker.
    let p = flow.payment(&id).await;
    assert!(p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred));
    // Again: nothing is left to drive.
    let out = ops(&["reconcile", "--now", "--payment", id.as_str()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("reconcile-transfers"), "{table}");
    assert!(
        table.contains("transfers driven                  0  (now transferred 0)"),
        "{table}"
    );
    common::money::assert_conserved_at_stripe(&flow, &id).await;

    let out = ops(&["reconcile", "--payment", "not-an-id"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--payment"));
    flow.stop().await;
}

/// `splitpay stripe-sim --webhook-url … --webhook-secret …` (what docker compose runs) registers the endpoint at
/// start: a payment made on it arrives there, signed with that secret, with no control call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_sim_registers_its_webhook_endpoint_at_start() {
    use splitpay::config::Secret;
    use splitpay::domain::plan::PaymentMethodType;
    use splitpay::stripe::{CreatePaymentIntentParams, PaymentGateway};
    let receiver = common::stripe::Receiver::start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let secret = "whsec_cli_registered";
    let mut sim = Command::new(env!("CARGO_BIN_EXE_splitpay"))
        .args([
            "stripe-sim",
            "--port",
            &port.to_string(),
            "--webhook-url",
            &receiver.url,
        ])
        .env("SPLITPAY_SIM_WEBHOOK_SECRET", secret)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let base_url = format!("http://127.0.0.1:{port}/");
    let control = splitpay::stripe::sim::control::SimControl::new(&base_url);
    let mut up = false;
    for _ in 0..100 {
        if control.webhook_stats().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(up, "stripe-sim did not start on {port}");
    let key = splitpay::stripe::keys::StripeKey::parse(common::stripe::TEST_KEY, false).unwrap();
    let config = splitpay::stripe::GatewayConfig {
        api_base: base_url,
        ..Default::default()
    };
    let gateway = splitpay::stripe::StripeGateway::new(&key, config).unwrap();
    gateway
        .create_payment_intent(&CreatePaymentIntentParams {
            amount_cents: 1_000,
            currency: "aud".into(),
            payment_method_type: PaymentMethodType::Card,
            transfer_group: "spay_cli".into(),
            metadata: Default::default(),
            payment_method: Some("pm_card_visa".into()),
            idempotency_key: "cli-sim-webhook".into(),
        })
        .await
        .unwrap();
    receiver
        .wait_for("payment_intent.succeeded", |types| {
            types.iter().any(|t| t == "payment_intent.succeeded")
        })
        .await;
    let now = chrono::Utc::now().timestamp();
    for (signature, body) in receiver.received.lock().unwrap().iter() {
        splitpay::stripe::webhook::verify_signature(body.as_bytes(), signature.as_deref(), &[Secret::new(secret)], now)
            .expect("signed with the secret given at start");
    }
    let _ = Command::new("kill").args(["-TERM", &sim.id().to_string()]).status();
    let status = sim.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(sim.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{stderr}");
    assert!(!stderr.contains(secret), "the secret stays out of the logs: {stderr}");
}
