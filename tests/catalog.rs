//! The catalogue API over HTTP (`PUT`/`GET` organisations, recipient account links and recommendation sets,
//! `POST …/deactivate|archive`, `GET /v1/split-payments` pages) against a real PostgreSQL, the real router and the
//! simulator: each validation rule refused naming its field and writing nothing, an upsert repeated unchanged, a
//! set changed after a payment, retired sets and links refused at intake, and cursor pagination.

mod common;

use common::flow::{Flow, SERVICE_TOKEN};
use common::DISTRIBUTOR;
use serde_json::{json, Value};
use splitpay::domain::plan::AmountMode;

async fn call(flow: &Flow, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, format!("{}{path}", flow.base_url))
        .bearer_auth(SERVICE_TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let response = req.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn put(flow: &Flow, path: &str, body: Value) -> (u16, Value) {
    call(flow, reqwest::Method::PUT, path, Some(body)).await
}

async fn get(flow: &Flow, path: &str) -> (u16, Value) {
    call(flow, reqwest::Method::GET, path, None).await
}

async fn post(flow: &Flow, path: &str) -> (u16, Value) {
    call(flow, reqwest::Method::POST, path, None).await
}

/// Every catalogue row, as JSON, to compare before and after (payments move on with the worker; their amounts
/// are checked where it matters).
async fn rows(flow: &Flow) -> Value {
    let mut rows = json!({});
    for table in [
        "organisations",
        "recipient_account_links",
        "recommendation_sets",
        "recommendation_allocations",
    ] {
        // Table names come from this list, never from input.
        let (value,): (Value,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT coalesce(jsonb_agg(r ORDER BY r::text), '[]'::jsonb) FROM (SELECT * FROM {table}) r"
        )))
        .fetch_one(&flow.db.pool)
        .await
        .unwrap();
        rows[table] = value;
    }
    rows
}

fn set_body(mode: &str, allocations: Value) -> Value {
    json!({
        "organisation_id": DISTRIBUTOR,
        "name": "Climate split",
        "slug": "climate-split",
        "amount_mode": mode,
        "currency": "AUD",
        "allocations": allocations,
    })
}

fn alloc(id: &str, link: &str, amount: i64) -> Value {
    json!({ "id": id, "recipient_org_account_link_id": link, "amount_cents": amount })
}

fn link_body(distributor: &str, recipient: &str, account: &str) -> Value {
    json!({
        "distributor_organisation_id": distributor,
        "recipient_organisation_id": recipient,
        "recipient_org_name": "Someone",
        "label": "Someone main",
        "stripe_connect_account_id": account,
        "charges_enabled": true,
    })
}

fn intake_body(amounts: Value) -> Value {
    json!({
        "recommendation_set_id": "cm3rec1",
        "donor_id": "cm3donor1",
        "payment_method_type": "card",
        "payment_method": "pm_card_visa",
        "amounts": amounts,
    })
}

async fn pay(flow: &Flow) -> (u16, Value) {
    call(
        flow,
        reqwest::Method::POST,
        "/v1/split-payments",
        Some(intake_body(json!([]))),
    )
    .await
}

#[track_caller]
fn assert_refused(got: &(u16, Value), status: u16, code: &str, param: Option<&str>) {
    let (s, body) = got;
    assert_eq!(*s, status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["param"].as_str(), param, "{body}");
    assert!(
        body["error"]["request_id"].as_str().unwrap().starts_with("req_"),
        "{body}"
    );
}

