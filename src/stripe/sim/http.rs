//! The simulator's HTTP front: Stripe's auth, idempotency (saved and replayed responses, `idempotency_error`,
//! `idempotency_key_in_use`, expiry), injected faults and latency, and routing to the model. Control calls live
//! under `/_sim/`, a path Stripe does not use.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::form::Form;
use super::idempotency::Idem;
use super::model::SimError;
use super::{Fault, FaultKind, Shared};

/// Bounds a request body, like any server should.
pub const BODY_BYTES_MAX: usize = 256 * 1024;

fn new_request_id() -> String {
    format!("req_{}", &uuid::Uuid::new_v4().simple().to_string()[..14])
}

/// A JSON response with a fresh `Request-Id` and the given headers.
fn json_response(status: u16, body: &Value, extra: &[(&'static str, String)]) -> Response {
    let mut response = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body.to_string(),
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert("content-type", "application/json".parse().expect("static"));
    headers.insert("request-id", new_request_id().parse().expect("ascii"));
    for (name, value) in extra {
        if let Ok(value) = value.parse() {
            headers.insert(*name, value);
        }
    }
    response
}

/// The headers Stripe sends with an error: `Stripe-Should-Retry` only where the error says so.
fn error_headers(e: &SimError) -> Vec<(&'static str, String)> {
    e.should_retry
        .map(|r| vec![("stripe-should-retry", r.to_string())])
        .unwrap_or_default()
}

fn error_response(e: &SimError) -> Response {
    json_response(e.status, &e.body(), &error_headers(e))
}

/// Headers go out, then the connection breaks mid-body: the client cannot tell whether the request was applied.
fn broken_response() -> Response {
    let stream = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "simulated connection loss",
        ))
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("static")
}

