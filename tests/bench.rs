//! `splitpay bench` checks itself: tiny runs end to end (the binary, its `serve` and `worker` children, the
//! simulator, a fresh database) must report a correct run with the right counts, and its correctness check must
//! catch a transfer made twice or for the wrong amount. No timing is asserted: the bench prints figures.

mod common;

use common::flow::Flow;
use splitpay::bench::check::{sim_transfers, verify, SimTransfer};
use splitpay::domain::plan::{AmountMode, PaymentMethodType};
use splitpay::domain::state::AllocationStatus;
use splitpay::stripe::{CreateTransferParams, PaymentGateway};

fn bench(args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_splitpay"))
        .arg("bench")
        .args(args)
        .env("DATABASE_URL", common::db::server_url())
        .env_remove("RUST_LOG")
        .env_remove("SPLITPAY_WORKER_CONCURRENCY")
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.success(), format!("{stdout}\n--- stderr ---\n{stderr}"))
}

/// The `charged C = transferred T + fees F cents` line, parsed.
fn money_line(out: &str) -> (i64, i64, i64) {
    let line = out
        .lines()
        .find(|l| l.contains("charged "))
        .unwrap_or_else(|| panic!("no money line in:\n{out}"));
    let numbers: Vec<i64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let n = numbers.len();
    (numbers[n - 3], numbers[n - 2], numbers[n - 1])
}

