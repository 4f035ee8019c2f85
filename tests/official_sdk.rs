//! The simulator must answer like Stripe for Stripe's own SDKs too, not only for async-stripe: this runs
//! `splitpay stripe-sim` as a user would and drives it with Stripe's official Python SDK (tests/sdk/official_sdk.py).
//! The pinned SDK is installed from PyPI into `target/sdk-venv` the first time.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The official SDK version the simulator is checked against.
const STRIPE_PYTHON_VERSION: &str = "16.1.0";

fn venv_python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/sdk-venv");
    let python = venv.join("bin/python");
    let has_sdk = |python: &PathBuf| {
        Command::new(python)
            .args([
                "-c",
                &format!("import stripe; assert stripe.VERSION == '{STRIPE_PYTHON_VERSION}'"),
            ])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_sdk(&python) {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 is installed");
        assert!(made.success(), "could not create {}", venv.display());
        let pip = Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                &format!("stripe=={STRIPE_PYTHON_VERSION}"),
            ])
            .status()
            .expect("pip runs");
        assert!(
            pip.success(),
            "could not install stripe=={STRIPE_PYTHON_VERSION} from PyPI"
        );
    }
    python
}

#[test]
fn stripe_official_python_sdk_reads_the_simulator() {
    let python = venv_python();
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut sim = Command::new(env!("CARGO_BIN_EXE_splitpay"))
        .args(["stripe-sim", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "stripe-sim did not start listening on {port}");

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/official_sdk.py");
    let out = Command::new(python)
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}"))
        .output()
        .unwrap();

    // SIGTERM: the simulator shuts down cleanly.
    let _ = Command::new("kill").args(["-TERM", &sim.id().to_string()]).status();
    let exited = (0..100).find_map(|_| {
        std::thread::sleep(Duration::from_millis(50));
        sim.try_wait().unwrap()
    });
    if exited.is_none() {
        let _ = sim.kill();
    }

    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("official SDK: 29 checks passed"), "{stdout}");
    assert!(
        exited.is_some_and(|s| s.success()),
        "stripe-sim did not exit cleanly on SIGTERM: {exited:?}"
    );
}

/// Stripe's published example of each resource the simulator serves (vendored from fixtures3.json).
fn stripe_fixture(resource: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stripe-fixtures3-subset.json");
    let all: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    all["resources"][resource].clone()
}

/// The top-level fields of Stripe's example `resource` that `object` lacks.
fn missing_fields(resource: &str, object: &serde_json::Value) -> Vec<String> {
    let fixture = stripe_fixture(resource);
    let fields = fixture
        .as_object()
        .unwrap_or_else(|| panic!("no fixture for {resource}"));
    assert!(fields.len() > 3, "{resource}: the fixture is Stripe's whole object");
    fields
        .keys()
        .filter(|field| object.get(field.as_str()).is_none())
        .cloned()
        .collect()
}

async fn sim_post(base: &str, path: &str, body: &str) -> serde_json::Value {
    let response = reqwest::Client::new()
        .post(format!("{base}v1/{path}"))
        .bearer_auth(common::stripe::TEST_KEY)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{path}: {}", response.status());
    response.json().await.unwrap()
}

/// Parses `object` as async-stripe's type: the production client must still read every object.
fn parses_as<T: miniserde::Deserialize>(what: &str, object: &serde_json::Value) {
    if let Err(e) = miniserde::json::from_str::<T>(&object.to_string()) {
        panic!("async-stripe cannot read the simulator's {what} ({e}): {object}");
    }
}

