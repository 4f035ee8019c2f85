//! Intake over HTTP (`POST /v1/split-payments`, `GET /v1/split-payments/{id}`) against a real PostgreSQL, the
//! simulator and the real job runner: every allocation mode, refusals that write nothing, Idempotency-Key, a retry
//! after Stripe was unreachable (and its refusal after 23 hours), the platform's settlement currencies and minimum
//! allocation, and the donor covering the fees.

mod common;

use common::count;
use common::flow::{Flow, SERVICE_TOKEN};
use serde_json::{json, Value};
use splitpay::domain::ids::SplitPaymentId;
use splitpay::domain::money::Currency;
use splitpay::domain::plan::AmountMode;
use splitpay::domain::state::AllocationStatus;
use splitpay::store::money_report::money_report;
use splitpay::stripe::sim::{Fault, FaultKind};
use splitpay::stripe::PaymentGateway;

async fn post(flow: &Flow, body: Value, key: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/v1/split-payments", flow.base_url))
        .bearer_auth(SERVICE_TOKEN)
        .json(&body);
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    let response = req.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

fn card(amounts: Value) -> Value {
    json!({
        "recommendation_set_id": "cm3rec1",
        "donor_id": "cm3donor1",
        "payment_method_type": "card",
        "payment_method": "pm_card_visa",
        "amounts": amounts,
    })
}

/// How many PaymentIntent creates the simulator has received.
async fn intent_creates(flow: &Flow) -> usize {
    let log = flow.control.get("requests").await.unwrap();
    log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["path"] == "/v1/payment_intents" && r["method"] == "POST")
        .count()
}

/// Every row intake writes, as JSON (outbox events without their delivery columns), to compare before and after.
async fn intake_rows(flow: &Flow) -> Value {
    let mut rows = json!({});
    for (table, columns) in [
        ("split_payments", "t.*"),
        ("split_allocations", "t.*"),
        ("donations", "t.*"),
        ("intake_requests", "t.*"),
        ("outbox_events", "t.id, t.event_type, t.payload"),
    ] {
        // Table names and columns come from this list, never from input.
        let (value,): (Value,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT coalesce(jsonb_agg(r ORDER BY r::text), '[]'::jsonb) FROM (SELECT {columns} FROM {table} t) r"
        )))
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
        rows[table] = value;
    }
    rows
}

/// Makes the seeded set `cm3rec1` one in `currency` (the fixture seeds AUD).
async fn set_currency(flow: &Flow, currency: Currency) {
    sqlx::query("UPDATE recommendation_sets SET currency = $1 WHERE id = 'cm3rec1'")
        .bind(currency.stripe_code())
        .execute(&flow.db.pool)
        .await
        .unwrap();
}

/// Nothing of a refused request exists: no payment, allocation, donation, event, or PaymentIntent.
async fn assert_nothing_written(flow: &Flow) {
    for table in [
        "split_payments",
        "split_allocations",
        "donations",
        "outbox_events",
        "intake_requests",
    ] {
        assert_eq!(count(&flow.db.pool, table).await, 0, "{table}");
    }
    let log = flow.control.get("requests").await.unwrap();
    let intents = log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["path"] == "/v1/payment_intents")
        .count();
    assert_eq!(intents, 0, "no PaymentIntent was created");
}

async fn wait_transferred(flow: &Flow, id: &str) -> splitpay::store::payments::SplitPayment {
    let id = SplitPaymentId::parse(id).unwrap();
    flow.wait_until(&id, "transfers", |p| {
        p.allocations.iter().all(|a| a.status == AllocationStatus::Transferred)
    })
    .await
}

