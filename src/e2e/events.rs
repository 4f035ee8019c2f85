//! Polling mode: when no forwarder (`stripe listen`) delivers Stripe's webhooks to `serve`, the suite reads
//! `GET /v1/events` (created since the run began, every page) and hands each event, raw, to
//! [`crate::http::webhooks::ingest_event`]: the ingress both webhook routes use once a signature is verified (an
//! event read from Stripe's API over an authenticated connection needs no signature). The inbox deduplicates by
//! event id, so a forwarder running as well does no harm.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::Failure;
use crate::http::webhooks::{ingest_event, Ingested};
use crate::stripe::gateway::RawMethod;
use crate::stripe::StripeGateway;

/// Stripe's largest page.
pub const PAGE_SIZE_MAX: u32 = 100;
/// Pages read at most per poll: a run makes a few hundred events; more means someone else's traffic.
const PAGES_PER_POLL_MAX: usize = 20;
pub const POLL_INTERVAL_MS: u64 = 1_000;
/// Passes that may fail in a row (Stripe unreachable, a 5xx) before polling gives up and the run stops.
const FAILED_PASSES_MAX: u32 = 5;

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PollStats {
    /// New events put in the inbox.
    pub ingested: u64,
    /// Events the inbox already had (a forwarder got there first, or a page overlapped).
    pub duplicates: u64,
    /// Connect events (top-level `account`): they belong to the Connect endpoint, which the scenario does not use;
    /// it retries the parked share with `ops retry` itself.
    pub skipped_connect: u64,
    /// Events rendered in another API version than splitpay's pinned one (Stripe renders listed events in the
    /// account's default version; a webhook endpoint can be pinned, a listing cannot).
    pub other_api_version: u64,
    /// Passes that failed and were tried again on the next interval.
    pub failed_passes: u64,
    /// Set when polling stopped for good; the scenario stops too.
    pub failure: Option<String>,
}

/// The background poller; [`Poller::finish`] polls once more and stops it.
pub struct Poller {
    stats: Arc<Mutex<PollStats>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Poller {
    /// Polls every [`POLL_INTERVAL_MS`] for events created at or after `since_unix`, `page_size` (1 to
    /// [`PAGE_SIZE_MAX`]) per request.
    pub fn start(gateway: Arc<StripeGateway>, pool: sqlx::PgPool, since_unix: i64, page_size: u32) -> Self {
        let page_size = page_size.clamp(1, PAGE_SIZE_MAX);
        let stats = Arc::new(Mutex::new(PollStats::default()));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let shared = stats.clone();
        let task = tokio::spawn(async move {
            let mut seen = HashSet::new();
            let mut failed_in_a_row = 0;
            loop {
                let done = *stopped.borrow();
                match poll_once(&gateway, &pool, since_unix, page_size, &mut seen, &shared).await {
                    Ok(()) => failed_in_a_row = 0,
                    // A livemode event is never retried; anything else gets a few more passes.
                    Err(e) if failed_in_a_row + 1 < FAILED_PASSES_MAX && !is_live_mode(&*e) => {
                        failed_in_a_row += 1;
                        shared.lock().expect("never poisoned").failed_passes += 1;
                        tracing::warn!(error = %e, "polling Stripe's events failed; trying again");
                    }
                    Err(e) => {
                        let mut s = shared.lock().expect("never poisoned: no panics while held");
                        s.failure = Some(e.to_string());
                        return;
                    }
                }
                if done && failed_in_a_row == 0 {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)) => {}
                    _ = stopped.changed() => {}
                }
            }
        });
        Self { stats, stop, task }
    }

    pub fn stats(&self) -> PollStats {
        self.stats.lock().expect("never poisoned").clone()
    }

    /// Stops the poller after one last poll, and returns what it did.
    pub async fn finish(self) -> PollStats {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.stats.lock().expect("never poisoned").clone()
    }
}

fn is_live_mode(e: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    e.downcast_ref::<super::guard::GuardError>().is_some()
}

/// One pass: every page of events since `since_unix`, fed oldest first. A livemode event stops the run.
async fn poll_once(
    gateway: &StripeGateway,
    pool: &sqlx::PgPool,
    since_unix: i64,
    page_size: u32,
    seen: &mut HashSet<String>,
    stats: &Mutex<PollStats>,
) -> Result<(), Failure> {
    let mut events: Vec<Value> = Vec::new();
    let mut after: Option<String> = None;
    for page in 0.. {
        if page == PAGES_PER_POLL_MAX {
            return Err(format!(
                "more than {} events since the run began: not polling Stripe's whole account",
                PAGES_PER_POLL_MAX * page_size as usize
            )
            .into());
        }
        let mut params = vec![
            ("created[gte]".to_owned(), since_unix.to_string()),
            ("limit".to_owned(), page_size.to_string()),
        ];
        if let Some(last) = &after {
            params.push(("starting_after".to_owned(), last.clone()));
        }
        let list = gateway
            .request_json("e2e_list_events", RawMethod::Get, "/events", &params, None, None)
            .await?;
        let data = list["data"].as_array().cloned().unwrap_or_default();
        after = data.last().and_then(|e| e["id"].as_str()).map(str::to_owned);
        // Newest first: an event already seen means the rest of this page and older pages were fed before.
        let fresh: Vec<Value> = data
            .into_iter()
            .take_while(|e| e["id"].as_str().is_some_and(|id| !seen.contains(id)))
            .collect();
        let stop = fresh.len() < list["data"].as_array().map_or(0, Vec::len);
        events.extend(fresh);
        if stop || list["has_more"] != true || after.is_none() {
            break;
        }
    }
    let pinned = stripe_shared::version::VERSION.as_str();
    for event in events.into_iter().rev() {
        let id = event["id"].as_str().unwrap_or_default().to_owned();
        super::guard::check_test_mode(&event)?;
        let mut s = stats.lock().expect("never poisoned").clone();
        if event.get("account").is_some_and(|a| !a.is_null()) {
            s.skipped_connect += 1;
        } else {
            if event["api_version"].as_str().is_some_and(|v| v != pinned) {
                s.other_api_version += 1;
            }
            match ingest_event(pool, event).await? {
                Ingested::Stored => s.ingested += 1,
                Ingested::Duplicate => s.duplicates += 1,
            }
        }
        *stats.lock().expect("never poisoned") = s;
        seen.insert(id);
    }
    Ok(())
}