/// The catch-all handler for `/v1/…`.
pub(super) async fn stripe_api(
    State(shared): State<std::sync::Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    shared.log_request(
        method.as_str(),
        &path,
        headers.get("idempotency-key").and_then(|v| v.to_str().ok()),
    );
    let latency_ms = shared.pick_latency_ms();
    if latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(latency_ms)).await;
    }

    let Some(api_key) = bearer(&headers) else {
        let e = SimError {
            status: 401,
            code: None,
            should_retry: None,
            ..SimError::invalid(
                "",
                "You did not provide an API key. Provide it as a Bearer token: 'Authorization: Bearer sk_test_…'.",
            )
        };
        return error_response(&SimError { param: None, ..e });
    };
    if !shared.admit(&api_key) {
        // Stripe's shape (UNCONFIRMED word for word): `invalid_request_error` with code `rate_limit`, the reason in
        // `Stripe-Rate-Limited-Reason`, no Retry-After and no Stripe-Should-Retry. Nothing applied, nothing saved.
        let mut e = SimError::refused(
            429,
            "rate_limit",
            "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
            None,
        );
        e.saved = false;
        return json_response(
            429,
            &e.body(),
            &[("stripe-rate-limited-reason", "global-rate".to_owned())],
        );
    }
    if body.len() > BODY_BYTES_MAX {
        return error_response(&SimError::invalid("", "Request body too large."));
    }
    let form = if method == Method::GET {
        Form::parse(uri.query().unwrap_or("").as_bytes())
    } else {
        Form::parse(&body)
    };

    let fault = shared.take_fault(method.as_str(), &path);
    if let Some(Fault {
        kind: FaultKind::RateLimit,
        ..
    }) = fault
    {
        let mut e = SimError::refused(429, "rate_limit", "Too many requests hit the API too quickly.", None);
        // Stripe's rate limiter sends no Stripe-Should-Retry (UNCONFIRMED); a 429 is retried on its status.
        e.saved = false;
        return error_response(&e);
    }
    if let Some(Fault {
        kind: FaultKind::DropConnection,
        ..
    }) = fault
    {
        return broken_response();
    }

    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let key = match (&method, key) {
        (&Method::POST, Some(k)) if k.len() > 255 => {
            return error_response(&SimError::invalid(
                "",
                "Idempotency keys may be at most 255 characters.",
            ))
        }
        (&Method::POST, Some(k)) => Some(format!("{api_key}\u{0}{k}")),
        _ => None,
    };
    let fingerprint: Vec<(String, String)> = {
        let mut f = vec![
            ("\u{0}method".to_owned(), method.to_string()),
            ("\u{0}path".to_owned(), path.clone()),
        ];
        f.extend(form.fingerprint());
        f
    };

    if let Some(key) = &key {
        let now = shared.now();
        let mut idem = shared.idempotency.lock().expect("no panics while held");
        let ttl = shared
            .model
            .lock()
            .expect("no panics while held")
            .config
            .idempotency_ttl_secs;
        if idem.get(key).is_some_and(|entry| entry.created() + ttl <= now) {
            idem.remove(key);
        }
        match idem.get(key) {
            Some(entry) if entry.fingerprint() != fingerprint.as_slice() => {
                let shown = key.split('\u{0}').nth(1).unwrap_or_default();
                // Stripe's envelope: `type: idempotency_error`, no code, no param, no Stripe-Should-Retry.
                let e = SimError {
                    kind: "idempotency_error",
                    code: None,
                    ..SimError::invalid(
                        "",
                        format!("Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{shown}' if you meant to execute a different request."),
                    )
                };
                return error_response(&SimError { param: None, ..e });
            }
            Some(Idem::InFlight { .. }) => {
                let mut e = SimError::refused(
                    409,
                    "idempotency_key_in_use",
                    "There is currently another in-progress request using this Idempotent Key (that probably means you submitted twice, and the other request is still going through): please try again later.",
                    None,
                );
                e.should_retry = Some(true);
                e.saved = false;
                return error_response(&e);
            }
            Some(Idem::Done {
                status, body, headers, ..
            }) => {
                // A replay's answer can be lost on the way back like any other.
                if let Some(Fault {
                    kind: FaultKind::LoseResponse,
                    ..
                }) = fault
                {
                    return broken_response();
                }
                let mut replayed = headers.clone();
                replayed.push(("idempotent-replayed", "true".to_owned()));
                return json_response(*status, body, &replayed);
            }
            None => {
                idem.insert(
                    key.clone(),
                    Idem::InFlight {
                        fingerprint: fingerprint.clone(),
                        created: now,
                    },
                );
            }
        }
    }

    // From here the request is Stripe's to finish: a client that goes away (a timeout, a process killed mid-call)
    // does not cancel it, as it cannot at Stripe. Run in the handler's own future, a dropped connection would drop
    // it midway: applied or not by chance, and its key held `InFlight` for good (every retry a 409).
    let server_error = matches!(
        fault,
        Some(Fault {
            kind: FaultKind::ServerError,
            ..
        })
    );
    let (status, body, headers, request_id) = {
        let shared = shared.clone();
        let method = method.clone();
        let path = path.clone();
        let stripe_account = headers
            .get("stripe-account")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let executed = tokio::spawn(async move {
            execute(
                &shared,
                server_error,
                &method,
                &path,
                &form,
                stripe_account.as_deref(),
                key,
                fingerprint,
            )
            .await
        });
        match executed.await {
            Ok(done) => done,
            Err(e) => return error_response(&SimError::invalid("", format!("the simulator failed: {e}"))),
        }
    };
    let mut headers = headers;
    if let Some(Fault {
        kind: FaultKind::LoseResponse,
        ..
    }) = fault
    {
        return broken_response();
    }
    headers.push(("request-id", request_id));
    json_response(status, &body, &headers)
}