#[tokio::test]
async fn each_validation_rule_is_refused_naming_the_field_and_writes_nothing() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_500], &[]).await;
    // Another distributor with a link of its own: foreign to cm3orgdist0001's sets.
    assert_eq!(
        put(&flow, "/v1/organisations/cm3orgother", json!({"name": "Other"}))
            .await
            .0,
        201
    );
    assert_eq!(
        put(
            &flow,
            "/v1/recipient-account-links/cm3lnkforeign",
            link_body("cm3orgother", "cm3orgrcp0", "acct_foreign1")
        )
        .await
        .0,
        201
    );
    let before = rows(&flow).await;
    let ok = [alloc("cm3alc0", "cm3lnk0", 1_000), alloc("cm3alc1", "cm3lnk1", 2_500)];

    let mut cases: Vec<(&str, Value, u16, &str, &str)> = Vec::new();
    for set in ["/v1/recommendation-sets/cm3rec1", "/v1/recommendation-sets/cm3rec2"] {
        cases.extend([
            // A foreign or unknown link: 400 invalid_request, as the contract says.
            (
                set,
                set_body("FIXED", json!([ok[0], alloc("cm3alc9", "cm3lnkforeign", 500)])),
                400,
                "invalid_request",
                "allocations[1].recipient_org_account_link_id",
            ),
            (
                set,
                set_body("FIXED", json!([ok[0], alloc("cm3alc9", "cm3lnknope", 500)])),
                400,
                "invalid_request",
                "allocations[1].recipient_org_account_link_id",
            ),
            // Each link at most once; each allocation id once.
            (
                set,
                set_body("FIXED", json!([ok[0], alloc("cm3alc9", "cm3lnk0", 500)])),
                400,
                "validation_failed",
                "allocations[1].recipient_org_account_link_id",
            ),
            (
                set,
                set_body("FIXED", json!([ok[0], alloc("cm3alc0", "cm3lnk1", 500)])),
                400,
                "validation_failed",
                "allocations[1].id",
            ),
            // FIXED > 0, OPEN = 0, SUGGESTED >= 0.
            (
                set,
                set_body("FIXED", json!([ok[0], alloc("cm3alc1", "cm3lnk1", 0)])),
                400,
                "validation_failed",
                "allocations[1].amount_cents",
            ),
            (
                set,
                set_body(
                    "OPEN",
                    json!([alloc("cm3alc0", "cm3lnk0", 0), alloc("cm3alc1", "cm3lnk1", 500)]),
                ),
                400,
                "validation_failed",
                "allocations[1].amount_cents",
            ),
            (
                set,
                set_body("SUGGESTED", json!([ok[0], alloc("cm3alc1", "cm3lnk1", -1)])),
                400,
                "validation_failed",
                "allocations[1].amount_cents",
            ),
            (
                set,
                set_body("FIXED", json!([])),
                400,
                "validation_failed",
                "allocations",
            ),
        ]);
        // A settlement currency only; a known mode only.
        let mut usd = set_body("FIXED", json!(ok));
        usd["currency"] = json!("USD");
        cases.push((set, usd, 400, "validation_failed", "currency"));
        let mut junk = set_body("FIXED", json!(ok));
        junk["currency"] = json!("XYZ");
        cases.push((set, junk, 400, "validation_failed", "currency"));
        let mut mode = set_body("FIXED", json!(ok));
        mode["amount_mode"] = json!("WHATEVER");
        cases.push((set, mode, 400, "validation_failed", "amount_mode"));
        // Malformed input: an unknown field, a wrong type, a contradicting id.
        let mut extra = set_body("FIXED", json!(ok));
        extra["colour"] = json!("green");
        cases.push((set, extra, 400, "invalid_request", "colour"));
        let mut typed = set_body("FIXED", json!(ok));
        typed["allocations"][0]["amount_cents"] = json!("1000");
        cases.push((set, typed, 400, "invalid_request", "allocations[0].amount_cents"));
        let mut other_id = set_body("FIXED", json!(ok));
        other_id["id"] = json!("cm3rec9");
        cases.push((set, other_id, 400, "validation_failed", "id"));
        // An unknown organisation, and another organisation's set.
        let mut org = set_body("FIXED", json!(ok));
        org["organisation_id"] = json!("cm3orgnope");
        cases.push((set, org, 400, "invalid_request", "organisation_id"));
    }
    let mut moved = set_body("FIXED", json!([alloc("cm3alc7", "cm3lnkforeign", 1_000)]));
    moved["organisation_id"] = json!("cm3orgother");
    cases.push((
        "/v1/recommendation-sets/cm3rec1",
        moved,
        409,
        "conflict",
        "organisation_id",
    ));
    // Links: an `acct_…` account, known organisations, a distributor that never changes.
    let link = "/v1/recipient-account-links/cm3lnk0";
    let new_link = "/v1/recipient-account-links/cm3lnk5";
    for path in [link, new_link] {
        cases.push((
            path,
            link_body(DISTRIBUTOR, "cm3orgrcp0", "pi_123"),
            400,
            "validation_failed",
            "stripe_connect_account_id",
        ));
        cases.push((
            path,
            link_body(DISTRIBUTOR, "cm3orgrcp0", "acct_"),
            400,
            "validation_failed",
            "stripe_connect_account_id",
        ));
        cases.push((
            path,
            link_body("cm3orgnope", "cm3orgrcp0", "acct_rcp0"),
            400,
            "invalid_request",
            "distributor_organisation_id",
        ));
        cases.push((
            path,
            link_body(DISTRIBUTOR, "cm3orgnope", "acct_rcp0"),
            400,
            "invalid_request",
            "recipient_organisation_id",
        ));
        cases.push((
            path,
            link_body(DISTRIBUTOR, DISTRIBUTOR, "acct_rcp0"),
            400,
            "validation_failed",
            "recipient_organisation_id",
        ));
    }
    cases.push((
        link,
        link_body("cm3orgother", "cm3orgrcp0", "acct_rcp0"),
        409,
        "conflict",
        "distributor_organisation_id",
    ));
    cases.push((
        "/v1/organisations/cm3orgnew",
        json!({"name": ""}),
        400,
        "validation_failed",
        "name",
    ));
    cases.push((
        "/v1/organisations/cm3orgnew",
        json!({"name": "x", "abn": 1}),
        400,
        "invalid_request",
        "abn",
    ));

    for (path, mut body, status, code, param) in cases {
        if path.ends_with("cm3rec2") {
            // A new set: allocation ids and a slug of its own (cm3alcN are cm3rec1's).
            body["slug"] = json!("second");
            for a in body["allocations"].as_array_mut().into_iter().flatten() {
                if let Some(id) = a["id"].as_str() {
                    a["id"] = json!(id.replace("cm3alc", "cm3new"));
                }
            }
        }
        let got = put(&flow, path, body.clone()).await;
        assert_refused(&got, status, code, Some(param));
        assert_eq!(rows(&flow).await, before, "PUT {path} {body} wrote something");
    }

    // No token, or not JSON: refused, nothing written.
    let response = reqwest::Client::new()
        .put(format!("{}/v1/organisations/cm3orgnew", flow.base_url))
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let response = reqwest::Client::new()
        .put(format!("{}/v1/organisations/cm3orgnew", flow.base_url))
        .bearer_auth(SERVICE_TOKEN)
        .header("content-type", "text/plain")
        .body(r#"{"name": "x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    assert_eq!(rows(&flow).await, before);
}