#[tokio::test]
async fn every_simulator_object_carries_every_top_level_field_of_stripes_example() {
    let (sim, control) = common::stripe::simulator().await;
    let base = sim.base_url();
    let account = sim_post(
        &base,
        "accounts",
        "type=custom&country=AU&capabilities[transfers][requested]=true",
    )
    .await;
    let account_id = account["id"].as_str().unwrap().to_owned();
    let declined = reqwest::Client::new()
        .post(format!("{base}v1/payment_intents"))
        .bearer_auth(common::stripe::TEST_KEY)
        .form(&[
            ("amount", "1000"),
            ("currency", "aud"),
            ("payment_method", "pm_card_chargeDeclined"),
            ("confirm", "true"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(declined.status(), 402);
    let declined: serde_json::Value = declined.json().await.unwrap();
    let pi = sim_post(
        &base,
        "payment_intents",
        "amount=10000&currency=aud&payment_method=pm_card_visa&confirm=true&transfer_group=g1",
    )
    .await;
    let pi_id = pi["id"].as_str().unwrap().to_owned();
    let expanded = common::stripe::raw_get(
        &sim,
        &format!("payment_intents/{pi_id}?expand[]=latest_charge.balance_transaction"),
    )
    .await;
    let charge = expanded["latest_charge"].clone();
    let charge_id = charge["id"].as_str().unwrap().to_owned();
    let balance_transaction = charge["balance_transaction"].clone();
    let transfer = sim_post(
        &base,
        "transfers",
        &format!("amount=5000&currency=aud&destination={account_id}&source_transaction={charge_id}"),
    )
    .await;
    let transfer_id = transfer["id"].as_str().unwrap().to_owned();
    let reversal = sim_post(&base, &format!("transfers/{transfer_id}/reversals"), "amount=100").await;
    // Refunds are paid from the available balance; the card payment's own funds are still pending.
    control.top_up("aud", 500).await.unwrap();
    let refund = sim_post(
        &base,
        "refunds",
        &format!("payment_intent={pi_id}&amount=500&reason=duplicate"),
    )
    .await;
    let canceled = {
        let open = sim_post(&base, "payment_intents", "amount=1000&currency=aud").await;
        sim_post(
            &base,
            &format!("payment_intents/{}/cancel", open["id"].as_str().unwrap()),
            "cancellation_reason=abandoned",
        )
        .await
    };
    // pm_card_createDispute: the payment succeeds, then a dispute opens with its funds withdrawn.
    let disputed_pi = sim_post(
        &base,
        "payment_intents",
        "amount=2000&currency=aud&payment_method=pm_card_createDispute&confirm=true",
    )
    .await;
    let disputes = common::stripe::raw_get(
        &sim,
        &format!("disputes?payment_intent={}", disputed_pi["id"].as_str().unwrap()),
    )
    .await;
    let dispute = disputes["data"][0].clone();
    let withdrawal = dispute["balance_transactions"][0].clone();
    // A dispute opened by the control API on the first charge, then won: the funds come back.
    control.open_dispute(&charge_id).await.unwrap();
    let won = control.close_dispute(&charge_id, true).await.unwrap();
    let reinstatement = won["balance_transactions"][1].clone();
    let refund_again = common::stripe::raw_get(&sim, &format!("refunds/{}", refund["id"].as_str().unwrap())).await;
    // The transferred funds become available on the connected account, which pays some out.
    control.advance_clock(3 * 86_400).await.unwrap();
    let payout = control.payout(&account_id, "aud", 100).await.unwrap();
    control.set_transfers_capability(&account_id, "active").await.unwrap();
    let balance = common::stripe::raw_get(&sim, "balance").await;
    let events = common::stripe::raw_get(&sim, "events?limit=100").await;
    let event = events["data"][0].clone();
    let refunded_charge = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "charge.refunded")
        .map(|e| e["data"]["object"].clone())
        .unwrap();
    assert_eq!(refunded_charge["refunds"]["data"][0]["id"], refund["id"]);

    let objects = [
        ("payment_intent", pi.clone()),
        ("payment_intent", expanded.clone()),
        ("payment_intent", declined["error"]["payment_intent"].clone()),
        ("payment_intent", canceled.clone()),
        ("charge", charge.clone()),
        ("charge", refunded_charge.clone()),
        ("balance_transaction", balance_transaction.clone()),
        ("transfer", transfer.clone()),
        ("transfer_reversal", reversal.clone()),
        ("refund", refund.clone()),
        ("refund", refund_again.clone()),
        ("dispute", dispute.clone()),
        ("dispute", won.clone()),
        ("balance_transaction", withdrawal.clone()),
        ("balance_transaction", reinstatement.clone()),
        ("payout", payout.clone()),
        ("account", account.clone()),
        ("balance", balance),
        ("event", event.clone()),
    ];
    for (resource, object) in &objects {
        assert_eq!(
            missing_fields(resource, object),
            Vec::<String>::new(),
            "the simulator's {resource} lacks fields of Stripe's: {object}"
        );
    }
    // An event's object is the resource itself, every field included.
    for e in events["data"].as_array().unwrap() {
        let object = &e["data"]["object"];
        if let Some(resource) = object["object"].as_str().filter(|r| stripe_fixture(r).is_object()) {
            if object.get("deleted").is_none() {
                assert_eq!(missing_fields(resource, object), Vec::<String>::new(), "{e}");
            }
        }
    }
    // Null where splitpay has no use for it, but what it reads is right.
    assert_eq!(canceled["cancellation_reason"], "abandoned");
    assert_eq!(pi["cancellation_reason"], serde_json::Value::Null);
    assert_eq!(refund["reason"], "duplicate");
    assert_eq!(refund_again, refund, "a refund reads back as it was created");
    assert!(dispute["id"].as_str().unwrap().starts_with("dp_"), "{dispute}");
    assert_eq!(
        (
            dispute["status"].as_str(),
            dispute["amount"].as_i64(),
            dispute["reason"].as_str()
        ),
        (Some("needs_response"), Some(2_000), Some("fraudulent"))
    );
    assert_eq!(
        (
            withdrawal["type"].as_str(),
            withdrawal["amount"].as_i64(),
            withdrawal["fee"].as_i64()
        ),
        (Some("adjustment"), Some(-2_000), Some(2_500))
    );
    assert_eq!(
        (won["status"].as_str(), reinstatement["amount"].as_i64()),
        (Some("won"), Some(9_500))
    );
    assert!(transfer["destination_payment"].as_str().unwrap().starts_with("py_"));
    assert_eq!(
        declined["error"]["payment_intent"]["payment_method"],
        serde_json::Value::Null
    );

    // async-stripe, the production client, still reads every one of them.
    for (resource, object) in &objects {
        match *resource {
            "payment_intent" => parses_as::<stripe_shared::PaymentIntent>(resource, object),
            "charge" => parses_as::<stripe_shared::Charge>(resource, object),
            "balance_transaction" => parses_as::<stripe_shared::BalanceTransaction>(resource, object),
            "transfer" => parses_as::<stripe_shared::Transfer>(resource, object),
            "transfer_reversal" => parses_as::<stripe_shared::TransferReversal>(resource, object),
            "refund" => parses_as::<stripe_shared::Refund>(resource, object),
            "dispute" => parses_as::<stripe_shared::Dispute>(resource, object),
            "payout" => parses_as::<stripe_shared::Payout>(resource, object),
            "account" => parses_as::<stripe_shared::Account>(resource, object),
            _ => {}
        }
    }
    drop(control);
}
