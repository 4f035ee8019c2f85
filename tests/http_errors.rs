//! Every error splitpay's API answers is the contract's `ErrorEnvelope`, including the ones axum would write as plain
//! text (a body over the limit, an unknown route, a wrong method, a path parameter that does not decode), and a
//! refusal writes nothing. Against the real router over real HTTP, a real PostgreSQL and the Stripe simulator; then
//! ~200 mutations of a payable intake request.

mod common;

use common::count;
use common::flow::{Flow, SERVICE_TOKEN};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Method;
use serde_json::{json, Value};
use splitpay::domain::plan::AmountMode;
use splitpay::http::BODY_BYTES_MAX;

const CONTRACT: &str = include_str!("../contract/together-openapi.json");

/// A payable intake body for the flow's FIXED set.
fn payable() -> Value {
    json!({
        "recommendation_set_id": "cm3rec1",
        "donor_id": "cm3donor1",
        "payment_method_type": "card",
        "payment_method": "pm_card_visa",
        "amounts": [],
    })
}

/// Checks `value` against `schema`, the subset of JSON Schema the contract's `ErrorEnvelope` uses (type, properties,
/// required, enum); in addition no property the schema does not name. Returns what is wrong.
fn violations(value: &Value, schema: &Value, at: &str) -> Vec<String> {
    let mut wrong = Vec::new();
    let ty = match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    if let Some(expected) = schema["type"].as_str() {
        if expected != ty && !(expected == "number" && ty == "integer") {
            wrong.push(format!("{at}: {ty}, not {expected}"));
            return wrong;
        }
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            wrong.push(format!("{at}: {value} not in {allowed:?}"));
        }
    }
    if let (Some(object), Some(properties)) = (value.as_object(), schema["properties"].as_object()) {
        for required in schema["required"].as_array().into_iter().flatten() {
            if !object.contains_key(required.as_str().unwrap()) {
                wrong.push(format!("{at}.{required}: missing"));
            }
        }
        for (name, field) in object {
            match properties.get(name) {
                Some(field_schema) => wrong.extend(violations(field, field_schema, &format!("{at}.{name}"))),
                None => wrong.push(format!("{at}.{name}: not in the contract")),
            }
        }
    }
    wrong
}

/// A response's status, content type and body, asserted to be the contract's envelope unless it is a HEAD
/// response (which has no body). Returns the status and the envelope.
async fn envelope_of(response: reqwest::Response, what: &str, head: bool) -> (u16, Value) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let request_id_header = response
        .headers()
        .get("request-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    assert!((400..500).contains(&status), "{what}: {status} {text}");
    assert_eq!(content_type.as_deref(), Some("application/json"), "{what}: {text}");
    if head {
        return (status, Value::Null);
    }
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"));
    let contract: Value = serde_json::from_str(CONTRACT).unwrap();
    let schema = &contract["components"]["schemas"]["ErrorEnvelope"];
    assert!(schema.is_object(), "the contract has an ErrorEnvelope");
    let wrong = violations(&body, schema, "");
    assert!(wrong.is_empty(), "{what}: {body} is not an ErrorEnvelope: {wrong:?}");
    let request_id = body["error"]["request_id"].as_str().unwrap();
    assert!(request_id.starts_with("req_"), "{what}: {body}");
    assert_eq!(request_id_header.as_deref(), Some(request_id), "{what}");
    assert!(!body["error"]["message"].as_str().unwrap().is_empty(), "{what}");
    (status, body)
}

/// Nothing of a refused request exists: no payment, allocation, donation, intake request or event, and the
/// simulator got no PaymentIntent request.
async fn assert_nothing_written(flow: &Flow) {
    for table in [
        "split_payments",
        "split_allocations",
        "donations",
        "intake_requests",
        "outbox_events",
        "stripe_events",
    ] {
        assert_eq!(count(&flow.db.pool, table).await, 0, "{table}");
    }
    let log = flow.control.get("requests").await.unwrap();
    let intents = log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["path"].as_str().unwrap().starts_with("/v1/payment_intents"))
        .count();
    assert_eq!(intents, 0, "no PaymentIntent request reached Stripe");
}