#[tokio::test]
async fn an_upsert_repeated_unchanged_answers_200_and_changes_nothing_and_gets_show_it() {
    let flow = Flow::start(AmountMode::Suggested, &[1_000, 0], &[]).await;
    let before = rows(&flow).await;
    // The fixture's own calls, again: 200, nothing changes (not even a link's updated_at).
    assert_eq!(
        put(
            &flow,
            &format!("/v1/organisations/{DISTRIBUTOR}"),
            json!({"name": "Climate Fund"})
        )
        .await
        .0,
        200
    );
    let (status, link) = put(
        &flow,
        "/v1/recipient-account-links/cm3lnk0",
        json!({
            "distributor_organisation_id": DISTRIBUTOR,
            "recipient_organisation_id": "cm3orgrcp0",
            "recipient_org_name": "Recipient 0",
            "label": "Recipient 0 main",
            "stripe_connect_account_id": "acct_rcp0",
            "charges_enabled": true,
        }),
    )
    .await;
    assert_eq!(status, 200, "{link}");
    let body = set_body(
        "SUGGESTED",
        json!([alloc("cm3alc0", "cm3lnk0", 1_000), alloc("cm3alc1", "cm3lnk1", 0)]),
    );
    let (status, set) = put(&flow, "/v1/recommendation-sets/cm3rec1", body.clone()).await;
    assert_eq!(status, 200, "{set}");
    assert_eq!(rows(&flow).await, before, "an unchanged upsert writes nothing");

    // GET each resource: the contract's names, plus splitpay's amount_mode and currency.
    let (status, org) = get(&flow, &format!("/v1/organisations/{DISTRIBUTOR}")).await;
    assert_eq!(status, 200);
    assert_eq!(org["data"]["name"], "Climate Fund");
    assert_eq!(
        org["data"]["recipient_org_account_link_ids"],
        json!(["cm3lnk0", "cm3lnk1"])
    );
    let (status, shown_link) = get(&flow, "/v1/recipient-account-links/cm3lnk0").await;
    assert_eq!(status, 200);
    assert_eq!(shown_link, link);
    assert_eq!(shown_link["data"]["stripe_connect_account_id"], "acct_rcp0");
    assert_eq!(shown_link["data"]["charges_enabled"], true);
    assert_eq!(shown_link["data"]["is_active"], true);
    let (status, shown) = get(&flow, "/v1/recommendation-sets/cm3rec1").await;
    assert_eq!(status, 200);
    assert_eq!(shown, set);
    let d = &shown["data"];
    assert_eq!(
        (d["amount_mode"].as_str(), d["currency"].as_str()),
        (Some("SUGGESTED"), Some("AUD"))
    );
    assert_eq!(
        (d["total_amount_cents"].as_i64(), d["allocation_count"].as_i64()),
        (Some(1_000), Some(2))
    );
    assert_eq!(d["allocations"][0]["link_label"], "Recipient 0 main");
    assert_eq!(d["allocations"][1]["recipient_org_name"], "Recipient 1");
    for path in [
        "/v1/organisations/nope",
        "/v1/recipient-account-links/nope",
        "/v1/recommendation-sets/nope",
    ] {
        assert_refused(&get(&flow, path).await, 404, "not_found", Some("id"));
    }

    // A change answers 200 and is applied; the same change again is 200 and writes nothing.
    let mut renamed = body.clone();
    renamed["name"] = json!("Climate split, April");
    let (status, changed) = put(&flow, "/v1/recommendation-sets/cm3rec1", renamed.clone()).await;
    assert_eq!(
        (status, changed["data"]["name"].as_str()),
        (200, Some("Climate split, April"))
    );
    let after = rows(&flow).await;
    assert_ne!(after, before);
    assert_eq!(put(&flow, "/v1/recommendation-sets/cm3rec1", renamed).await.0, 200);
    assert_eq!(rows(&flow).await, after);
}

