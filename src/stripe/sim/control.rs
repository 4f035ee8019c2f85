//! The simulator's control API under `/_sim/` (a path Stripe does not use), and [`SimControl`], its HTTP client
//! for tests and the demo.
//!
//! | call | effect |
//! |---|---|
//! | `POST /_sim/faults` `{kind, count, path_contains?, method?}` | the next `count` matching requests fail (see [`FaultKind`]) |
//! | `DELETE /_sim/faults` | clears faults |
//! | `POST /_sim/latency` `{min_ms, max_ms, processing_ms?}` | uniform latency before each request; time a request holds its key |
//! | `POST /_sim/clock/advance` `{seconds}` | moves the clock on (pending debits settle, delayed balance transactions appear, due webhook retries go out) |
//! | `POST /_sim/clock/freeze` | stops the clock at the present time: from then on only `clock/advance` moves it (tests that stand one second before a deadline) |
//! | `POST /_sim/payment_intents/{id}/settle` `{outcome: "succeed"\|"fail", failure_code?, failure_message?}` | settles a pending debit now |
//! | `POST /_sim/accounts` `{id?, transfers?, country?}` | creates a connected account |
//! | `POST /_sim/accounts/{id}/capabilities` `{transfers, activate_after_secs?}` | sets the `transfers` capability; with `activate_after_secs` it turns `active` once the clock passes that (`capability.updated` + `account.updated` each time) |
//! | `POST /_sim/accounts/{id}/payout` `{currency, amount}` | pays a connected account's available balance out (`balance_insufficient` above it) |
//! | `GET /_sim/accounts/{id}/balance` | that connected account's balance (as `GET /v1/balance` with `Stripe-Account`) |
//! | `POST /_sim/balance/top_up` `{currency, amount}` | adds available platform balance |
//! | `POST /_sim/charges/{ch}/dispute` `{reason?}` | opens a dispute on a succeeded charge now (funds withdrawn at once); returns the dispute |
//! | `POST /_sim/charges/{ch}/dispute/close` `{outcome: "won"\|"lost"}` | decides the charge's dispute; returns it |
//! | `POST /_sim/refunds/{re}/settle` `{outcome: "succeeded"\|"failed", failure_reason?}` | settles a `pending` refund (`charge.refund.updated`) |
//! | `POST /_sim/webhooks` `{url, secret, connect?, enabled_events?}` | registers a webhook endpoint; `connect: true` for Connect events only (default: platform events only); `enabled_events` as Stripe's (default `["*"]`, every type) |
//! | `POST /_sim/webhooks/mode` `{duplicate?, drop_next?, hold?}` | delivery modes (`drop_next`: of the events made after this call) |
//! | `POST /_sim/webhooks/flush` | releases held events, newest first (reordered), one after the other |
//! | `POST /_sim/webhooks/redeliver` `{event_id}` | sends a past event again now, after whatever came since |
//! | `GET /_sim/webhooks` | delivery counters and pending retries (`pending_redeliveries`, `next_redelivery_at`) |
//! | `GET /_sim/requests` | the API requests received, with arrival times |
//! | `POST /_sim/config` | replaces the [`SimConfig`] (fees, delays, idempotency TTL, the per-key rate limit, …) |
//! | `GET /_sim/config` | the current [`SimConfig`] |
//! | `GET /_sim/rate_limit` | `{rate_limited}`: requests refused with 429 `rate_limit` by the per-key limiter so far |

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Value};

use super::model::{SimConfig, SimError};
use super::{Fault, RequestLogEntry, Shared};
use crate::config::Secret;

fn arg_str<'a>(args: &'a Value, name: &str) -> Result<&'a str, SimError> {
    args[name]
        .as_str()
        .ok_or_else(|| SimError::invalid(name, format!("{name} (string) is required")))
}