struct Case {
    what: &'static str,
    method: Method,
    path: String,
    headers: Vec<(&'static str, HeaderValue)>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
    param: Option<&'static str>,
}

fn intake(what: &'static str, headers: Vec<(&'static str, HeaderValue)>, body: Vec<u8>) -> Case {
    Case {
        what,
        method: Method::POST,
        path: "/v1/split-payments".into(),
        headers,
        body,
        status: 400,
        code: "invalid_request",
        param: None,
    }
}

fn auth() -> (&'static str, HeaderValue) {
    (
        "authorization",
        HeaderValue::from_str(&format!("Bearer {SERVICE_TOKEN}")).unwrap(),
    )
}

fn json_type() -> (&'static str, HeaderValue) {
    ("content-type", HeaderValue::from_static("application/json"))
}

async fn send(
    client: &reqwest::Client,
    base: &str,
    method: Method,
    path: &str,
    headers: HeaderMap,
    body: Vec<u8>,
) -> reqwest::Response {
    client
        .request(method, format!("{base}{path}"))
        .headers(headers)
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn framework_refusals_answer_in_the_envelope_and_write_nothing() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000], &[]).await;
    let client = reqwest::Client::new();
    let body = serde_json::to_vec(&payable()).unwrap();
    let over_limit = {
        let mut b = body.clone();
        b.extend(std::iter::repeat_n(b' ', BODY_BYTES_MAX));
        b
    };
    let mut cases = vec![
        Case {
            status: 413,
            ..intake("a body over the limit", vec![auth(), json_type()], over_limit.clone())
        },
        Case {
            status: 413,
            path: "/stripe/webhooks".into(),
            ..intake("a webhook body over the limit", vec![json_type()], over_limit)
        },
        Case {
            method: Method::GET,
            path: "/nowhere".into(),
            status: 404,
            code: "not_found",
            ..intake("an unknown route", vec![auth()], vec![])
        },
        Case {
            path: "/v1/split-payments/extra/segments".into(),
            status: 404,
            code: "not_found",
            ..intake(
                "an unknown route under a known one",
                vec![auth(), json_type()],
                body.clone(),
            )
        },
        Case {
            method: Method::DELETE,
            status: 405,
            code: "method_not_allowed",
            ..intake("a wrong method", vec![auth(), json_type()], body.clone())
        },
        Case {
            method: Method::PUT,
            path: "/stripe/webhooks".into(),
            status: 405,
            code: "method_not_allowed",
            ..intake("a wrong method on the webhook", vec![json_type()], body.clone())
        },
        Case {
            method: Method::from_bytes(b"BREW").unwrap(),
            path: "/v1/split-payments/spay_x".into(),
            status: 405,
            code: "method_not_allowed",
            ..intake("an unknown method", vec![auth()], vec![])
        },
        intake(
            "a wrong Content-Type",
            vec![auth(), ("content-type", HeaderValue::from_static("text/plain"))],
            body.clone(),
        ),
        intake("no Content-Type", vec![auth()], body.clone()),
        intake(
            "a Content-Type that is not UTF-8",
            vec![
                auth(),
                (
                    "content-type",
                    HeaderValue::from_bytes(b"application/json\xff").unwrap(),
                ),
            ],
            body.clone(),
        ),
        Case {
            param: Some("Idempotency-Key"),
            ..intake(
                "an Idempotency-Key that is not UTF-8",
                vec![
                    auth(),
                    json_type(),
                    ("idempotency-key", HeaderValue::from_bytes(b"order-\xe9").unwrap()),
                ],
                body.clone(),
            )
        },
        Case {
            param: Some("Idempotency-Key"),
            ..intake(
                "an oversized Idempotency-Key",
                vec![
                    auth(),
                    json_type(),
                    ("idempotency-key", HeaderValue::from_str(&"k".repeat(256)).unwrap()),
                ],
                body.clone(),
            )
        },
        Case {
            param: Some("Idempotency-Key"),
            ..intake(
                "an empty Idempotency-Key",
                vec![auth(), json_type(), ("idempotency-key", HeaderValue::from_static(""))],
                body.clone(),
            )
        },
        Case {
            status: 401,
            code: "unauthorized",
            ..intake(
                "a malformed Authorization",
                vec![("authorization", HeaderValue::from_static("Bearer")), json_type()],
                body.clone(),
            )
        },
        Case {
            status: 401,
            code: "unauthorized",
            ..intake(
                "an Authorization that is not UTF-8",
                vec![
                    ("authorization", HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap()),
                    json_type(),
                ],
                body.clone(),
            )
        },
        Case {
            status: 401,
            code: "unauthorized",
            ..intake(
                "another scheme",
                vec![
                    ("authorization", HeaderValue::from_static("Basic c3ZjOng=")),
                    json_type(),
                ],
                body.clone(),
            )
        },
        intake(
            "JSON that does not parse",
            vec![auth(), json_type()],
            b"{\"recommendation_set_id\": ".to_vec(),
        ),
        intake("an empty body", vec![auth(), json_type()], vec![]),
        intake(
            "a body that is not UTF-8",
            vec![auth(), json_type()],
            b"{\"donor_id\": \"\xff\"}".to_vec(),
        ),
        Case {
            method: Method::GET,
            path: "/v1/split-payments/%FF%FE".into(),
            ..intake("a path parameter that does not decode", vec![auth()], vec![])
        },
        Case {
            method: Method::GET,
            path: "/v1/split-payments/not-an-id".into(),
            status: 404,
            code: "not_found",
            param: Some("id"),
            ..intake("a path parameter that is not an id", vec![auth()], vec![])
        },
        Case {
            path: "/stripe/webhooks".into(),
            ..intake(
                "a webhook without a valid signature",
                vec![json_type(), ("stripe-signature", HeaderValue::from_static("t=1,v1=00"))],
                br#"{"id":"evt_1","type":"payment_intent.succeeded"}"#.to_vec(),
            )
        },
    ];
    for case in cases.drain(..) {
        let mut headers = HeaderMap::new();
        for (name, value) in case.headers {
            headers.append(HeaderName::from_static(name), value);
        }
        let response = send(&client, &flow.base_url, case.method, &case.path, headers, case.body).await;
        let allow = response.headers().get("allow").map(|v| v.to_str().unwrap().to_owned());
        let (status, envelope) = envelope_of(response, case.what, false).await;
        assert_eq!(status, case.status, "{}: {envelope}", case.what);
        assert_eq!(envelope["error"]["code"], case.code, "{}: {envelope}", case.what);
        if let Some(param) = case.param {
            assert_eq!(envelope["error"]["param"], param, "{}: {envelope}", case.what);
        }
        if status == 405 {
            assert!(
                allow.is_some_and(|a| !a.is_empty()),
                "{}: a 405 names the allowed methods",
                case.what
            );
        }
    }
    assert_nothing_written(&flow).await;
    flow.stop().await;
}

