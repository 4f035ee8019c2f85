//! The records around the money path: the Stripe event inbox (deduplicated by event id), the outbox of events
//! splitpay emits (deduplicated by a key per subject), the ops audit log, and cron tick claims (one replica wins
//! each tick).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::StoreError;
use crate::domain::ids::OutboxEventId;
use crate::events::OutboundEvent;

/// Writes outbound events; an event whose dedup key is already present is skipped, which is what makes
/// "fires once per split payment / allocation" hold under duplicate jobs. Each new event gets a delivery row and a
/// delivery job per matching enabled webhook endpoint of its organisation, in the caller's transaction. Returns
/// how many were new.
pub async fn insert_outbox_events(conn: &mut PgConnection, events: &[OutboundEvent]) -> Result<u64, StoreError> {
    // One statement for all of them, each with its own jittered schedule. An event repeated in `events` is written
    // once (as a second call would skip it).
    let mut seen = std::collections::HashSet::new();
    let events: Vec<&OutboundEvent> = events.iter().filter(|e| seen.insert(e.dedup_key.as_str())).collect();
    if events.is_empty() {
        return Ok(0);
    }
    let ids: Vec<String> = events
        .iter()
        .map(|_| OutboxEventId::generate().as_str().to_owned())
        .collect();
    let dedup_keys: Vec<&str> = events.iter().map(|e| e.dedup_key.as_str()).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let organisations: Vec<&str> = events.iter().map(|e| e.organisation_id.as_str()).collect();
    let occurred: Vec<DateTime<Utc>> = events.iter().map(|e| e.occurred_at).collect();
    let payloads: Vec<serde_json::Value> = events.iter().map(|e| e.envelope()).collect();
    let schedules: Vec<String> = events
        .iter()
        .map(|_| super::webhooks::deliveries::schedule_literal(&super::webhooks::jittered_schedule()))
        .collect();
    let (new, deliveries): (i64, Vec<String>) =
        sqlx::query_as(super::webhooks::deliveries::OUTBOX_INSERT_WITH_DELIVERIES_SQL)
            .bind(&ids)
            .bind(&dedup_keys)
            .bind(&types)
            .bind(&organisations)
            .bind(&occurred)
            .bind(&payloads)
            .bind(&schedules)
            .fetch_one(&mut *conn)
            .await?;
    for delivery in &deliveries {
        crate::jobs::queue::enqueue(conn, crate::jobs::queue::Queue::Deliver, delivery, None).await?;
    }
    Ok(new as u64)
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: String,
    pub dedup_key: String,
    pub event_type: String,
    pub organisation_id: String,
    pub occurred_at: DateTime<Utc>,
    pub payload: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub delivery_attempts: i32,
}

/// Outbox events about one subject (a split payment or allocation id, or a donation id), oldest first.
pub async fn outbox_events_about(conn: &mut PgConnection, subject_id: &str) -> Result<Vec<OutboxRow>, StoreError> {
    Ok(sqlx::query_as::<_, OutboxRow>(
        "SELECT id, dedup_key, event_type, organisation_id, occurred_at, payload, created_at, delivered_at,
                delivery_attempts
           FROM outbox_events
          WHERE payload->'data'->>'split_payment_id' = $1
             OR payload->'data'->>'split_allocation_id' = $1
             OR payload->'data'->>'id' = $1
          ORDER BY created_at, id",
    )
    .bind(subject_id)
    .fetch_all(conn)
    .await?)
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewStripeEvent {
    pub id: String,
    pub event_type: String,
    pub object_id: Option<String>,
    pub livemode: bool,
    pub payload: serde_json::Value,
    pub stripe_created: Option<DateTime<Utc>>,
}

/// Stores a verified Stripe event. Returns false when the event id was already stored (a redelivery).
pub async fn insert_stripe_event(conn: &mut PgConnection, event: &NewStripeEvent) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "INSERT INTO stripe_events (id, event_type, object_id, livemode, payload, stripe_created)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&event.id)
    .bind(&event.event_type)
    .bind(&event.object_id)
    .bind(event.livemode)
    .bind(&event.payload)
    .bind(event.stripe_created)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// As [`insert_stripe_event`], for an event nothing acts on: stored as processed (as its job would have left it).
pub async fn insert_processed_stripe_event(
    conn: &mut PgConnection,
    event: &NewStripeEvent,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "INSERT INTO stripe_events (id, event_type, object_id, livemode, payload, stripe_created, processed_at,
                                    process_attempts)
         VALUES ($1, $2, $3, $4, $5, $6, now(), 1)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&event.id)
    .bind(&event.event_type)
    .bind(&event.object_id)
    .bind(event.livemode)
    .bind(&event.payload)
    .bind(event.stripe_created)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StripeEventRow {
    pub id: String,
    pub event_type: String,
    pub object_id: Option<String>,
    pub livemode: bool,
    pub payload: serde_json::Value,
    pub stripe_created: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    pub processed_at: Option<DateTime<Utc>>,
    pub process_error: Option<String>,
    pub process_attempts: i32,
}

pub async fn get_stripe_event(conn: &mut PgConnection, id: &str) -> Result<StripeEventRow, StoreError> {
    sqlx::query_as::<_, StripeEventRow>("SELECT * FROM stripe_events WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "Stripe event",
            id: id.to_owned(),
        })
}

