//! The read-only operator commands (issue 8, point 1): `splitpay ops parked`, `ops show` and `ops audit`, run as the
//! real binary against a test database and the simulator, on a payment one of whose recipients cannot receive
//! transfers.

mod common;

use std::process::{Command, Output};

use common::accounts::pay_until_settled;
use common::flow::Flow;
use serde_json::Value;
use splitpay::domain::plan::AmountMode;
use splitpay::domain::state::AllocationStatus;
use splitpay::store::records::{insert_audit, AuditEntry};

/// Runs `ops ARGS --json`, asserts exit 0, and parses stdout as one JSON document.
fn ops_json(flow: &Flow, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = flow.ops(&all);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?}: stdout is not one JSON document ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A card payment over three recipients, the second without the transfers capability: two TRANSFERRED, one PARKED.
async fn parked_flow() -> (Flow, splitpay::store::payments::SplitPayment) {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000, 3_000], &[1]).await;
    let p = pay_until_settled(&flow).await;
    let statuses: Vec<AllocationStatus> = p.allocations.iter().map(|a| a.status).collect();
    assert_eq!(
        statuses,
        [
            AllocationStatus::Transferred,
            AllocationStatus::Parked,
            AllocationStatus::Transferred
        ]
    );
    (flow, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_parked_lists_the_parked_share_with_its_amount_and_reason_and_filters_it() {
    let (flow, p) = parked_flow().await;
    let parked = &p.allocations[1];

    let report = ops_json(&flow, &["parked"]);
    let rows = report["parked"].as_array().expect("a list of parked allocations");
    assert_eq!(rows.len(), 1, "{report}");
    let row = &rows[0];
    assert_eq!(row["split_allocation_id"], parked.id.as_str());
    assert_eq!(row["split_payment_id"], p.payment.id.as_str());
    assert_eq!(row["distributor_organisation_id"], common::DISTRIBUTOR);
    assert_eq!(row["distributor_name"], "Climate Fund");
    assert_eq!(row["recipient_organisation_id"], "cm3orgrcp1");
    assert_eq!(row["recipient_name"], "Recipient 1");
    assert_eq!(row["destination_account_id"], "acct_rcp1");
    assert_eq!(row["gross_amount_cents"], 2_000);
    assert_eq!(
        row["net_amount_cents"],
        parked.net_amount_cents.expect("the fee split is written")
    );
    assert_eq!(row["currency"], "aud");
    assert_eq!(row["failure_code"], "insufficient_capabilities_for_transfer");
    assert_eq!(row["failure_message"], parked.failure_message.as_deref().unwrap());
    assert_eq!(row["attempts"], parked.attempts);
    assert_eq!(row["generation"], parked.generation);
    assert_eq!(row["generation"], 1);
    assert!(row["age_seconds"].as_i64().unwrap() >= 0, "{row}");
    assert_eq!(report["truncated"], false);

    // The table names the same allocation, its net amount in the currency and its reason.
    let out = flow.ops(&["parked"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(table.contains("parked allocations: 1"), "{table}");
    assert!(table.contains(&parked.id), "{table}");
    assert!(table.contains("insufficient_capabilities_for_transfer"), "{table}");
    let net = parked.net_amount_cents.unwrap();
    assert!(
        table.contains(&format!("{}.{:02} AUD", net / 100, net % 100)),
        "{table}"
    );

    // --organisation matches the distributor or the recipient, and nothing else.
    for (org, expected) in [
        (common::DISTRIBUTOR, 1),
        ("cm3orgrcp1", 1),
        ("cm3orgrcp0", 0),
        ("cm3nobody", 0),
    ] {
        let report = ops_json(&flow, &["parked", "--organisation", org]);
        assert_eq!(report["parked"].as_array().unwrap().len(), expected, "{org}: {report}");
    }
    // Parked moments ago: not older than an hour.
    let report = ops_json(&flow, &["parked", "--older-than", "1h"]);
    assert_eq!(report["parked"].as_array().unwrap().len(), 0, "{report}");
    let report = ops_json(&flow, &["parked", "--older-than", "1h", "--organisation", "cm3orgrcp1"]);
    assert_eq!(report["parked"].as_array().unwrap().len(), 0, "{report}");

    // Bad usage exits 2 and says what is expected.
    for bad in [
        &["parked", "--older-than", "5x"][..],
        &["parked", "--older-than", "0s"],
        &["parked", "--organisation", "no spaces"],
    ] {
        let out = flow.ops(bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{bad:?}");
    }
    let out = flow.ops(&["parked", "--older-than", "5x"]);
    assert!(stderr(&out).contains("90s, 10m, 72h or 7d"), "{}", stderr(&out));
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_show_finds_the_payment_by_any_of_its_ids_with_allocations_attempts_and_events() {
    let (flow, p) = parked_flow().await;
    let parked = &p.allocations[1];
    let delivered = &p.allocations[0];
    let transfer = delivered.stripe_transfer_id.clone().expect("a transfer id");
    let intent = p.payment.payment_intent_id.clone().expect("a PaymentIntent");
    let charge = p.payment.charge_id.clone().expect("a charge");
    let donations = splitpay::store::donations::donations_for_payment(
        &mut flow.db.pool.acquire().await.unwrap(),
        &splitpay::domain::ids::SplitPaymentId::parse(&p.payment.id).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(donations.len(), 3);

    let by: Vec<(&str, &str)> = vec![
        (p.payment.id.as_str(), "split payment"),
        (parked.id.as_str(), "split allocation"),
        (donations[1].id.as_str(), "donation"),
        (intent.as_str(), "PaymentIntent"),
        (charge.as_str(), "charge"),
        (transfer.as_str(), "transfer"),
    ];
    let mut documents = Vec::new();
    for (id, kind) in by {
        let report = ops_json(&flow, &["show", id]);
        assert_eq!(report["query"]["id"], id, "{report}");
        assert_eq!(report["query"]["kind"], kind, "{report}");
        assert_eq!(report["payment"]["id"], p.payment.id.as_str(), "{id}: {report}");
        documents.push(report);
    }
    // The same payment whatever the id: the documents differ only in the query.
    for d in &documents[1..] {
        assert_eq!(d["payment"], documents[0]["payment"]);
        assert_eq!(d["allocations"], documents[0]["allocations"]);
        assert_eq!(d["events"], documents[0]["events"]);
    }
    let report = &documents[0];
    let pay = &report["payment"];
    assert_eq!(pay["status"], "SUCCEEDED");
    assert_eq!(pay["total_amount_cents"], 6_000);
    assert_eq!(pay["payment_intent_id"], intent.as_str());
    assert_eq!(pay["charge_id"], charge.as_str());
    assert_eq!(pay["processing_fee_cents"], p.payment.processing_fee_cents.unwrap());
    assert_eq!(pay["platform_fee_cents"], p.payment.platform_fee_cents.unwrap());
    assert_eq!(pay["distributor_name"], "Climate Fund");
    assert_eq!(pay["failure_code"], Value::Null);

    let allocations = report["allocations"].as_array().unwrap();
    assert_eq!(allocations.len(), 3);
    for (a, row) in allocations.iter().zip(&p.allocations) {
        assert_eq!(a["id"], row.id.as_str());
        assert_eq!(a["status"], row.status.to_string());
        assert_eq!(a["net_amount_cents"], row.net_amount_cents.unwrap());
        assert_eq!(a["generation"], 1);
        assert_eq!(a["attempts"], row.attempts);
        let attempts = a["transfer_attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 1, "one generation: {a}");
        assert_eq!(attempts[0]["generation"], 1);
        assert_eq!(attempts[0]["amount_cents"], row.net_amount_cents.unwrap());
        assert_eq!(attempts[0]["idempotency_key"], row.idempotency_key.as_deref().unwrap());
    }
    let a = &allocations[1];
    assert_eq!(a["status"], "PARKED");
    assert_eq!(a["recipient_name"], "Recipient 1");
    assert_eq!(a["failure_code"], "insufficient_capabilities_for_transfer");
    assert_eq!(a["stripe_transfer_id"], Value::Null);
    assert_eq!(a["transfer_attempts"][0]["outcome"], "TERMINAL");
    assert_eq!(a["transfer_attempts"][0]["stripe_transfer_id"], Value::Null);
    assert_eq!(a["transfer_attempts"][0]["destination_account_id"], "acct_rcp1");
    let a = &allocations[0];
    assert_eq!(a["status"], "TRANSFERRED");
    assert_eq!(a["stripe_transfer_id"], transfer.as_str());
    assert_eq!(a["transfer_attempts"][0]["outcome"], "TRANSFERRED");
    assert_eq!(a["transfer_attempts"][0]["stripe_transfer_id"], transfer.as_str());

    let shown_donations = report["donations"].as_array().unwrap();
    assert_eq!(shown_donations.len(), 3);
    assert_eq!(shown_donations[1]["id"], donations[1].id.as_str());
    assert_eq!(
        shown_donations[1]["status"], "PENDING",
        "a parked share's donation stays PENDING"
    );
    assert_eq!(report["discrepancies"].as_array().unwrap().len(), 0);

    // Every event in this database is about this payment, and each is shown once, with its subject.
    let events = report["events"].as_array().unwrap();
    assert_eq!(
        events.len() as i64,
        common::count(&flow.db.pool, "outbox_events").await,
        "{report}"
    );
    let about = |event_type: &str, subject: &str| {
        events
            .iter()
            .filter(|e| e["event_type"] == event_type && e["subject_id"] == subject)
            .count()
    };
    assert_eq!(
        about("recommendation_set.payment_succeeded", &p.payment.id),
        1,
        "{report}"
    );
    assert_eq!(
        about("recommendation_set.distribution_failed", &parked.id),
        1,
        "{report}"
    );
    assert_eq!(
        about("recommendation_set.distribution_succeeded", &delivered.id),
        1,
        "{report}"
    );
    assert_eq!(about("donation.created", &donations[1].id), 1, "{report}");
    assert!(events.iter().all(|e| e["delivered"].is_boolean()), "{report}");
    assert_eq!(report["audit"].as_array().unwrap().len(), 0);

    // The table says the same things.
    let out = flow.ops(&["show", &parked.id]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = stdout(&out);
    for needle in [
        p.payment.id.as_str(),
        "SUCCEEDED",
        "PARKED",
        "TRANSFERRED",
        "insufficient_capabilities_for_transfer",
        transfer.as_str(),
        intent.as_str(),
        "recommendation_set.distribution_failed",
        "60.00 AUD",
    ] {
        assert!(table.contains(needle), "{needle} missing: {table}");
    }
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_show_refuses_unknown_ids_with_a_next_step_and_malformed_ones_as_bad_usage() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000], &[]).await;
    for unknown in [
        "spay_0000000000000000000000000a",
        "salc_0000000000000000000000000a",
        "don_nothere",
        "pi_nothere",
        "ch_nothere",
        "tr_nothere",
    ] {
        let out = flow.ops(&["show", unknown, "--json"]);
        assert_eq!(out.status.code(), Some(1), "{unknown}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{unknown}: nothing on stdout");
        let err = stderr(&out);
        assert!(err.contains(unknown) && err.contains("check the id"), "{err}");
        assert!(err.contains("splitpay ops parked"), "{err}");
    }
    for malformed in ["hello", "spay_", "cus_123", "spay_a b", "_x"] {
        let out = flow.ops(&["show", malformed]);
        assert_eq!(out.status.code(), Some(2), "{malformed}: {}", stderr(&out));
        assert!(stderr(&out).contains("spay_"), "{}", stderr(&out));
    }
    let out = flow.ops(&["show"]);
    assert_eq!(out.status.code(), Some(2), "a missing id is bad usage");
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_audit_lists_the_log_newest_first_and_by_target_and_show_includes_it() {
    let (flow, p) = parked_flow().await;
    let parked = &p.allocations[1];
    let mut tx = flow.db.pool.begin().await.unwrap();
    let first = insert_audit(
        &mut tx,
        &AuditEntry {
            actor: "alice".into(),
            command: "retry".into(),
            target_type: "split_allocation".into(),
            target_id: parked.id.clone(),
            reason: Some("account fixed".into()),
            details: serde_json::json!({ "result": "refused", "why": "transfers capability inactive" }),
        },
    )
    .await
    .unwrap();
    let second = insert_audit(
        &mut tx,
        &AuditEntry {
            actor: "system".into(),
            command: "reconcile".into(),
            target_type: "split_payment".into(),
            target_id: "spay_someoneelse".into(),
            reason: None,
            details: serde_json::json!({}),
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let report = ops_json(&flow, &["audit"]);
    let entries = report["entries"].as_array().unwrap();
    let ids: Vec<i64> = entries.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [second, first], "newest first: {report}");
    assert_eq!(entries[1]["actor"], "alice");
    assert_eq!(entries[1]["command"], "retry");
    assert_eq!(entries[1]["target_type"], "split_allocation");
    assert_eq!(entries[1]["target_id"], parked.id.as_str());
    assert_eq!(entries[1]["reason"], "account fixed");
    assert_eq!(entries[1]["details"]["result"], "refused");
    assert_eq!(entries[0]["reason"], Value::Null);

    let report = ops_json(&flow, &["audit", "--target", &parked.id]);
    let entries = report["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{report}");
    assert_eq!(entries[0]["id"], first);
    let report = ops_json(&flow, &["audit", "--limit", "1"]);
    assert_eq!(report["entries"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["entries"][0]["id"], second);
    let report = ops_json(&flow, &["audit", "--target", "salc_nobody"]);
    assert_eq!(report["entries"].as_array().unwrap().len(), 0, "{report}");

    // `ops show` carries the entries about the payment's ids, and only those.
    let report = ops_json(&flow, &["show", &p.payment.id]);
    let audit = report["audit"].as_array().unwrap();
    assert_eq!(audit.len(), 1, "{report}");
    assert_eq!(audit[0]["id"], first);

    let out = flow.ops(&["audit"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(table.contains("audit entries: 2"), "{table}");
    assert!(
        table.contains("alice") && table.contains(&parked.id) && table.contains("account fixed"),
        "{table}"
    );

    let out = flow.ops(&["audit", "--target", "bad id"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = flow.ops(&["audit", "--limit", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    flow.stop().await;
}

/// Each read-only command's `--help` says what it does.
#[test]
fn each_read_only_command_explains_itself() {
    for (command, says) in [
        ("parked", "parked allocations"),
        ("show", "split payment"),
        ("audit", "audit log"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_splitpay"))
            .args(["ops", command, "--help"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        let help = stdout(&out);
        assert!(help.contains(says), "{command}: {help}");
        assert!(help.contains("Changes nothing"), "{command}: {help}");
        assert!(help.contains("--json"), "{command}: {help}");
    }
}