#[tokio::test]
async fn a_fixed_set_paid_by_card_through_intake_is_distributed() {
    // The catalogue comes through the catalogue API, as the platform gives it.
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_500, 1_500], &[]).await;
    let (status, body) = post(&flow, card(json!([])), None).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        (body["total_amount_cents"].as_i64(), body["currency"].as_str()),
        (Some(5_000), Some("AUD"))
    );
    assert!(body["payment_intent_id"].as_str().unwrap().starts_with("pi_"));
    assert!(body["client_secret"].as_str().unwrap().contains("_secret_"));
    assert_eq!(body["allocations"].as_array().unwrap().len(), 3);
    let p = wait_transferred(&flow, body["id"].as_str().unwrap()).await;
    let nets: i64 = p.allocations.iter().map(|a| a.net_amount_cents.unwrap()).sum();
    assert_eq!(nets + p.payment.processing_fee_cents.unwrap(), 5_000);

    let shown: Value = reqwest::Client::new()
        .get(format!("{}/v1/split-payments/{}", flow.base_url, p.payment.id))
        .bearer_auth(SERVICE_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["status"], "SUCCEEDED");
    assert_eq!(shown["client_secret"], Value::Null, "GET never shows the client secret");
    assert!(shown["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["status"] == "TRANSFERRED" && a["stripe_transfer_id"].is_string()));
    flow.stop().await;
}

#[tokio::test]
async fn suggested_amounts_can_change_and_zero_skips_a_recipient() {
    let flow = Flow::start(AmountMode::Suggested, &[1_000, 2_000, 3_000], &[]).await;
    let amounts = json!([{ "allocation_id": "cm3alc0", "amount_cents": 1_500 }, { "allocation_id": "cm3alc1", "amount_cents": 0 }]);
    let (status, body) = post(&flow, card(amounts), None).await;
    assert_eq!(status, 201, "{body}");
    let p = wait_transferred(&flow, body["id"].as_str().unwrap()).await;
    let lines: Vec<(&str, i64)> = p
        .allocations
        .iter()
        .map(|a| (a.recommendation_allocation_id.as_str(), a.gross_amount_cents))
        .collect();
    assert_eq!(
        lines,
        vec![("cm3alc0", 1_500), ("cm3alc2", 3_000)],
        "zero skipped, the untouched pre-fill kept, set order kept"
    );
    assert_eq!(p.payment.total_amount_cents, 4_500);
    flow.stop().await;
}

#[tokio::test]
async fn open_sets_take_the_donors_amounts() {
    let flow = Flow::start(AmountMode::Open, &[0, 0], &[]).await;
    let amounts = json!([{ "allocation_id": "cm3alc1", "amount_cents": 300 }, { "allocation_id": "cm3alc0", "amount_cents": 700 }]);
    let (status, body) = post(&flow, card(amounts), None).await;
    assert_eq!(status, 201, "{body}");
    let p = wait_transferred(&flow, body["id"].as_str().unwrap()).await;
    assert_eq!(
        p.allocations.iter().map(|a| a.gross_amount_cents).collect::<Vec<_>>(),
        vec![700, 300]
    );
    flow.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_field_and_writes_nothing() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000], &[]).await;
    let with = |patch: Value| {
        let mut body = card(json!([]));
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases: Vec<(Value, u16, &str, Option<&str>)> = vec![
        (
            card(json!([{ "allocation_id": "cm3alc0", "amount_cents": 900 }])),
            400,
            "validation_failed",
            Some("amounts[0].amount_cents"),
        ),
        (
            card(json!([{ "allocation_id": "cm3alcX", "amount_cents": 100 }])),
            400,
            "validation_failed",
            Some("amounts[0].allocation_id"),
        ),
        (
            card(
                json!([{ "allocation_id": "cm3alc0", "amount_cents": 1_000 }, { "allocation_id": "cm3alc0", "amount_cents": 1_000 }]),
            ),
            400,
            "validation_failed",
            Some("amounts[1].allocation_id"),
        ),
        (
            with(json!({ "currency": "NZD" })),
            400,
            "validation_failed",
            Some("currency"),
        ),
        (
            with(json!({ "currency": "XYZ" })),
            400,
            "validation_failed",
            Some("currency"),
        ),
        (
            with(json!({ "recommendation_set_id": "cm3nope" })),
            404,
            "not_found",
            Some("recommendation_set_id"),
        ),
        (
            with(json!({ "payment_method_type": "cash" })),
            400,
            "invalid_request",
            Some("payment_method_type"),
        ),
        (
            with(json!({ "amounts": [{ "allocation_id": "cm3alc0", "amount_cents": "ten" }] })),
            400,
            "invalid_request",
            Some("amounts[0].amount_cents"),
        ),
        (with(json!({ "surprise": true })), 400, "invalid_request", None),
        (
            with(json!({ "donor_id": "has spaces" })),
            400,
            "validation_failed",
            Some("donor_id"),
        ),
    ];
    for (body, status, code, param) in cases {
        let (got, response) = post(&flow, body.clone(), None).await;
        assert_eq!(got, status, "{body} → {response}");
        assert_eq!(response["error"]["code"], code, "{body} → {response}");
        if let Some(param) = param {
            assert_eq!(response["error"]["param"], param, "{body} → {response}");
        }
        assert!(response["error"]["request_id"].as_str().unwrap().starts_with("req_"));
        assert!(!response["error"]["message"].as_str().unwrap().is_empty());
    }
    // No or a wrong token; not JSON.
    let client = reqwest::Client::new();
    let url = format!("{}/v1/split-payments", flow.base_url);
    assert_eq!(
        client.post(&url).json(&card(json!([]))).send().await.unwrap().status(),
        401
    );
    assert_eq!(
        client
            .post(&url)
            .bearer_auth("svc_wrong")
            .json(&card(json!([])))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let form = client
        .post(&url)
        .bearer_auth(SERVICE_TOKEN)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 400);

    // A deactivated link or set refuses too.
    splitpay::store::catalog::set_link_flags(&mut flow.db.pool.acquire().await.unwrap(), "cm3lnk1", None, Some(false))
        .await
        .unwrap();
    let (status, response) = post(&flow, card(json!([])), None).await;
    assert_eq!(
        (status, response["error"]["param"].as_str()),
        (400, Some("recommendation_set_id")),
        "{response}"
    );
    assert!(response["error"]["message"].as_str().unwrap().contains("cm3lnk1"));
    splitpay::store::catalog::set_recommendation_set_state(
        &mut flow.db.pool.acquire().await.unwrap(),
        "cm3rec1",
        false,
        None,
    )
    .await
    .unwrap();
    assert_eq!(post(&flow, card(json!([])), None).await.0, 400);

    assert_nothing_written(&flow).await;
    flow.stop().await;
}