/// How many inbox events of `event_type` about `object_id` were processed (the end-to-end suite's proof that
/// Stripe's webhooks reached splitpay, forwarded or polled).
pub async fn processed_stripe_events(
    conn: &mut PgConnection,
    event_type: &str,
    object_id: &str,
) -> Result<i64, StoreError> {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM stripe_events WHERE event_type = $1 AND object_id = $2 AND processed_at IS NOT NULL",
    )
    .bind(event_type)
    .bind(object_id)
    .fetch_one(conn)
    .await?;
    Ok(n)
}

/// Marks an inbox event handled, with a note when handling found something an operator should see (a
/// contradiction, an unknown split payment). The event is not processed again either way.
pub async fn finish_stripe_event(conn: &mut PgConnection, id: &str, note: Option<&str>) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE stripe_events SET processed_at = now(), process_error = $2, process_attempts = process_attempts + 1
          WHERE id = $1",
    )
    .bind(id)
    .bind(note)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks an inbox event handled (or records why handling failed, leaving it for a retry).
pub async fn mark_stripe_event(conn: &mut PgConnection, id: &str, error: Option<&str>) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE stripe_events
            SET processed_at = CASE WHEN $2::text IS NULL THEN now() ELSE processed_at END, process_error = $2,
                process_attempts = process_attempts + 1
          WHERE id = $1",
    )
    .bind(id)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub actor: String,
    pub command: String,
    pub target_type: String,
    pub target_id: String,
    pub reason: Option<String>,
    pub details: serde_json::Value,
}

/// Appends to the ops audit log; call it in the same transaction as the change it records.
pub async fn insert_audit(conn: &mut PgConnection, entry: &AuditEntry) -> Result<i64, StoreError> {
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO ops_audit_log (actor, command, target_type, target_id, reason, details)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
    )
    .bind(&entry.actor)
    .bind(&entry.command)
    .bind(&entry.target_type)
    .bind(&entry.target_id)
    .bind(&entry.reason)
    .bind(&entry.details)
    .fetch_one(conn)
    .await?;
    Ok(id)
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AuditRow {
    pub id: i64,
    pub actor: String,
    pub command: String,
    pub target_type: String,
    pub target_id: String,
    pub reason: Option<String>,
    pub details: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

pub async fn audit_for(conn: &mut PgConnection, target_id: &str) -> Result<Vec<AuditRow>, StoreError> {
    Ok(
        sqlx::query_as::<_, AuditRow>("SELECT * FROM ops_audit_log WHERE target_id = $1 ORDER BY id")
            .bind(target_id)
            .fetch_all(conn)
            .await?,
    )
}

/// Every cron tick's first statement: the claim of `(name $1, tick $2)` by replica `$3` (a primary-key probe).
pub const CLAIM_CRON_TICK_SQL: &str = "INSERT INTO cron_claims (name, tick, claimed_by) VALUES ($1, $2, $3)
         ON CONFLICT ON CONSTRAINT cron_claims_pk DO NOTHING";

/// Claims one cron tick for this replica. True for exactly one caller per (name, tick), across replicas.
pub async fn claim_cron_tick(
    conn: &mut PgConnection,
    name: &str,
    tick: DateTime<Utc>,
    claimed_by: &str,
) -> Result<bool, StoreError> {
    let done = sqlx::query(CLAIM_CRON_TICK_SQL)
        .bind(name)
        .bind(tick)
        .bind(claimed_by)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Where the events sweep `name` stands (`None`: never ran).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct EventSweepState {
    /// Every event created before this was seen.
    pub swept_until: DateTime<Utc>,
    /// A backlog left by a pass that read too many or was cut: the events listed after this one are still to read.
    pub backlog_after: Option<String>,
    /// Where the cursor moves once the backlog is read (the start of the pass that left it).
    pub backlog_until: Option<DateTime<Utc>>,
}

pub async fn event_sweep_state(conn: &mut PgConnection, name: &str) -> Result<Option<EventSweepState>, StoreError> {
    Ok(sqlx::query_as::<_, EventSweepState>(
        "SELECT swept_until, backlog_after, backlog_until FROM stripe_event_sweeps WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(conn)
    .await?)
}

/// A complete pass: the cursor moves forward to `until` (never back: two replicas' passes may finish in either
/// order) and any backlog is done.
pub async fn advance_event_sweep(conn: &mut PgConnection, name: &str, until: DateTime<Utc>) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO stripe_event_sweeps (name, swept_until) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE
            SET swept_until = greatest(stripe_event_sweeps.swept_until, EXCLUDED.swept_until),
                backlog_after = NULL, backlog_until = NULL, updated_at = now()",
    )
    .bind(name)
    .bind(until)
    .execute(conn)
    .await?;
    Ok(())
}

/// A pass's position, saved after each page it ingested: the events listed after `after` (the oldest read) are
/// still to read; the cursor stays, and moves to `until` once they are.
pub async fn leave_event_sweep_backlog(
    conn: &mut PgConnection,
    name: &str,
    swept_until: DateTime<Utc>,
    after: &str,
    until: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO stripe_event_sweeps (name, swept_until, backlog_after, backlog_until) VALUES ($1, $2, $3, $4)
         ON CONFLICT (name) DO UPDATE
            SET backlog_after = EXCLUDED.backlog_after, backlog_until = EXCLUDED.backlog_until, updated_at = now()",
    )
    .bind(name)
    .bind(swept_until)
    .bind(after)
    .bind(until)
    .execute(conn)
    .await?;
    Ok(())
}

/// Which of `ids` the inbox holds already.
pub async fn known_stripe_events(conn: &mut PgConnection, ids: &[String]) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar("SELECT id FROM stripe_events WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(conn)
        .await?)
}