/// One request derived from the payable one, refused by construction.
fn mutate(rng: &mut StdRng, payable: &[u8]) -> (&'static str, Method, String, HeaderMap, Vec<u8>) {
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {SERVICE_TOKEN}")).unwrap(),
    );
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let path = "/v1/split-payments".to_owned();
    let mut body = payable.to_vec();
    let kind = match rng.random_range(0..7) {
        0 => {
            // A strict prefix of a JSON object never parses.
            body.truncate(rng.random_range(0..body.len()));
            "truncated"
        }
        1 => {
            // Bytes JSON refuses anywhere: controls and bytes that are not UTF-8.
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..body.len());
                body[at] = [0x00, 0x01, 0x1f, 0xfe, 0xff][rng.random_range(0..5)];
            }
            "garbled"
        }
        2 => {
            let mut value: Value = serde_json::from_slice(payable).unwrap();
            let field = [
                "recommendation_set_id",
                "donor_id",
                "payment_method_type",
                "amounts",
                "donor_covers_fees",
                "currency",
                "payment_method",
            ][rng.random_range(0..7)];
            value[field] = match (field, rng.random_range(0..4)) {
                ("amounts", 0) => json!("cm3alc0"),
                ("amounts", 1) => json!([{ "allocation_id": 7, "amount_cents": "100" }]),
                ("donor_covers_fees", 0) => json!("yes"),
                ("donor_covers_fees", _) => json!(1),
                (_, 0) => json!(42),
                (_, 1) => json!(true),
                (_, 2) => json!({ "nested": [] }),
                _ => json!(-1.5),
            };
            body = serde_json::to_vec(&value).unwrap();
            "wrong type"
        }
        3 => {
            // Only a few: each is a megabyte.
            if rng.random_range(0..4) == 0 {
                body.extend(std::iter::repeat_n(b'x', BODY_BYTES_MAX + rng.random_range(1..4096)));
                "huge"
            } else {
                body.insert(0, b'[');
                "not an object"
            }
        }
        4 => {
            match rng.random_range(0..6) {
                0 => {
                    headers.remove("authorization");
                }
                1 => {
                    headers.insert("authorization", HeaderValue::from_static("bearer svc_flow_tests_token"));
                }
                2 => {
                    headers.insert(
                        "content-type",
                        HeaderValue::from_static("application/x-www-form-urlencoded"),
                    );
                }
                3 => {
                    headers.insert("content-type", HeaderValue::from_static("application/json-patch+json"));
                }
                4 => {
                    let len = rng.random_range(256..2000);
                    headers.insert("idempotency-key", HeaderValue::from_str(&"x".repeat(len)).unwrap());
                }
                _ => {
                    let bytes: Vec<u8> = (0..rng.random_range(1..40))
                        .map(|_| rng.random_range(0x80..=0xff))
                        .collect();
                    headers.insert("idempotency-key", HeaderValue::from_bytes(&bytes).unwrap());
                }
            }
            "odd header"
        }
        5 => {
            // GET and HEAD are not wrong here: `/v1/split-payments` also lists payments (the catalogue API).
            let method = [
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
                Method::OPTIONS,
                Method::TRACE,
                Method::from_bytes(b"BREW").unwrap(),
            ][rng.random_range(0..6)]
            .clone();
            return ("random method", method, path, headers, body);
        }
        _ => {
            let path = [
                "/",
                "/v1",
                "/v1/",
                "/v1/split-payments/",
                "//v1/split-payments",
                "/v1/split-payments/%ZZ",
                "/v1/split-payments/spay_x/refunds",
                "/V1/SPLIT-PAYMENTS",
                "/stripe/webhook",
                "/healthz/deep",
                "/v2/split-payments",
                "/v1/split-payments/%FF",
            ][rng.random_range(0..12)];
            let method = [Method::POST, Method::GET][rng.random_range(0..2)].clone();
            return ("random path", method, path.to_owned(), headers, body);
        }
    };
    (kind, Method::POST, path, headers, body)
}

