//! Outbound webhooks (issue 9, points 1–3): endpoints through `splitpay ops endpoints`, and delivery from the outbox
//! to a real local HTTP receiver, signed per Standard Webhooks.

mod common;

use std::process::{Command, Output};

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