#[tokio::test]
async fn a_set_changed_after_a_payment_leaves_the_payment_as_it_was() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_500, 1_500], &[]).await;
    let (status, paid) = pay(&flow).await;
    assert_eq!(status, 201, "{paid}");
    let payment_id = paid["id"].as_str().unwrap().to_owned();
    let amounts = |p: &Value| -> Vec<(String, i64)> {
        p["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["allocation_id"].as_str().unwrap().to_owned(),
                    a["amount_cents"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    let paid_amounts = amounts(&paid);

    // The platform drops cm3alc2, changes cm3alc0's amount and reorders.
    let (status, set) = put(
        &flow,
        "/v1/recommendation-sets/cm3rec1",
        set_body(
            "FIXED",
            json!([alloc("cm3alc1", "cm3lnk1", 2_500), alloc("cm3alc0", "cm3lnk0", 4_000)]),
        ),
    )
    .await;
    assert_eq!(status, 200, "{set}");
    let ids: Vec<&str> = set["data"]["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["cm3alc1", "cm3alc0"]);
    assert_eq!(set["data"]["total_amount_cents"], 6_500);

    // The payment keeps its own amounts; the dropped allocation it references is kept, marked removed.
    let (_, shown) = get(&flow, &format!("/v1/split-payments/{payment_id}")).await;
    assert_eq!(amounts(&shown), paid_amounts);
    assert_eq!(shown["total_amount_cents"], 5_000);
    let (removed,): (bool,) =
        sqlx::query_as("SELECT removed_at IS NOT NULL FROM recommendation_allocations WHERE id = 'cm3alc2'")
            .fetch_one(&flow.db.pool)
            .await
            .unwrap();
    assert!(removed, "the dropped allocation is marked removed, not deleted");

    // An allocation that payments went through keeps its link: a new recipient needs a new allocation id.
    let before = rows(&flow).await;
    let got = put(
        &flow,
        "/v1/recommendation-sets/cm3rec1",
        set_body(
            "FIXED",
            json!([alloc("cm3alc1", "cm3lnk1", 2_500), alloc("cm3alc0", "cm3lnk2", 4_000)]),
        ),
    )
    .await;
    assert_refused(
        &got,
        409,
        "conflict",
        Some("allocations[1].recipient_org_account_link_id"),
    );
    assert_eq!(rows(&flow).await, before);

    // A new payment takes the set as it is now.
    let (status, second) = pay(&flow).await;
    assert_eq!(status, 201, "{second}");
    assert_eq!(
        amounts(&second),
        [("cm3alc1".to_owned(), 2_500), ("cm3alc0".to_owned(), 4_000)]
    );

    // Naming the dropped allocation again restores it.
    let (status, set) = put(
        &flow,
        "/v1/recommendation-sets/cm3rec1",
        set_body(
            "FIXED",
            json!([alloc("cm3alc2", "cm3lnk2", 1_500), alloc("cm3alc1", "cm3lnk1", 2_500)]),
        ),
    )
    .await;
    assert_eq!(status, 200, "{set}");
    let (removed,): (Vec<String>,) = sqlx::query_as(
        "SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM recommendation_allocations WHERE removed_at IS NOT NULL",
    )
    .fetch_one(&flow.db.pool)
    .await
    .unwrap();
    assert_eq!(removed, ["cm3alc0"]);
    let (_, shown) = get(&flow, &format!("/v1/split-payments/{payment_id}")).await;
    assert_eq!(amounts(&shown), paid_amounts);
}

#[tokio::test]
async fn retired_sets_and_links_refuse_intake() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_500], &[]).await;
    let refused = |got: (u16, Value)| {
        assert_refused(&got, 400, "validation_failed", Some("recommendation_set_id"));
    };

    // A deactivated set takes no payment; deactivating again changes nothing; a PUT can reactivate it.
    let (status, set) = post(&flow, "/v1/recommendation-sets/cm3rec1/deactivate").await;
    assert_eq!((status, set["data"]["is_active"].as_bool()), (200, Some(false)));
    let before = rows(&flow).await;
    assert_eq!(post(&flow, "/v1/recommendation-sets/cm3rec1/deactivate").await.0, 200);
    assert_eq!(rows(&flow).await, before);
    refused(pay(&flow).await);
    let mut body = set_body(
        "FIXED",
        json!([alloc("cm3alc0", "cm3lnk0", 1_000), alloc("cm3alc1", "cm3lnk1", 2_500)]),
    );
    body["is_active"] = json!(true);
    assert_eq!(put(&flow, "/v1/recommendation-sets/cm3rec1", body.clone()).await.0, 200);
    assert_eq!(pay(&flow).await.0, 201);

    // A deactivated link: refused; reactivated by a PUT: paid.
    let (status, link) = post(&flow, "/v1/recipient-account-links/cm3lnk1/deactivate").await;
    assert_eq!((status, link["data"]["is_active"].as_bool()), (200, Some(false)));
    refused(pay(&flow).await);
    let mut link_put = link_body(DISTRIBUTOR, "cm3orgrcp1", "acct_rcp1");
    link_put["recipient_org_name"] = json!("Recipient 1");
    link_put["label"] = json!("Recipient 1 main");
    link_put["is_active"] = json!(true);
    assert_eq!(
        put(&flow, "/v1/recipient-account-links/cm3lnk1", link_put.clone())
            .await
            .0,
        200
    );
    assert_eq!(pay(&flow).await.0, 201);

    // An archived link: refused at intake, final for PUTs, and no set may name it.
    let (status, link) = post(&flow, "/v1/recipient-account-links/cm3lnk1/archive").await;
    assert_eq!(status, 200);
    assert!(link["data"]["archived_at"].is_string());
    refused(pay(&flow).await);
    let before = rows(&flow).await;
    assert_refused(
        &put(&flow, "/v1/recipient-account-links/cm3lnk1", link_put).await,
        409,
        "conflict",
        Some("id"),
    );
    let mut renamed = body.clone();
    renamed["name"] = json!("Renamed");
    assert_refused(
        &put(&flow, "/v1/recommendation-sets/cm3rec1", renamed).await,
        400,
        "validation_failed",
        Some("allocations[1].recipient_org_account_link_id"),
    );
    assert_eq!(rows(&flow).await, before);

    // Without the archived link the set pays again; archived, it takes nothing and refuses PUTs.
    let only_first = set_body("FIXED", json!([alloc("cm3alc0", "cm3lnk0", 1_000)]));
    assert_eq!(
        put(&flow, "/v1/recommendation-sets/cm3rec1", only_first.clone())
            .await
            .0,
        200
    );
    assert_eq!(pay(&flow).await.0, 201);
    let (status, set) = post(&flow, "/v1/recommendation-sets/cm3rec1/archive").await;
    assert_eq!(status, 200);
    assert!(set["data"]["archived_at"].is_string());
    refused(pay(&flow).await);
    let before = rows(&flow).await;
    assert_refused(
        &put(&flow, "/v1/recommendation-sets/cm3rec1", only_first).await,
        409,
        "conflict",
        Some("id"),
    );
    assert_eq!(post(&flow, "/v1/recommendation-sets/cm3rec1/archive").await.0, 200);
    assert_eq!(rows(&flow).await, before);
    for path in [
        "/v1/recommendation-sets/nope/archive",
        "/v1/recommendation-sets/nope/deactivate",
        "/v1/recipient-account-links/nope/archive",
        "/v1/recipient-account-links/nope/deactivate",
    ] {
        assert_refused(&post(&flow, path).await, 404, "not_found", Some("id"));
    }
}