fn arg_i64(args: &Value, name: &str) -> Result<i64, SimError> {
    args[name]
        .as_i64()
        .ok_or_else(|| SimError::invalid(name, format!("{name} (integer) is required")))
}

pub(super) fn handle(shared: &Arc<Shared>, method: &str, segments: &[&str], args: &Value) -> Result<Value, SimError> {
    let now = shared.now();
    match (method, segments) {
        ("POST", ["faults"]) => {
            let fault: Fault =
                serde_json::from_value(args.clone()).map_err(|e| SimError::invalid("kind", e.to_string()))?;
            shared.faults.lock().expect("no panics while held").push(fault);
            Ok(json!({ "ok": true }))
        }
        ("DELETE", ["faults"]) => {
            shared.faults.lock().expect("no panics while held").clear();
            Ok(json!({ "ok": true }))
        }
        ("POST", ["latency"]) => {
            let (min, max) = (
                arg_i64(args, "min_ms")?.max(0) as u64,
                arg_i64(args, "max_ms")?.max(0) as u64,
            );
            *shared.latency_ms.lock().expect("no panics while held") = (min, max.max(min));
            shared
                .processing_ms
                .store(args["processing_ms"].as_u64().unwrap_or(0), Ordering::SeqCst);
            Ok(json!({ "ok": true }))
        }
        ("GET", ["clock"]) => Ok(json!({ "now": now })),
        ("POST", ["clock", "freeze"]) => Ok(json!({ "now": shared.freeze_clock() })),
        ("POST", ["clock", "advance"]) => {
            let seconds = arg_i64(args, "seconds")?;
            shared.clock_offset_secs.fetch_add(seconds, Ordering::SeqCst);
            let now = shared.now();
            let events = {
                let mut model = shared.model.lock().expect("no panics while held");
                model.tick(now);
                model.take_undelivered()
            };
            super::webhooks::deliver(shared, events);
            super::webhooks::release_due(shared);
            Ok(json!({ "now": now }))
        }
        ("POST", ["payment_intents", id, "settle"]) => {
            let force = match args["outcome"].as_str() {
                None => None,
                Some("succeed") => Some(Ok(())),
                Some("fail") => Some(Err((
                    args["failure_code"].as_str().unwrap_or("account_closed").to_owned(),
                    args["failure_message"]
                        .as_str()
                        .unwrap_or("The customer's bank account has been closed.")
                        .to_owned(),
                ))),
                Some(other) => return Err(SimError::invalid("outcome", format!("succeed or fail, not {other}"))),
            };
            shared
                .model
                .lock()
                .expect("no panics while held")
                .settle(id, force, now)
        }
        ("POST", ["accounts"]) => {
            let mut form = Vec::new();
            if let Some(id) = args["id"].as_str() {
                form.push(format!("id={id}"));
            }
            form.push(format!("transfers={}", args["transfers"].as_str().unwrap_or("active")));
            form.push(format!("country={}", args["country"].as_str().unwrap_or("AU")));
            let form = super::form::Form::parse(form.join("&").as_bytes());
            shared
                .model
                .lock()
                .expect("no panics while held")
                .insert_account(&form, now)
        }
        ("POST", ["accounts", id, "capabilities"]) => {
            let status = arg_str(args, "transfers")?;
            let activate_after_secs = match &args["activate_after_secs"] {
                Value::Null => None,
                _ => Some(arg_i64(args, "activate_after_secs")?),
            };
            shared
                .model
                .lock()
                .expect("no panics while held")
                .set_transfers_capability(id, status, activate_after_secs, now)
        }
        ("POST", ["accounts", id, "payout"]) => {
            let currency = arg_str(args, "currency")?.to_ascii_lowercase();
            let amount = arg_i64(args, "amount")?;
            shared
                .model
                .lock()
                .expect("no panics while held")
                .payout(id, &currency, amount, now)
        }
        ("GET", ["accounts", id, "balance"]) => shared
            .model
            .lock()
            .expect("no panics while held")
            .connected_balance_json(id, now),
        ("POST", ["charges", id, "dispute"]) => {
            let reason = match &args["reason"] {
                Value::Null => "general",
                _ => arg_str(args, "reason")?,
            };
            shared
                .model
                .lock()
                .expect("no panics while held")
                .open_dispute(id, reason, now)
        }
        ("POST", ["charges", id, "dispute", "close"]) => {
            let won = match arg_str(args, "outcome")? {
                "won" => true,
                "lost" => false,
                other => return Err(SimError::invalid("outcome", format!("won or lost, not {other}"))),
            };
            shared
                .model
                .lock()
                .expect("no panics while held")
                .close_dispute(id, won, now)
        }
        ("POST", ["refunds", id, "settle"]) => {
            let outcome = match arg_str(args, "outcome")? {
                "succeeded" => Ok(()),
                "failed" => Err(match &args["failure_reason"] {
                    Value::Null => None,
                    _ => Some(arg_str(args, "failure_reason")?),
                }),
                other => {
                    return Err(SimError::invalid(
                        "outcome",
                        format!("succeeded or failed, not {other}"),
                    ))
                }
            };
            shared
                .model
                .lock()
                .expect("no panics while held")
                .settle_refund(id, outcome, now)
        }
        ("POST", ["balance", "top_up"]) => {
            let currency = arg_str(args, "currency")?.to_ascii_lowercase();
            let amount = arg_i64(args, "amount")?;
            let mut model = shared.model.lock().expect("no panics while held");
            model.top_up(&currency, amount, now);
            Ok(model.balance_json(now))
        }
        ("POST", ["webhooks"]) => {
            let url = arg_str(args, "url")?.to_owned();
            let secret = Secret::new(arg_str(args, "secret")?);
            let connect = match &args["connect"] {
                Value::Null => false,
                v => v
                    .as_bool()
                    .ok_or_else(|| SimError::invalid("connect", "connect must be true or false"))?,
            };
            let enabled_events = match &args["enabled_events"] {
                Value::Null => vec!["*".to_owned()],
                Value::Array(types) if !types.is_empty() => types
                    .iter()
                    .map(|t| t.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| SimError::invalid("enabled_events", "enabled_events must be event type strings"))?,
                _ => {
                    return Err(SimError::invalid(
                        "enabled_events",
                        "enabled_events must be a non-empty array of event types (\"*\" for all)",
                    ))
                }
            };
            shared
                .webhooks
                .lock()
                .expect("no panics while held")
                .endpoints
                .push(super::webhooks::Endpoint {
                    url,
                    secret,
                    connect,
                    enabled_events,
                });
            Ok(json!({ "ok": true }))
        }
        ("POST", ["webhooks", "mode"]) => {
            if args["drop_next"].as_u64().is_some_and(|n| n > 0) {
                // `drop_next` is about the next events *made*: events already made but not yet handed to delivery
                // (the delivery tick has not run) go out first, under the mode they were made in. Otherwise a test
                // that drops "the next two" could drop an earlier transfer's events and let its own through.
                let events = shared.model.lock().expect("no panics while held").take_undelivered();
                super::webhooks::deliver(shared, events);
            }
            let mut hooks = shared.webhooks.lock().expect("no panics while held");
            if let Some(d) = args["duplicate"].as_bool() {
                hooks.duplicate = d;
            }
            if let Some(n) = args["drop_next"].as_u64() {
                hooks.drop_next = n as u32;
            }
            if let Some(h) = args["hold"].as_bool() {
                hooks.hold = h;
            }
            Ok(json!({
                "duplicate": hooks.duplicate,
                "drop_next": hooks.drop_next,
                "hold": hooks.hold,
                "dropped": hooks.dropped,
            }))
        }
        ("POST", ["webhooks", "flush"]) => {
            let mut held = std::mem::take(&mut shared.webhooks.lock().expect("no panics while held").held);
            held.reverse();
            let count = held.len();
            let shared = shared.clone();
            tokio::spawn(async move { super::webhooks::deliver_in_order(&shared, held).await });
            Ok(json!({ "released": count }))
        }
        ("POST", ["webhooks", "redeliver"]) => {
            let id = arg_str(args, "event_id")?;
            let event = shared
                .model
                .lock()
                .expect("no panics while held")
                .event(id)
                .ok_or_else(|| SimError::missing("event", id, Some("event_id")))?;
            let endpoints = super::webhooks::redeliver(shared, event);
            Ok(json!({ "endpoints": endpoints }))
        }
        ("GET", ["webhooks"]) => {
            let hooks = shared.webhooks.lock().expect("no panics while held");
            Ok(json!({
                "delivered": hooks.delivered,
                "failed_attempts": hooks.failed_attempts,
                "given_up": hooks.given_up,
                "dropped": hooks.dropped,
                "pending_redeliveries": hooks.pending_redeliveries(),
                "next_redelivery_at": hooks.next_redelivery_at(),
                "held": hooks.held.len(),
            }))
        }
        ("GET", ["requests"]) => {
            let log: Vec<RequestLogEntry> = shared.requests.lock().expect("no panics while held").clone();
            Ok(json!({ "requests": log }))
        }
        ("GET", ["config"]) => {
            Ok(serde_json::to_value(&shared.model.lock().expect("no panics while held").config).expect("plain data"))
        }
        ("GET", ["rate_limit"]) => Ok(json!({ "rate_limited": shared.rate_limited_total() })),
        ("POST", ["config"]) => {
            let config: SimConfig =
                serde_json::from_value(args.clone()).map_err(|e| SimError::invalid("config", e.to_string()))?;
            shared.model.lock().expect("no panics while held").config = config;
            Ok(json!({ "ok": true }))
        }
        _ => Err(SimError {
            status: 404,
            code: None,
            param: None,
            ..SimError::invalid("", format!("no control call {method} /_sim/{}", segments.join("/")))
        }),
    }
}