#[tokio::test]
async fn the_same_idempotency_key_gives_the_same_payment_and_another_body_conflicts() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000], &[]).await;
    let (s1, first) = post(&flow, card(json!([])), Some("order-42")).await;
    let (s2, second) = post(&flow, card(json!([])), Some("order-42")).await;
    assert_eq!((s1, s2), (201, 201));
    assert_eq!(first, second, "the same response");
    let mut other = card(json!([]));
    other["donor_id"] = json!("cm3donor2");
    let (s3, conflict) = post(&flow, other, Some("order-42")).await;
    assert_eq!(
        (s3, conflict["error"]["code"].as_str()),
        (409, Some("idempotency_conflict"))
    );
    assert_eq!(count(&flow.db.pool, "split_payments").await, 1);
    wait_transferred(&flow, first["id"].as_str().unwrap()).await;
    flow.stop().await;
}

#[tokio::test]
async fn when_stripe_is_unreachable_the_same_key_resumes_the_same_payment() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000], &[]).await;
    let intents = |kind| Fault {
        kind,
        count: 1,
        path_contains: Some("/v1/payment_intents".into()),
        method: Some("POST".into()),
    };
    flow.control.fault(intents(FaultKind::LoseResponse)).await.unwrap();
    let (status, body) = post(&flow, card(json!([])), Some("order-7")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("internal_error")),
        "{body}"
    );
    // The PaymentIntent was in fact created (its response was lost); the retry finds it through the same key.
    let (status, body) = post(&flow, card(json!([])), Some("order-7")).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(count(&flow.db.pool, "split_payments").await, 1, "one payment");
    let p = wait_transferred(&flow, body["id"].as_str().unwrap()).await;
    let succeeded: Vec<_> = flow
        .events(&p.payment.id)
        .await
        .into_iter()
        .filter(|e| e["type"] == "recommendation_set.payment_succeeded")
        .collect();
    assert_eq!(succeeded.len(), 1, "one charge, one payment_succeeded");
    flow.stop().await;
}