/// Executes a request whose key (if any) is marked in flight, saves the answer for the key, and returns the status,
/// body, headers (`Original-Request` included) and the request's id.
#[allow(clippy::too_many_arguments)]
async fn execute(
    shared: &std::sync::Arc<Shared>,
    server_error: bool,
    method: &Method,
    path: &str,
    form: &Form,
    stripe_account: Option<&str>,
    key: Option<String>,
    fingerprint: Vec<(String, String)>,
) -> (u16, Value, Vec<(&'static str, String)>, String) {
    let result = if server_error {
        Err(SimError {
            status: 500,
            kind: "api_error",
            code: None,
            message: "An unknown error occurred".into(),
            param: None,
            decline_code: None,
            should_retry: None,
            // Stripe saves a 500 for the key once the endpoint began executing.
            saved: true,
            payment_intent: None,
        })
    } else {
        // An in-flight request holds its key for the time it takes: latency makes the 409 window observable.
        let hold_ms = shared.in_flight_hold_ms();
        if hold_ms > 0 {
            tokio::time::sleep(Duration::from_millis(hold_ms)).await;
        }
        route(shared, method, path, form, stripe_account)
    };
    let (status, body, saved, mut headers) = match &result {
        Ok(v) => (200, v.clone(), true, Vec::new()),
        Err(e) => (e.status, e.body(), e.saved, error_headers(e)),
    };
    // Stripe names the first request (`Original-Request`): the same id now, the first one's in a replay.
    let request_id = new_request_id();
    headers.push(("original-request", request_id.clone()));
    if let Some(key) = &key {
        let mut idem = shared.idempotency.lock().expect("no panics while held");
        if saved {
            let created = idem.get(key).map_or_else(|| shared.now(), Idem::created);
            idem.insert(
                key.clone(),
                Idem::Done {
                    fingerprint,
                    created,
                    status,
                    body: body.clone(),
                    headers: headers.clone(),
                },
            );
        } else {
            idem.remove(key);
        }
    }
    shared.wake_deliverer();
    (status, body, headers, request_id)
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let key = value.strip_prefix("Bearer ")?;
    (key.starts_with("sk_test_") || key.starts_with("rk_test_")).then(|| key.to_owned())
}

/// Routes `/v1/…` to the model. `stripe_account` is the `Stripe-Account` header (a request made as a connected
/// account); only `GET /v1/balance` reads it.
pub(super) fn route(
    shared: &Shared,
    method: &Method,
    path: &str,
    form: &Form,
    stripe_account: Option<&str>,
) -> Result<Value, SimError> {
    let now = shared.now();
    let segments: Vec<&str> = path
        .trim_start_matches("/v1/")
        .trim_end_matches('/')
        .split('/')
        .collect();
    let expand = form.list("expand");
    let mut model = shared.model.lock().expect("no panics while held");
    model.tick(now);
    match (method.as_str(), segments.as_slice()) {
        ("POST", ["payment_intents"]) => model.create_intent(form, now),
        ("GET", ["payment_intents", id]) => model.retrieve_intent(id, &expand, now),
        ("POST", ["payment_intents", id, "confirm"]) => model.confirm_intent(id, form, now),
        ("POST", ["payment_intents", id, "cancel"]) => model.cancel_intent(id, form, now),
        ("GET", ["charges", id]) => model.retrieve_charge(id, &expand, now),
        ("POST", ["transfers"]) => model.create_transfer(form, now),
        ("GET", ["transfers"]) => model.list_transfers(form),
        ("GET", ["transfers", id]) => model.retrieve_transfer(id),
        ("POST", ["transfers", id, "reversals"]) => model.create_reversal(id, form, now),
        ("GET", ["transfers", id, "reversals"]) => model.list_reversals(id, form),
        ("POST", ["refunds"]) => model.create_refund(form, now),
        ("GET", ["refunds"]) => model.list_refunds(form),
        ("GET", ["refunds", id]) => model.retrieve_refund(id),
        ("GET", ["disputes"]) => model.list_disputes(form, now),
        ("GET", ["disputes", id]) => model.retrieve_dispute(id, now),
        ("POST", ["accounts"]) => model.create_account(form, now),
        ("GET", ["accounts", id]) => model.retrieve_account(id),
        ("POST", ["accounts", id]) => model.update_account(id, form, now),
        ("DELETE", ["accounts", id]) => model.delete_account(id, now),
        ("GET", ["balance_transactions", id]) => model.retrieve_balance_txn(id, now),
        ("GET", ["balance"]) => match stripe_account {
            Some(account) => model.connected_balance_json(account, now),
            None => Ok(model.balance_json(now)),
        },
        ("GET", ["events"]) => model.list_events(form),
        ("GET", ["events", id]) => model.retrieve_event(id),
        _ => Err(SimError {
            status: 404,
            code: None,
            param: None,
            ..SimError::invalid("", format!("Unrecognized request URL ({method}: {path})."))
        }),
    }
}

/// `/_sim/…`: control calls with JSON bodies.
pub(super) async fn control(
    State(shared): State<std::sync::Arc<Shared>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let args: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body).unwrap_or(json!({}))
    };
    let path = uri.path().trim_start_matches("/_sim/").trim_end_matches('/').to_owned();
    let segments: Vec<&str> = path.split('/').collect();
    let result = super::control::handle(&shared, method.as_str(), &segments, &args);
    shared.wake_deliverer();
    match result {
        Ok(v) => json_response(200, &v, &[]),
        Err(e) => error_response(&e),
    }
}