#[tokio::test]
async fn two_hundred_mutated_intake_requests_are_refused_in_the_envelope_and_write_nothing() {
    let flow = Flow::start(AmountMode::Fixed, &[1_000, 2_000], &[]).await;
    let client = reqwest::Client::new();
    let payable = serde_json::to_vec(&payable()).unwrap();
    let mut rng = StdRng::seed_from_u64(9_6);
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for i in 0..200 {
        let (kind, method, path, headers, body) = mutate(&mut rng, &payable);
        let what = format!("#{i} {kind}: {method} {path}");
        let head = method == Method::HEAD;
        let response = send(&client, &flow.base_url, method, &path, headers, body).await;
        // ≥400 and <500, JSON, and (with a body) the contract's envelope.
        let (status, _) = envelope_of(response, &what, head).await;
        *statuses.entry(status).or_default() += 1;
    }
    assert_nothing_written(&flow).await;
    // Every kind of refusal was exercised.
    for status in [400, 401, 404, 405, 413] {
        assert!(statuses.contains_key(&status), "no {status} among {statuses:?}");
    }

    // The request they were mutated from is payable: the refusals were the mutations'.
    let response = client
        .post(format!("{}/v1/split-payments", flow.base_url))
        .bearer_auth(SERVICE_TOKEN)
        .header("content-type", "application/json")
        .body(payable)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    flow.stop().await;
}
