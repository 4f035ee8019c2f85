//! Webhook delivery as Stripe does it, not a kinder one: every event goes to every endpoint on its own, at once and
//! concurrently, so there is no ordering guarantee; a failed delivery is retried with backoff over about three days
//! of *simulator* time (advancing `/_sim/clock` makes due retries go out), then given up. Control modes on top:
//! duplicate every event, drop the next N, hold events back and flush them newest first, and redeliver any past
//! event on demand (a late `processing` after `succeeded`). Connect events (about a connected account) go only
//! to Connect endpoints, the platform's own events only to the other endpoints.

use std::sync::Arc;

use super::model::Event;
use super::Shared;
use crate::config::Secret;

/// Delays before each retry of a failed delivery, in simulator seconds after the failed attempt. Stripe retries
/// "for up to three days with an exponential back off" in live mode; this schedule sums to about 2.7 days.
pub const REDELIVERY_DELAYS_SECS: [i64; 8] = [
    60,
    5 * 60,
    30 * 60,
    2 * 3_600,
    5 * 3_600,
    10 * 3_600,
    24 * 3_600,
    24 * 3_600,
];

#[derive(Debug, Clone)]
pub(super) struct Endpoint {
    pub url: String,
    pub secret: Secret,
    /// A Connect endpoint: it receives the events about connected accounts (those with a top-level `account`)
    /// and only those; a platform endpoint receives only the platform's own events, as Stripe separates them.
    pub connect: bool,
    /// The event types it is sent, as Stripe's `enabled_events`: `["*"]` (the default) for every type.
    pub enabled_events: Vec<String>,
}

impl Endpoint {
    fn wants(&self, event: &Event) -> bool {
        self.connect == event.account.is_some() && self.enabled_events.iter().any(|t| t == "*" || *t == event.type_)
    }
}

/// A failed delivery waiting for its next attempt.
#[derive(Debug, Clone)]
struct Redelivery {
    event: Event,
    endpoint: Endpoint,
    /// Attempts made so far.
    attempts: u32,
    due: i64,
}

#[derive(Debug, Default)]
pub(super) struct WebhookState {
    pub endpoints: Vec<Endpoint>,
    pub duplicate: bool,
    pub drop_next: u32,
    pub hold: bool,
    pub held: Vec<Event>,
    redeliveries: Vec<Redelivery>,
    /// Deliveries that succeeded, failed at least once, and were given up.
    pub delivered: u64,
    pub failed_attempts: u64,
    pub given_up: u64,
    /// Events `drop_next` dropped, in all.
    pub dropped: u64,
}

impl WebhookState {
    pub fn pending_redeliveries(&self) -> usize {
        self.redeliveries.len()
    }

    /// When the next retry is due (simulator seconds), if any.
    pub fn next_redelivery_at(&self) -> Option<i64> {
        self.redeliveries.iter().map(|r| r.due).min()
    }
}

/// Hands new events to every endpoint, each delivery on its own task (no ordering between them).
pub(super) fn deliver(shared: &Arc<Shared>, events: Vec<Event>) {
    if events.is_empty() {
        return;
    }
    let (endpoints, sends) = {
        let mut hooks = shared.webhooks.lock().expect("no panics while held");
        if hooks.endpoints.is_empty() {
            return;
        }
        let mut sends = Vec::new();
        for event in events {
            if hooks.hold {
                hooks.held.push(event);
                continue;
            }
            if hooks.drop_next > 0 {
                hooks.drop_next -= 1;
                hooks.dropped += 1;
                continue;
            }
            let copies = if hooks.duplicate { 2 } else { 1 };
            for _ in 0..copies {
                sends.push(event.clone());
            }
        }
        (hooks.endpoints.clone(), sends)
    };
    for event in sends {
        for endpoint in endpoints.iter().filter(|e| e.wants(&event)) {
            spawn_attempt(shared, event.clone(), endpoint.clone(), 0);
        }
    }
}

/// Sends `events` one after the other, in this order, to every endpoint (the flush of held events: deliberately
/// reordered). A failure is retried like any other.
pub(super) async fn deliver_in_order(shared: &Arc<Shared>, events: Vec<Event>) {
    let endpoints = shared.webhooks.lock().expect("no panics while held").endpoints.clone();
    for event in events {
        for endpoint in endpoints.iter().filter(|e| e.wants(&event)) {
            attempt(shared, event.clone(), endpoint.clone(), 0).await;
        }
    }
}

/// Sends a past event again to every endpoint, now (Stripe redelivers; a redelivery can arrive after newer events).
pub(super) fn redeliver(shared: &Arc<Shared>, event: Event) -> usize {
    let endpoints: Vec<Endpoint> = {
        let hooks = shared.webhooks.lock().expect("no panics while held");
        hooks.endpoints.iter().filter(|e| e.wants(&event)).cloned().collect()
    };
    for endpoint in &endpoints {
        spawn_attempt(shared, event.clone(), endpoint.clone(), 0);
    }
    endpoints.len()
}

/// Starts the retries that are due at the simulator's clock.
pub(super) fn release_due(shared: &Arc<Shared>) {
    let now = shared.now();
    let due: Vec<Redelivery> = {
        let mut hooks = shared.webhooks.lock().expect("no panics while held");
        let (due, waiting) = std::mem::take(&mut hooks.redeliveries)
            .into_iter()
            .partition(|r| r.due <= now);
        hooks.redeliveries = waiting;
        due
    };
    for r in due {
        spawn_attempt(shared, r.event, r.endpoint, r.attempts);
    }
}

fn spawn_attempt(shared: &Arc<Shared>, event: Event, endpoint: Endpoint, attempts: u32) {
    let shared = shared.clone();
    tokio::spawn(async move { attempt(&shared, event, endpoint, attempts).await });
}

/// One delivery attempt; on failure the next one is scheduled on the simulator's clock, or the delivery given up.
async fn attempt(shared: &Arc<Shared>, event: Event, endpoint: Endpoint, attempts_before: u32) {
    let body = event.json().to_string();
    // Stripe signs with the real time, not the business clock tests advance.
    let real_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let signature = crate::stripe::webhook::sign(body.as_bytes(), &endpoint.secret, real_now);
    let sent = shared
        .http
        .post(&endpoint.url)
        .header("content-type", "application/json")
        .header("stripe-signature", signature)
        .body(body)
        .send()
        .await;
    let ok = match sent {
        Ok(r) if r.status().is_success() => true,
        Ok(r) => {
            tracing::debug!(url = %endpoint.url, status = %r.status(), event = %event.id, "webhook endpoint refused an event");
            false
        }
        Err(e) => {
            tracing::debug!(url = %endpoint.url, error = %e, event = %event.id, "webhook delivery failed");
            false
        }
    };
    let attempts = attempts_before + 1;
    let mut hooks = shared.webhooks.lock().expect("no panics while held");
    if ok {
        hooks.delivered += 1;
        return;
    }
    hooks.failed_attempts += 1;
    match REDELIVERY_DELAYS_SECS.get(attempts_before as usize) {
        Some(delay) => hooks.redeliveries.push(Redelivery {
            event,
            endpoint,
            attempts,
            due: shared.now() + delay,
        }),
        None => {
            tracing::warn!(url = %endpoint.url, event = %event.id, attempts, "webhook delivery given up");
            hooks.given_up += 1;
        }
    }
}
