//! The events sweep: the refund and dispute events whose webhook never arrived, read from Stripe's event list.
//!
//! Payments and transfers are reconciled by reading their objects (see [`super::reconcile`]), but nothing else
//! tells splitpay that a charge was refunded in the dashboard or disputed: a dropped `charge.refunded` or
//! `charge.dispute.funds_withdrawn` would leave the recipients holding money the donor got back. So each tick reads
//! `GET /v1/events` for those types, created since the cursor (less an overlap for clock skew and for events
//! Stripe lists late), and puts each event the inbox lacks there through the webhook's own ingress, which
//! deduplicates by event id: an event that arrives both ways is processed once. Each page is ingested as it is
//! read, oldest first (as webhooks mostly come; Stripe lists newest first, so the newest page goes first), and
//! then the pass's position is saved as a backlog: on after the oldest event read (Stripe's `starting_after`),
//! among the events created up to the pass's start. So a pass cut at any point (the tick's timeout dropping it, a
//! failed page, a crash) keeps the pages it ingested, and the next pass goes on from there; a page cut before its
//! position was saved is read again, harmlessly. The cursor moves only when everything since it has been read.
//!
//! Limits, stated: Stripe keeps events 30 days, so a sweep stopped longer than that misses some (the first pass
//! reads [`FIRST_PASS_LOOKBACK_SECS`]); listed events are rendered in the account's default API version (a
//! webhook endpoint can be pinned, a list cannot) — the processors read only fields every version has (`id`,
//! `charge`, `payment_intent`, `amount`, `status`); a pass reads at most [`PAGES_PER_PASS_MAX`] pages, and one
//! that would read more leaves the rest as a backlog, does not move the cursor, and says so loudly. Connect events
//! (`account.updated` of a connected account) are not in the platform's list; onboarding is covered by the
//! accounts sweep ([`super::account_sweep`]).

use chrono::{DateTime, Duration, Utc};
use serde_json::Value;

use crate::app::AppContext;
use crate::http::webhooks::{ingest_event, Ingested};
use crate::store::records::{advance_event_sweep, event_sweep_state, known_stripe_events, leave_event_sweep_backlog};
use crate::store::StoreError;
use crate::stripe::GatewayError;

/// The event types whose loss nothing else would notice (at most 20: Stripe's limit for `types[]`).
pub const SWEPT_EVENT_TYPES: [&str; 10] = [
    "charge.refunded",
    "charge.refund.updated",
    "refund.created",
    "refund.updated",
    "refund.failed",
    "charge.dispute.created",
    "charge.dispute.updated",
    "charge.dispute.closed",
    "charge.dispute.funds_withdrawn",
    "charge.dispute.funds_reinstated",
];
/// The cursor's row in `stripe_event_sweeps`.
const SWEEP_NAME: &str = "refunds_and_disputes";
/// Each pass reads again this far before the cursor: clocks differ, and Stripe may list an event a little late.
pub const OVERLAP_SECS: i64 = 600;
/// A sweep that never ran starts this far back.
pub const FIRST_PASS_LOOKBACK_SECS: i64 = 86_400;
/// Pages of 100 a pass reads at most.
pub const PAGES_PER_PASS_MAX: usize = 100;

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct EventSweepReport {
    /// Events read from Stripe's list.
    pub listed: u64,
    /// Events the inbox lacked, put there now (their webhook was lost or is late).
    pub ingested: Vec<String>,
    /// Whether the pass read everything since the cursor (and moved it).
    pub complete: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EventSweepError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("listing Stripe's events: {0}")]
    Stripe(#[from] GatewayError),
    #[error("putting a listed event in the inbox: {0}")]
    Ingest(String),
    #[error("Stripe listed an event without an id: the pass cannot say where it stopped")]
    ListedWithoutId,
}

impl From<sqlx::Error> for EventSweepError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(e.into())
    }
}