#[tokio::test]
async fn a_burn_down_run_is_checked_correct_and_its_money_adds_up() {
    let (ok, out) = bench(&[
        "--mode",
        "burn-down",
        "--payments",
        "12",
        "--recipients",
        "3",
        "--intake-clients",
        "4",
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("check: 12 payments, 36 allocations, 36 transfers at Stripe"),
        "{out}"
    );
    assert!(out.contains("check: OK"), "{out}");
    assert!(out.contains("transfers: 36 in"), "{out}");
    assert!(out.contains("intake: 12 payments in"), "{out}");
    assert!(out.contains("transactions"), "{out}");
    let (charged, transferred, fees) = money_line(&out);
    // Each payment is 10 + 20 + 30 AUD.
    assert_eq!(charged, 12 * 6_000, "{out}");
    assert_eq!(transferred + fees, charged, "{out}");
    assert!(fees > 0, "the simulator charges a processing fee: {out}");
}

#[tokio::test]
async fn an_idle_run_reports_latencies_and_is_checked_correct() {
    let (ok, out) = bench(&["--mode", "idle", "--payments", "3", "--recipients", "2"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("check: 3 payments, 6 allocations, 6 transfers at Stripe"),
        "{out}"
    );
    assert!(
        out.contains("payment succeeded -> last transfer recorded:  p50"),
        "{out}"
    );
    let (charged, transferred, fees) = money_line(&out);
    assert_eq!(charged, 3 * 3_000, "{out}");
    assert_eq!(transferred + fees, charged, "{out}");
}

#[tokio::test]
async fn bad_arguments_are_refused_naming_the_flag() {
    let (ok, out) = bench(&["--sim-latency-ms", "5-2", "--payments", "1"]);
    assert!(!ok, "{out}");
    assert!(out.contains("--sim-latency-ms"), "{out}");
}

#[tokio::test]
async fn the_check_catches_a_second_transfer_a_wrong_amount_and_an_event_not_told() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000], &[]).await;
    let (id, _) = flow.pay(PaymentMethodType::Card, "pm_card_visa", None).await;
    let p = flow
        .wait_until(&id, "both transfers", |p| {
            p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
        })
        .await;
    let ids = vec![id.to_string()];
    let base = flow.sim.base_url();
    let key = common::stripe::TEST_KEY;

    let transfers = sim_transfers(&base, key).await.unwrap();
    let report = verify(&flow.db.pool, &ids, &transfers).await.unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!((report.allocations, report.transfers_at_stripe), (2, 2));
    let net: i64 = p.allocations.iter().map(|a| a.net_amount_cents.unwrap()).sum();
    assert_eq!(report.transferred_cents, net);
    assert_eq!(report.charged_cents, 3_000);
    assert_eq!(report.transferred_cents + report.fees_cents, 3_000);

    // A wrong amount recorded for one transfer (as a buggy run would have sent it) is caught.
    let mut tampered: Vec<SimTransfer> = transfers.clone();
    tampered[0].amount_cents += 1;
    let report = verify(&flow.db.pool, &ids, &tampered).await.unwrap();
    assert!(
        report.problems.iter().any(|p| p.contains("cents, the net share is")),
        "{:?}",
        report.problems
    );

    // An event the organisation was not told (one share's distribution_succeeded written as something else), events
    // addressed to an organisation that does not exist (the outbox has no foreign key to organisations), and a share
    // announced twice while another is not, are caught.
    let caught_after = async |sql: &'static str, problem: &str| {
        let share = &p.allocations[1].id;
        let changed = sqlx::query(sql).bind(share).execute(&flow.db.pool).await.unwrap();
        assert_eq!(changed.rows_affected(), 1);
        let report = verify(&flow.db.pool, &ids, &transfers).await.unwrap();
        assert!(
            report.problems.iter().any(|p| p.contains(problem)),
            "{problem}: {:?}",
            report.problems
        );
    };
    caught_after(
        "UPDATE outbox_events SET event_type = 'recommendation_set.distribution_failed',
                payload = jsonb_set(payload, '{type}', '\"recommendation_set.distribution_failed\"')
          WHERE payload -> 'data' ->> 'split_allocation_id' = $1",
        "1 distribution_succeeded events naming 1 of its 2 shares",
    )
    .await;
    caught_after(
        "UPDATE outbox_events SET event_type = 'recommendation_set.distribution_succeeded', organisation_id = 'org_gone',
                payload = jsonb_set(jsonb_set(payload, '{type}', '\"recommendation_set.distribution_succeeded\"'),
                                    '{organisation_id}', '\"org_gone\"')
          WHERE payload -> 'data' ->> 'split_allocation_id' = $1",
        "1 not addressed to the payment's organisation",
    )
    .await;
    // One share announced twice and the other never.
    caught_after(
        "UPDATE outbox_events SET payload = jsonb_set(payload, '{data,split_allocation_id}',
                    (SELECT to_jsonb(a.id) FROM split_allocations a
                      WHERE a.split_payment_id = payload -> 'data' ->> 'split_payment_id' AND a.id <> $1))
          WHERE payload -> 'data' ->> 'split_allocation_id' = $1",
        "2 distribution_succeeded events naming 1 of its 2 shares",
    )
    .await;
    // A donation's event addressed to an organisation that does not exist.
    caught_after(
        "INSERT INTO outbox_events (id, dedup_key, event_type, organisation_id, occurred_at, payload)
         SELECT 'oevt_tampered', 'tampered', 'donation.succeeded', 'org_gone', now(),
                jsonb_build_object('type', 'donation.succeeded', 'occurred_at', now(), 'organisation_id', 'org_gone',
                                   'data', jsonb_build_object('id', d.id))
           FROM donations d WHERE d.split_allocation_id = $1",
        "1 donation events not addressed to their donation's organisation",
    )
    .await;

    // A second real transfer for the first allocation (another key, same metadata; from the platform's balance, as
    // the charge is spent) is caught as paying twice.
    flow.control.top_up("aud", 10_000).await.unwrap();
    let first = &p.allocations[0];
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert("split_allocation_id".to_owned(), first.id.clone());
    metadata.insert("generation".to_owned(), "2".to_owned());
    flow.gateway
        .create_transfer(&CreateTransferParams {
            destination: "acct_rcp0".into(),
            amount_cents: first.net_amount_cents.unwrap(),
            currency: "aud".into(),
            source_transaction: None,
            transfer_group: id.to_string(),
            metadata,
            idempotency_key: format!("bench-test-second:{}", first.id),
        })
        .await
        .unwrap();
    let transfers = sim_transfers(&base, key).await.unwrap();
    let report = verify(&flow.db.pool, &ids, &transfers).await.unwrap();
    assert_eq!(report.transfers_at_stripe, 3);
    assert!(
        report.problems.iter().any(|p| p.contains("paid more than once")),
        "{:?}",
        report.problems
    );
    flow.stop().await;
}