#[tokio::test]
async fn split_payments_are_listed_newest_first_page_by_page() {
    // No worker: the payments stay as intake left them while they are listed.
    let flow = Flow::start_with(AmountMode::Fixed, &[1_000, 2_500], &[], false).await;
    let second_set = set_body("FIXED", json!([alloc("cm3alc9", "cm3lnk0", 700)]));
    let mut second_set = second_set;
    second_set["slug"] = json!("second");
    assert_eq!(put(&flow, "/v1/recommendation-sets/cm3rec2", second_set).await.0, 201);

    let mut first_set_ids = Vec::new();
    for i in 0..5 {
        let mut body = intake_body(json!([]));
        if i == 2 {
            body.as_object_mut().unwrap().remove("payment_method");
        }
        let (status, p) = call(&flow, reqwest::Method::POST, "/v1/split-payments", Some(body)).await;
        assert_eq!(status, 201, "{p}");
        first_set_ids.push(p["id"].as_str().unwrap().to_owned());
    }
    let mut other = intake_body(json!([]));
    other["recommendation_set_id"] = json!("cm3rec2");
    let (status, p) = call(&flow, reqwest::Method::POST, "/v1/split-payments", Some(other)).await;
    assert_eq!(status, 201, "{p}");
    let other_id = p["id"].as_str().unwrap().to_owned();

    let ids = |page: &Value| -> Vec<String> {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_owned())
            .collect()
    };
    // Everything, newest first (ids are time-ordered).
    let mut all: Vec<String> = first_set_ids.iter().cloned().chain([other_id.clone()]).collect();
    all.sort();
    all.reverse();
    let (status, page) = get(&flow, "/v1/split-payments").await;
    assert_eq!(status, 200);
    assert_eq!((ids(&page), page["has_more"].as_bool()), (all.clone(), Some(false)));

    // Pages of 2 through one set, with the cursor.
    let mut expected: Vec<String> = first_set_ids.clone();
    expected.sort();
    expected.reverse();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => "/v1/split-payments?recommendation_set_id=cm3rec1&limit=2".to_owned(),
            Some(c) => format!("/v1/split-payments?recommendation_set_id=cm3rec1&limit=2&starting_after={c}"),
        };
        let (status, page) = get(&flow, &path).await;
        assert_eq!(status, 200, "{page}");
        let got = ids(&page);
        assert!(got.len() <= 2);
        seen.extend(got.clone());
        if !page["has_more"].as_bool().unwrap() {
            break;
        }
        cursor = got.last().cloned();
    }
    assert_eq!(seen, expected);
    let (_, page) = get(&flow, "/v1/split-payments?recommendation_set_id=cm3rec2").await;
    assert_eq!(ids(&page), [other_id]);
    assert_eq!(page["data"][0]["allocations"][0]["amount_cents"], 700);

    // By status: exactly the payments in that status.
    let statuses: Vec<(String, String)> = sqlx::query_as("SELECT id, status FROM split_payments ORDER BY id DESC")
        .fetch_all(&flow.db.pool)
        .await
        .unwrap();
    let distinct: std::collections::BTreeSet<&str> = statuses.iter().map(|(_, s)| s.as_str()).collect();
    for status in distinct.iter().copied().chain(["SUCCEEDED"]) {
        let (code, page) = get(&flow, &format!("/v1/split-payments?status={status}&limit=100")).await;
        assert_eq!(code, 200, "{page}");
        let want: Vec<String> = statuses
            .iter()
            .filter(|(_, s)| s == status)
            .map(|(id, _)| id.clone())
            .collect();
        assert_eq!(ids(&page), want, "{status}");
    }

    // Bad parameters: named, refused.
    for (query, param) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=ten", "limit"),
        ("status=DONE", "status"),
        ("starting_after=cm3rec1", "starting_after"),
        ("colour=green", "colour"),
        ("limit=1&limit=2", "limit"),
    ] {
        assert_refused(
            &get(&flow, &format!("/v1/split-payments?{query}")).await,
            400,
            "invalid_request",
            Some(param),
        );
    }
}