/// One pass: every page since the cursor (or, after a pass that read too many or was cut, the backlog it left),
/// each page's events the inbox lacks ingested oldest first and the position saved, then the cursor moved; or,
/// when there were more than a pass reads, the backlog left for the next pass (the older events not read yet).
pub async fn sweep_events(ctx: &AppContext) -> Result<EventSweepReport, EventSweepError> {
    sweep_events_with(ctx, PAGES_PER_PASS_MAX).await
}

/// [`sweep_events`] reading at most `pages_max` pages (tests make it small to leave a backlog).
pub async fn sweep_events_with(ctx: &AppContext, pages_max: usize) -> Result<EventSweepReport, EventSweepError> {
    let started = Utc::now();
    let state = event_sweep_state(&mut *ctx.pool.acquire().await?, SWEEP_NAME).await?;
    let swept_until = state
        .as_ref()
        .map(|s| s.swept_until)
        .unwrap_or_else(|| started - Duration::seconds(FIRST_PASS_LOOKBACK_SECS - OVERLAP_SECS));
    let since: DateTime<Utc> = swept_until - Duration::seconds(OVERLAP_SECS);
    // A backlog: the older events a pass did not read (too many, or it was cut), listed on after the oldest it read,
    // among the events created up to where that pass began (the cursor then moves there). Newer events wait for
    // the next pass.
    let (mut after, pass_until) = match state
        .as_ref()
        .and_then(|s| s.backlog_after.clone().zip(s.backlog_until))
    {
        Some((after, until)) => (Some(after), until),
        None => (None, started),
    };
    let lte = after.is_some().then(|| pass_until.timestamp());
    let mut report = EventSweepReport::default();
    for _ in 0..pages_max.max(1) {
        let page = ctx
            .gateway
            .list_events(&SWEPT_EVENT_TYPES, since.timestamp(), lte, after.as_deref())
            .await?;
        let more = page.has_more && !page.events.is_empty();
        let oldest = page.events.last().and_then(|e| e["id"].as_str()).map(str::to_owned);
        report.listed += page.events.len() as u64;
        ingest_page(ctx, page.events, &mut report.ingested).await?;
        // Saved once the page is in the inbox: a pass cut from here on (by the timeout, an error on a later page, a
        // crash) leaves the next one to go on after this page, never before an event not ingested.
        let mut conn = ctx.pool.acquire().await?;
        if !more {
            advance_event_sweep(&mut conn, SWEEP_NAME, pass_until).await?;
            report.complete = true;
            break;
        }
        let oldest = oldest.ok_or(EventSweepError::ListedWithoutId)?;
        leave_event_sweep_backlog(&mut conn, SWEEP_NAME, swept_until, &oldest, pass_until).await?;
        after = Some(oldest);
    }
    if !report.complete {
        tracing::warn!(
            since = %since,
            read_down_to = after.as_deref().unwrap_or_default(),
            "more refund and dispute events since the cursor than a pass reads: the older ones are read next"
        );
    }
    crate::observability::events_sweep_ran(&report);
    Ok(report)
}

/// Puts the events of one page (newest first, as Stripe lists them) that the inbox lacks there, oldest first.
async fn ingest_page(ctx: &AppContext, events: Vec<Value>, ingested: &mut Vec<String>) -> Result<(), EventSweepError> {
    let ids: Vec<String> = events
        .iter()
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect();
    let known = known_stripe_events(&mut *ctx.pool.acquire().await?, &ids).await?;
    for event in events.into_iter().rev() {
        let Some(id) = event["id"].as_str().map(str::to_owned) else {
            continue;
        };
        if known.contains(&id) || event.get("account").is_some_and(|a| !a.is_null()) {
            continue;
        }
        match ingest_event(&ctx.pool, event).await {
            Ok(Ingested::Stored) => {
                tracing::warn!(event = %id, "a Stripe event whose webhook never arrived, taken from the event list");
                ingested.push(id);
            }
            Ok(Ingested::Duplicate) => {} // its webhook arrived meanwhile
            Err(e) => return Err(EventSweepError::Ingest(e.to_string())),
        }
    }
    Ok(())
}