#[tokio::test]
async fn a_donor_covering_fees_leaves_every_recipient_their_full_amount() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000], &[]).await;
    let mut body = card(json!([]));
    body["donor_covers_fees"] = json!(true);
    let (status, response) = post(&flow, body, None).await;
    assert_eq!(status, 201, "{response}");
    // The smallest total whose card fee (1.75% + 30c) leaves 3,000: 3,084 (fee 84).
    assert_eq!(response["total_amount_cents"], 3_084);
    let p = wait_transferred(&flow, response["id"].as_str().unwrap()).await;
    let nets: Vec<i64> = p.allocations.iter().map(|a| a.net_amount_cents.unwrap()).collect();
    assert!(nets[0] >= 1_000 && nets[1] >= 2_000, "{nets:?}");
    let id = SplitPaymentId::parse(&p.payment.id).unwrap();
    assert!(money_report(&mut flow.db.pool.acquire().await.unwrap(), &id)
        .await
        .unwrap()
        .is_conserved());
    flow.stop().await;
}

/// The next PaymentIntent create never reaches Stripe (the connection breaks before it is applied): intake answers
/// 503 and leaves its payment CREATED.
async fn drop_next_intent_create(flow: &Flow) {
    flow.control
        .fault(Fault {
            kind: FaultKind::DropConnection,
            count: 1,
            path_contains: Some("/v1/payment_intents".into()),
            method: Some("POST".into()),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn a_resume_more_than_23_hours_after_the_payment_was_written_is_refused_and_changes_nothing() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000], &[]).await;
    // Two payments whose PaymentIntent create never reached Stripe (the connection broke before it was applied).
    for key in ["order-old", "order-young"] {
        drop_next_intent_create(&flow).await;
        let (status, body) = post(&flow, card(json!([])), Some(key)).await;
        assert_eq!(status, 503, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains("within 23 hours"),
            "{body}"
        );
    }
    let payment_of = |key: &'static str| {
        let pool = flow.db.pool.clone();
        async move {
            let (id,): (String,) =
                sqlx::query_as("SELECT split_payment_id FROM intake_requests WHERE idempotency_key = $1")
                    .bind(key)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            id
        }
    };
    let (old, young) = (payment_of("order-old").await, payment_of("order-young").await);
    // Time passes, as the database sees it: exactly 23 hours for one, a little less for the other.
    for (id, age) in [(&old, "23 hours"), (&young, "22 hours 50 minutes")] {
        sqlx::query("UPDATE split_payments SET created_at = now() - $2::interval WHERE id = $1")
            .bind(id)
            .bind(age)
            .execute(&flow.db.pool)
            .await
            .unwrap();
    }

    let (rows_before, intents_before) = (intake_rows(&flow).await, intent_creates(&flow).await);
    for _ in 0..2 {
        let (status, body) = post(&flow, card(json!([])), Some("order-old")).await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "conflict", "{body}");
        assert_eq!(body["error"]["param"], "Idempotency-Key", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(old.as_str()) && message.contains("new payment with a new Idempotency-Key"),
            "{message}"
        );
        assert!(body["error"]["request_id"].as_str().unwrap().starts_with("req_"));
    }
    assert_eq!(intake_rows(&flow).await, rows_before, "the refusals wrote nothing");
    assert_eq!(intent_creates(&flow).await, intents_before, "and did not call Stripe");

    // Under 23 hours the same kind of retry still resumes its payment.
    let (status, body) = post(&flow, card(json!([])), Some("order-young")).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["id"], young.as_str());
    assert_eq!(intent_creates(&flow).await, intents_before + 1);
    wait_transferred(&flow, &young).await;
    assert_eq!(count(&flow.db.pool, "split_payments").await, 2);
    flow.stop().await;
}