/// A client for the control API.
#[derive(Debug, Clone)]
pub struct SimControl {
    base: String,
    http: reqwest::Client,
}

#[derive(Debug, thiserror::Error)]
#[error("simulator control call failed: {0}")]
pub struct ControlError(String);

impl SimControl {
    pub fn new(base_url: &str) -> Self {
        Self {
            base: base_url.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Result<Value, ControlError> {
        let response = self
            .http
            .request(method, format!("{}/_sim/{path}", self.base))
            .json(&body)
            .send()
            .await
            .map_err(|e| ControlError(e.to_string()))?;
        let status = response.status();
        let value: Value = response.json().await.map_err(|e| ControlError(e.to_string()))?;
        if status.is_success() {
            Ok(value)
        } else {
            Err(ControlError(format!("{status}: {value}")))
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value, ControlError> {
        self.call(reqwest::Method::POST, path, body).await
    }

    pub async fn get(&self, path: &str) -> Result<Value, ControlError> {
        self.call(reqwest::Method::GET, path, json!({})).await
    }

    pub async fn fault(&self, fault: Fault) -> Result<(), ControlError> {
        self.post("faults", serde_json::to_value(fault).expect("plain data"))
            .await
            .map(|_| ())
    }

    pub async fn clear_faults(&self) -> Result<(), ControlError> {
        self.call(reqwest::Method::DELETE, "faults", json!({}))
            .await
            .map(|_| ())
    }

    /// Creates a connected account; `transfers_active` sets its `transfers` capability.
    pub async fn create_account(&self, id: &str, transfers_active: bool) -> Result<(), ControlError> {
        let transfers = if transfers_active { "active" } else { "inactive" };
        self.post("accounts", json!({ "id": id, "transfers": transfers }))
            .await
            .map(|_| ())
    }

    /// Sets the `transfers` capability now (`capability.updated` and `account.updated` follow).
    pub async fn set_transfers_capability(&self, id: &str, status: &str) -> Result<(), ControlError> {
        self.post(&format!("accounts/{id}/capabilities"), json!({ "transfers": status }))
            .await
            .map(|_| ())
    }

    /// Sets the `transfers` capability to `status` now and makes it turn `active` after `activate_after_secs`
    /// of simulator time.
    pub async fn activate_transfers_later(
        &self,
        id: &str,
        status: &str,
        activate_after_secs: i64,
    ) -> Result<Value, ControlError> {
        self.post(
            &format!("accounts/{id}/capabilities"),
            json!({ "transfers": status, "activate_after_secs": activate_after_secs }),
        )
        .await
    }

    /// Pays `amount_cents` of a connected account's available balance out to its bank.
    pub async fn payout(&self, account_id: &str, currency: &str, amount_cents: i64) -> Result<Value, ControlError> {
        self.post(
            &format!("accounts/{account_id}/payout"),
            json!({ "currency": currency, "amount": amount_cents }),
        )
        .await
    }

    /// A connected account's balance (Stripe's balance object).
    pub async fn connected_balance(&self, account_id: &str) -> Result<Value, ControlError> {
        self.get(&format!("accounts/{account_id}/balance")).await
    }

    /// Opens a dispute on a succeeded charge now; returns the dispute (funds already withdrawn).
    pub async fn open_dispute(&self, charge_id: &str) -> Result<Value, ControlError> {
        self.post(&format!("charges/{charge_id}/dispute"), json!({})).await
    }

    /// Decides the charge's open dispute; returns the closed dispute.
    pub async fn close_dispute(&self, charge_id: &str, won: bool) -> Result<Value, ControlError> {
        let outcome = if won { "won" } else { "lost" };
        self.post(
            &format!("charges/{charge_id}/dispute/close"),
            json!({ "outcome": outcome }),
        )
        .await
    }

    /// Settles a `pending` refund (failed ones with failure_reason `unknown`); returns the refund.
    pub async fn settle_refund(&self, refund_id: &str, succeeded: bool) -> Result<Value, ControlError> {
        let outcome = if succeeded { "succeeded" } else { "failed" };
        self.post(&format!("refunds/{refund_id}/settle"), json!({ "outcome": outcome }))
            .await
    }

    /// Stops the simulator's clock at the present time: from then on only `advance_clock` moves it, so a test can stand
    /// one second before a deadline without the wall clock crossing it. Returns the frozen time.
    pub async fn freeze_clock(&self) -> Result<i64, ControlError> {
        let v = self.post("clock/freeze", json!({})).await?;
        Ok(v["now"].as_i64().unwrap_or_default())
    }

    pub async fn advance_clock(&self, seconds: i64) -> Result<i64, ControlError> {
        let v = self.post("clock/advance", json!({ "seconds": seconds })).await?;
        Ok(v["now"].as_i64().unwrap_or_default())
    }

    pub async fn settle(&self, payment_intent: &str, outcome: Option<&str>) -> Result<Value, ControlError> {
        let body = match outcome {
            Some(o) => json!({ "outcome": o }),
            None => json!({}),
        };
        self.post(&format!("payment_intents/{payment_intent}/settle"), body)
            .await
    }

    pub async fn top_up(&self, currency: &str, amount: i64) -> Result<(), ControlError> {
        self.post("balance/top_up", json!({ "currency": currency, "amount": amount }))
            .await
            .map(|_| ())
    }

    pub async fn set_config(&self, config: &SimConfig) -> Result<(), ControlError> {
        self.post("config", serde_json::to_value(config).expect("plain data"))
            .await
            .map(|_| ())
    }

    pub async fn add_webhook(&self, url: &str, secret: &str) -> Result<(), ControlError> {
        self.post("webhooks", json!({ "url": url, "secret": secret }))
            .await
            .map(|_| ())
    }

    /// Registers a Connect endpoint: it receives only events about connected accounts.
    pub async fn add_connect_webhook(&self, url: &str, secret: &str) -> Result<(), ControlError> {
        self.post("webhooks", json!({ "url": url, "secret": secret, "connect": true }))
            .await
            .map(|_| ())
    }

    /// Registers the two endpoints splitpay serves (`{base_url}/stripe/webhooks` and `…/connect`), each sent only
    /// the event types splitpay acts on, as an operator configures them at Stripe (see README).
    pub async fn add_splitpay_webhooks(
        &self,
        base_url: &str,
        secret: &str,
        connect_secret: &str,
    ) -> Result<(), ControlError> {
        use crate::jobs::stripe_event::{CONNECT_EVENT_TYPES, PLATFORM_EVENT_TYPES};
        self.post(
            "webhooks",
            json!({ "url": format!("{base_url}/stripe/webhooks"), "secret": secret, "enabled_events": PLATFORM_EVENT_TYPES }),
        )
        .await?;
        self.post(
            "webhooks",
            json!({ "url": format!("{base_url}/stripe/webhooks/connect"), "secret": connect_secret, "connect": true, "enabled_events": CONNECT_EVENT_TYPES }),
        )
        .await
        .map(|_| ())
    }

    pub async fn webhook_mode(&self, mode: Value) -> Result<(), ControlError> {
        self.post("webhooks/mode", mode).await.map(|_| ())
    }

    /// Delivery counters and pending retries (see `GET /_sim/webhooks`).
    pub async fn webhook_stats(&self) -> Result<Value, ControlError> {
        self.get("webhooks").await
    }

    /// Sends a past event again, now.
    pub async fn redeliver(&self, event_id: &str) -> Result<(), ControlError> {
        self.post("webhooks/redeliver", json!({ "event_id": event_id }))
            .await
            .map(|_| ())
    }

    pub async fn flush_webhooks(&self) -> Result<u64, ControlError> {
        Ok(self.post("webhooks/flush", json!({})).await?["released"]
            .as_u64()
            .unwrap_or(0))
    }

    /// Turns Stripe's per-key rate limit on (`Some(rate)`, with `burst`; 0: one second's worth) or off, keeping the
    /// rest of the configuration.
    pub async fn set_rate_limit(&self, rate_per_sec: Option<u32>, burst: u32) -> Result<(), ControlError> {
        let mut config: SimConfig = serde_json::from_value(self.get("config").await?)
            .map_err(|e| ControlError(format!("GET /_sim/config: {e}")))?;
        config.rate_limit_per_sec = rate_per_sec;
        config.rate_limit_burst = burst;
        self.set_config(&config).await
    }

    /// How many requests the per-key rate limiter refused with 429 so far.
    pub async fn rate_limited_count(&self) -> Result<u64, ControlError> {
        Ok(self.get("rate_limit").await?["rate_limited"].as_u64().unwrap_or(0))
    }

    pub async fn set_latency(&self, min_ms: u64, max_ms: u64, processing_ms: u64) -> Result<(), ControlError> {
        self.post(
            "latency",
            json!({ "min_ms": min_ms, "max_ms": max_ms, "processing_ms": processing_ms }),
        )
        .await
        .map(|_| ())
    }

    /// Arrival times (ms since start) of API requests whose path contains `path_contains`.
    pub async fn request_times_ms(&self, path_contains: &str) -> Result<Vec<u64>, ControlError> {
        let v = self.get("requests").await?;
        Ok(v["requests"]
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .filter(|e| e["path"].as_str().is_some_and(|p| p.contains(path_contains)))
                    .filter_map(|e| e["at_ms"].as_u64())
                    .collect()
            })
            .unwrap_or_default())
    }
}