#[tokio::test]
async fn a_currency_the_platform_does_not_settle_in_is_refused_and_writes_nothing() {
    // The default settlement currencies: AUD only.
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000], &[]).await;
    set_currency(&flow, Currency::Usd).await;
    let with = |patch: Value| {
        let mut body = card(json!([]));
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases = [
        // The currency comes from the set: no currency the donor could send would make it payable.
        (card(json!([])), "recommendation_set_id"),
        (with(json!({ "currency": "USD" })), "currency"),
        (
            with(json!({ "currency": "usd", "donor_covers_fees": true })),
            "currency",
        ),
        // Refused for its currency before the method's own currency rule (BECS is AUD only) is looked at.
        (
            with(json!({ "payment_method_type": "au_becs_debit" })),
            "recommendation_set_id",
        ),
    ];
    for (body, param) in cases {
        let (status, response) = post(&flow, body.clone(), Some("usd-order")).await;
        assert_eq!(status, 422, "{body} → {response}");
        assert_eq!(response["error"]["code"], "validation_failed", "{response}");
        assert_eq!(response["error"]["param"], param, "{body} → {response}");
        let message = response["error"]["message"].as_str().unwrap();
        assert!(message.contains("USD") && message.contains("AUD"), "{message}");
    }
    // A request currency that is not its set's is still a mismatch (400), whatever the platform settles in.
    let (status, response) = post(&flow, with(json!({ "currency": "AUD" })), None).await;
    assert_eq!(
        (status, response["error"]["param"].as_str()),
        (400, Some("currency")),
        "{response}"
    );
    assert_nothing_written(&flow).await;
    flow.stop().await;
}

#[tokio::test]
async fn a_platform_that_settles_usd_takes_a_usd_payment_and_distributes_it_in_usd() {
    let flow = Flow::start_full(AmountMode::Fixed, &[1_000, 2_000], &[], true, |settings| {
        settings.plan_limits.settlement_currencies = vec![Currency::Aud, Currency::Usd];
    })
    .await;
    set_currency(&flow, Currency::Usd).await;
    let mut body = card(json!([]));
    body["currency"] = json!("usd");
    let (status, response) = post(&flow, body, None).await;
    assert_eq!(status, 201, "{response}");
    assert_eq!(
        (response["currency"].as_str(), response["total_amount_cents"].as_i64()),
        (Some("USD"), Some(3_000))
    );
    let intent = flow
        .gateway
        .retrieve_payment_intent(response["payment_intent_id"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!((intent.currency.as_str(), intent.amount_cents), ("usd", 3_000));
    let p = wait_transferred(&flow, response["id"].as_str().unwrap()).await;
    let transfers = flow.gateway.list_transfers(&p.payment.transfer_group).await.unwrap();
    assert_eq!(transfers.len(), 2);
    assert!(transfers.iter().all(|t| t.currency == "usd"), "{transfers:?}");
    flow.stop().await;
}

#[tokio::test]
async fn a_donor_amount_below_the_minimum_is_refused_but_the_minimum_and_zero_are_fine() {
    let flow = Flow::start(AmountMode::Suggested, &[1_000, 2_000, 3_000], &[]).await;
    let cases = [
        (
            json!([{ "allocation_id": "cm3alc0", "amount_cents": 0 }, { "allocation_id": "cm3alc1", "amount_cents": 99 }]),
            "amounts[1].amount_cents",
        ),
        (
            json!([{ "allocation_id": "cm3alc2", "amount_cents": 1 }]),
            "amounts[0].amount_cents",
        ),
    ];
    for (amounts, param) in cases {
        for covers_fees in [false, true] {
            // The minimum applies to what the donor asked, before any gross-up for fees.
            let mut body = card(amounts.clone());
            body["donor_covers_fees"] = json!(covers_fees);
            let (status, response) = post(&flow, body, Some("small-gift")).await;
            assert_eq!(status, 400, "{amounts} → {response}");
            assert_eq!(response["error"]["code"], "validation_failed", "{response}");
            assert_eq!(response["error"]["param"], param, "{amounts} → {response}");
            assert!(
                response["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("minimum allocation is 100"),
                "{response}"
            );
        }
    }
    assert_nothing_written(&flow).await;

    // Exactly the minimum is accepted, and zero still skips a recipient.
    let amounts =
        json!([{ "allocation_id": "cm3alc0", "amount_cents": 0 }, { "allocation_id": "cm3alc1", "amount_cents": 100 }]);
    let (status, response) = post(&flow, card(amounts), None).await;
    assert_eq!(status, 201, "{response}");
    let p = wait_transferred(&flow, response["id"].as_str().unwrap()).await;
    let lines: Vec<(&str, i64)> = p
        .allocations
        .iter()
        .map(|a| (a.recommendation_allocation_id.as_str(), a.gross_amount_cents))
        .collect();
    assert_eq!(lines, vec![("cm3alc1", 100), ("cm3alc2", 3_000)]);
    flow.stop().await;
}

#[tokio::test]
async fn a_fixed_set_with_an_allocation_below_the_minimum_cannot_be_paid() {
    // A set written under an older, lower minimum: the catalogue API would refuse it today.
    let flow = Flow::start_with_stored_catalogue(AmountMode::Fixed, &[1_000, 50]).await;
    let echoed = json!([{ "allocation_id": "cm3alc0", "amount_cents": 1_000 }, { "allocation_id": "cm3alc1", "amount_cents": 50 }]);
    for amounts in [json!([]), echoed] {
        let (status, response) = post(&flow, card(amounts.clone()), None).await;
        assert_eq!(status, 400, "{amounts} → {response}");
        assert_eq!(response["error"]["code"], "validation_failed", "{response}");
        // Only the set can change a FIXED amount, so the set is named, and the message names the allocation.
        assert_eq!(response["error"]["param"], "recommendation_set_id", "{response}");
        let message = response["error"]["message"].as_str().unwrap();
        assert!(message.contains("'cm3alc1'") && message.contains("FIXED"), "{message}");
    }
    assert_nothing_written(&flow).await;
    flow.stop().await;
}

/// A donor's client keeps retrying an intake whose PaymentIntent create never reached Stripe, while reconcile-pending
/// (past the card grace) closes the payment: it replays the create *unconfirmed* under the same key and cancels it.
/// The client's retry, with the payment method, meets Stripe's `idempotency_error` under that key. Found by the chaos
/// test in CI: the retry was answered 503 ("retry within 23 hours") for ever. Now: while the reconciler is closing
/// the payment the retry is a 503 that charges nothing; once the payment is FAILED the retry gets it, 201 and
/// `intake_abandoned`, stored for the key. The reconciler's replay is canceled before anything is recorded, so a
/// crash (here: the cancel never reaching Stripe) leaves the payment CREATED for the next tick, never waiting out
/// `abandon_after` with a live PaymentIntent.
#[tokio::test]
async fn a_retry_after_the_reconciler_closed_an_abandoned_intake_is_answered_with_the_failed_payment() {
    use splitpay::domain::state::PaymentStatus;
    use splitpay::jobs::reconcile::{reconcile_pending, ReconcileOptions};
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000], &[]).await;
    drop_next_intent_create(&flow).await;
    let (status, body) = post(&flow, card(json!([])), Some("order-late")).await;
    assert_eq!(status, 503, "{body}");
    let (raw,): (String,) =
        sqlx::query_as("SELECT split_payment_id FROM intake_requests WHERE idempotency_key = 'order-late'")
            .fetch_one(&flow.db.pool)
            .await
            .unwrap();
    let id = SplitPaymentId::parse(&raw).unwrap();
    sqlx::query("UPDATE split_payments SET created_at = now() - interval '11 minutes' WHERE id = $1")
        .bind(id.as_str())
        .execute(&flow.db.pool)
        .await
        .unwrap();

    // The reconciler's replay reaches Stripe; its cancel never does (as if it were killed in between).
    flow.control
        .fault(Fault {
            kind: FaultKind::DropConnection,
            count: 100_000,
            path_contains: Some("/cancel".into()),
            method: Some("POST".into()),
        })
        .await
        .unwrap();
    let only_this = ReconcileOptions {
        ignore_graces: true,
        payment: Some(id.clone()),
        ..ReconcileOptions::default()
    };
    let report = reconcile_pending(&flow.ctx, &only_this).await.unwrap();
    assert_eq!((report.errors, report.intake_abandoned), (1, 0), "{report:?}");
    let p = flow.payment(&id).await;
    assert_eq!(
        p.payment.status,
        PaymentStatus::Created,
        "nothing recorded before the cancel"
    );
    assert_eq!(p.payment.payment_intent_id, None);

    // The client's retry meets the reconciler's key: a 503 that charges nothing and writes no answer.
    let (status, body) = post(&flow, card(json!([])), Some("order-late")).await;
    assert_eq!(status, 503, "{body}");
    let (answered,): (bool,) =
        sqlx::query_as("SELECT response_status IS NOT NULL FROM intake_requests WHERE idempotency_key = 'order-late'")
            .fetch_one(&flow.db.pool)
            .await
            .unwrap();
    assert!(!answered, "no answer stored while the payment is being closed");
    assert_eq!(flow.payment(&id).await.payment.status, PaymentStatus::Created);

    // The next tick replays the same create (the same PaymentIntent), cancels it and fails the payment.
    flow.control.clear_faults().await.unwrap();
    let report = reconcile_pending(&flow.ctx, &only_this).await.unwrap();
    assert_eq!((report.errors, report.intake_abandoned), (0, 1), "{report:?}");
    let p = flow.payment(&id).await;
    assert_eq!(
        (p.payment.status, p.payment.failure_code.as_deref()),
        (PaymentStatus::Failed, Some("intake_abandoned"))
    );
    let pi = p
        .payment
        .payment_intent_id
        .clone()
        .expect("the failure names the PaymentIntent");
    let intent = flow.gateway.retrieve_payment_intent(&pi).await.unwrap();
    assert_eq!(intent.status, splitpay::stripe::IntentStatus::Canceled);
    assert!(intent.latest_charge.is_none(), "the donor was never charged");

    // The client's retries now get the payment as it ended, the same answer each time.
    let (status, first) = post(&flow, card(json!([])), Some("order-late")).await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(
        (
            first["id"].as_str(),
            first["status"].as_str(),
            first["failure_code"].as_str()
        ),
        (Some(id.as_str()), Some("FAILED"), Some("intake_abandoned")),
        "{first}"
    );
    assert_eq!(first["payment_intent_id"], pi.as_str());
    assert_eq!(first["client_secret"], Value::Null);
    let (status, again) = post(&flow, card(json!([])), Some("order-late")).await;
    assert_eq!((status, &again), (201, &first));
    assert_eq!(count(&flow.db.pool, "split_payments").await, 1);
    // One PaymentIntent ever made for the payment: every create (the dropped one, the replays, the retries) carried
    // the same key.
    let log = flow.control.get("requests").await.unwrap();
    let keys: std::collections::BTreeSet<String> = log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["path"] == "/v1/payment_intents" && r["method"] == "POST")
        .map(|r| r["idempotency_key"].as_str().unwrap_or("none").to_owned())
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(flow.count_events("donation.failed").await, 2);
    flow.stop().await;
}
